r"""Stage 3: the reward model, Bradley-Terry on preference pairs.

  python -m experiments.reward --config=configs/reward.py:cpu --workdir=runs/reward --config.init_from=runs/sft
  python -m experiments.reward --config=configs/reward.py:tiny --workdir=/tmp/rm --config.init_from=/tmp/sft

Starts the backbone from `config.init_from` (an SFT run directory by default, InstructGPT's
choice; a stage-1 one works too) and adds a fresh scalar head (`model.add_scalar_head`), read at
the last real token of each response (`jaxlm/reward_model.py`). Trains -log sigmoid(r_chosen -
r_rejected) with an optional margin and reward-centering term. Evaluates on held-out pairs:
accuracy, mean margin, accuracy by length, reward-length correlation, and on the world the
labels' own ceiling and the correlation with the gold reward. At the end, scores the parent's
samples on training prompts and saves their mean and std as reward_stats.json (PPO normalises
rewards with them). Resume and preemption as in stage 1 (`jaxlm/trainer.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import numpy as np

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import files
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import reward_model
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import stage
from jaxlm import trainer
from jaxlm import training
from jaxlm.data import pipelines

cli.define_flags()
# The stages each parent key accepts (read from the parent's manifest before anything runs).
PARENTS = {"init_from": ("sft", "pretrain", "import")}

STATS_FILE = "reward_stats.json"


def check_config(config) -> trainer.LoopConfig:
  """Every config value, before anything is written; returns the loop's schedule."""
  config_checks.check_common(config)
  if not config.init_from:
    raise errors.ConfigError("init_from", "required: the SFT (or stage-1) run directory to start "
                             "from (--config.init_from=runs/sft)")
  loop = trainer.LoopConfig.from_config(config)
  for key in ("stats.num_prompts", "stats.max_new_tokens", "stats.batch_size"):
    config_checks.positive_int(config, key)
  config_checks.number_in(config, "stats.temperature", 0.0, float("inf"), low_open=True, high_open=True)
  return loop


def reward_statistics(params, model_config, tok, parent, config) -> dict:
  """Mean and std of this reward model's scores of the parent's samples on training prompts.

  PPO's rollouts come from the SFT policy at the start, so normalising by these statistics makes
  its rewards start near mean 0 and std 1 whatever scale the Bradley-Terry fit landed on.
  """
  records = stage.open_split(config, "preference", "train")
  count = min(config.stats.num_prompts, len(records))
  picks = np.linspace(0, len(records) - 1, count).astype(int) if count else []
  prompts = [{"prompt": records[int(i)]["prompt"], "meta": {}} for i in picks]
  replies = policy_eval.generate_replies(
      parent.params, parent.model_config, tok, prompts,
      sampling=sampling.SamplingConfig(temperature=config.stats.temperature),
      max_new_tokens=config.stats.max_new_tokens, rng=jax.random.key(config.seed),
      batch_size=config.stats.batch_size)
  judge = policy_eval.reward_model_judge(params, model_config, tok, batch_size=config.stats.batch_size)
  scores = np.asarray(judge(prompts, replies.texts, replies.ended_turn), np.float64)
  return {"mean": float(scores.mean()), "std": float(scores.std()), "num_samples": int(len(scores)),
          "policy": parent.workdir, "temperature": float(config.stats.temperature),
          "max_new_tokens": int(config.stats.max_new_tokens)}


