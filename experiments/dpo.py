r"""Stage 4b: direct preference optimisation (DPO, conservative DPO, IPO) against the SFT model.

  python -m experiments.dpo --config=configs/dpo.py:cpu --workdir=runs/dpo --config.init_from=runs/sft
  python -m experiments.dpo --config=configs/dpo.py:tiny --workdir=/tmp/dpo --config.init_from=/tmp/sft

The policy starts from `config.init_from` (the SFT run directory); the frozen reference is the
same SFT model. Each step: the summed response log-probs of both sides of every pair under the
policy (one forward pass of the [2B, L] batch, `jaxlm/dpo.py`), the reference's (precomputed
once into reference_logps.npy, or computed online per batch), and the loss of
`config.loss.name`. Training metrics: loss, implicit-reward accuracy, chosen and rejected
implicit rewards, margin. Evaluation: the same on held-out pairs, and by generating on held-out
prompts (`jaxlm/policy_eval.py`, shared with PPO): gold reward, win rate against the SFT model,
KL to it, length, well-formed rate. Resume and preemption as in stage 1 (`jaxlm/trainer.py`).
"""

from __future__ import annotations

import functools
import io
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
from jaxlm import dpo
from jaxlm import files
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
PARENTS = {"init_from": ("sft", "dpo", "import"), "eval.judge": ("reward",)}

REFERENCE_FILE = "reference_logps.npy"


def check_config(config) -> trainer.LoopConfig:
  """Every config value, before anything is written; returns the loop's schedule."""
  config_checks.check_common(config)
  if not config.init_from:
    raise errors.ConfigError("init_from", "required: the SFT run directory (policy start and "
                             "reference), e.g. --config.init_from=runs/sft")
  config_checks.one_of(config, "loss.name", sorted(dpo.LOSSES))
  config_checks.number_in(config, "loss.beta", 0.0, float("inf"), low_open=True, high_open=True)
  config_checks.number_in(config, "loss.label_smoothing", 0.0, 0.5, high_open=True)
  loop = trainer.LoopConfig.from_config(config)
  if not config.score_len < config.seq_len:
    raise errors.ConfigError("score_len", f"{config.score_len} must be below config.seq_len={config.seq_len}: "
                             "both responses together, within the pair's row")
  return loop


