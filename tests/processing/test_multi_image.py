"""Several images per prompt: `<image>` placement, truncation that keeps every image, collation of a row's images,
and the logits of two-image prompts against HF's processor, template and model."""

import jinja2.sandbox
import numpy as np
import PIL.Image
import pytest
import torch

from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.processing import chat_template, collate, image, tokenizer
from noisygrpo_jax.processing.errors import PromptTooLongError
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()
WORDS = "look at and how many red blue shapes are there is a circle in the image ? answer with yes or no".split()
PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)
MARKED = "look at <image> and <image> how many red shapes are there ?"
UNMARKED = "is there a blue circle in the image ?"
# Per row, its images' sizes: 84x112 (48 patches) then 56x56 (16); 56x84 (24) then 28x28 (4).
SIZES = [[(90, 120), (64, 48)], [(56, 84), (40, 40)]]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.word_level_tokenizer(WORDS, CONFIG.text.vocab_size)


def _images(seed):
  rng = np.random.default_rng(seed)
  return [[PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in row] for row in SIZES]


def _process(rows):
  return [image.process_images(row, image.ImageProcessorConfig(**PIXELS)) for row in rows]


def _spans(ids: np.ndarray) -> list[tuple[int, int]]:
  """(first, last + 1) of each vision span's `<|image_pad|>` run."""
  starts = np.flatnonzero(ids == CONFIG.vision_start_token_id)
  ends = np.flatnonzero(ids == CONFIG.vision_end_token_id)
  assert len(starts) == len(ends) and np.all(ids[np.concatenate([np.arange(s + 1, e) for s, e in zip(starts, ends)])]
                                             == CONFIG.image_token_id)
  return [(int(s) + 1, int(e)) for s, e in zip(starts, ends)]


def test_each_image_goes_at_its_marker_or_all_before_the_question(tok):
  processed = _process(_images(0))
  chats = chat_template.encode_vqa_prompts(tok, [{"problem": MARKED}, {"problem": UNMARKED}],
                                           [p.image_grid_thw for p in processed])
  for chat, p in zip(chats, processed):
    spans = _spans(chat.input_ids)
    assert [e - s for s, e in spans] == p.num_tokens.tolist()  # in order: the images differ in size
  # Spans hold the pads; <|vision_start|> sits at a - 1 and <|vision_end|> at b.
  (a0, b0), (a1, b1) = _spans(chats[0].input_ids)
  ids = chats[0].input_ids.tolist()
  question = tok.encode("how many red shapes are there ?")
  assert ids[a0 - 3:a0 - 1] == tok.encode("look at")
  assert ids[b0 + 1:a1 - 1] == tok.encode("and")
  assert ids[b1 + 1:b1 + 1 + len(question)] == question
  (a0, b0), (a1, b1) = _spans(chats[1].input_ids)
  ids = chats[1].input_ids.tolist()
  assert ids[a0 - 3:a0 - 1] == tok.encode("user\n")  # the first image opens the user turn
  assert a1 - 1 == b0 + 1  # the second image follows the first at once
  assert ids[b1 + 1:b1 + 1 + len(tok.encode(UNMARKED))] == tok.encode(UNMARKED)


def test_wrong_marker_count_names_the_example(tok):
  grid = _process(_images(0))[0].image_grid_thw
  with pytest.raises(ValueError, match=r"example q7: the problem has 1 <image> marker\(s\) for 2 image\(s\)"):
    chat_template.encode_vqa_prompts(tok, [{"id": "q7", "problem": "look at <image> ?"}], [grid])


