"""Group advantage estimators: GRPO, Dr.GRPO, RLOO and NoisyGRPO's Bayesian fusion (spec section 2).

Every estimator has the same signature, so a trainer picks one by name from `ADVANTAGE_ESTIMATORS`:

  fn(rewards, noise_levels=None, mask=None, **hyper) -> (advantages, diagnostics)

  rewards       float [num_groups, G], one row per prompt, rollouts of a prompt side by side (clean first)
  noise_levels  float [num_groups, G] noise level n of each rollout's image; only "noisygrpo" reads it
  mask          bool/float [num_groups, G] valid rollouts (default all). Invalid rollouts are left out of every
                group statistic and get advantage 0.
  advantages    float32 [num_groups, G]
  diagnostics   dict of float32 arrays, per group [num_groups] or per rollout [num_groups, G]

All are pure and work under jit, vmap (e.g. over an extra leading axis) and grad.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

STD_EPS = 1e-4  # added to the std, not the variance (spec section 2)


def _prepare(rewards, mask):
  rewards = jnp.asarray(rewards, jnp.float32)
  if mask is None:
    valid = jnp.ones(rewards.shape, bool)
  else:
    valid = jnp.broadcast_to(jnp.asarray(mask), rewards.shape).astype(bool)
  return rewards, valid


def _group_mean(x, valid):
  count = valid.sum(-1, keepdims=True).astype(jnp.float32)
  total = jnp.where(valid, x, 0.0).sum(-1, keepdims=True)
  return total / jnp.maximum(count, 1.0), count


def group_std(x: jax.Array, valid: jax.Array, *, ddof: int = 1) -> jax.Array:
  """Std over the last axis of the valid entries, [..., 1]; 0 when fewer than ddof + 1 are valid."""
  mean, count = _group_mean(x, valid)
  sq = jnp.where(valid, jnp.square(x - mean), 0.0).sum(-1, keepdims=True)
  var = jnp.where(count > ddof, sq / jnp.maximum(count - ddof, 1.0), 0.0)
  # Double where: a plain sqrt would give a NaN gradient at var = 0 (all rewards equal).
  return jnp.where(var > 0.0, jnp.sqrt(jnp.where(var > 0.0, var, 1.0)), 0.0)


def group_normalize(x: jax.Array, valid: jax.Array, *, eps: float = STD_EPS) -> jax.Array:
  """N(x) = (x - mean) / (unbiased std + eps) within each group (last axis); invalid entries -> 0."""
  mean, _ = _group_mean(x, valid)
  out = (x - mean) / (group_std(x, valid) + eps)
  return jnp.where(valid, out, 0.0)


def grpo_advantages(rewards, noise_levels=None, mask=None, *, eps: float = STD_EPS):
  """GRPO: A = N(r), the group z-score with unbiased std and `eps` added to the std. Ignores noise levels."""
  del noise_levels
  r, valid = _prepare(rewards, mask)
  mean, _ = _group_mean(r, valid)
  std = group_std(r, valid)
  adv = jnp.where(valid, (r - mean) / (std + eps), 0.0)
  return adv, {"reward_mean": mean[..., 0], "reward_std": std[..., 0]}


def drgrpo_advantages(rewards, noise_levels=None, mask=None):
  """Dr.GRPO: A = r - mean(r) (no std normalisation). Ignores noise levels."""
  del noise_levels
  r, valid = _prepare(rewards, mask)
  mean, _ = _group_mean(r, valid)
  adv = jnp.where(valid, r - mean, 0.0)
  return adv, {"reward_mean": mean[..., 0], "reward_std": group_std(r, valid)[..., 0]}


def rloo_advantages(rewards, noise_levels=None, mask=None):
  """RLOO: A_i = r_i - mean of the other valid rollouts = n/(n-1) (r_i - mean); 0 in a group of one."""
  del noise_levels
  r, valid = _prepare(rewards, mask)
  mean, count = _group_mean(r, valid)
  loo = count / jnp.maximum(count - 1.0, 1.0) * (r - mean)
  adv = jnp.where(valid & (count > 1.0), loo, 0.0)
  return adv, {"reward_mean": mean[..., 0], "reward_std": group_std(r, valid)[..., 0]}


def kalman_gain(sigma: jax.Array, *, r_value: float = 0.1, p_alpha: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """(K, P) for a group whose raw semantic rewards have unbiased std `sigma`.

  P = alpha / (sigma^2 + alpha) and K = clip(P / (P + R), 0, 1); K = 1 / (1.1 + 10 sigma^2) for the released
  R = 0.1, alpha = 0.01.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  p = p_alpha / (jnp.square(sigma) + p_alpha)
  k = jnp.clip(p / (p + r_value), 0.0, 1.0)
  return k, p


