"""Reading local VQA records: JSONL and JSON-list files with line numbers, images decoded to RGB uint8.

No tfds here: `local_vqa` wraps `iter_jsonl_vqa` in a builder, and the evaluation benchmark loaders use the
same helpers. Every failure is a `DataError` naming the records file, the line and what to do about it.

A JSONL row has the original NoisyGRPO fields (other keys are ignored):
  {"image": "relative/path.jpg", "problem": "question text", "solution": "reference answer", "id": optional}
"image" may also be a list of paths, or the row may give the list as "images" (not both). A problem with one
`<image>` marker per image places each image at its marker; one without markers has all images before it.

An example holds its one image as "image" (uint8 [H, W, 3]) or its several as "images" (a list of them), never both;
`example_images` reads either and `with_images` writes the right one.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

VQA_FIELDS = ("problem", "solution")  # besides the images ("image" or "images")
IMAGE_MARKER = "<image>"  # where an image goes in a problem (the EasyR1 / VLM-R1 datasets' convention)
IMAGE_MARKER_FIX = (f"Put one {IMAGE_MARKER} marker in the problem per image, where that image goes, or none "
                    "(then all images go before the question)")
MAX_LOGGED_SKIPS = 20  # skipped rows logged one by one; the rest only in the final count


class DataError(ValueError):
  """A file or row that cannot be read. `path` is the records file; `line` the 1-based line (or, with
  unit="row", the row of a table) or None for the whole file."""

  def __init__(self, path: str | os.PathLike, line: int | None, problem: str, fix: str, unit: str = "line"):
    self.path, self.line, self.problem, self.fix, self.unit = os.fspath(path), line, problem, fix, unit
    where = self.path if line is None else f"{self.path}, {unit} {line}"
    super().__init__(f"{where}: {problem}. {fix}")


# ------------------------------------------------------------------------------------------------
# An example's images.


def example_images(example: dict[str, Any]) -> list[Any]:
  """The images of an example, in order: its "images" list or its one "image" (uint8 [H, W, 3] arrays, or paths)."""
  if "images" in example and "image" in example:
    raise ValueError(f"example {example.get('id', '?')} has both 'image' and 'images'; keep one (with_images)")
  return list(example["images"]) if "images" in example else [example["image"]]


def with_images(example: dict[str, Any], images: list[Any]) -> dict[str, Any]:
  """A copy of `example` holding `images`: one as "image", several as "images"."""
  if not images:
    raise ValueError(f"example {example.get('id', '?')}: an example needs at least one image")
  rest = {k: v for k, v in example.items() if k not in ("image", "images")}
  return {**rest, "image": images[0]} if len(images) == 1 else {**rest, "images": list(images)}


def image_marker_problem(question: str, num_images: int) -> str | None:
  """What is wrong with the `<image>` markers of a question for `num_images` images, or None (0 or one per image)."""
  markers = question.count(IMAGE_MARKER)
  if markers in (0, num_images):
    return None
  return f"the problem has {markers} {IMAGE_MARKER} marker(s) for {num_images} image(s)"


# ------------------------------------------------------------------------------------------------
# Images.


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  # As HF `convert_to_rgb` (and processing.image.to_rgb): transparency is composited onto white.
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def check_image_file(image_path: str | os.PathLike, *, path: str | os.PathLike, line: int | None = None,
                     unit: str = "line") -> str:
  """The absolute path of an existing image file; DataError (locating the record at `path`, `line`) if absent."""
  image_path = os.fspath(image_path)
  if not os.path.isfile(image_path):
    raise DataError(path, line, f"image file {image_path} does not exist",
                    "Fix the row's image path (relative paths resolve against the image root) or add the file",
                    unit)
  return os.path.abspath(image_path)


def decode_image(data: str | os.PathLike | bytes, *, path: str | os.PathLike, line: int | None = None,
                 unit: str = "line") -> np.ndarray:
  """An image file (path) or encoded image bytes -> RGB uint8 [H, W, 3], EXIF orientation applied.

  `path` and `line` (`unit`: "line" or "row") locate the record that refers to the image, for the error.
  """
  if isinstance(data, (bytes, bytearray)):
    stream, name = io.BytesIO(data), "the embedded image"
  else:
    stream = name = check_image_file(data, path=path, line=line, unit=unit)
  try:
    with PIL.Image.open(stream) as image:
      image.load()  # PIL decodes lazily; decoding now reports a truncated file here, with its row
      rgb = _to_rgb(PIL.ImageOps.exif_transpose(image))
  except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
    raise DataError(path, line, f"{name} is not a readable image ({type(e).__name__}: {e})",
                    "Re-encode or replace the image, or remove the row", unit) from e
  if rgb.width == 0 or rgb.height == 0:
    raise DataError(path, line, f"{name} has zero size", "Replace the image or remove the row", unit)
  return np.asarray(rgb, np.uint8)


# ------------------------------------------------------------------------------------------------
# JSON files with line numbers.


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) for each non-blank line of a JSON-lines file.

  Raises DataError for a missing file; yields a DataError in place of the value for a line that is not valid
  UTF-8 JSON, so the caller decides whether to raise or skip it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, None, "no such file", "Check the path of the JSON-lines file")
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield line_no, DataError(path, line_no, f"not valid UTF-8 ({e})", "Re-save the file as UTF-8")
        continue
      if not text.strip():
        continue
      try:
        yield line_no, json.loads(text)
      except json.JSONDecodeError as e:
        yield line_no, DataError(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})",
                                 "Each line must be one complete JSON object")


def iter_json_list(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """(line number where the item starts, item) for each item of a file holding one JSON list.

  Raises DataError for a missing file, a top level that is not a list, or invalid JSON (with its line).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, None, "no such file", "Check the path of the JSON file")
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(path, None, f"not valid UTF-8 ({e})", "Re-save the file as UTF-8") from e
  decoder = json.JSONDecoder()
  line, counted = 1, 0

  def skip_space(pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
      pos += 1
    return pos

  def line_of(pos: int) -> int:
    nonlocal line, counted
    line += text.count("\n", counted, pos)
    counted = pos
    return line

  pos = skip_space(0)
  if not text.startswith("[", pos):
    raise DataError(path, line_of(pos), "the file is not a JSON list", "Store the records as [{...}, {...}, ...]")
  pos = skip_space(pos + 1)
  if text.startswith("]", pos):
    return
  while True:
    try:
      item, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise DataError(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})",
                      "Fix the JSON syntax of this item") from e
    yield line_of(pos), item
    pos = skip_space(end)
    if text.startswith(",", pos):
      pos = skip_space(pos + 1)
    elif text.startswith("]", pos):
      if text[skip_space(pos + 1):]:
        raise DataError(path, line_of(skip_space(pos + 1)), "unexpected text after the end of the list",
                        "Remove it: the file must hold exactly one JSON list")
      return
    else:
      raise DataError(path, line_of(pos), "expected ',' or the closing ']' of the list",
                      "Fix the JSON syntax after the previous item")


