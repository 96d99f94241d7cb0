"""Scanned layers: stacked parameters, the scan and the unrolled loop give the same model, and the scanned program's
size does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, stacking
from noisygrpo_jax.models.qwen2_5_vl.layers import Linear
from noisygrpo_jax.sampling import sampler as S
from tests.models import hf_reference as ref


def test_stacked_parameters_are_the_layers_values():
  rngs = nnx.Rngs(3)
  layers = [Linear(4, 6, bias=True, names=("embed", "mlp"), dtype=jnp.float32, rngs=rngs) for _ in range(3)]
  stacked = stacking.stack_layers(layers)
  assert stacked.kernel.shape == (3, 4, 6) and stacking.num_layers(stacked) == 3
  assert stacked.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  assert stacked.bias.get_metadata()["out_sharding"] == ("layers", "mlp")
  for i, layer in enumerate(layers):
    np.testing.assert_array_equal(stacked.kernel[i], layer.kernel[...])
  # A layer's random values do not depend on the stacking: its i-th slice is the i-th draw of the same Rngs.
  assert not np.array_equal(stacked.kernel[0], stacked.kernel[1])


def _inputs(config, rows=2, seed=0):
  rng = np.random.default_rng(seed)
  spans = [[("image", (1, 8, 12))], [("image", (1, 4, 8))]][:rows]
  ids, mask = ref.left_pad([ref.prompt(config, rng, s, (3, 9)) for s in spans])
  grids = np.array([s[0][1] for s in spans])
  return dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(rng, grids, config), image_grid_thw=grids)


def _unrolled(model: Qwen25VL) -> Qwen25VL:
  """The same weights with config.scan_layers False."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(model.config.replace(scan_layers=False),
                                                              nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def test_scan_and_unrolled_layers_give_the_same_logits_and_gradients():
  """Float32, both vision attention kinds (blocks 1 and 3 full), GQA decoder, left padding: logits and the gradient
  of a loss through every parameter agree to float32 rounding."""
  config = cfg.tiny(remat=True)
  scanned = Qwen25VL(config, nnx.Rngs(0))
  unrolled = _unrolled(scanned)
  assert unrolled.config.scan_layers is False
  inputs = _inputs(config)
  np.testing.assert_allclose(scanned.forward_hf(**inputs), unrolled.forward_hf(**inputs), atol=1e-5, rtol=1e-5)

  prepared = scanned.prepare_hf_inputs(**inputs)
  prepared.pop("rope_deltas")

  def loss(state, graphdef):
    return jnp.mean(nnx.merge(graphdef, state)(**prepared) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = [grad(nnx.state(m, nnx.Param), nnx.graphdef(m)) for m in (scanned, unrolled)]
  flat = [dict(nnx.to_flat_state(g)) for g in grads]
  assert flat[0].keys() == flat[1].keys()
  for path in flat[0]:
    a, b = np.asarray(flat[0][path].get_value()), np.asarray(flat[1][path].get_value())
    assert np.abs(a).max() > 0, path
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_scan_and_unrolled_layers_generate_the_same_tokens():
  """The KV caches [layers, B, S, K, head_dim] flow through the scan in prefill and decode: greedy tokens and their
  log-probs equal the unrolled model's."""
  config = cfg.tiny()
  scanned = Qwen25VL(config, nnx.Rngs(1))
  prompts = S.prompts_from_hf(scanned, **_inputs(config, seed=2))
  params = S.SamplingParams(max_new_tokens=6, greedy=True, eos_ids=(), pad_id=0)
  outs = [S.generate(m, prompts, jax.random.key(0), params) for m in (scanned, _unrolled(scanned))]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)


def _lowered_size(config, batch) -> int:
  model = nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
  lowered = jax.jit(lambda s, b: nnx.merge(graphdef, s)(**b)).lower(state, abstract)
  return len(lowered.as_text())


def test_scanned_program_size_does_not_grow_with_depth():
  """The traced forward of a 2-layer / 4-block model and of an 8-layer / 16-block one: scanned, the same size (the
  body is traced once); unrolled, about 4 times larger."""
  shallow = cfg.tiny()
  deep = shallow.replace(text=dataclasses.replace(shallow.text, num_hidden_layers=8),
                         vision=dataclasses.replace(shallow.vision, depth=16, fullatt_block_indexes=(3, 7, 11, 15)))
  batch = Qwen25VL(shallow, nnx.Rngs(0)).prepare_hf_inputs(**_inputs(shallow))
  batch.pop("rope_deltas")
  scanned = [_lowered_size(c, batch) for c in (shallow, deep)]
  unrolled = [_lowered_size(c.replace(scan_layers=False), batch) for c in (shallow, deep)]
  assert scanned[1] < 1.05 * scanned[0], scanned
  assert unrolled[1] > 2.5 * unrolled[0], unrolled
