"""Every config in configs/ builds for each of its presets; preset sizes are as documented."""

import importlib
import pathlib
import re

import pytest

from configs import common
from jaxlm import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGE_PRESETS = {"pretrain": ("tiny", "cpu", "nanogpt_cpu", "gpt2_124m", "1b"),
                 "sft": ("tiny", "cpu", "gpt2_124m", "1b"),
                 "reward": ("tiny", "cpu", "gpt2_124m", "1b"),
                 "dpo": ("tiny", "cpu", "gpt2_124m", "1b"),
                 "ppo": ("tiny", "cpu", "gpt2_124m", "1b"),
                 "grpo": ("tiny", "cpu", "gpt2_124m", "1b")}


def model_config(preset: str) -> model_lib.ModelConfig:
  fields = dict(common.model_config(preset))
  fields["attention_impl"] = fields["attention_impl"] or None
  return model_lib.ModelConfig(**fields)


@pytest.mark.parametrize("stage, preset", [(s, p) for s, ps in STAGE_PRESETS.items() for p in ps])
def test_stage_config_builds(stage, preset):
  config = importlib.import_module(f"configs.{stage}").get_config(preset)
  assert config.stage == stage and config.preset == preset
  fields = dict(config.model)
  fields["attention_impl"] = fields["attention_impl"] or None
  model_lib.ModelConfig(**fields)  # Validates the shape.
  if stage == "ppo":
    assert config.rollout_batch % config.ppo.num_minibatches == 0
  elif stage == "grpo":
    assert config.prompts_per_step * config.grpo.group_size % config.grpo.num_minibatches == 0
  else:
    assert config.batch_size % config.num_microbatches == 0


def test_every_stage_config_is_tested():
  configs = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__", "common"}
  assert configs == set(STAGE_PRESETS)


def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match="unknown preset"):
    importlib.import_module("configs.pretrain").get_config("huge")


def test_model_preset_sizes_match_the_documented_counts():
  source = (ROOT / "configs" / "common.py").read_text()
  for preset in common.MODEL_PRESETS:
    count = model_lib.num_params(model_config(preset))
    assert re.search(rf"#\s+{preset}\s+{count:,} ", source), f"update the count of {preset} in configs/common.py"
  assert 0.5e6 < model_lib.num_params(model_config("tiny")) < 1.5e6
  assert 105e6 < model_lib.num_params(model_config("gpt2_124m")) < 115e6  # at vocab 32000
