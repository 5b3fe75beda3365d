"""Orbax checkpoints: the training manager (save, resume, fall back past a broken step) and
model exports (config.json + params) that fine-tuning and conversion start from.

A training checkpoint is a step directory `<workdir>/checkpoints/<step>/` holding two items:
`state` (the train state pytree) and `meta` (JSON: model config, loader state, anything small).
An exported model is a directory with `config.json` (BertConfig) and `params/` (Orbax).
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from bert_jax.config import BertConfig
from bert_jax.errors import BertJaxError
from bert_jax.files import replacing_dir

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(BertJaxError, ValueError):
  """A checkpoint or model directory that cannot be read."""


def manager(directory: str | pathlib.Path, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
  """A manager over `directory` holding the items `state` and `meta`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
  """Writes step `step` (atomically: Orbax renames a finished temporary directory)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores the newest readable step as (step, state, meta); None when there is none.

  A step that fails to read (for example truncated by a crash mid-write) is skipped with a
  warning and the one before it is used.
  """
  unreadable = []
  found = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      got = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - any read failure means: use an older step
      log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the one before",
                  step, mngr.directory, type(e).__name__, str(e).splitlines()[0][:200])
      unreadable.append(step)
      continue
    found = step, got["state"], got["meta"]
    break
  if unreadable and found is not None:
    # Kept for inspection under another name, out of the way of the steps to come.
    if jax.process_index() == 0:
      for step in unreadable:
        src = pathlib.Path(mngr.directory) / str(step)
        dst = src.with_name(f"{step}.unreadable")
        shutil.rmtree(dst, ignore_errors=True)
        src.rename(dst)
        log.warning("moved the unreadable step %d to %s", step, dst)
    mngr.reload()
  return found


def _step_dirs(checkpoints: pathlib.Path) -> list[pathlib.Path]:
  steps = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()]
  return sorted(steps, key=lambda p: int(p.name), reverse=True)


def _read_step(step_dir: pathlib.Path) -> tuple[BertConfig, dict]:
  meta = json.loads((step_dir / "meta" / "metadata").read_text()) if (
      step_dir / "meta" / "metadata").exists() else None
  if meta is None:
    raise CheckpointError(f"{step_dir}: no meta item (expected {step_dir}/meta/metadata)")
  state = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())
  return BertConfig.from_dict(meta["model_config"]), state["params"]


def load_model(path: str | pathlib.Path) -> tuple[BertConfig, dict]:
  """(config, params) from an exported model directory, a training step directory, or a
  training workdir (its newest readable step). params is the full tree of the task model."""
  path = pathlib.Path(path)
  if (path / "config.json").exists() and (path / "params").is_dir():
    config = BertConfig.from_json((path / "config.json").read_text())
    return config, ocp.StandardCheckpointer().restore((path / "params").absolute())
  if (path / "state").is_dir():
    return _read_step(path)
  checkpoints = path / CHECKPOINT_DIR
  if checkpoints.is_dir():
    for step_dir in _step_dirs(checkpoints):
      try:
        return _read_step(step_dir)
      except Exception as e:  # noqa: BLE001
        log.warning("skipping unreadable checkpoint %s (%s)", step_dir, e)
  raise CheckpointError(
      f"{path}: not a bert_jax model (expected config.json + params/, a checkpoint step "
      f"directory with state/ and meta/, or a workdir with {CHECKPOINT_DIR}/<step>/)")


def save_model(directory: str | pathlib.Path, config: BertConfig, params: Any,
               tokenizer_path: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes config.json + params/ (+ the tokenizer file) to `directory`, atomically: a
  failure leaves an existing directory untouched."""
  directory = pathlib.Path(directory).absolute()
  with replacing_dir(directory) as tmp:
    (tmp / "config.json").write_text(config.to_json())
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", jax.device_get(params))
    ckptr.wait_until_finished()
    if tokenizer_path is not None:
      shutil.copy2(tokenizer_path, tmp / pathlib.Path(tokenizer_path).name)
  return directory
