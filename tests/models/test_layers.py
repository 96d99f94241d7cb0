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
