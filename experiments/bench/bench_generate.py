"""Generation benchmark on CPU: our jitted sampler (prefill + `lax.while_loop` decode) vs transformers' `generate`.

Both sides run the same weights (a random HF model from tests/models/hf_reference.py, copied into ours with
`ours_from_hf`) on the same left-padded prompts (each row: text, one image, text), greedy, with no EOS so
every row generates exactly `new_tokens` tokens (HF: do_sample=False, min_new_tokens=max_new_tokens,
use_cache=True). The greedy tokens of every implementation are compared with ours in each timed run.

Ours: `sampler.prefill` and `sampler.decode` timed separately (each followed by block_until_ready) after a
warm-up (compiling) run; the host bookkeeping (`prompts_from_hf`: M-RoPE positions, vision packing) is timed
on its own. HF: one `generate` call per run; a logits processor stamps the time at each step, so prefill =
start -> first stamp (the prompt forward) and decode = first stamp -> return (the remaining new_tokens - 1
cached forwards). Decode tokens/s = batch * new_tokens / decode seconds for both (ours runs new_tokens cached
forwards in that time, HF new_tokens - 1). Torch threads = cores.

  python experiments/bench/bench_generate.py [--cases tiny,3b_slice] [--impls sdpa,eager] [--repeats 5]
                                             [--quick] [--markdown BENCHMARKS.md] [--json out.json]

Utilisation: decode FLOP/s and bytes moved per second (weights + KV cache read per step, analytic counts) as
fractions of this machine's float32 matmul peak and memory bandwidth, measured in the same run
(`common.machine_ceilings`, before and after). The GPU check is experiments/bench/bench_gpu.py (`make bench-gpu`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Stopwatch, best_ceilings, ceilings_line, command_line, load_average, machine,  # noqa: E402
                    machine_ceilings, slice_3b, stats, summary_row, timed, write_json, write_markdown)
from noisygrpo_jax.training.throughput import decode_step_flops  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, unstacked_decoder  # noqa: E402
from noisygrpo_jax.sampling import sampler as S  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_generate:begin -->", "<!-- bench_generate:end -->"

# name -> (config, batch, new tokens, image grid (t, h, w) per row, text tokens around the image (low, high),
# weight seed). Text lengths differ between rows, so the prompts are left-padded.
CASES = {
    "tiny": (cfg.tiny, 16, 64, (1, 8, 8), (4, 16), 0),
    "3b_slice": (lambda: slice_3b(8192), 8, 32, (1, 12, 12), (8, 24), 1),
}
TARGETS = {"tiny": 5.0, "3b_slice": 1.2}  # decode tokens/s of ours over HF, from the issue


# ------------------------------------------------------------------------------------------------
# Inputs and the two implementations


def make_prompts(config, batch: int, grid, text_len, seed: int = 0):
  """numpy (input_ids, attention_mask, pixel_values, image_grid_thw), left-padded with id 0."""
  from tests.models import hf_reference as ref
  rng = np.random.default_rng(seed)
  ids, mask = ref.left_pad([ref.prompt(config, rng, [("image", grid)], text_len) for _ in range(batch)])
  grids = np.asarray([grid] * batch, np.int64)
  return ids, mask, ref.pixels(rng, grids, config), grids


class OursGenerate:
  """sampler.prefill then sampler.decode, each timed to completion, from the layout `sampler.generate` decodes from
  (the decoder layers unstacked: `unstacked_decoder`)."""

  def __init__(self, model: Qwen25VL, ids, mask, pv, grids, params: S.SamplingParams):
    self.model, self.raw, self.params = model, (ids, mask, pv, grids), params
    self.graphdef, self.state = nnx.split(unstacked_decoder(model))
    self.prompts = jax.device_put(self.host_prep())
    self.prompt_len = ids.shape[1]
    self.key = jax.random.key(0)

  def host_prep(self):
    ids, mask, pv, grids = self.raw
    return S.prompts_from_hf(self.model, ids, mask, pixel_values=pv, image_grid_thw=grids)

  def __call__(self):
    watch = Stopwatch()
    decode_state = jax.block_until_ready(S.prefill(self.graphdef, self.state, self.prompts, self.key, self.params))
    prefill = watch.lap()
    final = jax.block_until_ready(S.decode(self.graphdef, self.state, decode_state, self.prompt_len, self.params))
    decode = watch.lap()
    return np.asarray(final.tokens), prefill, decode


class HFGenerate:
  """transformers generate, greedy, exactly `new_tokens` tokens; prefill/decode split by per-step stamps."""

  def __init__(self, model, impl: str, inputs: dict, new_tokens: int, threads: int):
    import transformers

    class Stamps(transformers.LogitsProcessor):
      def __init__(self):
        self.times = []

      def __call__(self, input_ids, scores):
        self.times.append((time.perf_counter(), time.process_time()))
        return scores

    self.model, self.impl, self.inputs, self.new_tokens, self.threads = model, impl, inputs, new_tokens, threads
    self.stamps_cls, self.processors = Stamps, transformers.LogitsProcessorList

  def __call__(self, new_tokens: int | None = None):
    import torch
    new_tokens = new_tokens or self.new_tokens
    self.model.set_attn_implementation(self.impl)
    threads = torch.get_num_threads()
    torch.set_num_threads(self.threads)
    stamps = self.stamps_cls()
    start = (time.perf_counter(), time.process_time())
    with torch.no_grad():
      out = self.model.generate(**self.inputs, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, use_cache=True,
                                logits_processor=self.processors([stamps]))
    end = (time.perf_counter(), time.process_time())
    torch.set_num_threads(threads)
    first = stamps.times[0]
    tokens = out[:, self.inputs["input_ids"].shape[1]:].numpy()
    return tokens, (first[0] - start[0], first[1] - start[1]), (end[0] - first[0], end[1] - first[1])


# ------------------------------------------------------------------------------------------------
# Where the time goes


def matmul_floor(config, batch: int, repeats: int = 5) -> dict[str, float]:
  """Seconds per decode step of only the decoder's weight matmuls for one token per row ([B, D] activations
  through q/k/v/o, gate/up/down of every layer and the LM head), in jitted XLA and in torch, with random
  float32 weights of the model's shapes; plus the bytes of those weights (over the measured bandwidth: the
  memory-bandwidth floor)."""
  import torch
  t = config.text
  kv = t.num_key_value_heads * t.head_dim
  shapes = [(t.hidden_size, t.hidden_size), (t.hidden_size, kv), (t.hidden_size, kv), (t.hidden_size, t.hidden_size),
            (t.hidden_size, t.intermediate_size), (t.hidden_size, t.intermediate_size),
            (t.intermediate_size, t.hidden_size)]
  rng = np.random.default_rng(0)
  layers = [[rng.standard_normal(s, np.float32) * 0.02 for s in shapes] for _ in range(t.num_hidden_layers)]
  head = rng.standard_normal((t.hidden_size, t.vocab_size), np.float32) * 0.02
  x = rng.standard_normal((batch, t.hidden_size), np.float32)
  weight_bytes = sum(w.nbytes for ws in layers for w in ws) + head.nbytes

  def chain(x, layers, head, dot):
    for wq, wk, wv, wo, wg, wu, wd in layers:
      o = dot(dot(x, wq), wo)
      g, u = dot(x, wg), dot(x, wu)
      x = x + o + dot(g * u, wd) + dot(x, wk).sum() + dot(x, wv).sum()
    return dot(x, head)

  jitted = jax.jit(lambda x, layers, head: chain(x, layers, head, jnp.dot))
  j_args = jax.device_put((x, layers, head))
  # torch as HF runs it: nn.Linear weights stored [out, in], y = F.linear(x, W) = x @ W.T
  as_linear = lambda w: torch.from_numpy(np.ascontiguousarray(w.T))
  t_args = (torch.from_numpy(x), [[as_linear(w) for w in ws] for ws in layers], as_linear(head))
  jitted(*j_args).block_until_ready()

  best = lambda fn: min(timed({"fn": fn}, warmup=1, repeats=repeats)["fn"]["wall"])

  with torch.no_grad():
    torch_s = best(lambda: chain(*t_args, torch.nn.functional.linear))
  xla_s = best(lambda: jitted(*j_args).block_until_ready())
  return dict(xla_s=xla_s, torch_s=torch_s, weight_bytes=weight_bytes)


def prefill_parts(ours: OursGenerate, hf_model, hf_inputs: dict, repeats: int = 3) -> dict[str, float]:
  """Median seconds of the vision tower alone, ours (jitted `vision_features`) and HF (`model.visual`)."""
  import torch
  graphdef = ours.graphdef
  vision = jax.jit(lambda state, v: nnx.merge(graphdef, state).vision_features(v))
  jax.block_until_ready(vision(ours.state, ours.prompts.vision))
  grid = hf_inputs["image_grid_thw"]

  def hf_vision():
    with torch.no_grad():
      hf_model.model.visual(hf_inputs["pixel_values"], grid_thw=grid)

  times = timed({"ours_vision_s": lambda: jax.block_until_ready(vision(ours.state, ours.prompts.vision)),
                 "hf_vision_s": hf_vision}, warmup=1, repeats=repeats)
  return {name: statistics.median(t["wall"]) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------
# The CPU comparison


def bench_case(name: str, impls: list[str], warmup: int, repeats: int, diagnose: bool) -> dict:
  import torch
  from tests.models import hf_reference as ref
  make_config, batch, new_tokens, grid, text_len, seed = CASES[name]
  config = make_config()
  hf = ref.hf_model(config, seed=seed)
  hf.generation_config.eos_token_id = None
  hf.generation_config.bos_token_id = None
  ours_model = ref.ours_from_hf(hf, config)
  ids, mask, pv, grids = make_prompts(config, batch, grid, text_len, seed)
  params = S.SamplingParams(max_new_tokens=new_tokens, greedy=True, eos_ids=(), pad_id=0)
  ours = OursGenerate(ours_model, ids, mask, pv, grids, params)
  hf_inputs = ref.hf_inputs(config, ids, mask, pixel_values=pv, image_grid_thw=grids)
  runners = {"ours": ours}
  cores = len(os.sched_getaffinity(0))
  for spec in impls:  # "sdpa" (torch threads = cores) or "sdpa@1" (torch threads = 1)
    impl, _, threads = spec.partition("@")
    label = f"HF {impl}" + (f", {threads} thread{'s' * (threads != '1')}" if threads else "")
    runners[label] = HFGenerate(hf, impl, hf_inputs, new_tokens, int(threads or cores))

  for _ in range(warmup):  # compiles ours (same shapes as the timed runs); a shorter generate warms torch
    for n, runner in runners.items():
      runner() if n == "ours" else runner(min(new_tokens, 8))
  record = {n: {"prefill": {"wall": [], "cpu": []}, "decode": {"wall": [], "cpu": []}, "agree": []} for n in runners}
  record["ours: host prep"] = {"prefill": {"wall": [], "cpu": []}}
  for _ in range(repeats):  # implementations take turns, so load from other processes falls on all alike
    watch = Stopwatch()
    ours.host_prep()
    wall, cpu = watch.lap()
    record["ours: host prep"]["prefill"]["wall"].append(wall)
    record["ours: host prep"]["prefill"]["cpu"].append(cpu)
    ours_tokens = None
    for n, runner in runners.items():
      tokens, prefill, decode = runner()
      ours_tokens = tokens if ours_tokens is None else ours_tokens
      for phase, (wall, cpu) in (("prefill", prefill), ("decode", decode)):
        record[n][phase]["wall"].append(wall)
        record[n][phase]["cpu"].append(cpu)
      assert tokens.shape == (batch, new_tokens), tokens.shape
      record[n]["agree"].append(float((tokens == ours_tokens).mean()))
    print(f"  {name}: round done", flush=True)

  result = dict(name=name, config=config, batch=batch, new_tokens=new_tokens, grid=grid, prompt_len=ids.shape[1],
                valid_prompt=(int(mask.sum(1).min()), int(mask.sum(1).max())), times=record)
  if diagnose:
    result["floor"] = matmul_floor(config, batch)
    result["vision"] = prefill_parts(ours, hf, hf_inputs)
    t = config.text
    slots = ids.shape[1] + new_tokens
    result["kv_bytes_per_step"] = 2 * t.num_hidden_layers * batch * slots * t.num_key_value_heads * t.head_dim * 4
  del hf
  torch.cuda.empty_cache() if torch.cuda.is_available() else None
  return result


def decode_bytes_per_step(config, batch: int, slots: int, valid: float) -> tuple[float, float, float]:
  """(parameter bytes, KV bytes of all slots, KV bytes of the valid slots) one decode step reads.

  Parameters: the decoder layers, the final norm and the LM head (the embedding table when tied; the one
  embedding row per token looked up at the input is negligible); the vision tower is not used in decoding.
  KV: keys and values of every layer; our attention reads all `slots` cache slots (masked), an ideal kernel
  only the `valid` ones (the average filled length over the decode). bench_gpu.py's roofline uses it too.
  """
  t = config.text
  itemsize = jnp.dtype(config.dtype).itemsize
  kv = t.num_key_value_heads * t.head_dim
  per_layer = (t.hidden_size * (t.num_attention_heads * t.head_dim) * 2 + t.hidden_size * kv * 2
               + t.num_attention_heads * t.head_dim + 2 * kv + 3 * t.hidden_size * t.intermediate_size
               + 2 * t.hidden_size)
  params = (t.num_hidden_layers * per_layer + t.hidden_size + t.hidden_size * t.vocab_size) * itemsize
  per_slot = 2 * t.num_hidden_layers * batch * kv * itemsize
  return float(params), float(per_slot * slots), float(per_slot * valid)


def decode_utilisation(r: dict, impl: str) -> dict[str, float]:
  """Per decode step of `impl` ("ours" or an HF label): wall seconds (median), FLOPs and bytes moved (weights +
  KV cache read), from the analytic counts. Ours' masked attention reads all prompt + new-token slots every step;
  HF's cache holds the prompt (padding included) plus the tokens so far (the average over the decode is used)."""
  config, batch, prompt, new = r["config"], r["batch"], r["prompt_len"], r["new_tokens"]
  steps = new if impl == "ours" else new - 1
  slots = prompt + new if impl == "ours" else prompt + new / 2
  params, kv, _ = decode_bytes_per_step(config, batch, int(round(slots)), 0)
  step_s = statistics.median(r["times"][impl]["decode"]["wall"]) / steps
  return {"step_s": step_s, "flops": decode_step_flops(config, batch, int(round(slots))), "weight_bytes": params,
          "kv_bytes": kv}


