"""Source strings: where a stage's records come from, opened as random-access record sources.

Every stage takes a `source` string and a record `kind` (see `jaxlm.data.schemas`) and calls
`open_source(source, kind, split)`, which returns a `RecordSource`: ``len(src)`` and
``src[i]`` (a canonical record of `kind`), i.e. grain's `RandomAccessDataSource`, picklable for
grain worker processes.

| source                               | records                                                       |
|--------------------------------------|---------------------------------------------------------------|
| `world`                              | the embedded world (`jaxlm.data.world`, configured by `world=WorldConfig(...)`), any kind, splits train/validation/test; prepared once through `builders.WorldBuilder` into `<cache_dir>/world/v<WORLD_VERSION>-<fingerprint>/` |
| `text:<path or glob>`                | UTF-8 plain-text files (``*.gz`` gunzipped), kind must be `text`: one record per blank-line block (paragraph), or per file with `docs_per_file=True` (`readers.read_text_documents`) |
| `jsonl:<path or glob>`               | JSONL files (``*.gz`` gunzipped) in the schema of `kind` (`readers.read_jsonl`) |
| `tfds:<name>[/<config>][:<split>]`   | a TFDS catalog dataset *already prepared* as array_record in `tfds_data_dir` (default: TFDS's, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`), mapped to `kind` with `field_map`; `:<split>` (TFDS split syntax, e.g. `train[:90%]`) replaces the stage's split |

Local files (`text:`, `jsonl:`): a glob is expanded and sorted; the files are validated and
written once as array_record under `<cache_dir>/local/<reader>-<kind>-<key>/`, where the key
hashes the files' absolute paths, sizes and contents, the kind and the options, so an edited file
is prepared again. Splits: `train` is everything except the held-out tail; `validation` is the
last ``ceil(n * holdout_fraction)`` records (at least one) in file order; `test` reads the same
records as `validation` (a local source has no separate test split: pass another file as the
eval source for one). `holdout_fraction=0` keeps every record in `train` (then `validation` and
`test` raise).

Gzip: a local file whose name ends in ``.gz`` (``harmless-base/test.jsonl.gz``) is decompressed
while it is read (`jaxlm.data.readers`); it is hashed (its compressed bytes), cached and
prepared like a plain file. A gzip file without the suffix, or a corrupt ``.gz``, raises
`DataError` naming the file.

Bad records (``invalid=``, local files only):

* ``invalid="error"`` (the default): the first bad record raises `DataError` naming
  ``path:line``, and nothing is written.
* ``invalid="skip"``: a bad record is left out instead: for ``jsonl:`` a line that is not
  valid UTF-8, not valid JSON, or fails the kind's schema; for ``text:`` a document (block, or
  file with ``docs_per_file``) with a line that is not valid UTF-8. If more than
  ``max_invalid_fraction`` (default 0.01) of the records read (valid + skipped; blank lines do
  not count) were skipped, or none is valid, opening raises `DataError` naming the source, the
  count and fraction and the first skipped places. Whole-file problems (no such file, an empty
  file, gzip data without the ``.gz`` suffix, a corrupt gzip file) raise as with ``"error"``.
  ``invalid="skip"`` is part of the cache key (``"error"`` is not, so its key is unchanged):
  a file set prepared with ``"skip"`` is never read by an ``"error"`` open, which prepares
  (and so validates) on its own and fails on the first bad record. ``max_invalid_fraction``
  is not in the key: it is checked when preparing (before writing) and again on every open,
  against the skipped list stored with the prepared dataset (its TFDS ``metadata.json``, see
  `builders.skipped_records`).
* `RecordSource.skipped` lists the skipped records as ``{"where": "path:line", "reason":
  "..."}`` (the same after a cached open), and `RecordSource.num_read` is the number of
  records read from the files (valid + skipped, across all splits). For ``world`` and
  ``tfds:`` the option has no effect: ``skipped`` is ``[]`` and ``num_read`` is None
  (``tfds:`` records are validated when indexed, and a bad one raises).

`tfds:` datasets: nothing is ever downloaded at run time. The dataset is read like
``tfds.data_source(name, split=..., data_dir=tfds_data_dir, download=False)``, i.e. the
builder's `as_data_source` after checking it is prepared; an unknown name, config or split, an
unprepared dataset, or one prepared as tfrecord (no random access) raises `DataError` saying
what to do. `RecordSource.split` is the TFDS split actually read (the `:<split>` if given). `field_map` maps record fields to dataset
features (``{"text": "text"}`` for tiny_shakespeare or imdb_reviews, ``{"prompt": "question",
"chosen": "good", "rejected": "bad"}``, ...); a field missing from `field_map` is looked up
under its own name. Values: text features become strings; for `prompt` fields (prompt and
preference kinds) a plain string becomes one user message, and a `Sequence({"role",
"content"})` feature (our own on-disk form) becomes a message list; `messages` must be such a
sequence. For kinds with `meta`, a `meta` text feature holding a JSON object is parsed, and the
other unmapped scalar features (ids, labels) are kept in `meta`. Records are validated when read
(`DataError` naming ``tfds:<name>[<split>][<index>]``); the first record is read at open time
so a wrong mapping fails early.

Record order: index ``i`` is the same record on every run and machine. Local files keep file
then line order; the world keeps its generator's order; a TFDS dataset keeps its stored order.
Shuffle in the grain pipeline.

Preparing is cached (a second open only reads the dataset's metadata), crash-safe and safe for
concurrent processes; see `jaxlm.data.builders.prepare`.
"""

