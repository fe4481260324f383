"""An imported model's Hugging Face tokenizer (``tokenizers``), as a jaxlm tokenizer.

A directory written by transformers holds ``tokenizer.json`` (the tokenizer itself),
``tokenizer_config.json`` (which added tokens are bos / eos / pad, and in older saves the chat
template) and, from transformers 5, ``chat_template.jinja`` (the chat template, preferred over
the config's key). `HFTokenizer` reads those three files, implements
`jaxlm.tokenizer.TokenizerLike`, and picks its chat format from the template
(`jaxlm.chat_formats.choose_format`: recognised by its markers, then checked by rendering probe
conversations through the template itself; an unknown or unreproducible template is an error
naming the file). A directory without a chat template loads (documents can be encoded), but
asking for its `chat_format` is an error.

Ids agree with transformers':

- `encode(text)` is transformers' encoding "without added tokens": the normalizer, the
  pre-tokenizer and the model, with no bos/eos and no added-token matching, so special-token
  strings inside text (``<|im_end|>``) are plain text. For ordinary text it equals
  ``tokenizer.encode(text, add_special_tokens=False)``.
- `encode_chat` encodes a rendered chat as ``apply_chat_template(tokenize=True)`` does (the
  template's special-token strings become their ids), with special-token strings inside
  message contents kept as text, the way transformers' ``sanitize_control_tokens=True`` does it
  (same splitting, so the same ids).

``content_hash`` is sha256 over, for each of tokenizer.json, tokenizer_config.json and
chat_template.jinja that exists, in that order, the bytes of
``name + "\\0" + sha256hex(file bytes) + "\\n"``. The import tool computes the same value, so a
run directory's manifest can be checked against the files copied into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers

from jaxlm import files
from jaxlm import tokenizer as tokenizer_lib

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
HASHED_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE)  # order fixed: see content_hash
GENERATION_CONFIG = "generation_config.json"  # read for its eos ids only; not ours to save


def content_hash(file_bytes: Mapping[str, bytes]) -> str:
  """The tokenizer's identity over its files (module docstring); keep in step with the import tool."""
  digest = hashlib.sha256()
  for name in HASHED_FILES:
    if name in file_bytes:
      digest.update(f"{name}\0{hashlib.sha256(file_bytes[name]).hexdigest()}\n".encode())
  return digest.hexdigest()


