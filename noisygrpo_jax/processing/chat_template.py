"""Qwen2.5-VL's chat template in Python, vision-token expansion, and chat encoding with a length budget.

The template is the one shipped in the Qwen2.5-VL-*-Instruct `chat_template.json`:

  <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n          (only if no system message comes first)
  <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n
  <|im_start|>assistant\n                                                (the generation prompt)

Messages are dicts {"role": str, "content": str | list[item]}; an item is {"type": "text", "text": ...},
{"type": "image", ...} or {"type": "video", ...} (HF's forms with an "image", "image_url" or "video" key
also count). Each image item becomes one `<|vision_start|><|image_pad|><|vision_end|>` where it stands in the
content list; `expand_*` then repeats each `<|image_pad|>` grid_t*grid_h*grid_w / merge_size**2 times, as HF's
processor does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from noisygrpo_jax.data.records import IMAGE_MARKER, IMAGE_MARKER_FIX, image_marker_problem
from noisygrpo_jax.processing.errors import PromptTooLongError
from noisygrpo_jax.processing.tokenizer import Tokenizer

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"

Message = Mapping[str, Any]

# The same template as Jinja, as Qwen2.5-VL-*-Instruct's chat_template.json ships it (written into exported
# checkpoints for transformers; `render` is its Python equivalent, tests/processing/test_chat_template.py).
QWEN2_5_VL_JINJA = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _item_kind(item: Mapping[str, Any], where: str) -> str:
  kind = item.get("type")
  if kind == "image" or "image" in item or "image_url" in item:
    return "image"
  if kind == "video" or "video" in item:
    return "video"
  if "text" in item:
    return "text"
  raise ValueError(f"{where}: content item {dict(item)!r} is not text, image or video "
                   "(give it a 'type' of 'text', 'image' or 'video')")


def render_segments(messages: Sequence[Message], add_generation_prompt: bool = False,
                    default_system: str | None = DEFAULT_SYSTEM_MESSAGE,
                    add_vision_id: bool = False) -> list[tuple[str, bool]]:
  """The rendered chat as (text, is_target) pieces; joined they equal `render(...)`.

  Pieces marked True are the assistant turns' contents and their closing `<|im_end|>`: the tokens an SFT
  loss trains on.
  """
  pieces: list[tuple[str, bool]] = []
  images = videos = 0
  for index, message in enumerate(messages):
    role = message.get("role")
    if role is None:
      raise ValueError(f"message {index}: no 'role'")
    if index == 0 and role != "system" and default_system is not None:
      pieces.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    pieces.append((f"<|im_start|>{role}\n", False))
    content = message.get("content", "")
    if isinstance(content, str):
      body = content
    else:
      parts = []
      for item in content:
        kind = _item_kind(item, f"message {index}")
        if kind == "image":
          images += 1
          parts.append((f"Picture {images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif kind == "video":
          videos += 1
          parts.append((f"Video {videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
        else:
          parts.append(item["text"])
      body = "".join(parts)
    pieces.append((body + "<|im_end|>", role == "assistant"))
    pieces.append(("\n", False))
  if add_generation_prompt:
    pieces.append((GENERATION_PROMPT, False))
  return pieces


def render(messages: Sequence[Message], add_generation_prompt: bool = False,
           default_system: str | None = DEFAULT_SYSTEM_MESSAGE, add_vision_id: bool = False) -> str:
  """The chat as Qwen2.5-VL's template renders it (one placeholder per image/video, not yet expanded).

  Args:
    messages: the conversation (see the module docstring).
    add_generation_prompt: end with `<|im_start|>assistant\n` so the model writes the next turn.
    default_system: system message inserted when the first message is not a system one; None inserts
      nothing (a deviation from the released template, for tiny models).
    add_vision_id: prefix each image with "Picture k: " and each video with "Video k: ".
  """
  return "".join(text for text, _ in render_segments(messages, add_generation_prompt, default_system,
                                                     add_vision_id))


def vqa_messages(question: str, num_images: int = 1, answer: str | None = None,
                 system: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
  """A single-turn visual question, optionally with the answer turn.

  Each image goes at its `<image>` marker when the question has one per image; with no marker all images come first
  (Qwen's template). Any other marker count raises ValueError naming `source` (e.g. "example 12").
  """
  messages = [] if system is None else [{"role": "system", "content": system}]
  content = _vqa_content(question, num_images, source)
  messages.append({"role": "user", "content": content})
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages


def _vqa_content(question: str, num_images: int, source: str | None) -> list[dict[str, Any]]:
  problem = image_marker_problem(question, num_images)
  if problem:
    raise ValueError(f"{source or 'question'}: {problem}. {IMAGE_MARKER_FIX}")
  texts = question.split(IMAGE_MARKER)
  if len(texts) == 1:
    return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
  content = [{"type": "text", "text": texts[0]}]
  for text in texts[1:]:
    content += [{"type": "image"}, {"type": "text", "text": text}]
  return [item for item in content if item["type"] == "image" or item["text"]]


# ------------------------------------------------------------------------------------------------
# Vision-token expansion


def _tokens_per_item(grid_thw, merge_size: int) -> np.ndarray:
  grid = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return np.prod(grid, axis=-1) // merge_size**2


def expand_vision_tokens(text: str, image_grid_thw=None, video_grid_thw=None, merge_size: int = 2) -> str:
  """Repeats the k-th `<|image_pad|>` (`<|video_pad|>`) by the k-th image's (video's) token count.

  Equal to what HF's `Qwen2_5_VLProcessor` does to the text.
  """
  for token, grid in ((IMAGE_TOKEN, image_grid_thw), (VIDEO_TOKEN, video_grid_thw)):
    counts = _tokens_per_item(grid, merge_size)
    parts = text.split(token)
    if len(parts) - 1 != len(counts):
      raise ValueError(f"{len(parts) - 1} {token} placeholders in the text but {len(counts)} grids")
    text = parts[0] + "".join(token * int(n) + rest for n, rest in zip(counts, parts[1:]))
  return text


def expand_vision_ids(ids, image_token_id: int, video_token_id: int, image_grid_thw=None, video_grid_thw=None,
                      merge_size: int = 2, source: str | None = None) -> np.ndarray:
  """Id-level `expand_vision_tokens`: (L,) ids -> (L + added,) int32 ids, without re-tokenising."""
  ids = np.asarray(ids, np.int32)
  return ids[_expansion_index(ids, image_token_id, video_token_id, image_grid_thw, video_grid_thw, merge_size,
                              source)]


def _expansion_index(ids: np.ndarray, image_token_id: int, video_token_id: int, image_grid_thw, video_grid_thw,
                     merge_size: int, source: str | None) -> np.ndarray:
  """Gather index that repeats each placeholder its token count."""
  repeats = np.ones(ids.shape, np.int64)
  for name, token_id, grid in (("image", image_token_id, image_grid_thw), ("video", video_token_id, video_grid_thw)):
    positions = np.flatnonzero(ids == token_id)
    counts = _tokens_per_item(grid, merge_size)
    if len(positions) != len(counts):
      raise ValueError(f"{source or 'prompt'}: {len(positions)} {name} placeholder tokens but {len(counts)} "
                       f"{name} grids; give one grid per {name} in the messages")
    repeats[positions] = counts
  return np.repeat(np.arange(len(ids)), repeats)


# ------------------------------------------------------------------------------------------------
# Encoding


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedChat:
  """One tokenised conversation with vision placeholders expanded."""

  input_ids: np.ndarray  # (L,) int32
  target_mask: np.ndarray  # (L,) bool: assistant contents and their <|im_end|> (SFT targets)
  num_vision_tokens: int  # how many of the L ids are <|image_pad|> / <|video_pad|>
  num_truncated: int = 0  # tokens cut from the question to fit a length budget (encode_vqa_prompts)

  def __len__(self) -> int:
    return len(self.input_ids)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], image_grid_thw=None, video_grid_thw=None, *,
                add_generation_prompt: bool = False, max_length: int | None = None, merge_size: int = 2,
                default_system: str | None = DEFAULT_SYSTEM_MESSAGE, add_vision_id: bool = False,
                source: str | None = None) -> EncodedChat:
  """Renders, tokenises and expands a conversation.

  The ids before expansion equal `tokenizer.encode(render(messages, ...))`.

  Args:
    tokenizer: the real or the word-level tokenizer.
    messages: the conversation.
    image_grid_thw, video_grid_thw: (num, 3) grids from the image processor, in order of appearance.
    add_generation_prompt: end with the assistant turn opener (RL prompts, evaluation).
    max_length: the length budget; longer results raise `PromptTooLongError`.
    merge_size: patches merged per token side (2 for Qwen2.5-VL).
    source: how errors name this example, e.g. "example 12" or a dataset record id.
  """
  pieces = render_segments(messages, add_generation_prompt, default_system, add_vision_id)
  text = "".join(t for t, _ in pieces)
  ids, offsets = tokenizer.encode_with_offsets(text)
  ids = np.asarray(ids, np.int32)
  spans, start = [], 0
  for piece, is_target in pieces:
    if is_target:
      spans.append((start, start + len(piece)))
    start += len(piece)
  starts = np.asarray([o[0] for o in offsets], np.int64)
  target = np.zeros(len(ids), bool)
  for lo, hi in spans:
    target |= (starts >= lo) & (starts < hi)

  special = tokenizer.special
  index = _expansion_index(ids, special.image_pad, special.video_pad, image_grid_thw, video_grid_thw, merge_size,
                           source)
  ids, target = ids[index], target[index]
  num_vision = int(np.count_nonzero((ids == special.image_pad) | (ids == special.video_pad)))
  if max_length is not None and len(ids) > max_length:
    raise PromptTooLongError(
        source or "example",
        f"the tokenised chat is {len(ids)} tokens ({len(ids) - num_vision} text + {num_vision} vision), over "
        f"the budget max_length={max_length}",
        "Raise max_length, lower max_pixels so images yield fewer tokens, or shorten the text")
  return EncodedChat(ids, target, num_vision)


# The reasoning-format instruction appended to every RL/evaluation question (our own wording of the original's
# "cot" template: reasoning inside <think>, starting with a caption, and the answer inside <answer>).
COT_INSTRUCTION = ("First describe the image in a caption relevant to the question, then reason step by step, "
                   "all inside <think> </think>. Then give the final answer inside <answer> </answer>.")


def cot_question(question: str) -> str:
  """The question followed, on a new line, by COT_INSTRUCTION."""
  return f"{question}\n{COT_INSTRUCTION}"


def encode_vqa_prompts(tokenizer: Tokenizer, examples: Sequence[Mapping[str, Any]], image_grids: Sequence,
                       max_length: int | None = None, truncate: bool = False) -> list[EncodedChat]:
  """RL/evaluation prompts: each example's `problem` with the reasoning instruction, its images (placed as
  `vqa_messages` does), and the generation prompt; `image_grids[i]` is example i's (num_images, 3) grid.

  A prompt longer than `max_length` raises `PromptTooLongError` naming the example, unless `truncate`: then
  the end of its question is cut until it fits (the instruction, images and template stay whole; only the text
  after the last `<image>` marker is cut, so no marker is) and `num_truncated` records how many tokens went. A
  prompt that does not fit even with that text cut away raises.
  """
  chats = []
  for i, (ex, grid) in enumerate(zip(examples, image_grids)):
    source = f"example {ex.get('id', i)}"
    if truncate and max_length is not None:
      chats.append(_fit_vqa_prompt(tokenizer, ex["problem"], grid, max_length, source))
    else:
      chats.append(_vqa_prompt(tokenizer, ex["problem"], grid, max_length, source))
  return chats


def _vqa_prompt(tokenizer: Tokenizer, question: str, grid, max_length: int | None, source: str) -> EncodedChat:
  num_images = len(np.asarray(grid).reshape(-1, 3))
  return encode_chat(tokenizer, vqa_messages(cot_question(question), num_images, source=source), grid,
                     add_generation_prompt=True, max_length=max_length, source=source)


def _fit_vqa_prompt(tokenizer: Tokenizer, question: str, grid, max_length: int, source: str) -> EncodedChat:
  """The prompt whose question keeps the longest prefix (binary search over characters) of its text after the last
  `<image>` marker within `max_length`; the question up to that marker stays whole."""
  full = _vqa_prompt(tokenizer, question, grid, None, source)
  if len(full) <= max_length:
    return full
  last_marker = question.rfind(IMAGE_MARKER)
  head_end = 0 if last_marker < 0 else last_marker + len(IMAGE_MARKER)
  head, tail = question[:head_end], question[head_end:]
  best = _vqa_prompt(tokenizer, head, grid, None, source)
  if len(best) > max_length:
    raise PromptTooLongError(
        source, f"even with its question cut away the prompt is {len(best)} tokens ({best.num_vision_tokens} "
        f"vision), over the budget max_length={max_length}",
        "Lower max_pixels so the images yield fewer tokens, or raise max_length")
  lo, hi = 0, len(tail)  # tail[:lo] fits, tail[:hi] does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    chat = _vqa_prompt(tokenizer, head + tail[:mid], grid, None, source)
    if len(chat) <= max_length:
      lo, best = mid, chat
    else:
      hi = mid
  return dataclasses.replace(best, num_truncated=len(full) - len(best))
