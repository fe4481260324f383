"""experiments/pipeline.py: the plan and the command lines in process; then the session's whole
pipeline on the `:tiny` presets as a user runs it (`conftest.tiny_pipeline`), killed with SIGKILL
half-way through SFT and re-run: the finished stage is not redone, the killed one resumes, every
run directory, parent link and report file is there."""

import json
import os
import signal
import sys
import threading

import pytest

from experiments import pipeline  # conftest puts the checkout on sys.path

PARENTS = {"sft": ("pretrain",), "reward": ("sft",), "dpo": ("sft",), "ppo": ("sft",), "grpo": ("sft",)}


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
  assert pipeline.main([f"--workdir={tmp_path}", "--stages=sft,dpo"]) == 2
  assert (f"error: sft needs a complete pretrain run (init_from) but {tmp_path}/pretrain is missing"
          in capsys.readouterr().err)
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


def test_the_pipeline_survives_a_kill_and_completes_every_stage(tiny_pipeline):
  # The session's pipeline (conftest.tiny_pipeline) was SIGKILLed after SFT's first checkpoint,
  # then re-run: the stage died with it, and the re-run finished the job.
  workdir, out = tiny_pipeline.workdir, tiny_pipeline.rerun_log
  assert "[pipeline] sft: python -m experiments.sft" in tiny_pipeline.killed_log
  assert "[pipeline] reward:" not in tiny_pipeline.killed_log  # Killed during SFT, not after it.
  pretrain_manifest = workdir / "pretrain" / "manifest.json"
  # Not redone: pretraining is skipped untouched; SFT resumed from its checkpoint, in a second session.
  assert f"[pipeline] pretrain: complete ({workdir}/pretrain), skipping" in out
  assert "[pretrain]" not in out
  assert os.stat(pretrain_manifest).st_mtime_ns == tiny_pipeline.pretrain_mtime_ns
  assert read_json(pretrain_manifest)["sessions"] == 1
  assert f"resumed {workdir}/sft at step" in out
  assert read_json(workdir / "sft" / "manifest.json")["sessions"] == 2

  stages = ["pretrain", "sft", "reward", "dpo", "ppo", "grpo"]
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
  # The three alignments of the same SFT model in one table, each with its evaluation's row.
  side_by_side = text.split("## Alignment: SFT, PPO, GRPO and DPO on the same held-out prompts")[1]
  rows = [line.split("|")[1].strip() for line in side_by_side.split("\n\n##")[0].splitlines()
          if line.startswith("| ") and not line.startswith("| policy")]
  assert rows == ["SFT (reference)", "ppo", "grpo", "dpo"], rows


def test_the_compilation_cache_is_the_flag_else_the_environment_else_in_the_workdir(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert pipeline.compilation_cache_dir(None, "/w") == "/w/xla_cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/cache")
  assert pipeline.compilation_cache_dir(None, "/w") == "/shared/cache"
  assert pipeline.compilation_cache_dir(str(tmp_path), "/w") == str(tmp_path)
  assert pipeline.compilation_cache_dir("none", "/w") is None
