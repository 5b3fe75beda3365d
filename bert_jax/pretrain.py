"""The pretraining loop behind train.py: setup, step, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from bert_jax import checkpoint, faults, files, losses, optim, packing, sharding, trainer
from bert_jax.config import BertConfig, get_variant
from bert_jax.errors import ConfigError, NonFiniteLossError  # noqa: F401 - raised from here
from bert_jax.heads import BertForPreTraining
from bert_jax.metrics import MetricWriter

log = logging.getLogger(__name__)


def pretraining_objective(bert: BertConfig, seq_len: int, num_predictions: int,
                          examples_per_row: int = 0) -> trainer.Objective:
  """Masked-LM loss (mean over the real masked positions of the global batch) + next-sentence
  loss (mean over its instances). Batches: input_ids, input_mask, segment_ids [B, T] int32;
  masked_lm_positions, masked_lm_ids [B, P] int32; masked_lm_weights [B, P] float32;
  next_sentence_labels [B] int32. `examples_per_row` > 0: packed rows (bert_jax.packing) with
  position_ids [B, T], cls_positions, example_mask and next_sentence_labels [B, K]."""
  def counts(b):
    nsp = b.get("example_mask", jnp.ones(b["next_sentence_labels"].shape, jnp.float32))
    return {"mlm_count": jnp.sum(b["masked_lm_weights"].astype(jnp.float32)),
            "nsp_count": jnp.sum(nsp.astype(jnp.float32))}
  inputs = ("input_ids", "segment_ids", "input_mask", "masked_lm_positions")
  shapes = {"input_ids": (seq_len,), "segment_ids": (seq_len,), "input_mask": (seq_len,),
            "masked_lm_positions": (num_predictions,)}
  if examples_per_row:
    inputs += packing.PACKED_INPUTS
    shapes |= {"position_ids": (seq_len,), "cls_positions": (examples_per_row,)}
  return trainer.Objective(
      model=BertForPreTraining(bert), inputs=inputs, sums=losses.pretraining_sums,
      counts=counts, terms=(("mlm_loss", "mlm_count"), ("nsp_loss", "nsp_count")),
      metrics=losses.pretraining_metrics, example_shapes=shapes)


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


def _copy_tokenizer(src: epath.Path, dst: epath.Path) -> None:
  from bert_jax import tokenizer
  if not dst.exists():
    tokenizer.copy_tokenizer(src, dst)  # with a vocab.txt's tokenizer_config.json (its casing)


def _train_tokenizer(config: ml_collections.ConfigDict, dst: epath.Path) -> None:
  from bert_jax import tokenizer
  if not dst.exists():
    log.info("training a SentencePiece tokenizer (%d pieces) into %s",
             config.data.tokenizer_vocab_size, dst)
    with files.local_output(dst) as out:
      tokenizer.train_sentencepiece(_input_files(config), config.data.tokenizer_vocab_size,
                                    str(out.with_suffix("")), model_type=config.data.tokenizer_type,
                                    lowercase=config.data.tokenizer_lowercase)
      faults.point("pretrain.tokenizer_trained")  # written, not yet moved into the workdir


def _trained_settings(path: epath.Path) -> dict[str, Any]:
  """The data.tokenizer_* values a SentencePiece model was trained with (its own spec)."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  model = pb.ModelProto.FromString(path.read_bytes())
  return {"tokenizer_vocab_size": model.trainer_spec.vocab_size,
          "tokenizer_type": pb.TrainerSpec.ModelType.Name(model.trainer_spec.model_type).lower(),
          "tokenizer_lowercase": model.normalizer_spec.name.endswith("_cf")}


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """The tokenizer file inside the workdir: copied from data.tokenizer, or trained there. One
  made earlier is kept (the workdir's data and checkpoints were made with it): other settings,
  or another file under its name, are refused rather than silently ignored."""
  from bert_jax import tokenizer
  keep = "the workdir keeps the tokenizer its data and checkpoints were made with: use another " \
         "workdir, or restore the settings"
  if config.data.tokenizer:
    src = files.path(config.data.tokenizer)
    if not src.is_file():
      raise ConfigError(f"data.tokenizer: {src} does not exist")
    dst = workdir / src.name
    if dst.exists() and tokenizer.load(src).fingerprint != tokenizer.load(dst).fingerprint:
      raise ConfigError(f"data.tokenizer: {src} is not the tokenizer {dst} was made with; {keep}")
    files.on_process_0(_copy_tokenizer, src, dst)
    return dst
  dst = workdir / "tokenizer.model"
  if dst.exists():
    made = _trained_settings(dst)
    differ = [f"data.{k}={config.data[k]!r} (made with {v!r})" for k, v in made.items()
              if config.data[k] != v]
    if differ:
      raise ConfigError(f"{dst} was made with other settings: {'; '.join(differ)}; {keep}")
  files.on_process_0(_train_tokenizer, config, dst)
  return dst


