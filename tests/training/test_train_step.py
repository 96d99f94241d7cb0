"""The policy-update step: sharding equality, frozen groups, mu > 1 clipping, exact gradient accumulation."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from noisygrpo_jax.training import loops
from noisygrpo_jax.training import train_step as ts
from tests.training import helpers as H


def _with_reference(graphdef, state, batch):
  return batch.replace(ref_logps=np.asarray(ts.logps_fn(graphdef, 64)(H.full_params(state), batch)))


def test_frozen_vision_is_bit_identical_and_has_no_optimizer_state():
  model, batch = H.model_and_batch()
  graphdef, _, _, step, state = H.setup_state(model, freeze_vision=True)
  assert set(state.frozen) == {"visual"} and "visual" not in state.params
  before = jax.tree.map(np.asarray, H.full_params(state))
  batch = _with_reference(graphdef, state, batch)
  step = jax.jit(step)
  for _ in range(3):
    state, _, _ = step(state, batch)
  after = jax.tree.map(np.asarray, H.full_params(state))
  for a, b in zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(after["visual"])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["language_model"]),
                                                       jax.tree.leaves(after["language_model"]))]
  assert all(changed)
  vision_leaves = sum(x.size for x in jax.tree.leaves(before["visual"]))
  trainable_leaves = sum(x.size for x in jax.tree.leaves(before)) - vision_leaves
  opt_floats = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert opt_floats == 2 * trainable_leaves  # Adam's two moments, for trainable parameters only


def test_kl_is_zero_when_policy_equals_reference_and_mu2_clips():
  model, batch = H.model_and_batch()
  cfg = ts.LossConfig(use_old_logps=True, eps_low=0.05, eps_high=0.05)
  graphdef, _, _, step, state = H.setup_state(model, cfg, lr=3e-2)
  old = np.asarray(ts.logps_fn(graphdef, 64)(H.full_params(state), batch))
  batch = batch.replace(old_logps=old, ref_logps=old)
  step = jax.jit(step)
  state, first, _ = step(state, batch)
  assert float(first["kl_mean"]) == 0.0 and float(first["clip_fraction"]) == 0.0
  assert abs(float(first["ratio_mean"]) - 1.0) < 1e-6
  _, second, _ = step(state, batch)  # same rollouts, updated policy: ratios leave the band
  assert float(second["clip_fraction"]) > 0 and float(second["kl_mean"]) > 0


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_first_update_log_probs_are_the_old_log_probs_of_the_next(micro_batches):
  """mu > 1 (Run.update): the first update uses old = its own log-probs (ratio exactly 1) and returns them; fed
  back as the old log-probs of an update from the same state, in the bf16 compute policy, they give ratio exactly
  1 again and the very same update: they are exactly the loss's log-probs, not a separate pass's."""
  model, batch = H.model_and_batch(n=8, group_size=2)
  cfg = ts.LossConfig(compute_dtype="bfloat16", group_size=2)
  graphdef, _, _, step, state = H.setup_state(model, cfg, lr=1e-3, micro_batches=micro_batches)
  batch = _with_reference(graphdef, state, batch)
  _, _, _, replay, _ = H.setup_state(model, dataclasses.replace(cfg, use_old_logps=True),
                                     micro_batches=micro_batches, lr=1e-3)
  first_state, first, logps = jax.jit(step)(state, batch)
  assert float(first["ratio_mean"]) == 1.0
  replayed_state, replayed, _ = jax.jit(replay)(state, batch.replace(old_logps=logps))
  assert float(replayed["ratio_mean"]) == 1.0 and float(replayed["clip_fraction"]) == 0.0
  for a, b in zip(jax.tree.leaves(first_state.params), jax.tree.leaves(replayed_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mask = np.asarray(batch.completion_mask) > 0
  assert logps.shape == mask.shape and np.all(np.asarray(logps)[mask] < 0)


@pytest.mark.parametrize("aggregation", ["sequence_mean_token_mean", "token_mean", "sequence_sum_over_max_len"])
def test_gradient_accumulation_equals_full_batch(aggregation):
  """With plain SGD (lr 1) the parameter change is the gradient itself, so this compares gradients; Adam's
  first step, g / (|g| + eps), would amplify float rounding of near-zero gradients."""
  model, batch = H.model_and_batch()
  cfg = ts.LossConfig(aggregation=aggregation)
  results = []
  for micro in (1, 4):
    graphdef, _, _, step, state = H.setup_state(model, cfg, freeze_vision=False, micro_batches=micro,
                                                optimizer=optax.sgd(1.0))
    state, metrics, _ = jax.jit(step)(state, _with_reference(graphdef, state, batch))
    results.append((jax.tree.map(np.asarray, state.params), metrics))
  (p1, m1), (p4, m4) = results
  assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
  assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-6
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sft_loss_is_the_mean_token_nll():
  model, batch = H.model_and_batch()
  graphdef, _, _, step, state = H.setup_state(model, ts.LossConfig(kind="sft"))
  logps = np.asarray(ts.logps_fn(graphdef, 64)(H.full_params(state), batch))
  mask = np.asarray(batch.completion_mask)
  _, metrics, _ = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), -(logps * mask).sum() / mask.sum(), rtol=1e-5)


def test_sharded_step_equals_single_device():
  """2 prompts x 4 rollouts (the shared-prompt path) over a (data=2, fsdp=4) mesh of 8 devices equals one device.

  Compared where the comparison is well conditioned: the loss, the gradient norm and, element-wise, AdamW's first
  moment after the first step, mu = (1 - b1) x the clipped gradient (so this compares the gradients); and the
  shardings of parameters, optimizer state and batch. AdamW's first parameter update, lr * g / (|g| + eps), is not
  compared element-wise: for gradient entries near eps = 1e-8 it turns the last-ulp reduction-order differences of
  the sharded sums into update differences of up to 3e-5 (measured; 32x the gradient's own error bound).
  """
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax, numpy as np
      from flax import nnx
      from jax.sharding import PartitionSpec as P
      from noisygrpo_jax import sharding
      from noisygrpo_jax.training import train_step as ts
      from tests.training import helpers as H
      mesh = sharding.make_mesh(data=2, fsdp=4)

      model, batch = H.model_and_batch(n=8, group_size=4)
      graphdef, model_state, optimizer, step, state = H.setup_state(model, ts.LossConfig(group_size=4),
                                                                    freeze_vision=False, lr=1e-3)  # AdamW
      full = batch.replace(ref_logps=np.asarray(ts.logps_fn(graphdef, 64, 4)(H.full_params(state), batch)))
      single, single_metrics, _ = jax.jit(step)(state, full)
      state_sh = ts.state_shardings(nnx.eval_shape(lambda: model_state), optimizer, mesh, freeze_vision=False)
      batch_sh = ts.batch_shardings(full, mesh)
      sharded_batch = jax.device_put(full, batch_sh)
      assert sharded_batch.input_ids.sharding.spec == P(("data", "fsdp"), None)
      sharded, metrics, _ = ts.jit_train_step(step, state_sh, batch_sh, mesh)(jax.device_put(state, state_sh),
                                                                               sharded_batch)
      assert abs(float(metrics["grad_norm"]) - float(single_metrics["grad_norm"])) <= 1e-6 * float(
          single_metrics["grad_norm"])
      assert abs(float(metrics["loss"]) - float(single_metrics["loss"])) <= 1e-6

      q = sharded.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
      # stacked layers -> replicated; embed -> fsdp; heads -> tensor (size 1)
      assert q.sharding.spec == P(None, "fsdp", None), q.sharding.spec
      emb = sharded.params["language_model"]["embed_tokens"]["embedding"]
      assert emb.sharding.spec == P(None, "fsdp"), emb.sharding.spec
      mu = lambda s: s.opt_state[1][0].mu  # chain(clip, adamw = chain(scale_by_adam, ...))
      mu_q = mu(sharded)["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
      assert mu_q.sharding.spec == P(None, "fsdp", None), mu_q.sharding.spec
      pairs = list(zip(jax.tree.leaves(mu(sharded)), jax.tree.leaves(mu(single))))
      mu_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)
      mu_max = max(float(np.abs(np.asarray(b)).max()) for _, b in pairs)
      assert mu_diff <= 1e-7 and mu_max > 1e-4, (mu_diff, mu_max)
      print("SHARDED_OK", mu_diff, mu_max)
      """)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


