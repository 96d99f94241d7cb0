"""Bad input across the pipeline (issue #9): each error names the example or file and says the fix.

Already covered elsewhere and not repeated here: missing, unreadable and garbage image paths and bad in-memory
images (tests/processing/test_errors.py); every kind of bad JSONL row through the direct reader, missing fields
included (tests/data/test_local_vqa.py); rl.group_size vs noise levels through the CLI (tests/training/test_loop.py).
"""

import importlib.util
import logging
import math
import os
import struct
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from noisygrpo_jax.data.loading import load_split, prepare_builder
from noisygrpo_jax.data.records import DataError
from noisygrpo_jax.models.qwen2_5_vl import config as model_config
from noisygrpo_jax.processing import chat_template, errors, image as image_lib, tokenizer as tokenizer_lib
from noisygrpo_jax.rl import objective, rewards
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import rollouts, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_FIX = "Re-download or re-encode the file, or drop this example"


def _run_config(**overrides):
  """configs/noisygrpo.py:tiny with `section__field=value` overrides."""
  spec = importlib.util.spec_from_file_location("noisygrpo_config", os.path.join(ROOT, "configs", "noisygrpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in overrides.items():
    *sections, field = key.split("__")
    target = config
    for section in sections:
      target = getattr(target, section)
    setattr(target, field, value)
  return config


# ------------------------------------------------------------------------------------------------
# A1. Corrupt, truncated and zero-size image files.


def _png_with_zero_width(path):
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)  # width 0, height 5, 8-bit RGB
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                   + chunk(b"IEND", b""))


def _bad_image(folder, kind):
  """Writes one bad image file of `kind` into `folder`; returns its path."""
  path = folder / f"{kind}.{'jpg' if kind == 'truncated_jpg' else 'png'}"
  if kind == "zero_bytes":
    path.write_bytes(b"")
  elif kind == "zero_width":
    _png_with_zero_width(path)
  else:
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return path


BAD_IMAGES = ["zero_bytes", "zero_width", "truncated_png", "truncated_jpg"]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_file_names_the_file_and_the_fix(tmp_path, kind):
  path = _bad_image(tmp_path, kind)
  with pytest.raises(errors.ImageLoadError) as info:
    image_lib.process_image(str(path), source="example q7")
  message = str(info.value)
  assert message.startswith(f"example q7 ({path}): ") and message.endswith(IMAGE_FIX), message


def _vqa_folder(tmp_path, bad_rows):
  """A JSONL file with two good rows, then `bad_rows` (dicts) on lines 3, 4, ...; images in tmp_path/images."""
  images = tmp_path / "images"
  images.mkdir()
  PIL.Image.new("RGB", (30, 20), (255, 0, 0)).save(images / "red.png")
  for kind in BAD_IMAGES:
    _bad_image(images, kind)
  rows = [{"image": "red.png", "problem": "What colour?", "solution": "red"}] * 2 + bad_rows
  jsonl = tmp_path / "train.jsonl"
  jsonl.write_text("".join(f"{row}\n".replace("'", '"') for row in rows))
  return jsonl, images


@pytest.mark.parametrize("kind", BAD_IMAGES + ["missing_field"])
def test_local_vqa_bad_row_names_file_line_and_fix(tmp_path, kind):
  image = {"truncated_jpg": "truncated_jpg.jpg"}.get(kind, f"{kind}.png")
  row = ({"image": "red.png", "problem": "q"} if kind == "missing_field"
         else {"image": image, "problem": "q", "solution": "a"})
  jsonl, images = _vqa_folder(tmp_path, [row])
  with pytest.raises(DataError) as info:
    load_split("local_vqa", "train", tmp_path / "tfds", files=str(jsonl), image_root=str(images))
  message = str(info.value)
  assert message.startswith(f"{jsonl}, line 3: "), message
  assert "data.skip_bad_rows=True" in message
  if kind == "missing_field":
    assert "missing field(s) solution" in message and "Every row needs image" in message
  else:
    assert f"{images / image} is not a readable image" in message and "Re-encode or replace the image" in message


