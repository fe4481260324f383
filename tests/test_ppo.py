"""PPO: a few iterations raise a simple reward (learning, not just running), and the stage end to
end. The rollout layer it stands on (packing, sampling, scoring) is tested in test_rollout.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm import ppo
from jaxlm import rewards
from jaxlm import rollout as rollout_lib
from jaxlm import sharding
from jaxlm import training

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)
TARGET = 7  # The synthetic reward: 1 for a reply that contains this token.


def _setup(seed=0, rollout_batch=16):
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed)))
  prompts = np.zeros((rollout_batch, 4), np.int32)
  prompts[:, :3] = [1, 5, 6]
  prompts[::2, 3] = 9  # Two prompt lengths: ragged rows.
  lengths = np.where(np.arange(rollout_batch) % 2 == 0, 4, 3).astype(np.int32)
  return params, prompts, lengths


def test_a_few_iterations_raise_a_simple_reward():
  params, prompts, lengths = _setup()
  config = ppo.PPOConfig(ppo_epochs=2, num_minibatches=2, entropy_coef=0.0)
  policy_tx, value_tx = optax_adam(3e-3), optax_adam(3e-3)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  policy_state, _ = training.create_train_state(functools.partial(model_lib.init_params, CONFIG), policy_tx,
                                                jax.random.key(0), mesh)
  value_state, _ = training.create_train_state(functools.partial(model_lib.init_params, CONFIG, scalar_head=True),
                                               value_tx, jax.random.key(1), mesh)
  state = ppo.combine_states(policy_state.replace(params=params), value_state, kl_coef=0.01)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  update = ppo.make_update(CONFIG, config, policy_tx, value_tx, state_shardings=shardings, mesh=mesh)
  scorer = ppo.make_scorer(CONFIG, None, config)
  reference = jax.tree.map(jnp.copy, params)

  rewards = []
  for iteration in range(12):
    rollout = rollout_lib.collect_rollout(state.params, prompts, lengths, jax.random.key(100 + iteration),
                                          config=CONFIG, temperature=config.temperature, max_new_tokens=8,
                                          stop_ids=())
    scored = scorer(state.params, reference, state.value.params, None, rollout)
    score = jnp.any((rollout["response_tokens"] == TARGET) & rollout["mask"], axis=1).astype(jnp.float32)
    rewards.append(float(score.mean()))
    advantage = ppo.advantages(scored=scored, score=score, mask=rollout["mask"],
                               response_lengths=rollout["response_lengths"], kl_coef=state.kl_coef, ppo=config)
    state, metrics = update(state, ppo.update_batch(rollout, scored, advantage))
    assert np.isfinite(float(metrics["policy_loss"]))
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards


def optax_adam(lr):
  import optax

  return optax.adam(lr)


# ------------------------------------------------------------------------------------------------
# The stage end to end (subprocesses on the `:tiny` config, from the session's tiny SFT and
# reward runs).
# ------------------------------------------------------------------------------------------------
def _ppo_command(workdir, sft, reward, *extra):
  from conftest import stage_command

  return stage_command("ppo", workdir, f"--config.init_from={sft}", f"--config.reward_from={reward}", *extra)


def test_a_tiny_ppo_run_writes_a_complete_run_directory(tiny_ppo_run, tiny_sft_run):
  workdir, result = tiny_ppo_run
  for name in ("config.json", "manifest.json", "tokenizer.model", "metrics.jsonl", "samples.jsonl"):
    assert (workdir / name).is_file(), name
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["stage"] == "ppo" and manifest["complete"] and manifest["parent"] == str(tiny_sft_run[0])
  final = manifest["final_metrics"]
  for key in ("gold_reward", "win_rate", "kl", "length", "well_formed", "reference_gold_reward"):
    assert key in final and np.isfinite(final[key]), key
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  iterations = [r for r in rows if "sampler_gap" in r]
  assert [r["step"] for r in iterations] == [1, 2, 3, 4]
  for key in ("reward", "gold_reward", "kl", "entropy", "clip_fraction", "approx_kl", "explained_variance",
              "length", "end_rate", "time_generate", "time_score", "time_train", "rollout_tokens_per_s"):
    assert all(np.isfinite(r[key]) for r in iterations), key
  assert max(r["sampler_gap"] for r in iterations) < 1e-4  # On-policy: sampler == trainer.
  # The policy reads back like any other stage's (load_parent takes `params`).
  from jaxlm import checkpoint
  assert "scalar_head" not in checkpoint.load_parent(workdir).params


def test_killed_ppo_resumes_to_the_same_parameters(tiny_ppo_run, tiny_sft_run, tiny_reward_run, tmp_path,
                                                   data_cache):
  import signal
  import subprocess
  import time

  from conftest import ROOT, stage_environment
  from jaxlm import checkpoint

  reference, _ = tiny_ppo_run
  workdir = tmp_path / "killed"
  command = _ppo_command(workdir, tiny_sft_run[0], tiny_reward_run[0])
  process = subprocess.Popen(command, cwd=ROOT, env=stage_environment(data_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").is_dir():
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline, "no checkpoint at iteration 2"
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  result = subprocess.run(command, cwd=ROOT, env=stage_environment(data_cache), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "resumed" in result.stderr
  expected = checkpoint.Checkpointer(reference).all_steps()[-1]
  assert checkpoint.Checkpointer(workdir).all_steps()[-1] == expected
  for a, b in zip(jax.tree.leaves(checkpoint.load_parent(reference).params),
                  jax.tree.leaves(checkpoint.load_parent(workdir).params)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "sampler_gap" in r] == [1, 2, 3, 4]


def test_ppo_reward_is_configured_by_weights_and_refuses_the_old_gold_spelling():
  from experiments import ppo as ppo_stage
  from jaxlm import errors
  from test_run_integrity import tiny_config

  base = ("--config.init_from=x", "--config.reward_from=r")
  ppo_stage.check_config(tiny_config("ppo", *base))  # The reward model, normalised: the default.
  assert rewards.stage_reward(tiny_config("ppo", *base)).weights == {"model": 1.0}
  oracle = tiny_config("ppo", "--config.init_from=x", "--config.reward.weights.model=0",
                       "--config.reward.weights.gold=1", "--config.value_from=sft")
  ppo_stage.check_config(oracle)
  assert rewards.stage_reward(oracle).weights == {"gold": 1.0} and not rewards.stage_reward(oracle).uses_model
  cases = [(("--config.reward_from=gold",), "reward_from", "reward.weights.gold=1"),
           (("--config.reward.weights.model=0", "--config.reward.weights.correct=1"), "value_from",
            "use value_from=sft"),
           (("--config.reward_from=",), "reward_from", "no reward-model run"),
           (("--config.reward.weights.gold=1", "--config.value_from=sft", "--config.data.source=jsonl:p.jsonl"),
            "reward.weights", "judge the embedded world")]
  for overrides, key, message in cases:
    with pytest.raises(errors.ConfigError, match=message) as e:
      ppo_stage.check_config(tiny_config("ppo", "--config.init_from=x", "--config.reward_from=r", *overrides))
    assert e.value.key == key, overrides
