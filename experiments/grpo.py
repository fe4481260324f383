r"""Stage 4c: critic-free RL (GRPO, RLOO, Dr. GRPO): G replies per prompt, group-relative advantages.

  python -m experiments.grpo --config=configs/grpo.py:cpu --workdir=runs/grpo --config.init_from=runs/sft
  python -m experiments.grpo --config=configs/grpo.py:tiny --workdir=/tmp/grpo --config.init_from=/tmp/sft

Starts the policy from `init_from` (an SFT, DPO or imported run) and keeps the same model frozen
as the reference. Each iteration: sample `prompts_per_step` training prompts x G replies
(`jaxlm/rollout.py`; reply g of a prompt is seeded by (iteration, record index, g), so it does
not depend on the batch it was drawn in), score them teacher-forced (policy and reference log-probs, and a reward
model's score when `reward.weights.model` is nonzero) in one jitted call, compute each reply's
reward as the weighted sum of `reward.weights` (`jaxlm/rewards.py`), turn each prompt's G
rewards into advantages (`jaxlm/grpo.py`: grpo | rloo | dr_grpo), and take `epochs` x
`num_minibatches` clipped-ratio AdamW steps. There is no value model.

Logged per iteration: reward and each reward term, gold reward and correctness on the world,
KL to the reference (k1 and k3 per reply), entropy, length, ended-turn rate, clip fractions,
the fraction of groups whose replies all scored the same (no signal), the sampler/trainer
log-prob gap, and the time split. The held-out evaluation (`jaxlm/policy_eval.py`, shared with
PPO and DPO) runs on the reference at the start and on the policy at the end: gold reward,
correctness, win rate against the reference, KL, length, well-formed. Checkpoints, resume
(bitwise), preemption and the KL alarm work as in PPO.
"""

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
from jaxlm import grpo as grpo_lib
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import preemption
from jaxlm import rewards
from jaxlm import rollout as rollout_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import stage
from jaxlm import trainer
from jaxlm import training
from jaxlm.data import pipelines

PARENTS = {"init_from": ("sft", "dpo", "import"), "reward_from": ("reward",), "eval.judge": ("reward",)}


def check_config(config) -> grpo_lib.GRPOConfig:
  """Every config value, before anything is written; returns the method's settings."""
  config_checks.check_common(config)
  if not config.init_from:
    raise errors.ConfigError("init_from", "required: the SFT run directory (--config.init_from=runs/sft)")
  for key in ("prompts_per_step", "max_prompt_len", "max_new_tokens"):
    config_checks.positive_int(config, key)
  config_checks.one_of(config, "alarms.action", ("stop", "flag"))
  config_checks.one_of(config, "reward.nan", rewards.NAN_POLICIES)
  try:
    grpo = grpo_lib.GRPOConfig(**dict(config.grpo))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError("grpo", str(e)) from None
  rows = config.prompts_per_step * grpo.group_size
  if rows % grpo.num_minibatches:
    raise errors.ConfigError("grpo.num_minibatches", f"{grpo.num_minibatches} must divide the "
                             f"{rows} replies of an iteration (prompts_per_step x grpo.group_size)")
  if config.max_prompt_len + config.max_new_tokens > config.model.max_len:
    raise errors.ConfigError("max_new_tokens", f"max_prompt_len + max_new_tokens = "
                             f"{config.max_prompt_len + config.max_new_tokens} exceeds config.model.max_len="
                             f"{config.model.max_len}")
  rewards.stage_reward(config)  # Refuses unknown terms and world terms off the world's data.
  return grpo


