"""Train state, optimizer, and the jitted train and eval steps that every stage shares.

The pieces, in the order a trainer uses them::

  tx, schedule_fn = make_optimizer(**config.optimizer, params=abstract_params)
  state, state_shardings = create_train_state(init_params_fn, tx, rng, mesh, rules)
  train_step = make_train_step(loss_fn, tx, mesh=mesh, state_shardings=state_shardings,
                               schedule_fn=schedule_fn, num_microbatches=..., steps_per_call=...)
  eval_step = make_eval_step(loss_fn, mesh=mesh, state_shardings=state_shardings)
  for host_batch in data:
    state, metrics = train_step(state, shard_batch(host_batch, mesh, rules))
  evaluate(eval_step, state.params, val_batches)   # val_batches: shard_batch'ed once

* **State.** `TrainState(step, params, opt_state, rng)` is created already sharded (a jitted
  init with `out_shardings`), never materialised on one device. Optimizer-state leaves that
  mirror the parameters (Adam's mu and nu) take the parameters' shardings; everything else
  (step counts) is replicated. `abstract_train_state` is the same tree as `jax.ShapeDtypeStruct`
  with shardings: the target that orbax restores into, on any number of devices. The rng is
  stored as raw uint32 key data, which every checkpoint format handles.
* **Exact token weighting.** A loss function returns `(loss_sum, count, aux_sums)`. The step
  differentiates the *sum*, adds gradients, sums and counts over microbatches, and divides once
  by the total count, so the update is the gradient of the mean over every token of the batch
  whatever the split: 1 microbatch and 4 give the same update up to float rounding, even when
  the microbatches hold different numbers of tokens.
* **Randomness.** The step splits `state.rng` once per optimizer step and hands the loss
  function a key (folded with the microbatch index when accumulating); the next state carries
  the other half. Runs are therefore reproducible from the checkpoint alone.
* **Mesh.** The returned step functions enter `sharding.use_mesh(mesh, rules)` themselves, so
  the model's logical activation constraints apply without the caller remembering to.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import param_tree
from jaxlm import sharding as sharding_lib
from jaxlm.losses import LossFn

Array = jax.Array
Schedule = Callable[[Array | int], Array]
Rules = sharding_lib.Rules

SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


def make_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int,
                  schedule: str = "cosine", end_lr_fraction: float = 0.1) -> Schedule:
  r"""The learning rate at optimizer step s (0-based): linear warmup, then decay.

  With peak :math:`\eta`, warmup W, total S and end :math:`\eta_e = f \eta`:

  .. math::
     \eta(s) = \eta \frac{s + 1}{W} \quad (s < W), \qquad
     \eta(s) = \eta_e + (\eta - \eta_e) \, d\!\left(\frac{\min(s, S) - W}{S - W}\right)
     \quad (s \ge W)

  with :math:`d(p) = \tfrac12 (1 + \cos \pi p)` (cosine), :math:`1 - p` (linear) or 1
  (constant). Warmup starts at :math:`\eta / W`, not 0, so the first step already learns; the
  rate is :math:`\eta` at step W and :math:`\eta_e` from step S on.

  Example: learning_rate=1e-3, warmup_steps=10, total_steps=110, cosine, end_lr_fraction=0.1
  gives 1e-4 at step 0, 1e-3 at step 10, 5.5e-4 at step 60 and 1e-4 at step 110.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} not in {SCHEDULES}")
  if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) "
                     "and total_steps > 0")
  if not 0.0 <= end_lr_fraction <= 1.0:
    raise ValueError(f"end_lr_fraction={end_lr_fraction} must lie in [0, 1]")
  peak, end = float(learning_rate), float(learning_rate) * float(end_lr_fraction)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule_fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if schedule == "cosine":
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif schedule == "linear":
      decayed = peak + (end - peak) * progress
    else:
      decayed = jnp.full_like(progress, peak)
    return jnp.where(step < warmup_steps, warm, decayed)

  return schedule_fn


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int,
                   schedule: str = "cosine", end_lr_fraction: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                   grad_clip_norm: float | None = 1.0,
                   params: Any) -> tuple[optax.GradientTransformation, Schedule]:
  """AdamW with global-norm clipping, warmup + decay, and weight decay off norms and biases.

  Every argument but `params` is a plain value, so a config passes `**config.optimizer`.

  The update of a parameter p with (already token-averaged) gradient g is::

    g <- g * min(1, grad_clip_norm / ||g||_global)        (skipped if grad_clip_norm is None)
    p <- p - lr(s) * (adam(g; b1, b2, eps) + weight_decay * p * decays(p))

  i.e. decoupled weight decay that follows the schedule (PyTorch's AdamW, optax's `adamw`).

  Which parameters decay (`jaxlm.param_tree.decay_mask`): every matmul kernel *and the token
  embedding*; never RMSNorm scales or biases (the scalar head's bias), whose scale is meaningful
  and should not be pulled to zero. The embedding decays on purpose. jaxlm ties it to the LM
  head by default, which makes it the output projection: every row receives a gradient through
  the softmax at every step, so it behaves like any other kernel, and it is the largest matrix
  of a small model, which would otherwise be the one unregularised matrix (GPT-2 and nanoGPT
  decay their tied embedding for the same reason). Codebases that skip it (Llama-style, OLMo)
  have untied input embeddings, where a rare token's row is decayed at every step but updated
  only when the token occurs; with `tie_embeddings=False` that effect applies here too, and is
  small at the scales and lengths jaxlm trains (a factor exp(-sum_s lr(s) * weight_decay)).

  Args:
    learning_rate: peak learning rate.
    total_steps: optimizer steps of the run (where the decay ends).
    warmup_steps: linear warmup steps (see `make_schedule`).
    schedule: "cosine", "linear" or "constant" (after warmup).
    end_lr_fraction: the final learning rate as a fraction of the peak.
    b1, b2, eps: Adam's moment decays and denominator epsilon (b2=0.95 as in GPT-3/Llama: a
      shorter second-moment memory is more stable for transformers than 0.999).
    weight_decay: decoupled decay coefficient (multiplied by the scheduled learning rate).
    grad_clip_norm: clip the global gradient norm to this value; None disables clipping.
    params: the parameter tree (plain, boxed, or abstract `ShapeDtypeStruct`s); only its
      structure and names are used, to build the weight-decay mask.

  Returns:
    (tx, schedule_fn): the optax transformation (init with plain params) and the learning rate
    as a function of the step, for logging (`make_train_step(schedule_fn=...)`).
  """
  schedule_fn = make_schedule(learning_rate=learning_rate, total_steps=total_steps,
                              warmup_steps=warmup_steps, schedule=schedule,
                              end_lr_fraction=end_lr_fraction)
  if grad_clip_norm is not None and grad_clip_norm <= 0:
    raise ValueError(f"grad_clip_norm={grad_clip_norm} must be positive (or None: no clipping)")
  # A static tree of Python bools: the mask is decided once, here, and can be inspected.
  mask = param_tree.decay_mask(params)
  adamw = optax.adamw(schedule_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
  parts = [] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]
  return optax.chain(*parts, adamw), schedule_fn


