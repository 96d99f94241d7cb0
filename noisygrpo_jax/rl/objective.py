"""The clipped-ratio policy loss with a KL penalty, its aggregation modes, and `mask_noise_correct` (spec 3, 8).

Per token (B sequences, T completion positions):

  ratio = exp(logp - logp_old)
  l     = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta KL(logp, logp_ref)
  l    *= tau                                    (the per-trajectory mask, e.g. `mask_noise_correct`)

and the loss is an aggregation of l over the completion mask m. Every aggregation is a ratio
numerator / denominator of sums over sequences, so a trainer can accumulate both over micro-batches and
divide once, which gives exactly the full-batch loss:

  "sequence_mean_token_mean"   sum_i [sum_t m l / sum_t m]  /  #sequences      (the original GRPO / TRL form)
  "token_mean"                 sum_{i,t} m l               /  sum_{i,t} m     (DAPO)
  "sequence_sum_over_max_len"  sum_{i,t} m l               /  (#sequences T_max)   (Dr.GRPO)

#sequences counts the rows with at least one completion token, so all-padding rows added to fill a batch
bucket count nowhere. A trajectory masked by tau (all tau = 0 rows) still has completion tokens, so it still
counts in every denominator, as in the original (spec 3: "it still counts in the per-device mean").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------------------
# KL estimators of KL(pi_theta || pi_ref) per token, from the sampled token's log-probs.


def kl_k1(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """k1 = logp - logp_ref (unbiased, high variance, can be negative)."""
  return logps - ref_logps


def kl_k2(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """k2 = (logp - logp_ref)^2 / 2."""
  return 0.5 * jnp.square(logps - ref_logps)


def kl_k3(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 >= 0, the original's estimator."""
  d = ref_logps - logps
  return jnp.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# ------------------------------------------------------------------------------------------------
# Aggregation: (per_token_loss [B, T], mask [B, T], max_len) -> (numerator, denominator) float32 scalars.


def _nonempty_rows(mask: jax.Array) -> jax.Array:
  return (mask.sum(-1) > 0).astype(jnp.float32)


def _sequence_mean_token_mean(loss, mask, max_len=None):
  del max_len
  tokens = mask.sum(-1)
  per_seq = (loss * mask).sum(-1) / jnp.maximum(tokens, 1.0)
  return per_seq.sum(), _nonempty_rows(mask).sum()


def _token_mean(loss, mask, max_len=None):
  del max_len
  return (loss * mask).sum(), mask.sum()


def _sequence_sum_over_max_len(loss, mask, max_len=None):
  max_len = loss.shape[-1] if max_len is None else max_len
  return (loss * mask).sum(), _nonempty_rows(mask).sum() * jnp.float32(max_len)


AGGREGATION_MODES: dict[str, Callable] = {
    "sequence_mean_token_mean": _sequence_mean_token_mean,
    "token_mean": _token_mean,
    "sequence_sum_over_max_len": _sequence_sum_over_max_len,
}


def aggregate(per_token_loss: jax.Array, mask: jax.Array, mode: str = "sequence_mean_token_mean", *,
              max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the aggregated loss; the loss is numerator / denominator (0 if that is 0).

  Args:
    per_token_loss: float [B, T], already multiplied by any trajectory mask.
    mask: [B, T] completion mask (bool or float).
    mode: a key of AGGREGATION_MODES.
    max_len: T_max for "sequence_sum_over_max_len" (the configured max completion length; default T).

  Both are float32 scalars and additive over disjoint sets of sequences (micro-batches).
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(AGGREGATION_MODES)}")
  loss = jnp.asarray(per_token_loss, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask), loss.shape).astype(jnp.float32)
  return AGGREGATION_MODES[mode](loss, mask, max_len)


def _ratio(num, den):
  """num / den, and 0 where den == 0 (an empty batch), with a NaN-free gradient."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------
# The loss.


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Per-position entropy -sum_v p log p of softmax(logits / temperature), float32 [..., T].

  Materialises the full logits: for large vocabularies use `logprobs.chunked_token_logprobs(...,
  return_entropy=True)` and pass `entropy=` instead.
  """
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)


