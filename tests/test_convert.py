"""Hugging Face conversion: output parity both ways, accepted layouts, errors, parameter counts."""

import json
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import bert_jax
from bert_jax import checkpoint, convert
from bert_jax import params as layout
from bert_jax.config import get_variant
from bert_jax.heads import BertForPreTraining
from bert_jax.model import BertModel

HF_TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=64)
TOL = 1e-5  # max abs difference allowed between our outputs and transformers' in float32
# bfloat16 matmuls against float32 on the tiny model below: the measured max abs difference of
# the sequence output is 0.0068 (its values reach 3.2); the bound leaves ~4x margin.
BF16_TOL = 0.03
POSITIONS = np.array([[0, 3, 5, 10], [1, 2, 6, 8], [0, 1, 3, 9]])  # MLM positions compared


def _hf():
  torch = pytest.importorskip("torch", reason="torch is needed for the reference outputs")
  transformers = pytest.importorskip("transformers", reason="transformers gives the reference")
  return torch, transformers


def _batch():
  """Three rows, both token types, two of them padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, (3, 11)).astype(np.int32)
  token_types = (np.arange(11)[None] >= 5).astype(np.int32).repeat(3, 0)
  mask = np.ones((3, 11), np.int32)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  return ids, token_types, mask


def _reference(model) -> dict[str, np.ndarray]:
  """transformers' outputs on _batch(): the four our BertForPreTraining returns."""
  import torch
  ids, token_types, mask = (torch.tensor(a, dtype=torch.long) for a in _batch())
  with torch.no_grad():
    enc = model.bert(input_ids=ids, token_type_ids=token_types, attention_mask=mask)
    heads = model(input_ids=ids, token_type_ids=token_types, attention_mask=mask)
  mlm = heads.prediction_logits.numpy()
  return {"sequence_output": enc.last_hidden_state.numpy(),
          "pooled_output": enc.pooler_output.numpy(),
          "mlm_logits": np.take_along_axis(mlm, POSITIONS[..., None], axis=1),
          "nsp_logits": heads.seq_relationship_logits.numpy()}


def _ours(config, params) -> dict[str, np.ndarray]:
  out = BertForPreTraining(config).apply({"params": params}, *_batch(), POSITIONS)
  out["sequence_output"] = BertModel(config).apply({"params": params["bert"]},
                                                  *_batch())["sequence_output"]
  return {k: np.asarray(v) for k, v in out.items()}


def _max_diffs(got, want) -> dict[str, float]:
  return {k: float(np.max(np.abs(got[k] - want[k]))) for k in want}


def _assert_close(got, want, tol=TOL):
  diffs = _max_diffs(got, want)
  assert all(d < tol for d in diffs.values()), diffs


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  """A random transformers BertForPreTraining (every weight perturbed, so biases and LayerNorm
  parameters are not their trivial init), saved with save_pretrained, plus a vocab.txt."""
  torch, transformers = _hf()
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(transformers.BertConfig(**HF_TINY)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("hf") / "bert"
  model.save_pretrained(path)
  (path / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(99)) + "\n")
  return path


@pytest.fixture(scope="module")
def reference(hf_dir) -> dict[str, np.ndarray]:
  _, transformers = _hf()
  return _reference(transformers.BertForPreTraining.from_pretrained(hf_dir).eval())


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return convert.load_hf(hf_dir)


def _tensors(hf_dir) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(hf_dir / "model.safetensors")


def _hf_copy(hf_dir, dst, tensors=None, config_changes=None) -> pathlib.Path:
  """hf_dir's config.json (with changes) and the given tensors as model.safetensors."""
  from safetensors.numpy import save_file
  dst.mkdir()
  hf_config = {**json.loads((hf_dir / "config.json").read_text()), **(config_changes or {})}
  (dst / "config.json").write_text(json.dumps(hf_config))
  save_file(_tensors(hf_dir) if tensors is None else tensors, dst / "model.safetensors")
  return dst


def _assert_same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- parity


def test_load_hf_matches_transformers(loaded, reference):
  config, params = loaded
  assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size,
          config.vocab_size, config.max_position_embeddings) == (3, 32, 4, 37, 99, 64)
  assert set(params) == {"bert", "mlm", "nsp"}
  _assert_close(_ours(config, params), reference)
  for tree in (params, params["bert"]):  # encode takes the full tree and the encoder tree
    out = bert_jax.encode(config, tree, *_batch())
    assert out["sequence_output"].dtype == np.float32
    _assert_close({k: np.asarray(v) for k, v in out.items()}, {k: reference[k] for k in out})
  with pytest.raises(ValueError, match="seq <= 64"):
    bert_jax.encode(config, params, np.zeros((1, 65), np.int32))


