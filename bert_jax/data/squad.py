"""SQuAD v1.1 / v2.0 JSON -> fixed-shape question + passage windows with character offsets."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from bert_jax import files
from bert_jax.data.errors import DataError
from bert_jax.errors import ConfigError
from bert_jax.tokenizer import TokenizerError

log = logging.getLogger(__name__)


def load_json(path: str | pathlib.Path) -> Any:
  """Parses a JSON file; malformed JSON raises DataError naming the file, line and column."""
  path = files.path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e})") from e
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


@dataclasses.dataclass(frozen=True)
class Answer:
  """A gold answer: its text and character start in the context (-1: not found there)."""

  text: str
  start: int
  given_start: int  # the file's answer_start (-1 there means unknown)


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question on one passage. `answers` are all the gold answers (v2.0: none if impossible)."""

  qas_id: str
  question: str
  context: str
  answers: tuple[Answer, ...]
  is_impossible: bool = False
  title: str = ""

  @property
  def answer(self) -> Answer | None:
    """The answer to train on: the first one found in the context (None if none is)."""
    return next((a for a in self.answers if a.start >= 0), None)


def _find_nearest(context: str, text: str, start: int) -> int:
  """The occurrence of `text` in `context` nearest to `start`, -1 if there is none."""
  best, pos = -1, context.find(text)
  while pos >= 0:
    if best < 0 or abs(pos - start) < abs(best - start):
      best = pos
    pos = context.find(text, pos + 1)
  return best


def _read_answer(raw: Any, context: str, where: str) -> Answer:
  if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not isinstance(
      raw.get("answer_start"), int):
    raise DataError(f"{where}: an answer needs a string 'text' and an integer 'answer_start', "
                    f"got {raw!r}")
  text, start = raw["text"], raw["answer_start"]
  if start != -1 and (start < 0 or start + len(text) > len(context)):
    raise DataError(f"{where}: answer {text!r} at characters [{start}, {start + len(text)}) lies "
                    f"outside the context ({len(context)} characters)")
  if text and start >= 0 and context[start:start + len(text)] == text:
    return Answer(text, start, start)
  return Answer(text, _find_nearest(context, text, start) if text else -1, start)


def _read_question(qa: dict, context: str, title: str, where: str) -> SquadExample:
  where = f"{where} (id {qa['id']!r})"
  if not isinstance(qa.get("question"), str):
    raise DataError(f"{where}: no 'question' text")
  answers = qa.get("answers", [])
  if not isinstance(answers, list):
    raise DataError(f"{where}: 'answers' must be a list, got {type(answers).__name__}")
  answers = tuple(_read_answer(a, context, f"{where}, answer {k}") for k, a in enumerate(answers))
  impossible = qa.get("is_impossible", False)
  if not isinstance(impossible, bool):
    raise DataError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
  if impossible and answers:
    raise DataError(f"{where}: is_impossible is true but the question has {len(answers)} "
                    "answers (SQuAD v2.0 keeps those of an unanswerable question under "
                    "'plausible_answers')")
  return SquadExample(str(qa["id"]), qa["question"], context, answers, impossible, title)


def iter_questions(data: Any, source: str = "<data>"):
  """Yields (question object, context, title, "source: article i ('title'), paragraph j,
  question k") for each question of a parsed SQuAD JSON, in file order, checking the layout on
  the way: a 'data' list of articles, each a 'paragraphs' list of a 'context' text and a 'qas'
  list of questions, each with an 'id' no other question has (compared as text: 1 and "1" are
  one id), and at least one question in the file. A break raises DataError naming `source`."""
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise DataError(f"{source}: not a SQuAD file (expected an object with a 'data' list)")
  seen: dict[str, str] = {}  # id -> where it was first
  for i, article in enumerate(data["data"]):
    title = article.get("title", "") if isinstance(article, dict) else ""
    paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      raise DataError(f"{source}: article {i} ({title!r}) has no 'paragraphs' list")
    for j, paragraph in enumerate(paragraphs):
      where = f"article {i} ({title!r}), paragraph {j}"
      if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
        raise DataError(f"{source}: {where}: no 'context' text")
      qas = paragraph.get("qas", [])
      if not isinstance(qas, list):
        raise DataError(f"{source}: {where}: 'qas' must be a list of questions, got "
                        f"{type(qas).__name__}")
      for k, qa in enumerate(qas):
        if not isinstance(qa, dict) or "id" not in qa:
          raise DataError(f"{source}: {where}, question {k}: a question without an 'id'")
        qid = str(qa["id"])
        if qid in seen:
          raise DataError(f"{source}: question id {qid!r} appears twice: {seen[qid]} and "
                          f"{where}, question {k} (predictions are keyed by id)")
        seen[qid] = f"{where}, question {k}"
        yield qa, paragraph["context"], title, f"{source}: {where}, question {k}"
  if not seen:
    raise DataError(f"{source}: no questions (no article has a paragraph with a non-empty 'qas' "
                    "list)")


