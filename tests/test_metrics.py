"""Metric files, the TensorBoard event format, the progress line and the NaN check."""

import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import metrics


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_metrics_jsonl_rows_are_step_then_plain_floats(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(np.int64(10), {"loss": jnp.float32(2.5), "lr": np.float32(1e-3), "tokens": 4096,
                                "grad_norm": jnp.array([0.75]), "clipped": np.bool_(True)})
    writer.write(20, {"loss": float("nan"), "grad_norm": jnp.inf})
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert rows == [
      {"step": 10, "loss": 2.5, "lr": 0.001, "tokens": 4096.0, "grad_norm": 0.75, "clipped": 1.0},
      {"step": 20, "loss": None, "grad_norm": None},  # strict JSON: non-finite -> null
  ]
  assert list(rows[0]) == ["step", "loss", "lr", "tokens", "grad_norm", "clipped"]
  assert type(rows[0]["step"]) is int
  assert all(type(v) is float for k, v in rows[0].items() if k != "step")
  assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_non_scalar_metrics_are_refused(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    with pytest.raises(TypeError, match="metric 'loss' must be a scalar number"):
      writer.write(1, {"loss": jnp.ones(3)})
    with pytest.raises(TypeError, match="metric 'name' must be a scalar number"):
      writer.write(1, {"name": "abc"})


def test_samples_jsonl(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write_samples(5, [{"prompt": "hi", "completion": "hello", "reward": np.float32(0.5)},
                             {"prompt": "a", "completion": "b"}])
    writer.write_samples(9, [{"prompt": "c", "completion": "d"}])
  rows = _read_jsonl(tmp_path / "samples.jsonl")
  assert rows == [{"step": 5, "prompt": "hi", "completion": "hello", "reward": 0.5},
                  {"step": 5, "prompt": "a", "completion": "b"},
                  {"step": 9, "prompt": "c", "completion": "d"}]


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics.MetricWriter(tmp_path / "run")
  writer.write(1, {"loss": 1.0})
  writer.write_samples(1, [{"text": "x"}])
  writer.close()
  progress = metrics.Progress(10, tokens_per_step=1, stream=io.StringIO())
  assert progress.update(10, {"loss": 1.0}).startswith("step 10/10")  # computed, not printed
  assert progress.stream.getvalue() == ""
  assert not os.path.exists(tmp_path / "run")


# --- TensorBoard ------------------------------------------------------------------------------
# The event file is read back with an independent decoder of the TFRecord framing and the
# protobuf wire format, and with TensorBoard's own reader when it is installed.


def test_crc32c_known_answers():
  assert metrics.crc32c(b"") == 0
  assert metrics.crc32c(b"123456789") == 0xE3069283  # the standard check value
  assert metrics.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4


def _masked(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(data):
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    (length_crc,) = struct.unpack_from("<I", data, pos + 8)
    assert length_crc == _masked(metrics.crc32c(data[pos:pos + 8]))
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
    assert payload_crc == _masked(metrics.crc32c(payload))
    yield payload
    pos += 16 + length


def _fields(message):
  """Protobuf wire format -> [(field number, value)], values raw bytes or ints."""
  pos, out = 0, []

  def varint():
    nonlocal pos
    shift = result = 0
    while True:
      byte = message[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return result
  while pos < len(message):
    key = varint()
    number, wire = key >> 3, key & 7
    if wire == 0:
      out.append((number, varint()))
    elif wire == 1:
      out.append((number, message[pos:pos + 8]))
      pos += 8
    elif wire == 5:
      out.append((number, message[pos:pos + 4]))
      pos += 4
    else:
      assert wire == 2, wire
      size = varint()
      out.append((number, message[pos:pos + size]))
      pos += size
  return out


def _decode_event(payload):
  event = {"scalars": {}}
  for number, value in _fields(payload):
    if number == 1:
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif number == 2:
      event["step"] = value
    elif number == 3:
      event["file_version"] = value.decode()
    elif number == 5:
      for _, summary_value in _fields(value):
        fields = dict(_fields(summary_value))
        event["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return event


def test_tensorboard_event_file_decodes(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
    writer.write(2, {"loss": jnp.float32(2.0), "grad_norm": float("nan")})
    writer.write(3_000_000_000, {"loss": 1.0})  # steps beyond 32 bits
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  with open(path, "rb") as f:
    events = [_decode_event(r) for r in _records(f.read())]
  assert events[0]["file_version"] == "brain.Event:2"
  assert [e.get("step", 0) for e in events] == [0, 1, 2, 3_000_000_000]
  assert events[1]["scalars"] == {"loss": 2.5, "lr": pytest.approx(1e-3)}
  assert events[2]["scalars"]["loss"] == 2.0 and np.isnan(events[2]["scalars"]["grad_norm"])
  assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)


def test_resume_forgets_what_was_logged_after_the_checkpoint(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    for step in (10, 20, 30):
      writer.write(step, {"loss": step / 10})
      writer.write_samples(step, [{"text": str(step)}])
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "lo')  # the previous session was killed mid-line
  with metrics.MetricWriter(tmp_path) as writer:  # the next session restored step 20
    writer.resume(20)
    writer.write(30, {"loss": 0.5})
  assert _read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 10, "loss": 1.0}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 0.5}]
  assert [r["step"] for r in _read_jsonl(tmp_path / "samples.jsonl")] == [10, 20]
  with open(writer.events_path, "rb") as f:
    records = list(_records(f.read()))
  start = dict(_fields(records[1]))
  assert start[2] == 21 and dict(_fields(start[7])) == {1: 1}  # session_log {status: START}


def test_tensorboard_reads_the_event_file(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  with metrics.MetricWriter(tmp_path) as writer:
    for step in range(3):
      writer.write(step, {"loss": 3.0 - step})
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert [(s.step, s.value) for s in accumulator.Scalars("loss")] == [(0, 3.0), (1, 2.0),
                                                                       (2, 1.0)]
  with metrics.MetricWriter(tmp_path) as writer:  # resumed from step 1: step 2 is logged anew
    writer.resume(1)
    writer.write(2, {"loss": 0.5})
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert [(s.step, s.value) for s in accumulator.Scalars("loss")] == [(0, 3.0), (1, 2.0),
                                                                       (2, 0.5)]


# --- Progress, check_finite, peak FLOP/s -----------------------------------------------------


def test_progress_line(monkeypatch):
  clock = iter([0.0, 2.0, 4.0, 5.0, 5.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  out = io.StringIO()
  progress = metrics.Progress(2000, tokens_per_step=4096, flops_per_token=1e6, peak_flops=1e12,
                              every=10, stream=out)
  assert not progress.due(15) and progress.update(15, {"loss": 9.0}) is None
  # 10 steps in 2 s: 20480 tok/s, MFU 1e6 * 20480 / 1e12, ETA 1990 steps at 5 steps/s.
  assert progress.update(10, {"loss": np.float32(2.3125), "lr": 0.1}) == (
      "step 10/2000 | loss 2.312 | 20.5k tok/s | MFU 2.0% | ETA 6m38s")
  # The second interval replaces the first (compilation): 10 steps/s.
  assert progress.update(30, {"loss": 2.0}) == (
      "step 30/2000 | loss 2 | 41.0k tok/s | MFU 4.1% | ETA 3m17s")
  # Then a moving average: 0.7 * 10 + 0.3 * 20 = 13 steps/s.
  assert progress.update(50) == "step 50/2000 | 81.9k tok/s | MFU 8.2% | ETA 2m30s"
  assert progress.update(2000, {"loss": 1.0}).endswith("loss 1")  # no rate at 0 s, no ETA
  assert out.getvalue().splitlines()[0].startswith("step 10/2000 | loss 2.312 | 20.5k tok/s")
  assert len(out.getvalue().splitlines()) == 4


def test_progress_without_flops_and_resumed(monkeypatch):
  clock = iter([100.0, 101.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(100, tokens_per_step=300, start_step=50, stream=io.StringIO())
  assert progress.update(60, {"loss": 1.5}) == "step 60/100 | loss 1.5 | 3.0k tok/s | ETA 4s"


def test_format_duration():
  seconds = (0, 45.4, 72, 3600 + 5 * 60, 3 * 86400 + 4 * 3600)
  assert [metrics.format_duration(s) for s in seconds] == ["0s", "45s", "1m12s", "1h05m", "3d04h"]


def test_check_finite_names_the_metrics_and_the_step_range():
  metrics.check_finite({"loss": 2.0, "grad_norm": np.array([1.0, 2.0])}, first_step=1, last_step=2)
  with pytest.raises(FloatingPointError, match=r"^loss is nan at steps 120-140; the last good "
                                               r"checkpoint is kept at /runs/pt/checkpoints/100\."):
    metrics.check_finite({"loss": jnp.float32(jnp.nan), "lr": 0.1}, first_step=120,
                         last_step=140, checkpoint="/runs/pt/checkpoints/100")
  with pytest.raises(FloatingPointError, match=r"^loss is nan/inf, grad_norm is -inf at step 7; "
                                               "no checkpoint was saved before it"):
    metrics.check_finite({"loss": np.array([np.nan, np.inf]), "grad_norm": -np.inf,
                          "count": np.int32(3)}, first_step=7, last_step=7)


class _FakeDevice:
  def __init__(self, kind, platform="gpu"):
    self.device_kind, self.platform = kind, platform


def test_peak_flops_per_device():
  assert metrics.peak_flops_per_device() is None  # the CPU has no meaningful peak
  table = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
           "NVIDIA A100-SXM4-80GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
           "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "Some future chip": None}
  for kind, flops in table.items():
    assert metrics.peak_flops_per_device(_FakeDevice(kind)) == flops, kind
