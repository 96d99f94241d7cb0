"""Run summaries: per-seed means of the curves, the mean +- std table, and the PNGs."""

import numpy as np

from noisygrpo_jax.evaluation import report


def _run(rewards, final_accuracy):
  records = [{"step": 0, "eval/test/accuracy": 0.4}]
  records += [{"step": i + 1, "reward/group_std": r} for i, r in enumerate(rewards)]
  records.append({"step": len(rewards), "eval/test/accuracy": final_accuracy})
  return records


def test_mean_curve_averages_seeds_at_shared_steps():
  seeds = [_run([0.1, 0.3, 0.5], 0.5), _run([0.3, 0.5], 0.6)]
  steps, mean, low, high = report.mean_curve(seeds, "reward/group_std")
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_allclose(mean, [0.2, 0.4])
  np.testing.assert_allclose(low, [0.1, 0.3])
  np.testing.assert_allclose(high, [0.3, 0.5])


def test_mean_std_table_uses_sample_std_and_shows_single_runs_alone():
  finals = {"warm start (SFT)": [{"eval/test/accuracy": 0.4}],
            "grpo": [{"eval/test/accuracy": a} for a in (0.5, 0.6, 0.7)],
            "noisygrpo": [{}]}
  rows = report.mean_std_table(finals, ["test"]).splitlines()
  assert rows[2] == "| warm start (SFT) | 0.400 |"
  assert rows[3] == "| grpo | 0.600 +- 0.100 |"
  assert rows[4] == "| noisygrpo | n/a |"


def test_metric_table_has_one_column_per_named_metric():
  finals = {"grpo": [{"eval/test/accuracy/count": c, "eval/test/accuracy/yes_no": y} for c, y in ((0.5, 0.2),
                                                                                                   (0.7, 0.4))]}
  rows = report.metric_table(finals, {"count": "eval/test/accuracy/count", "yes_no": "eval/test/accuracy/yes_no",
                                      "attribute": "eval/test/accuracy/attribute"}).splitlines()
  assert rows[0] == "| method | count | yes_no | attribute |"
  assert rows[2] == "| grpo | 0.600 +- 0.141 | 0.300 +- 0.141 | n/a |"


def test_plots_are_written(tmp_path):
  runs = {"grpo": [_run([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.5)] * 2, "noisygrpo": [_run([0.2] * 6, 0.6)]}
  for path in (report.plot_runs(runs, str(tmp_path / "curves.png"), ["test"]),
               report.plot_exploration(runs, str(tmp_path / "exploration.png"))):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
