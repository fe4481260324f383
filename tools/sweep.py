r"""Runs one experiment over a grid of config overrides (an ablation), then tables and plots it.

  python tools/sweep.py --experiment dpo --config configs/dpo.py:cpu --workdir runs/sweep_beta \
      --grid loss.beta=0.05,0.1,0.5 --set init_from=runs/demo/sft
  python tools/sweep.py --experiment dpo --config configs/dpo.py:tiny --workdir /tmp/sweep \
      --grid loss.beta=0.1,0.5 --grid loss.name=sigmoid,ipo --set init_from=/tmp/demo/sft --set total_steps=4
  python tools/sweep.py --experiment pretrain --config configs/pretrain.py:cpu --workdir runs/sweep_lr \
      --grid optimizer.learning_rate=1e-3,3e-3,1e-2 --metrics val_loss,fact_choice_accuracy

Every point of the cartesian product of the --grid values is one run directory, named from its
settings (the last part of each dotted key, unless two grid keys share it), e.g.
DIR/beta=0.1,name=ipo, and one process, run one after another with its output prefixed:

  python -m experiments.<experiment> --config=<config> --workdir=DIR/<point> \
      --config.<set key>=<value> ... --config.<grid key>=<value> ...

Re-running the same command skips complete points (manifest.json `complete`) and resumes an
interrupted one. A failing point stops the sweep (--keep_going runs the rest). At the end:
DIR/sweep.csv (every column, full precision), DIR/sweep.md (the table and the plot) and
DIR/sweep.png (each metric against the first grid key, one line per setting of the others; a log
axis when the values span 10x or more). --metrics picks final_metrics keys; the default is the
stage's headline metrics (`jaxlm.report.HEADLINES`), else all of them. Grid values are split at
commas, so a value cannot contain one.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxlm import errors  # noqa: E402
from jaxlm import report  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--experiment", required=True, help="the stage: experiments/<experiment>.py")
  parser.add_argument("--config", help="config file and preset (default: configs/<experiment>.py)")
  parser.add_argument("--workdir", required=True, help="one run directory per point is made in here")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                      help="a dotted config key and its values (repeatable: the cartesian product)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="an override every point gets, e.g. init_from=runs/sft (repeatable)")
  parser.add_argument("--metrics", default="", help="comma-separated final_metrics keys to compare")
  parser.add_argument("--keep_going", action="store_true", help="run the other points after a failure")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(ROOT, "experiments", f"{args.experiment}.py")):
    parser.error(f"--experiment {args.experiment}: experiments/{args.experiment}.py not found")
  args.config = args.config or f"configs/{args.experiment}.py"
  return args


def parse_grid(items: list[str]) -> dict[str, list[str]]:
  """["loss.beta=0.1,0.5"] -> {"loss.beta": ["0.1", "0.5"]}."""
  grid = {}
  for item in items:
    key, sep, values = item.partition("=")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not values:
      raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,... e.g. loss.beta=0.05,0.1,0.5")
    if key in grid:
      raise SystemExit(f"--grid {key} is given twice")
    grid[key] = values
  if not grid:
    raise SystemExit("give at least one --grid KEY=V1,V2,...")
  return grid


def parse_set(items: list[str], grid: dict[str, list[str]]) -> list[str]:
  flags = []
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    if key in grid:
      raise SystemExit(f"{key} is both swept (--grid) and fixed (--set)")
    flags.append(f"--config.{key}={value}")
  return flags


def point_name(settings: dict[str, str]) -> str:
  """{"loss.beta": "0.1", "loss.name": "ipo"} -> "beta=0.1,name=ipo" (a safe directory name)."""
  short = {key: key.rsplit(".", 1)[-1] for key in settings}
  if len(set(short.values())) < len(short):  # Two keys end alike: the full dotted keys.
    short = {key: key for key in settings}
  name = ",".join(f"{short[key]}={value}" for key, value in settings.items())
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def points(grid: dict[str, list[str]], workdir: str) -> list[tuple[str, dict[str, str], str]]:
  """(name, {key: value}, run directory) for every point of the grid, in product order."""
  out = []
  for values in itertools.product(*grid.values()):
    settings = dict(zip(grid, values))
    name = point_name(settings)
    out.append((name, settings, os.path.join(workdir, name)))
  return out


# ------------------------------------------------------------------------------------------------
# The comparison: one row per point, each metric against the swept value.
# ------------------------------------------------------------------------------------------------
def sweep_rows(points: Sequence[tuple[str, Mapping[str, str], str]], metrics: Sequence[str]) -> list[dict]:
  """One dict per (name, {grid key: value}, workdir) point: settings, status, time, metrics."""
  rows = []
  for name, settings, workdir in points:
    manifest = report.read_manifest(workdir) or {}
    status = "complete" if manifest.get("complete") else ("incomplete" if manifest else "not run")
    final = manifest.get("final_metrics") or {}
    rows.append({"run": name, **settings, "status": status, "wall_time_s": manifest.get("wall_time_s"),
                 **{m: final.get(m) for m in metrics}})
  return rows


def _as_number(text: Any) -> float | None:
  try:
    return float(text)
  except (TypeError, ValueError):
    return None


def plot_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metrics: Sequence[str]):
  """Each metric against the first grid key, a line per setting of the others (None: no numbers)."""
  metrics = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
  if not rows or not keys or not metrics:
    return None
  x_key, others = keys[0], keys[1:]
  numbers = [_as_number(r[x_key]) for r in rows]
  numeric = all(n is not None for n in numbers)
  categories = list(dict.fromkeys(str(r[x_key]) for r in rows))
  groups: dict[str, list] = {}
  for row, number in zip(rows, numbers):
    label = ", ".join(f"{k}={row[k]}" for k in others)
    groups.setdefault(label, []).append((number if numeric else categories.index(str(row[x_key])), row))
  fig, axes = report.new_figure(len(metrics))
  for ax, metric in zip(axes, metrics):
    for i, (label, members) in enumerate(groups.items()):
      members = sorted((x, r[metric]) for x, r in members if isinstance(r.get(metric), (int, float)))
      if members:
        ax.plot(*zip(*members), marker="o", color=f"C{i}", label=label or None)
    positive = numeric and min(numbers) > 0
    if positive and max(numbers) / min(numbers) >= 10:
      ax.set_xscale("log")  # beta, learning rates: sweeps over orders of magnitude.
    if not numeric:
      ax.set_xticks(range(len(categories)), categories)
    report.style_axes(ax, title=metric, xlabel=x_key, legend=bool(others))
  return fig


def write_sweep(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metrics: Sequence[str],
                out_dir: str, *, title: str) -> list[str]:
  """sweep.csv (every column, raw numbers), sweep.md (the table and the plot), sweep.png."""
  os.makedirs(out_dir, exist_ok=True)
  columns = ["run", *keys, "status", "wall_time_s", *metrics]
  csv_path = os.path.join(out_dir, "sweep.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)
  written = [csv_path]
  fig = plot_sweep(rows, keys, metrics)
  if fig is not None:
    written.append(report.save_figure(fig, os.path.join(out_dir, "sweep.png")))
  body = [[report.cell(r["run"]), *(report.cell(r[k]) for k in keys), r["status"],
           report.duration(r.get("wall_time_s")), *(report.fmt(r.get(m)) for m in metrics)] for r in rows]
  parts = [f"# {title}", report.table(["run", *keys, "status", "time", *metrics], body)]
  if fig is not None:
    parts.append("![metrics against the swept value](sweep.png)")
  md_path = os.path.join(out_dir, "sweep.md")
  with open(md_path, "w") as f:
    f.write("\n\n".join(parts) + "\n")
  return written + [md_path]


# ------------------------------------------------------------------------------------------------
# Running the points.
# ------------------------------------------------------------------------------------------------
def run_point(command: list[str], prefix: str) -> int:
  """Runs a point's process from the repository root, its output prefixed; returns its exit code.

  It shares the terminal's process group, so Ctrl-C reaches it directly: it saves a checkpoint
  and exits 0, and the sweep then stops on the incomplete run.
  """
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  with subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1) as proc:
    for line in proc.stdout:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
  return proc.returncode


def run_all(args: argparse.Namespace, todo, fixed: list[str]) -> list[str]:
  """Runs the incomplete points; returns the failures ("name: why")."""
  failures = []
  for name, settings, workdir in todo:
    if (report.read_manifest(workdir) or {}).get("complete"):
      print(f"[sweep] {name}: complete, skipping", flush=True)
      continue
    command = [sys.executable, "-m", f"experiments.{args.experiment}", f"--config={args.config}",
               f"--workdir={workdir}", *fixed, *(f"--config.{k}={v}" for k, v in settings.items())]
    print(f"[sweep] {name}: python {' '.join(command[1:])}", flush=True)
    if args.dry_run:
      continue
    code = run_point(command, prefix=f"[{name}] ")
    if code == 0 and (report.read_manifest(workdir) or {}).get("complete"):
      continue
    failures.append(f"{name}: " + (f"exit code {code}" if code else "stopped before finishing (re-run to resume)"))
    print(f"[sweep] {failures[-1]}", flush=True)
    if code == 0 or not args.keep_going:
      break  # Interrupted (Ctrl-C), or failed without --keep_going.
  return failures


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  grid = parse_grid(args.grid)
  fixed = parse_set(args.set, grid)
  workdir = os.path.abspath(args.workdir)
  todo = points(grid, workdir)
  print(f"[sweep] {args.experiment}: {len(todo)} points over {', '.join(grid)} in {workdir}", flush=True)
  failures = run_all(args, todo, fixed)
  if args.dry_run:
    return 0
  stages = [(report.read_manifest(w) or {}).get("stage") for _, _, w in todo]
  stage = next((s for s in stages if s), args.experiment)
  metrics = [m for m in args.metrics.split(",") if m] or report.headline_keys(stage)
  if not metrics:  # A stage without headlines: every final metric the points have.
    finals = [(report.read_manifest(w) or {}).get("final_metrics", {}) for _, _, w in todo]
    metrics = sorted({key for final in finals for key in final})
  rows = sweep_rows(todo, metrics)
  present = [m for m in metrics if any(r.get(m) is not None for r in rows)]
  written = write_sweep(rows, list(grid), present or metrics, workdir,
                        title=f"Sweep: {args.experiment} ({args.config}) over {', '.join(grid)}")
  print(f"[sweep] table: {written[-1]}; " + ", ".join(written[:-1]), flush=True)
  if failures:
    print(f"[sweep] {len(failures)} point(s) not complete: {'; '.join(failures)}", flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(errors.guard(main)())
