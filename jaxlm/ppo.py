"""RLHF with PPO: rollouts, scoring, advantages and the clipped update, as jitted functions.

One PPO iteration (Ouyang et al. 2022; Ziegler et al. 2019), with B prompts and N new tokens:

  1. rollout     y ~ pi_old(. | x) with the KV-cache sampler (`jaxlm.sampling.generate`), at
                 temperature T without truncation, so the sampler's log-probs are exact.
  2. sequences   prompt + response packed per row into seq [B, L = P + N] (`pack_sequences`):
                 row b is x_b (len_b tokens) then y_b (n_b tokens) then padding. Response token
                 t sits at position len_b + t and is predicted by the logits at len_b + t - 1.
  3. scoring     teacher-forced, in one jitted call (`score_rollout`): log pi_old(y_t) and its
                 entropy, log pi_ref(y_t), the value V(s_t) read by the value model's scalar
                 head at position len_b + t - 1 (the state before emitting y_t) for every t.
                 The reward model (or an oracle) scores each reply at its last real token.
  4. advantages  per-token rewards r_t = -beta * kl_t (+ the score at the last token), GAE with
                 (gamma, lambda) as a reverse scan, advantages whitened over the batch
                 (`jaxlm.losses`).
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
import numpy as np
import optax

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import rl_losses
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
# Sequences and scoring.
# ------------------------------------------------------------------------------------------------
def pack_sequences(prompt_tokens: Array, prompt_lengths: Array, response_tokens: Array,
                   response_lengths: Array) -> dict[str, Array]:
  """Prompt + response per row, contiguous: what every model reads.

  Args:
    prompt_tokens: int [B, P] right-padded; prompt_lengths [B].
    response_tokens: int [B, N] (0 after a row stopped); response_lengths [B].

  Returns:
    tokens, segment_ids, positions: int32 [B, P + N] (segment 1 on real tokens, 0 on padding);
    response_index: int32 [B, N], the position of response token t (len_b + t);
    last_index: int32 [B], the position of the last real token (len_b + n_b - 1).
  """
  batch, prompt_width = prompt_tokens.shape
  new_tokens = response_tokens.shape[1]
  width = prompt_width + new_tokens
  index = jnp.arange(width, dtype=jnp.int32)[None, :]
  lengths = prompt_lengths.astype(jnp.int32)[:, None]
  in_prompt = index < lengths
  offset = jnp.clip(index - lengths, 0, new_tokens - 1)
  from_response = jnp.take_along_axis(response_tokens.astype(jnp.int32), offset, axis=1)
  padded_prompt = jnp.pad(prompt_tokens.astype(jnp.int32), ((0, 0), (0, new_tokens)))
  real = index < lengths + response_lengths.astype(jnp.int32)[:, None]
  tokens = jnp.where(in_prompt, padded_prompt, jnp.where(real, from_response, 0))
  return {"tokens": tokens, "segment_ids": real.astype(jnp.int32),
          "positions": jnp.broadcast_to(index, (batch, width)),
          "response_index": lengths + jnp.arange(new_tokens, dtype=jnp.int32)[None, :],
          "last_index": (lengths[:, 0] + response_lengths.astype(jnp.int32) - 1)}


def _response_logits(model, params, seqs: dict[str, Array], temperature: float) -> Array:
  """Logits predicting each response token: float32 [B, N, V], divided by the temperature.

  The LM head runs only at the N positions len_b + t - 1 that predict response token t
  (`logits_at`), not at all P + N: the [B, P + N, V] float32 logits are never formed.
  """
  before = jnp.maximum(seqs["response_index"] - 1, 0)
  out = model.apply({"params": params}, seqs["tokens"], segment_ids=seqs["segment_ids"],
                    positions=seqs["positions"], logits_at=before)
  return out.logits.astype(jnp.float32) / temperature


def policy_log_probs(model, params, seqs: dict[str, Array], response_tokens: Array, mask: Array,
                     temperature: float) -> tuple[Array, Array]:
  """(log pi(y_t | x, y_<t), entropy of pi at t): float32 [B, N] each, 0 where mask is False."""
  logits = _response_logits(model, params, seqs, temperature)
  log_probs = losses.token_log_probs(logits=jnp.where(mask[..., None], logits, 0.0),
                                     targets=response_tokens.astype(jnp.int32))
  entropy = rl_losses.entropy_from_logits(logits=logits, mask=mask)
  return jnp.where(mask, log_probs, 0.0), entropy


def token_values(model, params, seqs: dict[str, Array]) -> Array:
  """V(s_t) for every response token t: the scalar head at position len_b + t - 1, [B, N]."""
  out = model.apply({"params": params}, seqs["tokens"], segment_ids=seqs["segment_ids"],
                    positions=seqs["positions"], scalar_index=jnp.maximum(seqs["response_index"] - 1, 0),
                    lm_head=False)
  return out.scalar.astype(jnp.float32)


def sequence_scores(model, params, seqs: dict[str, Array]) -> Array:
  """A reward model's score of each whole reply, read at its last real token: [B]."""
  out = model.apply({"params": params}, seqs["tokens"], segment_ids=seqs["segment_ids"],
                    positions=seqs["positions"], scalar_index=seqs["last_index"], lm_head=False)
  return out.scalar.astype(jnp.float32)


