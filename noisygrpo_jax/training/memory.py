"""Per-device memory estimate of an RL run, made before the model is built so a run that cannot fit is refused.

It counts what the run keeps under its dtype policy (training.params): bytes per device, B rollouts per step, T the
longest prompt bucket, N = rl.max_new_tokens, P patches of one row's image; "trainable" is the decoder and LM head
(and the vision tower unless optim.freeze_vision), "frozen" the rest. With LoRA (config.lora.rank > 0) "trainable" is
the decoder's adapters only and "frozen" the whole base model: the master weights, moments, gradients, compute and
rollout copies and the reference's copy are the adapters' (small), the base is held once in the compute dtype, and
the activations are those of full fine-tuning with a frozen vision tower (the backward still crosses every layer).

  Held for the whole run (persistent):
  master               trainable parameters in model.dtype, over fsdp x tensor devices
  optimizer            AdamW's two moments of the trainable parameters, in model.dtype
  frozen               frozen parameters, stored once in the compute dtype and shared by every copy below
  reference            the KL reference model (rl.beta > 0): the initial trainable parameters in the compute dtype
  Held by one phase of a step:
  rollout copy         rollouts and reference log-probs: the trainable parameters in the compute dtype, their decoder
                       layers one array per layer (when the compute dtype is model.dtype only the decoder layers are
                       copied, unstacked; the rollouts read the other master weights); with LoRA also the base
                       decoder layers; whole on every device with rl.rollout_weights="replicated" on more than one
                       parameter shard, and with LoRA then the base decoder (embeddings, layers, LM head) too
  KV cache             rollouts, exactly the sampler's: 2 x layers x B/(data x fsdp) x (T + N) x kv_heads x head_dim
  prefill activations  rollouts, AN ESTIMATE of the prefill's largest transient (`forward_layer_bytes`): one
                       decoder layer over T tokens or one full-attention vision block, the larger, for the
                       B / rl.prefill_micro_batches rows prefilled at a time
  log-prob activations reference log-probs, AN ESTIMATE (`logps_activation_bytes`), train.micro_batches parts
  gradients            policy update: trainable parameters in model.dtype; twice that with train.micro_batches > 1
                       (the accumulator and the micro-batch's gradient)
  compute copy         policy update: the trainable parameters cast to the compute dtype inside the step
  update transients    policy update: 4 buffers the size of the largest trainable leaf in model.dtype, the token
                       embedding (its gradient's parts: the lookup's scatter and, tied, the LM head's transposed
                       product; AdamW's intermediates), as XLA's buffer assignment of the 3B-width step shows; with
                       LoRA the largest adapter
  train activations    policy update, AN ESTIMATE for one micro-batch (`train_activation_bytes`)

  peak = persistent + max(rollouts, reference log-probs, policy update)

Each phase's terms, with the persistent ones it reads, are what its compiled program holds: `MemoryEstimate.programs`
is compared with XLA's own memory analysis in experiments/bench/bench_memory.py. Small replicated tensors (norms,
step counters, metrics) and XLA's own workspace are not counted. P is the worst case, the patch bucket of an image
at data.max_pixels; the vision tower's full-attention blocks hold scores for P x min(P, 1024) (query-chunked) patch
pairs. The SFT warm start is checked with the same terms (it has no reference model or rollouts: an over-estimate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import jax.numpy as jnp

from noisygrpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from noisygrpo_jax.models.qwen2_5_vl.text import QUERY_CHUNK
from noisygrpo_jax.models.qwen2_5_vl.vision import FULL_ATTENTION_QUERY_CHUNK

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class RunShape:
  """The sizes of one RL step that memory depends on (unpacked from the run config by `setup.run_shape`)."""

  rows: int  # rollouts per step: train.prompts_per_step * rl.group_size
  prompt_len: int  # T: the longest prompt bucket a step can use
  max_new_tokens: int  # N: rl.max_new_tokens
  patches: int  # P: padded patches of one rollout's image (the patch bucket that holds data.max_pixels)
  micro_batches: int = 1  # train.micro_batches (also the reference log-probs' micro-batches)
  prefill_micro_batches: int = 1  # rl.prefill_micro_batches: the rollout rows are prefilled in this many parts
  rollout_replicated: bool = False  # rl.rollout_weights == "replicated": every device holds the whole rollout copy
  group_size: int = 1  # rl.group_size: rollouts sharing one prompt, which the policy update runs once per group
  freeze_vision: bool = True  # optim.freeze_vision: no gradient, moments or saved activations for the ViT
  reference: bool = True  # rl.beta > 0: a frozen copy of the parameters
  compute_dtype: str = ""  # model.compute_dtype ("" = the parameter dtype)
  logits_chunk: int = 16384  # vocabulary columns per log-prob chunk (train_step.LossConfig.chunk_size)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of each term (see the module docstring)."""

  master: int
  optimizer: int
  frozen: int
  reference: int
  rollout_copy: int
  rollout_shared: int  # the master and frozen parameters the rollouts read in place, not through their copy
  kv_cache: int
  prefill_decoder: int
  prefill_vision: int
  logps_activations: int
  gradients: int
  compute_copy: int
  update_transients: int
  train_decoder: int  # train activations of the decoder and the log-prob logits
  train_vision: int  # train activations of the vision tower (its forward transient when frozen)
  vision_trains: bool  # the tower's activations are kept for the backward (else it runs before the decoder)

  @property
  def train_activations(self) -> int:
    if self.vision_trains:
      return self.train_decoder + self.train_vision
    return max(self.train_decoder, self.train_vision)

  @property
  def persistent(self) -> int:
    return self.master + self.optimizer + self.frozen + self.reference

  @property
  def prefill(self) -> int:
    """The prefill's transient: the vision tower runs before the decoder layers."""
    return max(self.prefill_decoder, self.prefill_vision)

  @property
  def rollouts(self) -> int:
    return self.rollout_copy + self.kv_cache + self.prefill

  @property
  def reference_logps(self) -> int:
    return self.rollout_copy + self.logps_activations if self.reference else 0

  @property
  def train_step(self) -> int:
    return self.gradients + self.compute_copy + self.update_transients + self.train_activations

  @property
  def peak(self) -> int:
    return self.persistent + max(self.rollouts, self.reference_logps, self.train_step)

  def programs(self) -> dict[str, int]:
    """What each compiled program holds (its parameter arguments, outputs and temporaries): the train step, the
    reference log-probs and the rollouts' prefill + decode."""
    return {"train step": self.master + self.optimizer + self.frozen + self.train_step,
            "reference log-probs": self.reference + self.frozen + self.logps_activations,
            "prefill + decode": self.rollout_copy + self.rollout_shared + self.kv_cache + self.prefill}

  def rows(self) -> list[tuple[str, int]]:
    """(label, bytes) of each term, in table order."""
    return [("master params (model.dtype)", self.master), ("optimizer state (AdamW moments)", self.optimizer),
            ("frozen params (compute dtype, shared)", self.frozen),
            ("reference params (rl.beta > 0, compute dtype)", self.reference),
            ("rollout copy of the params (compute dtype)", self.rollout_copy), ("rollout KV cache", self.kv_cache),
            ("prefill activations: decoder (estimate)", self.prefill_decoder),
            ("prefill activations: vision (estimate)", self.prefill_vision),
            ("reference log-prob activations (estimate)", self.logps_activations),
            ("gradients (model.dtype)", self.gradients), ("compute-dtype copy in the step", self.compute_copy),
            ("update transients (4 x the largest leaf)", self.update_transients),
            ("train activations: decoder (estimate)", self.train_decoder),
            ("train activations: vision (estimate)", self.train_vision)]


