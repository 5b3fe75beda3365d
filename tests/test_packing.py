"""Sequence packing: the packer, the packed model against the padded one (outputs and gradients),
isolation of the examples of a row, packing on 1 and 8 devices, packed fine-tuning and
pretraining runs, and checkpoints that move between packed and padded runs."""

import functools
import json
import re

import jax
import numpy as np
import pytest
from test_finetune import _classify_config, _squad_json, model_dir  # noqa: F401 - a fixture
from test_pretrain import _config, prepared  # noqa: F401 - prepared: fixture

from bert_jax import optim, packing, sharding, tasks, trainer
from bert_jax.config import BertConfig
from bert_jax.data import pretraining
from bert_jax.data.loader import PretrainingLoader
from bert_jax.pretrain import pretraining_objective

CFG = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                 max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
T, N = 32, 24


def padded_examples(seed: int, n: int = N, max_len: int = 20) -> dict[str, np.ndarray]:
  """n classification examples [CLS] a [SEP] b [SEP] of random lengths, padded to T."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, max_len + 1, n)
  ids = np.zeros((n, T), np.int32)
  mask = np.zeros((n, T), np.int32)
  seg = np.zeros((n, T), np.int32)
  for i, n_i in enumerate(lengths):
    ids[i, :n_i] = rng.integers(5, 99, n_i)
    ids[i, 0] = 2
    mask[i, :n_i] = 1
    seg[i, n_i // 2:n_i] = 1
  return {"input_ids": ids, "input_mask": mask, "segment_ids": seg,
          "label": rng.integers(0, 3, n).astype(np.int32)}


# ----------------------------------------------------------------------------- the packer


@pytest.mark.parametrize("row_length,cap", [(128, 0), (128, 3), (512, 0), (512, 8)])
def test_the_packer_places_every_example_once_and_fills_rows(row_length, cap):
  lengths = np.random.default_rng(row_length + cap).integers(1, row_length + 1, 5000)
  rows = packing.pack(lengths, row_length, cap)
  assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
  assert all(sum(lengths[r]) <= row_length for r in rows)
  assert max(map(len, rows)) <= (cap or row_length)
  lower_bound = -(-lengths.sum() // row_length)
  assert len(rows) <= 1.02 * lower_bound  # best-fit decreasing on uniform lengths: ~1% over
  assert packing.pack(lengths, row_length, cap) == rows  # deterministic


def test_short_examples_share_rows_up_to_the_cap():
  assert packing.pack([3, 3, 3, 3, 3], 10) == [[0, 1, 2], [3, 4]]
  assert packing.pack([3, 3, 3, 3, 3], 10, max_per_row=2) == [[0, 1], [2, 3], [4]]
  assert packing.pack([6, 4, 5, 5], 10) == [[0, 1], [2, 3]]  # best fit, longest first
  with pytest.raises(ValueError, match="example 1 has length 11"):
    packing.pack([3, 11], 10)


def test_packed_features_restart_positions_and_number_the_examples():
  f = padded_examples(0, n=3)
  lengths = f["input_mask"].sum(1)
  layout = packing.Layout.of([[0, 1], [2]], lengths, max_per_row=3)
  p = packing.packed_features(f, layout)
  a, b = lengths[:2]
  np.testing.assert_array_equal(p["input_ids"][0, :a + b],
                                np.concatenate([f["input_ids"][0, :a], f["input_ids"][1, :b]]))
  np.testing.assert_array_equal(p["position_ids"][0, :a + b],
                                np.concatenate([np.arange(a), np.arange(b)]))
  np.testing.assert_array_equal(p["input_mask"][0], [1] * a + [2] * b + [0] * (T - a - b))
  np.testing.assert_array_equal(p["cls_positions"], [[0, a, 0], [0, 0, 0]])
  np.testing.assert_array_equal(p["example_mask"], [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(p["label"][:, :2], [[f["label"][0], f["label"][1]],
                                                    [f["label"][2], 0]])
  np.testing.assert_array_equal(layout.gather(p["label"]), f["label"])


# ----------------------------------------------------------------------------- exactness


def _packed(f: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], packing.Layout]:
  rows, layout = packing.pack_all(f)
  assert layout.num_rows < len(f["input_ids"]) // 2  # really packed
  return rows, layout


def _classification(examples_per_row: int = 0) -> trainer.Objective:
  return tasks.classification_objective(CFG, 3, T, examples_per_row=examples_per_row)


@pytest.fixture(scope="module")
def params():
  return _classification().init_params(jax.random.PRNGKey(0))


def test_packed_classification_equals_padded_outputs_loss_and_gradients(params):
  f = padded_examples(1)
  rows, layout = _packed(f)
  padded, packed = _classification(), _classification(layout.max_per_row)

  def loss_and_logits(objective, batch):
    out = objective.apply(params, batch, deterministic=True)
    sums = objective.sums(out, batch)
    return objective.loss(sums, objective.counts(batch)), (out["logits"], sums)

  loss_a, (logits_a, sums_a) = jax.jit(functools.partial(loss_and_logits, padded))(f)
  loss_b, (logits_b, sums_b) = jax.jit(functools.partial(loss_and_logits, packed))(rows)
  np.testing.assert_allclose(layout.gather(logits_b), logits_a, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  assert float(sums_b["count"]) == float(sums_a["count"]) == N  # examples, not rows
  grads = [_grads(o, params, b) for o, b in ((padded, f), (packed, rows))]
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0),
                         *grads)


def test_fused_attention_packs_the_same(params):
  f = padded_examples(4)
  rows, layout = _packed(f)
  fused = tasks.classification_objective(CFG.replace(attention="dot_product"), 3, T,
                                         examples_per_row=layout.max_per_row)
  ref = _classification().apply(params, f, deterministic=True)["logits"]
  got = jax.jit(functools.partial(fused.apply, deterministic=True))(params, rows)["logits"]
  np.testing.assert_allclose(layout.gather(got), ref, atol=1e-5, rtol=0)


def _loss_with(objective: trainer.Objective, p, batch) -> jax.Array:
  sums = objective.batch_sums(p, batch, deterministic=True)
  return objective.loss(sums, objective.counts(batch))


def _grads(objective: trainer.Objective, p, batch):
  return jax.jit(jax.grad(lambda p, b: _loss_with(objective, p, b)))(p, batch)


def test_packed_squad_equals_padded_logits_loss_and_gradients():
  f = padded_examples(5)
  f.pop("label")
  rng = np.random.default_rng(5)
  lengths = f["input_mask"].sum(1)
  f["start_positions"] = rng.integers(0, lengths).astype(np.int32)
  f["end_positions"] = np.minimum(f["start_positions"] + rng.integers(0, 3, N),
                                  lengths - 1).astype(np.int32)
  rows, layout = _packed(f)
  padded, packed = tasks.span_objective(CFG, T), tasks.span_objective(CFG, T, layout.max_per_row)
  p = padded.init_params(jax.random.PRNGKey(2))
  out_a = jax.jit(functools.partial(padded.apply, deterministic=True))(p, f)
  out_b = jax.jit(functools.partial(packed.apply, deterministic=True))(p, rows)
  real = f["input_mask"] > 0
  for side in ("start_logits", "end_logits"):
    got = layout.unpack(out_b[side], tasks.NOT_A_CANDIDATE)
    np.testing.assert_allclose(got, np.where(real, out_a[side], tasks.NOT_A_CANDIDATE),
                               atol=1e-5, rtol=0)
  sums_a, sums_b = padded.sums(out_a, f), packed.sums(out_b, rows)
  for k in ("loss", "start_accuracy", "end_accuracy", "count"):
    np.testing.assert_allclose(sums_b[k], sums_a[k], rtol=1e-6)
  assert float(sums_b["count"]) == N
  # The padding is no candidate: the loss is that of the windows' own tokens.
  own = np.where(real, out_a["start_logits"], -np.inf)
  lse = np.log(np.exp(own - own.max(1, keepdims=True)).sum(1)) + own.max(1)
  start_nll = lse - own[np.arange(N), f["start_positions"]]
  assert float(sums_a["loss"]) > 0.5 * start_nll.sum()
  grads = [_grads(o, p, b) for o, b in ((padded, f), (packed, rows))]
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0),
                         *grads)


def test_changing_one_example_leaves_the_others_bitwise_unchanged(params):
  f = padded_examples(2)
  rows, layout = _packed(f)
  objective = _classification(layout.max_per_row)
  changed = {k: v.copy() for k, v in rows.items()}
  victim = int(np.flatnonzero(layout.slot == 1)[0])  # an example sharing its row
  r, start, n = layout.row[victim], layout.start[victim], f["input_mask"][victim].sum()
  changed["input_ids"][r, start + 1:start + n] = (changed["input_ids"][r, start + 1:start + n]
                                                  + 7) % 99
  logits = layout.gather(objective.apply(params, rows, deterministic=True)["logits"])
  after = layout.gather(objective.apply(params, changed, deterministic=True)["logits"])
  others = np.arange(N) != victim
  np.testing.assert_array_equal(after[others], logits[others])
  assert not np.array_equal(after[victim], logits[victim])


def _pretraining_instances(seed: int, n: int = N, preds: int = 2):
  """Padded pretraining instances with sorted masked positions inside each instance."""
  f = padded_examples(seed, n)
  rng = np.random.default_rng(seed + 100)
  lengths = f["input_mask"].sum(1)
  pos = np.stack([np.sort(rng.choice(np.arange(1, m - 1), preds, replace=False))
                  for m in lengths]).astype(np.int32)
  return f, pos, rng.integers(5, 99, (n, preds)).astype(np.int32), rng.integers(0, 2, n)


def test_packed_pretraining_equals_padded(params):
  del params
  f, pos, ids, nsp = _pretraining_instances(3)
  rows, layout = _packed({k: f[k] for k in ("input_ids", "input_mask", "segment_ids")}
                         | {"next_sentence_labels": nsp.astype(np.int32)})
  preds = pos.shape[1]
  padded = {**f, "masked_lm_positions": pos, "masked_lm_ids": ids,
            "masked_lm_weights": np.ones(pos.shape, np.float32),
            "next_sentence_labels": nsp.astype(np.int32)}
  # The same predictions in the packed rows: positions shifted by each instance's start.
  slots = layout.max_per_row * preds
  packed = {**rows, "masked_lm_positions": np.zeros((layout.num_rows, slots), np.int32),
            "masked_lm_ids": np.zeros((layout.num_rows, slots), np.int32),
            "masked_lm_weights": np.zeros((layout.num_rows, slots), np.float32)}
  where = layout.slot[:, None] * preds + np.arange(preds)
  packed["masked_lm_positions"][layout.row[:, None], where] = pos + layout.start[:, None]
  packed["masked_lm_ids"][layout.row[:, None], where] = ids
  packed["masked_lm_weights"][layout.row[:, None], where] = 1.0
  a = pretraining_objective(CFG, T, preds)
  b = pretraining_objective(CFG, T, slots, layout.max_per_row)
  p = a.init_params(jax.random.PRNGKey(1))
  out_a = jax.jit(functools.partial(a.apply, deterministic=True))(p, padded)
  out_b = jax.jit(functools.partial(b.apply, deterministic=True))(p, packed)
  np.testing.assert_allclose(layout.gather(out_b["nsp_logits"]), out_a["nsp_logits"],
                             atol=1e-5, rtol=0)
  mlm_b = out_b["mlm_logits"][layout.row[:, None], where]
  np.testing.assert_allclose(mlm_b, out_a["mlm_logits"], atol=1e-5, rtol=0)
  grads = [_grads(o, p, batch) for o, batch in ((a, padded), (b, packed))]
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0),
                         *grads)


@pytest.mark.parametrize("data,fsdp", [pytest.param(8, 1, marks=pytest.mark.slow), (2, 4)])
def test_packing_on_one_device_equals_packing_on_eight(data, fsdp, shard_small_arrays):
  batches = [padded_examples(10 + i, n=32) for i in range(3)]
  packers = [packing.BatchPacker(b) for b in batches]
  for p in packers:
    p.plan([np.arange(32)], multiple=8)
  width = max(p.max_per_row for p in packers)
  rows = max(p.num_rows for p in packers)
  for p in packers:
    p.num_rows, p.max_per_row = rows, width
  objective = tasks.classification_objective(CFG.replace(hidden_dropout=0.1,
                                                         attention_dropout=0.1), 3, T,
                                             examples_per_row=width)
  schedule = optim.learning_rate_schedule(1e-3, 1, 10)
  tx = optim.make_optimizer("adamw", schedule)

  def run(devices, fsdp):
    mesh = sharding.make_mesh(devices, fsdp)
    state = trainer.jit_create_state(mesh, objective, tx, 0)
    step = trainer.jit_train_step(mesh, trainer.shardings_of(state), objective=objective,
                                  tx=tx, schedule=schedule)
    losses = []
    for p in packers:
      state, metrics = step(state, sharding.global_batch(p(np.arange(32)), mesh))
      losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)

  ref_losses, ref_params = run(1, 1)
  losses, params = run(data * fsdp, fsdp)
  assert ref_losses[0] != ref_losses[-1]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0),
                         params, ref_params)


# ----------------------------------------------------------------------------- runs


def _train_losses(workdir) -> list[float]:
  return [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if r["split"] == "train"]


def test_packed_finetuning_equals_padded_finetuning(model_dir, tmp_path, caplog):  # noqa: F811
  from bert_jax import finetune
  over = {"train.dropout": 0.0, "train.epochs": 2, "train.max_steps": 0, "train.log_every": 1,
          "train.batch_size": 6, "train.learning_rate": 1e-3}
  padded = finetune.main(_classify_config(model_dir, tmp_path, **over), tmp_path / "padded")
  with caplog.at_level("INFO", logger="bert_jax.finetune"):
    packed = finetune.main(_classify_config(model_dir, tmp_path, **over,
                                            **{"data.packing": True}), tmp_path / "packed")
  assert "packing: 6 examples per update in 2 rows of 32" in caplog.text
  losses = _train_losses(tmp_path / "packed")
  assert len(losses) == 6 and losses[0] != losses[-1]
  np.testing.assert_allclose(losses, _train_losses(tmp_path / "padded"), rtol=2e-5)
  assert packed["accuracy"] == padded["accuracy"] and packed["step"] == padded["step"]


def test_packed_squad_finetuning_equals_padded_finetuning(model_dir, tmp_path, caplog):  # noqa: F811
  from bert_jax import finetune
  from configs import squad
  data = _squad_json(tmp_path / "squad.json", "v2.0", impossible=True)

  def run(name, **over):
    c = squad.get_config("tiny")
    c.init_from, c.data.train_file = str(model_dir), str(data)
    c.data.eval_file = c.data.train_file
    c.train.update(progress_bar=False, num_devices=1, dropout=0.0, epochs=2, max_steps=0,
                   log_every=1, batch_size=4, learning_rate=1e-3)
    c.data.update(max_seq_length=256, **over)  # windows of ~67 tokens: several per row
    return finetune.main(c, tmp_path / name), tmp_path / name

  padded, padded_dir = run("padded")
  with caplog.at_level("INFO", logger="bert_jax.finetune"):
    packed, packed_dir = run("packed", packing=True)
  assert re.search(r"packing: 4 examples per update in [12] rows of 256", caplog.text)
  losses = _train_losses(packed_dir)
  assert len(losses) == 6 and losses[0] != losses[-1]
  np.testing.assert_allclose(losses, _train_losses(padded_dir), rtol=2e-5)
  for name in ("predictions.json", "null_odds.json"):
    a, b = (json.loads((d / name).read_text()) for d in (padded_dir, packed_dir))
    assert a.keys() == b.keys()
    if name == "predictions.json":
      assert a == b
    else:
      np.testing.assert_allclose([b[k] for k in a], list(a.values()), atol=1e-4)
  assert packed == pytest.approx(padded, abs=1e-9)


@pytest.fixture(scope="module")
def packed_data(prepared, tmp_path_factory):  # noqa: F811
  """The test corpus's instances packed into rows (static masking), and the same instances
  unpacked (dynamic masking: instance creation then draws the same random numbers)."""
  d = tmp_path_factory.mktemp("packed")
  corpus = pretraining.read_manifest(prepared["data.data_dir"])["args"]["input_files"]
  make = lambda name, **kw: pretraining.create_pretraining_data(  # noqa: E731
      corpus, prepared["data.tokenizer"], str(d / name), max_seq_length=64,
      max_predictions_per_seq=10, dupe_factor=1, eval_fraction=0.1, seed=1, **kw)
  return d / "packed", make("packed", pack=True, max_examples_per_row=4), make(
      "plain", dynamic_masking=True)


def test_packed_pretraining_data_keeps_every_instance(prepared, packed_data):  # noqa: F811
  from bert_jax import tokenizer
  data_dir, m, plain = packed_data
  tok = tokenizer.load(prepared["data.tokenizer"])
  for split in ("train", "eval"):
    s = m["splits"][split]
    assert s["packing"]["examples"] == plain["splits"][split]["num_instances"]
    assert s["num_instances"] == s["packing"]["rows"] < s["packing"]["examples"]  # the rows
    for stat in ("instances", "tokens", "random_next"):  # instances, not rows
      assert s["stats"][stat] == plain["splits"][split]["stats"][stat], stat
    assert s["packing"]["padding_share_unpacked"] == plain["splits"][split]["padding_share"]
    assert s["packing"]["padding_share"] < s["packing"]["padding_share_unpacked"]
  batch = PretrainingLoader(data_dir, "train", 64, seed=3).__next__()
  k = batch["example_mask"].sum(1).astype(int)
  assert k.max() > 1 and k.max() <= 4 and batch["cls_positions"].shape == (64, 4)
  for r in range(64):
    starts = batch["cls_positions"][r, :k[r]]
    assert np.all(batch["input_ids"][r, starts] == tok.cls_id)
    assert np.all(batch["position_ids"][r, starts] == 0)
    numbers = batch["input_mask"][r]
    assert list(np.unique(numbers[numbers > 0])) == list(range(1, k[r] + 1))
    real = (numbers > 0).sum()
    n_masked = batch["masked_lm_weights"][r].sum()
    assert n_masked == min(10, max(1, round(real * 0.15)))  # per row
    picked = batch["masked_lm_positions"][r, :int(n_masked)]
    assert np.all(picked < real) and not np.isin(picked, starts).any()


def test_a_packed_row_cannot_number_more_instances_than_its_stored_mask_holds(
    prepared, tmp_path):  # noqa: F811
  """A packed row numbers its instances in input_mask, stored as int8: from the 128th on they
  would read as padding (a row of 1,024 tokens can hold 200 instances of 5)."""
  from test_pretrain import _config

  from bert_jax import pretrain
  corpus = pretraining.read_manifest(prepared["data.data_dir"])["args"]["input_files"]
  with pytest.raises(ValueError, match=r"max_examples_per_row=128: expected at most 127"):
    pretraining.create_pretraining_data(corpus, prepared["data.tokenizer"], str(tmp_path / "d"),
                                        max_seq_length=1024, pack=True, max_examples_per_row=128)
  config = _config(prepared, **{"data.packing": True, "data.max_examples_per_row": 128,
                                "data.max_seq_length": 1024, "model.max_position_embeddings": 1024})
  with pytest.raises(pretrain.ConfigError, match=r"data.max_examples_per_row=128: expected at "
                                                 r"most 127"):
    pretrain.check_data_config(config)
  assert not (tmp_path / "d").exists()


def test_a_packed_pretraining_checkpoint_fine_tunes_unpacked(prepared, packed_data, model_dir,  # noqa: F811
                                                             tmp_path):
  # (An unpacked checkpoint fine-tuning packed: test_packed_finetuning_equals_padded_finetuning.)
  from bert_jax import finetune, pretrain
  from bert_jax.errors import ConfigError
  data_dir = str(packed_data[0])
  over = {"train.steps": 2, "train.checkpoint_every": 2, "data.data_dir": data_dir}
  with pytest.raises(ConfigError, match="is packed but data.packing=False"):
    pretrain.main(_config(prepared, **over), tmp_path / "refused")
  last = pretrain.main(_config(prepared, **over, **{"data.packing": True}), tmp_path / "pre")
  assert np.isfinite(last["eval_loss"]) and 0 < last["eval_nsp_accuracy"] <= 1
  c = _classify_config(model_dir, tmp_path, **{"train.max_steps": 2, "train.log_every": 1})
  c.init_from = str(tmp_path / "pre")
  assert 0 <= finetune.main(c, tmp_path / "ft")["accuracy"] <= 1
