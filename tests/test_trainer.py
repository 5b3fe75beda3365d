"""The one trainer's step on meshes (data, fsdp): exact data parallelism and FSDP (the same losses
on any mesh), exact gradient accumulation reduced once, state bytes per device, one compile."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import optim, sharding, trainer
from bert_jax.config import BertConfig, get_variant
from bert_jax.heads import BertForPreTraining
from bert_jax.pretrain import pretraining_objective

pytestmark = pytest.mark.usefixtures("shard_small_arrays")  # the tiny model really is split

CFG = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                 max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
DROPOUT = CFG.replace(hidden_dropout=0.1, attention_dropout=0.1)
B, T, P = 32, 24, 5


def synthetic_batch(seed: int, batch_size: int = B) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.ones((batch_size, T), np.int32)
  lengths = rng.integers(P + 2, T + 1, batch_size)
  mask[np.arange(T)[None] >= lengths[:, None]] = 0
  pos = np.stack([np.sort(rng.choice(np.arange(1, n - 1), P, replace=False)) for n in lengths])
  weights = np.ones((batch_size, P), np.float32)
  weights[::3, -2:] = 0.0
  return {"input_ids": (rng.integers(5, 99, (batch_size, T)) * mask).astype(np.int32),
          "input_mask": mask,
          "segment_ids": ((np.arange(T)[None] > lengths[:, None] // 2) * mask).astype(np.int32),
          "masked_lm_positions": (pos * (weights > 0)).astype(np.int32),
          "masked_lm_ids": (rng.integers(5, 99, (batch_size, P)) * (weights > 0)).astype(np.int32),
          "masked_lm_weights": weights,
          "next_sentence_labels": rng.integers(0, 2, batch_size).astype(np.int32)}


_SCHEDULE = optim.learning_rate_schedule(1e-3, 1, 10)
_TX = optim.make_optimizer("adamw", _SCHEDULE)


def _setup(num_devices, fsdp, grad_accum, cfg):
  mesh = sharding.make_mesh(num_devices, fsdp)
  objective = pretraining_objective(cfg, T, P)
  state = trainer.jit_create_state(mesh, objective, _TX, 0)
  step = trainer.jit_train_step(mesh, trainer.shardings_of(state), objective=objective, tx=_TX,
                                schedule=_SCHEDULE, grad_accum=grad_accum)
  return mesh, state, step


def run(num_devices: int, fsdp: int = 1, grad_accum: int = 1, steps: int = 5,
        cfg: BertConfig = CFG):
  mesh, state, step = _setup(num_devices, fsdp, grad_accum, cfg)
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(synthetic_batch(i), mesh))
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1  # compiled once, never retraced
  return np.array(losses), jax.device_get(state.params)


cached_run = functools.lru_cache(run)


def _assert_close(a, b, atol=1e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


@pytest.mark.parametrize("data,fsdp", [pytest.param(8, 1, marks=pytest.mark.slow),
                                       pytest.param(4, 2, marks=pytest.mark.slow), (2, 4),
                                       pytest.param(1, 8, marks=pytest.mark.slow)])
def test_every_mesh_equals_one_device(data, fsdp):
  # With dropout on: the step keys give the same masks whatever the mesh.
  losses1, params1 = cached_run(1, cfg=DROPOUT)
  losses, params = cached_run(data * fsdp, fsdp, cfg=DROPOUT)
  assert np.all(np.isfinite(losses1)) and losses1[-1] != losses1[0]
  np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=0)
  _assert_close(params, params1)


def test_the_fsdp_rule(monkeypatch):
  monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 2**14)
  spec = lambda path, shape: sharding.array_spec(  # noqa: E731
      [jax.tree_util.DictKey(k) for k in path.split("/")], shape, 8)
  Spec = jax.sharding.PartitionSpec
  assert spec("bert/embeddings/word_embeddings/embedding", (30522, 768)) == Spec(None, "fsdp")
  assert spec("bert/encoder/layer_0/ffn/intermediate/kernel", (768, 3072)) == Spec(None, "fsdp")
  assert spec("bert/encoder/layer_0/ffn/intermediate/bias", (3072,)) == Spec()  # small
  # A scanned stack is never split along its layer axis, even where that axis is the largest.
  assert spec("bert/encoder/layers/ffn/output/kernel", (64, 32, 768)) == Spec(None, None, "fsdp")
  assert spec("bert/encoder/layers/ffn/output/kernel", (64, 33, 513)) == Spec()
  assert sharding.array_spec([], (1024, 1024), 1) == Spec()  # fsdp=1: replicated


def test_fsdp_really_splits_the_state():
  mesh, state, _ = _setup(8, 8, 1, CFG)
  kernel = state.params["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp")  # [D, N, H]: D is largest
  mu = state.opt_state[1][0].mu["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert mu.sharding == kernel.sharding
  assert kernel.addressable_shards[0].data.shape == (4, 4, 8)


@pytest.mark.parametrize("fsdp", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_gradient_accumulation_is_exact(fsdp):
  losses1, params1 = cached_run(8, fsdp, grad_accum=1)
  losses4, params4 = cached_run(8, fsdp, grad_accum=4)
  np.testing.assert_allclose(losses1, losses4, atol=1e-5, rtol=0)
  _assert_close(params1, params4)


def _computations(hlo: str) -> dict[str, str]:
  """HLO module text -> {computation name: its text}."""
  out = {}
  for block in re.split(r"\n(?=\S)", hlo):
    m = re.match(r"(?:ENTRY )?(%[\w.\-]+)", block)
    if m:
      out[m.group(1)] = block
  return out


_REDUCTION = re.compile(r"\b(all-reduce|all-reduce-start|reduce-scatter)\(")


@pytest.mark.parametrize("fsdp", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_accumulation_reduces_the_gradient_once(fsdp):
  mesh, state, step = _setup(8, fsdp, 4, CFG)
  hlo = step.lower(state, sharding.global_batch(synthetic_batch(0), mesh)).compile().as_text()
  comps = _computations(hlo)
  bodies = re.findall(r"body=(%[\w.\-]+)", hlo)
  assert bodies, "no accumulation loop in the compiled step"
  for body in bodies:
    assert not _REDUCTION.search(comps[body]), f"a cross-device reduction inside {body}"
  # Outside the loop: the gradient (every parameter, e.g. the f32[99] MLM output bias) is reduced
  # by exactly one collective, besides the scalar reduction of the batch's masked-LM count.
  grad_reductions = [line for line in hlo.splitlines()
                     if _REDUCTION.search(line) and "f32[99]" in line.split("=", 1)[1]]
  assert len(grad_reductions) == 1, grad_reductions


def test_fsdp_state_bytes_per_device():
  cfg = get_variant("mini", vocab_size=8000, hidden_dropout=0.0, attention_dropout=0.0)
  sharding.MIN_SHARDED_SIZE = 2**14  # the real rule
  sizes = {}
  for fsdp in (1, 8):
    _, state, _ = _setup(8, fsdp, 1, cfg)
    sizes[fsdp] = sharding.bytes_per_device((state.params, state.opt_state))
    del state
  assert sizes[8] <= sizes[1] / 7, sizes


def _planned_bytes(cfg: BertConfig, fsdp: int):
  """(state bytes per device, mesh, abstract state, objective, optimizer), nothing allocated."""
  mesh = sharding.make_mesh(8, fsdp)
  objective = pretraining_objective(cfg, 128, 20)
  tx = optim.make_optimizer("adamw", optim.learning_rate_schedule(1e-4, 10, 100))
  abstract = trainer.abstract_state(objective, tx, mesh)
  shardings = trainer.shardings_of(abstract)
  state_bytes = sharding.planned_bytes_per_device((abstract.params, abstract.opt_state),
                                                  (shardings.params, shardings.opt_state))
  return state_bytes, mesh, abstract, objective, tx


BILLION = BertConfig(vocab_size=30522, hidden_size=2048, num_layers=24, num_heads=16,
                     intermediate_size=8192, scan_layers=True)


@pytest.mark.parametrize("cfg", [get_variant("large"), get_variant("large", scan_layers=True),
                                 BILLION], ids=["large", "large-scanned", "1B-scanned"])
def test_fsdp_plan_for_big_models(cfg):
  sharding.MIN_SHARDED_SIZE = 2**14
  replicated = _planned_bytes(cfg, 1)[0]
  sharded = _planned_bytes(cfg, 8)[0]
  assert sharded <= replicated / 7, (sharded, replicated)


def test_billion_parameter_step_compiles_with_fsdp():
  sharding.MIN_SHARDED_SIZE = 2**14
  _, mesh, abstract, objective, tx = _planned_bytes(BILLION, 8)
  n = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
  assert n > 1e9, n
  step = trainer.jit_train_step(mesh, trainer.shardings_of(abstract), objective=objective,
                                tx=tx, schedule=optim.learning_rate_schedule(1e-4, 10, 100))
  batch = {k: jax.ShapeDtypeStruct((16, *v.shape[1:]), v.dtype,
                                   sharding=sharding.batch_sharded(mesh))
           for k, v in synthetic_batch(0, 16).items()}
  compiled = step.lower(abstract, batch).compile()
  assert compiled.as_text()


@pytest.mark.slow  # CI: tests/test_model.py's scanned outputs and gradients, and the scanned
# checkpoint fine-tuned unrolled in tests/test_finetune_trainer.py
def test_scanned_and_unrolled_encoders_train_alike():
  """Five steps from the same weights, one encoder scanned, the other unrolled."""
  from bert_jax import params as param_trees
  losses, start = {}, None
  for scan in (False, True):
    cfg = CFG.replace(scan_layers=scan)
    mesh, state, step = _setup(2, 1, 1, cfg)
    if scan:
      state = trainer.with_params(state, param_trees.stack_layers(start), tx=_TX)
    else:
      start = jax.device_get(state.params)
    out = []
    for i in range(5):
      state, metrics = step(state, sharding.global_batch(synthetic_batch(i), mesh))
      out.append(float(metrics["loss"]))
    losses[scan] = np.array(out)
  assert param_trees.is_scanned(jax.device_get(state.params))
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=0)


def test_dropout_changes_the_loss():
  assert abs(cached_run(1, cfg=DROPOUT)[0][0] - cached_run(1)[0][0]) > 1e-4


def test_no_weight_decay_on_biases_and_layer_norm():
  params = BertForPreTraining(CFG).init(jax.random.key(0), *[np.zeros((1, 4), np.int32)] * 3,
                                        np.zeros((1, 2), np.int32))["params"]
  mask = optim.decay_mask(params)
  assert mask["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert not mask["bert"]["encoder"]["layer_0"]["attention"]["query"]["bias"]
  assert not mask["bert"]["embeddings"]["layer_norm"]["scale"]
  assert not mask["mlm"]["output_bias"]
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]


def test_gradient_clipping_matches_optax():
  """Our clipping (one multiply by max_norm / max(norm, max_norm)) is optax's, state and all."""
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  norm = float(optax.tree.norm(grads))
  for max_norm in (norm / 3, norm * 2):   # clipped, then left alone
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state = ours.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(grads))
    got, _ = ours.update(grads, state)
    want, _ = theirs.update(grads, theirs.init(grads))
    for k in grads:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0)
    if max_norm > norm:
      assert all(np.array_equal(got[k], grads[k]) for k in grads)
    else:
      np.testing.assert_allclose(float(optax.tree.norm(got)), max_norm, rtol=1e-6)


