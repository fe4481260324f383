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
from jaxlm import rl_losses
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


@pytest.mark.parametrize("module", [losses, rl_losses], ids=lambda m: m.__name__)
def test_the_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
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


# ------------------------------------------------------------------------------------------------
# Reward model (Bradley-Terry).
# ------------------------------------------------------------------------------------------------
def _log1pexp(x):
  """log(1 + e^x) = -log sigmoid(-x), float64 numpy."""
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def test_bradley_terry_hand_values_margin_and_swap():
  chosen, rejected = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
  loss = losses.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected)
  np.testing.assert_allclose(loss, [np.log1p(np.exp(-1.0)), np.log(2.0), np.log1p(np.exp(2.0))],
                             rtol=1e-6)
  assert loss.dtype == jnp.float32 and loss.shape == (3,)
  # A margin shifts the difference: scalar and per-pair margins agree.
  scalar = losses.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected, margin=0.5)
  per_pair = losses.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected,
                                       margin=jnp.full(3, 0.5))
  np.testing.assert_allclose(scalar, _log1pexp(-(np.array([1.0, 0.0, -2.0]) - 0.5)), rtol=1e-6)
  np.testing.assert_allclose(scalar, per_pair)
  # Swapping chosen and rejected: l(d) - l(-d) = -d.
  swapped = losses.bradley_terry_loss(chosen_rewards=rejected, rejected_rewards=chosen)
  np.testing.assert_allclose(loss - swapped, -(chosen - rejected), rtol=1e-6, atol=1e-6)


def test_bradley_terry_is_finite_with_finite_gradients_for_huge_differences():
  chosen, rejected = jnp.array([1e4, -1e4, 0.0]), jnp.array([-1e4, 1e4, 0.0])
  margin = jnp.array([0.0, 0.0, 1e5])
  fn = lambda c, r: jnp.sum(losses.bradley_terry_loss(chosen_rewards=c, rejected_rewards=r,
                                                      margin=margin))
  value, (g_chosen, g_rejected) = jax.value_and_grad(fn, argnums=(0, 1))(chosen, rejected)
  np.testing.assert_allclose(value, 2e4 + 1e5, rtol=1e-6)  # l(2e4) ~ 0, l(-2e4) = 2e4, ...
  np.testing.assert_allclose(g_chosen, [0.0, -1.0, -1.0], atol=1e-6)
  np.testing.assert_allclose(g_rejected, -g_chosen)


