"""The RL loop (NoisyGRPO / GRPO family) and the SFT warm-start loop, resumable from their checkpoints.

Every step's randomness is `fold_in(seed key, step)` and the data order is a per-epoch permutation of the
seed, so a run restored from step k (params, optimizer state, data position) continues exactly as the
uninterrupted run would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from noisygrpo_jax import atomic_io, sharding
from noisygrpo_jax.data import records
from noisygrpo_jax.evaluation import evaluate
from noisygrpo_jax.processing import chat_template, collate, image as image_lib
from noisygrpo_jax.rl import logprobs as logprobs_lib
from noisygrpo_jax.training import batches, checkpointing, params as params_lib, rollouts, setup, train_step
from noisygrpo_jax.training import samples as samples_lib, throughput, vision_pretrain
from noisygrpo_jax.training.metrics import MetricsWriter


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def source_fingerprint(directory: str = PACKAGE_DIR) -> str:
  """sha256 (hex) of every .py file under `directory` (default: this package), names and contents in sorted
  order: the code that produced a cached result."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, directory).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


class DataOrder:
  """Example indices for a running data position: epoch e visits the examples in a seeded permutation."""

  def __init__(self, size: int, seed: int):
    if size == 0:
      raise ValueError("the training split is empty; build the dataset or point data.* at a non-empty one")
    self.size, self.seed = size, seed

  def take(self, position: int, count: int) -> list[int]:
    out = []
    for p in range(position, position + count):
      epoch, offset = divmod(p, self.size)
      out.append(int(np.random.default_rng([self.seed, epoch]).permutation(self.size)[offset]))
    return out


def place_batch(batch, shardings):
  """Puts a host batch (numpy leaves, the same on every process) onto the mesh, single- or multi-process.

  Each process fills only its addressable shards from its own copy; device arrays (e.g. reference log-probs
  already on the mesh) are resharded.
  """
  def put(x, s):
    if isinstance(x, jax.Array):
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(put, batch, shardings)


def count_skips(consecutive: int, skipped: bool, limit: int, step: int) -> int:
  """The count of consecutive skipped updates after this step's; raises FloatingPointError when it reaches
  `limit` (train.max_consecutive_skips)."""
  consecutive = consecutive + 1 if skipped else 0
  if consecutive >= limit:
    raise FloatingPointError(f"step {step}: {consecutive} consecutive updates had a non-finite loss or gradient "
                             f"(train.max_consecutive_skips={limit}); lower the learning rate, check the data, or "
                             "resume from the last checkpoint")
  return consecutive


def other_run_checkpoints(workdir: str) -> checkpointing.Checkpointer:
  """The checkpoints of the run in `workdir`, opened to read: synchronous, and leaving the temporary directories of
  a save in flight alone (that run may still be writing)."""
  return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, cleanup=False)


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=s),
                      state, shardings)


