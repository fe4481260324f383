"""DPO: response log-probs from the shared forward pass, precomputed reference == online, it
learns a synthetic preference, and the stage runs end to end from a tiny SFT run directory."""

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

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)
PROMPT = [1, 5, 6]


def _pairs(rows_chosen, rows_rejected, width=12):
  """A host pairs batch: prompt PROMPT then each response; `record_index` = row number."""
  n = len(rows_chosen)
  batch = {"valid": np.ones(n, bool), "record_index": np.arange(n, dtype=np.int32)}
  for side, rows in (("chosen", rows_chosen), ("rejected", rows_rejected)):
    tokens = np.zeros((n, width), np.int32)
    for i, response in enumerate(rows):
      tokens[i, : len(PROMPT) + len(response)] = PROMPT + response
    lengths = np.asarray([len(PROMPT) + len(r) for r in rows])
    index = np.arange(width)
    real = index < lengths[:, None]
    batch[f"{side}_tokens"] = tokens
    batch[f"{side}_segment_ids"] = real.astype(np.int32)
    batch[f"{side}_positions"] = np.where(real, index, 0).astype(np.int32)
    batch[f"{side}_loss_mask"] = real & (index >= len(PROMPT))
    batch[f"{side}_last_index"] = (lengths - 1).astype(np.int32)
  return batch


def _params(seed):
  return sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed)))


def test_pair_log_probs_sum_the_response_tokens_only():
  params = _params(0)
  batch = _pairs([[9, 10, 2]], [[11, 2]])
  chosen, rejected = dpo.pair_log_probs(model_lib.Transformer(CONFIG), params, batch)
  logits = model_lib.Transformer(CONFIG).apply({"params": params}, jnp.asarray([PROMPT + [9, 10, 2]])).logits
  log_probs = jax.nn.log_softmax(logits[0], axis=-1)
  expected = sum(float(log_probs[t - 1, tok]) for t, tok in enumerate(PROMPT + [9, 10, 2]) if t >= len(PROMPT))
  np.testing.assert_allclose(float(chosen[0]), expected, rtol=1e-5)
  # Changing a prompt token's *target* role cannot matter; padding further does not either.
  wide = _pairs([[9, 10, 2]], [[11, 2]], width=24)
  np.testing.assert_allclose(np.asarray(dpo.pair_log_probs(model_lib.Transformer(CONFIG), params, wide)),
                             np.asarray([chosen, rejected]), rtol=1e-5)


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
