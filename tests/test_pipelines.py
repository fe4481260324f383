"""Grain pipelines: layouts, masks, packing, determinism, host sharding, iterator resume."""

import itertools

import numpy as np
import pytest

from jaxlm import chat_template
from jaxlm.data import pipelines, world
from jaxlm.data.errors import DataError


class ListSource(list):
  """The smallest RecordSource: a list of records with a description."""

  description = "list"


@pytest.fixture(scope="module")
def text_source(small_world):
  return ListSource(world.generate("text", "train", small_world))


@pytest.fixture(scope="module")
def chat_source(small_world):
  return ListSource(world.generate("chat", "train", small_world))


@pytest.fixture(scope="module")
def pref_source(small_world):
  return ListSource(itertools.islice(world.generate("preference", "train", small_world), 120))


@pytest.fixture(scope="module")
def prompt_source(small_world):
  return ListSource(itertools.islice(world.generate("prompt", "train", small_world), 37))


def take(ds, n):
  return list(itertools.islice(iter(ds), n))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- pretraining -------------------------------------------------------------------------------


def test_pretraining_layout_and_shift(text_source, world_tokenizer):
  tok = world_tokenizer
  ds = pipelines.pretraining_dataset(text_source, tok, seq_len=64, batch_size=4, seed=0)
  batch = next(iter(ds))
  assert {k: v.shape for k, v in batch.items()} == {k: (4, 64) for k in
                                                     ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  assert batch["loss_mask"].dtype == bool and batch["inputs"].dtype == np.int32
  # Streaming rows are full: every position is a real token with a trained target.
  assert (batch["segment_ids"] > 0).all() and batch["loss_mask"].all()
  # Inside a segment, the target at t is the input at t + 1 (shifted by one, never across docs).
  for row in range(4):
    seg, inp, tgt = batch["segment_ids"][row], batch["inputs"][row], batch["targets"][row]
    same = seg[:-1] == seg[1:]
    np.testing.assert_array_equal(tgt[:-1][same], inp[1:][same])
    # A new segment starts at position 0.
    starts = np.flatnonzero(~same) + 1
    assert (batch["positions"][row][starts] == 0).all()


def test_pretraining_one_epoch_covers_every_document_once(world_tokenizer):
  tok = world_tokenizer
  docs = ListSource({"text": f"Document number {i} says hello."} for i in range(23))
  batches = list(pipelines.pretraining_dataset(docs, tok, seq_len=32, batch_size=3, seed=1, num_epochs=1))
  # Rebuild the token stream of real targets; <eos> ends each document exactly once.
  targets = np.concatenate([b["targets"][b["loss_mask"]] for b in batches])
  assert (targets == tok.eos_id).sum() == 23
  text = tok.decode(targets.tolist())
  for i in range(23):
    assert f"Document number {i} says hello." in text


def test_pretraining_determinism_and_seed(text_source, world_tokenizer):
  make = lambda seed: take(pipelines.pretraining_dataset(text_source, world_tokenizer, seq_len=32, batch_size=2,
                                                         seed=seed), 3)
  assert_same_batches(make(0), make(0))
  assert not np.array_equal(make(0)[0]["inputs"], make(1)[0]["inputs"])


@pytest.mark.parametrize("kind", ["pretraining", "sft", "pairs", "prompts"])
def test_iterator_resume_sees_the_same_batches(kind, text_source, chat_source, pref_source, prompt_source,
                                               world_tokenizer):
  tok = world_tokenizer
  make = {
      "pretraining": lambda: pipelines.pretraining_dataset(text_source, tok, seq_len=32, batch_size=2, seed=3),
      "sft": lambda: pipelines.sft_dataset(chat_source, tok, max_len=96, batch_size=2, seed=3),
      "pairs": lambda: pipelines.pairs_dataset(pref_source, tok, max_len=96, batch_size=2, seed=3),
      "prompts": lambda: pipelines.prompts_dataset(prompt_source, tok, max_prompt_len=48, batch_size=4, seed=3),
  }[kind]
  it = iter(make())
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(make())
  resumed.set_state(state)
  assert_same_batches([next(resumed) for _ in range(4)], expected)


def test_host_shards_are_disjoint_and_complete(prompt_source, world_tokenizer):
  seen = []
  for index in range(3):
    shard = pipelines.HostShard(index, 3)
    batches = list(pipelines.prompts_dataset(prompt_source, world_tokenizer, max_prompt_len=64, batch_size=5,
                                             shard=shard, num_epochs=1))
    seen.append({int(i) for b in batches for i in b["record_index"][b["valid"]]})
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
  assert set.union(*seen) == set(range(len(prompt_source)))


def test_epochs_are_reshuffled(world_tokenizer):
  docs = ListSource({"prompt": [{"role": "user", "content": f"q{i}"}], "meta": {}} for i in range(16))
  batches = take(pipelines.prompts_dataset(docs, world_tokenizer, max_prompt_len=16, batch_size=16, seed=0), 2)
  first, second = (b["record_index"].tolist() for b in batches)
  assert sorted(first) == sorted(second) == list(range(16))
  assert first != second


# --- SFT -----------------------------------------------------------------------------------------


def _assistant_spans(batch, tok):
  """Decoded trained targets per (row, segment)."""
  spans = []
  for row in range(batch["inputs"].shape[0]):
    for seg in np.unique(batch["segment_ids"][row]):
      if seg == 0:
        continue
      sel = (batch["segment_ids"][row] == seg) & batch["loss_mask"][row]
      spans.append(batch["targets"][row][sel])
  return spans


@pytest.mark.parametrize("packing", [True, False])
def test_sft_mask_covers_exactly_the_assistant_replies(packing, world_tokenizer):
  tok = world_tokenizer
  chats = ListSource([
      {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
                    {"role": "assistant", "content": f"Number {i}."}, {"role": "user", "content": "Again?"},
                    {"role": "assistant", "content": f"Yes {i}."}], "meta": {}} for i in range(10)])
  batches = list(pipelines.sft_dataset(chats, tok, max_len=128, batch_size=2, seed=0, num_epochs=1,
                                       packing=packing))
  spans = [s for b in batches for s in _assistant_spans(b, tok)]
  assert len(spans) == 10  # Every conversation exactly once, never split across rows.
  for span in spans:
    # The trained tokens are the two replies, each closed by its end-of-turn token.
    assert (span == tok.end_of_turn_id).sum() == 2
    text = tok.decode(span.tolist())
    assert "Number" in text and "Yes" in text and "Say" not in text and "Again" not in text
  if packing:
    assert max(len(np.unique(b["segment_ids"][0])) for b in batches) > 2  # Really packed.


