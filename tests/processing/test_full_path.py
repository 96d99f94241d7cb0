"""Images + questions -> our processing -> our model, against HF's image processor -> HF model; and bucketing."""

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.models.qwen2_5_vl import host
from noisygrpo_jax.models.qwen2_5_vl import model as model_lib
from noisygrpo_jax.processing import chat_template, collate, image, tokenizer
from noisygrpo_jax.processing.errors import PromptTooLongError
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()
WORDS = "how many red blue shapes are there is a circle in the image ? answer with yes or no".split()
PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def setup():
  tok = tokenizer.word_level_tokenizer(WORDS, CONFIG.text.vocab_size)
  hf = ref.hf_model(CONFIG)
  return tok, hf, ref.ours_from_hf(hf, CONFIG)


def _images(seed, sizes):
  rng = np.random.default_rng(seed)
  return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _ours(tok, images, questions, pixel_dtype="float32", **buckets):
  processed = [image.process_image(im, image.ImageProcessorConfig(**PIXELS, pixel_dtype=pixel_dtype)) for im in images]
  chats = [chat_template.encode_chat(tok, chat_template.vqa_messages(q), p.image_grid_thw,
                                     add_generation_prompt=True) for p, q in zip(processed, questions)]
  return collate.collate_prompts(chats, processed, CONFIG, pad_id=tok.pad_id, **buckets)


def test_our_processing_and_model_equal_hf_processor_and_model(setup, hf_process):
  tok, hf, ours = setup
  images = _images(0, [(90, 120), (64, 48)])
  questions = ["how many red shapes are there ?", "is there a blue circle in the image ? answer with yes or no"]
  batch = _ours(tok, images, questions)

  # The HF side: HF's image processor, HF's (text-level) placeholder expansion, then the HF model.
  pixel_values, grids = hf_process(images, **PIXELS)
  texts = [chat_template.expand_vision_tokens(chat_template.render(chat_template.vqa_messages(q), True), g[None])
           for q, g in zip(questions, grids)]
  ids, mask = ref.left_pad([tok.encode(t) for t in texts], pad_id=tok.pad_id)
  np.testing.assert_array_equal(batch.input_ids, ids)
  with torch.no_grad():
    expected = hf(**ref.hf_inputs(CONFIG, ids, mask, pixel_values=pixel_values, image_grid_thw=grids)).logits.numpy()
  got = np.asarray(ours(batch.input_ids, batch.position_ids, batch.attention_mask, batch.vision))
  assert np.abs(expected - got)[mask.astype(bool)].max() <= 1e-4


def test_uint8_levels_give_the_float_batchs_vision_features_and_logits(setup):
  """The model normalises uint8 levels on the device to the very values of the float batch; the padding patches
  (level 0 there, 0.0 here: other values) stay out of the real ones and of the logits."""
  tok, _, ours = setup
  images = _images(3, [(90, 120), (40, 64)])  # the second row's patches are padded to the first's
  questions = ["how many red shapes are there ?", "is there a blue circle ?"]
  levels, floats = _ours(tok, images, questions, "uint8"), _ours(tok, images, questions)
  assert levels.vision.pixel_values.dtype == np.uint8 and levels.vision.pixel_values.nbytes * 4 == (
      floats.vision.pixel_values.nbytes)
  graphdef, state = nnx.split(ours)
  features = jax.jit(lambda v: nnx.merge(graphdef, state).vision_features(v))
  real = [int(n) for n in (floats.input_ids == CONFIG.image_token_id).sum(1)]
  got, expected = np.asarray(features(levels.vision)), np.asarray(features(floats.vision))
  for row, n in enumerate(real):
    np.testing.assert_array_equal(got[row, :n], expected[row, :n])
  logits = lambda b: np.asarray(model_lib.jitted_logits(graphdef, state, b.input_ids, b.position_ids,
                                                        b.attention_mask, b.vision))
  mask = floats.attention_mask.astype(bool)
  np.testing.assert_array_equal(logits(levels)[mask], logits(floats)[mask])


def test_uint8_levels_and_float_values_cannot_share_a_vision_batch():
  patches = np.zeros((4, CONFIG.vision.patch_dim), np.uint8)
  rows = [([patches], [(1, 2, 2)]), ([patches.astype(np.float32)], [(1, 2, 2)])]
  with pytest.raises(ValueError, match="one ImageProcessorConfig.pixel_dtype"):
    host.pack_vision_batch(rows, CONFIG.vision)


def test_same_bucket_compiles_once(setup):
  tok, _, ours = setup
  graphdef, state = nnx.split(ours)
  forward = lambda b: model_lib.jitted_logits(graphdef, state, b.input_ids, b.position_ids, b.attention_mask,
                                              b.vision)
  buckets = dict(prompt_buckets=(64, 96), patch_buckets=(64,))
  first = _ours(tok, _images(1, [(90, 120), (56, 56)]), ["how many red shapes are there ?", "is there a circle ?"],
                **buckets)
  second = _ours(tok, _images(2, [(112, 84), (70, 60)]), ["is there a red circle in the image ?", "how many ?"],
                 **buckets)
  assert first.input_ids.shape == second.input_ids.shape and first.vision.pixel_values.shape == (2, 64, 1176)
  assert not np.array_equal(first.input_ids, second.input_ids)
  before = model_lib.jitted_logits._cache_size()
  forward(first)
  forward(second)
  assert model_lib.jitted_logits._cache_size() == before + 1


def test_prompt_over_the_bucket_budget_names_the_example(setup):
  tok, _, _ = setup
  with pytest.raises(PromptTooLongError, match="example 1"):
    _ours(tok, _images(3, [(56, 56), (112, 112)]), ["how many ?", "how many red shapes are there ?"],
          prompt_buckets=(40,))
