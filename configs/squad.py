"""Reading comprehension on SQuAD v1.1 / v2.0 JSON (answer spans in the passage).

  python finetune.py --config=configs/squad.py --workdir=runs/squad \
      --config.init_from=workdir/pretrain_tiny \
      --config.data.train_file=train-v1.1.json --config.data.eval_file=dev-v1.1.json

Writes predictions.json, nbest_predictions.json and, for v2.0, null_odds.json in the official
formats, and eval_results.json with EM/F1 (v2.0: also the best no-answer threshold).
The argument `tiny` shrinks the run for smoke tests.
"""

import ml_collections

from configs import finetune_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = finetune_common.base("squad", epochs=2, learning_rate=3e-5)
  c.data.train_file = ""  # SQuAD-format training JSON
  c.data.eval_file = ""  # SQuAD-format evaluation JSON ("" = no evaluation)
  c.data.max_seq_length = 384  # tokens per window: [CLS] question [SEP] passage [SEP]
  c.data.doc_stride = 128  # passage tokens between the starts of consecutive windows
  c.data.max_query_length = 64  # question tokens kept
  c.data.n_best_size = 20  # candidate starts/ends considered per window
  c.data.max_answer_length = 30  # longest answer, in tokens
  c.data.null_score_diff_threshold = 0.0  # v2.0: predict "" when null - best > threshold
  c.data.language = "auto"  # answer scoring: en (SQuAD), zh (CMRC 2018), auto (zh if CJK contexts)
  c.train.metric = ""  # result that picks the best checkpoint ("" = f1)

  if arg == "tiny":
    finetune_common.shrink(c)
    c.data.max_seq_length = 64
    c.data.doc_stride = 32
    c.data.max_query_length = 16
  return c
