r"""The reference for tools/bench_sampler.py: Hugging Face `generate` on a jaxlm-shaped model.

Not a jaxlm dependency: run it from a scratch environment that has torch and transformers::

  python -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch==2.13.0 transformers
  /tmp/hfenv/bin/python tools/bench_hf_generate.py                  # batch 1 and 64
  python tools/bench_sampler.py                                      # the jaxlm side

It times `LlamaForCausalLM.generate(..., do_sample=True, top_k=0, max_new_tokens=N,
min_new_tokens=N, use_cache=True)` and prints one JSON line per batch size, with the same
fields as `tools/bench_sampler.py`.

How the comparison is made fair:

* Same model shape and arithmetic: the defaults are jaxlm's `:cpu` preset (configs/common.py:
  vocab 2048, embed 128, 4 layers, 4 heads of 32, 4 kv heads, SwiGLU 384, max_len 512), as a
  Llama: pre-norm RMSNorm (eps 1e-6), RoPE (theta 1e4, the same rotate-half pairing), SwiGLU,
  tied input/output embeddings, no biases, float32 weights and compute. Weights are random
  (normal, std 0.02): speed does not depend on them.
* Same work: prompts of the same shape (batch x 32 random ids, no padding), 128 new tokens per row,
  drawn from the full softmax at temperature 1 (`top_k=0`, top_p 1), with the KV cache. No row
  may stop early: HF gets `min_new_tokens=N` (which keeps the eos logit at -inf), jaxlm gets no
  stop ids. HF does not compute the log-probs of its samples (jaxlm does, for PPO), so HF does
  slightly less work per token.
* Same machine and cores: torch runs `--threads` intra-op threads (default: the core count);
  `tools/bench_sampler.py` splits the CPU into as many JAX devices (`--cpu_devices`, one per
  core: XLA:CPU runs ops this small on one thread, torch spreads each matmul over its threads).
  Run both scripts on an otherwise idle machine, or run each twice and keep the better figure.
* Same clock: one untimed warm-up call per shape (jaxlm compiles there; torch warms its
  allocator), then the best of `--repeats` timed calls. `total_s` is one whole call (prefill
  and N samples). `prefill_s` is a call with a single new token (prefill + one sample), so
  decode tokens/s = batch * (N - 1) / (total_s - prefill_s), in both scripts alike.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers


def _model(args) -> transformers.LlamaForCausalLM:
  config = transformers.LlamaConfig(
      vocab_size=args.vocab_size, hidden_size=args.embed_dim,
      intermediate_size=args.mlp_dim, num_hidden_layers=args.num_layers,
      num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
      head_dim=args.head_dim, max_position_embeddings=args.max_len, rms_norm_eps=1e-6,
      rope_theta=10_000.0, hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
      mlp_bias=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
      dtype=torch.float32, attn_implementation=args.attn)
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(config).eval()


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in (("vocab_size", 2048), ("embed_dim", 128), ("num_layers", 4),
                        ("num_heads", 4), ("num_kv_heads", 4), ("head_dim", 32),
                        ("mlp_dim", 384), ("max_len", 512)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--batch_sizes", default="1,64")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  model = _model(args)
  n = args.new_tokens

  for batch in (int(b) for b in args.batch_sizes.split(",")):
    prompts = torch.randint(3, args.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompts)

    def run(new_tokens, seed=0):
      torch.manual_seed(seed)
      with torch.inference_mode():
        out = model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, use_cache=True)
      assert out.shape == (batch, args.prompt_len + new_tokens), out.shape
      return out

    run(n), run(1)  # warm-up
    total = _best_time(lambda: run(n), args.repeats)
    prefill = _best_time(lambda: run(1), args.repeats)
    print(json.dumps({
        "impl": f"hf_transformers {transformers.__version__} torch {torch.__version__} "
                f"({model.config._attn_implementation}, {args.threads} threads)",
        "batch": batch, "prompt_len": args.prompt_len, "new_tokens": n,
        "total_s": round(total, 4), "prefill_s": round(prefill, 4),
        "tokens_per_s": round(batch * n / total, 1),
        "decode_tokens_per_s": round(batch * (n - 1) / max(total - prefill, 1e-9), 1),
    }), flush=True)


if __name__ == "__main__":
  main()
