"""SFT warm start: python experiments/sft.py --config=configs/sft.py:tiny [--config.x.y=value ...]"""

import cli

from noisygrpo_jax.training import loops

if __name__ == "__main__":
  cli.main("configs/sft.py:tiny", loops.run_sft)