# ---------------------------------------------------------------------------------------------
# Train state, created already sharded.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a training run needs to continue exactly; a pytree, checkpointed whole.

  Attributes:
    step: int32 [], optimizer steps taken (the schedule's step).
    params: plain (unboxed) parameters.
    opt_state: the optax state.
    rng: uint32 raw key data (`jax.random.key_data`, [2] for the default threefry); the step
      wraps it with `jax.random.wrap_key_data`. Raw data rather than a typed key: orbax
      0.12's `StandardSave` stores either, but raw data is an ordinary array to every format
      and tool (numpy, msgpack, comparing two checkpoints).
  """

  step: Array
  params: Any
  opt_state: Any
  rng: Array


def _as_key(rng: Array) -> Array:
  """A typed key, from a typed key or its raw uint32 data."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def abstract_train_state(init_params_fn: Callable[[Array], Any], tx: optax.GradientTransformation,
                         mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES) -> TrainState:
  """The train state as `jax.ShapeDtypeStruct`s carrying their target shardings.

  Nothing is allocated. This is the restore target for orbax (`StandardRestore(abstract)`),
  valid for any mesh: a checkpoint written on 8 devices restores onto 1 and vice versa.

  Args:
    init_params_fn: rng -> parameters boxed with logical names (e.g.
      `functools.partial(model.init_params, config)`).
    tx: the optimizer.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    A `TrainState` of `ShapeDtypeStruct`s; `jax.tree.map(lambda x: x.sharding, abstract)` is
    the state's sharding tree.
  """
  boxed = jax.eval_shape(init_params_fn, jax.random.key(0))
  param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  params = sharding_lib.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  # optax re-initialises tx on a placeholder tree to find which parts of its state mirror the
  # parameters (Adam's mu and nu); those follow the parameters' shardings (FSDP shards them
  # like the weights), anything else (step counts) is replicated. A state that holds
  # parameter-derived arrays of other shapes (a factored optimizer) would be replicated too:
  # correct, but give such an optimizer its own shardings before using it at scale.
  opt_shardings = optax.tree.map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                        transform_non_params=lambda _: replicated)
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_state, rng=rng)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         rng=replicated)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def create_train_state(init_params_fn: Callable[[Array], Any], tx: optax.GradientTransformation,
                       rng: Array, mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES
                       ) -> tuple[TrainState, TrainState]:
  """A fresh train state, created directly in its sharded layout by one jitted init.

  Args:
    init_params_fn: rng -> boxed parameters (see `abstract_train_state`).
    tx: the optimizer.
    rng: a key (typed or raw uint32 data); split into the init key and the state's key.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (state, state_shardings): the state, and a `TrainState` of `NamedSharding`s (the
    `state_shardings` of `make_train_step` / `make_eval_step`).
  """
  abstract = abstract_train_state(init_params_fn, tx, mesh, rules)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)

  def init(rng):
    params_rng, state_rng = jax.random.split(_as_key(rng))
    params = sharding_lib.unbox(init_params_fn(params_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  with sharding_lib.use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


# ---------------------------------------------------------------------------------------------
# Batches: host numpy -> global arrays.
# ---------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES, *,
                   steps_per_call: int = 1) -> NamedSharding:
  """Batch arrays [B, ...] split along B (or [k, B, ...], k replicated, when steps_per_call>1)."""
  names = ("batch",) if steps_per_call == 1 else (None, "batch")
  return sharding_lib.named_sharding(mesh, names, rules)


def shard_batch(batch: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], mesh: Mesh,
                rules: Rules = sharding_lib.DEFAULT_RULES, *,
                steps_per_call: int = 1) -> dict[str, Array]:
  """This process's rows -> global arrays laid out as `make_train_step` expects.

  Args:
    batch: with `steps_per_call == 1`, one host batch {name: [B_host, ...]}; otherwise either a
      sequence of `steps_per_call` such batches or one dict of [k, B_host, ...] arrays.
    mesh: the device mesh.
    rules: logical axis rules.
    steps_per_call: k of the step the batch is for.

  Returns:
    {name: global jax.Array}, [B, ...] or [k, B, ...] with B the concatenation of every
    process's rows, split over the mesh axes of `batch`.
  """
  if steps_per_call == 1:
    return sharding_lib.shard_host_batch(batch, mesh, rules)
  if not isinstance(batch, Mapping):
    if len(batch) != steps_per_call:
      raise ValueError(f"got {len(batch)} batches for steps_per_call={steps_per_call}")
    batch = {key: np.stack([np.asarray(b[key]) for b in batch]) for key in batch[0]}
  sharding = batch_sharding(mesh, rules, steps_per_call=steps_per_call)
  out = {}
  for key, x in batch.items():
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] != steps_per_call:
      raise ValueError(f"batch[{key!r}] has shape {x.shape}; expected [{steps_per_call}, B, ...]")
    out[key] = jax.make_array_from_process_local_data(sharding, x)
  return out


