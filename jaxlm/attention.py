"""How tokens attend: rotary positions, masks, one attention kernel per backend, the KV cache.

`jaxlm.model.Attention` projects q, k, v and rotates q and k (`apply_rope`); this module computes

  out = softmax(q k^T / sqrt(Dh) + mask) v       [B, T, H, Dh]

from q [B, T, H, Dh] and k, v [B, S, Hkv, Dh], with grouped-query heads (Hkv | H: query head n
reads kv head n // (H / Hkv)).

Masking without a cache (training, scoring). Query i of a row may see key j of the same row iff

  j <= i   and   seg[j] == seg[i]   and   (branch[j] == 0 or branch[j] == branch[i])

Segment ids (default: all ones) keep packed documents apart; padding (segment 0) attends only to
padding, so no query row is ever empty and nothing turns into NaN. Branch ids hold several
continuations of one prefix in a row (DPO's prompt-shared pairs, `jaxlm/dpo.py`): branch 0 is
the shared prefix, and a continuation never sees a sibling placed before it.

Kernels (`ModelConfig.attention_impl`):

  ========  =====================================================================================
  xla       (or None) `jax.nn.dot_product_attention`'s XLA path over a dense bool mask
            [B, 1, T, T]: any backend, any mask; materialises [B, H, T, T] float32 scores.
  blocked   the XLA arithmetic per block of `BLOCK` queries, skipping the blocks above the
            diagonal (exact; 1.9x faster than xla on XLA:CPU at T = 192; the `cpu` preset's).
  cudnn     cuDNN flash attention (NVIDIA GPUs; bf16/fp16 only, jax raises otherwise): causal
            natively; segment ids as cuDNN's packed layout, where each run of equal ids is one
            sequence (`cudnn_segments`; Hopper or newer, at most `cudnn_max_segments(T)` runs a row).
  splash    the Pallas splash-attention kernel (TPUs): a static causal block mask plus segment ids,
            blocks above the diagonal skipped; runs in Pallas interpret mode off TPU (tests).
  auto      per backend (`resolve`): cudnn on NVIDIA GPUs for bf16/fp16, splash on TPUs, xla
            elsewhere.
  ========  =====================================================================================

Where the fused kernels agree with xla: splash everywhere (its segment mask is the same
equality); cudnn at every token whose segment id occupies one run of the row, i.e. every real
token of the pipelines' layouts (a row padded on both sides has two padding runs, which then
attend within their own run; nothing reads padding outputs). What a fused kernel cannot express
runs the XLA path instead, decided at trace time by `kernel_for`: branch ids (a mask that is
neither causal-with-segments nor static), and segment ids on a GPU older than Hopper (cudnn).

KV cache (sampling). A plain pytree of arrays, passed in and returned::

  k, v    [layers, B, num_kv_heads, S, head_dim]  (cache dtype, default: compute dtype)
  valid   [B, S] bool: slot s holds a real token

A token at absolute position p is written to slot p of its row, so slot index == position,
rows may sit at different positions, and left- or right-padded prompts both work. Tokens with
segment id 0 are not written. A query at position p attends to valid slots s <= p (its own
slot included: the writes happen before attention). T > 1 is a prefill, T == 1 a decode step.
One sequence per row: positions must not repeat within a row, and positions >= S are dropped.
Cached attention always runs `softmax_attention` (a flash kernel gains nothing at T = 1).

The whole cache is carried through the layers (not scanned over) and each layer scatters its
keys/values into it, so a loop that carries it is updated in place. A kv head's slots are
contiguous: a decode step's attention is one matrix-vector product per (row, kv head) over the
cache as it lies. With `scan_layers=False`, k and v may be tuples of L buffers [B, Hkv, S, Dh]
(`init_cache(..., per_layer=True)`, what the sampler uses: slicing a layer out of a stacked
buffer is a copy on XLA:CPU).
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
# cuDNN's packed (segment) layout is reachable only here: jax.nn.dot_product_attention takes
# sequence lengths, not segments.
from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib

Array = jax.Array

IMPLS = (None, "xla", "blocked", "cudnn", "splash", "auto")
# Queries per block of "blocked"; 64 was fastest on XLA:CPU at T = 128..192
# (32: within 5%; 96: 10% slower; one block of 192: 1.6x slower).
BLOCK = 64
# Runs of equal segment ids per row that the cudnn path holds: max(32, T / 8), i.e. documents of
# 8 tokens on average still fit (short blank-line blocks of a text corpus pack ~30 a 1024-token
# row). Static, and not free: cuDNN keeps softmax statistics [B * M, H, T] float32 for the
# backward pass (B H T^2 / 2 bytes at M = T / 8: 50 MB for 8 rows of gpt2_124m), and launches
# work for every slot. A row with more runs gets NaN outputs, so the run stops on a non-finite
# loss instead of letting documents see each other; pack fewer documents per row then.
CUDNN_MIN_SEGMENTS = 32
CUDNN_TOKENS_PER_SEGMENT = 8


def cudnn_max_segments(length: int) -> int:
  """M, the runs per row of `length` tokens that the cudnn path holds (see above)."""
  return max(CUDNN_MIN_SEGMENTS, length // CUDNN_TOKENS_PER_SEGMENT)
# Splash blocks: the largest of these that divides T. T is padded to a multiple of 128 (the TPU
# lane width, the kernel's smallest block) at the end of each row, which causality hides from
# every real query.
SPLASH_BLOCKS = (512, 256, 128)

# Logical axis names of the cache arrays, for `jaxlm.sharding.logical_shardings`-style rules.
CACHE_AXES = {
    "k": ("layers", "batch", "heads", "length", "kv"),
    "v": ("layers", "batch", "heads", "length", "kv"),
    "valid": ("batch", "length"),
}


# ---------------------------------------------------------------------------------------------
# Rotary positions (RoPE), applied to q and k by `jaxlm.model.Attention`.
# ---------------------------------------------------------------------------------------------


# RoPE scaling (`ModelConfig.rope_scaling`, Hugging Face's spelling): the keys each supported
# rope_type takes besides "rope_type" itself ("default" = no scaling). The other types (yarn,
# dynamic, longrope, ...) are refused: they change more than the frequencies (an attention scale,
# tables that depend on the sequence length).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """The inverse frequencies f_i [Dh/2] float32 of RoPE, i < Dh/2, as transformers computes them.

    default   f_i = 1 / theta^(2i / Dh)
    linear    f_i / factor                          (positions stretched `factor` times)
    llama3    (Llama 3.1+) by the wavelength w_i = 2 pi / f_i against L0 / high_freq_factor
              and L0 / low_freq_factor (L0 = original_max_position_embeddings):
                w_i < L0 / high:   f_i              (short wavelengths kept)
                w_i > L0 / low:    f_i / factor     (long ones stretched)
                otherwise          (1 - s) f_i / factor + s f_i
                                   with s = (L0 / w_i - low) / (high - low)

  `scaling`: None or the validated mapping (or items) of `ModelConfig.rope_scaling`. Computed here
  with numpy, once per trace: constants of the program, the same on every backend. The operations
  and their float32 roundings follow `transformers.modeling_rope_utils` (torch's `a / tensor` is
  `tensor.reciprocal() * a`), except the power, which is rounded once from float64: torch's
  float32 pow is not correctly rounded (Sleef on CPUs, its own on CUDA), so transformers' values
  themselves depend on the machine; on an AVX-512 CPU they are these but one ulp off in 0.4% of
  the entries of a sweep over head_dim 8..256 and theta 1e4..1e6 (none at Llama 3's 128, 5e5).
  """
  f32 = np.float32
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
  powers = np.power(np.float64(theta), exponents.astype(np.float64)).astype(f32)
  inv_freq = f32(1) / powers
  scaling = dict(scaling or ())
  kind = scaling.get("rope_type", "default")
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / f32(scaling["factor"])
  if kind != "llama3":
    raise ValueError(f"rope_type {kind!r} not in {['default', *ROPE_SCALING_KEYS]}")
  # Scalars are Python floats where transformers has them, rounded to float32 where they meet
  # a tensor (as torch does with a Python scalar).
  factor, low, high, old_len = (float(scaling[k]) for k in (
      "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
  low_wavelen, high_wavelen = f32(old_len / low), f32(old_len / high)
  wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
  stretched = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq)
  smooth = ((f32(1) / wavelen) * f32(old_len) - f32(low)) / f32(high - low)
  smoothed = (f32(1) - smooth) * stretched / f32(factor) + smooth * stretched
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, stretched).astype(f32)


def rope_tables(positions: Array, head_dim: int, theta: float, table_len: int,
                scaling=None) -> tuple[Array, Array]:
  """sin, cos [B, T, Dh/2] float32 of the angles p * f_i, f = `rope_frequencies(head_dim, theta,
  scaling)`.

  Looked up in a [table_len, Dh/2] table of every position rather than computed per token:
  XLA fuses an elementwise sin/cos into each of its consumers and recomputes it there, per
  head, in every layer, forward and backward (a tenth of a DPO step on XLA:CPU); a lookup is
  a load of the same angles. Positions outside [0, table_len) are clamped, so callers size the
  table to cover every real position (`Transformer` uses max(max_len, T, cache slots)).
  The angle is the float32 product p * f_i, as transformers rounds it.
  """
  inv_freq = jnp.asarray(rope_frequencies(head_dim, theta, scaling))
  angles = jnp.arange(table_len, dtype=jnp.float32)[:, None] * inv_freq
  return (jnp.take(jnp.sin(angles), positions, axis=0, mode="clip"),
          jnp.take(jnp.cos(angles), positions, axis=0, mode="clip"))


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
  """Rotates the pairs (x[i], x[i + Dh/2]) of x [B, T, N, Dh] by the angles of `rope_tables`.

  Rotating q and k by their own positions makes q.k depend on the offset only. This is
  transformers' `q * cos + rotate_half(q) * sin` (cos, sin repeated over both halves), computed
  in float32 and rounded once to x's dtype.
  """
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Choosing a kernel.
# ---------------------------------------------------------------------------------------------


def resolve(impl: str | None, platform: str, dtype: Any = None) -> str | None:
  """The implementation that `impl` stands for on `platform`: "auto" becomes concrete.

  Pure (no device is asked), so a program compiled for another target than the running backend
  (the planner compiles for a TPU on a CPU host) resolves for its target.

  Args:
    impl: one of `IMPLS`.
    platform: "cpu", "tpu", "gpu" or "cuda" (NVIDIA), "rocm" (AMD: no cuDNN).
    dtype: the compute dtype, when known: cuDNN flash attention takes bf16/fp16 only, so "auto"
      keeps a float32 model on the XLA path.

  >>> resolve("auto", "tpu"), resolve("auto", "gpu", jnp.float32), resolve("blocked", "tpu")
  ('splash', 'xla', 'blocked')
  """
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} not in {IMPLS}")
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "splash"
  half = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if platform in ("gpu", "cuda") and half else "xla"


def kernel_for(impl: str | None, *, dtype: Any, segments: bool, branches: bool) -> str:
  """The kernel a call without a cache runs: `impl` resolved for the running backend, with the
  fallbacks of the module docstring. One of "xla", "blocked", "cudnn", "splash"."""
  impl = resolve(impl, _running_platform(), dtype) or "xla"
  if impl in ("cudnn", "splash") and branches:
    return "xla"
  if impl == "cudnn" and segments and not _packed_cudnn_available():
    return "xla"
  return impl


def _running_platform() -> str:
  platform = jax.default_backend()
  if platform == "gpu" and "rocm" in jax.devices()[0].client.platform_version:
    return "rocm"
  return platform


def _packed_cudnn_available() -> bool:
  """cuDNN's packed layout needs Hopper (sm_90) or newer; assumed when no GPU runs here (a
  program lowered for a GPU target elsewhere)."""
  if jax.default_backend() != "gpu":
    return True
  return int(jax.devices()[0].compute_capability.split(".")[0]) >= 9


def training_mask(impl: str, segment_ids: Array | None, branch_ids: Array | None) -> Any:
  """What `attend` masks with for kernel `impl` (from `kernel_for`); built once per forward.

  xla, blocked: bool [B, 1, T, T] from segments and branches (causality is the kernel's), or None.
  splash: the segment ids [B, T], or None. cudnn: `cudnn_segments(segment_ids)`, or None.
  """
  if impl == "splash":
    return segment_ids
  if impl == "cudnn":
    return None if segment_ids is None else cudnn_segments(segment_ids, cudnn_max_segments(segment_ids.shape[1]))
  mask = None
  if segment_ids is not None:
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if branch_ids is not None:
    key_branch, query_branch = branch_ids[:, None, None, :], branch_ids[:, None, :, None]
    same_branch = (key_branch == 0) | (key_branch == query_branch)
    mask = same_branch if mask is None else mask & same_branch
  return mask


def attend(q: Array, k: Array, v: Array, mask: Any, *, impl: str) -> Array:
  """Causal attention without a cache: [B, T, H, Dh].

  q [B, T, H, Dh]; k, v [B, T, Hkv, Dh]; `impl` from `kernel_for`, `mask` from
  `training_mask(impl, ...)`.
  """
  if impl == "blocked":
    return blocked_attention(q, k, v, mask)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, mask)
  if impl == "splash":
    return splash_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


def softmax_attention(q: Array, k: Array, v: Array, mask: Array, *, kv_layout: str) -> Array:
  """softmax(q k^T / sqrt(Dh) where mask, else -big) v, grouped-query: [B, T, H, Dh].

  The arithmetic of `jax.nn.dot_product_attention`'s XLA path: float32 scores and softmax,
  probabilities cast to the value dtype. q [B, T, H, Dh]; k, v [B, S, Hkv, Dh]
  (`kv_layout="bskd"`, as projected) or [B, Hkv, S, Dh] ("bksd", as the cache lies); mask bool
  [B or 1, 1, T, S]. Without grouping (H == Hkv) the head axis is not split: on XLA:CPU the
  extra size-1 axis cost 20% of the attention's time.
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv = k.shape[kv_layout.index("k")]
  if num_heads == num_kv:
    q_spec, score_spec, score_mask = "btkd", "bkts", mask
  else:
    q = q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    q_spec, score_spec, score_mask = "btkgd", "bkgts", mask[:, :, None]
  scores = jnp.einsum(f"{q_spec},{kv_layout}->{score_spec}", q, k,
                      preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(1 / math.sqrt(head_dim))
  # A large negative (not -inf) as jax does: never NaN.
  scores = jnp.where(score_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"{score_spec},{kv_layout}->{q_spec}", probs, v)
  return out.reshape(batch, length, num_heads, head_dim)


def blocked_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """Causal attention computed per block of `BLOCK` queries: [B, T, H, Dh].

  Query block [lo, hi) needs the keys [0, hi) only, so the blocks above the diagonal are never
  computed: with n blocks, (n + 1) / 2n of the full T x T scores (2/3 at n = 3). Exact: each
  block's softmax runs over all the keys its queries may see. mask bool [B, 1, T, T] (segments,
  branches) or None, combined with causality.
  """
  length = q.shape[1]
  outputs = []
  for lo in range(0, length, BLOCK):
    hi = min(lo + BLOCK, length)
    block_mask = (jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :])[None, None]
    if mask is not None:
      block_mask = block_mask & mask[:, :, lo:hi, :hi]
    outputs.append(softmax_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], block_mask,
                                     kv_layout="bskd"))
  return jnp.concatenate(outputs, axis=1)


