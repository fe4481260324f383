"""jaxlm.inference on the session's tiny pretraining run: loading any run directory, streaming
equals batch generation, prompts that outgrow the context, and errors that name the path."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm import inference
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm.tokenizer import ROLE_IDS

from conftest import PRETRAIN_STEPS

GREEDY = sampling.SamplingConfig(greedy=True)
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Which animal says moo?"},
     {"role": "assistant", "content": "A cow."},
     {"role": "user", "content": "And how many legs does it have?"}],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def loaded(tiny_pretrain_run):
  return inference.load_run(tiny_pretrain_run[0])


def _stream(loaded, messages, **kwargs):
  """(pieces, summary) of one `stream_reply`."""
  pieces = []
  generator = inference.stream_reply(loaded, messages, **kwargs)
  while True:
    try:
      pieces.append(next(generator))
    except StopIteration as stop:
      return pieces, stop.value


def _assert_same_replies(got, want):
  """Equal texts, flags and counts; log-probs equal up to float32 summation order."""
  assert [{k: v for k, v in r.items() if k != "log_prob"} for r in got] == \
      [{k: v for k, v in r.items() if k != "log_prob"} for r in want]
  np.testing.assert_allclose([r["log_prob"] for r in got], [r["log_prob"] for r in want],
                             rtol=1e-4, atol=1e-4)


def test_load_run_reads_the_latest_checkpoint(loaded, tiny_pretrain_run):
  workdir = tiny_pretrain_run[0]
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert loaded.stage == "pretrain" and loaded.complete and loaded.step == PRETRAIN_STEPS
  assert loaded.workdir == str(workdir) and loaded.manifest == manifest
  assert loaded.model_config == model_lib.ModelConfig.from_dict(manifest["model_config"])
  assert loaded.tokenizer.content_hash == manifest["tokenizer_hash"]
  leaves = jax.tree.leaves(loaded.params)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)  # plain and on device
  np.testing.assert_array_equal(loaded.params["embed"]["embedding"],
                                checkpoint.load_parent(workdir).params["embed"]["embedding"])


def test_stream_reply_equals_batch_replies(loaded):
  # Chunks of 2, so the last one is padded: padding rows must not change a reply.
  batch = inference.batch_replies(loaded, PROMPTS, sampling=GREEDY, max_new_tokens=24,
                                  batch_size=2)
  for messages, want in zip(PROMPTS, batch):
    pieces, got = _stream(loaded, messages, sampling=GREEDY, max_new_tokens=24)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == got["text"] == want["text"]
    assert (got["ended_turn"], got["num_tokens"]) == (want["ended_turn"], want["num_tokens"])
    assert 1 <= got["num_tokens"] <= 24 and got["log_prob"] < 0
    assert got["log_prob"] == pytest.approx(want["log_prob"], rel=1e-4, abs=1e-4)

  # Sampled: the stream draws what `generate` draws for row 0 of a chunk with the same key
  # (jaxlm.sampling's per-row key rule), so the two paths sample the same distribution.
  hot = sampling.SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)
  want = inference.batch_replies(loaded, PROMPTS[:1], sampling=hot, max_new_tokens=24, seed=7)[0]
  pieces, got = _stream(loaded, PROMPTS[0], sampling=hot, max_new_tokens=24,
                        rng=jax.random.fold_in(jax.random.key(7), 0))
  assert "".join(pieces) == got["text"] == want["text"]
  assert got["num_tokens"] == want["num_tokens"]
  assert got["log_prob"] == pytest.approx(want["log_prob"], rel=1e-4, abs=1e-4)


def test_a_prompt_longer_than_the_context_keeps_its_end(loaded):
  long_prompt = [{"role": "user", "content": "the cat sat on the mat " * 200}]
  assert not inference.fits(loaded, long_prompt, max_new_tokens=16)
  assert inference.fits(loaded, PROMPTS[0], max_new_tokens=16)
  ids = inference.prompt_ids(loaded, long_prompt, max_new_tokens=16)
  assert len(ids) == loaded.model_config.max_len - 16 and ids[-1] == ROLE_IDS["assistant"]
  reply = inference.batch_replies(loaded, [long_prompt], sampling=GREEDY, max_new_tokens=16)[0]
  assert 1 <= reply["num_tokens"] <= 16
  with pytest.raises(ValueError, match="max_new_tokens must be in"):
    inference.prompt_ids(loaded, PROMPTS[0], max_new_tokens=loaded.model_config.max_len)


def test_load_run_errors_name_the_path_and_what_was_expected(tmp_path, tiny_pretrain_run):
  with pytest.raises(FileNotFoundError, match="run directory not found: .*nowhere"):
    inference.load_run(tmp_path / "nowhere")
  (tmp_path / "plain").mkdir()
  with pytest.raises(FileNotFoundError, match="plain is not a jaxlm run directory: "
                                              ".*plain/manifest.json is missing"):
    inference.load_run(tmp_path / "plain")
  # A run that has not reached its first checkpoint: everything but checkpoints/.
  started = tmp_path / "started"
  shutil.copytree(tiny_pretrain_run[0], started, ignore=shutil.ignore_patterns("checkpoints"))
  with pytest.raises(FileNotFoundError, match="started has no checkpoint yet .*checkpoints/<step>"):
    inference.load_run(started)


def test_a_reward_run_loads_and_its_tied_lm_head_still_generates(tmp_path, loaded):
  # A reward run's tree is the transformer plus a scalar head; build one from the tiny run.
  run = checkpoint.RunDir(tmp_path / "reward")
  run.write_config({"stage": "reward"})
  run.save_tokenizer(loaded.tokenizer)
  run.write_manifest(stage="reward", parent=loaded.workdir, config={"stage": "reward"},
                     tokenizer_hash=loaded.tokenizer.content_hash, data_source="test",
                     model_config=loaded.model_config)
  params = model_lib.add_scalar_head(loaded.params, loaded.model_config, jax.random.key(0))
  with checkpoint.Checkpointer(run.workdir) as ckpt:
    ckpt.save(5, {"params": params}, data_state=None)
  reward = inference.load_run(run.workdir)
  assert reward.stage == "reward" and reward.step == 5 and not reward.complete
  assert "scalar_head" in reward.params and "reward" not in inference.POLICY_STAGES
  # The LM head is the tied embedding, unchanged, so the replies are the pretrained model's.
  # (The shapes of test_stream_reply_equals_batch_replies: its compilation is reused.)
  replies = [inference.batch_replies(run, PROMPTS[:2], sampling=GREEDY, max_new_tokens=24,
                                     batch_size=2) for run in (loaded, reward)]
  _assert_same_replies(*replies)
