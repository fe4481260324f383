"""Pure loss functions: keyword-only, float32, with explicit masks.

Token losses return a `(sum, count)` pair instead of a mean: the sum of the per-token (or
per-example) loss over the masked entries, and the number of masked entries, both float32
scalars. Means are formed once, at the very end, as `sum / count` over everything that belongs
to one update (all microbatches, all devices), so gradient accumulation and sharding give the
exact token-weighted mean whatever the number of tokens in each piece. Pairwise losses (reward
model, DPO) return one value per pair, [B]; the caller sums them with count B.

Logits may arrive in bfloat16; they are upcast to float32 before any exponent is taken.

Loss functions for a model (`lm_loss_fn`) return `(loss_sum, count, aux)`, where `aux` maps a
metric name to its *sum* over the masked tokens; the train step reports `aux[name] / count`.
The PPO losses follow the same `(loss_sum, count, aux)` convention.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Batch = dict[str, Array]
LossFn = Callable[[Any, Batch, Array], tuple[Array, Array, dict[str, Array]]]


def _log_normalizer_and_target_logit(logits: Array, targets: Array) -> tuple[Array, Array]:
  """log sum_v exp(logits[..., v]) and logits[..., target], both float32 [B, T]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot contraction rather than a gather: with the vocabulary split over `tensor`, each
  # device reduces its own slice and XLA all-reduces a [B, T] array, while a gather along a
  # sharded axis may make XLA all-gather the full logits first. XLA fuses the one-hot away.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  return lse, jnp.sum(logits * one_hot, axis=-1)


def token_log_probs(*, logits: Array, targets: Array) -> Array:
  r"""Log-probability of each target token under the model's softmax.

  .. math:: \log p_{b,t} = z_{b,t,y_{b,t}} - \log \sum_v \exp z_{b,t,v}

  Args:
    logits: [B, T, V] float (any float dtype; computed in float32).
    targets: [B, T] int token ids in [0, V). Ids outside that range are not detected: their
      target logit is 0.

  Returns:
    [B, T] float32, every entry <= 0. No mask is applied: callers weight or mask positions.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    >>> token_log_probs(logits=logits, targets=jnp.array([[1]]))  # log 0.25
    Array([[-1.3862944]], dtype=float32)
  """
  lse, target_logit = _log_normalizer_and_target_logit(logits, targets)
  return target_logit - lse


def token_cross_entropy(*, logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
  r"""Next-token cross-entropy summed over the masked tokens, and their number.

  .. math::
     \text{sum} = \sum_{b,t} m_{b,t} \left(\log \sum_v \exp z_{b,t,v} - z_{b,t,y_{b,t}}\right),
     \qquad \text{count} = \sum_{b,t} m_{b,t}

  The log-sum-exp is the stable one (max subtracted), so logits of +-1e4 and rows with no
  masked token give finite values and gradients (a fully masked batch gives (0, 0)).

  Args:
    logits: [B, T, V] float (bf16 logits are upcast to float32).
    targets: [B, T] int token ids in [0, V).
    mask: [B, T] bool or float; True (or a weight) where the target is trained on. A float mask
      weights each token; `count` is then the sum of weights.

  Returns:
    (loss_sum, count): float32 scalars. The mean is `loss_sum / count`; form it only after
    summing both over every microbatch and device of an update.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    >>> loss_sum, count = token_cross_entropy(
    ...     logits=logits, targets=jnp.array([[0, 2]]), mask=jnp.array([[True, False]]))
    >>> round(float(loss_sum), 6), float(count)  # -log 0.5; the second token is masked
    (0.693147, 1.0)
  """
  lse, target_logit = _log_normalizer_and_target_logit(logits, targets)
  mask = mask.astype(jnp.float32)
  # `where`, not only a product: a masked position's value never reaches the sum, even if it
  # is not finite (garbage logits at padding must not poison the loss).
  nll = jnp.where(mask != 0, (lse - target_logit) * mask, 0.0)
  return jnp.sum(nll), jnp.sum(mask)


def z_loss(*, logits: Array, mask: Array) -> tuple[Array, Array]:
  r"""The squared log-normalizer summed over the masked tokens (PaLM's auxiliary z-loss).

  .. math:: \text{sum} = \sum_{b,t} m_{b,t} \left(\log \sum_v \exp z_{b,t,v}\right)^2

  Added with a small weight (PaLM: 1e-4) to the cross-entropy, it keeps log Z near 0, so the
  logits do not drift to large magnitudes where bf16 softmaxes lose precision.

  Args:
    logits: [B, T, V] float (computed in float32).
    mask: [B, T] bool or float weights.

  Returns:
    (z_sum, count): float32 scalars.

  Example:
    >>> logits = jnp.zeros((1, 1, 4))  # log Z = log 4
    >>> z_sum, count = z_loss(logits=logits, mask=jnp.ones((1, 1), bool))
    >>> round(float(z_sum), 6)  # (log 4)^2
    1.921812
  """
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask != 0, jnp.square(lse) * mask, 0.0)), jnp.sum(mask)


