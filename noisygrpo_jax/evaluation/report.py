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


def mean_curve(seeds: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean, min and max of `key` over the seeds' runs, at the steps every seed logged."""
  per_seed = [dict(zip(*series(records, key))) for records in seeds]
  steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
  values = np.array([[s[step] for step in steps] for s in per_seed], np.float64).reshape(len(per_seed), len(steps))
  return np.array(steps), values.mean(0), values.min(0), values.max(0)


def _plot_panel(ax, runs: dict[str, Sequence[Sequence[dict]]], key: str, title: str) -> None:
  for label, seeds in runs.items():
    x, mean, low, high = mean_curve(seeds, key)
    if not len(x):
      continue
    if key.startswith("eval/"):
      ax.plot(x, mean, marker="o", label=label)
      ax.fill_between(x, low, high, alpha=0.15)
    else:
      ax.plot(x[len(x) - len(smooth(mean)):], smooth(mean), label=label)
  ax.set_title(title)
  ax.set_xlabel("RL step")
  ax.grid(alpha=0.3)


def plot_runs(runs: dict[str, Sequence[Sequence[dict]]], path: str, eval_splits: Sequence[str]) -> str:
  """One PNG: training curves and eval accuracy per split vs step. runs: label -> one record list per seed;
  lines are means over seeds (training curves smoothed over 5 steps; eval bands span min to max)."""
  panels = list(TRAINING_CURVES) + [(f"eval/{s}/accuracy", f"eval accuracy: {s}") for s in eval_splits]
  cols = 3
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
  for ax, (key, title) in zip(axes.flat, panels):
    _plot_panel(ax, runs, key, title)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  return _save(fig, path)


def plot_exploration(runs: dict[str, Sequence[Sequence[dict]]], path: str) -> str:
  """The exploration plot: within-group reward std over training, mean over seeds per method."""
  fig, ax = plt.subplots(figsize=(6, 4))
  _plot_panel(ax, runs, "reward/group_std", "within-group reward std (exploration), mean over seeds")
  ax.legend(fontsize=8)
  return _save(fig, path)


def _save(fig, path: str) -> str:
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


def mean_std_table(results: dict[str, list[dict[str, float]]], splits: Sequence[str], key: str = "accuracy") -> str:
  """results: method -> one final-eval dict per seed; one column per split, of the metric `key`."""
  return metric_table(results, {s: f"eval/{s}/{key}" for s in splits})


def metric_table(results: dict[str, list[dict[str, float]]], columns: dict[str, str]) -> str:
  """results: method -> one final-eval dict per seed; columns: header -> metric name. Cells are mean +- sample
  std over seeds (the value alone for a single run, n/a when no seed logged the metric)."""
  lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for method, seeds in results.items():
    cells = []
    for name in columns.values():
      values = np.array([r[name] for r in seeds if name in r])
      if not len(values):
        cells.append("n/a")
      elif len(values) == 1:
        cells.append(f"{values[0]:.3f}")
      else:
        cells.append(f"{values.mean():.3f} +- {values.std(ddof=1):.3f}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_run(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
