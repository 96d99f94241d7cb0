"""SFT warm start: python experiments/sft.py --config=configs/sft.py:tiny [--config.x.y=value ...]"""

import os
import sys

from absl import app, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from noisygrpo_jax.training import loops  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", "configs/sft.py:tiny", "Run configuration.",
                                         lock_config=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  loops.run_sft(CONFIG.value)


if __name__ == "__main__":
  app.run(main)
