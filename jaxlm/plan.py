"""Will it fit? A stage's programs compiled ahead of time for a target, without the target.

`stage_programs(config, target)` builds every program a run of the stage compiles, with the
stage's own library code (pretraining / SFT / reward model: `training.make_train_step` with the
stage's loss, optimizer, state shardings, microbatches and steps per call; DPO: that step and
the reference pass `dpo.ReferenceLogps`; PPO: the sampler `sampling.generate`, the scorer
`ppo.make_scorer` and the update `ppo.make_update`), on a mesh over the target's devices, and
lowers each with abstract inputs (`jax.ShapeDtypeStruct`s carrying their shardings: nothing is
allocated). `compile_program` compiles one and reads back what XLA planned, per device:

* memory: arguments + outputs + temporaries - donated (aliased) buffers, against the target's
  memory (`ProgramReport.fits`, `margin_bytes`);
* FLOPs: as executed (`jaxlm.hlo_stats`: every matmul, loop bodies times trip counts), XLA's
  cost analysis (loop bodies once), and the model's formula (`model_flops`);
* collectives: count and result bytes of every all-reduce, all-gather, reduce-scatter,
  all-to-all and collective-permute per call, loops unrolled.

`suggest` finds settings under which a program that does not fit does (FSDP over every device,
microbatches, PPO minibatches, remat), each checked by compiling it.

Targets (`get_target`):

| name | devices | memory per device |
|---|---|---|
| `cpu:N` | N CPU devices; the process must have been started with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (`tools/plan.py` does it) | `memory_gib`, else unbounded |
| `v5e-8`, `v5e-16`, `v5p-8`, `v4-8`, `v6e-8` | a TPU topology through libtpu's deviceless compile (`pip install -e ".[tpu]"`) | the HBM XLA's TPU compiler allows per chip |
| `h100-80gb`, `a100-80gb`, `h200`, `8xh100-80gb`, ... | NVIDIA GPUs through the CUDA plugin's deviceless compile (`pip install -e ".[gpu-plan]"`, `jaxlm/gpu_target.py`) | the share of the device JAX's allocator may use |

XLA:CPU plans more temporaries than the TPU and GPU compilers for the same program (it fuses
less), so a `cpu:N` plan is an upper bound for an accelerator's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import attention
from jaxlm import errors
from jaxlm import gpu_target
from jaxlm import hlo_stats
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import stage
from jaxlm import training
from jaxlm.checkpoint import FREE_MODEL_FIELDS

GIB = 2**30
# TPU targets: (topology name, chip config, usable HBM per chip). The HBM is what XLA's TPU
# compiler itself allows per chip (read from its out-of-memory message on a deliberately too
# large program), a little under the chips' nominal 16 / 96 / 32 / 32 GB.
TPU_TARGETS = {
    "v5e-8": ("v5e:2x4", "default", 15.75 * GIB),
    "v5e-16": ("v5e:4x4", "default", 15.75 * GIB),
    "v5p-8": ("v5:2x2x1", "megacore", 95.74 * GIB),
    "v4-8": ("v4:2x2x1", "megacore", 30.75 * GIB),
    "v6e-8": ("v6e:2x4", "default", 31.25 * GIB),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the programs are compiled for."""

  name: str
  devices: tuple[Any, ...]
  memory_per_device: float | None  # bytes; None: no limit known
  description: str


