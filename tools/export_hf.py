r"""Export a jaxlm run directory (any stage) as a Hugging Face model directory.

  python tools/export_hf.py --workdir=runs/qwen-sft --out=/tmp/qwen-sft-hf [--dtype=bfloat16]

Check it with transformers itself::

  python -c "import sys, torch, transformers as t; d = sys.argv[1]; \
    m = t.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32); \
    tok = t.AutoTokenizer.from_pretrained(d); \
    print(m(**tok('Hello there', return_tensors='pt')).logits[0, -1, :5])" /tmp/qwen-sft-hf

Done by hand (transformers 5.24, torch 2.13 CPU) on exports of the five tests/fixtures/hf
imports: logits bitwise equal to the fixtures' transformers references; a Qwen2 reward run as
Qwen2ForSequenceClassification: score + jaxlm_score_bias equal to jaxlm's scalar head (1e-5);
a jaxlm-grown SentencePiece run as LlamaForCausalLM: logits within 7e-6 of jaxlm's, and
LlamaTokenizer encoded a sample sentence to jaxlm's ids.

What is written:
- model.safetensors (or model-0000k-of-0000n.safetensors + index above 5 GB), float32 or
  bfloat16, in the HF layout of `jaxlm/hf_checkpoint.py`.
- config.json: the architecture of the run's lineage (manifest `model_origin` "hf:<arch>";
  a model grown by jaxlm becomes Llama, Qwen2 with q/k/v biases, Qwen3 with QK-norm), starting
  from the imported model's hf_config.json when the lineage has one (token ids and other keys
  kept), with every key that decides the function rewritten from the run's model config.
- A reward-model run (stage "reward", or --head=reward) becomes `<Family>ForSequenceClassification`
  with score.weight [1, E]; HF's score has no bias, so jaxlm's scalar-head bias goes into
  config.json as `jaxlm_score_bias` (a constant shift of every reward, invisible to the
  Bradley-Terry loss and accuracy; `tools/import_hf.py` reads it back). transformers reads the
  reward at the last token that is not `pad_token_id`, so the export declares a pad token that
  never ends a turn (`reward_pad_id`; also written into tokenizer_config.json as `pad_token`).
  PPO and DPO runs export their policy (a causal LM).
- The tokenizer: a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json,
  chat_template.jinja, generation_config.json, special_tokens_map.json, found in the run or
  its parents) is copied as is. A run trained on jaxlm's own SentencePiece tokenizer
  (tokenizer.model only) gets its tokenizer.model and a tokenizer_config.json naming
  `LlamaTokenizer` with jaxlm's bos/eos/pad/unk pieces: transformers then loads it with
  `AutoTokenizer.from_pretrained(out)` if `sentencepiece` is installed (and `protobuf` for the
  fast conversion). That tokenizer has no chat template (jaxlm's chat format is not Jinja) and
  transformers' Llama wrapper adds its own prefix-space and bos conventions, so text may not
  encode to exactly jaxlm's ids: feed it ids from jaxlm's tokenizer when exactness matters.
  The weights are exact either way.

The output directory must not exist or be empty. User errors print one `error: ...` line and
exit 2 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import hf_checkpoint as hf
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.model_config import ModelConfig


def load_run(workdir: str, *, require_complete: bool = True) -> tuple[dict, ModelConfig, dict, object]:
  """(params as host arrays, model config, manifest, tokenizer) of any stage's run directory,
  read as a child stage reads its parent (`checkpoint.load_parent`: the params subtree only)."""
  parent = checkpoint.load_parent(workdir, require_complete=require_complete)
  return parent.params, parent.model_config, parent.manifest, parent.tokenizer


def _lineage(workdir: str) -> list[str]:
  """The run and its ancestors (manifest `parent`), nearest first."""
  chain, current = [], os.path.abspath(workdir)
  while current and current not in chain and os.path.exists(os.path.join(current, "manifest.json")):
    chain.append(current)
    with open(os.path.join(current, "manifest.json")) as f:
      current = json.load(f).get("parent")
  return chain


def _find(chain: list[str], name: str) -> str | None:
  for directory in chain:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def reward_pad_id(tok) -> int:
  """The pad id an exported reward model declares: one that never ends a scored row.

  transformers' `*ForSequenceClassification` reads the reward at the last token that is not
  `pad_token_id`, whatever the attention mask says. jaxlm reads it at the row's last token,
  which is the reply's end-of-turn token (`<|eot_id|>`, `<|im_end|>`, ...). Many tokenizers pad
  with eos or the end-of-turn token (Llama 3 has no pad; Qwen2.5 pads with `<|endoftext|>`, one
  of its stop ids): declared as pad, HF would read the reward one token early, a known way to
  get a wrong reward model out of HF tooling. So the tokenizer's pad is kept only when it ends
  no turn; otherwise an unused special token takes its place, one named as a pad first
  (`<|finetune_right_pad_id|>`, `<|fim_pad|>`), then a reserved one, then any special token that
  ends nothing (it may occur inside a row: only the last token matters).
  """
  ends = set(tok.chat_format.stop_ids) | {tok.eos_id, tok.chat_format.end_of_turn_id}
  if tok.pad_id not in ends:
    return tok.pad_id
  candidates = sorted(i for i in tok.special_ids if i not in ends)
  for wanted in ("pad", "reserved", ""):
    named = [i for i in candidates if wanted in tok.id_to_piece(i).lower()]
    if named:
      return named[0]
  raise errors.ParentError("the tokenizer pads with a token that ends turns and has no other special token: an "
                           "exported reward model would be read at the wrong token; add a pad token to the "
                           "tokenizer before importing")


def _write_tokenizer(chain: list[str], out: str, tok, *, reward: bool) -> dict:
  """Copies/writes the tokenizer files (module docstring); returns config.json's token ids."""
  if os.path.isfile(os.path.join(chain[0], "tokenizer.json")):
    hf.copy_tokenizer_files(chain[0], out)
    for name in hf.TOKENIZER_FILES:  # e.g. generation_config.json stays with the import run
      found = _find(chain, name)
      if found and not os.path.exists(os.path.join(out, name)):
        shutil.copyfile(found, os.path.join(out, name))
    if not reward:
      return {"pad_token_id": tok.pad_id}
    pad = reward_pad_id(tok)
    path = os.path.join(out, "tokenizer_config.json")
    tokenizer_config = hf.read_json(path)
    tokenizer_config["pad_token"] = tok.id_to_piece(pad)  # what HF pipelines pad batches with
    with open(path, "w") as f:
      json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
      f.write("\n")
    return {"pad_token_id": pad}
  sp_path = os.path.join(chain[0], tokenizer_lib.SENTENCEPIECE_FILE)
  if not os.path.isfile(sp_path):
    raise errors.MissingError(f"{chain[0]} holds neither tokenizer.json nor tokenizer.model")
  shutil.copyfile(sp_path, os.path.join(out, "tokenizer.model"))
  sp = tok
  pieces = {name: sp.id_to_piece(getattr(sp, f"{name}_id")) for name in ("bos", "eos", "pad", "unk")}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "legacy": False, "model_max_length": None, "clean_up_tokenization_spaces": False,
               **{f"{k}_token": v for k, v in pieces.items()}}, f, indent=2)
  ids = {"bos_token_id": sp.bos_id, "eos_token_id": sp.eos_id, "pad_token_id": sp.pad_id}
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(ids, f, indent=2)
  return ids


