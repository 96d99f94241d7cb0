"""AdamW with warmup + decay and grad-norm clipping over the trainable parameters."""

from __future__ import annotations

import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear"):
  """Linear warmup from 0 to `peak`, then linear decay to 0 at `total_steps` (or constant)."""
  if decay not in ("linear", "constant"):
    raise ValueError(f"optim.decay={decay!r} must be 'linear' or 'constant'")
  after = (optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1)) if decay == "linear"
           else optax.constant_schedule(peak))
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def make_optimizer(schedule: optax.ScalarOrSchedule, *, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW (learning rate `schedule`, a float or a function of the optimizer update count) after clipping by the
  global gradient norm, for the trainable parameters (params.partition): frozen ones are not in its tree, so they
  hold no state; the moments take the trainable parameters' dtype."""
  return optax.chain(
      optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
