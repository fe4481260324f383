r"""Stage 1: generative pretraining of the decoder-only transformer.

  python -m experiments.pretrain --config=configs/pretrain.py:cpu --workdir=runs/pretrain
  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=/tmp/pt \
      --config.total_steps=20 --config.data.source=text:my_corpus/*.txt

Trains the tokenizer (unless `config.tokenizer.path` names one), then the model with next-token
cross-entropy and AdamW on `config.data.source`; evaluates validation loss and perplexity, and
on the world the fact-completion accuracy on held-out phrasings; writes the run directory
(config.json, manifest.json, tokenizer.model, checkpoints/, metrics.jsonl, TensorBoard events,
samples.jsonl).

Resuming: rerunning the same command in the same workdir continues from its latest checkpoint,
data position included, and ends with the same parameters as an uninterrupted run. SIGTERM or
SIGINT saves a checkpoint and exits 0. Resume order: this run's latest checkpoint >
`config.init_from` (continue pretraining from another run's params) > scratch.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import numpy as np

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import evaluation
from jaxlm import losses
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import stage
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import trainer
from jaxlm import training
from jaxlm.data import pipelines
from jaxlm.data import world

cli.define_flags()
# The stages each parent key accepts (read from the parent's manifest before anything runs).
PARENTS = {"init_from": ("pretrain",)}


def get_tokenizer(config, run: checkpoint.RunDir, train_source) -> tokenizer_lib.Tokenizer:
  """This run's tokenizer: the one in the run dir (resume), the parent's, a given one, or a new one."""
  if run.has_tokenizer():
    return run.load_tokenizer()
  if config.init_from:  # Continued pretraining keeps the parent's vocabulary.
    tok = checkpoint.RunDir(config.init_from).load_tokenizer()
  elif config.tokenizer.path:
    tok = tokenizer_lib.Tokenizer.load(config.tokenizer.path)
  else:
    start = time.perf_counter()
    texts = (train_source[i]["text"] for i in range(len(train_source)))
    # Every process trains the same (deterministic) model; process 0 keeps it in the run dir.
    tok = tokenizer_lib.train_tokenizer(
        texts, os.path.join(run.workdir, f".tokenizer.{jax.process_index()}.model"),
        vocab_size=config.tokenizer.vocab_size, model_type=config.tokenizer.model_type,
        seed=config.seed, max_texts=config.tokenizer.max_texts,
        character_coverage=config.tokenizer.character_coverage, byte_fallback=config.tokenizer.byte_fallback)
    os.remove(os.path.join(run.workdir, f".tokenizer.{jax.process_index()}.model"))
    logging.info("trained a %s tokenizer (vocab %d) in %.1fs", config.tokenizer.model_type, tok.vocab_size,
                 time.perf_counter() - start)
  if jax.process_index() == 0:
    run.save_tokenizer(tok)
  return tok


def check_config(config) -> trainer.LoopConfig:
  """Every config value, before anything is written; returns the loop's schedule."""
  config_checks.check_common(config)
  loop = trainer.LoopConfig.from_config(config)
  config_checks.one_of(config, "tokenizer.model_type", ("bpe", "unigram", "char"))
  config_checks.positive_int(config, "tokenizer.vocab_size")
  config_checks.positive_int(config, "tokenizer.max_texts")
  config_checks.number_in(config, "tokenizer.character_coverage", 0.0, 1.0, low_open=True)
  if config.tokenizer.path and not os.path.isfile(config.tokenizer.path):
    raise errors.MissingError(f"config.tokenizer.path={config.tokenizer.path!r}: no such file; expected a "
                              "SentencePiece tokenizer.model (or leave it empty to train one)")
  return loop