from __future__ import annotations

import difflib
import json
import operator
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from jaxlm.data import readers
from jaxlm.data import schemas
from jaxlm.data.errors import DataError

if TYPE_CHECKING:
  from jaxlm.data.world import WorldConfig

DEFAULT_CACHE_DIR = os.path.expanduser(os.environ.get("JAXLM_DATA_DIR", "~/.cache/jaxlm/data"))
SPLITS = ("train", "validation", "test")
PREFIXES = ("world", "text:", "jsonl:", "tfds:")


def parse_key_values(text: str, what: str = "field_map") -> dict[str, str]:
  """'a=b,c=d' -> {'a': 'b', 'c': 'd'}: how a `field_map` (or any such option) is written on a
  command line or in a config string. Blank items are skipped; each other item must be exactly
  one non-empty key, one '=', and a non-empty value.

  Raises:
    ValueError: naming `what` and the malformed item.
  """
  pairs = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    key, _, value = (part.strip() for part in item.partition("="))
    if item.count("=") != 1 or not key or not value:
      raise DataError("", f"{what}: expected key=value pairs separated by commas, got {item!r}")
    pairs[key] = value
  return pairs


# ---------------------------------------------------------------------------------------------
# The record source.
# ---------------------------------------------------------------------------------------------


class RecordSource:
  """Random access to canonical records of one kind and split (grain's RandomAccessDataSource).

  Attributes:
    description: where the records come from, for run manifests, e.g.
      ``"world@<fingerprint>/chat/train"``, ``"jsonl:data/*.jsonl@<sha>[train]"``,
      ``"tfds:imdb_reviews/plain_text:1.0.0[train]"``.
    kind: the record kind.
    split: the split the stage asked for (a local `test` reads `validation`, see the module doc).
    skipped: the records left out with ``invalid="skip"``, ``{"where": "path:line", "reason":
      ...}`` each, in file order; ``[]`` otherwise (always for ``world`` and ``tfds:``).
    num_read: for local files, the records read (valid + skipped, all splits); else None.
  """

  def __init__(self, data: Any, convert: Any, *, kind: str, split: str, description: str,
               skipped: Sequence[dict] = (), num_read: int | None = None):
    self._data = data
    self._convert = convert
    self._len = len(data)
    self.kind = kind
    self.split = split
    self.description = description
    self.skipped = list(skipped)
    self.num_read = num_read

  def __len__(self) -> int:
    return self._len

  def _index(self, index: Any) -> int:
    i = operator.index(index)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"index {index} out of range for {self.description} with {self._len} records")
    return i

  def __getitem__(self, index: int) -> dict:
    i = self._index(index)
    return self._convert(self._data[i], i)

  def _getitems(self, indices: Sequence[int]) -> list[dict]:
    """Batched read (grain's SupportsBatchedReadRandomAccessDataSource)."""
    indices = [self._index(i) for i in indices]
    if not indices:
      return []
    examples = self._data.__getitems__(indices) if hasattr(self._data, "__getitems__") else [self._data[i] for i in indices]
    return [self._convert(example, i) for example, i in zip(examples, indices)]

  __getitems__ = _getitems

  def __iter__(self):
    for i in range(self._len):
      yield self[i]

  def __repr__(self) -> str:
    return f"RecordSource({self.description!r}, kind={self.kind!r}, split={self.split!r}, len={self._len})"


