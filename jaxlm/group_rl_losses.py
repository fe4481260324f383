"""Critic-free RL (GRPO, RLOO, Dr. GRPO, DAPO): pure functions, keyword-only, float32, masked.

A new module rather than more of `jaxlm/rl_losses.py` (PPO's pieces), which it reuses: the
estimators here replace the critic and GAE with a baseline from the G replies to one prompt.

  advantages     grpo_advantages, rloo_advantages, dr_grpo_advantages: [P, G] -> [P, G]
  KL             kl_penalized_scores (k1 summed into the score), token_kl_k3 (k3 as a loss term)
  objective      clipped_policy_loss: per-token clipped ratio loss, asymmetric clip (clip-higher)
  normalisation  token_level_sums, sequence_level_sums, constant_normalizer_sums: (sum, count)

**Layout.** Group statistics take scores as [P, G] (P prompts, G replies each), not as [B]
scores with [B] group ids. A rollout keeps the G replies of a prompt in contiguous rows, so
`scores.reshape(-1, G)` is free, and under jit on a batch-sharded array whose per-device rows
are a multiple of G each device holds whole groups: the statistics are reductions along the
last axis, with no collective at all. Group ids would need a `segment_sum` with a static segment
count, whose scatter over a sharded axis becomes a cross-device reduction, and a check that the
ids are contiguous and in range. G is a static shape, so "RLOO needs G >= 2" is checked at trace
time. Groups of unequal size, partial batches and unscorable replies are the `valid` mask.

**Normalisation.** `clipped_policy_loss` returns per-token losses; one of the three reductions
turns them (plus `kl_coef * token_kl_k3(...)`, if the KL is a loss term) into the
`(loss_sum, count)` that `jaxlm.training.make_train_step` sums over microbatches and devices and
divides once, so every choice is exact under gradient accumulation and sharding::

  adv = grpo_advantages(scores=scores.reshape(-1, G), valid=valid.reshape(-1, G)).reshape(-1)
  token_losses, aux = clipped_policy_loss(log_probs=lp, old_log_probs=old_lp, advantages=adv,
                                          mask=mask, clip_eps_low=0.2, clip_eps_high=0.28)
  token_losses += kl_coef * token_kl_k3(log_probs=lp, ref_log_probs=ref_lp, mask=mask)
  loss_sum, count = token_level_sums(token_losses=token_losses, mask=mask)

The advantages are computed once per rollout, over the whole batch (all groups), before it is
cut into microbatches; treat them as constants. The names follow trl's `GRPOTrainer`
(`loss_type`: "dapo" = `token_level_sums` over the global batch, "grpo" = `sequence_level_sums`,
"dr_grpo" = `constant_normalizer_sums`; "bnpo" is the token level over a local batch only).
"""

import jax
import jax.numpy as jnp

from jaxlm import rl_losses

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Group-relative advantages.
# ---------------------------------------------------------------------------------------------


