"""Building blocks shared by the vision tower and the decoder.

Parameter names follow the HF checkpoint (`weight` for norms, `kernel`/`bias` for linears stored
[in, out], `embedding` for the token table) so that import/export is a table of renames and transposes.
Every parameter carries logical axis names (see `noisygrpo_jax.sharding`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import decode_attention, lora

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


def param(rngs: nnx.Rngs, shape, names, dtype, init=nnx.initializers.normal(0.02)) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=names, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out].

  With `adapters` that give `target` a rank r > 0 (lora.py), a low-rank adapter adds scale * (x @ lora_a) @ lora_b:
  lora_a [in, r] random, lora_b [r, out] zero, so the new adapter leaves y unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, bias: bool, names: tuple[str, str], dtype,
               rngs: nnx.Rngs, adapters: lora.Adapters | None = None, target: str = ""):
    self.kernel = param(rngs, (in_features, out_features), names, dtype)
    self.bias = param(rngs, (out_features,), names[1:], dtype, nnx.initializers.zeros) if bias else None
    rank = adapters.config.rank_of(target) if adapters is not None else 0
    self.lora_scale = adapters.config.scale if rank else 0.0
    self.lora_a = param(adapters.rngs, (in_features, rank), (names[0], None), dtype, lora.A_INIT) if rank else None
    self.lora_b = (param(adapters.rngs, (rank, out_features), (None, names[1]), dtype, nnx.initializers.zeros)
                   if rank else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    if self.lora_a is not None:
      y = y + self.lora_scale * jnp.dot(jnp.dot(x, self.lora_a[...].astype(x.dtype)), self.lora_b[...].astype(x.dtype))
    return y + self.bias[...].astype(x.dtype) if self.bias is not None else y


class RMSNorm(nnx.Module):
  """x / rms(x) * weight; statistics in float32, output in the input dtype (as HF)."""

  def __init__(self, dim: int, *, eps: float, names: tuple[str], dtype, rngs: nnx.Rngs):
    self.weight = param(rngs, (dim,), names, dtype, nnx.initializers.ones)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); `adapters` as in Linear (targets gate_proj, up_proj, down_proj)."""

  def __init__(self, dim: int, hidden: int, *, bias: bool, names: tuple[str, str], dtype, rngs: nnx.Rngs,
               adapters: lora.Adapters | None = None):
    embed, mlp = names
    linear = lambda i, o, names, target: Linear(i, o, bias=bias, names=names, dtype=dtype, rngs=rngs,
                                                adapters=adapters, target=target)
    self.gate_proj = linear(dim, hidden, (embed, mlp), "gate_proj")
    self.up_proj = linear(dim, hidden, (embed, mlp), "up_proj")
    self.down_proj = linear(hidden, dim, (mlp, embed), "down_proj")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [..., L, H, D] by float32 cos/sin [..., L, D] (broadcast over heads), in float32."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


_forced_implementation: str | None = None  # set by `force_attention_implementation`


@contextlib.contextmanager
def force_attention_implementation(implementation: str):
  """Routes every attention traced inside the block through jax.nn.dot_product_attention(implementation=...),
  whatever the backend, dtype and shapes: the tests' handle on the fused route on CPU ("xla"). The route is
  fixed when a function is traced, so a function compiled before keeps its own."""
  global _forced_implementation
  previous, _forced_implementation = _forced_implementation, implementation
  try:
    yield
  finally:
    _forced_implementation = previous


def cudnn_accepts(q, k, v) -> bool:
  """Whether cuDNN flash attention (jax.nn.dot_product_attention(implementation="cudnn"), as jax 0.10.2 checks it)
  runs these operands with a boolean mask, forward and backward: q, k, v of one dtype, bfloat16 or float16; a head
  dim that is a multiple of 8 and at most 128 (256 only from Hopper on); even query and key lengths (the mask goes
  in as an additive bias, and the bias backward needs them). Grouped KV heads are native.

  Args:
    q: [..., T, H, D]; k, v: [..., S, K, D]: arrays or anything with .shape and .dtype.
  """
  t, s, d = q.shape[-3], k.shape[-3], q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype and d % 8 == 0 and d <= 128
          and t % 2 == 0 and s % 2 == 0)


