"""The fine-tuning loop behind finetune.py: start from our checkpoints or Hugging Face weights,
train a task head (classification or SQuAD spans) with AdamW, evaluate each epoch, keep the best.

Tasks (bert_jax.tasks) supply features, the model, the loss and the evaluation; this module
owns the loop: restore, batches, the jitted step, checkpoints, logs, best model, outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bert_jax import checkpoint, optim, sharding, tokenizer
from bert_jax.config import BertConfig, get_variant
from bert_jax.metrics import MetricWriter
from bert_jax.train_step import TrainState

log = logging.getLogger(__name__)

class FinetuneError(ValueError):
  """A fine-tuning input or configuration that cannot run."""


# ----------------------------------------------------------------------------- starting point


def _is_hf_dir(path: pathlib.Path) -> bool:
  if not (path / "config.json").is_file() or (path / "params").is_dir():
    return False
  return any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def load_start(config: ml_collections.ConfigDict) -> tuple[BertConfig, Any, pathlib.Path]:
  """(model config, encoder params or None, tokenizer path) from `init_from`/`tokenizer`."""
  tok = pathlib.Path(config.tokenizer) if config.tokenizer else None
  if not config.init_from:
    if tok is None:
      raise FinetuneError("random initialisation (init_from='') needs --config.tokenizer")
    vocab = tokenizer.load(tok).vocab_size
    return get_variant(config.model_variant, vocab_size=vocab), None, tok
  path = pathlib.Path(config.init_from)
  if not path.exists():
    raise FinetuneError(f"init_from: {path} does not exist")
  if _is_hf_dir(path):
    from bert_jax.convert import load_hf
    bert, params = load_hf(path)
  else:
    bert, params = checkpoint.load_model(path)
  tok = tok or tokenizer.find_file(path)
  if tok is None:
    raise FinetuneError(f"no tokenizer in {path} (looked for "
                        f"{', '.join(tokenizer.TOKENIZER_FILES)}); pass --config.tokenizer")
  return bert, params.get("bert", params), tok


def check_vocab(bert: BertConfig, vocab_size: int, tokenizer_path: pathlib.Path) -> None:
  if bert.vocab_size != vocab_size:
    raise FinetuneError(f"the checkpoint's vocabulary has {bert.vocab_size} entries but the "
                        f"tokenizer {tokenizer_path} has {vocab_size}: they do not belong together")


# ----------------------------------------------------------------------------- step


def finetune_step(state: TrainState, batch: dict, *, model, tx, schedule, loss_fn
                  ) -> tuple[TrainState, dict]:
  """One AdamW update; `loss_fn(outputs, batch) -> (mean loss, metrics)`."""
  rng = jax.random.fold_in(state.rng, state.step)

  def compute(params):
    out = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], deterministic=False, rngs={"dropout": rng})
    return loss_fn(out, batch)

  (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def predict_fn(params, batch, *, model):
  return model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                     batch["input_mask"], deterministic=True)


# ----------------------------------------------------------------------------- batches


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch, the same on every process."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def local_rows(rows: np.ndarray) -> np.ndarray:
  """This process's share of a global batch of row indices."""
  per = len(rows) // jax.process_count()
  return rows[jax.process_index() * per:(jax.process_index() + 1) * per]


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
    batch = sharding.global_batch(take(features, local_rows(rows)), mesh)
    out = jax.device_get(fn(params, batch))
    for k, v in out.items():
      outputs.setdefault(k, []).append(np.asarray(v)[: min(batch_size, n - start)])
  return {k: np.concatenate(v) for k, v in outputs.items()}


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  task: Any
  bert: BertConfig
  tokenizer_path: pathlib.Path
  mesh: Any
  model: Any
  tx: Any
  schedule: Any
  steps: int
  steps_per_epoch: int
  encoder_params: Any = None  # pretrained encoder to start from (None = random)

  @functools.cached_property
  def predict(self):
    """The jitted forward pass for evaluation and prediction (compiled once per run)."""
    rep, data = sharding.replicated(self.mesh), sharding.batch_sharded(self.mesh)
    return jax.jit(functools.partial(predict_fn, model=self.model), in_shardings=(rep, data),
                   out_shardings=rep)


