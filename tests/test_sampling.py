"""The KV-cache sampler: greedy equals full-forward decoding, sampled log-probs equal
teacher-forced log-probs, truncation keeps exactly the right tokens, rows stop on their
own."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64)


@jax.jit
def _full_forward_logits(params, tokens, segment_ids=None):
  return model_lib.Transformer(CONFIG).apply({"params": params}, tokens,
                                             segment_ids=segment_ids).logits


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


def test_a_remat_model_samples_like_the_same_model_without_remat():
  """Remat only changes a backward pass; the sampler (the 1b preset's remat policy) must run it
  and produce the same tokens."""
  params = jax.tree.map(lambda p: p * 8.0, sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0))))
  tokens, lengths = np.asarray([[1, 5, 9], [1, 4, 0]], np.int32), np.asarray([3, 2], np.int32)
  plain, _ = sampling.greedy_generate(params, tokens, lengths, config=CONFIG, max_new_tokens=5)
  remat, _ = sampling.greedy_generate(params, tokens, lengths, max_new_tokens=5,
                                      config=CONFIG.replace(remat_policy="dots_with_no_batch_dims_saveable"))
  assert np.asarray(remat).tolist() == np.asarray(plain).tolist()


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


# --- The sampler core: truncation, exactness of log-probs, stopping, seeding, compilation. ---

RAGGED_PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 4], [1, 8, 8, 3]]


def _pad(prompts, width=None):
  """Right-pads token lists into int32 [B, width] and their lengths [B]."""
  width = width or max(map(len, prompts))
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def _params(seed, scale):
  """A tiny random model; `scale` > 1 sharpens its next-token distributions."""
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed)))
  return jax.tree.map(lambda p: p * scale, params)


def _teacher_forced_logits(params, prompts, generation):
  """Training forward pass over prompt + emitted tokens: logits [B, N, V] predicting each
  generated token (row b's token j sits at index len_b + j, predicted at len_b + j - 1)."""
  tokens, mask = np.asarray(generation.tokens), np.asarray(generation.mask)
  sequences = [list(p) + tokens[b, mask[b]].tolist() for b, p in enumerate(prompts)]
  full, full_lengths = _pad(sequences)
  segment_ids = (np.arange(full.shape[1])[None, :] < full_lengths[:, None]).astype(np.int32)
  logits = _full_forward_logits(params, full, segment_ids)
  n = tokens.shape[1]
  index = np.stack([len(p) - 1 + np.arange(n) for p in prompts])
  index = np.minimum(index, full.shape[1] - 1)  # Positions past a row's end are masked anyway.
  return jnp.take_along_axis(logits, jnp.asarray(index)[:, :, None], axis=1)


def test_top_k_keeps_exactly_the_k_largest():
  out = np.asarray(sampling.truncate_logits(jnp.asarray([3.0, 2.0, 1.0, 0.0]), top_k=2))
  np.testing.assert_array_equal(np.isfinite(out), [True, True, False, False])
  np.testing.assert_array_equal(out[:2], [3.0, 2.0])  # Kept logits are untouched.
  # Ties at the k-th value: exactly k survive, the lower ids first.
  out = np.asarray(sampling.truncate_logits(jnp.asarray([[0.0, 1.0, 1.0, 1.0]]), top_k=2))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, False]])
  # k >= V is off.
  assert np.isfinite(np.asarray(sampling.truncate_logits(jnp.zeros((4,)), top_k=9))).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.truncate_logits(logits, **kw))).tolist()
  assert kept(top_p=0.8) == [True, True, False, False]
  assert kept(top_p=0.81) == [True, True, True, False]
  assert kept(top_p=0.3) == [True, False, False, False]  # Always at least the top token.
  assert kept(top_p=1.0) == [True] * 4
  # Unsorted input: the set is by probability, not by id.
  perm = jnp.asarray([2, 0, 3, 1])
  out = np.isfinite(np.asarray(sampling.truncate_logits(logits[perm], top_p=0.8)))
  np.testing.assert_array_equal(out, [False, True, False, True])
  # top-p after top-k renormalises over the k survivors: 0.5 / 0.8 = 0.625 >= 0.6.
  assert kept(top_k=2, top_p=0.6) == [True, False, False, False]