def cudnn_segments(segment_ids: Array, max_segments: int) -> tuple[Array, Array, Array]:
  """Segment ids [B, T] as cuDNN's packed layout, every run of equal ids one sequence.

  Returns (lengths [B, M], offsets [B, M + 1], overflow [B]) with M = `max_segments`: run m of
  row b is tokens offsets[b, m] .. offsets[b, m] + lengths[b, m] - 1; unused slots hold -1 (the
  `q_seqlen` / `q_offsets` convention of `fused_attention_stablehlo.dot_product_attention`);
  overflow[b] says row b has more than M runs.

  >>> lengths, offsets, overflow = cudnn_segments(jnp.array([[1, 1, 1, 2, 2, 0]]), 4)
  >>> lengths.tolist(), offsets.tolist(), overflow.tolist()
  ([[3, 2, 1, -1]], [[0, 3, 5, -1, -1]], [False])
  """
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # [B, T]: the run of each token
  count = run[:, -1] + 1
  lengths = jax.vmap(lambda r: jnp.zeros(max_segments, jnp.int32).at[r].add(1, mode="drop"))(run)
  offsets = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths  # where each run starts
  used = jnp.arange(max_segments)[None, :] < count[:, None]
  lengths, offsets = jnp.where(used, lengths, -1), jnp.where(used, offsets, -1)
  return lengths, jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1), count > max_segments


