"""Host-side (numpy) bookkeeping for Qwen2.5-VL: everything data-dependent, so device code stays static.

- vision RoPE ids in spatial-merge-block order, the window permutation, attention segment ids;
- packing each batch row's images/videos into one padded patch sequence (`VisionBatch`);
- M-RoPE position ids `(3, B, T)` and `rope_deltas`, as transformers' `get_rope_index`.

Patch order conventions: the processor emits patches of one image (grid t, h, w) in "merge-block
order": frames, then blocks of `merge x merge` patches row by row, the patches of a block contiguous.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import numpy as np

from noisygrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig


def _grids(grid_thw) -> np.ndarray:
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return grid


def vision_rope_ids(grid_thw, spatial_merge_size: int) -> np.ndarray:
  """(h, w) patch coordinates of every patch, in the processor's merge-block order.

  Args:
    grid_thw: int [N, 3] (t, h, w) per image or video, in patches.
  Returns:
    int32 [sum(t*h*w), 2].
  """
  out = []
  m = spatial_merge_size
  for t, h, w in _grids(grid_thw):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([block(hh), block(ww)], axis=-1), (t, 1)))
  return np.concatenate(out, axis=0).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def window_index(grid_thw, vision: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """The permutation of merged tokens that makes every attention window contiguous.

  Each frame's merged grid (h/m, w/m) is cut into windows of `merger_window` merged tokens per side;
  windows at the right and bottom edges are partial. Returns
    index: int32 [sum(t*h*w)/m^2]; position i of the window order holds merged token index[i].
    window_ids: int32 [same]; the window (0, 1, ... across all images) of each entry of `index`.
  """
  m, win = vision.spatial_merge_size, vision.merger_window
  index, window_ids = [], []
  offset, next_window = 0, 0
  for t, h, w in _grids(grid_thw):
    gh, gw = h // m, w // m
    ids = np.arange(t * gh * gw).reshape(t, gh, gw)
    nh, nw = -(-gh // win), -(-gw // win)
    for frame in range(t):
      for wi in range(nh):
        for wj in range(nw):
          cell = ids[frame, wi * win:(wi + 1) * win, wj * win:(wj + 1) * win].reshape(-1)
          index.append(cell + offset)
          window_ids.append(np.full(cell.size, next_window))
          next_window += 1
    offset += t * gh * gw
  if not index:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(index).astype(np.int32), np.concatenate(window_ids).astype(np.int32)


def frame_ids(grid_thw, merge_unit: int) -> np.ndarray:
  """Full-attention segment of every merged token: one per (image or video, frame), in input order."""
  sizes = [h * w // merge_unit for t, h, w in _grids(grid_thw) for _ in range(t)]
  return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


@flax.struct.dataclass
class VisionBatch:
  """Each batch row's images and videos packed into one padded patch sequence.

  P is the patch bucket (a multiple of merge_unit = 4); padding patches come last and form their own
  attention segment (id 0), so they never mix with real patches. All index arrays are per row.

  pixel_values: [B, P, 1176] float32, or uint8 levels the model normalises; the processor's flattened patches, in
    token order of the row. Padding patches are zeros (level 0).
  window_index: int32 [B, P/4]; merged-token permutation into window order.
  reverse_index: int32 [B, P/4]; its inverse (window order back to token order).
  rope_ids: int32 [B, P, 2]; (h, w) coordinates of each patch, already in window order.
  window_segment_ids: int32 [B, P]; attention segment of each patch in window order for windowed blocks.
  full_segment_ids: int32 [B, P]; the same for full-attention blocks (one segment per image frame).
  """

  pixel_values: np.ndarray
  window_index: np.ndarray
  reverse_index: np.ndarray
  rope_ids: np.ndarray
  window_segment_ids: np.ndarray
  full_segment_ids: np.ndarray

  @property
  def num_patches(self) -> int:
    return self.pixel_values.shape[1]


def pack_vision_row(patches: Sequence[np.ndarray], grids: Sequence[Sequence[int]], vision: VisionConfig,
                    num_patches: int, pixel_values: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Packs one row's images/videos (in the order their tokens appear) into `num_patches` patches.

  Args:
    patches: float32 or uint8 [t*h*w, patch_dim] per image or video.
    grids: (t, h, w) per image or video.
    num_patches: the bucket P, a multiple of vision.merge_unit and >= the total patch count.
    pixel_values: optional [P, patch_dim] zeros of the patches' dtype to write them into (a batch's row: no copy).
  Returns:
    the fields of VisionBatch for this row, without the batch axis.
  """
  unit = vision.merge_unit
  grid = _grids(grids)
  total = int(sum(int(np.prod(g)) for g in grid))
  if num_patches % unit or num_patches < total:
    raise ValueError(f"patch bucket {num_patches} must be a multiple of {unit} and hold the row's {total} "
                     "patches; choose a larger bucket or fewer/smaller images.")
  if pixel_values is None:
    pixel_values = np.zeros((num_patches, vision.patch_dim), _pixel_dtype([patches]))
  start = 0
  for p in patches:
    pixel_values[start:start + len(p)] = p
    start += len(p)
  n_merged, n_pad = total // unit, (num_patches - total) // unit

  index, window_ids = window_index(grid, vision)
  frames = frame_ids(grid, unit)
  # Padding merged tokens stay in place at the end, in segment 0; real segments are numbered from 1.
  index = np.concatenate([index, np.arange(n_merged, n_merged + n_pad)]).astype(np.int32)
  window_seg = np.concatenate([window_ids + 1, np.zeros(n_pad, np.int32)])
  full_seg = np.concatenate([frames + 1, np.zeros(n_pad, np.int32)])[index]
  rope = np.concatenate([vision_rope_ids(grid, vision.spatial_merge_size), np.zeros((n_pad * unit, 2), np.int32)])
  rope = rope.reshape(-1, unit, 2)[index].reshape(-1, 2)
  return dict(
      pixel_values=pixel_values,
      window_index=index,
      reverse_index=np.argsort(index).astype(np.int32),
      rope_ids=rope,
      window_segment_ids=np.repeat(window_seg, unit).astype(np.int32),
      full_segment_ids=np.repeat(full_seg, unit).astype(np.int32),
  )


