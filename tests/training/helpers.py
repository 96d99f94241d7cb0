"""A small constructed RL batch on the tiny model (shared by the training tests and their subprocesses)."""

import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg
from noisygrpo_jax.sampling import sampler as S
from noisygrpo_jax.training import batches
from noisygrpo_jax.training import optimizer as opt_lib
from noisygrpo_jax.training import params as params_lib
from noisygrpo_jax.training import train_step as ts
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()


def model_and_prompts(n: int = 8, seed: int = 0, group_size: int = 1):
  """(model, PromptBatch of n rows, the numpy generator that drew them): n / group_size left-padded prompts with one
  image each, each prompt (ids, positions and image) in group_size consecutive rows as rollouts.generate_rollouts
  builds them."""
  model = Qwen25VL(CONFIG, nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  grids = [(1, 4, 4 + 2 * (i % 2)) for i in range(n // group_size)]
  ids, mask = ref.left_pad([ref.prompt(CONFIG, rng, [("image", g)], (2, 6)) for g in grids])
  pixels = np.split(ref.pixels(rng, grids, CONFIG), np.cumsum([np.prod(g) for g in grids])[:-1])
  rows = np.repeat(np.arange(len(grids)), group_size)
  prompts = S.prompts_from_hf(model, ids[rows], mask[rows], pixel_values=np.concatenate([pixels[i] for i in rows]),
                              image_grid_thw=np.array(grids)[rows])
  return model, prompts, rng


def model_and_batch(n: int = 8, m: int = 6, seed: int = 0, group_size: int = 1):
  """`model_and_prompts`' n rows with random completions of different lengths."""
  model, prompts, rng = model_and_prompts(n, seed, group_size)
  tokens = rng.integers(0, CONFIG.text.vocab_size - 8, (n, m))
  completion_mask = np.ones((n, m), np.float32)
  for i in range(n):
    completion_mask[i, 2 + i % (m - 2):] = 0  # completions of different lengths
  batch = batches.token_batch(prompts, tokens, completion_mask, advantages=rng.standard_normal(n))
  return model, batch


def setup_state(model, loss_cfg=ts.LossConfig(), freeze_vision=True, lr=1e-2, micro_batches=1, optimizer=None):
  """AdamW (or the given optax optimizer) over the model's trainable parameters and the un-jitted step; the frozen
  ones (training.params.partition) are cast to loss_cfg.compute_dtype as a run keeps them."""
  graphdef, state = nnx.split(model)
  trainable, frozen = params_lib.partition(nnx.to_pure_dict(state), freeze_vision)
  optimizer = optimizer or opt_lib.make_optimizer(opt_lib.learning_rate_schedule(lr, total_steps=10))
  step = ts.make_train_step(graphdef, optimizer, loss_cfg, micro_batches)
  train_state = ts.TrainState(step=np.int32(0), params=trainable, opt_state=optimizer.init(trainable),
                              frozen=params_lib.cast(frozen, loss_cfg.compute_dtype))
  return graphdef, state, optimizer, step, train_state


def full_params(train_state) -> dict:
  """The full parameter tree of a TrainState (trainable and frozen)."""
  return params_lib.combine(train_state.params, train_state.frozen)
