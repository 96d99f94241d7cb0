"""Builds what a run needs from its ml_collections config: mesh, data, tokenizer, model, optimizer, state.

This is the edge where config objects are unpacked into the plain arguments of the library's functions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, TypeVar

import jax
from flax import nnx
from jax.experimental import multihost_utils

from noisygrpo_jax import sharding
from noisygrpo_jax.data import loading
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as model_config_lib, decode_attention, load_hf
from noisygrpo_jax.processing import chat_template, image as image_lib, tokenizer as tokenizer_lib
from noisygrpo_jax.rl import rewards as rewards_lib
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import optimizer as optimizer_lib
from noisygrpo_jax.training import memory, rollouts, train_step

T = TypeVar("T")

GROUP_SIZE_ERROR = ("rl.group_size={g} does not match the {n} noise levels {levels}; with the fixed grid each "
                    "rollout of a group takes one level: set rl.group_size={n} or change rl.noise.levels")


def validate(config) -> None:
  """Checks cross-field consistency; raises ValueError naming the fields and the fix."""
  rl = config.rl
  if rl.group_size < 2:
    raise ValueError(f"rl.group_size={rl.group_size}: group-relative advantages need at least 2 rollouts per "
                     "prompt (a group of 1 always has advantage 0); set rl.group_size >= 2 with as many "
                     "rl.noise.levels")
  if rl.noise.enabled and rl.noise.schedule == "fixed" and len(rl.noise.levels) != rl.group_size:
    raise ValueError(GROUP_SIZE_ERROR.format(g=rl.group_size, n=len(rl.noise.levels), levels=rl.noise.levels))
  outside = [level for level in rl.noise.levels if not 0.0 <= level <= 1.0]
  if outside:
    raise ValueError(f"rl.noise.levels={tuple(rl.noise.levels)}: {outside} outside [0, 1]; a level is the "
                     "fraction of the diffusion schedule (0 clean, 1 pure noise), so give levels in [0, 1]")
  if rl.advantage == "noisygrpo" and not rl.noise.enabled:
    raise ValueError("rl.advantage='noisygrpo' needs rl.noise.enabled=True (its prior is the noise level)")
  if config.train.micro_batches:  # 0 is chosen by check_memory
    train_step.check_whole_groups(config.train.prompts_per_step, rl.group_size, config.train.micro_batches)
  if rl.rollout_weights not in ("replicated", "train"):
    raise ValueError(f"rl.rollout_weights={rl.rollout_weights!r} must be 'replicated' (the whole rollout copy on every "
                     "device) or 'train' (the training layout)")
  if rl.decode_kernel not in decode_attention.KERNELS:
    raise ValueError(f"rl.decode_kernel={rl.decode_kernel!r} must be one of {', '.join(decode_attention.KERNELS)} "
                     "(auto: the Pallas decode kernel on GPU where it takes the shapes, the einsums elsewhere)")
  validate_lora(config)
  if rl.filter_groups not in ("none", "drop", "refill"):
    raise ValueError(f"rl.filter_groups={rl.filter_groups!r} must be 'none', 'drop' (equal-reward groups leave the "
                     "update) or 'refill' (more prompts until the step has only informative groups)")
  if rl.filter_max_rounds < 1:
    raise ValueError(f"rl.filter_max_rounds={rl.filter_max_rounds} must be >= 1 (1: refill never samples again)")
  rows = config.train.prompts_per_step * rl.group_size
  if rl.prefill_micro_batches and rows % rl.prefill_micro_batches:
    raise ValueError(f"rl.prefill_micro_batches={rl.prefill_micro_batches} does not divide the {rows} rollout rows "
                     "(train.prompts_per_step x rl.group_size); choose a divisor, or 0 for the fewest that fit")


def validate_lora(config) -> None:
  """Checks lora.* (and what LoRA needs of the other fields); raises ValueError naming the field and the fix."""
  problems = model_config_lib.lora_problems(lora_config(config))
  if problems:
    raise ValueError("Invalid lora.* config:\n  " + "\n  ".join(problems))
  rank = lora_config(config).rank
  if not rank:
    return
  if not config.optim.freeze_vision:
    raise ValueError(f"lora.rank={rank} trains only the decoder's adapters, so the vision tower stays frozen: set "
                     "optim.freeze_vision=True (or lora.rank=0 to train the full model)")
  if config.train.init_from:
    raise ValueError(f"lora.rank={rank} with train.init_from={config.train.init_from!r}: a LoRA run starts from a "
                     "base checkpoint, not from another run's state; export the warm start to an HF directory "
                     "(checkpoint.save_hf merges its adapters) and set model.checkpoint to it")


def make_mesh(config):
  """jax.distributed.initialize when asked, then the (data, fsdp, tensor) mesh."""
  m = config.mesh
  if m.num_processes > 1:
    jax.distributed.initialize(coordinator_address=m.coordinator_address or None, num_processes=m.num_processes,
                               process_id=None if m.process_id < 0 else m.process_id)
  return sharding.make_mesh(m.data, m.fsdp, m.tensor)


def process_zero_first(make: Callable[[], T], name: str) -> T:
  """`make()` on process 0, then on the other processes once it has returned (`name` labels the barrier).

  What `make` prepares on a disk that the processes share (the dataset in data.data_dir, the tokenizer in
  train.workdir) is then written once and read by the others, never raced: two processes preparing one tfds dataset
  at once fail in its final rename. On disks of their own, the others prepare their own copies as process 0 did.
  """
  if jax.process_count() == 1:
    return make()
  first = jax.process_index() == 0
  result = make() if first else None
  multihost_utils.sync_global_devices(name)
  return result if first else make()


def data_dir(config) -> str:
  return config.data.data_dir or os.path.join(config.train.workdir, "data")


def dataset_kwargs(config) -> dict:
  d = config.data
  if d.name == "shapes_vqa":
    return dict(image_size=d.image_size, seed=d.seed, train_size=d.train_size, test_size=d.eval_size,
                ood_size=d.eval_size, hallucination_size=d.eval_size, robustness_size=d.eval_size)
  if d.name == "local_vqa":
    if not d.jsonl:
      raise ValueError("data.name='local_vqa' needs data.jsonl: the JSONL file with image, problem, solution")
    return dict(files=d.jsonl, image_root=d.image_root or None, skip_bad_rows=d.skip_bad_rows)
  raise ValueError(f"data.name={d.name!r} must be 'shapes_vqa' or 'local_vqa'")


def load_split(config, split: str):
  """Split `split` of the run's dataset, prepared in data_dir(config) if needed (by process 0 first)."""
  return process_zero_first(
      lambda: loading.load_split(config.data.name, split, data_dir(config), **dataset_kwargs(config)),
      f"load_split {split}")


