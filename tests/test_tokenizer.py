"""Tokenizers: SentencePiece training with fixed special ids, CJK and punctuation split, offsets;
WordPiece ids identical to transformers.BertTokenizerFast; bad input."""

import collections
import pathlib
import re
import subprocess
import sys

import pytest

from bert_jax import tokenizer
from bert_jax.data import pretraining
from bert_jax.data.errors import DataError

ZH = ["北京是中华人民共和国的首都。", "他说：“我们明天去上海吧！”",
      "数学（mathematics）是研究数量的学科。",
      "长江是亚洲第一长河，全长6300公里。"]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  text = pretraining.default_corpus_path().read_text(encoding="utf-8")[:200_000]
  corpus = d / "corpus.txt"
  corpus.write_text(text + "\n" + "\n".join(ZH * 20) + "\n", encoding="utf-8")
  return tokenizer.load(tokenizer.train_sentencepiece([str(corpus)], 2000, str(d / "sp")))


def test_sentencepiece_special_ids_and_round_trip(sp_tok):
  assert sp_tok.special_ids == (0, 1, 2, 3, 4)
  assert sp_tok.tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert sp_tok.vocab_size == 2000
  text = "Good night, sweet prince: and flights of angels sing thee to thy rest!"
  ids = sp_tok.encode(text)
  assert not set(ids) & set(sp_tok.special_ids)
  assert sp_tok.decode(ids) == text
  # Text that looks like a special token is not one.
  assert sp_tok.mask_id not in sp_tok.encode("a [MASK] b")


def test_sentencepiece_keeps_frequent_words_whole(sp_tok):
  # The old settings (unigram, character coverage 0.9995) split 25 of these 100 words ("and",
  # "that", "this" among them) and left 16 [UNK]s in the first 50,000 characters.
  text = pretraining.default_corpus_path().read_text(encoding="utf-8")[:200_000]
  frequent = [w for w, _ in collections.Counter(re.findall(r"[A-Za-z]+", text)).most_common(100)]
  assert [w for w in frequent if len(sp_tok.encode(w)) > 1] == []
  ids = sp_tok.encode(text[:50_000])
  assert sp_tok.unk_id not in ids
  assert ids.count(sp_tok.sp.piece_to_id(tokenizer.SPACE_PIECE)) < len(ids) / 500


def test_character_coverage_follows_the_script(tmp_path):
  en, zh = tmp_path / "en.txt", tmp_path / "zh.txt"
  en.write_text("Good night, sweet prince.\n" * 50 + "\n".join(ZH), encoding="utf-8")
  zh.write_text("\n".join(ZH * 20) + "\nmathematics\n", encoding="utf-8")
  assert tokenizer.default_character_coverage([en]) == 1.0
  assert tokenizer.default_character_coverage([zh]) == 0.9995


def test_sentencepiece_splits_cjk_and_punctuation(sp_tok):
  for line in ZH:
    ids, offsets = sp_tok.encode_with_offsets(line)
    assert ids == sp_tok.encode(line)
    spans = [line[a:b] for a, b in offsets]
    for i, ch in enumerate(line):
      if tokenizer.is_split_char(ch):
        assert spans.count(ch) >= 1 and (i, i + 1) in offsets, (line, ch)
    # Every CJK character is a whole token of its own.
    for (a, b), tid in zip(offsets, ids, strict=False):
      piece = sp_tok.id_to_token(tid).lstrip("\u2581")
      if any(tokenizer.is_cjk(c) for c in line[a:b]):
        assert b - a == 1 and piece in (line[a], "[UNK]"), (line[a:b], piece)
  tokens = sp_tok.tokens(sp_tok.encode("stop,go.now"))
  assert "\u2581," in tokens and "\u2581." in tokens


def test_sentencepiece_offsets_cover_the_text(sp_tok):
  text = "  O, that this too too solid flesh would melt,\tThaw and resolve itself into a dew!  "
  ids, offsets = sp_tok.encode_with_offsets(text)
  pieces = [sp_tok.id_to_token(i).lstrip("\u2581") for i in ids]
  assert [text[a:b] for a, b in offsets] == pieces
  assert "".join(text[a:b] for a, b in offsets) == "".join(text.split())


