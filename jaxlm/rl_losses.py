"""The RLHF (PPO) losses and estimators: pure functions, keyword-only, float32, explicit masks.

Per-token arrays are [B, T] over the response window; `mask` marks real response tokens. As in
`jaxlm/losses.py`, a loss returns `(loss_sum, count, aux_sums)` and means are formed once over
everything that belongs to one update, so minibatching and sharding give the exact token mean.

  KL estimators     kl_k1, kl_k2, kl_k3 (Schulman's k1/k2/k3 of KL(pi || ref) per token)
  rewards           per_token_rewards: -kl_coef * KL per token, plus the score at the last token
  advantages        gae_advantages (reverse scan), masked_mean / masked_var / masked_whiten
  objectives        ppo_policy_loss (clipped surrogate), ppo_value_loss (clipped value loss)
  diagnostics       entropy_from_logits, explained_variance
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def kl_k1(*, log_probs: Array, ref_log_probs: Array) -> Array:
  r"""Schulman's k1 estimator of KL(pi || ref) per token: :math:`\log\pi - \log\pi_\text{ref}`.

  Unbiased for tokens sampled from pi, but high variance and can be negative. [B, T] -> [B, T]
  float32; no mask is applied (see `per_token_rewards`). The same call pattern holds for k2, k3.

  Example:
    >>> kl_k1(log_probs=jnp.array([[-1.0]]), ref_log_probs=jnp.array([[-2.0]]))
    Array([[1.]], dtype=float32)
  """
  return log_probs.astype(jnp.float32) - ref_log_probs.astype(jnp.float32)


def kl_k2(*, log_probs: Array, ref_log_probs: Array) -> Array:
  r"""Schulman's k2: :math:`\tfrac12 (\log\pi - \log\pi_\text{ref})^2`; biased, low variance, >= 0.

  Example:
    >>> kl_k2(log_probs=jnp.array([[-1.0]]), ref_log_probs=jnp.array([[-3.0]]))
    Array([[2.]], dtype=float32)
  """
  return 0.5 * jnp.square(log_probs.astype(jnp.float32) - ref_log_probs.astype(jnp.float32))


def kl_k3(*, log_probs: Array, ref_log_probs: Array) -> Array:
  r"""Schulman's k3: :math:`e^{d} - 1 - d` with :math:`d = \log\pi_\text{ref} - \log\pi`.

  Unbiased for KL(pi || ref) under samples from pi, low variance, and >= 0 token by token.
  Computed as `expm1(d) - d` for accuracy near 0.

  Example:
    >>> kl_k3(log_probs=jnp.array([[0.0]]), ref_log_probs=jnp.log(jnp.array([[2.0]])))  # 1 - log 2
    Array([[0.30685282]], dtype=float32)
  """
  d = ref_log_probs.astype(jnp.float32) - log_probs.astype(jnp.float32)
  return jnp.expm1(d) - d


def per_token_rewards(*, kl: Array, kl_coef: Array | float, score: Array, last_index: Array,
                      mask: Array) -> Array:
  r"""RLHF rewards per token (Ziegler et al. 2019): a KL penalty everywhere, the score at the end.

  .. math:: r_{b,t} = -c \, \mathrm{kl}_{b,t} \, [m_{b,t}] + s_b \, [t = \ell_b]

  Args:
    kl: [B, T] per-token KL estimate (`kl_k1` is the usual choice).
    kl_coef: scalar c (a float, or a traced array from a KL controller).
    score: [B] reward-model score of each whole response.
    last_index: [B] int index in [0, T) of each row's final emitted response token. An index
      outside that range drops the score (`one_hot` gives zeros).
    mask: [B, T] bool (nonzero = response token); masked positions get 0 penalty.

  Returns:
    [B, T] float32.

  Example:
    >>> per_token_rewards(kl=jnp.array([[1.0, 2.0, 9.0]]), kl_coef=0.1, score=jnp.array([5.0]),
    ...                   last_index=jnp.array([1]), mask=jnp.array([[True, True, False]]))
    Array([[-0.1,  4.8,  0. ]], dtype=float32)
  """
  penalty = jnp.where(mask != 0, -kl_coef * kl.astype(jnp.float32), 0.0)
  final = jax.nn.one_hot(last_index, kl.shape[-1], dtype=jnp.float32)
  return penalty + final * score.astype(jnp.float32)[:, None]


def gae_advantages(*, rewards: Array, values: Array, mask: Array, gamma: float,
                   lam: float) -> tuple[Array, Array]:
  r"""Generalized advantage estimation (Schulman et al. 2016) as a reverse `lax.scan` over time.

  .. math::
     \delta_t = r_t + \gamma V_{t'} - V_t, \qquad A_t = \delta_t + \gamma\lambda A_{t'}

  where t' is the next *real* (mask nonzero) position of the row: masked positions are skipped
  and give 0, and after a row's last real token :math:`V_{t'} = A_{t'} = 0` (the episode ends
  with the response). Ragged, right- or left-padded rows need no other care.

  Args:
    rewards, values: [B, T] float (see `per_token_rewards`); values are the rollout's.
    mask: [B, T] bool.
    gamma, lam: discount and GAE lambda (RLHF usually uses 1.0 and 0.95).

  Returns:
    (advantages, returns): [B, T] float32, with returns = advantages + values (the value
    targets); both 0 at masked positions. Treat both as constants (no gradient is intended).

  Example:
    >>> adv, ret = gae_advantages(rewards=jnp.array([[0.0, 1.0, 7.0]]),
    ...                           values=jnp.array([[0.5, 0.5, 7.0]]),
    ...                           mask=jnp.array([[1, 1, 0]]), gamma=1.0, lam=1.0)
    >>> adv.tolist(), ret.tolist()
    ([[0.5, 0.5, 0.0]], [[1.0, 1.0, 0.0]])
  """
  keep = mask != 0
  rewards = jnp.where(keep, rewards.astype(jnp.float32), 0.0)
  values = jnp.where(keep, values.astype(jnp.float32), 0.0)

  def step(carry, x):
    next_value, next_adv = carry
    r, v, k = x
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    # A masked position passes the carry through untouched, so it is not a step.
    return (jnp.where(k, v, next_value), jnp.where(k, adv, next_adv)), jnp.where(k, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, keep.T), reverse=True)
  adv = adv.T
  return adv, jnp.where(keep, adv + values, 0.0)


def _sum_count(x: Array, mask: Array) -> tuple[Array, Array]:
  """(sum of mask * x over mask != 0, sum of mask), float32; masked-out x never reaches the sum."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask != 0, x * mask, 0.0)), jnp.sum(mask)


