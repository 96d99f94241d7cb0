"""End-to-end RL step on CPU: ours (noisygrpo_jax.training) vs TRL's GRPOTrainer (PyTorch), the same work.

Both sides start from the same weights: a random Qwen2.5-VL initialised with our code, exported with
`checkpoint.save_hf` to a temporary directory and loaded by transformers' Qwen2_5_VLForConditionalGeneration for
TRL. Both see the same prompts and images (shapes_vqa examples from `data/scenes.py`), tokenised by the same
word-level tokenizer: ours directly, TRL through a transformers Qwen2_5_VLProcessor built from it
(`Tokenizer.to_hf()` + Qwen2VLImageProcessorPil with the same min/max pixels + the released Qwen2.5-VL chat
template); the benchmark checks that the prompt ids and pixel values both sides build are identical.

One RL step, both sides: P prompts x G = 4 rollouts sampled (temperature 1, top-k 50) for exactly M new tokens
each (ours: SamplingParams.eos_ids=() so no row stops; TRL: generation_kwargs min_new_tokens = M, which masks its
EOS ids to -inf until M tokens, and max_completion_length = M), the same python reward on the decoded completions
(`overlap_reward`, both decoding with our tokenizer), group z-score advantages, reference-model log-probs
(beta = 0.04, k3 KL), one policy update (GRPO clipped loss, sequence-mean-token-mean aggregation = TRL's
loss_type="grpo", AdamW lr 1e-5 constant, betas (0.9, 0.999), eps 1e-8, no weight decay, global-norm clipping
1.0, vision tower frozen on both sides unless --train-vision). Neither side computes old log-probs (one update
per batch: TRL skips them when generation and optimisation are aligned, ours uses stop_gradient(current)).

Ours is a lean copy of `loops.run_rl`'s step that calls the same library functions: `rollouts.generate_rollouts`
(image processing, chat encoding, collation, `sampler.generate`, decoding, reward, advantages), the jitted
`train_step.logps_fn` on the frozen reference parameters, and `train_step.make_train_step` under
`jit_train_step` (the state donated), built by `setup.train_setup` from configs/grpo.py:tiny with the
overrides above. TRL runs `GRPOTrainer.train()` (use_cpu, no vLLM, no gradient checkpointing,
per_device_train_batch_size = P*G, gradient_accumulation_steps = steps_per_generation = 1: one generation and
one optimizer step per RL step). The two alternate step by step in one process (ours runs inside a TRL
on_step_end callback), so load from other processes falls on both alike. Prompts are chosen with equal token
length, so neither side pads them (ours' prompt bucket = that length; TRL pads to the batch maximum).

  python experiments/bench/bench_e2e.py [--cases tiny,3b_slice] [--warmup 2] [--repeats 5] [--quick]
                                        [--markdown BENCHMARKS.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Stopwatch, command_line, load_average, machine, peak_rss_gb, slice_3b,  # noqa: E402
                    stats, summary_row, write_json, write_markdown)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg  # noqa: E402
from noisygrpo_jax.training import params as params_lib  # noqa: E402
from tests.models import hf_reference  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_e2e:begin -->", "<!-- bench_e2e:end -->"
LEARNING_RATE, BETA, MAX_GRAD_NORM, TOP_K = 1e-5, 0.04, 1.0, 50
IMAGE_SIZE, MIN_PIXELS, MAX_PIXELS = 112, 56 * 56, 112 * 112  # configs/noisygrpo.py:tiny's processor budget
TARGETS = {"tiny": 3.0, "3b_slice": 1.5}  # seconds per RL step, TRL / ours, from the issue


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark shape: model, vocabulary, prompts per step, group size, new tokens per rollout."""

  model: str  # "small" (the configs' tiny preset's model) or "3b_slice"
  vocab_size: int
  prompts: int
  group: int
  new_tokens: int


CASES = {
    "tiny": Case("small", 512, prompts=8, group=4, new_tokens=64),
    "3b_slice": Case("3b_slice", 8192, prompts=2, group=4, new_tokens=32),
}

# ------------------------------------------------------------------------------------------------
# Shared inputs: examples, tokenizer, model, reward


