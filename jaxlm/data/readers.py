"""Readers for local files: streaming, validated, and exact about where bad input is.

Every problem raises `DataError` whose `where` is ``path:line`` (1-based), or just ``path``
for a whole-file problem (an empty file, an unreadable file, a corrupt gzip file), or the
pattern for a glob that matches nothing. Nothing is ever skipped silently, except blank lines as
described below; bad records are skipped only on request (``skipped=[]``, below).

Gzip: a file whose name ends in ``.gz`` (``data.jsonl.gz``, ``book.txt.gz``, any ``*.gz``;
the suffix is matched case-insensitively) is decompressed while it is read (streamed with
`gzip`, never unpacked to disk); everything below then applies to the decompressed text, and
line numbers and byte offsets are those of the decompressed text. A ``.gz`` file that is not
gzip, or whose compressed data is corrupt or truncated, raises naming the file (and the last
line read). A file *without* the suffix whose first bytes are the gzip magic ``\\x1f\\x8b``
raises naming the file and saying to rename it with a ``.gz`` suffix or decompress it.

Skipping bad records (``skipped=<a list>``, default None = raise): a record-level problem
(JSONL: a line that is not valid UTF-8, not valid JSON, or fails its schema; plain text: a
document containing a line that is not valid UTF-8, which is dropped whole) is not raised but
appended to the list as ``{"where": "path:line", "reason": "..."}`` and the record is left
out. Whole-file problems (no such file, unreadable, an empty file, gzip data without the
suffix, a corrupt gzip file) always raise. `check_invalid_fraction` is the limit callers put
on how many may be skipped (`sources.open_source`'s ``max_invalid_fraction``).

JSONL (`read_jsonl`)
  * One JSON object per line, validated with `schemas.validate(kind, obj, "path:line")`, so the
    record comes back in canonical form (extra top-level keys move into `meta`).
  * Lines are split on ``\\n`` only (``\\r\\n`` is fine); a line that is empty or only
    whitespace is skipped. A UTF-8 byte-order mark at the start of a file is ignored.
  * Each line is decoded as strict UTF-8 on its own; a bad byte raises naming the line and the
    byte offset (within the line and within the file).
  * Bad JSON raises naming the line and the column of the JSON error. Strings that cannot be
    encoded as UTF-8 (unpaired ``\\ud800``-style surrogate escapes) are rejected too, since
    they could not be written to disk later.
  * A file with no records at all (empty, or only blank lines) raises naming the file. With
    ``skipped``, a file whose non-blank lines are all invalid is not an empty file: its lines
    are in the list (and count against the caller's limit).

Plain text (`read_text_documents`)
  * Default: one document per *blank-line block*: a maximal run of lines that are not blank
    (a blank line is empty or only whitespace). The lines of a block are joined with ``\\n``
    (so ``\\r\\n`` files give the same documents), keeping each line's own indentation and
    trailing spaces; the ``where`` of a document is ``path:<first line of the block>``.
  * ``docs_per_file=True``: each file is one document, its whole text with ``\\r\\n``
    normalised to ``\\n`` and leading/trailing whitespace stripped; ``where`` is ``path:1``.
  * Non-UTF-8 bytes raise naming the line and byte offset; a file without any non-blank text
    raises naming the file. With ``skipped``, a document (block, or file with
    ``docs_per_file``) that has a non-UTF-8 line is skipped whole (a line that cannot be decoded
    counts as non-blank), and the entry names that line.

`expand_paths` expands ``~`` and glob patterns (``*``, ``?``, ``[...]``, and ``**`` for any
depth), keeps regular files only, and sorts the result so the order of records is the same on
every machine.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Any, BinaryIO, Iterator, Sequence
import zlib

from jaxlm.data import schemas
from jaxlm.data.errors import DataError

_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
INVALID_MODES = ("error", "skip")


def expand_paths(pattern: str) -> list[str]:
  """Expands a path or glob into a sorted list of existing regular files.

  Raises:
    DataError: if the pattern is empty, names a directory, or matches no file.
  """
  if not isinstance(pattern, str) or not pattern.strip():
    raise DataError("", f"expected a file path or glob, got {pattern!r}")
  expanded = os.path.expanduser(pattern)
  if glob.has_magic(expanded):
    matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not matches:
      raise DataError(pattern, "the glob matches no file")
    return matches
  if os.path.isdir(expanded):
    raise DataError(pattern, f"is a directory; name its files with a glob, e.g. {os.path.join(pattern, '*.jsonl')!r}")
  if not os.path.isfile(expanded):
    raise DataError(pattern, "no such file")
  return [expanded]


def is_gzip_path(path: str) -> bool:
  """Whether `path` is read as gzip: its name ends in ``.gz`` (any case)."""
  return path.lower().endswith(".gz")


def _open(path: str) -> BinaryIO:
  try:
    return gzip.open(path, "rb") if is_gzip_path(path) else open(path, "rb")
  except OSError as e:
    raise DataError(path, f"cannot open file: {e.strerror or e}") from None


def _read_error(path: str, lineno: int, error: Exception) -> DataError:
  """The DataError for a failed read after `lineno` complete lines."""
  if not is_gzip_path(path):
    return DataError(f"{path}:{lineno + 1}", f"cannot read file: {getattr(error, 'strerror', None) or error}")
  # gzip raises BadGzipFile (an OSError) for a non-gzip header, zlib.error for corrupt data and
  # EOFError for a truncated file: all mean the file itself is bad, so name the file.
  detail = str(error) or type(error).__name__
  after = f"after line {lineno} of the decompressed text" if lineno else "before the first line"
  if isinstance(error, gzip.BadGzipFile) and not lineno and str(error).startswith("Not a gzipped file"):
    return DataError(path, f"is not a gzip file despite its '.gz' suffix ({detail}); drop the suffix if it "
                     "is plain text, or re-download it")
  return DataError(path, f"is a corrupt or truncated gzip file ({detail}; {after}); re-download it, or "
                   "check it with 'gzip -t'")


def _decoded_lines(path: str) -> Iterator[tuple[int, str, DataError | None]]:
  """Yields (1-based line number, decoded line without its line ending, None) of a (gzip) file.

  A line that is not valid UTF-8 is yielded as (line number, "", the DataError naming it), so a
  caller may skip it; whole-file problems raise.
  """
  gz = is_gzip_path(path)
  with _open(path) as f:
    offset = 0
    lineno = 0
    while True:
      try:
        raw = f.readline()
      except (OSError, EOFError, zlib.error) as e:
        raise _read_error(path, lineno, e) from None
      if not raw:
        return
      lineno += 1
      start = 0
      if lineno == 1 and raw.startswith(_GZIP_MAGIC) and not gz:
        raise DataError(path, "is gzip-compressed (it starts with the gzip magic bytes 1f 8b) but its name "
                        f"does not end in '.gz'; rename it to {os.path.basename(path) + '.gz'!r} so it is "
                        "decompressed while reading, or decompress it (gunzip)")
      if lineno == 1 and raw.startswith(_BOM):
        start = len(_BOM)
      try:
        text = raw[start:].decode("utf-8")
      except UnicodeDecodeError as e:
        col = start + e.start
        bad = raw[col:col + 4]
        in_file = "in the decompressed text" if gz else "in the file"
        yield lineno, "", DataError(
            f"{path}:{lineno}",
            f"not valid UTF-8: byte {bad[:1]!r} at byte offset {col} of the line "
            f"(offset {offset + col} {in_file}); the file must be UTF-8 encoded",
        )
        offset += len(raw)
        continue
      offset += len(raw)
      if text.endswith("\n"):
        text = text[:-1]
      if text.endswith("\r"):
        text = text[:-1]
      yield lineno, text, None


def _check_encodable(record: Any, where: str) -> None:
  """Rejects strings that are not valid Unicode (lone surrogates from JSON escapes)."""
  try:
    json.dumps(record, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(where, f"text contains an unpaired UTF-16 surrogate ({e.object[e.start:e.end]!r}), "
                    "e.g. from a '\\ud800' escape; it is not valid Unicode") from None


def parse_jsonl_line(text: str, kind: str, where: str) -> dict[str, Any]:
  """Parses and validates one non-blank JSONL line (already decoded)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(where, f"invalid JSON at column {e.colno}: {e.msg}") from None
  except RecursionError:
    raise DataError(where, "invalid JSON: nested too deeply") from None
  except ValueError as e:  # e.g. an integer with more digits than Python converts.
    raise DataError(where, f"invalid JSON: {e}") from None
  record = schemas.validate(kind, obj, where)
  _check_encodable(record, where)
  return record


