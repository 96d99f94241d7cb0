"""Model FLOPs of an RL step, the devices' peak and the per-step throughput metrics."""

import math

import jax
import pytest

from noisygrpo_jax.models.qwen2_5_vl import config as model_config
from noisygrpo_jax.training import throughput

CONFIG = model_config.qwen2_5_vl_3b()


def test_rl_step_flops_add_up_by_phase():
  rows, prompt, steps, patches, g = 64, 2048, 256, 4096, 4
  flops = throughput.rl_step_flops(CONFIG, rows, prompt, steps, patches, g)
  t = CONFIG.text
  layer = throughput.decoder_layer_matmul_params(t)
  assert layer == 2048 * (2 * 2048 + 2 * 256) + 3 * 2048 * 11008  # q, o; k, v (2 KV heads x 128); SwiGLU
  assert flops["decode"] == steps * throughput.decode_step_flops(CONFIG, rows, prompt + steps)
  vision = throughput.vision_forward_flops(CONFIG.vision, patches)
  assert flops["prefill"] == pytest.approx(rows * vision + 2 * t.num_hidden_layers * layer * rows * prompt
                                           + 4 * t.num_hidden_layers * rows * prompt**2 * 16 * 128)
  # The update is three forwards of the decoder and LM head; the frozen tower runs forward once per group in both.
  assert flops["update"] - rows * vision / g == pytest.approx(3 * (flops["reference"] - rows * vision / g))
  assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
  assert throughput.rl_step_flops(CONFIG, rows, prompt, steps, patches, g, reference=False)["reference"] == 0
  # LoRA: the decoder's weight gradients are skipped, its backward is one forward's FLOPs (activation gradients).
  lora = throughput.rl_step_flops(CONFIG, rows, prompt, steps, patches, g, frozen_decoder=True)
  assert lora["update"] - rows * vision / g == pytest.approx(2 * (flops["reference"] - rows * vision / g))
  assert {k: v for k, v in lora.items() if k not in ("update", "total")} == {
      k: v for k, v in flops.items() if k not in ("update", "total")}
  # ~6 x 3.1B parameters x 147k tokens for the update alone: the counts are of the model's size.
  assert 2e15 < flops["update"] < 8e15


def test_peak_flops_and_mfu():
  assert throughput.peak_flops_per_device(989.0) == 989e12
  assert math.isnan(throughput.peak_flops_per_device())  # a CPU: not in the table
  metrics = throughput.step_metrics(CONFIG, rows=8, prompt_len=512, decode_steps=64, patches=1024, group_size=4,
                                    train_vision=False, reference=True, tokens=4000.0, seconds=2.0, devices=2,
                                    peak_flops=1e15)
  flops = throughput.rl_step_flops(CONFIG, 8, 512, 64, 1024, 4)["total"]
  assert metrics["throughput/tokens_per_s_per_device"] == 1000.0
  assert metrics["throughput/mfu"] == pytest.approx(flops / (2.0 * 2 * 1e15))
  assert metrics["throughput/model_tflops"] == pytest.approx(flops / 1e12)
  assert jax.default_backend() != "cpu" or math.isnan(metrics["memory/peak_gib"])