def test_uncased_sentencepiece_folds_case_and_keeps_offsets(tmp_path):
  text = pretraining.default_corpus_path().read_text(encoding="utf-8")[:100_000]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(text, encoding="utf-8")
  tok = tokenizer.load(tokenizer.train_sentencepiece([str(corpus)], 1000, str(tmp_path / "sp"),
                                                     lowercase=True))
  pieces = [tok.id_to_token(i) for i in range(5, tok.vocab_size)]
  assert not any(ch.isupper() for piece in pieces for ch in piece)
  cased = "Good Night, Sweet PRINCE: and Flights of Angels"
  assert tok.encode(cased) == tok.encode(cased.lower())
  ids, offsets = tok.encode_with_offsets(cased)
  assert ids == tok.encode(cased)
  # Offsets point into the original (cased) text.
  assert "".join(cased[a:b] for a, b in offsets) == "".join(cased.split())
  assert [cased[a:b].lower() for a, b in offsets] == [
      tok.id_to_token(i).lstrip("\u2581") for i in ids]


def test_wordpiece_matches_bert_tokenizer_fast(tmp_path, shared_data):
  transformers = pytest.importorskip("transformers", reason="transformers is the reference")
  from tokenizers import BertWordPieceTokenizer
  en = [s for s in (shared_data / "corpus/en/en_pd_all.sentences.txt").read_text(
      encoding="utf-8").splitlines() if s][:3000]
  zh = [s for s in (shared_data / "corpus/zh/zh_hans_wiki_cmrc2018_contexts.sentences.txt")
        .read_text(encoding="utf-8").splitlines() if s][:1000]
  extra = ["Café naïve Über façade résumé — “quoted” ‘single’ … ¡Hola! ¿Qué tal?",
           "emoji 😀👍🏽 and flags 🇫🇷 in text", "", "   ", "tabs\tand\nnewlines\r\n",
           "URL https://example.com/a?b=c&d=e#f, e-mail a.b@c.org", "1,234.56 $5 €7 50% #tag",
           "MiXeD 中文 and English，全角标点！", "control\x00chars\x07here",
           "ÅNGSTRÖM ǅ ﬁ ligature",
           "Ελληνικά кириллица العربية עברית हिन्दी ไทย 한국어 日本語のテキスト",
           "Über-straße", "naïve café"]
  mixed = [a + " " + b for a, b in zip(en[1::50], zh[1::20], strict=False)][:40]
  sentences = en[::6][:300] + zh[::5][:150] + mixed + extra
  assert len(sentences) >= 500
  for lowercase in (True, False):
    trainer = BertWordPieceTokenizer(lowercase=lowercase)
    trainer.train_from_iterator(en + zh, vocab_size=3000, min_frequency=2)
    d = tmp_path / f"lower{lowercase}"
    d.mkdir()
    trainer.save_model(str(d))
    ours = tokenizer.load(d / "vocab.txt")
    assert ours.kind == "wordpiece" and ours.lowercase == lowercase  # inferred from the vocab
    ref = transformers.BertTokenizerFast.from_pretrained(str(d), do_lower_case=lowercase)
    assert ours.special_ids == tuple(ref.convert_tokens_to_ids(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    for s in sentences:
      assert ours.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
    ids, offsets = ours.encode_with_offsets("Hello, 世界!")
    spans = [("Hello, 世界!")[a:b] for a, b in offsets]
    assert "".join(spans) == "Hello,世界!" and spans[-4:] == [",", "世", "界", "!"]
    assert ids == ours.encode("Hello, 世界!")


def test_bad_tokenizer_files(tmp_path):
  import sentencepiece as spm
  corpus = tmp_path / "c.txt"
  corpus.write_text("some words here\nand more words there\n" * 50)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=15, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(tokenizer.TokenizerError, match=r"plain.model: the tokenizer has no "
                     r"\[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\] tokens"):
    tokenizer.load(tmp_path / "plain.model")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
  with pytest.raises(tokenizer.TokenizerError, match=r"vocab.txt: the tokenizer has no \[CLS\]"):
    tokenizer.load(tmp_path / "vocab.txt")
  with pytest.raises(tokenizer.TokenizerError, match="no such tokenizer file"):
    tokenizer.load(tmp_path / "missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(tokenizer.TokenizerError, match="junk.model: not a SentencePiece model"):
    tokenizer.load(tmp_path / "junk.model")


def test_training_errors(tmp_path):
  with pytest.raises(DataError, match="nothere.txt: no such file"):
    tokenizer.train_sentencepiece([str(tmp_path / "nothere.txt")], 100, str(tmp_path / "t"))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(DataError, match="empty.txt: no text to train a tokenizer on"):
    tokenizer.train_sentencepiece([str(empty)], 100, str(tmp_path / "t"))
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nanother\nbroken \xff\xfe here\n")
  with pytest.raises(DataError, match=r"bad.txt:3: not valid UTF-8 \(byte 0xff at byte 8"):
    tokenizer.train_sentencepiece([str(bad)], 100, str(tmp_path / "t"))
  assert not (tmp_path / "t.model").exists()


def test_train_command_line(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:50_000])
  out = subprocess.run([sys.executable, "-m", "bert_jax.tokenizer", "train", "--input",
                        str(corpus), "--vocab_size", "500", "--output", str(tmp_path / "tok"),
                        "--model_type", "bpe"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "500 pieces" in out.stdout
  assert tokenizer.load(tmp_path / "tok.model").special_ids == (0, 1, 2, 3, 4)
  out = subprocess.run([sys.executable, "-m", "bert_jax.tokenizer", "train", "--input",
                        str(tmp_path / "none.txt"), "--output", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.strip().endswith("none.txt: no such file")
  assert pathlib.Path(tmp_path / "x.model").exists() is False


# ----------------------------------------------------------------------------- WordPiece files

WORDS = ["el", "año", "ano", "pasado", "cafe", "café", "kobe", "bryant", "nba", ",", "a", "b",
         "##s", "##é", "北", "京"]


def _vocab_dir(d: pathlib.Path, lines, config: str | None = None) -> pathlib.Path:
  """A directory with a vocab.txt of `lines` (after the special tokens) and, given its text, a
  tokenizer_config.json."""
  d.mkdir(parents=True, exist_ok=True)
  (d / "vocab.txt").write_bytes(("\n".join([*tokenizer.SPECIAL_TOKENS, *lines]) + "\n")
                                .encode("utf-8"))
  if config is not None:
    (d / "tokenizer_config.json").write_text(config)
  return d


def _bert_fast(d: pathlib.Path, **kwargs):
  transformers = pytest.importorskip("transformers", reason="transformers is the reference")
  return transformers.BertTokenizerFast.from_pretrained(str(d), **kwargs)


def test_vocab_lines_are_read_as_bert_tokenizer_fast_reads_them(tmp_path):
  # Google's Chinese vocab (bert-base-chinese) has a line that is U+2028 alone (line 344) and one
  # "##" + U+2028: the `tokenizers` library (so BertTokenizerFast) and Google's load_vocab both
  # strip trailing white space, giving the tokens "" and "##". Leading spaces stay; \x1f is not
  # Unicode white space. Every line keeps its line number as id.
  lines = [*WORDS, "\u2028", "##\u2028", " c", "d  ", "x\u00a0", "y\x1f", "crlf\r", "", "g\u3000"]
  d = _vocab_dir(tmp_path, lines)
  ours, ref = tokenizer.load(d / "vocab.txt", lowercase=True), _bert_fast(d, do_lower_case=True)
  assert ours.vocab == ref.get_vocab()
  assert ours.vocab_size == len(tokenizer.SPECIAL_TOKENS) + len(lines)
  assert ours.id_to_token(ours.vocab["##"]) == "##"
  for text in ["d x y crlf g", "Kobe Bryant, 北京", " c d"]:
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_a_token_listed_twice_takes_the_id_of_its_last_line(tmp_path, caplog):
  # As in the `tokenizers` library; vocab_size is the number of lines, so every id has a row.
  d = _vocab_dir(tmp_path, [*WORDS, "kobe", "a"])
  ours, ref = tokenizer.load(d / "vocab.txt"), _bert_fast(d, do_lower_case=True)
  ids = ours.encode("a Kobe b")
  assert ids == ref("a Kobe b", add_special_tokens=False)["input_ids"]
  assert ids[:2] == [len(tokenizer.SPECIAL_TOKENS) + len(WORDS) + 1,
                     len(tokenizer.SPECIAL_TOKENS) + len(WORDS)]
  assert ours.vocab_size == len(tokenizer.SPECIAL_TOKENS) + len(WORDS) + 2 > max(ids)
  assert ours.tokens(ids) == ["a", "kobe", "b"] and len(ours.word_starts) == ours.vocab_size
  assert "vocab.txt:12: 'kobe' is listed again" in caplog.text


def test_casing_inference_skips_bracketed_tokens(tmp_path):
  # Google's Chinese vocab holds <S> and <T>: it is uncased, so "Kobe" is "kobe", not [UNK].
  d = _vocab_dir(tmp_path, ["[unused1]", "<S>", "<T>", *WORDS])
  ours = tokenizer.load(d / "vocab.txt")
  assert ours.lowercase is True
  assert ours.tokens(ours.encode("NBA Kobe")) == ["nba", "kobe"]
  _vocab_dir(tmp_path, ["<S>", "Kobe", *WORDS])
  assert tokenizer.load(d / "vocab.txt").lowercase is False


@pytest.mark.parametrize("config", [
    '{"do_lower_case": true, "strip_accents": false}',
    '{"do_lower_case": false, "strip_accents": true}',
    '{"do_lower_case": true, "strip_accents": null}', '{"do_lower_case": true}'])
def test_tokenizer_config_settles_casing_and_accents(tmp_path, config):
  d = _vocab_dir(tmp_path, WORDS + ["El", "Café"], config)
  ours, ref = tokenizer.load(d / "vocab.txt"), _bert_fast(d)
  text = "El año pasado, Café"
  assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
  if '"strip_accents": false' in config:
    assert ours.tokens(ours.encode(text)) == ["el", "año", "pasado", ",", "café"]


def test_the_fingerprint_tells_the_casings_of_one_vocab_apart(tmp_path):
  """Pretraining data made with a vocab run lower-cased is refused when the same vocab runs
  cased; without a stated casing (the vocab alone decides) the fingerprint is the file's hash,
  as before, so data made earlier stays valid."""
  d = _vocab_dir(tmp_path, WORDS)
  plain = tokenizer.load(d / "vocab.txt")
  assert plain.fingerprint == tokenizer.file_fingerprint(d / "vocab.txt")
  prints = {plain.fingerprint}
  for config in ('{"do_lower_case": false}', '{"do_lower_case": true, "strip_accents": false}'):
    (d / "tokenizer_config.json").write_text(config)
    prints.add(tokenizer.load(d / "vocab.txt").fingerprint)
  (d / "tokenizer_config.json").write_text('{"do_lower_case": true}')  # what it infers anyway
  assert tokenizer.load(d / "vocab.txt").fingerprint == plain.fingerprint
  assert len(prints) == 3


def test_bad_tokenizer_config(tmp_path):
  d = _vocab_dir(tmp_path, WORDS, '{"do_lower_case": "yes"}')
  with pytest.raises(tokenizer.TokenizerError, match=r"tokenizer_config.json: do_lower_case="
                     r"'yes': expected true, false or null"):
    tokenizer.load(d / "vocab.txt")
  (d / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(tokenizer.TokenizerError, match="tokenizer_config.json: not valid JSON"):
    tokenizer.load(d / "vocab.txt")


def test_copies_of_a_vocab_keep_its_tokenizer_config(tmp_path, sp_tok):
  import ml_collections
  import numpy as np

  from bert_jax import checkpoint, files, hf_tokenizer, pretrain
  from bert_jax.config import get_variant
  src = _vocab_dir(tmp_path / "src", WORDS + ["Café"],
                   '{"do_lower_case": true, "strip_accents": false}') / "vocab.txt"
  text = "El año pasado, Café"
  want = tokenizer.load(src).encode(text)
  config = ml_collections.ConfigDict({"data": {"tokenizer": str(src)}})
  copies = [tokenizer.copy_tokenizer(src, tmp_path / "copy" / "vocab.txt"),
            pretrain.prepare_tokenizer(config, files.path(tmp_path / "workdir")),
            checkpoint.save_model(tmp_path / "model", get_variant("tiny", vocab_size=99),
                                  {"w": np.zeros(3, np.float32)}, src) / "vocab.txt"]
  for copy in copies:
    assert tokenizer.load(copy).encode(text) == want, copy
  # to-hf writes a tokenizer_config.json of its own, stating the same casing and accents.
  hf_config = hf_tokenizer.files_for(src, 512)["tokenizer_config.json"]
  (tmp_path / "copy" / "tokenizer_config.json").write_text(hf_config)
  assert tokenizer.load(tmp_path / "copy" / "vocab.txt").encode(text) == want
  assert _bert_fast(tmp_path / "copy")(text, add_special_tokens=False)["input_ids"] == want
  # A SentencePiece model carries its settings itself: nothing is copied beside it.
  sp_copy = tokenizer.copy_tokenizer(sp_tok.path, tmp_path / "sp" / "tokenizer.model")
  assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["tokenizer.model"]
  assert tokenizer.load(sp_copy).encode(text) == sp_tok.encode(text)


def test_a_lone_surrogate_is_refused_with_its_place(tmp_path, sp_tok):
  # json.loads accepts "\ud83d" (half of a UTF-16 pair) in a SQuAD context; it is no character.
  wp = tokenizer.load(_vocab_dir(tmp_path, WORDS) / "vocab.txt")
  text = "Fans wrote \ud83d in 1999."
  for tok in (wp, sp_tok):
    for method in ("encode", "encode_with_offsets", "encode_batch"):
      with pytest.raises(tokenizer.TokenizerError, match=r"lone surrogate U\+D83D at character "
                         r"11 \('Fans wrote \\ud83d in 1999.'\)"):
        getattr(tok, method)(["ok", text] if method == "encode_batch" else text)
