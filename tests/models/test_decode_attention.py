"""The Pallas decode kernel route (decode_attention.py) against the einsum path, run interpreted on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisygrpo_jax.models.qwen2_5_vl import decode_attention, layers


def test_tiling_divides_the_slots_into_power_of_two_blocks_and_even_splits():
  assert decode_attention.tiling(2304) == (128, 9)  # the 3B recipe: 2048-token prompt bucket + 256 new tokens
  assert decode_attention.tiling(4096) == (128, 16)
  assert decode_attention.tiling(96) == (32, 3)
  assert decode_attention.tiling(48) == (16, 3)
  assert decode_attention.tiling(109) is None


def test_pallas_route_reads_only_each_rows_filled_slots_and_equals_the_einsums():
  """GQA (8 heads over 2 KV heads), heads-major caches of 96 slots (3 splits of one 32-slot block each), rows whose
  run of valid slots starts after left padding and ends before the last slot. Where the kernel must not read, the
  caches hold NaN: the blocks past the one holding a row's last valid slot (not generated yet) and the splits wholly
  before its first (left padding). The kernel's output is finite and equals the einsums' on finite caches
  (<= 1e-5); the einsums, which read every slot, turn NaN on the same caches."""
  rng = np.random.default_rng(0)
  b, h, kv, s, d = 5, 8, 2, 96, 16
  assert decode_attention.tiling(s) == (32, 3)
  runs = [(0, 96), (10, 50), (40, 41), (33, 70), (70, 75)]
  mask = np.zeros((b, 1, s), bool)
  for row, (start, end) in enumerate(runs):
    mask[row, 0, start:end] = True
  q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
  k, v = (rng.standard_normal((b, kv, s, d)).astype(np.float32) for _ in range(2))
  first_read = np.array([start // 32 * 32 for start, _ in runs])[:, None, None, None]
  past_read = np.array([-(-end // 32) * 32 for _, end in runs])[:, None, None, None]
  slot = np.arange(s)[None, None, :, None]
  unread = (slot < first_read) | (slot >= past_read)
  assert unread.sum() == 6 * 32  # slots: rows 1 and 3 one block each, rows 2 and 4 two
  k_nan, v_nan = np.where(unread, np.nan, k), np.where(unread, np.nan, v)

  def route(kernel, *qkv):
    with decode_attention.decoding(kernel):
      return np.asarray(jax.jit(lambda *a: layers.attention(*a, kv_heads_major=True))(*qkv))

  einsum = route("einsum", q, k, v, mask)
  pallas = route("pallas", q, k_nan, v_nan, mask)
  assert np.isfinite(pallas).all()
  np.testing.assert_allclose(pallas, einsum, atol=1e-5, rtol=0)
  assert np.isnan(route("einsum", q, k_nan, v_nan, mask)).any()
  half = route("pallas", *(jnp.asarray(x, jnp.bfloat16) for x in (q, k_nan, v_nan)), mask)
  assert half.dtype == jnp.bfloat16  # as the einsums' (the kernel's own output would be float32)
  np.testing.assert_allclose(half.astype(np.float32), einsum, atol=3e-2, rtol=0)


def test_route_is_the_einsums_unless_decoding_asks_for_the_kernel():
  q = jnp.zeros((2, 1, 8, 16), jnp.bfloat16)
  k = jnp.zeros((2, 2, 96, 16), jnp.bfloat16)
  assert not decode_attention.routed(q, k)  # outside `decoding`: prefill, the trainer's passes
  with decode_attention.decoding("auto"):
    assert decode_attention.routed(q, k) == (jax.default_backend() == "gpu")
    assert not decode_attention.routed(q.astype(jnp.float32), k.astype(jnp.float32))
  with decode_attention.decoding("pallas"):
    assert decode_attention.routed(q, k)
    with pytest.raises(ValueError, match="cannot tile 97 cache slots"):
      decode_attention.routed(q, jnp.zeros((2, 2, 97, 16), jnp.bfloat16))
  with pytest.raises(ValueError, match="rl.decode_kernel"):
    with decode_attention.decoding("flash"):
      pass
