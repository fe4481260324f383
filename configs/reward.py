r"""Stage 3: the reward model (Bradley-Terry on preference pairs, scalar head on the backbone).

  python -m experiments.reward --config=configs/reward.py:cpu --workdir=runs/reward --config.init_from=runs/sft
  python -m experiments.reward --config=configs/reward.py:tiny --workdir=/tmp/rm --config.init_from=/tmp/sft
  python -m experiments.reward --config=configs/reward.py:cpu --workdir=runs/my_rm --config.init_from=runs/sft \
      --config.data.source='jsonl:prefs/*.jsonl'   # {"prompt", "chosen", "rejected"} or {"chosen", "rejected"} texts

`init_from` is the SFT run directory (InstructGPT's choice, the default in the pipeline) or a
stage-1 one; the backbone starts from its parameters and a fresh, zero scalar head is added.
Evaluation on the held-out pairs: accuracy and mean margin; on the world also the labels' own
ceiling, the correlation with the gold reward, accuracy by length and the reward-length
correlation. At the end the reward statistics (mean, std) of the parent's samples on training
prompts are saved as reward_stats.json, which PPO uses to normalise rewards.

Presets: tiny (tests), cpu (the world on 2 CPU cores in about a minute), gpt2_124m, 1b.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/reward.py")
  c = config_dict.ConfigDict()
  c.stage = "reward"
  c.preset = preset
  c.seed = 0
  c.init_from = ""                # the parent run directory (SFT, or stage 1); required
  c.tokenizer_path = ""           # "": the parent's; a tokenizer.model given here must be the parent's

  c.data = common.data_config("world")  # preference records: world | jsonl:<glob> | tfds:...
  c.world = common.world_config()
  c.model = common.model_config("cpu")  # must equal the parent's shape

  # Prompt + response tokens per side. On the world (vocab 2048) 79% of training pairs fit whole;
  # the other 21% lose their prompt's oldest tokens (responses are never cut) and none is
  # dropped (the counts are in the run's manifest, data.pipelines).
  c.seq_len = 96
  c.length_policy = "truncate"    # truncate (the prompt's oldest turns) | drop
  c.batch_size = 32               # pairs per optimizer step
  c.num_microbatches = 1
  c.steps_per_call = 10
  # 3.2k pairs, a sixth of the world's: held-out accuracy 0.708 at 150 steps and 0.693 at 300,
  # so longer training does not help at this size.
  c.total_steps = 100

  c.loss = config_dict.ConfigDict(dict(
      margin=0.0,                 # m in -log sigmoid(r_c - r_r - m)
      centering_weight=0.0,       # weight of (r_c + r_r)^2 (Eisenstein et al. 2023); keeps rewards near 0
  ))

  c.optimizer = common.optimizer_config(learning_rate=1e-3)

  c.mesh = common.mesh_config()

  c.log_every = 20
  c.eval_every = 50
  c.num_eval_batches = 32         # held-out pairs scored at each eval: num_eval_batches * batch_size
  c.checkpoint_every = 50
  c.keep_checkpoints = 2

  # Reward statistics for PPO: the parent's samples on training prompts, scored by this model.
  c.stats = config_dict.ConfigDict(dict(
      num_prompts=256,
      max_new_tokens=48,
      temperature=1.0,            # PPO's rollout setting
      batch_size=64,
  ))

  if preset == "tiny":
    common.use_tiny_schedule(c)
    c.seq_len = 96
    # 64 samples (not 16): the std PPO divides by must be an estimate, not noise (16 gave 0.0074).
    c.stats.update(dict(num_prompts=64, max_new_tokens=16, batch_size=64))
  elif preset in ("gpt2_124m", "1b"):
    common.use_accelerator_schedule(c, preset, learning_rate=1e-5)
    # 64 pairs are 128 rows of 1024 tokens: two microbatches of 32 pairs fit one 80 GB GPU
    # (tools/plan.py: 93.6 GiB in one pass of gpt2_124m on an H100's 59.3 GiB budget).
    c.num_microbatches = 2
    c.stats.max_new_tokens = 256
  return c
