"""Compile time of the RL step's programs at the full Qwen2.5-VL-3B shape: scanned layers against unrolled ones.

The four programs of an RL step (prefill, the decode loop, the reference log-probs, the train step with remat) at the
3B shape (36 decoder layers, 32 vision blocks, full widths and vocabulary) in the real presets' dtype policy (float32
master weights, bfloat16 compute, frozen bf16 vision tower), each lowered and compiled on the CPU with abstract
inputs (`jax.jit(...).lower(ShapeDtypeStructs).compile()`: no weight is materialised), with `model.scan_layers` True
(one `lax.scan` over the stacked layers) and False (the same weights unrolled layer by layer, as every program was
before the layers were stacked). Prefill and the decode loop run, in both, from the decoder layers unstacked, as
`sampler.generate` and the trainer's rollout copy hold them (bench_memory.lowered_programs; one array per layer,
the decoder unrolled), so only their vision tower changes between the two layouts. Seconds are wall time for
trace + lower + compile, one program at a time.

Usage: python experiments/bench/bench_compile.py [--markdown BENCHMARKS.md] [--smoke] [--layouts scan,unrolled]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_memory import Case, lowered_programs  # noqa: E402
from common import command_line, machine, write_markdown  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import config as cfg  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_compile:begin -->", "<!-- bench_compile:end -->"
LAYOUTS = {"unrolled": False, "scan": True}  # label -> model.scan_layers
# 2 prompts x 4 rollouts, ~450-token prompts around a 32 x 32-patch image (256 image tokens), 256 new tokens.
CASE = Case(prompts=2, group_size=4, text_len=(96, 97), grid=(1, 32, 32), new_tokens=256, micro_batches=1,
            layers=36)
SMOKE_CASE = Case(prompts=2, group_size=4, text_len=(4, 8), grid=(1, 8, 8), new_tokens=8, micro_batches=1, layers=2)


def compile_seconds(config, case: Case) -> dict[str, float]:
  """program -> seconds to trace, lower and compile it (bfloat16 compute, float32 master weights)."""
  programs, _ = lowered_programs(config, case, "bfloat16")
  seconds = {}
  for name, lower in programs.items():
    start = time.perf_counter()
    lower().compile()
    seconds[name] = time.perf_counter() - start
    print(f"  {name}: {seconds[name]:.1f} s", flush=True)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--markdown", default="", help="write the section into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--smoke", action="store_true", help="the tiny model: checks the script on CPU in seconds")
  parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: unrolled, scan")
  args = parser.parse_args()
  base = cfg.tiny(remat=True) if args.smoke else cfg.qwen2_5_vl_3b(dtype="float32", remat=True)
  case = SMOKE_CASE if args.smoke else CASE
  results = {}
  for layout in args.layouts.split(","):
    print(f"{layout}:", flush=True)
    results[layout] = compile_seconds(base.replace(scan_layers=LAYOUTS[layout]), case)

  layouts = list(results)
  header = "| program | " + " | ".join(f"{layout} (s)" for layout in layouts) + " |"
  if len(layouts) == 2:
    header += f" {layouts[0]} / {layouts[1]} |"
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for program in results[layouts[0]]:
    row = [results[layout][program] for layout in layouts]
    lines.append(f"| {program} | " + " | ".join(f"{s:.1f}" for s in row) + " |" +
                 (f" {row[0] / row[1]:.1f}x |" if len(row) == 2 else ""))
  t, v = base.text, base.vision
  rows = case.prompts * case.group_size
  intro = (f"Model: {'tiny (smoke)' if args.smoke else 'Qwen2.5-VL-3B'} ({t.num_hidden_layers} decoder layers, "
           f"{v.depth} vision blocks, hidden {t.hidden_size}, vocabulary {t.vocab_size}); {rows} rows "
           f"({case.prompts} prompts x {case.group_size}), {case.grid[1] * case.grid[2]} patches per image, "
           f"{case.new_tokens} new tokens; float32 master weights, bfloat16 compute, remat.")
  print("\n".join([intro, "", *lines]))
  if args.markdown:
    section = "\n".join([
        "## Compile time: scanned layers against unrolled ones", "",
        f"`{command_line('bench_compile.py')}`: each program of an RL step lowered and compiled on the CPU with "
        "abstract inputs (nothing allocated); seconds of trace + lower + compile, one program at a time. `scan`: "
        "model.scan_layers=True (the default; one lax.scan over the stacked decoder layers, one over the vision "
        "blocks); `unrolled`: the same weights layer by layer, the programs as they were before the layers were "
        "stacked.", machine(), "", intro, "", *lines])
    write_markdown(Path(args.markdown), section, MD_BEGIN, MD_END)


if __name__ == "__main__":
  main()
