"""Answers on an evaluation split with the jitted sampler, and their metrics."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from noisygrpo_jax import sharding
from noisygrpo_jax.data import records
from noisygrpo_jax.evaluation import metrics as metrics_lib
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL
from noisygrpo_jax.processing import chat_template, collate, image as image_lib
from noisygrpo_jax.processing.tokenizer import Tokenizer
from noisygrpo_jax.sampling import sampler


def answer(model: Qwen25VL, tokenizer: Tokenizer, examples: Sequence[dict], params: sampler.SamplingParams,
           image_config: image_lib.ImageProcessorConfig, *, batch_size: int = 16, key=None,
           prompt_buckets=(), patch_buckets=(), encode_prompts=chat_template.encode_vqa_prompts,
           place: Callable[[collate.PromptBatch], collate.PromptBatch] | None = None) -> list[str]:
  """One completion per example (greedy unless `params` samples), decoded without special tokens.

  `encode_prompts(tokenizer, examples, image_grids)` makes the prompts (default: the question with the reasoning
  instruction, then the assistant turn opener). The last batch is padded with repeats of its first example so
  every batch has the same shape. place: puts each prompt batch on the devices the sampler runs on (e.g.
  `Run.place_prompts`: rows split over the mesh's batch axes, so each device answers its share of the rows);
  default: as it is (one device, or whole on every device).
  """
  key = jax.random.key(0) if key is None else key
  completions = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    images = [image_lib.process_images(records.example_images(ex), image_config, f"example {ex.get('id', '?')}")
              for ex in chunk]
    chats = encode_prompts(tokenizer, chunk, [im.image_grid_thw for im in images])
    prompts = collate.collate_prompts(chats, images, model.config, pad_id=tokenizer.pad_id,
                                      prompt_buckets=prompt_buckets, patch_buckets=patch_buckets)
    out = sampler.generate(model, place(prompts) if place else prompts, jax.random.fold_in(key, start), params)
    tokens, mask = sharding.host_array(out.tokens)[:real], sharding.host_array(out.mask)[:real]
    completions += tokenizer.decode_batch([t[m > 0] for t, m in zip(tokens, mask)], skip_special_tokens=True)
  return completions


def final_answer(completion: str) -> str:
  """The normalised <answer> span of a completion, or the whole completion when it has none."""
  span = metrics_lib.extract_answer(completion)
  return completion if span is None else metrics_lib.normalize_answer(span)


def image_reliance(model, tokenizer, examples, params, image_config, completions: Sequence[str], **kwargs) -> float:
  """Fraction of the examples' final answers (`final_answer` of `completions`) that change when every example is
  shown the next example's images instead of its own (as many as it has: the next example's, repeated in turn, so
  its `<image>` markers still match): 0 for a model that ignores its images. Only the answer counts: a chain of
  thought that describes the other image but ends in the same answer is no change."""
  if len(examples) < 2:
    raise ValueError("image_reliance needs at least 2 examples to exchange their images")
  swapped = [_with_images_of(ex, examples[(i + 1) % len(examples)]) for i, ex in enumerate(examples)]
  other = answer(model, tokenizer, swapped, params, image_config, **kwargs)
  return float(np.mean([final_answer(a) != final_answer(b) for a, b in zip(completions, other)]))


def _with_images_of(example: dict, other: dict) -> dict:
  """`example` showing `other`'s images, cycled to `example`'s image count."""
  own, theirs = records.example_images(example), records.example_images(other)
  return records.with_images(example, [theirs[k % len(theirs)] for k in range(len(own))])


def evaluate_split(model, tokenizer, examples, params, image_config, *, check_images: bool = False,
                   **kwargs) -> dict[str, float]:
  """`split_metrics` of the split's `answer`s."""
  completions = answer(model, tokenizer, examples, params, image_config, **kwargs)
  return split_metrics(model, tokenizer, examples, params, image_config, completions, check_images=check_images,
                       **kwargs)


def split_metrics(model, tokenizer, examples, params, image_config, completions: Sequence[str], *,
                  check_images: bool = False, **kwargs) -> dict[str, float]:
  """Flat metrics of one split's completions (`metrics_lib.summarize`): accuracy, format rate,
  `accuracy/<answer type>` for each answer type when the examples carry one, `yes_no_<metric>` when the split has
  yes/no questions, `description_match` and `accuracy_given_description` (overall and `/<answer type>`) when every
  example carries a reference chain of thought ("cot"), and with `check_images` its `image_reliance` (answers a
  second time with exchanged images; `kwargs` go to `answer`)."""
  types = [ex.get("answer_type", "") for ex in examples]
  cots = [ex["cot"] for ex in examples] if all(ex.get("cot") for ex in examples) else None
  summary = metrics_lib.summarize(completions, [ex["solution"] for ex in examples], types, reference_cots=cots)
  result = {"accuracy": summary["accuracy"], "format_rate": summary["format_rate"]}
  result.update(summary.get("description", {}))
  for t, entry in summary["by_answer_type"].items():
    if t:
      result.update({f"{name}/{t}": value for name, value in entry.items() if name != "n"})
  result.update({f"yes_no_{name}": value for name, value in summary.get("yes_no", {}).items()})
  if check_images:
    result["image_reliance"] = image_reliance(model, tokenizer, examples, params, image_config, completions, **kwargs)
  return result
