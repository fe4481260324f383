"""Tasks of the synthetic world: template slots, what is asked, and answers in every style.

A *task* is one question with everything `jaxlm.data.world_reward` needs to judge a reply to it
(the task meta described in `jaxlm.data.world`). This module fills the slots of the templates
of `jaxlm.data.world_facts` for a subject, builds task metas, samples fresh questions and
follow-ups within the held-out rules of `jaxlm.data.world_core`, and renders a response to a
task in each of `STYLES`. Chats, prompts and preference pairs (`world_chat`) and the prose of
the text split (`world_text`) are both built from these pieces.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from jaxlm.data import world_core as C
from jaxlm.data import world_facts as F

STYLES = ("ideal", "friendly", "verbose", "terse", "hedge", "rude", "mistake", "unsure")
_OP_SYMBOL = {"add": "+", "subtract": "-", "multiply": "x"}


# ---------------------------------------------------------------------------------------------
# Template slots.
# ---------------------------------------------------------------------------------------------


def cap(s: str) -> str:
  """`s` with its first character in upper case (the rest untouched, unlike str.capitalize)."""
  return s[:1].upper() + s[1:]


def num(n: int, words: bool) -> str:
  """`n` as English words or as digits."""
  return F.number_words(n) if words else str(n)


def country_fields(name: str) -> dict[str, str]:
  """The template slots of a country (see `world_facts`)."""
  c = C.COUNTRY[name]
  return {"c": c.name, "cap": c.capital, "cont": c.continent, "lang": c.language, "x": c.name}


def animal_fields(name: str, digits: bool = False) -> dict[str, str]:
  """The template slots of an animal; its leg count in digits or (by default) words."""
  a = C.ANIMAL[name]
  habitat_np, loc, _ = F.HABITATS[a.habitat]
  a_diet, diets, gloss, _ = F.DIETS[a.diet]
  a_animal = f"{a.article} {a.name}"
  legs = "no" if a.legs == 0 else num(a.legs, not digits)
  return {"animal": a.name, "Animal": cap(a.name), "animals": a.plural, "Animals": cap(a.plural),
          "a_animal": a_animal, "A_animal": cap(a_animal), "the_animal": f"the {a.name}",
          "sound": a.sound, "sound_s": a.sound_s, "sound_ing": a.sound_ing, "legs": legs,
          "legs_terse": "none" if a.legs == 0 else legs, "loc": loc, "Loc": cap(loc),
          "habitat_np": habitat_np, "habitat": a.habitat, "diet": a.diet, "a_diet": a_diet,
          "diets": diets, "gloss": gloss, "x": a_animal}


def thing_fields(name: str) -> dict[str, str]:
  """The template slots of a coloured thing."""
  t = C.THING[name]
  return {"obj": t.name, "np": t.np, "NP": cap(t.np), "colour": t.colour, "x": t.np}


ENTITY_FIELDS = {"country": country_fields, "animal": animal_fields, "thing": thing_fields}


def arith_fields(op: str, a: int, b: int, words: bool) -> dict[str, Any]:
  """The slots of a op b: operands and result as words or digits (``_words`` remembers which)."""
  c = {"add": a + b, "subtract": a - b, "multiply": a * b}[op]
  fa, fb = num(a, words), num(b, words)
  return {"a": fa, "b": fb, "c": num(c, words), "x": f"{fa} {F.ARITH_WORD[op]} {fb}",
          "_words": words}


def list_fields(items: list[str], words: bool) -> dict[str, str]:
  """The slots of a list task: the items, reversed, and their count."""
  return {"items": ", ".join(items), "rev": ", ".join(reversed(items)),
          "n": num(len(items), words)}


def person(rng) -> dict[str, str]:
  """A random person of the prose: name, pronouns, and some things they could count."""
  name, pronoun = rng.choice(F.PEOPLE)
  subj, obj, poss = F.PRONOUNS[pronoun]
  return {"name": name, "subj": subj, "Subj": cap(subj), "obj_pron": obj, "poss": poss,
          "things": rng.choice(F.COUNTABLE_THINGS)}


def task_fields(meta: Mapping[str, Any], rng) -> dict[str, Any]:
  """The slots of a task, with a fresh choice of digits or words for the numbers in it."""
  args, domain = meta["args"], meta["domain"]
  if domain == "country":
    return country_fields(args["name"])
  if domain == "animal":
    return animal_fields(args["name"], digits=rng.random() < 0.3)
  if domain == "thing":
    return thing_fields(args["name"])
  if domain == "arithmetic":
    return arith_fields(meta["family"], args["a"], args["b"], words=rng.random() < 0.2)
  return list_fields(args["items"], words=rng.random() < 0.2)


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
  if C.DOMAINS[family] == "country":
    c = C.COUNTRY[name]
    return {"capital": c.capital, "continent": c.continent, "language": c.language}[family]
  if C.DOMAINS[family] == "animal":
    return getattr(C.ANIMAL[name], family)
  return C.THING[name].colour


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


def answer_spec(family: str, args: Mapping[str, Any]) -> dict[str, Any]:
  """What the gold reward matches for the task: ``match``, ``answer``, its data, ``budget``."""
  domain = C.DOMAINS[family]
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


def task_subject(family: str, args: Mapping[str, Any]) -> str:
  """The task's subject as text: a name, the list, or "a + b"."""
  if "name" in args:
    return args["name"]
  if "items" in args:
    return ", ".join(args["items"])
  return f"{args['a']} {_OP_SYMBOL[family]} {args['b']}"


