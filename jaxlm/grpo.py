"""Critic-free on-policy RL: GRPO, RLOO and Dr. GRPO's update on top of the rollout layer.

What a critic-free method adds to `jaxlm/rollout.py` (which samples G replies per prompt in
contiguous groups, packs and scores them): a group-relative advantage per reply from the G
scores of its prompt, and a clipped-ratio policy update. No value model, no GAE.

One iteration (`experiments/grpo.py`), R = P * G rows:

  rollout  = collect_rollout(policy, prompts, group_size=G)     [R, N]
  scored   = score(policy, reference, reward model?, rollout)   log_probs, ref_log_probs [R, N]
  scores   = the reward callables' sum per reply                [R]  (k1 KL folded in if kl_in="reward")
  A        = advantage[method](scores.reshape(P, G))            [R]  (`jaxlm/group_rl_losses.py`)
  update   = epochs x minibatches of AdamW steps on
             L = norm( clip-loss(log pi, log pi_old, A) + beta * k3(pi || ref) [if kl_in="loss"] )

The advantage estimators, the clipped objective, the KL terms and the three loss normalisations
are pure functions in `jaxlm/group_rl_losses.py`; this module only chooses among them by
config (`GRPOConfig`) and builds the jitted, donated, sharded update step. The policy's state is
an ordinary `training.TrainState`, so checkpoints, resume and the planner treat it like SFT's.

Minibatches split whole groups? No: advantages are computed once per iteration over whole
groups, before the update, so minibatches may mix rows of different prompts freely (as TRL
does); each minibatch's loss is normalised within the minibatch (one optimizer step each).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import group_rl_losses as glosses
from jaxlm import model as model_lib
from jaxlm import rollout as rollout_lib
from jaxlm import sharding as sharding_lib
from jaxlm import training

Array = jax.Array

ADVANTAGES = {"grpo": glosses.grpo_advantages, "rloo": glosses.rloo_advantages,
              "dr_grpo": glosses.dr_grpo_advantages}
LOSS_NORMS = ("token", "sequence", "constant")
KL_PLACES = ("loss", "reward")
OLD_LOG_PROBS = ("sampler", "scorer")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The method's knobs (the `grpo` section of configs/grpo.py); frozen so jitted code closes over it.

  Attributes:
    group_size: G, replies per prompt (>= 2: a group of one has no relative advantage).
    advantage: "grpo" ((r - mean) / (std + 1e-4), sample std as TRL), "rloo" (leave-one-out
      mean) or "dr_grpo" (r - mean: no std, Liu et al. 2025).
    clip_eps_low, clip_eps_high: the ratio is clipped to [1 - low, 1 + high]; high > low is
      DAPO's clip-higher.
    epochs, num_minibatches: passes over each rollout and optimizer steps per pass.
    loss_norm: "token" (sum over the minibatch's response tokens / their count: DAPO, TRL's
      default), "sequence" (mean over replies of each reply's token mean: the GRPO paper), or
      "constant" (sum / (replies x max_new_tokens): Dr. GRPO, no length bias).
    kl_coef: beta of the KL to the reference (0 turns it off).
    kl_in: "loss" (beta * k3 per token, added to the loss before normalising: GRPO paper) or
      "reward" (beta * sum of k1 subtracted from each reply's score before the advantages).
    temperature: sampling and scoring temperature (1 without truncation: exact log-probs).
    old_log_probs: where log pi_old of the ratio comes from. "sampler": the log-probs the
      sampler drew the reply with, which *are* the rollout policy's (exact at any temperature
      without truncation; they agree with teacher forcing to ~1e-6, `sampler_gap`), so the
      scorer skips the policy's forward pass (TRL also skips it when it does one step per
      generation); the update measures the sampler/trainer gap on its first minibatch, before
      any step. "scorer": a teacher-forced forward pass in the scorer (the PPO way), with the
      policy's entropy and the gap over every reply measured there.
    dynamic_sampling_rounds: DAPO's dynamic sampling. A group whose G rewards are all equal has
      zero advantage everywhere and teaches nothing but the KL term; with R > 0 an iteration
      draws up to R more batches of prompts and trains on the first P groups, in draw order,
      that do differ (`pick_groups`); short of P after R rounds, the uninformative groups fill
      the batch in draw order. 0: off (train on the first draw, as the GRPO paper).
  """

  group_size: int = 4
  advantage: str = "grpo"
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  epochs: int = 1
  num_minibatches: int = 1
  loss_norm: str = "token"
  kl_coef: float = 0.04
  kl_in: str = "loss"
  temperature: float = 1.0
  old_log_probs: str = "sampler"
  dynamic_sampling_rounds: int = 0

  def __post_init__(self):
    if not isinstance(self.group_size, int) or self.group_size < 2:
      raise ValueError(f"group_size must be an int >= 2, got {self.group_size!r}")
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"advantage must be one of {sorted(ADVANTAGES)}, got {self.advantage!r}")
    if self.loss_norm not in LOSS_NORMS:
      raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
    if self.old_log_probs not in OLD_LOG_PROBS:
      raise ValueError(f"old_log_probs must be one of {OLD_LOG_PROBS}, got {self.old_log_probs!r}")
    if self.kl_in not in KL_PLACES:
      raise ValueError(f"kl_in must be one of {KL_PLACES}, got {self.kl_in!r}")
    if not 0.0 < self.clip_eps_low < 1.0 or not self.clip_eps_high > 0.0:
      raise ValueError(f"need 0 < clip_eps_low < 1 and clip_eps_high > 0, got {self.clip_eps_low!r}, "
                       f"{self.clip_eps_high!r}")
    if not isinstance(self.dynamic_sampling_rounds, int) or self.dynamic_sampling_rounds < 0:
      raise ValueError(f"dynamic_sampling_rounds must be an int >= 0, got {self.dynamic_sampling_rounds!r}")
    for name in ("epochs", "num_minibatches"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if self.kl_coef < 0 or self.temperature <= 0:
      raise ValueError(f"need kl_coef >= 0 and temperature > 0, got {self.kl_coef!r}, {self.temperature!r}")


def make_scorer(config: model_lib.ModelConfig, reward_config: model_lib.ModelConfig | None, grpo: GRPOConfig, *,
                mesh: jax.sharding.Mesh | None = None, rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """`score(policy, reference, reward, rollout) -> dict`: `log_probs` (the old policy's, from
  `grpo.old_log_probs`), `ref_log_probs`, `score` (with a reward model) and, when the policy is
  scored, `entropy`. One jitted program (`rollout.jit_scorer`)."""
  if grpo.old_log_probs == "scorer":
    return rollout_lib.make_scorer(config, reward_config, temperature=grpo.temperature, mesh=mesh, rules=rules)
  body = rollout_lib.score_fn(config, reward_config, temperature=grpo.temperature, score_policy=False)

  def score_rollout(policy_params, reference_params, reward_params, rollout):
    del policy_params  # The sampler's log-probs are the rollout policy's.
    out = body(None, reference_params, reward_params, rollout)
    out["log_probs"] = jnp.where(rollout["mask"], rollout["sampler_log_probs"], 0.0)
    return out

  return rollout_lib.jit_scorer(score_rollout, mesh=mesh, rules=rules)


@jax.jit
def _kl_penalized(scores, log_probs, ref_log_probs, mask, kl_coef):
  return glosses.kl_penalized_scores(scores=scores, log_probs=log_probs, ref_log_probs=ref_log_probs,
                                     mask=mask, kl_coef=kl_coef)


def advantages(scores: Array, *, grpo: GRPOConfig, valid: Array | None = None) -> Array:
  """Group-relative advantages of R = P * G replies in contiguous groups: float32 [R].

  `scores` [R] are the replies' final scores (rewards, with the k1 KL folded in when
  `grpo.kl_in == "reward"`); `valid` [R] marks replies that count (None: all).
  """
  g = grpo.group_size
  if scores.shape[0] % g:
    raise ValueError(f"{scores.shape[0]} replies do not form groups of {g}")
  grouped = scores.reshape(-1, g).astype(jnp.float32)
  valid = None if valid is None else valid.reshape(-1, g)
  return ADVANTAGES[grpo.advantage](scores=grouped, valid=valid).reshape(-1)


def score_with_kl(scores: Array, scored: dict[str, Array], mask: Array, grpo: GRPOConfig) -> Array:
  """The scores the advantages are computed from: with `kl_in="reward"`, minus beta * sum_t k1."""
  if grpo.kl_in != "reward" or grpo.kl_coef == 0:
    return jnp.asarray(scores, jnp.float32)
  return _kl_penalized(jnp.asarray(scores, jnp.float32), scored["log_probs"], scored["ref_log_probs"], mask,
                       jnp.float32(grpo.kl_coef))


def _normalized(token_losses: Array, mask: Array, grpo: GRPOConfig) -> tuple[Array, Array]:
  if grpo.loss_norm == "token":
    return glosses.token_level_sums(token_losses=token_losses, mask=mask)
  if grpo.loss_norm == "sequence":
    return glosses.sequence_level_sums(token_losses=token_losses, mask=mask)
  return glosses.constant_normalizer_sums(token_losses=token_losses, mask=mask, max_response_len=mask.shape[1])


def minibatch_loss(model, params, batch: dict[str, Array], grpo: GRPOConfig) -> tuple[Array, dict[str, Array]]:
  """The normalised loss of one minibatch and its metrics (per-token means over its replies)."""
  mask = batch["mask"]
  seqs = rollout_lib.pack_rollout(batch)
  log_probs, entropy = rollout_lib.policy_log_probs(model, params, seqs, batch["response_tokens"], mask,
                                                    grpo.temperature)
  token_losses, aux = glosses.clipped_policy_loss(
      log_probs=log_probs, old_log_probs=batch["log_probs"], advantages=batch["advantages"], mask=mask,
      clip_eps_low=grpo.clip_eps_low, clip_eps_high=grpo.clip_eps_high)
  policy_sum, policy_count = _normalized(token_losses, mask, grpo)
  total = token_losses
  metrics = {}
  if grpo.kl_in == "loss" and grpo.kl_coef:
    kl = glosses.token_kl_k3(log_probs=log_probs, ref_log_probs=batch["ref_log_probs"], mask=mask)
    total = token_losses + grpo.kl_coef * kl
    kl_sum, kl_count = glosses.token_level_sums(token_losses=kl, mask=mask)
    metrics["kl_k3"] = kl_sum / jnp.maximum(kl_count, 1.0)
  loss_sum, count = _normalized(total, mask, grpo)
  loss = loss_sum / jnp.maximum(count, 1.0)
  # The aux sums are per token: divide by the token count, whatever the loss's normaliser is.
  tokens = jnp.maximum(aux.pop("tokens"), 1.0)
  entropy_sum, _ = glosses.token_level_sums(token_losses=entropy, mask=mask)
  metrics.update({k: v / tokens for k, v in aux.items()}, entropy=entropy_sum / tokens,
                 policy_loss=policy_sum / jnp.maximum(policy_count, 1.0), loss=loss,
                 log_ratio_max=rollout_lib.sampler_gap(log_probs=log_probs, sampler_log_probs=batch["log_probs"],
                                                       mask=mask))
  return loss, metrics


def make_update(config: model_lib.ModelConfig, grpo: GRPOConfig, tx: optax.GradientTransformation, *,
                state_shardings: training.TrainState, mesh: jax.sharding.Mesh,
                rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """A jitted, donated `update(state, batch) -> (state, metrics)`: all epochs and minibatches.

  `batch` [R, ...]: the rollout (`rollout.ROLLOUT_KEYS`), the scorer's `log_probs` (the old
  policy's) and `ref_log_probs`, and `advantages` [R]. Each epoch shuffles the rows with the
  state's rng and takes `num_minibatches` equal slices; every slice is one AdamW step. Metrics
  are means over all minibatches; `state.step` counts iterations (one call), like PPO's. With
  `old_log_probs="sampler"` they also hold `sampler_gap`: max |log pi - log pi_old| on the first
  minibatch, whose params are still the sampler's.
  """
  model = model_lib.Transformer(config)

  def one_minibatch(state: training.TrainState, minibatch):
    grads, metrics = jax.grad(lambda p: minibatch_loss(model, p, minibatch, grpo), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}

  def update(state: training.TrainState, batch: dict[str, Array]):
    rows = batch["mask"].shape[0]
    if rows % grpo.num_minibatches:
      raise ValueError(f"rollout of {rows} rows does not split into {grpo.num_minibatches} minibatches")
    rng, epoch_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

    def one_epoch(state, key):
      shuffled = rollout_lib.shuffled_minibatches(batch, key, grpo.num_minibatches, mesh=mesh, rules=rules)
      return jax.lax.scan(one_minibatch, state, shuffled)

    state, metrics = jax.lax.scan(one_epoch, state, jax.random.split(epoch_rng, grpo.epochs))
    state = state.replace(step=state.step + 1, rng=jax.random.key_data(rng))
    first_step_gap = metrics.pop("log_ratio_max")[0, 0]  # [epochs, minibatches]: before any step
    metrics = jax.tree.map(jnp.mean, metrics)
    if grpo.old_log_probs == "sampler":
      metrics["sampler_gap"] = first_step_gap
    return state, metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(update, in_shardings=(state_shardings, training.batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def step(state: training.TrainState, batch: dict[str, Array]):
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(state, batch)

  step.jitted = jitted  # For the planner.
  return step


def update_batch(rollout: dict[str, Array], scored: dict[str, Array], advantage: Array) -> dict[str, Array]:
  """The arrays `make_update`'s step reads."""
  return {**{k: rollout[k] for k in rollout_lib.ROLLOUT_KEYS}, "log_probs": scored["log_probs"],
          "ref_log_probs": scored["ref_log_probs"], "advantages": advantage}


def informative_groups(rewards, *, group_size: int) -> np.ndarray:
  """bool [P]: which groups' G rewards (host [P * G], before any KL term) are not all equal.

  Only these carry a learning signal: every estimator's advantages are 0 in a constant group
  (with kl_in="reward", all that is left there is the spread of the groups' KL terms).
  """
  grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
  return grouped.max(axis=-1) != grouped.min(axis=-1)


def pick_groups(informative: Sequence[np.ndarray], num_groups: int) -> list[tuple[int, int]]:
  """The (round, group) pairs an update trains on, from the `informative` flags of each round.

  The first `num_groups` informative groups in draw order (round 0's first); if there are
  fewer, the first uninformative ones fill the rest. Returned in draw order, so one round's
  groups keep their rows' places. Deterministic: a resumed run picks the same groups.

  >>> pick_groups([np.array([True, False, False]), np.array([False, True, True])], 3)
  [(0, 0), (1, 1), (1, 2)]
  >>> pick_groups([np.array([False, True, False]), np.array([False, False, False])], 3)
  [(0, 0), (0, 1), (0, 2)]
  """
  drawn = [(r, g) for r, flags in enumerate(informative) for g in range(len(flags))]
  useful = [rg for rg in drawn if informative[rg[0]][rg[1]]]
  useless = [rg for rg in drawn if not informative[rg[0]][rg[1]]]
  if len(drawn) < num_groups:
    raise ValueError(f"{len(drawn)} groups drawn, {num_groups} needed")
  return sorted((useful + useless)[:num_groups])


def gather_groups(batches: Sequence[dict[str, Array]], picks: Sequence[tuple[int, int]], *,
                  group_size: int) -> dict[str, Array]:
  """The rows of the picked groups, in pick order: each [len(picks) * G, ...], placed as round 0's.

  `batches` are per-round dicts of equal keys and shapes, rows grouped contiguously (G rows per
  prompt, as `collect_rollout` lays them out). A group's rows move together, so its advantages
  (computed within the group) stay valid.
  """
  if len(batches) == 1 and list(picks) == [(0, g) for g in range(len(picks))]:
    return dict(batches[0])  # The first draw, whole and in order: nothing to move.
  rows_per_round = next(iter(batches[0].values())).shape[0]
  groups_per_round = rows_per_round // group_size
  rows = np.asarray([(r * groups_per_round + g) * group_size + j for r, g in picks for j in range(group_size)])
  out = {}
  for key, first in batches[0].items():
    stacked = jnp.concatenate([b[key] for b in batches], axis=0) if len(batches) > 1 else first
    taken = jnp.take(stacked, rows, axis=0)
    out[key] = jax.device_put(taken, first.sharding) if taken.shape == first.shape else taken
  return out


@functools.partial(jax.jit, static_argnames="group_size")
def group_diagnostics(scores: Array, advantage: Array, *, group_size: int) -> dict[str, Array]:
  """How large the groups' signal was (float32 scalars): `score_std_within`, the mean
  within-group std of the scores, and `advantage_abs_mean`. (How many groups had none is
  `informative_groups`' complement: the experiment logs it as `zero_std_groups`.)"""
  grouped = scores.astype(jnp.float32).reshape(-1, group_size)
  return {"score_std_within": jnp.mean(jnp.std(grouped, axis=-1)),
          "advantage_abs_mean": jnp.mean(jnp.abs(advantage))}
