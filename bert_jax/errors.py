"""The one root of every user-facing error: the command-line entry points catch `BertJaxError`,
print its message as one line and exit with its `exit_code`; anything else (a bug in our code or in
a library) keeps its traceback."""

from __future__ import annotations


class BertJaxError(Exception):
  """A user error: bad input, a configuration that cannot run, or a run that had to stop."""

  exit_code = 2
  exit_now = False  # True: the CLI exits without exit handlers (a full disk would fail them too)


class ConfigError(BertJaxError, ValueError):
  """A configuration that cannot run; raised before anything compiles. Names the config field."""


class NonFiniteLossError(BertJaxError):
  """The loss or the gradient became NaN or Inf; nothing was saved after the last good step."""

  exit_code = 3


class OutputExistsError(BertJaxError, FileExistsError):
  """An output path that exists and is not ours: refused rather than replaced."""