def get_target(name: str, *, memory_gib: float | None = None) -> Target:
  """The devices and memory of a target name (see the module docstring)."""
  memory = memory_gib * GIB if memory_gib else None
  if name.startswith("cpu:"):
    try:
      count = int(name.split(":", 1)[1])
    except ValueError:
      raise errors.UserError(f"--target={name}: expected cpu:<number of devices>, e.g. cpu:8") from None
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise errors.UserError(f"--target={name}: this process has {len(devices)} CPU devices; start it with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (tools/plan.py does)")
    return Target(name, tuple(devices[:count]), memory, f"{count} x CPU")
  if name in TPU_TARGETS:
    topology, chip_config, hbm = TPU_TARGETS[name]
    from jax.experimental import topologies  # Deferred: only TPU targets need libtpu.

    try:
      devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             chip_config_name=chip_config).devices
    except Exception as e:  # pylint: disable=broad-except  # libtpu missing or too old.
      raise errors.UserError(f"--target={name}: cannot describe the TPU topology {topology} ({e}); TPU targets "
                             "need libtpu: pip install -e \".[tpu]\"") from None
    return Target(name, tuple(devices), memory or hbm, f"{len(devices)} x {devices[0].device_kind}")
  if gpu_target.is_gpu_name(name):
    devices, budget, description = gpu_target.gpu_devices(name)
    return Target(name, tuple(devices), memory or budget, description)
  known = [*TPU_TARGETS, *gpu_target.example_names()]
  raise errors.UserError(f"--target={name}: unknown target; expected cpu:<N> or one of {', '.join(known)}"
                         f"{errors.did_you_mean(name, known)}")


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """What XLA planned for one program on one device of the target.

  FLOPs, three ways: `executed_flops` counts every matmul as the program runs it (loop bodies
  times their trip counts, `jaxlm.hlo_stats`); `xla_flops` is XLA's cost analysis (every
  instruction, loop bodies once); `model_flops` is the model's formula for the whole call on all
  devices together (divide by the devices to compare). `executed_flops` is exact unless
  `unknown_trip_counts` or `opaque_kernels` (kernels without a FLOPs estimate) is non-empty.
  """

  program: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  xla_flops: float
  loops: int
  collectives: dict[str, tuple[int, int]]  # kind -> (count, result bytes) per call, loops unrolled
  memory_per_device: float | None
  compiler_refused: str | None = None  # the compiler's out-of-memory message (TPU refuses to compile)
  model_flops: float = float("nan")  # the model-FLOPs formula of one call, all devices together
  executed_flops: float = float("nan")
  unknown_trip_counts: int = 0
  opaque_kernels: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries - donated buffers (an output that reuses an input)."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def fits(self) -> bool | None:
    return None if self.memory_per_device is None else self.peak_bytes <= self.memory_per_device

  @property
  def margin_bytes(self) -> float | None:
    return None if self.memory_per_device is None else self.memory_per_device - self.peak_bytes

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits,
            "margin_bytes": self.margin_bytes,
            "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in self.collectives.items()}}


def analyse_with_budget(report: ProgramReport, memory_per_device: float | None) -> ProgramReport:
  """The same report judged against another memory budget (e.g. `--memory_gib`)."""
  return dataclasses.replace(report, memory_per_device=memory_per_device)


def analyse(program: str, compiled, memory_per_device: float | None, *, model_flops: float = float("nan")) -> ProgramReport:
  """A `ProgramReport` of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  memory = compiled.memory_analysis()
  cost = gpu_target.cost_analysis(compiled)  # XLA's own where it has one; GPU compiles have none.
  stats = hlo_stats.stats_of(compiled)
  return ProgramReport(
      program=program, argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes), xla_flops=float(cost.get("flops", float("nan"))),
      loops=stats.loops, collectives=stats.collectives, memory_per_device=memory_per_device, model_flops=model_flops,
      executed_flops=stats.flops, unknown_trip_counts=stats.unknown_trip_counts,
      opaque_kernels=dict(stats.opaque_kernels))


# ------------------------------------------------------------------------------------------------
# The stages' programs, lowered with abstract inputs.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Program:
  """One program of a stage, lowered for the target: what to compile and what it should cost.

  Attributes:
    name: e.g. "sft train step", "ppo scorer".
    lowered: `jax.jit(f).lower(...)` with abstract inputs carrying their shardings.
    model_flops: the model-FLOPs formula of one call, summed over all devices (`model_flops`).
    knob: the config keys that shrink this program's memory, in the order the planner tries.
  """

  name: str
  lowered: Any
  model_flops: float
  knob: tuple[str, ...] = ()


def model_flops(config: model_lib.ModelConfig, *, rows: int, seq_len: int, head_positions: int | None = None,
                backward: bool = True, lm_head: bool = True) -> float:
  """Model FLOPs of `rows` sequences of `seq_len` tokens (PaLM appendix B, causal attention).

  Forward per token: 2 N_ne (every non-embedding matmul weight) + 2 L H Dh T (causal scores
  and values); the LM head adds 2 V E per position it runs at (`head_positions` per row,
  default every token; none with `lm_head=False`). A backward pass costs twice the forward.
  """
  c = config
  forward = rows * seq_len * (2.0 * model_lib.num_params(c, include_embedding=False)
                              + 2.0 * c.num_layers * c.num_heads * c.head_dim * seq_len)
  if lm_head:
    forward += rows * (seq_len if head_positions is None else head_positions) * 2.0 * c.vocab_size * c.embed_dim
  return forward * (3 if backward else 1)


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _rows(mesh, rules, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch arrays {name: (shape, dtype)} split along their first axis as training does."""
  spec = sharding.batch_sharding(mesh, rules)
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=spec) for name, (shape, dtype) in shapes.items()}