def build_tokenizer(config, train_examples) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer; the word-level one is built from the training texts once and kept in the workdir
  (by process 0 first: `process_zero_first`)."""
  kind = config.tokenizer.kind
  if kind == "qwen":
    return tokenizer_lib.qwen2_5_tokenizer()
  if kind == "checkpoint":
    return tokenizer_lib.load_tokenizer(config.model.checkpoint)
  if kind != "word":
    raise ValueError(f"tokenizer.kind={kind!r} must be 'word', 'qwen' or 'checkpoint'")
  saved = os.path.join(config.train.workdir, "tokenizer")

  def word_level():
    if os.path.exists(os.path.join(saved, "tokenizer.json")):
      return tokenizer_lib.load_tokenizer(saved)
    texts = [chat_template.COT_INSTRUCTION] + [t for ex in train_examples
                                               for t in (ex["problem"], ex.get("cot", ""), ex["solution"])]
    tokenizer = tokenizer_lib.word_level_tokenizer(tokenizer_lib.word_level_vocabulary(texts),
                                                   config.model.vocab_size)
    tokenizer.save(saved)
    return tokenizer

  return process_zero_first(word_level, "build_tokenizer")


def lora_config(config) -> model_config_lib.LoraConfig:
  """lora.* as the model's LoraConfig; a run config written before lora.* existed (read back by export or evaluation)
  has no adapters."""
  lora = config.get("lora")
  if lora is None:
    return model_config_lib.LoraConfig()
  return model_config_lib.LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))


def model_config(config, tokenizer) -> model_config_lib.Qwen25VLConfig:
  runtime = dict(dtype=config.model.dtype, remat=config.model.remat, scan_layers=config.model.scan_layers,
                 lora=lora_config(config))
  if config.model.checkpoint:
    return model_config_lib.from_hf_json(config.model.checkpoint, **runtime)
  if config.model.preset in ("tiny", "small"):
    return model_config_lib.PRESETS[config.model.preset](vocab_size=len(tokenizer), **runtime)
  return model_config_lib.PRESETS[config.model.preset](**runtime)


def run_shape(config, vision: model_config_lib.VisionConfig) -> memory.RunShape:
  """The sizes of one RL step that its memory depends on, from the run config and the model's vision tower."""
  d, rl, tr = config.data, config.rl, config.train
  buckets = tuple(d.prompt_buckets)
  longest = memory.smallest_bucket(d.max_prompt_tokens, buckets) if d.max_prompt_tokens else max(buckets)
  image = image_config(config, vision)
  patches = memory.patches_for(d.max_pixels, image.patch_size, image.merge_size**2)
  return memory.RunShape(rows=tr.prompts_per_step * rl.group_size, prompt_len=longest,
                         max_new_tokens=rl.max_new_tokens, patches=memory.smallest_bucket(patches, d.patch_buckets),
                         micro_batches=tr.micro_batches, prefill_micro_batches=rl.prefill_micro_batches,
                         rollout_replicated=rl.rollout_weights == "replicated",
                         freeze_vision=config.optim.freeze_vision,
                         reference=bool(rl.beta), compute_dtype=config.model.compute_dtype,
                         group_size=rl.group_size, logits_chunk=train_step.LossConfig().chunk_size)


