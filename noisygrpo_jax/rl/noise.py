"""Diffusion-noise exploration: the forward-diffusion corruption of spec section 1, and noise-level schedules.

The image is float in [0, 1] (any shape, usually [H, W, 3] at native resolution, before the processor). The
corruption at level n in [0, 1] takes step t = int(1000 n) of a fixed 1000-step sigmoid-beta schedule and
returns x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I) per pixel and channel, then quantises:

  "wrap"   trunc(255 x) mod 256 as uint8: bit-faithful to the original's torch float->uint8 cast (ToPILImage),
           which truncates toward zero and wraps out-of-range values (spec 1.2). What the released models saw.
  "clamp"  round(255 clip(x, 0, 1)) as uint8: the clamped variant (NoisyRollout clamps before quantising).
           Rounds to nearest (ties to even) rather than truncating, so in-range pixels are not shifted down.
  "none"   the float32 x_t, unclamped.

All functions are pure and work under jit and vmap. The noisers are jitted internally per (shape, dtype, mode),
with levels as traced arguments: every batch of one [B, H, W, 3] shape bucket reuses a single compilation.
Noise is i.i.d. per pixel, so noising a padded bucket and cropping gives the same distribution as noising the
unpadded image. Concrete levels outside [0, 1] raise ValueError; traced ones are clipped (`level_to_step`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NUM_STEPS = 1000
BETA_START = 1e-5
BETA_END = 5e-3
DEFAULT_LEVELS = (0.0, 0.3, 0.6, 0.9)
QUANTIZE_MODES = ("wrap", "clamp", "none")


def _schedule() -> tuple[np.ndarray, np.ndarray]:
  """sqrt(abar_t) and sqrt(1 - abar_t), float32 [1000], emulating the original torch float32 computation.

  Precision: beta_j = sigmoid(linspace(-6, 6))_j (5e-3 - 1e-5) + 1e-5 is evaluated in float64 and rounded to
  float32 (torch computes it in float32; the two differ by at most 1 ulp per beta). Then, as torch does on CPU,
  1 - beta is taken in float32, the cumulative product is accumulated in float64 and stored as float32, and both
  square roots are taken of float32 values (1 - abar_t in float32). The result is within 1 float32 ulp (6e-8)
  of torch's tables everywhere and bit-equal for ~80% of the steps.
  """
  u = np.linspace(-6.0, 6.0, NUM_STEPS, dtype=np.float64)
  betas = (1.0 / (1.0 + np.exp(-u)) * (BETA_END - BETA_START) + BETA_START).astype(np.float32)
  alphas = np.float32(1.0) - betas
  abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  return np.sqrt(abar), np.sqrt(np.float32(1.0) - abar)


SQRT_ALPHA_BAR, SQRT_ONE_MINUS_ALPHA_BAR = _schedule()


def _concrete(x) -> np.ndarray | None:
  """The value of `x` as numpy when it is known at trace time, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_levels(levels) -> None:
  """Raises ValueError when concrete levels are not finite values in [0, 1]; traced levels pass unchecked."""
  value = _concrete(levels)
  if value is None:
    return
  value = np.asarray(value, np.float64)
  bad = ~np.isfinite(value) | (value < 0.0) | (value > 1.0)
  if bad.any():
    raise ValueError(f"noise levels must lie in [0, 1]; got {value[bad].tolist()} in {value.tolist()}. "
                     "A level n means diffusion step int(1000 n) of 1000.")


def level_to_step(level: jax.Array) -> jax.Array:
  """Diffusion step int(1000 n) as int32, for a float level n in [0, 1] (any shape).

  Computed as floor(1000 n + 1e-3) in float32: the 1e-3 absorbs float32 rounding of the level, so this equals
  Python's int(1000 * n) on the float64 level for every level with at most 5 decimals (0.251 -> 251, where a
  bare float32 floor gives 250). Level 1.0 maps to the last step, 999 (the original would index past the end).
  Traced out-of-range levels are clipped to [0, 999]; concrete ones raise in `diffusion_noise`.
  """
  level = jnp.asarray(level, jnp.float32)
  step = jnp.floor(level * jnp.float32(NUM_STEPS) + jnp.float32(1e-3)).astype(jnp.int32)
  return jnp.clip(step, 0, NUM_STEPS - 1)


def quantize_wrap(x: jax.Array) -> jax.Array:
  """uint8 trunc(255 x) mod 256: torch's eager CPU `(x * 255).byte()` (truncate toward zero, then wrap).

  The product is float32 as in torch; trunc and mod stay in float32, exact for |255 x| < 2^24.
  """
  scaled = jnp.trunc(jnp.asarray(x, jnp.float32) * jnp.float32(255.0))
  return jnp.mod(scaled, 256.0).astype(jnp.uint8)


def quantize_clamp(x: jax.Array) -> jax.Array:
  """uint8 round(255 clip(x, 0, 1)), rounding half to even."""
  x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
  return jnp.round(x * jnp.float32(255.0)).astype(jnp.uint8)


