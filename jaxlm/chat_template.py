"""The chat template: messages -> token ids and the loss mask, for training and for generation.

Rendering of a conversation (ids in angle brackets are single special tokens, see
`jaxlm.tokenizer`; ``content(m)`` is ``tokenizer.encode(m["content"])``):

    <s>                                                     bos, once, at the start
    for each message m, in order:
      <|system|> | <|user|> | <|assistant|>                 the marker of m's role
      content(m)                                            m's content, encoded on its own
      <|end|>                                               end of turn

so a typical chat is ``<s> [<|system|> sys <|end|>] <|user|> ... <|end|> <|assistant|> ...
<|end|> ...``. There is no ``</s>`` at the end: a turn ends with ``<|end|>``, and the model is
sampled until it emits ``<|end|>`` (or ``</s>``).

The loss mask is True exactly on the tokens the model must learn to produce: the content of
each assistant message and the ``<|end|>`` that closes it (so it learns when to stop). Role
markers are never trained (the sampler, not the model, writes ``<|assistant|>``), nor are
``<s>``, system or user content, or the ``<|end|>`` of non-assistant turns.

Each content is encoded separately, never as part of a longer string. So the ids of a reply do
not depend on what precedes it, and the token stream the model is trained on is the same one
it sees when generating:

    render_prompt(msgs[:k]) + render_response(msgs[k]["content"]) == render_chat(msgs[:k+1])[0]

for every assistant message k. (SentencePiece's dummy prefix means every content starts with
a ``▁`` piece, i.e. as a word after a space; `Tokenizer.decode` removes it again.)

Special-token strings typed inside a message (``"<|end|>"``) are encoded as ordinary text (the
markers are SentencePiece control symbols), so content can never forge a turn boundary.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxlm.data.errors import DataError
from jaxlm.data.schemas import validate_messages
from jaxlm.tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, ROLE_IDS, Tokenizer


def _as_list(messages: Any) -> Any:
  # The schema's validator wants a list; a tuple is as good. Anything else goes through as is,
  # so the validator reports its type rather than us iterating a str or dict.
  return list(messages) if isinstance(messages, tuple) else messages


def _segments(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
  """(ids, trained) runs in stream order: <s>, then per message marker / content + <|end|>."""
  segments = [([BOS_ID], False)]
  for message in messages:
    trained = message["role"] == "assistant"
    segments.append(([ROLE_IDS[message["role"]]], False))
    segments.append((tokenizer.encode(message["content"]) + [END_OF_TURN_ID], trained))
  return segments


def _concat(segments: list[tuple[list[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
  """Segments -> (ids int32 [T], mask bool [T]), filled in place without intermediate lists."""
  total = sum(len(ids) for ids, _ in segments)
  ids = np.empty(total, np.int32)
  mask = np.zeros(total, np.bool_)
  start = 0
  for segment, trained in segments:
    end = start + len(segment)
    ids[start:end] = segment
    mask[start:end] = trained
    start = end
  return ids, mask


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], *,
                where: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Renders a conversation for training (see the module docstring for the exact layout).

  Args:
    tokenizer: a jaxlm tokenizer.
    messages: ``[{"role": ..., "content": ...}, ...]`` following `jaxlm.data.schemas`.
    where: the record's place, for error messages (e.g. ``"chat.jsonl:17"``).

  Returns:
    ``(ids, loss_mask)``: ids int32 [T] and loss_mask bool [T], where loss_mask[i] is True iff
    token i is assistant content or the ``<|end|>`` closing an assistant message.

  Raises:
    DataError: naming `where`, if the messages break the schema or no token is trainable
      (no assistant message).
  """
  messages = validate_messages(_as_list(messages), where)
  ids, mask = _concat(_segments(tokenizer, messages))
  if not mask.any():
    raise DataError(where, "field 'messages': nothing to train on (no assistant message); "
                    "the loss mask would be all False")
  return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], *,
                  where: str = "") -> np.ndarray:
  """Renders the conversation so far, followed by ``<|assistant|>``: the input for sampling.

  Args:
    tokenizer: a jaxlm tokenizer.
    messages: the conversation so far (usually ending with a user message); may be empty.
    where: the record's place, for error messages.

  Returns:
    ids int32 [T]: ``<s> ... <|assistant|>``; the model continues with the reply.

  Raises:
    DataError: naming `where`, if the messages break the schema.
  """
  messages = _as_list(messages)
  if messages != []:  # An empty prompt is valid here: the reply opens the conversation.
    messages = validate_messages(messages, where, "prompt")
  segments = _segments(tokenizer, messages)
  segments.append(([ROLE_IDS["assistant"]], False))
  return _concat(segments)[0]


def render_response(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """The ids the model should emit after `render_prompt`: content + ``<|end|>``, int32 [T]."""
  if not isinstance(text, str):
    raise TypeError(f"render_response expects str, got {type(text).__name__}")
  return np.asarray(tokenizer.encode(text) + [END_OF_TURN_ID], np.int32)


def parse_reply(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> tuple[str, bool]:
  """Decodes sampled ids up to the first ``<|end|>`` or ``</s>`` (exclusive).

  Args:
    tokenizer: a jaxlm tokenizer.
    ids: int [T], the tokens sampled after `render_prompt` (padding after the stop is fine).

  Returns:
    ``(text, ended_turn)``: the reply text, and whether a ``<|end|>`` or ``</s>`` was found
    (False means the reply was cut off, e.g. by the sampling length limit).
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"parse_reply expects a 1-D array of ids, got shape {ids.shape}")
  stops = np.flatnonzero((ids == END_OF_TURN_ID) | (ids == EOS_ID))
  if stops.size:
    return tokenizer.decode(ids[:stops[0]]), True
  return tokenizer.decode(ids), False
