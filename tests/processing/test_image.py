"""Image and video processing against HF's Qwen2VLImageProcessor (PIL backend), bit for bit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noisygrpo_jax.processing import image as ip

TOL = 1e-5


def _pattern(h, w, seed, channels=3):
  """A smooth gradient plus noise: exercises the bicubic filter better than pure noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 3.0) % 256], -1)
  base = np.concatenate([base] * 2, -1)[..., :channels] if channels > 3 else base[..., :channels]
  return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _rgba(h, w, seed):
  a = _pattern(h, w, seed, 4)
  a[..., 3] = np.random.default_rng(seed + 1).integers(0, 256, (h, w))  # every alpha level, incl. 0 and 255
  return a


def _palette(h, w, seed, transparency=False):
  im = PIL.Image.fromarray(_pattern(h, w, seed)).quantize(colors=32)
  if transparency:
    im.info["transparency"] = 3
  return im


def _i16(h, w, seed):
  # Values up to 1000: PIL (and so HF) saturates 16-bit levels above 255 when converting to RGB.
  v = np.random.default_rng(seed).integers(0, 1000, (h, w)).astype(np.uint16)
  return PIL.Image.fromarray(v)


# (name, in-memory image factory, kwargs for both processors). Sizes cover: below min_pixels, above
# max_pixels, exact multiples of 28, odd sizes, extreme aspect ratios (up to the allowed 200), tiny images.
PIL_CASES = [
    ("rgb_480x640", lambda: PIL.Image.fromarray(_pattern(480, 640, 0)), {}),
    ("rgb_below_min_37x53", lambda: PIL.Image.fromarray(_pattern(37, 53, 1)), {}),
    ("rgb_tiny_5x7", lambda: PIL.Image.fromarray(_pattern(5, 7, 2)), {}),
    ("rgb_above_max_1000x1200", lambda: PIL.Image.fromarray(_pattern(1000, 1200, 3)), {}),
    ("rgb_exact_56x84", lambda: PIL.Image.fromarray(_pattern(56, 84, 4)), {}),
    ("rgb_tall_900x31", lambda: PIL.Image.fromarray(_pattern(900, 31, 5)), {}),
    ("rgb_aspect_200_2x400", lambda: PIL.Image.fromarray(_pattern(2, 400, 6)), {}),
    ("rgb_halfway_42x70", lambda: PIL.Image.fromarray(_pattern(42, 70, 7)), {}),  # round-half-to-even
    ("rgba", lambda: PIL.Image.fromarray(_rgba(120, 90, 8), "RGBA"), {}),
    ("la", lambda: PIL.Image.fromarray(_rgba(64, 100, 9)[..., [0, 3]], "LA"), {}),
    ("l", lambda: PIL.Image.fromarray(_pattern(77, 91, 10)[..., 0], "L"), {}),
    ("p", lambda: _palette(100, 100, 11), {}),
    ("p_transparency", lambda: _palette(80, 60, 12, transparency=True), {}),
    ("pa", lambda: PIL.Image.fromarray(_rgba(50, 70, 13), "RGBA").convert("PA"), {}),
    ("cmyk", lambda: PIL.Image.fromarray(_pattern(90, 120, 14, 4), "CMYK"), {}),
    ("i16", lambda: _i16(60, 80, 15), {}),
    ("bilevel_1", lambda: PIL.Image.fromarray(_pattern(70, 70, 16)[..., 0]).convert("1"), {}),
    ("ycbcr", lambda: PIL.Image.fromarray(_pattern(50, 60, 27)).convert("YCbCr"), {}),
    ("hsv", lambda: PIL.Image.fromarray(_pattern(50, 60, 28)).convert("HSV"), {}),
    ("float_mode_f", lambda: PIL.Image.fromarray(_pattern(40, 70, 29)[..., 0].astype(np.float32) * 1.5), {}),
    ("rgb_custom_budget", lambda: PIL.Image.fromarray(_pattern(300, 500, 17)),
     {"min_pixels": 128 * 28 * 28, "max_pixels": 256 * 28 * 28}),
    ("rgb_patch16_merge1", lambda: PIL.Image.fromarray(_pattern(100, 150, 18)),
     {"patch_size": 16, "merge_size": 1, "min_pixels": 32 * 32, "max_pixels": 64 * 32 * 32}),
    ("rgb_temporal1", lambda: PIL.Image.fromarray(_pattern(100, 150, 19)), {"temporal_patch_size": 1}),
]

