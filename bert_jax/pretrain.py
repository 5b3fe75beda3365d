"""The pretraining loop behind train.py: setup, step, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bert_jax import checkpoint, losses, optim, sharding, train_step
from bert_jax.config import BertConfig, get_variant
from bert_jax.heads import BertForPreTraining
from bert_jax.metrics import MetricWriter

log = logging.getLogger(__name__)


class ConfigError(ValueError):
  """A configuration that cannot run; raised before anything compiles."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf."""


# ----------------------------------------------------------------------------- setup


def _input_files(config: ml_collections.ConfigDict) -> list[str]:
  from bert_jax.data import pretraining
  if not config.data.input_files:
    return [str(pretraining.default_corpus_path())]
  from bert_jax.data.text import expand_files
  try:
    return expand_files(str(config.data.input_files))
  except ValueError as e:
    raise ConfigError(f"data.input_files: {e}") from None


def _on_process_0(fn, *args, **kwargs):
  """Runs fn on process 0 only, then lets every process continue (a barrier). Every process must
  call it unconditionally: whether there is work to do is for fn to decide on process 0 (another
  process testing the file system itself could see process 0's output already and skip the
  barrier)."""
  result = fn(*args, **kwargs) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"bert_jax:{fn.__name__}")
  return result


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
  if not dst.exists():
    shutil.copy2(src, dst)


def _train_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     dst: pathlib.Path) -> None:
  from bert_jax import tokenizer
  if not dst.exists():
    log.info("training a SentencePiece tokenizer (%d pieces) into %s",
             config.data.tokenizer_vocab_size, dst)
    tokenizer.train_sentencepiece(_input_files(config), config.data.tokenizer_vocab_size,
                                  str(workdir / "tokenizer"), model_type=config.data.tokenizer_type,
                                  lowercase=config.data.tokenizer_lowercase)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """The tokenizer file inside the workdir: copied from data.tokenizer, or trained there."""
  if config.data.tokenizer:
    src = pathlib.Path(config.data.tokenizer)
    if not src.is_file():
      raise ConfigError(f"data.tokenizer: {src} does not exist")
    dst = workdir / src.name
    _on_process_0(_copy_tokenizer, src, dst)
    return dst
  dst = workdir / "tokenizer.model"
  _on_process_0(_train_tokenizer, config, workdir, dst)
  return dst


def _create_data(config: ml_collections.ConfigDict, data_dir: pathlib.Path,
                 tokenizer_path: pathlib.Path) -> None:
  from bert_jax.data import pretraining
  d = config.data
  if (data_dir / "manifest.json").exists():
    return
  log.info("creating pretraining instances in %s", data_dir)
  pretraining.create_pretraining_data(
      _input_files(config), str(tokenizer_path), str(data_dir), max_seq_length=d.max_seq_length,
      max_predictions_per_seq=d.max_predictions_per_seq, masked_lm_prob=d.masked_lm_prob,
      short_seq_prob=d.short_seq_prob, dupe_factor=d.dupe_factor, seed=d.seed,
      whole_word_mask=d.whole_word_mask, dynamic_masking=d.dynamic_masking,
      eval_fraction=d.eval_fraction)


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 tokenizer_path: pathlib.Path) -> pathlib.Path:
  """The prepared-instance directory: data.data_dir, or <workdir>/data created when missing."""
  d = config.data
  data_dir = pathlib.Path(d.data_dir) if d.data_dir else workdir / "data"
  if d.data_dir and not (data_dir / "manifest.json").exists():
    raise ConfigError(f"data.data_dir: {data_dir} has no manifest.json (create it with "
                      "python -m bert_jax.data.pretraining, or leave data_dir empty)")
  _on_process_0(_create_data, config, data_dir, tokenizer_path)
  return data_dir


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> BertConfig:
  m = config.model
  if m.vocab_size and m.vocab_size != vocab_size:
    raise ConfigError(f"model.vocab_size={m.vocab_size} but the tokenizer has {vocab_size} "
                      "pieces (set model.vocab_size=0 to take the tokenizer's)")
  return get_variant(m.variant, vocab_size=vocab_size,
                     max_position_embeddings=m.max_position_embeddings,
                     hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                     dtype=m.dtype, remat=m.remat, attention=m.attention)


