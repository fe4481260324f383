"""Rewards as callables: the verifiable rules judge right and wrong answers to the world's
arithmetic, fact and list tasks, gold equals the world's gold reward, combinations weigh and
expose their parts, NaN is refused or counted as documented, config errors name the key, and
a reward-model reward scores exactly as the evaluation's judge."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import rewards
from jaxlm import sharding
from jaxlm.data import world
from jaxlm.data import world_reward
from jaxlm.rewards import Reply

ADD = world.task_prompt("add", {"a": 5, "b": 7})                        # 12, match "number"
CAPITAL = world.task_prompt("capital", {"name": "France"})             # Paris, match "phrase"
REVERSE = world.task_prompt("reverse", {"items": ["cup", "key", "lamp"]})  # "sequence"
COUNT = world.task_prompt("count", {"items": ["cup", "key", "lamp"]})  # 3, match "number"
USER = {"prompt": [{"role": "user", "content": "Write me a poem about the sea."}], "meta": {}}

# (record, right answer, wrong answer, no answer)
CASES = [
    (ADD, "The answer is 12.", "5 + 7 = 14.", "I don't know."),
    (ADD, "Five plus seven is twelve.", "It is 12 or 13.", "Hmm."),
    (CAPITAL, "The capital of France is Paris.", "The capital of France is Berlin.", "No idea."),
    (REVERSE, "Reversed: lamp, key, cup.", "Reversed: cup, key, lamp.", "I can't."),
    (COUNT, "There are 3 words.", "There are four words.", "A list."),
]


def _records_and_replies():
  records, replies = [], []
  for record, right, wrong, missing in CASES:
    for text in (right, wrong, missing):
      for ended in (True, False):
        records.append(record)
        replies.append(Reply(text, ended))
  return records, replies


def test_correctness_judges_arithmetic_fact_and_list_tasks():
  for record, right, wrong, missing in CASES:
    got = rewards.correctness([record] * 4, [Reply(right), Reply(right, False), Reply(wrong),
                                             Reply(missing)])
    assert got.dtype == np.float32 and got.shape == (4,)
    # Text only: a cut-off reply that stated the right answer is still correct.
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 0.0], err_msg=right)
  # Not applicable without a world task, and no exception either.
  assert np.isnan(rewards.correctness([USER], [Reply("Waves.")])).all()
  # A chat record's meta holds turns, not a task: not judged until made a prompt record.
  chat = next(world.generate("chat", "train", world.WorldConfig(num_chats=2)))
  assert np.isnan(rewards.correctness([chat], [Reply("Paris.")]))[0]
  turn = world.prompt_record_from_chat(chat, 0)
  assert rewards.correctness([turn], [Reply(turn["meta"]["answer"])])[0] == 1.0


def test_well_formed_and_complete_sentence():
  records = [USER, ADD, ADD, ADD, CAPITAL]
  replies = [Reply("Waves.", True), Reply("The answer is 12.", False), Reply("", True),
             Reply("   ", True), Reply("paris", True)]
  np.testing.assert_array_equal(rewards.well_formed(records, replies), [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(
      rewards.complete_sentence(records, replies), [0, 1, 0, 0, 0])  # "Waves." is one word.
  assert rewards.complete_sentence([CAPITAL], [Reply('It is "Paris."')])[0] == 1.0


def test_gold_reward_is_the_worlds(small_world):
  records, replies = _records_and_replies()
  prompts = list(world.generate("prompt", "test", small_world))[:6]
  for record in prompts:  # Every style of reply to real prompt records.
    for text in world.candidate_responses(record).values():
      records.append(record)
      replies.append(Reply(text, True))
  got = rewards.gold_reward(records, replies)
  want = [world_reward.gold_reward(r, x.text, ended_turn=x.ended_turn)
          for r, x in zip(records, replies)]
  np.testing.assert_allclose(got, np.float32(want), rtol=0, atol=0)
  assert got.dtype == np.float32
  assert np.isnan(rewards.gold_reward([USER], [Reply("Waves.")])).all()
  assert rewards.gold_reward.name == "gold"


def test_rewards_take_policy_eval_replies_and_refuse_bare_strings():
  batch = policy_eval.Replies(texts=["The answer is 12.", "14"], ended_turn=np.asarray([True, False]),
                              prompt_ids=[], reply_ids=[], lengths=np.zeros(2, np.int32),
                              log_probs=np.zeros(2, np.float32))
  np.testing.assert_array_equal(rewards.well_formed([ADD, ADD], batch), [1, 0])
  with pytest.raises(TypeError, match="reply 0 is a str"):
    rewards.correctness([ADD], ["The answer is 12."])
  with pytest.raises(ValueError, match="2 prompt records but 1 replies"):
    rewards.correctness([ADD, ADD], [Reply("12")])


def test_weighted_sum_and_components():
  combo = rewards.combine([(1.0, rewards.correctness), (0.2, rewards.well_formed),
                           (-0.5, rewards.per_item("length", lambda r, t, e: len(t.split())))])
  records = [ADD, ADD, CAPITAL]
  replies = [Reply("The answer is 12.", True), Reply("5 + 7 = 14.", False),
             Reply("Paris", True)]
  total, parts = combo.evaluate(records, replies)
  assert list(parts) == ["correct", "well_formed", "length"]
  np.testing.assert_array_equal(parts["correct"], [1, 0, 1])
  np.testing.assert_array_equal(parts["well_formed"], [1, 0, 1])
  np.testing.assert_allclose(total, [1 + 0.2 - 2.0, 0 + 0 - 2.5, 1 + 0.2 - 0.5], rtol=1e-6)
  np.testing.assert_array_equal(combo(records, replies), total)
  assert combo.weights == {"correct": 1.0, "well_formed": 0.2, "length": -0.5}
  metrics = combo.metrics(parts)
  assert metrics["reward_correct"] == pytest.approx(2 / 3) and "reward_correct_na" not in metrics
  # A value computed elsewhere (a fused scorer) replaces that term's call.
  total2, parts2 = combo.evaluate(records, replies, precomputed={"length": [0.0, 0.0, 0.0]})
  np.testing.assert_allclose(total2, [1.2, 0.0, 1.2], rtol=1e-6)
  with pytest.raises(ValueError, match="not in the sum: \\['gold'\\]"):
    combo.evaluate(records, replies, precomputed={"gold": [0, 0, 0]})
  with pytest.raises(errors.ConfigError, match="named twice"):
    rewards.combine([(1.0, rewards.well_formed), (1.0, rewards.well_formed)])
  with pytest.raises(ValueError, match="shape \\(2,\\)"):
    rewards.combine([(1.0, rewards.per_item("x", lambda r, t, e: 0.0))]).components(
        [ADD], [Reply("12")], precomputed={"x": [1.0, 2.0]})


def test_nan_is_refused_or_ignored_and_counted():
  records = [ADD, USER, USER]
  replies = [Reply("The answer is 12.", True), Reply("Waves.", True), Reply("Sea", False)]
  terms = [(1.0, rewards.correctness), (0.5, rewards.well_formed)]
  with pytest.raises(errors.ConfigError, match="'correct' does not apply to 2 of 3 .*row 1"):
    rewards.combine(terms)(records, replies)
  ignore = rewards.combine(terms, nan="ignore")
  total, parts = ignore.evaluate(records, replies)
  np.testing.assert_allclose(total, [1.5, 0.5, 0.0])  # NaN terms contribute nothing.
  metrics = ignore.metrics(parts)
  assert metrics["reward_correct"] == 1.0 and metrics["reward_correct_na"] == 2.0
  assert metrics["reward_well_formed"] == pytest.approx(2 / 3)
  # A row no term applies to has no reward at all: refused even under "ignore".
  with pytest.raises(errors.ConfigError, match="no reward term applies to row 1"):
    rewards.combine([(1.0, rewards.gold_reward)], nan="ignore")(records, replies)
  with pytest.raises(ValueError, match="infinite at row 0"):
    rewards.combine([(1.0, rewards.per_item("inf", lambda r, t, e: np.inf))], nan="ignore")(
        [ADD], [Reply("12")])
  with pytest.raises(errors.ConfigError, match="nan policy 'zero'"):
    rewards.combine(terms, nan="zero")


def test_from_config_spellings_agree():
  want = {"correct": 1.0, "well_formed": 0.2}
  locked = config_dict.ConfigDict({"weights": rewards.default_weights(**want)})
  locked.lock()
  locked.weights.sentence = 0.1  # A command-line override of a known key ...
  with pytest.raises(AttributeError):
    locked.weights.corect = 1.0  # ... and ml_collections itself refuses a misspelt one.
  locked.weights.sentence = 0.0
  for spec in (want, locked.weights, ["correct:1.0", "well_formed:0.2"], "correct:1,well_formed:0.2",
               [("correct", 1), ("well_formed", "0.2")]):
    combo = rewards.from_config(spec)
    assert combo.weights == want, spec  # Zero weights are not built.
  combo = rewards.from_config(want, nan="ignore")
  assert combo.nan == "ignore"


def test_from_config_errors_name_the_key_and_the_reward():
  with pytest.raises(errors.ConfigError) as e:
    rewards.from_config({"corect": 1.0}, key="reward.weights")
  message = str(e.value)
  assert e.value.key == "reward.weights" and message.startswith("config.reward.weights: ")
  assert "unknown reward 'corect' (did you mean correct?)" in message
  for name in rewards.KNOWN:
    assert name in message
  with pytest.raises(errors.ConfigError, match="config.reward.terms: entry 'correct'"):
    rewards.from_config(["correct"], key="reward.terms")
  with pytest.raises(errors.ConfigError, match="weight of 'correct': expected a number, got 'x'"):
    rewards.from_config(["correct:x"])
  with pytest.raises(errors.ConfigError, match="weight of 'gold': expected a finite number"):
    rewards.from_config({"gold": float("nan")})
  with pytest.raises(errors.ConfigError, match="'correct' is given twice"):
    rewards.from_config("correct:1,correct:2")
  with pytest.raises(errors.ConfigError, match="no reward has a nonzero weight"):
    rewards.from_config(rewards.default_weights())
  with pytest.raises(errors.ConfigError, match="config.reward_from: reward.weights.model is 1 but no"):
    rewards.from_config({"model": 1.0})
  with pytest.raises(ValueError, match="needs make_model"):
    rewards.from_config({"model": 1.0}, model_run="runs/reward")
  with pytest.raises(ValueError, match="unknown rewards \\['golden'\\]"):
    rewards.default_weights(golden=1.0)


# ------------------------------------------------------------------------------------------------
# A reward-model run.
# ------------------------------------------------------------------------------------------------
# vocab_size matches the `world_tokenizer` fixture.
CONFIG = model_lib.ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=128)


def _reward_params(seed=2):
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed), scalar_head=True))
  kernel = jax.random.normal(jax.random.key(seed + 100), (CONFIG.embed_dim,))
  params["scalar_head"] = {"kernel": kernel, "bias": jnp.asarray(0.5)}  # The init head is 0.
  return params


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, world_tokenizer):
  """A finished reward-model run directory: manifest, tokenizer, one checkpoint, its stats."""
  run = checkpoint.RunDir(tmp_path_factory.mktemp("reward"))
  run.write_config({"stage": "reward"})
  run.save_tokenizer(world_tokenizer)
  run.write_manifest(stage="reward", parent=None, config={"stage": "reward"},
                     tokenizer_hash=world_tokenizer.content_hash, data_source="test",
                     model_config=CONFIG)
  with checkpoint.Checkpointer(run.workdir) as ckpt:
    ckpt.save(1, {"params": _reward_params()}, data_state=None)
  run.update_manifest(complete=True)
  with open(f"{run.workdir}/{rewards.STATS_FILE}", "w") as f:
    json.dump({"mean": 0.25, "std": 2.0, "num_samples": 64}, f)
  return run.workdir


def test_reward_model_reward_equals_the_judge(world_tokenizer, reward_run):
  records, replies = _records_and_replies()
  records, replies = records[:7] + [USER], replies[:7] + [Reply("Waves and more waves.", False)]
  texts, ended = [r.text for r in replies], [r.ended_turn for r in replies]
  params = _reward_params()
  judge = policy_eval.reward_model_judge(params, CONFIG, world_tokenizer, batch_size=4)(
      records, texts, ended)
  raw = rewards.RewardModelReward(params, CONFIG, world_tokenizer, batch_size=4)
  np.testing.assert_array_equal(raw(records, replies), judge)
  assert raw.name == "model" and not np.isnan(judge).any()

  # From the run directory: the same params, normalised by its statistics, then clipped.
  loaded = rewards.reward_model(reward_run, world_tokenizer, batch_size=4)
  np.testing.assert_allclose(loaded.raw(records, replies), judge, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loaded(records, replies), (judge - 0.25) / 2.0, rtol=1e-5, atol=1e-6)
  clipped = rewards.reward_model(reward_run, world_tokenizer, batch_size=4, clip=0.1)
  assert np.abs(clipped(records, replies)).max() <= 0.1 + 1e-7
  # On a (one-device) mesh: params placed with the model's shardings, same scores.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  on_mesh = rewards.reward_model(reward_run, world_tokenizer, batch_size=4, mesh=mesh,
                                 normalize=False)
  np.testing.assert_allclose(on_mesh(records, replies), judge, rtol=1e-5, atol=1e-5)

  # In a config: "model" takes its run from model_run; a run directory can name itself.
  make = lambda run_dir: rewards.reward_model(run_dir, world_tokenizer, batch_size=4)
  combo = rewards.from_config({"model": 1.0, "well_formed": 0.5}, model_run=reward_run,
                              make_model=make)
  total, parts = combo.evaluate(records, replies)
  np.testing.assert_allclose(parts["model"], (judge - 0.25) / 2.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, parts["model"] + 0.5 * np.asarray(ended, np.float32),
                             rtol=1e-5, atol=1e-6)
  by_path = rewards.from_config([f"{reward_run}:2.0"], make_model=make)
  (weight, term), = by_path.terms
  assert weight == 2.0 and term.name.startswith("model:")
  np.testing.assert_allclose(by_path(records, replies), 2 * parts["model"], rtol=1e-5, atol=1e-6)
  assert term.normalize([0.25])[0] == 0.0  # Attributes pass through the renaming.


def test_reward_model_refuses_another_stage(tmp_path, world_tokenizer):
  run = checkpoint.RunDir(tmp_path)
  run.write_config({})
  run.save_tokenizer(world_tokenizer)
  run.write_manifest(stage="sft", parent=None, config={}, tokenizer_hash=world_tokenizer.content_hash,
                     data_source="test", model_config=CONFIG)
  with checkpoint.Checkpointer(run.workdir) as ckpt:
    ckpt.save(1, {"params": _reward_params()}, data_state=None)
  run.update_manifest(complete=True)
  with pytest.raises(errors.ParentError, match="is a 'sft' run"):
    rewards.reward_model(tmp_path, world_tokenizer)


def test_rollout_reward_reads_the_model_term_from_the_scorer(reward_run):
  records, replies = [ADD, ADD, CAPITAL], [Reply("The answer is 12.", True), Reply("14", False),
                                           Reply("Paris", True)]
  reward = rewards.rollout_reward({"model": 1.0, "correct": 2.0, "gold": 0.0}, model_run=reward_run,
                                  clip=0.3)
  assert reward.uses_model and reward.weights == {"model": 1.0, "correct": 2.0}
  assert reward.world_terms() == ["correct"]
  with pytest.raises(RuntimeError, match="load_stats"):
    reward.evaluate(records, replies, [0.0, 0.0, 0.0])
  reward.load_stats()  # mean 0.25, std 2.0
  total, parts = reward.evaluate(records, replies, np.asarray([0.25, 0.65, -9.0], np.float32))
  np.testing.assert_allclose(parts["model"], [0.0, 0.2, -0.3], rtol=1e-6)  # normalised, then clipped
  np.testing.assert_allclose(total, [2.0, 0.2, 1.7], rtol=1e-6)
  with pytest.raises(ValueError, match="pass the scorer's scores"):
    reward.evaluate(records, replies)
  # Without a model term nothing is loaded and the scores are not needed.
  rules = rewards.rollout_reward({"gold": 1.0, "model": 0.0})
  assert not rules.uses_model and rules.world_terms() == ["gold"]
  rules.load_stats()
  np.testing.assert_allclose(rules.evaluate(records, replies)[0], rewards.gold_reward(records, replies))
  # One reward model, the `model` term: a run named as a term, or `model` without a run, is refused.
  with pytest.raises(errors.ConfigError, match="named as a term") as e:
    rewards.rollout_reward({f"{reward_run}": 1.0}, model_run=reward_run)
  assert e.value.key == "reward.weights"
  with pytest.raises(errors.ConfigError) as e:
    rewards.rollout_reward({"model": 1.0})
  assert e.value.key == "reward_from"
  with pytest.raises(errors.ConfigError) as e:
    rewards.rollout_reward({"well_formed": 1.0}, clip=-1.0)
  assert e.value.key == "reward.clip"


def test_world_metrics_average_over_world_tasks_only():
  records, replies = [ADD, USER, CAPITAL], [Reply("The answer is 12.", True), Reply("Hi.", True),
                                            Reply("Berlin.", True)]
  metrics = rewards.world_metrics(records, replies)
  assert metrics["correct"] == 0.5
  assert metrics["gold_reward"] == pytest.approx(np.nanmean(rewards.gold_reward(records, replies)))
  assert rewards.world_metrics([USER], [Reply("Hi.", True)]) == {}
