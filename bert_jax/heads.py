"""Task heads and the models that put one encoder under them.

Every task model keeps the encoder under the parameter name `bert`, so an encoder trained by one
task restores into another by copying that subtree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.config import BertConfig
from bert_jax.model import BertModel, Decoder, Dropout, dense, gelu, layer_norm

Array = jax.Array


@jax.custom_vjp
def add_bias(x: Array, bias: Array) -> Array:
  """x [..., V] + bias [V], whose gradient sums over the leading axes as a matmul with ones:
  XLA's CPU column reduction over [batch * predictions, 30k] took 7x the matmul's time."""
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, g):
  rows = g.reshape(-1, g.shape[-1])
  return g, jnp.ones((rows.shape[0],), g.dtype) @ rows


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class MaskedLMHead(nn.Module):
  """Dense -> GELU -> LayerNorm -> tied word-embedding decoder + output bias.

  x [B, P, D] (the encoder output at the masked positions only) -> logits [B, P, vocab] float32.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, decode: Decoder) -> Array:
    cfg = self.config
    h = layer_norm(cfg, "layer_norm")(gelu(dense(cfg, cfg.hidden_size, "transform")(x)))
    bias = self.param("output_bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.params_dtype)
    return add_bias(decode(h).astype(jnp.float32), bias.astype(jnp.float32))


class NextSentenceHead(nn.Module):
  """pooled [B, D] -> logits [B, 2] float32 (0 = B follows A, 1 = B is random); packed:
  [B, K, D] -> [B, K, 2]."""

  config: BertConfig

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    return dense(self.config, 2, "dense")(pooled).astype(jnp.float32)


class ClassifierHead(nn.Module):
  """Dropout -> Dense(num_labels): pooled [B, D] -> logits [B, num_labels] float32 (packed:
  [B, K, D] -> [B, K, num_labels])."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, pooled: Array, deterministic: bool) -> Array:
    x = Dropout(self.config.hidden_dropout)(pooled, deterministic=deterministic)
    return dense(self.config, self.num_labels, "dense")(x).astype(jnp.float32)


class SpanHead(nn.Module):
  """sequence [B, T, D] -> start and end logits, each [B, T] float32."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    logits = dense(self.config, 2, "dense")(x).astype(jnp.float32)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


class BertForPreTraining(nn.Module):
  """Encoder + masked-LM head (sparse, at `masked_lm_positions`) + next-sentence head.

  Returns {"pooled_output", "mlm_logits" [B, P, V], "nsp_logits" [B, 2]} (packed rows, with
  position_ids and cls_positions [B, K]: "nsp_logits" [B, K, 2]). The encoder gives its output at
  the masked positions and the [CLS]s only (`BertModel`'s output_positions).
  """

  config: BertConfig

  def setup(self):
    self.bert = BertModel(self.config)
    self.mlm = MaskedLMHead(self.config)
    self.nsp = NextSentenceHead(self.config)

  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               masked_lm_positions: Array, position_ids: Array | None = None,
               cls_positions: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    out = self.bert(input_ids, token_type_ids, attention_mask, position_ids, cls_positions,
                    masked_lm_positions, deterministic=deterministic)
    return {"pooled_output": out["pooled_output"],
            "mlm_logits": self.mlm(out["sequence_output"], self.bert.attend),
            "nsp_logits": self.nsp(out["pooled_output"])}


class BertForSequenceClassification(nn.Module):
  """Encoder + classifier on the pooled [CLS] output. Returns {"logits": [B, num_labels]}
  ([B, K, num_labels] for packed rows, given position_ids and cls_positions [B, K])."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               position_ids: Array | None = None, cls_positions: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    none = jnp.zeros((input_ids.shape[0], 0), jnp.int32)  # the pooled [CLS]s only
    out = BertModel(self.config, name="bert")(
        input_ids, token_type_ids, attention_mask, position_ids, cls_positions, none,
        deterministic=deterministic)
    head = ClassifierHead(self.config, self.num_labels, name="classifier")
    return {"logits": head(out["pooled_output"], deterministic)}


class BertForQuestionAnswering(nn.Module):
  """Encoder + span head. Returns {"start_logits": [B, T], "end_logits": [B, T]}, per token
  of the row also for packed rows (given position_ids and cls_positions [B, K]: the examples'
  spans are told apart by the loss and the decoding, bert_jax.tasks)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               position_ids: Array | None = None, cls_positions: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    out = BertModel(self.config, name="bert")(
        input_ids, token_type_ids, attention_mask, position_ids, cls_positions,
        deterministic=deterministic)
    return SpanHead(self.config, name="span")(out["sequence_output"])
