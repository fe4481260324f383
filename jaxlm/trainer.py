"""The step loop that every gradient-descent stage shares (pretraining, SFT, reward model, DPO).

A stage's trainer (`experiments/<stage>.py`) builds its data, model, loss and jitted train step,
then hands them to `fit`, which owns what must be identical from stage to stage and is easy to
get subtly wrong when copied:

  * k optimizer steps per call (`steps_per_call`), host batches stacked for `lax.scan`;
  * host syncs only on log steps, where non-finite metrics stop the run naming the last good
    checkpoint;
  * evaluation every `eval_every` steps, checkpoints every `checkpoint_every` steps and at the
    end, each with the data iterator's state, never replacing a good checkpoint with a
    non-finite one;
  * SIGTERM/SIGINT: save and exit 0 (with several processes, agreed on at host syncs only).

PPO has its own loop (an iteration is rollouts then several epochs); it keeps the same safety
through `Safekeeping`, which owns saving, the finiteness checks and preemption for both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import metrics as metrics_lib
from jaxlm import preemption
from jaxlm import training


@dataclasses.dataclass
class LoopConfig:
  """The loop's schedule, in optimizer steps; each must be a multiple of `steps_per_call`."""

  total_steps: int
  steps_per_call: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def from_config(cls, config) -> "LoopConfig":
    """Reads the fields of a stage config and checks they fit the k-steps-per-call loop."""
    loop = cls(**{field.name: int(config[field.name]) for field in dataclasses.fields(cls)})
    for name in ("log_every", "eval_every", "checkpoint_every", "total_steps"):
      if getattr(loop, name) % loop.steps_per_call:
        raise errors.ConfigError(name, f"{getattr(loop, name)} must be a multiple of "
                                 f"config.steps_per_call={loop.steps_per_call}")
    return loop


class Safekeeping:
  """The loop's safety, written once for `fit` and PPO's iteration loop.

  * `save`: only a finite state is saved (else `FloatingPointError` naming the last good
    checkpoint, which is kept), with the data iterator's position, and the manifest's wall time
    is brought up to date;
  * `check_metrics`: non-finite metrics stop the run, naming the last good checkpoint;
  * `stop_if_preempted`: after SIGTERM/SIGINT, save (unless this step is saved), close the
    checkpointer and the metric writer, and exit 0.
  """

  def __init__(self, *, ckpt: checkpoint.Checkpointer, run: checkpoint.RunDir, data_iter: Iterator,
               writer: metrics_lib.MetricWriter, session_start: float,
               trees_to_check: Callable[[Any], list[Any]] = lambda state: [state.params]):
    self.ckpt, self.run, self.data_iter, self.writer = ckpt, run, data_iter, writer
    self.session_start = session_start
    self.trees_to_check = trees_to_check
    self.last_saved = ckpt.latest_step()

  def _last_good(self) -> str | None:
    good = self.ckpt.latest_step()
    return None if good is None else os.path.join(self.ckpt.directory, str(good))

  def save(self, state: Any, step: int) -> None:
    if not all(checkpoint.all_finite(tree) for tree in self.trees_to_check(state)):
      raise FloatingPointError(f"parameters are not finite at step {step}; the last good checkpoint "
                               f"(step {self.ckpt.latest_step()}) is kept")
    self.ckpt.save(step, state, data_state=self.data_iter.get_state())
    self.run.update_manifest(wall_time_s=time.perf_counter() - self.session_start)
    self.last_saved = step

  def check_metrics(self, metrics: Mapping[str, Any], *, first_step: int, last_step: int) -> None:
    metrics_lib.check_finite(metrics, first_step=first_step, last_step=last_step, checkpoint=self._last_good())

  def stop_if_preempted(self, guard: preemption.PreemptionGuard, state: Any, step: int) -> None:
    """Saves and exits the process (status 0) when a stop signal came; returns otherwise."""
    if not preemption.should_stop(guard):
      return
    if self.last_saved != step:
      self.save(state, step)
    self.ckpt.close()
    self.writer.close()
    logging.info("preempted at step %d: checkpoint saved, exiting", step)
    sys.exit(0)