def main(argv) -> None:
  del argv
  config, workdir = cli.config(), cli.workdir()
  loop = check_config(config)
  stage.check_parents(config, PARENTS)
  stage.adopt_parent_model(config)  # an imported parent's shape, not the preset's
  stage.quiet_library_logs()
  session_start = time.perf_counter()

  # ----------------------------------------------------------------------------------------------
  # Mesh, run directory, the parent's tokenizer and shape.
  # ----------------------------------------------------------------------------------------------
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  # A foreign workdir or a changed config first, then the data: both before the workdir is touched.
  stage.check_run(config, workdir, resume_changes=cli.resume_changes())
  train_source = stage.open_split(config, "preference", "train")
  valid_source = stage.open_split(config, "preference", "validation")
  run = stage.open_run(config, workdir, resume_changes=cli.resume_changes())
  tok = stage.child_tokenizer(config, run)
  model_config = stage.model_config(config.model, vocab_size=tok.vocab_size)

  # ----------------------------------------------------------------------------------------------
  # Data: preference pairs, the held-out pairs scored at every eval.
  # ----------------------------------------------------------------------------------------------
  shard = pipelines.HostShard.from_jax()
  host_batch = stage.per_host_batch_size(config.batch_size)
  data_args = dict(max_len=config.seq_len, batch_size=host_batch, seed=config.seed, shard=shard,
                   length_policy=config.length_policy)
  account = stage.DataAccount(tok, {"train": ("pairs", train_source, data_args),
                                    "validation": ("pairs", valid_source, data_args)})  # Counts in the background.
  train_data = pipelines.pairs_dataset(train_source, tok, num_threads=config.data.num_threads, **data_args)
  valid_iter = iter(pipelines.pairs_dataset(valid_source, tok, num_epochs=1, shuffle=False, **data_args))
  valid_host = [b for b in (next(valid_iter, None) for _ in range(config.num_eval_batches)) if b is not None]

  # ----------------------------------------------------------------------------------------------
  # Model (backbone + scalar head), optimizer, state: this run's checkpoint, else the parent's
  # backbone with a fresh zero head.
  # ----------------------------------------------------------------------------------------------
  init_fn = functools.partial(model_lib.init_params, model_config, scalar_head=True)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  tx, schedule, abstract_state, state_shardings = spec.tx, spec.schedule, spec.abstract_state, spec.shardings
  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)
  train_iter = iter(train_data)
  backbone = {k: v for k, v in abstract_state.params.items() if k != "scalar_head"}
  parent = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                                  expect_model_config=model_config, abstract_params=backbone)

  def init() -> training.TrainState:
    state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
    logging.info("backbone from %s (%s, step %d); fresh scalar head", parent.workdir,
                 parent.manifest["stage"], parent.step)
    return state.replace(params={**parent.params, "scalar_head": state.params["scalar_head"]})

  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=train_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from, config=config, tokenizer_hash=tok.content_hash,
                     data_source=train_source.description, model_config=model_config,
                     extra={"num_params": model_lib.num_params(model_config, scalar_head=True),
                            "parent_stage": parent.manifest.get("stage")})

  # ----------------------------------------------------------------------------------------------
  # The update step and the held-out evaluation.
  # ----------------------------------------------------------------------------------------------
  model = model_lib.Transformer(model_config)
  loss_fn = reward_model.reward_loss_fn(model, margin=config.loss.margin,
                                        centering_weight=config.loss.centering_weight)
  train_step = training.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=state_shardings,
                                        schedule_fn=schedule, num_microbatches=config.num_microbatches,
                                        steps_per_call=loop.steps_per_call)
  eval_step = training.make_eval_step(loss_fn, mesh=mesh, state_shardings=state_shardings)
  eval_batches = [training.shard_batch(b, mesh, rules) for b in valid_host]
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.resume(int(state.step))

  def run_eval(state: training.TrainState, step: int) -> dict[str, float]:
    result = {"val_loss": training.evaluate(eval_step, state.params, eval_batches)["loss"]}
    scores = reward_model.score_pairs(state.params, model_config, valid_host)
    result.update({f"val_{k}": v for k, v in reward_model.pairwise_report(scores, valid_source).items()})
    trainer.log_eval(writer, step, result)
    return result

  # ----------------------------------------------------------------------------------------------
  # Train loop (jaxlm/trainer.py), final evaluation, reward statistics for PPO.
  # ----------------------------------------------------------------------------------------------
  progress = metrics_lib.Progress(
      config.total_steps, tokens_per_step=2 * config.batch_size * config.seq_len,
      flops_per_token=model_lib.flops_per_token(model_config, config.seq_len, causal=True),
      every=config.log_every, keys=("loss", "accuracy"), start_step=int(state.step))
  # The data counts (`account`, counted while the stage set up): logged, in the manifest and metrics.
  writer.write(int(state.step), account.record(run))
  state = trainer.fit(state, loop=loop, train_step=train_step, train_iter=train_iter, mesh=mesh, rules=rules,
                      ckpt=ckpt, run=run, writer=writer, progress=progress, run_eval=run_eval,
                      session_start=session_start)
  step = int(state.step)
  final = run_eval(state, step)
  final["steps"] = step
  # The parent's params were donated to the train state: read them again (not held while training).
  parent = checkpoint.load_parent(config.init_from, abstract_params=backbone)
  stats = reward_statistics(state.params, model_config, tok, parent, config)
  if jax.process_index() == 0:
    files.atomic_write(os.path.join(run.workdir, STATS_FILE), json.dumps(stats, indent=2) + "\n")
  logging.info("reward statistics of %d parent samples: mean %.3f std %.3f", stats["num_samples"],
               stats["mean"], stats["std"])
  final.update(reward_stats_mean=stats["mean"], reward_stats_std=stats["std"])
  ckpt.close()
  writer.close()
  run.update_manifest(final_metrics=final, wall_time_s=time.perf_counter() - session_start, complete=True)
  logging.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


if __name__ == "__main__":
  cli.run(main)
