"""Group filtering (rl.filter_groups): the batch plumbing that assembles a step from several rollout rounds, and
what each mode keeps."""

import os

import jax
import numpy as np
from flax import nnx

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL
from noisygrpo_jax.rl import rewards
from noisygrpo_jax.sampling import sampler as S
from noisygrpo_jax.training import batches, loops, metrics as metrics_lib, rollouts
from tests.models import hf_reference as ref
from tests.training import helpers as H


def _left_pad(rows, length):
  ids, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  return ids, mask


def _prompts(model, rows, grids, pixels, length, num_patches):
  """Prompts left-padded (pad id 0) to `length` tokens, images packed into `num_patches` patches."""
  return S.prompts_from_hf(model, *_left_pad(rows, length), pixel_values=pixels, image_grid_thw=np.array(grids),
                           num_patches=num_patches)


def test_concatenate_equals_collating_the_rows_together():
  """Two rounds with different prompt and patch buckets, concatenated, equal the token batch of all their rows
  collated at once (the longest prompt bucket and the largest patch bucket)."""
  model = Qwen25VL(H.CONFIG, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  grids = [[(1, 4, 4), (1, 4, 6)], [(1, 8, 8), (1, 4, 4), (1, 8, 4)]]
  rows = [[ref.prompt(H.CONFIG, rng, [("image", g)], (2, 6)) for g in part] for part in grids]
  pixels = [ref.pixels(rng, part, H.CONFIG) for part in grids]
  parts = [_prompts(model, r, g, p, length, bucket) for r, g, p, length, bucket in zip(rows, grids, pixels, (40, 48),
                                                                                      (32, 64))]
  joint = _prompts(model, rows[0] + rows[1], grids[0] + grids[1], np.concatenate(pixels), 48, 64)
  tokens = rng.integers(1, 50, (5, 6))
  completion_mask = (np.arange(6)[None] < np.array([6, 3, 1, 4, 2])[:, None]).astype(np.float32)
  split = [batches.token_batch(p, tokens[s], completion_mask[s], advantages=np.arange(5.0)[s])
           for p, s in zip(parts, (slice(0, 2), slice(2, 5)))]
  got = batches.concatenate(split, pad_id=0)
  want = batches.token_batch(joint, tokens, completion_mask, advantages=np.arange(5.0))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  # Padding to the larger buckets changes nothing the model computes for the first part's valid tokens.
  logits = lambda b: np.asarray(model(b.input_ids, b.position_ids, b.attention_mask, vision=b.vision))
  alone, valid = logits(split[0]), np.asarray(split[0].attention_mask, bool)
  np.testing.assert_allclose(logits(got)[:2, 8:][valid], alone[valid], atol=1e-5)

  taken = batches.take_rows(want, [4, 1])
  np.testing.assert_array_equal(taken.input_ids, np.asarray(want.input_ids)[[4, 1]])
  np.testing.assert_array_equal(taken.position_ids, np.asarray(want.position_ids)[:, [4, 1]])
  np.testing.assert_array_equal(taken.vision.window_index, np.asarray(want.vision.window_index)[[4, 1]])


def _rollouts(model, rng, informative, pad_id=0, length=40, bucket=32, g=2):
  """Rollouts of len(informative) groups of g rows (tiny model prompts, random completions of 6 tokens)."""
  grids = [(1, 4, 4 + 2 * (i % 2)) for i in range(len(informative))]
  rows = [ref.prompt(H.CONFIG, rng, [("image", grid)], (2, 6)) for grid in grids]
  repeat = np.repeat(np.arange(len(grids)), g)
  prompts = _prompts(model, [rows[i] for i in repeat], [grids[i] for i in repeat],
                     np.concatenate([ref.pixels(rng, [grids[i]], H.CONFIG) for i in repeat]), length, bucket)
  n = len(repeat)
  batch = batches.token_batch(prompts, rng.integers(1, 50, (n, 6)), np.ones((n, 6)), advantages=rng.normal(size=n),
                              trajectory_mask=np.repeat(np.asarray(informative, np.float32), g))
  metrics = {"reward/semantic": rng.random(), "time/generate": 2.0, "tokens/completion": 6.0 * n,
             "tokens/prompt": 30.0 * n, "decode/steps": 6.0}
  return rollouts.Rollouts(batch=batch, metrics=metrics, completions=[f"c{rng.integers(1000)}" for _ in range(n)],
                           sampler_logps=rng.normal(size=(n, 6)).astype(np.float32),
                           levels=np.tile(np.arange(g, dtype=np.float32) * 0.5, len(grids)),
                           informative=np.asarray(informative))


def test_select_groups_keeps_informative_groups_first_in_sampling_order():
  model = Qwen25VL(H.CONFIG, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  first = _rollouts(model, rng, [False, True])
  second = _rollouts(model, rng, [True, False], length=48, bucket=64)
  picked = rollouts.select_groups([first, second], 2, pad_id=0)  # the informative group of each round
  want = batches.concatenate([batches.take_rows(first.batch, [2, 3]), batches.take_rows(second.batch, [0, 1])], 0)
  for a, b in zip(jax.tree.leaves(picked.batch), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert picked.completions == first.completions[2:] + second.completions[:2]
  np.testing.assert_array_equal(picked.sampler_logps, np.concatenate([first.sampler_logps[2:],
                                                                      second.sampler_logps[:2]]))
  np.testing.assert_array_equal(picked.levels, [0.0, 0.5, 0.0, 0.5])
  assert picked.metrics["filter/rounds"] == 2 and picked.metrics["filter/informative_fraction"] == 1.0
  assert picked.metrics["reward/semantic"] == first.metrics["reward/semantic"]  # the step's own prompts
  assert picked.metrics["time/generate"] == 4.0 and picked.metrics["tokens/completion"] == 48.0
  assert picked.metrics["rollout/kept_fraction"] == 1.0

  # Too few informative groups: the first uninformative one fills the step, masked out of the loss.
  short = rollouts.select_groups([first, second], 3, pad_id=0)
  assert short.completions == first.completions + second.completions[:2]
  assert short.metrics["filter/informative_fraction"] == 2 / 3
  np.testing.assert_array_equal(short.batch.trajectory_mask, [0, 0, 1, 1, 1, 1])


def _run(tmp_path, monkeypatch, filter_groups, steps=3, max_rounds=3):
  """A tiny RL run whose only reward is the parity of a completion's length, so groups differ by chance; its
  per-step metrics."""
  from configs import noisygrpo
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "parity", lambda c, s, q: float(len(c.split()) % 2))
  config = noisygrpo.get_config("tiny")
  with config.unlocked():
    config.train.workdir = str(tmp_path / filter_groups)
    config.data.data_dir = str(tmp_path / "data")
    config.data.train_size, config.data.eval_size = 48, 8
    config.data.prompt_buckets = (96,)
    config.rl.max_new_tokens, config.rl.rewards = 12, ("parity",)
    config.rl.filter_groups, config.rl.filter_max_rounds = filter_groups, max_rounds
    config.train.prompts_per_step, config.train.steps, config.train.eval_every = 2, steps, 0
  loops.run_rl(config)
  records = metrics_lib.read_jsonl(os.path.join(config.train.workdir, "metrics.jsonl"))
  return [r for r in records if "reward/semantic" in r]


def test_drop_and_refill_runs(tmp_path, monkeypatch):
  """drop: equal-reward groups leave the loss (kept fraction = informative fraction); refill: each step samples
  rounds of 2 prompts until 2 informative groups (or 3 rounds), the data position moving on by the prompts taken."""
  for r in _run(tmp_path, monkeypatch, "drop"):
    assert r["rollout/kept_fraction"] == 1.0 - r["filter/uninformative_fraction"]
  refill = _run(tmp_path, monkeypatch, "refill")
  positions = [0] + [r["data/position"] for r in refill]
  for r, start, end in zip(refill, positions, positions[1:]):
    assert end - start == 2 * r["filter/rounds"] and 1 <= r["filter/rounds"] <= 3
    if r["filter/rounds"] < 3:
      assert r["filter/informative_fraction"] == 1.0
    assert r["rollout/kept_fraction"] == r["filter/informative_fraction"]
    assert np.isfinite(r["train/loss"]) and np.isfinite(r["drift/logp_abs_diff"])
  assert any(r["filter/rounds"] > 1 for r in refill)  # this seed's first step refills
