"""Orbax checkpoints of the train state plus host-side run metadata (data position, PRNG key, metrics step).

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed run never
sees a half-written "latest" checkpoint; `latest_step` only lists complete ones and leftover temporary
directories are removed when the next run opens the directory. A save that fails (e.g. the disk is full)
raises `CheckpointWriteError` naming the directory, the step and the fix, at the latest by the next `save`
or `wait`, and leaves the earlier checkpoints in place. Restoring a checkpoint of another model shape raises
`CheckpointMismatchError` naming the parameter and both shapes before anything is read.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from noisygrpo_jax.training import params as params_lib

RESTORE_FIX = ("restore into the model configuration the checkpoint was written with, or point the run at "
               "a checkpoint of this model")


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the earlier checkpoints are intact."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the state it is restored into."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def all_finite(tree) -> bool:
  """True when every floating-point leaf is finite (reduced on device; one scalar comes back)."""
  return bool(_all_finite(tree))


def _is_disk_full(error: BaseException | None) -> bool:
  """ENOSPC / EDQUOT anywhere in the exception chain (orbax and tensorstore wrap the OSError)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/language_model/...' -> shape, for a state, its abstract form or orbax's stored metadata.

  Keys are normalised to strings: the stored tree has dict keys where the live one has dataclass fields,
  named-tuple fields and integer layer indices.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat
          if leaf is not None}


def shape_mismatches(stored: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
  """Human-readable differences between the stored and the wanted path -> shape tables (empty = they fit)."""
  out = [f"parameter {p!r} has shape {stored[p]} in the checkpoint but {wanted[p]} in this run"
         for p in wanted if p in stored and tuple(stored[p]) != tuple(wanted[p])]
  out += [f"parameter {p!r} {wanted[p]} of this run is not in the checkpoint" for p in wanted if p not in stored]
  out += [f"the checkpoint's {p!r} {stored[p]} is not in this run" for p in stored if p not in wanted]
  return out


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`; saves asynchronously.

  `cleanup`: remove temporary directories left by a killed save when opening (False for a directory that
  another run may be writing, e.g. a warm start read through train.init_from).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, cleanup: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=cleanup)
    self.manager = self._open()
    self._pending: int | None = None  # the step whose asynchronous save has not been confirmed yet

  def _open(self, **option_changes) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=dataclasses.replace(self._options, **option_changes),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, metadata: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays, possibly sharded) and JSON-serialisable `metadata`.

    Raises CheckpointWriteError for this save or for the previous asynchronous one.
    """
    if not all_finite(state):
      raise FloatingPointError(f"step {step}: the state holds non-finite values; refusing to checkpoint it")
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      metadata=ocp.args.JsonSave(metadata)))
    except OSError as e:
      raise self._write_error(step, e) from e
    self._pending = step

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointWriteError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()  # re-raises what the background save thread hit
    except Exception as e:  # pylint: disable=broad-exception-caught
      if step is None:
        raise
      raise self._write_error(step, e) from e

  def _discard(self, step: int) -> None:
    """Settles orbax after a failed save of `step` and removes what it left, so the disk holds only the
    checkpoints before it; the manager is reopened for later saves."""
    try:
      self.manager.close()  # joins the background commit, which can still rename the step into place
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # the same failure, re-raised by orbax's inner checkpointer
    if jax.process_index() == 0:
      for name in os.listdir(self.directory):
        if name == str(step) or name.startswith(f"{step}.orbax-checkpoint-tmp"):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    # Orbax's per-item writer threads of the failed save may still be running: no cleanup sweep to race them.
    self.manager = self._open(cleanup_tmp_directories=False)

  def _write_error(self, step: int, cause: BaseException) -> CheckpointWriteError:
    self._discard(step)
    last = self.manager.latest_step()
    kept = (f"the last complete checkpoint, step {last}, is intact" if last is not None
            else "there is no earlier complete checkpoint")
    if _is_disk_full(cause):
      return CheckpointWriteError(
          errno.ENOSPC, f"checkpoint step {step} could not be written to {self.directory}: the disk is full "
          f"({cause}); {kept}. Free space on that filesystem (or lower train.keep_checkpoints, or point "
          "train.workdir at a larger disk) and rerun the same command: it resumes from the last complete "
          "checkpoint")
    return CheckpointWriteError(
        f"checkpoint step {step} could not be written to {self.directory}: {type(cause).__name__}: {cause}; "
        f"{kept}. Fix the cause and rerun the same command: it resumes from the last complete checkpoint")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_fits(self, step: int, abstract_state, fix: str = RESTORE_FIX, only: str = "") -> None:
    """Raises CheckpointMismatchError when checkpoint `step` does not have `abstract_state`'s paths and shapes.

    `only`: compare just the stored paths under this top-level field (e.g. "params").
    """
    items = self.manager.metadata(step).item_metadata
    if items is None or items.get("state") is None:
      return  # no stored array metadata (older format): orbax's own restore checks still apply
    stored = _shapes(items["state"])
    wanted = _shapes({only: abstract_state} if only else abstract_state)
    if only:
      stored = {p: shape for p, shape in stored.items() if p.split("/", 1)[0] == only}
    problems = shape_mismatches(stored, wanted)
    if problems:
      more = f" (and {len(problems) - 3} more differences)" if len(problems) > 3 else ""
      raise CheckpointMismatchError(
          f"checkpoint {os.path.join(self.directory, str(step))} does not fit this run's model: "
          f"{'; '.join(problems[:3])}{more}. It was written for another model shape or optimizer "
          f"configuration; {fix}")

  def restore(self, step: int, abstract_state, fix: str = RESTORE_FIX) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure, shapes and shardings of `abstract_state` (e.g. from jax.eval_shape).

    `fix`: what to tell the user when the checkpoint belongs to another model (CheckpointMismatchError).
    """
    self.check_fits(step, abstract_state, fix)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
    return restored["state"], restored["metadata"]

  def restore_params(self, step: int, abstract_params: dict, fix: str = RESTORE_FIX) -> dict:
    """The full parameter tree of checkpoint `step`, into `abstract_params`' shapes, dtypes and shardings.

    The run that wrote it kept each parameter in its state's trainable `params` or in its `frozen` parameters
    (train_step.TrainState: e.g. the frozen vision tower, or with LoRA every base weight beside trainable adapters);
    both are read, wherever each parameter is. A warm start's optimizer state need not fit: it may have trained other
    parts (e.g. an unfrozen vision tower).
    """
    items = self.manager.metadata(step).item_metadata
    stored = _shapes(items["state"]) if items is not None and items.get("state") is not None else {}
    frozen_paths = {path.split("/", 1)[1] for path in stored if path.startswith("frozen/")}
    frozen, trainable = params_lib.split(abstract_params, lambda path: "/".join(map(str, path)) in frozen_paths)
    target = {field: tree for field, tree in (("params", trainable), ("frozen", frozen)) if tree}
    for field, abstract in target.items():
      self.check_fits(step, abstract, fix, only=field)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    return params_lib.combine(restored.get("params", {}), restored.get("frozen", {}))

  def close(self) -> None:
    self.wait()
    self.manager.close()