def test_local_vqa_skips_and_counts_bad_image_rows(tmp_path, caplog):
  bad = [{"image": f"{kind}.{'jpg' if kind == 'truncated_jpg' else 'png'}", "problem": "q", "solution": "a"}
         for kind in BAD_IMAGES]
  jsonl, images = _vqa_folder(tmp_path, bad)
  options = dict(files=str(jsonl), image_root=str(images), skip_bad_rows=True)
  with caplog.at_level(logging.WARNING):
    split = load_split("local_vqa", "train", tmp_path / "tfds", **options)
  assert len(split) == 2 and all(ex["solution"] == "red" for ex in split)
  assert prepare_builder("local_vqa", tmp_path / "tfds", **options).info.metadata["skipped_rows"] == {"train": 4}
  caplog.clear()  # a later run reads the prepared copy and still reports the count
  with caplog.at_level(logging.WARNING, logger="noisygrpo_jax.data.loading"):
    load_split("local_vqa", "train", tmp_path / "tfds", **options)
  assert "4 bad rows were skipped" in caplog.text and "2 examples remain" in caplog.text


# ------------------------------------------------------------------------------------------------
# A3. Prompts over the length budget.

WORDS = "What colour is the shape ? Describe every detail of it".split()
VISION = model_config.small().vision  # the tiny run config's tower


def _tokenizer():
  return tokenizer_lib.word_level_tokenizer(
      tokenizer_lib.word_level_vocabulary([" ".join(WORDS), chat_template.COT_INSTRUCTION]), 256)


def _examples(image_side=56):
  image = np.full((image_side, image_side, 3), 200, np.uint8)
  long_question = "Describe every detail of it " * 20 + "What colour is the shape ?"
  return [{"id": "short1", "image": image, "problem": "What colour is the shape ?", "solution": "red"},
          {"id": "long2", "image": image, "problem": long_question, "solution": "blue"}]


def _grids(examples, config):
  return [image_lib.process_image(ex["image"], setup.image_config(config, VISION)).image_grid_thw for ex in examples]


def test_prompt_over_budget_names_the_example_and_the_fix():
  config = _run_config(data__max_prompt_tokens=96)
  tok, examples = _tokenizer(), _examples()
  cfg = setup.rollout_config(config, tok, VISION)
  with pytest.raises(errors.PromptTooLongError) as info:
    rollouts.encode_prompts(tok, cfg, examples, _grids(examples, config))
  message = str(info.value)
  assert message.startswith("example long2: the tokenised chat is ") and "max_length=96" in message
  for fix in ("data.max_prompt_tokens", "data.max_pixels", "data.truncate_prompts=True"):
    assert fix in message, message


def test_largest_prompt_bucket_is_the_budget_without_max_prompt_tokens():
  config = _run_config(data__max_prompt_tokens=0, data__prompt_buckets=(64, 100))
  cfg = setup.rollout_config(config, _tokenizer(), VISION)
  assert rollouts.prompt_budget(cfg) == 100
  assert rollouts.prompt_budget(setup.rollout_config(_run_config(data__max_prompt_tokens=80), _tokenizer(), VISION)) == 80
  with pytest.raises(errors.PromptTooLongError, match="example long2: .*max_length=100"):
    rollouts.encode_prompts(_tokenizer(), cfg, _examples(), _grids(_examples(), config))


def test_truncate_prompts_cuts_only_the_question_and_counts():
  config = _run_config(data__max_prompt_tokens=96, data__truncate_prompts=True)
  tok, examples = _tokenizer(), _examples()
  chats = rollouts.encode_prompts(tok, setup.rollout_config(config, tok, VISION), examples, _grids(examples, config))
  short, long = chats
  assert short.num_truncated == 0 and len(short) < 96
  assert long.num_truncated > 0 and len(long) == 96  # the longest question prefix that fits
  text = tok.decode(long.input_ids)
  assert text.startswith("<|im_start|>system") and "Describe every" in text
  assert "final answer inside<answer></answer>.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
  assert long.num_vision_tokens == short.num_vision_tokens == 4


