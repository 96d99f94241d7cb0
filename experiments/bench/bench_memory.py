"""The memory estimate (noisygrpo_jax/training/memory.py) against XLA's own figure, program by program.

A Qwen2.5-VL-3B-width slice (full hidden, MLP, head and vocabulary sizes; a few decoder layers and vision blocks,
one of them full-attention) in the real presets' dtype policy (float32 master weights and moments, bfloat16 compute,
frozen bf16 vision tower, remat), lowered and compiled on CPU with abstract inputs (nothing is allocated):
- the train step (`train_step.jit_train_step`: master, moments, frozen tower, gradients, activations),
- the reference log-probs (`train_step.logps_fn` on the bf16 reference and the shared tower),
- the rollouts' prefill + decode loop (`sampler.prefill`, `sampler.decode` on the bf16 rollout copy, its decoder
  layers unstacked as the trainer's is).
XLA's figure for a program is its arguments + outputs + temporaries - aliased bytes (`memory_analysis()`); prefill
and decode are one phase (the decode loop takes over the prefill's cache): the larger of the two programs' figures.
One case trains LoRA adapters (lora.rank 64 on every decoder projection) instead of the decoder and LM head.

`--presets` prints, instead, the estimate alone for the real presets (configs/noisygrpo.py qwen2_5_vl_3b and
qwen2_5_vl_7b) on one 80 GB GPU (79.6 GiB), full fine-tuning against LoRA (`PRESET_LORA`): nothing is compiled.

Usage: python experiments/bench/bench_memory.py [--markdown BENCHMARKS.md] [--smoke] [--presets]
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import command_line, machine, train_batch, write_markdown  # noqa: E402
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg  # noqa: E402
from noisygrpo_jax.sampling import sampler  # noqa: E402
from noisygrpo_jax.training import memory, optimizer as opt_lib, params as params_lib  # noqa: E402
from noisygrpo_jax.training import train_step as ts  # noqa: E402

GIB = 1024**3
MD_BEGIN, MD_END = "<!-- bench_memory:begin -->", "<!-- bench_memory:end -->"
# The compute dtypes compared, with float32 master weights: XLA:CPU runs a bfloat16 matmul by converting both sides
# to float32 (a float32 copy of every weight it multiplies, which no GPU or TPU makes), so the float32 rows check the
# estimate's structure and the bfloat16 rows show that CPU overhead.
POLICIES = {"float32": "", "bf16 compute": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Case:
  prompts: int
  group_size: int
  text_len: tuple[int, int]  # text tokens around the image
  grid: tuple[int, int, int]  # the image's patch grid (t, h, w)
  new_tokens: int
  micro_batches: int
  layers: int  # decoder layers of the slice
  lora_rank: int = 0  # LoRA adapters of this rank on every decoder projection train instead (0: full fine-tuning)


CASES = {
    "2 layers, 2 prompts x 4": Case(2, 4, (96, 97), (1, 32, 32), 128, 1, 2),
    "4 layers, 4 prompts x 4, 2 micro-batches": Case(4, 4, (96, 97), (1, 32, 32), 128, 2, 4),
    "2 layers, 1 prompt x 4, 4096 patches (query-chunked prompt)": Case(1, 4, (96, 97), (1, 64, 64), 128, 1, 2),
    "2 layers, 2 prompts x 4, LoRA rank 64": Case(2, 4, (96, 97), (1, 32, 32), 128, 1, 2, lora_rank=64),
}
PRESET_LORA = dict(rank=64, alpha=128.0)  # the LoRA rows of --presets: rank 64 on every decoder projection
H100_GIB = 79.6  # an 80 GB GPU's memory as JAX reports it (81,559 MiB)


def model_config(smoke: bool, layers: int, lora_rank: int = 0):
  """The 3B width with `layers` decoder layers and 4 vision blocks (the last full-attention), or the tiny model;
  with LoRA adapters of `lora_rank` (alpha 2 x rank) on every decoder projection when it is > 0."""
  lora = cfg.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank)
  if smoke:
    return cfg.tiny(dtype="float32", remat=True, lora=lora)
  base = cfg.qwen2_5_vl_3b(dtype="float32", remat=True, lora=lora)
  return base.replace(text=dataclasses.replace(base.text, num_hidden_layers=layers),
                      vision=dataclasses.replace(base.vision, depth=4, fullatt_block_indexes=(3,)))


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), tree)


def xla_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def lowered_programs(config, case: Case, compute: str) -> tuple[dict, int]:
  """The RL step's four programs lowered with abstract inputs (nothing is allocated), and the prompt length.

  Returns:
    ({"train step", "reference log-probs", "prefill", "decode"} -> a thunk returning the program's
    `jax.stages.Lowered`: tracing and lowering happen in the call, so a caller can time them), prompt tokens per row.
    Float32 master weights, `compute` ("" = float32) as the compute dtype.
  """
  rows = case.prompts * case.group_size
  graphdef, model_state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0))))
  trainable, frozen = params_lib.partition(nnx.to_pure_dict(model_state), freeze_vision=True,
                                           adapters_only=config.lora.rank > 0)
  as_dtype = lambda tree, dtype: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)
  compute_dtype = jnp.dtype(compute or "float32")
  frozen, copy = as_dtype(frozen, compute_dtype), as_dtype(trainable, compute_dtype)
  optimizer = opt_lib.make_optimizer(1e-6)
  state = ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                        opt_state=jax.eval_shape(optimizer.init, trainable), frozen=frozen)
  batch = abstract(train_batch(config, rows, case.grid, case.text_len, case.new_tokens))
  prompt_len = batch.input_ids.shape[1] - case.new_tokens
  loss_cfg = ts.LossConfig(compute_dtype=compute, group_size=case.group_size)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  state_sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
  step = ts.jit_train_step(ts.make_train_step(graphdef, optimizer, loss_cfg, case.micro_batches), state_sh,
                           ts.batch_shardings(batch, mesh), mesh)
  logps = jax.jit(ts.logps_fn(graphdef, loss_cfg.chunk_size, case.group_size))
  rollout = params_lib.combine(copy, frozen)
  # What the prefill and the decode loop read (loops.Run.rollout_params): the decoder layers unstacked.
  decoding = jax.eval_shape(lambda t, f: params_lib.rollout_copy(t, f, compute), trainable, frozen)
  decoding_graphdef = params_lib.rollout_graphdef(graphdef, rollout)
  prompts = sampler.PromptBatch(input_ids=jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32),
                                attention_mask=jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32),
                                position_ids=jax.ShapeDtypeStruct((3, rows, prompt_len), jnp.int32),
                                rope_deltas=jax.ShapeDtypeStruct((rows, 1), jnp.int32), vision=batch.vision)
  params = sampler.SamplingParams(max_new_tokens=case.new_tokens, eos_ids=(151645,), pad_id=151643)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

  def decode():
    decode_state = jax.eval_shape(sampler.prefill, decoding_graphdef, decoding, prompts, key, params)
    return sampler.decode.lower(decoding_graphdef, decoding, decode_state, prompt_len, params)

  return {"train step": lambda: step.lower(state, batch),
          "reference log-probs": lambda: logps.lower(rollout, batch),
          "prefill": lambda: sampler.prefill.lower(decoding_graphdef, decoding, prompts, key, params),
          "decode": decode}, prompt_len


def measure(config, case: Case, compute: str) -> dict:
  """Estimate and XLA figure (bytes) of each program, and compile seconds (prefill and decode are one phase: the
  decode loop takes over the prefill's cache, so its figure is the larger of the two programs')."""
  times, xla = {}, {}
  programs, prompt_len = lowered_programs(config, case, compute)
  for name, lower in programs.items():
    t0 = time.perf_counter()
    xla[name] = xla_bytes(lower().compile())
    times[name] = time.perf_counter() - t0
  xla["prefill + decode"] = max(xla.pop("prefill"), xla.pop("decode"))
  times["prefill + decode"] = times.pop("prefill") + times.pop("decode")
  rows = case.prompts * case.group_size
  run = memory.RunShape(rows=rows, prompt_len=prompt_len, max_new_tokens=case.new_tokens,
                        patches=int(np.prod(case.grid)), micro_batches=case.micro_batches,
                        group_size=case.group_size, freeze_vision=True, reference=True, compute_dtype=compute,
                        logits_chunk=ts.LossConfig().chunk_size)
  est = memory.estimate(config, run, {"data": 1, "fsdp": 1, "tensor": 1}).programs()
  return {"rows": rows, "prompt_len": prompt_len, "patches": int(np.prod(case.grid)), "estimate": est, "xla": xla,
          "compile_s": times}


def table(results: list[tuple[str, str, object, dict]]) -> list[str]:
  """results: (case, policy, model config, `measure` output)."""
  lines = ["| case | compute | program | estimate (GiB) | XLA (GiB) | estimate / XLA | compile (s) |",
           "|---|---|---|---|---|---|---|"]
  for case, policy, _, r in results:
    for program, xla in r["xla"].items():
      est = r["estimate"][program]
      lines.append(f"| {case}: {r['rows']} rows, prompt {r['prompt_len']}, {r['patches']} patches | {policy} | "
                   f"{program} | "
                   f"{est / GIB:.2f} | {xla / GIB:.2f} | {est / xla:.2f} | {r['compile_s'][program]:.1f} |")
  return lines


def preset_lines() -> list[str]:
  """The estimate of the real presets' runs on one 80 GB GPU, full fine-tuning and LoRA (`PRESET_LORA`), as a
  markdown table: micro-batch counts chosen as a run chooses them (setup.check_memory)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
  import noisygrpo  # pylint: disable=import-outside-toplevel
  from noisygrpo_jax.training import setup  # pylint: disable=import-outside-toplevel
  mesh, limit = {"data": 1, "fsdp": 1, "tensor": 1}, int(H100_GIB * GIB)
  lines = ["| model | training | peak estimate (GiB) | persistent (GiB) | train / prefill micro-batches | "
           "trainable parameters | largest terms (GiB) |", "|---|---|---|---|---|---|---|"]
  for preset in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
    for lora in ({}, PRESET_LORA):
      config = noisygrpo.get_config(preset)
      for field, value in lora.items():
        setattr(config.lora, field, value)
      model_cfg = setup.model_config(config, tokenizer=None)
      run = setup.run_shape(config, model_cfg.vision)
      micro, prefill = memory.fewest_parts(model_cfg, run, mesh, limit)
      est = memory.estimate(model_cfg, dataclasses.replace(run, micro_batches=micro, prefill_micro_batches=prefill),
                            mesh)
      counts = memory.parameter_counts(model_cfg)
      trainable = counts["adapters"] if lora else counts["text"]
      fits = "fits" if est.peak <= limit else "refused"
      largest = ", ".join(f"{label} {n / GIB:.1f}" for label, n in sorted(est.rows(), key=lambda r: -r[1])[:3])
      training = f"LoRA rank {lora['rank']}" if lora else "full (decoder + LM head)"
      lines.append(f"| {preset} | {training} | {est.peak / GIB:.1f} ({fits}) | {est.persistent / GIB:.1f} | "
                   f"{micro} / {prefill} | {trainable / 1e6:.0f}M | {largest} |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--markdown", default="", help="write the section into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--smoke", action="store_true", help="the tiny model: checks the script on CPU in seconds")
  parser.add_argument("--presets", action="store_true", help="only the real presets' estimates, full vs LoRA")
  args = parser.parse_args()
  if args.presets:
    print("\n".join(preset_lines()))
    return
  results = []
  for name, case in CASES.items():
    if args.smoke:
      case = dataclasses.replace(case, grid=(1, 8, 8), text_len=(4, 8), new_tokens=8)
    config = model_config(args.smoke, case.layers, case.lora_rank)
    for policy, compute in POLICIES.items():
      results.append((name, policy, config, measure(config, case, compute)))
  t, v = results[0][2].text, results[0][2].vision
  lines = [f"Model: {'tiny (smoke)' if args.smoke else 'Qwen2.5-VL-3B width'} (hidden {t.hidden_size}, MLP "
           f"{t.intermediate_size}, {t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, vocabulary "
           f"{t.vocab_size}, tied embeddings), {v.depth} vision blocks (full attention: "
           f"{list(v.fullatt_block_indexes)}), frozen vision tower, remat; {case.new_tokens} new tokens.", "",
           *table(results)]
  print("\n".join(lines))
  if args.markdown:
    section = "\n".join([
        "## Memory: the estimate against XLA's memory analysis", "",
        f"`{command_line('bench_memory.py')}`: CPU, abstract inputs (nothing allocated), XLA's memory-optimised "
        "CPU scheduler (as GPU schedulers are). XLA's figure: arguments + outputs + temporaries - aliased bytes of "
        "the compiled program (prefill + decode: the larger of the two). The float32 rows check the estimate; the "
        "bf16-compute rows also hold XLA:CPU's float32 copies of the bf16 operands of every matmul (no GPU or TPU "
        "makes them), which the estimate, written for accelerators, does not count.", machine(), "", *lines])
    write_markdown(Path(args.markdown), section, MD_BEGIN, MD_END)


if __name__ == "__main__":
  main()
