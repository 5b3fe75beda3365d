"""Shared behaviour of the command-line entry points: logging, one clear message on bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from bert_jax.errors import BertJaxError

# Errors raised by the libraries we call (ml_collections, numpy, the file system) on bad input:
# printed as one line with exit code 2 as well. Our own errors derive from BertJaxError.
_LIBRARY_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[..., Any], *args: Any) -> Any:
  """Calls main(*args); a user error or a non-finite loss prints one line and exits with the
  error's code (2 for bad input, 3 for a NaN/Inf loss)."""
  setup_logging()
  try:
    return main(*args)
  except BertJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except _LIBRARY_USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
