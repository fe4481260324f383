"""Run directories, orbax checkpoints, and loading a parent stage (preemption: jaxlm.preemption).

One stage run writes one directory::

  <workdir>/
    config.json        the full resolved config (`RunDir.write_config`)
    manifest.json      what this run is and where it came from (`RunDir.write_manifest`)
    tokenizer.model    copied from the parent, or trained here in stage 1
    checkpoints/<step>/state/   the train state pytree (orbax StandardSave, sharded arrays)
    checkpoints/<step>/data/    the data iterators' positions, one per process (JSON)
    metrics.jsonl, events.out.tfevents.*, samples.jsonl   (`jaxlm.metrics`)

`manifest.json` (``manifest_version`` 1)::

  stage             "pretrain", "sft", ...
  parent            the parent's run directory (absolute), or null
  complete          true once the stage finished; the pipeline skips complete runs
  created           ISO 8601 UTC time of the first session (kept when a run resumes)
  sessions          how many times the run was started (1 + resumes)
  wall_time_s       seconds spent over all sessions, as last reported by the trainer
  config_hash       sha256 of config.json's canonical JSON (sorted keys, no spaces)
  tokenizer_hash    sha256 of tokenizer.model (`Tokenizer.content_hash`)
  data_source       the data layer's description of the source and its version
  model_config      `ModelConfig.to_dict()`: the next stage rebuilds the model from it
  git_commit        HEAD of the jaxlm checkout, or null (not a git checkout, no git)
  git_dirty         whether tracked files differ from HEAD, or null
  jaxlm_version, jax_version, devices ("8 x TPU v4"), process_count
  final_metrics     flat {name: number or null}: the stage's headline numbers
  data              per pipeline (e.g. "train", "validation"): seen / kept / truncated / dropped
                    and dropped_by_reason; invalid records skipped (`data.invalid=skip`, listed in
                    skipped.jsonl) and records read (`jaxlm.stage.DataAccount`)
  extra             anything else the stage wants to record

Checkpoints never replace a good one with a bad one. Orbax writes each step into a temporary
directory and renames it when every item is written (`commit_success.txt` marks it), and only
then deletes the steps beyond `max_to_keep`; a save killed half-way leaves a temporary directory
that `latest_step` ignores and the next `Checkpointer` deletes. What the checkpoint cannot judge
is whether the state is good: the trainer must not save after a NaN (`all_finite`,
`jaxlm.metrics.check_finite`).

Params-only restore (`load_parent`): the train state is saved as one pytree with a top-level
``params`` entry (a dict key or a dataclass field), so a later stage restores just that subtree
with orbax's partial restore (`PyTreeRestore(partial_restore=True)`); the optimizer state and the
rest are never read, so they need not match (a different optimizer is fine) and params are
stored once.

Only process 0 writes the JSON files and the tokenizer; every process must construct the
`Checkpointer` and call `save`/`restore` (they are collective across processes). Workdirs are
POSIX paths: local disk, or for several hosts a shared mount (NFS, GCS FUSE).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import jaxlm
from jaxlm import errors
from jaxlm import files
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.model import ModelConfig

MANIFEST_VERSION = 1
PARAMS_KEY = "params"  # the top-level entry of the train state that `load_parent` restores
# ModelConfig fields a later stage may change: they decide how the model runs, not what the
# parameters mean. Every other field (shapes, tying, rope_theta, norm_eps, scan layout) must match.
FREE_MODEL_FIELDS = frozenset({"max_len", "dtype", "remat_policy", "scan_unroll", "attention_impl"})


JAXLM_ORIGIN = "jaxlm"  # `manifest["model_origin"]` of a model grown by jaxlm's stage 1


def parent_model_origin(parent_workdir: str | os.PathLike) -> str:
  """The `model_origin` of a run directory's manifest ("jaxlm" for runs written before it
  existed, and for a directory without one: stages check their parents before writing)."""
  path = os.path.join(os.fspath(parent_workdir), "manifest.json")
  manifest = _read_json(path, "manifest.json") if os.path.exists(path) else {}
  return manifest.get("model_origin") or JAXLM_ORIGIN


# --- JSON helpers ----------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
  # numpy/jax scalars and small arrays turn up in configs and iterator states.
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"{type(value).__name__} is not JSON-serializable: {value!r}")


def _plain(obj: Any) -> Any:
  """A ConfigDict or mapping as plain JSON-ready Python (lists, dicts, numbers, strings)."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()  # ml_collections.ConfigDict, ModelConfig
  return json.loads(json.dumps(obj, default=_json_default))


