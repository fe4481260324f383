"""Glue that every stage's trainer (`experiments/*.py`) shares: config -> mesh, sources, model.

Each function turns one section of a stage config (`configs/common.py` builds those sections)
into the library object it describes, so the trainers stay linear and short and read the same
way from stage to stage.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from jaxlm import checkpoint
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import files
from jaxlm import resume
from jaxlm import workdir_lock
from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import sharding
from jaxlm.data import pipelines, sources, world


def setup_mesh(mesh_config: Mapping[str, Any]) -> jax.sharding.Mesh:
  """Initialises multi-host JAX when configured, then builds the (data, fsdp, tensor) mesh.

  `mesh_config.distributed`: "auto" initialises on TPU or when a cluster manager (SLURM, Open
  MPI, `JAX_COORDINATOR_ADDRESS`) launched us, "yes" always, "no" never.
  """
  mode = mesh_config.get("distributed", "auto")
  if mode not in ("auto", "yes", "no"):
    raise errors.ConfigError("mesh.distributed", f"got {mode!r}; expected auto, yes or no")
  if mode == "yes" and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  elif mode == "auto":
    sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh({axis: int(mesh_config[axis]) for axis in sharding.MESH_AXES})
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  return mesh


def check_workdir(workdir: str, stage_name: str) -> None:
  """Refuses a workdir that is not this stage's: another stage's run, a pipeline's directory.

  Read-only: called before the lock is taken (so a refused workdir gets no lock file) and again
  under it.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.RunDirError(f"--workdir={workdir}: {path} exists and is not a directory")
  if os.path.exists(os.path.join(path, "pipeline.json")):
    raise errors.RunDirError(f"--workdir={workdir} is a pipeline's directory; a stage needs its own run "
                             f"directory, e.g. {os.path.join(path, stage_name)}")
  for name in ("manifest.json", "config.json"):
    try:
      with open(os.path.join(path, name)) as f:
        other = json.load(f).get("stage")
    except (OSError, ValueError, AttributeError):
      continue
    if other is not None and other != stage_name:
      raise errors.RunDirError(f"--workdir={workdir} holds a {other!r} run ({name} says so); a {stage_name} "
                               f"run never reuses another stage's directory: pass another --workdir")


def _lock(workdir: str) -> workdir_lock.WorkdirLock:
  """This process's lock on `workdir`; with several processes process 0 takes it for all."""
  lock = workdir_lock.WorkdirLock(workdir)
  if jax.process_count() == 1:
    return lock.acquire()
  busy = False
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.RunDirError:
      busy = True
  if int(multihost_utils.broadcast_one_to_all(np.int32(busy))):
    raise lock.busy_error()  # Every process names the holder (the lock file is on the shared workdir).
  return lock


_HELD_LOCKS: list[workdir_lock.WorkdirLock] = []  # Held until the process exits.


def _resume_changes(run: checkpoint.RunDir, config, resume_changes: Sequence[str]):
  """(changes, event) for `resume.record`; raises `errors.RunDirError` for a refused change."""
  recorded = run.read_config() if os.path.exists(run.config_path) else None
  if recorded is None:
    return None, None
  if not resume.has_checkpoint(run.workdir):
    # Nothing was trained: a new config starts the run over (`open_run` clears what is stale).
    changes = resume.differences(recorded, resume.plain_config(config))
    return changes, "restarted (no checkpoint)" if changes else None
  return resume.check(run.workdir, recorded, config, resume_changes), None


def check_run(config, workdir: str, *, resume_changes: Sequence[str] = ()) -> None:
  """`open_run`'s refusals without writing anything: call it before the data is opened, so a
  workdir of another stage or a changed config is the error the user sees first."""
  check_workdir(workdir, config.stage)
  _resume_changes(checkpoint.RunDir(workdir), config, resume_changes)


