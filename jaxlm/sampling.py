"""Generation with the KV cache: prefill the prompt once, then decode one token per step.

The sampler calls the same `Transformer.__call__` as training, with a cache (see the cache
layout in `jaxlm/model.py`), so what it computes is what the trainer computes: at temperature 1
without truncation, the `log_probs` it returns equal the teacher-forced log-probs of the training
forward pass on prompt + generation (`losses.token_log_probs`), which is what makes PPO rollouts
on-policy.

Prompts arrive right-padded (`prompt_tokens` [B, P], `prompt_lengths` [B]), as the prompts
pipeline makes them. Row b's prompt occupies cache slots 0 .. len_b - 1; its first new token
goes to slot len_b, so rows of different lengths decode side by side without left padding.
Padding tokens have segment id 0 and are never written to the cache. A row of length 0 is
batch padding: it emits nothing.

Sampling a token from logits z [V] (float32 throughout), in this order:

  1. temperature:  z' = z / T                                 (T > 0)
  2. top-k:        z'_v = -inf unless v is among the k largest z'  (k = 0: off)
  3. top-p:        sort the survivors by descending probability pi = softmax(z'); keep the
                   shortest prefix whose cumulative probability reaches p, i.e. keep token i
                   iff sum_{j ranked before i} pi_j < p  (p = 1: off; the top token always stays)
  4. draw y ~ softmax(z') by inverse transform (`inverse_cdf_draw`: the first y whose
     cumulative probability exceeds a uniform u), and report log softmax(z')_y: the log-prob
     under the distribution the token was actually drawn from (after temperature and
     truncation).

Greedy decoding takes argmax z instead and reports log softmax(z)_y (the untempered,
untruncated model log-prob; the log-prob of a point mass would be 0 and say nothing).

Randomness. Row b draws step t with the uniform (`row_uniforms`) of key `fold_in(k_b, t)`, where
k_b is row b's key:

* `rng` one key (the default): k_b = fold_in(rng, b) (`position_keys`), so a row's samples
  depend on (rng, b, its own logits) only, not on the batch size, the padding or the other
  rows; but they do depend on its position b.
* `rng` a [B] array of keys, one per row: k_b = rng[b], so a row's samples depend on its own
  key and logits only, wherever it sits. A caller that derives k_b from what the row is (its
  prompt's id and sample index: `jaxlm.rollout.collect_rollout(prompt_ids=...)`) gets the same
  samples whatever batch, position or padding the row is in. Passing `position_keys(rng, B)`
  is bit-for-bit the same as passing `rng`.

Decode loop (`generate`, one jitted program): a prefill writes the prompts into the cache and
samples token 0; then `lax.while_loop`s feed token t - 1 and sample token t, for t < N, until
every row is done (stopped, or padding) or N is reached; the outputs keep their [B, N] shape.
What makes a step cost what it must and no more:

* The cache is carried by the loop and written in place (a scatter of B x Hkv x Dh numbers per
  layer), never copied per step.
* Layers are unrolled for the decode (scanned params are unstacked once per call) and the
  cache is one buffer per layer: with `nn.scan`, every step would copy each layer's weights
  and cache out of the stacked arrays (XLA:CPU slices are copies).
* Phases: the decode is split into ceil((N - 1) / C) loops (C = `decode_chunk`); phase j's
  cache has only the P + (j + 1) C slots its steps can reach, so attention (the part of a step
  that grows with length) reads ~ (P + t + C / 2) slots at step t instead of P + N. Each phase
  is one more compiled loop body.
* One uniform per row and step, all drawn before the loop: the Gumbel trick needs V random
  numbers per row, which on a CPU cost more than the model's step.
* Matmul weights are cast to the compute dtype once (bf16 decode reads half the bytes), and
  the LM head is one [E, V] kernel made before the loop (`_decode_head`): a tied head read
  the embedding transposed, which XLA:CPU copied at every step (decode ~10% slower).

Shape buckets. One compilation per (B, P, N, config, sampling, stop_ids, mesh): `generate_padded`
takes python lists, pads the prompt width and the batch up to buckets (powers of two, or
multiples of a given size), and drops the padding rows, so a stream of differently-sized
requests compiles a handful of programs.

Sharding. With `mesh=...` the same program runs as training shards it: params keep their
training shardings on entry, and the FSDP shards are gathered once per call (a decode step
would otherwise all-gather every weight for one token); tensor parallelism stays (heads, MLP
and vocabulary over `tensor`). The batch and the cache are split over (data, fsdp), kv heads
over `tensor`, by the logical names of `jaxlm.sharding` (`rules`, default `DEFAULT_RULES`).
The cache writes are vmapped over rows, so they stay shard-local; inside the loop only
activations move (tensor-parallel all-reduces, the vocabulary-split softmax). Results equal
the one-device results (tested on 8 fake CPU devices).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from jaxlm import model as model_lib
from jaxlm import param_tree
from jaxlm import sharding

Array = jax.Array

# Slack for "cumulative probability reaches p": a float32 cumulative sum that should equal p
# exactly (probabilities [0.5, 0.3, ...] with p = 0.8) may land a few ulps below it, and must
# still count as reaching it.
_TOP_P_SLACK = 1e-6
# Block size of the blocked running sum in `inverse_cdf_draw`.
_CDF_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen; frozen (hashable) so it is a static argument of `generate`.

  Attributes:
    temperature: T > 0; logits are divided by it (ignored when greedy).
    top_k: keep the k largest logits (0: off). Exactly k survive: ties at the k-th value are
      broken towards the lower token id (the order `jax.lax.top_k` returns). k >= V is off.
    top_p: nucleus sampling, 0 < p <= 1 (1: off); see the module docstring.
    greedy: argmax decoding; temperature, top_k and top_p are then ignored.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 unless greedy, got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


@flax.struct.dataclass
class Generation:
  """What `generate` returns (N = max_new_tokens).

  Attributes:
    tokens: int32 [B, N], the generated ids; 0 where not emitted (after a row stopped).
    log_probs: float32 [B, N], log-prob of each emitted token under the distribution it was
      sampled from (after temperature and truncation; see the module docstring); 0 where not
      emitted.
    mask: bool [B, N], True where a token was emitted (the stop token included).
    lengths: int32 [B], the number of emitted tokens, = mask.sum(1).
  """

  tokens: Array
  log_probs: Array
  mask: Array
  lengths: Array


def truncate_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Top-k then top-p truncation: logits [..., V] float -> float32 [..., V], -inf where cut.

  Args:
    logits: [..., V], already divided by the temperature.
    top_k: keep exactly the k largest (ties broken towards the lower id); 0 or >= V: off.
    top_p: keep the shortest descending-probability prefix of the top-k survivors whose
      cumulative probability reaches p (renormalised over the survivors); 1: off.

  Returns:
    float32 [..., V]: the kept logits unchanged, every other entry -inf. At least one token
    (the most likely) is always kept.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    _, keep_ids = jax.lax.top_k(logits, top_k)  # [..., k]
    # Mark the k ids (not "logit >= k-th value", which would keep every tie and so > k).
    kept = jnp.any(keep_ids[..., :, None] == jnp.arange(vocab), axis=-2)
    logits = jnp.where(kept, logits, -jnp.inf)
  if top_p < 1.0:
    # Stable descending sort: equal logits keep id order, matching the top-k tie rule.
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The top token has mass_before 0 < p, so it always survives.
    kept_sorted = mass_before < top_p - _TOP_P_SLACK
    kept = jnp.put_along_axis(jnp.zeros_like(kept_sorted), order, kept_sorted, axis=-1,
                              inplace=False)
    logits = jnp.where(kept, logits, -jnp.inf)
  return logits


def sample_logits(logits: Array, keys: Array, sampling: SamplingConfig) -> tuple[Array, Array]:
  """One token per row and its log-prob under the distribution it was drawn from.

  Args:
    logits: [B, V] next-token logits (any float dtype; computed in float32).
    keys: [B] typed PRNG keys, one per row (unused when greedy).
    sampling: the `SamplingConfig`.

  Returns:
    tokens: int32 [B].
    log_probs: float32 [B]: log softmax(truncate(z / T))_y, or log softmax(z)_y when greedy.
  """
  uniform = None if sampling.greedy else row_uniforms(keys)
  return sample_with_uniforms(logits, uniform, sampling)


def row_uniforms(keys: Array) -> Array:
  """The uniform u ~ U[0, 1) of each row's draw: keys [...] -> float32 [...]."""
  uniform = lambda key: jax.random.uniform(key, (), jnp.float32)
  for _ in range(keys.ndim):
    uniform = jax.vmap(uniform)
  return uniform(keys)


