"""`make bench-gpu` (experiments/bench/bench_gpu.py): its --smoke mode runs every part on CPU importing only what the
GPU machines have, and its copy of the 3B preset's numbers is the preset's."""

import importlib.util
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

from configs import noisygrpo
from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.training import optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "bench_gpu.py"
# Missing on the GPU machines (ml_collections, tensorflow-datasets, array-record, grain, tensorboardX), or present
# there but outside what the script may need (torch, tqdm, sentence-transformers, clu). Pillow stays: the sampler and
# train step import noisygrpo_jax.processing, whose image module needs it, and the GPU machines have it.
ABSENT = ("ml_collections", "tensorflow", "tensorflow_datasets", "array_record", "grain", "tensorboardX", "torch",
          "tqdm", "sentence_transformers", "clu")
# Runs a script with the ABSENT top-level packages made unimportable: argv = absent names (comma-separated), script,
# its arguments.
RUNNER = """
import importlib.abc, runpy, sys
absent = set(sys.argv[1].split(","))

class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.partition(".")[0] in absent:
      raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machines)")
    return None

sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def numbers(tree):
  """Every int and float (not bool) of a JSON tree."""
  if isinstance(tree, dict):
    for value in tree.values():
      yield from numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from numbers(value)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def load_script():
  spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve the script's string annotations through it
  spec.loader.exec_module(module)
  return module


def test_smoke_runs_every_part_without_the_packages_the_gpu_machines_lack(tmp_path):
  out = tmp_path / "bench_gpu.json"
  proc = subprocess.run([sys.executable, "-c", RUNNER, ",".join(ABSENT), str(SCRIPT), "--smoke", "--decode-repeats",
                         "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  results = json.loads(out.read_text())
  assert results["failures"] == []
  for part in ("device", "sanity", "decode", "rl"):
    values = list(numbers(results[part]))
    assert values and all(math.isfinite(v) for v in values), (part, results[part])
  assert results["sanity"]["passed"] and results["sanity"]["decode_kernel"]["relative_error"] < 0.02
  decode, rl = results["decode"], results["rl"]
  assert set(decode) == {"unstacked", "einsum", "scan", "unstacked_over_scan", "unstacked_over_einsum"}
  assert decode["unstacked_over_scan"] > 0 and decode["unstacked_over_einsum"] > 0
  # --smoke forces the Pallas decode kernel (interpreted on CPU), which "auto" takes on GPU only
  for variant, layers, attention in (("unstacked", "unstacked", "pallas"), ("einsum", "unstacked", "einsum"),
                                     ("scan", "scan", "pallas")):
    d = decode[variant]
    assert (d["layers"], d["attention"]) == (layers, attention) and d["tokens_per_s"] > 0
    assert 0 < d["hbm_roofline_fraction"] <= d["hbm_roofline_fraction_all_slots"]
  assert set(rl["seconds"]) == {"host", "rollout_copy", "prefill", "decode", "reward", "reference", "train", "step"}
  assert sum(v for k, v in rl["seconds"].items() if k != "step") <= rl["seconds"]["step"]
  assert rl["mfu"]["step"] > 0 and rl["peak_memory_bytes"] > 0 and rl["estimate_peak_bytes"] > 0
  assert rl["skipped"] == 0


def test_recipe_is_the_3b_preset():
  bench = load_script()
  c = noisygrpo.get_config("qwen2_5_vl_3b")
  recipe = bench.Recipe()
  assert c.model.preset == "qwen2_5_vl_3b"
  assert {k: getattr(recipe, k) for k in (
      "prompts", "group_size", "noise_levels", "advantage", "r_value", "p_alpha", "max_new_tokens", "temperature",
      "top_k", "decode_kernel", "beta", "learning_rate", "steps", "dtype", "compute_dtype", "remat", "scan_layers", "min_pixels",
      "max_pixels", "prompt_buckets", "patch_buckets")} == dict(
          prompts=c.train.prompts_per_step, group_size=c.rl.group_size, noise_levels=tuple(c.rl.noise.levels),
          advantage=c.rl.advantage, r_value=c.rl.r_value, p_alpha=c.rl.p_alpha, max_new_tokens=c.rl.max_new_tokens,
          temperature=c.rl.temperature, top_k=c.rl.top_k, decode_kernel=c.rl.decode_kernel, beta=c.rl.beta, learning_rate=c.optim.learning_rate,
          steps=c.train.steps, dtype=c.model.dtype, compute_dtype=c.model.compute_dtype, remat=c.model.remat,
          scan_layers=c.model.scan_layers, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels,
          prompt_buckets=tuple(c.data.prompt_buckets), patch_buckets=tuple(c.data.patch_buckets))
  # What the script leaves to the library's defaults or sets without a Recipe field.
  examples = bench.make_examples(bench.SMOKE_RECIPE, 0)
  tokenizer = bench.word_tokenizer(examples, 512)
  rollout = bench.rollout_config(recipe, tokenizer, bench.with_token_ids(cfg.tiny(), tokenizer), 0)
  assert (rollout.noise_enabled, rollout.noise_schedule, rollout.noise_quantize, rollout.noise_anneal,
          rollout.mask_noise_correct, rollout.sampling.top_p, rollout.max_prompt_tokens) == (
              c.rl.noise.enabled, c.rl.noise.schedule, c.rl.noise.quantize, c.rl.noise.anneal, c.rl.mask_noise_correct,
              c.rl.top_p, c.data.max_prompt_tokens)
  loss = train_step.LossConfig()
  assert (loss.kl_estimator, loss.eps_low, loss.eps_high, loss.aggregation) == (
      c.rl.kl_estimator, c.rl.eps_low, c.rl.eps_high, c.rl.aggregation)
  adamw = {k: p.default for k, p in inspect.signature(optimizer.make_optimizer).parameters.items() if k != "schedule"}
  assert adamw == dict(weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                       max_grad_norm=c.optim.max_grad_norm)
  assert (c.optim.warmup_steps, c.optim.decay, c.optim.freeze_vision, c.rl.num_iterations) == (0, "linear", True, 1)
  assert (c.train.micro_batches, c.rl.prefill_micro_batches) == (0, 0)  # chosen by the memory plan, as the script does
