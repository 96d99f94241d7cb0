"""Errors raised by host-side processing.

Every error is a `ValueError` subclass whose message names the offending input (a file path, or
"example 12, image 0" for in-memory data) and says what to do about it, so a failure deep inside a
data pipeline can be traced to one record without a debugger.
"""

from __future__ import annotations


class ProcessingError(ValueError):
  """Base class: an input that host-side processing cannot turn into model inputs."""

  def __init__(self, source: str | None, problem: str, fix: str):
    self.source = source
    self.problem = problem
    self.fix = fix
    where = f"{source}: " if source else ""
    super().__init__(f"{where}{problem}. {fix}")


class ImageLoadError(ProcessingError):
  """A missing, unreadable, truncated or corrupt image file."""


class ImageSizeError(ProcessingError):
  """An image with zero size, an extreme aspect ratio, or frames of different sizes in one video."""


class UnsupportedImageError(ProcessingError):
  """An image mode, array dtype, array shape or value range that has no defined RGB conversion."""


class PromptTooLongError(ProcessingError):
  """A tokenised prompt (text plus expanded vision tokens) longer than the length budget."""


def describe(source: str | None, index: int | None = None, kind: str = "image") -> str:
  """Label of one item for error messages: "example 3, image 1", "image 1" or just the source."""
  if index is None:
    return source or kind
  return f"{source}, {kind} {index}" if source else f"{kind} {index}"