def parse_squad(data: Any, source: str = "<data>") -> list[SquadExample]:
  """The questions of a parsed SQuAD JSON ({"data": [articles]}), in file order."""
  return [_read_question(qa, context, title, where)
          for qa, context, title, where in iter_questions(data, source)]


def read_squad(path: str | pathlib.Path) -> list[SquadExample]:
  """Reads a SQuAD v1.1/v2.0 JSON file -> its questions, in file order.

  An answer_start that does not match its text is replaced by the nearest occurrence of the text
  in the context; an answer found nowhere keeps start -1 (see `answer_counts`).
  """
  examples = parse_squad(load_json(path), str(path))
  counts = answer_counts(examples)
  if counts["refound"] or counts["not_found"]:
    log.info("%s: %d of %d answers had an answer_start that did not match the text: %d re-found "
             "in the context, %d not found", path, counts["refound"] + counts["not_found"],
             counts["answers"], counts["refound"], counts["not_found"])
  return examples


def answer_counts(examples: Sequence[SquadExample]) -> dict[str, int]:
  """How the gold answers matched their contexts, and how many questions can be trained on."""
  answers = [a for ex in examples for a in ex.answers]
  return {
      "questions": len(examples),
      "impossible": sum(ex.is_impossible for ex in examples),
      "answers": len(answers),
      "refound": sum(a.start >= 0 and a.start != a.given_start for a in answers),
      "not_found": sum(a.start < 0 for a in answers),
      "untrainable": sum(not ex.is_impossible and ex.answer is None for ex in examples),
  }


# ----------------------------------------------------------------------------- features


class Tokenizer(Protocol):
  cls_id: int
  sep_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


def token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
  """First and last token overlapping characters [start, end), from offsets [N, 2]; None if none."""
  hit = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
  return (int(hit[0]), int(hit[-1])) if len(hit) else None


