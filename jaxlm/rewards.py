r"""Rewards as callables: a reward-model run, the world's gold reward and verifiable rules.

A *reward* scores a batch of replies to a batch of prompt records::

  reward(prompt_records, replies) -> np.ndarray float32 [B]        reward.name: str (metrics)

``prompt_records`` are ``{"prompt": [messages], "meta": ...}`` records (`jaxlm.data.schemas`);
``replies`` are reply-likes, each with ``.text`` (decoded, no special tokens) and
``.ended_turn`` (the reply closed with the chat format's end of turn: `Reply` here,
`jaxlm.chat_template.Reply` from `ChatFormat.parse_reply`), or one `policy_eval.Replies`.
The interface is batch-level because a reward model scores on the accelerator in batches; the
rule-based rewards are plain per-reply functions ``fn(prompt_record, text, ended_turn) ->
float`` lifted to batches by `per_item`.

NaN means *not applicable*: the world's rules cannot judge a prompt that carries no world task
(a user's own prompt), so `gold_reward` and `correctness` return NaN there rather than a number
that would read as "wrong". A reward that always applies (`well_formed`, `complete_sentence`,
a reward model) never returns NaN.

The rewards (registry names, as written in a config, in brackets):

* ``gold`` (`gold_reward`): the world's gold reward, `world_reward.gold_reward` with the reply's
  ended_turn, i.e. the sum of its parts
  ``correctness (+2 correct / 0 missing / -1 wrong) + length + politeness + hedging + form
  + end_of_turn (-2 when the turn did not end)``, from -5.9 to 2.5 (see `world_reward`).
  NaN on a prompt without a world task.
* ``correct`` (`correctness`): a verifiable reward, 1.0 if `world_reward.is_correct` else 0.0
  (a wrong answer and no answer both score 0; the gold reward is what tells them apart). What
  "correct" means depends on the task's ``meta["match"]``, set by the world per family:

    - facts (domains country, animal, thing: capital, continent, language, sound, legs,
      habitat, diet, colour; match ``phrase``): one of ``meta["accepted"]`` occurs as whole
      words (accent- and case-insensitive) and none of ``meta["wrong"]`` does;
    - arithmetic (add, subtract, multiply) and counting a list (count; match ``number``): the
      answer ``meta["answer_number"]`` is among the numbers stated (digits or English words up
      to 999) and every other number stated is an operand (``meta["allowed_numbers"]``);
    - reversing a list (reverse; match ``sequence``): the last ``len(target)`` list words of the
      reply, in order, are ``meta["target"]``.

  It reads the text only: a reply cut off after stating the right answer is still correct
  (as `policy_eval`'s ``correct`` metric counts it); add ``well_formed`` to pay for ending the
  turn. NaN on a prompt without a world task.
* ``well_formed`` (`well_formed`): 1.0 if the reply ended its turn (the format's end of turn,
  not ``</s>``, not cut off by the length limit) and is not empty (an immediate end of turn
  says nothing: an RL policy must not be paid for collapsing to it), else 0.0. Any prompt.
  Note `policy_eval`'s ``well_formed`` *metric* counts ended turns only.
* ``sentence`` (`complete_sentence`): the world's form rule as a 0/1 reward: 1.0 if the reply
  is a complete sentence (at least 3 words, an upper-case letter or digit first, ``.``/``!``/
  ``?`` last, closing quotes or brackets ignored), the test behind gold's +0.5 form bonus.
  Any prompt.
* ``model`` (`RewardModelReward`, `reward_model`): a reward-model run's scalar head at the
  reply's last token, read exactly as `policy_eval.reward_model_judge` reads it (the same
  code), normalised with the run's ``reward_stats.json`` (``(s - mean) / std``) and optionally
  clipped to ``[-clip, clip]``. Any prompt. In a config the term can also be named by the run
  directory itself (``"runs/reward": 1.0``).

Combining. `WeightedSum` (built by `combine` or `from_config`) is a reward whose value is
``sum_i w_i * r_i``; `WeightedSum.evaluate` also returns the unweighted components for metrics
(`WeightedSum.metrics`). How it treats NaN is explicit, chosen by ``nan``:

* ``"raise"`` (the default): any NaN component with a nonzero weight is an error naming the
  reward and the first row. A term that cannot judge the data is a configuration mistake
  (``correct`` on prompts that are not the world's), and silently training on a partial reward
  is worse than stopping.
* ``"ignore"``: a NaN term contributes nothing to its row (as if its weight were 0 there) and
  is counted: ``reward_<name>_na`` in `WeightedSum.metrics`. For a mix of world and other
  prompts. A row to which *no* term applies still raises: there is no reward to give it.

Infinite values always raise.

Config spelling (`from_config`). Best with ml_collections: a ConfigDict with *every* known
reward as a key, weight 0.0 for the unused ones, so a locked config takes command-line
overrides and ml_collections itself refuses a misspelt one::

  c.reward.weights = ConfigDict(dict(model=1.0, gold=0.0, correct=0.0, well_formed=0.0,
                                     sentence=0.0))     # see `default_weights()`
  --config.reward.weights.correct=1.0 --config.reward.weights.model=0.0

The reward model's run directory is a separate string key (today's ``config.reward_from``):
a float field cannot take a path. `from_config` also takes a plain dict, a list of
``"name:weight"`` strings or one comma-separated string (``"correct:1,well_formed:0.2"``),
where a name may also be a run directory (``"runs/reward:1.0"``). Terms with weight 0 are not
built (no reward model is loaded for ``model=0.0``); unknown names are a `ConfigError` naming
the key and listing the known ones.

Which path a trainer should use for the reward model. PPO (`jaxlm.ppo.make_scorer`) scores the
reward model inside its one jitted, mesh-sharded scoring call, on the token ids it sampled
(prompt as fed to the sampler + reply as emitted, stop token included). `RewardModelReward` is
text-level: it re-renders the prompt and the decoded reply with the chat template and
re-tokenises, which costs a second forward pass and host tokenisation, and may score ids other
than those sampled (a non-canonical tokenisation of the reply; a prompt truncated to
``max_len`` rather than ``max_prompt_len``). For training, keep the scorer's token-id score and
hand it in: ``total, parts = combo.evaluate(records, replies,
precomputed={"model": rm.normalize(scored["score"])})``; the text path is for evaluation,
rescoring saved samples and trainers without a fused scorer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence, \
    runtime_checkable

import numpy as np

from jaxlm import errors
from jaxlm.data import world_reward

STATS_FILE = "reward_stats.json"  # Written by experiments/reward.py: {"mean", "std", "num_samples"}.
NAN_POLICIES = ("raise", "ignore")
MODEL = "model"  # The registry name of the reward-model term.


class Reply(NamedTuple):
  """A reply as rewards read it: the decoded text and whether it ended its turn."""

  text: str
  ended_turn: bool = True


@runtime_checkable
class Reward(Protocol):
  """``reward(prompt_records, replies) -> float32 [B]``, with a `name` for metrics.

  NaN at row i means the reward does not apply to prompt i (see the module docstring).
  """

  name: str

  def __call__(self, prompt_records: Sequence[Mapping[str, Any]], replies: Any) -> np.ndarray:
    ...


def reply_fields(replies: Any) -> tuple[list[str], np.ndarray]:
  """(texts, ended_turn bool [B]) of a sequence of reply-likes or one `policy_eval.Replies`."""
  if hasattr(replies, "texts") and hasattr(replies, "ended_turn"):  # A batch (policy_eval.Replies).
    return list(replies.texts), np.asarray(replies.ended_turn, bool)
  texts, ended = [], []
  for i, reply in enumerate(replies):
    if isinstance(reply, str) or not (hasattr(reply, "text") and hasattr(reply, "ended_turn")):
      # A bare string would have to guess whether the turn ended, which several rewards score.
      raise TypeError(f"reply {i} is a {type(reply).__name__}: a reward needs .text and "
                      ".ended_turn (use rewards.Reply(text, ended_turn))")
    texts.append(reply.text)
    ended.append(bool(reply.ended_turn))
  return texts, np.asarray(ended, bool)


def _check_batch(prompt_records: Sequence[Any], texts: Sequence[str]) -> None:
  if len(prompt_records) != len(texts):
    raise ValueError(f"{len(prompt_records)} prompt records but {len(texts)} replies")


# ------------------------------------------------------------------------------------------------
# Per-reply rules, lifted to batches.
# ------------------------------------------------------------------------------------------------
ItemFn = Callable[[Mapping[str, Any], str, bool], float]


@dataclasses.dataclass(frozen=True)
class ItemReward:
  """A per-reply function ``fn(prompt_record, text, ended_turn) -> float`` as a batch `Reward`."""

  name: str
  fn: ItemFn

  def __call__(self, prompt_records, replies) -> np.ndarray:
    texts, ended = reply_fields(replies)
    _check_batch(prompt_records, texts)
    return np.asarray([self.fn(r, t, bool(e)) for r, t, e in zip(prompt_records, texts, ended)],
                      np.float32)


def per_item(name: str, fn: ItemFn) -> ItemReward:
  """Lifts a per-reply function to a batch reward named `name`."""
  return ItemReward(name, fn)


def has_world_task(prompt_record: Mapping[str, Any]) -> bool:
  """Whether the world's rules can judge replies to this record (its meta is a world task).

  The same test as `policy_eval.has_gold_reward`: ``meta["match"]`` names one of the world's
  matchers (phrase, number, sequence); a chat record must first go through
  `world.prompt_record_from_chat`.
  """
  try:
    world_reward.judge(prompt_record, "")
  except ValueError:
    return False
  return True


def _gold(record: Mapping[str, Any], text: str, ended: bool) -> float:
  if not has_world_task(record):
    return math.nan
  return world_reward.gold_reward(record, text, ended_turn=ended)


def _correct(record: Mapping[str, Any], text: str, ended: bool) -> float:
  del ended  # Correctness reads the text only (module docstring).
  if not has_world_task(record):
    return math.nan
  return 1.0 if world_reward.is_correct(record, text) else 0.0


def _well_formed(record: Mapping[str, Any], text: str, ended: bool) -> float:
  del record
  return 1.0 if ended and text.strip() else 0.0


def _complete_sentence(record: Mapping[str, Any], text: str, ended: bool) -> float:
  del record, ended
  # The world's own form test (gold's form term is +SENTENCE_BONUS exactly when it passes), so
  # this rule and the gold reward cannot drift apart.
  form = world_reward._form(text, len(text.split()))  # pylint: disable=protected-access
  return 1.0 if form == world_reward.SENTENCE_BONUS else 0.0


gold_reward = per_item("gold", _gold)
correctness = per_item("correct", _correct)
well_formed = per_item("well_formed", _well_formed)
complete_sentence = per_item("sentence", _complete_sentence)

# The rule-based rewards by config name; "model" (a reward-model run) is built by the caller's
# `make_model`, since it needs a tokenizer and devices.
RULES: dict[str, Reward] = {r.name: r for r in (gold_reward, correctness, well_formed,
                                                complete_sentence)}
KNOWN = tuple(RULES) + (MODEL,)


def default_weights(**weights: float) -> dict[str, float]:
  """Every known reward at weight 0.0, updated by `weights`: the value of a config's weights.

  ``ConfigDict(rewards.default_weights(model=1.0))`` gives a locked config a key for every
  reward, so ``--config.reward.weights.correct=1.0`` works and a misspelt key is refused.
  """
  unknown = sorted(set(weights) - set(KNOWN))
  if unknown:
    raise ValueError(f"unknown rewards {unknown}; known: {', '.join(KNOWN)}")
  return {name: float(weights.get(name, 0.0)) for name in KNOWN}


# ------------------------------------------------------------------------------------------------
# A reward-model run.
# ------------------------------------------------------------------------------------------------
class RewardModelReward:
  """A reward model's score of each reply, normalised: ``clip((s - mean) / std)``.

  ``s`` is `policy_eval.reward_model_judge`'s score (the scalar head at the last token of the
  rendered prompt + reply; no ``<|end|>`` when the turn did not end), computed by that very
  function, so this reward and the evaluation's judge agree to the bit.
  """

  def __init__(self, params, config, tokenizer, *, batch_size: int = 64,
               stats: tuple[float, float] | None = None, clip: float = 0.0, name: str = MODEL,
               mesh=None, rules=None):
    """
    Args:
      params: reward-model params with a ``scalar_head`` (placed where they should run).
      config: its `ModelConfig`.
      tokenizer: the tokenizer it was trained with.
      batch_size: rows per forward pass.
      stats: (mean, std) to normalise with; None: raw scores.
      clip: clip normalised scores to [-clip, clip]; 0: no clipping.
      name: the metric name.
      mesh: run the forward passes under this mesh (the model's activation constraints apply;
        place `params` on it first, as `reward_model` does).
      rules: logical axis rules with `mesh` (default: `sharding.DEFAULT_RULES`).
    """
    from jaxlm import policy_eval  # Deferred: the rule rewards need no model code.

    if stats is not None and not stats[1] > 0:
      raise ValueError(f"reward statistics need a positive std, got {stats[1]}")
    if clip < 0:
      raise ValueError(f"clip must be >= 0, got {clip}")
    self.name, self.stats, self.clip = name, stats, float(clip)
    self._judge = policy_eval.reward_model_judge(params, config, tokenizer, batch_size=batch_size)
    self._mesh, self._rules = mesh, rules

  def raw(self, prompt_records, replies) -> np.ndarray:
    """The reward model's scores before normalisation, float32 [B]."""
    texts, ended = reply_fields(replies)
    _check_batch(prompt_records, texts)
    if self._mesh is None:
      return self._judge(prompt_records, texts, ended)
    from jaxlm import sharding  # Deferred with the model code.

    with sharding.use_mesh(self._mesh, self._rules or sharding.DEFAULT_RULES):
      return self._judge(prompt_records, texts, ended)

  def normalize(self, raw_scores) -> np.ndarray:
    """Raw scores (this text path's, or a fused scorer's on token ids) -> this reward's scale."""
    return normalized_scores(raw_scores, self.stats, self.clip).astype(np.float32)

  def __call__(self, prompt_records, replies) -> np.ndarray:
    return self.normalize(self.raw(prompt_records, replies))