def _train_step(name, config, loss_fn, spec: stage.StateSpec, batch, mesh, rules, flops) -> Program:
  """The stage's `training.make_train_step` on the abstract state of `spec` and a batch."""
  k = config.steps_per_call
  step = training.make_train_step(loss_fn, spec.tx, mesh=mesh, state_shardings=spec.shardings,
                                  schedule_fn=spec.schedule, num_microbatches=config.num_microbatches,
                                  steps_per_call=k, rules=rules)
  if k > 1:  # [k, B, ...]: k steps per call, the batch axis second.
    stacked = training.batch_sharding(mesh, rules, steps_per_call=k)
    batch = {n: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=stacked) for n, x in batch.items()}
  with sharding.use_mesh(mesh, rules):
    lowered = step.jitted.lower(spec.abstract_state, batch)
  return Program(name, lowered, flops * k, knob=("num_microbatches", "model.remat_policy", "mesh.fsdp"))


def _lm_programs(config, model_config, mesh, rules) -> list[Program]:
  b, t = config.batch_size, config.seq_len
  batch = _rows(mesh, rules, {"inputs": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32),
                              "loss_mask": ((b, t), jnp.bool_), "segment_ids": ((b, t), jnp.int32),
                              "positions": ((b, t), jnp.int32)})
  init_fn = functools.partial(model_lib.init_params, model_config)
  loss_fn = losses.lm_loss_fn(model_lib.Transformer(model_config))
  spec = stage.state_spec(config, init_fn, mesh, rules)
  return [_train_step(f"{config.stage} train step", config, loss_fn, spec, batch, mesh, rules,
                      model_flops(model_config, rows=b, seq_len=t))]


def _reward_programs(config, model_config, mesh, rules) -> list[Program]:
  from jaxlm import reward_model  # Deferred: each stage's library only where planned.

  b, t = config.batch_size, config.seq_len
  shapes = {"valid": ((b,), jnp.bool_)}
  for side in ("chosen", "rejected"):  # pipelines.render_pair's layout
    shapes.update({f"{side}_tokens": ((b, t), jnp.int32), f"{side}_loss_mask": ((b, t), jnp.bool_),
                   f"{side}_segment_ids": ((b, t), jnp.int32), f"{side}_positions": ((b, t), jnp.int32),
                   f"{side}_last_index": ((b,), jnp.int32)})
  init_fn = functools.partial(model_lib.init_params, model_config, scalar_head=True)
  loss_fn = reward_model.reward_loss_fn(model_lib.Transformer(model_config), margin=config.loss.margin,
                                        centering_weight=config.loss.centering_weight)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  return [_train_step("reward train step", config, loss_fn, spec, _rows(mesh, rules, shapes), mesh, rules,
                      model_flops(model_config, rows=2 * b, seq_len=t, lm_head=False))]


