"""The reward model: the shared backbone with a scalar head, trained on preference pairs.

A reward r(x, y) is the scalar head read at the last real token of the response y (its
`<|end|>`), at the explicit `last_index` the pairs pipeline computes, never at a pad position
(reading a pad token is the classic bug that leaves reward models near chance):

  r = h[last_index] . w + b0          h: the final hidden states [B, L, E] of prompt + response

Training minimises the Bradley-Terry negative log-likelihood of the labels (`losses.py`),

  L = mean over pairs of  -log sigmoid(r_chosen - r_rejected - margin)
                          + centering_weight * (r_chosen + r_rejected)^2

with both sides of every pair in one forward pass of [2B, L] rows. `pairwise_report` turns the
held-out rewards into the evaluation the issue asks for (accuracy against the labels and their
own ceiling, correlation with the gold reward, accuracy by length, reward-length correlation).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from jaxlm import losses
from jaxlm import model as model_lib

Array = jax.Array
SIDES = ("chosen", "rejected")
# Pair-length buckets (mean response tokens of the two sides) for accuracy by length.
LENGTH_EDGES = (0, 8, 16, 32, 64)


def pair_rewards(model: model_lib.Transformer, params, batch: Mapping[str, Array]) -> tuple[Array, Array]:
  """Rewards of both sides of a pair batch: ([B], [B]) float32, one forward pass of [2B, L].

  Args:
    model: the Transformer (its config is the reward model's).
    params: plain params with a `scalar_head`.
    batch: a pairs batch (`jaxlm.data.pipelines.pairs_dataset`): `<side>_tokens`,
      `<side>_segment_ids`, `<side>_positions` [B, L] and `<side>_last_index` [B].
  """
  def both(name):
    return jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)

  out = model.apply({"params": params}, both("tokens"), segment_ids=both("segment_ids"),
                    positions=both("positions"), scalar_index=both("last_index"), lm_head=False)
  chosen, rejected = jnp.split(out.scalar.astype(jnp.float32), 2)
  return chosen, rejected


def reward_loss_fn(model: model_lib.Transformer, *, margin: float = 0.0,
                   centering_weight: float = 0.0) -> Callable:
  """The Bradley-Terry training loss in the `(loss_sum, count, aux_sums)` contract of training.py.

  Args:
    model: the reward model's Transformer.
    margin: a constant margin m in -log sigmoid(r_c - r_r - m) (0: the plain BT loss).
    centering_weight: weight of the reward-centering term (r_c + r_r)^2 (0: off).

  Returns:
    `loss_fn(params, batch, rng)`: the sum over valid pairs, their count, and sums of
    `accuracy` (r_c > r_r; ties half), `margin` (r_c - r_r), `chosen_reward`, `rejected_reward`,
    each reported per pair by the train and eval steps.
  """

  def loss_fn(params, batch, rng):
    del rng
    chosen, rejected = pair_rewards(model, params, batch)
    valid = batch["valid"].astype(jnp.float32)
    per_pair = losses.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected, margin=margin)
    if centering_weight:
      per_pair = per_pair + centering_weight * losses.reward_centering_loss(
          chosen_rewards=chosen, rejected_rewards=rejected)
    difference = chosen - rejected
    correct = jnp.where(difference > 0, 1.0, jnp.where(difference == 0, 0.5, 0.0))
    aux = {"accuracy": correct, "margin": difference, "chosen_reward": chosen, "rejected_reward": rejected}
    return (jnp.sum(per_pair * valid), jnp.sum(valid),
            {name: jnp.sum(value * valid) for name, value in aux.items()})

  return loss_fn


@functools.partial(jax.jit, static_argnames="config")
def score_pair_batch(params, batch: Mapping[str, Array], *, config: model_lib.ModelConfig) -> tuple[Array, Array]:
  """Jitted `pair_rewards` for evaluation."""
  return pair_rewards(model_lib.Transformer(config), params, batch)


def score_pairs(params, config: model_lib.ModelConfig, batches) -> dict[str, np.ndarray]:
  """Rewards of every valid pair of a finite pass: {chosen, rejected, chosen_length,
  rejected_length, record_index}, numpy [N] each (lengths: response tokens incl. `<|end|>`)."""
  out = {name: [] for name in ("chosen", "rejected", "chosen_length", "rejected_length", "record_index")}
  for batch in batches:
    valid = np.asarray(batch["valid"]).astype(bool)
    chosen, rejected = jax.device_get(score_pair_batch(params, batch, config=config))
    out["chosen"].append(np.asarray(chosen)[valid])
    out["rejected"].append(np.asarray(rejected)[valid])
    for side in SIDES:
      out[f"{side}_length"].append(np.asarray(batch[f"{side}_loss_mask"]).sum(axis=1)[valid])
    out["record_index"].append(np.asarray(batch["record_index"])[valid])
  return {name: np.concatenate(parts) if parts else np.zeros((0,)) for name, parts in out.items()}


def _correlation(x: np.ndarray, y: np.ndarray, rank: bool = False) -> float:
  """Pearson (or Spearman, on ranks) correlation; NaN when either side is constant."""
  if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
    return float("nan")
  if rank:
    x, y = scipy_stats.rankdata(x), scipy_stats.rankdata(y)
  return float(np.corrcoef(x, y)[0, 1])


def _accuracy(difference: np.ndarray) -> float:
  """Fraction of pairs with chosen > rejected, ties counting half."""
  return float(np.mean((difference > 0) + 0.5 * (difference == 0))) if len(difference) else float("nan")


def pairwise_report(scores: Mapping[str, np.ndarray], records: Sequence[Mapping[str, Any]] | None = None
                    ) -> dict[str, float]:
  """Held-out evaluation of a reward model from `score_pairs` output.

  Args:
    scores: `score_pairs(...)` on the held-out pairs.
    records: the preference records, indexed by `scores["record_index"]`; when their `meta`
      carries the world's gold rewards (`gold_chosen`, `gold_rejected`, `label_agrees_gold`),
      the gold-based metrics are added.

  Returns (every metric with the number of pairs behind it: `num_pairs` unless said otherwise):
    num_pairs         the pairs scored (int)
    accuracy          fraction of pairs ranked as labelled (ties half)
    margin            mean r_chosen - r_rejected
    reward_mean, reward_std   over both sides of every pair
    accuracy/len_<lo>_<hi>     accuracy by mean response length of the pair (tokens), for the
                              bins that hold a pair
    num_pairs/len_<lo>_<hi>    the pairs in that bin (int), for every bin, 0 when empty; the bins
                              partition the pairs, so these sum to num_pairs
    length_correlation        Pearson(reward, response length) over both sides
    length_preference         fraction of unequal-length pairs where the longer side scores higher
                              (ties half): 0.5 is indifferent to length
    num_pairs/length_preference   the unequal-length pairs behind it (int)
    and, with world gold:
    label_ceiling     how often the gold reward agrees with the noisy labels: the accuracy a
                      perfect copy of the gold reward would score (ties half)
    accuracy_vs_ceiling  accuracy / label_ceiling
    gold_accuracy     agreement with the gold preference itself (pairs with unequal gold)
    num_pairs/gold_accuracy   the pairs with unequal gold behind it (int)
    gold_pearson, gold_spearman   correlation of reward and gold reward over both sides
    gold_length_correlation   Pearson(gold reward, length): what the length correlation should be
  """
  chosen, rejected = scores["chosen"], scores["rejected"]
  difference = chosen - rejected
  rewards = np.concatenate([chosen, rejected])
  lengths = np.concatenate([scores["chosen_length"], scores["rejected_length"]]).astype(np.float64)
  report = {"accuracy": _accuracy(difference), "margin": float(np.mean(difference)) if len(difference) else float("nan"),
            "reward_mean": float(np.mean(rewards)) if len(rewards) else float("nan"),
            "reward_std": float(np.std(rewards)) if len(rewards) else float("nan"),
            "num_pairs": int(len(difference)),
            "length_correlation": _correlation(rewards, lengths)}
  pair_length = (scores["chosen_length"] + scores["rejected_length"]) / 2
  edges = LENGTH_EDGES + (np.inf,)
  for lo, hi in zip(edges[:-1], edges[1:]):
    inside = (pair_length >= lo) & (pair_length < hi)
    name = f"len_{lo}_{hi if np.isfinite(hi) else 'inf'}"
    report[f"num_pairs/{name}"] = int(inside.sum())
    if inside.any():
      report[f"accuracy/{name}"] = _accuracy(difference[inside])
  longer_first = scores["chosen_length"] - scores["rejected_length"]
  unequal = longer_first != 0
  report["num_pairs/length_preference"] = int(unequal.sum())
  if unequal.any():
    report["length_preference"] = _accuracy(difference[unequal] * np.sign(longer_first[unequal]))
  metas = [records[int(i)].get("meta", {}) for i in scores["record_index"]] if records is not None else []
  if metas and all("gold_chosen" in m and "gold_rejected" in m for m in metas):
    gold_chosen = np.asarray([m["gold_chosen"] for m in metas], np.float64)
    gold_rejected = np.asarray([m["gold_rejected"] for m in metas], np.float64)
    gold_difference = gold_chosen - gold_rejected
    ceiling = _accuracy(gold_difference)
    decided = gold_difference != 0
    golds = np.concatenate([gold_chosen, gold_rejected])
    report.update(
        label_ceiling=ceiling,
        accuracy_vs_ceiling=report["accuracy"] / ceiling if ceiling else float("nan"),
        gold_accuracy=_accuracy(difference[decided] * np.sign(gold_difference[decided])),
        **{"num_pairs/gold_accuracy": int(decided.sum())},
        gold_pearson=_correlation(rewards, golds),
        gold_spearman=_correlation(rewards, golds, rank=True),
        gold_length_correlation=_correlation(golds, lengths))
  return report
