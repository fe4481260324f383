"""Critic-free RL (jaxlm/grpo.py, experiments/grpo.py): a few iterations raise a verifiable reward
with each advantage estimator, the pieces agree with jaxlm/group_rl_losses.py, and the stage runs
end to end from the session's tiny SFT run, resuming bitwise after a kill."""

import functools
import json
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import checkpoint
from jaxlm import group_rl_losses
from jaxlm import grpo as grpo_lib
from jaxlm import model as model_lib
from jaxlm import rollout as rollout_lib
from jaxlm import sharding
from jaxlm import training

from conftest import ROOT, stage_command, stage_environment

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)
TARGET = 7  # The verifiable reward: 1 for a reply that contains this token.


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "dr_grpo"])
def test_a_few_iterations_raise_a_verifiable_reward(advantage):
  grpo = grpo_lib.GRPOConfig(group_size=4, advantage=advantage, num_minibatches=2, epochs=2, kl_coef=0.01)
  tx = optax.adam(3e-3)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  state, _ = training.create_train_state(functools.partial(model_lib.init_params, CONFIG), tx, jax.random.key(0), mesh)
  reference = jax.tree.map(jnp.copy, state.params)
  update = grpo_lib.make_update(CONFIG, grpo, tx, state_shardings=jax.tree.map(lambda x: x.sharding, state),
                                mesh=mesh)
  scorer = grpo_lib.make_scorer(CONFIG, None, grpo)
  prompts = np.tile(np.asarray([[1, 5, 6, 9]], np.int32), (4, 1))
  lengths = np.asarray([4, 3, 4, 3], np.int32)
  rewards = []
  for iteration in range(10):
    rollout = rollout_lib.collect_rollout(state.params, prompts, lengths, jax.random.key(100 + iteration),
                                          config=CONFIG, temperature=1.0, max_new_tokens=8, stop_ids=(),
                                          group_size=grpo.group_size)
    scored = scorer(state.params, reference, None, rollout)
    score = jnp.any((rollout["response_tokens"] == TARGET) & rollout["mask"], axis=1).astype(jnp.float32)
    rewards.append(float(score.mean()))
    advantage_values = grpo_lib.advantages(grpo_lib.score_with_kl(score, scored, rollout["mask"], grpo), grpo=grpo)
    state, metrics = update(state, grpo_lib.update_batch(rollout, scored, advantage_values))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["sampler_gap"]) < 1e-4  # The sampler's log-probs are the trainer's.
  assert int(state.step) == 10
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards


def test_advantages_are_the_estimators_over_contiguous_groups():
  scores = jnp.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, 0.0, 3.0])
  for name, fn in grpo_lib.ADVANTAGES.items():
    grpo = grpo_lib.GRPOConfig(group_size=4, advantage=name)
    expected = fn(scores=scores.reshape(3, 4)).reshape(-1)
    np.testing.assert_array_equal(grpo_lib.advantages(scores, grpo=grpo), expected)
    np.testing.assert_array_equal(grpo_lib.advantages(scores, grpo=grpo)[4:8], 0.0)  # all-equal group: no signal
  with pytest.raises(ValueError, match="groups of 4"):
    grpo_lib.advantages(scores[:10], grpo=grpo_lib.GRPOConfig(group_size=4))


def test_kl_in_the_reward_subtracts_beta_times_summed_k1():
  log_probs = jnp.asarray([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
  ref = jnp.asarray([[-1.5, -1.0, -9.0], [-0.5, -3.0, 0.0]])
  mask = jnp.asarray([[True, True, False], [True, False, False]])
  scored = {"log_probs": log_probs, "ref_log_probs": ref}
  scores = jnp.asarray([1.0, 2.0])
  in_reward = grpo_lib.GRPOConfig(group_size=2, kl_in="reward", kl_coef=0.5)
  # k1 sums over emitted tokens: row 0 (0.5 - 1.0) = -0.5, row 1 0.0.
  np.testing.assert_allclose(grpo_lib.score_with_kl(scores, scored, mask, in_reward), [1.25, 2.0], rtol=1e-6)
  in_loss = grpo_lib.GRPOConfig(group_size=2, kl_in="loss", kl_coef=0.5)
  np.testing.assert_array_equal(grpo_lib.score_with_kl(scores, scored, mask, in_loss), scores)


def test_the_minibatch_loss_is_the_clipped_objective_plus_the_k3_term():
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0)))
  model = model_lib.Transformer(CONFIG)
  rollout = rollout_lib.collect_rollout(params, np.asarray([[1, 5, 6, 9]] * 2, np.int32), np.asarray([4, 3], np.int32),
                                        jax.random.key(1), config=CONFIG, temperature=1.0, max_new_tokens=6,
                                        stop_ids=(), group_size=2)
  reference = jax.tree.map(lambda x: x * 1.01, params)
  scored = rollout_lib.make_scorer(CONFIG, None, temperature=1.0)(params, reference, None, rollout)
  advantage = jnp.asarray([1.0, -1.0, 0.5, -0.5])
  batch = grpo_lib.update_batch(rollout, scored, advantage)
  batch["log_probs"] = batch["log_probs"] - 0.3 * rollout["mask"]  # ratios e^0.3 > 1 + eps: some clipping
  mask = rollout["mask"]
  log_probs, _ = rollout_lib.policy_log_probs(model, params, rollout_lib.pack_rollout(rollout),
                                              rollout["response_tokens"], mask, 1.0)
  for norm in grpo_lib.LOSS_NORMS:
    grpo = grpo_lib.GRPOConfig(group_size=2, loss_norm=norm, kl_coef=0.1, clip_eps_high=0.28)
    loss, metrics = grpo_lib.minibatch_loss(model, params, batch, grpo)
    token_losses, _ = group_rl_losses.clipped_policy_loss(
        log_probs=log_probs, old_log_probs=batch["log_probs"], advantages=advantage, mask=mask, clip_eps_low=0.2,
        clip_eps_high=0.28)
    kl = group_rl_losses.token_kl_k3(log_probs=log_probs, ref_log_probs=scored["ref_log_probs"], mask=mask)
    total = token_losses + 0.1 * kl
    if norm == "token":
      expected = total.sum() / mask.sum()
    elif norm == "sequence":
      expected = jnp.mean(total.sum(1) / mask.sum(1))
    else:
      expected = total.sum() / (mask.shape[0] * mask.shape[1])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) <= 1


