"""`make bench-gpu`: the GPU check, one script, sized for at most 8 minutes on one H100 / H200 (not yet run on one).

Random weights at the full Qwen2.5-VL-3B shape in the real presets' dtype policy (training/params.py: float32 master
weights and AdamW moments for the decoder and LM head, bfloat16 compute, the frozen vision tower stored in bfloat16,
rollouts and the KL reference from bfloat16 copies). Three parts, in this order, each printed (and written to --out)
as soon as it is measured, so a run cut short keeps what it had:

  sanity  a small config, the same random weights: the bfloat16 forward on the default device against the float32
          forward on the CPU (max |logit difference|, relative error, argmax agreement over the real tokens), and
          one decode step's attention at a layer's shape of the recipe, the Pallas decode kernel in bfloat16 against
          the einsums in float32 on the CPU; outside the tolerance the script exits non-zero after the other parts.
  decode  the rollouts of one step of configs/noisygrpo.py:qwen2_5_vl_3b (16 prompts x 4 noise levels = 64 rows, 256
          new tokens, top-k 50 sampling) from the bfloat16 rollout copy: decode tokens/s and the fraction of the HBM
          roofline (bytes one decode step reads: bf16 weights + KV cache, over the card's bandwidth), in three
          variants (--decode-variants; each compiles prefill and the decode loop once): "unstacked", as the sampler
          and the trainer decode (the decoder layers one array per weight and one KV cache per layer,
          `unstacked_decoder`; rl.decode_kernel "auto": the Pallas decode kernel, which reads only each row's filled
          cache slots); "einsum", the same layers with the einsum attention over every slot; "scan", the layers
          stacked and scanned (the training layout: each step slices every layer's weights and cache out of the
          stacks); and the ratios of their tokens/s. The rl part decodes as the trainer does (with the einsums if
          the kernel failed in the decode part).
  rl      one full RL step of that recipe, run twice and the second reported (the first compiles): host prep (noise
          levels, noisy copies at native resolution, image processing, prompts, collation), rollout copy, prefill,
          decode, reward + advantages, reference log-probs, train step; the step's MFU and each phase's, the peak
          device memory and the memory estimate (training/memory.py) next to it.

The data are synthetic: one random 896 x 896 image per prompt (64 x 64 patches, 1024 image tokens, no resize within
data.max_pixels), questions of random words, a word-level tokenizer over the model's full vocabulary (the special
tokens at its top, the config's token ids set to them; shapes are the 3B model's). The reward is a stand-in: 0 or 1 per
rollout from a fixed seed, so its phase costs almost nothing where the real semantic reward embeds every answer. The
noise, advantages (NoisyGRPO's Bayesian fusion), clean-image swap, reference and update are the library's own
(training/rollouts.py, train_step.py), with the micro-batch counts the memory plan picks for the device (the
preset's train.micro_batches = rl.prefill_micro_batches = 0).

It imports only what the GPU machines have (jax, flax, optax, orbax, numpy, transformers' tokenizers, pillow): no
ml_collections (the preset's numbers are copied into `Recipe`; tests/test_bench_gpu.py checks them against it), no
tensorflow-datasets, torch or tqdm.

  python experiments/bench/bench_gpu.py [--parts sanity,decode,rl] [--decode-variants unstacked,einsum,scan]
                                        [--out bench_gpu.json] [--peak-flops 989e12] [--peak-bandwidth 3.35e12]
  python experiments/bench/bench_gpu.py --smoke     # tiny configs on CPU, the same code paths (< 1 min)
"""

from __future__ import annotations

import os
import sys

# The 3B recipe's update needs about 76 GiB by the memory estimate, and the memory plan reads the allocator's limit
# (75% of the card by default): let it take 98%, grown on demand so that CUDA's libraries get theirs first. Settings
# in the environment win.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.98")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_generate import decode_bytes_per_step  # noqa: E402
from common import matmul_peak, memory_bandwidth, peak_rss_gb  # noqa: E402
from noisygrpo_jax import sharding  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, decode_attention  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import layers as layers_lib, model as model_lib  # noqa: E402
from noisygrpo_jax.processing import chat_template, image as image_lib, tokenizer as tokenizer_lib  # noqa: E402
from noisygrpo_jax.rl import rewards as rewards_lib  # noqa: E402
from noisygrpo_jax.sampling import sampler  # noqa: E402
from noisygrpo_jax.training import memory, optimizer as optimizer_lib, params as params_lib  # noqa: E402
from noisygrpo_jax.training import rollouts, throughput, train_step as ts  # noqa: E402

GIB = 1024**3
PARTS = ("sanity", "decode", "rl")
# The decode part's variants: the decoder layers one array each (generate's layout) with the sampler's attention
# (rl.decode_kernel "auto": the Pallas decode kernel on GPU, which reads only the filled cache slots); the same layers
# with the einsums over every slot; the layers stacked and scanned (the training layout), the sampler's attention.
DECODE_VARIANTS = ("unstacked", "einsum", "scan")
START = time.perf_counter()

