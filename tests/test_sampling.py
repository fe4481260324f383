"""Greedy generation with the KV cache equals greedy decoding by full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import sharding

CONFIG = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=8, mlp_dim=64, max_len=64)


@jax.jit
def _full_forward_logits(params, tokens):
  return model_lib.Transformer(CONFIG).apply({"params": params}, tokens).logits


def _reference_greedy(params, prompt, n):
  """Re-runs the whole sequence for every new token, without a cache: obviously right.

  The sequence lives in a fixed-width buffer (one compilation); causality makes the trailing
  zeros irrelevant to the logits at the last real token.
  """
  tokens = np.zeros((1, len(prompt) + n), np.int32)
  tokens[0, : len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    tokens[0, t] = int(jnp.argmax(_full_forward_logits(params, tokens)[0, t - 1]))
  return tokens[0, len(prompt):].tolist()


def test_greedy_with_cache_matches_full_forward_for_ragged_prompts():
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0)))
  # Scale up the weights so the argmax is decisive (random init logits are nearly flat).
  params = jax.tree.map(lambda p: p * 8.0, params)
  prompts = [[1, 5, 9, 13, 2, 7], [1, 4], [1, 8, 8, 3]]
  width = max(map(len, prompts))
  tokens = np.zeros((3, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  generated, n = sampling.greedy_generate(params, tokens, lengths, config=CONFIG, max_new_tokens=7)
  assert generated.shape == (3, 7) and (np.asarray(n) == 7).all()
  for i, p in enumerate(prompts):
    assert np.asarray(generated[i]).tolist() == _reference_greedy(params, p, 7)


def test_rows_stop_at_their_stop_token():
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(1)))
  params = jax.tree.map(lambda p: p * 8.0, params)
  tokens = np.asarray([[1, 5, 9], [1, 4, 0]], np.int32)
  lengths = np.asarray([3, 2], np.int32)
  free, _ = sampling.greedy_generate(params, tokens, lengths, config=CONFIG, max_new_tokens=6)
  stop = int(free[0, 2])  # Row 0 emits this as its third token: make it a stop token.
  stopped, n = sampling.greedy_generate(params, tokens, lengths, config=CONFIG, max_new_tokens=6,
                                        stop_ids=(stop,))
  first = np.flatnonzero(np.asarray(free[0]) == stop)[0]
  assert int(n[0]) == first + 1
  np.testing.assert_array_equal(stopped[0, : first + 1], free[0, : first + 1])
  assert not np.asarray(stopped[0, first + 1:]).any()
