"""Source strings: world / text / jsonl / tfds, splits, caching, crash and concurrency safety."""

import gzip
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm.data import builders
from jaxlm.data import readers
from jaxlm.data import schemas
from jaxlm.data import sources
from jaxlm.data.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def chat(i):
  return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
          "id": i}


def make_records(kind, n):
  if kind == "text":
    return [{"text": f"document {i}\nline two"} for i in range(n)]
  if kind == "chat":
    return [chat(i) for i in range(n)]
  prompt = lambda i: [{"role": "user", "content": f"prompt {i}"}]
  if kind == "prompt":
    return [{"prompt": prompt(i), "meta": {"i": i}} for i in range(n)]
  return [{"prompt": prompt(i), "chosen": f"good {i}", "rejected": f"bad {i}", "src": "t"} for i in range(n)]


def version_dirs(cache_dir):
  """All TFDS version directories (complete or not) under a cache dir."""
  found = []
  for root, dirs, _ in os.walk(cache_dir):
    found += [os.path.join(root, d) for d in dirs if d == builders.BUILDER_VERSION or d.startswith("incomplete.")]
  return sorted(found)


# --- source strings ------------------------------------------------------------------------------


@pytest.mark.parametrize("source, kind, split, error", [
    ("", "text", "train", ValueError),
    ("foo:bar", "text", "train", ValueError),
    ("data.jsonl", "chat", "train", ValueError),
    ("world:big", "chat", "train", ValueError),
    ("text:x.txt", "chat", "train", ValueError),
    ("jsonl:", "chat", "train", ValueError),
    ("jsonl:  ", "chat", "train", ValueError),
    ("tfds:", "text", "train", ValueError),
    ("world", "pictures", "train", ValueError),
    ("world", "chat", "dev", ValueError),
])
def test_bad_source_strings(tmp_path, source, kind, split, error):
  with pytest.raises(error):
    sources.open_source(source, kind, split, cache_dir=str(tmp_path))


def test_glob_matching_nothing(tmp_path):
  with pytest.raises(DataError, match="matches no file"):
    sources.open_source(f"jsonl:{tmp_path}/*.jsonl", "chat", "train", cache_dir=str(tmp_path / "cache"))


def test_default_cache_dir_is_expanded():
  assert os.path.isabs(sources.DEFAULT_CACHE_DIR) and "~" not in sources.DEFAULT_CACHE_DIR


# --- local files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_jsonl_every_kind_and_split(tmp_path, kind):
  path = write_jsonl(tmp_path / "data.jsonl", make_records(kind, 25))
  expected = [record for _, record in readers.read_jsonl([path], kind)]
  opened = {split: sources.open_source(f"jsonl:{path}", kind, split, cache_dir=str(tmp_path / "c"))
            for split in sources.SPLITS}
  # Holdout: the last ceil(25 * 0.1) = 3 records, in file order; test reads validation.
  assert list(opened["train"]) == expected[:22]
  assert list(opened["validation"]) == expected[22:]
  assert list(opened["test"]) == expected[22:]
  for split, src in opened.items():
    assert src.kind == kind and src.split == split
    assert src.description.startswith(f"jsonl:{path}@") and src.description.endswith(
        "[test=validation]" if split == "test" else f"[{split}]")


