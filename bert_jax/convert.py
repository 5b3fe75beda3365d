"""Hugging Face BERT checkpoints in and out.

  python -m bert_jax.convert from-hf HF_DIR OUT_DIR   # HF BERT -> bert_jax model export
  python -m bert_jax.convert to-hf CKPT_DIR OUT_DIR   # bert_jax model -> HF BertForPreTraining

A Hugging Face directory holds config.json and model.safetensors (or pytorch_model.bin, read with
torch). Its tensors are named as in `transformers.BertForPreTraining` (`bert.encoder.layer.0...`,
`cls.predictions...`, `cls.seq_relationship...`); a bare `BertModel` save drops the `bert.` prefix
and the heads, and old checkpoints call the LayerNorm parameters `gamma`/`beta`. torch Linear
weights are [out, in]; our kernels are [in, out], with the attention projections split by head:
query/key/value [D, N, H], output [N, H, D].
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from bert_jax import cli, files
from bert_jax.config import BertConfig
from bert_jax.files import replacing_dir
from bert_jax.params import (
  OPTIONAL_GROUPS,
  ConversionError,
  abstract_params,
  check_params,
  complete_params,
  match_layout,
  mismatch_report,
  unstack_layers,
)

log = logging.getLogger(__name__)

Params = dict[str, Any]


# Hugging Face config.json field -> BertConfig field.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}

# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> BertConfig:
  """The BertConfig of a Hugging Face BERT config.json; refuses what our model cannot run."""
  refusals = {"model_type": ("bert",), "hidden_act": ("gelu",),
              "position_embedding_type": ("absolute",)}
  for field, allowed in refusals.items():
    if field in hf and hf[field] not in allowed:
      raise ConversionError(f"{source}: {field} is {hf[field]!r} but bert_jax implements only "
                            f"{' / '.join(map(repr, allowed))} (exact erf GELU, learned absolute "
                            "positions)")
  for field in ("is_decoder", "add_cross_attention"):
    if hf.get(field):
      raise ConversionError(f"{source}: {field} is true but bert_jax implements only the "
                            "bidirectional encoder (no causal attention, no cross-attention)")
  try:
    return BertConfig(**{ours: hf[name] for name, ours in _CONFIG_FIELDS.items() if name in hf})
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{source}: {e}") from None


def config_to_hf(config: BertConfig) -> dict[str, Any]:
  """A config.json that `transformers.BertForPreTraining.from_pretrained` reads."""
  return {"architectures": ["BertForPreTraining"], "model_type": "bert",
          **{name: getattr(config, ours) for name, ours in _CONFIG_FIELDS.items()},
          "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0,
          "tie_word_embeddings": True, "dtype": "float32"}


# ----------------------------------------------------------------------------- the name table


@dataclasses.dataclass(frozen=True)
class _Kind:
  """How a torch tensor becomes our parameter (`to_ours`) and back (`to_hf`)."""

  to_ours: Callable[[Any, BertConfig], Any]
  to_hf: Callable[[Any, BertConfig], Any]


_COPY = _Kind(lambda x, c: x, lambda x, c: x)
_LINEAR = _Kind(lambda x, c: x.T, lambda x, c: x.T)  # [out, in] <-> [in, out]
_HEADS_IN = _Kind(  # [N*H, D] <-> [D, N, H]
    lambda x, c: x.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
    lambda x, c: x.reshape(c.hidden_size, -1).T)
_HEADS_IN_BIAS = _Kind(lambda x, c: x.reshape(c.num_heads, c.head_dim),
                       lambda x, c: x.reshape(-1))
_HEADS_OUT = _Kind(  # [D, N*H] <-> [N, H, D]
    lambda x, c: x.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    lambda x, c: x.reshape(-1, c.hidden_size).T)


@dataclasses.dataclass(frozen=True)
class _Row:
  hf: str  # the tensor's name in a BertForPreTraining state dict
  path: tuple[str, ...]  # its place in our BertForPreTraining params tree
  kind: _Kind


def _linear(hf: str, path: tuple[str, ...], w: _Kind = _LINEAR, b: _Kind = _COPY) -> list[_Row]:
  return [_Row(f"{hf}.weight", (*path, "kernel"), w), _Row(f"{hf}.bias", (*path, "bias"), b)]


def _norm(hf: str, path: tuple[str, ...]) -> list[_Row]:
  return [_Row(f"{hf}.weight", (*path, "scale"), _COPY), _Row(f"{hf}.bias", (*path, "bias"), _COPY)]


def _table(config: BertConfig) -> list[_Row]:
  """Every parameter of BertForPreTraining: HF name, our path, conversion."""
  rows = [_Row(f"bert.embeddings.{n}.weight", ("bert", "embeddings", n, "embedding"), _COPY)
          for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  rows += _norm("bert.embeddings.LayerNorm", ("bert", "embeddings", "layer_norm"))
  for i in range(config.num_layers):
    hf, ours = f"bert.encoder.layer.{i}", ("bert", "encoder", f"layer_{i}")
    for n in ("query", "key", "value"):
      rows += _linear(f"{hf}.attention.self.{n}", (*ours, "attention", n), _HEADS_IN,
                      _HEADS_IN_BIAS)
    rows += _linear(f"{hf}.attention.output.dense", (*ours, "attention", "output"), _HEADS_OUT)
    rows += _norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_layer_norm"))
    rows += _linear(f"{hf}.intermediate.dense", (*ours, "ffn", "intermediate"))
    rows += _linear(f"{hf}.output.dense", (*ours, "ffn", "output"))
    rows += _norm(f"{hf}.output.LayerNorm", (*ours, "ffn_layer_norm"))
  rows += _linear("bert.pooler.dense", ("bert", "pooler", "dense"))
  rows += _linear("cls.predictions.transform.dense", ("mlm", "transform"))
  rows += _norm("cls.predictions.transform.LayerNorm", ("mlm", "layer_norm"))
  rows.append(_Row("cls.predictions.bias", ("mlm", "output_bias"), _COPY))
  rows += _linear("cls.seq_relationship", ("nsp", "dense"))
  return rows


def _group(path: tuple[str, ...]) -> tuple[str, ...] | None:
  """The optional group a parameter belongs to; None for the (required) encoder."""
  return next((g for g in OPTIONAL_GROUPS if path[:len(g)] == g), None)


@functools.cache
def _hf_shape(kind: _Kind, shape: tuple[int, ...], config: BertConfig) -> tuple[int, ...]:
  return jax.eval_shape(lambda x: kind.to_hf(x, config),
                        jax.ShapeDtypeStruct(shape, jnp.float32)).shape


# ----------------------------------------------------------------------------- reading HF


def _is_buffer(name: str) -> bool:
  return name.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))


def _read_safetensors(files: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  tensors = {}
  for file in files:
    try:
      with safe_open(file, framework="flax") as f:  # "flax" also reads bfloat16
        tensors.update({k: np.asarray(f.get_tensor(k), np.float32)
                        for k in f.keys() if not _is_buffer(k)})
    except (SafetensorError, OSError) as e:
      raise ConversionError(f"{file}: not a readable safetensors file ({e}); was it cut short "
                            "by an interrupted download?") from None
  return tensors


def _read_torch(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{file}: reading pytorch_model.bin needs torch, which is not "
                          "installed (pip install torch, or save the model as safetensors)"
                          ) from None
  try:
    state = torch.load(file, map_location="cpu", weights_only=True)
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise ConversionError(f"{file}: not a readable PyTorch state dict ({e})") from None
  if not isinstance(state, dict):
    raise ConversionError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
  return {k: v.float().numpy() for k, v in state.items() if not _is_buffer(k)}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / s for s in sorted(set(weight_map.values()))]
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f"{index}: not a weight index (expected JSON with a \"weight_map\" of "
                          f"tensor names to shard files; {type(e).__name__}: {e})") from None


def _read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of the first of WEIGHT_FILES that `path` holds (an index: all its shards)."""
  name = next((n for n in WEIGHT_FILES if (path / n).is_file()), None)
  if name is None:
    raise ConversionError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
  files_ = _shards(path / name) if name.endswith(".index.json") else [path / name]
  if name.startswith("model.safetensors"):
    return _read_safetensors(files_)
  return {k: v for f in files_ for k, v in _read_torch(f).items()}


