"""Parameter trees: the two encoder layouts, and the checks and completion shared by pretraining,
fine-tuning and conversion.

A params tree is a task model's full tree ({"bert": encoder, "mlm": ..., "nsp": ...},
{"bert": encoder, "classifier": ...}, ...) or an encoder tree {"embeddings", "encoder", "pooler"}.
Its layers are unrolled, `encoder/layer_0` ... `encoder/layer_{L-1}`, or scanned (`scan_layers`):
`encoder/layers`, every leaf with a leading [L] axis. Leaves are numpy arrays, jax arrays or
`jax.ShapeDtypeStruct`s (abstract trees); conversions keep the kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bert_jax.config import BertConfig
from bert_jax.errors import BertJaxError
from bert_jax.heads import BertForPreTraining, MaskedLMHead, NextSentenceHead
from bert_jax.model import LAYERS, Pooler

log = logging.getLogger(__name__)

Params = dict[str, Any]

# Groups of parameters a source may lack entirely: they are then initialised fresh.
OPTIONAL_GROUPS = {
    ("bert", "pooler"): "pooler (bert.pooler.*)",
    ("mlm",): "masked-LM head (cls.predictions.*)",
    ("nsp",): "next-sentence head (cls.seq_relationship.*)",
}


class ConversionError(BertJaxError, ValueError):
  """Weights or a config that do not fit the BERT model they are meant for."""


# ----------------------------------------------------------------------------- layouts


def _encoder(params: Mapping[str, Any]) -> Mapping[str, Any]:
  return params["bert"] if "bert" in params else params


def _with_layers(params: Mapping[str, Any], layers: dict[str, Any]) -> Params:
  """`params` with its encoder's layers replaced by `layers` (the rest shared, not copied)."""
  encoder = {**_encoder(params), "encoder": layers}
  return {**params, "bert": encoder} if "bert" in params else encoder


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether the (full or encoder) tree holds its layers scanned, under `encoder/layers`."""
  return LAYERS in _encoder(params).get("encoder", {})


def _stack(*leaves: Any) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
  return (np.stack if isinstance(first, np.ndarray) else jnp.stack)(leaves)


def _unstack(leaf: Any) -> list[Any]:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)] * leaf.shape[0]
  return [leaf[i] for i in range(leaf.shape[0])]


def stack_layers(params: Mapping[str, Any]) -> Params:
  """The scanned layout of `params` (unchanged if already scanned): layer_0 ... layer_{L-1}
  [...] -> layers [L, ...]."""
  if is_scanned(params):
    return dict(params)
  layers = _encoder(params)["encoder"]
  stacked = jax.tree.map(_stack, *(layers[f"layer_{i}"] for i in range(len(layers))))
  return _with_layers(params, {LAYERS: stacked})


def unstack_layers(params: Mapping[str, Any]) -> Params:
  """The unrolled layout of `params` (unchanged if already unrolled): layers [L, ...] ->
  layer_0 ... layer_{L-1} [...]."""
  if not is_scanned(params):
    return dict(params)
  stacked = _encoder(params)["encoder"][LAYERS]
  leaves, treedef = jax.tree.flatten(stacked)
  counts = {leaf.shape[0] for leaf in leaves}
  if len(counts) != 1:
    raise ConversionError(f"encoder/{LAYERS}: the leaves disagree on the layer count (leading "
                          f"axis): {sorted(counts)}")
  per_layer = zip(*map(_unstack, leaves), strict=True)
  return _with_layers(params, {f"layer_{i}": jax.tree.unflatten(treedef, layer)
                               for i, layer in enumerate(per_layer)})


def match_layout(params: Mapping[str, Any], config: BertConfig) -> Params:
  """`params` in the layout `config.scan_layers` asks for."""
  return stack_layers(params) if config.scan_layers else unstack_layers(params)


# ----------------------------------------------------------------------------- completion


def abstract_params(config: BertConfig) -> Params:
  """Shapes of the full BertForPreTraining params tree for `config`, in its layout (nothing is
  allocated)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  init = lambda: BertForPreTraining(config).init(jax.random.key(0), ids, ids, ids, ids)
  return jax.eval_shape(init)["params"]