def check_memory(config, model_cfg: model_config_lib.Qwen25VLConfig, mesh_shape) -> memory.MemoryEstimate:
  """Prints the per-device memory estimate; raises MemoryBudgetError when it exceeds the device (unless
  train.memory_check=False, which only warns).

  train.micro_batches or rl.prefill_micro_batches 0 are set here to the fewest parts that fit
  (`memory.fewest_parts`), in `config` itself, which the run then uses.
  """
  limit, source = memory.device_memory_bytes(config.train.device_memory_gib)
  run = run_shape(config, model_cfg.vision)
  micro, prefill = memory.fewest_parts(model_cfg, run, mesh_shape, limit)
  chosen = {name: value for name, value, asked in (("train.micro_batches", micro, run.micro_batches),
                                                   ("rl.prefill_micro_batches", prefill, run.prefill_micro_batches))
            if not asked}
  config.train.micro_batches, config.rl.prefill_micro_batches = micro, prefill
  run = dataclasses.replace(run, micro_batches=micro, prefill_micro_batches=prefill)
  est = memory.estimate(model_cfg, run, mesh_shape)
  if jax.process_index() == 0:
    print(memory.format_table(est, limit, source, mesh_shape), flush=True)
    for name, value in chosen.items():
      print(f"{name}=0: the fewest parts that fit the estimate: {value}", flush=True)
  try:
    memory.check(est, limit, source, model_cfg, run, mesh_shape)
  except memory.MemoryBudgetError as e:
    if config.train.memory_check:
      raise
    print(f"WARNING (train.memory_check=False): {e}", flush=True)
  return est


def build_model(config, tokenizer, mesh) -> Qwen25VL:
  """A HF checkpoint (sharded straight onto the mesh) or a random initialisation, once the memory estimate
  says it fits (nothing is allocated before the check); with lora.rank > 0, new adapters of seed train.seed."""
  architecture = model_config(config, tokenizer)
  check_memory(config, architecture, dict(mesh.shape))
  if config.model.checkpoint:
    return load_hf(config.model.checkpoint, dtype=config.model.dtype, mesh=mesh, lora=architecture.lora,
                   seed=config.train.seed)
  return Qwen25VL(architecture, nnx.Rngs(config.train.seed))


