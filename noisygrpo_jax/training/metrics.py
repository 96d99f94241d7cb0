"""Metrics to TensorBoard (tensorboardX) and to a JSONL file, one record per logged step."""

from __future__ import annotations

import json
import math
import os

import tensorboardX

from noisygrpo_jax import atomic_io


class MetricsWriter:
  """Appends {"step": s, **metrics} lines to <workdir>/metrics.jsonl and scalars to <workdir>/tensorboard."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: records after it (written before a crash, past the restored checkpoint) are dropped."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      # A run killed mid-append leaves a partial last line; it belongs to a step after the checkpoint.
      kept = [r for r in read_jsonl(self.path, partial_last_line=True) if r["step"] <= resume_step]
      atomic_io.write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self.jsonl = open(self.path, "a", encoding="utf-8")
    self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": int(step), **{k: (v if math.isfinite(v) else None)
                                                        for k, v in clean.items()}}) + "\n")
    self.jsonl.flush()
    for name, value in clean.items():
      if math.isfinite(value):
        self.tensorboard.add_scalar(name, value, int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


def read_jsonl(path: str, partial_last_line: bool = False) -> list[dict]:
  """The records of a JSONL file; `partial_last_line`: drop an unparsable last line (an interrupted write)."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  if partial_last_line and lines:
    try:
      json.loads(lines[-1])
    except json.JSONDecodeError:
      lines.pop()
  return [json.loads(line) for line in lines]