def normalized_scores(raw_scores, stats: tuple[float, float] | None, clip: float) -> np.ndarray:
  """``clip((s - mean) / std)`` in float64 [B]: no normalisation when `stats` is None, no clip at 0."""
  scores = np.asarray(raw_scores, np.float64)
  if stats is not None:
    scores = (scores - stats[0]) / stats[1]
  if clip:
    scores = np.clip(scores, -clip, clip)
  return scores


def read_reward_stats(run_dir: str | os.PathLike) -> tuple[float, float]:
  """(mean, std) from a reward run's reward_stats.json (std floored at 1e-6, as PPO does)."""
  path = os.path.join(run_dir, STATS_FILE)
  if not os.path.exists(path):
    raise errors.MissingError(f"{path} not found: the reward run did not finish (it writes its "
                              "statistics last), or do not normalise its scores")
  with open(path) as f:
    stats = json.load(f)
  if int(stats.get("num_samples", 0)) < 32:
    logging.warning("%s: reward statistics from only %s samples; normalised rewards may be noisy",
                    path, stats.get("num_samples"))
  return float(stats["mean"]), max(float(stats["std"]), 1e-6)


def reward_model(run_dir: str | os.PathLike, tokenizer, *, batch_size: int = 64, mesh=None,
                 rules=None, normalize: bool = True, clip: float = 0.0,
                 name: str = MODEL) -> RewardModelReward:
  """The `RewardModelReward` of a finished reward-model run directory.

  Loads its latest params (refusing a run of another stage, or one trained with another
  tokenizer), places them on `mesh` with the model's logical shardings when given, and reads
  its reward_stats.json when `normalize`.
  """
  import jax  # Deferred: the rule rewards need no devices.
  from jaxlm import checkpoint
  from jaxlm import model as model_lib
  from jaxlm import sharding

  run = checkpoint.load_parent(run_dir, expect_tokenizer_hash=tokenizer.content_hash)
  if run.manifest.get("stage") != "reward":
    raise errors.ParentError(f"{run_dir} is a {run.manifest.get('stage')!r} run; a reward-model "
                             "reward needs a reward-model run directory")
  params = run.params
  if mesh is not None:
    rules = rules or sharding.DEFAULT_RULES
    abstract = jax.eval_shape(
        lambda key: model_lib.init_params(run.model_config, key, scalar_head=True),
        jax.random.key(0))
    params = jax.device_put(params, sharding.logical_shardings(abstract, mesh, rules))
  stats = read_reward_stats(run_dir) if normalize else None
  return RewardModelReward(params, run.model_config, tokenizer, batch_size=batch_size,
                           stats=stats, clip=clip, name=name, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------
# Weighted combinations.
# ------------------------------------------------------------------------------------------------
class WeightedSum:
  """``sum_i w_i * r_i`` of named rewards, itself a `Reward`, with its components for metrics.

  NaN components follow `nan` ("raise" or "ignore"; see the module docstring); `key` is the
  config key errors name (set by `from_config`).
  """

  def __init__(self, terms: Sequence[tuple[float, Reward]], *, nan: str = "raise",
               name: str = "reward", key: str = ""):
    terms = tuple(terms)
    if not terms:
      raise errors.ConfigError(key, "no reward terms")
    if nan not in NAN_POLICIES:
      raise errors.ConfigError(key, f"nan policy {nan!r}: expected one of {NAN_POLICIES}")
    names = [r.name for _, r in terms]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
      raise errors.ConfigError(key, f"rewards named twice: {duplicated}")
    for weight, reward in terms:
      if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
          or not math.isfinite(weight)):
        raise errors.ConfigError(key, f"weight of {reward.name!r}: expected a finite number, got "
                                 f"{weight!r}")
    self.terms = tuple((float(w), r) for w, r in terms)
    self.nan, self.name, self.key = nan, name, key

  @property
  def weights(self) -> dict[str, float]:
    return {r.name: w for w, r in self.terms}

  def components(self, prompt_records, replies, *,
                 precomputed: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Each term's unweighted values, float32 [B] (NaN where it does not apply).

    `precomputed` maps a term's name to values already computed elsewhere (e.g. the reward
    model's score from a fused token-id scorer, normalised with `RewardModelReward.normalize`);
    that term is not called.
    """
    precomputed = dict(precomputed or {})
    unknown = sorted(set(precomputed) - set(self.weights))
    if unknown:
      raise ValueError(f"precomputed values for rewards not in the sum: {unknown} (terms: "
                       f"{list(self.weights)})")
    texts, ended = reply_fields(replies)
    _check_batch(prompt_records, texts)
    batch = [Reply(t, bool(e)) for t, e in zip(texts, ended)]
    out = {}
    for _, reward in self.terms:
      if reward.name in precomputed:
        values = np.asarray(precomputed[reward.name], np.float32)
      else:
        values = np.asarray(reward(prompt_records, batch), np.float32)
      if values.shape != (len(texts),):
        raise ValueError(f"reward {reward.name!r} returned shape {values.shape} for "
                         f"{len(texts)} replies")
      out[reward.name] = values
    return out

  def total(self, components: Mapping[str, np.ndarray]) -> np.ndarray:
    """``sum_i w_i * r_i`` of `components` under the NaN policy, float32 [B]."""
    total, applicable = None, None
    for weight, reward in self.terms:
      values = np.asarray(components[reward.name], np.float64)
      if np.isinf(values).any():
        raise ValueError(f"reward {reward.name!r} is infinite at row "
                         f"{int(np.flatnonzero(np.isinf(values))[0])}")
      missing = np.isnan(values)
      if missing.any() and self.nan == "raise":
        row = int(np.flatnonzero(missing)[0])
        raise errors.ConfigError(
            self.key, f"reward {reward.name!r} does not apply to {int(missing.sum())} of "
            f"{values.size} replies (first: row {row}; e.g. a prompt without a world task): drop "
            "the term, or use nan='ignore' to let it contribute nothing there")
      if total is None:
        total, applicable = np.zeros(values.shape), np.zeros(values.shape, bool)
      total += weight * np.where(missing, 0.0, values)
      applicable |= ~missing
    if not applicable.all():
      row = int(np.flatnonzero(~applicable)[0])
      raise errors.ConfigError(self.key, f"no reward term applies to row {row} (every one is "
                               f"NaN there: {list(self.weights)}); add one that applies to any "
                               "prompt, e.g. well_formed or a reward model")
    return total.astype(np.float32)

  def evaluate(self, prompt_records, replies, *, precomputed: Mapping[str, Any] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total float32 [B], components) in one pass."""
    parts = self.components(prompt_records, replies, precomputed=precomputed)
    return self.total(parts), parts

  def __call__(self, prompt_records, replies, *,
               precomputed: Mapping[str, Any] | None = None) -> np.ndarray:
    return self.evaluate(prompt_records, replies, precomputed=precomputed)[0]

  @staticmethod
  def metrics(components: Mapping[str, np.ndarray], prefix: str = "reward_") -> dict[str, float]:
    """Per term: ``<prefix><name>`` its mean over the rows it applies to (absent if none), and
    ``<prefix><name>_na`` the number of rows it does not apply to (only when some)."""
    out = {}
    for name, values in components.items():
      values = np.asarray(values, np.float64)
      missing = np.isnan(values)
      if not missing.all():
        out[f"{prefix}{name}"] = float(values[~missing].mean())
      if missing.any():
        out[f"{prefix}{name}_na"] = float(missing.sum())
    return out

  def __repr__(self) -> str:
    terms = " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)
    return f"WeightedSum({terms}, nan={self.nan!r})"


def combine(weighted: Sequence[tuple[float, Reward]], *, nan: str = "raise",
            name: str = "reward") -> WeightedSum:
  """The `WeightedSum` of ``[(weight, reward), ...]``."""
  return WeightedSum(weighted, nan=nan, name=name)


def _looks_like_path(name: str) -> bool:
  return os.sep in name or "/" in name or name.startswith(".") or os.path.isdir(name)


def _parse_weight(key: str, name: str, value: Any) -> float:
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      raise errors.ConfigError(key, f"weight of {name!r}: expected a number, got {value!r}") from None
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise errors.ConfigError(key, f"weight of {name!r}: expected a finite number, got {value!r}")
  return float(value)


def _entries(spec: Any, key: str) -> list[tuple[str, float]]:
  """[(name, weight)] of a mapping, a list of "name:weight" strings, or "a:1,b:2"."""
  if hasattr(spec, "to_dict"):  # ml_collections ConfigDict (FieldReferences resolved).
    spec = spec.to_dict()
  if isinstance(spec, Mapping):
    return [(str(n), _parse_weight(key, str(n), w)) for n, w in spec.items()]
  if isinstance(spec, str):
    spec = [s for s in spec.split(",") if s.strip()]
  if not isinstance(spec, Iterable):
    raise errors.ConfigError(key, f"expected {{name: weight}} or 'name:weight' strings, got "
                             f"{type(spec).__name__}")
  out, seen = [], set()
  for entry in spec:
    if isinstance(entry, str):
      # The last colon: a run directory may itself contain one.
      name, colon, weight = entry.strip().rpartition(":")
      if not colon or not name:
        raise errors.ConfigError(key, f"entry {entry!r}: expected 'name:weight', e.g. 'correct:1.0'")
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
      name, weight = entry
    else:
      raise errors.ConfigError(key, f"entry {entry!r}: expected 'name:weight'")
    name = str(name).strip()
    if name in seen:
      raise errors.ConfigError(key, f"reward {name!r} is given twice")
    seen.add(name)
    out.append((name, _parse_weight(key, name, weight)))
  return out


def from_config(spec: Any, *, key: str = "reward.weights", nan: str = "raise",
                model_run: str | os.PathLike = "", model_key: str = "reward_from",
                make_model: Callable[[str], Reward] | None = None) -> WeightedSum:
  """The `WeightedSum` a config describes (spellings in the module docstring).

  Args:
    spec: ``{name: weight}`` (dict or ConfigDict), ``["name:weight", ...]`` or
      ``"name:weight,name:weight"``. Names: `KNOWN`, or a reward-model run directory. Terms
      with weight 0 are skipped (not built).
    key: the config key of `spec`, named by errors.
    nan: the NaN policy ("raise" or "ignore").
    model_run: the run directory of the ``model`` term (e.g. ``config.reward_from``).
    model_key: the config key of `model_run`, named by errors.
    make_model: builds a reward-model reward from a run directory, e.g.
      ``functools.partial(rewards.reward_model, tokenizer=tok, batch_size=64, mesh=mesh)``;
      needed only when a reward-model term has a nonzero weight.

  Raises:
    ConfigError: an unknown name (listing the known ones), a bad weight, a name given twice,
      no nonzero weight, or a ``model`` term without `model_run`.
  """
  entries = _entries(spec, key)
  terms = []
  for name, weight in entries:
    if name not in KNOWN and not _looks_like_path(name):
      raise errors.ConfigError(key, f"unknown reward {name!r}{errors.did_you_mean(name, KNOWN)}; "
                               f"known rewards: {', '.join(KNOWN)}, or a reward-model run "
                               "directory")
    if weight == 0.0:
      continue  # Not built: a zero-weight reward model is not loaded.
    if name in RULES:
      terms.append((weight, RULES[name]))
      continue
    if name == MODEL:
      if not model_run:
        raise errors.ConfigError(model_key, f"{key}.{MODEL} is {weight:g} but no reward-model "
                                 "run directory is set")
      run_dir, term_name = str(model_run), MODEL
    else:  # A run directory named in the spec itself.
      run_dir = name
      term_name = f"{MODEL}:{os.path.basename(os.path.normpath(name))}"
    if make_model is None:
      raise ValueError(f"{key}: the reward-model term {name!r} needs make_model (e.g. "
                       "functools.partial(rewards.reward_model, tokenizer=tok))")
    reward = make_model(run_dir)
    if getattr(reward, "name", None) != term_name:  # Metric names: "model" or "model:<run>".
      reward = _Renamed(term_name, reward)
    terms.append((weight, reward))
  if not terms:
    raise errors.ConfigError(key, f"no reward has a nonzero weight (given: "
                             f"{dict(entries) or 'nothing'}); e.g. {key}.correct=1.0")
  return WeightedSum(terms, nan=nan, key=key)


@dataclasses.dataclass(frozen=True)
class _Renamed:
  """A reward under another metric name (its other attributes, e.g. `normalize`, pass through)."""

  name: str
  reward: Reward

  def __call__(self, prompt_records, replies) -> np.ndarray:
    return self.reward(prompt_records, replies)

  def __getattr__(self, attr):
    if attr == "reward":  # Not set yet (copying, unpickling): no recursion.
      raise AttributeError(attr)
    return getattr(self.reward, attr)


# ------------------------------------------------------------------------------------------------
# The reward an on-policy trainer (PPO, GRPO) configures.
# ------------------------------------------------------------------------------------------------
WORLD_TERMS = ("gold", "correct", "sentence")  # Terms that judge the embedded world's tasks.


@dataclasses.dataclass
class RolloutReward:
  """A trainer's configured reward: a `WeightedSum` whose ``model`` term is read from the fused
  scorer's token-id scores (see the module docstring), normalised and clipped here.

  Built by `rollout_reward` from a config without touching the disk (so a config check can
  build it); `load_stats` reads the reward run's statistics once the run is known to exist.
  """

  weighted: WeightedSum
  model_run: str = ""
  normalize: bool = True
  clip: float = 0.0
  stats: tuple[float, float] | None = None

  @property
  def uses_model(self) -> bool:
    """Whether a reward model must be loaded and scored with the rollout."""
    return MODEL in self.weighted.weights

  @property
  def weights(self) -> dict[str, float]:
    return self.weighted.weights

  def world_terms(self) -> list[str]:
    """The terms that need the embedded world's prompts."""
    return sorted(set(self.weights) & set(WORLD_TERMS))

  def load_stats(self) -> None:
    """Reads ``reward_stats.json`` of the reward run (when a model term is normalised)."""
    if self.uses_model and self.normalize:
      self.stats = read_reward_stats(self.model_run)

  def model_values(self, raw_scores) -> np.ndarray:
    """The scorer's raw reward-model scores [B] -> the ``model`` term: clip((s - mean) / std)."""
    if self.normalize and self.stats is None:
      raise RuntimeError("RolloutReward.load_stats() was not called")
    return normalized_scores(raw_scores, self.stats if self.normalize else None, self.clip)

  def evaluate(self, prompt_records, replies, model_scores=None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total float32 [B], components) with the ``model`` term from `model_scores` (raw, [B])."""
    precomputed = {}
    if self.uses_model:
      if model_scores is None:
        raise ValueError("the reward has a model term: pass the scorer's scores")
      precomputed[MODEL] = self.model_values(model_scores)
    return self.weighted.evaluate(prompt_records, replies, precomputed=precomputed)


def rollout_reward(weights: Any, *, nan: str = "raise", model_run: str = "", normalize: bool = True,
                   clip: float = 0.0, key: str = "reward.weights",
                   model_key: str = "reward_from") -> RolloutReward:
  """The `RolloutReward` of a trainer's config (``config.reward.weights``, ``config.reward_from``).

  Only the ``model`` key names the reward model (the fused scorer holds one): a run directory
  given as a term name is a `ConfigError`, as is a nonzero ``model`` without `model_run`.
  """
  if clip < 0:
    raise errors.ConfigError("reward.clip", f"must be >= 0, got {clip}")

  def scored_by_the_trainer(run_dir: str) -> Reward:
    def never(*_):
      raise AssertionError("the model term's values come from the trainer's scorer")
    return per_item(MODEL, never)

  weighted = from_config(weights, key=key, nan=nan, model_run=model_run, model_key=model_key,
                         make_model=scored_by_the_trainer)
  named_runs = sorted(set(weighted.weights) - set(KNOWN))
  if named_runs:
    raise errors.ConfigError(key, f"reward model named as a term ({named_runs}): a trainer scores one "
                             f"reward model, the `{MODEL}` term with {model_key}=<run directory>")
  return RolloutReward(weighted, model_run=str(model_run), normalize=bool(normalize), clip=float(clip))


def stage_reward(config) -> RolloutReward:
  """The `RolloutReward` of an on-policy stage's config (PPO, GRPO): ``reward.weights``,
  ``reward.nan`` (absent: "raise"), ``reward.normalize``, ``reward.clip``, ``reward_from``.

  The world's rule terms (`WORLD_TERMS`) on another data source would score nothing: a
  `ConfigError` naming ``reward.weights``, before anything runs.
  """
  block = config.reward
  reward = rollout_reward(block.weights, nan=block.get("nan", "raise"), model_run=config.reward_from,
                          normalize=block.normalize, clip=block.clip)
  if reward.world_terms() and config.data.source != "world":
    raise errors.ConfigError("reward.weights", f"{reward.world_terms()} judge the embedded world's tasks, but "
                             f"config.data.source={config.data.source!r}; use a reward model (weights.model)")
  return reward


def world_metrics(prompt_records, replies) -> dict[str, float]:
  """``gold_reward`` and ``correct`` means over the replies to world tasks (empty if none)."""
  gold = np.asarray(gold_reward(prompt_records, replies), np.float64)
  if not np.isfinite(gold).any():
    return {}
  correct = np.asarray(correctness(prompt_records, replies), np.float64)
  return {"gold_reward": float(np.nanmean(gold)), "correct": float(np.nanmean(correct))}
