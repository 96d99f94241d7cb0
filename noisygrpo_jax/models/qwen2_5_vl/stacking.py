"""Repeated layers held as one module with stacked parameters, run as a `jax.lax.scan` (MaxText's scanned layers).

A stack of n identical layers is the module of one layer whose every parameter has a leading axis of size n, named
`layers` for sharding (never sharded: each device holds its shard of every layer). Scanning runs the layer body
once per step of one compiled loop, so compile time does not grow with depth; unrolled, the same stacked weights run
layer by layer in Python (one copy of the body per layer in the program), which some decode programs may prefer.
HF checkpoints keep one tensor per layer (`param_names.layer_keys`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS_NAME = "layers"  # the logical name of the stacked axis (sharding.LOGICAL_AXIS_RULES)


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
  """The module of `layers[0]` with each parameter replaced by the stack of all layers' values: [n, ...].

  The layers are built one after the other by the caller, so a stacked model draws the same random initial values as
  a list of layers would.
  """
  def stack(*variables: nnx.Variable) -> nnx.Variable:
    names = variables[0].get_metadata().get("out_sharding") or (None,) * variables[0].get_value().ndim
    return variables[0].replace(jnp.stack([v.get_value() for v in variables]),
                                out_sharding=(LAYER_AXIS_NAME,) + tuple(names))

  stacked = jax.tree.map(stack, *[nnx.state(layer) for layer in layers],
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(nnx.graphdef(layers[0]), stacked)


def num_layers(stacked: nnx.Module) -> int:
  """n: the length of the stacked axis."""
  return jax.tree.leaves(nnx.state(stacked))[0].shape[0]


def run_layers(stacked: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
               per_layer: Any = None, *, scan: bool = True, remat: bool = False) -> tuple[Any, Any]:
  """Runs `carry, out_l = body(layer_l, carry, per_layer_l)` for l = 0..n-1 over the stacked layers.

  Args:
    stacked: a `stack_layers` module.
    body: one layer's step; `layer_l` is the layer-l module (a view of the stacked parameters).
    carry: what flows from layer to layer (hidden states); a pytree of arrays.
    per_layer: a pytree whose leaves have the leading layer axis [n, ...] (KV caches, per-layer flags), or None.
    scan: True runs one `jax.lax.scan` (the body compiled once); False unrolls the layers in Python.
    remat: each layer's activations are recomputed in the backward pass (only its inputs are saved). XLA:CPU's
      default concurrency-optimised scheduler moves the recomputation back into the forward pass, so on CPU the
      saving needs `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`.
  Returns:
    (final carry, the layers' outputs stacked along a new leading axis [n, ...]; None when every output is None).
  """
  graphdef, params = nnx.split(stacked)

  def step(carry, inputs):
    layer_params, layer_inputs = inputs
    return body(nnx.merge(graphdef, layer_params), carry, layer_inputs)

  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=not scan)
  if scan:
    return jax.lax.scan(step, carry, (params, per_layer))
  outputs = []
  for index in range(num_layers(stacked)):
    carry, out = step(carry, jax.tree.map(lambda x: x[index], (params, per_layer)))
    outputs.append(out)
  return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
