r"""Input-pipeline throughput: batches/s and tokens/s of each grain pipeline on the world.

The input pipeline must never be what a training step waits for. This prints, for each
pipeline, the steady-state batches/s and tokens/s (after a warm-up that excludes thread start
and the first shuffle), next to the tokens/s that a small CPU training step consumes, so the
headroom is one ratio.

  python tools/bench_data.py                       # default world, vocab 2048, batch 12 x 64
  python tools/bench_data.py --seq_len=256 --batch_size=32 --num_threads=1

`--consumer_tokens_per_s` is the rate to compare with; its default, 15,000 tokens/s, is
nanoGPT's CPU recipe (batch 12 x block 64 in about 50 ms per iteration on 2 cores), the fastest
small step we train on this machine class.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipelines, sources, world


def measure(dataset, *, warmup: int, batches: int) -> tuple[float, float]:
  """-> (batches/s, real tokens/s) over `batches` batches after `warmup` ones."""
  it = iter(dataset)
  for _ in range(warmup):
    next(it)
  start, tokens = time.perf_counter(), 0
  for batch in itertools.islice(it, batches):
    mask = next(v for k, v in batch.items() if k.endswith(("segment_ids", "prompt_tokens")))
    tokens += int((mask > 0).sum())
  seconds = time.perf_counter() - start
  return batches / seconds, tokens / seconds


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=12)
  parser.add_argument("--num_threads", type=int, default=2)
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--cache_dir", default=None, help="prepared-data cache (default: jaxlm's)")
  parser.add_argument("--consumer_tokens_per_s", type=float, default=15_000.0)
  args = parser.parse_args(argv)

  config = world.WorldConfig(seed=args.seed)
  open_world = lambda kind, split="train": sources.open_source("world", kind, split, cache_dir=args.cache_dir,
                                                                world=config)
  text = open_world("text")
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    tok = tokenizer_lib.train_tokenizer((text[i]["text"] for i in range(len(text))), os.path.join(tmp, "t.model"),
                                        vocab_size=args.vocab_size)
    print(f"tokenizer: vocab {tok.vocab_size} trained in {time.perf_counter() - start:.1f} s")

  common = dict(batch_size=args.batch_size, seed=args.seed, num_threads=args.num_threads)
  runs = {
      "pretraining": pipelines.pretraining_dataset(text, tok, seq_len=args.seq_len, **common),
      "sft (packed)": pipelines.sft_dataset(open_world("chat"), tok, max_len=max(args.seq_len, 128), **common),
      "pairs": pipelines.pairs_dataset(open_world("preference"), tok, max_len=max(args.seq_len, 128), **common),
      "prompts": pipelines.prompts_dataset(open_world("prompt"), tok, max_prompt_len=64, **common),
  }
  print(f"\n| pipeline | batch | batches/s | tokens/s | x consumer ({args.consumer_tokens_per_s:,.0f} tok/s) |")
  print("|---|---|---|---|---|")
  for name, dataset in runs.items():
    batches_per_s, tokens_per_s = measure(dataset, warmup=20, batches=args.batches)
    print(f"| {name} | {args.batch_size} | {batches_per_s:,.0f} | {tokens_per_s:,.0f} | "
          f"{tokens_per_s / args.consumer_tokens_per_s:.1f}x |")


if __name__ == "__main__":
  errors.guard(main)()
