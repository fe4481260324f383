"""Policy evaluation: win rates count ties half, the KL estimate is teacher-forced and exact at
zero, well-formed means <|end|>, gold metrics only where a gold reward exists, the reward model
reads its last real token, and batching never changes a row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import chat_template
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import sampling
from jaxlm import sharding
from jaxlm.data import world
from jaxlm.data import world_reward
from jaxlm.tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID

# vocab_size matches the `world_tokenizer` fixture.
CONFIG = model_lib.ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=128)
NEW_TOKENS = 12
GREEDY = sampling.SamplingConfig(greedy=True)
USER_PROMPTS = [
    {"prompt": [{"role": "user", "content": "Tell me about the lighthouse keeper."}], "meta": {}},
    # Longer than the context allows: left-truncated to its last tokens.
    {"prompt": [{"role": "user", "content": "Please read this. " * 80}]},
]


def _params(seed, scale=1.0, scalar_head=False):
  """A tiny random model; `scale` > 1 sharpens it (a decisive argmax for greedy tests)."""
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed),
                                                scalar_head=scalar_head))
  params = jax.tree.map(lambda p: p * scale, params)
  if scalar_head:  # The head starts at exactly 0; give it something to read.
    kernel = jax.random.normal(jax.random.key(seed + 100), (CONFIG.embed_dim,))
    params["scalar_head"] = {"kernel": kernel, "bias": jnp.asarray(0.5)}
  return params


def _replies(texts, ended):
  """Hand-made `Replies` (ids are placeholders; only texts and ended_turn are scored)."""
  ids = [np.asarray([9] * (len(t) + 1), np.int32) for t in texts]
  return policy_eval.Replies(texts=list(texts), ended_turn=np.asarray(ended, bool),
                             prompt_ids=[np.asarray([BOS_ID], np.int32)] * len(texts),
                             reply_ids=ids, lengths=np.asarray([len(i) for i in ids], np.int32),
                             log_probs=np.zeros(len(texts), np.float32))


def _length_judge(records, texts, ended):
  """A stub judge: longer replies are better, so wins, ties and losses are easy to arrange."""
  del records, ended
  return np.asarray([len(t) for t in texts], np.float64)


@pytest.fixture(scope="module")
def world_prompts(small_world):
  return list(world.generate("prompt", "test", small_world))[:6]


def test_win_rate_counts_ties_half(world_prompts):
  assert policy_eval.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 5.0, 0.0]) == 0.5
  assert policy_eval.win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5  # Identical models: a coin flip.
  with pytest.raises(ValueError):
    policy_eval.win_rate([1.0], [1.0, 2.0])

  # With a judge: a win, a tie and a loss.
  records = [USER_PROMPTS[0]] * 3
  policy = _replies(["aaa", "bb", "c"], [True] * 3)
  baseline = _replies(["a", "bb", "cccc"], [True] * 3)
  metrics, rows = policy_eval.score_replies(records, policy, judge=_length_judge, baseline=baseline)
  assert metrics["win_rate"] == pytest.approx(0.5) and metrics["tie_rate"] == pytest.approx(1 / 3)
  assert [r["baseline_reply"] for r in rows] == ["a", "bb", "cccc"]
  assert [r["baseline_reward"] for r in rows] == [1.0, 2.0, 4.0]
  # Without a judge on prompts without a gold reward, nothing can decide.
  with pytest.raises(ValueError, match="judge"):
    policy_eval.score_replies(records, policy, baseline=baseline)

  # Without a judge on world prompts, the gold reward decides: right beats wrong, equal ties.
  record = world_prompts[0]
  right = f"The answer is {record['meta']['answer']}."
  wrong = f"The answer is {record['meta']['answer_number'] + 1}."
  policy = _replies([right, right, wrong], [True] * 3)
  baseline = _replies([wrong, right, right], [True] * 3)
  metrics, rows = policy_eval.score_replies([record] * 3, policy, baseline=baseline)
  assert metrics["win_rate"] == pytest.approx(0.5) and metrics["tie_rate"] == pytest.approx(1 / 3)
  assert rows[0]["gold_reward"] > rows[0]["baseline_gold_reward"]


def test_correct_by_domain_splits_the_correct_fraction_by_task_domain(small_world):
  """Right answers to arithmetic only: correct/arithmetic is 1, every other domain 0, and the
  domains' counts weight them into the overall correct."""
  records = list(world.generate("prompt", "test", small_world))[:60]
  domains = [r["meta"]["domain"] for r in records]
  assert "arithmetic" in domains and len(set(domains)) >= 3, domains  # The test needs a mix.
  texts = [f"The answer is {r['meta']['answer']}." if d == "arithmetic" else "I do not know."
           for r, d in zip(records, domains)]
  records.append(USER_PROMPTS[0])  # No world task: in no domain, no gold reward.
  texts.append("Hello.")
  metrics, rows = policy_eval.score_replies(records, _replies(texts, [True] * len(texts)))
  by_domain = {k: v for k, v in metrics.items() if k.startswith("correct/")}
  assert by_domain == {f"correct/{d}": float(d == "arithmetic") for d in set(domains)}
  assert metrics["correct"] == pytest.approx(domains.count("arithmetic") / len(domains))
  assert [r.get("correct") for r in rows[:-1]] == [d == "arithmetic" for d in domains]