class _FromOwnSchema:
  """Decodes records that `builders` wrote with `schemas.tfds_features(kind)`."""

  def __init__(self, kind: str):
    self.kind = kind

  def __call__(self, example: Mapping[str, Any], index: int) -> dict:
    del index
    return schemas.from_tfds_example(self.kind, example)


# ---------------------------------------------------------------------------------------------
# open_source.
# ---------------------------------------------------------------------------------------------


def open_source(source: str, kind: str, split: str, *, cache_dir: str | None = None,
                world: "WorldConfig | None" = None, field_map: Mapping[str, str] | None = None,
                tfds_data_dir: str | None = None, holdout_fraction: float = 0.1,
                docs_per_file: bool = False, invalid: str = "error",
                max_invalid_fraction: float = 0.01) -> RecordSource:
  """Opens `source` (see the module docstring) as records of `kind` in `split`.

  Args:
    source: a source string: ``world``, ``text:<glob>``, ``jsonl:<glob>`` or
      ``tfds:<name>[/<config>][:<split>]``.
    kind: one of `schemas.KINDS`.
    split: ``train``, ``validation`` or ``test`` (for ``tfds:`` any split of the dataset).
    cache_dir: where prepared datasets live; default `DEFAULT_CACHE_DIR`
      (``$JAXLM_DATA_DIR`` or ``~/.cache/jaxlm/data``).
    world: the `WorldConfig` of ``world`` (default ``WorldConfig()``).
    field_map: for ``tfds:``, record field -> dataset feature.
    tfds_data_dir: for ``tfds:``, the TFDS data dir holding the prepared dataset.
    holdout_fraction: for local files, the fraction of records (the tail) held out as validation.
    docs_per_file: for ``text:``, one document per file instead of per blank-line block.
    invalid: for local files, ``"error"`` (raise at the first bad record) or ``"skip"`` (leave
      bad records out, listed in `RecordSource.skipped`); see the module docstring.
    max_invalid_fraction: with ``invalid="skip"``, the largest fraction (in [0, 1]) of the
      records read that may be skipped; more raises `DataError`.

  Raises:
    ValueError: a malformed source string, a kind it cannot give, a bad split or option.
    DataError: bad or missing data (naming the file and line, or the dataset).
  """
  schemas.check_kind(kind)
  readers.check_invalid_options(invalid, max_invalid_fraction)
  if not isinstance(source, str) or not source.strip():
    raise DataError("", f"expected a source string ({', '.join(PREFIXES)}...), got {source!r}")
  source = source.strip()
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
  prefix, sep, rest = source.partition(":")
  if prefix == "world":
    if sep:
      raise DataError("", f"source {source!r}: 'world' takes no argument; configure it with world=WorldConfig(...)")
    _check_split(source, split)
    return _open_world(kind, split, cache_dir, world)
  if prefix in ("text", "jsonl") and sep:
    if not rest.strip():
      raise DataError("", f"source {source!r}: expected a file path or glob after {prefix + ':'!r}")
    if prefix == "text" and kind != "text":
      raise DataError("", f"source {source!r}: plain-text files give 'text' records, but this stage needs {kind!r} "
                       f"records; use 'jsonl:<path>' with {kind} records (see jaxlm.data.schemas)")
    _check_split(source, split)
    return _open_local(source, prefix, rest.strip(), kind, split, cache_dir, holdout_fraction, docs_per_file,
                       invalid, max_invalid_fraction)
  if prefix == "tfds" and sep:
    return _open_tfds(source, rest.strip(), kind, split, field_map, tfds_data_dir)
  raise DataError("", f"unknown source {source!r}: expected 'world', 'text:<path or glob>', 'jsonl:<path or glob>' "
                   "or 'tfds:<name>[/<config>][:<split>]'")


