"""Reading comprehension on SQuAD v1.1 / v2.0 JSON (answer spans in the passage).

  python finetune.py --config=configs/squad.py --workdir=runs/squad \
      --config.init_from=workdir/pretrain_tiny \
      --config.data.train_file=train-v1.1.json --config.data.eval_file=dev-v1.1.json

Writes predictions.json, nbest_predictions.json and, for v2.0, null_odds.json in the official
formats, and eval_results.json with EM/F1 (v2.0: also the best no-answer threshold).
The argument `tiny` shrinks the run for smoke tests.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "squad"  # which fine-tuning task (classification or squad)
  c.init_from = ""  # our pretraining workdir / model dir, or a Hugging Face BERT dir ("" = random)
  c.model_variant = "tiny"  # size used only when init_from is "" (random initialisation)
  c.tokenizer = ""  # tokenizer file; "" = the one inside init_from

  c.data = ml_collections.ConfigDict()
  c.data.train_file = ""  # SQuAD-format training JSON
  c.data.eval_file = ""  # SQuAD-format evaluation JSON ("" = no evaluation)
  c.data.max_seq_length = 384  # tokens per window: [CLS] question [SEP] passage [SEP]
  c.data.doc_stride = 128  # passage tokens between the starts of consecutive windows
  c.data.max_query_length = 64  # question tokens kept
  c.data.n_best_size = 20  # candidate starts/ends considered per window
  c.data.max_answer_length = 30  # longest answer, in tokens
  c.data.null_score_diff_threshold = 0.0  # v2.0: predict "" when null - best > threshold

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global batch
  c.train.eval_batch_size = 64  # global batch for evaluation
  c.train.epochs = 2  # passes over the training set
  c.train.max_steps = 0  # stop after this many updates (0 = epochs decide)
  c.train.learning_rate = 3e-5  # peak learning rate (AdamW)
  c.train.warmup_fraction = 0.1  # share of updates spent warming up linearly
  c.train.weight_decay = 0.01  # not on LayerNorm and biases
  c.train.max_grad_norm = 1.0  # global gradient-norm clipping
  c.train.dropout = 0.1  # hidden and attention dropout while fine-tuning
  c.train.seed = 0  # head init, dropout and shuffling
  c.train.num_devices = 0  # 0 = all devices
  c.train.log_every = 20  # steps between metric records
  c.train.keep_checkpoints = 2  # resumable checkpoints kept
  c.train.progress_bar = True  # tqdm bar on the terminal
  c.train.metric = ""  # metric that picks the best checkpoint ("" = f1)

  if arg == "tiny":
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.epochs = 1
    c.train.max_steps = 2
    c.data.max_seq_length = 64
    c.data.doc_stride = 32
    c.data.max_query_length = 16
  return c
