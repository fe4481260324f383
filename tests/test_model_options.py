"""The architecture options of imported Hugging Face models: q/k/v biases (Qwen2), q/k norms
(Qwen3), RoPE scaling (Llama 3.1+), and the RMSNorm rounding order of a bf16 model.

What transformers computes is checked here with numbers written down from it by hand (no torch in
the tests): the RoPE frequencies. The rest is checked against numpy references of the math.
"""

import functools
import itertools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxlm import attention
from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import param_tree
from jaxlm import sampling

# head_dim 16 != embed_dim / num_heads = 8 (as Mistral Nemo's 128 != 5120 / 32).
CONFIG = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, mlp_dim=48, max_len=32,
                               attention_impl="xla")
# Llama 3's scaling squeezed into a short context: with theta 1e4 and Dh 16 the wavelengths
# 2 pi 1e4^(i/8) fall in all three of its bands (< 4 kept, 4..16 smoothed, > 16 stretched).
LLAMA3_SMALL = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
ALL_OPTIONS = CONFIG.replace(qkv_bias=True, qk_norm=True, rope_scaling=LLAMA3_SMALL)


def _init(config, seed=0, scalar_head=False):
  return nn.meta.unbox(model_lib.init_params(config, jax.random.key(seed), scalar_head=scalar_head))


