"""Local-file readers: valid files round-trip, every bad input names its file and line."""

import gzip
import json
import os
import random
import tempfile

import hypothesis
from hypothesis import strategies as st
import pytest

from jaxlm.data import readers
from jaxlm.data import schemas
from jaxlm.data.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
RECORDS = {
    "text": {"text": "Once upon a time."},
    "chat": CHAT,
    "preference": {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
    "prompt": {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
}


def write(path, content):
  data = content.encode("utf-8") if isinstance(content, str) else content
  path.write_bytes(data)
  return str(path)


def jsonl(*objs):
  return "".join(json.dumps(o) + "\n" for o in objs)


def raises_at(where, *fragments):
  """Context manager: a DataError whose `where` is exactly `where` and whose text has fragments."""

  class _Check:

    def __enter__(self):
      self._ctx = pytest.raises(DataError)
      self._info = self._ctx.__enter__()
      return self._info

    def __exit__(self, *exc):
      suppressed = self._ctx.__exit__(*exc)
      err = self._info.value
      assert err.where == where, str(err)
      assert str(err).startswith(f"{where}: "), str(err)
      for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
      return suppressed

  return _Check()


# --- expand_paths --------------------------------------------------------------------------------


def test_expand_paths_sorted_and_files_only(tmp_path):
  for name in ["b.jsonl", "a.jsonl", "c.txt"]:
    write(tmp_path / name, "x")
  (tmp_path / "d.jsonl").mkdir()
  assert readers.expand_paths(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
  assert readers.expand_paths(str(tmp_path / "c.txt")) == [str(tmp_path / "c.txt")]
  (tmp_path / "sub").mkdir()
  write(tmp_path / "sub" / "e.jsonl", "x")
  assert readers.expand_paths(str(tmp_path / "**" / "*.jsonl"))[-1] == str(tmp_path / "sub" / "e.jsonl")


def test_expand_paths_errors(tmp_path):
  pattern = str(tmp_path / "*.jsonl")
  with raises_at(pattern, "matches no file"):
    readers.expand_paths(pattern)
  with raises_at(str(tmp_path / "missing.jsonl"), "no such file"):
    readers.expand_paths(str(tmp_path / "missing.jsonl"))
  with raises_at(str(tmp_path), "directory"):
    readers.expand_paths(str(tmp_path))
  with pytest.raises(DataError):
    readers.expand_paths("  ")


# --- JSONL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_jsonl_round_trip(tmp_path, kind):
  record = RECORDS[kind]
  path = write(tmp_path / "x.jsonl", jsonl(record, record))
  got = list(readers.read_jsonl([path], kind))
  expected = schemas.validate(kind, record, "")
  assert got == [(f"{path}:1", expected), (f"{path}:2", expected)]


def test_jsonl_meta_keeps_extra_keys(tmp_path):
  path = write(tmp_path / "x.jsonl", jsonl({**CHAT, "id": 7, "source": "web", "meta": {"lang": "en"}}))
  [(_, record)] = readers.read_jsonl([path], "chat")
  assert record["meta"] == {"id": 7, "source": "web", "lang": "en"}
  assert set(record) == {"messages", "meta"}


def test_jsonl_blank_lines_skipped_line_numbers_kept(tmp_path):
  path = write(tmp_path / "x.jsonl", "\n" + json.dumps(CHAT) + "\r\n   \n\t\n" + json.dumps(CHAT))  # No final newline.
  assert [where for where, _ in readers.read_jsonl([path], "chat")] == [f"{path}:2", f"{path}:5"]


def test_jsonl_bom_is_ignored(tmp_path):
  path = write(tmp_path / "x.jsonl", b"\xef\xbb\xbf" + jsonl(RECORDS["text"]).encode())
  assert [r for _, r in readers.read_jsonl([path], "text")] == [RECORDS["text"]]


def test_jsonl_files_in_order(tmp_path):
  a = write(tmp_path / "a.jsonl", jsonl({"text": "a1"}, {"text": "a2"}))
  b = write(tmp_path / "b.jsonl", jsonl({"text": "b1"}))
  assert [r["text"] for _, r in readers.read_jsonl([a, b], "text")] == ["a1", "a2", "b1"]


def test_jsonl_bad_json_names_line_and_column(tmp_path):
  path = write(tmp_path / "x.jsonl", jsonl(CHAT) + '{"messages": [}\n')
  with raises_at(f"{path}:2", "invalid JSON", "column 15"):
    list(readers.read_jsonl([path], "chat"))


@pytest.mark.parametrize("bad, fragment", [
    ({"messages": [{"role": "user", "content": "x"}]}, "assistant"),
    ({"msgs": []}, "missing field 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "non-empty"),
    ({"messages": [{"role": "user"}]}, "missing 'content'"),
    ([1, 2], "expected a JSON object"),
])
def test_jsonl_schema_errors_name_line(tmp_path, bad, fragment):
  path = write(tmp_path / "x.jsonl", jsonl(CHAT, CHAT) + "\n" + jsonl(bad))
  with raises_at(f"{path}:4", fragment):
    list(readers.read_jsonl([path], "chat"))


def test_jsonl_non_utf8_names_line_and_byte(tmp_path):
  data = jsonl(RECORDS["text"]).encode() + b'{"text": "caf\xe9"}\n'
  path = write(tmp_path / "x.jsonl", data)
  with raises_at(f"{path}:2", "UTF-8", "byte offset 13 of the line", f"offset {len(jsonl(RECORDS['text'])) + 13} in the file"):
    list(readers.read_jsonl([path], "text"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_file_names_file(tmp_path, content):
  good = write(tmp_path / "a.jsonl", jsonl(RECORDS["text"]))
  path = write(tmp_path / "b.jsonl", content)
  with raises_at(path, "no records"):
    list(readers.read_jsonl([good, path], "text"))


def test_jsonl_error_in_second_file_names_it(tmp_path):
  a = write(tmp_path / "a.jsonl", jsonl(RECORDS["text"]))
  b = write(tmp_path / "b.jsonl", jsonl(RECORDS["text"]) + "nope\n")
  with raises_at(f"{b}:2", "invalid JSON"):
    list(readers.read_jsonl([a, b], "text"))


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "bad \\ud800 surrogate"}', "surrogate"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ('{"text": "x", "n": ' + "9" * 5000 + "}", "invalid JSON"),
])
def test_jsonl_pathological_lines(tmp_path, line, fragment):
  path = write(tmp_path / "x.jsonl", line + "\n")
  with raises_at(f"{path}:1", fragment):
    list(readers.read_jsonl([path], "text"))


def test_jsonl_unreadable_path(tmp_path):
  with raises_at(str(tmp_path / "nope.jsonl"), "cannot open"):
    list(readers.read_jsonl([str(tmp_path / "nope.jsonl")], "text"))


# --- plain text ----------------------------------------------------------------------------------


def test_text_blank_line_blocks(tmp_path):
  path = write(tmp_path / "t.txt", "\n\nFirst para\n  second line  \n\n \t\nSecond para\r\nmore\r\n\n\nThird")
  assert list(readers.read_text_documents([path])) == [
      (f"{path}:3", "First para\n  second line  "),
      (f"{path}:7", "Second para\nmore"),
      (f"{path}:11", "Third"),
  ]


def test_text_docs_per_file(tmp_path):
  a = write(tmp_path / "a.txt", "\nOne\n\nTwo\r\n\n")
  b = write(tmp_path / "b.txt", "Three")
  assert list(readers.read_text_documents([a, b], docs_per_file=True)) == [(f"{a}:1", "One\n\nTwo"), (f"{b}:1", "Three")]


def test_text_non_utf8_names_line(tmp_path):
  path = write(tmp_path / "t.txt", b"fine\n\nalso fine\n\xff\xfe bad\n")
  with raises_at(f"{path}:4", "UTF-8", "byte offset 0"):
    list(readers.read_text_documents([path]))
  with raises_at(f"{path}:4", "UTF-8"):
    list(readers.read_text_documents([path], docs_per_file=True))


@pytest.mark.parametrize("docs_per_file", [False, True])
def test_text_empty_file_names_file(tmp_path, docs_per_file):
  path = write(tmp_path / "t.txt", " \n\n")
  with raises_at(path, "no text"):
    list(readers.read_text_documents([path], docs_per_file=docs_per_file))


# --- gzip ----------------------------------------------------------------------------------------


def gz_write(path, content):
  data = content.encode("utf-8") if isinstance(content, str) else content
  path.write_bytes(gzip.compress(data))
  return str(path)


def test_gzip_jsonl_reads_like_plain(tmp_path):
  content = "\n" + jsonl(CHAT, {**CHAT, "id": 2}) + "  \n" + json.dumps(CHAT)  # Blank lines, no final newline.
  plain = write(tmp_path / "x.jsonl", content)
  for name in ("x.jsonl.gz", "x.JSONL.GZ", "x.gz"):
    packed = gz_write(tmp_path / name, content)
    got = list(readers.read_jsonl([packed], "chat"))
    assert got == [(where.replace(plain, packed), record) for where, record in readers.read_jsonl([plain], "chat")]
    assert [where for where, _ in got] == [f"{packed}:2", f"{packed}:3", f"{packed}:5"]  # Decompressed lines.


@pytest.mark.parametrize("docs_per_file", [False, True])
def test_gzip_text_reads_like_plain(tmp_path, docs_per_file):
  content = b"\xef\xbb\xbfOne para\r\nstill one\n\n\nTwo\n"
  plain = list(readers.read_text_documents([write(tmp_path / "t.txt", content)], docs_per_file=docs_per_file))
  packed = gz_write(tmp_path / "t.txt.gz", content)
  got = list(readers.read_text_documents([packed], docs_per_file=docs_per_file))
  assert [doc for _, doc in got] == [doc for _, doc in plain] and len(got) == (1 if docs_per_file else 2)
  assert got[-1][0] == f"{packed}:{1 if docs_per_file else 5}"


@pytest.mark.parametrize("name", ["data.jsonl", "data.txt", "data"])
def test_gzip_data_without_suffix_says_so(tmp_path, name):
  path = write(tmp_path / name, gzip.compress(jsonl(RECORDS["text"]).encode()))
  with raises_at(path, "gzip-compressed", "'.gz'", f"{name}.gz", "decompress"):
    list(readers.read_jsonl([path], "text"))
  with raises_at(path, "gzip-compressed"):
    list(readers.read_text_documents([path]))
  with raises_at(path, "gzip-compressed"):  # A whole-file problem: never skipped.
    list(readers.read_jsonl([path], "text", skipped=[]))


def _compressed_lines(n=200):
  rng = random.Random(0)  # Incompressible enough that half the bytes hold about half the lines.
  records = ({"text": "".join(rng.choice("abcdefgh ") for _ in range(60))} for _ in range(n))
  return gzip.compress(jsonl(*records).encode())


@pytest.mark.parametrize("mangle", [
    lambda d: d[:len(d) // 2],  # Truncated mid-stream.
    lambda d: d[:-4],  # Truncated trailer.
    lambda d: d[:5],  # Truncated header.
    lambda d: d[:len(d) // 2] + bytes(b ^ 0xA5 for b in d[len(d) // 2:len(d) // 2 + 8]) + d[len(d) // 2 + 8:],
])
def test_corrupt_gzip_names_file(tmp_path, mangle):
  path = write(tmp_path / "x.jsonl.gz", mangle(_compressed_lines()))
  with raises_at(path, "corrupt or truncated gzip"):
    list(readers.read_jsonl([path], "text"))
  with raises_at(path, "corrupt or truncated gzip"):
    list(readers.read_jsonl([path], "text", skipped=[]))
  with raises_at(path, "corrupt or truncated gzip"):
    list(readers.read_text_documents([path]))


def test_gz_suffix_on_plain_text_names_file(tmp_path):
  path = write(tmp_path / "x.jsonl.gz", jsonl(RECORDS["text"]))
  with raises_at(path, "not a gzip file", "drop the suffix"):
    list(readers.read_jsonl([path], "text"))


def test_gzip_bad_utf8_offsets_are_of_decompressed_text(tmp_path):
  first = jsonl(RECORDS["text"]).encode()
  path = gz_write(tmp_path / "x.jsonl.gz", first + b'{"text": "caf\xe9"}\n')
  with raises_at(f"{path}:2", "byte offset 13 of the line", f"offset {len(first) + 13} in the decompressed text"):
    list(readers.read_jsonl([path], "text"))


# --- skipping bad records ------------------------------------------------------------------------


def test_jsonl_skip_collects_bad_lines(tmp_path):
  good = json.dumps(RECORDS["text"])
  lines = [good, '{"text": ', "", json.dumps({"txt": "x"}), b'{"text": "caf\xe9"}', "[1]", good, "  "]
  path = write(tmp_path / "x.jsonl", b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines))
  skipped = []
  got = list(readers.read_jsonl([path], "text", skipped=skipped))
  assert [where for where, _ in got] == [f"{path}:1", f"{path}:7"]
  assert [s["where"] for s in skipped] == [f"{path}:2", f"{path}:4", f"{path}:5", f"{path}:6"]
  reasons = [s["reason"] for s in skipped]
  assert reasons[0].startswith("invalid JSON at column")
  assert reasons[1].startswith("missing field 'text'")
  assert reasons[2].startswith("not valid UTF-8") and reasons[3].startswith("expected a JSON object")
  with raises_at(f"{path}:2", "invalid JSON"):  # Without a list: the first bad line raises, as before.
    list(readers.read_jsonl([path], "text"))


def test_jsonl_skip_all_invalid_file_is_not_empty(tmp_path):
  bad = write(tmp_path / "bad.jsonl", "nope\n\n[]\n")
  skipped = []
  assert list(readers.read_jsonl([bad], "text", skipped=skipped)) == [] and len(skipped) == 2
  empty = write(tmp_path / "empty.jsonl", "\n \n")
  with raises_at(empty, "no records"):  # A whole-file problem: never skipped.
    list(readers.read_jsonl([empty], "text", skipped=[]))
  with raises_at(str(tmp_path / "missing.jsonl"), "cannot open"):
    list(readers.read_jsonl([str(tmp_path / "missing.jsonl")], "text", skipped=[]))


@pytest.mark.parametrize("docs_per_file", [False, True])
def test_text_skip_drops_documents_with_bad_bytes(tmp_path, docs_per_file):
  path = write(tmp_path / "t.txt", b"good one\n\nbad \xff here\nrest of it\n\ngood two\n")
  other = write(tmp_path / "u.txt", "fine\n")
  skipped = []
  got = list(readers.read_text_documents([path, other], docs_per_file=docs_per_file, skipped=skipped))
  if docs_per_file:
    assert got == [(f"{other}:1", "fine")]
  else:
    assert got == [(f"{path}:1", "good one"), (f"{path}:6", "good two"), (f"{other}:1", "fine")]
  [entry] = skipped
  assert entry["where"] == f"{path}:3" and entry["reason"].startswith("not valid UTF-8")
  assert entry["reason"].endswith(f"(skipped the document at {path}:{1 if docs_per_file else 3})")


def test_invalid_options_and_fraction():
  readers.check_invalid_options("skip", 0.0)
  readers.check_invalid_options("error", 1)
  for bad in ("ignore", None, "SKIP"):
    with pytest.raises(ValueError, match=r"^invalid: expected one of \('error', 'skip'\)"):
      readers.check_invalid_options(bad, 0.01)
  for bad in (-0.01, 1.5, float("nan"), "0.1", True, None):
    with pytest.raises(ValueError, match=r"^max_invalid_fraction: expected a number in \[0, 1\]"):
      readers.check_invalid_options("skip", bad)
  entries = [{"where": f"f:{i}", "reason": "bad " * 100} for i in range(5)]
  readers.check_invalid_fraction("src", 99, entries[:1], 0.01)  # 1 of 100 is not more than 1%.
  readers.check_invalid_fraction("src", 0, [], 0.0)
  with pytest.raises(DataError, match=r"^src: 2 of 101 records read \(1\.98%\) are invalid, more than "
                     r"max_invalid_fraction=0\.01; the first: f:0: bad .*; f:1: .*larger max_invalid_fraction"):
    readers.check_invalid_fraction("src", 99, entries[:2], 0.01)
  with pytest.raises(DataError, match=r"the first: f:0: .*; f:1: .*; f:2: .*; and 2 more") as e:
    readers.check_invalid_fraction("src", 5, entries, 0.1)
  assert len(str(e.value)) < 1000  # Long reasons are shortened.
  with pytest.raises(DataError, match=r"^src: no valid records: all 5 records read are invalid"):
    readers.check_invalid_fraction("src", 0, entries, 1.0)


# --- preference pairs with an empty side ---------------------------------------------------------

_PROMPT = [{"role": "user", "content": "Hi?"}]
_TRANSCRIPT = "\n\nHuman: Hi?\n\nAssistant:"


@pytest.mark.parametrize("record, side, fragment", [
    ({"prompt": _PROMPT, "chosen": "", "rejected": "no"}, "chosen", "(the chosen reply is empty)"),
    ({"prompt": _PROMPT, "chosen": "yes", "rejected": ""}, "rejected", "(the rejected reply is empty)"),
    ({"prompt": _PROMPT, "chosen": " \n\t", "rejected": "no"}, "chosen", "(the chosen reply is only whitespace"),
    ({"prompt": _PROMPT, "chosen": "yes", "rejected": "  "}, "rejected", "(the rejected reply is only whitespace"),
    ({"chosen": "", "rejected": _TRANSCRIPT + " no"}, "chosen", "(the chosen reply is empty)"),
    ({"chosen": _TRANSCRIPT + " yes", "rejected": ""}, "rejected", "(the rejected reply is empty)"),
    ({"chosen": "   ", "rejected": _TRANSCRIPT + " no"}, "chosen", "(the chosen reply is only whitespace"),
    # HH-RLHF: a transcript that ends with the assistant's marker and no reply.
    ({"chosen": _TRANSCRIPT, "rejected": _TRANSCRIPT + " no"}, "chosen",
     "(the chosen reply is empty: the transcript ends with 'Assistant:'"),
    ({"chosen": _TRANSCRIPT + " yes", "rejected": _TRANSCRIPT + "  \n"}, "rejected", "(the rejected reply is empty"),
])
def test_preference_empty_side_is_named(tmp_path, record, side, fragment):
  path = write(tmp_path / "p.jsonl", jsonl(RECORDS["preference"]) + jsonl(record))
  with raises_at(f"{path}:2", f"field {side!r}: expected non-empty text", fragment):
    list(readers.read_jsonl([path], "preference"))


def test_preference_transcript_with_replies_still_splits(tmp_path):
  path = write(tmp_path / "p.jsonl", jsonl({"chosen": _TRANSCRIPT + " Yes.", "rejected": _TRANSCRIPT + " No."}))
  [(_, record)] = readers.read_jsonl([path], "preference")
  assert (record["prompt"], record["chosen"], record["rejected"]) == (_PROMPT, "Yes.", "No.")


# --- fuzzing -------------------------------------------------------------------------------------

_valid_line = st.sampled_from([json.dumps(r) for r in RECORDS.values()] + [""]).map(str.encode)
_any_line = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"{", b'{"text": ""}', b'{"text": 1}', b"null", b'{"text": "\\udc80"}', b"\xef\xbb\xbf{}",
                     b'{"prompt": [{"role": "user", "content": "x"}]}', b"NaN", b"\r", b"\x00"]),
)


def _check_fuzz_outcome(path, kind, lines):
  """Reads `lines` (bytes, no newlines) as JSONL; the only allowed failure is DataError at path:line."""
  with open(path, "wb") as f:
    f.write(b"\n".join(lines))
  try:
    records = list(readers.read_jsonl([path], kind))
  except DataError as e:
    if e.where == path:  # Whole-file error: only when there is no record at all, or gzip data.
      assert "no records" in e.reason or "gzip-compressed" in e.reason, e.reason
      return
    assert e.where.startswith(f"{path}:"), e.where
    line = int(e.where[len(path) + 1:])
    assert 1 <= line <= max(1, len(lines)), (line, len(lines))
    return
  except Exception as e:  # pragma: no cover - this is the failure being fuzzed for.
    pytest.fail(f"read_jsonl raised {type(e).__name__} instead of DataError: {e}")
  for where, record in records:
    assert where.startswith(f"{path}:")
    assert schemas.validate(kind, record, where) == record  # Canonical already.
    json.dumps(record, ensure_ascii=False).encode("utf-8")


def _check_fuzz_skip_outcome(path, kind, lines):
  """With a skip list, only whole-file errors raise, and every non-blank line is kept or listed."""
  skipped = []
  try:
    records = list(readers.read_jsonl([path], kind, skipped=skipped))
  except DataError as e:
    assert e.where == path and ("no records" in e.reason or "gzip-compressed" in e.reason), str(e)
    return
  file_lines = b"\n".join(lines).split(b"\n")
  file_lines[0] = file_lines[0].removeprefix(b"\xef\xbb\xbf")

  def blank(line):
    try:
      return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
      return False  # Undecodable: a bad record, not a blank line.

  assert len(records) + len(skipped) == sum(1 for line in file_lines if not blank(line))
  wheres = [where for where, _ in records] + [s["where"] for s in skipped]
  assert len(set(wheres)) == len(wheres) and all(w.startswith(f"{path}:") for w in wheres)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    kind=st.sampled_from(schemas.KINDS),
    lines=st.lists(st.one_of(_valid_line, _any_line.map(lambda b: b.replace(b"\n", b" "))), max_size=8),
)
def test_fuzz_jsonl_only_data_errors(kind, lines):
  with tempfile.TemporaryDirectory() as tmp:
    _check_fuzz_outcome(os.path.join(tmp, "fuzz.jsonl"), kind, lines)
    _check_fuzz_skip_outcome(os.path.join(tmp, "fuzz.jsonl"), kind, lines)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(good=st.lists(_valid_line, min_size=0, max_size=5), bad=_any_line.map(lambda b: b.replace(b"\n", b" ")))
def test_fuzz_error_points_at_first_bad_line(good, bad):
  """Lines before the first arbitrary line are valid text records, so any error is at or after it."""
  good = [json.dumps(RECORDS["text"]).encode() if line else b"" for line in good]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "fuzz.jsonl")
    with open(path, "wb") as f:
      f.write(b"\n".join(good + [bad]))
    try:
      records = list(readers.read_jsonl([path], "text"))
    except DataError as e:
      if e.where == path:
        assert not any(good)
        return
      assert int(e.where.rsplit(":", 1)[1]) == len(good) + 1, (e.where, good, bad)
    else:
      assert len(records) >= sum(1 for line in good if line)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(kind=st.sampled_from(schemas.KINDS), data=st.binary(max_size=300))
def test_fuzz_whole_file_bytes(kind, data):
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "fuzz.jsonl")
    with open(path, "wb") as f:
      f.write(data)
    try:
      list(readers.read_jsonl([path], kind))
    except DataError as e:
      assert e.where == path or e.where.startswith(f"{path}:"), e.where
    try:
      list(readers.read_text_documents([path]))
    except DataError as e:
      assert e.where == path or e.where.startswith(f"{path}:"), e.where
