"""Qwen2.5-VL in Flax NNX."""

from noisygrpo_jax.models.qwen2_5_vl.config import (PRESETS, Qwen25VLConfig, TextConfig, VisionConfig,
                                                     from_hf_dict, from_hf_json, to_hf_dict)
from noisygrpo_jax.models.qwen2_5_vl.host import VisionBatch, mrope_position_ids, pack_vision_batch
from noisygrpo_jax.models.qwen2_5_vl.model import Qwen25VL, unstacked_decoder
from noisygrpo_jax.models.qwen2_5_vl.checkpoint import load_hf, save_hf
