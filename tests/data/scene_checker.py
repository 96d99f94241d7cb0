"""An independent checker for shapes VQA examples.

Written apart from `noisygrpo_jax.data.scenes`: it parses each question's text with its own patterns and
recomputes the answer from the scene JSON alone (never calling the generator's question code), checks the
image against the scene (exact object colours at their centres, grey background elsewhere), and checks the
split's promises (object counts, held-out combos, backgrounds, corruption, POPE negative kinds). It uses the
generator's published constants (names, RGB values, weights, held-out pairs) as the specification.
"""

from __future__ import annotations

import json
import re

import numpy as np

from noisygrpo_jax.data import scenes as spec

COLOURS = spec.COLOURS
SHAPES = spec.SHAPES
PLURAL_TO_SHAPE = {("crosses" if s == "cross" else s + "s"): s for s in SHAPES}
HELD_OUT = set(spec.HELD_OUT_COMBOS)
ID_SPLITS = ("train", "test", "hallucination", "robustness")

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_P = "|".join(PLURAL_TO_SHAPE)
YES_NO_RE = re.compile(rf"Is there a ({_C}) ({_S}) in the image\? Answer the question with Yes or No\.")
COUNT_RE = re.compile(rf"How many (?:(small|large) )?(?:({_C}) )?(shapes|{_P}) are there\?")
LARGEST_RE = re.compile(r"What colour is the largest shape\?")
COLOUR_OF_RE = re.compile(rf"What colour is the ({_S})\?")
SHAPE_OF_RE = re.compile(rf"What shape is the ({_C}) object\?")
SIZE_OF_RE = re.compile(rf"What size is the ({_C}) ({_S})\?")
CHOICES_RE = re.compile(r"(.*) choices: A\. (\S+) B\. (\S+) C\. (\S+) D\. (\S+)")
COT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)


class CheckError(AssertionError):
  pass


def _require(condition: bool, example: dict, message: str) -> None:
  if not condition:
    raise CheckError(f"{example.get('id')}: {message} | problem={example.get('problem')!r} "
                     f"solution={example.get('solution')!r}")


def popularity_order() -> list[tuple[str, str]]:
  """Pairs by expected training frequency (product of weights; held-out pairs never occur), most frequent
  first, ties in (colour, shape) declaration order."""
  pairs = [(c, s) for c in COLOURS for s in SHAPES]
  freq = {p: (0.0 if p in HELD_OUT else spec.COLOUR_WEIGHTS[p[0]] * spec.SHAPE_WEIGHTS[p[1]]) for p in pairs}
  return sorted(pairs, key=lambda p: (-freq[p], pairs.index(p)))


def _answer_open_question(text: str, objs: list[dict], ex: dict) -> tuple[str, str, list[str] | None]:
  """(answer, category, option pool or None for numbers) for a count or attribute question."""
  m = COUNT_RE.fullmatch(text)
  if m:
    size, colour, noun = m.groups()
    shape = None if noun == "shapes" else PLURAL_TO_SHAPE[noun]
    n = sum(1 for o in objs if (size is None or o["size"] == size) and (colour is None or o["colour"] == colour)
            and (shape is None or o["shape"] == shape))
    return str(n), "count", None
  if LARGEST_RE.fullmatch(text):
    radii = sorted((o["radius"] for o in objs), reverse=True)
    _require(len(objs) >= 2 and radii[0] > radii[1], ex, "'largest' asked without a unique largest object")
    return max(objs, key=lambda o: o["radius"])["colour"], "attribute", list(COLOURS)
  m = COLOUR_OF_RE.fullmatch(text)
  if m:
    hits = [o for o in objs if o["shape"] == m.group(1)]
    _require(len(hits) == 1, ex, f"ambiguous or absent referent ({len(hits)} matches)")
    return hits[0]["colour"], "attribute", list(COLOURS)
  m = SHAPE_OF_RE.fullmatch(text)
  if m:
    hits = [o for o in objs if o["colour"] == m.group(1)]
    _require(len(hits) == 1, ex, f"ambiguous or absent referent ({len(hits)} matches)")
    return hits[0]["shape"], "attribute", list(SHAPES)
  m = SIZE_OF_RE.fullmatch(text)
  if m:
    hits = [o for o in objs if (o["colour"], o["shape"]) == m.groups()]
    _require(len(hits) == 1, ex, f"ambiguous or absent referent ({len(hits)} matches)")
    return hits[0]["size"], "attribute", ["small", "large"]
  raise CheckError(f"{ex['id']}: unrecognised question {text!r}")


