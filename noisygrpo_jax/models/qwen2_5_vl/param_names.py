"""The rename-and-transpose table between our parameter paths and HF checkpoint keys.

Our paths are nnx flat-state paths, e.g. ('language_model', 'layers', 'self_attn', 'q_proj', 'kernel'). The decoder
layers and the vision blocks are stacked (`stacking`): one array [n, ...] per parameter, which HF stores as n tensors
(`model.language_model.layers.{i}.self_attn.q_proj.weight`); `layer_keys` lists them and the layouts below convert
one layer's slice at a time. HF keys use the transformers >= 4.52 layout (`model.language_model.*`, `model.visual.*`,
`lm_head.*`); older checkpoints (`model.*`, `visual.*`) are accepted by `canonical_hf_key`. The decoder's low-rank
adapters (lora.py) have no HF key: `checkpoint.save_hf` merges them into their kernels.
"""

from __future__ import annotations

import numpy as np

from noisygrpo_jax.models.qwen2_5_vl import lora

# Our merger MLP is a two-entry list; HF's nn.Sequential has the GELU at index 1.
_MERGER_INDEX = {"0": "0", "1": "2"}

# Our stacked modules: the HF layer index goes after these two path entries.
STACKED = (("language_model", "layers"), ("visual", "blocks"))


def is_stacked(path: tuple) -> bool:
  """Whether the parameter at `path` holds one slice per layer along its leading axis."""
  return tuple(path[:2]) in STACKED


def hf_key(path: tuple, layer: int | None = None) -> str:
  """Our flat-state path (and, for a stacked parameter, the layer) -> the HF key (new layout)."""
  parts = [str(p) for p in path]
  if lora.is_adapter(path):
    raise ValueError(f"{'.'.join(parts)} is a low-rank adapter, which HF checkpoints do not hold; save_hf merges "
                     "it into its kernel")
  if is_stacked(path):
    if layer is None:
      raise ValueError(f"{'.'.join(parts)} is stacked over layers: its HF key needs the layer index")
    parts.insert(2, str(layer))
  if parts[:3] == ["visual", "merger", "mlp"]:
    parts[3] = _MERGER_INDEX[parts[3]]
  if parts[-1] in ("kernel", "embedding"):
    parts[-1] = "weight"
  if parts[0] in ("visual", "language_model"):
    parts = ["model"] + parts
  return ".".join(parts)


def canonical_hf_key(key: str) -> str:
  """Maps both HF key layouts onto the new one."""
  if key.startswith("visual."):
    return "model." + key
  if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
    return "model.language_model." + key[len("model."):]
  return key


def layer_keys(path: tuple, shape: tuple[int, ...]) -> list[str]:
  """The HF keys of our parameter of `shape`: one per layer (stacked), else one."""
  return [hf_key(path, layer) for layer in range(shape[0])] if is_stacked(path) else [hf_key(path)]


def to_hf_layout(path: tuple, value: np.ndarray, patch_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Our array (one layer's slice of a stacked parameter) -> the HF tensor layout. `patch_shape` is (C, T, P, P) for
  the patch embedding."""
  name = path[-1]
  if path[:3] == ("visual", "patch_embed", "proj"):
    return value.T.reshape((value.shape[1],) + tuple(patch_shape))
  if name == "kernel":
    return value.T
  return value


def from_hf_layout(path: tuple, tensor: np.ndarray) -> np.ndarray:
  """HF tensor -> our array layout (one layer's slice of a stacked parameter; Conv3d patch weight -> [1176, hidden];
  Linear weight -> [in, out])."""
  if path[:3] == ("visual", "patch_embed", "proj"):
    return tensor.reshape(tensor.shape[0], -1).T
  if path[-1] == "kernel":
    return tensor.T
  return tensor
