"""Qwen2.5-VL for conditional generation: vision tower + decoder + LM head.

Two ways in:
- `Qwen25VL.__call__` / `hidden_states`: the jit-friendly path. Inputs are padded, bucketed arrays
  prepared on the host (`host.mrope_position_ids`, `host.pack_vision_batch`); the sampler and the
  trainer use it inside their own jitted functions.
- `Qwen25VL.forward_hf`: takes exactly the arrays the HF processor produces, does the host-side
  bookkeeping and runs a jitted forward; this is what parity tests compare with transformers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import host, stacking
from noisygrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from noisygrpo_jax.models.qwen2_5_vl.layers import Linear
from noisygrpo_jax.models.qwen2_5_vl.text import LayerCache, TextModel
from noisygrpo_jax.models.qwen2_5_vl.vision import VisionTransformer


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """bool [B, T, T]: query t sees valid keys s <= t. attention_mask: [B, T] (1 = real token)."""
  t = attention_mask.shape[1]
  return jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]


def unstacked_decoder(model: Qwen25VL) -> Qwen25VL:
  """`model` with its decoder layers held one module per layer (`stacking.LayerList`), the layout decoding reads: a
  new module over the same arrays but the decoder layers' weights, copied once (`stacking.unstack_layers`); `model`
  itself when its layers already are a LayerList (e.g. the trainer's rollout copy, `loops.Run.rollout_params`)."""
  if isinstance(model.language_model.layers, stacking.LayerList):
    return model
  unstacked = nnx.merge(*nnx.split(model))
  unstacked.language_model.layers = stacking.unstack_layers(model.language_model.layers)
  return unstacked


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration. Submodule names mirror the HF checkpoint's."""

  def __init__(self, config: Qwen25VLConfig, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.visual = VisionTransformer(config.vision, dtype, rngs, remat=config.remat, scan_layers=config.scan_layers)
    self.language_model = TextModel(config.text, dtype, rngs, remat=config.remat, scan_layers=config.scan_layers,
                                    lora_config=config.lora)
    self.lm_head = None if config.text.tie_word_embeddings else Linear(
        config.text.hidden_size, config.text.vocab_size, bias=False, names=("embed", "vocab"), dtype=dtype,
        rngs=rngs)

  # ----------------------------------------------------------------------------------------------
  # jit-friendly path

  def vision_features(self, vision: host.VisionBatch) -> jax.Array:
    """Merged vision features per row, in token order: [B, P / merge_unit, D]."""
    fields = (vision.pixel_values, vision.window_index, vision.reverse_index, vision.rope_ids,
              vision.window_segment_ids, vision.full_segment_ids)
    return jax.vmap(self.visual)(*fields)

  def embed(self, input_ids: jax.Array, vision: host.VisionBatch | None = None) -> jax.Array:
    """Token embeddings with each row's vision features at its <|image_pad|>/<|video_pad|> tokens.

    The k-th vision token of a row receives the row's k-th merged feature (the host packs a row's
    images and videos in the order their tokens appear). Returns [B, T, D].
    """
    embeds = self.language_model.embed_tokens(input_ids)
    if vision is None:
      return embeds
    features = self.vision_features(vision).astype(embeds.dtype)
    is_vision = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
    slot = jnp.clip(jnp.cumsum(is_vision, axis=1) - 1, 0, features.shape[1] - 1)
    placed = jnp.take_along_axis(features, slot[..., None], axis=1)
    return jnp.where(is_vision[..., None], placed, embeds)

  def hidden_states(self, input_ids, position_ids, attention_mask=None, vision=None, *, mask=None,
                    caches: LayerCache | None = None, cache_index=None, remat: bool = True):
    """Final normed hidden states.

    Args:
      input_ids: int [B, T].
      position_ids: int [3, B, T] (host.mrope_position_ids).
      attention_mask: [B, T], 1 for real tokens; used to build a causal mask when `mask` is None.
      vision: packed images/videos per row, or None for text only.
      mask: optional bool [B, T, S] attention mask (the sampler passes its own for cached decoding).
      caches, cache_index: the decoder's KV caches (k, v [layers, B, K, S, head_dim]; with unstacked layers a tuple
        of one [B, K, S, head_dim] per layer: sampler.init_caches) and the slot where this call's tokens are written.
      remat: False skips the decoder's rematerialisation (config.remat) for calls never differentiated.
    Returns:
      (hidden [B, T, D], updated caches or None).
    """
    if mask is None:
      if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
      mask = causal_mask(attention_mask)
    return self.language_model(self.embed(input_ids, vision), position_ids, mask, caches, cache_index, remat)

  @property
  def decoder_dtype(self):
    """The dtype the decoder computes in (and its KV caches hold): its embedding table's, i.e. that of the parameters
    the model was merged with, whatever config.dtype built it."""
    return self.language_model.embed_tokens.embedding.dtype

  def lm_head_weights(self) -> tuple[jax.Array, int]:
    """The output projection as stored, and its vocabulary axis: the embedding table [V, D] when tied (axis 0), the
    kernel [D, V] otherwise (axis 1); for slicing vocabulary chunks without a transposed copy."""
    if self.lm_head is None:
      return self.language_model.embed_tokens.embedding[...], 0
    return self.lm_head.kernel[...], 1

  def lm_head_kernel(self) -> jax.Array:
    """[D, V]: the output projection (the transposed embedding table when tied)."""
    weights, vocab_axis = self.lm_head_weights()
    return weights.T if vocab_axis == 0 else weights

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] -> float32 [..., V]."""
    kernel = self.lm_head_kernel()
    return jnp.dot(hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)

  def __call__(self, input_ids, position_ids, attention_mask=None, vision=None) -> jax.Array:
    """Float32 logits [B, T, V] for padded, host-prepared inputs (see `hidden_states`)."""
    hidden, _ = self.hidden_states(input_ids, position_ids, attention_mask, vision)
    return self.logits(hidden)

  # ----------------------------------------------------------------------------------------------
  # HF-processor-compatible path

  def prepare_hf_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                        pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                        num_patches: int | None = None) -> dict:
    """Host-side bookkeeping: HF processor arrays -> the jit-friendly inputs of `__call__`, plus each row's
    `rope_deltas` [B, 1] for decoding."""
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    position_ids, rope_deltas = host.mrope_position_ids(input_ids, self.config, attention_mask, image_grid_thw,
                                              video_grid_thw, second_per_grid_ts)
    vision = None
    if pixel_values is not None or pixel_values_videos is not None:
      rows = _assign_vision_to_rows(input_ids, attention_mask, self.config, pixel_values, image_grid_thw,
                                    pixel_values_videos, video_grid_thw)
      vision = host.pack_vision_batch(rows, self.config.vision, num_patches)
    return dict(input_ids=input_ids.astype(np.int32), position_ids=position_ids,
                attention_mask=attention_mask.astype(np.int32), rope_deltas=rope_deltas, vision=vision)

  def forward_hf(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> jax.Array:
    """Logits [B, T, V] (float32) from exactly the arrays the HF processor produces."""
    inputs = self.prepare_hf_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                    video_grid_thw, second_per_grid_ts)
    inputs.pop("rope_deltas")
    graphdef, state = nnx.split(self)
    return jitted_logits(graphdef, state, **inputs)


@functools.partial(jax.jit, static_argnums=0)
def jitted_logits(graphdef, state, input_ids, position_ids, attention_mask, vision):
  """Float32 logits of `nnx.merge(graphdef, state)`; compiles once per input shape bucket."""
  return nnx.merge(graphdef, state)(input_ids, position_ids, attention_mask, vision)


def _split_by_grid(pixel_values, grid_thw) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
  if pixel_values is None:
    return []
  grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  pixel_values = np.asarray(pixel_values, np.float32)
  sizes = np.prod(grids, axis=1)
  if sizes.sum() != pixel_values.shape[0]:
    raise ValueError(f"pixel values have {pixel_values.shape[0]} patches but the grids {grids.tolist()} "
                     f"describe {int(sizes.sum())}; pass the processor's pixel values with their grids.")
  chunks = np.split(pixel_values, np.cumsum(sizes)[:-1])
  return [(c, tuple(int(x) for x in g)) for c, g in zip(chunks, grids)]


def _assign_vision_to_rows(input_ids, attention_mask, config, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw):
  """Gives each row the images/videos of its placeholder spans, in token order (HF's row-major order)."""
  queues = {config.image_token_id: list(_split_by_grid(pixel_values, image_grid_thw)),
            config.video_token_id: list(_split_by_grid(pixel_values_videos, video_grid_thw))}
  names = {config.image_token_id: "image", config.video_token_id: "video"}
  rows = []
  for r, (ids, valid) in enumerate(zip(input_ids, attention_mask.astype(bool))):
    ids = ids[valid]
    patches, grids = [], []
    previous = np.r_[-1, ids[:-1]]
    for s in np.flatnonzero(np.isin(ids, list(queues)) & (ids != previous)):
      token = int(ids[s])
      end = s
      while end < len(ids) and ids[end] == token:
        end += 1
      if not queues[token]:
        raise ValueError(f"row {r} has more <|{names[token]}_pad|> spans than {names[token]}s were given.")
      chunk, grid = queues[token].pop(0)
      needed = int(np.prod(grid)) // config.vision.merge_unit
      if needed != end - s:
        raise ValueError(f"Image features and image tokens do not match: row {r}, the {names[token]} of grid "
                         f"{grid} has {needed} features but its placeholder span has {end - s} tokens.")
      patches.append(chunk)
      grids.append(grid)
    rows.append((patches, grids))
  leftover = {names[t]: len(q) for t, q in queues.items() if q}
  if leftover:
    raise ValueError(f"Image features and image tokens do not match: {leftover} left without placeholder "
                     "tokens in input_ids.")
  return rows
