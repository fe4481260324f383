"""tools/sweep.py: grid parsing and point names in process; a real two-point sweep of the tiny
pretraining config as a subprocess (its table, and a re-run that skips both points)."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, stage_environment


def load_sweep():
  spec = importlib.util.spec_from_file_location("tool_sweep", ROOT / "tools" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = load_sweep()


def test_grid_points_are_the_cartesian_product_named_by_their_settings(tmp_path):
  grid = sweep.parse_grid(["loss.beta=0.05,0.5", "loss.name=sigmoid, ipo"])
  points = sweep.points(grid, str(tmp_path))
  assert [name for name, _, _ in points] == ["beta=0.05,name=sigmoid", "beta=0.05,name=ipo",
                                             "beta=0.5,name=sigmoid", "beta=0.5,name=ipo"]
  assert points[1][1] == {"loss.beta": "0.05", "loss.name": "ipo"}
  assert points[1][2] == str(tmp_path / "beta=0.05,name=ipo")


def test_point_names_are_safe_and_unambiguous():
  # Two keys ending alike keep their full dotted paths; a path value cannot make sub-directories.
  assert sweep.point_name({"optimizer.b1": "0.9", "ema.b1": "0.99"}) == "optimizer.b1=0.9,ema.b1=0.99"
  assert sweep.point_name({"init_from": "runs/a b"}) == "init_from=runs_a_b"


@pytest.mark.parametrize("grid, sets, message", [
    ([], [], "at least one --grid"),
    (["loss.beta"], [], "expected KEY=V1,V2"),
    (["loss.beta=0.1", "loss.beta=0.2"], [], "given twice"),
    (["loss.beta=0.1"], ["loss.beta=0.3"], "both swept"),
])
def test_bad_grids_are_one_clear_line(grid, sets, message):
  with pytest.raises(SystemExit, match=message):
    sweep.parse_set(sets, sweep.parse_grid(grid))


def test_sweep_table_csv_and_plot_with_two_grid_keys(tmp_path):
  points = []
  for beta in ("0.1", "0.5"):
    for name in ("sigmoid", "ipo"):
      workdir = tmp_path / f"beta={beta},name={name}"
      workdir.mkdir()
      final = {"gold_reward": float(beta) + (name == "ipo"), "kl": 1.0}
      (workdir / "manifest.json").write_text(json.dumps({"stage": "dpo", "complete": True, "wall_time_s": 12.5,
                                                         "final_metrics": final}))
      points.append((workdir.name, {"loss.beta": beta, "loss.name": name}, str(workdir)))
  points.append(("beta=1,name=ipo", {"loss.beta": "1", "loss.name": "ipo"}, str(tmp_path / "never_ran")))
  rows = sweep.sweep_rows(points, ["gold_reward", "kl"])
  assert [r["status"] for r in rows] == ["complete"] * 4 + ["not run"]
  written = sweep.write_sweep(rows, ["loss.beta", "loss.name"], ["gold_reward", "kl"], tmp_path, title="beta")
  assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["sweep.csv", "sweep.md", "sweep.png"]
  with open(tmp_path / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 5 and table[1]["loss.name"] == "ipo" and float(table[1]["gold_reward"]) == 1.1
  assert table[4]["gold_reward"] == ""
  assert "| beta=0.1,name=ipo | 0.1 | ipo | complete | 12s | 1.100 | 1.000 |" in (tmp_path / "sweep.md").read_text()
  # Categorical swept values (loss.name first) plot too.
  assert sweep.plot_sweep(rows, ["loss.name", "loss.beta"], ["gold_reward"]) is not None


TINY = ("--set", "total_steps=4", "--set", "optimizer.warmup_steps=1", "--set", "log_every=2",
        "--set", "eval_every=4", "--set", "checkpoint_every=4", "--set", "num_probes=2",
        "--set", "num_samples=1", "--set", "sample_len=4")


@pytest.mark.slow
def test_a_two_point_sweep_writes_its_table_and_a_rerun_skips_both(tmp_path, data_cache):
  command = [sys.executable, "tools/sweep.py", "--experiment", "pretrain", "--config", "configs/pretrain.py:tiny",
             "--workdir", str(tmp_path), "--grid", "optimizer.learning_rate=0.001,0.01", *TINY]
  result = subprocess.run(command, cwd=ROOT, env=stage_environment(data_cache), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-4000:]
  assert "[learning_rate=0.01] step 4/4" in result.stdout  # each point's output, prefixed
  with open(tmp_path / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["optimizer.learning_rate"], r["status"]) for r in rows] == [
      ("learning_rate=0.001", "0.001", "complete"), ("learning_rate=0.01", "0.01", "complete")]
  assert all(float(r["val_loss"]) > 0 for r in rows)  # default metrics: pretraining's headlines
  assert (tmp_path / "sweep.png").stat().st_size > 0
  table = (tmp_path / "sweep.md").read_text()
  assert table.count("| complete |") == 2 and "val_loss" in table
  config = json.loads((tmp_path / "learning_rate=0.01" / "config.json").read_text())
  assert config["optimizer"]["learning_rate"] == 0.01 and config["total_steps"] == 4

  rerun = subprocess.run(command + ["--metrics", "val_loss"], cwd=ROOT, env=stage_environment(data_cache),
                         capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stdout[-4000:]
  assert rerun.stdout.count("complete, skipping") == 2
  manifest = json.loads((tmp_path / "learning_rate=0.001" / "manifest.json").read_text())
  assert manifest["sessions"] == 1
  assert "fact_accuracy" not in (tmp_path / "sweep.md").read_text()  # --metrics picked the columns
