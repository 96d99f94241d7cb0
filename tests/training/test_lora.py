"""LoRA: zero-initialised adapters on the decoder (step 0 is the base model), only adapters train, the reference model
is the base with no copy of it, the export merges the adapters into a checkpoint transformers reads, and a LoRA RL run
of the tiny preset moves away from the base without touching it, learns a reward, and resumes bitwise."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from noisygrpo_jax.models.qwen2_5_vl import Qwen25VL, config as model_config, load_hf, lora, param_names, save_hf
from noisygrpo_jax.rl import rewards
from noisygrpo_jax.training import loops, memory, metrics as metrics_lib, optimizer as optimizer_lib
from noisygrpo_jax.training import params as params_lib, setup, train_step as ts
from tests.models import hf_reference as ref
from tests.training import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import export as export_lib  # noqa: E402  pylint: disable=wrong-import-position

LORA = model_config.LoraConfig(rank=4, alpha=8.0)
CONFIG = helpers.CONFIG.replace(lora=LORA)
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _flat(params: dict) -> dict:
  return {tuple(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _hf_inputs(config):
  rng = np.random.default_rng(1)
  grids = [(1, 4, 6)]
  ids, mask = ref.left_pad([ref.prompt(config, rng, [("image", grids[0])], (6, 10))])
  return dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(rng, grids, config),
              image_grid_thw=np.array(grids))


def _with_random_adapters(model, seed: int = 0):
  """`model` with every lora_b drawn (scale 0.3), so the adapters change the output."""
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  key = jax.random.key(seed)
  for i, (path, variable) in enumerate(flat):
    if path[-1] == "lora_b":
      value = variable.get_value()
      variable.set_value(0.3 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def test_new_adapters_leave_the_base_model_and_its_logits_exactly_as_they_were():
  base, adapted = Qwen25VL(helpers.CONFIG, nnx.Rngs(0)), Qwen25VL(CONFIG, nnx.Rngs(0))
  base_params, adapted_params = _flat(nnx.to_pure_dict(nnx.state(base))), _flat(nnx.to_pure_dict(nnx.state(adapted)))
  adapters = {p: x for p, x in adapted_params.items() if lora.is_adapter(p)}
  # Every decoder projection, stacked over the layers: lora_a [layers, in, r] random, lora_b [layers, r, out] zero.
  assert len(adapters) == 2 * len(model_config.LORA_TARGETS)
  layers = CONFIG.text.num_hidden_layers
  for (*module, name), x in adapters.items():
    assert module[:2] == ["language_model", "layers"] and module[-1] in model_config.LORA_TARGETS
    assert x.shape[0] == layers and x.shape[2 if name == "lora_a" else 1] == LORA.rank
    assert np.all(x == 0) if name == "lora_b" else np.abs(x).max() > 0
  # The adapters draw from a stream of their own: the base weights are those of the model without them.
  assert {p: x for p, x in adapted_params.items() if p not in adapters}.keys() == base_params.keys()
  for p, x in base_params.items():
    np.testing.assert_array_equal(adapted_params[p], x, err_msg=str(p))
  inputs = _hf_inputs(CONFIG)
  np.testing.assert_array_equal(np.asarray(adapted.forward_hf(**inputs)), np.asarray(base.forward_hf(**inputs)))
  # Drawn adapters do change the output (the comparison above is not vacuous).
  moved = np.asarray(_with_random_adapters(adapted).forward_hf(**inputs))
  assert np.abs(moved - np.asarray(base.forward_hf(**inputs))).max() > 1e-2


def test_a_train_step_updates_only_the_adapters_and_the_optimizer_holds_only_theirs():
  _, batch = helpers.model_and_batch()
  model = Qwen25VL(CONFIG, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  trainable, frozen = params_lib.partition(nnx.to_pure_dict(state), freeze_vision=True, adapters_only=True)
  assert _flat(trainable).keys() == {p for p in _flat(nnx.to_pure_dict(state)) if lora.is_adapter(p)}
  assert not any(lora.is_adapter(p) for p in _flat(frozen)) and set(frozen) == {"visual", "language_model",
                                                                               "lm_head"}
  optimizer = optimizer_lib.make_optimizer(1e-2)
  opt_state = optimizer.init(trainable)
  moments = [p for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if np.ndim(x)]
  assert moments and all(str(getattr(p[-1], "key", "")) in lora.ADAPTER_NAMES for p in moments)
  frozen_before = _flat(frozen)
  train_state = ts.TrainState(step=np.int32(0), params=trainable, opt_state=opt_state, frozen=frozen)
  step = jax.jit(ts.make_train_step(graphdef, optimizer, ts.LossConfig(beta=0.0)))
  states, objective = [train_state], []
  for _ in range(3):
    new_state, metrics, logps = step(states[-1], batch)  # logps: the policy's before this update
    assert float(metrics["grad_norm"]) > 0 and float(metrics["skipped"]) == 0
    mask = np.asarray(batch.completion_mask)
    objective.append(float(np.sum(np.asarray(batch.advantages) * (np.asarray(logps) * mask).sum(1) / mask.sum(1))))
    states.append(new_state)
  # The adapters learn: the advantage-weighted log-likelihood the policy gradient ascends goes up.
  assert objective[0] < objective[1] < objective[2], objective
  for p, x in frozen_before.items():
    np.testing.assert_array_equal(_flat(states[-1].frozen)[p], x, err_msg=str(p))
  before, first, second = (_flat(s.params) for s in states[:3])
  for p in before:
    # With lora_b 0 the first gradient reaches only lora_b; the second, through the moved lora_b, lora_a too.
    assert np.abs(first[p] - before[p]).max() == 0 if p[-1] == "lora_a" else np.abs(first[p]).max() > 0, p
    assert np.abs(second[p] - first[p]).max() > 0, p


def test_export_merges_the_adapters_into_a_checkpoint_transformers_loads(tmp_path):
  adapted = _with_random_adapters(Qwen25VL(CONFIG, nnx.Rngs(0)))
  inputs = _hf_inputs(CONFIG)
  ours = np.asarray(adapted.forward_hf(**inputs))
  save_hf(adapted, tmp_path)
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    keys = list(f.keys())
  base_params = _flat(nnx.to_pure_dict(nnx.state(Qwen25VL(helpers.CONFIG, nnx.Rngs(0)))))
  assert sorted(keys) == sorted(k for p, x in base_params.items() for k in param_names.layer_keys(p, x.shape))
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager",
                                                                       dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(**ref.hf_inputs(CONFIG, **inputs)).logits.numpy()
  assert np.abs(theirs - ours).max() <= 1e-4
  # Loaded back (without adapters, or with new zero ones) it is the adapted model.
  for lora_config in (model_config.LoraConfig(), LORA):
    assert np.abs(np.asarray(load_hf(tmp_path, lora=lora_config).forward_hf(**inputs)) - ours).max() <= 1e-5


def test_merged_kernel_is_float32_math_in_the_kernel_dtype():
  rng = np.random.default_rng(0)
  kernel, a, b = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((2, 8, 6), (2, 8, 3), (2, 3, 6)))
  merged = lora.merged_kernel(kernel, a, b, 0.5)
  f32 = lambda x: np.asarray(x, np.float32)
  expected = (f32(kernel) + 0.5 * np.einsum("lir,lro->lio", f32(a), f32(b))).astype(jnp.bfloat16)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged), expected)


@pytest.mark.parametrize("bad, message", [
    (dict(rank=-1), "lora.rank=-1 must be >= 0"),
    (dict(rank=4, targets=("q_proj", "qkv")), "['qkv'] are not decoder projections"),
    (dict(rank=4, targets=()), "with no lora.targets"),
    (dict(rank=4, alpha=0.0), "lora.alpha=0.0 must be > 0"),
])
def test_bad_lora_settings_are_refused_naming_the_field(bad, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    helpers.CONFIG.replace(lora=dataclasses.replace(LORA, **bad))


def test_memory_estimate_counts_adapters_as_the_trainable_state_and_the_base_once():
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Qwen25VL(CONFIG, nnx.Rngs(0)))))
  trainable, frozen = params_lib.partition(params, freeze_vision=False, adapters_only=True)
  nbytes = lambda tree, dtype=None: sum(int(np.prod(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
                                       for x in jax.tree.leaves(tree))
  run = memory.RunShape(rows=8, prompt_len=64, max_new_tokens=16, patches=64, freeze_vision=False,
                        compute_dtype="bfloat16")
  est = memory.estimate(CONFIG, run, ONE_DEVICE)
  assert est.master == nbytes(trainable) and est.optimizer == 2 * nbytes(trainable)
  assert est.reference == est.compute_copy == nbytes(trainable, "bfloat16")
  assert est.frozen == nbytes(frozen, "bfloat16") and not est.vision_trains
  # The rollout copy (params.decoding_copy): the adapters and the base decoder layers, unstacked; the rollouts read
  # the other frozen weights in place.
  base_layers = frozen["language_model"]["layers"]
  assert est.rollout_copy == nbytes(trainable, "bfloat16") + nbytes(base_layers, "bfloat16")
  assert est.rollout_shared == est.frozen - nbytes(base_layers, "bfloat16")
  # Replicated rollouts over 4 parameter shards hold the adapters and the base decoder whole on every device.
  replicated = memory.estimate(CONFIG, dataclasses.replace(run, rollout_replicated=True), {"fsdp": 4})
  base_decoder = {k: v for k, v in frozen.items() if k != "visual"}
  assert replicated.rollout_copy == nbytes(trainable, "bfloat16") + nbytes(base_decoder, "bfloat16")
  full = memory.estimate(helpers.CONFIG, run, ONE_DEVICE)
  assert full.vision_trains and est.master < full.master / 20


# ------------------------------------------------------------------------------------------------
# Runs of the tiny preset


def _config(workdir, data_dir, **overrides):
  from configs import noisygrpo
  c = noisygrpo.get_config("tiny")
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.optim.freeze_vision = True
  c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0
  c.train.workdir, c.data.data_dir = str(workdir), str(data_dir)
  c.data.train_size, c.data.eval_size, c.data.prompt_buckets = 48, 8, (96,)
  c.train.prompts_per_step, c.rl.max_new_tokens = 2, 12
  c.train.steps, c.train.checkpoint_every, c.train.keep_checkpoints, c.train.eval_every = 4, 2, 5, 0
  for field, value in overrides.items():
    group, name = field.split(".")
    setattr(c[group], name, value)
  return c


def _state(checkpoint_dir) -> dict:
  return ocp.StandardCheckpointer().restore(os.path.join(checkpoint_dir, "state"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_lora_settings_that_cannot_work_are_refused(tmp_path, data_dir):
  with pytest.raises(ValueError, match="set optim.freeze_vision=True"):
    setup.validate(_config(tmp_path, data_dir, **{"optim.freeze_vision": False}))
  with pytest.raises(ValueError, match="set model.checkpoint to it"):
    setup.validate(_config(tmp_path, data_dir, **{"train.init_from": str(tmp_path)}))
  with pytest.raises(ValueError, match=r"lora.targets=\('mlp',\)"):
    setup.validate(_config(tmp_path, data_dir, **{"lora.targets": ("mlp",)}))


def test_the_reference_model_is_the_base_with_no_copy_of_it(tmp_path, data_dir):
  run = loops.Run(_config(tmp_path, data_dir), "rl")
  buffers = lambda tree: {p: x.unsafe_buffer_pointer() for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  reference, frozen = buffers(run.reference()), buffers(run.state.frozen)
  adapters = {p for p in reference if p not in frozen}
  assert adapters and all(str(p[-1].key) in lora.ADAPTER_NAMES for p in adapters)
  assert all(reference[p] == frozen[p] for p in frozen)  # the base weights are the state's, shared
  assert not {reference[p] for p in adapters} & set(buffers(run.state.params).values())  # the adapters are a copy
  base_config = run.model().config.replace(lora=model_config.LoraConfig())
  base_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen25VL(base_config, nnx.Rngs(0))))
  ids = np.random.default_rng(0).integers(0, base_config.text.vocab_size - 8, (2, 12))
  logits = lambda graphdef, params: np.asarray(nnx.merge(graphdef, params).forward_hf(ids))
  np.testing.assert_array_equal(logits(run.setup.graphdef, run.reference()), logits(base_graphdef, run.state.frozen))
  # The rollouts run the adapted policy: the state's adapters and base, layer l of each stack [layers, ...] held as
  # its own array (params.decoding_copy); the vision tower shared.
  rollout, expected = _flat(run.rollout_params()), set()
  for path, x in _flat(params_lib.combine(run.state.params, run.state.frozen)).items():
    if path[:2] != ("language_model", "layers"):
      expected.add(path)
      continue
    for layer in range(x.shape[0]):
      expected.add(path[:2] + ("layers", str(layer)) + path[2:])
      np.testing.assert_array_equal(rollout[path[:2] + ("layers", str(layer)) + path[2:]], x[layer])
  assert set(rollout) == expected
  assert buffers(run.rollout_params()["visual"]) == buffers(run.state.frozen["visual"])
  run.close({}, run.progress_bar("lora"))


def test_replicated_rollouts_hold_the_base_decoder_whole_on_every_device(tmp_path, data_dir):
  """8 devices (fsdp=8), rl.rollout_weights="replicated": what the decode loop reads is whole on every device, the
  adapters' rollout copy and a copy of the frozen base decoder made with it (so the loop gathers no weight; the
  replicated layout's loop is counted in tests/sampling), while the state keeps the base sharded."""
  script = textwrap.dedent("""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax
      from noisygrpo_jax.training import loops
      from tests.training import test_lora as T
      run = loops.Run(T._config(sys.argv[1], sys.argv[2]), "rl")
      assert run.mesh.size == 8 and run.config.rl.rollout_weights == "replicated"
      leaves = jax.tree_util.tree_leaves_with_path(run.rollout_params())
      decode = [(p, x) for p, x in leaves if p[0].key != "visual"]  # the vision tower runs in the prefill only
      assert decode and all(x.sharding.is_fully_replicated for _, x in decode), [
          jax.tree_util.keystr(p) for p, x in decode if not x.sharding.is_fully_replicated]
      assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(run.state.frozen["language_model"]))
      print("REPLICATED_OK")
      """)
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(data_dir)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert "REPLICATED_OK" in result.stdout, result.stderr[-3000:]


