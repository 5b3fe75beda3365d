"""SQuAD reading, windows and offsets: hand-made cases and round trips on real data."""

import json
import re
import unicodedata

import numpy as np
import pytest

from bert_jax import squad_eval
from bert_jax.data import squad
from bert_jax.data.errors import DataError


class WhitespaceTok:
  """Words are tokens (ids from a growing table); [PAD]=0, [CLS]=1, [SEP]=2."""

  pad_id, cls_id, sep_id = 0, 1, 2

  def __init__(self):
    self.vocab = {}

  def encode_with_offsets(self, text):
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    return [self.vocab.setdefault(text[s:e], len(self.vocab) + 3) for s, e in spans], spans

  def encode(self, text):
    return self.encode_with_offsets(text)[0]


def _write(tmp_path, obj, name="d.json"):
  path = tmp_path / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
  return path


def _squad(qas, context="the cat sat on the mat near the cat door", version="1.1"):
  return {"version": version, "data": [{"title": "T", "paragraphs": [
      {"context": context, "qas": qas}]}]}


def _q(qid, text=None, start=None, **kw):
  answers = [] if text is None else [{"text": text, "answer_start": start}]
  return {"id": qid, "question": "where is it", "answers": answers, **kw}


# ----------------------------------------------------------------------------- reading


def test_read_refinds_mismatched_answer_nearest_occurrence(tmp_path):
  data = _squad([_q("ok", "the mat", 15), _q("near", "cat", 33), _q("gone", "dog", 4),
                 _q("first", "cat", -1)])
  ex = squad.read_squad(_write(tmp_path, data))
  assert [e.answer.start if e.answer else None for e in ex] == [15, 32, None, 4]
  assert ex[1].answers[0].given_start == 33
  counts = squad.answer_counts(ex)
  assert counts == {"questions": 4, "impossible": 0, "answers": 4, "refound": 2, "not_found": 1,
                    "untrainable": 1}


def test_training_skips_unfound_answers(tmp_path, caplog):
  ex = squad.read_squad(_write(tmp_path, _squad([_q("a", "cat", 4), _q("gone", "dog", 4)])))
  feats, meta = squad.convert_examples(ex, WhitespaceTok(), 32, 8, 8, is_training=True)
  assert meta["example_index"].tolist() == [0]
  assert "skipped 1 of 2 questions" in caplog.text
  feats, meta = squad.convert_examples(ex, WhitespaceTok(), 32, 8, 8, is_training=False)
  assert meta["example_index"].tolist() == [0, 1]


def test_malformed_json_names_file_line_and_column(tmp_path):
  path = _write(tmp_path, '{"data": [\n  {"paragraphs": [}\n]}')
  with pytest.raises(DataError, match=r"d\.json: malformed JSON at line 2, column 19"):
    squad.read_squad(path)


def test_question_without_id(tmp_path):
  qa = _q("x", "cat", 4)
  del qa["id"]
  with pytest.raises(DataError, match=r"d\.json: article 0 \('T'\), paragraph 0, question 0: "
                     r"a question without an 'id'"):
    squad.read_squad(_write(tmp_path, _squad([qa])))


def test_answer_outside_context(tmp_path):
  with pytest.raises(DataError, match=r"question 1 \(id 'b'\), answer 0: answer 'door' at "
                     r"characters \[40, 44\) lies outside the context \(40 characters\)"):
    squad.read_squad(_write(tmp_path, _squad([_q("a", "cat", 4), _q("b", "door", 40)])))


def test_a_lone_surrogate_names_the_question(tmp_path):
  """json.loads accepts "\\ud83d" (half of a UTF-16 pair): the tokenizer's refusal names the
  question it came from."""
  from bert_jax import tokenizer
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]) + "\n")
  path = _write(tmp_path, json.dumps(_squad([_q("a", "cat", 4)], context="the cat \ud83d")))
  with pytest.raises(DataError, match=r"question 'a': text with a lone surrogate U\+D83D"):
    squad.convert_examples(squad.read_squad(path), tokenizer.load(vocab), 32, 8, 8, True)


def test_not_a_squad_file(tmp_path):
  with pytest.raises(DataError, match="expected an object with a 'data' list"):
    squad.read_squad(_write(tmp_path, [1, 2]))