def open_run(config, workdir: str, *, resume_changes: Sequence[str] = ()) -> checkpoint.RunDir:
  """The stage's run directory: locked for this process's life, its config recorded.

  In this order, so that a refused run writes nothing: a workdir of another stage is refused
  (`check_workdir`); the workdir's lock is taken (`jaxlm.workdir_lock`: a busy workdir is an
  error naming the holder); a workdir holding a run must have been started with the same config
  up to the free keys and the `resume_changes` the user names (`jaxlm.resume`). Then process 0
  writes config.json and appends the change to config_history.jsonl.
  """
  check_workdir(workdir, config.stage)
  run = checkpoint.RunDir(workdir)
  lock = _lock(run.workdir)
  _HELD_LOCKS.append(lock)
  atexit.register(lock.release)  # Any exit through Python clears the holder; a killed process leaves it.
  check_workdir(workdir, config.stage)
  changes, event = _resume_changes(run, config, resume_changes)
  if event is not None:
    removed = resume.clear_unstarted(run.workdir) if jax.process_index() == 0 else []
    logging.warning("%s holds no checkpoint (nothing was trained), so it starts over with the new config "
                    "(changed: %s; removed: %s)", run.workdir, ", ".join(changes), ", ".join(removed) or "nothing")
  elif changes:
    logging.warning("resuming %s with changed config: %s", run.workdir,
                    "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
  if jax.process_index() == 0 and changes != {}:  # A new run, or an accepted change: record it.
    resume.record(run.workdir, config, changes, event=event)
    run.write_config(config)
  return run


def check_parents(config, parents: Mapping[str, Sequence[str]], *, produced: Sequence[str] = ()) -> None:
  """Each parent run the config names is a complete run of a stage it accepts.

  Args:
    config: the stage config.
    parents: {config key: accepted parent stages}, e.g. {"init_from": ("pretrain", "sft")};
      an empty value is skipped (`check_config` says when one is required), as is "gold".
    produced: run directories that do not exist yet because the pipeline makes them first.

  Raises:
    errors.ParentError / errors.MissingError naming the key, the run and its stage.
  """
  produced = {os.path.abspath(p) for p in produced}
  for key, stages in parents.items():
    path = config_checks.get(config, key) if config_checks.has(config, key) else ""
    if not path or path == "gold" or os.path.abspath(path) in produced:
      continue
    what = f"config.{key}={path!r}"
    if not os.path.isdir(path):
      raise errors.MissingError(f"{what}: no such run directory; expected a {' or '.join(stages)} run")
    try:
      with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    except (OSError, ValueError):
      raise errors.ParentError(f"{what} is not a jaxlm run directory (no readable manifest.json); "
                               f"expected a {' or '.join(stages)} run") from None
    if manifest.get("stage") not in stages:
      quoted = [repr(s) for s in stages]
      accepted = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
      raise errors.ParentError(f"{what} is a {manifest.get('stage')!r} run, but a {config.stage} run's {key} "
                               f"must be a {accepted} run")
    if not manifest.get("complete"):
      raise errors.ParentError(f"{what}: the {manifest.get('stage')} run is incomplete (its manifest.json "
                               "says complete=false): finish it by rerunning its command")


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What a trainer needs before it has a train state: the optimizer and the state's layout."""

  tx: Any                    # optax.GradientTransformation
  schedule: Any              # step -> learning rate
  abstract_state: Any        # training.TrainState of ShapeDtypeStructs with shardings (restore target)
  shardings: Any             # training.TrainState of the shardings alone


def state_spec(config, init_fn, mesh: jax.sharding.Mesh, rules) -> StateSpec:
  """AdamW from `config.optimizer` over `config.total_steps`, and the sharded state's layout."""
  from jaxlm import training  # Deferred: keeps this module importable without optax at import.

  abstract_params = jax.eval_shape(lambda: sharding.unbox(init_fn(jax.random.key(0))))
  tx, schedule = training.make_optimizer(**config.optimizer, total_steps=config.total_steps,
                                         params=abstract_params)
  abstract_state = training.abstract_train_state(init_fn, tx, mesh, rules)
  return StateSpec(tx=tx, schedule=schedule, abstract_state=abstract_state,
                   shardings=jax.tree.map(lambda x: x.sharding, abstract_state))


def world_config(config) -> world.WorldConfig:
  """The stage config's `world` section as a `WorldConfig`."""
  return world.WorldConfig(**dict(config.world))


def open_split(config, kind: str, split: str, source: str | None = None) -> sources.RecordSource:
  """Opens `split` of the stage's data source (or of `source`) as records of `kind`."""
  data = config.data
  return sources.open_source(
      source or data.source, kind, split, cache_dir=data.cache_dir or None, world=world_config(config),
      field_map=sources.parse_key_values(data.field_map, "config.data.field_map") or None, tfds_data_dir=data.tfds_data_dir or None,
      holdout_fraction=data.holdout_fraction, docs_per_file=data.docs_per_file, invalid=data.invalid,
      max_invalid_fraction=data.max_invalid_fraction)


class DataAccount:
  """What every pipeline of the stage will see, keep, truncate and drop: counted before training.

  The count (`pipelines.count_examples`, one pass over each source with the pipeline's own
  rendering) starts on a background thread when the account is opened, so it overlaps the
  stage's set-up (parent loading, compilation, reference passes: XLA work that leaves the GIL
  and the second core free); `record` waits for it, then logs, warns and writes.

  Usage::

    account = stage.DataAccount(tok, {"train": ("sft", train_source, data_args), ...})
    ...                                   # set-up
    run.write_manifest(...)
    data_counts = account.record(run)     # before training; flat metrics for metrics.jsonl
  """

  def __init__(self, tokenizer, pipelines_used: Mapping[str, tuple[str, Any, Mapping]]):
    """Starts counting.

    Args:
      tokenizer: the stage's tokenizer.
      pipelines_used: {name: (pipeline kind, source, the dataset function's keyword arguments)},
        e.g. {"train": ("sft", train_source, data_args)} (`pipelines.count_examples`).
    """
    self.pipelines_used = dict(pipelines_used)
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data-account")
    self._counts = executor.submit(lambda: {name: pipelines.count_examples(kind, source, tokenizer, **args)
                                            for name, (kind, source, args) in self.pipelines_used.items()})
    executor.shutdown(wait=False)

  def record(self, run: checkpoint.RunDir) -> dict[str, Any]:
    """Waits for the counts; logs them; writes them to the manifest (`data`) and the skipped records
    (`config.data.invalid=skip`) to skipped.jsonl with file:line and reason.

    Returns:
      Flat metrics for metrics.jsonl: ``data/<name>/<seen|kept|truncated|dropped>`` and
      ``data/invalid_skipped``.

    Logs one line per pipeline, as a warning when more than 1% was truncated or dropped.
    """
    counts, flat = self._counts.result(), {}
    for name, (_, source, _) in self.pipelines_used.items():
      line = f"{pipelines.format_counts(name, counts[name])} [{source.description}]"
      if pipelines.needs_warning(counts[name]):
        logging.warning("%s: more than 1%% truncated or dropped; raise the length limits (or check the data) "
                        "if that matters", line)
      else:
        logging.info("%s", line)
      flat.update({f"data/{name}/{key}": counts[name][key] for key in ("seen", "kept", "truncated", "dropped")})
    sources_used = [source for _, source, _ in self.pipelines_used.values()]
    skipped: dict[str, dict] = {}
    for source in sources_used:
      for item in getattr(source, "skipped", None) or []:
        skipped.setdefault(item["where"], dict(item))
    read = {source.description: source.num_read for source in sources_used
            if getattr(source, "num_read", None) is not None}
    path = os.path.join(run.workdir, "skipped.jsonl")
    if skipped:
      logging.warning("%d invalid records were skipped (config.data.invalid=skip); listed in %s", len(skipped), path)
    if jax.process_index() == 0 and (skipped or os.path.exists(path)):
      files.atomic_write(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in skipped.values()))
    flat["data/invalid_skipped"] = len(skipped)
    run.update_manifest(data={"pipelines": counts, "invalid_skipped": len(skipped), "records_read": read})
    return flat