def reference_table(run: checkpoint.RunDir, reference_params, model_config, source, tok, config,
                    data_args: dict, *, mesh, rules) -> np.ndarray:
  """The reference log-probs of the training pairs this run will see: loaded, or computed once.

  The pairs come from a second iterator with the training iterator's exact arguments, read for
  `total_steps` batches: the same pairs in the same order, so the table covers every pair the
  run trains on and no other (one forward pass per training pair, like the online mode, but
  before training; afterwards the reference is not needed on the device). Pairs not covered are
  NaN, and looking one up is an error. Written atomically: an interrupted computation is redone.
  A sidecar JSON records what decides which pairs the table covers (total_steps and the data
  arguments): a run resumed with another `total_steps` (`--resume_changes`) recomputes it.
  """
  # Each process looks up only the pairs of its own data shard, so each keeps its own table.
  name = REFERENCE_FILE if jax.process_count() == 1 else f"reference_logps.{jax.process_index()}.npy"
  path = os.path.join(run.workdir, name)
  covers = {"source": source.description, "total_steps": config.total_steps,
            **{k: v for k, v in data_args.items() if k != "shard"}}
  covers = json.loads(json.dumps(covers, default=str))
  if os.path.exists(path) and os.path.exists(f"{path}.json"):
    table = np.load(path)
    with open(f"{path}.json") as f:
      recorded = json.load(f)
    if table.shape == (len(source), 2) and recorded == covers:
      return table
    logging.warning("%s was computed for other pairs (%s, not %s): recomputing", path, recorded, covers)
  start = time.perf_counter()
  pairs = iter(pipelines.pairs_dataset(source, tok, num_threads=config.data.num_threads, **data_args))
  table = dpo.precompute_reference(reference_params, model_config,
                                   (next(pairs) for _ in range(config.total_steps)), len(source), mesh=mesh,
                                   rules=rules)
  buffer = io.BytesIO()
  np.save(buffer, table)
  files.atomic_write(path, buffer.getvalue())
  files.atomic_write(f"{path}.json", json.dumps(covers) + "\n")  # Last: a table without it is redone.
  logging.info("reference log-probs of %d training pairs precomputed in %.1fs", int(np.isfinite(table[:, 0]).sum()),
               time.perf_counter() - start)
  return table


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
  # Model, optimizer, state; the frozen reference (the SFT params) kept on the host.
  # ----------------------------------------------------------------------------------------------
  init_fn = functools.partial(model_lib.init_params, model_config)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  tx, schedule, abstract_state, state_shardings = spec.tx, spec.schedule, spec.abstract_state, spec.shardings
  # Host numpy: the reference is only read (precompute, evaluation); the policy is a copy on device.
  reference = checkpoint.load_parent(config.init_from, expect_tokenizer_hash=tok.content_hash,
                                     expect_model_config=model_config)

  # ----------------------------------------------------------------------------------------------
  # Data: pairs with the reference log-probs attached; held-out pairs and prompts.
  # ----------------------------------------------------------------------------------------------
  shard = pipelines.HostShard.from_jax()
  host_batch = stage.per_host_batch_size(config.batch_size)
  data_args = dict(max_len=config.seq_len, score_len=config.score_len, layout="shared", batch_size=host_batch,
                   seed=config.seed, shard=shard, length_policy=config.length_policy)
  account = stage.DataAccount(tok, {"train": ("pairs", train_source, data_args),
                                    "validation": ("pairs", valid_source, data_args)})  # Counts in the background.
  pairs = iter(pipelines.pairs_dataset(train_source, tok, num_threads=config.data.num_threads, **data_args))
  # The reference pass runs on the mesh like the train step: params sharded as the policy's,
  # pairs split over the batch axes. With a precomputed table the placed copy is dropped after
  # the table and the held-out pairs are scored, so training holds one model.
  reference_logps = dpo.reference_fn(model_config, mesh=mesh, rules=rules)
  reference_on_mesh = jax.tree.map(lambda x, target: jax.device_put(x, target.sharding), reference.params,
                                   abstract_state.params)
  if config.reference.precompute:
    train_iter = dpo.ReferenceAttacher(pairs, table=reference_table(run, reference_on_mesh, model_config, train_source,
                                                                    tok, config, data_args, mesh=mesh, rules=rules))
  else:
    train_iter = dpo.ReferenceAttacher(pairs, params=reference_on_mesh, compute=reference_logps)
  valid_iter = iter(pipelines.pairs_dataset(valid_source, tok, num_epochs=1, shuffle=False, **data_args))
  valid_host = [b for b in (next(valid_iter, None) for _ in range(config.num_eval_batches)) if b is not None]
  online = dpo.ReferenceAttacher(iter(()), params=reference_on_mesh, compute=reference_logps)
  valid_batches = [online.attach(b) for b in valid_host]
  del online
  if config.reference.precompute:
    del reference_on_mesh
  prompts = stage.eval_prompts(config, valid_source)
  evaluator = policy_eval.PolicyEvaluator(
      reference.params, model_config, tok, prompts, max_new_tokens=config.eval.max_new_tokens,
      rng=jax.random.key(config.seed), sampling=sampling.SamplingConfig(temperature=config.eval.temperature),
      judge=stage.eval_judge(config, tok), batch_size=config.eval.batch_size)

  ckpt = checkpoint.Checkpointer(run.workdir, max_to_keep=config.keep_checkpoints)

  def init() -> training.TrainState:
    state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
    params = jax.tree.map(lambda x, target: jax.device_put(x, target.sharding), reference.params, state.params)
    logging.info("policy from %s (%s, step %d)", reference.workdir, reference.manifest["stage"], reference.step)
    return state.replace(params=params)

  state = trainer.restore_or_init(ckpt, abstract_state=abstract_state, train_iter=train_iter, init=init, run=run)
  run.write_manifest(stage=config.stage, parent=config.init_from, config=config, tokenizer_hash=tok.content_hash,
                     data_source=train_source.description, model_config=model_config,
                     extra={"num_params": model_lib.num_params(model_config), "loss": config.loss.name,
                            "beta": config.loss.beta})

  # ----------------------------------------------------------------------------------------------
  # The update step and the evaluations.
  # ----------------------------------------------------------------------------------------------
  loss_fn = dpo.dpo_loss_fn(model_lib.Transformer(model_config), loss=config.loss.name, beta=config.loss.beta,
                            label_smoothing=config.loss.label_smoothing)
  train_step = training.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=state_shardings,
                                        schedule_fn=schedule, num_microbatches=config.num_microbatches,
                                        steps_per_call=loop.steps_per_call)
  eval_step = training.make_eval_step(loss_fn, mesh=mesh, state_shardings=state_shardings)
  eval_batches = [training.shard_batch(b, mesh, rules) for b in valid_batches]
  writer = metrics_lib.MetricWriter(run.workdir)
  writer.resume(int(state.step))

  def run_eval(state: training.TrainState, step: int) -> dict[str, float]:
    pairs_metrics = training.evaluate(eval_step, state.params, eval_batches)
    result = {f"val_{k}": v for k, v in pairs_metrics.items() if k not in ("perplexity", "tokens")}
    result["val_num_pairs"] = int(pairs_metrics["tokens"])  # The loss's count is the number of pairs.
    generated, rows = evaluator(state.params)
    result.update(generated)
    trainer.log_eval(writer, step, result)
    writer.write_samples(step, rows[: config.eval.num_samples])
    return result

  if "reference_well_formed" not in run.read_manifest().get("final_metrics", {}):
    run.update_manifest(final_metrics={f"reference_{k}": v for k, v in evaluator.reference_metrics().items()})

  # ----------------------------------------------------------------------------------------------
  # Train loop (jaxlm/trainer.py), then the final evaluation.
  # ----------------------------------------------------------------------------------------------
  progress = metrics_lib.Progress(
      config.total_steps, tokens_per_step=config.batch_size * config.seq_len,
      flops_per_token=model_lib.flops_per_token(model_config, config.seq_len, causal=True),
      every=config.log_every, keys=("loss", "accuracy", "margin"), start_step=int(state.step))
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