def _create_data(config: ml_collections.ConfigDict, data_dir: epath.Path,
                 tokenizer_path: epath.Path) -> None:
  from bert_jax.data import pretraining
  d = config.data
  if (data_dir / "manifest.json").exists():
    return
  log.info("creating pretraining instances in %s", data_dir)
  with files.local_output(data_dir) as out:
    pretraining.create_pretraining_data(
        _input_files(config), str(files.local(tokenizer_path)), str(out),
        max_seq_length=d.max_seq_length, max_predictions_per_seq=d.max_predictions_per_seq,
        masked_lm_prob=d.masked_lm_prob, short_seq_prob=d.short_seq_prob,
        dupe_factor=d.dupe_factor, seed=d.seed, whole_word_mask=d.whole_word_mask,
        dynamic_masking=d.dynamic_masking, eval_fraction=d.eval_fraction, pack=d.packing,
        max_examples_per_row=d.max_examples_per_row)
    faults.point("pretrain.data_created")  # written, not yet moved into the workdir


def prepare_data(config: ml_collections.ConfigDict, workdir: epath.Path,
                 tokenizer_path: epath.Path) -> epath.Path:
  """The prepared-instance directory: data.data_dir, or <workdir>/data created when missing.
  Returned local: a directory on an object store is copied to this host's cache first (the
  loader memory-maps its shards)."""
  d = config.data
  data_dir = files.path(d.data_dir) if d.data_dir else workdir / "data"
  if not d.data_dir and (data_dir / "manifest.json").exists():
    from bert_jax.data import pretraining
    check_recipe(config, data_dir, pretraining.read_manifest(data_dir))
  files.on_process_0(_create_data, config, data_dir, tokenizer_path)
  return files.local(data_dir)


