"""A Hugging Face model through jaxlm's stages, as a user runs them: import a transformers-saved
Qwen2.5-style directory (q/k/v bias, an embedding padded past the tokenizer, ChatML with a
default system prompt), SFT on a chat JSONL, DPO on a preference JSONL, export, and talk to the
imported run with tools/chat.py. The model shape is never given: every stage takes it from the
imported parent (`stage.adopt_parent_model`).

Parity with transformers itself is in tests/test_hf_checkpoint.py (imports) and
tests/test_chat_formats.py (chat ids); here the export of the trained DPO policy is read back
and must equal the run's parameters bit for bit, with the Qwen2 config.json transformers loads.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import chat_template
from jaxlm import checkpoint
from jaxlm import hf_checkpoint
from jaxlm import inference
from jaxlm import sampling
from jaxlm import tokenizer as tokenizer_lib

from conftest import ROOT, stage_command, stage_environment
from test_tools import load_tool

FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "qwen2"
QUESTIONS = [("What is two plus three?", "Five.", "Six, I think."),
             ("Name a colour.", "Blue.", "I cannot say."),
             ("Say hello.", "Hello!", "No."),
             ("What is the capital of France?", "Paris.", "London, probably.")]
# Few steps, few prompts: the point is that every stage runs on the imported model, not learning.
SHORT = ["--config.total_steps=6", "--config.eval_every=6", "--config.checkpoint_every=6", "--config.log_every=3",
         "--config.eval.num_prompts=4", "--config.eval.max_new_tokens=8"]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _run(command, data_cache):
  result = subprocess.run(command, cwd=ROOT, env=stage_environment(data_cache), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def hf_chain(tmp_path_factory, data_cache):
  """(import, sft, dpo) run directories of one chain on the qwen2 fixture."""
  base = tmp_path_factory.mktemp("hf_chain")
  chats = _write_jsonl(base / "chats.jsonl", [
      {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}
      for q, good, _ in QUESTIONS * 8])
  prefs = _write_jsonl(base / "prefs.jsonl", [
      {"prompt": [{"role": "user", "content": q}], "chosen": good, "rejected": bad} for q, good, bad in QUESTIONS * 8])
  imported, sft, dpo = base / "import", base / "sft", base / "dpo"
  load_tool("import_hf").import_checkpoint(str(FIXTURE), str(imported))
  _run(stage_command("sft", sft, f"--config.init_from={imported}", f"--config.data.source=jsonl:{chats}", *SHORT),
       data_cache)
  # The world's held-out prompts carry a gold reward, so DPO's win rate needs no judge run.
  _run(stage_command("dpo", dpo, f"--config.init_from={sft}", f"--config.data.source=jsonl:{prefs}",
                     "--config.eval.prompts=world", *SHORT),
       data_cache)
  return imported, sft, dpo


def test_every_stage_takes_the_imported_shape_and_tokenizer(hf_chain):
  imported, sft, dpo = hf_chain
  shape = checkpoint.RunDir(imported).read_manifest()["model_config"]
  assert shape["qkv_bias"] and shape["vocab_size"] == 506  # the fixture pads 442 tokens to 506 rows
  for run in (sft, dpo):
    manifest = checkpoint.RunDir(run).read_manifest()
    assert manifest["complete"] and manifest["model_origin"] == "hf:Qwen2ForCausalLM"
    assert manifest["model_config"] == shape  # not the tiny preset's
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["num_layers"] == shape["num_layers"] and config["model"]["origin"].startswith("hf:")
    assert manifest["tokenizer_hash"] == hf_checkpoint.tokenizer_files_hash(str(FIXTURE))
    assert all(np.isfinite(v) for v in manifest["final_metrics"].values() if isinstance(v, float))


def test_sft_trains_on_the_chatml_rendering(hf_chain):
  """The SFT rows are the model's own chat format: ChatML, Qwen's default system prompt."""
  tok = tokenizer_lib.load_tokenizer(hf_chain[1])
  assert tok.chat_format.name.startswith("chatml")
  ids, mask = chat_template.render_chat(tok, [{"role": "user", "content": "Say hello."},
                                               {"role": "assistant", "content": "Hello!"}])
  reference = json.loads((FIXTURE / "chat_reference.json").read_text())
  assert "You are Qwen" in json.dumps(reference)  # the fixture's template has the default prompt
  assert tok.decode(ids[mask]) == "Hello!"  # the reply (+ <|im_end|>, dropped by decode) only


def test_the_dpo_policy_exports_to_what_transformers_loads_bitwise(hf_chain, tmp_path):
  dpo = hf_chain[2]
  out = tmp_path / "export"
  load_tool("export_hf").export_run(str(dpo), str(out))
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Qwen2ForCausalLM"] and config["vocab_size"] == 506
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
  reimported = tmp_path / "reimported"
  load_tool("import_hf").import_checkpoint(str(out), str(reimported))
  trained = jax.tree_util.tree_leaves_with_path(checkpoint.load_parent(dpo).params)
  back = jax.tree_util.tree_leaves_with_path(checkpoint.load_parent(reimported).params)
  assert [path for path, _ in trained] == [path for path, _ in back]
  for (path, a), (_, b) in zip(trained, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_chat_talks_to_the_imported_model_in_its_own_format(hf_chain, data_cache):
  workdir = hf_chain[0]
  result = subprocess.run([sys.executable, "tools/chat.py", "--workdir", str(workdir), "--prompt", "Say hello.",
                           "--greedy", "--max_new_tokens", "6"], cwd=ROOT, env=stage_environment(data_cache),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
  loaded = inference.load_run(workdir)
  messages = [{"role": "user", "content": "Say hello."}]
  pieces = inference.stream_reply(loaded, messages, sampling=sampling.SamplingConfig(greedy=True), max_new_tokens=6)
  assert result.stdout == "".join(pieces) + "\n"  # the library's reply: ChatML prompt, ChatML stops
  prompt = chat_template.render_prompt(loaded.tokenizer, messages)
  assert loaded.tokenizer.decode(prompt[:0]) == "" and "<|im_start|>" in loaded.tokenizer.id_to_piece(int(prompt[0]))


def test_ppo_runs_on_the_imported_lineage_with_a_fresh_value_head(hf_chain, data_cache, tmp_path):
  """PPO from the imported model's SFT run, gold reward, value model = SFT backbone + a new head
  (`value_from=sft` once failed: the SFT tree has no scalar head to place)."""
  workdir = tmp_path / "ppo"
  _run(stage_command("ppo", workdir, f"--config.init_from={hf_chain[1]}", "--config.reward.weights.model=0", "--config.reward.weights.gold=1",
                     "--config.value_from=sft", "--config.total_steps=2", "--config.eval_every=2",
                     "--config.checkpoint_every=2", "--config.eval.num_prompts=4", "--config.eval.max_new_tokens=8"),
       data_cache)
  manifest = checkpoint.RunDir(workdir).read_manifest()
  assert manifest["complete"] and manifest["model_origin"] == "hf:Qwen2ForCausalLM"
  assert np.isfinite(manifest["final_metrics"]["gold_reward"])
