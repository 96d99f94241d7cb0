"""Orbax checkpoints of the train state plus host-side run metadata (data position, PRNG key, metrics step).

Orbax writes each step into a temporary directory and renames it when complete, so a killed run never sees a
half-written "latest" checkpoint; `restore_latest` resumes from the newest complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


@jax.jit
def _all_finite(tree) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def all_finite(tree) -> bool:
  """True when every floating-point leaf is finite (reduced on device; one scalar comes back)."""
  return bool(_all_finite(tree))


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`; saves asynchronously."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, metadata: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays, possibly sharded) and JSON-serialisable `metadata`."""
    if not all_finite(state):
      raise FloatingPointError(f"step {step}: the state holds non-finite values; refusing to checkpoint it")
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    metadata=ocp.args.JsonSave(metadata)))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure, shapes and shardings of `abstract_state` (e.g. from jax.eval_shape)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
    return restored["state"], restored["metadata"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
