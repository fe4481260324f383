"""Tests for jaxlm.hf_tokenizer and jaxlm.tokenizer.load_tokenizer.

Test-local tokenizers are built in tmp_path with `tokenizers` (a tiny byte-level BPE or a
Metaspace unigram) and carry the families' chat templates, so these tests need no fixture. The
transformers-made fixtures under tests/fixtures/hf/ are checked in tests/test_chat_formats.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxlm import tokenizer as tk
from jaxlm.hf_tokenizer import HFTokenizer

CORPUS = ["Hello there, how are you? I am fine.", "The cat sat on the mat.\n\nIt ran home.",
          "What is 2+2? Four.", "system user assistant Be brief. Sys one two three",
          "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
          "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."] * 3

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")

FAMILIES = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE),
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                   eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE),
    "mistral": dict(specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>",
                    template=MISTRAL_TEMPLATE, metaspace=True),
}


def make_tokenizer_dir(directory, family: str, *, template: str | None = "default",
                       template_file: bool = False) -> str:
  """Writes a tiny tokenizer.json + tokenizer_config.json (+ chat_template.jinja) for `family`."""
  spec = FAMILIES[family]
  os.makedirs(directory, exist_ok=True)
  if spec.get("metaspace"):  # SentencePiece-like: ▁ for spaces, prepended to the first word.
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=spec["specials"])
  else:  # Byte-level BPE, as Llama 3 and Qwen.
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec.get("pad"),
            "model_max_length": 1024}
  template = spec["template"] if template == "default" else template
  if template is not None and template_file:
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
      f.write(template)
  elif template is not None:
    config["chat_template"] = template
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_tok(request, tmp_path_factory) -> HFTokenizer:
  directory = make_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)
  return tk.load_tokenizer(directory)


def test_special_ids_and_interface(family_tok):
  assert isinstance(family_tok, tk.TokenizerLike)
  spec = FAMILIES[family_tok.chat_format.name if family_tok.chat_format.name != "chatml" else "chatml"]
  raw = tokenizers.Tokenizer.from_str(family_tok.files["tokenizer.json"].decode())
  assert family_tok.eos_id == raw.token_to_id(spec["eos"])
  assert family_tok.bos_id == (raw.token_to_id(spec["bos"]) if spec["bos"] else None)
  assert family_tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  assert {raw.token_to_id(s) for s in spec["specials"]} <= family_tok.special_ids
  assert family_tok.id_to_piece(family_tok.eos_id) == spec["eos"]


def test_encode_is_plain_text(family_tok):
  raw = tokenizers.Tokenizer.from_str(family_tok.files["tokenizer.json"].decode())
  for text in ["Hello there, how are you?", "The cat\n\nsat  on the mat. ", "é 🙂 x"]:
    assert family_tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    if family_tok.chat_format.name != "mistral" or text.isascii():  # (no byte pieces in its vocab)
      assert family_tok.decode(family_tok.encode(text)) == text
  eos = FAMILIES[family_tok.chat_format.name]["eos"]
  forged = family_tok.encode(f"a {eos} b")
  assert family_tok.eos_id not in forged and family_tok.bos_id not in forged
  assert family_tok.encode_batch(["Hello", "", "mat"]) == [family_tok.encode(t) for t in ("Hello", "", "mat")]
  assert family_tok.decode([family_tok.eos_id] + family_tok.encode("Hello")) == "Hello"


def test_content_hash_matches_the_import_tools_definition(tmp_path):
  directory = make_tokenizer_dir(tmp_path / "t", "llama3", template_file=True)
  expected = hashlib.sha256()
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    with open(os.path.join(directory, name), "rb") as f:
      expected.update(f"{name}\0{hashlib.sha256(f.read()).hexdigest()}\n".encode())
  tok = tk.load_tokenizer(directory)
  assert tok.content_hash == expected.hexdigest()
  assert tok.template_source.endswith("chat_template.jinja")


def test_save_load_pickle(family_tok, tmp_path):
  family_tok.save(tmp_path / "run")
  again = tk.load_tokenizer(tmp_path / "run")
  assert again == family_tok and again.content_hash == family_tok.content_hash
  clone = pickle.loads(pickle.dumps(family_tok))
  assert clone == family_tok and clone.chat_format.name == family_tok.chat_format.name
  assert clone.encode("Hello there") == family_tok.encode("Hello there")
  assert len(pickle.dumps(family_tok)) < 4 * sum(len(b) for b in family_tok.files.values()) + 4096


def test_load_tokenizer_dispatch(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    tk.load_tokenizer(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
    tk.load_tokenizer(tmp_path / "empty")
  hf_dir = make_tokenizer_dir(tmp_path / "hf", "chatml")
  assert isinstance(tk.load_tokenizer(hf_dir), HFTokenizer)
  sp = tk.train_tokenizer(CORPUS * 20, tmp_path / "sp.model", vocab_size=330)
  sp.save(hf_dir)  # A directory: the SentencePiece file goes in as tokenizer.model and wins.
  assert isinstance(tk.load_tokenizer(hf_dir), tk.Tokenizer)
  assert tk.load_tokenizer(hf_dir) == sp and sp.chat_format.name == "jaxlm"


def test_bos_none_documents_and_truncation(tmp_path):
  from jaxlm import policy_eval
  from jaxlm.data import pipelines
  tok = tk.load_tokenizer(make_tokenizer_dir(tmp_path / "q", "chatml"))
  assert tok.bos_id is None and tok.pad_id != tok.eos_id
  example, _ = pipelines.render_document(tok, {"text": "Hello there"})
  assert example["inputs"][0] == tok.eos_id and example["targets"][-1] == tok.eos_id
  assert example["targets"].tolist() == tok.encode("Hello there") + [tok.eos_id]
  ids = np.arange(10, 20, dtype=np.int32)
  np.testing.assert_array_equal(policy_eval.left_truncate(ids, 4, bos_id=None), ids[-4:])
  np.testing.assert_array_equal(pipelines._fit_prompt(ids, 4, None), ids[-4:])
  np.testing.assert_array_equal(pipelines._fit_prompt(ids, 4, 10), [10, 17, 18, 19])
  prompt = tok.chat_format.render_prompt([{"role": "user", "content": "Hi there"}])
  example, truncated = pipelines.render_prompt_example(
      tok, {"prompt": [{"role": "user", "content": "Hi there"}]}, max_prompt_len=5,
      length_policy="truncate")
  assert truncated and example["prompt_tokens"].tolist() == prompt[-5:].tolist()


def test_no_chat_template_loads_but_cannot_chat(tmp_path):
  tok = tk.load_tokenizer(make_tokenizer_dir(tmp_path / "base", "llama3", template=None))
  assert tok.encode("Hello") and tok.bos_id is not None
  with pytest.raises(ValueError, match="no chat template"):
    tok.chat_format


def test_bad_files_are_named(tmp_path):
  directory = make_tokenizer_dir(tmp_path / "bad", "llama3")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|not_a_token|>"}, f)
  with pytest.raises(ValueError, match="tokenizer_config.json.*not_a_token"):
    tk.load_tokenizer(directory)
  with open(os.path.join(directory, "tokenizer.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    tk.load_tokenizer(directory)
