r"""Every stage in one command: tokenizer + pretraining, SFT, reward model, PPO, GRPO, DPO, then a report.

  python -m experiments.pipeline --workdir runs/demo                    # :cpu presets, the embedded world
  python -m experiments.pipeline --workdir /tmp/demo --preset tiny      # seconds per stage: smoke runs
  python -m experiments.pipeline --workdir runs/demo --stages=sft,dpo   # a subset; parents must be complete
  python -m experiments.pipeline --workdir runs/demo \
      --override dpo.loss.beta=0.2 --override pretrain.total_steps=100  # dpo gets --config.loss.beta=0.2

Each stage is its own process, the command a user would type, run from the repository root with
its output streamed line by line behind a `[stage]` prefix:

  DIR/pretrain  python -m experiments.pretrain --config=configs/pretrain.py:<preset> --workdir=DIR/pretrain
  DIR/sft       ... --config.init_from=DIR/pretrain
  DIR/reward    ... --config.init_from=DIR/sft
  DIR/ppo       ... --config.init_from=DIR/sft --config.reward_from=DIR/reward
  DIR/grpo      ... --config.init_from=DIR/sft       (critic-free; the world's verifiable rewards)
  DIR/dpo       ... --config.init_from=DIR/sft

then the stage's `--override <stage>.<key>=<value>` flags as `--config.<key>=<value>` (last, so
they win).

Before the first stage starts, every stage to run is checked in this process, in a few seconds:
its config is built from its preset and overrides exactly as its command line would build it (a
key typo names the closest keys), its `check_config` validates every value, the parents it names
that exist already are of the stages it accepts, and an unfinished stage's run directory is of
that stage and was started with the same config (`--resume_changes sft.total_steps` lets one
key change, as the stage's `--resume_changes` does). A problem is one `error:` line and exit
status 2, with no stage run. The pipeline holds a lock on DIR for its whole life
(`jaxlm/workdir_lock.py`): a second pipeline on the same DIR is refused at once.

Re-running the same command skips complete stages (manifest.json `complete`) and resumes an
interrupted one from its latest checkpoint (a trainer resumes by itself in the same workdir).
Asking for a stage whose parent is neither complete nor part of the run is an error before
anything runs. A failing stage stops the pipeline, naming the stage and its exit code.

The stages share a persistent XLA compilation cache in DIR/xla_cache (`--compilation_cache`): a
resumed stage, and a stage that compiles a program another one already compiled at the same
shapes, loads it instead of compiling it again. (Today the stages' sampler programs differ in
batch, lengths or temperature, so within one fresh run the saving is small.)

DIR/pipeline.json records, per stage: status, command, overrides, pipeline sessions and wall
time (process start-up and compilation included, summed over the sessions that ended; a killed
session's time is lost); the trainer's own time is its manifest's `wall_time_s`. At the end
DIR/report.md and its PNGs are rebuilt from every run directory in DIR (`jaxlm/report.py`;
by hand: `python tools/report.py DIR`).

Signals: Ctrl-C or SIGTERM is passed on to the running stage (once per signal), which saves a
checkpoint and exits 0; the pipeline then stops, exit status 0, and a re-run resumes. A stage runs
in its own process group and, on Linux, is killed with the pipeline even when the pipeline gets
SIGKILL, so a re-run never races a stale stage writing the same run directory.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from jaxlm import errors
from jaxlm import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")
# The config keys that name a parent run, and which stage's directory each one gets.
PARENTS = {
    "pretrain": {},
    "sft": {"init_from": "pretrain"},
    "reward": {"init_from": "sft"},          # InstructGPT: the reward model starts from SFT
    "ppo": {"init_from": "sft", "reward_from": "reward"},
    "grpo": {"init_from": "sft"},            # its rewards are rules (correct, well-formed): no parent
    "dpo": {"init_from": "sft"},
}


class PipelineError(errors.UserError):
  """A problem the user can fix; printed as one `error:` line, exit status 2 (`errors.EXIT_USER_ERROR`)."""


class StageFailed(PipelineError):
  """A stage exited non-zero (its own output says why); the pipeline exits with status 1."""


def log(message: str) -> None:
  print(f"[pipeline] {message}", flush=True)


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, list[str]]:
  """["dpo.loss.beta=0.2", ...] -> {"dpo": ["--config.loss.beta=0.2"], ...}."""
  out: dict[str, list[str]] = {}
  for item in items:
    key, sep, value = item.partition("=")
    stage, dot, path = key.partition(".")
    if not sep or not dot or not path:
      raise PipelineError(f"--override {item!r}: expected <stage>.<config key>=<value>, "
                          "e.g. dpo.loss.beta=0.2")
    if stage not in STAGES:
      raise PipelineError(f"--override {item!r}: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    out.setdefault(stage, []).append(f"--config.{path}={value}")
  return out


def parse_stages(text: str | None) -> list[str]:
  """"sft,dpo" -> ["sft", "dpo"], in pipeline order; None or "" -> every stage."""
  if not text:
    return list(STAGES)
  names = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise PipelineError(f"--stages: unknown {', '.join(unknown)} (stages: {', '.join(STAGES)})")
  return [s for s in STAGES if s in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.pipeline",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="One run directory per stage is made in here.")
  parser.add_argument("--preset", default="cpu", help="Config preset of every stage (cpu, tiny, ...).")
  parser.add_argument("--stages", default="", help="Comma-separated subset, e.g. sft,dpo (default: all).")
  parser.add_argument("--override", action="append", default=[], metavar="STAGE.KEY=VALUE",
                      help="A config override for one stage, e.g. dpo.loss.beta=0.2 (repeatable).")
  parser.add_argument("--resume_changes", action="append", default=[], metavar="STAGE.KEY",
                      help="A config key an unfinished stage may resume with changed, e.g. sft.total_steps "
                           "(repeatable; passed to the stage as --resume_changes).")
  parser.add_argument("--debug", action="store_true", help="Show the traceback of user errors too.")
  parser.add_argument("--no_report", action="store_true", help="Do not rebuild report.md at the end.")
  parser.add_argument("--compilation_cache", default=None, metavar="PATH",
                      help="Persistent XLA compilation cache shared by the stages (default: "
                           "$JAX_COMPILATION_CACHE_DIR if set, else DIR/xla_cache; 'none' turns it off).")
  return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The plan: which stages run, which are skipped, and why.
# ------------------------------------------------------------------------------------------------
def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_complete(workdir: str, stage: str) -> bool:
  return bool((report.read_manifest(stage_dir(workdir, stage)) or {}).get("complete"))


def plan(stages: list[str], workdir: str) -> list[tuple[str, str]]:
  """[(stage, action)] with action "run" or "complete".

  Raises PipelineError when a stage to run has a parent that is neither complete in `workdir`
  nor run before it.
  """
  actions, ready = [], {s for s in STAGES if is_complete(workdir, s)}
  for stage in stages:
    if stage in ready:
      actions.append((stage, "complete"))
      continue
    for key, parent in PARENTS[stage].items():
      if parent not in ready:
        state = "incomplete" if os.path.exists(stage_dir(workdir, parent)) else "missing"
        raise PipelineError(
            f"{stage} needs a complete {parent} run ({key}) but {stage_dir(workdir, parent)} is {state}; "
            f"add {parent} to --stages (or drop --stages) to run it first")
    actions.append((stage, "run"))
    ready.add(stage)
  return actions


def parse_resume_changes(items: list[str]) -> dict[str, list[str]]:
  """["sft.total_steps", ...] -> {"sft": ["total_steps"], ...}."""
  out: dict[str, list[str]] = {}
  for item in items:
    stage, dot, key = item.partition(".")
    if stage not in STAGES or not dot or not key:
      raise PipelineError(f"--resume_changes {item!r}: expected <stage>.<config key> with a stage of "
                          f"{', '.join(STAGES)}, e.g. sft.total_steps")
    out.setdefault(stage, []).append(key)
  return out


def config_overrides(stage: str, workdir: str, overrides: list[str]) -> list[str]:
  """The stage's --config flags after the preset: its parents' directories, then the user's overrides."""
  parents = [f"--config.{key}={stage_dir(workdir, parent)}" for key, parent in PARENTS[stage].items()]
  return [*parents, *overrides]


