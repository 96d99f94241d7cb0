"""The embedded default (`make train`) and the method comparison (`make compare`).

  python experiments/default_run.py                       # SFT warm start -> NoisyGRPO -> eval, plots, summary
  python experiments/default_run.py --methods=noisygrpo,grpo,noise_only --seeds=0,1,2 --out=results/compare

Every RL run starts from the same cached SFT warm start (<root>/sft) and is budget-matched: same prompts
(data order depends on the seed only), group size, completion budget and steps.
"""

import os
import sys
import time

from absl import app, flags, logging

import cli  # noqa: F401  (puts configs/ and the repository on sys.path)
import grpo  # noqa: E402
import noisygrpo  # noqa: E402
import sft  # noqa: E402

from noisygrpo_jax.evaluation import report  # noqa: E402
from noisygrpo_jax.training import loops  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "workdir/default", "Where the warm start and the RL runs live.")
flags.DEFINE_string("out", "", "Where plots and the summary go (default: the root).")
flags.DEFINE_list("methods", ["noisygrpo"], "noisygrpo | grpo | noise_only (noise, GRPO advantage).")
flags.DEFINE_list("seeds", ["42"], "RL seeds; each method runs once per seed.")
flags.DEFINE_integer("rl_steps", 0, "RL steps (0 = the tiny preset's).")

EVAL_SPLITS = ("test", "ood", "hallucination", "robustness")


def rl_config(method: str, seed: int, workdir: str, warm_start: str):
  c = {"noisygrpo": noisygrpo, "grpo": grpo, "noise_only": noisygrpo}[method].get_config("tiny")
  with c.unlocked():
    if method == "noise_only":
      c.rl.advantage = "grpo"
    c.train.seed = seed
    c.train.workdir = workdir
    c.train.init_from = warm_start
    c.train.eval_splits = EVAL_SPLITS
    c.data.data_dir = os.path.join(FLAGS.root, "data")
    if FLAGS.rl_steps:
      c.train.steps = FLAGS.rl_steps
      c.train.eval_every = FLAGS.rl_steps
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  out = FLAGS.out or FLAGS.root
  os.makedirs(out, exist_ok=True)
  warm = sft.get_config("tiny")
  with warm.unlocked():
    warm.train.workdir = os.path.join(FLAGS.root, "sft")
    warm.data.data_dir = os.path.join(FLAGS.root, "data")
    warm.train.eval_every = 0
  loops.run_sft(warm)  # resumes, so a finished warm start is reused as is

  runs, finals = {}, {}
  for method in FLAGS.methods:
    for seed in map(int, FLAGS.seeds):
      workdir = os.path.join(FLAGS.root, f"{method}_seed{seed}")
      config = rl_config(method, seed, workdir, warm.train.workdir)
      loops.run_rl(config)
      records = report.load_run(workdir)
      runs[f"{method} seed {seed}"] = records
      finals.setdefault(method, []).append(report.eval_at(records, config.train.steps))
      before = report.eval_at(records, 0)
  plot = report.plot_runs(runs, os.path.join(out, "curves.png"), EVAL_SPLITS)
  minutes = (time.time() - start) / 60
  lines = [f"# {', '.join(FLAGS.methods)} on shapes_vqa (tiny preset)", "",
           f"Command: `python {' '.join(sys.argv)}`; wall time {minutes:.1f} min.", "",
           "Warm start (SFT) vs after RL, last run:", "", report.summary_table(before, finals[method][-1], EVAL_SPLITS),
           "", "Final accuracy, mean +- std over seeds:", "", report.mean_std_table(finals, EVAL_SPLITS), "",
           f"Curves: {os.path.basename(plot)}"]
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