def overlap_reward(completion: str, solution: str, question: str = "") -> float:
  """The fraction of the solution's lower-cased words that occur in the completion (float in [0, 1])."""
  del question
  words = lambda text: set(re.findall(r"\w+", text.lower()))
  want = words(solution)
  return len(want & words(completion)) / max(len(want), 1)


def build_tokenizer(examples: list[dict], vocab_size: int):
  """The word-level tokenizer `setup.build_tokenizer` would build from these examples' texts."""
  from noisygrpo_jax.processing import chat_template, tokenizer as tokenizer_lib
  texts = [chat_template.COT_INSTRUCTION] + [t for ex in examples for t in (ex["problem"], ex["cot"], ex["solution"])]
  return tokenizer_lib.word_level_tokenizer(tokenizer_lib.word_level_vocabulary(texts), vocab_size)


def image_config():
  from noisygrpo_jax.processing import image as image_lib
  return image_lib.ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def equal_length_examples(count: int, vocab_size: int, seed: int = 42):
  """`count` shapes_vqa training examples whose RL prompts all have the same token length, and the tokenizer.

  The word-level tokenizer is built from a pool of max(400, 8 * count) examples (as `setup.build_tokenizer`
  builds it from the training split); the chosen examples are the pool's first `count` with the most common
  prompt length L. Returns (examples, tokenizer, L).
  """
  from noisygrpo_jax.data import scenes
  from noisygrpo_jax.processing import chat_template, image as image_lib
  pool = scenes.generate_examples("train", max(400, 8 * count), seed=seed, image_size=IMAGE_SIZE)
  tokenizer = build_tokenizer(pool, vocab_size)
  grid = image_lib.process_image(pool[0]["image"], image_config()).image_grid_thw
  lengths = np.asarray([len(c) for c in chat_template.encode_vqa_prompts(tokenizer, pool, [grid] * len(pool))])
  values, counts = np.unique(lengths, return_counts=True)
  length = int(values[np.argmax(counts)])
  chosen = [ex for ex, n in zip(pool, lengths) if n == length]
  if len(chosen) < count:
    raise RuntimeError(f"only {len(chosen)} of {len(pool)} examples have the modal prompt length {length}; "
                       f"ask for fewer than {count} steps x prompts")
  return chosen[:count], tokenizer, length


def model_config(case: Case, tokenizer) -> cfg.Qwen25VLConfig:
  """The case's architecture with the special token ids where the word-level tokenizer puts them."""
  if case.model == "small":
    return cfg.small(vocab_size=len(tokenizer))
  s = tokenizer.special
  return slice_3b(len(tokenizer)).replace(image_token_id=s.image_pad, video_token_id=s.video_pad,
                                          vision_start_token_id=s.vision_start, vision_end_token_id=s.vision_end)


# ------------------------------------------------------------------------------------------------
# Ours


def ours_config(case: Case, prompt_len: int, steps: int, train_vision: bool):
  """configs/grpo.py:tiny with the benchmark's shared settings."""
  sys.path.insert(0, str(REPO / "configs"))
  import grpo
  c = grpo.get_config("tiny")
  with c.unlocked():
    c.rl.group_size, c.rl.max_new_tokens, c.rl.beta, c.rl.top_k = case.group, case.new_tokens, BETA, TOP_K
    c.rl.temperature, c.rl.top_p, c.rl.kl_estimator = 1.0, 1.0, "k3"
    c.rl.aggregation, c.rl.num_iterations = "sequence_mean_token_mean", 1
    c.optim.learning_rate, c.optim.decay, c.optim.warmup_steps = LEARNING_RATE, "constant", 0
    c.optim.weight_decay, c.optim.max_grad_norm, c.optim.freeze_vision = 0.0, MAX_GRAD_NORM, not train_vision
    c.train.prompts_per_step, c.train.steps, c.train.micro_batches = case.prompts, steps, 1
    c.data.min_pixels, c.data.max_pixels = MIN_PIXELS, MAX_PIXELS
    c.data.prompt_buckets, c.data.patch_buckets = (prompt_len,), (64,)
  return c


