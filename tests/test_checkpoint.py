"""Run directories, orbax checkpoints, parent loading and the preemption guard.

Device-count changes (save on 8 fake CPU devices, restore on 1 and on 4) and the killed save run
in subprocesses: XLA fixes the device count when JAX starts, and a SIGKILL needs its own process.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm import checkpoint
from jaxlm import preemption
from jaxlm.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ModelConfig(vocab_size=512, embed_dim=8, num_layers=2, num_heads=2, num_kv_heads=2,
                    head_dim=4, mlp_dim=16, max_len=32)


def _state(seed=0, mesh=None):
  """A TrainState-like tree: params, optimizer moments, a step counter and an rng key."""
  mesh = mesh or jax.make_mesh((len(jax.devices()),), ("data",))
  rows = NamedSharding(mesh, P("data"))
  w = jnp.arange(32.0).reshape(8, 4) + seed
  params = {"embed": jax.device_put(w, rows), "norm": jnp.full((4,), 1.0 + seed)}
  return {"params": params,
          "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.int32(seed)},
          "step": jnp.int32(seed), "rng": jax.random.key(seed)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.tree.map(_key_data, a), jax.tree.map(_key_data, b))


def _key_data(x):
  is_key = jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
  return jax.random.key_data(x) if is_key else x


def _run(script, *args, devices=1, timeout=120):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- Checkpointer ----------------------------------------------------------------------------


def test_round_trip_restores_values_data_state_and_shardings(tmp_path):
  state = _state(seed=3)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, data_state={"next_index": np.int64(7), "epoch": 0})
    ckpt.wait()
    restored, data = ckpt.restore(abstract_state=_abstract(state))
  _assert_tree_equal(restored, state)
  assert data == {"next_index": 7, "epoch": 0}
  assert restored["params"]["embed"].sharding == state["params"]["embed"].sharding
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert sorted(os.listdir(tmp_path / "checkpoints" / "10")) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "data", "state"]


def test_keeps_the_last_n_and_a_new_checkpointer_resumes_from_the_latest(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(seed=step), data_state={"next_index": step})
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  restored, data = ckpt.restore(abstract_state=_abstract(_state()))
  _assert_tree_equal(restored, _state(seed=3))
  assert data == {"next_index": 3}
  older, _ = ckpt.restore(2, abstract_state=_abstract(_state()))
  _assert_tree_equal(older, _state(seed=2))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1 .*steps: \[2, 3\]"):
    ckpt.restore(1, abstract_state=_abstract(_state()))
  ckpt.close()


def test_an_existing_step_is_never_overwritten_and_data_state_may_be_none(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(5, _state(seed=1), data_state=None)
    assert not ckpt.save(5, _state(seed=2), data_state=None)
    restored, data = ckpt.restore(abstract_state=_abstract(_state()))
    state_only, none = ckpt.restore(abstract_state=_abstract(_state()), restore_data=False)
  _assert_tree_equal(restored, _state(seed=1))
  _assert_tree_equal(state_only, _state(seed=1))
  assert data is None and none is None


def test_save_copies_off_the_devices_before_returning(tmp_path):
  # The train step donates the state right after a save: the async writer must not need it.
  state = _state(seed=4)
  expected = jax.tree.map(np.asarray, jax.tree.map(_key_data, state))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    abstract = _abstract(state)
    ckpt.save(1, state, data_state={})
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    ckpt.wait()
    restored, _ = ckpt.restore(abstract_state=abstract)
  _assert_tree_equal(restored, expected)


def test_restore_errors_name_the_problem(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints"):
    ckpt.restore(abstract_state=_abstract(_state()))
  ckpt.save(1, _state(), data_state={"a": 1})
  with pytest.raises(TypeError, match="data_state must be JSON-able"):
    ckpt.save(2, _state(), data_state={"a": object()})
  no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
  with pytest.raises(ValueError, match=r"abstract_state\['opt_state'\]\['count'\] has no sharding"):
    ckpt.restore(abstract_state=no_sharding)
  wrong = _abstract(_state())
  wrong["params"]["extra"] = wrong["params"]["norm"]
  with pytest.raises(ValueError, match="does not match abstract_state"):
    ckpt.restore(abstract_state=wrong)
  ckpt.close()


def test_all_finite():
  assert checkpoint.all_finite(_state())
  assert checkpoint.all_finite({"step": jnp.int32(1), "none": None})
  bad = _state()
  bad["opt_state"]["mu"]["norm"] = jnp.array([0.0, jnp.nan, 0.0, 0.0])
  assert not checkpoint.all_finite(bad)
  assert not checkpoint.all_finite({"x": jnp.array([jnp.inf], jnp.bfloat16)})


RESHARD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxlm import checkpoint, preemption

mode, workdir = sys.argv[1], sys.argv[2]
n = len(jax.devices())
w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
b = jnp.arange(8, dtype=jnp.float32)
if mode == "save":
  assert n == 8
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  state = {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))),
                      "b": jax.device_put(b, NamedSharding(mesh, P("tensor")))},
           "step": jnp.int32(7)}
  with checkpoint.Checkpointer(workdir) as ckpt:
    ckpt.save(7, state, data_state={"next_index": 70})
else:
  shape = {1: (1, 1), 4: (2, 2)}[n]
  mesh = jax.make_mesh(shape, ("data", "tensor"))
  want = {"params": {"w": NamedSharding(mesh, P("tensor", "data")),
                     "b": NamedSharding(mesh, P())},
          "step": NamedSharding(mesh, P())}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          {"params": {"w": w, "b": b}, "step": jnp.int32(0)}, want)
  state, data = checkpoint.Checkpointer(workdir).restore(abstract_state=abstract)
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(state["params"]["b"]), np.asarray(b))
  assert int(state["step"]) == 7 and data == {"next_index": 70}, data
  got = jax.tree.map(lambda x: x.sharding, state)
  assert got == want, got
  assert len(state["params"]["w"].addressable_shards) == n
print("OK", n)
"""


