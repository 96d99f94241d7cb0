"""Greedy evaluation on a tiny random model: image_reliance detects whether final answers depend on the images."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from noisygrpo_jax.evaluation import evaluate
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as config_lib
from noisygrpo_jax.processing import chat_template, image as image_lib, tokenizer as tokenizer_lib
from noisygrpo_jax.sampling import sampler

WORDS = "What colour is the shape ? red blue green".split()
IMAGE_CONFIG = image_lib.ImageProcessorConfig(min_pixels=56 * 56, max_pixels=56 * 56)


@pytest.fixture(scope="module")
def setting():
  tokenizer = tokenizer_lib.word_level_tokenizer(
      tokenizer_lib.word_level_vocabulary([" ".join(WORDS), chat_template.COT_INSTRUCTION]), 128)
  model = Qwen25VL(config_lib.tiny(vocab_size=len(tokenizer)), nnx.Rngs(0))
  params = sampler.SamplingParams(max_new_tokens=6, greedy=True, eos_ids=(tokenizer.eos_id,),
                                  pad_id=tokenizer.pad_id)
  return tokenizer, model, params


def _examples(images):
  return [{"id": str(i), "image": im, "problem": "What colour is the shape ?", "solution": "red"}
          for i, im in enumerate(images)]


def _answer(setting, examples):
  tokenizer, model, params = setting
  return evaluate.answer(model, tokenizer, examples, params, IMAGE_CONFIG, batch_size=4)


def test_identical_images_give_zero_reliance(setting):
  tokenizer, model, params = setting
  examples = _examples([np.full((56, 56, 3), 120, np.uint8)] * 4)
  completions = _answer(setting, examples)
  assert evaluate.image_reliance(model, tokenizer, examples, params, IMAGE_CONFIG, completions,
                                 batch_size=4) == 0.0


def test_reliance_counts_answers_changed_by_exchanged_images(setting):
  tokenizer, model, params = setting
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
  examples = _examples(images)
  completions = _answer(setting, examples)
  rotated = _answer(setting, _examples(images[1:] + images[:1]))
  expected = np.mean([evaluate.final_answer(a) != evaluate.final_answer(b) for a, b in zip(completions, rotated)])
  result = evaluate.evaluate_split(model, tokenizer, examples, params, IMAGE_CONFIG, check_images=True,
                                   batch_size=4)
  assert result["image_reliance"] == expected
  assert result["image_reliance"] > 0  # a random model's greedy answers depend on random images
  assert "image_reliance" not in evaluate.evaluate_split(model, tokenizer, examples, params, IMAGE_CONFIG,
                                                         batch_size=4)


def test_reliance_needs_two_examples(setting):
  tokenizer, model, params = setting
  with pytest.raises(ValueError, match="at least 2"):
    evaluate.image_reliance(model, tokenizer, _examples([np.zeros((56, 56, 3), np.uint8)]), params,
                            IMAGE_CONFIG, ["x"])


def test_reliance_compares_final_answers_not_chains_of_thought(setting, monkeypatch):
  tokenizer, model, params = setting
  examples = _examples([np.zeros((56, 56, 3), np.uint8)] * 4)
  own = ["<think>a red square</think><answer>Yes</answer>", "<think>x</think><answer>2</answer>", "no tags",
         "<think>y</think><answer>red</answer>"]
  swapped = ["<think>a blue circle</think><answer>yes.</answer>", "<think>x</think><answer>3</answer>",
             "no tags", "<think>y</think><answer>Red</answer>"]
  monkeypatch.setattr(evaluate, "answer", lambda *args, **kwargs: swapped)
  # Only the second answer changes; a different caption before the same answer is no change.
  assert evaluate.image_reliance(model, tokenizer, examples, params, IMAGE_CONFIG, own) == 0.25


def test_split_metrics_report_accuracy_per_answer_type(setting, monkeypatch):
  tokenizer, model, params = setting
  examples = [dict(ex, answer_type=t, solution=s) for ex, t, s in zip(
      _examples([np.zeros((56, 56, 3), np.uint8)] * 6), ["count", "count", "yes_no", "yes_no", "attribute", "count"],
      ["2", "3", "Yes", "No", "red", "1"])]
  completions = [f"<think>t</think><answer>{a}</answer>" for a in ("2", "2", "Yes", "Yes", "red")] + ["no tags"]
  monkeypatch.setattr(evaluate, "answer", lambda *args, **kwargs: completions)
  result = evaluate.evaluate_split(model, tokenizer, examples, params, IMAGE_CONFIG)
  assert result["accuracy"] == pytest.approx(3 / 6)
  assert result["format_rate"] == pytest.approx(5 / 6)
  assert result["accuracy/count"] == pytest.approx(1 / 3)
  assert result["accuracy/yes_no"] == pytest.approx(1 / 2) and result["yes_no_yes_ratio"] == 1.0
  assert result["accuracy/attribute"] == 1.0
  assert not any(k.startswith("accuracy/") for k in evaluate.evaluate_split(
      model, tokenizer, [{k: v for k, v in ex.items() if k != "answer_type"} for ex in examples], params,
      IMAGE_CONFIG))  # examples without types (local benchmarks) report no per-type accuracy


def test_split_metrics_report_description_match_when_examples_carry_reference_chains_of_thought(setting,
                                                                                                monkeypatch):
  tokenizer, model, params = setting
  cots = [f"<think>A {c} square. So {c}.</think><answer>{c}</answer>" for c in ("red", "blue", "green", "red")]
  examples = [dict(ex, solution=c, cot=cot, answer_type=t) for ex, c, cot, t in zip(
      _examples([np.zeros((56, 56, 3), np.uint8)] * 4), ("red", "blue", "green", "red"), cots,
      ("attribute", "attribute", "attribute", "count"))]
  completions = [cots[0], "<think>A red square. So blue.</think><answer>blue</answer>",
                 "<think>A green square. So red.</think><answer>red</answer>", "<answer>red</answer>"]
  monkeypatch.setattr(evaluate, "answer", lambda *args, **kwargs: completions)
  result = evaluate.evaluate_split(model, tokenizer, examples, params, IMAGE_CONFIG)
  assert result["accuracy"] == pytest.approx(3 / 4)
  assert result["description_match"] == pytest.approx(2 / 4)  # the first and the third see the square right
  assert result["accuracy_given_description"] == pytest.approx(1 / 2)  # the third then answers wrong
  assert result["description_match/attribute"] == pytest.approx(2 / 3)
  assert result["accuracy_given_description/attribute"] == pytest.approx(1 / 2)
  assert result["description_match/count"] == 0.0 and np.isnan(result["accuracy_given_description/count"])
  assert result["accuracy/attribute"] == pytest.approx(2 / 3) and result["accuracy/count"] == 1.0
  examples[3] = {k: v for k, v in examples[3].items() if k != "cot"}
  assert "description_match" not in evaluate.evaluate_split(model, tokenizer, examples, params, IMAGE_CONFIG)


def test_answer_builds_its_prompts_with_the_given_encoder(setting):
  tokenizer, model, params = setting
  images = [np.full((56, 56, 3), v, np.uint8) for v in (30, 90, 150, 210, 250)]
  examples = _examples(images)
  rewritten = [dict(ex, problem="What colour is the shape ? red blue") for ex in examples]
  calls = []

  def encode(tok, chunk, grids):
    calls.append((len(chunk), len(grids)))
    return chat_template.encode_vqa_prompts(tok, [dict(ex, problem="What colour is the shape ? red blue")
                                                  for ex in chunk], grids)

  got = evaluate.answer(model, tokenizer, examples, params, IMAGE_CONFIG, batch_size=4, encode_prompts=encode)
  assert calls == [(4, 4), (4, 4)]  # every batch, the last one padded to the batch size
  assert got == _answer(setting, rewritten)


def test_two_image_examples_are_answered_and_shown_the_next_examples_images(setting, monkeypatch):
  """A two-image example goes through evaluation's processing and prompts; for image_reliance it is shown the next
  example's one image in both places (so its two <image> markers still match), and the next example its first."""
  tokenizer, model, params = setting
  rng = np.random.default_rng(0)
  pixels = lambda: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
  two = {"id": "two", "images": [pixels(), pixels()], "problem": "What colour is <image> ? <image>", "solution": "red"}
  one, = _examples([pixels()])
  assert len(_answer(setting, [two, one])) == 2
  shown = []
  monkeypatch.setattr(evaluate, "answer", lambda m, t, examples, *a, **k: shown.extend(examples) or ["x"] * 2)
  evaluate.image_reliance(model, tokenizer, [two, one], params, IMAGE_CONFIG, ["x", "x"])
  assert sorted(shown[0]) == sorted(two) and sorted(shown[1]) == sorted(one)
  assert all(im is one["image"] for im in shown[0]["images"]) and len(shown[0]["images"]) == 2
  assert shown[1]["image"] is two["images"][0] and shown[0]["problem"] == two["problem"]