# ------------------------------------------------------------------------------------------------
# Parameters


def projection_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of each decoder projection that LoRA may adapt (config.LORA_TARGETS)."""
  t = config.text
  h, i = t.hidden_size, t.intermediate_size
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
          "up_proj": (h, i), "down_proj": (i, h)}


def adapter_leaves(config: Qwen25VLConfig) -> list[int]:
  """Parameter counts of each stacked adapter leaf (lora_a [layers, in, r], lora_b [layers, r, out]); [] without."""
  layers = config.text.num_hidden_layers
  ranks = {name: config.lora.rank_of(name) for name in projection_shapes(config)}
  return [layers * ranks[name] * d for name, dims in projection_shapes(config).items() if ranks[name] for d in dims]


def parameter_counts(config: Qwen25VLConfig) -> dict[str, int]:
  """{"vision": ViT + merger, "text": embeddings + decoder + final norm + untied LM head, "decoder_layers": the
  decoder layers alone (within "text"), "adapters": the decoder's LoRA adapters (0 without)} parameter counts."""
  v, t = config.vision, config.text
  hv, iv = v.hidden_size, v.intermediate_size
  vision_block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * iv + iv) + (iv * hv + hv)
  wide = hv * v.merge_unit
  merger = hv + (wide * wide + wide) + (wide * v.out_hidden_size + v.out_hidden_size)
  vision = v.patch_dim * hv + v.depth * vision_block + merger

  h = t.hidden_size
  biases = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim  # q, k and v have one
  layer = 2 * h + sum(i * o for i, o in projection_shapes(config).values()) + biases
  text = t.vocab_size * h + t.num_hidden_layers * layer + h
  if not t.tie_word_embeddings:
    text += h * t.vocab_size
  return {"vision": vision, "text": text, "decoder_layers": t.num_hidden_layers * layer,
          "adapters": sum(adapter_leaves(config))}


