"""The synthetic world: schema, determinism, held-out splits, the gold reward and its headroom."""

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings, strategies as st

from jaxlm.data import schemas, world
from jaxlm.data import world_facts as F
from jaxlm.data import world_reward as R

CFG = world.WorldConfig(seed=3, text_bytes=60_000, num_chats=300, num_preferences=400,
                        num_prompts=150, eval_fraction=0.2)
TASK_KINDS = ("chat", "preference", "prompt")
# The correctness of each response style; every other style answers correctly.
_EXPECTED_VERDICT = {"mistake": "wrong", "unsure": "missing"}


@pytest.fixture(scope="module")
def records():
  # Generated in an unusual order (test split first, kinds reversed) so that comparing with a
  # fresh generation also checks that records do not depend on the order of calls.
  return {(kind, split): list(world.generate(kind, split, CFG))
          for split in reversed(world.SPLITS) for kind in reversed(schemas.KINDS)}


def _texts(record):
  """Every model-visible string of a record."""
  if "text" in record:
    return [record["text"]]
  messages = record.get("messages") or record["prompt"]
  responses = [record[k] for k in ("chosen", "rejected") if k in record]
  return [m["content"] for m in messages] + responses


def _task_metas(kind, record):
  return record["meta"]["turns"] if kind == "chat" else [record["meta"]]


@pytest.fixture(scope="module")
def corpora(records):
  """Per split, all its text of every kind as one lower-case string, for "never appears" checks."""
  return {split: "\n".join(t for kind in schemas.KINDS for r in records[kind, split]
                           for t in _texts(r)).lower() for split in world.SPLITS}


@pytest.fixture(scope="module")
def train_corpus(corpora):
  return corpora["train"]


# ---------------------------------------------------------------------------------------------
# Schema, sizes, determinism.
# ---------------------------------------------------------------------------------------------


def test_every_record_passes_validation_unchanged(records):
  for (kind, split), recs in records.items():
    assert recs, (kind, split)
    for i, record in enumerate(recs):
      assert schemas.validate(kind, record, f"world[{kind}/{split}]:{i}") == record


def test_sizes_follow_the_config(records):
  sizes = {"chat": CFG.num_chats, "preference": CFG.num_preferences, "prompt": CFG.num_prompts}
  for kind, n in sizes.items():
    assert len(records[kind, "train"]) == n == world.num_records(kind, "train", CFG)
    eval_size = round(n * CFG.eval_fraction)
    assert len(records[kind, "validation"]) == len(records[kind, "test"]) == eval_size
  for split, target in (("train", CFG.text_bytes), ("validation", CFG.text_bytes * 0.05),
                        ("test", CFG.text_bytes * 0.05)):
    size = sum(len(r["text"].encode("utf-8")) for r in records["text", split])
    assert target <= size <= target + 4000, (split, size)  # Overshoot: at most one document.


def test_text_is_prose_without_chat_markup(records):
  for split in world.SPLITS:
    for r in records["text", split]:
      assert not re.search(r"(?im)^(user|assistant|system)\s*:|<\|", r["text"]), r["text"]
  docs = records["text", "train"]
  assert sum("\n\n" in r["text"] for r in docs) > 10  # Some multi-paragraph documents.
  assert sum("Q: " in r["text"] for r in docs) > 5  # And the occasional Q/A line.


def test_deterministic_and_independent_of_call_order(records):
  for kind in schemas.KINDS:
    assert list(world.generate(kind, "validation", CFG)) == records[kind, "validation"]
  other = dataclasses.replace(CFG, seed=4)
  for kind in schemas.KINDS:
    assert list(world.generate(kind, "validation", other)) != records[kind, "validation"]
  # Growing a size only appends records.
  bigger = dataclasses.replace(CFG, num_chats=CFG.num_chats + 10)
  assert list(world.generate("chat", "train", bigger))[:CFG.num_chats] == records["chat", "train"]


def test_fingerprint_is_stable_and_covers_every_field():
  assert CFG.fingerprint() == world.WorldConfig(**dataclasses.asdict(CFG)).fingerprint()
  assert re.fullmatch(r"[0-9a-f]{12}", CFG.fingerprint())
  changes = {f.name: getattr(CFG, f.name) * 2 + 1 for f in dataclasses.fields(world.WorldConfig)}
  changes["eval_fraction"] = CFG.eval_fraction / 2
  assert set(changes) == {f.name for f in dataclasses.fields(world.WorldConfig)}
  prints = {dataclasses.replace(CFG, **{k: v}).fingerprint() for k, v in changes.items()}
  assert len(prints) == len(changes) and CFG.fingerprint() not in prints


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="unknown record kind"):
    world.generate("dialog", "train", CFG)
  with pytest.raises(ValueError, match="unknown split"):
    world.generate("chat", "dev", CFG)
  with pytest.raises(ValueError, match="eval_fraction"):
    world.WorldConfig(eval_fraction=1.5)
  with pytest.raises(ValueError, match="label_temperature"):
    world.WorldConfig(label_temperature=0)
  with pytest.raises(ValueError, match="not 'train'"):
    world.fact_probes("train", CFG)


