"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections, built as PEFT and MaxText build them.

An adapted Linear computes y = x @ W + b + (alpha / r) * (x @ lora_a) @ lora_b, with lora_a [in, r] drawn
kaiming-uniform (PEFT's init: U(-1/sqrt(in), 1/sqrt(in))) and lora_b [r, out] zero, so a new adapter changes
nothing: the model's output equals the base model's exactly. In the stacked decoder the adapters are stacked like
every layer parameter (lora_a [layers, in, r], lora_b [layers, r, out]) and run inside the layer scan. They are
not HF checkpoint keys: `load_hf` leaves them at their initial value and `save_hf` merges them into the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl.config import LoraConfig

ADAPTER_NAMES = ("lora_a", "lora_b")
A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # bound sqrt(3 * (1/3) / in) = 1/sqrt(in)
# Folded into the model's parameter key to seed the adapters' own stream; no parameter draw reaches this count.
_STREAM_SALT = 0x4C6F5241


def is_adapter(path: tuple) -> bool:
  """Whether the parameter at `path` (a flat-state or pure-dict path) is an adapter matrix."""
  return bool(path) and path[-1] in ADAPTER_NAMES


class Adapters:
  """What the decoder's Linears need to build their adapters: the settings and a random stream of their own.

  The adapters draw from a stream seeded by the model's parameter key (not from the model's stream), so a model
  with adapters draws exactly the base weights of the same model without them.
  """

  def __init__(self, config: LoraConfig, rngs: nnx.Rngs):
    self.config = config
    self.rngs = nnx.Rngs(params=jax.random.fold_in(rngs.params.key[...], _STREAM_SALT))


def merged_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
  """kernel + scale * lora_a @ lora_b, computed in float32 and returned in the kernel's dtype.

  Args:
    kernel: [..., in, out]; lora_a: [..., in, r]; lora_b: [..., r, out] (leading layer axes broadcast).
  """
  delta = jnp.matmul(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
