"""Grain input pipelines, one per use: pretraining, SFT, preference pairs, prompts.

Every pipeline reads a random-access `RecordSource` (see `jaxlm.data.sources`) and returns a
`grain.IterDataset` of numpy batches. Iterating it gives a grain `DatasetIterator` whose
`get_state()` / `set_state()` checkpoint the exact position, so a resumed run sees exactly the
batches the interrupted one would have.

Order of operations, the same in every pipeline::

  record indices ─► this host's slice [i::n] ─► shuffle(seed), reshuffled each epoch ─► repeat
    ─► tokenize / render (+ truncate or drop, counted) ─► pack or pad ─► batch

* **Determinism.** Everything is a pure function of (source, seed, host index, host count):
  no wall-clock, no thread-order dependence (grain's threaded reads keep order).
* **Hosts.** Each host takes a disjoint, fixed slice of the records (`index::count`) and
  builds batches of `batch_size` rows; `batch_size` here is per host (global batch divided by
  `jax.process_count()`). The trainer turns the per-host batches into one global array.
* **Lengths.** Examples longer than the context are truncated or dropped (`length_policy`);
  an example that truncation would leave with nothing to train on (no trainable token, no room
  for the prompt) is dropped, with that reason. Nothing is dropped in silence:
  `count_examples(kind, source, tokenizer, **dataset_args)` makes one pass over every record
  of the source up front (no shuffle, no host slice) with the very renderers the datasets use,
  and returns `{"seen", "kept", "truncated", "dropped", "dropped_by_reason"}`;
  `format_counts` turns that into a log line and `needs_warning` says when more than 1% were
  cut or dropped. While iterating, `PipelineStats` counts the same things for what this host
  has read, and a pipeline that drops more than `max_drop_fraction` of what it has seen raises
  `DataError` instead of training on a sliver of the data.

Batch layouts (all int32 unless noted; padding is 0 everywhere, which is also the pad id):

**LM batches** (pretraining, SFT), shapes `[B, L]`::

  inputs        token ids fed to the model
  targets       the next token for every input position (shifted by one in the pipeline)
  loss_mask     bool; True where the target is trained on
  segment_ids   1, 2, ... per packed example; 0 for padding (attention never crosses segments)
  positions     position of each token within its own example (restarts at 0 per segment)

Pretraining packs documents `<bos> text <eos>` (`<eos> text <eos>` for a tokenizer without bos,
see `render_document`) with concat-then-split (a long document
continues in the next row); the loss covers every real target. SFT renders conversations with
the chat template, whose assistant-only mask becomes `loss_mask` (shifted with the targets), and
either packs whole conversations first-fit (`packing=True`; a conversation is never split) or
pads one per row.

**Pair batches** (reward model, DPO): for each side `s` in (`chosen`, `rejected`)::

  s_tokens      [B, L] the whole sequence prompt + response (+ <|end|>), unshifted
  s_loss_mask   [B, L] bool; True at response tokens, i.e. the tokens a policy is scored on
                (log p(tokens[t] | tokens[:t]) for t where the mask is True)
  s_segment_ids [B, L] 1 for real tokens, 0 for padding
  s_positions   [B, L]
  s_last_index  [B]    index of the response's last real token (its <|end|>): the reward model
                reads its scalar head there, never at a pad token

plus `record_index` [B] (the pair's index in the source, e.g. for its gold rewards in `meta`)
and `valid` [B] (False for padding rows of a final, partial batch).

Pairs are kept unshifted because the reward model reads the last token itself.

**Shared-prompt pair batches** (DPO, `layout="shared"`): one row per pair holds the prompt once,
then the chosen response, then the rejected response, so the prompt is run through the model
once instead of twice (on the world, 76 real tokens per pair instead of 110)::

  tokens        [B, L] prompt | chosen response | rejected response | 0 ...
  positions     [B, L] 0 .. P-1 over the prompt; each response continues from P, where it would
                sit in its own sequence
  segment_ids   [B, L] 1 for real tokens, 0 for padding
  branch_ids    [B, L] 0 prompt (and padding), 1 chosen, 2 rejected: a response attends to the
                prompt and to itself, never to the other response (`model.Transformer`)
  score_index   [B, S] for each response token, the index whose logits predict it: the previous
                token of its own response, or the prompt's last token for its first token
  score_targets [B, S] that response token
  score_side    [B, S] 1 chosen, 2 rejected, 0 for an unused slot

plus `record_index` and `valid` as above. L (`max_len`) bounds prompt + both responses; S
(`score_len`) bounds the two responses together, and the model computes logits at these S
positions only. Responses are never cut; the prompt is truncated from the left to fit.

**Prompt batches** (generation: PPO rollouts, evaluation)::

  prompt_tokens  [B, P] rendered prompt ending with <|assistant|>, right-padded with 0
  prompt_lengths [B]    number of real tokens
  record_index   [B]    index into the source, to look up the record (gold reward metadata)
  valid          [B]    bool; False for padding rows of a final, partial batch

Finite passes (`num_epochs=1`, used for evaluation) end with a batch padded to full size
(padding rows have an all-False mask / `valid=False`) so that shapes never change.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from jaxlm import chat_template
from jaxlm.data.errors import DataError
from jaxlm.tokenizer import bos_prefix

LENGTH_POLICIES = ("truncate", "drop")
PIPELINE_KINDS = ("pretraining", "sft", "pairs", "prompts")

# Why an example is dropped: the keys of `dropped_by_reason` (`count_examples`, `PipelineStats`).
REASON_LONGER_THAN_MAX_LEN = "longer than max_len"  # sft, pairs: length_policy="drop"
REASON_NO_TRAINABLE_TOKEN = "no trainable token left after truncation"  # sft: only prompt turns fit
REASON_NO_ROOM_FOR_PROMPT = "responses leave no room for the prompt"  # pairs: not even <bos> <|assistant|> fits
REASON_LONGER_THAN_SCORE_LEN = "responses longer than score_len"  # pairs, layout="shared"
REASON_LONGER_THAN_MAX_PROMPT_LEN = "longer than max_prompt_len"  # prompts: length_policy="drop"
DROP_REASONS = (REASON_LONGER_THAN_MAX_LEN, REASON_NO_TRAINABLE_TOKEN, REASON_NO_ROOM_FOR_PROMPT,
                REASON_LONGER_THAN_SCORE_LEN, REASON_LONGER_THAN_MAX_PROMPT_LEN)


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which slice of the records this host reads: records `index::count`."""

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"HostShard index {self.index} not in [0, {self.count})")

  @classmethod
  def from_jax(cls) -> "HostShard":
    import jax  # Deferred so data-only tools do not initialise a JAX backend.

    return cls(jax.process_index(), jax.process_count())


