r"""Stage 2: supervised fine-tuning (SFT) on conversations, loss on the assistant's turns only.

  python -m experiments.sft --config=configs/sft.py:cpu --workdir=runs/sft --config.init_from=runs/pretrain
  python -m experiments.sft --config=configs/sft.py:tiny --workdir=/tmp/sft --config.init_from=/tmp/pt

Starts from `config.init_from` (stage 1's run directory): its tokenizer, its model shape (which
`config.model` must match) and its parameters. Trains next-token cross-entropy on chat records
rendered by `jaxlm.chat_template`, whose loss mask covers the assistant's content and its
`<|end|>` only, packed first-fit into rows. Evaluates held-out chat loss, and by generating on
held-out prompts: the rate of well-formed replies (the turn is ended), and on the world the
answer correctness and the gold reward. The parent is scored on the same prompts before
training (metrics prefixed `parent_`), so the run directory records SFT's gain. Writes the run
directory like stage 1 (config.json, manifest.json, tokenizer.model, checkpoints/,
metrics.jsonl, TensorBoard events, samples.jsonl with prompt, reply and gold reward).

Resume and preemption behave as in stage 1 (`jaxlm/trainer.py`).
"""

from __future__ import annotations

import functools
import logging
import time

import jax

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import losses
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import stage
from jaxlm import trainer
from jaxlm import training
from jaxlm.data import pipelines

cli.define_flags()
# The stages each parent key accepts (read from the parent's manifest before anything runs).
PARENTS = {"init_from": ("pretrain", "sft", "import")}


def check_config(config) -> trainer.LoopConfig:
  """Every config value, before anything is written; returns the loop's schedule."""
  config_checks.check_common(config)
  if not config.init_from:
    raise errors.ConfigError("init_from", "required: the stage-1 run directory to fine-tune "
                             "(--config.init_from=runs/pretrain)")
  loop = trainer.LoopConfig.from_config(config)
  if config.eval.max_new_tokens >= config.model.max_len:
    raise errors.ConfigError("eval.max_new_tokens", f"{config.eval.max_new_tokens} leaves no room for a "
                             f"prompt in config.model.max_len={config.model.max_len}")
  return loop


def eval_sampling(eval_config) -> sampling.SamplingConfig:
  """The `eval` section's decoding: greedy, or plain sampling at its temperature."""
  if eval_config.greedy:
    return sampling.SamplingConfig(greedy=True)
  return sampling.SamplingConfig(temperature=eval_config.temperature)


