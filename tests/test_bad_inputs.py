"""A catalogue of bad inputs across every command line: each is refused with a non-zero exit and
one line that names the file (line, record or field) and what was expected, no traceback, and
nothing that was already in the workdir or output changed.

Most cases run in this process through the entry point the command line calls (`cli.run` with
the module's main and its argv, or with the config that train.py / finetune.py would build);
a few run as real subprocesses (tests/test_cli.py has more of those).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import runs

from bert_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
BINARY = b"\xff\xfe" + bytes(range(256)) * 4  # not UTF-8 from its first byte


@pytest.fixture(autouse=True)
def _logging():
  with runs.kept_logging():
    yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
  """A tokenizer, prepared instances, a classification task, a tiny HF config, bad files."""
  from bert_jax.config import get_variant
  from bert_jax.convert import config_to_hf
  d = tmp_path_factory.mktemp("inputs")
  p = runs.prepare(d)
  p["dir"] = d
  p["corpus"] = str(d / "corpus.txt")
  (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
  (d / "latin1.txt").write_bytes("première ligne\ndeuxième ligne\n".encode("latin-1"))
  (d / "empty.txt").write_text("")
  (d / "not_a_tokenizer.model").write_text("this is not a SentencePiece model\n")
  (d / "one_doc_per_line.txt").write_text("\n\n".join(runs.SENTENCES) + "\n")
  p["hf_config"] = config_to_hf(get_variant("tiny", vocab_size=600))
  return p


def _fails(capsys, main, *args, code: int = 2) -> str:
  """Runs main(*args) as the command line does; returns its one error line."""
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, *args)
  assert exit_info.value.code == code
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], err
  return errors[0]


def _write(d: pathlib.Path, name: str, text: str | bytes) -> str:
  f = d / name
  f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text, encoding="utf-8")
  return str(f)


def _hf_dir(d: pathlib.Path, config: dict | str | None, weights: dict | bytes | None) -> str:
  from safetensors.numpy import save
  d.mkdir()
  if config is not None:
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
  if weights is not None:
    data = weights if isinstance(weights, bytes) else save(weights)
    (d / "model.safetensors").write_bytes(data)
  return str(d)


def _users_dir(t: pathlib.Path) -> str:
  """A directory of the user's own files."""
  (t / "mine").mkdir()
  _write(t / "mine", "notes.txt", "the user's own file")
  return str(t / "mine")


def _snapshot(d: pathlib.Path) -> dict[str, bytes]:
  return runs.tree_bytes(d) if d.exists() else {}


# ----------------------------------------------------------------------------- tokenizer


def _train_tok(corpus: str, vocab_size: str = "100"):
  """argv of `tokenizer train` on `corpus` (a file of the inputs, or a path under tmp_path)."""
  return lambda i, t: ["train", "--input", corpus.format(dir=i["dir"], tmp=t, corpus=i["corpus"]),
                       "--vocab_size", vocab_size, "--output", f"{t}/tok"]