def lm_loss_fn(model, *, z_loss_weight: float = 0.0) -> LossFn:
  """The language-modelling loss of a model: pretraining and SFT (they differ only in the mask).

  Args:
    model: a `jaxlm.model.Transformer`.
    z_loss_weight: weight of `z_loss` added to the cross-entropy sum (0 disables it).

  Returns:
    `loss_fn(params, batch, rng) -> (loss_sum, count, aux)`, where `params` are plain (unboxed)
    parameters and `batch` is an LM batch (see `jaxlm.data.pipelines`): `inputs`, `targets`,
    `loss_mask`, `segment_ids`, `positions`, all [B, L]. `loss_sum` is the cross-entropy sum
    (plus `z_loss_weight` times the z-loss sum) over the tokens where `loss_mask` is True and
    `count` their number. `aux` holds sums over the same tokens, each reported per token by the
    train step: `accuracy` (targets that are the argmax of the logits) and, when the z-loss is
    on, `cross_entropy` and `z_loss` separately. `rng` is unused (the model has no dropout) and
    kept for the loss-function contract.
  """

  def loss_fn(params, batch: Batch, rng: Array) -> tuple[Array, Array, dict[str, Array]]:
    del rng  # Deterministic model; stochastic losses (PPO minibatches, dropout) use it.
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"]).logits
    mask = batch["loss_mask"]
    ce_sum, count = token_cross_entropy(logits=logits, targets=batch["targets"], mask=mask)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    aux = {"accuracy": jnp.sum(correct * mask.astype(jnp.float32))}
    loss_sum = ce_sum
    if z_loss_weight:
      z_sum, _ = z_loss(logits=logits, mask=mask)
      loss_sum = ce_sum + z_loss_weight * z_sum
      aux.update(cross_entropy=ce_sum, z_loss=z_sum)
    return loss_sum, count, aux

  return loss_fn


# ------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry on scalar rewards [B].
# ------------------------------------------------------------------------------------------------
def bradley_terry_loss(*, chosen_rewards: Array, rejected_rewards: Array,
                       margin: Array | float | None = None) -> Array:
  r"""Negative log-likelihood that the chosen response beats the rejected one, per pair.

  .. math:: \ell_b = -\log \sigma(r^c_b - r^r_b - m_b)

  Computed with `log_sigmoid` (never `log(exp(a) / (exp(a) + exp(b)))`), so differences of
  +-1e4 give finite values and gradients. The optional margin (Llama 2's) asks the chosen reward
  to win by at least `m`; swapping chosen and rejected (with m = 0) maps l(d) to l(-d).

  Args:
    chosen_rewards, rejected_rewards: [B] float (computed in float32).
    margin: None (0), a scalar, or [B].

  Returns:
    [B] float32 per-pair loss, >= 0.

  Example:
    >>> loss = bradley_terry_loss(chosen_rewards=jnp.array([1.0, 0.0]),
    ...     rejected_rewards=jnp.array([1.0, 0.0]), margin=jnp.array([0.0, 1.0]))
    >>> [round(x, 4) for x in loss.tolist()]  # log 2, log(1 + e)
    [0.6931, 1.3133]
  """
  diff = chosen_rewards.astype(jnp.float32) - rejected_rewards.astype(jnp.float32)
  if margin is not None:
    diff = diff - jnp.asarray(margin, jnp.float32)
  return -jax.nn.log_sigmoid(diff)