def stage_command(stage: str, workdir: str, preset: str, overrides: list[str],
                  resume_changes: list[str] = ()) -> list[str]:
  """The stage's command line: config preset, run directory, parents, then the user's overrides."""
  extra = [f"--resume_changes={','.join(resume_changes)}"] if resume_changes else []
  return [sys.executable, "-m", f"experiments.{stage}", f"--config=configs/{stage}.py:{preset}",
          f"--workdir={stage_dir(workdir, stage)}", *config_overrides(stage, workdir, overrides), *extra]


def preflight(actions: list[tuple[str, str]], workdir: str, preset: str, overrides: dict[str, list[str]],
              resume_changes: dict[str, list[str]]) -> None:
  """Checks every stage to run before the first one starts (see the module docstring).

  Raises `errors.UserError` (a config key or value, a parent, a run directory) naming the stage.
  """
  from jaxlm import cli  # Deferred: these import JAX, which the plan and the report do not need.
  from jaxlm import stage as stage_lib

  to_run = [s for s, action in actions if action == "run"]
  produced = [stage_dir(workdir, s) for s in to_run]
  for name in to_run:
    module = importlib.import_module(f"experiments.{name}")
    try:
      config = cli.load_config(f"configs/{name}.py:{preset}", config_overrides(name, workdir, overrides.get(name, [])))
      module.check_config(config)
      stage_lib.check_parents(config, module.PARENTS, produced=produced)
      stage_lib.check_run(config, stage_dir(workdir, name), resume_changes=resume_changes.get(name, []))
    except errors.UserError as e:
      raise PipelineError(f"stage {name}: {e}") from e