def main(argv) -> None:
  del argv
  config, workdir = cli.config(), cli.workdir()
  loop = check_config(config)
  stage.check_parents(config, PARENTS)
  stage.quiet_library_logs()
  session_start = time.perf_counter()

  # ----------------------------------------------------------------------------------------------
  # Mesh and run directory.
  # ----------------------------------------------------------------------------------------------
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  # A foreign workdir or a changed config first, then the data: both before the workdir is touched.
  stage.check_run(config, workdir, resume_changes=cli.resume_changes())
  train_source = stage.open_split(config, "text", "train")
  valid_source = stage.open_split(config, "text", "validation")
  run = stage.open_run(config, workdir, resume_changes=cli.resume_changes())

  # ----------------------------------------------------------------------------------------------
  # Data and tokenizer.
  # ----------------------------------------------------------------------------------------------
  tok = get_tokenizer(config, run, train_source)
  account = stage.DataAccount(tok, {"train": ("pretraining", train_source, dict(seq_len=config.seq_len)),
                                    "validation": ("pretraining", valid_source, dict(seq_len=config.seq_len))})
  shard = pipelines.HostShard.from_jax()
  host_batch = stage.per_host_batch_size(config.batch_size)
  train_data = pipelines.pretraining_dataset(train_source, tok, seq_len=config.seq_len, batch_size=host_batch,
                                             seed=config.seed, shard=shard, num_threads=config.data.num_threads)
  valid_data = pipelines.pretraining_dataset(valid_source, tok, seq_len=config.seq_len, batch_size=host_batch,
                                             seed=config.seed, shard=shard, num_epochs=1, shuffle=False)

  # ----------------------------------------------------------------------------------------------
  # Model, optimizer and the sharded train state.
  # ----------------------------------------------------------------------------------------------
  model_config = stage.model_config(config.model, vocab_size=tok.vocab_size)
  init_fn = functools.partial(model_lib.init_params, model_config)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  tx, schedule, abstract_state, state_shardings = spec.tx, spec.schedule, spec.abstract_state, spec.shardings
  logging.info("model: %s parameters, %.3g training FLOPs per token",
               f"{model_lib.num_params(model_config):,}", model_lib.flops_per_token(model_config, config.seq_len))

  # ----------------------------------------------------------------------------------------------
  # Resume: this run's latest checkpoint > init_from > scratch.
  # ----------------------------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)
  train_iter = iter(train_data)

  def init() -> training.TrainState:
    state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
    if config.init_from:
      parent = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                                      expect_model_config=model_config,
                                      abstract_params=abstract_state.params)
      state = state.replace(params=parent.params)
      logging.info("initialised params from %s (step %d)", parent.workdir, parent.step)
    return state

  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=train_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from or None, config=config,
                     tokenizer_hash=tok.content_hash, data_source=train_source.description,
                     model_config=model_config)

  # ----------------------------------------------------------------------------------------------
  # The update step and the fixed validation batches.
  # ----------------------------------------------------------------------------------------------
  loss_fn = losses.lm_loss_fn(model_lib.Transformer(model_config))
  k = config.steps_per_call
  train_step = training.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=state_shardings,
                                        schedule_fn=schedule, num_microbatches=config.num_microbatches,
                                        steps_per_call=k)
  eval_step = training.make_eval_step(loss_fn, mesh=mesh, state_shardings=state_shardings)
  valid_iter = iter(valid_data)
  eval_batches = [training.shard_batch(b, mesh, rules) for b in
                  (next(valid_iter, None) for _ in range(config.num_eval_batches)) if b is not None]

  def run_eval(state: training.TrainState, step: int) -> dict[str, float]:
    result = {f"val_{name}": value for name, value in training.evaluate(eval_step, state.params, eval_batches).items()}
    trainer.log_eval(writer, step, result)
    return result

  # ----------------------------------------------------------------------------------------------
  # Train loop (jaxlm/trainer.py): host syncs on log steps only; NaN stops the run there.
  # ----------------------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(run.workdir)
  start_step = int(state.step)
  writer.resume(start_step)  # Drops rows a killed session logged after its last checkpoint.
  peak = metrics_lib.peak_flops_per_device()
  progress = metrics_lib.Progress(
      config.total_steps, tokens_per_step=config.batch_size * config.seq_len,
      flops_per_token=model_lib.flops_per_token(model_config, config.seq_len, causal=True),
      peak_flops=peak * jax.device_count() if peak else None, every=config.log_every,
      keys=("loss", "accuracy"), start_step=start_step)
  # The data counts (`account`, counted while the stage set up): logged, in the manifest and metrics.
  writer.write(start_step, account.record(run))
  state = trainer.fit(state, loop=loop, train_step=train_step, train_iter=train_iter, mesh=mesh, rules=rules,
                      ckpt=ckpt, run=run, writer=writer, progress=progress, run_eval=run_eval,
                      session_start=session_start)
  step = int(state.step)

  # ----------------------------------------------------------------------------------------------
  # Final evaluation, samples, and the manifest's headline numbers.
  # ----------------------------------------------------------------------------------------------
  val = run_eval(state, step)
  final = {"val_loss": val["val_loss"], "val_perplexity": val["val_perplexity"], "steps": step}
  on_world = config.data.source == "world"
  all_probes = world.fact_probes("validation", stage.world_config(config)) if on_world else []
  if all_probes and config.num_probes:
    # An evenly spaced subset covers every fact family (probes are grouped by family).
    picks = np.linspace(0, len(all_probes) - 1, min(config.num_probes, len(all_probes))).astype(int)
    probes = [all_probes[i] for i in picks]
    facts, _ = evaluation.fact_completion_accuracy(state.params, model_config, tok, probes)
    choices, _ = evaluation.fact_choice_accuracy(state.params, model_config, tok, probes,
                                                 candidate_pool=all_probes)
    facts.update(choices)
    writer.write(step, facts)
    final.update(facts)
    logging.info("facts on held-out phrasings: completion %.1f%%, multiple choice %.1f%% (chance %.1f%%)",
                 100 * facts["fact_accuracy"], 100 * facts["fact_choice_accuracy"], 100 * facts["fact_choice_chance"])
  prefixes = ([p["prefix"] for p in all_probes[::97]] if on_world else
              [valid_source[i]["text"][:40] for i in range(min(len(valid_source), config.num_samples))])
  prefixes = prefixes[: config.num_samples]
  samples = evaluation.complete(state.params, model_config, tok, prefixes,
                                max_new_tokens=min(config.sample_len, model_config.max_len // 2),
                                stop_ids=(tok.eos_id,))
  writer.write_samples(step, [{"prompt": p, "completion": s} for p, s in zip(prefixes, samples)])
  for prefix, sample in zip(prefixes, samples):
    logging.info("sample: %r -> %r", prefix, sample)
  ckpt.close()
  writer.close()
  run.update_manifest(final_metrics=final, wall_time_s=time.perf_counter() - session_start, complete=True)
  logging.info("done: %s", final)


if __name__ == "__main__":
  cli.run(main)
