r"""Stage 4c: critic-free RL (GRPO, RLOO, Dr. GRPO) with G replies per prompt and rewards as callables.

  python -m experiments.grpo --config=configs/grpo.py:cpu --workdir=runs/grpo --config.init_from=runs/sft
  python -m experiments.grpo --config=configs/grpo.py:tiny --workdir=/tmp/grpo --config.init_from=/tmp/sft
  python -m experiments.grpo --config=configs/grpo.py:cpu --workdir=runs/rloo --config.init_from=runs/sft \
      --config.grpo.advantage=rloo
  python -m experiments.grpo --config=configs/grpo.py:cpu --workdir=runs/grpo_rm --config.init_from=runs/sft \
      --config.reward_from=runs/reward --config.reward.weights.correct=0 --config.reward.weights.model=1

Roles: the policy starts from `init_from` (SFT, DPO or an imported model) and the frozen
reference is the same model; there is no value model. Each iteration samples
`prompts_per_step` prompts x `grpo.group_size` replies, scores every reply with the weighted
rewards of `reward.weights` (`jaxlm/rewards.py`: the world's verifiable correctness by default;
`model` uses the reward-model run `reward_from`), turns each prompt's G scores into
group-relative advantages and takes clipped-ratio policy steps (`jaxlm/grpo.py`).

Ablations: grpo.advantage (grpo | rloo | dr_grpo), grpo.loss_norm (token | sequence | constant),
grpo.clip_eps_high (DAPO's clip-higher), grpo.dynamic_sampling_rounds (DAPO's dynamic sampling),
grpo.kl_coef, grpo.kl_in (loss | reward), grpo.group_size, reward.weights.*.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/grpo.py")
  c = config_dict.ConfigDict()
  c.stage = "grpo"
  c.preset = preset
  c.seed = 0
  c.init_from = ""                # the policy's start and the frozen reference (sft, dpo or import run)
  c.reward_from = ""              # a reward-model run directory, for the `model` reward only
  c.tokenizer_path = ""           # "": the parent's

  c.data = common.data_config("world")  # prompt records: world | jsonl:<glob> | tfds:...
  c.world = common.world_config()
  c.model = common.model_config("cpu")  # must equal the parent's shape (an imported parent's is adopted)

  c.max_prompt_len = 64           # prompt tokens (longer prompts keep their last tokens)
  c.max_new_tokens = 48           # reply budget
  c.prompts_per_step = 16         # prompts per iteration; x group_size replies
  c.total_steps = 24              # iterations

  c.grpo = config_dict.ConfigDict(dict(
      group_size=4,               # G replies per prompt (TRL's default num_generations is 8)
      advantage="grpo",           # grpo: (r - mean) / (std + 1e-4) | rloo: leave-one-out | dr_grpo: r - mean
      clip_eps_low=0.2,           # ratio clipped to [1 - low, 1 + high]
      clip_eps_high=0.2,          # > low: DAPO's clip-higher (0.28 in the DAPO paper)
      epochs=1,                   # passes over each rollout (1: on-policy, TRL's default)
      num_minibatches=1,          # optimizer steps per pass
      loss_norm="token",          # token (DAPO, TRL's default) | sequence (GRPO paper) | constant (Dr. GRPO)
      kl_coef=0.04,               # beta of the KL to the reference (GRPO paper: 0.04)
      kl_in="loss",               # loss: beta * k3 per token | reward: beta * sum k1 subtracted from the score
      temperature=1.0,            # sampling at T=1 without truncation: exact log-probs
      old_log_probs="sampler",    # log pi_old: sampler (no extra forward) | scorer (teacher-forced pass)
      dynamic_sampling_rounds=0,  # DAPO: up to R more draws to replace groups whose rewards are all equal
  ))
  # Weighted sum of rewards (jaxlm/rewards.py): gold (the world's gold reward), correct (the
  # verifiable answer check), well_formed (ended its turn, not empty), sentence (the gold
  # reward's form test), model (the reward-model run `reward_from`, normalised by its stats).
  c.reward = config_dict.ConfigDict(dict(
      weights=config_dict.ConfigDict(dict(gold=0.0, correct=1.0, well_formed=0.2, sentence=0.0, model=0.0)),
      nan="ignore",               # a term that does not apply to a prompt adds 0 (counted); raise: refuse
      normalize=True,             # model term: (s - mean) / std with the reward run's reward_stats.json
      clip=0.0,                   # model term: clip the normalised score to [-clip, clip]; 0: off
  ))
  c.alarms = config_dict.ConfigDict(dict(
      min_kl=-1.0,                # mean KL per reply below this: the estimate has gone wrong
      max_kl=100.0,               # ... above this: the policy has run away from the reference
      action="stop",              # stop (exit 1, last good checkpoint kept) | flag (log and go on)
  ))

  c.optimizer = common.optimizer_config(learning_rate=2e-5, warmup_steps=2)

  c.mesh = common.mesh_config()

  c.log_every = 1                 # iterations between metrics rows
  c.eval_every = 24               # the held-out evaluation: the reference's at 0, the policy's at the end
  c.checkpoint_every = 12
  c.keep_checkpoints = 2

  c.eval = config_dict.ConfigDict(dict(
      prompts="",                 # a prompt source; "": the world's test prompts
      judge="",                   # a reward-model run directory; "": the world's gold reward
      num_prompts=256,
      max_new_tokens=48,
      batch_size=64,
      temperature=1.0,
      num_samples=8,
  ))

  if preset == "tiny":
    c.world = common.tiny_world()
    c.model = common.model_config("tiny")
    c.max_prompt_len = 48
    c.max_new_tokens = 16
    c.prompts_per_step = 4
    c.total_steps = 4
    c.grpo.num_minibatches = 2
    c.grpo.dynamic_sampling_rounds = 1  # The tests' runs (and their kill/resume) take the longer path.
    c.eval_every = 2
    c.checkpoint_every = 2
    c.eval.update(dict(num_prompts=16, max_new_tokens=16, batch_size=16, num_samples=4))
  elif preset in ("gpt2_124m", "1b"):
    c.model = common.model_config(preset)
    c.max_prompt_len = 512
    c.max_new_tokens = 256
    c.prompts_per_step = 64
    c.grpo.group_size = 8
    c.grpo.num_minibatches = 8
    c.total_steps = 500
    c.optimizer.learning_rate = 1e-6
    c.eval_every = 50
    c.checkpoint_every = 50
    c.eval.max_new_tokens = 256
    if preset == "1b":
      c.mesh.update(dict(data=1, fsdp=-1))
  return c
