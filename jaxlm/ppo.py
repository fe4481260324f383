"""RLHF with PPO: a critic, GAE advantages and the clipped update, as jitted functions.

One PPO iteration (Ouyang et al. 2022; Ziegler et al. 2019), with B prompts and N new tokens.
Steps 1-3 are the shared on-policy rollout layer (`jaxlm/rollout.py`, which has the row layout);
PPO adds the value model to its scorer, and steps 4-5:

  1. rollout     y ~ pi_old(. | x), one reply per prompt (`rollout.collect_rollout`), at
                 temperature T without truncation, so the sampler's log-probs are exact.
  2. sequences   prompt + response packed per row into [B, L = P + N] (`rollout.pack_sequences`):
                 response token t sits at position len_b + t, predicted by the logits at
                 len_b + t - 1.
  3. scoring     teacher-forced, in one jitted call (`make_scorer`): the rollout layer's
                 log pi_old(y_t), its entropy, log pi_ref(y_t) and the reward model's score at
                 each reply's last token, plus PPO's own: the value V(s_t) read by the value
                 model's scalar head at position len_b + t - 1 (the state before emitting y_t).
  4. advantages  per-token rewards r_t = -beta * kl_t (+ the score at the last token), GAE with
                 (gamma, lambda) as a reverse scan, advantages whitened over the batch
                 (`jaxlm.rl_losses`).
  5. update      `ppo_epochs` passes over shuffled minibatches: the clipped policy surrogate
                 minus an entropy bonus on the policy, the clipped value loss on the value
                 model, each with its own AdamW, all inside one jitted call (`make_update`).

The policy and the value model are separate parameter trees (the value model is the SFT
backbone with a fresh scalar head, or the reward model), held in one `PPOState` with their
optimizer states, the KL coefficient and the rng, which is what a checkpoint stores: a resumed
run continues exactly. `PPOState.params` is the policy, so `checkpoint.load_parent` and
`inference.load_run` read a PPO run directory like any other policy stage.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlm import model as model_lib
from jaxlm import rl_losses
from jaxlm import rollout as rollout_lib
from jaxlm import sharding as sharding_lib
from jaxlm import training

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The PPO hyperparameters (frozen: a static argument of the jitted functions).

  Attributes:
    ppo_epochs: passes over each rollout batch.
    num_minibatches: minibatches per pass (the rollout batch B must divide).
    clip_eps: the policy ratio's clip range.
    value_clip_eps: the value's clip range around the rollout's values (reward units).
    value_coef: weight of the value loss (the value model has its own optimizer; this scales
      its gradient, i.e. its effective learning rate).
    entropy_coef: weight of the entropy bonus (0: off).
    gamma, lam: GAE's discount and lambda.
    kl_estimator: "k1" (log pi - log ref, unbiased per token) or "k3" (always >= 0).
    whiten_advantages: normalise advantages to mean 0, std 1 over the batch's response tokens.
    temperature: the rollout temperature; scoring divides the logits by it, so the trainer's
      log-probs are those of the distribution the tokens were drawn from.
  """

  ppo_epochs: int = 4
  num_minibatches: int = 4
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  value_coef: float = 1.0
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  kl_estimator: str = "k1"
  whiten_advantages: bool = True
  temperature: float = 1.0

  def __post_init__(self):
    if self.kl_estimator not in ("k1", "k3"):
      raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
    if self.ppo_epochs < 1 or self.num_minibatches < 1:
      raise ValueError("ppo_epochs and num_minibatches must be >= 1")


@flax.struct.dataclass
class PPOState:
  """Everything a PPO run needs to continue exactly; a pytree, checkpointed whole.

  Attributes:
    step: int32 [], PPO iterations done.
    params, opt_state: the policy and its AdamW state.
    rng: uint32 raw key data (as in `training.TrainState`).
    value: the value model's `training.TrainState` (its step counts value updates).
    kl_coef: float32 [], the KL penalty's coefficient beta (moved by an adaptive controller).
  """

  step: Array
  params: Any
  opt_state: Any
  rng: Array
  value: training.TrainState
  kl_coef: Array


