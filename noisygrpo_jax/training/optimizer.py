"""AdamW with warmup + decay and grad-norm clipping; frozen parameter groups hold no optimizer state."""

from __future__ import annotations

import jax
import optax

FROZEN, TRAINABLE = "frozen", "trainable"


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int = 0, decay: str = "linear"):
  """Linear warmup from 0 to `peak`, then linear decay to 0 at `total_steps` (or constant)."""
  if decay not in ("linear", "constant"):
    raise ValueError(f"optim.decay={decay!r} must be 'linear' or 'constant'")
  after = (optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1)) if decay == "linear"
           else optax.constant_schedule(peak))
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def parameter_labels(params: dict, freeze_vision: bool) -> dict:
  """FROZEN for the vision tower and merger (everything under `visual`) when asked, else TRAINABLE."""
  def label(path, _):
    return FROZEN if freeze_vision and getattr(path[0], "key", None) == "visual" else TRAINABLE
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(labels: dict, *, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   decay: str = "linear", weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
  """optax.multi_transform: AdamW (+ clipping by the global norm of the trainable gradients) on trainable
  parameters, set_to_zero (no state) on frozen ones."""
  schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps, decay)
  trainable = optax.chain(
      optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)


def frozen_mask(labels: dict) -> dict:
  """Tree of bools: True where the parameter is frozen (its gradient is never computed)."""
  return jax.tree.map(lambda label: label == FROZEN, labels)
