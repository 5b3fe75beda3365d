"""Metric logs: metrics.jsonl and TensorBoard event files in the workdir (process 0 only)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np


class MetricWriter:
  """Appends {"step", "time", "split", ...} records to <workdir>/metrics.jsonl and writes the
  same scalars as TensorBoard events under <workdir>/tensorboard/<split>."""

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self._workdir = pathlib.Path(workdir)
    self._tb: dict[str, Any] = {}
    if self.enabled:
      self._workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self._workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

  def _board(self, split: str):
    if split not in self._tb:
      from tensorboardX import SummaryWriter
      self._tb[split] = SummaryWriter(str(self._workdir / "tensorboard" / split))
    return self._tb[split]

  def write(self, step: int, scalars: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {"step": int(step), "time": round(time.time(), 3), "split": split, **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    board = self._board(split)
    for k, v in values.items():
      board.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      for board in self._tb.values():
        board.close()
