r"""Train a jaxlm SentencePiece tokenizer from any text source.

  python tools/train_tokenizer.py --out=/tmp/tok.model                          # the world's text
  python tools/train_tokenizer.py --source=text:corpus/*.txt --vocab_size=8192 --out=tok.model
  python tools/train_tokenizer.py --source=tfds:tiny_shakespeare --field_map=text=text \
      --model_type=char --out=char.model

The source is any `text` source string (see README, "Sources"); only its train split is read.
Stage 1 trains its tokenizer the same way (unless given one); this tool is for training one by
hand, e.g. to inspect loss masks with `tools/show_masks.py` before any model exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import sources, world
from jaxlm.data.errors import DataError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="world", help="a text source string (default: world)")
  parser.add_argument("--out", required=True, help="where to write the .model file")
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--model_type", default="bpe", choices=tokenizer_lib.MODEL_TYPES)
  parser.add_argument("--seed", type=int, default=0, help="also the world's seed for --source=world")
  parser.add_argument("--character_coverage", type=float, default=1.0,
                      help="1.0 gives every character a piece; 0.9995 for large alphabets (CJK)")
  parser.add_argument("--field_map", default="", help="for tfds: sources, e.g. text=text")
  parser.add_argument("--cache_dir", default=None)
  args = parser.parse_args(argv)
  try:
    source = sources.open_source(args.source, "text", "train", cache_dir=args.cache_dir,
                                 world=world.WorldConfig(seed=args.seed),
                                 field_map=sources.parse_key_values(args.field_map, "--field_map") or None)
    start = time.perf_counter()
    tok = tokenizer_lib.train_tokenizer((source[i]["text"] for i in range(len(source))), args.out,
                                        vocab_size=args.vocab_size, model_type=args.model_type, seed=args.seed,
                                        character_coverage=args.character_coverage)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"trained a {args.model_type} tokenizer, vocab {tok.vocab_size}, on {len(source)} documents of "
        f"{source.description} in {time.perf_counter() - start:.1f} s")
  print(f"wrote {args.out} (sha256 {tok.content_hash[:16]}...)")
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
