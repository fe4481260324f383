r"""Prepares a data source once and shows what a stage will read: records per split and an example.

  python tools/prepare_data.py --source=world --kind=all
  python tools/prepare_data.py --source=world --kind=chat --world=seed=1,num_chats=2000
  python tools/prepare_data.py --source='jsonl:data/chats/*.jsonl' --kind=chat
  python tools/prepare_data.py --source=text:input.txt --kind=text --holdout_fraction=0.1
  python tools/prepare_data.py --source='tfds:imdb_reviews:train[:90%]' --kind=text --field_map=text=text

Source strings are documented in `jaxlm/data/sources.py`. Preparing is cached under
`--cache_dir` (default `$JAXLM_DATA_DIR` or `~/.cache/jaxlm/data`); running this again is
instant. `tfds:` datasets are never downloaded here: prepare them with TFDS first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors
from jaxlm.data import schemas, sources
from jaxlm.data.errors import DataError


def world_config(overrides: dict[str, str]):
  from jaxlm.data import world

  fields = {f.name: f for f in dataclasses.fields(world.WorldConfig)}
  values = {}
  for key, text in overrides.items():
    if key not in fields:
      raise SystemExit(f"--world: unknown WorldConfig field {key!r}; fields: {sorted(fields)}")
    default = world.WorldConfig().__getattribute__(key)
    values[key] = type(default)(text) if isinstance(default, (int, float)) and not isinstance(default, bool) else text
  return world.WorldConfig(**values)


def show(record: dict, limit: int) -> str:
  text = json.dumps(record, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="world | text:<glob> | jsonl:<glob> | tfds:<name>[/<config>][:<split>]")
  parser.add_argument("--kind", required=True, help=f"one of {schemas.KINDS}, a comma-separated list, or 'all'")
  parser.add_argument("--cache_dir", default=None, help=f"prepared-data cache (default {sources.DEFAULT_CACHE_DIR})")
  parser.add_argument("--field_map", default="", help="tfds: record field -> dataset feature, e.g. prompt=question,chosen=good")
  parser.add_argument("--tfds_data_dir", default=None, help="tfds: the data dir the dataset was prepared in")
  parser.add_argument("--holdout_fraction", type=float, default=0.1, help="local files: the tail held out as validation")
  parser.add_argument("--docs_per_file", action="store_true", help="text: one document per file, not per paragraph")
  parser.add_argument("--world", default="", help="world: WorldConfig overrides, e.g. seed=1,num_chats=2000")
  parser.add_argument("--splits", default=",".join(sources.SPLITS), help="splits to open (ignored for tfds:<name>:<split>)")
  parser.add_argument("--example_chars", type=int, default=600, help="truncate the example shown to this many characters")
  args = parser.parse_args(argv)

  kinds = schemas.KINDS if args.kind == "all" else tuple(k.strip() for k in args.kind.split(","))
  for kind in kinds:
    schemas.check_kind(kind)
  try:
    field_map = sources.parse_key_values(args.field_map, "--field_map") or None
    world_overrides = sources.parse_key_values(args.world, "--world")
  except ValueError as e:
    raise SystemExit(str(e)) from None
  options = dict(cache_dir=args.cache_dir, field_map=field_map, tfds_data_dir=args.tfds_data_dir,
                 holdout_fraction=args.holdout_fraction, docs_per_file=args.docs_per_file)
  if args.source.strip() == "world":
    options["world"] = world_config(world_overrides)
  splits = [s.strip() for s in args.splits.split(",") if s.strip()]
  if args.source.startswith("tfds:") and ":" in args.source[len("tfds:"):]:
    splits = splits[:1]  # The source names its split; the stage's split is not used.

  try:
    for kind in kinds:
      for split in splits:
        start = time.perf_counter()
        records = sources.open_source(args.source, kind, split, **options)
        seconds = time.perf_counter() - start
        print(f"{kind}/{split}: {len(records):,} records  {records.description}  (opened in {seconds:.2f}s)")
        if len(records):
          print(f"  [0] {show(records[0], args.example_chars)}")
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
