"""Executed FLOPs and collectives read from optimized HLO (`jaxlm/hlo_stats.py`), checked by hand.

Small programs compiled on the CPU, whose dot FLOPs are 2 x M x K x N per matmul times the
number of times it runs; a hand-written HLO module in the TPU compiler's style (convolutions
for dots, loops without `known_trip_count`, async collectives, a conditional); the `:tiny`
pretraining step against the model's FLOPs formula. The collectives run in a subprocess with 8
fake CPU devices (XLA reads the device count once, when JAX starts; see tests/test_sharding.py).
"""

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxlm import hlo_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
f32 = jnp.float32


def _compile(fn, *shapes, **static):
  args = [jax.ShapeDtypeStruct(s, f32) for s in shapes]
  return jax.jit(functools.partial(fn, **static)).lower(*args).compile()


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_a_single_matmul_is_2mkn():
  compiled = _compile(lambda a, b: a @ b, (8, 16), (16, 32))
  stats = hlo_stats.stats_of(compiled)
  assert stats.flops == stats.flops_once == 2 * 8 * 16 * 32 == _cost_flops(compiled)
  assert (stats.dots, stats.loops, stats.collectives, stats.exact) == (1, 0, {}, True)


def _scan_matmuls(w, x, unroll=1):
  return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w, unroll=unroll)[0]


def test_a_scan_counts_its_body_times_the_trip_count():
  n, body = 6, 2 * 8 * 32 * 32
  looped = _compile(_scan_matmuls, (n, 32, 32), (8, 32))
  stats = hlo_stats.stats_of(looped)
  assert stats.flops == n * body and stats.flops_once == body
  assert (stats.loops, stats.unknown_trip_counts) == (1, 0)
  assert _cost_flops(looped) < 2 * body  # XLA's own count: the body once (+ the loop counter)
  unrolled = _compile(_scan_matmuls, (n, 32, 32), (8, 32), unroll=True)  # No loop: XLA counts it all.
  assert hlo_stats.stats_of(unrolled).flops == _cost_flops(unrolled) == stats.flops
  assert hlo_stats.stats_of(unrolled).loops == 0


def test_nested_scans_multiply_their_trip_counts():
  def nested(w, x):
    return jax.lax.scan(lambda c, wo: (_scan_matmuls(wo, c), None), x, w)[0]

  stats = hlo_stats.stats_of(_compile(nested, (3, 5, 32, 32), (8, 32)))
  assert stats.flops == 3 * 5 * 2 * 8 * 32 * 32 and stats.loops == 2 and stats.exact


def test_the_grad_of_a_matmul_is_three_matmuls():
  loss = lambda w, x: jnp.sum((x @ w) ** 2)
  stats = hlo_stats.stats_of(_compile(jax.grad(loss, argnums=(0, 1)), (32, 48), (8, 32)))
  assert stats.dots == 3 and stats.flops == 3 * 2 * 8 * 32 * 48  # forward, d/dx, d/dw


def test_a_data_dependent_loop_is_counted_once_and_reported():
  def until_large(w, x):
    return jax.lax.while_loop(lambda c: jnp.sum(c) < 1e6, lambda c: c @ w + 1.0, x)

  stats = hlo_stats.stats_of(_compile(until_large, (16, 16), (4, 16)))
  assert (stats.loops, stats.unknown_trip_counts, stats.exact) == (1, 1, False)
  assert stats.flops == 2 * 4 * 16 * 16  # a lower bound: the body once


def test_a_conditional_counts_its_costliest_branch():
  def maybe(w, x):
    return jax.lax.cond(jnp.sum(x) > 0, lambda: (x @ w) @ w, lambda: x)

  stats = hlo_stats.stats_of(_compile(maybe, (16, 16), (4, 16)))
  assert stats.conditionals == 1 and stats.flops == 2 * (2 * 4 * 16 * 16)


