"""The encoder and heads: shapes, parameter counts, masking, dtypes, attention implementations."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import packing
from bert_jax import params as layout
from bert_jax.config import REMAT_POLICIES, BertConfig, get_variant, resolve_dtype
from bert_jax.errors import ConfigError
from bert_jax.heads import (
  BertForPreTraining,
  BertForQuestionAnswering,
  BertForSequenceClassification,
)
from bert_jax.model import BertModel, Dropout

TINY = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                  max_position_embeddings=64)


def _batch(b=3, t=11, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 99, (b, t)).astype(np.int32)
  types = (np.arange(t)[None] >= t // 2).astype(np.int32).repeat(b, 0)
  mask = np.ones((b, t), np.int32)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  return ids, types, mask


def _count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def test_base_parameter_count():
  shapes = jax.eval_shape(lambda: BertModel(get_variant("base")).init(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
  assert _count(shapes) == 109_482_240


def test_variants_have_published_sizes():
  large = get_variant("large")
  assert (large.num_layers, large.hidden_size, large.num_heads, large.intermediate_size) == (
      24, 1024, 16, 4096)
  assert get_variant("tiny").num_layers == 2
  with pytest.raises(ValueError, match="unknown model variant 'huge'"):
    get_variant("huge")
  with pytest.raises(ValueError, match="not divisible"):
    BertConfig(hidden_size=30, num_heads=4)


def test_config_json_round_trip():
  cfg = TINY.replace(dtype="bfloat16", remat="dots_saveable", scan_layers=True)
  assert BertConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ValueError, match="unknown fields"):
    BertConfig.from_dict({**cfg.to_dict(), "hidden_act": "gelu"})


def test_old_configs_with_a_boolean_remat_load():
  old = {k: v for k, v in TINY.to_dict().items() if k != "scan_layers"}  # before scan_layers
  assert BertConfig.from_json(json.dumps({**old, "remat": False})) == TINY
  assert BertConfig.from_dict({**old, "remat": True}) == TINY.replace(remat="full")
  assert TINY.replace(remat=True).remat == "full"


def test_bad_remat_policy_is_named():
  with pytest.raises(ValueError, match=r"BertConfig\.remat must be one of \('none', 'full', "
                     r"'dots_saveable', .*got 'dots'"):
    TINY.replace(remat="dots")


def test_padding_does_not_change_real_tokens():
  ids, types, mask = _batch()
  model = BertModel(TINY)
  params = model.init(jax.random.key(0), ids, types, mask)
  out = model.apply(params, ids, types, mask)
  # Change what sits in the padding: outputs at real positions must not move.
  ids2 = np.where(mask == 1, ids, 5)
  out2 = model.apply(params, ids2, types, mask)
  for b in range(3):
    n = int(mask[b].sum())
    np.testing.assert_allclose(out["sequence_output"][b, :n], out2["sequence_output"][b, :n],
                               atol=1e-6)
  np.testing.assert_allclose(out["pooled_output"], out2["pooled_output"], atol=1e-6)
  # ...and a padded row equals the same row run alone without padding.
  alone = model.apply(params, ids[1:2, :7], types[1:2, :7], mask[1:2, :7])
  np.testing.assert_allclose(out["sequence_output"][1, :7], alone["sequence_output"][0],
                             atol=1e-5)


def test_fused_attention_matches_einsum():
  """dot_product (jax.nn.dot_product_attention with key lengths) == einsum with the mask, in
  float32 with dropout off, on a batch with padded rows: outputs and gradients."""
  ids, types, mask = _batch()
  pos = np.array([[1, 2, 3]] * 3, np.int32)
  einsum = TINY.replace(dtype="float32", hidden_dropout=0.0, attention_dropout=0.0)
  fused = einsum.replace(attention="dot_product")
  assert fused.attention_implementation == "xla"  # on CPU; "cudnn" on GPU in bfloat16
  params = _pretraining_params(einsum)
  # 1e-6, relative where the values exceed 1: a few gradients are near 16, where one float32
  # step is 1.9e-6 (summation orders differ between the two paths and between CPUs).
  close = lambda a, b: jax.tree_util.tree_map(  # noqa: E731
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
  for deterministic in (True, False):
    close(*(BertForPreTraining(c).apply({"params": params}, ids, types, mask, pos,
                                        deterministic=deterministic) for c in (einsum, fused)))
  close(*(_pretraining_grads(c, params, deterministic=False) for c in (einsum, fused)))


def test_fused_attention_passes_key_lengths_not_a_mask(monkeypatch):
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  ids, types, mask = _batch()
  cfg = TINY.replace(attention="dot_product", attention_dropout=0.0)
  BertModel(cfg).init_with_output(jax.random.key(0), ids, types, mask)
  assert len(calls) == cfg.num_layers
  assert "mask" not in calls[0] and calls[0]["implementation"] == "xla"
  np.testing.assert_array_equal(calls[0]["key_value_seq_lengths"], [11, 7, 4])


def test_fused_attention_on_packed_rows_gives_cudnn_even_lengths(monkeypatch):
  """Packed rows go to the fused kernel as a mask, which cuDNN turns into a bias; its training
  kernel then wants an even number of queries and keys. These rows have 11 tokens and the
  sparse last layer 3 + 2 queries: every call gets even counts, and the outputs and gradients
  equal einsum's (float32, dropout off)."""
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, **kw: calls.append((q.shape[1], k.shape[1])) or real(
                          q, k, v, **kw))
  ids, types, mask, *rest = _packed_batch()
  einsum = TINY.replace(dtype="float32", hidden_dropout=0.0, attention_dropout=0.0)
  fused = einsum.replace(attention="dot_product")
  params = _pretraining_params(einsum)
  pos = np.array([[1, 2], [6, 0], [1, 3]], np.int32)
  model = lambda c: lambda p: BertForPreTraining(c).apply(  # noqa: E731
      {"params": p}, ids, types, mask, pos, *rest)
  _assert_trees_close(model(einsum)(params), model(fused)(params))
  _assert_trees_close(jax.grad(_output_sum(model(einsum)))(params),
                      jax.grad(_output_sum(model(fused)))(params))
  assert calls and all(t % 2 == 0 and s % 2 == 0 for t, s in calls), calls