def fit(state: training.TrainState, *, loop: LoopConfig, train_step: Callable, train_iter: Iterator,
        mesh: jax.sharding.Mesh, rules, ckpt: checkpoint.Checkpointer, run: checkpoint.RunDir,
        writer: metrics_lib.MetricWriter, progress: metrics_lib.Progress,
        run_eval: Callable[[training.TrainState, int], Mapping[str, Any]],
        session_start: float) -> training.TrainState:
  """Trains from `state.step` to `loop.total_steps`; returns the final state (checkpointed).

  Args:
    state: the sharded train state (restored, initialised from a parent, or fresh).
    loop: the schedule.
    train_step: `training.make_train_step(...)`: (state, batch) -> (state, metrics), k steps.
    train_iter: the resumable host-batch iterator (`get_state` is saved with each checkpoint).
    mesh, rules: where host batches go (`training.shard_batch`).
    ckpt, run: the checkpointer and run directory (the manifest's wall time is updated on save).
    writer, progress: metrics.jsonl / TensorBoard rows, and the log line with rates and ETA.
    run_eval: (state, step) -> metrics, called every `eval_every` steps before the end (the
      trainer runs its own final evaluation after `fit` returns).
    session_start: `time.perf_counter()` at the start of this process (the manifest's wall time).

  Exits the process with status 0 after saving when SIGTERM or SIGINT arrives.
  """
  k = loop.steps_per_call
  step = int(state.step)
  last_checked = step
  keeper = Safekeeping(ckpt=ckpt, run=run, data_iter=train_iter, writer=writer, session_start=session_start)

  with preemption.PreemptionGuard() as guard:
    while step < loop.total_steps:
      host_batches = [next(train_iter) for _ in range(k)]
      batch = training.shard_batch(host_batches[0] if k == 1 else host_batches, mesh, rules, steps_per_call=k)
      state, step_metrics = train_step(state, batch)
      step += k
      synced = progress.due(step) or step % loop.checkpoint_every == 0 or step >= loop.total_steps
      if synced:
        host = {name: np.mean(value) for name, value in jax.device_get(step_metrics).items()}
        keeper.check_metrics(host, first_step=last_checked + 1, last_step=step)
        last_checked = step
        writer.write(step, host)
        progress.update(step, host)
      if step % loop.eval_every == 0 and step < loop.total_steps:
        run_eval(state, step)
      if step % loop.checkpoint_every == 0 or step >= loop.total_steps:
        keeper.save(state, step)
      # With several processes, agreeing on a stop is a collective: only at host syncs.
      if synced or jax.process_count() == 1:
        keeper.stop_if_preempted(guard, state, step)
  return state


def restore_or_init(ckpt: checkpoint.Checkpointer, *, abstract_state, train_iter,
                    init: Callable[[], training.TrainState], run: checkpoint.RunDir) -> training.TrainState:
  """This run's latest checkpoint (params, optimizer and data position), else `init()`."""
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(abstract_state=abstract_state)
    if data_state is not None:
      train_iter.set_state(data_state)
    logging.info("resumed %s at step %d", run.workdir, int(state.step))
    return state
  return init()


def log_eval(writer: metrics_lib.MetricWriter, step: int, result: Mapping[str, Any]) -> None:
  """Writes an evaluation's metrics and logs them on one line."""
  writer.write(step, result)
  logging.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in result.items()
                                              if isinstance(v, (int, float, np.floating))))


class IterationTimer:
  """Seconds per iteration and the ETA for an RL stage's log line (PPO, GRPO); the first
  iteration (compiling) is not counted."""

  def __init__(self, start: int, total: int):
    self.total, self.first = total, start + 1
    self.since: float | None = None

  def update(self, iteration: int) -> str:
    now = time.perf_counter()
    if iteration <= self.first or self.since is None:
      self.since = now  # Iterations after the first (which compiled) set the pace.
      return "ETA after the next iteration"
    per_iteration = (now - self.since) / (iteration - self.first)
    remaining = (self.total - iteration) * per_iteration
    return f"{per_iteration:.1f}s/iteration | ETA {metrics_lib.format_duration(remaining)}"