def _perturbed(params, seed=1):
  """`params` with random biases and norm scales (they start at 0 and 1, which hides mistakes)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  def change(path, leaf, key):
    name = path[-1].key
    noise = jax.random.normal(key, leaf.shape)
    if name == "bias":
      return 0.5 * noise
    if name == "scale":
      return leaf + 0.3 * noise
    return leaf
  return jax.tree_util.tree_unflatten(
      treedef, [change(path, leaf, key) for (path, leaf), key in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnames=("config",))
def _apply(config, params, tokens, **kwargs):
  return model_lib.Transformer(config).apply({"params": params}, tokens, **kwargs)


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, CONFIG.vocab_size, dtype=jnp.int32)


def _boxed_shapes(config):
  return jax.eval_shape(lambda r: model_lib.init_params(config, r), jax.random.key(0))


# --- parameters ------------------------------------------------------------------------------


def test_each_option_adds_its_parameters_with_their_logical_names():
  c = CONFIG
  L, H, Hkv, Dh = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
  plain = _boxed_shapes(c)["layers"]["attn"]
  assert set(plain["q"]) == {"kernel"} and "q_norm" not in plain

  attn = _boxed_shapes(c.replace(qkv_bias=True))["layers"]["attn"]
  for name, heads in (("q", H), ("k", Hkv), ("v", Hkv)):
    bias = attn[name]["bias"]
    assert bias.value.shape == (L, heads, Dh) and bias.names == ("layers", "heads", "kv")
  assert set(attn["o"]) == {"kernel"}  # no bias on the output projection
  assert "q_norm" not in attn

  attn = _boxed_shapes(c.replace(qk_norm=True))["layers"]["attn"]
  for name in ("q_norm", "k_norm"):
    scale = attn[name]["scale"]
    assert scale.value.shape == (L, Dh) and scale.names == ("layers", "kv")
  assert set(attn["q"]) == {"kernel"}

  # Unscanned: the same per layer, without the leading axis.
  attn = _boxed_shapes(ALL_OPTIONS.replace(scan_layers=False))["layers_1"]["attn"]
  assert attn["k"]["bias"].value.shape == (Hkv, Dh) and attn["k"]["bias"].names == ("heads", "kv")
  assert attn["k_norm"]["scale"].value.shape == (Dh,) and attn["k_norm"]["scale"].names == ("kv",)
  # RoPE scaling has no parameters.
  assert (jax.tree.structure(_boxed_shapes(c.replace(rope_scaling=LLAMA3_SMALL)))
          == jax.tree.structure(_boxed_shapes(c)))


def test_new_parameters_start_at_zero_and_one_and_are_not_decayed():
  params = _init(ALL_OPTIONS)
  attn = params["layers"]["attn"]
  for name in ("q", "k", "v"):
    np.testing.assert_array_equal(attn[name]["bias"], 0.0)
  for name in ("q_norm", "k_norm"):
    np.testing.assert_array_equal(attn[name]["scale"], 1.0)
  mask = param_tree.decay_mask(params)["layers"]["attn"]
  assert mask["q"]["kernel"] and not mask["q"]["bias"] and not mask["q_norm"]["scale"]


@pytest.mark.parametrize("qkv_bias, qk_norm, tie_embeddings, scan_layers",
                         list(itertools.product([False, True], repeat=4)))
def test_num_params_equals_the_tree_for_every_combination(qkv_bias, qk_norm, tie_embeddings,
                                                          scan_layers):
  config = CONFIG.replace(qkv_bias=qkv_bias, qk_norm=qk_norm, tie_embeddings=tie_embeddings,
                          scan_layers=scan_layers, rope_scaling=LLAMA3_SMALL)
  for scalar_head in (False, True):
    abstract = jax.eval_shape(
        lambda r, s=scalar_head: model_lib.init_params(config, r, scalar_head=s), jax.random.key(0))
    actual = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    assert model_lib.num_params(config, scalar_head=scalar_head) == actual
  # The counts grow by exactly the new parameters, and FLOPs by 6 per parameter.
  c = config
  extra = c.num_layers * ((c.head_dim * (c.num_heads + 2 * c.num_kv_heads) if qkv_bias else 0)
                          + (2 * c.head_dim if qk_norm else 0))
  base = config.replace(qkv_bias=False, qk_norm=False)
  assert model_lib.num_params(config) == model_lib.num_params(base) + extra
  assert model_lib.flops_per_token(config, 16) == model_lib.flops_per_token(base, 16) + 6 * extra


def test_stacking_and_unstacking_carry_the_new_parameters():
  params = _perturbed(_init(ALL_OPTIONS))
  unscanned = param_tree.unstack_layers(params)
  np.testing.assert_array_equal(unscanned["layers_1"]["attn"]["v"]["bias"],
                                params["layers"]["attn"]["v"]["bias"][1])
  jax.tree.map(np.testing.assert_array_equal, param_tree.stack_layers(unscanned), params)
  tokens = _tokens((2, 8))
  unscanned_logits = _apply(ALL_OPTIONS.replace(scan_layers=False), unscanned, tokens).logits
  np.testing.assert_allclose(unscanned_logits, _apply(ALL_OPTIONS, params, tokens).logits, atol=1e-5)


# --- what each option computes ---------------------------------------------------------------


def test_zero_biases_equal_the_model_without_biases():
  params = _init(CONFIG.replace(qkv_bias=True))  # biases start at zero
  attn = params["layers"]["attn"]
  plain = {**params, "layers": {**params["layers"], "attn": {
      name: {"kernel": attn[name]["kernel"]} for name in ("q", "k", "v", "o")}}}
  tokens = _tokens((2, 8))
  with_bias = _apply(CONFIG.replace(qkv_bias=True), params, tokens).logits
  np.testing.assert_array_equal(with_bias, _apply(CONFIG, plain, tokens).logits)
  # Not vacuous: nonzero biases change the logits.
  changed = _apply(CONFIG.replace(qkv_bias=True), _perturbed(params), tokens).logits
  assert not np.allclose(changed, with_bias, atol=1e-3)


def _reference_attention(x, p, config, positions):
  """The attention layer in float64 numpy, written from the formulas: x [B, T, E] -> [B, T, E]."""
  c = config
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  def project(name):
    y = np.einsum("bte,ehd->bthd", x, p[name]["kernel"])
    return y + p[name]["bias"] if c.qkv_bias else y
  q, k, v = project("q"), project("k"), project("v")
  if c.qk_norm:
    norm = lambda y, s: y / np.sqrt(np.mean(y ** 2, axis=-1, keepdims=True) + c.norm_eps) * s
    q, k = norm(q, p["q_norm"]["scale"]), norm(k, p["k_norm"]["scale"])
  angles = positions[:, :, None, None] * attention.rope_frequencies(
      c.head_dim, c.rope_theta, c.rope_scaling).astype(np.float64)
  def rotate(y):  # transformers' y * cos + rotate_half(y) * sin
    y1, y2 = np.split(y, 2, axis=-1)
    return np.concatenate([y1 * np.cos(angles) - y2 * np.sin(angles),
                           y2 * np.cos(angles) + y1 * np.sin(angles)], axis=-1)
  q, k = rotate(q), rotate(k)
  groups = c.num_heads // c.num_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
  length = x.shape[1]
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np.einsum("bqhd,hde->bqe", out, p["o"]["kernel"])


def _attention_layer(config, params, x, positions):
  """`model.Attention` of layer 0 alone (no cache), float32."""
  p = jax.tree.map(lambda a: a[0], params["layers"]["attn"])
  rope = attention.rope_tables(positions, config.head_dim, config.rope_theta, config.max_len,
                               config.rope_scaling)
  y, _ = model_lib.Attention(config).apply({"params": p}, x, rope, None, None, 0, None)
  return np.asarray(y), p


@pytest.mark.parametrize("config, perturb", [
    (CONFIG.replace(qk_norm=True), False),  # unit scales: q, k normalised and nothing else
    (CONFIG.replace(qk_norm=True), True),
    (CONFIG.replace(qkv_bias=True), True),
    (ALL_OPTIONS, True),
])
def test_attention_layer_equals_the_formulas(config, perturb):
  params = _init(config)
  params = _perturbed(params) if perturb else params
  x = jax.random.normal(jax.random.key(3), (2, 9, config.embed_dim))
  positions = jnp.array([list(range(9)), list(range(20, 29))])  # beyond the smoothed band too
  y, p = _attention_layer(config, params, x, positions)
  expected = _reference_attention(np.asarray(x, np.float64), p, config, np.asarray(positions))
  np.testing.assert_allclose(y, expected, atol=2e-6, rtol=1e-4)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k_kernels():
  # RMSNorm per head before RoPE: scaling a head's q (or k) projection changes nothing (up to
  # eps, made negligible here).
  config = CONFIG.replace(qk_norm=True, norm_eps=1e-12)
  params = _perturbed(_init(config))
  attn = params["layers"]["attn"]
  scaled = {**attn, "q": {"kernel": attn["q"]["kernel"] * 20.0},
            "k": {"kernel": attn["k"]["kernel"] * 5.0}}
  scaled = {**params, "layers": {**params["layers"], "attn": scaled}}
  tokens = _tokens((2, 8))
  np.testing.assert_allclose(_apply(config, scaled, tokens).logits,
                             _apply(config, params, tokens).logits, atol=2e-5)
  plain = CONFIG.replace(norm_eps=1e-12)
  assert not np.allclose(_apply(plain, scaled, tokens).logits, _apply(plain, params, tokens).logits,
                         atol=1e-3)


# --- RoPE scaling ----------------------------------------------------------------------------

# Written down by hand from transformers 5.24 (torch 2.13, CPU):
#   cfg = LlamaConfig(hidden_size=2 * Dh, num_attention_heads=2, head_dim=Dh, rope_theta=theta,
#                     rope_scaling=scaling, max_position_embeddings=...)   (Qwen2Config for qwen2.5)
#   inv = LlamaRotaryEmbedding(cfg).inv_freq.numpy()
#   {i: str(np.float32(inv[i])) for i in indices}, math.fsum(inv.astype(np.float64))
# Each value is float32's shortest decimal (it converts back to the very float32); the sum is of
# all Dh / 2 entries, exact (fsum), so it checks every entry. Llama 3.1 keeps i <= 28, smooths
# 29..34 and stretches i >= 35; Llama 3.2 keeps i <= 14, smooths 15..17, stretches i >= 18.
HF_INV_FREQ = {
    "llama3.1-8b": (128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                    {0: "1.0", 1: "0.8146172", 20: "0.01656044", 30: "0.0013718937",
                     32: "0.000524846", 34: "0.00017850779", 40: "3.4281024e-05",
                     63: "3.068926e-07"}, 5.386058263449144),
    "llama3.2-1b": (64, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                    {0: "1.0", 1: "0.6636013", 12: "0.007292665", 15: "0.001290548",
                     16: "0.0004295567", 17: "9.708286e-05", 20: "8.570256e-06",
                     31: "9.4183065e-08"}, 2.9682023966443296),
    "linear": (128, 10000.0, {"rope_type": "linear", "factor": 4.0},
               {0: "0.25", 1: "0.21649109", 32: "0.0025", 63: "2.8869548e-05"}, 1.8649885506638384),
    "qwen2.5": (64, 1000000.0, None,
                {0: "1.0", 1: "0.64938164", 16: "0.001", 31: "1.5399265e-06"}, 2.852101033626809),
}


@pytest.mark.parametrize("name", sorted(HF_INV_FREQ))
def test_rope_frequencies_equal_transformers(name):
  head_dim, theta, scaling, values, total = HF_INV_FREQ[name]
  config = CONFIG.replace(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
  inv_freq = attention.rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
  assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,)
  for i, value in values.items():
    assert inv_freq[i] == np.float32(value), (i, inv_freq[i], value)
  assert math.fsum(inv_freq.astype(np.float64)) == total


def test_rope_tables_use_the_scaled_frequencies():
  positions = jnp.array([[0, 5, 31]])
  sin, cos = attention.rope_tables(positions, 16, 1e4, 32, ALL_OPTIONS.rope_scaling)
  angles = np.array([0, 5, 31], np.float32)[:, None] * attention.rope_frequencies(
      16, 1e4, LLAMA3_SMALL)
  np.testing.assert_allclose(sin[0], np.sin(angles), atol=1e-6)
  np.testing.assert_allclose(cos[0], np.cos(angles), atol=1e-6)
  plain = attention.rope_frequencies(16, 1e4)
  scaled = attention.rope_frequencies(16, 1e4, ALL_OPTIONS.rope_scaling)
  assert scaled[0] != plain[0] and scaled[-1] == np.float32(plain[-1] / 4)  # smoothed, stretched
  # The scaling reaches the model: the same weights give other logits.
  params = _init(CONFIG)
  tokens = _tokens((1, 24))
  assert not np.allclose(_apply(CONFIG.replace(rope_scaling=LLAMA3_SMALL), params, tokens).logits,
                         _apply(CONFIG, params, tokens).logits, atol=1e-4)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
     r"rope_type 'yarn' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, r"rope_type 'dynamic' is not supported"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
     r"rope_type 'longrope' is not supported"),
    ({"factor": 4.0}, r"has no 'rope_type'"),
    ({"rope_type": "linear"}, r"\(linear\) lacks \['factor'\]"),
    ({**LLAMA3_SMALL, "beta_fast": 32}, r"unknown keys \['beta_fast'\]"),
    ({k: v for k, v in LLAMA3_SMALL.items() if k != "low_freq_factor"},
     r"lacks \['low_freq_factor'\]"),
    ({"rope_type": "default", "factor": 2.0}, r"unknown keys \['factor'\]"),
    ({"rope_type": "linear", "factor": -1.0}, r"'factor'.*positive"),
    ({"rope_type": "linear", "factor": "4"}, r"'factor'.*positive number"),
    ({**LLAMA3_SMALL, "high_freq_factor": 1.0}, r"high_freq_factor must exceed"),
    ({**LLAMA3_SMALL, "original_max_position_embeddings": 16.5}, r"must be an integer"),
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}, r"rope_theta other than"),
    ({"type": "linear", "rope_type": "llama3", "factor": 4.0}, r"type='linear' and rope_type"),
    ("llama3", r"must be None or a mapping"),
])
def test_invalid_rope_scaling_is_refused_naming_the_field_and_value(scaling, message):
  with pytest.raises(ValueError, match=message) as info:
    CONFIG.replace(rope_scaling=scaling)
  assert "rope_scaling" in str(info.value) and repr(scaling) in str(info.value)


def test_rope_scaling_spellings_and_round_trip():
  config = model_lib.ModelConfig(**{**CONFIG.to_dict(), "rope_scaling": LLAMA3_SMALL})
  assert isinstance(config.rope_scaling, tuple)  # hashable, so jitted code can close over it
  # Through JSON (config.json, the manifest) and back: equal, same hash, a plain dict outside.
  d = json.loads(json.dumps(config.to_dict()))
  assert d["rope_scaling"] == LLAMA3_SMALL and type(config.to_dict()["rope_scaling"]) is dict
  again = model_lib.ModelConfig.from_dict(d)
  assert again == config and hash(again) == hash(config)
  assert config.rope_scaling_dict == LLAMA3_SMALL
  # Key order and int-for-float do not matter; replace() keeps the setting.
  reordered = dict(reversed(list({**LLAMA3_SMALL, "factor": 4}.items())))
  assert CONFIG.replace(rope_scaling=reordered) == config
  assert config.replace(dtype="bfloat16").rope_scaling == config.rope_scaling
  # The older "type" key; transformers 5's rope_parameters (rope_theta inside); "default" = None.
  linear = CONFIG.replace(rope_scaling={"type": "linear", "factor": 2.0})
  assert linear.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  assert CONFIG.replace(rope_scaling={**LLAMA3_SMALL, "rope_theta": 1e4}) == config
  default = {"rope_type": "default", "rope_theta": 1e4}
  assert CONFIG.replace(rope_scaling=default).rope_scaling is None
  assert CONFIG.to_dict()["rope_scaling"] is None
  # Configs written before these fields existed still load, as the plain model.
  old = {k: v for k, v in CONFIG.to_dict().items()
         if k not in ("rope_scaling", "qkv_bias", "qk_norm")}
  assert model_lib.ModelConfig.from_dict(old) == CONFIG
  full = ALL_OPTIONS.to_dict()
  assert full["qkv_bias"] is True and full["qk_norm"] is True
  assert model_lib.ModelConfig.from_dict(json.loads(json.dumps(full))) == ALL_OPTIONS
  with pytest.raises(ValueError, match="qk_norm must be a bool"):
    CONFIG.replace(qk_norm="yes")


# --- bf16 rounding ---------------------------------------------------------------------------


def _bf16(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_bf16_rmsnorm_rounds_the_normalised_activations_before_the_scale():
  """transformers: `weight * hidden.to(bf16)`, the product rounded again: two roundings of the
  normalised value, not one of the scaled float32 product."""
  x = jax.random.normal(jax.random.key(0), (64, 96)).astype(jnp.bfloat16) * 3
  scale = 1 + 0.5 * jax.random.normal(jax.random.key(1), (96,))
  bf16 = model_lib.RMSNorm(1e-5, jnp.bfloat16).apply({"params": {"scale": scale}}, x)
  assert bf16.dtype == jnp.bfloat16
  # The float32 normalisation of the same code, with a unit scale: nothing rounded yet.
  normed = model_lib.RMSNorm(1e-5, jnp.float32).apply({"params": {"scale": jnp.ones(96)}}, x)
  expected = _bf16(_bf16(normed) * _bf16(scale))
  np.testing.assert_array_equal(np.asarray(bf16, np.float32), expected)
  # The order matters: rounding only the float32 product differs in many entries.
  assert (_bf16(np.asarray(normed) * np.asarray(scale)) != expected).mean() > 0.05
  # In float32 nothing changes: x / rms * scale.
  f32 = model_lib.RMSNorm(1e-5, jnp.float32).apply({"params": {"scale": scale}}, x)
  np.testing.assert_array_equal(f32, np.asarray(normed) * np.asarray(scale))


def test_bf16_qk_norm_rounds_as_rmsnorm_does():
  config = CONFIG.replace(qk_norm=True, dtype="bfloat16")
  params = _perturbed(_init(config))
  p = jax.tree.map(lambda a: a[0], params["layers"]["attn"])
  x = jax.random.normal(jax.random.key(3), (1, 5, config.embed_dim)).astype(jnp.bfloat16)
  rope = attention.rope_tables(jnp.arange(5)[None], 16, config.rope_theta, 8)
  _, state = model_lib.Attention(config).apply({"params": p}, x, rope, None, None, 0, None,
                                               capture_intermediates=True, mutable="intermediates")
  seen = state["intermediates"]
  projected, q = seen["q"]["__call__"][0], seen["q_norm"]["__call__"][0]
  assert q.dtype == jnp.bfloat16 and q.shape == (1, 5, 4, 16)
  normed = model_lib.RMSNorm(config.norm_eps, jnp.float32, ("kv",)).apply(
      {"params": {"scale": jnp.ones(16)}}, projected)
  expected = _bf16(_bf16(normed) * _bf16(p["q_norm"]["scale"]))
  np.testing.assert_array_equal(np.asarray(q, np.float32), expected)


def test_bf16_bias_is_added_before_the_one_rounding():
  """Small integers: every product and sum is exact in float32, so the only roundings are the
  ones under test (torch's bf16 nn.Linear rounds x W + b once)."""
  rng = np.random.default_rng(0)
  x = rng.integers(-8, 9, (4, 6, 16)).astype(np.float32)
  kernel = rng.integers(-8, 9, (16, 2, 8)).astype(np.float32)
  bias = rng.integers(-128, 129, (2, 8)).astype(np.float32) / 64
  dense = model_lib.Dense((16, 2, 8), ("embed", "heads", "kv"), 1, 0.02, jnp.bfloat16, True)
  y = dense.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  exact = np.einsum("bte,ehd->bthd", x, kernel) + bias
  np.testing.assert_array_equal(np.asarray(y, np.float32), _bf16(exact))
  assert (_bf16(_bf16(exact - bias) + bias) != _bf16(exact)).any()  # two roundings would differ
  f32 = model_lib.Dense((16, 2, 8), ("embed", "heads", "kv"), 1, 0.02, jnp.float32, True)
  np.testing.assert_array_equal(f32.apply({"params": {"kernel": kernel, "bias": bias}}, x), exact)


def test_bf16_model_with_every_option_is_close_to_float32():
  params = _perturbed(_init(ALL_OPTIONS))
  tokens = _tokens((2, 16))
  f32 = _apply(ALL_OPTIONS, params, tokens)
  bf16 = _apply(ALL_OPTIONS.replace(dtype="bfloat16"), params, tokens)
  assert bf16.logits.dtype == jnp.float32 and bf16.hidden.dtype == jnp.bfloat16
  scale = float(jnp.std(f32.logits))
  assert float(jnp.max(jnp.abs(bf16.logits - f32.logits))) < 0.05 * scale + 1e-3


# --- the cache and the sampler ---------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_and_decode_equal_the_full_forward(scan_layers):
  config = ALL_OPTIONS.replace(scan_layers=scan_layers)
  params = _perturbed(_init(ALL_OPTIONS))
  params = params if scan_layers else param_tree.unstack_layers(params)
  tokens = _tokens((2, 20), seed=4)  # positions up to 19: past the scaling's original 16
  full = _apply(config, params, tokens).logits
  cache = model_lib.init_cache(config, 2, max_len=24)
  prompt = 6
  out = _apply(config, params, tokens[:, :prompt], cache=cache,
               positions=jnp.tile(jnp.arange(prompt), (2, 1)))
  np.testing.assert_allclose(out.logits, full[:, :prompt], atol=2e-5)
  cache = out.cache
  for t in range(prompt, 20):
    out = _apply(config, params, tokens[:, t:t + 1], cache=cache, positions=jnp.full((2, 1), t))
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=2e-5)