def test_duplicate_question_ids_are_refused(tmp_path):
  """Predictions are keyed by id: a second question with the same id (1 and "1" are one id)
  would overwrite the first one's answer. The error names the file, the id and both places."""
  data = _squad([_q("a", "cat", 4), _q(7, "mat", 19)])
  data["data"].append({"title": "U", "paragraphs": [{"context": "the dog ran", "qas": [
      _q("b", "dog", 4), _q("7", "dog", 4)]}]})
  with pytest.raises(DataError, match=r"d\.json: question id '7' appears twice: article 0 "
                     r"\('T'\), paragraph 0, question 1 and article 1 \('U'\), paragraph 0, "
                     r"question 1"):
    squad.read_squad(_write(tmp_path, data))


@pytest.mark.parametrize("data,message", [
    ({"version": "1.1", "data": []}, r"no questions"),
    (_squad([]), r"no questions"),
    (_squad(None), r"article 0 \('T'\), paragraph 0: 'qas' must be a list of questions, got "
                   r"NoneType"),
])
def test_empty_or_malformed_files_are_refused(tmp_path, data, message):
  with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'd.json'))}: {message}"):
    squad.read_squad(_write(tmp_path, data))


# ----------------------------------------------------------------------------- windows


def test_doc_windows_cover_the_passage():
  assert squad.doc_windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
  assert squad.doc_windows(3, 4, 2) == [(0, 3)]
  assert squad.doc_windows(9, 4, 8) == [(0, 4), (4, 4), (8, 1)]  # stride capped by the length


def _bert_is_max_context(windows, cur, pos):
  """BERT's _check_is_max_context, written as a loop, to compare against."""
  best_score, best = None, None
  for i, (start, length) in enumerate(windows):
    end = start + length - 1
    if start <= pos <= end:
      score = min(pos - start, end - pos) + 0.01 * length
      if best_score is None or score > best_score:
        best_score, best = score, i
  return cur == best


def test_max_context_matches_bert():
  for n, size, stride in ((10, 4, 3), (23, 7, 2), (5, 5, 1), (40, 9, 4)):
    windows = squad.doc_windows(n, size, stride)
    got = squad.max_context(windows, n)
    want = [[_bert_is_max_context(windows, w, p) for p in range(s, s + length)]
            for w, (s, length) in enumerate(windows)]
    assert [g.tolist() for g in got] == want
    per_token = np.zeros(n, int)
    for (s, length), g in zip(windows, got, strict=True):
      per_token[s:s + length] += g
    assert (per_token == 1).all()  # exactly one window per token


def _dense_max_context(windows, n_tokens):
  """The former formulation: a float64 [windows, n_tokens] score matrix and its argmax."""
  pos = np.arange(n_tokens)
  scores = np.full((len(windows), n_tokens), -np.inf)
  for w, (start, length) in enumerate(windows):
    inside = (pos >= start) & (pos < start + length)
    score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
    scores[w] = np.where(inside, score, -np.inf)
  return np.argmax(scores, axis=0)[None, :] == np.arange(len(windows))[:, None]


def test_max_context_same_flags_as_dense_formulation():
  """Random layouts (any order, overlaps, equal lengths that tie): each window's flags for its
  tokens are those of the dense matrix, ties going to the earlier window."""
  rng = np.random.default_rng(0)
  for _ in range(300):
    n = int(rng.integers(1, 60))
    windows = [(int(s), int(rng.integers(1, n - s + 1)))
               for s in rng.integers(0, n, size=rng.integers(1, 9))]
    if rng.random() < 0.5:  # the real layouts too
      windows = squad.doc_windows(n, int(rng.integers(1, 12)), int(rng.integers(1, 8)))
    dense = _dense_max_context(windows, n)
    got = squad.max_context(windows, n)
    assert len(got) == len(windows)
    for w, (s, length) in enumerate(windows):
      assert got[w].dtype == bool and got[w].tolist() == dense[w, s:s + length].tolist()


def test_max_context_memory_is_linear_in_the_passage():
  """A 20,000-token passage in 399 windows: the flags hold each window's own tokens only, and
  the call allocates a few arrays of the passage's length (the dense matrix was 64 MB)."""
  import tracemalloc
  n = 20_000
  windows = squad.doc_windows(n, 100, 50)
  tracemalloc.start()
  try:
    flags = squad.max_context(windows, n)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 64 * n, peak  # measured: 410,856 bytes; the dense one 128,180,956
  assert [f.shape for f in flags] == [(length,) for _, length in windows]
  assert sum(int(f.sum()) for f in flags) == n


