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

  Attention(x):
    q, k, v = x @ Wq (+ bq), x @ Wk (+ bk), x @ Wv (+ bv)    biases iff `qkv_bias` (Qwen2)
    q, k = RMSNorm_Dh(q), RMSNorm_Dh(k) per head             iff `qk_norm` (Qwen3)
    q, k = RoPE(q), RoPE(k)        frequencies rescaled as `rope_scaling` says (Llama 3.1+)
    out = softmax(q k^T / sqrt(Dh) + mask) v @ Wo            (no o bias)

These are the architectures of Hugging Face's Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5 and
Qwen3, with their roundings where jaxlm computes in a lower precision than float32: an RMSNorm
normalises in float32, rounds to the compute dtype, then multiplies by its scale in the compute
dtype (`RMSNorm`), and a biased projection adds its bias before its one rounding (`Dense`).
RoPE and the logits stay float32 (transformers rounds cos/sin and its bf16 logits), so a bf16
run differs from a bf16 transformers run by bf16 noise there; float32 runs agree to float32
noise. head_dim need not be E / H (Mistral Nemo), and V may exceed the tokenizer's vocabulary
(Qwen pads its embedding).

Attention (`jaxlm/attention.py`). Causal within segments: packed documents never see each
other, and padding (segment id 0) sees only padding. `positions` (RoPE) restart at 0 per
document; when omitted they are derived from `segment_ids`. `branch_ids` hold several
continuations of one prefix in a row (DPO). The kernel is `ModelConfig.attention_impl`: XLA,
blocked (CPU), cuDNN flash (GPU) or Pallas splash (TPU), or "auto" to pick per backend. The
sampler passes a KV cache (`init_cache`; layout in `jaxlm/attention.py`): k, v
[layers, B, Hkv, S, Dh] and valid [B, S], slot index == position.

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`, see
`jaxlm/sharding.py` for the vocabulary and the rules). With `scan_layers=True` (the default)
the tree is::

  embed/embedding          [V, E]             (vocab, embed)
  layers/attn_norm/scale   [L, E]             (layers, embed)
  layers/attn/q/kernel     [L, E, H, Dh]      (layers, embed, heads, kv)
  layers/attn/k/kernel     [L, E, Hkv, Dh]    (layers, embed, heads, kv)
  layers/attn/v/kernel     [L, E, Hkv, Dh]    (layers, embed, heads, kv)
  layers/attn/o/kernel     [L, H, Dh, E]      (layers, heads, kv, embed)
  layers/attn/q/bias       [L, H, Dh]         (layers, heads, kv)      only if qkv_bias
  layers/attn/k/bias       [L, Hkv, Dh]       (layers, heads, kv)      only if qkv_bias
  layers/attn/v/bias       [L, Hkv, Dh]       (layers, heads, kv)      only if qkv_bias
  layers/attn/q_norm/scale [L, Dh]            (layers, kv)             only if qk_norm
  layers/attn/k_norm/scale [L, Dh]            (layers, kv)             only if qk_norm
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
does not grow with depth; RMSNorm scales (the q/k norms' too) 1; q/k/v biases 0; the scalar
head 0 (a fresh reward/value head starts at exactly 0 and learns from there).

A reward model or value model starts from an SFT (or pretraining) tree, which has no scalar
head: `params = add_scalar_head(params, config, rng)`. The LM-head weights (if untied) stay in
the tree unused; `apply(..., lm_head=False)` skips the logits.

Size presets live in `configs/common.py` (`MODEL_PRESETS`), with their parameter counts.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm import attention
from jaxlm import param_tree
from jaxlm.model_config import DTYPES, REMAT_POLICIES, ModelConfig, flops_per_token, num_params  # re-exported

Array = jax.Array

# The configuration and its counts live in `jaxlm/model_config.py`, the KV cache with the
# attention kernels (`jaxlm/attention.py`); callers know them all as `model.<name>`.
CACHE_AXES = attention.CACHE_AXES
init_cache = attention.init_cache


def _param(module: nn.Module, name: str, init, names: tuple[str | None, ...],
           shape: tuple[int, ...]) -> Array:
  """A float32 parameter carrying its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


class Dense(nn.Module):
  """x's last `in_dims` axes contracted with the first `in_dims` axes of a float32 kernel of
  shape `shape` and logical names `names`, ~ normal(std); the matmul runs in `dtype`.

  With `bias`, plus a zero-initialised bias of the output shape `shape[in_dims:]` (names
  `names[in_dims:]`), added to the float32 accumulator before the one rounding to `dtype`, as
  torch's bf16 `nn.Linear` does (checked on CPU; cuBLAS adds it in the GEMM epilogue).
  """

  shape: tuple[int, ...]
  names: tuple[str, ...]
  in_dims: int
  std: float
  dtype: Any
  bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", nn.initializers.normal(self.std), self.names, self.shape)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if not self.bias:
      return _flat_matmul(x, kernel, self.in_dims)
    bias = _param(self, "bias", nn.initializers.zeros, self.names[self.in_dims:],
                  self.shape[self.in_dims:])
    # The bias in the compute dtype first: what a model holding its weights in that dtype adds.
    y = _flat_matmul(x, kernel, self.in_dims, preferred_element_type=jnp.float32)
    return (y + bias.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


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
  """y = round(x / sqrt(mean(x^2) + eps)) * round(scale) over the last axis, in `dtype`.

  The normalisation is computed in float32 and rounded to `dtype`, then multiplied by the scale
  (a float32 parameter of logical names `names`) rounded to `dtype`: Hugging Face's order
  (`weight * hidden.to(input_dtype)`), so a bf16 model rounds as a bf16 transformers model does.
  In float32 both roundings are no-ops.
  """

  eps: float
  dtype: Any
  names: tuple[str, ...] = ("embed",)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, self.names, (x.shape[-1],))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    # Rounded in float32 by reduce_precision, then cast (exactly): XLA may drop a cast pair
    # f32 -> bf16 -> f32 around the multiply (excess precision), never a reduce_precision.
    info = jnp.finfo(self.dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return x.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, optionally reading and writing a KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache, layer, write_slots):
    """x [B, T, E] -> ([B, T, E], the whole cache with layer `layer`'s keys/values written).

    `mask` is `attention.training_mask(...)` without a cache, the cache's [B, 1, T, S] with one.
    """
    c, dtype = self.config, self.config.compute_dtype
    qkv_names, bias = ("embed", "heads", "kv"), c.qkv_bias
    q = Dense((c.embed_dim, c.num_heads, c.head_dim), qkv_names, 1, 0.02, dtype, bias, name="q")(x)
    k = Dense((c.embed_dim, c.num_kv_heads, c.head_dim), qkv_names, 1, 0.02, dtype, bias,
              name="k")(x)
    v = Dense((c.embed_dim, c.num_kv_heads, c.head_dim), qkv_names, 1, 0.02, dtype, bias,
              name="v")(x)
    if c.qk_norm:  # each head's q and k over Dh, one scale shared by the heads; before RoPE
      q = RMSNorm(c.norm_eps, dtype, ("kv",), name="q_norm")(q)
      k = RMSNorm(c.norm_eps, dtype, ("kv",), name="k_norm")(k)
    q, k = attention.apply_rope(q, *rope), attention.apply_rope(k, *rope)
    activation_names = ("batch", "length", "heads", "kv")
    q = nn.with_logical_constraint(q, activation_names)
    k = nn.with_logical_constraint(k, activation_names)
    v = nn.with_logical_constraint(v, activation_names)

    if cache is None:  # `Transformer` has made attention_impl concrete (`attention.kernel_for`).
      out = attention.attend(q, k, v, mask, impl=c.attention_impl)
    else:
      cache = attention.write_cache(cache, layer, write_slots, k, v)
      out = attention.cached_attention(q, cache, layer, mask)
    out = nn.with_logical_constraint(out, activation_names)
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    y = Dense((c.num_heads, c.head_dim, c.embed_dim), ("heads", "kv", "embed"), 2, out_std, dtype,
              name="o")(out)
    return y, cache


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
  """Token embedding [V, E], float32; `copies` is what the lookup and the tied LM head read."""

  config: ModelConfig

  def setup(self):
    shape = (self.config.vocab_size, self.config.embed_dim)
    self.embedding = _param(self, "embedding", nn.initializers.normal(0.02), ("vocab", "embed"),
                            shape)

  def copies(self, batch: int) -> Array:
    """The table in the compute dtype, one whole copy per batch shard: [D, V, E].

    D is how many ways the mesh in context splits a batch of `batch` rows (1 without a mesh).
    Cast, then gather the FSDP shards (as any weight before use; a lookup from a table split
    along `embed` into activations split along `batch` has no efficient partitioning): in bf16
    the all-gather moves half the bytes of float32. Each batch shard then reads its own copy
    (`_per_copy`) for both uses, the lookup and the tied head, so under AD their gradients add
    up in that copy and reach the float32 shards through one reduction over the D copies, in
    the compute dtype as every other weight's. One replicated [V, E] read by both uses left
    the partitioner two partial gradients to reduce (XLA:CPU: two float32 all-reduces; XLA:TPU
    reassociated them into one, in float32).
    """
    shards = _batch_shards()
    shards = shards if batch % shards == 0 else 1
    # Cast where the shards lie (else XLA may gather float32 and cast after); the copies'
    # sharding then gathers the cast table.
    table = nn.with_logical_constraint(self.embedding.astype(self.config.compute_dtype),
                                       ("vocab", "embed"))
    copies = jnp.broadcast_to(table, (shards, *table.shape))
    return nn.with_logical_constraint(copies, ("batch" if shards > 1 else None, "vocab", None))


def _batch_shards() -> int:
  """How many ways the mesh and logical rules in context split `batch` (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("batch",))[0] or ()
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _per_copy(fn, copies: Array, x: Array) -> Array:
  """fn(copy [V, E], rows [B / D, ...]) for each batch shard's rows of x [B, ...] and its own
  copy of the table (`Embed.copies` [D, V, E]): a batched op the partitioner keeps local."""
  shards, batch = copies.shape[0], x.shape[0]
  out = jax.vmap(fn)(copies, x.reshape(shards, batch // shards, *x.shape[1:]))
  return out.reshape(batch, *out.shape[2:])


@jax.custom_vjp
def _lookup(table: Array, tokens: Array) -> Array:
  """table[tokens]: [..., E]. Ids must lie in [0, V): out-of-range ids gather NaN, which
  surfaces the bug in the loss."""
  return jnp.take(table, tokens, axis=0)


def _lookup_fwd(table, tokens):
  return _lookup(table, tokens), (table, tokens)


def _lookup_bwd(residuals, grad):
  # Summed in float32: a frequent token's row adds up thousands of gradients, which a bf16
  # scatter-add would round at every step. One rounding to the table's dtype at the end.
  table, tokens = residuals
  rows = jnp.zeros(table.shape, jnp.float32).at[tokens].add(grad.astype(jnp.float32))
  return rows.astype(table.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _tied_logits(table: Array, h: Array) -> Array:
  """h [..., E] @ table^T in h's dtype, float32 accumulation and output: [..., V]."""
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

    tables = Embed(c, name="embed").copies(batch)
    x = nn.with_logical_constraint(_per_copy(_lookup, tables, tokens), ("batch", "length", "embed"))
    num_slots = 0 if cache is None else cache["valid"].shape[1]
    rope = attention.rope_tables(positions, c.head_dim, c.rope_theta,
                                 max(c.max_len, length, num_slots), c.rope_scaling)
    if cache is None:
      layer_caches, write_slots = None, None
      # The kernel for this call ("auto" resolved, fallbacks applied), seen by every layer.
      c = c.replace(attention_impl=attention.kernel_for(
          c.attention_impl, dtype=c.compute_dtype, segments=segment_ids is not None,
          branches=branch_ids is not None))
      mask = attention.training_mask(c.attention_impl, segment_ids, branch_ids)
    else:
      layer_caches = {"k": cache["k"], "v": cache["v"]}
      if c.scan_layers and isinstance(cache["k"], tuple):
        raise ValueError("a per-layer cache (tuples of buffers) needs scan_layers=False")
      write_slots, valid, mask = attention.cache_mask(cache["valid"], positions, segment_ids)

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
      if c.tie_embeddings:
        logits = _per_copy(_tied_logits, tables, scored)
      else:
        logits = LMHead(c, name="lm_head")(scored)
      out = out.replace(logits=nn.with_logical_constraint(logits, ("batch", "length", "vocab")))
    if scalar_index is not None:
      index = scalar_index if scalar_index.ndim == 2 else scalar_index[:, None]
      picked = jnp.take_along_axis(hidden, index[:, :, None].astype(jnp.int32), axis=1)
      scalar = ScalarHead(name="scalar_head")(picked)
      out = out.replace(scalar=scalar if scalar_index.ndim == 2 else scalar[:, 0])
    if cache is not None:
      out = out.replace(cache={**new_caches, "valid": valid})
    return out


@functools.partial(jax.jit, static_argnums=0, static_argnames="scalar_head")
def init_params(config: ModelConfig, rng: Array, *, scalar_head: bool = False) -> dict:
  """Parameters with `nn.Partitioned` boxes (logical names); `sharding.unbox` for plain arrays.

  Jitted (eager init runs op by op, which is slow); cheap to `jax.eval_shape`, which is how the
  sharded state is planned, and fine to call inside `jax.jit(..., out_shardings=...)` (see
  jaxlm/sharding.py).
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  index = jnp.zeros((1,), jnp.int32) if scalar_head else None
  # The attention kernel has no parameters; XLA's traces a one-token row anywhere (a fused
  # kernel under a mesh in context would want the row split over the devices).
  return Transformer(config.replace(attention_impl="xla")).init(rng, tokens, scalar_index=index)["params"]


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