class OursRL:
  """One RL step of ours: rollouts (generation, reward, advantages), reference log-probs, the jitted update.

  `step(examples, index)` returns the wall seconds of each phase and the generated token count.
  """

  def __init__(self, config, model: Qwen25VL, tokenizer):
    from noisygrpo_jax.training import setup, train_step
    self.config, self.tokenizer = config, tokenizer
    self.mesh = setup.make_mesh(config)
    self.setup, self.state = setup.train_setup(config, model, self.mesh)
    rollout = setup.rollout_config(config, tokenizer, model.config.vision)
    # No EOS: every row samples exactly max_new_tokens; the python reward replaces the config's named ones.
    self.rollout_cfg = dataclasses.replace(rollout, sampling=dataclasses.replace(rollout.sampling, eos_ids=()),
                                           reward_functions={"overlap": overlap_reward})
    self.loss_cfg = setup.loss_config(config)
    self.logps = jax.jit(train_step.logps_fn(self.setup.graphdef, train_step.LossConfig().chunk_size,
                                             self.loss_cfg.group_size))
    # The reference: a copy of the initial trainable parameters (the state is donated to every update) and the
    # state's frozen ones.
    self.reference = params_lib.combine(params_lib.copy_as(self.state.params, config.model.compute_dtype),
                                        self.state.frozen)
    self.jitted_step = None
    self.key = jax.random.key(config.train.seed)

  def update(self, batch):
    """Run.update's body: shard the batch, run the jitted step, fetch the metrics to the host."""
    from noisygrpo_jax.training import train_step
    batch_sh = train_step.batch_shardings(batch, self.mesh)
    if self.jitted_step is None:
      fn = train_step.make_train_step(self.setup.graphdef, self.setup.optimizer, self.loss_cfg)
      self.jitted_step = train_step.jit_train_step(fn, self.setup.state_shardings, batch_sh, self.mesh)
    self.state, metrics, _ = self.jitted_step(self.state, jax.device_put(batch, batch_sh))
    return {k: float(v) for k, v in metrics.items()}

  def step(self, examples: list[dict], index: int) -> dict:
    from noisygrpo_jax.training import rollouts
    watch = Stopwatch()
    model = nnx.merge(self.setup.graphdef, params_lib.combine(
        params_lib.cast(self.state.params, self.config.model.compute_dtype), self.state.frozen))
    r = rollouts.generate_rollouts(model, self.tokenizer, self.rollout_cfg, examples,
                                   jax.random.fold_in(self.key, index), index, self.config.train.steps)
    rollout_s, _ = watch.lap()
    batch = r.batch.replace(ref_logps=jax.block_until_ready(self.logps(self.reference, r.batch)))
    ref_s, _ = watch.lap()
    metrics = self.update(batch)
    update_s, _ = watch.lap()
    generation, reward = r.metrics["time/generate"], r.metrics["time/reward"]
    return {"generation": generation, "reward + advantages": reward,
            "rollout assembly (images, batch)": rollout_s - generation - reward, "reference log-probs": ref_s,
            "update (forward, backward, AdamW)": update_s, "tokens": int(np.asarray(r.batch.completion_mask).sum()),
            "loss": metrics["loss"]}


# ------------------------------------------------------------------------------------------------
# TRL


def hf_processor(tokenizer):
  """A transformers Qwen2_5_VLProcessor over our tokenizer, HF's PIL image processor and the released template.

  transformers without torchvision cannot resolve the video processor's class, so the processor is built without
  one (only images are used).
  """
  from transformers import Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
      if argument_name == "video_processor" and argument is None:
        return None
      return super().check_argument_for_proper_class(argument_name, argument)

  images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  hf_tokenizer = tokenizer.to_hf()
  hf_tokenizer.padding_side = "left"
  return ImageOnlyProcessor(image_processor=images, tokenizer=hf_tokenizer, video_processor=None,
                            chat_template=hf_reference.QWEN2_5_VL_JINJA)


def trl_messages(example: dict) -> list[dict]:
  from noisygrpo_jax.processing import chat_template
  return [{"role": "user", "content": [{"type": "image"},
                                       {"type": "text", "text": chat_template.cot_question(example["problem"])}]}]