def _dpo_programs(config, model_config, mesh, rules) -> list[Program]:
  from jaxlm import dpo  # Deferred: each stage's library only where planned.

  b, t, s = config.batch_size, config.seq_len, config.score_len
  shapes = {"tokens": ((b, t), jnp.int32), "positions": ((b, t), jnp.int32), "segment_ids": ((b, t), jnp.int32),
            "branch_ids": ((b, t), jnp.int32), "score_index": ((b, s), jnp.int32),
            "score_targets": ((b, s), jnp.int32), "score_side": ((b, s), jnp.int32)}
  model_inputs = _rows(mesh, rules, shapes)
  batch = {**model_inputs, **_rows(mesh, rules, {"valid": ((b,), jnp.bool_),
                                                 "reference_chosen_logps": ((b,), jnp.float32),
                                                 "reference_rejected_logps": ((b,), jnp.float32)})}
  init_fn = functools.partial(model_lib.init_params, model_config)
  loss_fn = dpo.dpo_loss_fn(model_lib.Transformer(model_config), loss=config.loss.name, beta=config.loss.beta,
                            label_smoothing=config.loss.label_smoothing)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  step = _train_step("dpo train step", config, loss_fn, spec, batch, mesh, rules,
                     model_flops(model_config, rows=b, seq_len=t, head_positions=s))
  reference = dpo.reference_fn(model_config, mesh=mesh, rules=rules)
  with sharding.use_mesh(mesh, rules):  # The reference is placed like the policy's parameters.
    lowered = reference.jitted.lower(spec.abstract_state.params, model_inputs)
  return [step, Program("dpo reference pass", lowered,
                        model_flops(model_config, rows=b, seq_len=t, head_positions=s, backward=False),
                        knob=("batch_size", "mesh.fsdp"))]


def _rollout_and_sampler(params, model_config, mesh, rules, *, rows: int, prompt_len: int, new_tokens: int,
                         temperature: float):
  """An on-policy stage's abstract rollout batch (prompts + replies, rows split) and its lowered sampler."""
  from jaxlm import sampling  # Deferred: each stage's library only where planned.

  b, p, n = rows, prompt_len, new_tokens
  prompts = _rows(mesh, rules, {"prompt_tokens": ((b, p), jnp.int32), "prompt_lengths": ((b,), jnp.int32)})
  rollout = {**prompts, **_rows(mesh, rules, {"response_tokens": ((b, n), jnp.int32),
                                              "response_lengths": ((b,), jnp.int32), "mask": ((b, n), jnp.bool_)})}
  with sharding.use_mesh(mesh, rules):
    key = jax.eval_shape(lambda: jax.random.key(0))  # Abstract: nothing may run on a compile-only target.
    sampler = sampling.lower_generate(
        params, prompts["prompt_tokens"], prompts["prompt_lengths"], key, config=model_config,
        sampling=sampling.SamplingConfig(temperature=temperature), max_new_tokens=n, stop_ids=(1, 2),
        mesh=mesh, rules=rules)
  return rollout, sampler


def _ppo_programs(config, model_config, mesh, rules) -> list[Program]:
  from jaxlm import ppo as ppo_lib  # Deferred: each stage's library only where planned.

  settings = ppo_lib.PPOConfig(**dict(config.ppo))
  b, p, n = config.rollout_batch, config.max_prompt_len, config.max_new_tokens
  roles = ppo_lib.state_spec(config, model_config, mesh, rules)
  policy, value = roles.abstract_state.params, roles.abstract_state.value.params
  rollout, sampler = _rollout_and_sampler(policy, model_config, mesh, rules, rows=b, prompt_len=p, new_tokens=n,
                                          temperature=settings.temperature)
  reward_config = model_config if float(config.reward.weights.get("model", 0.0)) else None  # the reward model
  scorer = ppo_lib.make_scorer(model_config, reward_config, settings, mesh=mesh, rules=rules)
  with sharding.use_mesh(mesh, rules):
    scored = scorer.jitted.lower(policy, policy, value, value if reward_config else None, rollout)
  update = ppo_lib.make_update(model_config, settings, roles.policy_tx, roles.value_tx,
                               state_shardings=roles.shardings, mesh=mesh, rules=rules)
  floats = _rows(mesh, rules, {k: ((b, n), jnp.float32) for k in ("log_probs", "values", "advantages", "returns")})
  with sharding.use_mesh(mesh, rules):
    updated = update.jitted.lower(roles.abstract_state, {**rollout, **floats})
  t = p + n
  # Sampling: a prefill of the prompts, then one token per row and step (the cache is read,
  # not recomputed: 2 N per token plus attention over the cache).
  sample_flops = model_flops(model_config, rows=b, seq_len=t, head_positions=n + 1, backward=False)
  score_flops = (2 * model_flops(model_config, rows=b, seq_len=t, head_positions=n, backward=False)
                 + (2 if reward_config else 1) * model_flops(model_config, rows=b, seq_len=t, lm_head=False,
                                                             backward=False))
  epochs = settings.ppo_epochs
  update_flops = epochs * (model_flops(model_config, rows=b, seq_len=t, head_positions=n)
                           + model_flops(model_config, rows=b, seq_len=t, lm_head=False))
  return [Program("ppo sampler", sampler, sample_flops, knob=("rollout_batch", "mesh.fsdp")),
          Program("ppo scorer", scored, score_flops, knob=("rollout_batch", "mesh.fsdp")),
          Program("ppo update", updated, update_flops,
                  knob=("ppo.num_minibatches", "model.remat_policy", "mesh.fsdp"))]


