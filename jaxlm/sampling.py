"""Generation with the KV cache: prefill the prompt once, then decode one token per step.

The sampler calls the same `Transformer.__call__` as training, with a cache (see the cache
layout in `jaxlm/model.py`), so what it computes is what the trainer computes.

Prompts arrive right-padded (`prompt_tokens` [B, P], `prompt_lengths` [B]), as the prompts
pipeline makes them. Row b's prompt occupies cache slots 0 .. len_b - 1; its first new token
goes to slot len_b, so rows of different lengths decode side by side without left padding.
Padding tokens have segment id 0 and are never written to the cache.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxlm import model as model_lib


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "stop_ids"))
def greedy_generate(params, prompt_tokens: jax.Array, prompt_lengths: jax.Array, *,
                    config: model_lib.ModelConfig, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding: the most likely next token, `max_new_tokens` times.

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

  def step(carry, _):
    cache, logits, position, done = carry
    token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    out = model.apply({"params": params}, token[:, None], segment_ids=(~done)[:, None].astype(jnp.int32),
                      positions=position[:, None], cache=cache)
    done_after = done | jnp.isin(token, stops)
    return (out.cache, out.logits[:, 0], position + 1, done_after), (token, ~done)

  init = (out.cache, last, prompt_lengths.astype(jnp.int32), jnp.zeros((batch,), bool))
  _, (tokens, emitted) = jax.lax.scan(step, init, None, length=max_new_tokens)
  return tokens.T, emitted.sum(axis=0).astype(jnp.int32)
