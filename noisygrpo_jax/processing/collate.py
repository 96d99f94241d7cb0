"""Collation: encoded examples -> padded, bucketed model inputs (numpy, host side).

Prompts are left-padded to the smallest length bucket that fits the batch, so decoding appends to the right;
each row's images are packed into one patch sequence padded to the smallest patch bucket. A new batch of
the same buckets has the same shapes and never recompiles the jitted model.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from noisygrpo_jax.models.qwen2_5_vl import host
from noisygrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from noisygrpo_jax.processing.chat_template import EncodedChat
from noisygrpo_jax.processing.errors import PromptTooLongError
from noisygrpo_jax.processing.image import ImageInputs


@flax.struct.dataclass
class PromptBatch:
  """Left-padded prompts with everything the model needs.

  input_ids: int32 [B, T]; attention_mask: int32 [B, T] (1 = real token, padding on the left);
  position_ids: int32 [3, B, T]; rope_deltas: int32 [B, 1]; vision: packed images per row or None.
  """

  input_ids: jax.Array
  attention_mask: jax.Array
  position_ids: jax.Array
  rope_deltas: jax.Array
  vision: host.VisionBatch | None = None


def split_rows(batch, k: int):
  """A batch of B rows (a PromptBatch or any flax dataclass whose leaves have rows first, but `position_ids`
  [3, B, T]) as k parts of B / k consecutive rows stacked on a new leading axis, for `jax.lax.map`/`scan` over
  micro-batches: [B, ...] -> [k, B / k, ...], position_ids [3, B, T] -> [k, 3, B / k, T]."""
  def split(x, axis=0):
    x = jnp.moveaxis(x, axis, 0)
    return jnp.moveaxis(x.reshape((k, x.shape[0] // k) + x.shape[1:]), 1, axis + 1)
  return jax.tree.map(split, batch.replace(position_ids=None)).replace(position_ids=split(batch.position_ids, 1))


def pick_bucket(size: int, buckets: Sequence[int] | None, what: str, source: str) -> int:
  """The smallest bucket >= size (size itself when no buckets are configured)."""
  if not buckets:
    return size
  for b in sorted(buckets):
    if b >= size:
      return b
  raise PromptTooLongError(source, f"{what} {size} exceeds the largest bucket {max(buckets)}",
                           f"add a larger bucket to the config ({what} buckets) or shrink the input")


def collate_prompts(chats: Sequence[EncodedChat], images: Sequence[ImageInputs | None], config: Qwen25VLConfig, *,
                    pad_id: int, prompt_buckets: Sequence[int] | None = None,
                    patch_buckets: Sequence[int] | None = None, sources: Sequence[str] | None = None) -> PromptBatch:
  """Encoded prompts (vision placeholders expanded) + each row's images -> a PromptBatch.

  Args:
    chats: one EncodedChat per row (e.g. encode_chat(..., add_generation_prompt=True)).
    images: the row's processed images (in placeholder order) or None for a text-only row.
    pad_id: token id used for left padding.
    prompt_buckets, patch_buckets: allowed padded lengths; None pads to the batch maximum.
    sources: names of the rows' examples for error messages.
  """
  sources = list(sources or [f"example {i}" for i in range(len(chats))])
  longest = max(len(c) for c in chats)
  length = pick_bucket(longest, prompt_buckets, "prompt tokens", sources[int(np.argmax([len(c) for c in chats]))])
  ids = np.full((len(chats), length), pad_id, np.int32)
  mask = np.zeros((len(chats), length), np.int32)
  for i, chat in enumerate(chats):
    ids[i, length - len(chat):] = chat.input_ids
    mask[i, length - len(chat):] = 1
  grids = [im.image_grid_thw for im in images if im is not None and len(im.image_grid_thw)]
  image_grid = np.concatenate(grids) if grids else None
  position_ids, rope_deltas = host.mrope_position_ids(ids, config, mask, image_grid)
  vision = None
  if image_grid is not None:
    rows = [([], []) if im is None else (_split(im), [tuple(g) for g in im.image_grid_thw]) for im in images]
    patches = [0 if im is None else im.pixel_values.shape[0] for im in images]
    num_patches = pick_bucket(-(-max(patches) // config.vision.merge_unit) * config.vision.merge_unit,
                              patch_buckets, "image patches", sources[int(np.argmax(patches))])
    vision = host.pack_vision_batch(rows, config.vision, num_patches)
  return PromptBatch(input_ids=ids, attention_mask=mask, position_ids=position_ids, rope_deltas=rope_deltas,
                     vision=vision)


def _split(images: ImageInputs) -> list[np.ndarray]:
  sizes = np.prod(images.image_grid_thw, axis=1)
  return np.split(images.pixel_values, np.cumsum(sizes)[:-1])


def split_targets(chats: Sequence[EncodedChat], *, pad_id: int, completion_buckets: Sequence[int] | None = None,
                  sources: Sequence[str] | None = None) -> tuple[list[EncodedChat], np.ndarray, np.ndarray]:
  """SFT: cuts each chat before its first target token into (prompt chat, right-padded target tokens).

  Returns (prompt chats, tokens int32 [B, M], mask float32 [B, M]) where M is the completion bucket.
  """
  sources = list(sources or [f"example {i}" for i in range(len(chats))])
  prompts, targets = [], []
  for chat, source in zip(chats, sources):
    starts = np.flatnonzero(chat.target_mask)
    if not starts.size:
      raise ValueError(f"{source}: the conversation has no assistant turn to learn from; add the answer turn")
    cut = int(starts[0])
    prompts.append(EncodedChat(chat.input_ids[:cut], chat.target_mask[:cut], chat.num_vision_tokens))
    targets.append(chat.input_ids[cut:][chat.target_mask[cut:]])
  longest = max(len(t) for t in targets)
  m = pick_bucket(longest, completion_buckets, "target tokens", sources[int(np.argmax([len(t) for t in targets]))])
  tokens = np.full((len(chats), m), pad_id, np.int32)
  mask = np.zeros((len(chats), m), np.float32)
  for i, t in enumerate(targets):
    tokens[i, :len(t)] = t
    mask[i, :len(t)] = 1
  return prompts, tokens, mask
