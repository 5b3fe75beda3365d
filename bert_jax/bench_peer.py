"""The benchmark's peer, in a process of its own: Hugging Face BERT in PyTorch eager (float32, or
bfloat16 under torch.autocast; train mode, AdamW, gradient clipping at 1.0, no gradient
checkpointing) on the very batch our step runs, the whole batch at once. The models are stock, as
users run them: BertForPreTraining computes the last layer and the MLM head at every position,
more FLOPs than our step (bench.peer_flops counts them).

Started by `python -m bert_jax.bench --against hf-torch`, never by hand. It reads the model config
(BertConfig JSON), the batch (.npz) and the task from its arguments, builds the model, prints one
JSON line {"ready": ...}, then answers commands on stdin, one JSON line each:
  run N    -> {"times": [seconds of each of N steps]}
  peaks    -> {"flops": {"float32": FLOP/s, "bfloat16": FLOP/s}, "n": {dtype: n}}: torch's best
              n^3 matmul so far (n 2048, smaller for a dtype too slow for it: TorchMatmulPeak)
  quit
Only torch, transformers and numpy are imported here, so neither side's runtime shares a process
(or its threads and allocator) with the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np


def _hf_config(config: dict[str, Any], **extra: Any):
  import transformers
  return transformers.BertConfig(**extra,
      vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
      num_hidden_layers=config["num_layers"], num_attention_heads=config["num_heads"],
      intermediate_size=config["intermediate_size"], hidden_act="gelu",
      hidden_dropout_prob=config["hidden_dropout"],
      attention_probs_dropout_prob=config["attention_dropout"],
      max_position_embeddings=config["max_position_embeddings"],
      type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"])


def _inputs(task: str, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Our batch keys -> the model's keyword arguments. Pretraining: MLM labels are -100 except at
  the masked positions, so the loss covers the same predictions as ours."""
  import torch
  as_long = lambda x: torch.from_numpy(np.asarray(x, np.int64))  # noqa: E731
  inputs = {"input_ids": as_long(batch["input_ids"]),
            "attention_mask": as_long(batch["input_mask"]),
            "token_type_ids": as_long(batch["segment_ids"])}
  if task == "classification":
    return {**inputs, "labels": as_long(batch["label"])}
  labels = np.full(batch["input_ids"].shape, -100, np.int64)
  rows, cols = np.nonzero(batch["masked_lm_weights"])
  labels[rows, batch["masked_lm_positions"][rows, cols]] = batch["masked_lm_ids"][rows, cols]
  return {**inputs, "labels": as_long(labels),
          "next_sentence_label": as_long(batch["next_sentence_labels"])}


class Runner:
  """The HF model, its optimizer and the batch; `run(n)` times n full training steps."""

  def __init__(self, config: dict[str, Any], task: str, batch: dict[str, np.ndarray],
               num_labels: int = 2, dtype: str = "float32"):
    import contextlib

    import torch
    import transformers
    self.torch = torch
    # bfloat16 as torch users run it: float32 weights and optimizer, matmuls autocast to bf16.
    self.precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
        if dtype == "bfloat16" else contextlib.nullcontext
    torch.manual_seed(0)
    if task == "classification":
      model = transformers.BertForSequenceClassification(
          _hf_config(config, num_labels=num_labels))
    else:
      model = transformers.BertForPreTraining(_hf_config(config))
    self.model = model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6)
    self.inputs = _inputs(task, batch)

  def run(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.opt.zero_grad(set_to_none=True)
      with self.precision():
        loss = self.model(**self.inputs).loss
      loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
      loss.item()
      times.append(time.perf_counter() - start)
    return times


class TorchMatmulPeak:
  """torch's best FLOP/s on an n^3 matmul, float32 and bfloat16, kept over the run. n is 2048,
  or smaller for a dtype so slow that a 2048^3 matmul would take over a second: on a CPU without
  bfloat16 instructions torch's bfloat16 matmul ran at 0.3 GFLOP/s (AMD EPYC, AVX2 only), a
  minute per 2048^3 product."""

  def __init__(self, n: int = 2048, seconds: float = 1.0):
    import torch
    self.torch, self.n, self.seconds = torch, n, seconds
    self.dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    self.operands, self.sizes = {}, {}
    self.best = {name: 0.0 for name in self.dtypes}

  def _time(self, a, b) -> float:
    start = time.perf_counter()
    self.torch.matmul(a, b)
    return time.perf_counter() - start

  def _operands(self, name: str):
    """The dtype's pair of operands, sized on first use from the rate of a 256^3 product."""
    if name not in self.operands:
      randn = lambda n: self.torch.randn(n, n, dtype=self.dtypes[name])  # noqa: E731
      small = randn(256)
      self._time(small, small)
      rate = 2 * 256**3 / self._time(small, small)
      n = self.n
      while n > 256 and 2 * n**3 / rate > self.seconds:
        n //= 2
      self.sizes[name] = n
      self.operands[name] = (randn(n), randn(n))
    return self.operands[name]

  def probe(self, repeats: int = 3) -> dict[str, float]:
    for name in self.dtypes:
      a, b = self._operands(name)
      self.torch.matmul(a, b)
      for _ in range(repeats):
        self.best[name] = max(self.best[name], 2 * self.sizes[name]**3 / self._time(a, b))
    return {"flops": dict(self.best), "n": dict(self.sizes)}


def serve(runner: Runner, peak: TorchMatmulPeak, stdin=sys.stdin, stdout=sys.stdout) -> None:
  for line in stdin:
    command, *args = line.split()
    if command == "run":
      reply = {"times": runner.run(int(args[0]))}
    elif command == "peaks":
      reply = peak.probe()
    elif command == "quit":
      return
    else:
      reply = {"error": f"unknown command {command!r}"}
    print(json.dumps(reply), file=stdout, flush=True)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m bert_jax.bench_peer")
  p.add_argument("--config", required=True, help="BertConfig as JSON")
  p.add_argument("--batch", required=True, help=".npz with the batch's arrays")
  p.add_argument("--task", choices=("pretraining", "classification"), default="pretraining")
  p.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="bfloat16: the forward pass under torch.autocast (float32 weights)")
  p.add_argument("--probe_size", type=int, default=2048, help="n of the n^3 peak matmuls")
  args = p.parse_args(argv)
  import torch
  import transformers
  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  with np.load(args.batch) as f:
    batch = {k: f[k] for k in f.files}
  runner = Runner(json.loads(args.config), args.task, batch, dtype=args.dtype)
  peak = TorchMatmulPeak(args.probe_size)
  print(json.dumps({"ready": {"torch": torch.__version__,
                              "transformers": transformers.__version__,
                              "threads": torch.get_num_threads()}}), flush=True)
  serve(runner, peak)


if __name__ == "__main__":
  main()
