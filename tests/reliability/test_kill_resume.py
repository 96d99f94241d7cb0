"""Kill anywhere: a tiny RL run SIGKILLed at 5 seeded moments ends bitwise equal to an uninterrupted one.

Kill moments (numpy RNG seed 0; the 5 modes are a seeded permutation of startup, step, step, write, write):
startup = 2-10 s after launch (imports, data, model, restore), or the moment the restarted process logs its
first new step if that comes sooner (with a warm compilation cache a fast machine runs the whole rest of the run
in under 10 s, and a kill after the last step would leave nothing for the next kill to interrupt); step = 0-1.5
s after the restarted process logged its first new step; write = the moment a `<step>.orbax-checkpoint-tmp`
directory appears for the 1st-3rd step after the restored one (polled every 2 ms; writing the tiny state takes
tens of ms). A kill counts as landed during a write when, after the process is dead, a temporary directory that
this process created (told from a same-named leftover of the previous process by inode and ctime) and saw just
before the kill is still there and that step's final directory is not. At least one such kill is required (the
report is printed with -s).

Also here: restoring a checkpoint of another model shape by resume or train.init_from fails with a clear error.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from noisygrpo_jax.training import metrics as metrics_lib
from tests.reliability import runs

pytestmark = pytest.mark.reliability

STEPS = 12
RUN = [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1"]
KILL_SEED = 0
POLL_S = 0.002
TRIGGER_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """Shared data, compilation cache, and a 1-step run of another seed: the warm start of the runs below."""
  root = tmp_path_factory.mktemp("kill")
  d = {name: root / name for name in ("data", "cache", "source", "straight", "killed")}
  result = runs.train(d["source"], d["data"], d["cache"], "--config.train.steps=1", "--config.train.seed=7",
                      "--config.train.checkpoint_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  return d


def _resumed_from(log: str) -> list[int]:
  return [int(s) for s in re.findall(r"resumed from step (\d+)", log)]


def _wait_for(proc, condition, timeout_s=TRIGGER_TIMEOUT_S) -> bool:
  """Polls until `condition()`; False if the process exited first (it must have exited cleanly)."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    if proc.poll() is not None:
      return False
    assert time.monotonic() < deadline, "the run made no progress"
    time.sleep(POLL_S)
  return True


def _run_and_kill(proc, mode: str, delay: float, resume: int, workdir, before: dict) -> dict:
  """Waits for the kill moment of `mode`, SIGKILLs, and reports where the kill landed.

  `before`: the metrics file's inode and the temporary directories at launch, so that records and directories
  left by the previous (killed) process are not taken for this one's progress.
  """
  ckpt = os.path.join(workdir, "checkpoints")
  metrics = os.path.join(workdir, "metrics.jsonl")
  new_step_logged = lambda: (runs.file_id(metrics) != before["metrics"]
                             and any(s > resume for s in runs.logged_steps(workdir)))
  new_tmp = lambda: {n: i for n, i in runs.tmp_dirs(ckpt).items() if before["tmp"].get(n) != i}
  if mode == "startup":  # at `delay`, or at the first new step if the run gets there sooner (a fast machine)
    deadline = time.monotonic() + delay
    fired = _wait_for(proc, lambda: time.monotonic() >= deadline or new_step_logged())
  elif mode == "step":
    fired = _wait_for(proc, new_step_logged)
    time.sleep(delay)
    fired = fired and proc.poll() is None
  else:  # write: the first new temporary directory of step resume + delay or later
    target = min(resume + delay, STEPS)
    fired = _wait_for(proc, new_step_logged) and _wait_for(
        proc, lambda: any(runs.step_of(n) >= target for n in new_tmp()))
  writing = new_tmp()
  if fired:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  after, complete = runs.tmp_dirs(ckpt), runs.complete_steps(ckpt)
  landed_in_write = any(after.get(n) == i and runs.step_of(n) not in complete for n, i in writing.items())
  return dict(mode=mode, delay=round(delay, 3), resume=resume, fired=fired, returncode=proc.returncode,
              writing=sorted(map(runs.step_of, writing)), landed_in_write=fired and landed_in_write,
              complete_after=complete, logged_after=runs.logged_steps(workdir))


def _spawn(d, log_path):
  log = open(log_path, "w")
  cmd = runs.command(d["killed"], d["data"], *RUN, f"--config.train.init_from={d['source']}")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=runs.ROOT, env=runs.env(d["cache"])), log


