"""The Qwen2.5-VL vision tower: patch embedding, window/full-attention blocks, patch merger.

Runs on one `VisionBatch` row at a time (vmapped over the batch by the caller), so images are sharded
with the batch rows they belong to. Window and full attention are block-diagonal masks built from
the host-computed segment ids (windowed blocks only look at a 3-window neighbourhood of each query
block, since windows are contiguous in window order; full-attention blocks of long rows process the
queries in chunks against all keys); padding patches form their own segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl.config import VisionConfig
from noisygrpo_jax.models.qwen2_5_vl.layers import (Linear, RMSNorm, SwiGLU, apply_rope, local_attention,
                                                    remat_call, segment_attention)

# Full-attention blocks attend over all P patches of a row; beyond this many patches the queries are
# processed in blocks of this size so the float32 scores stay [heads, 1024, P] (dense: [heads, P, P],
# 17 GB for the 3B tower at P = 16384).
FULL_ATTENTION_QUERY_CHUNK = 1024


class PatchEmbed(nnx.Module):
  """The Conv3d with kernel == stride is a linear map of each flattened patch: one matmul."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs):
    self.proj = Linear(config.patch_dim, config.hidden_size, bias=False, names=("patch", "vision_embed"),
                       dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """[P, 1176] -> [P, hidden] in the parameters' dtype (the tower computes in the dtype it is stored in)."""
    return self.proj(pixel_values.astype(self.proj.kernel.dtype))


class VisionAttention(nnx.Module):
  """Non-causal attention within segments: windows (windowed blocks) or image frames (full-attention blocks)."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, windowed: bool):
    dim = config.hidden_size
    self.num_heads = config.num_heads
    # Windowed blocks attend locally: a window holds at most merger_window^2 merged tokens.
    self.window_block = config.merger_window**2 * config.merge_unit if windowed else None
    self.query_chunk = FULL_ATTENTION_QUERY_CHUNK
    self.qkv = Linear(dim, 3 * dim, bias=True, names=("vision_embed", "qkv"), dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, bias=True, names=("qkv", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x [P, C], cos/sin [P, head_dim], segment_ids int [P] -> [P, C]."""
    p, c = x.shape
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, c // self.num_heads), 1, 0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if self.window_block is None:
      out = segment_attention(q, k, v, segment_ids, self.query_chunk)
    else:
      out = local_attention(q, k, v, segment_ids, self.window_block)
    return self.proj(out.reshape(p, c))


class VisionBlock(nnx.Module):

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, windowed: bool):
    norm = dict(eps=1e-6, names=("norm",), dtype=dtype, rngs=rngs)
    self.windowed = windowed
    self.norm1 = RMSNorm(config.hidden_size, **norm)
    self.norm2 = RMSNorm(config.hidden_size, **norm)
    self.attn = VisionAttention(config, dtype, rngs, windowed)
    self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=True,
                      names=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, window_segment_ids, full_segment_ids):
    segments = window_segment_ids if self.windowed else full_segment_ids
    x = x + self.attn(self.norm1(x), cos, sin, segments)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge_unit of neighbouring patches concatenated -> Linear -> GELU -> Linear."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs):
    wide = config.hidden_size * config.merge_unit
    self.ln_q = RMSNorm(config.hidden_size, eps=1e-6, names=("norm",), dtype=dtype, rngs=rngs)
    self.mlp = nnx.List([
        Linear(wide, wide, bias=True, names=("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs),
        Linear(wide, config.out_hidden_size, bias=True, names=("vision_embed", "embed"), dtype=dtype, rngs=rngs),
    ])
    self.wide = wide

  def __call__(self, x: jax.Array) -> jax.Array:
    """[P, hidden] -> [P / merge_unit, out_hidden]."""
    x = self.ln_q(x).reshape(-1, self.wide)
    # nn.GELU() in PyTorch is the exact (erf) GELU.
    return self.mlp[1](jax.nn.gelu(self.mlp[0](x), approximate=False))


class VisionTransformer(nnx.Module):
  """Qwen2_5_VisionTransformerPretrainedModel."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, remat: bool = False):
    self.config = config
    self.remat = remat
    self.patch_embed = PatchEmbed(config, dtype, rngs)
    self.blocks = nnx.List([VisionBlock(config, dtype, rngs, windowed=i not in config.fullatt_block_indexes)
                            for i in range(config.depth)])
    self.merger = PatchMerger(config, dtype, rngs)

  def rope(self, rope_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2-D rotary angles: (h, w) ids [P, 2] -> float32 cos, sin [P, head_dim]."""
    quarter = self.config.head_dim // 4
    inv_freq = 1.0 / (self.config.rope_theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (2 * quarter)))
    freqs = (rope_ids[:, :, None].astype(jnp.float32) * inv_freq).reshape(rope_ids.shape[0], 2 * quarter)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)

  def __call__(self, pixel_values, window_index, reverse_index, rope_ids, window_segment_ids,
               full_segment_ids) -> jax.Array:
    """One packed row (see host.VisionBatch, without the batch axis) -> merged features in token order.

    Returns:
      [P / merge_unit, out_hidden] in the parameter dtype; rows past the real patches are padding.
    """
    unit = self.config.merge_unit
    x = self.patch_embed(pixel_values)
    p, c = x.shape
    x = x.reshape(p // unit, unit, c)[window_index].reshape(p, c)
    cos, sin = self.rope(rope_ids)
    for block in self.blocks:
      args = (x, cos, sin, window_segment_ids, full_segment_ids)
      x = remat_call(block, *args) if self.remat else block(*args)
    return self.merger(x)[reverse_index]
