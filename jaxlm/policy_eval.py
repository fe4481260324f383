"""Evaluating a chat policy on held-out prompts: sample its replies once, then score them.

After SFT, DPO and PPO the policy answers the test prompts and is measured by (metric names):

  gold_reward   mean world gold reward (`world_reward.gold_reward`), over the prompts that carry
                a world task in their ``meta`` (others have no gold reward); `num_gold` of them
  correct       fraction of those answered correctly (`world_reward.is_correct`); and
                ``correct/<domain>`` per task domain of the world (arithmetic, list, country,
                animal, thing), `correct_by_domain`
  reward        mean score of a `Judge` (e.g. `reward_model_judge`), over every prompt
  well_formed   fraction of replies that end their turn with the chat format's end of turn
                (jaxlm: ``<|end|>``; Llama 3: ``<|eot_id|>``; ChatML: ``<|im_end|>``)
  length        mean reply length in tokens, the stop token included (what the policy emitted)
  kl            KL(policy || reference) in nats per reply, estimated from the samples (below)
  win_rate      how often the reply beats a baseline's reply to the same prompt (e.g. the SFT
                model's), judged by the `Judge` if given, else by the gold reward; ties count
                half. `tie_rate` is the fraction of ties.
  num_prompts   the number of prompts

A `Judge` is any callable ``judge(prompt_records, replies, ended_turn) -> float [N]``: it needs
no gold reward, so the same evaluation runs on a user's own prompts with a reward model as judge.

Generation is one pass over the prompts in fixed-size batches (the last padded with dummy rows)
at one prompt width (the longest prompt rounded up to a multiple of 32), so every batch reuses
one compilation, and repeated evaluations on the same prompts reuse it too. Row i of the
prompts is drawn with the sampler's row key for row ``i % batch_size`` of the call key
``fold_in(rng, i // batch_size)``: sampled replies depend on (rng, batch_size), greedy ones on
the prompt only.

KL estimator. For a prompt x and a reply y = y_1..y_T,

  KL(pi || ref)(x) = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t) ]

and `kl` averages the bracket over prompts, one sample each, with both log-probs
teacher-forced under the plain (untempered, untruncated) models. That is unbiased only when y
is a sample of pi itself: temperature 1, no top-k or top-p, not greedy (a single term may be
negative; the mean is not, in expectation). Replies cut at `max_new_tokens` make it the KL
between the distributions of the first `max_new_tokens` tokens, a lower bound on the full one.
Under any other sampling distribution q it estimates E_q[log pi - log ref] = KL(q || ref) -
KL(q || pi): still 0 when pi = ref and still tracking how far the replies the policy actually
gives have moved, but no longer a KL. The sampler's own log-probs are under q, so they are not
used for this; both sides are teacher-forced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat_template
from jaxlm import errors
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sampling as sampling_lib
from jaxlm.data import world_reward

# judge(prompt_records, replies, ended_turn) -> float [N], higher is better.
Judge = Callable[[Sequence[Mapping[str, Any]], Sequence[str], Sequence[bool]], np.ndarray]

# Prompt and sequence widths are rounded up to a multiple of this, so that evaluations on
# slightly different prompts share one compilation.
WIDTH_MULTIPLE = 32


def _bucket(n: int, cap: int) -> int:
  return min(max(WIDTH_MULTIPLE, -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE), cap)


def left_truncate(ids: np.ndarray, room: int, *, bos_id: int | None) -> np.ndarray:
  """Keeps the last `room` tokens: the end of the conversation is what is answered.

  A leading `bos_id` stays in front (a model never saw a conversation without it); with no bos
  (`bos_id` None, e.g. Qwen, or a prompt that does not start with it) only the tail is kept.
  """
  if len(ids) <= room:
    return ids
  if bos_id is not None and len(ids) and ids[0] == bos_id:
    return np.concatenate([ids[:1], ids[len(ids) - room + 1:]])
  return ids[len(ids) - room:]


def _filler_id(tokenizer) -> int:
  """The lone token of a dummy row: bos where the tokenizer has one, else its pad id."""
  return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id


def _pad(rows: Sequence[np.ndarray], batch: int, width: int,
         filler: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads rows into int32 [batch, width] and lengths [batch]; dummy rows are one `filler`."""
  tokens = np.zeros((batch, width), np.int32)
  tokens[:, 0] = filler
  lengths = np.ones((batch,), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, : len(ids)] = ids
    lengths[i] = len(ids)
  return tokens, lengths


