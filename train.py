"""Pretrains BERT (masked-LM + next-sentence prediction). With no flags: a tiny BERT on the
bundled corpus in ./workdir/pretrain_tiny. See configs/pretrain.py for every option."""

from absl import app, flags

from bert_jax import cli

_CONFIG = cli.define_config_flag(__file__, "configs/pretrain.py",
                                          "pretraining config file (configs/pretrain.py:VARIANT)")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain_tiny",
                               "directory for the tokenizer, data, checkpoints and metrics")


def _main(argv):
  del argv
  from bert_jax import pretrain
  cli.run(pretrain.main, cli.config_value(_CONFIG), _WORKDIR.value)


if __name__ == "__main__":
  app.run(_main, flags_parser=cli.parse_flags)
