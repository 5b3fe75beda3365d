"""The command lines from any directory: bad flags and config arguments give one line naming
the flag and what was expected, exit code 2, and no traceback."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,message", [
    # The override at fault is the one quoted, not every override before it.
    ("train.py", ["--config.train.batch_size=8", "--config.train.stepz=3"],
     'error: --config.train.stepz=3: no such config field (did you mean "steps"'),
    ("train.py", ["--config.train.batch_size=8", "--config.train.steps=abc"],
     "error: --config.train.steps=abc: invalid literal"),
    ("train.py", ["--config.model.dtype=fp16"], "BertConfig.dtype must be one of ('auto', "),
    # ...with --config=FILE too (then ml_collections reads the overrides as the flags are parsed)
    ("train.py", [f"--config={ROOT}/configs/pretrain.py", "--config.train.stepz=3"],
     'error: --config.train.stepz=3: no such config field (did you mean "steps"'),
    ("finetune.py", ["--config=configs/classify.py", "--workdir=w", "--config.data.lables=0,1"],
     'error: --config.data.lables=0,1: no such config field (did you mean "labels"'),
    ("train.py", [f"--config={ROOT}/configs/pretrain.py:huge"], "unknown variant 'huge'"),
    ("finetune.py", ["--config=/nonexistent/classify.py", "--workdir=w"],
     "error: --config: cannot load /nonexistent/classify.py"),
    ("finetune.py", [f"--config={ROOT}/configs/classify.py", "--workdir=w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
    ("train.py", ["--workdir=notes.txt"], "notes.txt: is a file; expected a directory"),
    # absl's required flags, as one line that names them all
    ("finetune.py", [], "error: missing --config and --workdir (`finetune.py --help` describes"),
    ("finetune.py", ["--config=configs/classify.py"], "error: missing --workdir ("),
    # A shipped config by its name, from a directory that has no configs/: the shipped one.
    ("finetune.py", ["--config=configs/classify.py:tiny", "--workdir=w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
    # ... in absl's other spelling, --config FILE
    ("finetune.py", ["--config", "configs/classify.py", "--workdir", "w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
    # A config file that does not load, with an override (which reads it as flags are parsed)
    ("train.py", ["--config=nosuch.py", "--config.train.steps=1"],
     "error: --config: cannot load nosuch.py ([Errno 2] No such file or directory"),
])
def test_bad_flags_are_one_line_from_any_directory(tmp_path, script, args, message):
  (tmp_path / "notes.txt").write_text("a file, not a workdir")
  out = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, out.stderr


def _console_commands() -> dict[str, str]:
  import tomllib
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run_command(argv, cwd):
  """Runs argv in `cwd`; a bare first word is a console command of this environment."""
  if not argv[0].startswith("/"):
    argv = [str(pathlib.Path(sys.executable).parent / argv[0]), *argv[1:]]
  return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_install_puts_every_console_command_on_the_path():
  bin_dir = pathlib.Path(sys.executable).parent
  missing = [name for name in _console_commands() if not (bin_dir / name).is_file()]
  assert not missing, f"not installed in {bin_dir}: {missing} (pip install -e . makes them)"


@pytest.mark.parametrize("command,args,message", [
    ("bert-jax-pretrain", ["--config.train.stepz=3"], "no such config field"),
    ("bert-jax-finetune", ["--config=classify.py", "--workdir=w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
    ("bert-jax-convert", ["to-hf", "nowhere", "out"], "nowhere"),
])
def test_console_commands_run_the_scripts_from_any_directory(tmp_path, command, args, message):
  out = _run_command([command, *args], tmp_path)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, out.stderr


@pytest.mark.parametrize("argv,first_line", [
    ([sys.executable, str(ROOT / "train.py"), "--help"], "Pretrains BERT"),
    (["bert-jax-pretrain", "-h"], "Pretrains BERT"),
    (["bert-jax-finetune", "--help"], "Fine-tunes BERT"),
])
def test_help_describes_the_command_and_its_flags(tmp_path, argv, first_line):
  """--help (script or console command) prints what the command does and its own flags (absl
  would print only a usage line for a console script, and no flags defined outside __main__),
  and exits 0."""
  out = _run_command(argv, tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(first_line), out.stdout
  assert "--config: " in out.stdout and "--workdir: " in out.stdout, out.stdout


@pytest.mark.parametrize("argv,usage", [
    (["bert-jax-convert", "--help"], "usage: bert-jax-convert "),
    (["bert-jax-bench", "--help"], "usage: bert-jax-bench "),
    ([sys.executable, "-m", "bert_jax.squad_eval", "--help"],
     "usage: python -m bert_jax.squad_eval "),
])
def test_usage_names_the_command_as_it_was_run(tmp_path, argv, usage):
  """The argparse commands' usage line gives the name the user typed: the console command, or
  `python -m module`."""
  out = _run_command(argv, tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(usage), out.stdout


@pytest.mark.parametrize("env,want", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # added to the user's, theirs kept
    ({"BERT_JAX_HUGETLB": "0"}, "None"),  # the opt-out
])
def test_entry_points_run_with_huge_pages(tmp_path, env, want):
  """cli.use_huge_pages re-executes the process with the tunable set (glibc reads it only at
  start-up), the same arguments and pid, once."""
  import os
  code = ("import os, sys; from bert_jax import cli; print(os.getpid(), flush=True); "
          "cli.use_huge_pages(); "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BERT_JAX_HUGETLB")}
  out = subprocess.run([sys.executable, "-c", code, "a", "--b"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**base, **env})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.split("\n")
  first, last = lines[0], [line for line in lines if line][-1]
  if want != "None":
    assert lines.count(first) == 2  # printed before the re-execution and again after it
  pid, tunables, argv = last.split(" ", 2)
  assert pid == first and tunables == want and argv == "['a', '--b']"