def test_reward_centering_and_pairwise_accuracy():
  chosen, rejected = jnp.array([1.0, 2.0, 0.5, -3.0]), jnp.array([-1.0, 1.0, 0.5, 1.0])
  np.testing.assert_allclose(
      losses.reward_centering_loss(chosen_rewards=chosen, rejected_rewards=rejected),
      [0.0, 9.0, 1.0, 4.0])
  np.testing.assert_array_equal(
      losses.pairwise_accuracy(chosen_rewards=chosen, rejected_rewards=rejected),
      [1.0, 1.0, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# Sequence log-probs and the DPO family.
# ------------------------------------------------------------------------------------------------
def test_sequence_log_probs_matches_the_naive_sum_and_ignores_masked_positions():
  logits, targets, mask = _random_case(9)
  expected = np.where(mask, -_naive_nll(logits, targets), 0.0).sum(-1)
  got = losses.sequence_log_probs(logits=logits, targets=targets, mask=mask)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Float weights weight each token.
  weights = np.random.default_rng(9).random(mask.shape).astype(np.float32)
  np.testing.assert_allclose(losses.sequence_log_probs(logits=logits, targets=targets,
                                                       mask=weights),
                             (-_naive_nll(logits, targets) * weights).sum(-1), rtol=1e-5)
  # Garbage (NaN, +-inf) at masked positions changes nothing, in the value or the gradient.
  poisoned = logits.copy()
  poisoned[~mask] = np.nan
  poisoned[~mask, 0] = -np.inf
  fn = lambda z: jnp.sum(losses.sequence_log_probs(logits=z, targets=targets, mask=mask))
  np.testing.assert_allclose(fn(poisoned), expected.sum(), rtol=1e-5)
  grad = jax.grad(fn)(poisoned)
  np.testing.assert_allclose(grad, jax.grad(fn)(logits), atol=1e-6)
  assert not np.any(grad[~mask])


def test_sequence_log_probs_is_finite_with_minus_inf_logits_where_token_log_probs_is_not():
  # Top-k filtering sets the non-kept vocabulary to -inf; the targets are among the kept ones.
  logits = np.array([[[0.0, 0.0, -np.inf, -np.inf], [np.log(3.0), 0.0, -np.inf, 0.0]]],
                    np.float32)
  targets, mask = np.array([[1, 0]]), np.array([[True, True]])
  assert np.isnan(losses.token_log_probs(logits=logits, targets=targets)).any()
  fn = lambda z: jnp.sum(losses.sequence_log_probs(logits=z, targets=targets, mask=mask))
  np.testing.assert_allclose(fn(logits), np.log(0.5) + np.log(0.6), rtol=1e-6)
  grad = jax.grad(fn)(logits)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[0, 0], [-0.5, 0.5, 0.0, 0.0], atol=1e-6)


def _dpo_inputs(pc, pr, rc, rr):
  return dict(policy_chosen_logps=jnp.asarray(pc, jnp.float32),
              policy_rejected_logps=jnp.asarray(pr, jnp.float32),
              reference_chosen_logps=jnp.asarray(rc, jnp.float32),
              reference_rejected_logps=jnp.asarray(rr, jnp.float32))


def test_dpo_ipo_and_implicit_rewards_hand_values():
  # h = (pc - rc) - (pr - rr) = (-1 + 3) - (-4 + 2) = 4 for pair 0; (-2 + 1) - (-1 + 1) = -1.
  inputs = _dpo_inputs([-1.0, -2.0], [-4.0, -1.0], [-3.0, -1.0], [-2.0, -1.0])
  h, beta = np.array([4.0, -1.0]), 0.5
  np.testing.assert_allclose(losses.dpo_loss(**inputs, beta=beta), _log1pexp(-beta * h),
                             rtol=1e-6)
  eps = 0.1
  np.testing.assert_allclose(losses.dpo_loss(**inputs, beta=beta, label_smoothing=eps),
                             (1 - eps) * _log1pexp(-beta * h) + eps * _log1pexp(beta * h),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.ipo_loss(**inputs, beta=beta), (h - 1.0) ** 2, rtol=1e-6)
  chosen, rejected = losses.dpo_implicit_rewards(**inputs, beta=beta)
  np.testing.assert_allclose(chosen, [1.0, -0.5])
  np.testing.assert_allclose(rejected, [-1.0, 0.0])


def test_dpo_is_bradley_terry_on_the_implicit_rewards_and_log_2_at_the_reference():
  rng = np.random.default_rng(10)
  inputs = _dpo_inputs(*(rng.normal(-20.0, 5.0, 6) for _ in range(4)))
  for beta in (0.1, 1.0):
    chosen, rejected = losses.dpo_implicit_rewards(**inputs, beta=beta)
    np.testing.assert_allclose(
        losses.dpo_loss(**inputs, beta=beta),
        losses.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected), rtol=1e-5)
    np.testing.assert_allclose(losses.dpo_loss(**inputs, beta=beta, label_smoothing=0.0),
                               losses.dpo_loss(**inputs, beta=beta))
  # Policy equal to reference: every DPO variant gives log 2, IPO gives (1 / (2 beta))^2.
  logps = rng.normal(-20.0, 5.0, (2, 4))
  at_ref = _dpo_inputs(logps[0], logps[1], logps[0], logps[1])
  for eps in (0.0, 0.2):
    np.testing.assert_allclose(losses.dpo_loss(**at_ref, beta=0.1, label_smoothing=eps),
                               np.full(4, np.log(2.0)), rtol=1e-6)
  np.testing.assert_allclose(losses.ipo_loss(**at_ref, beta=0.1), np.full(4, 25.0), rtol=1e-5)


