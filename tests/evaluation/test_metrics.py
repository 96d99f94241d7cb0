"""Evaluation metrics on hand-computed cases."""

import math

import pytest

from noisygrpo_jax.evaluation import metrics


def wrap(answer: str) -> str:
  return f"<think>reasoning</think><answer>{answer}</answer>"


def test_extract_and_normalize():
  assert metrics.extract_answer("<answer> B </answer><answer>C</answer>") == " B "
  assert metrics.extract_answer("<answer>two\nlines</answer>") == "two\nlines"
  assert metrics.extract_answer("<answer>unclosed") is None
  assert metrics.normalize_answer("  (B).  ") == "b"
  assert metrics.normalize_answer("Red!\n") == "red"
  assert metrics.normalize_answer("a  Large,  RED circle") == "a large red circle"
  assert metrics.yes_no_label("Yes, there is.") == "yes"
  assert metrics.yes_no_label(" no") == "no"
  assert metrics.yes_no_label("Not sure") is None
  assert metrics.yes_no_label(None) is None


def test_is_correct():
  assert metrics.is_correct(wrap(" Blue. "), "blue")
  assert metrics.is_correct(wrap("(C)"), "C", "multiple_choice")
  assert not metrics.is_correct(wrap("C. 4"), "C", "multiple_choice")
  assert not metrics.is_correct("blue", "blue")  # no answer span
  assert metrics.is_correct(wrap("Yes, there is one."), "Yes", "yes_no")
  assert not metrics.is_correct(wrap("Yes, there is one."), "Yes")  # only yes/no answers are read by first word
  assert not metrics.is_correct(wrap("maybe"), "No", "yes_no")


def test_accuracy_and_format_rate():
  completions = [wrap("2"), wrap("3"), "<answer>2</answer>", " " + wrap("2")]
  assert metrics.accuracy(completions, ["2", "2", "2", "2"]) == 0.75
  assert metrics.format_rate(completions) == 0.5  # no think; leading space
  assert metrics.format_rate(["<think>a</think>\n\n<answer>b</answer>"]) == 1.0
  assert metrics.format_rate(["<think>a</think><answer>b</answer>."]) == 0.0
  assert math.isnan(metrics.accuracy([], []))
  assert math.isnan(metrics.format_rate([]))
  with pytest.raises(ValueError, match="same length"):
    metrics.accuracy([wrap("a")], ["a", "b"])


def test_yes_no_metrics_hand_computed():
  # truth:   y    y    y    n    n    n    n    y
  # pred:    y    y    n    y    n    n    ?    (no span)
  completions = [wrap("Yes"), wrap("yes."), wrap("No"), wrap("Yes"), wrap("No"), wrap("no, none"), wrap("maybe"),
                 "Yes"]
  solutions = ["Yes", "Yes", "Yes", "No", "No", "No", "No", "Yes"]
  m = metrics.yes_no_metrics(completions, solutions)
  # TP = 2, FP = 1, FN = 2 (one "no", one unparsed), TN = 2 (the unparsed "maybe" is not counted correct)
  assert m["n"] == 8
  assert m["accuracy"] == pytest.approx(4 / 8)
  assert m["precision"] == pytest.approx(2 / 3)
  assert m["recall"] == pytest.approx(2 / 4)
  assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
  assert m["yes_ratio"] == pytest.approx(3 / 8)
  assert m["unparsed"] == pytest.approx(2 / 8)


def test_yes_no_metrics_edge_cases():
  m = metrics.yes_no_metrics([wrap("No"), wrap("No")], ["Yes", "No"])
  assert math.isnan(m["precision"]) and m["recall"] == 0.0 and math.isnan(m["f1"])
  m = metrics.yes_no_metrics([wrap("No"), wrap("Yes")], ["Yes", "No"])
  assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
  with pytest.raises(ValueError, match="not yes/no"):
    metrics.yes_no_metrics([wrap("Yes")], ["3"])