def test_fused_attention_with_attention_dropout_is_a_config_error():
  with pytest.raises(ConfigError, match=r"model\.attention='dot_product'.*"
                     r"model\.attention_dropout=0\.1"):
    TINY.replace(attention="dot_product")  # BERT's attention dropout 0.1
  # Fine-tuning sets both dropouts from train.dropout: that path meets the same check.
  from bert_jax import finetune
  from configs import classify
  c = classify.get_config("tiny")
  c.model.attention, c.train.dropout = "dot_product", 0.1
  try:
    cfg = finetune.model_config(c, TINY)
  except ConfigError:
    pass
  else:
    assert cfg.attention == "dot_product" and cfg.attention_dropout == 0.0
  with pytest.raises(ConfigError, match="model.attention must be one of"):
    TINY.replace(attention="flash")


@pytest.mark.parametrize("field,value", [("hidden_dropout", -0.1), ("attention_dropout", 1.5),
                                         ("hidden_dropout", 1.0)])
def test_a_dropout_rate_outside_0_to_1_is_a_config_error(field, value):
  """-0.1 dropped about 90% of the activations (its threshold wrapped around), 1.5 all of them."""
  with pytest.raises(ConfigError, match=rf"model.{field}={value}: expected a rate from 0 to "
                                        r"below 1"):
    TINY.replace(**{field: value})


@pytest.mark.parametrize("field", ["num_layers", "num_heads", "hidden_size", "vocab_size"])
def test_sizes_below_one_are_refused_naming_the_field(field):
  with pytest.raises(ValueError, match=rf"BertConfig.{field} must be a whole number >= 1, got 0"):
    TINY.replace(**{field: 0})


def test_fused_attention_through_encode_needs_right_padded_masks():
  """It passes key lengths, not the mask: a left-padded or gapped mask would attend to the wrong
  keys silently (1.63 off einsum's outputs)."""
  import bert_jax
  cfg = TINY.replace(attention="dot_product", attention_dropout=0.0)
  ids, types, _ = _batch(3, 8)
  ids, types = ids[:2], types[:2]
  params = BertModel(cfg).init(jax.random.key(0), ids, types, np.ones((2, 8), np.int32))["params"]
  right = np.array([[1] * 5 + [0] * 3, [1] * 8], np.int32)
  out = bert_jax.encode(cfg, params, ids, types, right)
  ref = bert_jax.encode(cfg.replace(attention="einsum"), params, ids, types, right)
  np.testing.assert_allclose(out["pooled_output"], ref["pooled_output"], atol=1e-6)
  for bad in ([0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1, 0]):
    with pytest.raises(ValueError, match=r"attention_mask row 1 is not real tokens first, then "
                                         r"padding.*attention='einsum'"):
      bert_jax.encode(cfg, params, ids, types, np.array([[1] * 8, bad], np.int32))


