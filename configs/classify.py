"""Sequence classification (single sentences or pairs; regression with one output).

  python finetune.py --config=configs/classify.py --workdir=runs/polarity \
      --config.init_from=workdir/pretrain_tiny \
      --config.data.train_file=train.tsv --config.data.eval_file=dev.tsv

GLUE-style TSV (with or without a header), CSV or JSONL. Columns by name (with a header) or by
0-based index: for QNLI `--config.data.text_a=question --config.data.text_b=sentence`.
The argument `tiny` shrinks the run for smoke tests.
"""

import ml_collections

from configs import finetune_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = finetune_common.base("classification", epochs=3, learning_rate=2e-5)
  c.data.train_file = ""  # training examples (.tsv, .csv or .jsonl)
  c.data.eval_file = ""  # evaluated every epoch; "" = no evaluation
  c.data.predict_file = ""  # optional: unlabelled examples to predict after training
  c.data.format = ""  # "tsv", "csv" or "jsonl"; "" = from the file extension
  c.data.header = -1  # 1 = first row is a header, 0 = no header, -1 = detect
  c.data.text_a = "0"  # column of the first sentence (name, or 0-based index)
  c.data.text_b = ""  # column of the second sentence of a pair; "" = single sentences
  c.data.label = "1"  # column of the label
  c.data.id_column = ""  # predict_file column with example ids; "" = file:line
  c.data.labels = ""  # comma-separated label set; "" = inferred from the training file
  c.data.regression = False  # float labels, one output, mean-squared error
  c.data.max_seq_length = 128  # tokens per example, [CLS] A [SEP] (B [SEP]) + padding
  # picks the best checkpoint: accuracy, f1, mcc; pearson, spearman or mse (the lowest wins) for
  # regression ("" = accuracy; pearson for regression)
  c.train.metric = ""

  if arg == "tiny":
    finetune_common.shrink(c)
    c.data.max_seq_length = 32
  return c
