"""What trains, what stays frozen, and the dtype each copy of the weights is kept in (mixed precision).

The dtype policy, as DeepSpeed bf16 / MaxText run it (model.dtype float32, model.compute_dtype bfloat16):
- trainable weights (the decoder and LM head; the vision tower too unless optim.freeze_vision), their
  gradients (also accumulated over micro-batches) and the AdamW moments: model.dtype (the float32 master);
- forward and backward: model.compute_dtype (the trainable weights are cast inside the step);
- frozen weights (the vision tower and merger under optim.freeze_vision): stored once, in the compute dtype,
  shared by the policy update, the rollouts and the reference model; never copied, never held in float32;
- rollouts and evaluation: a compute-dtype copy of the trainable weights, made after each update, with the decoder
  layers held one array per layer (`decoding_copy`; a copy of the frozen ones too when they are decoder layers);
- the KL reference model: a compute-dtype copy of the initial trainable weights only (it shares the frozen ones).
With compute_dtype "" (or equal to model.dtype) every copy is in model.dtype: the tiny preset's all-float32 run.

With LoRA (model lora.rank > 0) only the decoder's adapters train: they are the trainable tree (with their
gradients, moments, rollout copy and the reference's copy, all small), and every base weight is frozen, stored once in
the compute dtype, so the KL reference model is the base with the initial (zero-output) adapters and no copy of it.

Parameter trees are pure dicts (nnx.to_pure_dict) whose top-level keys are the model's submodules (`visual`,
`language_model`, `lm_head`); the trainable and frozen trees are two disjoint sub-trees of it (empty dicts dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Sharding

from noisygrpo_jax.models.qwen2_5_vl import lora, stacking, unstacked_decoder

FROZEN_WHEN_VISION_IS_FROZEN = ("visual",)  # the ViT and its merger: everything under `visual`


def split(tree: dict, trains, path: tuple = ()) -> tuple[dict, dict]:
  """(leaves at paths where `trains(path)`, the others) of a nested dict, keeping the nesting (empty dicts dropped);
  `path` is a leaf's tuple of keys."""
  trainable, frozen = {}, {}
  for key, value in tree.items():
    if not isinstance(value, dict):
      (trainable if trains(path + (key,)) else frozen)[key] = value
      continue
    for part, sub in zip((trainable, frozen), split(value, trains, path + (key,))):
      if sub:
        part[key] = sub
  return trainable, frozen


def partition(params: dict, freeze_vision: bool, adapters_only: bool = False) -> tuple[dict, dict]:
  """(trainable, frozen) pure-dict trees of the model's parameters.

  adapters_only (LoRA): the adapter leaves (lora.is_adapter) train, everything else is frozen. Otherwise everything
  trains but the vision tower under freeze_vision (`frozen` is {} without it).
  """
  if adapters_only:
    return split(params, lora.is_adapter)
  return split(params, lambda path: not (freeze_vision and path[0] in FROZEN_WHEN_VISION_IS_FROZEN))


def combine(trainable: dict, frozen: dict) -> dict:
  """The full parameter tree of `partition`'s two parts, merged key by key at every depth (no array is copied)."""
  merged = dict(trainable)
  for key, value in frozen.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(merged[key], dict) and isinstance(value, dict):
      merged[key] = combine(merged[key], value)
    else:
      raise ValueError(f"parameter {key!r} is both trainable and frozen")
  return merged


def cast(tree, dtype: str):
  """`tree` with every floating-point leaf in `dtype` ("" keeps each leaf as it is). A leaf already in `dtype`
  is returned as it is (the same buffer): use `copy_as` for an independent copy."""
  if not dtype:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def copy_as(tree, dtype: str):
  """An independent copy of `tree` (new buffers, same shardings) with floating-point leaves in `dtype`
  ("" keeps each leaf's dtype): the reference model's weights, which must outlive the donated train state."""
  def copy(x):
    target = dtype if dtype and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return jnp.copy(x) if target == x.dtype else x.astype(target)
  return jax.tree.map(copy, tree)


@functools.cache
def _unstack(dtype: str, sharding: Sharding | None):
  """The jitted `stacking.unstack_params` casting to `dtype`, its outputs placed in `sharding` (None: where XLA puts
  them, which keeps the inputs' sharding of the other axes)."""
  unstack = functools.partial(stacking.unstack_params, dtype=dtype)
  return jax.jit(unstack) if sharding is None else jax.jit(unstack, out_shardings=sharding)


def decoding_copy(tree: dict, dtype: str, sharding: Sharding | None = None) -> dict:
  """`tree` (pure dict, all or part of the parameters) as decoding reads it: floating-point leaves in `dtype`
  (`cast`: a leaf already in it is not copied), the decoder layers' (`language_model.layers`, stacked [layers, ...])
  unstacked into one array per layer (the layout of `unstacked_decoder`'s `stacking.LayerList`: a copy, cast in the
  same program), everything placed in `sharding` when given (else where it is). A model merged from it needs the
  graphdef of `unstacked_decoder` (`loops.Run.model`)."""
  language = tree.get("language_model", {})
  rest = tree
  if "layers" in language:
    rest = {**tree, "language_model": {k: v for k, v in language.items() if k != "layers"}}
  rest = cast(rest, dtype)
  if sharding is not None:
    rest = jax.device_put(rest, sharding)
  if "layers" in language:
    rest["language_model"]["layers"] = _unstack(dtype, sharding)(language["layers"])
  return rest


def rollout_copy(trainable: dict, frozen: dict, dtype: str, sharding: Sharding | None = None) -> dict:
  """The full parameter tree rollouts and evaluation read: `decoding_copy` of the trainable parameters and of the
  frozen ones the decode loop reads (all but the vision tower: with LoRA the base decoder, otherwise none; a
  frozen leaf in `dtype` outside the decoder layers is not copied unless placed), and the state's vision tower,
  shared (it runs in the prefill only)."""
  decoded = {k: v for k, v in frozen.items() if k not in FROZEN_WHEN_VISION_IS_FROZEN}
  shared = {k: v for k, v in frozen.items() if k in FROZEN_WHEN_VISION_IS_FROZEN}
  return combine(decoding_copy(combine(trainable, decoded), dtype, sharding), shared)


def rollout_graphdef(graphdef: nnx.GraphDef, params: dict) -> nnx.GraphDef:
  """The graphdef a `rollout_copy` tree merges with: that of the model of `graphdef` and the full stacked parameter
  tree `params` (arrays or shapes; nothing is computed) with its decoder layers unstacked (`unstacked_decoder`)."""
  return nnx.graphdef(nnx.eval_shape(lambda p: unstacked_decoder(nnx.merge(graphdef, p)), params))