def eval_prompts(config, validation: sources.RecordSource | None = None) -> list[dict]:
  """Held-out prompt records for generation evals: every one, or `config.eval.num_prompts` of them.

  In order of preference: every record of `config.eval.prompts` (a prompt source; a local file
  is read whole, it is an eval file), the world's test prompts when the stage trains on the
  world, or the prompts of the stage's `validation` records (chats cut before their last
  assistant reply; preference pairs' prompts). When there are more than `num_prompts`, an evenly
  spaced subset is taken (the world's prompts are grouped by task family); when there are fewer,
  all of them. The log says which.
  """
  data = config.data
  if config.eval.prompts:
    records = sources.open_source(
        config.eval.prompts, "prompt", "train", cache_dir=data.cache_dir or None, world=world_config(config),
        field_map=sources.parse_key_values(data.field_map, "config.data.field_map") or None,
        tfds_data_dir=data.tfds_data_dir or None, holdout_fraction=0.0)
    origin = f"config.eval.prompts={config.eval.prompts}"
  elif data.source == "world":
    records = open_split(config, "prompt", "test", source="world")
    origin = "the world's test prompts"
  elif validation is not None and validation.kind == "chat":
    records = [prompt for prompt in (prompt_from_chat(validation[i]) for i in range(len(validation)))
               if prompt["prompt"] and prompt["prompt"][-1]["role"] == "user"]
    origin = f"the validation chats of {data.source} ({len(validation)}, cut before their last reply)"
  elif validation is not None:
    records = [{"prompt": validation[i]["prompt"], "meta": validation[i].get("meta", {})}
               for i in range(len(validation))]
    origin = f"the prompts of the validation pairs of {data.source}"
  else:
    raise errors.ConfigError("eval.prompts", "no eval prompts: set it to a prompt source (e.g. jsonl:prompts.jsonl)")
  picks = spread(len(records), config.eval.num_prompts)
  how = ("all of them" if len(picks) == len(records) else
         f"{len(picks)} evenly spaced (config.eval.num_prompts={config.eval.num_prompts})")
  logging.info("eval prompts: %d of %d from %s: %s", len(picks), len(records), origin, how)
  return [dict(records[i]) for i in picks]


