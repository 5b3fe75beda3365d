"""The console commands `pip install` puts on the PATH (pyproject.toml's [project.scripts]):
each is the same as the script or module named in its docstring."""

from __future__ import annotations

from bert_jax import cli


def pretrain_command() -> None:
  """bert-jax-pretrain: train.py."""
  cli.use_huge_pages()
  from absl import app, flags
  config = cli.define_config_flag(
      "pretrain.py", "pretraining config file (configs/pretrain.py, optionally :VARIANT)")
  workdir = flags.DEFINE_string("workdir", "workdir/pretrain_tiny",
                                "directory for the tokenizer, data, checkpoints and metrics")

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
