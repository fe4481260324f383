"""The decoder-only transformer that every stage shares, with its scalar head and KV cache.

One `Transformer` serves pretraining, SFT, the reward model, PPO (policy and value) and DPO,
and the sampler calls the very same `__call__` with a cache, so sampled log-probs equal
teacher-forced log-probs.

Architecture (pre-norm, Llama-style)::

  x = embed[tokens]                                      [B, T, E]
  repeat num_layers:
    x = x + Attention(RMSNorm(x))    RoPE on q, k; grouped-query (num_kv_heads | num_heads)
    x = x + SwiGLU(RMSNorm(x))       down(silu(gate(x)) * up(x))
  h = RMSNorm(x)                                         (`hidden`)
  logits = h @ embed^T  (tied, default) or h @ lm_head   [B, T, V] float32
  scalar = h[b, scalar_index[b]] . w + b0                [B] float32 (reward model, PPO value)

Masking. Without a cache (training), a token attends to earlier-or-equal *indices* of its row
that carry the same segment id (`is_causal` plus a segment mask, which the cuDNN flash path
supports); packed documents never see each other. Padding (segment 0) attends only to padding,
so no query row is ever fully masked and nothing turns into NaN. `positions` (RoPE) restart at
0 per document; when omitted they are derived from `segment_ids`.
`branch_ids` narrow this further for rows that hold one prefix and several continuations of it
(DPO's prompt-shared pairs): a continuation sees the prefix and itself, never a sibling.

KV cache (sampling). A plain pytree of arrays, passed in and returned::

  k, v    [layers, B, num_kv_heads, S, head_dim]  (cache dtype, default: compute dtype)
  valid   [B, S] bool: slot s holds a real token

A token at absolute position p is written to slot p of its row, so slot index == position,
rows may sit at different positions, and left- or right-padded prompts both work. Tokens with
segment id 0 are not written. A query at position p attends to valid slots s <= p (its own
slot included: the writes happen before attention). T > 1 is a prefill, T == 1 a decode step.
One sequence per row: positions must not repeat within a row, and positions >= S are dropped.

The whole cache is carried through the layers (not scanned over) and each layer scatters its
keys/values into it, so a loop that carries it is updated in place. A kv head's slots are
contiguous: a decode step's attention is one matrix-vector product per (row, kv head) over the
cache as it lies. With `scan_layers=False`, k and v may be tuples of L buffers [B, Hkv, S, Dh]
(`init_cache(..., per_layer=True)`, what the sampler uses: slicing a layer out of a stacked
buffer is a copy on XLA:CPU).

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`, see
`jaxlm/sharding.py` for the vocabulary and the rules). With `scan_layers=True` (the default)
the tree is::

  embed/embedding          [V, E]             (vocab, embed)
  layers/attn_norm/scale   [L, E]             (layers, embed)
  layers/attn/q/kernel     [L, E, H, Dh]      (layers, embed, heads, kv)
  layers/attn/k/kernel     [L, E, Hkv, Dh]    (layers, embed, heads, kv)
  layers/attn/v/kernel     [L, E, Hkv, Dh]    (layers, embed, heads, kv)
  layers/attn/o/kernel     [L, H, Dh, E]      (layers, heads, kv, embed)
  layers/mlp_norm/scale    [L, E]             (layers, embed)
  layers/mlp/gate/kernel   [L, E, M]          (layers, embed, mlp)
  layers/mlp/up/kernel     [L, E, M]          (layers, embed, mlp)
  layers/mlp/down/kernel   [L, M, E]          (layers, mlp, embed)
  final_norm/scale         [E]                (embed,)
  lm_head/kernel           [E, V]             (embed, vocab)    only if tie_embeddings=False
  scalar_head/kernel       [E]                (embed,)          only if created (see below)
  scalar_head/bias         []                 ()

`scan_layers=False` has `layers_0`, `layers_1`, ... without the leading axis;
`param_tree.unstack_layers` / `param_tree.stack_layers` convert between the two.

Init scheme (GPT-2): every kernel and the embedding ~ normal(0.02); the residual-branch output
projections (attn/o, mlp/down) ~ normal(0.02 / sqrt(2 L)) so the residual stream's variance
does not grow with depth; RMSNorm scales 1; the scalar head 0 (a fresh reward/value head
starts at exactly 0 and learns from there).

A reward model or value model starts from an SFT (or pretraining) tree, which has no scalar
head: `params = add_scalar_head(params, config, rng)`. The LM-head weights (if untied) stay in
the tree unused; `apply(..., lm_head=False)` skips the logits.

Size presets live in `configs/common.py` (`MODEL_PRESETS`), with their parameter counts.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm import param_tree

Array = jax.Array

# Rematerialisation policies by name (`ModelConfig.remat_policy`), applied per block:
#   none                              keep every activation (fastest, most memory)
#   full                              keep only the block inputs; recompute the rest
#   dots_saveable                     keep matmul outputs, recompute elementwise ops
#   dots_with_no_batch_dims_saveable  keep projections' outputs, recompute attention scores too
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = (None, "xla", "cudnn", "blocked")
# Queries per block of the "blocked" attention; 64 was fastest on XLA:CPU at T = 128..192
# (32: within 5%; 96: 10% slower; one block of 192: 1.6x slower).
ATTENTION_BLOCK = 64

# Logical axis names of the cache arrays, for `jaxlm.sharding.logical_shardings`-style rules.
CACHE_AXES = {
    "k": ("layers", "batch", "heads", "length", "kv"),
    "v": ("layers", "batch", "heads", "length", "kv"),
    "valid": ("batch", "length"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the transformer; frozen (hashable) so jitted code can close over it.

  Attributes:
    vocab_size: V, set from the tokenizer.
    embed_dim: E, the residual stream width.
    num_layers: L.
    num_heads: H, query heads.
    num_kv_heads: Hkv, key/value heads; divides H (H == Hkv is plain multi-head attention).
    head_dim: Dh, even (RoPE rotates pairs).
    mlp_dim: M, the SwiGLU hidden width (~8/3 E keeps the parameter count of a 4E GELU MLP).
    max_len: the longest sequence trained or sampled; the default cache length. RoPE has no
      table, so this is a contract, not a buffer.
    tie_embeddings: the LM head reuses the token embedding (transposed).
    rope_theta: RoPE base; wavelengths span 2 pi .. 2 pi theta.
    norm_eps: RMSNorm epsilon.
    dtype: compute dtype, "float32" or "bfloat16". Parameters are always float32 and are cast
      at use; norms, RoPE, softmax, logits and the scalar head are computed in float32.
    remat_policy: one of `REMAT_POLICIES`.
    scan_layers: `nn.scan` over layers: compile time stays flat in depth; params get a leading
      `layers` axis.
    scan_unroll: layers per iteration of that scan (its `unroll`); it changes how the model
      runs, not its parameters. 1 keeps compile time flat in depth; `num_layers` unrolls the
      loop, which ran a 4-layer DPO step on XLA:CPU 1.0-1.3x faster (no slicing of stacked
      weights and activations per iteration) for a compile time that grows with depth.
    attention_impl: `jax.nn.dot_product_attention(implementation=...)`: None (XLA today), "xla",
      or "cudnn" (flash attention on NVIDIA GPUs; fp16/bf16 only, raises where unsupported);
      or "blocked": this module's causal attention in blocks of `ATTENTION_BLOCK` queries,
      which skips the blocks above the diagonal (exact; attention forward and backward 1.9x
      faster than "xla" on XLA:CPU at T = 192, a DPO step 1.2-1.4x), the choice of the `cpu`
      preset.
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_len", "scan_unroll"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} not in {sorted(DTYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} not in {ATTENTION_IMPLS}")

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (for config.json and the checkpoint's model description)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Inverse of `to_dict`. Unknown keys are an error: a model must never load half-read."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(known)}")
    return cls(**d)


def num_params(config: ModelConfig, *, include_embedding: bool = True,
               scalar_head: bool = False) -> int:
  """Exact parameter count of the tree that `init_params` creates.

  With `include_embedding=False` every [V, E] matrix (the token embedding, and the LM head when
  untied) is left out: the "non-embedding" count of Kaplan et al. (2020).
  """
  c = config
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o, k, v
  mlp = 3 * c.embed_dim * c.mlp_dim
  per_layer = attn + mlp + 2 * c.embed_dim  # + two RMSNorm scales
  total = c.num_layers * per_layer + c.embed_dim  # + final norm
  if include_embedding:
    total += c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  if scalar_head:
    total += c.embed_dim + 1
  return total


def flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Dh T.

  N counts every parameter that takes part in a matmul per token: the non-embedding parameters
  plus one V x E matrix for the LM head (tied or not; the input embedding is a gather and costs
  nothing). 12 L H Dh T is the attention score and value matmuls over a full T x T matrix, as
  PaLM counts it; `causal=True` halves it (a causal kernel skips the upper triangle), which is
  the honest number for flash attention. Norms and softmax are ignored. MFU = tokens/s *
  flops_per_token / peak FLOP/s.
  """
  c = config
  n = num_params(c, include_embedding=False) + c.vocab_size * c.embed_dim
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
  return 6.0 * n + (attention / 2 if causal else attention)