def test_save_on_8_devices_restore_on_1_and_on_4(tmp_path):
  for mode, devices in (("save", 8), ("restore", 1), ("restore", 4)):
    result = _run(RESHARD, mode, tmp_path, devices=devices)
    assert result.returncode == 0 and f"OK {devices}" in result.stdout, result.stderr[-3000:]


KILLED_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from jaxlm import checkpoint, preemption

workdir = sys.argv[1]
# max_to_keep=1: the only good checkpoint would be deleted if orbax cleaned up too early.
ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1)
ckpt.save(1, {"params": {"w": jnp.full((4,), 1.0)}, "big": jnp.zeros((4,))}, data_state={"i": 1})
ckpt.wait()
big = jnp.ones((64, 1024, 1024), jnp.float32)  # 256 MiB: still being written when killed
ckpt.save(2, {"params": {"w": jnp.full((4,), 2.0)}, "big": big}, data_state={"i": 2})
# Kill the moment step 2's temporary directory exists: mid-save, however loaded the machine.
directory = os.path.join(workdir, "checkpoints")
while not any(name.startswith("2.") for name in os.listdir(directory)):
  if "2" in os.listdir(directory):
    sys.exit("the save finished before it could be interrupted")
print(sorted(os.listdir(directory)), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_latest_and_restorable(tmp_path):
  result = _run(KILLED_SAVE, tmp_path)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  in_flight = result.stdout.strip()
  assert "2.orbax-checkpoint-tmp" in in_flight, in_flight  # the kill did land mid-save
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_one_device())},
              "big": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=_one_device())}
  state, data = ckpt.restore(abstract_state=abstract)
  np.testing.assert_array_equal(state["params"]["w"], np.full((4,), 1.0))
  assert data == {"i": 1}
  # Step 2 can be saved again, and the interrupted attempt's temporary directory is gone
  # (orbax deletes it in the background; a save waits for that).
  assert ckpt.save(2, {"params": {"w": jnp.full((4,), 2.0)}, "big": jnp.zeros((4,))},
                   data_state={"i": 2})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def _one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


