"""The chat template: messages -> token ids and the loss mask, for training and for generation.

Every tokenizer has a *chat format* (`tokenizer.chat_format`, a `ChatFormat`): the object that
renders a conversation to ``(ids int32 [T], loss_mask bool [T])`` in one pass, renders the
prompt the sampler continues, the ids of a reply (its end-of-turn token included), parses
sampled ids back into text, and names the ids generation stops at. The module-level functions
(`render_chat`, `render_prompt`, `render_response`, `parse_reply`) validate messages against
`jaxlm.data.schemas` and delegate to it; every call site uses them. Formats:

- `JaxlmFormat` (below): jaxlm's SentencePiece tokenizer's role-marker layout.
- Llama 3, ChatML (Qwen2/2.5, Qwen3) and Mistral (`jaxlm.chat_formats`), chosen for an imported
  Hugging Face tokenizer from its own Jinja template and checked against it.

Whatever the format, the loss mask is True exactly on each assistant reply's tokens and the
end-of-turn token that closes it, and nothing else.

jaxlm's format (ids in angle brackets are single special tokens, see `jaxlm.tokenizer`;
``content(m)`` is ``tokenizer.encode(m["content"])``):

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

from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

from jaxlm.data.errors import DataError
from jaxlm.data.schemas import validate_messages


class Reply(NamedTuple):
  """Sampled ids, parsed (`ChatFormat.parse_reply`).

  text: the reply decoded up to (not including) the first stop id (special ids dropped).
  stopped: a stop id was found (False: cut off, e.g. by the sampling length limit).
  ended_turn: the first stop id is the format's end of turn, the one training puts after every
    reply (a stop on a document's end, e.g. ``</s>`` in jaxlm's format, is not a finished turn).
  """

  text: str
  stopped: bool
  ended_turn: bool


class ChatFormat(Protocol):
  """How one tokenizer's chats are laid out (see the module docstring).

  Attributes:
    name: the family ("jaxlm", "llama3", "chatml", "qwen3", "mistral").
    end_of_turn_id: the id that closes every trained reply (jaxlm: ``<|end|>``).
    stop_ids: ids that end generation, `end_of_turn_id` first.
    prompt_response_invariant: whether ``render_prompt(msgs[:k]) + render_response(reply)``
      always equals ``render_chat(msgs[:k+1])[0]`` (see each format's docstring where not).

  Messages handed to the methods have passed `jaxlm.data.schemas.validate_messages`; a
  conversation the family's own template refuses (e.g. Mistral's non-alternating roles) is a
  `DataError` naming `where`.
  """

  name: str
  end_of_turn_id: int
  stop_ids: tuple[int, ...]
  prompt_response_invariant: bool

  def render_chat(self, messages: list[dict[str, str]], *,
                  where: str = "") -> tuple[np.ndarray, np.ndarray]: ...

  def render_prompt(self, messages: list[dict[str, str]], *, where: str = "") -> np.ndarray: ...

  def render_response(self, text: str) -> np.ndarray: ...

  def parse_reply(self, ids: Sequence[int] | np.ndarray) -> Reply: ...


def parse_at_stops(tokenizer, ids: Sequence[int] | np.ndarray, stop_ids: Sequence[int],
                   end_of_turn_id: int) -> Reply:
  """`Reply` of sampled ids for a format whose turns end with `end_of_turn_id`."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"parse_reply expects a 1-D array of ids, got shape {ids.shape}")
  stops = np.flatnonzero(np.isin(ids, np.asarray(stop_ids)))
  if stops.size:
    return Reply(tokenizer.decode(ids[:stops[0]]), True, bool(ids[stops[0]] == end_of_turn_id))
  return Reply(tokenizer.decode(ids), False, False)


def _as_list(messages: Any) -> Any:
  # The schema's validator wants a list; a tuple is as good. Anything else goes through as is,
  # so the validator reports its type rather than us iterating a str or dict.
  return list(messages) if isinstance(messages, tuple) else messages


