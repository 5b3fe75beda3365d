"""Step-throughput benchmark: the real pretraining step on synthetic batches built once on device.

  python -m bert_jax.bench --variant mini --batch_size 32 --seq_len 128
  python -m bert_jax.bench --variant tiny,mini --batch_size 8,32 --json -        # JSON lines
  python -m bert_jax.bench --variant mini --batch_size 32 --against hf-torch --pairs 5
  python -m bert_jax.bench --task classification --variant L6-H384-A12 --batch_size 32 \
      --seq_len 64 --against hf-torch   # fine-tuning step vs BertForSequenceClassification

Comma-separated --variant/--batch_size/--seq_len/--dtype/--remat/--grad_accum/--devices/--fsdp
values run every combination; --fsdp N shards parameters and optimizer state over groups of N
devices (`state_bytes_per_device` in the record is what one device holds of them).
MFU is analytic model FLOPs per second over a peak: on CPU the peak is a matmul in the compute
dtype measured in the same run (bfloat16: bfloat16 operands, float32 accumulation); on TPU/GPU
the published dense bf16 peak of the chip.
On CPU, --devices above 1 needs XLA_FLAGS=--xla_force_host_platform_device_count=N.
--variant takes a name of bert_jax.config.VARIANTS or L{layers}-H{hidden}-A{heads} (FFN 4 x hidden).
With --against hf-torch the peer runs in its own process (bert_jax.bench_peer), the two sides
alternating round by round, in the precision of our side unless --peer_dtype says otherwise
(bfloat16: torch.autocast on the CPU), with AdamW on the whole batch (so not with --optimizer
lamb or --grad_accum above 1). Stock Hugging Face BERT computes more per step than ours (the last
layer at every position, the MLM head at all positions): besides the tokens/s ratio the record
gives the peer's model FLOPs (hf_flops_per_step) and the FLOP/s ratio. Every record names the
machine (CPU model, family, model number, stepping and matmul flags, or the accelerator), the
library versions and each framework's float32 and bfloat16 matmul peaks measured in the run.
--json appends to its file, so that several commands collect one file.
--profile DIR traces --profile_steps more steps with the JAX profiler (a TensorBoard/Perfetto
trace per configuration under DIR) and prints where their time goes: op time per part of the
model (matmuls, optimizer, dropout, layer norm, attention, ...), the matmuls' FLOP rate and the
slowest ops (bert_jax.step_profile).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import cli, files, optim, sharding, step_profile, trainer
from bert_jax.config import ATTENTIONS, VARIANTS, BertConfig, get_variant
from bert_jax.errors import ConfigError

# Published dense bf16 peaks per chip (FLOP/s), matched in order against a lower-cased
# device_kind (jax says "TPU v6 lite" for a v6e, "TPU v5 lite" for a v5e, "TPU v5" for a v5p).
PUBLISHED_PEAKS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12),
    ("a100", 312e12), ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12),
)


def default_max_predictions(seq_len: int) -> int:
  """ceil(0.15 * seq_len): 20 at 128 (BERT's value), 77 at 512; integer arithmetic."""
  return -(-15 * seq_len // 100)


def synthetic_batch(batch_size: int, seq_len: int, max_predictions: int, vocab_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A pretraining batch of the keys of `pretrain.pretraining_objective`: lengths in [0.8 T, T]
  (some padding), round(0.15 * length) predictions per row (at most max_predictions), the rest
  weight 0."""
  rng = np.random.default_rng(seed)
  B, T, P = batch_size, seq_len, max_predictions
  lengths = rng.integers(max(int(0.8 * T), min(T, 3)), T + 1, B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  pos, weights = np.zeros((B, P), np.int32), np.zeros((B, P), np.float32)
  for b, n in enumerate(lengths):
    k = min(P, max(1, round(0.15 * n)), n - 2)
    pos[b, :k] = np.sort(rng.choice(np.arange(1, n - 1), k, replace=False))
    weights[b, :k] = 1.0
  ids = rng.integers(1, vocab_size, (B, P))
  return {"input_ids": (rng.integers(1, vocab_size, (B, T)) * mask).astype(np.int32),
          "input_mask": mask,
          "segment_ids": ((np.arange(T)[None] >= lengths[:, None] // 2) * mask).astype(np.int32),
          "masked_lm_positions": pos,
          "masked_lm_ids": (ids * (weights > 0)).astype(np.int32),
          "masked_lm_weights": weights,
          "next_sentence_labels": rng.integers(0, 2, B).astype(np.int32)}


def classification_batch(batch_size: int, seq_len: int, vocab_size: int, num_labels: int = 2,
                         seed: int = 0) -> dict[str, np.ndarray]:
  """A fine-tuning batch (input_ids, input_mask, segment_ids [B, T], label [B]), the padding of
  `synthetic_batch`."""
  b = synthetic_batch(batch_size, seq_len, 1, vocab_size, seed)
  labels = np.random.default_rng(seed + 1).integers(0, num_labels, batch_size).astype(np.int32)
  return {k: b[k] for k in ("input_ids", "input_mask", "segment_ids")} | {"label": labels}


def analytic_flops(config: BertConfig, batch_size: int, seq_len: int,
                   max_predictions: int, task: str = "pretraining") -> int:
  """Useful matmul FLOPs of one training step (3x forward): encoder projections and FFN per
  token, attention scores and context per sequence, the MLM head at the masked slots only and
  NSP (pretraining) or the 2-way classifier, the pooler per sequence. With
  `config.sparse_last_layer` the last layer's queries, output projection and FFN count at the
  [CLS] and the masked slots only, as they run (a scanned encoder of one layer runs it whole).
  Embedding gathers, biases, norms and the optimizer are not counted."""
  D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
  T, P = seq_len, max_predictions
  # keys and values from all T positions; queries, output and FFN at q of them
  layer = lambda q: 2 * T * 2 * D * D + 2 * q * (2 * D * D + 2 * D * F) + 2 * 2 * q * T * D  # noqa: E731
  used = 1 + P if task == "pretraining" else 1
  last = used if config.last_layer_runs_sparse else T
  heads = 2 * (D * D + D * 2)  # pooler, then NSP or the 2-way classifier
  if task == "pretraining":
    heads += 2 * P * (D * D + D * V)
  return 3 * batch_size * ((config.num_layers - 1) * layer(T) + layer(last) + heads)


def peer_flops(config: BertConfig, batch_size: int, seq_len: int,
               task: str = "pretraining") -> int:
  """Model FLOPs of one step of the Hugging Face peer (bench_peer), counted as `analytic_flops`
  counts ours: stock BertForPreTraining runs the last layer at every position and the MLM head
  (transform and decoder) at all seq_len positions, BertForSequenceClassification the last layer
  at every position."""
  return analytic_flops(config.replace(sparse_last_layer=False), batch_size, seq_len, seq_len,
                        task)


def model_config(variant: str, **overrides: Any) -> BertConfig:
  """A named variant, or L{layers}-H{hidden}-A{heads} (e.g. L6-H384-A12, FFN 4 x hidden)."""
  m = re.fullmatch(r"L(\d+)-H(\d+)-A(\d+)", variant)
  if m:
    layers, hidden, heads = map(int, m.groups())
    return BertConfig(num_layers=layers, hidden_size=hidden, num_heads=heads,
                      intermediate_size=4 * hidden, **overrides)
  return get_variant(variant, **overrides)


# /proc/cpuinfo flags that decide the matmul paths of both frameworks on an x86 CPU
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, Any]:
  """The CPU as /proc/cpuinfo names it: "model name" ("AMD EPYC" stands for several
  generations), cpu family, model and stepping (ints, None where absent) and whether each of
  CPU_FLAGS is present (None without a flags line, e.g. off Linux or on ARM)."""
  fields: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if not sep:
          if fields:  # the first processor's block is enough
            break
          continue
        fields.setdefault(key.strip().lower(), value.strip())
  except OSError:
    pass
  number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None  # noqa: E731
  flags = set(fields["flags"].split()) if "flags" in fields else None
  return {"cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
          "cpu_family": number("cpu family"), "cpu_model_number": number("model"),
          "cpu_stepping": number("stepping"),
          "cpu_flags": None if flags is None else {f: f in flags for f in CPU_FLAGS}}


def machine() -> dict[str, Any]:
  """What the figures were measured on: the CPU (cpu_info), the cores this process may use, the
  accelerator kind, the library versions."""
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {**cpu_info(), "cpu_cores": len(os.sched_getaffinity(0)),
          "accelerator": None if jax.default_backend() == "cpu" else jax.devices()[0].device_kind,
          "versions": versions,
          # glibc's malloc settings (the CLI turns on huge pages: cli.use_huge_pages)
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def published_peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((peak for key, peak in PUBLISHED_PEAKS if key in kind), None)


class MatmulPeak:
  """FLOP/s of a jitted [n, n] @ [n, n] (float32 unless told) on every device of a mesh at once,
  accumulated in float32 (bfloat16 operands give float32 results: the form our bfloat16
  matmuls take, and the one XLA:CPU runs on AMX). Each probe keeps the best rate seen: on a
  shared machine, probing before, between and after the timed steps finds the sustained peak
  more reliably than one burst."""

  def __init__(self, mesh, n: int = 2048, dtype: str = "float32"):
    spec = sharding.batch_sharded(mesh)
    a, b = (jax.device_put(jax.random.normal(k, (mesh.devices.size, n, n), dtype), spec)
            for k in jax.random.split(jax.random.PRNGKey(0), 2))
    matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32),
                     out_shardings=spec)
    self._flops = 2 * n**3 * mesh.devices.size
    self._run = lambda: jax.block_until_ready(matmul(a, b))
    self._run()
    self.best = 0.0

  def probe(self, repeats: int = 3) -> float:
    for _ in range(repeats):
      start = time.perf_counter()
      self._run()
      self.best = max(self.best, self._flops / (time.perf_counter() - start))
    return self.best


@functools.cache
def _matmul_peak(num_devices: int, dtype: str = "float32", n: int = 2048) -> MatmulPeak:
  return MatmulPeak(sharding.make_mesh(num_devices), n, dtype)


def xla_matmul_peaks(num_devices: int, n: int = 2048) -> dict[str, float]:
  """XLA's best float32 and bfloat16 n^3 matmul FLOP/s of the run so far, on `num_devices`."""
  return {dtype: _matmul_peak(num_devices, dtype, n).probe() for dtype in ("float32", "bfloat16")}


def peak_flops(mesh, override: float | None, dtype: str = "float32", n: int = 2048
               ) -> tuple[Callable[[], float], str]:
  """(a function giving the peak FLOP/s of the mesh, where the number comes from). On CPU each
  call probes the n^3 matmul in `dtype` again and returns the best rate of the run so far."""
  if override:
    return lambda: override, "flag"
  kind = mesh.devices.flat[0].device_kind
  if jax.default_backend() != "cpu":
    peak = published_peak(kind)
    if peak is None:
      raise ValueError(f"no published peak for device kind {kind!r}: pass --peak_flops")
    return lambda: peak * mesh.devices.size, f"published bf16 peak of {kind}"
  return (_matmul_peak(mesh.devices.size, dtype, n).probe,
          f"measured {dtype} {n}^3 matmul, best of the run")


def peak_memory(mesh) -> tuple[int, str]:
  """(bytes, source): the largest device peak_bytes_in_use, else the process's peak RSS."""
  stats = [d.memory_stats() for d in mesh.devices.flat]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    return max(s["peak_bytes_in_use"] for s in stats), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


class OursRunner:
  """Builds state and batch once, compiles ahead of time, then times steps of the compiled
  executable (blocking on the loss only): no timed step pays for tracing or compiling."""

  def __init__(self, config: BertConfig, mesh, batch: dict[str, np.ndarray], optimizer: str,
               grad_accum: int, task: str = "pretraining"):
    seq_len = batch["input_ids"].shape[1]
    if task == "classification":
      from bert_jax.tasks import classification_objective
      objective = classification_objective(config, 2, seq_len)
    else:
      from bert_jax.pretrain import pretraining_objective
      objective = pretraining_objective(config, seq_len, batch["masked_lm_ids"].shape[1])
    schedule = optim.learning_rate_schedule(1e-4, 10_000, 1_000_000)
    tx = optim.make_optimizer(optimizer, schedule)
    self.state = trainer.jit_create_state(mesh, objective, tx, 0)
    self.state_bytes_per_device = sharding.bytes_per_device((self.state.params,
                                                             self.state.opt_state))
    self.batch = sharding.global_batch(batch, mesh)
    self.step = trainer.jit_train_step(mesh, trainer.shardings_of(self.state),
                                       objective=objective, tx=tx, schedule=schedule,
                                       grad_accum=grad_accum)
    start = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.xla_flops = _xla_flops(self.compiled)

  def run(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - start)
    return times


def _xla_flops(compiled) -> float | None:
  """XLA's FLOP count of the compiled step; None where it has none, or where a while loop of the
  step runs matmuls (--scan_layers, --grad_accum > 1): the cost analysis counts a loop's body
  once. (Dropout's random bits come from small loops without any: they are left to count.)"""
  instrs, comps = step_profile.parse_hlo(compiled.as_text())
  loops = [step_profile.instructions_inside(name, instrs, comps)
           for name, instr in instrs.items() if instr.opcode == "while"]
  if any(i.opcode in ("dot", "convolution", "custom-call") for body in loops for i in body):
    return None
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = cost.get("flops") if cost else None
  return float(flops) if flops and flops > 0 else None


class PeerProcess:
  """The Hugging Face PyTorch side, in its own process (bert_jax.bench_peer), on the same batch:
  pretraining or classification, eager float32 (or under bfloat16 autocast), AdamW, clipping at
  1.0."""

  def __init__(self, config: BertConfig, batch: dict[str, np.ndarray], task: str,
               dtype: str = "float32", probe_size: int = 2048):
    self.dtype = dtype
    for module in ("torch", "transformers"):
      if importlib.util.find_spec(module) is None:
        raise ValueError(f"--against hf-torch needs torch and transformers ({module} is not "
                         "installed): pip install torch transformers")
    self._dir = tempfile.TemporaryDirectory(prefix="bert_jax_bench_")
    path = os.path.join(self._dir.name, "batch.npz")
    np.savez(path, **batch)
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "bert_jax.bench_peer", "--config", config.to_json(),
         "--batch", path, "--task", task, "--dtype", dtype, "--probe_size", str(probe_size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    self.info = self._read()["ready"]

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the benchmark's peer process ended (exit {self.proc.wait()})")
    return json.loads(line)

  def _ask(self, command: str) -> dict[str, Any]:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def run(self, steps: int) -> list[float]:
    return self._ask(f"run {steps}")["times"] if steps else []

  def peaks(self) -> dict[str, dict[str, float]]:
    return self._ask("peaks")

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
    self._dir.cleanup()


def _step_stats(times: list[float], tokens: int, sequences: int) -> dict[str, float]:
  median = statistics.median(times)
  return {"step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
          "sequences_per_s": sequences / median, "tokens_per_s": tokens / median}


def _compare(ours: OursRunner, theirs: PeerProcess, opts: argparse.Namespace, tokens: int,
             probe_peak: Callable[[], float], flops: tuple[int, int]) -> dict[str, Any]:
  """A B A B ...: --pairs rounds of --steps timed steps each; per round the tokens/s ratio
  (`ratios`, same tokens) and the FLOP/s ratio (`equal_work_ratios`: the time ratio times our
  FLOPs over the peer's, `flops` = (ours, peer's) per step, as the peer computes more for the same
  tokens). One side runs while the other waits in its own process.

  Each side first runs --switch_warmup untimed steps in every round: the first step after the
  other framework ran is slow for both (base, batch 8: ours 5.1 s against 3.9 s, theirs 5.6 s
  against 5.1 s; sleeping between them does not help), so timing it would measure the switch."""
  theirs.run(opts.warmup)
  our_times, hf_times, ratios = [], [], []
  for _ in range(opts.pairs):
    ours.run(opts.switch_warmup)
    a = ours.run(opts.steps)
    theirs.run(opts.switch_warmup)
    b = theirs.run(opts.steps)
    probe_peak()
    our_times += a
    hf_times += b
    ratios.append(statistics.median(b) / statistics.median(a))
  equal_work = [r * flops[0] / flops[1] for r in ratios]
  return {"our_step_times": our_times, "against": "hf-torch", "peer_process": theirs.proc.pid,
          "peer_dtype": theirs.dtype, "peer_remat": "none",  # HF's gradient checkpointing off
          "hf_tokens_per_s": tokens / statistics.median(hf_times),
          "hf_step_s_median": statistics.median(hf_times),
          "hf_flops_per_step": flops[1],
          "hf_achieved_flops_per_s": flops[1] / statistics.median(hf_times),
          **{f"torch_matmul_peak_{k}": v for k, v in theirs.peaks().items()},  # flops, n
          "torch_threads": theirs.info["threads"],
          "ratios": ratios, "ratio_median": statistics.median(ratios),
          "equal_work_ratios": equal_work, "equal_work_ratio_median": statistics.median(equal_work)}


def _label(*values: Any) -> str:
  """A directory name for one configuration: its values joined by '_'."""
  return "_".join(str(v) for v in values)


def bench_one(opts: argparse.Namespace, variant: str, batch_size: int, seq_len: int, dtype: str,
              remat: str, grad_accum: int, devices: int, fsdp: int, attention: str = "einsum"
              ) -> dict[str, Any]:
  """Compiles and times one configuration; returns its record."""
  if batch_size % (devices * grad_accum):  # sizes are positive (parse_args)
    raise ValueError(f"batch_size {batch_size} must be divisible by devices * grad_accum = "
                     f"{devices} * {grad_accum}")
  fused = {"attention_dropout": 0.0} if attention == "dot_product" else {}  # no dropout
  config = model_config(variant, dtype=dtype, remat=remat, scan_layers=opts.scan_layers,
                        attention=attention, sparse_last_layer=opts.sparse_last_layer, **fused,
                        **({"vocab_size": opts.vocab_size} if opts.vocab_size else {}))
  if seq_len > config.max_position_embeddings:
    raise ValueError(f"--seq_len {seq_len} exceeds the position table "
                     f"({config.max_position_embeddings})")
  classify = opts.task == "classification"
  preds = 0 if classify else opts.max_predictions or default_max_predictions(seq_len)
  mesh = sharding.make_mesh(devices, fsdp)
  probe_peak, peak_source = peak_flops(mesh, opts.peak_flops, config.compute_dtype.name,
                                       opts.probe_size)
  probe_peak()
  batch = (classification_batch(batch_size, seq_len, config.vocab_size) if classify else
           synthetic_batch(batch_size, seq_len, preds, config.vocab_size))
  ours = OursRunner(config, mesh, batch, opts.optimizer, grad_accum, opts.task)
  ours.run(opts.warmup)
  tokens = batch_size * seq_len
  flops = analytic_flops(config, batch_size, seq_len, preds, opts.task)
  if opts.against:
    ours_bf16 = config.compute_dtype == jnp.bfloat16
    peer_dtype = opts.peer_dtype if opts.peer_dtype != "same" else (
        "bfloat16" if ours_bf16 else "float32")
    theirs = PeerProcess(config, batch, opts.task, peer_dtype, opts.probe_size)
    try:
      extra = _compare(ours, theirs, opts, tokens, probe_peak,
                       (flops, peer_flops(config, batch_size, seq_len, opts.task)))
    finally:
      theirs.close()
    times = extra.pop("our_step_times")
  else:
    extra, times = {}, ours.run(opts.steps)
  if opts.profile:
    extra["profile"] = step_profile.profile_steps(
        ours.run, ours.compiled.as_text(), os.path.join(opts.profile, _label(
            variant, batch_size, seq_len, config.compute_dtype.name, remat, grad_accum, devices,
            fsdp, attention)), opts.profile_steps, devices=len(mesh.local_devices))
  peak = probe_peak()
  stats = _step_stats(times, tokens, batch_size)
  memory, memory_source = peak_memory(mesh)
  achieved = flops / stats["step_s_median"]
  return {"task": opts.task, "variant": variant, "batch_size": batch_size, "seq_len": seq_len,
          "layers": config.num_layers, "hidden": config.hidden_size, "heads": config.num_heads,
          "vocab_size": config.vocab_size,
          "max_predictions": preds, "dtype": config.compute_dtype.name, "remat": remat,
          "attention_dropout": config.attention_dropout, "grad_accum": grad_accum,
          "optimizer": opts.optimizer, "attention": attention, "devices": devices,
          "fsdp": fsdp, "scan_layers": opts.scan_layers,
          "sparse_last_layer": config.sparse_last_layer,
          "state_bytes_per_device": ours.state_bytes_per_device,
          "backend": jax.default_backend(), "device_kind": mesh.devices.flat[0].device_kind,
          **machine(), "compile_s": ours.compile_s, "steps": len(times), **stats,
          "flops_per_step_analytic": flops, "flops_per_step_xla": ours.xla_flops,
          "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "peak_source": peak_source,
          "mfu": achieved / peak, "mfu_fastest_step": flops / stats["step_s_min"] / peak,
          "xla_matmul_peak_flops": (xla_matmul_peaks(devices, opts.probe_size)
                                    if jax.default_backend() == "cpu" else None),
          "peak_memory_bytes": memory,
          "peak_memory_source": memory_source,
          # the ahead-of-time compilation, and any of the jitted step (none: run() calls the
          # compiled executable, which refuses other shapes rather than recompiling)
          "compiles": 1 + ours.step._cache_size(), **extra}


_COLUMNS = (("variant", "{}"), ("batch_size", "{}"), ("seq_len", "{}"), ("dtype", "{}"),
            ("attention", "{}"), ("remat", "{}"), ("grad_accum", "{}"), ("devices", "{}"),
            ("fsdp", "{}"), ("state_bytes_per_device", "{:.3g}"), ("compile_s", "{:.1f}"),
            ("step_s_median", "{:.4f}"), ("step_s_min", "{:.4f}"), ("step_s_max", "{:.4f}"),
            ("sequences_per_s", "{:.1f}"), ("tokens_per_s", "{:.0f}"),
            ("flops_per_step_analytic", "{:.3g}"), ("flops_per_step_xla", "{:.3g}"),
            ("mfu", "{:.1%}"), ("peak_memory_bytes", "{:.3g}"),
            ("hf_tokens_per_s", "{:.0f}"), ("ratio_median", "{:.2f}"),
            ("equal_work_ratio_median", "{:.2f}"))


def format_table(records: list[dict[str, Any]]) -> str:
  cols = [(k, f) for k, f in _COLUMNS if any(k in r for r in records)]
  rows = [[k for k, _ in cols]]
  rows += [[f.format(r[k]) if r.get(k) is not None else "-" for k, f in cols] for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _csv(kind):
  return lambda text: [kind(v) for v in text.split(",")]


def _bool(text: str) -> bool:
  if text.lower() not in ("0", "1", "false", "true", "no", "yes"):
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
  return text.lower() in ("1", "true", "yes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=cli.prog("bert_jax.bench"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("pretraining", "classification"), default="pretraining",
                 help="the pretraining step or the sequence-classification fine-tuning step")
  p.add_argument("--variant", type=_csv(str), default=["mini"],
                 help=f"of {list(VARIANTS)}, or L{{layers}}-H{{hidden}}-A{{heads}}")
  p.add_argument("--batch_size", type=_csv(int), default=[32], help="global batch size")
  p.add_argument("--seq_len", type=_csv(int), default=[128])
  p.add_argument("--max_predictions", type=int, default=0, help="0: ceil(0.15 * seq_len)")
  p.add_argument("--vocab_size", type=int, default=0,
                 help="0: BERT's 30522; set to a tokenizer's size to match a train.py run")
  p.add_argument("--steps", type=int, default=10, help="timed steps (per round with --against)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compiling (at least 1: the first step is slow)")
  p.add_argument("--dtype", type=_csv(str), default=["auto"],
                 help="compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, ...")
  p.add_argument("--remat", type=_csv(str), default=["none"],
                 help="policy: none, full, dots_saveable, dots_with_no_batch_dims_saveable")
  p.add_argument("--scan_layers", type=_bool, default=False, help="nn.scan over the layers")
  p.add_argument("--sparse_last_layer", type=_bool, default=True,
                 help="the last layer at the [CLS] and masked positions only (false: everywhere)")
  p.add_argument("--devices", type=_csv(int), default=None, help="default: all devices")
  p.add_argument("--fsdp", type=_csv(int), default=[1],
                 help="devices per FSDP group (1: replicated data parallelism)")
  p.add_argument("--grad_accum", type=_csv(int), default=[1])
  p.add_argument("--optimizer", choices=("adamw", "lamb"), default="adamw")
  p.add_argument("--attention", type=_csv(str), default=["einsum"],
                 help="einsum and/or dot_product: jax.nn.dot_product_attention (cuDNN on GPU), "
                      "no attention dropout")
  p.add_argument("--peak_flops", type=float, default=None, help="override the peak, FLOP/s")
  p.add_argument("--probe_size", type=int, default=2048,
                 help="n of the n^3 matmuls that measure both frameworks' peaks on CPU")
  p.add_argument("--json", default=None,
                 help="append a JSON line per configuration to this file ('-': stdout)")
  p.add_argument("--profile", default=None,
                 help="trace steps with the JAX profiler into this directory (local or gs://) "
                      "and print where their time goes")
  p.add_argument("--profile_steps", type=int, default=2, help="steps traced with --profile")
  p.add_argument("--against", choices=("hf-torch",), default=None)
  p.add_argument("--peer_dtype", choices=("same", "float32", "bfloat16"), default="same",
                 help="the peer's precision: same as ours, float32, or bfloat16 (torch.autocast)")
  p.add_argument("--pairs", type=int, default=3, help="A/B rounds with --against")
  p.add_argument("--switch_warmup", type=int, default=1,
                 help="untimed steps each side runs in every A/B round before its timed steps")
  opts = p.parse_args(argv)
  for kind in opts.attention:
    if kind not in ATTENTIONS:
      p.error(f"--attention: {kind!r} is not one of {', '.join(ATTENTIONS)}")
  unmatched = ([f"--optimizer {opts.optimizer}"] if opts.optimizer != "adamw" else []) + (
      [f"--grad_accum {max(opts.grad_accum)}"] if max(opts.grad_accum) > 1 else [])
  if opts.against and unmatched:
    p.error(f"--against {opts.against} runs the peer with AdamW on the whole batch at once; "
            f"{' and '.join(unmatched)} would time different work: leave them out")
  for flag, least in (("batch_size", 1), ("seq_len", 1), ("grad_accum", 1), ("fsdp", 1),
                      ("devices", 1), ("steps", 1), ("pairs", 1), ("profile_steps", 1),
                      ("warmup", 1), ("switch_warmup", 0), ("max_predictions", 0),
                      ("vocab_size", 0), ("probe_size", 16)):
    values = getattr(opts, flag)  # a list for the comma-separated flags; devices may be None
    for value in values if isinstance(values, list) else [least if values is None else values]:
      if value < least:
        raise ConfigError(f"--{flag} {value}: expected "
                          + ({0: "0 or more", 1: "a positive number"}.get(least)
                             or f"{least} or more"))
  if opts.profile and not files.is_url(opts.profile) and os.path.isfile(opts.profile):
    raise ConfigError(f"--profile {opts.profile}: is a file; expected a directory for the traces")
  return opts


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs every combination of the comma-separated flags; prints a table; returns the records."""
  opts = parse_args(argv)
  devices = opts.devices or [jax.device_count()]
  for n, fsdp in itertools.product(devices, opts.fsdp):
    if n % fsdp:
      raise ConfigError(f"--fsdp {fsdp} does not divide --devices {n}"
                        + ("" if opts.devices else " (every device of this host)"))
  out = None if not opts.json else sys.stdout if opts.json == "-" else open(opts.json, "a")
  records = []
  try:
    for combo in itertools.product(opts.variant, opts.batch_size, opts.seq_len, opts.dtype,
                                   opts.remat, opts.grad_accum, devices, opts.fsdp,
                                   opts.attention):
      records.append(bench_one(opts, *combo))
      if out:
        print(json.dumps(records[-1]), file=out, flush=True)
  finally:
    if out and out is not sys.stdout:
      out.close()
  text = sys.stderr if out is sys.stdout else sys.stdout
  print(format_table(records), file=text)
  for r in records:
    if "profile" in r:
      print(f"\n{_label(r['variant'], r['batch_size'], r['seq_len'], r['dtype'])}: "
            + step_profile.format_breakdown(r["profile"], r["peak_flops_per_s"] / r["devices"]),
            file=text)
  return records


if __name__ == "__main__":
  cli.use_huge_pages()
  cli.run(main)
