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

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bert_jax import files
from bert_jax.config import BertConfig
from bert_jax.errors import BertJaxError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(BertJaxError, ValueError):
  """A checkpoint or model directory that cannot be read."""


def manager(directory: files.PathLike, max_to_keep: int | None = 3, async_save: bool = True
            ) -> ocp.CheckpointManager:
  """A manager over `directory` holding the items `state` and `meta`.

  async_save: `save` returns once the state is copied to host memory and the write goes on in
  the background (the next save, `wait` and `close` wait for it). Orbax writes each step into a
  temporary directory and renames it when complete, so a crash mid-write leaves the previous
  steps readable."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(files.path(directory), options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Starts writing step `step` (waits for the previous write first; see `manager`)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


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
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = [f"{k} {have[k]} (expected {want[k]})" for k in sorted(set(have) & set(want))
            if have[k] != want[k]]
  if missing or unexpected or shapes:
    show = lambda xs: ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")
    parts = [f"missing {show(missing)}" if missing else "",
             f"not expected {show(unexpected)}" if unexpected else "",
             f"other shapes: {show(shapes)}" if shapes else ""]
    raise CheckpointError(
        f"{directory}: the checkpoint does not hold the state this configuration expects "
        f"({'; '.join(p for p in parts if p)}); was it written with another model or task?")


def _metadata(directory: epath.Path) -> Any:
  """The stored tree of an Orbax pytree directory (ArrayMetadata leaves: shapes, dtypes)."""
  found = ocp.PyTreeCheckpointer().metadata(directory).item_metadata
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


def _try_restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """(state, meta) of `step`, or None when its files cannot be read. A step that reads but
  does not fit `abstract_state` raises CheckpointError (no fallback: every step would fail)."""
  step_dir = epath.Path(mngr.directory) / str(step)
  try:
    stored = _metadata(step_dir / "state")
  except Exception as e:  # noqa: BLE001 - an unreadable step: use an older one
    log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the one before",
                step, mngr.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None
  check_fits(step_dir / "state", stored, abstract_state)
  try:
    got = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 - for example truncated by a crash mid-write
    log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the one before",
                step, mngr.directory, type(e).__name__, str(e).splitlines()[0][:200])
    return None
  return got["state"], got["meta"]


def _set_aside(directory: epath.Path, steps: list[int]) -> None:
  for step in steps:
    src = directory / str(step)
    dst = directory / f"{step}.unreadable"
    if dst.exists():
      dst.rmtree()
    src.rename(dst)
    log.warning("moved the unreadable step %d to %s", step, dst)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable step as (step, state, meta); None when there is none.

  `abstract_state` (ShapeDtypeStructs with shardings) is the target: the state lands on the
  current mesh whatever the device count, fsdp width or host count that wrote it. A step that
  fails to read on any process (for example truncated by a crash mid-write) is skipped with a
  warning and the one before it is used, by every process alike; the skipped steps are then
  renamed `<step>.unreadable` by process 0, behind a barrier.
  """
  unreadable, found = [], None
  for step in _agreed_steps(mngr):
    got = _try_restore(mngr, step, abstract_state)
    if _everywhere(got is not None):
      found = step, *got
      break
    unreadable.append(step)
  if unreadable and found is not None:
    # Kept for inspection under another name, out of the way of the steps to come.
    files.on_process_0(_set_aside, epath.Path(mngr.directory), unreadable)
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
  import json
  meta = json.loads(meta_file.read_text())
  if "model_config" not in meta:
    raise CheckpointError(f"{meta_file}: no model_config (expected the JSON that bert_jax "
                          "training writes)")
  return BertConfig.from_dict(meta["model_config"]), read_params(step_dir / "state", "params")


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
    config = BertConfig.from_json((path / "config.json").read_text())
    return config, read_params(path / "params")
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
                 tokenizer_path: files.PathLike | None) -> None:
  with files.replacing_dir(directory) as tmp:
    (tmp / "config.json").write_text(config.to_json())
    # Only this process writes: Orbax must not wait for the others at its barriers.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                             multiprocessing_options=alone)
    ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(params))
    if tokenizer_path is not None:
      tok = files.path(tokenizer_path)
      (tmp / tok.name).write_bytes(tok.read_bytes())


def save_model(directory: files.PathLike, config: BertConfig, params: Any,
               tokenizer_path: files.PathLike | None = None) -> epath.Path:
  """Writes config.json + params/ (+ the tokenizer file) to `directory`, atomically on a local
  disk: a failure leaves an existing directory untouched. Every process calls it; the params are
  gathered to host memory and process 0 alone writes."""
  directory = files.path(directory)
  host = to_host(params)
  files.on_process_0(_write_model, directory, config, host, tokenizer_path)
  return directory
