"""Meshes, logical-axis rules, sharded init and sharded forward passes.

The multi-device checks run in a subprocess with 8 fake CPU devices: XLA reads the device
count once, when JAX first starts, and other test modules have started it already.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = model_lib.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=32)


def _logical_names(tree):
  boxes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return {name for box in boxes for name in box.names if name is not None}


def test_the_rules_cover_every_logical_name_the_model_uses():
  config = CONFIG.replace(tie_embeddings=False)
  abstract = jax.eval_shape(lambda r: model_lib.init_params(config, r, scalar_head=True),
                            jax.random.key(0))
  cache_names = {n for names in model_lib.CACHE_AXES.values() for n in names}
  used = _logical_names(abstract) | cache_names | {"batch", "length"}
  assert used == set(sharding.LOGICAL_AXES)
  assert {name for name, _ in sharding.DEFAULT_RULES} == set(sharding.LOGICAL_AXES)
  mesh_axes = {a for _, axes in sharding.DEFAULT_RULES if axes
               for a in ((axes,) if isinstance(axes, str) else axes)}
  assert mesh_axes == set(sharding.MESH_AXES)


def test_make_mesh_fills_one_axis_and_explains_bad_shapes():
  n = len(jax.devices())
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh({"data": n + 1})
  with pytest.raises(ValueError, match="do not divide"):
    sharding.make_mesh({"data": -1, "tensor": n + 1})
  with pytest.raises(ValueError, match="one may be -1"):
    sharding.make_mesh({"data": -1, "tensor": -1})
  with pytest.raises(ValueError, match="positive"):
    sharding.make_mesh({"data": 0})


def test_rules_drop_mesh_axes_the_mesh_lacks():
  mesh = sharding.make_mesh({"data": -1})
  rules = dict(sharding.mesh_rules(sharding.DEFAULT_RULES, mesh))
  assert rules["batch"] == ("data",) and rules["embed"] is None and rules["heads"] is None
  # So the default rules work on a data-only mesh.
  abstract = jax.eval_shape(lambda r: model_lib.init_params(CONFIG, r), jax.random.key(0))
  shardings = sharding.logical_shardings(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(sharding.unbox(abstract))


def test_shard_host_batch_on_one_process():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  host = {"inputs": np.arange(12, dtype=np.int32).reshape(2, 6), "valid": np.ones(2, bool)}
  batch = sharding.shard_host_batch(host, mesh)
  for key in host:
    np.testing.assert_array_equal(batch[key], host[key])
    assert batch[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh), host[key].ndim)
  with pytest.raises(ValueError, match="leading B axis"):
    sharding.shard_host_batch({"step": np.int32(3)}, mesh)


def test_maybe_initialize_distributed_is_a_no_op_on_a_plain_host(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
              "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(sharding, "_on_tpu_vm", lambda: False)
  assert sharding.maybe_initialize_distributed() is False
  assert not jax.distributed.is_initialized()


# Runs with 8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2.
EIGHT_DEVICES = textwrap.dedent("""
  import functools
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from jaxlm import model as model_lib, sharding

  assert len(jax.devices()) == 8
  assert dict(sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  try:
    sharding.make_mesh({"data": 3, "fsdp": -1})
    raise AssertionError("3 does not divide 8")
  except ValueError as e:
    assert "do not divide" in str(e)

  config = model_lib.ModelConfig(**CONFIG_DICT)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = jax.random.key(0)
  init_fn = functools.partial(model_lib.init_params, config, scalar_head=True)

  # An odd vocabulary cannot split over `tensor`: a clear error, before anything is allocated.
  odd = jax.eval_shape(functools.partial(model_lib.init_params, config.replace(vocab_size=61)),
                       rng)
  try:
    sharding.logical_shardings(odd, mesh)
    raise AssertionError("vocab 61 over tensor=2 should not be accepted")
  except ValueError as e:
    assert "vocab=61" in str(e) and "embedding" in str(e), e

  # State created already sharded, with exactly the declared shardings.
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding.logical_shardings(abstract, mesh)
  params = jax.jit(lambda r: sharding.unbox(init_fn(r)), out_shardings=shardings)(rng)
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert shardings["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert shardings["layers"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
  # FSDP really splits the state: each device holds 1/8 of the q kernel (fsdp x tensor).
  q = params["layers"]["attn"]["q"]["kernel"]
  assert q.addressable_shards[0].data.size == q.size // 4

  # The same weights on one device, as the reference.
  host_params = jax.device_get(params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size),
                      np.int32)
  segment_ids = np.ones((8, 16), np.int32)
  segment_ids[:, 11:] = 0
  host = {"tokens": tokens, "segment_ids": segment_ids, "index": np.full((8,), 10, np.int32)}

  def loss_fn(p, batch):
    out = model_lib.Transformer(config).apply(
        {"params": p}, batch["tokens"], segment_ids=batch["segment_ids"],
        scalar_index=batch["index"])
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["segment_ids"][:, 1:] > 0
    return jnp.sum(nll * mask) / jnp.sum(mask) + jnp.mean(out.scalar ** 2), out.logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (ref_loss, ref_logits), ref_grads = jax.jit(grad_fn)(host_params, host)

  batch = sharding.shard_host_batch(host, mesh)
  with sharding.use_mesh(mesh):
    step = jax.jit(grad_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=((None, None), shardings))
    (loss, logits), grads = step(params, batch)
    text = step.lower(params, batch).as_text()
  assert "sharding_constraint" in text  # the activation constraints took effect
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
               jax.device_get(grads), ref_grads)
  for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(shardings)):
    assert g.sharding.is_equivalent_to(s, g.ndim)

  # The cached decode path under the same mesh, with the cache sharded by its logical names.
  cache = model_lib.init_cache(config, 8, max_len=16)
  cache_shardings = {k: sharding.named_sharding(mesh, names, shape=cache[k].shape)
                     for k, names in model_lib.CACHE_AXES.items()}
  cache = jax.device_put(cache, cache_shardings)
  positions = np.tile(np.arange(16, dtype=np.int32), (8, 1))
  def prefill(p, c, t, pos, seg):
    return model_lib.Transformer(config).apply({"params": p}, t, positions=pos, segment_ids=seg,
                                               cache=c).logits
  with sharding.use_mesh(mesh):
    cached = jax.jit(prefill)(params, cache, batch["tokens"], positions, batch["segment_ids"])
  real = segment_ids > 0
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(ref_logits)[real], atol=2e-5)
  print("OK")
""")


def test_sharded_init_and_forward_on_eight_fake_devices():
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=path)
  script = EIGHT_DEVICES.replace("CONFIG_DICT", repr(CONFIG.to_dict()))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
