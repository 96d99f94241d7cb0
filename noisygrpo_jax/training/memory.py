"""Per-device memory estimate of an RL run, made before the model is built so a run that cannot fit is refused.

Terms, in bytes per device (B rollouts per step; T the longest prompt bucket; N = rl.max_new_tokens; P patches of
one row's image; s bytes per activation element):

  params               the architecture's exact parameter count x dtype bytes, over fsdp x tensor devices
  optimizer            AdamW's two moments for trainable parameters only (optax keeps them in the parameter
                       dtype; frozen parameters hold none), sharded like the parameters
  reference            a second copy of the parameters when rl.beta > 0 (the frozen KL reference model)
  gradients            trainable parameters in the parameter dtype; twice that with train.micro_batches > 1
                       (the accumulator and the micro-batch's gradient)
  compute copy         the parameters cast to model.compute_dtype inside the step, when that differs
  train activations    AN ESTIMATE for one micro-batch (decoder + log-prob logits, and vision tower), see
                       `train_activation_bytes`
  KV cache             exactly the sampler's: 2 x layers x B/(data x fsdp) x (T + N) x kv_heads x head_dim x dtype
  prefill activations  AN ESTIMATE of the prefill's largest transients: one decoder layer over T tokens, and one
                       full-attention vision block

The KV cache is freed before the policy update, so the peak is
  params + optimizer + reference + max(gradients + compute copy + train activations, KV cache + prefill activations).
Small replicated tensors (norms, step counters, metrics) and XLA's own workspace are not counted. P is the worst
case, the patch bucket of an image at data.max_pixels; the vision tower's full-attention blocks hold scores for
P x min(P, 1024) (query-chunked) patch pairs.
The SFT warm start is checked with the same terms (it has no reference model or rollouts: an over-estimate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import jax.numpy as jnp

from noisygrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from noisygrpo_jax.models.qwen2_5_vl.vision import FULL_ATTENTION_QUERY_CHUNK

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class RunShape:
  """The sizes of one RL step that memory depends on (unpacked from the run config by `setup.run_shape`)."""

  rows: int  # rollouts per step: train.prompts_per_step * rl.group_size
  prompt_len: int  # T: the longest prompt bucket a step can use
  max_new_tokens: int  # N: rl.max_new_tokens
  patches: int  # P: padded patches of one rollout's image (the patch bucket that holds data.max_pixels)
  micro_batches: int = 1  # train.micro_batches
  group_size: int = 1  # rl.group_size: rollouts sharing one prompt, which the policy update runs once per group
  freeze_vision: bool = True  # optim.freeze_vision: no gradient, moments or saved activations for the ViT
  reference: bool = True  # rl.beta > 0: a frozen copy of the parameters
  compute_dtype: str = ""  # model.compute_dtype ("" = the parameter dtype)
  logits_chunk: int = 16384  # vocabulary columns per log-prob chunk (train_step.LossConfig.chunk_size)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of each term (see the module docstring)."""

  params: int
  optimizer: int
  reference: int
  gradients: int
  compute_copy: int
  train_decoder: int  # train activations of the decoder and the log-prob logits
  train_vision: int  # train activations of the vision tower
  kv_cache: int
  prefill_decoder: int
  prefill_vision: int

  @property
  def train_activations(self) -> int:
    return self.train_decoder + self.train_vision

  @property
  def persistent(self) -> int:
    return self.params + self.optimizer + self.reference

  @property
  def train_step(self) -> int:
    return self.gradients + self.compute_copy + self.train_activations

  @property
  def rollouts(self) -> int:
    return self.kv_cache + self.prefill_decoder + self.prefill_vision

  @property
  def peak(self) -> int:
    return self.persistent + max(self.train_step, self.rollouts)

  def rows(self) -> list[tuple[str, int]]:
    """(label, bytes) of each term, in table order."""
    return [("params", self.params), ("optimizer state (AdamW moments)", self.optimizer),
            ("reference params (rl.beta > 0)", self.reference), ("gradients", self.gradients),
            ("compute-dtype params copy", self.compute_copy),
            ("train activations: decoder (estimate)", self.train_decoder),
            ("train activations: vision (estimate)", self.train_vision), ("rollout KV cache", self.kv_cache),
            ("prefill activations: decoder (estimate)", self.prefill_decoder),
            ("prefill activations: vision (estimate)", self.prefill_vision)]


# ------------------------------------------------------------------------------------------------
# Parameters