def _write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic: a failure never leaves a half-written file over a good one."""
  if jax.process_index() != 0:
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
  os.replace(tmp, path)


def setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Run:
  from bert_jax import tasks
  sharding.init_distributed()
  workdir.mkdir(parents=True, exist_ok=True)
  bert, encoder_params, tok_path = load_start(config)
  tok = tokenizer.load(tok_path)
  check_vocab(bert, tok.vocab_size, tok_path)
  drop = config.train.dropout
  bert = bert.replace(hidden_dropout=drop, attention_dropout=drop)
  task = tasks.make(config, tok)
  mesh = sharding.make_mesh(config.train.num_devices or None)
  t = config.train
  for name, size in (("batch_size", t.batch_size), ("eval_batch_size", t.eval_batch_size)):
    if size % mesh.devices.size:
      raise FinetuneError(f"train.{name}={size} is not divisible by the "
                          f"{mesh.devices.size} devices")
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
  schedule = optim.learning_rate_schedule(t.learning_rate, int(t.warmup_fraction * steps), steps)
  tx = optim.make_optimizer("adamw", schedule, weight_decay=t.weight_decay,
                            max_grad_norm=t.max_grad_norm)
  return Run(config, workdir, task, bert, tok_path, mesh, task.model(bert), tx, schedule, steps,
             steps_per_epoch, encoder_params)


def _fresh_state(run: Run) -> TrainState:
  seq = run.config.data.max_seq_length
  rep = sharding.replicated(run.mesh)

  def init():
    init_rng, rng = jax.random.split(jax.random.PRNGKey(run.config.train.seed))
    ids = jnp.zeros((1, seq), jnp.int32)
    params = run.model.init(init_rng, ids, ids, ids)["params"]
    return params, rng

  params, rng = jax.jit(init, out_shardings=rep)()
  if run.encoder_params is not None:
    from bert_jax.convert import check_params
    check_params(run.bert, {"bert": run.encoder_params})
    params = {**params, "bert": sharding.put_replicated(run.encoder_params, run.mesh)}
  opt_state = jax.jit(run.tx.init, out_shardings=rep)(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Fine-tunes per `config`; returns the best evaluation metrics (or the last train metrics)."""
  workdir = pathlib.Path(workdir)
  run = setup(config, workdir)
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR, config.train.keep_checkpoints)
  state = _fresh_state(run)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(run.mesh)),
      state)
  restored = checkpoint.restore_latest(mngr, abstract)
  meta = {"best": None}
  if restored is not None:
    _, state, meta = restored
    log.info("resuming from step %d", int(state.step))
  writer = MetricWriter(workdir)
  try:
    best, state = _loop(run, state, mngr, meta, writer)
  finally:
    writer.close()
  if getattr(run.task, "predict_examples", None):
    _predict_file(run, state)
  return best


def _predict_file(run: Run, state: TrainState) -> None:
  """Predictions for data.predict_file, with the best model (the last one without evaluation)."""
  params = state.params
  if run.config.data.eval_file and (run.workdir / "best" / "config.json").exists():
    params = sharding.put_replicated(checkpoint.load_model(run.workdir / "best")[1], run.mesh)
  outputs = predict(params, run.task.predict_features(), run.config.train.eval_batch_size,
                    run.mesh, run.predict)
  for name, obj in run.task.predictions(outputs).items():
    _write_json(run.workdir / name, obj)
    log.info("wrote %s", run.workdir / name)


def _loop(run: Run, state: TrainState, mngr, meta: dict, writer: MetricWriter) -> dict:
  t = run.config.train
  rep, data = sharding.replicated(run.mesh), sharding.batch_sharded(run.mesh)
  step_fn = jax.jit(functools.partial(finetune_step, model=run.model, tx=run.tx,
                                      schedule=run.schedule, loss_fn=run.task.loss),
                    in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))
  features = run.task.train_features()
  n = len(features["input_ids"])
  step = int(state.step)
  bar = None
  if t.progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=run.steps, initial=step, unit="step", dynamic_ncols=True)
  best, last, tic = meta.get("best"), {}, time.perf_counter()
  order_epoch, order = -1, None
  while step < run.steps:
    epoch, index = divmod(step, run.steps_per_epoch)
    if epoch != order_epoch:
      order_epoch, order = epoch, epoch_order(n, t.seed, epoch)
    rows = order[index * t.batch_size:(index + 1) * t.batch_size]
    batch = sharding.global_batch(take(features, local_rows(rows)), run.mesh)
    state, metrics = step_fn(state, batch)
    step += 1
    if step % t.log_every == 0 or step == run.steps:
      last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(last["loss"]):
        raise FinetuneError(f"step {step}: loss is {last['loss']}; the last checkpoint is intact")
      last["seconds_per_step"] = (time.perf_counter() - tic) / t.log_every
      tic = time.perf_counter()
      writer.write(step, last)
      if bar is not None:
        bar.set_postfix(loss=f"{last['loss']:.4f}")
    if bar is not None:
      bar.update(1)
    if step % run.steps_per_epoch == 0 or step == run.steps:
      best = _end_of_epoch(run, state, step, best, writer)
      checkpoint.save(mngr, step, state, {"best": best, "model_config": run.bert.to_dict()})
  if bar is not None:
    bar.close()
  return best or last, state


def _end_of_epoch(run: Run, state, step: int, best: dict | None, writer) -> dict | None:
  """Evaluates, writes outputs of a new best, exports the best model to <workdir>/best."""
  if not run.config.data.eval_file:
    checkpoint.save_model(run.workdir / "best", run.bert, state.params, run.tokenizer_path)
    return best
  outputs = predict(state.params, run.task.eval_features(), run.config.train.eval_batch_size,
                    run.mesh, run.predict)
  results, files = run.task.evaluate(outputs)
  writer.write(step, results, "eval")
  log.info("step %d eval: %s", step, json.dumps(results))
  key = run.config.train.metric or run.task.default_metric
  if key not in results:
    raise FinetuneError(f"train.metric={key!r} is not among the results {sorted(results)}")
  if best is None or results[key] > best[key]:
    best = {**results, "step": step}
    _write_json(run.workdir / "eval_results.json", best)
    for name, obj in files.items():
      _write_json(run.workdir / name, obj)
    checkpoint.save_model(run.workdir / "best", run.bert, state.params, run.tokenizer_path)
  return best
