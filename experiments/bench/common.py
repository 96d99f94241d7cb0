"""Helpers shared by the benchmark scripts: model slices, synthetic train batches, interleaved timing, machine
description, load average, peak memory, the machine's measured matmul peak and memory bandwidth (the denominators of
every utilisation figure), the BENCHMARKS.md section writer and the JSON summary rows `bench_all.py` collects."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import config as cfg  # noqa: E402


def slice_3b(vocab_size: int) -> cfg.Qwen25VLConfig:
  """3B widths with 2 decoder layers and 2 vision blocks (0 windowed, 1 full), as test_parity."""
  base = cfg.qwen2_5_vl_3b()
  return base.replace(
      vision=dataclasses.replace(base.vision, depth=2, fullatt_block_indexes=(1,)),
      text=dataclasses.replace(base.text, num_hidden_layers=2, vocab_size=vocab_size),
      image_token_id=vocab_size - 1, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
      vision_end_token_id=vocab_size - 4)


def train_batch(config, rows: int, grid, text_len, completion: int, seed: int = 0):
  """A TokenBatch of `rows` rows: left-padded prompt (text, one image, text) + a random completion, with
  advantages and reference log-probs (numpy, host side); the pixels are uint8 levels, as the trainer's batches carry
  them (`setup.image_config`). Imports its helpers when called: the prompt layout of
  tests/models/hf_reference.py needs torch, which bench_gpu.py (importing this module) must not."""
  from noisygrpo_jax.models.qwen2_5_vl import host
  from noisygrpo_jax.processing.collate import PromptBatch
  from noisygrpo_jax.training import batches
  from tests.models import hf_reference as ref
  rng = np.random.default_rng(seed)
  ids, mask = ref.left_pad([ref.prompt(config, rng, [("image", grid)], text_len) for _ in range(rows)])
  grids = np.asarray([grid] * rows, np.int64)
  pv = rng.integers(0, 256, (rows * int(np.prod(grid)), config.vision.patch_dim), dtype=np.uint8)
  position_ids, rope_deltas = host.mrope_position_ids(ids, config, mask, grids)
  rows_vision = [([x], [tuple(g)]) for x, g in zip(np.split(pv, rows), grids)]
  vision = host.pack_vision_batch(rows_vision, config.vision, int(np.prod(grid)))
  prompts = PromptBatch(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                        position_ids=position_ids, rope_deltas=rope_deltas, vision=vision)
  tokens = rng.integers(0, config.text.vocab_size - 8, (rows, completion))
  return batches.token_batch(prompts, tokens, np.ones((rows, completion), np.float32),
                             advantages=rng.standard_normal(rows).astype(np.float32),
                             ref_logps=-rng.random((rows, completion)).astype(np.float32))


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


# ------------------------------------------------------------------------------------------------
# Machine ceilings: the denominators of the utilisation figures, measured in the same run


def matmul_peak(sizes=(2048, 4096), repeats: int = 5, dtype=jnp.float32) -> dict[str, float]:
  """The best FLOP/s of a jitted square `jnp.dot` on the default device.

  For each n in `sizes`: an n x n x n product (2 n^3 FLOPs), `repeats` timed calls after a compiling one;
  the best call over all sizes is the peak. Returns {"flops_per_s", "n"} (the size that reached it).
  """
  best, best_n = 0.0, 0
  dot = jax.jit(jnp.dot)
  for n in sizes:
    a = jnp.asarray(np.random.default_rng(n).standard_normal((n, n)), dtype)
    dot(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      dot(a, a).block_until_ready()
      rate = 2 * n**3 / (time.perf_counter() - start)
      if rate > best:
        best, best_n = rate, n
    del a
  return {"flops_per_s": best, "n": best_n}


def _best_seconds(fn, repeats: int) -> float:
  """Best wall seconds of `repeats` calls of fn() (which blocks until its result is ready)."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
  """Streaming memory bandwidth of the default device in bytes/s, best of `repeats` each, three ways.

  sum: a jitted `jnp.sum` of a float32 array of `megabytes` (bytes read / s; XLA:CPU reduces it on one thread);
  gemv: a jitted float32 matrix-vector product with a square matrix of `megabytes` (matrix bytes / s; threaded,
  and the access pattern of a decode step's weight reads); copy: a jitted, donated `x + 1` in place (bytes read +
  written / s; donation reuses the buffer, so no page faults of a fresh allocation are timed). The arrays are far
  larger than any CPU cache. "best" is the highest of the three: the ceiling used for utilisation.
  """
  side = int((megabytes * 1024 * 1024 // 4) ** 0.5)
  x = jnp.ones((side, side), jnp.float32)
  v = jnp.ones((side,), jnp.float32)
  nbytes = x.nbytes
  total, gemv = jax.jit(jnp.sum), jax.jit(jnp.dot)
  bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  out = {}
  jax.block_until_ready(total(x))
  out["sum"] = nbytes / _best_seconds(lambda: jax.block_until_ready(total(x)), repeats)
  jax.block_until_ready(gemv(x, v))
  out["gemv"] = nbytes / _best_seconds(lambda: jax.block_until_ready(gemv(x, v)), repeats)
  holder = [jax.block_until_ready(bump(x))]
  del x

  def step():
    holder[0] = jax.block_until_ready(bump(holder[0]))

  out["copy"] = 2 * nbytes / _best_seconds(step, repeats)
  out["best"] = max(out.values())
  return out


def machine_ceilings(quick: bool = False) -> dict[str, float]:
  """float32 matmul peak (FLOP/s) and memory bandwidth (bytes/s, three ways and the best), with the load average."""
  peak = matmul_peak(sizes=(2048,) if quick else (2048, 4096), repeats=3 if quick else 5)
  bandwidth = memory_bandwidth(megabytes=256 if quick else 512, repeats=3 if quick else 5)
  return {"matmul_flops_per_s": peak["flops_per_s"], "matmul_n": peak["n"],
          **{f"{k}_bytes_per_s": v for k, v in bandwidth.items()}, "load": load_average()}


def ceilings_line(before: dict, after: dict) -> str:
  """A markdown bullet with both measurements; the higher of each pair is the ceiling used."""
  gb = lambda key: f"{before[key] / 1e9:.1f} / {after[key] / 1e9:.1f}"
  return (f"- machine ceilings measured in this run, before / after (1-minute load {before['load']:.1f} / "
          f"{after['load']:.1f}): float32 matmul peak (jitted square jnp.dot, best over n = 2048, 4096) "
          f"{before['matmul_flops_per_s'] / 1e9:.0f} / {after['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; memory "
          f"bandwidth GB/s: jnp.sum read {gb('sum_bytes_per_s')}, float32 matrix-vector read {gb('gemv_bytes_per_s')}, "
          f"donated x + 1 read + write {gb('copy_bytes_per_s')}; the ceilings used are the highest of these "
          f"({best_ceilings(before, after)['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{best_ceilings(before, after)['best_bytes_per_s'] / 1e9:.1f} GB/s)")


def best_ceilings(*measurements: dict) -> dict[str, float]:
  """The highest matmul rate and bandwidth over several measurements."""
  return {k: max(m[k] for m in measurements) for k in ("matmul_flops_per_s", "best_bytes_per_s")}


# ------------------------------------------------------------------------------------------------
# Summary rows for bench_all.py


def summary_row(bench: str, case: str, metric: str, ours: float | None, theirs: float | None = None,
                unit: str = "", higher_is_better: bool = False, target: float | None = None,
                note: str = "") -> dict:
  """One row of the `make bench` summary: ours vs the baseline (`theirs`) on one metric.

  ratio: how many times better ours is (theirs / ours for times, ours / theirs for rates); met: whether the
  ratio reaches `target` (None when there is no target).
  """
  ratio = None
  if ours and theirs:
    ratio = ours / theirs if higher_is_better else theirs / ours
  met = None if target is None or ratio is None else bool(ratio >= target)
  return dict(bench=bench, case=case, metric=metric, ours=ours, theirs=theirs, unit=unit, ratio=ratio,
              target=target, met=met, note=note)


def command_line(script: str) -> str:
  """How this script was run, for the reports: `python experiments/bench/<script> <args>` without --json."""
  args, skip = [], False
  for arg in sys.argv[1:]:
    if skip or arg == "--json" or arg.startswith("--json="):
      skip = arg == "--json"
      continue
    args.append(shlex.quote(arg))
  return " ".join(["python", f"experiments/bench/{script}", *args])


def write_json(path: Path | None, rows: list[dict], **extra) -> None:
  """Writes {"rows": rows, "load": ..., **extra} to `path` (no-op without a path)."""
  if path is None:
    return
  Path(path).write_text(json.dumps({"rows": rows, **extra}, indent=1, default=float))
