"""Sequence classification (single sentences or pairs; regression with one output).

  python finetune.py --config=configs/classify.py --workdir=runs/polarity \
      --config.init_from=workdir/pretrain_tiny \
      --config.data.train_file=train.tsv --config.data.eval_file=dev.tsv

GLUE-style TSV (with or without a header), CSV or JSONL. Columns by name (with a header) or by
0-based index: for QNLI `--config.data.text_a=question --config.data.text_b=sentence`.
The argument `tiny` shrinks the run for smoke tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"  # which fine-tuning task (classification or squad)
  c.init_from = ""  # our pretraining workdir / model dir, or a Hugging Face BERT dir ("" = random)
  c.model_variant = "tiny"  # size used only when init_from is "" (random initialisation)
  c.tokenizer = ""  # tokenizer file; "" = the one inside init_from

  c.data = ml_collections.ConfigDict()
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

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global batch
  c.train.eval_batch_size = 64  # global batch for evaluation and prediction
  c.train.epochs = 3  # passes over the training set
  c.train.max_steps = 0  # stop after this many updates (0 = epochs decide)
  c.train.learning_rate = 2e-5  # peak learning rate (AdamW)
  c.train.warmup_fraction = 0.1  # share of updates spent warming up linearly
  c.train.weight_decay = 0.01  # not on LayerNorm and biases
  c.train.max_grad_norm = 1.0  # global gradient-norm clipping
  c.train.dropout = 0.1  # hidden and attention dropout while fine-tuning
  c.train.seed = 0  # head init, dropout and shuffling
  c.train.num_devices = 0  # 0 = all devices
  c.train.log_every = 20  # steps between metric records
  c.train.keep_checkpoints = 2  # resumable checkpoints kept
  c.train.progress_bar = True  # tqdm bar on the terminal
  c.train.metric = ""  # metric that picks the best checkpoint ("" = accuracy, or pearson)

  if arg == "tiny":
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.epochs = 1
    c.train.max_steps = 2
    c.data.max_seq_length = 32
  return c
