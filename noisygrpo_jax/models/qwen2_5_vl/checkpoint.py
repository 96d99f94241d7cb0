"""Loading and saving HF Qwen2.5-VL checkpoints (config.json + safetensors), optionally straight onto a mesh.

Tensors are read through a memory map of each safetensors file: the installed safetensors' numpy
framework cannot return bfloat16 (numpy has no such dtype) and its flax framework returns arrays on the
default device, so the header is parsed here and bfloat16 is decoded with ml_dtypes. A parameter shard
touches only the pages of its slice and is converted to the target dtype on its own, so loading never
holds more than one tensor on the host. Nothing is unpickled: PyTorch `*.bin` / `*.pt` files are refused.
"""

from __future__ import annotations

import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from noisygrpo_jax import atomic_io
from noisygrpo_jax import sharding as sharding_lib
from noisygrpo_jax.models.qwen2_5_vl import config as config_lib
from noisygrpo_jax.models.qwen2_5_vl import lora as lora_lib
from noisygrpo_jax.models.qwen2_5_vl import param_names
from noisygrpo_jax.models.qwen2_5_vl.model import Qwen25VL

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PATCH_EMBED = ("visual", "patch_embed", "proj")
_TIED_HEAD = "lm_head.weight"

# safetensors dtype codes; the format is little-endian.
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool)}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


# ------------------------------------------------------------------------------------------------
# safetensors files


def _read_tensors(file: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file as a read-only view of a memory map (nothing is read yet)."""
  with open(file, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
  tensors = {}
  for key, entry in header.items():
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{file}: tensor {key!r} has dtype {entry['dtype']}; supported: {sorted(_DTYPES)}.")
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != dtype.itemsize * int(np.prod(shape)) or end > data.size:
      raise ValueError(f"{file}: tensor {key!r} of shape {shape} {entry['dtype']} has data_offsets "
                       f"{[begin, end]} outside the file or of the wrong size; the file is corrupt.")
    tensors[key] = data[begin:end].view(dtype).reshape(shape)
  return tensors


def _shards(index: str) -> list[str]:
  """The files listed by a `model.safetensors.index.json`."""
  with open(index) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  return [os.path.join(os.path.dirname(index), shard) for shard in shards]


def _weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory: `model.safetensors`, else the shards of the index."""
  single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    return _shards(index)
  pickles = sorted(name for name in os.listdir(path) if name.endswith(_PICKLE_SUFFIXES))
  if pickles:
    raise ValueError(f"{path}: only PyTorch pickle weights ({', '.join(pickles)}); safetensors is required "
                     f"because pickles can run arbitrary code and are never loaded here. Convert them with "
                     f"transformers: `Qwen2_5_VLForConditionalGeneration.from_pretrained(path)"
                     f".save_pretrained(out, safe_serialization=True)`.")
  raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}; point to a local HF Qwen2.5-VL "
                          "checkpoint directory.")


def _checkpoint_tensors(path: str) -> dict[str, tuple[str, str, np.ndarray]]:
  """canonical HF key -> (key as stored, file, memory-mapped tensor) over all weight files."""
  out = {}
  for file in _weight_files(path):
    for key, tensor in _read_tensors(file).items():
      canonical = param_names.canonical_hf_key(key)
      if canonical in out:
        raise ValueError(f"{path}: tensor {canonical!r} is stored twice ({out[canonical][0]!r} in "
                         f"{out[canonical][1]}, {key!r} in {file}).")
      out[canonical] = (key, file, tensor)
  return out


# ------------------------------------------------------------------------------------------------
# Loading


def _patch_shape(vision: config_lib.VisionConfig) -> tuple[int, int, int, int]:
  """(C, T, P, P): the HF Conv3d kernel shape of one output channel."""
  return (vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)


def _hf_shape(path: tuple, shape: tuple[int, ...], patch_shape) -> tuple[int, ...]:
  """The HF tensor shape of our parameter of `shape` (of each layer's tensor when stacked)."""
  layout = functools.partial(param_names.to_hf_layout, path, patch_shape=patch_shape)
  layer_shape = shape[1:] if param_names.is_stacked(path) else shape
  return jax.eval_shape(layout, jax.ShapeDtypeStruct(layer_shape, jnp.float32)).shape