def _param(module: nn.Module, name: str, init, names: tuple[str | None, ...],
           shape: tuple[int, ...]) -> Array:
  """A float32 parameter carrying its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


class Dense(nn.Module):
  """x's last `in_dims` axes contracted with the first `in_dims` axes of a float32 kernel of
  shape `shape` and logical names `names`, ~ normal(std); the matmul runs in `dtype`."""

  shape: tuple[int, ...]
  names: tuple[str, ...]
  in_dims: int
  std: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", nn.initializers.normal(self.std), self.names, self.shape)
    return _flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)


def _flat_matmul(x: Array, kernel: Array, in_dims: int, **dot_kwargs) -> Array:
  """`jnp.tensordot(x, kernel, in_dims)` as one 2-D matmul [N, K] @ [K, M], reshaped back.

  The same products and sums; but the weight gradient then contracts one axis of N tokens
  instead of (B, T), and XLA:CPU no longer transposes activations to feed it: the SwiGLU MLP's
  forward and backward ran 1.6x faster at [32, 192, 128].
  """
  batch_shape, in_shape = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims:]
  out_shape = kernel.shape[in_dims:]
  flat = jnp.matmul(x.reshape(math.prod(batch_shape), math.prod(in_shape)),
                    kernel.reshape(math.prod(in_shape), math.prod(out_shape)), **dot_kwargs)
  return flat.reshape(batch_shape + out_shape)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in `dtype`."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, ("embed",), (x.shape[-1],))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float, table_len: int) -> tuple[Array, Array]:
  """sin, cos [B, T, Dh/2] float32 of angle p * theta^(-2i/Dh) for i < Dh/2.

  Looked up in a [table_len, Dh/2] table of every position rather than computed per token:
  XLA fuses an elementwise sin/cos into each of its consumers and recomputes it there, per
  head, in every layer, forward and backward (a tenth of a DPO step on XLA:CPU); a lookup is
  a load of the same angles. Positions outside [0, table_len) are clamped, so callers size the
  table to cover every real position (`Transformer` uses max(max_len, T, cache slots)).
  """
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(table_len, dtype=jnp.float32)[:, None] * inv_freq
  return (jnp.take(jnp.sin(angles), positions, axis=0, mode="clip"),
          jnp.take(jnp.cos(angles), positions, axis=0, mode="clip"))


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
  """Rotates the pairs (x[i], x[i + Dh/2]) of x [B, T, N, Dh] by the angles of `rope_tables`.

  Rotating q and k by their own positions makes q.k depend on the offset only.
  """
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optionally reading and writing a KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache, layer, write_slots):
    """x [B, T, E] -> ([B, T, E], the whole cache with layer `layer`'s keys/values written)."""
    c, dtype = self.config, self.config.compute_dtype
    qkv_names = ("embed", "heads", "kv")
    q = Dense((c.embed_dim, c.num_heads, c.head_dim), qkv_names, 1, 0.02, dtype, name="q")(x)
    k = Dense((c.embed_dim, c.num_kv_heads, c.head_dim), qkv_names, 1, 0.02, dtype, name="k")(x)
    v = Dense((c.embed_dim, c.num_kv_heads, c.head_dim), qkv_names, 1, 0.02, dtype, name="v")(x)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    activation_names = ("batch", "length", "heads", "kv")
    q = nn.with_logical_constraint(q, activation_names)
    k = nn.with_logical_constraint(k, activation_names)
    v = nn.with_logical_constraint(v, activation_names)

    if cache is None and c.attention_impl == "blocked":
      out = _blocked_causal_attention(q, k, v, mask)
    elif cache is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                         implementation=c.attention_impl)
    else:
      cache = _write_cache(cache, layer, write_slots, k, v)
      out = _cached_attention(q, cache, layer, mask)
    out = nn.with_logical_constraint(out, activation_names)
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    y = Dense((c.num_heads, c.head_dim, c.embed_dim), ("heads", "kv", "embed"), 2, out_std, dtype,
              name="o")(out)
    return y, cache


