"""Token log-probs from final hidden states without materialising [B, T, V] logits.

`chunked_token_logprobs` scans over vocabulary chunks of the LM head with an online logsumexp, so the largest
intermediate is [B, T, chunk] (forward and backward: the scan body is rematerialised, so the backward pass
recomputes each chunk's logits instead of storing them). `token_logprobs_from_logits` is the naive reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[target], float32 [B, T], from full logits [B, T, V]."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("chunk_size", "return_entropy", "vocab_axis"))
def chunked_token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, chunk_size: int = 16384,
                           temperature: float = 1.0, return_entropy: bool = False, vocab_axis: int = 1):
  """log p(target) under softmax(hidden @ lm_head / temperature), computed over vocabulary chunks.

  Args:
    hidden: [B, T, D] final hidden states (after the final norm), any float dtype.
    lm_head: [D, V] LM head kernel, or with vocab_axis=0 [V, D] (the embedding table of a tied head, sliced as it
      is stored: no transposed copy of it is made).
    targets: int [B, T] token ids in [0, V).
    chunk_size: vocabulary columns per step; the last chunk is shifted back to end at V and its columns that
      the previous chunk already covered are masked to -inf, so neither the head nor the logits are padded.
    temperature: logits are divided by it (sampling temperature).
    return_entropy: also return the per-token entropy of the distribution.
    vocab_axis: the vocabulary axis of `lm_head` (1 or 0).

  Returns:
    float32 [B, T] log-probs, and float32 [B, T] entropy when `return_entropy`. The matmul accumulates in
    float32 (preferred_element_type) whatever the input dtype. Differentiable w.r.t. hidden and lm_head.
  """
  hidden = jnp.asarray(hidden)
  lm_head = jnp.asarray(lm_head)
  targets = jnp.asarray(targets, jnp.int32)
  vocab = lm_head.shape[vocab_axis]
  chunk = min(int(chunk_size), vocab)
  num_chunks = -(-vocab // chunk)
  inv_temp = jnp.asarray(1.0 / temperature, jnp.float32)
  batch_shape = hidden.shape[:-1]

  def body(carry, index):
    running_max, sum_exp, sum_exp_logit, target_logit = carry
    first = index * chunk  # first column this chunk is responsible for
    start = jnp.minimum(first, vocab - chunk)  # the last chunk is shifted back so the slice stays in bounds
    weights = jax.lax.dynamic_slice_in_dim(lm_head, start, chunk, axis=vocab_axis)
    spec = "...d,dv->...v" if vocab_axis == 1 else "...d,vd->...v"
    logits = jnp.einsum(spec, hidden, weights, preferred_element_type=jnp.float32) * inv_temp
    cols = start + jnp.arange(chunk, dtype=jnp.int32)
    logits = jnp.where(cols >= first, logits, -jnp.inf)
    # The running max only stabilises the sums; lse does not depend on it, so it takes no gradient.
    new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(-1)))
    scale = jnp.exp(running_max - new_max)
    probs = jnp.exp(logits - new_max[..., None])
    sum_exp = sum_exp * scale + probs.sum(-1)
    if return_entropy:
      sum_exp_logit = sum_exp_logit * scale + (probs * jnp.where(cols >= first, logits, 0.0)).sum(-1)
    hit = (cols == targets[..., None]) & (cols >= first)
    target_logit = target_logit + jnp.where(hit, logits, 0.0).sum(-1)
    return (new_max, sum_exp, sum_exp_logit, target_logit), None

  zeros = jnp.zeros(batch_shape, jnp.float32)
  init = (jnp.full(batch_shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
  (running_max, sum_exp, sum_exp_logit, target_logit), _ = jax.lax.scan(
      jax.checkpoint(body), init, jnp.arange(num_chunks, dtype=jnp.int32))
  lse = running_max + jnp.log(sum_exp)
  logps = target_logit - lse
  if not return_entropy:
    return logps
  entropy = lse - sum_exp_logit / sum_exp  # H = lse - E_p[logit]
  return logps, entropy


def logprob_drift(sampler_logps, trainer_logps, mask) -> dict[str, jax.Array]:
  """How far the trainer's recomputed log-probs are from the sampler's for the same tokens.

  Both are log p(token) at temperature 1 without truncation; on the same weights and image they differ only by
  numerical noise, so a larger gap means the two passes see different inputs (padding, positions, images).

  Args:
    sampler_logps, trainer_logps: float [B, T].
    mask: [B, T], nonzero where a token counts.
  Returns:
    float32 scalars "abs_diff" (mean |difference| over counted tokens), "max_abs_diff", and "correlation" (Pearson,
    over counted tokens; NaN with fewer than 2 tokens or a constant side).
  """
  a, b = jnp.asarray(sampler_logps, jnp.float32), jnp.asarray(trainer_logps, jnp.float32)
  w = (jnp.asarray(mask) != 0).astype(jnp.float32)
  n = w.sum()
  diff = jnp.abs(a - b) * w
  mean = lambda x: (x * w).sum() / jnp.maximum(n, 1.0)
  da, db = (a - mean(a)) * w, (b - mean(b)) * w
  var_a, var_b = (da * da).sum(), (db * db).sum()
  defined = (n >= 2) & (var_a > 0) & (var_b > 0)
  correlation = jnp.where(defined, (da * db).sum() / jnp.sqrt(jnp.where(defined, var_a * var_b, 1.0)), jnp.nan)
  return {"abs_diff": diff.sum() / jnp.maximum(n, 1.0), "max_abs_diff": diff.max(), "correlation": correlation}