# ---------------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------------


def _split_microbatches(batch: dict[str, Array], num: int, sharding: NamedSharding) -> dict:
  """[B, ...] -> [num, B / num, ...]; microbatch i takes rows i, i + num, i + 2 num, ...

  Strided rather than contiguous rows: with B split in contiguous blocks over the devices,
  every device then holds an equal share of every microbatch, so the split moves no data and
  every microbatch runs on all devices.
  """
  def split(key, x):
    if x.shape[0] % num:
      raise ValueError(f"batch[{key!r}] has {x.shape[0]} rows, not divisible into {num} "
                       "microbatches")
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)
  return {key: split(key, x) for key, x in batch.items()}


def _grads_and_sums(loss_fn: LossFn, params, batch, rng, num_microbatches: int,
                    param_shardings, micro_sharding: NamedSharding):
  """Gradient of the loss *sum*, the loss sum, the count and the aux sums, over all microbatches."""
  def loss_sum_fn(p, b, r):
    loss_sum, count, aux = loss_fn(p, b, r)
    return loss_sum, (loss_sum, count, aux)
  grad_fn = jax.grad(loss_sum_fn, has_aux=True)

  if num_microbatches == 1:
    return grad_fn(params, batch, rng)

  def body(grad_acc, xs):
    microbatch, index = xs
    grads, sums = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, grad_acc, grads), sums

  zeros = jax.tree.map(jnp.zeros_like, params)
  zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  microbatches = _split_microbatches(batch, num_microbatches, micro_sharding)
  grads, sums = jax.lax.scan(body, zeros, (microbatches, jnp.arange(num_microbatches)))
  # Per-microbatch sums come out stacked; adding them is exact token weighting.
  return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: TrainState, schedule_fn: Schedule | None = None,
                    num_microbatches: int = 1, steps_per_call: int = 1, donate: bool = True,
                    rules: Rules = sharding_lib.DEFAULT_RULES
                    ) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict]]:
  """A jitted `step(state, batch) -> (state, metrics)`, compiled once.

  Args:
    loss_fn: `(params, batch, rng) -> (loss_sum, count, aux_sums)` (e.g. `losses.lm_loss_fn`).
    tx: the optimizer the state was created with.
    mesh: the device mesh.
    state_shardings: from `create_train_state`; the step's input and output state shardings.
    schedule_fn: step -> learning rate (from `make_optimizer`), reported as `learning_rate`.
    num_microbatches: gradient accumulation: the batch's B rows are split into this many
      microbatches (B must divide; see `_split_microbatches`) run one after another under
      `lax.scan`, so activation memory is that of B / num_microbatches rows.
    steps_per_call: k optimizer steps per call (`lax.scan` over the batch's leading k axis),
      which saves host round-trips when a step is short (small models, CPU).
    donate: donate the input state's buffers (the caller must not reuse the old state).
    rules: logical axis rules (the batch axis and activation constraints).

  Returns:
    The step. Its input batch is {name: [B, ...]} when `steps_per_call == 1` and
    {name: [k, B, ...]} otherwise, laid out by `shard_batch`. Its metrics are float32 scalars
    (arrays [k], one entry per optimizer step, when `steps_per_call > 1`; average them or log
    them one by one on the host):

      loss           loss_sum / count over the whole batch
      tokens         count (the loss mask's sum)
      grad_norm      global norm of the token-averaged gradient, before clipping
      update_norm    global norm of the parameter update actually applied
      param_norm     global norm of the parameters after the update
      learning_rate  schedule_fn(step) used by this update (only with `schedule_fn`)
      <aux name>     aux_sums[name] / count, e.g. `accuracy`

    A batch with no masked token yields a zero gradient (count is floored at 1), but Adam's
    momentum and weight decay still move the parameters. `step.jitted` is the underlying `jax.jit` object
    (for `.lower()`, cache inspection).
  """
  if num_microbatches < 1 or steps_per_call < 1:
    raise ValueError(f"num_microbatches={num_microbatches} and steps_per_call={steps_per_call} "
                     "must be >= 1")
  micro_sharding = sharding_lib.named_sharding(mesh, (None, "batch"), rules)
  reserved = {"loss", "tokens", "grad_norm", "update_norm", "param_norm", "learning_rate"}

  def one_step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    grads, (loss_sum, count, aux) = _grads_and_sums(
        loss_fn, state.params, batch, step_rng, num_microbatches, state_shardings.params,
        micro_sharding)
    if reserved & set(aux):
      raise ValueError(f"aux names {sorted(reserved & set(aux))} clash with the step's metrics")
    # The single division of the whole update: the mean over every token of the batch.
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates), "param_norm": optax.tree.norm(params),
               **{name: value / denom for name, value in aux.items()}}
    if schedule_fn is not None:
      metrics["learning_rate"] = jnp.asarray(schedule_fn(state.step), jnp.float32)
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=jax.random.key_data(rng))
    return new_state, metrics

  def step_fn(state, batch):
    if steps_per_call == 1:
      return one_step(state, batch)
    for key, x in batch.items():
      if x.shape[0] != steps_per_call:
        raise ValueError(f"batch[{key!r}] has leading axis {x.shape[0]}, expected "
                         f"steps_per_call={steps_per_call}")
    return jax.lax.scan(one_step, state, batch)

  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step_fn,
                   in_shardings=(state_shardings,
                                 batch_sharding(mesh, rules, steps_per_call=steps_per_call)),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())

  def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(state, batch)

  step.jitted = jitted
  return step


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def make_eval_step(loss_fn: LossFn, *, mesh: Mesh, state_shardings: TrainState,
                   rules: Rules = sharding_lib.DEFAULT_RULES
                   ) -> Callable[[Any, dict[str, Array]], dict[str, Array]]:
  """A jitted `eval_step(params, batch) -> {"loss": loss_sum, "tokens": count, **aux_sums}`.

  It returns *sums* (replicated float32 scalars), to be added over batches by `evaluate`. The
  loss function gets a fixed key: evaluation is deterministic.
  """
  def eval_fn(params, batch):
    loss_sum, count, aux = loss_fn(params, batch, jax.random.key(0))
    sums = {"loss": loss_sum, "tokens": count, **aux}
    return {name: jnp.asarray(value, jnp.float32) for name, value in sums.items()}

  jitted = jax.jit(eval_fn, in_shardings=(state_shardings.params, batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

  def eval_step(params, batch):
    with sharding_lib.use_mesh(mesh, rules):
      return jitted(params, batch)

  eval_step.jitted = jitted
  return eval_step


def evaluate(eval_step: Callable[[Any, dict[str, Array]], dict[str, Array]], params,
             batches: Sequence[dict[str, Array]]) -> dict[str, float]:
  """Token-weighted metrics over a fixed list of batches, with one host transfer at the end.

  Args:
    eval_step: from `make_eval_step`.
    params: the parameters (e.g. `state.params`).
    batches: global batches (`shard_batch` them once and reuse them at every evaluation).

  Returns:
    {"loss": sum of loss sums / total tokens, "perplexity": exp(loss), "tokens": total tokens,
    and every aux sum / total tokens (e.g. "accuracy")}, Python floats. NaN loss if no token is
    masked in.
  """
  totals = None
  for batch in batches:
    sums = eval_step(params, batch)
    # Dispatched asynchronously: the sums stay on device until the single device_get below.
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("evaluate needs at least one batch")
  totals = {name: float(value) for name, value in jax.device_get(totals).items()}
  tokens = totals.pop("tokens")
  denom = tokens if tokens > 0 else math.nan
  loss = totals.pop("loss") / denom
  with np.errstate(over="ignore"):
    perplexity = float(np.exp(loss))
  return {"loss": loss, "perplexity": perplexity, "tokens": tokens,
          **{name: value / denom for name, value in totals.items()}}