def sample_with_uniforms(logits: Array, uniform: Array | None,
                         sampling: SamplingConfig) -> tuple[Array, Array]:
  """`sample_logits` given each row's uniform [B] (`row_uniforms` of its key; None if greedy).

  With m = max z and w = exp(z - m) (0 where truncated), log softmax(z)_y = z_y - m - log sum w,
  the same arithmetic as `jax.nn.log_softmax`, and w is all the draw needs.
  """
  logits = logits.astype(jnp.float32)
  if not sampling.greedy:
    logits = truncate_logits(logits / sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)
  if sampling.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    tokens = inverse_cdf_draw(weights, uniform)
  picked = jnp.take_along_axis(logits - peak, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - jnp.log(jnp.sum(weights, axis=-1))


def inverse_cdf_draw(weights: Array, uniform: Array, block: int = _CDF_BLOCK) -> Array:
  """Inverse-transform sampling: y = #{v : F_v <= u F_V}, so P(y = v) = w_v / sum(w).

  F is the running sum of the (unnormalised, non-negative) weights w [B, V] and u = uniform
  [B] in [0, 1); a token of weight 0 is never drawn. One uniform per row, where the Gumbel-max
  trick (`jax.random.categorical`) needs V: on a CPU those V random numbers per row cost more
  than the model's decode step. Two levels, because XLA's cumsum over a long axis is slow on a
  CPU: the running sum of the V / `block` block totals finds the block where F passes u F_V,
  and a running sum within that block finds the token. Float32; u has 2^-24 resolution.

  Returns:
    int32 [B].
  """
  batch, vocab = weights.shape
  padded = -(-vocab // block) * block
  blocks = jnp.pad(weights, ((0, 0), (0, padded - vocab))).reshape(batch, -1, block)
  totals = jnp.sum(blocks, axis=-1)  # [B, V / block]
  ends = jnp.cumsum(totals, axis=-1)  # F at the end of each block
  threshold = uniform * ends[:, -1]
  j = jnp.minimum(jnp.sum(ends <= threshold[:, None], axis=-1), totals.shape[1] - 1)
  before = jnp.take_along_axis(ends - totals, j[:, None], axis=-1)  # F before block j
  local = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, block]
  triangle = jnp.triu(jnp.ones((block, block), jnp.float32))
  running = before + jnp.dot(local, triangle, precision=jax.lax.Precision.HIGHEST)
  tokens = jnp.minimum(j * block + jnp.sum(running <= threshold[:, None], axis=-1), vocab - 1)

  def repair(tokens):
    # F need not be monotone to the last ulp, and u F_V may round up to F_V: the count can
    # then land on a token of weight 0 (log-prob -inf). Take the first token of positive
    # weight whose F passes the threshold instead (the heaviest if rounding leaves none).
    # Rare, so `cond` runs it only when needed.
    cdf = (jnp.einsum("bnj,jk->bnk", blocks, triangle, precision=jax.lax.Precision.HIGHEST)
           + (ends - totals)[:, :, None]).reshape(batch, padded)[:, :vocab]
    candidates = (cdf > threshold[:, None]) & (weights > 0)
    fixed = jnp.where(jnp.any(candidates, axis=-1), jnp.argmax(candidates, axis=-1),
                      jnp.argmax(weights, axis=-1))
    return jnp.where(picked > 0, tokens, fixed)

  picked = jnp.take_along_axis(weights, tokens[:, None], axis=-1)[:, 0]
  tokens = jax.lax.cond(jnp.all(picked > 0), lambda t: t, repair, tokens)
  return tokens.astype(jnp.int32)


def _phase_ends(max_new_tokens: int, decode_chunk: int) -> list[int]:
  """Last decode step of each phase: [C, 2C, ..., N - 1] (steps run 1 .. N - 1)."""
  return list(range(decode_chunk, max_new_tokens - 1, decode_chunk)) + [max_new_tokens - 1]


def _auto_chunk(max_new_tokens: int) -> int:
  """Default phase length: 4 phases, at least 32 steps each (fewer for short generations)."""
  return max(32, -(-(max_new_tokens - 1) // 4))


def _constrain(tree, names: dict):
  """`nn.with_logical_constraint` on each entry of a cache (a no-op without a mesh)."""
  def one(x, names):
    if isinstance(x, tuple):  # per-layer buffers: no `layers` axis
      return tuple(nn.with_logical_constraint(a, names[1:]) for a in x)
    return nn.with_logical_constraint(x, names)
  return {k: one(v, names[k]) for k, v in tree.items()}


def _grow_cache(cache: dict, slots: int) -> dict:
  """The cache with `slots` slots (the new ones empty): the next phase's buffer."""
  extra = slots - cache["valid"].shape[1]
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])
  grown = {"k": jax.tree.map(pad, cache["k"]), "v": jax.tree.map(pad, cache["v"]),
           "valid": jnp.pad(cache["valid"], ((0, 0), (0, extra)))}
  return _constrain(grown, model_lib.CACHE_AXES)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens", "stop_ids",
                                             "mesh", "rules", "decode_chunk"))