def test_text_source_paragraphs_and_docs_per_file(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\ntwo\nmore\n\n\nthree\n")
  (tmp_path / "b.txt").write_text("four\n\nfive\n")
  src = f"text:{tmp_path}/*.txt"
  train = sources.open_source(src, "text", "train", cache_dir=str(tmp_path / "c"))
  val = sources.open_source(src, "text", "validation", cache_dir=str(tmp_path / "c"))
  assert [r["text"] for r in train] == ["one", "two\nmore", "three", "four"]
  assert [r["text"] for r in val] == ["five"]
  per_file = sources.open_source(src, "text", "train", cache_dir=str(tmp_path / "c"), docs_per_file=True,
                                 holdout_fraction=0.5)
  assert [r["text"] for r in per_file] == ["one\n\ntwo\nmore\n\n\nthree"]
  assert per_file.description != train.description  # Options are part of the key.


@pytest.mark.parametrize("n, fraction, train, validation", [
    (10, 0.1, 9, 1), (15, 0.1, 13, 2), (30, 0.1, 27, 3), (2, 0.1, 1, 1), (5, 0.0, 5, 0), (100, 0.25, 75, 25)])
def test_holdout_sizes(n, fraction, train, validation):
  assert builders.holdout_sizes(n, fraction) == (train, validation)


def test_holdout_errors(tmp_path):
  path = write_jsonl(tmp_path / "one.jsonl", make_records("text", 1))
  with pytest.raises(DataError, match="cannot hold out"):
    sources.open_source(f"jsonl:{path}", "text", "train", cache_dir=str(tmp_path / "c"))
  with pytest.raises(ValueError, match="holdout_fraction"):
    sources.open_source(f"jsonl:{path}", "text", "train", cache_dir=str(tmp_path / "c"), holdout_fraction=1.0)
  everything = sources.open_source(f"jsonl:{path}", "text", "train", cache_dir=str(tmp_path / "c"), holdout_fraction=0)
  assert len(everything) == 1
  with pytest.raises(DataError, match="holdout_fraction=0"):
    sources.open_source(f"jsonl:{path}", "text", "test", cache_dir=str(tmp_path / "c"), holdout_fraction=0)


def test_local_cache_reuse_and_edit_reprepares(tmp_path, monkeypatch):
  path = tmp_path / "data.jsonl"
  write_jsonl(path, make_records("chat", 20))
  cache = str(tmp_path / "c")
  first = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache)

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a prepared dataset")

  with monkeypatch.context() as m:
    m.setattr(readers, "read_jsonl", fail)
    start = time.perf_counter()
    again = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache)
    assert time.perf_counter() - start < 1.0
  assert again.description == first.description and list(again) == list(first)

  write_jsonl(path, make_records("chat", 30))  # Edited: a new key, prepared again.
  edited = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache)
  assert edited.description != first.description and len(edited) == 27


def test_bad_jsonl_names_line_and_leaves_nothing(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text(json.dumps(chat(0)) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
  with pytest.raises(DataError, match=f"{path}:2: .*unknown role 'bot'"):
    sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=str(tmp_path / "c"))
  assert version_dirs(tmp_path / "c") == []


def test_record_source_protocol(tmp_path):
  import grain

  path = write_jsonl(tmp_path / "data.jsonl", make_records("preference", 10))
  src = sources.open_source(f"jsonl:{path}", "preference", "train", cache_dir=str(tmp_path / "c"))
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  assert src[-1] == src[len(src) - 1] and src._getitems([2, 0]) == [src[2], src[0]]
  with pytest.raises(IndexError):
    src[len(src)]  # pylint: disable=pointless-statement
  clone = pickle.loads(pickle.dumps(src))  # grain worker processes get a pickled copy.
  assert list(clone) == list(src) and clone.description == src.description
  assert src[0]["meta"] == {"src": "t"}
  ds = grain.MapDataset.source(src).shuffle(seed=0)
  assert sorted(r["chosen"] for r in ds) == sorted(r["chosen"] for r in src)


# --- gzip and skipping bad records ---------------------------------------------------------------


def test_gzip_sources_read_like_plain_files(tmp_path):
  cache = str(tmp_path / "c")
  plain = write_jsonl(tmp_path / "data.jsonl", make_records("preference", 20))
  packed = tmp_path / "data.jsonl.gz"
  packed.write_bytes(gzip.compress((tmp_path / "data.jsonl").read_bytes()))
  for split in ("train", "validation"):
    a = sources.open_source(f"jsonl:{plain}", "preference", split, cache_dir=cache)
    b = sources.open_source(f"jsonl:{packed}", "preference", split, cache_dir=cache)
    assert list(a) == list(b) and b.skipped == [] and b.num_read == 20
  (tmp_path / "t.txt").write_text("one\n\ntwo\nmore\n\nthree\n")
  (tmp_path / "t.txt.gz").write_bytes(gzip.compress((tmp_path / "t.txt").read_bytes()))
  texts = [[r["text"] for r in sources.open_source(f"text:{tmp_path}/{name}", "text", "train", cache_dir=cache)]
           for name in ("t.txt", "t.txt.gz")]
  assert texts[0] == texts[1] == ["one", "two\nmore"]
  before = sources.open_source(f"jsonl:{packed}", "preference", "train", cache_dir=cache).description
  packed.write_bytes(gzip.compress(json.dumps(make_records("preference", 1)[0]).encode() + b"\n" +
                                   (tmp_path / "data.jsonl").read_bytes()))
  edited = sources.open_source(f"jsonl:{packed}", "preference", "train", cache_dir=cache)
  assert edited.description != before and edited.num_read == 21  # The key hashes the .gz bytes.


def test_gzip_source_errors_name_the_file(tmp_path):
  path = tmp_path / "test.jsonl"  # As downloaded: gzip data under the uncompressed name.
  path.write_bytes(gzip.compress(json.dumps(chat(0)).encode() + b"\n"))
  for invalid in ("error", "skip"):
    with pytest.raises(DataError, match=f"^{path}: is gzip-compressed .*rename it to 'test.jsonl.gz'"):
      sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=str(tmp_path / "c"), invalid=invalid)
  truncated = tmp_path / "cut.jsonl.gz"
  truncated.write_bytes(gzip.compress("".join(json.dumps(chat(i)) + "\n" for i in range(50)).encode())[:-30])
  with pytest.raises(DataError, match=f"^{truncated}: is a corrupt or truncated gzip file"):
    sources.open_source(f"jsonl:{truncated}", "chat", "train", cache_dir=str(tmp_path / "c"), invalid="skip")
  assert version_dirs(tmp_path / "c") == []