def check_config(config: ml_collections.ConfigDict, bert: BertConfig, mesh, manifest: dict
                 ) -> None:
  """Refuses a configuration that cannot run, before any compilation."""
  t = config.train
  n = mesh.devices.size
  if t.batch_size % n:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {n} devices")
  if t.batch_size % t.grad_accum or (t.batch_size // t.grad_accum) % n:
    raise ConfigError(f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} must "
                      f"be a whole number divisible by the {n} devices")
  seq = int(manifest["max_seq_length"])
  if seq > bert.max_position_embeddings:
    raise ConfigError(f"max_seq_length {seq} exceeds the position table "
                      f"(model.max_position_embeddings={bert.max_position_embeddings})")
  if seq != config.data.max_seq_length:
    raise ConfigError(f"the data in {config.data.data_dir or 'the workdir'} has max_seq_length "
                      f"{seq} but data.max_seq_length={config.data.max_seq_length}")


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built before the first compile."""

  bert: BertConfig
  mesh: Any
  model: BertForPreTraining
  tx: Any
  schedule: Any
  data_dir: pathlib.Path
  manifest: dict
  tokenizer_path: pathlib.Path


def setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Setup:
  from bert_jax import tokenizer
  from bert_jax.data import pretraining
  sharding.init_distributed()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.train.num_devices or None)
  tok_path = prepare_tokenizer(config, workdir)
  tok = tokenizer.load(tok_path)
  data_dir = prepare_data(config, workdir, tok_path)
  manifest = pretraining.read_manifest(data_dir)
  fingerprint = manifest.get("tokenizer_fingerprint")
  if fingerprint and fingerprint != tok.fingerprint:
    raise ConfigError(f"{data_dir} was made with another tokenizer (fingerprint "
                      f"{fingerprint[:12]}), not {tok_path} ({tok.fingerprint[:12]})")
  bert = model_config(config, tok.vocab_size)
  check_config(config, bert, mesh, manifest)
  t = config.train
  schedule = optim.learning_rate_schedule(t.learning_rate, t.warmup_steps, t.steps, t.decay,
                                          t.end_lr_fraction)
  tx = optim.make_optimizer(t.optimizer, schedule, weight_decay=t.weight_decay, b1=t.b1,
                            b2=t.b2, eps=t.eps, max_grad_norm=t.max_grad_norm)
  return Setup(bert, mesh, BertForPreTraining(bert), tx, schedule, data_dir, manifest, tok_path)


# ----------------------------------------------------------------------------- state


def initial_state(s: Setup, config: ml_collections.ConfigDict, mngr
                  ) -> tuple[train_step.TrainState, dict | None]:
  """The newest readable checkpoint of this workdir, else phase-1 weights, else fresh."""
  seq, preds = int(s.manifest["max_seq_length"]), int(s.manifest["max_predictions_per_seq"])
  abstract = jax.eval_shape(lambda: train_step.create_state(
      s.model, s.tx, config.train.seed, seq, preds))
  rep = sharding.replicated(s.mesh)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
  restored = checkpoint.restore_latest(mngr, abstract)
  if restored is not None:
    step, state, meta = restored
    log.info("resuming from step %d in %s", step, mngr.directory)
    return state, meta
  state = train_step.jit_create_state(s.mesh, s.model, s.tx, config.train.seed, seq, preds)
  if config.train.init_from:
    from bert_jax.convert import check_params, complete_params
    init_config, params = checkpoint.load_model(config.train.init_from)
    check_params(s.bert, params)
    params = complete_params(s.bert, params)  # heads absent from an encoder-only export
    log.info("initialising from %s (%s)", config.train.init_from, init_config)
    params = sharding.put_replicated(params, s.mesh)
    state = state.replace(params=params, opt_state=jax.jit(
        s.tx.init, out_shardings=rep)(params))
  return state, None


def _meta(s: Setup, config: ml_collections.ConfigDict, loader_state: dict) -> dict[str, Any]:
  return {"model_config": s.bert.to_dict(), "loader": loader_state,
          "tokenizer": s.tokenizer_path.name, "config": config.to_dict()}


# ----------------------------------------------------------------------------- evaluation


def evaluate(s: Setup, config: ml_collections.ConfigDict, eval_fn, params) -> dict[str, float]:
  """MLM/NSP loss and accuracy over `train.eval_batches` batches of the held-out split."""
  from bert_jax.data.loader import PretrainingLoader
  loader = PretrainingLoader(s.data_dir, split="eval", global_batch_size=config.train.batch_size,
                             seed=0, process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle=False, num_epochs=1)
  total = None
  for i, batch in enumerate(loader):
    if i >= config.train.eval_batches:
      break
    sums = eval_fn(params, sharding.global_batch(batch, s.mesh))
    total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
  if total is None:
    log.warning("the eval split of %s holds less than one batch: no evaluation", s.data_dir)
    return {}
  return {k: float(v) for k, v in losses.pretraining_metrics(jax.device_get(total)).items()}


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
  """Set by SIGTERM/SIGINT (single process) or the coordination service's preemption notice."""

  def __init__(self):
    self.signum = 0
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, self._handle)

  def _handle(self, signum, _frame):
    self.signum = signum

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum != 0


