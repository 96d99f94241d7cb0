"""Images per second from a 640x480 JPEG on disk to model inputs (pixel_values + image_grid_thw).

Ours (`noisygrpo_jax.processing.image.process_image`) against HF's `Qwen2VLImageProcessor` (PIL backend, the
one transformers uses without torchvision), same machine, same settings (min_pixels=3136,
max_pixels=1003520, bicubic), one image per call, interleaved repeats; the median of the repeats is reported.

  python experiments/bench/bench_processing.py [--iterations 50] [--repeats 5] [--quick] [--markdown BENCHMARKS.md]
                                               [--json out.json]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.Image  # noqa: E402

from noisygrpo_jax.processing import image as ip  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import command_line, load_average, machine, summary_row, write_json, write_markdown  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_processing:begin -->", "<!-- bench_processing:end -->"
TARGET = 1.0  # ours at least as fast as HF


def _photo_like(height: int, width: int) -> PIL.Image.Image:
  """Smooth colour gradients plus mild noise: JPEG-compresses and decodes like a photograph."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:height, 0:width]
  rgb = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), (x + 2 * y) % 256], -1)
  return PIL.Image.fromarray(np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8))


def _rate(fn, iterations: int) -> tuple[float, float]:
  """(images per second of wall time, images per second of this process's CPU time)."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(iterations):
    fn()
  return iterations / (time.perf_counter() - wall), iterations / (time.process_time() - cpu)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iterations", type=int, default=50, help="images per timed run")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median reported)")
  parser.add_argument("--quick", action="store_true", help="3 timed runs of 30 images")
  parser.add_argument("--markdown", help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--json", help="write summary rows for bench_all.py here")
  args = parser.parse_args()
  if args.quick:
    args.iterations, args.repeats = 30, 3
  load_before = load_average()

  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  hf = Qwen2VLImageProcessorPil()
  config = ip.ImageProcessorConfig()
  assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (config.min_pixels, config.max_pixels)

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "photo.jpg")
    _photo_like(480, 640).save(path, quality=90)
    in_memory = PIL.Image.open(path)
    in_memory.load()

    def ours_path():
      return ip.process_image(path, config)

    def hf_path():
      return hf(path, return_tensors="np")

    def ours_pil():
      return ip.process_image(in_memory, config)

    def hf_pil():
      return hf(in_memory, return_tensors="np")

    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      a, b = ours_path(), hf_path()
      assert np.array_equal(a.image_grid_thw, b["image_grid_thw"])
      max_diff = float(np.max(np.abs(a.pixel_values - b["pixel_values"])))
      rates = {name: [] for name in ("ours_path", "hf_path", "ours_pil", "hf_pil")}
      fns = {"ours_path": ours_path, "hf_path": hf_path, "ours_pil": ours_pil, "hf_pil": hf_pil}
      for fn in fns.values():
        fn()
      for _ in range(args.repeats):  # interleaved, so load changes on the machine hit both alike
        for name, fn in fns.items():
          rates[name].append(_rate(fn, args.iterations))

  wall = {k: statistics.median(r[0] for r in v) for k, v in rates.items()}
  wmin = {k: min(r[0] for r in v) for k, v in rates.items()}
  wmax = {k: max(r[0] for r in v) for k, v in rates.items()}
  cpu = {k: statistics.median(r[1] for r in v) for k, v in rates.items()}
  print(f"640x480 JPEG -> pixel_values {tuple(a.pixel_values.shape)} float32, grid {a.image_grid_thw.tolist()}; "
        f"max |ours - HF| = {max_diff:.1e}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"median of {args.repeats} x {args.iterations}")
  print("images per second of wall time (and of CPU time, steadier on a busy machine):")
  print(f"{'input':<20}{'ours':>10}{'HF':>10}{'ours/HF':>10}{'ours cpu':>10}{'HF cpu':>10}{'ratio':>8}")
  lines = ["| input | ours images/s: wall median (min, max) | HF images/s: wall median (min, max) | ours / HF (wall) "
           "| ours / HF (CPU time) | target (>= 1x) |", "|---|---|---|---|---|---|"]
  rows = []
  for label, key in (("JPEG path on disk", "path"), ("decoded PIL image", "pil")):
    o, h, oc, hc = wall[f"ours_{key}"], wall[f"hf_{key}"], cpu[f"ours_{key}"], cpu[f"hf_{key}"]
    print(f"{label:<20}{o:>10.1f}{h:>10.1f}{o / h:>10.2f}{oc:>10.1f}{hc:>10.1f}{oc / hc:>8.2f}")
    span = lambda name: f"{wall[name]:.1f} ({wmin[name]:.1f}, {wmax[name]:.1f})"
    lines.append(f"| {label} | {span(f'ours_{key}')} | {span(f'hf_{key}')} | {o / h:.2f}x | {oc / hc:.2f}x "
                 f"| {'met' if o / h >= TARGET else 'MISSED'} |")
    rows.append(summary_row("processing", label, "images/s (HF Qwen2VLImageProcessorPil)", o, h, "img/s",
                            higher_is_better=True, target=TARGET))
  command = command_line("bench_processing.py")
  section = "\n".join([
      "## Image processing on CPU: ours vs transformers' Qwen2VLImageProcessor (PIL), one 640x480 JPEG", "",
      machine(pillow=PIL.__version__), f"- command: `{command}`",
      f"- 1-minute load average before / after: {load_before:.1f} / {load_average():.1f}",
      f"- output: pixel_values {tuple(a.pixel_values.shape)} float32, grid {tuple(a.image_grid_thw[0].tolist())}; "
      f"max |ours - HF| = {max_diff:.1f}; median of {args.repeats} timed runs x {args.iterations} images, the "
      "implementations in turns", "", *lines])
  if args.markdown:
    write_markdown(Path(args.markdown), section, MD_BEGIN, MD_END)
  write_json(args.json, rows, command=command)


if __name__ == "__main__":
  main()
