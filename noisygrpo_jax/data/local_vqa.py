"""tfds builder `LocalVqa`: VQA JSONL files plus an image folder on local disk -> ArrayRecord.

Each split is one JSONL file of rows {"image": relative path, "problem", "solution", "id" (optional)}
(`records.iter_jsonl_vqa`); "image" may be a list of paths, or given as "images". Images are decoded with PIL to
RGB uint8. A row's images, of any sizes, are stored as their concatenated flat pixels and their shapes
(`pack_images`); `unpack_example` turns a stored example back into one with "image" or "images". A bad row stops
preparation with an error naming the file and line, unless the config sets `skip_bad_rows=True`: then bad rows are
logged and their number per split is kept in `builder.info.metadata["skipped_rows"]` (saved with the dataset).

  config = local_vqa_config({"train": "data/train.jsonl", "test": "data/test.jsonl"}, image_root="data/images")
  builder = LocalVqa(data_dir="/tmp/tfds", config=config)
  builder.download_and_prepare()
  builder.info.metadata["skipped_rows"]   # {"train": 0, "test": 0}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from noisygrpo_jax.data.records import DataError, example_images, iter_jsonl_vqa, read_jsonl_vqa, with_images

__all__ = ["LocalVqa", "LocalVqaConfig", "local_vqa_config", "read_jsonl_vqa", "DataError", "unpack_example"]


@dataclasses.dataclass(eq=False)
class LocalVqaConfig(tfds.core.BuilderConfig):
  """Where the data is. Build with `local_vqa_config`, which names the config after the files."""

  files: tuple[tuple[str, str], ...] = ()  # (split name, JSONL path) pairs
  image_root: str | None = None  # image paths are relative to this; None: each JSONL file's directory
  skip_bad_rows: bool = False  # drop (and count) bad rows instead of failing


def local_vqa_config(files: str | os.PathLike | Mapping[str, str | os.PathLike], image_root: str | None = None,
                     skip_bad_rows: bool = False, name: str | None = None) -> LocalVqaConfig:
  """A config for one JSONL file (the "train" split) or a {split: JSONL path} mapping.

  The default name combines the first file's stem with a hash of the absolute paths, sizes and modification
  times of the files and of the options, so editing a JSONL file prepares a new copy. Replacing an image
  without touching the JSONL does not: pass a new `name`, or delete the prepared directory.
  """
  split_files = {"train": files} if isinstance(files, (str, os.PathLike)) else dict(files)
  if not split_files:
    raise ValueError("local_vqa_config needs at least one JSONL file")
  pairs = []
  for split, path in split_files.items():
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
      raise DataError(path, None, f"no such file (split {split!r})", "Check the JSONL path")
    pairs.append((split, path))
  root = os.path.abspath(image_root) if image_root is not None else None
  if name is None:
    stats = [(s, p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for s, p in pairs]
    digest = hashlib.blake2b(json.dumps([stats, root, skip_bad_rows]).encode(), digest_size=5).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.splitext(os.path.basename(pairs[0][1]))[0]).strip("_")
    name = f"{stem or 'vqa'}_{digest}"
  return LocalVqaConfig(name=name, files=tuple(pairs), image_root=root, skip_bad_rows=skip_bad_rows,
                        description=f"Local VQA from {', '.join(p for _, p in pairs)}")


def pack_images(example: dict) -> dict:
  """An example's images (uint8 [H, W, 3] each, sizes vary) as the stored features: "image_pixels" uint8 [N] (all
  pixels, flat, in order) and "image_shapes" int32 [num_images, 3]. tfds cannot decode a sequence of ragged arrays."""
  images = example_images(example)
  rest = {k: v for k, v in example.items() if k not in ("image", "images")}
  return {**rest, "image_pixels": np.concatenate([im.reshape(-1) for im in images]),
          "image_shapes": np.asarray([im.shape for im in images], np.int32)}


def unpack_example(stored: dict) -> dict:
  """A stored example (`pack_images`) -> an example with "image" uint8 [H, W, 3], or "images" when it has several."""
  shapes = np.asarray(stored["image_shapes"])
  flat = np.split(np.asarray(stored["image_pixels"]), np.cumsum(np.prod(shapes, axis=1))[:-1])
  rest = {k: v for k, v in stored.items() if k not in ("image_pixels", "image_shapes")}
  return with_images(rest, [f.reshape(shape) for f, shape in zip(flat, shapes)])


class LocalVqa(tfds.core.GeneratorBasedBuilder):
  """VQA examples from local JSONL files and images.

  Features: image_pixels uint8 [N] and image_shapes int32 [num_images, 3] (`pack_images`); problem, solution,
  id: text. Splits: the config's files. Read examples through `unpack_example` (as `loading.load_split` does).
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Several images per row: stored as flat pixels and their shapes."}
  # No download checksums to find. tfds would look for them next to the code through `importlib_resources`,
  # which is not installed (and crashes) for a builder inside a package.
  code_path = None

  def __init__(self, *, config: LocalVqaConfig, **kwargs):
    super().__init__(config=config, file_format="array_record", **kwargs)

  @classmethod
  def make_config(cls, **kwargs) -> LocalVqaConfig:
    return local_vqa_config(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image_pixels": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding="zlib"),
            "image_shapes": tfds.features.Tensor(shape=(None, 3), dtype=np.int32),
            "problem": tfds.features.Text(),
            "solution": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    self.info.metadata["skipped_rows"] = {split: 0 for split, _ in self.builder_config.files}
    return {split: self._generate_examples(split, path) for split, path in self.builder_config.files}

  def _generate_examples(self, split: str, path: str):
    cfg = self.builder_config

    def count_skip(_):
      self.info.metadata["skipped_rows"][split] += 1

    for i, example in enumerate(iter_jsonl_vqa(path, cfg.image_root, skip_bad_rows=cfg.skip_bad_rows,
                                               on_skip=count_skip)):
      yield i, pack_images(example)
