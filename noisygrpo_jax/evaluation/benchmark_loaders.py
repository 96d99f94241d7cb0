"""Loaders for local copies of evaluation benchmarks: MMStar, POPE and AMBER (discriminative part).

Nothing is downloaded: each loader reads files the user has put on disk. Every loader returns a list of
examples with the keys of local VQA examples (`noisygrpo_jax.data.records`):
  "id": str, "image": RGB uint8 [H, W, 3], "problem": str (the prompt), "solution": str (the reference),
plus "benchmark", "answer_type" ("multiple_choice" or "yes_no", as in the shapes data), "question" (the
benchmark's own text) and benchmark-specific fields. With `decode_images=False` "image" is left undecoded:
the absolute path of the image file (POPE, AMBER) or the encoded image bytes (MMStar); decode it later with
`records.decode_image`. A malformed row raises `DataError` naming the file and the line (or table row).

Yes/no references are written "Yes"/"No" (the shapes data's convention; the raw label is kept in "label").
The yes/no prompts get YES_NO_PHRASE appended, which is also what triggers the yes/no accuracy reward; pass
`yes_no_suffix=""` to keep the benchmark's question verbatim. MMStar questions are kept verbatim (their
options follow "Options:", not "choices:").
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import re
import sys
from typing import Any, Iterator

from noisygrpo_jax.data.records import DataError, check_image_file, decode_image, iter_json_list, iter_jsonl
from noisygrpo_jax.data.scenes import POPE_KINDS, YES_NO_PHRASE

MMSTAR_COLUMNS = ("index", "question", "answer", "category", "l2_category", "image")
POPE_FIELDS = ("question_id", "image", "text", "label")


def _text(value: Any, field: str, path: str, line: int, unit: str = "line") -> str:
  if not isinstance(value, str) or not value.strip():
    raise DataError(path, line, f"field {field!r} must be a non-empty string, got {value!r:.80}",
                    f"Fix {field} in this row", unit)
  return value


def _identifier(value: Any, field: str, path: str, line: int, unit: str = "line") -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
    raise DataError(path, line, f"field {field!r} must be a string or an integer, got {value!r:.80}",
                    f"Fix {field} in this row", unit)
  return str(value)


def _yes_no(value: Any, field: str, path: str, line: int) -> str:
  label = value.strip().lower() if isinstance(value, str) else None
  if label not in ("yes", "no"):
    raise DataError(path, line, f"field {field!r} must be \"yes\" or \"no\", got {value!r:.80}",
                    f"Fix {field} in this row")
  return label


def _prompt(question: str, suffix: str) -> str:
  return f"{question} {suffix}" if suffix else question


def _image(data: str | bytes, decode: bool, path: str, line: int, unit: str = "line") -> Any:
  if decode:
    return decode_image(data, path=path, line=line, unit=unit)
  return check_image_file(data, path=path, line=line, unit=unit) if isinstance(data, str) else data


# ------------------------------------------------------------------------------------------------
# MMStar.


def _mmstar_tsv_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  # Base64 images exceed the csv module's default 128 KiB field limit.
  csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    missing = [c for c in MMSTAR_COLUMNS if header is None or c not in header]
    if missing:
      raise DataError(path, 1, f"the header lacks column(s) {', '.join(missing)} (it has {header})",
                      f"MMStar TSV files need the columns {', '.join(MMSTAR_COLUMNS)}")
    start = reader.line_num + 1  # a quoted field may span lines: report the line where the row starts
    for row in reader:
      if row and len(row) != len(header):
        raise DataError(path, start, f"expected {len(header)} tab-separated fields, got {len(row)}",
                        "Check for unquoted tabs or line breaks in this row")
      if row:
        yield start, dict(zip(header, row))
      start = reader.line_num + 1


def _mmstar_parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise DataError(path, None, "reading parquet needs pyarrow, which is not installed",
                    "pip install pyarrow, or use the TSV release of MMStar") from e
  table = pq.ParquetFile(path)
  missing = [c for c in MMSTAR_COLUMNS if c not in table.schema_arrow.names]
  if missing:
    raise DataError(path, None, f"the table lacks column(s) {', '.join(missing)} (it has "
                    f"{table.schema_arrow.names})", f"MMStar tables need the columns {', '.join(MMSTAR_COLUMNS)}")
  row = 0
  for batch in table.iter_batches(batch_size=64, columns=list(MMSTAR_COLUMNS)):
    for record in batch.to_pylist():
      row += 1
      yield row, record


def _mmstar_image_bytes(value: Any, path: str, line: int, unit: str) -> bytes:
  """Encoded image bytes from a base64 string (TSV), raw bytes, or an HF image struct {"bytes", "path"}."""
  if isinstance(value, dict):
    value = value.get("bytes")
  if isinstance(value, (bytes, bytearray)) and value:
    return bytes(value)
  if isinstance(value, str) and value.strip():
    if value.strip().isdigit():
      raise DataError(path, line, f"the image field is a reference to row {value.strip()}, not an image",
                      "Use an MMStar file with the image embedded in every row", unit)
    try:
      return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
      raise DataError(path, line, f"the image field is not valid base64 ({e})", "Re-export this row's image",
                      unit) from e
  raise DataError(path, line, f"the image field is empty or of type {type(value).__name__}",
                  "Every row needs its image (base64 text in TSV, bytes in parquet)", unit)


def load_mmstar(path: str | os.PathLike, *, decode_images: bool = True) -> list[dict[str, Any]]:
  """MMStar from a VLMEvalKit-style TSV (columns index, question, answer, category, l2_category, image as
  base64) or a parquet file with those columns (image as bytes, base64 text or an HF {"bytes", "path"} struct;
  needs pyarrow).

  Extra keys: "benchmark" "mmstar", "answer_type" "multiple_choice", "question", "category", "l2_category".
  The reference is the option letter; the question keeps its "Options: A: ..." text.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, None, "no such file", "Check the path of the MMStar TSV or parquet file")
  is_parquet = path.endswith(".parquet")
  unit = "row" if is_parquet else "line"
  rows = _mmstar_parquet_rows(path) if is_parquet else _mmstar_tsv_rows(path)
  examples = []
  for line, row in rows:
    question = _text(row["question"], "question", path, line, unit)
    answer = _text(row["answer"], "answer", path, line, unit).strip()
    if not re.fullmatch(r"[A-Z]", answer):
      raise DataError(path, line, f"answer must be one option letter, got {answer!r:.80}", "Fix the answer", unit)
    image = _mmstar_image_bytes(row["image"], path, line, unit)
    examples.append({
        "id": _identifier(row["index"], "index", path, line, unit),
        "image": _image(image, decode_images, path, line, unit),
        "problem": question, "solution": answer, "question": question,
        "benchmark": "mmstar", "answer_type": "multiple_choice",
        "category": str(row["category"] or ""), "l2_category": str(row["l2_category"] or ""),
    })
  return examples


