r"""Stage 4a: RLHF with PPO: rollouts, reward model, KL penalty to the SFT model, GAE, clipped updates.

  python -m experiments.ppo --config=configs/ppo.py:cpu --workdir=runs/ppo \
      --config.init_from=runs/sft --config.reward_from=runs/reward
  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=/tmp/ppo \
      --config.init_from=/tmp/sft --config.reward_from=/tmp/rm
  python -m experiments.ppo --config=configs/ppo.py:cpu --workdir=runs/ppo_gold --config.init_from=runs/sft \
      --config.reward.weights.model=0 --config.reward.weights.gold=1 --config.value_from=sft

Each iteration (`jaxlm/ppo.py` has the math, `jaxlm/rollout.py` the rollout layer it shares with
other on-policy methods): draw `rollout_batch` prompts; sample one reply each with the KV-cache
sampler at temperature 1 (exact log-probs); score policy, reference and value teacher-forced in
one jitted call and the reply with the reward model at its last token; the reward is the
weighted sum of `reward.weights` (`jaxlm/rewards.py`: the reward model's score normalised by the
reward run's statistics by default; the world's gold reward or verifiable rules as oracles for
ablations), minus a penalty if the reply never ends its turn; per-token KL penalty; GAE; whitened advantages; `ppo_epochs` x `num_minibatches` clipped updates
of policy and value model. The KL coefficient is fixed or adaptive.

Diagnostics every iteration (metrics.jsonl): reward (the weighted sum, each term, the reward
model's raw score) and, on the world, gold reward and correctness; KL per reply; entropy; clip fraction; approximate KL; value explained
variance; reply length; end-of-turn rate; the largest gap between the sampler's and the
trainer's log-probs; the KL coefficient; and the time split into generation, scoring and
training with rollout tokens/s. Alarms stop (or flag) the run when the mean KL goes negative or
blows up. Evaluation every `eval_every` iterations is the one DPO uses (`jaxlm/policy_eval.py`).

The checkpoint holds policy, value model, both optimizer states, the KL coefficient, the rng
and the prompt iterator: rerunning the command resumes exactly; SIGTERM saves and exits 0.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import kl_control
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import ppo as ppo_lib
from jaxlm import preemption
from jaxlm import rewards
from jaxlm import rollout as rollout_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import stage
from jaxlm import trainer
from jaxlm import training
from jaxlm.data import pipelines

cli.define_flags()
# The stages each parent key accepts (read from the parent's manifest before anything runs).
PARENTS = {"init_from": ("sft", "dpo", "import"), "reward_from": ("reward",), "eval.judge": ("reward",)}



def check_config(config) -> None:
  """Every config value, before anything is written."""
  config_checks.check_common(config)
  if not config.init_from:
    raise errors.ConfigError("init_from", "required: the SFT run directory (--config.init_from=runs/sft)")
  if config.reward_from == "gold":  # The spelling before rewards were configured by weight.
    raise errors.ConfigError("reward_from", "'gold' is not a run directory: the world's gold reward is a "
                             "reward term (--config.reward.weights.model=0 --config.reward.weights.gold=1 "
                             "--config.value_from=sft)")
  config_checks.number_in(config, "reward.clip", 0.0, float("inf"), high_open=True)
  reward = rewards.stage_reward(config)
  config_checks.one_of(config, "value_from", ("reward", "sft"))
  if config.value_from == "reward" and not reward.uses_model:
    raise errors.ConfigError("value_from", "'reward' starts the value model from the reward model, but "
                             "reward.weights.model is 0; use value_from=sft")
  for key in ("ppo.ppo_epochs", "ppo.num_minibatches"):
    config_checks.positive_int(config, key)
  if config.rollout_batch % config.ppo.num_minibatches:
    raise errors.ConfigError("rollout_batch", f"{config.rollout_batch} must split into "
                             f"config.ppo.num_minibatches={config.ppo.num_minibatches}")
  if config.max_prompt_len + config.max_new_tokens > config.model.max_len:
    raise errors.ConfigError("max_new_tokens", f"max_prompt_len + max_new_tokens = "
                             f"{config.max_prompt_len + config.max_new_tokens} exceeds config.model.max_len="
                             f"{config.model.max_len}")
  config_checks.one_of(config, "alarms.action", ("stop", "flag"))
  config_checks.one_of(config, "ppo.kl_estimator", ("k1", "k3"))
  config_checks.number_in(config, "ppo.clip_eps", 0.0, 1.0, low_open=True)
  config_checks.number_in(config, "ppo.temperature", 0.0, float("inf"), low_open=True, high_open=True)
  config_checks.number_in(config, "kl.coef", 0.0, float("inf"), high_open=True)
  try:
    ppo_lib.PPOConfig(**dict(config.ppo))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError("ppo", str(e)) from None


def kl_controller(config, coef: float):
  """The configured KL controller, at coefficient `coef` (the checkpointed one on resume)."""
  if config.kl.adaptive:
    return kl_control.AdaptiveKLController(init_coef=config.kl.coef, target=config.kl.target,
                                           horizon=config.kl.horizon, coef=coef)
  return kl_control.FixedKLController(coef=coef)


def main(argv) -> None:
  del argv
  config, workdir = cli.config(), cli.workdir()
  check_config(config)
  stage.check_parents(config, PARENTS)
  stage.adopt_parent_model(config)  # an imported parent's shape, not the preset's
  stage.quiet_library_logs()
  session_start = time.perf_counter()
  ppo = ppo_lib.PPOConfig(**dict(config.ppo))
  reward_fn = rewards.stage_reward(config)

  # ----------------------------------------------------------------------------------------------
  # Mesh, run directory, the parent's tokenizer and shape.
  # ----------------------------------------------------------------------------------------------
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  # A foreign workdir or a changed config first, then the data: both before the workdir is touched.
  stage.check_run(config, workdir, resume_changes=cli.resume_changes())
  prompt_source = stage.open_split(config, "prompt", "train")
  run = stage.open_run(config, workdir, resume_changes=cli.resume_changes())
  tok = stage.child_tokenizer(config, run)
  model_config = stage.model_config(config.model, vocab_size=tok.vocab_size)

  # ----------------------------------------------------------------------------------------------
  # Roles: reference (SFT), reward model, policy and value model with their optimizers.
  # ----------------------------------------------------------------------------------------------
  policy_init = functools.partial(model_lib.init_params, model_config)
  value_init = functools.partial(model_lib.init_params, model_config, scalar_head=True)
  roles = ppo_lib.state_spec(config, model_config, mesh, rules)
  policy_tx, value_tx, abstract_state = roles.policy_tx, roles.value_tx, roles.abstract_state
  state_shardings = roles.shardings
  place = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), tree, like)
  sft = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                               expect_model_config=model_config)
  reference_params = place(sft.params, abstract_state.params)  # Forward-only, sharded like the policy.
  reward_params = None
  if reward_fn.uses_model:
    reward_run = checkpoint.load_parent(config.reward_from, expect_tokenizer_hash=tok.content_hash,
                                        expect_model_config=model_config)
    if reward_run.manifest.get("stage") != "reward":
      raise errors.ParentError(f"config.reward_from={config.reward_from!r} is a {reward_run.manifest.get('stage')!r} "
                       "run, not a reward model")
    reward_params = place(reward_run.params, abstract_state.value.params)  # Sharded like the value model.
  reward_fn.load_stats()

  def init() -> ppo_lib.PPOState:
    policy, _ = training.create_train_state(policy_init, policy_tx, jax.random.key(config.seed), mesh, rules)
    value, _ = training.create_train_state(value_init, value_tx, jax.random.key(config.seed + 1), mesh, rules)
    if config.value_from == "reward":
      value_params = jax.tree.map(jnp.copy, reward_params)
    else:  # The SFT backbone with the fresh (zero) scalar head of `value_init`.
      backbone = {k: v for k, v in value.params.items() if k != "scalar_head"}  # the SFT tree has no head
      value_params = {**place(sft.params, backbone), "scalar_head": value.params["scalar_head"]}
    logging.info("policy and reference from %s; value model from %s", sft.workdir,
                 config.reward_from if config.value_from == "reward" else "the SFT backbone + a fresh head")
    return ppo_lib.combine_states(policy.replace(params=jax.tree.map(jnp.copy, reference_params)),
                                  value.replace(params=value_params), config.kl.coef)

  # ----------------------------------------------------------------------------------------------
  # Data: training prompts (resumable), held-out prompts for the shared evaluation.
  # ----------------------------------------------------------------------------------------------
  host_batch = stage.per_host_batch_size(config.rollout_batch)
  account = stage.DataAccount(tok, {"train": ("prompts", prompt_source, dict(max_prompt_len=config.max_prompt_len))})
  prompt_iter = iter(pipelines.prompts_dataset(prompt_source, tok, max_prompt_len=config.max_prompt_len,
                                               batch_size=host_batch, seed=config.seed,
                                               shard=pipelines.HostShard.from_jax(),
                                               num_threads=config.data.num_threads))
  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)
  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=prompt_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from, config=config, tokenizer_hash=tok.content_hash,
                     data_source=prompt_source.description, model_config=model_config,
                     extra={"num_params": model_lib.num_params(model_config), "reward_from": config.reward_from,
                            "rewards": reward_fn.weights,
                            "value_from": config.value_from, "role_memory_bytes": ppo_lib.role_memory(model_config)})
  evaluator = policy_eval.PolicyEvaluator(
      reference_params, model_config, tok, stage.eval_prompts(config), max_new_tokens=config.eval.max_new_tokens,
      rng=jax.random.key(config.seed), sampling=sampling.SamplingConfig(temperature=config.eval.temperature),
      judge=stage.eval_judge(config, tok), batch_size=config.eval.batch_size)
  if "reference_well_formed" not in run.read_manifest().get("final_metrics", {}):
    run.update_manifest(final_metrics={f"reference_{k}": v for k, v in evaluator.reference_metrics().items()})

  scorer = ppo_lib.make_scorer(model_config, model_config if reward_params is not None else None, ppo,
                               mesh=mesh, rules=rules)
  update = ppo_lib.make_update(model_config, ppo, policy_tx, value_tx, state_shardings=state_shardings,
                               mesh=mesh, rules=rules)
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.resume(int(state.step))

  def run_eval(state, iteration: int) -> dict[str, float]:
    result, rows = evaluator(state.params)
    result = {f"eval_{k}": v for k, v in result.items()}
    trainer.log_eval(writer, iteration, result)
    writer.write_samples(iteration, rows[: config.eval.num_samples])
    return result

  def one_iteration(state, iteration: int):
    """Rollout, scoring, advantages, update: (new state, metrics) with the time split."""
    prompts = next(prompt_iter)
    records = [prompt_source[int(i)] for i in prompts["record_index"]]
    times = {}
    start = time.perf_counter()
    rollout = rollout_lib.collect_rollout(
        state.params, prompts["prompt_tokens"], prompts["prompt_lengths"],
        jax.random.fold_in(jax.random.key(config.seed), iteration), config=model_config,
        temperature=ppo.temperature, max_new_tokens=config.max_new_tokens, stop_ids=tok.chat_format.stop_ids,
        mesh=mesh)
    response_tokens, lengths = jax.device_get((rollout["response_tokens"], rollout["response_lengths"]))
    times["time_generate"] = time.perf_counter() - start

    start = time.perf_counter()
    scored = scorer(state.params, reference_params, state.value.params, reward_params, rollout)
    texts, ended = rollout_lib.decode_replies(tok, response_tokens, lengths)
    replies = [rewards.Reply(t, bool(e)) for t, e in zip(texts, ended)]
    model_scores = jax.device_get(scored["score"]) if reward_fn.uses_model else None
    total, parts = reward_fn.evaluate(records, replies, model_scores)
    score = total.astype(np.float64) - config.reward.no_end_penalty * (~ended)
    advantage = ppo_lib.advantages(scored=scored, score=jnp.asarray(score, jnp.float32), mask=rollout["mask"],
                                   response_lengths=rollout["response_lengths"], kl_coef=state.kl_coef, ppo=ppo)
    diagnostics = {**rollout_lib.rollout_diagnostics(rollout, scored),
                   **ppo_lib.value_diagnostics(rollout, scored, advantage)}
    jax.block_until_ready(advantage)
    times["time_score"] = time.perf_counter() - start

    start = time.perf_counter()
    state, update_metrics = update(state, ppo_lib.update_batch(rollout, scored, advantage))
    update_metrics = jax.device_get(update_metrics)
    times["time_train"] = time.perf_counter() - start
    metrics = {k: float(v) for k, v in {**jax.device_get(diagnostics), **update_metrics}.items()}
    metrics.update(times, reward=float(np.mean(total)), reward_with_penalty=float(np.mean(score)),
                   kl_coef=float(state.kl_coef), **rewards.WeightedSum.metrics(parts),
                   **rollout_lib.reply_diagnostics(ended=ended, response_lengths=lengths,
                                                   generate_seconds=times["time_generate"]),
                   **rewards.world_metrics(records, replies))  # NaN off the world's tasks: absent
    if model_scores is not None:
      metrics["reward_model_raw"] = float(np.mean(model_scores))
    return state, metrics

  # ----------------------------------------------------------------------------------------------
  # The iteration loop: log every iteration, evaluate, checkpoint, obey alarms and preemption.
  # ----------------------------------------------------------------------------------------------
  # The data counts (`account`, counted while the stage set up): logged, in the manifest and metrics.
  writer.write(int(state.step), account.record(run))
  controller = kl_controller(config, float(state.kl_coef))
  iteration = int(state.step)
  keeper = trainer.Safekeeping(ckpt=ckpt, run=run, data_iter=prompt_iter, writer=writer, session_start=session_start,
                               trees_to_check=lambda state: [state.params, state.value.params])
  timer = trainer.IterationTimer(iteration, config.total_steps)

  with preemption.PreemptionGuard() as guard:
    while iteration < config.total_steps:
      state, metrics = one_iteration(state, iteration)
      iteration += 1
      controller = controller.update(metrics["kl"], n_steps=config.rollout_batch)
      state = state.replace(kl_coef=jax.device_put(jnp.asarray(controller.coef, jnp.float32),
                                                   state.kl_coef.sharding))
      alarm = rollout_lib.kl_alarm(metrics["kl"], min_kl=config.alarms.min_kl, max_kl=config.alarms.max_kl)
      metrics["alarm"] = float(alarm is not None)
      keeper.check_metrics(metrics, first_step=iteration, last_step=iteration)
      writer.write(iteration, metrics)
      eta = timer.update(iteration)
      if iteration % config.log_every == 0 or iteration == config.total_steps:
        logging.info("iteration %d/%d: %s | %s", iteration, config.total_steps, ppo_lib.format_metrics(metrics), eta)
      if alarm is not None:
        logging.warning("alarm at iteration %d: %s", iteration, alarm)
        if config.alarms.action == "stop":
          ckpt.close()
          writer.close()
          raise SystemExit(f"stopped by the KL alarm at iteration {iteration}: {alarm}; the last good "
                           f"checkpoint (iteration {ckpt.latest_step()}) is kept")
      if iteration % config.eval_every == 0 and iteration < config.total_steps:
        run_eval(state, iteration)
      if iteration % config.checkpoint_every == 0 or iteration == config.total_steps:
        keeper.save(state, iteration)
      keeper.stop_if_preempted(guard, state, iteration)

  final = run_eval(state, iteration)
  final = {k.removeprefix("eval_"): v for k, v in final.items()}
  final["steps"] = iteration
  ckpt.close()
  writer.close()
  run.update_manifest(final_metrics=final, wall_time_s=time.perf_counter() - session_start, complete=True)
  logging.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


if __name__ == "__main__":
  cli.run(main)
