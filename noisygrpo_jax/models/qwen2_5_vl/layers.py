"""Building blocks shared by the vision tower and the decoder.

Parameter names follow the HF checkpoint (`weight` for norms, `kernel`/`bias` for linears stored
[in, out], `embedding` for the token table) so that import/export is a table of renames and transposes.
Every parameter carries logical axis names (see `noisygrpo_jax.sharding`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


def param(rngs: nnx.Rngs, shape, names, dtype, init=nnx.initializers.normal(0.02)) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=names, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out]."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool, names: tuple[str, str], dtype,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, (in_features, out_features), names, dtype)
    self.bias = param(rngs, (out_features,), names[1:], dtype, nnx.initializers.zeros) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
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
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, bias: bool, names: tuple[str, str], dtype, rngs: nnx.Rngs):
    embed, mlp = names
    self.gate_proj = Linear(dim, hidden, bias=bias, names=(embed, mlp), dtype=dtype, rngs=rngs)
    self.up_proj = Linear(dim, hidden, bias=bias, names=(embed, mlp), dtype=dtype, rngs=rngs)
    self.down_proj = Linear(hidden, dim, bias=bias, names=(mlp, embed), dtype=dtype, rngs=rngs)

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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention with grouped KV heads and a boolean mask.

  Args:
    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K.
    mask: bool [B, T, S] (True = attend).
  Returns:
    [B, T, H, D] in q's dtype. Scores and softmax are computed in float32.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int) -> jax.Array:
  """`attention` one block of `chunk` queries at a time: the same result, with float32 scores [B, H, chunk, S]
  alive instead of [B, H, T, S] (a 4096-token prompt's decoder scores: 1/8 with chunk 512).

  Each block is checkpointed, so the backward keeps only the query blocks and recomputes one block's scores at a
  time. Up to `chunk` queries (decoding, completions) this is `attention` itself.

  Args:
    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: bool [B, T, S]; chunk: static query block size.
  Returns:
    [B, T, H, D] in q's dtype.
  """
  b, t, h, d = q.shape
  if t <= chunk:
    return attention(q, k, v, mask)
  n = -(-t // chunk)
  # Padding queries attend to nothing (a uniform softmax over their masked row) and are cut off below.
  blocks = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2)).reshape(
      (b, n, chunk) + x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def block(inputs):
    q_block, mask_block = inputs
    return attention(q_block, k, v, mask_block)

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
  block attends to a 3-block key window with the segment mask. Equals `attention` with the dense mask
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
  out = attention(q_blocks, key_windows(k, 0), key_windows(v, 0), mask)
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
    return attention(q[None], k[None], v[None], mask[None])[0]
  return chunked_segment_attention(q, k, v, segment_ids, query_chunk)


def chunked_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                              chunk: int) -> jax.Array:
  """Exact segment attention, one block of `chunk` queries at a time against all P keys.

  Peak score memory is float32 [H, chunk, P] instead of [H, P, P]. Each block is checkpointed, so the
  backward keeps only the query blocks (k and v are loop-invariant) and recomputes one block's scores at a
  time, with or without an enclosing remat.

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
    return attention(q_block[None], k[None], v[None], mask[None])[0]

  return jax.lax.map(block, (q_blocks, q_seg)).reshape(n * chunk, h, d)[:p]


def remat_call(module: nnx.Module, *args, policy=jax.checkpoint_policies.nothing_saveable):
  """`module(*args)` with its activations recomputed in the backward pass (jax.checkpoint).

  The checkpointed function is pure in the module's split state and returns nothing but its outputs, so it
  composes with any enclosing transform. (`nnx.remat` writes the state back into the module's Variables,
  which raises TraceContextError when they were created at an outer trace level, e.g. for the vision tower
  under `jax.vmap`.) With `nothing_saveable` the backward keeps only the arguments: the layer's inputs and
  parameters. XLA:CPU's default concurrency-optimised scheduler moves the recomputation back into the forward
  pass, so on CPU the saving needs `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`.

  Args:
    module: a stateless-in-the-forward module (no Variable is updated by its call).
    *args: its call arguments (pytrees of arrays or None).
  """
  graphdef, state = nnx.split(module)

  def pure(state, args):
    return nnx.merge(graphdef, state)(*args)

  return jax.checkpoint(pure, policy=policy)(state, args)
