"""PPO scoring, the rollout layer's scorer without a critic and the DPO reference pass run on
the mesh: on 8 fake CPU devices (batch split over data x fsdp, parameters sharded as in
training) they give the 1-device values, the compiled scorer all-reduces nothing of logits
size, and its per-device temporaries fall with the devices.

One subprocess: XLA reads the fake-device count once per process.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
  import functools
  import jax, jax.numpy as jnp, numpy as np
  from jaxlm import dpo, hlo_stats, model as model_lib, ppo, rollout as rollout_lib, sharding
  from jaxlm.data import pipelines

  assert len(jax.devices()) == 8
  # Activations, not weights, dominate the scorer's memory at this shape, as at real ones.
  config = model_lib.ModelConfig(vocab_size=2048, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=64, mlp_dim=512, max_len=128)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  init = lambda seed, head=False: sharding.unbox(model_lib.init_params(config, jax.random.key(seed), scalar_head=head))
  abstract = jax.eval_shape(functools.partial(model_lib.init_params, config), jax.random.key(0))
  abstract_head = jax.eval_shape(functools.partial(model_lib.init_params, config, scalar_head=True),
                                 jax.random.key(0))
  on_mesh = lambda tree, like: jax.device_put(tree, sharding.logical_shardings(like, mesh))
  policy, reference, value, reward = init(0), init(1), init(2, True), init(3, True)
  placed = (on_mesh(policy, abstract), on_mesh(reference, abstract), on_mesh(value, abstract_head),
            on_mesh(reward, abstract_head))
  assert placed[0]["layers"]["mlp"]["up"]["kernel"].addressable_shards[0].data.size < policy["layers"]["mlp"]["up"]["kernel"].size

  # A rollout of 64 rows with ragged prompts and replies.
  rng = np.random.default_rng(0)
  rows, prompt_width, new = 64, 96, 32
  prompt_lengths = rng.integers(3, prompt_width + 1, rows).astype(np.int32)
  response_lengths = rng.integers(1, new + 1, rows).astype(np.int32)
  prompt_tokens = rng.integers(1, 2048, (rows, prompt_width)).astype(np.int32)
  prompt_tokens[np.arange(prompt_width)[None] >= prompt_lengths[:, None]] = 0
  mask = np.arange(new)[None] < response_lengths[:, None]
  response_tokens = np.where(mask, rng.integers(1, 2048, (rows, new)), 0).astype(np.int32)
  rollout = dict(prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths, response_tokens=response_tokens,
                 response_lengths=response_lengths, mask=mask)

  settings = ppo.PPOConfig(temperature=0.7)
  alone = ppo.make_scorer(config, config, settings)(policy, reference, value, reward,
                                                    jax.device_put(rollout, jax.devices()[0]))
  scorer = ppo.make_scorer(config, config, settings, mesh=mesh)
  sharded = scorer(*placed, rollout)
  assert sharded["log_probs"].sharding.spec[0] == ("data", "fsdp"), sharded["log_probs"].sharding
  for key in ("log_probs", "entropy", "ref_log_probs", "values", "score"):
    np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(alone[key]), atol=2e-5, rtol=1e-5, err_msg=key)
  assert np.all(np.asarray(sharded["log_probs"])[~mask] == 0) and np.any(np.asarray(sharded["log_probs"]) != 0)
  # The rollout layer's scorer, with no value model (GRPO's): PPO's numbers, rows split alike.
  neutral = rollout_lib.make_scorer(config, config, temperature=0.7, mesh=mesh)(placed[0], placed[1], placed[3],
                                                                                rollout)
  assert set(neutral) == {"log_probs", "entropy", "ref_log_probs", "score"}
  assert neutral["log_probs"].sharding.spec[0] == ("data", "fsdp"), neutral["log_probs"].sharding
  for key in neutral:
    np.testing.assert_allclose(np.asarray(neutral[key]), np.asarray(alone[key]), atol=2e-5, rtol=1e-5, err_msg=key)

  # The compiled scorer: no all-reduce as large as one device's logits [rows/8, new, vocab] f32.
  abstract_rollout = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rollout.items()}
  with sharding.use_mesh(mesh):
    compiled = scorer.jitted.lower(*placed, abstract_rollout).compile()
  logits_bytes = rows // 8 * new * config.vocab_size * 4
  reduced = hlo_stats.hlo_stats(compiled.as_text()).collectives.get("all-reduce", (0, 0))
  assert reduced[1] < logits_bytes, (reduced, logits_bytes)
  # Per-device temporaries: 8 devices hold well under a quarter of one device's.
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  single = ppo.make_scorer(config, config, settings, mesh=one)
  on_one = lambda tree, like: jax.device_put(tree, sharding.logical_shardings(like, one))
  with sharding.use_mesh(one):
    compiled_one = single.jitted.lower(on_one(policy, abstract), on_one(reference, abstract),
                                       on_one(value, abstract_head), on_one(reward, abstract_head),
                                       abstract_rollout).compile()
  temp_8, temp_1 = compiled.memory_analysis().temp_size_in_bytes, compiled_one.memory_analysis().temp_size_in_bytes
  assert temp_8 < temp_1 / 4, (temp_8, temp_1)

  # The DPO reference pass: the same log-probs on the mesh as on one device.
  def pair(prompt, chosen, rejected):
    return pipelines.shared_pair_example(np.asarray(prompt), np.asarray(chosen), np.asarray(rejected),
                                         max_len=32, score_len=20)
  examples = [pair(rng.integers(1, 2048, rng.integers(2, 8)), rng.integers(1, 2048, rng.integers(1, 9)),
                   rng.integers(1, 2048, rng.integers(1, 9))) for _ in range(rows)]
  batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  expected = dpo.reference_fn(config)(reference, batch)
  ref = dpo.reference_fn(config, mesh=mesh)
  got = ref(placed[1], batch)
  assert got[0].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(ref.to_host(got), expected):
    np.testing.assert_allclose(a, np.asarray(b), atol=2e-5, rtol=1e-5)
  table = dpo.precompute_reference(placed[1], config, [{**batch, "record_index": np.arange(rows)}], rows, mesh=mesh)
  np.testing.assert_allclose(table, np.stack([np.asarray(x) for x in expected], axis=1), atol=2e-5, rtol=1e-5)
  print("OK", reduced, logits_bytes, temp_8, temp_1)
""")


def test_ppo_scorer_and_dpo_reference_on_eight_fake_devices_equal_one_device():
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=path)
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
