"""Writing outputs so that a failure never destroys a good one."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def replacing_dir(directory: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `directory` to write into, then swaps it in place of
  `directory`; an exception leaves an existing `directory` untouched (and no temporary behind)."""
  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    yield tmp
    if directory.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
      old.rmdir()
      directory.rename(old)
      tmp.rename(directory)
      shutil.rmtree(old)
    else:
      tmp.rename(directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
