"""A decode step's attention through jax's Pallas GPU decode kernel, reading only each row's filled cache slots.

A decode step has one query per row against the heads-major KV caches [B, K, S, head_dim]. The einsum path
(`layers.attention`) reads all S slots of every row, every step: the prompt's left padding and the slots not generated
yet included. At the 3B recipe's shape (64 rows, 2304 slots, 36 layers, bfloat16) that is ~5.4 GB of cache a step,
about what the weights are, so which slots are read matters. jax's split-k flash-decoding kernel
(`jax.experimental.pallas.ops.gpu.decode_attention.gqa`, Triton) takes each row's range [start, end) of valid slots:
a split of the slots (`tiling`) that lies wholly outside it is skipped, and within a split no block wholly past `end`
is loaded (the slots of a loaded block outside the range are masked).

The range is read off the mask: from each row's first valid slot to its last. That is exact for masks with one run
of valid slots per row, which a decode step's are (left-padded prompts, then the tokens generated so far); the
sampler's decode loop is the only place that turns the kernel on (`decoding`).

The kernel is written for GPUs; anywhere else it runs interpreted, which only tests ask for (exact, slow).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from noisygrpo_jax import sharding

KERNELS = ("auto", "pallas", "einsum")
MAX_SPLITS = 16  # parts of the slots the kernel runs in parallel per (row, KV head) (its default)

_route: tuple[str, Mesh | None] = ("einsum", None)  # (kernel, mesh), set by `decoding`


@contextlib.contextmanager
def decoding(kernel: str, mesh: Mesh | None = None):
  """Routes the single-query attention over heads-major caches traced inside the block (a decode step's) by `kernel`:
  "einsum" (every slot, `layers.attention`'s einsums), "pallas" (the Pallas kernel, `attention`; an error where
  `tiling` cannot tile the slots) or "auto" ("pallas" on GPU where the kernel takes the shapes and dtype: `accepts`,
  else "einsum"). The route is fixed when a function is traced. mesh: the rows are split over its batch axes
  (`sharding.LOGICAL_AXIS_RULES` "batch"), so the kernel runs on each device's rows (`jax.shard_map`)."""
  global _route
  if kernel not in KERNELS:
    raise ValueError(f"decode attention kernel {kernel!r}: choose one of {', '.join(KERNELS)} (rl.decode_kernel)")
  previous, _route = _route, (kernel, mesh)
  try:
    yield
  finally:
    _route = previous


def tiling(slots: int) -> tuple[int, int] | None:
  """(block, splits) of the kernel over `slots` cache slots: the largest power-of-two block that divides them, of
  16 (Triton's smallest dot) to 128 slots (the kernel's default), and the most splits (at most MAX_SPLITS) that
  divide the blocks evenly; None when `slots` is not a multiple of 16."""
  if slots % 16:
    return None
  block = next(b for b in (128, 64, 32, 16) if slots % b == 0)
  blocks = slots // block
  return block, next(n for n in range(min(MAX_SPLITS, blocks), 0, -1) if blocks % n == 0)


def accepts(q: jax.Array, k: jax.Array) -> bool:
  """Whether "auto" takes the kernel for q [B, 1, H, D] and heads-major k [B, K, S, D]: on GPU, half-precision q and
  k of one dtype, a power-of-two head dim of 16 to 256 and slots `tiling` tiles."""
  d = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype
          and 16 <= d <= 256 and d & (d - 1) == 0 and tiling(k.shape[2]) is not None)


def routed(q: jax.Array, k: jax.Array) -> bool:
  """Whether `attention` runs this single-query attention (q [B, 1, H, D], heads-major k [B, K, S, D]), by the route
  `decoding` set (none outside it: the einsums)."""
  kernel, _ = _route
  if kernel == "pallas" and tiling(k.shape[2]) is None:
    raise ValueError(f"the Pallas decode kernel cannot tile {k.shape[2]} cache slots (prompt bucket + "
                     "max_new_tokens must be a multiple of 16); set rl.decode_kernel=einsum or auto, or change "
                     "data.prompt_buckets or rl.max_new_tokens")
  return kernel == "pallas" or (kernel == "auto" and accepts(q, k))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Attention of one query per row over the slots of its run of valid ones, by the Pallas decode kernel.

  Args:
    q: [B, 1, H, D]; k, v: [B, K, S, D] (the heads-major caches) with H a multiple of K.
    mask: bool [B, 1, S] (True = attend): per row one run of valid slots, which the current token's slot ends.
  Returns:
    [B, 1, H, D] in q's dtype.
  """
  _, mesh = _route
  slots = k.shape[2]
  block, splits = tiling(slots)
  valid = mask[:, 0]
  start = jnp.argmax(valid, axis=-1).astype(jnp.int32)  # first valid slot
  end = (slots - jnp.argmax(valid[:, ::-1], axis=-1)).astype(jnp.int32)  # one past the last
  interpret = jax.default_backend() != "gpu"
  # Imported here, not with the module: an experimental jax module that another jax version may move would otherwise
  # break importing the model, where it only has to fail this route (rl.decode_kernel=einsum avoids it).
  from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

  def rows(q, k, v, start, end):
    # The kernel takes k, v [B, S, K, D] and makes them heads-major itself: the two transposes cancel. Its last
    # division adds a float32 epsilon, which makes a half-precision output float32.
    out = pallas_decode.gqa(q[:, 0], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), start, end, block_k=block,
                            k_splits=splits, interpret=interpret)
    return out[:, None].astype(q.dtype)

  if mesh is None or mesh.size == 1:
    return rows(q, k, v, start, end)
  spec = lambda x: sharding.logical_sharding(["batch"] + [None] * (x.ndim - 1), mesh, x.shape).spec
  operands = (q, k, v, start, end)
  return jax.shard_map(rows, mesh=mesh, in_specs=tuple(spec(x) for x in operands), out_specs=spec(q),
                       check_vma=False)(*operands)