# ------------------------------------------------------------------------------------------------
# POPE.


def load_pope(path: str | os.PathLike, image_root: str | os.PathLike, *, kind: str | None = None,
              yes_no_suffix: str = YES_NO_PHRASE, decode_images: bool = True) -> list[dict[str, Any]]:
  """POPE from one of its JSON-lines files (coco_pope_{random,popular,adversarial}.json: one object per line
  with question_id, image, text, label) and the folder holding its images (COCO val2014).

  `kind` (random / popular / adversarial) defaults to the one named in the file name, else "".
  Extra keys: "benchmark" "pope", "answer_type" "yes_no", "question", "label", "pope_kind".
  """
  path = os.fspath(path)
  if kind is None:
    kind = next((k for k in POPE_KINDS if k in os.path.basename(path).lower()), "")
  elif kind not in POPE_KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {POPE_KINDS} or None")
  examples = []
  for line, row in iter_jsonl(path):
    if isinstance(row, DataError):
      raise row
    if not isinstance(row, dict):
      raise DataError(path, line, f"expected a JSON object, got {type(row).__name__}",
                      f"Each line needs the fields {', '.join(POPE_FIELDS)}")
    missing = [f for f in POPE_FIELDS if f not in row]
    if missing:
      raise DataError(path, line, f"missing field(s) {', '.join(missing)}",
                      f"Each line needs the fields {', '.join(POPE_FIELDS)}")
    question = _text(row["text"], "text", path, line)
    label = _yes_no(row["label"], "label", path, line)
    image = os.path.join(os.fspath(image_root), _text(row["image"], "image", path, line))
    examples.append({
        "id": _identifier(row["question_id"], "question_id", path, line),
        "image": _image(image, decode_images, path, line),
        "problem": _prompt(question, yes_no_suffix), "solution": label.capitalize(), "question": question,
        "benchmark": "pope", "answer_type": "yes_no", "label": label, "pope_kind": kind,
    })
  return examples


