"""The per-device memory estimate: exact parameter, optimizer and KV-cache terms, sharding, and the refusal."""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from noisygrpo_jax import sharding
from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as model_config
from noisygrpo_jax.processing import image as image_lib
from noisygrpo_jax.sampling import sampler
from noisygrpo_jax.training import memory, optimizer as optimizer_lib, params as params_lib, setup
from tests.models import hf_reference as ref
from tests.training import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
RUN = memory.RunShape(rows=8, prompt_len=64, max_new_tokens=16, patches=64)


def _run_config(preset):
  spec = importlib.util.spec_from_file_location("noisygrpo_config", os.path.join(ROOT, "configs", "noisygrpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if np.ndim(x))


def _abstract_params(config):
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0)))))


@pytest.mark.parametrize("config", [
    model_config.tiny(), model_config.small(), model_config.small(dtype="bfloat16"),
    model_config.tiny().replace(text=dataclasses.replace(model_config.tiny().text, tie_word_embeddings=True)),
], ids=["tiny", "small", "small_bf16", "tiny_tied"])
def test_param_and_optimizer_bytes_equal_the_model_state(config):
  """Master, moments, frozen, reference and rollout copies: exactly the bytes of the trees a run keeps."""
  params = _abstract_params(config)
  for freeze_vision in (True, False):
    for compute in ("", "bfloat16"):
      run = dataclasses.replace(RUN, freeze_vision=freeze_vision, compute_dtype=compute)
      est = memory.estimate(config, run, ONE_DEVICE)
      trainable, frozen = params_lib.partition(params, freeze_vision)
      as_compute = lambda tree: jax.eval_shape(lambda t: params_lib.cast(t, compute), tree)
      assert est.master == _nbytes(trainable) and est.frozen == _nbytes(as_compute(frozen))
      assert est.reference == _nbytes(as_compute(trainable))
      mixed = bool(compute) and compute != config.dtype
      assert est.compute_copy == (_nbytes(as_compute(trainable)) if mixed else 0)
      # The rollout copy (params.decoding_copy): all of it when cast; in model.dtype only the unstacked decoder
      # layers are copies (the other leaves are the master's own buffers, which the rollouts read in place).
      copy = jax.eval_shape(lambda t: params_lib.decoding_copy(t, compute), trainable)
      copied = _nbytes(copy) if mixed else _nbytes(copy["language_model"]["layers"])
      assert est.rollout_copy == copied and est.rollout_shared == est.master + est.frozen - (est.master if mixed
                                                                                              else copied)
      opt_state = jax.eval_shape(optimizer_lib.make_optimizer(1e-3).init, trainable)
      assert est.optimizer == _nbytes(opt_state)  # two moments of the trainable parameters, none for frozen ones


def test_kv_cache_equals_the_samplers_allocation():
  model = Qwen25VL(helpers.CONFIG, nnx.Rngs(0))
  rng, grids = np.random.default_rng(0), [(1, 4, 4), (1, 4, 6), (1, 4, 4)]
  ids, mask = ref.left_pad([ref.prompt(helpers.CONFIG, rng, [("image", g)], (2, 6)) for g in grids])
  prompts = sampler.prompts_from_hf(model, ids, mask, pixel_values=ref.pixels(rng, grids, helpers.CONFIG),
                                    image_grid_thw=np.array(grids))
  params = sampler.SamplingParams(max_new_tokens=9, eos_ids=(0,), pad_id=0)
  graphdef, state = nnx.split(model)
  decode_state = jax.eval_shape(sampler.prefill, graphdef, state, prompts, jax.random.key(0), params)
  run = memory.RunShape(rows=3, prompt_len=prompts.input_ids.shape[1], max_new_tokens=9, patches=64)
  assert memory.estimate(model.config, run, ONE_DEVICE).kv_cache == _nbytes(decode_state.caches)
  bf16 = jax.eval_shape(sampler.prefill, graphdef, params_lib.cast(state, "bfloat16"), prompts, jax.random.key(0),
                        params)  # the rollout copy in the compute dtype: a bf16 cache
  bf16_run = dataclasses.replace(run, compute_dtype="bfloat16")
  assert memory.estimate(model.config, bf16_run, ONE_DEVICE).kv_cache == _nbytes(bf16.caches)


