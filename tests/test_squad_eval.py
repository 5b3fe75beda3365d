"""SQuAD scoring (the official scripts' numbers) and n-best span decoding."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from bert_jax import squad_eval
from bert_jax.data.errors import DataError

# ----------------------------------------------------------------------------- known answers

V1_KNOWN = [
    ("dev-v1.1.json", "BERT-ensemble_GoogleAI", 86.20624408703878, 92.19557978351145),
    ("dev-v1.1.json", "LogReg-baseline_Stanford", 40.14191106906339, 50.98153647324461),
    ("dev-v1.1-first2articles.json", "BERT-ensemble_GoogleAI", 89.59318826868495,
     92.91531551412452),
]

V2_KNOWN = {"exact": 76.8370607028754, "f1": 79.76284553235601, "total": 626,
            "HasAns_exact": 64.50511945392492, "HasAns_f1": 70.75611366298587,
            "HasAns_total": 293, "NoAns_exact": 87.68768768768768,
            "NoAns_f1": 87.68768768768768, "NoAns_total": 333}


@pytest.mark.parametrize("data,preds,em,f1", V1_KNOWN)
def test_v1_reproduces_official_scores(shared_data, capsys, data, preds, em, f1):
  root = shared_data / "squad_v1.1"
  result = squad_eval.main([str(root / data), str(root / f"predictions-dev-v1.1_{preds}.json")])
  assert result == {"exact_match": em, "f1": f1}  # every digit
  printed = capsys.readouterr()
  assert json.loads(printed.out) == result
  if "LogReg" in preds:  # 13 unanswered ids, each reported and scored 0
    assert printed.err.count("will receive score 0") == 13


def test_v2_reproduces_official_scores(shared_data, capsys):
  root = shared_data / "squad_v2.0"
  result = squad_eval.main([str(root / "dev-v2.0-first2articles_haystack-small.json"),
                            str(root / "predictions-dev-v2.0_BERT-single_GoogleAI.json")])
  assert result == V2_KNOWN
  assert list(result) == list(V2_KNOWN)  # the official key order
  assert json.loads(capsys.readouterr().out) == V2_KNOWN


def _minus_last_character(data):
  """Each question's first gold answer without its last character (kept whole up to 2)."""
  return {qa["id"]: a[:-1] if len(a) > 2 else a
          for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]
          for a in [qa["answers"][0]["text"]]}


def test_cmrc2018_scored_as_chinese(shared_data, tmp_path):
  """CMRC 2018 dev (3,219 questions), every answer missing its last character: "auto" scores it
  by characters. CMRC 2018's own evaluation script, run offline with the regex used here for
  NLTK's word tokenizer, gives the same figures to the last digit (EM 23.486, F1 90.157)."""
  path = shared_data / "squad_zh_cmrc2018/cmrc2018_dev.squad-style.json"
  preds = tmp_path / "preds.json"
  preds.write_text(json.dumps(_minus_last_character(squad_eval.load_json(path))))
  result = squad_eval.main([str(path), str(preds)])
  assert result == {"exact_match": 23.48555452003728, "f1": 90.15689891995552}
  assert squad_eval.main([str(path), str(preds), "--language", "zh"]) == result
  # English normalisation sees an unsegmented answer as one token: F1 falls to about EM.
  assert squad_eval.main([str(path), str(preds), "--language", "en"]) == {
      "exact_match": 11.680646163404784, "f1": 12.88300805542185}


def test_language_auto_follows_the_contexts(shared_data):
  for name, want in (("squad_v1.1/dev-v1.1.json", "en"),
                     ("squad_v2.0/dev-v2.0-first2articles_haystack-small.json", "en"),
                     ("squad_zh_cmrc2018/cmrc2018_dev.squad-style.json", "zh")):
    data = squad_eval.load_json(shared_data / name)
    contexts = [p["context"] for a in data["data"] for p in a["paragraphs"]]
    assert squad_eval.choose_language("auto", contexts) == want, name
  assert squad_eval.choose_language("auto", ["北京 is big", "北京大学"]) == "zh"  # 6 of 11
  assert squad_eval.choose_language("auto", ["北京 is a big city"]) == "en"  # 2 of 12
  assert squad_eval.choose_language("en", ["北京大学"]) == "en"