def _generate(params, prompt_tokens, prompt_lengths, rng, *, config, sampling, max_new_tokens,
              stop_ids, mesh, rules, decode_chunk):
  """`generate`'s compiled body. `rules` only keys the compilation cache: `generate` puts them
  (and the mesh) in context while this traces, which is what the model's constraints read."""
  del rules
  batch, prompt_len = prompt_tokens.shape
  n = max_new_tokens
  if mesh is not None:
    params = _gather_fsdp(params, config, mesh)
  if config.scan_layers:  # Decode with unrolled layers; see "Decode loop" in the docstring.
    params = param_tree.unstack_layers(params)
    config = config.replace(scan_layers=False)
  # No backward pass here, so nothing to rematerialise (and remat would trace the per-layer
  # cache's layer index, which must stay a python int).
  config = config.replace(remat_policy="none")
  params = _cast_matmul_weights(params, config.compute_dtype)
  model = model_lib.Transformer(config)
  apply = lambda tokens, **kw: model.apply({"params": params}, tokens, **kw)
  ends = _phase_ends(n, decode_chunk) if n > 1 else []
  prompt_lengths = prompt_lengths.astype(jnp.int32)

  # Prefill into the first phase's cache; the logits after each row's last real prompt token
  # predict its first new token.
  cache = model_lib.init_cache(config, batch, prompt_len + (ends[0] if ends else 0),
                               per_layer=True)
  cache = _constrain(cache, model_lib.CACHE_AXES)
  index = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  out = apply(prompt_tokens, segment_ids=(index < prompt_lengths[:, None]).astype(jnp.int32),
              positions=jnp.broadcast_to(index, (batch, prompt_len)), cache=cache, lm_head=False)
  hidden = jnp.take_along_axis(out.hidden, jnp.maximum(prompt_lengths - 1, 0)[:, None, None],
                               axis=1)
  head = _decode_head(params, config)

  def logits_of(h):
    """The LM head on one position per row: h [B, E] -> [B, V] float32."""
    logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "vocab"))

  last = logits_of(hidden[:, 0])

  stops = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  uniforms = None if sampling.greedy else _step_uniforms(rng, batch, n)

  def emit(state, logits):
    """Samples step t's token from `logits` [B, V] and records it (rows not done)."""
    t, done = state["t"], state["done"]
    uniform = None if uniforms is None else uniforms[t]
    token, log_prob = sample_with_uniforms(logits, uniform, sampling)
    token = jnp.where(done, 0, token)
    record = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, t, 0)
    return {**state, "token": token, "t": t + 1, "done": done | jnp.isin(token, stops),
            "tokens": record(state["tokens"], token),
            "log_probs": record(state["log_probs"], jnp.where(done, 0.0, log_prob)),
            "emitted": record(state["emitted"], ~done)}

  def step(state):
    """Feeds token t - 1 (at position len_b + t - 1) and samples token t."""
    live = (~state["done"])[:, None].astype(jnp.int32)  # A done row's token is not written.
    position = (prompt_lengths + state["t"] - 1)[:, None]
    out = apply(state["token"][:, None], segment_ids=live, positions=position,
                cache=state["cache"], lm_head=False)
    return emit({**state, "cache": out.cache}, logits_of(out.hidden[:, 0]))

  zeros = lambda dtype: nn.with_logical_constraint(jnp.zeros((n, batch), dtype), (None, "batch"))
  state = {"cache": out.cache, "token": jnp.zeros((batch,), jnp.int32),
           "t": jnp.zeros((), jnp.int32), "done": prompt_lengths <= 0,
           "tokens": zeros(jnp.int32), "log_probs": zeros(jnp.float32), "emitted": zeros(bool)}
  state = emit(state, last)
  for phase, end in enumerate(ends):
    if phase:  # Each phase attends over (and carries) only the slots it can have written.
      state["cache"] = _grow_cache(state["cache"], prompt_len + end)
    state = jax.lax.while_loop(
        lambda s, end=end: (s["t"] <= end) & ~jnp.all(s["done"]), step, state)
  emitted = state["emitted"].T
  return Generation(tokens=state["tokens"].T, log_probs=state["log_probs"].T, mask=emitted,
                    lengths=emitted.sum(axis=1).astype(jnp.int32))


