"""Benchmark loaders read their fixture files and reject a malformed row with its file and line (or row)."""

import base64
import json
import os
import shutil

import numpy as np
import pytest

from noisygrpo_jax.data.records import DataError
from noisygrpo_jax.evaluation import benchmark_loaders as bl

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
IMAGES = os.path.join(FIXTURES, "images")
MMSTAR = os.path.join(FIXTURES, "mmstar.tsv")
POPE = os.path.join(FIXTURES, "pope", "coco_pope_adversarial.json")
AMBER_QUERIES = os.path.join(FIXTURES, "amber", "query_discriminative.json")
AMBER_ANNOTATIONS = os.path.join(FIXTURES, "amber", "annotations.json")
COMMON_KEYS = {"id", "image", "problem", "solution", "question", "benchmark", "answer_type"}


def _check_images(examples):
  for e in examples:
    assert e["image"].dtype == np.uint8 and e["image"].shape == (12, 16, 3)


def test_mmstar_tsv():
  examples = bl.load_mmstar(MMSTAR)
  assert [e["id"] for e in examples] == ["0", "1", "2"]
  assert [e["solution"] for e in examples] == ["A", "B", "A"]
  assert examples[0]["problem"] == "Which colour fills the image?\nOptions: A: red, B: blue"
  assert examples[2]["category"] == "fine-grained perception" and examples[2]["l2_category"] == "attribute"
  assert all(set(e) == COMMON_KEYS | {"category", "l2_category"} for e in examples)
  assert {e["answer_type"] for e in examples} == {"multiple_choice"}
  _check_images(examples)
  assert np.all(examples[0]["image"] == (255, 0, 0)) and np.all(examples[1]["image"] == (0, 0, 255))
  lazy = bl.load_mmstar(MMSTAR, decode_images=False)
  assert lazy[0]["image"].startswith(b"\x89PNG")


def _rewrite_tsv(tmp_path, edit):
  lines = open(MMSTAR).read().split("\n")
  lines = edit(lines)
  path = tmp_path / "mmstar.tsv"
  path.write_text("\n".join(lines))
  return path


def test_mmstar_malformed_rows(tmp_path):
  # Rows start on lines 2, 4 and 6; each question spans two lines, the rest of the row is on the second.
  path = _rewrite_tsv(tmp_path, lambda ls: ls[:4] + [ls[4].replace("\tB\t", "\tBC\t")] + ls[5:])
  with pytest.raises(DataError, match=r"mmstar.tsv, line 4: answer must be one option letter"):
    bl.load_mmstar(path)
  path = _rewrite_tsv(tmp_path, lambda ls: ls[:2] + [ls[2].rsplit("\t", 1)[0] + "\tnot base64!"] + ls[3:])
  with pytest.raises(DataError, match=r"line 2: the image field is not valid base64"):
    bl.load_mmstar(path)
  junk = base64.b64encode(b"not an image").decode()
  path = _rewrite_tsv(tmp_path, lambda ls: ls[:4] + [ls[4].rsplit("\t", 1)[0] + "\t" + junk] + ls[5:])
  with pytest.raises(DataError, match=r"line 4: the embedded image is not a readable image"):
    bl.load_mmstar(path)
  path = _rewrite_tsv(tmp_path, lambda ls: ls[:7] + ["7\tshort row"] + ls[7:])
  with pytest.raises(DataError, match=r"line 8: expected 6 tab-separated fields, got 2"):
    bl.load_mmstar(path)
  path = _rewrite_tsv(tmp_path, lambda ls: [ls[0].replace("answer", "label")] + ls[1:])
  with pytest.raises(DataError, match=r"line 1: the header lacks column\(s\) answer"):
    bl.load_mmstar(path)


def test_mmstar_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  tsv = bl.load_mmstar(MMSTAR, decode_images=False)
  table = pa.table({
      "index": [int(e["id"]) for e in tsv],
      "question": [e["question"] for e in tsv],
      "image": [{"bytes": e["image"], "path": None} for e in tsv],  # the HF datasets image struct
      "answer": [e["solution"] for e in tsv],
      "category": [e["category"] for e in tsv],
      "l2_category": [e["l2_category"] for e in tsv],
  })
  path = tmp_path / "mmstar.parquet"
  pq.write_table(table, path)
  examples = bl.load_mmstar(path)
  reference = bl.load_mmstar(MMSTAR)
  for got, want in zip(examples, reference):
    np.testing.assert_array_equal(got["image"], want["image"])
    assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
  pq.write_table(table.set_column(3, "answer", pa.array(["A", "?", "B"])), path)
  with pytest.raises(DataError, match=r"mmstar.parquet, row 2: answer must be one option letter"):
    bl.load_mmstar(path)