def test_auto_dtype_resolves_per_backend():
  assert BertConfig().dtype == "auto" == TINY.dtype
  assert jax.default_backend() == "cpu" and TINY.compute_dtype == jnp.float32
  assert resolve_dtype("auto", "gpu") == resolve_dtype("auto", "tpu") == jnp.bfloat16
  assert resolve_dtype("auto", "cpu") == jnp.float32 == resolve_dtype("float32", "gpu")
  # config.json keeps "auto", so a checkpoint runs in the dtype of wherever it is loaded.
  assert BertConfig.from_json(TINY.to_json()).dtype == "auto"
  with pytest.raises(ValueError, match=r"BertConfig\.param_dtype must be one of"):
    TINY.replace(param_dtype="int8")
  ids, types, mask = _batch()
  params = BertModel(TINY).init(jax.random.key(0), ids, types, mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  dots = [e for e in jax.make_jaxpr(lambda p: BertModel(TINY).apply(p, ids, types, mask))(
      params).jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)


def test_bfloat16_compute_stays_close_to_float32():
  ids, types, mask = _batch()
  model = BertForPreTraining(TINY)
  pos = np.array([[1, 2, 3]] * 3, np.int32)
  params = model.init(jax.random.key(0), ids, types, mask, pos)
  f32 = model.apply(params, ids, types, mask, pos)
  bf16 = BertForPreTraining(TINY.replace(dtype="bfloat16")).apply(params, ids, types, mask, pos)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, bf16))
  # bf16 has an 8-bit mantissa: after 2 layers outputs agree to ~2e-2 (LayerNorm keeps scale ~1).
  for key in ("pooled_output", "mlm_logits", "nsp_logits"):
    np.testing.assert_allclose(f32[key], bf16[key], atol=5e-2)


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr, in its sub-jaxprs (custom_vjp, scan, remat) too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _dot_generals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dot_generals(sub)


@pytest.mark.parametrize("one_device", [True, False])
def test_bfloat16_on_cpu_runs_every_matmul_as_bfloat16_dots_with_float32_results(
    one_device, monkeypatch):
  """XLA:CPU gives its bfloat16 kernels (AMX-BF16 where the CPU has it) only bfloat16 x
  bfloat16 -> float32 dots: in bfloat16 every matmul has that form, forward and both backward
  dots, and its gradients match float32's to bfloat16's precision. On several devices the
  attention's batched dots stay float32 (their operand copies would lose the batch sharding)."""
  from bert_jax import model
  monkeypatch.setattr(model, "_one_device", lambda: one_device)  # the tests see 8 devices
  cfg = TINY.replace(dtype="bfloat16")
  params = _pretraining_params(TINY)
  grads = jax.make_jaxpr(lambda p: _pretraining_grads(cfg, p, deterministic=True))(params)
  dots = list(_dot_generals(grads.jaxpr))
  bf16 = [e for e in dots if jnp.bfloat16 in [v.aval.dtype for v in e.invars]]
  batched = [e for e in dots if e.params["dimension_numbers"][1][0]]
  # per layer q, k, v, output, intermediate, ffn output (and the attention's two batched dots);
  # pooler, NSP, MLM transform and decoder
  assert len(batched) == 3 * 2 * TINY.num_layers
  assert len(bf16) == 3 * (6 * TINY.num_layers + 4) + (len(batched) if one_device else 0)
  for e in bf16:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    assert e.outvars[0].aval.dtype == jnp.float32, e
  # The float32 dots: the MLM output bias's gradient (a matmul with ones, heads.add_bias), and
  # on several devices the batched ones.
  f32 = [e for e in dots if e not in bf16]
  assert len(f32) == 1 + (0 if one_device else len(batched))
  assert all(v.aval.dtype == jnp.float32 for e in f32 for v in e.invars)
  _assert_trees_close(_pretraining_grads(TINY, params, deterministic=True),
                      _pretraining_grads(cfg, params, deterministic=True), tol=2e-2)


def _output_sum(model):
  """A scalar of every output of `model(params)`, whose gradient reaches each output."""
  return lambda p: sum(x.sum() for x in jax.tree_util.tree_leaves(model(p)))


def _pretraining_grads(cfg, params, deterministic):
  ids, types, mask = _batch()
  pos = np.array([[1, 2, 3]] * 3, np.int32)

  def loss(p):
    out = BertForPreTraining(cfg).apply({"params": p}, ids, types, mask, pos,
                                        deterministic=deterministic,
                                        rngs={"dropout": jax.random.key(3)})
    return out["mlm_logits"].sum() + out["nsp_logits"].sum()
  return jax.grad(loss)(params)


