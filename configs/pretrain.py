r"""Stage 1: generative pretraining (next-token cross-entropy, AdamW).

  python -m experiments.pretrain --config=configs/pretrain.py:cpu --workdir=runs/pretrain
  python -m experiments.pretrain --config=configs/pretrain.py:tiny --workdir=/tmp/pt --config.total_steps=20
  python -m experiments.pretrain --config=configs/pretrain.py:nanogpt_cpu --workdir=runs/shakespeare \
      --config.data.source=text:../shared/data/tinyshakespeare.txt

Presets (`:<preset>`):
  tiny         ~1M parameters, a small world, seconds: tests and smoke runs.
  cpu          the embedded world on 2 CPU cores in a few minutes.
  nanogpt_cpu  nanoGPT's CPU recipe (char-level, 4 layers x 128, block 64, batch 12, 2000 iters,
               lr 1e-3 cosine to 1e-4, warmup 100, beta2 0.99, no dropout) for side-by-side timing.
  gpt2_124m    GPT-2 small's shape at T = 1024, bf16 compute: one GPU.
  1b           ~1B parameters, bf16, remat, FSDP: a GPU host or a TPU slice.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "nanogpt_cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/pretrain.py")
  c = config_dict.ConfigDict()
  c.stage = "pretrain"
  c.preset = preset
  c.seed = 0                      # params init, data order, dropout-free sampling: one seed for all
  c.init_from = ""                # stage 1 starts from scratch (a run dir here continues pretraining)

  c.data = common.data_config("world")
  c.world = common.world_config()

  # The tokenizer is trained on the stage-1 train split unless `path` names an existing model.
  c.tokenizer = config_dict.ConfigDict(dict(
      path="",             # an existing tokenizer.model to use instead of training one
      vocab_size=2048,     # BPE pieces incl. 8 special ids and 256 byte-fallback pieces
      model_type="bpe",    # bpe | unigram | char
      max_texts=200_000,   # documents read for training (a sample of a large corpus is enough)
      # 1.0: every character of the corpus gets a piece (the world and most English corpora have
      # under ~100); large alphabets (CJK) want 0.9995, byte fallback spelling the rare ones.
      character_coverage=1.0,
      byte_fallback=True,  # spell characters outside the vocabulary as UTF-8 bytes (+256 pieces)
  ))

  c.model = common.model_config("cpu")

  c.seq_len = 128                 # tokens per training row (packed documents)
  c.batch_size = 16               # global rows per optimizer step (split over hosts and devices)
  c.num_microbatches = 1          # gradient accumulation: batch_size / num_microbatches rows at once
  c.steps_per_call = 10           # optimizer steps per jitted call (lax.scan): fewer host round trips
  # ~1.15M tokens, about 2 minutes on 2 CPU cores. At this budget more tokens beat more
  # parameters: 2.0M params x 320 steps scored 25.5% on held-out fact multiple choice, this
  # 1.1M x 560-600 steps about 43% (README, "Performance").
  c.total_steps = 560

  c.optimizer = common.optimizer_config(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)

  c.mesh = common.mesh_config()

  c.log_every = 40                # steps between log lines / metrics rows (the only host syncs)
  c.eval_every = 280              # steps between validation passes (and at the end)
  c.num_eval_batches = 8          # fixed validation batches: the same ones at every eval
  c.checkpoint_every = 280        # steps between checkpoints (also on SIGTERM/SIGINT and at the end)
  c.keep_checkpoints = 2
  c.num_samples = 4               # greedy samples printed and written at the end
  c.sample_len = 48
  c.num_probes = 200              # world fact-completion probes (held-out phrasings) scored at the end

  if preset == "tiny":
    c.world = common.tiny_world()
    c.tokenizer.vocab_size = 512
    c.model = common.model_config("tiny")
    c.seq_len = 64
    c.batch_size = 8
    c.steps_per_call = 1
    c.total_steps = 40
    c.optimizer.warmup_steps = 10
    c.log_every = 10
    c.eval_every = 20
    c.num_eval_batches = 2
    c.checkpoint_every = 10
    c.num_samples = 1
    c.sample_len = 8
    c.num_probes = 4
  elif preset == "nanogpt_cpu":
    # nanoGPT's vocabulary: the corpus's characters (65 for Tiny Shakespeare) + our 8 specials,
    # without 256 byte-fallback pieces, so the softmax is over the same alphabet.
    c.tokenizer.model_type = "char"
    c.tokenizer.vocab_size = 400      # an upper bound for char: the corpus's characters + specials
    c.tokenizer.byte_fallback = False
    c.model = common.model_config("cpu")
    c.model.update(dict(embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352,
                        max_len=64))
    c.seq_len = 64
    c.batch_size = 12
    c.steps_per_call = 10             # 10 optimizer steps per call: a 64-token step is short on CPU
    c.data.num_threads = 1            # the pipeline needs a tenth of a core; leave the rest to XLA
    c.total_steps = 2000
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=100, end_lr_fraction=0.1, b2=0.99))
    c.eval_every = 250
    c.num_eval_batches = 20
    c.checkpoint_every = 1000
    c.num_probes = 0
  elif preset in ("gpt2_124m", "1b"):
    c.model = common.model_config(preset)
    c.tokenizer.vocab_size = 32_000
    c.seq_len = c.model.max_len
    c.batch_size = 64 if preset == "gpt2_124m" else 256
    c.steps_per_call = 1              # accelerator steps are long: one step per call
    c.total_steps = 20_000
    c.optimizer.learning_rate = 6e-4 if preset == "gpt2_124m" else 3e-4
    c.optimizer.warmup_steps = 1000
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    if preset == "1b":
      c.mesh.update(dict(data=1, fsdp=-1))
      # 256 rows of 2048 tokens in 4 microbatches of 64: one pass of all 256 needs 31 GiB of
      # temporaries per v5e chip (15.75 GiB) and 123 GiB per v5p chip (tools/plan.py).
      c.num_microbatches = 4
  return c