def test_well_formed_counts_only_replies_ending_with_end_of_turn(world_tokenizer, world_prompts):
  ids = world_tokenizer.encode("The answer is 16.")
  parse = lambda x: policy_eval.reply_from_ids(world_tokenizer, np.asarray(x, np.int32))
  assert parse(ids + [END_OF_TURN_ID]) == ("The answer is 16.", True)
  assert parse(ids + [END_OF_TURN_ID, 0, 0]) == ("The answer is 16.", True)  # Padding after.
  assert parse(ids + [EOS_ID]) == ("The answer is 16.", False)  # </s> does not close a turn.
  assert parse(ids + [EOS_ID, END_OF_TURN_ID]) == ("The answer is 16.", False)  # The first stop.
  assert parse(ids) == ("The answer is 16.", False)  # Cut off by the length limit.

  text = "The answer is 16."
  replies = _replies([text] * 3, [True, False, False])
  metrics, rows = policy_eval.score_replies([world_prompts[0]] * 3, replies)
  assert metrics["well_formed"] == pytest.approx(1 / 3)
  assert [r["ended_turn"] for r in rows] == [True, False, False]
  # The gold reward takes the unfinished turn into account.
  assert rows[0]["gold_reward"] - rows[1]["gold_reward"] == pytest.approx(
      world_reward.UNFINISHED_PENALTY)


@jax.jit
def _forward(params, tokens, scalar_index=None):
  return model_lib.Transformer(CONFIG).apply({"params": params}, tokens, scalar_index=scalar_index)


def _direct_reply_log_prob(params, prompt_ids, reply_ids):
  """log pi(reply | prompt) by one unpadded forward pass: obviously right."""
  tokens = np.concatenate([prompt_ids, reply_ids])[None]
  logits = _forward(params, tokens).logits
  log_probs = losses.token_log_probs(logits=logits[:, :-1], targets=tokens[:, 1:])[0]
  return float(jnp.sum(log_probs[len(prompt_ids) - 1:]))