class Run:
  """What both loops share: workdir, mesh, data, tokenizer, model, sharded state, checkpoints, metrics."""

  def __init__(self, config, kind: str):
    setup.validate(config)
    self.config = config
    self.workdir = config.train.workdir
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = setup.make_mesh(config)
    self.train_examples = setup.load_split(config, "train")
    self.tokenizer = setup.build_tokenizer(config, self.train_examples)
    model = setup.build_model(config, self.tokenizer, self.mesh)  # sets micro-batch counts left 0 to the memory check's
    if kind != "eval":  # evaluating a run must not overwrite the configuration that trained it
      atomic_io.write_text_atomically(os.path.join(self.workdir, "config.json"), config.to_json_best_effort(indent=2))
    self.setup, self.state = setup.train_setup(config, model, self.mesh,
                                               updates_per_step=config.rl.num_iterations if kind == "rl" else 1)
    del model  # its frozen parameters live on in the state, in the compute dtype only
    initial_params = self.state.params
    self.checkpointer = checkpointing.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                                   keep=config.train.keep_checkpoints)
    self.step, self.data_position, self.consecutive_skips = 0, 0, 0
    self.init_from_step = None  # the train.init_from checkpoint step this run started from
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self._resume(latest)
    needs_reference = kind == "rl" and bool(config.rl.beta)
    # A resumed run's reference model is still the warm start it began from, not the random initialisation.
    if config.train.init_from and (latest is None or needs_reference):
      initial_params, frozen = self._params_from(config.train.init_from, self.init_from_step)
      if latest is None:
        self.state = self.state.replace(params=initial_params, frozen=frozen)
    # The reference model: a compute-dtype copy of the initial trainable parameters (the state is donated to each
    # update, so it must not share their buffers), and the state's frozen ones (training.params). With LoRA the
    # copy is of the initial adapters, whose zero lora_b makes the reference the base model itself.
    self.reference_params = (params_lib.copy_as(initial_params, config.model.compute_dtype) if needs_reference
                             else None)
    self._rollout_params = None  # the rollout copy of the current policy, made on first use after each update
    self._rollout_graphdef = None  # the graphdef of the rollout copy's model (decoder layers unstacked)
    self.writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0, resume_step=self.step)
    self.order = DataOrder(len(self.train_examples), config.train.seed)
    self.key = jax.random.key(config.train.seed)
    self._jitted_steps = {}
    self._jitted_reference_logps = None

  def _resume(self, step: int) -> None:
    """Restores state, data position, skip count and warm-start step from this run's checkpoint `step`."""
    fix = (f"use a new train.workdir, or rerun with the model configuration that wrote the checkpoints in "
           f"train.workdir={self.workdir!r}")
    self.state, meta = self.checkpointer.restore(step, _abstract(self.state, self.setup.state_shardings), fix=fix)
    self.step, self.data_position = int(meta["step"]), int(meta["data_position"])
    self.consecutive_skips = int(meta.get("consecutive_skips", 0))
    self.init_from_step = meta.get("init_from_step")
    if jax.process_index() == 0:
      tqdm.tqdm.write(f"resumed from step {self.step} of {self.checkpointer.directory}", file=sys.stderr)

  def _params_from(self, directory: str, step: int | None = None) -> tuple[dict, dict]:
    """(trainable, frozen) parameters of checkpoint `step` (default: the newest) of another run of ours (e.g. the
    SFT warm start), split as this run splits them."""
    source = other_run_checkpoints(directory)
    latest = source.latest_step()
    if latest is None:
      raise FileNotFoundError(f"train.init_from={directory!r} has no checkpoints/ with a complete step; run the "
                              "warm start first or fix the path")
    if step not in source.manager.all_steps():
      if step is not None:
        logging.warning("train.init_from=%r no longer holds step %d that this run started from; its reference "
                        "model is now step %d", directory, step, latest)
      step = latest
    self.init_from_step = step
    fix = (f"point train.init_from at a run of this model (same model.preset and tokenizer vocabulary), or "
           f"change the model configuration to the one {directory!r} was trained with")
    full = lambda tree: params_lib.combine(tree.params, tree.frozen)
    params = source.restore_params(step, _abstract(full(self.state), full(self.setup.state_shardings)), fix)
    source.close()
    return self.setup.split_params(params)

  def rollout_params(self) -> dict:
    """The parameters rollouts and evaluation run from (`model`): the policy's trainable parameters in the compute
    dtype (one copy per update, made here on first use) and the state's frozen ones, in the layout decoding reads
    (`params.decoding_copy`: the decoder layers one array per layer, so the decode loop copies no weight out of a
    stack) and in the rollout layout (rl.rollout_weights).

    "replicated": every device holds the whole copy, so with the rows split over the devices the decode loop needs
    no collective but its all-rows stop check (tests/sampling); "train": the training layout (FSDP: each layer's
    weights are all-gathered for every generated token). The frozen parameters the decode loop reads (all but the
    vision tower, which runs in the prefill only and is shared: with LoRA the base decoder, otherwise none) are
    copied with them (memory.rollout_copy_params counts what is copied), and dropped with them before the update.
    """
    if self._rollout_params is None:
      replicated = self.config.rl.rollout_weights == "replicated" and self.mesh.size > 1
      layout = NamedSharding(self.mesh, PartitionSpec()) if replicated else None
      self._rollout_params = params_lib.rollout_copy(self.state.params, self.state.frozen,
                                                     self.config.model.compute_dtype, layout)
    return self._rollout_params

  def place_prompts(self, prompts):
    """Rollout prompts on the mesh, rows split over its batch axes (each process fills its own shards)."""
    return place_batch(prompts, train_step.batch_shardings(prompts, self.mesh))

  def reference(self) -> dict:
    """The KL reference model's parameters: the initial trainable ones (compute dtype) and the shared frozen ones
    (with LoRA: the initial, zero-output adapters and the shared base weights)."""
    return params_lib.combine(self.reference_params, self.state.frozen)

  def reference_logps(self, batch: train_step.TokenBatch, batch_sh: train_step.TokenBatch) -> jax.Array:
    """The reference model's completion log-probs float32 [N, M] of a batch placed in `batch_sh`, rows split as its
    completion mask (the program is compiled on first use, with explicit shardings: train_step.jit_logps)."""
    if self._jitted_reference_logps is None:
      fn = train_step.logps_fn(self.setup.graphdef, train_step.LossConfig().chunk_size, self.config.rl.group_size,
                               self.config.train.micro_batches)
      sh = self.setup.state_shardings
      self._jitted_reference_logps = train_step.jit_logps(fn, params_lib.combine(sh.params, sh.frozen), batch_sh)
    return self._jitted_reference_logps(self.reference(), batch)

  def model(self):
    """The policy as rollouts see it (`rollout_params`), its decoder layers a `stacking.LayerList`."""
    if self._rollout_graphdef is None:
      self._rollout_graphdef = params_lib.rollout_graphdef(self.setup.graphdef,
                                                           params_lib.combine(self.state.params, self.state.frozen))
    return nnx.merge(self._rollout_graphdef, self.rollout_params())

  def set_params(self, params: dict) -> None:
    """Replaces the policy's parameters by a full tree (e.g. after vision pretraining), split as the run splits."""
    trainable, frozen = self.setup.split_params(params)
    self.state = self.state.replace(params=trainable, frozen=frozen)
    self._rollout_params = None

  def examples_at(self, position: int, count: int) -> list[dict]:
    """The `count` training examples from data position `position` on."""
    return [self.train_examples[i] for i in self.order.take(position, count)]

  def next_examples(self, count: int) -> list[dict]:
    examples = self.examples_at(self.data_position, count)
    self.data_position += count
    return examples

  def _step(self, loss_cfg: train_step.LossConfig, batch_sh: train_step.TokenBatch):
    """The jitted update for `loss_cfg` (compiled once per configuration)."""
    if loss_cfg not in self._jitted_steps:
      step_fn = train_step.make_train_step(self.setup.graphdef, self.setup.optimizer, loss_cfg,
                                           self.config.train.micro_batches)
      self._jitted_steps[loss_cfg] = train_step.jit_train_step(step_fn, self.setup.state_shardings, batch_sh,
                                                               self.mesh)
    return self._jitted_steps[loss_cfg]

  def update(self, batch: train_step.TokenBatch, loss_cfg: train_step.LossConfig, iterations: int = 1
             ) -> tuple[dict[str, float], jax.Array]:
    """Puts the batch on the mesh and runs `iterations` jitted policy updates.

    The first update's ratio is exactly 1 (old = its own log-probs); the log-probs it computed before updating are
    the old log-probs of the later ones (mu > 1).

    Returns (the last update's metrics, the first update's log-probs float32 [N, M]: the trainer's log-probs of the
    batch under the policy that sampled it).
    """
    batch_sh = train_step.batch_shardings(batch, self.mesh)
    batch = place_batch(batch, batch_sh)
    self._rollout_params = None  # not held through the update (memory.estimate counts it only in the rollouts)
    skipped = 0
    for i in range(iterations):
      cfg = dataclasses.replace(loss_cfg, use_old_logps=i > 0)
      self.state, metrics, logps = self._step(cfg, batch_sh)(self.state, batch)
      if i == 0:
        batch = batch.replace(old_logps=logps)
      skipped += int(metrics["skipped"])
    self.consecutive_skips = count_skips(self.consecutive_skips, skipped > 0,
                                         self.config.train.max_consecutive_skips, self.step + 1)
    return {**{k: float(v) for k, v in metrics.items()}, "skipped": float(skipped)}, batch.old_logps

  def save(self) -> None:
    self.checkpointer.save(self.step, self.state, {"step": self.step, "data_position": self.data_position,
                                                   "consecutive_skips": self.consecutive_skips,
                                                   "init_from_step": self.init_from_step})

  def eval_batching(self) -> dict:
    """`evaluate.answer`'s batching of this run: a step's rows per batch, the data buckets, and the batches' rows
    split over the mesh (`place_prompts`)."""
    return dict(batch_size=self.config.train.prompts_per_step * self.config.rl.group_size,
                prompt_buckets=tuple(self.config.data.prompt_buckets),
                patch_buckets=tuple(self.config.data.patch_buckets), place=self.place_prompts)

  def evaluate(self, splits) -> dict[str, float]:
    """Greedy metrics per split; the first split also reports `image_reliance` (does the model look?)."""
    return self.evaluate_with_samples(splits, count=0)[0]

  def evaluate_with_samples(self, splits, count: int) -> tuple[dict[str, float], list[dict]]:
    """`evaluate(splits)`, and the `samples_lib.records` of each split's first `count` examples and their greedy
    answers (those the metrics were computed from)."""
    results, samples = {}, []
    params = setup.sampling_params(self.config, self.tokenizer, greedy=True)
    model = self.model()
    image_cfg = setup.image_config(self.config, model.config.vision)
    batching = self.eval_batching()
    for split in splits:
      examples = setup.load_split(self.config, split)
      completions = evaluate.answer(model, self.tokenizer, examples, params, image_cfg, **batching)
      metrics = evaluate.split_metrics(model, self.tokenizer, examples, params, image_cfg, completions,
                                       check_images=split == splits[0], **batching)
      results.update({f"eval/{split}/{k}": v for k, v in metrics.items()})
      if count:
        samples += samples_lib.records(split, examples[:count], completions[:count], self.reward_functions)
    return results, samples

  @functools.cached_property
  def reward_functions(self) -> dict:
    """The run's reward functions (rl.rewards), which score the written samples as they score the rollouts."""
    return setup.reward_functions(self.config)

  def evaluate_start(self, splits) -> dict[str, float]:
    """`evaluate(splits)` of a fresh run's step-0 model.

    A run started from train.init_from evaluates that checkpoint, which every run from the same warm start
    shares, so the result is stored in <init_from>/evaluations/ under a hash of everything that can change it
    (checkpoint step, splits, data, model, tokenizer, completion budget, batch size, and this package's source)
    and reused.
    """
    c = self.config
    if not c.train.init_from:
      return self.evaluate(splits)
    settings = {"init_from_step": self.init_from_step, "splits": list(splits), "data": c.data.to_dict(),
                "model": c.model.to_dict(), "tokenizer": c.tokenizer.to_dict(), "max_new_tokens": c.rl.max_new_tokens,
                "batch_size": c.train.prompts_per_step * c.rl.group_size, "source": source_fingerprint()}
    text = json.dumps(settings, sort_keys=True, default=str)
    path = os.path.join(c.train.init_from, "evaluations",
                        f"step{self.init_from_step}_{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)["metrics"]
    results = self.evaluate(splits)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic_io.write_text_atomically(path, json.dumps({"settings": settings, "metrics": results}, indent=2))
    return results

  def finish_step(self, metrics: dict[str, float], end: int, bar: tqdm.tqdm, postfix: dict[str, str],
                  rollout: tuple[rollouts.PreparedPrompts, rollouts.Rollouts] | None = None) -> None:
    """Counts the step, then logs, evaluates and checkpoints on their schedules. An evaluation also writes
    train.eval_samples answers per split and, of an RL step, as many of its `rollout`s (training.samples)."""
    c = self.config.train
    self.step += 1
    if self.step % c.log_every == 0 or self.step == end:
      self.writer.write(self.step, metrics)
    if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.steps):
      evaluation, samples = self.evaluate_with_samples(c.eval_splits, c.eval_samples)
      if rollout is not None and c.eval_samples:
        samples += samples_lib.rollout_records(*rollout, self.reward_functions, c.eval_samples)
      self.writer.write(self.step, evaluation)
      samples_lib.write(self.writer, self.step, samples)
      metrics.update(evaluation)
    if self.step % c.checkpoint_every == 0 or self.step == end:
      self.save()
    bar.update(1)
    bar.set_postfix(postfix)

  def progress_bar(self, description: str) -> tqdm.tqdm:
    return tqdm.tqdm(total=self.config.train.steps, initial=self.step, desc=description,
                     disable=jax.process_index() != 0)

  def close(self, last: dict[str, float], bar: tqdm.tqdm) -> dict[str, float]:
    bar.close()
    self.checkpointer.wait()
    self.checkpointer.close()
    self.writer.close()
    if jax.process_index() == 0 and last:
      with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
        json.dump(last, f, indent=2)
    return last


