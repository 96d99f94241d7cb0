"""`load_split`: prepare a tfds builder in a local directory if needed and read a split as numpy examples."""

from __future__ import annotations

import collections.abc
import logging
import operator
import os
from typing import Any, Callable

from noisygrpo_jax.data.local_vqa import LocalVqa, unpack_example
from noisygrpo_jax.data.shapes_vqa import ShapesVqa

BUILDERS = {"shapes_vqa": ShapesVqa, "local_vqa": LocalVqa}
UNPACK = {"local_vqa": unpack_example}  # stored example -> example, where the stored form differs

logger = logging.getLogger(__name__)


def _decode(example: dict[str, Any]) -> dict[str, Any]:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


class NumpyExamples(collections.abc.Sequence):
  """Random access over a tfds data source: each example a dict of numpy arrays and str (text is decoded
  from the UTF-8 bytes tfds returns), then passed through `unpack` when given. Reads from disk on access; slicing
  returns a list."""

  def __init__(self, source, unpack: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    self._source = source
    self._unpack = unpack

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = operator.index(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} out of range for a split of {len(self)}")
    example = _decode(self._source[index])
    return example if self._unpack is None else self._unpack(example)

  def __repr__(self) -> str:
    return f"NumpyExamples({self._source!r}, {len(self)} examples)"


def prepare_builder(name: str, data_dir: str | os.PathLike, **config):
  """The builder `name` ("shapes_vqa" or "local_vqa") for `config`, prepared in `data_dir` unless it already
  is (preparation reuses an existing copy)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  cls = BUILDERS[name]
  builder = cls(data_dir=os.fspath(data_dir), config=cls.make_config(**config))
  builder.download_and_prepare()
  return builder


def load_split(name: str, split: str, data_dir: str | os.PathLike, **config) -> NumpyExamples:
  """Split `split` of dataset `name` as random-access numpy examples; `config` goes to the builder's
  `make_config` (`shapes_vqa_config` or `local_vqa_config`).

    train = load_split("shapes_vqa", "train", "/tmp/tfds", train_size=500)
    train[0]["image"].shape   # (112, 112, 3)
  """
  builder = prepare_builder(name, data_dir, **config)
  if split not in builder.info.splits:
    raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
  source = builder.as_data_source(split=split)
  skipped = (builder.info.metadata or {}).get("skipped_rows", {}).get(split, 0)
  if skipped:  # also on later runs, which read the prepared copy without meeting the bad rows again
    logger.warning("%s split %r: %d bad rows were skipped when the dataset was prepared (skip_bad_rows=True); "
                   "%d examples remain", name, split, skipped, len(source))
  return NumpyExamples(source, UNPACK.get(name))
