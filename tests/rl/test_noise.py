"""Diffusion noise: the schedule against torch, the noise statistics, the quantisation modes, keys, levels."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from noisygrpo_jax.rl import noise

KEY = jax.random.key(0)
# One small image shape shared by most tests: each (shape, dtype, mode) costs a ~1 s XLA compile on CPU.
IMAGE = jax.random.uniform(jax.random.key(3), (16, 16, 3))


def _torch_schedule():
  betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
  abar = torch.cumprod(1 - betas, dim=0)
  return torch.sqrt(abar).numpy(), torch.sqrt(1 - abar).numpy()


def test_schedule_matches_the_torch_float32_computation():
  signal, sigma = _torch_schedule()
  assert noise.SQRT_ALPHA_BAR.dtype == np.float32 and noise.SQRT_ALPHA_BAR.shape == (1000,)
  np.testing.assert_allclose(noise.SQRT_ALPHA_BAR, signal, rtol=0, atol=1.2e-7)
  np.testing.assert_allclose(noise.SQRT_ONE_MINUS_ALPHA_BAR, sigma, rtol=0, atol=1.2e-7)


def test_schedule_reproduces_the_spec_table():
  # Spec 1.1: t, sqrt(abar_t), sigma_t for the released levels 0, 0.3, 0.6, 0.9.
  for t, signal, sigma in [(0, 1.0000, 0.0047), (300, 0.981, 0.194), (600, 0.734, 0.679), (900, 0.365, 0.931)]:
    assert abs(noise.SQRT_ALPHA_BAR[t] - signal) < 1e-3
    assert abs(noise.SQRT_ONE_MINUS_ALPHA_BAR[t] - sigma) < 1e-3
  # The first beta by hand: sigmoid(-6) * (5e-3 - 1e-5) + 1e-5, and sigma_0 = sqrt(beta_0). Like torch, 1 - abar
  # is taken in float32, which costs up to 1 ulp of 1 (6e-8) in 1 - abar, i.e. ~6e-6 in sigma_0.
  beta0 = 1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5
  assert abs(noise.SQRT_ONE_MINUS_ALPHA_BAR[0] - math.sqrt(beta0)) < 1e-5


@pytest.mark.parametrize("level", noise.DEFAULT_LEVELS)
def test_noise_std_matches_the_schedule(level):
  x0 = jax.random.uniform(jax.random.key(1), (256, 256, 3))
  t = int(1000 * level)
  xt = noise.diffusion_noise(jax.random.key(2), x0, level, quantize="none")
  assert xt.dtype == jnp.float32 and xt.shape == x0.shape
  residual = np.asarray(xt, np.float64) - float(noise.SQRT_ALPHA_BAR[t]) * np.asarray(x0, np.float64)
  expected = float(noise.SQRT_ONE_MINUS_ALPHA_BAR[t])
  assert abs(residual.std() / expected - 1) < 0.01
  assert abs(residual.mean()) < 0.01 * expected


def _numpy_torch_byte(x):
  """numpy emulation of torch's eager CPU (x * 255).byte(): float32 product, truncate, wrap modulo 256."""
  scaled = np.trunc(np.asarray(x, np.float32) * np.float32(255)).astype(np.int64)
  return (scaled % 256).astype(np.uint8)


def test_wrap_is_bit_faithful_to_the_torch_cast():
  rng = np.random.default_rng(0)
  x = np.concatenate([
      rng.uniform(-3.0, 4.0, 99_000),
      np.arange(-255, 511) / 255.0,  # every grey level, and the wrap boundaries
      [-2.0, -1.5, -1 / 255, -1e-9, 0.0, 1.0, 1.0 + 1e-7, 256 / 255, 2.0],
  ]).astype(np.float32)
  x = np.concatenate([x, rng.normal(0.5, 1.0, 100_000 - x.size).astype(np.float32)])
  assert x.size == 100_000 and ((x < 0) | (x > 1)).mean() > 0.3
  ours = np.asarray(noise.quantize_wrap(x))
  assert ours.dtype == np.uint8
  np.testing.assert_array_equal(ours, _numpy_torch_byte(x))
  np.testing.assert_array_equal(ours, (torch.from_numpy(x) * 255).byte().numpy())
  # The spec's pinned examples: -2.0 -> -510 -> 2 and -1.5 -> -382 -> 130 after the x255.
  np.testing.assert_array_equal(np.asarray(noise.quantize_wrap(jnp.array([-2.0, -1.5, 1.004]))), [2, 130, 0])


def test_clamp_rounds_and_clips():
  x = jnp.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.2, 0.9999, 1.0, 1.7])
  np.testing.assert_array_equal(np.asarray(noise.quantize_clamp(x)), [0, 0, 0, 2, 51, 255, 255, 255])
  xt = noise.diffusion_noise(KEY, IMAGE, 0.6, quantize="clamp")
  ref = np.round(np.clip(np.asarray(noise.diffusion_noise(KEY, IMAGE, 0.6, quantize="none")), 0, 1)
                 * np.float32(255)).astype(np.uint8)
  assert xt.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(xt), ref)
  assert ((ref == 0) | (ref == 255)).mean() > 0.1  # the level-0.6 noise did push pixels out of range