# ------------------------------------------------------------------------------------------------
# VQA rows.


def _require_text(row: dict[str, Any], field: str, path: str, line: int) -> str:
  value = row[field]
  if not isinstance(value, str) or not value.strip():
    raise DataError(path, line, f"field {field!r} must be a non-empty string, got {value!r:.80}",
                    f"Write {field} as a JSON string")
  return value


def _row_image_paths(row: dict[str, Any], path: str, line: int) -> list[str]:
  """The image paths of a row: "image" (a path or a list of them) or "images" (a list)."""
  if "image" in row and "images" in row:
    raise DataError(path, line, "the row has both 'image' and 'images'",
                    'Give its images under one key: "image": "a.png", "image": ["a.png", "b.png"] or "images": [...]')
  key = "images" if "images" in row else "image"
  value = row[key]
  paths = [value] if isinstance(value, str) and key == "image" else value
  if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
    fix = 'Write images as ["a.png", "b.png"]' if key == "images" else 'Write image as "a.png" or ["a.png", "b.png"]'
    raise DataError(path, line, f"field {key!r} must be a path or a non-empty list of paths, got {value!r:.80}", fix)
  return paths


def parse_vqa_row(row: Any, *, path: str, line: int, image_root: str, decode_images: bool = True
                  ) -> dict[str, Any]:
  """One JSONL row -> {"id": str, "problem": str, "solution": str} with its image (uint8 [H, W, 3], or the absolute
  path when not decoding) as "image", or its several as "images" (`with_images`)."""
  if not isinstance(row, dict):
    raise DataError(path, line, f"expected a JSON object, got {type(row).__name__}",
                    'Write each row as {"image": ..., "problem": ..., "solution": ...}')
  missing = [f for f in VQA_FIELDS if f not in row] + ([] if "image" in row or "images" in row else ["image"])
  if missing:
    raise DataError(path, line, f"missing field(s) {', '.join(missing)} (the row has {', '.join(sorted(row))})",
                    "Every row needs image (a path relative to the image root, or a list of them), problem and "
                    "solution")
  problem, solution = (_require_text(row, f, path, line) for f in VQA_FIELDS)
  image_paths = _row_image_paths(row, path, line)
  marker_problem = image_marker_problem(problem, len(image_paths))
  if marker_problem:
    raise DataError(path, line, marker_problem, IMAGE_MARKER_FIX)
  row_id = row.get("id", f"{os.path.splitext(os.path.basename(path))[0]}-{line}")
  if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
    raise DataError(path, line, f"field 'id' must be a string or an integer, got {row_id!r:.80}",
                    "Fix the id or leave it out (the line number is used instead)")
  load = decode_image if decode_images else check_image_file
  images = [load(os.path.join(image_root, p), path=path, line=line) for p in image_paths]
  return with_images({"id": str(row_id), "problem": problem, "solution": solution}, images)