def test_v2_best_threshold_on_real_predictions(shared_data, tmp_path):
  root = shared_data / "squad_v2.0"
  data = squad_eval.load_json(root / "dev-v2.0-first2articles_haystack-small.json")
  preds = squad_eval.load_json(root / "predictions-dev-v2.0_BERT-single_GoogleAI.json")
  na = {k: 0.0 if v else 1.0 for k, v in preds.items()}  # the predictions' own no-answer calls
  result = squad_eval.evaluate(data, preds, na)
  assert result["exact"] == V2_KNOWN["exact"]  # 1.0 is not > 1.0: thresholding changes nothing
  assert result["best_exact"] >= result["exact"] and result["best_f1"] >= result["f1"]
  assert result["best_f1_thresh"] in (0.0, 1.0)


# ----------------------------------------------------------------------------- hand-made cases


def test_normalize_answer():
  assert squad_eval.normalize_answer("The  Quick, brown-fox!\n") == "quick brownfox"
  assert squad_eval.normalize_answer("An apple a day") == "apple day"
  assert squad_eval.normalize_answer("theory") == "theory"  # articles only as whole words
  assert squad_eval.normalize_answer("“Ünïcode” stays") == "“ünïcode” stays"  # ASCII punct only


def test_f1_partial_overlap():
  assert squad_eval.f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)
  assert squad_eval.f1_score("x b b", "b b b c") == pytest.approx(2 * (2 / 4) * (2 / 3) / (
      2 / 4 + 2 / 3))  # counts are clipped: two b's in common
  assert squad_eval.f1_score("red", "blue") == 0
  assert squad_eval.exact_score("The Cat.", "cat") == 1


def test_empty_answers_v1_vs_v2():
  # v1.1: no common token is 0, even when both sides normalise to nothing.
  assert squad_eval.f1_score("the", "a", empty_agrees=False) == 0
  # v2.0: "" is the answer to an unanswerable question.
  assert squad_eval.f1_score("", "") == 1
  assert squad_eval.f1_score("", "something") == 0


def test_chinese_segmentation_and_scores():
  # CMRC 2018's rules: its punctuation removed first (it does not split a run: no ASCII ( ) in
  # its list), each Chinese character a token, the other runs cut into words and symbols.
  assert squad_eval.segment_zh("光荣和ω-Force，2018年！(Tom Lee)～") == [
      "光", "荣", "和", "ωforce2018", "年", "(", "tom", "lee", ")"]
  assert squad_eval.normalize_answer_zh(" 《北京》大学。 ") == "北京大学"
  assert squad_eval.exact_score("《北京大学》", "北京大学。", "zh") == 1
  assert squad_eval.exact_score("北京大学", "北京 大学", "zh") == 0  # inner spaces count
  # F1 counts the longest common run of tokens, not a bag of them.
  assert squad_eval.f1_score("北京大学", "北京大", language="zh") == pytest.approx(6 / 7)
  assert squad_eval.f1_score("北京大学", "大学北京", language="zh") == pytest.approx(0.5)
  assert squad_eval.f1_score("北京大学", "大学北京") == 0  # en: one token each
  assert squad_eval.f1_score("2018年", "1999年", empty_agrees=False, language="zh") == 0.5
  assert squad_eval.f1_score("。", "", empty_agrees=False, language="zh") == 0
  assert squad_eval.f1_score("。", "", language="zh") == 1  # v2.0: both empty


def _dataset(qas, version="v2.0"):
  return {"version": version, "data": [{"title": "t", "paragraphs": [
      {"context": "the cat sat on the mat", "qas": qas}]}]}


V2_QAS = [
    {"id": "a", "question": "who?", "answers": [{"text": "the cat", "answer_start": 0}]},
    {"id": "b", "question": "where?", "answers": [{"text": "on the mat", "answer_start": 12}]},
    {"id": "n", "question": "why?", "answers": [], "is_impossible": True},
]