def _check_restart(log_path, resume, report):
  """Every restart restores the newest complete checkpoint (a failed restore would exit non-zero)."""
  with open(log_path) as f:
    log = f.read()
  assert report["returncode"] in (0, -signal.SIGKILL), log[-3000:]
  expected = [resume] if resume else []
  if report["mode"] == "startup" and report["returncode"] != 0:
    assert _resumed_from(log) in ([], expected), log[-2000:]  # it may have died before restoring
  else:
    assert _resumed_from(log) == expected, (report, log[-2000:])


def test_sigkill_at_five_moments_resumes_bitwise(dirs, tmp_path):
  d = dirs
  result = runs.train(d["straight"], d["data"], d["cache"], *RUN, f"--config.train.init_from={d['source']}")
  assert result.returncode == 0, result.stderr[-3000:]

  rng = np.random.default_rng(KILL_SEED)
  modes = rng.permutation(["startup", "step", "step", "write", "write"])
  # startup / step: seconds after the start / after the first new step; write: which new step's write.
  delays = {"startup": lambda: rng.uniform(2.0, 10.0), "step": lambda: rng.uniform(0.0, 1.5),
            "write": lambda: int(rng.integers(1, 4))}
  reports = []
  ckpt = os.path.join(d["killed"], "checkpoints")
  for i, mode in enumerate(list(modes) + ["none"]):
    complete = runs.complete_steps(ckpt)
    resume = complete[-1] if complete else 0
    log_path = tmp_path / f"run{i}.log"
    before = dict(metrics=runs.file_id(d["killed"] / "metrics.jsonl"), tmp=runs.tmp_dirs(ckpt))
    start = time.monotonic()
    proc, log = _spawn(d, log_path)
    if mode == "none":
      proc.wait(timeout=600)
      report = dict(mode=mode, resume=resume, returncode=proc.returncode, fired=False, landed_in_write=False)
    else:
      report = _run_and_kill(proc, mode, delays[mode](), resume, d["killed"], before)
    log.close()
    reports.append({**report, "mode": str(mode), "seconds": round(time.monotonic() - start, 1)})
    _check_restart(log_path, resume, report)
  print("\n".join(map(str, reports)))

  assert sum(r["fired"] for r in reports) == 5, reports
  assert sum(r["landed_in_write"] for r in reports) >= 1, reports
  assert reports[-1]["returncode"] == 0
  assert runs.complete_steps(ckpt) == [STEPS - 1, STEPS] and runs.tmp_dirs(ckpt) == {}

  straight = runs.state_arrays(os.path.join(d["straight"], "checkpoints", str(STEPS)))
  killed = runs.state_arrays(os.path.join(ckpt, str(STEPS)))
  assert straight.keys() == killed.keys()
  for k in straight:
    assert np.array_equal(straight[k], killed[k]), k

  straight_records = metrics_lib.read_jsonl(os.path.join(d["straight"], "metrics.jsonl"))
  killed_records = metrics_lib.read_jsonl(os.path.join(d["killed"], "metrics.jsonl"))
  assert [r["step"] for r in killed_records] == list(range(1, STEPS + 1))
  deterministic = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}
  assert list(map(deterministic, killed_records)) == list(map(deterministic, straight_records))


def test_resume_into_another_model_shape_names_parameter_shapes_and_fix(dirs, tmp_path):
  workdir = tmp_path / "other"
  shutil.copytree(dirs["source"] / "checkpoints", workdir / "checkpoints")
  result = runs.train(workdir, dirs["data"], dirs["cache"], "--config.model.preset=small")
  assert result.returncode != 0
  message = result.stderr[result.stderr.index("CheckpointMismatchError"):]
  assert str(workdir / "checkpoints" / "1") in message
  assert re.search(r"parameter '[\w/]+' has shape \(\d+(, \d+)*\) in the checkpoint but \(\d+(, \d+)*\) in this run",
                   message), message[:2000]
  assert "use a new train.workdir" in message


def test_init_from_another_model_shape_names_parameter_shapes_and_fix(dirs, tmp_path):
  result = runs.train(tmp_path / "other", dirs["data"], dirs["cache"], "--config.model.preset=small",
                      f"--config.train.init_from={dirs['source']}")
  assert result.returncode != 0
  message = result.stderr[result.stderr.index("CheckpointMismatchError"):]
  assert str(dirs["source"] / "checkpoints" / "1") in message
  assert re.search(r"has shape \(\d+(, \d+)*\) in the checkpoint but \(\d+(, \d+)*\) in this run", message)
  assert "point train.init_from at a run of this model" in message
