"""Building blocks against their dense definitions."""

import jax
import numpy as np
import pytest

from noisygrpo_jax.models.qwen2_5_vl import layers


@pytest.mark.parametrize("length,block", [(100, 16), (64, 16), (37, 8)])
def test_local_attention_equals_dense_segment_attention(length, block):
  rng = np.random.default_rng(length)
  sizes = []
  while sum(sizes) < length:
    sizes.append(int(rng.integers(1, block + 1)))  # contiguous segments of at most `block` positions
  segments = np.repeat(np.arange(len(sizes)), sizes)[:length].astype(np.int32)
  q, k, v = (rng.standard_normal((length, 4, 8)).astype(np.float32) for _ in range(3))
  dense = layers.attention(q[None], k[None], v[None], (segments[:, None] == segments[None, :])[None])[0]
  local = jax.jit(layers.local_attention, static_argnums=4)(q, k, v, segments, block)
  np.testing.assert_allclose(np.asarray(local), np.asarray(dense), atol=1e-6, rtol=0)


def _segments_with_padding(rng, length: int, max_len: int) -> np.ndarray:
  """Contiguous segments numbered from 1 of up to max_len positions, then padding (segment 0) at the end."""
  real = int(rng.integers(length // 2, length + 1))
  sizes = []
  while sum(sizes) < real:
    sizes.append(int(rng.integers(1, max_len + 1)))
  segments = np.repeat(np.arange(1, len(sizes) + 1), sizes)[:real]
  return np.concatenate([segments, np.zeros(length - real, int)]).astype(np.int32)


def _dense_segment_attention(q, k, v, segments):
  return layers.attention(q[None], k[None], v[None], (segments[:, None] == segments[None, :])[None])[0]


@pytest.mark.parametrize("length,chunk", [(100, 16), (64, 16), (40, 64), (7, 3)])
def test_chunked_segment_attention_equals_dense(length, chunk):
  """Long segments (up to the whole row), padding, P not a multiple of the chunk and P below the chunk."""
  rng = np.random.default_rng(length + chunk)
  segments = _segments_with_padding(rng, length, max_len=length)
  q, k, v = (rng.standard_normal((length, 4, 8)).astype(np.float32) for _ in range(3))
  dense = _dense_segment_attention(q, k, v, segments)
  chunked = jax.jit(layers.chunked_segment_attention, static_argnums=4)(q, k, v, segments, chunk)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), atol=1e-5, rtol=0)
  auto = jax.jit(layers.segment_attention, static_argnums=4)(q, k, v, segments, chunk)
  np.testing.assert_allclose(np.asarray(auto), np.asarray(dense), atol=1e-5, rtol=0)


def test_chunked_segment_attention_gradients_equal_dense():
  rng = np.random.default_rng(0)
  segments = _segments_with_padding(rng, 50, max_len=30)
  q, k, v = (rng.standard_normal((50, 2, 8)).astype(np.float32) for _ in range(3))
  w = rng.standard_normal((50, 2, 8)).astype(np.float32)
  dense = jax.grad(lambda *qkv: (_dense_segment_attention(*qkv, segments) * w).sum(), argnums=(0, 1, 2))
  chunked = jax.grad(lambda *qkv: (layers.chunked_segment_attention(*qkv, segments, 16) * w).sum(),
                     argnums=(0, 1, 2))
  for a, b in zip(jax.jit(dense)(q, k, v), jax.jit(chunked)(q, k, v)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", [False, True])
def test_chunked_segment_attention_never_holds_the_full_scores(remat):
  """Forward and backward (with or without an enclosing jax.checkpoint) stay well below one [H, P, P] buffer:
  a few [H, chunk, P] buffers (scores, mask, probabilities) at a time."""
  p, h, d, chunk = 1024, 4, 8, 64
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((p, h, d)).astype(np.float32) for _ in range(3))
  segments = _segments_with_padding(rng, p, max_len=p)
  loss = lambda q, k, v: (layers.segment_attention(q, k, v, segments, chunk) ** 2).sum()
  if remat:
    loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
  full_scores = h * p * p * 4
  for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
    temp = jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp < full_scores / 2, (fn, temp, full_scores)