def test_conservative_dpo_is_minimal_where_sigmoid_matches_the_smoothed_label():
  # cDPO's gradient in h vanishes where sigmoid(beta h) = 1 - eps, not at h = infinity.
  beta, eps = 0.5, 0.1
  h_star = np.log((1 - eps) / eps) / beta
  fn = lambda h: losses.dpo_loss(**_dpo_inputs([h], [0.0], [0.0], [0.0]), beta=beta,
                                 label_smoothing=eps)[0]
  assert abs(float(jax.grad(fn)(jnp.float32(h_star)))) < 1e-6
  assert float(jax.grad(fn)(jnp.float32(h_star + 1))) > 0 > float(jax.grad(fn)(jnp.float32(0.0)))


@pytest.mark.parametrize("extreme", [1e4, -1e4])
def test_preference_losses_have_finite_gradients_at_extreme_log_ratios(extreme):
  inputs = _dpo_inputs([extreme, 0.0], [-extreme, 0.0], [0.0, extreme], [0.0, -extreme])
  for fn in (lambda **kw: losses.dpo_loss(**kw, beta=0.1),
             lambda **kw: losses.dpo_loss(**kw, beta=0.1, label_smoothing=0.1),
             lambda **kw: losses.ipo_loss(**kw, beta=0.1)):
    value, grads = jax.value_and_grad(lambda kw: jnp.sum(fn(**kw)))(inputs)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  grad = jax.grad(lambda kw: jnp.sum(losses.dpo_loss(**kw, beta=0.1)))(inputs)
  # Policy far ahead on pair 0 (when extreme > 0) saturates: no gradient left; far behind: beta.
  expected = 0.0 if extreme > 0 else -0.1
  np.testing.assert_allclose(grad["policy_chosen_logps"][0], expected, atol=1e-6)


