"""The one trainer behind pretraining and fine-tuning: the train state, the generic jitted step and
the loop (metrics, NaN/Inf checks, preemption, progress, evaluation and checkpoint cadence).

A task describes itself with an `Objective`: which model, which batch keys it reads, and its loss
as sums over the rows of a batch divided by counts over the whole global batch. Dividing by the
global counts is what keeps gradient accumulation and any device count exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bert_jax import faults, files, sharding
from bert_jax.errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: Array  # uint32[2]: base key; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A task's model and loss, as the step needs them.

  model: called as model.apply(params, *[batch[k] for k in inputs], deterministic=...).
  inputs: batch keys passed positionally to the model.
  sums(outputs, batch) -> {name: sum over the rows} (losses, correct counts, counts).
  counts(batch) -> {count name: total over the batch}, computed from the data alone.
  terms: (sum name, count name) pairs; loss = sum over terms of sums[s] / counts[c].
  metrics(sums) -> {name: mean} from sums added over any number of batches.
  example_shapes: {input key: shape of one row} for initialising the parameters.
  """

  model: nn.Module
  inputs: tuple[str, ...]
  sums: Callable[[dict[str, Array], Batch], dict[str, Array]]
  counts: Callable[[Batch], dict[str, Array]]
  terms: tuple[tuple[str, str], ...]
  metrics: Callable[[dict[str, Array]], dict[str, Array]]
  example_shapes: dict[str, tuple[int, ...]]

  def apply(self, params: Any, batch: Batch, *, deterministic: bool,
            rng: Array | None = None) -> dict[str, Array]:
    return self.model.apply({"params": params}, *(batch[k] for k in self.inputs),
                            deterministic=deterministic,
                            rngs=None if rng is None else {"dropout": rng})

  def batch_sums(self, params: Any, batch: Batch, *, deterministic: bool,
                 rng: Array | None = None) -> dict[str, Array]:
    return self.sums(self.apply(params, batch, deterministic=deterministic, rng=rng), batch)

  def loss(self, sums: dict[str, Array], counts: dict[str, Array]) -> Array:
    return sum(sums[s] / jnp.maximum(counts[c], 1.0) for s, c in self.terms)

  def init_params(self, rng: Array) -> Any:
    dummy = [jnp.zeros((1, *self.example_shapes[k]), jnp.int32) for k in self.inputs]
    return self.model.init(rng, *dummy)["params"]


# ----------------------------------------------------------------------------- state


