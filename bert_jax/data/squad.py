"""SQuAD v1.1 / v2.0 JSON -> fixed-shape question + passage windows with character offsets."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from bert_jax.data.errors import DataError


def load_json(path: str | pathlib.Path) -> Any:
  """Parses a JSON file; malformed JSON raises DataError naming the file, line and column."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e})") from e
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
