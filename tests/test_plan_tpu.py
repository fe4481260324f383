"""The planner on a TPU topology through libtpu's deviceless compile: the `tiny` preset fits a
v5e-8, and a program made too large for a chip is refused by the TPU compiler and reported as
not fitting, with a fix that the planner compiles to check.

Needs the `tpu` extra (`pip install -e ".[tpu]"`, libtpu, ~700 MB), which the base install
and the README's test command leave out: without it these tests are skipped with that reason.
`.ci/run` installs the extra after the README's command and runs this file.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("libtpu", reason='needs pip install -e ".[tpu]"')

# Deviceless: no TPU is touched, so libtpu's multi-process lock and host checks are quieted.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v5litepod-8", TPU_WORKER_HOSTNAMES="localhost",
           TPU_WORKER_ID="0", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _plan(*flags):
  command = [sys.executable, "tools/plan.py", "--target=v5e-8", "--json", *flags]
  result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode in (0, 1) and result.stdout, result.stderr[-3000:]
  return result.returncode, json.loads(result.stdout)


def test_the_tiny_preset_fits_a_v5e_8_and_an_oversized_batch_does_not():
  code, report = _plan("--config=configs/pretrain.py:tiny", "--no-suggest")
  step = report["programs"][0]
  assert code == 0 and report["devices"] == "8 x TPU v5 lite" and step["fits"] is True, report
  assert step["memory_per_device"] == pytest.approx(15.75 * 2**30)
  assert step["executed_flops"] > 0 and step["collectives"]["all-reduce"]["count"] > 0

  # 64k rows of 256 tokens per step: the activations need far more than a chip's 15.75 GiB.
  code, report = _plan("--config=configs/pretrain.py:tiny", "--config.batch_size=65536", "--config.steps_per_call=1",
                       "--config.model.remat_policy=none")
  step = report["programs"][0]
  assert code == 1 and step["fits"] is False and step["peak_bytes"] > 15.75 * 2**30, step
  assert step["compiler_refused"] and "RESOURCE_EXHAUSTED" in step["compiler_refused"]
  fix = step["suggestion"]
  assert fix is not None and fix["peak_bytes"] <= 15.75 * 2**30, step
