"""Generation with the KV cache: prefill the prompt once, then decode one token per step.

The sampler calls the same `Transformer.__call__` as training, with a cache (see the cache
layout in `jaxlm/model.py`), so what it computes is what the trainer computes: at temperature 1
without truncation, the `log_probs` it returns equal the teacher-forced log-probs of the training
forward pass on prompt + generation (`losses.token_log_probs`), which is what makes PPO rollouts
on-policy.

Prompts arrive right-padded (`prompt_tokens` [B, P], `prompt_lengths` [B]), as the prompts
pipeline makes them. Row b's prompt occupies cache slots 0 .. len_b - 1; its first new token
goes to slot len_b, so rows of different lengths decode side by side without left padding.
Padding tokens have segment id 0 and are never written to the cache.

Sampling a token from logits z [V] (float32 throughout), in this order:

  1. temperature:  z' = z / T                                 (T > 0)
  2. top-k:        z'_v = -inf unless v is among the k largest z'  (k = 0: off)
  3. top-p:        sort the survivors by descending probability pi = softmax(z'); keep the
                   shortest prefix whose cumulative probability reaches p, i.e. keep token i
                   iff sum_{j ranked before i} pi_j < p  (p = 1: off; the top token always stays)
  4. draw y ~ softmax(z'), and report log softmax(z')_y: the log-prob under the distribution
     the token was actually drawn from (after temperature and truncation).

Greedy decoding takes argmax z instead and reports log softmax(z)_y (the untempered,
untruncated model log-prob; the log-prob of a point mass would be 0 and say nothing).

Randomness. Row b of a call with key `rng` draws step t with `fold_in(fold_in(rng, b), t)`, so a
row's samples depend on (rng, b, its own logits) only, not on the batch size or the other rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from jaxlm import model as model_lib

Array = jax.Array

# Slack for "cumulative probability reaches p": a float32 cumulative sum that should equal p
# exactly (probabilities [0.5, 0.3, ...] with p = 0.8) may land a few ulps below it, and must
# still count as reaching it.
_TOP_P_SLACK = 1e-6


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
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    logits = truncate_logits(logits / sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p)
    # Per-row keys: row b's draw does not depend on how many rows share the batch.
    tokens = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit,
                   static_argnames=("config", "sampling", "max_new_tokens", "stop_ids"))
def generate(params, prompt_tokens: Array, prompt_lengths: Array, rng: Array, *,
             config: model_lib.ModelConfig, sampling: SamplingConfig, max_new_tokens: int,
             stop_ids: tuple[int, ...] = ()) -> Generation:
  """Samples up to `max_new_tokens` tokens per prompt: one prefill, then a `lax.scan` decode.

  One compilation per (B, P, config, sampling, max_new_tokens, stop_ids); new prompts, lengths,
  params or rng of the same shapes reuse it.

  Args:
    params: plain (unboxed) model params.
    prompt_tokens: int [B, P], right-padded.
    prompt_lengths: int [B], the number of real tokens of each prompt (1 <= len_b <= P).
    rng: a PRNG key (typed `jax.random.key` or raw uint32 [2]); unused when greedy.
    config: the model config (static).
    sampling: the `SamplingConfig` (static).
    max_new_tokens: N, the number of decode steps (static). The cache holds P + N slots.
    stop_ids: a row stops after emitting one of these (static, a tuple).

  Returns:
    A `Generation` with [B, N] tokens, log_probs, mask and [B] lengths.
  """
  batch, prompt_len = prompt_tokens.shape
  model = model_lib.Transformer(config)
  cache = model_lib.init_cache(config, batch, prompt_len + max_new_tokens)
  index = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  segment_ids = (index < prompt_lengths[:, None]).astype(jnp.int32)
  positions = jnp.broadcast_to(index, (batch, prompt_len))
  out = model.apply({"params": params}, prompt_tokens, segment_ids=segment_ids, positions=positions,
                    cache=cache)
  # The logits after each row's last real prompt token predict its first new token.
  last = jnp.take_along_axis(out.logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  stops = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch))

  def step(carry, t):
    cache, logits, position, done = carry
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
    token, log_prob = sample_logits(logits, keys, sampling)
    token = jnp.where(done, 0, token)
    log_prob = jnp.where(done, 0.0, log_prob)
    # A finished row's pad token gets segment id 0: it is not written to the cache.
    out = model.apply({"params": params}, token[:, None],
                      segment_ids=(~done)[:, None].astype(jnp.int32), positions=position[:, None],
                      cache=cache)
    done_after = done | jnp.isin(token, stops)
    return (out.cache, out.logits[:, 0], position + 1, done_after), (token, log_prob, ~done)

  init = (out.cache, last, prompt_lengths.astype(jnp.int32), jnp.zeros((batch,), bool))
  steps = jnp.arange(max_new_tokens, dtype=jnp.int32)
  _, (tokens, log_probs, emitted) = jax.lax.scan(step, init, steps)
  return Generation(tokens=tokens.T, log_probs=log_probs.T, mask=emitted.T,
                    lengths=emitted.sum(axis=0).astype(jnp.int32))


def greedy_generate(params, prompt_tokens: Array, prompt_lengths: Array, *,
                    config: model_lib.ModelConfig, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> tuple[Array, Array]:
  """Greedy decoding: `generate` with `SamplingConfig(greedy=True)`.

  Args:
    params: plain (unboxed) model params.
    prompt_tokens: int [B, P], right-padded.
    prompt_lengths: int [B], the number of real tokens of each prompt (>= 1).
    config: the model config (static).
    max_new_tokens: N, the number of decode steps.
    stop_ids: a row stops after emitting one of these (its later tokens are 0 = pad).

  Returns:
    tokens: int32 [B, N], the generated ids, 0 after a row stopped.
    lengths: int32 [B], the number of generated tokens (the stop token included).
  """
  out = generate(params, prompt_tokens, prompt_lengths, jax.random.key(0), config=config,
                 sampling=SamplingConfig(greedy=True), max_new_tokens=max_new_tokens,
                 stop_ids=tuple(int(s) for s in stop_ids))
  return out.tokens, out.lengths
