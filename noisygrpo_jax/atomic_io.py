"""Atomic file replacement: readers and killed writers never leave or see a half-written file."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def replace_atomically(target: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Runs `write(binary file)` on a temporary file in `target`'s directory, flushes it to disk, then renames it
  onto `target`; on any failure the temporary file is removed and `target` is left as it was."""
  target = os.fspath(target)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", prefix=f".{os.path.basename(target)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomically(target: str | os.PathLike, text: str) -> None:
  """`replace_atomically` for a UTF-8 text file."""
  replace_atomically(target, lambda f: f.write(text.encode("utf-8")))