def config_hash(config: Any) -> str:
  """sha256 of the canonical JSON of `config` (sorted keys, compact separators)."""
  text = json.dumps(_plain(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.MissingError(f"{what} not found: {path}") from None
  except json.JSONDecodeError as e:
    raise errors.RunDirError(f"{path}: not valid JSON ({e})") from None


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float | None]:
  out = {}
  for key, value in metrics.items():
    array = np.asarray(value)
    if array.shape or array.dtype.kind not in "biuf":
      raise ValueError(f"final_metrics[{key!r}] must be a number, got {value!r}")
    if array.dtype.kind in "biu":  # counts (steps, tokens) stay integers
      out[str(key)] = int(array)
    else:
      out[str(key)] = float(array) if np.isfinite(array) else None  # strict JSON has no NaN
  return out


def _git_info() -> tuple[str | None, bool | None]:
  """(commit, dirty) of the checkout jaxlm is imported from; (None, None) when unknowable."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxlm.__file__)))

  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    # An installed jaxlm can sit inside some other repository (a venv in a project): only
    # trust git when the checkout's top level is jaxlm's own.
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return None, None
    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None, None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- Run directory ---------------------------------------------------------------------------


class RunDir:
  """The files of one stage run (see the module docstring). Writes happen on process 0 only."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.config_path = os.path.join(self.workdir, "config.json")
    self.manifest_path = os.path.join(self.workdir, "manifest.json")
    self.tokenizer_path = os.path.join(self.workdir, "tokenizer.model")
    self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.samples_path = os.path.join(self.workdir, "samples.jsonl")
    self._prior_wall_time_s = 0.0  # earlier sessions' total, when this session resumed a run

  def write_config(self, config: Any) -> None:
    """Writes config.json (a ConfigDict or mapping) atomically, keys in the config's order."""
    if jax.process_index() == 0:
      files.atomic_write(self.config_path, json.dumps(_plain(config), indent=2) + "\n")

  def read_config(self) -> dict:
    return _read_json(self.config_path, "config.json")

  def save_tokenizer(self, tokenizer: tokenizer_lib.TokenizerLike) -> None:
    """Writes the tokenizer's files (tokenizer.model, or tokenizer.json and its config and chat
    template for an imported one), each atomically, on process 0."""
    if jax.process_index() == 0:
      tokenizer.save(self.workdir)

  def has_tokenizer(self) -> bool:
    """Whether the run directory holds a tokenizer (either kind)."""
    return any(os.path.isfile(os.path.join(self.workdir, name))
               for name in (tokenizer_lib.SENTENCEPIECE_FILE, tokenizer_lib.HF_TOKENIZER_FILE))

  def load_tokenizer(self) -> tokenizer_lib.TokenizerLike:
    """The run's tokenizer (`tokenizer_lib.load_tokenizer`); errors name the directory."""
    return tokenizer_lib.load_tokenizer(self.workdir)

  def write_manifest(self, *, stage: str, parent: str | os.PathLike | None, config: Any,
                     tokenizer_hash: str, data_source: str,
                     model_config: ModelConfig | Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None, model_origin: str | None = None) -> dict:
    """Writes manifest.json at the start of a session, marked not complete.

    Resuming (a manifest already here) keeps `created`, counts the session and carries the
    earlier sessions' wall time forward, so `wall_time_s` stays the run's total.

    Args:
      stage: the stage name; a workdir holding a different stage is refused.
      parent: the parent's run directory (`init_from`), or None.
      config: the resolved config (ConfigDict or mapping); only its hash is stored here.
      tokenizer_hash: `Tokenizer.content_hash` of the tokenizer this run uses.
      data_source: the data layer's description of the source, with its version.
      model_config: the model's `ModelConfig` (or its dict), for the next stage.
      extra: more JSON-able facts worth keeping (e.g. number of parameters).
      model_origin: where the model's architecture comes from: "jaxlm" (grown by stage 1) or
        "hf:<architecture>" (an imported Hugging Face model, `tools/import_hf.py`). None: the
        parent's (so it follows the lineage), else "jaxlm". A child of an imported model takes
        its shape from the parent rather than from a preset (`jaxlm.stage.adopt_parent_model`).

    Returns:
      The manifest as written (computed on every process; written by process 0).
    """
    old = self.read_manifest() if os.path.exists(self.manifest_path) else None
    if old is not None and old.get("stage") != stage:
      raise errors.RunDirError(f"{self.workdir} holds a {old.get('stage')!r} run; use a new workdir "
                       f"for the {stage!r} stage")
    self._prior_wall_time_s = float((old or {}).get("wall_time_s") or 0.0)
    commit, dirty = _git_info()
    devices = jax.devices()
    if model_origin is None:
      model_origin = parent_model_origin(parent) if parent else JAXLM_ORIGIN
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "parent": os.path.abspath(os.fspath(parent)) if parent else None,
        "complete": False,
        "created": old["created"] if old else _now(),
        "sessions": (old or {}).get("sessions", 0) + 1,
        "wall_time_s": self._prior_wall_time_s,
        "config_hash": config_hash(config),
        "tokenizer_hash": tokenizer_hash,
        "data_source": data_source,
        "model_config": _plain(model_config) if model_config is not None else None,
        "model_origin": model_origin,
        "git_commit": commit,
        "git_dirty": dirty,
        "jaxlm_version": jaxlm.__version__,
        "jax_version": jax.__version__,
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "process_count": jax.process_count(),
        "final_metrics": (old or {}).get("final_metrics", {}),
        "data": (old or {}).get("data", {}),
        "extra": _plain(dict(extra or {})),
    }
    self._write_manifest(manifest)
    return manifest

  def update_manifest(self, *, final_metrics: Mapping[str, Any] | None = None,
                      wall_time_s: float | None = None, complete: bool | None = None,
                      extra: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None) -> dict:
    """Updates manifest.json: call at checkpoints (wall time) and at the end (complete=True).

    Args:
      final_metrics: merged into `final_metrics`; ints stay ints, other numbers become floats
        (NaN/Inf -> null).
      wall_time_s: seconds of *this session*; earlier sessions' time is added to it.
      complete: mark the run complete (or not); None leaves it.
      extra: merged into `extra`.
      data: replaces `data`: what the data pipelines saw, kept, truncated and dropped
        (`jaxlm.stage.DataAccount`).

    Returns:
      The updated manifest ({} on processes other than 0, which may not see the file).
    """
    if jax.process_index() != 0:
      return {}
    manifest = self.read_manifest()
    if final_metrics is not None:
      manifest["final_metrics"] = {**manifest.get("final_metrics", {}),
                                   **_flat_metrics(final_metrics)}
    if wall_time_s is not None:
      manifest["wall_time_s"] = round(self._prior_wall_time_s + float(wall_time_s), 3)
    if complete is not None:
      manifest["complete"] = bool(complete)
    if extra is not None:
      manifest["extra"] = {**manifest.get("extra", {}), **_plain(dict(extra))}
    if data is not None:
      manifest["data"] = _plain(dict(data))
    self._write_manifest(manifest)
    return manifest

  def _write_manifest(self, manifest: dict) -> None:
    if jax.process_index() == 0:
      files.atomic_write(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

  def read_manifest(self) -> dict:
    return _read_json(self.manifest_path, "manifest.json")

  def is_complete(self) -> bool:
    """Whether manifest.json exists and says the stage finished."""
    try:
      return bool(self.read_manifest().get("complete", False))
    except (FileNotFoundError, ValueError):
      return False


# --- Checkpoints -----------------------------------------------------------------------------


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of `tree` is free of NaN and Inf (one host sync).

  Call it on the params before `Checkpointer.save` when saves do not fall on steps whose loss
  was checked; integer leaves (step counters) and non-array leaves are skipped.
  """
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(leaves)) if leaves else True


@jax.jit  # one dispatch for the whole tree, not one per leaf
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def _gather_per_process(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (a collective with several processes)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes.ravel())]


def _require_shardings(tree: Any, name: str) -> None:
  def check(path, leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has no sharding; restoring needs the target "
          "shardings (jax.ShapeDtypeStruct(shape, dtype, sharding=...))")
  jax.tree_util.tree_map_with_path(check, tree)


def _manager(directory: str, *, pytree_handler: Any, **options: Any) -> ocp.CheckpointManager:
  # Registering both items up front lets a restore read one without warnings about the other.
  handlers = {"state": pytree_handler, "data": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options),
                               item_handlers=handlers)


class Checkpointer:
  """The train state and the data iterators' positions, saved together every N steps.

  Each save is one orbax step directory with two items: ``state`` (the train state pytree, any
  sharding) and ``data`` (every process's iterator state, JSON). Restores read into the
  shardings of `abstract_state`, whatever the device count at save time.

  Usage::

    ckpt = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:                  # resume this run
      state, data_state = ckpt.restore(abstract_state=abstract_state)
      train_iter.set_state(data_state)
    ...
    ckpt.save(step, state, data_state=train_iter.get_state())
    ...
    ckpt.close()                                        # waits for the last async save
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True):
    """Opens (creating it) `<workdir>/checkpoints`; deletes leftovers of interrupted saves."""
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    self._manager = _manager(self.directory, pytree_handler=ocp.StandardCheckpointHandler(),
                             max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                             cleanup_tmp_directories=True, create=True)

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any] | None,
           force: bool = False) -> bool:
    """Starts saving `state` and `data_state` as `step` (async: returns once copied to host).

    The state's arrays are copied off the devices before this returns, so the next train
    step may donate them. Every process must call this (the data states are gathered).

    Args:
      step: the number of optimizer steps taken.
      state: the train state pytree; a later stage reads its top-level `params` entry.
      data_state: this process's `iterator.get_state()` (a JSON-able dict), or None.
      force: passed to orbax (save even if its interval policy would skip this step).

    Returns:
      Whether a save started; False when `step` is already saved (never overwritten).
    """
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("checkpoint for step %d already in %s; not overwritten", step, self.directory)
      return False
    try:  # fail here, synchronously, rather than in the background writer
      data_state = json.loads(json.dumps(data_state, default=_json_default))
    except TypeError as e:
      raise TypeError(f"data_state must be JSON-able: {e}") from None
    data = {"process_count": jax.process_count(), "states": _gather_per_process(data_state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    return bool(self._manager.save(step, args=args, force=force))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, *, abstract_state: Any,
              restore_data: bool = True) -> tuple[Any, dict | None]:
    """Reads checkpoint `step` (default: the latest) into `abstract_state`'s shardings.

    Args:
      step: which checkpoint; None for the latest.
      abstract_state: the state's structure with `jax.ShapeDtypeStruct` leaves that carry the
        target `sharding` (e.g. `jax.eval_shape` of the state factory plus the shardings the
        jitted init uses), or real arrays (their shardings are used).
      restore_data: also return this process's data-iterator state. Set False to restart the
        data from the beginning, e.g. when the process count changed.

    Returns:
      (state, data_state); data_state is None when not restored or not saved.

    Raises:
      FileNotFoundError: no checkpoint (for `step`) in the directory.
      ValueError: the state does not match `abstract_state`, or the process count changed.
    """
    steps = self.all_steps()
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None or step not in steps:
      what = "no checkpoint" if step is None else f"no checkpoint for step {step}"
      raise FileNotFoundError(f"{what} in {self.directory} (steps: {steps})")
    _require_shardings(abstract_state, "abstract_state")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if restore_data:
      args["data"] = ocp.args.JsonRestore()
    where = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{where}: the checkpoint does not match abstract_state: {e}") from e
    if not restore_data:
      return restored["state"], None
    data = restored["data"] or {}
    saved_count = data.get("process_count", 1)
    if saved_count != jax.process_count():
      raise errors.RunDirError(
          f"{where} was saved by {saved_count} processes, this run has {jax.process_count()}: "
          "the data iterators' positions do not carry over; pass restore_data=False to restart "
          "the data (already-seen examples will be seen again)")
    return restored["state"], data.get("states", [None])[jax.process_index()]

  def wait(self) -> None:
    """Blocks until the pending async save is on disk (and raises if it failed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --- Loading a parent stage ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParentRun:
  """What a later stage takes from its parent's run directory."""

  workdir: str
  step: int
  params: Any
  model_config: ModelConfig
  tokenizer: tokenizer_lib.TokenizerLike
  manifest: dict
  config: dict


def _model_mismatches(parent: ModelConfig, expected: ModelConfig | Mapping[str, Any]) -> list[str]:
  expected = expected.to_dict() if isinstance(expected, ModelConfig) else dict(expected)
  have = parent.to_dict()
  return [f"{name}: parent {have.get(name)!r}, expected {expected[name]!r}"
          for name in sorted(expected)
          if name not in FREE_MODEL_FIELDS and have.get(name) != expected[name]]


def _latest_params(directory: str, abstract_params: Any | None) -> tuple[int, Any]:
  """(step, the `params` entry of the saved train state alone) of the latest checkpoint."""
  workdir = os.path.dirname(directory)
  if not os.path.isdir(directory):
    raise errors.MissingError(f"parent run {workdir} has no checkpoint yet ({directory} is missing)")
  manager = _manager(directory, pytree_handler=ocp.PyTreeCheckpointHandler(), read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise errors.MissingError(f"parent run {workdir} has no checkpoint yet ({directory} "
                              "holds no complete one)")
    where = os.path.join(directory, str(step), "state")
    saved = manager.item_metadata(step)["state"].tree
    if not isinstance(saved, Mapping) or PARAMS_KEY not in saved:
      keys = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
      raise errors.ParentError(f"{where}: the saved train state has no top-level {PARAMS_KEY!r} "
                       f"entry (it has {keys})")
    if abstract_params is None:
      # Host numpy arrays: valid on any device count; the caller shards them.
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[PARAMS_KEY])
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
      _require_shardings(abstract_params, "abstract_params")
      target = abstract_params
      restore_args = jax.tree.map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                         dtype=x.dtype), abstract_params)
    args = ocp.args.PyTreeRestore(item={PARAMS_KEY: target},
                                  restore_args={PARAMS_KEY: restore_args}, partial_restore=True)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, TypeError) as e:
      raise errors.ParentError(f"{where}: the saved params do not match abstract_params: {e}") from e
    return step, restored["state"][PARAMS_KEY]
  finally:
    manager.close()


