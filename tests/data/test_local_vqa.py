"""Local VQA JSONL: the direct reader, bad rows (errors with file and line, or counted skips), JSON lists with
line numbers, and the tfds LocalVqa builder."""

import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from noisygrpo_jax.data.loading import load_split, prepare_builder
from noisygrpo_jax.data.records import DataError, example_images, iter_json_list, read_jsonl_vqa

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
VQA = os.path.join(FIXTURES, "vqa.jsonl")


@pytest.fixture
def workdir(tmp_path):
  """A copy of the fixture JSONL and images that tests may append bad rows to."""
  shutil.copytree(os.path.join(FIXTURES, "images"), tmp_path / "images")
  shutil.copy(VQA, tmp_path / "vqa.jsonl")
  (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  return tmp_path


def _append(path, *lines):
  with open(path, "a") as f:
    f.write("".join(line + "\n" for line in lines))


def test_reads_fixture_rows():
  examples, skipped = read_jsonl_vqa(VQA)
  assert skipped == 0
  assert [e["id"] for e in examples] == ["v1", "vqa-2", "3"]
  assert [e["solution"] for e in examples] == ["red", "Yes", "B"]
  assert examples[0]["problem"] == "What colour is the image?"
  for e in examples:
    assert set(e) == {"id", "image", "problem", "solution"}
    assert e["image"].dtype == np.uint8 and e["image"].shape == (12, 16, 3)
  assert np.all(examples[0]["image"] == (255, 0, 0))
  ramp = examples[1]["image"]  # mode L -> three equal channels
  assert np.array_equal(ramp[..., 0], ramp[..., 1]) and ramp[0, -1, 0] == 255 and ramp[0, 0, 0] == 0
  # Half-transparent green (alpha 128) composited onto white, as the image processor does.
  np.testing.assert_allclose(examples[2]["image"][0, 0], (127, 227, 127), atol=1)


def test_lazy_images_are_absolute_paths():
  examples, _ = read_jsonl_vqa(VQA, decode_images=False)
  assert examples[0]["image"] == os.path.join(FIXTURES, "images", "red.png")


BAD_ROWS = {
    "invalid_json": ('{"image": "images/red.png", "problem": "q"', "invalid JSON"),
    "missing_field": ('{"image": "images/red.png", "problem": "q"}', "missing field(s) solution"),
    "not_a_string": ('{"image": "images/red.png", "problem": "q", "solution": 3}', "field 'solution' must be"),
    "not_an_object": ('["images/red.png", "q", "a"]', "expected a JSON object"),
    "missing_image": ('{"image": "images/nope.png", "problem": "q", "solution": "a"}', "does not exist"),
    "corrupt_image": ('{"image": "images/corrupt.png", "problem": "q", "solution": "a"}', "not a readable image"),
    "both_image_keys": ('{"image": "images/red.png", "images": ["images/blue.png"], "problem": "q", "solution": "a"}',
                        "the row has both 'image' and 'images'"),
    "marker_count": ('{"image": ["images/red.png", "images/blue.png"], "problem": "<image> q", "solution": "a"}',
                     "the problem has 1 <image> marker(s) for 2 image(s). Put one <image> marker"),
    "empty_image_list": ('{"images": [], "problem": "q", "solution": "a"}',
                         "field 'images' must be a path or a non-empty list of paths"),
    "missing_second_image": ('{"images": ["images/red.png", "images/nope.png"], "problem": "q", "solution": "a"}',
                             "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_names_file_and_line(workdir, case):
  row, problem = BAD_ROWS[case]
  path = workdir / "vqa.jsonl"
  _append(path, "", row)  # a blank line 4 (ignored), the bad row on line 5
  with pytest.raises(DataError) as info:
    read_jsonl_vqa(path)
  message = str(info.value)
  assert message.startswith(f"{path}, line 5: ")
  assert problem in message
  assert "skip_bad_rows=True" in message
  assert info.value.line == 5


def test_skip_flag_counts_and_logs_bad_rows(workdir, caplog):
  path = workdir / "vqa.jsonl"
  _append(path, *(row for row, _ in BAD_ROWS.values()))
  _append(path, json.dumps({"image": "images/blue.png", "problem": "q", "solution": "blue"}))
  with caplog.at_level(logging.WARNING, logger="noisygrpo_jax.data.records"):
    examples, skipped = read_jsonl_vqa(path, skip_bad_rows=True)
  last = 3 + len(BAD_ROWS) + 1  # the fixture's rows, the bad rows, the good one
  assert skipped == len(BAD_ROWS)
  assert [e["id"] for e in examples] == ["v1", "vqa-2", "3", f"vqa-{last}"]
  assert f"skipped {len(BAD_ROWS)} of {last} rows" in caplog.text
  assert "line 4" in caplog.text and f"line {last - 1}" in caplog.text


def test_image_root_option(workdir):
  rows = [{"image": "red.png", "problem": "q", "solution": "red"}]
  (workdir / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  examples, _ = read_jsonl_vqa(workdir / "flat.jsonl", image_root=workdir / "images")
  assert examples[0]["image"].shape == (12, 16, 3)
  with pytest.raises(DataError, match="does not exist"):
    read_jsonl_vqa(workdir / "flat.jsonl")


def test_missing_file():
  with pytest.raises(DataError, match="no such file"):
    read_jsonl_vqa("/nonexistent/train.jsonl")


def test_json_list_line_numbers(tmp_path):
  path = tmp_path / "items.json"
  path.write_text('[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}, {"a": 4}\n]\n')
  assert list(iter_json_list(path)) == [(2, {"a": 1}), (4, {"a": 2, "b": 3}), (5, {"a": 4})]
  path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]')
  with pytest.raises(DataError, match=r"line 3: invalid JSON"):
    list(iter_json_list(path))
  path.write_text('{"a": 1}')
  with pytest.raises(DataError, match="not a JSON list"):
    list(iter_json_list(path))
  path.write_text('[{"a": 1}] [')
  with pytest.raises(DataError, match="after the end of the list"):
    list(iter_json_list(path))


def test_builder_reads_back_and_counts_skips(workdir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  path = workdir / "vqa.jsonl"
  _append(path, BAD_ROWS["missing_image"][0], BAD_ROWS["invalid_json"][0])
  with pytest.raises(DataError, match="line 4: image file .* does not exist"):
    load_split("local_vqa", "train", data_dir, files=os.fspath(path))
  split = load_split("local_vqa", "train", data_dir, files=os.fspath(path), skip_bad_rows=True)
  expected, skipped = read_jsonl_vqa(path, skip_bad_rows=True)
  assert skipped == 2 and len(split) == len(expected) == 3
  for got, want in zip(split, expected):
    np.testing.assert_array_equal(got["image"], want["image"])
    assert {k: got[k] for k in ("id", "problem", "solution")} == {k: want[k] for k in ("id", "problem", "solution")}
  builder = prepare_builder("local_vqa", data_dir, files=os.fspath(path), skip_bad_rows=True)
  assert builder.info.metadata["skipped_rows"] == {"train": 2}


def _several_image_rows(workdir):
  """A JSONL of rows with two images of different sizes (as "image": [...] and as "images": [...]) and a one-element
  list; the new image is 20 x 8 of level 7."""
  PIL.Image.fromarray(np.full((20, 8, 3), 7, np.uint8)).save(workdir / "images" / "tall.png")
  rows = [{"id": "list", "image": ["images/red.png", "images/tall.png"], "problem": "Is <image> wider than <image>?",
           "solution": "Yes"},
          {"id": "key", "images": ["images/tall.png", "images/blue.png"], "problem": "Same colour?", "solution": "No"},
          {"id": "one", "image": ["images/red.png"], "problem": "What colour?", "solution": "red"}]
  path = workdir / "several.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_rows_with_several_images(workdir):
  examples, _ = read_jsonl_vqa(_several_image_rows(workdir))
  assert [sorted(e) for e in examples] == [["id", "images", "problem", "solution"]] * 2 + [
      ["id", "image", "problem", "solution"]]
  assert [[im.shape for im in example_images(e)] for e in examples] == [
      [(12, 16, 3), (20, 8, 3)], [(20, 8, 3), (12, 16, 3)], [(12, 16, 3)]]
  red, tall = examples[0]["images"]
  assert np.all(red == (255, 0, 0)) and np.all(tall == 7) and np.all(examples[1]["images"][1] == (0, 0, 255))
  assert examples[0]["problem"] == "Is <image> wider than <image>?"


def test_builder_reads_back_several_images(workdir, tmp_path_factory):
  path = _several_image_rows(workdir)
  split = load_split("local_vqa", "train", tmp_path_factory.mktemp("tfds"), files=os.fspath(path))
  expected, _ = read_jsonl_vqa(path)
  assert len(split) == len(expected) == 3
  for got, want in zip(split, expected):
    assert sorted(got) == sorted(want)
    assert {k: got[k] for k in ("id", "problem", "solution")} == {k: want[k] for k in ("id", "problem", "solution")}
    assert len(example_images(got)) == len(example_images(want))
    for a, b in zip(example_images(got), example_images(want)):
      assert a.dtype == np.uint8
      np.testing.assert_array_equal(a, b)
