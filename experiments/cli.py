"""The shared command line of the entry points: an ml_collections config file plus --config.x.y overrides."""

import os
import sys

from absl import app, logging
from ml_collections import config_flags

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "configs"), ROOT]


def main(default_config: str, run) -> None:
  """Parses --config (locked, so a misspelled override fails naming the field) and calls run(config)."""
  config = config_flags.DEFINE_config_file("config", default_config, "Run configuration.", lock_config=True)

  def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    run(config.value)

  app.run(_main)