class RolloutInputs:
  """Each step's rollout inputs (`rollouts.prepare_rollouts`: its examples, noise, image processing, prompts),
  made in a background thread while the device runs the step before, when `prefetch`; else in line. They depend on
  the step number and data position only, so both ways give the same inputs."""

  def __init__(self, run: Run, cfg: rollouts.RolloutConfig, model_config, prefetch: bool):
    self.run, self.cfg, self.model_config = run, cfg, model_config
    self.executor = concurrent.futures.ThreadPoolExecutor(1, "rollout-inputs") if prefetch else None
    self.pending: tuple[tuple[int, int], concurrent.futures.Future] | None = None

  def _prepare(self, step: int, position: int) -> rollouts.PreparedPrompts:
    c = self.run.config
    examples = self.run.examples_at(position, c.train.prompts_per_step)
    return rollouts.prepare_rollouts(self.run.tokenizer, self.cfg, self.model_config, examples,
                                     jax.random.fold_in(self.run.key, step), step, c.train.steps)

  def take(self, step: int, position: int) -> tuple[rollouts.PreparedPrompts, float]:
    """(step `step`'s inputs from data position `position`, the host seconds the caller waited for them)."""
    start = time.perf_counter()
    if self.pending is not None and self.pending[0] == (step, position):
      prepared = self.pending[1].result()
    else:
      prepared = self._prepare(step, position)
    self.pending = None
    return prepared, time.perf_counter() - start

  def prefetch(self, step: int, position: int) -> None:
    """Starts making step `step`'s inputs (no-op without prefetching)."""
    if self.executor is not None:
      self.pending = ((step, position), self.executor.submit(self._prepare, step, position))

  def close(self) -> None:
    if self.executor is not None:
      self.executor.shutdown(cancel_futures=True)


