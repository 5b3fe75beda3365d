"""finetune.py: 2-step smoke runs of classification and SQuAD (v1.1 and v2.0) from a model of
ours and from Hugging Face weights, resume, predictions with ids, and bad input."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import checkpoint, tokenizer
from bert_jax.data import pretraining
from bert_jax.data.errors import DataError
from bert_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """An exported tiny model of ours (random weights) with its SentencePiece tokenizer."""
  import jax

  from bert_jax.config import get_variant
  from bert_jax.heads import BertForPreTraining
  d = tmp_path_factory.mktemp("model")
  corpus = d / "corpus.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:100_000])
  tok = tokenizer.train_sentencepiece([str(corpus)], 800, str(d / "tokenizer"))
  config = get_variant("tiny", vocab_size=800, hidden_size=32, num_heads=2,
                       intermediate_size=64)
  ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
  params = BertForPreTraining(config).init(jax.random.PRNGKey(0), ids, ids, ids,
                                           jax.numpy.zeros((1, 2), jax.numpy.int32))["params"]
  checkpoint.save_model(d / "export", config, params, tok)
  return d / "export"


SENTENCES = ["a fine and moving play", "dull, tedious and long", "the king is dead",
             "what a noble mind is here", "sweet prince, good night", "nothing will come of it"]


def _tsv(path, rows, header="sentence\tlabel"):
  path.write_text("\n".join(([header] if header else []) + rows) + "\n", encoding="utf-8")
  return path


def _classify_config(model_dir, tmp_path, **over):
  from configs import classify
  c = classify.get_config("tiny")
  c.init_from = str(model_dir)
  rows = [f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES * 3)]
  c.data.train_file = str(_tsv(tmp_path / "train.tsv", rows))
  c.data.eval_file = str(_tsv(tmp_path / "dev.tsv", rows[:8]))
  c.data.text_a, c.data.label = "sentence", "label"
  c.train.progress_bar = False
  c.train.num_devices = 1
  for k, v in over.items():
    section, _, name = k.rpartition(".")
    (c[section] if section else c)[name] = v
  return c


def test_classification_smoke_and_resume(model_dir, tmp_path):
  from bert_jax import finetune
  predict = _tsv(tmp_path / "unlabelled.tsv", [f"p{i}\t{s}" for i, s in enumerate(SENTENCES)],
                 header="id\tsentence")
  config = _classify_config(model_dir, tmp_path, **{"data.predict_file": str(predict),
                                                   "data.id_column": "id"})
  work = tmp_path / "run"
  best = finetune.main(config, work)
  assert set(best) >= {"accuracy", "f1", "mcc", "step"} and best["step"] == 2
  assert json.loads((work / "eval_results.json").read_text())["accuracy"] == best["accuracy"]
  preds = json.loads((work / "predictions.json").read_text())
  assert [p["id"] for p in preds] == [f"p{i}" for i in range(6)]
  assert all(p["label"] in ("0", "1") and abs(sum(p["probabilities"].values()) - 1) < 1e-5
             for p in preds)
  cfg, params = checkpoint.load_model(work / "best")
  assert cfg.hidden_size == 32 and params["classifier"]["dense"]["kernel"].shape == (32, 2)
  # The export says what its logits mean.
  assert json.loads((work / "best" / "task.json").read_text()) == {
      "task": "classification", "regression": False, "labels": ["0", "1"]}
  # The same command with more steps resumes from step 2; with the labels in another order it
  # would train the head's rows as the other classes: refused.
  config.train.max_steps, config.train.epochs = 4, 2
  config.data.labels = "1,0"
  with pytest.raises(finetune.FinetuneError, match=r"trained for .*'labels': \['0', '1'\].*"
                     r"this run's data gives .*'labels': \['1', '0'\]"):
    finetune.main(config, work)
  config.data.labels = ""
  # Another batch size would map the checkpoint's step to other examples of the epoch.
  batch_size, config.train.batch_size = config.train.batch_size, 4
  with pytest.raises(ConfigError, match=r"was trained with other settings: "
                                        r"train.batch_size=4 \(the checkpoint's \d+\)"):
    finetune.main(config, work)
  config.train.batch_size = batch_size
  best = finetune.main(config, work)
  steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "train"]
  assert steps == [2, 4]


def test_regression_and_pairs(model_dir, tmp_path):
  from bert_jax import finetune
  pairs = zip(SENTENCES, SENTENCES[::-1], strict=True)
  rows = [f"{a}\t{b}\t{i * 0.5}" for i, (a, b) in enumerate(pairs)]
  train = _tsv(tmp_path / "sts.tsv", rows * 3, header="s1\ts2\tscore")
  config = _classify_config(model_dir, tmp_path, **{
      "data.train_file": str(train), "data.eval_file": str(train), "data.text_a": "s1",
      "data.text_b": "s2", "data.label": "score", "data.regression": True,
      "train.metric": "mse", "train.epochs": 3, "train.max_steps": 0})
  best = finetune.main(config, tmp_path / "run")
  assert set(best) >= {"pearson", "spearman", "mse"}
  evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
           if r["split"] == "eval"]
  assert len(evals) == 3
  assert best["mse"] == min(r["mse"] for r in evals)  # the lowest error is the best model


def test_the_best_model_has_the_highest_score_or_the_lowest_error():
  from bert_jax import finetune
  assert finetune._improves("pearson", 0.5, 0.4) and not finetune._improves("pearson", 0.4, 0.5)
  assert finetune._improves("mse", 0.4, 0.5) and not finetune._improves("mse", 0.5, 0.4)


def _squad_json(path, version="1.1", impossible=False):
  context = ("Hamlet is the Prince of Denmark. His father was murdered by Claudius, who then "
             "married Gertrude. The play is set in Elsinore, a castle on the coast.")
  qas = [{"id": "q1", "question": "Who murdered the king?",
          "answers": [{"text": "Claudius", "answer_start": context.index("Claudius")}]},
         {"id": "q2", "question": "Where is the play set?",
          "answers": [{"text": "Elsinore", "answer_start": context.index("Elsinore")}]},
         {"id": "q3", "question": "Who is the prince?",
          "answers": [{"text": "Hamlet", "answer_start": 0}]}]
  if impossible:
    for q in qas:
      q["is_impossible"] = False
    qas.append({"id": "q4", "question": "Who is the queen of France?", "answers": [],
                "is_impossible": True})
  paragraphs = [{"context": context, "qas": [
      {**q, "id": q["id"] + (f"_{p}" if p else "")} for q in qas]} for p in range(3)]
  data = {"version": version, "data": [{"title": "Hamlet", "paragraphs": paragraphs}]}
  path.write_text(json.dumps(data), encoding="utf-8")
  return path


@pytest.mark.parametrize("version", ["1.1", "v2.0"])
def test_squad_smoke(model_dir, tmp_path, version):
  from bert_jax import finetune
  from configs import squad
  data = _squad_json(tmp_path / "squad.json", version, impossible=version == "v2.0")
  c = squad.get_config("tiny")
  c.init_from = str(model_dir)
  c.data.train_file = c.data.eval_file = str(data)
  c.train.progress_bar, c.train.num_devices = False, 1
  best = finetune.main(c, tmp_path / "run")
  out = tmp_path / "run"
  preds = json.loads((out / "predictions.json").read_text())
  nbest = json.loads((out / "nbest_predictions.json").read_text())
  assert set(preds) == set(nbest) >= {"q1", "q2", "q3"}
  assert all(abs(sum(c["probability"] for c in v) - 1) < 1e-4 for v in nbest.values())
  if version == "1.1":
    assert set(best) >= {"exact_match", "f1"}
  else:
    assert set(best) >= {"exact", "f1", "HasAns_exact", "NoAns_exact", "best_f1_thresh"}
    assert set(json.loads((out / "null_odds.json").read_text())) == set(preds)
  # The official scorer agrees with the numbers the run reports.
  got = subprocess.run([sys.executable, "-m", "bert_jax.squad_eval", str(data),
                        str(out / "predictions.json")], capture_output=True, text=True,
                       timeout=120)
  assert got.returncode == 0, got.stderr
  assert json.loads(got.stdout)["f1"] == pytest.approx(
      json.loads((out / "eval_results.json").read_text())["f1"]) or version != "1.1"


def test_from_hugging_face_weights(tmp_path):
  transformers = pytest.importorskip("transformers", reason="transformers makes the HF model")
  pytest.importorskip("torch", reason="transformers needs torch to save a model")
  from tokenizers import BertWordPieceTokenizer

  from bert_jax import finetune
  hf = tmp_path / "hf"
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(SENTENCES * 5, vocab_size=120, min_frequency=1)
  hf.mkdir()
  trainer.save_model(str(hf))
  vocab = len((hf / "vocab.txt").read_text().splitlines())
  cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37)
  transformers.BertForPreTraining(cfg).save_pretrained(hf)
  config = _classify_config(hf, tmp_path)
  best = finetune.main(config, tmp_path / "run")
  assert best["step"] == 2 and 0 <= best["accuracy"] <= 1


def _run_cli(args, timeout=300):
  return subprocess.run([sys.executable, "finetune.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def test_bad_input_is_named_and_nothing_is_lost(model_dir, tmp_path):
  from bert_jax import finetune, tasks
  config = _classify_config(model_dir, tmp_path)
  work = tmp_path / "run"
  finetune.main(config, work)
  good = (work / "eval_results.json").read_bytes()
  tok = tokenizer.load(model_dir / "tokenizer.model")

  bad_cols = _tsv(tmp_path / "cols.tsv", ["good row\t1", "a row with\ttoo\tmany", "x\t0"])
  c = _classify_config(model_dir, tmp_path, **{"data.train_file": str(bad_cols),
                                               "data.text_a": "0", "data.label": "1"})
  with pytest.raises(DataError, match=r"cols.tsv:3: expected 2 columns, got 3"):
    finetune.main(c, work)
  with pytest.raises(DataError, match=r"cols.tsv:3"):  # refused before its workdir is made
    finetune.main(c, tmp_path / "new")
  assert not (tmp_path / "new").exists()
  unseen = _tsv(tmp_path / "unseen.tsv", ["some text\t0", "more text\t7"])
  c = _classify_config(model_dir, tmp_path, **{"data.eval_file": str(unseen)})
  with pytest.raises(DataError, match=r"unseen.tsv:3: label '7' was not seen in training"):
    finetune.main(c, work)

  squad_cfg = __import__("configs.squad", fromlist=["get_config"]).get_config("tiny")
  squad_cfg.init_from, squad_cfg.train.num_devices = str(model_dir), 1
  broken = tmp_path / "broken.json"
  broken.write_text('{"version": "1.1", "data": [')
  squad_cfg.data.train_file = str(broken)
  with pytest.raises(DataError, match=r"broken.json.*(malformed|JSON)"):
    tasks.make(squad_cfg, tok)
  no_id = json.loads(_squad_json(tmp_path / "s.json").read_text())
  del no_id["data"][0]["paragraphs"][0]["qas"][1]["id"]
  (tmp_path / "noid.json").write_text(json.dumps(no_id))
  squad_cfg.data.train_file = str(tmp_path / "noid.json")
  with pytest.raises(DataError, match=r"noid.json.*question.*id"):
    tasks.make(squad_cfg, tok)
  outside = json.loads(_squad_json(tmp_path / "s.json").read_text())
  outside["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 10_000
  outside["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "not in the passage"
  (tmp_path / "outside.json").write_text(json.dumps(outside))
  squad_cfg.data.train_file = str(tmp_path / "outside.json")
  with pytest.raises(DataError, match=r"outside.json.*q1.*(outside|not found)"):
    tasks.make(squad_cfg, tok)

  # A checkpoint whose vocabulary is not the tokenizer's.
  other = tmp_path / "other_tok"
  corpus = tmp_path / "c.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:50_000])
  other_tok = tokenizer.train_sentencepiece([str(corpus)], 500, str(other))
  c = _classify_config(model_dir, tmp_path, tokenizer=other_tok)
  with pytest.raises(finetune.FinetuneError, match=r"vocabulary has 800 entries but the "
                     r"tokenizer .*other_tok.model has 500"):
    finetune.main(c, work)
  assert (work / "eval_results.json").read_bytes() == good

  # On the command line: one line naming the file, a non-zero exit.
  out = _run_cli(["--config=configs/classify.py:tiny", f"--workdir={work}",
                  f"--config.init_from={model_dir}", f"--config.data.train_file={bad_cols}"])
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "cols.tsv:3" in out.stderr
  assert (work / "eval_results.json").read_bytes() == good
  assert np.isfinite(json.loads(good)["accuracy"])