def test_sft_packed_and_padded_train_the_same_tokens(chat_source, world_tokenizer):
  def trained(packing):
    batches = pipelines.sft_dataset(chat_source, world_tokenizer, max_len=256, batch_size=4, seed=0,
                                    num_epochs=1, packing=packing, shuffle=False)
    return sorted(tuple(s.tolist()) for b in batches for s in _assistant_spans(b, world_tokenizer))

  packed, padded = trained(True), trained(False)
  assert packed == padded and len(packed) == len(chat_source)


def test_sft_truncation_and_drop_are_counted(chat_source, world_tokenizer):
  stats = pipelines.PipelineStats("sft", min_seen=10**9)
  list(pipelines.sft_dataset(chat_source, world_tokenizer, max_len=24, batch_size=4, num_epochs=1, stats=stats))
  summary = stats.summary()
  assert summary["seen"] == len(chat_source) and summary["truncated"] > 0
  # Truncated examples that keep no trainable token are dropped, and said so.
  assert summary["dropped"] == summary["dropped_by_reason"].get("no trainable token left after truncation", 0)


def test_sft_dropping_most_examples_is_an_error(chat_source, world_tokenizer):
  ds = pipelines.sft_dataset(chat_source, world_tokenizer, max_len=8, batch_size=4, num_epochs=1,
                             length_policy="drop")
  with pytest.raises(DataError, match="dropped"):
    list(ds)


def test_sft_example_without_assistant_turn_is_an_error(world_tokenizer):
  bad = ListSource([{"messages": [{"role": "user", "content": "hi"}], "meta": {}}])
  with pytest.raises(DataError, match=r"list\[0\]"):
    list(pipelines.sft_dataset(bad, world_tokenizer, max_len=32, batch_size=1, num_epochs=1))


# --- pairs -----------------------------------------------------------------------------------------


