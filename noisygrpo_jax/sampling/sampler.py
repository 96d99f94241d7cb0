"""Jitted rollouts: prefill once per bucket, then a `lax.while_loop` decode with a preallocated KV cache.

Prompts are left-padded to a bucket length T; the cache has T + max_new_tokens slots. Generated token k
of a row is written at cache slot T + k and gets M-RoPE position (valid prompt tokens + rope_delta + k)
on all three axes, as transformers does during decoding.

Given a mesh, prefill and decode pin their decode state to the rollout layout (`decode_state_shardings`: rows over
the mesh's batch axes); without one they run wherever their inputs are (one device in tests and benchmarks).

`generate` decodes from the model's decoder layers held one module per layer (`model.unstacked_decoder`), with one
KV cache per layer: each step of the loop then reads every weight and cache where it lies. From stacked layers
[layers, ...] each step would first copy every layer's weights (and cache) out of the stacks: measured on the 3B-width
slice, ~62 of ~95 ms per step (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisygrpo_jax import sharding
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, decode_attention, stacking, unstacked_decoder
from noisygrpo_jax.models.qwen2_5_vl.text import LayerCache
from noisygrpo_jax.processing import collate
from noisygrpo_jax.processing.collate import PromptBatch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """HF `generate` semantics: temperature, then top-k, then top-p; greedy ignores all three."""

  max_new_tokens: int = 256
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 disables
  top_p: float = 1.0  # 1.0 disables
  eos_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
  pad_id: int = 151643
  prefill_micro_batches: int = 1  # the prompts are prefilled in this many parts of rows (bounds the activations)
  # A decode step's attention (models/qwen2_5_vl/decode_attention.py): "pallas" reads only each row's filled cache
  # slots (jax's Pallas GPU decode kernel), "einsum" all of them, "auto" the kernel on GPU where it takes the shapes.
  decode_kernel: str = "auto"


@flax.struct.dataclass
class SampleOutput:
  """tokens: int32 [B, N] (pad after a row's stop); mask: int32 [B, N], 1 through the first EOS inclusive;
  logprobs: float32 [B, N], log p(token) under the policy at temperature 1 with no truncation;
  sampling_logprobs: float32 [B, N], log-prob under the distribution actually sampled from;
  lengths: int32 [B] completion lengths."""

  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  sampling_logprobs: jax.Array
  lengths: jax.Array


@flax.struct.dataclass
class DecodeState:
  step: jax.Array  # int32 scalar: tokens generated so far
  logits: jax.Array  # float32 [B, V]: next-token logits
  caches: LayerCache | tuple[LayerCache, ...]  # k, v [layers, B, K, S, head_dim], or per layer [B, K, S, head_dim]
  kv_valid: jax.Array  # bool [B, S]: cache slots holding real tokens
  next_position: jax.Array  # int32 [B]: M-RoPE position of the next token (all three axes)
  done: jax.Array  # bool [B]
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  sampling_logprobs: jax.Array
  key: jax.Array


def kth_largest(values: jax.Array, k: int) -> jax.Array:
  """The k-th largest entry of each row, exactly `lax.top_k(values, k)[0][..., -1:]`: float32 [..., V] -> [..., 1].

  On CPU XLA's TopK sorts every row (measured here: 1.9 ms for [32, 512], 339 ms for [8, 152064]); this finds the
  value bit by bit instead, 32 counting passes over the rows' order-preserving uint32 images (0.18 ms and 25 ms).
  Accelerators keep lax.top_k.
  """
  values = values.astype(jnp.float32)
  if jax.default_backend() != "cpu":
    return jax.lax.top_k(values, k)[0][..., -1:]
  # IEEE floats order like sign-magnitude integers: flip the magnitude bits of negatives, then the sign bit, to get
  # unsigned integers in the same order as the floats.
  bits = jax.lax.bitcast_convert_type(values, jnp.int32)
  ordered = jax.lax.bitcast_convert_type(jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits), jnp.uint32)
  ordered = ordered ^ jnp.uint32(0x80000000)
  # The largest t with at least k entries >= t is the k-th largest entry; build it from the top bit down.
  kth = jnp.zeros(values.shape[:-1] + (1,), jnp.uint32)
  for bit in range(31, -1, -1):
    candidate = kth | jnp.uint32(1 << bit)
    kth = jnp.where((ordered >= candidate).sum(-1, keepdims=True) >= k, candidate, kth)
  kth = jax.lax.bitcast_convert_type(kth ^ jnp.uint32(0x80000000), jnp.int32)
  return jax.lax.bitcast_convert_type(jnp.where(kth < 0, kth ^ jnp.int32(0x7FFFFFFF), kth), jnp.float32)


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature, top-k and top-p as HF's logits warpers (removed entries become -inf). [..., V]."""
  logits = logits.astype(jnp.float32)
  if params.temperature != 1.0:
    logits = logits / params.temperature
  if params.top_k > 0:
    logits = jnp.where(logits < kth_largest(logits, min(params.top_k, logits.shape[-1])), -jnp.inf, logits)
  if params.top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - params.top_p).at[..., -1].set(False)  # keep at least one
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def sample_token(key: jax.Array, logits: jax.Array, params: SamplingParams):
  """Draws one token per row. logits [B, V] -> (tokens int32 [B], sampling log-probs float32 [B])."""
  if params.greedy:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return token, jnp.zeros(token.shape, jnp.float32)
  processed = process_logits(logits, params)
  token = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp


