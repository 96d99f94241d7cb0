"""Text rewards: table-driven format / answer extraction / accuracy cases, the semantic reward with the local
MiniLM model, and the failure handling of `combine_rewards`."""

import logging
import math
import subprocess
import sys

import numpy as np
import pytest

from noisygrpo_jax.rl import rewards as rw

YES_NO = "Is there a cat in the image? Answer the question with Yes or No."
MC = "Which animal is shown?\nChoices: (A) cat (B) dog (C) bird"

FORMAT_CASES = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>step 1\nstep 2</think>\n\n  <answer>line 1\nline 2</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    (" <think>a</think><answer>b</answer>", 0.0),  # leading whitespace
    ("<think>a</think><answer>b</answer>\n", 0.0),  # trailing whitespace
    ("Sure! <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think> so <answer>b</answer>", 0.0),  # text between the blocks
    ("<think>a long chain of thought that was cut off at the token limit", 0.0),  # truncated
    ("<think>a</think><answer>b", 0.0),  # truncated inside the answer
    ("<answer>b</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<think><think>a</think></think><answer>b</answer>", 1.0),  # ANY may contain tags (nested)
    ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format_reward(completion, expected):
  assert rw.format_reward(completion) == expected


EXTRACT_CASES = [
    ("<think>x</think><answer>B</answer>", "B"),
    ("<answer>\n  two\nlines </answer>", "\n  two\nlines "),
    ("<answer>first</answer> and <answer>second</answer>", "first"),
    ("<answer><answer>B</answer></answer>", "<answer>B"),  # nested: the first (non-greedy) span
    ("<answer>cut off", None),
    ("no tags at all", None),
    ("<answer></answer>", ""),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer(completion, expected):
  assert rw.extract_answer(completion) == expected


def _c(answer):
  return f"<think>reasoning</think><answer>{answer}</answer>"


# (completion, solution, question, options, expected accuracy); "semantic" cases are in their own test.
ACCURACY_CASES = [
    # exact and normalised match
    (_c("cat"), "cat", "", {"mode": "exact"}, 1.0),
    (_c("  cat \n"), "cat", "", {"mode": "exact"}, 1.0),
    (_c("Cat"), "cat", "", {"mode": "exact"}, 0.0),
    (_c("The Cat."), "cat", "", {"mode": "normalized"}, 1.0),
    (_c("a  black\tcat!"), "Black cat", "", {"mode": "normalized"}, 1.0),
    (_c("black dog"), "black cat", "", {"mode": "normalized"}, 0.0),
    ("<think>the answer is cat</think>", "cat", "", {"mode": "exact"}, 0.0),  # no answer span
    ("<answer>cat", "cat", "", {"mode": "normalized"}, 0.0),  # truncated
    # numeric
    (_c("The total is 1,234.5 apples"), "1234.5", "", {"mode": "numeric"}, 1.0),
    (_c("3/4"), "0.75", "", {"mode": "numeric"}, 1.0),
    (_c("-2"), "The answer is -2.0", "", {"mode": "numeric"}, 1.0),
    (_c("1e3"), "1000", "", {"mode": "numeric"}, 1.0),
    (_c("42"), "43", "", {"mode": "numeric"}, 0.0),
    (_c("first 7 then 8"), "8", "", {"mode": "numeric"}, 1.0),  # the last number counts
    (_c("0.33334"), "0.3333", "", {"mode": "numeric"}, 0.0),
    (_c("no number"), "5", "", {"mode": "numeric"}, 0.0),
    # multiple choice: the question says "choices:"; the reference letter has whitespace on both sides
    (_c("B"), "The correct option is B dog.", MC, {"mode": "exact"}, 1.0),
    (_c(" b \n"), "The correct option is B dog.", MC, {"mode": "exact"}, 1.0),  # upper-cased and stripped
    (_c("(B)"), "The correct option is B dog.", MC, {"mode": "exact"}, 0.0),  # must equal the letter exactly
    (_c("A"), "The correct option is B dog.", MC, {"mode": "exact"}, 0.0),
    (_c("B"), "The correct option is (B), dog.", MC, {"mode": "exact"}, 1.0),  # punctuation removed first
    (_c("B"), "B", MC, {"mode": "exact"}, 1.0),  # a bare letter reference (our default) ...
    (_c("B"), "(B)", MC, {"mode": "exact"}, 1.0),
    (_c("B"), "B", "", {"mode": "normalized"}, 1.0),  # (a plain match without the MC rule, for contrast)
    (_c("B"), "B", MC, {"mode": "numeric", "mc_bare_letter": False}, 0.0),  # ... finds no letter in the original
    (_c("B"), "The correct option is B dog.", "Which animal is shown?", {"mode": "exact"}, 0.0),  # no trigger
    (_c("B"), "The correct option is B dog.", "which? CHOICES: A, B", {"mode": "exact"}, 1.0),  # any case
    # yes / no: the exact trigger phrase; strict word match by default
    (_c("Yes"), "Yes, there is a cat.", YES_NO, {"mode": "exact"}, 1.0),
    (_c("no."), "No", YES_NO, {"mode": "exact"}, 1.0),
    (_c("Yes"), "No", YES_NO, {"mode": "exact"}, 0.0),
    (_c("piano"), "No", YES_NO, {"mode": "exact"}, 0.0),
    (_c("piano"), "No", YES_NO, {"mode": "exact", "loose_yes_no": True}, 1.0),  # the original's loose rule
    (_c("I see eyes"), "yes", YES_NO, {"mode": "exact"}, 0.0),
    (_c("I see eyes"), "yes", YES_NO, {"mode": "exact", "loose_yes_no": True}, 1.0),
    (_c("Yes"), "Yes", "Is there a cat? Answer yes or no.", {"mode": "numeric"}, 0.0),  # no trigger
    (_c("Yes"), "Yes", YES_NO.lower(), {"mode": "numeric"}, 0.0),  # the trigger is case-sensitive
]


@pytest.mark.parametrize("completion, solution, question, options, expected", ACCURACY_CASES)
def test_accuracy_reward(completion, solution, question, options, expected):
  assert rw.accuracy_reward(completion, solution, question, **options) == expected


def test_multiple_choice_letter():
  assert rw.multiple_choice_letter("so the answer is C today") == "C"
  assert rw.multiple_choice_letter("(A) is wrong, C is right") == "C"  # "A" has no whitespace before it
  assert rw.multiple_choice_letter("The answer is B.") is None  # the letter is last: no whitespace after
  assert rw.multiple_choice_letter("the L word") is None  # L is beyond K
  assert rw.multiple_choice_letter("A", bare_letter=False) is None


def test_parse_numbers():
  assert rw.parse_numbers("x = -3.5, y = 1,000,000 and 2e-3; 1/4") == [-3.5, 1e6, 2e-3, 0.25]
  assert rw.parse_numbers("none") == []


# ------------------------------------------------------------------------------------------------
# The semantic reward with the bundled all-MiniLM-L6-v2 (loaded once for this module).


SEMANTIC_CASES = [
    ("A dog is running in the park.", "A dog runs through a park.", True),  # paraphrase, above the floor
    ("The weather is sunny today.", "A dog runs through a park.", False),  # unrelated, below: 0
    ("a red car", "a crimson automobile", None),  # near the floor: whatever the cosine says
    ("Two people are sitting on a bench.", "Two people are sitting on a bench.", True),
    ("Yes", "No", True),  # MiniLM finds these similar
]


@pytest.fixture(scope="module")
def model():
  return rw.load_sentence_model()


@pytest.fixture(scope="module")
def cosines(model):
  """Reference cosines of every SEMANTIC_CASES pair, computed directly with the model in one batch."""
  texts = [t for a, b, _ in SEMANTIC_CASES for t in (a, b)]
  emb = model.encode(texts, convert_to_numpy=True, show_progress_bar=False).astype(np.float64)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  return {(a, b): float(emb[2 * i] @ emb[2 * i + 1]) for i, (a, b, _) in enumerate(SEMANTIC_CASES)}


@pytest.mark.parametrize("answer, solution, above", SEMANTIC_CASES)
def test_semantic_similarity(cosines, answer, solution, above):
  cos = cosines[(answer, solution)]
  expected = cos if cos >= 0.6 else 0.0
  if above is not None:
    assert (cos >= 0.6) == above, cos
  assert abs(rw.accuracy_reward(_c(answer), solution, "Describe the image.") - expected) < 1e-5


def test_semantic_with_overrides_and_failures(model, cosines):
  assert rw.load_sentence_model() is model  # cached per path
  assert rw.load_sentence_model(rw.default_semantic_model_path()) is model
  assert abs(rw.semantic_similarity("Yes", "No") - cosines[("Yes", "No")]) < 1e-5
  assert rw.semantic_similarity("Yes", "No", floor=0.9) == 0.0
  # The MC override wins over a low similarity; without an answer span the score is 0 before any embedding.
  assert rw.accuracy_reward(_c("B"), "The correct option is B dog.", MC) == 1.0
  assert rw.accuracy_reward("<think>B</think>", "B", MC) == 0.0
  # A wrong yes/no answer falls back to the semantic score, as in the original (MiniLM: cos(Yes, No) ~ 0.73);
  # decisive overrides score it 0.
  assert abs(rw.accuracy_reward(_c("Yes"), "No", YES_NO) - cosines[("Yes", "No")]) < 1e-5
  assert rw.accuracy_reward(_c("Yes"), "No", YES_NO, decisive_overrides=True) == 0.0
  assert rw.accuracy_reward(_c("Yes"), "Yes", YES_NO, decisive_overrides=True) == 1.0
  assert rw.accuracy_reward(_c("A"), "The correct option is B dog.", MC, decisive_overrides=True) == 0.0
  with pytest.raises(FileNotFoundError, match="does not exist"):
    rw.semantic_similarity("a", "b", model_path="/nonexistent/model")
  with pytest.raises(ValueError, match="accuracy mode"):
    rw.accuracy_reward(_c("a"), "a", mode="fuzzy")


def test_heavy_imports_are_lazy():
  code = ("import sys; import noisygrpo_jax.rl; from noisygrpo_jax.rl import rewards; "
          "rewards.format_reward('x'); rewards.accuracy_reward('<answer>1</answer>', '1', mode='numeric'); "
          "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# combine_rewards


def test_combine_rewards_weights_and_failures(caplog):
  def flaky(completion, solution, question):
    if "boom" in completion:
      raise RuntimeError("tokenizer exploded")
    return 0.5

  completions = [_c("cat"), _c("boom"), "<think>truncated", _c("dog boom")]
  solutions = ["cat", "cat", "cat", "dog"]
  questions = ["q"] * 4
  with caplog.at_level(logging.WARNING, logger=rw.__name__):
    scores, total, failures = rw.combine_rewards(completions, solutions, questions,
                                                 ["format", flaky, "accuracy_normalized"], weights=[1.0, 2.0, 3.0])
  assert scores.dtype == np.float32 and scores.shape == (4, 3)
  np.testing.assert_array_equal(scores, [[1, 0.5, 1], [1, 0, 0], [0, 0.5, 0], [1, 0, 0]])
  np.testing.assert_allclose(total, [1 + 1 + 3, 1, 1, 1])
  assert failures == {"format": 0, "flaky": 2, "accuracy_normalized": 0}
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 2 and "rollout 1" in messages[0] and "rollout 3" in messages[1]
  assert all("'flaky'" in m and "tokenizer exploded" in m for m in messages)


def test_combine_rewards_errors():
  # A non-finite reward scores 0 and is counted, like a raise (tests/test_bad_input.py covers the messages).
  nan_on_second = lambda c, s, q: math.nan if c == "b" else 1.0
  _, total, failures = rw.combine_rewards(["a", "b"], ["", ""], ["", ""], {"nan_reward": nan_on_second})
  assert failures == {"nan_reward": 1} and total.tolist() == [1.0, 0.0]
  with pytest.raises(rw.RewardFunctionError, match="rollout 0"):
    rw.combine_rewards(["a"], [""], [""], [lambda c, s, q: math.inf])
  # A function that returns something that is not a number counts as a failure, not a crash.
  _, total, failures = rw.combine_rewards(["a"], [""], [""], {"none": lambda c, s, q: None}, raise_if_all_fail=False)
  assert failures == {"none": 1} and total[0] == 0.0
  with pytest.raises(ValueError, match="one of each per rollout"):
    rw.combine_rewards(["a", "b"], ["x"], ["q", "q"], ["format"])
  with pytest.raises(ValueError, match="weights"):
    rw.combine_rewards(["a"], ["x"], ["q"], ["format"], weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="unknown reward function"):
    rw.combine_rewards(["a"], ["x"], ["q"], ["bleu"])
