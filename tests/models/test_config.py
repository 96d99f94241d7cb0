"""Config presets and HF config.json parsing, checked against transformers' own config class."""

import dataclasses
import json

import pytest
import transformers

from noisygrpo_jax.models.qwen2_5_vl import config as cfg


@pytest.mark.parametrize("preset", sorted(cfg.PRESETS))
def test_hf_round_trip_through_transformers(preset):
  ours = cfg.PRESETS[preset]()
  hf = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(ours))
  # What transformers writes to config.json must parse back to the same architecture.
  back = cfg.from_hf_dict(json.loads(hf.to_json_string()))
  assert back == ours
  assert hf.text_config.hidden_size == ours.text.hidden_size
  assert hf.vision_config.fullatt_block_indexes == list(ours.vision.fullatt_block_indexes)


def test_flat_legacy_form():
  flat = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
      "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
      "max_position_embeddings": 128000, "image_token_id": 151655, "video_token_id": 151656,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                        "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2},
  }
  assert cfg.from_hf_dict(flat) == cfg.qwen2_5_vl_3b()


def test_invalid_configs_name_the_field():
  with pytest.raises(ValueError, match="mrope_section"):
    cfg.tiny().replace(text=dataclasses.replace(cfg.tiny().text, mrope_section=(2, 2, 2)))
  with pytest.raises(ValueError, match="image_token_id"):
    cfg.Qwen25VLConfig(text=cfg.TextConfig(vocab_size=1000))
  with pytest.raises(ValueError, match="not a Qwen2.5-VL"):
    cfg.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, source="x/config.json")