TWO_PROCESSES = """
import sys
import jax
process, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process)
import jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxlm import checkpoint, preemption

mesh = jax.make_mesh((4,), ("data",))
full = np.arange(16.0).reshape(8, 2)
w = jax.make_array_from_callback((8, 2), NamedSharding(mesh, P("data")), lambda i: full[i])
state = {"params": {"w": w}, "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, P()))}
guard = preemption.PreemptionGuard()
if process == 1:
  guard.request()  # only one process got the signal: both must stop
assert preemption.should_stop(guard)
with checkpoint.Checkpointer(workdir) as ckpt:
  ckpt.save(3, state, data_state={"next_index": 10 + process})
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
restored, data = checkpoint.Checkpointer(workdir).restore(abstract_state=abstract)
assert data == {"next_index": 10 + process}, data
for shard in restored["params"]["w"].addressable_shards:
  np.testing.assert_array_equal(shard.data, full[shard.index])
print("OK", process)
"""


def test_two_processes_agree_on_stopping_and_keep_their_own_data_state(tmp_path):
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(i), str(port), tmp_path],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f"OK {i}" in out, err[-3000:]
  # One process cannot take over the data positions of two; the state itself restores.
  ckpt = checkpoint.Checkpointer(tmp_path)
  abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=_one_device())},
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=_one_device())}
  with pytest.raises(ValueError, match="saved by 2 processes, this run has 1: .*restore_data"):
    ckpt.restore(abstract_state=abstract)
  state, data = ckpt.restore(abstract_state=abstract, restore_data=False)
  np.testing.assert_array_equal(state["params"]["w"], np.arange(16.0).reshape(8, 2))
  assert data is None
  ckpt.close()


# --- Run directory and manifest --------------------------------------------------------------


def _manifest_args(**overrides):
  args = dict(stage="pretrain", parent=None, config={"b": 1, "a": [1, 2]},
              tokenizer_hash="abc", data_source="world:v1[train]", model_config=MODEL)
  args.update(overrides)
  return args


def test_manifest_fields_and_updates(tmp_path):
  run = checkpoint.RunDir(tmp_path)
  manifest = run.write_manifest(**_manifest_args(extra={"num_params": np.int64(1234)}))
  on_disk = run.read_manifest()
  assert on_disk == manifest
  assert list(on_disk) == [
      "manifest_version", "stage", "parent", "complete", "created", "sessions", "wall_time_s",
      "config_hash", "tokenizer_hash", "data_source", "model_config", "model_origin", "git_commit", "git_dirty",
      "jaxlm_version", "jax_version", "devices", "process_count", "final_metrics", "data", "extra"]
  assert on_disk["stage"] == "pretrain" and on_disk["parent"] is None and on_disk["model_origin"] == "jaxlm"
  assert on_disk["config_hash"] == checkpoint.config_hash({"a": [1, 2], "b": 1})  # key order
  assert on_disk["config_hash"] != checkpoint.config_hash({"a": [1, 2], "b": 2})
  assert ModelConfig.from_dict(on_disk["model_config"]) == MODEL
  assert on_disk["git_commit"] is None or len(on_disk["git_commit"]) == 40
  assert on_disk["extra"] == {"num_params": 1234}
  assert not on_disk["complete"] and not run.is_complete()
  run.update_manifest(final_metrics={"val_loss": np.float32(2.5), "bad": float("nan")},
                      wall_time_s=12.0)
  run.update_manifest(final_metrics={"accuracy": 0.5, "steps": np.int64(20)}, complete=True)
  done = run.read_manifest()
  assert done["final_metrics"] == {"val_loss": 2.5, "bad": None, "accuracy": 0.5, "steps": 20}
  assert type(done["final_metrics"]["steps"]) is int
  assert done["wall_time_s"] == 12.0 and done["complete"] and run.is_complete()
  with pytest.raises(ValueError, match=r"final_metrics\['x'\] must be a number"):
    run.update_manifest(final_metrics={"x": "high"})
  with pytest.raises(ValueError, match=r"final_metrics\['y'\] must be a number"):
    run.update_manifest(final_metrics={"y": [1.0, 2.0]})


