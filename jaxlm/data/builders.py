"""TFDS builders that write our record kinds as `array_record`, and the one safe way to prepare them.

Builders (none is registered in the TFDS catalog; `sources.open_source` makes them):

* `WorldBuilder`: the embedded world of `jaxlm.data.world`. One builder config per record kind
  (``text``, ``chat``, ``preference``, ``prompt``), splits ``train``/``validation``/``test``.
  Its `data_dir` is `world_data_dir(cache_dir, config)`, which contains the `WorldConfig`
  fingerprint and `WORLD_VERSION`, so two different worlds never share files.
* `LocalJsonlBuilder` / `LocalTextBuilder`: the records of local files (read with
  `jaxlm.data.readers`). Splits: ``train`` and ``validation``, where validation is the *last*
  ``ceil(n * holdout_fraction)`` records (at least one) in file order, like nanoGPT's 90/10 cut
  of a text file; ``holdout_fraction=0`` writes only ``train``. A local source has no separate
  test split (`sources` reads ``validation`` for ``test``; pass another file as the eval source
  for a real one). Their `data_dir` is keyed by `local_key`: a sha256 over the absolute file
  paths, sizes and content hashes (of the bytes on disk, so of the compressed bytes of a
  ``.gz`` file), the kind, the options and `BUILDER_VERSION`, so an edited file is prepared
  again and unchanged files are reused.
  With ``invalid="skip"`` a bad record is left out instead of failing the prepare (see
  `readers.read_jsonl`), unless more than ``max_invalid_fraction`` of the records read are bad
  (checked before anything is written). The skipped records' ``{"where", "reason"}`` entries
  are stored in the dataset's TFDS metadata (``metadata.json`` in the version directory,
  written with it atomically), as ``{"skipped": [...]}``; `skipped_records(builder)` reads
  them back (empty for a dataset prepared with ``invalid="error"`` or by older code).

Record order: shuffling is disabled (``disable_shuffling=True``), so a split stores its records
in generation order: file then line order for local files, the generator's order for the world.
Index ``i`` of a split is therefore the same record on every run and machine; shuffle in the
grain pipeline.

`prepare(make_builder)` is the only entry point that writes:

* Cached: if the version directory is complete (TFDS's `is_prepared`: ``dataset_info.json``
  and ``features.json`` present), nothing is generated.
* Crash-safe: TFDS writes into ``incomplete.XXXXXX_<version>/`` and renames it to
  ``<version>/`` only after every split is written, so an exception or a killed process never
  leaves a directory that looks complete. Leftover ``incomplete.*`` directories of killed runs
  are deleted by the next prepare (while it holds the lock, so nobody else is writing them).
* Concurrent-safe: preparing holds an exclusive `fcntl.flock` on a lock file next to the
  version directory; a second process waits, then finds the dataset prepared and reuses it.
  Where flock is unavailable, a loser whose rename fails re-opens the winner's dataset.
* Quiet: TFDS's progress bars and its two stdout banners are switched off; one line goes to
  stderr when a dataset has been prepared.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

from absl import logging
import tensorflow_datasets as tfds

from jaxlm.data import readers
from jaxlm.data import schemas
from jaxlm.data.errors import DataError

try:
  import fcntl
except ImportError:  # Not POSIX: prepare without a lock (see `prepare`).
  fcntl = None

# Bump when what a builder writes changes: it is the TFDS version directory of every builder
# and part of the local-file key, so old preparations are never read by new code.
BUILDER_VERSION = "1.0.0"
FILE_FORMAT = "array_record"
LOCAL_SPLITS = ("train", "validation")


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared behaviour: array_record, no shuffling, no stdout banners."""

  VERSION = tfds.core.Version(BUILDER_VERSION)
  RELEASE_NOTES = {BUILDER_VERSION: "jaxlm record schemas (see jaxlm.data.schemas)."}

  # TFDS looks for a `checksums.tsv` next to a builder's code; for a builder inside a regular
  # package that lookup needs the `importlib_resources` backport, which jaxlm does not depend
  # on. These builders download nothing, so they have no code path to look in.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _record_kind(self) -> str:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._describe(),
        features=schemas.tfds_features(self._record_kind()),
        disable_shuffling=True,
        metadata=self._metadata(),
    )

  def _metadata(self) -> tfds.core.MetadataDict | None:
    return None

  def _describe(self) -> str:
    return f"jaxlm {self._record_kind()} records"

  # TFDS prints these two banners to stdout with termcolor; `prepare` logs one line instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# The embedded world.
# ---------------------------------------------------------------------------------------------


def _world():
  from jaxlm.data import world  # Deferred: written alongside, and only needed for `world`.

  return world


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))


def world_data_dir(cache_dir: str, config: Any) -> str:
  """The TFDS data_dir of a world: ``<cache_dir>/world/v<WORLD_VERSION>-<fingerprint>``."""
  return os.path.join(cache_dir, "world", f"v{_safe(_world().WORLD_VERSION)}-{_safe(config.fingerprint())}")