def _canonical_name(name: str) -> str:
  """The BertForPreTraining name of a tensor saved under any accepted layout."""
  if name.endswith("LayerNorm.gamma"):
    name = name[:-len("gamma")] + "weight"
  elif name.endswith("LayerNorm.beta"):
    name = name[:-len("beta")] + "bias"
  if name.startswith(("embeddings.", "encoder.", "pooler.")):
    name = "bert." + name
  return name


# Heads of Hugging Face's task models (sequence/token classification, multiple choice; SQuAD):
# our fine-tuning starts its task head fresh.
_TASK_HEADS = ("classifier.", "qa_outputs.")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and np.array_equal(a, b)


def _untie(tensors: dict[str, np.ndarray], source: str) -> None:
  """Folds the decoder's copies into our masked-LM head: our decoder is the word embedding plus
  one bias. The bias kept is the decoder's, which Hugging Face's forward adds; a decoder weight
  that is not the word embedding (tie_word_embeddings false) has no place in our model."""
  weight = tensors.pop("cls.predictions.decoder.weight", None)
  if weight is not None:  # a save that kept only the decoder's copy: it is the embedding
    embedding = tensors.setdefault("bert.embeddings.word_embeddings.weight", weight)
    if not _same(weight, embedding):
      raise ConversionError(
          f"{source}: cls.predictions.decoder.weight is not the word embedding matrix (an "
          "untied masked-LM decoder); bert_jax ties the two, so this masked-LM head cannot be "
          "converted. Fine-tuning from this directory works: it uses the encoder alone")
  bias = tensors.pop("cls.predictions.decoder.bias", None)
  if bias is not None:
    tensors["cls.predictions.bias"] = bias


