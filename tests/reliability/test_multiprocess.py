"""Two processes on localhost (jax.distributed, gloo CPU collectives), 4 CPU devices each, one global mesh: one RL
train step equals the single-device step within 1e-5, a Checkpointer save/restore round-trips in both, and the RL
trainer itself (experiments/train.py) runs as one process with 8 devices does."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from noisygrpo_jax.training import metrics as metrics_lib
from tests.reliability import runs

pytestmark = pytest.mark.reliability

LEARNING_RATE = 3e-5
STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=runs.ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run_together(commands: list[list[str]], env: dict[str, str], log_dir, name: str) -> list[str]:
  """Starts the commands at once and waits for all; returns their outputs, each asserted to have exited 0."""
  paths = [log_dir / f"{name}{i}.log" for i in range(len(commands))]
  logs = [open(path, "w") for path in paths]
  procs = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=runs.ROOT, env=env)
           for command, log in zip(commands, logs)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  outputs = [path.read_text() for path in paths]
  for code, out in zip(codes, outputs):
    assert code == 0, out[-4000:]
  return outputs


def test_two_processes_train_step_and_checkpoint_on_one_global_mesh(tmp_path):
  port = _free_port()
  outputs = _run_together([[sys.executable, "-m", "tests.reliability.multiprocess_worker", str(i), str(port),
                            str(tmp_path / "checkpoints")] for i in range(2)], _env(4), tmp_path, "process")
  ok = [re.search(r"MP_OK (\d) (\S+) ([0-9a-f]{64})", out) for out in outputs]
  assert all(ok), outputs
  assert [m.group(1) for m in ok] == ["0", "1"]
  assert ok[0].group(3) == ok[1].group(3)  # both processes restored the same parameters


def test_two_processes_run_the_rl_trainer_as_one_process_with_8_devices(tmp_path):
  """Rollouts (rows split over the processes' devices), host rewards and advantages, reference log-probs, updates
  and a checkpoint after each of 2 steps, on one (data=2, fsdp=4) mesh; the 2 processes also prepare the dataset and
  the tokenizer in one shared directory, as a shared disk has them."""
  common = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1", "--config.optim.warmup_steps=0",
            f"--config.optim.learning_rate={LEARNING_RATE}", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
  two, one = tmp_path / "two", tmp_path / "one"
  port = _free_port()
  _run_together([runs.command(two, tmp_path / "data", *common, "--config.mesh.num_processes=2",
                              f"--config.mesh.process_id={i}", f"--config.mesh.coordinator_address=localhost:{port}")
                 for i in range(2)], _env(4), tmp_path, "two")
  _run_together([runs.command(one, tmp_path / "data", *common)], _env(8), tmp_path, "one")

  records = [metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) for workdir in (two, one)]
  assert [[r["step"] for r in rs] for rs in records] == [[1, 2]] * 2
  for got, want in zip(*records):
    assert got.keys() == want.keys()
    for key in want:
      if key.startswith(("time/", "throughput/")):  # wall-clock
        continue
      if key.startswith("train/"):
        # Sums over the devices (gradients, the loss's terms) are reduced in another order by gloo across processes
        # than within one process: float32 rounding of the sums. The policy-gradient sums cancel (terms of
        # +-|advantage| ~ 0.8 add up to ~1e-8): a few ulp of their terms, absolutely.
        cancelling = key in ("train/loss", "train/pg_loss")
        tolerance = dict(rel=1e-5, abs=1e-6 if cancelling else 0)
        if key in ("train/kl_loss", "train/kl_mean"):
          # k3 = exp(r) - r - 1 of r = reference - policy log-prob is ~r^2 / 2 while the policy is near the reference:
          # an error e of the log-probs (their float32 rounding, <= 1e-6 as drift/ below) moves it by ~|r| e, about
          # sqrt(2 kl) e, i.e. by e sqrt(2 / kl) relatively (measured at step 2: kl 6.46e-5, off by 1.4e-5 of it).
          tolerance = dict(rel=0, abs=math.sqrt(2 * want[key]) * 1e-6)
        assert got[key] == pytest.approx(want[key], **tolerance), (got["step"], key)
      elif key.startswith("drift/"):
        # The sampler's against the trainer's log-probs: a measure of float32 noise (~2e-7) whose trainer side is
        # rounded as the train/ sums are, so the two runs' values agree to that noise, not bitwise.
        assert got[key] == pytest.approx(want[key], abs=1e-6), (got["step"], key)
      else:
        # The rollouts hold no float collective (replicated weights, rows split): step 1 samples the same tokens bit
        # for bit, and step 2's parameters differ by rounding only (below), too little to change a sampled token; so
        # the rewards, advantages and counts are equal.
        assert got[key] == want[key], (got["step"], key)
  last = records[1][-1]  # step 2 follows a real update: its rollouts and KL see the updated policy
  assert last["advantage/abs_mean"] > 0 and last["train/kl_mean"] > 0 and last["train/update_norm"] > 0

  for workdir in (two, one):
    assert runs.complete_steps(workdir / "checkpoints") == [1, STEPS]
  with open(two / "checkpoints" / str(STEPS) / "metadata" / "metadata") as f:
    assert json.load(f) == {"step": STEPS, "data_position": 4, "consecutive_skips": 0, "init_from_step": None}
  got, want = (runs.state_arrays(workdir / "checkpoints" / str(STEPS)) for workdir in (two, one))
  assert got.keys() == want.keys()
  params = [k for k in want if k.startswith("/params/")]
  assert params
  # The gradients' rounding differences move a parameter by a fraction of Adam's step (~ learning rate) where its
  # gradient is near Adam's eps (measured: at most 1.4e-7, 0.2% of the 2 steps' largest move).
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=0.01 * STEPS * LEARNING_RATE, err_msg=k)
  np.testing.assert_array_equal(got["/step"], want["/step"])
