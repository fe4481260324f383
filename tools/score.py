"""Scores (prompt, response) pairs from JSONL with a reward-model run directory.

  python tools/score.py --workdir runs/reward --input replies.jsonl --output scored.jsonl
  python tools/sample.py --workdir runs/dpo --prompts p.jsonl --output r.jsonl && \\
      python tools/score.py --workdir runs/reward --input r.jsonl --output s.jsonl

Input: one object per line with the prompt (``"prompt": [messages]`` or a plain string, as in
`tools/sample.py`) and the response text: by default the ``"reply"`` field (what
`tools/sample.py` writes), or ``"response"`` in a line without one; `--response_field` names
another key. Other fields pass through.
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

from jaxlm import errors  # noqa: E402
from jaxlm import files  # noqa: E402
from jaxlm import inference  # noqa: E402
from jaxlm import policy_eval  # noqa: E402
from jaxlm.data.errors import DataError  # noqa: E402
from jaxlm.data.schemas import validate_messages  # noqa: E402


DEFAULT_RESPONSE_FIELDS = ("reply", "response")  # tools/sample.py writes "reply"


def read_pairs(path: str, response_field: str | None) -> tuple[list[tuple[dict, list[dict], str]], list[str]]:
  """(record, prompt messages, response) per non-blank line, and the errors of bad lines.

  `response_field` None: "reply", else "response" (`DEFAULT_RESPONSE_FIELDS`).
  """
  rows, problems = [], []
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
        field = response_field or next((f for f in DEFAULT_RESPONSE_FIELDS if f in record), None)
        if field is None:
          raise DataError(where, f"no response: expected a field {' or '.join(map(repr, DEFAULT_RESPONSE_FIELDS))} "
                          f"(or name the field with --response_field); the line has {sorted(record)}")
        response = record.get(field)
        if not isinstance(response, str) or not response.strip():
          raise DataError(where, f"field {field!r}: expected a non-empty string")
        rows.append((record, messages, response))
      except json.JSONDecodeError as e:
        problems.append(f"{where}: not valid JSON ({e.msg})")
      except DataError as e:
        problems.append(str(e))
  return rows, problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a reward-model run directory")
  parser.add_argument("--input", required=True, help="JSONL of {prompt, response} objects")
  parser.add_argument("--output", required=True, help="output JSONL (written atomically)")
  parser.add_argument("--response_field", default=None,
                      help="the key holding the response text (default: 'reply', else 'response')")
  parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
  parser.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
  args = parser.parse_args(argv)
  rows, bad = read_pairs(args.input, args.response_field)
  if bad:
    more = f"\n... and {len(bad) - 20} more bad lines" if len(bad) > 20 else ""
    raise DataError(args.input, f"{len(bad)} bad lines, nothing scored:\n" + "\n".join(bad[:20]) + more)
  loaded = inference.load_run(args.workdir)
  if loaded.stage != "reward":
    raise errors.ParentError(f"--workdir={args.workdir} is a {loaded.stage!r} run; scoring needs a "
                             "reward-model run directory")
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
  sys.exit(errors.guard(main)())
