"""Optimizers: AdamW or LAMB with warmup + decay, no weight decay on biases and LayerNorm, global
gradient-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           decay: str = "linear", end_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over `warmup_steps`, then `decay` ("linear", "cosine",
  "constant") to `end_fraction * peak` at `total_steps`."""
  decay_steps = max(total_steps - warmup_steps, 1)
  end = peak * end_fraction
  if decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_fraction)
  elif decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown learning-rate decay {decay!r}: use linear, cosine or constant")
  if warmup_steps <= 0:
    return after
  warm = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: kernels and embeddings; not biases or LayerNorm."""
  def keep(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return not (names[-1] in ("bias", "output_bias") or any("layer_norm" in n for n in names))
  return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the gradients by max_norm / max(global norm, max_norm), as the original BERT does.

  The same clipping as `optax.clip_by_global_norm` and the same (empty) state, so checkpoints
  of either load. optax selects between the gradient and gradient / norm * max_norm per element;
  XLA:CPU then writes the clipped gradients to memory once and its AdamW loops read both copies.
  A multiply by one scalar fuses into those loops instead: AdamW over 22M parameters took 25
  against 46 ms on a 2-core Xeon (below max_norm the factor is exactly 1).
  """
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = max_norm / jnp.maximum(norm, max_norm)
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, like BERT's AdamWeightDecay) or LAMB (large batches)."""
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=decay_mask)
  elif name == "lamb":
    opt = optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=decay_mask)
  else:
    raise ValueError(f"unknown optimizer {name!r}: use adamw or lamb")
  if max_grad_norm:
    return optax.chain(clip_by_global_norm(max_grad_norm), opt)
  return opt