def test_a_resumed_run_keeps_created_and_accumulates_wall_time(tmp_path):
  first = checkpoint.RunDir(tmp_path)
  created = first.write_manifest(**_manifest_args())["created"]
  first.update_manifest(wall_time_s=100.0)
  second = checkpoint.RunDir(tmp_path)
  manifest = second.write_manifest(**_manifest_args(parent=tmp_path / "parent"))
  assert manifest["created"] == created and manifest["sessions"] == 2
  assert manifest["parent"] == str(tmp_path / "parent")
  assert second.update_manifest(wall_time_s=5.5)["wall_time_s"] == 105.5
  with pytest.raises(ValueError, match="holds a 'pretrain' run; use a new workdir for the 'sft'"):
    checkpoint.RunDir(tmp_path).write_manifest(**_manifest_args(stage="sft"))


def test_config_is_written_atomically(tmp_path, monkeypatch):
  run = checkpoint.RunDir(tmp_path / "run")
  run.write_config({"z": 1, "a": {"b": (1, 2)}, "n": np.float32(0.5)})
  assert run.read_config() == {"z": 1, "a": {"b": [1, 2]}, "n": 0.5}
  assert list(run.read_config()) == ["z", "a", "n"]  # the config's own order, for people

  def crash(*args):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="disk full"):
    run.write_config({"z": 2})
  assert run.read_config()["z"] == 1  # the old file is intact...
  assert sorted(os.listdir(run.workdir)) == ["config.json"]  # ...and no temporary is left


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  run = checkpoint.RunDir(tmp_path / "run")
  run.write_config({"a": 1})
  run.write_manifest(**_manifest_args())
  assert not os.path.exists(run.workdir)


def test_is_complete_without_a_manifest_or_with_a_broken_one(tmp_path):
  run = checkpoint.RunDir(tmp_path)
  assert not run.is_complete()
  (tmp_path / "manifest.json").write_text("{not json")
  assert not run.is_complete()


# --- load_parent -----------------------------------------------------------------------------


@pytest.fixture
def parent_run(tmp_path, world_tokenizer):
  """A finished run: config, manifest, tokenizer and two checkpoints."""
  run = checkpoint.RunDir(tmp_path / "parent")
  run.write_config({"stage": "pretrain", "lr": 0.001})
  run.save_tokenizer(world_tokenizer)
  run.write_manifest(**_manifest_args(tokenizer_hash=world_tokenizer.content_hash))
  with checkpoint.Checkpointer(run.workdir) as ckpt:
    ckpt.save(10, _state(seed=1), data_state={"next_index": 1})
    ckpt.save(20, _state(seed=2), data_state={"next_index": 2})
  run.update_manifest(final_metrics={"val_loss": 3.0}, wall_time_s=1.0, complete=True)
  return run


def test_load_parent_restores_only_the_params_of_the_latest_checkpoint(parent_run,
                                                                       world_tokenizer):
  parent = checkpoint.load_parent(parent_run.workdir,
                                  expect_tokenizer_hash=world_tokenizer.content_hash,
                                  expect_model_config=MODEL.replace(dtype="bfloat16",
                                                                    max_len=64))
  assert parent.step == 20 and parent.workdir == parent_run.workdir
  assert parent.model_config == MODEL and parent.tokenizer == world_tokenizer
  assert parent.config == {"stage": "pretrain", "lr": 0.001}
  assert parent.manifest["final_metrics"] == {"val_loss": 3.0}
  assert set(parent.params) == {"embed", "norm"}  # no opt_state, step or rng
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(parent.params))
  _assert_tree_equal(parent.params, _state(seed=2)["params"])

  # Straight onto the devices, in the shardings the child asks for.
  mesh = jax.make_mesh((1,), ("fsdp",))
  want = NamedSharding(mesh, P(None, "fsdp"))
  abstract = {"embed": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=want),
              "norm": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))}
  sharded = checkpoint.load_parent(parent_run.workdir, abstract_params=abstract)
  assert sharded.params["embed"].sharding == want
  _assert_tree_equal(sharded.params, _state(seed=2)["params"])