TOKENIZER_CASES = {
    "binary corpus": (_train_tok("{dir}/binary.txt"), ["binary.txt:2", "not valid UTF-8"]),
    "latin-1 corpus": (_train_tok("{dir}/latin1.txt"), ["latin1.txt:1", "not valid UTF-8"]),
    "empty corpus": (_train_tok("{dir}/empty.txt"), ["empty.txt", "no text"]),
    "missing corpus": (_train_tok("{tmp}/nothing*.txt"), ["nothing*.txt", "no such file"]),
    "vocab_size 0": (_train_tok("{corpus}", "0"), ["vocab_size=0", "expected a whole number"]),
    "a tokenizer that is not one": (lambda i, t: ["encode", "--tokenizer",
                                                  f"{i['dir']}/not_a_tokenizer.model"],
                                    ["not_a_tokenizer.model", "not a SentencePiece model"]),
    "tokenizer_config.json that is not JSON": (
        lambda i, t: ["encode", "--tokenizer", (_write(t, "tokenizer_config.json", "{oops"),
                      _write(t, "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"))[1]],
        ["tokenizer_config.json", "not valid JSON"]),
    "vocab.txt without [MASK]": (
        lambda i, t: ["encode", "--tokenizer", _write(t, "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n")],
        ["vocab.txt", "no [SEP], [MASK] token"]),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_tokenizer_cli(inputs, tmp_path, capsys, case):
  argv, needles = TOKENIZER_CASES[case]
  from bert_jax import tokenizer
  line = _fails(capsys, tokenizer._main, argv(inputs, tmp_path))
  for needle in needles:
    assert needle in line, line


# ----------------------------------------------------------------------------- pretraining data


def _data_argv(i, t, **changes) -> list[str]:
  args = {"input_files": i["corpus"], "tokenizer": i["data.tokenizer"],
          "output_dir": f"{t}/out", "max_seq_length": "32", "dupe_factor": "1", **changes}
  return [x for k, v in args.items() for x in (f"--{k}", v)]


DATA_CASES = {
    "output_dir is a directory of other files": (
        lambda i, t: _data_argv(i, t, output_dir=str(t)), ["refusing to replace it"]),
    "output_dir is a file": (lambda i, t: _data_argv(i, t, output_dir=_write(t, "f", "x")),
                             ["exists and is a file"]),
    "latin-1 corpus": (lambda i, t: _data_argv(i, t, input_files=f"{i['dir']}/latin1.txt"),
                       ["latin1.txt:1", "not valid UTF-8"]),
    "no document of two sentences": (
        lambda i, t: _data_argv(i, t, input_files=f"{i['dir']}/one_doc_per_line.txt"),
        ["one_doc_per_line.txt", "no document has two sentences"]),
    "max_seq_length 4": (lambda i, t: _data_argv(i, t, max_seq_length="4"),
                         ["max_seq_length=4"]),
    "masked_lm_prob 1.5": (lambda i, t: _data_argv(i, t, masked_lm_prob="1.5"),
                           ["masked_lm_prob"]),
    "a tokenizer that is not one": (
        lambda i, t: _data_argv(i, t, tokenizer=f"{i['dir']}/not_a_tokenizer.model"),
        ["not_a_tokenizer.model", "not a SentencePiece model"]),
    "missing input": (lambda i, t: _data_argv(i, t, input_files=f"{t}/none.txt"),
                      ["none.txt", "no such file"]),
}


def _refused_leaving_all(capsys, tmp_path, main, case, inputs) -> None:
  """`case` (argv from the inputs and tmp_path, the words the error must hold) refused by
  `main`, with every file of tmp_path (the user's own among them) left as it was."""
  make_argv, needles = case
  _write(tmp_path, "keep.txt", "the user's own file")
  argv = make_argv(inputs, tmp_path)
  before = _snapshot(tmp_path)
  line = _fails(capsys, main, argv)
  for needle in needles:
    assert needle in line, line
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_pretraining_data_cli(inputs, tmp_path, capsys, case):
  from bert_jax.data import pretraining
  _refused_leaving_all(capsys, tmp_path, pretraining._main, DATA_CASES[case], inputs)


# ----------------------------------------------------------------------------- convert


def _garbage_safetensors() -> bytes:
  import numpy as np
  from safetensors.numpy import save
  return save({"bert.embeddings.word_embeddings.weight": np.zeros((600, 128), np.float32)})[:500]


CONVERT_CASES = {
    "from-hf: config.json not JSON": (
        lambda i, t: ["from-hf", _hf_dir(t / "hf", "{not json", None), f"{t}/out"],
        ["config.json", "not valid JSON"]),
    "from-hf: no weights": (lambda i, t: ["from-hf", _hf_dir(t / "hf", i["hf_config"], None),
                                          f"{t}/out"], ["no weights", "model.safetensors"]),
    "from-hf: foreign weights": (
        lambda i, t: ["from-hf", _hf_dir(t / "hf", i["hf_config"], {
            "transformer.h.0.attn.c_attn.weight": __import__("numpy").zeros((4, 4), "float32")}),
            f"{t}/out"], ["do not match its config.json", "transformer.h.0.attn.c_attn.weight"]),
    "from-hf: truncated model.safetensors": (
        lambda i, t: ["from-hf", _hf_dir(t / "hf", i["hf_config"], _garbage_safetensors()),
                      f"{t}/out"], ["model.safetensors", "not a readable safetensors file"]),
    "from-hf: a RoBERTa config": (
        lambda i, t: ["from-hf", _hf_dir(t / "hf", {**i["hf_config"], "model_type": "roberta"},
                                         None), f"{t}/out"], ["model_type is 'roberta'"]),
    "from-hf: into a directory of other files": (
        lambda i, t: ["from-hf", _hf_dir(t / "hf", i["hf_config"], None), _users_dir(t)],
        ["mine", "refusing to replace it"]),
    "to-hf: not a model": (lambda i, t: ["to-hf", str(i["dir"]), f"{t}/out"],
                           ["not a bert_jax model"]),
    "to-hf: into its own source": (lambda i, t: ["to-hf", str(t), str(t / "sub")],
                                   ["must not be", "hold it or lie inside it"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_cli(inputs, tmp_path, capsys, case):
  from bert_jax import convert
  _refused_leaving_all(capsys, tmp_path, convert.main, CONVERT_CASES[case], inputs)


# ----------------------------------------------------------------------------- squad_eval


V1 = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "a fine play", "qas": [
    {"id": "q1", "question": "what?", "answers": [{"text": "fine", "answer_start": 2}]}]}]}]}
