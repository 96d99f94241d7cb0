"""Images and videos -> Qwen2.5-VL vision inputs, on the host, in numpy.

Per image: load -> RGB (transparency composited onto white) -> `smart_resize` to multiples of
`patch_size * merge_size` with PIL bicubic -> rescale by 1/255 -> CLIP mean/std normalisation ->
duplicate the still frame to `temporal_patch_size` -> flatten to patches. The result equals HF
`Qwen2VLImageProcessor` (PIL backend) bit for bit on the inputs it accepts. With `pixel_dtype="uint8"` the
normalisation is left to the device: the patches hold the uint8 levels, which `normalise` maps to the same values.

Patch layout. A clip of `grid_t * temporal_patch_size` frames, resized to
`(grid_h * patch_size, grid_w * patch_size)`, becomes `pixel_values[grid_t * grid_h * grid_w, C*T*P*P]`:
rows run over (t, h/merge, w/merge, merge_h, merge_w), so each group of `merge_size**2` consecutive rows is
one language-model token; within a row the elements run over (channel, frame, y, x). This is the order of
the vision tower's Conv3d kernel flattened, and of HF's `patchify`.

Accepted images: `PIL.Image.Image` (modes in `SUPPORTED_MODES`), numpy arrays in channels-last layout
(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8 / integers in [0, 255] / floats in [0, 1], and
paths to image files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from noisygrpo_jax.processing.errors import (ImageLoadError, ImageSizeError, UnsupportedImageError,
                                             describe)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

# PIL modes with a defined RGB conversion. Excluded: LAB (its "A" band is a colour axis, which HF's
# `convert_to_rgb` mistakes for alpha) and La (PIL cannot convert it).
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "I", "I;16", "I;16L",
     "I;16B", "I;16N", "F"})

ImageLike = Union[PIL.Image.Image, np.ndarray, str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """Resize budget and patch geometry. Defaults are HF `Qwen2VLImageProcessor`'s for still images."""

  min_pixels: int = 56 * 56  # smallest resized area (H * W)
  max_pixels: int = 28 * 28 * 1280  # largest resized area; caps the number of vision tokens at 1280
  patch_size: int = 14  # spatial side of one ViT patch
  temporal_patch_size: int = 2  # frames per patch; still images are repeated to fill it
  merge_size: int = 2  # merge_size x merge_size patches make one language-model token
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  # "float32": normalised pixel values, as HF's processor. "uint8": the patches' uint8 levels, 4x fewer bytes to
  # the device, where the model normalises them (`normalise`) with the CLIP table, so only the CLIP mean/std.
  pixel_dtype: str = "float32"

  def __post_init__(self):
    problems = []
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      if getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if self.min_pixels > self.max_pixels:
      problems.append(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
      problems.append(f"image_mean={self.image_mean} / image_std={self.image_std} need 3 entries, std > 0")
    if self.pixel_dtype not in ("float32", "uint8"):
      problems.append(f"pixel_dtype={self.pixel_dtype!r} must be 'float32' or 'uint8'")
    clip = (tuple(self.image_mean), tuple(self.image_std)) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if self.pixel_dtype == "uint8" and not clip:
      problems.append(f"pixel_dtype='uint8' needs the CLIP image_mean/image_std the model normalises levels with; "
                      f"got {self.image_mean} / {self.image_std} (use pixel_dtype='float32')")
    if problems:
      raise ValueError("Invalid ImageProcessorConfig: " + "; ".join(problems))

  @property
  def factor(self) -> int:
    """Resized sides are multiples of this many pixels (28)."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: 3 * temporal_patch_size * patch_size**2 (1176)."""
    return 3 * self.temporal_patch_size * self.patch_size**2

  def replace(self, **kwargs) -> "ImageProcessorConfig":
    return dataclasses.replace(self, **kwargs)


def video_config(**overrides) -> ImageProcessorConfig:
  """HF `Qwen2VLVideoProcessor` defaults: each frame between 128 and 768 tokens' worth of pixels."""
  return ImageProcessorConfig(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, **overrides)


def config_from_hf(path_or_dict: str | os.PathLike | dict[str, Any]) -> ImageProcessorConfig:
  """Reads a HF `preprocessor_config.json` (a file, a checkpoint directory, or the parsed dict).

  The released Qwen2.5-VL checkpoints set max_pixels=12845056, far above the class default.
  """
  if isinstance(path_or_dict, dict):
    hf = path_or_dict
  else:
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
      path = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no preprocessor_config.json; point to a local HF checkpoint directory.")
    with open(path) as f:
      hf = json.load(f)
  size = hf.get("size") or {}
  kwargs = {
      "min_pixels": hf.get("min_pixels", size.get("shortest_edge")),
      "max_pixels": hf.get("max_pixels", size.get("longest_edge")),
      "patch_size": hf.get("patch_size"),
      "temporal_patch_size": hf.get("temporal_patch_size"),
      "merge_size": hf.get("merge_size"),
      "image_mean": tuple(hf["image_mean"]) if "image_mean" in hf else None,
      "image_std": tuple(hf["image_std"]) if "image_std" in hf else None,
  }
  return ImageProcessorConfig(**{k: v for k, v in kwargs.items() if v is not None})


@dataclasses.dataclass(frozen=True, eq=False)
class ImageInputs:
  """Vision inputs for the images of one example or one batch, concatenated in order."""

  pixel_values: np.ndarray  # (sum over images of t*h*w, 3*T*P*P) float32, or uint8 levels (config.pixel_dtype)
  image_grid_thw: np.ndarray  # (num_images, 3) int64: patches along time (1 for images), height, width
  merge_size: int = 2

  @property
  def num_tokens(self) -> np.ndarray:
    """(num_images,) int64: `<|image_pad|>` tokens each image expands to."""
    return np.prod(self.image_grid_thw, axis=-1) // self.merge_size**2

  @staticmethod
  def concat(parts: Sequence["ImageInputs"]) -> "ImageInputs":
    return ImageInputs(_concat_rows([p.pixel_values for p in parts]),
                       _concat_grids([p.image_grid_thw for p in parts]),
                       parts[0].merge_size if parts else 2)


@dataclasses.dataclass(frozen=True, eq=False)
class VideoInputs:
  """Vision inputs for videos, concatenated in order."""

  pixel_values_videos: np.ndarray  # (sum over videos of t*h*w, 3*T*P*P) float32, or uint8 levels
  video_grid_thw: np.ndarray  # (num_videos, 3) int64
  second_per_grid_ts: np.ndarray  # (num_videos,) float32: seconds spanned by one temporal patch
  merge_size: int = 2

  @property
  def num_tokens(self) -> np.ndarray:
    """(num_videos,) int64: `<|video_pad|>` tokens each video expands to."""
    return np.prod(self.video_grid_thw, axis=-1) // self.merge_size**2

  @staticmethod
  def concat(parts: Sequence["VideoInputs"]) -> "VideoInputs":
    return VideoInputs(_concat_rows([p.pixel_values_videos for p in parts]),
                       _concat_grids([p.video_grid_thw for p in parts]),
                       np.concatenate([p.second_per_grid_ts for p in parts]).astype(np.float32)
                       if parts else np.zeros((0,), np.float32),
                       parts[0].merge_size if parts else 2)


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
  if not arrays:
    return np.zeros((0, ImageProcessorConfig().patch_dim), np.float32)
  return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _concat_grids(grids: list[np.ndarray]) -> np.ndarray:
  return np.concatenate(grids, axis=0) if grids else np.zeros((0, 3), np.int64)


# ------------------------------------------------------------------------------------------------
# Sizes


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, source: str | None = None) -> tuple[int, int]:
  """The resized (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

  Same arithmetic as HF's `smart_resize` (including Python's round-half-to-even). Raises `ImageSizeError`
  (a ValueError) for an empty image or an aspect ratio above 200.
  """
  if height < 1 or width < 1:
    raise ImageSizeError(source, f"image has zero size (height={height}, width={width})",
                         "Drop this example or fix the file that produced it")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ImageSizeError(source, f"aspect ratio {ratio:.1f} ({height}x{width}) exceeds {MAX_ASPECT_RATIO}",
                         f"Crop or pad the image to an aspect ratio of at most {MAX_ASPECT_RATIO}:1")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def grid_thw(height: int, width: int, config: ImageProcessorConfig = ImageProcessorConfig(),
             num_frames: int = 1) -> tuple[int, int, int]:
  """(grid_t, grid_h, grid_w) for an image or clip of this size, without touching pixels."""
  h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
  return -(-num_frames // config.temporal_patch_size), h // config.patch_size, w // config.patch_size


def num_image_tokens(height: int, width: int, config: ImageProcessorConfig = ImageProcessorConfig()) -> int:
  """`<|image_pad|>` tokens an image of this size becomes (for length budgets before decoding pixels)."""
  t, h, w = grid_thw(height, width, config)
  return t * h * w // config.merge_size**2


# ------------------------------------------------------------------------------------------------
# Loading and RGB conversion


def load_image(path: str | os.PathLike, source: str | None = None) -> PIL.Image.Image:
  """Opens and fully decodes an image file, applying its EXIF orientation (as HF's `load_image` does).

  Raises `ImageLoadError` naming the file (and `source`, e.g. "example 3, image 0", when given) for a
  missing, unreadable, truncated or corrupt file.
  """
  path = os.fspath(path)
  label = path if source is None else f"{source} ({path})"
  if not os.path.isfile(path):
    raise ImageLoadError(label, "no such image file",
                         f"Check the path (relative paths resolve from {os.getcwd()}) and that the dataset's "
                         "images were extracted")
  try:
    image = PIL.Image.open(path)
    image.load()  # PIL decodes lazily; decode now so truncation is reported here, with the file name
  except PIL.Image.DecompressionBombError as e:
    raise ImageLoadError(label, f"image is too large to decode safely ({e})",
                         "Downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from e
  except PIL.UnidentifiedImageError as e:
    raise ImageLoadError(label, "not a readable image (corrupt, empty, or a format PIL cannot decode)",
                         "Re-download or re-encode the file, or drop this example") from e
  except (OSError, SyntaxError, ValueError) as e:  # PIL reports damaged data with all three
    raise ImageLoadError(label, f"truncated or corrupt image data ({e})",
                         "Re-download or re-encode the file, or drop this example") from e
  PIL.ImageOps.exif_transpose(image, in_place=True)
  return image


def to_rgb(image: ImageLike, source: str | None = None) -> PIL.Image.Image | np.ndarray:
  """An RGB uint8 image: a PIL image in mode "RGB" or an (H, W, 3) uint8 array.

  Conversion follows HF `convert_to_rgb`: images with an alpha band or a transparency key are composited
  onto white; other PIL modes use PIL's own conversion (16-bit and 32-bit modes saturate at 255, as in
  HF); single-channel arrays are repeated; float arrays are scaled by 255 and truncated to uint8.
  A float array whose values are all whole numbers is still read as [0, 1] (HF would read it as [0, 255]).
  """
  if isinstance(image, (str, os.PathLike)):
    image, source = load_image(image, source), _label(image, source)
  if isinstance(image, PIL.Image.Image):
    return _pil_to_rgb(image, source)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image, source)
  raise UnsupportedImageError(source, f"cannot read an image from a {type(image).__name__}",
                              "Pass a PIL image, a channels-last numpy array, or a path to an image file")


def _pil_to_rgb(image: PIL.Image.Image, source: str | None) -> PIL.Image.Image:
  if image.mode not in SUPPORTED_MODES:
    raise UnsupportedImageError(source, f"image mode {image.mode!r} has no supported RGB conversion",
                                f"Convert it to RGB first (supported modes: {', '.join(sorted(SUPPORTED_MODES))})")
  if image.width == 0 or image.height == 0:
    raise ImageSizeError(source, f"image has zero size (width={image.width}, height={image.height})",
                         "Drop this example or fix the file that produced it")
  try:
    image.load()  # a lazily opened, damaged file fails only when its pixels are read
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
      return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
  except OSError as e:
    raise ImageLoadError(source, f"truncated or corrupt image data ({e})",
                         "Re-download or re-encode the file, or drop this example") from e
  except ValueError as e:
    raise UnsupportedImageError(source, f"PIL cannot convert mode {image.mode!r} to RGB ({e})",
                                "Convert the image to RGB yourself before processing") from e


def _array_to_rgb(a: np.ndarray, source: str | None) -> np.ndarray:
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise UnsupportedImageError(source, f"array of shape {a.shape} is not a channels-last image",
                                "Pass an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array; move the channel axis "
                                "last (np.moveaxis(a, 0, -1)) if it is first")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageSizeError(source, f"image has zero size (array shape {a.shape})",
                         "Drop this example or fix the code that produced it")
  is_float = np.issubdtype(a.dtype, np.floating)
  if is_float:
    lo, hi = float(np.min(a)), float(np.max(a))
    if not (0.0 <= lo and hi <= 1.0):  # also rejects NaN
      raise UnsupportedImageError(source, f"float image values span [{lo:g}, {hi:g}], outside [0, 1]",
                                  "Scale float images to [0, 1], or pass uint8 values in [0, 255]")
  elif a.dtype != np.uint8:
    if not np.issubdtype(a.dtype, np.integer):
      raise UnsupportedImageError(source, f"array dtype {a.dtype} is not an image dtype",
                                  "Pass uint8 values in [0, 255] or floats in [0, 1]")
    lo, hi = int(np.min(a)), int(np.max(a))
    if lo < 0 or hi > 255:
      raise UnsupportedImageError(source, f"integer image values span [{lo}, {hi}], outside [0, 255]",
                                  "Convert 16-bit data to uint8 first (e.g. (a >> 8).astype(np.uint8))")
    a = a.astype(np.uint8)

  channels = a.shape[-1]
  if channels == 1:
    a = np.repeat(a, 3, axis=-1)
  elif channels == 4:
    white = 1.0 if is_float else 255
    alpha = a[..., 3:4] / white
    composite = alpha * a[..., :3] + (1 - alpha) * white
    a = composite.astype(a.dtype) if is_float else np.round(composite).astype(np.uint8)
  if is_float:
    # HF's to_pil_image: x * 255 in float64, cast to float32, then truncated to uint8.
    a = (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
  return np.ascontiguousarray(a)


def _resize(rgb: PIL.Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bicubic resize of an RGB image; returns (height, width, 3) uint8."""
  if isinstance(rgb, np.ndarray):
    if rgb.shape[:2] == (height, width):
      return rgb
    rgb = PIL.Image.fromarray(rgb)
  if rgb.size != (width, height):
    rgb = rgb.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
  return np.asarray(rgb)


def _size(rgb: PIL.Image.Image | np.ndarray) -> tuple[int, int]:
  return (rgb.shape[0], rgb.shape[1]) if isinstance(rgb, np.ndarray) else (rgb.height, rgb.width)


# ------------------------------------------------------------------------------------------------
# Normalisation and patches


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """(3, 256) float32: the normalised value of each uint8 level per channel.

  Computed with HF's exact float operations (rescale in float64 then cast to float32; subtract and
  divide in float32), so a table lookup reproduces HF's arithmetic bit for bit.
  """
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)


def normalise(levels, xp=np):
  """Patches' uint8 levels -> their CLIP-normalised float32 values, HF's bit for bit (`_normalisation_table`).

  Args:
    levels: uint8 [..., 3*T*P*P] in `patchify`'s layout: within a patch the channel is the slowest axis.
    xp: numpy (on the host) or jax.numpy (on the device, e.g. inside jit: a gather from a [3, 256] table).
  Returns:
    float32 [..., 3*T*P*P].
  """
  width = levels.shape[-1]
  channel = np.arange(width) // (width // 3)
  return xp.asarray(_normalisation_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))[channel, levels]


def patchify(frames: np.ndarray, config: ImageProcessorConfig = ImageProcessorConfig()
             ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Flattens resized frames into patches, normalised unless `config.pixel_dtype` is "uint8".

  Args:
    frames: (F, H, W, 3) uint8 with H, W multiples of `config.factor`. F is padded to a multiple of
      `temporal_patch_size` by repeating the last frame (a still image is F=1).
    config: patch geometry and normalisation constants.

  Returns:
    pixel_values (grid_t*grid_h*grid_w, config.patch_dim) float32 (or the uint8 levels) in the layout described
    in the module docstring, and (grid_t, grid_h, grid_w).
  """
  num_frames, height, width, channels = frames.shape
  tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
  if height % config.factor or width % config.factor or channels != 3 or frames.dtype != np.uint8:
    raise ValueError(f"patchify needs (F, H, W, 3) uint8 with H, W multiples of {config.factor}; "
                     f"got {frames.shape} {frames.dtype}")
  stored = tp  # frames per temporal patch that are read; the rest are copies
  if num_frames == 1:
    stored = 1  # a still image: lay out (and normalise) once, then duplicate
  elif num_frames % tp:
    pad = np.broadcast_to(frames[-1:], (tp - num_frames % tp, height, width, channels))
    frames = np.concatenate([frames, pad])
  gt, gh, gw = -(-num_frames // tp), height // p, width // p
  # (gt, tp, gh/m, m, p, gw/m, m, p, c) -> (gt, gh/m, gw/m, m, m, c, tp, p, p)
  levels = frames.reshape(gt, stored, gh // m, m, p, gw // m, m, p, channels).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
  out = np.empty((*levels.shape[:6], tp, p, p), np.dtype(config.pixel_dtype))
  if config.pixel_dtype == "uint8":
    out[..., :stored, :, :] = levels
  else:
    table = _normalisation_table(tuple(config.image_mean), tuple(config.image_std))
    for c in range(channels):
      # mode="clip" lets numpy write straight into the strided output (indices are uint8, always valid).
      np.take(table[c], levels[..., c, :, :, :], out=out[..., c, :stored, :, :], mode="clip")
  if stored < tp:
    out[..., stored:, :, :] = out[..., :stored, :, :]
  return out.reshape(gt * gh * gw, channels * tp * p * p), (gt, gh, gw)


def unpatchify(pixel_values: np.ndarray, grid: Sequence[int],
               config: ImageProcessorConfig = ImageProcessorConfig()) -> np.ndarray:
  """Inverse of `patchify`'s layout: (grid_t*T, grid_h*P, grid_w*P, 3) normalised float frames."""
  gt, gh, gw = (int(x) for x in grid)
  tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
  x = np.asarray(pixel_values).reshape(gt, gh // m, gw // m, m, m, 3, tp, p, p)
  return x.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(gt * tp, gh * p, gw * p, 3)


# ------------------------------------------------------------------------------------------------
# Public entry points


def process_image(image: ImageLike, config: ImageProcessorConfig = ImageProcessorConfig(),
                  source: str | None = None) -> ImageInputs:
  """One image -> `ImageInputs` with `image_grid_thw` of shape (1, 3).

  Args:
    image: a PIL image, a channels-last numpy array, or a path (see the module docstring).
    config: resize budget and patch geometry.
    source: how error messages name this image, e.g. "example 12, image 0".
  """
  rgb = to_rgb(image, source)
  height, width = smart_resize(*_size(rgb), config.factor, config.min_pixels, config.max_pixels,
                               source=_label(image, source))
  pixels, grid = patchify(_resize(rgb, height, width)[None], config)
  return ImageInputs(pixels, np.asarray([grid], np.int64), config.merge_size)


def process_images(images: Sequence[ImageLike], config: ImageProcessorConfig = ImageProcessorConfig(),
                   source: str | None = None) -> ImageInputs:
  """Several images (of any sizes) -> one `ImageInputs`, concatenated in order.

  `source` names the example in error messages; each image is labelled "<source>, image <i>".
  """
  if isinstance(images, (PIL.Image.Image, np.ndarray, str, os.PathLike)):
    raise TypeError("process_images takes a sequence of images; use process_image for a single one")
  parts = [process_image(img, config, describe(source, i)) for i, img in enumerate(images)]
  if not parts:
    return ImageInputs(_concat_rows([]), _concat_grids([]), config.merge_size)
  return ImageInputs.concat(parts)


def process_video(frames: Sequence[ImageLike] | np.ndarray, fps: float = 2.0,
                  config: ImageProcessorConfig | None = None, source: str | None = None) -> VideoInputs:
  """A clip of already-sampled frames -> `VideoInputs`.

  All frames are resized to the `smart_resize` of the frame size with the video budget (`video_config()`
  unless `config` is given); the frame count is padded to a multiple of `temporal_patch_size` by
  repeating the last frame. `second_per_grid_ts = temporal_patch_size / fps`, as in HF's
  `Qwen2_5_VLProcessor`.

  Args:
    frames: a sequence of images, or an (F, H, W, C) array.
    fps: the rate at which the frames were sampled.
  """
  config = video_config() if config is None else config
  label = source or "video"
  if isinstance(frames, np.ndarray) and frames.ndim != 4:
    raise UnsupportedImageError(label, f"a video array must be (frames, H, W, C); got shape {frames.shape}",
                                "Stack the frames on a new first axis, or pass a list of frames")
  if len(frames) == 0:
    raise ImageSizeError(label, "video has no frames", "Sample at least one frame")
  if fps <= 0:
    raise ValueError(f"{label}: fps={fps} must be positive")
  rgbs = [to_rgb(f, describe(label, i, "frame")) for i, f in enumerate(frames)]
  sizes = {_size(r) for r in rgbs}
  if len(sizes) > 1:
    raise ImageSizeError(label, f"frames differ in size {sorted(sizes)}",
                         "Resize or crop all frames of a video to one size before processing")
  height, width = smart_resize(*sizes.pop(), config.factor, config.min_pixels, config.max_pixels, source=label)
  clip = np.stack([_resize(r, height, width) for r in rgbs])
  pixels, grid = patchify(clip, config)
  return VideoInputs(pixels, np.asarray([grid], np.int64),
                     np.asarray([config.temporal_patch_size / fps], np.float32), config.merge_size)


def process_videos(videos: Sequence[Sequence[ImageLike] | np.ndarray], fps: float | Sequence[float] = 2.0,
                   config: ImageProcessorConfig | None = None, source: str | None = None) -> VideoInputs:
  """Several clips -> one `VideoInputs`; `fps` is one rate for all or one per clip."""
  rates = [fps] * len(videos) if np.isscalar(fps) else list(fps)
  if len(rates) != len(videos):
    raise ValueError(f"{len(rates)} fps values for {len(videos)} videos")
  return VideoInputs.concat(
      [process_video(v, r, config, describe(source, i, "video")) for i, (v, r) in enumerate(zip(videos, rates))])


def _label(image: ImageLike, source: str | None) -> str | None:
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image) if source is None else f"{source} ({os.fspath(image)})"
  return source
