r"""The reference for `tools/bench_grpo.py`: TRL's GRPOTrainer throughput (replies/s) on jaxlm's shape.

Not a jaxlm dependency: run it from a scratch environment that has torch, transformers and trl::

  /tmp/refenv/bin/pip install trl          # into an env with torch (CPU) + transformers already
  /tmp/refenv/bin/python tools/bench_trl_grpo.py          # 16 prompts x G 4, 48-token replies, 2 threads
  python tools/bench_grpo.py                              # the jaxlm side, same defaults

(Figures measured with trl 1.16.0, transformers 5.24.0, torch 2.13.0+cpu, accelerate 1.16.0.)

It runs `GRPOTrainer.train()` unmodified, no vLLM (transformers' `generate` with its dynamic KV
cache), with a callback that stamps `time.perf_counter()` at every `on_step_end`. With
`per_device_train_batch_size = prompts_per_step x G`, `num_generations = G`,
`steps_per_generation = 1`, `gradient_accumulation_steps = 1` and `num_iterations = 1`, one
trainer step is one GRPO iteration: generate G replies to each of `--prompts_per_step`
prompts, score them (reward function, reference log-probs), advantages, one optimizer step,
exactly like one jaxlm iteration. The first `--warmup` steps are dropped; the mean (and the best)
over the `--steps` timed steps is reported, with the process CPU time, and a split of the step
like jaxlm's: the trainer's `_generate` (generate), the rest of `_generate_and_score_completions`
(score: reward function, reference log-probs, advantages) and the rest of the step (train:
forward, backward, optimizer step), timed by wrapping those two methods on the trainer
instance (their code is TRL's, unchanged).

Equal on both sides:

* Model: `LlamaForCausalLM` of jaxlm's `:cpu` preset (configs/common.py: vocab 2048, hidden 128,
  4 layers, 4 heads of 32, 4 kv heads, intermediate 384, SwiGLU), RoPE theta 1e4, RMSNorm eps 1e-6,
  tied embeddings, no biases, no dropout; float32 weights and compute (`bf16=False`), no gradient
  checkpointing (TRL's GRPO default is on), SDPA attention. Random weights (normal, std 0.02); the
  reference is the initial policy (TRL builds it by loading the policy's saved weights: the
  trainer only builds a reference from a path, so the random model is saved to a temp dir first).
* Work per iteration: the same `--prompts_per_step` x `--group_size` replies, prompts of
  `--prompt_len` random ids (no padding; a pool of 8 x prompts_per_step prompts, fed as
  `t<id>` words through a word-level tokenizer over `t4 .. t{V-1}` so the ids are exact and no
  special tokens are added), temperature 1, no top-k/top-p, exactly `--max_new_tokens` reply
  tokens (`min_new_tokens = max_completion_length` suppresses EOS; jaxlm passes no stop ids).
* Reward: the fraction of a reply's token ids that are even, a Python function of
  `completion_ids` (jaxlm: the same rule on the host ids).
* Objective: group-relative advantages scaled by the group's std (`scale_rewards="group"`),
  clipped ratio with epsilon 0.2, the k3 KL to the reference in the loss with beta 0.04
  (jaxlm's `grpo.kl_coef`), token-level normalisation (`loss_type="dapo"`, jaxlm's
  `loss_norm="token"`), one optimizer step per iteration.
* Optimizer: AdamW (`adamw_torch_fused`) lr 2e-5, b1 0.9, b2 0.95, eps 1e-8, weight decay 0,
  `max_grad_norm=1.0`, 2 warmup steps then cosine to 10% (jaxlm's configs/grpo.py).
* Threads: `torch.set_num_threads(--threads)` (2); jaxlm runs 2 CPU devices (one per core).
  No data-loader workers, no logging, saving or evaluation during the timed steps.

Not equal (each favours or costs one side; none changes the work's size):

* jaxlm samples with a fixed-size KV cache inside one compiled loop; TRL calls transformers'
  `generate` (a Python loop over tokens with a dynamic cache).
* The "old" log-probs: jaxlm takes them from the sampler (`grpo.old_log_probs=sampler`, the
  default: no extra forward); TRL skips that forward when `num_iterations == 1` (the ratio is
  then exactly 1 and it detaches the training forward's log-probs). Neither side runs a
  separate policy forward; both run the reference's.
* TRL computes its per-step metrics with several `.item()` reads, entropy statistics and
  gathers; jaxlm reads its metrics back once per iteration too (as its experiment does).
* jaxlm runs blocked causal attention and an unrolled layer loop under XLA; torch runs SDPA.
"""

from __future__ import annotations

import argparse
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

from bench_trl_dpo import llama_model  # the same random model as the DPO comparison (tools/ is on sys.path)


def time_calls(obj, name: str, durations: list) -> None:
  """Wraps the bound method `obj.name` so that each call appends its wall time to `durations`."""
  method = getattr(obj, name)

  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return method(*args, **kwargs)
    finally:
      durations.append(time.perf_counter() - start)

  setattr(obj, name, timed)


class StepClock(transformers.TrainerCallback):
  """perf_counter() and the process CPU time at every step's end."""

  def __init__(self):
    self.ends, self.cpu_ends = [], []

  def on_step_end(self, args, state, control, **kwargs):
    self.ends.append(time.perf_counter())
    self.cpu_ends.append(time.process_time())