V2 = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "a fine play", "qas": [
    {"id": "q1", "question": "what?", "answers": [], "is_impossible": True}]}]}]}

SQUAD_EVAL_CASES = {
    "data file not JSON": ({"d.json": "{oops", "p.json": "{}"}, ["d.json", "malformed JSON"]),
    "data file without 'data'": ({"d.json": "[]", "p.json": "{}"}, ["d.json", "'data' list"]),
    "predictions not an object": ({"d.json": V1, "p.json": "[1, 2]"},
                                  ["p.json", "expected a JSON object"]),
    "prediction not a string": ({"d.json": V1, "p.json": {"q1": 3}}, ["p.json", "'q1'"]),
    "v1 question without answers": (
        {"d.json": {**V1, "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
            {"id": "q9", "question": "?", "answers": []}]}]}]}, "p.json": {"q9": "x"}},
        ["d.json", "'q9'", "no answers"]),
    "v2 predictions for no question": ({"d.json": V2, "p.json": {"zz": ""}},
                                       ["d.json", "p.json", "none of the 1 predictions"]),
    "predictions file missing": ({"d.json": V1}, ["p.json"]),
    "binary predictions": ({"d.json": V1, "p.json": bytes(range(256))}, ["p.json", "UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(SQUAD_EVAL_CASES))
def test_squad_eval_cli(tmp_path, capsys, case):
  from bert_jax import squad_eval
  contents, needles = SQUAD_EVAL_CASES[case]
  for name, value in contents.items():
    _write(tmp_path, name, value if isinstance(value, str | bytes) else json.dumps(value))
  line = _fails(capsys, squad_eval.main, [str(tmp_path / "d.json"), str(tmp_path / "p.json")])
  for needle in needles:
    assert needle in line, line


# ----------------------------------------------------------------------------- bench


@pytest.mark.parametrize("argv,needles", [
    (["--batch_size", "0", "--variant", "tiny"], ["batch_size 0"]),
    (["--seq_len", "1024", "--variant", "tiny", "--batch_size", "8"], ["--seq_len 1024",
                                                                        "position table"]),
    (["--variant", "huge"], ["huge"]),
], ids=["batch_size 0", "seq_len beyond the position table", "unknown variant"])
def test_bench_cli(capsys, argv, needles):
  from bert_jax import bench
  line = _fails(capsys, bench.main, argv)
  for needle in needles:
    assert needle in line, line


# ----------------------------------------------------------------------------- train.py


PRETRAIN_CASES = {
    "steps=-5": ({"train.steps": -5}, ["train.steps=-5", ">= 1"]),
    "a tokenizer that does not exist": ({"data.tokenizer": "/nonexistent/tok.model"},
                                        ["data.tokenizer", "/nonexistent/tok.model"]),
    "vocab_size other than the tokenizer's": ({"model.vocab_size": 1234},
                                              ["model.vocab_size=1234", "600"]),
    "max_seq_length beyond the position table": (
        {"model.max_position_embeddings": 16}, ["max_seq_length=32", "position table"]),
    "data of another max_seq_length": ({"data.max_seq_length": 64},
                                       ["max_seq_length 32", "data.max_seq_length=64"]),
    "an unknown optimizer": ({"train.optimizer": "sgd"}, ["sgd"]),
    "an unknown model variant": ({"model.variant": "huge"}, ["huge"]),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_train(inputs, tmp_path, capsys, case):
  from bert_jax import pretrain
  overrides, needles = PRETRAIN_CASES[case]
  _write(tmp_path, "keep.txt", "the user's own file")
  before = _snapshot(tmp_path)
  line = _fails(capsys, pretrain.main, runs.pretrain_config(inputs, **overrides), tmp_path)
  for needle in needles:
    assert needle in line, line
  assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


def test_train_binary_corpus(inputs, tmp_path, capsys):
  """Raw text with undecodable bytes: the file and line, before a tokenizer is trained on it."""
  from bert_jax import pretrain
  config = runs.pretrain_config({}, **{"data.input_files": f"{inputs['dir']}/binary.txt",
                                       "data.tokenizer_vocab_size": 100})
  line = _fails(capsys, pretrain.main, config, tmp_path)
  assert "binary.txt:2" in line and "not valid UTF-8" in line, line


def test_train_workdir_is_a_file(tmp_path):
  """A real subprocess: train.py with --workdir naming a file."""
  f = pathlib.Path(_write(tmp_path, "workdir", "a file"))
  out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--workdir={f}",
                        "--config.train.steps=1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(f"error: {f}"), out.stderr
  assert f.read_text() == "a file"


# ----------------------------------------------------------------------------- finetune.py


def _tsv(t: pathlib.Path, name: str, rows: list[str]) -> str:
  return _write(t, name, "sentence\tlabel\n" + "\n".join(rows) + "\n")


GOOD_ROWS = [f"{s}\t{k % 2}" for k, s in enumerate(runs.SENTENCES * 2)]
SQUAD_OK = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{
    "context": "to be or not to be", "qas": [
        {"id": f"q{k}", "question": "what?", "answers": [{"text": "to be", "answer_start": 0}]}
        for k in range(8)]}]}]}


