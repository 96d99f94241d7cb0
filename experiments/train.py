"""RL training: python experiments/train.py --config=configs/noisygrpo.py:tiny [--config.x.y=value ...]"""

import cli

from noisygrpo_jax.training import loops

if __name__ == "__main__":
  cli.main("configs/noisygrpo.py:tiny", loops.run_rl)
