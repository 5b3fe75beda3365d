"""Tokenizers behind one interface: SentencePiece models (trained here) and WordPiece vocab.txt
files (Google and Hugging Face BERT checkpoints).

    tok = tokenizer.load("tokenizer.model")          # or ".../vocab.txt"
    ids = tok.encode("Hello, world")                 # no special tokens
    ids, offsets = tok.encode_with_offsets(text)     # character [start, end) per token
    tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id, tok.vocab_size

Both split CJK characters and punctuation into tokens of their own, as the original BERT's basic
tokenizer does: for SentencePiece, spaces are put around them before training and encoding, so
no piece crosses them. WordPiece is the `tokenizers` library's BERT pipeline, the one
`transformers.BertTokenizerFast` runs, so ids are identical to it.

Train a SentencePiece model with the BERT special tokens at fixed ids ([PAD] 0, [UNK] 1, [CLS] 2,
[SEP] 3, [MASK] 4):

    python -m bert_jax.tokenizer train --input a.txt,b.txt --vocab_size 8000 --output tok/sp
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from bert_jax import cli, files
from bert_jax.data.errors import DataError
from bert_jax.data.text import check_files, expand_files, iter_lines
from bert_jax.errors import BertJaxError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The names a model directory (ours or Hugging Face's) keeps its tokenizer under, preferred first.
TOKENIZER_FILES = ("tokenizer.model", "vocab.txt", "spiece.model", "sentencepiece.model")
# Beside a WordPiece vocabulary: its casing (do_lower_case, strip_accents), as in Hugging Face's.
WORDPIECE_CONFIG = "tokenizer_config.json"
SPACE_PIECE = "\u2581"
# Unicode White_Space, what the `tokenizers` library strips from the end of a vocabulary line
# (Rust's trim_end: not Python's str.strip, which also strips \x1c-\x1f).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007" \
              "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_SURROGATE = re.compile("[\ud800-\udfff]")

# CJK Unified Ideographs and their extensions and compatibility blocks: the ranges the original
# BERT tokenizer treats as Chinese characters (each one a token).
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class TokenizerError(BertJaxError, ValueError):
  """A tokenizer file that cannot be used: the message names the file and what is wrong."""


def check_text(text: str) -> str:
  """`text` itself; a TokenizerError if it holds a lone surrogate (half of a UTF-16 pair, which
  json.loads accepts from an escape like \\ud83d): no character, so no tokenizer can read it."""
  if not text.isascii() and (m := _SURROGATE.search(text)):
    at = m.start()
    raise TokenizerError(f"text with a lone surrogate U+{ord(m.group()):04X} at character {at} "
                         f"({text[max(0, at - 40):at + 40]!r}): half of a UTF-16 pair, not a "
                         "character (a JSON escape without its other half?); remove it")
  return text


def is_cjk(ch: str) -> bool:
  o = ord(ch)
  return any(lo <= o <= hi for lo, hi in CJK_RANGES)


def is_punctuation(ch: str) -> bool:
  """BERT's definition: every non-alphanumeric ASCII symbol, and Unicode category P*."""
  o = ord(ch)
  if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def is_split_char(ch: str) -> bool:
  """A character that is always a token (or the start of one) of its own."""
  return is_cjk(ch) or is_punctuation(ch)


def code_point_ranges(code_points: Iterable[int]) -> list[tuple[int, int]]:
  """Sorted code points -> the (first, last) of each run of consecutive ones."""
  ranges: list[list[int]] = []
  for o in code_points:
    if ranges and ranges[-1][1] == o - 1:
      ranges[-1][1] = o
    else:
      ranges.append([o, o])
  return [(a, b) for a, b in ranges]


@functools.cache
def split_ranges() -> tuple[tuple[int, int], ...]:
  """The code point ranges of the split characters (built once from the Unicode tables)."""
  punctuation = code_point_ranges(o for o in range(0x110000) if is_punctuation(chr(o)))
  return tuple(punctuation + list(CJK_RANGES))


@functools.cache
def _split_pattern() -> re.Pattern:
  """A regex matching one split character."""
  parts = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                  for a, b in split_ranges())
  return re.compile(f"([{parts}])")


