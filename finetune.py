"""Fine-tunes BERT for sequence classification or SQuAD reading comprehension, from a
pretraining workdir of ours, an exported model directory or a Hugging Face BERT directory.

  python finetune.py --config=configs/classify.py --workdir=runs/cls --config.init_from=DIR ...
  python finetune.py --config=configs/squad.py --workdir=runs/squad --config.init_from=DIR ...

Installed, the same command is `bert-jax-finetune`."""

from bert_jax import commands

if __name__ == "__main__":
  commands.finetune_command()
