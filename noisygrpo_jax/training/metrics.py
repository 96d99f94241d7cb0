"""Metrics to TensorBoard (tensorboardX) and to a JSONL file, one record per logged step."""

from __future__ import annotations

import json
import math
import os

import tensorboardX


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
      kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
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


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
