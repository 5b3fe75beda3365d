"""Orbax checkpoints: the training manager (asynchronous save, resume onto the current mesh, fall
back past a broken step) and model exports (config.json + params) that fine-tuning and
conversion start from.

A training checkpoint is a step directory `<workdir>/checkpoints/<step>/` holding two items:
`state` (the train state pytree) and `meta` (JSON: model config, loader state, anything small).
An exported model is a directory with `config.json` (BertConfig) and `params/` (Orbax).

Every read targets the topology running now, never the one that wrote the checkpoint: a resume
restores onto the shardings of the current mesh (`abstract_state`), a model read restores the
`params` subtree alone (no optimizer state) as host numpy arrays, which the caller lays out.
Several processes: process 0 decides the step to restore, every process restores that step, and
exports are written by process 0 alone after the parameters are gathered to every host.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bert_jax import faults, files
from bert_jax.config import BertConfig
from bert_jax.errors import BertJaxError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
Array = jax.Array
CHECKSUMS = "checksums.json"  # beside params/ in a model export
TASK_FILE = "task.json"  # beside params/ in a fine-tuned export: the task, its label names


class CheckpointError(BertJaxError, ValueError):
  """A checkpoint or model directory that cannot be read."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint write failed (disk full, quota, I/O error); the earlier steps are intact."""

  exit_now = True


def _write_error(directory: Any, e: Exception) -> CheckpointError:
  """`e` as one line: the operating system's reason first (TensorStore puts it last, after the
  array, the database and the file)."""
  if isinstance(e, OSError):
    reason = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
  else:
    text = " ".join(str(e).split())
    reason = re.sub(r"\s*\[os_error_code=.*$", "", text.rsplit(": ", 1)[-1])
    where = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'file "([^"]+)"', text)
    reason += f" ({where.group(1)})" if where else f" ({text[:200]})"
  return CheckpointWriteError(
      f"{directory}: writing a checkpoint failed: {reason}; the steps written before are "
      "intact: free the space (or fix the file system) and run the same command again to "
      "resume from the newest")


def _is_write_failure(e: Exception) -> bool:
  """An OSError, or TensorStore's report of one (a ValueError reading 'RESOURCE_EXHAUSTED: ...',
  'PERMISSION_DENIED: ...')."""
  return isinstance(e, OSError) or (isinstance(e, ValueError) and bool(
      re.match(r"(RESOURCE_EXHAUSTED|PERMISSION_DENIED|DATA_LOSS|UNAVAILABLE|INTERNAL|"
               r"UNKNOWN|ABORTED|FAILED_PRECONDITION): ", str(e))))


@contextlib.contextmanager
def _write_errors(directory: Any) -> Iterator[None]:
  """A failed write inside the block as one CheckpointWriteError naming `directory`."""
  try:
    yield
  except (OSError, ValueError) as e:
    if not _is_write_failure(e):
      raise
    raise _write_error(directory, e) from None


class _Manager(ocp.CheckpointManager):
  """Orbax's manager with a failed write (disk full, quota, I/O error), which an asynchronous
  save reports at the next save, wait or close, as one CheckpointWriteError."""

  def save(self, *args, **kwargs) -> bool:
    with _write_errors(self.directory):
      faults.point("checkpoint.write")  # ':enospc' fails this write as a full disk would
      return super().save(*args, **kwargs)

  def wait_until_finished(self) -> None:
    with _write_errors(self.directory):
      super().wait_until_finished()

  def close(self) -> None:
    try:
      super().close()
    except CheckpointWriteError:
      with contextlib.suppress(Exception):  # the write failed already: release the threads
        super().close()
      raise