def test_truncation_cannot_cut_the_image():
  config = _run_config(data__max_prompt_tokens=64, data__truncate_prompts=True, data__max_pixels=112 * 112)
  tok, examples = _tokenizer(), _examples(image_side=112)  # 16 vision tokens + template = 70 > 64
  with pytest.raises(errors.PromptTooLongError) as info:
    rollouts.encode_prompts(tok, setup.rollout_config(config, tok, VISION), examples, _grids(examples, config))
  message = str(info.value)
  assert message.startswith("example short1: even with its question cut away the prompt is ")
  assert "data.max_pixels" in message and "data.truncate_prompts" not in message


# ------------------------------------------------------------------------------------------------
# A4. Empty completions; A5. reward functions that raise or return NaN / inf.


def test_empty_completions_score_zero_with_every_reward_function():
  names = sorted(rewards.REWARD_FUNCTIONS)  # the semantic accuracy returns 0 before loading its model
  scores, total, failures = rewards.combine_rewards([""] * 3, ["red", "Yes", "B"],
                                                    ["q", rewards.YES_NO_TRIGGER, "choices: A B"], names)
  assert not scores.any() and not total.any() and failures == {name: 0 for name in names}


def test_failing_and_non_finite_rewards_score_zero_and_are_counted(caplog):
  def flaky(completion, solution, question):
    return {"boom": lambda: 1 / 0, "nan": lambda: math.nan, "inf": lambda: -math.inf}.get(completion, lambda: 1.0)()

  with caplog.at_level(logging.WARNING, logger=rewards.__name__):
    scores, total, failures = rewards.combine_rewards(["ok", "boom", "nan", "inf"], ["x"] * 4, ["q"] * 4,
                                                      ["format", flaky])
  assert scores[:, 1].tolist() == [1.0, 0.0, 0.0, 0.0] and np.isfinite(total).all()
  assert failures == {"format": 0, "flaky": 3}
  assert "rollout 2 (scored 0): returned the non-finite value nan" in caplog.text
  assert "ZeroDivisionError" in caplog.text


def test_reward_failing_on_every_rollout_names_function_and_example():
  def broken(completion, solution, question):
    raise FileNotFoundError("model directory /models/bem missing")

  with pytest.raises(rewards.RewardFunctionError) as info:
    rewards.combine_rewards(["<think>a</think><answer>red</answer>", "x"], ["red"] * 2, ["q"] * 2,
                            ["format", broken])
  message = str(info.value)
  assert message.startswith("reward function 'broken' failed on all 2 rollouts (FileNotFoundError: model")
  assert "'<think>a</think><answer>red</answer>'" in message and "rl.rewards" in message
  with pytest.raises(rewards.RewardFunctionError, match="non-finite value nan"):
    rewards.combine_rewards(["a", "b"], ["x"] * 2, ["q"] * 2, [lambda c, s, q: math.nan])


def test_rollouts_with_immediate_eos_train_and_report_failures_and_truncations(monkeypatch):
  """A sampler that stops every rollout at once (EOS first, or nothing at all): rewards 0, finite metrics, and the
  step's metrics count the reward failures per function and the truncated prompts."""
  tok, examples = _tokenizer(), _examples()
  config = _run_config(data__max_prompt_tokens=96, data__truncate_prompts=True, rl__max_new_tokens=5,
                       data__prompt_buckets=(96,), rl__rewards=("accuracy_normalized", "format", "flaky"))
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "flaky", lambda c, s, q: math.nan if s == "blue" else 0.5)
  cfg = setup.rollout_config(config, tok, VISION)
  rows, n = len(examples) * cfg.group_size, cfg.sampling.max_new_tokens

  def generate(model, prompts, key, params, timings=None):
    assert prompts.input_ids.shape == (rows, 96)
    if timings is not None:
      timings.update(prefill=0.0, decode=0.0)
    tokens = np.full((rows, n), params.pad_id, np.int32)
    tokens[:, 0] = params.eos_ids[0]
    mask = np.zeros((rows, n), np.int32)
    mask[::2, 0] = 1  # even rows emit EOS at once; odd rows have no completion token at all
    zeros = np.zeros((rows, n), np.float32)
    return sampler.SampleOutput(tokens, mask, zeros, zeros, mask.sum(1))

  monkeypatch.setattr(rollouts.sampler, "generate", generate)
  fake_model = types.SimpleNamespace(config=model_config.tiny(vocab_size=len(tok)))
  r = rollouts.generate_rollouts(fake_model, tok, cfg, examples, jax.random.key(0), step=0, total_steps=10)
  assert r.completions == [""] * rows
  assert r.metrics["reward/semantic"] == 0.5 * 4 / rows and r.metrics["reward/accuracy"] == 0.0
  assert r.metrics["reward/failures/flaky"] == 4.0 and r.metrics["reward/failures"] == 4.0
  assert r.metrics["reward/failures/format"] == 0.0 and r.metrics["prompt/truncated"] == 1.0
  assert all(np.isfinite(v) for v in r.metrics.values()), r.metrics
  assert np.isfinite(np.asarray(r.batch.advantages)).all()