def _centred_scores(scores: Array, valid: Array | None):
  """(score - group mean, valid, valid count, group is constant), all over valid replies only.

  Invalid entries are replaced before any arithmetic, so NaN padding never reaches a statistic
  (nor a gradient). "Constant" compares the group's max and min, which is exact, where the
  centred scores of equal values can be off by a rounding error.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [P, G] (prompts, replies per prompt); got {scores.shape}")
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.broadcast_to(valid != 0,
                                                                             scores.shape)
  x = jnp.where(valid, scores.astype(jnp.float32), 0.0)
  n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  mean = jnp.sum(x, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  centred = jnp.where(valid, x - mean, 0.0)
  high = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
  low = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
  return centred, valid, n, high <= low


def grpo_advantages(*, scores: Array, valid: Array | None = None, eps: float = 1e-4) -> Array:
  r"""GRPO's group-normalised advantage (Shao et al. 2024, DeepSeekMath), one per reply.

  .. math:: A_{p,i} = \frac{r_{p,i} - \mu_p}{\sigma_p + \epsilon}, \qquad
     \sigma_p = \sqrt{\tfrac{1}{n_p - 1} \textstyle\sum_j (r_{p,j} - \mu_p)^2}

  over the n_p valid replies j of prompt p. sigma is the *sample* standard deviation (Bessel's
  n - 1), as in trl's `GRPOTrainer`, whose `nanstd` (trl/trainer/utils.py) multiplies the
  population variance by count / (count - 1), applied to `rewards.view(-1, num_generations)`
  when `scale_rewards="group"` (the default), with the same eps = 1e-4 added to the std.

  Args:
    scores: [P, G] float, the score of each reply (row p holds prompt p's G replies; reshape a
      rollout's [B] scores with `scores.reshape(-1, G)`).
    valid: optional [P, G] bool; invalid replies (padding rows of a partial batch, unscorable
      replies) take no part in their group's statistics and get advantage 0.
    eps: added to sigma (not the variance), so a tiny spread gives a large but finite value.

  Returns:
    [P, G] float32. 0 for invalid replies, for groups whose valid scores are all equal (no
    signal, and no NaN) and for groups with one valid reply (sigma undefined).

  Example:
    >>> grpo_advantages(scores=jnp.array([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]]))  # sample sigma 1
    Array([[-0.9999,  0.    ,  0.9999],
           [ 0.    ,  0.    ,  0.    ]], dtype=float32)
  """
  centred, valid, n, constant = _centred_scores(scores, valid)
  var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  # A safe sqrt: its derivative at 0 is infinite, and 0 * inf would make gradients NaN.
  std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
  return jnp.where(valid & ~constant, centred / (std + eps), 0.0)


def rloo_advantages(*, scores: Array, valid: Array | None = None) -> Array:
  r"""REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): the mean of the others.

  .. math:: A_{p,i} = r_{p,i} - \frac{1}{n_p - 1} \sum_{j \ne i} r_{p,j}
     = \frac{n_p}{n_p - 1} (r_{p,i} - \mu_p)

  over the n_p valid replies of prompt p (the right-hand form is how it is computed: shifting a
  group's scores then cancels before any rounding). The baseline does not depend on reply i,
  so the estimate stays unbiased without a learned value.

  Args:
    scores: [P, G] float with G >= 2 (checked: one reply has no others to compare with).
    valid: optional [P, G] bool, as in `grpo_advantages`.

  Returns:
    [P, G] float32; 0 for invalid replies, constant groups and groups with one valid reply.

  Example:
    >>> rloo_advantages(scores=jnp.array([[1.0, 0.0, 0.0, 1.0]]))  # 1 - 1/3, 0 - 2/3
    Array([[ 0.6666667, -0.6666667, -0.6666667,  0.6666667]], dtype=float32)
  """
  if scores.shape[-1] < 2:
    raise ValueError(f"RLOO needs G >= 2 replies per prompt; scores has shape {scores.shape}")
  centred, valid, n, constant = _centred_scores(scores, valid)
  return jnp.where(valid & ~constant & (n >= 2), centred * n / jnp.maximum(n - 1.0, 1.0), 0.0)


def dr_grpo_advantages(*, scores: Array, valid: Array | None = None) -> Array:
  r"""Dr. GRPO's advantage (Liu et al. 2025): the group-centred score, without GRPO's std.

  .. math:: A_{p,i} = r_{p,i} - \mu_p

  Dividing by sigma_p weighs prompts that are nearly always or nearly never solved (small
  spread) more than the rest, a question-level difficulty bias; this keeps the reward's scale.
  trl's equivalent is `scale_rewards="none"`.

  Args:
    scores: [P, G] float; valid: optional [P, G] bool, as in `grpo_advantages`.

  Returns:
    [P, G] float32; 0 for invalid replies and constant groups.

  Example:
    >>> dr_grpo_advantages(scores=jnp.array([[2.0, 0.0, 1.0, 9.0]]),
    ...                    valid=jnp.array([[True, True, True, False]]))  # the mean is 1
    Array([[ 1., -1.,  0.,  0.]], dtype=float32)
  """
  centred, valid, _, constant = _centred_scores(scores, valid)
  return jnp.where(valid & ~constant, centred, 0.0)


# ---------------------------------------------------------------------------------------------
# KL to the reference: in the score (k1) or as a loss term (k3).
# ---------------------------------------------------------------------------------------------


def kl_penalized_scores(*, scores: Array, log_probs: Array, ref_log_probs: Array, mask: Array,
                        kl_coef: Array | float) -> Array:
  r"""The KL-in-reward alternative: each reply's score minus beta times its summed k1.

  .. math:: \tilde r_b = r_b - \beta \sum_t m_{b,t} (\log\pi_{b,t} - \log\pi_{\text{ref},b,t})

  The sum of k1 over a sampled reply is an unbiased estimate of the sequence-level
  KL(pi || ref) (single tokens can be negative). Apply it to the rollout (log_probs of the
  sampling policy, constants) *before* the group advantages, which then carry the penalty; it
  is the choice of trl's `RLOOTrainer` (`beta` with `old_per_token_logps - ref_per_token_logps`
  summed over the completion). The alternative is `token_kl_k3` in the loss, not both.

  Args:
    scores: [B] float; log_probs, ref_log_probs: [B, T] float; mask: [B, T] bool.
    kl_coef: scalar beta (a float or a traced array).

  Returns:
    [B] float32. Masked positions contribute nothing, whatever values they hold.

  Example:
    >>> kl_penalized_scores(scores=jnp.array([1.0]), log_probs=jnp.array([[-1.0, -2.0, 0.0]]),
    ...                     ref_log_probs=jnp.array([[-2.0, -2.5, jnp.nan]]),
    ...                     mask=jnp.array([[True, True, False]]), kl_coef=0.1)  # 1 - 0.1 * 1.5
    Array([0.85], dtype=float32)
  """
  keep = mask != 0
  k1 = rl_losses.kl_k1(log_probs=jnp.where(keep, log_probs, 0.0),
                       ref_log_probs=jnp.where(keep, ref_log_probs, 0.0))
  return scores.astype(jnp.float32) - kl_coef * jnp.sum(jnp.where(keep, k1, 0.0), axis=-1)


def token_kl_k3(*, log_probs: Array, ref_log_probs: Array, mask: Array) -> Array:
  r"""The KL-as-loss term: `rl_losses.kl_k3` per response token, 0 elsewhere, [B, T] float32.

  .. math:: \mathrm{kl}_{b,t} = m_{b,t} \, (e^{d} - 1 - d), \qquad
     d = \log\pi_{\text{ref},b,t} - \log\pi_{b,t}

  with log_probs the current policy's (differentiated). Add `kl_coef` times it to the token
  losses of `clipped_policy_loss` before the normalisation, so the KL gets the same one (as
  GRPO and trl's `GRPOTrainer` do); the normalisations are linear, so normalising it on its
  own with the same function and adding gives the same result (a metric: `token_level_sums`).
  Masked positions are zeroed before the exponential, so garbage there (NaN, -inf) reaches
  neither the value nor the gradient. At a real token the gradient is 1 - e^d: finite when the
  policy is far *more* likely than the reference (d << 0), overflowing for d > 88 in float32.

  Example:
    >>> token_kl_k3(log_probs=jnp.zeros((1, 2)), ref_log_probs=jnp.log(jnp.array([[2.0, 0.0]])),
    ...             mask=jnp.array([[True, False]]))  # 1 - log 2; masked
    Array([[0.30685282, 0.        ]], dtype=float32)
  """
  keep = mask != 0
  kl = rl_losses.kl_k3(log_probs=jnp.where(keep, log_probs, 0.0),
                       ref_log_probs=jnp.where(keep, ref_log_probs, 0.0))
  return jnp.where(keep, kl, 0.0)


# ---------------------------------------------------------------------------------------------
# The clipped objective.
# ---------------------------------------------------------------------------------------------


def clipped_policy_loss(*, log_probs: Array, old_log_probs: Array, advantages: Array,
                        mask: Array, clip_eps_low: float,
                        clip_eps_high: float) -> tuple[Array, dict[str, Array]]:
  r"""The clipped ratio loss per token, with DAPO's asymmetric clip ("clip-higher").

  .. math::
     \rho_{b,t} = e^{\log\pi_{b,t} - \log\pi_{\text{old},b,t}}, \qquad
     \ell_{b,t} = -\min\left(\rho A_b, \; \mathrm{clip}(\rho, 1 - \epsilon_\text{low},
     1 + \epsilon_\text{high}) A_b\right)

  with one advantage per reply broadcast over its tokens. eps_low == eps_high is PPO's clip
  (`rl_losses.ppo_policy_loss` summed over the same tokens); a larger eps_high (DAPO: 0.2 and
  0.28) lets unlikely tokens with a positive advantage grow further before clipping, against
  entropy collapse. Reduce with `token_level_sums`, `sequence_level_sums` or
  `constant_normalizer_sums`.

  The same loss is computed so that its gradient stays finite for extreme log-ratios: where
  the clipped term is the smaller objective (the token is clipped: rho > 1 + eps_high with
  A > 0, or rho < 1 - eps_low with A < 0) the loss is the constant bound times -A and the
  exponential is never taken, so e.g. a log-ratio of +1000 with A > 0 gives a zero gradient,
  not 0 * inf = NaN. The unclipped side for A < 0 is unbounded in rho, as in PPO.

  Args:
    log_probs: [B, T] of the current policy (differentiated).
    old_log_probs: [B, T] of the policy that sampled the rollout (constants).
    advantages: [B] one per reply (a group estimator's output, reshaped to [B]).
    mask: [B, T] bool (nonzero = response token); masked positions give 0 loss and gradient,
      whatever the inputs hold there.
    clip_eps_low, clip_eps_high: the clip range [1 - low, 1 + high].

  Returns:
    (token_losses [B, T] float32, aux): aux holds token *sums* (float32 scalars), to divide
    by aux["tokens"] (summed over microbatches alike), whatever the loss normalisation:
    `clip_low` (rho < 1 - eps_low, A < 0), `clip_high` (rho > 1 + eps_high, A > 0),
    `clip_fraction` (either; no gradient there), `approx_kl` (`kl_k3` of pi_old against pi,
    no gradient) and `tokens` (the response token count).

  Example:
    >>> token_losses, aux = clipped_policy_loss(
    ...     log_probs=jnp.log(jnp.array([[1.5, 1.25, 0.5]])), old_log_probs=jnp.zeros((1, 3)),
    ...     advantages=jnp.array([1.0]), mask=jnp.ones((1, 3)), clip_eps_low=0.2,
    ...     clip_eps_high=0.28)
    >>> token_losses  # -min(1.5, 1.28); -1.25 (inside the higher clip); -min(0.5, 0.8)
    Array([[-1.28, -1.25, -0.5 ]], dtype=float32)
    >>> float(aux["clip_high"]), float(aux["clip_fraction"]), float(aux["tokens"])
    (1.0, 1.0, 3.0)
  """
  keep = mask != 0
  log_ratio = jnp.where(keep, log_probs.astype(jnp.float32) - old_log_probs.astype(jnp.float32),
                        0.0)
  adv = jnp.where(keep, advantages.astype(jnp.float32)[:, None], 0.0)
  ratio = jnp.exp(jax.lax.stop_gradient(log_ratio))  # only compared: may be inf
  clip_high = keep & (adv > 0) & (ratio > 1.0 + clip_eps_high)
  clip_low = keep & (adv < 0) & (ratio < 1.0 - clip_eps_low)
  clipped = clip_high | clip_low
  bound = jnp.where(clip_high, 1.0 + clip_eps_high, 1.0 - clip_eps_low)
  # min(rho A, clip(rho) A) is the clipped term exactly where `clipped`, else rho A; taking the
  # exponential only on the unclipped side keeps 0 * inf out of the backward pass.
  live_ratio = jnp.exp(jnp.where(clipped, 0.0, log_ratio))
  token_losses = jnp.where(keep, jnp.where(clipped, -adv * bound, -adv * live_ratio), 0.0)

  approx_kl = rl_losses.kl_k3(log_probs=jnp.zeros_like(log_ratio),
                              ref_log_probs=jax.lax.stop_gradient(log_ratio))
  total = lambda x: jnp.sum(jnp.where(keep, x, 0.0).astype(jnp.float32))
  aux = {"clip_low": total(clip_low), "clip_high": total(clip_high),
         "clip_fraction": total(clipped), "approx_kl": total(approx_kl), "tokens": total(keep)}
  return token_losses, aux


# ---------------------------------------------------------------------------------------------
# Loss normalisation: (sum, count) pairs, summed over microbatches and devices, divided once.
# ---------------------------------------------------------------------------------------------


def token_level_sums(*, token_losses: Array, mask: Array) -> tuple[Array, Array]:
  r"""Token-level mean (DAPO; Dr. GRPO's recommendation; trl's "dapo"): every token counts once.

  .. math:: L = \frac{\sum_{b,t} m_{b,t} \ell_{b,t}}{\sum_{b,t} m_{b,t}}

  Returns (sum of the masked token losses, number of response tokens), float32 scalars. Both
  add over microbatches and devices, so Σ sum / Σ count is the mean over every response token
  of the update, as if it were one batch. Long replies weigh more, per reply, than short ones.

  Example:
    >>> token_level_sums(token_losses=jnp.array([[1.0, 3.0], [8.0, 0.0]]),
    ...                  mask=jnp.array([[True, True], [True, False]]))  # 12 / 3
    (Array(12., dtype=float32), Array(3., dtype=float32))
  """
  keep = mask != 0
  return (jnp.sum(jnp.where(keep, token_losses.astype(jnp.float32), 0.0)),
          jnp.sum(keep).astype(jnp.float32))


def sequence_level_sums(*, token_losses: Array, mask: Array) -> tuple[Array, Array]:
  r"""Sequence-level mean (the original GRPO; trl's "grpo"): mean over replies of the token mean.

  .. math:: L = \frac{1}{N} \sum_b \frac{\sum_t m_{b,t} \ell_{b,t}}{\sum_t m_{b,t}}, \qquad
     N = \#\{b : \textstyle\sum_t m_{b,t} > 0\}

  Returns (sum over replies of each reply's token mean, number of replies N), float32
  scalars: a reply lies whole in one microbatch, so both add exactly over microbatches and
  devices. A row without response tokens (padding) counts in neither. Every reply weighs the
  same, so a token of a long reply weighs less (the length bias Dr. GRPO and DAPO remove).

  Example:
    >>> sequence_level_sums(token_losses=jnp.array([[1.0, 3.0], [8.0, 0.0], [5.0, 5.0]]),
    ...                     mask=jnp.array([[True, True], [True, False], [False, False]]))
    (Array(10., dtype=float32), Array(2., dtype=float32))
  """
  keep = mask != 0
  per_row = jnp.sum(jnp.where(keep, token_losses.astype(jnp.float32), 0.0), axis=-1)
  tokens = jnp.sum(keep, axis=-1).astype(jnp.float32)
  real = tokens > 0
  return jnp.sum(jnp.where(real, per_row / jnp.maximum(tokens, 1.0), 0.0)), jnp.sum(real).astype(
      jnp.float32)


def constant_normalizer_sums(*, token_losses: Array, mask: Array,
                             max_response_len: int) -> tuple[Array, Array]:
  r"""Dr. GRPO's constant normaliser (trl's "dr_grpo"): the token sum over N times L_max.

  .. math:: L = \frac{\sum_{b,t} m_{b,t} \ell_{b,t}}{N \cdot L_\text{max}}, \qquad
     N = \#\{b : \textstyle\sum_t m_{b,t} > 0\}

  The denominator depends on neither the lengths nor the policy, so no reply length is
  preferred. Returns (sum of the masked token losses, N * max_response_len), float32 scalars,
  additive over microbatches and devices like the others.

  Args:
    token_losses: [B, T] float; mask: [B, T] bool; rows without tokens (padding) don't count.
    max_response_len: L_max, the generation budget (the config's maximum new tokens), not the
      padded width T of this batch, so that the constant is the same in every step.

  Example:
    >>> constant_normalizer_sums(token_losses=jnp.array([[1.0, 3.0], [8.0, 0.0], [5.0, 5.0]]),
    ...                          mask=jnp.array([[True, True], [True, False], [False, False]]),
    ...                          max_response_len=4)  # 12 / (2 * 4)
    (Array(12., dtype=float32), Array(8., dtype=float32))
  """
  loss_sum, _ = token_level_sums(token_losses=token_losses, mask=mask)
  replies = jnp.sum(jnp.any(mask != 0, axis=-1)).astype(jnp.float32)
  return loss_sum, replies * float(max_response_len)
