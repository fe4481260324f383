"""Preemption: SIGTERM / SIGINT become a flag, so a train loop saves a checkpoint and exits 0.

Cloud schedulers (spot TPU/GPU VMs, Kubernetes, SLURM) send SIGTERM some seconds before they kill
a job, and Ctrl-C sends SIGINT. `PreemptionGuard` turns either into `guard.requested`; the
trainer checks `should_stop(guard)` between steps, saves, and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag, so the train loop saves a checkpoint and exits 0.

  Cloud schedulers (TPU/GPU spot VMs, Kubernetes, SLURM) send SIGTERM some seconds before
  killing a job; Ctrl-C sends SIGINT. Inside the context the first such signal only sets
  `requested`; a second one of the same kind runs the previous handler (Ctrl-C twice still
  interrupts at once). The old handlers come back on exit. Handlers can only be installed from
  the main thread; elsewhere the guard is inert (and says so in the log).

  With several processes the signal reaches each at a slightly different time, and a process
  that stopped alone would hang the others in their next collective. So the loop asks
  `should_stop(guard)`, which ORs the flag over all processes (a small all-gather), at the
  same steps on every process, e.g. each log step::

    with PreemptionGuard() as guard:
      for step in range(start, total):
        state, metrics = train_step(state, batch)
        if step % log_every == 0 and should_stop(guard):
          ckpt.save(step, state, data_state=it.get_state())
          break
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._received: set[int] = set()
    self._requested = False

  @property
  def requested(self) -> bool:
    """Whether a stop signal arrived (or `request()` was called) in this process."""
    return self._requested

  def request(self) -> None:
    """Sets the flag by hand (tests, or a stop condition of the caller's own)."""
    self._requested = True

  def _handle(self, signum: int, frame: Any) -> None:
    if signum in self._received:  # the second signal: give it to whoever had it before
      previous = self._previous.get(signum, signal.SIG_DFL)
      if callable(previous):
        previous(signum, frame)
      elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
      return
    self._received.add(signum)
    self._requested = True
    logging.warning("received %s: saving a checkpoint and stopping at the next check "
                    "(send it again to stop now)", signal.Signals(signum).name)

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard outside the main thread: signals are not intercepted")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()


def should_stop(guard: PreemptionGuard) -> bool:
  """`guard.requested` agreed over all processes: True everywhere if any process got a signal.

  A collective when `jax.process_count() > 1`: every process must call it at the same steps.
  """
  if jax.process_count() == 1:
    return guard.requested
  flags = multihost_utils.process_allgather(np.array([guard.requested], np.int32))
  return bool(np.asarray(flags).any())