def load_parent(parent_workdir: str | os.PathLike, *, expect_tokenizer_hash: str | None = None,
                expect_model_config: ModelConfig | Mapping[str, Any] | None = None,
                abstract_params: Any | None = None, require_complete: bool = True) -> ParentRun:
  """Reads a finished stage's run directory: its model, tokenizer and latest params.

  Only the `params` subtree of the latest checkpoint is read, so the parent's optimizer state
  never has to match the child's.

  Args:
    parent_workdir: the parent's run directory (`init_from`).
    expect_tokenizer_hash: the tokenizer the child uses; must equal the parent's.
    expect_model_config: the child's model (ModelConfig or dict); every field outside
      `FREE_MODEL_FIELDS` that it gives must equal the parent's.
    abstract_params: the params' `jax.ShapeDtypeStruct`s with target shardings: restore
      straight onto the devices. None: host numpy arrays in the parent's layout (then
      `jax.device_put` them), which also suits a child that adds a head (`add_scalar_head`).
    require_complete: refuse a parent whose manifest does not say complete.

  Returns:
    A `ParentRun`.

  Raises:
    FileNotFoundError: the directory, its manifest, tokenizer or any checkpoint is missing.
    ValueError: incomplete parent, tokenizer or model mismatch, params not matching.
  """
  run = RunDir(parent_workdir)
  if not os.path.isdir(run.workdir):
    raise errors.MissingError(f"parent run directory not found: {run.workdir}")
  if not os.path.exists(run.manifest_path):
    raise errors.MissingError(f"{run.manifest_path} not found: {run.workdir} is not a jaxlm run "
                            "directory, or its run never started")
  manifest = run.read_manifest()
  if require_complete and not manifest.get("complete"):
    raise errors.ParentError(f"parent run {run.workdir} is incomplete ({run.manifest_path} says "
                     "complete=false): finish it (rerun its command to resume), or pass "
                     "require_complete=False to use its latest checkpoint")
  tokenizer = run.load_tokenizer()
  if manifest.get("tokenizer_hash") not in (None, tokenizer.content_hash):
    raise errors.ParentError(f"the tokenizer in {run.workdir} (sha256 {tokenizer.content_hash}) is not the "
                     f"tokenizer the manifest records ({manifest['tokenizer_hash']}): the run "
                     "directory was modified")
  if expect_tokenizer_hash is not None and expect_tokenizer_hash != tokenizer.content_hash:
    raise errors.ParentError(f"tokenizer mismatch: parent {run.workdir} was trained with "
                     f"{tokenizer.content_hash}, this run uses {expect_tokenizer_hash}")
  if not manifest.get("model_config"):
    raise errors.ParentError(f"{run.manifest_path} has no model_config; cannot rebuild the model")
  model_config = ModelConfig.from_dict(manifest["model_config"])
  if expect_model_config is not None:
    mismatches = _model_mismatches(model_config, expect_model_config)
    if mismatches:
      raise errors.ParentError(f"model config mismatch with parent {run.workdir}: "
                       + "; ".join(mismatches))
  step, params = _latest_params(run.checkpoint_dir, abstract_params)
  return ParentRun(workdir=run.workdir, step=step, params=params, model_config=model_config,
                   tokenizer=tokenizer, manifest=manifest, config=run.read_config())
