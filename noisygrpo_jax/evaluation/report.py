"""Plots and markdown summaries of runs, read from their metrics.jsonl files."""

from __future__ import annotations

import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from noisygrpo_jax.training.metrics import read_jsonl  # noqa: E402

TRAINING_CURVES = (("reward/semantic", "semantic reward"), ("reward/clean_accuracy", "clean-rollout accuracy"),
                   ("reward/group_std", "within-group reward std"), ("advantage/kalman_gain", "Kalman gain K"))


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  return (np.array([p[0] for p in points]), np.array([p[1] for p in points], np.float64))


def smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
  if len(values) < window:
    return values
  return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_runs(runs: dict[str, Sequence[dict]], path: str, eval_splits: Sequence[str]) -> str:
  """One PNG: the training curves of every run, plus eval accuracy per split vs step. runs: label -> records."""
  panels = list(TRAINING_CURVES) + [(f"eval/{s}/accuracy", f"eval accuracy: {s}") for s in eval_splits]
  cols = 3
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, (key, title) in zip(axes.flat, panels):
    for label, records in runs.items():
      x, y = series(records, key)
      if not len(x):
        continue
      if key.startswith("eval/"):
        ax.plot(x, y, marker="o", label=label)
      else:
        ax.plot(x[len(x) - len(smooth(y)):], smooth(y), label=label)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def eval_at(records: Sequence[dict], step: int) -> dict[str, float]:
  """The evaluation metrics logged at `step` (eval records only)."""
  out = {}
  for r in records:
    if r["step"] == step:
      out.update({k: v for k, v in r.items() if k.startswith("eval/") and v is not None})
  return out


def summary_table(before: dict[str, float], after: dict[str, float], splits: Sequence[str]) -> str:
  lines = ["| split | accuracy before RL | accuracy after RL | format rate after |", "|---|---|---|---|"]
  for s in splits:
    b, a = before.get(f"eval/{s}/accuracy", float("nan")), after.get(f"eval/{s}/accuracy", float("nan"))
    lines.append(f"| {s} | {b:.3f} | {a:.3f} | {after.get(f'eval/{s}/format_rate', float('nan')):.3f} |")
  return "\n".join(lines)


def mean_std_table(results: dict[str, list[dict[str, float]]], splits: Sequence[str], key: str = "accuracy") -> str:
  """results: method -> one final-eval dict per seed. Cells are mean +- std over seeds."""
  header = "| method | " + " | ".join(splits) + " |"
  lines = [header, "|---" * (len(splits) + 1) + "|"]
  for method, seeds in results.items():
    cells = []
    for s in splits:
      values = np.array([r[f"eval/{s}/{key}"] for r in seeds if f"eval/{s}/{key}" in r])
      cells.append(f"{values.mean():.3f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"
                   if len(values) else "n/a")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_run(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