# ------------------------------------------------------------------------------------------------
# pipeline.json
# ------------------------------------------------------------------------------------------------
class Record:
  """DIR/pipeline.json: what ran, how, for how long; rewritten after every change."""

  def __init__(self, workdir: str, preset: str):
    self.path = os.path.join(workdir, "pipeline.json")
    try:
      with open(self.path) as f:
        self.data = json.load(f)
    except (OSError, ValueError):
      self.data = {"created": now(), "stages": {}}
    self.data.update(workdir=workdir, preset=preset, status="running", started=now(), finished=None)
    self.start = time.perf_counter()

  def stage(self, name: str) -> dict:
    return self.data["stages"].setdefault(name, {"status": "pending", "wall_s": 0.0, "sessions": 0})

  def update(self, name: str, **fields: Any) -> None:
    self.stage(name).update(fields)
    self.save()

  def finish(self, status: str) -> None:
    self.data.update(status=status, finished=now(), last_session_s=round(time.perf_counter() - self.start, 1))
    self.save()

  def save(self) -> None:
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2)
      f.write("\n")
    os.replace(tmp, self.path)  # A pipeline killed mid-write keeps the previous file.


# ------------------------------------------------------------------------------------------------
# Running one stage.
# ------------------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
  """Runs in the child before exec: SIGKILL it when the pipeline dies (Linux), own process group."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return  # Not Linux: the stage may outlive a SIGKILLed pipeline.
  if os.getppid() != parent_pid:  # The pipeline died before prctl took effect.
    os.kill(os.getpid(), signal.SIGKILL)


class Forwarder:
  """SIGINT/SIGTERM handler while a stage runs: pass the signal on, remember that it came."""

  def __init__(self):
    self.proc: subprocess.Popen | None = None
    self.received: int | None = None

  def __call__(self, signum: int, frame: Any) -> None:
    self.received = signum
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signum)


def compilation_cache_dir(flag: str | None, workdir: str) -> str | None:
  """Where the stages keep compiled XLA programs: the flag, else $JAX_COMPILATION_CACHE_DIR, else
  DIR/xla_cache; None for 'none'.

  A resumed or re-run stage, or one that compiles a program an earlier stage compiled at the
  same shapes, loads it from the cache instead of compiling it again. It holds compiled code
  only, never results, and lives in DIR so that a fresh DIR is a fresh measurement.
  """
  if flag is None:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "xla_cache")
  return None if flag.lower() == "none" else os.path.abspath(flag)


def run_process(command: list[str], *, prefix: str, forwarder: Forwarder, on_start,
                env_overrides: dict[str, str] | None = None) -> int:
  """Runs `command` from the repository root, streaming its output with `prefix`; its exit code."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_overrides or {}))  # Lines as printed, not at exit.
  parent = os.getpid()
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                          process_group=0, preexec_fn=lambda: _die_with_parent(parent))
  forwarder.proc = proc
  on_start(proc.pid)
  try:
    for line in proc.stdout:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
    return proc.wait()
  finally:
    forwarder.proc = None


def run_stage(stage: str, command: list[str], record: Record, forwarder: Forwarder, workdir: str,
              cache_dir: str | None = None) -> None:
  """Runs one stage to completion, or raises PipelineError naming it."""
  log(f"{stage}: python {' '.join(command[1:])}")
  previous = record.stage(stage)
  record.update(stage, status="running", command=command, run_dir=stage_dir(workdir, stage),
                sessions=previous.get("sessions", 0) + 1, started=now())
  start = time.perf_counter()
  code = run_process(command, prefix=f"[{stage}] ", forwarder=forwarder,
                     on_start=lambda pid: record.update(stage, pid=pid),
                     env_overrides={"JAX_COMPILATION_CACHE_DIR": cache_dir} if cache_dir else None)
  elapsed = time.perf_counter() - start
  wall = round(previous.get("wall_s", 0.0) + elapsed, 1)
  if code != 0:
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    record.update(stage, status="failed", exit_code=code, wall_s=wall, pid=None, note=f"failed: {how}")
    raise StageFailed(f"stage {stage} failed ({how}) after {elapsed:.0f}s; its output is above "
                      f"(prefixed [{stage}]); fix it and re-run to resume")
  if not is_complete(workdir, stage):
    record.update(stage, status="interrupted", exit_code=0, wall_s=wall, pid=None,
                  note="stopped by a signal: re-run to resume")
    if forwarder.received is None:
      raise PipelineError(f"stage {stage} exited 0 without marking {stage_dir(workdir, stage)} complete")
    return
  record.update(stage, status="complete", exit_code=0, wall_s=wall, pid=None, note="ran")
  log(f"{stage}: complete in {report.duration(elapsed)}")