def _per_device(total: int, shards: int) -> int:
  return -(-total // max(shards, 1))


# ------------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(rows: int, q_len: int, kv_len: int, hidden: int, intermediate: int, heads: int,
                           itemsize: int, score_queries: int | None = None) -> int:
  """One transformer layer's activations kept for the backward pass.

  Per token about 10 hidden-wide tensors (input, the norm's float32 copy and output, q, k, v before and after
  RoPE, attention output, residual; GQA's smaller k, v counted as full) and 4 MLP-wide ones (gate, up, silu,
  product); per head and (query, key) pair the float32 scores, their masked copy and the softmax in the compute
  dtype (the einsum path of layers.attention; where the fused cuDNN kernel takes a pass on GPU it holds none of
  them, so there the estimate is an upper bound), for `score_queries` queries at a time (default: all
  q_len; a query-chunked attention holds one chunk's). The constants were checked against XLA's compiled
  memory analysis of the tiny model's train step at 8 to 64 rows (the estimate came within about 15%).
  """
  score_queries = q_len if score_queries is None else score_queries
  return (rows * q_len * (10 * hidden + 4 * intermediate) * itemsize
          + rows * heads * score_queries * kv_len * (8 + itemsize))


def forward_layer_bytes(rows: int, q_len: int, kv_len: int, hidden: int, intermediate: int, heads: int,
                        itemsize: int, score_queries: int | None = None) -> int:
  """One transformer layer's transient in a forward pass that saves nothing (prefill, reference log-probs, a frozen
  tower): about 5 hidden-wide tensors per token (input, normed input, q, k, v) held while either the attention's
  scores (float32 scores, their masked copy, the softmax: `layer_activation_bytes`) or the MLP's 3 wide tensors
  (gate, up, product) are alive, the larger of the two. Checked against XLA's memory analysis of prefill and the
  reference log-probs at the 3B width (experiments/bench/bench_memory.py).
  """
  score_queries = q_len if score_queries is None else score_queries
  scores = rows * heads * score_queries * kv_len * (8 + itemsize)
  return rows * q_len * 5 * hidden * itemsize + max(scores, rows * q_len * 3 * intermediate * itemsize)


def _vision_block_bytes(config: Qwen25VLConfig, rows: int, patches: int, itemsize: int, full: bool,
                        forward: bool = False) -> int:
  """One vision block over `rows` images of `patches` patches: its saved activations, or with `forward` its
  forward transient."""
  v = config.vision
  if full:  # queries in chunks of FULL_ATTENTION_QUERY_CHUNK against all patches (vision.VisionBlock)
    keys, score_queries = patches, min(patches, FULL_ATTENTION_QUERY_CHUNK)
  else:  # windowed: a 3-window key neighbourhood per query
    keys, score_queries = 3 * v.merger_window**2 * v.merge_unit, patches
  layer = forward_layer_bytes if forward else layer_activation_bytes
  return layer(rows, patches, keys, v.hidden_size, v.intermediate_size, v.num_heads, itemsize, score_queries)


