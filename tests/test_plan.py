"""jaxlm/plan.py and tools/plan.py: a stage's train step compiled ahead of time for a target
(fake CPU devices here; TPU topologies with the `.[tpu]` extra), with its memory per device,
verdict, FLOPs and collectives."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm import cli
from jaxlm import errors
from jaxlm import plan

from conftest import ROOT


def test_the_verdict_flips_when_the_budget_falls_below_the_compiled_peak():
  config = cli.load_config(os.path.join(ROOT, "configs/pretrain.py:tiny"))
  report = plan.plan_train_step(config, plan.get_target("cpu:1"), vocab_size=512)
  assert report.fits is None and report.peak_bytes > 0 and report.executed_flops > report.xla_flops > 0
  # The state is donated: its buffers are the outputs' (arguments ~= outputs ~= aliased).
  assert report.alias_bytes > 0.9 * report.argument_bytes
  above = plan.analyse_with_budget(report, report.peak_bytes + 1)
  below = plan.analyse_with_budget(report, report.peak_bytes - 1)
  assert above.fits and above.margin_bytes == 1 and below.fits is False and below.margin_bytes == -1


def test_unknown_targets_are_user_errors():
  with pytest.raises(errors.UserError, match="unknown target; expected cpu:<N> or one of .*did you mean v5e-16"):
    plan.get_target("v5e16")
  with pytest.raises(errors.UserError, match="this process has 1 CPU devices"):
    plan.get_target("cpu:64")


def test_every_program_of_the_dpo_and_ppo_stages_is_planned():
  """The DPO step and reference pass, PPO's and GRPO's sampler, scorer and update: each compiled
  with its memory, FLOPs and the model formula's FLOPs."""
  target = plan.get_target("cpu:1")
  names = {}
  for stage in ("dpo", "ppo", "grpo"):
    config = cli.load_config(os.path.join(ROOT, f"configs/{stage}.py:tiny"))
    for report in plan.plan_stage(config, target, vocab_size=512):
      names[report.program] = report
  assert list(names) == ["dpo train step", "dpo reference pass", "ppo sampler", "ppo scorer", "ppo update",
                         "grpo sampler", "grpo scorer", "grpo update"]
  for report in names.values():
    assert report.peak_bytes > 0 and report.executed_flops > 0 and report.model_flops > 0, report
  # A forward pass is a third of a train step over the same pairs (the formula says exactly so).
  assert names["dpo reference pass"].model_flops * 3 == pytest.approx(names["dpo train step"].model_flops)
  # Forward only: the reference pass keeps no optimizer state and no activations for a backward.
  assert names["dpo reference pass"].peak_bytes < names["dpo train step"].peak_bytes / 2


def test_a_budget_below_the_peak_gets_a_compiled_fix_on_eight_fake_devices():
  """Data parallel on 8 devices needs more per device than 16 MiB; the planner says it does not
  fit (exit 1), then finds and compiles a setting that does (parameters sharded with FSDP)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "tools/plan.py", "--config=configs/pretrain.py:tiny", "--target=cpu:8", "--json",
             "--memory_gib=0.015625", "--config.steps_per_call=1"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["devices"] == "8 x CPU" and report["vocab_size"] == 512
  step = report["programs"][0]
  assert step["program"] == "pretrain train step" and step["fits"] is False
  assert step["margin_bytes"] == 2**24 - step["peak_bytes"] < 0
  assert step["collectives"]["all-reduce"]["count"] > 0  # Data-parallel gradients are reduced.
  # Executed matmul FLOPs per device: the formula's, plus attention's masked half (+3% here).
  assert 1.0 < step["executed_flops"] / step["model_flops_per_device"] < 1.1
  fix = step["suggestion"]
  assert fix["overrides"] == {"mesh.data": 1, "mesh.fsdp": -1} and fix["peak_bytes"] <= 2**24, fix
