"""Policy loss: hand-computed values for every aggregation mode and KL estimator, clipping, gradients,
micro-batch accumulation, metrics, and `mask_noise_correct`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisygrpo_jax.rl import objective as obj

# A 2-group example: groups of G = 2, so B = 4 sequences of up to T = 3 completion tokens.
LOGPS = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7], [-0.9, -0.4, -1.5], [-2.0, -0.1, -0.6]]
# old = logp - log(ratio): ratios 1.5 (clipped for A > 0), 0.7 (clipped for A < 0), 1.1, 0.9, ...
RATIOS = [[1.5, 1.1, 1.0], [0.7, 0.9, 1.3], [1.25, 0.75, 1.0], [1.3, 0.6, 1.05]]
OLD = [[lp - math.log(r) for lp, r in zip(row_lp, row_r)] for row_lp, row_r in zip(LOGPS, RATIOS)]
REF = [[-1.2, -0.5, -1.0], [-0.1, -1.5, -0.9], [-1.0, -0.3, -2.5], [-1.5, -0.2, -0.6]]
ADV = [1.0, -1.0, 0.5, -0.5]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
TAU = [1.0, 0.0, 1.0, 1.0]
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _hand_loss(mode, kl, tau=(1.0, 1.0, 1.0, 1.0), max_len=3):
  """The spec 3 loss written out with Python loops."""
  per_seq_sum, per_seq_tokens = [], []
  for i in range(4):
    total, tokens = 0.0, 0
    for t in range(3):
      if not MASK[i][t]:
        continue
      ratio = math.exp(LOGPS[i][t] - OLD[i][t])
      clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
      pg = -min(ratio * ADV[i], clipped * ADV[i])
      d = REF[i][t] - LOGPS[i][t]
      k = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kl]
      total += tau[i] * (pg + BETA * k)
      tokens += 1
    per_seq_sum.append(total)
    per_seq_tokens.append(tokens)
  if mode == "sequence_mean_token_mean":
    return sum(s / n for s, n in zip(per_seq_sum, per_seq_tokens)) / 4
  if mode == "token_mean":
    return sum(per_seq_sum) / sum(per_seq_tokens)
  return sum(per_seq_sum) / (4 * max_len)


def _loss(**kwargs):
  args = dict(ref_logps=jnp.array(REF), eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA)
  args.update(kwargs)
  return obj.policy_loss(jnp.array(LOGPS), jnp.array(OLD), jnp.array(ADV), jnp.array(MASK), **args)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", sorted(obj.AGGREGATION_MODES))
def test_loss_equals_hand_computation(mode, kl):
  loss, metrics = _loss(aggregation=mode, kl_estimator=kl)
  assert abs(float(loss) - _hand_loss(mode, kl)) < 1e-6
  assert float(metrics["loss"]) == float(loss)
  loss, _ = _loss(aggregation=mode, kl_estimator=kl, trajectory_mask=jnp.array(TAU))
  assert abs(float(loss) - _hand_loss(mode, kl, tau=TAU)) < 1e-6
  if mode == "sequence_sum_over_max_len":
    loss, _ = _loss(aggregation=mode, kl_estimator=kl, max_len=8)
    assert abs(float(loss) - _hand_loss(mode, kl, max_len=8)) < 1e-6


def test_literal_values():
  # Ratio 1 (old = logp): each token's PG term is -A. Sequence token counts 3, 2, 1, 3; A = (1, 2, -1, 0.5).
  logps = jnp.array(LOGPS)
  adv = jnp.array([1.0, 2.0, -1.0, 0.5])
  mask = jnp.array(MASK)
  loss = lambda mode, **kw: float(obj.policy_loss(logps, logps, adv, mask, beta=0.0, aggregation=mode, **kw)[0])
  assert abs(loss("sequence_mean_token_mean") - (-(1 + 2 - 1 + 0.5) / 4)) < 1e-7  # -0.625
  assert abs(loss("token_mean") - (-(3 * 1 + 2 * 2 - 1 * 1 + 3 * 0.5) / 9)) < 1e-7  # -0.8333
  assert abs(loss("sequence_sum_over_max_len", max_len=5) - (-7.5 / 20)) < 1e-7
  # Dropping sequence 2 (A = 2) removes its tokens but keeps its place in the denominators.
  tau = jnp.array([1.0, 0.0, 1.0, 1.0])
  assert abs(loss("sequence_mean_token_mean", trajectory_mask=tau) - (-(1 - 1 + 0.5) / 4)) < 1e-7
  assert abs(loss("token_mean", trajectory_mask=tau) - (-(3 - 1 + 1.5) / 9)) < 1e-7
  # The KL terms alone, with logp_ref - logp = ln 2 on every token: k1 = -ln 2, k2 = ln(2)^2 / 2, k3 = 1 - ln 2.
  ref = logps + math.log(2)
  for kl, value in [("k1", -math.log(2)), ("k2", 0.5 * math.log(2)**2), ("k3", 1 - math.log(2))]:
    got = obj.policy_loss(logps, logps, jnp.zeros(4), mask, ref_logps=ref, beta=0.5, kl_estimator=kl)
    assert abs(float(got[0]) - 0.5 * value) < 1e-6
    assert abs(float(got[1]["kl_mean"]) - value) < 1e-6


def test_clipping_acts_only_outside_the_band():
  ratios = np.linspace(0.5, 1.6, 111, dtype=np.float32)
  ratios = ratios[np.abs(ratios - 0.8) > 1e-3]
  ratios = ratios[np.abs(ratios - 1.28) > 1e-3]  # the kinks themselves have no defined gradient
  old = jnp.zeros((2, ratios.size))
  logps = jnp.log(jnp.stack([ratios, ratios]))  # row 0 has A = +1, row 1 has A = -1
  adv = jnp.array([1.0, -1.0])
  mask = jnp.ones_like(old)

  def per_token(lp):
    return obj.per_token_policy_loss(lp, old, adv, eps_low=0.2, eps_high=0.28)[0]

  pg = np.asarray(per_token(logps))
  grad = np.asarray(jax.grad(lambda lp: per_token(lp).sum())(logps))
  # A > 0: -min(r, clip(r)) = -r up to 1 + eps_high (including below 1 - eps_low), then constant -1.28.
  high = ratios > 1.28
  np.testing.assert_allclose(pg[0], np.where(high, -1.28, -ratios), atol=1e-6)
  np.testing.assert_array_equal(grad[0] == 0, high)
  # A < 0: max(r, clip(r)) = r down to 1 - eps_low (including above 1 + eps_high), then constant 0.8.
  low = ratios < 0.8
  np.testing.assert_allclose(pg[1], np.where(low, 0.8, ratios), atol=1e-6)
  np.testing.assert_array_equal(grad[1] == 0, low)
  _, metrics = obj.policy_loss(logps, old, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.28)
  assert abs(float(metrics["clip_fraction"]) - (high.sum() + low.sum()) / (2 * ratios.size)) < 1e-6
  assert abs(float(metrics["clip_fraction_high"]) - high.sum() / (2 * ratios.size)) < 1e-6


def test_metrics():
  # Clipped tokens of the example: seq 1 (A = 1) ratio 1.5 > 1.28; seq 2 (A = -1) ratio 0.7 < 0.8; seq 4
  # (A = -0.5) ratio 0.6 < 0.8. Seq 3's 0.75 is masked out. 9 valid tokens.
  _, metrics = _loss()
  assert abs(float(metrics["clip_fraction"]) - 3 / 9) < 1e-6
  assert abs(float(metrics["clip_fraction_low"]) - 2 / 9) < 1e-6
  kl = [math.exp(REF[i][t] - LOGPS[i][t]) - (REF[i][t] - LOGPS[i][t]) - 1
        for i in range(4) for t in range(3) if MASK[i][t]]
  assert abs(float(metrics["kl_mean"]) - sum(kl) / 9) < 1e-6
  ratios = [RATIOS[i][t] for i in range(4) for t in range(3) if MASK[i][t]]
  assert abs(float(metrics["ratio_mean"]) - sum(ratios) / 9) < 1e-6
  # Dropping sequence 2 removes its 2 tokens (one of them clipped) from the token metrics.
  _, metrics = _loss(trajectory_mask=jnp.array(TAU))
  assert abs(float(metrics["clip_fraction"]) - 2 / 7) < 1e-6
  assert "entropy_mean" not in metrics
  # Entropy from logits: uniform over 4 -> ln 4; one-hot-ish -> ~0.
  logits = jnp.zeros((4, 3, 4)).at[0, :, 0].set(100.0)
  _, metrics = _loss(logits=logits)
  assert abs(float(metrics["entropy_mean"]) - 6 / 9 * math.log(4)) < 1e-5
  _, metrics = _loss(entropy=jnp.full((4, 3), 2.0))
  assert abs(float(metrics["entropy_mean"]) - 2.0) < 1e-6


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", sorted(obj.AGGREGATION_MODES))
def test_gradient_matches_finite_differences(mode, kl):
  tau = jnp.array(TAU)
  loss_fn = jax.jit(lambda lp: _loss_at(lp, mode, kl, tau))
  x = np.array(LOGPS, np.float32)
  grad = np.asarray(jax.grad(lambda lp: _loss_at(lp, mode, kl, tau))(jnp.asarray(x)))
  assert np.isfinite(grad).all()
  h = 1e-2
  numeric = np.zeros_like(x)
  for i in range(4):
    for t in range(3):
      up, down = x.copy(), x.copy()
      up[i, t] += h
      down[i, t] -= h
      numeric[i, t] = (float(loss_fn(up)) - float(loss_fn(down))) / (2 * h)
  np.testing.assert_allclose(grad, numeric, atol=2e-4)
  assert (grad[np.array(MASK) == 0] == 0).all() and (grad[1] == 0).all()  # masked tokens and the dropped row
  assert np.abs(grad).max() > 1e-2


def _loss_at(logps, mode, kl, tau):
  # Old log-probs fixed, as with mu > 1; the finite-difference steps stay clear of the clip kinks.
  return obj.policy_loss(logps, jnp.array(OLD), jnp.array(ADV), jnp.array(MASK), ref_logps=jnp.array(REF),
                         trajectory_mask=tau, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, kl_estimator=kl,
                         aggregation=mode)[0]


@pytest.mark.parametrize("mode", sorted(obj.AGGREGATION_MODES))
def test_micro_batches_accumulate_exactly(mode):
  args = lambda rows: (jnp.array(LOGPS)[rows], jnp.array(OLD)[rows], jnp.array(ADV)[rows], jnp.array(MASK)[rows])
  kwargs = dict(ref_logps=None, beta=0.0, aggregation=mode, max_len=5)
  full, _ = obj.policy_loss(*args(slice(None)), **kwargs)
  num, den = 0.0, 0.0
  for rows in (slice(0, 1), slice(1, 4)):
    n, d, _ = obj.policy_loss_terms(*args(rows), **kwargs)
    num, den = num + n, den + d
  assert abs(float(num / den) - float(full)) < 1e-6


def test_aggregate_and_padding_rows():
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # the last row is padding: it counts nowhere
  num, den = obj.aggregate(loss, mask, "sequence_mean_token_mean")
  assert float(num) == (1 + 2) / 2 + (4 + 5 + 6) / 3 and float(den) == 2
  num, den = obj.aggregate(loss, mask, "token_mean")
  assert float(num) == 18 and float(den) == 5
  num, den = obj.aggregate(loss, mask, "sequence_sum_over_max_len", max_len=4)
  assert float(num) == 18 and float(den) == 8
  num, den = obj.aggregate(loss, mask, "sequence_sum_over_max_len")
  assert float(den) == 6
  with pytest.raises(ValueError, match="unknown aggregation mode"):
    obj.aggregate(loss, mask, "mean")


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_extreme_log_probs_on_padding_never_give_nan(kl):
  """Padded positions (mask 0) may hold any log-probs: differences of 1e4 to the old and reference policies make
  the ratio's and k3's exponentials overflow to inf there, which times a mask of 0 would be NaN. The loss and its
  gradient must be finite and equal to those of the same batch with harmless padding values."""
  pad = 1 - np.asarray(MASK)
  extreme_old = np.where(pad, -1e4, np.asarray(OLD))
  extreme_ref = np.where(pad, 1e4, np.asarray(REF))

  def loss(logps, old, ref):
    return obj.policy_loss(logps, old, jnp.array(ADV), jnp.array(MASK), ref_logps=ref, eps_low=EPS_LOW,
                           eps_high=EPS_HIGH, beta=BETA, kl_estimator=kl)[0]

  value, grad = jax.value_and_grad(loss)(jnp.array(LOGPS), jnp.array(extreme_old), jnp.array(extreme_ref))
  clean_value, clean_grad = jax.value_and_grad(loss)(jnp.array(LOGPS), jnp.array(OLD), jnp.array(REF))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(float(value), float(clean_value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(clean_grad), rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(grad)[pad > 0] == 0)


def test_errors():
  with pytest.raises(ValueError, match="needs ref_logps"):
    obj.policy_loss(jnp.array(LOGPS), jnp.array(OLD), jnp.array(ADV), jnp.array(MASK), beta=0.04)
  with pytest.raises(ValueError, match="unknown KL estimator"):
    _loss(kl_estimator="k4")


def test_jit_and_vmap():
  stack = lambda x: jnp.stack([jnp.array(x), jnp.array(x) * 0.5])  # an extra leading axis E = 2
  fn = lambda lp, old, ref, adv: obj.policy_loss(lp, old, adv, jnp.array(MASK), ref_logps=ref, eps_low=EPS_LOW,
                                                  eps_high=EPS_HIGH, beta=BETA)
  losses, metrics = jax.jit(jax.vmap(fn))(stack(LOGPS), stack(OLD), stack(REF), stack(ADV))
  for e in range(2):
    single, single_metrics = fn(stack(LOGPS)[e], stack(OLD)[e], stack(REF)[e], stack(ADV)[e])
    assert abs(float(losses[e]) - float(single)) < 1e-6
    assert abs(float(metrics["kl_mean"][e]) - float(single_metrics["kl_mean"])) < 1e-6
  masks = jax.jit(jax.vmap(obj.mask_noise_correct))(jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4)))
  assert masks.shape == (2, 3, 4)


def test_mask_noise_correct():
  levels = np.array([[0.0, 0.3, 0.6, 0.9]] * 4 + [[0.0, 0.0, 0.5, 0.5], [0.3, 0.6, 0.9, 0.9]], np.float32)
  correctness = np.array([
      [1.0, 1.0, 0.0, 1.0],  # clean right: nothing beats it
      [0.0, 1.0, 0.0, 0.7],  # clean wrong: noisy rollouts scoring above 0 are dropped
      [0.7, 0.7, 0.9, 0.6],  # strictly greater only
      [0.0, 0.0, 0.0, 0.0],
      [0.8, 0.3, 0.5, 0.9],  # two clean rollouts: the lowest (0.3) is the reference
      [0.0, 1.0, 1.0, 0.5],  # no clean rollout: keep all
  ], np.float32)
  expected = [[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
  out = obj.mask_noise_correct(correctness, levels)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), expected)
  # An invalid clean rollout is not a reference.
  out = obj.mask_noise_correct(correctness[1:2], levels[1:2], mask=np.array([[False, True, True, True]]))
  np.testing.assert_array_equal(np.asarray(out), [[1, 1, 1, 1]])