def make_task(family, args, split, template, heldout_template, heldout_subject) -> dict[str, Any]:
  """The task meta of a question (the fields `jaxlm.data.world` documents)."""
  meta = {"family": family, "domain": C.DOMAINS[family], "subject": task_subject(family, args),
          "args": dict(args)}
  meta.update(answer_spec(family, args))
  meta.update(split=split, template=template, heldout_template=heldout_template,
              heldout_subject=heldout_subject)
  return meta


def _sample_args(rng, world: C.World, split: str, family: str, exclude=None) -> tuple[dict, bool]:
  domain = C.DOMAINS[family]
  if domain == "arithmetic":
    (a, b), held = C.pick_pair(rng, world, split, family, exclude)
    return {"a": a, "b": b}, held
  if domain == "list":
    n = rng.randint(3, 6) if family == "reverse" else rng.randint(2, 9)
    return {"items": rng.sample(F.LIST_WORDS, n)}, False
  name, held = C.pick_subject(rng, world, split, domain, exclude)
  return {"name": name}, held


def _pick_template(rng, split: str, table: Mapping[str, list[str]], prefix: str):
  """(template, its id, whether held out): an eval split's own template with `P_HELDOUT`."""
  held = split != "train" and rng.random() < C.P_HELDOUT
  group = split if held else "train"
  k = rng.randrange(len(table[group]))
  return table[group][k], f"{prefix}/{group}/{k}", held


def ask(rng, world: C.World, split: str, family: str | None = None) -> tuple[str, dict]:
  """A fresh question: (user text, task meta)."""
  family = family or C.draw(rng, C.FAMILY_MIX)
  template, template_id, held_template = _pick_template(
      rng, split, F.QUESTIONS[family], f"q/{family}")
  args, held_subject = _sample_args(rng, world, split, family)
  meta = make_task(family, args, split, template_id, held_template, held_subject)
  return template.format(**task_fields(meta, rng)), meta


def followup(rng, world: C.World, split: str, prev: Mapping[str, Any], asked: set):
  """The next user turn after a question about `prev`: same subject, same family, or new.

  `asked` holds the (family, subject) pairs of the conversation so far, so a pronoun follow-up
  never repeats a question.
  """
  domain, r = prev["domain"], rng.random()
  fresh = [f for f in C.FAMILIES_OF.get(domain, ()) if (f, prev["subject"]) not in asked]
  if domain in ("country", "animal") and r < 0.45 and fresh:
    family = rng.choice(fresh)
    k = rng.randrange(len(F.FOLLOWUP_SAME_SUBJECT[family]))
    meta = make_task(family, prev["args"], split, f"followup_same/{family}/{k}", False,
                 prev["heldout_subject"])
    return F.FOLLOWUP_SAME_SUBJECT[family][k], meta
  if domain != "list" and r < 0.8:
    family = prev["family"]
    old = prev["args"].get("name") or (prev["args"]["a"], prev["args"]["b"])
    args, held_subject = _sample_args(rng, world, split, family, exclude=old)
    template, template_id, held_template = _pick_template(
        rng, split, F.FOLLOWUP_OTHER_SUBJECT, "followup_other")
    meta = make_task(family, args, split, template_id, held_template, held_subject)
    return template.format(x=task_fields(meta, rng)["x"]), meta
  return ask(rng, world, split)