def _check_tensors(path: str, flat, tensors, config: config_lib.Qwen25VLConfig) -> None:
  """Raises ValueError listing every missing, unexpected and mis-shaped tensor."""
  patch_shape = _patch_shape(config.vision)
  expected = {}
  for p, v in flat:
    shape = v.get_value().shape
    expected.update(dict.fromkeys(param_names.layer_keys(p, shape), _hf_shape(p, shape, patch_shape)))
  ignored = {_TIED_HEAD} if config.text.tie_word_embeddings else set()
  problems = [f"missing: {key} (expected shape {shape})" for key, shape in expected.items() if key not in tensors]
  for canonical, (key, file, tensor) in sorted(tensors.items()):
    if canonical in ignored:
      continue
    if canonical not in expected:
      problems.append(f"unexpected: {key} (shape {tensor.shape}) in {file}")
    elif tensor.shape != expected[canonical]:
      problems.append(f"wrong shape: {key} expected {expected[canonical]}, found {tensor.shape} in {file}")
  if problems:
    raise ValueError(f"{path}: the checkpoint does not match its config.json:\n  " + "\n  ".join(problems))


def _read_layer_slice(path: tuple, tensor: np.ndarray, index: tuple[slice, ...], dtype) -> np.ndarray:
  """The slice `index` of one layer's parameter (our layout) from its HF tensor, as a new array of `dtype`."""
  if path[:3] == _PATCH_EMBED:  # a reshape of the whole Conv3d weight (about 1176 x 1280): read it whole
    return np.array(param_names.from_hf_layout(path, tensor)[index], dtype)
  if path[-1] == "kernel":  # our [in, out] slice is the transpose of HF's [out, in] slice
    return np.array(param_names.from_hf_layout(path, tensor[index[::-1]]), dtype)
  return np.array(tensor[index], dtype)


def _read_slice(path: tuple, tensors: list[np.ndarray], index: tuple[slice, ...], dtype) -> np.ndarray:
  """The slice `index` of our parameter from its HF tensors (one per layer when stacked, which index[0] selects)."""
  if not param_names.is_stacked(path):
    return _read_layer_slice(path, tensors[0], index, dtype)
  layers = range(len(tensors))[index[0]]
  return np.stack([_read_layer_slice(path, tensors[i], index[1:], dtype) for i in layers])


def _initial_adapters(config: config_lib.Qwen25VLConfig, seed: int, shardings: dict) -> dict:
  """flat path -> the adapters' initial values of `Qwen25VL(config, nnx.Rngs(seed))`, placed with `shardings` (flat
  path -> sharding). Only the adapters are computed: the jitted model's other parameters are dead code."""
  def init():
    state = nnx.state(Qwen25VL(config, nnx.Rngs(seed)), nnx.Param)
    return {p: v.get_value() for p, v in nnx.to_flat_state(state) if lora_lib.is_adapter(p)}
  return jax.jit(init, out_shardings=shardings)()