# ---------------------------------------------------------------------------------------------
# Chat structure and metadata.
# ---------------------------------------------------------------------------------------------


def test_chat_turn_meta_aligns_with_assistant_messages(records):
  chats = records["chat", "train"]
  assert any(len(c["meta"]["turns"]) >= 2 for c in chats)
  assert any(c["messages"][0]["role"] == "system" for c in chats)
  for chat in chats:
    meta = chat["meta"]
    answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
    assert len(answers) == len(meta["turns"]) == len(meta["styles"])
    for k, (answer, style) in enumerate(zip(answers, meta["styles"])):
      prompt = schemas.validate("prompt", world.prompt_record_from_chat(chat, k), "chat->prompt")
      assert prompt["prompt"][-1]["role"] == "user"
      verdict = R.judge(prompt, answer)
      assert verdict == _EXPECTED_VERDICT.get(style, "correct"), (answer, prompt)
      if style == "ideal":
        assert R.gold_reward(prompt, answer) == R.MAX_REWARD


def test_follow_ups_refer_to_the_previous_subject(records):
  pronoun = other = 0
  for chat in records["chat", "train"]:
    turns = chat["meta"]["turns"]
    for prev, turn in zip(turns, turns[1:]):
      if turn["template"].startswith("followup_same/"):
        pronoun += 1
        assert turn["subject"] == prev["subject"] and turn["family"] != prev["family"]
      elif turn["template"].startswith("followup_other/"):
        other += 1
        assert turn["family"] == prev["family"] and turn["subject"] != prev["subject"]
  assert pronoun > 10 and other > 10


# ---------------------------------------------------------------------------------------------
# Held-out splits.
# ---------------------------------------------------------------------------------------------


def _template_regex(template):
  return re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format_map(_AnySlot())


class _AnySlot(dict):
  def __missing__(self, key):
    return r"[\w ,'-]{1,80}?"


def test_heldout_question_templates_never_appear_in_train(records, train_corpus):
  held = [t for fam in F.QUESTIONS.values() for s in world.EVAL_SPLITS for t in fam[s]]
  held += [t for s in world.EVAL_SPLITS for t in F.FOLLOWUP_OTHER_SUBJECT[s]]
  patterns = [re.compile(_template_regex(t), re.IGNORECASE) for t in held]
  for kind in TASK_KINDS:
    for record in records[kind, "train"]:
      for meta in _task_metas(kind, record):
        assert not meta["heldout_template"] and "/validation/" not in meta["template"]
        assert "/test/" not in meta["template"]
  for pattern in patterns:
    assert not pattern.search(train_corpus), pattern.pattern
  # ...while eval questions do use them, about half the time.
  for split in world.EVAL_SPLITS:
    metas = [m for kind in TASK_KINDS for r in records[kind, split] for m in _task_metas(kind, r)
             if m["template"].startswith("q/")]
    share = sum(m["heldout_template"] for m in metas) / len(metas)
    assert 0.35 < share < 0.65, (split, share)
    assert all(f"/{split}/" in m["template"] for m in metas if m["heldout_template"])


def _name_patterns(names):
  return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


def test_heldout_subjects_are_never_asked_about_in_train(records):
  held = world.heldout_sets(CFG)["subjects"]
  by_name = {**{c.name: (c.name, c.capital, *c.capital_alts) for c in F.COUNTRIES},
             **{a.name: (a.name, a.plural) for a in F.ANIMALS},
             **{t.name: (t.name,) for t in F.THINGS}}
  for split in world.SPLITS:
    # A split never names the subjects held out for the *other* splits.
    banned = {n for d in held.values() for s, names in d.items() if s != split for n in names}
    assert len(banned) >= (30 if split == "train" else 15)
    pattern = _name_patterns(sorted({form for n in banned for form in by_name[n]}))
    for kind in TASK_KINDS:
      for record in records[kind, split]:
        for meta in _task_metas(kind, record):
          assert meta["args"].get("name") not in banned
        for text in _texts(record):
          assert not pattern.search(text), (split, text)
  # Held-out subjects still appear in the train prose: the knowledge is learnable.
  train_text = " ".join(r["text"] for r in world.generate("text", "train", dataclasses.replace(
      CFG, text_bytes=400_000)))
  train_text = train_text.lower()
  missing = [n for d in held.values() for names in d.values() for n in names
             if n.lower() not in train_text]
  assert not missing


