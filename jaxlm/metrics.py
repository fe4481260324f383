"""Metric logs (JSONL + TensorBoard), the progress line, NaN checks and device peak FLOP/s.

Cost model: metrics stay on the devices between log steps; the trainer fetches them (one host
sync) only on log steps and hands plain numbers to `MetricWriter.write` and `Progress.update`.
Nothing here touches the devices beyond converting what it is given.

Files, written by process 0 only (other processes get a writer that does nothing):

  metrics.jsonl    one strict-JSON object per `write`: ``{"step": 120, "loss": 2.31, ...}``;
                   every value a float; NaN/Inf are written as null (strict JSON has neither).
  samples.jsonl    one JSON object per generated sample (`write_samples`), with its step.
  events.out.tfevents.<time>.<host>.<pid>.<n>
                   TensorBoard scalars, same values (NaN/Inf kept), in the workdir itself so
                   ``tensorboard --logdir runs/`` shows one run per stage directory.

The TensorBoard file is written without TensorFlow or tensorboardX: it is a TFRecord file
(length, masked CRC32C, bytes, masked CRC32C) of `Event` protocol buffers with scalar `Summary`
values, and the few fields needed are encoded by hand below (see tensorboard's
`tensorboard/compat/proto/event.proto` and `summary.proto` for the field numbers).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np

# --- TensorBoard event files -----------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`; pure Python, fine for the few bytes of a log record."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  # TFRecord stores a rotated, offset CRC so that a CRC of CRCs does not look valid.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord frame around `data`."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative numbers
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  if wire_type == 2:  # length-delimited: strings, bytes, sub-messages
    payload = _varint(len(payload)) + payload
  return _varint(number << 3 | wire_type) + payload


def scalar_event(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
  """An `Event{wall_time, step, summary{value{tag, simple_value}...}}` message."""
  summary = b"".join(
      _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
      for tag, value in values.items())
  return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
          + _field(5, 2, summary))


def session_start_event(step: int, wall_time: float) -> bytes:
  """`Event{step, session_log{status: START}}`: TensorBoard drops points at >= `step` that
  earlier files logged, which is how a resumed run hides what its crashed session logged."""
  return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
          + _field(7, 2, _field(1, 0, _varint(1))))


def version_event(wall_time: float) -> bytes:
  """The `Event{file_version: "brain.Event:2"}` that opens every event file."""
  return _field(1, 1, struct.pack("<d", wall_time)) + _field(3, 2, b"brain.Event:2")


# --- Writers ---------------------------------------------------------------------------------


def _to_float(key: str, value: Any) -> float:
  try:
    array = np.asarray(value)  # a jax scalar is fetched here, and only here
    if array.size != 1:
      raise ValueError
    scalar = array.reshape(())[()]
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
      # The shortest decimal that reads back as the same float32: 0.001, not 0.0010000000474.
      return float(str(scalar))
    return float(scalar)
  except (TypeError, ValueError):
    raise TypeError(f"metric {key!r} must be a scalar number, got {value!r}") from None


def _strict(value: float) -> float | None:
  return value if math.isfinite(value) else None


_WRITERS = itertools.count()


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and a TensorBoard event file (process 0).

  Files are opened on first use, so a writer that never writes leaves nothing behind. Each
  call flushes, so a killed run keeps everything it logged.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.active = jax.process_index() == 0
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.samples_path = os.path.join(self.workdir, "samples.jsonl")
    # TensorBoard reads the files of a directory in name order: time first. The counter keeps
    # two writers of one process apart.
    self.events_path = os.path.join(self.workdir, f"events.out.tfevents.{int(time.time())}."
                                    f"{socket.gethostname()}.{os.getpid()}.{next(_WRITERS)}")
    self._tensorboard = tensorboard
    self._files: dict[str, Any] = {}

  def _file(self, path: str, mode: str):
    if path not in self._files:
      os.makedirs(self.workdir, exist_ok=True)
      self._files[path] = open(path, mode)
      if path == self.events_path:
        self._files[path].write(tfrecord(version_event(time.time())))
    return self._files[path]

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (scalars: Python, numpy or jax) at `step`."""
    if not self.active:
      return
    step = int(step)
    values = {str(key): _to_float(key, value) for key, value in metrics.items()}
    row = {"step": step, **{key: _strict(value) for key, value in values.items()}}
    f = self._file(self.metrics_path, "a")
    f.write(json.dumps(row, allow_nan=False) + "\n")
    f.flush()
    if self._tensorboard and values:
      f = self._file(self.events_path, "ab")
      f.write(tfrecord(scalar_event(step, values, time.time())))
      f.flush()

  def resume(self, step: int) -> None:
    """Forgets what earlier sessions logged after `step`: call once after restoring `step`.

    Rows with a later step (logged after the last checkpoint by a session that then died, and
    about to be logged again) and a line cut short by a kill are dropped from the JSONL files;
    TensorBoard gets a session-start event that hides its later points.
    """
    if not self.active:
      return
    for path in (self.metrics_path, self.samples_path):
      if os.path.exists(path):
        _drop_rows_after(path, int(step))
    if self._tensorboard:
      f = self._file(self.events_path, "ab")
      f.write(tfrecord(session_start_event(int(step) + 1, time.time())))
      f.flush()

  def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends one JSON line per row (e.g. prompt, completion, reward), each with `step`."""
    if not self.active:
      return
    f = self._file(self.samples_path, "a")
    for row in rows:
      f.write(json.dumps({"step": int(step), **row}, default=_json_scalar) + "\n")
    f.flush()

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _drop_rows_after(path: str, step: int) -> None:
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short when the previous session was killed
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)  # all or nothing: a crash here keeps the old file


def _json_scalar(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"{type(value).__name__} is not JSON-serializable: {value!r}")


# --- Progress line ---------------------------------------------------------------------------


def _si(x: float) -> str:
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{suffix}"
  return f"{x:.0f}"


def format_duration(seconds: float) -> str:
  """45s, 1m12s, 2h05m, 3d04h."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
  """The periodic log line: ``step 120/2000 | loss 2.31 | 41.2k tok/s | MFU 3.1% | ETA 1m12s``.

  Throughput is measured from wall time between consecutive `update` calls, so call it at log
  steps, with metrics already on the host. The first interval includes compilation, so the
  second replaces it; later intervals are averaged with an exponential moving average (weight
  0.3 on the newest), and the ETA is the remaining steps at that rate.
  """

  def __init__(self, total_steps: int, *, tokens_per_step: int,
               flops_per_token: float | None = None, peak_flops: float | None = None,
               every: int = 1, keys: Sequence[str] = ("loss",), start_step: int = 0,
               stream: TextIO | None = None):
    """Sets up the line.

    Args:
      total_steps: the last step of the run.
      tokens_per_step: tokens per optimizer step over all processes (global batch x length).
      flops_per_token: training FLOPs per token (`jaxlm.model.flops_per_token`); with
        `peak_flops`, adds MFU.
      peak_flops: the job's peak FLOP/s: `peak_flops_per_device() * jax.device_count()`.
      every: print on steps that are multiples of this (and the last step).
      keys: metrics shown, in order, when present.
      start_step: where this session starts (resumed runs): the rate counts from here.
      stream: where to print (default: stdout at print time).
    """
    self.total_steps = int(total_steps)
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.every = max(int(every), 1)
    self.keys = tuple(keys)
    self.stream = stream
    self.active = jax.process_index() == 0
    self._last_step = int(start_step)
    self._last_time = time.perf_counter()
    self._intervals = 0
    self._steps_per_s: float | None = None

  def due(self, step: int) -> bool:
    """Whether `update(step, ...)` would print: fetch metrics to the host only then."""
    return step % self.every == 0 or step >= self.total_steps

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
    """Measures the rate since the previous update; prints and returns the line when due."""
    if not self.due(step):
      return None
    now = time.perf_counter()
    steps, seconds = step - self._last_step, now - self._last_time
    self._last_step, self._last_time = step, now
    if steps > 0 and seconds > 0:  # a repeated step measures nothing
      rate = steps / seconds
      self._intervals += 1
      if self._intervals <= 2 or self._steps_per_s is None:
        self._steps_per_s = rate  # the first interval paid for compilation: drop it
      else:
        self._steps_per_s = 0.7 * self._steps_per_s + 0.3 * rate
    measured = steps > 0 and seconds > 0
    line = self.format(step, metrics or {}, rate=steps / seconds if measured else None)
    if self.active:
      print(line, file=self.stream or sys.stdout, flush=True)
    return line

  def format(self, step: int, metrics: Mapping[str, Any], *, rate: float | None) -> str:
    """The line for `step`, given this interval's rate in steps/s (None: not measured)."""
    parts = [f"step {step}/{self.total_steps}"]
    for key in self.keys:
      if key in metrics:
        parts.append(f"{key} {_to_float(key, metrics[key]):.4g}")
    if rate is not None:
      tokens_per_s = rate * self.tokens_per_step
      parts.append(f"{_si(tokens_per_s)} tok/s")
      if self.flops_per_token and self.peak_flops:
        parts.append(f"MFU {100 * self.flops_per_token * tokens_per_s / self.peak_flops:.1f}%")
    if self._steps_per_s and step < self.total_steps:
      parts.append(f"ETA {format_duration((self.total_steps - step) / self._steps_per_s)}")
    return " | ".join(parts)


