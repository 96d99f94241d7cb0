"""experiments/export.py: a trained run's checkpoint as a HF directory that transformers loads, computes the same
logits from (float32, a prompt with an image) and generates from; --dtype, the tokenizer files, and the errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from noisygrpo_jax.processing import chat_template, image as image_lib, tokenizer as tokenizer_lib
from noisygrpo_jax.training import loops, params as params_lib, setup
from tests.models import hf_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import export as export_lib  # pylint: disable=wrong-import-position
import sft  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The config of a 1-step SFT run of the tiny preset with the real presets' dtype policy: float32 trainable
  weights, a frozen vision tower stored in bfloat16 (so the export combines both parts and casts)."""
  config = sft.get_config("tiny")
  with config.unlocked():
    config.train.workdir = str(tmp_path_factory.mktemp("run"))
    config.vision_pretrain.steps = 0
    config.data.train_size, config.data.eval_size = 8, 2
    config.train.steps, config.train.prompts_per_step, config.train.eval_every = 1, 2, 0
    config.model.compute_dtype, config.optim.freeze_vision = "bfloat16", True
  loops.run_sft(config)
  return config


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """The directory the command line writes (newest step, the checkpoint's dtype)."""
  out = str(tmp_path_factory.mktemp("hf"))
  result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"),
                           f"--workdir={trained.train.workdir}", f"--out={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"exported step 1 of {trained.train.workdir}" in result.stdout
  return out


def our_policy(config):
  """(the run's tokenizer, its step-1 policy in float32), restored by the training code's own resume path."""
  run = loops.Run(config, "eval")
  assert run.step == 1 and set(run.state.frozen) == {"visual"}
  assert {x.dtype for x in jax.tree.leaves(run.state.frozen)} == {np.dtype(jnp.bfloat16)}
  params = params_lib.cast(params_lib.combine(run.state.params, run.state.frozen), "float32")
  return run.tokenizer, nnx.merge(run.setup.graphdef, params)


def test_transformers_loads_the_export_and_matches_our_logits(trained, exported):
  tokenizer, ours = our_policy(trained)
  example = setup.load_split(trained, "test")[0]
  messages = chat_template.vqa_messages(chat_template.cot_question(example["problem"]))

  # The image processor, tokenizer and chat template transformers reads give our processing's inputs.
  image_processor = transformers.AutoImageProcessor.from_pretrained(exported)
  vision = image_processor(images=[np.asarray(example["image"])], return_tensors="np")
  image_cfg = setup.image_config(trained, ours.config.vision)
  assert image_lib.config_from_hf(exported) == image_cfg.replace(pixel_dtype="float32")
  ours_vision = image_lib.process_image(example["image"], image_cfg.replace(pixel_dtype="float32"))
  np.testing.assert_array_equal(vision["image_grid_thw"], ours_vision.image_grid_thw)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert text == chat_template.render(messages, add_generation_prompt=True)
  text = chat_template.expand_vision_tokens(text, vision["image_grid_thw"])  # what the HF processor does
  ids = np.array([hf_tokenizer(text, add_special_tokens=False)["input_ids"]])
  [expected] = chat_template.encode_vqa_prompts(tokenizer, [example], [ours_vision.image_grid_thw])
  np.testing.assert_array_equal(ids[0], expected.input_ids)

  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32,
                                                                       attn_implementation="eager").eval()
  inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=vision["pixel_values"],
                image_grid_thw=vision["image_grid_thw"])
  with torch.no_grad():
    hf_logits = hf(**ref.hf_inputs(ours.config, **inputs)).logits.numpy()
  our_logits = np.asarray(ours.forward_hf(**inputs))
  assert np.abs(our_logits - hf_logits).max() <= 1e-4

  # generation_config.json: the run's sampling and stop tokens; greedy decoding starts with our argmax.
  generation = transformers.GenerationConfig.from_pretrained(exported)
  sampling = setup.sampling_params(trained, tokenizer)
  assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p) == (
      True, sampling.temperature, sampling.top_k, sampling.top_p)
  assert generation.eos_token_id == list(sampling.eos_ids) and generation.pad_token_id == tokenizer.pad_id
  with torch.no_grad():
    greedy = hf.generate(**ref.hf_inputs(ours.config, **inputs), do_sample=False, max_new_tokens=3)
    sampled = hf.generate(**ref.hf_inputs(ours.config, **inputs), max_new_tokens=3)
  assert int(greedy[0, ids.shape[1]]) == int(our_logits[0, -1].argmax())
  assert sampled.shape[0] == 1 and ids.shape[1] < sampled.shape[1] <= ids.shape[1] + 3