def check_image(ex: dict, scene: dict) -> None:
  image = ex["image"]
  h, w = scene["height"], scene["width"]
  _require(isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (h, w, 3), ex,
           f"image must be uint8 [{h},{w},3], got {getattr(image, 'dtype', None)} {getattr(image, 'shape', None)}")
  objs = scene["objects"]
  covered = np.zeros((h, w), bool)
  for o in objs:
    x0, y0, x1, y1 = o["bbox"]
    covered[y0:y1 + 1, x0:x1 + 1] = True
  if scene["corruption"] is None:
    for o in objs:
      cx, cy = o["centre"]
      _require(tuple(image[cy, cx]) == COLOURS[o["colour"]], ex,
               f"pixel at the centre of the {o['colour']} {o['shape']} is {tuple(image[cy, cx])}")
    outside = image[~covered]
    _require(bool(np.all(outside[:, 0] == outside[:, 1]) and np.all(outside[:, 1] == outside[:, 2])), ex,
             "background outside the objects is not grey")
  else:
    for o in objs:
      cx, cy = o["centre"]
      window = image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(float).mean(0)
      _require(bool(np.all(np.abs(window - COLOURS[o["colour"]]) < 80)), ex,
               f"corrupted centre of the {o['colour']} {o['shape']} is {window}, far from its colour")


def check_scene(ex: dict, scene: dict, split: str) -> None:
  objs = scene["objects"]
  h, w = scene["height"], scene["width"]
  for o in objs:
    _require(o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in ("small", "large"), ex, f"bad {o}")
    cx, cy = o["centre"]
    r = o["radius"]
    _require(o["bbox"] == [cx - r, cy - r, cx + r, cy + r], ex, f"bbox {o['bbox']} does not match centre/radius")
    _require(0 <= cx - r and cx + r < w and 0 <= cy - r and cy + r < h, ex, "object leaves the image")
    if o["size"] == "large":
      _require(r == 2 * spec.radii(w)["small"], ex, "large object without the large radius")
    else:
      _require(r == spec.radii(w)["small"], ex, "small object without the small radius")
  for i, a in enumerate(objs):
    for b in objs[i + 1:]:
      ax0, ay0, ax1, ay1 = a["bbox"]
      bx0, by0, bx1, by1 = b["bbox"]
      _require(ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, ex, "objects overlap")
  _require([o["centre"] for o in objs] == sorted(o["centre"] for o in objs), ex, "objects not left to right")
  combos = {(o["colour"], o["shape"]) for o in objs}
  kind = scene["background"]["kind"]
  if split in ID_SPLITS:
    _require(1 <= len(objs) <= 4, ex, f"{len(objs)} objects in an in-distribution split")
    _require(not combos & HELD_OUT, ex, f"held-out combo {combos & HELD_OUT} in {split}")
    _require(kind in ("plain", "stripes", "noise"), ex, f"background {kind} in {split}")
    _require(scene["ood_factors"] == [], ex, "ood factors outside the ood split")
    lo, hi = spec.SPLITS[split].buckets
    _require(lo <= spec.scene_bucket(scene) < hi, ex, "scene outside its split's bucket range")
  else:
    factors = set(scene["ood_factors"])
    _require(bool(factors) and factors <= {"count", "combo", "background"}, ex, f"ood factors {factors}")
    _require(("count" in factors) == (len(objs) >= 5), ex, f"count factor vs {len(objs)} objects")
    _require(("combo" in factors) == bool(combos & HELD_OUT), ex, "combo factor vs held-out combos")
    _require(("background" in factors) == (kind in ("checker", "gradient")), ex, f"background factor vs {kind}")
    _require(1 <= len(objs) <= 6, ex, f"{len(objs)} objects")
  corruption = scene["corruption"]
  if split == "robustness":
    _require(corruption is not None and corruption["kind"] in ("gaussian_noise", "gaussian_blur")
             and corruption["severity"] in (1, 2, 3), ex, f"bad corruption {corruption}")
  else:
    _require(corruption is None, ex, "corruption outside the robustness split")


