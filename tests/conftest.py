"""Shared pytest setup.

Tests run on the CPU. A persistent XLA compilation cache under `.jax_cache/` (git-ignored) makes
repeated runs of the jitted tests cheap; CI starts cold and still fits its time budget.
"""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

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
# Stage run directories, made once per session by running the experiments as a user does (a
# subprocess on the real `:tiny` configs) and shared by every test that needs a parent run.
# ------------------------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_STEPS = 40
PRETRAIN_OVERRIDES = (f"--config.total_steps={PRETRAIN_STEPS}", "--config.log_every=10",
                      "--config.checkpoint_every=10", "--config.eval_every=20", "--config.num_probes=4",
                      "--config.num_samples=1", "--config.sample_len=8")


def stage_environment(cache_dir) -> dict:
  """The environment of a stage subprocess: CPU, one device, the session's data cache."""
  env = dict(os.environ, JAXLM_DATA_DIR=str(cache_dir), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def stage_command(stage: str, workdir, *overrides, preset: str = "tiny") -> list[str]:
  """`python -m experiments.<stage> --config=configs/<stage>.py:<preset> --workdir=... overrides`."""
  return [sys.executable, "-m", f"experiments.{stage}", f"--config=configs/{stage}.py:{preset}",
          f"--workdir={workdir}", *overrides]


def run_stage(stage: str, workdir, cache_dir, *overrides, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs a stage to completion and fails the test with its stderr tail if it exits non-zero."""
  result = subprocess.run(stage_command(stage, workdir, *overrides), cwd=ROOT, env=stage_environment(cache_dir),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """One prepared-data cache for every stage subprocess of the session."""
  return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory, data_cache):
  """(workdir, CompletedProcess) of a finished `:tiny` stage-1 run of PRETRAIN_STEPS steps."""
  workdir = tmp_path_factory.mktemp("pretrain") / "run"
  return workdir, run_stage("pretrain", workdir, data_cache, *PRETRAIN_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory, data_cache, tiny_pretrain_run):
  """(workdir, CompletedProcess) of a finished `:tiny` SFT run from `tiny_pretrain_run`."""
  workdir = tmp_path_factory.mktemp("sft") / "run"
  return workdir, run_stage("sft", workdir, data_cache, f"--config.init_from={tiny_pretrain_run[0]}")


@pytest.fixture(scope="session")
def tiny_reward_run(tmp_path_factory, data_cache, tiny_sft_run):
  """(workdir, CompletedProcess) of a finished `:tiny` reward-model run from `tiny_sft_run`."""
  workdir = tmp_path_factory.mktemp("reward") / "run"
  return workdir, run_stage("reward", workdir, data_cache, f"--config.init_from={tiny_sft_run[0]}")


@pytest.fixture(scope="session")
def tiny_dpo_run(tmp_path_factory, data_cache, tiny_sft_run):
  """(workdir, CompletedProcess) of a finished `:tiny` DPO run from `tiny_sft_run`."""
  workdir = tmp_path_factory.mktemp("dpo") / "run"
  return workdir, run_stage("dpo", workdir, data_cache, f"--config.init_from={tiny_sft_run[0]}")


@pytest.fixture(scope="session")
def tiny_ppo_run(tmp_path_factory, data_cache, tiny_sft_run, tiny_reward_run):
  """(workdir, CompletedProcess) of a finished `:tiny` PPO run from the tiny SFT and reward runs."""
  workdir = tmp_path_factory.mktemp("ppo") / "run"
  return workdir, run_stage("ppo", workdir, data_cache, f"--config.init_from={tiny_sft_run[0]}",
                            f"--config.reward_from={tiny_reward_run[0]}")