def _check_finite(step: int, metrics: dict[str, float]) -> None:
  if not np.isfinite(metrics["loss"]):
    raise NonFiniteLossError(
        f"step {step}: loss is {metrics['loss']} (mlm {metrics['mlm_loss']}, nsp "
        f"{metrics['nsp_loss']}); stopping without saving: the last checkpoint is intact")


def _progress(config, start: int):
  if not (config.train.progress_bar and jax.process_index() == 0):
    return None
  from tqdm import tqdm
  return tqdm(total=config.train.steps, initial=start, unit="step", dynamic_ncols=True)


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Pretrains per `config` in `workdir`, resuming from its newest checkpoint. Returns the last
  logged train metrics plus the final evaluation."""
  from bert_jax.data.loader import PretrainingLoader
  workdir = pathlib.Path(workdir)
  s = setup(config, workdir)
  t = config.train
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR, t.keep_checkpoints)
  state, meta = initial_state(s, config, mngr)
  loader = PretrainingLoader(s.data_dir, split="train", global_batch_size=t.batch_size,
                             seed=t.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle=True)
  if meta is not None:
    loader.set_state(meta["loader"])
  step_fn = train_step.jit_pretraining_step(s.mesh, model=s.model, tx=s.tx,
                                            schedule=s.schedule, grad_accum=t.grad_accum)
  eval_fn = train_step.jit_eval_sums(s.mesh, s.model)
  writer = MetricWriter(workdir)
  stop = _StopFlag()
  step = int(state.step)
  log.info("model %s: %s; %d devices; global batch %d x %d", config.model.variant, s.bert,
           s.mesh.devices.size, t.batch_size, s.manifest["max_seq_length"])
  try:
    last = _train_loop(s, config, state, step, loader, step_fn, eval_fn, writer, mngr, stop)
  finally:
    writer.close()
  return last


def _train_loop(s, config, state, step, loader, step_fn, eval_fn, writer, mngr, stop):
  t = config.train
  tokens_per_step = t.batch_size * int(s.manifest["max_seq_length"])
  bar = _progress(config, step)
  pending = None  # (step, metrics on device): read one step late so the host never stalls
  window_start, window_steps, last = time.perf_counter(), 0, {}
  while step < t.steps:
    batch = sharding.global_batch(next(loader), s.mesh)
    state, metrics = step_fn(state, batch)
    step += 1
    window_steps += 1
    if pending is not None:
      _check_finite(*_host_metrics(pending))
    pending = (step, metrics)
    if step % t.log_every == 0 or step == t.steps:
      _, host = _host_metrics(pending)
      _check_finite(step, host)
      elapsed = time.perf_counter() - window_start
      host.update(seconds_per_step=elapsed / window_steps,
                  tokens_per_s=tokens_per_step * window_steps / elapsed)
      writer.write(step, host)
      last = host
      window_start, window_steps = time.perf_counter(), 0
      if bar is not None:
        bar.set_postfix(loss=f"{host['loss']:.3f}", tok_s=f"{host['tokens_per_s']:.0f}")
    if bar is not None:
      bar.update(1)
    if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
      last.update({f"eval_{k}": v for k, v in evaluate(s, config, eval_fn, state.params).items()})
      writer.write(step, {k[5:]: v for k, v in last.items() if k.startswith("eval_")}, "eval")
      window_start = time.perf_counter()
    stopping = stop.should_stop(step)
    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
      _check_finite(*_host_metrics(pending))
      checkpoint.save(mngr, step, state, _meta(s, config, loader.get_state()))
    if stopping:
      log.warning("stopped by a signal at step %d; checkpoint saved", step)
      raise SystemExit(128 + (stop.signum or signal.SIGTERM))
  if bar is not None:
    bar.close()
  return last


def _host_metrics(pending) -> tuple[int, dict[str, float]]:
  step, metrics = pending
  return step, {k: float(v) for k, v in jax.device_get(metrics).items()}
