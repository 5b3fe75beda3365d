"""Raw text -> BERT pretraining instances, following the original BERT data recipe.

Input: UTF-8 text files, one sentence per line, a blank line between documents (a new file also
starts a new document). Output: a directory of memory-mappable .npy shards plus manifest.json,
written atomically (a failed run leaves an existing directory untouched):

    python -m bert_jax.data.pretraining --input_files 'corpus/*.txt' --tokenizer tok.model \\
        --output_dir data/seq128 --max_seq_length 128 --max_predictions_per_seq 20 --dupe_factor 5

The recipe (create_pretraining_data.py of google-research/bert): sentences of a document are packed
into chunks up to a target length (shorter, drawn uniformly, with probability short_seq_prob); a
chunk is cut at a random sentence into A and B, and B is replaced by text from a random other
document half of the time (next_sentence_labels 1 = random); the longer of A and B is truncated one
token at a time from a random end; [CLS] A [SEP] B [SEP]. Each of dupe_factor passes draws new pairs
and masks. Masking: 15% of the tokens (rounded, at least 1, at most max_predictions_per_seq) are
chosen among all but [CLS]/[SEP] ([UNK]s too); each chosen token becomes [MASK] 80%, a random token
10%, itself 10%. Whole-word masking chooses whole words (a word = a token that starts one, WordPiece
without "##", SentencePiece with "▁", a CJK character or punctuation mark, plus the tokens after it
that do not). With dynamic masking the instances are stored unmasked and the loader masks them
afresh each epoch. With --pack, rows hold several instances each (bert_jax.packing: positions
restart at each instance's [CLS], attention stays within an instance, one next-sentence label per
instance [rows, K]); the masked positions are then chosen per row, 15% of its real tokens, and the
manifest records the padding share with and without packing.

Differences from the original, on purpose: a chunk of one sentence is not always paired with a
random B (which skews the labels towards "random"): when the coin says "true next", the sentence is
cut at a random token into A and B; random replacement tokens never are special tokens;
instances are not shuffled on disk (the loader shuffles by seed and epoch); documents are split
into a train and an eval split before pairing (eval_fraction), so no eval text is trained on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bert_jax import cli, faults, packing
from bert_jax import files as storage  # `files` names the input files here
from bert_jax.data.errors import DataError
from bert_jax.data.text import check_files, expand_files, iter_lines
from bert_jax.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "bert_jax.pretraining/1"
FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")
STORED_DTYPES = {"input_ids": np.int32, "input_mask": np.int8, "segment_ids": np.int8,
                 "masked_lm_positions": np.int32, "masked_lm_ids": np.int32,
                 "masked_lm_weights": np.float32, "next_sentence_labels": np.int32,
                 "position_ids": np.int16, "cls_positions": np.int16, "example_mask": np.int8}
UNMASKED = ("input_ids", "input_mask", "segment_ids", "next_sentence_labels")
PACKED = ("position_ids", "cls_positions", "example_mask")  # the extra features of packed rows
# A packed row numbers its instances 1, 2, ... in input_mask (0 = padding), stored as int8.
MAX_EXAMPLES_PER_ROW = int(np.iinfo(STORED_DTYPES["input_mask"]).max)
MANIFEST = "manifest.json"
WORD_STARTS = "word_starts.npy"


def default_corpus_path() -> pathlib.Path:
  """The corpus that ships with the package (Shakespeare, public domain; see corpus/SOURCE.md)."""
  return pathlib.Path(__file__).resolve().parents[1] / "corpus" / "shakespeare.txt"


# ----------------------------------------------------------------------------- masking


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What masking needs to know about the vocabulary, and the masking options."""

  mask_id: int
  special: np.ndarray       # bool[vocab]: never chosen ([CLS], [SEP], [PAD], [MASK])
  word_starts: np.ndarray   # bool[vocab]: begins a word (whole-word masking)
  normal_ids: np.ndarray    # the ids a random replacement is drawn from (no special token)
  masked_lm_prob: float = 0.15
  max_predictions: int = 20
  whole_word: bool = False

  @classmethod
  def create(cls, special_ids: Sequence[int], word_starts: np.ndarray, mask_id: int,
             unk_id: int, **options: Any) -> MaskingSpec:
    """special_ids: the tokenizer's special tokens, never drawn as a random replacement; all
    but [UNK] (`unk_id`) are never chosen either: the original recipe masks an [UNK] as any
    other token (only [CLS] and [SEP] are no candidates; [PAD] and [MASK] occur in no text)."""
    special = np.zeros(len(word_starts), bool)
    special[list(special_ids)] = True
    replaceable = np.flatnonzero(~special)
    special[unk_id] = False
    return cls(mask_id, special, np.asarray(word_starts, bool), replaceable, **options)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (2^64 / the golden ratio)


