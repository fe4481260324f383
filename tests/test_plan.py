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
  assert report.fits is None and report.peak_bytes > 0 and report.flops > 0
  # The state is donated: its buffers are the outputs' (arguments ~= outputs ~= aliased).
  assert report.alias_bytes > 0.9 * report.argument_bytes
  above = plan.analyse_with_budget(report, report.peak_bytes + 1)
  below = plan.analyse_with_budget(report, report.peak_bytes - 1)
  assert above.fits and above.margin_bytes == 1 and below.fits is False and below.margin_bytes == -1


def test_collectives_are_counted_by_kind_with_their_result_bytes():
  hlo = """
  %ar = f32[128,64]{1,0} all-reduce(f32[128,64]{1,0} %x), replica_groups={}
  %ag-start = (bf16[4,8]{1,0}, bf16[32,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %y)
  %ag-done = bf16[32,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[32,8]{1,0}) %ag-start)
  ROOT %cp = s32[10]{0} collective-permute(s32[10]{0} %z)
  %add = f32[128,64]{1,0} add(f32[128,64]{1,0} %a, f32[128,64]{1,0} %b)
  """
  assert plan.collectives(hlo) == {"all-reduce": (1, 128 * 64 * 4), "all-gather": (1, (4 * 8 + 32 * 8) * 2),
                                   "collective-permute": (1, 40)}


def test_unknown_targets_are_user_errors():
  with pytest.raises(errors.UserError, match="unknown target; expected cpu:<N> or one of .*did you mean v5e-16"):
    plan.get_target("v5e16")
  with pytest.raises(errors.UserError, match="this process has 1 CPU devices"):
    plan.get_target("cpu:64")


def test_the_command_plans_on_eight_fake_devices_and_exits_1_when_it_does_not_fit():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "tools/plan.py", "--config=configs/pretrain.py:tiny", "--target=cpu:8", "--json",
             "--memory_gib=0.0009765625", "--config.mesh.fsdp=2", "--config.steps_per_call=1"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]  # 1 MiB per device is too little: does not fit.
  report = json.loads(result.stdout)
  assert report["devices"] == "8 x CPU" and report["fits"] is False
  assert report["margin_bytes"] == 2**20 - report["peak_bytes"] < 0
  assert report["collectives"]["all-reduce"]["count"] > 0  # Data-parallel gradients are reduced.
  assert report["formula_flops_per_device"] > 0