def test_sampled_tokens_lie_in_the_kept_set():
  logits = jax.random.normal(jax.random.key(3), (CONFIG.vocab_size,)) * 2.0
  draws = 4096
  keys = jax.random.split(jax.random.key(4), draws)
  batch = jnp.broadcast_to(logits, (draws, CONFIG.vocab_size))
  for cfg in (sampling.SamplingConfig(top_k=5), sampling.SamplingConfig(top_p=0.7),
              sampling.SamplingConfig(temperature=0.5, top_k=8, top_p=0.9)):
    truncated = sampling.truncate_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    allowed = set(np.flatnonzero(np.isfinite(np.asarray(truncated))).tolist())
    tokens, log_probs = jax.jit(sampling.sample_logits, static_argnums=2)(batch, keys, cfg)
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) <= allowed, cfg
    # ... and not a trivial subset: every kept token of probability >= 1% shows up in 4096 draws.
    probs = np.asarray(jax.nn.softmax(truncated))
    assert set(np.flatnonzero(probs >= 0.01).tolist()) <= set(tokens.tolist()), cfg
    expected = np.asarray(jax.nn.log_softmax(truncated))[tokens]
    np.testing.assert_allclose(np.asarray(log_probs), expected, rtol=0, atol=1e-6)


def test_sampling_config_validates():
  for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
    try:
      sampling.SamplingConfig(**bad)
    except ValueError:
      continue
    raise AssertionError(f"accepted {bad}")
  sampling.SamplingConfig(temperature=0.0, greedy=True)  # Temperature is unused when greedy.