def _decode_head(params, config: model_lib.ModelConfig) -> Array:
  """The LM head as an [E, V] kernel in the compute dtype, made once per call for the prefill's
  last position and every decode step (the prefill needs logits at one position per row, not
  at all P: the model's own head would be a V x E matmul per prompt token).

  A tied head reads the embedding [V, E] transposed; inside the loop XLA:CPU copied that
  transpose (1 MB at V 2048, E 128) at every step rather than once.
  """
  if config.tie_embeddings:
    kernel = params["embed"]["embedding"].T
  else:
    kernel = params["lm_head"]["kernel"]
  return nn.with_logical_constraint(kernel.astype(config.compute_dtype), ("embed", "vocab"))


def _cast_matmul_weights(params, dtype):
  """Kernels and the embedding in the compute dtype, once per call rather than per step.

  The model casts them at every use; casting first gives the same values, and a bf16 decode
  step then reads half the weight bytes. Norm scales (used in float32) are left alone.
  """
  def cast(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    matmul = names[-1] in ("kernel", "embedding") and "scalar_head" not in names
    return leaf.astype(dtype) if matmul else leaf
  if dtype == jnp.float32:
    return params
  return jax.tree_util.tree_map_with_path(cast, params)


def _is_typed_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_shape(rng) -> tuple[int, ...]:
  """The shape of the keys in `rng` (typed, raw uint32 [..., 2] key data, or abstract)."""
  if not hasattr(rng, "dtype"):
    rng = np.asarray(rng)
  return tuple(rng.shape) if _is_typed_key(rng) else tuple(rng.shape[:-1])


def position_keys(rng: Array, batch: int) -> Array:
  """[B] row keys `fold_in(rng, b)`: the keys `generate` gives its rows when `rng` is one key.

  `generate(..., position_keys(rng, B))` is bit-for-bit `generate(..., rng)`.
  """
  if not _is_typed_key(rng):
    rng = jax.random.wrap_key_data(rng)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch))