def utilisation_table(results: list[dict], ceilings: dict) -> list[str]:
  """Decode FLOP/s and bytes/s as fractions of the matmul peak and the memory bandwidth measured in this run."""
  peak, bandwidth = ceilings["matmul_flops_per_s"], ceilings["best_bytes_per_s"]
  lines = ["", "Decode utilisation (wall median per step; FLOPs: 2 x the decoder's and LM head's matmul weights per "
           "row + attention over the cache slots read; bytes: the decoder's weights and LM head read once per step "
           "(float32) + the KV cache read (ours: all prompt + new-token slots, as its masked attention reads them; "
           f"HF: the average filled length)), against this run's float32 matmul peak {peak / 1e9:.0f} GFLOP/s and "
           f"memory bandwidth {bandwidth / 1e9:.1f} GB/s:", "",
           "| case | implementation | ms per step | GFLOP/s (fraction of matmul peak) "
           "| MB moved per step: weights + KV | GB/s moved (fraction of bandwidth) |", "|---|---|---|---|---|---|"]
  for r in results:
    for impl in [k for k in r["times"] if "decode" in r["times"][k]]:
      u = decode_utilisation(r, impl)
      moved = u["weight_bytes"] + u["kv_bytes"]
      lines.append(f"| {r['name']} | {impl} | {1e3 * u['step_s']:.2f} | {u['flops'] / u['step_s'] / 1e9:.1f} "
                   f"({u['flops'] / u['step_s'] / peak:.1%}) "
                   f"| {u['weight_bytes'] / 1e6:.1f} + {u['kv_bytes'] / 1e6:.1f} "
                   f"| {moved / u['step_s'] / 1e9:.2f} ({moved / u['step_s'] / bandwidth:.0%}) |")
  return lines


