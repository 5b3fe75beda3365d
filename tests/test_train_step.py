"""The pretraining step: exact data parallelism, exact gradient accumulation, one compile."""

import functools

import jax
import numpy as np

from bert_jax import optim, sharding, train_step
from bert_jax.config import BertConfig
from bert_jax.heads import BertForPreTraining

CFG = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                 max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
B, T, P = 16, 24, 5


def synthetic_batch(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.ones((B, T), np.int32)
  lengths = rng.integers(P + 2, T + 1, B)
  mask[np.arange(T)[None] >= lengths[:, None]] = 0
  pos = np.stack([np.sort(rng.choice(np.arange(1, n - 1), P, replace=False)) for n in lengths])
  weights = np.ones((B, P), np.float32)
  weights[::3, -2:] = 0.0
  return {"input_ids": (rng.integers(5, 99, (B, T)) * mask).astype(np.int32),
          "input_mask": mask,
          "segment_ids": ((np.arange(T)[None] > lengths[:, None] // 2) * mask).astype(np.int32),
          "masked_lm_positions": (pos * (weights > 0)).astype(np.int32),
          "masked_lm_ids": (rng.integers(5, 99, (B, P)) * (weights > 0)).astype(np.int32),
          "masked_lm_weights": weights,
          "next_sentence_labels": rng.integers(0, 2, B).astype(np.int32)}


def run(num_devices: int, grad_accum: int = 1, steps: int = 3, cfg: BertConfig = CFG):
  mesh = sharding.make_mesh(num_devices)
  model = BertForPreTraining(cfg)
  schedule = optim.learning_rate_schedule(1e-3, 1, 10)
  tx = optim.make_optimizer("adamw", schedule)
  state = train_step.jit_create_state(mesh, model, tx, 0, T, P)
  step = train_step.jit_pretraining_step(mesh, model=model, tx=tx, schedule=schedule,
                                         grad_accum=grad_accum)
  losses = []
  for i in range(steps):
    state, metrics = step(state, sharding.global_batch(synthetic_batch(i), mesh))
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1  # compiled once, never retraced
  return np.array(losses), jax.device_get(state.params)


cached_run = functools.lru_cache(run)


def _assert_close(a, b, atol=1e-5):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


DROPOUT = CFG.replace(hidden_dropout=0.1, attention_dropout=0.1)


def test_eight_devices_equal_one():
  # With dropout on: the step keys give the same masks whatever the device count.
  losses1, params1 = cached_run(1, cfg=DROPOUT)
  losses8, params8 = cached_run(8, cfg=DROPOUT)
  assert np.all(np.isfinite(losses1)) and losses1[-1] != losses1[0]
  np.testing.assert_allclose(losses1, losses8, atol=1e-5, rtol=0)
  _assert_close(params1, params8)


def test_gradient_accumulation_is_exact():
  losses1, params1 = cached_run(2, grad_accum=1)
  losses4, params4 = cached_run(2, grad_accum=4)
  np.testing.assert_allclose(losses1, losses4, atol=1e-5, rtol=0)
  _assert_close(params1, params4)


def test_dropout_changes_the_loss():
  assert abs(cached_run(1, cfg=DROPOUT)[0][0] - cached_run(2, grad_accum=1)[0][0]) > 1e-4


def test_no_weight_decay_on_biases_and_layer_norm():
  params = BertForPreTraining(CFG).init(jax.random.key(0), *[np.zeros((1, 4), np.int32)] * 3,
                                        np.zeros((1, 2), np.int32))["params"]
  mask = optim.decay_mask(params)
  assert mask["bert"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert not mask["bert"]["encoder"]["layer_0"]["attention"]["query"]["bias"]
  assert not mask["bert"]["embeddings"]["layer_norm"]["scale"]
  assert not mask["mlm"]["output_bias"]
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]
