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
  sometimes end with a Q/A line. About 15% of it is dialogue in prose (stories with quoted
  speech, forum threads, letters, tutoring tips) that quotes questions and answers in every
  response style but "mistake", so the text holds all the vocabulary of the later stages
  ("Good question!", "Let me think about this for a moment.", system prompts) without any
  chat template. A document runs from a few sentences to a few paragraphs.
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

Modules (this one is the public API; import the world from here):

* `world_core`: `WorldConfig`, the version and splits, seeded RNG streams, the held-out sets.
* `world_tasks`: template slots, task metas, questions and follow-ups, responses in each style.
* `world_chat`: chat, prompt and preference records; `prompt_record_from_chat`, `task_prompt`,
  `candidate_responses`.
* `world_text`: the prose documents of the text split; `world_text_dialogue`: those with
  quoted dialogue.
* `world_headroom`: `headroom_report`.
* `world_facts` (the tables and phrasings) and `world_reward` (the gold reward): data and judge.
"""

from __future__ import annotations

from typing import Any, Iterator

from jaxlm.data import schemas
from jaxlm.data import world_chat
from jaxlm.data import world_core as C
from jaxlm.data import world_facts as F
from jaxlm.data import world_headroom
from jaxlm.data import world_tasks as T
from jaxlm.data import world_text

# The public API. Defined in the module of its concern and re-exported here, so that callers
# depend on `jaxlm.data.world` only and the modules behind it can move.
WORLD_VERSION = C.WORLD_VERSION
SPLITS = C.SPLITS
EVAL_SPLITS = C.EVAL_SPLITS
WorldConfig = C.WorldConfig
HOLDOUT_SUBJECT_FRACTION = C.HOLDOUT_SUBJECT_FRACTION
HOLDOUT_PAIR_FRACTION = C.HOLDOUT_PAIR_FRACTION
P_HELDOUT = C.P_HELDOUT
DOMAINS = C.DOMAINS
FAMILY_WEIGHTS = C.FAMILY_WEIGHTS
STYLES = T.STYLES
DEMO_STYLE_MIX = world_chat.DEMO_STYLE_MIX
PREFERENCE_STYLE_MIX = world_chat.PREFERENCE_STYLE_MIX
TEXT_EVAL_FRACTION = world_text.TEXT_EVAL_FRACTION
P_PROBE_PHRASING = world_text.P_PROBE_PHRASING
prompt_record_from_chat = world_chat.prompt_record_from_chat
task_prompt = world_chat.task_prompt
candidate_responses = world_chat.candidate_responses
headroom_report = world_headroom.headroom_report

__all__ = [
    "WORLD_VERSION", "SPLITS", "EVAL_SPLITS", "WorldConfig", "HOLDOUT_SUBJECT_FRACTION",
    "HOLDOUT_PAIR_FRACTION", "P_HELDOUT", "DOMAINS", "FAMILY_WEIGHTS", "STYLES",
    "DEMO_STYLE_MIX", "PREFERENCE_STYLE_MIX", "TEXT_EVAL_FRACTION", "P_PROBE_PHRASING",
    "generate", "num_records", "fact_probes", "heldout_sets", "prompt_record_from_chat",
    "task_prompt", "candidate_responses", "headroom_report",
]


def num_records(kind: str, split: str, config: WorldConfig = WorldConfig()) -> int:
  """How many records `generate(kind, split, config)` yields (text: not known in advance)."""
  schemas.check_kind(kind)
  if kind == "text":
    raise ValueError("the number of text records depends on their sizes; count them instead")
  n = getattr(config, world_chat.SIZE_FIELDS[kind])
  return n if C.check_split(split) == "train" else round(n * config.eval_fraction)


def generate(kind: str, split: str, config: WorldConfig = WorldConfig()) -> Iterator[dict]:
  """Yields the records of `kind` ("text", "chat", "preference", "prompt") for `split`.

  Deterministic given (config, kind, split) and independent of the order of calls; every
  record is in the canonical form of `schemas.validate(kind, record, where)`.
  """
  schemas.check_kind(kind)
  C.check_split(split)
  if kind == "text":
    return world_text.generate_text(split, config)
  return world_chat.records(kind, split, config, num_records(kind, split, config))


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
  world = C.seeded_world(config.seed)
  probes = []

  def add(family, fields, args, held):
    spec = F.PROBES[family]
    slot = spec["slot"][split] if isinstance(spec["slot"], dict) else spec["slot"]
    answer = T.answer_spec(family, args)
    accepted = answer.get("accepted") or [answer["answer"], F.number_words(answer["answer_number"])]
    probes.append({"prefix": T.cap(spec[split].format(**fields)), "answer": fields[slot],
                   "family": family, "accepted": list(accepted),
                   "subject": T.task_subject(family, args), "heldout": held})

  for domain in ("country", "animal", "thing"):
    held_names = set(world.subjects[domain][split])
    for name in C.ENTITIES[domain]:
      fields = T.ENTITY_FIELDS[domain](name)
      for family in C.FAMILIES_OF[domain]:
        if not (family == "legs" and fields["legs"] == "no"):
          add(family, fields, {"name": name}, name in held_names)
  rng = C.rng_for(config.seed, "probes", split)
  for op in C.OPS:
    held = list(world.held_pairs[op][split])
    train = [p for p in C.all_pairs(op) if p not in world.pair_split[op]]
    for pair in held + rng.sample(train, len(held)):
      a, b = (pair[1], pair[0]) if op != "subtract" and rng.random() < 0.5 else pair
      add(op, T.arith_fields(op, a, b, False), {"a": a, "b": b}, pair in world.pair_split[op])
  return probes


def heldout_sets(config: WorldConfig = WorldConfig()) -> dict[str, Any]:
  """The held-out subjects and operand pairs of each eval split (for tests and reports)."""
  world = C.seeded_world(config.seed)
  subjects = {d: {s: list(world.subjects[d][s]) for s in EVAL_SPLITS} for d in world.subjects}
  pairs = {op: {s: [list(p) for p in world.held_pairs[op][s]] for s in EVAL_SPLITS}
           for op in C.OPS}
  return {"subjects": subjects, "pairs": pairs}