def _canonical_tensors(raw: Mapping[str, np.ndarray], source: str, encoder_only: bool
                       ) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for name, value in raw.items():
    canonical = _canonical_name(name)
    if canonical in tensors:
      raise ConversionError(f"{source}: holds {canonical} twice (under two names)")
    tensors[canonical] = value
  if encoder_only:
    return {k: v for k, v in tensors.items() if k.startswith("bert.")}
  task = sorted(k for k in tensors if k.startswith(_TASK_HEADS))
  if task:
    log.warning("%s: not converting the task head %s (bert_jax's fine-tuning starts its head "
                "fresh)", source, ", ".join(task))
    tensors = {k: v for k, v in tensors.items() if k not in task}
  _untie(tensors, source)
  return tensors


def params_from_hf(config: BertConfig, raw: Mapping[str, np.ndarray], source: str,
                   encoder_only: bool = False) -> Params:
  """Our BertForPreTraining tree, in the layout of `config`, from a Hugging Face state dict
  (numpy arrays); with `encoder_only`, {"bert": the encoder}, the heads' tensors ignored."""
  tensors = _canonical_tensors(raw, source, encoder_only)
  abstract = traverse_util.flatten_dict(abstract_params(config.replace(scan_layers=False)))
  rows = [r for r in _table(config) if not encoder_only or r.path[0] == "bert"]
  present = {g for g in OPTIONAL_GROUPS for r in rows if _group(r.path) == g and r.hf in tensors}
  flat, missing, shapes = {}, [], []
  for row in rows:
    group = _group(row.path)
    if row.hf not in tensors:
      if group is None or group in present:
        missing.append(row.hf)
      continue
    want = _hf_shape(row.kind, abstract[row.path].shape, config)
    if tensors[row.hf].shape != want:
      shapes.append(f"{row.hf} expected {want} found {tensors[row.hf].shape}")
      continue
    flat[row.path] = np.asarray(row.kind.to_ours(tensors[row.hf], config), np.float32)
  unexpected = sorted(set(tensors) - {r.hf for r in rows})
  report = mismatch_report(missing, unexpected, shapes)
  if report:
    raise ConversionError(f"{source}: the weights do not match its config.json: {report}")
  groups = [g for g in OPTIONAL_GROUPS if not encoder_only or g[0] == "bert"]
  params = complete_params(config, traverse_util.unflatten_dict(flat), source, groups)
  return match_layout(params, config)


def _hf_dir(path: files.PathLike) -> epath.Path:
  path = files.path(path)
  if not (path / "config.json").is_file():
    raise ConversionError(f"{path}: not a Hugging Face model directory (no config.json)")
  return path


def load_hf(path: str | pathlib.Path, encoder_only: bool = False
            ) -> tuple[BertConfig, Params]:
  """(config, params) from a Hugging Face BERT directory (BertModel, BertForPreTraining,
  BertForMaskedLM or a task model, whose task head is left out with a warning).

  params is our full BertForPreTraining tree {"bert", "mlm", "nsp"} of float32 numpy arrays,
  layers unrolled (config.scan_layers is False; `bert_jax.params.match_layout` converts);
  heads (and the pooler) the source lacks are initialised fresh, with a warning naming them.
  `encoder_only` (fine-tuning): {"bert": ...} alone, whatever heads the source has.
  A URL (gs://...) is read through a local copy.
  """
  path = _hf_dir(path)
  path = pathlib.Path(files.local(path))
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ConversionError(f"{path}: not a Hugging Face model directory (no config.json)")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{config_file}: not valid JSON ({e})") from None
  config = config_from_hf(hf, str(config_file))
  return config, params_from_hf(config, _read_weights(path), str(path), encoder_only)