def _step_uniforms(rng: Array, batch: int, steps: int) -> Array:
  """float32 [N, B]: row b's uniform at step t, from `fold_in(k_b, t)` (k_b: row b's key, see
  Randomness in the module docstring; `rng` is one key or [B] row keys).

  Drawn for all steps at once, before the decode loop: one vectorised PRNG call instead of
  a few small ones per step (which cost as much as a batch-1 decode step on a CPU).
  """
  if not _is_typed_key(rng):
    rng = jax.random.wrap_key_data(rng)
  row_keys = rng if rng.ndim else position_keys(rng, batch)
  keys = jax.vmap(lambda t: jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t))(
      jnp.arange(steps))
  return nn.with_logical_constraint(row_uniforms(keys), (None, "batch"))


def _gather_fsdp(params, config: model_lib.ModelConfig, mesh: Mesh):
  """Params resharded without the `fsdp` split (kept on `tensor`): one all-gather per call.

  Training keeps each weight split over `fsdp` and gathers it before every use; a decode step
  would then gather every weight for a single token. Params whose tree is not the model's
  (unknown leaves) are left as they are.
  """
  abstract = jax.eval_shape(functools.partial(model_lib.init_params, config,
                                              scalar_head="scalar_head" in params),
                            jax.random.key(0))
  rules = nn.get_logical_axis_rules()
  rules = tuple((name, None if name == "embed" else axes) for name, axes in rules)
  try:
    shardings = sharding.logical_shardings(abstract, mesh, rules)
  except ValueError:
    return params
  if jax.tree.structure(shardings) != jax.tree.structure(params):
    return params
  return jax.lax.with_sharding_constraint(params, shardings)


