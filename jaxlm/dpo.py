"""Direct preference optimisation: response log-probs of pair batches, and the training loss.

DPO (Rafailov et al. 2023) trains the policy pi directly on preference pairs (x, y_c, y_r)
against a frozen reference pi_ref (the SFT model), through the implicit rewards

  r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)),   log pi(y | x) = sum_t log pi(y_t | x, y_<t)

summed over the response tokens only (the response and its `<|end|>`), computed from one row per
pair that holds the prompt once (the pairs pipeline's shared-prompt layout). The losses themselves (sigmoid DPO, conservative DPO, IPO) are pure
functions of four [B] log-prob vectors in `jaxlm/losses.py`; this module computes those vectors
with the same `Transformer` forward pass as every other stage and wires them into the
`(loss_sum, count, aux_sums)` contract of `jaxlm/training.py`.

The reference log-probs enter through the batch (`reference_chosen_logps`,
`reference_rejected_logps`, [B]), from either of two sources that give the same loss:

  * online: a jitted forward of the frozen reference on each batch just before the step
    (`ReferenceAttacher` with `reference_fn`), holding two models in memory;
  * precomputed: one pass over the training pairs before training (`precompute_reference`),
    looked up by `record_index`, after which the reference is dropped and training holds one
    model (the memory fix for large models).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib

Array = jax.Array
# name -> loss function of the four [B] log-prob vectors (and beta, label_smoothing).
LOSSES = {
    "sigmoid": lambda beta, label_smoothing: functools.partial(losses.dpo_loss, beta=beta,
                                                               label_smoothing=label_smoothing),
    "ipo": lambda beta, label_smoothing: functools.partial(losses.ipo_loss, beta=beta),
}


def pair_log_probs(model: model_lib.Transformer, params, batch: Mapping[str, Array]) -> tuple[Array, Array]:
  """Summed response log-probs of both sides: ([B], [B]) float32, one forward pass of [B, L].

  The batch is in the shared-prompt layout (`pipelines.pairs_dataset(layout="shared")`): one row
  per pair holds the prompt once and both responses after it, each response attending to the
  prompt and to itself only (`branch_ids`), at the positions it would have in its own sequence.
  So every response token sees exactly the context it would see in a row of its own, and the
  log-probs equal those of two separate forward passes (tests/test_dpo.py checks this), for
  L / (2 L_side) of the work. The LM head runs only at the S scored positions (`score_index`).
  """
  logits = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], branch_ids=batch["branch_ids"],
                       logits_at=batch["score_index"]).logits
  side = batch["score_side"]
  token_logps = losses.masked_token_log_probs(logits=logits, targets=batch["score_targets"], mask=side != 0)
  chosen = jnp.sum(jnp.where(side == 1, token_logps, 0.0), axis=-1)
  rejected = jnp.sum(jnp.where(side == 2, token_logps, 0.0), axis=-1)
  return chosen, rejected


def dpo_loss_fn(model: model_lib.Transformer, *, loss: str, beta: float, label_smoothing: float = 0.0) -> Callable:
  """The DPO training loss in the `(loss_sum, count, aux_sums)` contract of training.py.

  Args:
    model: the policy's Transformer.
    loss: a key of `LOSSES` ("sigmoid": DPO, conservative with label_smoothing > 0; "ipo").
    beta: the KL-regularisation strength (IPO's tau).
    label_smoothing: cDPO's assumed label-noise rate (sigmoid only).

  Returns:
    `loss_fn(params, batch, rng)`; the batch also carries `reference_chosen_logps` and
    `reference_rejected_logps` [B]. Aux sums, reported per pair: `accuracy` (implicit reward of
    chosen > rejected, ties half), `chosen_reward`, `rejected_reward`, `margin`, and the policy's
    `chosen_logps`, `rejected_logps`.
  """
  if loss not in LOSSES:
    raise ValueError(f"unknown DPO loss {loss!r}; expected one of {sorted(LOSSES)}")
  if loss != "sigmoid" and label_smoothing:
    raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss!r}")
  per_pair_loss = LOSSES[loss](beta, label_smoothing)

  def loss_fn(params, batch, rng):
    del rng
    chosen, rejected = pair_log_probs(model, params, batch)
    logps = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                 reference_chosen_logps=batch["reference_chosen_logps"],
                 reference_rejected_logps=batch["reference_rejected_logps"])
    per_pair = per_pair_loss(**logps)
    chosen_reward, rejected_reward = losses.dpo_implicit_rewards(**logps, beta=beta)
    valid = batch["valid"].astype(jnp.float32)
    aux = {"accuracy": losses.pairwise_accuracy(chosen_rewards=chosen_reward, rejected_rewards=rejected_reward),
           "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
           "margin": chosen_reward - rejected_reward, "chosen_logps": chosen, "rejected_logps": rejected}
    return (jnp.sum(per_pair * valid), jnp.sum(valid),
            {name: jnp.sum(value * valid) for name, value in aux.items()})

  return loss_fn


class ReferenceLogps:
  """The frozen reference's summed response log-probs of pair batches, on the device mesh.

  `ref(params, host_batch) -> (chosen [B], rejected [B])`: dispatched asynchronously, global
  arrays; `ref.to_host(out)` -> this process's rows as numpy. With a `mesh` the pass runs as
  the training step does: each process's rows join one global batch split along B over the
  mesh's batch axes (`data`, `fsdp`), the parameters keep the shardings they were placed with
  (the policy's), and the model's activation constraints apply, so every device scores its
  share of the pairs. Without a mesh: one device. The jitted program is `ref.jitted`.
  """

  def __init__(self, config: model_lib.ModelConfig, *, mesh: jax.sharding.Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES):
    model = model_lib.Transformer(config)
    self._mesh, self._rules = mesh, rules
    compute = lambda params, batch: pair_log_probs(model, params, batch)
    if mesh is None:
      self.jitted = jax.jit(compute)
    else:
      self._rows = sharding_lib.batch_sharding(mesh, rules)
      self.jitted = jax.jit(compute, in_shardings=(None, self._rows), out_shardings=self._rows)

  def __call__(self, params, host_batch: Mapping[str, np.ndarray]) -> tuple[Array, Array]:
    batch = _model_inputs(host_batch)
    if self._mesh is None:
      return self.jitted(params, batch)
    batch = sharding_lib.shard_host_batch(batch, self._mesh, self._rules)
    with sharding_lib.use_mesh(self._mesh, self._rules):
      return self.jitted(params, batch)

  def to_host(self, out: tuple[Array, Array]) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of a call's (chosen, rejected), in the order its host batch had."""
    if self._mesh is None or jax.process_count() == 1:
      return tuple(np.asarray(x) for x in jax.device_get(out))
    local = multihost_utils.global_array_to_host_local_array(out, self._mesh, self._rows.spec)
    return tuple(np.asarray(x) for x in local)


def reference_fn(config: model_lib.ModelConfig, *, mesh: jax.sharding.Mesh | None = None,
                 rules=sharding_lib.DEFAULT_RULES) -> ReferenceLogps:
  """The reference pass of `config`'s model (see `ReferenceLogps`)."""
  return ReferenceLogps(config, mesh=mesh, rules=rules)


_MODEL_KEYS = ("tokens", "segment_ids", "positions", "branch_ids", "score_index", "score_targets", "score_side")


def _model_inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {key: batch[key] for key in _MODEL_KEYS}


def precompute_reference(params, config: model_lib.ModelConfig, batches, num_records: int, *,
                         mesh: jax.sharding.Mesh | None = None, rules=sharding_lib.DEFAULT_RULES) -> np.ndarray:
  """Reference log-probs of every pair of a finite pass: float32 [num_records, 2] (chosen,
  rejected) indexed by `record_index`; NaN for records the pass did not contain (dropped ones).
  With a `mesh` (params placed on it), every device computes its share (`ReferenceLogps`).
  """
  compute = reference_fn(config, mesh=mesh, rules=rules)
  table = np.full((num_records, 2), np.nan, np.float32)
  pending = []
  for batch in batches:  # All dispatched before the first result is read: the device never waits.
    pending.append((np.asarray(batch["record_index"]), np.asarray(batch["valid"]).astype(bool),
                    compute(params, batch)))
  for index, valid, out in pending:
    chosen, rejected = compute.to_host(out)
    table[index[valid], 0] = chosen[valid]
    table[index[valid], 1] = rejected[valid]
  return table


class ReferenceAttacher:
  """Wraps a pairs iterator so every batch carries the reference log-probs.

  Exactly one of `table` (from `precompute_reference`, looked up by `record_index`) or
  `params` + `compute` (a `ReferenceLogps`: an online forward of the frozen reference) is given. `get_state` and
  `set_state` pass through, so checkpoints still record the data position.
  """

  def __init__(self, iterator: Iterator[dict], *, table: np.ndarray | None = None, params: Any = None,
               compute: ReferenceLogps | None = None):
    if (table is None) == (compute is None):
      raise ValueError("give either a precomputed table or params and compute, not both")
    self._iterator, self._table, self._params, self._compute = iterator, table, params, compute

  def __iter__(self) -> "ReferenceAttacher":
    return self

  def __next__(self) -> dict:
    return self.attach(next(self._iterator))

  def attach(self, batch: Mapping[str, np.ndarray]) -> dict:
    """A copy of a host pairs batch with `reference_chosen_logps`, `reference_rejected_logps`."""
    batch = dict(batch)
    if self._table is not None:
      looked_up = self._table[np.asarray(batch["record_index"])]
      valid = np.asarray(batch["valid"]).astype(bool)
      if np.isnan(looked_up[valid]).any():
        raise ValueError("a training pair has no precomputed reference log-probs: the table was "
                         "computed on other data")
      chosen, rejected = np.nan_to_num(looked_up[:, 0]), np.nan_to_num(looked_up[:, 1])
    else:
      chosen, rejected = self._compute.to_host(self._compute(self._params, batch))
    batch["reference_chosen_logps"] = np.asarray(chosen, np.float32)
    batch["reference_rejected_logps"] = np.asarray(rejected, np.float32)
    return batch

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iterator.set_state(state)
