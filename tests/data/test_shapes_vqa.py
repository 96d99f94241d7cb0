"""The tfds ShapesVqa builder: prepares without TensorFlow, reads back through `as_data_source`, and holds
exactly the in-memory generator's examples."""

import glob
import os

import numpy as np
import pytest

from noisygrpo_jax.data import scenes
from noisygrpo_jax.data.loading import NumpyExamples, load_split, prepare_builder
from noisygrpo_jax.data.shapes_vqa import ShapesVqa, shapes_vqa_config
from tests.data import scene_checker

SIZES = {"train_size": 12, "test_size": 6, "ood_size": 6, "hallucination_size": 6, "robustness_size": 6}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_builder("shapes_vqa", path, **SIZES)
  return path


def test_tfds_has_no_tensorflow():
  import importlib.util
  assert importlib.util.find_spec("tensorflow") is None  # the claim below is about a TF-free environment


@pytest.mark.parametrize("split", list(scenes.SPLITS))
def test_prepared_split_equals_in_memory_examples(data_dir, split):
  examples = load_split("shapes_vqa", split, data_dir, **SIZES)
  assert isinstance(examples, NumpyExamples)
  expected = scenes.generate_examples(split, SIZES[f"{split}_size"], seed=0)
  assert len(examples) == len(expected)
  for i, (got, want) in enumerate(zip(examples, expected)):
    assert set(got) == set(want)
    assert got["image"].dtype == np.uint8
    np.testing.assert_array_equal(got["image"], want["image"])
    assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
    scene_checker.check_example(got, split, i)
  assert examples[-1]["id"] == expected[-1]["id"]
  assert [e["id"] for e in examples[1:3]] == [e["id"] for e in expected[1:3]]


def test_rebuild_is_byte_identical(data_dir, tmp_path):
  prepare_builder("shapes_vqa", tmp_path, **SIZES)
  name = shapes_vqa_config(**SIZES).name
  first = sorted(glob.glob(os.path.join(data_dir, "shapes_vqa", name, "*", "*.array_record*")))
  second = sorted(glob.glob(os.path.join(tmp_path, "shapes_vqa", name, "*", "*.array_record*")))
  assert len(first) == len(scenes.SPLITS) and [os.path.basename(p) for p in first] == [
      os.path.basename(p) for p in second]
  for a, b in zip(first, second):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read(), a


def test_existing_copy_is_reused(data_dir):
  builder = ShapesVqa(data_dir=os.fspath(data_dir), config=shapes_vqa_config(**SIZES))
  assert builder.is_prepared()
  assert {s: builder.info.splits[s].num_examples for s in scenes.SPLITS} == {
      s: SIZES[f"{s}_size"] for s in scenes.SPLITS}


def test_default_config_by_object_or_name(tmp_path):
  for config in (shapes_vqa_config(), "px112_seed0_n2000-200-200-200-200", None):
    builder = ShapesVqa(data_dir=os.fspath(tmp_path), config=config)
    assert builder.builder_config.train_size == 2000 and not builder.is_prepared()


def test_config_names_and_validation():
  assert shapes_vqa_config().name == "px112_seed0_n2000-200-200-200-200"
  assert shapes_vqa_config(image_size=64, seed=3, train_size=10).name == "px64_seed3_n10-200-200-200-200"
  with pytest.raises(ValueError, match="image_size"):
    shapes_vqa_config(image_size=16)
  with pytest.raises(ValueError, match="train_size"):
    shapes_vqa_config(train_size=-1)
  with pytest.raises(TypeError, match="unknown ShapesVqa option"):
    shapes_vqa_config(img_size=64)


def test_unknown_split_or_dataset(data_dir):
  with pytest.raises(ValueError, match="no split 'validation'"):
    load_split("shapes_vqa", "validation", data_dir, **SIZES)
  with pytest.raises(ValueError, match="unknown dataset"):
    load_split("shapes", "train", data_dir)