def test_fsdp_divides_params_and_data_axes_divide_rows():
  config = model_config.small()
  one = memory.estimate(config, RUN, ONE_DEVICE)
  four = memory.estimate(config, RUN, {"data": 1, "fsdp": 4, "tensor": 1})
  assert four.master == -(-one.master // 4) and four.optimizer == 2 * -(-one.optimizer // 2 // 4)
  assert four.kv_cache == one.kv_cache // 4  # 8 rollouts -> 2 per device
  assert memory.estimate(config, RUN, {"data": 2, "fsdp": 1, "tensor": 1}).master == one.master
  assert memory.estimate(config, RUN, {"data": 1, "fsdp": 2, "tensor": 2}).master == four.master


def test_remat_and_micro_batches_shrink_activations():
  config = model_config.small()
  base = memory.estimate(config, RUN, ONE_DEVICE)
  assert memory.estimate(config.replace(remat=True), RUN, ONE_DEVICE).train_activations < base.train_activations
  halves = memory.estimate(config, memory.RunShape(**{**RUN.__dict__, "micro_batches": 2}), ONE_DEVICE)
  assert halves.train_activations < base.train_activations and halves.gradients == 2 * base.gradients


def test_shared_prompts_shrink_activations():
  """G rollouts of a prompt: the vision tower sees one image per group; the decoder runs the prompt once."""
  config = model_config.small()
  for remat in (False, True):
    base = memory.estimate(config.replace(remat=remat), RUN, ONE_DEVICE)
    grouped = memory.estimate(config.replace(remat=remat), dataclasses.replace(RUN, group_size=4), ONE_DEVICE)
    assert 4 * grouped.train_vision == base.train_vision
    assert grouped.train_decoder < base.train_decoder and grouped.kv_cache == base.kv_cache


def test_7b_at_batch_64_on_one_8gb_device_is_refused_before_allocating(monkeypatch, capsys):
  config = _run_config("qwen2_5_vl_7b")
  assert config.train.prompts_per_step * config.rl.group_size == 64
  monkeypatch.setattr(memory, "device_memory_bytes", lambda override_gib: (8 * 10**9, "test: 8 GB"))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(memory.MemoryBudgetError) as info:
    setup.build_model(config, None, mesh)  # a 7B random init would take minutes and ~15 GiB: refused first
  message = str(info.value)
  assert message.startswith("the estimated peak memory per device, ")
  assert "exceeds the 7.45 GiB available (test: 8 GB) by " in message and "largest terms: " in message
  for fix in ("train.prompts_per_step", "rl.max_new_tokens", "mesh.fsdp", "train.micro_batches",
              "train.memory_check=False"):
    assert fix in message, message
  table = capsys.readouterr().out
  assert "Memory estimate per device (mesh data=1 fsdp=1 tensor=1):" in table and "rollout KV cache" in table
  config.model.remat, config.model.compute_dtype = False, ""
  with pytest.raises(memory.MemoryBudgetError, match="set model.remat=True.*model.compute_dtype='bfloat16'"):
    setup.check_memory(config, setup.model_config(config, None), ONE_DEVICE)
  config.train.memory_check = False  # the override: warn and go on
  est = setup.check_memory(config, setup.model_config(config, None), ONE_DEVICE)
  assert est.peak > 8 * 10**9 and "WARNING (train.memory_check=False)" in capsys.readouterr().out


def test_tiny_run_fits_this_machine():
  config = _run_config("tiny")
  limit, source = memory.device_memory_bytes()
  assert limit > 0 and source
  est = setup.check_memory(config, setup.model_config(config, list(range(512))), ONE_DEVICE)
  assert 0 < est.peak < limit


def test_image_processing_follows_the_vision_towers_patch_geometry():
  config = _run_config("tiny")
  config.data.min_pixels, config.data.max_pixels = 32 * 32, 64 * 64
  vision = dataclasses.replace(model_config.small().vision, patch_size=16, temporal_patch_size=1,
                               spatial_merge_size=1)
  image = setup.image_config(config, vision)
  assert (image.patch_size, image.temporal_patch_size, image.merge_size) == (16, 1, 1)
  processed = image_lib.process_image(np.zeros((64, 64, 3), np.uint8), image)
  assert processed.image_grid_thw.tolist() == [[1, 4, 4]]  # 64 px / 16 px patches, not / 14
  assert processed.pixel_values.shape == (16, 3 * 1 * 16 * 16)
  assert processed.num_tokens.tolist() == [16]  # merge size 1: one token per patch
  assert setup.run_shape(config, vision).patches == memory.smallest_bucket(16, config.data.patch_buckets)


def test_prefill_micro_batches_shrink_the_prefill_only():
  config = model_config.small()
  one = memory.estimate(config, RUN, ONE_DEVICE)
  four = memory.estimate(config, dataclasses.replace(RUN, prefill_micro_batches=4), ONE_DEVICE)
  assert four.prefill < one.prefill and four.kv_cache == one.kv_cache and four.train_step == one.train_step


def test_fewest_parts_fit_the_limit_and_given_counts_are_kept():
  config = model_config.qwen2_5_vl_3b(dtype="float32", remat=True)
  run = memory.RunShape(rows=64, prompt_len=4096, max_new_tokens=256, patches=12288, group_size=4,
                        compute_dtype="bfloat16", micro_batches=0, prefill_micro_batches=0)
  limit = int(79.6 * memory.GIB)
  micro, prefill = memory.fewest_parts(config, run, ONE_DEVICE, limit)
  fits = lambda m, p: memory.estimate(config, dataclasses.replace(run, micro_batches=m, prefill_micro_batches=p),
                                      ONE_DEVICE).peak <= limit
  assert fits(micro, prefill)
  smaller = [m for m in memory.divisors(16) if m < micro]
  assert smaller and not any(fits(m, prefill) for m in smaller)
  assert not any(fits(micro, p) for p in memory.divisors(64) if p < prefill)
  assert memory.fewest_parts(config, dataclasses.replace(run, micro_batches=2, prefill_micro_batches=3), ONE_DEVICE,
                             limit) == (2, 3)


def test_the_papers_3b_recipe_is_accepted_on_one_80gb_gpu(tmp_path, capsys):
  """qwen2_5_vl_3b from a checkpoint directory's config.json (the recipe: 16 prompts x G = 4, images up to
  1536^2, 256 new tokens): the estimate is printed and accepted for an 80 GB device, with the micro-batch counts
  chosen; the same run refuses a 40 GB device, naming the counts it tried."""
  (tmp_path / "config.json").write_text(json.dumps(model_config.to_hf_dict(model_config.qwen2_5_vl_3b())))
  config = _run_config("qwen2_5_vl_3b")
  config.model.checkpoint = str(tmp_path)
  config.train.device_memory_gib = 79.6  # an H100 80GB (81,559 MiB)
  assert (config.train.prompts_per_step * config.rl.group_size, config.rl.max_new_tokens) == (64, 256)
  est = setup.check_memory(config, setup.model_config(config, None), ONE_DEVICE)
  out = capsys.readouterr().out
  assert "Memory estimate per device" in out and "train.device_memory_gib=79.6" in out
  assert est.peak <= 79.6 * memory.GIB
  assert config.train.micro_batches > 1 and config.rl.prefill_micro_batches > 1  # chosen, and now in the config
  assert f"train.micro_batches=0: the fewest parts that fit the estimate: {config.train.micro_batches}" in out
  config.train.micro_batches = config.rl.prefill_micro_batches = 0
  config.train.device_memory_gib = 40.0
  with pytest.raises(memory.MemoryBudgetError, match="train.micro_batches=16 .*rl.prefill_micro_batches=64"):
    setup.check_memory(config, setup.model_config(config, None), ONE_DEVICE)