# ---------------------------------------------------------------------------------------------
# Responses in each style.
# ---------------------------------------------------------------------------------------------


def _core(rng, family: str, fields: Mapping[str, Any]) -> str:
  return cap(rng.choice(F.ANSWERS[family]).format(**fields))


def _lower_first(core: str, domain: str) -> str:
  # Country answers mostly start with a name ("France is ..."), which must keep its capital.
  if domain == "country" and core.split()[0] not in ("The", "People", "In"):
    return core
  return core[:1].lower() + core[1:]


def _wrong_fields(meta: Mapping[str, Any], fields: dict, rng, world: C.World) -> dict:
  """`fields` with the answer slots replaced by a plausible wrong answer (for "mistake")."""
  family, split, f = meta["family"], meta["split"], dict(fields)
  # Wrong answers come from subjects this split may name, so train records never mention a
  # held-out subject, not even as a mistake.
  def pool(domain):
    own = world.subjects[domain][split] if split != "train" else ()
    return world.subjects[domain]["train"] + own

  if family in ("capital", "language"):
    key = "cap" if family == "capital" else "lang"
    options = sorted({country_fields(n)[key] for n in pool("country")} - {f[key]})
    f[key] = rng.choice(options)
  elif family == "continent":
    f["cont"] = rng.choice([c for c in F.CONTINENTS if c != f["cont"]])
  elif family == "sound":
    other = rng.choice([n for n in pool("animal") if C.ANIMAL[n].sound != f["sound"]])
    f.update({k: animal_fields(other)[k] for k in ("sound", "sound_s", "sound_ing")})
  elif family == "legs":
    legs = rng.choice([n for n in F.LEG_FORMS if n != C.ANIMAL[meta["args"]["name"]].legs])
    f["legs"] = "no" if legs == 0 else num(legs, not f["legs"].isdigit())
  elif family == "habitat":
    habitat = rng.choice([h for h in F.HABITATS if h != f["habitat"]])
    f.update(habitat=habitat, habitat_np=F.HABITATS[habitat][0], loc=F.HABITATS[habitat][1])
  elif family == "diet":
    diet = rng.choice([d for d in F.DIETS if d != f["diet"]])
    f.update(diet=diet, a_diet=F.DIETS[diet][0], diets=F.DIETS[diet][1], gloss=F.DIETS[diet][2])
  elif family == "colour":
    f["colour"] = rng.choice(sorted({t.colour for t in F.THINGS} - {f["colour"]}))
  elif family in C.OPS or family == "count":
    right = meta["answer_number"]
    taken = set(meta["allowed_numbers"]) | {right}
    options = [right + d for d in (-2, -1, 1, 2, 10) if right + d >= 1 and right + d not in taken]
    f["c" if family in C.OPS else "n"] = num(rng.choice(options), f.get("_words", False))
  else:  # reverse: the original order, or the right answer with two neighbours swapped
    items = list(meta["args"]["items"]) if rng.random() < 0.5 else list(meta["target"])
    if items == meta["target"]:
      i = rng.randrange(len(items) - 1)
      items[i], items[i + 1] = items[i + 1], items[i]
    f["rev"] = ", ".join(items)
  return f


def render(meta: Mapping[str, Any], style: str, rng, world: C.World) -> str:
  """A response to the task `meta` in `style` (one of STYLES)."""
  family = meta["family"]
  fields = task_fields(meta, rng)
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
    return rng.choice([terse, terse + ".", cap(terse) + ".", cap(terse)])
  if style not in ("hedge", "rude"):
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
  template = rng.choice(F.HEDGE if style == "hedge" else F.RUDE)
  return template.format(core=core, core_lc=_lower_first(core, meta["domain"]), terse=terse)

