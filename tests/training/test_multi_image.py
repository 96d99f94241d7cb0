"""RL on prompts with several images: each image of rollout g noised at g's level with its own noise, every rollout
scored on its group's clean (level-0) images, all of them, and one policy update on such a batch."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from configs import noisygrpo
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL
from noisygrpo_jax.processing import image as image_lib
from noisygrpo_jax.processing import tokenizer as tokenizer_lib
from noisygrpo_jax.rl import noise
from noisygrpo_jax.training import rollouts, setup
from tests.training import helpers as H

LEVELS = (0.0, 0.3, 0.6, 0.9)


def _config():
  c = noisygrpo.get_config("tiny")
  with c.unlocked():
    c.model.preset = "tiny"
    c.rl.noise.levels, c.rl.group_size, c.rl.max_new_tokens = LEVELS, len(LEVELS), 6
  return c


def _examples():
  """A two-image example (56 x 56 and 56 x 112 pixels: 16 + 32 patches, placed by markers) and a one-image one."""
  rng = np.random.default_rng(0)
  pixels = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return [{"id": "two", "images": [pixels(56, 56), pixels(56, 112)], "problem": "is <image> the same as <image> ?",
           "solution": "no"},
          {"id": "one", "image": pixels(84, 84), "problem": "what colour ?", "solution": "red"}]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.word_level_tokenizer("is the same as what colour ? no red".split(), 256)


def test_each_image_gets_its_rollouts_level_and_its_own_noise(tok):
  c = _config()
  model_cfg = setup.model_config(c, tok)
  cfg = dataclasses.replace(setup.rollout_config(c, tok, model_cfg.vision), noise_quantize="none")
  example = _examples()[0]
  levels = np.asarray([LEVELS], np.float32)
  groups = rollouts.rollout_images(cfg, jax.random.key(0), [example], levels)
  assert len(groups) == 1 and len(groups[0]) == len(LEVELS)
  eps = []  # per rollout, per image: the standard normal noise the rollout's level implies
  for g, (level, images) in enumerate(zip(LEVELS, groups[0])):
    assert [im.shape for im in images] == [im.shape for im in example["images"]]
    t = int(1000 * level)
    eps.append([(im - noise.SQRT_ALPHA_BAR[t] * clean / 255.0) / noise.SQRT_ONE_MINUS_ALPHA_BAR[t]
                for im, clean in zip(images, example["images"])])
    for e in eps[-1]:
      assert abs(e.mean()) < 0.05 and abs(e.std() - 1.0) < 0.05, (g, e.mean(), e.std())
  for g in range(len(LEVELS)):
    first, second = (e.reshape(-1) for e in eps[g])
    n = first.size  # the smaller image: a shared key would make these equal (noise is drawn per flat index)
    assert abs(np.corrcoef(first, second[:n])[0, 1]) < 0.05
  assert abs(np.corrcoef(eps[1][0].reshape(-1), eps[2][0].reshape(-1))[0, 1]) < 0.05


def test_rollouts_are_scored_on_all_clean_images_and_train(tok):
  c = _config()
  model_cfg = setup.model_config(c, tok)
  cfg = setup.rollout_config(c, tok, model_cfg.vision)
  model = Qwen25VL(model_cfg, nnx.Rngs(0))
  examples, key, g = _examples(), jax.random.key(1), len(LEVELS)
  prepared = rollouts.prepare_rollouts(tok, cfg, model_cfg, examples, key, 0, 10)
  noisy = prepared.prompts.vision

  # The generation rows: each rollout's noisy copies of all of its example's images, in one patch sequence.
  _, noise_key, _ = jax.random.split(key, 3)
  images = rollouts.rollout_images(cfg, noise_key, examples, prepared.levels)
  for p, group in enumerate(images):
    for r, rollout in enumerate(group):
      processed = image_lib.process_images(rollout, cfg.image)
      assert len(processed.image_grid_thw) == (2 if p == 0 else 1)
      np.testing.assert_array_equal(noisy.pixel_values[p * g + r, :len(processed.pixel_values)],
                                    processed.pixel_values)
  ids = np.asarray(prepared.prompts.input_ids)
  assert ((ids == model_cfg.vision_start_token_id).sum(1) == [2] * g + [1] * g).all()
  assert not np.array_equal(noisy.pixel_values[0], noisy.pixel_values[1])

  out = rollouts.sample_rollouts(model, tok, cfg, prepared)
  batch = out.batch
  for field in dataclasses.fields(batch.vision):
    got, sampled = getattr(batch.vision, field.name), getattr(noisy, field.name)
    for row in range(len(examples) * g):
      np.testing.assert_array_equal(got[row], sampled[row // g * g], err_msg=f"{field.name}, row {row}")

  graphdef, _, _, step, state = H.setup_state(model, setup.loss_config(c))
  before = jax.tree.map(np.asarray, H.full_params(state))
  advantages = np.linspace(-1, 1, len(examples) * g, dtype=np.float32)  # nonzero, whatever the rewards were
  state, metrics, _ = jax.jit(step)(state, batch.replace(advantages=advantages))
  assert np.isfinite(float(metrics["loss"]))
  after = H.full_params(state)
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