# HBM bandwidth per card in B/s, by jax's device_kind (longest prefix wins; vendor data sheets). The bf16 dense peaks
# are throughput.PEAK_FLOPS (989e12 for H100 SXM and H200).
PEAK_BANDWIDTH = {"NVIDIA H100": 3.35e12, "NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100 NVL": 3.9e12, "NVIDIA H200": 4.8e12}

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); through the small config's layers the
# logits of random weights come out about 1% off the float32 ones, and near-ties flip 1-2% of the argmaxes (measured
# on CPU: tiny 0.5% / 99.2%, small 0.9% / 98.2%). A broken device path (masks, layouts, NaNs) is off by O(1).
SANITY_MAX_RELATIVE_ERROR = 0.05
SANITY_MIN_ARGMAX_AGREEMENT = 0.9


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One RL step of configs/noisygrpo.py:qwen2_5_vl_3b (the preset's field in each comment), and the workload fed
  to it. The loss's k3 estimator, clip band 0.2 / 0.2 and sequence_mean_token_mean aggregation are
  train_step.LossConfig's defaults; AdamW's betas, eps, no weight decay and clipping at 1.0 are
  optimizer.make_optimizer's."""

  prompts: int = 16  # train.prompts_per_step
  group_size: int = 4  # rl.group_size
  noise_levels: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9)  # rl.noise.levels (schedule fixed, quantize wrap)
  advantage: str = "noisygrpo"  # rl.advantage
  r_value: float = 0.1  # rl.r_value
  p_alpha: float = 0.01  # rl.p_alpha
  max_new_tokens: int = 256  # rl.max_new_tokens
  temperature: float = 1.0  # rl.temperature
  top_k: int = 50  # rl.top_k (rl.top_p = 1: off)
  decode_kernel: str = "auto"  # rl.decode_kernel
  beta: float = 0.04  # rl.beta
  learning_rate: float = 1e-6  # optim.learning_rate (optim.warmup_steps 0, optim.decay linear)
  steps: int = 812  # train.steps: the span of the learning-rate decay
  dtype: str = "float32"  # model.dtype: master weights, gradients, moments
  compute_dtype: str = "bfloat16"  # model.compute_dtype
  remat: bool = True  # model.remat
  scan_layers: bool = True  # model.scan_layers
  min_pixels: int = 56 * 56  # data.min_pixels
  max_pixels: int = 1536 * 1536  # data.max_pixels
  prompt_buckets: tuple[int, ...] = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)  # data.prompt_buckets
  patch_buckets: tuple[int, ...] = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
                                    12288)  # data.patch_buckets
  # The workload, not the preset's: a native image side (px) and the question lengths (words) of the prompts.
  image_side: int = 896
  question_words: tuple[int, int] = (40, 120)


# The Pallas decode kernel forced ("auto" takes it on GPU only), interpreted on CPU; 16 new tokens: 128-token prompt
# bucket + 16 = 144 cache slots, a multiple of 16, which the kernel tiles.
SMOKE_RECIPE = Recipe(prompts=2, max_new_tokens=16, decode_kernel="pallas", image_side=112, question_words=(8, 16))
SANITY_RECIPE = Recipe(prompts=2, max_new_tokens=8, image_side=112, question_words=(8, 16))


def elapsed() -> str:
  return f"[{time.perf_counter() - START:6.1f} s]"


def log(text: str) -> None:
  print(f"{elapsed()} {text}", flush=True)


class Report:
  """The parts' results: printed when measured and written to `path` (JSON) after each part."""

  def __init__(self, path: Path | None):
    self.path, self.data = path, {}

  def add(self, part: str, values: dict, lines: list[str] = ()) -> None:
    self.data[part] = values
    if lines:
      print("\n".join([f"{elapsed()} {part}:"] + [f"  {line}" for line in lines]), flush=True)
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.write_text(json.dumps(self.data, indent=1, default=float))


# ------------------------------------------------------------------------------------------------
# Device figures


def by_kind(table: dict[str, float], kind: str) -> float:
  """table's value for the longest key that `kind` starts with, NaN when none does."""
  matches = [name for name in table if kind.startswith(name)]
  return table[max(matches, key=len)] if matches else float("nan")


def device_figures(args) -> dict:
  """The device, jax's version and the peak FLOP/s and bandwidth the utilisation figures divide by: --peak-flops /
  --peak-bandwidth, else the data-sheet figure for the card, else (a CPU, an unlisted card) measured here."""
  device = jax.devices()[0]
  flops, flops_source = args.peak_flops or throughput.peak_flops_per_device(), "data sheet (bf16 dense)"
  bandwidth, bandwidth_source = args.peak_bandwidth or by_kind(PEAK_BANDWIDTH, device.device_kind), "data sheet"
  if args.peak_flops:
    flops_source = "--peak-flops"
  elif not math.isfinite(flops):
    flops = matmul_peak(sizes=(1024,), repeats=3)["flops_per_s"]
    flops_source = "measured: jitted float32 1024^3 jnp.dot"
  if args.peak_bandwidth:
    bandwidth_source = "--peak-bandwidth"
  elif not math.isfinite(bandwidth):
    bandwidth = memory_bandwidth(megabytes=64, repeats=3)["best"]
    bandwidth_source = "measured: common.memory_bandwidth, 64 MB"
  return dict(device_kind=device.device_kind, backend=jax.default_backend(), jax_version=jax.__version__,
              devices=jax.device_count(), peak_flops=float(flops), peak_flops_source=flops_source,
              peak_bandwidth=float(bandwidth), peak_bandwidth_source=bandwidth_source)