def test_truncation_cuts_only_the_text_after_the_last_marker(tok):
  grid = _process(_images(0))[0].image_grid_thw
  full, = chat_template.encode_vqa_prompts(tok, [{"problem": MARKED}], [grid])
  cut, = chat_template.encode_vqa_prompts(tok, [{"problem": MARKED}], [grid], max_length=len(full) - 3, truncate=True)
  assert len(cut) <= len(full) - 3 and cut.num_truncated == len(full) - len(cut) > 0
  assert cut.num_vision_tokens == full.num_vision_tokens and _spans(cut.input_ids) == _spans(full.input_ids)
  last_image_end = _spans(full.input_ids)[1][1]
  np.testing.assert_array_equal(cut.input_ids[:last_image_end + 1], full.input_ids[:last_image_end + 1])
  # Text only before the markers: nothing can go without moving or cutting a marker, so it raises.
  before = "how many red shapes are there in the image ? <image> <image>"
  full, = chat_template.encode_vqa_prompts(tok, [{"problem": before}], [grid])
  with pytest.raises(PromptTooLongError, match="example 0: even with its question cut away"):
    chat_template.encode_vqa_prompts(tok, [{"problem": before}], [grid], max_length=len(full) - 1, truncate=True)


def test_a_rows_images_share_its_patch_sequence_and_bucket(tok):
  processed = _process(_images(0))
  chats = chat_template.encode_vqa_prompts(tok, [{"problem": MARKED}, {"problem": UNMARKED}],
                                           [p.image_grid_thw for p in processed])
  batch = collate.collate_prompts(chats, processed, CONFIG, pad_id=tok.pad_id, patch_buckets=(64, 128))
  assert batch.vision.pixel_values.shape[:2] == (2, 64)  # row 0: 48 + 16 patches
  for row, p in enumerate(processed):
    n = len(p.pixel_values)
    np.testing.assert_array_equal(batch.vision.pixel_values[row, :n], p.pixel_values)
    assert not batch.vision.pixel_values[row, n:].any()
  with pytest.raises(PromptTooLongError, match="example 0: image patches 64 exceeds the largest bucket 48"):
    collate.collate_prompts(chats, processed, CONFIG, pad_id=tok.pad_id, patch_buckets=(48,))


def _hf_text(content: list[dict], grids: np.ndarray) -> str:
  """HF's side: the released Jinja template, then HF's placeholder expansion."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=["jinja2.ext.loopcontrols"])
  text = env.from_string(ref.QWEN2_5_VL_JINJA).render(messages=[{"role": "user", "content": content}],
                                                      add_generation_prompt=True, add_vision_id=False)
  return chat_template.expand_vision_tokens(text, grids)


def test_two_image_prompts_give_hf_logits(tok, hf_process):
  hf = ref.hf_model(CONFIG)
  ours = ref.ours_from_hf(hf, CONFIG)
  rows = _images(1)
  processed = _process(rows)
  chats = chat_template.encode_vqa_prompts(tok, [{"problem": MARKED}, {"problem": UNMARKED}],
                                           [p.image_grid_thw for p in processed])
  batch = collate.collate_prompts(chats, processed, CONFIG, pad_id=tok.pad_id)

  pixel_values, grids = hf_process([im for row in rows for im in row], **PIXELS)
  img, cot = {"type": "image"}, chat_template.cot_question
  contents = [[{"type": "text", "text": "look at "}, img, {"type": "text", "text": " and "}, img,
               {"type": "text", "text": cot(" how many red shapes are there ?")}],
              [img, img, {"type": "text", "text": cot(UNMARKED)}]]
  texts = [_hf_text(c, grids[2 * r:2 * r + 2]) for r, c in enumerate(contents)]
  ids, mask = ref.left_pad([tok.encode(t) for t in texts], pad_id=tok.pad_id)
  np.testing.assert_array_equal(batch.input_ids, ids)
  with torch.no_grad():
    expected = hf(**ref.hf_inputs(CONFIG, ids, mask, pixel_values=pixel_values, image_grid_thw=grids)).logits.numpy()
  got = np.asarray(ours(batch.input_ids, batch.position_ids, batch.attention_mask, batch.vision))
  valid = mask.astype(bool)
  assert np.abs(expected).max() > 0.5 and np.abs(expected - got)[valid].max() <= 1e-4
