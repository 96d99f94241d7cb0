"""Scanned layers: stacked parameters, the scan and the unrolled loop give the same model, and the scanned program's
size does not grow with depth."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, layers, stacking, unstacked_decoder
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
  unstacked = stacking.unstack_layers(stacked)  # back to one module per layer, with each layer's sharding names
  assert stacking.num_layers(unstacked) == 3
  for layer, original in zip(unstacked.layers, layers):
    np.testing.assert_array_equal(layer.kernel[...], original.kernel[...])
    assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


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


def _arrays_computed_in_loop(hlo: str, function: str = "decode") -> list[tuple[tuple[int, ...], str]]:
  """(dims, what computes it) of every array that the body of the compiled while loop of jitted `function` (and
  what it calls) computes rather than reads: "dynamic-update-slice" for an in-place cache write (the op, or a fusion
  whose root it is), else the opcode."""
  computations, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if header and line.rstrip().endswith("{"):
      name = header.group(1)
      computations[name] = []
    elif name and line.strip() == "}":
      name = None
    elif name:
      computations[name].append(line)
  root = {name: re.search(r"ROOT %\S+ = \S+ ([\w\-]+)\(", "\n".join(lines)) for name, lines in computations.items()}
  loop = next(line for lines in computations.values() for line in lines
              if " while(" in line and f'op_name="jit({function})/while"' in line)
  todo, seen, found = [re.search(r"body=%([\w.\-]+)", loop).group(1)], set(), []
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in computations[name]:
      called = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", line)
      todo += called
      op = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
      if op and op.group(2) not in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
        kind = op.group(2)
        if kind == "fusion" and root[called[0]] and root[called[0]].group(1) == "dynamic-update-slice":
          kind = "dynamic-update-slice"
        found.append((tuple(int(d) for d in op.group(1).split(",") if d), kind))
  return found


def test_decoding_from_unstacked_layers_copies_no_weight_or_cache_and_gives_the_same_tokens():
  """`generate` decodes from the layers unstacked (`unstacked_decoder`: one array per weight and one KV cache
  [B, K, S, head_dim] per layer): the compiled decode loop makes no copy of any decoder weight or KV cache (it writes
  each cache in place), where from the stacks, scanned or unrolled, it copies every layer's weights and caches each
  step; greedy tokens and log-probs equal those of the stacked layers."""
  config = cfg.tiny()
  scanned = Qwen25VL(config, nnx.Rngs(1))
  prompts = S.prompts_from_hf(scanned, **_inputs(config, seed=2))
  params = S.SamplingParams(max_new_tokens=6, greedy=True, eos_ids=(), pad_id=0)
  out = S.generate(scanned, prompts, jax.random.key(0), params)
  unstacked = unstacked_decoder(scanned)
  assert isinstance(unstacked.language_model.layers, stacking.LayerList) and unstacked_decoder(unstacked) is unstacked
  matrices = {x.shape[1:] for x in jax.tree.leaves(nnx.state(scanned.language_model.layers)) if x.ndim == 3}
  weights = matrices | {shape[::-1] for shape in matrices}  # a transposed copy counts too
  t = config.text
  cache = sorted((2, t.num_key_value_heads, prompts.input_ids.shape[1] + 6, t.head_dim))  # any axis order
  copies = {}
  for name, model in (("scan", scanned), ("unrolled", _unrolled(scanned)), ("unstacked", unstacked)):
    graphdef, state = nnx.split(model)
    decode_state = S.prefill(graphdef, state, prompts, jax.random.key(0), params)
    hlo = S.decode.lower(graphdef, state, decode_state, prompts.input_ids.shape[1], params).compile().as_text()
    made = _arrays_computed_in_loop(hlo)
    copies[name] = (sum(dims in weights for dims, _ in made),
                    sum(sorted(dims) == cache and kind != "dynamic-update-slice" for dims, kind in made))
    final = S.decode(graphdef, state, decode_state, prompts.input_ids.shape[1], params)
    np.testing.assert_array_equal(final.tokens, out.tokens)
    np.testing.assert_allclose(final.logprobs, out.logprobs, atol=1e-5)
  assert copies["unstacked"] == (0, 0), copies
  assert copies["scan"][0] >= 7 and copies["unrolled"][0] >= 14, copies

  # The cache check can fail: a cache [B, S, K, head_dim] written and read by the same einsums each step is
  # transposed whole every step.
  def sequence_major(q, k, mask):
    def body(carry):
      step, k = carry
      k = jax.lax.dynamic_update_slice(k, q[:, :, :t.num_key_value_heads], (0, step, 0, 0))
      return step + 1, k + layers._einsum_attention(q, k, k, mask)[:, :, :t.num_key_value_heads].sum(1, keepdims=True)
    return jax.lax.while_loop(lambda carry: carry[0] < 3, body, (0, k))[1]

  b, s, k, d = 2, 46, t.num_key_value_heads, t.head_dim
  args = (jnp.ones((b, 1, t.num_attention_heads, d)), jnp.ones((b, s, k, d)), jnp.ones((b, 1, s), bool))
  made = _arrays_computed_in_loop(jax.jit(sequence_major).lower(*args).compile().as_text(), "sequence_major")
  assert any(sorted(dims) == sorted((b, s, k, d)) and kind != "dynamic-update-slice" for dims, kind in made), made


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
