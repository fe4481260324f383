"""experiments.pretrain end to end, as a user runs it: a subprocess on the real `:tiny` config.

The session pipeline's stage-1 run (conftest.tiny_pipeline, uninterrupted) is shared by the
tests; the kill/resume test must end with exactly its parameters (bitwise: XLA on CPU is
deterministic, and so are the data pipeline and the rng).
"""

import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jaxlm import checkpoint

from conftest import PRETRAIN_STEPS as STEPS, ROOT, stage_command, stage_environment


def command(workdir, *extra):
  return stage_command("pretrain", workdir, *extra)


def environment(cache_dir):
  return stage_environment(cache_dir)


@pytest.fixture(scope="module")
def finished_run(tiny_pretrain_run):
  return tiny_pretrain_run


def final_params(workdir):
  return checkpoint.load_parent(workdir).params


def test_a_tiny_run_writes_a_complete_run_directory(finished_run):
  workdir, log = finished_run
  for name in ("config.json", "manifest.json", "tokenizer.model", "metrics.jsonl", "samples.jsonl"):
    assert (workdir / name).is_file(), name
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events"
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["stage"] == "pretrain" and manifest["complete"] and manifest["parent"] is None
  assert manifest["model_config"]["vocab_size"] == 512
  metrics = manifest["final_metrics"]
  assert metrics["steps"] == STEPS and np.isfinite(metrics["val_loss"]) and "fact_accuracy" in metrics
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # It learns.
  assert checkpoint.Checkpointer(workdir).all_steps() == [30, 40]  # keep_checkpoints=2
  assert "step 40/40" in log


def test_killed_run_resumes_to_the_same_parameters(finished_run, tmp_path, data_cache):
  reference, _ = finished_run
  workdir = tmp_path / "killed"
  process = subprocess.Popen(command(workdir), cwd=ROOT, env=environment(data_cache),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # SIGKILL as soon as the step-20 checkpoint is complete: mid-run, between checkpoints.
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "20").is_dir():
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline, "no checkpoint at step 20"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not checkpoint.RunDir(workdir).is_complete()
  result = subprocess.run(command(workdir), cwd=ROOT, env=environment(data_cache), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "resumed" in result.stderr
  expected, actual = final_params(reference), final_params(workdir)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(expected),
                        jax.tree.leaves(actual)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path[0]))
  # The resumed run's metrics rows are those of the uninterrupted run, once each.
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
  assert steps == [10, 20, 30, 40]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, data_cache):
  workdir = tmp_path / "preempted"
  process = subprocess.Popen(command(workdir, "--config.total_steps=100000"), cwd=ROOT,
                             env=environment(data_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists():
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline, "training never started"
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-4000:]
  assert "preempted at step" in stderr
  steps = checkpoint.Checkpointer(workdir).all_steps()
  assert steps and not checkpoint.RunDir(workdir).is_complete()


def test_init_from_continues_from_the_parents_parameters(finished_run, tmp_path, data_cache):
  parent, _ = finished_run
  workdir = tmp_path / "continued"
  result = subprocess.run(command(workdir, f"--config.init_from={parent}", "--config.total_steps=10"), cwd=ROOT,
                          env=environment(data_cache), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["parent"] == str(parent) and manifest["complete"]
  assert manifest["tokenizer_hash"] == json.loads((parent / "manifest.json").read_text())["tokenizer_hash"]

  def loss_at_step_10(run):
    return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] == 10 and "loss" in json.loads(line))

  # Ten steps after the parent's 40 beat the parent's own first ten steps from scratch.
  assert loss_at_step_10(workdir) < loss_at_step_10(parent) - 0.3
