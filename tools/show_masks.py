"""Shows chat examples token by token with the tokens that carry loss marked.

Use it to check what SFT actually trains on: every token is printed as its vocabulary piece
(SentencePiece: ``▁`` is a space, ``<0xE6>`` a byte; byte-level BPE: ``Ġ`` a space, ``Ċ`` a
newline; special tokens by name), separated by spaces, and the trainable tokens (assistant
content and the end of turn closing it, ``<|end|>`` for jaxlm's tokenizer, see
`jaxlm.chat_template`) are highlighted in colour on a terminal or wrapped in ``[[ ... ]]``
otherwise (pipes, files, ``--color never``). Each turn starts on a new line.

  python tools/show_masks.py --tokenizer runs/x/tokenizer.model --jsonl chats.jsonl --num 3
  python tools/show_masks.py --workdir runs/x --source world --split validation
  python tools/show_masks.py --tokenizer path/to/hf_model_dir --jsonl chats.jsonl

--tokenizer takes a ``.model`` file or any directory `jaxlm.tokenizer.load_tokenizer` reads
(a run directory, or a Hugging Face model directory with tokenizer.json).

Records that fail validation are reported on stderr (with their ``file:line``) and skipped;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any, Iterator

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run as `python tools/show_masks.py` from a checkout that isn't installed.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors  # noqa: E402
from jaxlm.chat_template import render_chat  # noqa: E402
from jaxlm.data.errors import DataError  # noqa: E402
from jaxlm.data.schemas import validate  # noqa: E402
from jaxlm.tokenizer import Tokenizer, TokenizerLike, load_tokenizer  # noqa: E402

_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
  """(where, parsed record or DataError) for each non-blank line of a JSONL file."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        yield where, DataError(where, f"invalid JSON ({e})")


def _world_records(split: str) -> Iterator[tuple[str, Any]]:
  # Imported only for --source world (and eagerly here, not inside a generator, so a missing
  # module is reported before any output).
  from jaxlm.data.world import WorldConfig, generate
  records = generate("chat", split, WorldConfig())
  return ((f"world[chat/{split}][{i}]", record) for i, record in enumerate(records))


def _piece_text(tokenizer: TokenizerLike, token: int) -> str:
  """The piece of `token` with control characters escaped, so every token stays on one line."""
  piece = tokenizer.id_to_piece(token)
  return piece.encode("unicode_escape").decode("ascii") if not piece.isprintable() else piece


def format_example(tokenizer: TokenizerLike, ids, mask, *, color: bool, show_ids: bool) -> str:
  """Ids [T] and loss mask [T] -> the marked-up, token-by-token text of one example."""
  end_of_turn, special = tokenizer.chat_format.end_of_turn_id, tokenizer.special_ids
  out, trained_before = [], False
  for token, trained in zip(ids.tolist(), mask.tolist()):
    text = _piece_text(tokenizer, token) + (f"({token})" if show_ids else "")
    if color:
      style = _GREEN if trained else (_DIM if token in special else "")
      text = f"{style}{text}{_RESET}" if style else text
    elif trained != trained_before:
      out.append("[[" if trained else "]]")
    out.append(text)
    trained_before = trained
    if token == end_of_turn:
      if not color and trained:
        out.append("]]")
        trained_before = False
      out.append("\n")
  if not color and trained_before:
    out.append("]]")
  # Tokens are joined by spaces: a real space inside a piece shows as ▁, so this is unambiguous.
  return " ".join(out).replace(" \n ", "\n").rstrip("\n ")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--tokenizer", help="a tokenizer .model file, or a directory holding "
                     "tokenizer.model or a Hugging Face tokenizer.json")
  model.add_argument("--workdir", help="a run directory; uses its tokenizer")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--jsonl", help="a JSONL file of chat records")
  source.add_argument("--source", choices=["world"], help="generate chats with jaxlm.data.world")
  parser.add_argument("--split", default="train", help="split for --source world (default: train)")
  parser.add_argument("--num", type=int, default=5, help="number of records to show (default: 5)")
  parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                      help="colour trainable tokens (auto: when stdout is a terminal)")
  parser.add_argument("--ids", action="store_true", help="print each token's id after its piece")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  path = args.tokenizer or args.workdir
  try:
    tokenizer = load_tokenizer(path) if os.path.isdir(path) else Tokenizer.load(path)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  color = args.color == "always" or (
      args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
  if args.jsonl and not os.path.isfile(args.jsonl):
    print(f"error: no such JSONL file: {args.jsonl}", file=sys.stderr)
    return 2
  try:
    records = _jsonl_records(args.jsonl) if args.jsonl else _world_records(args.split)
  except ImportError as e:
    print(f"error: --source world needs jaxlm.data.world ({e})", file=sys.stderr)
    return 2
  shown = errors = total_tokens = total_trained = 0
  for where, record in itertools.islice(records, max(args.num, 0)):
    try:
      if isinstance(record, DataError):
        raise record
      messages = validate("chat", record, where)["messages"]
      ids, mask = render_chat(tokenizer, messages, where=where)
    except DataError as e:
      print(f"skipped {e}", file=sys.stderr)
      errors += 1
      continue
    shown += 1
    trained = int(mask.sum())
    total_tokens, total_trained = total_tokens + len(ids), total_trained + trained
    print(f"=== {where}: {len(ids)} tokens, {trained} trainable ({100 * trained / len(ids):.1f}%)")
    print(format_example(tokenizer, ids, mask, color=color, show_ids=args.ids))
    print()
  share = 100 * total_trained / total_tokens if total_tokens else 0.0
  print(f"{shown} examples, {total_tokens} tokens, {total_trained} trainable ({share:.1f}%)"
        + (f", {errors} skipped" if errors else ""))
  return 1 if errors else 0


if __name__ == "__main__":
  try:
    sys.exit(errors.guard(main)())
  except BrokenPipeError:  # `... | head`: stop quietly.
    sys.stderr.close()
    sys.exit(0)