def _squad_with(qa_change: dict | None = None, paragraph: dict | None = None) -> dict:
  data = json.loads(json.dumps(SQUAD_OK))
  para = data["data"][0]["paragraphs"][0]
  para.update(paragraph or {})
  para["qas"][3].update(qa_change or {})
  return data


FINETUNE_CASES = {
    "ragged TSV row": (lambda t: {"data.train_file": _tsv(t, "train.tsv", GOOD_ROWS[:5] + [
        "a row without its label"] + GOOD_ROWS[5:])}, ["train.tsv:7", "expected 2 columns"]),
    "latin-1 TSV": (lambda t: {"data.train_file": _write(
        t, "train.tsv", ("sentence\tlabel\n" + "\n".join(GOOD_ROWS) + "\ncafé\t1\n")
        .encode("latin-1"))}, ["train.tsv:18", "UTF-8"]),
    "binary TSV": (lambda t: {"data.train_file": _write(t, "train.tsv", BINARY)},
                   ["train.tsv:1", "UTF-8"]),
    "empty TSV": (lambda t: {"data.train_file": _write(t, "train.tsv", "")},
                  ["train.tsv", "no examples"]),
    "eval label outside the training labels": (
        lambda t: {"data.eval_file": _tsv(t, "dev.tsv", GOOD_ROWS[:3] + ["sad\tpositive"])},
        ["dev.tsv:5", "'positive'"]),
    "misnamed label column": (lambda t: {"data.label": "labl"}, ["no column 'labl'"]),
    "CSV with an unterminated quote": (
        lambda t: {"data.train_file": _write(t, "train.csv", "sentence,label\n" + "\n".join(
            f'"{s}",{k % 2}' for k, s in enumerate(runs.SENTENCES * 2)) + '\n"open quote,1\n')},
        ["train.csv:18"]),
    "malformed JSONL line": (
        lambda t: {"data.train_file": _write(t, "train.jsonl", "\n".join(
            json.dumps({"sentence": s, "label": k % 2}) for k, s in enumerate(runs.SENTENCES * 2))
            + '\n{"sentence": "half\n')}, ["train.jsonl:17", "malformed JSON"]),
    "JSONL record without the label key": (
        lambda t: {"data.train_file": _write(t, "train.jsonl", "\n".join(
            json.dumps({"sentence": s, "label": k % 2} if k != 4 else {"sentence": s})
            for k, s in enumerate(runs.SENTENCES * 2)))}, ["train.jsonl:5", "no key 'label'"]),
    "regression label not a number": (
        lambda t: {"data.regression": True, "data.train_file": _tsv(
            t, "train.tsv", [r.replace("\t1", "\t0.5") for r in GOOD_ROWS[:9]] + ["x\tgood"])},
        ["train.tsv:11", "'good' is not a number"]),
    "an unknown train.metric": (lambda t: {"train.metric": "acuracy", "train.max_steps": 1},
                                ["train.metric='acuracy'"]),
    "eval_batch_size=0": (lambda t: {"train.eval_batch_size": 0}, ["train.eval_batch_size=0"]),
    "warmup_fraction=10 (meant 10%)": (lambda t: {"train.warmup_fraction": 10.0},
                                       ["train.warmup_fraction=10.0", "expected 0 to 1"]),
    "a negative max_grad_norm": (lambda t: {"train.max_grad_norm": -1.0},
                                 ["train.max_grad_norm=-1.0", "0 for no clipping"]),
    "a tokenizer that is not one": (
        lambda t: {"tokenizer": _write(t, "x.model", "not a model")},
        ["x.model", "not a SentencePiece model"]),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_CASES))
