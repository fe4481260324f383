"""Tokenizers: the interface every tokenizer has, jaxlm's SentencePiece one, and loading.

A run uses one tokenizer, saved into its run directory and identified in manifests by
`content_hash`, so a checkpoint can always be matched with the tokenizer it was trained with.
Two kinds exist:

- jaxlm's own SentencePiece model (``tokenizer.model``, `Tokenizer` below): trained once by
  `train_tokenizer` on the stage-1 corpus, with the fixed special ids of the table below.
- a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json`` + ``tokenizer_config.json``
  [+ ``chat_template.jinja``], `jaxlm.hf_tokenizer.HFTokenizer`), imported with a model
  (Llama 3, Qwen2/2.5/3, Mistral), whose special ids are wherever that family put them.

The interface (`TokenizerLike`) is what every other module codes against. Special ids are read
from the instance, never from module constants (the constants below describe the SentencePiece
layout only and are not imported elsewhere):

| name            | meaning                                                                  |
|-----------------|--------------------------------------------------------------------------|
| vocab_size      | number of ids the tokenizer can produce (an imported model's embedding     |
|                 | may be larger: Qwen pads it to a multiple of 128)                          |
| content_hash    | sha256 hex identifying the tokenizer's files (manifests, parent checks)    |
| pad_id          | the id that fills padding (never trained, never attended)                 |
| bos_id          | the id that opens a document, or None (Qwen has none: documents start      |
|                 | with their text, and truncation keeps no first token)                     |
| eos_id          | the id that closes a document in pretraining                              |
| special_ids     | frozenset of markup ids: `decode` drops them                              |
| chat_format     | the `jaxlm.chat_template.ChatFormat` that renders chats for this tokenizer |
| encode(text)    | text -> ids, no bos/eos added, special-token strings inside `text` encoded |
|                 | as plain text (a user typing a turn marker cannot forge a turn)           |
| encode_batch    | many texts at once, each as `encode`                                      |
| decode(ids)     | ids -> text, special ids dropped                                          |
| id_to_piece(i)  | the vocabulary entry of id i                                              |
| save(directory) | writes the tokenizer's own files into a (run) directory                   |

`load_tokenizer(directory)` reads whichever kind a directory holds. Every tokenizer pickles
cheaply (only its file bytes travel), so it can be handed to data-loader workers.

The SentencePiece tokenizer's fixed id layout (the same for every jaxlm-trained tokenizer;
`Tokenizer` refuses a model without it):

| id  | piece           | kind    | use                                                      |
|-----|-----------------|---------|----------------------------------------------------------|
| 0   | `<pad>`         | control | padding; never a target                                  |
| 1   | `<s>`           | control | beginning of a document / chat                           |
| 2   | `</s>`          | control | end of a document                                        |
| 3   | `<unk>`         | unknown | only without byte fallback (a char the model can't spell) |
| 4-6 | `<|system|>`, `<|user|>`, `<|assistant|>` | control | role markers of the chat template |
| 7   | `<|end|>`       | control | end of a chat turn                                       |
| 8-  | `<0x00>`..`<0xFF>` (with byte fallback), then the learned pieces               |

pad/bos/eos/unk are placed with the trainer's ``*_id`` arguments; the role markers and the
end-of-turn marker are *control symbols*, which SentencePiece numbers right after them in the
order given. Control symbols (unlike *user-defined* symbols) are never produced by encoding raw
text: a user who types ``<|end|>`` gets the pieces ``<``, ``|``, ``end``, ... and cannot end a
turn or impersonate a role. They are only ever inserted by id (see `jaxlm.chat_template`), and
`decode` drops them.

Normalisation: ``identity`` with ``remove_extra_whitespaces=False``, so the model sees text
exactly as written (no NFKC folding of full-width forms or ligatures, no collapsing of runs of
spaces, tabs and newlines are kept) and ``decode(encode(x)) == x`` for any string without the
character U+2581 (``▁``, which SentencePiece uses internally for a space and so decodes as
``" "``). ``add_dummy_prefix`` stays on: every encoded text starts with a ``▁``, so a word has
the same pieces at the start of a text as in the middle, and `decode` removes it again.
Byte fallback (on by default) spells any character not in the vocabulary as its UTF-8 bytes,
so unseen scripts and emoji round-trip instead of becoming ``<unk>``. Digits are split into
single pieces (numbers tokenise uniformly) and pieces made only of whitespace are allowed
(indentation becomes one piece).

Determinism: the same texts and arguments give a byte-identical model file (checked across
processes). Two things are pinned for that. (1) Sampling: SentencePiece's own sampling of
``input_sentence_size`` sentences is not reproducible (``set_random_generator_seed`` does not
make it so in 0.2.x: two processes with the same seed pick different samples), so we sample in
Python with a seeded reservoir and hand the trainer exactly the sentences to use. (2) Threads:
``num_threads`` is recorded in the model file and the unigram trainer's result depends on it, so
it is a fixed default rather than the machine's core count. The output path is not recorded,
so the hash does not depend on where the model was written.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from jaxlm import files

if TYPE_CHECKING:  # Only for annotations: chat_template imports nothing from here at runtime.
  from jaxlm.chat_template import ChatFormat

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"

# Control symbols in id order: SentencePiece numbers them 4, 5, 6, 7 after pad/bos/eos/unk.
_CONTROL_SYMBOLS = (*ROLE_TOKENS.values(), END_OF_TURN)
_SPECIAL_PIECES = ("<pad>", "<s>", "</s>", "<unk>", *_CONTROL_SYMBOLS)
ROLE_IDS = {role: 4 + i for i, role in enumerate(ROLE_TOKENS)}
END_OF_TURN_ID = 7
NUM_SPECIAL_IDS = len(_SPECIAL_PIECES)  # 8: ids below this are reserved.
# Ids that are markup rather than text: `decode` drops them (unk stays: it is a text position).
CONTROL_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID, *ROLE_IDS.values(), END_OF_TURN_ID})

MODEL_TYPES = ("bpe", "unigram", "char")
# Pinned, not os.cpu_count(): the thread count is part of the model file (see module docstring).
DEFAULT_TRAIN_THREADS = 4
# SentencePiece silently skips training sentences longer than this many bytes, so longer texts
# are cut into chunks at line boundaries before they reach the trainer.
_MAX_SENTENCE_BYTES = 8192

# The file a SentencePiece tokenizer is saved as inside a run directory.
SENTENCEPIECE_FILE = "tokenizer.model"
# The file that marks a Hugging Face tokenizer directory (see `jaxlm.hf_tokenizer`).
HF_TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class TokenizerLike(Protocol):
  """What every jaxlm tokenizer provides (see the module docstring's table)."""

  vocab_size: int
  content_hash: str
  pad_id: int
  bos_id: int | None
  eos_id: int
  special_ids: frozenset[int]

  @property
  def chat_format(self) -> "ChatFormat": ...

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

  def id_to_piece(self, i: int) -> str: ...

  def save(self, directory: str | os.PathLike) -> None: ...


def bos_prefix(tokenizer: TokenizerLike) -> list[int]:
  """``[bos_id]``, or ``[]`` for a tokenizer without bos: what opens a document."""
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def load_tokenizer(directory: str | os.PathLike, **hf_options) -> TokenizerLike:
  """The tokenizer a directory holds (a run directory or an imported model's directory).

  ``tokenizer.model`` there means jaxlm's SentencePiece tokenizer; otherwise ``tokenizer.json``
  means a Hugging Face one (`jaxlm.hf_tokenizer.HFTokenizer`, which takes `hf_options`, e.g.
  ``date_string`` for Llama 3.1/3.2 templates). SentencePiece wins when both exist, because only
  jaxlm writes ``tokenizer.model`` into a run directory.

  Raises:
    FileNotFoundError: naming the directory, when it holds neither file (or does not exist).
    ValueError: a file that is there but is not a valid tokenizer (the message names it).
  """
  directory = os.fspath(directory)
  sp_path = os.path.join(directory, SENTENCEPIECE_FILE)
  if os.path.isfile(sp_path):
    return Tokenizer.load(sp_path)
  if os.path.isfile(os.path.join(directory, HF_TOKENIZER_FILE)):
    from jaxlm import hf_tokenizer  # Deferred: only imported models need tokenizers/jinja2.
    return hf_tokenizer.HFTokenizer.load(directory, **hf_options)
  what = "directory does not exist" if not os.path.isdir(directory) else "it holds neither"
  raise FileNotFoundError(
      f"no tokenizer in {directory}: expected {SENTENCEPIECE_FILE} (jaxlm's SentencePiece "
      f"tokenizer) or {HF_TOKENIZER_FILE} (a Hugging Face tokenizer), but the {what}")


def check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> list[int]:
  """`ids` as a list, or ValueError unless they are a 1-D integer sequence in [0, vocab_size)."""
  array = np.asarray(ids)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"expected a 1-D sequence of integer ids, got shape {array.shape} {array.dtype}")
  if array.size and (array.min() < 0 or array.max() >= vocab_size):
    bad = array[(array < 0) | (array >= vocab_size)][0]
    raise ValueError(f"token id {bad} out of range [0, {vocab_size})")
  return array.tolist()


