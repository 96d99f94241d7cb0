"""The budget-matched GRPO baseline: G = 4 rollouts of the clean image, group z-score advantages.

Everything else (data, model, sampler, optimizer, steps) equals configs/noisygrpo.py for the same preset.
"""

import noisygrpo


def get_config(arg: str = "tiny"):
  c = noisygrpo.get_config(arg)
  c.unlock()
  c.rl.noise.enabled = False
  c.rl.advantage = "grpo"
  c.train.workdir = c.train.workdir.replace("noisygrpo_", "grpo_")
  c.lock()
  return c
