"""Pretrains BERT (masked-LM + next-sentence prediction). With no flags: a tiny BERT on the
bundled corpus in ./workdir/pretrain_tiny. See configs/pretrain.py for every option.

Installed, the same command is `bert-jax-pretrain`."""

from bert_jax import commands

if __name__ == "__main__":
  commands.pretrain_command()