def masked_mean(*, values: Array, mask: Array) -> Array:
  """Mean of `values` over the entries where mask != 0 (float masks weight); 0 if none.

  Example:
    >>> masked_mean(values=jnp.array([1.0, 3.0, 100.0]), mask=jnp.array([True, True, False]))
    Array(2., dtype=float32)
  """
  total, count = _sum_count(values.astype(jnp.float32), mask)
  return total / jnp.where(count > 0, count, 1.0)


def masked_var(*, values: Array, mask: Array) -> Array:
  """Biased (population, divide by count) variance over the masked entries; 0 if none.

  Biased so that one entry gives 0, not a division by zero; at PPO batch sizes the factor
  n / (n - 1) is negligible, and `explained_variance` is a ratio where it cancels.

  Example:
    >>> masked_var(values=jnp.array([1.0, 3.0, 100.0]), mask=jnp.array([True, True, False]))
    Array(1., dtype=float32)
  """
  mean = masked_mean(values=values, mask=mask)
  return masked_mean(values=jnp.square(values.astype(jnp.float32) - mean), mask=mask)


def masked_whiten(*, values: Array, mask: Array, shift_mean: bool = True) -> Array:
  r"""Normalize to zero mean and unit (biased) variance over the masked entries.

  :math:`(x - \mu) / \sqrt{\sigma^2 + 10^{-8}}`, plus :math:`\mu` back if not `shift_mean`
  (whitening rewards keeps their mean; whitening advantages does not). Masked entries become 0.
  Statistics are over this array only (under jit on a sharded global array, the whole batch).

  Example:
    >>> masked_whiten(values=jnp.array([1.0, 3.0, 100.0]), mask=jnp.array([True, True, False]))
    Array([-1.,  1.,  0.], dtype=float32)
  """
  values = values.astype(jnp.float32)
  mean, var = masked_mean(values=values, mask=mask), masked_var(values=values, mask=mask)
  whitened = (values - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask != 0, whitened, 0.0)