class WorldBuilder(_Builder, skip_registration=True):
  """The world's records of one kind (the builder config), in its three splits."""

  name = "jaxlm_world"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind, description=f"world {kind} records") for kind in schemas.KINDS]

  def __init__(self, *, world_config: Any = None, **kwargs: Any):
    self.world_config = world_config if world_config is not None else _world().WorldConfig()
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside its data sources, for grain workers) as its constructor
    # arguments; ours must travel too.
    self._original_state.update(world_config=self.world_config, file_format=FILE_FORMAT)

  def _record_kind(self) -> str:
    return self.builder_config.name

  def _describe(self) -> str:
    return f"jaxlm world {self._record_kind()} records, world config {self.world_config}"

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    kind, splits = self._record_kind(), {}
    for split in _world().SPLITS:
      records = iter(_world().generate(kind, split, self.world_config))
      first = next(records, None)
      if first is not None:  # A split a WorldConfig makes empty (a size 0) is left out.
        splits[split] = self._generate_examples(split, itertools.chain([first], records))
    return splits

  def _generate_examples(self, split: str, records: Iterator[dict]) -> Iterator[tuple[int, dict]]:
    kind = self._record_kind()
    for i, record in enumerate(records):
      record = schemas.validate(kind, record, f"world[{kind}/{split}][{i}]")
      yield i, schemas.to_tfds_example(kind, record)


# ---------------------------------------------------------------------------------------------
# Local files.
# ---------------------------------------------------------------------------------------------


def holdout_sizes(num_records: int, holdout_fraction: float, where: str = "") -> tuple[int, int]:
  """(train, validation) record counts: validation is the last ceil(n * fraction), at least 1.

  Raises:
    ValueError: if the fraction is not in [0, 1).
    DataError: if holding out would leave no training record.
  """
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
  if holdout_fraction == 0:
    return num_records, 0
  num_validation = max(1, math.ceil(num_records * holdout_fraction - 1e-9))
  if num_validation >= num_records:
    raise DataError(where, f"only {num_records} record(s): cannot hold out {holdout_fraction:.0%} for validation and "
                    "keep a training record; add data, or pass holdout_fraction=0 and a separate eval source")
  return num_records - num_validation, num_validation


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  except OSError as e:
    raise DataError(path, f"cannot read file: {e.strerror or e}") from None
  return digest.hexdigest()


def local_key(reader: str, kind: str, paths: Sequence[str], options: dict[str, Any]) -> str:
  """sha256 (hex) over the files (absolute path, size, content hash), kind, options, versions."""
  files = []
  for path in paths:
    try:
      size = os.path.getsize(path)
    except OSError as e:
      raise DataError(path, f"cannot read file: {e.strerror or e}") from None
    files.append([os.path.abspath(path), size, _file_digest(path)])
  payload = {"builder": BUILDER_VERSION, "reader": reader, "kind": kind, "options": options, "files": files}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class _LocalBuilder(_Builder, skip_registration=True):
  """Records of local files, split into train and the held-out tail."""

  def __init__(self, *, paths: Sequence[str], kind: str, holdout_fraction: float = 0.1,
               source: str = "", invalid: str = "error", max_invalid_fraction: float = 0.01, **kwargs: Any):
    self.paths = list(paths)
    self.kind = schemas.check_kind(kind)
    self.holdout_fraction = holdout_fraction
    self.source = source
    holdout_sizes(2, holdout_fraction)  # Checks the fraction's range early.
    readers.check_invalid_options(invalid, max_invalid_fraction)
    self.invalid = invalid
    self.max_invalid_fraction = max_invalid_fraction
    super().__init__(**kwargs)
    self._original_state.update(paths=self.paths, kind=kind, holdout_fraction=holdout_fraction, source=source,
                                invalid=invalid, max_invalid_fraction=max_invalid_fraction, file_format=FILE_FORMAT)

  def _record_kind(self) -> str:
    return self.kind

  def _describe(self) -> str:
    return f"jaxlm {self.kind} records of {self.source or self.paths} (holdout_fraction={self.holdout_fraction})"

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.MetadataDict()

  def _records(self, skipped: list[dict] | None) -> Iterator[tuple[str, dict]]:
    """The valid records; bad ones raise, or are skipped into `skipped` if it is a list."""
    raise NotImplementedError

  def _skip_list(self) -> list[dict] | None:
    return [] if self.invalid == "skip" else None

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    # A first pass validates everything and counts, so the split point is known before writing.
    skipped = self._skip_list()
    num_records = sum(1 for _ in self._records(skipped))
    readers.check_invalid_fraction(self.source, num_records, skipped or [], self.max_invalid_fraction)
    self.info.metadata["skipped"] = skipped or []  # Written into the version dir with the data.
    if skipped:  # Said once, when preparing; `RecordSource.skipped` has the list on every open.
      logging.warning("jaxlm.data: %s: skipped %d invalid record(s) of %d (invalid='skip'); the first: %s: %s",
                      self.source, len(skipped), num_records + len(skipped), skipped[0]["where"], skipped[0]["reason"])
    num_train, num_validation = holdout_sizes(num_records, self.holdout_fraction, self.source)
    splits = {"train": self._generate_examples(0, num_train)}
    if num_validation:
      splits["validation"] = self._generate_examples(num_train, num_records)
    return splits

  def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
    for i, (_, record) in enumerate(self._records(self._skip_list())):
      if i >= stop:
        break
      if i >= start:
        yield i, schemas.to_tfds_example(self.kind, record)