def test_config_refusals():
  for bad in (dict(group_size=1), dict(advantage="ppo"), dict(loss_norm="mean"), dict(kl_in="both"),
              dict(clip_eps_low=1.0), dict(num_minibatches=0), dict(dynamic_sampling_rounds=-1)):
    with pytest.raises(ValueError):
      grpo_lib.GRPOConfig(**bad)



def test_dynamic_sampling_trains_on_whole_informative_groups_in_draw_order():
  rewards = np.asarray([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], np.float32)  # G = 4: groups 0, 1, 2
  np.testing.assert_array_equal(grpo_lib.informative_groups(rewards, group_size=4), [False, True, False])
  flags = [np.asarray([False, True, False]), np.asarray([True, False, True])]
  assert grpo_lib.pick_groups(flags, 3) == [(0, 1), (1, 0), (1, 2)]  # The first 3 informative ones.
  assert grpo_lib.pick_groups(flags[:1], 3) == [(0, 0), (0, 1), (0, 2)]  # Short: the rest fill, in place.
  assert grpo_lib.pick_groups([np.asarray([False, False]), np.asarray([False, True])], 2) == [(0, 0), (1, 1)]
  with pytest.raises(ValueError):
    grpo_lib.pick_groups(flags[:1], 4)

  # Rows move with their group, whatever the array's trailing shape; the result is placed like round 0's.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rows = 12  # 3 groups of 4 per round
  rounds = [{"ids": jax.device_put(np.arange(rows, dtype=np.int32) + 100 * r, split),
             "tokens": jax.device_put(np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 1000 * r, split)}
            for r in range(2)]
  batch = grpo_lib.gather_groups(rounds, [(0, 1), (1, 0), (1, 2)], group_size=4)
  np.testing.assert_array_equal(batch["ids"], [4, 5, 6, 7, 100, 101, 102, 103, 108, 109, 110, 111])
  np.testing.assert_array_equal(batch["tokens"][4], np.arange(3) + 1000)
  np.testing.assert_array_equal(batch["tokens"][8], np.arange(24, 27) + 1000)
  assert batch["ids"].sharding == split and batch["tokens"].sharding == split
  same = grpo_lib.gather_groups(rounds[:1], [(0, 0), (0, 1), (0, 2)], group_size=4)
  assert same["ids"] is rounds[0]["ids"]  # One whole round in order: untouched.


def test_stage_config_refusals_name_the_key():
  """The stage's own checks (experiments/grpo.py), before anything is written."""
  from experiments import grpo as grpo_stage
  from jaxlm import errors
  from test_run_integrity import tiny_config

  grpo_stage.check_config(tiny_config("grpo", "--config.init_from=x"))  # The defaults pass.
  cases = [(("--config.data.source=jsonl:p.jsonl",), "reward.weights", "embedded world"),
           (("--config.reward.weights.model=1",), "reward_from", "reward-model run"),
           (("--config.init_from=",), "init_from", "required"),
           (("--config.grpo.group_size=1",), "grpo", "group_size")]
  for flags, key, words in cases:
    with pytest.raises(errors.ConfigError, match=words) as caught:
      grpo_stage.check_config(tiny_config("grpo", "--config.init_from=x", *flags))
    assert caught.value.key == key, (flags, caught.value.key)