def _check_split(source: str, split: str) -> None:
  if split not in SPLITS:
    raise DataError("", f"source {source!r}: unknown split {split!r}; expected one of {SPLITS}")


def _open_world(kind: str, split: str, cache_dir: str, world: Any) -> RecordSource:
  from jaxlm.data import builders
  from jaxlm.data import world as world_lib

  config = world if world is not None else world_lib.WorldConfig()
  data_dir = builders.world_data_dir(cache_dir, config)
  name = f"world@{config.fingerprint()}/{kind}"
  builder = builders.prepare(
      lambda: builders.WorldBuilder(world_config=config, config=kind, data_dir=data_dir,
                                    file_format=builders.FILE_FORMAT),
      what=name,
  )
  if split not in builder.info.splits:
    raise DataError(f"world[{kind}/{split}]", f"this WorldConfig generates no {kind} records for {split!r} "
                    f"(a size or eval_fraction is 0): {config}")
  return RecordSource(builder.as_data_source(split=split), _FromOwnSchema(kind), kind=kind, split=split,
                      description=f"{name}/{split}")


def _open_local(source: str, reader: str, pattern: str, kind: str, split: str, cache_dir: str,
                holdout_fraction: float, docs_per_file: bool, invalid: str,
                max_invalid_fraction: float) -> RecordSource:
  from jaxlm.data import builders

  builders.holdout_sizes(2, holdout_fraction)  # ValueError for a fraction out of range.
  paths = readers.expand_paths(pattern)
  options: dict[str, Any] = {"holdout_fraction": holdout_fraction}
  if reader == "text":
    options["docs_per_file"] = bool(docs_per_file)
  if invalid != "error":
    # Only "skip" is keyed, so "error" keeps the keys of datasets prepared before this option.
    # The fraction is not keyed: it does not change what is written, and is checked per open.
    options["invalid"] = invalid
  key = builders.local_key(reader, kind, paths, options)
  data_dir = os.path.join(cache_dir, "local", f"{reader}-{kind}-{key[:16]}")
  name = f"{source}@{key[:12]}"

  def make():
    common = dict(paths=paths, kind=kind, holdout_fraction=holdout_fraction, source=source, invalid=invalid,
                  max_invalid_fraction=max_invalid_fraction, data_dir=data_dir, file_format=builders.FILE_FORMAT)
    if reader == "text":
      return builders.LocalTextBuilder(docs_per_file=bool(docs_per_file), **common)
    return builders.LocalJsonlBuilder(**common)

  builder = builders.prepare(make, what=name)
  skipped = builders.skipped_records(builder)
  num_valid = sum(info.num_examples for info in builder.info.splits.values())
  # Again on a cached open: the dataset may have been prepared with a larger fraction.
  readers.check_invalid_fraction(source, num_valid, skipped, max_invalid_fraction)
  stored_split = "validation" if split == "test" else split
  if stored_split not in builder.info.splits:
    raise DataError(source, f"no {split!r} split: holdout_fraction=0 keeps every record in 'train'; "
                    "pass holdout_fraction > 0 or a separate eval source")
  label = split if split == stored_split else f"{split}=validation"
  return RecordSource(builder.as_data_source(split=stored_split), _FromOwnSchema(kind), kind=kind, split=split,
                      description=f"{name}[{label}]", skipped=skipped, num_read=num_valid + len(skipped))


