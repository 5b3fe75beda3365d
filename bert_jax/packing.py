"""Sequence packing: several examples per row, so that short texts stop paying for padding.

A packed batch has a fixed number of rows R of length T and at most K examples per row (static
shapes: a run compiles once). Each example keeps its own tokens, [CLS] and token types; besides
the usual keys a packed batch carries

  input_mask     [R, T] int32  0 = padding, k + 1 = the row's k-th example (`> 0` is the old mask)
  position_ids   [R, T] int32  positions restarting at 0 at each example
  cls_positions  [R, K] int32  where each example starts (its [CLS]); 0 in empty slots
  example_mask   [R, K] float32  1 = a real example in that slot
  <per-example>  [R, K]        labels etc., one per slot (0 in empty slots)

and the model then attends block-diagonally (no example sees another, `model.BertModel`) and
gathers the pooled [CLS] output of every slot. Losses divide by the examples, not the rows, so a
packed batch of the same examples gives the same loss and gradients as the padded one.

The packer is best-fit decreasing: the examples from the longest down, each into the fullest row
it still fits (a new row when none has room). It runs on whole length groups at once, so its cost
is O(examples + distinct lengths x T), fast enough to pack every batch of a fine-tuning run at
setup and chunks of 64k pretraining instances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bert_jax.errors import ConfigError

EXAMPLE_KEYS = ("cls_positions", "example_mask")  # [R, K] keys every packed batch has
PACKED_INPUTS = ("position_ids", "cls_positions")  # extra model inputs of a packed batch


def pack(lengths: Sequence[int] | np.ndarray, row_length: int, max_per_row: int = 0
         ) -> list[list[int]]:
  """Best-fit-decreasing packing: lengths [N] -> rows, each a list of example indices (in the
  order they sit in the row). `max_per_row` caps the examples of a row (0 = no cap). The result
  depends on the lengths only (every process computes the same rows)."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_length):
    bad = int(np.flatnonzero((lengths < 1) | (lengths > row_length))[0])
    raise ValueError(f"example {bad} has length {int(lengths[bad])}, outside 1..{row_length}")
  cap = max_per_row or row_length
  rows: list[list[int]] = []
  # rooms[r]: rows with r free positions that may take another example.
  rooms: list[list[int]] = [[] for _ in range(row_length + 1)]
  order = np.argsort(-lengths, kind="stable")
  sorted_lengths = lengths[order]
  cuts = np.flatnonzero(np.diff(sorted_lengths)) + 1
  for group in np.split(order, cuts):
    if not group.size:
      continue
    size = int(lengths[group[0]])
    items = group.tolist()
    room = size  # the fullest rows that still fit come first
    while items and room <= row_length:
      open_rows = rooms[room]
      if not open_rows:
        room += 1
        continue
      n = min(len(open_rows), len(items))
      taken, rooms[room] = open_rows[-n:], open_rows[:-n]
      for r, i in zip(taken, items[:n], strict=True):
        rows[r].append(i)
        if room > size and len(rows[r]) < cap:
          rooms[room - size].append(r)
      items = items[n:]
      if room - size >= size and rooms[room - size]:
        room -= size  # those rows can take another example of this length
    per_row = min(cap, row_length // size)  # no open row fits: new rows, as full as they go
    for j in range(0, len(items), per_row):
      rows.append(items[j:j + per_row])
      room = row_length - size * len(rows[-1])
      if room and len(rows[-1]) < cap:
        rooms[room].append(len(rows) - 1)
  return rows


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each example of a packed batch went: its row, slot, first position and length."""

  row: np.ndarray     # [N] int
  slot: np.ndarray    # [N] int
  start: np.ndarray   # [N] int
  length: np.ndarray  # [N] int
  num_rows: int
  max_per_row: int

  @classmethod
  def of(cls, rows: list[list[int]], lengths: np.ndarray, num_rows: int | None = None,
         max_per_row: int | None = None) -> Layout:
    n = sum(len(r) for r in rows)
    row, slot, start, length = (np.zeros(n, np.int64) for _ in range(4))
    for r, members in enumerate(rows):
      offset = 0
      for s, i in enumerate(members):
        row[i], slot[i], start[i], length[i] = r, s, offset, lengths[i]
        offset += int(lengths[i])
    widest = max((len(r) for r in rows), default=1)
    num_rows = len(rows) if num_rows is None else num_rows
    max_per_row = widest if max_per_row is None else max_per_row
    if len(rows) > num_rows or widest > max_per_row:
      raise ValueError(f"{len(rows)} rows of up to {widest} examples do not fit the packed "
                       f"shape [{num_rows}, {max_per_row}]")
    return cls(row, slot, start, length, num_rows, max_per_row)

  def gather(self, per_slot: np.ndarray) -> np.ndarray:
    """[R, K, ...] outputs of the packed batch -> [N, ...] per example, in example order."""
    return np.asarray(per_slot)[self.row, self.slot]

  def token_map(self, row_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every real token of the packed batch, in example order: its example, its position within
    the example, and its index in the packed batch's [num_rows * row_length] flat tokens."""
    owner = np.repeat(np.arange(self.length.size), self.length)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(self.length) - self.length, self.length)
    return owner, pos, self.row[owner] * row_length + self.start[owner] + pos

  def unpack(self, per_token: np.ndarray, fill: float = 0) -> np.ndarray:
    """[R, T, ...] per-token outputs of the packed batch -> [N, T, ...] as the padded batch
    lays them out: each example's tokens from position 0, `fill` after its length."""
    per_token = np.asarray(per_token)
    r, t, *rest = per_token.shape
    owner, pos, flat = self.token_map(t)
    out = np.full((self.length.size, t, *rest), fill, per_token.dtype)
    out[owner, pos] = per_token.reshape(r * t, *rest)[flat]
    return out


