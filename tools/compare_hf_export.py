r"""Checks an export against transformers itself: the run's logits in jaxlm vs the export's in HF.

  # a scratch environment with both (torch is never a jaxlm dependency):
  python -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers -e .
  python tools/export_hf.py --workdir=runs/qwen-dpo --out=/tmp/qwen-dpo-hf
  /tmp/refenv/bin/python tools/compare_hf_export.py --workdir=runs/qwen-dpo --export=/tmp/qwen-dpo-hf

Loads the run's latest params with jaxlm (float32) and the exported directory with
`transformers.AutoModelForCausalLM.from_pretrained(..., dtype=float32)` (or
`AutoModelForSequenceClassification` for a reward model), feeds both the same rows (a chat
rendered by the run's own chat format, and a right-padded second row with an attention mask),
and prints the largest absolute logit (or reward) difference over the valid positions (a reward
model's rows are padded with the export's `pad_token_id`, as HF's classifier expects). It exits
1 when that exceeds `--tolerance` (default 1e-4, the project's float32 parity bound).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(tok, pad_id: int) -> tuple:
  """Two rows of ids [2, T] and their mask: a rendered chat, and a shorter one right-padded
  with `pad_id` (HF's classifier finds the last token by it, not by the attention mask)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlm import chat_template  # pylint: disable=import-outside-toplevel

  chat = [{"role": "user", "content": "What is two plus three?"}, {"role": "assistant", "content": "Five."}]
  first, _ = chat_template.render_chat(tok, chat)
  second = chat_template.render_prompt(tok, chat[:1])
  width = max(len(first), len(second))
  ids = np.full((2, width), pad_id, np.int32)
  mask = np.zeros((2, width), np.int32)
  for row, seq in enumerate((first, second)):
    ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
  return ids, mask


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a jaxlm run directory (any stage)")
  parser.add_argument("--export", required=True, help="its export (tools/export_hf.py --out)")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxlm import checkpoint, model as model_lib  # pylint: disable=import-outside-toplevel

  run = checkpoint.load_parent(args.workdir, require_complete=False)
  config = run.model_config.replace(dtype="float32", attention_impl=None)
  reward = "scalar_head" in run.params and run.manifest.get("stage") == "reward"
  exported = transformers.AutoConfig.from_pretrained(args.export)
  ids, mask = _rows(run.tokenizer, exported.pad_token_id if reward else 0)
  segment_ids = jax.numpy.asarray(mask)
  module = model_lib.Transformer(config)
  if reward:
    last = mask.sum(axis=1) - 1
    ours = np.asarray(module.apply({"params": run.params}, ids, segment_ids=segment_ids, scalar_index=last,
                                   lm_head=False).scalar)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(args.export, dtype=torch.float32)
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0]
    theirs = theirs.numpy() + float(hf.config.to_dict().get("jaxlm_score_bias", 0.0))
    diff = float(np.max(np.abs(ours - theirs)))
    what = "reward"
  else:
    ours = np.asarray(module.apply({"params": run.params}, ids, segment_ids=segment_ids).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32)
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    diff = float(np.max(np.abs(ours - theirs)[mask.astype(bool)]))
    what = "logits"
  verdict = "ok" if diff <= args.tolerance else "EXCEEDS"
  print(f"{args.workdir} vs {args.export} ({hf.config.architectures[0]}): max |{what} difference| {diff:.3g} "
        f"over {int(mask.sum())} valid positions, tolerance {args.tolerance:g}: {verdict}")
  return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