def reward_centering_loss(*, chosen_rewards: Array, rejected_rewards: Array) -> Array:
  r"""The auxiliary term :math:`(r^c_b + r^r_b)^2` that keeps rewards near zero, per pair.

  Bradley-Terry only sees reward differences, so the mean reward can drift freely; this term
  (Eisenstein et al. 2023, "Helping or Herding?") pins it near 0. The caller applies the weight
  (they use 0.01). Shapes: [B], [B] -> [B] float32.

  Example:
    >>> reward_centering_loss(chosen_rewards=jnp.array([1.0, 2.0]),
    ...                       rejected_rewards=jnp.array([-1.0, 1.0]))
    Array([0., 9.], dtype=float32)
  """
  return jnp.square(chosen_rewards.astype(jnp.float32) + rejected_rewards.astype(jnp.float32))


def pairwise_accuracy(*, chosen_rewards: Array, rejected_rewards: Array) -> Array:
  """[B] float32: 1 where the chosen reward is higher, 0 where lower, 0.5 on a tie.

  Example:
    >>> pairwise_accuracy(chosen_rewards=jnp.array([2.0, 0.0, 1.0]),
    ...                   rejected_rewards=jnp.array([1.0, 0.0, 3.0]))
    Array([1. , 0.5, 0. ], dtype=float32)
  """
  diff = chosen_rewards.astype(jnp.float32) - rejected_rewards.astype(jnp.float32)
  return 0.5 + 0.5 * jnp.sign(diff)


# ------------------------------------------------------------------------------------------------
# Sequence log-probs and DPO: inputs are summed response log-probs [B].
# ------------------------------------------------------------------------------------------------
def sequence_log_probs(*, logits: Array, targets: Array, mask: Array) -> Array:
  r"""Sum of the masked target-token log-probs of each row: :math:`\sum_t m_{b,t} \log p_{b,t}`.

  Unlike `token_log_probs`, logits that are -inf (top-k / top-p filtered vocabulary entries) or
  garbage at masked positions do not give NaN: masked positions are replaced before any
  arithmetic, and the target logit is selected with `where`, not multiplied by a one-hot.

  Args:
    logits: [B, T, V] float (computed in float32).
    targets: [B, T] int token ids in [0, V).
    mask: [B, T] bool or float weights (the response tokens).

  Returns:
    [B] float32, the log-probability of each row's masked tokens (0 for a fully masked row).

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]]))  # log 0 = -inf
    >>> logp = sequence_log_probs(logits=logits, targets=jnp.array([[0, 1]]),
    ...                           mask=jnp.array([[True, True]]))
    >>> round(float(logp[0]), 4)  # log 0.5 + log 0.75
    -0.9808
  """
  keep = mask != 0
  logits = jnp.where(keep[..., None], logits.astype(jnp.float32), 0.0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # Still a one-hot contraction (see `_log_normalizer_and_target_logit`), but through `where`:
  # -inf * 0 would be NaN.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
  target_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
  return jnp.sum(jnp.where(keep, (target_logit - lse) * mask.astype(jnp.float32), 0.0), axis=-1)


def _dpo_margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps) -> Array:
  """h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), float32 [B]."""
  chosen, rejected = dpo_implicit_rewards(
      policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
      reference_chosen_logps=reference_chosen_logps,
      reference_rejected_logps=reference_rejected_logps, beta=1.0)
  return chosen - rejected