class PipelineStats:
  """Counts of what a pipeline did with each record: kept whole, truncated, or dropped (why).

  Thread-safe, since grain may map records on several threads. `check()` raises when more than
  `max_drop_fraction` of the records seen were dropped, once at least `min_seen` were seen, so a
  context length that is far too short fails loudly instead of silently training on the few
  examples that fit.
  """

  def __init__(self, name: str, *, max_drop_fraction: float = 0.5, min_seen: int = 200):
    self.name = name
    self.max_drop_fraction = max_drop_fraction
    self.min_seen = min_seen
    self.seen = 0
    self.truncated = 0
    self.dropped: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def record(self, *, truncated: bool = False, dropped: str | None = None) -> None:
    with self._lock:
      self.seen += 1
      self.truncated += int(truncated)
      if dropped:
        self.dropped[dropped] += 1
      self._check()

  def _check(self) -> None:
    n_dropped = sum(self.dropped.values())
    if self.seen >= self.min_seen and n_dropped > self.max_drop_fraction * self.seen:
      raise DataError(
          self.name,
          f"dropped {n_dropped} of the first {self.seen} examples ({dict(self.dropped)}); "
          "raise the maximum length, or use length_policy='truncate'")

  def summary(self) -> dict[str, Any]:
    """{"seen", "kept", "truncated", "dropped", "dropped_by_reason"}: the `count_examples` keys."""
    with self._lock:
      dropped = sum(self.dropped.values())
      return {"seen": self.seen, "kept": self.seen - dropped, "truncated": self.truncated, "dropped": dropped,
              "dropped_by_reason": dict(self.dropped)}

  def record_outcome(self, example: Any, outcome: bool | str) -> None:
    """Records a renderer's `(example, outcome)`: outcome is truncated? when kept, else why dropped."""
    self.record(truncated=example is not None and outcome is True,
                dropped=None if example is not None else outcome)

  def __repr__(self) -> str:
    return f"PipelineStats({self.name}: {self.summary()})"


