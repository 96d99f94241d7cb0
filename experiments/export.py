"""Export a run's checkpoint as a HF Qwen2.5-VL directory that transformers loads and generates from.

  python experiments/export.py --workdir=workdir/default/noisygrpo_seed42 --out=exported/noisygrpo [--step=N] \
      [--dtype=bfloat16|float32]

The directory holds config.json and model.safetensors (`save_hf`), the run's tokenizer with the Qwen2.5-VL chat
template, preprocessor_config.json (the run's image resize budget: data.min_pixels / data.max_pixels) and
generation_config.json (the run's sampling: rl.temperature, rl.top_k, rl.top_p, rl.max_new_tokens, the eos and pad
ids). Each file is written to a temporary file and renamed into place.
"""

import json
import os
import shutil

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx
from jax.sharding import SingleDeviceSharding

import cli  # noqa: F401  (puts configs/ and the repository on sys.path)
import noisygrpo  # configs/noisygrpo.py
from noisygrpo_jax import atomic_io
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, save_hf
from noisygrpo_jax.processing import chat_template, image as image_lib, tokenizer as tokenizer_lib
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import loops, setup

flags.DEFINE_string("workdir", None, "The run's train.workdir: its config.json and checkpoints/.")
flags.DEFINE_string("out", None, "Directory to write the HF checkpoint into (created; same-named files replaced).")
flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest complete one.")
flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Weight dtype; default: the checkpoint's (model.dtype).")
FLAGS = flags.FLAGS

# The files of a HF tokenizer that a tokenizer.kind="checkpoint" run copies from model.checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")
# transformers >= 4.50 reads a tokenizer's or processor's template from this file (chat_template.json and a
# "chat_template" entry of tokenizer_config.json are the older places, still read).
CHAT_TEMPLATE_FILE = "chat_template.jinja"



def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json a run wrote into `workdir`, with train.workdir pointing at `workdir` (where the run is now).

  Fields the run's config.json predates (written by an older version of the code) keep today's defaults
  (`configs/noisygrpo.py:base_config`, which the SFT and GRPO configs extend).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; --workdir must be a run's train.workdir (it holds config.json "
                            "and checkpoints/, written by experiments/train.py or sft.py)")
  config = noisygrpo.base_config()
  with open(path) as f:
    config.update(json.load(f))
  config.train.workdir = workdir
  return config


def run_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer (`setup.build_tokenizer`); a word-level one must be the one the run saved, never rebuilt."""
  saved = os.path.join(config.train.workdir, "tokenizer", "tokenizer.json")
  if config.tokenizer.kind == "word" and not os.path.isfile(saved):
    raise FileNotFoundError(f"{saved}: no such file; a tokenizer.kind='word' run keeps the tokenizer it was trained "
                            "with there. Copy the run's tokenizer/ folder back into --workdir")
  return setup.build_tokenizer(config, train_examples=())


def checkpoint_step(checkpoints, step: int | None) -> int:
  """`step`, or the newest complete step when None; raises FileNotFoundError naming the directory and the fix."""
  steps = sorted(checkpoints.manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"{checkpoints.directory}: no complete checkpoint; train the run first (a save cut short "
                            "leaves only a *.orbax-checkpoint-tmp directory) or point --workdir at another run")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{os.path.join(checkpoints.directory, str(step))}: no checkpoint of step {step}; the run "
                            f"holds steps {steps}: pass one of them as --step, or leave --step out for the newest")
  return step


def restore_model(config, tokenizer, step: int | None, dtype: str) -> tuple[Qwen25VL, int]:
  """(the run's model holding checkpoint `step`'s parameters, trainable and frozen, all in `dtype`, on one device;
  the step). `step` None: the newest."""
  checkpoints_dir = os.path.join(config.train.workdir, "checkpoints")
  if not os.path.isdir(checkpoints_dir):
    raise FileNotFoundError(f"{checkpoints_dir}: no such directory; --workdir must be a run's train.workdir that "
                            "has saved a checkpoint")
  architecture = setup.model_config(config, tokenizer).replace(dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(architecture, nnx.Rngs(0))))
  device = SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(state))
  fix = f"export with the code and configuration that trained the run in {config.train.workdir!r}"
  checkpoints = loops.other_run_checkpoints(config.train.workdir)
  try:
    step = checkpoint_step(checkpoints, step)
    params = checkpoints.restore_params(step, abstract, fix)
  finally:
    checkpoints.close()
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), step


def write_json(path: str, content: dict) -> None:
  atomic_io.write_text_atomically(path, json.dumps(content, indent=2) + "\n")


def copy_file(source: str, target: str) -> None:
  with open(source, "rb") as f:
    atomic_io.replace_atomically(target, lambda out: shutil.copyfileobj(f, out))


def has_chat_template(directory: str) -> bool:
  """Whether a HF tokenizer directory carries a chat template in any of the places transformers reads."""
  if any(os.path.isfile(os.path.join(directory, name)) for name in (CHAT_TEMPLATE_FILE, "chat_template.json")):
    return True
  config = os.path.join(directory, "tokenizer_config.json")
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    return "chat_template" in json.load(f)


def write_tokenizer(config, tokenizer: tokenizer_lib.Tokenizer, out: str) -> None:
  """The run's tokenizer files in `out` (those of model.checkpoint for tokenizer.kind="checkpoint"), with the
  Qwen2.5-VL chat template when they have none."""
  if config.tokenizer.kind == "checkpoint":
    for name in TOKENIZER_FILES:
      source = os.path.join(config.model.checkpoint, name)
      if os.path.isfile(source):
        copy_file(source, os.path.join(out, name))
  else:
    tokenizer.save(out)
  if not has_chat_template(out):
    atomic_io.write_text_atomically(os.path.join(out, CHAT_TEMPLATE_FILE), chat_template.QWEN2_5_VL_JINJA)


def preprocessor_config(image: image_lib.ImageProcessorConfig) -> dict:
  """HF Qwen2VLImageProcessor settings equal to `image` (`image_lib.config_from_hf` reads them back)."""
  return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
          "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": list(image.image_mean), "image_std": list(image.image_std),
          "min_pixels": image.min_pixels, "max_pixels": image.max_pixels,
          "size": {"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
          "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size,
          "merge_size": image.merge_size}


def generation_config(params: sampler.SamplingParams) -> dict:
  """HF generation settings of the run's rollout sampling (pass do_sample=False for the greedy evaluation's)."""
  return {"do_sample": not params.greedy, "temperature": params.temperature, "top_k": params.top_k,
          "top_p": params.top_p, "max_new_tokens": params.max_new_tokens, "eos_token_id": list(params.eos_ids),
          "pad_token_id": params.pad_id}


def export(workdir: str, out: str, step: int | None = None, dtype: str = "") -> int:
  """Writes checkpoint `step` (default: the newest) of the run in `workdir` as a HF directory `out`, its weights in
  `dtype` ("" = model.dtype, the dtype the run keeps its trained weights in); returns the step written."""
  config = load_run_config(workdir)
  tokenizer = run_tokenizer(config)
  model, step = restore_model(config, tokenizer, step, dtype or config.model.dtype)
  os.makedirs(out, exist_ok=True)
  save_hf(model, out)
  write_tokenizer(config, tokenizer, out)
  write_json(os.path.join(out, "preprocessor_config.json"),
             preprocessor_config(setup.image_config(config, model.config.vision)))
  write_json(os.path.join(out, "generation_config.json"), generation_config(setup.sampling_params(config, tokenizer)))
  return step


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  step = export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.dtype)
  print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