def manager(directory: files.PathLike, max_to_keep: int | None = 3, async_save: bool = True
            ) -> ocp.CheckpointManager:
  """A manager over `directory` holding the items `state` and `meta`.

  async_save: `save` returns once the state is copied to host memory and the write goes on in
  the background (the next save, `wait` and `close` wait for it). Orbax writes each step into a
  temporary directory and renames it when complete, so a crash mid-write leaves the previous
  steps readable; a failed write (disk full) is a CheckpointError at the next save or close."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  _quiet_orbax_leftovers()  # a failed write leaves TensorStore callbacks behind too
  return _Manager(files.path(directory), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Starts writing step `step` (waits for the previous write first; see `manager`). The meta
  item records a checksum of every array (`checksums`), verified on every read."""
  meta = {**meta, "checksums": checksums(state)}
  faults.point("checkpoint.before_save")
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  faults.point("checkpoint.save_started")  # the asynchronous write of `step` under way


# ----------------------------------------------------------------------------- checksums


def _sums(leaves: list[Array]) -> list[Array]:
  """Per array: (sum of its 32-bit words, sum of word x (index + 1)), both mod 2**32. Exact
  whatever the order of the additions (integers), so the same on any device count or layout;
  one flipped bit always changes the first sum."""
  out = []
  for x in leaves:
    words = x.reshape(-1)
    if words.dtype.itemsize == 4:
      words = jax.lax.bitcast_convert_type(words, jnp.uint32)
    else:  # 1 or 2 bytes (bfloat16, int8): widened
      words = jax.lax.bitcast_convert_type(words, jnp.dtype(f"uint{8 * words.dtype.itemsize}"))
      words = words.astype(jnp.uint32)
    index = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                          jnp.sum(words * index, dtype=jnp.uint32)]))
  return out


@functools.cache
def _jit_sums(mesh: Mesh | None):
  """`_sums` jitted, its results replicated on `mesh` (readable on every process of a
  multi-process run); host arrays (mesh None) on the default device."""
  replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return jax.jit(_sums, out_shardings=replicated)


