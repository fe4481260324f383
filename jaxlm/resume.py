"""Resume keeps its word: a run directory is continued only with the config it was started with.

A workdir holding a run (its `config.json`) is resumed only when the new config equals the recorded
one, except for

* keys that change how fast a run goes or how it logs, never what it computes
  (`FREE_RESUME_KEYS`): they may change freely;
* keys the user names with ``--resume_changes=total_steps,eval_every`` (a section name such as
  ``optimizer`` names all its keys).

Any other difference stops the run before anything is written, listing each key as
``key: old -> new`` and saying how to proceed. An accepted change rewrites `config.json` (so it
describes the run from now on) and appends a row to `config_history.jsonl`, whose rows together
keep every config the run was ever started with::

  {"time": ..., "event": "created" | "resumed with changes", "changes": {key: [old, new]},
   "config": {the full config of that session}}

A workdir whose `config.json` or `manifest.json` names another stage is refused outright.

A workdir with a config but no checkpoint holds no run yet (a session failed or was stopped
before its first save): nothing in it was trained, so a new config starts it over. The files its
earlier sessions derived from the old config are removed (`UNSTARTED_FILES`; never anything
else), and the history row says "restarted".
"""

from __future__ import annotations

import datetime
import fnmatch
import glob
import json
import os
import shutil
from typing import Any, Iterable, Mapping

from jaxlm import errors

HISTORY_FILE = "config_history.jsonl"
_ABSENT = "<absent>"

# Keys whose value changes speed, memory or logging only, never the numbers a run computes (up to
# float rounding): device layout, how many steps one call runs, gradient accumulation, scan
# unrolling, attention kernel, remat, reader threads, the data cache's location, checkpoint and
# log cadence, eval batch sizes, and how many samples are logged.
FREE_RESUME_KEYS = (
    "mesh.*", "steps_per_call", "num_microbatches", "model.scan_unroll", "model.attention_impl",
    "model.remat_policy", "data.num_threads", "data.cache_dir", "log_every", "checkpoint_every",
    "keep_checkpoints", "eval.batch_size", "eval.num_samples", "stats.batch_size",
)


# What a session writes before its first checkpoint, derived from its config (a stale tokenizer, the
# parent's scores, DPO's reference table, metrics): removed when an unstarted run gets a new config.
UNSTARTED_FILES = ("manifest.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json", "generation_config.json",
                   "metrics.jsonl", "samples.jsonl", "skipped.jsonl", "reward_stats.json",
                   "reference_logps*", "events.out.tfevents.*", "checkpoints")


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a finished step directory (orbax names them by step)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def clear_unstarted(workdir: str) -> list[str]:
  """Removes the `UNSTARTED_FILES` of a run without a checkpoint; returns what was removed."""
  if has_checkpoint(workdir):
    raise errors.RunDirError(f"{workdir} holds a checkpoint: it is a run, never cleared")
  removed = []
  for pattern in UNSTARTED_FILES:
    for path in glob.glob(os.path.join(workdir, pattern)):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
      removed.append(os.path.basename(path))
  return removed


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"optimizer.learning_rate": 0.001, ...}: the leaves of a (nested) config as dotted keys."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out: dict[str, Any] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(flatten(value, f"{name}."))
    else:
      out[name] = value
  return out


def plain_config(config: Any) -> dict:
  """`config` (a ConfigDict or mapping) as plain JSON values, as config.json holds it."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=str))


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} for every leaf that differs (a key only on one side shows `<absent>`)."""
  a, b = flatten(old), flatten(new)
  return {key: (a.get(key, _ABSENT), b.get(key, _ABSENT))
          for key in sorted(set(a) | set(b)) if a.get(key, _ABSENT) != b.get(key, _ABSENT)}


def is_free(key: str) -> bool:
  """Whether `key` may change on resume without being named (`FREE_RESUME_KEYS`)."""
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in FREE_RESUME_KEYS)


def _named(key: str, allowed: Iterable[str]) -> bool:
  return any(key == name or key.startswith(f"{name}.") for name in allowed)


def normalise_names(names: Iterable[str], config: Any) -> list[str]:
  """The `--resume_changes` names without a `config.` prefix; an unknown one is a ConfigError."""
  keys = flatten(plain_config(config))
  out = []
  for name in (n.strip() for n in names):
    if not name:
      continue
    name = name.removeprefix("config.")
    if not any(_named(key, [name]) for key in keys):
      raise errors.ConfigError("", f"--resume_changes names {name!r}, which is not a config key"
                               f"{errors.did_you_mean(name, keys)}")
    out.append(name)
  return out


def _show(value: Any) -> str:
  return value if value == _ABSENT else json.dumps(value)


def check(workdir: str, recorded: Mapping[str, Any], config: Any, allowed: Iterable[str] = ()
          ) -> dict[str, tuple[Any, Any]]:
  """The accepted changes from the `recorded` config to `config`; raises for any other change.

  Returns {key: (old, new)} of the changes that will be recorded (free keys included).
  Raises `errors.RunDirError` listing every difference that is neither free nor named.
  """
  allowed = normalise_names(allowed, config)
  changes = differences(recorded, plain_config(config))
  refused = {k: v for k, v in changes.items() if not is_free(k) and not _named(k, allowed)}
  if refused:
    lines = "\n".join(f"  {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
    raise errors.RunDirError(
        f"{workdir} holds a run started with another config; resuming it would change:\n{lines}\n"
        f"To start a new run, pass another --workdir. To continue this run with these changes, "
        f"name them: --resume_changes={','.join(refused)} (the change is appended to "
        f"{os.path.join(workdir, HISTORY_FILE)}).")
  return changes


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record(workdir: str, config: Any, changes: Mapping[str, tuple[Any, Any]] | None, *,
           event: str | None = None) -> None:
  """Appends the session's row to config_history.jsonl (the caller then writes config.json).

  `changes` None: the run is new ("created"). Empty: nothing to record. `event` overrides the
  row's event (e.g. "restarted").
  """
  if changes is not None and not changes:
    return
  row = {"time": now(), "event": event or ("created" if changes is None else "resumed with changes"),
         "changes": {k: [old, new] for k, (old, new) in (changes or {}).items()}, "config": plain_config(config)}
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")