# ------------------------------------------------------------------------------------------------
# The pipeline.
# ------------------------------------------------------------------------------------------------
def summary(record: Record, stages: list[str]) -> None:
  """The per-stage table at the end: status, pipeline wall time (all sessions), what happened."""
  if not stages:
    return
  log(f"{'stage':<9} {'status':<12} {'wall':>7}  note")
  for stage in stages:
    entry = record.stage(stage)
    log(f"{stage:<9} {entry['status']:<12} {report.duration(entry.get('wall_s')):>7}  {entry.get('note', '')}")


def execute(args: argparse.Namespace, record: Record, forwarder: Forwarder) -> str:
  """Runs the plan; returns the final status ("complete" or "interrupted")."""
  workdir = record.data["workdir"]
  overrides = parse_overrides(args.override)
  resume_changes = parse_resume_changes(args.resume_changes)
  stages = parse_stages(args.stages)
  actions = plan(stages, workdir)
  cache_dir = compilation_cache_dir(args.compilation_cache, workdir)
  start = time.perf_counter()
  preflight(actions, workdir, args.preset, overrides, resume_changes)
  log(f"checked the config of {', '.join(s for s, a in actions if a == 'run') or 'no stage'} "
      f"in {time.perf_counter() - start:.1f}s")
  for stage in sorted(set(overrides) - {s for s, _ in actions}, key=STAGES.index):
    log(f"--override for {stage} ignored: {stage} is not in --stages ({', '.join(overrides[stage])})")
  ran = set()
  for stage, action in actions:
    if forwarder.received is not None:
      return "interrupted"
    entry = record.stage(stage)
    if action == "complete":
      # A complete stage is never redone by itself: say so when this command asks for settings
      # it was not run with (leaving out the overrides it was run with is just not repeating them).
      new = [o for o in overrides.get(stage, []) if o not in entry.get("overrides", [])]
      if entry.get("preset", args.preset) != args.preset:
        new.insert(0, f"preset {args.preset} (ran with {entry['preset']})")
      if new:
        log(f"WARNING: {stage} is complete, so it is not redone with {', '.join(new)}; delete "
            f"{stage_dir(workdir, stage)} (and the stages trained from it) to redo it")
      stale = ran & set(PARENTS[stage].values())
      if stale:
        log(f"WARNING: {stage} is complete but was trained from an earlier {', '.join(sorted(stale))} run, "
            f"which was just redone; delete {stage_dir(workdir, stage)} to redo it")
      log(f"{stage}: complete ({stage_dir(workdir, stage)}), skipping")
      record.update(stage, status="complete", note="complete: skipped")
    else:
      record.update(stage, preset=args.preset, overrides=overrides.get(stage, []))
      run_stage(stage, stage_command(stage, workdir, args.preset, overrides.get(stage, []),
                                     resume_changes.get(stage, [])),
                record, forwarder, workdir, cache_dir)
      ran.add(stage)
      if forwarder.received is not None:
        return "interrupted"
  return "complete"


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  from jaxlm import workdir_lock  # Only the lock: the stages' modules are imported by `preflight`.

  try:
    lock = workdir_lock.WorkdirLock(workdir).acquire()  # Released when the process exits.
  except errors.UserError as e:
    errors.report(str(e))
    return errors.EXIT_USER_ERROR
  record = Record(workdir, args.preset)
  forwarder = Forwarder()
  handlers = {signum: signal.signal(signum, forwarder) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    status = execute(args, record, forwarder)
  except errors.UserError as e:
    record.finish("failed")
    summary(record, [s for s in STAGES if s in record.data["stages"]])
    if args.debug or errors.debug_enabled():
      raise
    errors.report(str(e))
    return errors.EXIT_USER_ERROR if not isinstance(e, StageFailed) else 1
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
    lock.release()
  record.finish(status)
  summary(record, [s for s in STAGES if s in record.data["stages"]])
  if status == "interrupted":
    log(f"stopped by {signal.Signals(forwarder.received).name}: re-run the same command to resume")
    return 0
  log(f"done in {report.duration(record.data['last_session_s'])}")
  if not args.no_report:
    written = report.write_report(report.discover_runs(workdir), workdir, pipeline=record.data,
                                  title=f"jaxlm pipeline: {workdir}")
    log(f"report: {written[-1]} ({len(written) - 1} plots)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
