"""The RL loop end to end on the tiny preset: outputs, exact resume in a new process, config errors."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

from noisygrpo_jax.training import loops, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--config.data.train_size=48", "--config.data.eval_size=8", "--config.rl.max_new_tokens=12",
        "--config.train.prompts_per_step=2", "--config.data.prompt_buckets=(96,)"]


def _train(workdir, *overrides, config="configs/noisygrpo.py:tiny", data_dir=None, script="train.py"):
  args = [sys.executable, os.path.join(ROOT, "experiments", script), f"--config={config}",
          f"--config.train.workdir={workdir}", *FAST, *overrides]
  if data_dir:
    args.append(f"--config.data.data_dir={data_dir}")
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900,
                        env=dict(os.environ, PYTHONPATH=ROOT))


def _params(checkpoint_dir):
  restored = ocp.StandardCheckpointer().restore(os.path.join(checkpoint_dir, "state"))
  return {"/".join(map(str, path)): np.asarray(x) for path, x in _flatten(restored["params"])}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_tiny_run_of_20_steps_writes_metrics_events_and_checkpoints(tmp_path, data_dir):
  result = _train(tmp_path, "--config.train.steps=20", "--config.train.eval_every=10",
                  "--config.train.checkpoint_every=10", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  records = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  train_steps = [r["step"] for r in records if "reward/semantic" in r]
  assert train_steps == list(range(1, 21))
  assert {r["step"] for r in records if "eval/test/accuracy" in r} == {0, 10, 20}
  for key in ("reward/clean_accuracy", "reward/group_std", "advantage/kalman_gain", "train/loss", "time/host",
              "time/prefill", "time/decode", "time/reward", "time/reference", "time/train",
              "throughput/tokens_per_s_per_device", "throughput/model_tflops"):
    assert all(np.isfinite(r[key]) for r in records if "reward/semantic" in r), key
  # The sampler's and the trainer's log-probs of the clean rollouts agree to float32 noise (tests/training/test_drift).
  assert max(r["drift/logp_abs_diff"] for r in records if "reward/semantic" in r) <= 1e-5
  step = next(r for r in records if "reward/semantic" in r)
  parts = sum(step[f"time/{p}"] for p in ("host", "prefill", "decode", "reward", "reference", "train"))
  assert parts <= step["time/step"] <= parts + 0.5  # the phases account for the step (numpy bookkeeping aside)
  assert step["throughput/tokens_per_s_per_device"] == pytest.approx(
      (step["tokens/prompt"] + step["tokens/completion"]) / step["time/step"])  # one CPU device
  assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["10", "20"]
  # Evaluating the run (with another sampling setting) reports per-type accuracy and leaves the run's files alone.
  with open(os.path.join(tmp_path, "config.json")) as f:
    config_text = f.read()
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    metrics_text = f.read()
  result = _train(tmp_path, "--config.rl.temperature=0.5", "--splits=test", data_dir=data_dir, script="evaluate.py")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, "eval_step20.json")) as f:
    evaluation = json.load(f)
  assert evaluation["step"] == 20 and 0 <= evaluation["eval/test/accuracy"] <= 1
  assert any(k.startswith("eval/test/accuracy/") for k in evaluation)
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert f.read() == config_text
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert f.read() == metrics_text


def test_restore_in_a_new_process_continues_bitwise(tmp_path, data_dir):
  common = ["--config.train.steps=6", "--config.train.checkpoint_every=3", "--config.train.eval_every=0",
            "--config.rl.num_iterations=2", "--config.train.keep_checkpoints=5"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  # The straight run makes each step's rollout inputs in line, the resumed ones in a background thread (the
  # default): the same inputs either way.
  result = _train(straight, *common, "--config.data.prefetch_rollouts=False", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  # A copy of that run without its last checkpoint: a new process resumes it from step 3 (its metrics trimmed there).
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  result = _train(resumed, *common, data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  a, b = _params(straight / "checkpoints" / "6"), _params(resumed / "checkpoints" / "6")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  records = metrics_lib.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_runs_from_one_warm_start_share_its_step_0_evaluation_and_may_freeze_what_it_trained(tmp_path, data_dir):
  warm, first, second = tmp_path / "warm", tmp_path / "first", tmp_path / "second"
  result = _train(warm, "--config.train.steps=1", "--config.train.eval_every=0", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  rl = lambda workdir, *more: _train(workdir, "--config.train.steps=1", "--config.train.eval_every=1",
                                     f"--config.train.init_from={warm}", "--config.train.seed=7", *more,
                                     data_dir=data_dir)
  # The warm start trained its vision tower; a run that freezes it (the original's setting) takes its parameters
  # without its optimizer state.
  result = rl(first, "--config.optim.freeze_vision=True")
  assert result.returncode == 0, result.stderr[-3000:]
  [cached] = glob.glob(os.path.join(warm, "evaluations", "step1_*.json"))
  with open(cached) as f:
    stored = json.load(f)
  step0 = [r for r in metrics_lib.read_jsonl(os.path.join(first, "metrics.jsonl")) if r["step"] == 0]
  # metrics.jsonl writes an undefined metric (e.g. the precision of no "yes" answers) as null, the cache as NaN.
  assert step0 == [{"step": 0, **{k: None if np.isnan(v) else v for k, v in stored["metrics"].items()}}]
  assert stored["settings"]["max_new_tokens"] == 12 and stored["settings"]["splits"] == ["test"]
  assert stored["settings"]["source"] == loops.source_fingerprint()  # a code change invalidates the cache
  # The second run reads the stored evaluation (marked here) instead of evaluating the warm start again.
  stored["metrics"]["eval/test/accuracy"] = 0.123456
  with open(cached, "w") as f:
    json.dump(stored, f)
  result = rl(second)
  assert result.returncode == 0, result.stderr[-3000:]
  step0 = [r for r in metrics_lib.read_jsonl(os.path.join(second, "metrics.jsonl")) if r["step"] == 0]
  assert step0[0]["eval/test/accuracy"] == 0.123456
  assert len(glob.glob(os.path.join(warm, "evaluations", "*.json"))) == 1


def test_reference_log_prob_program_keeps_rows_split_on_8_devices():
  """The trainer's reference log-prob program (train_step.jit_logps with the shardings Run.reference_logps gives it:
  the train state's parameter shardings, the batch's rows over the batch axes) returns the log-probs rows-split
  like the batch, equal to one device's."""
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
      import jax, numpy as np
      from flax import nnx
      from noisygrpo_jax import sharding
      from noisygrpo_jax.training import loops, params as params_lib, train_step as ts
      from tests.training import helpers as H
      model, batch = H.model_and_batch(n=8, group_size=4)
      graphdef, state, optimizer, _, train_state = H.setup_state(model, freeze_vision=True)
      fn = ts.logps_fn(graphdef, 64, group_size=4)
      single = np.asarray(jax.jit(fn)(H.full_params(train_state), batch))
      mesh = sharding.make_mesh(data=2, fsdp=4)
      state_sh = ts.state_shardings(nnx.eval_shape(lambda: state), optimizer, mesh, freeze_vision=True)
      params_sh = params_lib.combine(state_sh.params, state_sh.frozen)
      batch_sh = ts.batch_shardings(batch, mesh)
      logps = ts.jit_logps(fn, params_sh, batch_sh)(jax.device_put(H.full_params(train_state), params_sh),
                                                      loops.place_batch(batch, batch_sh))
      assert logps.sharding == batch_sh.completion_mask, logps.sharding
      assert tuple(logps.sharding.spec) == (("data", "fsdp"), None) and len(logps.sharding.device_set) == 8
      assert np.abs(np.asarray(logps) - single).max() <= 1e-5
      print("LOGPS_OK")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  assert "LOGPS_OK" in result.stdout, result.stderr[-3000:]


