"""Weighted cross-entropies and accuracies: pure functions returning sums and counts, so that
callers can divide by totals over several devices or micro-batches exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def nll_and_correct(logits: Array, labels: Array) -> tuple[Array, Array]:
  """logits [..., C] float32, labels [...] int -> (-log p(label), [the label's logit is the
  largest] as float32), each [...].

  The gradient is written out, softmax - one_hot, as one elementwise pass over the logits: the
  autodiff of log_softmax + take_along_axis scattered into a zero tensor of the logits' size
  (the masked-LM logits: [batch, predictions, 30k]). `correct` has no gradient. It equals
  argmax == label except on exact ties (counted correct here); a max and a gather instead of an
  argmax, whose variadic value-and-index reduce was 15% of a BERT-tiny step on XLA's CPU."""
  return _nll_fwd(logits, labels)[0]


def _nll_fwd(logits, labels):
  # Everything relative to the largest logit: `top + log(sum)` would lose the log-sum to
  # rounding once the logits are far from 0 (probabilities summing to 0.74 at 1e7).
  top = jnp.max(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  log_sum = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  correct = (label_logit >= top).astype(jnp.float32)
  return (log_sum - (label_logit - top), correct), (logits, labels, top, log_sum)


def _nll_bwd(residuals, cotangents):
  logits, labels, top, log_sum = residuals
  g, _ = cotangents
  classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  one_hot = (classes == labels[..., None].astype(jnp.int32)).astype(logits.dtype)
  softmax = jnp.exp(logits - top[..., None] - log_sum[..., None])
  return (softmax - one_hot) * g[..., None], None


nll_and_correct.defvjp(_nll_fwd, _nll_bwd)


def cross_entropy_sum(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  """logits [..., C], labels [...] int, weights [...] -> (sum of w * -log p(label), sum of w)."""
  weights = weights.astype(jnp.float32)
  nll, _ = nll_and_correct(logits.astype(jnp.float32), labels)
  return jnp.sum(nll * weights), jnp.sum(weights)


def accuracy_sum(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  """-> (sum of w * [the label's logit is the largest], sum of w); shares the forward pass of
  `cross_entropy_sum` on the same logits (see `nll_and_correct`)."""
  weights = weights.astype(jnp.float32)
  _, correct = nll_and_correct(logits.astype(jnp.float32), labels)
  return jnp.sum(jax.lax.stop_gradient(correct) * weights), jnp.sum(weights)


def pretraining_sums(outputs: dict[str, Array], batch: dict[str, Array]) -> dict[str, Array]:
  """Loss and accuracy sums of masked-LM and next-sentence prediction for one (micro-)batch.

  outputs: mlm_logits [B, P, V], nsp_logits [B, 2]; batch: masked_lm_ids [B, P],
  masked_lm_weights [B, P], next_sentence_labels [B] (packed rows: nsp_logits [B, K, 2],
  next_sentence_labels and example_mask [B, K]). Returns sums; `*_count` are weights.
  """
  mlm_w = batch["masked_lm_weights"]
  nsp_labels = batch["next_sentence_labels"]
  nsp_w = batch.get("example_mask", jnp.ones(nsp_labels.shape, jnp.float32))
  mlm_loss, mlm_count = cross_entropy_sum(outputs["mlm_logits"], batch["masked_lm_ids"], mlm_w)
  nsp_loss, nsp_count = cross_entropy_sum(outputs["nsp_logits"], nsp_labels, nsp_w)
  mlm_correct, _ = accuracy_sum(outputs["mlm_logits"], batch["masked_lm_ids"], mlm_w)
  nsp_correct, _ = accuracy_sum(outputs["nsp_logits"], nsp_labels, nsp_w)
  return {"mlm_loss": mlm_loss, "mlm_count": mlm_count, "mlm_correct": mlm_correct,
          "nsp_loss": nsp_loss, "nsp_count": nsp_count, "nsp_correct": nsp_correct}


def pretraining_metrics(sums: dict[str, Array]) -> dict[str, Array]:
  """Means from `pretraining_sums` (summed over any number of batches)."""
  mlm_n = jnp.maximum(sums["mlm_count"], 1.0)
  nsp_n = jnp.maximum(sums["nsp_count"], 1.0)
  mlm_loss, nsp_loss = sums["mlm_loss"] / mlm_n, sums["nsp_loss"] / nsp_n
  return {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
          "mlm_accuracy": sums["mlm_correct"] / mlm_n,
          "nsp_accuracy": sums["nsp_correct"] / nsp_n}