def _write_cache(cache, layer, write_slots, k, v):
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


def _softmax_attention(q: Array, k: Array, v: Array, mask: Array, *, kv_layout: str) -> Array:
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
  scores = jnp.einsum(f"{q_spec},{kv_layout}->{score_spec}", q, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(1 / math.sqrt(head_dim))
  # A large negative (not -inf) as jax does: never NaN.
  scores = jnp.where(score_mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"{score_spec},{kv_layout}->{q_spec}", probs, v)
  return out.reshape(batch, length, num_heads, head_dim)


def _blocked_causal_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """Causal attention computed per block of `ATTENTION_BLOCK` queries: [B, T, H, Dh].

  Query block [lo, hi) needs the keys [0, hi) only, so the blocks above the diagonal are never
  computed: with n blocks, (n + 1) / 2n of the full T x T scores (2/3 at n = 3). Exact: each
  block's softmax runs over all the keys its queries may see. q [B, T, H, Dh]; k, v
  [B, T, Hkv, Dh]; mask bool [B, 1, T, T] (segments, branches) or None, combined with
  causality.
  """
  length = q.shape[1]
  outputs = []
  for lo in range(0, length, ATTENTION_BLOCK):
    hi = min(lo + ATTENTION_BLOCK, length)
    block_mask = (jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :])[None, None]
    if mask is not None:
      block_mask = block_mask & mask[:, :, lo:hi, :hi]
    outputs.append(_softmax_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], block_mask, kv_layout="bskd"))
  return jnp.concatenate(outputs, axis=1)