def test_sampled_log_probs_equal_teacher_forced_log_probs_with_every_option():
  """tests/test_sampling.py's on-policy check, for a model with biases, q/k norms and scaled
  RoPE: the sampler's cached decode is the training forward pass."""
  params = jax.tree.map(lambda p: p * 2.0, _perturbed(_init(ALL_OPTIONS)))
  prompts = [[1, 5, 9, 13, 2, 7, 3, 3, 8, 1], [1, 4], [1, 8, 8, 3]]
  width = max(map(len, prompts))
  tokens = np.zeros((3, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  gen = sampling.generate(params, tokens, lengths, jax.random.key(7), config=ALL_OPTIONS,
                          sampling=sampling.SamplingConfig(), max_new_tokens=10, decode_chunk=4)
  assert np.asarray(gen.mask).all()
  emitted = np.asarray(gen.tokens)
  sequences = [list(p) + emitted[b].tolist() for b, p in enumerate(prompts)]
  full_width = max(map(len, sequences))
  full = np.zeros((3, full_width), np.int32)
  segment_ids = np.zeros((3, full_width), np.int32)
  for b, s in enumerate(sequences):
    full[b, :len(s)], segment_ids[b, :len(s)] = s, 1
  logits = _apply(ALL_OPTIONS, params, full, segment_ids=segment_ids).logits
  index = np.stack([len(p) - 1 + np.arange(emitted.shape[1]) for p in prompts])
  logits = jnp.take_along_axis(logits, jnp.asarray(index)[:, :, None], axis=1)
  expected = losses.token_log_probs(logits=logits, targets=gen.tokens)
  np.testing.assert_allclose(np.asarray(gen.log_probs), np.asarray(expected), rtol=0, atol=1e-5)
  assert (emitted != np.asarray(jnp.argmax(logits, -1))).any()  # really sampled