# ---------------------------------------------------------------------------------------------
# tfds: catalog datasets the user prepared.
# ---------------------------------------------------------------------------------------------

_MESSAGE_FIELDS = ("messages", "prompt")


def _text(value: Any, where: str, field: str) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(where, f"field {field!r}: not valid UTF-8 at byte {e.start}") from None
  if isinstance(value, str):
    return value
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    return _text(value.item(), where, field)
  raise DataError(where, f"field {field!r}: expected text, got {type(value).__name__}")


def _scalar(value: Any) -> Any:
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return value


class _FromTfdsFeatures:
  """Maps a decoded example of a catalog dataset to a record of `kind` (see the module doc)."""

  def __init__(self, kind: str, mapping: dict[str, str], meta_feature: str | None,
               extra_features: tuple[str, ...], where: str):
    self.kind = kind
    self.mapping = mapping
    self.meta_feature = meta_feature
    self.extra_features = extra_features
    self.where = where

  def _messages(self, value: Any, where: str, field: str) -> Any:
    if isinstance(value, Mapping) and "role" in value and "content" in value:
      return [{"role": _text(r, where, f"{field}.role"), "content": _text(c, where, f"{field}.content")}
              for r, c in zip(value["role"], value["content"])]
    if field == "prompt":  # A plain-string prompt is one user message.
      return [{"role": "user", "content": _text(value, where, field)}]
    raise DataError(where, f"field {field!r}: expected a Sequence({{'role', 'content'}}) feature "
                    f"(feature {self.mapping[field]!r}), got {type(value).__name__}")

  def __call__(self, example: Mapping[str, Any], index: int) -> dict:
    where = f"{self.where}[{index}]"
    obj: dict[str, Any] = {}
    for field, feature in self.mapping.items():
      value = example[feature]
      obj[field] = self._messages(value, where, field) if field in _MESSAGE_FIELDS else _text(value, where, field)
    if self.kind != "text":
      meta: dict[str, Any] = {name: _scalar(example[name]) for name in self.extra_features}
      if self.meta_feature is not None:
        text = _text(example[self.meta_feature], where, "meta")
        try:
          parsed = json.loads(text) if text.strip() else {}
        except ValueError as e:
          raise DataError(where, f"feature {self.meta_feature!r} (meta): not a JSON object ({e})") from None
        if not isinstance(parsed, dict):
          raise DataError(where, f"feature {self.meta_feature!r} (meta): expected a JSON object, got {text[:80]!r}")
        meta.update(parsed)
      obj["meta"] = meta
    return schemas.validate(self.kind, obj, where)


def _prepare_hint(name: str, data_dir: str | None) -> str:
  target = f", data_dir={data_dir!r}" if data_dir else ""
  return (f"jaxlm never downloads at run time; prepare it once as array_record, e.g.\n"
          f"  python -c \"import tensorflow_datasets as tfds; tfds.builder({name!r}{target}, "
          f"file_format='array_record').download_and_prepare()\"\n"
          f"and pass its data dir as tfds_data_dir (default: TFDS's, ~/tensorflow_datasets or $TFDS_DATA_DIR)")


