"""Evaluation by generation: text completions and the world's fact-completion accuracy.

Loss and perplexity over validation batches live in `jaxlm.training.evaluate`; this module
measures what a model *says*, using the KV-cache sampler.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm.tokenizer import bos_prefix
from jaxlm.data import world_reward


def _bucket(n: int, multiple: int = 16) -> int:
  """Rounds a prompt length up, so prompts of similar length share one compilation."""
  return max(multiple, -(-n // multiple) * multiple)


def complete(params, config: model_lib.ModelConfig, tokenizer, prefixes: Sequence[str], *,
             max_new_tokens: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[str]:
  """Greedy continuations of plain-text prefixes (each starts a document: `<bos> prefix`, or
  just `prefix` for a tokenizer without bos).

  Args:
    params: plain model params (on device or host).
    config: the model config.
    tokenizer: any jaxlm tokenizer (`jaxlm.tokenizer.TokenizerLike`).
    prefixes: the texts to continue; one longer than the context allows keeps its last tokens.
    max_new_tokens: tokens generated per prefix.
    batch_size: prefixes per generation call; the last batch is padded to this size, so every
      call has the same shape.
    stop_ids: token ids that end a continuation (default: none; `</s>` is a natural choice).

  Returns:
    The decoded continuations, in order.
  """
  # A prefix too long for the context keeps its last tokens (what the continuation follows).
  bos = bos_prefix(tokenizer)
  room = config.max_len - max_new_tokens - len(bos)
  if room < 1:
    raise ValueError(f"{max_new_tokens} new tokens leave no room for a prefix within the model's "
                     f"max_len {config.max_len}")
  encoded = [bos + tokenizer.encode(p)[-room:] for p in prefixes]
  if any(not ids for ids in encoded):  # Only possible without bos: nothing to continue from.
    raise ValueError("complete: an empty prefix needs a tokenizer with a bos token")
  width = min(_bucket(max((len(e) for e in encoded), default=1)), config.max_len - max_new_tokens)
  outputs = []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    tokens[:, 0] = tokenizer.pad_id  # Padding rows: a lone <pad> prompt.
    lengths = np.ones((batch_size,), np.int32)
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


@functools.partial(jax.jit, static_argnames="config")
def _sequence_log_probs(params, tokens: jax.Array, mask: jax.Array, *, config: model_lib.ModelConfig):
  """Per-row mean log p(tokens[t] | tokens[:t]) over the positions where mask[t] is True."""
  logits = model_lib.Transformer(config).apply({"params": params}, tokens[:, :-1]).logits
  log_probs = losses.token_log_probs(logits=logits, targets=tokens[:, 1:])
  weights = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(log_probs * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)


def fact_choice_accuracy(params, config: model_lib.ModelConfig, tokenizer,
                         probes: Sequence[Mapping[str, Any]], *,
                         candidate_pool: Sequence[Mapping[str, Any]] | None = None,
                         batch_size: int = 256) -> tuple[dict[str, float], list[dict]]:
  """Multiple choice by likelihood: is the right answer the model's most likely continuation?

  For each probe, every distinct answer of its family among `candidate_pool` (default:
  `probes`; pass all of a split's probes when scoring a subset, so the choices are all
  capitals, all continents, ...) is scored by its mean per-token log-probability after the prefix,
  log p(answer | <bos> prefix), and the probe is correct when its own answer scores highest.
  This measures what the model *knows* independently of whether greedy decoding would phrase
  it that way, so it moves long before exact completion does (lm-eval-harness's normalised
  multiple-choice accuracy, with tokens as the unit).

  Returns:
    (metrics, rows): `fact_choice_accuracy`, per family `fact_choice_accuracy/<family>`, and
    `fact_choice_chance` (the mean of 1 / number of choices: what guessing scores); rows are
    the probes with the `choice` the model ranked first.
  """
  families: dict[str, list[str]] = {}
  for p in candidate_pool or probes:
    families.setdefault(p["family"], [])
    if p["answer"] not in families[p["family"]]:
      families[p["family"]].append(p["answer"])
  sequences, owners = [], []
  for i, probe in enumerate(probes):
    prefix = bos_prefix(tokenizer) + tokenizer.encode(probe["prefix"])
    for candidate in families[probe["family"]]:
      # Each content is encoded on its own (like the chat template), so a candidate's tokens
      # are the same whatever prefix precedes it.
      answer = tokenizer.encode(candidate)
      sequences.append((prefix + answer, len(prefix)))
      owners.append((i, candidate))
  width = min(_bucket(max(len(s) for s, _ in sequences)), config.max_len)
  scores = []
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    for row, (ids, answer_start) in enumerate(chunk):
      ids = ids[:width]
      tokens[row, : len(ids)] = ids
      mask[row, answer_start: len(ids)] = True
    scores += np.asarray(_sequence_log_probs(params, tokens, mask, config=config))[: len(chunk)].tolist()
  best: dict[int, tuple[float, str]] = {}
  for (i, candidate), score in zip(owners, scores):
    if i not in best or score > best[i][0]:
      best[i] = (score, candidate)
  rows = [{**p, "choice": best[i][1], "correct": best[i][1] == p["answer"]} for i, p in enumerate(probes)]
  metrics = {"fact_choice_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else float("nan"),
             "fact_choice_chance": float(np.mean([1 / len(families[p["family"]]) for p in probes]))}
  for family in sorted({p["family"] for p in probes}):
    metrics[f"fact_choice_accuracy/{family}"] = float(np.mean([r["correct"] for r in rows if r["family"] == family]))
  return metrics, rows
