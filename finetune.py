"""Fine-tunes BERT for sequence classification or SQuAD reading comprehension, from a
pretraining workdir of ours, an exported model directory or a Hugging Face BERT directory.

  python finetune.py --config=configs/classify.py --workdir=runs/cls --config.init_from=DIR ...
  python finetune.py --config=configs/squad.py --workdir=runs/squad --config.init_from=DIR ...
"""

from absl import app, flags

from bert_jax import cli

_CONFIG = cli.define_config_flag(__file__, None, "task config (configs/classify.py or "
                                          "configs/squad.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
  del argv
  from bert_jax import finetune
  cli.run(finetune.main, cli.config_value(_CONFIG), _WORKDIR.value)


if __name__ == "__main__":
  app.run(_main, flags_parser=cli.parse_flags)
