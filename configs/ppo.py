r"""Stage 4a: RLHF with PPO against a reward model, with a KL penalty to the SFT reference.

  python -m experiments.ppo --config=configs/ppo.py:cpu --workdir=runs/ppo \
      --config.init_from=runs/sft --config.reward_from=runs/reward
  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=/tmp/ppo \
      --config.init_from=/tmp/sft --config.reward_from=/tmp/rm
  python -m experiments.ppo --config=configs/ppo.py:cpu --workdir=runs/ppo_gold --config.init_from=runs/sft \
      --config.reward.weights.model=0 --config.reward.weights.gold=1 --config.value_from=sft  # oracle

Roles: the policy starts from `init_from` (SFT) and the frozen reference is the same SFT model;
the reward is the weighted sum `reward.weights` (`jaxlm/rewards.py`): by default the reward-model
run `reward_from`, its scores normalised with the statistics it saved; the world's gold reward
or its verifiable correctness replace or join it as oracles for ablations; the value
model is the reward model (`value_from=reward`, InstructGPT's choice) or the SFT backbone with a
fresh scalar head (`value_from=sft`).

Ablations: kl.coef, kl.adaptive (+ kl.target, kl.horizon), ppo.kl_estimator (k1 | k3),
ppo.entropy_coef, ppo.whiten_advantages, reward.no_end_penalty, reward.weights.*, value_from.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/ppo.py")
  c = config_dict.ConfigDict()
  c.stage = "ppo"
  c.preset = preset
  c.seed = 0
  c.init_from = ""                # the SFT run directory: the policy's start and the reference
  c.reward_from = ""              # the reward-model run directory of the `model` reward term
  c.value_from = "reward"         # reward: start the value model from the reward model | sft
  c.tokenizer_path = ""           # "": the parent's; a tokenizer.model given here must be the parent's

  c.data = common.data_config("world")  # prompt records: world | jsonl:<glob> | tfds:...
  c.world = common.world_config()
  c.model = common.model_config("cpu")  # must equal the parent's shape

  c.max_prompt_len = 64           # prompt tokens (longer prompts keep their last tokens)
  c.max_new_tokens = 48           # reply budget per rollout
  c.rollout_batch = 64            # prompts per iteration (one reply each)
  # PPO iterations. Gold reward plateaus after ~10: from one parent, 20 iterations ended at
  # -0.04 and 12 at -0.13, about one seed-spread apart, for 40% less time.
  c.total_steps = 12

  c.ppo = config_dict.ConfigDict(dict(
      ppo_epochs=4,               # passes over each rollout batch
      num_minibatches=4,          # minibatches per pass: 4 x 4 = 16 updates per iteration
      clip_eps=0.2,
      value_clip_eps=0.2,
      value_coef=1.0,
      entropy_coef=0.0,
      gamma=1.0,
      lam=0.95,
      kl_estimator="k1",          # k1: log pi - log ref (unbiased) | k3: always >= 0
      whiten_advantages=True,
      temperature=1.0,            # rollouts at T=1 without top-k/top-p: exact log-probs
  ))
  c.kl = config_dict.ConfigDict(dict(
      coef=0.05,                  # beta of the per-token penalty -beta * kl_t
      adaptive=False,             # steer the KL towards `target` (Ziegler et al. 2019)
      target=6.0,                 # nats per reply
      horizon=10_000,             # samples over which beta may move by at most 20%
  ))
  # Weighted sum of rewards (jaxlm/rewards.py): model (the reward-model run `reward_from`),
  # gold (the world's gold reward, an oracle for ablations), correct (the verifiable answer
  # check), well_formed (ended its turn, not empty), sentence (the gold reward's form test).
  c.reward = config_dict.ConfigDict(dict(
      weights=config_dict.ConfigDict(dict(model=1.0, gold=0.0, correct=0.0, well_formed=0.0, sentence=0.0)),
      normalize=True,             # (r - mean) / std with the reward run's reward_stats.json
      no_end_penalty=1.0,         # subtracted from the score of a reply that never ends its turn
      # Normalised scores are clipped to [-clip, clip] (OpenRLHF's reward_clip_range): a reward
      # model that barely separates replies has a tiny std, and one odd reply must not swamp the
      # batch's advantages. 0 turns it off.
      clip=10.0,
  ))
  c.alarms = config_dict.ConfigDict(dict(
      min_kl=-1.0,                # mean KL per reply below this: the estimate has gone wrong
      max_kl=100.0,               # ... above this: the policy has run away from the reference
      action="stop",              # stop (exit 1, last good checkpoint kept) | flag (log and go on)
  ))

  c.policy_optimizer = common.optimizer_config(learning_rate=5e-5, warmup_steps=2)
  c.value_optimizer = common.optimizer_config(learning_rate=5e-4, warmup_steps=2)

  c.mesh = common.mesh_config()

  c.log_every = 1                 # iterations between metrics rows
  c.eval_every = 12               # the held-out evaluation: the SFT reference's at 0, the policy's at the end
  c.checkpoint_every = 10
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
    c.rollout_batch = 8
    c.total_steps = 4
    c.ppo.num_minibatches = 2
    c.ppo.ppo_epochs = 2
    c.eval_every = 2
    c.checkpoint_every = 2
    c.eval.update(dict(num_prompts=16, max_new_tokens=16, batch_size=16, num_samples=4))
  elif preset in ("gpt2_124m", "1b"):
    c.model = common.model_config(preset)
    c.max_prompt_len = 512
    c.max_new_tokens = 256
    c.rollout_batch = 256
    # 8 minibatches of 32 replies (not 4 of 64): one update's activations fit an 80 GB GPU and
    # a v5e chip (tools/plan.py: 69 GiB of 59.3 on an H100, 16.4 of 15.75 on a v5e with 4).
    c.ppo.num_minibatches = 8
    c.total_steps = 500
    c.policy_optimizer.learning_rate = 1e-6
    c.value_optimizer.learning_rate = 1e-5
    c.eval_every = 50
    c.checkpoint_every = 50
    c.eval.max_new_tokens = 256
    if preset == "1b":
      c.mesh.update(dict(data=1, fsdp=-1))
  return c
