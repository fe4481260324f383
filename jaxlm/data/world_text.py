"""Pretraining prose of the synthetic world: the documents of the ``text`` split.

Documents without role markers (`_DOCS`): encyclopedic or casual profiles of 1-3 countries or
animals, travel and animal stories, grouped lists, colour descriptions, arithmetic (worksheets,
times tables, word problems), list puzzles, quiz notes of ``Q: ... A: ...`` lines, fun-fact
notes, and (from `world_text_dialogue`, about 15% of the bytes) prose that quotes questions and
answers in the chat styles. Train text never shows an operand pair held out for evaluation, a
held-out question phrasing nor a probe phrasing; eval text may show its own split's (see
`jaxlm.data.world`). Re-exported by `jaxlm.data.world` through `generate("text", ...)`.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from jaxlm.data import world_core as C
from jaxlm.data import world_facts as F
from jaxlm.data import world_tasks as T
from jaxlm.data import world_text_dialogue

TEXT_EVAL_FRACTION = 0.05  # validation and test text, each relative to config.text_bytes
P_PROBE_PHRASING = 0.2  # in eval text: chance a fact sentence uses its split's probe phrasing


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
    return f"{T.cap(probe[split].format(**fields))} {fields[slot]}{unit}."
  return T.cap(rng.choice(F.PROSE["legless" if legless else family]).format(**fields))


def _join(sentences: list[str], rng, fillers: list[str], fields: Mapping[str, Any]) -> str:
  for filler in rng.sample(fillers, rng.randint(0, 2)):  # Without replacement: no repeats.
    sentences.insert(rng.randint(1, len(sentences)), filler.format(**fields))
  return " ".join(sentences)


def _qa_line(rng, world: C.World, split: str) -> str:
  question, meta = T.ask(rng, world, split)
  return f"Q: {question} A: {T.render(meta, 'ideal', rng, world)}"


def _entity_doc(rng, world: C.World, split: str, domain: str) -> str:
  """Encyclopedic or casual profiles of 1-3 countries or animals."""
  names = rng.sample(C.ENTITIES[domain], rng.randint(1, 3))
  casual = rng.random() < 0.3
  paragraphs = []
  for name in names:
    f = {**T.person(rng), **(T.country_fields(name) if domain == "country" else
                             T.animal_fields(name, digits=rng.random() < 0.3))}
    families = list(C.FAMILIES_OF[domain])
    rng.shuffle(families)
    sentences = [_prose(rng, fam, f, split) for fam in families[:rng.randint(2, len(families))]]
    if casual:
      sentences.insert(0, rng.choice(F.NOTE_OPENERS))
    fillers = F.COUNTRY_FILLERS if domain == "country" else F.ANIMAL_FILLERS
    paragraphs.append(_join(sentences, rng, fillers, f))
  if casual:
    paragraphs.append(rng.choice(F.CASUAL_CLOSERS))
  elif len(names) == 1 and rng.random() < 0.4:
    paragraphs.insert(0, names[0] if domain == "country" else T.cap(C.ANIMAL[names[0]].plural))
  if rng.random() < 0.15:  # The occasional Q/A line inside prose.
    paragraphs.append(_qa_line(rng, world, split))
  return "\n\n".join(paragraphs)


def _story_doc(rng, world: C.World, split: str, domain: str) -> str:
  f = T.person(rng)
  if domain == "country":
    f.update(T.country_fields(rng.choice(C.ENTITIES["country"])))
    lines = [f"{f['name']} had always wanted to visit {f['c']}.",
             *[t.format(**f) for t in rng.sample(F.STORY_COUNTRY, len(F.STORY_COUNTRY))]]
  else:
    f.update(T.animal_fields(rng.choice(C.ENTITIES["animal"]), digits=rng.random() < 0.3))
    keys = ["habitat", "sound", "legless" if f["legs"] == "no" else "legs", "diet"]
    lines = [f"One morning, {f['name']} set out on an adventure."]
    lines += [F.STORY_ANIMAL[k].format(**f) for k in keys if rng.random() < 0.85]
  lines.append(rng.choice(F.CASUAL_CLOSERS))
  return " ".join(T.cap(s) for s in lines)


def _group_doc(rng, world: C.World, split: str) -> str:
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
      lines += [f"- {T.cap(t.np)}: {t.colour}" for t in rng.sample(F.THINGS, rng.randint(3, 7))]
  return "\n".join(lines)


def _colour_doc(rng, world: C.World, split: str) -> str:
  sentences = []
  for name in rng.sample(C.ENTITIES["thing"], rng.randint(3, 7)):
    sentences.append(_prose(rng, "colour", {**T.person(rng), **T.thing_fields(name)}, split))
  return " ".join(sentences)


def _arith_doc(rng, world: C.World, split: str) -> str:
  kind = rng.random()
  if kind < 0.35:  # A worksheet of bare equations.
    lines = [rng.choice(["Practice problems:", "Homework:", "Sums for today:"])]
    for _ in range(rng.randint(4, 10)):
      op = rng.choice(C.OPS)
      a, b = C.text_pair(rng, world, split, op)
      lines.append(F.WORKSHEET[op].format(**T.arith_fields(op, a, b, False)))
    return "\n".join(lines)
  if kind < 0.5:  # A times table, without the held-out products.
    a = rng.randint(*F.ARITH_RANGES["multiply"])
    rows = [f"{a} x {b} = {a * b}" for b in range(1, 13)
            if C.text_may_show(world, split, "multiply", a, b)]
    return "\n".join([f"The {a} times table:", *rows])
  sentences = []
  for _ in range(rng.randint(3, 6)):
    op = rng.choice(C.OPS)
    a, b = C.text_pair(rng, world, split, op)
    f = {**T.person(rng), **T.arith_fields(op, a, b, words=rng.random() < 0.4)}
    sentences.append(_prose(rng, op, f, split))
  return " ".join(sentences)


def _list_doc(rng, world: C.World, split: str) -> str:
  sentences = []
  for _ in range(rng.randint(2, 4)):
    family = rng.choice(["reverse", "count"])
    size = rng.randint(3, 6) if family == "reverse" else rng.randint(2, 9)
    items = rng.sample(F.LIST_WORDS, size)
    fields = {**T.person(rng), **T.list_fields(items, words=rng.random() < 0.5)}
    sentences.append(_prose(rng, family, fields, split))
  return " ".join(sentences)


def _quiz_doc(rng, world: C.World, split: str) -> str:
  head = rng.choice(["Quiz notes", "Questions from last night's quiz", "Revision questions"])
  return "\n".join([head + ":"] + [_qa_line(rng, world, split) for _ in range(rng.randint(3, 6))])


def _notes_doc(rng, world: C.World, split: str) -> str:
  lines = [rng.choice(["Notes:", "Things I learned this week:", "Fun facts:"])]
  for _ in range(rng.randint(3, 6)):
    family = C.draw(rng, C.FAMILY_MIX)
    domain = C.DOMAINS[family]
    if domain == "arithmetic":
      args = dict(zip("ab", C.text_pair(rng, world, split, family)))
    elif domain == "list":
      args = {"items": rng.sample(F.LIST_WORDS, rng.randint(3, 6))}
    else:  # Any subject: held-out subjects are only kept out of questions, not out of prose.
      args = {"name": rng.choice(C.ENTITIES[domain])}
    meta = T.make_task(family, args, split, "", False, False)
    fields = {**T.person(rng), **T.task_fields(meta, rng)}
    lines.append("- " + _prose(rng, family, fields, split))
  return "\n".join(lines)


_DOCS = C.make_mix({
    lambda r, w, s: _entity_doc(r, w, s, "country"): 0.14,
    lambda r, w, s: _entity_doc(r, w, s, "animal"): 0.14,
    lambda r, w, s: _story_doc(r, w, s, "country"): 0.06,
    lambda r, w, s: _story_doc(r, w, s, "animal"): 0.06,
    _group_doc: 0.12, _colour_doc: 0.08, _arith_doc: 0.16, _list_doc: 0.08, _quiz_doc: 0.06,
    _notes_doc: 0.10,
    **world_text_dialogue.DOC_WEIGHTS,
})


def generate_text(split: str, config: C.WorldConfig) -> Iterator[dict[str, str]]:
  """The text documents of `split`, until they reach the size the config asks for."""
  target = config.text_bytes if split == "train" else round(config.text_bytes * TEXT_EVAL_FRACTION)
  world, total, index = C.seeded_world(config.seed), 0, 0
  while total < target:
    rng = C.rng_for(config.seed, "text", split, index)
    doc = C.draw(rng, _DOCS)(rng, world, split)
    total += len(doc.encode("utf-8"))
    index += 1
    yield {"text": doc}