def make_scorer(config: model_lib.ModelConfig, reward_config: model_lib.ModelConfig | None,
                ppo: PPOConfig, *, mesh: jax.sharding.Mesh | None = None,
                rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """`score(policy, reference, value, reward, rollout) -> dict` of [B, N] / [B] arrays.

  `rollout` holds prompt_tokens, prompt_lengths, response_tokens, response_lengths, mask. The
  result: `log_probs`, `entropy` (policy), `ref_log_probs`, `values`, and `score` (the reward
  model's, when `reward_config` is given; pass `reward=None` otherwise), all teacher-forced.

  With a `mesh`, the call runs as training does: the rollout is split along B over the mesh's
  batch axes (`data`, `fsdp`), every model's parameters keep the shardings they were placed
  with (the policy's, for all four), and the model's activation constraints apply, so each
  device scores its own rows and only weights are gathered. Without a mesh XLA is free to
  split the work along the embedding instead, replicating the batch on every device and
  all-reducing activations and logits. The jitted program is `score.jitted` (for the planner).
  """
  model = model_lib.Transformer(config)
  reward_model = model_lib.Transformer(reward_config) if reward_config is not None else None

  def score_rollout(policy_params, reference_params, value_params, reward_params, rollout):
    seqs = pack_sequences(rollout["prompt_tokens"], rollout["prompt_lengths"], rollout["response_tokens"],
                          rollout["response_lengths"])
    mask = rollout["mask"]
    log_probs, entropy = policy_log_probs(model, policy_params, seqs, rollout["response_tokens"], mask,
                                          ppo.temperature)
    ref_log_probs, _ = policy_log_probs(model, reference_params, seqs, rollout["response_tokens"], mask,
                                        ppo.temperature)
    out = {"log_probs": log_probs, "entropy": entropy, "ref_log_probs": ref_log_probs,
           "values": jnp.where(mask, token_values(model, value_params, seqs), 0.0)}
    if reward_model is not None:
      out["score"] = sequence_scores(reward_model, reward_params, seqs)
    return out

  if mesh is None:
    return jax.jit(score_rollout)
  rows = sharding_lib.batch_sharding(mesh, rules)
  # Parameters: None = as placed (the caller puts every role on the policy's shardings).
  jitted = jax.jit(score_rollout, in_shardings=(None, None, None, None, rows), out_shardings=rows)

  def score(policy_params, reference_params, value_params, reward_params, rollout):
    rollout = jax.device_put(dict(rollout), rows)  # Row-split (a no-op for the sampler's output).
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(policy_params, reference_params, value_params, reward_params, rollout)

  score.jitted = jitted
  return score


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
  seqs = pack_sequences(batch["prompt_tokens"], batch["prompt_lengths"], batch["response_tokens"],
                        batch["response_lengths"])
  mask = batch["mask"]
  log_probs, entropy = policy_log_probs(model, policy_params, seqs, batch["response_tokens"], mask,
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
      order = jax.random.permutation(key, rows)
      shuffled = jax.tree.map(lambda x: x[order].reshape((ppo.num_minibatches, -1) + x.shape[1:]), batch)
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


# ------------------------------------------------------------------------------------------------
# Rollouts.
# ------------------------------------------------------------------------------------------------
def collect_rollout(params, prompt_tokens, prompt_lengths, rng: Array, *, config: model_lib.ModelConfig,
                    ppo: PPOConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, Array]:
  """Samples one reply per prompt from the policy: the rollout dict `make_scorer` and the update
  read (prompt_tokens, prompt_lengths, response_tokens, response_lengths, mask, and the sampler's
  own `sampler_log_probs`, kept to measure the sampler/trainer gap)."""
  from jaxlm import sampling  # Deferred: sampling imports this module's peers only.

  out = sampling.generate(params, prompt_tokens, prompt_lengths, rng, config=config,
                          sampling=sampling.SamplingConfig(temperature=ppo.temperature),
                          max_new_tokens=max_new_tokens, stop_ids=stop_ids, mesh=mesh)
  return {"prompt_tokens": jnp.asarray(prompt_tokens, jnp.int32),
          "prompt_lengths": jnp.asarray(prompt_lengths, jnp.int32),
          "response_tokens": out.tokens, "response_lengths": out.lengths, "mask": out.mask,
          "sampler_log_probs": out.log_probs}


def update_batch(rollout: dict[str, Array], scored: dict[str, Array], advantage: dict[str, Array]) -> dict:
  """The arrays `make_update`'s step reads, from a rollout, its scoring and its advantages."""
  keys = ("prompt_tokens", "prompt_lengths", "response_tokens", "response_lengths", "mask")
  return {**{k: rollout[k] for k in keys}, "log_probs": scored["log_probs"], "values": scored["values"],
          "advantages": advantage["advantages"], "returns": advantage["returns"]}


# ------------------------------------------------------------------------------------------------
# Diagnostics and alarms.
# ------------------------------------------------------------------------------------------------
@jax.jit
def rollout_diagnostics(rollout: dict[str, Array], scored: dict[str, Array], advantage: dict[str, Array]) -> dict:
  """Scalars that say whether an iteration is healthy (float32):

    kl              mean over replies of sum_t (log pi_old - log pi_ref): KL(pi || ref) in nats
    kl_k3           the same with the k3 estimator (>= 0 per token)
    entropy         mean per-token entropy of the policy on its replies
    sampler_gap     max |sampler log-prob - trainer log-prob| over emitted tokens: 0 up to float
                    error when rollouts are on-policy (temperature 1, no truncation)
    explained_variance   of the returns by the rollout's values
    length          mean reply length in tokens (stop token included)
    value_mean, return_mean   over response tokens
  """
  mask = rollout["mask"]
  rows = jnp.maximum(mask.shape[0], 1)
  log_ratio = jnp.where(mask, scored["log_probs"] - scored["ref_log_probs"], 0.0)
  k3 = jnp.where(mask, rl_losses.kl_k3(log_probs=scored["log_probs"], ref_log_probs=scored["ref_log_probs"]), 0.0)
  gap = jnp.where(mask, jnp.abs(scored["log_probs"] - rollout["sampler_log_probs"]), 0.0)
  return {"kl": jnp.sum(log_ratio) / rows, "kl_k3": jnp.sum(k3) / rows,
          "entropy": rl_losses.masked_mean(values=scored["entropy"], mask=mask),
          "sampler_gap": jnp.max(gap),
          "explained_variance": rl_losses.explained_variance(values=scored["values"], returns=advantage["returns"],
                                                          mask=mask),
          "length": jnp.mean(rollout["response_lengths"].astype(jnp.float32)),
          "value_mean": rl_losses.masked_mean(values=scored["values"], mask=mask),
          "return_mean": rl_losses.masked_mean(values=advantage["returns"], mask=mask)}


def kl_alarm(kl: float, *, min_kl: float, max_kl: float) -> str | None:
  """Why the mean KL per reply is not believable, or None.

  The true KL(pi || ref) is >= 0; its k1 estimate from a batch can dip slightly below 0 by noise,
  but a clearly negative mean means the log-probs being compared are not of the same
  distribution (a sampler/trainer mismatch, a wrong reference). A huge KL means the policy ran
  away from the reference (reward hacking, a too-large learning rate).
  """
  if not np.isfinite(kl):
    return f"mean KL is {kl}"
  if kl < min_kl:
    return f"mean KL {kl:.3g} < {min_kl}: the policy and reference log-probs disagree in sign"
  if kl > max_kl:
    return f"mean KL {kl:.3g} > {max_kl}: the policy has run away from the reference"
  return None


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
