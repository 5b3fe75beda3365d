"""The train state and the pure pretraining train/eval steps, jitted over a mesh.

Batches are dicts of fixed-shape arrays (global batch B, sequence T, predictions P):
input_ids, input_mask, segment_ids [B, T] int32; masked_lm_positions, masked_lm_ids [B, P] int32;
masked_lm_weights [B, P] float32; next_sentence_labels [B] int32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bert_jax import losses, sharding

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: Array  # uint32[2]: base key; step keys are fold_in(rng, step)


def create_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                 seq_len: int, num_predictions: int) -> TrainState:
  """Fresh parameters and optimizer state (call under jit with replicated out_shardings)."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  ids = jnp.zeros((1, seq_len), jnp.int32)
  pos = jnp.zeros((1, num_predictions), jnp.int32)
  params = model.init(init_rng, ids, ids, ids, pos)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def _pretraining_forward(model: nn.Module, params: Any, batch: Batch, deterministic: bool,
                         rng: Array | None) -> dict[str, Array]:
  out = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                    batch["input_mask"], batch["masked_lm_positions"],
                    deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
  return losses.pretraining_sums(out, batch)


def _split_micro(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, ... so every micro-batch stays
  spread over all devices of the `data` axis."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def pretraining_step(state: TrainState, batch: Batch, *, model: nn.Module,
                     tx: optax.GradientTransformation, schedule: optax.Schedule,
                     grad_accum: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update from one global batch (split into `grad_accum` micro-batches).

  The loss is MLM loss (mean over real masked positions) + NSP loss (mean over sequences), with
  denominators taken over the whole global batch so that accumulation is exact.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  mlm_den = jnp.maximum(jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)), 1.0)
  nsp_den = jnp.float32(batch["next_sentence_labels"].shape[0])

  def loss_fn(params, micro, micro_rng):
    sums = _pretraining_forward(model, params, micro, False, micro_rng)
    return sums["mlm_loss"] / mlm_den + sums["nsp_loss"] / nsp_den, sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    grads, sums = grad_fn(state.params, batch, rng)
  else:
    def body(acc, inputs):
      j, micro = inputs
      g, s = grad_fn(state.params, micro, jax.random.fold_in(rng, j))
      return jax.tree_util.tree_map(jnp.add, acc, (g, s)), None

    zeros = jax.eval_shape(grad_fn, state.params, batch, rng)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
    (grads, sums), _ = jax.lax.scan(
        body, zeros, (jnp.arange(grad_accum), _split_micro(batch, grad_accum)))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**losses.pretraining_metrics(sums), "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def pretraining_eval_sums(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, Array]:
  """Deterministic loss/accuracy sums for one batch (add over batches, then
  `losses.pretraining_metrics`)."""
  return _pretraining_forward(model, params, batch, True, None)


def jit_pretraining_step(mesh: Mesh, **kwargs) -> Callable[[TrainState, Batch], Any]:
  """`pretraining_step` jitted over `mesh`: state replicated and donated, batch on `data`."""
  step = functools.partial(pretraining_step, **kwargs)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=(0,))


def jit_eval_sums(mesh: Mesh, model: nn.Module) -> Callable[[Any, Batch], dict[str, Array]]:
  fn = functools.partial(pretraining_eval_sums, model=model)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def jit_create_state(mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation, seed: int,
                     seq_len: int, num_predictions: int) -> TrainState:
  fn = functools.partial(create_state, model, tx, seed, seq_len, num_predictions)
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))()