def test_max_context_computed_once_per_window_layout(monkeypatch):
  """Questions of one length on one passage share its windows and their flags."""
  calls = []
  real = squad.max_context
  monkeypatch.setattr(squad, "max_context", lambda w, n: calls.append(n) or real(w, n))
  context = " ".join(f"w{i}" for i in range(300))
  qas = [_q("a", "w5", 15), _q("b", "w9", 27), {**_q("c", "w9", 27), "question": "where"}]
  feats, meta = squad.convert_examples(squad.parse_squad(_squad(qas, context)), WhitespaceTok(),
                                       32, 8, 8, is_training=False)
  assert calls == [300, 300]  # "where is it" twice, then "where"
  assert meta["example_index"].tolist().count(0) == meta["example_index"].tolist().count(1)


def test_feature_layout():
  context = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
  data = _squad([_q("a", "w6 w7", 18), _q("n", is_impossible=True)], context, version="v2.0")
  ex = squad.parse_squad(data)
  tok = WhitespaceTok()
  feats, meta = squad.convert_examples(ex, tok, max_seq_length=12, doc_stride=3,
                                       max_query_length=2)
  # [CLS] where is [SEP] + 7 passage tokens + [SEP] = 12; windows start at 0 and 3.
  assert meta["example_index"].tolist() == [0, 0, 1, 1]
  ids = feats["input_ids"]
  assert ids.shape == (4, 12) and ids.dtype == np.int32
  assert ids[0, 0] == tok.cls_id and ids[0, 3] == tok.sep_id and ids[0, 11] == tok.sep_id
  assert feats["segment_ids"][0].tolist() == [0] * 4 + [1] * 8
  assert feats["input_mask"].all()
  # The answer w6 w7 (tokens 6, 7): window 0 holds w0..w6 only -> [CLS]; window 1 holds w3..w9.
  assert feats["start_positions"].tolist() == [0, 4 + 3, 0, 0]
  assert feats["end_positions"].tolist() == [0, 4 + 4, 0, 0]
  assert meta["offsets"][1, 4 + 3].tolist() == [18, 20]
  assert (meta["offsets"][:, :4] == -1).all() and (meta["offsets"][:, 11] == -1).all()
  # w3..w6 are in both windows: w3, w4 have more context in window 0, w5, w6 in window 1.
  assert meta["max_context"][0, 4:11].tolist() == [1, 1, 1, 1, 1, 0, 0]
  assert meta["max_context"][1, 4:11].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_padding_and_short_windows():
  ex = squad.parse_squad(_squad([_q("a", "cat", 4)], "the cat"))
  feats, meta = squad.convert_examples(ex, WhitespaceTok(), 16, 4, 4)
  assert feats["input_mask"][0].tolist() == [1] * 8 + [0] * 8
  assert (feats["input_ids"][0, 8:] == 0).all() and (feats["segment_ids"][0, 8:] == 0).all()
  assert feats["start_positions"].tolist() == [6] and feats["end_positions"].tolist() == [6]


def test_query_truncated_and_too_short_sequence_rejected():
  ex = squad.parse_squad(_squad([_q("a", "cat", 4)], "the cat"))
  with pytest.raises(ValueError, match="max_seq_length=6 leaves no room"):
    squad.convert_examples(ex, WhitespaceTok(), 6, 4, 3)
  feats, _ = squad.convert_examples(ex, WhitespaceTok(), 7, 4, 1)  # question cut to 1 token
  assert feats["input_ids"].shape == (1, 7)
  # A stride of 0 would never reach the passage's end: refused, as is a question of no tokens.
  with pytest.raises(ValueError, match=r"data.doc_stride=0: expected a positive number"):
    squad.convert_examples(ex, WhitespaceTok(), 16, 0, 4)
  with pytest.raises(ValueError, match=r"data.max_query_length=-1: expected a positive number"):
    squad.convert_examples(ex, WhitespaceTok(), 16, 4, -1)


