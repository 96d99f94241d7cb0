"""A few answers per evaluation, to read beside the metrics: <workdir>/samples.jsonl and TensorBoard text.

Each evaluation writes train.eval_samples records per evaluated split (its first examples and their greedy
answers) and, in the RL loop, as many of the step's rollouts (split "train", with their noise level and advantage):

  {"step": 100, "split": "test", "id": "...", "question": "...", "solution": "...", "completion": "...",
   "reward": 1.0, "rewards": {"accuracy": 1.0, "format": 0.0}}
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from noisygrpo_jax.rl import rewards as rewards_lib
from noisygrpo_jax.training import rollouts as rollouts_lib
from noisygrpo_jax.training.metrics import MetricsWriter


def records(split: str, examples: Sequence[dict], completions: Sequence[str],
            reward_functions: Mapping[str, rewards_lib.RewardFunction], **columns: Sequence) -> list[dict]:
  """One record per (example, completion) of the [N] `examples` and `completions`: its question, solution and
  completion, the sum of the rewards (`reward`, the semantic reward s) and each reward function's (`rewards`), plus
  `columns` ([N] values each). A reward function that fails scores 0, as in the rollouts (`rewards.combine_rewards`).
  """
  solutions, questions = [ex["solution"] for ex in examples], [ex["problem"] for ex in examples]
  per_fn, total, _ = rewards_lib.combine_rewards(completions, solutions, questions, reward_functions,
                                                 raise_if_all_fail=False)
  out = []
  for i, (ex, completion) in enumerate(zip(examples, completions)):
    out.append({"split": split, "id": str(ex.get("id", i)), "question": ex["problem"], "solution": ex["solution"],
                "completion": completion, "reward": float(total[i]),
                "rewards": {name: float(per_fn[i, j]) for j, name in enumerate(reward_functions)},
                **{name: _plain(values[i]) for name, values in columns.items()}})
  return out


def rollout_records(prepared: rollouts_lib.PreparedPrompts, result: rollouts_lib.Rollouts,
                    reward_functions: Mapping[str, rewards_lib.RewardFunction], count: int) -> list[dict]:
  """`records` of the first `count` rollouts of a step's prompts (`result` sampled from `prepared`; rows in group
  order: the first prompt's G rollouts, clean first), split "train", with each one's `noise_level` and the
  `advantage` its group gave it (a group that rl.filter_groups left out was not trained on)."""
  n = min(count, len(result.completions))
  group_size = prepared.levels.shape[1]
  return records("train", [prepared.examples[i // group_size] for i in range(n)], result.completions[:n],
                 reward_functions, noise_level=prepared.levels.reshape(-1)[:n],
                 advantage=np.asarray(result.batch.advantages)[:n])


def write(writer: MetricsWriter, step: int, samples: Sequence[dict]) -> None:
  """Appends `samples` to samples.jsonl and shows each split's as a Markdown table, TensorBoard tag
  `samples/<split>`."""
  writer.write_samples(step, list(samples))
  for split in dict.fromkeys(r["split"] for r in samples):
    writer.write_text(step, f"samples/{split}", markdown_table([r for r in samples if r["split"] == split]))


def markdown_table(samples: Sequence[dict]) -> str:
  """A Markdown table of records (columns: the first record's keys but `split`), each cell escaped so that
  completions' tags (`<think>`), pipes and newlines show as written."""
  columns = [k for k in samples[0] if k != "split"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in columns) + " |" for r in samples]
  return "\n".join(lines)


def _cell(value) -> str:
  if isinstance(value, float):
    text = f"{value:.3f}"
  elif isinstance(value, dict):
    text = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
  else:
    text = str(value)
  return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
          .replace("\n", "<br>"))


def _plain(value):
  """A numpy scalar as a JSON-serialisable Python number; a float32 as the shortest decimal that reads back as it
  (0.9, not 0.8999999761581421)."""
  if isinstance(value, np.floating):
    return float(str(value))
  return value.item() if isinstance(value, np.generic) else value
