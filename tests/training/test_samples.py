"""Sample answers with each evaluation (training.samples): samples.jsonl records and TensorBoard text of a tiny RL
run, the Markdown escaping, and a resumed run dropping the samples past its checkpoint."""

import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from configs import noisygrpo
from noisygrpo_jax.rl import rewards
from noisygrpo_jax.training import loops, metrics as metrics_lib, samples as samples_lib

EVAL_SAMPLES = 3
FIELDS = {"step", "split", "id", "question", "solution", "completion", "reward", "rewards"}


def tensorboard_texts(workdir: str) -> dict[tuple[str, int], str]:
  """(tag, step) -> text of every text summary in the run's TensorBoard event files (TFRecord: length, its CRC,
  the Event proto, its CRC)."""
  texts = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        if value.tensor.string_val:
          texts[(value.tag, event.step)] = value.tensor.string_val[0].decode()
  return texts


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
  """The workdir and config of a 1-step tiny NoisyGRPO run evaluated at steps 0 and 1."""
  config = noisygrpo.get_config("tiny")
  with config.unlocked():
    config.train.workdir = str(tmp_path_factory.mktemp("samples_run"))
    config.data.train_size, config.data.eval_size = 16, 4
    config.train.prompts_per_step, config.rl.max_new_tokens = 2, 8
    config.train.steps, config.train.eval_every, config.train.eval_samples = 1, 1, EVAL_SAMPLES
    config.data.prompt_buckets = (96,)
  loops.run_rl(config)
  return config.train.workdir, config


def test_each_evaluation_writes_answers_and_rollouts_with_their_rewards(rl_run):
  workdir, config = rl_run
  records = metrics_lib.read_jsonl(os.path.join(workdir, "samples.jsonl"))
  # Step 0's evaluation (evaluate_start, which may read a stored result) writes none.
  assert [(r["step"], r["split"]) for r in records] == [(1, "test")] * EVAL_SAMPLES + [(1, "train")] * EVAL_SAMPLES
  functions = rewards.reward_functions(tuple(config.rl.rewards), config.rl.reward_rules)
  for r in records:
    assert FIELDS <= set(r), r
    expected = {name: fn(r["completion"], r["solution"], r["question"]) for name, fn in functions.items()}
    assert r["rewards"] == pytest.approx(expected) and r["reward"] == pytest.approx(sum(expected.values()))
  evaluated, rollouts = records[:EVAL_SAMPLES], records[EVAL_SAMPLES:]
  assert len({r["id"] for r in evaluated}) == EVAL_SAMPLES
  # The first prompt's group, in the fixed grid's order (clean first), with the advantages it was trained on.
  assert [r["noise_level"] for r in rollouts] == list(config.rl.noise.levels[:EVAL_SAMPLES])
  assert len({r["question"] for r in rollouts}) == 1
  assert all(isinstance(r["advantage"], float) for r in rollouts)
  assert not any("noise_level" in r for r in evaluated)

  texts = tensorboard_texts(workdir)
  assert {tag for tag, _ in texts} == {"samples/test/text_summary", "samples/train/text_summary"}
  table = texts[("samples/test/text_summary", 1)]
  assert table.count("\n") == 1 + EVAL_SAMPLES  # header, separator, one row per sample
  assert table == samples_lib.markdown_table([{k: v for k, v in r.items() if k != "step"} for r in evaluated])


def test_markdown_cells_show_tags_pipes_and_newlines_as_written():
  record = {"split": "test", "completion": "<think>a | b\nc</think>", "reward": 0.5, "rewards": {"format": 0.5}}
  table = samples_lib.markdown_table([record])
  assert table.splitlines() == ["| completion | reward | rewards |", "|---|---|---|",
                                r"| &lt;think&gt;a \| b<br>c&lt;/think&gt; | 0.500 | format 0.500 |"]


def test_a_resumed_run_drops_the_samples_after_its_checkpoint(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    samples_lib.write(writer, step, [{"split": "test", "completion": f"answer {step}"}])
  writer.close()
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=2)
  writer.close()
  with open(tmp_path / "samples.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_no_samples_writes_no_file(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  samples_lib.write(writer, 1, [])
  writer.close()
  assert not (tmp_path / "samples.jsonl").exists()