ARRAY_CASES = [
    ("uint8_hwc3", lambda: _pattern(150, 200, 20), {}),
    ("uint8_hwc4", lambda: _rgba(90, 110, 21), {}),
    ("uint8_hwc1", lambda: _pattern(80, 60, 22)[..., :1], {}),
    ("int64_hwc3", lambda: _pattern(40, 90, 23).astype(np.int64), {}),
    ("float32_hwc3", lambda: np.random.default_rng(24).random((130, 70, 3), dtype=np.float32), {"do_rescale": False}),
    ("float64_hwc4", lambda: np.random.default_rng(25).random((60, 60, 4)), {"do_rescale": False}),
    # k/255 in float32: x*255 lands just below k for some k, which HF truncates to k-1; so do we.
    ("float32_from_uint8", lambda: _pattern(56, 56, 26).astype(np.float32) / 255, {"do_rescale": False}),
]


def _config(kwargs):
  return ip.ImageProcessorConfig(**{k: v for k, v in kwargs.items() if k != "do_rescale"})


def _assert_same(ours, ref):
  pixels, grid = ref
  np.testing.assert_array_equal(ours.image_grid_thw, grid)
  assert ours.image_grid_thw.dtype == np.int64
  assert ours.pixel_values.dtype == np.float32
  assert ours.pixel_values.shape == pixels.shape
  assert np.max(np.abs(ours.pixel_values - pixels)) <= TOL


@pytest.mark.parametrize("name,make,kwargs", PIL_CASES + ARRAY_CASES, ids=[c[0] for c in PIL_CASES + ARRAY_CASES])
def test_matches_hf(name, make, kwargs, hf_process):
  # HF rescales by 1/255 again after resizing float input, so float arrays are compared with do_rescale=False:
  # a float image in [0, 1] is already rescaled, which is how we treat it.
  _assert_same(ip.process_image(make(), _config(kwargs)), hf_process(make(), **kwargs))


def test_bit_exact_on_plain_rgb(hf_process):
  im = PIL.Image.fromarray(_pattern(480, 640, 30))
  np.testing.assert_array_equal(ip.process_image(im).pixel_values, hf_process(im)[0])


FILE_CASES = [
    ("photo.jpg", lambda: PIL.Image.fromarray(_pattern(240, 320, 40)), {"quality": 90}),
    ("gray.png", lambda: PIL.Image.fromarray(_pattern(50, 75, 41)[..., 0], "L"), {}),
    ("depth16.png", lambda: _i16(64, 48, 42), {}),
    ("palette.gif", lambda: _palette(45, 67, 43), {}),
    ("cmyk.jpg", lambda: PIL.Image.fromarray(_pattern(64, 64, 44, 4), "CMYK"), {}),
]


