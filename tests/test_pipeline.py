"""experiments/pipeline.py: the plan and the command lines in process; then the whole pipeline on
the `:tiny` presets as a user runs it, killed with SIGKILL half-way through SFT and re-run: the
finished stage is not redone, the killed one resumes, every run directory, parent link and report
file is there."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, stage_environment

sys.path.insert(0, str(ROOT))  # `experiments` is not installed: import it from the checkout.
from experiments import pipeline  # noqa: E402

# Few steps and small evaluations: the stages must only prove they chain, resume and report.
# Few steps; every shape (batch, lengths, eval sizes) stays the `:tiny` preset's, so the programs
# compiled for the session's stage fixtures are found in the persistent compilation cache.
OVERRIDES = {
    "pretrain": "total_steps=20 log_every=5 eval_every=10 checkpoint_every=10 num_probes=4 num_samples=1 "
                "sample_len=8",
    # SFT checkpoints at 5 and runs on to 20: time to kill it after its first checkpoint.
    "sft": "total_steps=20 log_every=5 eval_every=10 checkpoint_every=5",
    "reward": "total_steps=10 log_every=5 eval_every=10 checkpoint_every=10",
    "dpo": "total_steps=10 log_every=5 eval_every=10 checkpoint_every=10",
    "ppo": "total_steps=2 eval_every=2 checkpoint_every=2",
}
PARENTS = {"sft": ("pretrain",), "reward": ("sft",), "dpo": ("sft",), "ppo": ("sft",)}


def pipeline_command(workdir, *extra):
  overrides = [f"--override={stage}.{item}" for stage, items in OVERRIDES.items() for item in items.split()]
  return [sys.executable, "-m", "experiments.pipeline", f"--workdir={workdir}", "--preset=tiny", *overrides, *extra]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_overrides_go_to_their_stage_after_the_parent_links():
  overrides = pipeline.parse_overrides(["dpo.loss.beta=0.2", "pretrain.total_steps=100", "dpo.eval.judge=a=b"])
  assert overrides == {"dpo": ["--config.loss.beta=0.2", "--config.eval.judge=a=b"],
                       "pretrain": ["--config.total_steps=100"]}
  command = pipeline.stage_command("ppo", "/w", "cpu", ["--config.kl.coef=0.1"])
  assert command[1:] == ["-m", "experiments.ppo", "--config=configs/ppo.py:cpu", "--workdir=/w/ppo",
                         "--config.init_from=/w/sft", "--config.reward_from=/w/reward", "--config.kl.coef=0.1"]


@pytest.mark.parametrize("item", ["dpo", "dpo.beta", "=1", "rlhf.beta=1", "dpo.=1"])
def test_bad_overrides_are_refused(item):
  with pytest.raises(pipeline.PipelineError, match="--override"):
    pipeline.parse_overrides([item])


def test_stages_run_in_pipeline_order_and_typos_are_refused():
  assert pipeline.parse_stages("dpo, sft") == ["sft", "dpo"]
  assert pipeline.parse_stages("") == list(pipeline.STAGES)
  with pytest.raises(pipeline.PipelineError, match="unknown rm"):
    pipeline.parse_stages("sft,rm")


def write_manifest(workdir, stage, complete=True):
  os.makedirs(workdir / stage)
  (workdir / stage / "manifest.json").write_text(json.dumps({"stage": stage, "complete": complete}))


def test_the_plan_skips_complete_stages_and_needs_complete_parents(tmp_path, monkeypatch):
  write_manifest(tmp_path, "pretrain")
  write_manifest(tmp_path, "sft", complete=False)
  assert pipeline.plan(["pretrain", "sft", "dpo"], str(tmp_path)) == [
      ("pretrain", "complete"), ("sft", "run"), ("dpo", "run")]
  with pytest.raises(pipeline.PipelineError, match=r"dpo needs a complete sft run .* is incomplete"):
    pipeline.plan(["dpo"], str(tmp_path))
  with pytest.raises(pipeline.PipelineError, match=r"ppo needs a complete reward run .* is missing"):
    pipeline.plan(["sft", "ppo"], str(tmp_path))


def test_a_stage_without_its_parent_is_a_clear_error_before_anything_runs(tmp_path, capsys):
  assert pipeline.main([f"--workdir={tmp_path}", "--stages=sft,dpo"]) == 1
  assert f"sft needs a complete pretrain run (init_from) but {tmp_path}/pretrain is missing" in capsys.readouterr().out
  assert read_json(tmp_path / "pipeline.json")["status"] == "failed"
  assert not (tmp_path / "sft").exists()


def test_a_stage_process_streams_with_its_prefix_and_gets_the_signal(capsys):
  forwarder = pipeline.Forwarder()
  child = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('saving', flush=True), sys.exit(0)))\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")
  timer = threading.Timer(1.5, forwarder, args=(signal.SIGTERM, None))  # like a scheduler's SIGTERM
  timer.start()
  pids = []
  code = pipeline.run_process([sys.executable, "-c", child], prefix="[x] ", forwarder=forwarder, on_start=pids.append)
  timer.cancel()
  assert code == 0 and forwarder.received == signal.SIGTERM and len(pids) == 1
  assert capsys.readouterr().out == "[x] ready\n[x] saving\n"
  failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
  assert pipeline.run_process(failing, prefix="", forwarder=forwarder, on_start=pids.append) == 3


def wait_for_checkpoint(proc, directory, timeout=600):
  """Waits until `directory` holds a committed orbax step (a directory named by its step)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, "the pipeline ended before the stage saved a checkpoint"
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
      return
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint in {directory} after {timeout}s")