def logprob_drift(r: rollouts.Rollouts, trainer_logps: np.ndarray) -> dict[str, float]:
  """`drift/*` metrics: the sampler's against the trainer's log-probs float32 [N, M] of the rollouts that saw the
  clean image they are trained on (noise level 0: each group's first), over their completion tokens
  (rl.logprobs.logprob_drift). At numerical noise on a correct path; a jump means the sampler and the trainer
  see different inputs."""
  clean = r.levels == 0
  drift = logprobs_lib.logprob_drift(r.sampler_logps[clean], trainer_logps[clean],
                                     np.asarray(r.batch.completion_mask)[clean])
  return {f"drift/logp_{k}": float(v) for k, v in drift.items()}


def refill_groups(run: Run, cfg: rollouts.RolloutConfig, model_config, first: rollouts.Rollouts
                  ) -> rollouts.Rollouts:
  """rl.filter_groups="refill" (DAPO's dynamic sampling): while the step has fewer than train.prompts_per_step
  informative groups, another round of rollouts of the next train.prompts_per_step prompts (the data position moves
  on), at most rl.filter_max_rounds rounds in all; then the step's groups (`rollouts.select_groups`).

  Round k of step s draws its noise and samples from fold_in(fold_in(seed key, s), k) (round 0: the step's own key),
  so a resumed run refills as the uninterrupted one did. The prefetched inputs of the next step assumed one round and
  are made again when more were taken.
  """
  c = run.config
  count = c.train.prompts_per_step
  rounds = [first]
  while sum(int(r.informative.sum()) for r in rounds) < count and len(rounds) < c.rl.filter_max_rounds:
    key = jax.random.fold_in(jax.random.fold_in(run.key, run.step), len(rounds))
    prepared = rollouts.prepare_rollouts(run.tokenizer, cfg, model_config, run.next_examples(count), key, run.step,
                                         c.train.steps)
    rounds.append(rollouts.sample_rollouts(run.model(), run.tokenizer, cfg, prepared, place=run.place_prompts))
  return rollouts.select_groups(rounds, count, run.tokenizer.pad_id)


