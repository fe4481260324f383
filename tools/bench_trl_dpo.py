r"""The reference for `tools/bench_dpo.py`: TRL's DPOTrainer step throughput (pairs/s) on jaxlm's shape.

Not a jaxlm dependency: run it from a scratch environment that has torch, transformers and trl::

  python -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch transformers trl datasets
  /tmp/trlenv/bin/python tools/bench_trl_dpo.py                       # precomputed reference
  /tmp/trlenv/bin/python tools/bench_trl_dpo.py --online_reference    # reference forward every step
  python tools/bench_dpo.py [--online_reference] [--steps_per_call=1] # the jaxlm side

(The figures measured with this script came from trl 1.16.0, transformers 5.23.0 and torch
2.13.0+cpu. That venv reused an existing torch + transformers venv through a .pth file rather
than download torch again: `echo /tmp/hfenv/lib/python3.11/site-packages >
/tmp/trlenv/lib/python3.11/site-packages/hfenv.pth && /tmp/trlenv/bin/pip install trl`.)

It runs `DPOTrainer.train()` unmodified but for one override: `_prepare_dataset` returns the
dataset as given, because the dataset is already tokenized (`prompt_ids`, `chosen_ids`,
`rejected_ids`, the columns TRL's own tokenization produces and its collator consumes), so no
tokenizer has to reproduce exact token counts. A word-level tokenizer over `t0 .. t{V-1}` is
passed only because the trainer requires a processing class (it supplies the pad id). A
callback stamps `time.perf_counter()` at every `on_step_end`; the first `--warmup` steps are
dropped, then `--repeats` windows of `--steps` optimizer steps are timed back to back. The time
between two `on_step_end`s is one whole trainer step: fetching and collating the batch, forward,
backward, the loss's metric read-backs, clipping, AdamW, the scheduler and the callbacks. The
best window is reported (best of N: the box is shared). Per step, the share spent before
`on_step_begin` (data loading, collation) and the process CPU time (all threads, spin-waits
included; a second view that a neighbour's load disturbs much less) are reported too.

How the comparison is made fair:

* Same model shape and arithmetic: `LlamaForCausalLM` with jaxlm's `:cpu` preset (configs/common.py:
  vocab 2048, hidden 128, 4 layers, 4 heads of 32, 4 kv heads, intermediate 384, SwiGLU), RoPE theta
  1e4, RMSNorm eps 1e-6, tied input/output embeddings, no biases, no dropout (TRL disables it
  anyway), float32 weights and compute (`bf16=False`: TRL's config defaults to bf16 autocast),
  no gradient checkpointing (`gradient_checkpointing=False`: TRL's default is on), SDPA attention.
  Weights are random (normal, std 0.02): speed does not depend on them.
* Same batch: `--batch_size` 32 pairs of `--seq_len` 128 tokens per side, `--prompt_len` 64 prompt
  tokens shared by both sides + 64 response tokens, random ids, no padding, no truncation; TRL's
  collator stacks [chosen; rejected] into one [64, 128] forward as jaxlm does ([64, 127]). The loss
  covers the same 64 response tokens per side. A pool of 8 batches (256 pairs) is cycled over
  epochs, as jaxlm cycles 8 host batches.
* Same reference mode: `precompute_ref_log_probs=True` (the reference forward over the pool runs
  in the trainer's constructor, before any timing, as jaxlm's `precompute_reference` does), or
  with `--online_reference` an explicit frozen copy of the initial policy as `ref_model`, run on
  every step.
* Same update: sigmoid DPO, beta 0.1; AdamW (`--optim`, default transformers' default
  `adamw_torch_fused`) with b1 0.9, b2 0.95, eps 1e-8, weight decay 0; `max_grad_norm=1.0`; lr 3e-4,
  20 warmup steps then cosine down to 10% (`cosine_with_min_lr`), as jaxlm's DPO config; one
  optimizer step per batch (`gradient_accumulation_steps=1`).
* Same machine and threads: `torch.set_num_threads(--threads)` (2, the cores of the box these
  figures come from; XLA uses every core, the same 2), `dataloader_num_workers=0`, no pinned
  memory, no logging, saving or evaluation during the timed steps (`logging_steps` beyond the run,
  `save_strategy="no"`), no progress bar.

TRL computes more per step than jaxlm (per-token entropy, mean logits and top-1 accuracy in its
fused LM head, a dozen `.item()` metric read-backs) and feeds 128 positions per row where jaxlm
feeds 127; its fused head scores every position on CPU (it compacts to the response positions
only on Triton devices). `--torch_compile` tries `torch.compile` (inductor) for a best-case TRL
figure; it is off by default because the default is what a DPOTrainer user gets.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import datasets
import numpy as np
import tokenizers
import torch
import transformers
import trl


class PreTokenizedDPOTrainer(trl.DPOTrainer):
  """DPOTrainer on a dataset that already has `prompt_ids`, `chosen_ids` and `rejected_ids`."""

  def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
    del processing_class, args, dataset_name
    return dataset


class StepClock(transformers.TrainerCallback):
  """perf_counter() at every step's begin and end, and the process CPU time at its end."""

  def __init__(self):
    self.begins, self.ends, self.cpu_ends = [], [], []

  def on_step_begin(self, args, state, control, **kwargs):
    self.begins.append(time.perf_counter())

  def on_step_end(self, args, state, control, **kwargs):
    self.ends.append(time.perf_counter())
    self.cpu_ends.append(time.process_time())


