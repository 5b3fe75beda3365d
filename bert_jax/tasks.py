"""Fine-tuning tasks: what finetune.py needs to know about each (features, model, loss,
evaluation, output files). The loop itself lives in bert_jax.finetune.

A task gives:
  num_train_features(), train_features(), eval_features() -> dicts of numpy arrays
  objective(bert_config) -> the trainer.Objective: the model (called as (input_ids, segment_ids,
    input_mask, deterministic)) and the loss as sums over rows / counts of the global batch
  evaluate(outputs) -> (results {name: float}, files {file name: JSON object})
  predict_features() / predictions(outputs) for an optional unlabelled file
  default_metric: the result that picks the best checkpoint (the highest, or the lowest of the
    LOWER_IS_BETTER ones)
  description: what the trained head outputs (written to a fine-tuned export's task.json and
    kept in the checkpoints: a resume with other labels is refused)
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from bert_jax import losses, packing, squad_eval, trainer
from bert_jax.data import classification, squad
from bert_jax.heads import BertForQuestionAnswering, BertForSequenceClassification

log = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"mse"})  # results whose lowest value picks the best checkpoint
MODEL_INPUTS = ("input_ids", "input_mask", "segment_ids")
MODEL_ARGS = ("input_ids", "segment_ids", "input_mask")  # the order the task models take them


def example_weights(batch) -> jnp.ndarray:
  """1 per example: [B] ones for padded rows, example_mask [B, K] for packed ones."""
  if "example_mask" in batch:
    return batch["example_mask"].astype(jnp.float32)
  return jnp.ones(batch["input_ids"].shape[:1], jnp.float32)


def _objective(model, seq_len: int, sums, metrics, examples_per_row: int = 0
               ) -> trainer.Objective:
  """A fine-tuning objective: one loss sum ("loss") over the examples, divided by their count.
  `examples_per_row` > 0: packed batches (bert_jax.packing) of that many slots per row."""
  inputs = MODEL_ARGS + (packing.PACKED_INPUTS if examples_per_row else ())
  shapes = {k: (seq_len,) for k in MODEL_ARGS + ("position_ids",)}
  shapes["cls_positions"] = (examples_per_row,)
  return trainer.Objective(
      model=model, inputs=inputs, sums=sums,
      counts=lambda b: {"count": jnp.sum(example_weights(b))},
      terms=(("loss", "count"),), metrics=metrics,
      example_shapes={k: shapes[k] for k in inputs})


def classification_sums(outputs, batch, regression: bool = False) -> dict:
  """Loss sum (cross-entropy, or squared error for one regression output), correct count and
  examples; logits [B, C] and labels [B], or [B, K, C] and [B, K] for packed rows."""
  logits, labels = outputs["logits"], batch["label"]
  weights = example_weights(batch)
  count = jnp.sum(weights)
  if regression:
    return {"loss": jnp.sum(weights * (logits[..., 0] - labels) ** 2), "count": count}
  return {"loss": losses.cross_entropy_sum(logits, labels, weights)[0],
          "accuracy": losses.accuracy_sum(logits, labels, weights)[0], "count": count}


def classification_objective(bert, num_labels: int, seq_len: int, regression: bool = False,
                             examples_per_row: int = 0) -> trainer.Objective:
  """Sequence classification (batches: input_ids, input_mask, segment_ids [B, T], label [B];
  packed: also position_ids [B, T], cls_positions, example_mask and label [B, K])."""
  return _objective(BertForSequenceClassification(bert, num_labels), seq_len,
                    functools.partial(classification_sums, regression=regression), _means,
                    examples_per_row)


def _means(sums: dict) -> dict:
  """{"loss", "count", x...} sums -> means of everything but the count."""
  n = jnp.maximum(sums["count"], 1.0)
  return {k: v / n for k, v in sums.items() if k != "count"}


def _inputs(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: features[k] for k in MODEL_INPUTS}


NOT_A_CANDIDATE = -1e9  # the span logit of a token outside the window (padding, another example)


def span_sums(outputs, batch) -> dict:
  """The span loss, the mean of the start and end cross-entropies, and their accuracies, summed
  over the windows. Each softmax runs over the window's own tokens: padding, and in a packed row
  the other examples, are no candidates (BERT's and Hugging Face's softmax also spans the
  padding, whose logits are never answers; leaving it out makes the loss independent of the
  padding, so that packed and padded batches train alike). Padded: logits [B, T] and positions
  [B]; packed: logits [B, T] over the row, positions [B, K] within each example."""
  weights = example_weights(batch)
  example_ids = batch["input_mask"]
  if "cls_positions" in batch:
    k = batch["cls_positions"].shape[-1]
    own = example_ids[:, None, :] == jnp.arange(1, k + 1, dtype=example_ids.dtype)[:, None]
    offset = batch["cls_positions"]
    window = lambda x: jnp.where(own, x[:, None, :], NOT_A_CANDIDATE)  # noqa: E731  [B, K, T]
  else:
    own, offset = example_ids > 0, 0
    window = lambda x: jnp.where(own, x, NOT_A_CANDIDATE)  # noqa: E731
  sums = {"loss": 0.0}
  for side in ("start", "end"):
    logits, labels = window(outputs[f"{side}_logits"]), batch[f"{side}_positions"] + offset
    sums["loss"] += losses.cross_entropy_sum(logits, labels, weights)[0] / 2
    sums[f"{side}_accuracy"] = losses.accuracy_sum(logits, labels, weights)[0]
  return {**sums, "count": jnp.sum(weights)}


def span_objective(bert, seq_len: int, examples_per_row: int = 0) -> trainer.Objective:
  """Reading comprehension (batches: input_ids, input_mask, segment_ids [B, T], start_positions
  and end_positions [B]; packed: also position_ids [B, T], cls_positions, example_mask and the
  positions [B, K], each within its example)."""
  return _objective(BertForQuestionAnswering(bert), seq_len, span_sums, _means, examples_per_row)


class _Sets:
  """The evaluation and prediction sets of a task as the model sees them: padded rows, or with
  data.packing packed ones (bert_jax.packing), whose layouts map the outputs back per example."""

  def _setup_packing(self, d: ml_collections.ConfigDict) -> None:
    self.packing = bool(d.get("packing", False))
    self.max_examples_per_row = int(d.get("max_examples_per_row", 0))
    if self.packing:
      packing.check_examples_per_row("data.max_examples_per_row", self.max_examples_per_row,
                                     d.max_seq_length)
    self._layouts: dict[str, packing.Layout] = {}

  def _rows(self, name: str, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not self.packing:
      return _inputs(features)
    rows, self._layouts[name] = packing.pack_all(_inputs(features), self.max_examples_per_row)
    return rows


def _column(value: Any) -> int | str | None:
  """A config column: "" -> None, digits -> 0-based index, else a header name / JSON key."""
  value = str(value).strip()
  if not value:
    return None
  return int(value) if value.isdigit() else value


class ClassificationTask(_Sets):
  """Single sentences or pairs, labels from the training file or given; regression."""

  def __init__(self, config: ml_collections.ConfigDict, tok):
    d = config.data
    self.tok, self.max_seq_length, self.regression = tok, d.max_seq_length, d.regression
    self._read = functools.partial(
        classification.read_examples, text_a=_column(d.text_a), text_b=_column(d.text_b),
        fmt=d.format or None, header=None if d.header < 0 else bool(d.header),
        regression=d.regression)
    given = [x.strip() for x in d.labels.split(",")] if d.labels else None
    self.train_examples, self.labels = self._read(d.train_file, label=_column(d.label),
                                                  labels=given)
    self.num_labels = 1 if d.regression else len(self.labels)
    if not d.regression and self.num_labels < 2:
      raise classification.DataError(f"{d.train_file}: one label only ({self.labels}); "
                                     "classification needs at least two")
    self.eval_examples = (self._read(d.eval_file, label=_column(d.label), labels=self.labels)[0]
                          if d.eval_file else None)
    self.predict_examples = (self._read(d.predict_file, label=None, labels=self.labels,
                                        id_column=_column(d.get("id_column", "")))[0]
                             if d.get("predict_file") else None)
    self.default_metric = "pearson" if d.regression else "accuracy"
    self._setup_packing(d)
    log.info("classification: %d training examples, labels %s", len(self.train_examples),
             self.labels or "(regression)")

  @property
  def description(self) -> dict[str, Any]:
    """The head's outputs: logit i is the label labels[i] (regression: one score)."""
    return {"task": "classification", "regression": self.regression, "labels": self.labels}

  def _features(self, examples) -> dict[str, np.ndarray]:
    return classification.convert_examples(examples, self.tok, self.max_seq_length,
                                           self.labels, self.regression)

  @functools.cached_property
  def _train(self) -> dict[str, np.ndarray]:
    f = self._features(self.train_examples)
    return {**_inputs(f), "label": f["label"]}

  def num_train_features(self) -> int:
    return len(self.train_examples)

  def train_features(self) -> dict[str, np.ndarray]:
    return self._train

  @functools.cached_property
  def _eval(self) -> dict[str, np.ndarray]:
    return self._features(self.eval_examples)

  def _per_example(self, name: str, logits) -> np.ndarray:
    layout = self._layouts.get(name)
    return np.asarray(logits) if layout is None else layout.gather(logits)

  def eval_features(self) -> dict[str, np.ndarray]:
    return self._rows("eval", self._eval)

  def predict_features(self) -> dict[str, np.ndarray]:
    return self._rows("predict", self._features(self.predict_examples))

  def objective(self, bert, examples_per_row: int = 0) -> trainer.Objective:
    return classification_objective(bert, self.num_labels, self.max_seq_length,
                                    self.regression, examples_per_row)

  @property
  def metric_names(self) -> tuple[str, ...]:
    """What `evaluate` reports (train.metric picks one)."""
    return ("pearson", "spearman", "mse") if self.regression else ("accuracy", "f1", "mcc")

  def evaluate(self, outputs) -> tuple[dict[str, float], dict[str, Any]]:
    return classification.compute_metrics(self._per_example("eval", outputs["logits"]),
                                           self._eval["label"], self.regression,
                                           self.num_labels), {}

  def predictions(self, outputs) -> dict[str, Any]:
    logits = self._per_example("predict", outputs["logits"])
    if self.regression:
      rows = [{"id": ex.guid, "prediction": float(v)}
              for ex, v in zip(self.predict_examples, logits[:, 0], strict=True)]
    else:
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      rows = [{"id": ex.guid, "label": self.labels[int(p.argmax())],
               "probabilities": dict(zip(self.labels, map(float, p), strict=True))}
              for ex, p in zip(self.predict_examples, probs, strict=True)]
    return {"predictions.json": rows}