def _chunks(text: str, max_bytes: int) -> Iterator[str]:
  """Splits `text` into pieces of at most `max_bytes` UTF-8 bytes, preferring line boundaries."""
  if len(text.encode("utf-8")) <= max_bytes:
    yield text
    return
  chunk, size = [], 0
  for line in text.splitlines(keepends=True):
    n = len(line.encode("utf-8"))
    if size + n > max_bytes and chunk:
      yield "".join(chunk)
      chunk, size = [], 0
    if n > max_bytes:
      # One huge line: cut by characters; 4 bytes is the longest UTF-8 encoding of a char.
      step = max_bytes // 4
      yield from (line[i:i + step] for i in range(0, len(line), step))
      continue
    chunk.append(line)
    size += n
  if chunk:
    yield "".join(chunk)


def _training_sentences(texts: Iterable[str], max_texts: int | None, max_sentences: int,
                        seed: int) -> list[str]:
  """Chunks the corpus and keeps a seeded uniform sample of at most `max_sentences` chunks.

  Reservoir sampling (Algorithm R) in one pass, so a corpus larger than memory streams through.
  Below the limit nothing is random: every chunk is kept, in corpus order.
  """
  rng = random.Random(seed)
  kept: list[str] = []
  seen = 0
  for n, text in enumerate(texts if max_texts is None else itertools.islice(texts, max_texts)):
    if not isinstance(text, str):
      raise TypeError(f"training texts must be str, got {type(text).__name__} (text {n})")
    for chunk in _chunks(text, _MAX_SENTENCE_BYTES) if text else ():
      seen += 1
      if len(kept) < max_sentences:
        kept.append(chunk)
      else:
        # random() (not randrange) because its stream is stable across Python versions.
        j = int(rng.random() * seen)
        if j < max_sentences:
          kept[j] = chunk
  return kept


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    seed: int = 0,
    max_texts: int | None = None,
    input_sentence_size: int = 200_000,
    character_coverage: float = 0.9995,
    num_threads: int = DEFAULT_TRAIN_THREADS,
) -> "Tokenizer":
  """Trains a SentencePiece tokenizer with jaxlm's fixed special ids and writes it atomically.

  Args:
    texts: the training corpus, one document per item (may contain newlines; long documents
      are cut at line boundaries into chunks the trainer accepts).
    model_path: where to write the ``.model`` file (written to a temporary file, then renamed).
    vocab_size: total number of pieces including the 8 special ids and, with byte fallback,
      the 256 byte pieces. For ``"char"`` it is an upper bound: the vocabulary is the special
      pieces plus the characters of the corpus (see `Tokenizer.vocab_size` for the real size).
    model_type: ``"bpe"``, ``"unigram"`` or ``"char"``.
    byte_fallback: spell characters outside the vocabulary as UTF-8 byte pieces.
    seed: seeds the sampling of `input_sentence_size` chunks (unused when the corpus is
      smaller than that).
    max_texts: read at most this many texts from `texts` (bounds the time spent iterating a
      huge corpus; sampling within what is read is `input_sentence_size`'s job).
    input_sentence_size: train on a seeded uniform sample of at most this many chunks (a chunk
      is a text, or a <= 8 KiB piece of a longer one). They are held in memory, as the
      trainer holds them anyway; 200k documents are plenty for vocabularies up to ~64k.
    character_coverage: fraction of characters (by frequency) that get their own piece; the
      rest go through bytes (or ``<unk>`` without byte fallback).
    num_threads: trainer threads. Part of the model file and of the result for ``"unigram"``:
      keep it fixed across machines for byte-identical models.

  Returns:
    The trained tokenizer, loaded from the bytes that were written.

  Raises:
    ValueError: bad arguments, an empty corpus, or a `vocab_size` the corpus cannot support
      (too small for the special, byte and required character pieces, or too large for BPE to
      find that many merges); the message is SentencePiece's, which says which bound to use.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  if input_sentence_size < 1:
    raise ValueError(f"input_sentence_size must be >= 1, got {input_sentence_size}")
  sentences = _training_sentences(texts, max_texts, input_sentence_size, seed)
  if not sentences:
    raise ValueError("train_tokenizer: no training texts (the corpus is empty)")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        control_symbols=list(_CONTROL_SYMBOLS),
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=character_coverage,
        input_sentence_size=0,  # Sampled above, reproducibly; the trainer takes them all.
        shuffle_input_sentence=False,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=2,  # The trainer's progress log is noise in experiment output.
    )
  except RuntimeError as e:
    # The vocabulary must hold the 8 special pieces, 256 byte pieces (with byte fallback) and
    # one piece per character kept by `character_coverage`; SentencePiece's message has numbers.
    raise ValueError(
        f"train_tokenizer(vocab_size={vocab_size}, model_type={model_type!r}, "
        f"byte_fallback={byte_fallback}) failed: {e}") from None
  data = model.getvalue()
  tokenizer = Tokenizer.from_bytes(data)
  files.atomic_write(model_path, data)
  return tokenizer


class Tokenizer:
  """A loaded jaxlm SentencePiece model (a `TokenizerLike`).

  Cheap to pickle (only the model bytes travel), so it can be handed to data-loader workers.
  Two tokenizers are equal iff their model files are byte-identical.

  Attributes:
    model_bytes: the serialized model, exactly the ``.model`` file.
    content_hash: sha256 hex digest of `model_bytes`; identifies the tokenizer in manifests.
    vocab_size: number of pieces (ids are ``0 .. vocab_size - 1``).
    pad_id, bos_id, eos_id, unk_id, end_of_turn_id: the fixed special ids (0, 1, 2, 3, 7).
    special_ids: pad, bos, eos, the role markers and end of turn (what `decode` drops).
    chat_format: `jaxlm.chat_template.JaxlmFormat`, the role-marker layout.
  """

  def __init__(self, model_bytes: bytes, *, source: str = "<bytes>"):
    """Loads a model from its bytes; `source` names it in error messages (e.g. the path)."""
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(bytes(model_bytes))
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from None
    _check_layout(processor, source)
    self._sp = processor
    self.model_bytes = bytes(model_bytes)
    self.content_hash = hashlib.sha256(self.model_bytes).hexdigest()
    self.vocab_size = processor.GetPieceSize()
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
    self.end_of_turn_id = END_OF_TURN_ID
    self.special_ids = CONTROL_IDS
    self._chat_format = None

  @property
  def chat_format(self) -> "ChatFormat":
    """jaxlm's own chat format (built on first use; chat_template imports this module)."""
    if self._chat_format is None:
      from jaxlm import chat_template
      self._chat_format = chat_template.JaxlmFormat(self)
    return self._chat_format

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Reads a ``.model`` file; errors name the path (missing, unreadable, corrupt, not ours)."""
    path = os.fspath(path)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      raise FileNotFoundError(f"tokenizer model not found: {path}") from None
    except OSError as e:
      raise OSError(f"cannot read tokenizer model {path}: {e}") from None
    return cls(data, source=path)

  @classmethod
  def from_bytes(cls, data: bytes) -> "Tokenizer":
    """Loads a model from the bytes of a ``.model`` file."""
    return cls(data)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model file atomically (temporary file, then rename).

    `path` is an existing directory (a run directory: the file becomes
    ``<path>/tokenizer.model``, as `load_tokenizer` expects) or the file's own path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, SENTENCEPIECE_FILE)
    files.atomic_write(path, self.model_bytes)

  def role_id(self, role: str) -> int:
    """The id of the marker that opens a `role` turn ("system", "user" or "assistant")."""
    try:
      return ROLE_IDS[role]
    except KeyError:
      raise ValueError(f"unknown role {role!r}; expected one of {tuple(ROLE_IDS)}") from None

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos. Special-token strings in `text` are encoded as plain text."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts in one call, in parallel in C++ (`num_threads` -1: all cores)."""
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"encode_batch expects str items, got {type(text).__name__} at {i}")
    if not texts:
      return []
    return self._sp.Encode(texts, num_threads=num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids [T] -> text. Pad/bos/eos/role/end-of-turn ids are dropped; unk becomes " ⁇ "."""
    ids = self._check_ids(ids)
    return self._sp.DecodeIds([i for i in ids if i not in CONTROL_IDS])

  def id_to_piece(self, i: int) -> str:
    """The piece string of id `i` (``▁`` marks a space; ``<0x41>`` is a byte piece)."""
    (i,) = self._check_ids([i])
    return self._sp.IdToPiece(i)

  def _check_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
    return check_ids(ids, self.vocab_size)

  def __getstate__(self) -> dict:
    return {"model_bytes": self.model_bytes}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_bytes"])

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Tokenizer) and other.content_hash == self.content_hash

  def __hash__(self) -> int:
    return hash(self.content_hash)

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, content_hash={self.content_hash[:12]}...)"


# The name says which kind it is where both kinds are discussed; `Tokenizer` stays for the
# SentencePiece class because every stage and test already uses it.
SentencePieceTokenizer = Tokenizer


def _check_layout(processor: spm.SentencePieceProcessor, source: str) -> None:
  """Refuses models whose special ids differ from the fixed layout everyone codes against."""
  if processor.GetPieceSize() <= NUM_SPECIAL_IDS:
    raise ValueError(f"{source}: not a jaxlm tokenizer (only {processor.GetPieceSize()} pieces)")
  for i, piece in enumerate(_SPECIAL_PIECES):
    kind_ok = processor.IsUnknown(i) if i == UNK_ID else processor.IsControl(i)
    if processor.IdToPiece(i) != piece or not kind_ok:
      raise ValueError(
          f"{source}: not a jaxlm tokenizer: id {i} is {processor.IdToPiece(i)!r}, expected the "
          f"{'unknown' if i == UNK_ID else 'control'} piece {piece!r} "
          "(train one with jaxlm.tokenizer.train_tokenizer)")