def _token_string(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, an AddedToken dict or null."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class HFTokenizer:
  """A Hugging Face tokenizer directory's files, loaded (a `jaxlm.tokenizer.TokenizerLike`).

  Attributes:
    files: {file name: bytes} of the hashed files present (what `save` writes).
    content_hash, vocab_size, pad_id, bos_id (None without bos), eos_id, special_ids: see
      `jaxlm.tokenizer`. vocab_size counts added tokens; the model's embedding may be larger.
    chat_template: the template text (None if the directory has none); template_source: the
      file it came from.
    options: date_string / enable_thinking, template variables jaxlm pins (see
      `jaxlm.chat_formats`); extra_stop_ids: eos ids from generation_config.json.
  """

  def __init__(self, file_bytes: Mapping[str, bytes], *, source: str = "<files>",
               date_string: str | None = None, enable_thinking: bool | None = None,
               extra_stop_ids: Sequence[int] = ()):
    self.files = {name: bytes(file_bytes[name]) for name in HASHED_FILES if name in file_bytes}
    self.source = source
    self.options = {"date_string": date_string, "enable_thinking": enable_thinking}
    self.extra_stop_ids = tuple(int(i) for i in extra_stop_ids)
    where = lambda name: os.path.join(source, name)  # noqa: E731
    if TOKENIZER_JSON not in self.files:
      raise FileNotFoundError(f"{where(TOKENIZER_JSON)}: missing (a Hugging Face tokenizer needs it)")
    try:
      self._tk = tokenizers.Tokenizer.from_str(self.files[TOKENIZER_JSON].decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON/models.
      raise ValueError(f"{where(TOKENIZER_JSON)}: not a valid tokenizers file ({e})") from None
    try:
      config = json.loads(self.files.get(TOKENIZER_CONFIG, b"{}"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{where(TOKENIZER_CONFIG)}: invalid JSON ({e})") from None
    self.content_hash = content_hash(self.files)
    self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
    added = self._tk.get_added_tokens_decoder()
    self.vocab_size = max([self.vocab_size, *(i + 1 for i in added)])
    self.special_ids = frozenset(i for i, token in added.items() if token.special)
    self._added_strings = sorted({token.content for token in added.values()}, key=len, reverse=True)
    self.special_tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      token = _token_string(config.get(key))
      if token is not None and self._tk.token_to_id(token) is None:
        raise ValueError(f"{where(TOKENIZER_CONFIG)}: {key} {token!r} is not in {TOKENIZER_JSON}")
      self.special_tokens[key] = token
    if self.special_tokens["eos_token"] is None:
      raise ValueError(f"{where(TOKENIZER_CONFIG)}: no eos_token (jaxlm ends documents with it)")
    self.bos_id = self.token_to_id(self.special_tokens["bos_token"])
    self.eos_id = self.token_to_id(self.special_tokens["eos_token"])
    # Padding is never attended nor trained, so without a pad token any id serves: eos.
    self.pad_id = self.token_to_id(self.special_tokens["pad_token"])
    if self.pad_id is None:
      self.pad_id = self.eos_id
    if CHAT_TEMPLATE in self.files:
      self.chat_template, self.template_source = (self.files[CHAT_TEMPLATE].decode("utf-8"),
                                                  where(CHAT_TEMPLATE))
    else:
      template = config.get("chat_template")
      if isinstance(template, list):  # Named templates: [{"name": "default", "template": ...}].
        template = {t.get("name"): t.get("template") for t in template}.get("default")
      self.chat_template = template if isinstance(template, str) else None
      self.template_source = f"{where(TOKENIZER_CONFIG)} (key chat_template)"
    # Chosen now, so a bad template fails at load time, not in the middle of a data pipeline.
    self._chat_format = self._choose_format() if self.chat_template is not None else None
    self._newline_ids = self._tk.encode("\n", add_special_tokens=False).ids

  def _choose_format(self):
    from jaxlm import chat_formats  # chat_formats imports chat_template, which is generic.
    return chat_formats.choose_format(
        self, self.chat_template, source=self.template_source, special_tokens=self.special_tokens,
        stop_ids=self.extra_stop_ids, **self.options)

  @classmethod
  def load(cls, directory: str | os.PathLike, *, date_string: str | None = None,
           enable_thinking: bool | None = None) -> "HFTokenizer":
    """Reads a tokenizer directory (tokenizer.json required; see the module docstring)."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
      raise FileNotFoundError(f"no {TOKENIZER_JSON} in {directory} (expected a directory saved "
                              "by transformers, e.g. save_pretrained)")
    data = {}
    for name in HASHED_FILES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          data[name] = f.read()
    return cls(data, source=directory, date_string=date_string, enable_thinking=enable_thinking,
               extra_stop_ids=_generation_eos_ids(directory))

  def save(self, directory: str | os.PathLike) -> None:
    """Writes this tokenizer's files into `directory` (created if needed), each atomically."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name, data in self.files.items():
      files.atomic_write(os.path.join(directory, name), data)

  # --- Text ------------------------------------------------------------------------------------

  @property
  def chat_format(self):
    if self._chat_format is None:
      raise ValueError(f"{self.source}: this tokenizer has no chat template ({TOKENIZER_CONFIG} "
                       f"has no chat_template and there is no {CHAT_TEMPLATE}), so it cannot "
                       "render chats; use an instruct model's tokenizer")
    return self._chat_format

  def token_to_id(self, token: str | None) -> int | None:
    return None if token is None else self._tk.token_to_id(token)

  def _encode_plain(self, text: str) -> list[int]:
    """transformers' `_encode_without_added_tokens`: normalizer, pre-tokenizer, model."""
    if self._tk.normalizer is not None:
      text = self._tk.normalizer.normalize_str(text)
    splits = [text]
    if self._tk.pre_tokenizer is not None:
      splits = [split for split, _ in self._tk.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for split in splits for token in self._tk.model.tokenize(split)]

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos; special-token strings in `text` are encoded as plain text."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    return self._encode_plain(text) if text else []

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` for each text, in order."""
    return [self.encode(text) for text in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids [T] -> text, special ids (turn markers, bos, eos, pad) dropped.

    Ids at or past `vocab_size` are dropped too: a model may pad its embedding past the
    tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), those rows have no text, and a
    sampler can still draw them (as `tokenizers` and transformers do, they decode to nothing).
    """
    array = np.asarray(ids)
    if array.ndim == 1 and array.size and np.issubdtype(array.dtype, np.integer):
      array = array[array < self.vocab_size]
    ids = self._check_ids(array)
    return self._tk.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    """The vocabulary entry of id `i` (byte-level BPE writes a space as ``Ġ``, a newline ``Ċ``)."""
    (i,) = self._check_ids([i])
    return self._tk.id_to_token(i)

  def _check_ids(self, ids) -> list[int]:
    return tokenizer_lib.check_ids(ids, self.vocab_size)

  # --- Chats -----------------------------------------------------------------------------------

  def encode_chat(self, text: str, contents: Sequence[tuple[int, int]]
                  ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """A rendered chat -> (ids, token start chars [T], token end chars [T]).

    Added-token strings written by the template become their ids. Those inside `contents`
    (message text, [start, end) spans) are forgeries and stay text: the chat is cut around
    them and encoded piece by piece, exactly as transformers' `encode_marked_chat` does.
    """
    forged = self._forged_spans(text, contents)
    if not forged:  # The usual case: one call, offsets from tokenizers itself.
      encoding = self._tk.encode(text, add_special_tokens=False)
      offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
      return list(encoding.ids), offsets[:, 0], offsets[:, 1]
    ids, starts, ends, cursor = [], [], [], 0
    pieces = []
    for start, end in forged:
      pieces += [(cursor, start, False), (start, end, True)]
      cursor = end
    pieces.append((cursor, len(text), False))
    for n, (start, end, as_text) in enumerate(pieces):
      piece = text[start:end]
      if not piece:
        continue
      if n == 0:
        encoding = self._tk.encode(piece, add_special_tokens=False)
        piece_ids, offsets = encoding.ids, encoding.offsets
      else:
        piece_ids, offsets = self._encode_inner(piece, as_text)
      ids += piece_ids
      starts += [start + a for a, _ in offsets]
      ends += [start + b for _, b in offsets]
    return ids, np.asarray(starts, np.int64), np.asarray(ends, np.int64)

  def _encode_inner(self, piece: str, as_text: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """A piece from the middle of a chat (transformers' `_encode_chat_piece`): encoded after a
    newline, which is then removed, so no tokenizer treats it as the start of a text."""
    newline = len(self._newline_ids)
    if as_text:
      ids = self._encode_plain("\n" + piece)
      ids = ids[newline:] if ids[:newline] == self._newline_ids else self._encode_plain(piece)
      return ids, [(0, len(piece))] * len(ids)  # All inside one content span: that is enough.
    encoding = self._tk.encode("\n" + piece, add_special_tokens=False)
    if encoding.ids[:newline] == self._newline_ids:
      return (encoding.ids[newline:],
              [(max(a - 1, 0), max(b - 1, 0)) for a, b in encoding.offsets[newline:]])
    encoding = self._tk.encode(piece, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def _forged_spans(self, text: str, contents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) of added-token strings inside message contents, in order."""
    if not self._added_strings:
      return []
    pattern = self._added_pattern()
    spans = []
    for start, end in contents:
      spans += [(start + m.start(), start + m.end()) for m in pattern.finditer(text[start:end])]
    return sorted(spans)

  def _added_pattern(self) -> re.Pattern:
    if not hasattr(self, "_pattern"):
      # Longest first, so a token wins over the shorter tokens it contains.
      self._pattern = re.compile("|".join(map(re.escape, self._added_strings)))
    return self._pattern

  # --- Identity and pickling -------------------------------------------------------------------

  def __getstate__(self) -> dict:
    return {"files": self.files, "source": self.source, "options": self.options,
            "extra_stop_ids": self.extra_stop_ids}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["files"], source=state["source"], extra_stop_ids=state["extra_stop_ids"],
                  **state["options"])

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, HFTokenizer) and other.content_hash == self.content_hash
            and other.options == self.options)

  def __hash__(self) -> int:
    return hash(self.content_hash)

  def __repr__(self) -> str:
    family = self._chat_format.name if self._chat_format is not None else "no chat template"
    return (f"HFTokenizer(vocab_size={self.vocab_size}, {family}, "
            f"content_hash={self.content_hash[:12]}...)")


def _generation_eos_ids(directory: str) -> tuple[int, ...]:
  """generation_config.json's eos_token_id (an int or a list), if the directory has one."""
  path = os.path.join(directory, GENERATION_CONFIG)
  if not os.path.isfile(path):
    return ()
  try:
    with open(path) as f:
      value = json.load(f).get("eos_token_id")
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read it ({e})") from None
  values = value if isinstance(value, list) else [value] if value is not None else []
  return tuple(int(v) for v in values)
