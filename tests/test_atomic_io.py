"""replace_atomically: a failed write leaves the target as it was and no temporary file."""

import pytest

from noisygrpo_jax import atomic_io


def test_replaces_the_target(tmp_path):
  target = tmp_path / "f.json"
  target.write_text("old")
  atomic_io.write_text_atomically(target, "new é")
  assert target.read_text(encoding="utf-8") == "new é"
  assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "f.bin"
  target.write_bytes(b"old")

  def write(f):
    f.write(b"partial")
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space"):
    atomic_io.replace_atomically(target, write)
  assert target.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