def check_same_inputs(processor, tokenizer, examples: list[dict]) -> tuple[bool, float]:
  """(prompt ids equal for every example, max |pixel_values difference|) between TRL's processor and ours."""
  import PIL.Image
  from noisygrpo_jax.processing import chat_template, image as image_lib
  ours_images = [image_lib.process_image(ex["image"], image_config()) for ex in examples]
  ours = chat_template.encode_vqa_prompts(tokenizer, examples, [im.image_grid_thw for im in ours_images])
  messages = [[{**m, "content": [dict(c, image=PIL.Image.fromarray(ex["image"])) if c["type"] == "image" else c
                                 for c in m["content"]]} for m in trl_messages(ex)] for ex in examples]
  theirs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
  same_ids = all(list(a.input_ids) == list(b) for a, b in zip(ours, theirs["input_ids"]))
  pixels = np.concatenate([im.pixel_values for im in ours_images])
  return same_ids, float(np.abs(np.asarray(theirs["pixel_values"]) - pixels).max())


class PhaseClock:
  """Wraps methods of TRL's trainer instance and adds up their wall seconds per phase until `take()`."""

  def __init__(self):
    self.seconds = collections.defaultdict(float)

  def wrap(self, obj, method: str, phase):
    """Replaces obj.method with a timed call; `phase` is a name or a function of the call's args -> name."""
    inner = getattr(obj, method)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return inner(*args, **kwargs)
      finally:
        self.seconds[phase if isinstance(phase, str) else phase(*args, **kwargs)] += time.perf_counter() - start

    setattr(obj, method, timed)

  def take(self) -> dict[str, float]:
    out, self.seconds = dict(self.seconds), collections.defaultdict(float)
    return out


def trl_phases(raw: dict[str, float], step_s: float) -> dict[str, float]:
  """TRL's step split into phases comparable with ours (wall seconds)."""
  get = lambda k: raw.get(k, 0.0)
  scoring = get("_prepare_inputs")
  return {"generation": get("_generate"), "reward + advantages": get("_calculate_rewards"),
          "rollout assembly (images, batch)": scoring - get("_generate") - get("_calculate_rewards") - get("ref"),
          "reference log-probs": get("ref"),
          "update (forward, backward, AdamW)": step_s - scoring,
          "  of which policy forward + loss": get("compute_loss"),
          "  of which backward": get("training_step") - scoring - get("compute_loss"),
          "  of which clipping, AdamW, logging": step_s - get("training_step")}


def make_trl_trainer(hf_dir: str, processor, tokenizer, case: Case, examples: list[dict], steps: int,
                     train_vision: bool, callback):
  """GRPOTrainer on the exported model in `hf_dir` with the shared settings (its output_dir inside `hf_dir`);
  `callback` is a TrainerCallback."""
  import datasets
  import PIL.Image
  import torch
  import transformers
  from transformers import Qwen2_5_VLForConditionalGeneration
  from trl import GRPOConfig, GRPOTrainer
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
  if not train_vision:
    hf.model.visual.requires_grad_(False)
  rows = [{"prompt": trl_messages(ex), "image": PIL.Image.fromarray(ex["image"]), "solution": ex["solution"],
           "problem": ex["problem"]} for ex in examples]

  def reward(prompts, completions, completion_ids, solution, problem, **kwargs):
    texts = tokenizer.decode_batch(completion_ids, skip_special_tokens=True)
    return [overlap_reward(t, s, q) for t, s, q in zip(texts, solution, problem)]

  args = GRPOConfig(
      output_dir=os.path.join(hf_dir, "trl_output"), use_cpu=True, seed=0, max_steps=steps,
      per_device_train_batch_size=case.prompts * case.group, num_generations=case.group,
      gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
      max_completion_length=case.new_tokens, generation_kwargs={"min_new_tokens": case.new_tokens},
      temperature=1.0, top_k=TOP_K, top_p=1.0, beta=BETA, epsilon=0.2, loss_type="grpo", scale_rewards="group",
      learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
      gradient_checkpointing=False, bf16=False, fp16=False, use_vllm=False, remove_unused_columns=False,
      logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
      dataloader_pin_memory=False)
  trainer = GRPOTrainer(model=hf, reward_funcs=[reward], args=args, train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=processor, callbacks=[callback])
  trainer.remove_callback(transformers.PrinterCallback)  # logs stay in trainer.state.log_history
  return trainer


