"""Pretrains BERT (masked-LM + next-sentence prediction); `python train.py --help` says how (its
text is bert_jax/commands.py's PRETRAIN_HELP). With no flags: a tiny BERT on the bundled corpus
in ./workdir/pretrain_tiny. Installed, the same command is `bert-jax-pretrain`."""

from bert_jax import commands

if __name__ == "__main__":
  commands.pretrain_command()