def init_caches(model: Qwen25VL, batch: int, slots: int, dtype) -> LayerCache | tuple[LayerCache, ...]:
  """Zeroed KV caches of every decoder layer in `dtype`, in the form the layers take (`stacking.run_layers`): one
  LayerCache k, v [layers, batch, K, slots, head_dim] for stacked layers, a tuple of one [batch, K, slots, head_dim]
  per layer for a LayerList."""
  t = model.config.text
  shape = (batch, t.num_key_value_heads, slots, t.head_dim)
  if isinstance(model.language_model.layers, stacking.LayerList):
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(t.num_hidden_layers))
  shape = (t.num_hidden_layers,) + shape
  return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def decode_state_shardings(state: DecodeState, mesh: Mesh) -> DecodeState:
  """The rollout layout of a decode state on `mesh`: rows over the batch axes (sharding.LOGICAL_AXIS_RULES "batch";
  replicated where they do not divide the B rows) on axis 0 of every [B, ...] leaf and on the B axis of the KV caches
  ([layers, B, K, S, head_dim] or [B, K, S, head_dim]); the step and the PRNG key replicated."""
  def rows(axis: int):
    return lambda x: sharding.logical_sharding(["batch" if i == axis else None for i in range(x.ndim)], mesh, x.shape)

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(rows(0), state.replace(step=None, key=None, caches=None)).replace(
      step=replicated, key=replicated, caches=jax.tree.map(lambda x: rows(x.ndim - 4)(x), state.caches))


