"""Qwen2.5-VL architecture configuration: presets and parsing of HF `config.json`.

The config is a frozen dataclass so it can be a static argument of jitted functions. It holds the
architecture only, plus runtime choices that change the traced program (`dtype`, `remat`, `scan_layers`, `lora`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT: patch embedding, `depth` blocks (window or full attention), and the patch merger."""

  depth: int = 32  # number of transformer blocks
  hidden_size: int = 1280  # ViT width
  intermediate_size: int = 3420  # SwiGLU hidden width of each block
  num_heads: int = 16  # attention heads (head_dim = hidden_size // num_heads)
  in_channels: int = 3  # RGB
  patch_size: int = 14  # spatial patch side in pixels
  temporal_patch_size: int = 2  # frames per patch (still images are duplicated)
  spatial_merge_size: int = 2  # the merger fuses merge x merge neighbouring patches into one token
  window_size: int = 112  # window side in pixels for windowed-attention blocks
  out_hidden_size: int = 2048  # merger output width == text hidden size
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks with per-image attention
  tokens_per_second: int = 2  # temporal M-RoPE scale for videos
  rope_theta: float = 10000.0  # base of the 2-D vision RoPE
  hidden_act: str = "silu"  # activation of the SwiGLU MLP

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch (1176 for Qwen2.5-VL)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    """Patches fused into one language-model token."""
    return self.spatial_merge_size**2

  @property
  def merger_window(self) -> int:
    """Window side measured in merged tokens (4 for the released models: 112 // 2 // 14)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 decoder with multimodal RoPE."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2  # grouped-query attention
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)  # rotary pairs given to the (t, h, w) axes
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the decoder's projections (models/qwen2_5_vl/lora.py); rank 0 builds none."""

  rank: int = 0  # r: columns of lora_a [in, r] and rows of lora_b [r, out]; 0 = no adapters
  alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
  targets: tuple[str, ...] = LORA_TARGETS  # decoder projections that get an adapter (a subset of LORA_TARGETS)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def rank_of(self, target: str) -> int:
    """The adapter rank of the decoder projection `target` (0: none)."""
    return self.rank if target in self.targets else 0


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Full model: vision tower + decoder + the special token ids that join them."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  image_token_id: int = 151655  # <|image_pad|>
  video_token_id: int = 151656  # <|video_pad|>
  vision_start_token_id: int = 151652  # <|vision_start|>
  vision_end_token_id: int = 151653  # <|vision_end|>
  dtype: str = "float32"  # parameter and activation dtype: "float32" or "bfloat16"
  remat: bool = False  # rematerialise each decoder layer and vision block in the backward pass
  scan_layers: bool = True  # run the decoder layers and vision blocks as one lax.scan each (False: unrolled)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # low-rank adapters on the decoder

  def __post_init__(self):
    validate(self)

  def replace(self, **kwargs) -> "Qwen25VLConfig":
    return dataclasses.replace(self, **kwargs)