def test_pairs_layout(pref_source, world_tokenizer):
  tok = world_tokenizer
  stats = pipelines.PipelineStats("pairs")
  batch = next(iter(pipelines.pairs_dataset(pref_source, tok, max_len=384, batch_size=8, shuffle=False,
                                            stats=stats)))
  assert batch["valid"].all() and stats.summary()["truncated"] == 0
  for row in range(8):
    record = pref_source[batch["record_index"][row]]
    prompt = chat_template.render_prompt(tok, record["prompt"])
    for side in ("chosen", "rejected"):
      tokens, mask = batch[f"{side}_tokens"][row], batch[f"{side}_loss_mask"][row]
      last = batch[f"{side}_last_index"][row]
      # The last real token is the reply's end-of-turn, and nothing real follows it.
      assert tokens[last] == tok.end_of_turn_id
      assert (batch[f"{side}_segment_ids"][row][last + 1:] == 0).all()
      np.testing.assert_array_equal(tokens[: len(prompt)], prompt)
      assert not mask[: len(prompt)].any() and mask[len(prompt): last + 1].all() and not mask[last + 1:].any()
      assert tok.decode(tokens[mask].tolist()) == record[side]


def test_pairs_extra_padding_changes_nothing_real(pref_source, world_tokenizer):
  def first_batch(max_len):
    stats = pipelines.PipelineStats("pairs")
    ds = pipelines.pairs_dataset(pref_source, world_tokenizer, max_len=max_len, batch_size=4, shuffle=False,
                                 stats=stats)
    batch = next(iter(ds))
    assert stats.summary()["truncated"] == stats.summary()["dropped"] == 0
    return batch

  short, long = first_batch(384), first_batch(448)
  for key in short:
    if short[key].ndim == 1:
      np.testing.assert_array_equal(short[key], long[key])
    else:
      np.testing.assert_array_equal(short[key], long[key][:, :384])
      assert not long[key][:, 384:].any()


def test_pairs_truncate_the_prompt_never_the_response(world_tokenizer):
  tok = world_tokenizer
  long_prompt = [{"role": "user", "content": "word " * 200}]
  src = ListSource([{"prompt": long_prompt, "chosen": "Yes.", "rejected": "No, not at all.", "meta": {}}])
  stats = pipelines.PipelineStats("pairs")
  batch = next(iter(pipelines.pairs_dataset(src, tok, max_len=40, batch_size=1, num_epochs=1, stats=stats)))
  assert stats.summary()["truncated"] == 1
  for side, text in (("chosen", "Yes."), ("rejected", "No, not at all.")):
    tokens = batch[f"{side}_tokens"][0]
    assert tokens[0] == tok.bos_id
    assert tok.decode(tokens[batch[f"{side}_loss_mask"][0]].tolist()) == text


def test_shared_pairs_layout(pref_source, world_tokenizer):
  """One row per pair: the prompt once, then each response at the positions it has alone."""
  tok = world_tokenizer
  stats = pipelines.PipelineStats("pairs")
  batch = next(iter(pipelines.pairs_dataset(pref_source, tok, max_len=512, score_len=256, layout="shared",
                                            batch_size=8, shuffle=False, stats=stats)))
  assert batch["valid"].all() and stats.summary()["truncated"] == stats.summary()["dropped"] == 0
  for row in range(8):
    record = pref_source[batch["record_index"][row]]
    prompt = chat_template.render_prompt(tok, record["prompt"])
    tokens, positions, branch = batch["tokens"][row], batch["positions"][row], batch["branch_ids"][row]
    side, index, targets = batch["score_side"][row], batch["score_index"][row], batch["score_targets"][row]
    np.testing.assert_array_equal(tokens[: len(prompt)], prompt)
    for number, name in ((1, "chosen"), (2, "rejected")):
      at = np.flatnonzero(branch == number)
      response = tokens[at]
      assert tok.decode(response.tolist()) == record[name] and response[-1] == tok.end_of_turn_id
      np.testing.assert_array_equal(positions[at], len(prompt) + np.arange(len(at)))
      # Scored slots: exactly this response's tokens, each predicted from its predecessor in
      # the same branch, the first from the prompt's last token.
      np.testing.assert_array_equal(targets[side == number], response)
      np.testing.assert_array_equal(index[side == number], np.concatenate([[len(prompt) - 1], at[:-1]]))
    real = int((batch["segment_ids"][row] > 0).sum())
    assert real == len(prompt) + (branch > 0).sum() and not tokens[real:].any() and not targets[side == 0].any()