def ppo_policy_loss(*, log_probs: Array, old_log_probs: Array, advantages: Array, mask: Array,
                    clip_eps: float) -> tuple[Array, Array, dict[str, Array]]:
  r"""PPO's clipped surrogate (Schulman et al. 2017), summed over the masked tokens.

  .. math::
     \rho = e^{\log\pi - \log\pi_\text{old}}, \qquad
     \ell_{b,t} = \max\left(-A \rho, \; -A \, \mathrm{clip}(\rho, 1 - \epsilon, 1 + \epsilon)\right)

  Aggregation: the token-level mean over every response token of the update, formed by the
  caller as `loss_sum / count` after summing over microbatches and devices (exact under
  gradient accumulation; long responses weigh more than short ones, as in the PPO of
  Ouyang et al. and trl).

  Args:
    log_probs: [B, T] of the current policy (differentiated).
    old_log_probs, advantages: [B, T] constants from the rollout.
    mask: [B, T] bool or float weights.
    clip_eps: the clip range (0.2).

  Returns:
    (loss_sum, count, aux), aux holding *sums* over the same tokens: `clip_fraction` (tokens
    where the clipped term is the larger one, so they get no gradient) and `approx_kl`
    (`kl_k3` of pi_old against pi: KL(old || new) from samples of old).

  Example:
    >>> loss_sum, count, aux = ppo_policy_loss(
    ...     log_probs=jnp.log(jnp.array([[1.5, 0.5]])), old_log_probs=jnp.zeros((1, 2)),
    ...     advantages=jnp.array([[1.0, 1.0]]), mask=jnp.ones((1, 2)), clip_eps=0.2)
    >>> round(float(loss_sum), 6), float(count), float(aux["clip_fraction"])  # -1.2 - 0.5
    (-1.7, 2.0, 1.0)
  """
  keep = mask != 0
  log_ratio = jnp.where(keep, log_probs.astype(jnp.float32) - old_log_probs.astype(jnp.float32),
                        0.0)
  advantages = jnp.where(keep, advantages.astype(jnp.float32), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss_sum, count = _sum_count(jnp.maximum(unclipped, clipped), mask)
  approx_kl = kl_k3(log_probs=jnp.zeros_like(log_ratio), ref_log_probs=log_ratio)
  aux = {"clip_fraction": _sum_count((clipped > unclipped).astype(jnp.float32), mask)[0],
         "approx_kl": _sum_count(jax.lax.stop_gradient(approx_kl), mask)[0]}
  return loss_sum, count, aux


def ppo_value_loss(*, values: Array, old_values: Array, returns: Array, mask: Array,
                   clip_eps: float) -> tuple[Array, Array, dict[str, Array]]:
  r"""Clipped value loss, summed over the masked tokens (aggregated as `ppo_policy_loss`).

  .. math::
     \ell = \tfrac12 \max\left((V - R)^2, \; (V_\text{old} + \mathrm{clip}(V - V_\text{old},
     -\epsilon, \epsilon) - R)^2\right)

  Args: values [B, T] (differentiated), old_values and returns [B, T] from the rollout and
  `gae_advantages`, mask [B, T], clip_eps (in reward units; 0.2).

  Returns:
    (loss_sum, count, aux), aux = {"value_clip_fraction": tokens where the clipped term is
    larger, summed}.

  Example:
    >>> loss_sum, count, _ = ppo_value_loss(
    ...     values=jnp.array([[1.0, 0.5]]), old_values=jnp.array([[0.0, 0.0]]),
    ...     returns=jnp.array([[1.0, 1.0]]), mask=jnp.ones((1, 2)), clip_eps=0.2)
    >>> round(float(loss_sum), 6)  # 0.5 * (0.8^2 + 0.8^2)
    0.64
  """
  values, old_values, returns = (x.astype(jnp.float32) for x in (values, old_values, returns))
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_loss, clipped_loss = jnp.square(values - returns), jnp.square(clipped_values - returns)
  loss_sum, count = _sum_count(0.5 * jnp.maximum(unclipped_loss, clipped_loss), mask)
  clip_sum, _ = _sum_count((clipped_loss > unclipped_loss).astype(jnp.float32), mask)
  return loss_sum, count, {"value_clip_fraction": clip_sum}


def entropy_from_logits(*, logits: Array, mask: Array) -> Array:
  r"""Entropy :math:`-\sum_v p_v \log p_v` of each position's softmax, [B, T, V] -> [B, T] float32.

  Safe with -inf logits (0 log 0 = 0, with a finite gradient) and with garbage at masked
  positions, which give 0.

  Example:
    >>> entropy_from_logits(logits=jnp.array([[[0.0, 0.0, -jnp.inf], [1.0, 1.0, 1.0]]]),
    ...                     mask=jnp.array([[True, False]]))  # log 2; masked
    Array([[0.6931472, 0.       ]], dtype=float32)
  """
  keep = mask != 0
  log_p = jax.nn.log_softmax(jnp.where(keep[..., None], logits.astype(jnp.float32), 0.0))
  # Double `where`: -inf must not reach the product even in the backward pass.
  finite = jnp.isfinite(log_p)
  safe_log_p = jnp.where(finite, log_p, 0.0)
  entropy = -jnp.sum(jnp.where(finite, jnp.exp(safe_log_p) * safe_log_p, 0.0), axis=-1)
  return jnp.where(keep, entropy, 0.0)


def explained_variance(*, values: Array, returns: Array, mask: Array) -> Array:
  r"""Share of the returns' variance the value head explains, over the masked entries.

  :math:`1 - \mathrm{Var}(R - V) / \mathrm{Var}(R)`: 1 is perfect, 0 is no better than a
  constant, negative is worse. Scalar float32; 0 when the returns have no variance.

  Example:
    >>> explained_variance(values=jnp.array([1.0, 2.0, 9.0]), returns=jnp.array([1.0, 3.0, 0.0]),
    ...                    mask=jnp.array([1, 1, 0]))  # 1 - Var(0, 1) / Var(1, 3)
    Array(0.75, dtype=float32)
  """
  values, returns = values.astype(jnp.float32), returns.astype(jnp.float32)
  var_returns = masked_var(values=returns, mask=mask)
  var_residual = masked_var(values=returns - values, mask=mask)
  defined = var_returns > 0
  return jnp.where(defined, 1.0 - var_residual / jnp.where(defined, var_returns, 1.0), 0.0)
