"""The sharded policy-update step (GRPO family and SFT) and the train state.

A `TokenBatch` row is a left-padded prompt followed by a completion of M tokens: log-probs of the
completion are computed from the final hidden states in vocabulary chunks (no [N, L, V] logits). The
step is `jax.jit` with in/out shardings from the logical-axis rules and a donated state; micro-batches
are accumulated with `lax.scan`, exactly for every loss aggregation because each micro-batch contributes
(numerator / full-batch denominator).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisygrpo_jax import sharding
from noisygrpo_jax.models.qwen2_5_vl import host
from noisygrpo_jax.rl import logprobs as logprobs_lib
from noisygrpo_jax.rl import objective


@flax.struct.dataclass
class TokenBatch:
  """N rows of prompt (left-padded, length L - M) + completion (M tokens), with the clean images.

  input_ids: int32 [N, L]; attention_mask: int32 [N, L]; position_ids: int32 [3, N, L];
  vision: host.VisionBatch with N rows, or None;
  completion_mask: float32 [N, M] tokens that count (through the first EOS);
  advantages: float32 [N]; trajectory_mask: float32 [N] (1 keeps a rollout, 0 drops its loss);
  old_logps: float32 [N, M] sampling-policy log-probs (used when num_iterations > 1);
  ref_logps: float32 [N, M] reference-model log-probs (used when beta > 0).
  """

  input_ids: jax.Array
  attention_mask: jax.Array
  position_ids: jax.Array
  vision: host.VisionBatch | None
  completion_mask: jax.Array
  advantages: jax.Array
  trajectory_mask: jax.Array
  old_logps: jax.Array
  ref_logps: jax.Array

  @property
  def completion_len(self) -> int:
    return self.completion_mask.shape[1]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: dict  # pure-dict parameter tree (nnx.to_pure_dict of the model state)
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static hyperparameters of the policy loss (unpacked from the config at the edge)."""

  kind: str = "grpo"  # grpo (clipped policy loss + KL) | sft (token cross-entropy)
  beta: float = 0.04
  kl_estimator: str = "k3"
  eps_low: float = 0.2
  eps_high: float = 0.2
  aggregation: str = "sequence_mean_token_mean"
  use_old_logps: bool = False  # False (num_iterations == 1): old = stop_gradient(current), ratio 1
  chunk_size: int = 16384
  temperature: float = 1.0
  compute_dtype: str = ""  # "" = the parameter dtype; "bfloat16" with float32 params: bf16 compute, f32 master


def completion_logps(model, batch: TokenBatch, chunk_size: int, temperature: float = 1.0) -> jax.Array:
  """log pi(completion token | prefix), float32 [N, M], teacher-forced on the batch's images."""
  m = batch.completion_len
  hidden, _ = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask, batch.vision)
  prompt_len = batch.input_ids.shape[1] - m
  return logprobs_lib.chunked_token_logprobs(hidden[:, prompt_len - 1:-1], model.lm_head_kernel(),
                                             batch.input_ids[:, prompt_len:], chunk_size=chunk_size,
                                             temperature=temperature)


def loss_terms(model, batch: TokenBatch, cfg: LossConfig):
  """(numerator, denominator, metric sums) of the loss for one micro-batch."""
  logps = completion_logps(model, batch, cfg.chunk_size, cfg.temperature)
  if cfg.kind == "sft":
    num, den = objective.aggregate(-logps, batch.completion_mask, "token_mean")
    tokens = batch.completion_mask.sum()
    return num, den, {"token_count": tokens, "nll_sum": num}
  old = batch.old_logps if cfg.use_old_logps else jax.lax.stop_gradient(logps)
  return objective.policy_loss_terms(
      logps, old, batch.advantages, batch.completion_mask, ref_logps=batch.ref_logps if cfg.beta else None,
      trajectory_mask=batch.trajectory_mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
      kl_estimator=cfg.kl_estimator, aggregation=cfg.aggregation, max_len=batch.completion_len)