def _with_bad_lines(path, n, bad):
  """`n` chat lines, of which those numbered in `bad` (1-based) are broken in different ways."""
  breakers = [lambda i: '{"messages": [', lambda i: json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
              lambda i: json.dumps({"msgs": i})]
  lines = [json.dumps(chat(i)) if i + 1 not in bad else breakers[sorted(bad).index(i + 1) % 3](i) for i in range(n)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_skip_lists_bad_lines_and_survives_the_cache(tmp_path, monkeypatch):
  path = _with_bad_lines(tmp_path / "data.jsonl", 40, {3, 17})
  cache = str(tmp_path / "c")
  opened = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache, invalid="skip",
                               max_invalid_fraction=0.1)
  expected = [{"where": f"{path}:3", "reason": "invalid JSON at column 15: Expecting value"},
              {"where": f"{path}:17", "reason": "field 'messages[0].role': unknown role 'bot'; expected one of "
                                                 "('system', 'user', 'assistant')"}]
  assert opened.skipped == expected and opened.num_read == 40
  assert len(opened) == 34 and [r["meta"]["id"] for r in opened][:3] == [0, 1, 3]  # 38 valid, 4 held out.

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a prepared dataset")

  with monkeypatch.context() as m:
    m.setattr(readers, "read_jsonl", fail)
    for split in ("train", "validation", "test"):
      again = sources.open_source(f"jsonl:{path}", "chat", split, cache_dir=cache, invalid="skip",
                                  max_invalid_fraction=0.1)
      assert again.skipped == expected and again.num_read == 40
    assert pickle.loads(pickle.dumps(again)).skipped == expected  # As grain workers get it.
  clean = sources.open_source(f"jsonl:{write_jsonl(tmp_path / 'ok.jsonl', make_records('chat', 5))}", "chat",
                              "train", cache_dir=cache, invalid="skip")
  assert clean.skipped == [] and clean.num_read == 5


