"""Dense vision pretraining: labels and padding of the host batch, learning, and that only the tower moves."""

import json

import jax
import numpy as np
from flax import nnx

from noisygrpo_jax.data import scenes
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg
from noisygrpo_jax.processing import image as image_lib
from noisygrpo_jax.training import vision_pretrain as vp

CONFIG = cfg.tiny()
IMAGE_CONFIG = image_lib.ImageProcessorConfig(min_pixels=56 * 56, max_pixels=112 * 112)


def _examples(n, split="train", image_size=56):
  return scenes.generate_examples(split, n, seed=3, image_size=image_size)


def test_host_batch_labels_real_tokens_and_pads_the_rest():
  examples = _examples(3)
  vision, labels = vp.host_batch(examples, IMAGE_CONFIG, CONFIG, patch_buckets=(32,))
  # 56 px -> 4x4 patches -> 2x2 merged tokens; the bucket pads to 32 patches = 8 merged tokens.
  assert vision.pixel_values.shape == (3, 32, 1176)
  for name in vp.CELL_HEADS:
    assert labels[name].shape == (3, 8)
    assert (labels[name][:, 4:] == -1).all()
  for i, ex in enumerate(examples):
    expected = scenes.cell_labels(json.loads(ex["scene"]), 2, 2)
    for name in vp.CELL_HEADS:
      np.testing.assert_array_equal(labels[name][i, :4], expected[name])
    assert labels["background"][i] == expected["background"]
  assert (labels["colour"][:, :4] > 0).sum() == sum(len(json.loads(ex["scene"])["objects"]) for ex in examples)


def test_pretraining_learns_the_cells_and_moves_only_the_vision_tower():
  model = Qwen25VL(CONFIG, nnx.Rngs(0))
  before = nnx.to_pure_dict(nnx.state(model))
  train = _examples(128)
  cfg = vp.VisionPretrainConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10, eval_size=64)
  heads = vp.init_heads(CONFIG.vision.out_hidden_size)
  initial_loss, _ = vp.loss_and_accuracy(model.visual, heads, *vp.host_batch(train, IMAGE_CONFIG, CONFIG))
  results = vp.pretrain_vision(model, train, train, IMAGE_CONFIG, cfg)
  # Zero heads predict uniformly: the initial loss is the sum of log(classes) over the four heads.
  uniform = sum(np.log(len(scenes.CELL_CLASSES[n])) for n in vp.CELL_HEADS) + np.log(vp.NUM_BACKGROUNDS)
  np.testing.assert_allclose(float(initial_loss), uniform, rtol=1e-5)
  assert results["loss"] < 0.6 * uniform, results
  # Occupied cells only: predicting "none" everywhere scores 0, a random colour 1/6.
  assert results["eval_colour_accuracy"] > 0.4, results
  after = nnx.to_pure_dict(nnx.state(model))
  flat_before, flat_after = dict(jax.tree_util.tree_leaves_with_path(before)), dict(
      jax.tree_util.tree_leaves_with_path(after))
  moved = {jax.tree_util.keystr(p) for p in flat_before if not np.array_equal(flat_before[p], flat_after[p])}
  assert moved and all(p.startswith("['visual']") for p in moved), sorted(moved)[:5]
  assert any("merger" in p for p in moved)


def test_corrupt_images_noises_the_given_fraction_and_keeps_the_scenes():
  examples = _examples(200)
  untouched = vp.corrupt_images(examples, np.random.default_rng(0), 0.0, "wrap")
  assert len(untouched) == len(examples) and all(a is b for a, b in zip(untouched, examples))
  corrupted = vp.corrupt_images(examples, np.random.default_rng(0), 0.5, "wrap")
  changed = [not np.array_equal(a["image"], b["image"]) for a, b in zip(examples, corrupted)]
  assert 70 <= sum(changed) <= 130  # Binomial(200, 0.5): 100 +- 7
  for a, b in zip(examples, corrupted):
    assert a["scene"] == b["scene"] and b["image"].dtype == np.uint8 and b["image"].shape == a["image"].shape
  again = vp.corrupt_images(examples, np.random.default_rng(0), 0.5, "wrap")
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(corrupted, again))  # seeded


def test_loss_weighs_an_occupied_cell_occupied_weight_times_an_empty_one():
  model = Qwen25VL(CONFIG, nnx.Rngs(0))
  vision, labels = vp.host_batch(_examples(4), IMAGE_CONFIG, CONFIG, patch_buckets=(32,))
  rng = np.random.default_rng(0)
  heads = {name: jax.numpy.asarray(rng.normal(size=h.shape), np.float32)
           for name, h in vp.init_heads(CONFIG.vision.out_hidden_size).items()}
  features = np.asarray(jax.vmap(model.visual)(vision.pixel_values, vision.window_index, vision.reverse_index,
                                               vision.rope_ids, vision.window_segment_ids, vision.full_segment_ids))

  def cross_entropy(logits, target):
    logits = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, target[..., None], -1)[..., 0]

  def expected(w):
    weight = np.where(labels["colour"] > 0, w, 1.0) * (labels["colour"] >= 0)
    total = sum((cross_entropy(features @ np.asarray(heads[n]), np.maximum(labels[n], 0)) * weight).sum()
                / weight.sum() for n in vp.CELL_HEADS)
    pooled = (features * (labels["colour"] >= 0)[..., None]).sum(1) / (labels["colour"] >= 0).sum(1, keepdims=True)
    return total + cross_entropy(pooled @ np.asarray(heads["background"]), labels["background"]).mean()

  for w in (1.0, 6.0):
    loss, _ = vp.loss_and_accuracy(model.visual, heads, vision, labels, occupied_weight=w)
    np.testing.assert_allclose(float(loss), expected(w), rtol=1e-4)
  assert abs(expected(6.0) - expected(1.0)) > 1e-2  # the weight changes the loss of these labels
