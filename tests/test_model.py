"""The transformer: shapes, parameter count, masking, KV cache, scalar head, layouts, numerics."""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import attention
from jaxlm import model as model_lib
from jaxlm import param_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Odd sizes catch axis mix-ups; 2 layers is the least that can tell scanned from unscanned.
CONFIG = model_lib.ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=32)


def _init(config, seed=0, scalar_head=False):
  return nn.meta.unbox(model_lib.init_params(config, jax.random.key(seed), scalar_head=scalar_head))


# Jitted: eager flax runs op by op and compiles each op anew, which is slower on CPU.
@functools.partial(jax.jit, static_argnames=("config", "lm_head"))
def _apply(config, params, tokens, **kwargs):
  return model_lib.Transformer(config).apply({"params": params}, tokens, **kwargs)


def _tokens(shape, seed=1, vocab=CONFIG.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@pytest.fixture(scope="module")
def params():
  return _init(CONFIG, scalar_head=True)


def test_output_shapes_and_dtypes(params):
  tokens = _tokens((2, 8))
  out = _apply(CONFIG, params, tokens, scalar_index=jnp.array([0, 6]))
  assert out.logits.shape == (2, 8, CONFIG.vocab_size) and out.logits.dtype == jnp.float32
  assert out.hidden.shape == (2, 8, CONFIG.embed_dim)
  assert out.scalar.shape == (2,) and out.scalar.dtype == jnp.float32
  assert out.cache is None
  many = _apply(CONFIG, params, tokens, scalar_index=jnp.tile(jnp.arange(8), (2, 1)), lm_head=False)
  assert many.logits is None and many.scalar.shape == (2, 8)


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"scan_layers": False},
                                     {"num_kv_heads": 1}, {"num_kv_heads": 4}])
@pytest.mark.parametrize("scalar_head", [False, True])
def test_num_params_equals_the_initialised_tree(changes, scalar_head):
  config = CONFIG.replace(**changes)
  abstract = jax.eval_shape(lambda r: model_lib.init_params(config, r, scalar_head=scalar_head),
                            jax.random.key(0))
  actual = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  assert model_lib.num_params(config, scalar_head=scalar_head) == actual
  embedding = config.vocab_size * config.embed_dim * (1 if config.tie_embeddings else 2)
  assert model_lib.num_params(config, include_embedding=False) == (
      model_lib.num_params(config) - embedding)


def test_flops_per_token_follows_palm():
  c = CONFIG
  n = model_lib.num_params(c, include_embedding=False) + c.vocab_size * c.embed_dim
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * 16
  assert model_lib.flops_per_token(c, 16) == 6 * n + attention
  assert model_lib.flops_per_token(c, 16, causal=True) == 6 * n + attention / 2


def test_config_round_trips_and_validates():
  config = CONFIG.replace(dtype="bfloat16", remat_policy="full", attention_impl="xla")
  assert model_lib.ModelConfig.from_dict(config.to_dict()) == config
  hash(config)  # closed over by jitted code
  with pytest.raises(ValueError, match="unknown ModelConfig keys"):
    model_lib.ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})
  for bad in ({"num_kv_heads": 3}, {"head_dim": 7}, {"dtype": "float16"},
              {"remat_policy": "some"}, {"attention_impl": "flash"}, {"num_layers": 0}):
    with pytest.raises(ValueError):
      CONFIG.replace(**bad)
  for impl in attention.IMPLS:
    assert CONFIG.replace(attention_impl=impl).attention_impl == impl


def test_changing_a_future_token_never_changes_past_logits(params):
  tokens = _tokens((2, 8))
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % CONFIG.vocab_size)
  a, b = _apply(CONFIG, params, tokens).logits, _apply(CONFIG, params, changed).logits
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_packed_documents_do_not_attend_across_segments(params):
  doc_a, doc_b, pad = _tokens((3,), seed=2), _tokens((4,), seed=3), jnp.zeros((1,), jnp.int32)
  packed = jnp.stack([jnp.concatenate([doc_a, doc_b, pad]), jnp.concatenate([doc_b, doc_a, pad])])
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 2, 2, 2, 0]])
  # Positions are derived from the segments (restarting at 0), as the pipelines write them.
  np.testing.assert_array_equal(model_lib.positions_from_segments(segment_ids),
                                [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 1, 2, 0]])
  out = _apply(CONFIG, params, packed, segment_ids=segment_ids).logits
  # Without segment ids, the document at the start of each row is a document alone (what
  # follows it cannot matter, by causality).
  alone = _apply(CONFIG, params, packed).logits
  np.testing.assert_allclose(out[0, :3], alone[0, :3], atol=1e-5)
  np.testing.assert_allclose(out[0, 3:7], alone[1, :4], atol=1e-5)
  np.testing.assert_allclose(out[1, :4], alone[1, :4], atol=1e-5)
  np.testing.assert_allclose(out[1, 4:7], alone[0, :3], atol=1e-5)