def _tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """Word-level: "t17 t5" -> [17, 5], no special tokens added. Ids 0-3 are <pad> <bos> <eos> <unk>
  (names that are no prefix of a `t<id>` word: added tokens are matched inside words)."""
  specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
  vocab = {**{name: i for i, name in enumerate(specials)}, **{f"t{i}": i for i in range(len(specials), vocab_size)}}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                              eos_token="<eos>", unk_token="<unk>")


def even_id_fraction(prompts, completions, completion_ids, **kwargs):
  """The synthetic reward: the fraction of a reply's token ids that are even (jaxlm: the same)."""
  del prompts, completions, kwargs
  return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in (("vocab_size", 2048), ("embed_dim", 128), ("num_layers", 4), ("num_heads", 4),
                        ("num_kv_heads", 4), ("head_dim", 32), ("mlp_dim", 384), ("max_len", 512)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--prompts_per_step", type=int, default=16)
  parser.add_argument("--group_size", type=int, default=4, help="G: num_generations")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--steps", type=int, default=8, help="timed iterations (optimizer steps)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (jaxlm's grpo.kl_coef)")
  parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  os.environ.setdefault("TQDM_DISABLE", "1")
  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()

  p, g = args.prompts_per_step, args.group_size
  rng = np.random.default_rng(0)
  prompt_ids = rng.integers(8, args.vocab_size, (8 * p, args.prompt_len))
  train = datasets.Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in prompt_ids]})
  tokenizer = _tokenizer(args.vocab_size)
  assert tokenizer(text=train[0]["prompt"])["input_ids"] == prompt_ids[0].tolist()
  total_steps = args.warmup + args.steps
  clock = StepClock()
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "model")
    model = llama_model(args)
    model.save_pretrained(model_dir)
    model.config._name_or_path = model_dir  # TRL builds the reference from this path: the same weights.
    config = trl.GRPOConfig(
        output_dir=os.path.join(tmp, "out"), seed=0, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=p * g, num_generations=g,
        steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=1, max_steps=total_steps,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=2e-5, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=2, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.0, max_grad_norm=1.0, use_vllm=False, log_completions=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, logging_steps=total_steps + 1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    start = time.perf_counter()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_id_fraction, args=config, train_dataset=train,
                              processing_class=tokenizer, callbacks=[clock])
    setup_s = time.perf_counter() - start
    generate_s, generate_and_score_s = [], []
    time_calls(trainer, "_generate", generate_s)
    time_calls(trainer, "_generate_and_score_completions", generate_and_score_s)
    result = trainer.train()

  ends = clock.ends
  if len(ends) != total_steps:
    raise RuntimeError(f"timed {len(ends)} steps, expected {total_steps}")
  first = args.warmup - 1
  steps = [ends[i] - ends[i - 1] for i in range(first + 1, total_steps)]
  mean_s = (ends[-1] - ends[first]) / args.steps
  best_s = min(steps)
  cpu_s = (clock.cpu_ends[-1] - clock.cpu_ends[first]) / args.steps
  for s in steps:
    print(f"  step: {s * 1e3:.0f} ms ({p * g / s:.1f} replies/s)", flush=True)
  if len(generate_s) != total_steps or len(generate_and_score_s) != total_steps:
    raise RuntimeError(f"{len(generate_s)} generations for {total_steps} steps: not one per step")
  generate = float(np.mean(generate_s[args.warmup:]))
  score = float(np.mean(generate_and_score_s[args.warmup:])) - generate
  split = {"generate": generate, "score": score, "train": mean_s - generate - score}
  lengths = [float(h["completions/min_length"]) for h in trainer.state.log_history if "completions/min_length" in h]
  num_params = sum(x.numel() for x in trainer.model.parameters())
  replies = p * g
  print(f"TRL GRPOTrainer: {num_params:,} params, {p} prompts x G {g} = {replies} replies of "
        f"{args.max_new_tokens} tokens after {args.prompt_len}-token prompts, {args.threads} threads, float32, "
        f"attn {args.attn}, beta {args.beta}, setup {setup_s:.1f} s, train loss {result.training_loss:.4f}, "
        f"shortest completion {min(lengths) if lengths else float('nan'):.0f} tokens")
  print(f"mean of {args.steps} steps: {mean_s * 1e3:.0f} ms/step, {replies / mean_s:.1f} replies/s "
        f"(best {replies / best_s:.1f}); split generate {split['generate'] * 1e3:.0f} / score "
        f"{split['score'] * 1e3:.0f} / train {split['train'] * 1e3:.0f} ms; process CPU {cpu_s * 1e3:.0f} ms/step")
  print(json.dumps({"framework": "trl", "samples_per_s": round(replies / mean_s, 2),
                    "best_samples_per_s": round(replies / best_s, 2), "ms_per_step": round(mean_s * 1e3, 1),
                    "split_ms": {k: round(v * 1e3, 1) for k, v in split.items()},
                    "cpu_ms_per_step": round(cpu_s * 1e3, 1), "prompts_per_step": p, "group_size": g,
                    "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "steps": args.steps,
                    "threads": args.threads, "attn": args.attn, "trl": trl.__version__,
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
