"""The one error type for bad input data: it names the file, the line or record, and what was
expected. A `bert_jax.errors.BertJaxError`, so the command-line entry points print it as one line
and exit non-zero."""

from __future__ import annotations

from bert_jax.errors import BertJaxError


class DataError(BertJaxError, ValueError):
  """Input data that cannot be read: the message says where (file, line/record) and why."""
