"""Host seconds per RL step that the device waits for: each step's rollout inputs (noise at native resolution,
image processing, prompts, collation; `rollouts.prepare_rollouts`) made in line, or in a background thread during
the step before (`data.prefetch_rollouts`, the default).

- tiny: `experiments/train.py` with configs/noisygrpo.py:tiny, STEPS steps each way; mean `time/host` (the seconds
  the step waited for its inputs), `time/host_work` (the seconds making them took) and `time/step` over the steps
  after the first two (compiles).
- 3B-like image mix: the qwen2_5_vl_3b preset's rollout inputs (16 prompts x G = 4, noise levels (0, .3, .6, .9),
  its buckets and the real Qwen2.5 tokenizer) for images drawn from bench_buckets' mix (224^2 to 1536^2, aspect
  1:3 to 3:1): the host work per step, which the background thread hides behind a device step at least as long.

  python experiments/bench/bench_host.py [--markdown BENCHMARKS.md] [--steps 12]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_buckets import image_mix  # noqa: E402
from common import REPO, command_line, machine, write_markdown  # noqa: E402

import jax  # noqa: E402

from configs import noisygrpo  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import config as model_config  # noqa: E402
from noisygrpo_jax.processing import tokenizer as tokenizer_lib  # noqa: E402
from noisygrpo_jax.training import rollouts, setup  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_host:begin -->", "<!-- bench_host:end -->"


def tiny_run(workdir: str, prefetch: bool, steps: int) -> dict[str, float]:
  """Mean time/host, time/host_work and time/step of a tiny RL run, over its steps after the first two."""
  args = [sys.executable, str(REPO / "experiments" / "train.py"), "--config=configs/noisygrpo.py:tiny",
          f"--config.train.workdir={workdir}", f"--config.train.steps={steps}", "--config.train.eval_every=0",
          f"--config.data.prefetch_rollouts={prefetch}", "--config.data.train_size=200", "--config.data.eval_size=8"]
  subprocess.run(args, check=True, cwd=REPO, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [r for r in map(json.loads, f) if "time/host" in r][2:]
  return {k: float(np.mean([r[k] for r in records])) for k in ("time/host", "time/host_work", "time/step")}


def mix_host_seconds(steps: int, seed: int = 0) -> list[float]:
  """Seconds of `prepare_rollouts` per step for the 3B preset on images from the bucket benchmark's mix."""
  config = noisygrpo.get_config("qwen2_5_vl_3b")
  vision = model_config.qwen2_5_vl_3b().vision
  tokenizer = tokenizer_lib.qwen2_5_tokenizer()
  with config.unlocked():
    config.rl.reward_rules = "project"  # the rewards are not run here; no sentence model is needed
  cfg = setup.rollout_config(config, tokenizer, vision)
  rng = np.random.default_rng(seed)
  sizes = image_mix()
  seconds = []
  for step in range(steps):
    examples = [{"id": i, "image": rng.integers(0, 256, sizes[j] + (3,), dtype=np.uint8),
                 "problem": "What is shown in the image?", "solution": "a chart"}
                for i, j in enumerate(rng.choice(len(sizes), config.train.prompts_per_step))]
    start = time.perf_counter()
    rollouts.prepare_rollouts(tokenizer, cfg, model_config.qwen2_5_vl_3b(), examples, jax.random.key(step), step,
                              config.train.steps)
    seconds.append(time.perf_counter() - start)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--markdown", default="", help="write the section into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--steps", type=int, default=12, help="tiny RL steps per run")
  parser.add_argument("--mix-steps", type=int, default=3, help="3B-like steps of rollout inputs")
  parser.add_argument("--quick", action="store_true", help="fewer steps")
  args = parser.parse_args()
  steps, mix_steps = (6, 1) if args.quick else (args.steps, args.mix_steps)
  with tempfile.TemporaryDirectory() as tmp:
    tiny = {prefetch: tiny_run(os.path.join(tmp, str(prefetch)), prefetch, steps) for prefetch in (False, True)}
  mix = mix_host_seconds(mix_steps)
  lines = ["| run | rollout inputs | host s the step waited (`time/host`) | host work s (`time/host_work`) | "
           "step s |", "|---|---|---|---|---|"]
  for prefetch, r in tiny.items():
    lines.append(f"| tiny, {steps - 2} steps after 2 | {'background thread' if prefetch else 'in line'} | "
                 f"{r['time/host']:.3f} | {r['time/host_work']:.3f} | {r['time/step']:.3f} |")
  lines.append(f"| 3B preset, 16 prompts x 4, image mix | in line: all of it; background: what exceeds the device "
               f"step | | {np.mean(mix):.2f} (min {min(mix):.2f}, max {max(mix):.2f}, {len(mix)} steps) | |")
  print("\n".join(lines))
  if args.markdown:
    section = "\n".join([
        "## Host work per RL step: in line or in a background thread", "",
        f"`{command_line('bench_host.py')}`. " + __doc__.split("\n\n")[0].replace("\n", " "), machine(), "", *lines])
    write_markdown(Path(args.markdown), section, MD_BEGIN, MD_END)


if __name__ == "__main__":
  main()
