"""One RL step's rollouts on the host: noisy copies -> processing -> sampler -> rewards -> advantages.

Generation sees each rollout's noisy image; the returned TokenBatch carries every rollout's group-clean
image (the group's first, level-0 copy), on which log-probs are computed (spec section 1.5).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from noisygrpo_jax import sharding
from noisygrpo_jax.data import records
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL
from noisygrpo_jax.processing import chat_template, collate, image as image_lib
from noisygrpo_jax.processing.errors import PromptTooLongError
from noisygrpo_jax.processing.tokenizer import Tokenizer
from noisygrpo_jax.rl import advantages as advantages_lib
from noisygrpo_jax.rl import noise as noise_lib
from noisygrpo_jax.rl import objective, rewards as rewards_lib
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import batches
from noisygrpo_jax.training.train_step import TokenBatch


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static settings of rollout generation and scoring (unpacked from the config at the edge)."""

  group_size: int
  noise_enabled: bool
  noise_levels: tuple[float, ...]
  noise_schedule: str
  noise_quantize: str
  noise_anneal: str
  advantage: str
  advantage_hyper: dict
  reward_functions: Mapping[str, rewards_lib.RewardFunction]  # name -> function (rewards.reward_functions)
  mask_noise_correct: bool
  sampling: sampler.SamplingParams
  image: image_lib.ImageProcessorConfig
  prompt_buckets: tuple[int, ...]
  patch_buckets: tuple[int, ...]
  max_prompt_tokens: int  # 0: the largest prompt bucket is the only limit
  truncate_prompts: bool = False  # cut over-long questions to fit (counted) instead of raising
  filter_groups: str = "none"  # rl.filter_groups: none | drop | refill (both leave equal-reward groups out)


@dataclasses.dataclass
class Rollouts:
  batch: TokenBatch  # rows grouped by prompt, clean (level 0) rollout first; clean images
  metrics: dict[str, float]
  completions: list[str]
  sampler_logps: np.ndarray  # float32 [N, M]: the sampler's log-probs of its tokens (temperature 1, untruncated)
  levels: np.ndarray  # float32 [N]: each rollout's noise level (0: it saw the clean image it is trained on)
  informative: np.ndarray  # bool [N / G]: groups whose semantic rewards are not all equal


def noise_levels(cfg: RolloutConfig, key, num_prompts: int, step: int, total_steps: int) -> np.ndarray:
  """float32 [P, G] per-rollout noise levels (zeros when noise is off)."""
  if not cfg.noise_enabled:
    return np.zeros((num_prompts, cfg.group_size), np.float32)
  keys = jax.random.split(key, num_prompts)
  return np.stack([np.asarray(noise_lib.schedule_levels(k, step, total_steps, kind=cfg.noise_schedule,
                                                        levels=cfg.noise_levels, group_size=cfg.group_size,
                                                        anneal=cfg.noise_anneal)) for k in keys])


def rollout_images(cfg: RolloutConfig, key, examples: Sequence[dict], levels: np.ndarray
                   ) -> list[list[list[np.ndarray]]]:
  """Per example, per rollout g, the example's images (uint8 [H, W, 3] each) at noise level levels[p, g], each image
  with its own noise (`noise_lib.noisy_copies_of_images`). Noise is applied at native resolution, before the
  processor's resize (spec section 1.1)."""
  images = [[np.asarray(im) for im in records.example_images(ex)] for ex in examples]
  if not cfg.noise_enabled:
    return [[ims] * cfg.group_size for ims in images]
  keys = jax.random.split(key, len(examples))
  noisy = [noise_lib.noisy_copies_of_images(k, ims, lv, quantize=cfg.noise_quantize)
           for k, ims, lv in zip(keys, images, levels)]
  return [[list(rollout) for rollout in zip(*map(np.asarray, copies))] for copies in noisy]


def prompt_budget(cfg: RolloutConfig) -> int | None:
  """Prompt length limit in tokens: data.max_prompt_tokens, capped by the largest prompt bucket."""
  limits = [n for n in (cfg.max_prompt_tokens, max(cfg.prompt_buckets, default=0)) if n > 0]
  return min(limits) if limits else None


def encode_prompts(tokenizer: Tokenizer, cfg: RolloutConfig, examples: Sequence[dict],
                   grids: Sequence[np.ndarray]) -> list[chat_template.EncodedChat]:
  """The examples' RL prompts within `prompt_budget`; an over-long one raises naming the example and the config
  fields that fix it, or is truncated (counted in `num_truncated`) with cfg.truncate_prompts."""
  budget = prompt_budget(cfg)
  try:
    return chat_template.encode_vqa_prompts(tokenizer, examples, grids, budget, truncate=cfg.truncate_prompts)
  except PromptTooLongError as e:
    fix = ("Raise data.max_prompt_tokens (and data.prompt_buckets, whose largest bucket also caps prompts), "
           "lower data.max_pixels so the images yield fewer tokens")
    fix += "" if cfg.truncate_prompts else ", or set data.truncate_prompts=True to cut over-long questions to fit"
    raise PromptTooLongError(e.source, e.problem, fix) from e