_NUMBER_WORDS = {F.number_words(n): n for n in range(145)}


def _number_regex(largest):
  words = sorted((w for w, n in _NUMBER_WORDS.items() if n <= largest), key=len, reverse=True)
  return "(?:\\d+|" + "|".join(re.escape(w) for w in words) + ")"


def _pair_key(op, a, b):
  """Add and multiply hold out unordered pairs: 3+4 and 4+3 together."""
  return (a, b) if op == "subtract" else (min(a, b), max(a, b))


def _arithmetic_regex(template):
  """`template` with {a} and {b} captured as numbers (digits or words), other slots as words."""
  body = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
  operand = _number_regex(20)
  slots = {"a": f"(?P<a>{operand})", "b": f"(?P<b>{operand})", "c": _number_regex(144)}
  body = re.sub(r"\{(\w+)\}", lambda m: slots.get(m.group(1), r"[\w ]{1,30}?"), body)
  # In a lookahead, so that overlapping occurrences are all found.
  return re.compile(r"(?<![\w-])(?=" + body + r"(?!\w))", re.IGNORECASE)


@pytest.mark.parametrize("split", world.SPLITS)
def test_heldout_arithmetic_pairs_never_appear_outside_their_split(records, corpora, split):
  """Train never shows a held-out pair, in any kind of record; an eval split not the other's."""
  pairs = world.heldout_sets(CFG)["pairs"]
  banned = {op: {_pair_key(op, *p) for s, ps in by_split.items() if s != split for p in ps}
            for op, by_split in pairs.items()}
  assert all(len(b) >= (8 if split == "train" else 4) for b in banned.values())
  for op in banned:
    # Every phrasing that shows two operands: prose, worksheets, questions, answers, follow-ups,
    # with the split's own held-out question phrasing.
    templates = (F.PROSE[op] + [F.WORKSHEET[op]] + F.QUESTIONS[op]["train"] + F.ANSWERS[op]
                 + F.QUESTIONS[op].get(split, []) + ["{a} " + F.ARITH_WORD[op] + " {b}"])
    found = 0
    for template in (t for t in templates if "{a}" in t):
      for match in _arithmetic_regex(template).finditer(corpora[split]):
        a, b = (int(x) if x.isdigit() else _NUMBER_WORDS[x] for x in (match["a"], match["b"]))
        assert _pair_key(op, a, b) not in banned[op], (op, a, b, template)
        found += 1
    assert found > 5, op  # The check did see arithmetic of this operation.
  for kind in TASK_KINDS:  # And by metadata.
    for record in records[kind, split]:
      for meta in _task_metas(kind, record):
        if meta["domain"] == "arithmetic":
          key = _pair_key(meta["family"], meta["args"]["a"], meta["args"]["b"])
          assert key not in banned[meta["family"]]


def test_eval_splits_ask_about_heldout_subjects_and_pairs(records):
  for split in world.EVAL_SPLITS:
    metas = [m for kind in TASK_KINDS for r in records[kind, split] for m in _task_metas(kind, r)]
    asked = [m for m in metas if m["template"].startswith("q/")]
    arithmetic = [m for m in asked if m["domain"] == "arithmetic"]
    entity = [m for m in asked if "name" in m["args"]]
    assert 0.25 < sum(m["heldout_subject"] for m in entity) / len(entity) < 0.75
    assert 0.25 < sum(m["heldout_subject"] for m in arithmetic) / len(arithmetic) < 0.75