def combine_states(policy: training.TrainState, value: training.TrainState, kl_coef) -> PPOState:
  """A `PPOState` from the policy's and the value model's train states (concrete or abstract)."""
  if isinstance(kl_coef, jax.ShapeDtypeStruct):
    coef = kl_coef
  else:
    coef = jax.device_put(jnp.asarray(kl_coef, jnp.float32), policy.step.sharding)
  return PPOState(step=policy.step, params=policy.params, opt_state=policy.opt_state, rng=policy.rng,
                  value=value, kl_coef=coef)


@dataclasses.dataclass(frozen=True)
class RoleSpec:
  """The optimizers and the sharded abstract `PPOState` of a PPO config (nothing allocated)."""

  policy_tx: optax.GradientTransformation
  value_tx: optax.GradientTransformation
  abstract_state: PPOState
  shardings: PPOState


def role_optimizer(section, config, init_fn) -> optax.GradientTransformation:
  """AdamW of an optimizer section over `config.total_steps` PPO iterations' worth of updates."""
  updates = config.total_steps * config.ppo.ppo_epochs * config.ppo.num_minibatches
  abstract_params = jax.eval_shape(lambda: sharding_lib.unbox(init_fn(jax.random.key(0))))
  tx, _ = training.make_optimizer(**section, total_steps=updates, params=abstract_params)
  return tx


def state_spec(config, model_config: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
               rules=sharding_lib.DEFAULT_RULES) -> RoleSpec:
  """The policy (a language model) and the value model (with a scalar head), each with its own
  AdamW (`config.policy_optimizer`, `config.value_optimizer`), as one abstract `PPOState`."""
  policy_init = functools.partial(model_lib.init_params, model_config)
  value_init = functools.partial(model_lib.init_params, model_config, scalar_head=True)
  policy_tx = role_optimizer(config.policy_optimizer, config, policy_init)
  value_tx = role_optimizer(config.value_optimizer, config, value_init)
  policy = training.abstract_train_state(policy_init, policy_tx, mesh, rules)
  abstract_state = combine_states(policy, training.abstract_train_state(value_init, value_tx, mesh, rules),
                                  jax.ShapeDtypeStruct((), jnp.float32, sharding=policy.step.sharding))
  return RoleSpec(policy_tx, value_tx, abstract_state, jax.tree.map(lambda x: x.sharding, abstract_state))


# ------------------------------------------------------------------------------------------------
# The critic's scoring.
# ------------------------------------------------------------------------------------------------
def token_values(model, params, seqs: dict[str, Array]) -> Array:
  """V(s_t) for every response token t: the scalar head at position len_b + t - 1, [B, N]."""
  out = model.apply({"params": params}, seqs["tokens"], segment_ids=seqs["segment_ids"],
                    positions=seqs["positions"], scalar_index=jnp.maximum(seqs["response_index"] - 1, 0),
                    lm_head=False)
  return out.scalar.astype(jnp.float32)