def test_summaries():
  completions = [wrap("2"), wrap("Yes"), wrap("No"), wrap("red"), "garbage"]
  solutions = ["2", "Yes", "Yes", "red", "B"]
  types = ["count", "yes_no", "yes_no", "attribute", "multiple_choice"]
  groups = ["", "random", "popular", "", ""]
  s = metrics.summarize(completions, solutions, types, groups)
  assert s["n"] == 5
  assert s["accuracy"] == pytest.approx(3 / 5)
  assert s["format_rate"] == pytest.approx(4 / 5)
  assert s["by_answer_type"] == {"attribute": {"n": 1, "accuracy": 1.0}, "count": {"n": 1, "accuracy": 1.0},
                                 "multiple_choice": {"n": 1, "accuracy": 0.0}, "yes_no": {"n": 2, "accuracy": 0.5}}
  assert s["yes_no"]["n"] == 2 and s["yes_no"]["recall"] == 0.5
  assert s["by_group"]["popular"] == {"n": 1, "accuracy": 0.0}
  assert s["by_group"][""] == {"n": 3, "accuracy": pytest.approx(2 / 3)}
  splits = metrics.summarize_splits({"test": {"completions": completions, "solutions": solutions},
                                     "ood": {"completions": [wrap("x")], "solutions": ["x"]}})
  assert set(splits) == {"test", "ood"}
  assert splits["test"]["accuracy"] == pytest.approx(3 / 5)  # without types, yes/no is compared as text
  assert "yes_no" not in splits["ood"] and "by_group" not in splits["ood"]


def test_description_metrics_separate_seeing_from_reasoning():
  reference = ("<think>The image shows 2 shapes on a plain background, from left to right: a small red circle and a "
               "large blue star. The only star is the large blue star, so its colour is blue.</think>\n"
               "<answer>blue</answer>")
  seen_and_reasoned = reference
  seen_misreasoned = reference.replace("colour is blue.</think>\n<answer>blue", "colour is red.</think>\n<answer>red")
  misseen = reference.replace("large blue star", "large red star")
  no_think = "<answer>blue</answer>"
  one_sentence = "<think>The image shows 2 shapes on a plain background, from left to right: a small red circle and " \
                 "a large blue star</think><answer>blue</answer>"
  assert metrics.first_thought(reference) == metrics.first_thought(one_sentence) == (
      "the image shows 2 shapes on a plain background from left to right a small red circle and a large blue star")
  assert metrics.first_thought(no_think) is None
  completions = [seen_and_reasoned, seen_misreasoned, misseen, no_think, one_sentence]
  correct = metrics.correctness(completions, ["blue"] * 5)
  assert correct.tolist() == [True, False, True, True, True]  # the misseen one guesses right
  match = metrics.description_matches(completions, [reference] * 5)
  assert match.tolist() == [True, True, False, False, True]
  m = metrics.description_metrics(match, correct)
  assert m["description_match"] == pytest.approx(3 / 5)
  assert m["accuracy_given_description"] == pytest.approx(2 / 3)
  s = metrics.summarize(completions, ["blue"] * 5, reference_cots=[reference] * 5)
  assert s["description"] == m
  s = metrics.summarize(completions, ["blue"] * 5, ["attribute", "attribute", "count", "count", "count"],
                        reference_cots=[reference] * 5)
  assert s["by_answer_type"]["attribute"] == {"n": 2, "accuracy": 0.5, "description_match": 1.0,
                                              "accuracy_given_description": 0.5}
  assert s["by_answer_type"]["count"] == {"n": 3, "accuracy": 1.0, "description_match": pytest.approx(1 / 3),
                                          "accuracy_given_description": 1.0}
  assert math.isnan(metrics.description_metrics(metrics.description_matches([misseen], [reference]),
                                                [True])["accuracy_given_description"])
  with pytest.raises(ValueError, match="same length"):
    metrics.description_matches(completions, [reference])
  with pytest.raises(ValueError, match="same length"):
    metrics.description_metrics(match, correct[:2])
