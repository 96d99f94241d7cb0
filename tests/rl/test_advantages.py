"""Advantage estimators: the spec's worked examples and K(sigma) table, hand-computed baselines, properties."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from noisygrpo_jax.rl import advantages as adv_lib

GRID = np.array([0.0, 0.3, 0.6, 0.9], np.float32)
PRIOR = np.array([1.162, 0.387, -0.387, -1.162])

# Spec section 2: semantic rewards of (clean, 0.3, 0.6, 0.9) -> K and the advantage.
WORKED_EXAMPLES = [
    ((1.8, 1.8, 1.8, 1.8), 0.909, (1.162, 0.387, -0.387, -1.162)),
    ((0.0, 0.0, 0.0, 0.0), 0.909, (1.162, 0.387, -0.387, -1.162)),
    ((1.8, 1.8, 1.0, 1.0), 0.309, (0.98, 0.735, -0.735, -0.98)),
    ((1.0, 1.8, 1.8, 1.8), 0.370, (-1.238, 1.104, 0.413, -0.278)),
    ((2.0, 2.0, 2.0, 1.0), 0.278, (0.717, 0.491, 0.266, -1.474)),
    ((1.72, 1.75, 1.8, 1.70), 0.894, (1.089, 0.403, -0.228, -1.264)),
    ((2.0, 0.0, 0.0, 0.0), 0.090, (1.497, -0.428, -0.499, -0.570)),
]

# Spec section 2: sigma_g -> (P_g, K_g).
K_TABLE = [(0.0, 1.00, 0.909), (0.05, 0.80, 0.889), (0.1, 0.50, 0.833), (0.2, 0.20, 0.667), (0.3, 0.10, 0.500),
           (0.5, 0.038, 0.278), (0.8, 0.015, 0.133), (1.0, 0.0099, 0.090)]

_noisygrpo = jax.jit(adv_lib.noisygrpo_advantages)
_grpo = jax.jit(adv_lib.grpo_advantages)


def _levels(num_groups):
  return np.tile(GRID, (num_groups, 1))


def test_worked_examples():
  rewards = np.array([r for r, _, _ in WORKED_EXAMPLES], np.float32)
  adv, diag = adv_lib.noisygrpo_advantages(rewards, _levels(len(rewards)))
  assert adv.shape == (7, 4) and adv.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(adv), [a for _, _, a in WORKED_EXAMPLES], atol=1e-3)
  np.testing.assert_allclose(np.asarray(diag["kalman_gain"]), [k for _, k, _ in WORKED_EXAMPLES], atol=1e-3)
  for g, (r, _, _) in enumerate(WORKED_EXAMPLES):
    assert abs(float(diag["sigma"][g]) - float(np.std(r, ddof=1))) < 1e-6
  np.testing.assert_allclose(np.asarray(diag["prior"]), np.tile(PRIOR, (7, 1)), atol=1e-3)


def test_worked_example_by_hand():
  # (1.8, 1.8, 1.0, 1.0): mean 1.4, unbiased std sqrt(4 * 0.16 / 3); p_hat by the spec's two affine steps.
  s = np.array([1.8, 1.8, 1.0, 1.0])
  std = math.sqrt(4 * 0.16 / 3)
  s_hat = (s - 1.4) / (std + 1e-4)
  q = 1 - GRID.astype(np.float64)
  z = (q - q.mean()) / math.sqrt(((q - q.mean())**2).mean())
  noisy = 0.55 + math.sqrt(0.11) * z
  p_hat = (noisy - noisy.mean()) / (math.sqrt(((noisy - noisy.mean())**2).sum() / 3) + 1e-4)
  p = 0.01 / (std**2 + 0.01)
  k = p / (p + 0.1)
  fused = s_hat + k * (p_hat - s_hat)
  expected = (fused - fused.mean()) / (math.sqrt(((fused - fused.mean())**2).sum() / 3) + 1e-4)
  adv, diag = adv_lib.noisygrpo_advantages(s[None], GRID[None])
  np.testing.assert_allclose(np.asarray(adv[0]), expected, atol=1e-5)
  assert abs(float(diag["P"][0]) - p) < 1e-6 and abs(float(diag["kalman_gain"][0]) - k) < 1e-6


@pytest.mark.parametrize("sigma, p, k", K_TABLE)
def test_kalman_gain_table(sigma, p, k):
  gain, prec = adv_lib.kalman_gain(jnp.float32(sigma))
  assert abs(float(gain) - k) < 1e-3 and abs(float(prec) - p) < 1e-3
  assert abs(float(gain) - 1 / (1.1 + 10 * sigma**2)) < 1e-6  # the closed form for R = 0.1, alpha = 0.01
  # The same K from a group whose rewards (x, x, -x, -x) + 1 have unbiased std sigma: x = sigma sqrt(3) / 2.
  x = sigma * math.sqrt(3) / 2
  _, diag = adv_lib.noisygrpo_advantages(np.array([[1 + x, 1 + x, 1 - x, 1 - x]], np.float32), GRID[None])
  assert abs(float(diag["kalman_gain"][0]) - k) < 1e-3


def test_baselines_by_hand():
  rewards = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], np.float32)
  # Group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
  grpo, _ = adv_lib.grpo_advantages(rewards)
  np.testing.assert_allclose(np.asarray(grpo), [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001],
                                                [0, 0, 0, 0]], atol=1e-6)
  drgrpo, _ = adv_lib.drgrpo_advantages(rewards)
  np.testing.assert_allclose(np.asarray(drgrpo), [[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0]], atol=1e-7)
  rloo, _ = adv_lib.rloo_advantages(rewards)
  np.testing.assert_allclose(np.asarray(rloo), [[1.0, -1 / 3, -1 / 3, -1 / 3], [0, 0, 0, 0]], atol=1e-6)


def test_mask_excludes_rollouts_from_the_statistics():
  rewards = np.array([[1.0, 0.3, 0.0, 7.0], [2.0, 2.0, 1.0, 1.0]], np.float32)
  levels = np.array([[0.0, 0.3, 0.6, 0.9], [0.0, 0.45, 0.3, 0.9]], np.float32)
  mask = np.array([[True, True, True, False], [True, False, True, True]])
  for name, fn in adv_lib.ADVANTAGE_ESTIMATORS.items():
    full, _ = fn(rewards, levels, mask)
    full = np.asarray(full)
    assert full[0, 3] == 0.0 and full[1, 1] == 0.0, name
    for g in range(2):
      kept = mask[g]
      alone, _ = fn(rewards[g][kept][None], levels[g][kept][None])
      np.testing.assert_allclose(full[g][kept], np.asarray(alone[0]), atol=1e-5, err_msg=name)
  # A group with a single valid rollout gets advantage 0, with no NaN.
  single = np.array([[True, False, False, False]])
  for name, fn in adv_lib.ADVANTAGE_ESTIMATORS.items():
    out, diag = fn(rewards[:1], levels[:1], single)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((1, 4)), err_msg=name)
    assert all(np.isfinite(np.asarray(v)).all() for v in diag.values()), name


def test_equal_levels_give_no_prior_preference():
  rewards = np.array([[1.0, 0.0, 1.0, 0.5]], np.float32)
  adv, diag = adv_lib.noisygrpo_advantages(rewards, np.zeros((1, 4), np.float32))
  np.testing.assert_array_equal(np.asarray(diag["prior"]), np.zeros((1, 4)))
  grpo, _ = adv_lib.grpo_advantages(rewards)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(grpo), atol=1e-3)


def test_registry_and_errors():
  assert sorted(adv_lib.ADVANTAGE_ESTIMATORS) == ["drgrpo", "grpo", "noisygrpo", "rloo"]
  rewards = np.array([[1.0, 0.0, 0.5, 0.5]], np.float32)
  a, _ = adv_lib.compute_advantages("noisygrpo", rewards, GRID[None], r_value=0.2)
  b, _ = adv_lib.noisygrpo_advantages(rewards, GRID[None], r_value=0.2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="unknown advantage estimator"):
    adv_lib.compute_advantages("ppo", rewards)
  with pytest.raises(ValueError, match="noise_levels"):
    adv_lib.compute_advantages("noisygrpo", rewards)


@pytest.mark.parametrize("name", sorted(adv_lib.ADVANTAGE_ESTIMATORS))
def test_jit_vmap_and_grad(name):
  fn = adv_lib.ADVANTAGE_ESTIMATORS[name]
  rewards = np.array([[[1.0, 0.0, 0.5, 0.5], [1.8, 1.8, 1.8, 1.8]], [[2.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]],
                     np.float32)  # [E=2, num_groups=2, G=4]
  levels = np.broadcast_to(GRID, rewards.shape)
  batched, diag = jax.jit(jax.vmap(fn))(rewards, levels)
  for e in range(2):
    single, single_diag = fn(rewards[e], levels[e])
    np.testing.assert_allclose(np.asarray(batched[e]), np.asarray(single), atol=1e-6)
    for key in single_diag:
      np.testing.assert_allclose(np.asarray(diag[key][e]), np.asarray(single_diag[key]), atol=1e-6)
  # Finite gradients, including through an all-equal group (std 0).
  grad = jax.grad(lambda r: (fn(r, levels[0])[0] * jnp.arange(4.0)).sum())(rewards[0])
  assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------------------------------------
# Properties. Rewards are multiples of 1/16 in [0, 2] (the semantic reward's range) so that adding a
# multiple of 1/4 is exact in float32.

NUM_GROUPS = 3
_reward = st.integers(0, 32).map(lambda k: k / 16)
_rewards = st.lists(st.lists(_reward, min_size=4, max_size=4), min_size=NUM_GROUPS, max_size=NUM_GROUPS).map(
    lambda x: np.array(x, np.float32))
_levels_strategy = st.lists(st.lists(st.integers(0, 10).map(lambda k: k / 10), min_size=4, max_size=4),
                            min_size=NUM_GROUPS, max_size=NUM_GROUPS).map(lambda x: np.array(x, np.float32))


def _check_normalized(adv, x, name):
  """adv = N(x) per group: zero mean, and unbiased std std(x) / (std(x) + 1e-4), ~1 unless x is degenerate."""
  adv = np.asarray(adv, np.float64)
  x = np.asarray(x, np.float64)
  for g in range(adv.shape[0]):
    assert abs(adv[g].mean()) < 1e-5, name
    sx = x[g].std(ddof=1)
    assert abs(adv[g].std(ddof=1) - sx / (sx + 1e-4)) < 1e-4, name
    if sx > 1e-2:
      assert abs(adv[g].std(ddof=1) - 1) < 1e-2, name


@settings(max_examples=40, deadline=None)
@given(_rewards, _levels_strategy)
def test_zero_mean_unit_std(rewards, levels):
  adv, _ = _grpo(rewards)
  _check_normalized(adv, rewards, "grpo")
  adv, diag = _noisygrpo(rewards, levels)
  _check_normalized(adv, diag["fused_reward"], "noisygrpo")
  for name in ("drgrpo", "rloo"):
    out, _ = adv_lib.ADVANTAGE_ESTIMATORS[name](rewards)
    np.testing.assert_allclose(np.asarray(out).mean(-1), 0.0, atol=1e-6, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(_reward, st.sampled_from([1, NUM_GROUPS]))
def test_equal_rewards_give_the_prior(value, num_groups):
  rewards = np.full((num_groups, 4), value, np.float32)
  adv, diag = _noisygrpo(rewards, _levels(num_groups))
  np.testing.assert_allclose(np.asarray(adv), np.tile(PRIOR, (num_groups, 1)), atol=1e-3)
  np.testing.assert_allclose(np.asarray(adv), np.asarray(diag["prior"]), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(diag["reward_normalized"]), 0.0)
  grpo, _ = _grpo(rewards)
  np.testing.assert_array_equal(np.asarray(grpo), 0.0)  # plain GRPO learns nothing from such a group


@settings(max_examples=30, deadline=None)
@given(_rewards)
def test_noisygrpo_tends_to_grpo_as_r_grows(rewards):
  # As R grows, K -> 0 and A -> N(N(r)): the GRPO advantage, normalised once more (which only undoes its
  # std / (std + 1e-4) shrinkage; it matters for groups with a tiny spread).
  levels = _levels(NUM_GROUPS)
  grpo = np.asarray(_grpo(rewards)[0], np.float64)
  std = grpo.std(-1, ddof=1, keepdims=True)
  renormalized = grpo / (std + 1e-4)
  outs = [np.asarray(_noisygrpo(rewards, levels, r_value=r)[0]) for r in (0.1, 10.0, 1e8)]
  gaps = [np.abs(out - renormalized).max() for out in outs]
  assert gaps[2] < 1e-3
  assert gaps[2] <= gaps[1] + 1e-6 and gaps[1] <= gaps[0] + 1e-6
  spread = np.asarray(rewards).std(-1, ddof=1) > 0.3  # then std / (std + 1e-4) > 0.9997
  assert np.abs(outs[2] - grpo)[spread].max(initial=0.0) < 1e-3


@settings(max_examples=30, deadline=None)
@given(_rewards, _levels_strategy, st.integers(-40, 40).map(lambda k: k / 4))
def test_invariant_to_a_constant_shift(rewards, levels, shift):
  for name, fn in adv_lib.ADVANTAGE_ESTIMATORS.items():
    a, _ = fn(rewards, levels)
    b, _ = fn(rewards + np.float32(shift), levels)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=name)


def test_informative_groups_by_hand():
  rewards = np.array([[1.8, 1.8, 1.8, 1.8], [0.0, 0.0, 0.0, 0.0], [1.8, 1.8, 0.8, 1.8], [2.0, 2.0, 2.0, 0.0]])
  np.testing.assert_array_equal(adv_lib.informative_groups(rewards), [False, False, True, True])
  # Only valid rollouts count: the last group's one differing reward is masked out.
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(adv_lib.informative_groups(rewards, mask), [False, False, True, False])