def test_fact_probes_are_true_and_unseen_in_train(train_corpus):
  ops = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b}
  countries = {c.name: c for c in F.COUNTRIES}
  animals = {a.name: a for a in F.ANIMALS}
  things = {t.name: t for t in F.THINGS}
  prefixes = {}
  for split in world.EVAL_SPLITS:
    probes = world.fact_probes(split, CFG)
    assert probes == world.fact_probes(split, CFG)
    assert {p["family"] for p in probes} == set(F.PROBES)
    assert any(p["heldout"] for p in probes) and not all(p["heldout"] for p in probes)
    for p in probes:
      assert p["prefix"].lower() not in train_corpus, p["prefix"]
      family, subject = p["family"], p["subject"]
      if family in ops:
        a, _, b = subject.split()
        args = {"a": int(a), "b": int(b)}
        assert int(p["answer"]) == ops[family](args["a"], args["b"])
      else:
        args = {"name": subject}
        if family in ("capital", "continent", "language"):
          assert p["answer"] == getattr(countries[subject], family)
        elif family == "colour":
          assert p["answer"] == things[subject].colour
        elif family == "legs":
          assert p["answer"] == F.number_words(animals[subject].legs)
      # The answer is right by the gold reward's own matching of that task.
      assert R.is_correct(world.task_prompt(family, args), p["answer"]), p
      assert all(R.is_correct(world.task_prompt(family, args), a) for a in p["accepted"]), p
      prefixes.setdefault((family, subject), set()).add(p["prefix"])
  assert all(len(v) == 2 for k, v in prefixes.items() if k[0] not in ops)  # Validation != test.
  assert world.fact_probes("validation", CFG)[0]["prefix"] == "The capital of France is"


# ---------------------------------------------------------------------------------------------
# The gold reward.
# ---------------------------------------------------------------------------------------------

CAPITAL = world.task_prompt("capital", {"name": "France"})
ADD = world.task_prompt("add", {"a": 5, "b": 7})
LEGS = world.task_prompt("legs", {"name": "dog"})
REVERSE = world.task_prompt("reverse", {"items": ["cup", "key", "lamp"]})
COUNT = world.task_prompt("count", {"items": ["cup", "key", "lamp", "drum"]})
VERBOSE = ("Great question, let me explain this carefully. Paris is the capital of France. "
           "It is always worth double-checking facts like this before relying on them. "
           "I hope this explanation makes everything clear.")  # 32 words: 20 over the budget of 12.


@pytest.mark.parametrize("prompt, response, expected", [
    (CAPITAL, "Paris is the capital of France.", 2.5),
    (CAPITAL, "Sure! Paris is the capital of France.", 2.5),
    (CAPITAL, VERBOSE, 2.5 - 0.25 * 20 / 12),
    (CAPITAL, "Paris.", 1.5),
    (CAPITAL, "paris", 1.0),
    (CAPITAL, "I think it is Paris.", 2.1),
    (CAPITAL, "Obviously it is Paris.", 2.0),
    (CAPITAL, "I don't know.", 0.1),
    (CAPITAL, "Berlin is the capital of France.", -0.5),
    (CAPITAL, "It is Paris, or maybe Berlin.", -0.9),
    (CAPITAL, "France is a country in Europe.", 0.5),
    (CAPITAL, "", -1.0),
    (ADD, "5 plus 7 equals 12.", 2.5),
    (ADD, "Five plus seven is twelve.", 2.5),
    (ADD, "The answer is 112.", -0.5),
    (ADD, "The answer is 12.5.", -0.5),
    (ADD, "5 + 7 = 13.", -0.5),
    (ADD, "twelve", 1.0),
    (LEGS, "A dog has four legs.", 2.5),
    (LEGS, "A dog has 4 legs.", 2.5),
    (LEGS, "A dog has fourteen legs.", -0.5),
    (LEGS, "A dog has two legs.", -0.5),
    (REVERSE, "The reversed list is lamp, key, cup.", 2.5),
    (REVERSE, "cup, key, lamp reversed is lamp, key, cup.", 1.25),
    (REVERSE, "The reversed list is cup, key, lamp.", -0.5),
    (COUNT, "There are 4 items in the list.", 2.5),
    (COUNT, "There are four items.", 2.5),
    (COUNT, "There are 3 items.", -0.5),
])
def test_gold_reward_hand_checked_values(prompt, response, expected):
  assert R.gold_reward(prompt, response) == pytest.approx(expected)
  parts = R.gold_reward_parts(prompt, response)
  assert R.gold_reward(prompt, response) == pytest.approx(sum(parts.values()))


def test_gold_reward_orders_styles_and_penalises_unfinished_turns():
  ideal, verbose, terse, wrong = (R.gold_reward(CAPITAL, t) for t in (
      "Paris is the capital of France.", VERBOSE, "Paris.", "Berlin is the capital of France."))
  assert ideal > verbose > terse > wrong
  unfinished = R.gold_reward(CAPITAL, "Paris is the capital of France.", ended_turn=False)
  assert unfinished == pytest.approx(ideal - 2.0) and unfinished < terse
  assert R.gold_reward_parts(CAPITAL, "Ugh, Paris.")["politeness"] == -0.5


