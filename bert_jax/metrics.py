"""Metric logs: metrics.jsonl and TensorBoard event files in the workdir (process 0 only).

The workdir may be a URL (gs://...): an object cannot be appended to, so there the JSONL file is
kept in memory (with what an earlier run wrote) and uploaded whole, at most every
`upload_seconds` and on close; TensorBoard writes gs:// itself (tensorboardX through
google-cloud-storage).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import jax
import numpy as np

from bert_jax import files

_writers = itertools.count()


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class MetricWriter:
  """Appends {"step", "time", "split", ...} records to <workdir>/metrics.jsonl and writes the
  same scalars as TensorBoard events under <workdir>/tensorboard/<split>."""

  def __init__(self, workdir: files.PathLike, upload_seconds: float = 10.0,
               start_step: int | None = None):
    """start_step: the step the run starts from (its checkpoint's); records an earlier run
    wrote after it are dropped from metrics.jsonl, since the steps are trained again (a resume
    after a kill would otherwise log them twice), and so is a line cut short by the kill;
    TensorBoard is told to hide the earlier events past it."""
    self.enabled = jax.process_index() == 0
    self._workdir = files.path(workdir)
    self._remote = files.is_url(self._workdir)
    self._upload_seconds, self._uploaded = upload_seconds, 0.0
    self._tb: dict[str, Any] = {}
    self._start_step = start_step
    if not self.enabled:
      return
    self._workdir.mkdir(parents=True, exist_ok=True)
    jsonl = self._workdir / "metrics.jsonl"
    lines = jsonl.read_text().splitlines(keepends=True) if jsonl.exists() else []
    if start_step is not None:
      kept = [line for line in lines if (s := _step_of(line)) is not None and s <= start_step]
      if kept != lines:
        lines = kept
        if not self._remote:
          tmp = jsonl.with_name(f".metrics.jsonl.{os.getpid()}.tmp")
          tmp.write_text("".join(lines))
          tmp.replace(jsonl)
    if self._remote:
      self._lines = lines
    else:
      self._jsonl = open(jsonl, "a", encoding="utf-8")  # noqa: SIM115

  def _board(self, split: str):
    if split not in self._tb:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides what earlier event files hold from the first re-trained
      # step on. The suffix keeps this writer's file apart from one written in the same second
      # (tensorboardX names files by the second and the host, and would overwrite it).
      self._tb[split] = SummaryWriter(
          os.fspath(self._workdir / "tensorboard" / split),
          purge_step=None if self._start_step is None else self._start_step + 1,
          filename_suffix=f".{os.getpid()}.{next(_writers)}")
    return self._tb[split]

  def _upload(self) -> None:
    (self._workdir / "metrics.jsonl").write_text("".join(self._lines))
    self._uploaded = time.monotonic()

  def write(self, step: int, scalars: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {"step": int(step), "time": round(time.time(), 3), "split": split, **values}
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._uploaded >= self._upload_seconds:
        self._upload()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    board = self._board(split)
    for k, v in values.items():
      board.add_scalar(k, v, int(step))

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._remote:
      self._upload()
    else:
      self._jsonl.close()
    for board in self._tb.values():
      board.close()