AGGREGATIONS = sorted(objective.AGGREGATION_MODES)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_zero_completion_mask_rows_give_finite_loss_and_gradient(aggregation):
  rng = np.random.default_rng(0)
  logps = jnp.asarray(rng.normal(-2, 0.5, (4, 6)), jnp.float32)
  mask = np.ones((4, 6), np.float32)
  mask[1] = 0  # an empty completion
  loss_fn = lambda lp, m: objective.policy_loss(lp, jax.lax.stop_gradient(lp), jnp.array([1.0, -1.0, 0.5, 2.0]),
                                                m, ref_logps=lp - 0.1, beta=0.04, aggregation=aggregation)[0]
  for m in (mask, np.zeros_like(mask)):  # one empty row; every row empty
    loss, grad = jax.value_and_grad(loss_fn)(logps, jnp.asarray(m))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    assert not np.asarray(grad)[m.sum(1) == 0].any()  # an empty row contributes no gradient
  assert float(loss) == 0.0


def test_train_step_with_empty_completions_is_not_skipped():
  from tests.training import helpers

  model, batch = helpers.model_and_batch()
  _, _, _, step, state = helpers.setup_state(model)
  batch = batch.replace(ref_logps=np.zeros_like(np.asarray(batch.completion_mask), np.float32))
  step = jax.jit(step)
  mask = np.asarray(batch.completion_mask).copy()
  mask[0] = 0
  one_empty, metrics, _ = step(state, batch.replace(completion_mask=mask))
  assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  assert int(one_empty.step) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(one_empty.params))
  all_empty, metrics, _ = step(state, batch.replace(completion_mask=np.zeros_like(mask)))
  assert float(metrics["skipped"]) == 0.0 and float(metrics["loss"]) == 0.0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(all_empty.params))


# ------------------------------------------------------------------------------------------------
# A6. Group size and noise levels.


@pytest.mark.parametrize("overrides,expected", [
    (dict(rl__group_size=1, rl__noise__levels=(0.0,)),
     ["rl.group_size=1", "at least 2 rollouts", "set rl.group_size >= 2"]),
    (dict(rl__noise__levels=(0.0, 0.3, 0.6, 1.5)),
     ["rl.noise.levels=(0.0, 0.3, 0.6, 1.5): [1.5] outside [0, 1]", "give levels in [0, 1]"]),
    (dict(rl__noise__levels=(-0.1, 0.3, 0.6, 0.9)), ["[-0.1] outside [0, 1]"]),
    (dict(rl__group_size=3), ["rl.group_size=3 does not match the 4 noise levels", "set rl.group_size=4"]),
    (dict(train__micro_batches=16),  # 32 rollouts split evenly, but a micro-batch of 2 cuts a group of 4
     ["train.prompts_per_step=8 prompts (groups of rl.group_size=4 rollouts) cannot be split into "
      "train.micro_batches=16 micro-batches of whole groups", "set train.micro_batches to a divisor"]),
], ids=["g1", "level_above_1", "negative_level", "g_vs_levels", "micro_batches_cut_groups"])
def test_validate_names_the_field_and_the_fix(overrides, expected):
  config = _run_config(**overrides)
  with pytest.raises(ValueError) as info:
    setup.validate(config)
  for text in expected:
    assert text in str(info.value), str(info.value)