def _mix(z: np.ndarray) -> np.ndarray:
  """splitmix64's output function on uint64 arrays (multiplications wrap)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def masking_keys(*parts: int | np.ndarray) -> np.ndarray:
  """One uint64 masking key per row from integer parts (scalars, or arrays [B] alike), e.g.
  (seed, epoch, instance index): each part is folded in with splitmix64."""
  parts = [np.atleast_1d(np.asarray(p, np.int64)).view(np.uint64) for p in parts]
  key = np.zeros(np.broadcast_shapes(*(p.shape for p in parts)), np.uint64)
  for p in parts:  # (arrays, not numpy scalars: their wrapping multiplications do not warn)
    key = _mix(key ^ _mix(p + _GOLDEN))
  return key


def _stream(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
  """The counters-th outputs of splitmix64 seeded with each row's key: [B] x [B or 1, C]."""
  return _mix(keys[:, None] + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN)


def _uniform(bits: np.ndarray) -> np.ndarray:
  """Uniform floats in [0, 1) from the top 53 bits."""
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def mask_batch(input_ids: np.ndarray, lengths: np.ndarray, spec: MaskingSpec,
               keys: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
  """Masks padded instances ([CLS] A [SEP] B [SEP], then padding), all rows at once.

  input_ids [B, T] and lengths [B] (real tokens) -> {"input_ids": [B, T] int32 masked, pad_id
  after the length; "masked_lm_positions", "masked_lm_ids": [B, P] int32 (sorted positions and
  their original ids); "masked_lm_weights": [B, P] float32 (1 per prediction)}, P =
  spec.max_predictions, zeros after the row's predictions.

  Row b's choices come from its key alone (keys[b], uint64; see masking_keys): the counter-based
  stream x_c = splitmix64(keys[b], c). Its groups (candidate tokens, or whole words) are visited
  in the order of x_0 ... x_{G-1} (a uniform permutation) and taken while they fit in
  round(length * masked_lm_prob) (at least 1, at most P); the token at position p, if chosen,
  becomes [MASK] when u(x_{T+3p}) < 0.8, else itself when u(x_{T+3p+1}) < 0.5, else
  spec.normal_ids[floor(u(x_{T+3p+2}) * len(normal_ids))], u = the top 53 bits as a float in
  [0, 1). A row's masks depend on nothing but its key and tokens, and all of it runs vectorised
  over the batch.
  """
  n_rows, t = np.shape(input_ids)
  lengths = np.asarray(lengths, np.int64)
  ids = np.where(np.arange(t) < lengths[:, None], input_ids, pad_id).astype(np.int32)
  cand = ~spec.special[ids]  # padding is special
  start = cand.copy()  # the first token of each group
  if spec.whole_word:  # a word continues only over adjacent candidates
    start[:, 1:] &= spec.word_starts[ids[:, 1:]] | ~cand[:, :-1]
  num_groups = start.sum(1)
  # Group g of row b is slot b * (t + 1) + g of flat arrays; slot t of a row holds no group.
  base = np.arange(0, n_rows * (t + 1), t + 1)[:, None]
  group = np.where(cand, np.cumsum(start, axis=1, dtype=np.int32) - 1, t) + base
  sizes = np.bincount(group.ravel(), minlength=n_rows * (t + 1))
  keys = np.asarray(keys, np.uint64)
  sort_keys = _stream(keys, np.arange(t)[None])
  sort_keys[np.arange(t) >= num_groups[:, None]] = np.iinfo(np.uint64).max  # empty: in place
  order = np.argsort(sort_keys, axis=1, kind="stable") + base
  budget = np.minimum(spec.max_predictions,
                      np.maximum(1, np.rint(lengths * spec.masked_lm_prob))).astype(np.int64)
  taken = _take_while_fits(sizes.take(order), budget, num_groups)
  chosen = np.zeros(sizes.size, bool)
  chosen[order[taken]] = True
  flat = np.flatnonzero(chosen.take(group))  # sorted: by row, then position
  r = flat // t
  k = np.bincount(r, minlength=n_rows)
  slot = r * spec.max_predictions + np.arange(flat.size) - np.repeat(np.cumsum(k) - k, k)
  draws = _uniform(_stream(keys[r], t + 3 * (flat % t)[:, None] + np.arange(3)[None]))
  u = draws[:, :2]
  pick = np.floor(draws[:, 2] * spec.normal_ids.size).astype(np.int64)
  labels = ids.ravel()[flat]
  ids.ravel()[flat] = np.where(u[:, 0] < 0.8, spec.mask_id,
                               np.where(u[:, 1] < 0.5, labels, spec.normal_ids[pick]))
  shape = (n_rows, spec.max_predictions)
  f = {"input_ids": ids, "masked_lm_positions": np.zeros(shape, np.int32),
       "masked_lm_ids": np.zeros(shape, np.int32), "masked_lm_weights": np.zeros(shape, np.float32)}
  f["masked_lm_positions"].ravel()[slot] = flat % t
  f["masked_lm_ids"].ravel()[slot] = labels
  f["masked_lm_weights"].ravel()[slot] = 1.0
  return f


def _take_while_fits(sizes: np.ndarray, budget: np.ndarray, num_groups: np.ndarray
                     ) -> np.ndarray:
  """sizes [B, G] of the groups in visiting order -> taken [B, G]: each row takes a group when it
  fits in what is left of its budget [B], and stops once the budget is filled."""
  cum = np.cumsum(sizes, axis=1)
  taken = cum <= budget[:, None]  # the prefix that fits whole (cum only grows)
  first = taken.sum(1)  # the first group that did not fit
  filled = np.where(first > 0, cum[np.arange(len(cum)), np.maximum(first - 1, 0)], 0)
  for j in range(int(first.min(initial=0)), int(num_groups.max(initial=0))):
    if ((filled == budget) | (num_groups <= j)).all():
      break
    fits = (j >= first) & (filled + sizes[:, j] <= budget)
    taken[:, j] |= fits
    filled += np.where(fits, sizes[:, j], 0)
  return taken


def pad_instance(tokens: np.ndarray, segments: np.ndarray, is_random_next: bool,
                 max_seq_length: int) -> dict[str, np.ndarray]:
  n = len(tokens)
  f = {"input_ids": np.zeros(max_seq_length, np.int32),
       "input_mask": np.zeros(max_seq_length, np.int8),
       "segment_ids": np.zeros(max_seq_length, np.int8),
       "next_sentence_labels": np.int32(is_random_next)}
  f["input_ids"][:n], f["input_mask"][:n], f["segment_ids"][:n] = tokens, 1, segments
  return f


def masked_features(input_ids: np.ndarray, length: int, spec: MaskingSpec,
                    rng: np.random.Generator, pad_id: int) -> dict[str, np.ndarray]:
  """The masked-LM features of one (padded) instance: mask_batch of one row, keyed by one draw
  of `rng` (the creation stream)."""
  key = rng.integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True)
  f = mask_batch(np.asarray(input_ids)[None], np.array([length]), spec, np.array([key]), pad_id)
  return {k: v[0] for k, v in f.items()}


