"""The core of the synthetic world: version, config, seeded randomness and the held-out sets.

Everything every generator of `jaxlm.data.world` shares lives here: the `WorldConfig`, the
per-record RNG streams that make generation deterministic and order-free, the entity tables
keyed by name, and the seeded structure of what evaluation holds out (`seeded_world`) with the
rules that pick subjects and operand pairs respecting it. The public API is re-exported by
`jaxlm.data.world`; import it from there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from typing import Any, Mapping

from jaxlm.data import world_facts as F

WORLD_VERSION = "1.1.0"
SPLITS = ("train", "validation", "test")
EVAL_SPLITS = SPLITS[1:]

HOLDOUT_SUBJECT_FRACTION = 0.12  # of each entity table, per eval split
HOLDOUT_PAIR_FRACTION = 0.05  # of each operation's operand pairs, per eval split
P_HELDOUT = 0.5  # in eval splits: chance a question uses a held-out template / subject / pair

DOMAINS = {"capital": "country", "continent": "country", "language": "country",
           "sound": "animal", "legs": "animal", "habitat": "animal", "diet": "animal",
           "colour": "thing", "add": "arithmetic", "subtract": "arithmetic",
           "multiply": "arithmetic", "reverse": "list", "count": "list"}
FAMILY_WEIGHTS = {"capital": 0.10, "continent": 0.07, "language": 0.07, "sound": 0.07, "legs": 0.07,
                  "habitat": 0.06, "diet": 0.06, "colour": 0.08, "add": 0.10, "subtract": 0.08,
                  "multiply": 0.08, "reverse": 0.08, "count": 0.08}

COUNTRY = {c.name: c for c in F.COUNTRIES}
ANIMAL = {a.name: a for a in F.ANIMALS}
THING = {t.name: t for t in F.THINGS}
ENTITIES = {"country": tuple(COUNTRY), "animal": tuple(ANIMAL), "thing": tuple(THING)}
FAMILIES_OF = {d: tuple(f for f, dd in DOMAINS.items() if dd == d) for d in set(DOMAINS.values())}
OPS = ("add", "subtract", "multiply")


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


def check_split(split: str) -> str:
  """`split`, or a ValueError naming the known splits."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return split


# ---------------------------------------------------------------------------------------------
# Randomness.
# ---------------------------------------------------------------------------------------------


def rng_for(seed: int, *parts: Any) -> random.Random:
  """The RNG stream named by (WORLD_VERSION, seed, *parts): one per record, probe set, etc."""
  # String seeds go through SHA-512 in CPython, so streams are stable across runs and versions.
  return random.Random("/".join(["jaxlm-world", WORLD_VERSION, str(seed), *map(str, parts)]))


def make_mix(weights: Mapping[Any, float]) -> tuple[tuple, tuple]:
  """A weighted choice prepared for `draw`: (keys, cumulative weights)."""
  keys, cum, total = [], [], 0.0
  for key, weight in weights.items():
    total += weight
    keys.append(key)
    cum.append(total)
  return tuple(keys), tuple(cum)


def draw(rng: random.Random, mix: tuple[tuple, tuple]):
  """One key of a `make_mix` result, drawn with its weight."""
  return rng.choices(mix[0], cum_weights=mix[1])[0]


FAMILY_MIX = make_mix(FAMILY_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# The held-out sets, and picking subjects and operand pairs that respect them.
# ---------------------------------------------------------------------------------------------


def pair_key(op: str, a: int, b: int) -> tuple[int, int]:
  """The canonical operand pair: unordered for add and multiply, so 3+4 and 4+3 go together."""
  return (a, b) if op == "subtract" else (min(a, b), max(a, b))


def all_pairs(op: str) -> list[tuple[int, int]]:
  """Every canonical operand pair of `op` within `world_facts.ARITH_RANGES`, sorted."""
  lo, hi = F.ARITH_RANGES[op]
  return sorted({pair_key(op, a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)
                 if op != "subtract" or b <= a})


@dataclasses.dataclass(frozen=True)
class World:
  """The seeded structure shared by all records: who is asked about where."""
  subjects: dict  # domain -> split -> names asked about in that split ("train": the rest)
  held_pairs: dict  # op -> eval split -> canonical operand pairs held out for that split
  pair_split: dict  # op -> canonical pair -> the eval split holding it out (absent: train)


@functools.lru_cache(maxsize=8)
def seeded_world(seed: int) -> World:
  """The held-out subjects and pairs of `seed` (they depend on the seed alone)."""
  rng = rng_for(seed, "holdout")
  subjects = {}
  for domain, names in ENTITIES.items():
    order = sorted(names)
    rng.shuffle(order)
    k = max(1, round(HOLDOUT_SUBJECT_FRACTION * len(order)))
    subjects[domain] = {"validation": tuple(sorted(order[:k])),
                        "test": tuple(sorted(order[k:2 * k])),
                        "train": tuple(sorted(order[2 * k:]))}
  held_pairs, pair_split = {}, {}
  for op in OPS:
    pairs = all_pairs(op)
    rng.shuffle(pairs)
    k = max(1, round(HOLDOUT_PAIR_FRACTION * len(pairs)))
    held_pairs[op] = {"validation": tuple(sorted(pairs[:k])), "test": tuple(sorted(pairs[k:2 * k]))}
    pair_split[op] = {p: s for s, ps in held_pairs[op].items() for p in ps}
  return World(subjects, held_pairs, pair_split)


def pick_subject(rng, world: World, split: str, domain: str, exclude=None) -> tuple[str, bool]:
  """(a subject `split` may ask about, whether it is held out).

  An eval split picks one of its own held-out subjects with probability `P_HELDOUT`.
  """
  held = split != "train" and rng.random() < P_HELDOUT
  pool = world.subjects[domain][split if held else "train"]
  name = rng.choice(pool)
  while name == exclude and len(pool) > 1:
    name = rng.choice(pool)
  return name, held


def pick_pair(rng, world: World, split: str, op: str, exclude=None) -> tuple[tuple, bool]:
  """(an operand pair `split` may ask about, whether it is held out), like `pick_subject`."""
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
    if pair_key(op, a, b) not in world.pair_split[op] and (a, b) != exclude:
      return (a, b), False


def text_pair(rng, world: World, split: str, op: str) -> tuple[int, int]:
  """An operand pair that the text of `split` may show (train pairs, plus the split's own)."""
  lo, hi = F.ARITH_RANGES[op]
  while True:
    a = rng.randint(lo, hi)
    b = rng.randint(lo, a if op == "subtract" else hi)
    if text_may_show(world, split, op, a, b):
      return a, b


def text_may_show(world: World, split: str, op: str, a: int, b: int) -> bool:
  """Whether the text of `split` may show a op b: not if another split holds the pair out."""
  return world.pair_split[op].get(pair_key(op, a, b)) in (None, split)
