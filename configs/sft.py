r"""Stage 2: supervised fine-tuning on conversations, loss on the assistant's turns only.

  python -m experiments.sft --config=configs/sft.py:cpu --workdir=runs/sft --config.init_from=runs/pretrain
  python -m experiments.sft --config=configs/sft.py:tiny --workdir=/tmp/sft --config.init_from=/tmp/pt
  python -m experiments.sft --config=configs/sft.py:cpu --workdir=runs/my_sft --config.init_from=runs/pretrain \
      --config.data.source='jsonl:my_chats/*.jsonl'

`init_from` (required) is a stage-1 run directory (or any LM stage's): its tokenizer and model
shape are used, and its parameters are the starting point. Evaluation: held-out loss on the
validation chats, then, by generating on held-out prompts, the rate of well-formed replies
(the assistant ends its turn) and, on the world, answer correctness and the gold reward. The
parent model is scored on the same prompts at the start, so the run shows SFT's gain itself.

Presets (`:<preset>`): tiny (tests, seconds), cpu (the embedded world on 2 CPU cores in about a
minute), gpt2_124m and 1b (accelerators; shapes must match their stage-1 parent).
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/sft.py")
  c = config_dict.ConfigDict()
  c.stage = "sft"
  c.preset = preset
  c.seed = 0
  c.init_from = ""                # the parent run directory (stage 1); required
  c.tokenizer_path = ""           # "": the parent's; a tokenizer.model given here must be the parent's

  c.data = common.data_config("world")  # chat records: world | jsonl:<glob> | tfds:...
  c.world = common.world_config()
  # The parent's shape; every field must equal the parent's (a mismatch is a clear error).
  c.model = common.model_config("cpu")

  # Tokens per packed row; a longer conversation is truncated. World chats: mean 60 tokens, 93%
  # fit in 128. Against 256 x 16 rows (the same tokens per step), 128 x 32 trains 12% faster
  # (less attention across packed neighbours) and sampled better: well-formed 85% vs 80%, gold
  # reward -0.24 vs -0.50 after 160 steps.
  c.seq_len = 128
  c.packing = True                # first-fit pack whole conversations: few pad positions
  c.length_policy = "truncate"    # truncate | drop conversations longer than seq_len
  c.batch_size = 32
  c.num_microbatches = 1
  c.steps_per_call = 10
  # ~1 pass over the world's 18k training chats (~2 per packed row). Held-out loss was lowest
  # here at seq_len 256; 300 steps overfit (0.669 at 150 steps, 0.694 at 300).
  c.total_steps = 160

  # A third of stage 1's peak: adapt, do not forget the facts; no decay towards zero.
  c.optimizer = common.optimizer_config(learning_rate=1e-3)

  c.mesh = common.mesh_config()

  c.log_every = 20
  c.eval_every = 160               # generation evals are the slow part: the parent's and the final one
  c.num_eval_batches = 8          # fixed validation chat batches (held-out loss)
  c.checkpoint_every = 80
  c.keep_checkpoints = 2

  # Generation on held-out prompts: the parent at the start, this model at every eval.
  c.eval = config_dict.ConfigDict(dict(
      prompts="",                 # a prompt source (e.g. jsonl:prompts.jsonl); "": the world's test
                                  # prompts, or the validation chats cut before their last reply
      num_prompts=256,
      max_new_tokens=48,
      batch_size=64,
      greedy=True,                # the model's answer, not a sample of it
      temperature=1.0,            # when not greedy
      num_samples=8,              # replies written to samples.jsonl per eval
  ))

  if preset == "tiny":
    common.use_tiny_schedule(c)
    c.seq_len = 128
    c.eval.update(dict(num_prompts=16, max_new_tokens=16, batch_size=16, num_samples=4))
  elif preset in ("gpt2_124m", "1b"):
    common.use_accelerator_schedule(c, preset, learning_rate=2e-5)
    c.eval.max_new_tokens = 256
  return c