def tables(results: list[dict], ceilings: dict) -> str:
  ms = lambda s: f"{1e3 * s:.1f}"
  lines = ["| case | implementation | prefill ms: wall median (min, max) | prefill CPU ms median "
           "| decode tok/s: wall median (min, max) | decode CPU s median | wall ms per decode step |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    tokens = r["batch"] * r["new_tokens"]
    for impl, t in r["times"].items():
      p = stats(t["prefill"]["wall"])
      row = (f"| {r['name']} | {impl} | {ms(p['median'])} ({ms(p['min'])}, {ms(p['max'])}) "
             f"| {ms(statistics.median(t['prefill']['cpu']))} |")
      if "decode" in t:
        d = stats(t["decode"]["wall"])
        steps = r["new_tokens"] if impl == "ours" else r["new_tokens"] - 1
        row += (f" {tokens / d['median']:.0f} ({tokens / d['max']:.0f}, {tokens / d['min']:.0f}) "
                f"| {statistics.median(t['decode']['cpu']):.2f} | {ms(d['median'] / steps)} |")
      else:
        row += " | | |"
      lines.append(row)
  lines += ["", "Speed-up of ours = HF time / ours time (> 1: ours is faster), as wall median / wall min / CPU "
            "median. Decode: the ratio of decode tokens/s. Prefill `+prep`: ours' prefill plus its host "
            "bookkeeping (HF's generate does its M-RoPE bookkeeping inside its prefill). Tokens: the fraction of "
            "greedy tokens equal to ours over all timed runs.", "",
            "| case | vs | prefill HF / ours | prefill HF / ours+prep | decode HF / ours | target (decode) "
            "| equal tokens |", "|---|---|---|---|---|---|---|"]
  for r in results:
    t = r["times"]
    ours, prep = t["ours"], t["ours: host prep"]

    def ratio(hf, ours_phase, extra=None):
      out = []
      for kind, stat in (("wall", statistics.median), ("wall", min), ("cpu", statistics.median)):
        mine = np.asarray(ours_phase[kind]) + (np.asarray(extra[kind]) if extra else 0.0)
        out.append(f"{stat(hf[kind]) / stat(list(mine)):.2f}x")
      return " / ".join(out)

    for impl in [k for k in t if k.startswith("HF")]:
      hf = t[impl]
      decode = statistics.median(hf["decode"]["wall"]) / statistics.median(ours["decode"]["wall"])
      met = "met" if decode >= TARGETS[r["name"]] else "MISSED"
      lines.append(f"| {r['name']} | {impl} | {ratio(hf['prefill'], ours['prefill'])} "
                   f"| {ratio(hf['prefill'], ours['prefill'], prep['prefill'])} "
                   f"| {ratio(hf['decode'], ours['decode'])} | >= {TARGETS[r['name']]}x: {met} "
                   f"| {statistics.mean(hf['agree']):.4f} |")
  diag = [r for r in results if "floor" in r]
  if diag:
    lines += ["", "Where the time goes (per decode step: wall ms; the matmul floor runs only the decoder's weight "
              "matmuls for one token per row, jitted XLA and torch `F.linear` (HF's layout), random weights of the "
              "same shapes; the bandwidth floor is those weights' bytes over the memory bandwidth measured in this "
              "run; KV is the cache our decode step reads, all slots, float32):", "",
              "| case | ours step ms | HF sdpa step ms | XLA matmul floor ms | torch matmul floor ms "
              "| weights MB / GB/s = bandwidth floor ms | KV read MB per step | vision tower ms ours / HF "
              "| ours prefill ms |", "|---|---|---|---|---|---|---|---|---|"]
    bandwidth = ceilings["best_bytes_per_s"]
    for r in diag:
      t, f, v = r["times"], r["floor"], r["vision"]
      step = lambda impl, n: ms(statistics.median(t[impl]["decode"]["wall"]) / n) if impl in t else "-"
      lines.append(f"| {r['name']} | {step('ours', r['new_tokens'])} | {step('HF sdpa', r['new_tokens'] - 1)} "
                   f"| {ms(f['xla_s'])} | {ms(f['torch_s'])} | {f['weight_bytes'] / 1e6:.1f} / "
                   f"{bandwidth / 1e9:.1f} = {ms(f['weight_bytes'] / bandwidth)} "
                   f"| {r['kv_bytes_per_step'] / 1e6:.1f} | {ms(v['ours_vision_s'])} / {ms(v['hf_vision_s'])} "
                   f"| {ms(statistics.median(t['ours']['prefill']['wall']))} |")
  lines += utilisation_table(results, ceilings)
  return "\n".join(lines)


def summary_rows(results: list[dict], ceilings: dict) -> list[dict]:
  rows = []
  for r in results:
    u = decode_utilisation(r, "ours")
    rows.append(summary_row("generate", r["name"], "ours decode bytes/s / memory bandwidth",
                            (u["weight_bytes"] + u["kv_bytes"]) / u["step_s"] / ceilings["best_bytes_per_s"], None,
                            "fraction", higher_is_better=True))
    rows.append(summary_row("generate", r["name"], "ours decode FLOP/s / matmul peak",
                            u["flops"] / u["step_s"] / ceilings["matmul_flops_per_s"], None, "fraction",
                            higher_is_better=True))
    t = r["times"]
    tokens = r["batch"] * r["new_tokens"]
    ours = tokens / statistics.median(t["ours"]["decode"]["wall"])
    hf = tokens / statistics.median(t["HF sdpa"]["decode"]["wall"]) if "HF sdpa" in t else None
    rows.append(summary_row("generate", r["name"], "greedy decode tokens/s (HF sdpa generate)", ours, hf, "tok/s",
                            higher_is_better=True, target=TARGETS[r["name"]]))
  return rows


def bench(args) -> None:
  import torch
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  if args.quick:
    args.warmup, args.repeats = 1, 3
  load_before = load_average()
  ceilings = [machine_ceilings(args.quick)]
  watch = Stopwatch()
  results = []
  for name in args.cases.split(","):
    print(f"{name}: building models and compiling", flush=True)
    impls = (args.slice_impls if name.startswith("3b") else args.impls).split(",")
    results.append(bench_case(name, impls, args.warmup, args.repeats, diagnose=not args.no_diagnose))
  elapsed, _ = watch.lap()
  load_after = load_average()
  ceilings.append(machine_ceilings(args.quick))

  command = command_line("bench_generate.py")
  case_lines = []
  for r in results:
    case_lines.append(f"- {r['name']}: batch {r['batch']}, {r['new_tokens']} new tokens, per row one image of grid "
                      f"{r['grid']} and text: prompts left-padded to {r['prompt_len']} tokens "
                      f"({r['valid_prompt'][0]}-{r['valid_prompt'][1]} real)")
  section = "\n".join([
      "## Generation on CPU: ours (jitted prefill + while_loop decode) vs transformers `generate`, float32", "",
      machine(), f"- command: `{command}` ({elapsed / 60:.1f} min)",
      f"- 1-minute load average before / after: {load_before:.1f} / {load_after:.1f} (the machine has {cores} "
      "cores; above that, other processes compete for them and wall times grow while CPU times barely change)",
      ceilings_line(*ceilings),
      "- weights: random (tests/models/hf_reference.py `hf_model`, float32), copied into ours with `ours_from_hf`; "
      "greedy, no EOS (HF: do_sample=False, min_new_tokens = max_new_tokens, use_cache=True)",
      *case_lines,
      "- 3b_slice: Qwen2.5-VL-3B widths, 2 decoder layers, 2 vision blocks (0 windowed, 1 full), vocabulary cut "
      "to 8192 rows (as tests/models/test_parity.py::test_3b_width_slice)",
      "- ours: `sampler.prefill` and `sampler.decode` timed separately with block_until_ready; HF: one `generate` "
      "call split at its first logits-processor call (prefill = the prompt forward; decode = the other "
      "new_tokens - 1 cached forwards). Decode tok/s = batch x new tokens / decode seconds for both",
      f"- {args.warmup} warm-up run(s) (the first compiles ours; HF generates 8 tokens), then {args.repeats} timed "
      f"rounds in which the implementations take turns; torch threads = {cores} unless marked; HF attention: tiny "
      f"{args.impls}, 3b_slice {args.slice_impls} (impl@N: torch with N threads)",
      "", tables(results, best_ceilings(*ceilings))])
  print("\n" + section)
  if args.markdown:
    write_markdown(args.markdown, section, MD_BEGIN, MD_END)
  write_json(args.json, summary_rows(results, best_ceilings(*ceilings)), command=command)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="tiny,3b_slice", help=f"comma-separated, of {', '.join(CASES)}")
  parser.add_argument("--impls", default="sdpa,eager,sdpa@1",
                      help="HF attention implementations for tiny, comma-separated; impl@N runs torch with N threads")
  parser.add_argument("--slice-impls", default="sdpa",
                      help="HF attention implementations for 3b_slice (eager costs ~30 s more per round there)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-diagnose", action="store_true", help="skip the where-the-time-goes measurements")
  parser.add_argument("--markdown", type=Path, help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds, quicker ceilings")
  parser.add_argument("--json", type=Path, help="write summary rows for bench_all.py here")
  args = parser.parse_args()
  os.chdir(REPO)
  bench(args)


if __name__ == "__main__":
  main()
