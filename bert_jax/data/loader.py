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


def _row_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
  """The shape of one instance of each stored feature, as the manifest describes the data."""
  t, p = int(manifest["max_seq_length"]), int(manifest["max_predictions_per_seq"])
  k = (int(manifest["max_examples_per_row"]),) if manifest.get("packed") else ()
  return {"input_ids": (t,), "input_mask": (t,), "segment_ids": (t,), "position_ids": (t,),
          "masked_lm_positions": (p,), "masked_lm_ids": (p,), "masked_lm_weights": (p,),
          "next_sentence_labels": k, "cls_positions": k, "example_mask": k}


class Instances:
  """The instances of one split, memory-mapped; `rows(indices)` reads them in any order. Every
  shard is opened and checked against the manifest (rows, instance shape) here, up front."""

  def __init__(self, data_dir: str | pathlib.Path, split: str):
    self.data_dir = pathlib.Path(data_dir)
    self.manifest = pretraining.read_manifest(self.data_dir)
    splits = self.manifest["splits"]
    if split not in splits:
      raise DataError(f"{self.data_dir / pretraining.MANIFEST}: no {split!r} split (has "
                      f"{sorted(splits)})")
    shards = splits[split]["shards"]
    self.features = list(self.manifest["features"])
    self._shapes = _row_shapes(self.manifest)
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
    want = self._shapes.get(feature)
    if want is not None and a.shape[1:] != want:
      raise DataError(f"{path}: instances of shape {a.shape[1:]}, the manifest says {want} "
                      f"(max_seq_length {self.manifest['max_seq_length']}, max_predictions_per_"
                      f"seq {self.manifest['max_predictions_per_seq']})")
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
    num_epochs: None repeats forever; the remainder of the last epoch is dropped, unless
      `pad_remainder` (evaluation, one epoch): the last batch is then filled up with copies of
      an instance whose weights are 0 (masked_lm_weights, example_mask), so every instance
      counts exactly once and no padding does. Batches then carry `example_mask` ([B], or
      [B, K] for packed rows).
    prefetch: batches prepared ahead in background threads.
  """

  def __init__(self, data_dir: str | pathlib.Path, split: str, global_batch_size: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, num_epochs: int | None = None, prefetch: int = 4,
               threads: int = 2, pad_remainder: bool = False):
    self.instances = Instances(data_dir, split)
    self.manifest = self.instances.manifest
    n = self.instances.num_instances
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                       f"{process_count} processes")
    if pad_remainder and num_epochs != 1:
      raise ValueError("pad_remainder is for one pass over the data (num_epochs=1)")
    self.pad_remainder = pad_remainder
    if n < global_batch_size and not pad_remainder:
      raise DataError(f"{data_dir}: the {split} split holds {n} "
                      f"{'packed rows' if self.manifest.get('packed') else 'instances'}, fewer "
                      f"than one global batch of {global_batch_size}")
    self.global_batch_size, self.seed = global_batch_size, seed
    self.local = global_batch_size // process_count
    self.offset = process_index * self.local
    self.dynamic = bool(self.manifest["dynamic_masking"])
    self.dtypes = BATCH_DTYPES | (PACKED_DTYPES if self.manifest.get("packed") else {})
    if pad_remainder:
      self.dtypes = self.dtypes | {"example_mask": np.float32}
    if self.dynamic:
      ids = self.manifest["special_ids"]
      self.masking = pretraining.MaskingSpec.create(
          list(ids.values()), self._word_starts(), ids["mask"], ids["unk"],
          masked_lm_prob=self.manifest["masked_lm_prob"],
          max_predictions=self.manifest["max_predictions_per_seq"],
          whole_word=self.manifest["whole_word_mask"])
      self.pad_id = ids["pad"]
    ds = grain.MapDataset.range(n)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).batch(global_batch_size, drop_remainder=not pad_remainder)
    self._dataset = ds.map_with_index(self._load).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    self._iterator = None
    self._pending_state: dict[str, Any] | None = None

  def _word_starts(self) -> np.ndarray:
    """Which token ids start a word (whole-word masking), one per id of the vocabulary."""
    path = self.instances.data_dir / pretraining.WORD_STARTS
    try:
      starts = np.load(path)
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot read ({e})") from None
    if starts.shape != (self.manifest.get("vocab_size", len(starts)),):
      raise DataError(f"{path}: shape {starts.shape}, expected one entry per token id of the "
                      f"vocabulary ({self.manifest['vocab_size']}, the manifest's vocab_size)")
    return starts

  def __len__(self) -> int:
    """Global batches per epoch."""
    n, b = self.instances.num_instances, self.global_batch_size
    return -(-n // b) if self.pad_remainder else n // b

  def _load(self, batch_index: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    real = np.arange(self.global_batch_size) < len(indices)  # the rest: padding (the last batch)
    indices = np.pad(indices, (0, self.global_batch_size - len(indices)), mode="edge")
    mine, real = indices[self.offset:self.offset + self.local], real[self.offset:][:self.local]
    rows = self.instances.rows(mine)
    if self.dynamic:
      first = batch_index * self.global_batch_size + self.offset
      epochs = (first + np.arange(len(mine))) // self.instances.num_instances
      keys = pretraining.masking_keys(self.seed, epochs, mine)
      tokens = (rows["input_mask"] > 0).sum(1)  # packed rows number their instances
      rows.update(pretraining.mask_batch(rows["input_ids"], tokens, self.masking, keys,
                                         self.pad_id))
    if self.pad_remainder:
      rows["masked_lm_weights"] = rows["masked_lm_weights"] * real[:, None]
      mask = rows.get("example_mask", np.ones(len(mine), np.float32))
      rows["example_mask"] = mask * real.reshape(-1, *[1] * (np.ndim(mask) - 1))
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
      batches = rows // self.global_batch_size
      log.warning("the loader state was saved with global batch %s and seed %s, now %d and %d: "
                  "continuing at instance %d of the order (%d were consumed; %s)",
                  state.get("global_batch_size"), state.get("seed"), self.global_batch_size,
                  self.seed, batches * self.global_batch_size, rows,
                  "a new seed shuffles a new order" if state.get("seed", self.seed) != self.seed
                  else "the order is the same, so the instances between are seen again")
    self._pending_state = {"next_index": batches}
    if self._iterator is not None:
      self._iterator.set_state(self._pending_state)
