"""Module-by-module and end-to-end parity with transformers' PyTorch Qwen2.5-VL (float32, eager attention).

Tiny config: vision depth 4 (blocks 1, 3 full attention; 0, 2 windowed), windows of 2x2 merged tokens
so that every image has several windows, partial ones included; text 2 layers with GQA (4 heads, 2 KV).
"""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
import transformers.vision_utils as hf_vision_utils

from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.models.qwen2_5_vl import host
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()


@pytest.fixture(scope="module")
def models():
  hf = ref.hf_model(CONFIG)
  return hf, ref.ours_from_hf(hf, CONFIG)


def _compare_logits(models, rows_spans, seed, video_seconds=None, text_len=(3, 8)):
  hf, ours = models
  rng = np.random.default_rng(seed)
  rows = [ref.prompt(CONFIG, rng, spans, text_len) for spans in rows_spans]
  ids, mask = ref.left_pad(rows)
  image_grids = [g for spans in rows_spans for kind, g in spans if kind == "image"]
  video_grids = [g for spans in rows_spans for kind, g in spans if kind == "video"]
  vision = {}
  if image_grids:
    vision.update(pixel_values=ref.pixels(rng, image_grids, CONFIG), image_grid_thw=np.array(image_grids))
  if video_grids:
    vision.update(pixel_values_videos=ref.pixels(rng, video_grids, CONFIG), video_grid_thw=np.array(video_grids),
                  second_per_grid_ts=np.asarray(video_seconds, np.float32))
  with torch.no_grad():
    expected = hf(**ref.hf_inputs(CONFIG, ids, mask, **vision)).logits.numpy()
  got = np.asarray(ours.forward_hf(ids, mask, **vision))
  valid = mask.astype(bool)
  return np.abs(expected - got)[valid].max(), np.abs(expected)[valid].max()


def test_logits_two_images_of_different_sizes(models):
  diff, scale = _compare_logits(models, [[("image", (1, 8, 12))], [("image", (1, 4, 8))]], seed=1,
                                text_len=(2, 12))
  assert scale > 0.5 and diff <= 1e-4


def test_logits_two_images_in_one_row_and_text_only_row(models):
  diff, _ = _compare_logits(models, [[("image", (1, 8, 12)), ("image", (1, 4, 4))], []], seed=2)
  assert diff <= 1e-4


def test_logits_grid_not_dividing_the_window(models):
  # 6x10 patches -> 3x5 merged tokens -> windows of 2x2, 2x1, 1x2, 1x1 merged tokens.
  diff, _ = _compare_logits(models, [[("image", (1, 6, 10))]], seed=3)
  assert diff <= 1e-4


def test_logits_text_only(models):
  diff, _ = _compare_logits(models, [[], []], seed=4, text_len=(5, 20))
  assert diff <= 1e-4


def test_logits_video(models):
  diff, _ = _compare_logits(models, [[("video", (2, 4, 8))], [("image", (1, 4, 4)), ("video", (4, 4, 4))]],
                            seed=5, video_seconds=[0.5, 1.0])
  assert diff <= 1e-4


def _vision_tower_diff(hf, ours) -> float:
  """Max abs difference of the merged vision features, ours vs HF, for three images packed in one row."""
  rng = np.random.default_rng(6)
  grids = [(1, 8, 12), (1, 6, 10), (2, 4, 8)]
  pv = ref.pixels(rng, grids, CONFIG)
  with torch.no_grad():
    expected = hf.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grids)).pooler_output.numpy()
  chunks = np.split(pv, np.cumsum([np.prod(g) for g in grids])[:-1])
  batch = host.pack_vision_batch([(chunks, grids)], CONFIG.vision, num_patches=pv.shape[0] + 12)
  got = np.asarray(ours.vision_features(batch))[0, :expected.shape[0]]
  return float(np.abs(expected - got).max())


def test_vision_tower_matches_hf(models):
  hf, ours = models
  assert _vision_tower_diff(hf, ours) <= 1e-5


def test_vision_tower_with_chunked_full_attention_matches_hf(models):
  """Full-attention blocks in query chunks of 16 (232 patches: 14.5 chunks) give HF's result too."""
  hf, ours = models
  ours = nnx.clone(ours)
  ours.visual.blocks.attn.query_chunk = 16  # the stacked blocks share one module
  assert _vision_tower_diff(hf, ours) <= 1e-5


def test_host_indices_equal_hf():
  grids = torch.tensor([(1, 8, 12), (1, 6, 10), (2, 4, 8)])
  v = CONFIG.vision
  hf_index, hf_cu = hf_vision_utils.get_vision_window_index(grids, v.spatial_merge_size, v.window_size,
                                                            v.patch_size)
  index, window_ids = host.window_index(grids.numpy(), v)
  np.testing.assert_array_equal(index, hf_index.numpy())
  cu = np.r_[0, np.cumsum(np.bincount(window_ids)) * v.merge_unit]
  np.testing.assert_array_equal(cu, hf_cu.numpy())
  hf_rope = hf_vision_utils.get_vision_position_ids(grids, v.spatial_merge_size)
  np.testing.assert_array_equal(host.vision_rope_ids(grids.numpy(), v.spatial_merge_size), hf_rope.numpy())


