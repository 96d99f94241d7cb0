"""Supervised warm start: teacher-forced cross-entropy on the reference chains of thought.

The RL configs start from it with --config.train.init_from=<this run's workdir>.
"""

import noisygrpo


def get_config(arg: str = "tiny"):
  c = noisygrpo.get_config(arg)
  c.unlock()
  c.train.workdir = c.train.workdir.replace("noisygrpo_", "sft_")
  c.optim.learning_rate = 1e-3 if arg == "tiny" else 1e-5
  c.optim.warmup_steps = 10
  c.train.steps = 150 if arg == "tiny" else 1000
  c.train.eval_every = 50 if arg == "tiny" else 250
  c.train.checkpoint_every = 50 if arg == "tiny" else 250
  c.lock()
  return c