def attention_implementation(q, k, v) -> str | None:
  """The one routing decision for attention over q [..., T, H, D] and k, v [..., S, K, D]: the
  jax.nn.dot_product_attention implementation that runs it ("cudnn" on GPU where `cudnn_accepts`, or the one
  `force_attention_implementation` forces), or None for the einsum path (CPU, float32, a single decode query)."""
  if _forced_implementation is not None:
    return _forced_implementation
  return "cudnn" if jax.default_backend() == "gpu" and cudnn_accepts(q, k, v) else None


def _keys_as_sequence_major(k, heads_major: bool):
  """The shape and dtype of keys [..., S, K, D] that are stored [..., K, S, D] when `heads_major` (for routing)."""
  if not heads_major:
    return k
  return jax.ShapeDtypeStruct(k.shape[:-3] + (k.shape[-2], k.shape[-3], k.shape[-1]), k.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, vmappable: bool = False,
              kv_heads_major: bool = False) -> jax.Array:
  """Softmax attention with grouped KV heads and a boolean mask, routed by `attention_implementation`.

  The fused kernel never holds the [B, H, T, S] scores. cuDNN takes the mask as an additive bias in q's dtype (2
  bytes a score, besides the mask's 1) whose masked value is finite (-2^41 in bfloat16, -2^15 in float16), so a
  fully masked row (left padding) gets a finite softmax, uniform in bfloat16 as with NEG_INF here: never NaN.

  Args:
    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K.
    mask: bool [B, T, S] (True = attend).
    vmappable: hands the fused kernel the mask per head ([B, H, T, S]: H times the bias of the default
      [B, 1, T, S]). jax's cuDNN batching rule reshapes a vmapped bias to the query's heads and fails on one
      broadcast over them (jax-ml/jax#34920), so calls under jax.vmap (the vision tower's) need it.
    kv_heads_major: k, v are [B, K, S, D] (the KV caches' layout, which a decode step's einsums read in place);
      the fused kernel, which takes [B, S, K, D], then gets them transposed (a copy). A single query (a decode step)
      goes to the Pallas decode kernel where `decode_attention.decoding` routes it there.
  Returns:
    [B, T, H, D] in q's dtype.
  """
  if kv_heads_major and q.shape[1] == 1 and decode_attention.routed(q, k):
    return decode_attention.attention(q, k, v, mask)
  keys = _keys_as_sequence_major(k, kv_heads_major)
  implementation = attention_implementation(q, keys, keys)
  if implementation is None:
    return _einsum_attention(q, k, v, mask, kv_heads_major)
  if kv_heads_major:
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  heads = q.shape[2] if vmappable else 1
  mask = jnp.broadcast_to(mask[:, None], (mask.shape[0], heads) + mask.shape[1:])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      kv_heads_major: bool = False) -> jax.Array:
  """`attention` with float32 scores and softmax [B, H, T, S] in memory; shapes as there."""
  b, t, h, d = q.shape
  kv_heads = k.shape[1 if kv_heads_major else 2]
  keys = "bksd" if kv_heads_major else "bskd"
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum(f"btkgd,{keys}->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{keys}->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int,
                            kv_heads_major: bool = False) -> jax.Array:
  """`attention` one block of `chunk` queries at a time: the same result, with float32 scores [B, H, chunk, S]
  alive instead of [B, H, T, S] (a 4096-token prompt's decoder scores: 1/8 with chunk 512).

  Each block is checkpointed, so the backward keeps only the query blocks and recomputes one block's scores at a
  time. Up to `chunk` queries (decoding, completions), and wherever the fused kernel takes the pass (it holds no
  scores), this is `attention` itself.

  Args:
    q: [B, T, H, D]; k, v: [B, S, K, D] ([B, K, S, D] with kv_heads_major: `attention`); mask: bool [B, T, S];
    chunk: static query block size.
  Returns:
    [B, T, H, D] in q's dtype.
  """
  b, t, h, d = q.shape
  keys = _keys_as_sequence_major(k, kv_heads_major)
  if t <= chunk or attention_implementation(q, keys, keys) is not None:
    return attention(q, k, v, mask, kv_heads_major=kv_heads_major)
  n = -(-t // chunk)
  # Padding queries attend to nothing (a uniform softmax over their masked row) and are cut off below.
  blocks = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2)).reshape(
      (b, n, chunk) + x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def block(inputs):
    q_block, mask_block = inputs
    return attention(q_block, k, v, mask_block, kv_heads_major=kv_heads_major)

  out = jax.lax.map(block, (blocks(q), blocks(mask)))  # [n, B, chunk, H, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :t]


def _query_blocks(q: jax.Array, segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """q [P, H, D] and segment_ids [P] padded to n * block positions and split into n blocks: ([n, block, H, D],
  [n, block]). Padding queries get segment -1, which no key has: a uniform softmax that callers slice off."""
  p = q.shape[0]
  n = -(-p // block)
  tail = n * block - p
  q_blocks = jnp.pad(q, ((0, tail), (0, 0), (0, 0))).reshape((n, block) + q.shape[1:])
  return q_blocks, jnp.pad(segment_ids, (0, tail), constant_values=-1).reshape(n, block)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int) -> jax.Array:
  """Attention within contiguous segments of at most `block` positions, in O(P * block) instead of O(P^2).

  A query in [s, s + block) can only share a segment with keys in [s - block, s + 2 * block), so each query
  block attends to a 3-block key window with the segment mask: one `attention` over the n blocks (vmappable: the
  fused kernel's bias is [n, H, block, 3 * block]). Equals `attention` with the dense mask
  segment_ids[:, None] == segment_ids[None, :] on every position whose segment is at most `block` long.

  Args:
    q, k, v: [P, H, D]; segment_ids: int [P].
  Returns:
    [P, H, D].
  """
  p, h, d = q.shape
  q_blocks, q_seg = _query_blocks(q, segment_ids, block)
  n, tail = q_blocks.shape[0], q_blocks.shape[0] * block - p

  def key_windows(x, fill):
    padded = jnp.pad(x, ((block, tail + block),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
    return jnp.concatenate([padded[i * block:(n + i) * block].reshape((n, block) + x.shape[1:]) for i in range(3)],
                           axis=1)

  k_seg = key_windows(segment_ids, -2)
  mask = q_seg[:, :, None] == k_seg[:, None, :]
  out = attention(q_blocks, key_windows(k, 0), key_windows(v, 0), mask, vmappable=True)
  return out.reshape(n * block, h, d)[:p]


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      query_chunk: int) -> jax.Array:
  """Non-causal attention within segments of any length (a query sees the keys of its segment).

  Up to `query_chunk` positions this is the dense [H, P, P] computation; beyond, `chunked_segment_attention`
  bounds the scores to [H, query_chunk, P]. Both give the same result.

  Args:
    q, k, v: [P, H, D]; segment_ids: int [P]; query_chunk: static.
  Returns:
    [P, H, D] in q's dtype.
  """
  if q.shape[0] <= query_chunk:
    mask = segment_ids[:, None] == segment_ids[None, :]
    return attention(q[None], k[None], v[None], mask[None], vmappable=True)[0]
  return chunked_segment_attention(q, k, v, segment_ids, query_chunk)


def chunked_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                              chunk: int) -> jax.Array:
  """Exact segment attention, one block of `chunk` queries at a time against all P keys.

  Peak score memory is float32 [H, chunk, P] instead of [H, P, P]. Each block is checkpointed, so the
  backward keeps only the query blocks (k and v are loop-invariant) and recomputes one block's scores at a
  time, with or without an enclosing remat. The fused kernel keeps the blocks: its vmappable mask is a bias
  [H, chunk, P] in q's dtype (537 MB at P = 16384, 16 heads, chunk 1024 in bfloat16, against 1.07 GB of float32
  scores; [H, P, P] would be 8.6 GB).

  Args:
    q, k, v: [P, H, D]; segment_ids: int [P]; chunk: static query block size.
  Returns:
    [P, H, D] in q's dtype.
  """
  p, h, d = q.shape
  q_blocks, q_seg = _query_blocks(q, segment_ids, chunk)
  n = q_blocks.shape[0]

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def block(inputs):
    q_block, seg_block = inputs
    mask = seg_block[:, None] == segment_ids[None, :]
    return attention(q_block[None], k[None], v[None], mask[None], vmappable=True)[0]

  return jax.lax.map(block, (q_blocks, q_seg)).reshape(n * chunk, h, d)[:p]