def _as_unit_float(image: jax.Array) -> jax.Array:
  image = jnp.asarray(image)
  if jnp.issubdtype(image.dtype, jnp.integer):
    return image.astype(jnp.float32) / 255.0  # uint8 pixels, as torchvision's ToTensor
  return image.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="quantize")
def _diffusion_noise(key, image, level, quantize):
  x0 = _as_unit_float(image)
  t = level_to_step(level)
  signal = jnp.asarray(SQRT_ALPHA_BAR)[t]
  sigma = jnp.asarray(SQRT_ONE_MINUS_ALPHA_BAR)[t]
  eps = jax.random.normal(key, x0.shape, jnp.float32)
  xt = signal * x0 + sigma * eps
  if quantize == "wrap":
    return quantize_wrap(xt)
  if quantize == "clamp":
    return quantize_clamp(xt)
  return xt


@functools.partial(jax.jit, static_argnames="quantize")
def _noisy_copies(key, image, levels, quantize):  # image: any shape; noisy_copies passes it flat and padded
  keys = jax.random.split(key, levels.shape[0])
  return jax.vmap(lambda k, n: _diffusion_noise(k, image, n, quantize))(keys, levels)


@functools.partial(jax.jit, static_argnames="quantize")
def _noisy_copies_batched(key, images, levels, quantize):
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x, n: _noisy_copies(k, x, n, quantize))(keys, images, levels)


def _check_quantize(quantize):
  if quantize not in QUANTIZE_MODES:
    raise ValueError(f"quantize={quantize!r} must be one of {QUANTIZE_MODES}")


def diffusion_noise(key: jax.Array, image: jax.Array, level, *, quantize: str = "wrap") -> jax.Array:
  """One noisy copy of `image` at noise level `level` (spec 1.1).

  Args:
    key: a PRNG key; the same key gives the same noise.
    image: float in [0, 1] (or uint8, divided by 255), any shape, e.g. [H, W, 3].
    level: scalar noise level n in [0, 1] (Python float or array; may be traced).
    quantize: "wrap", "clamp" or "none" (see the module docstring).

  Returns:
    uint8 array of `image.shape` for "wrap" and "clamp"; float32 x_t for "none".
  """
  _check_quantize(quantize)
  check_levels(level)
  return _diffusion_noise(key, image, jnp.asarray(level, jnp.float32), quantize)


def noisy_copies(key: jax.Array, image: jax.Array, levels, *, quantize: str = "wrap") -> jax.Array:
  """G noisy copies of one image, one per level; copy g uses key `jax.random.split(key, G)[g]`.

  Args:
    key: a PRNG key.
    image: [*S] float in [0, 1] (or uint8).
    levels: [G] noise levels in [0, 1].
    quantize: as in `diffusion_noise`.

  Returns:
    [G, *S] uint8 ("wrap", "clamp") or float32 ("none").

  Images of any shape share one compiled program per `flat_length_bucket` of their size: the pixels are flattened
  and padded to the bucket, noised, and cut back. The values equal those of the image's own shape (JAX's
  partitionable threefry draws element i's noise from its flat index alone; checked by the tests).
  """
  _check_quantize(quantize)
  check_levels(levels)
  image = jnp.asarray(image)
  size = image.size
  flat = jnp.pad(image.reshape(-1), (0, flat_length_bucket(size) - size))
  noisy = _noisy_copies(key, flat, jnp.asarray(levels, jnp.float32), quantize)
  return noisy[:, :size].reshape((noisy.shape[0],) + image.shape)


def noisy_copies_of_images(key: jax.Array, images: Sequence[jax.Array], levels, *, quantize: str = "wrap"
                           ) -> list[jax.Array]:
  """G noisy copies of each of several images (shapes may differ): copy g of every image at `levels[g]`, image k
  noised with its own key (`noisy_copies`), so the images' noise is independent. The first image's key is `key`
  itself, so a one-image example draws exactly the noise `noisy_copies(key, ...)` draws; image k > 0 uses
  `jax.random.fold_in(key, k)`.

  Returns:
    per image, [G, *S_k] uint8 ("wrap", "clamp") or float32 ("none").
  """
  keys = [key] + [jax.random.fold_in(key, k) for k in range(1, len(images))]
  return [noisy_copies(k, image, levels, quantize=quantize) for k, image in zip(keys, images)]