# ------------------------------------------------------------------------------------------------
# Judges.
# ------------------------------------------------------------------------------------------------
def has_gold_reward(prompt_record: Mapping[str, Any]) -> bool:
  """Whether the world's gold reward can judge replies to this record (its meta is a task)."""
  try:
    world_reward.judge(prompt_record, "")
  except ValueError:
    return False
  return True


def gold_judge(prompt_records: Sequence[Mapping[str, Any]], replies: Sequence[str],
               ended_turn: Sequence[bool]) -> np.ndarray:
  """The world gold reward as a `Judge`: float64 [N]. Raises ValueError on a non-world record."""
  return np.asarray([world_reward.gold_reward(r, text, ended_turn=bool(e))
                     for r, text, e in zip(prompt_records, replies, ended_turn, strict=True)],
                    np.float64)


@functools.partial(jax.jit, static_argnames="config")
def _last_token_scalars(params, tokens: jax.Array, lengths: jax.Array, *,
                        config: model_lib.ModelConfig) -> jax.Array:
  """The scalar head at each row's last real token: tokens [B, W] -> float32 [B].

  Causal attention: right padding cannot reach a real token, so no segment ids are needed.
  """
  return model_lib.Transformer(config).apply({"params": params}, tokens, scalar_index=lengths - 1,
                                             lm_head=False).scalar


def reward_model_judge(params, config: model_lib.ModelConfig, tokenizer, *,
                       batch_size: int = 64) -> Judge:
  """A `Judge` that scores replies with a reward model (a Transformer with a scalar head).

  A reply is scored as the reward model reads a conversation:

    ids = render_prompt(prompt) + render_response(reply)     <s> ... <|assistant|> reply <|end|>
    score = scalar head at the last token of ids

  A reply that did not end its turn has no ``<|end|>``; it is scored at its last token all the
  same (what a reward model makes of an unfinished reply is its own business). Conversations
  longer than ``config.max_len`` keep <s> (where the tokenizer has one) and their last tokens.

  Args:
    params: plain reward-model params, with a ``scalar_head``.
    config: its model config.
    tokenizer: the `jaxlm.tokenizer.Tokenizer` it was trained with.
    batch_size: rows per forward pass; every call pads to it, at a width bucketed to a
      multiple of 32, so calls share compilations.

  Returns:
    ``judge(prompt_records, replies, ended_turn) -> float32 [N]``.
  """
  if "scalar_head" not in params:
    raise ValueError("reward_model_judge needs params with a 'scalar_head' (a reward model); "
                     "these are a language model's")

  def judge(prompt_records, replies, ended_turn) -> np.ndarray:
    sequences = []
    for i, (record, text, ended) in enumerate(zip(prompt_records, replies, ended_turn,
                                                  strict=True)):
      prompt = chat_template.render_prompt(tokenizer, record["prompt"], where=f"prompt {i}")
      reply = chat_template.render_response(tokenizer, text)
      ids = np.concatenate([prompt, reply if ended else reply[:-1]])
      sequences.append(left_truncate(ids, config.max_len, bos_id=tokenizer.bos_id))
    width = _bucket(max((len(s) for s in sequences), default=1), config.max_len)
    scores = [_last_token_scalars(params, *_pad(sequences[s:s + batch_size], batch_size, width,
                                                _filler_id(tokenizer)),
                                  config=config)
              for s in range(0, len(sequences), batch_size)]
    scores = np.concatenate([np.asarray(x) for x in jax.device_get(scores)] or [np.zeros(0)])
    return scores[: len(sequences)].astype(np.float32)

  return judge


# ------------------------------------------------------------------------------------------------
# Generation and teacher-forced log-probs.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)  # Arrays inside: no elementwise ==, no hash.
class Replies:
  """A model's replies to N prompt records (what `generate_replies` returns).

  Attributes:
    texts: the reply texts, decoded up to the first stop token (exclusive).
    ended_turn: bool [N], the reply ended with the format's end of turn (jaxlm ``<|end|>``, not
      ``</s>``, not cut off).
    prompt_ids: N int32 arrays, the rendered prompts as fed to the sampler (left-truncated).
    reply_ids: N int32 arrays, the emitted tokens, the stop token included.
    lengths: int32 [N], len(reply_ids[i]).
    log_probs: float32 [N], the sampler's summed log-probs of the reply tokens (under the
      distribution sampled from: after temperature and truncation; see `jaxlm.sampling`).
  """

  texts: list[str]
  ended_turn: np.ndarray
  prompt_ids: list[np.ndarray]
  reply_ids: list[np.ndarray]
  lengths: np.ndarray
  log_probs: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)