def check_recipe(config: ml_collections.ConfigDict, data_dir: epath.Path, manifest: dict
                 ) -> None:
  """Refuses data that the workdir made earlier from other data.* values (a changed flag would
  otherwise be ignored silently: the run would train on the old data)."""
  d, args = config.data, manifest.get("args", {})
  made = {"input_files": args.get("input_files"), "max_seq_length": manifest["max_seq_length"],
          "max_predictions_per_seq": manifest["max_predictions_per_seq"],
          "masked_lm_prob": manifest["masked_lm_prob"],
          "whole_word_mask": manifest["whole_word_mask"],
          "dynamic_masking": manifest["dynamic_masking"],
          "short_seq_prob": args.get("short_seq_prob"), "dupe_factor": args.get("dupe_factor"),
          "seed": args.get("seed"), "eval_fraction": args.get("eval_fraction"),
          "packing": bool(manifest.get("packed"))}
  if manifest.get("packed"):
    made["max_examples_per_row"] = manifest["max_examples_per_row"]
  wanted = {k: d[k] for k in made}
  # Files by absolute path; the bundled corpus by name (its path moves with the installation).
  where = (lambda f: os.path.abspath(f)) if d.input_files else os.path.basename
  wanted["input_files"] = [where(f) for f in _input_files(config)]
  made["input_files"] = [where(f) for f in made["input_files"] or []] or None
  differ = [f"data.{k}={wanted[k]!r} (made with {v!r})" for k, v in made.items()
            if v is not None and wanted[k] != v]
  if differ:
    raise ConfigError(f"{data_dir} was made from other data settings: {'; '.join(differ)}. "
                      f"Remove {data_dir} to make it again, or restore the settings")


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """What must hold before any data is written (a bad value would otherwise be baked into the
  workdir's data and fail every corrected rerun)."""
  d, m = config.data, config.model
  if d.data_dir and not (files.path(d.data_dir) / "manifest.json").exists():
    raise ConfigError(f"data.data_dir: {d.data_dir} has no manifest.json (create it with "
                      "python -m bert_jax.data.pretraining, or leave data_dir empty)")
  if not d.tokenizer and d.tokenizer_type not in ("bpe", "unigram"):
    raise ConfigError(f"data.tokenizer_type={d.tokenizer_type!r}: expected 'bpe' or 'unigram' "
                      "(a WordPiece vocab.txt is given as data.tokenizer)")
  if d.max_seq_length > m.max_position_embeddings:
    raise ConfigError(f"data.max_seq_length={d.max_seq_length} exceeds the position table "
                      f"(model.max_position_embeddings={m.max_position_embeddings})")
  if d.max_seq_length < 5:
    raise ConfigError(f"data.max_seq_length={d.max_seq_length}: expected >= 5 ([CLS] A [SEP] B "
                      "[SEP])")
  if d.packing:
    from bert_jax.data import pretraining
    pretraining.check_examples_per_row("data.max_examples_per_row", d.max_examples_per_row,
                                       d.max_seq_length)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> BertConfig:
  m = config.model
  if m.vocab_size and m.vocab_size != vocab_size:
    raise ConfigError(f"model.vocab_size={m.vocab_size} but the tokenizer has {vocab_size} "
                      "pieces (set model.vocab_size=0 to take the tokenizer's)")
  return get_variant(m.variant, vocab_size=vocab_size,
                     max_position_embeddings=m.max_position_embeddings,
                     hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                     dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
                     attention=m.attention)


def check_config(config: ml_collections.ConfigDict, bert: BertConfig, manifest: dict) -> None:
  """Refuses a configuration that cannot run, before any compilation."""
  seq = int(manifest["max_seq_length"])
  if seq > bert.max_position_embeddings:
    raise ConfigError(f"max_seq_length {seq} exceeds the position table "
                      f"(model.max_position_embeddings={bert.max_position_embeddings})")
  if seq != config.data.max_seq_length:
    raise ConfigError(f"the data in {config.data.data_dir or 'the workdir'} has max_seq_length "
                      f"{seq} but data.max_seq_length={config.data.max_seq_length}")
  if bool(manifest.get("packed")) != bool(config.data.packing):
    raise ConfigError(f"the data in {config.data.data_dir or 'the workdir'} is "
                      f"{'' if manifest.get('packed') else 'not '}packed but data.packing="
                      f"{config.data.packing}")


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built before the first compile."""

  bert: BertConfig
  mesh: Any
  objective: trainer.Objective
  tx: Any
  schedule: Any
  data_dir: epath.Path
  manifest: dict
  tokenizer_path: epath.Path
  evaluates: bool = True  # the data has an eval split (checked against its manifest)


def setup(config: ml_collections.ConfigDict, workdir: epath.Path) -> Setup:
  from bert_jax import tokenizer
  from bert_jax.data import pretraining
  trainer.check_counts(config.train, {
      "steps": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "checkpoint_every": 1,
      "keep_checkpoints": 1, "eval_every": 0, "eval_batches": 0, "warmup_steps": 0})
  sharding.init_distributed()
  trainer.check_workdir_apart(config.train.init_from, "train.init_from", workdir)
  mesh = sharding.make_mesh(config.train.num_devices or None, config.train.fsdp)
  sharding.check_batch_size("train.batch_size", config.train.batch_size, mesh,
                            config.train.grad_accum)
  check_data_config(config)
  workdir.mkdir(parents=True, exist_ok=True)  # the checks above write nothing
  tok_path = prepare_tokenizer(config, workdir)
  tok = tokenizer.load(tok_path)
  data_dir = prepare_data(config, workdir, tok_path)
  manifest = pretraining.read_manifest(data_dir)
  evaluates = _check_eval_split(data_dir, manifest)
  fingerprint = manifest.get("tokenizer_fingerprint")
  if fingerprint and fingerprint != tok.fingerprint:
    raise ConfigError(f"{data_dir} was made with another tokenizer (fingerprint "
                      f"{fingerprint[:12]}), not {tok_path} ({tok.fingerprint[:12]})")
  bert = model_config(config, tok.vocab_size)
  check_config(config, bert, manifest)
  t = config.train
  schedule = optim.learning_rate_schedule(t.learning_rate, t.warmup_steps, t.steps, t.decay,
                                          t.end_lr_fraction)
  tx = optim.make_optimizer(t.optimizer, schedule, weight_decay=t.weight_decay, b1=t.b1,
                            b2=t.b2, eps=t.eps, max_grad_norm=t.max_grad_norm)
  objective = pretraining_objective(
      bert, int(manifest["max_seq_length"]), int(manifest["max_predictions_per_seq"]),
      int(manifest["max_examples_per_row"]) if manifest.get("packed") else 0)
  return Setup(bert, mesh, objective, tx, schedule, data_dir, manifest, tok_path, evaluates)


def _check_eval_split(data_dir: epath.Path, manifest: dict) -> bool:
  """Whether the data can be evaluated on, its shards opened and checked now: a missing or
  damaged split must not fail the run at its first evaluation, before that step's save."""
  from bert_jax.data.loader import Instances
  if manifest["splits"].get("eval") is None:
    log.warning("%s has no eval split (data.eval_fraction=0, or a corpus of one document: "
                "documents are separated by blank lines): training without evaluation", data_dir)
    return False
  Instances(data_dir, "eval")
  return True