def per_token_policy_loss(logps, old_logps, advantages, *, ref_logps=None, eps_low: float = 0.2,
                          eps_high: float = 0.2, kl_estimator: str = "k3", mask=None):
  """The per-token terms, float32 [B, T]: (pg, kl, ratio, clipped_low, clipped_high).

  pg = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A); kl is the chosen estimator (0 when
  ref_logps is None). clipped_low/high flag tokens where the clip is the active branch: A < 0 with
  ratio < 1 - eps_low, and A > 0 with ratio > 1 + eps_high (only there is the gradient cut).

  mask: optional [B, T]; where it is 0 (padding) the log-prob differences are set to 0 before the exponentials,
  so whatever log-probs padding holds give ratio 1 and kl 0 there, never inf or NaN (which a later
  multiplication by the mask would not remove, in the loss or in its gradient).
  """
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
  logps = jnp.asarray(logps, jnp.float32)
  valid = True if mask is None else jnp.asarray(mask) > 0
  masked_difference = lambda other: jnp.where(valid, jnp.asarray(other, jnp.float32) - logps, 0.0)
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == logps.ndim - 1:
    adv = adv[..., None]  # one advantage per sequence, broadcast over its tokens
  ratio = jnp.exp(-masked_difference(old_logps))
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  pg = -jnp.minimum(unclipped, clipped)
  clipped_low = (adv < 0) & (ratio < 1.0 - eps_low)
  clipped_high = (adv > 0) & (ratio > 1.0 + eps_high)
  if ref_logps is None:
    kl = jnp.zeros_like(logps)
  else:
    # Every estimator is a function of logp_ref - logp alone: evaluate it at (0, the masked difference).
    ref_minus_logp = masked_difference(ref_logps)
    kl = KL_ESTIMATORS[kl_estimator](jnp.zeros_like(ref_minus_logp), ref_minus_logp)
  return pg, kl, ratio, jnp.broadcast_to(clipped_low, logps.shape), jnp.broadcast_to(clipped_high, logps.shape)


def _is_zero(x) -> bool:
  try:
    return float(x) == 0.0
  except Exception:  # a traced beta: it may be nonzero
    return False


def policy_loss_terms(logps, old_logps, advantages, completion_mask, *, ref_logps=None, trajectory_mask=None,
                      eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04, kl_estimator: str = "k3",
                      aggregation: str = "sequence_mean_token_mean", max_len: int | None = None,
                      logits=None, entropy=None, temperature: float = 1.0):
  """Like `policy_loss` but returns (numerator, denominator, metric_sums) for exact micro-batch accumulation.

  metric_sums holds token sums ("clip_count", "clip_low_count", "clip_high_count", "kl_sum", "ratio_sum",
  "entropy_sum") and their normaliser "token_count" (valid tokens: completion mask and trajectory mask != 0),
  plus "pg_numerator" and "kl_numerator", the two parts of the loss numerator (before beta for KL).
  Sum each over micro-batches, then call `metrics_from_sums`.
  """
  if ref_logps is None and not _is_zero(beta):
    raise ValueError(f"beta={beta} needs ref_logps; pass the reference model's log-probs or set beta=0")
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
  if aggregation not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {aggregation!r}; choose one of {sorted(AGGREGATION_MODES)}")
  logps = jnp.asarray(logps, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(completion_mask), logps.shape).astype(jnp.float32)
  pg, kl, ratio, clip_low, clip_high = per_token_policy_loss(
      logps, old_logps, advantages, ref_logps=ref_logps, eps_low=eps_low, eps_high=eps_high,
      kl_estimator=kl_estimator, mask=mask)
  if trajectory_mask is None:
    trajectory_mask = jnp.ones(logps.shape[:-1], jnp.float32)
  tau = jnp.asarray(trajectory_mask, jnp.float32)[..., None]
  pg_num, den = aggregate(pg * tau, mask, aggregation, max_len=max_len)
  kl_num, _ = aggregate(kl * tau, mask, aggregation, max_len=max_len)
  num = pg_num + beta * kl_num

  valid = mask * (tau != 0)
  sums = {
      "token_count": valid.sum(),
      "clip_low_count": (clip_low * valid).sum(),
      "clip_high_count": (clip_high * valid).sum(),
      "kl_sum": (kl * valid).sum(),
      "ratio_sum": (ratio * valid).sum(),
      "pg_numerator": pg_num,
      "kl_numerator": kl_num,
  }
  sums["clip_count"] = sums["clip_low_count"] + sums["clip_high_count"]
  if logits is not None:
    entropy = entropy_from_logits(logits, temperature=temperature)
  if entropy is not None:
    sums["entropy_sum"] = (jax.lax.stop_gradient(jnp.asarray(entropy, jnp.float32)) * valid).sum()
  return num, den, sums


