"""The pretraining loader: global batches of prepared instances, each process reading its slice.

Built on grain (DESIGN.md): `MapDataset.range(n).shuffle(seed).repeat().batch(global_batch)` gives
the global order of instance indices, shuffled afresh each epoch from (seed, epoch) and the same
on every process; a batch's indices are cheap, and process p reads only rows
[p * local, (p + 1) * local) of it from the memory-mapped shards. The iterator's state is the
number of global batches consumed: saved in checkpoints, it resumes exactly. Batches are prepared
ahead in grain's background threads.

With dynamic masking (instances stored unmasked) each instance is masked here from a key of
(seed, epoch, instance index): fresh masks each epoch, identical for any process count. The masks
of a row come from a counter-based stream of its key alone, and the whole batch is masked at once
(pretraining.mask_batch), with no Python loop over rows.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import numpy as np

from bert_jax.data import pretraining
from bert_jax.data.errors import DataError

log = logging.getLogger(__name__)

# What the train step receives.
BATCH_DTYPES = {"input_ids": np.int32, "input_mask": np.int32, "segment_ids": np.int32,
                "masked_lm_positions": np.int32, "masked_lm_ids": np.int32,
                "masked_lm_weights": np.float32, "next_sentence_labels": np.int32}
# ... and of packed rows (bert_jax.packing), besides those.
PACKED_DTYPES = {"position_ids": np.int32, "cls_positions": np.int32, "example_mask": np.float32}


class Instances:
  """The instances of one split, memory-mapped; `rows(indices)` reads them in any order."""

  def __init__(self, data_dir: str | pathlib.Path, split: str):
    self.data_dir = pathlib.Path(data_dir)
    self.manifest = pretraining.read_manifest(self.data_dir)
    splits = self.manifest["splits"]
    if split not in splits:
      raise DataError(f"{self.data_dir / pretraining.MANIFEST}: no {split!r} split (has "
                      f"{sorted(splits)})")
    shards = splits[split]["shards"]
    self.features = list(self.manifest["features"])
    self.arrays = {k: [self._open(s["name"], k, s["num_instances"]) for s in shards]
                   for k in self.features}
    sizes = [s["num_instances"] for s in shards]
    self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.num_instances = int(self.starts[-1])

  def _open(self, shard: str, feature: str, n: int) -> np.ndarray:
    path = self.data_dir / f"{shard}.{feature}.npy"
    try:
      a = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot read ({e})") from None
    if len(a) != n:
      raise DataError(f"{path}: {len(a)} rows, the manifest says {n}")
    return a

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    shard = np.searchsorted(self.starts, indices, side="right") - 1
    out = {}
    for k in self.features:
      first = self.arrays[k][0]
      res = np.empty((len(indices), *first.shape[1:]), first.dtype)
      for s in np.unique(shard):
        sel = shard == s
        local = indices[sel] - self.starts[s]
        order = np.argsort(local)  # memory-mapped reads in file order
        res[np.flatnonzero(sel)[order]] = self.arrays[k][s][local[order]]
      out[k] = res
    return out


class PretrainingLoader:
  """Iterates over dicts of fixed-shape numpy arrays (this process's rows of each global batch).

  Args:
    data_dir: a directory made by bert_jax.data.pretraining.
    split: "train" or "eval".
    global_batch_size: rows per step over all processes (divisible by process_count).
    seed: the shuffle (and dynamic masking) seed.
    process_index, process_count: which slice this process reads.
    shuffle: shuffle each epoch (train) or keep file order (eval).
    num_epochs: None repeats forever; the remainder of the last epoch is dropped.
    prefetch: batches prepared ahead in background threads.
  """

  def __init__(self, data_dir: str | pathlib.Path, split: str, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, num_epochs: int | None = None, prefetch: int = 4,
               threads: int = 2):
    self.instances = Instances(data_dir, split)
    self.manifest = self.instances.manifest
    n = self.instances.num_instances
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                       f"{process_count} processes")
    if n < global_batch_size:
      raise DataError(f"{data_dir}: the {split} split holds {n} instances, fewer than one "
                      f"global batch of {global_batch_size}")
    self.global_batch_size, self.seed = global_batch_size, seed
    self.local = global_batch_size // process_count
    self.offset = process_index * self.local
    self.dynamic = bool(self.manifest["dynamic_masking"])
    self.dtypes = BATCH_DTYPES | (PACKED_DTYPES if self.manifest.get("packed") else {})
    if self.dynamic:
      d = pathlib.Path(data_dir)
      ids = self.manifest["special_ids"]
      self.masking = pretraining.MaskingSpec.create(
          list(ids.values()), np.load(d / pretraining.WORD_STARTS), ids["mask"], ids["unk"],
          masked_lm_prob=self.manifest["masked_lm_prob"],
          max_predictions=self.manifest["max_predictions_per_seq"],
          whole_word=self.manifest["whole_word_mask"])
      self.pad_id = ids["pad"]
    ds = grain.MapDataset.range(n)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(global_batch_size, drop_remainder=True)
    self._dataset = ds.map_with_index(self._load).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    self._iterator = None
    self._pending_state: dict[str, Any] | None = None

  def __len__(self) -> int:
    """Global batches per epoch."""
    return self.instances.num_instances // self.global_batch_size

  def _load(self, batch_index: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    mine = np.asarray(indices[self.offset:self.offset + self.local], np.int64)
    rows = self.instances.rows(mine)
    if self.dynamic:
      first = batch_index * self.global_batch_size + self.offset
      epochs = (first + np.arange(len(mine))) // self.instances.num_instances
      keys = pretraining.masking_keys(self.seed, epochs, mine)
      real = (rows["input_mask"] > 0).sum(1)  # packed rows number their instances
      rows.update(pretraining.mask_batch(rows["input_ids"], real, self.masking, keys,
                                         self.pad_id))
    return {k: np.ascontiguousarray(rows[k], dtype) for k, dtype in self.dtypes.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = iter(self._dataset)
      if self._pending_state is not None:
        self._iterator.set_state(self._pending_state)
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """{"batches": global batches consumed, "epoch", "global_batch_size", "seed"} (JSON)."""
    if self._iterator is not None:
      consumed = int(self._iterator.get_state()["next_index"])
    else:
      consumed = int((self._pending_state or {}).get("next_index", 0))
    return {"batches": consumed, "global_batch_size": self.global_batch_size, "seed": self.seed,
            "epoch": consumed * self.global_batch_size // self.instances.num_instances}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues after `state["batches"]` global batches (call before iterating)."""
    batches = int(state["batches"])
    if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size or (
        state.get("seed", self.seed) != self.seed):
      rows = batches * int(state["global_batch_size"])
      log.warning("the loader state was saved with global batch %s and seed %s, now %d and %d: "
                  "continuing after the same number of instances (%d), not the same order",
                  state.get("global_batch_size"), state.get("seed"), self.global_batch_size,
                  self.seed, rows)
      batches = rows // self.global_batch_size
    self._pending_state = {"next_index": batches}
    if self._iterator is not None:
      self._iterator.set_state(self._pending_state)