def iter_jsonl_vqa(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                   skip_bad_rows: bool = False, decode_images: bool = True,
                   on_skip: Callable[[DataError], None] | None = None) -> Iterator[dict[str, Any]]:
  """Examples of a VQA JSONL file, read lazily (see `parse_vqa_row` for their keys).

  `image_root` defaults to the file's directory. A bad row (invalid JSON, missing or non-string field,
  missing or corrupt image) raises DataError unless `skip_bad_rows`; then it is logged (the first
  MAX_LOGGED_SKIPS one by one, then a count when the file is done) and passed to `on_skip`.
  """
  path = os.fspath(path)
  root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
  skipped = rows = 0
  for line, row in iter_jsonl(path):
    rows += 1
    try:
      if isinstance(row, DataError):
        raise row
      example = parse_vqa_row(row, path=path, line=line, image_root=root, decode_images=decode_images)
    except DataError as e:
      if not skip_bad_rows:
        raise DataError(e.path, e.line, e.problem,
                        e.fix + " (or skip and count bad rows: skip_bad_rows=True, in a run config "
                        "data.skip_bad_rows=True)", e.unit) from e
      skipped += 1
      if skipped <= MAX_LOGGED_SKIPS:
        logger.warning("skipping bad row: %s", e)
      if on_skip is not None:
        on_skip(e)
      continue
    yield example
  if skipped:
    logger.warning("%s: skipped %d of %d rows (skip_bad_rows=True)", path, skipped, rows)


def read_jsonl_vqa(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   skip_bad_rows: bool = False, decode_images: bool = True) -> tuple[list[dict[str, Any]], int]:
  """All examples of a VQA JSONL file and the number of bad rows skipped (0 unless `skip_bad_rows`)."""
  skipped: list[DataError] = []
  examples = list(iter_jsonl_vqa(path, image_root, skip_bad_rows=skip_bad_rows, decode_images=decode_images,
                                 on_skip=skipped.append))
  return examples, len(skipped)
