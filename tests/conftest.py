"""Shared pytest setup.

Tests run on the CPU. A persistent XLA compilation cache under `.jax_cache/` (git-ignored) makes
repeated runs of the jitted tests cheap; CI starts cold and still fits its time budget.
"""

import dataclasses
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
# Cache every program, however quick to compile (JAX's default keeps only those over 1 s): the
# stage subprocesses of a session compile the same `:tiny` programs again and again (a killed
# run and its resume, the pipeline's stage and the tests that re-run it), and a warm cache
# halves such a run (a `:tiny` GRPO run: 17.6 s cold, 9.3 s warm on the 2-core CI box).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest

# A small world and a tokenizer trained on its text, shared by every test that needs real
# token ids: training SentencePiece once per session keeps the suite fast.
SMALL_WORLD = dict(seed=0, text_bytes=60_000, num_chats=300, num_preferences=300, num_prompts=100)


@pytest.fixture(scope="session")
def small_world():
  from jaxlm.data import world

  return world.WorldConfig(**SMALL_WORLD)


@pytest.fixture(scope="session")
def world_tokenizer(small_world, tmp_path_factory):
  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.data import world

  texts = [r["text"] for r in world.generate("text", "train", small_world)]
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size=512)


# ------------------------------------------------------------------------------------------------
# Stage run directories. The session runs the whole pipeline once, as a user does
# (`python -m experiments.pipeline --preset=tiny`, each stage a subprocess on its real `:tiny`
# config), SIGKILLed after SFT's first checkpoint and re-run to completion; every test that
# needs a parent run uses its stage directories. Under pytest-xdist the workers share that one
# pipeline run (a file lock in the session's shared temporary directory).
# ------------------------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs`, `experiments` are not installed: import them from the checkout.
from configs import pretrain as pretrain_config  # noqa: E402

PRETRAIN_STEPS = pretrain_config.get_config("tiny").total_steps


def stage_environment(cache_dir) -> dict:
  """The environment of a stage subprocess: CPU, one device, the session's data cache."""
  env = dict(os.environ, JAXLM_DATA_DIR=str(cache_dir), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def stage_command(stage: str, workdir, *overrides, preset: str = "tiny") -> list[str]:
  """`python -m experiments.<stage> --config=configs/<stage>.py:<preset> --workdir=... overrides`."""
  return [sys.executable, "-m", f"experiments.{stage}", f"--config=configs/{stage}.py:{preset}",
          f"--workdir={workdir}", *overrides]


def shared_tmp(tmp_path_factory) -> pathlib.Path:
  """A temporary directory that every xdist worker of this session sees (the session's own without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """One prepared-data cache for every stage subprocess of the session."""
  return tmp_path_factory.mktemp("data_cache")


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


@dataclasses.dataclass(frozen=True)
class PipelineRun:
  """The session's `:tiny` pipeline: `workdir/<stage>` for every stage, and what it printed.

  Attributes:
    workdir: the pipeline's DIR.
    killed_log: the output of the first invocation, SIGKILLed after SFT's first checkpoint.
    rerun_log: the output of the re-run that completed every stage.
    pretrain_mtime_ns: pretraining's manifest mtime between the two (the re-run must not touch it).
  """

  workdir: pathlib.Path
  killed_log: str
  rerun_log: str
  pretrain_mtime_ns: int

  def stage(self, name: str) -> tuple[pathlib.Path, str]:
    """(run directory, the stage's own output lines from both invocations, prefix removed)."""
    prefix = f"[{name}] "
    lines = [line[len(prefix):] for log in (self.killed_log, self.rerun_log) for line in log.splitlines()
             if line.startswith(prefix)]
    return self.workdir / name, "\n".join(lines)


def pipeline_command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "experiments.pipeline", f"--workdir={workdir}", "--preset=tiny", *extra]


def _run_killed_pipeline(root: pathlib.Path) -> dict:
  """Runs the pipeline, SIGKILLs it after SFT's first checkpoint, re-runs it; the record of both."""
  workdir = root / "demo"
  env = stage_environment(root / "data_cache")
  with open(root / "killed.log", "w+") as log:
    proc = subprocess.Popen(pipeline_command(workdir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      wait_for_checkpoint(proc, workdir / "sft" / "checkpoints")
      proc.send_signal(signal.SIGKILL)  # No chance to save: like a machine that dies.
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
  with open(workdir / "pipeline.json") as f:
    wait_until_gone(json.load(f)["stages"]["sft"]["pid"])
  pretrain_mtime_ns = os.stat(workdir / "pretrain" / "manifest.json").st_mtime_ns
  result = subprocess.run(pipeline_command(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  killed_log = (root / "killed.log").read_text()
  if result.returncode:
    raise RuntimeError(f"the re-run pipeline failed:\n{killed_log[-3000:]}\n---\n{result.stdout[-6000:]}")
  return dict(workdir=str(workdir), killed_log=killed_log, rerun_log=result.stdout,
              pretrain_mtime_ns=pretrain_mtime_ns)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> PipelineRun:
  """The session's killed-and-resumed `:tiny` pipeline (run once, shared by xdist workers)."""
  root = shared_tmp(tmp_path_factory) / "tiny_pipeline"
  root.mkdir(exist_ok=True)
  record_path = root / "record.json"
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # The first worker runs it; the others wait, then read its record.
    if not record_path.exists():
      try:
        record = _run_killed_pipeline(root)
      except Exception as e:  # noqa: BLE001 - recorded so that every worker fails with the cause
        record = dict(error=f"{type(e).__name__}: {e}")
      record_path.write_text(json.dumps(record))
  record = json.loads(record_path.read_text())
  if "error" in record:
    pytest.fail(f"the session's tiny pipeline failed: {record['error']}")
  return PipelineRun(**{**record, "workdir": pathlib.Path(record["workdir"])})


@pytest.fixture(scope="session")
def tiny_pretrain_run(tiny_pipeline):
  """(workdir, output) of the pipeline's finished `:tiny` stage-1 run of PRETRAIN_STEPS steps."""
  return tiny_pipeline.stage("pretrain")


@pytest.fixture(scope="session")
def tiny_sft_run(tiny_pipeline):
  """(workdir, output) of the pipeline's `:tiny` SFT run (killed once, resumed) from `tiny_pretrain_run`."""
  return tiny_pipeline.stage("sft")


@pytest.fixture(scope="session")
def tiny_reward_run(tiny_pipeline):
  """(workdir, output) of the pipeline's `:tiny` reward-model run from `tiny_sft_run`."""
  return tiny_pipeline.stage("reward")


@pytest.fixture(scope="session")
def tiny_dpo_run(tiny_pipeline):
  """(workdir, output) of the pipeline's `:tiny` DPO run from `tiny_sft_run`."""
  return tiny_pipeline.stage("dpo")


@pytest.fixture(scope="session")
def tiny_grpo_run(tiny_pipeline):
  """(workdir, output) of the pipeline's `:tiny` GRPO run from the tiny SFT run."""
  return tiny_pipeline.stage("grpo")


@pytest.fixture(scope="session")
def tiny_ppo_run(tiny_pipeline):
  """(workdir, output) of the pipeline's `:tiny` PPO run from the tiny SFT and reward runs."""
  return tiny_pipeline.stage("ppo")
