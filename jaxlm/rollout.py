"""On-policy RL's shared rollout layer: sample replies, pack them, score them teacher-forced.

What every on-policy method (PPO, GRPO, RLOO, Dr. GRPO) does before its own advantages and
update, as functions that know nothing of critics or advantage estimators.

Rows. B prompts arrive right-padded (`prompt_tokens` [B, P], `prompt_lengths` [B]). With G
samples per prompt (`repeat_prompts`) the rollout has R = B * G rows in contiguous groups: row
r = b * G + g is sample g of prompt b, so `x.reshape(B, G, ...)` gives the groups. Each row's
reply comes from the KV-cache sampler (`jaxlm.sampling.generate`) at temperature T without
truncation, so the sampler's log-probs are those of the distribution the trainer scores. Each
row draws with its own key, never from the other rows (`collect_rollout`, Seeds): by default
`fold_in(rng, r)` (its position), or, given the prompts' ids (the pipeline's `record_index`),
`fold_in(fold_in(rng, prompt_id), g)` (`prompt_row_keys`), so sample g of a prompt is the same
whatever batch, position or padding it comes in.

The rollout dict (`collect_rollout`), R rows:

  prompt_tokens       int32 [R, P]   right-padded prompt (repeated G times per prompt)
  prompt_lengths      int32 [R]      len_r
  response_tokens     int32 [R, N]   y_r, 0 after the row stopped (stop token included)
  response_lengths    int32 [R]      n_r
  mask                bool  [R, N]   t < n_r: the emitted tokens
  sampler_log_probs   float32 [R, N] the sampler's log pi(y_t), 0 where not emitted

Packing (`pack_sequences`): prompt then reply, contiguous, in one row of width L = P + N:
x_r (len_r tokens), y_r (n_r tokens), padding (segment id 0). Response token t sits at position
len_r + t (`response_index`) and is predicted by the logits at len_r + t - 1; the reply's last
real token is at len_r + n_r - 1 (`last_index`), where a scalar head reads a sequence score.

Scoring (`make_scorer`, one jitted call): teacher-forced on the packed rows, in float32 and
only at the response positions (the LM head runs at N positions per row, never at L):

  log_probs, entropy  [R, N]  the policy's log pi(y_t | x, y_<t) and entropy at t (0 off mask)
  ref_log_probs       [R, N]  the reference's (when reference params are given)
  score               [R]     a reward model's score of the whole reply (when it has one)

Other rewards (the world's gold reward, rules) read the decoded replies (`decode_replies`).

On a mesh the rollout is split along R over the batch axes and each model keeps the shardings
it was placed with, as in training (`jit_scorer`). `rollout_diagnostics` turns a scored rollout
into the numbers that say whether it is sound: KL(policy || reference) per reply (k1, k3), the
policy's entropy, the largest sampler/trainer log-prob gap (0 up to float error when on-policy),
the mean length; `reply_diagnostics` adds the ended-turn fraction from the decoded replies.

What each method adds on top:

  PPO (`jaxlm/ppo.py`)   a critic: V(s_t) from a value model's scalar head at len_r + t - 1,
                         composed into the same jitted scorer (`score_fn` + `jit_scorer`);
                         per-token KL-penalised rewards, GAE, the clipped policy and value update.
  GRPO, RLOO, Dr. GRPO   no critic: G > 1 samples per prompt and group-relative advantages over
                         each prompt's G scores (`jaxlm/rl_losses.py`), then the clipped update.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import rl_losses
from jaxlm import sharding as sharding_lib

Array = jax.Array

# The rollout arrays that the scorer and the updates read (`collect_rollout` adds the sampler's
# log-probs, which only the sampler/trainer gap reads).
ROLLOUT_KEYS = ("prompt_tokens", "prompt_lengths", "response_tokens", "response_lengths", "mask")


# ------------------------------------------------------------------------------------------------
# Packing.
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


def pack_rollout(rollout: dict[str, Array]) -> dict[str, Array]:
  """`pack_sequences` of a rollout dict's prompt and response arrays."""
  return pack_sequences(rollout["prompt_tokens"], rollout["prompt_lengths"], rollout["response_tokens"],
                        rollout["response_lengths"])


# ------------------------------------------------------------------------------------------------
# Teacher-forced scoring at the response positions.
# ------------------------------------------------------------------------------------------------
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


