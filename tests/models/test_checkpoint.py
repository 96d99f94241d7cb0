"""HF checkpoint import/export (`load_hf`, `save_hf`) against transformers' own save_pretrained/from_pretrained.

transformers 5.24 writes the older key layout (`model.*`, `visual.*`) and omits `lm_head.weight` when the
embeddings are tied; `save_hf` writes the newer one (`model.language_model.*`, `model.visual.*`).
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from noisygrpo_jax.models.qwen2_5_vl import config as cfg
from noisygrpo_jax.models.qwen2_5_vl import load_hf, save_hf
from tests.models import hf_reference as ref

CONFIG = cfg.tiny()
TIED = CONFIG.replace(text=dataclasses.replace(CONFIG.text, tie_word_embeddings=True))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """(HF model, directory of its save_pretrained)."""
  hf = ref.hf_model(CONFIG)
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path, safe_serialization=True)
  return hf, str(path)


@pytest.fixture(scope="module")
def inputs():
  """One row: text, an image of 8x12 patches (several windows), text."""
  rng = np.random.default_rng(0)
  grids = [(1, 8, 12)]
  ids, mask = ref.left_pad([ref.prompt(CONFIG, rng, [("image", grids[0])], (10, 20))])
  return dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(rng, grids, CONFIG),
              image_grid_thw=np.array(grids))


def hf_logits(model, config, inputs) -> np.ndarray:
  with torch.no_grad():
    return model(**ref.hf_inputs(config, **inputs)).logits.numpy()


def flat_params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
  pa, pb = flat_params(a), flat_params(b)
  assert pa.keys() == pb.keys()
  for p in pa:
    assert pa[p].dtype == pb[p].dtype, p
    np.testing.assert_array_equal(pa[p], pb[p], err_msg=str(p))


def old_layout(key: str) -> str:
  """`model.language_model.*` -> `model.*`, `model.visual.*` -> `visual.*` (transformers < 4.52)."""
  return re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", key))


def rewrite(src: str, dst: str, edit) -> str:
  """Copies checkpoint `src` to `dst` with its tensors dict {key: array} passed through `edit`."""
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file(edit(tensors), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
def test_round_trip_through_transformers(config, inputs, tmp_path):
  hf = ref.hf_model(config)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  ours = load_hf(tmp_path / "hf")
  expected = hf_logits(hf, config, inputs)
  assert np.abs(np.asarray(ours.forward_hf(**inputs)) - expected).max() <= 1e-4

  save_hf(ours, tmp_path / "ours")
  assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
  with safe_open(tmp_path / "ours" / "model.safetensors", framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    assert ("lm_head.weight" in f.keys()) == (not config.text.tie_word_embeddings)
    assert "model.visual.patch_embed.proj.weight" in f.keys()
  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours",
                                                                             attn_implementation="eager")
  assert np.abs(hf_logits(reloaded, config, inputs) - expected).max() <= 1e-6


def test_tied_lm_head_in_file_is_ignored(tmp_path):
  hf = ref.hf_model(TIED)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  path = rewrite(tmp_path / "hf", tmp_path / "with_head",
                 lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
  ours = load_hf(path)
  assert ours.lm_head is None
  assert_same_params(ours, load_hf(tmp_path / "hf"))


def test_sharded_checkpoint_and_both_key_layouts(hf_checkpoint, tmp_path):
  hf, path = hf_checkpoint
  reference = load_hf(path)

  hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="200KB")
  shards = [f for f in os.listdir(tmp_path / "sharded") if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
  assert len(shards) > 1 and os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert_same_params(load_hf(tmp_path / "sharded"), reference)

  # save_hf writes the new layout; rewriting it to the old one must load to the same parameters.
  save_hf(reference, tmp_path / "new")
  old = rewrite(tmp_path / "new", tmp_path / "old", lambda t: {old_layout(k): v for k, v in t.items()})
  keys = load_file(os.path.join(old, "model.safetensors")).keys()
  assert "model.layers.0.mlp.up_proj.weight" in keys and "visual.merger.mlp.2.bias" in keys
  assert_same_params(load_hf(tmp_path / "new"), reference)
  assert_same_params(load_hf(old), reference)


def test_save_replaces_an_earlier_sharded_checkpoint(hf_checkpoint, tmp_path):
  hf, path = hf_checkpoint
  hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
  (tmp_path / "tokenizer.json").write_text("{}")
  save_hf(load_hf(path), tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json"]


def test_bfloat16_load_rounds_the_float32_checkpoint(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  p32, p16 = flat_params(load_hf(path)), flat_params(load_hf(path, dtype=jnp.bfloat16))
  for p in p32:
    assert p16[p].dtype == ml_dtypes.bfloat16, p
    np.testing.assert_array_equal(p16[p], p32[p].astype(ml_dtypes.bfloat16), err_msg=str(p))
  bf16 = load_hf(path, dtype="bfloat16")
  assert bf16.config.dtype == "bfloat16"
  save_hf(bf16, tmp_path)
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    assert f.get_slice("model.language_model.embed_tokens.weight").get_dtype() == "BF16"
  assert_same_params(load_hf(tmp_path, dtype="bfloat16"), bf16)


# Runs in a fresh interpreter: the 8 fake CPU devices must be configured before jax is imported.
_MESH_SCRIPT = """
import json, sys
import numpy as np
from flax import nnx
from noisygrpo_jax import sharding
from noisygrpo_jax.models.qwen2_5_vl import load_hf
path, inputs = sys.argv[1], dict(np.load(sys.argv[2]))
single = load_hf(path)
expected = np.asarray(single.forward_hf(**inputs))
out = {}
for name, sizes in {"data2_fsdp4": dict(data=2, fsdp=4), "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4)}.items():
  model = load_hf(path, mesh=sharding.make_mesh(**sizes))
  specs = {".".join(map(str, p)): list(v.get_value().sharding.spec) for p, v in nnx.to_flat_state(nnx.state(model))}
  q = model.language_model.layers.self_attn.q_proj.kernel[...]
  out[name] = dict(specs=specs, q_shard=list(q.addressable_shards[0].data.shape), devices=len(q.sharding.device_set),
                   diff=float(np.abs(np.asarray(model.forward_hf(**inputs)) - expected).max()))
print(json.dumps(out))
"""


def test_load_onto_a_mesh(hf_checkpoint, inputs, tmp_path):
  _, path = hf_checkpoint
  np.savez(tmp_path / "inputs.npz", **inputs)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO_ROOT}
  run = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, path, str(tmp_path / "inputs.npz")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])

  # data=2, fsdp=4, tensor=1: `embed`/`vision_embed` axes go to fsdp; heads/mlp/vocab (-> tensor) stay whole; the
  # stacked layer axis is never cut.
  dp = out["data2_fsdp4"]
  assert dp["devices"] == 8 and dp["q_shard"] == [2, 64 // 4, 64]
  assert dp["specs"]["language_model.layers.self_attn.q_proj.kernel"] == [None, "fsdp", None]
  assert dp["specs"]["language_model.layers.self_attn.o_proj.kernel"] == [None, None, "fsdp"]
  assert dp["specs"]["language_model.embed_tokens.embedding"] == [None, "fsdp"]
  assert dp["specs"]["language_model.norm.weight"] == [None]
  assert dp["specs"]["visual.patch_embed.proj.kernel"] == [None, "fsdp"]
  assert dp["specs"]["visual.blocks.attn.qkv.kernel"] == [None, "fsdp", None]
  # fsdp=2, tensor=4: both axes of the attention kernels are cut (our [in, out] shard = HF's transposed slice).
  tp = out["fsdp2_tensor4"]
  assert tp["q_shard"] == [2, 64 // 2, 64 // 4]
  assert tp["specs"]["language_model.layers.self_attn.q_proj.kernel"] == [None, "fsdp", "tensor"]
  assert tp["specs"]["language_model.layers.self_attn.q_proj.bias"] == [None, "tensor"]
  assert tp["specs"]["language_model.layers.mlp.down_proj.kernel"] == [None, "tensor", "fsdp"]
  assert tp["specs"]["language_model.embed_tokens.embedding"] == ["tensor", "fsdp"]
  assert tp["specs"]["lm_head.kernel"] == ["fsdp", "tensor"]
  assert tp["specs"]["visual.merger.mlp.1.kernel"] == ["fsdp", None]  # [vision_embed, embed]: fsdp used once
  for name in out:
    assert out[name]["diff"] <= 1e-5, (name, out[name]["diff"])


# ------------------------------------------------------------------------------------------------
# Errors


def test_missing_unexpected_and_misshaped_tensors_are_listed(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  missing = rewrite(path, tmp_path / "missing",
                    lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(ValueError, match=re.escape("missing: model.language_model.layers.1.mlp.up_proj.weight "
                                                 "(expected shape (128, 64))")):
    load_hf(missing)

  wrong = rewrite(path, tmp_path / "wrong", lambda t: {**t, "visual.blocks.2.attn.qkv.weight": np.zeros((96, 31))})
  with pytest.raises(ValueError, match=re.escape("wrong shape: visual.blocks.2.attn.qkv.weight expected (96, 32), "
                                                 f"found (96, 31) in {wrong}/model.safetensors")):
    load_hf(wrong)

  extra = rewrite(path, tmp_path / "extra", lambda t: {**t, "model.layers.2.mlp.up_proj.weight": np.zeros((128, 64))})
  with pytest.raises(ValueError, match=re.escape("unexpected: model.layers.2.mlp.up_proj.weight (shape (128, 64))")):
    load_hf(extra)

  no_head = rewrite(path, tmp_path / "no_head", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
  with pytest.raises(ValueError, match=re.escape("missing: lm_head.weight (expected shape (512, 64))")):
    load_hf(no_head)


def test_unknown_architecture(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  shutil.copytree(path, tmp_path / "llama")
  (tmp_path / "llama" / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}))
  with pytest.raises(ValueError, match="model_type='llama'.*LlamaForCausalLM.*is not a Qwen2.5-VL checkpoint"):
    load_hf(tmp_path / "llama")


def test_pickle_weights_are_refused(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read: pickles are never opened")
  with pytest.raises(ValueError, match=r"only PyTorch pickle weights \(pytorch_model.bin\); safetensors is required"):
    load_hf(tmp_path)
