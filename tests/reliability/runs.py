"""Tiny RL runs of experiments/train.py in subprocesses, and what they leave on disk (shared by the tests here)."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from noisygrpo_jax.training import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP_MARK = ".orbax-checkpoint-tmp"
FAST = ["--config.model.preset=tiny", "--config.train.prompts_per_step=2", "--config.rl.max_new_tokens=16",
        "--config.data.train_size=64", "--config.data.eval_size=8", "--config.data.prompt_buckets=(96,)",
        "--config.train.eval_every=0", "--config.train.keep_checkpoints=2"]


def command(workdir, data_dir, *overrides) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config=configs/noisygrpo.py:tiny",
          f"--config.train.workdir={workdir}", f"--config.data.data_dir={data_dir}", *FAST, *overrides]


def env(cache_dir) -> dict[str, str]:
  """The persistent compilation cache makes each restart compile-free (cached executables are the same code)."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def train(workdir, data_dir, cache_dir, *overrides) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, data_dir, *overrides), capture_output=True, text=True, cwd=ROOT,
                        timeout=600, env=env(cache_dir))


def complete_steps(checkpoint_dir) -> list[int]:
  """Steps with a finished (renamed) checkpoint directory."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit())


def tmp_dirs(checkpoint_dir) -> dict[str, tuple[int, int]]:
  """`<step>.orbax-checkpoint-tmp*` directories (being written, or left by a killed process) -> identity.

  The identity (inode, ctime) tells a directory a new process created from a same-named one that an earlier
  process left behind.
  """
  if not os.path.isdir(checkpoint_dir):
    return {}
  out = {}
  for name in os.listdir(checkpoint_dir):
    if TMP_MARK in name and name[0].isdigit():
      try:
        st = os.stat(os.path.join(checkpoint_dir, name))
      except FileNotFoundError:  # renamed into place or removed since the listing
        continue
      out[name] = (st.st_ino, st.st_ctime_ns)
  return out


def step_of(tmp_name: str) -> int:
  return int(tmp_name.split(".")[0])


def file_id(path) -> int | None:
  """The inode of `path` (None if absent): the metrics file gets a new one when a restarted run trims it."""
  try:
    return os.stat(path).st_ino
  except FileNotFoundError:
    return None


def logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [r["step"] for r in metrics_lib.read_jsonl(path, partial_last_line=True)]


def state_arrays(checkpoint_step_dir) -> dict[str, np.ndarray]:
  """Every array of a saved train state (params, optimizer state, step), by path, read into numpy whatever devices
  and processes wrote it (without a target, orbax restores onto the writer's devices only)."""
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(checkpoint_step_dir, "state")
  stored = checkpointer.metadata(path).item_metadata.tree
  return dict(_flatten(checkpointer.restore(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), stored))))


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)
