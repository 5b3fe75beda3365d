"""What packing buys, measured: padded against packed, each side in its own process, alternating.

  python -m bert_jax.bench_packing pretraining --seq_len 512 --variant tiny --batch_size 8
  python -m bert_jax.bench_packing classification --tokenizer tok.model \\
      --train_file train.tsv --eval_file dev.tsv --seeds 0,1,2 -- --config.train.learning_rate=1e-4
  python -m bert_jax.bench_packing squad --tokenizer tok.model --max_seq_length 384 \\
      --train_file train.json --eval_file dev.json --seeds 0 -- --config.train.epochs=1

`pretraining` makes the data of the BERT recipe from a corpus (default: the bundled one) twice,
padded and packed (`--pack`), then times the real train step on batches of each (same model,
same rows x seq_len tokens per step) and reports real (non-padding) tokens per second, the
packed/padded ratio per alternating pair and its median, and `same_step_time_bound`: the ratio
of the two sides' real-token shares, what packing gives when a packed step costs what a padded
one does (every row computed densely), so the padding of the corpus caps it.
`classification` and `squad` run finetune.py with and without `data.packing` for each seed (the
same examples per update, epochs and learning rate; arguments after `--` go to both) and report
the wall time of each run and the best dev accuracy (SQuAD: F1 and exact match). Every record
names the machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bert_jax import files
from bert_jax.errors import BertJaxError, ConfigError


def _pretraining_worker(data_dir: str, variant: str, batch_size: int, steps: int,
                        warmup: int) -> dict[str, Any]:
  """Times `steps` train steps (after `warmup`) of the step compiled ahead of time, on the
  batches of one prepared data set."""
  import jax
  import numpy as np

  from bert_jax import optim, sharding, trainer
  from bert_jax.config import get_variant
  from bert_jax.data.loader import PretrainingLoader
  from bert_jax.pretrain import pretraining_objective
  loader = PretrainingLoader(data_dir, "train", batch_size, seed=0)
  m = loader.manifest
  bert = get_variant(variant, vocab_size=m["vocab_size"],
                     max_position_embeddings=max(512, m["max_seq_length"]))
  objective = pretraining_objective(bert, m["max_seq_length"], m["max_predictions_per_seq"],
                                    m["max_examples_per_row"] if m.get("packed") else 0)
  mesh = sharding.make_mesh(1)
  schedule = optim.learning_rate_schedule(1e-4, 10, 1000)
  tx = optim.make_optimizer("adamw", schedule)
  state = trainer.jit_create_state(mesh, objective, tx, 0)
  step = trainer.jit_train_step(mesh, trainer.shardings_of(state), objective=objective, tx=tx,
                                schedule=schedule)
  batches = [next(loader) for _ in range(warmup + steps)]
  real = sum(int((b["input_mask"][:] > 0).sum()) for b in batches[warmup:])
  device_batches = [sharding.global_batch(b, mesh) for b in batches]
  step = step.lower(state, device_batches[0]).compile()  # every batch has the same shapes
  for b in device_batches[:warmup]:
    state, _ = step(state, b)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for b in device_batches[warmup:]:
    state, metrics = step(state, b)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  rows = batch_size * steps
  return {"seconds_per_step": seconds / steps,
          "real_tokens_per_s": real / seconds,
          "tokens_per_s": rows * m["max_seq_length"] / seconds,
          "real_share": real / (rows * m["max_seq_length"]),
          "examples_per_s": (sum(float(np.sum(b.get("example_mask", np.ones(batch_size))))
                                 for b in batches[warmup:]) / seconds),
          "loss": float(metrics["loss"])}


def _child(argv: list[str], what: str) -> str:
  """Runs one side's process in this directory (relative paths stay valid); its stdout. A failed
  run stops the bench with the run named and the end of its error output."""
  out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
  if out.returncode:
    tail = "\n".join(out.stderr.strip().splitlines()[-15:])
    raise BertJaxError(f"{what} failed (exit {out.returncode}):\n{tail}")
  return out.stdout


def _spawn(args: list[str]) -> dict[str, Any]:
  out = _child(["-m", "bert_jax.bench_packing", *args], f"the timing run on {args[1]}")
  return json.loads(out.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
  return {k: statistics.median(r[k] for r in runs) for k in keys}


def bench_pretraining(a: argparse.Namespace) -> dict[str, Any]:
  from bert_jax import bench, tokenizer
  from bert_jax.data import pretraining
  if files.is_url(a.workdir):
    raise BertJaxError(f"--workdir {a.workdir}: the pretraining bench writes and memory-maps its "
                       "data shards locally; give a local directory")
  work = pathlib.Path(a.workdir)
  corpus = a.corpus or str(pretraining.default_corpus_path())
  tok = a.tokenizer
  if not tok:
    tok = str(work / "tokenizer.model")
    if not pathlib.Path(tok).exists():
      tokenizer.train_sentencepiece([corpus], 8000, str(work / "tokenizer"))
  manifests = {}
  for side in ("padded", "packed"):
    out = work / f"{side}_{a.seq_len}"
    if not (out / pretraining.MANIFEST).exists():
      pretraining.create_pretraining_data(
          [corpus], tok, str(out), max_seq_length=a.seq_len,
          max_predictions_per_seq=bench.default_max_predictions(a.seq_len), dupe_factor=1,
          pack=side == "packed", max_examples_per_row=a.max_examples_per_row)
    manifests[side] = pretraining.read_manifest(out)
  runs: dict[str, list] = {"padded": [], "packed": []}
  for _ in range(a.repeats):
    for side in runs:
      runs[side].append(_spawn(["_pretraining_worker", str(work / f"{side}_{a.seq_len}"),
                                a.variant, str(a.batch_size), str(a.steps), str(a.warmup)]))
  keys = ("seconds_per_step", "real_tokens_per_s", "tokens_per_s", "real_share",
          "examples_per_s")
  result = {"bench": "packing/pretraining", **bench.machine(), "variant": a.variant,
            "seq_len": a.seq_len, "batch_size": a.batch_size, "steps": a.steps,
            "repeats": a.repeats, "corpus": corpus,
            "padding_share_unpacked": manifests["padded"]["splits"]["train"]["padding_share"],
            "padding_share_packed": manifests["packed"]["splits"]["train"]["padding_share"],
            "padded": _summary(runs["padded"], keys), "packed": _summary(runs["packed"], keys)}
  pairs = [b["real_tokens_per_s"] / a["real_tokens_per_s"]
           for a, b in zip(runs["padded"], runs["packed"], strict=True)]
  result["real_tokens_per_s_ratio_per_pair"] = pairs
  result["real_tokens_per_s_ratio"] = statistics.median(pairs)
  result["step_time_ratio"] = (result["packed"]["seconds_per_step"]
                               / result["padded"]["seconds_per_step"])
  # What packing gives a step that costs the same packed or padded (dense compute per row).
  result["same_step_time_bound"] = (result["packed"]["real_share"]
                                    / result["padded"]["real_share"])
  return result


METRICS = {"classification": ("accuracy",), "squad": ("f1", "exact_match")}


def _finetune(a: argparse.Namespace, seed: int, packed: bool, extra: list[str]
              ) -> dict[str, Any]:
  workdir = files.path(a.workdir) / f"{'packed' if packed else 'padded'}_seed{seed}"  # or gs://
  if workdir.exists():
    workdir.rmtree()
  from bert_jax import cli
  config = pathlib.Path(cli.configs_dir()) / ("classify.py" if a.task == "classification"
                                              else "squad.py")
  flags = [f"--config={config}", f"--workdir={workdir}",
           f"--config.data.train_file={a.train_file}", f"--config.data.eval_file={a.eval_file}",
           f"--config.data.packing={packed}", f"--config.train.seed={seed}",
           f"--config.data.max_seq_length={a.max_seq_length}",
           "--config.train.progress_bar=False"]
  flags += [f"--config.tokenizer={a.tokenizer}"] if a.tokenizer else []
  flags += [f"--config.init_from={a.init_from}"] if a.init_from else []
  start = time.perf_counter()
  # bert-jax-finetune (finetune.py), found in a checkout and in an installed wheel alike
  command = "from bert_jax.commands import finetune_command; finetune_command()"
  _child(["-c", command, *flags, *extra], f"the fine-tuning run in {workdir}")
  wall = time.perf_counter() - start
  best = json.loads((workdir / "eval_results.json").read_text())
  return {"seed": seed, "packed": packed, "wall_s": wall, "best_step": best["step"],
          **{k: best[k] for k in METRICS[a.task]}}


def bench_finetuning(a: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
  from bert_jax import bench
  runs = []
  for seed in a.seeds:
    for packed in (False, True):
      runs.append(_finetune(a, seed, packed, extra))
      print(json.dumps(runs[-1]), file=sys.stderr)
  side = lambda p: [r for r in runs if r["packed"] == p]  # noqa: E731
  mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
  result = {"bench": f"packing/{a.task}", **bench.machine(), "train_file": a.train_file,
            "max_seq_length": a.max_seq_length, "seeds": a.seeds, "args": extra, "runs": runs}
  for p, name in ((False, "padded"), (True, "packed")):
    result[name] = {k: mean(side(p), k) for k in ("wall_s", *METRICS[a.task])}
  result["wall_ratio"] = result["padded"]["wall_s"] / result["packed"]["wall_s"]
  for k in METRICS[a.task]:
    result[f"{k}_difference"] = result["packed"][k] - result["padded"][k]
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "_pretraining_worker":
    data_dir, variant, batch, steps, warmup = argv[1:]
    return _pretraining_worker(data_dir, variant, int(batch), int(steps), int(warmup))
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="python -m bert_jax.bench_packing",
                              description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="task", required=True)
  pre = sub.add_parser("pretraining")
  pre.add_argument("--seq_len", type=int, default=512)
  pre.add_argument("--variant", default="tiny")
  pre.add_argument("--batch_size", type=int, default=8)
  pre.add_argument("--steps", type=int, default=10)
  pre.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
  pre.add_argument("--repeats", type=int, default=3)
  pre.add_argument("--max_examples_per_row", type=int, default=8)
  pre.add_argument("--corpus", default="", help="raw text (default: the bundled corpus)")
  pre.add_argument("--tokenizer", default="", help="default: train 8,000 pieces on the corpus")
  pre.add_argument("--workdir", default="",
                   help="keeps the data between runs (default: a temporary directory, removed)")
  for task, seq_len in (("classification", 128), ("squad", 384)):
    fine = sub.add_parser(task)
    fine.add_argument("--train_file", required=True)
    fine.add_argument("--eval_file", required=True)
    fine.add_argument("--tokenizer", default="",
                      help="for a random initialisation (one of --tokenizer, --init_from)")
    fine.add_argument("--init_from", default="", help="a model directory to fine-tune")
    fine.add_argument("--max_seq_length", type=int, default=seq_len)
    fine.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                      default=[0, 1, 2])
    fine.add_argument("--workdir", default="",
                      help="keeps each run's workdir (default: a temporary directory, removed)")
  a = p.parse_args(argv)
  if a.task == "pretraining":
    if a.batch_size < 1 or a.steps < 1 or a.warmup < 1 or a.repeats < 1 or a.seq_len < 5:
      p.error("--batch_size, --steps, --warmup and --repeats must be >= 1, --seq_len >= 5")
  else:
    for flag in ("train_file", "eval_file", "tokenizer", "init_from"):
      value = getattr(a, flag)
      if value and not files.path(value).exists():
        raise ConfigError(f"--{flag} {value}: no such file or directory")
    if not (a.tokenizer or a.init_from):
      raise ConfigError("give --init_from (a model to fine-tune) or --tokenizer (a random "
                        "initialisation)")
  with tempfile.TemporaryDirectory(prefix="bert_jax_packing_") as scratch:
    a.workdir = a.workdir or scratch  # without --workdir, nothing is left behind
    return bench_pretraining(a) if a.task == "pretraining" else bench_finetuning(a, extra)


if __name__ == "__main__":
  from bert_jax import cli
  cli.run(lambda: print(json.dumps(main())))
