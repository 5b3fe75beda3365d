"""Our tokenizers as Hugging Face tokenizer files, for the directories `convert to-hf` writes:
`transformers.AutoTokenizer.from_pretrained(dir)` then gives the ids ours gives.

- WordPiece (`vocab.txt`): the vocabulary and a tokenizer_config.json with its casing
  (do_lower_case, strip_accents), for BertTokenizerFast (whose own default, lower-casing, would be
  wrong for a cased vocabulary).
- SentencePiece BPE (`tokenizer.model`): a `tokenizer.json` for the `tokenizers` library built
  from the model itself. Ours splits CJK characters and punctuation out before SentencePiece
  runs, and drops the lone "▁" SentencePiece puts before such a character (or an unknown one)
  when it has no "▁"-piece for it; the pipeline here does the same with the library's parts:
    normalizer     a space in front; spaces around each CJK/punctuation character; the model's
                   own normaliser (its precompiled character map); runs of spaces made one, none
                   at the end; the space before a character ours keeps bare (a split character
                   without a "▁X" piece, an unknown one) turned into \x01, a word break without
                   "▁" (the model's normaliser deletes control characters from the text itself)
    pre-tokenizer  split at \x01 (removed), then at spaces, each word with its "▁" (Metaspace)
    model          BPE: the model's pieces, one merge per way of making a piece from two (ranked
                   by the piece's score, as SentencePiece picks), unknown runs as one [UNK]
  tests/test_convert.py checks the ids against ours on the shared English and Chinese corpora.
  Not for a unigram model: its Viterbi split may cut "▁X" in two where a "▁X" piece exists, and
  ours then drops the "▁", which no normaliser can foresee; its export keeps only
  tokenizer.model, with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from bert_jax import tokenizer as tok_lib

log = logging.getLogger(__name__)

_BPE = 2  # sentencepiece's ModelProto.TrainerSpec.ModelType
_NORMAL = 1  # ModelProto.SentencePiece.Type


def _special_tokens_map() -> dict[str, str]:
  pad, unk, cls, sep, mask = tok_lib.SPECIAL_TOKENS
  return {"pad_token": pad, "unk_token": unk, "cls_token": cls, "sep_token": sep,
          "mask_token": mask}


def _config(tokenizer_class: str, max_length: int, **extra: Any) -> dict[str, Any]:
  return {"tokenizer_class": tokenizer_class, "model_max_length": max_length,
          "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
          "clean_up_tokenization_spaces": False, **_special_tokens_map(), **extra}


def wordpiece_files(tok: tok_lib.WordPieceTokenizer, max_length: int) -> dict[str, str]:
  """tokenizer_config.json for a vocab.txt (copied beside it by the caller), in place of the one
  read beside the source: it states the casing ours settled on (given, read or inferred)."""
  return {tok_lib.WORDPIECE_CONFIG: json.dumps(_config(
      "BertTokenizer", max_length, do_lower_case=tok.lowercase, tokenize_chinese_chars=True,
      strip_accents=tok.strip_accents), indent=2) + "\n"}


def _model_proto(path):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(open(path, "rb").read())
  return proto


def _merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
  """Every split of every normal piece into two pieces, the pieces in SentencePiece's order of
  preference (their scores; `pieces` comes sorted by it)."""
  merges = []
  for piece in pieces:
    for k in range(1, len(piece)):
      a, b = piece[:k], piece[k:]
      if a in vocab and b in vocab:
        merges.append((a, b))
  return merges


def _char_class(ranges: Iterable[tuple[int, int]], negate: bool = False) -> str:
  """A regex character class (Oniguruma, as `tokenizers` uses) of code point ranges."""
  body = "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)
  return f"[{'^' if negate else ''}{body}]"


def _chars_class(chars: set[str], negate: bool = False) -> str:
  return _char_class(tok_lib.code_point_ranges(sorted(map(ord, chars))), negate)


def sentencepiece_files(tok: tok_lib.SentencePieceTokenizer, max_length: int
                        ) -> dict[str, str]:
  """tokenizer.json and tokenizer_config.json for a SentencePiece BPE model; {} (with a
  warning) for a unigram one."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  proto = _model_proto(tok.path)
  if proto.trainer_spec.model_type != _BPE:
    log.warning("%s is a unigram SentencePiece model, which Hugging Face's tokenizers cannot "
                "reproduce exactly with our CJK/punctuation split: the export keeps "
                "tokenizer.model only (bert_jax reads it; AutoTokenizer does not)", tok.path)
    return {}
  space = tok_lib.SPACE_PIECE
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  normal = sorted((p for p in proto.pieces if p.type == _NORMAL), key=lambda p: -p.score)
  known = {p.piece for p in normal if len(p.piece) == 1} - {space}
  # Where ours keeps no "▁" in front: a split character without a "▁X" piece, an unknown one.
  bare = {c for c in known if tok_lib.is_split_char(c) and space + c not in vocab}
  split_class = _char_class(tok_lib.split_ranges())
  # As ours: CJK characters and punctuation apart (before the model's normaliser runs), then
  # the model's normaliser (it deletes control characters, so \x01 marks our word breaks).
  # The space in front (SentencePiece's dummy prefix) comes first: the library mis-tracks an
  # insertion at the very start of the text.
  steps = [normalizers.Prepend(" "),
           normalizers.Replace(Regex(f"(?<={split_class})|(?={split_class})"), " ")]
  if proto.normalizer_spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
  steps += [
      # one space between words, none at the end
      normalizers.Replace(Regex(" +"), " "), normalizers.Replace(Regex(" $"), ""),
      # a word break without "▁" before a bare split character or an unknown one
      normalizers.Replace(Regex(f" (?={_chars_class(bare)}|{_chars_class(known | {' '}, True)})"),
                          "\x01")]
  hf = Tokenizer(models.BPE(vocab=vocab, merges=_merges([p.piece for p in normal], vocab),
                            unk_token=tok_lib.SPECIAL_TOKENS[1], fuse_unk=True))
  hf.normalizer = normalizers.Sequence(steps)
  hf.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\x01", "removed"),
      pre_tokenizers.Metaspace(replacement=space, prepend_scheme="never", split=True)])
  hf.decoder = decoders.Metaspace(replacement=space, prepend_scheme="always", split=True)
  hf.add_special_tokens(list(tok_lib.SPECIAL_TOKENS))
  cls, sep = tok_lib.SPECIAL_TOKENS[2:4]
  hf.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)])
  return {"tokenizer.json": hf.to_str(),
          "tokenizer_config.json": json.dumps(_config("PreTrainedTokenizerFast", max_length),
                                              indent=2) + "\n"}


def files_for(path, max_length: int) -> dict[str, str]:
  """The Hugging Face tokenizer files (name -> text) to write beside the tokenizer file `path`
  (ours: a SentencePiece model or a vocab.txt) in an export for `transformers`."""
  try:
    tok = tok_lib.load(path)
  except tok_lib.TokenizerError as e:  # e.g. a vocabulary without BERT's special tokens
    log.warning("no Hugging Face tokenizer files in the export: %s", e)
    return {}
  if isinstance(tok, tok_lib.WordPieceTokenizer):
    return wordpiece_files(tok, max_length)
  return sentencepiece_files(tok, max_length)