def _in_layout(state: DecodeState, mesh: Mesh | None) -> DecodeState:
  """`state` constrained to `decode_state_shardings` on `mesh`; as it is without a mesh."""
  return state if mesh is None else jax.lax.with_sharding_constraint(state, decode_state_shardings(state, mesh))


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "mesh"))
def prefill(graphdef, state, prompts: PromptBatch, key: jax.Array, params: SamplingParams,
            mesh: Mesh | None = None) -> DecodeState:
  """Runs the prompt through the model, fills cache slots [0, T) and returns the initial decode state.

  With params.prefill_micro_batches = k > 1 the rows are prefilled k parts at a time (`jax.lax.map`), each writing
  its rows of the one cache: the same result, with 1 / k of the prefill's activations alive at once.
  mesh: when given, the decode state comes out in `decode_state_shardings` on it.
  """
  model = nnx.merge(graphdef, state)
  b, t = prompts.input_ids.shape
  slots = t + params.max_new_tokens
  kv_valid = jnp.zeros((b, slots), bool).at[:, :t].set(prompts.attention_mask.astype(bool))
  causal = jnp.arange(slots)[None, :] <= jnp.arange(t)[:, None]  # [T, S]

  def run(part: PromptBatch, part_valid: jax.Array):
    caches = init_caches(model, part.input_ids.shape[0], slots, model.decoder_dtype)
    hidden, caches = model.hidden_states(part.input_ids, part.position_ids, vision=part.vision,
                                         mask=causal[None] & part_valid[:, None, :], caches=caches, cache_index=0,
                                         remat=False)
    return model.logits(hidden[:, -1]), caches

  k = params.prefill_micro_batches
  if k == 1:
    logits, caches = run(prompts, kv_valid)
  else:
    if b % k:
      raise ValueError(f"{b} prompt rows cannot be prefilled in rl.prefill_micro_batches={k} equal parts; choose a "
                       "divisor of the rollout rows (train.prompts_per_step x rl.group_size)")
    logits, caches = jax.lax.map(lambda parts: run(*parts),
                                 (collate.split_rows(prompts, k), kv_valid.reshape(k, b // k, slots)))
    logits = logits.reshape((b,) + logits.shape[2:])
    # [k, (layers,) b / k, K, S, head_dim] -> [(layers,) b, K, S, head_dim]
    caches = jax.tree.map(lambda x: jnp.moveaxis(x, 0, x.ndim - 5).reshape(x.shape[1:-4] + (b,) + x.shape[-3:]),
                          caches)
  n = params.max_new_tokens
  return _in_layout(DecodeState(
      step=jnp.zeros((), jnp.int32),
      logits=logits,
      caches=caches,
      kv_valid=kv_valid,
      next_position=(prompts.attention_mask.sum(axis=1) + prompts.rope_deltas[:, 0]).astype(jnp.int32),
      done=jnp.zeros((b,), bool),
      tokens=jnp.full((b, n), params.pad_id, jnp.int32),
      mask=jnp.zeros((b, n), jnp.int32),
      logprobs=jnp.zeros((b, n), jnp.float32),
      sampling_logprobs=jnp.zeros((b, n), jnp.float32),
      key=key,
  ), mesh)


def decode_step(model: Qwen25VL, state: DecodeState, prompt_len: int, params: SamplingParams) -> DecodeState:
  """Samples token `step` from the current logits, records it, and computes the next logits."""
  key, step_key = jax.random.split(state.key)
  token, sampling_logp = sample_token(step_key, state.logits, params)
  policy_logp = jnp.take_along_axis(jax.nn.log_softmax(state.logits, axis=-1), token[:, None], axis=-1)[:, 0]
  live = ~state.done
  token = jnp.where(live, token, params.pad_id)
  col = state.step
  tokens = state.tokens.at[:, col].set(token)
  mask = state.mask.at[:, col].set(live.astype(jnp.int32))
  logprobs = state.logprobs.at[:, col].set(jnp.where(live, policy_logp, 0.0))
  sampling_logprobs = state.sampling_logprobs.at[:, col].set(jnp.where(live, sampling_logp, 0.0))
  done = state.done | jnp.isin(token, jnp.asarray(params.eos_ids))

  slot = prompt_len + col
  kv_valid = state.kv_valid.at[:, slot].set(True)
  positions = jnp.broadcast_to(state.next_position[None, :, None], (3, token.shape[0], 1))
  hidden, caches = model.hidden_states(token[:, None], positions, mask=kv_valid[:, None, :], caches=state.caches,
                                       cache_index=slot, remat=False)
  return DecodeState(step=col + 1, logits=model.logits(hidden[:, 0]), caches=caches, kv_valid=kv_valid,
                     next_position=state.next_position + 1, done=done, tokens=tokens, mask=mask,
                     logprobs=logprobs, sampling_logprobs=sampling_logprobs, key=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "params", "mesh"),
                   donate_argnames=("state",))
def decode(graphdef, model_state, state: DecodeState, prompt_len: int, params: SamplingParams,
           mesh: Mesh | None = None) -> DecodeState:
  """The whole decode loop in one jitted function; exits early once every row has stopped.

  The input state is donated: the loop reuses its KV-cache buffers in place. mesh: when given, the state enters,
  is carried through the loop and comes out in `decode_state_shardings` on it. Each step's attention runs by
  params.decode_kernel (`decode_attention.decoding`).
  """
  model = nnx.merge(graphdef, model_state)
  with decode_attention.decoding(params.decode_kernel, mesh):
    final = jax.lax.while_loop(
        lambda s: (s.step < params.max_new_tokens) & ~jnp.all(s.done),
        lambda s: _in_layout(decode_step(model, s, prompt_len, params), mesh),
        _in_layout(state, mesh))
  return _in_layout(final, mesh)


def generate(model: Qwen25VL, prompts: PromptBatch, key: jax.Array, params: SamplingParams,
             timings: dict[str, float] | None = None, mesh: Mesh | None = None) -> SampleOutput:
  """Prefill + decode. Compiles once per (batch, prompt bucket, patch bucket, sampling params, mesh).

  The model's decoder layers are unstacked first (`unstacked_decoder`: a copy of their weights, held during this
  call) unless they already are, as in the trainer's rollout copy.

  timings: when given, receives the wall seconds of "prefill" and "decode" (each waited for to completion).
  mesh: both programs keep the rows split over its batch axes (`decode_state_shardings`), and so do the outputs;
  default: the mesh the prompts are placed on (a NamedSharding), else none.
  """
  if mesh is None:
    mesh = getattr(getattr(prompts.input_ids, "sharding", None), "mesh", None)
  graphdef, state = nnx.split(unstacked_decoder(model))
  start = time.perf_counter()
  decode_state = prefill(graphdef, state, prompts, key, params, mesh)
  if timings is not None:
    jax.block_until_ready(decode_state)
    timings["prefill"] = time.perf_counter() - start
    start = time.perf_counter()
  final = decode(graphdef, state, decode_state, prompts.input_ids.shape[1], params, mesh)
  if timings is not None:
    jax.block_until_ready(final)
    timings["decode"] = time.perf_counter() - start
  return SampleOutput(tokens=final.tokens, mask=final.mask, logprobs=final.logprobs,
                      sampling_logprobs=final.sampling_logprobs, lengths=final.mask.sum(axis=1))


def prompts_from_hf(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                    pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                    num_patches: int | None = None) -> PromptBatch:
  """A PromptBatch from the arrays the HF processor produces (left-padded)."""
  return PromptBatch(**model.prepare_hf_inputs(input_ids, attention_mask, pixel_values, image_grid_thw,
                                               pixel_values_videos, video_grid_thw, second_per_grid_ts,
                                               num_patches=num_patches))
