"""Shared behaviour of the command-line entry points: logging, one clear message on bad input."""

from __future__ import annotations

import logging
import os
import re
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


def define_config_flag(script: str, default: str | None, help_text: str):
  """`--config` (an ml_collections config file) for the CLI `script` (its __file__): a relative
  default resolves against the script's directory, so the CLI runs from any directory. A config
  file that does not load or an override of a field that does not exist (both are read when the
  flag is defined) prints one line and exits 2."""
  from ml_collections import config_flags
  if default is not None and not os.path.isabs(default):
    default = os.path.join(os.path.dirname(os.path.abspath(script)), default)
  root = os.path.dirname(os.path.abspath(script))
  if root not in sys.path:
    sys.path.insert(0, root)  # configs/*.py import their shared fields as `configs.<module>`
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
    if isinstance(e, KeyError | AttributeError):
      hint = text[text.find("Did you mean"):] if "Did you mean" in text else ""
      text = "no such config field" + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
    print(f"error: {' '.join(overrides) or '--config'}: {text}", file=sys.stderr)
    sys.exit(2)


def config_value(flag) -> Any:
  """The config of a `define_config_flag` flag; a file that failed to load (read lazily by
  ml_collections) prints one line naming it and exits 2."""
  value = flag.value
  try:
    value.keys()
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: --config: cannot load {lines[-2] if len(lines) > 1 else ''} "
          f"({lines[-1]})", file=sys.stderr)
    sys.exit(2)
  return value


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(..., flags_parser=cli.parse_flags)`) with a bad flag value,
  e.g. a config argument that its get_config refuses, as one line and exit 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    head = lines[0].removeprefix("flag ").rstrip(":")
    reason = re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if len(lines) > 1 else ""
    head = head.split(": Error whilst")[0]
    print(f"error: {head}{': ' + reason if reason else ''}", file=sys.stderr)
    sys.exit(2)
