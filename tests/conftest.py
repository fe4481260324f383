"""Shared pytest setup.

Tests run on the CPU. A persistent XLA compilation cache under `.jax_cache/` (git-ignored) makes
repeated runs of the jitted tests cheap; CI starts cold and still fits its time budget.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))

import pytest

# A small world and a tokenizer trained on its text, shared by every test that needs real
# token ids: training SentencePiece once per session keeps the suite fast.
SMALL_WORLD = dict(seed=0, text_bytes=60_000, num_chats=300, num_preferences=300, num_prompts=100)


@pytest.fixture(scope="session")
def small_world():
  from jaxlm.data import world

  return world.WorldConfig(**SMALL_WORLD)


@pytest.fixture(scope="session")
def world_tokenizer(small_world, tmp_path_factory):
  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.data import world

  texts = [r["text"] for r in world.generate("text", "train", small_world)]
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size=512)
