"""The sharded policy-update step (GRPO family and SFT) and the train state.

A `TokenBatch` row is a left-padded prompt followed by a completion of M tokens: log-probs of the
completion are computed from the final hidden states in vocabulary chunks (no [N, L, V] logits). RL rows come in
groups of G rollouts of one prompt, whose prompt runs through the model once per group (`shared_prompt_hidden`).
The step is `jax.jit` with in/out shardings from the logical-axis rules and a donated state; micro-batches
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
from noisygrpo_jax.models.qwen2_5_vl.model import causal_mask
from noisygrpo_jax.processing import collate
from noisygrpo_jax.rl import logprobs as logprobs_lib
from noisygrpo_jax.rl import objective
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import params as params_lib


@flax.struct.dataclass
class TokenBatch:
  """N rows of prompt (left-padded, length L - M) + completion (M tokens), with the clean images.

  RL batches hold N / G groups of G consecutive rows (the rollouts of one prompt) whose prompt ids, attention
  mask, positions and vision rows are identical (rollouts.generate_rollouts), which lets log-probs score each
  prompt once (group_size G of `completion_logps`).

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
  """What a run checkpoints. The jitted step (`jit_train_step`) donates everything but `frozen`, which it reads and
  never writes, so the rollout and reference models can share its buffers (training.params)."""

  step: jax.Array  # int32 scalar: optimizer updates done
  params: dict  # the trainable parameters (params.partition; with LoRA the adapters), model.dtype: the master weights
  opt_state: optax.OptState  # AdamW moments of `params`, in their dtype
  frozen: dict  # the frozen parameters (params.partition; {} when all train), model.compute_dtype


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static hyperparameters of the policy loss (unpacked from the config at the edge)."""

  kind: str = "grpo"  # grpo (clipped policy loss + KL) | sft (token cross-entropy)
  beta: float = 0.04
  kl_estimator: str = "k3"
  eps_low: float = 0.2
  eps_high: float = 0.2
  aggregation: str = "sequence_mean_token_mean"
  use_old_logps: bool = False  # False: old = stop_gradient(current), ratio exactly 1 (mu = 1, or mu's first update)
  chunk_size: int = 16384
  temperature: float = 1.0
  group_size: int = 1  # G: rows per shared prompt (rl.group_size for RL; 1 for SFT, whose prompts are distinct)
  compute_dtype: str = ""  # "" = the parameter dtype; "bfloat16" with float32 params: bf16 compute, f32 master


def shared_prompt_hidden(model, batch: TokenBatch, group_size: int) -> jax.Array:
  """The final hidden states that predict the completion tokens, with each group's prompt run once.

  Prompt pass: the first row of each group (its prompt tokens and images) writes its keys/values into the decoder's
  caches [layers, N/G, K, T, head_dim] (T = L - M). Completion pass: the caches, repeated G times along rows and
  extended by M slots, take the N completions at slot T; completion token k attends to its prompt's valid tokens and to
  completion tokens <= k that are in the attention mask, as in one pass over the [N, L] rows. Gradients reach the
  prompt through the caches.

  Returns:
    [N, M, D] in the compute dtype: the prompt's last hidden state (for completion token 0), then the completion's
    first M - 1.
  """
  n, length = batch.input_ids.shape
  m, g = batch.completion_len, group_size
  t = length - m
  # [N, ...] -> [N/G, G, ...] -> first row: a reshape keeps groups on the devices that hold their rows.
  first = lambda x, axis=0: jax.lax.index_in_dim(x.reshape(x.shape[:axis] + (n // g, g) + x.shape[axis + 1:]), 0,
                                                 axis + 1, keepdims=False)
  vision = None if batch.vision is None else jax.tree.map(first, batch.vision)
  prompt_mask = first(batch.attention_mask)[:, :t]
  caches = sampler.init_caches(model, n // g, t, model.decoder_dtype)
  prompt_hidden, caches = model.hidden_states(first(batch.input_ids)[:, :t], first(batch.position_ids, 1)[:, :, :t],
                                              vision=vision, mask=causal_mask(prompt_mask), caches=caches,
                                              cache_index=0)
  repeat = lambda x: jnp.pad(jnp.repeat(x, g, axis=1), ((0, 0), (0, 0), (0, 0), (0, m), (0, 0)))
  caches = jax.tree.map(repeat, caches)
  mask = jnp.tril(jnp.ones((m, length), bool), k=t)[None] & batch.attention_mask.astype(bool)[:, None, :]
  hidden, _ = model.hidden_states(batch.input_ids[:, t:], batch.position_ids[:, :, t:], mask=mask, caches=caches,
                                  cache_index=t)
  return jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], g, axis=0), hidden[:, :-1]], axis=1)


def completion_logps(model, batch: TokenBatch, chunk_size: int, temperature: float = 1.0,
                     group_size: int = 1) -> jax.Array:
  """log pi(completion token | prefix), float32 [N, M], teacher-forced on the batch's images.

  group_size G > 1 scores each group's shared prompt once (`shared_prompt_hidden`); 1 runs every row in full.
  """
  n, length = batch.input_ids.shape
  prompt_len = length - batch.completion_len
  if group_size == 1:
    hidden, _ = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask, batch.vision)
    hidden = hidden[:, prompt_len - 1:-1]
  elif n % group_size:
    raise ValueError(f"{n} rows are not whole groups of group_size={group_size} rollouts of one prompt")
  else:
    hidden = shared_prompt_hidden(model, batch, group_size)
  weights, vocab_axis = model.lm_head_weights()
  return logprobs_lib.chunked_token_logprobs(hidden, weights, batch.input_ids[:, prompt_len:], vocab_axis=vocab_axis,
                                             chunk_size=chunk_size, temperature=temperature)


def loss_terms(model, batch: TokenBatch, cfg: LossConfig):
  """(numerator, denominator, metric sums, float32 [N, M] log-probs) of the loss for one micro-batch."""
  logps = completion_logps(model, batch, cfg.chunk_size, cfg.temperature, cfg.group_size)
  if cfg.kind == "sft":
    num, den = objective.aggregate(-logps, batch.completion_mask, "token_mean")
    tokens = batch.completion_mask.sum()
    return num, den, {"token_count": tokens, "nll_sum": num}, logps
  old = batch.old_logps if cfg.use_old_logps else jax.lax.stop_gradient(logps)
  num, den, sums = objective.policy_loss_terms(
      logps, old, batch.advantages, batch.completion_mask, ref_logps=batch.ref_logps if cfg.beta else None,
      trajectory_mask=batch.trajectory_mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
      kl_estimator=cfg.kl_estimator, aggregation=cfg.aggregation, max_len=batch.completion_len)
  return num, den, sums, logps


def denominator(batch: TokenBatch, cfg: LossConfig) -> jax.Array:
  """The full-batch loss denominator (depends on masks only, not on parameters)."""
  mode = "token_mean" if cfg.kind == "sft" else cfg.aggregation
  return objective.aggregate(jnp.zeros_like(batch.completion_mask), batch.completion_mask, mode,
                             max_len=batch.completion_len)[1]


def check_whole_groups(prompts: int, group_size: int, micro_batches: int) -> None:
  """Raises ValueError unless `prompts` groups of `group_size` rows split into `micro_batches` whole-group parts."""
  if prompts % micro_batches:
    raise ValueError(f"train.prompts_per_step={prompts} prompts (groups of rl.group_size={group_size} rollouts) "
                     f"cannot be split into train.micro_batches={micro_batches} micro-batches of whole groups (a "
                     "group's prompt is scored once, so a micro-batch cannot cut a group); set train.micro_batches "
                     "to a divisor of train.prompts_per_step")


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: LossConfig,
                    micro_batches: int = 1) -> Callable:
  """The un-jitted step: (state, batch) -> (state, metrics, logps).

  The trainable parameters (state.params, the master dtype) are cast to cfg.compute_dtype for the forward and
  backward; their gradients come back in the master dtype and are accumulated there. The frozen parameters
  (state.frozen) are read as they are and get no gradient.

  Returns, with the updated state and the scalar metrics, `logps`: float32 [N, M] the completion log-probs under
  the parameters before the update, exactly those of the loss (stop-gradient). With num_iterations (mu) > 1 they
  are the old log-probs of the later updates over the same batch, so the first update's ratio is exactly 1.
  """

  def micro_loss(trainable, frozen, micro: TokenBatch, total_den):
    params = params_lib.combine(params_lib.cast(trainable, cfg.compute_dtype), frozen)
    num, _, sums, logps = loss_terms(nnx.merge(graphdef, params), micro, cfg)
    return num / total_den, (num, sums, jax.lax.stop_gradient(logps))

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def gradients(state: TrainState, batch: TokenBatch, total_den):
    """(gradients, loss numerator, metric sums, log-probs [N, M]), summed over the micro-batches."""
    if micro_batches == 1:  # no accumulator: the gradient is the step's only copy
      grads, (num, sums, logps) = grad_fn(state.params, state.frozen, batch, total_den)
      return grads, num, sums, logps
    micro = collate.split_rows(batch, micro_batches)

    def accumulate(carry, micro_batch):
      grads, num, sums = carry
      g, (n, s, logps) = grad_fn(state.params, state.frozen, micro_batch, total_den)
      return (jax.tree.map(jnp.add, grads, g), num + n, jax.tree.map(jnp.add, sums, s)), logps

    first = jax.tree.map(lambda x: x[0], micro)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: micro_loss(state.params, state.frozen, first, total_den)[1][1]))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, num, sums), logps = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32), zero_sums), micro)
    return grads, num, sums, logps.reshape(batch.completion_mask.shape)

  def step(state: TrainState, batch: TokenBatch):
    check_whole_groups(batch.input_ids.shape[0] // cfg.group_size, cfg.group_size, micro_batches)
    total_den = jnp.maximum(denominator(batch, cfg), 1e-9)
    grads, num, sums, logps = gradients(state, batch, total_den)

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
    new_state = state.replace(step=state.step + finite.astype(state.step.dtype), params=params, opt_state=opt_state)
    return new_state, metrics, logps

  return step


def logps_fn(graphdef, chunk_size: int, group_size: int = 1, micro_batches: int = 1) -> Callable:
  """(params, batch) -> float32 [N, M] completion log-probs, without gradient (the reference policy), in the
  parameters' dtypes; rows in groups of `group_size` sharing their prompt (see `completion_logps`), computed
  `micro_batches` parts of whole groups at a time (`jax.lax.map`) to bound the activations."""
  def fn(params, batch: TokenBatch) -> jax.Array:
    model = nnx.merge(graphdef, params)
    logps = lambda part: completion_logps(model, part, chunk_size, group_size=group_size)
    if micro_batches == 1:
      return logps(batch)
    check_whole_groups(batch.input_ids.shape[0] // group_size, group_size, micro_batches)
    return jax.lax.map(logps, collate.split_rows(batch, micro_batches)).reshape(batch.completion_mask.shape)
  return fn


def jit_logps(fn, params_sh: dict, batch_sh: TokenBatch) -> Callable:
  """A `logps_fn` under jax.jit with explicit shardings: the parameters in `params_sh`, the batch in `batch_sh` (rows
  over the batch axes, `batch_shardings`), and the log-probs float32 [N, M] rows-split as the completion mask."""
  return jax.jit(fn, in_shardings=(params_sh, batch_sh), out_shardings=batch_sh.completion_mask)


# ------------------------------------------------------------------------------------------------
# Shardings


def batch_shardings(batch: TokenBatch, mesh: Mesh) -> TokenBatch:
  """Rows over the (data, fsdp) axes; position_ids carry rows on axis 1."""
  rows = lambda axis: lambda x: NamedSharding(
      mesh, PartitionSpec(*[sharding.logical_to_spec(("batch",), mesh)[0] if i == axis else None
                            for i in range(np.ndim(x))]))
  return jax.tree.map(rows(0), batch.replace(position_ids=None)).replace(
      position_ids=rows(1)(batch.position_ids))


def state_shardings(abstract_model_state, optimizer, mesh: Mesh, freeze_vision: bool,
                    adapters_only: bool = False) -> TrainState:
  """TrainState shardings derived from `jax.eval_shape` of the state and the logical-axis rules; the parameters
  split as params.partition(..., freeze_vision, adapters_only) splits them."""
  split = lambda tree: params_lib.partition(tree, freeze_vision, adapters_only)
  trainable_sh, frozen_sh = split(sharding.param_shardings(abstract_model_state, mesh))
  abstract_trainable, _ = split(nnx.to_pure_dict(abstract_model_state))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(step=replicated, params=trainable_sh,
                    opt_state=sharding.tree_shardings_like(abstract_opt, trainable_sh, mesh), frozen=frozen_sh)


@dataclasses.dataclass
class TrainSetup:
  """The model's graph, the optimizer and the train state's shardings of a run."""

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  state_shardings: TrainState
  compute_dtype: str  # model.compute_dtype: the frozen parameters', the rollout copy's and the reference's dtype
  freeze_vision: bool
  adapters_only: bool  # lora.rank > 0: only the decoder's adapters train

  def split_params(self, params: dict) -> tuple[dict, dict]:
    """A full parameter tree -> (trainable in their dtype, frozen in the compute dtype), placed on the mesh with
    the state's shardings (training.params)."""
    trainable, frozen = params_lib.partition(params, self.freeze_vision, self.adapters_only)
    frozen = params_lib.cast(frozen, self.compute_dtype)
    return (jax.device_put(trainable, self.state_shardings.params),
            jax.device_put(frozen, self.state_shardings.frozen))


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh, *, compute_dtype: str,
                     freeze_vision: bool, adapters_only: bool = False) -> tuple[TrainSetup, TrainState]:
  """The sharded train state of `model`'s parameters at step 0, split by training.params' dtype policy (trainable
  ones in their dtype with fresh optimizer moments, frozen ones cast to `compute_dtype`), and its TrainSetup."""
  graphdef, model_state = nnx.split(model)
  shardings = state_shardings(model_state, optimizer, mesh, freeze_vision, adapters_only)
  result = TrainSetup(graphdef, optimizer, shardings, compute_dtype, freeze_vision, adapters_only)
  trainable, frozen = result.split_params(nnx.to_pure_dict(model_state))
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(trainable)
  return result, TrainState(step=jax.device_put(np.int32(0), shardings.step), params=trainable,
                            opt_state=opt_state, frozen=frozen)


def jit_train_step(step_fn, state_sh: TrainState, batch_sh: TokenBatch, mesh: Mesh) -> Callable:
  """`step_fn` under jax.jit with explicit in/out shardings, the state donated except its frozen parameters.

  The frozen parameters enter as an argument of their own, neither donated nor returned: the state that comes
  out holds the very arrays that went in, which the rollout and reference models share.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def without_frozen(state, frozen, batch):
    new_state, metrics, logps = step_fn(state.replace(frozen=frozen), batch)
    return new_state.replace(frozen=None), metrics, logps

  jitted = jax.jit(without_frozen, in_shardings=(state_sh.replace(frozen=None), state_sh.frozen, batch_sh),
                   out_shardings=(state_sh.replace(frozen=None), replicated, batch_sh.completion_mask),
                   donate_argnums=0)

  def step(state: TrainState, batch: TokenBatch):
    new_state, metrics, logps = jitted(state.replace(frozen=None), state.frozen, batch)
    return new_state.replace(frozen=state.frozen), metrics, logps

  # The jax.jit stage API on (state, batch), concrete or abstract (e.g. for compile times and memory analyses).
  step.lower = lambda state, batch: jitted.lower(state.replace(frozen=None), state.frozen, batch)
  return step
