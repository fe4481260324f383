"""The error policy: a mistake a person can fix is one readable `error:` paragraph, not a traceback.

Two kinds of failure, told apart by type:

* **User errors** (`UserError` and its subclasses; `jaxlm.data.errors.DataError` is one): bad data,
  a config key or value, a wrong or missing parent run, a busy or foreign workdir, a path that
  does not exist or cannot be written. They say *where* (file:line, field, config key), *what was
  expected* and *what to do*. Every command line (experiments, the pipeline, tools) runs under
  `guard`, which prints them as ``error: <message>`` on stderr and exits with status 2
  (`EXIT_USER_ERROR`), without a traceback.
* **Programming errors**: everything else. They keep their tracebacks (exit status 1).

`--debug` on any command line, or ``JAXLM_DEBUG=1`` in the environment, shows the traceback of a
user error too.

Raise user errors as early as possible: config values before anything is written, data-dependent
requirements (a judge for data without a gold reward) at start-up, never after training.
"""

from __future__ import annotations

import difflib
import errno
import functools
import os
import sys
from typing import Any, Callable, Iterable

EXIT_USER_ERROR = 2
# OSErrors that are the user's to fix (a path or the file system), shown as "error: path: reason".
_USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                          errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


class UserError(Exception):
  """A problem the user can fix; its message says where, what was expected and what to do."""


class ConfigError(UserError, ValueError):
  """A config key or value that cannot work: `key` is the dotted path under `config.`."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"config.{key}: {message}" if key else message)


class RunDirError(UserError, ValueError):
  """A run directory that cannot be used: busy, of another stage, or a config that drifted."""


class ParentError(UserError, ValueError):
  """A parent run (`init_from`, `reward_from`, `eval.judge`) that is unfinished or does not fit."""


class MissingError(UserError, FileNotFoundError):
  """A file or run directory the user named that is not there (also a `FileNotFoundError`)."""


def debug_enabled(argv: Iterable[str] | None = None) -> bool:
  """Whether tracebacks of user errors are wanted: `--debug` on the command line or JAXLM_DEBUG=1."""
  argv = sys.argv if argv is None else argv
  flag = any(arg in ("--debug", "--debug=true", "--debug=True", "--debug=1") for arg in argv)
  return flag or os.environ.get("JAXLM_DEBUG", "").lower() not in ("", "0", "false", "no")


def user_message(error: BaseException) -> str | None:
  """The one-paragraph message of a user error, or None when `error` is a programming error."""
  if isinstance(error, UserError):
    return str(error)
  if isinstance(error, OSError) and error.errno in _USER_ERRNOS and error.filename:
    hint = {errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.EROFS: "the file system is read-only; pick a writable path",
            errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            }.get(error.errno, "check the path")
    return f"{error.filename}: {error.strerror or error} ({hint})"
  return None


def report(message: str) -> None:
  """Prints `message` as the `error:` paragraph on stderr (after flushing stdout, so it comes last)."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a command's `main`: user errors become `error: ...` and exit status 2.

  Programming errors, `SystemExit` and `KeyboardInterrupt` pass through unchanged.
  """
  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  # Sorted into user / programming below.
      message = user_message(e)
      if message is None or debug_enabled():
        raise
      report(message)
      sys.exit(EXIT_USER_ERROR)
  return wrapper


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
  """The up to `n` dotted candidates most like the dotted `name` (a typo, an abbreviation, a wrong section).

  Keys are compared by their last part, also against its initials (`lr` for `learning_rate`);
  a candidate in the same section as `name` wins ties.
  """
  section, _, last = name.rpartition(".")

  def score(candidate: str) -> float:
    c_section, _, c_last = candidate.rpartition(".")
    initials = "".join(part[:1] for part in c_last.split("_"))
    similar = max(difflib.SequenceMatcher(None, last, c_last).ratio(),
                  difflib.SequenceMatcher(None, last, initials).ratio() if len(initials) > 1 else 0.0)
    return similar + (0.05 if c_section == section else 0.0)

  ranked = sorted(set(candidates), key=lambda c: (-score(c), c))
  return [c for c in ranked if score(c) >= 0.6][:n]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """" (did you mean a, b?)" for the closest candidates, or "" when none is close."""
  close = closest(name, candidates)
  return f" (did you mean {', '.join(close)}?)" if close else ""