# A module in the style of XLA's TPU compiler (lines taken from the `:tiny` step compiled for
# v5e-8, trimmed): its dots are convolutions, attention's per-head matmuls windowed convolutions
# over the heads; its loops carry no known_trip_count; collectives are async pairs and wrappers.
TPU_STYLE = textwrap.dedent("""\
    HloModule jit_step_fn, is_scheduled=true, entry_computation_layout={(f32[64,128]{1,0})->f32[64,128]{1,0}}

    %add.clone (x: f32[], y: f32[]) -> f32[] {
      %x = f32[] parameter(0)
      %y = f32[] parameter(1)
      ROOT %add = f32[] add(%x, %y)
    }

    %fused_q (param_0: f32[64,128,1], param_1: bf16[4,32,128]) -> f32[64,4,32] {
      %param_0 = f32[64,128,1]{1,0,2:T(8,128)} parameter(0)
      %param_1 = bf16[4,32,128]{2,1,0:T(8,128)(2,1)} parameter(1)
      ROOT %convolution.90 = f32[64,4,32]{0,2,1:T(8,128)} convolution(%param_0, %param_1), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_0oi->b0f, metadata={op_name="jit(step_fn)/attn/q/dot_general"}
    }

    %fused_scores (param_0.1: bf16[64,4,32], param_1.1: bf16[64,4,32]) -> f32[4,64,64] {
      %param_0.1 = bf16[64,4,32]{0,2,1:T(8,128)(2,1)} parameter(0)
      %param_1.1 = bf16[64,4,32]{0,2,1:T(8,128)(2,1)} parameter(1)
      ROOT %convolution-base-dilated.7 = f32[4,64,64]{1,2,0:T(8,128)} convolution(%param_0.1, %param_1.1), window={size=4 stride=3 lhs_dilate=4}, dim_labels=b0f_o0i->0bf, metadata={op_name="jit(step_fn)/vmap(BTNH,BSNH->BNTS)/dot_general"}
    }

    %wrapped_rs (p: f32[64,128]) -> f32[8,128] {
      %p = f32[64,128]{1,0:T(8,128)} parameter(0)
      ROOT %reduce-scatter.1 = f32[8,128]{1,0:T(8,128)} reduce-scatter(%p), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add.clone
    }

    %body (wide.param.0: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
      %constant.1 = s32[]{:T(128)} constant(1)
      %wide.param.0 = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}) parameter(0)
      %get-tuple-element.1 = s32[]{:T(128)} get-tuple-element(%wide.param.0), index=0
      %get-tuple-element.2 = f32[64,128]{1,0:T(8,128)} get-tuple-element(%wide.param.0), index=1
      %add.2 = s32[]{:T(128)} add(%get-tuple-element.1, %constant.1), backend_config={"flag_configs":[]}
      %fusion.1 = f32[64,128,1]{1,0,2:T(8,128)} bitcast(%get-tuple-element.2)
      %w = bf16[4,32,128]{2,1,0:T(8,128)(2,1)} constant({...})
      %fusion.2 = f32[64,4,32]{0,2,1:T(8,128)} fusion(%fusion.1, %w), kind=kOutput, calls=%fused_q
      %qk = bf16[64,4,32]{0,2,1:T(8,128)(2,1)} convert(%fusion.2)
      %fusion.3 = f32[4,64,64]{1,2,0:T(8,128)} fusion(%qk, %qk), kind=kOutput, calls=%fused_scores
      %all-gather-start = (f32[8,128]{1,0:T(8,128)}, f32[64,128]{1,0:T(8,128)}) all-gather-start(%get-tuple-element.2), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
      %all-gather-done = f32[64,128]{1,0:T(8,128)} all-gather-done(%all-gather-start)
      %all-reduce-start = f32[64,128]{1,0:T(8,128)} all-reduce-start(%all-gather-done), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add.clone
      %all-reduce-done = f32[64,128]{1,0:T(8,128)} all-reduce-done(%all-reduce-start)
      ROOT %tuple.1 = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}) tuple(%add.2, %all-reduce-done)
    }

    %cond (wide.param.1: (s32[], f32[64,128])) -> pred[] {
      %constant.4 = s32[]{:T(128)} constant(4)
      %wide.param.1 = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}) parameter(0)
      %get-tuple-element.3 = s32[]{:T(128)} get-tuple-element(%wide.param.1), index=0
      ROOT %lt.1 = pred[]{:T(512)} compare(%get-tuple-element.3, %constant.4), direction=LT
    }

    %branch_big (b: f32[64,128]) -> f32[64,128] {
      %b = f32[64,128]{1,0:T(8,128)} parameter(0)
      %w2 = f32[128,128]{1,0:T(8,128)} constant({...})
      ROOT %convolution.3 = f32[64,128]{1,0:T(8,128)} convolution(%b, %w2), dim_labels=bf_io->bf
    }

    %branch_small (s: f32[64,128]) -> f32[64,128] {
      ROOT %s = f32[64,128]{1,0:T(8,128)} parameter(0)
    }

    ENTRY %main (param.1: f32[64,128]) -> f32[64,128] {
      %param.1 = f32[64,128]{1,0:T(8,128)} parameter(0)
      %constant.0 = s32[]{:T(128)} constant(0)
      %copy.1 = s32[]{:T(128)} copy(%constant.0)
      %tuple.0 = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}) tuple(%copy.1, %param.1)
      %while.1 = (s32[]{:T(128)}, f32[64,128]{1,0:T(8,128)}) while(%tuple.0), condition=%cond, body=%body, metadata={op_name="jit(step_fn)/while"}
      %get-tuple-element.9 = f32[64,128]{1,0:T(8,128)} get-tuple-element(%while.1), index=1
      %async-start = ((f32[64,128]{1,0:T(8,128)}), f32[8,128]{1,0:T(8,128)}, u32[]) async-start(%get-tuple-element.9), calls=%wrapped_rs
      %async-done = f32[8,128]{1,0:T(8,128)} async-done(%async-start), calls=%wrapped_rs
      %pred.1 = pred[]{:T(512)} constant(true)
      %index.1 = s32[]{:T(128)} convert(%pred.1)
      ROOT %conditional.1 = f32[64,128]{1,0:T(8,128)} conditional(%index.1, %get-tuple-element.9, %get-tuple-element.9), branch_computations={%branch_small, %branch_big}
    }
    """)


