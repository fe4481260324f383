"""Two JAX processes on localhost (jax.distributed, gloo CPU collectives) train like one.

Each process feeds its half of the rows of the same global batches (`shard_batch` assembles the
global array); the data-parallel step must then give the losses of a single process that sees
whole batches, within float tolerance (the gradient all-reduce sums in another order).
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import portpicker

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import functools, sys
import jax
process, count, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if count > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=count, process_id=process)
import numpy as np
from jaxlm import losses, model, sharding, training

config = model.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64, max_len=32)
mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
init_fn = functools.partial(model.init_params, config)
abstract = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
tx, schedule = training.make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=1, params=abstract)
state, shardings = training.create_train_state(init_fn, tx, jax.random.key(0), mesh)
step = training.make_train_step(losses.lm_loss_fn(model.Transformer(config)), tx, mesh=mesh,
                                state_shardings=shardings, schedule_fn=schedule)
rng = np.random.default_rng(0)
rows = slice(process * 8 // count, (process + 1) * 8 // count)
for _ in range(4):
  batch = {"inputs": rng.integers(0, 64, (8, 16)), "targets": rng.integers(0, 64, (8, 16)),
           "loss_mask": rng.random((8, 16)) < 0.6,  # uneven token counts per process
           "segment_ids": np.ones((8, 16)), "positions": np.tile(np.arange(16), (8, 1))}
  batch = {k: v.astype(bool if k == "loss_mask" else np.int32)[rows] for k, v in batch.items()}
  state, metrics = step(state, training.shard_batch(batch, mesh))
  print(f"LOSS {float(metrics['loss']):.8f} GRAD {float(metrics['grad_norm']):.8f}", flush=True)
"""


def _losses(output: str) -> np.ndarray:
  return np.asarray([[float(a), float(b)] for a, b in re.findall(r"LOSS (\S+) GRAD (\S+)", output)])


def test_two_processes_give_the_losses_of_one():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  single = subprocess.run([sys.executable, "-c", SCRIPT, "0", "1", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = portpicker.pick_unused_port()
  workers = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), "2", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  expected = _losses(single.stdout)
  assert expected.shape == (4, 2)
  for stdout, _ in outputs:
    np.testing.assert_allclose(_losses(stdout), expected, rtol=2e-5)


OPEN_RUN = """
import sys
import jax
process, count, port, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=count, process_id=process)
from jaxlm import cli, errors, stage
config = cli.load_config("configs/pretrain.py:tiny")
try:
  stage.open_run(config, workdir)
  print("OPENED", flush=True)
except errors.RunDirError as e:
  print("REFUSED", e, flush=True)
"""


def _open_run_in_two_processes(workdir) -> list[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = portpicker.pick_unused_port()
  workers = [subprocess.Popen([sys.executable, "-c", OPEN_RUN, str(i), "2", str(port), str(workdir)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  # Gloo prints its own lines: keep ours.
  return ["\n".join(line for line in stdout.splitlines() if line.startswith(("OPENED", "REFUSED")))
          for stdout, _ in outputs]


def test_a_two_process_job_is_one_writer_and_agrees_on_a_busy_workdir(tmp_path):
  from jaxlm import workdir_lock

  workdir = tmp_path / "run"
  with workdir_lock.WorkdirLock(workdir):  # Another job holds it: both processes refuse.
    outputs = _open_run_in_two_processes(workdir)
  assert all(out.startswith("REFUSED") and f"in use by pid {os.getpid()} " in out for out in outputs), outputs
  assert not (workdir / "config.json").exists()
  outputs = _open_run_in_two_processes(workdir)  # Free: the job opens it once, process 0 writing.
  assert all(out.strip() == "OPENED" for out in outputs), outputs
  assert (workdir / "config.json").exists()
  assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 1