def export_run(workdir: str, out: str, *, dtype: str = "float32", head: str = "auto",
               require_complete: bool = True) -> dict:
  """Writes the HF directory; returns its config.json."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise errors.RunDirError(f"{out} exists and is not empty; export into a new directory")
  params, model_config, manifest, tok = load_run(workdir, require_complete=require_complete)
  reward = manifest.get("stage") == "reward" if head == "auto" else head == "reward"
  if reward and "scalar_head" not in params:
    raise errors.ParentError(f"{workdir}: --head=reward but the run's params have no scalar_head")
  origin = manifest.get("model_origin") or checkpoint.JAXLM_ORIGIN
  family = hf.ARCHITECTURES.get(origin[3:]) if origin.startswith("hf:") else None
  architecture = hf.architecture_for(model_config, reward=reward, family=family)
  chain = _lineage(workdir)
  base_path = _find(chain, "hf_config.json")
  base = hf.read_json(base_path) if base_path else None
  os.makedirs(out, exist_ok=True)
  token_ids = _write_tokenizer(chain, out, tok, reward=reward)
  extra = {k: v for k, v in token_ids.items() if (base or {}).get(k) is None}
  if reward:
    extra["pad_token_id"] = token_ids["pad_token_id"]  # even over the base's: see `reward_pad_id`
  if not reward and base is not None:
    extra.pop("pad_token_id", None)  # a causal LM keeps its own (often null) pad id
  if reward:
    extra[hf.SCORE_BIAS_KEY] = hf.score_bias(params)
  config = hf.hf_config_from_model(model_config, architecture, dtype=dtype, base=base, extra=extra)
  if not reward:
    params = {k: v for k, v in params.items() if k != "scalar_head"}
  hf.save_params(params, model_config, architecture, out, dtype=dtype)
  with open(os.path.join(out, hf.CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a jaxlm run directory (any stage)")
  parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--head", default="auto", choices=["auto", "lm", "reward"],
                      help="auto: a reward run as *ForSequenceClassification, others as *ForCausalLM")
  parser.add_argument("--allow_incomplete", action="store_true", help="export an unfinished run's latest checkpoint")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  args = parser.parse_args(argv)
  config = export_run(args.workdir, args.out, dtype=args.dtype, head=args.head,
                      require_complete=not args.allow_incomplete)
  print(f"exported {args.workdir} as {config['architectures'][0]} ({args.dtype}) to {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
