"""The on-policy rollout layer: packing, G samples per prompt seeded per row, the trainer's
log-probs equal the sampler's, a scorer with no value model, and the rollout diagnostics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm import ppo
from jaxlm import rollout
from jaxlm import sharding

CONFIG = model_lib.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                               head_dim=16, mlp_dim=64, max_len=32)


def test_pack_sequences_places_each_reply_right_after_its_prompt():
  seqs = rollout.pack_sequences(jnp.asarray([[1, 4, 5, 0], [1, 6, 0, 0]]), jnp.asarray([3, 2]),
                                jnp.asarray([[9, 8, 0], [10, 0, 0]]), jnp.asarray([2, 1]))
  assert seqs["tokens"].tolist() == [[1, 4, 5, 9, 8, 0, 0], [1, 6, 10, 0, 0, 0, 0]]
  assert seqs["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
  assert seqs["response_index"].tolist() == [[3, 4, 5], [2, 3, 4]]
  assert seqs["last_index"].tolist() == [4, 2]


def _setup(seed=0, rows=16):
  params = sharding.unbox(model_lib.init_params(CONFIG, jax.random.key(seed)))
  prompts = np.zeros((rows, 4), np.int32)
  prompts[:, :3] = [1, 5, 6]
  prompts[::2, 3] = 9  # Two prompt lengths: ragged rows.
  lengths = np.where(np.arange(rows) % 2 == 0, 4, 3).astype(np.int32)
  return params, prompts, lengths


def _collect(params, prompts, lengths, rng, **kwargs):
  kwargs = {"temperature": 1.0, "max_new_tokens": 10, "stop_ids": (2,), **kwargs}
  return rollout.collect_rollout(params, prompts, lengths, rng, config=CONFIG, **kwargs)


def test_repeat_prompts_makes_contiguous_groups():
  tokens, lengths = rollout.repeat_prompts(np.asarray([[1, 4, 0], [1, 6, 7]]), np.asarray([2, 3]), 3)
  assert tokens.tolist() == [[1, 4, 0]] * 3 + [[1, 6, 7]] * 3 and lengths.tolist() == [2, 2, 2, 3, 3, 3]
  device_tokens, _ = rollout.repeat_prompts(jnp.asarray([[1, 4]]), jnp.asarray([2]), 2)
  assert isinstance(device_tokens, jax.Array) and device_tokens.tolist() == [[1, 4], [1, 4]]
  with pytest.raises(ValueError, match="group_size"):
    rollout.repeat_prompts(tokens, lengths, 0)


def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_batch():
  params, prompts, lengths = _setup(rows=3)
  prompts[1:, 1:3] = [[11, 12], [13, 14]]  # Three different prompts of the same width.
  group = 4
  batch = _collect(params, prompts, lengths, jax.random.key(3), group_size=group)
  assert batch["response_tokens"].shape == (3 * group, 10)
  np.testing.assert_array_equal(batch["prompt_tokens"], np.repeat(prompts, group, axis=0))
  # The first prompt alone: its sample g is what it drew as row g of the batch of three prompts.
  alone = _collect(params, prompts[:1], lengths[:1], jax.random.key(3), group_size=group)
  for key in ("response_tokens", "response_lengths", "mask", "sampler_log_probs"):
    np.testing.assert_array_equal(alone[key], batch[key][:group], err_msg=key)
  # Other prompts in the batch change nothing of it either.
  others = prompts.copy()
  others[1:, 1:3] = [[20, 21], [22, 23]]
  np.testing.assert_array_equal(
      _collect(params, others, lengths, jax.random.key(3), group_size=group)["response_tokens"][:group],
      batch["response_tokens"][:group])
  # The G samples of a prompt are G draws, not one draw repeated.
  assert len({tuple(row) for row in np.asarray(alone["response_tokens"]).tolist()}) > 1
  # One sample per prompt is the plain sampler call: row b's keys as before.
  single = _collect(params, prompts, lengths, jax.random.key(3))
  assert single["response_tokens"].shape == (3, 10)
  np.testing.assert_array_equal(single["response_tokens"][0], batch["response_tokens"][0])


def test_without_prompt_ids_row_r_is_seeded_by_its_position():
  """The default seeding, bit for bit: row r = b * G + g draws with fold_in(rng, r)."""
  from jaxlm import sampling
  params, prompts, lengths = _setup(rows=2)
  rng, group = jax.random.key(3), 3
  batch = _collect(params, prompts, lengths, rng, group_size=group)
  tokens, lengths_r = rollout.repeat_prompts(prompts, lengths, group)
  keys = jnp.stack([jax.random.fold_in(rng, r) for r in range(2 * group)])
  explicit = sampling.generate(params, tokens, lengths_r, keys, config=CONFIG, sampling=sampling.SamplingConfig(),
                               max_new_tokens=10, stop_ids=(2,))
  for key, field in (("response_tokens", "tokens"), ("sampler_log_probs", "log_probs"), ("mask", "mask"),
                     ("response_lengths", "lengths")):
    np.testing.assert_array_equal(batch[key], getattr(explicit, field), err_msg=key)


def _pad_rows(prompts, width):
  tokens = np.zeros((len(prompts), width), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def test_with_prompt_ids_a_prompts_samples_do_not_depend_on_its_batch_position_or_padding():
  from jaxlm import sampling
  params, _, _ = _setup()
  rng, group = jax.random.key(3), 4
  prompts = [[1, 5, 6, 9], [1, 11, 12], [1, 13]]
  ids = np.asarray([40, 41, 42], np.int32)  # e.g. the pipeline's record_index
  tokens, lengths = _pad_rows(prompts, 4)
  batch = _collect(params, tokens, lengths, rng, group_size=group, prompt_ids=ids)
  keys = ("response_tokens", "response_lengths", "mask", "sampler_log_probs")
  rows = lambda out, b: {k: np.asarray(out[k])[b * group:(b + 1) * group] for k in keys}

  def assert_same(got, want, what):
    for k in keys:
      if k == "sampler_log_probs":  # Other shapes may round differently in the last ulp.
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=f"{what}: {k}")
      else:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")

  # Row b * G + g's key is fold_in(fold_in(rng, id_b), g), bit for bit.
  explicit = jnp.stack([jax.random.fold_in(jax.random.fold_in(rng, int(i)), g) for i in ids for g in range(group)])
  np.testing.assert_array_equal(jax.random.key_data(rollout.prompt_row_keys(rng, ids, group)),
                                jax.random.key_data(explicit))
  out = sampling.generate(params, *rollout.repeat_prompts(tokens, lengths, group), explicit, config=CONFIG,
                          sampling=sampling.SamplingConfig(), max_new_tokens=10, stop_ids=(2,))
  np.testing.assert_array_equal(out.tokens, batch["response_tokens"])
  np.testing.assert_array_equal(out.log_probs, batch["sampler_log_probs"])
  # The middle prompt alone (host or device ids), and last in a larger, wider, reordered batch.
  alone = _collect(params, tokens[1:2], lengths[1:2], rng, group_size=group, prompt_ids=jnp.asarray(ids[1:2]))
  assert_same(rows(alone, 0), rows(batch, 1), "alone")
  shuffled = [prompts[2], [1, 30, 31, 32, 33], prompts[0], prompts[1]]
  wide = _collect(params, *_pad_rows(shuffled, 7), rng, group_size=group, prompt_ids=[42, 7, 40, 41])
  for b, was in ((0, 2), (2, 0), (3, 1)):
    assert_same(rows(wide, b), rows(batch, was), f"position {b}")
  # On a mesh (the rows and their keys split over the batch axes): the same samples.
  mesh = sharding.make_mesh({"data": -1})
  on_mesh = _collect(params, tokens, lengths, rng, group_size=group, prompt_ids=ids, mesh=mesh)
  for b in range(3):
    assert_same(rows(on_mesh, b), rows(batch, b), f"mesh row {b}")
  # The G samples of a prompt are G draws; other ids draw other samples.
  for b in range(3):
    assert len({tuple(r) for r in rows(batch, b)["response_tokens"].tolist()}) > 1
  other = _collect(params, tokens, lengths, rng, group_size=group, prompt_ids=ids + 1)
  assert (np.asarray(other["response_tokens"]) != np.asarray(batch["response_tokens"])).any()
  # Without ids the seeding is by position: other draws than by id.
  by_position = _collect(params, tokens, lengths, rng, group_size=group)
  assert (np.asarray(by_position["response_tokens"]) != np.asarray(batch["response_tokens"])).any()
  with pytest.raises(ValueError, match="prompt_ids"):
    _collect(params, tokens, lengths, rng, group_size=group, prompt_ids=ids[:2])


def test_trainer_log_probs_equal_the_samplers_at_temperature_one():
  params, prompts, lengths = _setup()
  batch = _collect(params, prompts, lengths, jax.random.key(1))
  scored = rollout.make_scorer(CONFIG, None, temperature=1.0)(params, params, None, batch)
  assert set(scored) == {"log_probs", "entropy", "ref_log_probs"}  # No value model, no reward model.
  gap = jnp.abs(scored["log_probs"] - batch["sampler_log_probs"]) * batch["mask"]
  assert float(gap.max()) < 1e-5
  assert float(jnp.abs(scored["log_probs"] - scored["ref_log_probs"]).max()) == 0.0  # pi == ref
  diagnostics = rollout.rollout_diagnostics(batch, scored)
  assert float(diagnostics["sampler_gap"]) < 1e-5 and float(diagnostics["kl"]) == 0.0
  assert float(diagnostics["kl_k3"]) == 0.0 and float(diagnostics["entropy"]) > 0
  assert float(diagnostics["length"]) == float(np.mean(batch["response_lengths"]))


def test_the_scorer_without_a_reference_or_critic_and_with_a_reward_model():
  params, prompts, lengths = _setup(rows=4)
  batch = _collect(params, prompts, lengths, jax.random.key(2), temperature=0.7)
  reward = model_lib.add_scalar_head(params, CONFIG, jax.random.key(5))
  full = rollout.make_scorer(CONFIG, CONFIG, temperature=0.7)(params, params, reward, batch)
  assert set(full) == {"log_probs", "entropy", "ref_log_probs", "score"} and full["score"].shape == (4,)
  policy_only = rollout.make_scorer(CONFIG, None, temperature=0.7)(params, None, None, batch)
  assert set(policy_only) == {"log_probs", "entropy"}
  np.testing.assert_allclose(policy_only["log_probs"], full["log_probs"], atol=1e-6)
  # The score is the reward model's scalar at each reply's last real token.
  seqs = rollout.pack_rollout(batch)
  np.testing.assert_allclose(full["score"], rollout.sequence_scores(model_lib.Transformer(CONFIG), reward, seqs),
                             atol=1e-6)
  # PPO composes the same scorer with its critic: the shared outputs are unchanged, values added.
  value = model_lib.add_scalar_head(params, CONFIG, jax.random.key(6))
  with_values = ppo.make_scorer(CONFIG, CONFIG, ppo.PPOConfig(temperature=0.7))(params, params, value, reward, batch)
  assert set(with_values) == set(full) | {"values"}
  for key in full:
    np.testing.assert_allclose(with_values[key], full[key], atol=1e-6, err_msg=key)
  assert np.all(np.asarray(with_values["values"])[~np.asarray(batch["mask"])] == 0)


def test_sampler_gap_reads_only_emitted_tokens():
  mask = jnp.asarray([[True, True, False]])
  gap = rollout.sampler_gap(log_probs=jnp.asarray([[-1.0, -2.0, -9.0]]),
                            sampler_log_probs=jnp.asarray([[-1.0, -2.5, 0.0]]), mask=mask)
  assert float(gap) == 0.5


@dataclasses.dataclass
class _Reply:
  text: str
  ended_turn: bool


class _Format:
  """A chat format whose end of turn is id 2 and whose other stop is id 3."""

  def parse_reply(self, ids):
    ids = list(ids)
    stop = next((i for i, t in enumerate(ids) if t in (2, 3)), None)
    body = ids if stop is None else ids[:stop]
    return _Reply(" ".join(map(str, body)), stop is not None and ids[stop] == 2)


class _Tokenizer:
  chat_format = _Format()


def test_decoded_replies_and_their_end_rate():
  tokens = np.asarray([[5, 6, 2, 0], [5, 3, 0, 0], [7, 7, 7, 7]])
  lengths = np.asarray([3, 2, 4])
  texts, ended = rollout.decode_replies(_Tokenizer(), tokens, lengths)
  assert texts == ["5 6", "5", "7 7 7 7"] and ended.tolist() == [True, False, False]
  metrics = rollout.reply_diagnostics(ended=ended, response_lengths=lengths, generate_seconds=2.0)
  assert metrics == {"end_rate": 1 / 3, "rollout_tokens_per_s": 4.5}


def test_kl_alarm_flags_negative_runaway_and_non_finite_kl():
  assert rollout.kl_alarm(0.3, min_kl=-1.0, max_kl=100.0) is None
  assert "disagree in sign" in rollout.kl_alarm(-2.0, min_kl=-1.0, max_kl=100.0)
  assert "run away" in rollout.kl_alarm(500.0, min_kl=-1.0, max_kl=100.0)
  assert "nan" in rollout.kl_alarm(float("nan"), min_kl=-1.0, max_kl=100.0)