def collate_rollout_prompts(cfg: RolloutConfig, model_config, pad_id: int, rows, sources) -> collate.PromptBatch:
  """(chat, images) rows -> PromptBatch; a row's images over the largest patch bucket name its example and the fix."""
  try:
    return collate.collate_prompts([c for c, _ in rows], [im for _, im in rows], model_config, pad_id=pad_id,
                                   prompt_buckets=cfg.prompt_buckets, patch_buckets=cfg.patch_buckets,
                                   sources=sources)
  except PromptTooLongError as e:
    raise PromptTooLongError(e.source, e.problem, "Add a larger bucket to data.patch_buckets (or "
                             "data.prompt_buckets), or lower data.max_pixels so images yield fewer patches") from e


@dataclasses.dataclass
class PreparedPrompts:
  """One step's rollout inputs, made on the host from its examples alone (no model state): they can be made while
  the device runs the previous step (`prepare_rollouts` in a background thread)."""

  examples: Sequence[dict]
  levels: np.ndarray  # float32 [P, G] noise levels
  chats: list[chat_template.EncodedChat]  # one per example
  prompts: collate.PromptBatch  # P * G rows: each rollout's noisy image
  sample_key: jax.Array
  seconds: float  # host seconds spent making them


def prepare_rollouts(tokenizer: Tokenizer, cfg: RolloutConfig, model_config, examples: Sequence[dict], key,
                     step: int, total_steps: int) -> PreparedPrompts:
  """Noise levels, noisy images (at native resolution), processing, prompts and collation of one step's rollouts."""
  start = time.perf_counter()
  p, g = len(examples), cfg.group_size
  level_key, noise_key, sample_key = jax.random.split(key, 3)
  levels = noise_levels(cfg, level_key, p, step, total_steps)
  images = rollout_images(cfg, noise_key, examples, levels)
  sources = [f"example {ex.get('id', i)}" for i, ex in enumerate(examples)]
  processed = [[image_lib.process_images(ims, cfg.image, source) for ims in group]
               for group, source in zip(images, sources)]
  chats = encode_prompts(tokenizer, cfg, examples, [group[0].image_grid_thw for group in processed])
  rows = [(chat, im) for chat, group in zip(chats, processed) for im in group]
  prompts = collate_rollout_prompts(cfg, model_config, tokenizer.pad_id, rows, [s for s in sources for _ in range(g)])
  return PreparedPrompts(examples, levels, chats, prompts, sample_key, time.perf_counter() - start)


def generate_rollouts(model: Qwen25VL, tokenizer: Tokenizer, cfg: RolloutConfig, examples: Sequence[dict], key,
                      step: int, total_steps: int) -> Rollouts:
  """Samples G rollouts per example, scores them and computes advantages (`prepare_rollouts`, then
  `sample_rollouts`)."""
  prepared = prepare_rollouts(tokenizer, cfg, model.config, examples, key, step, total_steps)
  return sample_rollouts(model, tokenizer, cfg, prepared)