def test_kl_is_zero_for_the_policy_itself_and_positive_for_another_model(world_tokenizer,
                                                                         world_prompts):
  params, other = _params(0, 2.0), _params(1, 2.0)
  records = world_prompts + USER_PROMPTS
  kwargs = dict(max_new_tokens=NEW_TOKENS, rng=jax.random.key(0),
                sampling=sampling.SamplingConfig(), batch_size=4)
  replies = policy_eval.generate_replies(params, CONFIG, world_tokenizer, records, **kwargs)
  # The long prompt keeps <s> and its end, leaving room for the reply.
  assert len(replies.prompt_ids[-1]) == CONFIG.max_len - NEW_TOKENS
  assert replies.prompt_ids[-1][0] == BOS_ID and replies.prompt_ids[-1][-1] == 6  # <|assistant|>

  log_pi = policy_eval.sequence_log_probs(params, CONFIG, replies.prompt_ids, replies.reply_ids,
                                          batch_size=4)
  # Checked on a few rows (one compilation each), the left-truncated one among them.
  rows = [0, 3, len(records) - 1]
  direct = [_direct_reply_log_prob(params, replies.prompt_ids[i], replies.reply_ids[i])
            for i in rows]
  np.testing.assert_allclose(log_pi[rows], direct, rtol=1e-5, atol=1e-4)
  # At temperature 1 the sampler's log-probs are the teacher-forced ones.
  np.testing.assert_allclose(log_pi, replies.log_probs, rtol=1e-5, atol=1e-4)
  log_ref = policy_eval.sequence_log_probs(other, CONFIG, replies.prompt_ids, replies.reply_ids,
                                           batch_size=4)

  same, rows = policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, records,
                                           reference_params=params, **kwargs)
  assert same["kl"] == 0.0 and all(r["kl"] == 0.0 for r in rows)
  metrics, rows = policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, records,
                                              reference_params=other, **kwargs)
  assert metrics["kl"] > 0
  np.testing.assert_allclose(metrics["kl"], np.mean(log_pi - log_ref), rtol=1e-5)
  np.testing.assert_allclose([r["kl"] for r in rows], log_pi - log_ref, rtol=1e-5, atol=1e-5)

  # Replies are cut at their first stop token; ended_turn means that stop is <|end|>.
  for ids, text, ended, length in zip(replies.reply_ids, replies.texts, replies.ended_turn,
                                      replies.lengths):
    assert len(ids) == length <= NEW_TOKENS
    assert not np.isin(ids[:-1], [END_OF_TURN_ID, EOS_ID]).any()
    assert length == NEW_TOKENS or ids[-1] in (END_OF_TURN_ID, EOS_ID)
    assert (text, ended) == policy_eval.reply_from_ids(world_tokenizer, ids)


def test_gold_metrics_cover_only_world_prompts_and_user_prompts_use_a_judge(world_tokenizer,
                                                                           world_prompts):
  params = _params(0, 4.0)
  records = world_prompts[:3] + USER_PROMPTS
  kwargs = dict(max_new_tokens=NEW_TOKENS, rng=jax.random.key(0), sampling=GREEDY, batch_size=4)
  metrics, rows = policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, records,
                                              judge=_length_judge, **kwargs)
  assert metrics["num_prompts"] == 5 and metrics["num_gold"] == 3
  assert all("gold_reward" in r and "correct" in r for r in rows[:3])
  assert not any("gold_reward" in r or "correct" in r for r in rows[3:])
  gold = policy_eval.gold_judge(records[:3], [r["reply"] for r in rows[:3]],
                                [r["ended_turn"] for r in rows[:3]])
  assert metrics["gold_reward"] == pytest.approx(gold.mean())
  assert metrics["correct"] == np.mean([r["correct"] for r in rows[:3]])
  assert metrics["reward"] == pytest.approx(np.mean([len(r["reply"]) for r in rows]))
  assert metrics["well_formed"] == np.mean([r["ended_turn"] for r in rows])
  assert metrics["length"] == np.mean([r["length"] for r in rows])
  assert rows[3]["prompt"] == USER_PROMPTS[0]["prompt"]

  # User prompts only: no gold metrics; a win rate needs the judge, and is refused without it
  # before anything is generated.
  user, _ = policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, USER_PROMPTS, **kwargs)
  assert set(user) == {"num_prompts", "well_formed", "length"}
  baseline = _replies(["", "a much longer reply than any"], [True, True])
  with pytest.raises(ValueError, match="judge"):
    policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, USER_PROMPTS, baseline=baseline,
                                **kwargs)
  judged, _ = policy_eval.evaluate_policy(params, CONFIG, world_tokenizer, USER_PROMPTS,
                                          baseline=baseline, judge=_length_judge, **kwargs)
  assert "win_rate" in judged and "gold_reward" not in judged