# ---------------------------------------------------------------------------------------------
# Shared building blocks.
# ---------------------------------------------------------------------------------------------


def _indexed_records(source, *, seed: int, shard: HostShard, shuffle: bool,
                     num_epochs: int | None) -> grain.MapDataset:
  """(source index, record) pairs for this host, shuffled per epoch, repeated."""
  if len(source) == 0:
    raise DataError(getattr(source, "description", ""), "the source has no records")
  indices = grain.MapDataset.range(len(source))[shard.index::shard.count]
  if len(indices) == 0:
    raise DataError(getattr(source, "description", ""),
                    f"{len(source)} records cannot be split over {shard.count} hosts")
  if shuffle:
    indices = indices.shuffle(seed=seed)
  # `repeat` reseeds the shuffle each epoch, so every epoch has a new order.
  return indices.repeat(num_epochs).map(lambda i: (int(i), source[int(i)]))


def _where(source, index: int) -> str:
  return f"{getattr(source, 'description', 'source')}[{index}]"


def _to_iter(ds: grain.MapDataset, num_threads: int) -> grain.IterDataset:
  # Threads overlap tokenisation with the training step; grain keeps the order deterministic.
  # Dropped examples are None, which `to_iter_dataset` skips (allow_nones=False).
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * max(1, num_threads)))


def _check_policy(length_policy: str) -> None:
  if length_policy not in LENGTH_POLICIES:
    raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}")


def _pad_batch_fn(batch_size: int) -> Callable[[Sequence[Mapping[str, np.ndarray]]], dict[str, np.ndarray]]:
  """Stacks examples and zero-pads a final, short batch to `batch_size` rows."""

  def stack(examples):
    out = {}
    for key in examples[0]:
      arr = np.stack([np.asarray(e[key]) for e in examples])
      if len(examples) < batch_size:
        pad = np.zeros((batch_size - len(examples),) + arr.shape[1:], arr.dtype)
        arr = np.concatenate([arr, pad])
      out[key] = arr
    return out

  return stack


def _batch(ds: grain.IterDataset, batch_size: int, finite: bool) -> grain.IterDataset:
  # Infinite streams never end, so drop_remainder changes nothing there; finite passes keep
  # their last examples, padded so that jitted consumers see a single shape.
  return ds.batch(batch_size, drop_remainder=False, batch_fn=_pad_batch_fn(batch_size) if finite else None)


def _pad_to(x: np.ndarray, length: int, dtype=np.int32) -> np.ndarray:
  out = np.zeros((length,), dtype)
  out[: len(x)] = x
  return out


# ---------------------------------------------------------------------------------------------
# Pretraining.
# ---------------------------------------------------------------------------------------------


def render_document(tokenizer, record) -> tuple[dict[str, np.ndarray], bool]:
  """A text record -> (shifted example, False): `<bos> ids <eos>`, never truncated nor dropped.

  Even an empty text keeps one trained target (<eos> after <bos>); a long document is not cut,
  it continues in the next packed row. A tokenizer without bos (Qwen) gives `<eos> ids <eos>`:
  such models were pretrained on documents separated by their end-of-text token, so it is what
  a document follows, and the first text token stays a target (an empty text still trains
  one <eos>).
  """
  opening = bos_prefix(tokenizer) or [tokenizer.eos_id]
  ids = np.asarray(opening + tokenizer.encode(record["text"]) + [tokenizer.eos_id], np.int32)
  return {"inputs": ids[:-1], "targets": ids[1:]}, False