def test_load_parent_errors_name_the_path_and_the_mismatch(parent_run, tmp_path):
  workdir = parent_run.workdir
  with pytest.raises(FileNotFoundError, match="parent run directory not found: .*nowhere"):
    checkpoint.load_parent(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty/manifest.json not found"):
    checkpoint.load_parent(tmp_path / "empty")
  with pytest.raises(ValueError, match=f"tokenizer mismatch: parent {workdir} .* uses beef"):
    checkpoint.load_parent(workdir, expect_tokenizer_hash="beef")
  with pytest.raises(ValueError, match="num_layers: parent 2, expected 3; vocab_size: parent "
                                       "512, expected 1024"):
    checkpoint.load_parent(workdir, expect_model_config=MODEL.replace(num_layers=3,
                                                                      vocab_size=1024))
  with pytest.raises(ValueError, match="scan_layers: parent True, expected False"):
    checkpoint.load_parent(workdir, expect_model_config={"scan_layers": False})
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, 3), x.dtype, sharding=_one_device()),
                       _state()["params"])
  with pytest.raises(ValueError, match="the saved params do not match abstract_params"):
    checkpoint.load_parent(workdir, abstract_params=wrong)

  parent_run.update_manifest(complete=False)
  with pytest.raises(ValueError, match=f"parent run {workdir} is incomplete"):
    checkpoint.load_parent(workdir)
  assert checkpoint.load_parent(workdir, require_complete=False).step == 20

  manifest = parent_run.read_manifest()
  (pathlib.Path(workdir) / "manifest.json").write_text(json.dumps({**manifest, "complete": True}))
  os.rename(parent_run.checkpoint_dir, parent_run.checkpoint_dir + ".moved")
  with pytest.raises(FileNotFoundError, match=f"parent run {workdir} has no checkpoint yet"):
    checkpoint.load_parent(workdir)
  os.rename(parent_run.tokenizer_path, parent_run.tokenizer_path + ".moved")
  with pytest.raises(FileNotFoundError, match=f"no tokenizer in {workdir}: expected tokenizer.model"):
    checkpoint.load_parent(workdir)


def test_load_parent_refuses_a_tokenizer_that_is_not_the_manifests(parent_run):
  manifest = parent_run.read_manifest()
  manifest["tokenizer_hash"] = "0" * 64
  pathlib.Path(parent_run.manifest_path).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="is not the tokenizer the manifest records"):
    checkpoint.load_parent(parent_run.workdir)


def test_load_parent_needs_a_params_entry(tmp_path, world_tokenizer):
  run = checkpoint.RunDir(tmp_path)
  run.write_config({})
  run.save_tokenizer(world_tokenizer)
  run.write_manifest(**_manifest_args(tokenizer_hash=world_tokenizer.content_hash))
  run.update_manifest(complete=True)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"weights": jnp.ones(2)}, data_state=None)
  with pytest.raises(ValueError, match=r"has no top-level 'params' entry \(it has \['weights'\]\)"):
    checkpoint.load_parent(tmp_path)


# --- Preemption ------------------------------------------------------------------------------


def test_preemption_guard_turns_signals_into_a_flag_and_restores_handlers():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  def wait(condition=lambda: False, seconds=5.0):
    # The kernel may hand a process-directed signal to another thread (JAX, grain), so the
    # Python handler can run a moment after os.kill returns: wait for it, do not assume it.
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
      time.sleep(0.001)

  with preemption.PreemptionGuard() as guard:
    assert not guard.requested and not preemption.should_stop(guard)
    os.kill(os.getpid(), signal.SIGTERM)
    wait(lambda: guard.requested)
    assert guard.requested and preemption.should_stop(guard)
    os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT is a request too
    # Wait until its handler has run: a second SIGINT sent before that would merge with it.
    wait(lambda: signal.SIGINT in guard._received)
    assert signal.SIGINT in guard._received
    with pytest.raises(KeyboardInterrupt):  # the second goes to Python's own handler
      os.kill(os.getpid(), signal.SIGINT)
      wait()
  assert {s: signal.getsignal(s) for s in before} == before


def test_preemption_guard_can_be_requested_by_hand():
  guard = preemption.PreemptionGuard()
  guard.request()
  assert preemption.should_stop(guard)