def _cached_attention(q, cache, layer, mask):
  """softmax(q k^T / sqrt(Dh) + mask) v over the cache of layer `layer`: [B, T, H, Dh].

  `_softmax_attention` over the cache layout [B, Hkv, S, Dh] as it lies (mask [B, 1, T, S]),
  for any `attention_impl` (a flash kernel gains nothing at T = 1).
  """
  k, v = cache["k"][layer].astype(q.dtype), cache["v"][layer].astype(q.dtype)
  k = nn.with_logical_constraint(k, ("batch", "heads", "length", "kv"))
  v = nn.with_logical_constraint(v, ("batch", "heads", "length", "kv"))
  return _softmax_attention(q, k, v, mask, kv_layout="bksd")


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, dtype = self.config, self.config.compute_dtype
    shape, names = (c.embed_dim, c.mlp_dim), ("embed", "mlp")
    gate = Dense(shape, names, 1, 0.02, dtype, name="gate")(x)
    up = Dense(shape, names, 1, 0.02, dtype, name="up")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    return Dense((c.mlp_dim, c.embed_dim), ("mlp", "embed"), 1, out_std, dtype, name="down")(h)


class Block(nn.Module):
  """One pre-norm layer; carry (x [B, T, E], cache or None, layer index), for `nn.scan`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, carry, rope, mask, write_slots):
    c = self.config
    x, cache, layer = carry
    h = RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x)
    h, cache = Attention(c, name="attn")(h, rope, mask, cache, layer, write_slots)
    x = x + h
    x = x + Mlp(c, name="mlp")(RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, cache, layer + 1), None


def _block_class(config: ModelConfig) -> type[nn.Module]:
  """Block, wrapped in `nn.remat` with the configured policy and in `nn.scan` over layers."""
  block = Block
  if config.remat_policy != "none":
    # Under scan, CSE across iterations cannot undo the remat, so prevent_cse is not needed.
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat_policy],
                     prevent_cse=not config.scan_layers)
  if config.scan_layers:
    block = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                    length=config.num_layers, unroll=min(config.scan_unroll, config.num_layers),
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class Embed(nn.Module):
  """Token embedding [V, E]; `attend` is the tied LM head."""

  config: ModelConfig

  def setup(self):
    shape = (self.config.vocab_size, self.config.embed_dim)
    self.embedding = _param(self, "embedding", nn.initializers.normal(0.02), ("vocab", "embed"),
                            shape)

  def __call__(self, tokens: Array) -> Array:
    # Gather the FSDP shards of the table first (as for any weight before use): a lookup from a
    # table split along `embed` into activations split along `batch` has no efficient
    # partitioning, and XLA would replicate everything.
    table = nn.with_logical_constraint(self.embedding, ("vocab", None))
    # Ids must lie in [0, V): out-of-range ids gather NaN, which surfaces the bug in the loss.
    return jnp.take(table, tokens, axis=0).astype(self.config.compute_dtype)

  def attend(self, h: Array) -> Array:
    table = nn.with_logical_constraint(self.embedding, ("vocab", None)).astype(h.dtype)
    return _flat_matmul(h, table.T, 1, preferred_element_type=jnp.float32)


class LMHead(nn.Module):
  """Untied output projection [E, V]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    shape = (self.config.embed_dim, self.config.vocab_size)
    kernel = _param(self, "kernel", nn.initializers.normal(0.02), ("embed", "vocab"), shape)
    return _flat_matmul(h, kernel.astype(h.dtype), 1, preferred_element_type=jnp.float32)