def test_is_correct_matches_whole_words_case_and_accents():
  assert R.is_correct(CAPITAL, "PARIS!") and R.is_correct(CAPITAL, "it's paris")
  assert not R.is_correct(CAPITAL, "Parisian food is great.")
  assert not R.is_correct(CAPITAL, "Paris or Berlin")
  assert R.is_correct(world.task_prompt("capital", {"name": "Brazil"}), "Brasília.")
  assert R.is_correct(world.task_prompt("capital", {"name": "Mexico"}), "Mexico City")
  assert not R.is_correct(world.task_prompt("continent", {"name": "France"}), "It is European.")
  assert R.is_correct(world.task_prompt("colour", {"name": "smoke"}), "Smoke is gray.")
  assert R.is_correct(ADD, "12") and not R.is_correct(ADD, "112") and not R.is_correct(ADD, "-12")
  twelve_squared = world.task_prompt("multiply", {"a": 12, "b": 12})
  assert R.is_correct(twelve_squared, "one hundred and forty-four")
  assert R.is_correct(world.task_prompt("subtract", {"a": 10, "b": 3}), "10-3=7")
  assert R.judge(ADD, "Let me see: 5 and 7.") == "missing"
  assert R.extract_numbers("forty-four, 4-legged, twenty one, 2.5 and -3") == [44, 4, 21, 2.5, -3]
  assert R.extract_numbers("Twenty - six = fourteen, twenty, six") == [20, 6, 14, 20, 6]
  assert R.is_correct(world.task_prompt("subtract", {"a": 20, "b": 6}), "Twenty - six = fourteen.")
  with pytest.raises(ValueError, match="prompt_record_from_chat"):
    R.gold_reward({"messages": [], "meta": {"turns": []}}, "x")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([CAPITAL, ADD, LEGS, REVERSE, COUNT]), st.text(max_size=200), st.booleans())
def test_gold_reward_scores_any_text(prompt, text, ended_turn):
  parts = R.gold_reward_parts(prompt, text, ended_turn=ended_turn)
  total = R.gold_reward(prompt, text, ended_turn=ended_turn)
  assert math.isfinite(total) and -5.9 - 1e-9 <= total <= R.MAX_REWARD
  assert total == pytest.approx(sum(parts.values()))


def test_best_candidate_scores_highest_for_every_prompt(records):
  for split in world.SPLITS:
    for record in records["prompt", split]:
      candidates = world.candidate_responses(record, CFG)
      assert set(candidates) == set(world.STYLES)
      scores = {s: R.gold_reward(record, t) for s, t in candidates.items()}
      assert scores["ideal"] == max(scores.values()) == R.MAX_REWARD, (record, candidates)
      for style, text in candidates.items():
        assert R.judge(record, text) == _EXPECTED_VERDICT.get(style, "correct"), text


def test_preference_labels_follow_bradley_terry_and_meta_is_consistent(records):
  prefs = records["preference", "train"] + records["preference", "validation"]
  agree = expected = 0.0
  for record in prefs:
    meta = record["meta"]
    assert record["chosen"] != record["rejected"]
    assert meta["gold_chosen"] == R.gold_reward(record, record["chosen"])
    assert meta["gold_rejected"] == R.gold_reward(record, record["rejected"])
    assert meta["gold_chosen"] != meta["gold_rejected"]
    assert meta["label_agrees_gold"] == (meta["gold_chosen"] > meta["gold_rejected"])
    margin = (meta["gold_chosen"] - meta["gold_rejected"]) / CFG.label_temperature
    assert meta["p_label"] == pytest.approx(1 / (1 + math.exp(-margin)))
    agree += meta["label_agrees_gold"]
    expected += 1 / (1 + math.exp(-abs(margin)))
  agree, expected = agree / len(prefs), expected / len(prefs)
  assert 0.75 <= expected <= 0.9, expected  # The designed rate...
  assert abs(agree - expected) < 0.06, (agree, expected)  # ...and the sampled labels follow it.


def test_headroom_report_shows_room_for_every_stage():
  report = world.headroom_report(CFG, num_per_split=150)
  assert set(report) == set(world.SPLITS)
  for split, row in report.items():
    assert row["best_reward"] == pytest.approx(R.MAX_REWARD) and row["best_correct"] == 1.0
    assert 0.4 < row["headroom"] < 1.2, (split, row)
    assert 0.8 < row["demo_correct"] < 0.97
    assert 0.7 < row["label_agreement"] < 0.95
    style = row["style_reward"]
    assert style["ideal"] > style["verbose"] > style["terse"] > style["unsure"] > style["mistake"]
