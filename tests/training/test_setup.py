"""What setup unpacks from the configs: the real presets' dtype policy and reward rules, the rollout reward functions,
and a learning-rate schedule that counts optimizer updates."""

import jax
import numpy as np
import pytest

from configs import noisygrpo
from noisygrpo_jax.models.qwen2_5_vl import config as model_config
from noisygrpo_jax.processing import tokenizer as tokenizer_lib
from noisygrpo_jax.rl import rewards
from noisygrpo_jax.training import loops, rollouts, setup

YES_NO = "Is there a piano? " + rewards.YES_NO_TRIGGER
TOKENIZER = tokenizer_lib.word_level_tokenizer(["piano"], 512)


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_real_presets_train_float32_masters_in_bf16_with_the_released_rewards(preset):
  c = noisygrpo.get_config(preset)
  assert (c.model.dtype, c.model.compute_dtype, c.model.remat) == ("float32", "bfloat16", True)
  assert c.rl.reward_rules == "released" and c.optim.learning_rate == 1e-6
  tiny = noisygrpo.get_config("tiny")
  assert (tiny.model.dtype, tiny.model.compute_dtype, tiny.rl.reward_rules) == ("float32", "", "project")


def test_rollout_config_builds_the_configured_reward_rules():
  """The released rules' loose yes/no ("piano" ends in "no") reach the rollouts' reward functions."""
  c = noisygrpo.get_config("tiny")
  vision = model_config.small().vision
  completion = "<think>x</think><answer>a piano</answer>"
  scores = {}
  for rules in rewards.REWARD_RULES:
    with c.unlocked():
      c.rl.reward_rules = rules
      c.rl.semantic_model = rewards.default_semantic_model_path()
      c.rl.rewards = ("accuracy_exact", "format")
    functions = setup.rollout_config(c, TOKENIZER, vision).reward_functions
    assert list(functions) == ["accuracy_exact", "format"]
    scores[rules] = functions["accuracy_exact"](completion, "No", YES_NO)
  assert scores == {"project": 0.0, "released": 1.0}
  with c.unlocked():
    c.rl.reward_rules = "original"
  with pytest.raises(ValueError, match="rl.reward_rules"):
    setup.rollout_config(c, TOKENIZER, vision)


def test_decode_kernel_reaches_the_sampler_and_a_wrong_one_is_named():
  c = noisygrpo.get_config("tiny")
  assert setup.sampling_params(c, TOKENIZER).decode_kernel == c.rl.decode_kernel == "auto"
  with c.unlocked():
    c.rl.decode_kernel = "einsum"
  assert setup.sampling_params(c, TOKENIZER).decode_kernel == "einsum"
  setup.validate(c)
  with c.unlocked():
    c.rl.decode_kernel = "flash"
  with pytest.raises(ValueError, match="rl.decode_kernel='flash' must be one of auto, pallas, einsum"):
    setup.validate(c)


def test_learning_rate_schedule_counts_optimizer_updates():
  """With rl.num_iterations = mu the linear decay spans train.steps x mu updates, not train.steps."""
  c = noisygrpo.get_config("tiny")
  with c.unlocked():
    c.train.steps, c.optim.warmup_steps, c.rl.num_iterations = 10, 0, 2
  schedule = setup.learning_rate_schedule(c, updates_per_step=c.rl.num_iterations)
  lr = c.optim.learning_rate
  np.testing.assert_allclose([float(schedule(n)) for n in (0, 10, 19, 20)], [lr, lr / 2, lr / 20, 0.0], rtol=1e-6)


def test_rollout_and_sft_batches_send_uint8_levels_a_quarter_of_the_float_bytes():
  """The trainer's vision pixels (rollouts, so also the clean batch of the policy/reference passes; SFT) cross to the
  device as uint8 levels, which the model normalises there."""
  c = noisygrpo.get_config("tiny")
  tok = tokenizer_lib.word_level_tokenizer(["what", "colour", "?", "red", "blue"], 512)
  model_cfg = setup.model_config(c, tok)
  rng = np.random.default_rng(0)
  examples = [{"id": i, "image": rng.integers(0, 256, (40 + 20 * i, 60, 3), dtype=np.uint8), "problem": "what colour ?",
               "solution": "red", "cot": "red"} for i in range(2)]
  cfg = setup.rollout_config(c, tok, model_cfg.vision)
  prompts = rollouts.prepare_rollouts(tok, cfg, model_cfg, examples, jax.random.key(0), 0, 10).prompts
  sft = loops.sft_batch(c, tok, examples, model_cfg)
  for pixels in (prompts.vision.pixel_values, sft.vision.pixel_values):
    assert pixels.dtype == np.uint8 and pixels.shape[-1] == model_cfg.vision.patch_dim
    assert pixels.nbytes * 4 == np.zeros(pixels.shape, np.float32).nbytes
