"""Shared fixtures: the HF reference image processor and the real tokenizer, built once per session."""

import warnings

import pytest


@pytest.fixture(scope="session")
def hf_image_processor_cls():
  # Without torchvision, `transformers.Qwen2VLImageProcessor` resolves to this PIL/numpy class; naming it
  # directly keeps the reference the same if torchvision is ever installed.
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  return Qwen2VLImageProcessorPil


@pytest.fixture(scope="session")
def hf_process(hf_image_processor_cls):
  """hf_process(images, **kwargs) -> (pixel_values, image_grid_thw) from HF's processor, as numpy."""
  processors = {}

  def run(images, **kwargs):
    call_kwargs = {k: kwargs.pop(k) for k in ("do_rescale",) if k in kwargs}
    key = tuple(sorted(kwargs.items()))
    if key not in processors:
      processors[key] = hf_image_processor_cls(**kwargs)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      out = processors[key](images, return_tensors="np", **call_kwargs)
    return out["pixel_values"], out["image_grid_thw"]

  return run


@pytest.fixture(scope="session")
def qwen_cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("noisygrpo_cache")


@pytest.fixture(scope="session")
def qwen_tok(qwen_cache_dir):
  """The real Qwen2.5 tokenizer, built from qwen.tiktoken into a fresh cache (a few seconds, once)."""
  from noisygrpo_jax.processing import tokenizer

  tok = tokenizer.qwen2_5_tokenizer(cache_dir=qwen_cache_dir)
  assert tok.source.startswith("built from"), tok.source
  return tok
