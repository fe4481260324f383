"""NVIDIA GPU targets for the fit planner, compiled for without a GPU.

`gpu_devices("8xh100-80gb")` describes 8 H100s to XLA's GPU compiler (the CUDA PJRT plugin's
deviceless topology: a text `GpuTargetConfigProto` per device kind, no driver, no CUDA
libraries), so `jax.jit(f).lower(...abstract inputs on a mesh over those devices...).compile()`
runs the real GPU compiler (SPMD partitioning, fusion, Triton GEMM tiling, buffer assignment,
scheduling) on this machine's CPU. `jaxlm/plan.py` reads memory, FLOPs and collectives back.

Names, as on the command line (`tools/plan.py --target=...`):

| name | devices | memory XLA's allocator may use per device (default) |
|---|---|---|
| `h100-80gb`, `8xh100-80gb` | H100 SXM5 80 GB (HBM3), 132 SMs, sm_90a | 0.75 x 79.11 GiB = 59.33 GiB |
| `a100-80gb`, `8xa100-80gb` | A100 SXM4 80 GB, 108 SMs, sm_80 | 0.75 x 79.26 GiB = 59.44 GiB |
| `h200`, `8xh200` | H200 SXM 141 GB (HBM3e), 132 SMs, sm_90a | 0.75 x 141.0 GiB = 105.75 GiB |

`<N>x<gpu>`: N GPUs, N <= 8 on one host (an HGX board has 8, NVLinked), more in hosts of 8
(`16xh100-80gb`: 2 hosts). A bare name is one GPU (`1xh100-80gb` too).

The memory, honestly: a GPU compile never fails for want of memory (XLA's TPU compiler does),
so the planner compares the compiled peak with a budget, and the budget is what a *default*
JAX run can hold, not the HBM on the box:

* `device_memory_size` is the device's total as CUDA reports it (`cuDeviceTotalMem`, what
  XLA's own target specs `xla/backends/gpu/target_config/specs/{h100_sxm,a100_sxm_80,h200}.txtpb`
  record): the HBM less what the driver keeps (ECC, firmware): 79.11 GiB of an H100's 80 GiB.
* JAX's GPU client puts every array and every program's temporaries in one BFC pool of
  `XLA_PYTHON_CLIENT_MEM_FRACTION` (or `XLA_CLIENT_MEM_FRACTION`) x that total, default 0.75.
  That fraction is a cap, not just a preallocation: with `XLA_PYTHON_CLIENT_PREALLOCATE=false`
  the pool grows only up to the same size (XLA logs "XLA backend will use up to N bytes"; jax
  0.10's plugin has no policy that grows past it). The quarter left outside serves the CUDA
  context (~0.5 GiB), NCCL's communicators and buffers, loaded kernels and CUDA graphs, which
  the compiled program's memory analysis does not count.
* So the default budget is 0.75 x total. Plan with the fraction the run will use by setting the
  same variable for the planner (`XLA_PYTHON_CLIENT_MEM_FRACTION=.9 tools/plan.py ...`: a
  dedicated GPU usually takes .9 or more), or give the budget directly (`--memory_gib`). With
  `XLA_PYTHON_CLIENT_ALLOCATOR=platform` there is no pool: the cap is the free memory, about the
  total less ~1 GiB; say so with `--memory_gib`.
* The budget holds the program's own buffers (arguments + outputs + temporaries - donated, as
  `memory_analysis` reports them, cuBLAS workspaces included); arrays the host loop keeps on the
  device besides (a prefetched batch, a second copy of the weights) come on top, and the BFC
  pool fragments a little.
* XLA's GPU compiler has its own limit too, from `device_memory_size`: a program over ~0.76 x
  the total is rematerialized (recomputed, more FLOPs) until it fits or nothing more helps
  (stderr: "Can't reduce memory use below 60.18GiB ... by rematerialization" on an H100). So
  the device total must be the real one: it changes the program, as it would on the GPU.

Needs the `gpu-plan` extra (`pip install -e ".[gpu-plan]"`: jax-cuda12-plugin + jax-cuda12-pjrt,
~180 MB download, ~480 MB installed; not the nvidia-* CUDA libraries, which a compile does not
load) and `JAX_PLATFORMS=cpu` in the environment before JAX starts (`tools/plan.py` and the
tests set it): without a GPU and without that, the plugin's CUDA version check fails at start-up
and the plugin is not registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
from typing import Any

from jaxlm import errors

GIB = 2**30
DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU client when XLA_PYTHON_CLIENT_MEM_FRACTION is unset
GPUS_PER_HOST = 8  # HGX / DGX boards: 8 GPUs on NVLink per host
INSTALL_HINT = 'pip install -e ".[gpu-plan]"'
_PLUGIN_MODULE = "jax_plugins.xla_cuda12"  # what jax-cuda12-plugin installs; JAX discovers it by name


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """One NVIDIA device kind, as XLA's GPU compiler needs to know it.

  The figures are XLA's own target specs (openxla/xla,
  `xla/backends/gpu/target_config/specs/*.txtpb`, recorded from real devices by StreamExecutor),
  cut to the fields this jax's `GpuDeviceInfoProto` accepts; they steer fusion, Triton tiling
  (shared memory), the cost model (bandwidth, clocks, SMs) and the scheduler's and
  rematerialization's memory limit (`memory_bytes`).
  """

  device_kind: str  # the name CUDA reports, e.g. "NVIDIA H100 80GB HBM3" (`jax.Device.device_kind`)
  sm_count: int  # streaming multiprocessors ("cores" to XLA)
  compute_capability: tuple[int, int]  # (major, minor): sm_90 for H100 / H200, sm_80 for A100
  accelerated_features: bool  # sm_90a (wgmma, TMA): what XLA compiles for on a real Hopper
  memory_bytes: int  # device total as CUDA reports it (cuDeviceTotalMem), bytes
  memory_bandwidth: int  # HBM, bytes / s
  l2_cache_bytes: int
  clock_rate_ghz: float  # SM boost clock
  fpus_per_core: int  # FP32 lanes per SM
  shared_memory_per_core: int  # bytes per SM
  shared_memory_per_block_optin: int  # bytes a block may opt in to
  dnn_version: tuple[int, int, int]  # cuDNN the plan assumes (jax 0.10's CUDA 12 wheels: 9.8+)
  about: str  # for people: board, HBM, where the figures come from

  def target_config(self) -> str:
    """The device as a text-format `stream_executor.GpuTargetConfigProto` (the plugin's
    `target_config` topology option). Fields this jax's proto lacks (e.g.
    `collective_memory_granularity`, newer than the plugin) are left out: the parse is strict."""
    major, minor = self.compute_capability
    extension = " feature_extension: ACCELERATED_FEATURES" if self.accelerated_features else ""
    dnn_major, dnn_minor, dnn_patch = self.dnn_version
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor}{extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  name: "{self.device_kind}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}
device_description_str: "{self.device_kind}"
"""