def check_question(ex: dict, scene: dict, split: str) -> None:
  objs = scene["objects"]
  problem, solution, answer_type = ex["problem"], ex["solution"], ex["answer_type"]
  present = {(o["colour"], o["shape"]) for o in objs}
  m = YES_NO_RE.fullmatch(problem)
  if m:
    _require(answer_type == "yes_no", ex, f"yes/no question typed {answer_type}")
    combo = m.groups()
    _require(solution == ("Yes" if combo in present else "No"), ex, "wrong yes/no answer")
    kind = ex["pope_kind"]
    _require(kind in ("random", "popular", "adversarial"), ex, f"pope_kind {kind!r}")
    if split in ID_SPLITS:
      _require(combo not in HELD_OUT, ex, "question about a held-out combo in an in-distribution split")
    if solution == "No" and kind == "popular":
      allowed = [p for p in popularity_order() if p not in present and (split == "ood" or p not in HELD_OUT)]
      _require(combo in allowed[:3], ex, f"popular negative {combo} not among the 3 most frequent absent pairs")
    if solution == "No" and kind == "adversarial":
      _require(any(combo[0] == c or combo[1] == s for c, s in present), ex,
               "adversarial negative shares neither colour nor shape with the scene")
    return
  _require(ex["pope_kind"] == "", ex, "pope_kind on a non-yes/no question")
  _require("Yes or No" not in problem, ex, "yes/no phrase on another question type")
  m = CHOICES_RE.fullmatch(problem)
  if m:
    _require(answer_type == "multiple_choice", ex, f"multiple-choice question typed {answer_type}")
    value, _, pool = _answer_open_question(m.group(1), objs, ex)
    options = list(m.groups()[1:])
    _require(len(set(options)) == 4, ex, f"options not distinct: {options}")
    _require(options.count(value) == 1, ex, f"correct value {value} not exactly once among {options}")
    _require(solution == "ABCD"[options.index(value)], ex, f"wrong letter (value {value})")
    if pool is None:
      _require(all(o.isdigit() for o in options), ex, "count options must be numbers")
    else:
      _require(all(o in pool for o in options), ex, f"options {options} outside {pool}")
    return
  _require("choices:" not in problem, ex, "malformed choices")
  value, category, _ = _answer_open_question(problem, objs, ex)
  _require(answer_type == category, ex, f"{category} question typed {answer_type}")
  _require(solution == value, ex, f"expected {value!r}")


def check_cot(ex: dict, scene: dict) -> None:
  m = COT_RE.fullmatch(ex["cot"])
  _require(m is not None, ex, "cot is not <think>...</think><answer>...</answer>")
  think, answer = m.groups()
  _require(answer == ex["solution"], ex, f"cot answer {answer!r} differs from the solution")
  objs = scene["objects"]
  noun = "shape" if len(objs) == 1 else "shapes"
  _require(think.startswith(f"The image shows {len(objs)} {noun} "), ex, "caption does not give the count")
  caption = think.split(". ")[0]
  for o in objs:
    phrase = f"a {o['size']} {o['colour']} {o['shape']}"
    expected = sum(1 for p in objs if (p["size"], p["colour"], p["shape"]) == (o["size"], o["colour"], o["shape"]))
    _require(len(re.findall(rf"\b{phrase}\b", caption)) == expected, ex, f"caption does not list {phrase!r}")


def check_example(ex: dict, split: str, index: int) -> None:
  """Raises CheckError when example `index` of `split` breaks any promise."""
  _require(ex["id"] == f"{split}-{index:06d}", ex, f"id should be {split}-{index:06d}")
  _require(set(ex) == {"id", "image", "problem", "solution", "answer_type", "pope_kind", "cot", "scene"}, ex,
           f"keys {sorted(ex)}")
  scene = json.loads(ex["scene"])
  check_scene(ex, scene, split)
  check_image(ex, scene)
  check_question(ex, scene, split)
  check_cot(ex, scene)