def denominator(batch: TokenBatch, cfg: LossConfig) -> jax.Array:
  """The full-batch loss denominator (depends on masks only, not on parameters)."""
  mode = "token_mean" if cfg.kind == "sft" else cfg.aggregation
  return objective.aggregate(jnp.zeros_like(batch.completion_mask), batch.completion_mask, mode,
                             max_len=batch.completion_len)[1]


def split_micro_batches(batch: TokenBatch, k: int) -> TokenBatch:
  """[N, ...] -> [k, N/k, ...] (position_ids: [3, N, L] -> [k, 3, N/k, L])."""
  def split(x, axis=0):
    x = jnp.moveaxis(x, axis, 0)
    return jnp.moveaxis(x.reshape((k, x.shape[0] // k) + x.shape[1:]), 1, axis + 1)
  return jax.tree.map(split, batch.replace(position_ids=None)).replace(
      position_ids=split(batch.position_ids, axis=1))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, frozen: dict, cfg: LossConfig,
                    micro_batches: int = 1) -> Callable:
  """The un-jitted step: (state, batch) -> (state, metrics).

  Args:
    graphdef: the model's nnx graph definition.
    frozen: pure-dict tree of bools, True for parameters that get no gradient (their backward is pruned).
  """

  def micro_loss(params, micro: TokenBatch, total_den):
    params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    if cfg.compute_dtype:
      params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)  # the gradient flows back to f32
    num, den, sums = loss_terms(nnx.merge(graphdef, params), micro, cfg)
    return num / total_den, (num, sums)

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: TokenBatch):
    total_den = jnp.maximum(denominator(batch, cfg), 1e-9)
    micro = split_micro_batches(batch, micro_batches)

    def accumulate(carry, micro_batch):
      grads, num, sums = carry
      g, (n, s) = grad_fn(state.params, micro_batch, total_den)
      return (jax.tree.map(jnp.add, grads, g), num + n, jax.tree.map(jnp.add, sums, s)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: micro_loss(state.params, first, total_den)[1][1]))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, num, sums), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), zero_sums), micro)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update: parameters and optimizer state stay as they were.
    finite = jnp.isfinite(num) & jnp.isfinite(optax.global_norm(grads))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    if cfg.kind == "sft":
      metrics = {"loss": num / total_den, "tokens": sums["token_count"]}
    else:
      metrics = objective.metrics_from_sums(num, total_den, sums)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["update_norm"] = jnp.where(finite, optax.global_norm(updates), 0.0)
    metrics["skipped"] = (~finite).astype(jnp.float32)
    return TrainState(step=state.step + finite.astype(state.step.dtype), params=params, opt_state=opt_state), metrics

  return step


def logps_fn(graphdef, chunk_size: int) -> Callable:
  """(params, batch) -> float32 [N, M] completion log-probs, without gradient (old / reference policy)."""
  return lambda params, batch: completion_logps(nnx.merge(graphdef, params), batch, chunk_size)


# ------------------------------------------------------------------------------------------------
# Shardings


def batch_shardings(batch: TokenBatch, mesh: Mesh) -> TokenBatch:
  """Rows over the (data, fsdp) axes; position_ids carry rows on axis 1."""
  rows = lambda axis: lambda x: NamedSharding(
      mesh, PartitionSpec(*[sharding.logical_to_spec(("batch",), mesh)[0] if i == axis else None
                            for i in range(np.ndim(x))]))
  return jax.tree.map(rows(0), batch.replace(position_ids=None)).replace(
      position_ids=rows(1)(batch.position_ids))


def state_shardings(abstract_model_state, optimizer, mesh: Mesh) -> TrainState:
  """TrainState shardings derived from `jax.eval_shape` of the state and the logical-axis rules."""
  params_sh = sharding.param_shardings(abstract_model_state, mesh)
  abstract_params = nnx.to_pure_dict(abstract_model_state)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(step=replicated, params=params_sh,
                    opt_state=sharding.tree_shardings_like(abstract_opt, params_sh, mesh))


def jit_train_step(step_fn, state_sh: TrainState, batch_sh: TokenBatch, mesh: Mesh):
  """jax.jit with explicit in/out shardings and the state donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)