def test_bfloat16_export_rounds_the_float32_one(trained, exported, tmp_path):
  out = str(tmp_path / "bf16")
  assert export_lib.export(trained.train.workdir, out, step=1, dtype="bfloat16") == 1
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  with safe_open(os.path.join(exported, "model.safetensors"), framework="pt") as full, \
       safe_open(os.path.join(out, "model.safetensors"), framework="pt") as half:
    assert set(full.keys()) == set(half.keys())
    for key in full.keys():
      assert full.get_tensor(key).dtype == torch.float32 and half.get_tensor(key).dtype == torch.bfloat16, key
      assert torch.equal(half.get_tensor(key), full.get_tensor(key).to(torch.bfloat16)), key


def test_a_missing_step_or_run_names_the_path_and_the_fix(trained, tmp_path):
  workdir = trained.train.workdir
  with pytest.raises(FileNotFoundError, match=r"checkpoints/7: no checkpoint of step 7; the run holds steps \[1\]: "
                                              r"pass one of them as --step"):
    export_lib.export(workdir, str(tmp_path / "out"), step=7)
  with pytest.raises(FileNotFoundError, match=r"nowhere/config.json: no such file; --workdir must be a run's"):
    export_lib.export(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_config_json_older_than_todays_fields_loads_with_their_defaults(trained, tmp_path):
  with open(os.path.join(trained.train.workdir, "config.json")) as f:
    stored = json.load(f)
  del stored["lora"], stored["rl"]["filter_groups"]  # fields added after the run was written
  os.makedirs(tmp_path / "old")
  with open(tmp_path / "old" / "config.json", "w") as f:
    json.dump(stored, f)
  config = export_lib.load_run_config(str(tmp_path / "old"))
  assert config.lora.rank == 0 and config.rl.filter_groups == "none"
  assert config.train.workdir == str(tmp_path / "old")
  assert config.data.prompt_buckets == tuple(trained.data.prompt_buckets)  # the run's own values stay
  assert config.optim.freeze_vision and config.model.compute_dtype == "bfloat16"


def test_checkpoint_tokenizer_files_are_copied_and_a_template_added_only_when_missing(tmp_path):
  tokenizer = tokenizer_lib.word_level_tokenizer(["circle"], 64)
  source = tmp_path / "checkpoint"
  tokenizer.save(source)
  config = ml_collections.ConfigDict({"tokenizer": {"kind": "checkpoint"}, "model": {"checkpoint": str(source)}})
  (tmp_path / "plain").mkdir()
  export_lib.write_tokenizer(config, tokenizer, str(tmp_path / "plain"))
  assert sorted(os.listdir(tmp_path / "plain")) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
  assert (tmp_path / "plain" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
  assert (tmp_path / "plain" / "chat_template.jinja").read_text() == chat_template.QWEN2_5_VL_JINJA

  (source / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
  (tmp_path / "templated").mkdir()
  export_lib.write_tokenizer(config, tokenizer, str(tmp_path / "templated"))
  assert sorted(os.listdir(tmp_path / "templated")) == ["chat_template.json", "tokenizer.json",
                                                         "tokenizer_config.json"]