def load_hf(path: str | os.PathLike, dtype=None, mesh: Mesh | None = None,
            lora: config_lib.LoraConfig = config_lib.LoraConfig(), seed: int = 0) -> Qwen25VL:
  """Loads a local HF Qwen2.5-VL checkpoint directory.

  Args:
    path: directory with config.json and `model.safetensors` or `model.safetensors.index.json` + shards;
      keys in the transformers >= 4.52 layout (`model.language_model.*`, `model.visual.*`) or the older one
      (`model.*`, `visual.*`).
    dtype: parameter and activation dtype, "float32" (default) or "bfloat16" (names or jnp dtypes).
    mesh: when given, each parameter is created sharded by its logical axis names (sharding.py), each
      device shard read directly from the file; otherwise parameters live on the default device.
    lora: low-rank adapters to add (rank 0: none); they are not in the checkpoint and take the initial values of
      `Qwen25VL(config, nnx.Rngs(seed))`, so the loaded model computes exactly what the checkpoint does.
  Returns:
    The model; config.dtype is `dtype`, config.lora is `lora`.
  Raises:
    ValueError: the config is not Qwen2.5-VL, the weights are pickles, or tensors are missing, unexpected
      or mis-shaped (all listed, with expected and found shapes and the file).
  """
  path = os.fspath(path)
  config = config_lib.from_hf_json(path, dtype=jnp.dtype(dtype or "float32").name, lora=lora)
  tensors = _checkpoint_tensors(path)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(seed))))
  flat = nnx.to_flat_state(state)
  _check_tensors(path, [(p, v) for p, v in flat if not lora_lib.is_adapter(p)], tensors, config)
  target = jnp.dtype(config.dtype)
  shardings = {}
  for p, variable in flat:
    shape = variable.get_value().shape
    shardings[p] = (sharding_lib.logical_sharding(variable.get_metadata().get("out_sharding"), mesh, shape)
                    if mesh is not None else SingleDeviceSharding(jax.local_devices()[0]))
  adapters = (_initial_adapters(config, seed, {p: s for p, s in shardings.items() if lora_lib.is_adapter(p)})
              if lora.rank else {})
  for p, variable in flat:
    if lora_lib.is_adapter(p):
      variable.set_value(adapters[p])
      continue
    shape = variable.get_value().shape
    layer_tensors = [tensors[key][2] for key in param_names.layer_keys(p, shape)]
    variable.set_value(jax.make_array_from_callback(
        shape, shardings[p], functools.partial(_read_slice, p, layer_tensors, dtype=target)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------------------------
# Saving


def _write_safetensors(file, entries, metadata: dict[str, str]) -> None:
  """Streams tensors into a safetensors file, one on the host at a time.

  entries: (key, shape, numpy dtype, thunk returning the host array) in the order they are written.
  """
  header, offset = {"__metadata__": metadata}, 0
  for key, shape, dtype, _ in entries:
    size = dtype.itemsize * int(np.prod(shape))
    header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as the safetensors writer does
  file.write(struct.pack("<Q", len(encoded)) + encoded)
  for key, shape, dtype, read in entries:
    array = np.ascontiguousarray(read(), dtype)
    assert array.shape == tuple(shape), (key, array.shape, shape)
    file.write(memoryview(array.reshape(-1).view(np.uint8)))


def _host_tensor(path: tuple, value: jax.Array, layer: int | None, patch_shape, adapter=None) -> np.ndarray:
  """One parameter (its slice `layer` when stacked) gathered to the host, in the HF layout; a kernel with an
  `adapter` (lora_a, lora_b, scale) is merged with it first (lora.merged_kernel)."""
  pick = lambda x: x if layer is None else x[layer]
  value = pick(value)
  if adapter is not None:
    lora_a, lora_b, scale = adapter
    value = lora_lib.merged_kernel(value, pick(lora_a), pick(lora_b), scale)
  return param_names.to_hf_layout(path, np.asarray(jax.device_get(value)), patch_shape)


def save_hf(model: Qwen25VL, path: str | os.PathLike) -> None:
  """Writes `config.json` and `model.safetensors` (HF key layout of transformers >= 4.52) into `path`.

  Each file is written to a temp file in `path` and renamed into place, so a crash never leaves a
  partly written file. Sharded weights from an earlier save in `path` (index + shards) are removed once
  the new file is in place, so the directory holds one checkpoint; other files (tokenizer, ...) are kept.
  Parameters are gathered to the host one at a time and saved in their dtype (bfloat16 stays bfloat16). Low-rank
  adapters (config.lora) are merged into their kernels, W + (alpha / r) A @ B computed in float32 and cast to W's
  dtype, one layer at a time: the checkpoint is a plain Qwen2.5-VL that computes what the adapted model does.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config = model.config
  patch_shape = _patch_shape(config.vision)
  params = {p: variable.get_value() for p, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  entries = []
  for p, value in params.items():
    if lora_lib.is_adapter(p):
      continue
    lora_a = params.get(p[:-1] + ("lora_a",)) if p[-1] == "kernel" else None
    adapter = None if lora_a is None else (lora_a, params[p[:-1] + ("lora_b",)], config.lora.scale)
    hf_shape = _hf_shape(p, value.shape, patch_shape)
    keys = param_names.layer_keys(p, value.shape)
    layers = range(len(keys)) if param_names.is_stacked(p) else [None]
    for key, layer in zip(keys, layers):
      entries.append((key, hf_shape, np.dtype(value.dtype), functools.partial(_host_tensor, p, value, layer,
                                                                               patch_shape, adapter)))
  # Widest dtypes first keeps every tensor aligned to its item size.
  entries.sort(key=lambda e: (-e[2].itemsize, e[0]))

  stale_index = os.path.join(path, INDEX_NAME)
  stale = _shards(stale_index) + [stale_index] if os.path.exists(stale_index) else []
  atomic_io.replace_atomically(os.path.join(path, WEIGHTS_NAME),
                      lambda f: _write_safetensors(f, entries, {"format": "pt"}))
  atomic_io.replace_atomically(os.path.join(path, "config.json"),
                      lambda f: f.write(json.dumps(config_lib.to_hf_dict(config), indent=2).encode()))
  for file in stale:
    if os.path.basename(file) != WEIGHTS_NAME:
      os.remove(file)