def sample_rollouts(model: Qwen25VL, tokenizer: Tokenizer, cfg: RolloutConfig, prepared: PreparedPrompts,
                    host_seconds: float | None = None,
                    place: Callable[[collate.PromptBatch], collate.PromptBatch] | None = None) -> Rollouts:
  """Generates from prepared prompts, scores the completions and computes advantages.

  Returns a TokenBatch of P * G rows (advantages and trajectory mask filled; old/ref log-probs zero) and the step's
  rollout metrics. host_seconds: the preparation's seconds the step waited for (`time/host`; default: all of them,
  as when it was made in line). place: puts the prompts on the devices the sampler runs on (e.g. rows split over
  the mesh's batch axes, which the sampler's programs then keep: `sampler.generate`; default: as they are).

  Every process reads all rows (tokens and masks are gathered from the processes that hold them) and scores them
  alike, so the host's rewards, advantages and batch are the same on each.
  """
  examples, levels, chats, prompts = prepared.examples, prepared.levels, prepared.chats, prepared.prompts
  p, g = len(examples), cfg.group_size
  t0 = time.perf_counter()
  timings = {}
  out = sampler.generate(model, place(prompts) if place else prompts, prepared.sample_key, cfg.sampling, timings)
  tokens, mask, sampler_logps = map(sharding.host_array, (out.tokens, out.mask, out.logprobs))
  t1 = time.perf_counter()

  completions = tokenizer.decode_batch([t[m > 0] for t, m in zip(tokens, mask)], skip_special_tokens=True)
  solutions = [ex["solution"] for ex in examples for _ in range(g)]
  questions = [ex["problem"] for ex in examples for _ in range(g)]
  per_fn, semantic, failures = rewards_lib.combine_rewards(completions, solutions, questions, cfg.reward_functions)
  semantic = semantic.reshape(p, g)
  accuracy = per_fn[:, 0].reshape(p, g)  # the first reward function is the accuracy
  adv, diag = advantages_lib.compute_advantages(cfg.advantage, semantic, levels, **cfg.advantage_hyper)
  trajectory = (objective.mask_noise_correct(accuracy, levels) if cfg.mask_noise_correct
                else np.ones((p, g), np.float32))
  informative = np.asarray(advantages_lib.informative_groups(semantic))
  if cfg.filter_groups != "none":  # equal-reward groups leave the update
    trajectory = trajectory * informative[:, None]
  t2 = time.perf_counter()

  # Every rollout is scored on its group's clean image: row 0 of each group.
  clean_rows = np.repeat(np.arange(p) * g, g)
  clean_prompts = prompts.replace(vision=jax.tree.map(lambda x: x[clean_rows], prompts.vision))
  batch = batches.token_batch(clean_prompts, tokens, mask, advantages=np.asarray(adv).reshape(-1),
                              trajectory_mask=np.asarray(trajectory).reshape(-1))
  generated = int(mask.sum())
  metrics = {
      "reward/semantic": float(semantic.mean()),
      "reward/accuracy": float(accuracy.mean()),
      "reward/clean_accuracy": float(accuracy[:, 0].mean()),
      "reward/format": float(per_fn[:, 1].mean()) if per_fn.shape[1] > 1 else float("nan"),
      "reward/group_std": float(np.std(semantic, axis=1, ddof=1).mean()) if g > 1 else 0.0,
      "reward/failures": float(sum(failures.values())),
      **{f"reward/failures/{name}": float(count) for name, count in failures.items()},
      "prompt/truncated": float(sum(c.num_truncated > 0 for c in chats)),
      "advantage/abs_mean": float(np.abs(np.asarray(adv)).mean()),
      "completion/length": float(mask.sum(1).mean()),
      "completion/truncated": float((mask[:, -1] > 0).mean()),
      "rollout/kept_fraction": float(np.asarray(trajectory).mean()),
      "filter/uninformative_fraction": float(1.0 - informative.mean()),
      "time/host": prepared.seconds if host_seconds is None else host_seconds,  # noise, processing, collation
      "time/generate": t1 - t0,  # prefill + decode
      "time/prefill": timings["prefill"],
      "time/decode": timings["decode"],
      "time/reward": t2 - t1,
      "throughput/generated_tokens_per_s": generated / max(t1 - t0, 1e-9),
      "tokens/prompt": float(np.asarray(prompts.attention_mask).sum()),
      "tokens/completion": float(generated),
      "decode/steps": float(mask.sum(1).max()),
  }
  for name in ("kalman_gain", "sigma"):
    if name in diag:
      metrics[f"advantage/{name}"] = float(np.asarray(diag[name]).mean())
  return Rollouts(batch=batch, metrics=metrics, completions=completions, sampler_logps=sampler_logps,
                  levels=np.asarray(levels, np.float32).reshape(-1), informative=informative)


def select_groups(rounds: Sequence[Rollouts], count: int, pad_id: int) -> Rollouts:
  """One step's `count` groups from several rollout rounds (rl.filter_groups="refill"): the informative ones in the
  order they were sampled, then, when the rounds hold fewer, the first uninformative ones (whose trajectory mask
  already leaves them out of the loss). The batch is assembled on the host (`batches.concatenate`).

  Metrics: the first round's reward, prompt and completion statistics (the step's own prompts, comparable with runs
  without refill); times, token counts and decode steps summed over the rounds; the kept fraction and advantages of
  the selected groups; `filter/rounds` and `filter/informative_fraction` (of the selected groups).
  """
  g = len(rounds[0].levels) // len(rounds[0].informative)
  informative = np.concatenate([r.informative for r in rounds])
  chosen = np.sort(np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])[:count])
  parts, completions, logps, levels = [], [], [], []
  start = 0
  for r in rounds:
    groups = chosen[(chosen >= start) & (chosen < start + len(r.informative))] - start
    start += len(r.informative)
    if len(groups):
      rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
      parts.append(batches.take_rows(r.batch, rows))
      completions += [r.completions[i] for i in rows]
      logps.append(r.sampler_logps[rows])
      levels.append(r.levels[rows])
  batch = batches.concatenate(parts, pad_id)
  metrics = dict(rounds[0].metrics)
  for key in metrics:
    if key.startswith(("time/", "tokens/")) or key == "decode/steps":
      metrics[key] = sum(r.metrics[key] for r in rounds)
  metrics["throughput/generated_tokens_per_s"] = metrics["tokens/completion"] / max(metrics["time/generate"], 1e-9)
  metrics.update({"rollout/kept_fraction": float(np.mean(batch.trajectory_mask)),
                  "advantage/abs_mean": float(np.abs(batch.advantages).mean()),
                  "filter/rounds": float(len(rounds)),
                  "filter/informative_fraction": float(informative[chosen].mean())})
  return Rollouts(batch=batch, metrics=metrics, completions=completions, sampler_logps=np.concatenate(logps),
                  levels=np.concatenate(levels), informative=informative[chosen])
