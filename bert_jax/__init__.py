"""BERT in JAX/Flax: pretraining, fine-tuning, Hugging Face weights in and out.

    config, params = bert_jax.load_hf("path/to/bert-base-uncased")
    config, params = bert_jax.load_model("runs/base")   # ours: a workdir, a step or an export
    out = bert_jax.encode(config, params, input_ids, token_type_ids, attention_mask)

Importing the package is light: jax, flax and the converter load on first use, never torch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from bert_jax.config import BertConfig

__all__ = ["encode", "load_hf", "load_model"]


def __getattr__(name: str) -> Any:
  if name == "load_hf":
    from bert_jax.convert import load_hf
    return load_hf
  if name == "load_model":  # (config, params) of our export, checkpoint step or workdir
    from bert_jax.checkpoint import load_model
    return load_model
  raise AttributeError(f"module 'bert_jax' has no attribute {name!r}")


@functools.cache
def _encoder(config: BertConfig):
  import jax

  from bert_jax.model import BertModel
  model = BertModel(config)
  return jax.jit(lambda params, ids, types, mask: model.apply(
      {"params": params}, ids, types, mask, deterministic=True))


def _check_right_padded(attention_mask: Any) -> None:
  """The fused attention takes each row's key length, not the mask: the real tokens must come
  first."""
  import numpy as np
  real = np.asarray(attention_mask) != 0
  bad = np.flatnonzero((np.diff(real.astype(np.int8), axis=-1) > 0).any(-1))
  if bad.size:
    raise ValueError(f"encode: attention_mask row {bad[0]} is not real tokens first, then "
                     "padding: attention='dot_product' takes key lengths (use "
                     "attention='einsum' for other masks)")


def encode(config: BertConfig, params: Any, input_ids: Any, token_type_ids: Any = None,
           attention_mask: Any = None) -> dict[str, Any]:
  """Runs the encoder for inference (no dropout), compiled once per config and input shape.

  params: the full tree ({"bert": ...}, as load_hf and checkpoints hold it) or the encoder tree,
  in either layout (converted on every call when it is not the one `config.scan_layers` names).
  input_ids, token_type_ids (default zeros), attention_mask (1 = real token, default ones):
  [batch, seq] ints, seq <= config.max_position_embeddings; with attention="dot_product" each
  mask row must be real tokens first, then padding (a ValueError otherwise).
  Returns {"sequence_output": [batch, seq, hidden], "pooled_output": [batch, hidden]}, float32.
  """
  shape = getattr(input_ids, "shape", None)
  if shape is None or len(shape) != 2 or shape[1] > config.max_position_embeddings:
    raise ValueError(f"encode: input_ids must be [batch, seq] with seq <= "
                     f"{config.max_position_embeddings}, got shape {shape}")
  if config.attention == "dot_product" and attention_mask is not None:
    _check_right_padded(attention_mask)
  from bert_jax.params import match_layout
  params = match_layout(params, config)
  encoder = params["bert"] if "bert" in params else params
  return _encoder(config)(encoder, input_ids, token_type_ids, attention_mask)