def _grpo_programs(config, model_config, mesh, rules) -> list[Program]:
  """GRPO's sampler (prompts x G rows), critic-free scorer and policy update."""
  from jaxlm import grpo as grpo_lib  # Deferred: each stage's library only where planned.

  settings = grpo_lib.GRPOConfig(**dict(config.grpo))
  b, p, n = config.prompts_per_step * settings.group_size, config.max_prompt_len, config.max_new_tokens
  init_fn = functools.partial(model_lib.init_params, model_config)
  updates = config.total_steps * settings.epochs * settings.num_minibatches
  abstract_params = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
  tx, _ = training.make_optimizer(**config.optimizer, total_steps=updates, params=abstract_params)
  state = training.abstract_train_state(init_fn, tx, mesh, rules)
  uses_model = float(config.reward.weights.get("model", 0.0)) != 0.0
  rollout, sampler = _rollout_and_sampler(state.params, model_config, mesh, rules, rows=b, prompt_len=p,
                                          new_tokens=n, temperature=settings.temperature)
  scorer = grpo_lib.make_scorer(model_config, model_config if uses_model else None, settings, mesh=mesh,
                                rules=rules)
  reward_params = None
  if uses_model:
    head_init = functools.partial(model_lib.init_params, model_config, scalar_head=True)
    reward_params = jax.eval_shape(lambda: sharding.unbox(head_init(jax.random.key(0))))
    reward_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), reward_params,
                                 sharding.logical_shardings(jax.eval_shape(head_init, jax.random.key(0)), mesh, rules))
  with sharding.use_mesh(mesh, rules):
    sampled = _rows(mesh, rules, {"sampler_log_probs": ((b, n), jnp.float32)})  # the sampler's, as a rollout has
    scored = scorer.jitted.lower(state.params, state.params, reward_params, {**rollout, **sampled})
  update = grpo_lib.make_update(model_config, settings, tx, state_shardings=jax.tree.map(lambda x: x.sharding, state),
                                mesh=mesh, rules=rules)
  floats = _rows(mesh, rules, {k: ((b, n), jnp.float32) for k in ("log_probs", "ref_log_probs")})
  advantages = _rows(mesh, rules, {"advantages": ((b,), jnp.float32)})
  with sharding.use_mesh(mesh, rules):
    updated = update.jitted.lower(state, {**rollout, **floats, **advantages})
  t = p + n
  sample_flops = model_flops(model_config, rows=b, seq_len=t, head_positions=n + 1, backward=False)
  lm_passes = 2 if settings.old_log_probs == "scorer" else 1  # reference (+ policy unless the sampler's)
  score_flops = (lm_passes * model_flops(model_config, rows=b, seq_len=t, head_positions=n, backward=False)
                 + (model_flops(model_config, rows=b, seq_len=t, lm_head=False, backward=False) if uses_model else 0))
  update_flops = settings.epochs * model_flops(model_config, rows=b, seq_len=t, head_positions=n)
  return [Program("grpo sampler", sampler, sample_flops, knob=("prompts_per_step", "mesh.fsdp")),
          Program("grpo scorer", scored, score_flops, knob=("prompts_per_step", "mesh.fsdp")),
          Program("grpo update", updated, update_flops,
                  knob=("grpo.num_minibatches", "model.remat_policy", "mesh.fsdp"))]


