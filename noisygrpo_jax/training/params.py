"""What trains, what stays frozen, and the dtype each copy of the weights is kept in (mixed precision).

The dtype policy, as DeepSpeed bf16 / MaxText run it (model.dtype float32, model.compute_dtype bfloat16):
- trainable weights (the decoder and LM head; the vision tower too unless optim.freeze_vision), their
  gradients (also accumulated over micro-batches) and the AdamW moments: model.dtype (the float32 master);
- forward and backward: model.compute_dtype (the trainable weights are cast inside the step);
- frozen weights (the vision tower and merger under optim.freeze_vision): stored once, in the compute dtype,
  shared by the policy update, the rollouts and the reference model; never copied, never held in float32;
- rollouts and evaluation: a compute-dtype copy of the trainable weights, made after each update;
- the KL reference model: a compute-dtype copy of the initial trainable weights only (it shares the frozen ones).
With compute_dtype "" (or equal to model.dtype) every copy is in model.dtype: the tiny preset's all-float32 run.

Parameter trees are pure dicts (nnx.to_pure_dict) whose top-level keys are the model's submodules (`visual`,
`language_model`, `lm_head`); the trainable and frozen trees split those keys between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FROZEN_WHEN_VISION_IS_FROZEN = ("visual",)  # the ViT and its merger: everything under `visual`


def partition(params: dict, freeze_vision: bool) -> tuple[dict, dict]:
  """(trainable, frozen) pure-dict trees of the model's parameters; `frozen` is {} unless freeze_vision."""
  frozen_keys = FROZEN_WHEN_VISION_IS_FROZEN if freeze_vision else ()
  return ({k: v for k, v in params.items() if k not in frozen_keys},
          {k: v for k, v in params.items() if k in frozen_keys})


def combine(trainable: dict, frozen: dict) -> dict:
  """The full parameter tree of `partition`'s two parts (no array is copied)."""
  overlap = set(trainable) & set(frozen)
  if overlap:
    raise ValueError(f"parameter groups {sorted(overlap)} are both trainable and frozen")
  return {**trainable, **frozen}


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
