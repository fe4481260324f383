"""Critic-free RL pieces the optax way: hand-computed values, a naive loop over groups, the
invariances the estimators promise, masks and padding, extreme log-ratios, jit equals eager, and
the (sum, count) normalisations giving the full-batch value when a batch is cut in two."""

import doctest
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from jaxlm import group_rl_losses as grl
from jaxlm import rl_losses

ESTIMATORS = (grl.grpo_advantages, grl.rloo_advantages, grl.dr_grpo_advantages)
NORMALISERS = {
    "token": grl.token_level_sums,
    "sequence": grl.sequence_level_sums,
    "constant": lambda **kw: grl.constant_normalizer_sums(**kw, max_response_len=8),
}


def _naive_advantages(scores, valid, eps=1e-4):
  """GRPO, RLOO and Dr. GRPO in float64, one group at a time, from the papers' formulas."""
  out = {name: np.zeros(scores.shape) for name in ("grpo", "rloo", "dr_grpo")}
  for p in range(scores.shape[0]):
    idx = [i for i in range(scores.shape[1]) if valid[p, i]]
    r = np.asarray([scores[p, i] for i in idx], np.float64)
    if len(r) == 0 or np.all(r == r[0]):
      continue
    mean, std = r.mean(), r.std(ddof=1)  # the sample std, as trl's nanstd
    for k, i in enumerate(idx):
      others = np.delete(r, k)
      out["grpo"][p, i] = (r[k] - mean) / (std + eps)
      out["rloo"][p, i] = r[k] - others.mean()
      out["dr_grpo"][p, i] = r[k] - mean
  return out


def _random_groups(seed, prompts=6, group=5):
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal((prompts, group)).astype(np.float32)
  valid = rng.random((prompts, group)) < 0.8
  valid[0] = True                                 # a full group
  valid[1] = False                                # a padding group (a partial batch)
  valid[2] = [True] + [False] * (group - 1)       # one valid reply: no baseline
  scores[3] = 0.25                                # a constant group
  scores = np.where(valid, scores, np.nan)        # padding carries garbage
  return scores, valid


def _random_rollout(seed, batch=6, length=7, scale=0.3):
  rng = np.random.default_rng(seed)
  old = (-rng.random((batch, length)) * 3).astype(np.float32)
  log_probs = (old + scale * rng.standard_normal((batch, length))).astype(np.float32)
  advantages = rng.standard_normal(batch).astype(np.float32)
  lengths = rng.integers(1, length + 1, batch)
  mask = np.arange(length)[None, :] < lengths[:, None]
  return log_probs, old, advantages, mask


