"""Padding waste of the prompt-length and patch buckets (configs/noisygrpo.py data.prompt_buckets,
data.patch_buckets) on a mix of image sizes: the defaults against the previous ones.

The mix is a deterministic grid of 300 images: 20 areas from 224^2 to 1536^2 by 15 aspect ratios (height / width)
from 1/3 to 3, both geometric. Each goes through the real processing: `image.grid_thw` (smart_resize with the
config's min_pixels / max_pixels and the 3B vision tower's patch and merge sizes) gives its patches, and the
project's VQA prompt (chat template, reasoning instruction, the real Qwen2.5 tokenizer) around a typical question
gives its prompt tokens. Each example is padded alone (a batch of one) to the smallest bucket that holds it, as
`collate.pick_bucket` picks; waste = padded / real, summed over the mix. No timing: the figures are exact.

  python experiments/bench/bench_buckets.py [--markdown BENCHMARKS.md] [--json out.json]
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, machine, summary_row, write_json, write_markdown  # noqa: E402

from noisygrpo_jax.models.qwen2_5_vl import config as model_config  # noqa: E402
from noisygrpo_jax.processing import chat_template, collate  # noqa: E402
from noisygrpo_jax.processing import image as image_lib, tokenizer as tokenizer_lib  # noqa: E402
from noisygrpo_jax.processing.errors import PromptTooLongError  # noqa: E402
from noisygrpo_jax.training import setup  # noqa: E402

MD_BEGIN, MD_END = "<!-- bench_buckets:begin -->", "<!-- bench_buckets:end -->"
# The defaults before issue 19: 2x / 4x steps, and no prompt bucket for an image near max_pixels.
PREVIOUS = {"prompt": (64, 128, 256, 512, 1024, 2048), "patch": (64, 256, 1024, 4096, 16384)}
QUESTION = ("As shown in the figure, AB is the diameter of circle O and C is a point on the circle. If angle ABC is "
            "40 degrees, what is the measure of angle BAC?\nChoices:\nA: 40 degrees\nB: 50 degrees\nC: 60 degrees\n"
            "D: 80 degrees")
SIDES = np.geomspace(224, 1536, 20)  # square root of the area
ASPECTS = np.geomspace(1 / 3, 3, 15)  # height / width


def image_mix() -> list[tuple[int, int]]:
  """(height, width) of every area x aspect ratio of the grid."""
  return [(round(side * np.sqrt(aspect)), round(side / np.sqrt(aspect))) for side in SIDES for aspect in ASPECTS]


def measure(sizes: list[tuple[int, int]], image_config: image_lib.ImageProcessorConfig,
            tokenizer: tokenizer_lib.Tokenizer) -> list[tuple[int, int]]:
  """(prompt tokens, patches) of each image size with QUESTION."""
  out = []
  for height, width in sizes:
    grid = np.array([image_lib.grid_thw(height, width, image_config)])
    chat, = chat_template.encode_vqa_prompts(tokenizer, [{"problem": QUESTION}], [grid])
    out.append((len(chat), int(np.prod(grid))))
  return out


def pad(real: list[tuple[int, int]], prompt_buckets, patch_buckets) -> list[tuple[int, int] | None]:
  """The (prompt, patch) buckets collate picks for each example alone; None where the largest bucket is short."""
  out = []
  for tokens, patches in real:
    try:
      out.append((collate.pick_bucket(tokens, prompt_buckets, "prompt tokens", ""),
                  collate.pick_bucket(patches, patch_buckets, "image patches", "")))
    except PromptTooLongError:
      out.append(None)
  return out


def waste(real: list[tuple[int, int]], padded: list[tuple[int, int] | None], keep: list[bool]) -> dict:
  """Padded / real prompt tokens and patches summed over the kept examples, the worst single example, and the
  distinct bucket pairs they hit."""
  kept = [(r, p) for r, p, k in zip(real, padded, keep) if k]
  ratio = lambda i: sum(p[i] for _, p in kept) / sum(r[i] for r, _ in kept)
  worst = lambda i: max(p[i] / r[i] for r, p in kept)
  return {"examples": len(kept), "prompt": ratio(0), "patch": ratio(1), "prompt_worst": worst(0),
          "patch_worst": worst(1), "pairs": len({p for _, p in kept})}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="accepted for bench_all.py; the measurement is exact")
  parser.add_argument("--markdown", help="write the results into this file (e.g. BENCHMARKS.md)")
  parser.add_argument("--json", help="write summary rows for bench_all.py here")
  args = parser.parse_args()

  sys.path.insert(0, str(REPO / "configs"))
  import noisygrpo
  config = noisygrpo.get_config("qwen2_5_vl_3b")
  image_config = setup.image_config(config, model_config.qwen2_5_vl_3b().vision)
  tokenizer = tokenizer_lib.qwen2_5_tokenizer()
  current = {"prompt": tuple(config.data.prompt_buckets), "patch": tuple(config.data.patch_buckets)}
  sizes = image_mix()
  real = measure(sizes, image_config, tokenizer)
  before = pad(real, PREVIOUS["prompt"], PREVIOUS["patch"])
  after = pad(real, current["prompt"], current["patch"])
  held = [b is not None for b in before]
  everything = [True] * len(real)
  rows = [("previous", PREVIOUS, waste(real, before, held)), ("new", current, waste(real, after, everything)),
          (f"new, on the {sum(held)} examples the previous hold", current, waste(real, after, held))]

  tokens, patches = zip(*real)
  text = tokens[0] - patches[0] // image_config.merge_size**2  # the prompt's tokens besides the image's
  header = ("| buckets | prompt buckets | patch buckets | examples held | prompt tokens padded / real (worst example) "
            "| patches padded / real (worst example) | distinct (prompt, patch) bucket pairs |")
  lines = [header, "|---|---|---|---|---|---|---|"]
  for label, buckets, w in rows:
    lines.append(f"| {label} | {', '.join(map(str, buckets['prompt']))} | {', '.join(map(str, buckets['patch']))} "
                 f"| {w['examples']} / {len(real)} | {w['prompt']:.3f} ({w['prompt_worst']:.2f}) "
                 f"| {w['patch']:.3f} ({w['patch_worst']:.2f}) | {w['pairs']} |")
  print("\n".join(lines))
  command = command_line("bench_buckets.py")
  section = "\n".join([
      "## Prompt and patch buckets: padding waste on a mix of image sizes", "",
      machine(), f"- command: `{command}`",
      f"- mix: {len(sizes)} images, {len(SIDES)} areas from 224^2 to 1536^2 x {len(ASPECTS)} aspect ratios from 1:3 "
      f"to 3:1 (both geometric); smart_resize with min_pixels {image_config.min_pixels}, max_pixels "
      f"{image_config.max_pixels}, patch {image_config.patch_size}, merge {image_config.merge_size}: "
      f"{min(patches)} to {max(patches)} patches",
      f"- prompt: the VQA chat template (system message, image, question, reasoning instruction, generation "
      f"prompt) around the question `{QUESTION!r}`, real Qwen2.5 tokenizer: {text} tokens besides the image's, "
      f"{min(tokens)} to {max(tokens)} in all",
      "- each example padded alone (a batch of one) to the smallest bucket that holds it (`collate.pick_bucket`); "
      "padded / real summed over the examples held; an example over the largest bucket is refused "
      "(`PromptTooLongError`); every bucket pair hit is one compile of the rollout and update programs. A rollout "
      "batch pads all its rows to the buckets of its longest prompt and largest image, so a step's padding also "
      "depends on how its images differ; these figures are the buckets' own share",
      "", *lines])
  if args.markdown:
    write_markdown(Path(args.markdown), section, MD_BEGIN, MD_END)
  same = rows[2][2]
  write_json(args.json, [
      summary_row("buckets", f"prompt tokens, {same['examples']} examples", "padded / real (previous buckets)",
                  same["prompt"], rows[0][2]["prompt"], "x"),
      summary_row("buckets", f"patches, {same['examples']} examples", "padded / real (previous buckets)",
                  same["patch"], rows[0][2]["patch"], "x")], command=command)


if __name__ == "__main__":
  main()