def test_sampled_log_probs_equal_teacher_forced_log_probs():
  """At temperature 1 without truncation the sampler is the training model: on-policy RL.

  With decode phases (`decode_chunk`), whose caches grow between loops: an optimisation
  that must change nothing."""
  params = _params(0, 2.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  gen = sampling.generate(params, tokens, lengths, jax.random.key(7), config=CONFIG,
                          sampling=sampling.SamplingConfig(), max_new_tokens=8, decode_chunk=3)
  assert gen.tokens.dtype == jnp.int32 and gen.log_probs.dtype == jnp.float32
  assert np.asarray(gen.mask).all() and (np.asarray(gen.lengths) == 8).all()
  logits = _teacher_forced_logits(params, RAGGED_PROMPTS, gen)
  expected = losses.token_log_probs(logits=logits, targets=gen.tokens)
  np.testing.assert_allclose(np.asarray(gen.log_probs), np.asarray(expected), rtol=0, atol=1e-5)
  # Not a degenerate check: the samples are not just the argmax.
  assert (np.asarray(gen.tokens) != np.asarray(jnp.argmax(logits, -1))).any()


def test_truncated_sampling_matches_truncated_teacher_forced_distribution():
  params = _params(0, 4.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  cfg = sampling.SamplingConfig(temperature=0.7, top_k=6, top_p=0.9)
  gen = sampling.generate(params, tokens, lengths, jax.random.key(8), config=CONFIG, sampling=cfg,
                          max_new_tokens=8)
  logits = _teacher_forced_logits(params, RAGGED_PROMPTS, gen)
  truncated = sampling.truncate_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
  picked = np.asarray(jnp.take_along_axis(truncated, gen.tokens[..., None], -1)[..., 0])
  assert np.isfinite(picked).all()  # Every token came from the kept set.
  # (Not `losses.token_log_probs`: its one-hot contraction turns -inf * 0 into NaN.)
  expected = jnp.take_along_axis(jax.nn.log_softmax(truncated), gen.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(gen.log_probs), np.asarray(expected), rtol=0, atol=1e-5)


def test_greedy_generate_is_generate_with_greedy():
  params = _params(0, 8.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  # Three decode phases (steps 1-2, 3-4, 5-6), each over a larger cache: still the uncached
  # forward pass.
  gen = sampling.generate(params, tokens, lengths, jax.random.key(0), config=CONFIG,
                          sampling=sampling.SamplingConfig(greedy=True), max_new_tokens=7,
                          decode_chunk=2)
  for i, p in enumerate(RAGGED_PROMPTS):
    assert np.asarray(gen.tokens[i]).tolist() == _reference_greedy(params, p, 7)
  # Greedy reports the plain model log-prob of its (argmax) token.
  logits = _teacher_forced_logits(params, RAGGED_PROMPTS, gen)
  expected = losses.token_log_probs(logits=logits, targets=gen.tokens)
  np.testing.assert_allclose(np.asarray(gen.log_probs), np.asarray(expected), rtol=0, atol=1e-5)
  # The rng does not matter to greedy decoding.
  other = sampling.generate(params, tokens, lengths, jax.random.key(1), config=CONFIG,
                            sampling=sampling.SamplingConfig(greedy=True), max_new_tokens=7,
                            decode_chunk=2)
  np.testing.assert_array_equal(other.tokens, gen.tokens)


def test_rows_of_a_sampled_mixed_batch_stop_independently():
  params = _params(1, 2.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  n, rng, cfg = 10, jax.random.key(11), sampling.SamplingConfig(temperature=1.5)
  free = np.asarray(sampling.generate(params, tokens, lengths, rng, config=CONFIG, sampling=cfg,
                                      max_new_tokens=n).tokens)
  # A stop token that row 0 emits and row 1 never does: one row stops, another runs to the end.
  stop = next(int(t) for t in free[0, :-1] if t not in free[1])
  gen = sampling.generate(params, tokens, lengths, rng, config=CONFIG, sampling=cfg,
                          max_new_tokens=n, stop_ids=(stop,))
  out, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
  log_probs, got_lengths = np.asarray(gen.log_probs), np.asarray(gen.lengths)
  for b in range(len(RAGGED_PROMPTS)):
    hits = np.flatnonzero(free[b] == stop)
    length = hits[0] + 1 if len(hits) else n
    assert got_lengths[b] == length, b
    # Same rng: identical draws up to and including the stop token, then nothing.
    np.testing.assert_array_equal(out[b, :length], free[b, :length])
    np.testing.assert_array_equal(mask[b], np.arange(n) < length)
    assert not out[b, length:].any() and not log_probs[b, length:].any()
    assert (log_probs[b, :length] < 0).all()
  assert got_lengths[0] < n and got_lengths[1] == n


def test_sampling_is_seeded_and_rows_do_not_depend_on_the_batch():
  params = _params(0, 2.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  run = lambda t, l, key: sampling.generate(params, t, l, key, config=CONFIG,
                                            sampling=sampling.SamplingConfig(), max_new_tokens=8,
                                            decode_chunk=3)
  a, b = run(tokens, lengths, jax.random.key(7)), run(tokens, lengths, jax.random.key(7))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.log_probs, b.log_probs)
  c = run(tokens, lengths, jax.random.key(8))
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  # Row 0 alone (same prompt width) draws what it drew as row 0 of the batch of three.
  alone = run(tokens[:1], lengths[:1], jax.random.key(7))
  np.testing.assert_array_equal(alone.tokens[0], a.tokens[0])


def test_row_keys_make_a_rows_samples_independent_of_its_position():
  """Per-row keys: row b draws with rng[b], wherever it sits. One key is the same as the row
  keys fold_in(rng, b), bit for bit."""
  params = _params(0, 2.0)
  tokens, lengths = _pad(RAGGED_PROMPTS)
  run = lambda t, l, key: sampling.generate(params, t, l, key, config=CONFIG,
                                            sampling=sampling.SamplingConfig(), max_new_tokens=8,
                                            decode_chunk=3)
  rng = jax.random.key(7)
  one_key = run(tokens, lengths, rng)
  explicit = jnp.stack([jax.random.fold_in(rng, b) for b in range(3)])
  np.testing.assert_array_equal(jax.random.key_data(sampling.position_keys(rng, 3)),
                                jax.random.key_data(explicit))
  for keys in (explicit, jax.random.key_data(explicit)):  # typed, or raw uint32 [B, 2]
    by_row = run(tokens, lengths, keys)
    np.testing.assert_array_equal(by_row.tokens, one_key.tokens)
    np.testing.assert_array_equal(by_row.log_probs, one_key.log_probs)
    np.testing.assert_array_equal(by_row.lengths, one_key.lengths)
  # The rows reversed, with their keys: each row draws what it drew in position b.
  flipped = run(tokens[::-1], lengths[::-1], explicit[::-1])
  np.testing.assert_array_equal(flipped.tokens[::-1], one_key.tokens)
  np.testing.assert_allclose(flipped.log_probs[::-1], one_key.log_probs, rtol=0, atol=1e-6)
  # generate_padded: another batch bucket, prompt width and position, per-prompt keys.
  samples = sampling.generate_padded(params, [RAGGED_PROMPTS[2], RAGGED_PROMPTS[0]], explicit[2::-2],
                                     config=CONFIG, sampling=sampling.SamplingConfig(), max_new_tokens=8,
                                     decode_chunk=3, prompt_bucket=16, batch_bucket=4)
  for sample, b in zip(samples, (2, 0)):
    np.testing.assert_array_equal(sample.tokens, one_key.tokens[b])
    np.testing.assert_allclose(sample.log_probs, one_key.log_probs[b], rtol=0, atol=1e-6)
  for bad in (explicit[:2], jnp.stack([explicit, explicit])):
    with np.testing.assert_raises(ValueError):
      run(tokens, lengths, bad)


def test_new_prompts_of_the_same_shape_do_not_recompile():
  params = _params(2, 1.0)
  cfg = sampling.SamplingConfig(temperature=0.9, top_k=10)
  call = lambda t, l, key: sampling.generate(params, t, l, key, config=CONFIG, sampling=cfg,
                                             max_new_tokens=5, stop_ids=(3, 4))
  call(*_pad([[1, 2, 3], [1, 2]], width=4), jax.random.key(0))
  compiled = sampling._generate._cache_size()
  call(*_pad([[1, 9], [1, 7, 7, 7]], width=4), jax.random.key(1))
  call(*_pad([[5], [6, 6, 6]], width=4), jax.random.key(2))
  assert sampling._generate._cache_size() == compiled
  call(*_pad([[5], [6, 6, 6]], width=6), jax.random.key(2))  # A new shape bucket compiles once.
  assert sampling._generate._cache_size() == compiled + 1


# --- The decode loop, shape buckets, sharding. ---


def test_inverse_cdf_draw_gives_each_token_its_probability():
  # Uniforms on a fine grid: the fraction of grid points mapped to token v is p_v to within
  # one grid step, so a wrong cumulative sum (or an off-by-one) shows exactly.
  weights = jax.random.uniform(jax.random.key(0), (100,)) * (jnp.arange(100) % 7 != 3)
  grid = 20_000
  uniform = (jnp.arange(grid) + 0.5) / grid
  draws = sampling.inverse_cdf_draw(jnp.broadcast_to(weights, (grid, 100)), uniform, block=16)
  counts = np.bincount(np.asarray(draws), minlength=100) / grid
  probs = np.asarray(weights / weights.sum())
  np.testing.assert_allclose(counts, probs, rtol=0, atol=2 / grid)
  assert not counts[np.asarray(weights) == 0].any()  # Zero weight: never drawn.


def test_inverse_cdf_draw_never_returns_a_token_of_weight_zero():
  weights = jnp.asarray([[0.5, 0.0, 0.5, 0.0]] * 3)
  # u = 0.5 lands on the boundary F_0 = F_1 = 0.5: the draw skips the empty interval of token 1.
  # u = 1 (u F_V rounding up to F_V) would count past the end, onto the zero-weight token 3;
  # the repair takes the first token of positive weight after the threshold, or the heaviest.
  draws = sampling.inverse_cdf_draw(weights, jnp.asarray([0.5, 1.0, 0.0]))
  np.testing.assert_array_equal(draws, [2, 0, 0])
  # The same over several blocks: the last 10 of 40 tokens have weight 0.
  weights = jnp.where(jnp.arange(40) < 30, jnp.linspace(1.0, 2.0, 40), 0.0)[None]
  draws = sampling.inverse_cdf_draw(weights, jnp.asarray([1.0]), block=16)
  assert float(weights[0, int(draws[0])]) > 0


def test_generate_padded_compiles_once_per_bucket_and_drops_the_padding():
  params = _params(3, 4.0)
  cfg = sampling.SamplingConfig(temperature=0.8)
  kw = dict(config=CONFIG, sampling=cfg, max_new_tokens=6, stop_ids=(7,))
  call = lambda prompts, seed=0: sampling.generate_padded(
      params, prompts, jax.random.key(seed), batch_bucket=4, **kw)
  first = call([[1, 2, 3], [4, 5, 6, 7, 8]])  # batch bucket 4, prompt bucket 8
  compiled = sampling._generate._cache_size()
  call([[9], [1, 2, 3, 4, 5, 6, 7], [3, 3, 3]], seed=1)
  call([[2, 2, 2, 2, 2, 2, 2, 2]] * 4, seed=2)
  assert sampling._generate._cache_size() == compiled  # the same buckets: no new compilation
  call([[1]] * 5)  # batch bucket 8
  assert sampling._generate._cache_size() == compiled + 1

  # The padding rows change nothing: the rows are what they are next to real neighbours.
  tokens, lengths = _pad([[1, 2, 3], [4, 5, 6, 7, 8], [6, 6], [1, 9, 9, 9, 9, 9, 9, 9]], width=8)
  full = sampling.generate(params, tokens, lengths, jax.random.key(0), **kw)
  assert len(first) == 2
  for b, sample in enumerate(first):
    assert sample.length == int(full.lengths[b]) >= 1
    np.testing.assert_array_equal(sample.tokens, full.tokens[b, :sample.length])
    np.testing.assert_allclose(sample.log_probs, full.log_probs[b, :sample.length], atol=1e-6)
  # A row of length 0 (what padding rows are) emits nothing, and changes nothing either.
  lengths[3] = 0
  empty = sampling.generate(params, tokens, lengths, jax.random.key(0), **kw)
  assert int(empty.lengths[3]) == 0 and not np.asarray(empty.mask[3]).any()
  assert not np.asarray(empty.tokens[3]).any() and not np.asarray(empty.log_probs[3]).any()
  np.testing.assert_array_equal(empty.tokens[:3], full.tokens[:3])
  with np.testing.assert_raises(ValueError):
    call([[1] * (CONFIG.max_len - 5)])  # prompt + max_new_tokens > max_len

  # New-token buckets: 5 and 7 new tokens run as 8 (one compilation), cut at 5 and 7.
  few, more = (sampling.generate_padded(params, [[1, 2, 3]], jax.random.key(0), config=CONFIG,
                                        sampling=cfg, max_new_tokens=n, new_tokens_bucket=8)[0]
               for n in (5, 7))
  assert sampling._generate._cache_size() == compiled + 2
  assert few.length <= 5 and more.length <= 7 and few.length == min(more.length, 5)
  np.testing.assert_array_equal(few.tokens, more.tokens[:few.length])


# Runs with 8 fake CPU devices: generate on several meshes equals generate on one device.
EIGHT_DEVICES = textwrap.dedent("""
  import functools, re
  import jax, numpy as np
  from jaxlm import model as model_lib, sampling, sharding

  assert len(jax.devices()) == 8
  config = model_lib.ModelConfig(**CONFIG_DICT)
  init_fn = functools.partial(model_lib.init_params, config)
  host = jax.device_get(sharding.unbox(init_fn(jax.random.key(0))))
  host = jax.tree.map(lambda p: p * 4.0, host)
  prompts = [[1, 5, 9, 13, 2, 7], [1, 4], [1, 8, 8, 3], [2], [3, 3, 3], [1, 2, 3, 4, 5, 6, 7],
             [9, 9], [4, 1, 4]]
  tokens = np.zeros((8, 8), np.int32)
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  kw = dict(config=config, sampling=sampling.SamplingConfig(), max_new_tokens=8, decode_chunk=4)

  # The one-device reference without stop ids; a stop token that row 0 emits early and row 1
  # never does; what the stopped rows must be (their draws up to the stop do not change).
  free = jax.device_get(sampling.generate(host, tokens, lengths, jax.random.key(3), **kw))
  stop = next(int(t) for t in free.tokens[0, :4] if t not in free.tokens[1])
  hits = [np.flatnonzero(row == stop) for row in free.tokens]
  ref_lengths = np.asarray([h[0] + 1 if len(h) else 8 for h in hits])
  ref_mask = np.arange(8)[None] < ref_lengths[:, None]
  ref_tokens, ref_log_probs = free.tokens * ref_mask, free.log_probs * ref_mask
  kw["stop_ids"] = (stop,)

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  for shape in ({"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = sharding.make_mesh(shape)
    params = jax.device_put(host, sharding.logical_shardings(abstract, mesh))  # as training
    if "tensor" not in shape:
      out = sampling.generate(params, tokens, lengths, jax.random.key(3), mesh=mesh, **kw)
      # generate_padded: 5 prompts padded to 8 rows (the batch bucket, and 8 batch shards).
      padded = sampling.generate_padded(params, prompts[:5], jax.random.key(3), mesh=mesh, **kw)
      for b, sample in enumerate(padded):
        np.testing.assert_array_equal(sample.tokens, ref_tokens[b, :ref_lengths[b]])
    else:  # The same program, compiled here to read its HLO.
      with sharding.use_mesh(mesh):
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
        compiled = sampling._generate.lower(
            params, put(tokens), put(lengths), jax.random.key(3), mesh=mesh,
            rules=sampling._hashable_rules(sharding.DEFAULT_RULES), **kw).compile()
        out = compiled(params, put(tokens), put(lengths), jax.random.key(3))
    np.testing.assert_array_equal(out.lengths, ref_lengths, err_msg=str(shape))
    np.testing.assert_array_equal(out.mask, ref_mask, err_msg=str(shape))
    np.testing.assert_array_equal(out.tokens, ref_tokens, err_msg=str(shape))
    np.testing.assert_allclose(out.log_probs, ref_log_probs, rtol=0, atol=1e-5, err_msg=str(shape))
    assert out.tokens.sharding.spec[0] is not None  # the batch stays split
    if "tensor" not in shape:  # Row keys are split over the batch axes like the rows.
      keyed = sampling.generate(params, tokens, lengths, sampling.position_keys(jax.random.key(3), 8),
                                mesh=mesh, **kw)
      np.testing.assert_array_equal(keyed.tokens, ref_tokens)
      np.testing.assert_allclose(keyed.log_probs, ref_log_probs, rtol=0, atol=1e-5)
  assert 0 < ref_lengths.min() < 8 == ref_lengths.max(), ref_lengths  # rows stop on their own

  # Inside the decode loops only activations move: no all-gather there is as large as the
  # smallest weight matrix (a weight gathered per token) or a layer's cache.
  hlo = compiled.as_text()
  layers = host["layers"]
  smallest_weight = min(layers["attn"][k]["kernel"][0].size for k in "qkvo")
  loops = set(re.findall(r"body=%([\\w.-]+)", hlo))
  assert loops, "no decode loop found"
  for name in loops:
    start = hlo.index("\\n%" + name + " ")
    body = hlo[start:hlo.index("\\n}", start)]
    for dims in re.findall(r"= \\w+\\[([\\d,]*)\\]\\S* all-gather", body):
      size = int(np.prod([int(d) for d in dims.split(",") if d]))
      assert size < smallest_weight, (shape, dims)

  try:
    sampling.generate(host, tokens[:3], lengths[:3], jax.random.key(0),
                      mesh=sharding.make_mesh({"data": 8}), **kw)
    raise AssertionError("3 rows do not split over 8 devices")
  except ValueError as e:
    assert "generate_padded" in str(e)
  print("OK")
""")


def test_generate_on_eight_fake_devices_equals_one_device():
  """Sharded like training (batch over data/fsdp, heads over tensor): the same tokens, the
  same log-probs, and no weight or cache all-gathered per token."""
  # `tensor` splits the vocabulary; an untied LM head (the tied one is tested on one device).
  config = CONFIG.replace(vocab_size=64, tie_embeddings=False)
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=path)
  script = EIGHT_DEVICES.replace("CONFIG_DICT", repr(config.to_dict()))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def _load_tool(name):
  spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_sampler_roofline_counts_weights_and_valid_cache_slots():
  """The GPU roofline of tools/bench_sampler.py, checked by hand on a tiny model (the bench
  itself only runs on hardware with a known memory bandwidth)."""
  bench = _load_tool("bench_sampler")
  config = CONFIG.replace(tie_embeddings=False)
  params = sharding.unbox(jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0))))
  batch, prompt, new = 3, 5, 4
  slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim  # k and v, every layer
  kv = sum(batch * (prompt + t) * slot for t in (1, 2, 3))  # steps 1 .. N - 1 read P + t slots
  f32 = bench.decode_bytes(config, params, batch, prompt, new)
  assert f32 == 3 * model_lib.num_params(config) * 4 + kv * 4
  # bf16 compute: matmul weights and the cache at 2 bytes, norm scales still float32.
  norms = config.num_layers * 2 * config.embed_dim + config.embed_dim
  bf16 = bench.decode_bytes(config.replace(dtype="bfloat16"), params, batch, prompt, new)
  assert bf16 == 3 * ((model_lib.num_params(config) - norms) * 2 + norms * 4) + kv * 2

  device = lambda platform, kind: type("Device", (), dict(platform=platform, device_kind=kind))
  assert bench.hbm_bytes_per_second(device("gpu", "NVIDIA H100 80GB HBM3")) == 3350e9
  assert bench.hbm_bytes_per_second(device("gpu", "NVIDIA H100 PCIe")) == 2000e9
  assert bench.hbm_bytes_per_second(device("gpu", "NVIDIA H200")) == 4800e9
  assert bench.hbm_bytes_per_second(device("cpu", "cpu")) is None
  assert bench.hbm_bytes_per_second(device("cpu", "cpu"), given_gbps=20) == 20e9
