"""Evaluation by generation: text completions and the world's fact-completion accuracy.

Loss and perplexity over validation batches live in `jaxlm.training.evaluate`; this module
measures what a model *says*, using the KV-cache sampler.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm.data import world_reward


def _bucket(n: int, multiple: int = 16) -> int:
  """Rounds a prompt length up, so prompts of similar length share one compilation."""
  return max(multiple, -(-n // multiple) * multiple)


def complete(params, config: model_lib.ModelConfig, tokenizer, prefixes: Sequence[str], *,
             max_new_tokens: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[str]:
  """Greedy continuations of plain-text prefixes (each starts a document: `<bos> prefix`).

  Args:
    params: plain model params (on device or host).
    config: the model config.
    tokenizer: a `jaxlm.tokenizer.Tokenizer`.
    prefixes: the texts to continue; one longer than the context allows keeps its last tokens.
    max_new_tokens: tokens generated per prefix.
    batch_size: prefixes per generation call; the last batch is padded to this size, so every
      call has the same shape.
    stop_ids: token ids that end a continuation (default: none; `</s>` is a natural choice).

  Returns:
    The decoded continuations, in order.
  """
  # A prefix too long for the context keeps its last tokens (what the continuation follows).
  room = config.max_len - max_new_tokens - 1
  if room < 1:
    raise ValueError(f"{max_new_tokens} new tokens leave no room for a prefix within the model's "
                     f"max_len {config.max_len}")
  encoded = [[tokenizer.bos_id] + tokenizer.encode(p)[-room:] for p in prefixes]
  width = min(_bucket(max((len(e) for e in encoded), default=1)), config.max_len - max_new_tokens)
  outputs = []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)  # Padding rows: a lone <pad> prompt.
    for i, ids in enumerate(chunk):
      tokens[i, : len(ids)] = ids
      lengths[i] = len(ids)
    generated, counts = sampling.greedy_generate(params, tokens, lengths, config=config,
                                                 max_new_tokens=max_new_tokens,
                                                 stop_ids=tuple(stop_ids))
    generated, counts = np.asarray(generated), np.asarray(counts)
    outputs += [tokenizer.decode(generated[i, : counts[i]].tolist()) for i in range(len(chunk))]
  return outputs


def fact_completion_accuracy(params, config: model_lib.ModelConfig, tokenizer,
                             probes: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 8,
                             batch_size: int = 64) -> tuple[dict[str, float], list[dict]]:
  """How often the model continues a fact's prose prefix with the fact (world probes).

  A probe (`jaxlm.data.world.fact_probes`) is correct when the greedy continuation *starts*
  with one of its accepted answers, as whole words after normalising case and punctuation
  ("The capital of France is" -> " Paris, ..." is correct; " a city called Paris" is not:
  completion, not eventual mention, is what is measured).

  Returns:
    (metrics, rows): metrics has `fact_accuracy` overall, `fact_accuracy/<family>` per family
    and `fact_accuracy/heldout` on held-out subjects and operand pairs; rows are the probes
    with their `completion` and `correct`.
  """
  completions = complete(params, config, tokenizer, [p["prefix"] for p in probes],
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
  rows = []
  for probe, completion in zip(probes, completions):
    text = world_reward.normalize(completion)
    correct = any(text.startswith(world_reward.normalize(a)) for a in probe["accepted"])
    rows.append({**probe, "completion": completion, "correct": correct})
  metrics = {"fact_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else float("nan")}
  for key, select in [(f"fact_accuracy/{f}", lambda r, f=f: r["family"] == f)
                      for f in sorted({r["family"] for r in rows})] + [
                          ("fact_accuracy/heldout", lambda r: r["heldout"])]:
    chosen = [r["correct"] for r in rows if select(r)]
    if chosen:
      metrics[key] = float(np.mean(chosen))
  return metrics, rows
