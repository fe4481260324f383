"""The transformer's configuration and its arithmetic: shape, numerics, parameter and FLOP counts.

`ModelConfig` is what every stage, checkpoint and the planner read to know a model without
building it; `jaxlm/model.py` builds the `Transformer` from it (and re-exports these names, so
`model.ModelConfig`, `model.num_params` and `model.flops_per_token` are the usual spellings).
"""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import attention

# Rematerialisation policies by name (`ModelConfig.remat_policy`), applied per block:
#   none                              keep every activation (fastest, most memory)
#   full                              keep only the block inputs; recompute the rest
#   dots_saveable                     keep matmul outputs, recompute elementwise ops
#   dots_with_no_batch_dims_saveable  keep projections' outputs, recompute attention scores too
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the transformer; frozen (hashable) so jitted code can close over it.

  Attributes:
    vocab_size: V, set from the tokenizer.
    embed_dim: E, the residual stream width.
    num_layers: L.
    num_heads: H, query heads.
    num_kv_heads: Hkv, key/value heads; divides H (H == Hkv is plain multi-head attention).
    head_dim: Dh, even (RoPE rotates pairs).
    mlp_dim: M, the SwiGLU hidden width (~8/3 E keeps the parameter count of a 4E GELU MLP).
    max_len: the longest sequence trained or sampled; the default cache length. RoPE has no
      table, so this is a contract, not a buffer.
    tie_embeddings: the LM head reuses the token embedding (transposed).
    rope_theta: RoPE base; wavelengths span 2 pi .. 2 pi theta.
    rope_scaling: None (plain RoPE) or how to rescale RoPE's frequencies, in Hugging Face's
      spelling: {"rope_type": "linear", "factor": 4.0}, or {"rope_type": "llama3", "factor":
      8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings":
      8192} (Llama 3.1+); "type" is read as "rope_type" (older configs), a rope_theta key is
      accepted if it equals `rope_theta` (transformers 5's `rope_parameters`), and {"rope_type":
      "default"} is None. The math: `attention.rope_frequencies`. Any other rope_type (yarn,
      dynamic, longrope, ...), a missing or unknown key is a ValueError. Given as a mapping; held
      as a sorted tuple of (key, value) items so the config stays hashable (`to_dict` gives the
      mapping back).
    norm_eps: RMSNorm epsilon (also of the q/k norms).
    qkv_bias: biases on the q, k and v projections (Qwen2); none on o.
    qk_norm: an RMSNorm over Dh on every head of q and of k, after the projection and before
      RoPE, with one [Dh] scale for q and one for k shared by the heads (Qwen3).
    dtype: compute dtype, "float32" or "bfloat16". Parameters are always float32 and are cast
      at use; RoPE, softmax, logits and the scalar head are computed in float32, and so is an
      RMSNorm's normalisation, rounded to `dtype` before its scale multiplies it (as Hugging
      Face's models do).
    remat_policy: one of `REMAT_POLICIES`.
    scan_layers: `nn.scan` over layers: compile time stays flat in depth; params get a leading
      `layers` axis.
    scan_unroll: layers per iteration of that scan (its `unroll`); it changes how the model
      runs, not its parameters. 1 keeps compile time flat in depth; `num_layers` unrolls the
      loop, which ran a 4-layer DPO step on XLA:CPU 1.0-1.3x faster (no slicing of stacked
      weights and activations per iteration) for a compile time that grows with depth.
    attention_impl: the attention kernel without a cache (`jaxlm/attention.py`): None or "xla"
      (XLA, any backend), "blocked" (XLA in query blocks that skip the upper triangle: 1.9x
      faster on XLA:CPU at T = 192, the `cpu` preset's), "cudnn" (cuDNN flash attention, NVIDIA
      GPUs, bf16/fp16), "splash" (the Pallas splash kernel, TPUs), or "auto": cudnn on GPUs
      (bf16/fp16 compute), splash on TPUs, xla elsewhere (`attention.resolve`). It changes how
      the model runs, not what it computes (within float tolerance).
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  rope_scaling: Any = None  # None, or sorted ((key, value), ...) items; see above
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = False
  dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_len", "scan_unroll"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} not in {sorted(DTYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in attention.IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} not in {attention.IMPLS}")
    for name in ("qkv_bias", "qk_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    # Frozen: __post_init__ stores the normalised form through object.__setattr__.
    object.__setattr__(self, "rope_scaling",
                       _rope_scaling_items(self.rope_scaling, self.rope_theta))

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (for config.json and the checkpoint's model description)."""
    d = dataclasses.asdict(self)
    d["rope_scaling"] = self.rope_scaling_dict
    return d

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    """`rope_scaling` as a plain dict (None without scaling)."""
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Inverse of `to_dict`. Unknown keys are an error: a model must never load half-read."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(known)}")
    return cls(**d)


def _rope_scaling_items(value: Any, rope_theta: float) -> tuple[tuple[str, Any], ...] | None:
  """`ModelConfig.rope_scaling` validated and normalised: None, or sorted (key, value) items with
  numbers as floats (original_max_position_embeddings an int), so equal settings compare and
  hash equal however they were spelled (a dict, JSON, the items themselves).

  transformers 5 writes `rope_parameters`, the same mapping with rope_theta in it: accepted
  (and dropped) when it equals `ModelConfig.rope_theta`.
  """
  if value is None:
    return None
  if hasattr(value, "items"):  # a dict, any Mapping, an ml_collections ConfigDict
    d = dict(value.items())
  elif isinstance(value, (tuple, list)) and all(
      isinstance(item, (tuple, list)) and len(item) == 2 for item in value):
    d = dict(value)
  else:
    raise ValueError(f"ModelConfig.rope_scaling must be None or a mapping such as "
                     f"{{'rope_type': 'linear', 'factor': 4.0}}, got {value!r}")
  if "type" in d:  # the older spelling of rope_type (transformers reads it the same way)
    kind = d.pop("type")
    if d.setdefault("rope_type", kind) != kind:
      raise ValueError(f"ModelConfig.rope_scaling has type={kind!r} and rope_type="
                       f"{d['rope_type']!r}: {value!r}")
  if "rope_type" not in d:
    raise ValueError(f"ModelConfig.rope_scaling has no 'rope_type': {value!r}")
  if "rope_theta" in d:
    if d.pop("rope_theta") != rope_theta:
      raise ValueError(f"ModelConfig.rope_scaling has a rope_theta other than "
                       f"ModelConfig.rope_theta={rope_theta!r}: {value!r}")
  kind, supported = d["rope_type"], {"default": (), **attention.ROPE_SCALING_KEYS}
  if kind not in supported:
    raise ValueError(f"ModelConfig.rope_scaling: rope_type {kind!r} is not supported (only "
                     f"{list(supported)}): {value!r}")
  needed = set(supported[kind])
  missing, unknown = sorted(needed - set(d)), sorted(set(d) - needed - {"rope_type"})
  if missing:
    raise ValueError(f"ModelConfig.rope_scaling ({kind}) lacks {missing}: {value!r}")
  if unknown:
    raise ValueError(f"ModelConfig.rope_scaling ({kind}) has unknown keys {unknown}: {value!r}")
  if kind == "default":
    return None
  for key in needed:
    number = d[key]
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not number > 0:
      raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a positive number: {value!r}")
    if key == "original_max_position_embeddings":
      if number != int(number):
        raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be an integer: {value!r}")
      d[key] = int(number)
    else:
      d[key] = float(number)
  if kind == "llama3" and not d["high_freq_factor"] > d["low_freq_factor"]:
    raise ValueError(f"ModelConfig.rope_scaling: high_freq_factor must exceed low_freq_factor "
                     f"(the smoothing divides by their difference): {value!r}")
  return tuple(sorted(d.items()))


def num_params(config: ModelConfig, *, include_embedding: bool = True,
               scalar_head: bool = False) -> int:
  """Exact parameter count of the tree that `init_params` creates.

  With `include_embedding=False` every [V, E] matrix (the token embedding, and the LM head when
  untied) is left out: the "non-embedding" count of Kaplan et al. (2020).
  """
  c = config
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o, k, v
  if c.qkv_bias:
    attn += c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
  if c.qk_norm:
    attn += 2 * c.head_dim  # the q and k norm scales
  mlp = 3 * c.embed_dim * c.mlp_dim
  per_layer = attn + mlp + 2 * c.embed_dim  # + two RMSNorm scales
  total = c.num_layers * per_layer + c.embed_dim  # + final norm
  if include_embedding:
    total += c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  if scalar_head:
    total += c.embed_dim + 1
  return total


def flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Dh T.

  N is the parameters that take part in a matmul per token: the non-embedding parameters plus
  one V x E matrix for the LM head (tied or not; the input embedding is a gather and costs
  nothing). 12 L H Dh T is the attention score and value matmuls over a full T x T matrix, as
  PaLM counts it; `causal=True` halves it (a causal kernel skips the upper triangle), which is
  the honest number for flash attention. Norms, biases and softmax are not matmuls; their few
  parameters (norm scales, q/k/v biases) are counted in N all the same, a negligible excess.
  MFU = tokens/s * flops_per_token / peak FLOP/s.
  """
  c = config
  n = num_params(c, include_embedding=False) + c.vocab_size * c.embed_dim
  attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len
  return 6.0 * n + (attention / 2 if causal else attention)
