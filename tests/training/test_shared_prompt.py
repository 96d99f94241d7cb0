"""Shared-prompt log-probs (group_size G > 1): each group's prompt runs once, with the results of one full pass
over every row (log-probs, GRPO gradients, a train step, micro-batches), with and without remat."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL
from noisygrpo_jax.training import train_step as ts
from tests.training import helpers as H

G = 4


def _grouped(remat: bool = False, prompts: int = 3):
  """The tiny model (remat or not, same weights) and P prompts x G rollouts with a reference away from the policy
  (KL > 0)."""
  model, batch = H.model_and_batch(n=prompts * G, m=8, group_size=G)
  if remat:
    plain = model
    model = Qwen25VL(H.CONFIG.replace(remat=True), nnx.Rngs(1))
    nnx.update(model, nnx.state(plain))
  graphdef, state = nnx.split(model)
  ref_logps = jax.jit(ts.logps_fn(graphdef, 64))(nnx.to_pure_dict(state), batch)
  return model, batch.replace(ref_logps=np.asarray(ref_logps) - 0.1)


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(b), strict=True))


def _checkpoints(jaxpr) -> int:
  """jax.checkpoint (remat) calls in a jaxpr, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "remat2"  # jax.checkpoint's primitive
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _checkpoints(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _checkpoints(sub)
  return count


def test_the_batch_is_groups_of_one_prompt_with_different_lengths_and_early_stops():
  _, batch = _grouped()
  prompt_len = batch.input_ids.shape[1] - batch.completion_len
  for field in (batch.input_ids[:, :prompt_len], batch.attention_mask[:, :prompt_len],
                batch.position_ids[:, :, :prompt_len].transpose(1, 0, 2), *jax.tree.leaves(batch.vision)):
    groups = np.asarray(field).reshape((-1, G) + np.shape(field)[1:])
    assert (groups == groups[:, :1]).all()
  lengths = np.asarray(batch.attention_mask)[::G, :prompt_len].sum(1)
  assert len(set(lengths.tolist())) == len(lengths), lengths  # left padding differs between groups
  stops = np.asarray(batch.completion_mask).sum(1)
  assert (stops < batch.completion_len).all() and len(set(stops.tolist())) > 1


def test_log_probs_equal_the_full_pass():
  model, batch = _grouped()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  full = np.asarray(jax.jit(ts.logps_fn(graphdef, 64))(params, batch))
  shared = np.asarray(jax.jit(ts.logps_fn(graphdef, 64, G))(params, batch))
  assert np.isfinite(full).all() and np.abs(full - shared).max() <= 1e-5
  groups = batch.input_ids.shape[0] // G
  micro = np.asarray(jax.jit(ts.logps_fn(graphdef, 64, G, micro_batches=groups))(params, batch))  # a group at a time
  assert np.abs(micro - shared).max() <= 1e-5


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_grpo_gradients_equal_the_full_pass(remat):
  """The GRPO loss (clipped ratio, KL to a reference) over all parameters, vision tower included."""
  model, batch = _grouped(remat)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def grad_fn(group_size):
    def loss(params):
      cfg = ts.LossConfig(beta=0.04, group_size=group_size)
      num, den, _, _ = ts.loss_terms(nnx.merge(graphdef, params), batch, cfg)
      return num / den
    return jax.grad(loss)

  full, shared = (jax.jit(grad_fn(g))(params) for g in (1, G))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(shared), strict=True):
    scale = float(np.abs(a).max())
    assert scale > 0 and float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-5 * scale
  # Remat still applies to the shared pass: the decoder layers are checkpointed in both of its passes (the scanned
  # layer body holds one checkpoint per pass; unrolled, there would be one per layer).
  assert H.CONFIG.scan_layers
  checkpoints = [_checkpoints(jax.make_jaxpr(grad_fn(g))(params).jaxpr) for g in (1, G)]
  assert checkpoints[1] - checkpoints[0] == (1 if remat else 0), checkpoints


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_train_step_equals_the_full_pass(remat):
  """One jitted update with SGD + momentum (lr 1): the parameter change and the momentum are the gradient."""
  model, batch = _grouped(remat)
  results = []
  for group_size in (1, G):
    _, _, _, step, state = H.setup_state(model, ts.LossConfig(group_size=group_size), freeze_vision=False,
                                         optimizer=optax.sgd(1.0, momentum=0.9))
    state, metrics, _ = jax.jit(step)(state, batch)
    results.append((state, metrics))
  (full, m_full), (shared, m_shared) = results
  assert float(m_full["skipped"]) == 0.0 and int(shared.step) == 1
  assert _max_diff((full.params, full.opt_state), (shared.params, shared.opt_state)) <= 1e-5
  for key in m_full:
    assert abs(float(m_full[key]) - float(m_shared[key])) <= 1e-5 * max(1.0, abs(float(m_full[key]))), key


def test_micro_batches_of_whole_groups_equal_the_full_batch():
  model, batch = _grouped(prompts=2)
  results = []
  for group_size, micro_batches in ((1, 1), (G, 2)):
    _, _, _, step, state = H.setup_state(model, ts.LossConfig(group_size=group_size), freeze_vision=False,
                                         micro_batches=micro_batches, optimizer=optax.sgd(1.0))
    state, metrics, _ = jax.jit(step)(state, batch)
    results.append((state.params, metrics))
  (p_full, m_full), (p_micro, m_micro) = results
  assert abs(float(m_full["loss"]) - float(m_micro["loss"])) <= 1e-6
  assert abs(float(m_full["grad_norm"]) - float(m_micro["grad_norm"])) <= 1e-5 * float(m_full["grad_norm"])
  assert _max_diff(p_full, p_micro) <= 1e-5


def test_a_micro_batch_that_cuts_a_group_is_refused():
  model, batch = _grouped(prompts=2)
  _, _, _, step, state = H.setup_state(model, ts.LossConfig(group_size=G), micro_batches=4)
  with pytest.raises(ValueError, match=r"train.prompts_per_step=2 prompts \(groups of rl.group_size=4 rollouts\) "
                                       r"cannot be split into train.micro_batches=4 micro-batches"):
    jax.jit(step)(state, batch)