class ScalarHead(nn.Module):
  """r = h . w + b in float32, zero-initialised; h [..., E] -> [...]."""

  @nn.compact
  def __call__(self, h: Array) -> Array:
    kernel = _param(self, "kernel", nn.initializers.zeros, ("embed",), (h.shape[-1],))
    bias = _param(self, "bias", nn.initializers.zeros, (), ())
    return h.astype(jnp.float32) @ kernel + bias


@flax.struct.dataclass
class ModelOutput:
  """What `Transformer.__call__` returns; fields not asked for are None.

  Attributes:
    logits: [B, T, V] float32, when `lm_head=True` ([B, S, V] with `logits_at`).
    scalar: [B] (or [B, K]) float32, when `scalar_index` is given.
    cache: the updated cache, when a cache is passed.
    hidden: [B, T, E] final-normed hidden state, compute dtype (what both heads read).
  """

  hidden: Array
  logits: Array | None = None
  scalar: Array | None = None
  cache: dict[str, Array] | None = None


def positions_from_segments(segment_ids: Array) -> Array:
  """Position of each token within its segment (a run of equal ids), restarting at 0.

  E.g. segment_ids [[1, 1, 1, 2, 2, 0]] -> positions [[0, 1, 2, 0, 1, 0]].
  """
  index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def init_cache(config: ModelConfig, batch: int, max_len: int | None = None,
               dtype: Any = None, per_layer: bool = False) -> dict[str, Any]:
  """An empty cache: k, v [L, B, Hkv, S, Dh] zeros and valid [B, S] False (S = max_len).

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


class Transformer(nn.Module):
  """The model of every stage. Use through `init`/`apply` (or `init_params`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, cache: dict[str, Array] | None = None,
               scalar_index: Array | None = None, lm_head: bool = True,
               branch_ids: Array | None = None, logits_at: Array | None = None) -> ModelOutput:
    """Runs the model over tokens [B, T].

    Args:
      tokens: int [B, T] token ids in [0, V).
      segment_ids: int [B, T]; tokens attend only within their segment; 0 marks padding.
        Default: all ones (one document per row).
      positions: int [B, T] RoPE positions. Default: `positions_from_segments(segment_ids)`.
        Required with a cache, where they are the absolute positions (= cache slots).
      cache: from `init_cache` or a previous call; see the module docstring.
      scalar_index: int [B] (or [B, K]) index into T where the scalar head reads `hidden`.
        Passing it at `init` creates the scalar head.
      lm_head: compute the logits. The matmul runs in the compute dtype with float32
        accumulation and output, so bf16 training still gets float32 logits.
      branch_ids: int [B, T], training only (no cache): several continuations of one prefix in
        one row. Branch 0 is shared (the prefix); a token of branch b > 0 attends to the shared
        tokens and to its own branch only, within its segment and causally by index, so a
        continuation never sees a sibling placed before it. Positions must then be given (a
        branch's positions continue from the end of the prefix). See `jaxlm/dpo.py`.
      logits_at: int [B, S] indices into T: compute the logits only at these positions
        ([B, S, V]); the LM head is then S / T of its full cost (DPO scores responses only).

    Returns:
      A `ModelOutput`.
    """
    c = self.config
    batch, length = tokens.shape
    if cache is not None and positions is None:
      raise ValueError("a cache needs explicit absolute positions")
    if branch_ids is not None and (cache is not None or positions is None):
      raise ValueError("branch_ids need explicit positions and no cache")
    if segment_ids is None and positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    elif positions is None:
      positions = positions_from_segments(segment_ids)
    positions = positions.astype(jnp.int32)

    embed = Embed(c, name="embed")
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
    num_slots = 0 if cache is None else cache["valid"].shape[1]
    rope = rope_tables(positions, c.head_dim, c.rope_theta, max(c.max_len, length, num_slots))
    if cache is None:
      layer_caches, write_slots = None, None
      mask = None
      if segment_ids is not None:
        mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
      if branch_ids is not None:
        key_branch, query_branch = branch_ids[:, None, None, :], branch_ids[:, None, :, None]
        same_branch = (key_branch == 0) | (key_branch == query_branch)
        mask = same_branch if mask is None else mask & same_branch
    else:
      layer_caches = {"k": cache["k"], "v": cache["v"]}
      if c.scan_layers and isinstance(cache["k"], tuple):
        raise ValueError("a per-layer cache (tuples of buffers) needs scan_layers=False")
      write_slots, valid, mask = _cache_mask(cache["valid"], positions, segment_ids)

    block = _block_class(c)
    if c.scan_layers:
      carry = (x, layer_caches, jnp.zeros((), jnp.int32))
      (x, new_caches, _), _ = block(c, name="layers")(carry, rope, mask, write_slots)
    else:
      carry = (x, layer_caches, 0)  # a static layer index: static slices of the cache
      for i in range(c.num_layers):
        carry, _ = block(c, name=f"layers_{i}")(carry, rope, mask, write_slots)
      x, new_caches, _ = carry

    hidden = RMSNorm(c.norm_eps, c.compute_dtype, name="final_norm")(x)
    out = ModelOutput(hidden=hidden)
    if lm_head:
      scored = hidden
      if logits_at is not None:
        scored = jnp.take_along_axis(hidden, logits_at[:, :, None].astype(jnp.int32), axis=1)
      logits = embed.attend(scored) if c.tie_embeddings else LMHead(c, name="lm_head")(scored)
      out = out.replace(logits=nn.with_logical_constraint(logits, ("batch", "length", "vocab")))
    if scalar_index is not None:
      index = scalar_index if scalar_index.ndim == 2 else scalar_index[:, None]
      picked = jnp.take_along_axis(hidden, index[:, :, None].astype(jnp.int32), axis=1)
      scalar = ScalarHead(name="scalar_head")(picked)
      out = out.replace(scalar=scalar if scalar_index.ndim == 2 else scalar[:, 0])
    if cache is not None:
      out = out.replace(cache={**new_caches, "valid": valid})
    return out


