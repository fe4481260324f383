"""Config pieces shared by every stage: data source, world, mesh, model presets, checkpointing.

Only `ml_collections` is imported here (configs must not pull in JAX); the model presets are
plain dicts mirroring `jaxlm.model.ModelConfig`, which `jaxlm.model.ModelConfig(**config.model)`
rebuilds. `vocab_size` in a preset is a placeholder: stage 1 sets it from the tokenizer it
trains, later stages from their parent's tokenizer.
"""

from ml_collections import config_dict

# Transformer shapes (`jaxlm.model.ModelConfig` fields). Parameter counts with tied embeddings
# at the preset's vocabulary (the size of the tokenizer configs/pretrain.py trains for it) (`jaxlm.model.num_params`; tests/test_configs.py keeps them true):
#   tiny        918,656 (vocab 512)       tests and smoke runs: seconds on a laptop CPU
#   cpu       1,115,264 (vocab 2048)      the embedded world on 2 CPU cores in ~2 minutes
#   gpt2_124m 109,529,856 (vocab 32000)   GPT-2 small's shape (SwiGLU, M = 2048 keeps 4E GELU's size);
#                                         124M is GPT-2's count at its own vocabulary (50257)
#   1b      1,009,338,368 (vocab 32000)   GQA, bf16 compute, remat: a GPU host or a TPU slice
# The accelerator presets take the fused attention of the devices they run on ("auto": cuDNN
# flash attention on NVIDIA GPUs, Pallas splash attention on TPUs, XLA's elsewhere).
# How the `cpu` preset runs (not what it computes; a later stage may change these): the layer
# loop unrolled and causal attention in query blocks. Together 1.3-1.6x faster than the defaults
# on XLA:CPU for a DPO step, blocked attention the larger part (README, DPO section).
CPU_EXECUTION = dict(scan_unroll=4, attention_impl="blocked")
MODEL_PRESETS = {
    "tiny": dict(vocab_size=512, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                 mlp_dim=384, max_len=256),  # tests: compile-bound, so the defaults (1 s less per stage)
    "cpu": dict(vocab_size=2048, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                mlp_dim=384, max_len=512, **CPU_EXECUTION),
    "gpt2_124m": dict(vocab_size=32000, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
                      head_dim=64, mlp_dim=2048, max_len=1024, dtype="bfloat16", attention_impl="auto"),
    "1b": dict(vocab_size=32000, embed_dim=2048, num_layers=20, num_heads=16, num_kv_heads=8, head_dim=128,
               mlp_dim=5632, max_len=2048, dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable",
               attention_impl="auto"),
}


def model_config(preset: str) -> config_dict.ConfigDict:
  """The ModelConfig fields of `preset`, with every optional field present (so overrides work)."""
  fields = dict(tie_embeddings=True, rope_theta=10_000.0, norm_eps=1e-6, dtype="float32",
                remat_policy="none", scan_layers=True, scan_unroll=1,
                attention_impl="")  # "" = jax's choice.
  fields.update(MODEL_PRESETS[preset])
  return config_dict.ConfigDict(fields)


def data_config(source: str = "world") -> config_dict.ConfigDict:
  """Where a stage's records come from (README, "Sources")."""
  return config_dict.ConfigDict(dict(
      source=source,          # world | text:<glob> | jsonl:<glob> | tfds:<name>[/<config>][:<split>]
      field_map="",           # tfds: sources: "record_field=feature,..." e.g. "text=text"
      tfds_data_dir="",       # tfds: where you prepared the dataset ("" = TFDS's default)
      cache_dir="",           # where prepared data is cached ("" = $JAXLM_DATA_DIR or ~/.cache/jaxlm/data)
      holdout_fraction=0.1,   # local files: the last 10% of records are the validation split
      docs_per_file=False,    # text: one document per file instead of per blank-line block
      num_threads=2,          # grain reader threads: tokenisation overlaps the train step
      # A local JSONL record that fails to parse or validate: "error" stops the run naming its
      # file:line; "skip" leaves it out, lists it in <workdir>/skipped.jsonl and counts it in the
      # manifest, and the run still fails if more than max_invalid_fraction of the records are bad.
      invalid="error",
      max_invalid_fraction=0.01,
  ))


def world_config(**overrides) -> config_dict.ConfigDict:
  """The embedded world's size and seed (`jaxlm.data.world.WorldConfig`)."""
  fields = dict(seed=0, text_bytes=3_000_000, num_chats=20_000, num_preferences=20_000, num_prompts=4_000,
                eval_fraction=0.1, label_temperature=0.5)
  fields.update(overrides)
  return config_dict.ConfigDict(fields)


def mesh_config() -> config_dict.ConfigDict:
  """Device mesh: data parallel by default; set fsdp/tensor to shard parameters too."""
  return config_dict.ConfigDict(dict(
      data=-1,   # -1: all devices not used by the other axes
      fsdp=1,    # parameter + optimizer sharding along `embed` (ZeRO-3 style)
      tensor=1,  # Megatron-style sharding of heads / mlp / vocab
      # jax.distributed.initialize(): "auto" on TPU or when launched by a cluster manager,
      # "yes" forces it, "no" never.
      distributed="auto",
  ))


def optimizer_config(**overrides) -> config_dict.ConfigDict:
  """AdamW with warmup then decay (`jaxlm.training.make_optimizer`); stages override a few keys."""
  fields = dict(
      learning_rate=1e-3,         # peak, after warmup
      warmup_steps=20,
      schedule="cosine",          # cosine | linear | constant (after warmup)
      end_lr_fraction=0.1,        # final lr = 10% of peak
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.0,           # decoupled (AdamW); never on norm scales
      grad_clip_norm=1.0,         # global-norm clipping
  )
  fields.update(overrides)
  return config_dict.ConfigDict(fields)


def tiny_world() -> config_dict.ConfigDict:
  """The `:tiny` presets' world: small enough to prepare in seconds."""
  return world_config(text_bytes=200_000, num_chats=400, num_preferences=400, num_prompts=200)


def use_tiny_schedule(c: config_dict.ConfigDict) -> None:
  """The `:tiny` preset of a stage after pretraining: the tiny model, 20 steps, evals at 10 and 20."""
  c.world = tiny_world()
  c.model = model_config("tiny")
  c.batch_size = 8
  c.steps_per_call = 1
  c.total_steps = 20
  c.optimizer.warmup_steps = 5
  c.log_every = 5
  c.eval_every = 10
  c.num_eval_batches = 2
  c.checkpoint_every = 10


def use_accelerator_schedule(c: config_dict.ConfigDict, preset: str, *, learning_rate: float) -> None:
  """The `:gpt2_124m` / `:1b` preset of a stage after pretraining (shapes equal stage 1's)."""
  c.model = model_config(preset)
  c.seq_len = 1024
  c.batch_size = 64
  c.steps_per_call = 1              # accelerator steps are long: one step per call
  c.total_steps = 2000
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 100
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  if preset == "1b":
    c.mesh.update(dict(data=1, fsdp=-1))
