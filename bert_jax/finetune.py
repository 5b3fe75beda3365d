"""The fine-tuning loop behind finetune.py: start from our checkpoints or Hugging Face weights,
train a task head (classification or SQuAD spans) with AdamW, evaluate each epoch, keep the best.

Tasks (bert_jax.tasks) supply features, the objective and the evaluation; the step, the loop,
checkpoints and preemption are the trainer's (bert_jax.trainer), shared with pretraining; this
module owns the rest: the starting point, batches, the best model and the output files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from bert_jax import checkpoint, faults, files, optim, packing, sharding, tokenizer, trainer
from bert_jax.config import BertConfig, get_variant
from bert_jax.errors import ConfigError
from bert_jax.metrics import MetricWriter

log = logging.getLogger(__name__)


class FinetuneError(ConfigError):
  """A fine-tuning input or configuration that cannot run."""


# ----------------------------------------------------------------------------- starting point


def _is_hf_dir(path: epath.Path) -> bool:
  if not (path / "config.json").is_file() or (path / "params").is_dir():
    return False
  from bert_jax.convert import WEIGHT_FILES
  return any((path / n).is_file() for n in WEIGHT_FILES)


def load_start(config: ml_collections.ConfigDict) -> tuple[BertConfig, Any, epath.Path]:
  """(model config, encoder params or None, tokenizer path) from `init_from`/`tokenizer`.
  The encoder params are host numpy arrays, whatever topology wrote them."""
  tok = files.path(config.tokenizer) if config.tokenizer else None
  if not config.init_from:
    if tok is None:
      raise FinetuneError("random initialisation (init_from='') needs --config.tokenizer")
    vocab = tokenizer.load(tok).vocab_size
    return get_variant(config.model.variant, vocab_size=vocab), None, tok
  path = files.path(config.init_from)
  if not path.exists():
    raise FinetuneError(f"init_from: {path} does not exist")
  if _is_hf_dir(path):
    from bert_jax.convert import load_hf
    bert, params = load_hf(path, encoder_only=True)
  else:
    bert, params = checkpoint.load_model(path)
  tok = tok or tokenizer.find_file(path)
  if tok is None:
    raise FinetuneError(f"no tokenizer in {path} (looked for "
                        f"{', '.join(tokenizer.TOKENIZER_FILES)}); pass --config.tokenizer")
  return bert, params.get("bert", params), tok


def check_vocab(bert: BertConfig, vocab_size: int, tokenizer_path: epath.Path) -> None:
  if bert.vocab_size != vocab_size:
    raise FinetuneError(f"the checkpoint's vocabulary has {bert.vocab_size} entries but the "
                        f"tokenizer {tokenizer_path} has {vocab_size}: they do not belong together")


# ----------------------------------------------------------------------------- batches


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch, the same on every process."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def take(features: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[rows] for k, v in features.items()}


def predict(params, features: dict[str, np.ndarray], batch_size: int, mesh, fn
            ) -> dict[str, np.ndarray]:
  """Runs `fn` over all rows in fixed-size batches (the last padded by repeating row 0)."""
  n = len(next(iter(features.values())))
  outputs: dict[str, list] = {}
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    rows = np.where(rows < n, rows, 0)
    batch = sharding.global_batch(take(features, rows[sharding.local_rows(len(rows))]),
                                   mesh)
    out = jax.device_get(fn(params, batch))
    for k, v in out.items():
      outputs.setdefault(k, []).append(np.asarray(v)[: min(batch_size, n - start)])
  return {k: np.concatenate(v) for k, v in outputs.items()}


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: epath.Path
  task: Any
  bert: BertConfig
  tokenizer_path: epath.Path
  mesh: Any
  objective: trainer.Objective
  tx: Any
  schedule: Any
  steps: int
  steps_per_epoch: int
  encoder_params: Any = None  # pretrained encoder to start from (None = random)
  packer: packing.BatchPacker | None = None  # data.packing: packs each batch's examples
  param_shardings: Any = None  # set once the state exists

  @functools.cached_property
  def predict(self):
    """The jitted forward pass for evaluation and prediction (compiled once per run)."""
    return trainer.jit_on_batches(
        self.mesh, lambda params, batch: self.objective.apply(params, batch, deterministic=True),
        self.param_shardings)


def _write_json(path: epath.Path, obj: Any) -> None:
  """Process 0 only; atomic: a failure never leaves a half-written file over a good one."""
  if jax.process_index() == 0:
    files.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def model_config(config: ml_collections.ConfigDict, bert: BertConfig) -> BertConfig:
  """The starting point's architecture with this run's dropout and compute settings."""
  m, drop = config.model, config.train.dropout
  return bert.replace(hidden_dropout=drop, attention_dropout=drop, dtype=m.dtype, remat=m.remat,
                      scan_layers=m.scan_layers, attention=m.attention)


def setup(config: ml_collections.ConfigDict, workdir: epath.Path) -> Run:
  from bert_jax import tasks
  trainer.check_counts(config.train, {
      "epochs": 1, "max_steps": 0, "batch_size": 1, "eval_batch_size": 1, "grad_accum": 1,
      "log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 1})
  sharding.init_distributed()
  trainer.check_workdir_apart(config.init_from, "init_from", workdir)
  bert, encoder_params, tok_path = load_start(config)
  tok = tokenizer.load(tok_path)
  check_vocab(bert, tok.vocab_size, tok_path)
  bert = model_config(config, bert)
  task = tasks.make(config, tok)
  t = config.train
  metric = t.metric or task.default_metric
  if config.data.eval_file and metric not in task.metric_names:
    raise FinetuneError(f"train.metric={metric!r}: expected one of {sorted(task.metric_names)}")
  mesh = sharding.make_mesh(t.num_devices or None, t.fsdp)
  sharding.check_batch_size("train.batch_size", t.batch_size, mesh, t.grad_accum)
  sharding.check_batch_size("train.eval_batch_size", t.eval_batch_size, mesh)
  if config.data.max_seq_length > bert.max_position_embeddings:
    raise FinetuneError(f"data.max_seq_length={config.data.max_seq_length} exceeds the "
                        f"position table ({bert.max_position_embeddings})")
  n_train = task.num_train_features()
  steps_per_epoch = n_train // t.batch_size
  if steps_per_epoch == 0:
    raise FinetuneError(f"{config.data.train_file}: {n_train} training features, fewer than "
                        f"one batch of {t.batch_size}")
  steps = steps_per_epoch * t.epochs
  if t.max_steps:
    steps = min(steps, t.max_steps)
  if not 0 <= t.warmup_fraction <= 1:
    raise FinetuneError(f"train.warmup_fraction={t.warmup_fraction!r}: expected 0 to 1 (the "
                        "share of the updates spent warming up)")
  schedule = optim.learning_rate_schedule(t.learning_rate, int(t.warmup_fraction * steps), steps)
  tx = optim.make_optimizer("adamw", schedule, weight_decay=t.weight_decay,
                            max_grad_norm=t.max_grad_norm)
  packer = _plan_packing(task, t, mesh, steps, steps_per_epoch) if task.packing else None
  objective = task.objective(bert, packer.max_per_row if packer else 0)
  workdir.mkdir(parents=True, exist_ok=True)  # the checks above write nothing
  return Run(config, workdir, task, bert, tok_path, mesh, objective, tx, schedule, steps,
             steps_per_epoch, encoder_params, packer)


def _plan_packing(task, t: ml_collections.ConfigDict, mesh, steps: int, steps_per_epoch: int
                  ) -> packing.BatchPacker:
  """The packer of the training batches, sized for every batch of the run: `batch_size`
  examples per update as without packing, in as few rows as the fullest batch needs."""
  packer = packing.BatchPacker(task.train_features(), task.max_examples_per_row)
  n = task.num_train_features()
  batches = [epoch_order(n, t.seed, epoch)[i * t.batch_size:(i + 1) * t.batch_size]
             for epoch in range(-(-steps // steps_per_epoch))
             for i in range(min(steps_per_epoch, steps - epoch * steps_per_epoch))]
  packer.plan(batches, mesh.devices.size * t.grad_accum)
  log.info("packing: %d examples per update in %d rows of %d (up to %d per row; %.1f%% of the "
           "tokens real, %.1f%% without packing)", t.batch_size, packer.num_rows,
           packer.row_length, packer.max_per_row, 100 * packer.fill,
           100 * packer.lengths.sum() / (n * packer.row_length))
  return packer


# What a resumed run may change (trainer.check_resume): freely, the cadence, the placement, the
# compute form and what happens after training (predictions, SQuAD's answer decoding); with a
# warning, the optimisation settings, the run's length, how the best epoch is chosen and the
# paths (a run moves between machines: another path may hold the same model or data). The
# labels are checked against the checkpoint's head instead. Anything else (the batch size or
# seed, which set the examples of each step; the model, its layout; the data) is refused.
RESUME_FREE = {"train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.progress_bar", "train.num_devices", "train.fsdp", "train.grad_accum",
               "train.eval_batch_size", "model.dtype", "model.remat", "model.attention",
               "data.predict_file", "data.id_column", "data.n_best_size",
               "data.max_answer_length", "data.null_score_diff_threshold", "data.language",
               "data.labels",
               "data.regression"}
RESUME_WARNED = {"train.epochs", "train.max_steps", "train.learning_rate",
                 "train.warmup_fraction", "train.weight_decay", "train.max_grad_norm",
                 "train.dropout", "train.metric", "data.eval_file", "data.train_file",
                 "init_from", "tokenizer"}


def initial_state(run: Run, mngr) -> tuple[trainer.TrainState, dict]:
  """The newest readable checkpoint of this workdir, else fresh head(s) over the starting
  encoder; laid out on the current mesh. Returns (state, checkpoint meta)."""
  seed = run.config.train.seed
  restored = checkpoint.restore_latest(
      mngr, trainer.abstract_state(run.objective, run.tx, run.mesh, seed),
      lambda where, meta: trainer.check_resume(where, meta.get("config"), run.config,
                                               RESUME_FREE, RESUME_WARNED))
  if restored is not None:
    step, state, meta = restored
    trained = meta.get("task", {})
    now = run.task.description
    if any(trained.get(k, now[k]) != now[k] for k in now if k != "version_2"):
      raise FinetuneError(f"{mngr.directory}/{step}: the checkpoint's head was trained for "
                          f"{trained}, but this run's data gives {now}; use another workdir (or "
                          "data.labels to restore the label order)")
    log.info("resuming from step %d", step)
    return state, meta
  state = trainer.jit_create_state(run.mesh, run.objective, run.tx, seed)
  if run.encoder_params is not None:
    from bert_jax import params as param_trees
    from bert_jax.convert import check_params
    encoder = param_trees.match_layout(run.encoder_params, run.bert)
    check_params(run.bert, {"bert": encoder})
    state = trainer.with_params(state, {**state.params, "bert": encoder}, run.tx)
  return state, {"best": None}


def main(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
  """Fine-tunes per `config`; returns the best evaluation metrics (or the last train metrics)."""
  workdir = files.path(workdir)
  run = setup(config, workdir)
  t = config.train
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR, t.keep_checkpoints)
  state, meta = initial_state(run, mngr)
  shardings = trainer.shardings_of(state)
  run.param_shardings = shardings.params
  best = {"value": meta.get("best")}
  features = run.task.train_features()
  orders = _EpochOrders(len(features["input_ids"]), t.seed)

  def batch(step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(step, run.steps_per_epoch)
    examples = orders(epoch)[index * t.batch_size:(index + 1) * t.batch_size]
    if run.packer is not None:
      return take(run.packer(examples), sharding.local_rows(run.packer.num_rows))
    return take(features, examples[sharding.local_rows(t.batch_size)])

  def evaluate(st, step: int) -> dict[str, float]:
    best["value"], results = _end_of_epoch(run, st, step, best["value"])
    return results

  every = t.checkpoint_every or run.steps_per_epoch
  writer = MetricWriter(workdir, start_step=int(state.step))
  loop = trainer.Loop(
      mesh=run.mesh, step_fn=trainer.jit_train_step(
          run.mesh, shardings, objective=run.objective, tx=run.tx, schedule=run.schedule,
          grad_accum=t.grad_accum),
      batch=batch, total_steps=run.steps, log_every=t.log_every,
      should_evaluate=lambda step: step % run.steps_per_epoch == 0, evaluate=evaluate,
      should_checkpoint=lambda step: step % every == 0,
      save=lambda step, st: checkpoint.save(
          mngr, step, st, {"best": best["value"], "model_config": run.bert.to_dict(),
                           "task": run.task.description, "config": config.to_dict()}),
      set_aside=lambda step: checkpoint.set_aside_diverged(mngr, step),
      writer=writer, progress_bar=t.progress_bar,
      steps_from=(f"train.max_steps={t.max_steps}" if run.steps == t.max_steps
                  else f"train.epochs={t.epochs}: {run.steps} steps"),
      tokens_per_step=(run.packer.num_rows if run.packer else t.batch_size)
      * config.data.max_seq_length)
  try:
    state, last = trainer.fit(loop, state)
  finally:
    with writer:  # closed (its last lines uploaded) even when the manager's close raises
      mngr.close()  # waits for an asynchronous save still being written
  faults.point("finetune.after_fit")  # trained and saved; predictions not yet written
  if getattr(run.task, "predict_examples", None):
    _predict_file(run, state)
  return best["value"] or last


class _EpochOrders:
  """The shuffled order of each epoch, computed once per epoch."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed, self.epoch, self.order = n, seed, -1, None

  def __call__(self, epoch: int) -> np.ndarray:
    if epoch != self.epoch:
      self.epoch, self.order = epoch, epoch_order(self.n, self.seed, epoch)
    return self.order


