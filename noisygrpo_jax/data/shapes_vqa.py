"""tfds builder `ShapesVqa`: the synthetic shapes VQA of `scenes`, built locally from a seed (no downloads).

Stored as ArrayRecord, so it prepares and reads back without TensorFlow (`builder.as_data_source()`;
`as_dataset()` needs TF). Examples are written in index order (shuffling disabled), so example i of a split
equals `scenes.generate_example(split, i, seed, image_size)` byte for byte.

  builder = ShapesVqa(data_dir="/tmp/tfds", config=shapes_vqa_config(train_size=500))
  builder.download_and_prepare()
  train = builder.as_data_source()["train"]   # random access; text fields come back as UTF-8 bytes
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from noisygrpo_jax.data import scenes

SPLIT_NAMES = tuple(scenes.SPLITS)


@dataclasses.dataclass(eq=False)
class ShapesVqaConfig(tfds.core.BuilderConfig):
  """Image size, seed and split sizes. Build with `shapes_vqa_config`, which names the config after them."""

  image_size: int = 112  # images are image_size x image_size RGB
  seed: int = 0  # the whole dataset is a pure function of (seed, image_size)
  train_size: int = 2000
  test_size: int = 200
  ood_size: int = 200
  hallucination_size: int = 200
  robustness_size: int = 200

  def split_sizes(self) -> dict[str, int]:
    return {split: getattr(self, f"{split}_size") for split in SPLIT_NAMES}


def shapes_vqa_config(**overrides) -> ShapesVqaConfig:
  """A config named after its values, e.g. "px112_seed0_n2000-200-200-200-200" (the split sizes in
  `SPLIT_NAMES` order: train, test, hallucination, robustness, ood), so each variant prepares in its own
  directory."""
  fields = {f.name for f in dataclasses.fields(ShapesVqaConfig)} - {f.name for f in
                                                                    dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise TypeError(f"unknown ShapesVqa option(s) {sorted(unknown)}; expected some of {sorted(fields)}")
  values = ShapesVqaConfig(name="tmp", **overrides)
  problems = [f"{k}_size={v} must be a non-negative int" for k, v in values.split_sizes().items()
              if not isinstance(v, int) or v < 0]
  if not isinstance(values.seed, int) or values.seed < 0:
    problems.append(f"seed={values.seed} must be a non-negative int")
  if not isinstance(values.image_size, int) or values.image_size < scenes.MIN_IMAGE_SIZE:
    problems.append(f"image_size={values.image_size} must be an int >= {scenes.MIN_IMAGE_SIZE}")
  if problems:
    raise ValueError("invalid ShapesVqa config: " + "; ".join(problems))
  sizes = "-".join(str(n) for n in values.split_sizes().values())
  return dataclasses.replace(
      values, name=f"px{values.image_size}_seed{values.seed}_n{sizes}",
      description=f"Synthetic shapes VQA, {values.image_size}px, seed {values.seed}, split sizes {sizes}")


class ShapesVqa(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes VQA: counting, yes/no existence (POPE-style), attribute and multiple-choice questions.

  Features: image uint8 [H, W, 3]; problem, solution, answer_type, pope_kind, cot, scene (JSON), id: text.
  Splits: train, test, hallucination, robustness, ood (see `scenes`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [shapes_vqa_config()]
  # No download checksums to find. tfds would look for them next to the code through `importlib_resources`,
  # which is not installed (and crashes) for a builder inside a package.
  code_path = None

  def __init__(self, *, config: ShapesVqaConfig | str | None = None, **kwargs):
    if isinstance(config, ShapesVqaConfig) and config.name in self.builder_configs:
      config = config.name  # tfds rejects a new config object that reuses a listed config's name
    super().__init__(config=config, file_format="array_record", **kwargs)

  @classmethod
  def make_config(cls, **overrides) -> ShapesVqaConfig:
    return shapes_vqa_config(**overrides)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs()` fails for a builder defined outside a tfds dataset package.
    text = {k: tfds.features.Text() for k in ("problem", "solution", "answer_type", "pope_kind", "cot", "scene",
                                               "id")}
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            **text}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    for i in range(n):
      yield i, scenes.generate_example(split, i, cfg.seed, cfg.image_size)