def wait_until_gone(pid, timeout=30):
  """The killed pipeline's stage dies with it (PR_SET_PDEATHSIG): wait for that (zombies count)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
          return
    except (FileNotFoundError, ProcessLookupError):
      return
    time.sleep(0.05)
  raise TimeoutError(f"stage process {pid} outlived the killed pipeline")


@pytest.mark.slow
def test_the_pipeline_survives_a_kill_and_completes_every_stage(tmp_path, data_cache):
  workdir = tmp_path / "demo"
  env = stage_environment(data_cache)
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(pipeline_command(workdir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      wait_for_checkpoint(proc, workdir / "sft" / "checkpoints")
      proc.send_signal(signal.SIGKILL)  # No chance to save: like a machine that dies.
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
  wait_until_gone(read_json(workdir / "pipeline.json")["stages"]["sft"]["pid"])
  pretrain_manifest = workdir / "pretrain" / "manifest.json"
  assert read_json(pretrain_manifest)["complete"] and not read_json(workdir / "sft" / "manifest.json")["complete"]
  pretrain_mtime = os.stat(pretrain_manifest).st_mtime_ns

  result = subprocess.run(pipeline_command(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  out = result.stdout
  assert result.returncode == 0, f"{log_path.read_text()[-3000:]}\n---\n{out[-6000:]}"
  # Not redone: pretraining is skipped untouched; SFT resumed from its checkpoint, in a second session.
  assert f"[pipeline] pretrain: complete ({workdir}/pretrain), skipping" in out
  assert "[pretrain]" not in out
  assert os.stat(pretrain_manifest).st_mtime_ns == pretrain_mtime
  assert read_json(pretrain_manifest)["sessions"] == 1
  assert f"resumed {workdir}/sft at step" in out
  assert read_json(workdir / "sft" / "manifest.json")["sessions"] == 2

  stages = ["pretrain", "sft", "reward", "dpo", "ppo"]
  record = read_json(workdir / "pipeline.json")
  assert record["status"] == "complete"
  for stage in stages:
    manifest = read_json(workdir / stage / "manifest.json")
    assert manifest["complete"] and manifest["stage"] == stage
    for parent in PARENTS.get(stage, ()):
      assert manifest["parent"] == str(workdir / parent), stage
    assert record["stages"][stage]["status"] == "complete" and record["stages"][stage]["wall_s"] > 0
  assert record["stages"]["sft"]["sessions"] == 2 and record["stages"]["pretrain"]["sessions"] == 1
  assert read_json(workdir / "ppo" / "config.json")["reward_from"] == str(workdir / "reward")

  plots = ["losses.png", "reward_accuracy.png", "gold_vs_kl.png", "ppo.png"]
  for name in ["report.md"] + plots:
    assert (workdir / name).stat().st_size > 0, name
  text = (workdir / "report.md").read_text()
  for name in plots:
    assert f"]({name})" in text
  assert "## Replies side by side" in text and "## Headline metrics" in text