def read_jsonl(paths: Sequence[str], kind: str, skipped: list[dict] | None = None) -> Iterator[tuple[str, dict]]:
  """Streams validated records of `kind` from JSONL files, in file then line order.

  Args:
    paths: files to read, in order (e.g. from `expand_paths`); ``*.gz`` files are gunzipped.
    kind: one of `schemas.KINDS`.
    skipped: None raises at the first bad line; a list makes bad lines (bad UTF-8, bad JSON,
      a schema error) be skipped, each appended as ``{"where": "path:line", "reason": ...}``.

  Yields:
    ``(where, record)`` with ``where = "path:line"`` and `record` in canonical form.

  Raises:
    DataError: naming ``path:line`` for a bad line (unless skipped), or the file for a
      whole-file problem (no non-blank line, unreadable, bad gzip).
  """
  schemas.check_kind(kind)
  if isinstance(paths, str):
    paths = [paths]
  for path in paths:
    lines = 0  # Non-blank lines, valid or not: a file of only invalid lines is not "empty".
    for lineno, text, error in _decoded_lines(path):
      if error is None and not text.strip():
        continue
      lines += 1
      where = f"{path}:{lineno}"
      try:
        if error is not None:
          raise error
        record = parse_jsonl_line(text, kind, where)
      except DataError as e:
        if skipped is None:
          raise
        skipped.append({"where": e.where, "reason": e.reason})
        continue
      yield where, record
    if not lines:
      raise DataError(path, "no records: the file is empty or has only blank lines")