def test_source_fingerprint_follows_python_sources_only(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "sub" / "b.py").write_text("y = 2\n")
  first = loops.source_fingerprint(str(tmp_path))
  (tmp_path / "notes.txt").write_text("not code")
  assert loops.source_fingerprint.__wrapped__(str(tmp_path)) == first
  (tmp_path / "sub" / "b.py").write_text("y = 3\n")
  assert loops.source_fingerprint.__wrapped__(str(tmp_path)) != first
  (tmp_path / "sub" / "b.py").write_text("y = 2\n")
  (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "c.py")
  assert loops.source_fingerprint.__wrapped__(str(tmp_path)) != first


def test_misspelled_override_names_the_field(tmp_path):
  result = _train(tmp_path, "--config.rl.nosie_levels=(0.,.5)")
  assert result.returncode != 0 and "nosie_levels" in result.stderr


def test_group_size_must_match_noise_levels(tmp_path):
  result = _train(tmp_path, "--config.rl.group_size=3")
  assert result.returncode != 0 and "rl.group_size=3 does not match the 4 noise levels" in result.stderr


def test_sft_pretrains_the_vision_tower_once_and_resumes_past_it(tmp_path, data_dir):
  sft = lambda steps: _train(tmp_path, f"--config.train.steps={steps}", "--config.rl.max_new_tokens=80",
                             "--config.train.checkpoint_every=2", "--config.vision_pretrain.steps=3",
                             "--config.vision_pretrain.batch_size=4", "--config.vision_pretrain.eval_size=4",
                             config="configs/sft.py:tiny", data_dir=data_dir, script="sft.py")
  first = sft(2)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "vision pretraining" in first.stderr
  records = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert sorted({r["step"] for r in records}) == [0, 1, 2]
  assert np.isfinite(records[0]["vision_pretrain/loss"])
  assert 0.0 <= records[0]["vision_pretrain/eval_colour_accuracy"] <= 1.0
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["0", "2"]
  second = sft(4)  # resumes from step 2: the vision stage is not run again
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 2" in second.stderr and "vision pretraining" not in second.stderr
  records = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "vision_pretrain/loss" in r] == [0]


def test_vision_pretraining_needs_scene_labels():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import sft  # pylint: disable=import-outside-toplevel
  from noisygrpo_jax.training import loops  # pylint: disable=import-outside-toplevel
  config = sft.get_config("tiny")
  with config.unlocked():
    config.data.name = "local_vqa"
  steps = config.vision_pretrain.steps
  assert steps > 0
  with pytest.raises(ValueError, match=rf"vision_pretrain.steps={steps} needs data.name='shapes_vqa'.*steps=0"):
    loops.check_vision_pretrain(config)