def reply_from_ids(tokenizer, ids: Sequence[int] | np.ndarray) -> tuple[str, bool]:
  """(text, ended_turn) of sampled ids: text up to the first of the chat format's stop ids.

  ended_turn is True only when that first stop is the format's end of turn (jaxlm: ``<|end|>``,
  Llama 3: ``<|eot_id|>``): the chat template closes every trained reply with it, so a reply
  that stops on another stop id (jaxlm's ``</s>``, Llama 3's ``<|end_of_text|>``) is not a
  well-formed turn (nor is one cut off by the length limit).
  """
  reply = tokenizer.chat_format.parse_reply(ids)
  return reply.text, reply.ended_turn


def generate_replies(params, config: model_lib.ModelConfig, tokenizer,
                     prompt_records: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                     rng: jax.Array,
                     sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
                     batch_size: int = 64) -> Replies:
  """Samples one reply per prompt record: render, left-truncate, batch, generate, decode.

  Args:
    params: plain model params.
    config: the model config.
    tokenizer: a `jaxlm.tokenizer.Tokenizer`.
    prompt_records: ``{"prompt": [messages], ...}`` records (`jaxlm.data.schemas`).
    max_new_tokens: the reply budget N; a prompt keeps at most ``max_len - N`` tokens (<s> and
      its last ones).
    rng: a PRNG key (typed or raw); see the module docstring for how rows get their keys.
    sampling: the `SamplingConfig`.
    batch_size: prompts per sampler call; the last call is padded with dummy rows.

  Returns:
    `Replies`, in the order of `prompt_records`. Generation stops at the chat format's
    `stop_ids` (jaxlm: ``<|end|>`` or ``</s>``).
  """
  room = config.max_len - max_new_tokens
  if room < 2:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within the "
                     f"model's max_len {config.max_len}")
  prompts = [chat_template.render_prompt(tokenizer, r["prompt"], where=f"prompt {i}")
             for i, r in enumerate(prompt_records)]
  prompts = [left_truncate(p, room, bos_id=tokenizer.bos_id) for p in prompts]
  width = _bucket(max((len(p) for p in prompts), default=1), room)
  # Dispatch every batch before reading any back, so host work overlaps device work.
  outputs = []
  for call, start in enumerate(range(0, len(prompts), batch_size)):
    tokens, lengths = _pad(prompts[start:start + batch_size], batch_size, width,
                           _filler_id(tokenizer))
    out = sampling_lib.generate(params, tokens, lengths, jax.random.fold_in(rng, call),
                                config=config, sampling=sampling, max_new_tokens=max_new_tokens,
                                stop_ids=tokenizer.chat_format.stop_ids)
    outputs.append((out.tokens, out.lengths, out.log_probs))
  reply_ids, log_probs = [], []
  for call, (tokens, lengths, token_log_probs) in enumerate(jax.device_get(outputs)):
    for b in range(min(batch_size, len(prompts) - call * batch_size)):
      # A row emits from step 0 until it stops: its tokens are the first `lengths[b]`.
      reply_ids.append(np.asarray(tokens[b, : lengths[b]], np.int32))
      log_probs.append(np.sum(token_log_probs[b, : lengths[b]], dtype=np.float32))
  parsed = [reply_from_ids(tokenizer, ids) for ids in reply_ids]
  return Replies(texts=[text for text, _ in parsed],
                 ended_turn=np.asarray([ended for _, ended in parsed], bool),
                 prompt_ids=prompts, reply_ids=reply_ids,
                 lengths=np.asarray([len(r) for r in reply_ids], np.int32),
                 log_probs=np.asarray(log_probs, np.float32))