def cudnn_attention(q: Array, k: Array, v: Array,
                    packed: tuple[Array, Array, Array] | None) -> Array:
  """Causal cuDNN flash attention: [B, T, H, Dh]. `packed` from `cudnn_segments`, or None for
  one sequence per row (no segment ids). Rows that overflow the packed layout come out NaN."""
  if packed is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  lengths, offsets, overflow = packed
  out = cudnn_lib.dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
      scale=1 / math.sqrt(q.shape[-1]), mask_type=cudnn_lib.MaskType.PADDING_CAUSAL)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
  """Causal attention by the Pallas splash kernel: [B, T, H, Dh]; segment ids [B, T] or None.

  The kernel works on one example's heads [H, T, Dh] (vmapped over rows); it takes grouped kv
  heads as they are. Off TPU (by the platform the program is lowered for, so a TPU program
  compiled on a CPU host gets the real kernel) it runs in Pallas interpret mode.
  """
  def local(q, k, v, *segment_ids):
    length = q.shape[1]
    pad = -length % 128
    # The kernel does not scale: fold 1/sqrt(Dh) into q.
    q = q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
    heads_first = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    # Padding tokens get a segment of their own (-1): each sees at least itself.
    ids = tuple(jnp.pad(s, ((0, 0), (0, pad)), constant_values=-1) for s in segment_ids)
    def run(interpret, q, k, v, *ids):
      return _splash_kernel(q.shape[1], q.shape[2], interpret, bool(ids))(q, k, v, *ids)
    out = jax.lax.platform_dependent(heads_first(q), heads_first(k), heads_first(v), *ids,
                                     tpu=functools.partial(run, False),
                                     default=functools.partial(run, True))
    return jnp.swapaxes(out[:, :, :length], 1, 2)
  return _per_device(local, q, k, v, segment_ids)