def checksums(tree: Any) -> dict[str, str]:
  """{'params/bert/...': 'xxxxxxxx-xxxxxxxx'} for the arrays of `tree` (device or host arrays,
  sharded over any mesh); a collective in a multi-process run (every process calls it)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  named = [("/".join(_key(k) for k in p), x) for p, x in leaves
           if hasattr(x, "dtype") and np.dtype(x.dtype).itemsize in (1, 2, 4)
           and np.dtype(x.dtype).kind in "fiub"]
  mesh = next((x.sharding.mesh for _, x in named
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  with jax.transfer_guard("allow"):
    sums = jax.device_get(_jit_sums(mesh)([x for _, x in named]))
  return {name: f"{int(a):08x}-{int(b):08x}" for (name, _), (a, b) in zip(named, sums,
                                                                          strict=True)}


def verify(directory: Any, tree: Any, expected: dict[str, str] | None, prefix: str = "") -> None:
  """Raises CheckpointError naming `directory` and the first arrays whose checksum differs from
  the one recorded at save time (a bit flipped on disk). `prefix` is the recorded path of
  `tree` ("params/" for the params of a train state); no record: nothing to verify."""
  if not expected:
    return
  got = checksums(tree)
  bad = sorted(k for k, v in got.items() if prefix + k in expected and expected[prefix + k] != v)
  if bad:
    raise CheckpointError(f"{directory}: the stored values of {', '.join(bad[:3])}"
                          f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} do not match "
                          "their checksum (the files changed after they were written)")


# ----------------------------------------------------------------------------- resume


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/0/c': shape} of the array leaves of a state, its abstract or its checkpoint metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(_key(k) for k in p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def check_fits(directory: epath.Path, stored: Any, wanted: Any) -> None:
  """Raises CheckpointError naming `directory` when the stored tree (checkpoint metadata) does
  not have the arrays and shapes this run expects."""
  have, want = _shapes(stored), _shapes(wanted)
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params"), k))
  missing = order(set(want) - set(have))
  unexpected = order(set(have) - set(want))
  shapes = [f"{k} {have[k]} (expected {want[k]})" for k in order(set(have) & set(want))
            if have[k] != want[k]]
  if missing or unexpected or shapes:
    show = lambda xs: ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
    parts = [f"missing {show(missing)}" if missing else "",
             f"not expected {show(unexpected)}" if unexpected else "",
             f"other shapes: {show(shapes)}" if shapes else ""]
    raise CheckpointError(
        f"{directory}: the checkpoint does not hold the state this configuration expects "
        f"({'; '.join(p for p in parts if p)}); was it written with another model or task, or "
        "with clipping on where it is now off (train.max_grad_norm=0) or the reverse?")


def _metadata(directory: epath.Path) -> Any:
  """The stored tree of an Orbax pytree directory (ArrayMetadata leaves: shapes, dtypes)."""
  # The handler, not a Checkpointer: that one also looks for a step's _CHECKPOINT_METADATA, which
  # lives a level up, and logs a warning for every read when it is not here.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    found = handler.metadata(directory)
  finally:
    handler.close()
  if found is None:
    raise FileNotFoundError(f"no Orbax pytree metadata (expected {directory}/_METADATA)")
  return found.tree


def _agreed_steps(mngr: ocp.CheckpointManager) -> list[int]:
  """The steps of `mngr`, newest first, as process 0 lists them (the same on every process)."""
  steps = np.asarray(sorted(mngr.all_steps(), reverse=True), np.int64)
  if jax.process_count() == 1:
    return steps.tolist()
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
  mine = steps if jax.process_index() == 0 else np.zeros(n, np.int64)
  return np.asarray(multihost_utils.broadcast_one_to_all(mine)).tolist() if n else []


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _quiet_orbax_leftovers() -> None:
  """A failed restore leaves Orbax's other read coroutines to be collected, whenever that
  happens, with the same error, which Python prints as 'Exception ignored in' tracebacks: from
  the first restore on, those (and the late callbacks of the reads TensorStore still had under
  way) are logged at debug level instead."""
  previous = sys.unraisablehook
  if getattr(previous, "bert_jax", False):
    return

  def hook(u):
    if ("_read_array_index_and_device_put" in repr(u.object)
        or "Event loop is closed" in str(u.exc_value)):  # TensorStore's callbacks, late
      log.debug("ignored after a failed read: %s", u.exc_value)
    else:
      previous(u)
  hook.bert_jax = True
  sys.unraisablehook = hook
  # ... and asyncio's "Task exception was never retrieved" for the same abandoned reads.
  logging.getLogger("asyncio").addFilter(_not_an_abandoned_read)


def _not_an_abandoned_read(record: logging.LogRecord) -> bool:
  """False for asyncio's 'exception was never retrieved' about one of Orbax's reads: a Task names
  the coroutine in its message, a gathering future only carries the read's error."""
  text = record.getMessage()
  if record.exc_info and record.exc_info[1] is not None:
    e = record.exc_info[1]
    text += f" {e} {traceback.format_tb(e.__traceback__)}"
  return not ("orbax/checkpoint/_src/serialization" in text
              or "_read_array_index_and_device_put" in text
              or "Encountered error while reading array index" in text
              or "in OCDBT database at" in text)  # TensorStore's own error for the same read


def _why(e: BaseException) -> str:
  """The innermost cause of a failed read, as one short line (TensorStore's own message names
  the array and the file; Orbax's wrapper around it only repeats the array's spec)."""
  while (e.__cause__ or e.__context__) is not None and "TensorStore" in str(e):
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:240]}"


def _try_restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
                 check_meta: Callable[[epath.Path, dict], None] | None = None
                 ) -> tuple[Any, Any] | str:
  """(state, meta) of `step`, or why its files cannot be read (a string: files missing or cut
  short, values that do not match their checksums). A step that reads but does not fit
  `abstract_state` raises CheckpointError (no fallback: every step would fail); so does what
  `check_meta(step directory, meta)` raises, called before the state is read."""
  step_dir = epath.Path(mngr.directory) / str(step)
  try:
    stored = _metadata(step_dir / "state")
    meta = None if check_meta is None else mngr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - an unreadable step: use an older one
    return _why(e)
  if check_meta is not None:
    check_meta(step_dir, meta or {})
  check_fits(step_dir / "state", stored, abstract_state)
  _quiet_orbax_leftovers()
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    verify(step_dir, got["state"], (got["meta"] or {}).get("checksums"))
  except Exception as e:  # noqa: BLE001 - for example truncated by a crash mid-write
    why = _why(e)
  else:
    return got["state"], got["meta"]
  gc.collect()  # the abandoned reads, now, while the hook is in place
  return why


