"""Sentence(-pair) classification and regression: TSV/CSV/JSONL -> fixed-shape features; metrics.

  examples, labels = read_examples("train.tsv", text_a="sentence", label="label")
  dev, _ = read_examples("dev.tsv", text_a="sentence", label="label", labels=labels)
  features = convert_examples(examples, tok, 128, labels)
  compute_metrics(predicted_ids, features["label"])  # {"accuracy", "f1", "mcc"}

Columns are named (with a header row) or 0-based indexes ("0" counts as an index). TSV is
GLUE's: tab-separated, no quoting, one row per line. Bad input raises `DataError` naming the file
and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from bert_jax import files
from bert_jax.data.errors import DataError
from bert_jax.data.text import iter_lines

log = logging.getLogger(__name__)

Column = str | int
FORMATS = ("tsv", "csv", "jsonl")
# A first row holding one of these (any case) is a header when `header` is not given: the
# column names of the GLUE tasks and the usual ones.
HEADER_NAMES = frozenset({
    "label", "labels", "gold_label", "score", "quality", "is_duplicate", "index", "id", "idx",
    "sentence", "sentence1", "sentence2", "question", "question1", "question2", "text",
    "text_a", "text_b", "premise", "hypothesis", "#1 string", "#2 string"})


@dataclasses.dataclass(frozen=True)
class Example:
  """One row: its id, text(s) and label (None when the file has no label column)."""

  guid: str  # the id column's value, else "<file name>:<line>"
  text_a: str
  text_b: str | None
  label: str | float | None
  line: int  # 1-based line of the row in its file


# ----------------------------------------------------------------------------- reading rows


def _format(path: pathlib.Path, fmt: str | None) -> str:
  fmt = (fmt or path.suffix.lstrip(".")).lower()
  if fmt not in FORMATS:
    raise DataError(f"{path}: unknown format {fmt!r}; give one of {FORMATS} (or name the file "
                    ".tsv, .csv or .jsonl)")
  return fmt


def _rows(path: pathlib.Path, fmt: str) -> Iterator[tuple[int, Any]]:
  """(line number, row) for every non-blank row: a list of cells, or a dict for JSONL."""
  if fmt == "jsonl":
    for n, line in iter_lines(path):
      if line.strip():
        yield n, _json_row(path, n, line)
    return
  lines = (line for _, line in iter_lines(path, keep_newline=True))  # bad bytes: file:line
  if fmt == "tsv":
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(lines)
  try:
    for row in reader:
      if any(cell.strip() for cell in row):
        yield reader.line_num, row
  except csv.Error as e:
    raise DataError(f"{path}:{reader.line_num}: {e}") from e


def _json_row(path: pathlib.Path, n: int, line: str) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{n}: malformed JSON at column {e.colno}: {e.msg}") from e
  if not isinstance(row, dict):
    raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
  return row


def _is_header(first: list[str], header: bool | int | None) -> bool:
  if header is not None and header != -1:
    return bool(header)
  return any(cell.strip().lower() in HEADER_NAMES for cell in first)


def _column_index(col: Column, names: list[str] | None, path: pathlib.Path) -> int:
  if isinstance(col, int) or str(col).strip().lstrip("-").isdigit():
    return int(col)
  if names is None:
    raise DataError(f"{path}: column {col!r} is a name but the file has no header row; "
                    "use a 0-based column index")
  if col not in names:
    raise DataError(f"{path}: no column {col!r} in the header {names}")
  return names.index(col)


def _tabular(path: pathlib.Path, fmt: str, columns: dict[str, Column | None],
             header: bool | int | None) -> Iterator[tuple[int, dict[str, str | None]]]:
  """(line, {field: cell}) per data row of a TSV/CSV file, checking the column count."""
  rows = _rows(path, fmt)
  first = next(rows, None)
  if first is None:
    return
  names = first[1] if _is_header(first[1], header) else None
  index = {k: _column_index(c, names, path) for k, c in columns.items() if c not in (None, "")}
  width = len(first[1])
  if max(index.values(), default=0) >= width:
    raise DataError(f"{path}: column index {max(index.values())} is out of range: rows have "
                    f"{width} columns")
  for line, row in ([] if names else [first]) + list(rows):
    if len(row) != width:
      raise DataError(f"{path}:{line}: expected {width} columns, got {len(row)}")
    yield line, {k: row[index[k]] if k in index else None for k in columns}


def _jsonl(path: pathlib.Path, columns: dict[str, Column | None]
           ) -> Iterator[tuple[int, dict[str, Any]]]:
  for line, row in _rows(path, "jsonl"):
    out = {}
    for k, col in columns.items():
      if col in (None, ""):
        out[k] = None
      elif str(col) not in row:
        raise DataError(f"{path}:{line}: no key {str(col)!r} (keys: {sorted(row)})")
      else:
        out[k] = row[str(col)]
    yield line, out


# ----------------------------------------------------------------------------- examples


def _label_key(labels: Sequence[str]):
  """Sort labels as numbers when they all are integers ("2" before "10"), else as text."""
  if all(x.lstrip("-").isdigit() for x in labels):
    return lambda x: (int(x), x)
  return lambda x: x


def _parse_label(value: Any, column: Column, regression: bool, where: str, first: bool
                 ) -> str | float:
  """The label of a row of a labelled file: every row needs one (a training example without a
  label would train on class -1; a regression label must be a finite number)."""
  if value is None or not str(value).strip():
    raise DataError(f"{where}: no label in column {column!r} (every row of a labelled file "
                    "needs one)")
  if not regression:
    return str(value).strip()
  try:
    number = float(value)
  except (TypeError, ValueError):
    hint = " (if this row is a header, set data.header=1)" if first else ""
    raise DataError(f"{where}: regression label {value!r} is not a number{hint}") from None
  if not np.isfinite(number):
    raise DataError(f"{where}: regression label {value!r} is not a finite number")
  return number


def _warn_if_header(examples: list[Example], path: pathlib.Path) -> None:
  """A first row whose label occurs nowhere else in the file is likely a header whose column
  names HEADER_NAMES does not know; it was read as an example."""
  first = examples[0]
  if len(examples) > 2 and all(ex.label != first.label for ex in examples[1:]):
    log.warning("%s:%d: label %r occurs on this first row only: if the row is a header, set "
                "data.header=1 (headers are detected by known column names only)", path,
                first.line, first.label)


def read_examples(path: str | pathlib.Path, text_a: Column = 0, text_b: Column | None = None,
                  label: Column | None = 1, labels: Sequence[str] | None = None,
                  fmt: str | None = None, header: bool | int | None = None,
                  regression: bool = False, id_column: Column | None = None
                  ) -> tuple[list[Example], list[str]]:
  """Reads a TSV, CSV or JSONL file -> (examples, label list).

  Columns are header names (JSONL: keys) or 0-based indexes; `text_b=None` reads single
  sentences, `label=None` unlabelled rows (for prediction). `labels`: the known label set (from
  the training file); a label outside it raises DataError. Without it, the labels are inferred:
  the distinct labels, sorted (as integers when all are). `header=None` (or -1) detects a header
  row by its column names (see HEADER_NAMES). Regression reads float labels; the list is [].
  A URL (gs://...) is read through a local copy (messages name the URL).
  """
  if not files.path(path).is_file():
    raise DataError(f"{path}: no such file")
  path = pathlib.Path(files.local(path))
  fmt = _format(path, fmt)
  columns = {"a": text_a, "b": text_b, "label": label, "id": id_column}
  rows = _jsonl(path, columns) if fmt == "jsonl" else _tabular(path, fmt, columns, header)
  examples = []
  for line, r in rows:
    where = f"{path}:{line}"
    if r["a"] is None:
      raise DataError(f"{where}: no text in column {text_a!r}")
    guid = str(r["id"]) if r["id"] is not None else f"{path.name}:{line}"
    b = None if text_b in (None, "") else str(r["b"] or "")
    y = None if label in (None, "") else _parse_label(r["label"], label, regression, where,
                                                      not examples)
    examples.append(Example(guid, str(r["a"]), b, y, line))
  if not examples:
    raise DataError(f"{path}: no examples")
  if fmt != "jsonl" and header in (None, -1) and label not in (None, "") and not regression:
    _warn_if_header(examples, path)
  return examples, _label_list(examples, labels, regression, path)


def _label_list(examples: list[Example], labels: Sequence[str] | None, regression: bool,
                path: pathlib.Path) -> list[str]:
  if regression:
    return []
  if labels is None:
    seen = {ex.label for ex in examples if ex.label is not None}
    return sorted(seen, key=_label_key(list(seen)))
  known = [str(x) for x in labels]
  for ex in examples:
    if ex.label is not None and ex.label not in known:
      raise DataError(f"{path}:{ex.line}: label {ex.label!r} was not seen in training; known "
                      f"labels: {known}")
  return known


# ----------------------------------------------------------------------------- features


class Tokenizer(Protocol):
  cls_id: int
  sep_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
  """Drops tokens from the end of the longer sequence (b on ties) until both fit together."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_tokens:
    (a if len(a) > len(b) else b).pop()
  return a, b


def encode_example(ex: Example, tok: Tokenizer, max_seq_length: int
                   ) -> tuple[list[int], list[int]]:
  """-> (token ids, segment ids) of `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`, unpadded."""
  a = tok.encode(ex.text_a)
  if ex.text_b is None:
    a = a[:max_seq_length - 2]
    return [tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)
  a, b = truncate_pair(a, tok.encode(ex.text_b), max_seq_length - 3)
  return [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)


def convert_examples(examples: Sequence[Example], tok: Tokenizer, max_seq_length: int,
                     label_list: Sequence[str], regression: bool = False
                     ) -> dict[str, np.ndarray]:
  """Examples -> {"input_ids", "input_mask", "segment_ids": [N, T] int32, "label": [N],
  "example_index": [N] int32}.

  label: int32 index into `label_list` (-1 when unlabelled), or float32 for regression (NaN
  when unlabelled). example_index: the row in `examples`, to map predictions back to `guid`s.
  """
  n = len(examples)
  ids = np.full((n, max_seq_length), tok.pad_id, np.int32)
  segments = np.zeros((n, max_seq_length), np.int32)
  mask = np.zeros((n, max_seq_length), np.int32)
  index = {x: i for i, x in enumerate(label_list)}
  labels = np.full(n, np.nan if regression else -1, np.float32 if regression else np.int32)
  for i, ex in enumerate(examples):
    tokens, seg = encode_example(ex, tok, max_seq_length)
    ids[i, :len(tokens)], segments[i, :len(seg)], mask[i, :len(tokens)] = tokens, seg, 1
    if ex.label is not None:
      if not regression and ex.label not in index:
        raise DataError(f"example {ex.guid} (line {ex.line}): label {ex.label!r} is not in "
                        f"the label list {list(label_list)}")
      labels[i] = ex.label if regression else index[ex.label]
  return {"input_ids": ids, "input_mask": mask, "segment_ids": segments, "label": labels,
          "example_index": np.arange(n, dtype=np.int32)}


# ----------------------------------------------------------------------------- metrics


def _confusion(preds: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """[k, k] counts, rows = true label, columns = prediction."""
  return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k).astype(np.float64)


def f1_from_confusion(c: np.ndarray) -> float:
  """Binary (2 classes, positive = 1): F1 of class 1. More classes: the unweighted mean of the
  per-class F1 over the classes that occur in the labels or the predictions."""
  tp, true, pred = np.diag(c), c.sum(1), c.sum(0)
  denom = true + pred
  f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
  if len(c) == 2:
    return float(f1[1])
  return float(f1[denom > 0].mean()) if (denom > 0).any() else 0.0


def matthews_from_confusion(c: np.ndarray) -> float:
  """Matthews correlation (its multi-class form, R_K); 0 when undefined."""
  t, p, s = c.sum(1), c.sum(0), c.sum()
  cov = np.trace(c) * s - p @ t
  denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float(cov / denom) if denom > 0 else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties get the mean of their ranks."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denom) if denom > 0 else 0.0


def compute_metrics(preds: np.ndarray, labels: np.ndarray, is_regression: bool = False,
                    num_labels: int | None = None) -> dict[str, float]:
  """Classification: preds [N] class ids or [N, C] logits -> accuracy, f1, mcc.
  Regression: preds [N] or [N, 1] -> pearson, spearman, mse. Unlabelled rows (label -1 / NaN)
  are left out."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  if is_regression:
    preds = preds.reshape(len(preds)).astype(np.float64)
    keep = ~np.isnan(labels)
    p, y = preds[keep], labels[keep].astype(np.float64)
    return {"pearson": pearson(p, y), "spearman": pearson(rankdata(p), rankdata(y)),
            "mse": float(np.mean((p - y) ** 2))}
  if preds.ndim == 2:
    num_labels = num_labels or preds.shape[1]
    preds = preds.argmax(-1)
  keep = labels >= 0
  p, y = preds[keep].astype(np.int64), labels[keep].astype(np.int64)
  k = max(num_labels or 0, int(p.max(initial=0)) + 1, int(y.max(initial=0)) + 1, 2)
  c = _confusion(p, y, k)
  return {"accuracy": float(np.mean(p == y)), "f1": f1_from_confusion(c),
          "mcc": matthews_from_confusion(c)}