@functools.partial(jax.jit, static_argnames="config")
def _reply_log_probs(params, tokens: jax.Array, prompt_lengths: jax.Array,
                     total_lengths: jax.Array, *, config: model_lib.ModelConfig) -> jax.Array:
  """sum_{p <= j < total} log p(tokens[j] | tokens[:j]) per row: tokens [B, W] -> float32 [B]."""
  logits = model_lib.Transformer(config).apply({"params": params}, tokens).logits
  # The logits at j predict token j + 1; the last column's target is a dummy, always masked.
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  log_probs = losses.token_log_probs(logits=logits, targets=targets)
  target_index = jnp.arange(1, tokens.shape[1] + 1)[None, :]
  mask = (target_index >= prompt_lengths[:, None]) & (target_index < total_lengths[:, None])
  return jnp.sum(jnp.where(mask, log_probs, 0.0), axis=-1)


def sequence_log_probs(params, config: model_lib.ModelConfig, prompt_ids: Sequence[np.ndarray],
                       reply_ids: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
  """Teacher-forced log pi(reply | prompt) = sum_t log pi(y_t | prompt, y_<t), float32 [N].

  The training forward pass over prompt + reply (positions 0.., as the sampler uses them), so
  at temperature 1 without truncation this equals the sampler's summed log-probs.

  Args:
    params: plain model params (the policy's or the reference's).
    config: the model config.
    prompt_ids: N int arrays, e.g. `Replies.prompt_ids`.
    reply_ids: N int arrays, e.g. `Replies.reply_ids` (an empty reply scores 0).
    batch_size: rows per forward pass (memory: the logits are [batch_size, W, V] float32).
  """
  prompt_lengths = [len(p) for p in prompt_ids]
  sequences = [np.concatenate([np.asarray(p, np.int32), np.asarray(r, np.int32)])
               for p, r in zip(prompt_ids, reply_ids, strict=True)]
  longest = max((len(s) for s in sequences), default=1)
  if longest > config.max_len:
    raise ValueError(f"a prompt + reply of {longest} tokens exceeds max_len {config.max_len}")
  width = _bucket(longest, config.max_len)
  scores = []
  for start in range(0, len(sequences), batch_size):
    # No tokenizer here: a dummy row's lone token can be any id, since it scores nothing.
    tokens, total = _pad(sequences[start:start + batch_size], batch_size, width, 0)
    chunk = prompt_lengths[start:start + batch_size]
    # Dummy rows get prompt = total = 1: no target falls in [1, 1), so they score 0.
    prompt = np.ones((batch_size,), np.int32)
    prompt[: len(chunk)] = chunk
    scores.append(_reply_log_probs(params, tokens, prompt, total, config=config))
  scores = np.concatenate([np.asarray(x) for x in jax.device_get(scores)] or [np.zeros(0)])
  return scores[: len(sequences)].astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Scoring and the evaluation.
# ------------------------------------------------------------------------------------------------
def win_rate(scores: np.ndarray, baseline_scores: np.ndarray) -> float:
  """mean_i 1[s_i > b_i] + 0.5 * 1[s_i == b_i]: P(policy beats baseline), ties counting half."""
  scores, baseline_scores = np.asarray(scores), np.asarray(baseline_scores)
  if scores.shape != baseline_scores.shape or not scores.size:
    raise ValueError(f"win_rate needs two equal, non-empty shapes, got {scores.shape} and "
                     f"{baseline_scores.shape}")
  return float(np.mean((scores > baseline_scores) + 0.5 * (scores == baseline_scores)))


def _check_win_rate_judge(judge: Judge | None, gold: np.ndarray, wants_win_rate: bool) -> None:
  if wants_win_rate and judge is None and not gold.any():
    raise errors.ConfigError("eval.judge", "a win rate against the baseline needs a judge: none was given "
                             "and no eval prompt has a world gold reward; set config.eval.judge to a "
                             "reward-model run directory")


def correct_by_domain(prompt_records: Sequence[Mapping[str, Any]], correct: np.ndarray,
                      judged: np.ndarray) -> dict[str, float]:
  """``correct/<domain>``: the correct fraction per world task domain (arithmetic, list, country, ...).

  A mean over hundreds of mixed tasks can hide that a method learned one kind of task (sums,
  which generalise from the training prompts) and not another (facts about subjects the
  training prompts never named). Records without a domain in their meta are left out.
  """
  domains = np.asarray([str(r.get("meta", {}).get("domain", "")) if judged[i] else ""
                        for i, r in enumerate(prompt_records)])
  return {f"correct/{d}": float(np.mean(correct[domains == d])) for d in sorted(set(domains) - {""})}


def score_replies(prompt_records: Sequence[Mapping[str, Any]], replies: Replies, *,
                  judge: Judge | None = None, baseline: Replies | None = None,
                  log_ratios: np.ndarray | None = None) -> tuple[dict[str, float], list[dict]]:
  """Metrics and sample rows of replies already generated (the host half of `evaluate_policy`).

  Args:
    prompt_records: the N records the replies answer.
    replies: the policy's `Replies`.
    judge: scores every reply (`reward`) and decides the win rate; None: the gold reward
      decides it, over the world records.
    baseline: another model's `Replies` to the same records, for `win_rate`.
    log_ratios: float [N], log pi(y_i|x_i) - log ref(y_i|x_i) per reply, for `kl`.

  Returns:
    (metrics, rows). Metrics as in the module docstring; keys whose inputs are absent are left
    out (no `gold_reward` without world records, no `kl` without log_ratios, ...). Rows, one
    per prompt, JSON-ready: ``prompt`` (the messages), ``reply``, ``ended_turn``, ``length``,
    and where known ``gold_reward``, ``correct``, ``reward``, ``kl``, ``baseline_reply``,
    ``baseline_gold_reward``, ``baseline_reward``.
  """
  n = len(prompt_records)
  if not n:
    raise ValueError("no prompt records to evaluate")
  for name, other in (("replies", replies), ("baseline", baseline)):
    if other is not None and len(other) != n:
      raise ValueError(f"{name} has {len(other)} rows for {n} prompt records")
  has_gold = np.asarray([has_gold_reward(r) for r in prompt_records], bool)
  _check_win_rate_judge(judge, has_gold, baseline is not None)
  ended = np.asarray(replies.ended_turn, bool)
  metrics = {"num_prompts": float(n), "well_formed": float(ended.mean()),
             "length": float(np.mean(replies.lengths))}
  rows = [{"prompt": [dict(m) for m in r["prompt"]], "reply": text, "ended_turn": bool(e),
           "length": int(length)}
          for r, text, e, length in zip(prompt_records, replies.texts, ended, replies.lengths)]

  def add(key: str, values, where: np.ndarray, cast=float):
    for i in np.flatnonzero(where):
      rows[i][key] = cast(values[i])

  gold_index = np.flatnonzero(has_gold)

  def gold_of(r: Replies) -> np.ndarray:  # NaN where a record has no gold reward.
    scores = np.full(n, np.nan)
    scores[gold_index] = gold_judge([prompt_records[i] for i in gold_index],
                                    [r.texts[i] for i in gold_index],
                                    np.asarray(r.ended_turn, bool)[gold_index])
    return scores

  everywhere = np.ones(n, bool)
  if gold_index.size:
    gold = gold_of(replies)
    correct = np.zeros(n, bool)
    correct[gold_index] = [world_reward.is_correct(prompt_records[i], replies.texts[i])
                           for i in gold_index]
    metrics.update(gold_reward=float(gold[has_gold].mean()),
                   correct=float(correct[has_gold].mean()), num_gold=float(gold_index.size))
    add("gold_reward", gold, has_gold)
    add("correct", correct, has_gold, bool)
    metrics.update(correct_by_domain(prompt_records, correct, has_gold))
  if judge is not None:
    reward = np.asarray(judge(prompt_records, replies.texts, ended), np.float64)
    metrics["reward"] = float(reward.mean())
    add("reward", reward, everywhere)
  if log_ratios is not None:
    metrics["kl"] = float(np.mean(log_ratios))
    add("kl", np.asarray(log_ratios), everywhere)
  if baseline is not None:
    add("baseline_reply", baseline.texts, everywhere, str)
    if gold_index.size:
      baseline_gold = gold_of(baseline)
      add("baseline_gold_reward", baseline_gold, has_gold)
    if judge is not None:
      baseline_reward = np.asarray(
          judge(prompt_records, baseline.texts, np.asarray(baseline.ended_turn, bool)), np.float64)
      add("baseline_reward", baseline_reward, everywhere)
      ours, theirs = reward, baseline_reward
    else:  # Judged by the gold reward, over the world records only.
      ours, theirs = gold[has_gold], baseline_gold[has_gold]
    metrics["win_rate"] = win_rate(ours, theirs)
    metrics["tie_rate"] = float(np.mean(ours == theirs))
  return metrics, rows


def evaluate_policy(params, config: model_lib.ModelConfig, tokenizer,
                    prompt_records: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                    rng: jax.Array,
                    sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
                    judge: Judge | None = None, reference_params=None,
                    baseline: Replies | None = None,
                    batch_size: int = 64) -> tuple[dict[str, float], list[dict]]:
  """Samples the policy's replies to the prompts and scores them (see the module docstring).

  Args:
    params: plain policy params.
    config: the model config (of the policy and of the reference).
    tokenizer: a `jaxlm.tokenizer.Tokenizer`.
    prompt_records: ``{"prompt": [messages], "meta": ...}`` records; world records (a task in
      ``meta``) also get the gold metrics.
    max_new_tokens: the reply budget.
    rng: a PRNG key for sampling.
    sampling: the `SamplingConfig`; temperature 1 without truncation for an unbiased `kl`.
    judge: e.g. `reward_model_judge(...)` or `gold_judge`; gives `reward` and decides `win_rate`.
    reference_params: plain params of the reference (e.g. the SFT model), for `kl`.
    baseline: the baseline's `Replies` to the same records (e.g. `generate_replies` of the SFT
      model), for `win_rate`.
    batch_size: rows per sampler call and per teacher-forced forward pass.

  Returns:
    (metrics, rows) as `score_replies` returns them; the caller writes the rows to
    samples.jsonl.
  """
  prompt_records = list(prompt_records)
  if not prompt_records:
    raise ValueError("no prompt records to evaluate")
  # Fail before the expensive part if the win rate would have no judge.
  _check_win_rate_judge(judge, np.asarray([has_gold_reward(r) for r in prompt_records]), baseline is not None)
  replies = generate_replies(params, config, tokenizer, prompt_records,
                             max_new_tokens=max_new_tokens, rng=rng, sampling=sampling,
                             batch_size=batch_size)
  log_ratios = None
  if reference_params is not None:
    # Both sides teacher-forced (not the sampler's log-probs): see "KL estimator" above.
    log_pi, log_ref = [sequence_log_probs(p, config, replies.prompt_ids, replies.reply_ids,
                                          batch_size=batch_size)
                       for p in (params, reference_params)]
    log_ratios = log_pi - log_ref
  return score_replies(prompt_records, replies, judge=judge, baseline=baseline,
                       log_ratios=log_ratios)


class PolicyEvaluator:
  """Evaluates successive policies on fixed prompts against a fixed reference (the SFT model).

  The reference's replies (the win-rate baseline) are sampled once, with a key of their own:
  the policy's own replies are drawn with `rng`, so a policy equal to the reference wins about
  half the time, not always ties. Every evaluation uses the same `rng`, so the curves over
  training compare replies to the same prompts under the same sampler keys.
  """

  def __init__(self, reference_params, config: model_lib.ModelConfig, tokenizer,
               prompt_records: Sequence[Mapping[str, Any]], *, max_new_tokens: int, rng: jax.Array,
               sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
               judge: Judge | None = None, batch_size: int = 64):
    self.reference_params, self.config, self.tokenizer = reference_params, config, tokenizer
    self.prompt_records = list(prompt_records)
    self.kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, batch_size=batch_size)
    self.judge, self.rng = judge, rng
    # At start-up, not after training: data without a gold reward needs a judge.
    _check_win_rate_judge(judge, np.asarray([has_gold_reward(r) for r in self.prompt_records]), True)
    self.baseline = generate_replies(reference_params, config, tokenizer, self.prompt_records,
                                     rng=jax.random.fold_in(rng, 1_000_003), **self.kwargs)

  def reference_metrics(self) -> dict[str, float]:
    """The reference's own metrics (gold reward, reward, length, well-formed) on the prompts."""
    metrics, _ = score_replies(self.prompt_records, self.baseline, judge=self.judge)
    return metrics

  def __call__(self, params) -> tuple[dict[str, float], list[dict]]:
    """`evaluate_policy` of `params` against the reference: win rate, KL, gold reward, ..."""
    return evaluate_policy(params, self.config, self.tokenizer, self.prompt_records, rng=self.rng,
                           judge=self.judge, reference_params=self.reference_params,
                           baseline=self.baseline, **self.kwargs)