def _set_aside(directory: epath.Path, steps: list[int], why: str = "unreadable") -> None:
  for step in steps:
    src = directory / str(step)
    dst = directory / f"{step}.{why}"
    if dst.exists():
      dst.rmtree()
    src.rename(dst)
    log.warning("moved the %s step %d to %s", why, step, dst)


def set_aside_diverged(mngr: ocp.CheckpointManager, step: int
                       ) -> tuple[epath.Path, int | None] | None:
  """Renames checkpoint `step`, whose weights gave a NaN/Inf loss or gradient at the next update,
  to `<step>.diverged` (kept for inspection; a rerun resumes from the newest step before it).
  Waits for a write of it still under way first. Returns (the new path, the newest step left,
  None if none is); None when no such step was saved. Every process calls it (process 0
  renames, behind a barrier)."""
  mngr.wait_until_finished()
  steps = _agreed_steps(mngr)
  if step not in steps:
    return None
  directory = epath.Path(mngr.directory)
  files.on_process_0(_set_aside, directory, [step], "diverged")
  mngr.reload()
  return directory / f"{step}.diverged", next((s for s in steps if s < step), None)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   check_meta: Callable[[epath.Path, dict], None] | None = None
                   ) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable step as (step, state, meta); None when there is no step.

  `abstract_state` (ShapeDtypeStructs with shardings) is the target: the state lands on the
  current mesh whatever the device count, fsdp width or host count that wrote it. A step that
  fails to read on any process (truncated by a crash mid-write, a file missing, values that do
  not match their checksums) is skipped with a warning naming it and the one before it is used,
  by every process alike; the skipped steps are then renamed `<step>.unreadable` by process 0,
  behind a barrier. Steps that exist but none of which can be read, or a step written for
  another model or optimizer, are a CheckpointError: never a fresh start that would overwrite
  them. `check_meta(step directory, meta)` may refuse a step by what its meta says (the
  settings it was trained with), before its state is read.
  """
  unreadable, found = {}, None
  for step in _agreed_steps(mngr):
    got = _try_restore(mngr, step, abstract_state, check_meta)
    if isinstance(got, str):
      log.warning("checkpoint step %d in %s is unreadable (%s); trying the one before",
                  step, mngr.directory, got)
    if _everywhere(not isinstance(got, str)):
      found = step, *got
      break
    unreadable[step] = got if isinstance(got, str) else "unreadable on another process"
  if unreadable and found is None:
    raise CheckpointError(
        f"{mngr.directory}: holds checkpoints but none can be read ("
        + "; ".join(f"step {k}: {v}" for k, v in unreadable.items())
        + "); nothing was changed: move them out of the way to start afresh")
  if unreadable:
    # Kept for inspection under another name, out of the way of the steps to come.
    files.on_process_0(_set_aside, epath.Path(mngr.directory), list(unreadable))
    mngr.reload()
  return found


# ----------------------------------------------------------------------------- model reads


def read_params(directory: files.PathLike, subtree: str | None = None) -> Any:
  """The arrays under `directory` (an Orbax pytree), or only its `subtree` item (for example the
  `params` of a train state, leaving the optimizer state unread), as host numpy arrays: the
  topology that wrote them does not matter."""
  directory = files.path(directory)
  try:
    stored = _metadata(directory)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{directory}: no readable Orbax checkpoint metadata "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if subtree is not None:
    if not isinstance(stored, dict) or subtree not in stored:
      raise CheckpointError(f"{directory}: expected a train state with a '{subtree}' entry, "
                            f"found {sorted(stored) if isinstance(stored, dict) else stored}")
    stored = {subtree: stored[subtree]}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        stored)
  try:
    got = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
        item=stored, restore_args=restore_args, partial_restore=subtree is not None))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{directory}: the arrays cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from None
  return got[subtree] if subtree is not None else got


def _read_step(step_dir: epath.Path) -> tuple[BertConfig, dict]:
  meta_file = step_dir / "meta" / "metadata"
  if not meta_file.exists():
    raise CheckpointError(f"{step_dir}: no meta item (expected {meta_file})")
  try:
    meta = json.loads(meta_file.read_text())
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{meta_file}: not readable JSON ({e})") from None
  if not isinstance(meta, dict) or "model_config" not in meta:
    raise CheckpointError(f"{meta_file}: no model_config (expected the JSON that bert_jax "
                          "training writes)")
  params = read_params(step_dir / "state", "params")
  verify(step_dir, params, meta.get("checksums"), prefix="params/")
  return _model_config(meta["model_config"], meta_file), params


def _model_config(d: Any, source: Any) -> BertConfig:
  try:
    return BertConfig.from_dict(d) if isinstance(d, dict) else BertConfig.from_json(d)
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f"{source}: not a bert_jax model config ({e})") from None


def _step_dirs(checkpoints: epath.Path) -> list[epath.Path]:
  steps = [p for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()]
  return sorted(steps, key=lambda p: int(p.name), reverse=True)


def load_model(path: files.PathLike) -> tuple[BertConfig, dict]:
  """(config, params) from an exported model directory, a training step directory, or a
  training workdir (its newest readable step). params is the full tree of the task model, as
  host numpy arrays (lay them out with sharding.put); a train state's optimizer state is not
  read."""
  path = files.path(path)
  if (path / "config.json").exists() and (path / "params").is_dir():
    config = _model_config((path / "config.json").read_text(), path / "config.json")
    params = read_params(path / "params")
    if (path / CHECKSUMS).exists():
      verify(path, params, json.loads((path / CHECKSUMS).read_text()))
    return config, params
  if (path / "state").is_dir():
    return _read_step(path)
  checkpoints = path / CHECKPOINT_DIR
  if checkpoints.is_dir():
    errors = []
    for step_dir in _step_dirs(checkpoints):
      try:
        return _read_step(step_dir)
      except CheckpointError as e:
        log.warning("skipping the unreadable checkpoint %s", e)
        errors.append(str(e))
    raise CheckpointError(f"{path}: no readable step in {checkpoints} "
                          f"({'; '.join(errors) or 'no step directories'})")
  raise CheckpointError(
      f"{path}: not a bert_jax model (expected config.json + params/, a checkpoint step "
      f"directory with state/ and meta/, or a workdir with {CHECKPOINT_DIR}/<step>/)")


# ----------------------------------------------------------------------------- exports


def to_host(tree: Any) -> Any:
  """Numpy copies of `tree`'s arrays on every process, gathered across processes where they are
  split over several (a collective: every process must call it)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(one, tree)


