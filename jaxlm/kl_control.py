"""KL-penalty controllers for PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2).

The PPO reward of each token carries `-kl_coef * kl` (see `jaxlm.rl_losses.per_token_rewards`).
A fixed coefficient is simplest; the adaptive controller instead steers the measured KL to the
policy's reference towards a target, so the same config works across reward scales:

    e = clip(KL / KL_target - 1, -0.2, 0.2),     coef <- coef * (1 + e * n_steps / horizon)

`n_steps` is the number of samples (episodes) the KL was measured on, so the coefficient moves
at most 20% per `horizon` samples whatever the batch size.

Controllers are immutable and functional: `update` returns a new controller. They are pytrees
(`flax.struct`) whose only leaf is `coef`, so one can live in a jitted train state, be updated
inside the step, and be saved by orbax with the rest; `target` and `horizon` are static
configuration. `state_dict()` / `from_state(...)` turn a controller into a flat dict of floats
(or scalar arrays) and back, for a JSON manifest or a checkpoint item.

Example:
  >>> controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
  >>> controller = controller.update(current_kl=12.0, n_steps=5_000)  # KL too high: +10%
  >>> round(float(controller.coef), 6)
  0.11
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class FixedKLController:
  """A constant KL coefficient; `update` returns the controller unchanged.

  Attributes:
    coef: the KL coefficient (a float or a scalar array).
  """

  coef: float | Array

  def update(self, current_kl: float | Array, n_steps: int | Array) -> "FixedKLController":
    del current_kl, n_steps  # Same interface as the adaptive controller.
    return self

  def state_dict(self) -> dict[str, Any]:
    return {"coef": self.coef}

  @classmethod
  def from_state(cls, state: dict[str, Any]) -> "FixedKLController":
    return cls(coef=state["coef"])


@flax.struct.dataclass
class AdaptiveKLController:
  """A KL coefficient steered proportionally towards a target KL (Ziegler et al. 2019).

  Attributes:
    init_coef: the starting coefficient (kept for the record; Ziegler et al. use 0.1 to 0.2).
    target: the KL (in nats per response, as measured by the caller) to steer towards.
    horizon: samples over which a persistent 20% error changes the coefficient by 20%.
    coef: the current coefficient; None at construction means `init_coef`.
  """

  init_coef: float = flax.struct.field(pytree_node=False)
  target: float = flax.struct.field(pytree_node=False)
  horizon: float = flax.struct.field(pytree_node=False)
  coef: float | Array | None = None

  def __post_init__(self):
    if self.target <= 0 or self.horizon <= 0:
      raise ValueError(f"target and horizon must be positive, got {self.target}, {self.horizon}")
    if self.coef is None:
      object.__setattr__(self, "coef", self.init_coef)

  def update(self, current_kl: float | Array, n_steps: int | Array) -> "AdaptiveKLController":
    """The controller after observing a mean KL of `current_kl` over `n_steps` samples.

    Pure and jit-able (`current_kl` may be traced); the step is bounded: the coefficient is
    multiplied by a factor in [1 - 0.2 n / horizon, 1 + 0.2 n / horizon].
    """
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    coef = self.coef * (1.0 + error * n_steps / self.horizon)
    return dataclasses.replace(self, coef=coef)

  def state_dict(self) -> dict[str, Any]:
    return {"init_coef": self.init_coef, "target": self.target, "horizon": self.horizon,
            "coef": self.coef}

  @classmethod
  def from_state(cls, state: dict[str, Any]) -> "AdaptiveKLController":
    return cls(init_coef=state["init_coef"], target=state["target"], horizon=state["horizon"],
               coef=state["coef"])


KLController = FixedKLController | AdaptiveKLController
