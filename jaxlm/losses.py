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
The PPO losses live in `jaxlm/rl_losses.py` and follow the same conventions.
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
def masked_token_log_probs(*, logits: Array, targets: Array, mask: Array) -> Array:
  r"""Per-position target log-probs :math:`m_{b,t} \log p_{b,t}`, exactly 0 where masked.

  Unlike `token_log_probs`, logits that are -inf (top-k / top-p filtered vocabulary entries) or
  garbage at masked positions do not give NaN: masked positions are replaced before any
  arithmetic, and the target logit is selected with `where`, not multiplied by a one-hot.

  Args:
    logits: [B, T, V] float (computed in float32).
    targets: [B, T] int token ids in [0, V).
    mask: [B, T] bool or float weights (the response tokens).

  Returns:
    [B, T] float32.
  """
  keep = mask != 0
  logits = jnp.where(keep[..., None], logits.astype(jnp.float32), 0.0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # Still a one-hot contraction (see `_log_normalizer_and_target_logit`), but through `where`:
  # -inf * 0 would be NaN.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
  target_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
  return jnp.where(keep, (target_logit - lse) * mask.astype(jnp.float32), 0.0)


def sequence_log_probs(*, logits: Array, targets: Array, mask: Array) -> Array:
  r"""Sum of the masked target-token log-probs of each row: :math:`\sum_t m_{b,t} \log p_{b,t}`.

  `masked_token_log_probs` summed over T: [B, T, V], [B, T], [B, T] -> [B] float32 (0 for a
  fully masked row); NaN-free where masked.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]]))  # log 0 = -inf
    >>> logp = sequence_log_probs(logits=logits, targets=jnp.array([[0, 1]]),
    ...                           mask=jnp.array([[True, True]]))
    >>> round(float(logp[0]), 4)  # log 0.5 + log 0.75
    -0.9808
  """
  return jnp.sum(masked_token_log_probs(logits=logits, targets=targets, mask=mask), axis=-1)


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
