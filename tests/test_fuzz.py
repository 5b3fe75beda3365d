"""Fuzzed readers (hypothesis): for any input, the corpus reader, the TSV/CSV/JSONL readers, the
SQuAD reader and the tokenizers either give results that round-trip (lines, cells, offsets that
point at the text they claim) or raise the project's own error; nothing else escapes.

Examples per property are kept small (FUZZ) so the module runs in seconds in CI.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bert_jax.errors import BertJaxError

# FUZZ_EXAMPLES=N: N examples per property from a random seed (a longer hunt than CI's 60,
# always the same ones).
_HUNT = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 60, deadline=None, derandomize=not _HUNT,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Text with what breaks readers: tabs, quotes, CR, other line separators, NUL, CJK, combining
# marks, full-width and ligature forms (NFKC changes them), emoji.
TRICKY = st.sampled_from(list("\t\"',;\r\x00\x0b\x0c\u2028\u0085 ") + list("中文字") +
                         ["\u0301", "\uff21", "\ufb01", "\u00e9", "\U0001f600", "\u200d"])
TEXT = st.text(st.one_of(st.characters(codec="utf-8"), TRICKY), max_size=40)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------- corpus lines


def _first_bad_line(data: bytes) -> int | None:
  try:
    data.decode("utf-8")
    return None
  except UnicodeDecodeError as e:
    return data[:e.start].count(b"\n") + 1


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), TEXT.map(lambda t: t.encode("utf-8"))))
def test_corpus_lines_round_trip_or_name_the_bad_line(work, data):
  from bert_jax.data.text import iter_lines
  f = work / "corpus.txt"
  f.write_bytes(data)
  bad = _first_bad_line(data)
  try:
    got = list(iter_lines(f))
  except BertJaxError as e:
    assert bad is not None and str(e).startswith(f"{f}:{bad}: not valid UTF-8"), (str(e), bad)
    return
  assert bad is None
  text = data.decode("utf-8")
  want = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []
  assert got == [(n, line.rstrip("\r")) for n, line in enumerate(want, 1)]


# ----------------------------------------------------------------------------- TSV / CSV / JSONL


CELL = st.text(st.one_of(st.characters(codec="utf-8", exclude_characters="\t\n\r"),
                         st.sampled_from(list("\"',; 中\u2028\u0085\x00"))),
               min_size=1, max_size=20).filter(lambda s: s.strip())
ROWS = st.lists(st.tuples(CELL, st.sampled_from(["0", "1", "2"])), min_size=1, max_size=8)


def _write_rows(path: pathlib.Path, fmt: str, rows) -> None:
  if fmt == "jsonl":
    path.write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows),
                    encoding="utf-8")
  elif fmt == "csv":
    out = io.StringIO()
    csv.writer(out).writerows([("sentence", "label"), *rows])
    path.write_text(out.getvalue(), encoding="utf-8", newline="")
  else:  # GLUE TSV: no quoting, one row per line
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows),
                    encoding="utf-8")


@FUZZ
@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
@given(rows=ROWS)
def test_classification_rows_round_trip(work, fmt, rows):
  from bert_jax.data import classification
  if fmt == "tsv":  # TSV has no quoting: a NUL, or the csv module's view of a quote, aside
    rows = [(t.replace('"', "'").replace("\x00", " "), y) for t, y in rows]
  f = work / f"train.{fmt}"
  _write_rows(f, fmt, rows)
  examples, labels = classification.read_examples(f, text_a="sentence", label="label",
                                                  header=True)
  assert [(ex.text_a, ex.label) for ex in examples] == rows
  assert labels == sorted({y for _, y in rows})


@FUZZ
@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
@given(data=st.one_of(st.binary(max_size=300), TEXT.map(lambda t: t.encode("utf-8"))))
def test_classification_reader_takes_any_bytes(work, fmt, data):
  from bert_jax.data import classification
  f = work / f"any.{fmt}"
  f.write_bytes(data)
  try:
    examples, _ = classification.read_examples(f, text_a=0, label=1)
  except BertJaxError as e:
    assert str(f) in str(e)
    return
  assert examples and all(isinstance(ex.text_a, str) for ex in examples)


# ----------------------------------------------------------------------------- SQuAD


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 50) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                        st.sampled_from(["data", "paragraphs", "context", "qas", "id", "question",
                                         "answers", "text", "answer_start", "is_impossible",
                                         "title", "version", "x"]), kids, max_size=5),
                    max_leaves=25)


@FUZZ
@given(data=JSON)
def test_squad_reader_takes_any_json(data):
  from bert_jax.data import squad
  try:
    examples = squad.parse_squad(data, "fuzz.json")
  except BertJaxError as e:
    assert str(e).startswith("fuzz.json")
    return
  for ex in examples:
    assert isinstance(ex.context, str) and isinstance(ex.question, str)
    for a in ex.answers:
      assert a.start == -1 or ex.context[a.start:a.start + len(a.text)] == a.text


@FUZZ
@given(data=st.binary(max_size=200))
def test_squad_file_reader_takes_any_bytes(work, data):
  from bert_jax.data import squad
  f = work / "any.json"
  f.write_bytes(data)
  try:
    squad.read_squad(f)
  except BertJaxError as e:
    assert str(f) in str(e)


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizers(work):
  """The trained SentencePiece model of tests/runs.py and a small cased WordPiece vocab."""
  from bert_jax import tokenizer
  from bert_jax.data import pretraining
  corpus = work / "corpus.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:100_000],
                    encoding="utf-8")
  sp = tokenizer.load(tokenizer.train_sentencepiece([corpus], 600, work / "tok"))
  letters = string.ascii_letters + string.digits + string.punctuation
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters),
           "the", "##ing"]
  (work / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return {"sentencepiece": sp, "wordpiece": tokenizer.load(work / "vocab.txt", lowercase=False)}


def _check_offsets(text: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
  assert len(ids) == len(offsets)
  for (a, b), (c, d) in zip(offsets, offsets[1:], strict=False):
    assert a <= c and b <= d, offsets  # in text order
  for a, b in offsets:
    assert 0 <= a <= b <= len(text)
    assert text[a:b] == text[a:b].strip()  # never a space at either end


@FUZZ
@pytest.mark.parametrize("kind", ["sentencepiece", "wordpiece"])
@given(text=TEXT)
def test_offsets_of_any_text_are_in_order_and_bounds(tokenizers, kind, text):
  tok = tokenizers[kind]
  ids, offsets = tok.encode_with_offsets(text)
  _check_offsets(text, ids, offsets)
  assert ids == tok.encode(text)


ASCII = st.text(st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " "),
                max_size=40)


@FUZZ
@pytest.mark.parametrize("kind", ["sentencepiece", "wordpiece"])
@given(text=ASCII)
def test_offsets_point_at_the_text_of_each_token(tokenizers, kind, text):
  """On text the normaliser leaves alone, each token's text is the text its offsets claim and
  together they cover every non-space character."""
  tok = tokenizers[kind]
  ids, offsets = tok.encode_with_offsets(text)
  _check_offsets(text, ids, offsets)
  for i, (a, b) in zip(ids, offsets, strict=True):
    piece = tok.id_to_token(i).removeprefix("\u2581").removeprefix("##")
    assert i == tok.unk_id or piece == text[a:b] or (piece == "" and a == b), (text, piece, a, b)
  assert "".join(text[a:b] for a, b in offsets) == "".join(text.split())


# ----------------------------------------------------------------------------- SQuAD features


WORDS = st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=7), min_size=2,
                 max_size=60)


@FUZZ
@given(words=WORDS, span=st.tuples(st.integers(0, 59), st.integers(1, 6)))
def test_squad_features_map_back_to_the_answer(tokenizers, words, span):
  """Every training window that holds the answer points (through its offsets) at characters
  that contain the answer; the others point at [CLS]."""
  from bert_jax.data import squad
  first = min(span[0], len(words) - 1)
  context = " ".join(words)
  start = len(" ".join(words[:first])) + (1 if first else 0)
  answer = " ".join(words[first:first + span[1]])
  data = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
      {"id": "q", "question": "what is it", "answers": [{"text": answer,
                                                         "answer_start": start}]}]}]}]}
  examples = squad.parse_squad(data, "fuzz.json")
  features, meta = squad.convert_examples(examples, tokenizers["sentencepiece"],
                                          max_seq_length=32, doc_stride=8, max_query_length=8)
  assert len(features["input_ids"]) >= 1
  for k in range(len(features["input_ids"])):
    s, e = int(features["start_positions"][k]), int(features["end_positions"][k])
    if s == 0:
      assert e == 0
      continue
    lo, hi = int(meta["offsets"][k, s, 0]), int(meta["offsets"][k, e, 1])
    assert lo <= start and hi >= start + len(answer), (context, answer, lo, hi)
    assert np.all(meta["offsets"][k, s:e + 1] >= 0)