def test_a_tpu_style_module_convolutions_inferred_trip_counts_async_pairs():
  stats = hlo_stats.hlo_stats(TPU_STYLE)
  projection = 2 * 64 * 128 * 128  # [64, 128] @ [128, 4 x 32]: the window only meets the one input row
  scores = 4 * 2 * 64 * 64 * 32  # 4 heads of [64, 32] @ [32, 64]: only the diagonal of the dilated window
  branch = 2 * 64 * 128 * 128
  assert stats.loops == 1 and stats.unknown_trip_counts == 0  # i = 0; i < 4; i += 1, read off the loop
  assert stats.flops == 4 * (projection + scores) + branch
  assert stats.flops_once == projection + scores + branch
  assert stats.dots == 3 and stats.conditionals == 1
  assert stats.collectives == {  # all-gather and all-reduce pairs once each, 4 times; the wrapper once
      "all-gather": (4, 4 * 64 * 128 * 4), "all-reduce": (4, 4 * 64 * 128 * 4), "reduce-scatter": (1, 8 * 128 * 4)}
  assert stats.collectives_once["all-gather"] == (1, 64 * 128 * 4)
  # The CPU/GPU compilers' known_trip_count wins over the loop's own pattern.
  known = TPU_STYLE.replace('op_name="jit(step_fn)/while"}', 'op_name="jit(step_fn)/while"}, '
                            'backend_config={"known_trip_count":{"n":"7"}}')
  assert hlo_stats.hlo_stats(known).flops == 7 * (projection + scores) + branch
  # A counter compared with a loop-carried bound: unknown, counted once.
  unknown = TPU_STYLE.replace("compare(%get-tuple-element.3, %constant.4)",
                              "compare(%get-tuple-element.3, %get-tuple-element.3)")
  assert hlo_stats.hlo_stats(unknown).unknown_trip_counts == 1
  assert hlo_stats.hlo_stats(unknown).flops == projection + scores + branch