def presplit(text: str) -> str:
  """Spaces around every CJK character and punctuation mark (what SentencePiece is trained on)."""
  return _split_pattern().sub(r" \1 ", text)


def file_fingerprint(path: str | pathlib.Path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


class Tokenizer:
  """What the rest of the code uses; see the module docstring."""

  kind: str
  path: pathlib.Path
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    raise NotImplementedError

  def id_to_token(self, i: int) -> str:
    raise NotImplementedError

  def tokens(self, ids: Iterable[int]) -> list[str]:
    return [self.id_to_token(int(i)) for i in ids]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the tokenizer file: data made with one tokenizer is refused by another."""
    return file_fingerprint(self.path)

  @property
  def special_ids(self) -> tuple[int, ...]:
    return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

  @functools.cached_property
  def word_starts(self) -> np.ndarray:
    """bool[vocab_size]: the token begins a word (whole-word masking groups a word's tokens)."""
    return np.array([self._starts_word(self.id_to_token(i)) for i in range(self.vocab_size)])

  def _starts_word(self, token: str) -> bool:
    raise NotImplementedError

  def _set_special_ids(self, lookup) -> None:
    ids = {t: lookup(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise TokenizerError(f"{self.path}: the tokenizer has no {', '.join(missing)} token"
                           f"{'s' if len(missing) > 1 else ''}; BERT needs "
                           f"{' '.join(SPECIAL_TOKENS)} (train one with python -m "
                           "bert_jax.tokenizer train)")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        ids[t] for t in SPECIAL_TOKENS)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model, with CJK characters and punctuation split out before encoding."""

  kind = "sentencepiece"

  def __init__(self, path: str | pathlib.Path):
    import sentencepiece as spm
    self.path = pathlib.Path(path)
    try:
      self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from None
    self.vocab_size = self.sp.get_piece_size()

    def lookup(token):
      i = self.sp.piece_to_id(token)
      return i if self.sp.id_to_piece(i) == token else None
    self._set_special_ids(lookup)
    space = self.sp.piece_to_id(SPACE_PIECE)
    self._space_id = space if self.sp.id_to_piece(space) == SPACE_PIECE else -1
    # Pieces a lone "▁" before is dropped: split characters, and [UNK] (an unknown one).
    self._split_piece = np.array([len(p) == 1 and is_split_char(p) for p in
                                  map(self.sp.id_to_piece, range(self.vocab_size))] + [False])
    self._split_piece[self.unk_id] = True

  def _kept(self, ids: np.ndarray) -> np.ndarray:
    """bool per piece: False for a lone "▁" in front of a split character or [UNK] (it only
    marks a space), True otherwise."""
    nxt = np.append(ids[1:], self.vocab_size).astype(np.int64)
    return ~((ids == self._space_id) & self._split_piece[nxt])

  def _drop(self, ids: np.ndarray) -> np.ndarray:
    return ids[self._kept(ids)] if ids.size else ids

  def encode(self, text: str) -> list[int]:
    return self._drop(np.asarray(self.sp.encode(presplit(check_text(text))), np.int64)).tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    out = self.sp.encode([presplit(check_text(t)) for t in texts], num_threads=1)
    return [self._drop(np.asarray(ids, np.int64)).tolist() for ids in out]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    split = presplit(check_text(text))
    # Character of `split` -> character of `text` (inserted spaces map to -1).
    origin = np.full(len(split) + 1, -1, np.int64)
    j = 0
    for i, ch in enumerate(split):
      if j < len(text) and ch == text[j]:
        origin[i] = j
        j += 1
    # UTF-8 byte of `split` -> character of `split`.
    char_of_byte = np.repeat(np.arange(len(split) + 1),
                             [len(c.encode("utf-8")) for c in split] + [1])
    pieces = self.sp.encode(split, return_type="proto").pieces
    kept = self._kept(np.array([p.id for p in pieces], np.int64))
    out_ids, offsets = [], []
    for p, keep in zip(pieces, kept, strict=False):
      if not keep:
        continue
      chars = [c for c in origin[char_of_byte[p.begin]:char_of_byte[p.end]]
               if c >= 0 and not text[c].isspace()]
      if chars:
        offsets.append((int(chars[0]), int(chars[-1]) + 1))
      else:  # a lone "▁": an empty span where it stands
        at = next((int(c) for c in origin[char_of_byte[p.begin]:] if c >= 0), len(text))
        offsets.append((at, at))
      out_ids.append(int(p.id))
    return out_ids, offsets

  def id_to_token(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def decode(self, ids: Iterable[int]) -> str:
    specials = set(self.special_ids)
    text = self.sp.decode([int(i) for i in ids if int(i) not in specials])
    return re.sub(r" ([,.;:!?])", r"\1", text)

  def _starts_word(self, token: str) -> bool:
    return token.startswith(SPACE_PIECE) or (len(token) == 1 and is_split_char(token)) or (
        token in SPECIAL_TOKENS)


class WordPieceTokenizer(Tokenizer):
  """A BERT vocab.txt, run by the `tokenizers` library's BERT pipeline (clean text, CJK and
  punctuation split, optional lower-casing and accent stripping, greedy WordPiece).

  Lines are read as that library (so BertTokenizerFast) reads them: trailing white space removed
  (a line of U+2028 alone, as in Google's Chinese vocab, is the token ""), and a token listed
  twice takes the id of its last line; vocab_size counts the lines, so every id has a row.
  Casing: `lowercase`, else do_lower_case from the tokenizer_config.json beside the vocab, else
  inferred (no upper-case token but bracketed ones like [unused1], <S>); strip_accents from that
  file (None: follow lower-casing).
  """

  kind = "wordpiece"

  def __init__(self, path: str | pathlib.Path, lowercase: bool | None = None,
               settings: dict[str, bool | None] | None = None):
    """settings: read_settings(original path) where `path` is a local copy of a URL."""
    from tokenizers import BertWordPieceTokenizer
    self.path = pathlib.Path(path)
    self._tokens = _read_vocab(self.path)
    self.vocab = {t: i for i, t in enumerate(self._tokens)}  # a repeated token: its last line
    _warn_repeats(self.path, self._tokens, self.vocab)
    self._set_special_ids(self.vocab.get)
    settings = read_settings(self.path) if settings is None else settings
    lowercase = settings["do_lower_case"] if lowercase is None else lowercase
    self.lowercase = _infer_lowercase(self.vocab) if lowercase is None else lowercase
    self.strip_accents = settings["strip_accents"]
    self.tok = BertWordPieceTokenizer(self.vocab, lowercase=self.lowercase,
                                      strip_accents=self.strip_accents, clean_text=True,
                                      handle_chinese_chars=True)
    self.vocab_size = len(self._tokens)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(check_text(text), add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch([check_text(t) for t in texts],
                                                 add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    e = self.tok.encode(check_text(text), add_special_tokens=False)
    return e.ids, [tuple(o) for o in e.offsets]

  def id_to_token(self, i: int) -> str:
    return self._tokens[int(i)]

  @functools.cached_property
  def fingerprint(self) -> str:
    """The vocab file's sha256, with the casing when it is not what the vocab alone implies
    (data made lower-cased is refused by the same vocab run cased, and the other way round)."""
    base = file_fingerprint(self.path)
    if (self.lowercase, self.strip_accents) == (_infer_lowercase(self.vocab), None):
      return base
    casing = f"lowercase={self.lowercase} strip_accents={self.strip_accents}"
    return hashlib.sha256(f"{base} {casing}".encode()).hexdigest()

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def _starts_word(self, token: str) -> bool:
    return not token.startswith("##")


def _read_vocab(path: pathlib.Path) -> list[str]:
  """The token of each line (its id: the line number - 1), trailing white space removed."""
  tokens = [line.rstrip(WHITE_SPACE) for _, line in iter_lines(path)]
  if not tokens:
    raise TokenizerError(f"{path}: empty vocabulary")
  return tokens


def _warn_repeats(path: pathlib.Path, tokens: list[str], vocab: dict[str, int]) -> None:
  if len(vocab) < len(tokens):
    n, token = next((n, t) for n, t in enumerate(tokens, 1) if vocab[t] != n - 1)
    log.warning("%s:%d: %r is listed again on line %d (%d lines repeat an earlier one): a token "
                "takes the id of its last line, as in Hugging Face's tokenizers", path, n, token,
                vocab[token] + 1, len(tokens) - len(vocab))


def read_settings(path: str | os.PathLike) -> dict[str, bool | None]:
  """do_lower_case and strip_accents (None: not stated) from the tokenizer_config.json beside the
  vocabulary `path` (a URL too), as BertTokenizerFast.from_pretrained takes them from it."""
  cfg = files.path(path).parent / WORDPIECE_CONFIG
  settings = dict.fromkeys(("do_lower_case", "strip_accents"))
  if not cfg.is_file():
    return settings
  try:
    stated = json.loads(cfg.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{cfg}: not valid JSON ({e})") from None
  if not isinstance(stated, dict):
    raise TokenizerError(f"{cfg}: expected a JSON object, not {type(stated).__name__}")
  for key in settings:
    value = stated.get(key)
    if value is not None and not isinstance(value, bool):
      raise TokenizerError(f"{cfg}: {key}={value!r}: expected true, false or null")
    settings[key] = value
  return settings


def _bracketed(token: str) -> bool:
  return len(token) > 2 and (token[0], token[-1]) in (("[", "]"), ("<", ">"))


def _infer_lowercase(vocab: Iterable[str]) -> bool:
  """Uncased when no token has an upper-case letter, bracketed ones ([CLS], [unused1], and the
  <S> <T> of Google's Chinese vocab) aside."""
  return not any(t.lower() != t for t in vocab if not _bracketed(t))


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> epath.Path:
  """Copies the tokenizer file `src` to `dst` (either may be a URL) with what settles how it
  tokenizes: for a WordPiece vocabulary, the tokenizer_config.json beside it, if any, goes beside
  `dst` (first: the tokenizer file marks a finished copy). A SentencePiece model holds its own
  settings. Returns `dst`."""
  src, dst = files.path(src), files.path(dst)
  if src.suffix == ".txt" and (src.parent / WORDPIECE_CONFIG).is_file():
    files.copy(src.parent / WORDPIECE_CONFIG, dst.parent / WORDPIECE_CONFIG)
  files.copy(src, dst)
  return dst


def find_file(directory: str | os.PathLike) -> epath.Path | None:
  """The tokenizer file kept in a model directory (for a checkpoint step directory
  `<workdir>/checkpoints/<step>`, in its workdir): one of TOKENIZER_FILES, else any *.model.
  The directory may be a URL (gs://...)."""
  directory = files.path(directory)
  places = [directory]
  if (directory / "state").is_dir():
    places.append(directory.parent.parent)
  for place in places:
    for name in TOKENIZER_FILES:
      if (place / name).is_file():
        return place / name
  models = sorted(directory.glob("*.model"))
  return models[0] if models else None


def load(path: str | pathlib.Path, lowercase: bool | None = None) -> Tokenizer:
  """A SentencePiece model (*.model) or a WordPiece vocabulary (vocab.txt or any *.txt, with the
  tokenizer_config.json beside it: see WordPieceTokenizer); for a directory, the tokenizer file
  inside it (see find_file). A URL (gs://...) is read through a local copy."""
  path = files.path(path)
  if path.is_dir():
    found = find_file(path)
    if found is None:
      raise TokenizerError(f"{path}: no tokenizer.model or vocab.txt in this directory")
    return load(found, lowercase)
  if not path.is_file():
    raise TokenizerError(f"{path}: no such tokenizer file")
  if path.suffix == ".txt":
    return WordPieceTokenizer(pathlib.Path(files.local(path)), lowercase, read_settings(path))
  return SentencePieceTokenizer(pathlib.Path(files.local(path)))


# ----------------------------------------------------------------------------- training


def _training_sentences(files: Sequence[pathlib.Path], counter: list[int],
                        errors: list[DataError]) -> Iterator[str]:
  """The lines to train on; a DataError (bad bytes) is kept in `errors` for the caller, as
  SentencePiece would report it as its own RuntimeError with a Python stack in the text."""
  try:
    for path in files:
      for _, line in iter_lines(path):
        line = line.strip()
        if line:
          counter[0] += 1
          yield presplit(line)
  except DataError as e:
    errors.append(e)
    raise


def default_character_coverage(paths: Sequence[pathlib.Path], sample_chars: int = 1_000_000
                               ) -> float:
  """1.0 (every character seen gets a piece) unless CJK characters make up over a third of the
  text sampled from the start of each file: then 0.9995, SentencePiece's advice for scripts with
  thousands of rare characters. (At 0.9995 an English corpus loses '8', '(', '%' and '$' to
  [UNK].)"""
  cjk = total = 0
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read(sample_chars)
    total += sum(not ch.isspace() for ch in text)
    cjk += sum(map(is_cjk, text))
  return 0.9995 if total and cjk / total > 1 / 3 else 1.0


def train_sentencepiece(files: Sequence[str | pathlib.Path], vocab_size: int,
                        output_prefix: str | pathlib.Path, model_type: str = "bpe",
                        character_coverage: float | None = None,
                        input_sentence_size: int = 2_000_000, lowercase: bool = False) -> str:
  """Trains a SentencePiece model on text files; returns the path of `<output_prefix>.model`.

  The BERT special tokens take ids 0-4; CJK characters and punctuation are split out first (as
  `encode` does). `lowercase` makes an uncased model: the case folding is part of the model's
  normaliser, so whoever loads it lower-cases the same way. `character_coverage=None` picks it
  from the text (`default_character_coverage`). The vocabulary may come out smaller than asked on
  a small corpus (a warning says so); the model file is written atomically.

  BPE is the default because the unigram trainer does badly on text whose punctuation stands
  apart: it learns the bare word boundary "▁" as a piece and splits common words on it. On the
  shared English corpus at 8,000 pieces unigram gives "▁be en", "▁the y", "▁ this" and 1.78
  tokens per word of held-out Wikipedia; BPE keeps "▁been", "▁they", "▁this" whole, 1.64.
  """
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type must be unigram or bpe, not {model_type!r}")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(
      SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size!r}: expected a whole number above "
                     f"{len(SPECIAL_TOKENS)} (the special tokens alone take that many ids)")
  paths = check_files(files)
  if character_coverage is None:
    character_coverage = default_character_coverage(paths)
  out = pathlib.Path(f"{output_prefix}.model")
  out.parent.mkdir(parents=True, exist_ok=True)
  counter, errors = [0], []
  import io
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(paths, counter, errors), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        control_symbols=list(SPECIAL_TOKENS[2:]), hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    if errors:
      raise errors[0] from None
    if counter[0] == 0:
      raise DataError(f"{', '.join(map(str, paths))}: no text to train a tokenizer on") from None
    raise DataError(f"training SentencePiece on {', '.join(map(str, paths))} failed: {e}"
                    ) from None
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_bytes(model.getvalue())
  os.replace(tmp, out)
  got = SentencePieceTokenizer(out).vocab_size
  if got != vocab_size:
    log.warning("%s: the corpus gave %d pieces, not the %d asked for", out, got, vocab_size)
  return str(out)


# ----------------------------------------------------------------------------- command line


def _main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog=cli.prog("bert_jax.tokenizer"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model with the BERT special tokens")
  t.add_argument("--input", required=True, help="comma-separated text files or globs")
  t.add_argument("--vocab_size", type=int, default=30000)
  t.add_argument("--output", required=True, help="output prefix: writes PREFIX.model")
  t.add_argument("--model_type", default="bpe", choices=("unigram", "bpe"))
  t.add_argument("--character_coverage", type=float, default=None,
                 help="share of characters with a piece of their own (default: 1.0, or 0.9995 "
                      "for mostly-CJK text)")
  t.add_argument("--lowercase", action="store_true", help="an uncased model (folds case)")
  e = sub.add_parser("encode", help="print the tokens of each line of stdin")
  e.add_argument("--tokenizer", required=True)
  args = p.parse_args(argv)
  if args.command == "train":
    target = f"{args.output}.model"  # a URL: trained on local disk, then uploaded
    with files.local_output(target) as out:
      path = train_sentencepiece(expand_files(args.input), args.vocab_size,
                                 str(out)[:-len(".model")], args.model_type,
                                 args.character_coverage, lowercase=args.lowercase)
      pieces = load(path).vocab_size
    print(f"wrote {target} ({pieces} pieces)")
  else:
    tok = load(args.tokenizer)
    for line in sys.stdin:
      print(" ".join(tok.tokens(tok.encode(line.rstrip("\n")))))


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  cli.run(_main)