def test_skip_fraction_above_the_limit_raises(tmp_path):
  path = _with_bad_lines(tmp_path / "data.jsonl", 40, {3, 17, 30})  # 7.5% invalid.
  cache = str(tmp_path / "c")
  pattern = (rf"^jsonl:{re.escape(path)}: 3 of 40 records read \(7\.50%\) are invalid, more than "
             rf"max_invalid_fraction=0\.01; the first: {re.escape(path)}:3: invalid JSON.*; {re.escape(path)}:17: .*"
             rf"; {re.escape(path)}:30: missing field 'messages'.*larger max_invalid_fraction$")
  with pytest.raises(DataError, match=pattern):
    sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache, invalid="skip")
  assert version_dirs(cache) == []  # Refused before writing.
  loose = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache, invalid="skip",
                              max_invalid_fraction=0.075)  # 7.5% is not more than 7.5%.
  assert len(loose.skipped) == 3
  with pytest.raises(DataError, match=r"3 of 40 records read \(7\.50%\) are invalid, more than "
                     r"max_invalid_fraction=0\.05"):
    sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache, invalid="skip", max_invalid_fraction=0.05)
  (tmp_path / "all_bad.jsonl").write_text("nope\n[]\n")
  with pytest.raises(DataError, match="no valid records: all 2 records read are invalid"):
    sources.open_source(f"jsonl:{tmp_path / 'all_bad.jsonl'}", "chat", "train", cache_dir=cache, invalid="skip",
                        max_invalid_fraction=1.0)


def test_error_mode_never_reads_a_skip_prepared_dataset(tmp_path):
  path = _with_bad_lines(tmp_path / "data.jsonl", 20, {5})
  cache = str(tmp_path / "c")
  skipping = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache, invalid="skip",
                                 max_invalid_fraction=0.5)
  assert [s["where"] for s in skipping.skipped] == [f"{path}:5"]
  with pytest.raises(DataError, match=f"^{re.escape(path)}:5: invalid JSON"):
    sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache)
  assert len(version_dirs(cache)) == 1  # Only the skip preparation.
  clean = write_jsonl(tmp_path / "clean.jsonl", make_records("chat", 10))
  keys = {sources.open_source(f"jsonl:{clean}", "chat", "train", cache_dir=cache, invalid=invalid).description
          for invalid in ("error", "skip")}
  assert len(keys) == 2  # "skip" is in the key; "error" keeps the key of older preparations.
  assert sources.open_source(f"jsonl:{clean}", "chat", "train", cache_dir=cache, max_invalid_fraction=0.3).description \
      in keys  # The fraction is not.


def test_skip_text_documents_with_bad_bytes(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"one\n\ntw\xffo\n\nthree\n\nfour\n")
  src = sources.open_source(f"text:{tmp_path / 't.txt'}", "text", "train", cache_dir=str(tmp_path / "c"),
                            invalid="skip", max_invalid_fraction=0.25, holdout_fraction=0)
  assert [r["text"] for r in src] == ["one", "three", "four"] and src.num_read == 4
  assert [s["where"] for s in src.skipped] == [f"{tmp_path / 't.txt'}:3"]


@pytest.mark.parametrize("options, message", [
    ({"invalid": "ignore"}, r"^invalid: expected one of \('error', 'skip'\), got 'ignore'"),
    ({"invalid": "skip", "max_invalid_fraction": 1.5}, r"^max_invalid_fraction: expected a number in \[0, 1\]"),
    ({"max_invalid_fraction": -0.1}, r"^max_invalid_fraction: "),
    ({"max_invalid_fraction": float("nan")}, r"^max_invalid_fraction: "),
])
def test_invalid_option_values(tmp_path, options, message):
  path = write_jsonl(tmp_path / "data.jsonl", make_records("text", 5))
  for source in (f"jsonl:{path}", "world"):
    with pytest.raises(ValueError, match=message):
      sources.open_source(source, "text", "train", cache_dir=str(tmp_path / "c"), **options)
  assert not os.path.exists(tmp_path / "c")


# --- crash and concurrency safety (local files: no world needed) ----------------------------------

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from jaxlm.data import readers, sources
    real = readers.read_jsonl
    def dying(paths, kind, **kwargs):
      for i, item in enumerate(real(paths, kind, **kwargs)):
        if i == 5 and os.environ.get("DIE"):
          os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("SLOW"):
          with open(os.environ["SLOW"], "a") as f:
            f.write(f"{{os.getpid()}}\\n")
          import time; time.sleep(0.01)
        yield item
    readers.read_jsonl = dying
    if os.environ.get("NO_LOCK"):  # As on a file system without flock: TFDS's rename decides.
      from jaxlm.data import builders
      builders.fcntl = None
    src = sources.open_source("jsonl:" + sys.argv[1], "chat", "train", cache_dir=sys.argv[2])
    print(len(src), src.description)
