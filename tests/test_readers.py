"""Local-file readers: valid files round-trip, every bad input names its file and line."""

import json
import os
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
    if e.where == path:  # Whole-file error: only when there is no record at all.
      assert "no records" in e.reason
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


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    kind=st.sampled_from(schemas.KINDS),
    lines=st.lists(st.one_of(_valid_line, _any_line.map(lambda b: b.replace(b"\n", b" "))), max_size=8),
)
def test_fuzz_jsonl_only_data_errors(kind, lines):
  with tempfile.TemporaryDirectory() as tmp:
    _check_fuzz_outcome(os.path.join(tmp, "fuzz.jsonl"), kind, lines)


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