def create_state(objective: Objective, tx: optax.GradientTransformation, seed: int
                 ) -> TrainState:
  """Fresh parameters and optimizer state (run under `jit_create_state` to place them)."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
  params = objective.init_params(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def abstract_state(objective: Objective, tx: optax.GradientTransformation, mesh: Mesh,
                   seed: int = 0) -> TrainState:
  """The train state as ShapeDtypeStructs carrying the shardings of `mesh` (restore target)."""
  shapes = jax.eval_shape(functools.partial(create_state, objective, tx, seed))
  return sharding.with_shardings(shapes, sharding.state_shardings(mesh, shapes))


def shardings_of(abstract: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x.sharding, abstract)


def jit_create_state(mesh: Mesh, objective: Objective, tx: optax.GradientTransformation,
                     seed: int) -> TrainState:
  out = shardings_of(abstract_state(objective, tx, mesh, seed))
  return jax.jit(functools.partial(create_state, objective, tx, seed), out_shardings=out)()


def with_params(state: TrainState, params: Any, tx: optax.GradientTransformation
                ) -> TrainState:
  """`state` restarted from `params` (a fresh optimizer state), laid out like `state`."""
  params = sharding.put(params, jax.tree_util.tree_map(lambda x: x.sharding, state.params))
  opt_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state.opt_state)
  return state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(
      params))


# ----------------------------------------------------------------------------- the step


def _split_micro(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...]; micro-batch j takes rows j, j+k, ... so that every micro-batch
  keeps the rows of every device (no data moves between devices)."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _accumulate(grad_fn, params: Any, batch: Batch, rng: Array, grad_accum: int,
                mesh: Mesh) -> tuple[Any, Any]:
  """Gradients and sums of `grad_accum` micro-batches, reduced across devices once.

  Each micro-batch is cut into one slice per device ([k, S, rows, ...]) and the gradient is
  vmapped over the slices: every device accumulates the gradient of its own rows, unreduced, in
  a [S, ...] buffer split over the devices; one reduction (all-reduce / reduce-scatter) follows
  the loop. The price is one full-size float32 gradient buffer per device. Dropout keys are per
  (micro-batch, slice), so with dropout on the masks depend on the device count.
  """
  shards = mesh.devices.size
  per_shard = NamedSharding(mesh, P(sharding.BATCH_AXES))
  micro = jax.tree_util.tree_map(
      lambda x: x.reshape(grad_accum, shards, x.shape[1] // shards, *x.shape[2:]),
      _split_micro(batch, grad_accum))
  micro = jax.lax.with_sharding_constraint(
      micro, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
  shard_grad = jax.vmap(grad_fn, in_axes=(None, 0, 0))
  keys = lambda j: jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(rng, j), s))(
      jnp.arange(shards))

  def body(acc, inputs):
    j, mb = inputs
    out = shard_grad(params, mb, keys(j))
    acc = jax.tree_util.tree_map(jnp.add, acc, out)
    return jax.lax.with_sharding_constraint(acc, per_shard), None

  shapes = jax.eval_shape(shard_grad, params, jax.tree_util.tree_map(lambda x: x[0], micro),
                          keys(0))
  zeros = jax.lax.with_sharding_constraint(
      jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), per_shard)
  acc, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
  grads, sums = jax.tree_util.tree_map(lambda x: x.sum(0), acc)
  return grads, sums


def train_step(state: TrainState, batch: Batch, *, objective: Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
               grad_accum: int = 1) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer update from one global batch (in `grad_accum` micro-batches)."""
  rng = jax.random.fold_in(state.rng, state.step)
  counts = objective.counts(batch)

  def loss_fn(params, micro, micro_rng):
    sums = objective.batch_sums(params, micro, deterministic=False, rng=micro_rng)
    return objective.loss(sums, counts), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    grads, sums = grad_fn(state.params, batch, rng)
  else:
    grads, sums = _accumulate(grad_fn, state.params, batch, rng, grad_accum, mesh)
    grads = jax.lax.with_sharding_constraint(grads, sharding.state_shardings(mesh, grads))
  with jax.named_scope("optimizer"):  # names the update's ops in profiles (step_profile)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  metrics = {**objective.metrics(sums), "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step)}
  metrics["nonfinite"] = ~(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]))
  metrics["step"] = state.step + 1
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(mesh: Mesh, state_shardings: Any, **kwargs
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
  """`train_step` jitted over `mesh`: the state laid out by `state_shardings` and donated, the
  batch split over every device, the metrics replicated."""
  step = functools.partial(train_step, mesh=mesh, **kwargs)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharded(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def jit_on_batches(mesh: Mesh, fn: Callable[[Any, Batch], Any], param_shardings: Any
                   ) -> Callable[[Any, Batch], Any]:
  """`fn(params, batch)` (evaluation sums, predictions) jitted over `mesh`, results replicated."""
  return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


# ----------------------------------------------------------------------------- the loop


def check_counts(section: Any, minimums: dict[str, int], prefix: str = "train") -> None:
  """Refuses step counts and cadences below their minimum (e.g. `log_every=0`, `steps=-5`,
  `keep_checkpoints=0`, which would delete every checkpoint), naming the field, before anything
  is read, written or compiled."""
  for name, minimum in minimums.items():
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ConfigError(f"{prefix}.{name}={value!r}: expected a whole number >= {minimum}")


def check_workdir_apart(init_from: str, field: str, workdir: Any) -> None:
  """Refuses a workdir that holds the starting point `init_from` (the run would resume or
  overwrite it: its checkpoints rotated away, its exports replaced)."""
  if not init_from or files.is_url(init_from) or files.is_url(workdir):
    return
  start = pathlib.Path(os.fspath(init_from)).resolve()
  work = pathlib.Path(os.fspath(workdir)).resolve()
  if start == work or work in start.parents:
    raise ConfigError(f"--workdir {workdir} holds {field}={init_from}: training there would "
                      "overwrite the starting model; choose another workdir")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume(where: Any, saved: dict | None, config: Any, free: set[str],
                 warned: set[str]) -> None:
  """Compares the settings a checkpoint was trained with (`saved`, the config its meta keeps)
  with this run's `config`: a changed field in `free` (cadence, placement, compute form) passes,
  one in `warned` (optimisation settings a user may mean to change) is logged, and any other
  (the model, its layout, the optimizer, the data, the order of the examples) is refused naming
  the fields: the run would otherwise go on silently as another one. Fields one side lacks (a
  checkpoint older than the field) are not compared."""
  if not saved:
    return
  then, now = _flat(saved), _flat(json.loads(config.to_json()))
  changed = sorted(k for k in then.keys() & now.keys() if then[k] != now[k] and k not in free)
  show = lambda keys: "; ".join(f"{k}={now[k]!r} (the checkpoint's {then[k]!r})" for k in keys)  # noqa: E731
  refused = [k for k in changed if k not in warned]
  if refused:
    raise ConfigError(f"{where} was trained with other settings: {show(refused)}; a resumed run "
                      "keeps them: restore them, or use another workdir")
  if changed and jax.process_index() == 0:
    log.warning("resuming with changed settings: %s", show(changed))


class StopFlag:
  """Set by SIGTERM/SIGINT (single process) or the coordination service's preemption notice
  (several processes: every process stops at the same step). A context manager: the previous
  handlers come back on exit (what follows the loop, e.g. predictions, stops on Ctrl-C as
  usual), and a second signal while stopping takes effect at once."""

  def __init__(self):
    self.signum = 0
    self._previous = {}
    if jax.process_count() == 1:
      self._previous = {sig: signal.signal(sig, self._handle)
                        for sig in (signal.SIGTERM, signal.SIGINT)}

  def __enter__(self) -> StopFlag:
    return self

  def __exit__(self, *exc) -> None:
    self.restore()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, _frame):
    if self.signum:  # a second signal: stop now, without waiting for the step's checkpoint
      self.restore()
      signal.raise_signal(signum)
    self.signum = signum

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum != 0


@jax.jit
def _first_nonfinite(first: Array, metrics: dict[str, Array]) -> Array:
  """The first step whose loss or gradient norm was NaN/Inf (-1: none yet), kept on device."""
  return jnp.where((first < 0) & metrics["nonfinite"], metrics["step"], first)


def _check_finite(first: Array, set_aside: Callable[[int], Any] | None) -> None:
  """Raises NonFiniteLossError naming the first non-finite step, if any (a device read). The
  checkpoint of the step before it, if one was saved, holds the weights that gave the NaN/Inf:
  `set_aside(step)` moves it out of the way of a rerun first."""
  step = int(first)
  if step < 0:
    return
  moved = set_aside(step - 1) if set_aside is not None else None
  if moved is None:
    kept = ", so the checkpoints already written hold finite weights"
  else:
    path, older = moved
    kept = (f"; the checkpoint of step {step - 1}, whose weights gave it, was moved to {path}, "
            + (f"so a rerun resumes from step {older}" if older is not None else
               "and no older checkpoint is kept (train.keep_checkpoints), so a rerun starts "
               "from the beginning"))
  raise NonFiniteLossError(f"step {step}: the loss is NaN or Inf, or the gradient norm is; "
                           f"stopping before any save{kept}")


def _host(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()
          if k not in ("nonfinite", "step")}


@dataclasses.dataclass
class Loop:
  """What the loop runs and when. Callbacks get the 1-based step just completed.

  batch(step) -> this process's rows of the global batch for update `step` + 1 (numpy).
  evaluate(state, step) -> eval metrics (written under split "eval"); called where
    should_evaluate(step) and after the last step.
  save(step, state): writes a checkpoint; called where should_checkpoint(step), after the last
    step and on a preemption signal, always after the NaN/Inf check of that step.
  set_aside(step) -> (where the checkpoint of `step` was moved, the newest step left or None),
    or None if `step` has no checkpoint: called when update `step` + 1 went NaN/Inf (the weights
    of `step` gave it), before the error.
  """

  mesh: Mesh
  step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]
  batch: Callable[[int], dict[str, np.ndarray]]
  total_steps: int
  log_every: int
  should_evaluate: Callable[[int], bool]
  evaluate: Callable[[TrainState, int], dict[str, float]]
  should_checkpoint: Callable[[int], bool]
  save: Callable[[int, TrainState], None]
  writer: Any
  progress_bar: bool = True
  tokens_per_step: int | None = None
  set_aside: Callable[[int], Any] | None = None
  steps_from: str = ""  # the setting total_steps comes from, for messages ("train.steps=N")