def test_scanned_model_matches_transformers(loaded, reference):
  config, params = loaded
  scanned = config.replace(scan_layers=True)
  _assert_close(_ours(scanned, layout.match_layout(params, scanned)), reference)
  out = bert_jax.encode(scanned, params, *_batch())  # converts the unrolled tree it is given
  _assert_close({k: np.asarray(v) for k, v in out.items()}, {k: reference[k] for k in out})


def test_scanned_tree_exports_like_the_unrolled_one(loaded, tmp_path):
  config, params = loaded
  unrolled = convert.to_hf(config, params, tmp_path / "unrolled")
  scanned = convert.to_hf(config.replace(scan_layers=True), layout.stack_layers(params),
                          tmp_path / "scanned")
  assert (scanned / "config.json").read_text() == (unrolled / "config.json").read_text()
  want, got = _tensors(unrolled), _tensors(scanned)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_cli_round_trip(hf_dir, reference, tmp_path):
  _, transformers = _hf()
  ours = tmp_path / "ours"
  convert.main(["from-hf", str(hf_dir), str(ours)])
  assert (ours / "vocab.txt").is_file()  # so that finetune.py finds the tokenizer
  config, params = checkpoint.load_model(ours)
  _assert_close(_ours(config, params), reference)

  back = tmp_path / "back"
  convert.main(["to-hf", str(ours), str(back)])
  assert (back / "vocab.txt").is_file()
  model, info = transformers.BertForPreTraining.from_pretrained(back, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  assert json.loads((back / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
  _assert_close(_reference(model.eval()), reference)


def test_to_hf_failure_keeps_the_old_output(loaded, tmp_path):
  config, params = loaded
  out = convert.to_hf(config, params, tmp_path / "out")
  before = (out / "model.safetensors").read_bytes()
  with pytest.raises(FileNotFoundError):
    convert.to_hf(config, params, out, tokenizer_path=tmp_path / "missing.txt")
  assert (out / "model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_to_hf_from_a_finetuned_model(loaded, reference, tmp_path, caplog):
  """A fine-tuned export (encoder + classifier): the encoder goes out, the pretraining heads are
  written fresh and the classifier is dropped, each with a warning."""
  _, transformers = _hf()
  config, params = loaded
  classifier = {"dense": {"kernel": np.zeros((32, 3), np.float32), "bias": np.zeros(3)}}
  checkpoint.save_model(tmp_path / "ft", config, {"bert": params["bert"], "classifier": classifier})
  with caplog.at_level(logging.WARNING, logger="bert_jax.convert"):
    convert.main(["to-hf", str(tmp_path / "ft"), str(tmp_path / "hf")])
  assert "task head(s) classifier" in caplog.text and "masked-LM head" in caplog.text
  model, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf",
                                                                output_loading_info=True)
  assert not any(info.values()), info
  out = _reference(model.eval())
  _assert_close({k: out[k] for k in ("sequence_output", "pooled_output")},
                {k: reference[k] for k in ("sequence_output", "pooled_output")})


def test_bert_model_without_heads_loads_with_fresh_heads(hf_dir, reference, tmp_path, caplog):
  torch, transformers = _hf()
  model = transformers.BertForPreTraining.from_pretrained(hf_dir).bert  # keys without "bert."
  model.save_pretrained(tmp_path / "encoder")
  with caplog.at_level(logging.WARNING, logger="bert_jax.convert"):
    config, params = convert.load_hf(tmp_path / "encoder")
  assert "masked-LM head (cls.predictions.*)" in caplog.text
  assert "next-sentence head (cls.seq_relationship.*)" in caplog.text
  assert "pooler" not in caplog.text
  convert.check_params(config, params)
  out = _ours(config, params)
  _assert_close({k: out[k] for k in ("sequence_output", "pooled_output")},
                {k: reference[k] for k in ("sequence_output", "pooled_output")})


def test_pytorch_bin_with_old_names(hf_dir, loaded, tmp_path):
  """The oldest layout: pytorch_model.bin, LayerNorm gamma/beta, a stored position_ids buffer
  and the tied decoder weight written out."""
  torch, _ = _hf()
  state = {}
  for name, value in _tensors(hf_dir).items():
    name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                       "LayerNorm.beta")
    state[name] = torch.from_numpy(value)
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  state["bert.embeddings.position_ids"] = torch.arange(64)[None]
  old = tmp_path / "old"
  old.mkdir()
  shutil.copy(hf_dir / "config.json", old)
  torch.save(state, old / "pytorch_model.bin")
  _assert_same_tree(convert.load_hf(old)[1], loaded[1])


def test_the_decoder_bias_is_the_one_transformers_adds(hf_dir, reference, tmp_path):
  """A save whose decoder bias differs from cls.predictions.bias: transformers' forward adds the
  decoder's, so the conversion keeps that one."""
  _, transformers = _hf()
  tensors = _tensors(hf_dir)
  bias = tensors["cls.predictions.bias"]
  tensors["cls.predictions.decoder.bias"] = bias + np.linspace(-1, 1, bias.size, dtype=bias.dtype)
  d = _hf_copy(hf_dir, tmp_path / "bias", tensors)
  want = _reference(transformers.BertForPreTraining.from_pretrained(d).eval())
  assert np.abs(want["mlm_logits"] - reference["mlm_logits"]).max() > 0.1  # it does matter
  _assert_close(_ours(*convert.load_hf(d)), want)


def test_an_untied_decoder_is_refused_but_fine_tuning_takes_the_encoder(hf_dir, reference,
                                                                        tmp_path):
  tensors = _tensors(hf_dir)
  embedding = tensors["bert.embeddings.word_embeddings.weight"]
  tensors["cls.predictions.decoder.weight"] = embedding + 0.5
  d = _hf_copy(hf_dir, tmp_path / "untied", tensors, {"tie_word_embeddings": False})
  with pytest.raises(convert.ConversionError, match="untied masked-LM decoder"):
    convert.load_hf(d)
  config, params = convert.load_hf(d, encoder_only=True)
  assert set(params) == {"bert"}
  out = BertModel(config).apply({"params": params["bert"]}, *_batch())
  _assert_close({k: np.asarray(out[k]) for k in ("sequence_output", "pooled_output")},
                {k: reference[k] for k in ("sequence_output", "pooled_output")})


@pytest.mark.parametrize("task", ["BertForSequenceClassification", "BertForQuestionAnswering"])
def test_a_task_model_converts_without_its_head(hf_dir, reference, tmp_path, caplog, task):
  """A fine-tuned save (classifier.* or qa_outputs.*): the encoder converts, the task head is
  named in a warning and left out (our fine-tuning starts its head fresh)."""
  _, transformers = _hf()
  getattr(transformers, task).from_pretrained(hf_dir).save_pretrained(tmp_path / "task")
  with caplog.at_level(logging.WARNING, logger="bert_jax.convert"):
    config, params = convert.load_hf(tmp_path / "task")
  head = "classifier" if "Classification" in task else "qa_outputs"
  assert f"not converting the task head {head}.bias, {head}.weight" in caplog.text
  compared = ("sequence_output", "pooled_output") if head == "classifier" else (
      "sequence_output",)  # BertForQuestionAnswering has no pooler
  out = _ours(config, params)
  _assert_close({k: out[k] for k in compared}, {k: reference[k] for k in compared})


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_weights_load_and_fine_tuning_starts_from_them(hf_dir, loaded, tmp_path, fmt):
  from bert_jax import finetune
  from configs import classify
  _, transformers = _hf()
  d = tmp_path / "sharded"
  transformers.BertForPreTraining.from_pretrained(hf_dir).save_pretrained(
      d, max_shard_size="20KB", safe_serialization=fmt == "safetensors")
  if fmt == "bin":  # transformers v5 writes safetensors only: the older layout, made by hand
    import torch
    index = json.loads((d / "model.safetensors.index.json").read_text())
    bin_name = lambda shard: shard.replace(".safetensors", ".bin").replace("model", "pytorch_model")
    for shard in set(index["weight_map"].values()):
      tensors = {k: torch.tensor(v) for k, v in convert._read_safetensors([d / shard]).items()}
      torch.save(tensors, d / bin_name(shard))
      (d / shard).unlink()
    index["weight_map"] = {k: bin_name(v) for k, v in index["weight_map"].items()}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (d / "model.safetensors.index.json").unlink()
  assert len(list(d.glob("*.index.json"))) == 1
  _assert_same_tree(convert.load_hf(d)[1], loaded[1])
  shutil.copy(hf_dir / "vocab.txt", d)
  config = classify.get_config("tiny")
  config.init_from = str(d)
  bert, params, tok = finetune.load_start(config)
  _assert_same_tree(params, loaded[1]["bert"])
  assert tok == d / "vocab.txt"


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text(json.dumps(HF_TINY))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(convert.ConversionError, match="pytorch_model.bin needs torch"):
    convert.load_hf(tmp_path)


def test_layout_without_bert_prefix(hf_dir, loaded, tmp_path):
  tensors = {k.removeprefix("bert."): v for k, v in _tensors(hf_dir).items()}
  assert "embeddings.word_embeddings.weight" in tensors and "cls.predictions.bias" in tensors
  _assert_same_tree(convert.load_hf(_hf_copy(hf_dir, tmp_path / "bare", tensors))[1], loaded[1])


# ----------------------------------------------------------------------------- errors


def _edit_missing(t):
  del t["bert.encoder.layer.1.attention.self.key.weight"]


def _edit_unexpected(t):
  t["bert.encoder.layer.3.output.dense.weight"] = np.zeros((32, 37), np.float32)


def _edit_shape(t):
  t["bert.encoder.layer.2.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_edit_missing, "missing (1): bert.encoder.layer.1.attention.self.key.weight"),
    (_edit_unexpected, "unexpected (1): bert.encoder.layer.3.output.dense.weight"),
    (_edit_shape,
     "bert.encoder.layer.2.intermediate.dense.weight expected (37, 32) found (36, 32)"),
])
def test_bad_keys_are_named(hf_dir, tmp_path, edit, message):
  tensors = _tensors(hf_dir)
  edit(tensors)
  with pytest.raises(convert.ConversionError) as e:
    convert.load_hf(_hf_copy(hf_dir, tmp_path / "bad", tensors))
  assert message in str(e.value)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "relu"}, "hidden_act is 'relu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type is 'relative_key'"),
    ({"model_type": "roberta"}, "model_type is 'roberta'"),
    ({"is_decoder": True}, "is_decoder is true"),  # HF would run causal attention
    ({"add_cross_attention": True}, "add_cross_attention is true"),
])
def test_unsupported_configs_are_refused(hf_dir, tmp_path, changes, message):
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_hf(_hf_copy(hf_dir, tmp_path / "bad", config_changes=changes))


