"""The fused attention route (jax.nn.dot_product_attention: cuDNN flash attention on GPU) against the einsum path.

On CPU the fused route is forced with implementation "xla" (`layers.force_attention_implementation`): the same
routing, blocking and mask layout as cuDNN gets on GPU, compared in float32 with the einsum path (<= 1e-5), values
and gradients. The einsum path's blocked forms against its dense form are in test_layers.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisygrpo_jax.models.qwen2_5_vl import layers
from tests.models.test_layers import _causal_padded_mask, _segments_with_padding


def _assert_routes_agree(monkeypatch, fn, q, k, v, fused_call):
  """fn(q, k, v) and its gradients on the forced fused route equal the einsum path's and are finite; the fused
  route hands jax.nn.dot_product_attention only queries and masks of the shapes `fused_call`, the einsum path
  never calls it."""
  calls = []
  fused_attention = jax.nn.dot_product_attention

  def spy(q, k, v, *, mask, implementation):
    calls.append((q.shape, mask.shape))
    return fused_attention(q, k, v, mask=mask, implementation=implementation)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  w = np.random.default_rng(0).standard_normal(q.shape).astype(np.float32)
  loss = lambda *qkv: (fn(*qkv) * w).sum()
  # A fresh function per route: jit would otherwise reuse the first route's trace.
  value_and_grads = lambda: jax.jit(lambda *qkv: (fn(*qkv), jax.grad(loss, argnums=(0, 1, 2))(*qkv)))(q, k, v)
  einsum = value_and_grads()
  assert calls == []
  with layers.force_attention_implementation("xla"):
    fused = value_and_grads()
  assert set(calls) == {fused_call}
  for a, b in zip(jax.tree.leaves(einsum), jax.tree.leaves(fused)):
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["prefill_left_padding", "prefill_into_cache", "completion_after_prompt", "decode"])
def test_decoder_fused_route_equals_einsum(monkeypatch, case):
  """GQA (8 heads over 2 KV heads) with left-padded rows: a prompt pass with fully masked padding queries, one into
  a longer cache (queries at the start of the key slots), the shared-prompt completion pass and a decode step
  (queries at the end); the last three read keys and values heads-major [B, K, S, head_dim], as the KV caches hold
  them (the fused route gets them transposed). The einsum path takes 8 queries at a time; the fused route takes the
  whole pass at once with a mask broadcast over heads."""
  t, s = {"prefill_left_padding": (24, 24), "prefill_into_cache": (16, 40), "completion_after_prompt": (8, 40),
          "decode": (1, 41)}[case]
  rng = np.random.default_rng(3)
  if case.startswith("prefill"):
    mask = _causal_padded_mask(rng, 2, t, s)
    assert (~mask.any(-1)).any()  # padding queries that see no key
  else:
    mask = _causal_padded_mask(rng, 2, s, s)[:, s - t:]
  q = rng.standard_normal((2, t, 8, 16)).astype(np.float32)
  cached = case != "prefill_left_padding"
  k, v = (rng.standard_normal((2, 2, s, 16) if cached else (2, s, 2, 16)).astype(np.float32) for _ in range(2))
  fn = lambda q, k, v: layers.query_chunked_attention(q, k, v, mask, 8, kv_heads_major=cached)
  _assert_routes_agree(monkeypatch, fn, q, k, v, fused_call=((2, t, 8, 16), (2, 1, t, s)))


@pytest.mark.parametrize("case", ["window_blocks", "full_dense", "full_chunked"])
def test_vision_fused_route_equals_einsum(monkeypatch, case):
  """Window segments (3-block key windows of 16-query blocks) and full-attention segments over 50 patches with
  padding, dense (one block) and in 16-query blocks: the fused route keeps the blocks and takes the mask per
  head."""
  rng = np.random.default_rng(4)
  p, h, d = 50, 4, 8
  segments = _segments_with_padding(rng, p, max_len=16 if case == "window_blocks" else p)
  q, k, v = (rng.standard_normal((p, h, d)).astype(np.float32) for _ in range(3))
  fn, fused_call = {
      "window_blocks": (lambda q, k, v: layers.local_attention(q, k, v, segments, 16),
                        ((4, 16, h, d), (4, h, 16, 48))),
      "full_dense": (lambda q, k, v: layers.segment_attention(q, k, v, segments, 64), ((1, p, h, d), (1, h, p, p))),
      "full_chunked": (lambda q, k, v: layers.segment_attention(q, k, v, segments, 16),
                       ((1, 16, h, d), (1, h, 16, p))),
  }[case]
  _assert_routes_agree(monkeypatch, fn, q, k, v, fused_call)


@pytest.mark.parametrize("q_shape,k_shape,dtype,accepted", [
    ((2, 64, 8, 128), (2, 96, 2, 128), jnp.bfloat16, True),  # GQA decoder layer
    ((2, 64, 8, 128), (2, 96, 2, 128), jnp.float16, True),
    ((4, 64, 16, 80), (4, 192, 16, 80), jnp.bfloat16, True),  # vision window blocks
    ((2, 64, 8, 128), (2, 96, 2, 128), jnp.float32, False),
    ((2, 64, 8, 100), (2, 96, 2, 100), jnp.bfloat16, False),  # head dim not a multiple of 8
    ((2, 64, 8, 256), (2, 96, 2, 256), jnp.bfloat16, False),  # head dim above 128
    ((2, 1, 8, 128), (2, 96, 2, 128), jnp.bfloat16, False),  # one decode query: odd
    ((2, 64, 8, 128), (2, 97, 2, 128), jnp.bfloat16, False),  # odd key slots
])
def test_cudnn_accepts_what_flash_attention_takes(q_shape, k_shape, dtype, accepted):
  q, k = jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(k_shape, dtype)
  assert layers.cudnn_accepts(q, k, k) == accepted
  assert not layers.cudnn_accepts(q, k, jax.ShapeDtypeStruct(k_shape, jnp.float32))


def test_route_follows_the_backend_unless_forced():
  q, k = jax.ShapeDtypeStruct((2, 64, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 96, 2, 128), jnp.bfloat16)
  assert layers.attention_implementation(q, k, k) == ("cudnn" if jax.default_backend() == "gpu" else None)
  with layers.force_attention_implementation("xla"):
    assert layers.attention_implementation(q, k, k) == "xla"
  assert layers.attention_implementation(q, k, k) == ("cudnn" if jax.default_backend() == "gpu" else None)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention runs on GPU only")
def test_cudnn_route_equals_float32_einsum_on_gpu():
  """bfloat16 through cuDNN against the float32 einsum path: a left-padded GQA prompt pass (fully masked padding
  queries) and the vision tower's window and chunked full-attention blocks under jax.vmap over rows, values and
  gradients finite and within bfloat16 error."""
  rng = np.random.default_rng(5)
  mask = _causal_padded_mask(rng, 2, 256, 256)
  assert (~mask.any(-1)).any()
  segments = np.stack([_segments_with_padding(rng, 256, max_len=64) for _ in range(2)])
  decoder = lambda q, k, v: layers.query_chunked_attention(q, k, v, mask, 64)
  vision = lambda q, k, v: jax.vmap(lambda q, k, v, seg: layers.local_attention(q, k, v, seg, 64) +
                                    layers.segment_attention(q, k, v, seg, 64))(q, k, v, segments)
  for fn, q_shape, kv_shape in [(decoder, (2, 256, 8, 128), (2, 256, 2, 128)),
                                (vision, (2, 256, 4, 80), (2, 256, 4, 80))]:
    q = rng.standard_normal(q_shape).astype(np.float32)
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    assert layers.attention_implementation(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    w = rng.standard_normal(q_shape).astype(np.float32)
    value_and_grads = jax.jit(lambda *qkv: (fn(*qkv).astype(jnp.float32), jax.grad(
        lambda *qkv: (fn(*qkv).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(*qkv)))
    reference = value_and_grads(q, k, v)
    fused = value_and_grads(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(fused)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.isfinite(b).all()
      assert np.abs(b - a).max() <= 0.05 * np.abs(a).max(), (np.abs(b - a).max(), np.abs(a).max())
