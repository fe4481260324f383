r"""Import a Hugging Face model directory as a jaxlm run directory (stage "import").

  python tools/import_hf.py --hf_dir=/models/Qwen2.5-0.5B-Instruct --workdir=runs/qwen-import
  python -m experiments.sft --config=configs/sft.py:... --workdir=runs/qwen-sft \
      --config.init_from=runs/qwen-import

Supported: LlamaForCausalLM (Llama 2/3/3.1/3.2), MistralForCausalLM, Qwen2ForCausalLM (2/2.5),
Qwen3ForCausalLM and their *ForSequenceClassification (one label: a reward model), with
safetensors weights (single file or sharded with an index; float32/bf16/fp16). Anything jaxlm
would not compute exactly is refused naming the config.json key (`jaxlm/hf_checkpoint.py`).

The run directory it writes (never over an existing, non-empty one; built in a temporary
sibling and renamed into place, so a failed import leaves nothing half-written)::

  config.json             what was imported: hf_dir, architecture, dtype, max_len, model
  manifest.json           stage "import", complete, model_origin "hf:<architecture>",
                          model_config, tokenizer_hash (`hf_checkpoint.tokenizer_files_hash`),
                          extra: architecture, hf_config (the original config.json), source_files
                          (sha256 of every file read), num_params
  checkpoints/0/state/    orbax, the state {"params": tree}: what `checkpoint.load_parent` reads
  hf_config.json          the original config.json (export starts from it: token ids etc.)
  tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json,
  special_tokens_map.json (those the model directory has)

Parameters are read tensor slice by tensor slice straight into device arrays, split over this
host's devices as FSDP training splits them, so neither the host nor one device holds the whole
checkpoint. A user error (missing file, unsupported option, existing workdir)
prints one `error: ...` line and exits 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import hf_checkpoint as hf
from jaxlm import model as model_lib
from jaxlm import sharding

STAGE = "import"


def _tokenizer_vocab_size(path: str) -> int:
  """Ids the tokenizer can produce: its model's vocabulary plus added tokens."""
  data = hf.read_json(path)
  vocab = (data.get("model") or {}).get("vocab") or {}
  size = len(vocab) if isinstance(vocab, (dict, list)) else 0
  added = [t.get("id", -1) for t in data.get("added_tokens") or []]
  return max([size] + [i + 1 for i in added])


def _source_files(hf_dir: str) -> dict[str, str]:
  names = [n for n in sorted(os.listdir(hf_dir))
           if n.endswith((".safetensors", ".json", ".jinja", ".model")) and os.path.isfile(os.path.join(hf_dir, n))]
  return {n: hf.file_sha256(os.path.join(hf_dir, n)) for n in names}


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise errors.RunDirError(f"{workdir} already exists and is not empty: an import never overwrites a "
                             "run directory; choose a new --workdir (or delete that one yourself)")


def _fsdp_shardings(model_config, architecture: str):
  """Every parameter split over this host's devices as training shards it (FSDP, the model's
  logical axis rules), so the checkpoint is read slice by slice into device memory that can
  hold it: an 8B model's 32 GB of float32 never sits on one device or on the host."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
  init = functools.partial(model_lib.init_params, model_config, scalar_head=hf.is_reward_architecture(architecture))
  return sharding.logical_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)


def import_checkpoint(hf_dir: str, workdir: str, *, dtype: str = "float32", max_len: int | None = None) -> dict:
  """Writes the run directory (module docstring); returns its manifest."""
  start = time.perf_counter()
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  check_workdir(workdir)
  config_path = os.path.join(hf_dir, hf.CONFIG_FILE)
  hf_config = hf.read_json(config_path)
  architecture = hf.architecture_of(hf_config, config_path)
  model_config = hf.model_config_from_hf(hf_config, source=config_path, dtype=dtype, max_len=max_len)
  tok_path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tok_path):
    raise errors.MissingError(f"{tok_path} not found: jaxlm imports a model with its Hugging Face "
                              "(fast) tokenizer; save one with tokenizer.save_pretrained(...)")
  tok_vocab = _tokenizer_vocab_size(tok_path)
  if tok_vocab > model_config.vocab_size:
    raise hf.HFConfigError(f"{config_path}: key 'vocab_size' is {model_config.vocab_size} but {tok_path} "
                           f"produces ids up to {tok_vocab - 1}: those tokens would have no embedding")
  tmp = f"{workdir}.importing-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    params = hf.load_params(hf_dir, model_config, architecture, shardings=_fsdp_shardings(model_config, architecture),
                            score_bias=float(hf_config.get(hf.SCORE_BIAS_KEY, 0.0)))
    run = checkpoint.RunDir(tmp)
    config = {"stage": STAGE, "hf_dir": hf_dir, "architecture": architecture, "dtype": dtype,
              "max_len": max_len, "model": model_config.to_dict()}
    run.write_config(config)
    copied = hf.copy_tokenizer_files(hf_dir, tmp)
    shutil.copyfile(config_path, os.path.join(tmp, "hf_config.json"))
    run.write_manifest(
        stage=STAGE, parent=None, config=config, tokenizer_hash=hf.tokenizer_files_hash(tmp),
        data_source=f"hf:{hf_dir}", model_config=model_config, model_origin=f"hf:{architecture}",
        extra={"architecture": architecture, "hf_config": hf_config, "source_files": _source_files(hf_dir),
               "tokenizer_files": copied, "tokenizer_vocab_size": tok_vocab})
    with checkpoint.Checkpointer(tmp, max_to_keep=None, async_save=False) as ckpt:
      ckpt.save(0, {checkpoint.PARAMS_KEY: params}, data_state=None)
    manifest = run.update_manifest(final_metrics={"num_params": hf.num_params(params)},
                                   wall_time_s=time.perf_counter() - start, complete=True)
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # empty (checked above); replaced atomically by the finished import
    os.replace(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf_dir", required=True, help="a directory saved by transformers' save_pretrained")
  parser.add_argument("--workdir", required=True, help="the run directory to create")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="the model's compute dtype recorded for later stages (params stay float32)")
  parser.add_argument("--max_len", type=int, default=None,
                      help="ModelConfig.max_len (default: config.json's max_position_embeddings)")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  args = parser.parse_args(argv)
  manifest = import_checkpoint(args.hf_dir, args.workdir, dtype=args.dtype, max_len=args.max_len)
  extra = manifest["extra"]
  print(f"imported {extra['architecture']} ({manifest['final_metrics']['num_params']:,} parameters) "
        f"into {os.path.abspath(args.workdir)}")
  print(json.dumps(manifest["model_config"]))
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
