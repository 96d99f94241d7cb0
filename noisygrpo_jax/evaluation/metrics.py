"""Evaluation metrics over decoded completions: pure Python + numpy, no model code.

A completion is scored by its first <answer>...</answer> span (none: wrong). Answers and references are
compared after `normalize_answer` (lower case, punctuation removed, whitespace collapsed). Yes/no answers are
read by their first word, so "Yes, there is a cat." counts as yes; the positive class is "yes", as in POPE.
Ratios with a zero denominator (an empty list, no predicted positives) are NaN, never a silent 0.
"""

from __future__ import annotations

import re
import string
from typing import Mapping, Sequence

import numpy as np

YES_NO = "yes_no"

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_FIRST_THOUGHT_RE = re.compile(r"<think>(.*?)(?:\.|</think>)", re.DOTALL)
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def extract_answer(completion: str) -> str | None:
  """The text of the first <answer>...</answer> span (newlines allowed), or None when there is none."""
  match = _ANSWER_RE.search(completion)
  return None if match is None else match.group(1)


def normalize_answer(text: str) -> str:
  """Lower case, punctuation replaced by spaces, whitespace collapsed: " (B)." -> "b", "Red!" -> "red"."""
  return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def yes_no_label(text: str | None) -> str | None:
  """"yes" or "no" when the normalised text starts with that word, else None."""
  if text is None:
    return None
  words = normalize_answer(text).split()
  return words[0] if words and words[0] in ("yes", "no") else None


def is_correct(completion: str, solution: str, answer_type: str = "") -> bool:
  """Whether the completion's answer matches the reference: by yes/no label for `answer_type` "yes_no", else
  by equality after normalisation."""
  answer = extract_answer(completion)
  if answer is None:
    return False
  if answer_type == YES_NO:
    label = yes_no_label(answer)
    return label is not None and label == yes_no_label(solution)
  return normalize_answer(answer) == normalize_answer(solution)


def first_thought(completion: str) -> str | None:
  """The normalised first sentence of the completion's <think> span, or None when it has no <think>.

  In shapes_vqa's chains of thought that sentence is the description of the scene ("The image shows 2 shapes
  on a plain background, from left to right: a small yellow square and a small green triangle.").
  """
  match = _FIRST_THOUGHT_RE.search(completion)
  return None if match is None else normalize_answer(match.group(1))


def description_matches(completions: Sequence[str], reference_cots: Sequence[str]) -> np.ndarray:
  """bool [N]: whether each completion's first thought (`first_thought`) equals its reference chain of
  thought's, i.e. describes the scene exactly right."""
  _check_lengths(completions=completions, reference_cots=reference_cots)
  references = [first_thought(r) for r in reference_cots]
  return np.array([(thought := first_thought(c)) is not None and thought == ref
                   for c, ref in zip(completions, references)], dtype=bool)


def description_metrics(match: Sequence[bool], correct: Sequence[bool]) -> dict[str, float]:
  """Does the chain of thought carry the answer? Separates seeing from reasoning.

  Args: `match` bool [N] from `description_matches`, `correct` bool [N] answer correctness.
  Returns "description_match": fraction of completions that describe the scene exactly right, and
  "accuracy_given_description": answer accuracy over those, NaN when there are none. A model whose answers
  follow its chain of thought has the latter near 1: its errors are errors of seeing.
  """
  n = _check_lengths(match=match, correct=correct)
  match, correct = np.asarray(match, dtype=bool), np.asarray(correct, dtype=bool)
  return {"description_match": _ratio(match.sum(), n),
          "accuracy_given_description": _ratio((correct & match).sum(), match.sum())}


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator / denominator) if denominator else float("nan")


def _check_lengths(**sequences: Sequence) -> int:
  lengths = {name: len(seq) for name, seq in sequences.items() if seq is not None}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"sequences must have the same length, got {lengths}")
  return next(iter(lengths.values()), 0)


def correctness(completions: Sequence[str], solutions: Sequence[str],
                answer_types: Sequence[str] | None = None) -> np.ndarray:
  """Per-example `is_correct`, bool [N]."""
  _check_lengths(completions=completions, solutions=solutions, answer_types=answer_types)
  types = answer_types if answer_types is not None else [""] * len(completions)
  return np.array([is_correct(c, s, t) for c, s, t in zip(completions, solutions, types)], dtype=bool)