def test_finetune(inputs, tmp_path, capsys, case):
  from bert_jax import finetune
  (tmp_path / "in").mkdir()
  overrides = FINETUNE_CASES[case][0](tmp_path / "in")
  workdir = tmp_path / "work"
  workdir.mkdir()
  _write(workdir, "keep.txt", "the user's own file")
  config = runs.classify_config(inputs, "", **{"tokenizer": inputs["data.tokenizer"],
                                               **overrides})
  line = _fails(capsys, finetune.main, config, workdir)
  for needle in FINETUNE_CASES[case][1]:
    assert needle in line, line
  assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


SQUAD_CASES = {
    "no 'data' list": (lambda: {"version": "1.1"}, ["'data' list"]),
    "a question without 'question'": (lambda: _squad_with({"question": None}),
                                      ["question 3", "'q3'", "no 'question' text"]),
    "answer_start out of range": (
        lambda: _squad_with({"answers": [{"text": "to be", "answer_start": 99}]}),
        ["'q3'", "outside the context"]),
    "answer without answer_start": (lambda: _squad_with({"answers": [{"text": "to be"}]}),
                                    ["'q3'", "'answer_start'"]),
    "a v1.1 eval question without answers": (lambda: _squad_with({"answers": []}),
                                              ["dev.json", "without answers", "v1.1"]),
    "is_impossible not a boolean": (lambda: _squad_with({"is_impossible": "false"}),
                                    ["'q3'", "'is_impossible' must be true or false"]),
    "is_impossible with answers": (lambda: _squad_with({"is_impossible": True}),
                                   ["'q3'", "is_impossible is true but", "plausible_answers"]),
    "paragraph without context": (lambda: _squad_with(paragraph={"context": 5}),
                                  ["paragraph 0", "no 'context' text"]),
}


@pytest.mark.parametrize("case", sorted(SQUAD_CASES))
def test_finetune_squad(inputs, tmp_path, capsys, case):
  from bert_jax import finetune
  from configs import squad
  make, needles = SQUAD_CASES[case]
  train = _write(tmp_path, "train.json", json.dumps(SQUAD_OK))
  dev = _write(tmp_path, "dev.json", json.dumps(make()))
  config = squad.get_config("tiny")
  config.tokenizer, config.data.train_file, config.data.eval_file = (
      inputs["data.tokenizer"], train, dev)
  if case != "a v1.1 eval question without answers":
    config.data.train_file = dev
  workdir = tmp_path / "work"
  line = _fails(capsys, finetune.main, config, workdir)
  for needle in needles:
    assert needle in line, line
  assert not workdir.exists() or sorted(p.name for p in workdir.iterdir()) == []


def test_finetune_vocabulary_mismatch(inputs, tmp_path, capsys):
  """A model export whose vocabulary differs from the tokenizer given."""
  import numpy as np

  from bert_jax import checkpoint, finetune
  from bert_jax.config import get_variant
  export = checkpoint.save_model(tmp_path / "export", get_variant("tiny", vocab_size=99),
                                 {"bert": {"w": np.zeros(3, np.float32)}})
  config = runs.classify_config(inputs, str(export), tokenizer=inputs["data.tokenizer"])
  line = _fails(capsys, finetune.main, config, tmp_path / "work")
  assert "99 entries" in line and "600" in line and "tok.model" in line, line


def test_finetune_binary_train_file_subprocess(inputs, tmp_path):
  """A real subprocess: finetune.py on a binary training file."""
  f = _write(tmp_path, "train.tsv", BINARY)
  out = subprocess.run([sys.executable, str(ROOT / "finetune.py"),
                        f"--config={ROOT}/configs/classify.py:tiny", f"--workdir={tmp_path}/w",
                        f"--config.tokenizer={inputs['data.tokenizer']}",
                        f"--config.data.train_file={f}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {f}:1") and "UTF-8" in last, out.stderr
