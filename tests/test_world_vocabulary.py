"""The world's text split covers the vocabulary that the later stages use.

The tokenizer is trained on the train text alone and the stage-1 model reads nothing else, so
every character and every style phrase of the chat, preference and prompt records must occur
in that text; otherwise "!" is spelled from bytes and "Hope that helps!" is first seen in SFT.
"""

import re

import pytest

from jaxlm.data import world
from jaxlm.data import world_core
from jaxlm.data import world_facts as F
from jaxlm.data import world_tasks
from jaxlm.data import world_text_dialogue

# 800 KB of text (about 120 KB of it dialogue prose) quotes every phrasing of every style for
# every seed tried (at 400 KB about one seed in twenty misses one), in a fraction of a second.
CFG = world.WorldConfig(seed=3, text_bytes=800_000, num_chats=300, num_preferences=400,
                        num_prompts=150, eval_fraction=0.2)
TASK_KINDS = ("chat", "preference", "prompt")
# The phrasings the assistant and system turns are made of, beyond the facts themselves.
STYLE_TABLES = {
    "FRIENDLY": F.FRIENDLY, "HEDGE": F.HEDGE, "RUDE": F.RUDE, "UNSURE": F.UNSURE,
    "VERBOSE_OPENERS": F.VERBOSE_OPENERS, "VERBOSE_FILLERS": F.VERBOSE_FILLERS,
    "VERBOSE_CLOSERS": F.VERBOSE_CLOSERS, "SYSTEM_PROMPTS": F.SYSTEM_PROMPTS,
}
# Also the follow-up questions and the answer sentences, whose words are not style but are
# just as much the later stages' vocabulary.
PHRASE_TABLES = {
    **STYLE_TABLES,
    "FOLLOWUP_SAME_SUBJECT": [t for ts in F.FOLLOWUP_SAME_SUBJECT.values() for t in ts],
    "FOLLOWUP_OTHER_SUBJECT": F.FOLLOWUP_OTHER_SUBJECT["train"],
    "ANSWERS": [t for ts in F.ANSWERS.values() for t in ts],
}
_SLOT = re.compile(r"\{\w+\}")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _words(text):
  return set(_WORD.findall(text.lower()))


def _template_words(template):
  """The words a template writes itself, not those of its slots ("{c}'s" gives none)."""
  return {w for w in _words(_SLOT.sub(" zzslot ", template).replace("zzslot'", "zzslot "))
          if "zzslot" not in w}


def _fragments(template):
  """The literal runs of a template between its slots: "{core} Hope that helps!" -> one."""
  return [p.strip() for p in _SLOT.split(template) if p.strip()]


def _texts(record):
  messages = record.get("messages") or record["prompt"]
  return [m["content"] for m in messages] + [record[k] for k in ("chosen", "rejected")
                                             if k in record]


@pytest.fixture(scope="module")
def train_text():
  return [r["text"] for r in world.generate("text", "train", CFG)]


@pytest.fixture(scope="module")
def later_stages():
  """All model-visible text of the train chat, preference and prompt records, joined."""
  return "\n".join(t for kind in TASK_KINDS for r in world.generate(kind, "train", CFG)
                   for t in _texts(r))


def test_every_character_of_the_later_stages_occurs_in_train_text(train_text, later_stages):
  missing = set(later_stages) - set("\n".join(train_text))
  assert not missing, sorted(missing)
  assert "!" in later_stages  # The check is not vacuous: "Sure!", "Good question!", ...


@pytest.mark.parametrize("table", sorted(PHRASE_TABLES))
def test_every_word_of_the_phrases_the_later_stages_use_occurs_in_train_text(
    train_text, later_stages, table):
  text_words, used_words = _words("\n".join(train_text)), _words(later_stages)
  needed = {w for t in PHRASE_TABLES[table] for w in _template_words(t)} & used_words
  assert needed  # Every table is used by the train records.
  missing = needed - text_words
  assert not missing, (table, sorted(missing))


@pytest.mark.parametrize("table", sorted(STYLE_TABLES))
def test_style_phrases_occur_verbatim_in_train_text(train_text, later_stages, table):
  """Whole phrases, not only their words: "Let me think about this for a moment." as such."""
  text = "\n".join(train_text)
  fragments = [f for t in STYLE_TABLES[table] for f in _fragments(t) if f in later_stages]
  assert fragments
  missing = [f for f in fragments if f not in text]
  assert not missing, (table, missing)


def test_dialogue_prose_is_a_modest_share_without_chat_markup(train_text):
  # Dialogue documents are the ones that quote speech; no other document kind has a '"'.
  dialogue = [t for t in train_text if '"' in t]
  share = sum(len(t) for t in dialogue) / sum(len(t) for t in train_text)
  assert 0.10 <= share <= 0.20, share
  for doc in dialogue:
    assert not re.search(r"(?im)^(user|assistant|system)\s*:|<\|", doc), doc
  # Every kind of dialogue document is there, and they mix the world's facts in.
  assert any(t.startswith("Dear ") for t in dialogue)
  assert any("A user called " in t for t in dialogue)
  assert any("Suppose a student asks" in t for t in dialogue)
  assert any(" asked, \"" in t and "Dear " not in t for t in dialogue)
  names = [c.name for c in F.COUNTRIES] + [a.name for a in F.ANIMALS]
  assert sum(any(n in t for n in names) for t in dialogue) > 0.3 * len(dialogue)


def test_train_text_never_states_a_wrong_answer(monkeypatch):
  """Prose may quote rude or unsure answers, but never a plain mistake: no false facts."""
  styles = []
  render = world_tasks.render

  def spy(meta, style, rng, world_):
    styles.append(style)
    return render(meta, style, rng, world_)

  monkeypatch.setattr(world_tasks, "render", spy)
  for _ in world.generate("text", "train", CFG):
    pass
  assert set(styles) == set(world.STYLES) - {"mistake"}, sorted(set(styles))


def test_a_tokenizer_trained_on_the_text_has_a_piece_for_the_exclamation_mark(world_tokenizer):
  """The failure this all exists for: "!" spelled as the byte <0x21> by the world's tokenizer.

  `world_tokenizer` (conftest) is trained on a small world's train text. SentencePiece drops the
  rarest 0.05% of characters to bytes, so "!" must be common in the text, not only present.
  (Characters at the margin, like "U", "Z" and "*", are the tokenizer's `character_coverage`'s
  business, not the world's.)
  """
  pieces = [world_tokenizer.id_to_piece(i) for i in world_tokenizer.encode("Good question!")]
  assert "!" in pieces and not any(p.startswith("<0x") for p in pieces), pieces


@pytest.mark.parametrize("build", list(world_text_dialogue.DOC_WEIGHTS), ids=lambda f: f.__name__)
def test_dialogue_documents_build_on_many_draws(build):
  """Rare draws too (a letter whose verbose replies used up every closing line, ...)."""
  seeded = world_core.seeded_world(CFG.seed)
  for i in range(3000):
    split = world.SPLITS[i % 3]
    doc = build(world_core.rng_for(CFG.seed, "dialogue-test", i), seeded, split)
    assert '"' in doc and "{" not in doc and "}" not in doc, doc
