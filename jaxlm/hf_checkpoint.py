"""Hugging Face checkpoints <-> jaxlm parameter trees: configs, tensor names, sharded reading.

Supported (`ARCHITECTURES`): Llama (2, 3, 3.1, 3.2: tied or not, rope_scaling "llama3" or
"linear"), Mistral (head_dim != hidden / heads allowed), Qwen2/2.5 (q/k/v biases, an embedding
larger than the tokenizer) and Qwen3 (QK-norm), as `*ForCausalLM`, and as
`*ForSequenceClassification` with one label (a reward model). Anything else (another
architecture, an activation other than silu, biases on o or the MLP, an active sliding window,
a rope type jaxlm does not compute, quantised weights, ...) is refused with an `HFConfigError`
naming the config.json key: a checkpoint is never approximated.

Layouts. transformers' `nn.Linear` stores weight [out, in] (y = x W^T); jaxlm's kernels are
[in, out...] with heads split out (`jaxlm/model.py`, scan_layers=True: stacked over layers)::

  model.embed_tokens.weight                   [V, E]      embed/embedding [V, E]
  model.layers.{i}.input_layernorm.weight     [E]         layers/attn_norm/scale [L, E]
  model.layers.{i}.self_attn.q_proj.weight    [H*Dh, E]   layers/attn/q/kernel [L, E, H, Dh]
  model.layers.{i}.self_attn.k_proj.weight    [Hkv*Dh, E] layers/attn/k/kernel [L, E, Hkv, Dh]
  model.layers.{i}.self_attn.v_proj.weight    [Hkv*Dh, E] layers/attn/v/kernel [L, E, Hkv, Dh]
  model.layers.{i}.self_attn.{q,k,v}_proj.bias [N*Dh]     layers/attn/{q,k,v}/bias [L, N, Dh]
  model.layers.{i}.self_attn.{q,k}_norm.weight [Dh]       layers/attn/{q,k}_norm/scale [L, Dh]
  model.layers.{i}.self_attn.o_proj.weight    [E, H*Dh]   layers/attn/o/kernel [L, H, Dh, E]
  model.layers.{i}.post_attention_layernorm.weight [E]    layers/mlp_norm/scale [L, E]
  model.layers.{i}.mlp.gate_proj.weight       [M, E]      layers/mlp/gate/kernel [L, E, M]
  model.layers.{i}.mlp.up_proj.weight         [M, E]      layers/mlp/up/kernel [L, E, M]
  model.layers.{i}.mlp.down_proj.weight       [E, M]      layers/mlp/down/kernel [L, M, E]
  model.norm.weight                           [E]         final_norm/scale [E]
  lm_head.weight                              [V, E]      lm_head/kernel [E, V] (untied only)
  score.weight                                [1, E]      scalar_head/kernel [E] (reward model)

RoPE needs no permutation: both rotate the pairs (x[i], x[i + Dh/2]) (`attention.apply_rope`).

Reading (`load_params`) never holds a whole checkpoint in host memory: every jaxlm parameter
is built with `jax.make_array_from_callback` straight onto its sharding, and the callback reads,
for each device's shard, only the layers and the rows/columns of each HF tensor that the shard
covers (safetensors slices are memory-mapped reads), so an 8B model loads on a host with a
fraction of its size free. bf16 and fp16 tensors are read exactly and widened to float32 (jaxlm
keeps float32 parameters).

Writing (`save_params`) is the inverse, in float32 or bfloat16, one tensor in host memory at a
time per shard file (HF's 5 GB shards and index above that size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm import errors
from jaxlm.model_config import ModelConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What an import copies next to the checkpoint and an export writes back (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")
HASHED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SCORE_BIAS_KEY = "jaxlm_score_bias"  # config.json key holding the reward head's bias (see save_params)
MAX_SHARD_BYTES = 5 * 1024 ** 3

# family -> (model_type, the config's q/k/v bias, QK-norm); architectures name a family.
FAMILIES = {"llama": ("llama", False, False), "mistral": ("mistral", False, False),
            "qwen2": ("qwen2", True, False), "qwen3": ("qwen3", False, True)}
ARCHITECTURES = {f"{prefix}For{head}": family
                 for family, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"),
                                        ("qwen3", "Qwen3"))
                 for head in ("CausalLM", "SequenceClassification")}
# Keys whose presence (with a value other than the harmless one) changes the function computed.
_REFUSED_KEYS = {"quantization_config": None, "num_local_experts": None, "num_experts": None,
                 "attn_logit_softcapping": None, "final_logit_softcapping": None,
                 "query_pre_attn_scalar": None, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
                 "attention_multiplier": None, "residual_multiplier": 1.0, "partial_rotary_factor": 1.0}
# Tensors old checkpoints carry that hold nothing learned.
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


class HFConfigError(errors.UserError, ValueError):
  """A Hugging Face config.json (or checkpoint) jaxlm cannot represent exactly; names the key."""


def is_reward_architecture(architecture: str) -> bool:
  return architecture.endswith("ForSequenceClassification")


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise errors.MissingError(f"{path} not found: expected a Hugging Face model directory "
                              "(config.json, model.safetensors, tokenizer files)") from None
  except json.JSONDecodeError as e:
    raise HFConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


# --- config.json -> ModelConfig ----------------------------------------------------------------


def architecture_of(hf_config: Mapping[str, Any], source: str = CONFIG_FILE) -> str:
  """The one supported architecture `hf_config["architectures"]` names, else HFConfigError."""
  archs = hf_config.get("architectures")
  if not isinstance(archs, list) or len(archs) != 1:
    raise HFConfigError(f"{source}: key 'architectures' must list exactly one architecture, got "
                        f"{archs!r}; supported: {sorted(ARCHITECTURES)}")
  arch = archs[0]
  if arch not in ARCHITECTURES:
    raise HFConfigError(f"{source}: key 'architectures' names {arch!r}, which jaxlm does not "
                        f"import (it would not compute the same function); supported: "
                        f"{sorted(ARCHITECTURES)}")
  model_type = hf_config.get("model_type")
  expected = FAMILIES[ARCHITECTURES[arch]][0]
  if model_type is not None and model_type != expected:
    raise HFConfigError(f"{source}: key 'model_type' is {model_type!r} but 'architectures' says "
                        f"{arch} (model_type {expected!r})")
  if is_reward_architecture(arch) and int(hf_config.get("num_labels", len(hf_config.get("id2label") or [0]))) != 1:
    raise HFConfigError(f"{source}: key 'num_labels'/'id2label': a {arch} must have exactly one label "
                        "(a scalar reward) to map onto jaxlm's scalar head")
  return arch


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, dict | None, str]:
  """(rope_theta, rope_scaling or None, the key the scaling came from)."""
  params = hf.get("rope_parameters")
  key = "rope_parameters" if params is not None else "rope_scaling"
  scaling = dict(params) if params is not None else hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  if scaling is not None:
    scaling = dict(scaling)
    if "rope_theta" in scaling:
      inner = scaling.pop("rope_theta")
      if theta is not None and float(theta) != float(inner):
        raise HFConfigError(f"{source}: keys 'rope_theta' ({theta}) and '{key}.rope_theta' ({inner}) disagree")
      theta = inner
    if scaling.get("rope_type", scaling.get("type")) in (None, "default") and set(scaling) <= {"rope_type", "type"}:
      scaling = None
  return float(10_000.0 if theta is None else theta), scaling, key


def _sliding_window_active(hf: Mapping[str, Any], family: str) -> str | None:
  """The config.json key that turns on sliding-window attention, or None when it is off."""
  if "sliding_attention" in (hf.get("layer_types") or ()):
    return "layer_types"
  if family in ("qwen2", "qwen3"):
    return "use_sliding_window" if hf.get("use_sliding_window") else None
  if family == "mistral":  # transformers' Mistral applies any non-null window
    return "sliding_window" if hf.get("sliding_window") is not None else None
  return None


def _check_supported(hf: Mapping[str, Any], family: str, source: str) -> None:
  act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
  if act != "silu":
    raise HFConfigError(f"{source}: key 'hidden_act' is {act!r}; jaxlm's MLP is SwiGLU with silu only")
  if hf.get("mlp_bias"):
    raise HFConfigError(f"{source}: key 'mlp_bias' is true; jaxlm's MLP has no biases")
  if hf.get("attention_bias"):
    raise HFConfigError(f"{source}: key 'attention_bias' is true: {family} then adds biases to q, k, v "
                        "and o; jaxlm has q/k/v biases (Qwen2 style) but none on o")
  window = _sliding_window_active(hf, family)
  if window:
    raise HFConfigError(f"{source}: key {window!r} turns on sliding-window attention "
                        f"(window {hf.get('sliding_window')}); jaxlm attends to the whole context, "
                        "which differs beyond the window")
  for key, harmless in _REFUSED_KEYS.items():
    if hf.get(key) not in (None, harmless):
      raise HFConfigError(f"{source}: key {key!r} is {hf[key]!r}; jaxlm has no such feature")


def _positive_int(hf: Mapping[str, Any], key: str, source: str, default: Any = None) -> int:
  value = hf.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise HFConfigError(f"{source}: key {key!r} must be a positive integer, got {value!r}")
  return value


def model_config_from_hf(hf_config: Mapping[str, Any], *, source: str = CONFIG_FILE,
                         dtype: str = "float32", max_len: int | None = None) -> ModelConfig:
  """The `ModelConfig` of an HF config.json (a dict), or HFConfigError naming the key.

  Args:
    hf_config: the parsed config.json (transformers 4 or 5 spelling: `rope_scaling` +
      `rope_theta`, or `rope_parameters` holding both).
    source: how to name the file in errors.
    dtype: jaxlm's compute dtype for the model (parameters stay float32).
    max_len: ModelConfig.max_len; default config.json's max_position_embeddings.
  """
  hf = dict(hf_config)
  arch = architecture_of(hf, source)
  family = ARCHITECTURES[arch]
  _check_supported(hf, family, source)
  embed = _positive_int(hf, "hidden_size", source)
  heads = _positive_int(hf, "num_attention_heads", source)
  kv_heads = _positive_int(hf, "num_key_value_heads", source, heads)
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if embed % heads:
      raise HFConfigError(f"{source}: key 'head_dim' is missing and hidden_size {embed} is not a "
                          f"multiple of num_attention_heads {heads}")
    head_dim = embed // heads
  theta, scaling, rope_key = _rope_from_hf(hf, source)
  _, qkv_bias, qk_norm = FAMILIES[family]
  fields = dict(
      vocab_size=_positive_int(hf, "vocab_size", source), embed_dim=embed,
      num_layers=_positive_int(hf, "num_hidden_layers", source), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, mlp_dim=_positive_int(hf, "intermediate_size", source),
      max_len=max_len or _positive_int(hf, "max_position_embeddings", source, 2048),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False: these classes' default
      rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=qkv_bias, qk_norm=qk_norm, dtype=dtype)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    key = rope_key if "rope_scaling" in str(e) else "num_key_value_heads/head_dim"
    raise HFConfigError(f"{source}: key {key!r}: {e}") from None


# --- ModelConfig -> config.json ----------------------------------------------------------------


def architecture_for(config: ModelConfig, *, reward: bool = False, family: str | None = None) -> str:
  """The HF architecture that computes what `config` does: the family's, or (for a model grown
  by jaxlm) Llama, Qwen2 when it has q/k/v biases, Qwen3 when it has QK-norm."""
  if family is None:
    if config.qkv_bias and config.qk_norm:
      raise HFConfigError("no Hugging Face architecture has both q/k/v biases and QK-norm")
    family = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
  _, qkv_bias, qk_norm = FAMILIES[family]
  if (config.qkv_bias, config.qk_norm) != (qkv_bias, qk_norm):
    raise HFConfigError(f"a {family} model has qkv_bias={qkv_bias}, qk_norm={qk_norm}; this model has "
                        f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}")
  prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
  return f"{prefix}For{'SequenceClassification' if reward else 'CausalLM'}"


def hf_config_from_model(config: ModelConfig, architecture: str, *, dtype: str = "float32",
                         base: Mapping[str, Any] | None = None,
                         extra: Mapping[str, Any] | None = None) -> dict:
  """config.json for `config` as `architecture` (transformers-4 spelling, which 5 reads too).

  Args:
    base: the imported model's original config.json: its other keys (token ids, ...) are kept
      and every key that decides the function is overwritten from `config`.
    dtype: "float32" or "bfloat16", the tensors' dtype (written as torch_dtype and dtype).
    extra: more keys (token ids, the reward head's bias, ...).
  """
  family = ARCHITECTURES[architecture]
  hf = {k: v for k, v in dict(base or {}).items()
        if k not in ("rope_parameters", "rope_scaling", "rope_theta", "architectures", "torch_dtype",
                     "dtype", "transformers_version", "layer_types")}
  hf.update({
      "architectures": [architecture], "model_type": FAMILIES[family][0], "hidden_act": "silu",
      "hidden_size": config.embed_dim, "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "vocab_size": config.vocab_size, "max_position_embeddings": config.max_len,
      "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
      "rope_scaling": config.rope_scaling_dict, "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": dtype, "dtype": dtype})
  if family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    hf["sliding_window"] = None
  else:
    hf["use_sliding_window"] = False
    if family == "qwen3":
      hf["attention_bias"] = False
  if is_reward_architecture(architecture):
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  hf.update(dict(extra or {}))
  return dict(sorted(hf.items()))


# --- Tensor names and layouts ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One jaxlm parameter and the HF tensor(s) it is made of.

  path: the key path in the params tree; hf_name: the HF tensor name ("{i}" = layer, when
  `stacked`); kind: the layout relation (`_TO_JAXLM`); shape: the jaxlm shape (with [L] when
  stacked); hf_shape: one HF tensor's shape.
  """

  path: tuple[str, ...]
  hf_name: str
  kind: str
  shape: tuple[int, ...]
  hf_shape: tuple[int, ...]
  stacked: bool = True


def param_specs(config: ModelConfig, architecture: str) -> list[ParamSpec]:
  """Every parameter of `config` (scan_layers layout) as `architecture`, in HF's tensor order."""
  c, L = config, config.num_layers
  E, H, K, D, M, V = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
  layer, attn = "model.layers.{i}.", "model.layers.{i}.self_attn."
  specs = [ParamSpec(("embed", "embedding"), "model.embed_tokens.weight", "same", (V, E), (V, E), False)]
  specs.append(ParamSpec(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", "same", (L, E), (E,)))
  for name, n in (("q", H), ("k", K), ("v", K)):
    specs.append(ParamSpec(("layers", "attn", name, "kernel"), f"{attn}{name}_proj.weight", "in_heads",
                           (L, E, n, D), (n * D, E)))
    if c.qkv_bias:
      specs.append(ParamSpec(("layers", "attn", name, "bias"), f"{attn}{name}_proj.bias", "heads",
                             (L, n, D), (n * D,)))
  if c.qk_norm:
    for name in ("q_norm", "k_norm"):
      specs.append(ParamSpec(("layers", "attn", name, "scale"), f"{attn}{name}.weight", "same", (L, D), (D,)))
  specs.append(ParamSpec(("layers", "attn", "o", "kernel"), attn + "o_proj.weight", "heads_out",
                         (L, H, D, E), (E, H * D)))
  specs.append(ParamSpec(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", "same",
                         (L, E), (E,)))
  for name in ("gate", "up"):
    specs.append(ParamSpec(("layers", "mlp", name, "kernel"), f"{layer}mlp.{name}_proj.weight", "transpose",
                           (L, E, M), (M, E)))
  specs.append(ParamSpec(("layers", "mlp", "down", "kernel"), layer + "mlp.down_proj.weight", "transpose",
                         (L, M, E), (E, M)))
  specs.append(ParamSpec(("final_norm", "scale"), "model.norm.weight", "same", (E,), (E,), False))
  if is_reward_architecture(architecture):
    specs.append(ParamSpec(("scalar_head", "kernel"), "score.weight", "row", (E,), (1, E), False))
  elif not c.tie_embeddings:
    specs.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", "transpose", (E, V), (V, E), False))
  return specs


def _bounds(index: Sequence[slice], shape: Sequence[int]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {index}")
    out.append((start, stop))
  return out


def _read_part(kind: str, get: Callable[[tuple[slice, ...]], np.ndarray], bounds: Sequence[tuple[int, int]],
               shape: Sequence[int]) -> np.ndarray:
  """The block `bounds` (one (start, stop) per axis of one layer's jaxlm array of shape `shape`)
  of that array, reading through `get` (a safetensors slice of the HF tensor) only the HF rows
  and columns the block needs: whole heads of q/k/v/o, then the block's part of Dh."""
  if kind == "same":
    return get(tuple(slice(a, b) for a, b in bounds))
  if kind == "transpose":  # jaxlm [in, out] <- HF [out, in]
    (i0, i1), (o0, o1) = bounds
    return get((slice(o0, o1), slice(i0, i1))).T
  if kind == "row":  # jaxlm [E] <- HF [1, E]
    (e0, e1), = bounds
    return get((slice(0, 1), slice(e0, e1)))[0]
  dh = shape[-1] if kind in ("in_heads", "heads") else shape[1]
  if kind == "in_heads":  # jaxlm [E, N, Dh] <- HF [N*Dh, E]
    (e0, e1), (n0, n1), (d0, d1) = bounds
    rows = get((slice(n0 * dh, n1 * dh), slice(e0, e1)))  # [n*Dh, e]
    return rows.T.reshape(e1 - e0, n1 - n0, dh)[:, :, d0:d1]
  if kind == "heads":  # jaxlm [N, Dh] <- HF [N*Dh]
    (n0, n1), (d0, d1) = bounds
    return get((slice(n0 * dh, n1 * dh),)).reshape(n1 - n0, dh)[:, d0:d1]
  if kind == "heads_out":  # jaxlm [H, Dh, E] <- HF [E, H*Dh]
    (h0, h1), (d0, d1), (e0, e1) = bounds
    cols = get((slice(e0, e1), slice(h0 * dh, h1 * dh)))  # [e, h*Dh]
    return cols.T.reshape(h1 - h0, dh, e1 - e0)[:, d0:d1, :]
  raise ValueError(f"unknown layout kind {kind!r}")


def _to_hf(kind: str, value: np.ndarray) -> np.ndarray:
  """One layer's whole jaxlm array -> the HF tensor (the inverse of `_read_part`)."""
  if kind == "same":
    return value
  if kind == "transpose":
    return value.T
  if kind == "row":
    return value[None, :]
  if kind == "in_heads":  # [E, N, Dh] -> [N*Dh, E]
    return value.reshape(value.shape[0], -1).T
  if kind == "heads":
    return value.reshape(-1)
  if kind == "heads_out":  # [H, Dh, E] -> [E, H*Dh]
    return value.reshape(-1, value.shape[-1]).T
  raise ValueError(f"unknown layout kind {kind!r}")


# --- Reading safetensors -----------------------------------------------------------------------


class SafetensorsReader:
  """The tensors of model.safetensors or of the shards a model.safetensors.index.json lists.

  Tensors are read by slice (`read`), memory-mapped, one shard file open at a time per call, so
  reading a layer's part never loads the rest of the checkpoint. Use as a context manager.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    single = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.exists(index_path):
      weight_map = read_json(index_path).get("weight_map")
      if not isinstance(weight_map, dict):
        raise HFConfigError(f"{index_path}: key 'weight_map' must map tensor names to shard files")
      self.file_of = {name: os.path.join(directory, f) for name, f in weight_map.items()}
    elif os.path.exists(single):
      self.file_of = None
    else:
      raise errors.MissingError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory} (only "
                                "safetensors checkpoints are read; convert pytorch_model.bin first)")
    self._handles: dict[str, Any] = {}
    if self.file_of is None:
      self.file_of = {name: single for name in self._open(single).keys()}
    self.names = frozenset(self.file_of)

  def _open(self, path: str):
    if path not in self._handles:
      if not os.path.exists(path):
        raise errors.MissingError(f"{path} not found (named by {SAFETENSORS_INDEX})")
      self._handles[path] = safe_open(path, framework="numpy")
    return self._handles[path]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._open(self.file_of[name]).get_slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Tensor `name` (its block `index`), widened to float32."""
    piece = self._open(self.file_of[name]).get_slice(name)
    value = piece[index] if index is not None else piece[:]
    return np.asarray(value).astype(np.float32, copy=False)

  def close(self) -> None:
    self._handles.clear()  # safe_open handles release their memory maps when dropped

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_tensors(reader: SafetensorsReader, specs: Sequence[ParamSpec], config: ModelConfig) -> None:
  """Every tensor the specs need is there with its shape; no tensor is left unexplained."""
  expected = {}
  for spec in specs:
    for i in range(config.num_layers if spec.stacked else 1):
      expected[spec.hf_name.format(i=i)] = spec.hf_shape
  where = reader.directory
  missing = sorted(set(expected) - reader.names)
  if missing:
    hint = " (config.json says tie_word_embeddings=false)" if "lm_head.weight" in missing else ""
    raise HFConfigError(f"{where}: the checkpoint lacks tensor(s) {missing[:4]}{hint}")
  for name, shape in expected.items():
    if reader.shape(name) != shape:
      raise HFConfigError(f"{where}: tensor {name} has shape {list(reader.shape(name))}; config.json "
                          f"implies {list(shape)}")
  allowed_extra = {"lm_head.weight"} if config.tie_embeddings else set()
  extra = sorted(n for n in reader.names - set(expected) - allowed_extra
                 if not n.endswith(_IGNORED_TENSOR_SUFFIXES))
  if extra:
    raise HFConfigError(f"{where}: the checkpoint has tensor(s) jaxlm has no place for: {extra[:4]} "
                        "(an option config.json does not declare?)")


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load_params(hf_dir: str, config: ModelConfig, architecture: str, *,
                shardings: Any = None, score_bias: float = 0.0) -> dict:
  """The jaxlm params tree (scan_layers layout, float32) of an HF checkpoint directory.

  Args:
    hf_dir: holds model.safetensors or model.safetensors.index.json + shards.
    config, architecture: from `model_config_from_hf` / `architecture_of` of its config.json.
    shardings: a tree like the params with a `jax.sharding.Sharding` per leaf (e.g.
      `sharding.logical_shardings` of the abstract params), or one Sharding for all leaves, or
      None (each array on the first local device). Each device's shard is read straight from
      the files (see the module docstring).
    score_bias: the scalar head's bias for a *ForSequenceClassification checkpoint (HF's score
      has none; `save_params` records jaxlm's in config.json as `SCORE_BIAS_KEY`).

  Returns:
    {"embed": {"embedding": ...}, "layers": {...}, ...} of `jax.Array`s.
  """
  specs = param_specs(config, architecture)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params: dict = {}
  with SafetensorsReader(hf_dir) as reader:
    _check_tensors(reader, specs, config)
    for spec in specs:
      if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        target = shardings or default
      else:
        target = _get(shardings, spec.path)
      params_leaf = jax.make_array_from_callback(spec.shape, target, _callback(reader, spec))
      _set(params, spec.path, params_leaf)
  if is_reward_architecture(architecture):
    params["scalar_head"]["bias"] = jax.device_put(np.float32(score_bias), default)
  return params


def _callback(reader: SafetensorsReader, spec: ParamSpec) -> Callable[[tuple[slice, ...]], np.ndarray]:
  def read_block(index: tuple[slice, ...]) -> np.ndarray:
    bounds = _bounds(index, spec.shape)
    if not spec.stacked:
      return _read_part(spec.kind, lambda idx: reader.read(spec.hf_name, idx), bounds, spec.shape)
    (l0, l1), rest = bounds[0], bounds[1:]
    return np.stack([_read_part(spec.kind, lambda idx, i=i: reader.read(spec.hf_name.format(i=i), idx),
                                rest, spec.shape[1:]) for i in range(l0, l1)])
  return read_block


# --- Writing safetensors -----------------------------------------------------------------------


def _host(value: Any) -> np.ndarray:
  """A (possibly sharded, multi-host) array as one host numpy array."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(value)


def hf_tensors(params: Mapping, config: ModelConfig, architecture: str,
               dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
  """(name, tensor) in HF's order and layout, one layer's tensor at a time (a generator)."""
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  for spec in param_specs(config, architecture):
    try:
      value = _host(_get(params, spec.path))
    except KeyError:
      raise HFConfigError(f"the params tree has no {'/'.join(spec.path)} (expected for {architecture})") from None
    if value.shape != spec.shape:
      raise HFConfigError(f"params {'/'.join(spec.path)} has shape {list(value.shape)}, the model config "
                          f"implies {list(spec.shape)}")
    value = value.astype(np.float32)
    for i in range(config.num_layers if spec.stacked else 1):
      layer_value = value[i] if spec.stacked else value
      yield spec.hf_name.format(i=i), np.ascontiguousarray(_to_hf(spec.kind, layer_value).astype(np_dtype))


def save_params(params: Mapping, config: ModelConfig, architecture: str, out_dir: str, *,
                dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `params` as HF safetensors into `out_dir` (model.safetensors, or shards + index).

  A reward model (`architecture` *ForSequenceClassification) writes `scalar_head/kernel` as
  score.weight [1, E]. HF's score layer has no bias; jaxlm's `scalar_head/bias` is returned by
  `score_bias` for the caller to record in config.json (`SCORE_BIAS_KEY`). Dropping it loses
  nothing a reward model is for: Bradley-Terry sees only differences r(chosen) - r(rejected),
  so a constant shift of every reward is invisible to its loss, its accuracy and to PPO's
  advantages (up to the per-sequence constant the KL/whitening already absorbs).

  Returns:
    The file names written. Only process 0 writes; every process must call (gathers).
  """
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  names: list[str] = []
  for name, tensor in hf_tensors(params, config, architecture, dtype):
    if size + tensor.nbytes > max_shard_bytes and shards[-1]:
      if jax.process_index() == 0:
        names.append(_write_shard(shards[-1], out_dir, len(shards)))
      shards.append({})  # the previous shard's arrays are dropped here
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  if jax.process_index() != 0:
    return []
  if len(shards) == 1 and not names:
    save_file(shards[0], os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    return [SAFETENSORS_FILE]
  names.append(_write_shard(shards[-1], out_dir, len(shards)))
  total = len(names)
  weight_map, final = {}, []
  for k, tmp in enumerate(names, start=1):  # rename model-k.tmp -> model-0000k-of-0000n
    final_name = f"model-{k:05d}-of-{total:05d}.safetensors"
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final_name))
    with safe_open(os.path.join(out_dir, final_name), "numpy") as f:
      weight_map.update({key: final_name for key in f.keys()})
    final.append(final_name)
  total_size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in final)
  with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  return final + [SAFETENSORS_INDEX]


def _write_shard(tensors: Mapping[str, np.ndarray], out_dir: str, k: int) -> str:
  name = f"model-{k:05d}.tmp"
  save_file(dict(tensors), os.path.join(out_dir, name), metadata={"format": "pt"})
  return name


def score_bias(params: Mapping) -> float | None:
  """jaxlm's reward-head bias (None without a scalar head)."""
  head = params.get("scalar_head")
  return None if head is None else float(_host(head["bias"]))


# --- Tokenizer files and hashes ----------------------------------------------------------------


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def tokenizer_files_hash(directory: str) -> str:
  """sha256 over, for each of `HASHED_TOKENIZER_FILES` present in order, the bytes of
  ``name + "\\0" + sha256hex(file) + "\\n"``: the `content_hash` of `jaxlm.hf_tokenizer`."""
  digest = hashlib.sha256()
  for name in HASHED_TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      digest.update(f"{name}\0{file_sha256(path)}\n".encode())
  return digest.hexdigest()


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the `TOKENIZER_FILES` that `src_dir` has into `dst_dir`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(src_dir, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def num_params(params: Mapping) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