def _batch_shards(mesh: Mesh | None, rules) -> int:
  """How many ways the rules split the batch over `mesh` (1 without a mesh)."""
  if mesh is None:
    return 1
  spec = sharding.batch_sharding(mesh, rules).spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def _hashable_rules(rules) -> tuple:
  return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in rules)


def generate(params, prompt_tokens: Array, prompt_lengths: Array, rng: Array, *,
             config: model_lib.ModelConfig, sampling: SamplingConfig, max_new_tokens: int,
             stop_ids: tuple[int, ...] = (), mesh: Mesh | None = None,
             rules: sharding.Rules = sharding.DEFAULT_RULES,
             decode_chunk: int | None = None) -> Generation:
  """Samples up to `max_new_tokens` tokens per prompt: one prefill, then `lax.while_loop`s.

  Compiled once per (B, P, config, sampling, max_new_tokens, stop_ids, mesh, rules,
  decode_chunk, one key or row keys); new prompts, lengths, params or rng of the same shapes
  reuse it
  (`generate_padded` buckets the shapes). The decode loop stops early once every row is done.

  Args:
    params: plain (unboxed) model params; with a mesh, sharded as training shards them.
    prompt_tokens: int [B, P], right-padded. With a mesh: global arrays, or host arrays that
      are the same on every process (they are placed with the mesh's batch sharding).
    prompt_lengths: int [B], the number of real tokens of each prompt (<= P). A row of length
      0 is empty: it emits nothing (batch padding).
    rng: a PRNG key (typed `jax.random.key` or raw uint32 [2]): row b's key is then
      `fold_in(rng, b)`; or one key per row (typed [B] or raw uint32 [B, 2]): row b's key is
      `rng[b]`, so its samples do not depend on its position (Randomness in the module
      docstring). With a mesh, row keys are split over the batch axes like the rows. Unused
      when greedy.
    config: the model config.
    sampling: the `SamplingConfig`.
    max_new_tokens: N >= 1, the most tokens per row. The cache holds P + N - 1 slots.
    stop_ids: a row stops after emitting one of these (a tuple).
    mesh: run sharded on this mesh (see the module docstring); None: the default device.
    rules: logical axis rules for the mesh (`jaxlm.sharding.DEFAULT_RULES`).
    decode_chunk: steps per decode phase (None: `_auto_chunk`); each phase's attention reads
      only the cache slots its steps can reach, at the price of one more compiled loop.

  Returns:
    A `Generation` with [B, N] tokens, log_probs, mask and [B] lengths.
  """
  return _run_generate(_generate, params, prompt_tokens, prompt_lengths, rng, config=config, sampling=sampling,
                       max_new_tokens=max_new_tokens, stop_ids=stop_ids, mesh=mesh, rules=rules,
                       decode_chunk=decode_chunk)