# ----------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Corpus:
  """Tokenized documents: a flat token array and sentence/document boundaries."""

  tokens: np.ndarray           # int32[total tokens] (memory-mapped)
  sentence_starts: np.ndarray  # int64[sentences + 1]
  doc_starts: np.ndarray       # int64[documents + 1], in sentences

  def num_documents(self) -> int:
    return len(self.doc_starts) - 1

  def document(self, d: int) -> list[np.ndarray]:
    s0, s1 = self.doc_starts[d], self.doc_starts[d + 1]
    b = self.sentence_starts[s0:s1 + 1]
    return [self.tokens[b[i]:b[i + 1]] for i in range(len(b) - 1)]

  def num_sentences(self, d: int) -> int:
    return int(self.doc_starts[d + 1] - self.doc_starts[d])


def _documents(files: Sequence[pathlib.Path]) -> Iterator[list[tuple[str, int, str]]]:
  """Each document as (file, line, text) of its non-empty lines."""
  for path in files:
    doc: list[tuple[str, int, str]] = []
    for n, line in iter_lines(path):
      line = line.strip()
      if line:
        doc.append((str(path), n, line))
      elif doc:
        yield doc
        doc = []
    if doc:
      yield doc


def _batches_of_documents(files, max_lines: int = 4096) -> Iterator[list[list[str]]]:
  batch, lines = [], 0
  for doc in _documents(files):
    batch.append([text for _, _, text in doc])
    lines += len(doc)
    if lines >= max_lines:
      yield batch
      batch, lines = [], 0
  if batch:
    yield batch


