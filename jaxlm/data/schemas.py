"""The four record kinds and their one schema, used by every source and stage.

A record is a plain Python dict:

| kind         | fields                                                                   |
|--------------|--------------------------------------------------------------------------|
| `text`       | `{"text": str}`                                                          |
| `chat`       | `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "meta": dict}` |
| `preference` | `{"prompt": [messages], "chosen": str, "rejected": str, "meta": dict}`   |
|              | also `{"chosen": full_text, "rejected": full_text}`: the shared prompt is split off (`preference_text.py`) |
| `prompt`     | `{"prompt": [messages], "meta": dict}`                                   |

`meta` is an optional JSON-serialisable dict (it is always present after validation, maybe
empty): the world stores what its gold reward needs there; for user JSONL, every top-level key
that is not a schema field is kept in `meta` rather than rejected, since public datasets carry
ids and sources we should not lose.

Rules on messages (checked by `validate_messages`): a non-empty list; each item a dict with a
known `role` and a non-empty string `content`; `system` only as the first message. A chat must
contain at least one assistant message (else SFT has nothing to learn from it); a prompt (also
the prompt of a preference pair) must end with a user message, since the model answers next.

Preference replies: an empty or whitespace-only ``chosen`` or ``rejected`` raises naming that
field (``field 'chosen': expected non-empty text (the chosen reply is empty)``); in the
whole-transcript layout so does a side that ends with an assistant marker and nothing after it
(``...\\n\\nAssistant:``, as some HH-RLHF pairs do), checked before the prompt is split off.

`to_tfds_example` / `from_tfds_example` convert between records and the TFDS feature dicts of
`tfds_features(kind)`: messages are a `Sequence` of `{role, content}` texts and `meta` is
stored as one JSON text, so the on-disk schema stays fixed whatever the metadata holds.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from jaxlm.data import preference_text
from jaxlm.data.errors import DataError

KINDS = ("text", "chat", "preference", "prompt")
ROLES = ("system", "user", "assistant")

# Schema fields per kind; any other top-level key of an input record is moved into `meta`.
FIELDS = {
    "text": ("text",),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  return kind


def _nonempty_str(value: Any, where: str, field: str, what: str = "") -> str:
  """Checks a non-blank string; `what` names it for people, e.g. "chosen reply"."""
  if not isinstance(value, str):
    raise DataError(where, f"field {field!r}: expected a string, got {type(value).__name__}")
  if not value.strip():
    if what:
      empty = "is empty" if not value else f"is only whitespace, {_clip(value)!r}"
      raise DataError(where, f"field {field!r}: expected non-empty text (the {what} {empty})")
    raise DataError(where, f"field {field!r}: expected non-empty text, got {_clip(value)!r}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # A lone surrogate, e.g. a JSON "\\ud800" escape: not storable text.
    raise DataError(where, f"field {field!r}: not valid Unicode text ({e.reason} at character {e.start})") from None
  return value


def _clip(text: str, limit: int = 40) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _check_transcript_side(text: Any, where: str, side: str) -> None:
  """One side of a whole-transcript pair: non-blank, and not ending in an empty assistant turn.

  Checked before the shared prompt is split off, so the message names the side (HH-RLHF has
  pairs whose chosen transcript ends with "Assistant:" and nothing after it).
  """
  _nonempty_str(text, where, side, f"{side} reply")
  markers = list(preference_text._MARKER.finditer(text))  # pylint: disable=protected-access
  if markers and markers[-1].group(1).lower() == "assistant" and not text[markers[-1].end():].strip():
    raise DataError(where, f"field {side!r}: expected non-empty text (the {side} reply is empty: the "
                    f"transcript ends with {text[markers[-1].start():].strip()!r} and nothing after it)")


def validate_messages(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
  """Checks a list of chat messages and returns a clean copy (only role and content)."""
  if not isinstance(messages, list):
    raise DataError(where, f"field {field!r}: expected a list of messages, got {type(messages).__name__}")
  if not messages:
    raise DataError(where, f"field {field!r}: expected at least one message, got an empty list")
  clean = []
  for i, message in enumerate(messages):
    item = f"{field}[{i}]"
    if not isinstance(message, dict):
      raise DataError(where, f"field {item!r}: expected an object with 'role' and 'content', got {type(message).__name__}")
    for key in ("role", "content"):
      if key not in message:
        raise DataError(where, f"field {item!r}: missing {key!r}")
    role = message["role"]
    if role not in ROLES:
      raise DataError(where, f"field '{item}.role': unknown role {role!r}; expected one of {ROLES}")
    if role == "system" and i != 0:
      raise DataError(where, f"field '{item}.role': a system message may only come first")
    clean.append({"role": role, "content": _nonempty_str(message["content"], where, f"{item}.content")})
  return clean


def _meta(obj: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
  meta = obj.get("meta", {})
  if not isinstance(meta, dict):
    raise DataError(where, f"field 'meta': expected an object, got {type(meta).__name__}")
  meta = dict(meta)
  extras = {k: v for k, v in obj.items() if k not in FIELDS[kind] and k != "meta"}
  meta.update(extras)
  try:
    json.dumps(meta)
  except (TypeError, ValueError) as e:
    raise DataError(where, f"field 'meta': not JSON-serialisable ({e})") from None
  return meta


def validate(kind: str, obj: Any, where: str) -> dict[str, Any]:
  """Validates one record of `kind` and returns it in canonical form.

  Args:
    kind: one of `KINDS`.
    obj: the parsed record (e.g. one JSON line).
    where: the place of the record for error messages, e.g. ``"chat.jsonl:17"``.

  Returns:
    A new dict with exactly the schema fields of `kind` (plus `meta` except for text).

  Raises:
    DataError: naming `where`, the field and what was expected.
  """
  check_kind(kind)
  if not isinstance(obj, dict):
    raise DataError(where, f"expected a JSON object for a {kind} record, got {type(obj).__name__}")
  if kind == "preference" and "prompt" not in obj and isinstance(obj.get("chosen"), str) \
      and isinstance(obj.get("rejected"), str):
    # The whole-transcript layout of many public preference sets: split off the shared prompt.
    for side in ("chosen", "rejected"):
      _check_transcript_side(obj[side], where, side)
    prompt, chosen, rejected = preference_text.split_shared_prefix(obj["chosen"], obj["rejected"], where)
    obj = {**obj, "prompt": prompt, "chosen": chosen, "rejected": rejected}
  for field in FIELDS[kind]:
    if field not in obj:
      raise DataError(where, f"missing field {field!r} (a {kind} record has {list(FIELDS[kind])})")
  if kind == "text":
    return {"text": _nonempty_str(obj["text"], where, "text")}
  if kind == "chat":
    messages = validate_messages(obj["messages"], where)
    if not any(m["role"] == "assistant" for m in messages):
      raise DataError(where, "field 'messages': a chat needs at least one assistant message to train on")
    return {"messages": messages, "meta": _meta(obj, kind, where)}
  prompt = validate_messages(obj["prompt"], where, "prompt")
  if prompt[-1]["role"] != "user":
    raise DataError(where, f"field 'prompt': must end with a user message, ends with {prompt[-1]['role']!r}")
  if kind == "prompt":
    return {"prompt": prompt, "meta": _meta(obj, kind, where)}
  return {
      "prompt": prompt,
      "chosen": _nonempty_str(obj["chosen"], where, "chosen", "chosen reply"),
      "rejected": _nonempty_str(obj["rejected"], where, "rejected", "rejected reply"),
      "meta": _meta(obj, kind, where),
  }


# ---------------------------------------------------------------------------------------------
# TFDS features: the on-disk form of each kind.
# ---------------------------------------------------------------------------------------------


def tfds_features(kind: str):
  """The `tfds.features.FeaturesDict` that stores records of `kind`."""
  import tensorflow_datasets as tfds  # Deferred: importing TFDS costs about a second.

  text = tfds.features.Text()
  messages = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
  spec = {
      "text": {"text": text},
      "chat": {"messages": messages, "meta": tfds.features.Text()},
      "preference": {"prompt": messages, "chosen": text, "rejected": tfds.features.Text(), "meta": tfds.features.Text()},
      "prompt": {"prompt": messages, "meta": tfds.features.Text()},
  }[check_kind(kind)]
  return tfds.features.FeaturesDict(spec)


def to_tfds_example(kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
  """A validated record -> the dict that `tfds_features(kind)` encodes."""
  check_kind(kind)
  if kind == "text":
    return {"text": record["text"]}
  example = {k: record[k] for k in FIELDS[kind]}
  example["meta"] = json.dumps(record.get("meta", {}), sort_keys=True, ensure_ascii=False)
  return example


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _messages_from_tfds(columns: Mapping[str, Any]) -> list[dict[str, str]]:
  # TFDS decodes a Sequence of dicts column-wise: {"role": [...], "content": [...]}.
  return [{"role": _text(r), "content": _text(c)} for r, c in zip(columns["role"], columns["content"])]


def from_tfds_example(kind: str, example: Mapping[str, Any]) -> dict[str, Any]:
  """A decoded TFDS example (bytes, column-wise sequences) -> a record of `kind`."""
  check_kind(kind)
  if kind == "text":
    return {"text": _text(example["text"])}
  record: dict[str, Any] = {}
  for field in FIELDS[kind]:
    value = example[field]
    record[field] = _messages_from_tfds(value) if field in ("messages", "prompt") else _text(value)
  record["meta"] = json.loads(_text(example["meta"])) if "meta" in example else {}
  return record
