"""One of the 2 processes of test_multiprocess: python -m tests.reliability.multiprocess_worker PID PORT DIR.

Each process has 4 CPU devices (XLA_FLAGS from the parent); together they form one (data=2, fsdp=4) mesh. Both
run one RL train step on the global mesh through the library's sharding and placement calls, save it through
Checkpointer into the shared DIR and restore it; process 0 also runs the step on one local device and checks
the global result against it. Each prints "MP_OK <pid> <max diff or nan> <sha256 of the restored params>".
"""

import hashlib
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from noisygrpo_jax import sharding
from noisygrpo_jax.training import checkpointing, loops, train_step as ts
from tests.training import helpers as H


def _gather(tree):
  """Full numpy values of a tree of global arrays (a collective: every process calls it)."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _digest(tree) -> str:
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def main(pid: int, port: str, directory: str) -> None:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)

  model, batch = H.model_and_batch(n=8)
  graphdef, model_state, optimizer, step, state = H.setup_state(model, freeze_vision=False, lr=1e-3)
  batch = batch.replace(ref_logps=np.asarray(jax.jit(ts.logps_fn(graphdef, 64))(H.full_params(state), batch)))
  initial = jax.tree.map(np.asarray, state.params)
  if pid == 0:  # the single-device reference, on this process's first device (process 1 lends it the CPU)
    single, single_metrics, _ = jax.jit(step)(state, batch)
    single = jax.tree.map(np.asarray, single.params)

  mesh = sharding.make_mesh(data=2, fsdp=4)
  # The data axis spans the processes: each process's 4 devices form one fsdp row.
  assert [{d.process_index for d in row.flat} for row in mesh.devices] == [{0}, {1}], mesh.devices
  state_sh = ts.state_shardings(nnx.eval_shape(lambda: model_state), optimizer, mesh, freeze_vision=False)
  batch_sh = ts.batch_shardings(batch, mesh)
  sharded_state = jax.device_put(state, state_sh)  # as setup.train_setup places the initial state
  sharded_batch = loops.place_batch(batch, batch_sh)  # as Run.update places each batch
  new_state, metrics, _ = ts.jit_train_step(step, state_sh, batch_sh, mesh)(sharded_state, sharded_batch)
  assert not new_state.params["language_model"]["embed_tokens"]["embedding"].is_fully_addressable

  params = _gather(new_state.params)
  grad_norm = float(_gather(metrics["grad_norm"]))
  diff = float("nan")
  if pid == 0:
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(single)))
    assert diff <= 1e-5 and moved > 5e-4, (diff, moved)
    assert abs(grad_norm - float(single_metrics["grad_norm"])) <= 1e-5 * float(single_metrics["grad_norm"])

  ckpt = checkpointing.Checkpointer(directory, keep=2)
  ckpt.save(1, new_state, {"step": 1, "data_position": 8})
  ckpt.close()
  reopened = checkpointing.Checkpointer(directory, keep=2)
  assert reopened.latest_step() == 1
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), new_state, state_sh)
  restored, meta = reopened.restore(1, abstract)
  reopened.close()
  assert meta == {"step": 1, "data_position": 8}, meta
  assert restored.params["language_model"]["embed_tokens"]["embedding"].sharding == state_sh.params[
      "language_model"]["embed_tokens"]["embedding"]
  restored_params = _gather(restored.params)
  for a, b in zip(jax.tree.leaves(restored_params), jax.tree.leaves(params), strict=True):
    assert np.array_equal(a, b)
  print("MP_OK", pid, diff, _digest(restored_params), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
