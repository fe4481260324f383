r"""Builds a report (report.md and PNG plots) from stage run directories.

  python tools/report.py runs/demo                        # the pipeline's DIR: every run in it -> runs/demo/report.md
  python tools/report.py runs/demo --out /tmp/demo_report
  python tools/report.py --runs sft=runs/demo/sft dpo_b0.1=runs/dpo_b0.1 dpo_b0.5=runs/dpo_b0.5 --out reports/beta

With a directory, its run directories are every sub-directory holding a manifest.json (or the
directory itself, if it is one), and its pipeline.json (if any) adds the pipeline's timings.
With --runs, each NAME=PATH is one run, named NAME in the tables and legends; several runs of one
stage (an ablation) are drawn side by side. Missing stages are left out of the report.
What is plotted and tabled is described in jaxlm/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors  # noqa: E402
from jaxlm import report  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root", nargs="?", help="a pipeline workdir (or one run directory)")
  parser.add_argument("--runs", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                      help="run directories to report on, by name (instead of ROOT)")
  parser.add_argument("--out", help="where report.md and the plots go (default: ROOT)")
  parser.add_argument("--title", help="the report's heading")
  args = parser.parse_args(argv)
  if bool(args.root) == bool(args.runs):
    parser.error("give a directory or --runs NAME=PATH ..., not both")
  if args.runs and not args.out:
    parser.error("--runs needs --out (where to write the report)")
  return args


def load_named(items: list[str]) -> list[report.Run]:
  runs = []
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise SystemExit(f"--runs {item!r}: expected NAME=PATH")
    try:
      runs.append(report.load_run(path, name=name))
    except FileNotFoundError as e:
      raise SystemExit(f"--runs {name}: {e}") from None
  return runs


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  pipeline = None
  if args.root:
    if not os.path.isdir(args.root):
      raise SystemExit(f"{args.root}: no such directory")
    runs = report.discover_runs(args.root)
    try:
      with open(os.path.join(args.root, "pipeline.json")) as f:
        pipeline = json.load(f)
    except (OSError, ValueError):
      pass  # Not made by the pipeline: the report has no pipeline timings.
  else:
    runs = load_named(args.runs)
  if not runs:
    raise SystemExit(f"{args.root}: no run directories (sub-directories with a manifest.json)")
  out = args.out or args.root
  written = report.write_report(runs, out, title=args.title, pipeline=pipeline)
  print(f"{len(runs)} runs ({', '.join(run.name for run in runs)}) -> {written[-1]}")
  for path in written[:-1]:
    print(f"  {path}")
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