def _cache_mask(valid: Array, positions: Array, segment_ids: Array | None):
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


@functools.partial(jax.jit, static_argnums=0, static_argnames="scalar_head")
def init_params(config: ModelConfig, rng: Array, *, scalar_head: bool = False) -> dict:
  """Parameters with `nn.Partitioned` boxes (logical names); `sharding.unbox` for plain arrays.

  Jitted (eager init runs op by op, which is slow); cheap to `jax.eval_shape`, which is how the
  sharded state is planned, and fine to call inside `jax.jit(..., out_shardings=...)` (see
  jaxlm/sharding.py).
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  index = jnp.zeros((1,), jnp.int32) if scalar_head else None
  return Transformer(config).init(rng, tokens, scalar_index=index)["params"]


def add_scalar_head(params: dict, config: ModelConfig, rng: Array) -> dict:
  """A new tree: `params` (an LM tree, boxed or plain) plus a fresh, zero scalar head.

  This is how a reward model or a PPO value model starts from an SFT/pretraining checkpoint.
  """
  if "scalar_head" in params:
    raise ValueError("params already has a scalar_head")
  embed_dim = nn.meta.unbox(params["final_norm"]["scale"]).shape[-1]
  if embed_dim != config.embed_dim:
    raise ValueError(f"params have embed_dim {embed_dim}, config says {config.embed_dim}")
  head = ScalarHead().init(rng, jnp.zeros((embed_dim,), jnp.float32))["params"]
  return {**params, "scalar_head": head if param_tree.is_boxed(params) else nn.meta.unbox(head)}
