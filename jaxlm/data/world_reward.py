r"""The gold reward of the synthetic world: a fixed, known judge that plays the human.

Like the sentiment classifier of the DPO paper's controlled task, `gold_reward` scores *any*
response text, so every stage can be measured on one scale: the SFT demonstrations, the reward
model's ranking, PPO and DPO policies. It reads only the record's ``meta`` (written by
`jaxlm.data.world`), never the generator, so it works on records loaded back from disk.

Formula (all terms are returned by `gold_reward_parts`; `gold_reward` is their sum)::

  gold = correctness + length + politeness + hedging + form + end_of_turn

  correctness  = +2.0  the right answer is stated and no wrong answer is        (CORRECT)
                  0.0  no answer at all (a refusal, "I don't know", an echo)     (MISSING)
                 -1.0  a wrong answer is stated, even next to the right one      (WRONG)
  length       = -min(1, 0.25 * max(0, words - budget) / budget)
                 words: whitespace-separated tokens; budget: meta["budget"] (12 for facts and
                 arithmetic, list length + 10 for reversing), so a reply at twice the budget
                 costs 0.25 and the penalty saturates at five times the budget.
  politeness   = -0.5 if any rude marker occurs ("obviously", "ugh", "seriously", "everyone
                 knows", "look it up", "come on", "duh", "stupid", ...; see RUDE_MARKERS)
  hedging      = -0.4 if any hedge marker occurs ("i think", "maybe", "not sure", "i don't
                 know", "if i remember correctly", ...; see HEDGE_MARKERS)
  form         = +0.5 if a complete sentence: at least 3 words, first character an upper-case
                 letter or a digit, last character . ! or ? (closing quotes/brackets ignored);
                 otherwise -0.5, and a further -0.25 per missing capital and -0.25 per missing
                 final punctuation (so "Paris." scores -0.5 and "paris" -1.0)
  end_of_turn  = -2.0 if ended_turn is False (the policy ran out of tokens before emitting its
                 end-of-turn token), else 0

The best possible score is 2.5 (a correct, polite, unhedged complete sentence within budget),
the worst -5.9. Correctness dominates the style terms: a correct reply that is merely verbose,
rude, hedged or curt still beats any wrong one (-1 + 0.5 = -0.5 at best), and saying nothing
beats saying something wrong. The intended order for one question is: correct, concise and
polite (2.5) > verbose (about 1.6-1.9) > terse, a bare "Paris." (1.5) > no answer > wrong.

Matching (what "the answer is stated" means), by ``meta["match"]``:

* ``phrase`` (facts): the text and the phrases are normalised (Unicode accents stripped, lower
  case, every non-alphanumeric run -> one space) and a phrase matches only as whole words, so
  "Europe" does not match "European" and "12" does not match "112". Correct iff one of
  ``meta["accepted"]`` occurs and none of ``meta["wrong"]`` does (accepted phrases are blanked
  first, so "Mexico City" cannot trip over a wrong phrase inside it).
* ``number`` (arithmetic, counting): every number in the text is read, as digits ("12", "-3";
  "2.5" is a non-integer and therefore wrong) or English words up to 999 ("twelve",
  "forty-four", "one hundred and forty-four"). Correct iff ``meta["answer_number"]`` is among
  them and every other number is one of ``meta["allowed_numbers"]`` (the operands, which a good
  answer may restate). Any other number is a wrong answer.
* ``sequence`` (reversing a list): the list words (``meta["target"]``) are picked out of the
  text in order; the answer is the *last* ``len(target)`` of them, so restating the question
  first is fine. Correct iff it equals ``meta["target"]``; no list word at all is MISSING.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any, Mapping

CORRECT_REWARD, MISSING_REWARD, WRONG_REWARD = 2.0, 0.0, -1.0
LENGTH_COEF, LENGTH_CAP = 0.25, 1.0
RUDE_PENALTY, HEDGE_PENALTY = 0.5, 0.4
SENTENCE_BONUS, FRAGMENT_PENALTY, FORM_PENALTY = 0.5, 0.5, 0.25
MIN_SENTENCE_WORDS = 3
UNFINISHED_PENALTY = 2.0
MAX_REWARD = CORRECT_REWARD + SENTENCE_BONUS

RUDE_MARKERS = ("obviously", "ugh", "seriously", "everyone knows", "look it up", "come on", "duh",
                "stupid", "dumb", "idiot", "whatever", "shut up", "lazy", "how do you not know")
HEDGE_MARKERS = ("i think", "i believe", "maybe", "perhaps", "probably", "not sure",
                 "not completely sure", "not certain", "might be", "could be wrong", "i guess",
                 "if i remember correctly", "don't know", "do not know", "no idea")

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate(
    "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
# A digit run not inside a word or a decimal (the lookbehind stops "10-3" reading as -3), with
# an optional fraction; or a run of letters (number words are read from these).
_TOKEN = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)|\d+(?:\.\d+)?|[a-z]+")


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
  """Accent-free lower case with every non-alphanumeric run as one space, padded with spaces."""
  if not text.isascii():
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
  return " " + " ".join(_NON_ALNUM.sub(" ", text.lower()).split()) + " "


@functools.lru_cache(maxsize=4096)
def _padded(phrases: tuple[str, ...]) -> tuple[str, ...]:
  # Normalised and space-padded, so a substring test of the padded text matches whole words.
  return tuple(p for p in (normalize(x) for x in phrases) if p.strip())


@functools.lru_cache(maxsize=4096)
def _matcher(phrases: tuple[str, ...]) -> tuple[frozenset, tuple[str, ...]]:
  # One-word phrases become a set (one C-level intersection test per text); the few longer
  # ones stay padded substrings.
  padded = _padded(phrases)
  words = frozenset(p.strip() for p in padded if p.count(" ") == 2)
  return words, tuple(p for p in padded if p.count(" ") > 2)


def _has_any(norm_text: str, phrases) -> bool:
  words, longer = _matcher(tuple(phrases))
  return not words.isdisjoint(norm_text.split()) or any(p in norm_text for p in longer)


def extract_numbers(text: str) -> list[float]:
  """All numbers in `text`, in order, from digits or English number words (< 1000)."""
  numbers: list[float] = []
  value, last = None, None  # The number word run being read, and the kind of its last word.

  def flush():
    nonlocal value, last
    if value is not None:
      numbers.append(value)
    value, last = None, None

  text = text.lower()
  matches = list(_TOKEN.finditer(text))
  tokens = [m.group() for m in matches]
  for i, tok in enumerate(tokens):
    # Number words join only across one space or hyphen: "twenty-six" is 26, but
    # "twenty - six" (a subtraction) and "twenty, six" are two numbers.
    if i and text[matches[i - 1].end():matches[i].start()] not in (" ", "-"):
      flush()
    if tok[0].isdigit() or tok[0] == "-":
      flush()
      numbers.append(float(tok) if "." in tok else int(tok))
    elif tok in _UNITS:
      n = _UNITS[tok]
      if value is not None and ((last == "tens" and n < 10) or last == "hundred"):
        value, last = value + n, "unit"
      else:
        flush()
        value, last = n, "unit"
    elif tok in _TENS:
      if value is not None and last == "hundred":
        value, last = value + _TENS[tok], "tens"
      else:
        flush()
        value, last = _TENS[tok], "tens"
    elif tok == "hundred" and value is not None and last == "unit" and value < 10:
      value, last = value * 100, "hundred"
    elif tok == "and" and last == "hundred" and i + 1 < len(tokens) and (
        tokens[i + 1] in _UNITS or tokens[i + 1] in _TENS):
      continue  # "one hundred and four": the "and" belongs to the number.
    else:
      flush()
  flush()
  return numbers


def _judge_phrase(meta: Mapping[str, Any], text: str, norm: str) -> str:
  right = _has_any(norm, meta["accepted"])
  if right:  # Blank the right answer so that a wrong phrase cannot match inside it.
    for p in _padded(tuple(meta["accepted"])):
      norm = norm.replace(p, " | ")
  if _has_any(norm, meta["wrong"]):
    return "wrong"
  return "correct" if right else "missing"


def _judge_number(meta: Mapping[str, Any], text: str, norm: str) -> str:
  numbers = extract_numbers(text)
  answer = meta["answer_number"]
  allowed = set(meta.get("allowed_numbers", ())) | {answer}
  if any(n not in allowed for n in numbers):
    return "wrong"
  return "correct" if answer in numbers else "missing"


def _judge_sequence(meta: Mapping[str, Any], text: str, norm: str) -> str:
  target = [w.lower() for w in meta["target"]]
  vocab = set(target)
  said = [w for w in norm.split() if w in vocab]
  if not said:
    return "missing"
  return "correct" if said[-len(target):] == target else "wrong"


_JUDGES = {"phrase": _judge_phrase, "number": _judge_number, "sequence": _judge_sequence}
_CORRECTNESS = {"correct": CORRECT_REWARD, "missing": MISSING_REWARD, "wrong": WRONG_REWARD}


def _is_mapping(x: Any) -> bool:
  return type(x) is dict or isinstance(x, Mapping)  # The fast path skips the ABC check.


def _task_meta(prompt_record: Mapping[str, Any]) -> Mapping[str, Any]:
  meta = prompt_record.get("meta") if _is_mapping(prompt_record) else None
  if not _is_mapping(meta) or meta.get("match") not in _JUDGES:
    hint = (" (a chat record: use world.prompt_record_from_chat(record, turn))"
            if _is_mapping(meta) and "turns" in meta else "")
    raise ValueError(f"not a world prompt record: meta needs a 'match' in {sorted(_JUDGES)}{hint}")
  return meta


def judge(prompt_record: Mapping[str, Any], response_text: str) -> str:
  """"correct", "wrong" or "missing": the correctness verdict of `response_text`."""
  meta = _task_meta(prompt_record)
  return _JUDGES[meta["match"]](meta, response_text, normalize(response_text))


def is_correct(prompt_record: Mapping[str, Any], response_text: str) -> bool:
  """Whether `response_text` states the right answer and no wrong one."""
  return judge(prompt_record, response_text) == "correct"


def _form(text: str, words: int) -> float:
  stripped = text.strip().rstrip("\"')]")
  capital = bool(stripped) and (stripped[0].isupper() or stripped[0].isdigit())
  final = bool(stripped) and stripped[-1] in ".!?"
  if capital and final and words >= MIN_SENTENCE_WORDS:
    return SENTENCE_BONUS
  return -FRAGMENT_PENALTY - FORM_PENALTY * (not capital) - FORM_PENALTY * (not final)


def gold_reward_parts(prompt_record: Mapping[str, Any], response_text: str, *,
                      ended_turn: bool = True) -> dict[str, float]:
  """The named terms of the gold reward (see the module docstring); they sum to `gold_reward`.

  Args:
    prompt_record: a record with ``"meta"`` written by the world (prompt, preference, or
      `world.prompt_record_from_chat` of a chat); ``"prompt"`` is not needed.
    response_text: the reply, without special tokens.
    ended_turn: whether the model emitted its end-of-turn token.
  """
  meta = _task_meta(prompt_record)
  norm = normalize(response_text)
  verdict = _JUDGES[meta["match"]](meta, response_text, norm)
  words = len(response_text.split())
  budget = max(1, int(meta.get("budget", 12)))
  return {
      "correctness": _CORRECTNESS[verdict],
      "length": 0.0 - min(LENGTH_CAP, LENGTH_COEF * max(0, words - budget) / budget),
      "politeness": -RUDE_PENALTY if _has_any(norm, RUDE_MARKERS) else 0.0,
      "hedging": -HEDGE_PENALTY if _has_any(norm, HEDGE_MARKERS) else 0.0,
      "form": _form(response_text, words),
      "end_of_turn": 0.0 if ended_turn else -UNFINISHED_PENALTY,
  }


def gold_reward(prompt_record: Mapping[str, Any], response_text: str, *,
                ended_turn: bool = True) -> float:
  """The gold reward of `response_text` as the answer to `prompt_record` (higher is better)."""
  # Rounded so that sums of tenths print as such (0.1, not 0.09999999999999998).
  parts = gold_reward_parts(prompt_record, response_text, ended_turn=ended_turn)
  return round(sum(parts.values()), 9)
