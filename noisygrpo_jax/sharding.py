"""The one logical-axis rules table: logical names used by the modules -> mesh axes.

Modules name every parameter axis with a logical name (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
...). This table maps them to the mesh axes `data`, `fsdp`, `tensor`. Parameters are sharded FSDP
style over `fsdp` along their embedding axis and tensor-parallel over `tensor` along heads/mlp/vocab;
activations are sharded over (`data`, `fsdp`) along the batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "patch": None,
    "norm": None,
    "layers": None,  # the stacked axis of scanned layers: every device holds its shard of each layer
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
}


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh,
                    rules: dict = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """PartitionSpec for an array whose axes carry `names`; axes of size 1 in the mesh are dropped,
  and a mesh axis is used at most once per array (later duplicates stay replicated)."""
  if not names:
    return PartitionSpec()
  used, spec = set(), []
  for name in names:
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def logical_sharding(names, mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for `names`; with `shape`, axes that the mesh does not divide stay replicated."""
  spec = list(logical_to_spec(names, mesh))
  if shape is not None:
    for i, axes in enumerate(spec):
      size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
      if axes is not None and shape[i] % size:
        spec[i] = None
  return NamedSharding(mesh, PartitionSpec(*spec))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one of data/fsdp/tensor may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices cannot be split into mesh {sizes}")
    sizes[sizes.index(-1)] = devices.size // known
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{devices.size} are available")
  return Mesh(devices.reshape(sizes), MESH_AXES)


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def param_shardings(abstract_state, mesh: Mesh) -> dict:
  """Pure-dict tree of NamedSharding for a model's parameters, from their logical axis names.

  Args:
    abstract_state: the nnx.State of a (possibly abstract, `nnx.eval_shape`) model.
  """
  flat = {}
  for path, variable in nnx.to_flat_state(abstract_state):
    names = variable.get_metadata().get("out_sharding")
    flat[path] = logical_sharding(names, mesh, variable.get_value().shape)
  return nnx.to_pure_dict(nnx.from_flat_state(flat))


def tree_shardings_like(tree, param_sharding_tree, mesh: Mesh):
  """Shardings for a tree whose leaves mirror parameters (optimizer moments, gradients).

  Each leaf takes the sharding of the parameter whose path is a suffix of the leaf's path and whose
  shape matches; anything else (step counters, scalars) is replicated.
  """
  by_path = {_path_keys(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sharding_tree)}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      sharding = by_path.get(keys[start:])
      if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly sharded, possibly multi-process) array as numpy, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