def lower_generate(params, prompt_tokens, prompt_lengths, rng, **kwargs):
  """`generate`'s program lowered, not run: the same arguments, abstract arrays allowed
  (`jax.ShapeDtypeStruct`s carrying their shardings). For the fit planner."""
  return _run_generate(_generate.lower, params, prompt_tokens, prompt_lengths, rng, **kwargs)


def _run_generate(call, params, prompt_tokens, prompt_lengths, rng, *, config, sampling, max_new_tokens,
                  stop_ids=(), mesh=None, rules=sharding.DEFAULT_RULES, decode_chunk=None):
  """`call(...)` (`_generate` or its `.lower`) with `generate`'s checks, static arguments and
  placement."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  kwargs = dict(config=config, sampling=sampling, max_new_tokens=int(max_new_tokens),
                stop_ids=tuple(int(s) for s in stop_ids), mesh=mesh,
                rules=_hashable_rules(rules) if mesh is not None else (),
                decode_chunk=int(decode_chunk or _auto_chunk(max_new_tokens)))
  batch = prompt_tokens.shape[0]
  keys = _key_shape(rng)
  if keys not in ((), (batch,)):
    raise ValueError(f"rng must be one key or {batch} row keys (one per prompt row), got keys of "
                     f"shape {keys}")
  if mesh is None:
    return call(params, prompt_tokens, prompt_lengths, rng, **kwargs)
  if batch % _batch_shards(mesh, rules):
    raise ValueError(f"batch {batch} does not split over the mesh's {_batch_shards(mesh, rules)}"
                     " batch shards; pad it (generate_padded does)")
  with sharding.use_mesh(mesh, rules):
    rows = sharding.batch_sharding(mesh, rules)

    def put(x):  # Host or one-device arrays onto the batch sharding; global arrays as they are.
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
      return x if isinstance(x, jax.Array) and len(x.devices()) > 1 else jax.device_put(x, rows)
    # Row keys are split like the rows; one key stays as it is (replicated).
    return call(params, put(prompt_tokens), put(prompt_lengths), put(rng) if keys else rng,
                **kwargs)


def greedy_generate(params, prompt_tokens: Array, prompt_lengths: Array, *,
                    config: model_lib.ModelConfig, max_new_tokens: int,
                    stop_ids: Sequence[int] = (), **kwargs) -> tuple[Array, Array]:
  """Greedy decoding: `generate` with `SamplingConfig(greedy=True)`.

  Args:
    params: plain (unboxed) model params.
    prompt_tokens: int [B, P], right-padded.
    prompt_lengths: int [B], the number of real tokens of each prompt (>= 1).
    config: the model config (static).
    max_new_tokens: N, the number of decode steps.
    stop_ids: a row stops after emitting one of these (its later tokens are 0 = pad).
    **kwargs: `generate`'s optional `mesh`, `rules`, `decode_chunk`.

  Returns:
    tokens: int32 [B, N], the generated ids, 0 after a row stopped.
    lengths: int32 [B], the number of generated tokens (the stop token included).
  """
  out = generate(params, prompt_tokens, prompt_lengths, jax.random.key(0), config=config,
                 sampling=SamplingConfig(greedy=True), max_new_tokens=max_new_tokens,
                 stop_ids=tuple(int(s) for s in stop_ids), **kwargs)
  return out.tokens, out.lengths


# --- Host side: shape buckets over python lists. ---


@dataclasses.dataclass(frozen=True)
class Sample:
  """One row of `generate_padded`: what was emitted (the stop token included).

  Attributes:
    tokens: int32 [n], the generated ids.
    log_probs: float32 [n], their log-probs (as in `Generation`).
  """

  tokens: np.ndarray
  log_probs: np.ndarray

  @property
  def length(self) -> int:
    return len(self.tokens)


def bucket_size(n: int, multiple: int = 0) -> int:
  """The smallest bucket >= n: a power of two (multiple = 0) or a multiple of `multiple`."""
  if n < 1:
    raise ValueError(f"bucket_size needs n >= 1, got {n}")
  return -(-n // multiple) * multiple if multiple else 1 << (n - 1).bit_length()


def generate_padded(params, prompts: Sequence[Sequence[int]], rng: Array, *,
                    config: model_lib.ModelConfig, sampling: SamplingConfig,
                    max_new_tokens: int, stop_ids: Sequence[int] = (),
                    prompt_bucket: int = 0, batch_bucket: int = 0, new_tokens_bucket: int = 1,
                    mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
                    decode_chunk: int | None = None) -> list[Sample]:
  """`generate` over python prompts of any lengths, padded to shape buckets: one compilation
  per bucket, not per batch.

  Buckets (`bucket_size`; granularity 0 = powers of two):

    new tokens  N' = bucket_size(N, new_tokens_bucket)   (default 1: exactly N)
    prompt      P = bucket_size(longest prompt, prompt_bucket), at most max_len - N'
    batch       B = bucket_size(#prompts, batch_bucket), up to a multiple of the mesh's batch
                shards

  A prompt longer than max_len - N is an error (never silently cut). Padding rows are empty
  (length 0): they emit nothing and are dropped; rows generate N' tokens and are cut at N. None
  of this changes what a prompt gets: a row's draws depend on (rng, its index, its step) only,
  or on (its own key, its step) with per-prompt keys (see Randomness in the module docstring),
  and the early exit makes idle padding cheap.

  Args:
    params, config, sampling, max_new_tokens, stop_ids, mesh, rules, decode_chunk: as for
      `generate`.
    rng: one key (prompt i's row key is `fold_in(rng, i)`), or one key per prompt (typed
      [len(prompts)] or raw [len(prompts), 2]; padding rows get copies of the first).
    prompts: token id lists, each non-empty.
    prompt_bucket, batch_bucket, new_tokens_bucket: bucket granularities.

  Returns:
    One `Sample` per prompt, in order, on the host (so: a single-process mesh, or none).
  """
  if not prompts or min(map(len, prompts)) < 1:
    raise ValueError("generate_padded needs at least one prompt, and no empty prompt")
  longest = max(map(len, prompts))
  if longest + max_new_tokens > config.max_len:
    raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                     f"max_len {config.max_len}")
  new_tokens = min(bucket_size(max_new_tokens, new_tokens_bucket), config.max_len - longest)
  width = min(bucket_size(longest, prompt_bucket), config.max_len - new_tokens)
  shards = _batch_shards(mesh, rules)
  batch = -(-bucket_size(len(prompts), batch_bucket) // shards) * shards
  tokens = np.zeros((batch, width), np.int32)
  lengths = np.zeros((batch,), np.int32)
  for b, prompt in enumerate(prompts):
    tokens[b, :len(prompt)] = prompt
    lengths[b] = len(prompt)
  keys = _key_shape(rng)
  if keys == (len(prompts),):  # Padding rows (empty, dropped) reuse the first prompt's key.
    rng = jnp.concatenate([rng, jnp.repeat(rng[:1], batch - len(prompts), axis=0)])
  elif keys:
    raise ValueError(f"rng must be one key or {len(prompts)} keys (one per prompt), got keys of "
                     f"shape {keys}")
  out = jax.device_get(generate(
      params, tokens, lengths, rng, config=config, sampling=sampling, max_new_tokens=new_tokens,
      stop_ids=tuple(stop_ids), mesh=mesh, rules=rules, decode_chunk=decode_chunk))
  return [Sample(tokens=out.tokens[b, :n], log_probs=out.log_probs[b, :n])
          for b, n in enumerate(np.minimum(out.lengths[:len(prompts)], max_new_tokens))]
