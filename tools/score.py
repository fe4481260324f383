"""Scores (prompt, response) pairs from JSONL with a reward-model run directory.

  python tools/score.py --workdir runs/reward --input replies.jsonl --output scored.jsonl
  python tools/sample.py --workdir runs/dpo --prompts p.jsonl --output r.jsonl && \\
      python tools/score.py --workdir runs/reward --input r.jsonl --output s.jsonl --response_field reply

Input: one object per line with the prompt (``"prompt": [messages]`` or a plain string, as in
`tools/sample.py`) and the response text (``"response"`` by default, `--response_field` to read
another key, e.g. ``"reply"`` from `tools/sample.py`). Other fields pass through.
Every line is checked before the model is loaded; bad lines are reported as ``file:line: ...``
and nothing is scored (exit 1).

Output: each input line plus ``"reward"``: the reward model's scalar at the last real token of
prompt + response (`policy_eval.reward_model_judge`, the same scoring PPO and the evaluation
use), and ``"reward_normalized"`` when the run saved reward_stats.json. Written atomically. A
summary (count, mean, std) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run as `python tools/score.py` from a checkout that isn't installed.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxlm import files  # noqa: E402
from jaxlm import inference  # noqa: E402
from jaxlm import policy_eval  # noqa: E402
from jaxlm.data.errors import DataError  # noqa: E402
from jaxlm.data.schemas import validate_messages  # noqa: E402


def read_pairs(path: str, response_field: str) -> tuple[list[tuple[dict, list[dict], str]], list[str]]:
  """(record, prompt messages, response) per non-blank line, and the errors of bad lines."""
  rows, errors = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt")
        if isinstance(prompt, str):
          prompt = [{"role": "user", "content": prompt}]
        if prompt is None:
          raise DataError(where, "missing field 'prompt' (a list of messages or a string)")
        messages = validate_messages(prompt, where, "prompt")
        response = record.get(response_field)
        if not isinstance(response, str) or not response:
          raise DataError(where, f"field {response_field!r}: expected a non-empty string")
        rows.append((record, messages, response))
      except json.JSONDecodeError as e:
        errors.append(f"{where}: not valid JSON ({e.msg})")
      except DataError as e:
        errors.append(str(e))
  return rows, errors


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a reward-model run directory")
  parser.add_argument("--input", required=True, help="JSONL of {prompt, response} objects")
  parser.add_argument("--output", required=True, help="output JSONL (written atomically)")
  parser.add_argument("--response_field", default="response", help="the key holding the response text")
  parser.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
  args = parser.parse_args(argv)
  try:
    rows, errors = read_pairs(args.input, args.response_field)
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if errors:
    print("\n".join(f"error: {e}" for e in errors[:20]), file=sys.stderr)
    return 1
  try:
    loaded = inference.load_run(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if loaded.stage != "reward":
    print(f"error: {args.workdir} is a {loaded.stage!r} run; scoring needs a reward-model run directory",
          file=sys.stderr)
    return 2
  judge = policy_eval.reward_model_judge(loaded.params, loaded.model_config, loaded.tokenizer,
                                         batch_size=args.batch_size)
  scores = np.asarray(judge([{"prompt": m} for _, m, _ in rows], [r for _, _, r in rows],
                            [True] * len(rows)), np.float64)
  stats_path = os.path.join(args.workdir, "reward_stats.json")
  stats = json.loads(open(stats_path).read()) if os.path.exists(stats_path) else None
  lines = []
  for (record, _, _), score in zip(rows, scores):
    out = {**record, "reward": float(score)}
    if stats:
      out["reward_normalized"] = float((score - stats["mean"]) / max(stats["std"], 1e-6))
    lines.append(json.dumps(out, ensure_ascii=False) + "\n")
  files.atomic_write(args.output, "".join(lines))
  print(f"scored {len(rows)} pairs: mean {scores.mean():.4f} std {scores.std():.4f} -> {args.output}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
