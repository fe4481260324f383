"""Pure loss functions: keyword-only, float32, with explicit masks.

Every loss returns a `(sum, count)` pair instead of a mean: the sum of the per-token (or
per-example) loss over the masked entries, and the number of masked entries, both float32
scalars. Means are formed once, at the very end, as `sum / count` over everything that belongs
to one update (all microbatches, all devices), so gradient accumulation and sharding give the
exact token-weighted mean whatever the number of tokens in each piece.

Logits may arrive in bfloat16; they are upcast to float32 before any exponent is taken.

Loss functions for a model (`lm_loss_fn`) return `(loss_sum, count, aux)`, where `aux` maps a
metric name to its *sum* over the masked tokens; the train step reports `aux[name] / count`.
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
