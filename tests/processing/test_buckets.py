"""The default prompt and patch buckets of configs/noisygrpo.py: fine steps, and room for an image at max_pixels."""

import importlib.util
import os

import numpy as np
import pytest

from noisygrpo_jax.models.qwen2_5_vl import config as model_config
from noisygrpo_jax.processing import chat_template, image as image_lib
from noisygrpo_jax.training import memory, setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VISION = model_config.qwen2_5_vl_3b().vision
QUESTION = ("In the figure, AB is the diameter of circle O and angle ABC is 40 degrees. What is the measure of angle "
            "BAC?\nChoices:\nA: 40\nB: 50\nC: 60\nD: 80")  # a typical question of the geometry / chart VQA mix


def _config():
  """configs/noisygrpo.py:qwen2_5_vl_3b (the base config's buckets)."""
  spec = importlib.util.spec_from_file_location("noisygrpo_config", os.path.join(ROOT, "configs", "noisygrpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("qwen2_5_vl_3b")


def _largest_image_grid(config):
  """The grid of the image with the most patches within data.max_pixels: 51 x 59 merged tokens (3009 at 1536^2)."""
  image = setup.image_config(config, VISION)
  grid = np.array([image_lib.grid_thw(51 * image.factor, 59 * image.factor, image)])
  assert np.prod(grid) // image.merge_size**2 == config.data.max_pixels // image.factor**2  # the densest possible
  return grid


@pytest.mark.parametrize("field", ["prompt_buckets", "patch_buckets"])
def test_buckets_increase_by_at_most_1_5x(field):
  buckets = list(_config().data[field])
  assert buckets == sorted(set(buckets))
  steps = [b / a for a, b in zip(buckets, buckets[1:])]
  assert max(steps) <= 1.5, steps  # exact: every step is 1.5x or 4/3x


def test_the_largest_prompt_bucket_holds_a_max_pixels_image_and_a_question(qwen_tok):
  config = _config()
  chat, = chat_template.encode_vqa_prompts(qwen_tok, [{"problem": QUESTION}], [_largest_image_grid(config)])
  assert chat.num_vision_tokens == 3009
  assert max(config.data.prompt_buckets) >= max(4096, len(chat))


def test_the_largest_patch_bucket_holds_a_max_pixels_image():
  config = _config()
  largest = max(config.data.patch_buckets)
  assert largest >= np.prod(_largest_image_grid(config))  # 12036 patches
  # The memory estimate's worst case (setup.run_shape) is a bucket too, not the largest one standing in for it.
  assert largest >= memory.patches_for(config.data.max_pixels, VISION.patch_size, VISION.merge_unit)


@pytest.mark.parametrize("vision", [model_config.qwen2_5_vl_3b().vision, model_config.qwen2_5_vl_7b().vision],
                         ids=["3b", "7b"])
def test_patch_buckets_tile_the_vision_towers_blocks(vision):
  """Multiples of the merge unit (host.pack_vision_row refuses others) and of a windowed-attention block
  (merger_window^2 merged tokens, 64 patches: layers.local_attention would pad the queries up to it)."""
  window = vision.merger_window**2 * vision.merge_unit
  for bucket in _config().data.patch_buckets:
    assert bucket % window == 0, (bucket, window)