def test_pope():
  examples = bl.load_pope(POPE, IMAGES)
  assert [e["id"] for e in examples] == ["1", "2", "3", "4"]
  assert [e["solution"] for e in examples] == ["Yes", "No", "Yes", "No"]
  assert examples[0]["problem"] == "Is there a red square in the image? Answer the question with Yes or No."
  assert examples[0]["question"] == "Is there a red square in the image?"
  assert {e["pope_kind"] for e in examples} == {"adversarial"}
  assert all(set(e) == COMMON_KEYS | {"label", "pope_kind"} for e in examples)
  _check_images(examples)
  verbatim = bl.load_pope(POPE, IMAGES, kind="random", yes_no_suffix="", decode_images=False)
  assert verbatim[0]["problem"] == "Is there a red square in the image?" and verbatim[0]["pope_kind"] == "random"
  assert verbatim[0]["image"] == os.path.join(IMAGES, "red.png")


@pytest.mark.parametrize("row,problem", [
    ('{"question_id": 5, "image": "red.png", "text": "Is there a cat?", "label": "maybe"}', "must be \"yes\" or"),
    ('{"question_id": 5, "image": "red.png", "text": "Is there a cat?"}', "missing field(s) label"),
    ('{"question_id": 5, "image": "gone.png", "text": "Is there a cat?", "label": "no"}', "does not exist"),
    ('{"question_id": 5, "image": "red.png", "text": ', "invalid JSON"),
])
def test_pope_malformed_row(tmp_path, row, problem):
  path = tmp_path / "coco_pope_random.json"
  shutil.copy(POPE, path)
  with open(path, "a") as f:
    f.write(row + "\n")
  with pytest.raises(DataError) as info:
    bl.load_pope(path, IMAGES)
  assert str(info.value).startswith(f"{path}, line 5: ") and problem in str(info.value)


def test_amber():
  examples = bl.load_amber(AMBER_QUERIES, AMBER_ANNOTATIONS, IMAGES)
  assert [e["id"] for e in examples] == ["1005", "1006", "1007"]
  assert [e["solution"] for e in examples] == ["Yes", "No", "Yes"]
  assert [e["amber_type"] for e in examples] == ["discriminative-attribute-state", "discriminative-hallucination",
                                                 "discriminative-attribute-state"]
  assert examples[1]["problem"] == "Is there a tree in this image? Answer the question with Yes or No."
  assert all(set(e) == COMMON_KEYS | {"label", "amber_type"} for e in examples)
  _check_images(examples)


def _write_list(path, items):
  path.write_text("[\n" + ",\n".join("  " + json.dumps(item) for item in items) + "\n]\n")


def test_amber_malformed(tmp_path):
  queries = json.load(open(AMBER_QUERIES))
  annotations = json.load(open(AMBER_ANNOTATIONS))
  q, a = tmp_path / "query_discriminative.json", tmp_path / "annotations.json"
  _write_list(q, queries + [{"id": 2000, "image": "red.png", "query": "Is it red?"}])
  _write_list(a, annotations)
  with pytest.raises(DataError, match=r"query_discriminative.json, line 5: query id 2000 has no annotation"):
    bl.load_amber(q, a, IMAGES)
  _write_list(q, queries)
  _write_list(a, annotations[:2] + [dict(annotations[2], truth="unsure")] + annotations[3:])
  with pytest.raises(DataError, match=r"annotations.json, line 4: field 'truth' must be \"yes\" or \"no\""):
    bl.load_amber(q, a, IMAGES)
  _write_list(a, annotations + [annotations[1]])
  with pytest.raises(DataError, match=r"annotations.json, line 6: id 1005 is annotated twice \(first on line 3\)"):
    bl.load_amber(q, a, IMAGES)
  _write_list(a, annotations)
  _write_list(q, queries[:1] + [{"id": 1006, "image": "ramp.png"}] + queries[2:])
  with pytest.raises(DataError, match=r"query_discriminative.json, line 3: expected an object with 'id', 'image'"):
    bl.load_amber(q, a, IMAGES)
