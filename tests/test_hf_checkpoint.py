"""Hugging Face import/export (`jaxlm/hf_checkpoint.py`, tools/import_hf.py, tools/export_hf.py),
checked against what transformers itself wrote and computed (tests/fixtures/hf/, made by
tools/make_hf_fixtures.py; no torch here).

Tolerances:
- float32: max |jaxlm - transformers| <= 1e-4 over the logits (|logits| ~ 4; observed ~3e-6).
- bfloat16: both run in bf16 but round differently: jaxlm keeps RoPE, the softmax and the logits
  in float32 where transformers rounds cos/sin and its logits to bf16, so each side carries its
  own bf16 noise (relative 2^-9 per rounding, compounded over 2 layers). At |logits| ~ 4 one bf16
  ulp is 2^-6 = 0.016; we allow max 0.125 (8 ulps; observed <= 0.06) and mean 0.015 (observed
  ~0.005-0.01). A wrong mapping moves logits by O(1) at the fixtures' weight scale.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxlm import checkpoint
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import hf_checkpoint as hf
from jaxlm import model as model_lib
from jaxlm import sharding

from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
NAMES = ["llama3", "llama_untied", "qwen2", "mistral", "qwen3"]
# config.json keys that decide the function (compared between a fixture and its re-export).
FUNCTION_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
                 "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id")


def _tool(name):
  spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


import_hf, export_hf = _tool("import_hf"), _tool("export_hf")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every fixture imported once: name -> run directory."""
  root = tmp_path_factory.mktemp("imports")
  for name in NAMES:
    import_hf.import_checkpoint(str(FIXTURES / name), str(root / name))
  return {name: str(root / name) for name in NAMES}


def _logits(params, config, ids, mask):
  out = model_lib.Transformer(config).apply({"params": params}, jnp.asarray(ids), segment_ids=jnp.asarray(mask))
  return np.asarray(out.logits)


def _valid_diffs(ours, ref, mask):
  """|ours - ref| on the valid positions only (row 1 is right-padded)."""
  return np.concatenate([np.abs(ours[b, :mask[b].sum()] - ref[b, :mask[b].sum()]).ravel() for b in range(len(ref))])


def _tensors(directory):
  out = {}
  with hf.SafetensorsReader(str(directory)) as reader:
    for name in reader.names:
      with safe_open(reader.file_of[name], "numpy") as f:
        out[name] = f.get_tensor(name)
  return out


def _leaves_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_float32_and_bfloat16(runs, name):
  params, config, manifest, _ = export_hf.load_run(runs[name])
  ref = np.load(FIXTURES / name / "reference.npz")
  ids, mask = ref["input_ids"], ref["attention_mask"]
  assert manifest["stage"] == "import" and manifest["complete"]
  assert manifest["model_origin"] == f"hf:{manifest['extra']['architecture']}"
  f32 = _valid_diffs(_logits(params, config, ids, mask), ref["logits_float32"], mask)
  assert f32.max() <= 1e-4, f"{name}: float32 max |diff| {f32.max()}"
  bf16 = _valid_diffs(_logits(params, config.replace(dtype="bfloat16"), ids, mask), ref["logits_bfloat16"], mask)
  assert bf16.max() <= 0.125 and bf16.mean() <= 0.015, f"{name}: bf16 max {bf16.max()}, mean {bf16.mean()}"


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_fixture_and_reimports_bitwise(runs, name, tmp_path):
  out = tmp_path / "export"
  config = export_hf.export_run(runs[name], str(out))
  theirs, ours = _tensors(FIXTURES / name), _tensors(out)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and np.array_equal(ours[key], value), key
  original = hf.read_json(str(FIXTURES / name / "config.json"))
  for key in FUNCTION_KEYS + ("head_dim",) * ("head_dim" in original):
    assert config[key] == original[key], key
  assert hf._rope_from_hf(config, "")[:2] == hf._rope_from_hf(original, "")[:2]
  for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (FIXTURES / name / file).exists():
      assert (out / file).read_bytes() == (FIXTURES / name / file).read_bytes(), file
  again = import_hf.import_checkpoint(str(out), str(tmp_path / "again"))
  assert again["model_config"] == checkpoint.RunDir(runs[name]).read_manifest()["model_config"]
  assert again["tokenizer_hash"] == checkpoint.RunDir(runs[name]).read_manifest()["tokenizer_hash"]
  _leaves_equal(export_hf.load_run(str(tmp_path / "again"))[0], export_hf.load_run(runs[name])[0])