def test_placed_batches_answer_rows_split_over_8_devices_as_one_device_does():
  """With `place` (as Run.place_prompts: rows over the mesh's batch axes) every device generates its share of each
  batch's rows, and the answers (a padded last batch included) equal one device's."""
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax, numpy as np
      from noisygrpo_jax import sharding
      from noisygrpo_jax.evaluation import evaluate
      from noisygrpo_jax.sampling import sampler
      from noisygrpo_jax.training import loops, train_step
      from tests.evaluation import test_evaluate as T
      tokenizer, model, params = T.setting.__wrapped__()
      rng = np.random.default_rng(0)
      examples = T._examples([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(11)])
      single = evaluate.answer(model, tokenizer, examples, params, T.IMAGE_CONFIG, batch_size=8)
      mesh = sharding.make_mesh(data=2, fsdp=4)
      place = lambda prompts: loops.place_batch(prompts, train_step.batch_shardings(prompts, mesh))
      generate, devices = sampler.generate, []
      def spy(model, prompts, *args):
        out = generate(model, prompts, *args)
        devices.append((len(prompts.input_ids.sharding.device_set), out.tokens.sharding.spec[0]))
        return out
      evaluate.sampler.generate = spy
      placed = evaluate.answer(model, tokenizer, examples, params, T.IMAGE_CONFIG, batch_size=8, place=place)
      assert devices == [(8, ("data", "fsdp"))] * 2, devices
      assert placed == single, (placed, single)
      print("PLACED_OK")
      """)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=600,
                          env=dict(os.environ, PYTHONPATH=root))
  assert "PLACED_OK" in result.stdout, result.stderr[-3000:]