class _Window:
  """Wall time of the steps since the last log record."""

  def __init__(self):
    self.restart()

  def restart(self):
    self.start, self.steps = time.perf_counter(), 0

  def rates(self, tokens_per_step: int | None) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    out = {"seconds_per_step": elapsed / max(self.steps, 1)}
    if tokens_per_step:
      out["tokens_per_s"] = tokens_per_step * self.steps / elapsed
    return out


def _progress(loop: Loop, start: int):
  if not (loop.progress_bar and jax.process_index() == 0):
    return None
  from tqdm import tqdm
  return tqdm(total=loop.total_steps, initial=start, unit="step", dynamic_ncols=True)


def _report(bar, step: int, host: dict[str, float]) -> None:
  if bar is not None:
    postfix = {"loss": f"{host['loss']:.4f}"}
    if "tokens_per_s" in host:
      postfix["tok_s"] = f"{host['tokens_per_s']:.0f}"
    bar.set_postfix(postfix)
  elif jax.process_index() == 0:
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in host.items()))


def _sync():
  """Where the loop may read the device: log, evaluation and checkpoint steps."""
  return jax.transfer_guard_device_to_host("allow")


def fit(loop: Loop, state: TrainState) -> tuple[TrainState, dict[str, float]]:
  """Runs updates from `state.step` to `loop.total_steps`. Returns the final state and the last
  logged train metrics merged with the last evaluation (keys "eval_*").

  Metrics leave the device only on log, evaluation and checkpoint steps (the host never waits
  for the device in between): a flag on the device remembers the first step whose loss or
  gradient norm was NaN/Inf, and it is read before anything logs, evaluates or saves the new
  state. A preemption signal saves the current step and exits with 128 + the signal number.
  Device-to-host transfers happen only inside `_sync` (tests run the loop under a transfer guard).
  """
  with _sync():
    step = int(state.step)
    first_bad = jax.device_put(np.int32(-1), sharding.replicated(loop.mesh))
  steps_from = loop.steps_from or f"train.steps={loop.total_steps}"
  if step > loop.total_steps:
    raise ConfigError(f"the workdir's checkpoint is at step {step}, past {steps_from}: a run "
                      "does not train backwards; use another workdir, or train longer")
  if step == loop.total_steps and jax.process_index() == 0:
    log.info("already trained to step %d (%s): nothing left to do", step, steps_from)
  with StopFlag() as stop:
    return _fit(loop, state, step, first_bad, stop)