def test_position_ids_and_rope_deltas_equal_hf(models):
  hf, _ = models
  rng = np.random.default_rng(7)
  spans = [[("image", (1, 8, 12)), ("video", (2, 4, 8))], [("video", (4, 6, 4))], []]
  ids, mask = ref.left_pad([ref.prompt(CONFIG, rng, s) for s in spans])
  image_grid, video_grid = np.array([(1, 8, 12)]), np.array([(2, 4, 8), (4, 6, 4)])
  seconds = np.array([0.5, 2.0])
  hf_pos, hf_deltas = hf.model.get_rope_index(
      torch.tensor(ids), torch.tensor(ref.token_types(ids, CONFIG)), torch.tensor(image_grid),
      torch.tensor(video_grid), torch.tensor(seconds), torch.tensor(mask))
  pos, deltas = host.mrope_position_ids(ids, CONFIG, mask, image_grid, video_grid, seconds)
  np.testing.assert_array_equal(pos, hf_pos.numpy())
  np.testing.assert_array_equal(deltas, hf_deltas.numpy())


def test_placeholder_count_mismatch_is_a_clear_error(models):
  _, ours = models
  rng = np.random.default_rng(8)
  ids, mask = ref.left_pad([ref.prompt(CONFIG, rng, [("image", (1, 8, 12))])])
  pv = ref.pixels(rng, [(1, 8, 8)], CONFIG)
  with pytest.raises(ValueError, match=re.escape("needs 16 <|image_pad|> tokens but the span at valid token")):
    ours.forward_hf(ids, mask, pixel_values=pv, image_grid_thw=np.array([(1, 8, 8)]))
  with pytest.raises(ValueError, match="image_grid_thw"):
    ours.forward_hf(ids, mask, pixel_values=pv[:0], image_grid_thw=np.zeros((0, 3), int))


def test_bfloat16_params_track_float32(models):
  """bf16 weights and activations (norms, RoPE and softmax statistics in float32).

  Tolerance: bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2%); through 4 vision blocks and 2
  decoder layers the errors compound to a few percent of the logit scale. We require the max error to be
  below 5% of the largest logit and the argmax to agree on >= 95% of positions.
  """
  hf, ours32 = models
  ours16 = ref.ours_from_hf(hf, CONFIG.replace(dtype="bfloat16"))
  assert ours16.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  rng = np.random.default_rng(9)
  grids = [(1, 8, 12)]
  ids, mask = ref.left_pad([ref.prompt(CONFIG, rng, [("image", grids[0])], (20, 30))])
  pv = ref.pixels(rng, grids, CONFIG)
  l32 = np.asarray(ours32.forward_hf(ids, mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  l16 = np.asarray(ours16.forward_hf(ids, mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert np.abs(l32 - l16).max() <= 0.05 * np.abs(l32).max()
  assert (l32.argmax(-1) == l16.argmax(-1)).mean() >= 0.95


def test_3b_width_slice():
  """The released 3B widths (text 2048 wide, 16 heads / 2 KV heads, MLP 11008; vision 1280 wide, 16 heads,
  window 112) with 2 decoder layers and 2 vision blocks (0 windowed, 1 full). The vocabulary is cut to
  8192 rows to keep the test's memory small; it does not change any other shape."""
  base = cfg.qwen2_5_vl_3b()
  slice_cfg = base.replace(
      vision=dataclasses.replace(base.vision, depth=2, fullatt_block_indexes=(1,)),
      text=dataclasses.replace(base.text, num_hidden_layers=2, vocab_size=8192),
      image_token_id=8191, video_token_id=8190, vision_start_token_id=8189, vision_end_token_id=8188)
  hf = ref.hf_model(slice_cfg, seed=1)
  ours = ref.ours_from_hf(hf, slice_cfg)
  rng = np.random.default_rng(10)
  grids = [(1, 20, 28)]  # 10x14 merged tokens: 3x4 windows of 4x4, partial at the edges
  ids, mask = ref.left_pad([ref.prompt(slice_cfg, rng, [("image", grids[0])])])
  pv = ref.pixels(rng, grids, slice_cfg)
  with torch.no_grad():
    expected = hf(**ref.hf_inputs(slice_cfg, ids, mask, pixel_values=pv, image_grid_thw=np.array(grids))).logits
  got = np.asarray(ours.forward_hf(ids, mask, pixel_values=pv, image_grid_thw=np.array(grids)))
  assert np.abs(expected.numpy() - got).max() <= 1e-3