def test_inline_operand_types_are_read_too():
  text = textwrap.dedent("""\
      HloModule m

      ENTRY %main (a: f32[8,16], b: f32[16,32]) -> f32[8,32] {
        %a = f32[8,16]{1,0} parameter(0)
        %b = f32[16,32]{1,0} parameter(1)
        ROOT %dot = f32[8,32]{1,0} dot(f32[8,16]{1,0} %a, f32[16,32]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
      }
      """)
  assert hlo_stats.hlo_stats(text).flops == 2 * 8 * 16 * 32


def test_gpu_gemm_custom_calls_are_dots():
  # As XLA's GPU compiler prints a cuBLAS GEMM (a hand-written module: no names' `%`, no signature).
  text = textwrap.dedent("""\
      HloModule m

      ENTRY e {
        p1 = bf16[3,16,32]{2,1,0} parameter(0)
        p2 = bf16[32,64]{1,0} parameter(1)
        gemm = (bf16[3,16,64]{2,1,0}, s8[1028]{0}) custom-call(p1, p2), custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0","wait_on_operation_queues":[],"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}, metadata={op_name="x"}
        ROOT out = bf16[3,16,64]{2,1,0} get-tuple-element(gemm), index=0
      }
      """)
  stats = hlo_stats.hlo_stats(text)
  assert stats.flops == 2 * 3 * 16 * 64 * 32 and stats.dots == 1


def test_kernels_count_the_flops_they_declare_else_are_reported_opaque():
  # A Pallas kernel on TPU as XLA prints it (cost_estimate from `pl.pallas_call(cost_estimate=...)`).
  declared = ('{"custom_call_config":{"body":"TUzvUgF","cost_estimate":{"flops":"4194304","transcendentals":"0",'
              '"bytes_accessed":"196608"},"needs_layout_passes":true}}')
  text = textwrap.dedent(f"""\
      HloModule m

      ENTRY %main (x: f32[128,128]) -> (f32[128,128], f32[128,128]) {{
        %x = f32[128,128]{{1,0:T(8,128)}} parameter(0)
        %a = f32[128,128]{{1,0:T(8,128)}} custom-call(%x, %x), custom_call_target="tpu_custom_call", backend_config={declared}
        %b = f32[128,128]{{1,0:T(8,128)}} custom-call(%x, %x), custom_call_target="tpu_custom_call", backend_config={{"custom_call_config":{{"body":"TUzvUgF"}}}}
        %c = f32[128,128]{{1,0:T(8,128)}} custom-call(), custom_call_target="AllocateBuffer"
        ROOT %t = (f32[128,128]{{1,0:T(8,128)}}, f32[128,128]{{1,0:T(8,128)}}) tuple(%a, %b)
      }}
      """)
  stats = hlo_stats.hlo_stats(text)
  assert stats.flops == 4194304 and stats.opaque_kernels == {"tpu_custom_call": 1} and not stats.exact