# ------------------------------------------------------------------------------------------------
# The stage end to end: the session's `:tiny` pipeline runs it from its tiny SFT run
# (`conftest.tiny_grpo_run`); a second run here is killed and resumed.
# ------------------------------------------------------------------------------------------------
def test_a_tiny_grpo_run_writes_a_complete_run_directory(tiny_grpo_run, tiny_sft_run):
  workdir, _ = tiny_grpo_run
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["stage"] == "grpo" and manifest["complete"] and manifest["parent"] == str(tiny_sft_run[0])
  final = manifest["final_metrics"]
  for key in ("gold_reward", "correct", "win_rate", "kl", "length", "well_formed", "reference_gold_reward"):
    assert key in final and np.isfinite(final[key]), key
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  iterations = [r for r in rows if "sampler_gap" in r]
  assert [r["step"] for r in iterations] == [1, 2, 3, 4]
  for key in ("reward", "reward_correct", "reward_well_formed", "gold_reward", "kl", "kl_k3", "entropy",
              "clip_fraction", "zero_std_groups", "length", "end_rate", "time_generate", "time_train"):
    assert all(np.isfinite(r[key]) for r in iterations), key
  assert max(r["sampler_gap"] for r in iterations) < 1e-4  # On-policy: sampler == trainer.
  # The :tiny preset samples dynamically (one extra round at most); the kill/resume test below
  # covers its resume, where an iteration consumes a varying number of prompt batches.
  assert all(r["sampling_rounds"] in (1.0, 2.0) and 0 <= r["informative_groups"] <= 1 for r in iterations)
  assert "scalar_head" not in checkpoint.load_parent(workdir).params


def test_killed_grpo_resumes_to_the_same_parameters(tiny_grpo_run, tiny_sft_run, tmp_path, data_cache):
  reference, _ = tiny_grpo_run
  workdir = tmp_path / "killed"
  command = stage_command("grpo", workdir, f"--config.init_from={tiny_sft_run[0]}")
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
  for a, b in zip(jax.tree.leaves(checkpoint.load_parent(reference).params),
                  jax.tree.leaves(checkpoint.load_parent(workdir).params)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "sampler_gap" in r] == [1, 2, 3, 4]


def test_old_log_probs_from_the_sampler_skip_the_policy_pass_and_agree_with_the_scorers():
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0)))
  reference = jax.tree.map(lambda x: x * 1.01, params)
  rollout = rollout_lib.collect_rollout(params, np.asarray([[1, 5, 6, 9]] * 2, np.int32), np.asarray([4, 3], np.int32),
                                        jax.random.key(1), config=CONFIG, temperature=1.0, max_new_tokens=6,
                                        stop_ids=(3,), group_size=2)
  by_sampler, by_scorer = (grpo_lib.GRPOConfig(group_size=2, old_log_probs=mode) for mode in ("sampler", "scorer"))
  scorers = [grpo_lib.make_scorer(CONFIG, None, g) for g in (by_sampler, by_scorer)]
  from_sampler, from_scorer = (s(params, reference, None, rollout) for s in scorers)
  assert "entropy" not in from_sampler and "entropy" in from_scorer
  np.testing.assert_array_equal(from_sampler["log_probs"],
                                jnp.where(rollout["mask"], rollout["sampler_log_probs"], 0.0))
  np.testing.assert_allclose(from_sampler["log_probs"], from_scorer["log_probs"], atol=1e-5)
  np.testing.assert_array_equal(from_sampler["ref_log_probs"], from_scorer["ref_log_probs"])
  # The skipped pass is real work: the sampler-mode program does about half the flops.
  flops = [jax.jit(s).lower(params, reference, None, rollout).compile().cost_analysis()["flops"] for s in scorers]
  assert flops[0] < 0.6 * flops[1], flops
  # The update: the same step up to float error; the gap is measured on the first minibatch.
  advantage = jnp.asarray([1.0, -1.0, 0.5, -0.5])
  tx = optax.adam(1e-3)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  results = []
  for grpo, scored in ((by_sampler, from_sampler), (by_scorer, from_scorer)):
    state, _ = training.create_train_state(functools.partial(model_lib.init_params, CONFIG), tx, jax.random.key(0),
                                           mesh)
    state = state.replace(params=jax.tree.map(lambda p, a: jax.device_put(jnp.copy(p), a.sharding), params,
                                              state.params))  # A copy: the update donates it.
    update = grpo_lib.make_update(CONFIG, grpo, tx, state_shardings=jax.tree.map(lambda x: x.sharding, state),
                                  mesh=mesh)
    results.append(update(state, grpo_lib.update_batch(rollout, scored, advantage)))
  (state_a, metrics_a), (state_b, metrics_b) = results
  assert float(metrics_a["sampler_gap"]) < 1e-4 and "sampler_gap" not in metrics_b
  np.testing.assert_allclose(float(metrics_a["entropy"]), float(metrics_b["entropy"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