""")


def _run(script, *args, env=None, **kwargs):
  return subprocess.Popen([sys.executable, "-c", script.format(repo=REPO), *args], env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_prepare_leaves_nothing_complete(tmp_path):
  path = write_jsonl(tmp_path / "data.jsonl", make_records("chat", 40))
  cache = str(tmp_path / "c")
  proc = _run(_KILL_SCRIPT, path, cache, env={"DIE": "1"})
  proc.communicate(timeout=60)
  assert proc.returncode == -9
  left = version_dirs(cache)
  assert left and all(os.path.basename(d).startswith("incomplete.") for d in left), left  # Killed mid-write.
  src = sources.open_source(f"jsonl:{path}", "chat", "train", cache_dir=cache)
  assert len(src) == 36 and list(src) == [r for _, r in readers.read_jsonl([path], "chat")][:36]
  assert all(os.path.basename(d) == builders.BUILDER_VERSION for d in version_dirs(cache))  # Stale dir removed.


@pytest.mark.parametrize("lock", [True, False])
def test_concurrent_prepares_share_one_dataset(tmp_path, lock):
  path = write_jsonl(tmp_path / "data.jsonl", make_records("chat", 30))
  cache, log = str(tmp_path / "c"), str(tmp_path / "reads.log")
  env = {"SLOW": log, **({} if lock else {"NO_LOCK": "1"})}
  procs = [_run(_KILL_SCRIPT, path, cache, env=env) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert outputs[0][0] == outputs[1][0] and outputs[0][0].startswith("27 ")
  if lock:
    with open(log) as f:  # Generated by one process only; the other waited on the lock and reused it.
      assert len(set(f.read().split())) == 1
  assert [os.path.basename(d) for d in version_dirs(cache)] == [builders.BUILDER_VERSION]


# --- tfds: a tiny catalog dataset made here ------------------------------------------------------

TFDS_NAME = "jaxlm_sources_test_tiny_qa"


class JaxlmSourcesTestTinyQa(tfds.core.GeneratorBasedBuilder):
  """A tiny question/answer dataset, registered in the TFDS catalog like any public one."""

  name = TFDS_NAME
  VERSION = tfds.core.Version("1.2.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # See builders._Builder.code_path.
    return None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "good": tfds.features.Text(), "bad": tfds.features.Text(),
        "label": tfds.features.ClassLabel(num_classes=3), "source": tfds.features.Text(),
        "embedding": tfds.features.Tensor(shape=(2,), dtype=np.float32),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 10), "test": self._generate_examples(10, 14)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {"question": f"q{i}?", "good": f"good {i}", "bad": f"bad {i}", "label": i % 3, "source": "made",
                "embedding": [float(i), 0.0]}

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.display_progress_bar(False)
  try:
    JaxlmSourcesTestTinyQa(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    tfds.display_progress_bar(True)
  return data_dir


PREF_MAP = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_tfds_preference(tfds_dir):
  src = sources.open_source(f"tfds:{TFDS_NAME}", "preference", "train", tfds_data_dir=tfds_dir, field_map=PREF_MAP)
  assert len(src) == 10 and src.description == f"tfds:{TFDS_NAME}:1.2.0[train]"
  records = sorted(src, key=lambda r: r["chosen"])
  assert records[0] == {"prompt": [{"role": "user", "content": "q0?"}], "chosen": "good 0", "rejected": "bad 0",
                        "meta": {"label": 0, "source": "made"}}  # Non-scalar features stay out of meta.
  assert pickle.loads(pickle.dumps(src))[3] == src[3]
  assert src.skipped == [] and src.num_read is None


def test_tfds_text_and_split_override(tfds_dir):
  test = sources.open_source(f"tfds:{TFDS_NAME}", "text", "test", tfds_data_dir=tfds_dir, field_map={"text": "good"})
  assert sorted(r["text"] for r in test) == [f"good {i}" for i in range(10, 14)]
  half = sources.open_source(f"tfds:{TFDS_NAME}:train[:50%]", "text", "validation", tfds_data_dir=tfds_dir,
                             field_map={"text": "question"})
  assert len(half) == 5 and half.description.endswith("[train[:50%]]")
  rest = sources.open_source(f"tfds:{TFDS_NAME}:train[50%:]", "text", "train", tfds_data_dir=tfds_dir,
                             field_map={"text": "question"})
  assert sorted(r["text"] for r in list(half) + list(rest)) == sorted(f"q{i}?" for i in range(10))


def test_tfds_prompt_kind(tfds_dir):
  src = sources.open_source(f"tfds:{TFDS_NAME}", "prompt", "test", tfds_data_dir=tfds_dir,
                            field_map={"prompt": "question"})
  assert all(r["prompt"][0]["role"] == "user" for r in src)
  assert set(src[0]["meta"]) == {"label", "source", "good", "bad"}


def test_tfds_unknown_name(tfds_dir):
  with pytest.raises(DataError, match="(?s)no TFDS dataset named .jaxlm_no_such_dataset.*prepare") as e:
    sources.open_source("tfds:jaxlm_no_such_dataset", "text", "train", tfds_data_dir=tfds_dir)
  assert e.value.where == "tfds:jaxlm_no_such_dataset"
  assert len(str(e.value)) < 1000  # Not TFDS's list of every dataset.


def test_tfds_missing_field(tfds_dir):
  with pytest.raises(DataError, match=r"record field 'prompt'.*no feature 'prompt'.*available features: .*'question'"):
    sources.open_source(f"tfds:{TFDS_NAME}", "preference", "train", tfds_data_dir=tfds_dir)
  with pytest.raises(DataError, match=r"no feature 'txt'"):
    sources.open_source(f"tfds:{TFDS_NAME}", "text", "train", tfds_data_dir=tfds_dir, field_map={"text": "txt"})
  with pytest.raises(ValueError, match="not fields of a text record"):
    sources.open_source(f"tfds:{TFDS_NAME}", "text", "train", tfds_data_dir=tfds_dir, field_map={"prompt": "q"})


def test_tfds_unprepared_and_bad_split(tfds_dir, tmp_path):
  with pytest.raises(DataError, match="(?s)not prepared.*download_and_prepare"):
    sources.open_source(f"tfds:{TFDS_NAME}", "text", "train", tfds_data_dir=str(tmp_path), field_map={"text": "good"})
  with pytest.raises(DataError, match=r"split 'validation'.*\['test', 'train'\]"):
    sources.open_source(f"tfds:{TFDS_NAME}", "text", "validation", tfds_data_dir=tfds_dir, field_map={"text": "good"})
  assert os.listdir(tmp_path) == [] or not any(f.endswith(".array_record") for _, _, fs in os.walk(tmp_path) for f in fs)


# --- the world -----------------------------------------------------------------------------------

SMALL_WORLD = dict(text_bytes=20_000, num_chats=200, num_preferences=200, num_prompts=100)


@pytest.fixture(scope="module")
def world_lib():
  from jaxlm.data import world

  return world


@pytest.fixture(scope="module")
def tiny(world_lib):
  return world_lib.WorldConfig(seed=3, **SMALL_WORLD)


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("world_cache"))


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_world_matches_generator_in_order(kind, world_lib, tiny, world_cache):
  for split in world_lib.SPLITS:
    src = sources.open_source("world", kind, split, cache_dir=world_cache, world=tiny)
    expected = [schemas.validate(kind, r, "") for r in world_lib.generate(kind, split, tiny)]
    assert len(src) == len(expected) > 0
    assert list(src) == expected  # Same records in the same order: shuffling is disabled.
    assert src.description == f"world@{tiny.fingerprint()}/{kind}/{split}"
    assert src.kind == kind and src.split == split
    assert src.skipped == [] and src.num_read is None


def test_world_cached_open_does_not_regenerate(world_lib, tiny, world_cache, monkeypatch):
  first = sources.open_source("world", "chat", "train", cache_dir=world_cache, world=tiny)

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a prepared world")

  monkeypatch.setattr(world_lib, "generate", fail)
  start = time.perf_counter()
  again = sources.open_source("world", "chat", "validation", cache_dir=world_cache, world=tiny)
  again = sources.open_source("world", "chat", "train", cache_dir=world_cache, world=tiny)
  assert time.perf_counter() - start < 1.0
  assert list(again) == list(first)


def test_world_configs_never_collide(world_lib, tiny, world_cache):
  other = world_lib.WorldConfig(seed=4, **SMALL_WORLD)
  assert other.fingerprint() != tiny.fingerprint()
  a = sources.open_source("world", "prompt", "test", cache_dir=world_cache, world=tiny)
  b = sources.open_source("world", "prompt", "test", cache_dir=world_cache, world=other)
  assert a.description != b.description
  assert list(pickle.loads(pickle.dumps(a))) == list(a)  # As grain sends it to worker processes.
  assert list(b) == [schemas.validate("prompt", r, "") for r in world_lib.generate("prompt", "test", other)]


def test_world_crash_mid_prepare_leaves_nothing_complete(world_lib, tiny, tmp_path, monkeypatch):
  real = world_lib.generate

  def crashing(kind, split, config=None):
    for i, record in enumerate(real(kind, split, config)):
      if split == "validation" and i == 5:  # train is written by then; the dataset is not.
        raise RuntimeError("generator died")
      yield record

  cache = str(tmp_path / "c")
  with monkeypatch.context() as m:
    m.setattr(world_lib, "generate", crashing)
    with pytest.raises(RuntimeError, match="generator died"):
      sources.open_source("world", "chat", "train", cache_dir=cache, world=tiny)
  assert version_dirs(cache) == []  # No version dir, no leftover incomplete dir.
  src = sources.open_source("world", "chat", "train", cache_dir=cache, world=tiny)
  assert list(src) == [schemas.validate("chat", r, "") for r in real("chat", "train", tiny)]


_WORLD_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from jaxlm.data import sources, world
    config = world.WorldConfig(seed=5, text_bytes=20_000, num_chats=200, num_preferences=200, num_prompts=100)
    src = sources.open_source("world", "preference", "train", cache_dir=sys.argv[1], world=config)
    print(len(src), src[len(src) - 1]["chosen"][:20])
""")


