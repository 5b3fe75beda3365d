"""The model configuration: one frozen dataclass and the table of published BERT sizes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp

from bert_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # compute dtype chosen by the backend the model runs on (resolve_dtype)
ATTENTIONS = ("einsum", "dot_product")

# Rematerialisation of each encoder layer in the backward pass: "none" keeps every activation,
# "full" recomputes the whole layer from its input (saves nothing), the others name
# `jax.checkpoint_policies` (saved: every matmul output / those without batch dimensions, i.e.
# not the attention scores).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder. Defaults are BERT-base (uncased vocabulary)."""

  vocab_size: int = 30522  # rows of the word-embedding table (and MLM outputs)
  hidden_size: int = 768  # model width D
  num_layers: int = 12  # encoder layers
  num_heads: int = 12  # attention heads N; head_dim H = D / N
  intermediate_size: int = 3072  # feed-forward width
  max_position_embeddings: int = 512  # rows of the learned position table
  type_vocab_size: int = 2  # segment (token-type) ids
  hidden_dropout: float = 0.1  # dropout on embeddings and sub-layer outputs
  attention_dropout: float = 0.1  # dropout on attention probabilities
  layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's value)
  initializer_range: float = 0.02  # stddev of the truncated-free normal init
  dtype: str = AUTO  # compute dtype of matmuls; "auto": bfloat16 on TPU/GPU, float32 on CPU
  param_dtype: str = "float32"  # storage dtype of parameters
  remat: str = "none"  # one of REMAT_POLICIES (old configs' False/True mean "none"/"full")
  scan_layers: bool = False  # run the layers with nn.scan: params under encoder/layers, [L, ...]
  # "einsum" (BERT's, with attention dropout) or "dot_product": jax.nn.dot_product_attention,
  # fused (cuDNN on GPU in bfloat16/float16), key lengths instead of a mask, no attention dropout.
  attention: str = "einsum"
  # The last layer computes only the positions the heads read (the masked-LM positions and the
  # [CLS]s; not SQuAD's spans): keys and values still from every position. Scanned layers too
  # (the layers before it in a scan, then the last one on its own).
  sparse_last_layer: bool = True

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if name == "dtype" and value == AUTO:
        continue
      allowed = (AUTO, *_DTYPES) if name == "dtype" else _DTYPES
      try:
        value = jnp.dtype(value).name
      except TypeError:  # not a dtype name at all ("fp16")
        value = str(value)
      if value not in _DTYPES:
        raise ValueError(f"BertConfig.{name} must be one of {allowed}, got {value!r}")
      object.__setattr__(self, name, value)
    if isinstance(self.remat, bool):  # config.json of checkpoints written before the policies
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"BertConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BertConfig.{name} must be a whole number >= 1, got {value!r}")
    for name in ("hidden_dropout", "attention_dropout"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"model.{name}={value!r}: expected a rate from 0 to below 1 "
                          "(fine-tuning sets both from train.dropout)")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
          f"num_heads {self.num_heads}")
    if self.attention not in ATTENTIONS:
      raise ConfigError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.attention == "dot_product" and self.attention_dropout > 0:
      raise ConfigError(
          f"model.attention='dot_product' has no attention dropout, but "
          f"model.attention_dropout={self.attention_dropout} (fine-tuning sets it from "
          "train.dropout): set it to 0.0, or use model.attention='einsum'")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The matmul dtype, "auto" resolved for the default backend (see resolve_dtype)."""
    return resolve_dtype(self.dtype)

  @property
  def attention_implementation(self) -> str:
    """`implementation` of jax.nn.dot_product_attention: cuDNN's fused kernel on GPU in
    bfloat16/float16 (it has no float32 kernel), XLA's otherwise."""
    if jax.default_backend() == "gpu" and self.compute_dtype != jnp.float32:
      return "cudnn"
    return "xla"

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def last_layer_runs_sparse(self) -> bool:
    """Whether the encoder's last layer runs at the heads' positions only (given positions):
    `sparse_last_layer`, except for a scanned encoder of one layer, which runs it whole."""
    return self.sparse_last_layer and (self.num_layers > 1 or not self.scan_layers)

  def replace(self, **changes: Any) -> BertConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> BertConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"BertConfig: unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> BertConfig:
    return cls.from_dict(json.loads(text))


def resolve_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """The compute dtype `name` means on `backend` (default: jax.default_backend()): "auto" is
  float32 on CPU and bfloat16 on GPU and TPU."""
  if name != AUTO:
    return jnp.dtype(name)
  backend = backend or jax.default_backend()
  return jnp.dtype(jnp.float32 if backend == "cpu" else jnp.bfloat16)


def _size(layers: int, hidden: int, heads: int) -> dict[str, int]:
  return dict(num_layers=layers, hidden_size=hidden, num_heads=heads,
              intermediate_size=4 * hidden)


# The published BERT sizes (Turc et al. 2019 for the small ones; Devlin et al. 2019).
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": _size(2, 128, 2),
    "mini": _size(4, 256, 4),
    "small": _size(4, 512, 8),
    "medium": _size(8, 512, 8),
    "base": _size(12, 768, 12),
    "large": _size(24, 1024, 16),
}


def get_variant(name: str, **overrides: Any) -> BertConfig:
  """Returns the named BERT size, e.g. `get_variant("base", vocab_size=32000)`."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model variant {name!r}; choose one of {sorted(VARIANTS)}")
  return BertConfig(**{**VARIANTS[name], **overrides})
