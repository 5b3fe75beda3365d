"""The command lines from any directory: bad flags and config arguments give one line naming
the flag and what was expected, exit code 2, and no traceback."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--config.train.stepz=3"],
     'error: --config.train.stepz=3: no such config field (did you mean "steps"'),
    ("train.py", ["--config.train.steps=abc"], "error: --config.train.steps=abc: invalid literal"),
    ("train.py", [f"--config={ROOT}/configs/pretrain.py:huge"], "unknown variant 'huge'"),
    ("finetune.py", ["--config=/nonexistent/classify.py", "--workdir=w"],
     "error: --config: cannot load /nonexistent/classify.py"),
    ("finetune.py", [f"--config={ROOT}/configs/classify.py", "--workdir=w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
    # A shipped config by its name, from a directory that has no configs/: the shipped one.
    ("finetune.py", ["--config=configs/classify.py:tiny", "--workdir=w"],
     "error: random initialisation (init_from='') needs --config.tokenizer"),
])
def test_bad_flags_are_one_line_from_any_directory(tmp_path, script, args, message):
  out = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, out.stderr


def _console_commands() -> dict[str, str]:
  import tomllib
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


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
  out = subprocess.run([str(pathlib.Path(sys.executable).parent / command), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, out.stderr
