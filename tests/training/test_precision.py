"""Mixed precision (training.params): float32 master weights and moments, bfloat16 compute, one shared bf16 copy of
the frozen vision tower for the policy update, the rollouts and the reference model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisygrpo_jax.training import loops, params as params_lib, rollouts, setup, train_step as ts
from tests.training import helpers as H

LR = 1e-6  # the real presets' learning rate


def _one_update(model, batch, compute_dtype: str, storage_dtype: str = "float32"):
  """(text weights before, after) of one GRPO AdamW update at LR, float64 numpy leaves of the trainable tree."""
  cfg = ts.LossConfig(compute_dtype=compute_dtype, group_size=4)
  graphdef, _, optimizer, step, state = H.setup_state(model, cfg, freeze_vision=True, lr=LR)
  trainable = params_lib.cast(state.params, storage_dtype)
  state = state.replace(params=trainable, opt_state=optimizer.init(trainable))  # moments in the storage dtype
  reference = params_lib.combine(params_lib.cast(state.params, compute_dtype), state.frozen)
  batch = batch.replace(ref_logps=np.asarray(ts.logps_fn(graphdef, 64, 4)(reference, batch)))
  new_state, metrics, _ = jax.jit(step)(state, batch)
  assert float(metrics["skipped"]) == 0.0
  as64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  return as64(state.params), as64(new_state.params), new_state


@pytest.fixture(scope="module")
def updates():
  model, batch = H.model_and_batch(n=8, group_size=4)
  return {name: _one_update(model, batch, *dtypes) for name, dtypes in
          {"float32": ("",), "mixed": ("bfloat16",), "bf16_stored": ("", "bfloat16")}.items()}


def test_mixed_precision_update_moves_every_weight_the_float32_update_moves(updates):
  """The real presets' policy (float32 master, bfloat16 compute): one update at lr 1e-6 changes >= 99% of the
  trainable weights whose float32 update is non-zero, and equals the all-float32 update within bf16 compute."""
  before, after, state = updates["mixed"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim)
  _, after32, _ = updates["float32"]
  delta = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
  delta32 = np.concatenate([(a - b).ravel() for a, b in zip(after32, before)])
  moved = delta32 != 0  # Adam (no weight decay) moves exactly the weights whose gradient is non-zero
  assert (delta[moved] != 0).mean() >= 0.99
  # Adam's first step is lr * g / (|g| + eps), about +-lr: bf16 compute changes it only where the gradient's sign
  # flips, entries whose gradient is below the resolution of the bf16 forward (measured: 0.26% of the moved
  # weights, which put the relative difference at 0.091, each flip counting 2 lr).
  assert (np.sign(delta[moved]) == np.sign(delta32[moved])).mean() >= 0.99
  assert np.linalg.norm(delta - delta32) <= 0.15 * np.linalg.norm(delta32)


def test_bfloat16_stored_weights_lose_the_update(updates):
  """What mixed precision fixes: bf16 weights near 0.02 are 1.2e-4 apart, so a 1e-6 step rounds back (measured:
  1.7% of the weights change, against 99.95% of those with a gradient in float32 storage)."""
  before, after, _ = updates["bf16_stored"]
  delta = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
  assert (delta != 0).mean() < 0.1


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
  """A tiny RL run with the real presets' dtype policy (float32 master, bfloat16 compute, frozen vision)."""
  from configs import noisygrpo
  config = noisygrpo.get_config("tiny")
  with config.unlocked():
    config.model.compute_dtype = "bfloat16"
    config.optim.freeze_vision = True
    config.train.workdir = str(tmp_path_factory.mktemp("bf16_run"))
    config.data.train_size, config.data.eval_size = 16, 8
    config.train.prompts_per_step, config.rl.max_new_tokens = 2, 8
  return loops.Run(config, "rl")


def _buffers(tree) -> list[int]:
  return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def test_rollout_and_reference_copies_share_the_frozen_tower_and_are_bf16(bf16_run):
  run = bf16_run
  assert set(run.state.frozen) == {"visual"} and "visual" not in run.state.params
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.state.params))
  for params in (run.rollout_params(), run.reference()):
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert _buffers(params["visual"]) == _buffers(run.state.frozen["visual"])  # shared, not copied
  assert not set(_buffers(run.reference()["language_model"])) & set(_buffers(run.state.params))

  # One RL step as run_rl takes it: the update leaves the frozen tower's buffers alive and in place, and the next
  # rollout copy is made from the updated master weights.
  c = run.config
  rollout_cfg = setup.rollout_config(c, run.tokenizer, run.model().config.vision)
  r = rollouts.generate_rollouts(run.model(), run.tokenizer, rollout_cfg, run.next_examples(c.train.prompts_per_step),
                                 jax.random.key(0), 0, c.train.steps)
  logps = jax.jit(ts.logps_fn(run.setup.graphdef, 64, c.rl.group_size))
  frozen_before = _buffers(run.state.frozen)
  run.update(r.batch.replace(ref_logps=logps(run.reference(), r.batch)), setup.loss_config(c))
  assert _buffers(run.state.frozen) == frozen_before
  assert _buffers(run.rollout_params()["visual"]) == frozen_before
  rollout_text = run.rollout_params()["language_model"]["embed_tokens"]["embedding"]
  master = run.state.params["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(np.asarray(rollout_text), np.asarray(master.astype(jnp.bfloat16)))