# ------------------------------------------------------------------------------------------------
# AMBER.


def load_amber(query_path: str | os.PathLike, annotation_path: str | os.PathLike, image_root: str | os.PathLike,
               *, yes_no_suffix: str = YES_NO_PHRASE, decode_images: bool = True) -> list[dict[str, Any]]:
  """AMBER's discriminative (yes/no) queries, in the layout of the AMBER repository:

    query_path       data/query/query_discriminative.json: a JSON list of {"id", "image", "query"}
    annotation_path  data/annotations.json: a JSON list of {"id", "truth", "type", ...}; for a discriminative
                     query "truth" is "yes" or "no" (generative entries, whose truth is a list of objects,
                     are ignored unless a query refers to them)
    image_root       the folder of AMBER_*.jpg images

  Every query needs exactly one annotation with its id. Extra keys: "benchmark" "amber", "answer_type"
  "yes_no", "question", "label", "amber_type" (the annotation's "type", e.g. "discriminative-hallucination",
  or "").
  """
  query_path, annotation_path = os.fspath(query_path), os.fspath(annotation_path)
  annotations: dict[str, tuple[int, dict[str, Any]]] = {}
  for line, item in iter_json_list(annotation_path):
    if not isinstance(item, dict) or "id" not in item or "truth" not in item:
      raise DataError(annotation_path, line, "expected an object with 'id' and 'truth'",
                      'Write each annotation as {"id": ..., "truth": "yes" or "no", ...}')
    key = _identifier(item["id"], "id", annotation_path, line)
    if key in annotations:
      raise DataError(annotation_path, line, f"id {key} is annotated twice (first on line {annotations[key][0]})",
                      "Keep one annotation per id")
    annotations[key] = (line, item)
  examples = []
  for line, item in iter_json_list(query_path):
    if not isinstance(item, dict) or any(f not in item for f in ("id", "image", "query")):
      raise DataError(query_path, line, "expected an object with 'id', 'image' and 'query'",
                      'Write each query as {"id": ..., "image": "AMBER_1.jpg", "query": "Is there ...?"}')
    key = _identifier(item["id"], "id", query_path, line)
    if key not in annotations:
      raise DataError(query_path, line, f"query id {key} has no annotation in {annotation_path}",
                      "Use the annotations file that belongs to these queries")
    ann_line, ann = annotations[key]
    label = _yes_no(ann["truth"], "truth", annotation_path, ann_line)
    question = _text(item["query"], "query", query_path, line)
    image = os.path.join(os.fspath(image_root), _text(item["image"], "image", query_path, line))
    examples.append({
        "id": key, "image": _image(image, decode_images, query_path, line),
        "problem": _prompt(question, yes_no_suffix), "solution": label.capitalize(), "question": question,
        "benchmark": "amber", "answer_type": "yes_no", "label": label, "amber_type": str(ann.get("type", "")),
    })
  return examples