def concat_segments(segments: list[tuple[list[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
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


class JaxlmFormat:
  """jaxlm's own layout for its SentencePiece tokenizer (the module docstring's first table).

  The role markers and ``<|end|>`` are inserted by id, and each content is encoded on its own,
  so `prompt_response_invariant` holds for every conversation.
  """

  name = "jaxlm"
  prompt_response_invariant = True

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._bos = tokenizer.bos_id
    self._roles = {role: tokenizer.role_id(role) for role in ("system", "user", "assistant")}
    self.end_of_turn_id = tokenizer.end_of_turn_id
    # </s> stops too: a model that emits it has nothing more to say, though no chat trains it.
    self.stop_ids = (self.end_of_turn_id, tokenizer.eos_id)

  def _segments(self, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
    """(ids, trained) runs in stream order: <s>, then per message marker / content + <|end|>."""
    segments = [([self._bos], False)]
    for message in messages:
      trained = message["role"] == "assistant"
      segments.append(([self._roles[message["role"]]], False))
      segments.append((self._tokenizer.encode(message["content"]) + [self.end_of_turn_id], trained))
    return segments

  def render_chat(self, messages, *, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    return concat_segments(self._segments(messages))

  def render_prompt(self, messages, *, where: str = "") -> np.ndarray:
    segments = self._segments(messages)
    segments.append(([self._roles["assistant"]], False))
    return concat_segments(segments)[0]

  def render_response(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text) + [self.end_of_turn_id], np.int32)

  def parse_reply(self, ids) -> Reply:
    return parse_at_stops(self._tokenizer, ids, self.stop_ids, self.end_of_turn_id)

  def __repr__(self) -> str:
    return "JaxlmFormat()"


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], *,
                where: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Renders a conversation for training, in the tokenizer's chat format.

  Args:
    tokenizer: any jaxlm tokenizer (`jaxlm.tokenizer.TokenizerLike`).
    messages: ``[{"role": ..., "content": ...}, ...]`` following `jaxlm.data.schemas`.
    where: the record's place, for error messages (e.g. ``"chat.jsonl:17"``).

  Returns:
    ``(ids, loss_mask)``: ids int32 [T] and loss_mask bool [T], where loss_mask[i] is True iff
    token i belongs to an assistant reply or is the end-of-turn token closing one.

  Raises:
    DataError: naming `where`, if the messages break the schema (or the format's own rules),
      or no token is trainable (no assistant message).
  """
  messages = validate_messages(_as_list(messages), where)
  ids, mask = tokenizer.chat_format.render_chat(messages, where=where)
  if not mask.any():
    raise DataError(where, "field 'messages': nothing to train on (no assistant message); "
                    "the loss mask would be all False")
  return ids, mask


def render_prompt(tokenizer, messages: Sequence[dict[str, Any]], *,
                  where: str = "") -> np.ndarray:
  """Renders the conversation so far, then what opens an assistant turn: the sampler's input.

  Args:
    tokenizer: any jaxlm tokenizer.
    messages: the conversation so far (usually ending with a user message); may be empty.
    where: the record's place, for error messages.

  Returns:
    ids int32 [T] (jaxlm: ``<s> ... <|assistant|>``); the model continues with the reply.

  Raises:
    DataError: naming `where`, if the messages break the schema.
  """
  messages = _as_list(messages)
  if messages != []:  # An empty prompt is valid here: the reply opens the conversation.
    messages = validate_messages(messages, where, "prompt")
  return tokenizer.chat_format.render_prompt(messages, where=where)


def render_response(tokenizer, text: str) -> np.ndarray:
  """The ids the model should emit after `render_prompt`: the reply + its end of turn, int32 [T]."""
  if not isinstance(text, str):
    raise TypeError(f"render_response expects str, got {type(text).__name__}")
  return tokenizer.chat_format.render_response(text)


def parse_reply(tokenizer, ids: Sequence[int] | np.ndarray) -> tuple[str, bool]:
  """Decodes sampled ids up to the first stop id (exclusive) of the tokenizer's format.

  Args:
    tokenizer: any jaxlm tokenizer.
    ids: int [T], the tokens sampled after `render_prompt` (padding after the stop is fine).

  Returns:
    ``(text, stopped)``: the reply text, and whether a stop id (jaxlm: ``<|end|>`` or ``</s>``)
    was found (False means the reply was cut off, e.g. by the sampling length limit). Whether
    the stop was a proper end of turn is `tokenizer.chat_format.parse_reply(ids).ended_turn`.
  """
  reply = tokenizer.chat_format.parse_reply(ids)
  return reply.text, reply.stopped