def parameter_counts(config: Qwen25VLConfig) -> dict[str, int]:
  """{"vision": ViT + merger, "text": embeddings + decoder + final norm + untied LM head} parameter counts."""
  v, t = config.vision, config.text
  hv, iv = v.hidden_size, v.intermediate_size
  vision_block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * iv + iv) + (iv * hv + hv)
  wide = hv * v.merge_unit
  merger = hv + (wide * wide + wide) + (wide * v.out_hidden_size + v.out_hidden_size)
  vision = v.patch_dim * hv + v.depth * vision_block + merger

  h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  layer = 2 * h + (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * t.intermediate_size
  text = t.vocab_size * h + t.num_hidden_layers * layer + h
  if not t.tie_word_embeddings:
    text += h * t.vocab_size
  return {"vision": vision, "text": text}


def _per_device(total: int, shards: int) -> int:
  return -(-total // max(shards, 1))


# ------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(rows: int, q_len: int, kv_len: int, hidden: int, intermediate: int, heads: int,
                           itemsize: int, score_queries: int | None = None) -> int:
  """One transformer layer's activations kept for the backward pass (or its forward transient).

  Per token about 10 hidden-wide tensors (input, the norm's float32 copy and output, q, k, v before and after
  RoPE, attention output, residual; GQA's smaller k, v counted as full) and 4 MLP-wide ones (gate, up, silu,
  product); per head and (query, key) pair the float32 scores, their masked copy and the softmax in the compute
  dtype (attention is not fused, see layers.attention), for `score_queries` queries at a time (default: all
  q_len; a query-chunked attention holds one chunk's). The constants were checked against XLA's compiled
  memory analysis of the tiny model's train step at 8 to 64 rows (the estimate came within about 15%).
  """
  score_queries = q_len if score_queries is None else score_queries
  return (rows * q_len * (10 * hidden + 4 * intermediate) * itemsize
          + rows * heads * score_queries * kv_len * (8 + itemsize))


def _vision_block_bytes(config: Qwen25VLConfig, rows: int, patches: int, itemsize: int, full: bool) -> int:
  v = config.vision
  if full:  # queries in chunks of FULL_ATTENTION_QUERY_CHUNK against all patches (vision.VisionBlock)
    keys, score_queries = patches, min(patches, FULL_ATTENTION_QUERY_CHUNK)
  else:  # windowed: a 3-window key neighbourhood per query
    keys, score_queries = 3 * v.merger_window**2 * v.merge_unit, patches
  return layer_activation_bytes(rows, patches, keys, v.hidden_size, v.intermediate_size, v.num_heads, itemsize,
                                score_queries)


def train_activation_bytes(config: Qwen25VLConfig, run: RunShape, rows: int, itemsize: int) -> tuple[int, int]:
  """(decoder and logits, vision tower) activations of the policy update for `rows` rows of one micro-batch on
  one device (an estimate).

  Decoder passes (rows, query tokens, key tokens, saved KV cache): with run.group_size 1, one pass over
  L = T + N tokens; with G > 1 (train_step.shared_prompt_hidden), the rows / G prompts over T tokens, then the
  rows' N completion tokens against T + N keys, whose KV cache (the prompt's, repeated G times) each layer keeps.
  Every pass costs each layer's `layer_activation_bytes` and cache, or with model.remat only each layer's input
  and cache plus one layer recomputed at a time. Vision tower over P patches per prompt row: the same rule when
  it trains; frozen, it runs forward only and one full-attention block's transient is counted. Log-probs: one
  vocabulary chunk of float32 logits and their exponentials over the N completion positions.
  """
  t, v = config.text, config.vision
  length = run.prompt_len + run.max_new_tokens
  prompts = -(-rows // run.group_size)
  if run.group_size == 1:
    passes = [(rows, length, length, 0)]
  else:
    cache = 2 * rows * length * t.num_key_value_heads * t.head_dim * itemsize
    passes = [(prompts, run.prompt_len, run.prompt_len, 0), (rows, run.max_new_tokens, length, cache)]
  layers = [layer_activation_bytes(r, q, k, t.hidden_size, t.intermediate_size, t.num_attention_heads, itemsize)
            for r, q, k, _ in passes]
  if config.remat:
    saved = sum(r * q * t.hidden_size * itemsize + cache for r, q, _, cache in passes)
    text = t.num_hidden_layers * saved + max(layers)
  else:
    text = t.num_hidden_layers * sum(layer + cache for layer, (_, _, _, cache) in zip(layers, passes))
  full = _vision_block_bytes(config, prompts, run.patches, itemsize, full=True)
  if run.freeze_vision:
    vision = full
  elif config.remat:
    vision = v.depth * prompts * run.patches * v.hidden_size * itemsize + full
  else:
    num_full = len(v.fullatt_block_indexes)
    vision = num_full * full + (v.depth - num_full) * _vision_block_bytes(config, prompts, run.patches, itemsize,
                                                                          False)
  logits = 2 * rows * run.max_new_tokens * min(run.logits_chunk, t.vocab_size) * 4
  return text + logits, vision


def kv_cache_bytes(config: Qwen25VLConfig, rows: int, slots: int) -> int:
  """The sampler's cache (sampler.init_caches): k and v [rows, slots, kv_heads, head_dim] per decoder layer."""
  t = config.text
  itemsize = jnp.dtype(config.dtype).itemsize
  return 2 * t.num_hidden_layers * rows * slots * t.num_key_value_heads * t.head_dim * itemsize


# ------------------------------------------------------------------------------------------------
# The estimate


def estimate(config: Qwen25VLConfig, run: RunShape, mesh_shape: Mapping[str, int]) -> MemoryEstimate:
  """Bytes per device of each term for this architecture, run and mesh ({"data", "fsdp", "tensor"} sizes)."""
  param_shards = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
  batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  counts = parameter_counts(config)
  itemsize = jnp.dtype(config.dtype).itemsize
  compute_itemsize = jnp.dtype(run.compute_dtype or config.dtype).itemsize
  total = counts["vision"] + counts["text"]
  trainable = counts["text"] if run.freeze_vision else total

  params = _per_device(total * itemsize, param_shards)
  trainable_bytes = _per_device(trainable * itemsize, param_shards)
  rollout_rows = _per_device(run.rows, batch_shards)
  micro_rows = _per_device(_per_device(run.rows, run.micro_batches), batch_shards)
  t = config.text
  train_decoder, train_vision = train_activation_bytes(config, run, micro_rows, compute_itemsize)
  return MemoryEstimate(
      params=params,
      optimizer=2 * trainable_bytes,
      reference=params if run.reference else 0,
      gradients=trainable_bytes * (2 if run.micro_batches > 1 else 1),
      compute_copy=_per_device(total * compute_itemsize, param_shards) if compute_itemsize != itemsize else 0,
      train_decoder=train_decoder,
      train_vision=train_vision,
      kv_cache=kv_cache_bytes(config, rollout_rows, run.prompt_len + run.max_new_tokens),
      prefill_decoder=layer_activation_bytes(rollout_rows, run.prompt_len, run.prompt_len + run.max_new_tokens,
                                             t.hidden_size, t.intermediate_size, t.num_attention_heads, itemsize),
      prefill_vision=_vision_block_bytes(config, rollout_rows, run.patches, itemsize, full=True),
  )


def device_memory_bytes() -> tuple[int, str]:
  """(bytes one device can hold, where that number came from).

  GPU/TPU: the allocator's `bytes_limit`. CPU: physical RAM shared by the process's local devices.
  """
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # some backends do not implement memory_stats
    stats = {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  count = jax.local_device_count()
  return ram // count, "host RAM" + (f" / {count} local devices" if count > 1 else "")


def _gib(n: int) -> str:
  return f"{n / GIB:9.2f} GiB"


def format_table(est: MemoryEstimate, limit: int | None = None, limit_source: str = "",
                 mesh_shape: Mapping[str, int] | None = None) -> str:
  """The estimate as a small text table, with the device limit when given."""
  mesh = " ".join(f"{k}={v}" for k, v in (mesh_shape or {}).items())
  lines = [f"Memory estimate per device{f' (mesh {mesh})' if mesh else ''}:"]
  lines += [f"  {label:<44}{_gib(n)}" for label, n in est.rows()]
  lines.append(f"  {'peak: persistent + max(train, rollouts)':<44}{_gib(est.peak)}")
  if limit is not None:
    lines.append(f"  {'device limit (' + limit_source + ')':<44}{_gib(limit)}")
  return "\n".join(lines)


class MemoryBudgetError(ValueError):
  """The estimated peak memory of a run exceeds what one device holds."""


def check(est: MemoryEstimate, limit: int, limit_source: str, config: Qwen25VLConfig, run: RunShape,
          mesh_shape: Mapping[str, int]) -> None:
  """Raises MemoryBudgetError saying what exceeds, by how much, and what to change, when est.peak > limit."""
  if est.peak <= limit:
    return
  largest = sorted(est.rows(), key=lambda r: -r[1])[:3]
  fixes = [f"lower train.prompts_per_step or rl.max_new_tokens ({run.rows} rollouts x "
           f"{run.prompt_len + run.max_new_tokens} tokens per step)",
           "raise train.micro_batches" if run.micro_batches == 1 else None,
           None if config.remat else "set model.remat=True",
           f"shard over more devices with mesh.fsdp (now {mesh_shape.get('fsdp', 1)})",
           None if config.dtype == "bfloat16" else "use model.dtype='bfloat16'",
           "lower data.max_pixels / data.patch_buckets (vision attention grows with patches squared)",
           "or set train.memory_check=False to try anyway (this is an estimate)"]
  raise MemoryBudgetError(
      f"the estimated peak memory per device, {est.peak / GIB:.2f} GiB, exceeds the {limit / GIB:.2f} GiB "
      f"available ({limit_source}) by {(est.peak - limit) / GIB:.2f} GiB; largest terms: "
      + ", ".join(f"{label} {n / GIB:.2f} GiB" for label, n in largest)
      + ". To fit: " + "; ".join(f for f in fixes if f) + ".")


def patches_for(max_pixels: int, patch_size: int, merge_unit: int) -> int:
  """Most patches an image within `max_pixels` yields, rounded up to whole merged tokens."""
  return -(-(max_pixels // patch_size**2) // merge_unit) * merge_unit


def smallest_bucket(size: int, buckets) -> int:
  """The bucket `collate` would pick for `size` (the largest when none holds it, `size` without buckets)."""
  fitting = [b for b in buckets if b >= size]
  return min(fitting) if fitting else (max(buckets) if buckets else size)

