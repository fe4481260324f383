"""Conversations of the synthetic world: chat, prompt and preference records.

Built from the tasks of `jaxlm.data.world_tasks`: a chat is 1-3 user turns answered by a
simulated demonstrator with a persona style (`DEMO_STYLE_MIX`); a prompt record is a
conversation ending with an unanswered user turn; a preference record is a prompt with two
responses in different styles (`PREFERENCE_STYLE_MIX`) labelled by simulated Bradley-Terry
raters. Also the helpers that turn records into prompts and candidates: `prompt_record_from_chat`,
`task_prompt`, `candidate_responses`. Re-exported by `jaxlm.data.world`; import it from there.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Mapping

from jaxlm.data import world_core as C
from jaxlm.data import world_facts as F
from jaxlm.data import world_reward
from jaxlm.data import world_tasks as T

# Demonstrators: a quarter ideal, the rest with the faults real demonstrations have; mistakes
# and not knowing are rare but present, so imitation alone lands clearly below the best.
DEMO_STYLE_MIX = {"ideal": 0.25, "friendly": 0.15, "verbose": 0.20, "terse": 0.12, "hedge": 0.10,
                  "rude": 0.07, "mistake": 0.08, "unsure": 0.03}
# Candidates the raters compare: flatter than the demonstrations, like samples of several models.
PREFERENCE_STYLE_MIX = {"ideal": 0.18, "friendly": 0.14, "verbose": 0.15, "terse": 0.13,
                        "hedge": 0.12, "rude": 0.10, "mistake": 0.12, "unsure": 0.06}
_PERSONA_LOYALTY = 0.6  # chance a chat turn uses the chat's persona style rather than a fresh draw

_DEMO_MIX = C.make_mix(DEMO_STYLE_MIX)
_PREF_MIX = C.make_mix(PREFERENCE_STYLE_MIX)
_CHAT_TURNS = C.make_mix({1: 0.55, 2: 0.30, 3: 0.15})
_PROMPT_TURNS = C.make_mix({1: 0.60, 2: 0.30, 3: 0.10})


# ---------------------------------------------------------------------------------------------
# Conversations: chat, prompt and preference records.
# ---------------------------------------------------------------------------------------------


def _dialogue(rng, world: C.World, split: str, num_user_turns: int, answer_last: bool):
  """(messages, metas of answered turns, their styles, meta of the last user turn)."""
  messages: list[dict[str, str]] = []
  if rng.random() < 0.25:
    messages.append({"role": "system", "content": rng.choice(F.SYSTEM_PROMPTS)})
  persona = C.draw(rng, _DEMO_MIX)  # A demonstrator's habits persist across a conversation.
  metas, styles, meta, asked = [], [], None, set()
  for turn in range(num_user_turns):
    if meta is None:
      question, meta = T.ask(rng, world, split)
    else:
      question, meta = T.followup(rng, world, split, meta, asked)
    asked.add((meta["family"], meta["subject"]))
    messages.append({"role": "user", "content": question})
    if turn == num_user_turns - 1 and not answer_last:
      break
    style = persona if rng.random() < _PERSONA_LOYALTY else C.draw(rng, _DEMO_MIX)
    messages.append({"role": "assistant", "content": T.render(meta, style, rng, world)})
    metas.append(meta)
    styles.append(style)
  return messages, metas, styles, meta


def _chat(rng, world: C.World, split: str, index: int, config: C.WorldConfig) -> dict[str, Any]:
  messages, metas, styles, _ = _dialogue(rng, world, split, C.draw(rng, _CHAT_TURNS), True)
  meta = {"turns": metas, "styles": styles, "split": split, "index": index,
          "world_version": C.WORLD_VERSION}
  return {"messages": messages, "meta": meta}


def _prompt(rng, world: C.World, split: str, index: int, config: C.WorldConfig) -> dict[str, Any]:
  num_turns = C.draw(rng, _PROMPT_TURNS)
  messages, _, _, meta = _dialogue(rng, world, split, num_turns, False)
  return {"prompt": messages, "meta": {**meta, "index": index, "num_turns": num_turns,
                                       "world_version": C.WORLD_VERSION}}


def sigmoid(x: float) -> float:
  """The logistic function, without overflow for large |x|."""
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _preference(rng, world: C.World, split: str, index: int,
                config: C.WorldConfig) -> dict[str, Any]:
  record = _prompt(rng, world, split, index, config)
  meta = record["meta"]
  style_a = C.draw(rng, _PREF_MIX)
  text_a = T.render(meta, style_a, rng, world)
  gold_a = world_reward.gold_reward(record, text_a)
  for _ in range(50):  # Two different responses with different gold rewards: ties carry no label.
    style_b = C.draw(rng, _PREF_MIX)
    text_b = T.render(meta, style_b, rng, world)
    gold_b = world_reward.gold_reward(record, text_b)
    if text_b != text_a and abs(gold_a - gold_b) > 1e-9:
      break
  p_a = sigmoid((gold_a - gold_b) / config.label_temperature)
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
  if family not in C.DOMAINS:
    raise ValueError(f"unknown task family {family!r}; expected one of {sorted(C.DOMAINS)}")
  domain = C.DOMAINS[family]
  if domain in C.ENTITIES and args.get("name") not in C.ENTITIES[domain]:
    raise ValueError(f"unknown {domain} {args.get('name')!r} for family {family!r}")
  rng = C.rng_for(seed, "task_prompt", family, json.dumps(args, sort_keys=True),
                  C.check_split(split))
  group = F.QUESTIONS[family][split]  # An eval split always gets its held-out phrasing here.
  k = rng.randrange(len(group))
  meta = T.make_task(family, args, split, f"q/{family}/{split}/{k}", split != "train", False)
  template = group[k]
  question = template.format(**T.task_fields(meta, rng))
  return {"prompt": [{"role": "user", "content": question}], "meta": meta}


def candidate_responses(prompt_record: Mapping[str, Any], config: C.WorldConfig = C.WorldConfig(),
                        *, sample: int = 0) -> dict[str, str]:
  """One response in every style of `STYLES` to a prompt record's last user turn.

  The "ideal" response reaches the maximum gold reward (2.5), so `max` over these is the best
  available response. `sample` picks another deterministic draw of the phrasings.
  """
  meta = prompt_record["meta"]
  key = json.dumps([meta["family"], meta["args"], meta.get("index"), meta.get("split")],
                   sort_keys=True)
  rng = C.rng_for(config.seed, "candidates", sample, key)
  world = C.seeded_world(config.seed)
  return {style: T.render(meta, style, rng, world) for style in T.STYLES}



# ---------------------------------------------------------------------------------------------
# Record streams.
# ---------------------------------------------------------------------------------------------

_BUILDERS = {"chat": _chat, "preference": _preference, "prompt": _prompt}
# The WorldConfig field that sets the train size of each kind.
SIZE_FIELDS = {"chat": "num_chats", "preference": "num_preferences", "prompt": "num_prompts"}


def records(kind: str, split: str, config: C.WorldConfig, count: int) -> Iterator[dict[str, Any]]:
  """The first `count` records of (kind, split) for a kind of `SIZE_FIELDS`, not capped by size."""
  build = _BUILDERS[kind]
  world = C.seeded_world(config.seed)
  for index in range(count):
    yield build(C.rng_for(config.seed, kind, split, index), world, split, index, config)