EIGHT_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxlm import hlo_stats

    mesh = jax.make_mesh((8,), ("x",))
    def body(c, w):
      c = c @ w                                                     # [4, 16] @ [16, 16] per device
      total = jax.lax.psum(c, "x")                                  # all-reduce f32[4, 16]
      gathered = jax.lax.all_gather(c, "x", tiled=True)             # all-gather f32[32, 16]
      scattered = jax.lax.psum_scatter(gathered, "x", tiled=True)   # reduce-scatter f32[4, 16]
      shifted = jax.lax.ppermute(c, "x", [(i, (i + 1) % 8) for i in range(8)])  # collective-permute
      swapped = jax.lax.all_to_all(gathered, "x", 0, 0, tiled=True)  # all-to-all 8 x f32[4, 16]
      return total + scattered + shifted + swapped[:4], None
    step = jax.shard_map(lambda x, w: jax.lax.scan(body, x, w)[0], mesh=mesh, in_specs=(P("x"), P()),
                         out_specs=P("x"))
    x = jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((3, 16, 16), jnp.float32, sharding=NamedSharding(mesh, P()))
    stats = hlo_stats.stats_of(jax.jit(step).lower(x, w).compile())
    small, large = 4 * 16 * 4, 32 * 16 * 4
    assert stats.flops == 3 * 2 * 4 * 16 * 16, stats
    assert stats.collectives == {"all-reduce": (3, 3 * small), "all-gather": (3, 3 * large),
                                 "reduce-scatter": (3, 3 * small), "collective-permute": (3, 3 * small),
                                 "all-to-all": (3, 3 * large)}, stats
    assert stats.collectives_once["all-gather"] == (1, large), stats

    # A sharded jit (GSPMD inserts the collective): a row-sharded matmul's sum in a scan of 5.
    def summed(x, w):
      return jax.lax.scan(lambda c, wi: (c + jnp.sum(x @ wi, axis=0), None), jnp.zeros(16), w)[0]
    x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((5, 16, 16), jnp.float32, sharding=NamedSharding(mesh, P()))
    stats = hlo_stats.stats_of(jax.jit(summed, out_shardings=NamedSharding(mesh, P())).lower(x, w).compile())
    assert stats.flops == 5 * 2 * 8 * 16 * 16, stats
    count, size = stats.collectives["all-reduce"]
    assert count % 5 == 0 or count == 1, stats  # in the loop (5 x) or hoisted out of it by XLA
    print("OK")
    """)


def test_collectives_on_eight_fake_devices_times_the_trip_count():
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=path)
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def _tiny_train_step(**model_overrides):
  """(compiled `:tiny` pretraining step on one CPU device, its ModelConfig, tokens per call, T)."""
  from configs import pretrain
  from jaxlm import losses
  from jaxlm import model as model_lib
  from jaxlm import sharding
  from jaxlm import stage
  from jaxlm import training

  config = pretrain.get_config("tiny")
  config.model.update(model_overrides)
  assert config.steps_per_call == 1
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  model_config = stage.model_config(config.model, vocab_size=config.tokenizer.vocab_size)
  spec = stage.state_spec(config, functools.partial(model_lib.init_params, model_config), mesh, rules)
  step = training.make_train_step(losses.lm_loss_fn(model_lib.Transformer(model_config)), spec.tx, mesh=mesh,
                                  state_shardings=spec.shardings, schedule_fn=spec.schedule,
                                  num_microbatches=config.num_microbatches, steps_per_call=1, rules=rules)
  shape, split = (config.batch_size, config.seq_len), training.batch_sharding(mesh, rules)
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=split) for name, dtype in
           (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.bool_), ("segment_ids", jnp.int32),
            ("positions", jnp.int32))}
  with sharding.use_mesh(mesh, rules):
    compiled = step.jitted.lower(spec.abstract_state, batch).compile()
  return compiled, model_config, config.batch_size * config.seq_len, config.seq_len


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_tiny_pretraining_step_executes_the_model_formula(remat):
  """Every matmul of the step: 6 x (matmul parameters) per token, attention's score and value
  matmuls over the full T x T (XLA's attention computes the masked half too), and with full
  remat the blocks' forward once more (2 x their parameters but the last matmul's, whose output
  the backward pass does not need, + the attention's forward)."""
  from jaxlm import model as model_lib

  compiled, c, tokens, seq_len = _tiny_train_step(remat_policy=remat)
  stats = hlo_stats.stats_of(compiled)
  layers = model_lib.num_params(c, include_embedding=False) - (2 * c.num_layers + 1) * c.embed_dim  # no norms
  matmul_params = layers + c.vocab_size * c.embed_dim  # + the LM head (tied: the embedding)
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len  # full T x T, forward + backward
  expected = (6 * matmul_params + attention) * tokens
  if remat == "full":  # The blocks' forward again, but for the MLP's down-projection: its output is dead.
    expected += (2 * (layers - c.num_layers * c.embed_dim * c.mlp_dim) + attention / 3) * tokens
  assert stats.exact and stats.loops >= 2
  assert stats.flops == expected
  formula = model_lib.flops_per_token(c, seq_len, causal=True) * tokens
  assert 1.0 < stats.flops / formula < (1.1 if remat == "none" else 1.45)
  assert stats.flops > 3 * _cost_flops(compiled)  # XLA's count sees one layer of the scan
