"""The jitted sampler against transformers' generate and against uncached forward passes (tiny model)."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.sampling import sampler as S
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()
GRIDS = [(1, 8, 12), (1, 6, 10)]


@pytest.fixture(scope="module")
def setup():
  hf = ref.hf_model(CONFIG)
  ours = ref.ours_from_hf(hf, CONFIG)
  rng = np.random.default_rng(0)
  rows = [ref.prompt(CONFIG, rng, [("image", GRIDS[0])]), ref.prompt(CONFIG, rng, [("image", GRIDS[1])], (5, 12))]
  ids, mask = ref.left_pad(rows)
  pv = ref.pixels(rng, GRIDS, CONFIG)
  return hf, ours, ids, mask, pv


def _prompts(ours, ids, mask, pv):
  return S.prompts_from_hf(ours, ids, mask, pixel_values=pv, image_grid_thw=np.array(GRIDS))


def _teacher_forced_logits(ours, ids, mask, pv, tokens, token_mask):
  """Uncached forward over prompt + completion; returns logits predicting each completion token."""
  full_ids = np.concatenate([ids, tokens], axis=1)
  full_mask = np.concatenate([mask, token_mask], axis=1)
  logits = np.asarray(ours.forward_hf(full_ids, full_mask, pixel_values=pv, image_grid_thw=np.array(GRIDS)))
  t = ids.shape[1]
  return logits[:, t - 1:t - 1 + tokens.shape[1]]


def test_greedy_equals_hf_generate(setup):
  hf, ours, ids, mask, pv = setup
  params = S.SamplingParams(max_new_tokens=32, greedy=True, eos_ids=(), pad_id=0)
  out = S.generate(ours, _prompts(ours, ids, mask, pv), jax.random.key(0), params)
  with torch.no_grad():
    expected = hf.generate(**ref.hf_inputs(CONFIG, ids, mask, pixel_values=pv, image_grid_thw=np.array(GRIDS)),
                           do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                           pad_token_id=0)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  assert np.asarray(out.mask).all()


def test_every_decode_step_matches_uncached_forward(setup):
  _, ours, ids, mask, pv = setup
  params = S.SamplingParams(max_new_tokens=12, greedy=True, eos_ids=(), pad_id=0)
  graphdef, state = nnx.split(ours)
  decode_state = S.prefill(graphdef, state, _prompts(ours, ids, mask, pv), jax.random.key(0), params)
  step = jax.jit(lambda s: S.decode_step(nnx.merge(graphdef, state), s, ids.shape[1], params))
  step_logits = []
  for _ in range(params.max_new_tokens):
    step_logits.append(np.asarray(decode_state.logits))
    decode_state = step(decode_state)
  tokens = np.asarray(decode_state.tokens)
  expected = _teacher_forced_logits(ours, ids, mask, pv, tokens, np.ones_like(tokens))
  assert np.abs(np.stack(step_logits, axis=1) - expected).max() <= 1e-4


def test_rows_stop_independently_and_logprobs_match_teacher_forcing(setup):
  _, ours, ids, mask, pv = setup
  prompts = _prompts(ours, ids, mask, pv)
  free = S.generate(ours, prompts, jax.random.key(1), S.SamplingParams(max_new_tokens=16, eos_ids=(), pad_id=0))
  row0 = np.asarray(free.tokens)[0]
  stop = next(k for k in range(3, 16) if row0[k] not in row0[:k])  # first token that appears first at step k
  params = S.SamplingParams(max_new_tokens=16, eos_ids=(int(row0[stop]),), pad_id=0)
  out = S.generate(ours, prompts, jax.random.key(1), params)  # same key: same draws until the stop
  tokens, out_mask = np.asarray(out.tokens), np.asarray(out.mask)
  np.testing.assert_array_equal(tokens[0, :stop + 1], row0[:stop + 1])
  assert out_mask[0, :stop + 1].all() and not out_mask[0, stop + 1:].any()
  assert (tokens[0, stop + 1:] == 0).all() and int(out.lengths[0]) == stop + 1
  row1_stop = np.flatnonzero(np.asarray(free.tokens)[1] == row0[stop])
  assert int(out.lengths[1]) == (row1_stop[0] + 1 if row1_stop.size else 16)

  logits = _teacher_forced_logits(ours, ids, mask, pv, tokens, out_mask)
  expected = np.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
  assert np.abs((expected - np.asarray(out.logprobs)) * out_mask).max() <= 1e-4
  assert (np.asarray(out.logprobs)[out_mask == 0] == 0).all()


def test_same_key_same_samples_different_key_different(setup):
  _, ours, ids, mask, pv = setup
  prompts = _prompts(ours, ids, mask, pv)
  params = S.SamplingParams(max_new_tokens=8, top_k=50, top_p=0.9, eos_ids=(), pad_id=0)
  a = np.asarray(S.generate(ours, prompts, jax.random.key(3), params).tokens)
  b = np.asarray(S.generate(ours, prompts, jax.random.key(3), params).tokens)
  c = np.asarray(S.generate(ours, prompts, jax.random.key(4), params).tokens)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_prefill_in_micro_batches_equals_one_prefill(setup):
  """rl.prefill_micro_batches: the rows prefilled in parts give the same cache, logits and samples."""
  _, ours, ids, mask, pv = setup
  prompts = _prompts(ours, ids, mask, pv)
  graphdef, state = nnx.split(ours)
  params = S.SamplingParams(max_new_tokens=6, top_k=50, eos_ids=(), pad_id=0)
  one = S.prefill(graphdef, state, prompts, jax.random.key(0), params)
  two = S.prefill(graphdef, state, prompts, jax.random.key(0), dataclasses.replace(params, prefill_micro_batches=2))
  for a, b in zip(jax.tree.leaves(one.replace(key=None)), jax.tree.leaves(two.replace(key=None))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  tokens = [np.asarray(S.generate(ours, prompts, jax.random.key(1), p).tokens)
            for p in (params, dataclasses.replace(params, prefill_micro_batches=2))]
  np.testing.assert_array_equal(*tokens)
  with pytest.raises(ValueError, match="rl.prefill_micro_batches=3"):
    S.prefill(graphdef, state, prompts, jax.random.key(0), dataclasses.replace(params, prefill_micro_batches=3))


def test_second_call_in_the_same_bucket_does_not_compile(setup):
  _, ours, ids, mask, pv = setup
  params = S.SamplingParams(max_new_tokens=4, eos_ids=(), pad_id=0)
  S.generate(ours, _prompts(ours, ids, mask, pv), jax.random.key(0), params)
  sizes = S.prefill._cache_size(), S.decode._cache_size()
  rng = np.random.default_rng(11)
  other_ids = ids.copy()
  text = (other_ids < CONFIG.text.vocab_size - 8) & (mask == 1)
  other_ids[text] = rng.integers(0, CONFIG.text.vocab_size - 8, text.sum())
  S.generate(ours, _prompts(ours, other_ids, mask, ref.pixels(rng, GRIDS, CONFIG)), jax.random.key(5), params)
  assert (S.prefill._cache_size(), S.decode._cache_size()) == sizes


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.7, 1.0), (4, 0.8, 0.7)])
def test_sampling_frequencies_match_the_truncated_distribution(top_k, top_p, temperature):
  logits = jnp.log(jnp.asarray([0.3, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]))
  # HF's warpers by hand: temperature, keep the top k, then the smallest prefix of mass >= top_p.
  probs = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  order = np.argsort(-probs)
  keep = np.zeros(8, bool)
  keep[order[:top_k or 8]] = True
  kept = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
  mass, chosen = 0.0, np.zeros(8, bool)
  for i in order:
    if kept[i] == 0 or mass >= top_p:
      break
    chosen[i], mass = True, mass + kept[i]
  expected = np.where(chosen, kept, 0) / np.where(chosen, kept, 0).sum()

  params = S.SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature)
  draws = 20000
  keys = jax.random.split(jax.random.key(0), draws)
  tokens, _ = jax.vmap(lambda k: S.sample_token(k, logits[None], params))(keys)
  counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=8)
  assert (counts[~chosen] == 0).all()
  _, p_value = scipy.stats.chisquare(counts[chosen], draws * expected[chosen])
  assert p_value > 0.001


def test_sharded_batch_equals_single_device(tmp_path):
  """Rows split over 8 devices give the single device's tokens; given the mesh, prefill and decode keep every
  [B, ...] leaf of the decode state and each layer's KV cache [B, S, K, head_dim] rows-split over the batch axes (the
  step and key replicated); with the rollout layout (Run.rollout_params: weights replicated, decoder layers
  unstacked) the compiled decode loop holds no collective but the all-rows stop check's all-reduce, while the
  training layout (FSDP) communicates inside it every step (weights all-gathered or partial matmul outputs
  all-reduced, as XLA chooses: 4 all-gathers and 7 all-reduces for 2 layers when written). The Pallas decode kernel
  (rl.decode_kernel="pallas", interpreted) runs on each device's rows: the same tokens, no collective added."""
  script = textwrap.dedent("""
      import dataclasses, os, re
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax, numpy as np
      from flax import nnx
      from jax.sharding import NamedSharding, PartitionSpec as P
      from noisygrpo_jax import sharding
      from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as cfg, unstacked_decoder
      from noisygrpo_jax.sampling import sampler as S
      from tests.models import hf_reference as ref
      c = cfg.tiny()
      model = Qwen25VL(c, nnx.Rngs(0))
      rng = np.random.default_rng(0)
      grids = [(1, 4, 4 + 2 * (i % 3)) for i in range(8)]
      ids, mask = ref.left_pad([ref.prompt(c, rng, [("image", g)]) for g in grids])
      prompts = S.prompts_from_hf(model, ids, mask, pixel_values=ref.pixels(rng, grids, c),
                                  image_grid_thw=np.array(grids))
      params = S.SamplingParams(max_new_tokens=6, eos_ids=(), pad_id=0)
      single = S.generate(model, prompts, jax.random.key(0), params)
      mesh = sharding.make_mesh(data=2, fsdp=4)
      rows = lambda x, axis=0: jax.device_put(
          x, NamedSharding(mesh, P(*[("data", "fsdp") if i == axis else None for i in range(x.ndim)])))
      sharded = jax.tree.map(rows, prompts.replace(position_ids=None)).replace(
          position_ids=rows(prompts.position_ids, axis=1))
      assert len(sharded.input_ids.sharding.device_set) == 8
      out = S.generate(model, sharded, jax.random.key(0), params, mesh=mesh)
      np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))
      assert np.abs(np.asarray(out.logprobs) - np.asarray(single.logprobs)).max() <= 1e-5

      def spec(x):  # trailing unsharded axes written out
        return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
      batch = ("data", "fsdp")
      cache = (batch, None, None, None)

      def check_layout(state):
        specs = {jax.tree_util.keystr(p): spec(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}
        want = {k: cache if k.startswith(".caches") else () if k in (".step", ".key") else
                (batch,) + (None,) * (len(v) - 1) for k, v in specs.items()}
        assert specs == want, specs

      graphdef, state = nnx.split(unstacked_decoder(model))  # the layout generate decodes from
      layouts = {"replicated": jax.device_put(state, NamedSharding(mesh, P())),
                 "train": jax.device_put(nnx.to_pure_dict(state), sharding.param_shardings(state, mesh))}
      counts = {}
      for name, weights in layouts.items():
        decode_state = S.prefill(graphdef, weights, sharded, jax.random.key(0), params, mesh)
        check_layout(decode_state)
        hlo = S.decode.lower(graphdef, weights, decode_state, ids.shape[1], params, mesh).compile().as_text()
        counts[name] = {op: len(re.findall(rf"= \\S+ {op}(-start)?\\(", hlo))
                        for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")}
        final = S.decode(graphdef, weights, decode_state, ids.shape[1], params, mesh)
        check_layout(final)
        np.testing.assert_array_equal(np.asarray(final.tokens), np.asarray(single.tokens))
      assert counts["replicated"] == {"all-gather": 0, "all-reduce": 1, "reduce-scatter": 0,
                                      "collective-permute": 0, "all-to-all": 0}, counts
      assert counts["train"]["all-gather"] + counts["train"]["all-reduce"] >= 7, counts

      # The Pallas decode kernel (interpreted on CPU) on each device's rows (shard_map), slots tiled by 16.
      kernel_params = dataclasses.replace(params, decode_kernel="pallas",
                                          max_new_tokens=6 + (-(ids.shape[1] + 6)) % 16)
      weights = layouts["replicated"]
      decode_state = S.prefill(graphdef, weights, sharded, jax.random.key(0), kernel_params, mesh)
      hlo = S.decode.lower(graphdef, weights, decode_state, ids.shape[1], kernel_params, mesh).compile().as_text()
      assert len(re.findall(r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                            r"(-start)?\(", hlo)) == 1, "collectives besides the stop check's all-reduce"
      final = S.decode(graphdef, weights, decode_state, ids.shape[1], kernel_params, mesh)
      check_layout(final)
      np.testing.assert_array_equal(np.asarray(final.tokens)[:, :6], np.asarray(single.tokens))
      print("SHARDED_OK", counts)
      """)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


def test_kth_largest_equals_the_sorted_rows_kth_entry():
  rng = np.random.default_rng(0)
  values = (rng.normal(size=(6, 300)) * 10.0 ** rng.integers(-30, 30, (6, 1))).astype(np.float32)
  values[0, :40] = 1.5  # ties across the k-th place
  values[1] = -np.abs(values[1])  # all negative
  values[2, 100:] = -np.inf  # masked entries
  values[3, :7] = np.inf
  values[4, :3], values[4, 3:20] = 0.0, -0.0
  values[5] = rng.integers(-3, 3, 300)  # few distinct values
  for k in (1, 2, 7, 20, 50, 299, 300):
    expected = -np.sort(-values, axis=-1)[:, k - 1:k]
    got = np.asarray(jax.jit(S.kth_largest, static_argnums=1)(values, k))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(values, k)[0][:, -1:]))
