"""Rematerialisation (config.remat): same outputs and gradients as without it, less compiled temp memory.

The remat and plain models share weights; both run under jax.jit, the vision tower under the model's
jax.vmap over rows (where `nnx.remat` used to raise TraceContextError).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, host
from noisygrpo_jax.models.qwen2_5_vl.model import causal_mask, jitted_logits
from noisygrpo_jax.sampling import sampler as S
from noisygrpo_jax.training import train_step as ts
from tests.models import hf_reference as ref
from tests.training import helpers as H


@pytest.fixture(scope="module")
def models_and_batch():
  plain, batch = H.model_and_batch()
  remat = Qwen25VL(H.CONFIG.replace(remat=True), nnx.Rngs(1))
  nnx.update(remat, nnx.state(plain))
  graphdef, state = nnx.split(plain)
  ref_logps = jax.jit(ts.logps_fn(graphdef, 64))(nnx.to_pure_dict(state), batch)
  batch = batch.replace(ref_logps=np.asarray(ref_logps) - 0.1)  # a reference away from the policy: KL > 0
  return plain, remat, batch


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(b)))


def test_logits_and_vision_features_are_equal(models_and_batch):
  plain, remat, batch = models_and_batch
  assert remat.visual.remat and remat.language_model.remat and not plain.visual.remat
  inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                vision=batch.vision)
  logits = [np.asarray(jitted_logits(*nnx.split(m), **inputs)) for m in (plain, remat)]
  assert np.abs(logits[0] - logits[1]).max() <= 1e-6
  features = [np.asarray(jax.jit(lambda g, s: nnx.merge(g, s).vision_features(batch.vision), static_argnums=0)(
      *nnx.split(m))) for m in (plain, remat)]
  assert np.abs(features[0] - features[1]).max() <= 1e-6


def test_gradients_of_the_rl_loss_are_equal(models_and_batch):
  """The GRPO loss (clipped ratio, KL to a reference) over all parameters, vision tower included."""
  plain, remat, batch = models_and_batch
  loss_cfg = ts.LossConfig(beta=0.04)

  def grads(model):
    graphdef, state = nnx.split(model)

    def loss(params):
      num, den, _, _ = ts.loss_terms(nnx.merge(graphdef, params), batch, loss_cfg)
      return num / den

    return jax.jit(jax.grad(loss))(nnx.to_pure_dict(state))

  g_plain, g_remat = grads(plain), grads(remat)
  assert jax.tree.structure(g_plain) == jax.tree.structure(g_remat)
  for part in ("visual", "language_model"):
    assert min(float(np.abs(x).max()) for x in jax.tree.leaves(g_plain[part])) > 0  # every leaf gets a gradient
    assert _max_diff(g_plain[part], g_remat[part]) <= 1e-5


def test_train_step_is_equal(models_and_batch):
  """One jitted make_train_step update with SGD(lr 1): the parameter change is the gradient itself."""
  plain, remat, batch = models_and_batch
  results = []
  for model in (plain, remat):
    _, _, _, step, state = H.setup_state(model, ts.LossConfig(), freeze_vision=False, optimizer=optax.sgd(1.0))
    state, metrics, _ = jax.jit(step)(state, batch)
    results.append((state.params, metrics))
  (p_plain, m_plain), (p_remat, m_remat) = results
  assert float(m_plain["skipped"]) == 0.0
  assert abs(float(m_plain["loss"]) - float(m_remat["loss"])) <= 1e-6
  assert abs(float(m_plain["grad_norm"]) - float(m_remat["grad_norm"])) <= 1e-5 * float(m_plain["grad_norm"])
  assert _max_diff(p_plain, p_remat) <= 1e-5


def test_sampling_is_equal(models_and_batch):
  """The sampler (prefill + cached decode) runs on a remat model and draws the same tokens."""
  plain, remat, _ = models_and_batch
  rng = np.random.default_rng(3)
  grids = [(1, 4, 4), (1, 4, 6)]
  ids, mask = ref.left_pad([ref.prompt(H.CONFIG, rng, [("image", g)], (2, 6)) for g in grids])
  prompts = S.prompts_from_hf(plain, ids, mask, pixel_values=ref.pixels(rng, grids, H.CONFIG),
                              image_grid_thw=np.array(grids))
  params = S.SamplingParams(max_new_tokens=6, eos_ids=(), pad_id=0)
  outs = [S.generate(m, prompts, jax.random.key(0), params) for m in (plain, remat)]
  np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
  assert np.abs(np.asarray(outs[0].logprobs) - np.asarray(outs[1].logprobs)).max() <= 1e-6


# ------------------------------------------------------------------------------------------------
# Memory: a deeper tiny model (6 decoder layers, 6 vision blocks), compiled only.

DEEP = cfg.tiny().replace(
    vision=dataclasses.replace(cfg.tiny().vision, depth=6, fullatt_block_indexes=(2, 5)),
    text=dataclasses.replace(cfg.tiny().text, num_hidden_layers=6))


# XLA:CPU's default (concurrency-optimised) scheduler hoists the recomputation into the forward pass, which
# undoes remat; the memory-optimised scheduler keeps it in the backward, as the GPU and TPU schedulers do.
CPU_MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _temp_bytes(fn, *args) -> int:
  options = CPU_MEMORY_SCHEDULER if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(*args).compile(compiler_options=options).memory_analysis().temp_size_in_bytes


def _loss_grad_temp_bytes(remat: bool, part: str) -> int:
  model = Qwen25VL(DEEP.replace(remat=remat), nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  if part == "text":
    b, t = 4, 128
    embeds = jnp.asarray(rng.standard_normal((b, t, DEEP.text.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t), (3, b, t))
    mask = causal_mask(jnp.ones((b, t), jnp.int32))

    def loss(params):
      hidden, _ = nnx.merge(graphdef, params).language_model(embeds, positions, mask)
      return jnp.mean(hidden**2)
  else:
    grids = [(1, 16, 16), (1, 8, 12)]
    pixels = ref.pixels(rng, grids, DEEP)
    chunks = np.split(pixels, [256])
    vision = host.pack_vision_batch([(chunks, grids)], DEEP.vision)

    def loss(params):
      return jnp.mean(nnx.merge(graphdef, params).vision_features(vision) ** 2)

  return _temp_bytes(jax.grad(loss), params)


@pytest.mark.parametrize("part", ["text", "vision"])
def test_remat_reduces_compiled_temp_memory(part):
  plain, remat = _loss_grad_temp_bytes(False, part), _loss_grad_temp_bytes(True, part)
  assert remat < 0.9 * plain, (part, plain, remat)