def main(argv) -> None:
  del argv
  config, workdir = cli.config(), cli.workdir()
  loop = check_config(config)
  stage.check_parents(config, PARENTS)
  stage.adopt_parent_model(config)  # an imported parent's shape, not the preset's
  stage.quiet_library_logs()
  session_start = time.perf_counter()

  # ----------------------------------------------------------------------------------------------
  # Mesh, run directory, and the parent's tokenizer and shape.
  # ----------------------------------------------------------------------------------------------
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  # A foreign workdir or a changed config first, then the data: both before the workdir is touched.
  stage.check_run(config, workdir, resume_changes=cli.resume_changes())
  train_source = stage.open_split(config, "chat", "train")
  valid_source = stage.open_split(config, "chat", "validation")
  run = stage.open_run(config, workdir, resume_changes=cli.resume_changes())
  # The parent's tokenizer (a resumed run keeps its own copy; load_parent checks they agree).
  tok = stage.child_tokenizer(config, run)
  model_config = stage.model_config(config.model, vocab_size=tok.vocab_size)

  # ----------------------------------------------------------------------------------------------
  # Data: packed chats (assistant-only loss mask), validation chats, held-out prompts.
  # ----------------------------------------------------------------------------------------------
  shard = pipelines.HostShard.from_jax()
  host_batch = stage.per_host_batch_size(config.batch_size)
  data_args = dict(max_len=config.seq_len, batch_size=host_batch, seed=config.seed, shard=shard,
                   packing=config.packing, length_policy=config.length_policy)
  account = stage.DataAccount(tok, {"train": ("sft", train_source, data_args),
                                    "validation": ("sft", valid_source, data_args)})  # Counts in the background.
  train_data = pipelines.sft_dataset(train_source, tok, num_threads=config.data.num_threads, **data_args)
  valid_data = pipelines.sft_dataset(valid_source, tok, num_epochs=1, shuffle=False, **data_args)
  prompts = stage.eval_prompts(config, valid_source)
  logging.info("evaluating on %d held-out prompts (%s)", len(prompts),
               "with gold reward" if any(map(policy_eval.has_gold_reward, prompts)) else "no gold reward")

  # ----------------------------------------------------------------------------------------------
  # Model, optimizer, state: this run's checkpoint, else the parent's params.
  # ----------------------------------------------------------------------------------------------
  init_fn = functools.partial(model_lib.init_params, model_config)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  tx, schedule, abstract_state, state_shardings = spec.tx, spec.schedule, spec.abstract_state, spec.shardings
  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)
  train_iter = iter(train_data)
  # Checked even on resume: a config edited between sessions must still match the parent.
  parent = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                                  expect_model_config=model_config, abstract_params=abstract_state.params)

  def init() -> training.TrainState:
    state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
    logging.info("initialised params from %s (%s, step %d)", parent.workdir, parent.manifest["stage"], parent.step)
    return state.replace(params=parent.params)

  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=train_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from, config=config, tokenizer_hash=tok.content_hash,
                     data_source=train_source.description, model_config=model_config,
                     extra={"num_params": model_lib.num_params(model_config)})

  # ----------------------------------------------------------------------------------------------
  # The update step, held-out loss, and generation on held-out prompts.
  # ----------------------------------------------------------------------------------------------
  loss_fn = losses.lm_loss_fn(model_lib.Transformer(model_config))
  train_step = training.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=state_shardings,
                                        schedule_fn=schedule, num_microbatches=config.num_microbatches,
                                        steps_per_call=loop.steps_per_call)
  eval_step = training.make_eval_step(loss_fn, mesh=mesh, state_shardings=state_shardings)
  valid_iter = iter(valid_data)
  eval_batches = [training.shard_batch(b, mesh, rules) for b in
                  (next(valid_iter, None) for _ in range(config.num_eval_batches)) if b is not None]
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.resume(int(state.step))  # Drops rows a killed session logged after its last checkpoint.

  def generate_eval(params, step: int, prefix: str = "") -> dict[str, float]:
    metrics, rows = policy_eval.evaluate_policy(
        params, model_config, tok, prompts, sampling=eval_sampling(config.eval),
        max_new_tokens=config.eval.max_new_tokens, rng=jax.random.key(config.seed),
        batch_size=config.eval.batch_size)
    result = {f"{prefix}{name}": value for name, value in metrics.items()}
    trainer.log_eval(writer, step, result)
    # Step 0 holds the parent's replies: samples.jsonl shows the same prompts before and after.
    writer.write_samples(step, [{**row, "model": "parent" if prefix else "sft"}
                                for row in rows[: config.eval.num_samples]])
    return result

  def run_eval(state: training.TrainState, step: int) -> dict[str, float]:
    result = {f"val_{name}": value for name, value in training.evaluate(eval_step, state.params, eval_batches).items()}
    trainer.log_eval(writer, step, result)
    result.update(generate_eval(state.params, step))
    return result

  # The parent on the same prompts, once per run (final_metrics persist across sessions): the
  # "before" of SFT's before and after.
  if "parent_well_formed" not in run.read_manifest().get("final_metrics", {}):
    run.update_manifest(final_metrics=generate_eval(parent.params, 0, prefix="parent_"))

  # ----------------------------------------------------------------------------------------------
  # Train loop (jaxlm/trainer.py), then the final evaluation and the manifest's headline numbers.
  # ----------------------------------------------------------------------------------------------
  progress = metrics_lib.Progress(
      config.total_steps, tokens_per_step=config.batch_size * config.seq_len,
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
  ckpt.close()
  writer.close()
  run.update_manifest(final_metrics=final, wall_time_s=time.perf_counter() - session_start, complete=True)
  logging.info("done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


if __name__ == "__main__":
  cli.run(main)
