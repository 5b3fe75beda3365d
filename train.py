"""Pretrains BERT (masked-LM + next-sentence prediction). With no flags: a tiny BERT on the
bundled corpus in ./workdir/pretrain_tiny. See configs/pretrain.py for every option."""

from absl import app, flags
from ml_collections import config_flags

from bert_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py",
                                          "pretraining config file (configs/pretrain.py:VARIANT)")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain_tiny",
                               "directory for the tokenizer, data, checkpoints and metrics")


def _main(argv):
  del argv
  from bert_jax import pretrain
  cli.run(pretrain.main, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(_main)