def validate(config: Qwen25VLConfig) -> None:
  """Raises ValueError naming the field when the architecture is inconsistent."""
  v, t = config.vision, config.text
  problems = []
  if v.hidden_size % v.num_heads:
    problems.append(f"vision.hidden_size={v.hidden_size} is not divisible by vision.num_heads={v.num_heads}")
  if v.head_dim % 4:
    problems.append(f"vision head_dim={v.head_dim} must be a multiple of 4 for the 2-D vision RoPE")
  if t.hidden_size % t.num_attention_heads:
    problems.append(
        f"text.hidden_size={t.hidden_size} is not divisible by text.num_attention_heads={t.num_attention_heads}")
  if t.num_attention_heads % t.num_key_value_heads:
    problems.append(f"text.num_attention_heads={t.num_attention_heads} is not a multiple of "
                    f"text.num_key_value_heads={t.num_key_value_heads}")
  if sum(t.mrope_section) * 2 != t.head_dim:
    problems.append(f"text.mrope_section={t.mrope_section} must sum to head_dim/2={t.head_dim // 2}")
  if v.out_hidden_size != t.hidden_size:
    problems.append(f"vision.out_hidden_size={v.out_hidden_size} must equal text.hidden_size={t.hidden_size}")
  if v.merger_window < 1:
    problems.append(f"vision.window_size={v.window_size} is smaller than one merged token "
                    f"({v.spatial_merge_size * v.patch_size} px)")
  for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
    if not 0 <= getattr(config, name) < t.vocab_size:
      problems.append(f"{name}={getattr(config, name)} is outside the vocabulary (size {t.vocab_size}); "
                      "set it explicitly for a small vocabulary")
  if config.dtype not in ("float32", "bfloat16"):
    problems.append(f"dtype={config.dtype!r} must be 'float32' or 'bfloat16'")
  problems += lora_problems(config.lora)
  if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
    problems.append(f"vision.fullatt_block_indexes={v.fullatt_block_indexes} must lie in [0, depth={v.depth})")
  if problems:
    raise ValueError("Invalid Qwen2.5-VL config:\n  " + "\n  ".join(problems))


def lora_problems(lora: LoraConfig) -> list[str]:
  """What is wrong with the adapter settings, one line per field with its fix (empty: nothing)."""
  problems = []
  if lora.rank < 0:
    problems.append(f"lora.rank={lora.rank} must be >= 0 (0 = no adapters)")
  unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
  if unknown:
    problems.append(f"lora.targets={tuple(lora.targets)}: {unknown} are not decoder projections; choose from "
                    f"{LORA_TARGETS}")
  if lora.rank and not lora.targets:
    problems.append(f"lora.rank={lora.rank} with no lora.targets: name the projections to adapt, or set rank 0")
  if lora.rank and not lora.alpha > 0:
    problems.append(f"lora.alpha={lora.alpha} must be > 0 (the adapter output is scaled by alpha / rank)")
  return problems


# ------------------------------------------------------------------------------------------------
# Presets. The 3B and 7B values are those of the released Qwen2.5-VL-*-Instruct config.json files.


def qwen2_5_vl_3b(**overrides) -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(out_hidden_size=2048),
      text=TextConfig(),
      **overrides,
  )


def qwen2_5_vl_7b(**overrides) -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(out_hidden_size=3584),
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
      **overrides,
  )


def tiny(vocab_size: int = 512, **overrides) -> Qwen25VLConfig:
  """A few-hundred-thousand-parameter model with every architectural feature of the real one.

  Vision: 4 blocks (1 and 3 full attention, 0 and 2 windowed), windows of 2x2 merged tokens.
  Text: 2 layers, 4 query heads sharing 2 KV heads (GQA), head_dim 16 split (2, 3, 3) by M-RoPE.
  The special token ids sit at the top of the small vocabulary.
  """
  return Qwen25VLConfig(
      vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                          out_hidden_size=64, fullatt_block_indexes=(1, 3)),
      text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      max_position_embeddings=4096, tie_word_embeddings=False),
      image_token_id=vocab_size - 2,
      video_token_id=vocab_size - 1,
      vision_start_token_id=vocab_size - 4,
      vision_end_token_id=vocab_size - 3,
      **overrides,
  )


def small(vocab_size: int = 512, **overrides) -> Qwen25VLConfig:
  """About 4M parameters: the default CPU run's model (vision 4 blocks of width 128, text 4 layers of width 256,
  8 query heads sharing 2 KV heads), with the special token ids at the top of the vocabulary as in `tiny`."""
  base = tiny(vocab_size)
  return base.replace(
      vision=dataclasses.replace(base.vision, hidden_size=128, intermediate_size=256, num_heads=4,
                                 out_hidden_size=256),
      text=dataclasses.replace(base.text, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, mrope_section=(4, 6, 6)),
      **overrides)


