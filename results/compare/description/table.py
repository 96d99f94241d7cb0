"""Prints the seeing-vs-reasoning table of the compared runs' final checkpoints (test split).

Each <method>_seed<seed>_test.json here was written by
  python experiments/evaluate.py --config=configs/<noisygrpo|grpo>.py:tiny --splits=test \
    --config.data.data_dir=workdir/default/data --config.train.workdir=<root>/<method>_seed<seed>
(noise_only with configs/noisygrpo.py:tiny) on the final checkpoints of the `make compare` runs in
results/compare/summary.md; the warm start's row is its step-0 evaluation in results/default.
  python results/compare/description/table.py
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

from noisygrpo_jax.evaluation import report  # noqa: E402
from noisygrpo_jax.training import metrics  # noqa: E402

TYPES = ("count", "yes_no", "attribute", "multiple_choice")
warm = report.eval_at(metrics.read_jsonl(os.path.join(HERE, "..", "..", "default",
                                                      "noisygrpo_seed42_metrics.jsonl")), 0)
results = {"warm start (SFT)": [warm]}
for method in ("noisygrpo", "grpo", "noise_only"):
  for seed in range(3):
    with open(os.path.join(HERE, f"{method}_seed{seed}_test.json")) as f:
      results.setdefault(method, []).append(json.load(f))
columns = {"accuracy": "eval/test/accuracy", "description match": "eval/test/description_match",
           "accuracy given it": "eval/test/accuracy_given_description",
           **{f"given it: {t}": f"eval/test/accuracy_given_description/{t}" for t in TYPES}}
print(report.metric_table(results, columns))