def _assert_trees_close(a, b, tol=1e-6):
  """Leaf by leaf, max |a - b| <= tol * max(1, max |a|): float32 rounding of a different
  (equally exact) order of operations, on gradients that reach ~100 here."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= tol * max(1.0, np.abs(x).max()), np.abs(x - y).max()


def _pretraining_params(cfg):
  ids, types, mask = _batch()
  pos = np.array([[1, 2, 3]] * 3, np.int32)
  return BertForPreTraining(cfg).init(jax.random.key(0), ids, types, mask, pos)["params"]


_IN_CI = (("full", False), ("dots_saveable", True))  # the other pairs run in the full suite


@pytest.mark.parametrize("policy,scan_layers", [
    p if p in _IN_CI else pytest.param(*p, marks=pytest.mark.slow)
    for p in itertools.product([p for p in REMAT_POLICIES if p != "none"], [False, True])])
def test_remat_gives_the_same_gradients(policy, scan_layers):
  cfg = TINY.replace(scan_layers=scan_layers)
  params = _pretraining_params(cfg)
  _assert_trees_close(_pretraining_grads(cfg, params, deterministic=False),
                      _pretraining_grads(cfg.replace(remat=policy), params, deterministic=False))


def test_scanned_layers_give_the_same_outputs_and_gradients():
  ids, types, mask = _batch()
  pos = np.array([[1, 2, 3]] * 3, np.int32)
  cfg = TINY.replace(num_layers=3)
  scanned = cfg.replace(scan_layers=True)
  params = _pretraining_params(cfg)
  stacked = layout.stack_layers(params)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
      _pretraining_params(scanned))  # a scanned model inits the stacked layout
  a = BertForPreTraining(cfg).apply({"params": params}, ids, types, mask, pos)
  b = BertForPreTraining(scanned).apply({"params": stacked}, ids, types, mask, pos)
  _assert_trees_close(a, b)
  grads = _pretraining_grads(scanned, stacked, deterministic=True)
  _assert_trees_close(_pretraining_grads(cfg, params, deterministic=True),
                      layout.unstack_layers(grads))


def test_scanned_classifier_gives_the_same_logits_and_gradients():
  ids, types, mask = _batch()
  cfg = TINY.replace(num_layers=3)
  model = lambda c: BertForSequenceClassification(c, num_labels=3)
  params = model(cfg).init(jax.random.key(0), ids, types, mask)["params"]

  def logits(c, p):
    return model(c).apply({"params": p}, ids, types, mask)["logits"]

  scanned, stacked = cfg.replace(scan_layers=True), layout.stack_layers(params)
  _assert_trees_close(logits(cfg, params), logits(scanned, stacked))
  loss = lambda c: lambda p: jax.nn.log_softmax(logits(c, p))[:, 0].sum()
  _assert_trees_close(jax.grad(loss(cfg))(params),
                      layout.unstack_layers(jax.grad(loss(scanned))(stacked)))


def test_scanned_program_does_not_grow_with_depth():
  ids, types, mask = _batch()

  def equations(layers):
    cfg = TINY.replace(num_layers=layers, scan_layers=True)
    params = jax.eval_shape(lambda: BertModel(cfg).init(jax.random.key(0), ids))
    return len(jax.make_jaxpr(lambda p: BertModel(cfg).apply(p, ids, types, mask))(
        params).jaxpr.eqns)

  assert equations(2) == equations(6)


def _packed_batch():
  """Six examples (lengths 5, 4, 11, 3, 3, 3) packed by bert_jax.packing into 3 rows of 11
  tokens, [0, 1], [2] and [3, 4, 5]: input_ids, segment_ids, example numbers, position_ids and
  cls_positions."""
  lengths = np.array([5, 4, 11, 3, 3, 3])
  real = np.arange(11)[None] < lengths[:, None]
  ids = np.random.default_rng(0).integers(1, 99, (6, 11)) * real
  types = (np.arange(11)[None] >= lengths[:, None] // 2) * real
  layout = packing.Layout.of([[0, 1], [2], [3, 4, 5]], lengths)
  p = packing.packed_features({"input_ids": ids.astype(np.int32),
                               "segment_ids": types.astype(np.int32)}, layout)
  return (p["input_ids"], p["segment_ids"], p["input_mask"], p["position_ids"],
          p["cls_positions"])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("attention,dtype,scan", [
    ("einsum", "float32", False), ("dot_product", "float32", False),
    ("einsum", "bfloat16", False), ("einsum", "float32", True)])
def test_sparse_last_layer_equals_the_full_one(attention, dtype, scan, packed):
  """The last layer at the [CLS]s and masked positions only (config.sparse_last_layer) gives the
  full last layer's logits and gradients, dropout off: pretraining and classification, padded
  and packed rows, einsum and fused attention, float32 and bfloat16 (CPU's AMX path), unrolled
  and scanned layers."""
  full = TINY.replace(hidden_dropout=0.0, attention_dropout=0.0, attention=attention,
                      dtype=dtype, sparse_last_layer=False, scan_layers=scan)
  sparse = full.replace(sparse_last_layer=True)
  ids, types, mask, *rest = _packed_batch() if packed else _batch()
  pos = np.array([[1, 2, 3], [6, 0, 0], [1, 3, 2]], np.int32)
  tol = 1e-6 if dtype == "float32" else 1e-2
  pretrain = lambda c: lambda p: BertForPreTraining(c).apply(  # noqa: E731
      {"params": p}, ids, types, mask, pos, *rest)
  classify = lambda c: lambda p: BertForSequenceClassification(c, num_labels=3).apply(  # noqa: E731
      {"params": p}, ids, types, mask, *rest)
  params = {"pretrain": _pretraining_params(full),
            "classify": BertForSequenceClassification(full, num_labels=3).init(
                jax.random.key(1), ids, types, mask)["params"]}
  for task, model in (("pretrain", pretrain), ("classify", classify)):
    _assert_trees_close(model(full)(params[task]), model(sparse)(params[task]), tol)
    _assert_trees_close(jax.grad(_output_sum(model(full)))(params[task]),
                        jax.grad(_output_sum(model(sparse)))(params[task]), tol)
  # ...and the last layer's feed-forward runs on B x (K + P) rows, not B x T.
  ffn = lambda c: sorted(  # noqa: E731  rows of the forward FFN dots ([B, T, F] or [B T, F])
      int(np.prod(e.outvars[0].aval.shape[:-1])) for e in _dot_generals(jax.make_jaxpr(
          pretrain(c))(params["pretrain"]).jaxpr)
      if e.outvars[0].aval.shape[-1] == TINY.intermediate_size)
  used = (3 if packed else 1) + pos.shape[1]
  every_layer = [3 * 11] * (1 if scan else 2)  # a scanned encoder's jaxpr has one layer body
  assert ffn(full) == every_layer and ffn(sparse) == [3 * used, 3 * 11]


def test_task_models_share_the_encoder_tree():
  ids, types, mask = _batch()
  cls = BertForSequenceClassification(TINY, num_labels=3)
  qa = BertForQuestionAnswering(TINY)
  pc = cls.init(jax.random.key(0), ids, types, mask)["params"]
  pq = qa.init(jax.random.key(0), ids, types, mask)["params"]
  assert jax.tree_util.tree_structure(pc["bert"]) == jax.tree_util.tree_structure(pq["bert"])
  assert cls.apply({"params": pc}, ids, types, mask)["logits"].shape == (3, 3)
  out = qa.apply({"params": pq}, ids, types, mask)
  assert out["start_logits"].shape == out["end_logits"].shape == (3, 11)


@pytest.mark.parametrize("shape", [(64, 128, 129), (3, 5)])
def test_dropout_drops_at_the_rate_and_rescales(shape):
  x = jnp.ones(shape, jnp.float32)
  layer = Dropout(0.1)
  y = layer.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  if x.size > 1000:  # 1,056,768 draws: the drop share is 0.1 within 5 standard deviations
    assert abs(1 - kept.mean() - 0.1) < 5 * np.sqrt(0.09 / x.size)
    # neighbouring elements (the two halves of one 32-bit word) are independent
    both = (~kept[..., :-1:2] & ~kept[..., 1::2]).mean()
    assert abs(both - 0.01) < 0.002
    # rows, and two keys, draw independent masks: both drop an element 1% of the time
    assert abs((~kept[0] & ~kept[1]).mean() - 0.01) < 0.003
    other = layer.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(1)}) != 0
    assert abs((~kept & ~np.asarray(other)).mean() - 0.01) < 0.001
    # a row's mask is not another row's shifted (a counter stream offset by the seed would be)
    for shift in (1, 2, 64, 129):
      same = (kept[0].ravel()[shift:] == kept[1].ravel()[:-shift]).mean()
      assert abs(same - 0.82) < 0.01, (shift, same)
  np.testing.assert_array_equal(layer.apply({}, x, True), x)
