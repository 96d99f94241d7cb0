"""Synthetic shapes scenes and questions about them: pure numpy + PIL, no tfds.

A scene is a JSON-able dict that fully determines its image (`render_scene` is a pure function of it):

  {"width": W, "height": H,
   "background": {"kind": "stripes", ...drawing parameters...},
   "objects": [{"shape": "circle", "colour": "red", "size": "small", "centre": [x, y], "radius": r,
                "bbox": [x0, y0, x1, y1]}, ...],        # sorted left to right (by centre x, then y)
   "corruption": null | {"kind": "gaussian_noise", "severity": 1-3, "sigma": s, "seed": k}
                      | {"kind": "gaussian_blur", "severity": 1-3, "radius": r},
   "ood_factors": ["count", "combo", "background"] (a non-empty subset in the ood split, else [])}

Objects never overlap (their bboxes keep a gap of `GAP` pixels) and are drawn without anti-aliasing, so the
pixel at an object's centre has exactly its colour in an uncorrupted image. A large object's radius is twice
a small one's, so every large shape covers more pixels than every small shape, whatever the two shapes are.

Splits (see `SPLITS`): train / test / hallucination / robustness draw 1-4 objects on in-distribution
backgrounds and never use a `HELD_OUT_COMBOS` colour-shape pair, in images or in questions. They partition the
scene space by a hash of the scene (`scene_bucket`), so no image occurs in two of them. The ood split differs
from them by construction: each of its scenes has 5-6 objects, a held-out combo, or an ood background.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                 "cross": "crosses", "diamond": "diamonds"}
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
           "purple": (140, 60, 180), "orange": (250, 130, 20)}
SIZES = ("small", "large")
# Training frequencies are deliberately skewed (long-tailed) so that "popular" POPE negatives mean something.
COLOUR_WEIGHTS = {"red": 0.26, "blue": 0.21, "green": 0.17, "yellow": 0.14, "purple": 0.12, "orange": 0.10}
SHAPE_WEIGHTS = {"circle": 0.25, "square": 0.21, "triangle": 0.17, "star": 0.14, "diamond": 0.12, "cross": 0.11}
# One pair per colour and per shape: every colour and shape is seen in training, only these pairings are new.
HELD_OUT_COMBOS = (("red", "star"), ("green", "cross"), ("blue", "triangle"), ("yellow", "diamond"),
                   ("purple", "circle"), ("orange", "square"))
ID_BACKGROUNDS = ("plain", "stripes", "noise")
OOD_BACKGROUNDS = ("checker", "gradient")
BACKGROUND_WORDS = {"plain": "plain", "stripes": "striped", "noise": "noisy", "checker": "checkered",
                    "gradient": "shaded"}
ANSWER_TYPES = ("count", "yes_no", "attribute", "multiple_choice")
POPE_KINDS = ("random", "popular", "adversarial")
YES_NO_PHRASE = "Answer the question with Yes or No."
CHOICE_LETTERS = "ABCD"
POPULAR_TOP_K = 3  # a popular negative is one of the 3 most frequent training combos absent from the scene
NOISE_SIGMAS = (8.0, 16.0, 32.0)  # robustness: Gaussian pixel noise std (0-255 scale) per severity 1-3
BLUR_RADII = (1.0, 1.5, 2.0)  # robustness: Gaussian blur radius in pixels per severity 1-3
GAP = 3  # minimum empty pixels between two objects' bboxes, and between a bbox and the image border
MIN_IMAGE_SIZE = 48
SCENE_BUCKETS = 1000


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """How one split draws scenes and questions."""

  object_counts: tuple[int, ...] = (1, 2, 3, 4)  # numbers of objects a scene may have (uniform)
  backgrounds: tuple[str, ...] = ID_BACKGROUNDS
  question_weights: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)  # probabilities of ANSWER_TYPES
  buckets: tuple[int, int] | None = None  # scenes whose scene_bucket lies in [lo, hi); None: no filter
  corrupt: bool = False  # apply Gaussian noise or blur (robustness)
  ood: bool = False  # every scene has at least one ood factor; held-out combos allowed
  balanced_yes_no: bool = False  # alternate yes/no by index and cycle POPE kinds (hallucination)


SPLITS = {
    "train": SplitSpec(buckets=(0, 800)),
    "test": SplitSpec(buckets=(800, 870)),
    "hallucination": SplitSpec(question_weights=(0.0, 1.0, 0.0, 0.0), buckets=(870, 935), balanced_yes_no=True),
    "robustness": SplitSpec(buckets=(935, 1000), corrupt=True),
    "ood": SplitSpec(object_counts=(1, 2, 3, 4, 5, 6), backgrounds=ID_BACKGROUNDS + OOD_BACKGROUNDS, ood=True),
}
OOD_COUNTS = (5, 6)


def combo_allowed(colour: str, shape: str, ood: bool) -> bool:
  return ood or (colour, shape) not in HELD_OUT_COMBOS


def popularity_ranking() -> list[tuple[str, str]]:
  """All (colour, shape) pairs, most frequent in training first; held-out pairs (never in training) last.

  The frequency of a pair is the product of its colour and shape weights; ties keep the order of COLOURS and
  SHAPES.
  """
  pairs = [(c, s) for c in COLOURS for s in SHAPES]
  freq = lambda p: 0.0 if p in HELD_OUT_COMBOS else COLOUR_WEIGHTS[p[0]] * SHAPE_WEIGHTS[p[1]]
  return sorted(pairs, key=lambda p: -freq(p))


def radii(image_size: int) -> dict[str, int]:
  """Object radius in pixels per size class (small 7, large 14 at 112 px)."""
  small = max(3, round(0.0625 * image_size))
  return {"small": small, "large": 2 * small}


def _bucket(width: int, height: int, background: dict[str, Any], objects: Sequence[Sequence[str]]) -> int:
  key = [width, height, background, sorted(list(o) for o in objects)]
  digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % SCENE_BUCKETS


def scene_bucket(scene: dict[str, Any]) -> int:
  """A stable hash in [0, SCENE_BUCKETS) of the scene's size, background and multiset of (colour, shape, size).

  Positions are left out so that a split can reject a scene before placing its objects; two scenes with the
  same image share all of these, so splits given disjoint bucket ranges never share an image.
  """
  objects = [(o["colour"], o["shape"], o["size"]) for o in scene["objects"]]
  return _bucket(scene["width"], scene["height"], scene["background"], objects)


def scene_to_json(scene: dict[str, Any]) -> str:
  return json.dumps(scene, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------
# Sampling scenes.


def _split_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """Each example has its own stream, so example i is the same whatever the split size or other splits."""
  split_id = int.from_bytes(hashlib.blake2b(split.encode(), digest_size=4).digest(), "little")
  return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


_COMBOS = [(c, s) for c in COLOURS for s in SHAPES]


def _combo_cdf(allow_held_out: bool) -> np.ndarray:
  """Cumulative probabilities over _COMBOS (colour-major), float64 [36]."""
  p = np.array([COLOUR_WEIGHTS[c] * SHAPE_WEIGHTS[s] * (allow_held_out or (c, s) not in HELD_OUT_COMBOS)
                for c, s in _COMBOS])
  return np.cumsum(p / p.sum())


_COMBO_CDF = {allow: _combo_cdf(allow) for allow in (False, True)}


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


def _sample_background(rng: np.random.Generator, kind: str) -> dict[str, Any]:
  light = lambda: int(rng.integers(200, 246))
  if kind == "plain":
    return {"kind": kind, "level": light()}
  if kind == "stripes":
    return {"kind": kind, "levels": [light(), int(rng.integers(165, 200))], "period": int(rng.integers(6, 17)),
            "orientation": _pick(rng, ("horizontal", "vertical", "diagonal")),
            "phase": int(rng.integers(16))}
  if kind == "noise":
    return {"kind": kind, "level": light(), "amplitude": int(rng.integers(10, 31)),
            "seed": int(rng.integers(2**31))}
  if kind == "checker":
    return {"kind": kind, "levels": [light(), int(rng.integers(150, 190))], "cell": int(rng.integers(8, 17))}
  if kind == "gradient":
    return {"kind": kind, "levels": [int(rng.integers(50, 90)), light()],
            "orientation": _pick(rng, ("horizontal", "vertical"))}
  raise ValueError(f"unknown background kind {kind!r}; expected one of {ID_BACKGROUNDS + OOD_BACKGROUNDS}")


def _place(rng: np.random.Generator, object_radii: Sequence[int], size: int) -> list[tuple[int, int]] | None:
  """Centres with all bboxes GAP pixels apart and inside the image, or None after too many tries."""
  centres: list[tuple[int, int]] = []
  for r in object_radii:
    for _ in range(100):
      x, y = (int(v) for v in rng.integers(r + GAP, size - r - GAP, size=2))
      if all(abs(x - cx) > r + cr + GAP or abs(y - cy) > r + cr + GAP
             for (cx, cy), cr in zip(centres, object_radii)):
        centres.append((x, y))
        break
    else:
      return None
  return centres


def sample_scene(rng: np.random.Generator, spec: SplitSpec, image_size: int) -> dict[str, Any]:
  """One random scene of a split, inside the split's bucket range, without corruption."""
  factors: list[str] = []
  while spec.ood and not factors:
    factors = [f for f in ("count", "combo", "background") if rng.random() < 0.5]
  counts, backgrounds = spec.object_counts, spec.backgrounds
  if spec.ood:
    counts = OOD_COUNTS if "count" in factors else tuple(c for c in counts if c not in OOD_COUNTS)
    backgrounds = OOD_BACKGROUNDS if "background" in factors else ID_BACKGROUNDS
  cdf = _COMBO_CDF["combo" in factors]
  radius = radii(image_size)
  while True:
    n = _pick(rng, counts)
    background = _sample_background(rng, _pick(rng, backgrounds))
    combos = [_COMBOS[i] for i in np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)]
    if "combo" in factors and not any(c in HELD_OUT_COMBOS for c in combos):
      combos[0] = _pick(rng, HELD_OUT_COMBOS)
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=n)]
    if spec.buckets is not None:
      bucket = _bucket(image_size, image_size, background, [(c, s, z) for (c, s), z in zip(combos, sizes)])
      if not spec.buckets[0] <= bucket < spec.buckets[1]:
        continue
    centres = _place(rng, [radius[z] for z in sizes], image_size)
    if centres is not None:
      break
  objects = []
  for (colour, shape), size, (x, y) in zip(combos, sizes, centres):
    r = radius[size]
    objects.append({"shape": shape, "colour": colour, "size": size, "centre": [x, y], "radius": r,
                    "bbox": [x - r, y - r, x + r, y + r]})
  objects.sort(key=lambda o: (o["centre"][0], o["centre"][1]))
  return {"width": image_size, "height": image_size, "background": background, "objects": objects,
          "corruption": None, "ood_factors": factors}


