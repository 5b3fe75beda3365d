"""The console commands `pip install` puts on the PATH (pyproject.toml's [project.scripts]):
each is the same as the script or module named in its docstring."""

from __future__ import annotations

import sys

from bert_jax import cli

PRETRAIN_HELP = """Pretrains BERT (masked-LM + next-sentence prediction). With no flags: a tiny
BERT on the bundled corpus in ./workdir/pretrain_tiny.

  python train.py --config=configs/pretrain.py:base --workdir=runs/base \\
      --config.data.input_files=corpus/*.txt

The config argument is VARIANT[,phase1|phase2], VARIANT one of tiny, mini, small, medium, base,
large; --config.FIELD=VALUE sets any field (configs/pretrain.py lists them all).
Installed, the same command is `bert-jax-pretrain`.
"""

FINETUNE_HELP = """Fine-tunes BERT for sequence classification or SQuAD reading comprehension,
from a pretraining workdir of ours, an exported model directory or a Hugging Face BERT directory.

  python finetune.py --config=configs/classify.py --workdir=runs/cls --config.init_from=DIR ...
  python finetune.py --config=configs/squad.py --workdir=runs/squad --config.init_from=DIR ...

--config.FIELD=VALUE sets any field of the task config (configs/classify.py, configs/squad.py).
Installed, the same command is `bert-jax-finetune`.
"""


def _describe(help_text: str, *flag_holders) -> None:
  """What `--help` prints for an absl command: absl writes `__main__`'s docstring (which a console
  script's generated `__main__` lacks, and train.py's would duplicate) and the flags it counts as
  the main module's, which those defined here are not: both are set here."""
  from absl import flags
  sys.modules["__main__"].__doc__ = help_text
  for holder in flag_holders:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])


def pretrain_command() -> None:
  """bert-jax-pretrain: train.py."""
  cli.use_huge_pages()
  from absl import app, flags
  config = cli.define_config_flag(
      "pretrain.py", "pretraining config file (configs/pretrain.py, optionally :VARIANT)")
  workdir = flags.DEFINE_string("workdir", "workdir/pretrain_tiny",
                                "directory for the tokenizer, data, checkpoints and metrics")
  _describe(PRETRAIN_HELP, config, workdir)

  def main(argv):
    del argv
    from bert_jax import pretrain
    cli.run(pretrain.main, cli.config_value(config), workdir.value)
  app.run(main, flags_parser=cli.parse_flags)


def finetune_command() -> None:
  """bert-jax-finetune: finetune.py."""
  cli.use_huge_pages()
  from absl import app, flags
  config = cli.define_config_flag(None, "task config (configs/classify.py or configs/squad.py)")
  workdir = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and outputs")
  flags.mark_flags_as_required(["config", "workdir"])
  _describe(FINETUNE_HELP, config, workdir)

  def main(argv):
    del argv
    from bert_jax import finetune
    cli.run(finetune.main, cli.config_value(config), workdir.value)
  app.run(main, flags_parser=cli.parse_flags)


def tokenizer_command() -> None:
  """bert-jax-tokenizer: python -m bert_jax.tokenizer."""
  from bert_jax import tokenizer
  cli.run(tokenizer._main)


def data_command() -> None:
  """bert-jax-data: python -m bert_jax.data.pretraining."""
  from bert_jax.data import pretraining
  cli.run(pretraining._main)


def convert_command() -> None:
  """bert-jax-convert: python -m bert_jax.convert."""
  from bert_jax import convert
  cli.run(convert.main)


def squad_eval_command() -> None:
  """bert-jax-squad-eval: python -m bert_jax.squad_eval."""
  from bert_jax import squad_eval
  cli.run(squad_eval.main)


def bench_command() -> None:
  """bert-jax-bench: python -m bert_jax.bench."""
  cli.use_huge_pages()
  from bert_jax import bench
  cli.run(bench.main)
