r"""Stage 4b: direct preference optimisation (DPO) on the preference pairs.

  python -m experiments.dpo --config=configs/dpo.py:cpu --workdir=runs/dpo --config.init_from=runs/sft
  python -m experiments.dpo --config=configs/dpo.py:tiny --workdir=/tmp/dpo --config.init_from=/tmp/sft
  python -m experiments.dpo --config=configs/dpo.py:cpu --workdir=runs/ipo --config.init_from=runs/sft \
      --config.loss.name=ipo --config.loss.beta=0.5
  python -m experiments.dpo --config=configs/dpo.py:cpu --workdir=runs/my_dpo --config.init_from=runs/sft \
      --config.data.source='jsonl:prefs/*.jsonl' --config.eval.judge=runs/reward

The policy starts from `init_from` (the SFT run directory) and the frozen reference is the same
SFT model. With `reference.precompute`, the reference log-probs of the training pairs the run
will see are computed once before training and kept with the run (reference_logps.npy), so
training holds one model. Evaluation on held-out prompts is the one PPO uses (`jaxlm/policy_eval.py`): gold reward
(world), win rate against the SFT model, KL to it, length, well-formed rate; with
`eval.judge` set to a reward-model run directory, that model judges (a user's prompts have no
gold reward).

Ablations: loss.name (sigmoid | ipo), loss.beta, loss.label_smoothing (conservative DPO).
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  preset = arg or "cpu"
  if preset not in ("tiny", "cpu", "gpt2_124m", "1b"):
    raise ValueError(f"unknown preset {preset!r} for configs/dpo.py")
  c = config_dict.ConfigDict()
  c.stage = "dpo"
  c.preset = preset
  c.seed = 0
  c.init_from = ""                # the SFT run directory: the policy's start and the reference
  c.tokenizer_path = ""           # "": the parent's; a tokenizer.model given here must be the parent's

  c.data = common.data_config("world")  # preference records: world | jsonl:<glob> | tfds:...
  c.world = common.world_config()
  c.model = common.model_config("cpu")  # must equal the parent's shape

  c.loss = config_dict.ConfigDict(dict(
      name="sigmoid",             # sigmoid (DPO; cDPO with label_smoothing > 0) | ipo
      beta=0.1,                   # strength of the pull towards the reference (IPO's tau)
      label_smoothing=0.0,        # cDPO: the assumed rate of flipped labels
  ))
  c.reference = config_dict.ConfigDict(dict(
      precompute=True,            # reference log-probs once before training: one model in memory
  ))

  # One row per pair: the prompt once, then both responses (the shared-prompt layout). On the
  # world, 87% of pairs fit 128 tokens whole (the rest lose early prompt tokens) and 98% of
  # response pairs fit 112 scored slots (the rest are dropped).
  c.seq_len = 128                 # prompt + chosen + rejected tokens per pair
  c.score_len = 112               # chosen + rejected tokens: the positions the LM head scores
  c.length_policy = "truncate"
  c.batch_size = 32               # pairs per optimizer step
  c.num_microbatches = 1
  c.steps_per_call = 10
  # 3.2k pairs: win rate 0.59-0.64 against SFT over 3 seeds (gold reward +0.53 to +0.74).
  c.total_steps = 100

  c.optimizer = common.optimizer_config(learning_rate=3e-4)

  c.mesh = common.mesh_config()

  c.log_every = 20
  c.eval_every = 100              # generation evals are the slow part: the reference's and the final one
  c.num_eval_batches = 16         # held-out pairs: loss and implicit-reward accuracy
  c.checkpoint_every = 50
  c.keep_checkpoints = 2

  # Generation on held-out prompts (shared with PPO): the policy against the SFT model.
  c.eval = config_dict.ConfigDict(dict(
      prompts="",                 # a prompt source; "": the world's test prompts
      judge="",                   # a reward-model run directory; "": the world's gold reward
      num_prompts=256,
      max_new_tokens=48,
      batch_size=64,
      temperature=1.0,            # samples at T=1 without truncation: the KL estimate is unbiased
      num_samples=8,              # replies written to samples.jsonl per eval
  ))

  if preset == "tiny":
    common.use_tiny_schedule(c)
    c.eval.update(dict(num_prompts=16, max_new_tokens=16, batch_size=16, num_samples=4))
  elif preset in ("gpt2_124m", "1b"):
    common.use_accelerator_schedule(c, preset, learning_rate=5e-7)
    c.score_len = 768               # of the 1024-token pair rows
    # Shared-prompt rows need the branch mask, so attention is XLA's (no fused kernel takes it):
    # 64 pairs in one pass need 105 GiB of gpt2_124m on a GPU (tools/plan.py); 4 x 16 fit.
    c.num_microbatches = 4
    c.eval.max_new_tokens = 256
  return c
