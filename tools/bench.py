r"""Pretraining step benchmark: tokens/s, step time, compile time, FLOPs and MFU, peak memory.

  python tools/bench.py --config=configs/pretrain.py:nanogpt_cpu
  python tools/bench.py --config=configs/pretrain.py:gpt2_124m --config.batch_size=16 --steps=50
  python tools/bench.py --config=configs/pretrain.py:cpu --config.steps_per_call=8 --vocab_size=2048

It runs the real train step of `experiments/pretrain.py` (same model, optimizer, sharding,
donation, gradient accumulation, steps per call) on synthetic token batches, so the figures
measure the model and the training core, not the input pipeline (`tools/bench_data.py`
measures that). The vocabulary is `--vocab_size` (the tokenizer would set it in a real run).

FLOPs per optimizer step are reported two ways (as MaxText does), with an MFU for each:

* model: `jaxlm.model.flops_per_token` x batch x seq_len, the PaLM formula (appendix B),
  causal: 6 N per token (N = the non-embedding parameters + one V x E matrix for the LM head)
  + 6 L H Dh T for attention's score and value matmuls over the lower triangle. This is the
  work the model needs, whatever the implementation: MFU by it compares across codebases.
* executed: the dot and convolution FLOPs of the compiled step as it runs, loop bodies (scanned
  layers, microbatches, steps per call) times their trip counts (`jaxlm.hlo_stats`; XLA's own
  `cost_analysis` counts a loop body once), x devices / steps per call. This is the work the
  hardware does: MFU by it (what PaLM calls HFU) says how busy the chips are. A kernel that
  XLA cannot see into and that declares no FLOPs (Pallas splash attention on TPU, cuDNN flash
  attention on GPU) is left out, and the output says so: executed is then a lower bound.

Executed exceeds model by: attention's masked half (XLA's dot attention computes the full
T x T scores and values, the formula counts the causal half: +6 L H Dh T per token; a kernel
that skips masked blocks executes less, down to the formula); rematerialisation (the backward
pass recomputes what `remat_policy` did not save: with `full` every block's forward again but
its last matmul, ~+2 N per token, with `dots_with_no_batch_dims_saveable` the attention
matmuls, +4 L H Dh T); replicated compute on a mesh (every device executes its program, a
tensor-parallel layout may repeat some). It is smaller by the parameters that take part in no
matmul (RMSNorm scales, counted in N: 6 x (2 L + 1) E per token, ~0.1%). Both count the LM
head's three matmuls (forward, its input's and its weight's gradient: 6 V E per token) and not
the input embedding (a gather) nor elementwise work (norms, softmax, the optimizer): a few
percent more that neither figure includes. E.g. `gpt2_124m` executes 7.9% more than its model
FLOPs (the masked half), `1b` 12.8% more (that and remat recomputing the attention matmuls).

The peak is `--peak_tflops` if given, else the device table in
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
from jaxlm import hlo_stats
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


def step_flops(compiled, model_config, config, num_devices: int) -> tuple[float, float, hlo_stats.HloStats]:
  """(model FLOPs per optimizer step, executed FLOPs per optimizer step, the program's HloStats).

  `compiled` is the jitted train step of `config.steps_per_call` optimizer steps, one SPMD
  program per device: executed per step = its executed FLOPs x devices / steps per call.
  """
  model = model_lib.flops_per_token(model_config, config.seq_len, causal=True) * config.batch_size * config.seq_len
  stats = hlo_stats.stats_of(compiled)
  return model, stats.flops * num_devices / config.steps_per_call, stats


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

  model_flops, executed_flops, stats = step_flops(compiled, model_config, config, jax.device_count())
  device = jax.devices()[0]
  if _PEAK.value:
    peak, peak_what = _PEAK.value * 1e12, "given"
  elif metrics_lib.peak_flops_per_device(device):
    peak, peak_what = metrics_lib.peak_flops_per_device(device), f"{device.device_kind} table"
  else:
    peak, peak_what = measured_matmul_flops(), "measured 2048^2 f32 matmul"
  memory_stats = getattr(device, "memory_stats", lambda: None)() or {}
  memory = (f"{memory_stats['peak_bytes_in_use'] / 2**30:.2f} GiB device" if "peak_bytes_in_use" in memory_stats else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS")
  mfu = lambda flops: f"{100 * flops / seconds / (peak * jax.device_count()):.1f}%"
  unknown = ([f"{stats.unknown_trip_counts} loops of unknown trip count"] if stats.unknown_trip_counts else []) + [
      f"{n} calls of {target} kernels without a FLOPs estimate" for target, n in stats.opaque_kernels.items()]
  lower_bound = f" (a lower bound: {'; '.join(unknown)} left out)" if unknown else ""
  print(f"preset {config.preset}: {model_lib.num_params(model_config):,} params, batch {config.batch_size} x "
        f"{config.seq_len}, {jax.device_count()} x {device.device_kind}, steps_per_call {k}, "
        f"microbatches {config.num_microbatches}, dtype {model_config.dtype}, remat {model_config.remat_policy}")
  print(f"FLOPs per step: model {model_flops:.4g} (6N + causal attention), executed {executed_flops:.4g}"
        f"{lower_bound} ({100 * (executed_flops / model_flops - 1):+.1f}%)")
  print("| compile | step | tokens/s | MFU (model) | MFU (executed) | peak (per device) | memory |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {compile_s:.1f} s | {seconds * 1e3:.1f} ms | {tokens_per_s:,.0f} | {mfu(model_flops)} | "
        f"{mfu(executed_flops)} | {peak / 1e12:.3g} TFLOP/s ({peak_what}) | {memory} |")
  del compiled


if __name__ == "__main__":
  app.run(errors.guard(main))
