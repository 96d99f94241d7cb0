"""Every CPU benchmark in one command (`make bench`): forward, generate, train step, end-to-end RL step vs TRL,
image processing, the buckets' padding waste; then one summary table.

Each script runs in its own process (so peak memory and compiled programs do not carry over), writes its own
section of BENCHMARKS.md (medians over repeated runs with min/max, machine, versions, command, load averages)
and a JSON file of summary rows; this runner prints those rows as one table and writes it as the
`bench_summary` section at the top of BENCHMARKS.md, with the time and load average around each script.

  python experiments/bench/bench_all.py [--quick] [--only forward,generate,train,e2e,processing,buckets]
                                        [--markdown BENCHMARKS.md]

--quick passes --quick to every script: fewer repeats (3 timed rounds, 1-2 warm-ups; e2e 1 + 3 RL steps), for a
loaded machine or a smoke run. The end-to-end benchmark needs TRL: `make bench-setup` installs
requirements-bench.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_average, machine  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_summary:begin -->", "<!-- bench_summary:end -->"
SCRIPTS = {"forward": "bench_forward.py", "generate": "bench_generate.py", "train": "bench_train.py",
           "e2e": "bench_e2e.py", "processing": "bench_processing.py", "buckets": "bench_buckets.py"}


def run_script(name: str, quick: bool, markdown: Path | None, out_dir: Path) -> dict:
  """Runs one benchmark script; returns its summary rows, exit code, wall seconds and load averages."""
  out = out_dir / f"{name}.json"
  flags = (["--quick"] if quick else []) + (["--markdown", str(markdown)] if markdown else [])
  cmd = [sys.executable, str(Path(__file__).parent / SCRIPTS[name]), *flags, "--json", str(out)]
  shown = " ".join(["python", f"experiments/bench/{SCRIPTS[name]}", *map(shlex.quote, flags)])
  print(f"\n=== {name}: {shown}", flush=True)
  load_before, start = load_average(), time.perf_counter()
  code = subprocess.run(cmd, cwd=REPO).returncode
  result = {"name": name, "command": shown, "code": code, "seconds": time.perf_counter() - start,
            "load": (load_before, load_average()), "rows": []}
  if out.exists():
    result["rows"] = json.loads(out.read_text())["rows"]
  return result


def fmt(value, unit: str) -> str:
  if value is None:
    return ""
  if unit == "fraction":
    return f"{value:.0%}"
  if unit == "s":
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
  return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def summary_table(results: list[dict]) -> list[str]:
  lines = ["| benchmark | case | metric (baseline) | ours | baseline | ours better by | target | met |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for row in r["rows"]:
      unit = row["unit"]
      shown_unit = "" if unit in ("s", "fraction") else f" {unit}"
      ratio = f"{row['ratio']:.2f}x" if row["ratio"] else ""
      target = f">= {row['target']}x" if row["target"] else row.get("note", "")
      met = {True: "met", False: "MISSED", None: ""}[row["met"]]
      if unit == "fraction" and row.get("note", "").startswith("target >="):
        met = "met" if row["ours"] >= float(row["note"].split(">=")[1]) else "MISSED"
      lines.append(f"| {row['bench']} | {row['case']} | {row['metric']} | {fmt(row['ours'], unit)}{shown_unit} "
                   f"| {fmt(row['theirs'], unit)}{shown_unit if row['theirs'] else ''} | {ratio} | {target} | {met} |")
    if r["code"]:
      lines.append(f"| {r['name']} | | FAILED (exit code {r['code']}) | | | | | |")
  return lines


def insert_section(path: Path, section: str) -> None:
  """Replaces the summary section of `path`, or inserts it right after the file's first line (the title)."""
  block = f"{MD_BEGIN}\n{section}\n{MD_END}"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if MD_BEGIN in text:
    text = text[:text.index(MD_BEGIN)] + block + text[text.index(MD_END) + len(MD_END):]
  else:
    first, _, rest = text.partition("\n")
    text = f"{first}\n\n{block}\n{rest}"
  path.write_text(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer repeats in every script")
  parser.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated, of {', '.join(SCRIPTS)}")
  parser.add_argument("--markdown", type=Path, help="write every section and the summary into this file")
  args = parser.parse_args()
  os.chdir(REPO)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
    results = [run_script(name, args.quick, args.markdown, Path(tmp)) for name in args.only.split(",")]
  minutes = (time.perf_counter() - start) / 60
  import torch  # noqa: F401  (versions for the machine line)
  import transformers  # noqa: F401
  try:
    import trl
    extra = {"trl": trl.__version__}
  except ImportError:
    extra = {}
  command = "python experiments/bench/bench_all.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  runs = "; ".join(f"{r['name']} {r['seconds'] / 60:.1f} min (load {r['load'][0]:.1f} -> {r['load'][1]:.1f})"
                   + (f" FAILED ({r['code']})" if r["code"] else "") for r in results)
  section = "\n".join([
      "## Summary (`make bench`)", "", machine(**extra),
      f"- command: `{command}` (`make bench{' QUICK=1' if args.quick else ''}`), {minutes:.1f} min in all; per "
      f"script: {runs}",
      "- each row is a median over the script's timed repeats (min/max and the full tables in the sections below); "
      "`ours better by` = baseline time / ours (or ours rate / baseline rate); utilisation rows are fractions of "
      "the machine ceilings measured in the same script run", "", *summary_table(results)])
  print("\n" + section)
  if args.markdown:
    insert_section(args.markdown, section)
  sys.exit(max((r["code"] for r in results), default=0))


if __name__ == "__main__":
  main()