def _splash_kernel(num_heads: int, length: int, interpret: bool, segmented: bool):
  """The splash kernel over rows: (q [B, H, T, Dh], k, v [B, Hkv, T, Dh][, segment ids [B, T]])
  -> [B, H, T, Dh]. Built per trace: its block-mask arrays are constants of the program (Pallas
  caches the numpy work behind them)."""
  # Deferred: Pallas is a quarter-second import that only this kernel needs.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  if not segmented:
    return jax.vmap(kernel)
  return jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(ids, ids)))


def _per_device(fn, q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
  """`fn(q, k, v[, segment_ids])` on each device's rows and heads (`jax.shard_map`) when a mesh
  is in context: a Pallas kernel is one opaque call that the partitioner would otherwise
  replicate. Splits follow the logical rules in context, as the activations' constraints do."""
  args = (q, k, v) + (() if segment_ids is None else (segment_ids,))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(f"splash attention needs whole sequences and heads on every device; the rules "
                     f"split q as {spec}: map `length` and `kv` to None")
  specs = (spec,) * 3 + (() if segment_ids is None else (jax.P(spec[0], None),))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)


# ---------------------------------------------------------------------------------------------
# The KV cache.
# ---------------------------------------------------------------------------------------------


def init_cache(config, batch: int, max_len: int | None = None, dtype: Any = None,
               per_layer: bool = False) -> dict[str, Any]:
  """An empty cache for a `ModelConfig`: k, v [L, B, Hkv, S, Dh] zeros and valid [B, S] False
  (S = max_len, default `config.max_len`).

  `per_layer=True` makes k and v tuples of L [B, Hkv, S, Dh] buffers (for
  `scan_layers=False` only; see the module docstring).
  """
  c = config
  shape = (c.num_layers, batch, c.num_kv_heads, max_len or c.max_len, c.head_dim)
  dtype = dtype or c.compute_dtype
  def zeros():
    if per_layer:
      return tuple(jnp.zeros(shape[1:], dtype) for _ in range(c.num_layers))
    return jnp.zeros(shape, dtype)
  return {"k": zeros(), "v": zeros(), "valid": jnp.zeros((batch, shape[3]), bool)}


