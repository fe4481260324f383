"""DPO: response log-probs from the shared forward pass, precomputed reference == online, it
learns a synthetic preference, and the stage runs end to end from a tiny SFT run directory."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import dpo
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.data import pipelines

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)
PROMPT = [1, 5, 6]


def _pairs(rows_chosen, rows_rejected, width=24, score_len=16):
  """A host pairs batch in the shared-prompt layout: PROMPT, then each response; `record_index` = row."""
  examples = [pipelines.shared_pair_example(np.asarray(PROMPT), np.asarray(chosen), np.asarray(rejected),
                                            max_len=width, score_len=score_len)
              for chosen, rejected in zip(rows_chosen, rows_rejected)]
  batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  batch["record_index"] = np.arange(len(examples), dtype=np.int32)
  return batch


def _params(seed):
  return sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens):
  return model_lib.Transformer(config).apply({"params": params}, tokens).logits


def _alone_log_prob(config, params, response):
  """log p(response | PROMPT) from a row of its own: the definition the shared layout must meet."""
  tokens = PROMPT + response
  logits = _logits(config, params, jnp.asarray([tokens]))
  log_probs = jax.nn.log_softmax(logits[0], axis=-1)
  return sum(float(log_probs[t - 1, tok]) for t, tok in enumerate(tokens) if t >= len(PROMPT))


@pytest.mark.parametrize("changes", [{}, {"attention_impl": "blocked", "num_kv_heads": 1, "scan_unroll": 2}])
def test_pair_log_probs_equal_each_response_scored_in_a_row_of_its_own(changes):
  """One row holds the prompt once and both responses; each is scored as if alone after it."""
  config = CONFIG.replace(**changes)
  params = sharding.unbox(model_lib.init_params(config, jax.random.key(0)))
  pairs = ([[9, 10, 2], [12, 2]], [[11, 2], [13, 14, 15, 16, 2]])
  pair_log_probs = jax.jit(functools.partial(dpo.pair_log_probs, model_lib.Transformer(config)))
  chosen, rejected = pair_log_probs(params, _pairs(*pairs))
  for row, (c, r) in enumerate(zip(*pairs)):
    np.testing.assert_allclose(float(chosen[row]), _alone_log_prob(config, params, c), rtol=1e-5)
    np.testing.assert_allclose(float(rejected[row]), _alone_log_prob(config, params, r), rtol=1e-5)
  # Padding the row and the scored slots further changes nothing.
  wide = _pairs(*pairs, width=32, score_len=24)
  np.testing.assert_allclose(np.asarray(pair_log_probs(params, wide)), np.asarray([chosen, rejected]), rtol=1e-5)


def test_precomputed_reference_gives_the_online_loss():
  policy, reference = _params(0), _params(1)
  batch = _pairs([[9, 10, 2], [12, 2], [13, 14, 15, 2]], [[11, 2], [9, 9, 2], [16, 2]])
  compute = dpo.reference_fn(CONFIG)
  table = dpo.precompute_reference(reference, CONFIG, [batch], num_records=3)
  online = dpo.ReferenceAttacher(iter([batch]), params=reference, compute=compute)
  offline = dpo.ReferenceAttacher(iter([batch]), table=table)
  loss_fn = dpo.dpo_loss_fn(model_lib.Transformer(CONFIG), loss="sigmoid", beta=0.1)
  a = loss_fn(policy, next(online), None)
  b = loss_fn(policy, next(offline), None)
  np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
  # And with policy == reference every pair's loss is log 2.
  same = loss_fn(reference, dpo.ReferenceAttacher(iter([batch]), table=table).__next__(), None)
  np.testing.assert_allclose(float(same[0]) / 3, np.log(2), rtol=1e-5)
  with pytest.raises(ValueError, match="no precomputed reference"):
    next(dpo.ReferenceAttacher(iter([{**batch, "record_index": np.asarray([0, 1, 5])}]),
                               table=np.concatenate([table, np.full((3, 2), np.nan, np.float32)])))


def test_the_loss_is_the_losses_module_dpo_on_these_log_probs():
  policy, reference = _params(0), _params(1)
  batch = dpo.ReferenceAttacher(iter([_pairs([[9, 2]], [[10, 2]])]), params=reference,
                                compute=dpo.reference_fn(CONFIG)).__next__()
  model = model_lib.Transformer(CONFIG)
  chosen, rejected = dpo.pair_log_probs(model, policy, batch)
  expected = losses.dpo_loss(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                             reference_chosen_logps=batch["reference_chosen_logps"],
                             reference_rejected_logps=batch["reference_rejected_logps"], beta=0.3,
                             label_smoothing=0.1)
  total, count, _ = dpo.dpo_loss_fn(model, loss="sigmoid", beta=0.3, label_smoothing=0.1)(policy, batch, None)
  np.testing.assert_allclose(float(total), float(expected[0]), rtol=1e-6)
  assert float(count) == 1
  with pytest.raises(ValueError, match="unknown DPO loss"):
    dpo.dpo_loss_fn(model, loss="kto", beta=0.1)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_learns_a_one_token_preference(loss):
  """Chosen responses end with token 7, rejected ones with token 8: implicit accuracy rises."""
  rng = np.random.default_rng(0)

  def response(last):
    return list(rng.integers(9, 32, size=rng.integers(2, 6))) + [last, 2]

  def batch(n):
    return _pairs([response(7) for _ in range(n)], [response(8) for _ in range(n)])

  reference = _params(0)
  compute = dpo.reference_fn(CONFIG)
  model = model_lib.Transformer(CONFIG)
  loss_fn = dpo.dpo_loss_fn(model, loss=loss, beta=0.5)
  tx = optax.adam(3e-3)
  params, opt_state = reference, tx.init(reference)

  @jax.jit
  def step(params, opt_state, batch):
    def mean_loss(p):
      total, count, aux = loss_fn(p, batch, None)
      return total / count
    grads = jax.grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  held_out = dpo.ReferenceAttacher(iter([batch(64)]), params=reference, compute=compute).__next__()

  def accuracy(params):
    _, count, aux = loss_fn(params, held_out, None)
    return float(aux["accuracy"] / count)

  before = accuracy(params)
  for _ in range(30):
    params, opt_state = step(params, opt_state,
                             dpo.ReferenceAttacher(iter([batch(16)]), params=reference, compute=compute).__next__())
  after = accuracy(params)
  assert before == 0.5 and after > 0.9, (before, after)  # 0.5: policy == reference ties every pair.


def test_a_tiny_dpo_run_writes_a_complete_run_directory(tiny_dpo_run, tiny_sft_run):
  workdir, _ = tiny_dpo_run
  for name in ("config.json", "manifest.json", "tokenizer.model", "metrics.jsonl", "samples.jsonl",
               "reference_logps.npy"):
    assert (workdir / name).is_file(), name
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["stage"] == "dpo" and manifest["complete"] and manifest["parent"] == str(tiny_sft_run[0])
  final = manifest["final_metrics"]
  for key in ("val_loss", "val_accuracy", "val_margin", "gold_reward", "win_rate", "kl", "length", "well_formed",
              "reference_gold_reward"):
    assert key in final and np.isfinite(final[key]), key
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("chosen_reward" in r and "rejected_reward" in r and "margin" in r for r in rows)