def test_v2_no_answer_scoring():
  data = _dataset(V2_QAS)
  preds = {"a": "cat", "b": "mat", "n": ""}
  r = squad_eval.evaluate(data, preds)
  assert r["NoAns_exact"] == 100.0 and r["NoAns_total"] == 1
  assert r["HasAns_exact"] == 50.0 and r["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
  # An answer to an unanswerable question scores 0; a threshold on na_probs turns it into "".
  preds["n"] = "the mat"
  assert squad_eval.evaluate(data, preds)["NoAns_exact"] == 0.0
  na = {"a": 0.1, "b": 0.2, "n": 0.9}
  r = squad_eval.evaluate(data, preds, na, na_prob_thresh=0.5)
  assert r["NoAns_exact"] == 100.0
  # Best threshold: answer a and b, abstain on n -> 1 + 2/3 + 1 out of 3 (F1).
  assert r["best_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
  assert r["best_f1_thresh"] == 0.2 and r["best_exact_thresh"] == 0.1


def test_v2_missing_predictions_are_left_out():
  r = squad_eval.evaluate(_dataset(V2_QAS), {"a": "the cat"})
  assert r["total"] == 1 and r["exact"] == 100.0 and "NoAns_total" not in r


def test_version_detection():
  v1 = _dataset(V2_QAS[:2], version="1.1")
  assert not squad_eval.is_v2(v1)
  assert squad_eval.evaluate(v1, {"a": "cat", "b": ""}) == {"exact_match": 50.0, "f1": 50.0}
  assert squad_eval.is_v2(_dataset(V2_QAS[:2]))  # "version": "v2.0"
  assert squad_eval.is_v2(_dataset(V2_QAS, version="1.1"))  # is_impossible present


@pytest.mark.parametrize("version", ["1.1", "v2.0"])
def test_integer_ids_are_compared_as_text(version):
  """The reader keys a JSON integer id 1 as "1" (and so do predictions.json files)."""
  qas = [{**qa, "id": k} for k, qa in enumerate(V2_QAS[:2], 1)]
  r = squad_eval.evaluate(_dataset(qas, version), {"1": "the cat", "2": "on the mat"})
  assert r["f1" if version == "v2.0" else "exact_match"] == 100.0


def test_duplicate_ids_are_refused(tmp_path):
  data = _dataset(V2_QAS)
  data["data"].append({"title": "u", "paragraphs": [{"context": "x", "qas": [V2_QAS[2]]}]})
  (tmp_path / "d.json").write_text(json.dumps(data))
  (tmp_path / "p.json").write_text(json.dumps({"a": "cat"}))
  with pytest.raises(DataError, match=r"d\.json: question id 'n' appears twice: article 0 "
                     r"\('t'\), paragraph 0, question 2 and article 1 \('u'\), paragraph 0, "
                     "question 0"):
    squad_eval.main([str(tmp_path / "d.json"), str(tmp_path / "p.json")])


ONE_PARAGRAPH = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "abc"}]}]}


@pytest.mark.parametrize("qas,message", [
    (None, r"d\.json: no questions"),
    ([], r"d\.json: no questions"),
    ("null", r"d\.json: article 0 \('t'\), paragraph 0: 'qas' must be a list of questions"),
    ([{"id": "q", "question": "x"}], r"d\.json with .*p\.json: question 'q' has no answers"),
    ([{"id": "q", "question": "x", "answers": [{"answer_start": 0}]}],
     r"d\.json with .*p\.json: question 'q': 'answers' must be a list of objects with a 'text'"),
])
def test_empty_or_malformed_data_files(tmp_path, qas, message):
  data = json.loads(json.dumps(ONE_PARAGRAPH))
  if qas is None:
    data["data"] = []
  else:
    data["data"][0]["paragraphs"][0]["qas"] = None if qas == "null" else qas
  (tmp_path / "d.json").write_text(json.dumps(data))
  (tmp_path / "p.json").write_text(json.dumps({"q": "abc"}))
  with pytest.raises(DataError, match=message):
    squad_eval.main([str(tmp_path / "d.json"), str(tmp_path / "p.json")])