def test_wrap_turns_saturated_white_into_black_at_level_zero():
  # Spec 1.2: at n = 0 about 20% of pure-white pixels wrap to ~0. A white pixel wraps when 255 x_0 >= 256, i.e.
  # eps >= (256/255 - sqrt(abar_0)) / sigma_0.
  white = jnp.ones((256, 256, 3))
  out = np.asarray(noise.diffusion_noise(KEY, white, 0.0))
  threshold = (256 / 255 - float(noise.SQRT_ALPHA_BAR[0])) / float(noise.SQRT_ONE_MINUS_ALPHA_BAR[0])
  expected = 0.5 * math.erfc(threshold / math.sqrt(2))
  assert 0.18 < expected < 0.22
  assert abs((out < 10).mean() - expected) < 0.01
  assert ((out >= 10) & (out < 240)).sum() == 0  # the rest stays within a few grey levels of 255


def test_keys():
  a = noise.diffusion_noise(jax.random.key(1), IMAGE, 0.6, quantize="none")
  b = noise.diffusion_noise(jax.random.key(1), IMAGE, 0.6, quantize="none")
  c = noise.diffusion_noise(jax.random.key(2), IMAGE, 0.6, quantize="none")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.99


def test_noisy_copies_use_one_independent_key_per_rollout():
  image = IMAGE
  levels = jnp.array([0.0, 0.3, 0.6, 0.6])
  copies = noise.noisy_copies(KEY, image, levels, quantize="none")
  assert copies.shape == (4, 16, 16, 3) and copies.dtype == jnp.float32
  keys = jax.random.split(KEY, 4)
  for g in range(4):
    np.testing.assert_allclose(np.asarray(copies[g]),
                               np.asarray(noise.diffusion_noise(keys[g], image, float(levels[g]), quantize="none")),
                               atol=1e-6)
  # Two rollouts at the same level get different noise: their residuals are uncorrelated.
  signal = float(noise.SQRT_ALPHA_BAR[600])
  r2 = np.asarray(copies[2] - signal * image).ravel()
  r3 = np.asarray(copies[3] - signal * image).ravel()
  assert abs(np.corrcoef(r2, r3)[0, 1]) < 0.1