STAGE_PROGRAMS = {"pretrain": _lm_programs, "sft": _lm_programs, "reward": _reward_programs, "dpo": _dpo_programs,
                  "ppo": _ppo_programs, "grpo": _grpo_programs}


def adopt_hf_config(config, path: str):
  """A copy of a stage config whose model is the Hugging Face model that `path` (a config.json)
  describes, as `stage.adopt_parent_model` gives a child of an imported run: its shape,
  vocabulary and options from the file, the preset's dtype, remat, attention and max_len.
  Nothing but the file is read, so a model can be planned before it is downloaded."""
  from jaxlm import hf_checkpoint  # Deferred: the planner does not need it otherwise.

  hf_config = hf_checkpoint.read_json(path)
  imported = hf_checkpoint.model_config_from_hf(hf_config, source=path, dtype=config.model.dtype,
                                                max_len=int(config.model.max_len))
  fields = {f"model.{name}": value for name, value in imported.to_dict().items()
            if name not in FREE_MODEL_FIELDS}
  fields["model.origin"] = f"hf:{hf_checkpoint.architecture_of(hf_config, path)} (planned from {path})"
  return with_overrides(config, fields)


def default_vocab_size(config) -> int:
  """The vocabulary a run of `config` would have: its tokenizer's (pretraining), else the model
  preset's (a later stage takes its parent's tokenizer; the presets name the same size)."""
  return int(config.tokenizer.vocab_size if "tokenizer" in config else config.model.vocab_size)


def stage_programs(config, target: Target, *, vocab_size: int) -> list[Program]:
  """Every program a run of `config` compiles, lowered for `target` (nothing is allocated)."""
  if config.stage not in STAGE_PROGRAMS:
    raise errors.UserError(f"the planner knows the stages {', '.join(STAGE_PROGRAMS)}, not {config.stage!r}")
  mesh = sharding.make_mesh({axis: int(config.mesh[axis]) for axis in sharding.MESH_AXES}, devices=target.devices)
  model_config = stage.model_config(config.model, vocab_size=vocab_size)
  # "auto" attention is chosen for the target's devices, not for this process's CPU backend.
  platform = target.devices[0].platform
  model_config = model_config.replace(attention_impl=attention.resolve(model_config.attention_impl, platform,
                                                                       model_config.compute_dtype))
  with gpu_target.deviceless_cudnn(target.name):  # cuDNN attention lowers for a GPU target (a no-op otherwise).
    return STAGE_PROGRAMS[config.stage](config, model_config, mesh, sharding.DEFAULT_RULES)


def compile_program(program: Program, target: Target) -> ProgramReport:
  """Compiles one lowered program for the target and reports on it."""
  return compile_and_analyse(program.name, program.lowered, target.memory_per_device,
                             model_flops=program.model_flops)


def plan_stage(config, target: Target, *, vocab_size: int) -> list[ProgramReport]:
  """Compiles every program of the stage for `target` and reports on each."""
  return [compile_program(p, target) for p in stage_programs(config, target, vocab_size=vocab_size)]


def plan_train_step(config, target: Target, *, vocab_size: int) -> ProgramReport:
  """The report of the stage's train step (pretraining, SFT, reward model, DPO)."""
  if config.stage not in ("pretrain", "sft", "reward", "dpo"):
    raise errors.UserError(f"{config.stage!r} has no single train step; use plan_stage")
  return plan_stage(config, target, vocab_size=vocab_size)[0]


