"""Fine-tunes BERT for sequence classification or SQuAD reading comprehension;
`python finetune.py --help` says how (its text is bert_jax/commands.py's FINETUNE_HELP).
Installed, the same command is `bert-jax-finetune`."""

from bert_jax import commands

if __name__ == "__main__":
  commands.finetune_command()
