"""Shared behaviour of the command-line entry points: logging, one clear message on bad input."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from bert_jax.errors import BertJaxError

# Errors raised by the libraries we call (ml_collections, numpy, the file system) on bad input:
# printed as one line with exit code 2 as well. Our own errors derive from BertJaxError.
_LIBRARY_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# A full disk, a quota, a read-only file system: the machine's state, not a bug.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_no_library_tracebacks)


def _no_library_tracebacks(record: logging.LogRecord) -> bool:
  """Orbax logs each failure of its background threads with a traceback (a full disk: one per
  thread); the error that reaches the CLI says it once. Their message lines are kept."""
  if record.exc_info and record.name.split(".")[0] in ("absl", "orbax"):
    record.exc_info, record.exc_text = None, None
  return True


def prog(module: str) -> str:
  """The name argparse's usage line gives a command: the console command's (`bert-jax-convert`)
  when it runs as one, else `python -m <module>`."""
  name = os.path.basename(sys.argv[0])
  return name if name.startswith("bert-jax-") else f"python -m {module}"


class Stopped(BaseException):
  """SIGTERM outside the training loop (which saves a checkpoint on it instead): raised like
  KeyboardInterrupt, so that an unfinished output is removed on the way out."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> NoReturn:
  raise Stopped(signum)