def sequence_scores(model, params, seqs: dict[str, Array]) -> Array:
  """A reward model's score of each whole reply, read at its last real token: [B]."""
  out = model.apply({"params": params}, seqs["tokens"], segment_ids=seqs["segment_ids"],
                    positions=seqs["positions"], scalar_index=seqs["last_index"], lm_head=False)
  return out.scalar.astype(jnp.float32)


def score_fn(config: model_lib.ModelConfig, reward_config: model_lib.ModelConfig | None, *,
             temperature: float, score_policy: bool = True) -> Callable:
  """The scorer's pure, unjitted body: `score(policy, reference, reward, rollout) -> dict`.

  `rollout` holds `ROLLOUT_KEYS`. The result: `log_probs` and `entropy` of the policy (omitted
  with `score_policy=False`, for a method that takes the old log-probs from the sampler),
  `ref_log_probs` (omitted when `reference` is None, e.g. a method without a KL term), and
  `score` (the reward model's, when `reward_config` is given; pass `reward=None` otherwise).
  A method that reads more models composes this with its own heads and jits the composition
  with `jit_scorer` (PPO adds its value model this way: one program, no extra pass).
  """
  model = model_lib.Transformer(config)
  reward_model = model_lib.Transformer(reward_config) if reward_config is not None else None

  def score_rollout(policy_params, reference_params, reward_params, rollout):
    seqs = pack_rollout(rollout)
    mask, tokens = rollout["mask"], rollout["response_tokens"]
    out = {}
    if score_policy:
      out["log_probs"], out["entropy"] = policy_log_probs(model, policy_params, seqs, tokens, mask, temperature)
    if reference_params is not None:
      out["ref_log_probs"], _ = policy_log_probs(model, reference_params, seqs, tokens, mask, temperature)
    if reward_model is not None:
      out["score"] = sequence_scores(reward_model, reward_params, seqs)
    return out

  return score_rollout


def jit_scorer(score_rollout: Callable, *, mesh: jax.sharding.Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """`score_rollout(*params, rollout)` jitted; on a `mesh`, run as training runs.

  With a mesh the rollout (the last argument) is split along its rows over the mesh's batch
  axes (`data`, `fsdp`), every parameter tree keeps the shardings it was placed with, and the
  model's activation constraints apply, so each device scores its own rows and only weights
  are gathered. Without a mesh XLA is free to split the work along the embedding instead,
  replicating the batch on every device and all-reducing activations and logits. The jitted
  program is `score.jitted` (for the planner).
  """
  if mesh is None:
    return jax.jit(score_rollout)
  num_params = len(inspect.signature(score_rollout).parameters) - 1
  rows = sharding_lib.batch_sharding(mesh, rules)
  # Parameters: None = as placed (the caller puts every role on the policy's shardings).
  jitted = jax.jit(score_rollout, in_shardings=(None,) * num_params + (rows,), out_shardings=rows)

  def score(*args):
    *params, rollout = args
    rollout = jax.device_put(dict(rollout), rows)  # Row-split (a no-op for the sampler's output).
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(*params, rollout)

  score.jitted = jitted
  return score


def make_scorer(config: model_lib.ModelConfig, reward_config: model_lib.ModelConfig | None, *,
                temperature: float, mesh: jax.sharding.Mesh | None = None,
                rules=sharding_lib.DEFAULT_RULES) -> Callable:
  """`score(policy, reference, reward, rollout) -> dict`: `score_fn` jitted by `jit_scorer`.

  No value model: what a critic-free method (GRPO, RLOO) scores a rollout with.
  """
  return jit_scorer(score_fn(config, reward_config, temperature=temperature), mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------
# Rollouts: G samples per prompt.
# ------------------------------------------------------------------------------------------------
def shuffled_minibatches(batch: dict[str, Array], key: Array, num_minibatches: int, *,
                         mesh: jax.sharding.Mesh, rules=sharding_lib.DEFAULT_RULES) -> dict[str, Array]:
  """[R, ...] -> [num_minibatches, R / num_minibatches, ...] in a random row order, for a scan.

  Each minibatch is constrained to stay split along its rows over the mesh's batch axes. A
  gather by a random permutation leaves the sharding of its result to XLA's propagation, which
  can replicate it: every device then computes every row of the update. Seen with GRPO's
  update at the `:cpu` shape on 2 devices, 33.6 GFLOP per device against 16.8 with the
  constraint (`compile().cost_analysis()`); in other setups propagation split the rows anyway.
  """
  rows = batch["mask"].shape[0]
  order = jax.random.permutation(key, rows)
  shuffled = jax.tree.map(lambda x: x[order].reshape((num_minibatches, -1) + x.shape[1:]), batch)
  split = sharding_lib.named_sharding(mesh, (None, "batch"), rules)
  if (rows // num_minibatches) % _batch_parts(split):
    return shuffled  # A minibatch smaller than the batch axes: XLA's choice.
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, split), shuffled)


def _batch_parts(split: jax.sharding.NamedSharding) -> int:
  """How many ways `split` divides its second axis."""
  axes = split.spec[1] if len(split.spec) > 1 else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([split.mesh.shape[a] for a in axes]))


