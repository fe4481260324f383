r"""Sampler throughput: tokens/s of `jaxlm.sampling.generate`, and the memory roofline.

  python tools/bench_sampler.py                              # :cpu preset, batch 1 and 64
  python tools/bench_sampler.py --preset=gpt2_124m --batch_sizes=1,64,256     # on a GPU
  /tmp/hfenv/bin/python tools/bench_hf_generate.py           # the reference: HF `generate`

What is timed: `generate` with the preset's model (random weights, vocab `--vocab_size`) on
`batch` prompts of `--prompt_len` random ids, `--new_tokens` new tokens per row sampled at
temperature 1 from the full softmax, no stop ids (every row runs to the end). One untimed call
per shape compiles (`compile_s`); then the best of `--repeats` calls:

  total_s       one whole call: prefill + N sampled tokens (N - 1 decode steps)
  prefill_s     a call with one new token: prefill + the first sample
  tokens_per_s  batch * N / total_s
  decode_tokens_per_s   batch * (N - 1) / (total_s - prefill_s)

`tools/bench_hf_generate.py` prints the same fields for Hugging Face transformers'
`LlamaForCausalLM.generate` on a model of the same shape (see its docstring for how the
comparison is kept fair). Run both on the same, otherwise idle machine.

CPU cores. XLA:CPU runs each op of a program this small on one thread, so one JAX device
uses about one core, where torch spreads each matmul over its `--threads`. `--cpu_devices=N`
(default: the number of cores) splits the CPU into N JAX devices
(`--xla_force_host_platform_device_count`) and runs a batch that N divides data-parallel on a
mesh of them (`generate(mesh=...)`, one device per core); a batch of 1 runs on one device.
Same cores, same work: N = torch's `--threads` (both default to the core count).
`--cpu_devices=1` shows what one device does.

Roofline (accelerators). A decode step at batch B must read every weight once and, per row,
the keys and values of its valid cache slots:

  bytes(t) = sum_w |w| * itemsize(w) + B * 2 L Hkv Dh (P + t) * itemsize(cache)

(matmul kernels and the embedding in the compute dtype, which `generate` casts them to before
its loop; norm scales in float32; P + t slots are valid at step t). The roofline time of the
decode is sum_t bytes(t) / HBM bandwidth, and `roofline_fraction` = roofline time / measured
decode time (`total_s - prefill_s`): 1.0 would be a decode limited by memory alone. The
bandwidth comes from `--hbm_gbps` or from `HBM_GBPS` by device kind; on a CPU (no entry) the
fraction is printed only with `--hbm_gbps`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="cpu")
  parser.add_argument("--vocab_size", type=int, default=0, help="0: the preset's")
  parser.add_argument("--dtype", default="", help="override the preset's compute dtype")
  parser.add_argument("--batch_sizes", default="1,64")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cpu_devices", type=int, default=os.cpu_count() or 1,
                      help="on a CPU, split it into this many JAX devices (default: one per "
                      "core; see the docstring)")
  parser.add_argument("--hbm_gbps", type=float, default=0.0,
                      help="memory bandwidth for the roofline (0: the device table)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse_args()
  if _ARGS.cpu_devices > 1:  # Before JAX starts: XLA reads the flag once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_ARGS.cpu_devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

# The repository root: jaxlm may not be installed, and configs/ is not a package of it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from jaxlm import errors  # noqa: E402
from jaxlm import model as model_lib  # noqa: E402
from jaxlm import sampling  # noqa: E402
from jaxlm import sharding  # noqa: E402

# Peak HBM bandwidth in GB/s by (a substring of) `device_kind`, lower-cased; first match wins.
HBM_GBPS = (
    ("h200", 4800.0), ("h100 pcie", 2000.0), ("h100", 3350.0), ("a100-sxm4-80gb", 2039.0),
    ("a100 80gb", 2039.0), ("a100", 1555.0), ("l40s", 864.0), ("l4", 300.0), ("a10", 600.0),
    ("v100", 900.0), ("tpu v6", 1640.0), ("tpu v5p", 2765.0), ("tpu v5", 819.0),
    ("tpu v4", 1228.0),
)


def hbm_bytes_per_second(device: jax.Device, given_gbps: float = 0.0) -> float | None:
  """Peak memory bandwidth of `device` in bytes/s: `given_gbps`, the table, or None."""
  if given_gbps:
    return given_gbps * 1e9
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  return next((gbps * 1e9 for name, gbps in HBM_GBPS if name in kind), None)


def decode_bytes(config: model_lib.ModelConfig, params, batch: int, prompt_len: int,
                 new_tokens: int) -> float:
  """Bytes that the N - 1 decode steps must read at the least (see the module docstring)."""
  compute = np.dtype(config.compute_dtype).itemsize

  def weight_bytes(path, leaf):
    name = path[-1].key
    return leaf.size * (compute if name in ("kernel", "embedding") else leaf.dtype.itemsize)

  weights = sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(weight_bytes, params)))
  per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * compute
  slots = sum(batch * (prompt_len + t) for t in range(1, new_tokens))
  return (new_tokens - 1) * weights + slots * per_slot


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    best = min(best, time.perf_counter() - start)
  return best


def bench(config: model_lib.ModelConfig, params, batch: int, args) -> dict:
  """Times `generate` at one batch size; returns the JSON-ready figures."""
  rng = np.random.default_rng(batch)
  prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len), dtype=np.int32)
  lengths = np.full((batch,), args.prompt_len, np.int32)
  n = args.new_tokens

  # Data parallel over the devices when the batch splits (a batch of 1 runs on one device).
  mesh = sharding.make_mesh({"data": -1}) if batch % jax.device_count() == 0 else None
  devices = jax.device_count() if mesh else 1
  if mesh:
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def run(new_tokens, seed):
    return sampling.generate(params, prompts, lengths, jax.random.key(seed), config=config,
                             sampling=sampling.SamplingConfig(), max_new_tokens=new_tokens,
                             mesh=mesh).tokens

  start = time.perf_counter()
  jax.block_until_ready(run(n, 0))
  compile_s = time.perf_counter() - start
  jax.block_until_ready(run(1, 0))
  total = _best_time(functools.partial(run, n), args.repeats)
  prefill = _best_time(functools.partial(run, 1), args.repeats)
  decode = total - prefill  # <= 0 only when the decode is too short to time
  out = {
      "impl": f"jaxlm {jax.devices()[0].device_kind} ({devices} device{'s' * (devices > 1)})",
      "batch": batch, "prompt_len": args.prompt_len, "new_tokens": n,
      "total_s": round(total, 4), "prefill_s": round(prefill, 4),
      "tokens_per_s": round(batch * n / total, 1),
      "decode_tokens_per_s": round(batch * (n - 1) / decode, 1) if decode > 0 else None,
      "compile_s": round(compile_s, 2),
  }
  bandwidth = hbm_bytes_per_second(jax.devices()[0], args.hbm_gbps)
  if bandwidth and decode > 0:
    moved = decode_bytes(config, params, batch, args.prompt_len, n)
    out.update(decode_gb=round(moved / 1e9, 3), hbm_gbps=bandwidth / 1e9,
               roofline_decode_tokens_per_s=round(batch * (n - 1) * bandwidth / moved, 1),
               roofline_fraction=round(moved / bandwidth / decode, 3))
  return out


def main(args):
  fields = dict(common.MODEL_PRESETS[args.preset])
  fields["vocab_size"] = args.vocab_size or fields["vocab_size"]
  if args.dtype:
    fields["dtype"] = args.dtype
  config = model_lib.ModelConfig(**fields)
  params = sharding.unbox(model_lib.init_params(config, jax.random.key(0)))
  print(f"# preset {args.preset}: {model_lib.num_params(config):,} params, "
        f"{json.dumps(fields)}", flush=True)
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    print(json.dumps(bench(config, params, batch, args)), flush=True)


if __name__ == "__main__":
  errors.guard(main)(_ARGS)
