"""Device meshes and logical-axis sharding: where the model's named axes live on the devices.

Every parameter and main activation of `jaxlm.model` names its axes from one small vocabulary
(`LOGICAL_AXES`); rules (`DEFAULT_RULES`, overridable from a config) map those names onto the
three mesh axes:

  ======= ==========================================================================
  data    pure data parallelism: the batch is split, parameters are replicated
  fsdp    data parallelism with sharded state (ZeRO-3): the batch is split, and so are
          parameters and optimizer state (along `embed`); XLA all-gathers a layer's
          weights just before use and reduce-scatters its gradients
  tensor  tensor (Megatron) parallelism: attention heads, the MLP hidden units and the
          vocabulary are split; activations are all-reduced after attn/o and mlp/down
  ======= ==========================================================================

A mesh axis of size 1 costs nothing, so one set of rules serves 1 CPU, 8 fake CPU devices, a
GPU host and a TPU slice; only the mesh shape changes. Rules that name a mesh axis the mesh
does not have are dropped, so `make_mesh({"data": -1})` works with the default rules.

Intended use (state is created already sharded; nothing is ever materialised on one device)::

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init_fn = functools.partial(model.init_params, config)         # boxed: carries logical names
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding.logical_shardings(abstract, mesh)          # plain tree of NamedSharding
  params = jax.jit(lambda r: sharding.unbox(init_fn(r)), out_shardings=shardings)(rng)
  with sharding.use_mesh(mesh):           # activation constraints: mesh + rules in context
    step = jax.jit(train_step, in_shardings=..., out_shardings=..., donate_argnums=0)
    for host_batch in data:
      state, metrics = step(state, sharding.shard_host_batch(host_batch, mesh), rng)

`use_mesh` is `jax.set_mesh(mesh)` plus `nn.logical_axis_rules(rules)`: the model's
`nn.with_logical_constraint` calls are no-ops without it (fine on one device), and turn into
sharding constraints under it. Tracing (the first call of a jitted function) must happen
inside the context.

Multiple processes. Call `maybe_initialize_distributed()` first thing in `main`, before any
other JAX call. On a Cloud TPU VM slice run the same command on every host (e.g.
`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."`); the TPU is detected and
`jax.distributed.initialize()` discovers the other hosts by itself. On one multi-GPU host a
single process drives all local GPUs and nothing needs initialising; across GPU hosts, launch
one process per host with `JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N
JAX_PROCESS_ID=i` (or under SLURM / Open MPI, which JAX detects). Each process then feeds only
its own slice of the global batch (`shard_host_batch`), and `jax.devices()` spans all hosts.
"""

import contextlib
import glob
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The whole vocabulary of logical axis names. `kv` is the per-head feature axis (head_dim);
# the number of kv heads is a `heads` axis too, so with tensor parallelism `tensor` must divide
# num_kv_heads as well as num_heads (or map `heads` to None).
LOGICAL_AXES = {
    "batch": "examples in a batch (activations only)",
    "length": "sequence positions; also cache slots",
    "embed": "the residual stream, E",
    "mlp": "SwiGLU hidden units, M",
    "heads": "query heads H, and key/value heads Hkv",
    "kv": "features within one head, Dh",
    "vocab": "token ids, V",
    "layers": "the stacked layer axis that nn.scan adds to every block parameter",
}

# In priority order: flax assigns each mesh axis at most once per array, walking the rules
# from the top. `batch` comes before `embed`, so an activation [batch, length, embed] is split
# over (data, fsdp) on the batch, while a parameter (no batch axis) is split on embed over
# fsdp: exactly FSDP. `length` stays whole (no sequence parallelism), `kv` is small, and
# `layers` is scanned over, so splitting it would serialise the devices.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all `devices` (default: `jax.devices()`, every host's) with named axes.

  Args:
    shape: axis name -> size, in mesh order, e.g. {"data": -1, "fsdp": 1, "tensor": 1}. One
      size may be -1: it takes whatever the other axes leave.
    devices: the devices to use, all of them.

  Returns:
    A `jax.sharding.Mesh` whose axes are `Auto` (GSPMD propagation from the shardings of
    inputs, outputs and constraints, which is what logical-axis rules drive; jax >= 0.7
    defaults `jax.make_mesh` to explicit axes).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = tuple(shape), list(shape.values())
  if any(not isinstance(s, int) or (s <= 0 and s != -1) for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: sizes must be positive ints, one may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {dict(shape)}: the fixed axes ({known} devices) do not "
                       f"divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh shape {dict(shape)} needs {math.prod(sizes)} devices, there are "
                     f"{len(devices)}; use -1 for one axis to fill the rest")
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)