def make_scorer(config: model_lib.ModelConfig, reward_config: model_lib.ModelConfig | None,
                ppo: PPOConfig, *, mesh: jax.sharding.Mesh | None = None,
                rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """`score(policy, reference, value, reward, rollout) -> dict` of [B, N] / [B] arrays.

  The rollout layer's scorer (`rollout.score_fn`: `log_probs`, `entropy`, `ref_log_probs`, and
  `score` when `reward_config` is given; pass `reward=None` otherwise) with the critic's
  `values` added, all teacher-forced in one jitted program (`rollout.jit_scorer`, which also
  says how it runs on a `mesh`). The jitted program is `score.jitted` (for the planner).
  """
  model = model_lib.Transformer(config)
  shared = rollout_lib.score_fn(config, reward_config, temperature=ppo.temperature)

  def score_rollout(policy_params, reference_params, value_params, reward_params, rollout):
    out = shared(policy_params, reference_params, reward_params, rollout)
    values = token_values(model, value_params, rollout_lib.pack_rollout(rollout))
    return {**out, "values": jnp.where(rollout["mask"], values, 0.0)}

  return rollout_lib.jit_scorer(score_rollout, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------
# Advantages.
# ------------------------------------------------------------------------------------------------
@jax.jit
def _kl_terms(log_probs, ref_log_probs):
  return {"k1": rl_losses.kl_k1(log_probs=log_probs, ref_log_probs=ref_log_probs),
          "k3": rl_losses.kl_k3(log_probs=log_probs, ref_log_probs=ref_log_probs)}


def advantages(*, scored: dict[str, Array], score: Array, mask: Array, response_lengths: Array,
               kl_coef: Array, ppo: PPOConfig) -> dict[str, Array]:
  """Per-token rewards, GAE advantages and returns of a scored rollout.

  Args:
    scored: `make_scorer`'s output (log_probs, ref_log_probs, values).
    score: [B] the final reward of each reply (normalised, with any penalties).
    mask: [B, N] bool, the emitted tokens.
    response_lengths: [B].
    kl_coef: the KL coefficient beta.
    ppo: the `PPOConfig`.

  Returns:
    rewards, advantages (whitened if configured), returns: [B, N]; kl: [B, N], the per-token
    estimate used in the penalty.
  """
  return _advantages(scored["log_probs"], scored["ref_log_probs"], scored["values"], score, mask,
                     response_lengths, kl_coef, ppo)


def _advantages_impl(log_probs, ref_log_probs, values, score, mask, response_lengths, kl_coef, ppo: PPOConfig):
  kl = _kl_terms(log_probs, ref_log_probs)[ppo.kl_estimator]
  rewards = rl_losses.per_token_rewards(kl=kl, kl_coef=kl_coef, score=score, last_index=response_lengths - 1,
                                     mask=mask)
  adv, returns = rl_losses.gae_advantages(rewards=rewards, values=values, mask=mask, gamma=ppo.gamma, lam=ppo.lam)
  if ppo.whiten_advantages:
    adv = rl_losses.masked_whiten(values=adv, mask=mask)
  return {"rewards": rewards, "advantages": adv, "returns": returns, "kl": jnp.where(mask, kl, 0.0)}


_advantages = jax.jit(_advantages_impl, static_argnames="ppo")


# ------------------------------------------------------------------------------------------------
# The update.
# ------------------------------------------------------------------------------------------------
def _minibatch_losses(model, policy_params, value_params, batch, ppo: PPOConfig):
  """(policy objective, value objective, metric sums) of one minibatch, token-averaged."""
  seqs = rollout_lib.pack_rollout(batch)
  mask = batch["mask"]
  log_probs, entropy = rollout_lib.policy_log_probs(model, policy_params, seqs, batch["response_tokens"], mask,
                                        ppo.temperature)
  pg_sum, count, pg_aux = rl_losses.ppo_policy_loss(log_probs=log_probs, old_log_probs=batch["log_probs"],
                                                  advantages=batch["advantages"], mask=mask,
                                                  clip_eps=ppo.clip_eps)
  values = token_values(model, value_params, seqs)
  vf_sum, _, vf_aux = rl_losses.ppo_value_loss(values=values, old_values=batch["values"], returns=batch["returns"],
                                            mask=mask, clip_eps=ppo.value_clip_eps)
  entropy_sum = jnp.sum(jnp.where(mask, entropy, 0.0))
  denom = jnp.maximum(count, 1.0)
  policy_objective = (pg_sum - ppo.entropy_coef * entropy_sum) / denom
  value_objective = ppo.value_coef * vf_sum / denom
  metrics = {"policy_loss": pg_sum / denom, "value_loss": vf_sum / denom, "entropy": entropy_sum / denom,
             **{k: v / denom for k, v in {**pg_aux, **vf_aux}.items()}}
  return policy_objective, value_objective, metrics


def make_update(config: model_lib.ModelConfig, ppo: PPOConfig, policy_tx: optax.GradientTransformation,
                value_tx: optax.GradientTransformation, *, state_shardings: PPOState,
                mesh: jax.sharding.Mesh, rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """A jitted, donated `update(state, batch) -> (state, metrics)`: all epochs and minibatches.

  `batch` holds the rollout (prompt_tokens, prompt_lengths, response_tokens, response_lengths,
  mask) and its scoring (log_probs, values, advantages, returns), [B, ...] each. Each epoch
  shuffles the B rows with the state's rng and takes `num_minibatches` equal slices; every
  minibatch is one AdamW step of the policy and one of the value model. Metrics are means over
  all minibatches (float32 scalars).
  """
  model = model_lib.Transformer(config)

  def one_minibatch(carry, minibatch):
    policy, value = carry

    def total_loss(both):
      # The two trees are disjoint, so the gradient of the sum wrt each is its own objective's.
      policy_objective, value_objective, metrics = _minibatch_losses(model, both[0], both[1], minibatch, ppo)
      return policy_objective + value_objective, metrics

    (policy_grads, value_grads), metrics = jax.grad(total_loss, has_aux=True)((policy.params, value.params))
    updates, opt_state = policy_tx.update(policy_grads, policy.opt_state, policy.params)
    policy = policy.replace(params=optax.apply_updates(policy.params, updates), opt_state=opt_state,
                            step=policy.step + 1)
    v_updates, v_opt_state = value_tx.update(value_grads, value.opt_state, value.params)
    value = value.replace(params=optax.apply_updates(value.params, v_updates), opt_state=v_opt_state,
                          step=value.step + 1)
    metrics.update(policy_grad_norm=optax.tree.norm(policy_grads), value_grad_norm=optax.tree.norm(value_grads))
    return (policy, value), metrics

  def update(state: PPOState, batch: dict[str, Array]):
    rows = batch["mask"].shape[0]
    if rows % ppo.num_minibatches:
      raise ValueError(f"rollout batch {rows} does not split into {ppo.num_minibatches} minibatches")
    rng, epoch_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    # The policy's TrainState view of the PPO state (its step counts policy updates).
    policy = training.TrainState(step=jnp.zeros((), jnp.int32), params=state.params,
                                 opt_state=state.opt_state, rng=state.rng)

    def one_epoch(carry, key):
      shuffled = rollout_lib.shuffled_minibatches(batch, key, ppo.num_minibatches, mesh=mesh, rules=rules)
      return jax.lax.scan(one_minibatch, carry, shuffled)

    (policy, value), metrics = jax.lax.scan(one_epoch, (policy, state.value),
                                            jax.random.split(epoch_rng, ppo.ppo_epochs))
    new_state = state.replace(step=state.step + 1, params=policy.params, opt_state=policy.opt_state,
                              value=value, rng=jax.random.key_data(rng))
    return new_state, jax.tree.map(jnp.mean, metrics)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(update, in_shardings=(state_shardings, training.batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def step(state: PPOState, batch: dict[str, Array]):
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(state, batch)

  step.jitted = jitted  # For the planner.
  return step


def update_batch(rollout: dict[str, Array], scored: dict[str, Array], advantage: dict[str, Array]) -> dict:
  """The arrays `make_update`'s step reads, from a rollout, its scoring and its advantages."""
  return {**{k: rollout[k] for k in rollout_lib.ROLLOUT_KEYS}, "log_probs": scored["log_probs"],
          "values": scored["values"], "advantages": advantage["advantages"], "returns": advantage["returns"]}


# ------------------------------------------------------------------------------------------------
# Diagnostics.
# ------------------------------------------------------------------------------------------------
@jax.jit
def value_diagnostics(rollout: dict[str, Array], scored: dict[str, Array], advantage: dict[str, Array]) -> dict:
  """The critic's health (float32), next to the rollout layer's `rollout.rollout_diagnostics`:

    explained_variance   of the returns by the rollout's values
    value_mean, return_mean   over response tokens
  """
  mask = rollout["mask"]
  return {"explained_variance": rl_losses.explained_variance(values=scored["values"], returns=advantage["returns"],
                                                          mask=mask),
          "value_mean": rl_losses.masked_mean(values=scored["values"], mask=mask),
          "return_mean": rl_losses.masked_mean(values=advantage["returns"], mask=mask)}


def format_metrics(metrics: dict[str, float]) -> str:
  """One log line of an iteration's headline numbers."""
  keys = ("reward", "gold_reward", "kl", "kl_coef", "entropy", "length", "end_rate", "clip_fraction",
          "explained_variance", "sampler_gap", "time_generate", "time_score", "time_train")
  return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def role_memory(config: model_lib.ModelConfig) -> dict[str, int]:
  """Parameter and optimizer bytes of each PPO role (float32 params; AdamW keeps 2 moments).

  Activations and KV caches come on top and scale with the rollout batch and lengths.
  """
  params = model_lib.num_params(config) * 4
  with_head = model_lib.num_params(config, scalar_head=True) * 4
  return {"policy": 3 * params, "value": 3 * with_head, "reference": params, "reward": with_head,
          "total": 3 * params + 3 * with_head + params + with_head}