def test_cli_reports_malformed_json(tmp_path):
  data = tmp_path / "data.json"
  data.write_text(json.dumps(_dataset(V2_QAS)))
  preds = tmp_path / "preds.json"
  preds.write_text('{"a": "cat",\n  "b": }')
  with pytest.raises(DataError, match=r"preds\.json: malformed JSON at line 2, column 8"):
    squad_eval.main([str(data), str(preds)])


# ----------------------------------------------------------------------------- decoding

CONTEXT = "alpha beta gamma delta"
#          0     6    11    17


def _meta(window_offsets, max_context, example_index=None):
  """Windows of 8 positions: [CLS] q [SEP] p... [SEP] pad; passage tokens at positions 3..."""
  n = len(window_offsets)
  offsets = np.full((n, 8, 2), -1, np.int32)
  ctx = np.zeros((n, 8), bool)
  for f, (spans, mc) in enumerate(zip(window_offsets, max_context, strict=True)):
    offsets[f, 3:3 + len(spans)] = spans
    ctx[f, 3:3 + len(mc)] = mc
  return {"example_index": np.asarray(example_index or [0] * n), "offsets": offsets,
          "max_context": ctx}


WORDS = [(0, 5), (6, 10), (11, 16), (17, 22)]
EXAMPLE = SimpleNamespace(qas_id="q1", context=CONTEXT)


def test_decode_picks_best_valid_span_across_windows():
  # Window 0 holds words 0-2, window 1 words 1-3; word 1 is max-context in window 0 only.
  meta = _meta([WORDS[:3], WORDS[1:]], [[1, 1, 0], [0, 1, 1]])
  start = np.zeros((2, 8))
  end = np.zeros((2, 8))
  start[0, 4] = 5.0  # "beta" in window 0
  end[0, 5] = 4.0  # ... to "gamma"
  start[1, 3] = 9.0  # "beta" in window 1: not its max-context window -> ignored
  end[1, 5] = 1.0  # "delta" in window 1
  start[0, 1] = end[0, 1] = 20.0  # question token: never an answer
  out = squad_eval.decode([EXAMPLE], meta, start, end, n_best_size=5, max_answer_length=3)
  assert out["predictions"] == {"q1": "beta gamma"}
  nbest = out["nbest_predictions"]["q1"]
  assert nbest[0] == {"text": "beta gamma", "probability": nbest[0]["probability"],
                      "start_logit": 5.0, "end_logit": 4.0}
  assert len({e["text"] for e in nbest}) == len(nbest)  # distinct texts
  assert sum(e["probability"] for e in nbest) == pytest.approx(1.0)
  assert "null_odds" not in out


def test_decode_respects_max_answer_length_and_order():
  meta = _meta([WORDS], [[1, 1, 1, 1]])
  start, end = np.zeros((1, 8)), np.zeros((1, 8))
  start[0, 3], end[0, 6] = 5.0, 5.0  # 4 tokens: too long for max 2
  end[0, 4] = 1.0
  start[0, 5] = 0.5  # "gamma": its end candidate "beta" comes before it; "gamma delta" is 5.5
  out = squad_eval.decode([EXAMPLE], meta, start, end, n_best_size=3, max_answer_length=2)
  assert out["predictions"]["q1"] == "alpha beta"  # 6.0
  texts = [e["text"] for e in out["nbest_predictions"]["q1"]]
  assert texts[:2] == ["alpha beta", "gamma delta"] and "alpha beta gamma delta" not in texts


def test_decode_v2_null_and_threshold():
  meta = _meta([WORDS[:2], WORDS[2:]], [[1, 1], [1, 1]])
  start, end = np.zeros((2, 8)), np.zeros((2, 8))
  start[:, 0] = [3.0, 1.0]
  end[:, 0] = [3.0, 0.5]  # null score: min over windows = 1.5
  start[1, 3], end[1, 4] = 1.0, 1.0  # best span "gamma delta": 2.0
  out = squad_eval.decode([EXAMPLE], meta, start, end, version_2=True)
  assert out["predictions"]["q1"] == "gamma delta"
  assert out["null_odds"]["q1"] == pytest.approx(-0.5)
  texts = [e["text"] for e in out["nbest_predictions"]["q1"]]
  assert "" in texts
  out = squad_eval.decode([EXAMPLE], meta, start, end, version_2=True,
                          null_score_diff_threshold=-1.0)
  assert out["predictions"]["q1"] == ""