def test_cli_error_is_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "bert_jax.convert", "from-hf", str(tmp_path),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}: not a Hugging Face model directory (no config.json)")


def test_check_params_names_dimensions(loaded):
  config, params = loaded
  stacked = layout.stack_layers(params)
  for tree in (params, {"bert": params["bert"]}, params["bert"], stacked, stacked["bert"]):
    convert.check_params(config, tree)
  cases = [(config.replace(vocab_size=30522), "vocab size: the model config says 30522 but the "
            "weights have 99"),
           (config.replace(hidden_size=64), "hidden size: the model config says 64 but the "
            "weights have 32"),
           (config.replace(num_layers=12), "layer count: the model config says 12 but the "
            "weights have 3"),
           (config.replace(intermediate_size=40), "intermediate size: the model config says 40 "
            "but the weights have 37"),
           (config.replace(max_position_embeddings=512), "max positions: the model config says "
            "512 but the weights have 64")]
  for other, message in cases:
    with pytest.raises(convert.ConversionError, match=message):
      convert.check_params(other, params)
  extra = {**params, "classifier": {"dense": {"kernel": np.zeros((32, 2))}}}
  with pytest.raises(convert.ConversionError, match="unexpected \\(1\\): classifier/dense/kernel"):
    convert.check_params(config, extra)
  short = {**params, "nsp": {"dense": {"kernel": np.zeros((32, 3)), "bias": np.zeros(2)}}}
  with pytest.raises(convert.ConversionError, match=r"nsp/dense/kernel expected \(32, 2\) found "
                     r"\(32, 3\)"):
    convert.check_params(config, short)