def test_world_concurrent_prepares(tmp_path):
  cache = str(tmp_path / "c")
  procs = [_run(_WORLD_SCRIPT, cache) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert outputs[0][0] == outputs[1][0]
  assert sum("prepared world@" in err for _, err in outputs) == 1  # One process prepared, one reused.
  assert len(version_dirs(cache)) == 1


def test_world_empty_splits_are_a_clear_error(world_lib, tmp_path):
  config = world_lib.WorldConfig(seed=6, text_bytes=0, num_chats=20, num_preferences=0, num_prompts=0,
                                 eval_fraction=0.0)
  assert len(sources.open_source("world", "chat", "train", cache_dir=str(tmp_path), world=config)) == 20
  with pytest.raises(DataError, match=r"world\[chat/test\]: .*no chat records"):
    sources.open_source("world", "chat", "test", cache_dir=str(tmp_path), world=config)
  with pytest.raises(DataError, match=r"world\[text/train\]"):
    sources.open_source("world", "text", "train", cache_dir=str(tmp_path), world=config)


def test_parse_key_values_accepts_pairs_and_names_bad_items():
  assert sources.parse_key_values("text=text, prompt = question,,") == {"text": "text", "prompt": "question"}
  assert sources.parse_key_values("") == {}
  for bad in ("text", "a=b=c", "=feature", "field="):
    with pytest.raises(ValueError, match=r"config.data.field_map: .*" + re.escape(repr(bad.strip()))):
      sources.parse_key_values(bad, "config.data.field_map")