# ------------------------------------------------------------------------------------------------
# Rendering.


def _background_pixels(bg: dict[str, Any], height: int, width: int) -> np.ndarray:
  """Grey-level background, uint8 broadcastable to [H, W]."""
  y, x = np.arange(height)[:, None], np.arange(width)[None, :]
  kind = bg["kind"]
  if kind == "plain":
    return np.full((height, width), bg["level"], np.uint8)
  if kind == "stripes":
    coord = {"horizontal": y, "vertical": x, "diagonal": x + y}[bg["orientation"]] + bg["phase"]
    band = (coord // max(1, bg["period"] // 2)) % 2
    return np.asarray(bg["levels"], np.uint8)[band]
  if kind == "noise":
    noise = np.random.default_rng(bg["seed"]).integers(-bg["amplitude"], bg["amplitude"] + 1, (height, width))
    return np.clip(bg["level"] + noise, 0, 255).astype(np.uint8)
  if kind == "checker":
    return np.asarray(bg["levels"], np.uint8)[(y // bg["cell"] + x // bg["cell"]) % 2]
  if kind == "gradient":
    coord = x if bg["orientation"] == "horizontal" else y
    lo, hi = bg["levels"]
    return np.round(lo + (hi - lo) * coord / max(1, coord.max())).astype(np.uint8)
  raise ValueError(f"unknown background kind {kind!r}")


def _star(cx: int, cy: int, r: int) -> list[tuple[float, float]]:
  angles = -np.pi / 2 + np.arange(10) * np.pi / 5
  rs = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
  return list(zip(cx + rs * np.cos(angles), cy + rs * np.sin(angles)))


def _draw_object(draw: PIL.ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
  (cx, cy), r, fill = obj["centre"], obj["radius"], COLOURS[obj["colour"]]
  box = obj["bbox"]
  shape = obj["shape"]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
  elif shape == "star":
    draw.polygon(_star(cx, cy, r), fill=fill)
  elif shape == "cross":
    arm = max(1, round(0.35 * r))
    draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
    draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def corrupt(image: np.ndarray, corruption: dict[str, Any]) -> np.ndarray:
  """Gaussian pixel noise or Gaussian blur, deterministic given the corruption dict. uint8 [H,W,3] -> same."""
  if corruption["kind"] == "gaussian_noise":
    noise = np.random.default_rng(corruption["seed"]).normal(0.0, corruption["sigma"], image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)
  if corruption["kind"] == "gaussian_blur":
    blurred = PIL.Image.fromarray(image).filter(PIL.ImageFilter.GaussianBlur(corruption["radius"]))
    return np.asarray(blurred, np.uint8)
  raise ValueError(f"unknown corruption kind {corruption['kind']!r}")


def render_scene(scene: dict[str, Any]) -> np.ndarray:
  """The scene's image, uint8 [height, width, 3], corruption included."""
  height, width = scene["height"], scene["width"]
  grey = np.broadcast_to(_background_pixels(scene["background"], height, width), (height, width))
  image = PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  draw = PIL.ImageDraw.Draw(image)
  for obj in scene["objects"]:
    _draw_object(draw, obj)
  pixels = np.asarray(image, np.uint8)
  if scene.get("corruption"):
    pixels = corrupt(pixels, scene["corruption"])
  return pixels


CELL_CLASSES = {"colour": ("none",) + tuple(COLOURS), "shape": ("none",) + SHAPES, "size": ("none",) + SIZES}


def cell_labels(scene: dict[str, Any], grid_height: int, grid_width: int) -> dict[str, np.ndarray]:
  """Dense labels of the scene on a grid of equal cells (e.g. the vision tower's merged tokens).

  Each cell takes the colour, shape and size of the object whose centre lies in it, or "none" (objects keep
  a gap wider than a cell's centre spacing at the default sizes, so two centres rarely share a cell; then the
  later object wins). Returns int32 class indices into CELL_CLASSES[name], each [grid_height * grid_width] in
  raster order, and "background": the index of the background kind in ID_BACKGROUNDS + OOD_BACKGROUNDS.
  """
  cell_h, cell_w = scene["height"] / grid_height, scene["width"] / grid_width
  labels = {name: np.zeros(grid_height * grid_width, np.int32) for name in CELL_CLASSES}
  for obj in scene["objects"]:
    x, y = obj["centre"]
    cell = min(int(y // cell_h), grid_height - 1) * grid_width + min(int(x // cell_w), grid_width - 1)
    for name, classes in CELL_CLASSES.items():
      labels[name][cell] = classes.index(obj[name])
  labels["background"] = np.int32((ID_BACKGROUNDS + OOD_BACKGROUNDS).index(scene["background"]["kind"]))
  return labels


def _sample_corruption(rng: np.random.Generator) -> dict[str, Any]:
  severity = int(rng.integers(1, 4))
  if rng.random() < 0.5:
    return {"kind": "gaussian_noise", "severity": severity, "sigma": NOISE_SIGMAS[severity - 1],
            "seed": int(rng.integers(2**31))}
  return {"kind": "gaussian_blur", "severity": severity, "radius": BLUR_RADII[severity - 1]}


# ------------------------------------------------------------------------------------------------
# Questions.


@dataclasses.dataclass(frozen=True)
class _Query:
  text: str
  answer: str
  reasoning: str
  pool: tuple[str, ...] | None = None  # values to draw multiple-choice distractors from; None: numbers


def _phrase(obj: dict[str, Any]) -> str:
  return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _join(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: dict[str, Any]) -> str:
  """One sentence listing the objects left to right, e.g. "The image shows 2 shapes on a plain background,
  from left to right: a large red circle and a small blue star."."""
  objs = scene["objects"]
  where = f"on a {BACKGROUND_WORDS[scene['background']['kind']]} background"
  if len(objs) == 1:
    return f"The image shows 1 shape {where}: a {_phrase(objs[0])}."
  listed = _join([f"a {_phrase(o)}" for o in objs])
  return f"The image shows {len(objs)} shapes {where}, from left to right: {listed}."


def _count_query(rng: np.random.Generator, scene: dict[str, Any], ood: bool) -> _Query:
  objs = scene["objects"]
  present_colours = sorted({o["colour"] for o in objs})
  kind = _pick(rng, ("all", "colour", "shape", "size", "colour_shape"))
  if kind == "all":
    return _Query("How many shapes are there?", str(len(objs)), f"Counting all of them gives {len(objs)}.")
  if kind == "colour":
    colour = _pick(rng, present_colours if rng.random() < 0.75 else list(COLOURS))
    target, match = f"{colour} shapes", lambda o: o["colour"] == colour
  elif kind == "shape":
    shape = _pick(rng, sorted({o["shape"] for o in objs}) if rng.random() < 0.75 else SHAPES)
    target, match = SHAPE_PLURALS[shape], lambda o: o["shape"] == shape
  elif kind == "size":
    size = _pick(rng, SIZES)
    target, match = f"{size} shapes", lambda o: o["size"] == size
  else:
    present = sorted({(o["colour"], o["shape"]) for o in objs})
    pool = present if rng.random() < 0.75 else [(c, s) for c in COLOURS for s in SHAPES if combo_allowed(c, s, ood)]
    colour, shape = _pick(rng, pool)
    target, match = f"{colour} {SHAPE_PLURALS[shape]}", lambda o: (o["colour"], o["shape"]) == (colour, shape)
  hits = [o for o in objs if match(o)]
  if hits:
    listed = _join([f"the {_phrase(o)}" for o in hits])
    reasoning = f"The {target}: {listed}. That makes {len(hits)}."
  else:
    reasoning = f"None of them are {target}. That makes 0."
  return _Query(f"How many {target} are there?", str(len(hits)), reasoning)


def _attribute_queries(scene: dict[str, Any]) -> list[_Query]:
  """Every attribute question with exactly one possible referent in the scene."""
  objs = scene["objects"]
  unique = lambda key: [o for o in objs if sum(key(p) == key(o) for p in objs) == 1]
  queries = []
  large = [o for o in objs if o["size"] == "large"]
  if len(objs) >= 2 and len(large) == 1:
    o = large[0]
    queries.append(_Query("What colour is the largest shape?", o["colour"],
                          f"The only large shape is the {_phrase(o)}, so its colour is {o['colour']}.",
                          tuple(COLOURS)))
  for o in unique(lambda p: p["shape"]):
    queries.append(_Query(f"What colour is the {o['shape']}?", o["colour"],
                          f"The only {o['shape']} is the {_phrase(o)}, so its colour is {o['colour']}.",
                          tuple(COLOURS)))
  for o in unique(lambda p: p["colour"]):
    queries.append(_Query(f"What shape is the {o['colour']} object?", o["shape"],
                          f"The only {o['colour']} object is the {_phrase(o)}, so its shape is {o['shape']}.",
                          SHAPES))
  for o in unique(lambda p: (p["colour"], p["shape"])):
    queries.append(_Query(f"What size is the {o['colour']} {o['shape']}?", o["size"],
                          f"The {o['colour']} {o['shape']} is the {_phrase(o)}, so it is {o['size']}."))
  return queries


def _yes_no_query(rng: np.random.Generator, scene: dict[str, Any], label: bool, kind: str, ood: bool) -> _Query:
  objs = scene["objects"]
  present = {(o["colour"], o["shape"]) for o in objs}
  if label:
    o = _pick(rng, objs)
    colour, shape = o["colour"], o["shape"]
    reasoning = f"The {_phrase(o)} is one of them, so the answer is yes."
  else:
    absent = [p for p in popularity_ranking() if p not in present and combo_allowed(*p, ood)]
    if kind == "popular":
      candidates = absent[:POPULAR_TOP_K]
    elif kind == "adversarial":
      colours, shapes = {c for c, _ in present}, {s for _, s in present}
      candidates = [p for p in absent if p[0] in colours or p[1] in shapes]
    else:
      candidates = absent
    colour, shape = _pick(rng, candidates)
    reasoning = f"None of them is a {colour} {shape}, so the answer is no."
  return _Query(f"Is there a {colour} {shape} in the image? {YES_NO_PHRASE}", "Yes" if label else "No", reasoning)


def _multiple_choice(rng: np.random.Generator, query: _Query) -> tuple[str, str, str]:
  """(problem, letter, reasoning) with the answer and three distractors in random order."""
  if query.pool is None:
    value = int(query.answer)
    nearby = [str(v) for v in range(max(0, value - 3), value + 4) if v != value]
  else:
    nearby = [v for v in query.pool if v != query.answer]
  options = [query.answer] + [str(v) for v in rng.choice(nearby, size=len(CHOICE_LETTERS) - 1, replace=False)]
  options = [options[i] for i in rng.permutation(len(options))]
  letter = CHOICE_LETTERS[options.index(query.answer)]
  listed = " ".join(f"{l}. {v}" for l, v in zip(CHOICE_LETTERS, options))
  return (f"{query.text} choices: {listed}", letter,
          f"{query.reasoning} The answer {query.answer} is option {letter}.")


def make_question(rng: np.random.Generator, scene: dict[str, Any], answer_type: str, *, ood: bool = False,
                  label: bool | None = None, pope_kind: str | None = None) -> dict[str, str]:
  """A question about `scene` of the given type: {problem, solution, answer_type, pope_kind, cot}.

  An attribute question the scene cannot answer unambiguously is replaced by a count question (and a
  multiple-choice one then asks for a count). For yes/no questions `label` (True: the object is present) and
  `pope_kind` (how an absent object is picked; for a present one, the POPE subset it is counted in) are drawn
  when not given.
  """
  pope = ""
  if answer_type == "yes_no":
    label = bool(rng.random() < 0.5) if label is None else label
    pope = pope_kind or _pick(rng, POPE_KINDS)
    query = _yes_no_query(rng, scene, label, pope, ood)
  elif answer_type in ("attribute", "multiple_choice"):
    queries = [q for q in _attribute_queries(scene) if answer_type == "attribute" or q.pool is not None]
    if answer_type == "attribute" and queries:
      query = _pick(rng, queries)
    elif answer_type == "multiple_choice" and queries and rng.random() < 0.5:
      query = _pick(rng, queries)
    else:
      query = _count_query(rng, scene, ood)
      answer_type = "count" if answer_type == "attribute" else answer_type
  elif answer_type == "count":
    query = _count_query(rng, scene, ood)
  else:
    raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
  problem, solution, reasoning = query.text, query.answer, query.reasoning
  if answer_type == "multiple_choice":
    problem, solution, reasoning = _multiple_choice(rng, query)
  cot = f"<think>{caption(scene)} {reasoning}</think>\n<answer>{solution}</answer>"
  return {"problem": problem, "solution": solution, "answer_type": answer_type, "pope_kind": pope, "cot": cot}


# ------------------------------------------------------------------------------------------------
# Examples.


def generate_example(split: str, index: int, seed: int = 0, image_size: int = 112) -> dict[str, Any]:
  """Example `index` of `split`; a pure function of its arguments.

  Returns {"id": str, "image": uint8 [image_size, image_size, 3], "problem", "solution", "answer_type",
  "pope_kind", "cot", "scene" (JSON text): str}.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} is too small to draw distinguishable shapes; use >= "
                     f"{MIN_IMAGE_SIZE}")
  if seed < 0 or index < 0:
    raise ValueError(f"seed={seed} and index={index} must be non-negative")
  spec = SPLITS[split]
  rng = _split_rng(seed, split, index)
  scene = sample_scene(rng, spec, image_size)
  if spec.corrupt:
    scene["corruption"] = _sample_corruption(rng)
  if spec.balanced_yes_no:
    question = make_question(rng, scene, "yes_no", ood=spec.ood, label=index % 2 == 0,
                             pope_kind=POPE_KINDS[(index // 2) % len(POPE_KINDS)])
  else:
    answer_type = ANSWER_TYPES[rng.choice(len(ANSWER_TYPES), p=np.asarray(spec.question_weights))]
    question = make_question(rng, scene, answer_type, ood=spec.ood)
  return {"id": f"{split}-{index:06d}", "image": render_scene(scene), **question, "scene": scene_to_json(scene)}


def generate_examples(split: str, n: int, seed: int = 0, image_size: int = 112, start: int = 0
                      ) -> list[dict[str, Any]]:
  """Examples start .. start + n - 1 of `split` in memory (the tfds builder writes the same examples)."""
  return [generate_example(split, i, seed, image_size) for i in range(start, start + n)]
