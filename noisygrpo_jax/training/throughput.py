"""What a step costs and how fast it ran: analytic model FLOPs, the device's peak, MFU, tokens/s, peak memory.

FLOP counts: multiply-add = 2 FLOPs, what the implementation executes (e.g. full [T, T] attention scores even where a
causal mask zeroes half of them); norms, RoPE, softmax and the optimizer are not counted. The RL loop logs, per step,
tokens/s per device (prompt + completion tokens, as EasyR1 reports them), seconds per phase, MFU (the step's model
FLOPs over its wall time and the devices' bf16 dense peak) and the peak device memory; the benchmarks use the same
counts.
"""

from __future__ import annotations

import jax


def decoder_layer_matmul_params(text) -> int:
  """Weights one token multiplies through in one decoder layer: q, k, v, o and the SwiGLU gate, up, down."""
  heads, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
  return text.hidden_size * (2 * heads + 2 * kv) + 3 * text.hidden_size * text.intermediate_size


def vision_forward_flops(vision, patches: int) -> float:
  """Forward FLOPs of the vision tower on one row of `patches` patches (padding included).

  Patch embedding, per block qkv / proj / SwiGLU matmuls and attention (full blocks: all patch pairs of the
  row; windowed blocks: each query against its 3-window neighbourhood, as the local attention computes), and
  the merger's two matmuls on patches / merge_unit tokens.
  """
  d, i = vision.hidden_size, vision.intermediate_size
  window = min(patches, 3 * vision.merger_window**2 * vision.merge_unit)
  flops = 2 * patches * vision.patch_dim * d
  for block in range(vision.depth):
    keys = patches if block in vision.fullatt_block_indexes else window
    flops += 2 * patches * (4 * d * d + 3 * d * i) + 4 * patches * keys * d
  merged = patches // vision.merge_unit
  flops += 2 * merged * (vision.merge_unit * d) * (vision.merge_unit * d + vision.out_hidden_size)
  return float(flops)


def train_step_flops(config, rows: int, seq: int, completion: int, patches: int,
                     train_vision: bool = False) -> dict[str, float]:
  """Model FLOPs of one policy update (forward + backward = 3x forward) on `rows` rows of `seq` tokens.

  decoder: 6 x layer matmul weights x rows x seq; attention: 3 x 4 x seq^2 x heads x head_dim per layer and row
  (scores and values); lm_head: 6 x hidden x vocab x the completion tokens (log-probs are taken there only);
  vision: its forward (x3 when trained) for `patches` patches per row. Excludes norms, RoPE, softmax and the
  optimizer (a few FLOPs per parameter).
  """
  text = config.text
  tokens = rows * seq
  out = {"decoder": 6.0 * text.num_hidden_layers * decoder_layer_matmul_params(text) * tokens,
         "attention": 12.0 * text.num_hidden_layers * rows * seq * seq * text.num_attention_heads * text.head_dim,
         "lm_head": 6.0 * text.hidden_size * text.vocab_size * rows * completion,
         "vision": (3.0 if train_vision else 1.0) * rows * vision_forward_flops(config.vision, patches)}
  out["total"] = sum(out.values())
  return out


def decode_step_flops(config, batch: int, slots: int) -> float:
  """FLOPs of one decode step: every row's token through each layer's matmuls and the LM head, plus attention
  of one query against all `slots` cache slots (what our masked decode attention computes)."""
  text = config.text
  matmul = text.num_hidden_layers * decoder_layer_matmul_params(text) + text.hidden_size * text.vocab_size
  attention = 4 * text.num_hidden_layers * slots * text.num_attention_heads * text.head_dim
  return float(batch * (2 * matmul + attention))


def rl_step_flops(config, rows: int, prompt_len: int, completion: int, patches: int, group_size: int,
                  train_vision: bool = False, reference: bool = True,
                  frozen_decoder: bool = False) -> dict[str, float]:
  """Model FLOPs of one RL step on `rows` rollouts (rows / group_size prompts) padded to `prompt_len` prompt tokens
  with `completion` generated tokens and `patches` patches per image.

  prefill: the vision tower on every rollout's image and the decoder over its prompt, once per row; decode: one
  `decode_step_flops` per generated token (the masked cache is read in full: T + N slots); reference: the forward
  of the log-prob pass; update: forward + backward (`train_step_flops`). The policy passes run the vision tower
  once per group (`train_step.shared_prompt_hidden`); their decoder is counted over full rows, an over-count of the
  shared prompt's (G - 1) / G repeats. frozen_decoder (LoRA): the decoder's own weights take no gradient, so its
  backward is the activation gradients alone and the update two forwards instead of three (the adapters' FLOPs,
  rank / width of the projections', are not counted).
  """
  text = config.text
  slots = prompt_len + completion
  vision = rows * vision_forward_flops(config.vision, patches)
  prefill = (vision + 2.0 * text.num_hidden_layers * decoder_layer_matmul_params(text) * rows * prompt_len
             + 4.0 * text.num_hidden_layers * rows * prompt_len**2 * text.num_attention_heads * text.head_dim)
  update = train_step_flops(config, rows, slots, completion, patches, train_vision)
  text_forward = (update["total"] - update["vision"]) / 3.0  # decoder, attention and LM head, forward only
  vision_once = vision / group_size  # the policy and reference passes see each group's image once (shared prompt)
  out = {"prefill": float(prefill), "decode": completion * decode_step_flops(config, rows, slots),
         "reference": text_forward + vision_once if reference else 0.0,
         "update": (2.0 if frozen_decoder else 3.0) * text_forward + (3.0 if train_vision else 1.0) * vision_once}
  out["total"] = sum(out.values())
  return out


# bf16 dense peak FLOP/s per chip, by jax's device_kind (vendor data sheets; no sparsity).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12,
              "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
  """The bf16 dense peak FLOP/s of one local device: `override_tflops` x 1e12 when > 0, else `PEAK_FLOPS` by device
  kind (a longest-prefix match), else NaN (a CPU or an unlisted chip: MFU is not reported)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.local_devices()[0].device_kind
  matches = [name for name in PEAK_FLOPS if kind.startswith(name)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else float("nan")


def peak_memory_bytes() -> float:
  """The largest `peak_bytes_in_use` over the local devices, or NaN where the backend does not report it (CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return float(max(peaks)) if peaks else float("nan")


def step_metrics(config, *, rows: int, prompt_len: int, decode_steps: int, patches: int, group_size: int,
                 train_vision: bool, reference: bool, tokens: float, seconds: float, devices: int,
                 peak_flops: float, frozen_decoder: bool = False) -> dict[str, float]:
  """One RL step's throughput metrics: tokens/s per device (`tokens`: real prompt + completion tokens), the step's
  model TFLOPs (`rl_step_flops` on the padded shapes it ran), MFU against `peak_flops` per device (NaN when unknown)
  and the peak device memory in GiB (NaN where the backend does not report it)."""
  flops = rl_step_flops(config, rows, prompt_len, decode_steps, patches, group_size, train_vision, reference,
                        frozen_decoder)
  return {"throughput/tokens_per_s_per_device": tokens / seconds / devices,
          "throughput/model_tflops": flops["total"] / 1e12,
          "throughput/mfu": flops["total"] / (seconds * devices * peak_flops),
          "memory/peak_gib": peak_memory_bytes() / 2**30}
