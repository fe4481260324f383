"""The command line every stage shares: its flags, config loading with readable errors, `run`.

Every experiment module (`experiments/<stage>.py`) is run as

  python -m experiments.<stage> --config=configs/<stage>.py:<preset> --workdir=DIR \
      [--config.<key>=<value> ...] [--resume_changes=key,...] [--debug]

`define_flags()` defines those flags once per process (so the pipeline can import every stage's
module), and `run(main)` replaces `absl.app.run(main)` with the error policy of `jaxlm.errors`:
a config key typo at any depth is one `error:` line naming the closest valid keys, a bad value
names the flag, and a user error raised by `main` is one `error:` paragraph (exit status 2).

`load_config(config_arg, overrides)` parses a config file and its overrides exactly as the
command line does, without running anything: the pipeline uses it to check every stage's config
before the first stage starts.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxlm import errors

FLAGS = flags.FLAGS
_DEFINED: dict[str, Any] = {}


def define_flags() -> None:
  """Defines --config, --workdir, --resume_changes and --debug (once per process)."""
  if _DEFINED:
    return
  _DEFINED["config"] = config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
  _DEFINED["workdir"] = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
  _DEFINED["resume_changes"] = flags.DEFINE_list(
      "resume_changes", [], "Config keys that may differ from the run's config.json when resuming "
      "(e.g. total_steps,eval_every; a section name names all its keys). See jaxlm/resume.py.")
  _DEFINED["debug"] = flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
  flags.mark_flags_as_required(["config", "workdir"])


def config() -> Any:
  return _DEFINED["config"].value


def workdir() -> str:
  return _DEFINED["workdir"].value


def resume_changes() -> list[str]:
  return list(_DEFINED["resume_changes"].value)


# ------------------------------------------------------------------------------------------------
# Config loading with messages a person can act on.
# ------------------------------------------------------------------------------------------------
def _config_arg(argv: Sequence[str]) -> str | None:
  """The value of --config in `argv` (either `--config=X` or `--config X`)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv: Sequence[str]) -> list[str]:
  """The dotted keys of the `--config.<key>[=value]` arguments (`--noconfig.<key>` included)."""
  keys = []
  for arg in argv:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split("=", 1)[0])
  return keys


def _parse_with(argv: list[str]) -> Any:
  """The config `argv` gives, parsed by config_flags on a FlagValues of its own (not absl's global)."""
  values = flags.FlagValues()
  # sys_argv: config_flags otherwise reads the overrides from the process's own sys.argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def _base_config(config_arg: str) -> Any:
  return _parse_with(["config", f"--config={config_arg}"])


def _exception_text(error: BaseException) -> str:
  """The message of `error` without the tracebacks that config_flags folds into its messages."""
  text = str(error).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  # config_flags wraps a failing get_config() in "Error whilst parsing config file: <traceback>":
  # the last line is the config file's own exception ("ValueError: unknown preset ...").
  if "Traceback (most recent call last)" in text and lines:
    return lines[-1].split(": ", 1)[-1]
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
    text = text[1:-1]  # KeyError's repr quoting.
  return text or type(error).__name__


def _all_keys(config: Any, prefix: str = "") -> list[str]:
  """Every dotted key of `config`: leaves and sections."""
  out = []
  for key, value in config.items():
    out.append(f"{prefix}{key}")
    if hasattr(value, "items") and not isinstance(value, str):
      out.extend(_all_keys(value, f"{prefix}{key}."))
  return out


def config_error_message(argv: Sequence[str], error: BaseException) -> str:
  """A readable message for `error`, raised while parsing `argv`'s --config and its overrides."""
  config_arg = _config_arg(argv)
  if config_arg is None:
    return _exception_text(error)
  try:
    base = _base_config(config_arg)
  except Exception as e:  # pylint: disable=broad-except  # The config file itself is the problem.
    return f"--config={config_arg}: {_exception_text(e)}"
  keys = _all_keys(base)
  for key in _override_keys(argv):
    if key not in keys:
      return (f"--config.{key}: {config_arg} has no key {key!r}{errors.did_you_mean(key, keys)}; "
              "see the config file for its keys")
  return _exception_text(error)


def load_config(config_arg: str, overrides: Sequence[str] = ()) -> Any:
  """The config `--config=<config_arg> <overrides...>` gives, or `errors.UserError`."""
  argv = ["config", f"--config={config_arg}", *overrides]
  try:
    return _parse_with(argv)
  except Exception as e:  # pylint: disable=broad-except  # Any failure here is the config's.
    raise errors.UserError(config_error_message(argv, e)) from e


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config and flag errors as one `error:` line (exit status 2)."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # Flag/config errors are the user's.
    if errors.debug_enabled(argv):
      raise
    errors.report(config_error_message(argv, e))
    sys.exit(errors.EXIT_USER_ERROR)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` under the error policy (`jaxlm.errors.guard`)."""
  define_flags()
  app.run(errors.guard(main), flags_parser=_parse_flags)