class SquadTask(_Sets):
  """SQuAD v1.1 / v2.0: question + passage windows, start/end logits, n-best span decoding."""

  default_metric = "f1"

  def __init__(self, config: ml_collections.ConfigDict, tok):
    d = config.data
    self.tok, self.data = tok, d
    self.train_examples = squad.read_squad(d.train_file)
    self.eval_examples = squad.read_squad(d.eval_file) if d.eval_file else None
    self.eval_json = squad.load_json(d.eval_file) if d.eval_file else None
    self.version_2 = bool(self.eval_json and squad_eval.is_v2(self.eval_json))
    unanswered = [ex.qas_id for ex in self.eval_examples or () if not ex.answers]
    if unanswered and not self.version_2:
      raise squad.DataError(
          f"{d.eval_file}: {len(unanswered)} questions without answers (e.g. {unanswered[0]!r}) "
          "in a v1.1 file, which cannot be scored; mark them is_impossible in a v2.0 file")
    self.language = self._language(d)
    self._setup_packing(d)
    counts = squad.answer_counts(self.train_examples)
    log.info("squad: %d training questions (%s)", len(self.train_examples), counts)

  def _language(self, d: ml_collections.ConfigDict) -> str:
    """The answer scoring of the evaluation set: data.language, "auto" decided by its contexts."""
    language = d.get("language", "auto")
    if language not in squad_eval.LANGUAGES:
      raise squad.ConfigError(f"data.language={language!r}: expected one of "
                              f"{', '.join(squad_eval.LANGUAGES)}")
    if self.eval_examples is None:
      return "en" if language == "auto" else language
    language = squad_eval.choose_language(language, (ex.context for ex in self.eval_examples))
    log.info("squad: %s scores answers as %s", d.eval_file,
             "CMRC 2018 does (Chinese)" if language == "zh" else "SQuAD does (English)")
    return language

  @property
  def description(self) -> dict[str, Any]:
    """The head's outputs: start and end logits per token; v2.0 scores no-answer by [CLS]."""
    return {"task": "squad", "version_2": self.version_2}

  def _convert(self, examples, is_training):
    d = self.data
    return squad.convert_examples(examples, self.tok, d.max_seq_length, d.doc_stride,
                                  d.max_query_length, is_training=is_training)

  @functools.cached_property
  def _train(self) -> dict[str, np.ndarray]:
    return self._convert(self.train_examples, True)[0]

  def num_train_features(self) -> int:
    return len(self._train["input_ids"])

  def train_features(self) -> dict[str, np.ndarray]:
    return self._train

  @functools.cached_property
  def _eval(self):
    return self._convert(self.eval_examples, False)

  def eval_features(self) -> dict[str, np.ndarray]:
    return self._rows("eval", self._eval[0])

  def _per_window(self, logits) -> np.ndarray:
    """The evaluation windows' logits [F, T] (packed rows unpacked), padding no candidate: the
    n best starts and ends of a window are its own tokens' whether packed or padded."""
    layout = self._layouts.get("eval")
    if layout is not None:
      return layout.unpack(logits, NOT_A_CANDIDATE)
    return np.where(self._eval[0]["input_mask"] > 0, logits, NOT_A_CANDIDATE)

  def objective(self, bert, examples_per_row: int = 0) -> trainer.Objective:
    return span_objective(bert, self.data.max_seq_length, examples_per_row)

  @property
  def metric_names(self) -> tuple[str, ...]:
    """What `evaluate` reports: the official script's numbers (scored here on empty answers)."""
    if self.eval_json is None:
      return ()
    empty = {ex.qas_id: "" for ex in self.eval_examples}
    scores = squad_eval.evaluate(self.eval_json, empty,
                                 dict.fromkeys(empty, 0.0) if self.version_2 else None)
    return tuple(k for k, v in scores.items() if isinstance(v, int | float))

  def evaluate(self, outputs) -> tuple[dict[str, float], dict[str, Any]]:
    d = self.data
    decoded = squad_eval.decode(self.eval_examples, self._eval[1],
                                self._per_window(outputs["start_logits"]),
                                self._per_window(outputs["end_logits"]), n_best_size=d.n_best_size,
                                max_answer_length=d.max_answer_length, version_2=self.version_2,
                                null_score_diff_threshold=d.null_score_diff_threshold)
    # v2.0: a question counts as unanswered where its null odds pass the threshold that wrote
    # predictions.json (the official script's default of 1.0 would score another answer set)
    scores = squad_eval.evaluate(self.eval_json, decoded["predictions"],
                                 decoded.get("null_odds") if self.version_2 else None,
                                 na_prob_thresh=d.null_score_diff_threshold,
                                 language=self.language)
    results = {k: float(v) for k, v in scores.items() if isinstance(v, int | float)}
    files = {"predictions.json": decoded["predictions"],
             "nbest_predictions.json": decoded["nbest_predictions"]}
    if self.version_2:
      files["null_odds.json"] = decoded["null_odds"]
    return results, files


TASKS = {"classification": ClassificationTask, "squad": SquadTask}


def make(config: ml_collections.ConfigDict, tok):
  if config.task not in TASKS:
    raise ValueError(f"task {config.task!r}: expected one of {sorted(TASKS)}")
  if not config.data.train_file:
    raise ValueError("data.train_file is required")
  return TASKS[config.task](config, tok)
