"""Forward-pass benchmark on CPU: our jitted Qwen2.5-VL vs transformers' PyTorch model (float32).

Both sides run the same weights (a random HF model saved with `save_pretrained` and read with `load_hf`)
on the same inputs: per row one image of grid (1, 28, 28) -> 196 merged tokens, and 64 text tokens.
Ours is timed three ways: the jitted forward on precomputed device inputs (device compute), the host
bookkeeping (`prepare_hf_inputs`: M-RoPE positions, window permutation, packing), and `forward_hf`
end to end. HF runs under torch.no_grad with eager and sdpa attention, torch threads = cores.

  python experiments/bench/bench_forward.py [--models tiny,3b_slice,3b_slice_full_vocab] [--batches 1,4]
                                            [--repeats 7] [--quick] [--markdown BENCHMARKS.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import config as cfg  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import load_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, slice_3b, summary_row, timed, write_json, write_markdown  # noqa: E402

GRID = (1, 28, 28)
TEXT_TOKENS = 64
MD_BEGIN, MD_END = "<!-- bench_forward:begin -->", "<!-- bench_forward:end -->"


MODELS = {"tiny": cfg.tiny, "3b_slice": lambda: slice_3b(8192),
          "3b_slice_full_vocab": lambda: slice_3b(cfg.TextConfig.vocab_size)}


def make_inputs(config: cfg.Qwen25VLConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-processor-style arrays: each row is text, <vision_start> image pads <vision_end>, text."""
  rng = np.random.default_rng(seed)
  pads = int(np.prod(GRID)) // config.vision.merge_unit
  text = lambda n: list(rng.integers(0, config.text.vocab_size - 8, n))
  rows = [text(TEXT_TOKENS // 2) + [config.vision_start_token_id] + [config.image_token_id] * pads
          + [config.vision_end_token_id] + text(TEXT_TOKENS - TEXT_TOKENS // 2 - 2) for _ in range(batch)]
  ids = np.asarray(rows, np.int64)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids),
              pixel_values=rng.standard_normal((batch * int(np.prod(GRID)), config.vision.patch_dim), np.float32),
              image_grid_thw=np.asarray([GRID] * batch, np.int64))


def hf_inputs(config: cfg.Qwen25VLConfig, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  out = {k: torch.from_numpy(v) for k, v in inputs.items()}
  # transformers 5 reads the M-RoPE token types from here (1 = image).
  out["mm_token_type_ids"] = (out["input_ids"] == config.image_token_id).long()
  return out


@torch.no_grad()
def hf_forward(model, inputs: dict[str, torch.Tensor]):
  return model(**inputs)


def bench_model(name: str, config: cfg.Qwen25VLConfig, batches: list[int], warmup: int, repeats: int) -> list[dict]:
  torch.manual_seed(0)
  hf_config = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(config))
  with tempfile.TemporaryDirectory() as path:
    transformers.Qwen2_5_VLForConditionalGeneration(hf_config).save_pretrained(path, safe_serialization=True)
    ours = load_hf(path)
    hf = {impl: transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation=impl, dtype=torch.float32).eval() for impl in ("eager", "sdpa")}
  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))

  results = []
  for batch in batches:
    inputs = make_inputs(config, batch)
    prepared = ours.prepare_hf_inputs(**inputs)
    prepared.pop("rope_deltas")  # for decoding only
    on_device = jax.device_put(prepared)
    torch_inputs = hf_inputs(config, inputs)
    reference = hf_forward(hf["eager"], torch_inputs).logits.numpy()
    max_diff = float(np.abs(np.asarray(forward(state, on_device)) - reference).max())
    fns = {
        "ours: device compute": lambda: forward(state, on_device).block_until_ready(),
        "ours: host bookkeeping": lambda: ours.prepare_hf_inputs(**inputs),
        "ours: forward_hf end to end": lambda: ours.forward_hf(**inputs).block_until_ready(),
        **{f"HF {impl}": functools.partial(hf_forward, model, torch_inputs) for impl, model in hf.items()},
    }
    row = dict(model=name, batch=batch, tokens=inputs["input_ids"].shape[1], max_diff=max_diff,
               times=timed(fns, warmup, repeats))
    results.append(row)
    print(f"{name} batch {batch}: done (max |logits diff| vs HF eager {max_diff:.1e})", flush=True)
  return results