def _open_tfds(source: str, spec: str, kind: str, split: str, field_map: Mapping[str, str] | None,
               tfds_data_dir: str | None) -> RecordSource:
  import tensorflow_datasets as tfds

  name, _, split_override = spec.partition(":")
  name = name.strip()
  if not name:
    raise DataError("", f"source {source!r}: expected 'tfds:<name>[/<config>][:<split>]'")
  read_split = split_override.strip() or split
  data_dir = os.path.abspath(os.path.expanduser(tfds_data_dir)) if tfds_data_dir else None
  where = f"tfds:{name}"
  field_map = dict(field_map or {})
  allowed = set(schemas.FIELDS[kind]) | ({"meta"} if kind != "text" else set())
  unknown = sorted(set(field_map) - allowed)
  if unknown:
    raise DataError("", f"field_map: {unknown} are not fields of a {kind} record (fields: {sorted(allowed)})")

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    try:
      known = tfds.list_builders(with_community_datasets=False)
    except Exception:  # pylint: disable=broad-except  # Only for a suggestion.
      known = []
    close = difflib.get_close_matches(name.split("/")[0], known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise DataError(where, f"no TFDS dataset named {name.split('/')[0]!r}{hint}; check the name in the TFDS catalog "
                    f"(https://www.tensorflow.org/datasets/catalog/overview). {_prepare_hint(name, data_dir)}") from None
  except Exception as e:  # pylint: disable=broad-except  # E.g. an unknown config name.
    base, _, config = name.partition("/")
    try:
      configs = sorted(tfds.builder_cls(base).builder_configs)
    except Exception:  # pylint: disable=broad-except  # Only for a better message.
      configs = []
    if config and configs and config.split("/")[0] not in configs:
      raise DataError(where, f"dataset {base!r} has no config {config!r}; its configs: {configs}") from None
    raise DataError(where, f"cannot open the TFDS dataset: {e}") from None
  from jaxlm.data import builders

  if not builders.is_prepared(builder):
    raise DataError(where, f"the dataset is not prepared in {os.fspath(builder.data_dir_root)} "
                    f"(no {os.fspath(builder.data_path)}). {_prepare_hint(name, data_dir)}")

  try:
    data = builder.as_data_source(split=read_split)
  except NotImplementedError:
    raise DataError(where, f"prepared as {builder.info.file_format.value}, which has no random access; "
                    f"re-prepare it with file_format='array_record' into another data dir. "
                    f"{_prepare_hint(name, data_dir)}") from None
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types for bad splits.
    raise DataError(where, f"cannot read split {read_split!r} ({e}); the dataset's splits are "
                    f"{sorted(builder.info.splits)}; pick one (or a slice like 'train[:90%]') with "
                    f"'tfds:{name}:<split>'") from None

  features = builder.info.features
  available = sorted(features.keys())
  mapping = {}
  for field in schemas.FIELDS[kind]:
    feature = field_map.get(field, field)
    if feature not in features:
      raise DataError(where, f"record field {field!r} of a {kind} record: the dataset has no feature {feature!r}; "
                      f"available features: {available}; map it with field_map={{{field!r}: '<feature>'}}")
    mapping[field] = feature
  meta_feature = None
  extra: tuple[str, ...] = ()
  if kind != "text":
    meta_feature = field_map.get("meta", "meta")
    if meta_feature not in features:
      if "meta" in field_map:
        raise DataError(where, f"field 'meta': the dataset has no feature {meta_feature!r}; available features: {available}")
      meta_feature = None
    used = set(mapping.values()) | {meta_feature}
    extra = tuple(n for n in available if n not in used and _is_scalar_feature(features[n]))

  version = builder.version
  config = f"/{builder.builder_config.name}" if builder.builder_config else ""
  description = f"tfds:{builder.name}{config}:{version}[{read_split}]"
  convert = _FromTfdsFeatures(kind, mapping, meta_feature, extra, where=f"tfds:{builder.name}{config}[{read_split}]")
  records = RecordSource(data, convert, kind=kind, split=split if not split_override.strip() else read_split,
                         description=description)
  if not len(records):
    raise DataError(where, f"split {read_split!r} has no records")
  records[0]  # pylint: disable=pointless-statement  # A wrong mapping fails here, not mid-training.
  return records


def _is_scalar_feature(feature: Any) -> bool:
  import numpy as np
  import tensorflow_datasets as tfds

  if isinstance(feature, (tfds.features.FeaturesDict, tfds.features.Sequence)):
    return False
  try:
    shape, dtype = feature.shape, np.dtype(feature.np_dtype)
  except Exception:  # pylint: disable=broad-except
    return False
  return shape == () and (dtype.kind in "biuf" or dtype == np.object_ or dtype.kind in "SUO")
