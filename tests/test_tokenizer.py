"""Tests for jaxlm.tokenizer: fixed special ids, round trips, determinism, loading errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm import tokenizer as tk
from jaxlm.tokenizer import Tokenizer, train_tokenizer

VOCAB = 512


def english_corpus(num_chars: int = 100_000, seed: int = 0) -> list[str]:
  """A small synthetic English-like corpus: Zipfian words, sentences, numbers, paragraphs."""
  rng = random.Random(seed)
  common = ("the of and to a in is it that was for on with as he she they we you this "
            "model learns every token from data cat dog house ran sat big small red").split()
  consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
  rare = ["".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
          for _ in range(600)]
  words = common + rare
  weights = [1.0 / (i + 1) for i in range(len(words))]
  texts, total = [], 0
  while total < num_chars:
    sentences = []
    for _ in range(rng.randint(1, 5)):
      sentence = " ".join(rng.choices(words, weights, k=rng.randint(3, 14)))
      if rng.random() < 0.3:
        sentence += f", {rng.randint(0, 9999)} times"
      sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!,"))
    text = " ".join(sentences)
    if rng.random() < 0.3:
      text += "\n\n" + " ".join(rng.choices(words, weights, k=6)) + "."
    texts.append(text)
    total += len(text)
  return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  return english_corpus()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(corpus, model_dir) -> Tokenizer:
  start = time.perf_counter()
  tokenizer = train_tokenizer(corpus, os.path.join(model_dir, "tok.model"), vocab_size=VOCAB)
  # The brief: a test-sized vocabulary on ~100 KB trains in well under 5 s (it takes ~0.05 s).
  assert time.perf_counter() - start < 5.0
  return tokenizer


def test_special_ids_are_fixed(tok):
  assert (tk.PAD_ID, tk.BOS_ID, tk.EOS_ID, tk.UNK_ID) == (0, 1, 2, 3)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.end_of_turn_id) == (0, 1, 2, 3, 7)
  assert [tok.role_id(r) for r in ("system", "user", "assistant")] == [4, 5, 6]
  expected = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
  assert [tok.id_to_piece(i) for i in range(8)] == expected
  assert tk.ROLE_TOKENS == {
      "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
  assert tk.END_OF_TURN == "<|end|>"
  assert tok.vocab_size == VOCAB
  with pytest.raises(ValueError, match="unknown role"):
    tok.role_id("tool")


def test_round_trip_ordinary_text(tok, corpus):
  for text in corpus[:50] + ["The model learns every token.", "A brand new sentence, 2024 times!"]:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and tk.NUM_SPECIAL_IDS <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_fallback_round_trips_unseen_unicode(tok):
  text = "naïve café — 日本語のテキスト 🙂🚀 Ελληνικά ∑x² \u200b end"
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # Spelled as UTF-8 bytes.
  assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [
    "", " ", "   ", "  leading spaces", "trailing spaces   ", "a  b   c    d", "tab\tseparated\t",
    "line\nbreak", "\n\nparagraphs\n\n\n", "windows\r\nline", "    indented code\n        deeper",
    "\u00a0no-break\u3000ideographic", "full\uff37idth \ufb01ligature",  # identity: no NFKC folding
])
def test_round_trip_whitespace_and_unnormalised_text(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_in_text_are_plain_text(tok):
  text = "<|end|> <|user|>hi<|assistant|><|system|> <s></s><pad><unk>"
  ids = tok.encode(text)
  assert not set(ids) & set(range(tk.NUM_SPECIAL_IDS))
  assert tok.end_of_turn_id not in ids
  assert tok.decode(ids) == text
  assert tok.end_of_turn_id not in sum(tok.encode_batch(["<|end|>", "x<|end|>y"]), [])


def test_decode_drops_markup_ids(tok):
  text = "The cat sat."
  ids = [tok.bos_id, tok.role_id("assistant"), *tok.encode(text), tok.end_of_turn_id, tok.eos_id,
         tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.decode([]) == ""
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([5, tok.vocab_size])
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([-1])


def test_encode_batch_matches_encode(tok, corpus):
  texts = corpus[:20] + ["", "  x  ", "日本"]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.encode_batch([]) == []
  with pytest.raises(TypeError):
    tok.encode_batch(["a", b"b"])


def test_training_is_deterministic_and_path_independent(corpus, tmp_path, tok, model_dir):
  a = train_tokenizer(corpus, tmp_path / "a" / "x.model", vocab_size=VOCAB)
  b = train_tokenizer(iter(corpus), tmp_path / "b.model", vocab_size=VOCAB)
  first = (tmp_path / "a" / "x.model").read_bytes()
  assert first == (tmp_path / "b.model").read_bytes()
  assert first == open(os.path.join(model_dir, "tok.model"), "rb").read()
  assert a.content_hash == b.content_hash == tok.content_hash == hashlib.sha256(first).hexdigest()
  assert a.model_bytes == first
  assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # No temporary files left over.


def test_unigram_training_is_deterministic(corpus, tmp_path):
  kwargs = dict(vocab_size=VOCAB, model_type="unigram")
  a = train_tokenizer(corpus[:300], tmp_path / "a.model", **kwargs)
  b = train_tokenizer(corpus[:300], tmp_path / "b.model", **kwargs)
  assert a.model_bytes == b.model_bytes
  assert a.decode(a.encode(corpus[0])) == corpus[0]


def test_content_hash_changes_with_the_model(corpus, tmp_path, tok):
  other_vocab = train_tokenizer(corpus, tmp_path / "a.model", vocab_size=VOCAB - 12)
  other_corpus = train_tokenizer(english_corpus(seed=1), tmp_path / "b.model", vocab_size=VOCAB)
  hashes = {tok.content_hash, other_vocab.content_hash, other_corpus.content_hash}
  assert len(hashes) == 3
  assert tok != other_vocab and tok == Tokenizer.from_bytes(tok.model_bytes)


def test_max_texts_caps_the_corpus(corpus, tmp_path):
  capped = train_tokenizer(corpus, tmp_path / "a.model", vocab_size=400, max_texts=200)
  prefix = train_tokenizer(corpus[:200], tmp_path / "b.model", vocab_size=400)
  assert capped.model_bytes == prefix.model_bytes


def test_sentence_sampling_is_seeded(corpus, tmp_path):
  sample = dict(vocab_size=400, input_sentence_size=300)  # Fewer than the corpus's texts.
  a = train_tokenizer(corpus, tmp_path / "a.model", seed=1, **sample)
  b = train_tokenizer(corpus, tmp_path / "b.model", seed=1, **sample)
  c = train_tokenizer(corpus, tmp_path / "c.model", seed=2, **sample)
  assert a.model_bytes == b.model_bytes != c.model_bytes
  sentences = tk._training_sentences(iter(corpus), None, 300, seed=1)
  assert len(sentences) == 300 and set(sentences) <= set(corpus)
  # Below the limit there is no sampling: every text, in order.
  assert tk._training_sentences(corpus, None, 10_000, seed=1) == corpus


def test_training_is_deterministic_across_processes(corpus, tmp_path):
  # Random state that lives in the process (SentencePiece's own sampler is one) only shows up
  # when two processes are compared.
  script = (
      "import sys; sys.path[:0] = sys.argv[1:3]\n"
      "from test_tokenizer import english_corpus\n"
      "from jaxlm.tokenizer import train_tokenizer\n"
      "for kind in ('bpe', 'unigram'):\n"
      "  t = train_tokenizer(english_corpus(), sys.argv[3] + kind, vocab_size=400,\n"
      "                      model_type=kind, input_sentence_size=300, seed=1)\n"
      "  print(t.content_hash)\n")
  here = os.path.dirname(os.path.abspath(__file__))
  argv = [sys.executable, "-c", script, here, os.path.dirname(here), str(tmp_path / "sub")]
  result = subprocess.run(argv, capture_output=True, text=True, check=True)
  expected = [train_tokenizer(corpus, tmp_path / kind, vocab_size=400, model_type=kind,
                              input_sentence_size=300, seed=1).content_hash
              for kind in ("bpe", "unigram")]
  assert result.stdout.split() == expected


def test_save_load_and_pickle(tok, tmp_path):
  path = tmp_path / "sub" / "tokenizer.model"
  tok.save(path)
  assert path.read_bytes() == tok.model_bytes
  loaded = Tokenizer.load(path)
  assert loaded == tok and loaded.content_hash == tok.content_hash
  assert Tokenizer.load(str(path)).encode("a cat") == tok.encode("a cat")
  clone = pickle.loads(pickle.dumps(tok))
  assert clone == tok and clone.encode("the dog ran") == tok.encode("the dog ran")
  assert os.listdir(path.parent) == ["tokenizer.model"]


def test_load_errors_name_the_path(tmp_path, corpus):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    Tokenizer.load(missing)
  corrupt = tmp_path / "corrupt.model"
  corrupt.write_bytes(b"\x00 definitely not a protobuf \xff" * 10)
  with pytest.raises(ValueError, match=str(corrupt)):
    Tokenizer.load(corrupt)
  # A valid SentencePiece model with another id layout is refused, not silently misused.
  import sentencepiece as spm
  foreign = tmp_path / "foreign"
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(corpus), model_prefix=str(foreign),
                                 vocab_size=300, minloglevel=2)
  with pytest.raises(ValueError, match="not a jaxlm tokenizer"):
    Tokenizer.load(f"{foreign}.model")


def test_char_model_type(corpus, tmp_path):
  char = train_tokenizer(corpus, tmp_path / "char.model", vocab_size=1000, model_type="char")
  assert char == Tokenizer.load(tmp_path / "char.model")
  assert [char.id_to_piece(i) for i in range(4, 8)] == [*tk.ROLE_TOKENS.values(), tk.END_OF_TURN]
  assert char.vocab_size < 1000  # Specials + bytes + the corpus's characters.
  text = "The cat sat, 42 times!"
  pieces = [char.id_to_piece(i) for i in char.encode(text)]
  assert all(len(p) == 1 for p in pieces)
  assert char.decode(char.encode(text)) == text
  assert char.decode(char.encode("日本 🙂")) == "日本 🙂"


def test_without_byte_fallback_unseen_chars_are_unk(corpus, tmp_path):
  tok = train_tokenizer(corpus, tmp_path / "nobytes.model", vocab_size=300, byte_fallback=False)
  assert tok.unk_id in tok.encode("日本")
  assert not any(tok.id_to_piece(i).startswith("<0x") for i in range(tok.vocab_size))


def test_training_errors(corpus, tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    train_tokenizer(corpus, tmp_path / "a.model", vocab_size=VOCAB, model_type="wordpiece")
  with pytest.raises(ValueError, match="vocab_size"):
    train_tokenizer(corpus, tmp_path / "a.model", vocab_size=100)  # < 8 + 256 bytes + chars
  with pytest.raises(ValueError, match="no training texts"):
    train_tokenizer([], tmp_path / "a.model", vocab_size=VOCAB)
  with pytest.raises(TypeError, match="str"):
    train_tokenizer(["fine", 3], tmp_path / "a.model", vocab_size=VOCAB)
  assert not (tmp_path / "a.model").exists()


def test_long_texts_are_chunked_not_dropped():
  text = ("word " * 3000 + "\n") * 5 + "x" * 50_000
  chunks = list(tk._chunks(text, 8192))
  assert "".join(chunks) == text
  assert all(len(c.encode("utf-8")) <= 8192 for c in chunks)
  wide = "日" * 10_000
  assert "".join(tk._chunks(wide, 8192)) == wide
  assert all(len(c.encode("utf-8")) <= 8192 for c in tk._chunks(wide, 8192))