# ----------------------------------------------------------------------------- state


# What a resumed run may change (trainer.check_resume): freely, the cadence, the placement and
# the compute form (the loader itself warns about another batch size or seed and continues in
# its order); with a warning, the optimisation settings and the paths (a workdir moves between
# machines and buckets). The other data.* fields are not compared here: the data a run reads is
# checked against its own manifest (check_recipe, check_config) and the tokenizer by its contents
# (prepare_tokenizer), and with data.data_dir the data.* recipe fields are not used at all.
# Anything else is refused.
RESUME_FREE = {"train.log_every", "train.eval_every", "train.eval_batches",
               "train.checkpoint_every", "train.keep_checkpoints", "train.progress_bar",
               "train.num_devices", "train.fsdp", "train.grad_accum", "train.batch_size",
               "train.seed", "model.dtype", "model.remat", "model.attention"}
RESUME_WARNED = {"train.steps", "train.learning_rate", "train.warmup_steps", "train.decay",
                 "train.end_lr_fraction", "train.weight_decay", "train.b1", "train.b2",
                 "train.eps", "train.max_grad_norm", "model.hidden_dropout",
                 "model.attention_dropout", "train.init_from", "data.data_dir",
                 "data.tokenizer", "data.input_files"}


def initial_state(s: Setup, config: ml_collections.ConfigDict, mngr
                  ) -> tuple[trainer.TrainState, dict | None]:
  """The newest readable checkpoint of this workdir, else phase-1 weights, else fresh; laid out
  on the current mesh."""
  abstract = trainer.abstract_state(s.objective, s.tx, s.mesh, config.train.seed)
  data_fields = {f"data.{k}" for k in config.data} - RESUME_WARNED
  restored = checkpoint.restore_latest(
      mngr, abstract, lambda where, meta: trainer.check_resume(
          where, meta.get("config"), config, RESUME_FREE | data_fields, RESUME_WARNED))
  if restored is not None:
    step, state, meta = restored
    log.info("resuming from step %d in %s", step, mngr.directory)
    return state, meta
  state = trainer.jit_create_state(s.mesh, s.objective, s.tx, config.train.seed)
  if config.train.init_from:
    from bert_jax import params as param_trees
    from bert_jax.convert import check_params, complete_params
    init_config, params = checkpoint.load_model(config.train.init_from)
    params = param_trees.match_layout(params, s.bert)
    check_params(s.bert, params)
    params = complete_params(s.bert, params)  # heads absent from an encoder-only export
    log.info("initialising from %s (%s)", config.train.init_from, init_config)
    state = trainer.with_params(state, params, s.tx)
  return state, None