def _fit(loop: Loop, state: TrainState, step: int, first_bad: Array, stop: StopFlag
         ) -> tuple[TrainState, dict[str, float]]:
  window, bar = _Window(), _progress(loop, step)
  last = {}
  while step < loop.total_steps:
    batch = sharding.global_batch(loop.batch(step), loop.mesh)
    state, metrics = loop.step_fn(state, batch)
    first_bad = _first_nonfinite(first_bad, metrics)
    step += 1
    window.steps += 1
    final = step == loop.total_steps
    stopping = stop.should_stop(step)
    log_now = step % loop.log_every == 0 or final
    eval_now = loop.should_evaluate(step) or final
    save_now = loop.should_checkpoint(step) or final or stopping
    if bar is not None:
      bar.update(1)
    faults.point("trainer.after_step")  # @N: the N-th update of this process applied
    if final:
      faults.point("trainer.final_step")  # trained to the end; not evaluated, not saved
    if not (log_now or eval_now or save_now):
      continue
    with _sync():
      _check_finite(first_bad, loop.set_aside)
      if log_now:
        host = {**_host(metrics), **window.rates(loop.tokens_per_step)}
        loop.writer.write(step, host)
        last = {**{k: v for k, v in last.items() if k.startswith("eval_")}, **host}
        _report(bar, step, host)
        window.restart()
      if eval_now:
        results = loop.evaluate(state, step)
        if results:
          loop.writer.write(step, results, "eval")
          last.update({f"eval_{k}": v for k, v in results.items()})
        window.restart()
        faults.point("trainer.after_eval")  # evaluated (outputs written), not yet saved
      if save_now:
        loop.save(step, state)
        faults.point("trainer.after_save")
    if stopping:
      log.warning("stopped by a signal at step %d; exiting once its checkpoint is written", step)
      raise SystemExit(128 + (stop.signum or signal.SIGTERM))
  if bar is not None:
    bar.close()
  if last and jax.process_index() == 0:
    log.info("finished at step %d: %s", step,
             ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())))
  return state, last
