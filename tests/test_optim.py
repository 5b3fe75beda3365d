"""Optimizers: LAMB's layer-wise trust ratio (per layer of a scanned stack, none on biases and
LayerNorm) against the unrolled layout and a numpy reference, and the refused hyperparameters."""

import jax
import numpy as np
import optax
import pytest

from bert_jax import optim, params
from bert_jax.config import get_variant
from bert_jax.errors import ConfigError
from bert_jax.heads import BertForPreTraining

TINY = get_variant("tiny", vocab_size=99, intermediate_size=37, max_position_embeddings=16)


def _random_like(tree, seed: int):
  """A tree of normal draws shaped like `tree`, each leaf at its own scale (float32)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.float32(rng.uniform(0.1, 3)) *
                      rng.normal(size=x.shape).astype(np.float32), tree)


def _updates(tx, weights, grads_per_step):
  """The updates `tx` makes over the steps (the weights moving as in training)."""
  state, update = tx.init(weights), jax.jit(tx.update)
  out = []
  for grads in grads_per_step:
    u, state = update(grads, state, weights)
    weights = optax.apply_updates(weights, u)
    out.append(u)
  return out


def test_lamb_scanned_layers_update_like_unrolled():
  """A scanned tree ([L, ...] leaves under encoder/layers) takes the unrolled layout's step,
  stacked: one trust ratio per layer, not one per stacked array."""
  ids = np.zeros((1, 4), np.int32)
  unrolled = BertForPreTraining(TINY).init(jax.random.key(0), ids, ids, ids,
                                           np.zeros((1, 2), np.int32))["params"]
  stacked = params.stack_layers(unrolled)
  assert (jax.tree.structure(stacked) ==
          jax.tree.structure(params.abstract_params(TINY.replace(scan_layers=True))))
  grads = [_random_like(unrolled, seed) for seed in range(3)]
  tx = optim.make_optimizer("lamb", optim.learning_rate_schedule(1e-2, 0, 10), max_grad_norm=1.0)
  want = _updates(tx, unrolled, grads)
  got = _updates(tx, stacked, [params.stack_layers(g) for g in grads])
  for step, (w, g) in enumerate(zip(want, got, strict=True)):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params.stack_layers(w)),
                            jax.tree.leaves(g), strict=True):
      # Relative to the leaf's largest step: the layouts round the global norm differently.
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * float(np.abs(a).max()),
                                 err_msg=f"step {step}: {jax.tree_util.keystr(path)}")


def _reference_lamb(weights, grads_per_step, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
  """LAMB in numpy (apex FusedLAMB, use_nvlamb=False): Adam with bias correction plus decoupled
  weight decay, scaled by ||w|| / ||update|| per layer; biases and LayerNorm get lr * Adam."""
  flat = {jax.tree_util.keystr(p): np.asarray(w, np.float64)
          for p, w in jax.tree_util.tree_leaves_with_path(weights)}
  m = {k: np.zeros_like(w) for k, w in flat.items()}
  v = {k: np.zeros_like(w) for k, w in flat.items()}
  for t, grads in enumerate(grads_per_step, 1):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      k, g = jax.tree_util.keystr(path), np.asarray(g, np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      if "bias" in k or "layer_norm" in k:
        flat[k] = flat[k] - lr * u
        continue
      u = u + wd * flat[k]
      axes = tuple(range(1, u.ndim)) if "['layers']" in k else None
      ratio = (np.sqrt((flat[k] ** 2).sum(axis=axes, keepdims=True)) /
               np.sqrt((u ** 2).sum(axis=axes, keepdims=True)))
      flat[k] = flat[k] - lr * ratio * u
  return flat


def test_lamb_matches_a_reference_without_trust_ratio_on_biases_and_layer_norm():
  """Biases and LayerNorm (no weight decay) take the plain Adam step times the learning rate;
  the rest the trust-ratio step, per layer for the scanned stack. The state tree is still
  optax.lamb's, so LAMB checkpoints written before restore."""
  rng = np.random.default_rng(0)
  shapes = {"embeddings": {"word_embeddings": {"embedding": (11, 6)},
                           "layer_norm": {"scale": (6,), "bias": (6,)}},
            "encoder": {"layers": {"attention": {"query": {"kernel": (3, 6, 2, 3),
                                                           "bias": (3, 2, 3)}},
                                   "output_layer_norm": {"scale": (3, 6), "bias": (3, 6)}}},
            "pooler": {"dense": {"kernel": (6, 6), "bias": (6,)}}}
  is_shape = lambda s: isinstance(s, tuple)
  weights = jax.tree.map(lambda s: (1 + rng.normal(size=s)).astype(np.float32), {"bert": shapes},
                         is_leaf=is_shape)
  grads = [_random_like(weights, seed) for seed in range(3)]
  lr, wd = 0.05, 0.1
  tx = optim.make_optimizer("lamb", optax.constant_schedule(lr), weight_decay=wd,
                            max_grad_norm=0)
  assert (jax.tree.structure(tx.init(weights)) ==
          jax.tree.structure(optax.lamb(optax.constant_schedule(lr), weight_decay=wd,
                                        mask=optim.decay_mask).init(weights)))
  got = weights
  for u in _updates(tx, weights, grads):
    got = optax.apply_updates(got, u)
  want = _reference_lamb(weights, grads, lr, wd)
  for path, w in jax.tree_util.tree_leaves_with_path(got):
    k = jax.tree_util.keystr(path)
    np.testing.assert_allclose(w, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _schedule(**kw):
  return optim.learning_rate_schedule(**{"peak": 1e-3, "warmup_steps": 2, "total_steps": 10,
                                         **kw})


def _optimizer(**kw):
  return optim.make_optimizer(kw.pop("name", "lamb"), optax.constant_schedule(1e-3), **kw)


@pytest.mark.parametrize("make,kw,needles", [
    (_optimizer, {"max_grad_norm": -1.0}, ["train.max_grad_norm=-1.0", "> 0", "0 for no"]),
    (_optimizer, {"weight_decay": -0.01}, ["train.weight_decay=-0.01", ">= 0"]),
    (_optimizer, {"b1": 1.0}, ["train.b1=1.0", "0 <= b1 < 1"]),
    (_optimizer, {"b2": -0.5}, ["train.b2=-0.5", "0 <= b2 < 1"]),
    (_optimizer, {"eps": 0.0}, ["train.eps=0.0", "> 0"]),
    (_optimizer, {"eps": float("nan")}, ["train.eps=nan", "> 0"]),
    (_optimizer, {"name": "sgd"}, ["train.optimizer='sgd'", "adamw or lamb"]),
    (_schedule, {"warmup_steps": -1}, ["train.warmup_steps=-1", ">= 0"]),
    (_schedule, {"peak": -1e-4}, ["train.learning_rate=-0.0001", ">= 0"]),
    (_schedule, {"end_fraction": 1.5}, ["train.end_lr_fraction=1.5", "0 to 1"]),
    (_schedule, {"end_fraction": -0.1}, ["train.end_lr_fraction=-0.1", "0 to 1"]),
    (_schedule, {"decay": "step"}, ["train.decay='step'", "linear, cosine or constant"]),
], ids=["max_grad_norm<0", "weight_decay<0", "b1=1", "b2<0", "eps=0", "eps=nan", "optimizer",
        "warmup<0", "lr<0", "end_fraction>1", "end_fraction<0", "decay"])
def test_refused_hyperparameters(make, kw, needles):
  with pytest.raises(ConfigError) as info:
    make(**kw)
  for needle in needles:
    assert needle in str(info.value), str(info.value)


def test_a_warmup_longer_than_the_run_never_reaches_the_peak():
  """A short trial of a long recipe (mini's 5,000 warmup steps, 1,000 steps) is allowed."""
  schedule = _schedule(warmup_steps=5000, total_steps=1000)
  assert float(schedule(999)) == pytest.approx(1e-3 * 999 / 5000)