def test_token_span_partial_tokens():
  offsets = np.array([[0, 3], [4, 7], [7, 9], [10, 12]])
  assert squad.token_span(offsets, 5, 8) == (1, 2)
  assert squad.token_span(offsets, 3, 4) is None  # only whitespace
  assert squad.token_span(offsets, 0, 12) == (0, 3)


def test_decode_of_gold_positions_gives_gold_answers():
  context = " ".join(f"w{i}" for i in range(30))
  qas = [_q(f"q{i}", f"w{i} w{i + 1}", context.index(f"w{i} ")) for i in range(0, 28, 3)]
  examples = squad.parse_squad(_squad(qas, context))
  feats, meta = squad.convert_examples(examples, WhitespaceTok(), 16, 4, 3)
  preds = _decode_gold(examples, feats, meta)
  result = squad_eval.evaluate(_squad(qas, context), preds)
  assert result == {"exact_match": 100.0, "f1": 100.0}


@pytest.mark.parametrize("threshold,answer", [(3.0, "cat"), (0.0, "")])
def test_evaluation_scores_the_predictions_it_writes(tmp_path, threshold, answer):
  """The evaluation of a v2.0 run (which picks its best checkpoint) scores predictions.json as
  written: the null score beats the best span by 2, so with data.null_score_diff_threshold 3
  the question is answered, and counted as answered (the official script's default threshold
  of 1.0 on the null odds would count it unanswered); with 0 it is unanswered."""
  from bert_jax import tasks
  from configs import squad as squad_config
  path = _write(tmp_path, _squad([_q("q", "cat", 4, is_impossible=False)], version="v2.0"))
  cfg = squad_config.get_config("tiny")
  cfg.data.train_file = cfg.data.eval_file = str(path)
  cfg.data.null_score_diff_threshold = threshold
  task = tasks.SquadTask(cfg, WhitespaceTok())
  start = np.zeros(task.eval_features()["input_ids"].shape)
  start[0, 0] = 2.0  # [CLS]: null score 2 + 2
  start[0, 6] = 1.0  # [CLS] where is it [SEP] the cat: "cat" from 6 to 6 scores 1 + 1
  results, files = task.evaluate({"start_logits": start, "end_logits": start.copy()})
  assert files["predictions.json"] == {"q": answer}
  assert files["null_odds.json"]["q"] == pytest.approx(2.0)
  want = 100.0 if answer else 0.0
  assert results["exact"] == results["f1"] == want, results


def _squad_task(path, chars=False, **data):
  """The SQuAD task of the tiny config training and evaluating on `path`."""
  from bert_jax import tasks
  from configs import squad as squad_config
  cfg = squad_config.get_config("tiny")
  cfg.data.train_file = cfg.data.eval_file = str(path)
  cfg.data.update(data)
  return tasks.SquadTask(cfg, CharTok() if chars else WhitespaceTok())


def _peaked(task, positions):
  """Start and end logits peaked at (window, first token, last token) per window."""
  start = np.zeros(task.eval_features()["input_ids"].shape)
  end = start.copy()
  for f, a, b in positions:
    start[f, a], end[f, b] = 10.0, 10.0
  return {"start_logits": start, "end_logits": end}


def test_integer_question_ids_are_scored(tmp_path):
  """JSON integer ids: predictions.json keys them as text ("1"), and the run's own scores find
  them (they scored 0, every question "unanswered")."""
  path = _write(tmp_path, _squad([_q(1, "cat", 4), _q(2, "mat", 19)]))
  task = _squad_task(path)
  # [CLS] where is it [SEP] the cat sat on the mat ...: "cat" at 6, "mat" at 10
  results, files = task.evaluate(_peaked(task, [(0, 6, 6), (1, 10, 10)]))
  assert files["predictions.json"] == {"1": "cat", "2": "mat"}
  assert results == {"exact_match": 100.0, "f1": 100.0}


def test_an_evaluation_file_without_questions_is_refused_at_setup(tmp_path):
  train = _write(tmp_path, _squad([_q("a", "cat", 4)]), "train.json")
  empty = _write(tmp_path, {"version": "1.1", "data": [{"title": "T", "paragraphs": [
      {"context": "the cat", "qas": []}]}]}, "eval.json")
  from bert_jax import tasks
  from configs import squad as squad_config
  cfg = squad_config.get_config("tiny")
  cfg.data.train_file, cfg.data.eval_file = str(train), str(empty)
  with pytest.raises(DataError, match=r"eval\.json: no questions"):
    tasks.SquadTask(cfg, WhitespaceTok()).metric_names  # noqa: B018


