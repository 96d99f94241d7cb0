"""Supervised warm start: teacher-forced cross-entropy on the reference chains of thought.

The RL configs start from it with --config.train.init_from=<this run's workdir>.
"""

import ml_collections
import noisygrpo


def get_config(arg: str = "tiny"):
  c = noisygrpo.get_config(arg)
  c.unlock()
  c.train.workdir = c.train.workdir.replace("noisygrpo_", "sft_")
  c.optim.learning_rate = 1e-3 if arg == "tiny" else 1e-5
  c.optim.warmup_steps = 10
  c.train.steps = 250 if arg == "tiny" else 1000
  if arg == "tiny":
    c.train.prompts_per_step = 32  # 250 x 32 = 4 epochs of the 2,000 training examples
  c.train.eval_every = 250
  c.train.checkpoint_every = 50 if arg == "tiny" else 250
  # Dense vision pretraining before the first SFT step (training/vision_pretrain.py): the tiny preset has no
  # pretrained vision tower; a real checkpoint keeps its own (0 skips the stage).
  c.vision_pretrain = ml_collections.ConfigDict()
  c.vision_pretrain.steps = 700 if arg == "tiny" else 0
  c.vision_pretrain.batch_size = 64
  c.vision_pretrain.learning_rate = 2e-3
  c.vision_pretrain.warmup_steps = 20
  c.vision_pretrain.eval_size = 128
  # Half the pretraining images under the RL's diffusion noise (uniform level, clean labels): a pretrained encoder's
  # robustness, so that noisy rollouts get fluent answers rather than word salad.
  c.vision_pretrain.noise_fraction = 0.5
  c.vision_pretrain.noise_quantize = c.rl.noise.quantize
  # Most cells are empty; weighting the occupied ones 6x is what lets the tower learn shape, not only colour and
  # size (tiny preset, test cells, occupied-cell shape accuracy: 0.23 after 300 steps unweighted, 0.33 weighted,
  # 0.65 after 900 weighted steps).
  c.vision_pretrain.occupied_weight = 6.0
  c.lock()
  return c
