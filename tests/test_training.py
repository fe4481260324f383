"""Optimizer, train state, train/eval steps: exact accumulation, compile-once, sharding.

Every model here is tiny (2 layers, embed 32, vocab 64) and each jitted program is compiled
once per module (fixtures), since compiling is what costs time on a CPU. The multi-device
check runs in one subprocess with 8 fake CPU devices: XLA reads the device count once, when
JAX first starts, and this process has started it already.
"""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import param_tree
from jaxlm import sharding
from jaxlm import training

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = model_lib.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=32)
OPTIMIZER = dict(learning_rate=1e-2, total_steps=100, warmup_steps=5, schedule="cosine",
                 end_lr_fraction=0.1, weight_decay=0.1, grad_clip_norm=1.0)
B, L = 8, 16


def lm_batch(seed: int, batch: int = B, length: int = L, ragged: bool = True) -> dict:
  """An LM batch of random tokens; with `ragged`, rows hold 1 to 2 documents and padding, so
  that rows (and therefore microbatches) carry different numbers of trained tokens."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch, length), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
  out["loss_mask"] = np.zeros((batch, length), bool)
  for r in range(batch):
    used = length if not ragged else int(rng.integers(3, length + 1))
    cut = used if not ragged or r % 3 else int(rng.integers(1, used))  # every 3rd row: 2 docs
    start = 0
    for segment, end in enumerate(sorted({cut, used}), start=1):
      tokens = rng.integers(1, CONFIG.vocab_size, end - start + 1)
      sl = slice(start, end)
      out["inputs"][r, sl], out["targets"][r, sl] = tokens[:-1], tokens[1:]
      out["segment_ids"][r, sl], out["positions"][r, sl] = segment, np.arange(end - start)
      # The first document of a row is a "prompt": no loss on its first two targets.
      out["loss_mask"][r, sl] = True
      if segment == 1:
        out["loss_mask"][r, start:start + 2] = False
      start = end
  return out


@pytest.fixture(scope="module")
def setup():
  """The mesh, optimizer, a fresh state and the (donating) Adam train step, built once.

  `fresh()` gives a copy of the initial state, since each call of `step` consumes its input;
  `traces` counts how often the loss function was traced (only tracing runs Python code).
  """
  init_fn = functools.partial(model_lib.init_params, CONFIG)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx, schedule_fn = training.make_optimizer(**OPTIMIZER,
                                            params=jax.eval_shape(init_fn, jax.random.key(0)))
  state, shardings = training.create_train_state(init_fn, tx, jax.random.key(0), mesh)
  loss_fn = losses.lm_loss_fn(model_lib.Transformer(CONFIG))
  traces = []

  def counting_loss_fn(params, batch, rng):
    traces.append(1)
    return loss_fn(params, batch, rng)

  step = training.make_train_step(counting_loss_fn, tx, mesh=mesh, state_shardings=shardings,
                                  schedule_fn=schedule_fn)
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)
  return dict(init_fn=init_fn, mesh=mesh, tx=tx, schedule_fn=schedule_fn, state=state,
              shardings=shardings, loss_fn=loss_fn, step=step, traces=traces,
              fresh=lambda: copy(state))


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol),
               jax.device_get(a), jax.device_get(b))


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


def test_schedule_values():
  cosine = training.make_schedule(learning_rate=1e-3, total_steps=110, warmup_steps=10,
                                  schedule="cosine", end_lr_fraction=0.1)
  expected = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 5.5e-4, 110: 1e-4, 500: 1e-4}
  for step, lr in expected.items():
    np.testing.assert_allclose(cosine(step), lr, rtol=1e-5, err_msg=f"step {step}")
  linear = training.make_schedule(learning_rate=1e-3, total_steps=110, warmup_steps=10,
                                  schedule="linear", end_lr_fraction=0.0)
  np.testing.assert_allclose([linear(s) for s in (10, 35, 60, 110)], [1e-3, 7.5e-4, 5e-4, 0],
                             rtol=1e-5, atol=1e-9)
  constant = training.make_schedule(learning_rate=1e-3, total_steps=110, warmup_steps=0,
                                    schedule="constant")
  np.testing.assert_allclose([constant(s) for s in (0, 50, 200)], [1e-3] * 3, rtol=1e-6)
  # Traced steps work too (the step function calls it under jit).
  np.testing.assert_allclose(jax.jit(cosine)(jnp.int32(60)), 5.5e-4, rtol=1e-5)
  for bad in (dict(schedule="step"), dict(warmup_steps=200), dict(end_lr_fraction=2.0)):
    with pytest.raises(ValueError):
      training.make_schedule(**{**dict(learning_rate=1e-3, total_steps=110, warmup_steps=10),
                                **bad})


def test_weight_decay_skips_norms_and_decays_kernels_and_the_embedding(setup):
  # A batch with no trained token: the gradient is 0, so Adam's direction is exactly 0 and
  # the update is the decay alone, -lr(0) * weight_decay * p where p decays, 0 elsewhere.
  host = lm_batch(50)
  host["loss_mask"][:] = False
  before = jax.device_get(setup["state"].params)
  state, metrics = setup["step"](setup["fresh"](), training.shard_batch(host, setup["mesh"]))
  after = jax.device_get(state.params)
  assert float(metrics["tokens"]) == 0 and float(metrics["grad_norm"]) == 0
  assert float(metrics["loss"]) == 0
  factor = 1 - OPTIMIZER["learning_rate"] / OPTIMIZER["warmup_steps"] * OPTIMIZER["weight_decay"]
  np.testing.assert_allclose(after["embed"]["embedding"], factor * before["embed"]["embedding"],
                             rtol=1e-6)
  for name in ("q", "k", "v", "o"):
    np.testing.assert_allclose(after["layers"]["attn"][name]["kernel"],
                               factor * before["layers"]["attn"][name]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(after["layers"]["mlp"]["up"]["kernel"],
                             factor * before["layers"]["mlp"]["up"]["kernel"], rtol=1e-6)
  for norm in ("attn_norm", "mlp_norm"):
    np.testing.assert_array_equal(after["layers"][norm]["scale"], before["layers"][norm]["scale"])
  np.testing.assert_array_equal(after["final_norm"]["scale"], before["final_norm"]["scale"])
  # The scalar head's bias (reward model, value head) does not decay either; its kernel does.
  with_head = jax.eval_shape(functools.partial(model_lib.init_params, CONFIG, scalar_head=True),
                             jax.random.key(0))
  assert param_tree.decay_mask(with_head)["scalar_head"] == {"kernel": True, "bias": False}
  with pytest.raises(ValueError, match="grad_clip_norm"):
    training.make_optimizer(**{**OPTIMIZER, "grad_clip_norm": 0.0}, params=before)


# ---------------------------------------------------------------------------------------------
# Train state.
# ---------------------------------------------------------------------------------------------


def test_state_is_created_with_the_declared_shardings_and_matches_the_abstract_state(setup):
  state, shardings = setup["state"], setup["shardings"]
  abstract = training.abstract_train_state(setup["init_fn"], setup["tx"], setup["mesh"])
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for x, a, s in zip(jax.tree.leaves(state), jax.tree.leaves(abstract),
                     jax.tree.leaves(shardings)):
    assert (x.shape, x.dtype) == (a.shape, a.dtype)
    assert x.sharding.is_equivalent_to(s, x.ndim) and a.sharding == s
  assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
  # Adam's moments are initialised to zero and follow the parameters' tree.
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  assert not any(np.any(x) for x in jax.tree.leaves(adam.mu))


def test_state_round_trips_through_orbax_standard_save(setup, tmp_path):
  import orbax.checkpoint as ocp

  state = setup["state"]
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(0, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    abstract = training.abstract_train_state(setup["init_fn"], setup["tx"], setup["mesh"])
    restored = manager.restore(0, args=ocp.args.StandardRestore(abstract))
  assert isinstance(restored, training.TrainState)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(setup["shardings"])):
    assert x.sharding.is_equivalent_to(s, x.ndim)


# ---------------------------------------------------------------------------------------------
# Train step.
# ---------------------------------------------------------------------------------------------


def test_accumulation_over_uneven_microbatches_equals_one_big_batch(setup):
  mesh = setup["mesh"]
  host = lm_batch(0)
  # Microbatch i takes rows i, i + 4: their token counts differ, so averaging the four
  # microbatch means would weight tokens unequally.
  counts = [host["loss_mask"][i::4].sum() for i in range(4)]
  assert len(set(counts)) == 4, counts
  batch = training.shard_batch(host, mesh)
  step4 = training.make_train_step(setup["loss_fn"], setup["tx"], mesh=mesh,
                                   state_shardings=setup["shardings"],
                                   schedule_fn=setup["schedule_fn"], num_microbatches=4)
  state1, metrics1 = setup["step"](setup["fresh"](), batch)
  state4, metrics4 = step4(setup["fresh"](), batch)
  # After one step Adam's moments are (1 - b1) g and (1 - b2) g^2 of the clipped gradient g
  # (clipping scales g by a function of its norm, compared below as `grad_norm`): comparing
  # them compares the gradients themselves, which the parameters would not, since a first
  # Adam step moves every parameter by about lr * sign(g) whatever the gradient's scale.
  adam1, adam4 = state1.opt_state[1][0], state4.opt_state[1][0]
  _assert_trees_close(adam1.mu, adam4.mu, rtol=1e-5, atol=1e-9)
  _assert_trees_close(adam1.nu, adam4.nu, rtol=1e-5, atol=1e-12)
  _assert_trees_close(state1.params, state4.params, rtol=1e-5, atol=1e-7)
  for name in ("loss", "tokens", "accuracy", "grad_norm", "update_norm", "param_norm"):
    np.testing.assert_allclose(metrics1[name], metrics4[name], rtol=1e-5, err_msg=name)
  assert float(metrics1["tokens"]) == host["loss_mask"].sum()
  with pytest.raises(ValueError, match="microbatches"):
    step4(setup["fresh"](), training.shard_batch(lm_batch(1, batch=6), mesh))


def test_steps_per_call_equals_consecutive_single_steps(setup):
  mesh = setup["mesh"]
  hosts = [lm_batch(10), lm_batch(11)]
  state, single = setup["fresh"](), []
  for host in hosts:
    state, metrics = setup["step"](state, training.shard_batch(host, mesh))
    single.append(metrics)
  double_step = training.make_train_step(
      setup["loss_fn"], setup["tx"], mesh=mesh, state_shardings=setup["shardings"],
      schedule_fn=setup["schedule_fn"], steps_per_call=2, donate=False)
  double_state, stacked = double_step(setup["state"],
                                      training.shard_batch(hosts, mesh, steps_per_call=2))
  assert int(double_state.step) == int(state.step) == 2
  np.testing.assert_array_equal(double_state.rng, state.rng)
  _assert_trees_close(double_state.params, state.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(double_state.opt_state, state.opt_state, rtol=1e-5, atol=1e-6)
  assert set(stacked) == set(single[0])
  for name, values in stacked.items():
    assert values.shape == (2,), name
    np.testing.assert_allclose(values, [m[name] for m in single], rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="expected"):
    training.shard_batch(hosts[0], mesh, steps_per_call=2)


def test_metrics_learning_rate_and_the_loss_goes_down_on_a_repeated_batch(setup):
  state, step = setup["fresh"](), setup["step"]
  batch = training.shard_batch(lm_batch(20), setup["mesh"])
  history = []
  for _ in range(15):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  assert set(history[0]) == {"loss", "tokens", "grad_norm", "update_norm", "param_norm",
                             "learning_rate", "accuracy"}
  np.testing.assert_allclose([m["learning_rate"] for m in history[:6]],
                             [setup["schedule_fn"](s) for s in range(6)], rtol=1e-6)
  losses_seen = [float(m["loss"]) for m in history]
  assert losses_seen[-1] < 0.7 * losses_seen[0], losses_seen
  assert history[-1]["accuracy"] > history[0]["accuracy"]
  assert all(np.isfinite(m["grad_norm"]) and m["update_norm"] > 0 for m in history)


def test_the_step_compiles_once_and_donates_the_state(setup):
  step, state = setup["step"], setup["fresh"]()
  for seed in range(3):
    old = state
    state, _ = step(state, training.shard_batch(lm_batch(30 + seed), setup["mesh"]))
    assert old.params["embed"]["embedding"].is_deleted()  # donated
  # One compilation and one trace, however many calls this module has made.
  assert step.jitted._cache_size() == 1
  assert len(setup["traces"]) == 1
  assert int(state.step) == 3
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(setup["shardings"])):
    assert x.sharding.is_equivalent_to(s, x.ndim)


def test_evaluate_sums_tokens_over_batches(setup):
  mesh, params = setup["mesh"], setup["state"].params
  batches = [training.shard_batch(lm_batch(seed), mesh) for seed in (40, 41)]
  eval_step = training.make_eval_step(setup["loss_fn"], mesh=mesh,
                                      state_shardings=setup["shardings"])
  result = training.evaluate(eval_step, params, batches)
  # The train step's metrics are computed with the parameters before its update: from the
  # same state they are the per-batch numbers, which evaluate must weight by tokens.
  per_batch = [jax.device_get(setup["step"](setup["fresh"](), b)[1]) for b in batches]
  tokens = sum(m["tokens"] for m in per_batch)
  assert result["tokens"] == tokens and per_batch[0]["tokens"] != per_batch[1]["tokens"]
  np.testing.assert_allclose(result["loss"], sum(m["loss"] * m["tokens"] for m in per_batch)
                             / tokens, rtol=1e-5)
  np.testing.assert_allclose(result["accuracy"], sum(m["accuracy"] * m["tokens"]
                                                     for m in per_batch) / tokens, rtol=1e-5)
  np.testing.assert_allclose(result["perplexity"], np.exp(result["loss"]), rtol=1e-6)
  assert eval_step.jitted._cache_size() == 1
  with pytest.raises(ValueError, match="at least one batch"):
    training.evaluate(eval_step, params, [])


# ---------------------------------------------------------------------------------------------
# 1 device vs 8 fake devices.
# ---------------------------------------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent("""
  import functools, sys
  import jax, numpy as np
  from jax.sharding import PartitionSpec as P
  from jaxlm import losses, model as model_lib, sharding, training
  sys.path.insert(0, TESTS_DIR)  # this file, by path: `tests` is not a package
  from test_training import CONFIG, OPTIMIZER, lm_batch

  assert len(jax.devices()) == 8
  init_fn = functools.partial(model_lib.init_params, CONFIG)
  tx, schedule_fn = training.make_optimizer(**OPTIMIZER,
                                            params=jax.eval_shape(init_fn, jax.random.key(0)))
  loss_fn = losses.lm_loss_fn(model_lib.Transformer(CONFIG))
  # Two calls of 2 optimizer steps, each accumulating 2 microbatches of 8 rows.
  calls = [[lm_batch(2 * c), lm_batch(2 * c + 1)] for c in range(2)]
  # An eval batch whose rows do not all carry tokens.
  val = lm_batch(99)
  val["loss_mask"][::2] = False

  def run(mesh):
    state, shardings = training.create_train_state(init_fn, tx, jax.random.key(0), mesh)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    step = training.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings,
                                    schedule_fn=schedule_fn, num_microbatches=2,
                                    steps_per_call=2)
    history = []
    for hosts in calls:
      state, metrics = step(state, training.shard_batch(hosts, mesh, steps_per_call=2))
      history.append(jax.device_get(metrics))
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert step.jitted._cache_size() == 1
    eval_step = training.make_eval_step(loss_fn, mesh=mesh, state_shardings=shardings)
    evaluation = training.evaluate(eval_step, state.params, [training.shard_batch(val, mesh)])
    return state, shardings, history, evaluation

  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state1, _, history1, eval1 = run(one)
  state8, shardings8, history8, eval8 = run(eight)

  # The state really is split: parameters and Adam's moments alike (FSDP x tensor).
  q_spec = P(None, "fsdp", "tensor", None)
  adam = state8.opt_state[1][0]
  assert shardings8.params["layers"]["attn"]["q"]["kernel"].spec == q_spec
  assert shardings8.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"].spec == q_spec
  assert shardings8.opt_state[1][0].count.spec == P() and shardings8.step.spec == P()
  for x in (state8.params["layers"]["attn"]["q"]["kernel"],
            adam.nu["layers"]["attn"]["q"]["kernel"]):
    assert x.addressable_shards[0].data.size == x.size // 4

  for h1, h8 in zip(history1, history8):
    for name in h1:
      np.testing.assert_allclose(h8[name], h1[name], rtol=2e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               jax.device_get(state8), jax.device_get(state1))
  worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
              for a, b in zip(jax.tree.leaves(jax.device_get(state8.params)),
                              jax.tree.leaves(jax.device_get(state1.params))))
  for name in eval1:
    np.testing.assert_allclose(eval8[name], eval1[name], rtol=2e-5, err_msg=name)
  print("losses", [list(h["loss"]) for h in history8], "eval", eval8, "max param diff", worst)
  print("OK")
""")


EIGHT_DEVICE_TEST = "test_one_device_and_eight_fake_devices_train_identically"


@pytest.fixture(scope="module", autouse=True)
def eight_device_process(request, tmp_path_factory):
  """Starts the 8-device subprocess before this module's first test, when its test is selected.

  Compiling is mostly single-threaded, so the subprocess compiles on another core while the
  in-process tests run, instead of after them.
  """
  if not any(item.name == EIGHT_DEVICE_TEST for item in request.session.items):
    yield None
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  log = tmp_path_factory.mktemp("eight_devices") / "log.txt"
  with open(log, "w") as out:
    script = EIGHT_DEVICES.replace("TESTS_DIR", repr(str(ROOT / "tests")))
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT, text=True)
  yield process, log
  if process.poll() is None:  # its test was not run, or failed before waiting
    process.kill()
    process.wait()


def test_one_device_and_eight_fake_devices_train_identically(eight_device_process):
  process, log = eight_device_process
  returncode = process.wait(timeout=300)
  output = log.read_text()
  assert returncode == 0 and "OK" in output, output