def compile_and_analyse(program: str, lowered, memory_per_device: float | None, *,
                        model_flops: float = float("nan")) -> ProgramReport:
  """Compiles `lowered` and analyses it. XLA's TPU compiler refuses a program that does not fit
  its HBM: that is a "does not fit" report holding the memory the compiler says it needs."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
      raise
    temp = float(needed.group(1)) * 1024 ** "KMGT".index(needed.group(2)) * 1024
    return ProgramReport(program=program, argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=int(temp),
                         xla_flops=float("nan"), loops=0, collectives={}, memory_per_device=memory_per_device,
                         compiler_refused=str(e).splitlines()[0], model_flops=model_flops)
  return analyse(program, compiled, memory_per_device, model_flops=model_flops)


# ------------------------------------------------------------------------------------------------
# Suggestions: settings that make a program fit, checked by compiling them.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Suggestion:
  """Config overrides under which `report` (the program compiled again with them) fits."""

  overrides: dict[str, Any]
  report: ProgramReport
  cost: str  # what the change costs, in words


def with_overrides(config, overrides: dict[str, Any]):
  """A copy of an ml_collections config with dotted keys set (`{"model.remat_policy": "full"}`)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      *path, last = key.split(".")
      section = config
      for part in path:
        section = section[part]
      section[last] = value
  return config


def _candidates(config, program: Program, devices: int):
  """(overrides, cost) to try for `program`, cheapest first: parameters and optimizer state
  sharded over every device (FSDP), then fewer rows at once (microbatches / minibatches), then
  recomputing activations in the backward pass (remat)."""
  mesh = {axis: int(config.mesh[axis]) for axis in sharding.MESH_AXES}
  out = []
  if "mesh.fsdp" in program.knob and mesh["fsdp"] not in (-1, devices // max(mesh["tensor"], 1)):
    out.append(({"mesh.data": 1, "mesh.fsdp": -1}, "parameters, gradients and AdamW state split over all devices "
                "(ZeRO-3); one all-gather of each layer's weights per pass, no throughput loss at this size"))
  base = dict(out[0][0]) if out else {}
  if "num_microbatches" in program.knob:
    rows, now = config.batch_size, config.num_microbatches
    for factor in (2, 4, 8, 16, 32):
      m = now * factor
      if rows % m == 0 and (rows // m) % max(1, devices // max(mesh["tensor"], 1)) == 0:
        out.append(({**base, "num_microbatches": m}, f"{rows // m} rows per microbatch instead of {rows // now}: "
                    "the same update, smaller matmuls (usually a few % slower)"))
  if "ppo.num_minibatches" in program.knob:
    now = config.ppo.num_minibatches
    for factor in (2, 4, 8):
      if config.rollout_batch % (now * factor) == 0:
        out.append(({**base, "ppo.num_minibatches": now * factor}, f"{now * factor} PPO minibatches per epoch "
                    f"instead of {now}: more, smaller policy updates (changes the algorithm slightly)"))
  if "model.remat_policy" in program.knob and config.model.remat_policy != "full":
    micro = [o for o, _ in out if "num_microbatches" in o]
    for extra in [{}] + micro:
      out.append(({**base, **extra, "model.remat_policy": "full"}, "the backward pass recomputes each layer's "
                  "activations (remat 'full'): ~1/3 more FLOPs per step" + (
                      f", with {extra['num_microbatches']} microbatches" if extra else "")))
  return out


def suggest(config, target: Target, program: Program, *, vocab_size: int, max_compiles: int = 6) -> Suggestion | None:
  """The first of `_candidates` under which `program` fits `target`, verified by compiling it;
  None when none of the first `max_compiles` does."""
  if target.memory_per_device is None:
    return None
  for overrides, cost in _candidates(config, program, len(target.devices))[:max_compiles]:
    changed = with_overrides(config, overrides)
    try:
      again = [p for p in stage_programs(changed, target, vocab_size=vocab_size) if p.name == program.name][0]
    except (ValueError, errors.UserError):  # e.g. a batch that no longer splits over the mesh
      continue
    report = compile_program(again, target)
    if report.fits:
      return Suggestion(overrides, report, cost)
  return None
