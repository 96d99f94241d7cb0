"""Chunked log-probs equal the naive log-softmax gather (values, entropy, gradients) without [B, T, V] arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisygrpo_jax.rl import logprobs as lp_lib

QWEN_VOCAB = 151_665


def _inputs(vocab, b=2, t=8, d=32, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((b, t, d), np.float32))
  lm_head = jnp.asarray(rng.standard_normal((d, vocab), np.float32) * np.float32(scale / np.sqrt(d)))
  targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
  # Some targets in the last, partial chunk and at both ends of the vocabulary.
  targets = targets.at[0, 0].set(vocab - 1).at[0, 1].set(0).at[1, 0].set(vocab - 2)
  return hidden, lm_head, targets


def _naive(hidden, lm_head, targets, temperature=1.0):
  logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), lm_head.astype(jnp.float32))
  return lp_lib.token_logprobs_from_logits(logits, targets, temperature=temperature)


def _naive_entropy(hidden, lm_head, temperature=1.0):
  logits = jnp.einsum("btd,dv->btv", hidden, lm_head) / temperature
  logp = jax.nn.log_softmax(logits, -1)
  return -(jnp.exp(logp) * logp).sum(-1)


def test_token_logprobs_from_logits_by_hand():
  logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], np.float32)
  out = np.asarray(lp_lib.token_logprobs_from_logits(jnp.asarray(logits), jnp.array([[2, 1]])))
  lse = np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
  np.testing.assert_allclose(out, [[3.0 - lse, -np.log(3.0)]], atol=1e-6)


def test_qwen_vocabulary_with_16k_chunks():
  hidden, lm_head, targets = _inputs(QWEN_VOCAB, scale=4.0)
  fn = jax.jit(lambda h, w, y: lp_lib.chunked_token_logprobs(h, w, y, chunk_size=16384, return_entropy=True))
  logps, entropy = fn(hidden, lm_head, targets)
  assert logps.shape == (2, 8) and logps.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logps), np.asarray(_naive(hidden, lm_head, targets)), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(entropy), np.asarray(_naive_entropy(hidden, lm_head)), atol=1e-4, rtol=0)
  # Gradients w.r.t. the hidden states at full vocabulary size.
  g_chunk = jax.jit(jax.grad(lambda h: lp_lib.chunked_token_logprobs(h, lm_head, targets).sum()))(hidden)
  g_naive = jax.jit(jax.grad(lambda h: _naive(h, lm_head, targets).sum()))(hidden)
  np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_naive), atol=1e-4, rtol=1e-4)


# A partial last chunk, an exact multiple, a chunk larger than the vocabulary.
@pytest.mark.parametrize("vocab, chunk", [(1000, 128), (1024, 256), (300, 512)])
def test_values_and_gradients_match_naive(vocab, chunk):
  hidden, lm_head, targets = _inputs(vocab, seed=vocab, scale=3.0)
  temperature = 0.7
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(targets.shape), jnp.float32)

  def chunked(h, w):
    logps, ent = lp_lib.chunked_token_logprobs(h, w, targets, chunk_size=chunk, temperature=temperature,
                                               return_entropy=True)
    return (logps * weights).sum() + 0.1 * ent.sum(), (logps, ent)

  def naive(h, w):
    logps, ent = _naive(h, w, targets, temperature), _naive_entropy(h, w, temperature)
    return (logps * weights).sum() + 0.1 * ent.sum(), (logps, ent)

  (_, (lp_c, ent_c)), grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, lm_head)
  (_, (lp_n, ent_n)), grads_n = jax.jit(jax.value_and_grad(naive, argnums=(0, 1), has_aux=True))(hidden, lm_head)
  np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_n), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent_n), atol=1e-5, rtol=0)
  for gc, gn in zip(grads_c, grads_n):
    assert np.isfinite(np.asarray(gc)).all()
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gn), atol=1e-5, rtol=1e-4)


def test_vocabulary_major_head_equals_the_transposed_kernel():
  """vocab_axis=0 slices a tied embedding table [V, D] directly: same log-probs, entropy and gradients as [D, V]."""
  hidden, lm_head, targets = _inputs(1000)
  fn = lambda h, w, axis: lp_lib.chunked_token_logprobs(h, w, targets, chunk_size=128, return_entropy=True,
                                                        vocab_axis=axis)
  for a, b in zip(fn(hidden, lm_head, 1), fn(hidden, lm_head.T, 0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  grad = lambda w, axis: jax.grad(lambda h, w: fn(h, w, axis)[0].sum(), argnums=(0, 1))(hidden, w)
  (gh1, gw1), (gh0, gw0) = grad(lm_head, 1), grad(lm_head.T, 0)
  np.testing.assert_allclose(np.asarray(gh1), np.asarray(gh0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gw1), np.asarray(gw0).T, rtol=1e-5, atol=1e-6)


def test_bfloat16_hidden_states_accumulate_in_float32():
  hidden, lm_head, targets = _inputs(1000)
  hidden, lm_head = hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16)
  out = lp_lib.chunked_token_logprobs(hidden, lm_head, targets, chunk_size=128)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(_naive(hidden, lm_head, targets)), atol=1e-5)


def _all_shapes(jaxpr, out):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      out.append(tuple(getattr(var.aval, "shape", ())))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _all_shapes(inner, out)
  return out


def test_no_batch_by_vocabulary_array_is_materialised():
  vocab, chunk, b, t, d = 10_000, 1024, 2, 8, 32
  hidden, lm_head, targets = _inputs(vocab, b=b, t=t, d=d)

  def loss(h, w):
    logps, ent = lp_lib.chunked_token_logprobs(h, w, targets, chunk_size=chunk, return_entropy=True)
    return logps.sum() + ent.sum()

  shapes = _all_shapes(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, lm_head).jaxpr, [])
  assert shapes
  for shape in shapes:
    if vocab in shape:
      assert shape == (d, vocab), shape  # only the LM head and its gradient span the vocabulary
    assert int(np.prod(shape)) <= max(d * vocab, b * t * chunk), shape
  # The naive path does create [B, T, V] (so the walk above would catch it).
  naive_shapes = _all_shapes(jax.make_jaxpr(lambda h, w: _naive(h, w, targets).sum())(hidden, lm_head).jaxpr, [])
  assert (b, t, vocab) in naive_shapes


def test_jit_and_vmap_over_a_leading_axis():
  hidden, lm_head, targets = _inputs(1000)
  hiddens = jnp.stack([hidden, 2 * hidden])
  targets2 = jnp.stack([targets, targets[:, ::-1]])
  fn = lambda h, y: lp_lib.chunked_token_logprobs(h, lm_head, y, chunk_size=128)
  batched = jax.jit(jax.vmap(fn))(hiddens, targets2)
  for e in range(2):
    np.testing.assert_allclose(np.asarray(batched[e]), np.asarray(_naive(hiddens[e], lm_head, targets2[e])),
                               atol=1e-5)