def noise_prior_reward(noise_levels, mask=None, *, prior_mean: float = 0.55, prior_var: float = 0.11):
  """The original's `noisy` reward: q = 1 - n, z-scored per group with the population std, rescaled to mean
  `prior_mean` and variance `prior_var` (`cot_reward_var`). float32 [num_groups, G].

  A group whose levels are all equal (population std 0) gets the constant `prior_mean` (no preference) instead
  of the 0/0 the plain formula would give.
  """
  q, valid = _prepare(1.0 - jnp.asarray(noise_levels, jnp.float32), mask)
  mean, _ = _group_mean(q, valid)
  std = group_std(q, valid, ddof=0)
  z = jnp.where(std > 0.0, (q - mean) / jnp.where(std > 0.0, std, 1.0), 0.0)
  return jnp.where(valid, prior_mean + jnp.sqrt(jnp.float32(prior_var)) * z, 0.0)


def noisygrpo_advantages(rewards, noise_levels, mask=None, *, r_value: float = 0.1, p_alpha: float = 0.01,
                         eps: float = STD_EPS, prior_mean: float = 0.55, prior_var: float = 0.11):
  """NoisyGRPO's Bayesian advantage (spec section 2), exactly as the original computes it.

  Args:
    rewards: [num_groups, G] raw semantic rewards s = acc + fmt (unweighted sum, in [0, 2]). P is computed in
      these raw units, so rescaling the rewards changes K.
    noise_levels: [num_groups, G] the level n of each rollout.
    mask: optional [num_groups, G] valid rollouts.
    r_value: R, the variance given to the noise prior.
    p_alpha: alpha in P = alpha / (sigma^2 + alpha).
    eps: added to every unbiased std.
    prior_mean, prior_var: the rescaling of the `noisy` reward (0.55, `cot_reward_var` 0.11); inert apart from
      the eps, kept so the numbers match the original.

  Steps, per group: s_hat = N(s); sigma = unbiased std of s; p_hat = N(noise_prior_reward(n));
  K = clip(P / (P + R), 0, 1) with P = alpha / (sigma^2 + alpha); r_tilde = s_hat + K (p_hat - s_hat);
  A = N(r_tilde). With all rewards equal, s_hat = 0 and A is the prior (1.162, 0.387, -0.387, -1.162) for the
  default grid: such groups still give a gradient, unlike GRPO.

  Returns:
    (advantages [num_groups, G], diagnostics) with per-group "kalman_gain" (K), "sigma", "P", "reward_mean",
    and per-rollout "prior" (p_hat), "reward_normalized" (s_hat), "fused_reward" (r_tilde).
  """
  s, valid = _prepare(rewards, mask)
  s_hat = group_normalize(s, valid, eps=eps)
  sigma = group_std(s, valid)
  p_hat = group_normalize(noise_prior_reward(noise_levels, valid, prior_mean=prior_mean, prior_var=prior_var),
                          valid, eps=eps)
  k, p = kalman_gain(sigma, r_value=r_value, p_alpha=p_alpha)
  fused = jnp.where(valid, s_hat + k * (p_hat - s_hat), 0.0)
  adv = group_normalize(fused, valid, eps=eps)
  diagnostics = {
      "kalman_gain": k[..., 0],
      "sigma": sigma[..., 0],
      "P": p[..., 0],
      "reward_mean": _group_mean(s, valid)[0][..., 0],
      "prior": p_hat,
      "reward_normalized": s_hat,
      "fused_reward": fused,
  }
  return adv, diagnostics


def informative_groups(rewards, mask=None) -> jax.Array:
  """bool [num_groups]: True where a group's valid rewards [num_groups, G] are not all equal.

  A group whose rollouts all scored alike carries no reward signal (GRPO's advantages are all 0 there; NoisyGRPO's
  are its noise prior alone): the groups that DAPO's dynamic sampling and EasyR1's online filtering leave out.
  """
  r, valid = _prepare(rewards, mask)
  high = jnp.where(valid, r, -jnp.inf).max(-1)
  low = jnp.where(valid, r, jnp.inf).min(-1)
  return high > low


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "noisygrpo": noisygrpo_advantages,
}


def compute_advantages(name: str, rewards, noise_levels=None, mask=None, **hyper):
  """Looks up `name` in ADVANTAGE_ESTIMATORS and calls it."""
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
  if name == "noisygrpo" and noise_levels is None:
    raise ValueError("the 'noisygrpo' estimator needs noise_levels [num_groups, G]")
  return ADVANTAGE_ESTIMATORS[name](rewards, noise_levels, mask, **hyper)