def doc_windows(n_tokens: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
  """(start, length) of the passage windows: up to `max_tokens` each, starts `stride` apart."""
  windows, start = [], 0
  while True:
    length = min(n_tokens - start, max_tokens)
    windows.append((start, length))
    if start + length >= n_tokens:
      return windows
    start += min(length, stride)


def max_context(windows: Sequence[tuple[int, int]], n_tokens: int) -> list[np.ndarray]:
  """Per window, [length] bool: whether the window is the one where each of its tokens has the
  most context.

  Score of a token in a window: min(left, right context) + 0.01 * window length; the first
  window wins ties (BERT's `_check_is_max_context`). Memory: arrays of n_tokens and the windows'
  own lengths (a passage of N tokens in windows `stride` apart holds about N * length / stride).
  """
  best_score, best = np.full(n_tokens, -np.inf), np.full(n_tokens, -1)
  for w, (start, length) in enumerate(windows):
    pos = np.arange(start, start + length)
    score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
    better = score > best_score[start:start + length]  # strictly: an earlier window keeps ties
    best_score[start:start + length][better] = score[better]
    best[start:start + length][better] = w
  return [best[start:start + length] == w for w, (start, length) in enumerate(windows)]


@dataclasses.dataclass
class _Encoded:
  """One question's token pieces: question ids, passage ids and their character offsets."""

  question: list[int]
  doc: np.ndarray  # [N] int
  offsets: np.ndarray  # [N, 2] int, characters of the context
  span: tuple[int, int] | None  # the training answer's first/last passage token


def _encode(ex: SquadExample, tok: Tokenizer, max_query_length: int, cache: dict) -> _Encoded:
  if ex.context not in cache:
    ids, offsets = tok.encode_with_offsets(ex.context)
    cache[ex.context] = (np.asarray(ids, np.int64),
                         np.asarray(offsets, np.int64).reshape(len(ids), 2))
  doc, offsets = cache[ex.context]
  span = None
  if not ex.is_impossible and ex.answer is not None:
    a = ex.answer
    span = token_span(offsets, a.start, a.start + len(a.text))
  return _Encoded(tok.encode(ex.question)[:max_query_length], doc, offsets, span)


FEATURE_KEYS = ("input_ids", "input_mask", "segment_ids", "start_positions", "end_positions")
META_KEYS = ("example_index", "offsets", "max_context")


def _window_rows(enc: _Encoded, tok: Tokenizer, max_seq_length: int, doc_stride: int,
                 flags: dict):
  """Yields (features row, meta row) per passage window of one question. `flags` caches the
  max-context flags per (passage tokens, passage tokens per window): the questions on one
  passage share them unless their lengths differ."""
  head = [tok.cls_id, *enc.question, tok.sep_id]
  max_doc = max_seq_length - len(head) - 1
  if max_doc <= 0:
    raise ValueError(f"max_seq_length={max_seq_length} leaves no room for the passage after a "
                     f"{len(enc.question)}-token question; raise it or lower max_query_length")
  windows = doc_windows(len(enc.doc), max_doc, doc_stride)
  key = (len(enc.doc), max_doc)  # the windows depend on nothing else (doc_stride is fixed)
  if key not in flags:
    flags[key] = max_context(windows, len(enc.doc))
  is_max = flags[key]
  for w, (s, n) in enumerate(windows):
    end = len(head) + n
    ids = np.full(max_seq_length, tok.pad_id, np.int32)
    ids[:end + 1] = [*head, *enc.doc[s:s + n], tok.sep_id]
    segments = np.zeros(max_seq_length, np.int32)
    segments[len(head):end + 1] = 1
    offsets = np.full((max_seq_length, 2), -1, np.int32)
    offsets[len(head):end] = enc.offsets[s:s + n]
    ctx = np.zeros(max_seq_length, bool)
    ctx[len(head):end] = is_max[w]
    first = last = 0  # [CLS]: no answer in this window
    if enc.span is not None and s <= enc.span[0] and enc.span[1] < s + n:
      first, last = enc.span[0] - s + len(head), enc.span[1] - s + len(head)
    feats = {"input_ids": ids, "input_mask": (np.arange(max_seq_length) <= end).astype(np.int32),
             "segment_ids": segments, "start_positions": first, "end_positions": last}
    yield feats, {"offsets": offsets, "max_context": ctx}


def convert_examples(examples: Sequence[SquadExample], tok: Tokenizer, max_seq_length: int = 384,
                     doc_stride: int = 128, max_query_length: int = 64, is_training: bool = True
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Questions -> `[CLS] question [SEP] passage window [SEP]` features, one row per window.

  Returns (features, meta). features: input_ids, input_mask, segment_ids [F, T] int32 and
  start_positions, end_positions [F] int32 (token positions of the answer; 0 = [CLS] when the
  window does not hold it or the question is impossible). meta, for `squad_eval.decode`:
  example_index [F] (into `examples`), offsets [F, T, 2] int32 (characters of the context per
  passage token; -1 elsewhere), max_context [F, T] bool. With `is_training`, questions whose
  answer is not found in the context are skipped (logged; see `answer_counts`).
  """
  for name, value in (("doc_stride", doc_stride), ("max_query_length", max_query_length)):
    if not isinstance(value, int) or value < 1:  # a stride of 0 would never end a passage
      raise ConfigError(f"data.{name}={value!r}: expected a positive number of tokens")
  cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  flags: dict[tuple[int, int], list[np.ndarray]] = {}
  rows: dict[str, list] = {k: [] for k in FEATURE_KEYS + META_KEYS}
  skipped = unmappable = 0
  for i, ex in enumerate(examples):
    if is_training and not ex.is_impossible and ex.answer is None:
      skipped += 1
      continue
    try:
      enc = _encode(ex, tok, max_query_length, cache)
    except TokenizerError as e:
      raise DataError(f"question {ex.qas_id!r}: {e}") from None
    if is_training and not ex.is_impossible and enc.span is None:
      unmappable += 1
      continue
    for feats, meta in _window_rows(enc, tok, max_seq_length, doc_stride, flags):
      for k, v in {**feats, **meta, "example_index": i}.items():
        rows[k].append(v)
  if skipped or unmappable:
    log.warning("skipped %d of %d questions for training: %d answers not found in the context, "
                "%d covering no passage token", skipped + unmappable, len(examples), skipped,
                unmappable)
  arrays = {k: np.asarray(v, np.int32 if k != "max_context" else bool) for k, v in rows.items()}
  if not rows["input_ids"]:
    arrays.update(_empty(max_seq_length))
  return ({k: arrays[k] for k in FEATURE_KEYS}, {k: arrays[k] for k in META_KEYS})


def _empty(t: int) -> dict[str, np.ndarray]:
  shapes = {"input_ids": (0, t), "input_mask": (0, t), "segment_ids": (0, t),
            "offsets": (0, t, 2), "max_context": (0, t)}
  return {k: np.zeros(s, bool if k == "max_context" else np.int32) for k, s in shapes.items()}
