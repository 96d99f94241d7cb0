"""The Qwen2.5-VL chat template, vision-token expansion and chat encoding."""

import jinja2.sandbox
import numpy as np
import pytest

from noisygrpo_jax.processing import chat_template as ct
from noisygrpo_jax.processing import tokenizer as tk
from tests.models.hf_reference import QWEN2_5_VL_JINJA

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
GEN = "<|im_start|>assistant\n"

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
TWO_IMAGES = [{"role": "user", "content": [
    {"type": "text", "text": "Is the circle in "}, {"type": "image", "image": "a.png"},
    {"type": "text", "text": " bigger than in "}, {"type": "image_url", "image_url": "b.png"},
    {"type": "text", "text": "?"}]}]
TEXT_ONLY = [{"role": "user", "content": "What is 2 + 2?"}]
WITH_SYSTEM = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And here?"}]},
]

EXPECTED = {
    "one_image": (ONE_IMAGE, True,
                  SYS + "<|im_start|>user\n" + IMG + "Describe this image.<|im_end|>\n" + GEN),
    "two_images": (TWO_IMAGES, True,
                   SYS + "<|im_start|>user\nIs the circle in " + IMG + " bigger than in " + IMG + "?<|im_end|>\n"
                   + GEN),
    "text_only": (TEXT_ONLY, True, SYS + "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n" + GEN),
    "system_and_turns": (WITH_SYSTEM, False,
                         "<|im_start|>system\nAnswer with one word.<|im_end|>\n"
                         "<|im_start|>user\n" + IMG + "What shape is it?<|im_end|>\n"
                         "<|im_start|>assistant\ncircle<|im_end|>\n"
                         "<|im_start|>user\n" + VID + "And here?<|im_end|>\n"),
}

@pytest.fixture(scope="module")
def word_tok():
  words = ("Describe this image . Is the circle in bigger than ? What is 2 + shape it And here circle Answer with "
           "one word")
  return tk.word_level_tokenizer(words.split(), 128)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_expected(name):
  messages, gen, expected = EXPECTED[name]
  assert ct.render(messages, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_render_matches_released_jinja_template(name, add_vision_id):
  messages, gen, _ = EXPECTED[name]
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=["jinja2.ext.loopcontrols"])
  jinja = env.from_string(QWEN2_5_VL_JINJA).render(messages=messages, add_generation_prompt=gen,
                                                   add_vision_id=add_vision_id)
  assert ct.render(messages, add_generation_prompt=gen, add_vision_id=add_vision_id) == jinja


def test_vision_ids_and_options():
  assert ct.render(TWO_IMAGES, add_vision_id=True).count("Picture 2: " + IMG) == 1
  assert ct.render(TEXT_ONLY, default_system=None) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
  assert ct.vqa_messages("What shape is it?", num_images=2, answer="circle", system="Be brief.") == [
      {"role": "system", "content": "Be brief."},
      {"role": "user",
       "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
      {"role": "assistant", "content": "circle"}]
  with pytest.raises(ValueError, match="message 0"):
    ct.render([{"role": "user", "content": [{"type": "audio"}]}])


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("which", ["qwen", "word"])
def test_encoded_ids_equal_tokenizer_of_rendered_string(name, which, qwen_tok, word_tok):
  tok = qwen_tok if which == "qwen" else word_tok
  messages, gen, expected = EXPECTED[name]
  n_img, n_vid = expected.count(IMG), expected.count(VID)
  ones = np.ones((n_img, 3), np.int64) * [1, 2, 2]  # one token each: ids stay unexpanded
  enc = ct.encode_chat(tok, messages, ones, np.ones((n_vid, 3), np.int64) * [1, 2, 2], add_generation_prompt=gen)
  assert enc.input_ids.tolist() == tok.encode(expected)
  assert enc.input_ids.dtype == np.int32
  if which == "word":
    assert tok.special.unk not in enc.input_ids.tolist()


@pytest.mark.parametrize("which", ["qwen", "word"])
def test_expansion_string_and_ids_agree(which, qwen_tok, word_tok):
  tok = qwen_tok if which == "qwen" else word_tok
  # TWO_IMAGES has 2 images, WITH_SYSTEM[1:] 1 image and 1 video.
  images = np.array([[1, 4, 6], [1, 2, 2], [1, 2, 4]])  # 6, 1 and 2 tokens
  videos = np.array([[2, 4, 4]])  # 8 tokens
  text = ct.render(TWO_IMAGES + WITH_SYSTEM[1:], add_generation_prompt=True, default_system=None)
  expanded = ct.expand_vision_tokens(text, images, videos)
  assert expanded.count("<|image_pad|>") == 6 + 1 + 2 and expanded.count("<|video_pad|>") == 8
  by_ids = ct.expand_vision_ids(tok.encode(text), tok.special.image_pad, tok.special.video_pad, images, videos)
  assert by_ids.tolist() == tok.encode(expanded)
  enc = ct.encode_chat(tok, TWO_IMAGES + WITH_SYSTEM[1:], images, videos, add_generation_prompt=True,
                       default_system=None)
  assert enc.input_ids.tolist() == tok.encode(expanded) and enc.num_vision_tokens == 17
  with pytest.raises(ValueError, match="2 image grids"):
    ct.encode_chat(tok, TWO_IMAGES + WITH_SYSTEM[1:], images[:2], videos, source="example 4")


@pytest.mark.parametrize("which", ["qwen", "word"])
def test_target_mask_covers_assistant_replies(which, qwen_tok, word_tok):
  tok = qwen_tok if which == "qwen" else word_tok
  messages = ct.vqa_messages("What shape is it?", answer="circle")
  enc = ct.encode_chat(tok, messages, [[1, 4, 4]])
  targets = enc.input_ids[enc.target_mask].tolist()
  assert targets == tok.encode("circle<|im_end|>")
  assert tok.decode(enc.input_ids[~enc.target_mask]).endswith(GEN + "\n")
  assert not enc.target_mask[enc.input_ids == tok.special.image_pad].any()
