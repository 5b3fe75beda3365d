"""The fields every fine-tuning config shares (imported by classify.py and squad.py)."""

import ml_collections


def base(task: str, epochs: int, learning_rate: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task  # which fine-tuning task (classification or squad)
  c.init_from = ""  # our pretraining workdir / model dir, or a Hugging Face BERT dir ("" = random)
  c.tokenizer = ""  # tokenizer file; "" = the one inside init_from

  c.model = ml_collections.ConfigDict()  # how the starting model runs (its sizes come with it)
  c.model.variant = "tiny"  # size used only when init_from is "" (random initialisation)
  c.model.dtype = "auto"  # matmul dtype; "auto": bfloat16 on TPU/GPU, float32 on CPU
  c.model.remat = "none"  # recompute in the backward pass: none, full, dots_saveable, ...
  c.model.scan_layers = False  # run the layers with nn.scan (compile time flat in depth)
  c.model.attention = "einsum"  # or "dot_product": fused (cuDNN on GPU), needs no attention dropout
  c.data = ml_collections.ConfigDict()  # filled by the task's config, besides:
  c.data.packing = False  # pack several examples per row (same examples per update, less padding)
  c.data.max_examples_per_row = 0  # cap on the examples of a packed row (0 = no cap)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global batch
  c.train.eval_batch_size = 64  # global batch for evaluation and prediction
  c.train.epochs = epochs  # passes over the training set
  c.train.max_steps = 0  # stop after this many updates (0 = epochs decide)
  c.train.learning_rate = learning_rate  # peak learning rate (AdamW)
  c.train.warmup_fraction = 0.1  # share of updates spent warming up linearly
  c.train.weight_decay = 0.01  # not on LayerNorm and biases
  c.train.max_grad_norm = 1.0  # global gradient-norm clipping
  c.train.dropout = 0.1  # hidden and attention dropout while fine-tuning
  c.train.seed = 0  # head init, dropout and shuffling
  c.train.grad_accum = 1  # micro-batches per update (batch_size must divide)
  c.train.num_devices = 0  # 0 = all devices
  c.train.fsdp = 1  # devices per FSDP group sharding params + optimizer state (1 = replicated)
  c.train.log_every = 20  # steps between metric records
  c.train.checkpoint_every = 0  # steps between checkpoints (0 = at the end of each epoch)
  c.train.keep_checkpoints = 2  # resumable checkpoints kept
  c.train.progress_bar = True  # tqdm bar on the terminal
  c.train.metric = ""  # result that picks the best checkpoint ("" = the task's own)
  return c


def shrink(c: ml_collections.ConfigDict) -> None:
  """The `tiny` argument: a 2-step smoke run."""
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.epochs = 1
  c.train.max_steps = 2