def train_activation_bytes(config: Qwen25VLConfig, run: RunShape, rows: int, itemsize: int) -> tuple[int, int]:
  """(decoder and logits, vision tower) activations of the policy update for `rows` rows of one micro-batch on
  one device (an estimate).

  Decoder passes (rows, query tokens, key tokens, saved KV cache): with run.group_size 1, one pass over
  L = T + N tokens; with G > 1 (train_step.shared_prompt_hidden), the rows / G prompts over T tokens, then the
  rows' N completion tokens against T + N keys, whose KV cache (the prompt's, repeated G times) each layer keeps.
  Every pass costs each layer's `layer_activation_bytes` and cache, or with model.remat only each layer's input
  and cache plus one layer recomputed at a time. Vision tower over P patches per prompt row: the same rule when
  it trains; frozen, it runs forward only and one full-attention block's forward transient is counted (before the
  decoder runs: `MemoryEstimate.train_activations` takes the larger). Log-probs: one vocabulary chunk of float32
  logits and their exponentials over the N completion positions.
  """
  t, v = config.text, config.vision
  length = run.prompt_len + run.max_new_tokens
  prompts = -(-rows // run.group_size)
  if run.group_size == 1:
    passes = [(rows, length, length, 0)]
  else:
    cache = 2 * rows * length * t.num_key_value_heads * t.head_dim * itemsize
    passes = [(prompts, run.prompt_len, run.prompt_len, 0), (rows, run.max_new_tokens, length, cache)]
  layers = [layer_activation_bytes(r, q, k, t.hidden_size, t.intermediate_size, t.num_attention_heads, itemsize,
                                   min(q, QUERY_CHUNK)) for r, q, k, _ in passes]
  if config.remat:
    saved = sum(r * q * t.hidden_size * itemsize + cache for r, q, _, cache in passes)
    text = t.num_hidden_layers * saved + max(layers)
  else:
    text = t.num_hidden_layers * sum(layer + cache for layer, (_, _, _, cache) in zip(layers, passes))
  full = _vision_block_bytes(config, prompts, run.patches, itemsize, full=True)
  if run.freeze_vision:
    vision = _vision_block_bytes(config, prompts, run.patches, itemsize, full=True, forward=True)
  elif config.remat:
    vision = v.depth * prompts * run.patches * v.hidden_size * itemsize + full
  else:
    num_full = len(v.fullatt_block_indexes)
    vision = num_full * full + (v.depth - num_full) * _vision_block_bytes(config, prompts, run.patches, itemsize,
                                                                          False)
  logits = 2 * rows * run.max_new_tokens * min(run.logits_chunk, t.vocab_size) * 4
  return text + logits, vision


def kv_cache_bytes(config: Qwen25VLConfig, rows: int, slots: int, itemsize: int) -> int:
  """The sampler's cache (sampler.init_caches): k and v [rows, kv_heads, slots, head_dim] per decoder layer."""
  t = config.text
  return 2 * t.num_hidden_layers * rows * slots * t.num_key_value_heads * t.head_dim * itemsize


# ------------------------------------------------------------------------------------------------
# The estimate


def logps_activation_bytes(config: Qwen25VLConfig, run: RunShape, rows: int, itemsize: int) -> int:
  """The reference log-probs' activations for `rows` rows on one device (an estimate; forward only).

  With run.group_size G > 1 (train_step.shared_prompt_hidden) every layer's prompt cache (rows / G prompts x T) and
  its copy repeated over the G rollouts and extended by N slots are kept, and one layer's forward transient runs at
  a time (the prompt pass over T tokens, the completion pass over N queries); with G = 1 one layer over T + N
  tokens. The frozen vision tower runs first: one full-attention block's transient, or the decoder's if larger.
  Log-probs: one vocabulary chunk of float32 logits.
  """
  t = config.text
  length = run.prompt_len + run.max_new_tokens
  prompts = -(-rows // run.group_size)
  layer = lambda r, q, k: forward_layer_bytes(r, q, k, t.hidden_size, t.intermediate_size, t.num_attention_heads,
                                              itemsize, min(q, QUERY_CHUNK))
  if run.group_size == 1:
    decoder = layer(rows, length, length)
  else:
    per_slot = 2 * t.num_key_value_heads * t.head_dim * itemsize
    caches = t.num_hidden_layers * per_slot * (prompts * run.prompt_len + rows * length)
    decoder = caches + max(layer(prompts, run.prompt_len, run.prompt_len), layer(rows, run.max_new_tokens, length))
  logits = 2 * rows * run.max_new_tokens * min(run.logits_chunk, t.vocab_size) * 4
  return max(decoder + logits, _vision_block_bytes(config, prompts, run.patches, itemsize, full=True, forward=True))


def rollout_copy_params(counts: dict[str, int], trainable: int, lora: bool, mixed: bool, replicated: bool
                        ) -> tuple[int, int]:
  """(trainable, frozen) parameter counts of what the rollout copy (loops.Run.rollout_params,
  `params.decoding_copy`: in the compute dtype, its decoder layers one array per layer) copies; the rollouts read
  the copy instead of those parameters, and the rest in place.

  replicated (on more than one parameter shard): the trainable parameters and, with LoRA, the base decoder
  (embeddings, layers, LM head). Otherwise: the trainable parameters when they are cast (mixed precision) or are
  LoRA adapters, else the decoder layers alone (the copy unstacks them); with LoRA the base decoder layers too.
  """
  if lora:
    return trainable, counts["text"] if replicated else counts["decoder_layers"]
  return (trainable if mixed or replicated else counts["decoder_layers"]), 0


def estimate(config: Qwen25VLConfig, run: RunShape, mesh_shape: Mapping[str, int]) -> MemoryEstimate:
  """Bytes per device of each term for this architecture, run and mesh ({"data", "fsdp", "tensor"} sizes).

  config.dtype is model.dtype (the master weights'); run.compute_dtype the compute dtype ("" = config.dtype).
  With config.lora the adapters train and the vision tower is frozen whatever run.freeze_vision says.
  """
  lora = config.lora.rank > 0
  if lora:
    run = dataclasses.replace(run, freeze_vision=True)
  param_shards = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
  batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  counts = parameter_counts(config)
  itemsize = jnp.dtype(config.dtype).itemsize
  compute_itemsize = jnp.dtype(run.compute_dtype or config.dtype).itemsize
  if lora:
    trainable, frozen = counts["adapters"], counts["text"] + counts["vision"]
  else:
    trainable = counts["text"] if run.freeze_vision else counts["text"] + counts["vision"]
    frozen = counts["vision"] if run.freeze_vision else 0
  mixed = bool(run.compute_dtype) and jnp.dtype(run.compute_dtype) != jnp.dtype(config.dtype)

  trainable_bytes = _per_device(trainable * itemsize, param_shards)
  trainable_compute = _per_device(trainable * compute_itemsize, param_shards)
  rollout_rows = _per_device(run.rows, batch_shards)
  prefill_rows = _per_device(rollout_rows, run.prefill_micro_batches)
  micro_rows = _per_device(_per_device(run.rows, run.micro_batches), batch_shards)
  t = config.text
  train_decoder, train_vision = train_activation_bytes(config, run, micro_rows, compute_itemsize)
  # The token embedding (and the LM head when untied), or with LoRA the largest adapter.
  largest_leaf = max(adapter_leaves(config)) if lora else t.vocab_size * t.hidden_size
  replicated = run.rollout_replicated and param_shards > 1
  copied_trainable, copied_frozen = rollout_copy_params(counts, trainable, lora, mixed, replicated)
  rollout_copy = (copied_trainable + copied_frozen) * compute_itemsize
  frozen_bytes = _per_device(frozen * compute_itemsize, param_shards)
  return MemoryEstimate(
      master=trainable_bytes,
      optimizer=2 * trainable_bytes,
      frozen=frozen_bytes,
      reference=trainable_compute if run.reference else 0,
      rollout_copy=rollout_copy if replicated else _per_device(rollout_copy, param_shards),
      rollout_shared=(trainable_bytes - _per_device(copied_trainable * itemsize, param_shards) + frozen_bytes
                      - _per_device(copied_frozen * compute_itemsize, param_shards)),
      kv_cache=kv_cache_bytes(config, rollout_rows, run.prompt_len + run.max_new_tokens, compute_itemsize),
      prefill_decoder=forward_layer_bytes(prefill_rows, run.prompt_len, run.prompt_len + run.max_new_tokens,
                                          t.hidden_size, t.intermediate_size, t.num_attention_heads,
                                          compute_itemsize, min(run.prompt_len, QUERY_CHUNK)),
      prefill_vision=_vision_block_bytes(config, prefill_rows, run.patches, compute_itemsize, full=True,
                                         forward=True),
      logps_activations=logps_activation_bytes(config, run, micro_rows, compute_itemsize) if run.reference else 0,
      gradients=trainable_bytes * (2 if run.micro_batches > 1 else 1),
      compute_copy=trainable_compute if mixed else 0,
      update_transients=_per_device(4 * largest_leaf * itemsize, param_shards),
      train_decoder=train_decoder,
      train_vision=train_vision,
      vision_trains=not run.freeze_vision,
  )


def device_memory_bytes(override_gib: float = 0.0) -> tuple[int, str]:
  """(bytes one device can hold, where that number came from).

  `override_gib` > 0 (train.device_memory_gib): that. GPU/TPU: the allocator's `bytes_limit` (on GPU
  XLA_PYTHON_CLIENT_MEM_FRACTION of the memory, 0.75 by default). CPU: physical RAM shared by the process's local
  devices.
  """
  if override_gib > 0:
    return int(override_gib * GIB), f"train.device_memory_gib={override_gib:g}"
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


def divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def fewest_parts(config: Qwen25VLConfig, run: RunShape, mesh_shape: Mapping[str, int], limit: int
                 ) -> tuple[int, int]:
  """(train micro-batches, prefill micro-batches) for a run whose RunShape leaves them 0 (chosen) or not (kept).

  A chosen count is the fewest parts whose phase fits `limit` with the persistent terms: micro-batches of whole
  groups (divisors of the prompts) for the reference log-probs and the policy update; parts of the rollout rows
  (divisors of the rows) for the prefill. When none fits it is the most parts, and the check refuses the run.
  """
  def first_fit(options, phase):
    return next((k for k in options if phase(k) <= limit), options[-1])

  def update_peak(k: int) -> int:
    e = estimate(config, dataclasses.replace(run, micro_batches=k), mesh_shape)
    return e.persistent + max(e.reference_logps, e.train_step)

  micro = run.micro_batches or first_fit(divisors(run.rows // run.group_size), update_peak)

  def rollout_peak(k: int) -> int:
    e = estimate(config, dataclasses.replace(run, micro_batches=micro, prefill_micro_batches=k), mesh_shape)
    return e.persistent + e.rollouts

  return micro, run.prefill_micro_batches or first_fit(divisors(run.rows), rollout_peak)


def _gib(n: int) -> str:
  return f"{n / GIB:9.2f} GiB"


def format_table(est: MemoryEstimate, limit: int | None = None, limit_source: str = "",
                 mesh_shape: Mapping[str, int] | None = None) -> str:
  """The estimate as a small text table, with the device limit when given."""
  mesh = " ".join(f"{k}={v}" for k, v in (mesh_shape or {}).items())
  lines = [f"Memory estimate per device{f' (mesh {mesh})' if mesh else ''}:"]
  lines += [f"  {label:<44}{_gib(n)}" for label, n in est.rows()]
  lines.append(f"  {'peak: persistent + max(rollouts, reference, update)':<44}{_gib(est.peak)}")
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
  parts = f"train.micro_batches={run.micro_batches} and rl.prefill_micro_batches={run.prefill_micro_batches}"
  most = run.micro_batches * run.group_size >= run.rows and run.prefill_micro_batches >= run.rows
  fixes = [f"lower train.prompts_per_step or rl.max_new_tokens ({run.rows} rollouts x "
           f"{run.prompt_len + run.max_new_tokens} tokens per step)",
           f"({parts} already split the step into the most parts)" if most else
           f"raise {parts} (0 chooses the fewest parts that fit)",
           None if config.remat else "set model.remat=True",
           f"shard over more devices with mesh.fsdp (now {mesh_shape.get('fsdp', 1)})",
           None if run.compute_dtype == "bfloat16" else "use model.compute_dtype='bfloat16'",
           None if config.lora.rank else "train low-rank adapters only (lora.rank=64, optim.freeze_vision=True): "
           "no master weights, gradients or moments of the full model",
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