# ----------------------------------------------------------------------------- sizes, dtypes


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def test_parameter_counts():
  torch, transformers = _hf()
  assert _count(convert.abstract_params(get_variant("base"))["bert"]) == 109_482_240
  with torch.device("meta"):
    large = transformers.BertModel(transformers.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096))
  assert _count(convert.abstract_params(get_variant("large"))["bert"]) == large.num_parameters()


def test_bfloat16_stays_close_to_float32(loaded):
  config, params = loaded
  f32 = bert_jax.encode(config, params, *_batch())["sequence_output"]
  bf16 = bert_jax.encode(config.replace(dtype="bfloat16"), params, *_batch())["sequence_output"]
  assert bf16.dtype == np.float32
  diff = float(np.max(np.abs(np.asarray(bf16) - np.asarray(f32))))
  assert 0 < diff < BF16_TOL, diff


def test_import_is_light():
  code = "import sys, bert_jax; sys.exit(any(m in sys.modules for m in ('torch', 'flax')))"
  assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
  assert bert_jax.load_hf is convert.load_hf


# ----------------------------------------------------------------------------- tokenizers

# Text the corpora rarely hold: punctuation runs, CJK next to Latin, characters the model does not
# know (Korean, emoji), NFKC expansions (the ellipsis, ½, ligatures), odd whitespace.
TRICKY = ["", " ", "Hello, world!", "  spaced   out  ", "(a)(b) [c] {d}", "tab\tand\nnewline",
          "中文和English混合。", "他说：“你好……”", "《战国无双3》（）", "백악봉 and 😀 emoji",
          "½ cup, ﬁne ①", "\u3000ideographic\u00a0space", "a\x01b", "...!?", "x...y"]


