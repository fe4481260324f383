r"""DPO optimizer-step throughput (pairs/s), the jaxlm side of the comparison with TRL's DPOTrainer.

  python tools/bench_dpo.py                                   # precomputed reference, steps_per_call 10
  python tools/bench_dpo.py --steps_per_call=1
  python tools/bench_dpo.py --online_reference                # the reference forward runs every step
  python tools/bench_dpo.py --config.model.attention_impl=xla --config.model.scan_unroll=1  # ablations
  /tmp/trlenv/bin/python tools/bench_trl_dpo.py               # TRL's DPOTrainer (scratch venv, see there)

It runs the code path of `experiments/dpo.py` on synthetic pair batches: the model of
`--config` (default `configs/dpo.py:cpu`, i.e. the `:cpu` preset: vocab 2048, embed 128, 4 layers,
4 heads of 32, SwiGLU 384, tied embeddings, float32; run with the layer loop unrolled and
blocked causal attention, `configs/common.py:CPU_EXECUTION`), `dpo.dpo_loss_fn` (sigmoid DPO, beta 0.1),
`training.make_optimizer(**config.optimizer)` (AdamW b2 0.95, clip 1.0, warmup + cosine) and
`training.make_train_step` (jitted, donated, `--steps_per_call` steps per call under `lax.scan`;
10 by default, as the stage config). The batch shape comes from this tool's flags, not from the
config, so that it always matches `tools/bench_trl_dpo.py`'s defaults.
The reference is the initial policy (as after SFT). With `config.reference.precompute` (the
default; `--online_reference` turns it off) its log-probs are computed once by
`dpo.precompute_reference` before the clock starts and looked up per batch by
`dpo.ReferenceAttacher`; online, the attacher runs the jitted reference forward on every batch
inside the timed loop, as the experiment does.

Batches (fixed shape, no padding): `--batch_size` pairs (32, the stage's batch) of `--seq_len`
tokens per side (128): `--prompt_len` (64) prompt tokens shared by both sides, then
seq_len - prompt_len (64) response tokens, random ids, distinct per side. They are laid out as the
DPO stage lays them out (`pipelines.pairs_dataset(layout="shared")`): one row per pair holding the
prompt once and both responses after it (192 tokens), each response attending to the prompt and
to itself only, and the LM head scoring the 128 response positions. The loss covers the 64
response tokens of each side. A pool of 8 distinct host batches is built before timing and
cycled (the grain pipeline, which overlaps the step in real runs, is not timed:
`tools/bench_data.py` measures it).

What is timed, per call exactly as `jaxlm/trainer.py` does it: the reference attach (table
lookup or online forward), `training.shard_batch` (host -> device) and the train step; metrics
stay on device (the trainer syncs them only at log steps). Compilation and two warm-up calls are
excluded; then `--repeats` windows of `--steps` optimizer steps each, each closed by
`block_until_ready` on the state and metrics. Reported: every window's ms/step and pairs/s and the
best window (best of N: the box is shared, so a slower window measures the neighbours' load), and
the process CPU time per step (all threads; it includes spin-waiting, and is much less sensitive
to a neighbour's load than wall time, so it is a second view of the same comparison).

How the comparison with `tools/bench_trl_dpo.py` is made fair (details in its docstring):

* Same model shape and arithmetic: a LlamaForCausalLM of the same widths, RoPE theta 1e4, RMSNorm
  eps 1e-6, SwiGLU, tied embeddings, no biases; float32 weights and compute on both sides (TRL's
  bf16 default is turned off), no gradient checkpointing (TRL's default is turned off), no
  dropout.
* Same batch: the same pairs (32 pairs, each a 64-token prompt with two 64-token responses,
  no padding), pre-tokenized on the TRL side too, so neither side tokenizes inside the loop.
* Same reference mode: precomputed on both sides (TRL's `precompute_ref_log_probs=True`, done in
  the trainer's constructor, before the clock), or online on both (`--online_reference`; TRL gets
  an explicit frozen copy of the policy as `ref_model`).
* Same update: sigmoid DPO loss with beta 0.1, AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0),
  global-norm clipping at 1.0, lr 3e-4 with 20 warmup steps then cosine; one optimizer step per
  batch (no accumulation). TRL uses transformers' default `adamw_torch_fused`.
* Same machine and threads: torch runs 2 intra-op threads (`torch.set_num_threads(2)`); XLA's CPU
  client uses every core, which is 2 on the box these figures come from (`nproc`). Both run in
  one process with no data-loader workers.
* Same clock: steady state only (compile/warm-up excluded on both sides), best of N windows, the
  two scripts run alternately (jaxlm, TRL, jaxlm, TRL, ...) so that a neighbour's load hits
  both alike.

The same work, done with less arithmetic (each exact: tests/test_dpo.py and tests/test_model.py
check the log-probs and gradients against the plain computation). This is where jaxlm's speed
comes from, and why it is not a like-for-like kernel race:

* the prompt is run once per pair, not once per side (192 tokens per pair instead of 256);
* the LM head scores only the 128 response positions (TRL: all 256, plus per-token entropy, mean
  logits and top-1 accuracy in its fused head on CPU);
* causal attention in blocks of 64 queries, which skips the blocks above the diagonal (TRL's
  SDPA skips them too, inside its flash kernel);
* XLA-specific fixes: the layer loop unrolled, RoPE angles looked up instead of recomputed in
  every fused consumer, projections as 2-D matmuls.

Smaller differences: TRL reads a dozen metrics back to the host every step (`.item()`), which
jaxlm defers to log steps; TRL's step includes its collator (Python lists -> tensors) while
jaxlm's synthetic batches are built before the clock (only the reference attach and the
host -> device copy are timed).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

# The repository root: `configs/*.py` import `configs.common`, and jaxlm may not be installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors  # noqa: E402
from jaxlm import dpo  # noqa: E402
from jaxlm import model as model_lib  # noqa: E402
from jaxlm import sharding  # noqa: E402
from jaxlm import stage  # noqa: E402
from jaxlm import training  # noqa: E402
from jaxlm.data import pipelines  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dpo.py:cpu", "Stage config (model, optimizer, loss).",
                                          lock_config=True)
# The batch shape is pinned here, not read from the config, so the figures stay comparable with
# tools/bench_trl_dpo.py (same defaults) whatever the stage config says today.
_BATCH = flags.DEFINE_integer("batch_size", 32, "Pairs per optimizer step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per side, prompt + response.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per pair; the response has seq_len - prompt_len.")
_STEPS = flags.DEFINE_integer("steps", 40, "Optimizer steps per timed window (rounded up to steps_per_call).")
_K = flags.DEFINE_integer("steps_per_call", 10, "Optimizer steps per jitted call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows; the best is reported.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary size (the tokenizer would set it in a real run).")
_ONLINE = flags.DEFINE_bool("online_reference", False, "Reference forward on every batch instead of precomputed.")
_POOL = 8  # distinct host batches, cycled


def synthetic_pairs(rng: np.random.Generator, *, start: int, rows: int, seq_len: int, prompt_len: int,
                    vocab: int) -> dict[str, np.ndarray]:
  """One host pair batch in the shared-prompt layout of `pipelines.pairs_dataset`, no padding.

  Each pair is a random prompt of `prompt_len` tokens and two distinct random responses of
  `seq_len - prompt_len` tokens, the same tokens TRL's side gets as two rows of `seq_len`.
  """
  response_len = seq_len - prompt_len
  examples = [pipelines.shared_pair_example(rng.integers(8, vocab, prompt_len, dtype=np.int32),
                                            rng.integers(8, vocab, response_len, dtype=np.int32),
                                            rng.integers(8, vocab, response_len, dtype=np.int32),
                                            max_len=prompt_len + 2 * response_len, score_len=2 * response_len)
              for _ in range(rows)]
  batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  batch["record_index"] = np.arange(start, start + rows, dtype=np.int32)
  return batch


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  batch_size, seq_len, prompt_len, k = _BATCH.value, _SEQ.value, _PROMPT.value, _K.value
  if not 0 < prompt_len < seq_len:
    raise ValueError(f"need 0 < prompt_len ({prompt_len}) < seq_len ({seq_len})")
  mesh = stage.setup_mesh(config.mesh)
  rules = sharding.DEFAULT_RULES
  model_config = stage.model_config(config.model, vocab_size=_VOCAB.value)
  init_fn = functools.partial(model_lib.init_params, model_config)
  spec = stage.state_spec(config, init_fn, mesh, rules)
  state, _ = training.create_train_state(init_fn, spec.tx, jax.random.key(config.seed), mesh, rules)
  # The reference is the starting policy, kept as host numpy as `checkpoint.load_parent` gives it.
  reference_params = jax.device_get(state.params)

  rows = stage.per_host_batch_size(batch_size)
  rng = np.random.default_rng(0)
  pool = [synthetic_pairs(rng, start=i * rows, rows=rows, seq_len=seq_len, prompt_len=prompt_len,
                          vocab=_VOCAB.value) for i in range(_POOL)]
  compute = dpo.reference_fn(model_config)
  start = time.perf_counter()
  if _ONLINE.value:
    attacher = dpo.ReferenceAttacher(iter(()), params=jax.device_put(reference_params), compute=compute)
    reference_s = None
  else:
    table = dpo.precompute_reference(reference_params, model_config, pool, _POOL * rows)
    attacher = dpo.ReferenceAttacher(iter(()), table=table)
    reference_s = time.perf_counter() - start
    # Sanity: random tokens under a fresh model score about -(response tokens) * ln(V) per side.
    print(f"reference log p(chosen) mean {np.nanmean(table[:, 0]):.1f} (random-token level "
          f"{-(seq_len - prompt_len) * np.log(_VOCAB.value):.1f})")

  loss_fn = dpo.dpo_loss_fn(model_lib.Transformer(model_config), loss=config.loss.name, beta=config.loss.beta,
                            label_smoothing=config.loss.label_smoothing)
  step = training.make_train_step(loss_fn, spec.tx, mesh=mesh, state_shardings=spec.shardings,
                                  schedule_fn=spec.schedule, num_microbatches=config.num_microbatches,
                                  steps_per_call=k)
  cursor = 0

  def call(state):
    nonlocal cursor
    host_batches = [attacher.attach(pool[(cursor + i) % _POOL]) for i in range(k)]
    cursor += k
    batch = training.shard_batch(host_batches[0] if k == 1 else host_batches, mesh, rules, steps_per_call=k)
    return step(state, batch)

  start = time.perf_counter()
  state, metrics = call(state)  # compiles
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - start
  for _ in range(2):  # warm-up: first-call allocations
    state, metrics = call(state)
  jax.block_until_ready((state, metrics))

  calls = -(-_STEPS.value // k)
  steps = calls * k
  windows, cpu_windows = [], []
  for _ in range(_REPEATS.value):
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(calls):
      state, metrics = call(state)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    windows.append(seconds)
    cpu_windows.append((time.process_time() - cpu_start) / steps)
    print(f"  window: {seconds * 1e3:.1f} ms/step, {batch_size / seconds:.1f} pairs/s "
          f"(process CPU {cpu_windows[-1] * 1e3:.0f} ms/step)", flush=True)
  best = min(windows)
  loss = float(np.mean(jax.device_get(metrics["loss"])))
  if not np.isfinite(loss):
    raise FloatingPointError(f"the DPO loss is not finite ({loss})")

  reference = "online" if _ONLINE.value else "precomputed"
  print(f"jaxlm DPO: {model_lib.num_params(model_config):,} params, {batch_size} pairs x 2 x {seq_len} tokens "
        f"(prompt {prompt_len} + response {seq_len - prompt_len}), {reference} reference, steps_per_call {k}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {model_config.dtype}, "
        f"compile {compile_s:.1f} s" + ("" if reference_s is None else f", reference precompute {reference_s:.1f} s"))
  print(f"best of {len(windows)} windows of {steps} steps: {best * 1e3:.1f} ms/step, "
        f"{batch_size / best:.1f} pairs/s (last loss {loss:.4f})")
  print(json.dumps({"framework": "jaxlm", "pairs_per_s": round(batch_size / best, 2),
                    "ms_per_step": round(best * 1e3, 2), "windows_ms": [round(w * 1e3, 2) for w in windows],
                    "cpu_ms_per_step": [round(w * 1e3, 1) for w in cpu_windows],
                    "batch_size": batch_size, "seq_len": seq_len, "prompt_len": prompt_len,
                    "steps_per_window": steps, "steps_per_call": k, "reference": reference,
                    "compile_s": round(compile_s, 2), "jax": jax.__version__, "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
  app.run(errors.guard(main))
