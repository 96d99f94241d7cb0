"""Training benchmarks on CPU.

(i) The tiny-preset RL loop (`loops.run_rl` on configs/noisygrpo.py:tiny, in a child process so its peak RSS
is its own): seconds per RL step split into generation / reward / train step (the loop's own `time/*`
metrics; `time/train` covers the reference log-probs and the update), generated tokens/s, peak RSS. The
first step compiles and is left out of the medians.

(ii) One policy update, ours vs PyTorch, on the same weights and batch: ours is
`train_step.make_train_step` (forward, chunked completion log-probs, the GRPO loss with beta = 0.04 k3 KL
against fixed reference log-probs and sequence-mean-token-mean aggregation, backward, global-norm clipping
and AdamW) under jax.jit with the state donated; PyTorch is the same step written with transformers'
Qwen2_5_VLForConditionalGeneration (forward with logits_to_keep = completion + 1 as TRL does, log-softmax
gather of the completion tokens, the same loss, loss.backward(), clip_grad_norm_, torch.optim.AdamW). Both
freeze the vision tower (the original's setting) and use a constant learning rate. The first step's losses
are compared. Utilisation: ours' FLOPs per step counted two ways, analytically (`throughput.train_step_flops`: 6 x
matmul weights x tokens for the decoder, attention, the LM head on completion tokens, the frozen vision
forward) and by XLA's cost analysis of the compiled step, each over ours' wall time as a fraction of this
machine's float32 matmul peak measured in the same run (jitted square jnp.dot, n = 2048 and 4096, before and
after; the higher is used).

  python experiments/bench/bench_train.py [--parts rl,step] [--rl-steps 8] [--models tiny,3b_slice]
                                          [--repeats 5] [--slice-repeats 5] [--quick] [--markdown BENCHMARKS.md]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Stopwatch, best_ceilings, ceilings_line, command_line, load_average, machine,  # noqa: E402
                    machine_ceilings, peak_rss_gb, slice_3b, stats, summary_row, timed, write_json, write_markdown)
from noisygrpo_jax.training.throughput import train_step_flops  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import config as cfg  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_train:begin -->", "<!-- bench_train:end -->"
RL_METRICS = ("time/generate", "time/reward", "time/train", "throughput/generated_tokens_per_s")
LEARNING_RATE, BETA, MAX_GRAD_NORM = 1e-5, 0.04, 1.0


# ------------------------------------------------------------------------------------------------
# (i) the RL loop


def rl_child(steps: int, out: Path) -> None:
  """Runs the tiny-preset RL loop in a scratch directory and writes its per-step metrics to `out`."""
  sys.path.insert(0, str(REPO / "configs"))
  import noisygrpo
  from noisygrpo_jax.training import loops
  c = noisygrpo.get_config("tiny")
  with tempfile.TemporaryDirectory() as tmp, c.unlocked():
    c.train.steps = steps
    c.train.workdir = os.path.join(tmp, "workdir")
    c.train.eval_every = 0
    c.data.train_size = 64
    c.data.eval_size = 8  # the builder makes the evaluation splits too; they are never used here
    c.data.data_dir = os.path.join(tmp, "data")
    watch = Stopwatch()
    loops.run_rl(c)
    wall, cpu = watch.lap()
    with open(os.path.join(c.train.workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    summary = dict(rows=rows, wall=wall, cpu=cpu, peak_rss_gb=peak_rss_gb(), model=c.model.preset,
                   prompts=c.train.prompts_per_step, group=c.rl.group_size, max_new_tokens=c.rl.max_new_tokens)
  out.write_text(json.dumps(summary))


def bench_rl(steps: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "rl.json"
    load_before = load_average()
    subprocess.run([sys.executable, __file__, "--rl-child", str(out), "--rl-steps", str(steps)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
  result["load"] = (load_before, load_average())
  return result


def rl_table(r: dict) -> str:
  rows = [row for row in r["rows"] if row["step"] > 1]  # step 1 compiles the sampler and the update
  col = lambda key: [row[key] for row in rows]
  generated = [row["completion/length"] * r["prompts"] * r["group"] for row in rows]
  total = [row["time/generate"] + row["time/reward"] + row["time/train"] for row in rows]
  fmt = lambda values, f="{:.2f}": " / ".join(f.format(v) for v in stats(values).values())
  first = r["rows"][0]
  lines = ["| quantity (steps 2-%d) | median / min / max | step 1 (compiling) |" % len(r["rows"]), "|---|---|---|",
           f"| generation s | {fmt(col('time/generate'))} | {first['time/generate']:.2f} |",
           f"| reward s | {fmt(col('time/reward'), '{:.3f}')} | {first['time/reward']:.3f} |",
           f"| train step s (reference log-probs + update) | {fmt(col('time/train'))} | {first['time/train']:.2f} |",
           f"| RL step s (sum of the three) | {fmt(total)} | "
           f"{first['time/generate'] + first['time/reward'] + first['time/train']:.2f} |",
           f"| generated tokens per step | {fmt(generated, '{:.0f}')} | "
           f"{first['completion/length'] * r['prompts'] * r['group']:.0f} |",
           f"| generation tokens/s (`throughput/generated_tokens_per_s`) | "
           f"{fmt(col('throughput/generated_tokens_per_s'), '{:.0f}')} | "
           f"{first['throughput/generated_tokens_per_s']:.0f} |",
           f"| RL step tokens/s (generated tokens / RL step s) | "
           f"{fmt([g / t for g, t in zip(generated, total)], '{:.0f}')} | |"]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# (ii) one policy update: ours vs PyTorch

# name -> (config, rows, image grid per row, prompt text tokens (low, high), completion tokens, weight seed)
MODELS = {
    "tiny": (cfg.tiny, 16, (1, 8, 8), (20, 40), 32, 0),
    "3b_slice": (lambda: slice_3b(8192), 8, (1, 8, 8), (40, 44), 32, 1),
}


def make_batch(config, ours_model, rows: int, grid, text_len, completion: int, seed: int):
  """numpy pieces shared by both sides and our TokenBatch (reference log-probs are filled in later)."""
  from noisygrpo_jax.sampling import sampler as S
  from noisygrpo_jax.training import batches
  from tests.models import hf_reference as ref
  rng = np.random.default_rng(seed)
  ids, mask = ref.left_pad([ref.prompt(config, rng, [("image", grid)], text_len) for _ in range(rows)])
  grids = np.asarray([grid] * rows, np.int64)
  pv = ref.pixels(rng, grids, config)
  tokens = rng.integers(0, config.text.vocab_size - 8, (rows, completion))
  lengths = completion - (np.arange(rows) % 4) * (completion // 8)  # completions of different lengths
  cmask = (np.arange(completion)[None] < lengths[:, None]).astype(np.float32)
  advantages = rng.standard_normal(rows).astype(np.float32)
  prompts = S.prompts_from_hf(ours_model, ids, mask, pixel_values=pv, image_grid_thw=grids)
  batch = batches.token_batch(prompts, tokens, cmask, advantages=advantages)
  raw = dict(ids=ids, mask=mask, pv=pv, grids=grids, tokens=tokens, cmask=cmask, advantages=advantages)
  return batch, raw


def torch_step_fn(hf, config, raw: dict, ref_logps: np.ndarray, freeze_vision: bool, phases: list):
  """The PyTorch step: () -> loss (float) of the parameters before the update. Appends the wall seconds of
  (forward + loss, backward, clipping + AdamW) of every call to `phases`."""
  import torch
  from tests.models import hf_reference as ref
  full_ids = np.concatenate([raw["ids"], raw["tokens"]], axis=1)
  full_mask = np.concatenate([raw["mask"], raw["cmask"].astype(np.int64)], axis=1)
  inputs = ref.hf_inputs(config, full_ids, full_mask, pixel_values=raw["pv"], image_grid_thw=raw["grids"])
  targets = torch.from_numpy(raw["tokens"]).long()
  cmask = torch.from_numpy(raw["cmask"])
  advantages = torch.from_numpy(raw["advantages"])[:, None]
  ref_t = torch.from_numpy(ref_logps)
  m = targets.shape[1]
  if freeze_vision:
    hf.model.visual.requires_grad_(False)
  hf.train()
  trainable = [p for p in hf.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def step() -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits = hf(**inputs, logits_to_keep=m + 1).logits[:, :-1].float()  # position t predicts token t + 1
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    ratio = torch.exp(logps - logps.detach())  # num_iterations = 1: old = current, detached
    pg = -torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
    d = ref_t - logps
    per_token = pg + BETA * (torch.exp(d) - d - 1.0)  # k3
    per_seq = (per_token * cmask).sum(-1) / cmask.sum(-1).clamp(min=1.0)
    loss = per_seq.sum() / (cmask.sum(-1) > 0).float().sum()
    value = float(loss.detach())
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    opt.step()
    phases.append((forward - start, backward - forward, time.perf_counter() - backward))
    return value

  return step


def with_threads(threads: int, fn):
  """fn run with torch's intra-op thread count set to `threads` (restored afterwards)."""
  import torch

  def run():
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      return fn()
    finally:
      torch.set_num_threads(before)
  return run