def pretraining_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                        shard: HostShard = HostShard(), num_epochs: int | None = None,
                        shuffle: bool = True, stats: PipelineStats | None = None,
                        num_threads: int = 2) -> grain.IterDataset:
  """Packed next-token batches from a `text` source: an LM batch of shape [batch_size, seq_len].

  Each document becomes `<bos> ids <eos>`; inputs are all but its last token and targets all
  but its first, so a target never belongs to another document. Documents are then packed with
  concat-then-split: rows are always full except the very last of a finite pass.
  """
  render = _renderer("pretraining", source, tokenizer, seq_len=seq_len)
  records = _indexed_records(source, seed=seed, shard=shard, shuffle=shuffle, num_epochs=num_epochs)
  docs = _to_iter(records.map(_recording(render, stats)), num_threads)
  packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"inputs": seq_len, "targets": seq_len})
  return _batch(packed.map(_lm_layout), batch_size, finite=num_epochs is not None)


def _lm_layout(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed features -> the LM batch layout (one segment_ids / positions per row)."""
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  loss_mask = packed["loss_mask"].astype(bool) if "loss_mask" in packed else segment_ids > 0
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "loss_mask": loss_mask & (segment_ids > 0),
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"].astype(np.int32),
  }


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning.
# ---------------------------------------------------------------------------------------------


def render_sft_example(tokenizer, record, *, max_len: int, length_policy: str, where: str):
  """One chat record -> (shifted example, truncated?) or (None, reason) when it is dropped.

  The example has `inputs`, `targets`, `loss_mask` of one length <= max_len. Truncation keeps
  the first max_len + 1 tokens (the start of the conversation is what later turns depend on).
  """
  ids, mask = chat_template.render_chat(tokenizer, record["messages"], where=where)
  truncated = len(ids) > max_len + 1
  if truncated:
    if length_policy == "drop":
      return None, REASON_LONGER_THAN_MAX_LEN
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if not mask[1:].any():
      return None, REASON_NO_TRAINABLE_TOKEN
  example = {"inputs": ids[:-1].astype(np.int32), "targets": ids[1:].astype(np.int32),
             "loss_mask": mask[1:].astype(np.int32)}
  return example, truncated


def sft_dataset(source, tokenizer, *, max_len: int, batch_size: int, seed: int = 0,
                shard: HostShard = HostShard(), num_epochs: int | None = None, shuffle: bool = True,
                packing: bool = True, length_policy: str = "truncate", num_packing_bins: int | None = None,
                stats: PipelineStats | None = None, num_threads: int = 2) -> grain.IterDataset:
  """Chat batches with the assistant-only loss mask: an LM batch of shape [batch_size, max_len].

  With `packing`, whole conversations are packed first-fit into rows (several per row, none
  split), which wastes far fewer positions on padding than one conversation per row.
  """
  render = _renderer("sft", source, tokenizer, max_len=max_len, length_policy=length_policy)
  stats = stats if stats is not None else PipelineStats(f"sft:{getattr(source, 'description', '')}")
  records = _indexed_records(source, seed=seed, shard=shard, shuffle=shuffle, num_epochs=num_epochs)
  examples = _to_iter(records.map(_recording(render, stats)), num_threads)
  if packing:
    features = ("inputs", "targets", "loss_mask")
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={k: max_len for k in features},
        num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=False)
    rows = packed.map(_lm_layout)
  else:
    rows = examples.map(lambda e: _pad_lm_example(e, max_len))
  return _batch(rows, batch_size, finite=num_epochs is not None)


def _pad_lm_example(example: Mapping[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
  n = len(example["inputs"])
  return {
      "inputs": _pad_to(example["inputs"], max_len),
      "targets": _pad_to(example["targets"], max_len),
      "loss_mask": _pad_to(example["loss_mask"], max_len, bool),
      "segment_ids": _pad_to(np.ones(n, np.int32), max_len),
      "positions": _pad_to(np.arange(n, dtype=np.int32), max_len),
  }


# ---------------------------------------------------------------------------------------------
# Preference pairs.
# ---------------------------------------------------------------------------------------------


def _fit_prompt(prompt_ids: np.ndarray, budget: int, bos_id: int | None) -> np.ndarray | None:
  """Keeps the last `budget` tokens of a prompt, or None if < 2 fit.

  A prompt that starts with `bos_id` keeps it in front (the model never saw a chat without
  it); without bos (`bos_id` None, or a prompt not starting with it) only the tail is kept.
  """
  if len(prompt_ids) <= budget:
    return prompt_ids
  if budget < 2:
    return None
  if bos_id is None or not len(prompt_ids) or prompt_ids[0] != bos_id:
    return np.asarray(prompt_ids[len(prompt_ids) - budget:], np.int32)
  return np.concatenate([[bos_id], prompt_ids[len(prompt_ids) - (budget - 1):]]).astype(np.int32)


def _prompt_within(prompt: np.ndarray, budget: int, bos_id: int | None, length_policy: str, *,
                   unfit: str, too_long: str = REASON_LONGER_THAN_MAX_LEN) -> tuple[np.ndarray | None, bool | str]:
  """(prompt, truncated?) with the prompt cut from the left to `budget`, or (None, why not).

  `too_long` is the reason under length_policy="drop"; `unfit` when truncation cannot keep the
  <bos> and at least the prompt's last token (its <|assistant|>).
  """
  if len(prompt) <= budget:
    return prompt, False
  if length_policy == "drop":
    return None, too_long
  fitted = _fit_prompt(prompt, budget, bos_id)
  return (fitted, True) if fitted is not None else (None, unfit)


def render_pair(tokenizer, record, *, max_len: int, length_policy: str, where: str = ""):
  """A preference record -> (pair example, truncated?) or (None, reason).

  Both sides share one prompt, truncated from the left (the latest turns matter most for the
  response) to leave room for the longer response; a response is never cut, since its last
  token is where the reward model reads.
  """
  prompt = chat_template.render_prompt(tokenizer, record["prompt"], where=where)
  responses = {side: chat_template.render_response(tokenizer, record[side]) for side in ("chosen", "rejected")}
  budget = max_len - max(len(r) for r in responses.values())
  prompt, truncated = _prompt_within(prompt, budget, tokenizer.bos_id, length_policy,
                                     unfit=REASON_NO_ROOM_FOR_PROMPT)
  if prompt is None:
    return None, truncated
  example = {}
  for side, response in responses.items():
    tokens = np.concatenate([prompt, response]).astype(np.int32)
    n = len(tokens)
    example[f"{side}_tokens"] = _pad_to(tokens, max_len)
    example[f"{side}_loss_mask"] = _pad_to(np.arange(n) >= len(prompt), max_len, bool)
    example[f"{side}_segment_ids"] = _pad_to(np.ones(n, np.int32), max_len)
    example[f"{side}_positions"] = _pad_to(np.arange(n, dtype=np.int32), max_len)
    example[f"{side}_last_index"] = np.int32(n - 1)
  example["valid"] = np.bool_(True)
  return example, truncated


def shared_pair_example(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, *, max_len: int,
                        score_len: int) -> dict[str, np.ndarray]:
  """Token ids of a prompt and its two responses -> one shared-prompt pair example (padded).

  The caller has made them fit: len(prompt) + len(chosen) + len(rejected) <= max_len and
  len(chosen) + len(rejected) <= score_len, each response at least one token.
  """
  p, c = len(prompt), len(chosen)
  scored = c + len(rejected)
  n = p + scored
  if n > max_len or scored > score_len or not (p and c and len(rejected)):
    raise ValueError(f"a pair of {p} + {c} + {len(rejected)} tokens does not fit max_len={max_len}, "
                     f"score_len={score_len}")
  branch = np.concatenate([np.zeros(p, np.int32), np.ones(c, np.int32), np.full(len(rejected), 2, np.int32)])
  positions = np.concatenate([np.arange(p), p + np.arange(c), p + np.arange(len(rejected))])
  # Token at index i (a response token) is predicted by the logits at i - 1, except each
  # response's first token, which the prompt's last token (index p - 1) predicts.
  response_index = np.arange(p, n)
  score_index = response_index - 1
  score_index[c] = p - 1  # the rejected response's first token
  example = {
      "tokens": _pad_to(np.concatenate([prompt, chosen, rejected]), max_len),
      "positions": _pad_to(positions, max_len),
      "segment_ids": _pad_to(np.ones(n, np.int32), max_len),
      "branch_ids": _pad_to(branch, max_len),
      "score_index": _pad_to(score_index, score_len),
      "score_targets": _pad_to(np.concatenate([chosen, rejected]), score_len),
      "score_side": _pad_to(branch[p:], score_len),
      "valid": np.bool_(True),
  }
  return example


def render_shared_pair(tokenizer, record, *, max_len: int, score_len: int, length_policy: str,
                       where: str = ""):
  """A preference record -> (shared-prompt pair example, truncated?) or (None, reason).

  Layout in the module docstring. Both responses are kept whole (at most `score_len` tokens
  together); the prompt is truncated from the left to the `max_len` left over.
  """
  prompt = chat_template.render_prompt(tokenizer, record["prompt"], where=where)
  chosen = chat_template.render_response(tokenizer, record["chosen"])
  rejected = chat_template.render_response(tokenizer, record["rejected"])
  scored = len(chosen) + len(rejected)
  if scored > score_len:
    return None, REASON_LONGER_THAN_SCORE_LEN
  prompt, truncated = _prompt_within(prompt, max_len - scored, tokenizer.bos_id, length_policy,
                                     unfit=REASON_NO_ROOM_FOR_PROMPT)
  if prompt is None:
    return None, truncated
  return shared_pair_example(prompt, chosen, rejected, max_len=max_len, score_len=score_len), truncated


PAIR_LAYOUTS = ("sides", "shared")


def pairs_dataset(source, tokenizer, *, max_len: int, batch_size: int, seed: int = 0,
                  shard: HostShard = HostShard(), num_epochs: int | None = None, shuffle: bool = True,
                  length_policy: str = "truncate", stats: PipelineStats | None = None,
                  num_threads: int = 2, layout: str = "sides", score_len: int | None = None) -> grain.IterDataset:
  """Preference-pair batches (layouts in the module docstring).

  `layout="sides"` (the reward model): one row of `max_len` per side. `layout="shared"` (DPO):
  one row of `max_len` per pair holding the prompt once, with `score_len` scored slots.
  """
  render = _renderer("pairs", source, tokenizer, max_len=max_len, length_policy=length_policy, layout=layout,
                     score_len=score_len)
  stats = stats if stats is not None else PipelineStats(f"pairs:{getattr(source, 'description', '')}")
  records = _indexed_records(source, seed=seed, shard=shard, shuffle=shuffle, num_epochs=num_epochs)
  examples = _to_iter(records.map(_recording(render, stats)), num_threads)
  return _batch(examples, batch_size, finite=num_epochs is not None)


# ---------------------------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------------------------


def prompts_dataset(source, tokenizer, *, max_prompt_len: int, batch_size: int, seed: int = 0,
                    shard: HostShard = HostShard(), num_epochs: int | None = None, shuffle: bool = True,
                    length_policy: str = "truncate", stats: PipelineStats | None = None,
                    num_threads: int = 2) -> grain.IterDataset:
  """Right-padded prompt batches for generation (layout in the module docstring).

  Works on `prompt` records and on `preference` records (their prompt). Long prompts keep
  their last tokens behind the <bos>, so the latest user turn is always there.
  """
  render = _renderer("prompts", source, tokenizer, max_prompt_len=max_prompt_len, length_policy=length_policy)
  stats = stats if stats is not None else PipelineStats(f"prompts:{getattr(source, 'description', '')}")
  records = _indexed_records(source, seed=seed, shard=shard, shuffle=shuffle, num_epochs=num_epochs)
  examples = _to_iter(records.map(_recording(render, stats)), num_threads)
  return _batch(examples, batch_size, finite=num_epochs is not None)


def render_prompt_example(tokenizer, record, *, max_prompt_len: int, length_policy: str, where: str = ""):
  """A prompt (or preference) record -> (prompt example, truncated?) or (None, reason).

  A long prompt keeps its last tokens behind the <bos> (it always ends with <|assistant|>).
  """
  ids = chat_template.render_prompt(tokenizer, record["prompt"], where=where)
  ids, outcome = _prompt_within(ids, max_prompt_len, tokenizer.bos_id, length_policy,
                                too_long=REASON_LONGER_THAN_MAX_PROMPT_LEN,
                                unfit=REASON_LONGER_THAN_MAX_PROMPT_LEN)  # (max_prompt_len >= 2: unreachable)
  if ids is None:
    return None, outcome
  return {"prompt_tokens": _pad_to(ids, max_prompt_len), "prompt_lengths": np.int32(len(ids)),
          "valid": np.bool_(True)}, outcome


# ---------------------------------------------------------------------------------------------
# One renderer per pipeline kind, shared by the datasets and by `count_examples`.
# ---------------------------------------------------------------------------------------------

# The dataset arguments each kind's renderer depends on; every other dataset argument (batch
# size, seed, shard, epochs, shuffle, packing, threads, stats) changes the order or the layout
# of the batches, never whether an example is kept, cut or dropped.
_RENDER_ARGS = {
    "pretraining": (),
    "sft": ("max_len", "length_policy"),
    "pairs": ("max_len", "length_policy", "layout", "score_len"),
    "prompts": ("max_prompt_len", "length_policy"),
}

_Renderer = Callable[[int, Any], tuple[Any, "bool | str"]]


def _renderer(kind: str, source, tokenizer, **args) -> _Renderer:
  """`render(index, record) -> (example, truncated?)` or `(None, reason dropped)` for `kind`.

  Checks the length arguments (ValueError), so a dataset and its count fail alike.
  """
  if kind not in PIPELINE_KINDS:
    raise ValueError(f"kind must be one of {PIPELINE_KINDS}, got {kind!r}")
  if kind != "pretraining":
    _check_policy(args["length_policy"])
  if kind == "pretraining":
    return lambda index, record: render_document(tokenizer, record)
  if kind == "sft":
    max_len, policy = args["max_len"], args["length_policy"]
    return lambda index, record: render_sft_example(tokenizer, record, max_len=max_len, length_policy=policy,
                                                    where=_where(source, index))
  if kind == "pairs":
    max_len, policy, layout, score_len = args["max_len"], args["length_policy"], args["layout"], args["score_len"]
    if layout not in PAIR_LAYOUTS:
      raise ValueError(f"layout must be one of {PAIR_LAYOUTS}, got {layout!r}")
    if layout == "shared" and not (score_len and 0 < score_len < max_len):
      raise ValueError(f"the shared layout needs 0 < score_len < max_len ({max_len}), got {score_len!r}")

    def render_pair_at(index, record):
      if layout == "shared":
        example, outcome = render_shared_pair(tokenizer, record, max_len=max_len, score_len=score_len,
                                              length_policy=policy, where=_where(source, index))
      else:
        example, outcome = render_pair(tokenizer, record, max_len=max_len, length_policy=policy,
                                       where=_where(source, index))
      if example is not None:
        example["record_index"] = np.int32(index)
      return example, outcome

    return render_pair_at
  max_prompt_len, policy = args["max_prompt_len"], args["length_policy"]
  if max_prompt_len < 2:
    raise ValueError(f"max_prompt_len must be >= 2 (<bos> ... <|assistant|>), got {max_prompt_len}")

  def render_prompt_at(index, record):
    example, outcome = render_prompt_example(tokenizer, record, max_prompt_len=max_prompt_len, length_policy=policy,
                                             where=_where(source, index))
    if example is not None:
      example["record_index"] = np.int32(index)
    return example, outcome

  return render_prompt_at


def _recording(render: _Renderer, stats: PipelineStats | None) -> Callable[[tuple[int, Any]], Any]:
  """A grain map fn: (index, record) -> the example, or None when dropped; counted in `stats`."""

  def step(item):
    index, record = item
    example, outcome = render(index, record)
    if stats is not None:
      stats.record_outcome(example, outcome)
    return example

  return step


# ---------------------------------------------------------------------------------------------
# Up-front counts: what a pipeline will keep, cut and drop, before training on it.
# ---------------------------------------------------------------------------------------------


_COUNT_READ_CHUNK = 256  # records per batched read


def _dataset_fn(kind: str) -> Callable:
  return {"pretraining": pretraining_dataset, "sft": sft_dataset, "pairs": pairs_dataset,
          "prompts": prompts_dataset}[kind]


def count_examples(kind: str, source, tokenizer, **dataset_args) -> dict[str, Any]:
  """One pass over every record of `source`: how many the `kind` pipeline keeps, cuts and drops.

  Uses the very renderer of the dataset function (`pretraining_dataset`, `sft_dataset`,
  `pairs_dataset`, `prompts_dataset` for kind "pretraining", "sft", "pairs", "prompts"), over
  the whole source in order: no shuffle, no host slice (every host gets the same numbers, for
  the whole data set), each record once. Never raises for drops (unlike the datasets past
  `max_drop_fraction`): it reports them.

  Args:
    kind: one of `PIPELINE_KINDS`.
    source: a `RecordSource` of the kind's records.
    tokenizer: the jaxlm tokenizer the dataset uses.
    **dataset_args: the keyword arguments of the kind's dataset function, with the same
      defaults: the length arguments matter (sft: `max_len`, `length_policy`; pairs: `max_len`,
      `length_policy`, `layout`, `score_len`; prompts: `max_prompt_len`, `length_policy`), the
      rest (`batch_size`, `seed`, `shard`, `packing`, ...) are accepted and ignored, so the
      dict a stage passes to its dataset can be passed here as is. An unknown name is a
      TypeError, as is a missing `max_len` / `max_prompt_len`.

  Returns:
    `{"seen": n, "kept": n, "truncated": n, "dropped": n, "dropped_by_reason": {reason: n}}`:
    seen = len(source); kept = seen - dropped; truncated counts kept examples that were cut
    (a conversation's tail, a pair's or prompt's oldest prompt tokens); dropped sums
    `dropped_by_reason`, whose keys are among `DROP_REASONS`. Pretraining never truncates nor
    drops (a long document continues in the next row; an empty one still trains <eos>).
    The same keys as `PipelineStats.summary()`; plain ints, ready for JSON.
  """
  if kind not in PIPELINE_KINDS:
    raise ValueError(f"kind must be one of {PIPELINE_KINDS}, got {kind!r}")
  fn = _dataset_fn(kind)
  try:
    bound = inspect.signature(fn).bind_partial(source, tokenizer, **dataset_args)
  except TypeError as e:
    raise TypeError(f"count_examples({kind!r}): {e} (the arguments of {fn.__name__})") from None
  bound.apply_defaults()
  args = {name: bound.arguments.get(name) for name in _RENDER_ARGS[kind]}
  missing = [name for name in ("max_len", "max_prompt_len") if name in args and args[name] is None]
  if missing:
    raise TypeError(f"count_examples({kind!r}) needs {', '.join(missing)}")
  render = _renderer(kind, source, tokenizer, **args)
  stats = PipelineStats(f"{kind}:{getattr(source, 'description', '')}", max_drop_fraction=1.0)
  # A plain loop over batched reads: reading and rendering are Python-bound (the GIL), so grain's
  # threads only add overhead (2 cores, 20k world chats at max_len 128: 0.19-0.23 s per 1k
  # records this way, 0.35-0.50 s with grain's map on 1-4 threads).
  read_many = getattr(source, "__getitems__", None)
  for start in range(0, len(source), _COUNT_READ_CHUNK):
    indices = range(start, min(start + _COUNT_READ_CHUNK, len(source)))
    records = read_many(list(indices)) if read_many is not None else [source[i] for i in indices]
    for index, record in zip(indices, records):
      stats.record_outcome(*render(index, record))
  return stats.summary()


def needs_warning(counts: Mapping[str, Any], threshold: float = 0.01) -> bool:
  """True when more than `threshold` of the examples seen were truncated or dropped."""
  seen = counts["seen"]
  return seen > 0 and (counts["truncated"] + counts["dropped"]) > threshold * seen


def format_counts(name: str, counts: Mapping[str, Any]) -> str:
  """One log line of `count_examples` output, e.g. `sft train: 20000 seen, 11600 kept whole,
  8400 truncated (42.0%), 0 dropped (0.0%)`, then `: <n> <reason>, ...` when some were dropped."""
  seen = counts["seen"]
  percent = lambda n: f"{100 * n / seen:.1f}%" if seen else "n/a"
  whole = counts["kept"] - counts["truncated"]
  line = (f"{name}: {seen} seen, {whole} kept whole, {counts['truncated']} truncated ({percent(counts['truncated'])}),"
          f" {counts['dropped']} dropped ({percent(counts['dropped'])})")
  reasons = sorted(counts.get("dropped_by_reason", {}).items(), key=lambda kv: (-kv[1], kv[0]))
  if reasons:
    line += ": " + ", ".join(f"{n} {reason}" for reason, n in reasons)
  return line
