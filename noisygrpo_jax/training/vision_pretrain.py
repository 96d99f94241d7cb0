"""Dense vision pretraining: the stand-in for a pretrained vision encoder when the model starts from scratch.

A real Qwen2.5-VL checkpoint has a pretrained vision tower. The tiny preset does not, and its SFT warm start
cannot grow one in a CPU budget: the decoder fits the text prior long before the random tower's features
carry anything it could attend to (measured on shapes_vqa: 400 SFT steps, answers unchanged when images are
exchanged). This stage trains the vision tower and merger alone, with linear heads on the merged tokens, to
label every cell of the image grid (one cell per merged token) with the colour, shape and size of the object
centred in it, and the image with its background. The heads are discarded; the decoder is not touched.

With `noise_fraction` > 0, that fraction of the images is corrupted by the RL's diffusion noise (rl/noise.py,
level uniform in [0, 1]) while keeping the clean scene's labels, as a pretrained encoder has seen corrupted
images: without it the tiny tower maps NoisyGRPO's noisy rollout images (n = 0.6, 0.9) to features the decoder
never saw, and the warm start answers them with word salad instead of a fluent guess.

Labels come from the scene descriptions of shapes_vqa (`scenes.cell_labels`), so the stage needs that dataset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from noisygrpo_jax.data import scenes
from noisygrpo_jax.models.qwen2_5_vl import host
from noisygrpo_jax.processing import collate, image as image_lib
from noisygrpo_jax.rl import noise as noise_lib

CELL_HEADS = tuple(scenes.CELL_CLASSES)  # colour, shape, size
NUM_BACKGROUNDS = len(scenes.ID_BACKGROUNDS + scenes.OOD_BACKGROUNDS)


@dataclasses.dataclass(frozen=True)
class VisionPretrainConfig:
  steps: int = 300
  batch_size: int = 64
  learning_rate: float = 2e-3  # peak of a warmup + cosine schedule (AdamW)
  warmup_steps: int = 20
  seed: int = 0
  eval_size: int = 128  # evaluation examples for the reported accuracies
  noise_fraction: float = 0.0  # fraction of training images corrupted with diffusion noise (labels stay clean)
  noise_quantize: str = "wrap"  # the corruption's pixel quantisation (rl.noise.quantize)
  occupied_weight: float = 1.0  # cross-entropy weight of a cell holding an object relative to an empty cell


def host_batch(examples, image_config: image_lib.ImageProcessorConfig, model_config, patch_buckets=None):
  """Packed images and their labels (numpy).

  Returns (VisionBatch with B rows, labels): labels[name] int32 [B, N] for the cell heads, with -1 on merged
  tokens that are padding (N = the padded patch count / merge unit), and labels["background"] int32 [B].
  """
  vision_cfg = model_config.vision
  images, rows, labels = [], [], {name: [] for name in CELL_HEADS + ("background",)}
  for ex in examples:
    im = image_lib.process_image(ex["image"], image_config, source=f"example {ex.get('id', '?')}")
    _, grid_h, grid_w = (int(g) // m for g, m in zip(im.image_grid_thw[0], (1, vision_cfg.spatial_merge_size,
                                                                             vision_cfg.spatial_merge_size)))
    for name, value in scenes.cell_labels(json.loads(ex["scene"]), grid_h, grid_w).items():
      labels[name].append(value)
    images.append(im)
    rows.append(([im.pixel_values], [tuple(im.image_grid_thw[0])]))
  largest = max(im.pixel_values.shape[0] for im in images)
  num_patches = collate.pick_bucket(-(-largest // vision_cfg.merge_unit) * vision_cfg.merge_unit, patch_buckets,
                                    "image patches", "vision pretraining")
  tokens = num_patches // vision_cfg.merge_unit
  padded = {name: np.stack([np.pad(v, (0, tokens - len(v)), constant_values=-1) for v in labels[name]])
            for name in CELL_HEADS}
  padded["background"] = np.asarray(labels["background"], np.int32)
  return host.pack_vision_batch(rows, vision_cfg, num_patches), padded


def corrupt_images(examples, rng: np.random.Generator, fraction: float, quantize: str) -> list[dict]:
  """The examples, each with probability `fraction` with its image under diffusion noise of a level drawn
  uniformly in [0, 1] (`noise_lib.diffusion_noise`); everything else (the scene, hence the labels) unchanged."""
  out = []
  for ex in examples:
    if rng.random() < fraction:
      key = jax.random.key(int(rng.integers(2**31)))
      ex = dict(ex, image=np.asarray(noise_lib.diffusion_noise(key, np.asarray(ex["image"]), float(rng.random()),
                                                               quantize=quantize)))
    out.append(ex)
  return out


def init_heads(dim: int) -> dict[str, jax.Array]:
  """Zero linear heads [D, classes] (a zero head starts at the uniform prediction)."""
  sizes = {name: len(scenes.CELL_CLASSES[name]) for name in CELL_HEADS} | {"background": NUM_BACKGROUNDS}
  return {name: jnp.zeros((dim, n), jnp.float32) for name, n in sizes.items()}


def loss_and_accuracy(visual, heads: dict[str, jax.Array], vision: host.VisionBatch, labels: dict[str, jax.Array],
                      occupied_weight: float = 1.0):
  """Summed cross-entropy of the heads, and accuracies.

  A cell's cross-entropy is a weighted mean over the real cells, an occupied cell weighing `occupied_weight`
  times an empty one: most of the 16 cells of a 112 px image are empty, and with equal weights the tower
  learns "empty", colour and size (first-order pixel statistics) but not shape. Cell accuracies count only
  cells that hold an object, background is per image. Returns (loss scalar, {name: accuracy scalar}).
  """
  features = jax.vmap(visual)(vision.pixel_values, vision.window_index, vision.reverse_index, vision.rope_ids,
                              vision.window_segment_ids, vision.full_segment_ids).astype(jnp.float32)  # [B, N, D]
  valid = labels["colour"] >= 0
  occupied = labels["colour"] > 0
  weight = jnp.where(occupied, occupied_weight, 1.0) * valid
  loss, accuracy = 0.0, {}
  for name in CELL_HEADS:
    logits = features @ heads[name]
    target = jnp.maximum(labels[name], 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    loss += (ce * weight).sum() / jnp.maximum(weight.sum(), 1)
    hit = logits.argmax(-1) == target
    accuracy[name] = (hit * occupied).sum() / jnp.maximum(occupied.sum(), 1)
  pooled = (features * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1)
  logits = pooled @ heads["background"]
  loss += optax.softmax_cross_entropy_with_integer_labels(logits, labels["background"]).mean()
  accuracy["background"] = (logits.argmax(-1) == labels["background"]).mean()
  return loss, accuracy


def pretrain_vision(model, train_examples, eval_examples, image_config, cfg: VisionPretrainConfig,
                    patch_buckets=None) -> dict[str, float]:
  """Trains `model.visual` (tower + merger) in place; returns the final loss and the eval accuracies."""
  graphdef, visual_state = nnx.split(model.visual)
  params = {"visual": visual_state, "heads": init_heads(model.config.vision.out_hidden_size)}
  warmup = min(cfg.warmup_steps, cfg.steps // 2)  # short runs (tests) still decay after their warmup
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1))
  optimizer = optax.adamw(schedule, weight_decay=0.0)
  opt_state = optimizer.init(params)

  def loss_fn(p, vision, labels):
    return loss_and_accuracy(nnx.merge(graphdef, p["visual"]), p["heads"], vision, labels, cfg.occupied_weight)

  @jax.jit
  def step(p, opt_state, vision, labels):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, vision, labels)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  def make_batch(i: int):
    rng = np.random.default_rng([cfg.seed, i])
    order = rng.choice(len(train_examples), cfg.batch_size, replace=len(train_examples) < cfg.batch_size)
    batch = corrupt_images([train_examples[j] for j in order], rng, cfg.noise_fraction, cfg.noise_quantize)
    return host_batch(batch, image_config, model.config, patch_buckets)

  loss = jnp.nan
  # Batch i depends only on (seed, i): a thread builds the next one while the device runs this step.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as prefetch:
    pending = prefetch.submit(make_batch, 0)
    for i in tqdm.trange(cfg.steps, desc="vision pretraining", disable=jax.process_index() != 0):
      batch = pending.result()
      if i + 1 < cfg.steps:
        pending = prefetch.submit(make_batch, i + 1)
      params, opt_state, loss = step(params, opt_state, *batch)
  nnx.update(model.visual, params["visual"])
  _, accuracy = jax.jit(loss_fn)(params, *host_batch(eval_examples[:cfg.eval_size], image_config, model.config,
                                                     patch_buckets))
  return {"loss": float(loss), **{f"eval_{name}_accuracy": float(v) for name, v in accuracy.items()}}
