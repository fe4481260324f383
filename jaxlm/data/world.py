"""The embedded synthetic world: seeded records for every training stage, with a known reward.

Why. To *measure* what each stage of the pipeline does we need a task where the truth is known,
as in the DPO paper's controlled-sentiment task where a fixed classifier plays the human. This
module generates, with no network and no files, one small universe of facts and tasks and all
four record kinds about it; `jaxlm.data.world_reward.gold_reward` is the fixed judge.

The universe (tables in `jaxlm.data.world_facts`): 70 countries (capital, continent, language),
47 animals (sound, legs, habitat, diet), 45 things with a colour, arithmetic (add and subtract
within 1..20, multiply within 1..12, numbers as digits or words) and word tasks (reverse a list
of 3-6 words, count a list of 2-9 words): 13 task *families* in 5 *domains* (`DOMAINS`).

Record kinds (the schemas of `jaxlm.data.schemas`):

* ``text`` (pretraining): prose documents without role markers, of ten kinds: encyclopedic or
  casual profiles of 1-3 countries or animals, travel and animal stories, grouped lists
  ("Capitals to remember: ..."), colour descriptions, worksheets, times tables and word
  problems, list puzzles, quiz notes of ``Q: ... A: ...`` lines, and fun-fact notes; profiles
  sometimes end with a Q/A line. A document runs from a few sentences to a few paragraphs.
* ``chat`` (SFT): 1-3 user turns, sometimes after a system message; follow-ups ask about the same
  subject ("What continent is it on?") or the same question about another one ("And what about
  Germany?"). The assistant turns imitate human demonstrators of uneven quality: each chat has
  a persona style (`DEMO_STYLE_MIX`) that most of its turns use: ideal, friendly, verbose,
  terse, hedging, rude, a plain mistake, or not knowing. ``meta["turns"][k]`` is the task of
  the k-th assistant turn (what `gold_reward` needs) and ``meta["styles"][k]`` its style;
  `prompt_record_from_chat` turns any turn into a prompt record.
* ``prompt`` (PPO): a conversation ending with a user turn; ``meta`` is that turn's task.
* ``preference`` (reward model, DPO): a prompt and two responses in different styles with
  different gold rewards (`PREFERENCE_STYLE_MIX`); simulated raters prefer response a with
  probability ``sigmoid((g_a - g_b) / label_temperature)`` (Bradley-Terry), so labels are noisy
  like human ones. ``meta`` holds the task plus ``gold_chosen``, ``gold_rejected``,
  ``style_chosen``, ``style_rejected``, ``label_agrees_gold`` and ``p_label`` (the chance of
  this label).

Task meta (every prompt record, preference record and chat turn): ``family``, ``domain``,
``subject``, ``args`` (what the generator renders from), ``answer`` (canonical text),
``match`` and the matching data of `world_reward` (``accepted``/``wrong`` phrases, or
``answer_number``/``allowed_numbers``, or ``target``), ``budget`` (words), ``split``,
``template``, ``heldout_template``, ``heldout_subject``.

Splits: what evaluation holds out of training.

* Question phrasings: every family has train templates and one template per eval split
  (`world_facts.QUESTIONS`, likewise the "what about X?" follow-ups). Train records never use
  a validation or test template; an eval question uses its split's template with probability
  `P_HELDOUT` (``meta["heldout_template"]``).
* Subjects: about 12% of the countries, animals and things (drawn from the seed) are only
  *asked about* in validation, another 12% only in test: no chat, prompt or preference of
  another split names them (nor a held-out country's capital), not even in a wrong answer.
  They all still appear in the prose of every text split, so the knowledge is learnable; what
  is measured is transfer from reading to answering. An eval question picks one of its
  split's held-out subjects with probability `P_HELDOUT`.
* Arithmetic: about 5% of each operation's operand pairs (unordered for add and multiply, so 3+4
  and 4+3 go together) are held out for validation and another 5% for test, from *every*
  train record including the text: answering them needs arithmetic, not recall. Eval text may
  contain its own split's held-out pairs, never the other split's.
* Probes: `fact_probes` uses prose phrasings (`world_facts.PROBES`) that no train record of
  any kind contains; validation and test use different ones. Eval text contains them (20% of
  its fact sentences), so eval loss also measures those phrasings.

Determinism: record i of (kind, split) is drawn from its own RNG seeded by (WORLD_VERSION,
seed, kind, split, i), so records do not depend on the order of calls, and growing a size only
appends records. The held-out sets depend on the seed alone.

Headroom is part of the design: `headroom_report` measures, per split, the gold reward of the
demonstrations, of the best style (what RLHF can reach; every task can score the maximum 2.5)
and how often the noisy labels agree with the gold reward (the ceiling of any reward model's
accuracy). `tools/world_report.py` prints it. At the default config: demonstrations about 1.8
(89% correct), best 2.5, labels agree with gold about 83% of the time.

Helpers beyond `generate` and `fact_probes`: `prompt_record_from_chat`, `task_prompt` (a prompt
record for any task you name), `candidate_responses` (one response per style), `heldout_sets`,
`num_records` and `headroom_report`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
from typing import Any, Iterator, Mapping

from jaxlm.data import schemas
from jaxlm.data import world_facts as F
from jaxlm.data import world_reward

WORLD_VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
EVAL_SPLITS = SPLITS[1:]

TEXT_EVAL_FRACTION = 0.05  # validation and test text, each relative to config.text_bytes
HOLDOUT_SUBJECT_FRACTION = 0.12  # of each entity table, per eval split
HOLDOUT_PAIR_FRACTION = 0.05  # of each operation's operand pairs, per eval split
P_HELDOUT = 0.5  # in eval splits: chance a question uses a held-out template / subject / pair
P_PROBE_PHRASING = 0.2  # in eval text: chance a fact sentence uses its split's probe phrasing

DOMAINS = {"capital": "country", "continent": "country", "language": "country",
           "sound": "animal", "legs": "animal", "habitat": "animal", "diet": "animal",
           "colour": "thing", "add": "arithmetic", "subtract": "arithmetic",
           "multiply": "arithmetic", "reverse": "list", "count": "list"}
FAMILY_WEIGHTS = {"capital": 0.10, "continent": 0.07, "language": 0.07, "sound": 0.07, "legs": 0.07,
                  "habitat": 0.06, "diet": 0.06, "colour": 0.08, "add": 0.10, "subtract": 0.08,
                  "multiply": 0.08, "reverse": 0.08, "count": 0.08}

STYLES = ("ideal", "friendly", "verbose", "terse", "hedge", "rude", "mistake", "unsure")
# Demonstrators: a quarter ideal, the rest with the faults real demonstrations have; mistakes
# and not knowing are rare but present, so imitation alone lands clearly below the best.
DEMO_STYLE_MIX = {"ideal": 0.25, "friendly": 0.15, "verbose": 0.20, "terse": 0.12, "hedge": 0.10,
                  "rude": 0.07, "mistake": 0.08, "unsure": 0.03}
# Candidates the raters compare: flatter than the demonstrations, like samples of several models.
PREFERENCE_STYLE_MIX = {"ideal": 0.18, "friendly": 0.14, "verbose": 0.15, "terse": 0.13,
                        "hedge": 0.12, "rude": 0.10, "mistake": 0.12, "unsure": 0.06}
_PERSONA_LOYALTY = 0.6  # chance a chat turn uses the chat's persona style rather than a fresh draw

_COUNTRY = {c.name: c for c in F.COUNTRIES}
_ANIMAL = {a.name: a for a in F.ANIMALS}
_THING = {t.name: t for t in F.THINGS}
_ENTITIES = {"country": tuple(_COUNTRY), "animal": tuple(_ANIMAL), "thing": tuple(_THING)}
_FAMILIES_OF = {d: tuple(f for f, dd in DOMAINS.items() if dd == d) for d in set(DOMAINS.values())}
_OPS = ("add", "subtract", "multiply")
_OP_SYMBOL = {"add": "+", "subtract": "-", "multiply": "x"}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Sizes and seed of the generated world.

  Attributes:
    seed: seeds every record and the held-out sets.
    text_bytes: approximate UTF-8 size of the train text; validation and test get 5% each.
    num_chats: train chat records; validation and test get `eval_fraction` of it each.
    num_preferences: train preference pairs (eval: `eval_fraction` of it).
    num_prompts: train prompt records (eval: `eval_fraction` of it).
    eval_fraction: size of validation and test relative to train, for chats/prefs/prompts.
    label_temperature: Bradley-Terry temperature of the simulated raters, in gold-reward units.
      At 0.5, a pair 0.5 apart gets the gold-preferred label 73% of the time and a pair 1.0
      apart 88%; over the default candidate mix about 83% of labels agree with gold.
  """

  seed: int = 0
  text_bytes: int = 3_000_000
  num_chats: int = 20_000
  num_preferences: int = 20_000
  num_prompts: int = 4_000
  eval_fraction: float = 0.1
  label_temperature: float = 0.5

  def __post_init__(self):
    for name in ("text_bytes", "num_chats", "num_preferences", "num_prompts"):
      if getattr(self, name) < 0:
        raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.eval_fraction <= 1.0:
      raise ValueError(f"WorldConfig.eval_fraction must be in [0, 1], got {self.eval_fraction}")
    if not self.label_temperature > 0:
      raise ValueError(f"WorldConfig.label_temperature must be > 0, got {self.label_temperature}")

  def fingerprint(self) -> str:
    """A short stable hash of every field and WORLD_VERSION, for cache directory names."""
    blob = json.dumps({"world_version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Randomness and the held-out sets.
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, *parts: Any) -> random.Random:
  # String seeds go through SHA-512 in CPython, so streams are stable across runs and versions.
  return random.Random("/".join(["jaxlm-world", WORLD_VERSION, str(seed), *map(str, parts)]))


def _mix(weights: Mapping[Any, float]) -> tuple[tuple, tuple]:
  keys, cum, total = [], [], 0.0
  for key, weight in weights.items():
    total += weight
    keys.append(key)
    cum.append(total)
  return tuple(keys), tuple(cum)


def _draw(rng: random.Random, mix: tuple[tuple, tuple]):
  return rng.choices(mix[0], cum_weights=mix[1])[0]


_FAMILY_MIX = _mix(FAMILY_WEIGHTS)
_DEMO_MIX = _mix(DEMO_STYLE_MIX)
_PREF_MIX = _mix(PREFERENCE_STYLE_MIX)
_CHAT_TURNS = _mix({1: 0.55, 2: 0.30, 3: 0.15})
_PROMPT_TURNS = _mix({1: 0.60, 2: 0.30, 3: 0.10})


def _pair_key(op: str, a: int, b: int) -> tuple[int, int]:
  return (a, b) if op == "subtract" else (min(a, b), max(a, b))


def _all_pairs(op: str) -> list[tuple[int, int]]:
  lo, hi = F.ARITH_RANGES[op]
  return sorted({_pair_key(op, a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)
                 if op != "subtract" or b <= a})


@dataclasses.dataclass(frozen=True)
class _World:
  """The seeded structure shared by all records: who is asked about where."""
  subjects: dict  # domain -> split -> names asked about in that split ("train": the rest)
  held_pairs: dict  # op -> eval split -> canonical operand pairs held out for that split
  pair_split: dict  # op -> canonical pair -> the eval split holding it out (absent: train)


@functools.lru_cache(maxsize=8)
def _world(seed: int) -> _World:
  rng = _rng(seed, "holdout")
  subjects = {}
  for domain, names in _ENTITIES.items():
    order = sorted(names)
    rng.shuffle(order)
    k = max(1, round(HOLDOUT_SUBJECT_FRACTION * len(order)))
    subjects[domain] = {"validation": tuple(sorted(order[:k])),
                        "test": tuple(sorted(order[k:2 * k])),
                        "train": tuple(sorted(order[2 * k:]))}
  held_pairs, pair_split = {}, {}
  for op in _OPS:
    pairs = _all_pairs(op)
    rng.shuffle(pairs)
    k = max(1, round(HOLDOUT_PAIR_FRACTION * len(pairs)))
    held_pairs[op] = {"validation": tuple(sorted(pairs[:k])), "test": tuple(sorted(pairs[k:2 * k]))}
    pair_split[op] = {p: s for s, ps in held_pairs[op].items() for p in ps}
  return _World(subjects, held_pairs, pair_split)


def _pick_subject(rng, world: _World, split: str, domain: str, exclude=None) -> tuple[str, bool]:
  held = split != "train" and rng.random() < P_HELDOUT
  pool = world.subjects[domain][split if held else "train"]
  name = rng.choice(pool)
  while name == exclude and len(pool) > 1:
    name = rng.choice(pool)
  return name, held


def _pick_pair(rng, world: _World, split: str, op: str, exclude=None) -> tuple[tuple, bool]:
  if split != "train" and rng.random() < P_HELDOUT:
    while True:
      a, b = rng.choice(world.held_pairs[op][split])
      pair = (b, a) if op != "subtract" and rng.random() < 0.5 else (a, b)
      if pair != exclude:
        return pair, True
  lo, hi = F.ARITH_RANGES[op]
  while True:  # Rejection sampling: held-out pairs are a small fraction.
    a = rng.randint(lo, hi)
    b = rng.randint(lo, a if op == "subtract" else hi)
    if _pair_key(op, a, b) not in world.pair_split[op] and (a, b) != exclude:
      return (a, b), False


def _text_pair(rng, world: _World, split: str, op: str) -> tuple[int, int]:
  """An operand pair that the text of `split` may show (train pairs, plus the split's own)."""
  lo, hi = F.ARITH_RANGES[op]
  while True:
    a = rng.randint(lo, hi)
    b = rng.randint(lo, a if op == "subtract" else hi)
    if _text_may_show(world, split, op, a, b):
      return a, b


def _text_may_show(world: _World, split: str, op: str, a: int, b: int) -> bool:
  return world.pair_split[op].get(_pair_key(op, a, b)) in (None, split)


# ---------------------------------------------------------------------------------------------
# Template slots.
# ---------------------------------------------------------------------------------------------


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _num(n: int, words: bool) -> str:
  return F.number_words(n) if words else str(n)


def _country_fields(name: str) -> dict[str, str]:
  c = _COUNTRY[name]
  return {"c": c.name, "cap": c.capital, "cont": c.continent, "lang": c.language, "x": c.name}


def _animal_fields(name: str, digits: bool = False) -> dict[str, str]:
  a = _ANIMAL[name]
  habitat_np, loc, _ = F.HABITATS[a.habitat]
  a_diet, diets, gloss, _ = F.DIETS[a.diet]
  a_animal = f"{a.article} {a.name}"
  legs = "no" if a.legs == 0 else _num(a.legs, not digits)
  return {"animal": a.name, "Animal": _cap(a.name), "animals": a.plural, "Animals": _cap(a.plural),
          "a_animal": a_animal, "A_animal": _cap(a_animal), "the_animal": f"the {a.name}",
          "sound": a.sound, "sound_s": a.sound_s, "sound_ing": a.sound_ing, "legs": legs,
          "legs_terse": "none" if a.legs == 0 else legs, "loc": loc, "Loc": _cap(loc),
          "habitat_np": habitat_np, "habitat": a.habitat, "diet": a.diet, "a_diet": a_diet,
          "diets": diets, "gloss": gloss, "x": a_animal}


def _thing_fields(name: str) -> dict[str, str]:
  t = _THING[name]
  return {"obj": t.name, "np": t.np, "NP": _cap(t.np), "colour": t.colour, "x": t.np}


_ENTITY_FIELDS = {"country": _country_fields, "animal": _animal_fields, "thing": _thing_fields}


def _arith_fields(op: str, a: int, b: int, words: bool) -> dict[str, Any]:
  c = {"add": a + b, "subtract": a - b, "multiply": a * b}[op]
  fa, fb = _num(a, words), _num(b, words)
  return {"a": fa, "b": fb, "c": _num(c, words), "x": f"{fa} {F.ARITH_WORD[op]} {fb}",
          "_words": words}


def _list_fields(items: list[str], words: bool) -> dict[str, str]:
  return {"items": ", ".join(items), "rev": ", ".join(reversed(items)),
          "n": _num(len(items), words)}


def _person(rng) -> dict[str, str]:
  name, pronoun = rng.choice(F.PEOPLE)
  subj, obj, poss = F.PRONOUNS[pronoun]
  return {"name": name, "subj": subj, "Subj": _cap(subj), "obj_pron": obj, "poss": poss,
          "things": rng.choice(F.COUNTABLE_THINGS)}


def _fields(meta: Mapping[str, Any], rng) -> dict[str, Any]:
  """The slots of a task, with a fresh choice of digits or words for the numbers in it."""
  args, domain = meta["args"], meta["domain"]
  if domain == "country":
    return _country_fields(args["name"])
  if domain == "animal":
    return _animal_fields(args["name"], digits=rng.random() < 0.3)
  if domain == "thing":
    return _thing_fields(args["name"])
  if domain == "arithmetic":
    return _arith_fields(meta["family"], args["a"], args["b"], words=rng.random() < 0.2)
  return _list_fields(args["items"], words=rng.random() < 0.2)


# ---------------------------------------------------------------------------------------------
# Tasks: what is asked, and what the gold reward needs to judge the answer.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _value_forms(family: str) -> dict[Any, tuple[str, ...]]:
  """Every possible answer value of a phrase family -> its accepted spellings."""
  if family == "capital":
    return {c.capital: (c.capital, *c.capital_alts) for c in F.COUNTRIES}
  if family == "continent":
    return {c: (c,) for c in F.CONTINENTS}
  if family == "language":
    return {c.language: (c.language, *c.language_alts) for c in F.COUNTRIES}
  if family == "sound":
    return {a.sound: (a.sound, a.sound_s, a.sound_ing) for a in F.ANIMALS}
  if family == "legs":
    return dict(F.LEG_FORMS)
  if family == "habitat":
    return {h: forms for h, (_, _, forms) in F.HABITATS.items()}
  if family == "diet":
    return {d: spec[3] for d, spec in F.DIETS.items()}
  return {t.colour: F.COLOUR_FORMS.get(t.colour, (t.colour,)) for t in F.THINGS}


def _phrase_value(family: str, name: str):
  if DOMAINS[family] == "country":
    c = _COUNTRY[name]
    return {"capital": c.capital, "continent": c.continent, "language": c.language}[family]
  if DOMAINS[family] == "animal":
    return getattr(_ANIMAL[name], family)
  return _THING[name].colour


@functools.lru_cache(maxsize=None)
def _phrase_spec(family: str, name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
  value = _phrase_value(family, name)
  forms = _value_forms(family)
  accepted = forms[value]
  wrong = {f for v, fs in forms.items() if v != value for f in fs}
  if family == "legs":  # Any other count is wrong too, not only the counts animals here have.
    wrong |= {form for n in range(21) if n != value for form in (str(n), F.number_words(n))}
    wrong -= {"0", "zero"} if value == 0 else set()
  wrong = sorted(wrong - set(accepted))
  answer = ("no legs" if value == 0 else F.number_words(value)) if family == "legs" else value
  return answer, accepted, tuple(wrong)


def _answer_spec(family: str, args: Mapping[str, Any]) -> dict[str, Any]:
  domain = DOMAINS[family]
  if domain == "arithmetic":
    a, b = args["a"], args["b"]
    c = {"add": a + b, "subtract": a - b, "multiply": a * b}[family]
    return {"match": "number", "answer": str(c), "answer_number": c,
            "allowed_numbers": sorted({a, b}), "budget": 12}
  if family == "reverse":
    target = list(reversed(args["items"]))
    return {"match": "sequence", "answer": ", ".join(target), "target": target,
            "budget": len(target) + 10}
  if family == "count":
    n = len(args["items"])
    return {"match": "number", "answer": str(n), "answer_number": n, "allowed_numbers": [],
            "budget": 12}
  answer, accepted, wrong = _phrase_spec(family, args["name"])
  return {"match": "phrase", "answer": answer, "accepted": list(accepted), "wrong": list(wrong),
          "budget": 12}


def _subject(family: str, args: Mapping[str, Any]) -> str:
  if "name" in args:
    return args["name"]
  if "items" in args:
    return ", ".join(args["items"])
  return f"{args['a']} {_OP_SYMBOL[family]} {args['b']}"


def _task(family, args, split, template, heldout_template, heldout_subject) -> dict[str, Any]:
  meta = {"family": family, "domain": DOMAINS[family], "subject": _subject(family, args),
          "args": dict(args)}
  meta.update(_answer_spec(family, args))
  meta.update(split=split, template=template, heldout_template=heldout_template,
              heldout_subject=heldout_subject)
  return meta


def _sample_args(rng, world: _World, split: str, family: str, exclude=None) -> tuple[dict, bool]:
  domain = DOMAINS[family]
  if domain == "arithmetic":
    (a, b), held = _pick_pair(rng, world, split, family, exclude)
    return {"a": a, "b": b}, held
  if domain == "list":
    n = rng.randint(3, 6) if family == "reverse" else rng.randint(2, 9)
    return {"items": rng.sample(F.LIST_WORDS, n)}, False
  name, held = _pick_subject(rng, world, split, domain, exclude)
  return {"name": name}, held


def _pick_template(rng, split: str, table: Mapping[str, list[str]], prefix: str):
  """(template, its id, whether held out): an eval split's own template with P_HELDOUT."""
  held = split != "train" and rng.random() < P_HELDOUT
  group = split if held else "train"
  k = rng.randrange(len(table[group]))
  return table[group][k], f"{prefix}/{group}/{k}", held


def _ask(rng, world: _World, split: str, family: str | None = None) -> tuple[str, dict]:
  """A fresh question: (user text, task meta)."""
  family = family or _draw(rng, _FAMILY_MIX)
  template, template_id, held_template = _pick_template(
      rng, split, F.QUESTIONS[family], f"q/{family}")
  args, held_subject = _sample_args(rng, world, split, family)
  meta = _task(family, args, split, template_id, held_template, held_subject)
  return template.format(**_fields(meta, rng)), meta


def _followup(rng, world: _World, split: str, prev: Mapping[str, Any], asked: set):
  """The next user turn after a question about `prev`: same subject, same family, or new.

  `asked` holds the (family, subject) pairs of the conversation so far, so a pronoun follow-up
  never repeats a question.
  """
  domain, r = prev["domain"], rng.random()
  fresh = [f for f in _FAMILIES_OF.get(domain, ()) if (f, prev["subject"]) not in asked]
  if domain in ("country", "animal") and r < 0.45 and fresh:
    family = rng.choice(fresh)
    k = rng.randrange(len(F.FOLLOWUP_SAME_SUBJECT[family]))
    meta = _task(family, prev["args"], split, f"followup_same/{family}/{k}", False,
                 prev["heldout_subject"])
    return F.FOLLOWUP_SAME_SUBJECT[family][k], meta
  if domain != "list" and r < 0.8:
    family = prev["family"]
    old = prev["args"].get("name") or (prev["args"]["a"], prev["args"]["b"])
    args, held_subject = _sample_args(rng, world, split, family, exclude=old)
    template, template_id, held_template = _pick_template(
        rng, split, F.FOLLOWUP_OTHER_SUBJECT, "followup_other")
    meta = _task(family, args, split, template_id, held_template, held_subject)
    return template.format(x=_fields(meta, rng)["x"]), meta
  return _ask(rng, world, split)


# ---------------------------------------------------------------------------------------------
# Responses in each style.
# ---------------------------------------------------------------------------------------------


def _core(rng, family: str, fields: Mapping[str, Any]) -> str:
  return _cap(rng.choice(F.ANSWERS[family]).format(**fields))


def _lower_first(core: str, domain: str) -> str:
  # Country answers mostly start with a name ("France is ..."), which must keep its capital.
  if domain == "country" and core.split()[0] not in ("The", "People", "In"):
    return core
  return core[:1].lower() + core[1:]


def _wrong_fields(meta: Mapping[str, Any], fields: dict, rng, world: _World) -> dict:
  """`fields` with the answer slots replaced by a plausible wrong answer (for "mistake")."""
  family, split, f = meta["family"], meta["split"], dict(fields)
  # Wrong answers come from subjects this split may name, so train records never mention a
  # held-out subject, not even as a mistake.
  def pool(domain):
    own = world.subjects[domain][split] if split != "train" else ()
    return world.subjects[domain]["train"] + own

  if family in ("capital", "language"):
    key = "cap" if family == "capital" else "lang"
    options = sorted({_country_fields(n)[key] for n in pool("country")} - {f[key]})
    f[key] = rng.choice(options)
  elif family == "continent":
    f["cont"] = rng.choice([c for c in F.CONTINENTS if c != f["cont"]])
  elif family == "sound":
    other = rng.choice([n for n in pool("animal") if _ANIMAL[n].sound != f["sound"]])
    f.update({k: _animal_fields(other)[k] for k in ("sound", "sound_s", "sound_ing")})
  elif family == "legs":
    legs = rng.choice([n for n in F.LEG_FORMS if n != _ANIMAL[meta["args"]["name"]].legs])
    f["legs"] = "no" if legs == 0 else _num(legs, not f["legs"].isdigit())
  elif family == "habitat":
    habitat = rng.choice([h for h in F.HABITATS if h != f["habitat"]])
    f.update(habitat=habitat, habitat_np=F.HABITATS[habitat][0], loc=F.HABITATS[habitat][1])
  elif family == "diet":
    diet = rng.choice([d for d in F.DIETS if d != f["diet"]])
    f.update(diet=diet, a_diet=F.DIETS[diet][0], diets=F.DIETS[diet][1], gloss=F.DIETS[diet][2])
  elif family == "colour":
    f["colour"] = rng.choice(sorted({t.colour for t in F.THINGS} - {f["colour"]}))
  elif family in _OPS or family == "count":
    right = meta["answer_number"]
    taken = set(meta["allowed_numbers"]) | {right}
    options = [right + d for d in (-2, -1, 1, 2, 10) if right + d >= 1 and right + d not in taken]
    f["c" if family in _OPS else "n"] = _num(rng.choice(options), f.get("_words", False))
  else:  # reverse: the original order, or the right answer with two neighbours swapped
    items = list(meta["args"]["items"]) if rng.random() < 0.5 else list(meta["target"])
    if items == meta["target"]:
      i = rng.randrange(len(items) - 1)
      items[i], items[i + 1] = items[i + 1], items[i]
    f["rev"] = ", ".join(items)
  return f


def _render(meta: Mapping[str, Any], style: str, rng, world: _World) -> str:
  """A response to the task `meta` in `style` (one of STYLES)."""
  family = meta["family"]
  fields = _fields(meta, rng)
  if style == "mistake":
    return _core(rng, family, _wrong_fields(meta, fields, rng, world))
  if style == "unsure":
    return rng.choice(F.UNSURE)
  core = _core(rng, family, fields)
  if style == "ideal":
    return core
  if style == "friendly":
    return rng.choice(F.FRIENDLY).format(core=core)
  if style == "verbose":
    fillers = rng.sample(F.VERBOSE_FILLERS, rng.randint(2, 3))
    return " ".join([rng.choice(F.VERBOSE_OPENERS), core, *fillers, rng.choice(F.VERBOSE_CLOSERS)])
  terse = str(fields[F.TERSE_SLOT[family]])
  if style == "terse":
    return rng.choice([terse, terse + ".", _cap(terse) + ".", _cap(terse)])
  if style not in ("hedge", "rude"):
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
  template = rng.choice(F.HEDGE if style == "hedge" else F.RUDE)
  return template.format(core=core, core_lc=_lower_first(core, meta["domain"]), terse=terse)


# ---------------------------------------------------------------------------------------------
# Conversations: chat, prompt and preference records.
# ---------------------------------------------------------------------------------------------


def _dialogue(rng, world: _World, split: str, num_user_turns: int, answer_last: bool):
  """(messages, metas of answered turns, their styles, meta of the last user turn)."""
  messages: list[dict[str, str]] = []
  if rng.random() < 0.25:
    messages.append({"role": "system", "content": rng.choice(F.SYSTEM_PROMPTS)})
  persona = _draw(rng, _DEMO_MIX)  # A demonstrator's habits persist across a conversation.
  metas, styles, meta, asked = [], [], None, set()
  for turn in range(num_user_turns):
    if meta is None:
      question, meta = _ask(rng, world, split)
    else:
      question, meta = _followup(rng, world, split, meta, asked)
    asked.add((meta["family"], meta["subject"]))
    messages.append({"role": "user", "content": question})
    if turn == num_user_turns - 1 and not answer_last:
      break
    style = persona if rng.random() < _PERSONA_LOYALTY else _draw(rng, _DEMO_MIX)
    messages.append({"role": "assistant", "content": _render(meta, style, rng, world)})
    metas.append(meta)
    styles.append(style)
  return messages, metas, styles, meta


def _chat(rng, world: _World, split: str, index: int, config: WorldConfig) -> dict[str, Any]:
  messages, metas, styles, _ = _dialogue(rng, world, split, _draw(rng, _CHAT_TURNS), True)
  meta = {"turns": metas, "styles": styles, "split": split, "index": index,
          "world_version": WORLD_VERSION}
  return {"messages": messages, "meta": meta}


def _prompt(rng, world: _World, split: str, index: int, config: WorldConfig) -> dict[str, Any]:
  num_turns = _draw(rng, _PROMPT_TURNS)
  messages, _, _, meta = _dialogue(rng, world, split, num_turns, False)
  return {"prompt": messages, "meta": {**meta, "index": index, "num_turns": num_turns,
                                       "world_version": WORLD_VERSION}}


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _preference(rng, world: _World, split: str, index: int, config: WorldConfig) -> dict[str, Any]:
  record = _prompt(rng, world, split, index, config)
  meta = record["meta"]
  style_a = _draw(rng, _PREF_MIX)
  text_a = _render(meta, style_a, rng, world)
  gold_a = world_reward.gold_reward(record, text_a)
  for _ in range(50):  # Two different responses with different gold rewards: ties carry no label.
    style_b = _draw(rng, _PREF_MIX)
    text_b = _render(meta, style_b, rng, world)
    gold_b = world_reward.gold_reward(record, text_b)
    if text_b != text_a and abs(gold_a - gold_b) > 1e-9:
      break
  p_a = _sigmoid((gold_a - gold_b) / config.label_temperature)
  a, b = (text_a, gold_a, style_a), (text_b, gold_b, style_b)
  a_wins = rng.random() < p_a
  (chosen, g_c, s_c), (rejected, g_r, s_r) = (a, b) if a_wins else (b, a)
  meta.update(gold_chosen=g_c, gold_rejected=g_r, style_chosen=s_c, style_rejected=s_r,
              label_agrees_gold=g_c > g_r, p_label=p_a if a_wins else 1.0 - p_a,
              label_temperature=config.label_temperature)
  return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected, "meta": meta}


def prompt_record_from_chat(record: Mapping[str, Any], turn: int = 0) -> dict[str, Any]:
  """The prompt record for the `turn`-th assistant turn of a world chat record.

  Args:
    record: a chat record from `generate("chat", ...)`.
    turn: which assistant turn (0-based; negative counts from the end).

  Returns:
    ``{"prompt": messages before that turn, "meta": its task meta + {"turn": turn}}``; score a
    reply with ``world_reward.gold_reward(result, reply)``.
  """
  turns = record["meta"]["turns"]
  answers = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
  if len(answers) != len(turns):
    raise ValueError(f"chat meta has {len(turns)} turns but {len(answers)} assistant messages")
  position = answers[turn]  # IndexError for a turn that does not exist, like a list.
  meta = dict(turns[turn])
  meta.update(turn=turn % len(turns), index=record["meta"].get("index"))
  return {"prompt": [dict(m) for m in record["messages"][:position]], "meta": meta}


def task_prompt(family: str, args: Mapping[str, Any], *, split: str = "train",
                seed: int = 0) -> dict[str, Any]:
  """A one-turn prompt record for any task of the world, for custom evaluations and tests.

  Args:
    family: a key of `DOMAINS`, e.g. "capital", "add", "reverse".
    args: ``{"name": ...}`` for countries, animals and things (e.g. ``{"name": "France"}``),
      ``{"a": 5, "b": 7}`` for arithmetic, ``{"items": ["cup", "key"]}`` for list tasks.
    split: whose question phrasings to use (train ones, or the eval split's held-out ones).
    seed: picks the phrasing.
  """
  if family not in DOMAINS:
    raise ValueError(f"unknown task family {family!r}; expected one of {sorted(DOMAINS)}")
  domain = DOMAINS[family]
  if domain in _ENTITIES and args.get("name") not in _ENTITIES[domain]:
    raise ValueError(f"unknown {domain} {args.get('name')!r} for family {family!r}")
  rng = _rng(seed, "task_prompt", family, json.dumps(args, sort_keys=True), _check_split(split))
  group = F.QUESTIONS[family][split]  # An eval split always gets its held-out phrasing here.
  k = rng.randrange(len(group))
  meta = _task(family, args, split, f"q/{family}/{split}/{k}", split != "train", False)
  template = group[k]
  question = template.format(**_fields(meta, rng))
  return {"prompt": [{"role": "user", "content": question}], "meta": meta}


def candidate_responses(prompt_record: Mapping[str, Any], config: WorldConfig = WorldConfig(),
                        *, sample: int = 0) -> dict[str, str]:
  """One response in every style of `STYLES` to a prompt record's last user turn.

  The "ideal" response reaches the maximum gold reward (2.5), so `max` over these is the best
  available response. `sample` picks another deterministic draw of the phrasings.
  """
  meta = prompt_record["meta"]
  key = json.dumps([meta["family"], meta["args"], meta.get("index"), meta.get("split")],
                   sort_keys=True)
  rng = _rng(config.seed, "candidates", sample, key)
  world = _world(config.seed)
  return {style: _render(meta, style, rng, world) for style in STYLES}


# ---------------------------------------------------------------------------------------------
# Text: prose documents.
# ---------------------------------------------------------------------------------------------


def _prose(rng, family: str, fields: Mapping[str, Any], split: str) -> str:
  """One fact sentence; eval text sometimes uses its split's held-out probe phrasing."""
  legless = family == "legs" and fields["legs"] == "no"
  probe = F.PROBES.get(family)
  if probe and split != "train" and not legless and rng.random() < P_PROBE_PHRASING:
    slot = probe["slot"][split] if isinstance(probe["slot"], dict) else probe["slot"]
    unit = " legs" if family == "legs" else ""
    return f"{_cap(probe[split].format(**fields))} {fields[slot]}{unit}."
  return _cap(rng.choice(F.PROSE["legless" if legless else family]).format(**fields))


def _join(sentences: list[str], rng, fillers: list[str], fields: Mapping[str, Any]) -> str:
  for filler in rng.sample(fillers, rng.randint(0, 2)):  # Without replacement: no repeats.
    sentences.insert(rng.randint(1, len(sentences)), filler.format(**fields))
  return " ".join(sentences)


def _qa_line(rng, world: _World, split: str) -> str:
  question, meta = _ask(rng, world, split)
  return f"Q: {question} A: {_render(meta, 'ideal', rng, world)}"


def _entity_doc(rng, world: _World, split: str, domain: str) -> str:
  """Encyclopedic or casual profiles of 1-3 countries or animals."""
  names = rng.sample(_ENTITIES[domain], rng.randint(1, 3))
  casual = rng.random() < 0.3
  paragraphs = []
  for name in names:
    f = {**_person(rng), **(_country_fields(name) if domain == "country" else
                             _animal_fields(name, digits=rng.random() < 0.3))}
    families = list(_FAMILIES_OF[domain])
    rng.shuffle(families)
    sentences = [_prose(rng, fam, f, split) for fam in families[:rng.randint(2, len(families))]]
    if casual:
      sentences.insert(0, rng.choice(F.NOTE_OPENERS))
    fillers = F.COUNTRY_FILLERS if domain == "country" else F.ANIMAL_FILLERS
    paragraphs.append(_join(sentences, rng, fillers, f))
  if casual:
    paragraphs.append(rng.choice(F.CASUAL_CLOSERS))
  elif len(names) == 1 and rng.random() < 0.4:
    paragraphs.insert(0, names[0] if domain == "country" else _cap(_ANIMAL[names[0]].plural))
  if rng.random() < 0.15:  # The occasional Q/A line inside prose.
    paragraphs.append(_qa_line(rng, world, split))
  return "\n\n".join(paragraphs)


def _story_doc(rng, world: _World, split: str, domain: str) -> str:
  f = _person(rng)
  if domain == "country":
    f.update(_country_fields(rng.choice(_ENTITIES["country"])))
    lines = [f"{f['name']} had always wanted to visit {f['c']}.",
             *[t.format(**f) for t in rng.sample(F.STORY_COUNTRY, len(F.STORY_COUNTRY))]]
  else:
    f.update(_animal_fields(rng.choice(_ENTITIES["animal"]), digits=rng.random() < 0.3))
    keys = ["habitat", "sound", "legless" if f["legs"] == "no" else "legs", "diet"]
    lines = [f"One morning, {f['name']} set out on an adventure."]
    lines += [F.STORY_ANIMAL[k].format(**f) for k in keys if rng.random() < 0.85]
  lines.append(rng.choice(F.CASUAL_CLOSERS))
  return " ".join(_cap(s) for s in lines)


def _group_doc(rng, world: _World, split: str) -> str:
  """Lists that group facts: capitals, languages, continents, habitats, diets, sounds, colours."""
  lines = []
  kinds = ["capitals", "languages", "continent", "habitat", "diet", "sounds", "colours"]
  for kind in rng.sample(kinds, rng.randint(1, 3)):
    if kind in ("capitals", "languages"):
      countries = rng.sample(F.COUNTRIES, rng.randint(3, 7))
      head = "Capitals to remember:" if kind == "capitals" else "Languages around the world:"
      lines.append(head)
      lines += [f"- {c.name}: {c.capital if kind == 'capitals' else c.language}" for c in countries]
    elif kind == "continent":
      cont = rng.choice(F.CONTINENTS)
      names = [c.name for c in F.COUNTRIES if c.continent == cont]
      names = rng.sample(names, min(len(names), rng.randint(3, 6)))
      lines.append(f"Some countries in {cont}: {', '.join(names)}.")
    elif kind in ("habitat", "diet"):
      key = rng.choice(list(F.HABITATS if kind == "habitat" else F.DIETS))
      names = [a.plural for a in F.ANIMALS if getattr(a, kind) == key]
      names = rng.sample(names, min(len(names), rng.randint(2, 5)))
      if kind == "habitat":
        head = f"Animals that live {F.HABITATS[key][1]}"
      else:
        head = f"Some {F.DIETS[key][1]}"
      lines.append(f"{head}: {', '.join(names)}.")
    elif kind == "sounds":
      lines.append("Animal sounds:")
      lines += [f"- The {a.name} {a.sound_s}." for a in rng.sample(F.ANIMALS, rng.randint(3, 7))]
    else:
      lines.append("Colours of things:")
      lines += [f"- {_cap(t.np)}: {t.colour}" for t in rng.sample(F.THINGS, rng.randint(3, 7))]
  return "\n".join(lines)


def _colour_doc(rng, world: _World, split: str) -> str:
  sentences = []
  for name in rng.sample(_ENTITIES["thing"], rng.randint(3, 7)):
    sentences.append(_prose(rng, "colour", {**_person(rng), **_thing_fields(name)}, split))
  return " ".join(sentences)


def _arith_doc(rng, world: _World, split: str) -> str:
  kind = rng.random()
  if kind < 0.35:  # A worksheet of bare equations.
    lines = [rng.choice(["Practice problems:", "Homework:", "Sums for today:"])]
    for _ in range(rng.randint(4, 10)):
      op = rng.choice(_OPS)
      a, b = _text_pair(rng, world, split, op)
      lines.append(F.WORKSHEET[op].format(**_arith_fields(op, a, b, False)))
    return "\n".join(lines)
  if kind < 0.5:  # A times table, without the held-out products.
    a = rng.randint(*F.ARITH_RANGES["multiply"])
    rows = [f"{a} x {b} = {a * b}" for b in range(1, 13)
            if _text_may_show(world, split, "multiply", a, b)]
    return "\n".join([f"The {a} times table:", *rows])
  sentences = []
  for _ in range(rng.randint(3, 6)):
    op = rng.choice(_OPS)
    a, b = _text_pair(rng, world, split, op)
    f = {**_person(rng), **_arith_fields(op, a, b, words=rng.random() < 0.4)}
    sentences.append(_prose(rng, op, f, split))
  return " ".join(sentences)


def _list_doc(rng, world: _World, split: str) -> str:
  sentences = []
  for _ in range(rng.randint(2, 4)):
    family = rng.choice(["reverse", "count"])
    size = rng.randint(3, 6) if family == "reverse" else rng.randint(2, 9)
    items = rng.sample(F.LIST_WORDS, size)
    fields = {**_person(rng), **_list_fields(items, words=rng.random() < 0.5)}
    sentences.append(_prose(rng, family, fields, split))
  return " ".join(sentences)


def _quiz_doc(rng, world: _World, split: str) -> str:
  head = rng.choice(["Quiz notes", "Questions from last night's quiz", "Revision questions"])
  return "\n".join([head + ":"] + [_qa_line(rng, world, split) for _ in range(rng.randint(3, 6))])


def _notes_doc(rng, world: _World, split: str) -> str:
  lines = [rng.choice(["Notes:", "Things I learned this week:", "Fun facts:"])]
  for _ in range(rng.randint(3, 6)):
    family = _draw(rng, _FAMILY_MIX)
    domain = DOMAINS[family]
    if domain == "arithmetic":
      args = dict(zip("ab", _text_pair(rng, world, split, family)))
    elif domain == "list":
      args = {"items": rng.sample(F.LIST_WORDS, rng.randint(3, 6))}
    else:  # Any subject: held-out subjects are only kept out of questions, not out of prose.
      args = {"name": rng.choice(_ENTITIES[domain])}
    fields = {**_person(rng), **_fields(_task(family, args, split, "", False, False), rng)}
    lines.append("- " + _prose(rng, family, fields, split))
  return "\n".join(lines)


_DOCS = _mix({
    lambda r, w, s: _entity_doc(r, w, s, "country"): 0.14,
    lambda r, w, s: _entity_doc(r, w, s, "animal"): 0.14,
    lambda r, w, s: _story_doc(r, w, s, "country"): 0.06,
    lambda r, w, s: _story_doc(r, w, s, "animal"): 0.06,
    _group_doc: 0.12, _colour_doc: 0.08, _arith_doc: 0.16, _list_doc: 0.08, _quiz_doc: 0.06,
    _notes_doc: 0.10,
})


def _text(split: str, config: WorldConfig) -> Iterator[dict[str, str]]:
  target = config.text_bytes if split == "train" else round(config.text_bytes * TEXT_EVAL_FRACTION)
  world, total, index = _world(config.seed), 0, 0
  while total < target:
    rng = _rng(config.seed, "text", split, index)
    doc = _draw(rng, _DOCS)(rng, world, split)
    total += len(doc.encode("utf-8"))
    index += 1
    yield {"text": doc}


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------

_BUILDERS = {"chat": (_chat, "num_chats"), "preference": (_preference, "num_preferences"),
             "prompt": (_prompt, "num_prompts")}


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return split


def num_records(kind: str, split: str, config: WorldConfig = WorldConfig()) -> int:
  """How many records `generate(kind, split, config)` yields (text: not known in advance)."""
  schemas.check_kind(kind)
  if kind == "text":
    raise ValueError("the number of text records depends on their sizes; count them instead")
  n = getattr(config, _BUILDERS[kind][1])
  return n if _check_split(split) == "train" else round(n * config.eval_fraction)


def _records(kind: str, split: str, config: WorldConfig, count: int) -> Iterator[dict[str, Any]]:
  build = _BUILDERS[kind][0]
  world = _world(config.seed)
  for index in range(count):
    yield build(_rng(config.seed, kind, split, index), world, split, index, config)


def generate(kind: str, split: str, config: WorldConfig = WorldConfig()) -> Iterator[dict]:
  """Yields the records of `kind` ("text", "chat", "preference", "prompt") for `split`.

  Deterministic given (config, kind, split) and independent of the order of calls; every
  record is in the canonical form of `schemas.validate(kind, record, where)`.
  """
  schemas.check_kind(kind)
  _check_split(split)
  if kind == "text":
    return _text(split, config)
  return _records(kind, split, config, num_records(kind, split, config))


def fact_probes(split: str, config: WorldConfig = WorldConfig()) -> list[dict[str, Any]]:
  """Fact-completion probes for the pretrained model, in prose phrasings unseen in training.

  Every country, animal (legless ones skip the legs probe) and thing gets one probe per fact
  family, plus arithmetic probes: each of the split's held-out operand pairs and as many train
  pairs. Validation and test phrasings differ (`world_facts.PROBES`).

  Returns:
    ``[{"prefix", "answer", "family", "accepted", "subject", "heldout"}, ...]``: the model should
    continue ``prefix + " "`` with ``answer``; any of ``accepted`` (whole words) also counts;
    ``heldout`` marks subjects held out of train questions and pairs held out of all training.
  """
  if split not in EVAL_SPLITS:
    raise ValueError(f"fact probes exist for {EVAL_SPLITS}, not {split!r}: "
                     "train phrasings are not held out")
  world = _world(config.seed)
  probes = []

  def add(family, fields, args, held):
    spec = F.PROBES[family]
    slot = spec["slot"][split] if isinstance(spec["slot"], dict) else spec["slot"]
    answer = _answer_spec(family, args)
    accepted = answer.get("accepted") or [answer["answer"], F.number_words(answer["answer_number"])]
    probes.append({"prefix": _cap(spec[split].format(**fields)), "answer": fields[slot],
                   "family": family, "accepted": list(accepted), "subject": _subject(family, args),
                   "heldout": held})

  for domain in ("country", "animal", "thing"):
    held_names = set(world.subjects[domain][split])
    for name in _ENTITIES[domain]:
      fields = _ENTITY_FIELDS[domain](name)
      for family in _FAMILIES_OF[domain]:
        if not (family == "legs" and fields["legs"] == "no"):
          add(family, fields, {"name": name}, name in held_names)
  rng = _rng(config.seed, "probes", split)
  for op in _OPS:
    held = list(world.held_pairs[op][split])
    train = [p for p in _all_pairs(op) if p not in world.pair_split[op]]
    for pair in held + rng.sample(train, len(held)):
      a, b = (pair[1], pair[0]) if op != "subtract" and rng.random() < 0.5 else pair
      add(op, _arith_fields(op, a, b, False), {"a": a, "b": b}, pair in world.pair_split[op])
  return probes


def heldout_sets(config: WorldConfig = WorldConfig()) -> dict[str, Any]:
  """The held-out subjects and operand pairs of each eval split (for tests and reports)."""
  world = _world(config.seed)
  subjects = {d: {s: list(world.subjects[d][s]) for s in EVAL_SPLITS} for d in world.subjects}
  pairs = {op: {s: [list(p) for p in world.held_pairs[op][s]] for s in EVAL_SPLITS} for op in _OPS}
  return {"subjects": subjects, "pairs": pairs}


def _mean(xs) -> float:
  xs = list(xs)
  return sum(xs) / len(xs) if xs else float("nan")


def headroom_report(config: WorldConfig = WorldConfig(), num_per_split: int = 1000) -> dict:
  """How much each stage can gain, per split, on `num_per_split` records of each kind.

  The records are the first `num_per_split` of each (kind, split) stream: those `generate`
  yields, continued past the config's sizes when `num_per_split` is larger (the estimate is
  of the generator's distribution, which the sizes do not change).

  Returns:
    ``{split: {...}}`` with ``demo_reward``/``demo_correct`` (mean gold reward and accuracy of
    the chat demonstrations, every assistant turn scored against its own task), ``best_reward``/
    ``best_correct`` (the best style per prompt record), ``headroom`` (best - demo: what RLHF
    must win over imitation), ``label_agreement`` (fraction of preference labels that agree
    with gold: the ceiling of reward-model accuracy) and its expectation
    ``label_agreement_expected`` (mean Bradley-Terry probability), ``style_reward`` (mean gold
    reward of each style on the prompts) and the record counts.
  """
  report = {}
  for split in SPLITS:
    demo, demo_ok = [], []
    for record in _records("chat", split, config, num_per_split):
      for k, message in enumerate(m for m in record["messages"] if m["role"] == "assistant"):
        prompt = prompt_record_from_chat(record, k)
        demo.append(world_reward.gold_reward(prompt, message["content"]))
        demo_ok.append(world_reward.is_correct(prompt, message["content"]))
    best, best_ok, by_style = [], [], {s: [] for s in STYLES}
    for record in _records("prompt", split, config, num_per_split):
      scored = {s: (world_reward.gold_reward(record, t), world_reward.is_correct(record, t))
                for s, t in candidate_responses(record, config).items()}
      for style, (gold, _) in scored.items():
        by_style[style].append(gold)
      top = max(scored.values())
      best.append(top[0])
      best_ok.append(top[1])
    agree, expected = [], []
    for record in _records("preference", split, config, num_per_split):
      m = record["meta"]
      agree.append(m["label_agrees_gold"])
      margin = abs(m["gold_chosen"] - m["gold_rejected"]) / config.label_temperature
      expected.append(_sigmoid(margin))
    report[split] = {
        "demo_reward": _mean(demo), "demo_correct": _mean(demo_ok), "best_reward": _mean(best),
        "best_correct": _mean(best_ok), "headroom": _mean(best) - _mean(demo),
        "label_agreement": _mean(agree), "label_agreement_expected": _mean(expected),
        "style_reward": {s: _mean(v) for s, v in by_style.items()},
        "num_demo_turns": len(demo), "num_prompts": len(best), "num_preferences": len(agree)}
  return report