# The device kinds by command-line name. Figures: XLA's specs h100_sxm.txtpb, a100_sxm_80.txtpb,
# h200.txtpb (see GpuSpec); cuDNN 9.8: what jax 0.10.2's CUDA 12 plugin was built against.
GPU_TARGETS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec(
        device_kind="NVIDIA H100 80GB HBM3", sm_count=132, compute_capability=(9, 0), accelerated_features=True,
        memory_bytes=84_942_979_072, memory_bandwidth=3_352_320_000_000, l2_cache_bytes=52_428_800,
        clock_rate_ghz=1.98, fpus_per_core=128, shared_memory_per_core=233_472,
        shared_memory_per_block_optin=232_448, dnn_version=(9, 8, 0),
        about="H100 SXM5 80 GB HBM3 (HGX / DGX H100); not the PCIe card (114 SMs) or H100 NVL (94 GB)"),
    "a100-80gb": GpuSpec(
        device_kind="NVIDIA A100-SXM4-80GB", sm_count=108, compute_capability=(8, 0), accelerated_features=False,
        memory_bytes=85_100_068_864, memory_bandwidth=2_039_040_000_000, l2_cache_bytes=41_943_040,
        clock_rate_ghz=1.41, fpus_per_core=64, shared_memory_per_core=167_936,
        shared_memory_per_block_optin=166_912, dnn_version=(9, 8, 0),
        about="A100 SXM4 80 GB HBM2e (HGX / DGX A100)"),
    "h200": GpuSpec(
        device_kind="NVIDIA H200 141GB HBM3e", sm_count=132, compute_capability=(9, 0), accelerated_features=True,
        memory_bytes=151_397_597_184, memory_bandwidth=4_800_000_000_000, l2_cache_bytes=52_428_800,
        clock_rate_ghz=1.98, fpus_per_core=128, shared_memory_per_core=233_472,
        shared_memory_per_block_optin=232_448, dnn_version=(9, 8, 0),
        about="H200 SXM 141 GB HBM3e (HGX H200): an H100 with more and faster memory"),
}
_NAME = re.compile(r"(?:(\d+)x)?([a-z0-9-]+)")


def example_names() -> list[str]:
  """Every device kind once alone and once as an 8-GPU host, for help texts and errors."""
  return [*GPU_TARGETS, *(f"8x{name}" for name in GPU_TARGETS)]


