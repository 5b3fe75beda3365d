"""SQuAD v1.1 / v2.0 scoring (the numbers of the official scripts) and n-best span decoding.

  python -m bert_jax.squad_eval dev-v2.0.json predictions.json --na-prob-file null_odds.json

Scoring follows the official evaluation scripts: answers are normalised (lower case, ASCII
punctuation, articles a/an/the and extra whitespace removed), exact match and bag-of-token F1 take
the max over the gold answers. v1.1 scores an unanswered question 0 (and says so on stderr);
v2.0 scores only the answered ids, counts "" as the answer to an unanswerable question and, given
no-answer probabilities, finds the best no-answer threshold. Question ids are compared as text.

Chinese data (language "zh", e.g. CMRC 2018) is scored as CMRC 2018's evaluation does: lower
case, its punctuation list removed, every Chinese character a token, runs of other characters
cut into words and symbols; F1 counts the longest common run of tokens, exact match compares the
texts without that punctuation. The language is chosen per data set (`choose_language`).

Decoding (`decode`) turns per-window start/end logits into predictions.json, nbest_predictions.json
and null_odds.json contents with the original BERT run_squad post-processing, reading the answer
text from the context through the windows' character offsets.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import string
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from bert_jax import cli, tokenizer
from bert_jax.data.errors import DataError
from bert_jax.data.squad import iter_questions, load_json

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_CJK = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in tokenizer.CJK_RANGES) + "]")
LANGUAGES = ("auto", "en", "zh")


# ----------------------------------------------------------------------------- answer scoring


def normalize_answer(s: str) -> str:
  """Lower case, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


# CMRC 2018's evaluation: the characters it removes (its list; no ASCII . , ( ), and "……" as one
# entry never matches a character) and what it counts as a Chinese character (U+4E00-U+9FA5).
_PUNCTUATION_ZH = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")
_HAN = re.compile("[\u4e00-\u9fa5]")
_LATIN_TOKEN = re.compile(r"\w+|[^\w\s]")  # NLTK's word_tokenize, which CMRC uses, for a run


def normalize_answer_zh(s: str) -> str:
  """CMRC 2018's exact-match form: lower case, outer whitespace stripped, its punctuation
  removed."""
  return "".join(ch for ch in s.lower().strip() if ch not in _PUNCTUATION_ZH)


def segment_zh(s: str) -> list[str]:
  """CMRC 2018's "mixed segmentation" without punctuation: lower case, its punctuation removed
  first ("ω-force" is one run), each Chinese character a token, the runs of other characters
  cut into words and symbols (NLTK's tokenizer there; `\\w+|[^\\w\\s]` here, offline)."""
  out, run = [], []
  for ch in s.lower().strip():
    if ch in _PUNCTUATION_ZH:
      continue
    if _HAN.match(ch):
      out += _LATIN_TOKEN.findall("".join(run)) + [ch]
      run = []
    else:
      run.append(ch)
  return out + _LATIN_TOKEN.findall("".join(run))