def sampling_params(config, tokenizer, greedy: bool = False) -> sampler.SamplingParams:
  rl = config.rl
  eos = tuple(sorted({tokenizer.eos_id, tokenizer.special.endoftext}))
  return sampler.SamplingParams(max_new_tokens=rl.max_new_tokens, greedy=greedy, temperature=rl.temperature,
                                top_k=rl.top_k, top_p=rl.top_p, eos_ids=eos, pad_id=tokenizer.pad_id,
                                prefill_micro_batches=max(rl.prefill_micro_batches, 1), decode_kernel=rl.decode_kernel)


def image_config(config, vision: model_config_lib.VisionConfig) -> image_lib.ImageProcessorConfig:
  """The resize budget from data.*, and the patch geometry of the model's vision tower (a processor with another
  patch or merge size would hand the tower patches of the wrong size or token counts it cannot merge). Patches are
  uint8 levels, normalised by the model on the device."""
  return image_lib.ImageProcessorConfig(min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels,
                                        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                        merge_size=vision.spatial_merge_size, pixel_dtype="uint8")


def reward_functions(config) -> dict[str, rewards_lib.RewardFunction]:
  """The run's reward functions (rl.rewards under rl.reward_rules), name -> function, accuracy first."""
  rl = config.rl
  return rewards_lib.reward_functions(tuple(rl.rewards), rl.reward_rules, rl.semantic_model)


def rollout_config(config, tokenizer, vision: model_config_lib.VisionConfig) -> rollouts.RolloutConfig:
  rl = config.rl
  hyper = dict(r_value=rl.r_value, p_alpha=rl.p_alpha) if rl.advantage == "noisygrpo" else {}
  return rollouts.RolloutConfig(
      group_size=rl.group_size, noise_enabled=rl.noise.enabled, noise_levels=tuple(rl.noise.levels),
      noise_schedule=rl.noise.schedule, noise_quantize=rl.noise.quantize, noise_anneal=rl.noise.anneal,
      advantage=rl.advantage, advantage_hyper=hyper,
      reward_functions=reward_functions(config),
      mask_noise_correct=rl.mask_noise_correct, sampling=sampling_params(config, tokenizer),
      image=image_config(config, vision), prompt_buckets=tuple(config.data.prompt_buckets),
      patch_buckets=tuple(config.data.patch_buckets), max_prompt_tokens=config.data.max_prompt_tokens,
      truncate_prompts=config.data.truncate_prompts, filter_groups=rl.filter_groups)


def loss_config(config, kind: str = "grpo") -> train_step.LossConfig:
  rl = config.rl
  return train_step.LossConfig(kind=kind, beta=rl.beta, kl_estimator=rl.kl_estimator, eps_low=rl.eps_low,
                               eps_high=rl.eps_high, aggregation=rl.aggregation,
                               temperature=1.0,
                               compute_dtype=config.model.compute_dtype,
                               group_size=1 if kind == "sft" else rl.group_size)


def learning_rate_schedule(config, updates_per_step: int = 1):
  """optim.* as a function of the optimizer update count: warmup over optim.warmup_steps updates, then the decay
  over the run's train.steps x updates_per_step updates."""
  o = config.optim
  return optimizer_lib.learning_rate_schedule(o.learning_rate, config.train.steps * updates_per_step,
                                              o.warmup_steps, o.decay)


def train_setup(config, model: Qwen25VL, mesh, updates_per_step: int = 1
                ) -> tuple[train_step.TrainSetup, train_step.TrainState]:
  """The optimizer (optim.*) and the sharded train state of `model`'s parameters (`train_step.init_train_state`).

  updates_per_step: optimizer updates per training step (rl.num_iterations for RL), so the learning-rate schedule
  spans train.steps x updates_per_step updates.
  """
  o = config.optim
  optimizer = optimizer_lib.make_optimizer(learning_rate_schedule(config, updates_per_step),
                                           weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                                           max_grad_norm=o.max_grad_norm)
  return train_step.init_train_state(model, optimizer, mesh, compute_dtype=config.model.compute_dtype,
                                     freeze_vision=o.freeze_vision, adapters_only=lora_config(config).rank > 0)