@pytest.mark.parametrize("version_2", [False, True])
def test_a_span_of_no_characters_is_no_answer(version_2):
  """A SentencePiece "▁" standing alone covers no character (offset (5, 5) here): a span of
  only such pieces is no answer text, so it neither becomes the prediction "" nor takes the
  place of v2.0's no-answer entry, which keeps the null score's logits."""
  meta = _meta([[WORDS[0], (5, 5), *WORDS[1:3]]], [[1, 1, 1, 1]])
  start, end = np.zeros((1, 8)), np.zeros((1, 8))
  start[0, 4], end[0, 4] = 9.0, 9.0  # the empty piece alone: the top span, 18
  start[0, 5], end[0, 5] = 2.0, 2.0  # "beta": 4, or from the empty piece on (9 + 2) 11
  start[0, 0], end[0, 0] = 1.0, 1.0  # [CLS]: the null score, 2
  out = squad_eval.decode([EXAMPLE], meta, start, end, version_2=version_2)
  assert out["predictions"]["q1"] == "beta"
  nbest = out["nbest_predictions"]["q1"]
  assert nbest[0]["text"] == "beta"
  empty = [e for e in nbest if e["text"] == ""]
  if version_2:
    assert [(e["start_logit"], e["end_logit"]) for e in empty] == [(1.0, 1.0)]
    assert out["null_odds"]["q1"] == pytest.approx(2.0 - 11.0)
  else:
    assert not empty


def test_best_indexes_ties_keep_position_order():
  assert squad_eval.best_indexes(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]


def test_cli_checks_prediction_values(tmp_path):
  data = tmp_path / "data.json"
  data.write_text(json.dumps(_dataset(V2_QAS)))
  preds = tmp_path / "preds.json"
  preds.write_text('{"a": ["cat"]}')
  with pytest.raises(DataError, match=r"preds\.json: the value for 'a' is \['cat'\], not a string"):
    squad_eval.main([str(data), str(preds)])
  with pytest.raises(ValueError, match="v2.0 only"):
    squad_eval.evaluate(_dataset(V2_QAS[:2], "1.1"), {"a": ""}, {"a": 0.5})


def test_a_file_without_questions_is_one_line(tmp_path):
  import subprocess
  import sys
  (tmp_path / "d.json").write_text('{"version": "1.1", "data": []}')
  (tmp_path / "p.json").write_text("{}")
  out = subprocess.run([sys.executable, "-m", "bert_jax.squad_eval", str(tmp_path / "d.json"),
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'd.json'}: no questions (no " \
      "article has a paragraph with a non-empty 'qas' list)"


@pytest.mark.parametrize("version,answers,preds,message", [
    ("1.1", [], {"q1": "Hamlet"}, "question 'q1' has no answers"),
    ("v2.0", [{"text": "Hamlet", "answer_start": 0}], {"zz": "Hamlet"},
     "none of the 1 predictions is for a question"),
])
def test_unscorable_files_are_one_line(tmp_path, version, answers, preds, message):
  import subprocess
  import sys
  qa = {"id": "q1", "question": "who?", "answers": answers}
  if version == "v2.0":
    qa["is_impossible"] = False
  data = {"version": version, "data": [{"title": "t", "paragraphs": [
      {"context": "Hamlet is the Prince of Denmark.", "qas": [qa]}]}]}
  (tmp_path / "d.json").write_text(json.dumps(data))
  (tmp_path / "p.json").write_text(json.dumps(preds))
  out = subprocess.run([sys.executable, "-m", "bert_jax.squad_eval", str(tmp_path / "d.json"),
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {tmp_path / 'd.json'} with ") and message in last, out.stderr
