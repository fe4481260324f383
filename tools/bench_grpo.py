r"""GRPO iteration throughput (replies/s), the jaxlm side of the comparison with TRL's GRPOTrainer.

  python tools/bench_grpo.py                                   # 16 prompts x G 4, 48-token replies, 2 threads
  python tools/bench_grpo.py --prompts_per_step=8 --group_size=8 --max_new_tokens=32
  /tmp/refenv/bin/python tools/bench_trl_grpo.py               # TRL's GRPOTrainer (scratch venv, see there)

Run both with the same `--prompts_per_step --group_size --prompt_len --max_new_tokens --threads`
(the defaults agree), one after the other on an otherwise idle machine.

One timed iteration is what `experiments/grpo.py` does per step, on synthetic prompts:

1. generate: `rollout.collect_rollout` (the KV-cache sampler, `jaxlm.sampling.generate`) draws
   `--group_size` replies to each of `--prompts_per_step` prompts at temperature 1, exactly
   `--max_new_tokens` tokens each (`stop_ids=()`: no reply stops early, as on TRL's side, where
   `min_new_tokens` suppresses EOS); the reply tokens are read back to the host.
2. score: `grpo.make_scorer` (one jitted program: the frozen reference's log-probs; the old
   policy's are the sampler's with `grpo.old_log_probs=sampler`, the default, as TRL does with
   one step per generation; `--config.grpo.old_log_probs=scorer` adds the policy's forward), the synthetic reward on the host, `grpo.score_with_kl` and
   `grpo.advantages` (group-relative, (r - mean) / (std + 1e-4)).
3. train: `grpo.make_update` (one epoch, one minibatch: one clipped-ratio AdamW step with the k3
   KL to the reference in the loss, beta `grpo.kl_coef` 0.04, token-level normalisation), metrics
   read back to the host as the experiment reads them every iteration.

The model, optimizer and GRPO knobs are `--config` (default `configs/grpo.py:cpu`): the `:cpu`
preset's model (configs/common.py: vocab 2048 here, embed 128, 4 layers, 4 heads of 32, SwiGLU
384, tied embeddings, float32, layer loop unrolled, blocked attention), random weights (the
reference is the initial policy, as after SFT), AdamW lr 2e-5 (b2 0.95, clip 1.0, weight decay 0,
2 warmup steps, cosine). The batch shape comes from this tool's flags so that it always matches
`tools/bench_trl_grpo.py`'s defaults. Prompts are `--prompt_len` random ids (no padding); a
pool of 8 prompt batches is built before the clock and cycled.

Reward (both sides, a cheap rule the policy can move): the fraction of a reply's tokens with an
even id. Computed on the host from the reply token ids (TRL's reward function gets the same ids).

Threads. `--threads=N` (default 2, the cores of this box) splits the CPU into N JAX devices
(`--xla_force_host_platform_device_count=N`) and runs every program data-parallel over the
prompts x G rows on a mesh of them (data axis N, as `tools/bench_sampler.py --cpu_devices` and
a multi-device run do): XLA:CPU runs each op of a model this small on about one core, so one
device per core is how jaxlm uses N cores. `--threads=0` leaves XLA alone (one device).
torch on the TRL side runs `torch.set_num_threads(N)`.

Timing: two untimed iterations compile and warm up; then `--iterations` iterations are timed,
each split into generate / score / train at the points of the experiment's `time_generate`,
`time_score`, `time_train` (reply tokens read back; scorer outputs and advantages ready: the
experiment waits for the advantages only, which lets the scorer's tail run into `time_train`;
metrics read back). Reported: replies/s
(prompts x G / seconds per iteration, mean over the timed iterations, and the best iteration),
the split, and the process CPU time.

What is equal to TRL's side and what is not: see `tools/bench_trl_grpo.py`'s docstring.
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv) -> int:
  value = 2
  for i, arg in enumerate(argv):
    if arg.startswith("--threads="):
      value = int(arg.split("=", 1)[1])
    elif arg == "--threads" and i + 1 < len(argv):
      value = int(argv[i + 1])
  return value


# XLA reads its flags when the CPU client starts: set the device count before jax is imported.
_N = _threads_from_argv(sys.argv)
if _N > 0:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_N}")

import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors  # noqa: E402
from jaxlm import grpo as grpo_lib  # noqa: E402
from jaxlm import model as model_lib  # noqa: E402
from jaxlm import rollout as rollout_lib  # noqa: E402
from jaxlm import sharding  # noqa: E402
from jaxlm import stage  # noqa: E402
from jaxlm import training  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grpo.py:cpu", "Stage config (model, optimizer, grpo).",
                                          lock_config=True)
_PROMPTS = flags.DEFINE_integer("prompts_per_step", 16, "Prompts per iteration.")
_G = flags.DEFINE_integer("group_size", 4, "Replies per prompt (G).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (random ids, no padding).")
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Reply tokens (every reply is full length).")
_ITERS = flags.DEFINE_integer("iterations", 8, "Timed iterations.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary size.")
flags.DEFINE_integer("threads", 2, "CPU devices (XLA host platform device count); 0: XLA's default.")
_POOL = 8


def synthetic_reward(response_tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The fraction of each reply's tokens with an even id: float32 [R] (TRL's side: the same rule)."""
  emitted = np.maximum(mask.sum(axis=1), 1)
  return (((response_tokens % 2) == 0) & mask).sum(axis=1).astype(np.float32) / emitted


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  prompts, g, new_tokens = _PROMPTS.value, _G.value, _NEW.value
  grpo = grpo_lib.GRPOConfig(**{**config.grpo.to_dict(), "group_size": g})
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  if (prompts * g) % jax.device_count():
    raise ValueError(f"{prompts} x {g} replies do not split over {jax.device_count()} devices")
  model_config = stage.model_config(config.model, vocab_size=_VOCAB.value)
  if _PROMPT_LEN.value + new_tokens > model_config.max_len:
    raise ValueError(f"prompt_len + max_new_tokens exceeds max_len {model_config.max_len}")
  init_fn = functools.partial(model_lib.init_params, model_config)
  total_steps = _ITERS.value + 2
  abstract_params = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
  tx, _ = training.make_optimizer(**config.optimizer, total_steps=total_steps, params=abstract_params)
  state, _ = training.create_train_state(init_fn, tx, jax.random.key(config.seed), mesh, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  reference_params = jax.tree.map(jnp.copy, state.params)  # The initial policy, sharded like it.
  scorer = grpo_lib.make_scorer(model_config, None, grpo, mesh=mesh, rules=rules)
  update = grpo_lib.make_update(model_config, grpo, tx, state_shardings=state_shardings, mesh=mesh, rules=rules)

  rng = np.random.default_rng(0)
  pool = [rng.integers(8, _VOCAB.value, (prompts, _PROMPT_LEN.value), dtype=np.int32) for _ in range(_POOL)]
  lengths = np.full((prompts,), _PROMPT_LEN.value, np.int32)
  rewards = []

  def iteration(state, i: int):
    times = {}
    start = time.perf_counter()
    rollout = rollout_lib.collect_rollout(
        state.params, pool[i % _POOL], lengths, jax.random.fold_in(jax.random.key(config.seed), i),
        config=model_config, temperature=grpo.temperature, max_new_tokens=new_tokens, stop_ids=(),
        group_size=g, prompt_ids=np.arange(i * prompts, (i + 1) * prompts), mesh=mesh)
    response_tokens, mask = jax.device_get((rollout["response_tokens"], rollout["mask"]))
    times["generate"] = time.perf_counter() - start

    start = time.perf_counter()
    scored = scorer(state.params, reference_params, None, rollout)
    reward = synthetic_reward(np.asarray(response_tokens), np.asarray(mask))
    score = grpo_lib.score_with_kl(reward, scored, rollout["mask"], grpo)
    advantage = grpo_lib.advantages(score, grpo=grpo)
    jax.block_until_ready((advantage, scored))  # The scorer's work, not the update's, ends here.
    times["score"] = time.perf_counter() - start

    start = time.perf_counter()
    state, metrics = update(state, grpo_lib.update_batch(rollout, scored, advantage))
    metrics = jax.device_get(metrics)
    times["train"] = time.perf_counter() - start
    if not np.all(np.asarray(mask)):
      raise AssertionError("a reply stopped early: replies must be full length")
    rewards.append(float(reward.mean()))
    return state, metrics, times

  start = time.perf_counter()
  for i in range(2):  # Compiles, then warms up.
    state, metrics, _ = iteration(state, i)
  warmup_s = time.perf_counter() - start

  splits, cpu_start = [], time.process_time()
  for i in range(2, 2 + _ITERS.value):
    state, metrics, times = iteration(state, i)
    splits.append(times)
    total = sum(times.values())
    print(f"  iteration: {total * 1e3:.0f} ms ({prompts * g / total:.1f} replies/s; generate "
          f"{times['generate'] * 1e3:.0f}, score {times['score'] * 1e3:.0f}, train {times['train'] * 1e3:.0f} ms)",
          flush=True)
  cpu_per_iter = (time.process_time() - cpu_start) / _ITERS.value
  totals = [sum(t.values()) for t in splits]
  mean_s, best_s = float(np.mean(totals)), min(totals)
  split = {k: float(np.mean([t[k] for t in splits])) for k in ("generate", "score", "train")}
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"the GRPO loss is not finite ({loss})")
  replies = prompts * g
  print(f"jaxlm GRPO: {model_lib.num_params(model_config):,} params, {prompts} prompts x G {g} = {replies} replies "
        f"of {new_tokens} tokens after {_PROMPT_LEN.value}-token prompts, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, dtype {model_config.dtype}, beta {grpo.kl_coef}, "
        f"compile + 2 warm-up iterations {warmup_s:.1f} s")
  print(f"mean of {len(totals)} iterations: {mean_s * 1e3:.0f} ms/iteration, {replies / mean_s:.1f} replies/s "
        f"(best {replies / best_s:.1f}); split generate {split['generate'] * 1e3:.0f} / score "
        f"{split['score'] * 1e3:.0f} / train {split['train'] * 1e3:.0f} ms; process CPU {cpu_per_iter * 1e3:.0f} "
        f"ms/iteration; reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, last loss {loss:.4f}")
  print(json.dumps({"framework": "jaxlm", "samples_per_s": round(replies / mean_s, 2),
                    "best_samples_per_s": round(replies / best_s, 2), "ms_per_iteration": round(mean_s * 1e3, 1),
                    "split_ms": {k: round(v * 1e3, 1) for k, v in split.items()},
                    "cpu_ms_per_iteration": round(cpu_per_iter * 1e3, 1), "prompts_per_step": prompts,
                    "group_size": g, "prompt_len": _PROMPT_LEN.value, "max_new_tokens": new_tokens,
                    "iterations": len(totals), "devices": jax.device_count(), "jax": jax.__version__,
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
  app.run(errors.guard(main))
