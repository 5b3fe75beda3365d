"""Classification readers (TSV/CSV/JSONL), features and metrics."""

import json

import numpy as np
import pytest

from bert_jax.data import classification as cls
from bert_jax.data.errors import DataError


class WordTok:
  """Whitespace words -> ids from a growing table; [PAD]=0, [CLS]=1, [SEP]=2."""

  pad_id, cls_id, sep_id = 0, 1, 2

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    return [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]


def _file(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


# ----------------------------------------------------------------------------- real data


def test_rt_polarity(shared_data):
  root = shared_data / "classification" / "rt_polarity"
  train, labels = cls.read_examples(root / "train.tsv", text_a=0, label=1)
  dev, _ = cls.read_examples(root / "dev.tsv", text_a="sentence", label="label", labels=labels)
  assert labels == ["0", "1"]
  assert len(train) == 9596 and len(dev) == 1066  # the header row is detected and skipped
  assert train[0].line == 2 and train[0].text_b is None and train[0].label == "1"
  tok = WordTok()
  feats = cls.convert_examples(dev, tok, 48, labels)
  assert feats["input_ids"].shape == (1066, 48) and feats["label"].dtype == np.int32
  assert set(np.unique(feats["label"])) == {0, 1}
  n = feats["input_mask"].sum(1)
  assert (feats["input_ids"][:, 0] == tok.cls_id).all()
  assert (feats["input_ids"][np.arange(1066), n - 1] == tok.sep_id).all()
  assert (feats["segment_ids"] == 0).all()
  assert n.max() == 48  # some reviews are truncated


def test_qnli_pairs(shared_data):
  path = shared_data / "classification" / "glue_qnli" / "dev.tsv"
  examples, labels = cls.read_examples(path, text_a="question", text_b="sentence", label="label",
                                       id_column="index")
  assert labels == ["entailment", "not_entailment"] and len(examples) == 5463
  assert examples[0].guid == "0" and examples[0].text_a.startswith("What came into force")
  assert sum(ex.label == "entailment" for ex in examples) == 2702
  feats = cls.convert_examples(examples, WordTok(), 48, labels)
  seg, mask = feats["segment_ids"], feats["input_mask"]
  assert ((seg == 1) <= (mask == 1)).all() and (seg[:, 0] == 0).all()
  assert (seg.sum(1) > 1).all()  # every pair keeps part of B and its [SEP]
  # Predictions map back through example_index.
  assert feats["example_index"].tolist() == list(range(5463))


# ----------------------------------------------------------------------------- formats


def test_formats_agree(tmp_path):
  rows = [("a good film", "it was fun", "pos"), ("bad", "so dull", "neg"), ("ok", "fine", "pos")]
  tsv = _file(tmp_path, "d.tsv", "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
  csv_ = _file(tmp_path, "d.csv", "s1,s2,y\n" + "".join(f'"{a}","{b}",{y}\n' for a, b, y in rows))
  jsonl = _file(tmp_path, "d.jsonl", "".join(
      json.dumps({"s1": a, "s2": b, "y": y}) + "\n" for a, b, y in rows) + "\n")
  got = [cls.read_examples(tsv, 0, 1, 2), cls.read_examples(csv_, "s1", "s2", "y", header=True),
         cls.read_examples(jsonl, "s1", "s2", "y")]
  for examples, labels in got:
    assert labels == ["neg", "pos"]
    assert [(e.text_a, e.text_b, e.label) for e in examples] == rows


def test_csv_quoted_fields_and_line_numbers(tmp_path):
  path = _file(tmp_path, "d.csv", 'text,label\n"one, with comma",1\n"two\nlines",0\n"x",1,extra\n')
  with pytest.raises(DataError, match=r"d\.csv:5: expected 2 columns, got 3"):
    cls.read_examples(path, "text", label="label")


def test_pair_truncation_takes_from_the_longer():
  a, b = cls.truncate_pair(list(range(10)), list(range(3)), 8)
  assert (len(a), len(b)) == (5, 3)
  a, b = cls.truncate_pair([1, 2, 3], [4, 5, 6], 4)
  assert (a, b) == ([1, 2], [4, 5])
  ex = cls.Example("g", "a b c d e f", "x y", "1", 1)
  tok = WordTok()
  ids, seg = cls.encode_example(ex, tok, 8)
  assert len(ids) == 8 and seg == [0] * 5 + [1] * 3  # [CLS] a b c [SEP] x y [SEP]


def test_labels_sorted_numerically_and_regression(tmp_path):
  path = _file(tmp_path, "d.tsv", "s\t10\nt\t2\nu\t2\n")
  assert cls.read_examples(path, 0, label=1)[1] == ["2", "10"]
  path = _file(tmp_path, "r.tsv", "sentence\tscore\ns\t4.5\nt\t0.25\n")
  examples, labels = cls.read_examples(path, "sentence", label="score", regression=True)
  assert labels == [] and [e.label for e in examples] == [4.5, 0.25]
  feats = cls.convert_examples(examples, WordTok(), 8, labels, regression=True)
  assert feats["label"].dtype == np.float32 and feats["label"].tolist() == [4.5, 0.25]


def test_unlabelled_rows_for_prediction(tmp_path):
  path = _file(tmp_path, "p.tsv", "only text\nmore text\n")
  examples, labels = cls.read_examples(path, 0, label=None)
  feats = cls.convert_examples(examples, WordTok(), 8, ["neg", "pos"])
  assert labels == [] and feats["label"].tolist() == [-1, -1]
  assert examples[1].guid == "p.tsv:2"


# ----------------------------------------------------------------------------- bad input


def test_wrong_number_of_columns(tmp_path):
  path = _file(tmp_path, "bad.tsv", "sentence\tlabel\ngood\t1\nno label here\nfine\t0\n")
  with pytest.raises(DataError, match=r"bad\.tsv:3: expected 2 columns, got 1"):
    cls.read_examples(path, "sentence", label="label")


def test_label_not_seen_in_training(tmp_path):
  _, labels = cls.read_examples(_file(tmp_path, "train.tsv", "a\tpos\nb\tneg\n"), 0, label=1)
  dev = _file(tmp_path, "dev.tsv", "c\tpos\nd\tneutral\n")
  with pytest.raises(DataError, match=r"dev\.tsv:2: label 'neutral' was not seen in training; "
                     r"known labels: \['neg', 'pos'\]"):
    cls.read_examples(dev, 0, label=1, labels=labels)


def test_other_errors(tmp_path):
  with pytest.raises(DataError, match="no header row"):
    cls.read_examples(_file(tmp_path, "a.tsv", "x\t1\n"), "sentence", label=1)
  with pytest.raises(DataError, match=r"no column 'text' in the header \['sentence', 'label'\]"):
    cls.read_examples(_file(tmp_path, "b.tsv", "sentence\tlabel\nx\t1\n"), "text", label=1)
  with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON"):
    cls.read_examples(_file(tmp_path, "c.jsonl", '{"t": "x", "l": 1}\n{"t": \n'), "t", label="l")
  with pytest.raises(DataError, match=r"d\.jsonl:1: no key 'label'"):
    cls.read_examples(_file(tmp_path, "d.jsonl", '{"t": "x", "l": 1}\n'), "t", label="label")
  with pytest.raises(DataError, match=r"e\.tsv:2: regression label 'high' is not a number"):
    cls.read_examples(_file(tmp_path, "e.tsv", "x\t1.0\ny\thigh\n"), 0, label=1,
                      regression=True)
  with pytest.raises(DataError, match="unknown format 'txt'"):
    cls.read_examples(_file(tmp_path, "f.txt", "x\t1\n"), 0, label=1)
  with pytest.raises(DataError, match="column index 2 is out of range"):
    cls.read_examples(_file(tmp_path, "g.tsv", "x\t1\n"), 0, label=2)


@pytest.mark.parametrize("name, text, message", [
    ("empty.tsv", "a\t1\nb\t\nc\t0\n", r"empty\.tsv:2: no label in column 1"),
    ("null.jsonl", '{"t": "a", "l": 1}\n{"t": "b", "l": null}\n',
     r"null\.jsonl:2: no label in column 'l'"),
    ("nan.tsv", "a\t1.0\nb\tnan\n", r"nan\.tsv:2: regression label 'nan' is not a finite"),
    ("header.tsv", "phrase\trating\na\t1.0\n",
     r"header\.tsv:1: regression label 'rating' is not a number \(if this row is a header, set "
     r"data\.header=1\)"),
])
def test_a_row_without_a_usable_label_is_an_error(tmp_path, name, text, message):
  """A missing label would otherwise become a class "" (TSV) or train as class -1 (JSONL)."""
  column = "l" if name.endswith("jsonl") else 1
  with pytest.raises(DataError, match=message):
    cls.read_examples(_file(tmp_path, name, text), "t" if column == "l" else 0, label=column,
                      regression=name in ("nan.tsv", "header.tsv"))


def test_an_unknown_header_is_warned_about(tmp_path, caplog):
  text = "phrase\tsentiment\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(6))
  caplog.set_level("WARNING")
  examples, labels = cls.read_examples(_file(tmp_path, "h.tsv", text), 0, label=1)
  assert labels == ["0", "1", "sentiment"] and len(examples) == 7  # read as data, as asked
  assert "h.tsv:1: label 'sentiment' occurs on this first row only" in caplog.text
  assert "data.header=1" in caplog.text
  caplog.clear()
  cls.read_examples(_file(tmp_path, "h.tsv", text), 0, label=1, header=True)
  cls.read_examples(_file(tmp_path, "k.tsv", "sentence\tlabel\n" + text[18:]), 0, label=1)
  assert not caplog.text


# ----------------------------------------------------------------------------- metrics


def test_binary_metrics_by_hand():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, -1])  # the last row is unlabelled
  preds = np.array([1, 1, 0, 1, 0, 0, 0, 1])
  m = cls.compute_metrics(preds, labels)
  tp, fp, fn, tn = 2, 1, 1, 3
  assert m["accuracy"] == pytest.approx(5 / 7)
  assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert m["mcc"] == pytest.approx(mcc)
  logits = np.eye(2)[preds]
  assert cls.compute_metrics(logits, labels) == m


def test_multiclass_metrics_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0])
  m = cls.compute_metrics(preds, labels, num_labels=3)
  f1s = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)]
  assert m["f1"] == pytest.approx(np.mean(f1s))
  # R_K from the confusion matrix: c = 4 correct of s = 6, t = (2,2,2), p = (2,3,1).
  cov = 4 * 6 - (2 * 2 + 3 * 2 + 1 * 2)
  assert m["mcc"] == pytest.approx(cov / np.sqrt((36 - (4 + 9 + 1)) * (36 - 12)))
  assert cls.compute_metrics(np.zeros(4, int), np.zeros(4, int))["mcc"] == 0.0  # undefined -> 0


def test_regression_metrics_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  y = rng.integers(0, 5, 200).astype(np.float32)  # many ties
  p = y + rng.normal(0, 1.5, 200)
  p[:20] = np.round(p[:20])
  m = cls.compute_metrics(p[:, None], y, is_regression=True)
  assert m["pearson"] == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-12)
  assert m["spearman"] == pytest.approx(stats.spearmanr(p, y)[0], abs=1e-12)
  assert m["mse"] == pytest.approx(np.mean((p - y) ** 2))
  assert cls.rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
