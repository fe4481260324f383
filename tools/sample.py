"""Generates replies for a JSONL file of prompts, in batches, and writes them as JSONL.

  python tools/sample.py --workdir runs/sft --prompts prompts.jsonl --output replies.jsonl
  python tools/sample.py --workdir runs/dpo --prompts prompts.jsonl --output replies.jsonl \\
      --greedy --batch_size 128
  python tools/sample.py --workdir runs/sft --prompts prompts.jsonl --output replies.jsonl \\
      --num_samples_per_prompt 4 --temperature 1.0 --top_p 1.0

Input: one `prompt` record per line (`jaxlm/data/schemas.py`), ``{"prompt": [{"role": "user",
"content": "..."}], ...}`` (the conversation so far, ending with a user message), or
``{"prompt": "plain text"}`` as a single user message; other fields are passed through.
Blank lines are skipped. Every line is checked before the model is loaded, and every bad line
is reported as ``file:line: field ...: what was expected``; then nothing is generated (exit 1).

Output: one line per sample, in input order (the samples of one prompt together): the input
record's fields as given, plus

  reply        the generated text (up to the stop token)
  ended_turn   whether the model closed its turn (false: cut off at --max_new_tokens)
  num_tokens   tokens generated, the stop token included
  log_prob     summed log-prob of those tokens under the distribution they were drawn from
  sample_index 0 .. k-1, only with --num_samples_per_prompt k > 1

The output file is written once, at the end, atomically: an interrupted run leaves the previous
file (or none), never a partial one. Results are reproducible for the same flags (see
`jaxlm.inference.batch_replies` for how --seed and --batch_size determine the draws).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run as `python tools/sample.py` from a checkout that isn't installed.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors  # noqa: E402
from jaxlm import files  # noqa: E402
from jaxlm import inference  # noqa: E402
from jaxlm.data.errors import DataError  # noqa: E402
from jaxlm.data.schemas import validate  # noqa: E402
from jaxlm.sampling import SamplingConfig  # noqa: E402

_MAX_ERRORS_SHOWN = 20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a stage's run directory")
  parser.add_argument("--prompts", required=True, help="input JSONL of prompt records")
  parser.add_argument("--output", required=True, help="output JSONL (written atomically)")
  parser.add_argument("--temperature", type=float, default=0.7, help="softmax temperature (> 0)")
  parser.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
  parser.add_argument("--top_p", type=float, default=0.9, help="nucleus mass to keep (1: off)")
  parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
  parser.add_argument("--max_new_tokens", type=int, default=256,
                      help="longest reply in tokens (capped at half the model's max_len)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--batch_size", type=int, default=64, help="prompts per generation call")
  parser.add_argument("--num_samples_per_prompt", type=int, default=1,
                      help="replies per prompt (different draws unless --greedy)")
  args = parser.parse_args(argv)
  try:
    args.sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, greedy=args.greedy)
  except ValueError as e:
    parser.error(str(e))
  if args.batch_size < 1 or args.num_samples_per_prompt < 1:
    parser.error("--batch_size and --num_samples_per_prompt must be >= 1")
  return args


def read_prompts(path: str) -> tuple[list[tuple[dict, list[dict]]], list[DataError]]:
  """(record as given, validated messages) per non-blank line, and the errors of bad lines."""
  records, errors = [], []
  with open(path, "rb") as f:  # bytes, so a bad UTF-8 line is reported with its number
    for number, raw in enumerate(f, 1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        errors.append(DataError(where, f"not UTF-8 text (byte {e.start}: {e.reason})"))
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        errors.append(DataError(where, f"invalid JSON at column {e.colno}: {e.msg}"))
        continue
      candidate = record
      if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        # A plain string is one user message; the schema validates the rest as usual.
        candidate = {**record, "prompt": [{"role": "user", "content": record["prompt"]}]}
      try:
        records.append((record, validate("prompt", candidate, where)["prompt"]))
      except DataError as e:
        errors.append(e)
  return records, errors


def _report_errors(errors: list[DataError]) -> None:
  for error in errors[:_MAX_ERRORS_SHOWN]:
    print(f"error: {error}", file=sys.stderr)
  if len(errors) > _MAX_ERRORS_SHOWN:
    print(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more bad lines", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  # Orbax warns about opening a checkpoint directory read-only; that is the intent here.
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    records, errors = read_prompts(args.prompts)
  except OSError as e:
    print(f"error: cannot read --prompts: {e}", file=sys.stderr)
    return 2
  if errors:
    _report_errors(errors)
    print(f"{len(errors)} bad lines in {args.prompts}; nothing generated", file=sys.stderr)
    return 1
  if not records:
    print(f"error: {args.prompts} holds no prompts", file=sys.stderr)
    return 1
  try:
    loaded = inference.load_run(args.workdir)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if loaded.stage not in inference.POLICY_STAGES:
    print(f"warning: {loaded.workdir} is a {loaded.stage!r} run, not a policy; its replies "
          "mean nothing", file=sys.stderr)
  max_new_tokens = min(args.max_new_tokens, loaded.model_config.max_len // 2)
  if max_new_tokens < args.max_new_tokens:
    print(f"note: --max_new_tokens capped at {max_new_tokens} (half the model's max_len)",
          file=sys.stderr)

  k = args.num_samples_per_prompt
  # The samples of one prompt sit in neighbouring rows, which draw with different keys.
  prompts = [messages for _, messages in records for _ in range(k)]
  start = time.perf_counter()
  print(f"generating {len(prompts)} replies", file=sys.stderr, flush=True)
  replies = inference.batch_replies(loaded, prompts, sampling=args.sampling,
                                    max_new_tokens=max_new_tokens, seed=args.seed,
                                    batch_size=args.batch_size)
  lines = []
  for i, reply in enumerate(replies):
    row: dict[str, Any] = dict(records[i // k][0])
    row.update(reply=reply["text"], ended_turn=reply["ended_turn"],
               num_tokens=reply["num_tokens"], log_prob=reply["log_prob"])
    if k > 1:
      row["sample_index"] = i % k
    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
  files.atomic_write(args.output, "".join(lines))
  ended = sum(r["ended_turn"] for r in replies)
  print(f"wrote {len(lines)} replies to {args.output} ({ended} ended their turn, "
        f"{time.perf_counter() - start:.1f}s)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