def parse_name(name: str) -> tuple[int, GpuSpec] | None:
  """`"8xh100-80gb"` -> (8, the H100 spec); None when `name` is not a GPU target at all (so a
  planner can try its other kinds first). A known GPU with a bad count is a `UserError`."""
  match = _NAME.fullmatch(name.strip().lower())
  if not match or match.group(2) not in GPU_TARGETS:
    return None
  count = int(match.group(1) or 1)
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise errors.UserError(f"--target={name}: {count} GPUs; expected 1 to {GPUS_PER_HOST} (one host) or a "
                           f"multiple of {GPUS_PER_HOST} (hosts of {GPUS_PER_HOST}), e.g. 8x{match.group(2)}")
  return count, GPU_TARGETS[match.group(2)]


def is_gpu_name(name: str) -> bool:
  """Whether `name` names a GPU target (known device kind; the count is checked later)."""
  match = _NAME.fullmatch(name.strip().lower())
  return bool(match and match.group(2) in GPU_TARGETS)


def memory_fraction() -> tuple[float, str]:
  """(fraction, where it comes from): the share of a device's memory JAX's GPU allocator may use,
  as the run will read it: `XLA_CLIENT_MEM_FRACTION` or its older name
  `XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75."""
  for variable in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    raw = os.environ.get(variable)
    if not raw:
      continue
    try:
      fraction = float(raw)
    except ValueError:
      fraction = float("nan")
    if not 0 < fraction <= 1:
      raise errors.UserError(f"{variable}={raw}: expected a fraction in (0, 1], e.g. .9; the planner budgets "
                             "that share of each GPU's memory, as the run's allocator will")
    return fraction, variable
  return DEFAULT_MEM_FRACTION, "JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION"


def plugin_installed() -> bool:
  """Whether the CUDA PJRT plugin (the `gpu-plan` extra) is importable."""
  try:
    return importlib.util.find_spec(_PLUGIN_MODULE) is not None
  except ModuleNotFoundError:  # no `jax_plugins` namespace at all
    return False


def _topology_shape(count: int) -> str:
  """The plugin's `topology` option, "<partitions>x<hosts per partition>x<devices per host>"."""
  return f"1x1x{count}" if count <= GPUS_PER_HOST else f"1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def gpu_devices(name: str) -> tuple[tuple[Any, ...], float, str]:
  """The compile-only devices, memory budget and description of a GPU target name.

  Args:
    name: `<gpu>` or `<N>x<gpu>`, e.g. "h100-80gb", "8xh100-80gb", "h200" (`GPU_TARGETS`).

  Returns:
    (devices, memory_bytes, description): N `jax.Device`s of platform "gpu" that can be given
    to `jax.make_mesh` / shardings and compiled for, never run on; the bytes per device JAX's
    allocator may use (`memory_fraction()` x the device total); and a line for people.

  Raises:
    errors.UserError: an unknown name or count, the plugin missing (names the install), or the
      plugin installed but not started (JAX_PLATFORMS).
  """
  parsed = parse_name(name)
  if parsed is None:
    raise errors.UserError(f"--target={name}: not a GPU target; expected <gpu> or <N>x<gpu> with <gpu> one of "
                           f"{', '.join(GPU_TARGETS)}{errors.did_you_mean(name, example_names())}")
  count, spec = parsed
  if not plugin_installed():
    raise errors.UserError(f"--target={name}: compiling for NVIDIA GPUs without one needs JAX's CUDA plugin "
                           f"(the compiler only, ~480 MB installed): {INSTALL_HINT}")
  fraction, source = memory_fraction()  # Before the topology: a bad value fails fast.
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    devices = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=spec.target_config(),
                                           topology=_topology_shape(count)).devices
  except NotImplementedError:
    # The plugin is installed but JAX did not register it: its start-up CUDA version check
    # fails on a machine without CUDA unless JAX_PLATFORMS leaves CUDA out.
    raise errors.UserError(f"--target={name}: JAX's CUDA plugin is installed but did not start (no CUDA on this "
                           "machine); set JAX_PLATFORMS=cpu before JAX starts (tools/plan.py does) so it is "
                           "loaded for compiling only") from None
  except Exception as e:  # pylint: disable=broad-except  # A plugin of another jax version, a bad proto.
    raise errors.UserError(f"--target={name}: JAX's CUDA plugin cannot describe {count} x {spec.device_kind} "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); it must match jax's "
                           f"version: {INSTALL_HINT}") from None
  memory = fraction * spec.memory_bytes
  major, minor = spec.compute_capability
  description = (f"{count} x {spec.device_kind} ({spec.sm_count} SMs, sm_{major}{minor}"
                 f"{'a' if spec.accelerated_features else ''}); {memory / GIB:.2f} GiB per device = "
                 f"{fraction:g} ({source}) x {spec.memory_bytes / GIB:.2f} GiB")
  return tuple(devices), memory, description


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program: {"flops": per device, "bytes accessed": ...}.

  `compiled.cost_analysis()` is None for programs compiled for a deviceless GPU topology (the
  plugin's compile-only executable carries none), so those are analysed by XLA's generic
  `HloCostAnalysis` on the optimized HLO module, through the CPU client. That counts the dots
  inside Triton GEMM fusions (every matmul of our programs on sm_80 / sm_90 deviceless) and the
  elementwise work, and a while loop's body once, like the built-in analysis. It marks each
  custom call "unknown" with -1 FLOPs and -1 bytes; those are undone here, and cuDNN flash
  attention calls (`__cudnn$fmha*`) get their matmuls' FLOPs (`fmha_flops`). Other custom
  calls count 0. {} when neither analysis is available (another jax's private API).
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost:
    return dict(cost)
  try:
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

    modules = compiled.runtime_executable().hlo_modules()
    cost = dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, modules[0]))
  except (AttributeError, IndexError, RuntimeError):
    return {}
  calls = re.findall(r"^.* custom-call\(.*$", compiled.as_text(), flags=re.MULTILINE)
  for key in ("flops", "bytes accessed"):
    if key in cost:
      cost[key] += len(calls)  # HloCostAnalysis's -1 per custom call ("unknown")
  cost["flops"] = cost.get("flops", 0.0) + sum(fmha_flops(line) for line in calls)
  return cost


