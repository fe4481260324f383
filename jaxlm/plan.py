"""Will it fit? A stage's programs compiled ahead of time for a target, without the target.

`plan_train_step(config, target)` builds a stage's real train step (`training.make_train_step`
with the stage's loss, optimizer, state shardings, microbatches and steps per call) on a mesh
over the target's devices, lowers it with abstract inputs (`jax.ShapeDtypeStruct`s carrying
their shardings: nothing is allocated), compiles it, and reads back what XLA planned:

* memory per device: arguments + outputs + temporaries - donated (aliased) buffers, against
  the target's memory (`ProgramReport.fits`, `margin_bytes`);
* FLOPs per device (`cost_analysis`); XLA counts a while loop's body once, so with loops in
  the program (scanned layers, microbatches, steps per call) this is a lower bound and
  `loops` says how many there are;
* collectives per device: count and result bytes of every all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute in the optimized HLO (a loop body's once).

Targets (`get_target`):

| name | devices | memory per device |
|---|---|---|
| `cpu:N` | N CPU devices; the process must have been started with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (`tools/plan.py` does it) | `memory_gib`, else unbounded |
| `v5e-8`, `v5e-16`, `v5p-8`, `v4-8`, `v6e-8` | a TPU topology through libtpu's deviceless compile (`pip install -e ".[tpu]"`) | the HBM XLA's TPU compiler allows per chip |

Status: the language-model train steps (pretraining, SFT) on CPU and TPU targets. The other
stages' programs (reward model, DPO step and reference pass, PPO sampler, scorer and update),
GPU targets and verified suggestions are the next steps (see the README, "Will it fit?").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import errors
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import stage
from jaxlm import training

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
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


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
  raise errors.UserError(f"--target={name}: unknown target; expected cpu:<N> or one of {', '.join(TPU_TARGETS)}"
                         f"{errors.did_you_mean(name, list(TPU_TARGETS))}")


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """What XLA planned for one program on one device of the target."""

  program: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  loops: int
  collectives: dict[str, tuple[int, int]]  # kind -> (count, result bytes)
  memory_per_device: float | None
  compiler_refused: str | None = None  # the compiler's out-of-memory message (TPU refuses to compile)

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


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO result type: `f32[8,128]{1,0}` or a tuple `(f32[8], bf16[4,4])`."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{kind: (count, result bytes)} of the collectives in optimized HLO text (async pairs once)."""
  out: dict[str, list[int]] = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?\S+ = (.+?) ([a-z-]+)\(", line)
    if not match:
      continue
    result, op = match.groups()
    kind = op.removesuffix("-start")
    if kind in COLLECTIVES and not op.endswith("-done"):
      count, size = out.setdefault(kind, [0, 0])
      out[kind] = [count + 1, size + _shape_bytes(result)]
  return {k: (c, b) for k, (c, b) in out.items()}


def analyse(program: str, compiled, memory_per_device: float | None) -> ProgramReport:
  """A `ProgramReport` of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  text = compiled.as_text()
  return ProgramReport(
      program=program, argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes), flops=float(cost.get("flops", 0.0)),
      loops=len(re.findall(r"\swhile\(", text)), collectives=collectives(text),
      memory_per_device=memory_per_device)


def _abstract_lm_batch(config, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The pretraining / SFT batch layout ([k,] B, L) with the step's batch sharding."""
  k, shape = config.steps_per_call, (config.batch_size, config.seq_len)
  shape = shape if k == 1 else (k, *shape)
  spec = training.batch_sharding(mesh, rules, steps_per_call=k)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.bool_, "segment_ids": jnp.int32,
            "positions": jnp.int32}
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=spec) for name, dtype in dtypes.items()}


def plan_train_step(config, target: Target, *, vocab_size: int) -> ProgramReport:
  """Compiles the stage's language-model train step for `target` and reports on it.

  Args:
    config: a pretraining or SFT config (its model, batch, sequence length, optimizer, mesh,
      microbatches and steps per call are what is compiled).
    target: from `get_target`.
    vocab_size: the tokenizer's vocabulary (the model's embedding rows).
  """
  if config.stage not in ("pretrain", "sft"):
    raise errors.UserError(f"the planner compiles pretrain and sft steps so far, not {config.stage!r}")
  mesh = sharding.make_mesh({axis: int(config.mesh[axis]) for axis in sharding.MESH_AXES}, devices=target.devices)
  rules = sharding.DEFAULT_RULES
  model_config = stage.model_config(config.model, vocab_size=vocab_size)
  init_fn = functools.partial(model_lib.init_params, model_config)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  step = training.make_train_step(losses.lm_loss_fn(model_lib.Transformer(model_config)), spec.tx, mesh=mesh,
                                  state_shardings=spec.shardings, schedule_fn=spec.schedule,
                                  num_microbatches=config.num_microbatches, steps_per_call=config.steps_per_call,
                                  rules=rules)
  lowered = step.jitted.lower(spec.abstract_state, _abstract_lm_batch(config, mesh, rules))
  return compile_and_analyse(f"{config.stage} train step", lowered, target.memory_per_device)


def compile_and_analyse(program: str, lowered, memory_per_device: float | None) -> ProgramReport:
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
                         flops=float("nan"), loops=0, collectives={}, memory_per_device=memory_per_device,
                         compiler_refused=str(e).splitlines()[0])
  return analyse(program, compiled, memory_per_device)