def test_uint8_images_are_scaled_to_unit_range():
  pixels = jnp.arange(16 * 16 * 3, dtype=jnp.int32).reshape(16, 16, 3).astype(jnp.uint8)
  a = noise.diffusion_noise(KEY, pixels, 0.3, quantize="none")
  b = noise.diffusion_noise(KEY, pixels.astype(jnp.float32) / 255.0, 0.3, quantize="none")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_level_to_step_is_python_int_of_1000_n():
  values = sorted({k / d for d in (10, 100, 1000, 10_000, 100_000) for k in range(0, d, max(1, d // 2000))})
  steps = np.asarray(noise.level_to_step(jnp.asarray(values, jnp.float32)))
  expected = np.minimum([int(1000 * v) for v in values], 999)
  np.testing.assert_array_equal(steps, expected)
  np.testing.assert_array_equal(np.asarray(noise.level_to_step(jnp.array([0.251, 0.9, 1.0]))), [251, 900, 999])


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan")])
def test_levels_out_of_range_raise(bad):
  image = jnp.zeros((4, 4, 3))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    noise.diffusion_noise(KEY, image, bad)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    noise.noisy_copies(KEY, image, np.array([0.0, bad]))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    noise.fixed_levels((0.0, bad))


def test_unknown_quantize_mode_raises():
  with pytest.raises(ValueError, match="quantize"):
    noise.diffusion_noise(KEY, jnp.zeros((2, 2)), 0.3, quantize="saturate")


def test_jit_and_vmap():
  images = jnp.stack([IMAGE, 1 - IMAGE, IMAGE**2])
  keys = jax.random.split(KEY, 3)
  levels = jnp.array([0.0, 0.45, 0.9])
  fn = lambda k, x, n: noise.diffusion_noise(k, x, n, quantize="none")
  batched = jax.jit(jax.vmap(fn))(keys, images, levels)
  for e in range(3):
    np.testing.assert_allclose(np.asarray(batched[e]), np.asarray(fn(keys[e], images[e], float(levels[e]))),
                               atol=1e-6)
  copies = jax.vmap(lambda k, x: noise.noisy_copies(k, x, levels, quantize="none"))(keys, images)
  assert copies.shape == (3, 3, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(copies[1]), np.asarray(noise.noisy_copies(keys[1], images[1], levels,
                                                                                    quantize="none")), atol=1e-6)


def test_a_shape_bucket_compiles_once():
  traces = []

  @jax.jit
  def step(key, images, levels):
    traces.append(images.shape)
    return noise.noisy_copies_batched(key, images, levels)

  levels = jnp.asarray(noise.fixed_levels())
  for seed in range(3):
    images = jnp.stack([IMAGE, IMAGE * 0.5 + seed / 10])
    out = step(jax.random.key(seed), images, levels)
  assert out.shape == (2, 4, 16, 16, 3) and out.dtype == jnp.uint8
  assert len(traces) == 1
  # Per-image levels [B, G] also work, and image b, copy g uses the documented keys.
  per_image = jnp.stack([levels, levels[::-1]])
  out = noise.noisy_copies_batched(KEY, images, per_image, quantize="none")
  k1 = jax.random.split(KEY, 2)[1]
  np.testing.assert_allclose(np.asarray(out[1]), np.asarray(noise.noisy_copies(k1, images[1], levels[::-1],
                                                                                 quantize="none")), atol=1e-6)


def test_images_of_any_shape_share_a_length_buckets_program_with_their_own_values():
  """noisy_copies pads the flat pixels to a length bucket: images of other shapes in one bucket compile once, and
  each gets exactly the noise of its own shape (compared with the unpadded program, bit for bit)."""
  levels = jnp.asarray(noise.fixed_levels())
  rng = np.random.default_rng(0)
  shapes = [(37, 53, 3), (53, 37, 3), (40, 49, 3)]  # 5883, 5883 and 5880 pixels: one bucket (6144)
  assert len({noise.flat_length_bucket(int(np.prod(s))) for s in shapes}) == 1
  before = noise._noisy_copies._cache_size()
  for seed, shape in enumerate(shapes):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    for quantize in ("wrap", "none"):
      out = noise.noisy_copies(jax.random.key(seed), image, levels, quantize=quantize)
      own = noise._noisy_copies(jax.random.key(seed), jnp.asarray(image), levels, quantize)
      assert out.shape == own.shape == (4,) + shape
      np.testing.assert_array_equal(np.asarray(out), np.asarray(own))
  # One program per quantize mode for the bucket, plus the unpadded references (one per shape and mode).
  assert noise._noisy_copies._cache_size() - before == 2 + 2 * 3


def test_fixed_and_uniform_levels():
  np.testing.assert_array_equal(noise.fixed_levels(), np.array([0.0, 0.3, 0.6, 0.9], np.float32))
  assert noise.fixed_levels().dtype == np.float32
  with pytest.raises(ValueError, match="first noise level must be 0.0"):
    noise.fixed_levels((0.3, 0.6), require_clean_first=True)
  np.testing.assert_array_equal(noise.fixed_levels((0.3, 0.6)), np.array([0.3, 0.6], np.float32))
  a = np.asarray(noise.uniform_levels(jax.random.key(5), 8))
  b = np.asarray(noise.uniform_levels(jax.random.key(6), 8, clean_first=False))
  assert a.shape == (8,) and a[0] == 0.0 and (a[1:] > 0).all() and (a < 1).all()
  assert b[0] > 0.0 and not np.allclose(a[1:], b[1:])
  # One group's levels per key under jit and vmap.
  keys = jax.random.split(KEY, 5)
  batched = jax.jit(jax.vmap(lambda k: noise.uniform_levels(k, 4)))(keys)
  assert batched.shape == (5, 4) and (np.asarray(batched[:, 0]) == 0).all()
  np.testing.assert_array_equal(np.asarray(batched[2]), np.asarray(noise.uniform_levels(keys[2], 4)))


def test_annealing():
  linear = lambda s: float(noise.anneal_factor(s, 100, mode="linear"))
  assert linear(0) == 1.0 and abs(linear(50) - 0.75) < 1e-7 and linear(100) == 0.5 and linear(400) == 0.5
  sigmoid = lambda s: float(noise.anneal_factor(s, 60, mode="sigmoid"))
  assert abs(sigmoid(40) - 0.5) < 1e-7
  assert abs(sigmoid(0) - (1 - 1 / (1 + math.exp(30 * 40 / 60)))) < 1e-7
  assert abs(sigmoid(50) - (1 - 1 / (1 + math.exp(-30 * 10 / 60)))) < 1e-6
  assert float(noise.anneal_factor(7, 10)) == 1.0
  with pytest.raises(ValueError, match="anneal mode"):
    noise.anneal_factor(0, 10, mode="cosine")
  levels = jax.jit(lambda s: noise.annealed_levels(noise.fixed_levels(), s, 100, mode="linear"))(50)
  np.testing.assert_allclose(np.asarray(levels), [0.0, 0.225, 0.45, 0.675], atol=1e-7)
  factors = jax.vmap(lambda s: noise.anneal_factor(s, 100, mode="linear"))(jnp.array([0, 50, 100]))
  np.testing.assert_allclose(np.asarray(factors), [1.0, 0.75, 0.5], atol=1e-7)


def test_schedule_levels():
  fixed = noise.schedule_levels(KEY, 100, 100, anneal="linear")
  np.testing.assert_allclose(np.asarray(fixed), [0.0, 0.15, 0.3, 0.45], atol=1e-7)
  uniform = noise.schedule_levels(KEY, 0, 100, kind="uniform", group_size=6)
  assert uniform.shape == (6,) and float(uniform[0]) == 0.0
  with pytest.raises(ValueError, match="first noise level"):
    noise.schedule_levels(KEY, 0, 100, levels=(0.5, 0.9))
  with pytest.raises(ValueError, match="kind"):
    noise.schedule_levels(KEY, 0, 100, kind="beta")