def test_check_grads_of_the_preference_losses():
  rng = np.random.default_rng(11)
  inputs = _dpo_inputs(*(rng.normal(-3.0, 1.0, 3) for _ in range(4)))
  for fn in (lambda pc: losses.dpo_loss(**{**inputs, "policy_chosen_logps": pc}, beta=0.7,
                                        label_smoothing=0.1),
             lambda pc: losses.ipo_loss(**{**inputs, "policy_chosen_logps": pc}, beta=0.7),
             lambda c: losses.bradley_terry_loss(chosen_rewards=c,
                                                 rejected_rewards=inputs["policy_rejected_logps"],
                                                 margin=0.3)):
    jtu.check_grads(fn, (inputs["policy_chosen_logps"],), order=1, modes=("rev",), atol=1e-2,
                    rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# PPO.
# ------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values_and_properties():
  logp = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
  ref = jnp.log(jnp.array([[0.25, 0.25, 0.4]]))
  d = np.log([[0.5, 1.0, 4.0]])  # log ref - log pi
  np.testing.assert_allclose(rl_losses.kl_k1(log_probs=logp, ref_log_probs=ref), -d, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(rl_losses.kl_k2(log_probs=logp, ref_log_probs=ref), 0.5 * d ** 2,
                             rtol=1e-6, atol=1e-7)
  k3 = rl_losses.kl_k3(log_probs=logp, ref_log_probs=ref)
  np.testing.assert_allclose(k3, [[0.5 - 1 + np.log(2.0), 0.0, 3.0 - np.log(4.0)]], rtol=1e-5,
                             atol=1e-7)
  # k1 and k3 are unbiased for KL(pi || ref) under samples from pi: exact expectation here.
  p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
  kl = np.sum(p * np.log(p / q))
  for est in (rl_losses.kl_k1, rl_losses.kl_k3):
    per_token = est(log_probs=jnp.log(p)[None], ref_log_probs=jnp.log(q)[None])[0]
    np.testing.assert_allclose(np.sum(p * per_token), kl, rtol=1e-5)
  assert np.all(np.asarray(k3) >= 0)


def test_per_token_rewards_put_the_penalty_on_response_tokens_and_the_score_last():
  kl = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
  mask = jnp.array([[True, True, True, False], [True, False, False, False]])
  rewards = rl_losses.per_token_rewards(kl=kl, kl_coef=0.5, score=jnp.array([10.0, -1.0]),
                                     last_index=jnp.array([2, 0]), mask=mask)
  np.testing.assert_allclose(rewards, [[-0.5, -1.0, -1.5 + 10.0, 0.0], [-2.5 - 1.0, 0, 0, 0]])
  # A traced coefficient (from a KL controller inside jit) works the same.
  jitted = jax.jit(lambda c: rl_losses.per_token_rewards(kl=kl, kl_coef=c, score=jnp.zeros(2),
                                                      last_index=jnp.array([2, 0]), mask=mask))
  np.testing.assert_allclose(jitted(jnp.float32(0.5)), np.where(mask, -0.5 * kl, 0.0))


def _naive_gae(rewards, values, mask, gamma, lam):
  """Per row, a backwards Python loop over the real (mask != 0) positions only."""
  adv = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    next_value = next_adv = 0.0
    for t in reversed(np.flatnonzero(mask[b])):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      adv[b, t] = next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
  return adv, np.where(mask, adv + values, 0.0)


def test_gae_matches_a_naive_loop_on_ragged_masks():
  rng = np.random.default_rng(12)
  rewards, values = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
  mask = np.array([[1, 1, 1, 1, 1, 1],   # full
                   [1, 1, 1, 0, 0, 0],   # right-padded
                   [0, 0, 1, 1, 1, 0],   # prompt positions first, then padding
                   [1, 0, 1, 1, 0, 1],   # holes are skipped
                   [0, 0, 0, 0, 0, 0]],  # empty
                  bool)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
    adv, ret = rl_losses.gae_advantages(rewards=rewards, values=values, mask=mask, gamma=gamma,
                                     lam=lam)
    naive_adv, naive_ret = _naive_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, naive_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, naive_ret, rtol=1e-5, atol=1e-6)
    assert adv.dtype == jnp.float32 and adv.shape == (5, 6)
  # Row 1 by the textbook sum A_t = sum_l (gamma lam)^l delta_{t+l}, with V_3 = 0 (terminal).
  gamma, lam = 0.9, 0.5
  adv, _ = rl_losses.gae_advantages(rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam)
  v = np.append(values[1, :3], 0.0)
  delta = rewards[1, :3] + gamma * v[1:] - v[:3]
  textbook = [sum((gamma * lam) ** l * delta[t + l] for l in range(3 - t)) for t in range(3)]
  np.testing.assert_allclose(adv[1, :3], textbook, rtol=1e-5)
  # Entries at masked positions (garbage included) change nothing.
  rewards_poisoned, values_poisoned = rewards.copy(), values.copy()
  rewards_poisoned[~mask], values_poisoned[~mask] = np.nan, 1e9
  adv_p, ret_p = rl_losses.gae_advantages(rewards=rewards_poisoned, values=values_poisoned,
                                       mask=mask, gamma=gamma, lam=lam)
  np.testing.assert_array_equal(adv_p, adv)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
  rewards = np.array([[0.0, -0.1, 0.0, 2.0, 0.0]])
  values = np.array([[0.3, 1.0, -1.0, 0.5, 9.0]])
  mask = np.array([[1, 1, 1, 1, 0]], bool)
  adv, ret = rl_losses.gae_advantages(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(ret, [[1.9, 1.9, 2.0, 2.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(adv, [[1.6, 0.9, 3.0, 1.5, 0.0]], rtol=1e-6)


def test_masked_mean_var_and_whiten():
  rng = np.random.default_rng(13)
  x = rng.normal(3.0, 2.0, (3, 4)).astype(np.float32)
  mask = rng.random((3, 4)) < 0.6
  mask[0, 0] = True
  np.testing.assert_allclose(rl_losses.masked_mean(values=x, mask=mask), x[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(rl_losses.masked_var(values=x, mask=mask), x[mask].var(), rtol=1e-5)
  white = rl_losses.masked_whiten(values=x, mask=mask)
  np.testing.assert_allclose(white[mask], (x[mask] - x[mask].mean()) / x[mask].std(), rtol=1e-4,
                             atol=1e-5)
  assert not np.any(np.asarray(white)[~mask])
  kept = rl_losses.masked_whiten(values=x, mask=mask, shift_mean=False)
  np.testing.assert_allclose(kept[mask], np.asarray(white)[mask] + x[mask].mean(), rtol=1e-5)
  # Float weights; nothing masked in gives 0 (not NaN); garbage under the mask is ignored.
  w = np.array([1.0, 3.0, 0.0], np.float32)
  assert float(rl_losses.masked_mean(values=jnp.array([1.0, 5.0, jnp.nan]), mask=w)) == 4.0
  none = np.zeros_like(mask)
  assert float(rl_losses.masked_mean(values=x, mask=none)) == 0.0
  assert float(rl_losses.masked_var(values=x, mask=none)) == 0.0
  assert not np.any(rl_losses.masked_whiten(values=x, mask=none))


def test_ppo_policy_loss_hand_values():
  # ratio 1.5, 0.5, 1.1, 0.5 (masked); advantages +1, +1, -2, +5.
  log_probs = jnp.log(jnp.array([[1.5, 0.5], [1.1, 0.5]]))
  advantages = jnp.array([[1.0, 1.0], [-2.0, 5.0]])
  mask = jnp.array([[True, True], [True, False]])
  loss_sum, count, aux = rl_losses.ppo_policy_loss(
      log_probs=log_probs, old_log_probs=jnp.zeros((2, 2)), advantages=advantages, mask=mask,
      clip_eps=0.2)
  # max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2 (a tie).
  np.testing.assert_allclose(loss_sum, -1.2 - 0.5 + 2.2, rtol=1e-6)
  assert float(count) == 3.0 and float(aux["clip_fraction"]) == 1.0
  ratio = np.array([1.5, 0.5, 1.1])
  np.testing.assert_allclose(aux["approx_kl"], np.sum(ratio - 1 - np.log(ratio)), rtol=1e-5)
  # The clipped token gets no gradient; the others get -A * ratio * mask.
  grad = jax.grad(lambda lp: rl_losses.ppo_policy_loss(
      log_probs=lp, old_log_probs=jnp.zeros((2, 2)), advantages=advantages, mask=mask,
      clip_eps=0.2)[0])(log_probs)
  np.testing.assert_allclose(grad, [[0.0, -0.5], [2.2, 0.0]], rtol=1e-5, atol=1e-7)


def test_ppo_value_loss_hand_values():
  values = jnp.array([[1.0, 0.5, -0.1, 7.0]])
  old_values = jnp.array([[0.0, 0.0, 0.0, 0.0]])
  returns = jnp.array([[1.0, 1.0, -1.0, 0.0]])
  mask = jnp.array([[True, True, True, False]])
  loss_sum, count, aux = rl_losses.ppo_value_loss(values=values, old_values=old_values,
                                               returns=returns, mask=mask, clip_eps=0.2)
  # Token 0: max(0, 0.8^2); token 1: max(0.5^2, 0.8^2); token 2: max(0.9^2, 0.9^2).
  np.testing.assert_allclose(loss_sum, 0.5 * (0.64 + 0.64 + 0.81), rtol=1e-5)
  assert float(count) == 3.0 and float(aux["value_clip_fraction"]) == 2.0
  grad = jax.grad(lambda v: rl_losses.ppo_value_loss(values=v, old_values=old_values,
                                                  returns=returns, mask=mask,
                                                  clip_eps=0.2)[0])(values)
  # Clipped tokens 0 and 1 get no gradient; token 2 gets V - R; the masked token nothing.
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.9, 0.0]], atol=1e-6)


def test_entropy_from_logits_matches_naive_and_is_safe_with_minus_inf():
  logits, _, mask = _random_case(14)
  probs = np.exp(logits.astype(np.float64))
  probs /= probs.sum(-1, keepdims=True)
  naive = -(probs * np.log(probs)).sum(-1)
  np.testing.assert_allclose(rl_losses.entropy_from_logits(logits=logits, mask=mask),
                             np.where(mask, naive, 0.0), rtol=1e-5, atol=1e-6)
  filtered = logits.copy()
  filtered[..., :3] = -np.inf  # top-k style filtering
  filtered[~mask] = np.nan
  fn = lambda z: jnp.sum(rl_losses.entropy_from_logits(logits=z, mask=mask))
  rest = np.exp(logits[..., 3:].astype(np.float64))
  rest /= rest.sum(-1, keepdims=True)
  np.testing.assert_allclose(fn(filtered), (-(rest * np.log(rest)).sum(-1))[mask].sum(),
                             rtol=1e-5)
  grad = jax.grad(fn)(filtered)
  assert np.all(np.isfinite(grad)) and not np.any(grad[~mask]) and not np.any(grad[..., :3])


def test_explained_variance():
  values = np.array([[1.0, 2.0, 3.0, 50.0]])
  returns = np.array([[1.5, 2.0, 3.5, -50.0]])
  mask = np.array([[True, True, True, False]])
  r, v = returns[mask], values[mask]
  np.testing.assert_allclose(
      rl_losses.explained_variance(values=values, returns=returns, mask=mask),
      1 - np.var(r - v) / np.var(r), rtol=1e-5)
  assert float(rl_losses.explained_variance(values=returns, returns=returns, mask=mask)) == 1.0
  assert float(rl_losses.explained_variance(values=values, returns=np.ones((1, 4)), mask=mask)) == 0


def test_rl_losses_ignore_masked_out_entries():
  rng = np.random.default_rng(15)
  shape = (2, 5)
  arrays = {k: rng.normal(size=shape).astype(np.float32)
            for k in ("log_probs", "old_log_probs", "advantages", "values", "old_values",
                      "returns")}
  mask = rng.random(shape) < 0.6
  poisoned = {k: np.where(mask, v, 1e6).astype(np.float32) for k, v in arrays.items()}
  calls = (
      lambda a: rl_losses.ppo_policy_loss(log_probs=a["log_probs"],
                                       old_log_probs=a["old_log_probs"],
                                       advantages=a["advantages"], mask=mask, clip_eps=0.2),
      lambda a: rl_losses.ppo_value_loss(values=a["values"], old_values=a["old_values"],
                                      returns=a["returns"], mask=mask, clip_eps=0.2),
      lambda a: rl_losses.explained_variance(values=a["values"], returns=a["returns"], mask=mask),
      lambda a: rl_losses.masked_whiten(values=a["advantages"], mask=mask),
      lambda a: rl_losses.per_token_rewards(kl=a["log_probs"], kl_coef=0.1, score=jnp.ones(2),
                                         last_index=jnp.array([1, 3]), mask=mask),
  )
  for call in calls:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
                 call(arrays), call(poisoned))


def test_new_losses_jit_equals_eager_and_return_float32_for_bf16_inputs():
  rng = np.random.default_rng(16)
  bf16 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)
  mask = jnp.asarray(rng.random((2, 3)) < 0.7)
  logits, targets = bf16(2, 3, 5), jnp.asarray(rng.integers(0, 5, (2, 3)))
  pair = dict(policy_chosen_logps=bf16(2), policy_rejected_logps=bf16(2),
              reference_chosen_logps=bf16(2), reference_rejected_logps=bf16(2))
  a, b, c = bf16(2, 3), bf16(2, 3), bf16(2, 3)
  calls = {
      "bt": lambda: losses.bradley_terry_loss(chosen_rewards=pair["policy_chosen_logps"],
                                              rejected_rewards=pair["policy_rejected_logps"]),
      "seq": lambda: losses.sequence_log_probs(logits=logits, targets=targets, mask=mask),
      "dpo": lambda: losses.dpo_loss(**pair, beta=0.1, label_smoothing=0.1),
      "ipo": lambda: losses.ipo_loss(**pair, beta=0.1),
      "k3": lambda: rl_losses.kl_k3(log_probs=a, ref_log_probs=b),
      "gae": lambda: rl_losses.gae_advantages(rewards=a, values=b, mask=mask, gamma=1.0, lam=0.95),
      "policy": lambda: rl_losses.ppo_policy_loss(log_probs=a, old_log_probs=b, advantages=c,
                                               mask=mask, clip_eps=0.2),
      "value": lambda: rl_losses.ppo_value_loss(values=a, old_values=b, returns=c, mask=mask,
                                             clip_eps=0.2),
      "entropy": lambda: rl_losses.entropy_from_logits(logits=logits, mask=mask),
  }
  for name, call in calls.items():
    eager = call()
    jitted = jax.jit(call)()
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      assert e.dtype == jnp.float32, name
      np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6, err_msg=name)