def metrics_from_sums(num, den, sums) -> dict[str, jax.Array]:
  """Turns accumulated `policy_loss_terms` outputs into the metrics of `policy_loss`."""
  tokens = sums["token_count"]
  metrics = {
      "loss": _ratio(num, den),
      "pg_loss": _ratio(sums["pg_numerator"], den),
      "kl_loss": _ratio(sums["kl_numerator"], den),
      "kl_mean": _ratio(sums["kl_sum"], tokens),
      "ratio_mean": _ratio(sums["ratio_sum"], tokens),
      "clip_fraction": _ratio(sums["clip_count"], tokens),
      "clip_fraction_low": _ratio(sums["clip_low_count"], tokens),
      "clip_fraction_high": _ratio(sums["clip_high_count"], tokens),
  }
  if "entropy_sum" in sums:
    metrics["entropy_mean"] = _ratio(sums["entropy_sum"], tokens)
  return jax.tree.map(jax.lax.stop_gradient, metrics)


def policy_loss(logps, old_logps, advantages, completion_mask, *, ref_logps=None, trajectory_mask=None,
                eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04, kl_estimator: str = "k3",
                aggregation: str = "sequence_mean_token_mean", max_len: int | None = None,
                logits=None, entropy=None, temperature: float = 1.0):
  """The GRPO-family policy loss of spec section 3 and its metrics.

  Args:
    logps: float [B, T] log pi_theta of each completion token (differentiated).
    old_logps: float [B, T] log-probs of the sampling policy; pass stop_gradient(logps) when mu = 1 (ratio 1).
    advantages: float [B] per sequence (broadcast over tokens) or [B, T].
    completion_mask: [B, T] tokens that count (up to and including the first EOS).
    ref_logps: float [B, T] frozen reference log-probs; required unless beta == 0.
    trajectory_mask: optional float [B] tau; the whole per-token loss (PG and KL) of a row is multiplied by it,
      while the row still counts in the denominator (see `mask_noise_correct`).
    eps_low, eps_high: the clip band [1 - eps_low, 1 + eps_high].
    beta: KL coefficient (0.04 in the original).
    kl_estimator: "k1", "k2" or "k3" (the original's).
    aggregation: a key of AGGREGATION_MODES.
    max_len: T_max for "sequence_sum_over_max_len" (default T).
    logits: optional float [B, T, V] to report the mean entropy; or pass a per-token `entropy` [B, T].
    temperature: for the entropy from logits.

  Returns:
    (loss float32 scalar, metrics dict of float32 scalars: loss, pg_loss, kl_loss, kl_mean, ratio_mean,
    clip_fraction(_low/_high), and entropy_mean when logits or entropy are given). Token metrics average over
    valid tokens (completion mask and trajectory mask != 0).
  """
  num, den, sums = policy_loss_terms(
      logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, trajectory_mask=trajectory_mask,
      eps_low=eps_low, eps_high=eps_high, beta=beta, kl_estimator=kl_estimator, aggregation=aggregation,
      max_len=max_len, logits=logits, entropy=entropy, temperature=temperature)
  return _ratio(num, den), metrics_from_sums(num, den, sums)


# ------------------------------------------------------------------------------------------------
# Trajectory masks.


def mask_noise_correct(correctness, noise_levels, mask=None) -> jax.Array:
  """The original's `mask_noise_correct` trajectory mask, float32 [num_groups, G] of 1 (keep) and 0 (drop).

  A noisy rollout (n > 0) is dropped when its correctness is strictly greater than the lowest correctness of
  the clean (n == 0) rollouts of its group: beating the clean image from a noisy one is probably a guess.
  Clean rollouts are always kept; a group without a (valid) clean rollout keeps everything.

  Args:
    correctness: [num_groups, G] accuracy rewards.
    noise_levels: [num_groups, G] noise levels.
    mask: optional [num_groups, G] valid rollouts; invalid ones are not used as the clean reference.
  """
  c = jnp.asarray(correctness, jnp.float32)
  n = jnp.asarray(noise_levels, jnp.float32)
  valid = jnp.ones(c.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  clean = (n == 0.0) & valid
  lowest_clean = jnp.min(jnp.where(clean, c, jnp.inf), axis=-1, keepdims=True)
  drop = (n > 0.0) & (c > lowest_clean)  # inf when there is no clean rollout: nothing dropped
  return jnp.where(drop, 0.0, 1.0).astype(jnp.float32)
