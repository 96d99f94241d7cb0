"""The rename-and-transpose table between our parameter paths and HF checkpoint keys.

Our paths are nnx flat-state paths, e.g. ('language_model', 'layers', 0, 'self_attn', 'q_proj', 'kernel').
HF keys use the transformers >= 4.52 layout (`model.language_model.*`, `model.visual.*`, `lm_head.*`);
older checkpoints (`model.*`, `visual.*`) are accepted by `canonical_hf_key`.
"""

from __future__ import annotations

import re

import numpy as np

# Our merger MLP is a two-entry list; HF's nn.Sequential has the GELU at index 1.
_MERGER_INDEX = {"0": "0", "1": "2"}
_MERGER_INDEX_BACK = {v: k for k, v in _MERGER_INDEX.items()}


def hf_key(path: tuple) -> str:
  """Our flat-state path -> the HF key (new layout)."""
  parts = [str(p) for p in path]
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


def our_path(key: str) -> tuple:
  """Inverse of `hf_key` (for error messages and export); integers become ints."""
  parts = canonical_hf_key(key).split(".")[1:] if key.startswith(("model.", "visual.")) else key.split(".")
  if parts[:3] == ["visual", "merger", "mlp"]:
    parts[3] = _MERGER_INDEX_BACK[parts[3]]
  return tuple(int(p) if re.fullmatch(r"\d+", p) else p for p in parts)


def to_hf_layout(path: tuple, value: np.ndarray, patch_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Our array -> the HF tensor layout. `patch_shape` is (C, T, P, P) for the patch embedding."""
  name = path[-1]
  if path[:3] == ("visual", "patch_embed", "proj"):
    return value.T.reshape((value.shape[1],) + tuple(patch_shape))
  if name == "kernel":
    return value.T
  return value


def from_hf_layout(path: tuple, tensor: np.ndarray) -> np.ndarray:
  """HF tensor -> our array layout (Conv3d patch weight -> [1176, hidden]; Linear weight -> [in, out])."""
  if path[:3] == ("visual", "patch_embed", "proj"):
    return tensor.reshape(tensor.shape[0], -1).T
  if path[-1] == "kernel":
    return tensor.T
  return tensor
