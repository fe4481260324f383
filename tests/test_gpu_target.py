"""jaxlm/gpu_target.py: NVIDIA GPU targets compiled for without a GPU.

The first tests run in the base install (names, budgets, the error that names the extra, the
cost-analysis corrections); the ones marked by the `plugin` fixture need JAX's CUDA plugin
(`pip install -e ".[gpu-plan]"`) and are skipped without it.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import errors
from jaxlm import gpu_target

from conftest import ROOT

GIB = 2**30


# ---------------------------------------------------------------------------- base install ----


@pytest.mark.parametrize("name, count, kind", [
    ("h100-80gb", 1, "NVIDIA H100 80GB HBM3"),
    ("1xh100-80gb", 1, "NVIDIA H100 80GB HBM3"),
    ("8xh100-80gb", 8, "NVIDIA H100 80GB HBM3"),
    ("8xa100-80gb", 8, "NVIDIA A100-SXM4-80GB"),
    ("H200", 1, "NVIDIA H200 141GB HBM3e"),
    ("16xh200", 16, "NVIDIA H200 141GB HBM3e"),
])
def test_names_give_a_count_and_a_device_kind(name, count, kind):
  parsed_count, spec = gpu_target.parse_name(name)
  assert (parsed_count, spec.device_kind) == (count, kind) and gpu_target.is_gpu_name(name)


@pytest.mark.parametrize("name", ["cpu:8", "v5e-8", "h100", "8xcpu", ""])
def test_other_names_are_not_gpu_targets(name):
  assert gpu_target.parse_name(name) is None and not gpu_target.is_gpu_name(name)


@pytest.mark.parametrize("name", ["12xh100-80gb", "0xh100-80gb"])
def test_a_count_that_no_host_layout_gives_is_a_user_error(name):
  with pytest.raises(errors.UserError, match="expected 1 to 8 .* or a multiple of 8"):
    gpu_target.parse_name(name)


def test_hosts_of_eight_make_the_topology():
  assert [gpu_target._topology_shape(n) for n in (1, 8, 16, 64)] == ["1x1x1", "1x1x8", "1x2x8", "1x8x8"]


def test_an_unknown_gpu_says_what_is_known(monkeypatch):
  monkeypatch.setattr(gpu_target, "plugin_installed", lambda: True)
  with pytest.raises(errors.UserError, match=r"h100-80gb, a100-80gb, h200.*did you mean .*h100-80gb"):
    gpu_target.gpu_devices("h100")


def test_without_the_plugin_the_error_names_the_extra(monkeypatch):
  monkeypatch.setattr(gpu_target.importlib.util, "find_spec", lambda name: None)
  assert not gpu_target.plugin_installed()
  with pytest.raises(errors.UserError, match=r'pip install -e "\.\[gpu-plan\]"'):
    gpu_target.gpu_devices("8xh100-80gb")


def test_a_plugin_that_did_not_start_asks_for_jax_platforms_cpu(monkeypatch):
  """Installed, but JAX skipped it (its CUDA version check failed at start-up): JAX says
  "topology not implemented for cuda"; the user is told how to start it for compiling."""
  from jax.experimental import topologies

  monkeypatch.setattr(gpu_target, "plugin_installed", lambda: True)

  def not_registered(**kwargs):
    raise NotImplementedError("topology not implemented for cuda")

  monkeypatch.setattr(topologies, "get_topology_desc", not_registered)
  with pytest.raises(errors.UserError, match="JAX_PLATFORMS=cpu"):
    gpu_target.gpu_devices("h100-80gb")


def test_the_budget_is_the_allocators_share_of_the_device(monkeypatch):
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert gpu_target.memory_fraction() == (0.75, "JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  assert gpu_target.memory_fraction() == (0.9, "XLA_PYTHON_CLIENT_MEM_FRACTION")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "90")
  with pytest.raises(errors.UserError, match=r"XLA_PYTHON_CLIENT_MEM_FRACTION=90: expected a fraction"):
    gpu_target.memory_fraction()


def test_device_memory_is_cudas_total_a_little_under_the_nominal_size():
  for name, nominal_gib in [("h100-80gb", 80), ("a100-80gb", 80), ("h200", 141)]:
    total = gpu_target.GPU_TARGETS[name].memory_bytes / GIB
    assert nominal_gib * 0.97 < total <= nominal_gib + 0.01, name


def test_the_target_config_carries_the_device():
  text = gpu_target.GPU_TARGETS["h100-80gb"].target_config()
  for field in ("core_count: 132", "device_memory_size: 84942979072", "major: 9 minor: 0",
                "ACCELERATED_FEATURES", 'name: "NVIDIA H100 80GB HBM3"', 'platform_name: "CUDA"'):
    assert field in text
  assert "ACCELERATED_FEATURES" not in gpu_target.GPU_TARGETS["a100-80gb"].target_config()
  # A field this jax's proto lacks makes the plugin refuse the whole config.
  assert "collective_memory_granularity" not in text


def test_cudnn_attention_flops_come_from_the_custom_calls_shapes():
  b, n, t, h = 2, 4, 128, 64
  scores = f'"intermediate_tensor_shape": {{"element_type": "BF16", "dimensions": ["{b}", "{n}", "{t}", "{t}"]'
  forward = (f'  %fwd = (bf16[{b},{n},{t},{h}]{{3,1,2,0}}, f32[{b},{n},{t}]{{2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, '
             f'%v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={{{scores}, "mask_type": "CAUSAL"}}')
  backward = forward.replace("fmhaSoftmax", "fmhaSoftmaxBackward").replace('"CAUSAL"', '"NO_MASK"')
  assert gpu_target.fmha_flops(forward) == 4 * b * n * t * t * h / 2
  assert gpu_target.fmha_flops(backward) == 10 * b * n * t * t * h
  assert gpu_target.fmha_flops("%d = f32[8] add(%a, %b)") == 0


def test_deviceless_cudnn_answers_for_the_target_and_restores_jax():
  from jax._src.cudnn import fused_attention_stablehlo as fa

  before = fa.check_cudnn_version, fa.check_compute_capability
  with gpu_target.deviceless_cudnn("8xh100-80gb"):
    assert fa.check_cudnn_version() == 90800
    assert fa.check_compute_capability("9.0") and not fa.check_compute_capability("10.0")
  with gpu_target.deviceless_cudnn("a100-80gb"):
    assert fa.check_compute_capability("8.0") and not fa.check_compute_capability("9.0")
  with gpu_target.deviceless_cudnn("cpu:8"):  # Not a GPU target: nothing changes.
    assert (fa.check_cudnn_version, fa.check_compute_capability) == before
  assert (fa.check_cudnn_version, fa.check_compute_capability) == before


# ------------------------------------------------------- with the CUDA plugin (gpu-plan) ----


@pytest.fixture(scope="module")
def plugin():
  pytest.importorskip("jax_plugins.xla_cuda12", reason='needs pip install -e ".[gpu-plan]"')
  assert os.environ.get("JAX_PLATFORMS") == "cpu"  # conftest: the plugin starts for compiling only


@pytest.mark.parametrize("name, count", [("h100-80gb", 1), ("8xh100-80gb", 8), ("8xa100-80gb", 8), ("h200", 1),
                                         ("16xh100-80gb", 16)])
def test_gpu_devices_are_the_targets_compile_only_devices(plugin, name, count, monkeypatch):
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  devices, memory, description = gpu_target.gpu_devices(name)
  _, spec = gpu_target.parse_name(name)
  assert len(devices) == count and {d.platform for d in devices} == {"gpu"}
  assert {d.device_kind for d in devices} == {spec.device_kind}
  assert memory == 0.75 * spec.memory_bytes and f"{count} x {spec.device_kind}" in description


def test_a_sharded_program_compiles_with_memory_and_flops_per_device(plugin):
  devices, _, _ = gpu_target.gpu_devices("8xh100-80gb")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=rows)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  w = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=replicated)
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w).sum()).lower(x, w).compile()
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes == (1024 // 8 * 512 + 512 * 256) * 2  # one row block + the weights
  assert compiled.cost_analysis() is None  # what the fallback is for
  flops = gpu_target.cost_analysis(compiled)["flops"]
  assert 2 * 1024 // 8 * 512 * 256 <= flops < 1.1 * 2 * 1024 // 8 * 512 * 256
  assert "all-reduce" in compiled.as_text()


def test_cudnn_flash_attention_compiles_inside_deviceless_cudnn(plugin):
  devices, _, _ = gpu_target.gpu_devices("h100-80gb")
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(devices[0]))
  attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  grad = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  with pytest.raises(RuntimeError, match="cuDNN"):  # jax asks this process's (absent) cuDNN library
    grad.lower(q, q, q)
  with gpu_target.deviceless_cudnn("h100-80gb"):
    lowered = grad.lower(q, q, q)
  compiled = lowered.compile()
  assert "__cudnn$fmhaSoftmaxBackward" in compiled.as_text()
  flops = gpu_target.cost_analysis(compiled)["flops"]
  assert flops == pytest.approx((4 + 10) * 2 * 4 * 256 * 256 * 64 / 2, rel=0.05)


def test_the_tiny_pretrain_step_compiles_for_eight_h100s(plugin):
  from jaxlm import cli
  from jaxlm import plan

  config = cli.load_config(os.path.join(ROOT, "configs/pretrain.py:tiny"))
  devices, memory, description = gpu_target.gpu_devices("8xh100-80gb")
  report = plan.plan_train_step(config, plan.Target("8xh100-80gb", devices, memory, description), vocab_size=512)
  assert report.fits and 0 < report.peak_bytes < 0.1 * GIB
  assert report.alias_bytes > 0.9 * report.argument_bytes  # the state is donated on GPU too
  assert report.collectives["all-reduce"][0] >= 1  # data parallel: the gradients are all-reduced