def test_shared_pairs_truncate_the_prompt_and_drop_what_cannot_be_scored(world_tokenizer):
  tok = world_tokenizer
  long_prompt = [{"role": "user", "content": "word " * 200}]
  records = [{"prompt": long_prompt, "chosen": "Yes.", "rejected": "No, not at all.", "meta": {}},
             {"prompt": long_prompt, "chosen": "word " * 30, "rejected": "word " * 30, "meta": {}}]
  stats = pipelines.PipelineStats("pairs", min_seen=10)
  batch = next(iter(pipelines.pairs_dataset(ListSource(records), tok, max_len=40, score_len=24, layout="shared",
                                            batch_size=2, num_epochs=1, stats=stats)))
  assert stats.summary()["truncated"] == 1 and stats.summary()["dropped"] == 1
  assert batch["valid"].tolist() == [True, False]  # the second pair's responses exceed score_len
  assert batch["tokens"][0][0] == tok.bos_id and (batch["segment_ids"][0] > 0).all()
  for number, text in ((1, "Yes."), (2, "No, not at all.")):
    assert tok.decode(batch["tokens"][0][batch["branch_ids"][0] == number].tolist()) == text
  with pytest.raises(ValueError, match="score_len"):
    pipelines.pairs_dataset(ListSource(records), tok, max_len=40, score_len=40, layout="shared", batch_size=2)
  with pytest.raises(ValueError, match="layout"):
    pipelines.pairs_dataset(ListSource(records), tok, max_len=40, layout="packed", batch_size=2)


# --- prompts ---------------------------------------------------------------------------------------


def test_prompts_layout_and_final_padding(prompt_source, world_tokenizer):
  tok = world_tokenizer
  batches = list(pipelines.prompts_dataset(prompt_source, tok, max_prompt_len=320, batch_size=8, num_epochs=1,
                                           shuffle=False))
  assert len(batches) == 5 and all(b["prompt_tokens"].shape == (8, 320) for b in batches)
  assert batches[-1]["valid"].sum() == len(prompt_source) - 32 and batches[0]["valid"].all()
  for b in batches:
    for row in np.flatnonzero(b["valid"]):
      n = b["prompt_lengths"][row]
      expected = chat_template.render_prompt(tok, prompt_source[b["record_index"][row]]["prompt"])
      np.testing.assert_array_equal(b["prompt_tokens"][row][:n], expected)
      assert b["prompt_tokens"][row][n - 1] == tok.role_id("assistant") and not b["prompt_tokens"][row][n:].any()


# --- up-front counts -------------------------------------------------------------------------------

LONG = "word " * 150  # ~150+ tokens: longer than any length below


