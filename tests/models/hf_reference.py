"""The transformers PyTorch Qwen2.5-VL as ground truth: tiny random models built in code, no downloads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg
from noisygrpo_jax.models.qwen2_5_vl import param_names
from noisygrpo_jax.processing import chat_template


def hf_model(config: cfg.Qwen25VLConfig, seed: int = 0) -> transformers.Qwen2_5_VLForConditionalGeneration:
  """A float32 eager-attention HF model with weights large enough that parity is not trivial."""
  torch.manual_seed(seed)
  hf_config = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(config))
  hf_config._attn_implementation = "eager"
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.05))
  return model


def ours_from_hf(model: transformers.Qwen2_5_VLForConditionalGeneration, config: cfg.Qwen25VLConfig) -> Qwen25VL:
  """Our model carrying the HF model's weights (through the same rename table as the checkpoint loader)."""
  ours = nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(ours)
  hf = {param_names.canonical_hf_key(k): v.detach().float().numpy() for k, v in model.state_dict().items()}
  flat = nnx.to_flat_state(state)
  for path, variable in flat:
    layers = [param_names.from_hf_layout(path, hf[key])
              for key in param_names.layer_keys(path, variable.get_value().shape)]
    tensor = np.stack(layers) if param_names.is_stacked(path) else layers[0]
    assert tensor.shape == variable.get_value().shape, path
    variable.set_value(jnp.asarray(tensor, dtype=jnp.dtype(config.dtype)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def token_types(input_ids: np.ndarray, config: cfg.Qwen25VLConfig) -> np.ndarray:
  return np.where(input_ids == config.image_token_id, 1, np.where(input_ids == config.video_token_id, 2, 0))


def hf_inputs(config, input_ids, attention_mask=None, **vision) -> dict:
  """numpy inputs -> the torch kwargs of the HF forward (with mm_token_type_ids, which HF needs for M-RoPE)."""
  out = {"input_ids": torch.tensor(input_ids), "mm_token_type_ids": torch.tensor(token_types(input_ids, config))}
  if attention_mask is not None:
    out["attention_mask"] = torch.tensor(attention_mask)
  for k, v in vision.items():
    if v is not None:
      out[k] = torch.tensor(v)
  return out


def prompt(config, rng: np.random.Generator, spans: list, text_len: tuple[int, int] = (3, 8)) -> list[int]:
  """Token ids: random text around each vision span; spans are ('image'|'video', grid_thw)."""
  vocab = config.text.vocab_size - 8
  ids = list(rng.integers(0, vocab, rng.integers(*text_len)))
  for kind, (t, h, w) in spans:
    pad = config.image_token_id if kind == "image" else config.video_token_id
    ids += [config.vision_start_token_id] + [pad] * (t * h * w // config.vision.merge_unit)
    ids += [config.vision_end_token_id] + list(rng.integers(0, vocab, rng.integers(*text_len)))
  return ids


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_id, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    ids[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  return ids, mask


def pixels(rng: np.random.Generator, grids, config) -> np.ndarray:
  n = sum(int(np.prod(g)) for g in grids)
  return rng.standard_normal((n, config.vision.patch_dim)).astype(np.float32)


# The released Jinja template (tests render it the way transformers renders chat templates: sandboxed Jinja with
# trim_blocks and lstrip_blocks).
QWEN2_5_VL_JINJA = chat_template.QWEN2_5_VL_JINJA
