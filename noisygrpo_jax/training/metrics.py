"""Metrics to TensorBoard (tensorboardX) and to a JSONL file, one record per logged step; sample texts beside them."""

from __future__ import annotations

import json
import math
import os

import tensorboardX

from noisygrpo_jax import atomic_io


class MetricsWriter:
  """Appends {"step": s, **metrics} lines to <workdir>/metrics.jsonl and scalars to <workdir>/tensorboard; sample
  records (`write_samples`) to <workdir>/samples.jsonl and TensorBoard text."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: records after it (written before a crash, past the restored checkpoint) are dropped."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    for path in (self.path, self.samples_path):
      _drop_records_after(path, resume_step)
    self.jsonl = open(self.path, "a", encoding="utf-8")
    self.samples = None  # samples.jsonl, opened by the first write_samples
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

  def write_samples(self, step: int, records: list[dict]) -> None:
    """Appends {"step": step, **record} lines (JSON objects) to samples.jsonl."""
    if not self.enabled or not records:
      return
    if self.samples is None:
      self.samples = open(self.samples_path, "a", encoding="utf-8")
    self.samples.write("".join(json.dumps({"step": int(step), **r}, ensure_ascii=False) + "\n" for r in records))
    self.samples.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Markdown `text` under `tag` in TensorBoard's text tab."""
    if not self.enabled:
      return
    self.tensorboard.add_text(tag, text, int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      if self.samples is not None:
        self.samples.close()
      self.tensorboard.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites the JSONL file `path` (if any) without its records after `step`. A run killed mid-append leaves a
  partial last line; it belongs to a step after the checkpoint."""
  if os.path.exists(path):
    kept = [r for r in read_jsonl(path, partial_last_line=True) if r["step"] <= step]
    atomic_io.write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


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