_WORKER: dict[str, Any] = {}


def _init_tokenizer_worker(tokenizer_path: str) -> None:
  from bert_jax import tokenizer
  _WORKER["tok"] = tokenizer.load(tokenizer_path)


def _tokenize_batch(docs: list[list[str]]) -> list[list[np.ndarray]]:
  tok = _WORKER["tok"]
  flat = tok.encode_batch([line for doc in docs for line in doc])
  out, i = [], 0
  for doc in docs:
    sents = [np.asarray(ids, np.int32) for ids in flat[i:i + len(doc)]]
    out.append([s for s in sents if s.size])
    i += len(doc)
  return out


def _pool(workers: int, initializer, initargs) -> concurrent.futures.Executor:
  # spawn, not fork: the caller may have started threads (JAX does).
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
      initargs=initargs)


def tokenize_corpus(files: Sequence[pathlib.Path], tokenizer_path: str, out_dir: pathlib.Path,
                    workers: int) -> Corpus:
  """Tokenizes every document into out_dir/tokens.bin (on disk, not in memory)."""
  sentence_lengths: list[int] = []
  doc_sizes: list[int] = []
  with open(out_dir / "tokens.bin", "wb") as f:
    def consume(results):
      for doc in results:
        if doc:
          doc_sizes.append(len(doc))
          for s in doc:
            sentence_lengths.append(s.size)
            f.write(s.tobytes())
    if workers <= 1:
      _init_tokenizer_worker(tokenizer_path)
      for batch in _batches_of_documents(files):
        consume(_tokenize_batch(batch))
    else:
      with _pool(workers, _init_tokenizer_worker, (tokenizer_path,)) as pool:
        pending: list[concurrent.futures.Future] = []
        for batch in _batches_of_documents(files):
          pending.append(pool.submit(_tokenize_batch, batch))
          if len(pending) >= 2 * workers:
            consume(pending.pop(0).result())
        for fut in pending:
          consume(fut.result())
  total = int(np.sum(sentence_lengths, dtype=np.int64))
  if total == 0:
    raise DataError(f"{', '.join(map(str, files))}: no text (the corpus is empty)")
  tokens = np.memmap(out_dir / "tokens.bin", np.int32, "r", shape=(total,))
  return Corpus(tokens, np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64),
                np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64))


# ----------------------------------------------------------------------------- instances


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
  max_seq_length: int
  short_seq_prob: float
  cls_id: int
  sep_id: int
  pad_id: int
  masking: MaskingSpec | None  # None: dynamic masking (stored unmasked)


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator) -> None:
  """Truncates the longer of a and b one token at a time, from a random end, in place."""
  while len(a) + len(b) > max_tokens:
    longer = a if len(a) > len(b) else b
    if rng.random() < 0.5:
      del longer[0]
    else:
      longer.pop()