def test_bfloat16_export_round_trips_to_rounded_params(runs, tmp_path):
  export_hf.export_run(runs["qwen3"], str(tmp_path / "bf16"), dtype="bfloat16")
  with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  import_hf.import_checkpoint(str(tmp_path / "bf16"), str(tmp_path / "run"))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32),
                         export_hf.load_run(runs["qwen3"])[0])
  _leaves_equal(export_hf.load_run(str(tmp_path / "run"))[0], rounded)


def test_sharded_checkpoint_loads_onto_a_mesh(runs, tmp_path):
  """Many small shard files + index, read slice by slice onto a sharded layout."""
  params, config, manifest, _ = export_hf.load_run(runs["mistral"])
  arch = manifest["extra"]["architecture"]
  written = hf.save_params(params, config, arch, str(tmp_path), max_shard_bytes=40_000)
  assert hf.SAFETENSORS_INDEX in written and len(written) > 3
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices.reshape(len(devices)), ("x",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "x"))  # over heads/E
  shardings = jax.tree.map(lambda x: split if x.ndim >= 3 and x.shape[2] % len(devices) == 0
                           else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
  loaded = hf.load_params(str(tmp_path), config, arch, shardings=shardings)
  _leaves_equal(loaded, params)
  assert loaded["layers"]["attn"]["q"]["kernel"].sharding == split


def test_reward_model_exports_as_sequence_classification(runs, tmp_path):
  params, config, _, _ = export_hf.load_run(runs["qwen2"])
  head = {"kernel": jnp.linspace(-1.0, 1.0, config.embed_dim), "bias": jnp.float32(0.375)}
  run = checkpoint.RunDir(tmp_path / "reward")
  os.makedirs(run.workdir)
  for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copyfile(os.path.join(runs["qwen2"], file), os.path.join(run.workdir, file))
  run.write_config({"stage": "reward"})
  run.write_manifest(stage="reward", parent=runs["qwen2"], config={"stage": "reward"},
                     tokenizer_hash=hf.tokenizer_files_hash(run.workdir), data_source="test", model_config=config)
  with checkpoint.Checkpointer(run.workdir, async_save=False) as ckpt:
    ckpt.save(3, {"params": {**params, "scalar_head": head}}, data_state=None)
  run.update_manifest(complete=True)
  hf_config = export_hf.export_run(run.workdir, str(tmp_path / "out"))
  assert hf_config["architectures"] == ["Qwen2ForSequenceClassification"]
  assert hf_config["num_labels"] == 1 and hf_config[hf.SCORE_BIAS_KEY] == 0.375
  # HF reads the reward at the last token that is not the pad: the pad must end no turn.
  tok = tokenizer_lib.load_tokenizer(run.workdir)
  pad = hf_config["pad_token_id"]
  assert pad in tok.special_ids and pad not in set(tok.chat_format.stop_ids) | {tok.eos_id}
  exported_tokenizer = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
  assert exported_tokenizer["pad_token"] == tok.id_to_piece(pad)
  score = _tensors(tmp_path / "out")["score.weight"]
  np.testing.assert_array_equal(score, np.asarray(head["kernel"])[None, :])
  import_hf.import_checkpoint(str(tmp_path / "out"), str(tmp_path / "again"))
  _leaves_equal(export_hf.load_run(str(tmp_path / "again"))[0], {**params, "scalar_head": head})


def _config_with(name, **changes):
  config = hf.read_json(str(FIXTURES / name / "config.json"))
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  return config


@pytest.mark.parametrize("name,changes,key", [
    ("llama3", {"architectures": ["GemmaForCausalLM"]}, "architectures"),
    ("llama3", {"architectures": ["LlamaForCausalLM", "LlamaForSequenceClassification"]}, "architectures"),
    ("llama3", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act"),
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}}, "rope_parameters"),
    ("llama_untied", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling"),
    ("llama3", {"attention_bias": True}, "attention_bias"),
    ("llama3", {"mlp_bias": True}, "mlp_bias"),
    ("mistral", {"sliding_window": 4096}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
    ("qwen2", {"model_type": "llama"}, "model_type"),
    ("qwen3", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_configs_are_refused_by_key(name, changes, key):
  with pytest.raises(hf.HFConfigError, match=f"config.json: key '{key}'"):
    hf.model_config_from_hf(_config_with(name, **changes))


def test_rope_spellings_agree():
  """transformers-5 rope_parameters and the older rope_scaling + rope_theta read the same."""
  new = _config_with("llama3")
  old = _config_with("llama3", rope_parameters=None, rope_theta=500000.0,
                     rope_scaling={k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"})
  assert hf.model_config_from_hf(new) == hf.model_config_from_hf(old)
  assert hf.model_config_from_hf(new).rope_scaling_dict["rope_type"] == "llama3"
  head_dim = _config_with("llama_untied", head_dim=None)
  assert hf.model_config_from_hf(head_dim).head_dim == 16


def test_import_refuses_missing_tensors_and_existing_workdirs(runs, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(FIXTURES / "llama3", bad)
  (bad / "config.json").write_text(json.dumps(_config_with("llama3", tie_word_embeddings=False)))
  with pytest.raises(hf.HFConfigError, match="lm_head.weight"):
    import_hf.import_checkpoint(str(bad), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() and not list(tmp_path.glob("run.importing-*"))
  with pytest.raises(checkpoint.errors.RunDirError, match="never overwrites"):
    import_hf.import_checkpoint(str(FIXTURES / "llama3"), runs["llama3"])


def test_cli_error_is_one_line_without_traceback(tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(FIXTURES / "qwen3", bad)
  (bad / "config.json").write_text(json.dumps(_config_with("qwen3", hidden_act="relu")))
  result = subprocess.run([sys.executable, "tools/import_hf.py", f"--hf_dir={bad}", f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "'hidden_act'" in lines[0] and "Traceback" not in result.stderr


def test_tokenizer_hash_is_the_hf_tokenizers_content_hash(runs):
  hf_tokenizer = pytest.importorskip("jaxlm.hf_tokenizer")
  for name in NAMES:
    tok = hf_tokenizer.HFTokenizer.load(runs[name])
    assert tok.content_hash == checkpoint.RunDir(runs[name]).read_manifest()["tokenizer_hash"], name


def test_load_parent_reads_an_import(runs):
  parent = checkpoint.load_parent(runs["qwen2"])
  assert parent.step == 0 and parent.model_config.qkv_bias
  _leaves_equal(parent.params, export_hf.load_run(runs["qwen2"])[0])


def test_a_jaxlm_grown_run_exports_as_llama_with_its_sentencepiece_model(world_tokenizer, tmp_path):
  """No hf_config.json in the lineage: Llama from the ModelConfig; tokenizer.model travels."""
  config = model_lib.ModelConfig(vocab_size=world_tokenizer.vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64)
  params = jax.tree.map(np.asarray, sharding.unbox(model_lib.init_params(config, jax.random.key(0))))
  run = checkpoint.RunDir(tmp_path / "sft")
  os.makedirs(run.workdir)
  run.save_tokenizer(world_tokenizer)
  run.write_config({"stage": "sft"})
  run.write_manifest(stage="sft", parent=None, config={"stage": "sft"}, tokenizer_hash=world_tokenizer.content_hash,
                     data_source="test", model_config=config)
  with checkpoint.Checkpointer(run.workdir, async_save=False) as ckpt:
    ckpt.save(1, {"params": params}, data_state=None)
  run.update_manifest(complete=True)
  out = tmp_path / "out"
  hf_config = export_hf.export_run(run.workdir, str(out))
  assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["tie_word_embeddings"]
  assert hf_config["bos_token_id"] == world_tokenizer.bos_id and hf_config["pad_token_id"] == world_tokenizer.pad_id
  assert (out / "tokenizer.model").read_bytes() == open(run.tokenizer_path, "rb").read()
  assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
  assert hf.model_config_from_hf(hf_config) == config
  _leaves_equal(hf.load_params(str(out), config, "LlamaForCausalLM"), params)