def mesh_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """`rules` without the mesh axes that `mesh` lacks."""
  def keep(axes):
    if axes is None or isinstance(axes, str):
      return axes if axes in mesh.axis_names else None
    kept = tuple(a for a in axes if a in mesh.axis_names)
    return kept or None
  return tuple((name, keep(axes)) for name, axes in rules)


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                   shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
  """The sharding of one array with logical axis `names`; checks divisibility given `shape`."""
  spec = nn.logical_to_mesh_axes(tuple(names), mesh_rules(rules, mesh))
  if shape is not None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      if axes is None:
        continue
      parts = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if size % parts:
        raise ValueError(
            f"{what}: dimension {dim} ({names[dim]}={size}) does not split over mesh axes "
            f"{axes} ({parts} devices); change the mesh or map {names[dim]!r} to None")
  return NamedSharding(mesh, spec)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def logical_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree whose leaves are boxed with logical names.

  Args:
    tree: typically `jax.eval_shape(init_fn, rng)` with `nn.Partitioned` boxes from
      `nn.with_logical_partitioning`. Unboxed leaves are replicated.
    mesh: the device mesh.
    rules: logical name -> mesh axes.

  Returns:
    A tree shaped like `unbox(tree)` with a `NamedSharding` at every leaf: the
    `out_shardings` of a jitted init, and the `in_shardings` of a step taking the params.
  """
  def one(path, leaf):
    if not _is_box(leaf):
      return NamedSharding(mesh, PartitionSpec())
    return named_sharding(mesh, leaf.names, rules, leaf.value.shape, jax.tree_util.keystr(path))
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def unbox(tree: Any) -> Any:
  """The plain arrays (or ShapeDtypeStructs) of a tree with logical-partitioning boxes."""
  return nn.meta.unbox(tree)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Mesh and logical rules in context, so the model's activation constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules(rules, mesh)):
    yield


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Arrays [B, ...] split along B as the rules place `batch`; other axes replicated."""
  return named_sharding(mesh, ("batch",), rules)


def shard_host_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                     rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global `jax.Array`s split along the batch axis.

  Every process passes its own rows (the pipelines already read a per-host slice); the global
  batch is their concatenation in process order. With one process this is a device_put.
  """
  sharding = batch_sharding(mesh, rules)

  def one(key, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch entry needs a leading B axis")
    return jax.make_array_from_process_local_data(sharding, x)
  return {key: one(key, x) for key, x in batch.items()}


def _on_tpu_vm() -> bool:
  """Heuristic, without touching the JAX backend (which must not start before initialize)."""
  if any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                   "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")):
    return True
  if glob.glob("/dev/accel[0-9]*"):
    return True
  # Google's PCI vendor id with the "processing accelerator" class (gVNIC shares the vendor).
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "class")) as g:
        if f.read().strip() == "0x1ae0" and g.read().strip().startswith("0x12"):
          return True
    except OSError:
      continue
  return False


def _launched_multiprocess() -> bool:
  """Under a launcher that JAX's cluster detection understands, with more than one task."""
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(var, "1") or 1) > 1:
      return True
  return False


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """`jax.distributed.initialize()` when this is a multi-process run; a no-op otherwise.

  It runs when any argument is given (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` are set), on a Cloud TPU VM (single- or multi-host: JAX discovers the
  slice), or under SLURM / Open MPI with more than one task. Call it before any other JAX
  call. Returns whether JAX is now running distributed.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  configured = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if not (configured or _on_tpu_vm() or _launched_multiprocess()):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True
