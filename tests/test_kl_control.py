"""KL controllers: the adaptive rule of Ziegler et al. (2019), jit, and state round trips."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kl_control


def test_the_docstring_examples_run():
  result = doctest.testmod(kl_control)
  assert result.attempted >= 1 and result.failed == 0


def test_fixed_controller_never_moves():
  controller = kl_control.FixedKLController(coef=0.05)
  for kl in (0.0, 1.0, 1e6):
    assert controller.update(current_kl=kl, n_steps=1000).coef == 0.05
  assert jax.jit(lambda c: c.update(jnp.float32(100.0), 64))(controller).coef == 0.05


@pytest.mark.parametrize("kl, factor", [(9.0, 1 + 0.2 * 0.5),    # above target, error clipped
                                        (6.6, 1 + 0.1 * 0.5),    # above, within the clip
                                        (6.0, 1.0),              # on target
                                        (5.4, 1 - 0.1 * 0.5),    # below, within the clip
                                        (0.0, 1 - 0.2 * 0.5)])   # below, error clipped
def test_adaptive_controller_follows_the_proportional_rule(kl, factor):
  controller = kl_control.AdaptiveKLController(init_coef=0.2, target=6.0, horizon=100)
  updated = controller.update(current_kl=kl, n_steps=50)
  np.testing.assert_allclose(updated.coef, 0.2 * factor, rtol=1e-6)
  assert controller.coef == 0.2  # immutable: the old controller is unchanged


def test_adaptive_controller_moves_towards_the_target_with_bounded_steps():
  controller = kl_control.AdaptiveKLController(init_coef=0.1, target=4.0, horizon=1000)
  high = low = controller
  for _ in range(5):
    new_high, new_low = high.update(1e3, 100), low.update(1e-3, 100)
    assert 1.0 < float(new_high.coef / high.coef) <= 1.02 + 1e-6  # at most 0.2 * 100 / 1000
    assert 0.98 - 1e-6 <= float(new_low.coef / low.coef) < 1.0
    high, low = new_high, new_low


def test_adaptive_controller_updates_under_jit_and_is_a_pytree_with_one_leaf():
  controller = kl_control.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
  assert jax.tree.leaves(controller) == [0.1]
  step = jax.jit(lambda c, kl: c.update(kl, 256))
  updated = step(controller, jnp.float32(12.0))
  np.testing.assert_allclose(updated.coef, 0.1 * (1 + 0.2 * 256 / 10_000), rtol=1e-6)
  assert (updated.target, updated.horizon, updated.init_coef) == (6.0, 10_000, 0.1)
  np.testing.assert_allclose(updated.update(12.0, 256).coef, step(updated, 12.0).coef, rtol=1e-6)


def test_state_round_trips():
  adaptive = kl_control.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
  adaptive = adaptive.update(current_kl=7.0, n_steps=10)
  state = adaptive.state_dict()
  assert set(state) == {"init_coef", "target", "horizon", "coef"}
  restored = kl_control.AdaptiveKLController.from_state(
      {k: float(v) for k, v in state.items()})  # e.g. through JSON
  np.testing.assert_allclose(restored.coef, adaptive.coef, rtol=1e-6)
  assert restored.target == 6.0 and restored.horizon == 100
  fixed = kl_control.FixedKLController(coef=0.3)
  assert kl_control.FixedKLController.from_state(fixed.state_dict()) == fixed


def test_invalid_adaptive_settings_are_rejected():
  with pytest.raises(ValueError, match="positive"):
    kl_control.AdaptiveKLController(init_coef=0.1, target=0.0, horizon=100)
