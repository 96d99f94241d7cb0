"""Repeated layers held as one module with stacked parameters, run as a `jax.lax.scan` (MaxText's scanned layers).

A stack of n identical layers is the module of one layer whose every parameter has a leading axis of size n, named
`layers` for sharding (never sharded: each device holds its shard of every layer). Scanning runs the layer body
once per step of one compiled loop, so compile time does not grow with depth; unrolled, the same stacked weights run
layer by layer in Python (one copy of the body per layer in the program).
HF checkpoints keep one tensor per layer (`param_names.layer_keys`).

Reading one layer out of a stack copies its weights (a slice XLA does not fold into the matmul), which a loop body
that runs once per generated token should not pay; `unstack_layers` makes a `LayerList`, the same layers held one
module per layer, and `run_layers` runs either kind (MaxText likewise decodes from unscanned weights).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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


class LayerList(nnx.Module):
  """The layers of a `stack_layers` module held one module per layer, each parameter in a buffer of its own (no
  leading layer axis): what decoding reads (`unstack_layers`). `run_layers` runs it unrolled, with per-layer inputs
  and outputs as tuples of n per-layer pytrees (e.g. one KV cache per layer)."""

  def __init__(self, layers: Sequence[nnx.Module]):
    self.layers = nnx.List(layers)


def unstack_layers(stacked: nnx.Module) -> LayerList:
  """The layers of a `stack_layers` module as a `LayerList`: each parameter [n, ...] sliced into n arrays [...] (a
  copy of every weight; the sharding of the other axes is kept). Eager or traced."""
  graphdef, state = nnx.split(stacked)

  def layer(index: int) -> nnx.Module:
    def take(variable: nnx.Variable) -> nnx.Variable:
      names = variable.get_metadata().get("out_sharding")
      return variable.replace(variable.get_value()[index], out_sharding=names[1:] if names else names)

    return nnx.merge(graphdef, jax.tree.map(take, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))

  return LayerList([layer(index) for index in range(num_layers(stacked))])


def unstack_params(stacked: dict, dtype: str = "") -> dict:
  """The pure dict (nnx.to_pure_dict) of the `LayerList` of a `stack_layers` module from the stack's: {"layers": {l:
  every leaf's [l]}}, floating-point leaves in `dtype` ("" keeps them). Traced, the slices and the cast are one copy."""
  num = jax.tree.leaves(stacked)[0].shape[0]
  cast = lambda x: x.astype(dtype) if dtype and jnp.issubdtype(x.dtype, jnp.floating) else x
  return {"layers": {index: jax.tree.map(lambda x: cast(x[index]), stacked) for index in range(num)}}


def num_layers(layers: nnx.Module) -> int:
  """n: the length of the stacked axis of a `stack_layers` module, or of a `LayerList`."""
  if isinstance(layers, LayerList):
    return len(layers.layers)
  return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def run_layers(layers: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
               per_layer: Any = None, *, scan: bool = True, remat: bool = False) -> tuple[Any, Any]:
  """Runs `carry, out_l = body(layer_l, carry, per_layer_l)` for l = 0..n-1 over the layers.

  Args:
    layers: a `stack_layers` module, or a `LayerList` (always unrolled).
    body: one layer's step; `layer_l` is the layer-l module (of a stack: a view of the stacked parameters).
    carry: what flows from layer to layer (hidden states); a pytree of arrays.
    per_layer: for a stack, a pytree whose leaves have the leading layer axis [n, ...] (KV caches, per-layer flags);
      for a LayerList, a tuple of n per-layer pytrees; or None.
    scan: True runs a stack as one `jax.lax.scan` (the body compiled once); False unrolls the layers in Python.
    remat: each layer's activations are recomputed in the backward pass (only its inputs are saved). XLA:CPU's
      default concurrency-optimised scheduler moves the recomputation back into the forward pass, so on CPU the
      saving needs `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`.
  Returns:
    (final carry, the layers' outputs in the form `per_layer` takes: for a stack, stacked along a new leading axis
    [n, ...]; for a LayerList, a tuple of n; None when every output is None).
  """
  listed = isinstance(layers, LayerList)
  graphdef, params = nnx.split(layers.layers[0] if listed else layers)

  def step(carry, inputs):
    layer_params, layer_inputs = inputs
    return body(nnx.merge(graphdef, layer_params), carry, layer_inputs)

  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=listed or not scan)
  if scan and not listed:
    return jax.lax.scan(step, carry, (params, per_layer))
  outputs = []
  for index in range(num_layers(layers)):
    if listed:
      inputs = (nnx.state(layers.layers[index]), None if per_layer is None else per_layer[index])
    else:
      inputs = jax.tree.map(lambda x: x[index], (params, per_layer))
    carry, out = step(carry, inputs)
    outputs.append(out)
  if not jax.tree.leaves(outputs):
    return carry, None
  return carry, tuple(outputs) if listed else jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
