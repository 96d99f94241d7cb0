"""Host-side assembly of training batches from prompts and sampled completions (numpy)."""

from __future__ import annotations

import numpy as np

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