def main(argv) -> None:
  del argv
  config, workdir = cli.config(), cli.workdir()
  grpo = check_config(config)
  stage.check_parents(config, PARENTS)
  stage.adopt_parent_model(config)  # an imported parent's shape, not the preset's
  stage.quiet_library_logs()
  session_start = time.perf_counter()
  reward_fn = rewards.stage_reward(config)
  uses_model = reward_fn.uses_model

  # ----------------------------------------------------------------------------------------------
  # Mesh, run directory, the parent's tokenizer and shape.
  # ----------------------------------------------------------------------------------------------
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  stage.check_run(config, workdir, resume_changes=cli.resume_changes())
  prompt_source = stage.open_split(config, "prompt", "train")
  run = stage.open_run(config, workdir, resume_changes=cli.resume_changes())
  tok = stage.child_tokenizer(config, run)
  model_config = stage.model_config(config.model, vocab_size=tok.vocab_size)

  # ----------------------------------------------------------------------------------------------
  # Roles: the policy (with its optimizer), the frozen reference, an optional reward model.
  # ----------------------------------------------------------------------------------------------
  init_fn = functools.partial(model_lib.init_params, model_config)
  updates_per_run = config.total_steps * grpo.epochs * grpo.num_minibatches
  abstract_params = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
  tx, _ = training.make_optimizer(**config.optimizer, total_steps=updates_per_run, params=abstract_params)
  abstract_state = training.abstract_train_state(init_fn, tx, mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  place = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), tree, like)
  parent = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                                  expect_model_config=model_config)
  reference_params = place(parent.params, abstract_state.params)  # Forward-only, sharded like the policy.
  reward_params = None
  if uses_model:
    reward_run = checkpoint.load_parent(config.reward_from, expect_tokenizer_hash=tok.content_hash,
                                        expect_model_config=model_config)
    head_init = functools.partial(model_lib.init_params, model_config, scalar_head=True)
    head_shardings = sharding.logical_shardings(jax.eval_shape(head_init, jax.random.key(0)), mesh, rules)
    reward_params = jax.tree.map(jax.device_put, reward_run.params, head_shardings)
    reward_fn.load_stats()

  def init() -> training.TrainState:
    state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
    logging.info("policy and reference from %s (%s, step %d)", parent.workdir, parent.manifest["stage"], parent.step)
    return state.replace(params=jax.tree.map(jnp.copy, reference_params))

  # ----------------------------------------------------------------------------------------------
  # Data: training prompts (resumable), held-out prompts for the shared evaluation.
  # ----------------------------------------------------------------------------------------------
  host_batch = stage.per_host_batch_size(config.prompts_per_step)
  account = stage.DataAccount(tok, {"train": ("prompts", prompt_source, dict(max_prompt_len=config.max_prompt_len))})
  prompt_iter = iter(pipelines.prompts_dataset(prompt_source, tok, max_prompt_len=config.max_prompt_len,
                                               batch_size=host_batch, seed=config.seed,
                                               shard=pipelines.HostShard.from_jax(),
                                               num_threads=config.data.num_threads))
  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)
  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=prompt_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from, config=config, tokenizer_hash=tok.content_hash,
                     data_source=prompt_source.description, model_config=model_config,
                     extra={"num_params": model_lib.num_params(model_config), "rewards": reward_fn.weights,
                            "group_size": grpo.group_size, "advantage": grpo.advantage})
  evaluator = policy_eval.PolicyEvaluator(
      reference_params, model_config, tok, stage.eval_prompts(config), max_new_tokens=config.eval.max_new_tokens,
      rng=jax.random.key(config.seed), sampling=sampling.SamplingConfig(temperature=config.eval.temperature),
      judge=stage.eval_judge(config, tok), batch_size=config.eval.batch_size)
  if "reference_well_formed" not in run.read_manifest().get("final_metrics", {}):
    run.update_manifest(final_metrics={f"reference_{k}": v for k, v in evaluator.reference_metrics().items()})

  scorer = grpo_lib.make_scorer(model_config, model_config if uses_model else None, grpo, mesh=mesh, rules=rules)
  update = grpo_lib.make_update(model_config, grpo, tx, state_shardings=state_shardings, mesh=mesh, rules=rules)
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.resume(int(state.step))

  def run_eval(state, iteration: int) -> dict[str, float]:
    result, rows = evaluator(state.params)
    result = {f"eval_{k}": v for k, v in result.items()}
    trainer.log_eval(writer, iteration, result)
    writer.write_samples(iteration, rows[: config.eval.num_samples])
    return result

  def draw(state, iteration: int, round_: int) -> dict:
    """One batch of prompts, G replies each, scored, rewarded and with advantages."""
    prompts = next(prompt_iter)
    records = [prompt_source[int(i)] for i in prompts["record_index"] for _ in range(grpo.group_size)]
    key = jax.random.fold_in(jax.random.key(config.seed), iteration)
    if round_:  # Dynamic sampling's later rounds: fresh keys; round 0 keeps the plain per-iteration key.
      key = jax.random.fold_in(key, round_)
    start = time.perf_counter()
    rollout = rollout_lib.collect_rollout(
        state.params, prompts["prompt_tokens"], prompts["prompt_lengths"], key, config=model_config,
        temperature=grpo.temperature, max_new_tokens=config.max_new_tokens, stop_ids=tok.chat_format.stop_ids,
        group_size=grpo.group_size, prompt_ids=prompts["record_index"], mesh=mesh)
    response_tokens, lengths = jax.device_get((rollout["response_tokens"], rollout["response_lengths"]))
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    scored = scorer(state.params, reference_params, reward_params, rollout)
    texts, ended = rollout_lib.decode_replies(tok, response_tokens, lengths)
    replies = [rewards.Reply(t, bool(e)) for t, e in zip(texts, ended)]
    total, parts = reward_fn.evaluate(records, replies, jax.device_get(scored["score"]) if uses_model else None)
    advantage = grpo_lib.advantages(grpo_lib.score_with_kl(total, scored, rollout["mask"], grpo), grpo=grpo)
    jax.block_until_ready(advantage)
    return dict(records=records, rollout=rollout, scored=scored, replies=replies, ended=ended, lengths=lengths,
                total=total, parts=parts, advantage=advantage, generate_s=generate_s,
                score_s=time.perf_counter() - start)

  def one_iteration(state, iteration: int):
    """Rollout of G replies per prompt, rewards, advantages, update: (new state, metrics).

    The rollout metrics describe the iteration's first draw, so they compare across runs with
    and without dynamic sampling; `sampling_rounds` and `informative_groups` say what the
    update trained on.
    """
    first = draw(state, iteration, 0)
    rounds = [first]
    informative = [grpo_lib.informative_groups(first["total"], group_size=grpo.group_size)]
    num_groups = len(informative[0])
    while len(rounds) <= grpo.dynamic_sampling_rounds and sum(map(np.sum, informative)) < num_groups:
      rounds.append(draw(state, iteration, len(rounds)))
      informative.append(grpo_lib.informative_groups(rounds[-1]["total"], group_size=grpo.group_size))
    picks = grpo_lib.pick_groups(informative, num_groups)
    batch = grpo_lib.gather_groups([grpo_lib.update_batch(r["rollout"], r["scored"], r["advantage"]) for r in rounds],
                                   picks, group_size=grpo.group_size)
    diagnostics = {**rollout_lib.rollout_diagnostics(first["rollout"], first["scored"]),
                   **grpo_lib.group_diagnostics(jnp.asarray(first["total"]), first["advantage"],
                                                group_size=grpo.group_size)}
    times = {"time_generate": sum(r["generate_s"] for r in rounds), "time_score": sum(r["score_s"] for r in rounds)}

    start = time.perf_counter()
    state, update_metrics = update(state, batch)
    update_metrics = jax.device_get(update_metrics)
    times["time_train"] = time.perf_counter() - start
    metrics = {k: float(v) for k, v in {**jax.device_get(diagnostics), **update_metrics}.items()}
    metrics.update(times, **rollout_lib.reply_diagnostics(ended=first["ended"], response_lengths=first["lengths"],
                                                          generate_seconds=first["generate_s"]),
                   reward=float(np.mean(first["total"])), **rewards.WeightedSum.metrics(first["parts"]),
                   **rewards.world_metrics(first["records"], first["replies"]))  # NaN off the world's tasks: absent
    # The fraction of the first draw's groups whose G rewards were all equal (no signal).
    metrics["zero_std_groups"] = float(1.0 - np.mean(informative[0]))
    if grpo.dynamic_sampling_rounds:
      metrics.update(sampling_rounds=float(len(rounds)),
                     informative_groups=float(np.mean([informative[r][g] for r, g in picks])))
    return state, metrics

  # ----------------------------------------------------------------------------------------------
  # The iteration loop: log every iteration, evaluate, checkpoint, obey alarms and preemption.
  # ----------------------------------------------------------------------------------------------
  writer.write(int(state.step), account.record(run))
  iteration = int(state.step)
  keeper = trainer.Safekeeping(ckpt=ckpt, run=run, data_iter=prompt_iter, writer=writer, session_start=session_start,
                               trees_to_check=lambda state: [state.params])
  timer = trainer.IterationTimer(iteration, config.total_steps)

  with preemption.PreemptionGuard() as guard:
    while iteration < config.total_steps:
      state, metrics = one_iteration(state, iteration)
      iteration += 1
      alarm = rollout_lib.kl_alarm(metrics["kl"], min_kl=config.alarms.min_kl, max_kl=config.alarms.max_kl)
      metrics["alarm"] = float(alarm is not None)
      keeper.check_metrics(metrics, first_step=iteration, last_step=iteration)
      writer.write(iteration, metrics)
      eta = timer.update(iteration)
      if iteration % config.log_every == 0 or iteration == config.total_steps:
        logging.info("iteration %d/%d: %s | %s", iteration, config.total_steps, format_metrics(metrics), eta)
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


def format_metrics(metrics: dict[str, float]) -> str:
  """One log line of an iteration's headline numbers."""
  keys = ("reward", "gold_reward", "correct", "kl", "entropy", "length", "end_rate", "clip_fraction",
          "zero_std_groups", "sampler_gap", "time_generate", "time_score", "time_train")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


if __name__ == "__main__":
  cli.run(main)
