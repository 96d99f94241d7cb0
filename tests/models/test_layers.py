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


def _causal_padded_mask(rng, b, t, s):
  """bool [B, T, S]: left-padded rows (a prompt pass over cache slots), causal within the valid keys."""
  valid = np.arange(s)[None, :] >= rng.integers(0, t // 2, (b, 1))
  return (np.arange(s)[None, :] <= np.arange(t)[:, None])[None] & valid[:, None, :]


@pytest.mark.parametrize("t,s,chunk", [(100, 100, 32), (64, 80, 16), (40, 40, 64), (7, 9, 3)])
def test_query_chunked_attention_equals_attention(t, s, chunk):
  """GQA (8 heads over 2 KV heads), left padding, more key slots than queries, T not a multiple of the chunk and
  T below it: the decoder's blocked attention equals the dense one, values and gradients (float32, <= 1e-5)."""
  rng = np.random.default_rng(t + chunk)
  q = rng.standard_normal((2, t, 8, 16)).astype(np.float32)
  k, v = (rng.standard_normal((2, s, 2, 16)).astype(np.float32) for _ in range(2))
  mask = _causal_padded_mask(rng, 2, t, s)
  dense = jax.jit(layers.attention)(q, k, v, mask)
  chunked = jax.jit(layers.query_chunked_attention, static_argnums=4)(q, k, v, mask, chunk)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), atol=1e-5, rtol=0)
  w = rng.standard_normal(q.shape).astype(np.float32)
  grads = [jax.jit(jax.grad(lambda *qkv: (fn(*qkv) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
           for fn in (lambda *qkv: layers.attention(*qkv, mask),
                      lambda *qkv: layers.query_chunked_attention(*qkv, mask, chunk))]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_query_chunked_attention_holds_one_blocks_scores():
  """A 1024-query pass with 128-query blocks stays well below one [B, H, T, S] float32 score buffer."""
  b, t, h, d, chunk = 1, 1024, 4, 8, 128
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
  mask = _causal_padded_mask(rng, b, t, t)
  temp = jax.jit(lambda q, k, v: layers.query_chunked_attention(q, k, v, mask, chunk)).lower(
      q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp < b * h * t * t * 4 / 2, temp
