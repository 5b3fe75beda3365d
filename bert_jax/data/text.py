"""Reading raw text corpora line by line, with errors that name the file and line."""

from __future__ import annotations

import glob
import pathlib
from collections.abc import Iterator, Sequence

from bert_jax import files as storage
from bert_jax.data.errors import DataError


def _glob(pattern: str) -> list[str]:
  if not storage.is_url(pattern):
    return glob.glob(pattern)
  p = storage.path(pattern)  # gs://bucket/dir/*.txt: a pattern in the last part of the path
  if not glob.has_magic(pattern):
    return [pattern] if p.is_file() else []
  parent = p.parent
  return [str(m) for m in parent.glob(p.name) if m.is_file()] if parent.is_dir() else []


def expand_files(patterns: str) -> list[str]:
  """Comma-separated paths or globs (local, or URLs with the pattern in the file name) -> the
  matching files, sorted per pattern; a DataError names a pattern that matches nothing."""
  found: list[str] = []
  for pattern in (p.strip() for p in patterns.split(",")):
    matches = sorted(_glob(pattern))
    if not matches:
      raise DataError(f"{pattern}: no such file")
    found += matches
  return found


def check_files(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """The paths as local Paths (a URL: a local copy, made once per process); a DataError naming
  the first that is missing or not a file."""
  if not paths:
    raise DataError("no input files given")
  out = []
  for p in paths:
    if not storage.path(p).is_file():
      raise DataError(f"{p}: no such file")
    out.append(pathlib.Path(storage.local(p)) if storage.is_url(p) else pathlib.Path(p))
  return out


def iter_lines(path: str | pathlib.Path, keep_newline: bool = False
               ) -> Iterator[tuple[int, str]]:
  """(line number, text without the newline) for each line of a UTF-8 file; `keep_newline`
  keeps it (for the csv module, which reads quoted fields across lines).

  Undecodable bytes are an error (not a silent replacement): the message gives the file, the line
  and the column of the first bad byte.
  """
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                        f"{e.start + 1} of the line); convert the file to UTF-8") from None
      yield n, line if keep_newline else line.rstrip("\r\n")
