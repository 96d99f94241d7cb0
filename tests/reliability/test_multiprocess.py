"""Two processes on localhost (jax.distributed, gloo CPU collectives), 4 CPU devices each, one global mesh:
one RL train step equals the single-device step within 1e-5, and a Checkpointer save/restore round-trips in both."""

import os
import re
import socket
import subprocess
import sys

import pytest

from tests.reliability import runs

pytestmark = pytest.mark.reliability


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_step_and_checkpoint_on_one_global_mesh(tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=runs.ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.reliability.multiprocess_worker", str(i), str(port),
                             str(tmp_path / "checkpoints")], stdout=log, stderr=subprocess.STDOUT, cwd=runs.ROOT,
                            env=env) for i, log in enumerate(logs)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  outputs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
  for code, out in zip(codes, outputs):
    assert code == 0, out[-4000:]
  ok = [re.search(r"MP_OK (\d) (\S+) ([0-9a-f]{64})", out) for out in outputs]
  assert all(ok), outputs
  assert [m.group(1) for m in ok] == ["0", "1"]
  assert ok[0].group(3) == ok[1].group(3)  # both processes restored the same parameters