def fmha_flops(hlo_line: str) -> float:
  """FLOPs a cuDNN flash-attention custom call executes (0 for any other line of HLO text).

  With B batch, N heads, T queries, S keys, H head dim: the forward runs 2 matmuls (Q K^T,
  P V), 4 B N T S H; the backward 5 (it recomputes Q K^T, then dV, dP, dQ, dK), 10 B N T S H.
  A causal mask skips the upper triangle's tiles: half. Softmax and scaling are left out, as
  in the model's FLOPs formula (`model.flops_per_token`, whose forward + backward is 12, not
  the 14 executed here: it does not count the recomputation).
  """
  if 'custom_call_target="__cudnn$fmha' not in hlo_line:
    return 0.0
  scores = re.search(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]', hlo_line)
  result = re.search(r"=\s*\(?[a-z0-9]+\[([\d,]+)\]", hlo_line)
  if not scores or not result:
    return 0.0
  b, n, t, s = (int(d.strip(' "')) for d in scores.group(1).split(","))
  head_dim = int(result.group(1).split(",")[-1])
  matmuls = 5 if "Backward" in hlo_line else 2
  causal = 0.5 if '"mask_type": "CAUSAL"' in hlo_line or '"mask_type":"CAUSAL"' in hlo_line else 1.0
  return 2.0 * matmuls * b * n * t * s * head_dim * causal


@contextlib.contextmanager
def deviceless_cudnn(name: str):
  """Lets `jax.nn.dot_product_attention(..., implementation="cudnn")` lower for GPU target `name`.

  jax decides in Python, while tracing, whether cuDNN attention is possible: it asks the cuDNN
  library of *this* process for its version (absent: the `gpu-plan` extra has no nvidia-*
  libraries; "RuntimeError: cuDNN not found.") and the *default backend* (here the CPU) for its
  compute capability. Inside this context both questions are answered for the target instead
  (its `GpuSpec.dnn_version` and `compute_capability`); XLA's GPU compiler then compiles the
  `__cudnn$fmha*` custom calls deviceless. A no-op for names that are not GPU targets, so a
  planner can wrap every lowering in it. Lower (`.lower(...)`) inside the context; compiling
  may happen after.

  Caveats: without a device the custom calls get no cuDNN workspace (`u8[0]`); on a GPU XLA
  sizes one with cuDNN, which this plan does not count. The answers replace jax's private
  checks process-wide while the context is open (not thread-safe).
  """
  parsed = parse_name(name) if is_gpu_name(name) else None
  if parsed is None:
    yield
    return
  spec = parsed[1]
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel

  major, minor, patch = spec.dnn_version
  capability = lambda text: tuple(int(x) for x in text.split("."))
  answers = {
      "check_cudnn_version": lambda: major * 10_000 + minor * 100 + patch,  # cuDNN 9's encoding: 90800
      "check_compute_capability": lambda text: spec.compute_capability >= capability(text),
      "is_cuda_compute_capability_equal": lambda text: spec.compute_capability == capability(text),
  }
  saved = {attr: getattr(fa, attr) for attr in answers if hasattr(fa, attr)}
  try:
    for attr in saved:
      setattr(fa, attr, answers[attr])
    yield
  finally:
    for attr, value in saved.items():
      setattr(fa, attr, value)