def _direct_score(params, tokenizer, record, text, ended):
  """The scalar at the last token of one unpadded conversation (too long: <s> + its end)."""
  ids = np.concatenate([chat_template.render_prompt(tokenizer, record["prompt"]),
                        chat_template.render_response(tokenizer, text)[: None if ended else -1]])
  if len(ids) > CONFIG.max_len:
    ids = np.concatenate([ids[:1], ids[len(ids) - CONFIG.max_len + 1:]])
  out = _forward(params, ids[None], jnp.asarray([len(ids) - 1]))
  return float(out.scalar[0])


def test_reward_model_judge_reads_the_scalar_at_the_last_real_token(world_tokenizer,
                                                                    world_prompts):
  rm = _params(2, scalar_head=True)
  # Rendered, these are about 30, 45 and 250 tokens long: the last one is left-truncated.
  records = [world_prompts[4], world_prompts[1], world_prompts[2]]
  texts = ["The answer is 3.", "Sixteen", "many words " * 8]
  ended = [True, False, True]
  judge = policy_eval.reward_model_judge(rm, CONFIG, world_tokenizer, batch_size=2)
  scores = judge(records, texts, ended)
  assert scores.shape == (3,) and scores.dtype == np.float32
  direct = [_direct_score(rm, world_tokenizer, *args) for args in zip(records, texts, ended)]
  np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-5)
  # Alone, the first reply is padded to a narrower width, in a batch of another size.
  alone = policy_eval.reward_model_judge(rm, CONFIG, world_tokenizer, batch_size=8)(
      records[:1], texts[:1], ended[:1])
  np.testing.assert_allclose(alone, scores[:1], rtol=1e-5, atol=1e-5)
  # Without its <|end|>, the reply is read at its last content token: a different score.
  unended = judge(records[:1], texts[:1], [False])
  assert abs(float(unended[0]) - float(scores[0])) > 1e-4
  with pytest.raises(ValueError, match="scalar_head"):
    policy_eval.reward_model_judge(_params(2), CONFIG, world_tokenizer)


def test_rows_do_not_depend_on_the_batch_size(world_tokenizer, world_prompts):
  params = _params(3, 4.0)
  records = world_prompts + USER_PROMPTS  # 8 prompts: two full batches of 4, or one padded of 16.
  results = {}
  for batch_size in (4, 16):
    results[batch_size] = policy_eval.generate_replies(
        params, CONFIG, world_tokenizer, records, max_new_tokens=NEW_TOKENS,
        rng=jax.random.key(0), sampling=GREEDY, batch_size=batch_size)
  small, large = results[4], results[16]
  assert small.texts == large.texts
  np.testing.assert_array_equal(small.ended_turn, large.ended_turn)
  for a, b in zip(small.reply_ids, large.reply_ids):
    np.testing.assert_array_equal(a, b)
  # Teacher-forced log-probs too, in batches of 3 (the last one padded) or of 16.
  three, sixteen = (policy_eval.sequence_log_probs(params, CONFIG, small.prompt_ids,
                                                   small.reply_ids, batch_size=b) for b in (3, 16))
  np.testing.assert_allclose(three, sixteen, rtol=1e-5, atol=1e-5)
  # New prompts of the same width bucket reuse the compiled forward pass.
  compiled = policy_eval._reply_log_probs._cache_size()
  policy_eval.sequence_log_probs(params, CONFIG, small.prompt_ids[::-1], small.reply_ids[::-1],
                                 batch_size=3)
  assert policy_eval._reply_log_probs._cache_size() == compiled
