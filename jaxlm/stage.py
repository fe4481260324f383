"""Glue that every stage's trainer (`experiments/*.py`) shares: config -> mesh, sources, model.

Each function turns one section of a stage config (`configs/common.py` builds those sections)
into the library object it describes, so the trainers stay linear and short and read the same
way from stage to stage.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax

from jaxlm import model as model_lib
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
