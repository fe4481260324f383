"""The attention kernels: choosing one per backend, and each equal to the XLA path.

The splash kernel runs here in Pallas interpret mode (the same kernel code, executed by XLA:CPU).
cuDNN cannot run on a CPU: its tests check the translation of segment ids into cuDNN's packed
layout against the XLA path, and that the model lowers for a GPU to cuDNN's fused kernels with
no dense mask.
"""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib

from jaxlm import attention
from jaxlm import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(batch, length, num_heads, num_kv_heads, head_dim=32, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, length, num_heads, head_dim), dtype),
          jax.random.normal(kk, (batch, length, num_kv_heads, head_dim), dtype),
          jax.random.normal(kv, (batch, length, num_kv_heads, head_dim), dtype))


def _attend(impl, q, k, v, segment_ids=None, branch_ids=None):
  return attention.attend(q, k, v, attention.training_mask(impl, segment_ids, branch_ids), impl=impl)


@functools.partial(jax.jit, static_argnames="impl")
def _out_and_grads(impl, q, k, v, segment_ids, cotangent):
  """The attention output and the gradients of <output, cotangent> for q, k, v."""
  def f(q, k, v):
    return _attend(impl, q, k, v, segment_ids)
  out, pullback = jax.vjp(f, q, k, v)
  return out, pullback(cotangent)


# Two documents and right padding in row 0 (200 tokens: padded to 256, two blocks of 128), one
# document in row 1.
SEGMENTS = jnp.array([[1] * 90 + [2] * 70 + [0] * 40, [1] * 200])


def test_rope_frequencies_and_tables():
  """Plain RoPE: f_i = theta^(-2i/Dh) to within an ulp of float32, 2i/Dh rounded to float32
  first as transformers does (its values for named models: tests/test_model_options.py); the
  tables hold sin and cos of p * f_i, positions clamped."""
  for head_dim, theta in ((8, 1e4), (96, 1e4), (128, 5e5)):
    inv_freq = attention.rope_frequencies(head_dim, theta)
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    exact = theta ** -exponents.astype(np.float64)
    assert inv_freq.dtype == np.float32
    np.testing.assert_array_max_ulp(inv_freq, exact.astype(np.float32), maxulp=1)
  linear = attention.rope_frequencies(8, 1e4, {"rope_type": "linear", "factor": 2.0})
  np.testing.assert_array_equal(linear, attention.rope_frequencies(8, 1e4) / np.float32(2))
  sin, cos = attention.rope_tables(jnp.array([[0, 3, 99]]), 8, 1e4, 10)
  angles = np.array([0, 3, 9], np.float32)[:, None] * attention.rope_frequencies(8, 1e4)
  np.testing.assert_allclose(sin[0], np.sin(angles), atol=1e-6)  # 99 clamped to 9
  np.testing.assert_allclose(cos[0], np.cos(angles), atol=1e-6)
  with pytest.raises(ValueError, match="yarn"):
    attention.rope_frequencies(8, 1e4, {"rope_type": "yarn", "factor": 2.0})


def test_resolve_picks_a_kernel_per_platform():
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("auto", "gpu") == attention.resolve("auto", "cuda") == "cudnn"
  assert attention.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
  assert attention.resolve("auto", "gpu", jnp.float32) == "xla"  # cuDNN flash takes bf16/fp16
  assert attention.resolve("auto", "rocm") == attention.resolve("auto", "cpu") == "xla"
  for impl in (None, "xla", "blocked", "cudnn", "splash"):
    assert attention.resolve(impl, "tpu") == impl  # a concrete choice is kept everywhere
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash", "tpu")


def test_kernel_for_falls_back_to_xla_where_a_fused_kernel_cannot_mask():
  choose = functools.partial(attention.kernel_for, dtype=jnp.bfloat16, segments=True)
  assert choose("auto", branches=False) == "xla"  # this process runs on a CPU
  assert choose(None, branches=False) == "xla"
  for impl in ("splash", "cudnn"):
    assert choose(impl, branches=False) == impl
    assert choose(impl, branches=True) == "xla"  # DPO's shared-prefix rows
  assert choose("blocked", branches=True) == "blocked"


@pytest.mark.parametrize("num_kv_heads, dtype, segment_ids", [
    (2, jnp.float32, SEGMENTS), (2, jnp.float32, None), (4, jnp.bfloat16, SEGMENTS)])