@pytest.fixture(scope="module")
def count_sources(small_world):
  """Small sources of each kind: world records plus a few made too long on purpose."""
  chats = list(itertools.islice(world.generate("chat", "train", small_world), 40))
  chats += [{"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Fine."}], "meta": {}},
            {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": LONG}], "meta": {}}]
  prefs = list(itertools.islice(world.generate("preference", "train", small_world), 40))
  prefs += [{"prompt": [{"role": "user", "content": LONG}], "chosen": "Yes.", "rejected": "No.", "meta": {}},
            {"prompt": [{"role": "user", "content": "Hi."}], "chosen": LONG, "rejected": "No.", "meta": {}}]
  prompts = list(itertools.islice(world.generate("prompt", "train", small_world), 40))
  prompts += [{"prompt": [{"role": "user", "content": LONG}], "meta": {}}]
  texts = list(itertools.islice(world.generate("text", "train", small_world), 20)) + [{"text": ""}]
  return {"sft": ListSource(chats), "pairs": ListSource(prefs), "prompts": ListSource(prompts),
          "pretraining": ListSource(texts)}


COUNT_CASES = {  # name: (kind, dataset arguments)
    "sft-packed": ("sft", dict(max_len=64, packing=True)),
    "sft-padded": ("sft", dict(max_len=64, packing=False)),
    "pairs-sides": ("pairs", dict(max_len=96)),
    "pairs-shared": ("pairs", dict(max_len=128, score_len=96, layout="shared")),
    "prompts": ("prompts", dict(max_prompt_len=32)),
}


@pytest.mark.parametrize("policy", pipelines.LENGTH_POLICIES)
@pytest.mark.parametrize("case", COUNT_CASES)
def test_counts_are_what_one_epoch_of_the_dataset_records(case, policy, count_sources, world_tokenizer):
  kind, args = COUNT_CASES[case]
  args = dict(args, length_policy=policy, batch_size=4, seed=5)
  source = count_sources[kind]
  dataset = {"sft": pipelines.sft_dataset, "pairs": pipelines.pairs_dataset,
             "prompts": pipelines.prompts_dataset}[kind]
  counts = pipelines.count_examples(kind, source, world_tokenizer, **args)  # the dataset's own arguments
  # One epoch over two host shards, into one PipelineStats: every record once, shuffled.
  stats = pipelines.PipelineStats(kind, min_seen=10**9)
  batches = [b for index in range(2) for b in dataset(source, world_tokenizer, num_epochs=1, stats=stats,
                                                      shard=pipelines.HostShard(index, 2), **args)]
  assert counts == stats.summary()
  assert counts["seen"] == len(source) and counts["kept"] == counts["seen"] - counts["dropped"]
  assert counts["dropped"] == sum(counts["dropped_by_reason"].values())
  # A truncated prompt always keeps <bos> ... <|assistant|>; everything else here drops some.
  assert (counts["dropped"] > 0) == (case != "prompts" or policy == "drop")
  assert set(counts["dropped_by_reason"]) <= set(pipelines.DROP_REASONS)
  if policy == "truncate":
    assert counts["truncated"] > 0
  else:
    assert counts["truncated"] == 0
    assert set(counts["dropped_by_reason"]) <= {pipelines.REASON_LONGER_THAN_MAX_LEN,
                                                pipelines.REASON_LONGER_THAN_MAX_PROMPT_LEN,
                                                pipelines.REASON_LONGER_THAN_SCORE_LEN}
  # What was kept is what the batches hold (one segment per example when packed).
  if kind == "sft":
    kept = sum(len(np.unique(row[row > 0])) for b in batches for row in b["segment_ids"])
  else:
    kept = sum(int(b["valid"].sum()) for b in batches)
  assert kept == counts["kept"]
  assert pipelines.needs_warning(counts)


def test_pretraining_counts_every_document_and_drops_none(count_sources, world_tokenizer):
  source = count_sources["pretraining"]
  counts = pipelines.count_examples("pretraining", source, world_tokenizer, seq_len=16, batch_size=2)
  stats = pipelines.PipelineStats("pretraining")
  list(pipelines.pretraining_dataset(source, world_tokenizer, seq_len=16, batch_size=2, num_epochs=1, stats=stats))
  # Long documents continue in the next row and the empty one still trains <eos>: nothing cut.
  assert counts == stats.summary() == {"seen": len(source), "kept": len(source), "truncated": 0, "dropped": 0,
                                       "dropped_by_reason": {}}
  assert not pipelines.needs_warning(counts)


def test_count_examples_checks_its_arguments_like_the_dataset(count_sources, world_tokenizer):
  tok, chats = world_tokenizer, count_sources["sft"]
  with pytest.raises(TypeError, match="max_len"):
    pipelines.count_examples("sft", chats, tok)
  with pytest.raises(TypeError, match="needs max_prompt_len"):
    pipelines.count_examples("prompts", count_sources["prompts"], tok)
  with pytest.raises(TypeError, match="unexpected keyword argument 'max_len'"):
    pipelines.count_examples("prompts", count_sources["prompts"], tok, max_prompt_len=32, max_len=32)
  with pytest.raises(ValueError, match="length_policy"):
    pipelines.count_examples("sft", chats, tok, max_len=64, length_policy="cut")
  with pytest.raises(ValueError, match="score_len"):
    pipelines.count_examples("pairs", count_sources["pairs"], tok, max_len=64, layout="shared")
  with pytest.raises(ValueError, match="kind"):
    pipelines.count_examples("dpo", chats, tok, max_len=64)
  # The arguments that only order or lay out batches change nothing.
  plain = pipelines.count_examples("sft", chats, tok, max_len=64)
  assert plain == pipelines.count_examples("sft", chats, tok, max_len=64, batch_size=3, seed=9, packing=False,
                                           shard=pipelines.HostShard(1, 4), num_epochs=None, num_threads=1)
  assert plain != pipelines.count_examples("sft", chats, tok, max_len=64, length_policy="drop")


def test_a_truncation_that_leaves_nothing_to_train_on_is_a_drop(world_tokenizer):
  tok = world_tokenizer
  # SFT: the user turn fills max_len, so truncation would keep no assistant token.
  chat = {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "Fine."}]}
  assert pipelines.render_sft_example(tok, chat, max_len=32, length_policy="truncate", where="x") == (
      None, pipelines.REASON_NO_TRAINABLE_TOKEN)
  assert pipelines.render_sft_example(tok, chat, max_len=32, length_policy="drop", where="x") == (
      None, pipelines.REASON_LONGER_THAN_MAX_LEN)
  # Exactly max_len + 1 tokens (inputs and targets of max_len) is whole, not truncated.
  ids, _ = chat_template.render_chat(tok, chat["messages"])
  example, truncated = pipelines.render_sft_example(tok, chat, max_len=len(ids) - 1, length_policy="drop", where="x")
  assert truncated is False and len(example["inputs"]) == len(ids) - 1
  # Pairs: a response needing all but one position leaves no room for <bos> ... <|assistant|>.
  response = "word " * 20
  n = len(chat_template.render_response(tok, response))
  pair = {"prompt": [{"role": "user", "content": "Hi."}], "chosen": response, "rejected": "No."}
  for max_len in (n, n + 1):
    assert pipelines.render_pair(tok, pair, max_len=max_len, length_policy="truncate") == (
        None, pipelines.REASON_NO_ROOM_FOR_PROMPT)
  scored = n + len(chat_template.render_response(tok, "No."))
  assert pipelines.render_shared_pair(tok, pair, max_len=scored + 1, score_len=scored, length_policy="truncate") == (
      None, pipelines.REASON_NO_ROOM_FOR_PROMPT)
  example, truncated = pipelines.render_shared_pair(tok, pair, max_len=scored + 2, score_len=scored,
                                                    length_policy="truncate")
  assert truncated is True and example["tokens"][:2].tolist() == [tok.bos_id, tok.role_id("assistant")]
  assert (example["score_side"] > 0).sum() == scored
  # With two positions the prompt keeps <bos> <|assistant|>, and the whole response is trained.
  example, truncated = pipelines.render_pair(tok, pair, max_len=n + 2, length_policy="truncate")
  assert truncated is True
  assert example["chosen_tokens"][:2].tolist() == [tok.bos_id, tok.role_id("assistant")]
  assert example["chosen_loss_mask"].sum() == n
  # Prompts: the shortest prompt is <bos> <|assistant|>; a shorter max_prompt_len is an error.
  prompt = {"prompt": [{"role": "user", "content": LONG}]}
  example, truncated = pipelines.render_prompt_example(tok, prompt, max_prompt_len=2, length_policy="truncate")
  assert truncated is True and example["prompt_tokens"].tolist() == [tok.bos_id, tok.role_id("assistant")]
  assert pipelines.render_prompt_example(tok, prompt, max_prompt_len=2, length_policy="drop") == (
      None, pipelines.REASON_LONGER_THAN_MAX_PROMPT_LEN)
  with pytest.raises(ValueError, match="max_prompt_len"):
    pipelines.count_examples("prompts", ListSource([prompt]), tok, max_prompt_len=1)


def test_format_counts_and_needs_warning():
  counts = {"seen": 1000, "kept": 990, "truncated": 5, "dropped": 10,
            "dropped_by_reason": {pipelines.REASON_LONGER_THAN_MAX_LEN: 7, pipelines.REASON_NO_TRAINABLE_TOKEN: 3}}
  line = pipelines.format_counts("sft train", counts)
  assert line == ("sft train: 1000 seen, 985 kept whole, 5 truncated (0.5%), 10 dropped (1.0%): "
                  "7 longer than max_len, 3 no trainable token left after truncation")
  assert pipelines.needs_warning(counts)  # 1.5% cut or dropped
  assert not pipelines.needs_warning(counts, threshold=0.02)
  assert not pipelines.needs_warning(dict(counts, truncated=0, dropped=10, kept=990))  # exactly 1%: not more
  empty = {"seen": 0, "kept": 0, "truncated": 0, "dropped": 0, "dropped_by_reason": {}}
  assert not pipelines.needs_warning(empty) and pipelines.format_counts("x", empty).startswith("x: 0 seen")
