"""Pretraining configs: masked-LM + next-sentence prediction.

Run the built-in default (a tiny BERT on the bundled corpus, a few minutes on a CPU):

  python train.py

Other sizes and the two phases of the BERT recipe (seq 128 for 90% of the steps, then seq 512
initialised from phase 1):

  python train.py --config=configs/pretrain.py:base --workdir=runs/base128 \
      --config.data.input_files=corpus/*.txt
  python train.py --config=configs/pretrain.py:base,phase2 --workdir=runs/base512 \
      --config.train.init_from=runs/base128 --config.data.input_files=corpus/*.txt

The argument is `VARIANT[,phase1|phase2]` with VARIANT one of tiny, mini, small, medium, base,
large. Any field can be overridden on the command line, e.g. `--config.train.batch_size=64`.
"""

import ml_collections

# Published BERT recipe (Devlin et al. 2019): 1M steps of 256 x 512 tokens, Adam 1e-4, warmup
# 10k, 90% of steps at seq 128 then 10% at 512. Per-variant defaults below are scaled-down
# starting points; `tiny` is the built-in CPU default.
_DEFAULTS = {
    #          batch  steps    lr      warmup
    "tiny": (32, 600, 1e-3, 60),
    "mini": (128, 100_000, 5e-4, 5_000),
    "small": (256, 500_000, 2e-4, 10_000),
    "medium": (256, 500_000, 2e-4, 10_000),
    "base": (256, 900_000, 1e-4, 10_000),
    "large": (256, 900_000, 1e-4, 10_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _, phase = (arg or "tiny").partition(",")
  if variant not in _DEFAULTS:
    raise ValueError(f"configs/pretrain.py: unknown variant {variant!r}; "
                     f"choose one of {sorted(_DEFAULTS)}")
  batch, steps, lr, warmup = _DEFAULTS[variant]
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.variant = variant  # size from bert_jax.config.VARIANTS
  c.model.vocab_size = 0  # 0 = take the tokenizer's vocabulary size
  c.model.max_position_embeddings = 512  # position table (phase 2 needs 512)
  c.model.hidden_dropout = 0.1  # dropout on embeddings and sub-layer outputs
  c.model.attention_dropout = 0.1  # dropout on attention probabilities
  c.model.dtype = "auto"  # matmul dtype; "auto": bfloat16 on TPU/GPU, float32 on CPU
  c.model.remat = "none"  # recompute in the backward pass: none, full, dots_saveable, ...
  c.model.scan_layers = False  # run the layers with nn.scan (compile time flat in depth)
  c.model.attention = "einsum"  # or "dot_product": fused (cuDNN on GPU), needs no attention dropout

  c.data = ml_collections.ConfigDict()
  c.data.input_files = ""  # comma-separated globs of raw text; "" = the bundled corpus
  c.data.tokenizer = ""  # .model or vocab.txt; "" = train SentencePiece into the workdir
  c.data.tokenizer_vocab_size = 8000 if variant == "tiny" else 32000  # when training one
  c.data.tokenizer_type = "bpe"  # "bpe" or "unigram", when training one
  c.data.tokenizer_lowercase = False  # when training one: True folds case (an uncased model)
  c.data.data_dir = ""  # prepared instances; "" = <workdir>/data (created when missing)
  c.data.max_seq_length = 128  # tokens per instance ([CLS] A [SEP] B [SEP] + padding)
  c.data.max_predictions_per_seq = 20  # cap on masked positions per instance
  c.data.masked_lm_prob = 0.15  # share of tokens chosen for masking
  c.data.short_seq_prob = 0.1  # share of instances with a shorter random target length
  c.data.dupe_factor = 5  # passes over the corpus with different masks
  c.data.whole_word_mask = False  # mask all pieces of a word together
  c.data.dynamic_masking = False  # mask in the loader, fresh every epoch
  c.data.eval_fraction = 0.05  # documents held out for evaluation
  c.data.seed = 12345  # seed of instance creation and masking
  c.data.packing = False  # pack several instances per row (less padding; bert_jax.packing)
  c.data.max_examples_per_row = 8  # with packing: instances per row at most

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = batch  # global batch (sequences per update, all devices)
  c.train.steps = steps  # optimizer updates
  c.train.grad_accum = 1  # micro-batches per update (batch_size must divide)
  c.train.optimizer = "adamw"  # "adamw" or "lamb"
  c.train.learning_rate = lr  # peak learning rate
  c.train.warmup_steps = warmup  # linear warmup from 0
  c.train.decay = "linear"  # "linear", "cosine" or "constant" after warmup
  c.train.end_lr_fraction = 0.0  # final learning rate as a share of the peak
  c.train.weight_decay = 0.01  # decoupled weight decay (not on LayerNorm and biases)
  c.train.b1 = 0.9  # Adam beta1
  c.train.b2 = 0.999  # Adam beta2
  c.train.eps = 1e-6  # Adam epsilon
  c.train.max_grad_norm = 1.0  # global gradient-norm clipping (0 = off)
  c.train.seed = 0  # parameter init, dropout and data-order seed
  c.train.num_devices = 0  # 0 = every device of every process
  c.train.fsdp = 1  # devices per FSDP group sharding params + optimizer state (1 = replicated)
  c.train.init_from = ""  # phase 2: a phase-1 workdir or model directory to start from

  c.train.log_every = 10  # steps between metric records
  c.train.eval_every = 200  # steps between evaluations on the held-out split (0 = only at end)
  c.train.eval_batches = 10  # batches of the eval split per evaluation (0 = all of it)
  c.train.checkpoint_every = 200  # steps between checkpoints
  c.train.keep_checkpoints = 3  # checkpoints kept (the newest)
  c.train.progress_bar = True  # tqdm progress bar on the terminal (process 0)

  if phase == "phase2":
    c.data.max_seq_length = 512
    c.data.max_predictions_per_seq = 80
    c.train.steps = max(steps // 9, 1)
    c.train.warmup_steps = max(warmup // 10, 1)
  elif phase not in ("", "phase1"):
    raise ValueError(f"configs/pretrain.py: unknown phase {phase!r}; use phase1 or phase2")
  return c
