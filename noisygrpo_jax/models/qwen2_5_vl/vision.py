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
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import stacking
from noisygrpo_jax.models.qwen2_5_vl.config import VisionConfig
from noisygrpo_jax.models.qwen2_5_vl.layers import (Linear, RMSNorm, SwiGLU, apply_rope, local_attention,
                                                    segment_attention)
from noisygrpo_jax.processing import image

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
    """[P, 1176] normalised float pixel values, or their uint8 levels (`image.normalise`d here) -> [P, hidden] in
    the parameters' dtype (the tower computes in the dtype it is stored in)."""
    if pixel_values.dtype == jnp.uint8:
      pixel_values = image.normalise(pixel_values, xp=jnp)
    return self.proj(pixel_values.astype(self.proj.kernel.dtype))


class VisionAttention(nnx.Module):
  """Non-causal attention within segments: windows (windowed blocks) or image frames (full-attention blocks)."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs):
    dim = config.hidden_size
    self.num_heads = config.num_heads
    # Windowed blocks attend locally: a window holds at most merger_window^2 merged tokens.
    self.window_block = config.merger_window**2 * config.merge_unit
    self.query_chunk = FULL_ATTENTION_QUERY_CHUNK
    self.qkv = Linear(dim, 3 * dim, bias=True, names=("vision_embed", "qkv"), dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, bias=True, names=("qkv", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, window_segment_ids: jax.Array,
               full_segment_ids: jax.Array, full_attention: bool | jax.Array) -> jax.Array:
    """x [P, C], cos/sin [P, head_dim], segment ids int [P] -> [P, C].

    full_attention: a Python or numpy bool (the kind is fixed in the program), or a traced bool scalar (a scanned
    block's flag: both kinds are compiled once and the flag picks one at run time).
    """
    p, c = x.shape
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, c // self.num_heads), 1, 0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    full = lambda: segment_attention(q, k, v, full_segment_ids, self.query_chunk)
    windowed = lambda: local_attention(q, k, v, window_segment_ids, self.window_block)
    if isinstance(full_attention, (bool, np.bool_)):
      out = full() if full_attention else windowed()
    else:
      out = jax.lax.cond(full_attention, full, windowed)
    return self.proj(out.reshape(p, c))


class VisionBlock(nnx.Module):
  """A pre-norm transformer block; whether it attends within windows or whole frames is its caller's flag."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs):
    norm = dict(eps=1e-6, names=("norm",), dtype=dtype, rngs=rngs)
    self.norm1 = RMSNorm(config.hidden_size, **norm)
    self.norm2 = RMSNorm(config.hidden_size, **norm)
    self.attn = VisionAttention(config, dtype, rngs)
    self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=True,
                      names=("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, window_segment_ids, full_segment_ids, full_attention):
    x = x + self.attn(self.norm1(x), cos, sin, window_segment_ids, full_segment_ids, full_attention)
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
  """Qwen2_5_VisionTransformerPretrainedModel; its blocks are one stack (`stacking`)."""

  def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, remat: bool = False, scan_layers: bool = True):
    self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    self.patch_embed = PatchEmbed(config, dtype, rngs)
    self.blocks = stacking.stack_layers([VisionBlock(config, dtype, rngs) for _ in range(config.depth)])
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
    # Scanned, each block reads its flag at run time; unrolled, it gets a numpy bool that fixes its kind.
    full = np.isin(np.arange(self.config.depth), self.config.fullatt_block_indexes)

    def block_step(block, x, full_attention):
      return block(x, cos, sin, window_segment_ids, full_segment_ids, full_attention), None

    x, _ = stacking.run_layers(self.blocks, block_step, x, full, scan=self.scan_layers, remat=self.remat)
    return self.merger(x)[reverse_index]
