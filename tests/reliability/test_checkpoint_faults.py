"""Checkpointer faults in-process: disk full mid-save, non-finite state, a checkpoint of another shape, and a
metrics file cut mid-line by a kill. Fast; part of `make test`."""

import errno
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from noisygrpo_jax.training import checkpointing, metrics as metrics_lib


def _state(value: float):
  return {"params": {"w": jnp.full((4, 8), value, jnp.float32), "layers": {0: {"b": jnp.arange(3.0) + value}}},
          "step": jnp.int32(value)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _disk_full(target: str):
  """A filesystem call that raises ENOSPC for paths containing `target` and defers to `real` otherwise."""
  def install(monkeypatch, cls, name):
    real = getattr(cls, name)

    def fail(self, *args, **kwargs):
      if target in str(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
      return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, fail)
  return install


def _join_threads_started_after(before: set, timeout_s: float = 60.0) -> None:
  """What a process ending on the error would do: orbax's writer threads of the failed save run out."""
  for thread in set(threading.enumerate()) - before:
    try:
      thread.join(timeout_s)
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # orbax's future threads re-raise their own failure from join(): the failed save's, already reported


# Where the write fails (all in orbax's background commit): the array item's metadata, the JSON item, the
# step's own metadata file. (A failing mkdir of the step directory raises the same error, but orbax's threads
# that wait for that directory then block interpreter exit for orbax's 300 s signal timeout: not run here.)
FAILURES = {
    "array_item": "state.orbax-checkpoint-tmp",
    "json_item": "metadata.orbax-checkpoint-tmp",
    "step_metadata": "_CHECKPOINT_METADATA",
}


@pytest.mark.parametrize("where", sorted(FAILURES))
def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_what_to_do(tmp_path, monkeypatch, where):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=1)  # keep=1: a success would delete step 1
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.wait()
  threads = set(threading.enumerate())
  with monkeypatch.context() as m:
    _disk_full(FAILURES[where])(m, type(epath.Path(directory)), "write_text")
    with pytest.raises(checkpointing.CheckpointWriteError) as error:
      ckpt.save(2, _state(2.0), {"step": 2})
      ckpt.wait()
    _join_threads_started_after(threads)
  message = str(error.value)
  assert error.value.errno == errno.ENOSPC
  for part in ("checkpoint step 2", directory, "the disk is full", "step 1, is intact", "Free space",
               "rerun the same command"):
    assert part in message, (part, message)
  assert ckpt.latest_step() == 1
  ckpt.close()

  restarted = checkpointing.Checkpointer(directory, keep=1)  # a new run: restores step 1, clears the leftover
  assert restarted.latest_step() == 1
  state, meta = restarted.restore(1, _abstract(_state(1.0)))
  _assert_equal(state, _state(1.0))
  assert meta == {"step": 1}
  assert sorted(os.listdir(directory)) == ["1"]
  restarted.save(2, _state(2.0), {"step": 2})  # with space again, saving resumes and retention applies
  restarted.close()
  assert sorted(os.listdir(directory)) == ["2"]


def test_a_failed_async_save_surfaces_at_the_next_save_naming_its_step(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=2)
  ckpt.save(1, _state(1.0), {"step": 1})
  ckpt.wait()
  threads = set(threading.enumerate())
  with monkeypatch.context() as m:
    _disk_full("state.orbax-checkpoint-tmp")(m, type(epath.Path(directory)), "write_text")
    ckpt.save(2, _state(2.0), {"step": 2})  # returns before the background write fails
    with pytest.raises(checkpointing.CheckpointWriteError, match="checkpoint step 2 could not be written"):
      ckpt.save(3, _state(3.0), {"step": 3})
    _join_threads_started_after(threads)
  assert ckpt.latest_step() == 1
  ckpt.save(3, _state(3.0), {"step": 3})
  ckpt.close()
  assert checkpointing.Checkpointer(directory).manager.all_steps() == [1, 3]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_is_never_written(tmp_path, bad):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory)
  state = _state(1.0)
  state["params"]["w"] = state["params"]["w"].at[2, 3].set(bad)
  with pytest.raises(FloatingPointError, match="step 5: the state holds non-finite values"):
    ckpt.save(5, state, {"step": 5})
  ckpt.close()
  assert ckpt.latest_step() is None and os.listdir(directory) == []


def test_restoring_another_shape_names_directory_parameter_shapes_and_fix(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(3, _state(1.0), {"step": 3})
  ckpt.close()
  other = _abstract(_state(1.0))
  other["params"]["w"] = jax.ShapeDtypeStruct((4, 16), jnp.float32)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpointing.Checkpointer(directory).restore(3, other, fix="use a new train.workdir")
  message = str(error.value)
  for part in (os.path.join(directory, "3"), "'params/w'", "(4, 8) in the checkpoint", "(4, 16) in this run",
               "use a new train.workdir"):
    assert part in message, (part, message)

  renamed = _abstract(_state(1.0))
  renamed["params"]["v"] = renamed["params"].pop("w")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="'params/v' .* is not in the checkpoint"):
    checkpointing.Checkpointer(directory).restore(3, renamed)


def test_metrics_of_a_killed_run_drop_a_cut_line_and_steps_after_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=4)
  writer.write(5, {"loss": 0.25})
  writer.close()
  records = metrics_lib.read_jsonl(str(path))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["loss"] == 0.25
  assert not list(tmp_path.glob("*.tmp"))  # the atomic rewrite left no temporary file