@pytest.mark.parametrize("filename,make,save_kwargs", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_paths_match_hf(filename, make, save_kwargs, tmp_path, hf_process):
  path = tmp_path / filename
  make().save(path, **save_kwargs)
  _assert_same(ip.process_image(str(path)), hf_process(str(path)))
  _assert_same(ip.process_image(path), hf_process(str(path)))  # os.PathLike too


def test_exif_orientation_applied_like_hf(tmp_path, hf_process):
  im = PIL.Image.fromarray(_pattern(60, 100, 45))
  exif = im.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  path = tmp_path / "rotated.jpg"
  im.save(path, exif=exif.tobytes())
  ours = ip.process_image(str(path))
  _assert_same(ours, hf_process(str(path)))
  assert ours.image_grid_thw[0, 1] > ours.image_grid_thw[0, 2]  # portrait after rotation


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_files_are_composited_onto_white(mode, tmp_path, hf_process):
  """A path and the same image in memory give the same result.

  HF's `load_image` converts files straight to RGB (dropping alpha) while its processor composites
  in-memory images onto white; we composite both ways, so the reference is HF on the opened image.
  """
  path = tmp_path / "alpha.png"
  if mode == "P":
    _palette(70, 50, 46, transparency=True).save(path)  # a palette PNG with a tRNS transparency key
  else:
    PIL.Image.fromarray(_rgba(70, 50, 46), "RGBA").convert(mode).save(path)
  opened = PIL.Image.open(path)
  assert opened.mode == mode
  _assert_same(ip.process_image(str(path)), hf_process(opened))
  assert np.array_equal(ip.process_image(str(path)).pixel_values, ip.process_image(PIL.Image.open(path)).pixel_values)


def test_batch_of_mixed_inputs_matches_hf(hf_process):
  images = [PIL.Image.fromarray(_pattern(100, 130, 50)), _pattern(300, 90, 51), PIL.Image.fromarray(_rgba(40, 40, 52)),
            PIL.Image.fromarray(_pattern(33, 333, 53)[..., 0], "L")]
  ours = ip.process_images(images)
  _assert_same(ours, hf_process(images))
  np.testing.assert_array_equal(ours.num_tokens, np.prod(ours.image_grid_thw, -1) // 4)


# ------------------------------------------------------------------------------------------------
# Video


def _hf_video_reference(frames, hf_process, config, fps):
  """Reference for a clip built from HF pieces, since HF's video processor needs torchvision.

  Each frame goes through HF's image processor with the video pixel budget; the normalised frames are
  recovered from HF's image patch layout, padded to a multiple of temporal_patch_size with the last frame,
  and patchified with the view/permute of HF's `Qwen2VLVideoProcessor.patchify` (in torch).
  """
  import torch

  p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
  chw = []
  for frame in frames:
    pixels, grid = hf_process(frame, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    _, gh, gw = grid[0]
    x = pixels.reshape(gh // m, gw // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]  # drop the duplicated frame
    chw.append(x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
  video = torch.from_numpy(np.stack(chw))[None]  # (1, F, C, H, W)
  if pad := -video.shape[1] % tp:
    video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
  b, f, c, h, w = video.shape
  gt, gh, gw = f // tp, h // p, w // p
  patches = video.view(b, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
  return patches.reshape(gt * gh * gw, c * tp * p * p).numpy(), np.array([[gt, gh, gw]]), tp / fps


@pytest.mark.parametrize("num_frames,fps", [(4, 2.0), (3, 1.0), (1, 4.0)])
def test_video_matches_hf_reference(num_frames, fps, hf_process):
  frames = [PIL.Image.fromarray(_pattern(120, 160, 60 + i)) for i in range(num_frames)]
  config = ip.video_config()
  ours = ip.process_video(frames, fps=fps)
  pixels, grid, seconds = _hf_video_reference(frames, hf_process, config, fps)
  np.testing.assert_array_equal(ours.video_grid_thw, grid)
  assert ours.pixel_values_videos.shape == pixels.shape
  assert np.max(np.abs(ours.pixel_values_videos - pixels)) <= TOL
  np.testing.assert_allclose(ours.second_per_grid_ts, [seconds])
  assert ours.second_per_grid_ts.dtype == np.float32


def test_video_from_array_and_batch():
  clip = np.stack([_pattern(56, 84, 70 + i) for i in range(4)])
  one = ip.process_video(clip, fps=2.0)
  assert one.video_grid_thw.tolist() == [[2, 20, 28]]  # the video budget's min_pixels upsizes 56x84 to 280x392
  assert ip.grid_thw(56, 84, ip.video_config(), num_frames=4) == (2, 20, 28)
  both = ip.process_videos([clip, list(clip[:2])], fps=[2.0, 4.0])
  assert both.video_grid_thw.tolist() == [[2, 20, 28], [1, 20, 28]]
  np.testing.assert_allclose(both.second_per_grid_ts, [1.0, 0.5])
  np.testing.assert_array_equal(both.pixel_values_videos[:len(one.pixel_values_videos)], one.pixel_values_videos)
  np.testing.assert_array_equal(both.num_tokens, [2 * 20 * 28 // 4, 20 * 28 // 4])


def test_still_image_is_a_two_frame_clip_of_itself():
  frame = _pattern(112, 140, 80)
  config = ip.ImageProcessorConfig()
  image = ip.process_image(frame, config)
  video = ip.process_video([frame, frame], config=config)
  np.testing.assert_array_equal(image.pixel_values, video.pixel_values_videos)


@pytest.mark.parametrize("size", [(28, 28), (90, 120), (301, 77), (512, 384)])
def test_uint8_levels_normalised_on_the_device_equal_the_float_pixel_values(size):
  """Bit for bit: the device's table gather reproduces the host's (HF's) values in every column's channel."""
  frame = _pattern(*size, 90 + size[0])
  levels = ip.process_image(frame, ip.ImageProcessorConfig(pixel_dtype="uint8")).pixel_values
  floats = ip.process_image(frame).pixel_values
  assert levels.dtype == np.uint8 and levels.nbytes * 4 == floats.nbytes
  np.testing.assert_array_equal(np.asarray(jax.jit(functools.partial(ip.normalise, xp=jnp))(levels)), floats)
  np.testing.assert_array_equal(ip.normalise(levels), floats)


def test_uint8_video_levels_and_the_clip_table_only():
  clip = np.stack([_pattern(56, 84, 95 + i) for i in range(3)])  # 3 frames: the last one is repeated
  levels = ip.process_video(clip, config=ip.video_config(pixel_dtype="uint8")).pixel_values_videos
  np.testing.assert_array_equal(ip.normalise(levels), ip.process_video(clip).pixel_values_videos)
  with pytest.raises(ValueError, match="CLIP"):
    ip.ImageProcessorConfig(pixel_dtype="uint8", image_mean=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------
# Sizes and layout


def _hf_smart_resize(*args, **kwargs):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  return smart_resize(*args, **kwargs)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([28, 32]),
       st.sampled_from([(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (1, 10**8)]))
def test_smart_resize_matches_hf(h, w, factor, budget):
  try:
    expected = _hf_smart_resize(h, w, factor, *budget)
  except ValueError:
    with pytest.raises(ValueError, match="aspect ratio"):
      ip.smart_resize(h, w, factor, *budget)
    return
  assert ip.smart_resize(h, w, factor, *budget) == expected
  assert ip.grid_thw(h, w, ip.ImageProcessorConfig(patch_size=factor // 2, min_pixels=budget[0],
                                                   max_pixels=budget[1])) == (1, expected[0] // (factor // 2),
                                                                               expected[1] // (factor // 2))


def test_smart_resize_limits():
  assert ip.smart_resize(1, 200) == _hf_smart_resize(1, 200)  # a ratio of exactly 200 is allowed
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.smart_resize(1, 201)
  with pytest.raises(ValueError, match="zero size"):
    ip.smart_resize(0, 5)


def test_unpatchify_inverts_patchify():
  rng = np.random.default_rng(90)
  frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
  pixels, grid = ip.patchify(frames)
  back = ip.unpatchify(pixels, grid)
  table = ip._normalisation_table(ip.OPENAI_CLIP_MEAN, ip.OPENAI_CLIP_STD)
  np.testing.assert_array_equal(back, table[np.arange(3), frames])
  assert grid == (2, 4, 6)


def test_num_image_tokens_predicts_processing():
  for h, w in [(480, 640), (10, 10), (2000, 3000), (37, 999)]:
    out = ip.process_image(np.zeros((h, w, 3), np.uint8))
    assert ip.num_image_tokens(h, w) == int(out.num_tokens[0])
    assert math.prod(ip.grid_thw(h, w)) == len(out.pixel_values)


def test_config_from_hf(tmp_path):
  import json

  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
      "image_mean": list(ip.OPENAI_CLIP_MEAN), "image_std": list(ip.OPENAI_CLIP_STD),
      "image_processor_type": "Qwen2VLImageProcessor"}))
  assert ip.config_from_hf(tmp_path) == ip.ImageProcessorConfig(max_pixels=12845056)
  assert ip.config_from_hf({"size": {"shortest_edge": 100, "longest_edge": 1000}}).max_pixels == 1000
  with pytest.raises(ValueError, match="min_pixels"):
    ip.ImageProcessorConfig(min_pixels=10, max_pixels=5)