class LocalJsonlBuilder(_LocalBuilder, skip_registration=True):
  """JSONL files in the schema of `kind` (see `readers.read_jsonl`)."""

  name = "jaxlm_local_jsonl"

  def _records(self, skipped: list[dict] | None) -> Iterator[tuple[str, dict]]:
    return readers.read_jsonl(self.paths, self.kind, skipped=skipped)


class LocalTextBuilder(_LocalBuilder, skip_registration=True):
  """Plain-text files as `text` records (see `readers.read_text_documents`)."""

  name = "jaxlm_local_text"

  def __init__(self, *, docs_per_file: bool = False, **kwargs: Any):
    self.docs_per_file = docs_per_file
    kwargs.setdefault("kind", "text")
    if kwargs["kind"] != "text":
      raise ValueError(f"plain-text files give 'text' records, not {kwargs['kind']!r}")
    super().__init__(**kwargs)
    self._original_state.update(docs_per_file=docs_per_file)

  def _records(self, skipped: list[dict] | None) -> Iterator[tuple[str, dict]]:
    for where, document in readers.read_text_documents(self.paths, docs_per_file=self.docs_per_file,
                                                       skipped=skipped):
      yield where, schemas.validate("text", {"text": document}, where)


def skipped_records(builder: tfds.core.DatasetBuilder) -> list[dict]:
  """The ``{"where", "reason"}`` entries of the records a prepared local dataset left out."""
  metadata = builder.info.metadata
  # `items()` makes TFDS's lazy metadata load `metadata.json`; `get` would not. A dataset
  # prepared before skipping existed has no such file: nothing was skipped.
  return list(dict(metadata.items()).get("skipped", [])) if metadata is not None else []


# ---------------------------------------------------------------------------------------------
# Preparing.
# ---------------------------------------------------------------------------------------------

B = TypeVar("B", bound=tfds.core.DatasetBuilder)


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[bool]:
  """An exclusive advisory lock on `path` (the OS releases it if the process dies).

  Yields whether the lock is held: False where flock is unavailable.
  """
  if fcntl is None:
    yield False
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except OSError as e:  # E.g. a file system without flock: fall back to TFDS's rename.
      logging.warning("jaxlm.data: cannot lock %s (%s); preparing without a lock", path, e)
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_incomplete_dirs(data_path: str) -> None:
  """Deletes ``incomplete.*_<version>`` directories left by killed runs (call under the lock)."""
  parent, version = os.path.split(os.path.normpath(data_path))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith("incomplete.") and entry.endswith(f"_{version}"):
      logging.info("jaxlm.data: removing %s left by an interrupted prepare", os.path.join(parent, entry))
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  was_active = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was_active)


def _download_config() -> Any:
  # try_download_gcs=False: never look for a pre-built copy on the network.
  return tfds.download.DownloadConfig(try_download_gcs=False)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's version directory is complete (quietly, unlike TFDS's own check)."""
  # TFDS logs a warning for a missing directory; the common not-yet-prepared case stays quiet.
  return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def prepare(make_builder: Callable[[], B], what: str = "") -> B:
  """Returns a prepared builder from `make_builder`, generating its data once if needed.

  Args:
    make_builder: makes the builder (with its `data_dir`); called again after waiting for the
      lock, so that data another process prepared meanwhile is read from disk.
    what: a name for the one log line, e.g. ``"world@abc/chat"``.
  """
  builder = make_builder()
  if is_prepared(builder):
    return builder
  data_path = os.fspath(builder.data_path)
  lock_path = os.path.join(os.path.dirname(data_path), f".{os.path.basename(data_path)}.lock")
  with _exclusive_lock(lock_path) as locked:
    builder = make_builder()
    if is_prepared(builder):
      return builder
    if locked:  # Without the lock an incomplete dir may be another process's work in progress.
      _remove_stale_incomplete_dirs(data_path)
    logging.info("jaxlm.data: preparing %s into %s", what or builder.name, data_path)
    start = time.perf_counter()
    try:
      with _quiet_tfds():
        builder.download_and_prepare(download_config=_download_config(), file_format=FILE_FORMAT)
    except OSError:
      # Without a working lock, another process may have renamed its copy into place first.
      other = make_builder()
      if is_prepared(other):
        return other
      raise
    seconds = time.perf_counter() - start
  counts = ", ".join(f"{name}={info.num_examples}" for name, info in builder.info.splits.items())
  print(f"jaxlm.data: prepared {what or builder.name} ({counts}) in {seconds:.1f}s at {data_path}",
        file=sys.stderr, flush=True)
  return builder