def peak_memory() -> tuple[float, str]:
  """(bytes, what they are): the device allocator's peak where the backend reports it, else the host's peak RSS."""
  device = throughput.peak_memory_bytes()
  if math.isfinite(device):
    return device, "device peak_bytes_in_use"
  return peak_rss_gb() * 1e9, f"host peak RSS ({jax.default_backend()} reports no device memory)"


# ------------------------------------------------------------------------------------------------
# Workload


def make_examples(recipe: Recipe, seed: int) -> list[dict]:
  """recipe.prompts VQA examples: a random uint8 [side, side, 3] image and a question of random words."""
  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(256)]
  side = recipe.image_side
  return [{"id": i, "image": rng.integers(0, 256, (side, side, 3), np.uint8), "solution": "yes",
           "problem": " ".join(rng.choice(words, int(rng.integers(*recipe.question_words))))}
          for i in range(recipe.prompts)]


def word_tokenizer(examples: list[dict], vocab_size: int) -> tokenizer_lib.Tokenizer:
  """A word-level tokenizer of the examples' texts with exactly `vocab_size` ids (setup.build_tokenizer's recipe)."""
  texts = [chat_template.COT_INSTRUCTION] + [t for ex in examples for t in (ex["problem"], ex["solution"])]
  return tokenizer_lib.word_level_tokenizer(tokenizer_lib.word_level_vocabulary(texts), vocab_size)


def with_token_ids(config: cfg.Qwen25VLConfig, tokenizer: tokenizer_lib.Tokenizer) -> cfg.Qwen25VLConfig:
  """`config` with its vision token ids set to the tokenizer's (the shapes do not change)."""
  s = tokenizer.special
  return config.replace(image_token_id=s.image_pad, video_token_id=s.video_pad, vision_start_token_id=s.vision_start,
                        vision_end_token_id=s.vision_end)


def stand_in_reward(seed: int) -> rewards_lib.RewardFunction:
  """A reward of 0 or 1 per rollout, drawn from a fixed seed (deterministic in call order)."""
  rng = np.random.default_rng(seed)
  return lambda completion, solution, question: float(rng.integers(2))


def rollout_config(recipe: Recipe, tokenizer, config: cfg.Qwen25VLConfig, seed: int,
                   prefill_micro_batches: int = 1) -> rollouts.RolloutConfig:
  """The recipe's rollout settings (setup.rollout_config without ml_collections), with the stand-in reward."""
  v = config.vision
  sampling = sampler.SamplingParams(max_new_tokens=recipe.max_new_tokens, temperature=recipe.temperature,
                                    top_k=recipe.top_k, eos_ids=tuple(sorted({tokenizer.eos_id,
                                                                              tokenizer.special.endoftext})),
                                    pad_id=tokenizer.pad_id, prefill_micro_batches=prefill_micro_batches,
                                    decode_kernel=recipe.decode_kernel)
  image = image_lib.ImageProcessorConfig(min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels,
                                         patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                         merge_size=v.spatial_merge_size, pixel_dtype="uint8")
  return rollouts.RolloutConfig(
      group_size=recipe.group_size, noise_enabled=True, noise_levels=recipe.noise_levels, noise_schedule="fixed",
      noise_quantize="wrap", noise_anneal="none", advantage=recipe.advantage,
      advantage_hyper=dict(r_value=recipe.r_value, p_alpha=recipe.p_alpha),
      reward_functions={"stand_in": stand_in_reward(seed)}, mask_noise_correct=False, sampling=sampling, image=image,
      prompt_buckets=recipe.prompt_buckets, patch_buckets=recipe.patch_buckets, max_prompt_tokens=0)


# ------------------------------------------------------------------------------------------------
# (c) sanity: bf16 on the default device against float32 on the CPU


def sanity(args) -> dict:
  """Logits of one set of random weights of a small config: float32 on the CPU, bfloat16 on the default device,
  on the recipe's prompts (left-padded, one noisy image each); compared over the real (unpadded) tokens."""
  make = cfg.tiny if args.smoke else cfg.small
  examples = make_examples(SANITY_RECIPE, args.seed)
  tokenizer = word_tokenizer(examples, make().text.vocab_size)
  config = with_token_ids(make(dtype="float32"), tokenizer)
  rollout_cfg = rollout_config(SANITY_RECIPE, tokenizer, config, args.seed)
  prompts = rollouts.prepare_rollouts(tokenizer, rollout_cfg, config, examples, jax.random.key(args.seed), 0,
                                      SANITY_RECIPE.steps).prompts
  cpu, device = jax.devices("cpu")[0], jax.devices()[0]
  with jax.default_device(cpu):
    graphdef, state = nnx.split(nnx.jit(lambda: Qwen25VL(config, nnx.Rngs(args.seed)))())
  params = nnx.to_pure_dict(state)
  inputs = (prompts.input_ids, prompts.position_ids, prompts.attention_mask, prompts.vision)
  reference = np.asarray(model_lib.jitted_logits(graphdef, jax.device_put(params, cpu), *jax.device_put(inputs, cpu)))
  ours = np.asarray(model_lib.jitted_logits(graphdef, jax.device_put(params_lib.cast(params, "bfloat16"), device),
                                            *jax.device_put(inputs, device)))
  valid = np.asarray(prompts.attention_mask).astype(bool)
  ours, reference = ours[valid], reference[valid]
  finite = bool(np.isfinite(ours).all())
  out = dict(config="tiny" if args.smoke else "small", rows=int(valid.shape[0]), tokens=int(valid.sum()),
             max_abs_diff=float(np.abs(ours - reference).max()),
             relative_error=float(np.linalg.norm(ours - reference) / np.linalg.norm(reference)),
             argmax_agreement=float((ours.argmax(-1) == reference.argmax(-1)).mean()),
             reference_logit_std=float(reference.std()), finite=finite)
  out["passed"] = bool(finite and out["relative_error"] <= SANITY_MAX_RELATIVE_ERROR
                       and out["argmax_agreement"] >= SANITY_MIN_ARGMAX_AGREEMENT)
  out["decode_kernel"] = decode_kernel_sanity(args)
  out["passed"] = out["passed"] and out["decode_kernel"]["passed"]
  return out