def cache_mask(valid: Array, positions: Array,
               segment_ids: Array | None) -> tuple[Array, Array, Array]:
  """Cache slots to write [B, T], updated validity [B, S] and attention mask [B, 1, T, S]."""
  num_slots = valid.shape[1]
  real = jnp.ones(positions.shape, bool) if segment_ids is None else segment_ids != 0
  real = real & (positions >= 0) & (positions < num_slots)
  # Out-of-bounds slots are dropped by the scatter: padding never overwrites a real entry.
  write_slots = jnp.where(real, positions, num_slots)
  # Vmapped over rows (a batching dimension of the scatter: shard-local on a batch-split mesh).
  valid = jax.vmap(lambda row, slots: row.at[slots].set(True, mode="drop"))(valid, write_slots)
  slots = jnp.arange(num_slots)
  mask = valid[:, None, None, :] & (slots <= positions[:, None, :, None])
  mask &= real[:, None, :, None]
  # A padding query would see nothing; let it see everything so its (ignored) output stays
  # finite on every attention backend.
  mask |= ~jnp.any(mask, axis=-1, keepdims=True)
  return write_slots, valid, mask


def write_cache(cache: dict[str, Any], layer, write_slots: Array, k: Array,
                v: Array) -> dict[str, Any]:
  """Scatters k, v [B, T, Hkv, Dh] into slots `write_slots` [B, T] of layer `layer`.

  A padding token's slot is S (out of bounds): dropped. Vmapped over rows, so the batch is a
  batching dimension of the scatter and a batch-split cache is written shard-locally.
  """
  def write_row(buf, new, slots):  # new [T, Hkv, Dh], slots [T]
    new = new.astype(buf.dtype)
    if buf.ndim == 3:  # one layer: [Hkv, S, Dh]
      return buf.at[:, slots].set(jnp.swapaxes(new, 0, 1), mode="drop")
    # [L, Hkv, S, Dh]: the view buf[layer, :, slots] is [T, Hkv, Dh] (numpy puts advanced
    # indices separated by a slice first).
    return buf.at[layer, :, slots].set(new, mode="drop")

  def write(buf, new):
    if isinstance(buf, tuple):  # per-layer buffers; `layer` is a python int
      one = jax.vmap(write_row)(buf[layer], new, write_slots)
      return buf[:layer] + (one,) + buf[layer + 1:]
    return jax.vmap(write_row, in_axes=(1, 0, 0), out_axes=1)(buf, new, write_slots)
  return {"k": write(cache["k"], k), "v": write(cache["v"], v)}


def cached_attention(q: Array, cache: dict[str, Any], layer, mask: Array) -> Array:
  """softmax(q k^T / sqrt(Dh) + mask) v over the cache of layer `layer`: [B, T, H, Dh].

  `softmax_attention` over the cache layout [B, Hkv, S, Dh] as it lies (mask [B, 1, T, S]).
  """
  k, v = cache["k"][layer].astype(q.dtype), cache["v"][layer].astype(q.dtype)
  k = nn.with_logical_constraint(k, ("batch", "heads", "length", "kv"))
  v = nn.with_logical_constraint(v, ("batch", "heads", "length", "kv"))
  return softmax_attention(q, k, v, mask, kv_layout="bksd")
