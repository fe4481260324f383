"""Utilities over a transformer parameter tree (`jaxlm/model.py`'s layout), independent of the model code.

  is_boxed / require_plain   whether leaves still carry `nn.Partitioned` logical-axis boxes
  decay_mask                 which leaves AdamW's weight decay touches (kernels, the embedding)
  unstack_layers             scanned layout (`layers` with a leading L axis) -> `layers_0`, ...
  stack_layers               the inverse
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def is_boxed(tree) -> bool:
  """True if any leaf is still wrapped in flax axis metadata (`nn.Partitioned`)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return any(isinstance(leaf, nn.meta.AxisMetadata) for leaf in leaves)


def require_plain(params: dict, what: str) -> None:
  """Raises ValueError naming `what` if `params` is boxed."""
  if is_boxed(params):
    raise ValueError(f"{what} takes plain params; apply sharding.unbox first")


def decay_mask(params: dict) -> dict:
  """True for leaves that weight decay should touch: kernels and the embedding, not norm
  scales or biases. By name, because with scanned layers a norm scale is 2-D too."""
  def decays(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, nn.meta.unbox(params))


@jax.jit  # one compiled program instead of one eager op per slice
def unstack_layers(params: dict) -> dict:
  """Scanned layout (`layers` with a leading L axis) -> `layers_0`, ... (plain trees only)."""
  require_plain(params, "unstack_layers")
  params = dict(params)
  layers = params.pop("layers")
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
  return params


@jax.jit
def stack_layers(params: dict) -> dict:
  """`layers_0`, ... -> the scanned layout (plain trees only)."""
  require_plain(params, "stack_layers")
  params = dict(params)
  keys = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params.pop(k) for k in keys])
  return params