def _fresh(config: BertConfig, group: tuple[str, ...], seed: int = 0) -> dict:
  """Freshly initialised parameters of one optional group (flat), as our model inits them."""
  key = jax.random.fold_in(jax.random.key(seed), list(OPTIONAL_GROUPS).index(group))
  D = config.hidden_size
  x = jnp.zeros((1, 1, D), jnp.float32)
  if group == ("mlm",):
    decode = lambda h: h @ jnp.zeros((D, config.vocab_size), h.dtype)
    tree = MaskedLMHead(config).init(key, x, decode)["params"]
  elif group == ("nsp",):
    tree = NextSentenceHead(config).init(key, x[:, 0])["params"]
  else:
    tree = Pooler(config).init(key, x)["params"]
  return {(*group, *path): np.asarray(v) for path, v in traverse_util.flatten_dict(tree).items()}


def complete_params(config: BertConfig, params: Mapping[str, Any], source: str = "the params",
                    groups: Sequence[tuple[str, ...]] = tuple(OPTIONAL_GROUPS)) -> Params:
  """The full BertForPreTraining tree from `params` (full, {"bert": ...} or a bare encoder, in
  either layout, which it keeps): the heads and pooler it lacks (of `groups`) are initialised
  fresh, with a warning naming them."""
  flat = traverse_util.flatten_dict(params if "bert" in params else {"bert": params})
  absent = [g for g in groups if not any(p[:len(g)] == g for p in flat)]
  if absent:
    log.warning("%s has no weights for the %s: initialised fresh", source,
                ", ".join(OPTIONAL_GROUPS[g] for g in absent))
  for g in absent:
    flat = {**flat, **_fresh(config, g)}
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- checks


def mismatch_report(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str],
                    most: int = 12) -> str:
  """'missing (2): a, b; wrong shape (1): c expected (..) found (..)', or '' when all fit."""
  parts = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
    if items:
      more = f" ... and {len(items) - most} more" if len(items) > most else ""
      parts.append(f"{title} ({len(items)}): {', '.join(items[:most])}{more}")
  return "; ".join(parts)


def _dimensions(config: BertConfig, encoder: Mapping[str, Any]) -> list[str]:
  """'vocab size: the model config says A but the weights have B' for each dimension that
  differs between `config` and an encoder params tree (either layout)."""
  flat = {p: np.shape(v) for p, v in traverse_util.flatten_dict(encoder, sep="/").items()}
  shape = lambda p: flat.get(p, ())
  if is_scanned(encoder):
    layer = lambda p: shape(f"encoder/{LAYERS}/{p}")[1:]
    count = shape(f"encoder/{LAYERS}/attention/query/kernel")[:1]
  else:
    layer = lambda p: shape(f"encoder/layer_0/{p}")
    count = (len({p.split("/")[1] for p in flat if p.startswith("encoder/layer_")}),)
  word = shape("embeddings/word_embeddings/embedding")
  query = layer("attention/query/kernel")
  found = {
      "vocab size": (config.vocab_size, word[:1]),
      "hidden size": (config.hidden_size, word[1:2]),
      "max positions": (config.max_position_embeddings,
                        shape("embeddings/position_embeddings/embedding")[:1]),
      "token types": (config.type_vocab_size,
                      shape("embeddings/token_type_embeddings/embedding")[:1]),
      "layer count": (config.num_layers, count),
      "attention heads": (config.num_heads, query[1:2] if len(query) == 3 else ()),
      "intermediate size": (config.intermediate_size, layer("ffn/intermediate/kernel")[1:2]),
  }
  return [f"{name}: the model config says {want} but the weights have {got[0]}"
          for name, (want, got) in found.items() if got and got[0] != want]


def check_params(config: BertConfig, params: Mapping[str, Any]) -> None:
  """Raises ConversionError unless `params` fits our model for `config`.

  `params` is the full BertForPreTraining tree ({"bert", "mlm", "nsp"}), the encoder under
  "bert" alone, or a bare encoder tree, in either layout (whatever `config.scan_layers` says).
  Disagreeing dimensions are named with both values; otherwise missing, unexpected and
  mis-shaped paths are listed.
  """
  tree = params if "bert" in params else {"bert": params}
  problems = _dimensions(config, tree["bert"])
  if problems:
    raise ConversionError("the weights do not fit the model config: " + "; ".join(problems))
  layout = config.replace(scan_layers=is_scanned(tree))
  expected = {k: v for k, v in abstract_params(layout).items() if k == "bert" or k in tree}
  want = {p: v.shape for p, v in traverse_util.flatten_dict(expected, sep="/").items()}
  got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(tree, sep="/").items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  shapes = [f"{p} expected {want[p]} found {got[p]}" for p in sorted(set(want) & set(got))
            if want[p] != got[p]]
  report = mismatch_report(missing, unexpected, shapes)
  if report:
    raise ConversionError(f"the weights do not fit the model config: {report}")