def test_splash_equals_the_xla_path_with_its_gradients(num_kv_heads, dtype, segment_ids):
  q, k, v = _qkv(2, 200, 4, num_kv_heads, dtype=dtype)
  cotangent = jax.random.normal(jax.random.key(1), q.shape, dtype)
  out, grads = _out_and_grads("splash", q, k, v, segment_ids, cotangent)
  ref_out, ref_grads = _out_and_grads("xla", q, k, v, segment_ids, cotangent)
  # bf16: the kernel folds 1/sqrt(Dh) into bf16 q and accumulates blockwise (online softmax).
  tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=5e-2, rtol=5e-2)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.float32(out), np.float32(ref_out), **tol)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(np.float32(g), np.float32(ref), **tol)


def _packed_mask(lengths, offsets, length):
  """Who may see whom in cuDNN's packed layout, read from its contract: token i and key j lie in
  one sequence m (offsets[m] <= j <= i < offsets[m] + lengths[m]), causal within it."""
  index = jnp.arange(length)
  def row(lengths, offsets):
    start, end = offsets[:-1, None], (offsets[:-1] + lengths)[:, None]
    inside = (lengths[:, None] > 0) & (start <= index) & (index < end)  # [M, T]
    return jnp.any(inside[:, :, None] & inside[:, None, :], axis=0)
  return jax.vmap(row)(lengths, offsets)[:, None] & (index[:, None] >= index[None, :])


def test_cudnn_segments_translate_to_the_masks_of_the_xla_path():
  # Packed documents, right padding, left padding, and padding on both sides (two runs of 0).
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 0, 0]])
  lengths, offsets, overflow = attention.cudnn_segments(segment_ids, 4)
  np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [2, 6, -1, -1], [1, 3, 2, 2]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, 2, -1, -1, -1], [0, 1, 4, 6, -1]])
  assert not overflow.any()
  q, k, v = _qkv(3, 8, 4, 2)
  # The same `jax.nn.dot_product_attention` call as the xla path, with cuDNN's mask instead.
  packed = jax.nn.dot_product_attention(q, k, v, mask=_packed_mask(lengths, offsets, 8),
                                        implementation="xla")
  reference = _attend("xla", q, k, v, segment_ids)
  real = np.asarray(segment_ids > 0)
  np.testing.assert_allclose(np.asarray(packed)[real], np.asarray(reference)[real], atol=1e-6)
  # Padding on one side is one run: equal there too.
  np.testing.assert_allclose(packed[:2], reference[:2], atol=1e-6)
  # More runs than slots are flagged (the kernel then returns NaN rather than mixing documents).
  np.testing.assert_array_equal(attention.cudnn_segments(segment_ids, 3)[2], [True, False, True])


@pytest.fixture
def fake_cudnn(monkeypatch):
  """cuDNN's lowering checks ask the local GPU for its cuDNN version and compute capability;
  answer as a Hopper GPU with cuDNN 9.10 would, so a program lowers for CUDA on this CPU."""
  monkeypatch.setattr(cudnn_lib, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_lib, "check_compute_capability", lambda capability: True)


@pytest.mark.parametrize("packed", [True, False])
def test_the_model_lowers_to_cudnn_flash_attention_without_a_dense_mask(fake_cudnn, packed):
  config = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=16, mlp_dim=48, max_len=64, dtype="bfloat16", attention_impl="cudnn")
  params = jax.eval_shape(lambda: nn.meta.unbox(model_lib.init_params(config, jax.random.key(0))))
  tokens = jnp.zeros((2, 64), jnp.int32)
  segment_ids = jnp.ones((2, 64), jnp.int32) if packed else None

  def loss(params):
    logits = model_lib.Transformer(config).apply({"params": params}, tokens, segment_ids=segment_ids).logits
    return jnp.sum(logits)

  text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
  assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text  # in the layer scan
  assert "Bias" not in text  # no mask turned into an additive bias
  assert "tensor<2x1x64x64xi1>" not in text  # and no dense [B, 1, T, T] mask at all


def test_splash_under_a_mesh_runs_per_device_and_equals_the_xla_model():
  """8 fake CPU devices (data 2 x fsdp 2 x tensor 2): the kernel runs on each device's rows and
  heads (shard_map); logits and gradients equal the one-device XLA model's."""
  script = textwrap.dedent("""
      import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      from jaxlm import model as model_lib, sharding
      config = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=16, mlp_dim=48, max_len=128)
      params = nn.meta.unbox(model_lib.init_params(config, jax.random.key(0)))
      tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, 61)
      segment_ids = jnp.array([[1] * 60 + [2] * 60 + [0] * 8] * 2 + [[1] * 128] * 2)
      def loss(params, config):
        out = model_lib.Transformer(config).apply({"params": params}, tokens, segment_ids=segment_ids)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]), out.logits
      grad = lambda config: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
      (ref_grads, ref_logits) = grad(config)(params, config)
      mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
      with sharding.use_mesh(mesh):
        grads, logits = grad(config.replace(attention_impl="splash"))(params, config.replace(attention_impl="splash"))
      np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, ref_grads)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