# ----------------------------------------------------------------------------- writing HF


def _hf_tensors(config: BertConfig, flat: Mapping[tuple[str, ...], Any]
                ) -> dict[str, np.ndarray]:
  """A BertForPreTraining state dict (float32 numpy) from our full, checked, flattened tree."""
  to_hf = lambda row: row.kind.to_hf(np.asarray(flat[row.path], np.float32), config)
  tensors = {row.hf: np.ascontiguousarray(to_hf(row)) for row in _table(config)}
  tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].copy()
  return tensors


def to_hf(config: BertConfig, params: Mapping[str, Any], out_dir: str | os.PathLike,
          tokenizer_path: str | os.PathLike | None = None) -> epath.Path:
  """Writes config.json + model.safetensors (+ the tokenizer file, with the Hugging Face files
  that make `transformers.AutoTokenizer.from_pretrained(out_dir)` give our ids: see
  bert_jax.hf_tokenizer) for `transformers.BertForPreTraining.from_pretrained(out_dir)`,
  atomically.

  params: our full tree, or the encoder alone (the heads are then written freshly initialised),
  in either layout. out_dir may be a URL (gs://...). Call it on one process.
  """
  from safetensors.numpy import save
  check_params(config, params)
  params = complete_params(config, unstack_layers(params))
  tensors = _hf_tensors(config, traverse_util.flatten_dict(params))
  with replacing_dir(out_dir) as tmp:
    (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    (tmp / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    if tokenizer_path is not None:
      from bert_jax import hf_tokenizer
      files.copy(tokenizer_path, tmp / files.path(tokenizer_path).name)
      # ... and what transformers.AutoTokenizer needs to give the ids ours gives
      for name, text in hf_tokenizer.files_for(
          tokenizer_path, config.max_position_embeddings).items():
        (tmp / name).write_text(text)
  return files.path(out_dir)


# ----------------------------------------------------------------------------- command line


def _check_output(source: str, out_dir: str) -> None:
  """Refuses an output that is the source, holds it or lies inside it, or that exists and is not
  an output of ours (files.check_replaceable), before anything is read."""
  src, out = files.path(source), files.path(out_dir)
  if src == out or src.is_relative_to(out) or out.is_relative_to(src):
    raise ConversionError(f"{out}: the output must not be {src}, hold it or lie inside it "
                          "(writing it would replace the source); choose another directory")
  files.check_replaceable(out)


def from_hf_command(hf_dir: str, out_dir: str) -> None:
  from bert_jax import checkpoint, tokenizer
  _check_output(_hf_dir(hf_dir), out_dir)
  config, params = load_hf(hf_dir)
  tok = tokenizer.find_file(hf_dir)
  if tok is None:
    log.warning("%s has no tokenizer file (%s): fine-tuning will need --config.tokenizer",
                hf_dir, ", ".join(tokenizer.TOKENIZER_FILES))
  checkpoint.save_model(out_dir, config, params, tok)
  log.info("wrote %s (%d layers, hidden %d, vocab %d)", out_dir, config.num_layers,
           config.hidden_size, config.vocab_size)


def to_hf_command(ckpt_dir: str, out_dir: str) -> None:
  from bert_jax import checkpoint, tokenizer
  _check_output(ckpt_dir, out_dir)
  config, params = checkpoint.load_model(ckpt_dir)
  dropped = sorted(set(params) - {"bert", "mlm", "nsp"}) if "bert" in params else []
  if dropped:
    log.warning("%s: not writing the task head(s) %s (BertForPreTraining has no place for them)",
                ckpt_dir, ", ".join(dropped))
    params = {k: v for k, v in params.items() if k not in dropped}
  to_hf(config, params, out_dir, tokenizer.find_file(ckpt_dir))
  log.info("wrote %s", out_dir)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog=cli.prog("bert_jax.convert"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  f = sub.add_parser("from-hf", help="Hugging Face BERT directory -> bert_jax model export")
  f.add_argument("hf_dir")
  f.add_argument("out_dir")
  t = sub.add_parser("to-hf", help="bert_jax model/checkpoint -> Hugging Face BertForPreTraining")
  t.add_argument("ckpt_dir", help="a model export, a checkpoint step directory or a workdir")
  t.add_argument("out_dir")
  args = p.parse_args(argv)
  if args.command == "from-hf":
    from_hf_command(args.hf_dir, args.out_dir)
  else:
    to_hf_command(args.ckpt_dir, args.out_dir)


if __name__ == "__main__":
  cli.run(main)