def flat_length_bucket(size: int) -> int:
  """`size` rounded up to a multiple of its leading power of two / 8: at most 8 lengths per octave, < 12.5% padding
  (a 1536 x 1536 x 3 image: 7,077,888 -> 7,340,032)."""
  quantum = 1 << max(size.bit_length() - 4, 0)
  return -(-size // quantum) * quantum


def noisy_copies_batched(key: jax.Array, images: jax.Array, levels, *, quantize: str = "wrap") -> jax.Array:
  """Noisy copies for a bucket of same-shape images; image b uses key `jax.random.split(key, B)[b]`.

  Args:
    key: a PRNG key.
    images: [B, *S] float in [0, 1] (or uint8), e.g. one padded shape bucket [B, H, W, 3].
    levels: [G] levels shared by all images, or [B, G] per image.
    quantize: as in `diffusion_noise`.

  Returns:
    [B, G, *S] uint8 ("wrap", "clamp") or float32 ("none").
  """
  _check_quantize(quantize)
  check_levels(levels)
  images = jnp.asarray(images)
  levels = jnp.asarray(levels, jnp.float32)
  levels = jnp.broadcast_to(levels, (images.shape[0], levels.shape[-1]))
  return _noisy_copies_batched(key, images, levels, quantize)


# ------------------------------------------------------------------------------------------------
# Level schedules: each returns the [G] levels of one group.


def fixed_levels(levels: Sequence[float] = DEFAULT_LEVELS, *, require_clean_first: bool = False) -> np.ndarray:
  """The released config's deterministic grid, as float32 [G].

  Args:
    levels: the grid; default (0, 0.3, 0.6, 0.9), one rollout per level.
    require_clean_first: raise unless levels[0] == 0 (the original asserts this so every group has a
      clean rollout; NoisyGRPO's prior and `mask_noise_correct` rely on it).
  """
  out = np.asarray(levels, np.float32).reshape(-1)
  if out.size == 0:
    raise ValueError("noise levels must not be empty")
  check_levels(out)
  if require_clean_first and out[0] != 0.0:
    raise ValueError(f"the first noise level must be 0.0 (a clean rollout); got levels={out.tolist()}")
  return out


def uniform_levels(key: jax.Array, group_size: int, *, clean_first: bool = True) -> jax.Array:
  """n ~ U[0, 1) per rollout (the paper figure), float32 [G]; the first is set to 0 when `clean_first`."""
  levels = jax.random.uniform(key, (group_size,), jnp.float32)
  if clean_first:
    levels = levels.at[0].set(0.0)
  return levels


ANNEAL_MODES = ("none", "linear", "sigmoid")


def anneal_factor(step, total_steps, *, mode: str = "none", final_fraction: float = 0.5,
                  steepness: float = 30.0, midpoint_step: float = 40.0) -> jax.Array:
  """Multiplier applied to every level at training step `step` (float32 scalar; `step` may be traced).

  Modes:
    "none": 1.
    "linear": 1 - (1 - final_fraction) min(step / total_steps, 1); the original's `noise_decaying`, a linear
      decay to half strength (final_fraction=0.5, which the original hard-codes).
    "sigmoid": 1 - sigmoid(steepness (step - midpoint_step) / total_steps), NoisyRollout's schedule
      (steepness 30 for Geometry3K, 60 for K12; midpoint at step 40).
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.asarray(total_steps, jnp.float32)
  if mode == "none":
    return jnp.ones((), jnp.float32)
  if mode == "linear":
    return 1.0 - (1.0 - final_fraction) * jnp.minimum(step / total, 1.0)
  if mode == "sigmoid":
    return 1.0 - jax.nn.sigmoid(steepness * (step - midpoint_step) / total)
  raise ValueError(f"anneal mode={mode!r} must be one of {ANNEAL_MODES}")


def annealed_levels(levels, step, total_steps, *, mode: str = "none", **anneal_kwargs) -> jax.Array:
  """levels * anneal_factor(step, ...), float32 [G]. A clean level 0 stays 0."""
  check_levels(levels)
  return jnp.asarray(levels, jnp.float32) * anneal_factor(step, total_steps, mode=mode, **anneal_kwargs)


def schedule_levels(key: jax.Array, step, total_steps, *, kind: str = "fixed",
                    levels: Sequence[float] = DEFAULT_LEVELS, group_size: int | None = None,
                    clean_first: bool = True, anneal: str = "none", **anneal_kwargs) -> jax.Array:
  """The [G] levels of one group at `step`: a base schedule ("fixed" grid or "uniform" draws) times annealing.

  Args:
    key: used by "uniform" only.
    step, total_steps: training progress, for annealing.
    kind: "fixed" (the grid `levels`) or "uniform" (n ~ U[0, 1) for `group_size` rollouts).
    levels: the fixed grid.
    group_size: G for "uniform" (default len(levels)).
    clean_first: "fixed": require levels[0] == 0; "uniform": force the first rollout clean.
    anneal, **anneal_kwargs: as in `anneal_factor`.
  """
  if kind == "fixed":
    base = jnp.asarray(fixed_levels(levels, require_clean_first=clean_first))
  elif kind == "uniform":
    base = uniform_levels(key, group_size or len(levels), clean_first=clean_first)
  else:
    raise ValueError(f"level schedule kind={kind!r} must be 'fixed' or 'uniform'")
  return base * anneal_factor(step, total_steps, mode=anneal, **anneal_kwargs)