def run_rl(config, max_steps: int | None = None) -> dict[str, float]:
  """Trains until train.steps (or `max_steps` more steps); returns the last logged metrics."""
  run = Run(config, "rl")
  c = config
  model_config = run.model().config
  rollout_cfg = setup.rollout_config(c, run.tokenizer, model_config.vision)
  loss_cfg = setup.loss_config(c)
  end = c.train.steps if max_steps is None else min(c.train.steps, run.step + max_steps)
  last: dict[str, float] = {}
  if run.step == 0 and c.train.eval_every:
    run.writer.write(0, run.evaluate_start(c.train.eval_splits))
  bar = run.progress_bar(c.rl.advantage)
  peak_flops = throughput.peak_flops_per_device(c.train.peak_tflops)
  inputs = RolloutInputs(run, rollout_cfg, model_config, c.data.prefetch_rollouts)
  try:
    while run.step < end:
      start = time.perf_counter()
      prepared, waited = inputs.take(run.step, run.data_position)
      run.data_position += c.train.prompts_per_step
      if run.step + 1 < end:
        inputs.prefetch(run.step + 1, run.data_position)
      r = rollouts.sample_rollouts(run.model(), run.tokenizer, rollout_cfg, prepared, host_seconds=waited,
                                   place=run.place_prompts)
      sampled = (prepared, r)  # the step's own prompts' rollouts, some of which an evaluation step writes
      if c.rl.filter_groups == "refill":
        r = refill_groups(run, rollout_cfg, model_config, r)
      t0 = time.perf_counter()
      batch_sh = train_step.batch_shardings(r.batch, run.mesh)
      batch = place_batch(r.batch, batch_sh)  # once, for both passes
      if run.reference_params is not None:
        batch = batch.replace(ref_logps=jax.block_until_ready(run.reference_logps(batch, batch_sh)))
      t1 = time.perf_counter()
      train_metrics, trainer_logps = run.update(batch, loss_cfg, c.rl.num_iterations)
      t2 = time.perf_counter()
      shapes = dict(rows=batch.input_ids.shape[0], prompt_len=batch.input_ids.shape[1] - batch.completion_len,
                    decode_steps=int(r.metrics["decode/steps"]),
                    patches=0 if batch.vision is None else batch.vision.pixel_values.shape[1],
                    group_size=c.rl.group_size, train_vision=not c.optim.freeze_vision,
                    reference=run.reference_params is not None, frozen_decoder=run.setup.adapters_only)
      last = {**r.metrics, **{f"train/{k}": v for k, v in train_metrics.items()},
              "time/reference": t1 - t0, "time/train": t2 - t1, "time/step": t2 - start,
              "time/host_work": prepared.seconds,  # made in the background with data.prefetch_rollouts
              **throughput.step_metrics(model_config, **shapes,
                                        tokens=r.metrics["tokens/prompt"] + r.metrics["tokens/completion"],
                                        seconds=t2 - start, devices=jax.device_count(), peak_flops=peak_flops),
              **logprob_drift(r, sharding.host_array(trainer_logps)),
              "data/position": run.data_position}
      postfix = dict(reward=f"{last['reward/semantic']:.3f}", clean_acc=f"{last['reward/clean_accuracy']:.2f}",
                     K=f"{last.get('advantage/kalman_gain', float('nan')):.2f}",
                     tok_s_dev=f"{last['throughput/tokens_per_s_per_device']:.0f}")
      if math.isfinite(last["throughput/mfu"]):  # known where the device's peak is (not on CPU)
        postfix["mfu"] = f"{last['throughput/mfu']:.1%}"
      run.finish_step(last, end, bar, postfix, rollout=sampled)
  finally:
    inputs.close()
  return run.close(last, bar)