class CharTok(WhitespaceTok):
  """Every non-space character a token (Chinese text has no spaces)."""

  def encode_with_offsets(self, text):
    spans = [(i, i + 1) for i, c in enumerate(text) if not c.isspace()]
    return [self.vocab.setdefault(text[s:e], len(self.vocab) + 3) for s, e in spans], spans


ZH_CONTEXT = "北京大学位于北京市海淀区。"


@pytest.mark.parametrize("language,f1", [("auto", 100 * 2 * 3 / 7), ("zh", 100 * 2 * 3 / 7),
                                         ("en", 0.0)])
def test_chinese_answers_scored_by_characters(tmp_path, language, f1):
  """data.language picks the scoring of the run's evaluation (and so of best/): "auto" takes
  CMRC 2018's for Chinese contexts. The answer 北京大学 predicted as 北京大 (3 of 4 characters)
  has F1 6/7; English normalisation sees one token each and scores 0."""
  path = _write(tmp_path, _squad([_q("z", "北京大学", 0)], ZH_CONTEXT))
  task = _squad_task(path, language=language, chars=True)
  assert task.language == ("en" if language == "en" else "zh")
  # [CLS] w h e r e i s i t [SEP] 北 京 大 ...: 9 question characters, the passage from 11
  results, files = task.evaluate(_peaked(task, [(0, 11, 13)]))
  assert files["predictions.json"] == {"z": "北京大"}
  assert results["exact_match"] == 0.0 and results["f1"] == pytest.approx(f1)


def test_unknown_language_is_a_config_error(tmp_path):
  from bert_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"data\.language='fr': expected one of auto, en, zh"):
    _squad_task(_write(tmp_path, _squad([_q("a", "cat", 4)])), language="fr")


def _decode_gold(examples, feats, meta):
  """Logits peaked at the training positions of every window that holds the answer."""
  n, t = feats["input_ids"].shape
  start, end = np.zeros((n, t)), np.zeros((n, t))
  start[np.arange(n), feats["start_positions"]] = 10.0
  end[np.arange(n), feats["end_positions"]] = 10.0
  return squad_eval.decode(examples, meta, start, end)["predictions"]


# ----------------------------------------------------------------------------- real tokenizers


def _is_split_char(c: str) -> bool:
  o = ord(c)
  return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
          or 0x20000 <= o <= 0x2FA1F or unicodedata.category(c).startswith("P"))


class SentencePieceTok:
  """Stand-in for bert_jax.tokenizer's SentencePiece: CJK characters and punctuation are pieces
  of their own (as BERT's basic tokenizer splits them); offsets in characters."""

  pad_id, cls_id, sep_id = 0, 1, 2

  def __init__(self, path):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_file=str(path))

  def _chunks(self, text):
    start = 0
    for i, c in enumerate(text):
      if _is_split_char(c):
        if i > start:
          yield start, text[start:i]
        yield i, c
        start = i + 1
    if start < len(text):
      yield start, text[start:]

  def encode_with_offsets(self, text):
    ids, offsets = [], []
    for base, chunk in self._chunks(text):
      char_of = np.repeat(np.arange(len(chunk) + 1),
                          [len(c.encode("utf-8")) for c in chunk] + [1])
      for p in self.sp.encode(chunk, out_type="proto").pieces:
        if p.piece != "▁" or p.begin != p.end:
          ids.append(p.id)
          offsets.append((base + int(char_of[p.begin]), base + int(char_of[p.end])))
    return ids, offsets

  def encode(self, text):
    return self.encode_with_offsets(text)[0]


class WordPieceTok:
  pad_id, cls_id, sep_id = 0, 2, 3

  def __init__(self, vocab):
    from tokenizers import BertWordPieceTokenizer
    self.tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
    v = self.tok.get_vocab()
    self.pad_id, self.cls_id, self.sep_id = v["[PAD]"], v["[CLS]"], v["[SEP]"]

  def encode_with_offsets(self, text):
    e = self.tok.encode(text, add_special_tokens=False)
    return e.ids, e.offsets

  def encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids


