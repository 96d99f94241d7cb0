"""Helpers shared by the benchmark scripts: model slices, interleaved timing, machine description, load
average, peak memory and the BENCHMARKS.md section writer."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import flax  # noqa: E402
import jax  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import config as cfg  # noqa: E402


def slice_3b(vocab_size: int) -> cfg.Qwen25VLConfig:
  """3B widths with 2 decoder layers and 2 vision blocks (0 windowed, 1 full), as test_parity."""
  base = cfg.qwen2_5_vl_3b()
  return base.replace(
      vision=dataclasses.replace(base.vision, depth=2, fullatt_block_indexes=(1,)),
      text=dataclasses.replace(base.text, num_hidden_layers=2, vocab_size=vocab_size),
      image_token_id=vocab_size - 1, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
      vision_end_token_id=vocab_size - 4)


def timed(fns: dict, warmup: int, repeats: int) -> dict[str, dict[str, list[float]]]:
  """Wall-clock and process CPU seconds of `repeats` calls of each function after `warmup` untimed ones.

  The functions take turns in every round, so load from other processes falls on all of them alike. CPU
  time (all threads of this process) barely changes when other processes compete for the cores, while
  wall time grows; both are reported.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: {"wall": [], "cpu": []} for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      times[name]["wall"].append(time.perf_counter() - wall)
      times[name]["cpu"].append(time.process_time() - cpu)
  return times


class Stopwatch:
  """Wall-clock and process CPU seconds since construction (or the last `lap`)."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def lap(self) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = (wall - self.wall, cpu - self.cpu)
    self.wall, self.cpu = wall, cpu
    return out


def stats(values: list[float], scale: float = 1.0) -> dict[str, float]:
  """median / min / max of `values` times `scale`."""
  return {"median": scale * statistics.median(values), "min": scale * min(values), "max": scale * max(values)}


def load_average() -> float:
  """The 1-minute load average (compare with the number of cores: above it, processes wait for a core)."""
  return os.getloadavg()[0]


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
  """Peak resident set size in GB (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(who).ru_maxrss * 1024 / 1e9


def machine(**extra_versions: str) -> str:
  """Two markdown bullet lines: CPU model and cores, jax backend; package versions."""
  with open("/proc/cpuinfo") as f:
    names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
  versions = {"jax": jax.__version__, "flax": flax.__version__}
  for name in ("torch", "transformers"):
    module = sys.modules.get(name)
    if module is not None:
      versions[name] = module.__version__
  versions.update(extra_versions)
  return (f"- machine: {names[0] if names else platform.processor()}, {len(os.sched_getaffinity(0))} cores "
          f"available, jax backend {jax.default_backend()}\n- versions: python {platform.python_version()}, "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))


def write_markdown(path: Path, section: str, begin: str, end: str) -> None:
  """Replaces the section of `path` between the markers `begin` and `end`, or appends it."""
  block = f"{begin}\n{section}\n{end}"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if begin in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(text)
