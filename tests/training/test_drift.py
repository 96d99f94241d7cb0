"""The drift monitor (rl.logprobs.logprob_drift): the sampler's log-probs against the trainer's for the same tokens,
at numerical noise on the correct path and far above it when the trainer's positions are off by one."""

import jax
import numpy as np
import pytest
from flax import nnx

from noisygrpo_jax.rl import logprobs as lp_lib
from noisygrpo_jax.sampling import sampler as S
from noisygrpo_jax.training import batches, train_step as ts
from tests.training import helpers as H


def test_drift_by_hand():
  a = np.array([[-1.0, -2.0, -3.0, 9.0]], np.float32)
  b = np.array([[-1.5, -2.0, -2.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]])  # the last token does not count
  d = {k: float(v) for k, v in lp_lib.logprob_drift(a, b, mask).items()}
  assert d["abs_diff"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
  assert d["max_abs_diff"] == pytest.approx(1.0)
  assert d["correlation"] == pytest.approx(np.corrcoef([-1, -2, -3], [-1.5, -2, -2])[0, 1], rel=1e-6)
  assert np.isnan(float(lp_lib.logprob_drift(a, np.full_like(a, -1.0), mask)["correlation"]))  # constant side
  assert np.isnan(float(lp_lib.logprob_drift(a, b, np.array([[1, 0, 0, 0]]))["correlation"]))  # one token


def _drift(model, batch, sampler_logps, position_shift: int = 0) -> dict[str, float]:
  """The drift of the trainer's log-probs of `batch` (completion positions moved by `position_shift`)."""
  prompt_len = batch.input_ids.shape[1] - batch.completion_len
  positions = np.asarray(batch.position_ids).copy()
  positions[:, :, prompt_len:] += position_shift
  graphdef, params = nnx.split(model)
  trainer = jax.jit(ts.logps_fn(graphdef, 64))(params, batch.replace(position_ids=positions))
  return {k: float(v) for k, v in lp_lib.logprob_drift(sampler_logps, trainer, batch.completion_mask).items()}


def test_sampler_and_trainer_agree_and_a_one_position_shift_shows():
  """Completions sampled at temperature 1 from 4 left-padded image prompts of the tiny model (float32), scored again
  as the trainer scores them: equal to numerical noise; with the completion's positions off by one (the bug class of
  rollout/training mismatches) the gap is orders of magnitude larger. The final norm is scaled so the next-token
  distribution is peaked as a trained model's is (random weights give near-uniform ones, which hide any shift)."""
  model, prompts, _ = H.model_and_prompts(n=4)
  norm = model.language_model.norm.weight
  norm[...] = np.full(norm.shape, 30.0, np.float32)
  params = S.SamplingParams(max_new_tokens=12, eos_ids=(0,), pad_id=0)
  out = S.generate(model, prompts, jax.random.key(1), params)
  batch = batches.token_batch(prompts, out.tokens, out.mask)
  assert float(batch.completion_mask.sum()) >= 24
  right = _drift(model, batch, np.asarray(out.logprobs))
  assert right["abs_diff"] <= 1e-5 and right["max_abs_diff"] <= 1e-4 and right["correlation"] >= 0.99999, right
  shifted = _drift(model, batch, np.asarray(out.logprobs), position_shift=1)
  # Measured: 6.9e-7 against 6.5e-3.
  assert shifted["abs_diff"] >= 1e-3 and shifted["abs_diff"] >= 1000 * max(right["abs_diff"], 1e-7), (right, shifted)
  assert shifted["correlation"] < right["correlation"]
