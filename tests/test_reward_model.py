"""The reward model: read at the last real token, Bradley-Terry training that learns, the held-out
report, and the stage end to end from a tiny SFT run directory."""

import json

import jax
import numpy as np
import optax

from jaxlm import model as model_lib
from jaxlm import reward_model
from jaxlm import sharding

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)


def _pair_batch(chosen_rows, rejected_rows, width):
  """A pairs batch from token lists (the prompt is the first 2 tokens of each row)."""
  batch = {"valid": np.ones(len(chosen_rows), bool), "record_index": np.arange(len(chosen_rows), dtype=np.int32)}
  for side, rows in (("chosen", chosen_rows), ("rejected", rejected_rows)):
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)] = row
    n = np.asarray([len(r) for r in rows])
    index = np.arange(width)
    batch[f"{side}_tokens"] = tokens
    batch[f"{side}_segment_ids"] = (index < n[:, None]).astype(np.int32)
    batch[f"{side}_positions"] = np.broadcast_to(index, tokens.shape).astype(np.int32) * (index < n[:, None])
    batch[f"{side}_loss_mask"] = (index >= 2) & (index < n[:, None])
    batch[f"{side}_last_index"] = (n - 1).astype(np.int32)
  return batch


def _params(seed=0):
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed), scalar_head=True))
  # A non-zero head, so rewards differ between sequences.
  params["scalar_head"] = jax.tree.map(lambda x: x + 0.3, params["scalar_head"])
  return params


def test_extra_padding_does_not_change_a_reward():
  params = _params()
  chosen, rejected = [[1, 5, 9, 3, 7]], [[1, 5, 4, 8]]
  narrow = reward_model.score_pair_batch(params, _pair_batch(chosen, rejected, 8), config=CONFIG)
  wide = reward_model.score_pair_batch(params, _pair_batch(chosen, rejected, 24), config=CONFIG)
  np.testing.assert_allclose(np.asarray(narrow), np.asarray(wide), rtol=1e-5, atol=1e-6)
  # And the reward is the head at the last real token, not at a pad position.
  out = model_lib.Transformer(CONFIG).apply({"params": params}, np.asarray([[1, 5, 9, 3, 7]]),
                                            scalar_index=np.asarray([4]), lm_head=False)
  np.testing.assert_allclose(np.asarray(narrow[0]), np.asarray(out.scalar), rtol=1e-5)


def test_swapping_chosen_and_rejected_flips_the_margin():
  params = _params()
  a, b = [[1, 5, 9, 3], [1, 2, 3, 4, 5]], [[1, 5, 4], [1, 2, 6]]
  chosen, rejected = reward_model.score_pair_batch(params, _pair_batch(a, b, 8), config=CONFIG)
  chosen2, rejected2 = reward_model.score_pair_batch(params, _pair_batch(b, a, 8), config=CONFIG)
  np.testing.assert_allclose(np.asarray(chosen - rejected), -np.asarray(chosen2 - rejected2), rtol=1e-6)


def test_invalid_rows_carry_no_loss():
  params = _params()
  batch = _pair_batch([[1, 5, 9, 3], [1, 2, 3]], [[1, 5, 4], [1, 2, 6, 6]], 8)
  loss_fn = reward_model.reward_loss_fn(model_lib.Transformer(CONFIG))
  full, count, _ = loss_fn(params, batch, None)
  batch["valid"][1] = False
  first, count1, _ = loss_fn(params, batch, None)
  assert float(count) == 2 and float(count1) == 1 and float(first) < float(full)


def test_learns_a_one_token_preference_within_a_few_dozen_steps():
  """Responses of random tokens; the chosen one contains token 7, the rejected one does not."""
  rng = np.random.default_rng(0)

  def response(with_seven):
    tokens = list(rng.choice([t for t in range(8, 32)], size=rng.integers(3, 8)))
    if with_seven:
      tokens[rng.integers(len(tokens))] = 7
    return [1, 5] + tokens

  def batch(n):
    return _pair_batch([response(True) for _ in range(n)], [response(False) for _ in range(n)], 12)

  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(0), scalar_head=True))
  loss_fn = reward_model.reward_loss_fn(model_lib.Transformer(CONFIG))
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def mean_loss(p):
      total, count, _ = loss_fn(p, batch, None)
      return total / count
    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  held_out = batch(64)
  before = reward_model.pairwise_report(reward_model.score_pairs(params, CONFIG, [held_out]))
  for _ in range(40):
    params, opt_state, _ = step(params, opt_state, batch(16))
  after = reward_model.pairwise_report(reward_model.score_pairs(params, CONFIG, [held_out]))
  assert before["accuracy"] < 0.7 and after["accuracy"] > 0.9, (before["accuracy"], after["accuracy"])


