"""Datasets -> numpy examples.

  scenes       synthetic shapes scenes and questions (numpy + PIL): `generate_examples` in memory
  shapes_vqa   tfds builder over `scenes` (ArrayRecord, built locally from a seed)
  records      local JSONL / JSON-list records and images, with errors naming file and line
  local_vqa    tfds builder over a VQA JSONL file and an image folder
  loading      `load_split`: prepare a builder in a directory if needed, read a split as numpy examples

Importing this package does not import tensorflow_datasets; the tfds names below load it on first use, so
the in-memory generator and the JSONL reader work where tfds is not installed.
"""

import importlib

from noisygrpo_jax.data.records import DataError, read_jsonl_vqa
from noisygrpo_jax.data.scenes import generate_example, generate_examples

_LAZY = {
    "ShapesVqa": "shapes_vqa", "shapes_vqa_config": "shapes_vqa",
    "LocalVqa": "local_vqa", "local_vqa_config": "local_vqa",
    "load_split": "loading", "prepare_builder": "loading", "NumpyExamples": "loading",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"noisygrpo_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
