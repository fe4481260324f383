"""Evaluation by generation and by likelihood, against direct computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import evaluation
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding

CONFIG = model_lib.ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=8, mlp_dim=64, max_len=64)
PROBES = [
    {"prefix": "The capital of France is", "answer": "Paris", "family": "capital", "accepted": ["Paris"],
     "heldout": False},
    {"prefix": "The capital of Peru is", "answer": "Lima", "family": "capital", "accepted": ["Lima"],
     "heldout": True},
    {"prefix": "A cow says", "answer": "moo", "family": "sound", "accepted": ["moo"], "heldout": False},
]
POOL = PROBES + [{"prefix": "The capital of Chad is", "answer": "N'Djamena", "family": "capital",
                  "accepted": ["N'Djamena"], "heldout": False}]


@pytest.fixture(scope="module")
def params(world_tokenizer):
  config = CONFIG.replace(vocab_size=world_tokenizer.vocab_size)
  return config, jax.tree.map(lambda p: p * 6.0, sharding.unbox(model_lib.init_params(config, jax.random.key(3))))


@functools.partial(jax.jit, static_argnums=0)
def _token_log_probs(config, params, inputs, targets):
  logits = model_lib.Transformer(config).apply({"params": params}, inputs).logits
  return losses.token_log_probs(logits=logits, targets=targets)[0]


def _direct_score(config, params, tok, prefix, answer):
  """Mean log-prob of the answer's tokens after the prefix, by one plain forward pass."""
  ids = [tok.bos_id] + tok.encode(prefix) + tok.encode(answer)
  start = 1 + len(tok.encode(prefix))
  # Right-padded to max_len so that one compilation serves every probe: in a causal model the
  # padding after the last real token cannot change the log-probs before it.
  pad = [0] * (config.max_len + 1 - len(ids))
  inputs, targets = jnp.asarray([ids[:-1] + pad]), jnp.asarray([ids[1:] + pad])
  log_probs = _token_log_probs(config, params, inputs, targets)
  return float(jnp.mean(log_probs[start - 1:len(ids) - 1]))


def test_fact_choice_picks_the_most_likely_answer_of_the_family(params, world_tokenizer):
  config, p = params
  metrics, rows = evaluation.fact_choice_accuracy(p, config, world_tokenizer, PROBES, candidate_pool=POOL)
  for row in rows:
    pool = sorted({q["answer"] for q in POOL if q["family"] == row["family"]})
    scores = {a: _direct_score(config, p, world_tokenizer, row["prefix"], a) for a in pool}
    assert row["choice"] == max(scores, key=scores.get)
    assert row["correct"] == (row["choice"] == row["answer"])
  assert metrics["fact_choice_accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
  # Capitals have 3 choices, sounds 1: guessing scores (1/3 + 1/3 + 1) / 3.
  assert metrics["fact_choice_chance"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
  assert metrics["fact_choice_accuracy/sound"] == 1.0


def test_fact_completion_is_judged_on_the_start_of_the_greedy_continuation(params, world_tokenizer):
  config, p = params
  metrics, rows = evaluation.fact_completion_accuracy(p, config, world_tokenizer, PROBES, max_new_tokens=6)
  completions = evaluation.complete(p, config, world_tokenizer, [q["prefix"] for q in PROBES], max_new_tokens=6)
  assert [r["completion"] for r in rows] == completions
  # A probe whose answer is the model's own first word is correct; one that is a word the
  # continuation never starts with is not.
  first_word = completions[0].split()[0]
  own = [{**PROBES[0], "accepted": [first_word]}, {**PROBES[0], "accepted": [first_word + "zzz"]}]
  _, judged = evaluation.fact_completion_accuracy(p, config, world_tokenizer, own, max_new_tokens=6)
  assert judged[0]["correct"] and not judged[1]["correct"]
  assert set(metrics) >= {"fact_accuracy", "fact_accuracy/capital", "fact_accuracy/heldout"}