def _predict_file(run: Run, state: trainer.TrainState) -> None:
  """Predictions for data.predict_file, with the best model (the last one without evaluation)."""
  params = state.params
  if run.config.data.eval_file and (run.workdir / "best" / "config.json").exists():
    from bert_jax import params as param_trees
    best = param_trees.match_layout(checkpoint.load_model(run.workdir / "best")[1], run.bert)
    params = sharding.put(best, run.param_shardings)
  outputs = predict(params, run.task.predict_features(), run.config.train.eval_batch_size,
                    run.mesh, run.predict)
  for name, obj in run.task.predictions(outputs).items():
    _write_json(run.workdir / name, obj)
    log.info("wrote %s", run.workdir / name)


def _improves(metric: str, new: float, best: float) -> bool:
  from bert_jax.tasks import LOWER_IS_BETTER
  return new < best if metric in LOWER_IS_BETTER else new > best


def _end_of_epoch(run: Run, state, step: int, best: dict | None
                  ) -> tuple[dict | None, dict[str, float]]:
  """Evaluates, writes outputs of a new best, exports the best model to <workdir>/best.
  Returns (best so far, this evaluation's results)."""
  if not run.config.data.eval_file:
    checkpoint.save_model(run.workdir / "best", run.bert, state.params, run.tokenizer_path,
                          run.task.description)
    return best, {}
  outputs = predict(state.params, run.task.eval_features(), run.config.train.eval_batch_size,
                    run.mesh, run.predict)
  results, files = run.task.evaluate(outputs)
  log.info("step %d eval: %s", step, json.dumps(results))
  key = run.config.train.metric or run.task.default_metric
  if key not in results:
    raise FinetuneError(f"train.metric={key!r} is not among the results {sorted(results)}")
  if best is None or _improves(key, results[key], best[key]):
    best = {**results, "step": step}
    _write_json(run.workdir / "eval_results.json", best)
    for name, obj in files.items():
      _write_json(run.workdir / name, obj)
    faults.point("finetune.before_best_export")  # eval_results.json written, best/ not yet
    checkpoint.save_model(run.workdir / "best", run.bert, state.params, run.tokenizer_path,
                          run.task.description)
  return best, results