def spread(count: int, wanted: int) -> list[int]:
  """`min(count, wanted)` distinct indices in [0, count), evenly spaced, first and last included."""
  if wanted >= count:
    return list(range(count))
  if wanted == 1:
    return [0]
  return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def prompt_from_chat(record: Mapping[str, Any]) -> dict:
  """A chat record's conversation before its last assistant message, as a prompt record."""
  messages = record["messages"]
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return {"prompt": [dict(m) for m in messages[:last]],
          "meta": {**record.get("meta", {}), "reference_reply": messages[last]["content"]}}


def eval_judge(config, tokenizer: tokenizer_lib.Tokenizer):
  """The judge of `config.eval.judge` (a reward-model run directory), or None for the gold reward."""
  from jaxlm import policy_eval  # Deferred: only the alignment stages judge.

  if not config.eval.judge:
    return None
  judge_run = checkpoint.load_parent(config.eval.judge, expect_tokenizer_hash=tokenizer.content_hash)
  if judge_run.manifest.get("stage") != "reward":
    raise errors.ParentError(f"config.eval.judge={config.eval.judge!r} is a {judge_run.manifest.get('stage')!r} "
                             "run; a judge must be a reward-model run directory")
  return policy_eval.reward_model_judge(judge_run.params, judge_run.model_config, tokenizer,
                                        batch_size=config.eval.batch_size)