def tables(results: list[dict]) -> str:
  ms = lambda s: f"{1e3 * s:.1f}"
  lines = ["| model | batch | tokens/row | implementation | wall median ms | wall min ms | wall max ms "
           "| CPU median ms |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    for impl, t in r["times"].items():
      lines.append(f"| {r['model']} | {r['batch']} | {r['tokens']} | {impl} | {ms(statistics.median(t['wall']))} "
                   f"| {ms(min(t['wall']))} | {ms(max(t['wall']))} | {ms(statistics.median(t['cpu']))} |")
  lines += ["", "Speed-up of ours = HF time / ours time (> 1: ours is faster), by wall median, wall min and CPU "
            "median; `compute` is ours on precomputed device inputs, `e2e` is `forward_hf`.", "",
            "| model | batch | HF eager / ours compute | HF sdpa / ours compute | HF sdpa / ours e2e "
            "| max abs logits diff vs HF |", "|---|---|---|---|---|---|"]
  for r in results:
    t = r["times"]
    ratio = lambda hf, ours: " / ".join(f"{stat(t[hf][kind]) / stat(t[ours][kind]):.2f}x" for kind, stat in
                                       (("wall", statistics.median), ("wall", min), ("cpu", statistics.median)))
    compute, e2e = "ours: device compute", "ours: forward_hf end to end"
    lines.append(f"| {r['model']} | {r['batch']} | {ratio('HF eager', compute)} | {ratio('HF sdpa', compute)} "
                 f"| {ratio('HF sdpa', e2e)} | {r['max_diff']:.1e} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="tiny,3b_slice", help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds")
  parser.add_argument("--markdown", type=Path, help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--json", type=Path, help="write summary rows for bench_all.py here")
  args = parser.parse_args()
  if args.quick:
    args.warmup, args.repeats = 1, 3

  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  batches = [int(b) for b in args.batches.split(",")]
  load_before = os.getloadavg()[0]
  results = []
  for name in args.models.split(","):
    results += bench_model(name, MODELS[name](), batches, args.warmup, args.repeats)

  merged = int(np.prod(GRID)) // cfg.VisionConfig.spatial_merge_size**2
  command = command_line("bench_forward.py")
  section = "\n".join([
      "## Forward pass on CPU: ours (JAX, jitted) vs transformers (PyTorch), float32", "",
      machine(), f"- command: `{command}`",
      f"- 1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} (other processes "
      "on the machine compete for the cores when it exceeds the core count)",
      f"- inputs per row: one image of grid {GRID} ({merged} merged tokens) + {TEXT_TOKENS} "
      "text tokens, no padding; random weights (HF init) shared by both sides via save_pretrained/load_hf",
      "- 3b_slice: Qwen2.5-VL-3B widths, 2 decoder layers, 2 vision blocks (0 windowed, 1 full), vocabulary cut "
      "to 8192 rows; 3b_slice_full_vocab: the same with the real 151936-row (tied) vocabulary",
      f"- {args.warmup} warm-up runs, then {args.repeats} timed rounds in which the implementations take turns; "
      f"torch threads = {cores}",
      "", tables(results)])
  print("\n" + section)
  if args.markdown:
    write_markdown(args.markdown, section, MD_BEGIN, MD_END)
  write_json(args.json, [summary_row("forward", f"{r['model']} batch {r['batch']}", "forward s (HF sdpa)",
                                     statistics.median(r["times"]["ours: device compute"]["wall"]),
                                     statistics.median(r["times"]["HF sdpa"]["wall"]), "s",
                                     target=1.2 if r["model"].startswith("3b") else None) for r in results],
             command=command)


if __name__ == "__main__":
  main()