def _write_model(directory: epath.Path, config: BertConfig, params: Any,
                 tokenizer_path: files.PathLike | None, task: Mapping[str, Any] | None) -> None:
  with files.replacing_dir(directory) as tmp:
    (tmp / "config.json").write_text(config.to_json())
    if task is not None:
      (tmp / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")
    # Only this process writes: Orbax must not wait for the others at its barriers.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                             multiprocessing_options=alone)
    ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(params))
    (tmp / CHECKSUMS).write_text(json.dumps(checksums(params), indent=0))
    if tokenizer_path is not None:
      from bert_jax import tokenizer  # the file, and a vocab.txt's tokenizer_config.json
      tokenizer.copy_tokenizer(tokenizer_path, tmp / files.path(tokenizer_path).name)


def save_model(directory: files.PathLike, config: BertConfig, params: Any,
               tokenizer_path: files.PathLike | None = None,
               task: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes config.json + params/ (+ the tokenizer file, + task.json: what a fine-tuned model's
  head outputs, e.g. its label names in order) to `directory`, atomically on a local disk: a
  failure leaves an existing directory untouched. Every process calls it; the params are
  gathered to host memory and process 0 alone writes."""
  directory = files.path(directory)
  host = to_host(params)
  files.on_process_0(_write_model, directory, config, host, tokenizer_path, task)
  return directory