def export_for_hf(model: Qwen25VL, directory: str, tokenizer) -> None:
  """`save_hf`, then the tokenizer's eos/pad ids in config.json and generation_config.json (the export keeps
  transformers' Qwen2.5 defaults 151643/151645, outside a word-level vocabulary)."""
  import json
  from noisygrpo_jax.models.qwen2_5_vl.checkpoint import save_hf
  save_hf(model, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  config.update(ids)
  config["text_config"].update(ids)
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tokenizer.eos_id], "pad_token_id": tokenizer.pad_id}, f)


# ------------------------------------------------------------------------------------------------
# The comparison


def bench_case(name: str, warmup: int, repeats: int, train_vision: bool) -> dict:
  import torch
  import transformers
  case = CASES[name]
  steps = warmup + repeats
  examples, tokenizer, prompt_len = equal_length_examples(steps * case.prompts, case.vocab_size)
  config = model_config(case, tokenizer)
  model = Qwen25VL(config, nnx.Rngs(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  processor = hf_processor(tokenizer)
  same_ids, pixel_diff = check_same_inputs(processor, tokenizer, examples[:case.prompts])

  ours_times, trl_times = [], []
  state = {"mark": None}
  ours = None

  class Alternate(transformers.TrainerCallback):
    """At each TRL step end: close TRL's step, run one step of ours, restart TRL's clock."""

    def on_train_begin(self, args, state_, control, **kwargs):
      clock.take()
      state["mark"] = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state_, control, **kwargs):
      wall, cpu = time.perf_counter() - state["mark"][0], time.process_time() - state["mark"][1]
      trl_times.append({"step": wall, "cpu": cpu, **trl_phases(clock.take(), wall)})
      i = len(ours_times)
      watch = (time.perf_counter(), time.process_time())
      phases = ours.step(examples[i * case.prompts:(i + 1) * case.prompts], i)
      ours_times.append({"step": time.perf_counter() - watch[0], "cpu": time.process_time() - watch[1], **phases})
      print(f"  {name} step {i + 1}/{steps}: TRL {wall:.2f} s, ours {ours_times[-1]['step']:.2f} s "
            f"(load {load_average():.1f})", flush=True)
      state["mark"] = (time.perf_counter(), time.process_time())

  clock = PhaseClock()
  with tempfile.TemporaryDirectory(prefix="bench_e2e_hf_") as hf_dir:
    export_for_hf(model, hf_dir, tokenizer)  # before any update: both sides start from these weights
    trainer = make_trl_trainer(hf_dir, processor, tokenizer, case, examples, steps, train_vision, Alternate())
    ours = OursRL(ours_config(case, prompt_len, steps, train_vision), model, tokenizer)
    del model
    clock.wrap(trainer, "_prepare_inputs", "_prepare_inputs")
    clock.wrap(trainer, "_generate", "_generate")
    clock.wrap(trainer, "_calculate_rewards", "_calculate_rewards")
    clock.wrap(trainer, "compute_loss", "compute_loss")
    clock.wrap(trainer, "training_step", "training_step")
    # Under no_grad: the reference model's log-probs (old log-probs are not computed in this setting); with
    # grad: the policy forward inside compute_loss.
    clock.wrap(trainer, "_get_per_token_logps_and_entropies",
               lambda *a, **k: "ref" if not torch.is_grad_enabled() else "policy_logps")
    load_before = load_average()
    trainer.train()
    load_after = load_average()
  lengths = [row.get("completions/min_length") for row in trainer.state.log_history if "completions/min_length" in row]
  max_lengths = [row.get("completions/max_length") for row in trainer.state.log_history
                 if "completions/max_length" in row]
  result = dict(name=name, case=dataclasses.asdict(case), prompt_len=prompt_len, params=n_params,
                trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                ours=ours_times[warmup:], trl=trl_times[warmup:], first_ours=ours_times[0], first_trl=trl_times[0],
                same_ids=same_ids, pixel_diff=pixel_diff, load=(load_before, load_after),
                trl_lengths=(min(lengths), max(max_lengths)),
                ours_tokens=[t["tokens"] for t in ours_times], rows=case.prompts * case.group,
                torch_threads=torch.get_num_threads(), image_tokens=(IMAGE_SIZE // 28) ** 2)
  del trainer, ours
  gc.collect()
  return result


def tables(results: list[dict]) -> str:
  fmt = lambda v: f"{v:.2f}" if v < 100 else f"{v:.0f}"
  lines = ["| case | implementation | RL step s: median (min, max) | CPU s per step (median) "
           "| rollout tokens per step | generation tokens/s (median) | RL-step tokens/s (median) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    tokens = r["rows"] * r["case"]["new_tokens"]
    for impl in ("ours", "trl"):
      runs = r[impl]
      s = stats([t["step"] for t in runs])
      gen = statistics.median([t["generation"] for t in runs])
      label = "ours (JAX)" if impl == "ours" else "TRL GRPOTrainer (PyTorch)"
      lines.append(f"| {r['name']} | {label} | {fmt(s['median'])} ({fmt(s['min'])}, {fmt(s['max'])}) "
                   f"| {fmt(statistics.median([t['cpu'] for t in runs]))} | {tokens} | {tokens / gen:.0f} "
                   f"| {tokens / s['median']:.0f} |")
  lines += ["", "Speed-up = TRL seconds per RL step / ours (> 1: ours is faster), by wall median / wall min / CPU "
            "median; checks: prompt ids of both sides identical, max |pixel_values difference|, tokens generated per "
            "rollout (TRL min-max over steps; ours total / rows).", "",
            "| case | params (trainable) | TRL / ours | target | prompt ids equal | pixel diff "
            "| new tokens per rollout TRL / ours | 1-min load before / after |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    ratio = lambda key, stat: stat([t[key] for t in r["trl"]]) / stat([t[key] for t in r["ours"]])
    main = ratio("step", statistics.median)
    target = TARGETS[r["name"]]
    ours_per_row = sorted({n // r["rows"] for n in r["ours_tokens"]})
    lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M ({r['trainable'] / 1e6:.1f}M) "
                 f"| {main:.2f}x / {ratio('step', min):.2f}x / {ratio('cpu', statistics.median):.2f}x "
                 f"| >= {target}x: {'met' if main >= target else 'MISSED'} | {r['same_ids']} | {r['pixel_diff']:.1e} "
                 f"| {r['trl_lengths'][0]:.0f}-{r['trl_lengths'][1]:.0f} / {', '.join(map(str, ours_per_row))} "
                 f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
  lines += ["", "Where the time goes, wall median seconds per phase over the timed steps. Ours: `generation` = "
            "rollouts' time/generate (image processing, chat encoding, collation, prefill + decode); `reward + "
            "advantages` = decoding, the reward, advantages; `rollout assembly` = the rest of generate_rollouts "
            "(noise-free image lists, TokenBatch); `update` = the jitted step (forward, backward, clipping, AdamW) "
            "incl. sharding the batch and fetching the metrics. TRL: `generation` = `_generate` (chat template, "
            "processor, `model.generate`, decoding); `reward` = `_calculate_rewards`; `rollout assembly` = the rest of "
            "`_prepare_inputs` (the processor run again for the forward inputs, padding, advantages, metrics); "
            "`reference log-probs` = `_get_per_token_logps_and_entropies` under no_grad; `update` = the rest of the "
            "step, split into `compute_loss` (policy forward + loss), the backward, and the optimizer step with "
            "clipping, logging and callbacks.", "",
            "| case | phase | ours s | TRL s | TRL / ours |", "|---|---|---|---|---|"]
  for r in results:
    for phase in [k for k in r["trl"][0] if k not in ("step", "cpu")] + ["step"]:
      theirs = statistics.median([t[phase] for t in r["trl"]])
      mine = statistics.median([t[phase] for t in r["ours"]]) if phase in r["ours"][0] else None
      lines.append(f"| {r['name']} | {phase} | {'' if mine is None else f'{mine:.3f}'} | {theirs:.3f} "
                   f"| {'' if not mine else f'{theirs / mine:.2f}x'} |")
  return "\n".join(lines)


def summary_rows(results: list[dict]) -> list[dict]:
  rows = []
  for r in results:
    ours = statistics.median([t["step"] for t in r["ours"]])
    trl = statistics.median([t["step"] for t in r["trl"]])
    tokens = r["rows"] * r["case"]["new_tokens"]
    rows.append(summary_row("e2e", r["name"], "RL step s (TRL GRPOTrainer)", ours, trl, "s",
                            target=TARGETS[r["name"]]))
    rows.append(summary_row("e2e", r["name"], "RL-step rollout tokens/s (TRL)", tokens / ours, tokens / trl, "tok/s",
                            higher_is_better=True))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="tiny,3b_slice", help=f"comma-separated, of {', '.join(CASES)}")
  parser.add_argument("--warmup", type=int, default=2, help="untimed RL steps per side (the first compiles ours)")
  parser.add_argument("--repeats", type=int, default=5, help="timed RL steps per side")
  parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps (for make bench QUICK=1)")
  parser.add_argument("--train-vision", action="store_true", help="train the vision tower too (default frozen)")
  parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = the cores)")
  parser.add_argument("--markdown", type=Path, help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--json", type=Path, help="write summary rows for bench_all.py here")
  args = parser.parse_args()
  os.chdir(REPO)
  if args.quick:
    args.warmup, args.repeats = 1, 3
  import torch
  import transformers  # noqa: F401  (its version goes into the report)
  import trl
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(args.torch_threads or cores)
  watch = Stopwatch()
  results = []
  for name in args.cases.split(","):
    print(f"{name}: building the model, TRL's trainer and ours", flush=True)
    results.append(bench_case(name, args.warmup, args.repeats, args.train_vision))
  elapsed, _ = watch.lap()
  command = command_line("bench_e2e.py")
  case_lines = [f"- {r['name']}: model `{r['case']['model']}` ({r['params'] / 1e6:.1f}M parameters, word-level "
                f"vocabulary {r['case']['vocab_size']}), {r['case']['prompts']} prompts x G = {r['case']['group']} "
                f"rollouts per step, {r['case']['new_tokens']} new tokens per rollout, prompts of {r['prompt_len']} "
                f"tokens ({r['image_tokens']} image tokens from a {IMAGE_SIZE}x{IMAGE_SIZE} image)" for r in results]
  section = "\n".join([
      "## End-to-end RL step on CPU: ours vs TRL's GRPOTrainer, float32", "",
      machine(trl=trl.__version__),
      f"- command: `{command}` ({elapsed / 60:.1f} min); torch threads = {torch.get_num_threads()}",
      "- per RL step, both sides: generation (top-k 50, temperature 1, exactly M new tokens: ours eos_ids=(), TRL "
      "min_new_tokens = M), the same python reward (word overlap with the solution, on completions decoded by our "
      "tokenizer), group z-score advantages, reference log-probs (beta 0.04, k3), one update (GRPO clip 0.2, "
      "sequence-mean-token-mean = TRL loss_type grpo, AdamW lr 1e-5 constant, clipping 1.0), vision tower "
      f"{'trained' if args.train_vision else 'frozen'}; same initial weights (ours exported with save_hf), same "
      "prompts and images (shapes_vqa, prompts of equal length, so no padding), same tokenizer (ours, and "
      "`to_hf()` inside a Qwen2_5_VLProcessor for TRL)",
      *case_lines,
      f"- {args.warmup} untimed warm-up step(s) per side (ours' first compiles), then {args.repeats} timed steps; the "
      "sides alternate step by step in one process (ours runs in a TRL on_step_end callback)",
      f"- peak RSS of this process: {peak_rss_gb():.2f} GB", "", tables(results)])
  print("\n" + section)
  if args.markdown:
    write_markdown(args.markdown, section, MD_BEGIN, MD_END)
  write_json(args.json, summary_rows(results), load=[r["load"] for r in results], command=command)


if __name__ == "__main__":
  main()