def accuracy(completions: Sequence[str], solutions: Sequence[str],
             answer_types: Sequence[str] | None = None) -> float:
  """Fraction of completions whose answer matches the reference (NaN for no examples)."""
  correct = correctness(completions, solutions, answer_types)
  return _ratio(correct.sum(), correct.size)


def format_rate(completions: Sequence[str]) -> float:
  """Fraction of completions that are exactly <think>...</think> whitespace <answer>...</answer>, nothing
  before or after (the format reward's rule)."""
  ok = [bool(_FORMAT_RE.fullmatch(c)) for c in completions]
  return _ratio(sum(ok), len(ok))


def yes_no_metrics(completions: Sequence[str], solutions: Sequence[str]) -> dict[str, float]:
  """POPE-style metrics with "yes" as the positive class.

  Returns accuracy, precision, recall, f1, yes_ratio (fraction of completions answering yes), unparsed
  (fraction with no answer span, or an answer starting with neither yes nor no) and n. An unparsed answer is
  wrong for accuracy and a negative (not yes) for precision and recall.
  Raises ValueError for a reference that is not yes/no.
  """
  n = _check_lengths(completions=completions, solutions=solutions)
  truth = []
  for i, s in enumerate(solutions):
    label = yes_no_label(s)
    if label is None:
      raise ValueError(f"reference {i} ({s!r}) is not yes/no; yes_no_metrics needs yes/no references")
    truth.append(label == "yes")
  pred = [yes_no_label(extract_answer(c)) for c in completions]
  truth_yes = np.array(truth, dtype=bool)
  pred_yes = np.array([p == "yes" for p in pred], dtype=bool)
  pred_no = np.array([p == "no" for p in pred], dtype=bool)
  tp = int((pred_yes & truth_yes).sum())
  fp = int((pred_yes & ~truth_yes).sum())
  fn = int((~pred_yes & truth_yes).sum())
  correct = int(tp + (pred_no & ~truth_yes).sum())
  precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else (
      0.0 if precision == 0 and recall == 0 else float("nan"))
  return {"accuracy": _ratio(correct, n), "precision": precision, "recall": recall, "f1": float(f1),
          "yes_ratio": _ratio(pred_yes.sum(), n), "unparsed": _ratio(n - pred_yes.sum() - pred_no.sum(), n),
          "n": n}


def summarize(completions: Sequence[str], solutions: Sequence[str], answer_types: Sequence[str] | None = None,
              groups: Sequence[str] | None = None, reference_cots: Sequence[str] | None = None) -> dict:
  """One split's summary: {"n", "accuracy", "format_rate", "by_answer_type": {type: {"n", "accuracy"}},
  "yes_no": yes_no_metrics over the yes/no examples (when there are any), "by_group": {group: {"n",
  "accuracy"}} (when `groups` is given, e.g. POPE kinds or benchmark categories), "description":
  description_metrics (when `reference_cots` is given; each "by_answer_type" entry then has them too)}."""
  n = _check_lengths(completions=completions, solutions=solutions, answer_types=answer_types, groups=groups,
                     reference_cots=reference_cots)
  types = list(answer_types) if answer_types is not None else [""] * n
  correct = correctness(completions, solutions, types)
  summary: dict = {"n": n, "accuracy": _ratio(correct.sum(), n), "format_rate": format_rate(completions)}

  def by(keys: Sequence[str]) -> dict[str, dict[str, float]]:
    keys = np.asarray(keys, dtype=object)
    return {k: {"n": int((keys == k).sum()), "accuracy": _ratio(correct[keys == k].sum(), (keys == k).sum())}
            for k in sorted(set(keys.tolist()))}

  summary["by_answer_type"] = by(types)
  yes_no = [i for i, t in enumerate(types) if t == YES_NO]
  if yes_no:
    summary["yes_no"] = yes_no_metrics([completions[i] for i in yes_no], [solutions[i] for i in yes_no])
  if groups is not None:
    summary["by_group"] = by(groups)
  if reference_cots is not None:
    match = description_matches(completions, reference_cots)
    summary["description"] = description_metrics(match, correct)
    type_keys = np.asarray(types, dtype=object)
    for t, entry in summary["by_answer_type"].items():
      entry.update(description_metrics(match[type_keys == t], correct[type_keys == t]))
  return summary


def summarize_splits(results: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, dict]:
  """`summarize` for each split. `results[split]` holds "completions", "solutions" and optionally
  "answer_types" and "groups"."""
  return {split: summarize(r["completions"], r["solutions"], r.get("answer_types"), r.get("groups"))
          for split, r in results.items()}