@pytest.mark.parametrize("module", [grl], ids=lambda m: m.__name__)
def test_the_docstring_examples_run(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 8 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# Advantages.
# ---------------------------------------------------------------------------------------------


def test_advantages_hand_values():
  # Group 0: (1, 2, 3, 6): mean 3, centred (-2, -1, 0, 3), sample var 14/3.
  # Group 1: (1, 2, 3) and a padding reply (NaN): mean 2, centred (-1, 0, 1), sample std 1.
  scores = jnp.array([[1.0, 2.0, 3.0, 6.0], [1.0, 2.0, 3.0, jnp.nan]])
  valid = jnp.array([[True] * 4, [True, True, True, False]])
  centred = np.array([[-2.0, -1.0, 0.0, 3.0], [-1.0, 0.0, 1.0, 0.0]])
  # The sample std (n - 1), as trl; the population std would give sqrt(7/2) and sqrt(2/3).
  np.testing.assert_allclose(grl.grpo_advantages(scores=scores, valid=valid),
                             centred / (np.array([[np.sqrt(14 / 3)], [1.0]]) + 1e-4), rtol=1e-6)
  # Leave-one-out: 1 - (2 + 3 + 6) / 3 = -8/3, ...; 1 - (2 + 3) / 2 = -1.5, ...
  np.testing.assert_allclose(grl.rloo_advantages(scores=scores, valid=valid),
                             [[-8 / 3, -4 / 3, 0.0, 4.0], [-1.5, 0.0, 1.5, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(grl.dr_grpo_advantages(scores=scores, valid=valid), centred,
                             rtol=1e-6)
  # Without `valid`, every reply counts (and a NaN score would poison its group).
  np.testing.assert_allclose(grl.dr_grpo_advantages(scores=scores[:1]), centred[:1], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_match_a_naive_loop_over_groups(seed):
  scores, valid = _random_groups(seed)
  naive = _naive_advantages(scores, valid)
  for fn, name in zip(ESTIMATORS, ("grpo", "rloo", "dr_grpo")):
    np.testing.assert_allclose(fn(scores=scores, valid=valid), naive[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_shifting_a_group_changes_no_advantage_and_scaling_scales_as_documented():
  rng = np.random.default_rng(3)
  scores = rng.standard_normal((4, 6)).astype(np.float32)
  valid = rng.random((4, 6)) < 0.8
  shift = np.array([[-3.0], [0.5], [7.0], [100.0]], np.float32)  # a different constant per group
  grpo, rloo, dr_grpo = (jax.jit(lambda s, fn=fn: fn(scores=s, valid=valid))
                         for fn in ESTIMATORS)
  for fn in (grpo, rloo, dr_grpo):
    np.testing.assert_allclose(fn(scores + shift), fn(scores), atol=2e-4)
  for scale in (0.5, 10.0):
    for fn in (rloo, dr_grpo):
      np.testing.assert_allclose(fn(scale * scores), scale * fn(scores), rtol=1e-5, atol=1e-6)
    # GRPO is scale-free up to eps = 1e-4 against a std of about 1.
    np.testing.assert_allclose(grpo(scale * scores), grpo(scores), rtol=1e-3, atol=1e-4)


def test_constant_groups_and_single_replies_give_exact_zeros_with_finite_gradients():
  # Equal scores need not average back to themselves in float32 (seven 1e8s give a mean 8 off,
  # seven 0.1s one 7e-9 off); that rounding error must not become a signal (GRPO divides it by
  # a std of about 0 plus eps: -0.93 for the 1e8s without the exact constant-group check).
  scores = jnp.array([[0.1] * 7, [1e8] * 7, [-3.0] * 7, [2.0, 5.0, 0, 0, 0, 0, 0]])
  valid = jnp.array([[True] * 7, [True] * 7, [True] * 7, [True, False, False, False, False,
                                                           False, False]])
  for fn in ESTIMATORS:
    adv, grad = jax.jit(jax.value_and_grad(
        lambda s, fn=fn: jnp.sum(jnp.abs(fn(scores=s, valid=valid)))))(scores)
    assert float(adv) == 0.0 and np.all(np.isfinite(grad)), fn.__name__


def test_padding_rows_and_padding_groups_change_nothing():
  rng = np.random.default_rng(4)
  scores = rng.standard_normal((3, 4)).astype(np.float32)
  # Each group padded with two garbage replies, and a whole garbage group appended.
  padded = np.concatenate([scores, np.full((3, 2), np.nan, np.float32)], axis=1)
  padded = np.concatenate([padded, np.full((1, 6), np.inf, np.float32)], axis=0)
  valid = np.zeros((4, 6), bool)
  valid[:3, :4] = True
  outs, plain = jax.jit(lambda: ([fn(scores=padded, valid=valid) for fn in ESTIMATORS],
                                 [fn(scores=scores) for fn in ESTIMATORS]))()
  for out, expected in zip(outs, plain):
    out = np.asarray(out)
    np.testing.assert_allclose(out[:3, :4], expected, rtol=1e-6)
    assert np.all(out[~valid] == 0.0) and np.all(np.isfinite(out))


def test_layout_is_checked_at_trace_time():
  with pytest.raises(ValueError, match="G >= 2"):
    grl.rloo_advantages(scores=jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match=r"\[P, G\]"):
    grl.grpo_advantages(scores=jnp.zeros(8))


# ---------------------------------------------------------------------------------------------
# The clipped objective.
# ---------------------------------------------------------------------------------------------


def test_clipped_policy_loss_hand_values_with_an_asymmetric_clip():
  # Row 0 (A = +1): ratio 1.5 (clipped high at 1.28), 1.25 (inside the higher clip), 0.5.
  # Row 1 (A = -2): ratio 0.5 (clipped low at 0.8), 1.5 (unclipped: -min(-3, -2.56) = 3),
  #                 and a masked token holding garbage.
  log_probs = jnp.log(jnp.array([[1.5, 1.25, 0.5], [0.5, 1.5, 1.0]]))
  old = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, jnp.nan]])
  advantages = jnp.array([1.0, -2.0])
  mask = jnp.array([[True, True, True], [True, True, False]])
  kwargs = dict(old_log_probs=old, advantages=advantages, mask=mask, clip_eps_low=0.2,
                clip_eps_high=0.28)
  token_losses, aux = grl.clipped_policy_loss(log_probs=log_probs, **kwargs)
  np.testing.assert_allclose(token_losses, [[-1.28, -1.25, -0.5], [1.6, 3.0, 0.0]], rtol=1e-6)
  assert {k: float(v) for k, v in aux.items() if k != "approx_kl"} == {
      "clip_low": 1.0, "clip_high": 1.0, "clip_fraction": 2.0, "tokens": 5.0}
  ratio = np.array([1.5, 1.25, 0.5, 0.5, 1.5])
  np.testing.assert_allclose(aux["approx_kl"], np.sum(ratio - 1 - np.log(ratio)), rtol=1e-5)
  # Clipped tokens get no gradient; the others -A * ratio.
  grad = jax.grad(lambda lp: jnp.sum(grl.clipped_policy_loss(log_probs=lp, **kwargs)[0]))(
      log_probs)
  np.testing.assert_allclose(grad, [[0.0, -1.25, -0.5], [0.0, 3.0, 0.0]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_clipped_policy_loss_matches_the_naive_min_formula(seed):
  log_probs, old, advantages, mask = _random_rollout(seed, scale=0.5)
  token_losses, aux = grl.clipped_policy_loss(log_probs=log_probs, old_log_probs=old,
                                              advantages=advantages, mask=mask,
                                              clip_eps_low=0.2, clip_eps_high=0.28)
  ratio = np.exp(log_probs.astype(np.float64) - old)
  a = advantages[:, None].astype(np.float64)
  naive = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.28) * a)
  np.testing.assert_allclose(token_losses, np.where(mask, naive, 0.0), rtol=1e-5, atol=1e-6)
  low, high = (ratio < 0.8) & (a < 0) & mask, (ratio > 1.28) & (a > 0) & mask
  assert float(aux["clip_low"]) == low.sum() and float(aux["clip_high"]) == high.sum()
  assert float(aux["tokens"]) == mask.sum()


@jax.jit
def _symmetric_and_ppo(log_probs, old, advantages, per_token_adv, mask):
  """(loss sum, aux, gradient) of eps_low == eps_high, and ppo_policy_loss's, on one rollout."""
  def ours(lp):
    token_losses, aux = grl.clipped_policy_loss(log_probs=lp, old_log_probs=old,
                                                advantages=advantages, mask=mask,
                                                clip_eps_low=0.2, clip_eps_high=0.2)
    return grl.token_level_sums(token_losses=token_losses, mask=mask)[0], aux
  def ppo(lp):
    loss_sum, count, aux = rl_losses.ppo_policy_loss(log_probs=lp, old_log_probs=old,
                                                     advantages=per_token_adv, mask=mask,
                                                     clip_eps=0.2)
    return loss_sum, (count, aux)
  (loss_sum, aux), grad = jax.value_and_grad(ours, has_aux=True)(log_probs)
  (ppo_sum, (count, ppo_aux)), ppo_grad = jax.value_and_grad(ppo, has_aux=True)(log_probs)
  return (loss_sum, aux, grad), (ppo_sum, count, ppo_aux, ppo_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_symmetric_clip_is_ppo_policy_loss(seed):
  log_probs, old, advantages, mask = _random_rollout(seed, scale=0.5)
  per_token_adv = np.broadcast_to(advantages[:, None], mask.shape)
  ours, ppo = _symmetric_and_ppo(log_probs, old, advantages, per_token_adv, mask)
  (loss_sum, aux, grad), (ppo_sum, ppo_count, ppo_aux, ppo_grad) = ours, ppo
  np.testing.assert_allclose(loss_sum, ppo_sum, rtol=1e-5)
  assert float(aux["tokens"]) == float(ppo_count)
  assert float(aux["clip_fraction"]) == float(ppo_aux["clip_fraction"])
  np.testing.assert_allclose(aux["approx_kl"], ppo_aux["approx_kl"], rtol=1e-5)
  np.testing.assert_allclose(grad, ppo_grad, rtol=1e-5, atol=1e-7)


def test_finite_values_and_gradients_under_extreme_log_ratios_and_masks():
  # log-ratios of +-1000 (exp overflows float32) where the clip or a zero ratio makes the loss
  # finite; +50 with A < 0 (unbounded, but representable); garbage at masked positions.
  log_ratio = np.array([[1000.0, -1000.0, 0.1, np.nan], [-1000.0, 50.0, -np.inf, 0.0]],
                       np.float32)
  advantages = np.array([1.0, -1.0], np.float32)
  mask = np.array([[True, True, True, False], [True, True, False, False]])
  old = np.full(mask.shape, -2.0, np.float32)
  log_probs = old + log_ratio
  fn = lambda lp: grl.clipped_policy_loss(log_probs=lp, old_log_probs=old, advantages=advantages,
                                          mask=mask, clip_eps_low=0.2, clip_eps_high=0.28)[0]
  token_losses = jax.jit(fn)(log_probs)
  np.testing.assert_allclose(token_losses, [[-1.28, 0.0, -np.exp(0.1), 0.0],
                                            [0.8, np.exp(50.0), 0.0, 0.0]], rtol=1e-5)
  grads = jax.jit(lambda lp: {name: jax.grad(
      lambda x, reduce=reduce: reduce(token_losses=fn(x), mask=mask)[0])(lp)
                              for name, reduce in NORMALISERS.items()})(log_probs)
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
    assert not np.any(grad[~mask]) and grad[0, 0] == 0.0 and grad[1, 0] == 0.0, name
  # The k3 loss term: finite where the policy is far more likely than the reference, masked
  # garbage ignored.
  ref = np.array([[-90.0, 0.0, -2.0, np.nan], [-1.0, -1.0, 0.0, -np.inf]], np.float32)
  kl_fn = lambda lp: jnp.sum(grl.token_kl_k3(log_probs=lp, ref_log_probs=ref, mask=mask))
  kl, grad = jax.jit(jax.value_and_grad(kl_fn))(np.where(mask, -1.0, np.nan).astype(np.float32))
  assert np.isfinite(kl) and np.all(np.isfinite(grad)) and not np.any(grad[~mask])


def test_check_grads():
  # Ratios kept away from the clip boundaries (kinks), where finite differences are meaningless.
  old = jnp.zeros((2, 4))
  log_probs = jnp.log(jnp.array([[1.5, 1.1, 0.9, 0.6], [0.5, 0.95, 1.4, 1.0]]))
  advantages = jnp.array([0.7, -1.3])
  mask = jnp.array([[True, True, True, True], [True, True, True, False]])
  ref = jnp.array([[-0.3, 0.2, 0.1, -0.5], [0.4, -0.2, 0.0, 0.3]])
  loss = lambda lp: grl.clipped_policy_loss(log_probs=lp, old_log_probs=old,
                                            advantages=advantages, mask=mask, clip_eps_low=0.2,
                                            clip_eps_high=0.28)[0]
  def fn(lp):  # the three normalisations at once, to compile once
    token_losses = loss(lp) + 0.1 * grl.token_kl_k3(log_probs=lp, ref_log_probs=ref, mask=mask)
    return jnp.stack([reduce(token_losses=token_losses, mask=mask)[0]
                      for reduce in NORMALISERS.values()])
  jtu.check_grads(jax.jit(fn), (log_probs,), order=2, modes=("rev",), atol=1e-2, rtol=1e-2)
  jtu.check_grads(jax.jit(fn), (log_probs,), order=1, modes=("fwd",), atol=1e-2, rtol=1e-2)
  jtu.check_grads(jax.jit(lambda lp: grl.kl_penalized_scores(
      scores=jnp.array([1.0, 2.0]), log_probs=lp, ref_log_probs=ref, mask=mask, kl_coef=0.3)),
                  (log_probs,), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Normalisation and KL.
# ---------------------------------------------------------------------------------------------


def test_normalisations_match_their_formulas():
  rng = np.random.default_rng(5)
  token_losses = rng.standard_normal((5, 6)).astype(np.float32)
  mask = np.arange(6)[None, :] < np.array([6, 1, 3, 0, 4])[:, None]  # row 3 is padding
  lengths = mask.sum(-1)
  real = lengths > 0
  row_sums = np.where(mask, token_losses, 0.0).sum(-1)
  expected = {"token": row_sums.sum() / lengths.sum(),
              "sequence": np.mean(row_sums[real] / lengths[real]),
              "constant": row_sums.sum() / (real.sum() * 8)}
  for name, reduce in NORMALISERS.items():
    loss_sum, count = reduce(token_losses=token_losses, mask=mask)
    np.testing.assert_allclose(loss_sum / count, expected[name], rtol=1e-5, err_msg=name)


def _sums(log_probs, old, advantages, mask, ref, reduce):
  token_losses, _ = grl.clipped_policy_loss(log_probs=log_probs, old_log_probs=old,
                                            advantages=advantages, mask=mask, clip_eps_low=0.2,
                                            clip_eps_high=0.28)
  token_losses += 0.05 * grl.token_kl_k3(log_probs=log_probs, ref_log_probs=ref, mask=mask)
  return reduce(token_losses=token_losses, mask=mask)


@jax.jit
def _sums_and_grads(log_probs, old, advantages, mask, ref):
  """{normalisation: ((sum, count), d sum / d log_probs)} of one (micro)batch."""
  out = {}
  for name, reduce in NORMALISERS.items():
    loss_sum = lambda lp, reduce=reduce: _sums(lp, old, advantages, mask, ref, reduce)[0]
    out[name] = (_sums(log_probs, old, advantages, mask, ref, reduce),
                 jax.grad(loss_sum)(log_probs))
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_two_microbatches_give_the_full_batch_value_and_gradient(seed):
  # Halves with different token and reply counts (and a padding row), as under accumulation.
  log_probs, old, advantages, mask = _random_rollout(seed, batch=8)
  mask[6] = False
  args = (log_probs, old, advantages, mask, old - 0.2)
  full = _sums_and_grads(*args)
  first = _sums_and_grads(*(x[:4] for x in args))
  second = _sums_and_grads(*(x[4:] for x in args))
  for name in NORMALISERS:
    (full_sum, full_count), full_grad = full[name]
    (a_sum, a_count), a_grad = first[name]
    (b_sum, b_count), b_grad = second[name]
    np.testing.assert_allclose((a_sum + b_sum) / (a_count + b_count), full_sum / full_count,
                               rtol=1e-5, err_msg=name)
    # What the train step does: add the gradients of the sums, divide once by the total count.
    np.testing.assert_allclose(np.concatenate([a_grad, b_grad]) / (a_count + b_count),
                               full_grad / full_count, rtol=1e-5, atol=1e-7, err_msg=name)


def test_padding_rows_do_not_change_the_normalised_loss():
  log_probs, old, advantages, mask = _random_rollout(6)
  pad = lambda x, v: np.concatenate([x, np.full((2,) + x.shape[1:], v, x.dtype)])
  @jax.jit
  def losses_and_aux(lp, o, a, m):
    token_losses, aux = grl.clipped_policy_loss(log_probs=lp, old_log_probs=o, advantages=a,
                                                mask=m, clip_eps_low=0.2, clip_eps_high=0.28)
    return {name: jnp.divide(*reduce(token_losses=token_losses, mask=m))
            for name, reduce in NORMALISERS.items()}, aux
  plain = losses_and_aux(log_probs, old, advantages, mask)
  padded = losses_and_aux(pad(log_probs, np.nan), pad(old, np.inf), pad(advantages, np.nan),
                          pad(mask, False))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plain, padded)


def test_kl_terms_match_the_existing_estimators():
  rng = np.random.default_rng(7)
  log_probs = -rng.random((3, 5)).astype(np.float32) * 4
  ref = -rng.random((3, 5)).astype(np.float32) * 4
  mask = rng.random((3, 5)) < 0.7
  np.testing.assert_allclose(grl.token_kl_k3(log_probs=log_probs, ref_log_probs=ref, mask=mask),
                             np.where(mask, rl_losses.kl_k3(log_probs=log_probs,
                                                            ref_log_probs=ref), 0.0), rtol=1e-6)
  scores = rng.standard_normal(3).astype(np.float32)
  naive = scores - 0.2 * np.array([sum(log_probs[b, t] - ref[b, t] for t in range(5) if mask[b, t])
                                   for b in range(3)])
  penalized = grl.kl_penalized_scores(scores=scores, log_probs=log_probs, ref_log_probs=ref,
                                      mask=mask, kl_coef=0.2)
  np.testing.assert_allclose(penalized, naive, rtol=1e-5)
  # A traced coefficient (a KL controller inside jit) works the same.
  jitted = jax.jit(lambda c: grl.kl_penalized_scores(scores=scores, log_probs=log_probs,
                                                     ref_log_probs=ref, mask=mask, kl_coef=c))
  np.testing.assert_allclose(jitted(jnp.float32(0.2)), penalized, rtol=1e-6)


def test_jit_equals_eager():
  scores, valid = _random_groups(8)
  log_probs, old, advantages, mask = _random_rollout(8)
  calls = [(fn, dict(scores=scores, valid=valid)) for fn in ESTIMATORS]
  calls += [(grl.clipped_policy_loss, dict(log_probs=log_probs, old_log_probs=old,
                                           advantages=advantages, mask=mask, clip_eps_low=0.2,
                                           clip_eps_high=0.28)),
            (grl.token_kl_k3, dict(log_probs=log_probs, ref_log_probs=old, mask=mask)),
            (grl.kl_penalized_scores, dict(scores=advantages, log_probs=log_probs,
                                           ref_log_probs=old, mask=mask, kl_coef=0.1))]
  calls += [(fn, dict(token_losses=log_probs, mask=mask)) for fn in NORMALISERS.values()]
  for fn, kwargs in calls:
    static = {k: v for k, v in kwargs.items() if isinstance(v, float)}
    arrays = {k: v for k, v in kwargs.items() if k not in static}
    eager = fn(**kwargs)
    jitted = jax.jit(lambda kw, fn=fn, static=static: fn(**kw, **static))(arrays)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager,
                 jitted)


def test_group_statistics_on_a_batch_sharded_array_need_no_collectives():
  """The [P, G] layout: with whole groups per device, the reshape and reductions stay local."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from jaxlm import group_rl_losses as grl
      mesh = Mesh(np.array(jax.devices()), ("data",))
      shard = NamedSharding(mesh, P("data"))
      scores = np.random.default_rng(0).standard_normal(32).astype(np.float32)  # 8 prompts x 4
      valid = np.arange(32) < 30  # a partial batch
      fn = jax.jit(lambda s, v: grl.grpo_advantages(scores=s.reshape(-1, 4),
                                                    valid=v.reshape(-1, 4)).reshape(-1),
                   out_shardings=shard)
      args = jax.device_put(scores, shard), jax.device_put(valid, shard)
      hlo = fn.lower(*args).compile().as_text()
      for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo, op
      np.testing.assert_allclose(fn(*args), fn(scores, valid), rtol=1e-6)
      print("ok", len(jax.devices()))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["ok", "4"]
