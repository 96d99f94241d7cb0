"""Qwen2.5-VL in Flax NNX."""

from noisygrpo_jax.models.qwen2_5_vl.config import (PRESETS, Qwen25VLConfig, TextConfig, VisionConfig,
                                                     from_hf_dict, from_hf_json, to_hf_dict)