# --- NaN check and hardware peaks ------------------------------------------------------------


def _describe_bad(value: np.ndarray) -> str | None:
  if value.dtype.kind not in "fc" or np.isfinite(value).all():
    return None
  kinds = [name for name, bad in (("nan", np.isnan(value)), ("inf", np.isposinf(value)),
                                  ("-inf", np.isneginf(value))) if bad.any()]
  return "/".join(kinds)


def check_finite(metrics: Mapping[str, Any], *, first_step: int, last_step: int,
                 checkpoint: str | None = None) -> None:
  """Raises FloatingPointError if any metric is NaN or Inf.

  Args:
    metrics: host values (scalars, or arrays such as per-step values of a scanned call).
    first_step, last_step: the steps these metrics cover (since the previous check).
    checkpoint: where the last good checkpoint is (e.g. "<workdir>/checkpoints/100").

  Raises:
    FloatingPointError: e.g. "loss is nan at steps 120-140; the last good checkpoint is
      kept at runs/pt/checkpoints/100".
  """
  bad = []
  for key, value in metrics.items():
    kind = _describe_bad(np.asarray(value))
    if kind:
      bad.append(f"{key} is {kind}")
  if not bad:
    return
  steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
  where = (f"the last good checkpoint is kept at {checkpoint}" if checkpoint
           else "no checkpoint was saved before it")
  raise FloatingPointError(f"{', '.join(bad)} at {steps}; {where}. Lower the learning rate, "
                           "raise warmup or clip gradients, then resume.")


# Dense (no sparsity) bf16 peak FLOP/s per chip, from vendor datasheets; approximate (clocks and
# power caps vary). Matched as lowercase substrings of `device_kind`, first match wins, so the
# more specific names come first.
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),   # SXM
    ("h200", 989e12),   # also GH200
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),       # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Approximate dense bf16 peak FLOP/s of `device` (default: the first), or None if unknown.

  CPUs return None: their peak depends on the core count, SIMD width and clock, and MFU on a
  CPU is not a meaningful number. Use for MFU only as an order of magnitude.
  """
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None
