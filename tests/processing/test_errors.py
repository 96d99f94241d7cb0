"""Bad inputs raise a ProcessingError (a ValueError) naming the file or example and saying what to do."""

import numpy as np
import PIL.Image
import pytest

from noisygrpo_jax.processing import chat_template as ct
from noisygrpo_jax.processing import errors
from noisygrpo_jax.processing import image as ip
from noisygrpo_jax.processing import tokenizer as tk


def _photo(tmp_path, name="photo.jpg"):
  path = tmp_path / name
  rng = np.random.default_rng(0)
  PIL.Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
  return path


def _raises(exc_type, fn, *must_contain):
  with pytest.raises(exc_type) as info:
    fn()
  assert isinstance(info.value, errors.ProcessingError) and isinstance(info.value, ValueError)
  for text in must_contain:
    assert text in str(info.value), str(info.value)
  return str(info.value)


def test_missing_file(tmp_path):
  path = tmp_path / "nowhere" / "cat.png"
  _raises(errors.ImageLoadError, lambda: ip.process_image(str(path)), str(path), "no such image file", "Check the path")


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png"])
def test_truncated_file(tmp_path, name):
  path = _photo(tmp_path, name)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _raises(errors.ImageLoadError, lambda: ip.process_image(str(path)), str(path), "truncated", "Re-download")


def test_corrupt_files(tmp_path):
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"\x00not an image" * 20)
  _raises(errors.ImageLoadError, lambda: ip.process_image(str(garbage)), "garbage.png", "not a readable image")
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  _raises(errors.ImageLoadError, lambda: ip.process_image(str(empty)), "empty.jpg")
  damaged = _photo(tmp_path, "damaged.png")
  data = bytearray(damaged.read_bytes())
  data[200:260] = bytes(60)  # zero a stretch of the compressed stream
  damaged.write_bytes(bytes(data))
  _raises(errors.ImageLoadError, lambda: ip.process_image(str(damaged)), "damaged.png", "corrupt")


def test_file_in_a_batch_names_the_example_and_the_file(tmp_path):
  good, bad = _photo(tmp_path), tmp_path / "missing.png"
  msg = _raises(errors.ImageLoadError, lambda: ip.process_images([good, str(bad)], source="example 7"),
                f"example 7, image 1 ({bad}): no such image file")
  # A lazily opened PIL image that is truncated fails at conversion, still naming the example.
  data = good.read_bytes()
  good.write_bytes(data[:len(data) // 2])
  _raises(errors.ImageLoadError, lambda: ip.process_images([PIL.Image.open(good)], source="example 8"),
          "example 8, image 0", "truncated")
  assert msg


def test_zero_size():
  images = [np.zeros((4, 4, 3), np.uint8), np.zeros((0, 10, 3), np.uint8)]
  _raises(errors.ImageSizeError, lambda: ip.process_images(images, source="example 3"), "example 3, image 1",
          "zero size")
  _raises(errors.ImageSizeError, lambda: ip.process_image(PIL.Image.new("RGB", (0, 5)), source="example 2"),
          "example 2", "zero size")


def test_aspect_ratio_over_200(tmp_path):
  _raises(errors.ImageSizeError, lambda: ip.process_image(np.zeros((2, 401, 3), np.uint8), source="example 5"),
          "example 5", "aspect ratio 200.5", "Crop or pad")
  path = tmp_path / "strip.png"
  PIL.Image.new("RGB", (1000, 4)).save(path)
  _raises(errors.ImageSizeError, lambda: ip.process_image(str(path)), str(path), "aspect ratio 250.0")
  _raises(errors.ImageSizeError, lambda: ip.smart_resize(1, 201))


@pytest.mark.parametrize("image,expected", [
    (PIL.Image.new("LAB", (8, 8)), "mode 'LAB'"),
    (PIL.Image.new("La", (8, 8)), "mode 'La'"),
    (np.zeros((8, 8, 2), np.uint8), "shape (8, 8, 2)"),
    (np.zeros((3, 8, 8, 3), np.uint8), "shape (3, 8, 8, 3)"),
    (np.full((8, 8, 3), 1.5, np.float32), "outside [0, 1]"),
    (np.full((8, 8, 3), np.nan, np.float32), "outside [0, 1]"),
    (np.full((8, 8, 3), 4000, np.uint16), "outside [0, 255]"),
    (np.zeros((8, 8, 3), np.complex64), "dtype complex64"),
    (b"raw bytes", "bytes"),
], ids=["lab", "la", "two_channels", "4d", "float_range", "nan", "uint16_range", "complex", "bytes"])
def test_unsupported(image, expected):
  _raises(errors.UnsupportedImageError, lambda: ip.process_images([image], source="example 11"),
          "example 11, image 0", expected)


def test_video_frames_of_different_sizes():
  frames = [np.zeros((56, 56, 3), np.uint8), np.zeros((56, 84, 3), np.uint8)]
  _raises(errors.ImageSizeError, lambda: ip.process_video(frames, source="example 6"), "example 6", "frames differ")
  _raises(errors.ImageSizeError, lambda: ip.process_video([], source="example 6"), "no frames")
  _raises(errors.UnsupportedImageError, lambda: ip.process_video(np.zeros((8, 8, 3), np.uint8)), "video", "(8, 8, 3)")
  _raises(errors.UnsupportedImageError, lambda: ip.process_video([np.zeros((8, 8, 2), np.uint8)], source="clip 3"),
          "clip 3, frame 0")


def test_prompt_over_length_budget():
  tok = tk.word_level_tokenizer(["What", "shape", "?"], 64)
  messages = ct.vqa_messages("What shape?")
  grid = [[1, 20, 20]]  # 100 image tokens
  enc = ct.encode_chat(tok, messages, grid, add_generation_prompt=True, max_length=200)
  msg = _raises(errors.PromptTooLongError,
                lambda: ct.encode_chat(tok, messages, grid, add_generation_prompt=True, max_length=len(enc) - 1,
                                       source="example 9"),
                "example 9", f"{len(enc)} tokens", "100 vision", f"max_length={len(enc) - 1}", "max_pixels")
  assert msg.startswith("example 9: ")
