"""Losses the optax way: hand-computed values, a naive reference, check_grads, extreme inputs,
jit equals eager, and the invariances the trainers rely on (packed equals unpacked)."""

import doctest

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding

CONFIG = model_lib.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=32)


def _naive_nll(logits, targets):
  """-log softmax(logits)[target] in float64 numpy, the textbook way (fine for small logits)."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return -np.log(np.take_along_axis(probs, np.asarray(targets)[..., None], -1)[..., 0])


def _random_case(seed, shape=(3, 5, 7), scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape)).astype(np.float32)
  targets = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  mask = rng.random(shape[:-1]) < 0.6
  return logits, targets, mask


def test_the_docstring_examples_run():
  result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0


def test_hand_computed_tiny_case():
  # Row 0: p = (0.5, 0.25, 0.25), target 0; row 1: p = (0.1, 0.8, 0.1), target 1 (masked out);
  # row 2: p = (0.2, 0.2, 0.6), target 2.
  probs = np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]], np.float32)
  logits = jnp.log(probs) + 7.0  # shifting every logit of a row changes nothing
  targets = jnp.array([[0, 1, 2]])
  mask = jnp.array([[True, False, True]])
  loss_sum, count = losses.token_cross_entropy(logits=logits, targets=targets, mask=mask)
  np.testing.assert_allclose(loss_sum, -np.log(0.5) - np.log(0.6), rtol=1e-6)
  assert float(count) == 2.0
  np.testing.assert_allclose(losses.token_log_probs(logits=logits, targets=targets),
                             np.log([[0.5, 0.8, 0.6]]), rtol=1e-6)
  z_sum, z_count = losses.z_loss(logits=logits, mask=mask)
  np.testing.assert_allclose(z_sum, 2 * 7.0 ** 2, rtol=1e-5)  # log Z = 7 on every row
  assert float(z_count) == 2.0


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_a_naive_reference_with_masks(seed):
  logits, targets, mask = _random_case(seed)
  nll = _naive_nll(logits, targets)
  loss_sum, count = losses.token_cross_entropy(logits=logits, targets=targets, mask=mask)
  np.testing.assert_allclose(loss_sum, nll[mask].sum(), rtol=1e-5)
  assert float(count) == mask.sum()
  np.testing.assert_allclose(losses.token_log_probs(logits=logits, targets=targets), -nll,
                             rtol=1e-5, atol=1e-6)
  # A float mask weights each token.
  weights = np.random.default_rng(seed).random(mask.shape).astype(np.float32)
  loss_sum, count = losses.token_cross_entropy(logits=logits, targets=targets, mask=weights)
  np.testing.assert_allclose(loss_sum, (nll * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(count, weights.sum(), rtol=1e-6)


_jitted_cross_entropy = jax.jit(
    lambda z, y, m: losses.token_cross_entropy(logits=z, targets=y, mask=m))


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(batch=st.integers(1, 3), length=st.integers(1, 4), vocab=st.integers(2, 9),
                  seed=st.integers(0, 2 ** 16))
def test_cross_entropy_equals_the_naive_reference_for_any_shape(batch, length, vocab, seed):
  logits, targets, mask = _random_case(seed, (batch, length, vocab))
  # Jitted: one compilation per shape instead of one per primitive per shape.
  loss_sum, count = _jitted_cross_entropy(logits, targets, mask)
  np.testing.assert_allclose(loss_sum, _naive_nll(logits, targets)[mask].sum(), rtol=1e-5,
                             atol=1e-6)
  assert float(count) == mask.sum()


def test_the_gradient_is_softmax_minus_one_hot_on_masked_tokens():
  logits, targets, mask = _random_case(2)
  grad = jax.grad(lambda z: losses.token_cross_entropy(logits=z, targets=targets,
                                                       mask=mask)[0])(logits)
  probs = np.asarray(jax.nn.softmax(logits))
  expected = (probs - np.eye(logits.shape[-1])[targets]) * mask[..., None]
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_check_grads():
  logits, targets, mask = _random_case(3, shape=(2, 3, 5), scale=1.0)
  logits = jnp.asarray(logits)
  # Jitted so that the many directional derivatives reuse compiled code (float32: loose tols).
  # Second order (reverse over reverse) for the cross-entropy, first order for the others.
  for fn, order, modes in (
      (lambda z: losses.token_cross_entropy(logits=z, targets=targets, mask=mask)[0], 2,
       ("rev",)),
      (lambda z: losses.token_cross_entropy(logits=z, targets=targets, mask=mask)[0], 1,
       ("fwd", "rev")),
      (lambda z: losses.token_log_probs(logits=z, targets=targets), 1, ("fwd", "rev")),
      (lambda z: losses.z_loss(logits=z, mask=mask)[0], 1, ("fwd", "rev"))):
    jtu.check_grads(jax.jit(fn), (logits,), order=order, modes=modes, atol=1e-2, rtol=1e-2)


def test_finite_values_and_gradients_under_extreme_logits_and_fully_masked_rows():
  rng = np.random.default_rng(4)
  logits = np.where(rng.random((3, 4, 6)) < 0.5, 1e4, -1e4).astype(np.float32)
  targets = rng.integers(0, 6, (3, 4)).astype(np.int32)
  mask = np.ones((3, 4), bool)
  mask[1] = False  # a fully masked row
  for fn in (lambda z, m: losses.token_cross_entropy(logits=z, targets=targets, mask=m),
             lambda z, m: losses.z_loss(logits=z, mask=m)):
    value, count = fn(logits, mask)
    grad = jax.grad(lambda z: fn(z, mask)[0])(logits)
    assert np.isfinite(value) and float(count) == 8.0
    assert np.all(np.isfinite(grad)) and not np.any(grad[1])
  assert np.all(np.isfinite(losses.token_log_probs(logits=logits, targets=targets)))
  # Nothing masked in at all: (0, 0) and a zero gradient, never NaN.
  none = np.zeros_like(mask)
  loss_sum, count = losses.token_cross_entropy(logits=logits, targets=targets, mask=none)
  assert float(loss_sum) == 0.0 and float(count) == 0.0
  grad = jax.grad(lambda z: losses.token_cross_entropy(logits=z, targets=targets,
                                                       mask=none)[0])(logits)
  assert not np.any(grad)
  # Non-finite logits at a masked position do not reach the sum.
  poisoned = logits.copy()
  poisoned[1] = np.nan
  loss_sum, _ = losses.token_cross_entropy(logits=poisoned, targets=targets, mask=mask)
  assert np.isfinite(loss_sum)


def test_jit_equals_eager():
  logits, targets, mask = _random_case(5)
  for fn in (losses.token_cross_entropy, losses.z_loss, losses.token_log_probs):
    kwargs = dict(logits=logits, targets=targets, mask=mask)
    if fn is losses.z_loss:
      kwargs.pop("targets")
    if fn is losses.token_log_probs:
      kwargs.pop("mask")
    eager = fn(**kwargs)
    jitted = jax.jit(lambda kw, fn=fn: fn(**kw))(kwargs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


def test_bf16_logits_give_float32_results():
  logits, targets, mask = _random_case(6)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  loss_sum, count = losses.token_cross_entropy(logits=bf16, targets=targets, mask=mask)
  assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32
  assert losses.token_log_probs(logits=bf16, targets=targets).dtype == jnp.float32
  assert losses.z_loss(logits=bf16, mask=mask)[0].dtype == jnp.float32
  # Computed on the upcast values: equal to the float32 loss of the rounded logits.
  upcast = np.asarray(bf16.astype(jnp.float32))
  np.testing.assert_allclose(loss_sum, _naive_nll(upcast, targets)[mask].sum(), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0)))
  return model_lib.Transformer(CONFIG), params


def _lm_row(tokens_per_segment, length, rng):
  """One packed LM row: inputs, targets, loss_mask, segment_ids, positions [length]."""
  row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  row["loss_mask"] = np.zeros(length, bool)
  start = 0
  for segment, n in enumerate(tokens_per_segment, start=1):
    tokens = rng.integers(1, CONFIG.vocab_size, n + 1)
    sl = slice(start, start + n)
    row["inputs"][sl], row["targets"][sl] = tokens[:-1], tokens[1:]
    row["segment_ids"][sl], row["positions"][sl] = segment, np.arange(n)
    row["loss_mask"][sl] = True
    start += n
  return row


def test_lm_loss_fn_packed_equals_unpacked(tiny_model):
  model, params = tiny_model
  rng = np.random.default_rng(7)
  packed = _lm_row([5, 7], 16, rng)
  # The same two documents, one per row.
  unpacked = [{k: np.zeros_like(v) for k, v in packed.items()} for _ in range(2)]
  for row, sl in zip(unpacked, (slice(0, 5), slice(5, 12))):
    n = sl.stop - sl.start
    for k in packed:
      row[k][:n] = packed[k][sl]
    row["segment_ids"][:n] = 1
  loss_fn = jax.jit(losses.lm_loss_fn(model))
  batch_packed = {k: v[None] for k, v in packed.items()}
  batch_unpacked = {k: np.stack([r[k] for r in unpacked]) for k in packed}
  loss_p, count_p, aux_p = loss_fn(params, batch_packed, jax.random.key(0))
  loss_u, count_u, aux_u = loss_fn(params, batch_unpacked, jax.random.key(0))
  assert float(count_p) == float(count_u) == 12.0
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  np.testing.assert_allclose(aux_p["accuracy"], aux_u["accuracy"])

  # And it is the cross-entropy of the model's logits on the masked targets.
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"],
                                            segment_ids=b["segment_ids"],
                                            positions=b["positions"]).logits)(params, batch_packed)
  nll = _naive_nll(logits, batch_packed["targets"])
  np.testing.assert_allclose(loss_p, nll[batch_packed["loss_mask"]].sum(), rtol=1e-5)
  correct = np.argmax(logits, -1) == batch_packed["targets"]
  assert float(aux_p["accuracy"]) == correct[batch_packed["loss_mask"]].sum()


def test_lm_loss_fn_with_z_loss_reports_both_parts(tiny_model):
  model, params = tiny_model
  batch = {k: v[None] for k, v in _lm_row([9, 4], 16, np.random.default_rng(8)).items()}
  plain_fn, z_fn = losses.lm_loss_fn(model), losses.lm_loss_fn(model, z_loss_weight=1e-2)
  plain, with_z = jax.jit(lambda p, b, r: (plain_fn(p, b, r), z_fn(p, b, r)))(
      params, batch, jax.random.key(0))
  assert set(plain[2]) == {"accuracy"}
  assert set(with_z[2]) == {"accuracy", "cross_entropy", "z_loss"}
  np.testing.assert_allclose(with_z[2]["cross_entropy"], plain[0], rtol=1e-6)
  np.testing.assert_allclose(with_z[0], plain[0] + 1e-2 * with_z[2]["z_loss"], rtol=1e-6)