def _wordpiece(texts, tmp_path):
  from tokenizers import BertWordPieceTokenizer
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(texts, vocab_size=8000, min_frequency=2)
  trainer.save_model(str(tmp_path))
  return _load(tmp_path / "vocab.txt", lambda p: WordPieceTok(p))


def _sentencepiece(texts, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
  try:
    from bert_jax import tokenizer
  except ImportError:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=8000,
        model_type="unigram", character_coverage=0.9995, pad_id=0, unk_id=3, bos_id=-1,
        eos_id=-1, user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2)
    return SentencePieceTok(tmp_path / "sp.model")
  return tokenizer.load(tokenizer.train_sentencepiece([str(corpus)], 8000, str(tmp_path / "sp")))


def _load(path, fallback):
  """bert_jax.tokenizer when it exists, else the stand-in."""
  try:
    from bert_jax import tokenizer
  except ImportError:
    return fallback(path)
  return tokenizer.load(path)


def round_trip_rate(examples, tok, max_seq_length=384, doc_stride=128):
  """Share of answerable questions whose training answer -> window tokens -> context characters
  equals the gold text after the official normalisation; and the failures."""
  feats, meta = squad.convert_examples(examples, tok, max_seq_length, doc_stride, 64)
  got = {}
  for f in np.flatnonzero(feats["start_positions"] > 0):
    ex = examples[meta["example_index"][f]]
    s, e = feats["start_positions"][f], feats["end_positions"][f]
    got[ex.qas_id] = ex.context[meta["offsets"][f, s, 0]:meta["offsets"][f, e, 1]]
  answerable = [ex for ex in examples if not ex.is_impossible and ex.answer is not None]
  bad = [(ex.answer.text, got.get(ex.qas_id)) for ex in answerable
         if squad_eval.normalize_answer(got.get(ex.qas_id, "")) !=
         squad_eval.normalize_answer(ex.answer.text)]
  return 1 - len(bad) / len(answerable), bad


SETS = {"squad": "squad_v1.1/dev-v1.1.json",
        "cmrc": "squad_zh_cmrc2018/cmrc2018_dev.squad-style.json"}


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
@pytest.mark.parametrize("name", ["squad", "cmrc"])
def test_answer_offsets_round_trip(shared_data, tmp_path, name, kind):
  examples = squad.read_squad(shared_data / SETS[name])
  if kind == "sentencepiece":  # the slower one: every third question
    examples = examples[::3]
  contexts = list(dict.fromkeys(ex.context for ex in examples))
  make = _wordpiece if kind == "wordpiece" else _sentencepiece
  tok = make(contexts, tmp_path)
  rate, bad = round_trip_rate(examples, tok)
  assert rate >= 0.995, (rate, bad[:20])


def test_cmrc_answer_starts_refound(shared_data):
  counts = squad.answer_counts(squad.read_squad(shared_data / SETS["cmrc"]))
  # 200 of 9,657 answer_start offsets do not match: 7 re-found, 193 (answer_start -1, a
  # paraphrase) not in the context; every question keeps a trainable answer.
  assert counts == {"questions": 3219, "impossible": 0, "answers": 9657, "refound": 7,
                    "not_found": 193, "untrainable": 0}


def test_v2_real_slice_gold_decoding(shared_data):
  path = shared_data / "squad_v2.0/dev-v2.0-first2articles_haystack-small.json"
  examples = squad.read_squad(path)
  tok = WhitespaceTok()
  feats, meta = squad.convert_examples(examples, tok, 128, 64, 32, is_training=False)
  n, t = feats["input_ids"].shape
  start, end = np.full((n, t), -5.0), np.full((n, t), -5.0)
  for f in range(n):  # gold spans where the window holds them, else the null at [CLS]
    s, e = feats["start_positions"][f], feats["end_positions"][f]
    start[f, s], end[f, e] = 10.0, 10.0
  out = squad_eval.decode(examples, meta, start, end, version_2=True)
  result = squad_eval.evaluate(squad.load_json(path), out["predictions"], out["null_odds"])
  assert result["NoAns_exact"] == 100.0 and result["HasAns_exact"] > 95.0
  assert set(out["null_odds"]) == {ex.qas_id for ex in examples}