def dpo_implicit_rewards(*, policy_chosen_logps: Array, policy_rejected_logps: Array,
                         reference_chosen_logps: Array, reference_rejected_logps: Array,
                         beta: float) -> tuple[Array, Array]:
  r"""DPO's implicit rewards :math:`\beta (\log\pi(y) - \log\pi_\text{ref}(y))`, per response.

  Args: four [B] summed response log-probs (see `sequence_log_probs`) and beta > 0.

  Returns:
    (chosen_rewards, rejected_rewards): [B] float32 each. `dpo_loss` is `bradley_terry_loss`
    on them; log them for reward accuracy and margins.

  Example:
    >>> dpo_implicit_rewards(policy_chosen_logps=jnp.array([-1.0]),
    ...                      policy_rejected_logps=jnp.array([-3.0]),
    ...                      reference_chosen_logps=jnp.array([-2.0]),
    ...                      reference_rejected_logps=jnp.array([-2.0]), beta=0.5)
    (Array([0.5], dtype=float32), Array([-0.5], dtype=float32))
  """
  f = lambda x: jnp.asarray(x, jnp.float32)
  return (beta * (f(policy_chosen_logps) - f(reference_chosen_logps)),
          beta * (f(policy_rejected_logps) - f(reference_rejected_logps)))


def dpo_loss(*, policy_chosen_logps: Array, policy_rejected_logps: Array,
             reference_chosen_logps: Array, reference_rejected_logps: Array, beta: float,
             label_smoothing: float = 0.0) -> Array:
  r"""Direct Preference Optimization (Rafailov et al. 2023), per pair; cDPO when smoothing > 0.

  .. math::
     h_b = \log\frac{\pi(y^c_b)}{\pi_\text{ref}(y^c_b)}
         - \log\frac{\pi(y^r_b)}{\pi_\text{ref}(y^r_b)}, \qquad
     \ell_b = -(1 - \epsilon) \log\sigma(\beta h_b) - \epsilon \log\sigma(-\beta h_b)

  With :math:`\epsilon` = `label_smoothing` = 0 this is DPO (Bradley-Terry on the implicit
  rewards); :math:`\epsilon > 0` is conservative DPO, which assumes each label is flipped with
  probability :math:`\epsilon` (the loss then has a finite minimum instead of pushing h to
  infinity). Policy equal to reference gives log 2. Finite gradients for any finite h.

  Args:
    policy_chosen_logps, policy_rejected_logps: [B] summed response log-probs of the policy.
    reference_chosen_logps, reference_rejected_logps: [B], the same under the frozen reference.
    beta: inverse temperature of the implicit reward (typically 0.1).
    label_smoothing: cDPO's label-flip probability in [0, 0.5).

  Returns:
    [B] float32 per-pair loss.

  Example:
    >>> one, zero = jnp.array([1.0]), jnp.array([0.0])
    >>> loss = dpo_loss(policy_chosen_logps=one, policy_rejected_logps=zero,
    ...                 reference_chosen_logps=zero, reference_rejected_logps=zero, beta=1.0)
    >>> round(float(loss[0]), 4)  # -log sigmoid(1)
    0.3133
  """
  logits = beta * _dpo_margin(policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps)
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
          - label_smoothing * jax.nn.log_sigmoid(-logits))


def ipo_loss(*, policy_chosen_logps: Array, policy_rejected_logps: Array,
             reference_chosen_logps: Array, reference_rejected_logps: Array,
             beta: float) -> Array:
  r"""Identity Preference Optimization (IPO, Azar et al. 2023), per pair.

  .. math:: \ell_b = \left(h_b - \frac{1}{2\beta}\right)^2

  with :math:`h_b` the log-ratio margin of `dpo_loss` and :math:`\beta` the paper's
  :math:`\tau`. A regression to a fixed margin: it does not overfit deterministic preferences.
  Inputs as `dpo_loss`; returns [B] float32. (Azar et al. sum log-probs over tokens, as here.)

  Example:
    >>> one, zero = jnp.array([1.0]), jnp.array([0.0])
    >>> ipo_loss(policy_chosen_logps=one, policy_rejected_logps=zero,
    ...          reference_chosen_logps=zero, reference_rejected_logps=zero, beta=0.25)
    Array([1.], dtype=float32)
  """
  h = _dpo_margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps)
  return jnp.square(h - 1.0 / (2.0 * beta))


# ------------------------------------------------------------------------------------------------
# PPO. Per-token arrays are [B, T] over the response window; mask marks real response tokens.
# ------------------------------------------------------------------------------------------------
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