def bench_step(name: str, warmup: int, repeats: int, freeze_vision: bool, torch_attn: str,
               extra_threads: list[int]) -> dict:
  from flax import nnx
  from noisygrpo_jax.training import optimizer as opt_lib
  from noisygrpo_jax.training import params as params_lib
  from noisygrpo_jax.training import train_step as ts
  from tests.models import hf_reference as ref
  make_config, rows, grid, text_len, completion, seed = MODELS[name]
  config = make_config()
  hf = ref.hf_model(config, seed=seed)
  ours = ref.ours_from_hf(hf, config)
  hf.set_attn_implementation(torch_attn)
  batch, raw = make_batch(config, ours, rows, grid, text_len, completion, seed)

  graphdef, model_state = nnx.split(ours)
  params = nnx.to_pure_dict(model_state)
  del ours, model_state
  # Fixed reference log-probs: the initial policy's, perturbed so that the KL term is not zero.
  forward = jax.jit(ts.logps_fn(graphdef, ts.LossConfig().chunk_size))
  logps = forward(params, batch)
  ref_logps = np.asarray(logps) + 0.05 * np.random.default_rng(seed + 1).standard_normal(logps.shape).astype(
      np.float32)
  batch = jax.device_put(batch.replace(ref_logps=ref_logps))

  trainable, frozen = params_lib.partition(params, freeze_vision)
  ts_params = lambda state: params_lib.combine(state.params, state.frozen)
  optimizer = opt_lib.make_optimizer(LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM)
  loss_cfg = ts.LossConfig(beta=BETA, kl_estimator="k3", aggregation="sequence_mean_token_mean")
  step_fn = ts.make_train_step(graphdef, optimizer, loss_cfg)
  state = ts.TrainState(step=jnp.int32(0), params=trainable, opt_state=jax.jit(optimizer.init)(trainable),
                        frozen=frozen)
  watch = Stopwatch()
  compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
  compile_s, _ = watch.lap()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])

  holder = {"state": state}
  ours_losses = []

  def ours_step():
    holder["state"], metrics, _ = compiled(holder["state"], batch)
    ours_losses.append(float(jax.block_until_ready(metrics)["loss"]))

  # Ours by phase, for the where-the-time-goes table: the loss gradient alone (forward + backward, as in the
  # step), and the forward alone (the log-probs without autodiff).
  def loss_fn(trainable, frozen, batch):
    num, _, _, _ = ts.loss_terms(nnx.merge(graphdef, params_lib.combine(trainable, frozen)), batch, loss_cfg)
    return num / jnp.maximum(ts.denominator(batch, loss_cfg), 1e-9)

  grad = jax.jit(jax.grad(loss_fn))
  torch_phases = []
  torch_step = torch_step_fn(hf, config, raw, ref_logps, freeze_vision, torch_phases)
  torch_losses = []
  fns = {"ours (jax.jit)": ours_step, f"PyTorch ({torch_attn})": lambda: torch_losses.append(torch_step()),
         "ours: loss gradient only": lambda: jax.block_until_ready(grad(holder["state"].params,
                                                                        holder["state"].frozen, batch)),
         "ours: forward only": lambda: jax.block_until_ready(forward(ts_params(holder["state"]), batch))}
  for threads in extra_threads:  # the same model and optimizer, stepped with fewer torch threads
    fns[f"PyTorch ({torch_attn}, {threads} thread{'s' * (threads != 1)})"] = with_threads(threads, torch_step)
  times = timed(fns, warmup, repeats)
  torch_phases = torch_phases[-repeats * (1 + len(extra_threads)):]  # the timed calls
  tokens = int(np.prod(batch.input_ids.shape))
  n_params = lambda tree: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
  model_flops = train_step_flops(config, rows, batch.input_ids.shape[1], completion, int(np.prod(grid)),
                                 train_vision=not freeze_vision)
  return dict(name=name, rows=rows, seq=batch.input_ids.shape[1], prompt=raw["ids"].shape[1], completion=completion,
              tokens=tokens, params=n_params(params), trainable=n_params(trainable), flops=flops, compile_s=compile_s,
              model_flops=model_flops,
              loss_diff=abs(ours_losses[0] - torch_losses[0]), loss=ours_losses[0], times=times,
              torch_phases=[[p[i] for p in torch_phases] for i in range(3)],
              image_tokens=int(np.prod(grid)) // config.vision.merge_unit)


def step_tables(results: list[dict], peak: float) -> str:
  ms = lambda s: f"{1e3 * s:.0f}" if s >= 1 else f"{1e3 * s:.1f}"
  lines = ["| model | rows x tokens (prompt + completion) | implementation | wall median ms | wall min ms "
           "| wall max ms | CPU median ms | tokens/s (wall median) |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for impl, t in r["times"].items():
      if impl.startswith("ours:"):
        continue
      lines.append(f"| {r['name']} | {r['rows']} x {r['seq']} ({r['prompt']} + {r['completion']}) | {impl} "
                   f"| {ms(statistics.median(t['wall']))} | {ms(min(t['wall']))} | {ms(max(t['wall']))} "
                   f"| {ms(statistics.median(t['cpu']))} | {r['tokens'] / statistics.median(t['wall']):.0f} |")
  lines += ["", "Speed-up of ours = PyTorch time / ours time (> 1: ours is faster) as wall median / wall min / CPU "
            "median.", "",
            "| model | params (trainable) | PyTorch / ours | target >= 1.2x | abs diff of step-1 loss (loss) "
            "| ours compile s |", "|---|---|---|---|---|---|"]
  for r in results:
    t = r["times"]
    ours = t["ours (jax.jit)"]
    ratios = {}
    for impl in [k for k in t if k.startswith("PyTorch")]:
      ratios[impl] = [stat(t[impl][kind]) / stat(ours[kind]) for kind, stat in
                      (("wall", statistics.median), ("wall", min), ("cpu", statistics.median))]
    shown = "; ".join(f"{impl.removeprefix('PyTorch ')}: {' / '.join(f'{x:.2f}x' for x in v)}"
                      for impl, v in ratios.items())
    met = "met" if min(v[0] for v in ratios.values()) >= 1.2 else "MISSED"
    lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M ({r['trainable'] / 1e6:.1f}M) | {shown} | {met} "
                 f"| {r['loss_diff']:.1e} ({r['loss']:.4f}) | {r['compile_s']:.0f} |")
  lines += ["", "Utilisation of ours' step: FLOPs per step counted analytically (model FLOPs: 6 x matmul weights x "
            "tokens for the decoder layers, 3 x 4 x seq^2 x heads x head_dim per layer and row for attention, 6 x "
            "hidden x vocab x completion tokens for the LM head, the frozen vision tower's forward; the split is "
            "decoder / attention / LM head / vision) and by XLA's cost analysis of the compiled step; FLOP/s at "
            "ours' wall median (and min), as a fraction of the float32 matmul peak measured in this run "
            f"({peak / 1e9:.0f} GFLOP/s). Target (issue #8): >= 30% on the 3B-width slice.", "",
            "| model | model GFLOP per step (decoder / attention / LM head / vision) | XLA GFLOP per step "
            "| model GFLOP/s: median time (min time) | fraction of matmul peak: model FLOPs (XLA FLOPs) "
            "| target >= 30% |", "|---|---|---|---|---|---|"]
  for r in results:
    wall = r["times"]["ours (jax.jit)"]["wall"]
    m = r["model_flops"]
    rate, best = m["total"] / statistics.median(wall), m["total"] / min(wall)
    xla_rate = r["flops"] / statistics.median(wall)
    split = " / ".join(f"{m[k] / 1e9:.1f}" for k in ("decoder", "attention", "lm_head", "vision"))
    target = ("met" if rate / peak >= 0.3 else "MISSED") if r["name"].startswith("3b") else ""
    lines.append(f"| {r['name']} | {m['total'] / 1e9:.1f} ({split}) | {r['flops'] / 1e9:.1f} "
                 f"| {rate / 1e9:.1f} ({best / 1e9:.1f}) | {rate / peak:.0%} ({xla_rate / peak:.0%}); min time "
                 f"{best / peak:.0%} | {target} |")
  lines += ["", "Where the time goes, wall median ms per phase (same rounds). Ours: forward = the jitted log-probs "
            "without autodiff; backward = loss gradient (jax.grad, forward + backward) - forward; optimizer and rest = "
            "full step - loss gradient (clipping, AdamW, metrics). PyTorch: stamps inside its step (forward + loss "
            "with autograd recording; loss.backward(); clip_grad_norm_ + AdamW.step), torch threads = cores. A "
            "negative ours optimizer time means ~0 within noise: the gradient-only function also returns the "
            "(zero) gradients of the frozen vision tower, which the step never materialises.", "",
            "| model | phase | ours ms | PyTorch ms | PyTorch / ours |", "|---|---|---|---|---|"]
  for r in results:
    t = r["times"]
    med = lambda name: statistics.median(t[name]["wall"])
    fwd, grad, step = med("ours: forward only"), med("ours: loss gradient only"), med("ours (jax.jit)")
    torch_fwd, torch_bwd, torch_opt = (statistics.median(p) for p in r["torch_phases"])
    for phase, mine, theirs in (("forward", fwd, torch_fwd), ("backward", grad - fwd, torch_bwd),
                                ("optimizer and rest", step - grad, torch_opt),
                                ("step", step, med(next(k for k in t if k.startswith("PyTorch"))))):
      ratio = f"{theirs / mine:.2f}x" if mine > 0 else "n/a"
      mine = ms(mine) if mine > 0 else f"~0 ({1e3 * mine:.0f})"
      lines.append(f"| {r['name']} | {phase} | {mine} | {ms(theirs)} | {ratio} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default="rl,step", help="rl (the RL loop), step (ours vs PyTorch), or both")
  parser.add_argument("--rl-steps", type=int, default=8)
  parser.add_argument("--models", default="tiny,3b_slice", help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps per implementation (tiny); torch's first few steps are slow")
  parser.add_argument("--slice-warmup", type=int, default=1, help="untimed steps per implementation (3b_slice)")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (tiny)")
  parser.add_argument("--slice-repeats", type=int, default=5, help="timed steps per implementation (3b_slice)")
  parser.add_argument("--train-vision", action="store_true", help="train the vision tower too (default frozen)")
  parser.add_argument("--torch-attn", default="sdpa", help="transformers attention implementation")
  parser.add_argument("--extra-torch-threads", default="1",
                      help="tiny: also time the PyTorch step with these torch thread counts (comma-separated)")
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps (RL loop 5, tiny 2 + 3, 3b_slice 1 + 3) and a quicker ceilings measurement")
  parser.add_argument("--markdown", type=Path, help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--json", type=Path, help="write summary rows for bench_all.py here")
  parser.add_argument("--rl-child", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  os.chdir(REPO)
  if args.rl_child:
    rl_child(args.rl_steps, args.rl_child)
    return

  import torch
  import transformers  # noqa: F401  (its version goes into the report)
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  parts = args.parts.split(",")
  watch = Stopwatch()
  blocks = []
  if args.quick:
    args.rl_steps, args.repeats, args.slice_repeats, args.warmup = min(args.rl_steps, 5), 3, 3, 2
  rows = []
  if "rl" in parts:
    print(f"RL loop: {args.rl_steps} steps in a child process", flush=True)
    r = bench_rl(args.rl_steps)
    blocks += ["", "### (i) RL loop, tiny preset: seconds per RL step", "",
               f"- `loops.run_rl` on `configs/noisygrpo.py:tiny` (model preset `{r['model']}`, {r['prompts']} prompts "
               f"x {r['group']} rollouts per step, up to {r['max_new_tokens']} new tokens, top-k 50 sampling) with "
               f"train.steps={args.rl_steps}, eval_every=0, data.train_size=64, in a child process: "
               f"{r['wall']:.0f} s wall / {r['cpu']:.0f} s CPU in all (including data building and checkpoints), "
               f"peak RSS (ru_maxrss) {r['peak_rss_gb']:.2f} GB",
               f"- 1-minute load average before / after: {r['load'][0]:.1f} / {r['load'][1]:.1f}", "", rl_table(r)]
    timed_rows = [row for row in r["rows"] if row["step"] > 1]
    rows.append(summary_row("RL loop", "tiny preset", "RL step s (run_rl, ours only)", statistics.median(
        [row["time/generate"] + row["time/reward"] + row["time/train"] for row in timed_rows]), None, "s"))
  if "step" in parts:
    load_before = load_average()
    ceilings = [machine_ceilings(args.quick)]
    print(f"float32 matmul peak: {ceilings[0]['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for name in args.models.split(","):
      print(f"{name}: train step, ours vs PyTorch", flush=True)
      slice_ = name.startswith("3b")
      repeats, warmup = (args.slice_repeats, args.slice_warmup) if slice_ else (args.repeats, args.warmup)
      extra = [int(x) for x in args.extra_torch_threads.split(",") if x] if not slice_ else []
      results.append(bench_step(name, warmup, repeats, not args.train_vision, args.torch_attn, extra))
      results[-1].update(repeats=repeats, warmup=warmup)
    ceilings.append(machine_ceilings(args.quick))
    peak = best_ceilings(*ceilings)["matmul_flops_per_s"]
    blocks += ["", "### (ii) One policy update: ours (jax.jit) vs the same step in PyTorch (transformers), float32",
               "",
               f"- 1-minute load average before / after: {load_before:.1f} / {load_average():.1f}",
               ceilings_line(*ceilings),
               "- weights: random (tests/models/hf_reference.py `hf_model`), copied into ours with `ours_from_hf`; per "
               "row one image + text, left-padded, then a random completion with per-row lengths "
               "(completion mask 100/87/75/62%); image tokens per row: "
               + ", ".join(f"{r['name']} {r['image_tokens']}" for r in results),
               f"- GRPO loss: beta {BETA}, k3 KL against fixed reference log-probs, clip 0.2, "
               f"sequence_mean_token_mean; AdamW lr {LEARNING_RATE} constant, betas (0.9, 0.999), eps 1e-8, no "
               f"weight decay, global-norm clipping {MAX_GRAD_NORM}; vision tower "
               f"{'trained' if args.train_vision else 'frozen'}; PyTorch attention {args.torch_attn}, torch threads "
               f"= {cores} (tiny also with {args.extra_torch_threads or 'no other'}; one model and optimizer, "
               "stepped in turns)",
               "- untimed warm-up steps, then timed steps in turns (per implementation): " +
               ", ".join(f"{r['name']} {r['warmup']} + {r['repeats']}" for r in results),
               f"- peak RSS of this process (both models, both optimizers): {peak_rss_gb():.2f} GB", "",
               step_tables(results, peak)]
    for r in results:
      t = r["times"]
      ours = statistics.median(t["ours (jax.jit)"]["wall"])
      torch_impl = f"PyTorch ({args.torch_attn})"
      rows.append(summary_row("train step", r["name"], "policy update s (PyTorch)", ours,
                              statistics.median(t[torch_impl]["wall"]), "s", target=1.2))
      rows.append(summary_row("train step", r["name"], "model FLOPs / matmul peak", r["model_flops"]["total"] / ours
                              / peak, None, "fraction", higher_is_better=True,
                              note=f"target >= 0.30" if r["name"].startswith("3b") else ""))
  elapsed, _ = watch.lap()
  command = command_line("bench_train.py")
  section = "\n".join(["## Training on CPU: the RL loop, and one policy update ours vs PyTorch", "", machine(),
                       f"- command: `{command}` ({elapsed / 60:.1f} min)", *blocks])
  print("\n" + section)
  if args.markdown:
    write_markdown(args.markdown, section, MD_BEGIN, MD_END)
  write_json(args.json, rows, command=command)


if __name__ == "__main__":
  main()
