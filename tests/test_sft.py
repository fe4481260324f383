"""Stage 2 (SFT): the loss sees the assistant's tokens only; the experiment runs end to end from
a stage-1 run directory and refuses a parent that does not match its config."""

import json
import subprocess

import jax
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.data import pipelines

from conftest import ROOT, stage_command, stage_environment

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Peru?"},
                  {"role": "assistant", "content": "Lima."}], "meta": {}},
    {"messages": [{"role": "user", "content": "What's 2 + 2?"},
                  {"role": "assistant", "content": "4"}], "meta": {}},
]


def test_only_assistant_tokens_carry_loss(world_tokenizer):
  batch = next(iter(pipelines.sft_dataset(CHATS, world_tokenizer, max_len=64, batch_size=2, shuffle=False,
                                          num_epochs=1, num_threads=0)))
  config = model_lib.ModelConfig(vocab_size=world_tokenizer.vocab_size, embed_dim=32, num_layers=1, num_heads=2,
                                 num_kv_heads=2, head_dim=16, mlp_dim=64, max_len=64)
  params = sharding.unbox(model_lib.init_params(config, jax.random.key(0)))
  loss_fn = jax.jit(losses.lm_loss_fn(model_lib.Transformer(config)))

  def loss(targets):
    total, count, _ = loss_fn(params, {**batch, "targets": targets}, jax.random.key(0))
    return float(total / count)

  mask = np.asarray(batch["loss_mask"]).astype(bool)
  segments = np.asarray(batch["segment_ids"])
  assert mask.any() and (~mask & (segments > 0)).any()
  # Every trainable target is an assistant token or its <|end|>.
  inputs = np.asarray(batch["inputs"])
  assert world_tokenizer.role_id("user") not in np.asarray(batch["targets"])[mask]
  baseline = loss(batch["targets"])
  user_side = np.argwhere(~mask & (segments > 0))
  changed = np.array(batch["targets"])
  for row, col in user_side:
    changed[row, col] = (changed[row, col] + 7) % world_tokenizer.vocab_size
  assert loss(changed) == baseline  # Every non-assistant target changed: the loss did not move.
  row, col = np.argwhere(mask)[0]
  changed = np.array(batch["targets"])
  changed[row, col] = (changed[row, col] + 7) % world_tokenizer.vocab_size
  assert loss(changed) != baseline  # One assistant target changed: it did.
  assert inputs.shape == (2, 64)


def test_a_tiny_sft_run_writes_a_complete_run_directory(tiny_sft_run, tiny_pretrain_run):
  workdir, result = tiny_sft_run
  for name in ("config.json", "manifest.json", "tokenizer.model", "metrics.jsonl", "samples.jsonl"):
    assert (workdir / name).is_file(), name
  manifest = json.loads((workdir / "manifest.json").read_text())
  parent = json.loads((tiny_pretrain_run[0] / "manifest.json").read_text())
  assert manifest["stage"] == "sft" and manifest["complete"]
  assert manifest["parent"] == str(tiny_pretrain_run[0])
  assert manifest["tokenizer_hash"] == parent["tokenizer_hash"]
  assert manifest["model_config"] == parent["model_config"]
  final = manifest["final_metrics"]
  for key in ("val_loss", "well_formed", "gold_reward", "correct", "parent_well_formed", "parent_gold_reward"):
    assert key in final and np.isfinite(final[key]), key
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses_ = [r["loss"] for r in rows if "loss" in r]
  assert losses_[-1] < losses_[0]  # It learns the chat format.
  samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
  assert samples and all("prompt" in s and "reply" in s and "gold_reward" in s for s in samples)


def _run_sft(workdir, cache, *overrides):
  return subprocess.run(stage_command("sft", workdir, *overrides), cwd=ROOT, env=stage_environment(cache),
                        capture_output=True, text=True, timeout=600)


def test_a_parent_of_another_shape_is_refused(tiny_pretrain_run, tmp_path, data_cache):
  result = _run_sft(tmp_path / "sft", data_cache, f"--config.init_from={tiny_pretrain_run[0]}",
                    "--config.model.num_layers=2")
  assert result.returncode != 0
  assert "model config mismatch" in result.stderr and "num_layers: parent 4, expected 2" in result.stderr


def test_a_parent_with_another_tokenizer_is_refused(tiny_pretrain_run, world_tokenizer, tmp_path, data_cache):
  other = tmp_path / "other.model"
  world_tokenizer.save(other)
  result = _run_sft(tmp_path / "sft", data_cache, f"--config.init_from={tiny_pretrain_run[0]}",
                    f"--config.tokenizer_path={other}")
  assert result.returncode != 0
  assert "tokenizer mismatch" in result.stderr


def test_init_from_is_required(tmp_path, data_cache):
  result = _run_sft(tmp_path / "sft", data_cache)
  assert result.returncode != 0 and "error: config.init_from: required" in result.stderr