@functools.partial(jax.jit, static_argnames="config")
def _loss_and_grads(config, params, tokens, segment_ids):
  """Next-token cross-entropy over real tokens, and its gradients."""
  def loss(p):
    logits = _apply(config, p, tokens, segment_ids=segment_ids).logits[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    mask = segment_ids[:, 1:] > 0
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)
  return jax.value_and_grad(loss)(params)


def test_padding_rows_are_finite_with_finite_gradients(params):
  tokens = _tokens((2, 8))
  segment_ids = jnp.array([[0] * 8, [1] * 3 + [0] * 5])  # an all-padding row, a padded row
  out = _apply(CONFIG, params, tokens, segment_ids=segment_ids, scalar_index=jnp.array([0, 2]))
  assert np.isfinite(out.logits).all() and np.isfinite(out.scalar).all()
  loss, grads = _loss_and_grads(CONFIG, params, tokens, segment_ids)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def _decode_all(config, params, tokens, lengths, prompt_lengths):
  """Prefill each row's prompt, then decode the rest one token at a time; logits per position."""
  batch, length = tokens.shape
  prompt = int(max(prompt_lengths))
  index = jnp.arange(prompt)
  def apply(p, cache, t, pos, seg):
    return _apply(config, p, t, positions=pos, segment_ids=seg, cache=cache)

  cache = model_lib.init_cache(config, batch, max_len=length + 3)
  out = apply(params, cache, tokens[:, :prompt], jnp.tile(index, (batch, 1)),
              (index[None] < prompt_lengths[:, None]).astype(jnp.int32))
  logits = np.zeros((batch, length, config.vocab_size), np.float32)
  logits[:, :prompt] = out.logits
  cache = out.cache
  # Rows advance from their own prompt length: they sit at different positions at every step.
  for step in range(length - int(min(prompt_lengths))):
    pos = jnp.minimum(prompt_lengths + step, length - 1)
    live = (prompt_lengths + step < lengths).astype(jnp.int32)
    tok = jnp.take_along_axis(tokens, pos[:, None], axis=1)
    out = apply(params, cache, tok, pos[:, None], live[:, None])
    cache = out.cache
    for b in np.flatnonzero(live):
      logits[b, pos[b]] = out.logits[b, 0]
  return logits


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_prefill_and_decode_equal_the_full_forward(params, scan_layers):
  config = CONFIG.replace(scan_layers=scan_layers)
  params = params if scan_layers else param_tree.unstack_layers(params)
  tokens = _tokens((3, 12), seed=4)
  lengths, prompt_lengths = jnp.array([12, 9, 5]), jnp.array([4, 6, 2])
  segment_ids = (jnp.arange(12)[None] < lengths[:, None]).astype(jnp.int32)
  full = _apply(config, params, tokens, segment_ids=segment_ids).logits
  cached = _decode_all(config, params, tokens, lengths, prompt_lengths)
  for b, n in enumerate(lengths.tolist()):
    np.testing.assert_allclose(cached[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)


def test_cache_slots_are_positions_and_padding_is_never_written(params):
  tokens = _tokens((1, 5), seed=5)
  full = _apply(CONFIG, params, tokens).logits
  # The same 4-token prompt left-padded and right-padded by 3, padding at position 0 as the
  # pipelines write it: positions, not indices, decide slots and causality, and a padding
  # token never overwrites the real token of its slot.
  pad = jnp.full((3,), 7, jnp.int32)
  prompt = tokens[0, :4]
  prompts = jnp.stack([jnp.concatenate([pad, prompt]), jnp.concatenate([prompt, pad])])
  positions = jnp.array([[0, 0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0, 0]])
  segment_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
  cache = model_lib.init_cache(CONFIG, 2, max_len=8)
  out = _apply(CONFIG, params, prompts, positions=positions, segment_ids=segment_ids, cache=cache)
  np.testing.assert_allclose(out.logits[0, 3:], full[0, :4], atol=1e-5)
  np.testing.assert_allclose(out.logits[1, :4], full[0, :4], atol=1e-5)
  np.testing.assert_array_equal(out.cache["valid"], [[True] * 4 + [False] * 4] * 2)
  assert np.isfinite(out.logits).all()
  step = _apply(CONFIG, params, jnp.tile(tokens[:, 4:], (2, 1)), positions=jnp.array([[4], [4]]),
                cache=out.cache)
  np.testing.assert_allclose(step.logits[:, 0], jnp.tile(full[:, 4], (2, 1)), atol=1e-5)


def test_cache_needs_positions(params):
  with pytest.raises(ValueError, match="positions"):
    _apply(CONFIG, params, _tokens((1, 2)), cache=model_lib.init_cache(CONFIG, 1))


def test_scalar_head_reads_the_given_index(params):
  # Give the (zero-initialised) head real weights so the test can see what it reads.
  head = {"kernel": jax.random.normal(jax.random.key(7), (CONFIG.embed_dim,)), "bias": 0.5}
  params = {**params, "scalar_head": head}
  tokens = _tokens((2, 8))
  index = jnp.array([3, 7])
  out = _apply(CONFIG, params, tokens, scalar_index=index)
  picked = out.hidden[jnp.arange(2), index]
  np.testing.assert_allclose(out.scalar, picked @ head["kernel"] + 0.5, rtol=1e-6)
  changed = tokens.at[0, 4:].set(0)  # after row 0's index, and nowhere near row 1's
  np.testing.assert_allclose(_apply(CONFIG, params, changed, scalar_index=index).scalar,
                             out.scalar, atol=1e-6)


@pytest.mark.parametrize("boxed", [True, False])
def test_add_scalar_head_turns_an_lm_tree_into_a_reward_model(boxed):
  reference = model_lib.init_params(CONFIG, jax.random.key(0), scalar_head=True)
  reference = reference if boxed else nn.meta.unbox(reference)
  lm = {k: v for k, v in reference.items() if k != "scalar_head"}  # a stage-1 / SFT tree
  rm = model_lib.add_scalar_head(lm, CONFIG, jax.random.key(1))
  assert jax.tree.structure(rm) == jax.tree.structure(reference)
  out = _apply(CONFIG, nn.meta.unbox(rm), _tokens((2, 4)), scalar_index=jnp.array([1, 3]),
               lm_head=False)
  np.testing.assert_array_equal(out.scalar, 0.0)  # a fresh head starts at exactly zero
  with pytest.raises(ValueError, match="already"):
    model_lib.add_scalar_head(rm, CONFIG, jax.random.key(1))


def test_scanned_and_unscanned_layouts_give_the_same_outputs(params):
  tokens = _tokens((2, 8))
  unscanned = param_tree.unstack_layers(params)
  assert "layers" not in unscanned and "layers_1" in unscanned
  a = _apply(CONFIG, params, tokens, scalar_index=jnp.array([2, 7]))
  b = _apply(CONFIG.replace(scan_layers=False), unscanned, tokens, scalar_index=jnp.array([2, 7]))
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
  np.testing.assert_allclose(a.scalar, b.scalar, atol=1e-6)
  restacked = param_tree.stack_layers(unscanned)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)
  with pytest.raises(ValueError, match="plain"):
    param_tree.unstack_layers(model_lib.init_params(CONFIG, jax.random.key(0)))


