"""Glue that every stage's trainer (`experiments/*.py`) shares: config -> mesh, sources, model.

Each function turns one section of a stage config (`configs/common.py` builds those sections)
into the library object it describes, so the trainers stay linear and short and read the same
way from stage to stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax

from jaxlm import checkpoint
from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import sharding
from jaxlm.data import sources, world


def setup_mesh(mesh_config: Mapping[str, Any]) -> jax.sharding.Mesh:
  """Initialises multi-host JAX when configured, then builds the (data, fsdp, tensor) mesh.

  `mesh_config.distributed`: "auto" initialises on TPU or when a cluster manager (SLURM, Open
  MPI, `JAX_COORDINATOR_ADDRESS`) launched us, "yes" always, "no" never.
  """
  mode = mesh_config.get("distributed", "auto")
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"config.mesh.distributed must be auto, yes or no, got {mode!r}")
  if mode == "yes" and not jax.distributed.is_initialized():
    jax.distributed.initialize()
  elif mode == "auto":
    sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh({axis: int(mesh_config[axis]) for axis in sharding.MESH_AXES})
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  return mesh


def open_run(config, workdir: str) -> checkpoint.RunDir:
  """The stage's run directory, created, with the resolved config written (by process 0)."""
  run = checkpoint.RunDir(workdir)
  os.makedirs(run.workdir, exist_ok=True)
  if jax.process_index() == 0:
    run.write_config(config)
  return run


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
      holdout_fraction=data.holdout_fraction, docs_per_file=data.docs_per_file)


def eval_prompts(config, validation: sources.RecordSource | None = None) -> list[dict]:
  """Held-out prompt records for generation evals: at most `config.eval.num_prompts`.

  In order of preference: every record of `config.eval.prompts` (a prompt source; a local file
  is read whole, it is an eval file), the world's test prompts when the stage trains on the
  world, or the prompts of the stage's `validation` records (chats cut before their last
  assistant reply; preference pairs' prompts). An evenly spaced subset is taken when there are
  more (the world's prompts are grouped by task family).
  """
  data = config.data
  if config.eval.prompts:
    records = sources.open_source(
        config.eval.prompts, "prompt", "train", cache_dir=data.cache_dir or None, world=world_config(config),
        field_map=sources.parse_key_values(data.field_map, "config.data.field_map") or None,
        tfds_data_dir=data.tfds_data_dir or None, holdout_fraction=0.0)
  elif data.source == "world":
    records = open_split(config, "prompt", "test", source="world")
  elif validation is not None and validation.kind == "chat":
    records = [prompt for prompt in (prompt_from_chat(validation[i]) for i in range(len(validation)))
               if prompt["prompt"] and prompt["prompt"][-1]["role"] == "user"]
  elif validation is not None:
    records = [{"prompt": validation[i]["prompt"], "meta": validation[i].get("meta", {})}
               for i in range(len(validation))]
  else:
    raise ValueError("no eval prompts: set config.eval.prompts to a prompt source (e.g. jsonl:prompts.jsonl)")
  count = len(records)
  picks = sorted({round(i * (count - 1) / max(config.eval.num_prompts - 1, 1))
                  for i in range(min(config.eval.num_prompts, count))}) if count else []
  return [dict(records[i]) for i in picks]


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
    raise ValueError(f"config.eval.judge={config.eval.judge!r} is a {judge_run.manifest.get('stage')!r} run; "
                     "a judge must be a reward-model run directory")
  return policy_eval.reward_model_judge(judge_run.params, judge_run.model_config, tokenizer,
                                        batch_size=config.eval.batch_size)


def child_tokenizer(config, run: checkpoint.RunDir) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a stage that starts from a parent (`config.init_from`), saved in `run`.

  A resumed run keeps its own copy; otherwise `config.tokenizer_path` when set, else the
  parent's. `checkpoint.load_parent(expect_tokenizer_hash=...)` then refuses a parent trained
  with another one (its embedding rows would mean other pieces).
  """
  if os.path.exists(run.tokenizer_path):
    tok = run.load_tokenizer()
  else:
    path = config.get("tokenizer_path") or checkpoint.RunDir(config.init_from).tokenizer_path
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: config.init_from={config.init_from!r} must be a jaxlm run "
                              "directory (it holds tokenizer.model)")
    tok = tokenizer_lib.Tokenizer.load(path)
  if jax.process_index() == 0:
    run.save_tokenizer(tok)
  return tok


def model_config(model_section: Mapping[str, Any], *, vocab_size: int) -> model_lib.ModelConfig:
  """The config's `model` section as a `ModelConfig`, with the tokenizer's vocabulary size."""
  fields = dict(model_section)
  fields["vocab_size"] = vocab_size
  fields["attention_impl"] = fields.get("attention_impl") or None  # "" in configs = jax's choice.
  return model_lib.ModelConfig(**fields)


def per_host_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch; the batch must split evenly over processes."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"batch_size {global_batch_size} does not split over {count} processes")
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