PRESETS = {"tiny": tiny, "small": small, "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b}


# ------------------------------------------------------------------------------------------------
# HF config.json <-> Qwen25VLConfig

_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size",
                "fullatt_block_indexes", "tokens_per_second", "hidden_act")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act")
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _rope(section: dict[str, Any]) -> dict[str, Any]:
  return section.get("rope_parameters") or section.get("rope_scaling") or {}


def from_hf_dict(hf: dict[str, Any], source: str = "config.json", **runtime) -> Qwen25VLConfig:
  """Builds a config from a HF Qwen2.5-VL config dict (nested `text_config` or the older flat form).

  Args:
    hf: the parsed config.json.
    source: where it came from, for error messages.
    **runtime: `dtype`, `remat`, `scan_layers` and `lora` overrides.
  """
  archs = hf.get("architectures") or [ARCHITECTURE]
  if hf.get("model_type") not in (MODEL_TYPE, None) or ARCHITECTURE not in archs:
    raise ValueError(f"{source}: model_type={hf.get('model_type')!r}, architectures={archs} is not a "
                     f"Qwen2.5-VL checkpoint (expected model_type={MODEL_TYPE!r}, {ARCHITECTURE}).")
  text_section = hf.get("text_config") or hf  # older checkpoints keep text fields at the top level
  vision_section = hf.get("vision_config") or {}
  if "vision_config" not in hf:
    raise ValueError(f"{source}: no 'vision_config' section; this is not a Qwen2.5-VL config.")

  vision_kwargs = {k: vision_section[k] for k in _VISION_KEYS if k in vision_section}
  if "fullatt_block_indexes" in vision_kwargs:
    vision_kwargs["fullatt_block_indexes"] = tuple(vision_kwargs["fullatt_block_indexes"])
  vision_rope = _rope(vision_section)
  if "rope_theta" in vision_rope:
    vision_kwargs["rope_theta"] = float(vision_rope["rope_theta"])

  text_kwargs = {k: text_section[k] for k in _TEXT_KEYS if k in text_section}
  if text_kwargs.get("num_key_value_heads") is None:
    text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
  rope = _rope(text_section) or _rope(hf)
  theta = rope.get("rope_theta", text_section.get("rope_theta", hf.get("rope_theta")))
  if theta is not None:
    text_kwargs["rope_theta"] = float(theta)
  if "mrope_section" in rope:
    text_kwargs["mrope_section"] = tuple(int(x) for x in rope["mrope_section"])
  tie = hf.get("tie_word_embeddings", text_section.get("tie_word_embeddings"))
  if tie is not None:
    text_kwargs["tie_word_embeddings"] = bool(tie)

  token_kwargs = {k: hf[k] for k in _TOKEN_KEYS if hf.get(k) is not None}
  try:
    return Qwen25VLConfig(vision=VisionConfig(**vision_kwargs), text=TextConfig(**text_kwargs), **token_kwargs,
                          **runtime)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def from_hf_json(path: str | os.PathLike, **runtime) -> Qwen25VLConfig:
  """Reads `config.json` from a file or from a checkpoint directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config.json; point to a local HF Qwen2.5-VL checkpoint directory.")
  with open(path) as f:
    return from_hf_dict(json.load(f), source=path, **runtime)


def to_hf_dict(config: Qwen25VLConfig) -> dict[str, Any]:
  """The nested HF config.json form (transformers >= 4.50) that `from_pretrained` reads."""
  v, t = config.vision, config.text
  vision = {k: getattr(v, k) for k in _VISION_KEYS}
  vision["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
  vision.update(model_type="qwen2_5_vl_vision", rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
  text = {k: getattr(t, k) for k in _TEXT_KEYS}
  text.update(model_type="qwen2_5_vl_text", tie_word_embeddings=t.tie_word_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                               "mrope_section": list(t.mrope_section)})
  return {
      "architectures": [ARCHITECTURE],
      "model_type": MODEL_TYPE,
      "text_config": text,
      "vision_config": vision,
      "tie_word_embeddings": t.tie_word_embeddings,
      "dtype": config.dtype,
      **{k: getattr(config, k) for k in _TOKEN_KEYS},
  }