def test_pairwise_report_against_the_gold_ceiling():
  scores = {"chosen": np.asarray([2.0, 1.0, 0.0, 3.0]), "rejected": np.asarray([1.0, 2.0, 0.0, 1.0]),
            "chosen_length": np.asarray([4, 10, 5, 40]), "rejected_length": np.asarray([6, 10, 3, 20]),
            "record_index": np.asarray([0, 1, 2, 3])}
  records = [{"meta": {"gold_chosen": g, "gold_rejected": r}} for g, r in
             [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 0.0)]]
  report = reward_model.pairwise_report(scores, records)
  assert report["accuracy"] == (1 + 0 + 0.5 + 1) / 4
  assert report["margin"] == (1 - 1 + 0 + 2) / 4
  assert report["label_ceiling"] == (1 + 0 + 0.5 + 1) / 4
  assert report["accuracy_vs_ceiling"] == 1.0
  assert report["gold_accuracy"] == 1.0  # Pairs 0, 1, 3 (unequal gold): all ranked like the gold.
  assert report["accuracy/len_0_8"] == (1 + 0.5) / 2 and report["accuracy/len_16_32"] == 1.0
  # Every metric with the pairs behind it; empty bins are counted (0) but have no accuracy.
  assert report["num_pairs"] == 4 and report["num_pairs/gold_accuracy"] == 3
  assert {k: v for k, v in report.items() if k.startswith("num_pairs/len_")} == {
      "num_pairs/len_0_8": 2, "num_pairs/len_8_16": 1, "num_pairs/len_16_32": 1, "num_pairs/len_32_64": 0,
      "num_pairs/len_64_inf": 0}
  assert "accuracy/len_32_64" not in report
  # Unequal lengths in pairs 0 (shorter side won), 2 (a tie: half) and 3 (longer side won).
  assert report["length_preference"] == (0 + 0.5 + 1) / 3 and report["num_pairs/length_preference"] == 3
  assert -1 <= report["gold_pearson"] <= 1 and -1 <= report["gold_spearman"] <= 1


def test_a_tiny_reward_run_writes_a_complete_run_directory(tiny_reward_run, tiny_sft_run):
  workdir, _ = tiny_reward_run
  for name in ("config.json", "manifest.json", "tokenizer.model", "metrics.jsonl", "reward_stats.json"):
    assert (workdir / name).is_file(), name
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert manifest["stage"] == "reward" and manifest["complete"] and manifest["parent"] == str(tiny_sft_run[0])
  final = manifest["final_metrics"]
  for key in ("val_accuracy", "val_margin", "val_label_ceiling", "val_gold_pearson", "val_length_correlation"):
    assert key in final, key
  stats = json.loads((workdir / "reward_stats.json").read_text())
  assert stats["num_samples"] > 0 and stats["std"] > 0 and np.isfinite(stats["mean"])


def test_score_tool_scores_pairs_and_names_bad_lines(tiny_reward_run, tmp_path):
  import subprocess
  import sys

  from conftest import ROOT

  workdir, _ = tiny_reward_run
  good = tmp_path / "pairs.jsonl"
  good.write_text(json.dumps({"prompt": "What is the capital of France?", "response": "Paris.", "id": 1}) + "\n"
                  + json.dumps({"prompt": [{"role": "user", "content": "What's 2 + 2?"}], "reply": "4"}) + "\n")
  out = tmp_path / "scored.jsonl"
  result = subprocess.run([sys.executable, "tools/score.py", f"--workdir={workdir}", f"--input={good}",
                           f"--output={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 2 and rows[0]["id"] == 1
  assert all(np.isfinite(r["reward"]) and "reward_normalized" in r for r in rows)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
  result = subprocess.run([sys.executable, "tools/score.py", f"--workdir={workdir}", f"--input={bad}",
                           f"--output={tmp_path / 'x.jsonl'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and f"{bad}:1" in result.stderr and "'reply' or 'response'" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "x.jsonl").exists()


def test_pairwise_report_bin_counts_sum_to_num_pairs():
  rng = np.random.default_rng(0)
  n = 257
  scores = {"chosen": rng.normal(size=n), "rejected": rng.normal(size=n),
            "chosen_length": rng.integers(1, 150, n), "rejected_length": rng.integers(1, 150, n),
            "record_index": np.arange(n)}
  report = reward_model.pairwise_report(scores)
  bins = {k[len("num_pairs/"):]: v for k, v in report.items() if k.startswith("num_pairs/len_")}
  assert len(bins) == len(reward_model.LENGTH_EDGES) and sum(bins.values()) == report["num_pairs"] == n
  assert all(isinstance(v, int) for v in bins.values())
  for name, count in bins.items():  # An accuracy exactly where its bin holds pairs.
    assert (f"accuracy/{name}" in report) == (count > 0)
  assert report["num_pairs/length_preference"] == int((scores["chosen_length"] != scores["rejected_length"]).sum())
  empty = reward_model.pairwise_report({k: v[:0] for k, v in scores.items()})
  assert empty["num_pairs"] == 0 and all(empty[f"num_pairs/{name}"] == 0 for name in bins)