def _longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest contiguous token sequence that both `a` and `b` hold."""
  best, prev = 0, [0] * (len(b) + 1)
  for x in a:
    cur = [0] + [prev[j] + 1 if x == y else 0 for j, y in enumerate(b)]
    best, prev = max(best, *cur), cur
  return best


def _normalize(s: str, language: str) -> str:
  return normalize_answer_zh(s) if language == "zh" else normalize_answer(s)


def exact_score(gold: str, pred: str, language: str = "en") -> int:
  return int(_normalize(gold, language) == _normalize(pred, language))


def f1_score(gold: str, pred: str, *, empty_agrees: bool = True, language: str = "en") -> float:
  """F1 of the normalised answers' tokens: "en" counts the tokens in common (a bag), "zh" the
  longest run of tokens in common (CMRC 2018).

  `empty_agrees` (v2.0): when either side normalises to nothing, 1 if both do, else 0.
  Without it (v1.1), no common token means 0, even for two empty answers.
  """
  if language == "zh":
    gold_toks, pred_toks = segment_zh(gold), segment_zh(pred)
  else:
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
  if empty_agrees and (not gold_toks or not pred_toks):
    return int(gold_toks == pred_toks)
  if language == "zh":
    num_same = _longest_common_run(gold_toks, pred_toks)
  else:
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(pred_toks)
  recall = 1.0 * num_same / len(gold_toks)
  return (2 * precision * recall) / (precision + recall)


def _questions(dataset: list[dict]):
  """(id as text, gold answer texts, question) per question of the "data" list, checked."""
  for qa, _, _, _ in iter_questions({"data": dataset}):
    answers = qa.get("answers", [])
    if not isinstance(answers, list) or not all(
        isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers):
      raise DataError(f"question {str(qa['id'])!r}: 'answers' must be a list of objects with a "
                      f"'text', got {answers!r}")
    yield str(qa["id"]), [a["text"] for a in answers], qa


def evaluate_v1(dataset: list[dict], predictions: dict[str, str], language: str = "en"
                ) -> dict[str, float]:
  """Official v1.1 scores of `predictions` {id: text} on `dataset` (the JSON's "data" list).

  Returns {"exact_match", "f1"} in percent; a question without a prediction scores 0.
  """
  exact = f1 = total = 0
  for qid, golds, _ in _questions(dataset):
    total += 1
    if qid not in predictions:
      print(f"Unanswered question {qid} will receive score 0.", file=sys.stderr)
      continue
    pred = predictions[qid]
    if not golds:
      raise DataError(f"question {qid!r} has no answers: a v1.1 file needs at least one "
                      "per question (SQuAD v2.0 marks unanswerable ones with is_impossible)")
    exact += max(exact_score(g, pred, language) for g in golds)
    f1 += max(f1_score(g, pred, empty_agrees=False, language=language) for g in golds)
  return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def raw_scores_v2(dataset: list[dict], predictions: dict[str, str], language: str = "en"
                  ) -> tuple[dict[str, int], dict[str, float], dict[str, bool]]:
  """Per-question v2.0 exact and F1 (answered ids only) and whether each question has an answer."""
  exact, f1, has_ans = {}, {}, {}
  for qid, golds, _ in _questions(dataset):
    has_ans[qid] = bool(golds)
    golds = [g for g in golds if _normalize(g, language)] or [""]
    if qid not in predictions:
      print(f"Missing prediction for {qid}", file=sys.stderr)
      continue
    pred = predictions[qid]
    exact[qid] = max(exact_score(g, pred, language) for g in golds)
    f1[qid] = max(f1_score(g, pred, language=language) for g in golds)
  return exact, f1, has_ans


def _apply_no_answer(scores: dict[str, float], na_probs: dict[str, float],
                     has_ans: dict[str, bool], thresh: float) -> dict[str, float]:
  return {qid: float(not has_ans[qid]) if na_probs[qid] > thresh else s
          for qid, s in scores.items()}


def _summary(exact: dict, f1: dict, qids: Sequence[str]) -> dict[str, Any]:
  total = len(qids)
  return {"exact": 100.0 * sum(exact[k] for k in qids) / total,
          "f1": 100.0 * sum(f1[k] for k in qids) / total, "total": total}


def find_best_thresh(predictions: dict[str, str], scores: dict[str, float],
                     na_probs: dict[str, float], has_ans: dict[str, bool]) -> tuple[float, float]:
  """The no-answer threshold that maximises the total score -> (best score in %, threshold).

  Walks the questions from the least to the most likely no-answer: answering one more gains its
  score if it has an answer, and costs 1 if it has none and the prediction is non-empty.
  """
  cur = best = sum(1 for v in has_ans.values() if not v)
  best_thresh = 0.0
  for qid in sorted(na_probs, key=lambda k: na_probs[k]):
    if qid not in scores:
      continue
    if has_ans[qid]:
      cur += scores[qid]
    elif predictions[qid]:
      cur -= 1
    if cur > best:
      best, best_thresh = cur, na_probs[qid]
  return 100.0 * best / len(scores), best_thresh


def evaluate_v2(dataset: list[dict], predictions: dict[str, str],
                na_probs: dict[str, float] | None = None,
                na_prob_thresh: float = 1.0, language: str = "en") -> dict[str, Any]:
  """Official v2.0 scores: exact, f1, total and the HasAns_/NoAns_ breakdown, in percent.

  With `na_probs` {id: no-answer probability or score} also best_exact/best_f1 and their
  thresholds. Unlike the official script (which crashes), missing predictions are left out of
  every total instead of only the overall one.
  """
  exact_raw, f1_raw, has_ans = raw_scores_v2(dataset, predictions, language)
  if not exact_raw:
    raise DataError(f"none of the {len(predictions)} predictions is for a question of the data "
                    f"file (its {len(has_ans)} ids look like {next(iter(has_ans), '')!r})")
  probs = na_probs if na_probs is not None else {k: 0.0 for k in predictions}
  missing = [k for k in exact_raw if k not in probs]
  if missing:
    raise ValueError(f"no-answer probabilities missing for {len(missing)} answered questions, "
                     f"e.g. {missing[0]!r}")
  exact = _apply_no_answer(exact_raw, probs, has_ans, na_prob_thresh)
  f1 = _apply_no_answer(f1_raw, probs, has_ans, na_prob_thresh)
  out = _summary(exact, f1, list(exact))
  for prefix, wanted in (("HasAns", True), ("NoAns", False)):
    qids = [k for k, v in has_ans.items() if v == wanted and k in exact]
    if qids:
      out.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, qids).items()})
  if na_probs is not None:
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(
        predictions, exact_raw, na_probs, has_ans)
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs,
                                                             has_ans)
  return out


def is_v2(dataset_json: dict) -> bool:
  """v2.0 when the file says so ("version": "v2.0") or any question has `is_impossible`."""
  if str(dataset_json.get("version", "")).lstrip("v").startswith("2"):
    return True
  return any("is_impossible" in qa for _, _, qa in _questions(dataset_json["data"]))


def choose_language(language: str, contexts: Iterable[str]) -> str:
  """The scoring of a data set: "en" or "zh" as given; "auto" is "zh" when most non-space
  characters of its distinct `contexts` are CJK ideographs, else "en"."""
  if language not in LANGUAGES:
    raise ValueError(f"language {language!r}: expected one of {', '.join(LANGUAGES)}")
  if language != "auto":
    return language
  texts = list(dict.fromkeys(contexts))
  cjk = sum(len(_CJK.findall(t)) for t in texts)
  return "zh" if 2 * cjk > sum(len("".join(t.split())) for t in texts) else "en"


def evaluate(dataset_json: dict, predictions: dict[str, str],
             na_probs: dict[str, float] | None = None, na_prob_thresh: float = 1.0,
             language: str = "en") -> dict[str, Any]:
  """Scores a whole SQuAD JSON ({"version", "data"}) with the v1.1 or v2.0 rules it calls for,
  normalising answers for `language` ("en": SQuAD, "zh": CMRC 2018)."""
  if language not in LANGUAGES[1:]:
    raise ValueError(f"language {language!r}: expected en or zh (choose_language picks one)")
  if is_v2(dataset_json):
    return evaluate_v2(dataset_json["data"], predictions, na_probs, na_prob_thresh, language)
  if na_probs is not None:
    raise ValueError("no-answer probabilities apply to SQuAD v2.0 only; this is a v1.x file")
  return evaluate_v1(dataset_json["data"], predictions, language)


# ----------------------------------------------------------------------------- span decoding


class HasContext(Protocol):
  qas_id: str
  context: str


_Candidate = collections.namedtuple("_Candidate", "score feature start end start_logit end_logit")


def best_indexes(logits: np.ndarray, n: int) -> np.ndarray:
  """Positions of the `n` largest logits, largest first (ties: lower position first)."""
  return np.argsort(-np.asarray(logits, np.float64), kind="stable")[:n]


def _spans(f: int, start: np.ndarray, end: np.ndarray, offsets: np.ndarray,
           max_context: np.ndarray, n_best_size: int, max_answer_length: int
           ) -> list[_Candidate]:
  """Valid spans of window `f` among its n best starts x n best ends (in that loop order): both
  ends in the passage, the start in its max-context window, start <= end, at most
  `max_answer_length` tokens. start, end: [T] logits; offsets [T, 2]; max_context [T]."""
  s, e = np.meshgrid(best_indexes(start, n_best_size), best_indexes(end, n_best_size),
                     indexing="ij")
  ok = ((offsets[s, 0] >= 0) & max_context[s] & (offsets[e, 0] >= 0) & (e >= s)
        & (e - s + 1 <= max_answer_length))
  return [_Candidate(float(start[a]) + float(end[b]), f, int(a), int(b), float(start[a]),
                     float(end[b])) for a, b in zip(s[ok], e[ok], strict=True)]


def softmax(scores: Sequence[float]) -> list[float]:
  """Probabilities of the n-best entries from their start + end scores."""
  if not scores:
    return []
  m = max(scores)
  exps = [math.exp(s - m) for s in scores]
  total = sum(exps)
  return [x / total for x in exps]


def _nbest(cands: list[_Candidate], null: _Candidate | None, context: str,
           offsets: np.ndarray, n_best_size: int) -> list[dict[str, Any]]:
  """The n best distinct answer texts, with softmax probabilities over their scores."""
  ranked = sorted(cands + ([null] if null else []), key=lambda c: c.score, reverse=True)
  entries: list[tuple[str, float, float]] = []
  seen = set()
  for c in ranked:
    if len(entries) >= n_best_size:
      break
    text = "" if c is null else context[offsets[c.feature, c.start, 0]:
                                         offsets[c.feature, c.end, 1]].strip()
    if text in seen or (c is not null and not text):  # a span of no characters (a bare
      continue  # SentencePiece "▁" has an empty offset) is no answer, nor v2.0's null
    seen.add(text)
    entries.append((text, c.start_logit, c.end_logit))
  if null is not None and "" not in seen:
    entries.append(("", null.start_logit, null.end_logit))
  if not entries:
    entries.append(("empty", 0.0, 0.0))
  probs = softmax([s + e for _, s, e in entries])
  return [{"text": t, "probability": p, "start_logit": s, "end_logit": e}
          for (t, s, e), p in zip(entries, probs, strict=True)]


def _null_candidate(rows: Sequence[int], start: np.ndarray, end: np.ndarray) -> _Candidate:
  """v2.0 no-answer: the window with the lowest [CLS] start + end score."""
  best = None
  for f in rows:
    sl, el = float(start[f, 0]), float(end[f, 0])
    if best is None or sl + el < best.score:
      best = _Candidate(sl + el, f, 0, 0, sl, el)
  return best


# A v2.0 question without any valid span gets this no-answer score difference (always "").
NO_SPAN_SCORE_DIFF = 1e9


def decode(examples: Sequence[HasContext], meta: dict[str, np.ndarray],
           start_logits: np.ndarray, end_logits: np.ndarray, *, n_best_size: int = 20,
           max_answer_length: int = 30, version_2: bool = False,
           null_score_diff_threshold: float = 0.0) -> dict[str, dict]:
  """Per-window logits -> {"predictions", "nbest_predictions"[, "null_odds"]} (official formats).

  start_logits, end_logits: [F, T] for the F windows described by `meta` (from
  `bert_jax.data.squad.convert_examples`): example_index [F], offsets [F, T, 2] character spans
  in the example's context (-1 outside the passage), max_context [F, T] bool.
  v2.0 predicts "" when the null score minus the best span's score exceeds the threshold;
  null_odds holds that difference per question.
  """
  start, end = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
  offsets, max_context = np.asarray(meta["offsets"]), np.asarray(meta["max_context"])
  by_example = collections.defaultdict(list)
  for f, i in enumerate(np.asarray(meta["example_index"]).tolist()):
    by_example[i].append(f)
  preds, nbest_json, null_odds = {}, {}, {}
  for i, ex in enumerate(examples):
    rows = by_example.get(i, [])
    cands = [c for f in rows for c in _spans(f, start[f], end[f], offsets[f], max_context[f],
                                              n_best_size, max_answer_length)]
    null = _null_candidate(rows, start, end) if version_2 and rows else None
    nbest = _nbest(cands, null, ex.context, offsets, n_best_size)
    nbest_json[ex.qas_id] = nbest
    if not version_2:
      preds[ex.qas_id] = nbest[0]["text"]
      continue
    best = next((e for e in nbest if e["text"]), None)
    diff = (NO_SPAN_SCORE_DIFF if best is None or null is None
            else null.score - best["start_logit"] - best["end_logit"])
    null_odds[ex.qas_id] = diff
    preds[ex.qas_id] = "" if diff > null_score_diff_threshold else best["text"]
  out = {"predictions": preds, "nbest_predictions": nbest_json}
  if version_2:
    out["null_odds"] = null_odds
  return out


# ----------------------------------------------------------------------------- command line


def _load_mapping(path: str, value_type) -> dict:
  """A JSON object {question id: value} from `path`, checked."""
  obj = load_json(path)
  if not isinstance(obj, dict):
    raise DataError(f"{path}: expected a JSON object {{question id: ...}}, got "
                    f"{type(obj).__name__}")
  bad = next((k for k, v in obj.items() if not isinstance(v, value_type)), None)
  if bad is not None:
    raise DataError(f"{path}: the value for {bad!r} is {obj[bad]!r}, not a "
                    f"{'string' if value_type is str else 'number'}")
  return obj


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog=cli.prog("bert_jax.squad_eval"),
                              description="Official SQuAD v1.1 / v2.0 scores, printed as JSON.")
  p.add_argument("data_file", help="SQuAD JSON (v1.1 or v2.0, detected)")
  p.add_argument("pred_file", help="predictions JSON {question id: answer text}")
  p.add_argument("--na-prob-file", help="v2.0: JSON {question id: no-answer probability}")
  p.add_argument("--na-prob-thresh", type=float, default=1.0,
                 help="v2.0: predict no answer when the probability exceeds this")
  p.add_argument("--language", choices=LANGUAGES, default="auto",
                 help="answer normalisation: en (SQuAD), zh (CMRC 2018: characters), auto (zh "
                      "when most non-space characters of the contexts are CJK)")
  args = p.parse_args(argv)
  dataset = load_json(args.data_file)
  contexts = [c for _, c, _, _ in iter_questions(dataset, args.data_file)]  # checks the layout
  language = choose_language(args.language, contexts)
  preds = _load_mapping(args.pred_file, str)
  na_probs = _load_mapping(args.na_prob_file, (int, float)) if args.na_prob_file else None
  try:
    result = evaluate(dataset, preds, na_probs, args.na_prob_thresh, language)
  except DataError as e:
    raise DataError(f"{args.data_file} with {args.pred_file}: {e}") from None
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  cli.run(main)