def _sample_lines(path: pathlib.Path, n: int) -> list[str]:
  lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  return lines[:: max(1, len(lines) // n)][:n]


@pytest.fixture(scope="module")
def sentencepiece_export(shared_data, loaded, tmp_path_factory):
  """A BPE SentencePiece model trained on English and Chinese Wikipedia sentences, exported with a
  model by `convert to-hf`; and the texts to compare on."""
  from bert_jax import tokenizer
  corpus = shared_data / "corpus"
  texts = [corpus / "en" / "en_wiki_squad11dev_contexts.sentences.txt",
           corpus / "zh" / "zh_hans_wiki_cmrc2018_contexts.sentences.txt"]
  d = tmp_path_factory.mktemp("sp_export")
  # Coverage below 1: rare Chinese characters stay unknown ([UNK]), a case to compare too.
  model = tokenizer.train_sentencepiece(texts, 3000, d / "tokenizer", character_coverage=0.99,
                                        input_sentence_size=40_000)
  config, params = loaded
  out = convert.to_hf(config, params, d / "hf", tokenizer_path=model)
  lines = [line for t in texts for line in _sample_lines(t, 1500)] + TRICKY
  return tokenizer.load(model), out, lines


def test_a_sentencepiece_export_opens_with_autotokenizer_and_gives_our_ids(sentencepiece_export):
  _, transformers = _hf()
  ours, out, lines = sentencepiece_export
  hf = transformers.AutoTokenizer.from_pretrained(out)
  differ = [t for t in lines if hf(t, add_special_tokens=False)["input_ids"] != ours.encode(t)]
  assert not differ, f"{len(differ)} of {len(lines)} texts differ, e.g. {differ[:3]}"
  a, b = "The first sentence.", "第二句话。"
  pair = hf(a, b)
  assert pair["input_ids"] == [ours.cls_id, *ours.encode(a), ours.sep_id, *ours.encode(b),
                               ours.sep_id]
  assert pair["token_type_ids"] == [0] * (len(ours.encode(a)) + 2) + [1] * (len(ours.encode(b)) + 1)
  assert hf.mask_token_id == ours.mask_id and hf.pad_token_id == ours.pad_id


def test_a_cased_wordpiece_export_is_not_lower_cased(loaded, tmp_path):
  """BertTokenizerFast lower-cases unless told: the export says what the vocabulary is."""
  _, transformers = _hf()
  from bert_jax import tokenizer
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello",
                              "World", "world", ",", "!"]) + "\n")
  config, params = loaded
  out = convert.to_hf(config, params, tmp_path / "hf", tokenizer_path=vocab)
  hf = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizer.load(vocab)
  for text in ("Hello, World!", "hello, world!"):
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
  assert ours.encode("Hello") != ours.encode("hello")


def test_a_unigram_export_keeps_the_model_and_says_autotokenizer_cannot(loaded, tmp_path, caplog):
  from bert_jax import tokenizer
  text = tmp_path / "t.txt"
  text.write_text("\n".join(f"line {i} of some text, with words." for i in range(300)) + "\n")
  model = tokenizer.train_sentencepiece([text], 40, tmp_path / "uni", model_type="unigram")
  config, params = loaded
  with caplog.at_level(logging.WARNING):
    out = convert.to_hf(config, params, tmp_path / "hf", tokenizer_path=model)
  assert (out / "uni.model").is_file() and not (out / "tokenizer.json").exists()
  assert "unigram" in caplog.text and "AutoTokenizer" in caplog.text