def _documents(path: str, docs_per_file: bool) -> Iterator[tuple[str, str, DataError | None]]:
  """(where, document, None) per document of one file, or (where, "", the first bad-line error)."""
  if docs_per_file:
    texts, error = [], None
    for _, text, line_error in _decoded_lines(path):
      error = error or line_error
      texts.append(text)
    document = "\n".join(texts).strip()
    if error is not None or document:
      yield f"{path}:1", ("" if error else document), error
    return
  block: list[str] = []
  first, error = 0, None
  for lineno, text, line_error in _decoded_lines(path):
    if line_error is not None or text.strip():  # An undecodable line counts as text.
      if not block:
        first = lineno
      block.append(text)
      error = error or line_error
    elif block:
      yield f"{path}:{first}", ("" if error else "\n".join(block)), error
      block, error = [], None
  if block:
    yield f"{path}:{first}", ("" if error else "\n".join(block)), error


def read_text_documents(paths: Sequence[str], docs_per_file: bool = False,
                        skipped: list[dict] | None = None) -> Iterator[tuple[str, str]]:
  """Streams documents from UTF-8 text files (see the module docstring for the rule).

  Args:
    paths: files to read, in order; ``*.gz`` files are gunzipped.
    docs_per_file: one document per file instead of per blank-line block.
    skipped: None raises at bad bytes; a list makes a document with a non-UTF-8 line be
      skipped whole, appended as ``{"where": "path:<bad line>", "reason": ...}``.

  Yields:
    ``(where, document)`` with ``where = "path:line"`` of the document's first line.

  Raises:
    DataError: naming ``path:line`` for bad bytes (unless skipped), or the file if it has no
      text or is unreadable.
  """
  if isinstance(paths, str):
    paths = [paths]
  for path in paths:
    count = 0
    for where, document, error in _documents(path, docs_per_file):
      count += 1
      if error is None:
        yield where, document
      elif skipped is None:
        raise error
      else:
        skipped.append({"where": error.where, "reason": f"{error.reason} (skipped the document at {where})"})
    if not count:
      raise DataError(path, "no text: the file is empty or has only blank lines")


def check_invalid_options(invalid: str, max_invalid_fraction: float) -> None:
  """Raises ValueError naming the option unless ``invalid in INVALID_MODES`` and the fraction is in [0, 1]."""
  if not isinstance(invalid, str) or invalid not in INVALID_MODES:
    raise ValueError(f"invalid: expected one of {INVALID_MODES}, got {invalid!r}")
  if isinstance(max_invalid_fraction, bool) or not isinstance(max_invalid_fraction, (int, float)) \
      or not 0.0 <= max_invalid_fraction <= 1.0:  # Also rejects NaN.
    raise ValueError(f"max_invalid_fraction: expected a number in [0, 1], got {max_invalid_fraction!r}")


def check_invalid_fraction(where: str, num_valid: int, skipped: Sequence[dict], max_invalid_fraction: float) -> None:
  """Raises if more than `max_invalid_fraction` of the records read were skipped, or all were.

  Args:
    where: what was read, for the message (e.g. the source string).
    num_valid: records kept.
    skipped: the entries of the skipped records (see `read_jsonl`).
    max_invalid_fraction: the largest allowed ``len(skipped) / (num_valid + len(skipped))``.

  Raises:
    DataError: naming `where`, the count and fraction, and the first few skipped places.
  """
  if not skipped:
    return
  num_read = num_valid + len(skipped)
  fraction = len(skipped) / num_read
  if num_valid and fraction <= max_invalid_fraction:
    return
  first = "; ".join(f"{s['where']}: {_shorten(s['reason'])}" for s in skipped[:3])
  more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
  if not num_valid:
    head = f"no valid records: all {num_read} records read are invalid"
  else:
    head = (f"{len(skipped)} of {num_read} records read ({fraction:.2%}) are invalid, more than "
            f"max_invalid_fraction={max_invalid_fraction:g}")
  raise DataError(where, f"{head}; the first: {first}{more}. Fix or remove the bad records, or allow more "
                  "with a larger max_invalid_fraction")


def _shorten(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."