def run(main: Callable[..., Any], *args: Any) -> Any:
  """Calls main(*args); a user error or a non-finite loss prints one line and exits with the
  error's code (2 for bad input, 3 for a NaN/Inf loss); SIGTERM or Ctrl-C outside the training
  loop one line too, with 128 + the signal's number, after the cleanup of what was being
  written."""
  setup_logging()
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_stopped) if main_thread else None
  try:
    return main(*args)
  except (Stopped, KeyboardInterrupt) as e:
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    _leave(f"error: stopped by {signal.Signals(signum).name}", 128 + signum)
  except BertJaxError as e:
    _leave(f"error: {e}", e.exit_code, now=e.exit_now)
  except _PATH_ERRORS as e:  # a workdir that is a file, a directory given for a file, ...
    if isinstance(e, FileExistsError) and e.filename and os.path.isfile(e.filename):
      _leave(f"error: {e.filename}: is a file; expected a directory (or a new path)", 2)
    _leave(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", 2)
  except _LIBRARY_USER_ERRORS as e:
    _leave(f"error: {e}", 2)
  except OSError as e:
    if e.errno not in _DISK_ERRNOS:
      raise
    _leave(f"error: {e.filename or 'writing'}: {e.strerror}", 2, now=True)
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def _leave(message: str, code: int, now: bool = False) -> None:
  """Prints `message` and exits with `code`; `now`: without the exit handlers, which would fail
  on the same full disk with a traceback each (TensorBoard's, the metrics writer's)."""
  print(message, file=sys.stderr)
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def configs_dir() -> str:
  """The directory of the shipped configs (pretrain.py, classify.py, squad.py): `configs/` beside
  the package in a source checkout or an editable install, else the copy a wheel installs as
  `bert_jax/configs`."""
  here = os.path.dirname(os.path.abspath(__file__))
  beside = os.path.join(os.path.dirname(here), "configs")
  return beside if os.path.isfile(os.path.join(beside, "pretrain.py")) else os.path.join(
      here, "configs")


def _importable_configs() -> None:
  """Config files import their shared fields as `configs.<module>`: `configs` is made the
  package of `configs_dir()`, unless a `configs` package is imported already."""
  if "configs" in sys.modules:
    return
  import importlib.machinery
  import importlib.util
  spec = importlib.machinery.ModuleSpec("configs", None, is_package=True)
  spec.submodule_search_locations = [configs_dir()]
  sys.modules["configs"] = importlib.util.module_from_spec(spec)


def define_config_flag(default: str | None, help_text: str):
  """`--config` (an ml_collections config file). `default` names a file of `configs_dir()`, so
  the command runs from any directory. A config file that does not load or an override of a
  field that does not exist (both are read when the flag is defined) prints one line and exits
  2."""
  from ml_collections import config_flags
  if default is not None:
    default = os.path.join(configs_dir(), default)
  _importable_configs()
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    _config_error(e, sys.argv[1:])


def _config_error(e: Exception, argv: list[str]) -> NoReturn:
  """One line for a config file or `--config.*` override that ml_collections refused (raised
  when the flag is defined or, with `--config=FILE`, when the flags are parsed); exit 2."""
  overrides = [a for a in argv if a.startswith("--config")]
  text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
  # The override at fault: the one with the missing field (the message starts with it) or the
  # bad value the message names; else all of them.
  if isinstance(e, KeyError | AttributeError):
    key = re.match(r"[\w\-]*", text).group()
    named = [a for a in overrides if key in a.partition("=")[0].split(".")[1:]]
    hint = text[text.find("Did you mean"):] if "Did you mean" in text else ""
    text = "no such config field" + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
  else:
    words = set(re.findall(r"[\w.\-]+", text))
    named = [a for a in overrides if a.partition("=")[2] in words]
  print(f"error: {' '.join(named[-1:] or overrides) or '--config'}: {text}", file=sys.stderr)
  sys.exit(2)


def config_value(flag) -> Any:
  """The config of a `define_config_flag` flag; a file that failed to load (read lazily by
  ml_collections) prints one line naming it and exits 2."""
  value = flag.value
  try:
    value.keys()
  except OSError as e:
    _load_error(e)
  return value


def _load_error(e: OSError) -> NoReturn:
  """One line for a config file that did not load (ml_collections' message ends with the path
  it tried and the reason); exit 2."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  print(f"error: --config: cannot load {lines[-2] if len(lines) > 1 else ''} "
        f"({lines[-1]})", file=sys.stderr)
  sys.exit(2)


def _shipped_config(arg: str) -> str:
  """`--config=configs/classify.py` (or `classify.py`, with an optional `:ARG`) that names no file
  here but one of the shipped configs (`configs_dir()`): that one, so the shipped configs work by
  name from any directory and from an installed wheel."""
  prefix = next((p for p in ("--config=", "-config=") if arg.startswith(p)), None)
  if prefix is None:
    return arg
  file, sep, rest = arg.removeprefix(prefix).partition(":")
  shipped = os.path.join(configs_dir(), os.path.basename(file))
  if os.path.exists(file) or not os.path.isfile(shipped) or os.path.basename(
      os.path.dirname(file)) not in ("", "configs"):
    return arg
  return f"--config={shipped}{sep}{rest}"


def _joined(args: list[str]) -> list[str]:
  """`--config FILE` as `--config=FILE` (absl takes both), so the shipped configs are found by
  name in either form."""
  out, i = [], 0
  while i < len(args):
    if args[i] in ("--config", "-config") and i + 1 < len(args):
      out.append(f"{args[i]}={args[i + 1]}")
      i += 2
    else:
      out.append(args[i])
      i += 1
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(..., flags_parser=cli.parse_flags)`) with a bad flag value,
  e.g. a config argument that its get_config refuses, as one line and exit 2."""
  from absl import flags
  argv = [argv[0], *("--help" if a == "-h" else _shipped_config(a) for a in _joined(argv[1:]))]
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help (-?, --helpfull, ...) exits 1 after printing the help
    asked = {"-?", "-help", "--help", "-helpshort", "--helpshort", "-helpfull", "--helpfull"}
    if e.code == 1 and asked.intersection(argv[1:]):
      sys.exit(0)
    raise
  except OSError as e:  # a config file that did not load, read by a --config.* override
    _load_error(e)
  except (KeyError, AttributeError, ValueError, TypeError) as e:  # a --config.* override
    _config_error(e, argv[1:])
  except flags.Error as e:
    missing = re.findall(r"Flag (--\w+) must have a value other than None", str(e))
    if missing:  # absl's required flags: "--config=None: Flag --config must have a value ..."
      print(f"error: missing {' and '.join(dict.fromkeys(missing))} "
            f"(`{os.path.basename(argv[0])} --help` describes them)", file=sys.stderr)
      sys.exit(2)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    head = lines[0].removeprefix("flag ").rstrip(":")
    reason = re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if len(lines) > 1 else ""
    head = head.split(": Error whilst")[0]
    print(f"error: {head}{': ' + reason if reason else ''}", file=sys.stderr)
    sys.exit(2)


HUGETLB = "glibc.malloc.hugetlb=1"


def use_huge_pages() -> None:
  """Re-executes this process (same interpreter, arguments and pid) with glibc's malloc backing
  its large blocks by transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which glibc
  reads only at start-up): XLA's CPU step allocates large buffers every step, and huge pages cut
  its page faults (1.3-1.4x on a fine-tuning step, README "Benchmark"). Call it first thing in
  an entry point, before anything is imported that matters. Nothing happens off Linux/glibc,
  when GLIBC_TUNABLES already sets the tunable, or with BERT_JAX_HUGETLB=0. Child processes
  (the benchmark's peer, multi-host workers started from here) inherit the setting."""
  import platform
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (os.environ.get("BERT_JAX_HUGETLB", "1") == "0" or "glibc.malloc.hugetlb" in tunables
      or sys.platform != "linux" or platform.libc_ver()[0] != "glibc"):
    return
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGETLB]))}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

