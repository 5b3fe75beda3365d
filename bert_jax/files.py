"""User paths (local or object-store URLs such as gs://) and writing outputs so that a failure
never destroys a good one, written once in a multi-process run.

Every user path goes through `path()`: an `etils.epath.Path`, the path type Orbax uses, which
understands URLs (gs:// through gcsfs); a local path is made absolute, a URL is kept as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from etils import epath

from bert_jax import faults
from bert_jax.errors import OutputExistsError

PathLike = str | os.PathLike
T = TypeVar("T")


def is_url(p: PathLike) -> bool:
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: local paths absolute, URLs (gs://bucket/dir) unchanged."""
  s = os.fspath(p)
  return epath.Path(s if is_url(s) else os.path.abspath(s))


def barrier(name: str) -> None:
  """Waits until every process of a multi-process run has reached `name` (no-op for one)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"bert_jax:{name}")


def on_process_0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
  """Runs fn on process 0 only, then lets every process continue (a barrier). Every process must
  call it unconditionally: whether there is work to do is for fn to decide on process 0 (another
  process testing the file system itself could see process 0's output already and skip the
  barrier). Returns fn's result on process 0, None elsewhere."""
  import jax
  result = fn(*args, **kwargs) if jax.process_index() == 0 else None
  barrier(getattr(fn, "__name__", "on_process_0"))
  return result


def write_text(target: PathLike, text: str) -> None:
  """Writes `text` to `target` atomically on a local disk (a temporary sibling renamed over it);
  an object store replaces an object whole anyway."""
  target = path(target)
  if is_url(target):
    target.write_text(text, encoding="utf-8")
    return
  tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, target)


# Written into every directory that `replacing_dir` makes: the mark of a directory that a later
# write may replace whole. A directory without it is never replaced (see `check_replaceable`).
OUTPUT_MARKER = ".bert_jax_output"
_MARKER_TEXT = ("written by bert_jax; the next write of this output replaces this directory "
                "whole\n")


def _ours(directory: epath.Path) -> bool:
  """Whether `directory` is an output of ours: the marker, or an older output made before the
  marker existed (pretraining data with its manifest, a model export: config.json + params/)."""
  if (directory / OUTPUT_MARKER).is_file():
    return True
  manifest = directory / "manifest.json"
  if manifest.is_file():
    try:
      return str(json.loads(manifest.read_text()).get("format", "")).startswith("bert_jax.")
    except (ValueError, AttributeError, OSError):
      return False
  return (directory / "config.json").is_file() and (directory / "params").is_dir()


def check_replaceable(directory: PathLike) -> None:
  """Raises OutputExistsError unless `directory` is absent, empty, or an output of ours: a
  directory of anything else (the current directory, a workdir, a downloaded model) is never
  deleted to make room for an output."""
  directory = path(directory)
  if not directory.exists():
    return
  if not directory.is_dir():
    raise OutputExistsError(f"{directory}: exists and is a file; expected a directory to write "
                            "the output into (choose another path)")
  if _ours(directory):
    return
  entries = sorted(p.name for p in directory.iterdir())
  if entries:
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise OutputExistsError(
        f"{directory}: exists and was not written by bert_jax (it holds {shown}); refusing to "
        "replace it: choose a new or empty directory, or remove this one yourself")


@contextlib.contextmanager
def replacing_dir(directory: PathLike) -> Iterator[epath.Path]:
  """Yields a temporary sibling of `directory` to write into, then swaps it in place of
  `directory`; an exception leaves an existing `directory` untouched (and no temporary behind).
  An existing `directory` that is not an output of ours is refused before anything is written
  (`check_replaceable`); the new one carries the mark (OUTPUT_MARKER) that allows the next
  replacement. Call it on one process only (see `on_process_0`). On an object store the swap is a
  copy, not atomic: readers must not read `directory` while it is replaced."""
  directory = path(directory)
  check_replaceable(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  for stale in directory.parent.iterdir():  # an unfinished write of a process killed outright
    if stale.name.startswith(f".{directory.name}.") and stale.name.endswith(".tmp"):
      stale.rmtree()
  tag = uuid.uuid4().hex[:8]
  tmp = directory.with_name(f".{directory.name}.{tag}.tmp")
  tmp.mkdir()
  try:
    yield tmp
    (tmp / OUTPUT_MARKER).write_text(_MARKER_TEXT)
    faults.point("files.before_swap")  # the new output complete, not yet in place
    if directory.exists():
      old = directory.with_name(f".{directory.name}.{tag}.old")
      directory.rename(old)
      tmp.rename(directory)
      old.rmtree()
    else:
      tmp.rename(directory)
  finally:
    if tmp.exists():
      tmp.rmtree()


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies the file or directory tree `src` to `dst` (either may be a URL)."""
  src, dst = path(src), path(dst)
  if src.is_dir():
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
      copy(child, dst / child.name)
  else:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())


_LOCAL_COPIES: dict[str, epath.Path] = {}


def local(p: PathLike) -> epath.Path:
  """`p` itself when it is local; for a URL, a copy of the file or directory on this host's disk
  (in a temporary directory under $BERT_JAX_CACHE, default the system's, removed at exit), made
  once per process, for readers that need a local file (SentencePiece, memory-mapped instance
  shards, safetensors)."""
  if not is_url(p):
    return path(p)
  url = os.fspath(p).rstrip("/")
  if url not in _LOCAL_COPIES:
    root = os.environ.get("BERT_JAX_CACHE") or None
    if root:
      os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bert_jax.", dir=root)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    out = epath.Path(tmp) / url.rsplit("/", 1)[-1]
    copy(url, out)
    _LOCAL_COPIES[url] = out
  return _LOCAL_COPIES[url]


@contextlib.contextmanager
def local_output(target: PathLike) -> Iterator[epath.Path]:
  """A local path to write `target` (a file or a directory) into: `target` itself when local;
  for a URL a temporary local path, uploaded to `target` when the block ends without error. A
  directory replaces an existing `target` whole (`replacing_dir`: no file of an earlier, larger
  output is left beside the new one), and an existing `target` that is not an output of ours is
  refused before the block runs, not after its work."""
  if not is_url(target):
    yield path(target)
    return
  if path(target).is_dir():
    check_replaceable(target)
  with tempfile.TemporaryDirectory() as tmp:
    out = epath.Path(tmp) / path(target).name
    yield out
    if out.is_dir():
      with replacing_dir(target) as staged:
        copy(out, staged)
    else:
      copy(out, target)