def document_instances(corpus: Corpus, docs: np.ndarray, d: int, spec: InstanceSpec,
                       rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
  """The instances of document `docs[d]`; random next segments come from other `docs`."""
  document = corpus.document(int(docs[d]))
  max_tokens = spec.max_seq_length - 3
  target = max_tokens
  if rng.random() < spec.short_seq_prob:
    target = int(rng.integers(2, max_tokens + 1))
  chunk: list[np.ndarray] = []
  length, i = 0, 0
  while i < len(document):
    chunk.append(document[i])
    length += len(document[i])
    if i == len(document) - 1 or length >= target:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      a = [t for s in chunk[:a_end] for t in s.tolist()]
      random_next = rng.random() < 0.5
      if len(chunk) == 1 and not random_next and len(a) >= 2:
        # One sentence and a true continuation asked for: B is the rest of that sentence.
        cut = int(rng.integers(1, len(a)))
        a, b, is_random_next = a[:cut], a[cut:], False
      elif len(chunk) == 1 or random_next:
        is_random_next = True
        other = d
        for _ in range(10):
          other = int(rng.integers(0, len(docs)))
          if other != d:
            break
        random_doc = corpus.document(int(docs[other]))
        b: list[int] = []
        for s in random_doc[int(rng.integers(0, len(random_doc))):]:
          b.extend(s.tolist())
          if len(b) >= target - len(a):
            break
        i -= len(chunk) - a_end  # put the unused sentences back
      else:
        is_random_next = False
        b = [t for s in chunk[a_end:] for t in s.tolist()]
      truncate_pair(a, b, max_tokens, rng)
      if a and b:
        tokens = np.array([spec.cls_id, *a, spec.sep_id, *b, spec.sep_id], np.int64)
        segments = np.array([0] * (len(a) + 2) + [1] * (len(b) + 1), np.int8)
        f = pad_instance(tokens, segments, is_random_next, spec.max_seq_length)
        if spec.masking is not None:
          f.update(masked_features(f["input_ids"], len(tokens), spec.masking, rng, spec.pad_id))
        yield f
      chunk, length = [], 0
    i += 1


_TASK: dict[str, Any] = {}


def _init_instance_worker(corpus_dir: str, spec: InstanceSpec) -> None:
  meta = np.load(os.path.join(corpus_dir, "boundaries.npz"))
  total = int(meta["sentence_starts"][-1])
  _TASK["corpus"] = Corpus(np.memmap(os.path.join(corpus_dir, "tokens.bin"), np.int32, "r",
                                     shape=(total,)), meta["sentence_starts"], meta["doc_starts"])
  _TASK["spec"] = spec


def _instance_task(docs: np.ndarray, lo: int, hi: int, seed: tuple[int, ...]
                   ) -> dict[str, np.ndarray]:
  """The instances of docs[lo:hi] (one pass), as stacked arrays; seeded by the task alone."""
  corpus, spec = _TASK["corpus"], _TASK["spec"]
  rng = np.random.default_rng(seed)
  rows = [f for d in range(lo, hi) for f in document_instances(corpus, docs, d, spec, rng)]
  names = FEATURES if spec.masking is not None else UNMASKED
  if not rows:
    return {}
  return {k: np.stack([r[k] for r in rows]).astype(STORED_DTYPES[k]) for k in names}


# ----------------------------------------------------------------------------- output


class _ShardWriter:
  """Appends instance arrays; writes shards of `shard_size` rows as <split>-NNNNN.<feature>.npy."""

  def __init__(self, directory: pathlib.Path, split: str, shard_size: int):
    self.directory, self.split, self.shard_size = directory, split, shard_size
    self.buffer: list[dict[str, np.ndarray]] = []
    self.buffered = 0
    self.shards: list[dict[str, Any]] = []
    self.rows = 0
    self.stats = {"instances": 0, "random_next": 0, "masked": 0, "maskable": 0, "tokens": 0}

  def add(self, arrays: dict[str, np.ndarray]) -> None:
    if not arrays:
      return
    n = len(arrays["input_ids"])
    lengths = (arrays["input_mask"] > 0).sum(1, dtype=np.int64)
    examples = int(arrays["example_mask"].sum()) if "example_mask" in arrays else n
    self.rows += n
    self.stats["instances"] += examples
    self.stats["random_next"] += int(arrays["next_sentence_labels"].sum())
    self.stats["tokens"] += int(lengths.sum())
    if "masked_lm_weights" in arrays:
      self.stats["masked"] += int(arrays["masked_lm_weights"].sum())
      self.stats["maskable"] += int(lengths.sum() - 3 * examples)
    self.buffer.append(arrays)
    self.buffered += n
    while self.buffered >= self.shard_size:
      self._flush(self.shard_size)

  def close(self) -> dict[str, Any]:
    if self.buffered:
      self._flush(self.buffered)
    return {"num_instances": self.rows, "shards": self.shards, "stats": self.stats}

  def _flush(self, n: int) -> None:
    merged = {k: np.concatenate([b[k] for b in self.buffer]) for k in self.buffer[0]}
    name = f"{self.split}-{len(self.shards):05d}"
    for k, v in merged.items():
      np.save(self.directory / f"{name}.{k}.npy", v[:n])
    rest = {k: v[n:] for k, v in merged.items()}
    self.buffered -= n
    self.buffer = [rest] if self.buffered else []
    self.shards.append({"name": name, "num_instances": n})
    faults.point("data.shard_written")


class _PackingWriter:
  """Packs instances into rows of several instances (bert_jax.packing) before a _ShardWriter:
  chunks of `chunk` instances in creation order, each packed best-fit decreasing into rows of
  at most `max_per_row` instances, then masked per row when masking is static (one masking
  key per row, of (seed, split, chunk, row))."""

  def __init__(self, writer: _ShardWriter, max_seq_length: int, max_per_row: int,
               masking: MaskingSpec | None, pad_id: int, seed: tuple[int, ...], chunk: int):
    self.writer, self.t, self.k = writer, max_seq_length, max_per_row
    self.masking, self.pad_id, self.seed, self.chunk = masking, pad_id, seed, chunk
    self.buffer: list[dict[str, np.ndarray]] = []
    self.buffered = self.chunks = self.examples = self.rows = self.tokens = 0

  def add(self, arrays: dict[str, np.ndarray]) -> None:
    if arrays:
      self.buffer.append(arrays)
      self.buffered += len(arrays["input_ids"])
    if self.buffered >= self.chunk:
      self._pack()

  def _pack(self) -> None:
    merged = {k: np.concatenate([b[k] for b in self.buffer]) for k in self.buffer[0]}
    self.buffer, self.buffered = [], 0
    lengths = merged["input_mask"].sum(1, dtype=np.int64)
    layout = packing.Layout.of(packing.pack(lengths, self.t, self.k), lengths,
                               max_per_row=self.k)
    f = packing.packed_features({k: merged[k] for k in ("input_ids", "segment_ids",
                                                        "next_sentence_labels")},
                                layout)
    if self.masking is not None:
      keys = masking_keys(*self.seed, self.chunks, np.arange(layout.num_rows))
      f.update(mask_batch(f["input_ids"], (f["input_mask"] > 0).sum(1), self.masking, keys,
                          self.pad_id))
    self.chunks += 1
    self.examples += len(lengths)
    self.rows += layout.num_rows
    self.tokens += int(lengths.sum())
    self.writer.add({k: v.astype(STORED_DTYPES[k]) for k, v in f.items()})

  def close(self) -> dict[str, Any]:
    if self.buffered:
      self._pack()
    out = self.writer.close()
    out["packing"] = {
        "examples": self.examples, "rows": self.rows,
        "padding_share": round(1 - self.tokens / max(self.rows * self.t, 1), 4),
        "padding_share_unpacked": round(1 - self.tokens / max(self.examples * self.t, 1), 4)}
    return out


def _split_documents(corpus: Corpus, eval_fraction: float, seed: int
                     ) -> dict[str, np.ndarray]:
  n = corpus.num_documents()
  if eval_fraction <= 0 or n < 2:
    return {"train": np.arange(n)}
  n_eval = min(n - 1, max(1, int(round(eval_fraction * n))))
  if n_eval == 1:
    log.warning("the eval split holds 1 document of %d (eval_fraction %g): its next-sentence "
                "'random' B segments can only come from that same document, so the eval NSP "
                "accuracy means little; a larger eval_fraction gives it several", n, eval_fraction)
  perm = np.random.default_rng([seed, 2]).permutation(n)
  return {"train": np.sort(perm[n_eval:]), "eval": np.sort(perm[:n_eval])}


def check_examples_per_row(name: str, value: int, max_seq_length: int) -> None:
  """The cap K of instances per packed row (ConfigError naming `name`): fixed (the rows' shape),
  within the row and within what the stored input_mask can number."""
  packing.check_examples_per_row(name, value, max_seq_length)
  if value < 1:
    raise ConfigError(f"{name}=0: packed pretraining rows need a fixed cap")
  if value > MAX_EXAMPLES_PER_ROW:
    raise ConfigError(f"{name}={value}: expected at most {MAX_EXAMPLES_PER_ROW} (a packed row "
                      "numbers its instances in input_mask, stored as int8)")


def create_pretraining_data(input_files: Sequence[str | pathlib.Path], tokenizer_path: str,
                            output_dir: str | pathlib.Path, *, max_seq_length: int = 128,
                            max_predictions_per_seq: int = 20, masked_lm_prob: float = 0.15,
                            short_seq_prob: float = 0.1, dupe_factor: int = 10,
                            seed: int = 12345, whole_word_mask: bool = False,
                            dynamic_masking: bool = False, eval_fraction: float = 0.0,
                            workers: int | None = None, shard_size: int = 65536,
                            docs_per_task: int = 64, pack: bool = False,
                            max_examples_per_row: int = 8) -> dict[str, Any]:
  """Creates the instances (see the module docstring); returns the manifest. With `pack`, rows
  hold several instances each (bert_jax.packing; at most `max_examples_per_row`)."""
  from bert_jax import tokenizer as tokenizers
  started = time.perf_counter()
  files = check_files(input_files)
  if max_seq_length < 5:
    raise ValueError(f"max_seq_length={max_seq_length}: needs room for [CLS] A [SEP] B [SEP]")
  if not 0 < masked_lm_prob < 1 or max_predictions_per_seq < 1 or dupe_factor < 1:
    raise ValueError("masked_lm_prob must be in (0, 1), max_predictions_per_seq and dupe_factor "
                     ">= 1")
  if pack:
    check_examples_per_row("max_examples_per_row", max_examples_per_row, max_seq_length)
  tok = tokenizers.load(tokenizer_path)
  if workers is None:
    size = sum(p.stat().st_size for p in files)
    workers = max(1, min(os.cpu_count() or 1, size // (4 << 20)))
  out = pathlib.Path(output_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  with storage.replacing_dir(out) as tmp:
    (tmp / "corpus").mkdir()
    corpus = tokenize_corpus(files, str(tok.path), tmp / "corpus", workers)
    np.savez(tmp / "corpus" / "boundaries.npz", sentence_starts=corpus.sentence_starts,
             doc_starts=corpus.doc_starts)
    n_docs = corpus.num_documents()
    if not any(corpus.num_sentences(d) >= 2 for d in range(n_docs)):
      raise DataError(f"{', '.join(map(str, files))}: no document has two sentences; next-"
                      "sentence pairs need documents of several lines (one sentence per line, a "
                      "blank line between documents)")
    masking = MaskingSpec.create(tok.special_ids, tok.word_starts, tok.mask_id, tok.unk_id,
                                 masked_lm_prob=masked_lm_prob,
                                 max_predictions=max_predictions_per_seq,
                                 whole_word=whole_word_mask)
    spec = InstanceSpec(max_seq_length, short_seq_prob, tok.cls_id, tok.sep_id, tok.pad_id,
                        None if dynamic_masking or pack else masking)
    np.save(tmp / WORD_STARTS, tok.word_starts)
    splits = {}
    for split_id, (split, docs) in enumerate(_split_documents(corpus, eval_fraction,
                                                              seed).items()):
      writer = _ShardWriter(tmp, split, shard_size)
      if pack:
        writer = _PackingWriter(writer, max_seq_length, max_examples_per_row,
                                None if dynamic_masking else masking, tok.pad_id,
                                (seed, split_id), shard_size)
      tasks = [(docs, lo, min(lo + docs_per_task, len(docs)), (seed, split_id, dupe, lo))
               for dupe in range(dupe_factor) for lo in range(0, len(docs), docs_per_task)]
      for arrays in _run_tasks(tasks, str(tmp / "corpus"), spec, workers):
        writer.add(arrays)
      splits[split] = writer.close() | {"num_documents": len(docs)}
      rows = max(splits[split]["num_instances"], 1)
      splits[split]["padding_share"] = round(
          1 - splits[split]["stats"]["tokens"] / (rows * max_seq_length), 4)
      if splits[split]["num_instances"] == 0:
        raise DataError(f"{', '.join(map(str, files))}: the {split} split gave no instances")
    shutil.rmtree(tmp / "corpus")
    seconds = time.perf_counter() - started
    total = sum(s["stats"]["instances"] for s in splits.values())
    manifest = {
        "format": FORMAT, "max_seq_length": max_seq_length,
        "max_predictions_per_seq": max_predictions_per_seq, "dynamic_masking": dynamic_masking,
        "whole_word_mask": whole_word_mask, "masked_lm_prob": masked_lm_prob,
        "tokenizer": str(tok.path), "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "special_ids": dict(zip(("pad", "unk", "cls", "sep", "mask"), tok.special_ids,
                                strict=True)),
        "features": {k: str(np.dtype(STORED_DTYPES[k])) for k in
                     (UNMASKED if dynamic_masking else FEATURES) + (PACKED if pack else ())},
        "packed": pack, "max_examples_per_row": max_examples_per_row if pack else 1,
        "splits": splits,
        "args": {"input_files": [str(p) if storage.is_url(p) else str(f)
                                 for p, f in zip(input_files, files, strict=True)],
                 "short_seq_prob": short_seq_prob,
                 "dupe_factor": dupe_factor, "seed": seed, "eval_fraction": eval_fraction},
        "corpus": {"documents": n_docs, "sentences": int(corpus.doc_starts[-1]),
                   "tokens": int(corpus.sentence_starts[-1])},
        "seconds": round(seconds, 2), "instances_per_s": round(total / seconds, 1),
        "workers": workers,
    }
    del corpus
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  log.info("%s: %d instances (%s) in %.1f s, %.0f instances/s", out, total,
           ", ".join(f"{k} {v['stats']['instances']}"
                     + (f" in {v['num_instances']} rows" if pack else "")
                     for k, v in splits.items()), seconds, total / seconds)
  return manifest


def _run_tasks(tasks, corpus_dir: str, spec: InstanceSpec, workers: int
               ) -> Iterator[dict[str, np.ndarray]]:
  """Task results in task order (so the output does not depend on the number of workers)."""
  if workers <= 1:
    _init_instance_worker(corpus_dir, spec)
    for t in tasks:
      yield _instance_task(*t)
    return
  with _pool(workers, _init_instance_worker, (corpus_dir, spec)) as pool:
    pending: list[concurrent.futures.Future] = []
    for t in tasks:
      pending.append(pool.submit(_instance_task, *t))
      if len(pending) >= 2 * workers:
        yield pending.pop(0).result()
    for fut in pending:
      yield fut.result()


def read_manifest(data_dir: str | pathlib.Path) -> dict[str, Any]:
  path = storage.path(data_dir) / MANIFEST  # a gs:// data_dir too (pathlib would make it gs:/)
  if not path.is_file():
    raise DataError(f"{path}: no such file (create the data with python -m "
                    "bert_jax.data.pretraining)")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


# ----------------------------------------------------------------------------- command line


def _main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog=cli.prog("bert_jax.data.pretraining"),
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--input_files", required=True, help="comma-separated files or globs")
  p.add_argument("--tokenizer", required=True, help="SentencePiece .model or WordPiece vocab.txt")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--max_seq_length", type=int, default=128)
  p.add_argument("--max_predictions_per_seq", type=int, default=20)
  p.add_argument("--masked_lm_prob", type=float, default=0.15)
  p.add_argument("--short_seq_prob", type=float, default=0.1)
  p.add_argument("--dupe_factor", type=int, default=10)
  p.add_argument("--seed", type=int, default=12345)
  p.add_argument("--whole_word_mask", action="store_true")
  p.add_argument("--dynamic_masking", action="store_true",
                 help="store unmasked instances; the loader masks afresh each epoch")
  p.add_argument("--eval_fraction", type=float, default=0.01,
                 help="share of documents held out as the eval split")
  p.add_argument("--workers", type=int, default=None, help="processes (default: by corpus size)")
  p.add_argument("--shard_size", type=int, default=65536)
  p.add_argument("--pack", action="store_true",
                 help="pack several instances per row (less padding; see bert_jax.packing)")
  p.add_argument("--max_examples_per_row", type=int, default=8,
                 help="with --pack: instances per row at most")
  a = p.parse_args(argv)
  # A gs:// output is written on local disk first and uploaded once complete; a gs:// tokenizer
  # is read from a local copy (SentencePiece reads files).
  with storage.local_output(a.output_dir) as out:
    m = create_pretraining_data(
        expand_files(a.input_files), str(storage.local(a.tokenizer)), str(out),
        max_seq_length=a.max_seq_length, max_predictions_per_seq=a.max_predictions_per_seq,
        masked_lm_prob=a.masked_lm_prob, short_seq_prob=a.short_seq_prob,
        dupe_factor=a.dupe_factor, seed=a.seed, whole_word_mask=a.whole_word_mask,
        dynamic_masking=a.dynamic_masking, eval_fraction=a.eval_fraction, workers=a.workers,
        shard_size=a.shard_size, pack=a.pack, max_examples_per_row=a.max_examples_per_row)
  print(json.dumps({k: m[k] for k in ("corpus", "seconds", "instances_per_s")} | {
      k: {"rows": v["num_instances"], **v["stats"], "padding_share": v["padding_share"],
          **v.get("packing", {})} for k, v in m["splits"].items()}))


if __name__ == "__main__":
  cli.run(_main)