def llama_model(args) -> transformers.LlamaForCausalLM:
  """The random LlamaForCausalLM of jaxlm's shape in `args` (float32, seeded); tools/bench_trl_grpo.py uses it too."""
  config = transformers.LlamaConfig(
      vocab_size=args.vocab_size, hidden_size=args.embed_dim, intermediate_size=args.mlp_dim,
      num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
      num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim,
      max_position_embeddings=args.max_len, rms_norm_eps=1e-6, rope_theta=10_000.0, hidden_act="silu",
      tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
      initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=torch.float32)
  config._attn_implementation = args.attn
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(config).float()


def _tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """Word-level `t0 .. t{V-1}`: only its pad id is used (the data is pre-tokenized)."""
  vocab = {f"t{i}": i for i in range(vocab_size)}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1",
                                              eos_token="t2", unk_token="t3")


def _pairs(rng: np.random.Generator, rows: int, seq_len: int, prompt_len: int, vocab: int) -> datasets.Dataset:
  prompt = rng.integers(8, vocab, (rows, prompt_len))
  chosen = rng.integers(8, vocab, (rows, seq_len - prompt_len))
  rejected = rng.integers(8, vocab, (rows, seq_len - prompt_len))
  return datasets.Dataset.from_dict({"prompt_ids": prompt.tolist(), "chosen_ids": chosen.tolist(),
                                     "rejected_ids": rejected.tolist()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in (("vocab_size", 2048), ("embed_dim", 128), ("num_layers", 4), ("num_heads", 4),
                        ("num_kv_heads", 4), ("head_dim", 32), ("mlp_dim", 384), ("max_len", 512)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--batch_size", type=int, default=32, help="pairs per optimizer step")
  parser.add_argument("--seq_len", type=int, default=128, help="tokens per side, prompt + response")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best is reported")
  parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--online_reference", action="store_true", help="ref_model forward every step")
  parser.add_argument("--optim", default="adamw_torch_fused", help="transformers optimizer name")
  parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
  parser.add_argument("--torch_compile", action="store_true", help="torch.compile the policy (inductor)")
  args = parser.parse_args()
  if not 0 < args.prompt_len < args.seq_len:
    parser.error(f"need 0 < prompt_len ({args.prompt_len}) < seq_len ({args.seq_len})")
  torch.set_num_threads(args.threads)
  os.environ.setdefault("TQDM_DISABLE", "1")
  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()

  model = llama_model(args)
  ref_model = copy.deepcopy(model).eval() if args.online_reference else None
  train = _pairs(np.random.default_rng(0), 8 * args.batch_size, args.seq_len, args.prompt_len, args.vocab_size)
  total_steps = args.warmup + args.repeats * args.steps
  clock = StepClock()
  with tempfile.TemporaryDirectory() as tmp:
    config = trl.DPOConfig(
        output_dir=tmp, seed=0, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=total_steps,
        learning_rate=3e-4, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=20, optim=args.optim, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, loss_type=["sigmoid"], beta=0.1, max_length=None,
        precompute_ref_log_probs=not args.online_reference, precompute_ref_batch_size=args.batch_size,
        dataloader_num_workers=0, dataloader_pin_memory=False, logging_steps=total_steps + 1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        torch_compile=args.torch_compile)
    start = time.perf_counter()
    trainer = PreTokenizedDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=train,
                                     processing_class=_tokenizer(args.vocab_size), callbacks=[clock])
    setup_s = time.perf_counter() - start
    result = trainer.train()

  ends = clock.ends
  if len(ends) != total_steps:
    raise RuntimeError(f"timed {len(ends)} steps, expected {total_steps}")
  windows, cpu_windows, data_fractions = [], [], []
  for i in range(args.repeats):
    first, last = args.warmup - 1 + i * args.steps, args.warmup - 1 + (i + 1) * args.steps
    windows.append((ends[last] - ends[first]) / args.steps)
    cpu_windows.append((clock.cpu_ends[last] - clock.cpu_ends[first]) / args.steps)
    # Before on_step_begin: fetching + collating the batch (and the previous step's logging check).
    before = sum(clock.begins[s] - ends[s - 1] for s in range(first + 1, last + 1))
    data_fractions.append(before / (ends[last] - ends[first]))
    print(f"  window: {windows[-1] * 1e3:.1f} ms/step, {args.batch_size / windows[-1]:.1f} pairs/s "
          f"({100 * data_fractions[-1]:.1f}% before on_step_begin, process CPU {cpu_windows[-1] * 1e3:.0f} ms/step)",
          flush=True)
  best = min(windows)
  reference = "online" if args.online_reference else "precomputed"
  num_params = sum(p.numel() for p in trainer.model.parameters())
  print(f"TRL DPOTrainer: {num_params:,} params, {args.batch_size} pairs x 2 x {args.seq_len} tokens (prompt "
        f"{args.prompt_len} + response {args.seq_len - args.prompt_len}), {reference} reference, {args.optim}, "
        f"{args.threads} threads, float32, attn {args.attn}{', torch.compile' if args.torch_compile else ''}, "
        f"setup {setup_s:.1f} s, train loss {result.training_loss:.4f}")
  print(f"best of {len(windows)} windows of {args.steps} steps: {best * 1e3:.1f} ms/step, "
        f"{args.batch_size / best:.1f} pairs/s")
  print(json.dumps({"framework": "trl", "pairs_per_s": round(args.batch_size / best, 2),
                    "ms_per_step": round(best * 1e3, 2), "windows_ms": [round(w * 1e3, 2) for w in windows],
                    "cpu_ms_per_step": [round(w * 1e3, 1) for w in cpu_windows],
                    "data_fraction": [round(f, 4) for f in data_fractions], "batch_size": args.batch_size,
                    "seq_len": args.seq_len, "prompt_len": args.prompt_len, "steps_per_window": args.steps,
                    "reference": reference, "optim": args.optim, "threads": args.threads, "attn": args.attn,
                    "torch_compile": args.torch_compile, "trl": trl.__version__,
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