def _pixel_dtype(rows: Sequence[Sequence[np.ndarray]]) -> np.dtype:
  """The one dtype of the rows' non-empty patches (float32 when there are none): uint8 levels and float values
  cannot share a batch (writing floats into levels would truncate them)."""
  dtypes = {np.dtype(p.dtype) for patches in rows for p in patches if len(p)}
  if len(dtypes) > 1:
    raise ValueError(f"patches of dtypes {sorted(map(str, dtypes))} in one vision batch; process all images with "
                     "one ImageProcessorConfig.pixel_dtype")
  return dtypes.pop() if dtypes else np.dtype(np.float32)


def pack_vision_batch(rows: Sequence[tuple[Sequence[np.ndarray], Sequence[Sequence[int]]]],
                      vision: VisionConfig, num_patches: int | None = None) -> VisionBatch:
  """Stacks `pack_vision_row` over rows; `num_patches` defaults to the largest row rounded up to 4."""
  if num_patches is None:
    largest = max((sum(int(np.prod(g)) for g in grids) for _, grids in rows), default=0)
    num_patches = max(vision.merge_unit, -(-largest // vision.merge_unit) * vision.merge_unit)
  # The pixels, the bulk, are written once into the batch array; the small index fields are stacked.
  pixels = np.zeros((len(rows), num_patches, vision.patch_dim), _pixel_dtype([p for p, _ in rows]))
  packed = [pack_vision_row(p, g, vision, num_patches, pixels[r]) for r, (p, g) in enumerate(rows)]
  return VisionBatch(**{k: pixels if k == "pixel_values" else np.stack([r[k] for r in packed]) for k in packed[0]})


def pad_vision_batch(batch: VisionBatch, num_patches: int) -> VisionBatch:
  """`batch` packed into a larger bucket of `num_patches` patches, as `pack_vision_batch` would pack its rows: the
  added patches are zero padding in segment 0 whose merged tokens stay in place at the end."""
  b, p = batch.pixel_values.shape[:2]
  unit = p // batch.window_index.shape[1]
  if num_patches < p or num_patches % unit:
    raise ValueError(f"cannot pad {p} patches to {num_patches}: the bucket must be a larger multiple of {unit}")
  pad = lambda x, value=0: np.concatenate([x, np.full((b, num_patches - p) + x.shape[2:], value, x.dtype)], axis=1)
  in_place = np.broadcast_to(np.arange(p // unit, num_patches // unit, dtype=np.int32), (b, (num_patches - p) // unit))
  return VisionBatch(pixel_values=pad(batch.pixel_values),
                     window_index=np.concatenate([batch.window_index, in_place], axis=1),
                     reverse_index=np.concatenate([batch.reverse_index, in_place], axis=1),
                     rope_ids=pad(batch.rope_ids), window_segment_ids=pad(batch.window_segment_ids),
                     full_segment_ids=pad(batch.full_segment_ids))


# ------------------------------------------------------------------------------------------------
# M-RoPE positions


def mrope_position_ids(input_ids, config: Qwen25VLConfig, attention_mask=None, image_grid_thw=None,
                       video_grid_thw=None, second_per_grid_ts=None) -> tuple[np.ndarray, np.ndarray]:
  """3-axis (temporal, height, width) positions of every token, and each row's `rope_deltas`.

  Text tokens advance all three axes together. A vision span of grid (t, h, w) takes positions
  start + (t_idx * time_scale, h_idx, w_idx) at merged resolution (images: time_scale 1, videos:
  tokens_per_second * second_per_grid_t, truncated to int); the text after it resumes at
  start + max(h, w) / merge. Padding tokens (attention_mask 0) get position 0.

  Args:
    input_ids: int [B, T].
    attention_mask: optional int/bool [B, T].
    image_grid_thw, video_grid_thw: int [N, 3], consumed in row-major order of the spans.
    second_per_grid_ts: float [num_videos]; 1.0 each when absent.
  Returns:
    position_ids int32 [3, B, T]; rope_deltas int32 [B, 1] = max position + 1 - number of valid tokens.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  merge = config.vision.spatial_merge_size
  image_grids = iter(_grids(image_grid_thw) if image_grid_thw is not None else [])
  video_grids = iter(_grids(video_grid_thw) if video_grid_thw is not None else [])
  video_seconds = iter(np.asarray(second_per_grid_ts, np.float64).reshape(-1)
                       if second_per_grid_ts is not None else [])
  positions = np.zeros((3, batch, length), np.int64)
  deltas = np.zeros((batch, 1), np.int64)
  for row in range(batch):
    ids = input_ids[row][mask[row]]
    kind = np.where(ids == config.image_token_id, 1, np.where(ids == config.video_token_id, 2, 0))
    pieces, start, i = [], 0, 0
    while i < len(ids):
      j = i
      while j < len(ids) and kind[j] == kind[i]:
        j += 1
      if kind[i] == 0:
        pieces.append(np.broadcast_to(np.arange(j - i) + start, (3, j - i)))
        start += j - i
      else:
        grids, what = (image_grids, "image") if kind[i] == 1 else (video_grids, "video")
        try:
          t, h, w = next(grids)
        except StopIteration:
          raise ValueError(f"row {row} has more {what} token spans than {what}_grid_thw entries; pass one "
                           f"grid per <|{what}_pad|> span.") from None
        scale = 1.0 if kind[i] == 1 else config.vision.tokens_per_second * float(next(video_seconds, 1.0))
        gh, gw = h // merge, w // merge
        tt, hh, ww = np.meshgrid((np.arange(t) * scale).astype(np.int64), np.arange(gh), np.arange(gw),
                                 indexing="ij")
        span = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start
        if span.shape[1] != j - i:
          raise ValueError(f"row {row}: a {what} of grid {(t, h, w)} needs {span.shape[1]} <|{what}_pad|> "
                           f"tokens but the span at valid token {i} has {j - i}; expand the placeholder "
                           "with the processor's grid.")
        pieces.append(span)
        start += max(gh, gw)
      i = j
    pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    positions[:, row, mask[row]] = pos
    deltas[row, 0] = (pos.max() + 1 if pos.size else 0) - len(ids)
  return positions.astype(np.int32), deltas.astype(np.int32)