def repeat_prompts(prompt_tokens, prompt_lengths, group_size: int) -> tuple[Any, Any]:
  """Each prompt `group_size` times in a row: [B, P], [B] -> [B * G, P], [B * G].

  Row r = b * G + g is sample g of prompt b (contiguous groups: `x.reshape(B, G, ...)`). Host
  arrays stay on the host (the sampler places them on the mesh), device arrays on the device.
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if group_size == 1:
    return prompt_tokens, prompt_lengths
  repeat = lambda x: (np if isinstance(x, np.ndarray) else jnp).repeat(x, group_size, axis=0)
  return repeat(prompt_tokens), repeat(prompt_lengths)


def prompt_row_keys(rng: Array, prompt_ids, group_size: int) -> Array:
  """The row keys of G samples per prompt: [B] ids -> [B * G] typed keys, row b * G + g's key
  `fold_in(fold_in(rng, prompt_ids[b]), g)` (what `collect_rollout(prompt_ids=...)` samples
  with). `rng` is a typed key or raw uint32 [2] key data; ids are ints (uint32 after folding).
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  return _prompt_row_keys(rng, jnp.asarray(prompt_ids), group_size)


@functools.partial(jax.jit, static_argnums=2)
def _prompt_row_keys(rng, prompt_ids, group_size):
  fold = jax.random.fold_in
  per_prompt = jax.vmap(lambda i: jax.vmap(lambda g: fold(fold(rng, i), g))(jnp.arange(group_size)))
  return per_prompt(prompt_ids).reshape(-1)


def collect_rollout(params, prompt_tokens, prompt_lengths, rng: Array, *, config: model_lib.ModelConfig,
                    temperature: float, max_new_tokens: int, stop_ids: tuple[int, ...], group_size: int = 1,
                    mesh: jax.sharding.Mesh | None = None, prompt_ids=None) -> dict[str, Array]:
  """Samples `group_size` replies per prompt from the policy: the rollout dict (module docstring).

  Seeds. Row r = b * G + g (sample g of the prompt in position b) draws step t with the uniform
  of `fold_in(k_r, t)`, k_r its row key (`jaxlm.sampling`, Randomness), so its reply depends
  on (k_r, its prompt, the params) only, never on the other rows. Two choices of k_r:

  * `prompt_ids=None`: by position, k_r = fold_in(rng, r), as the sampler seeds rows when
    given one key. Sample g of the prompt in position b is the same whether that prompt is
    sampled alone (b = 0) or first in a larger batch, but not when it moves to another
    position (a reshuffled or differently chunked batch).
  * `prompt_ids` [B] ints (the prompts pipeline's `record_index`): by identity,
    k_r = fold_in(fold_in(rng, prompt_ids[b]), g) (`prompt_row_keys`), so sample g of a prompt
    is the same in any batch, at any position, with any padding width (and on any mesh). Two
    prompts with the same id draw the same samples (the zero-padded rows of a final partial
    batch share id 0 with record 0: harmless, being empty they emit nothing).

  Either way the G samples of a prompt have distinct keys. Prompt tokens, lengths and ids may be
  host arrays; with a `mesh`, R = B * G must split over its batch shards (the row keys are split
  like the rows).
  """
  from jaxlm import sampling  # Deferred: sampling imports this module's peers only.

  tokens, lengths = repeat_prompts(prompt_tokens, prompt_lengths, group_size)
  if prompt_ids is not None:
    if np.shape(prompt_ids) != (np.shape(prompt_lengths)[0],):
      raise ValueError(f"prompt_ids must be [B] = [{np.shape(prompt_lengths)[0]}], one per prompt, got "
                       f"shape {np.shape(prompt_ids)}")
    rng = prompt_row_keys(rng, prompt_ids, group_size)
  out = sampling.generate(params, tokens, lengths, rng, config=config,
                          sampling=sampling.SamplingConfig(temperature=temperature),
                          max_new_tokens=max_new_tokens, stop_ids=stop_ids, mesh=mesh)
  return {"prompt_tokens": jnp.asarray(tokens, jnp.int32), "prompt_lengths": jnp.asarray(lengths, jnp.int32),
          "response_tokens": out.tokens, "response_lengths": out.lengths, "mask": out.mask,
          "sampler_log_probs": out.log_probs}