def packed_features(features: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
  """Padded features of N examples -> one packed batch laid out by `layout`.

  Keys of shape [N, T] (tokens; each example's first `layout.length[i]` positions are real) are
  moved into the rows; keys of shape [N] (labels) go into their example's slot. `input_mask`
  becomes the example numbers; position_ids, cls_positions and example_mask are added."""
  n, t = features["input_ids"].shape
  r, k = layout.num_rows, layout.max_per_row
  owner, pos, flat = layout.token_map(t)
  out: dict[str, np.ndarray] = {}
  for key, value in features.items():
    value = np.asarray(value)
    if value.shape[:2] == (n, t):
      packed = np.zeros((r * t, *value.shape[2:]), value.dtype)
      packed[flat] = value[owner, pos]
      out[key] = packed.reshape(r, t, *value.shape[2:])
    elif value.shape[:1] == (n,):
      packed = np.zeros((r, k, *value.shape[1:]), value.dtype)
      packed[layout.row, layout.slot] = value
      out[key] = packed
    else:
      raise ValueError(f"feature {key!r} has shape {value.shape}: expected [{n}, {t}] or [{n}]")
  mask = np.zeros(r * t, np.int32)
  mask[flat] = layout.slot[owner] + 1
  positions = np.zeros(r * t, np.int32)
  positions[flat] = pos
  out["input_mask"] = mask.reshape(r, t)
  out["position_ids"] = positions.reshape(r, t)
  out["cls_positions"] = np.zeros((r, k), np.int32)
  out["cls_positions"][layout.row, layout.slot] = layout.start
  out["example_mask"] = np.zeros((r, k), np.float32)
  out["example_mask"][layout.row, layout.slot] = 1.0
  return out


def fill_rate(lengths: np.ndarray, num_rows: int, row_length: int) -> float:
  """Real tokens / (rows x row length)."""
  return float(np.sum(lengths)) / max(num_rows * row_length, 1)


def check_examples_per_row(name: str, value: int, row_length: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= row_length:
    raise ConfigError(f"{name}={value!r}: expected 0 (no cap) or a cap of examples per packed "
                      f"row between 1 and the row length {row_length}")


class BatchPacker:
  """Packs batches of N examples (chosen by index from padded `features`) into one fixed shape
  [num_rows, row_length] with up to `max_per_row` examples per row, set by `plan` from every
  batch a run will see: the run then compiles its step once. `features` must hold input_mask
  (1 = real token) to give the lengths."""

  def __init__(self, features: dict[str, np.ndarray], max_per_row: int = 0):
    self.features = features
    self.lengths = np.asarray(features["input_mask"]).sum(1)
    self.row_length = int(features["input_mask"].shape[1])
    self.cap = max_per_row
    self.num_rows = self.max_per_row = 0
    self.fill = 0.0

  def plan(self, batches: Sequence[np.ndarray], multiple: int = 1) -> None:
    """Sizes the packed shape for `batches` (arrays of example indices): the most rows any of
    them needs, rounded up to a multiple of `multiple` (devices x micro-batches), and the most
    examples any row holds."""
    rows = widest = 0
    real = 0
    for examples in batches:
      packed = pack(self.lengths[examples], self.row_length, self.cap)
      rows = max(rows, len(packed))
      widest = max(widest, max(map(len, packed)))
      real += int(self.lengths[examples].sum())
    self.num_rows = -(-rows // multiple) * multiple
    self.max_per_row = max(widest, 1)
    self.fill = fill_rate(real, self.num_rows * max(len(batches), 1), self.row_length)

  def __call__(self, examples: np.ndarray) -> dict[str, np.ndarray]:
    lengths = self.lengths[examples]
    layout = Layout.of(pack(lengths, self.row_length, self.cap), lengths, self.num_rows,
                       self.max_per_row)
    return packed_features({k: v[examples] for k, v in self.features.items()}, layout)


def pack_all(features: dict[str, np.ndarray], max_per_row: int = 0
             ) -> tuple[dict[str, np.ndarray], Layout]:
  """Every example of padded `features` packed into as few rows as fit (evaluation and
  prediction sets). Returns the packed rows and the layout that maps outputs back."""
  lengths = np.asarray(features["input_mask"]).sum(1)
  rows = pack(lengths, int(features["input_mask"].shape[1]), max_per_row)
  layout = Layout.of(rows, lengths)
  return packed_features(features, layout), layout