def decode_kernel_sanity(args) -> dict:
  """One decode step's attention, the Pallas decode kernel in bfloat16 on the default device (interpreted on CPU)
  against the einsums in float32 on the CPU: random q, k, v at one layer's shape of the recipe's decode (64 rows,
  16 heads over 2 KV heads of 128, 1792 slots; smoke: 4 rows, 8 over 2 of 16, 96 slots), each row's valid slots one
  run from a random start (left padding) to a random end (the current token)."""
  rows, heads, kv_heads, head_dim, slots = (4, 8, 2, 16, 96) if args.smoke else (64, 16, 2, 128, 1792)
  rng = np.random.default_rng(args.seed)
  q = rng.standard_normal((rows, 1, heads, head_dim)).astype(np.float32)
  k, v = (rng.standard_normal((rows, kv_heads, slots, head_dim)).astype(np.float32) for _ in range(2))
  start = rng.integers(0, slots // 2, rows)
  end = rng.integers(start + 1, slots + 1)
  mask = (np.arange(slots) >= start[:, None]) & (np.arange(slots) < end[:, None])
  attention = lambda *a: layers_lib.attention(*a, kv_heads_major=True)
  with decode_attention.decoding("einsum"), jax.default_device(jax.devices("cpu")[0]):
    reference = np.asarray(jax.jit(attention)(q, k, v, mask[:, None]))
  with decode_attention.decoding("pallas"):
    half = [jax.device_put(jnp.asarray(x, jnp.bfloat16)) for x in (q, k, v)]
    ours = np.asarray(jax.jit(attention)(*half, jax.device_put(mask[:, None])).astype(jnp.float32))
  out = dict(shape=[rows, heads, kv_heads, head_dim, slots], max_abs_diff=float(np.abs(ours - reference).max()),
             relative_error=float(np.linalg.norm(ours - reference) / np.linalg.norm(reference)),
             finite=bool(np.isfinite(ours).all()))
  out["passed"] = out["finite"] and out["relative_error"] <= SANITY_MAX_RELATIVE_ERROR
  return out


def sanity_lines(r: dict, device: str) -> list[str]:
  k = r["decode_kernel"]
  return [f"{r['config']} config, {r['rows']} rows, {r['tokens']} real tokens: bfloat16 on {device} vs float32 on the "
          f"CPU, same random weights",
          f"max |logit diff| {r['max_abs_diff']:.4g} (float32 logit std {r['reference_logit_std']:.3g}), relative "
          f"error {r['relative_error']:.3%} (bound {SANITY_MAX_RELATIVE_ERROR:.0%}), argmax agreement "
          f"{r['argmax_agreement']:.2%} (bound {SANITY_MIN_ARGMAX_AGREEMENT:.0%})",
          f"decode attention, the Pallas kernel in bfloat16 on {device} vs the einsums in float32 on the CPU "
          f"(rows, heads, KV heads, head dim, slots {k['shape']}): max |diff| {k['max_abs_diff']:.4g}, relative "
          f"error {k['relative_error']:.3%} (bound {SANITY_MAX_RELATIVE_ERROR:.0%})",
          "passed" if r["passed"] else "FAILED"]


# ------------------------------------------------------------------------------------------------
# The recipe's model, state and step (shared by the decode and rl parts)


class RecipeRun:
  """The recipe on one device, assembled as training/loops.run_rl does (setup.py needs ml_collections and tfds, so
  the parts come from the modules it calls): examples and tokenizer, the memory plan, the train state in the dtype
  policy (`train_step.init_train_state`), the reference copy, the jitted reference log-probs and train step."""

  def __init__(self, args, recipe: Recipe):
    self.recipe, self.seed = recipe, args.seed
    self.examples = make_examples(recipe, args.seed)
    base = cfg.tiny if args.smoke else cfg.qwen2_5_vl_3b
    self.tokenizer = word_tokenizer(self.examples, base().text.vocab_size)
    self.config = with_token_ids(base(dtype=recipe.dtype, remat=recipe.remat, scan_layers=recipe.scan_layers),
                                 self.tokenizer)
    self.rollout_cfg = rollout_config(recipe, self.tokenizer, self.config, args.seed)
    self.mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.mesh_shape = dict(self.mesh.shape)

    log("host prep of the first step's prompts (sizes the memory plan)")
    self.first_prompts = self.prepare(0)  # the decode part's
    prompts = self.first_prompts.prompts
    self.prompt_len, self.patches = prompts.input_ids.shape[1], prompts.vision.pixel_values.shape[1]
    self.plan()
    self.rollout_cfg = dataclasses.replace(self.rollout_cfg, sampling=dataclasses.replace(
        self.rollout_cfg.sampling, prefill_micro_batches=self.prefill_micro_batches))

    log(f"building {'the tiny model' if args.smoke else 'Qwen2.5-VL-3B'} with random {recipe.dtype} weights")
    optimizer = optimizer_lib.make_optimizer(optimizer_lib.learning_rate_schedule(recipe.learning_rate,
                                                                                  recipe.steps))
    train_setup, self.state = ts.init_train_state(nnx.jit(lambda: Qwen25VL(self.config, nnx.Rngs(args.seed)))(),
                                                  optimizer, self.mesh, compute_dtype=recipe.compute_dtype,
                                                  freeze_vision=True)
    self.graphdef, self.state_sh = train_setup.graphdef, train_setup.state_shardings
    self.reference = params_lib.copy_as(self.state.params, recipe.compute_dtype)
    jax.block_until_ready((self.state, self.reference))

    self.loss_cfg = ts.LossConfig(beta=recipe.beta, compute_dtype=recipe.compute_dtype, group_size=recipe.group_size)
    self.step_fn = ts.make_train_step(self.graphdef, optimizer, self.loss_cfg, self.micro_batches)
    self.logps = jax.jit(ts.logps_fn(self.graphdef, self.loss_cfg.chunk_size, recipe.group_size, self.micro_batches))
    self.jitted_step = None  # made from the first batch's shardings
    log("model and train state built")

  @property
  def rows(self) -> int:
    return self.recipe.prompts * self.recipe.group_size

  def plan(self) -> None:
    """The micro-batch counts the preset leaves to the memory check (0 = the fewest that fit) and the estimate."""
    run = memory.RunShape(rows=self.rows, prompt_len=self.prompt_len, max_new_tokens=self.recipe.max_new_tokens,
                          patches=self.patches, micro_batches=0, prefill_micro_batches=0, rollout_replicated=True,
                          group_size=self.recipe.group_size, freeze_vision=True, reference=bool(self.recipe.beta),
                          compute_dtype=self.recipe.compute_dtype, logits_chunk=ts.LossConfig().chunk_size)
    self.limit, self.limit_source = memory.device_memory_bytes()
    self.micro_batches, self.prefill_micro_batches = memory.fewest_parts(self.config, run, self.mesh_shape,
                                                                         self.limit)
    self.estimate = memory.estimate(self.config, dataclasses.replace(
        run, micro_batches=self.micro_batches, prefill_micro_batches=self.prefill_micro_batches), self.mesh_shape)
    print(memory.format_table(self.estimate, self.limit, self.limit_source, self.mesh_shape), flush=True)
    log(f"plan: {self.rows} rollout rows, prompt bucket {self.prompt_len} tokens, {self.patches} patches per image; "
        f"train.micro_batches={self.micro_batches}, rl.prefill_micro_batches={self.prefill_micro_batches}"
        + ("; WARNING: the estimate exceeds the device limit" if self.estimate.peak > self.limit else ""))

  def prepare(self, step: int) -> rollouts.PreparedPrompts:
    """The host work of step `step`'s rollout inputs (rollouts.prepare_rollouts, in line)."""
    return rollouts.prepare_rollouts(self.tokenizer, self.rollout_cfg, self.config, self.examples,
                                     jax.random.fold_in(jax.random.key(self.seed), step), step, self.recipe.steps)

  def place(self, prompts):
    """Rollout prompts on the mesh, rows over its batch axes (loops.Run.place_prompts)."""
    return jax.device_put(prompts, ts.batch_shardings(prompts, self.mesh))

  def rollout_params(self) -> dict:
    """The policy as rollouts see it (loops.Run.rollout_params): a compute-dtype copy of the trainable weights, the
    decoder layers one array per layer (`params.rollout_copy`), and the shared frozen ones."""
    return params_lib.rollout_copy(self.state.params, self.state.frozen, self.recipe.compute_dtype)

  def stacked_rollout_params(self) -> dict:
    """`rollout_params` with the decoder layers left stacked (the training layout, for `graphdef`)."""
    return params_lib.combine(params_lib.cast(self.state.params, self.recipe.compute_dtype), self.state.frozen)

  @functools.cached_property
  def rollout_graphdef(self) -> nnx.GraphDef:
    """The graphdef of `rollout_params`' model (loops.Run.model)."""
    return params_lib.rollout_graphdef(self.graphdef, self.stacked_rollout_params())

  def rl_step(self, step: int) -> dict:
    """One RL step as loops.run_rl runs it (inputs made in line); wall seconds per phase and the step's results."""
    start = time.perf_counter()
    prepared = self.prepare(step)
    t = time.perf_counter()
    model = nnx.merge(self.rollout_graphdef, jax.block_until_ready(self.rollout_params()))
    copy_s = time.perf_counter() - t
    r = rollouts.sample_rollouts(model, self.tokenizer, self.rollout_cfg, prepared, place=self.place)
    del model  # the real loop drops the rollout copy before the update
    t0 = time.perf_counter()
    batch_sh = ts.batch_shardings(r.batch, self.mesh)
    batch = jax.device_put(r.batch, batch_sh)
    batch = batch.replace(ref_logps=jax.block_until_ready(
        self.logps(params_lib.combine(self.reference, self.state.frozen), batch)))
    t1 = time.perf_counter()
    if self.jitted_step is None:
      self.jitted_step = ts.jit_train_step(self.step_fn, self.state_sh, batch_sh, self.mesh)
    self.state, metrics, _ = self.jitted_step(self.state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t2 = time.perf_counter()
    seconds = {"host": prepared.seconds, "rollout_copy": copy_s, "prefill": r.metrics["time/prefill"],
               "decode": r.metrics["time/decode"], "reward": r.metrics["time/reward"], "reference": t1 - t0,
               "train": t2 - t1, "step": t2 - start}
    return dict(seconds=seconds, metrics=r.metrics, train=metrics, completion_len=batch.completion_len)


# ------------------------------------------------------------------------------------------------
# (a) decode


def generate_timed(graphdef: nnx.GraphDef, state: nnx.State, prompts, key: jax.Array,
                   sampling: sampler.SamplingParams) -> tuple[float, float, int]:
  """(prefill seconds, decode seconds, decode steps) of one generation of the recipe's rollouts: sampler.prefill then
  sampler.decode on the weights `state` (the bf16 rollout copy) merged with `graphdef`, each waited for."""
  start = time.perf_counter()
  decode_state = jax.block_until_ready(sampler.prefill(graphdef, state, prompts, key, sampling))
  prefill_s = time.perf_counter() - start
  start = time.perf_counter()
  final = jax.block_until_ready(sampler.decode(graphdef, state, decode_state, prompts.input_ids.shape[1], sampling))
  return prefill_s, time.perf_counter() - start, int(final.step)  # loop iterations: until all rows stop or the budget


def decode(run: RecipeRun, args, peaks: dict, variant: str) -> tuple[dict, list[str]]:
  """Decode tokens/s of the recipe's rollouts from the bf16 rollout copy and the fraction of the HBM roofline, as
  DECODE_VARIANTS `variant`. Prompts and sampling are the rl part's (shapes, parameters, placement)."""
  prepared = run.first_prompts
  prompts = run.place(prepared.prompts)
  layers = "scan" if variant == "scan" else "unstacked"
  sampling = run.rollout_cfg.sampling
  if variant == "einsum":
    sampling = dataclasses.replace(sampling, decode_kernel="einsum")
  mask = np.asarray(prepared.prompts.attention_mask)
  slots = mask.shape[1] + run.recipe.max_new_tokens
  kernel = decode_kernel(run, sampling.decode_kernel, slots)
  if layers == "unstacked":
    graphdef, state = nnx.split(nnx.merge(run.rollout_graphdef, run.rollout_params()))  # what generate passes
  else:
    graphdef, state = nnx.split(nnx.merge(run.graphdef, run.stacked_rollout_params()))
  t = time.perf_counter()
  generate_timed(graphdef, state, prompts, prepared.sample_key, sampling)
  first_s = time.perf_counter() - t
  log(f"decode ({layers} layers, {kernel} attention): first prefill + decode (compiles) {first_s:.1f} s")
  prefill, seconds, steps = [], [], []
  for i in range(args.decode_repeats):
    p, d, n = generate_timed(graphdef, state, prompts, jax.random.fold_in(prepared.sample_key, i + 1), sampling)
    prefill.append(p)
    seconds.append(d)
    steps.append(n)
  del state
  batch, step_count = run.rows, min(steps)
  decode_s = statistics.median(seconds)
  step_s = statistics.median([s / n for s, n in zip(seconds, steps)])
  valid = mask.sum(1).mean() + (step_count + 1) / 2  # the filled cache slots, averaged over the decode
  weights, kv_all, kv_filled = decode_bytes_per_step(run.config.replace(dtype=run.recipe.compute_dtype), batch, slots,
                                                     valid)
  flops = throughput.decode_step_flops(run.config, batch, slots)
  r = dict(layers=layers, attention=kernel, rows=batch, prompt_len=int(mask.shape[1]),
           new_tokens=run.recipe.max_new_tokens, decode_steps=step_count, repeats=args.decode_repeats,
           first_call_s=first_s,
           prefill_s=statistics.median(prefill), decode_s=decode_s, decode_s_min=min(seconds),
           decode_s_max=max(seconds), tokens_per_s=statistics.median([batch * n / s for s, n in zip(seconds, steps)]),
           step_ms=1e3 * step_s, weight_bytes=weights, kv_filled_bytes=kv_filled, kv_all_bytes=kv_all,
           hbm_roofline_fraction=(weights + kv_filled) / step_s / peaks["peak_bandwidth"],
           hbm_roofline_fraction_all_slots=(weights + kv_all) / step_s / peaks["peak_bandwidth"],
           decode_flops_per_s=flops / step_s, decode_flop_fraction=flops / step_s / peaks["peak_flops"])
  lines = [
      f"{variant}: {layers} layers, {kernel} decode attention; {batch} rows ({run.recipe.prompts} prompts x "
      f"{run.recipe.group_size} noise levels), prompt "
      f"bucket {r['prompt_len']} tokens, {run.recipe.max_new_tokens} new tokens (top-k {run.recipe.top_k}, "
      f"temperature {run.recipe.temperature}; {step_count} decode steps ran), bf16 rollout copy; median of "
      f"{args.decode_repeats} runs after a compiling one ({first_s:.1f} s)",
      f"prefill {r['prefill_s']:.3f} s; decode {decode_s:.3f} s (min {min(seconds):.3f}, max "
      f"{max(seconds):.3f}): {r['tokens_per_s']:.0f} tokens/s, {r['step_ms']:.2f} ms per step",
      f"bytes read per step: bf16 weights {weights / 1e9:.3g} GB + KV cache {kv_filled / 1e9:.3g} GB filled on "
      f"average ({kv_all / 1e9:.3g} GB: all {slots} slots, what the masked attention reads)",
      f"HBM roofline at {peaks['peak_bandwidth']:.3g} B/s: {r['hbm_roofline_fraction']:.1%} (weights + filled KV), "
      f"{r['hbm_roofline_fraction_all_slots']:.1%} (weights + all slots); decode {flops / step_s / 1e12:.3g} TFLOP/s "
      f"= {r['decode_flop_fraction']:.1%} of {peaks['peak_flops']:.3g} FLOP/s"]
  return r, lines


def decode_kernel(run: RecipeRun, kernel: str, slots: int) -> str:
  """The attention a decode step of the recipe runs with rl.decode_kernel `kernel`: "auto" resolved for the rollout
  copy's dtype, heads and `slots` cache slots on this backend (`decode_attention.accepts`)."""
  if kernel != "auto":
    return kernel
  t, rows = run.config.text, run.rows
  q = jax.ShapeDtypeStruct((rows, 1, t.num_attention_heads, t.head_dim), run.recipe.compute_dtype)
  k = jax.ShapeDtypeStruct((rows, t.num_key_value_heads, slots, t.head_dim), run.recipe.compute_dtype)
  return "pallas" if decode_attention.accepts(q, k) else "einsum"


def decode_part(run: RecipeRun, args, peaks: dict, report: Report) -> list[str]:
  """The decode part: `decode` for each of --decode-variants, reported as each is measured, with the ratios of their
  decode tokens/s (unstacked over scan: the layouts; unstacked over einsum: the sampler's attention over the
  einsums). Returns the variants' failures; if the sampler's attention fails (the Pallas kernel on this GPU and jax),
  the rl part decodes with the einsums."""
  results, failures = {}, []
  ratios = {"unstacked_over_scan": ("unstacked", "scan"), "unstacked_over_einsum": ("unstacked", "einsum")}
  for variant in args.decode_variants:
    try:
      results[variant], lines = decode(run, args, peaks, variant)
    except Exception as error:  # noqa: BLE001  (the other variants and the rl part still run)
      traceback.print_exc()
      failures.append(f"decode {variant}: {type(error).__name__}: {str(error)[:500]}")
      if variant != "einsum" and run.rollout_cfg.sampling.decode_kernel != "einsum":
        log("the sampler's decode attention failed: the rl part decodes with rl.decode_kernel=einsum")
        run.rollout_cfg = dataclasses.replace(run.rollout_cfg, sampling=dataclasses.replace(
            run.rollout_cfg.sampling, decode_kernel="einsum"))
      continue
    for name, (a, b) in ratios.items():
      if name not in results and a in results and b in results:
        results[name] = results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
        lines.append(f"{a} / {b} decode tokens/s: {results[name]:.3f}")
    report.add("decode", results, lines)
  return failures


# ------------------------------------------------------------------------------------------------
# (b) one full RL step


def rl(run: RecipeRun, peaks: dict) -> tuple[dict, list[str]]:
  """One RL step of the recipe, twice; the second (compiled) is reported with its MFU, peak memory and estimate."""
  first = run.rl_step(1)
  log("rl: first step (compiles the reference log-probs and the train step): "
      + ", ".join(f"{k} {v:.2f}" for k, v in first["seconds"].items()) + " s")
  second = run.rl_step(2)
  s, m = second["seconds"], second["metrics"]
  shapes = dict(rows=run.rows, prompt_len=run.prompt_len, decode_steps=int(m["decode/steps"]), patches=run.patches,
                group_size=run.recipe.group_size, train_vision=False, reference=True)
  step = throughput.step_metrics(run.config, **shapes, tokens=m["tokens/prompt"] + m["tokens/completion"],
                                 seconds=s["step"], devices=1, peak_flops=peaks["peak_flops"])
  flops = throughput.rl_step_flops(run.config, run.rows, run.prompt_len, shapes["decode_steps"], run.patches,
                                   run.recipe.group_size)
  phase_seconds = {"prefill": s["prefill"], "decode": s["decode"], "reference": s["reference"], "update": s["train"]}
  mfu = {phase: flops[phase] / seconds / peaks["peak_flops"] for phase, seconds in phase_seconds.items()}
  mfu["step"] = step["throughput/mfu"]
  peak, peak_source = peak_memory()
  r = dict(rows=run.rows, prompt_len=run.prompt_len, completion_len=int(second["completion_len"]), patches=run.patches,
           decode_steps=shapes["decode_steps"], micro_batches=run.micro_batches,
           prefill_micro_batches=run.prefill_micro_batches, seconds=s, first_step_seconds=first["seconds"],
           model_tflops=flops["total"] / 1e12, tflops_by_phase={k: flops[k] / 1e12 for k in phase_seconds},
           mfu=mfu, tokens_per_s=step["throughput/tokens_per_s_per_device"], peak_memory_bytes=peak,
           peak_memory_source=peak_source, estimate_peak_bytes=float(run.estimate.peak),
           estimate_programs_bytes={k: float(v) for k, v in run.estimate.programs().items()},
           device_limit_bytes=float(run.limit), loss=second["train"]["loss"], grad_norm=second["train"]["grad_norm"],
           skipped=second["train"]["skipped"], reward_mean=m["reward/semantic"],
           kalman_gain=m.get("advantage/kalman_gain", float("nan")))
  phases = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "step")
  lines = [
      f"one step of configs/noisygrpo.py:qwen2_5_vl_3b: {run.rows} rollouts, prompt bucket {run.prompt_len} tokens, "
      f"{run.patches} patches per image, {shapes['decode_steps']} decode steps; float32 master + AdamW, bf16 compute, "
      f"frozen bf16 vision tower, remat; train.micro_batches={run.micro_batches}, "
      f"rl.prefill_micro_batches={run.prefill_micro_batches}; reward: a random 0/1 stand-in (fixed seed)",
      f"second step {s['step']:.2f} s (first, with compiles: {first['seconds']['step']:.1f} s); seconds by phase: "
      f"{phases}",
      f"model FLOPs {flops['total'] / 1e12:.3g} TFLOP (prefill {flops['prefill'] / 1e12:.3g}, decode "
      f"{flops['decode'] / 1e12:.3g}, reference {flops['reference'] / 1e12:.3g}, update {flops['update'] / 1e12:.3g}); "
      f"MFU at {peaks['peak_flops']:.3g} FLOP/s: step {mfu['step']:.1%}, prefill {mfu['prefill']:.1%}, decode "
      f"{mfu['decode']:.1%}, reference {mfu['reference']:.1%}, update {mfu['update']:.1%}; "
      f"{r['tokens_per_s']:.0f} tokens/s",
      f"peak memory {peak / GIB:.2f} GiB ({peak_source}); memory estimate {run.estimate.peak / GIB:.2f} GiB (device "
      f"limit {run.limit / GIB:.2f} GiB, {run.limit_source})",
      f"train step: loss {r['loss']:.4g}, grad norm {r['grad_norm']:.4g}, skipped {r['skipped']:.0f}; mean stand-in "
      f"reward {r['reward_mean']:.3f}, mean Kalman gain {r['kalman_gain']:.3f}"]
  return r, lines


# ------------------------------------------------------------------------------------------------


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
  parser.add_argument("--out", type=Path, help="write the results here (JSON), rewritten after each part")
  parser.add_argument("--smoke", action="store_true", help="tiny configs and a small step on CPU: the same code paths")
  parser.add_argument("--peak-flops", type=float, default=0.0,
                      help="bf16 peak FLOP/s of the card for MFU (default: by device kind, throughput.PEAK_FLOPS)")
  parser.add_argument("--peak-bandwidth", type=float, default=0.0,
                      help="memory bandwidth of the card in B/s for the roofline (default: by device kind)")
  parser.add_argument("--decode-repeats", type=int, default=3, help="timed decode runs after the compiling one")
  parser.add_argument("--decode-variants", default=",".join(DECODE_VARIANTS),
                      help="the decode part's variants, comma-separated: unstacked (as the sampler decodes), einsum "
                      "(its layers with the einsum attention over every cache slot), scan (the stacked, scanned "
                      "training layout); each compiles prefill and the decode loop once")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  parts, args.decode_variants = args.parts.split(","), args.decode_variants.split(",")
  for option, chosen, allowed in (("--parts", parts, PARTS),
                                  ("--decode-variants", args.decode_variants, DECODE_VARIANTS)):
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
      parser.error(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}")
  if jax.default_backend() == "cpu" and not args.smoke:
    sys.exit(f"bench_gpu.py needs a GPU, but jax.default_backend() is 'cpu' (devices: {jax.devices()}); add --smoke "
             "to run the same code paths on CPU with tiny configs")

  report = Report(args.out)
  peaks = device_figures(args)
  report.add("device", {**peaks, "smoke": args.smoke, "parts": parts, "decode_variants": args.decode_variants}, [
      f"{peaks['device_kind']} ({peaks['backend']}, {peaks['devices']} device(s)), jax {peaks['jax_version']}",
      f"peak bf16 {peaks['peak_flops']:.4g} FLOP/s ({peaks['peak_flops_source']}), memory bandwidth "
      f"{peaks['peak_bandwidth']:.4g} B/s ({peaks['peak_bandwidth_source']})"])
  failures = []
  if "sanity" in parts:
    try:
      result = sanity(args)
      report.add("sanity", result, sanity_lines(result, peaks["device_kind"]))
      if not result["passed"]:
        failures.append("sanity: the bf16 device forward is outside the tolerance of the float32 CPU forward")
    except Exception as error:  # noqa: BLE001  (each part reports its failure; the others still run)
      traceback.print_exc()
      failures.append(f"sanity: {type(error).__name__}: {error}")
  recipe = SMOKE_RECIPE if args.smoke else Recipe()
  run = None
  for part in [p for p in PARTS[1:] if p in parts]:
    try:
      run = run or RecipeRun(args, recipe)
      if part == "decode":
        failures += decode_part(run, args, peaks, report)
      else:
        report.add(part, *rl(run, peaks))
    except Exception as error:  # noqa: BLE001
      traceback.print_exc()
      failures.append(f"{part}: {type(error).__name__}: {str(error)[:500]}")
  report.add("failures", failures)
  log("done" + "".join(f"\nFAILED {f}" for f in failures))
  if failures:
    sys.exit(1)


if __name__ == "__main__":
  main()
