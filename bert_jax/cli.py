"""Shared behaviour of the command-line entry points: logging, one clear message on bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

# Errors that mean "the input or configuration is wrong": print the message, exit 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def run(main: Callable[..., Any], *args: Any) -> Any:
  """Calls main(*args); a user error or a non-finite loss prints one line and exits non-zero."""
  setup_logging()
  from bert_jax.pretrain import NonFiniteLossError
  try:
    return main(*args)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except _USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
