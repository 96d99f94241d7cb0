"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v bias, RMSNorm, SwiGLU, multimodal RoPE, KV cache."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl.config import LoraConfig, TextConfig
from noisygrpo_jax.models.qwen2_5_vl import lora, stacking
from noisygrpo_jax.models.qwen2_5_vl.layers import (Linear, RMSNorm, SwiGLU, apply_rope, param,
                                                    query_chunked_attention)

QUERY_CHUNK = 512  # queries per attention block of long passes (prefill, prompts): bounds their scores


@flax.struct.dataclass
class LayerCache:
  """Keys and values for S cache slots: k, v [B, K, S, head_dim] for one layer, heads-major (as HF's cache), so a
  decode step's attention einsums read them in place (from [B, S, K, head_dim] XLA would first transpose the whole
  cache, every step). The decoder's caches take the form of its layers (`stacking.run_layers`): one LayerCache with
  a leading layer axis, k, v [num_layers, B, K, S, head_dim], for stacked layers; a tuple of one LayerCache per
  layer for a `stacking.LayerList`."""

  k: jax.Array
  v: jax.Array


def mrope(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
  """Multimodal RoPE angles.

  The rotary frequencies are split into `mrope_section` chunks; chunk i takes its positions from axis
  i % 3 (temporal, height, width).

  Args:
    position_ids: int [3, B, T].
  Returns:
    float32 cos, sin [B, T, head_dim].
  """
  half = config.head_dim // 2
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(half, dtype=np.float32) * 2 / config.head_dim))
  axis_of_freq = np.concatenate([np.full(n, i % 3) for i, n in enumerate(config.mrope_section)])
  pos = position_ids.astype(jnp.float32)[axis_of_freq]  # [half, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class Attention(nnx.Module):
  """Grouped-query self-attention; `adapters` (lora.py) may adapt q_proj, k_proj, v_proj and o_proj."""

  def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs, adapters: lora.Adapters | None = None):
    d, hd = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
    linear = lambda i, o, bias, names, target: Linear(i, o, bias=bias, names=names, dtype=dtype, rngs=rngs,
                                                      adapters=adapters, target=target)
    self.q_proj = linear(d, self.num_heads * hd, True, ("embed", "heads"), "q_proj")
    self.k_proj = linear(d, self.num_kv_heads * hd, True, ("embed", "kv_heads"), "k_proj")
    self.v_proj = linear(d, self.num_kv_heads * hd, True, ("embed", "kv_heads"), "v_proj")
    self.o_proj = linear(self.num_heads * hd, d, False, ("heads", "embed"), "o_proj")

  def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None, cache_index=None):
    """x [B, T, D]; cos/sin [B, T, head_dim]; mask bool [B, T, S].

    Without a cache S == T. With a cache, this step's keys/values are written at slots
    [cache_index, cache_index + T) and attention runs over all S cache slots.
    Returns (out [B, T, D], updated cache or None).
    """
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if cache is None:
      out = query_chunked_attention(q, k, v, mask, QUERY_CHUNK)
    else:
      start = (0, 0, cache_index, 0)
      write = lambda c, x: jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), start)
      cache = LayerCache(write(cache.k, k), write(cache.v, v))
      out = query_chunked_attention(q, cache.k, cache.v, mask, QUERY_CHUNK, kv_heads_major=True)
    return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):

  def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs, adapters: lora.Adapters | None = None):
    norm = dict(eps=config.rms_norm_eps, names=("norm",), dtype=dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = Attention(config, dtype, rngs, adapters)
    self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=False, names=("embed", "mlp"),
                      dtype=dtype, rngs=rngs, adapters=adapters)

  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
  """Qwen2_5_VLTextModel: token embedding, decoder layers (stacked parameters, `stacking`), final norm.

  `lora_config` with rank > 0 gives the layers' target projections low-rank adapters (lora.py), stacked as the
  layers are.
  """

  def __init__(self, config: TextConfig, dtype, rngs: nnx.Rngs, remat: bool = False, scan_layers: bool = True,
               lora_config: LoraConfig = LoraConfig()):
    self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, rngs)
    adapters = lora.Adapters(lora_config, rngs) if lora_config.rank else None
    self.layers = stacking.stack_layers([DecoderLayer(config, dtype, rngs, adapters)
                                         for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, names=("norm",), dtype=dtype, rngs=rngs)

  def __call__(self, embeds, position_ids, mask, caches: LayerCache | None = None, cache_index=None,
               remat: bool = True):
    """embeds [B, T, D]; position_ids int [3, B, T]; mask bool [B, T, S]; caches: k, v [layers, B, K, S, head_dim]
    (a tuple of per-layer caches when the layers are a `stacking.LayerList`).

    `remat=False` turns the model's rematerialisation off for this call (the sampler's cached decoding, which
    is never differentiated); with caches, gradients flow through them (the trainer's shared-prompt pass).
    Returns (final normed hidden states [B, T, D], updated caches or None).
    """
    cos, sin = mrope(position_ids, self.config)

    def layer_step(layer, x, cache):
      return layer(x, cos, sin, mask, cache, cache_index)

    x, caches = stacking.run_layers(self.layers, layer_step, embeds, caches, scan=self.scan_layers,
                                    remat=self.remat and remat)
    return self.norm(x), caches


class Embedding(nnx.Module):
  """Token table [vocab, D] (HF `embed_tokens.weight`)."""

  def __init__(self, vocab_size: int, dim: int, dtype, rngs: nnx.Rngs):
    self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)