def sft_batch(config, tokenizer, examples, model_config) -> train_step.TokenBatch:
  """Teacher-forced batch: the RL prompt, and the example's reference chain of thought as the target."""
  image_cfg = setup.image_config(config, model_config.vision)
  sources = [f"example {ex.get('id', i)}" for i, ex in enumerate(examples)]
  images = [image_lib.process_images(records.example_images(ex), image_cfg, source)
            for ex, source in zip(examples, sources)]
  messages = [chat_template.vqa_messages(chat_template.cot_question(ex["problem"]), len(im.image_grid_thw),
                                         answer=ex["cot"], source=source)
              for ex, im, source in zip(examples, images, sources)]
  chats = [chat_template.encode_chat(tokenizer, m, im.image_grid_thw, source=source)
           for m, im, source in zip(messages, images, sources)]
  prompt_chats, tokens, mask = collate.split_targets(chats, pad_id=tokenizer.pad_id,
                                                     completion_buckets=(config.rl.max_new_tokens,))
  prompts = collate.collate_prompts(prompt_chats, images, model_config, pad_id=tokenizer.pad_id,
                                    prompt_buckets=tuple(config.data.prompt_buckets),
                                    patch_buckets=tuple(config.data.patch_buckets))
  return batches.token_batch(prompts, tokens, mask)


