"""Evaluate a run's latest checkpoint on dataset splits or on a local benchmark copy.

  python experiments/evaluate.py --config=configs/noisygrpo.py:tiny --config.train.workdir=workdir/default/noisygrpo_seed42
  python experiments/evaluate.py --config=... --benchmark=pope --path=/data/pope/coco_pope_random.json --image_root=/data/coco
"""

import json
import os

from absl import flags

import cli
from noisygrpo_jax.evaluation import benchmark_loaders, evaluate
from noisygrpo_jax.training import loops, setup

flags.DEFINE_list("splits", ["test", "ood", "hallucination", "robustness"], "Dataset splits to evaluate.")
flags.DEFINE_enum("benchmark", "", ["", "mmstar", "pope", "amber"], "A local benchmark instead of the splits.")
flags.DEFINE_string("path", "", "Benchmark file: MMStar TSV/parquet, a POPE JSONL, or AMBER's query JSON.")
flags.DEFINE_string("annotations", "", "AMBER annotations JSON.")
flags.DEFINE_string("image_root", "", "Folder of the benchmark's images (POPE, AMBER).")
FLAGS = flags.FLAGS


def run(config):
  trained = loops.Run(config, "eval")  # restores the latest checkpoint of train.workdir
  if FLAGS.benchmark:
    examples = {"mmstar": lambda: benchmark_loaders.load_mmstar(FLAGS.path),
                "pope": lambda: benchmark_loaders.load_pope(FLAGS.path, FLAGS.image_root),
                "amber": lambda: benchmark_loaders.load_amber(FLAGS.path, FLAGS.annotations, FLAGS.image_root)}
    params = setup.sampling_params(config, trained.tokenizer, greedy=True)
    model = trained.model()
    # The run's batch rows split over its mesh; benchmark prompts pad to their batch's longest, not the data buckets.
    batching = trained.eval_batching()
    results = {f"eval/{FLAGS.benchmark}/{k}": v for k, v in evaluate.evaluate_split(
        model, trained.tokenizer, examples[FLAGS.benchmark](), params, setup.image_config(config, model.config.vision),
        batch_size=batching["batch_size"], place=batching["place"]).items()}
  else:
    results = trained.evaluate(FLAGS.splits)
  print(json.dumps({"step": trained.step, **results}, indent=2))
  with open(os.path.join(config.train.workdir, f"eval_step{trained.step}.json"), "w") as f:
    json.dump({"step": trained.step, **results}, f, indent=2)


if __name__ == "__main__":
  cli.main("configs/noisygrpo.py:tiny", run)