def test_bfloat16_compute_keeps_float32_master_weights():
  model, batch = H.model_and_batch()
  losses = {}
  for compute in ("", "bfloat16"):
    graphdef, _, _, step, state = H.setup_state(model, ts.LossConfig(kind="sft", compute_dtype=compute))
    new_state, metrics, _ = jax.jit(step)(state, batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_state.params))
    losses[compute] = float(metrics["loss"])
  # bf16 rounding (relative 2^-9) through the tiny model moves the mean token NLL by well under 1%.
  assert abs(losses["bfloat16"] - losses[""]) <= 0.01 * losses[""]
  assert losses["bfloat16"] != losses[""]


def test_non_finite_loss_skips_the_update():
  model, batch = H.model_and_batch()
  graphdef, _, _, step, state = H.setup_state(model)
  batch = _with_reference(graphdef, state, batch)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  poisoned = batch.replace(advantages=np.where(np.arange(8) == 3, np.nan, batch.advantages).astype(np.float32))
  new_state, metrics, _ = jax.jit(step)(state, poisoned)
  assert float(metrics["skipped"]) == 1.0 and int(new_state.step) == 0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((new_state.params, new_state.opt_state))):
    np.testing.assert_array_equal(a, np.asarray(b))
  new_state, metrics, _ = jax.jit(step)(new_state, batch)
  assert float(metrics["skipped"]) == 0.0 and int(new_state.step) == 1


def test_consecutive_skips_stop_the_run_at_the_limit_and_a_good_update_resets_them():
  count = loops.count_skips(0, True, limit=3, step=1)
  count = loops.count_skips(count, True, limit=3, step=2)
  assert count == 2
  assert loops.count_skips(count, False, limit=3, step=3) == 0
  with pytest.raises(FloatingPointError, match=r"step 3: 3 consecutive .*train.max_consecutive_skips=3"):
    loops.count_skips(count, True, limit=3, step=3)