def decode_replies(tokenizer, response_tokens: np.ndarray,
                   response_lengths: np.ndarray) -> tuple[list[str], np.ndarray]:
  """(texts, ended_turn bool [R]) of host response arrays: what rewards and the end penalty read.

  A reply ended its turn only when its first stop is the chat format's end of turn
  (`policy_eval.reply_from_ids`); one cut by the length limit or another stop id did not.
  """
  from jaxlm import policy_eval  # Deferred: a host-side helper, not needed to score.

  parsed = [policy_eval.reply_from_ids(tokenizer, response_tokens[r, : response_lengths[r]])
            for r in range(len(response_lengths))]
  return [text for text, _ in parsed], np.asarray([ended for _, ended in parsed])


# ------------------------------------------------------------------------------------------------
# Diagnostics.
# ------------------------------------------------------------------------------------------------
def sampler_gap(*, log_probs: Array, sampler_log_probs: Array, mask: Array) -> Array:
  """max |sampler log-prob - trainer log-prob| over emitted tokens: float32 [].

  0 up to float error when rollouts are on-policy (the sampler draws from the distribution the
  trainer scores: temperature applied on both sides, no truncation). A gap means the rollouts
  are not the trainer's policy's (truncated sampling, stale params, a changed forward pass).
  """
  return jnp.max(jnp.where(mask, jnp.abs(log_probs - sampler_log_probs), 0.0))


@jax.jit
def rollout_diagnostics(rollout: dict[str, Array], scored: dict[str, Array]) -> dict[str, Array]:
  """Scalars that say whether a rollout is sound (float32):

    kl              mean over replies of sum_t (log pi - log pi_ref): KL(pi || ref) in nats
    kl_k3           the same with the k3 estimator (>= 0 per token)
    entropy         mean per-token entropy of the policy on its replies
    sampler_gap     `sampler_gap`: 0 up to float error when on-policy
    length          mean reply length in tokens (stop token included)

  `scored` is a scorer's output with reference log-probs. When the scorer did not run the
  policy (no `entropy` in `scored`; its `log_probs` are the sampler's), entropy and sampler_gap
  are left to the update, which runs the policy anyway (`grpo.make_update`).
  """
  mask = rollout["mask"]
  rows = jnp.maximum(mask.shape[0], 1)
  log_ratio = jnp.where(mask, scored["log_probs"] - scored["ref_log_probs"], 0.0)
  k3 = jnp.where(mask, rl_losses.kl_k3(log_probs=scored["log_probs"], ref_log_probs=scored["ref_log_probs"]), 0.0)
  out = {"kl": jnp.sum(log_ratio) / rows, "kl_k3": jnp.sum(k3) / rows,
         "length": jnp.mean(rollout["response_lengths"].astype(jnp.float32))}
  if "entropy" in scored:  # The scorer ran the policy.
    out["entropy"] = rl_losses.masked_mean(values=scored["entropy"], mask=mask)
    out["sampler_gap"] = sampler_gap(log_probs=scored["log_probs"], sampler_log_probs=rollout["sampler_log_probs"],
                                     mask=mask)
  return out


def reply_diagnostics(*, ended: np.ndarray, response_lengths: np.ndarray,
                      generate_seconds: float) -> dict[str, float]:
  """Host numbers of the decoded replies: `end_rate`, the fraction that ended their turn
  (`decode_replies`), and `rollout_tokens_per_s`, the sampler's emitted tokens per second."""
  return {"end_rate": float(np.mean(ended)),
          "rollout_tokens_per_s": float(np.sum(response_lengths) / max(generate_seconds, 1e-9))}


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