def test_bfloat16_compute_is_close_to_float32(params):
  tokens = _tokens((2, 8))
  f32 = _apply(CONFIG, params, tokens)
  bf16 = _apply(CONFIG.replace(dtype="bfloat16"), params, tokens)
  assert bf16.logits.dtype == jnp.float32 and bf16.hidden.dtype == jnp.bfloat16
  scale = float(jnp.std(f32.logits))
  assert float(jnp.max(jnp.abs(bf16.logits - f32.logits))) < 0.05 * scale + 1e-3


def _remat_policies(config, params, tokens):
  """The distinct policies of the rematerialised (jax.checkpoint) regions of a forward pass."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if "policy" in eqn.params and eqn.params["policy"] not in found:
        found.append(eqn.params["policy"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            visit(getattr(sub, "jaxpr", sub))

  visit(jax.make_jaxpr(lambda p: _apply(config, p, tokens).logits)(params).jaxpr)
  return found


@pytest.mark.parametrize("policy, scan_layers", [
    ("full", True), ("dots_saveable", True), ("dots_with_no_batch_dims_saveable", True),
    ("full", False)])
def test_remat_policies_give_the_same_loss_and_gradients(params, policy, scan_layers):
  tokens, segment_ids = _tokens((2, 8)), jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  plain = params if scan_layers else param_tree.unstack_layers(params)
  base = CONFIG.replace(scan_layers=scan_layers)
  loss, grads = _loss_and_grads(base, plain, tokens, segment_ids)
  remat_config = base.replace(remat_policy=policy)
  remat_loss, remat_grads = _loss_and_grads(remat_config, plain, tokens, segment_ids)
  # The policy really is in the program (not silently dropped), and gives the same numbers.
  assert _remat_policies(remat_config, plain, tokens) == [model_lib.REMAT_POLICIES[policy]]
  assert _remat_policies(base, plain, tokens) == []
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               remat_grads, grads)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(params):
  # Query head n reads kv head n // (H / Hkv): repeating each kv head H / Hkv times gives MHA.
  groups = CONFIG.num_heads // CONFIG.num_kv_heads
  mha_config = CONFIG.replace(num_kv_heads=CONFIG.num_heads)
  attn = dict(params["layers"]["attn"])
  for name in ("k", "v"):
    attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], groups, axis=2)}
  mha_params = {**params, "layers": {**params["layers"], "attn": attn}}
  tokens = _tokens((2, 8))
  np.testing.assert_allclose(_apply(mha_config, mha_params, tokens).logits,
                             _apply(CONFIG, params, tokens).logits, atol=1e-5)
  # Multi-query attention (one kv head) is the extreme case.
  mqa = {name: {"kernel": attn[name]["kernel"][:, :, :1]} for name in ("k", "v")}
  mqa_params = {**params, "layers": {**params["layers"], "attn": {**attn, **mqa}}}
  out = _apply(CONFIG.replace(num_kv_heads=1), mqa_params, tokens).logits
  assert np.isfinite(out).all()


def test_untied_head_and_explicit_xla_attention(params):
  config = CONFIG.replace(tie_embeddings=False, attention_impl="xla")
  abstract = jax.eval_shape(lambda r: model_lib.init_params(config, r), jax.random.key(0))
  assert abstract["lm_head"]["kernel"].value.shape == (config.embed_dim, config.vocab_size)
  # An untied head holding a copy of the embedding computes exactly the tied logits.
  untied = {**params, "lm_head": {"kernel": params["embed"]["embedding"].T}}
  tokens = _tokens((1, 5))
  np.testing.assert_allclose(_apply(config, untied, tokens).logits,
                             _apply(CONFIG, params, tokens).logits, atol=1e-6)


def test_decay_mask_skips_norms_and_biases(params):
  mask = param_tree.decay_mask(params)
  assert mask["layers"]["attn"]["q"]["kernel"] and mask["embed"]["embedding"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
  assert not mask["scalar_head"]["bias"]


def test_initialisation_follows_the_documented_scheme(params):
  layers = params["layers"]
  np.testing.assert_allclose(np.std(params["embed"]["embedding"]), 0.02, rtol=0.1)
  np.testing.assert_allclose(np.std(layers["mlp"]["up"]["kernel"]), 0.02, rtol=0.1)
  residual_std = 0.02 / np.sqrt(2 * CONFIG.num_layers)
  np.testing.assert_allclose(np.std(layers["mlp"]["down"]["kernel"]), residual_std, rtol=0.1)
  np.testing.assert_allclose(np.std(layers["attn"]["o"]["kernel"]), residual_std, rtol=0.1)
  np.testing.assert_array_equal(params["layers"]["mlp_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["scalar_head"]["kernel"], 0.0)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_blocked_attention_equals_the_xla_path_with_its_gradients(params, monkeypatch, num_kv_heads):
  """Blocks of 4 queries over 11 tokens (a partial last block), packed segments and padding."""
  monkeypatch.setattr(attention, "BLOCK", 4)  # read at trace time; 3 blocks here
  config = CONFIG.replace(num_kv_heads=num_kv_heads, attention_impl="xla")
  params = _init(config)
  tokens = _tokens((2, 11))
  segment_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
  blocked = config.replace(attention_impl="blocked", scan_unroll=2)
  loss, grads = _loss_and_grads(config, params, tokens, segment_ids)
  blocked_loss, blocked_grads = _loss_and_grads(blocked, params, tokens, segment_ids)
  np.testing.assert_allclose(blocked_loss, loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), blocked_grads, grads)
  np.testing.assert_allclose(_apply(blocked, params, tokens).logits, _apply(config, params, tokens).logits,
                             atol=1e-5)


@pytest.mark.parametrize("attention_impl", [None, "blocked", "splash"])
def test_branches_see_the_shared_prefix_and_never_each_other(params, attention_impl):
  """[prefix | a | b] in one row scores a and b as rows [prefix | a] and [prefix | b] would.

  A fused kernel cannot hold the branch mask: "splash" runs the XLA path for the branched row,
  and its own kernel (interpret mode) for the plain rows it is compared with.
  """
  config = CONFIG.replace(attention_impl=attention_impl)
  prefix, a, b = _tokens((3,), seed=4), _tokens((4,), seed=5), _tokens((2,), seed=6)
  row = jnp.concatenate([prefix, a, b, jnp.zeros((1,), jnp.int32)])[None]
  branch_ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 0]])
  positions = jnp.array([[0, 1, 2, 3, 4, 5, 6, 3, 4, 0]])
  segment_ids = jnp.array([[1] * 9 + [0]])
  out = _apply(config, params, row, segment_ids=segment_ids, positions=positions, branch_ids=branch_ids).logits
  alone_a = _apply(config, params, jnp.concatenate([prefix, a])[None]).logits
  alone_b = _apply(config, params, jnp.concatenate([prefix, b])[None]).logits
  np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:9], alone_b[0, 3:], atol=1e-5)
  # logits_at computes the LM head at the given positions only: the same rows of the logits.
  at = jnp.array([[2, 6, 2, 8]])
  picked = _apply(config, params, row, segment_ids=segment_ids, positions=positions, branch_ids=branch_ids,
                  logits_at=at).logits
  np.testing.assert_allclose(picked[0], out[0, at[0]], atol=1e-6)
  with pytest.raises(ValueError, match="branch_ids need explicit positions"):
    _apply(config, params, row, branch_ids=branch_ids)


def test_scan_unroll_changes_nothing_but_speed(params):
  tokens = _tokens((2, 8))
  reference = _apply(CONFIG, params, tokens).logits
  for unroll in (2, 5):  # 5 > num_layers: clamped to a full unroll
    np.testing.assert_allclose(_apply(CONFIG.replace(scan_unroll=unroll), params, tokens).logits, reference,
                               atol=1e-6)
  with pytest.raises(ValueError, match="scan_unroll"):
    CONFIG.replace(scan_unroll=0)


def test_the_tied_embedding_is_gathered_once_and_its_gradient_reduced_once():
  """On 8 fake devices with FSDP, a train step's compiled program moves the [V, E] table once
  each way: one all-gather of the (cast) table, one reduction of its gradient, although the
  lookup and the tied head both read it."""
  script = textwrap.dedent("""
      import re, flax.linen as nn, jax, jax.numpy as jnp
      from jaxlm import model as model_lib, sharding
      config = model_lib.ModelConfig.from_dict(CONFIG_DICT).replace(dtype="bfloat16")
      mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
      abstract = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
      shardings = sharding.logical_shardings(abstract, mesh)
      params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(abstract), shardings)
      tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sharding.batch_sharding(mesh))
      def loss(params, tokens):
        logits = model_lib.Transformer(config).apply({"params": params}, tokens).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
      with sharding.use_mesh(mesh):
        text = jax.jit(jax.grad(loss), out_shardings=shardings).lower(params, tokens).compile().as_text()
      table = f"[{config.vocab_size},{config.embed_dim}]"
      ops = re.findall(r"= (.*?) (all-gather|all-reduce|reduce-scatter)(?:-start)?\\(", text)
      # Tensors, not ops: XLA combines reductions into one op over a tuple of tensors.
      print(sorted(op for result, op in ops for _ in range(result.count(table))))
  """).replace("CONFIG_DICT", repr(CONFIG.to_dict()))
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=path)
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # A replicated table read by both uses had its gradient reduced twice (two [V, E] all-reduces).
  assert result.stdout.split("\n")[-2] == "['all-gather', 'all-reduce']", result.stdout
