"""Host-side assembly of training batches from prompts and sampled completions (numpy)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from noisygrpo_jax.models.qwen2_5_vl import host
from noisygrpo_jax.processing.collate import PromptBatch
from noisygrpo_jax.training.train_step import TokenBatch


def token_batch(prompts: PromptBatch, tokens, completion_mask, *, advantages=None, trajectory_mask=None,
                old_logps=None, ref_logps=None) -> TokenBatch:
  """Prompt (left-padded, T) + completion (M) rows with the positions the sampler used.

  Completion token k of a row sits at M-RoPE position (valid prompt tokens + rope_delta + k) on all axes.
  Tokens after a row's stop are masked out of attention and of the loss.

  Args:
    prompts: the PromptBatch the completions were sampled from (pass the clean images' vision batch here:
      log-probs are computed on the clean image, spec section 1.5).
    tokens: int [N, M]; completion_mask: [N, M].
    advantages, trajectory_mask: float [N] (defaults 0 and 1); old_logps, ref_logps: float [N, M] (default 0).
  """
  tokens = np.asarray(tokens, np.int32)
  mask = np.asarray(completion_mask, np.float32)
  n, m = tokens.shape
  prompt_mask = np.asarray(prompts.attention_mask)
  start = prompt_mask.sum(axis=1) + np.asarray(prompts.rope_deltas)[:, 0]
  completion_pos = np.broadcast_to((start[:, None] + np.arange(m))[None], (3, n, m))
  zeros = np.zeros((n, m), np.float32)
  return TokenBatch(
      input_ids=np.concatenate([np.asarray(prompts.input_ids), tokens], axis=1),
      attention_mask=np.concatenate([prompt_mask, mask.astype(np.int32)], axis=1),
      position_ids=np.concatenate([np.asarray(prompts.position_ids), completion_pos], axis=2).astype(np.int32),
      vision=prompts.vision,
      completion_mask=mask,
      advantages=np.zeros(n, np.float32) if advantages is None else np.asarray(advantages, np.float32),
      trajectory_mask=np.ones(n, np.float32) if trajectory_mask is None else np.asarray(trajectory_mask,
                                                                                         np.float32),
      old_logps=zeros if old_logps is None else np.asarray(old_logps, np.float32),
      ref_logps=zeros if ref_logps is None else np.asarray(ref_logps, np.float32),
  )


def take_rows(batch: TokenBatch, rows) -> TokenBatch:
  """The batch's rows `rows` (int [K]), in that order (host arrays)."""
  rows = np.asarray(rows)
  taken = jax.tree.map(lambda x: np.asarray(x)[rows], batch.replace(position_ids=None))
  return taken.replace(position_ids=np.asarray(batch.position_ids)[:, rows])


def concatenate(parts: Sequence[TokenBatch], pad_id: int) -> TokenBatch:
  """The rows of host TokenBatches of one completion length M, in order, as `token_batch` of their prompts collated
  together would give them: prompts left-padded to the longest prompt bucket among the parts (pad_id, attention 0,
  position 0) and images packed into the largest patch bucket (host.pad_vision_batch)."""
  if len({p.completion_len for p in parts}) != 1:
    raise ValueError(f"cannot concatenate batches of completion lengths {[p.completion_len for p in parts]}")
  length = max(p.input_ids.shape[1] for p in parts)
  with_vision = [p.vision is not None for p in parts]
  if any(with_vision) and not all(with_vision):
    raise ValueError("cannot concatenate batches with and without images")
  patches = max(p.vision.num_patches for p in parts) if all(with_vision) else 0

  def padded(p: TokenBatch) -> TokenBatch:
    extra = length - p.input_ids.shape[1]
    left = lambda x, value: np.concatenate([np.full(x.shape[:-1] + (extra,), value, np.asarray(x).dtype),
                                            np.asarray(x)], axis=-1)
    return p.replace(input_ids=left(p.input_ids, pad_id), attention_mask=left(p.attention_mask, 0),
                     position_ids=left(p.position_ids, 0),
                     vision=host.pad_vision_batch(p.vision, patches) if patches else None)

  parts = [padded(p) for p in parts]
  joined = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.replace(position_ids=None) for p in parts])
  return joined.replace(position_ids=np.concatenate([p.position_ids for p in parts], axis=1))