def check_vision_pretrain(config) -> None:
  """Raises ValueError when the SFT config asks for vision pretraining on data without scene labels."""
  if config.vision_pretrain.steps and config.data.name != "shapes_vqa":
    raise ValueError(f"vision_pretrain.steps={config.vision_pretrain.steps} needs data.name='shapes_vqa' (its labels "
                     f"come from the scene descriptions), not {config.data.name!r}; set "
                     "--config.vision_pretrain.steps=0 (a pretrained checkpoint has its own vision tower)")


def pretrain_vision(run: Run) -> None:
  """The dense vision stage (training.vision_pretrain) of a fresh SFT run, logged and checkpointed as step 0."""
  c = run.config
  model = nnx.merge(run.setup.graphdef, params_lib.combine(run.state.params, run.state.frozen))  # the state's layout
  cfg = vision_pretrain.VisionPretrainConfig(**c.vision_pretrain.to_dict(), seed=c.train.seed)
  results = vision_pretrain.pretrain_vision(model, run.train_examples, setup.load_split(c, "test"),
                                            setup.image_config(c, model.config.vision), cfg,
                                            patch_buckets=tuple(c.data.patch_buckets))
  run.set_params(nnx.to_pure_dict(nnx.state(model)))
  run.writer.write(0, {f"vision_pretrain/{k}": v for k, v in results.items()})
  run.save()


def run_sft(config, max_steps: int | None = None) -> dict[str, float]:
  """Teacher-forced cross-entropy on the reference chains of thought (the RL warm start)."""
  check_vision_pretrain(config)
  run = Run(config, "sft")
  c = config
  if c.vision_pretrain.steps and run.checkpointer.latest_step() is None and not c.train.init_from:
    pretrain_vision(run)
  loss_cfg = setup.loss_config(c, kind="sft")
  end = c.train.steps if max_steps is None else min(c.train.steps, run.step + max_steps)
  last: dict[str, float] = {}
  bar = run.progress_bar("sft")
  model_config = run.model().config
  while run.step < end:
    examples = run.next_examples(c.train.prompts_per_step)
    t0 = time.perf_counter()
    metrics, _ = run.update(sft_batch(c, run.tokenizer, examples, model_config), loss_cfg)
    last = {f"train/{k}": v for k, v in metrics.items()}
    last["time/train"] = time.perf_counter() - t0
    run.finish_step(last, end, bar, dict(loss=f"{last['train/loss']:.3f}"))
  return run.close(last, bar)