def _meta(s: Setup, config: ml_collections.ConfigDict, loader_state: dict) -> dict[str, Any]:
  return {"model_config": s.bert.to_dict(), "loader": loader_state,
          "tokenizer": s.tokenizer_path.name, "config": config.to_dict()}


# ----------------------------------------------------------------------------- evaluation


def evaluate(s: Setup, config: ml_collections.ConfigDict, eval_fn, params) -> dict[str, float]:
  """MLM/NSP loss and accuracy over the held-out split's first `train.eval_batches` batches (0:
  all), in file order; the last batch of the split is padded with rows that count for nothing,
  so every instance is evaluated once, on any number of devices."""
  from bert_jax.data.loader import PretrainingLoader
  if not s.evaluates:
    return {}
  loader = PretrainingLoader(s.data_dir, split="eval", global_batch_size=config.train.batch_size,
                             seed=0, process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle=False, num_epochs=1,
                             pad_remainder=True)
  total = None
  for i, batch in enumerate(loader):
    if 0 < config.train.eval_batches <= i:
      break
    sums = eval_fn(params, sharding.global_batch(batch, s.mesh))
    total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
  return {k: float(v) for k, v in losses.pretraining_metrics(jax.device_get(total)).items()}


# ----------------------------------------------------------------------------- the loop


def main(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
  """Pretrains per `config` in `workdir`, resuming from its newest checkpoint. Returns the last
  logged train metrics plus the final evaluation."""
  from bert_jax.data.loader import PretrainingLoader
  workdir = files.path(workdir)
  s = setup(config, workdir)
  t = config.train
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR, t.keep_checkpoints)
  state, meta = initial_state(s, config, mngr)
  loader = PretrainingLoader(s.data_dir, split="train", global_batch_size=t.batch_size,
                             seed=t.seed, process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle=True)
  if meta is not None:
    loader.set_state(meta["loader"])
  state_shardings = trainer.shardings_of(state)
  step_fn = trainer.jit_train_step(s.mesh, state_shardings, objective=s.objective, tx=s.tx,
                                   schedule=s.schedule, grad_accum=t.grad_accum)
  eval_fn = trainer.jit_on_batches(
      s.mesh, lambda params, batch: s.objective.batch_sums(params, batch, deterministic=True),
      state_shardings.params)
  writer = MetricWriter(workdir, start_step=int(state.step))
  log.info("model %s: %s; mesh %s; global batch %d x %d", config.model.variant, s.bert,
           dict(s.mesh.shape), t.batch_size, s.manifest["max_seq_length"])
  loop = trainer.Loop(
      mesh=s.mesh, step_fn=step_fn, batch=lambda _: next(loader), total_steps=t.steps,
      log_every=t.log_every,
      should_evaluate=lambda step: bool(t.eval_every) and step % t.eval_every == 0,
      evaluate=lambda st, _: evaluate(s, config, eval_fn, st.params),
      should_checkpoint=lambda step: step % t.checkpoint_every == 0,
      save=lambda step, st: checkpoint.save(mngr, step, st, _meta(s, config, loader.get_state())),
      set_aside=lambda step: checkpoint.set_aside_diverged(mngr, step),
      writer=writer, progress_bar=t.progress_bar,
      tokens_per_step=t.batch_size * int(s.manifest["max_seq_length"]))
  try:
    _, last = trainer.fit(loop, state)
    faults.point("pretrain.after_fit")  # the final checkpoint may still be being written
  finally:
    with writer:  # closed (its last lines uploaded) even when the manager's close raises
      mngr.close()  # waits for an asynchronous save still being written
  return last