def child_tokenizer(config, run: checkpoint.RunDir) -> tokenizer_lib.TokenizerLike:
  """The tokenizer of a stage that starts from a parent (`config.init_from`), saved in `run`.

  A resumed run keeps its own copy; otherwise `config.tokenizer_path` when set (a SentencePiece
  ``.model`` file), else the parent's (either kind: `tokenizer_lib.load_tokenizer`).
  `checkpoint.load_parent(expect_tokenizer_hash=...)` then refuses a parent trained with another
  one (its embedding rows would mean other pieces).
  """
  if run.has_tokenizer():
    tok = run.load_tokenizer()
  elif config.get("tokenizer_path"):
    tok = tokenizer_lib.Tokenizer.load(config.tokenizer_path)
  else:
    parent = checkpoint.RunDir(config.init_from)
    if not parent.has_tokenizer():
      raise errors.MissingError(f"config.init_from={config.init_from!r} holds no tokenizer: it must be a jaxlm run "
                                "directory (with tokenizer.model, or tokenizer.json for an imported model)")
    tok = parent.load_tokenizer()
  if jax.process_index() == 0:
    run.save_tokenizer(tok)
  return tok


def adopt_parent_model(config, key: str = "init_from") -> None:
  """Gives `config.model` the shape of an imported parent model, so config.json records it.

  A model grown by jaxlm has its shape in the preset, and a child stage checks that the parent
  has it (`checkpoint.load_parent(expect_model_config=...)`), so a wrong preset is an error. An
  imported Hugging Face model (manifest `model_origin` "hf:...", also for any stage trained
  from one) has no preset: its shape, vocabulary size included (Qwen pads the embedding past
  the tokenizer), comes from the parent's manifest. The preset keeps deciding what
  `checkpoint.FREE_MODEL_FIELDS` name (dtype, remat, attention kernel, max_len, scan unroll).
  `config.model.origin` records where the shape came from; `model_config` then keeps the
  section's vocabulary size instead of the tokenizer's. Done before `check_run`, so a resumed
  run compares the same adopted config; a parent that does not exist yet (the pipeline makes
  it first) is left alone.
  """
  parent = config_checks.get(config, key) if config_checks.has(config, key) else ""
  manifest_path = os.path.join(parent, "manifest.json") if parent else ""
  if not manifest_path or not os.path.exists(manifest_path):
    return
  with open(manifest_path) as f:
    manifest = json.load(f)
  origin = manifest.get("model_origin") or checkpoint.JAXLM_ORIGIN
  if origin == checkpoint.JAXLM_ORIGIN or not manifest.get("model_config"):
    return
  shape = {name: value for name, value in manifest["model_config"].items()
           if name not in checkpoint.FREE_MODEL_FIELDS}
  with config.unlocked():
    for name, value in shape.items():
      config.model[name] = value
    config.model.origin = f"{origin} via {os.path.abspath(parent)}"


def model_config(model_section: Mapping[str, Any], *, vocab_size: int) -> model_lib.ModelConfig:
  """The config's `model` section as a `ModelConfig`, with the tokenizer's vocabulary size.

  A section adopted from an imported parent (`adopt_parent_model`, it has `origin`) keeps its
  own vocabulary size, which may exceed the tokenizer's (ids past it are never produced by the
  tokenizer; the rows are the checkpoint's).
  """
  fields = dict(model_section.to_dict() if hasattr(model_section, "to_dict") else model_section)
  if fields.pop("origin", None):
    if fields["vocab_size"] < vocab_size:
      raise errors.ParentError(f"the imported model's vocabulary ({fields['vocab_size']}) is smaller than "
                               f"its tokenizer's ({vocab_size}): ids past it have no embedding")
  else:
    fields["vocab_size"] = vocab_size
  fields["attention_impl"] = fields.get("attention_impl") or None  # "" in configs = jax's choice.
  return model_lib.ModelConfig(**fields)


def per_host_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch; the batch must split evenly over processes."""
  count = jax.process_count()
  if global_batch_size % count:
    raise errors.ConfigError("batch_size", f"{global_batch_size} does not split over {count} processes")
  return global_batch_size // count


class _LibraryInfoFilter(logging.Filter):
  """Drops INFO logs of the libraries below (orbax logs every file it writes); keeps warnings."""

  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
  """Keeps a trainer's log readable: our progress lines, the libraries' warnings and errors."""
  from absl import logging as absl_logging  # Deferred: only trainers run under absl.

  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
