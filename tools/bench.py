r"""Pretraining step benchmark: tokens/s, step time, compile time, MFU and peak memory.

  python tools/bench.py --config=configs/pretrain.py:nanogpt_cpu
  python tools/bench.py --config=configs/pretrain.py:gpt2_124m --config.batch_size=16 --steps=50
  python tools/bench.py --config=configs/pretrain.py:cpu --config.steps_per_call=8 --vocab_size=2048

It runs the real train step of `experiments/pretrain.py` (same model, optimizer, sharding,
donation, gradient accumulation, steps per call) on synthetic token batches, so the figures
measure the model and the training core, not the input pipeline (`tools/bench_data.py`
measures that). The vocabulary is `--vocab_size` (the tokenizer would set it in a real run).

MFU = tokens/s x training FLOPs per token (`jaxlm.model.flops_per_token`, PaLM formula, causal)
/ peak FLOP/s. The peak is `--peak_tflops` if given, else the device table in
`jaxlm.metrics.peak_flops_per_device` (GPUs, TPUs: dense bf16); on a CPU, which has no table
entry, it is the measured float32 FLOP/s of a large matmul (stated in the output), so CPU MFU
says how close the step comes to what this CPU does on the best-case kernel.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

# The repository root: `configs/*.py` import `configs.common`, and jaxlm may not be installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors
from jaxlm import losses
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import stage
from jaxlm import training

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:cpu", "Stage config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer steps timed (after 2 warm-up calls).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the config's tokenizer.vocab_size).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: table or measured).")


def measured_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of an n x n float32 matmul: what this device reaches on the kindest kernel."""
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    y = matmul(x)
  y.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def synthetic_batch(rng: np.random.Generator, rows: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  tokens = rng.integers(8, vocab, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length), bool),
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  mesh = stage.setup_mesh(config.mesh)
  vocab = _VOCAB.value or config.tokenizer.vocab_size
  model_config = stage.model_config(config.model, vocab_size=vocab)
  init_fn = functools.partial(model_lib.init_params, model_config)
  abstract = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
  tx, schedule = training.make_optimizer(**config.optimizer, total_steps=config.total_steps, params=abstract)
  state, shardings = training.create_train_state(init_fn, tx, jax.random.key(0), mesh)
  k = config.steps_per_call
  step = training.make_train_step(losses.lm_loss_fn(model_lib.Transformer(model_config)), tx, mesh=mesh,
                                  state_shardings=shardings, schedule_fn=schedule,
                                  num_microbatches=config.num_microbatches, steps_per_call=k)
  rng = np.random.default_rng(0)
  rows = stage.per_host_batch_size(config.batch_size)

  def next_batch():
    batches = [synthetic_batch(rng, rows, config.seq_len, vocab) for _ in range(k)]
    return training.shard_batch(batches[0] if k == 1 else batches, mesh, steps_per_call=k)

  batch = next_batch()
  start = time.perf_counter()
  compiled = step.jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(2):  # Warm-up: first-call allocations.
    state, metrics = step(state, next_batch())
  jax.block_until_ready(metrics)
  calls = max(1, _STEPS.value // k)
  batches = [next_batch() for _ in range(calls)]
  start = time.perf_counter()
  for b in batches:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / (calls * k)
  tokens_per_s = config.batch_size * config.seq_len / seconds

  flops = model_lib.flops_per_token(model_config, config.seq_len, causal=True)
  device = jax.devices()[0]
  if _PEAK.value:
    peak, peak_what = _PEAK.value * 1e12, "given"
  elif metrics_lib.peak_flops_per_device(device):
    peak, peak_what = metrics_lib.peak_flops_per_device(device), f"{device.device_kind} table"
  else:
    peak, peak_what = measured_matmul_flops(), "measured 2048^2 f32 matmul"
  stats = getattr(device, "memory_stats", lambda: None)() or {}
  memory = (f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device" if "peak_bytes_in_use" in stats else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS")
  print(f"preset {config.preset}: {model_lib.num_params(model_config):,} params, batch {config.batch_size} x "
        f"{config.seq_len}, {jax.device_count()} x {device.device_kind}, steps_per_call {k}, "
        f"microbatches {config.num_microbatches}, dtype {model_config.dtype}")
  print(f"| compile | step | tokens/s | MFU | peak (per device) | memory |")
  print(f"|---|---|---|---|---|---|")
  print(f"| {compile_s:.1f} s | {seconds * 1e3:.1f} ms | {tokens_per_s:,.0f} | "
        f"{100 * tokens_per_s * flops / (peak * jax.device_count()):.1f}% | {peak / 1e12:.3g} TFLOP/s ({peak_what}) | "
        f"{memory} |")
  del compiled


if __name__ == "__main__":
  app.run(errors.guard(main))
