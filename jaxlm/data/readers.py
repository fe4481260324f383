"""Readers for local files: streaming, validated, and exact about where bad input is.

Every problem raises `DataError` whose `where` is ``path:line`` (1-based), or just ``path``
for a whole-file problem (an empty file, an unreadable file), or the pattern for a glob that
matches nothing. Nothing is ever skipped silently, except blank lines as described below.

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
  * A file with no records at all (empty, or only blank lines) raises naming the file.

Plain text (`read_text_documents`)
  * Default: one document per *blank-line block*: a maximal run of lines that are not blank
    (a blank line is empty or only whitespace). The lines of a block are joined with ``\\n``
    (so ``\\r\\n`` files give the same documents), keeping each line's own indentation and
    trailing spaces; the ``where`` of a document is ``path:<first line of the block>``.
  * ``docs_per_file=True``: each file is one document, its whole text with ``\\r\\n``
    normalised to ``\\n`` and leading/trailing whitespace stripped; ``where`` is ``path:1``.
  * Non-UTF-8 bytes raise naming the line and byte offset; a file without any non-blank text
    raises naming the file.

`expand_paths` expands ``~`` and glob patterns (``*``, ``?``, ``[...]``, and ``**`` for any
depth), keeps regular files only, and sorts the result so the order of records is the same on
every machine.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, BinaryIO, Iterator, Sequence

from jaxlm.data import schemas
from jaxlm.data.errors import DataError

_BOM = b"\xef\xbb\xbf"


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


def _open(path: str) -> BinaryIO:
  try:
    return open(path, "rb")
  except OSError as e:
    raise DataError(path, f"cannot open file: {e.strerror or e}") from None


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line without its line ending) of a file."""
  with _open(path) as f:
    offset = 0
    lineno = 0
    while True:
      try:
        raw = f.readline()
      except OSError as e:
        raise DataError(f"{path}:{lineno + 1}", f"cannot read file: {e.strerror or e}") from None
      if not raw:
        return
      lineno += 1
      start = 0
      if lineno == 1 and raw.startswith(_BOM):
        start = len(_BOM)
      try:
        text = raw[start:].decode("utf-8")
      except UnicodeDecodeError as e:
        col = start + e.start
        bad = raw[col:col + 4]
        raise DataError(
            f"{path}:{lineno}",
            f"not valid UTF-8: byte {bad[:1]!r} at byte offset {col} of the line "
            f"(offset {offset + col} in the file); the file must be UTF-8 encoded",
        ) from None
      offset += len(raw)
      if text.endswith("\n"):
        text = text[:-1]
      if text.endswith("\r"):
        text = text[:-1]
      yield lineno, text


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


def read_jsonl(paths: Sequence[str], kind: str) -> Iterator[tuple[str, dict]]:
  """Streams validated records of `kind` from JSONL files, in file then line order.

  Args:
    paths: files to read, in order (e.g. from `expand_paths`).
    kind: one of `schemas.KINDS`.

  Yields:
    ``(where, record)`` with ``where = "path:line"`` and `record` in canonical form.

  Raises:
    DataError: naming ``path:line`` for any bad line, or the file if it has no records.
  """
  schemas.check_kind(kind)
  if isinstance(paths, str):
    paths = [paths]
  for path in paths:
    count = 0
    for lineno, text in _decoded_lines(path):
      if not text.strip():
        continue
      where = f"{path}:{lineno}"
      record = parse_jsonl_line(text, kind, where)
      count += 1
      yield where, record
    if not count:
      raise DataError(path, "no records: the file is empty or has only blank lines")


def read_text_documents(paths: Sequence[str], docs_per_file: bool = False) -> Iterator[tuple[str, str]]:
  """Streams documents from UTF-8 text files (see the module docstring for the rule).

  Yields:
    ``(where, document)`` with ``where = "path:line"`` of the document's first line.

  Raises:
    DataError: naming ``path:line`` for bad bytes, or the file if it has no text.
  """
  if isinstance(paths, str):
    paths = [paths]
  for path in paths:
    count = 0
    if docs_per_file:
      document = "\n".join(text for _, text in _decoded_lines(path)).strip()
      if document:
        count += 1
        yield f"{path}:1", document
    else:
      block: list[str] = []
      first = 0
      for lineno, text in _decoded_lines(path):
        if text.strip():
          if not block:
            first = lineno
          block.append(text)
        elif block:
          count += 1
          yield f"{path}:{first}", "\n".join(block)
          block = []
      if block:
        count += 1
        yield f"{path}:{first}", "\n".join(block)
    if not count:
      raise DataError(path, "no text: the file is empty or has only blank lines")
