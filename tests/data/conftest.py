"""The in-memory shapes examples, generated once per session and shared by the data tests."""

import pytest

from noisygrpo_jax.data import scenes

N_CHECKED = 1000  # examples of each split verified by the independent checker


@pytest.fixture(scope="session")
def shapes_examples():
  """{split: the first N_CHECKED examples of that split, seed 0, 112 px}."""
  return {split: scenes.generate_examples(split, N_CHECKED, seed=0) for split in scenes.SPLITS}