def test_the_stop_flag_gives_the_signal_handlers_back():
  """Ctrl-C during the loop is a checkpointed stop; a second one stops at once; after the loop
  (predictions, exports) Ctrl-C works as usual again."""
  import os
  import signal

  before = signal.getsignal(signal.SIGINT)
  with trainer.StopFlag() as stop:
    assert signal.getsignal(signal.SIGINT) != before
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT  # flagged: the loop saves and exits at its step's end
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      signal.getsignal(signal.SIGINT)  # (the handler runs between bytecodes)
  assert signal.getsignal(signal.SIGINT) is before
  with trainer.StopFlag():
    pass
  assert signal.getsignal(signal.SIGINT) is before


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Records an earlier run wrote after the checkpoint it resumes from are dropped (those steps
  are trained again), and so is a line cut short by a kill."""
  import json

  from bert_jax.metrics import MetricWriter
  first = MetricWriter(tmp_path)
  for step in range(1, 9):
    first.write(step, {"loss": step})
  first.write(5, {"loss": 0.5}, "eval")
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "ti')  # killed mid-write
  again = MetricWriter(tmp_path, start_step=5)
  for step in range(6, 11):
    again.write(step, {"loss": 10 * step})
  again.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
  assert train == [(s, s) for s in range(1, 6)] + [(s, 10 * s) for s in range(6, 11)]
  assert [r["step"] for r in records if r["split"] == "eval"] == [5]


def test_tensorboard_shows_a_resumed_run_once(tmp_path):
  """TensorBoard (its own reader) shows the steps after the resumed checkpoint from the new run
  only: the earlier run's events past it are purged, in both splits."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from bert_jax.metrics import MetricWriter
  first = MetricWriter(tmp_path)
  for step in range(1, 9):
    first.write(step, {"loss": step})
  first.write(4, {"loss": 0.4}, "eval")
  first.write(8, {"loss": 0.8}, "eval")
  first.close()
  again = MetricWriter(tmp_path, start_step=5)  # in the same second: its own event files
  for step in range(6, 11):
    again.write(step, {"loss": 10 * step})
  again.write(10, {"loss": 1.0}, "eval")
  again.close()

  def shown(split):
    acc = EventAccumulator(str(tmp_path / "tensorboard" / split))
    acc.Reload()
    return [(e.step, round(e.value, 3)) for e in acc.Scalars("loss")]

  assert shown("train") == [(s, s) for s in range(1, 6)] + [(s, 10 * s) for s in range(6, 11)]
  assert shown("eval") == [(4, 0.4), (10, 1.0)]


def test_a_multi_process_run_uses_every_device(monkeypatch):
  """train.num_devices below the devices of a multi-process run would leave a process without
  devices of its own for its rows (a StopIteration on that host, the others waiting)."""
  from bert_jax.errors import ConfigError
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  n = len(jax.devices())
  with pytest.raises(ConfigError, match=rf"train.num_devices=2: a run of 2 processes uses all "
                                        rf"{n} devices \(set 0\)"):
    sharding.make_mesh(2)
  assert sharding.make_mesh(n).devices.size == sharding.make_mesh(0).devices.size == n