def test_a_lora_rl_run_moves_away_from_the_base_without_touching_it_and_resumes_bitwise(tmp_path, data_dir):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  loops.run_rl(_config(straight, data_dir))
  records = [r for r in metrics_lib.read_jsonl(straight / "metrics.jsonl") if "train/kl_mean" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  # Step 1's policy is the reference (the base): KL 0; the updates move the policy away from it.
  kl = [r["train/kl_mean"] for r in records]
  assert abs(kl[0]) <= 1e-6 and kl[-1] > 1e-4 and kl[-1] > kl[1], kl
  assert all(r["train/update_norm"] > 0 for r in records)
  first, last = _state(straight / "checkpoints" / "2"), _state(straight / "checkpoints" / "4")
  assert all(lora.is_adapter(p) for p in _flat(last["params"]))
  b = {p: x for p, x in _flat(last["params"]).items() if p[-1] == "lora_b"}
  assert b and all(np.abs(x).max() > 0 for x in b.values())
  # The base weights: the random initialisation of the run's seed, bitwise, at every checkpoint.
  config = _config(straight, data_dir)
  base_config = setup.model_config(config, setup.build_tokenizer(config, [])).replace(lora=model_config.LoraConfig())
  base = Qwen25VL(base_config, nnx.Rngs(config.train.seed))
  initial = _flat(nnx.to_pure_dict(nnx.state(base)))
  for state in (first, last):
    assert _flat(state["frozen"]).keys() == initial.keys()
    for p, x in _flat(state["frozen"]).items():
      np.testing.assert_array_equal(x, initial[p], err_msg=str(p))
  # A run stopped after step 2 (its step-4 checkpoint dropped) resumes to the same step-4 state, bitwise.
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  loops.run_rl(_config(resumed, data_dir))
  again = _state(resumed / "checkpoints" / "4")
  for field in ("params", "opt_state", "frozen"):
    a, b = _flat(last[field]), _flat(again[field])
    assert a.keys() == b.keys()
    for p in a:
      np.testing.assert_array_equal(a[p], b[p], err_msg=f"{field} {p}")
  # The run exports (experiments/export.py) as a plain HF checkpoint with the adapters merged into the kernels: the
  # merged model computes what the adapted one does.
  export_lib.export(str(straight), str(tmp_path / "exported"))
  graphdef, state = nnx.split(Qwen25VL(setup.model_config(config, setup.build_tokenizer(config, [])), nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params_lib.combine(last["params"], last["frozen"]))
  ids = np.random.default_rng(0).integers(0, base_config.text.vocab_size - 8, (2, 12))
  np.testing.assert_allclose(np.asarray(load_hf(tmp_path / "exported").forward_hf(ids)),
                             np.asarray(nnx.merge(graphdef, state).forward_hf(ids)), atol=1e-5)


def test_a_lora_rl_run_learns_a_reward_without_touching_the_base(tmp_path, data_dir, monkeypatch):
  """GRPO with LoRA adapters on the tiny preset against a reward any policy can learn (the fraction of its words in a
  fixed half of the vocabulary; measured 0.57 at step 1, 0.91 at step 16 at lr 1e-2): the reward curve rises while
  the base weights stay the seed's initialisation, bitwise."""
  from configs import grpo
  half = lambda word: zlib.crc32(word.encode()) % 2 == 0
  monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "half_the_words",
                      lambda completion, solution, question: float(np.mean([half(w) for w in completion.split()] or 0)))
  config = grpo.get_config("tiny")
  with config.unlocked():
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.optim.freeze_vision, config.optim.learning_rate, config.optim.warmup_steps = True, 1e-2, 0
    config.train.workdir, config.data.data_dir = str(tmp_path), str(data_dir)
    config.data.train_size, config.data.eval_size, config.data.prompt_buckets = 48, 8, (96,)
    config.train.prompts_per_step, config.rl.max_new_tokens, config.rl.rewards = 4, 12, ("half_the_words",)
    config.train.steps, config.train.checkpoint_every, config.train.eval_every = 10, 10, 0
  loops.run_rl(config)
  reward = [r["reward/semantic"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if "reward/semantic" in r]
  assert np.mean(reward[-3:]) >= np.mean(reward[:3]) + 0.1, reward
  base_config = setup.model_config(config, setup.build_tokenizer(config, [])).replace(lora=model_config.LoraConfig())
  initial = _flat(nnx.to_pure_dict(nnx.state(Qwen25VL(base_config, nnx.Rngs(config.train.seed)))))
  frozen = _flat(_state(tmp_path / "checkpoints" / "10")["frozen"])
  assert frozen.keys() == initial.keys()
  for p, x in frozen.items():
    np.testing.assert_array_equal(x, initial[p], err_msg=str(p))
