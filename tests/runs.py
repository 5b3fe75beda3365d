"""Helpers for the tests that run training in subprocesses with a chosen device or process
count (tests/test_topology.py, tests/test_object_store.py): tiny prepared data, configs, spawning
pretrain/finetune/convert, reading the logged losses."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tiny and fast: hidden 128 (the `tiny` variant), seq 32, 5 predictions, batch 8.
PRETRAIN = {
    "model.variant": "tiny", "model.hidden_dropout": 0.1, "train.batch_size": 8,
    "train.steps": 20, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1,
    "train.checkpoint_every": 10, "train.warmup_steps": 2, "train.progress_bar": False,
    "data.max_seq_length": 32, "data.max_predictions_per_seq": 5,
}
SENTENCES = ["a fine and moving play", "dull, tedious and long", "the king is dead",
             "what a noble mind is here", "sweet prince, good night", "nothing will come of it",
             "to be or not to be", "a plague on both your houses"]


def prepare(d: pathlib.Path) -> dict[str, str]:
  """A tokenizer and prepared pretraining instances (seq 32) in `d`; a classification task."""
  from bert_jax import tokenizer
  from bert_jax.data import pretraining
  corpus = d / "corpus.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:100_000],
                    encoding="utf-8")
  tok = tokenizer.train_sentencepiece([str(corpus)], 600, str(d / "tok"))
  pretraining.create_pretraining_data([str(corpus)], tok, str(d / "data"), max_seq_length=32,
                                      max_predictions_per_seq=5, dupe_factor=1,
                                      eval_fraction=0.1, seed=1)
  rows = [f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES * 4)]
  (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
  (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:16]) + "\n",
                             encoding="utf-8")
  return {"data.tokenizer": tok, "data.data_dir": str(d / "data"),
          "train_file": str(d / "train.tsv"), "eval_file": str(d / "dev.tsv")}


def _apply(c, overrides: dict):
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def pretrain_config(prepared: dict, **overrides):
  from configs import pretrain
  data = {k: v for k, v in prepared.items() if k.startswith("data.")}
  return _apply(pretrain.get_config("tiny"), {**PRETRAIN, **data, **overrides})


def classify_config(prepared: dict, init_from: str, **overrides):
  """Fine-tuning on 32 examples, batch 8: 4 steps an epoch, 2 epochs, evaluated each epoch."""
  from configs import classify
  return _apply(classify.get_config("tiny"), {
      "init_from": str(init_from), "data.train_file": prepared["train_file"],
      "data.eval_file": prepared["eval_file"], "data.text_a": "sentence", "data.label": "label",
      "data.max_seq_length": 32, "train.batch_size": 8, "train.eval_batch_size": 8,
      "train.epochs": 2, "train.log_every": 1, "train.progress_bar": False,
      "train.max_steps": 0, "train.checkpoint_every": 2, **overrides})


def env_for(devices: int, extra: dict | None = None) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu", **(extra or {})}


def spawn_code(code: str, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=env_for(devices, env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def spawn(module: str, config, workdir, devices: int = 1, env: dict | None = None
          ) -> subprocess.Popen:
  """`bert_jax.<module>.main(config, workdir)` (pretrain or finetune) through the CLI wrapper."""
  return spawn_code(f"""
      import ml_collections, json
      from bert_jax import cli, {module}
      config = ml_collections.ConfigDict(json.loads({config.to_json()!r}))
      cli.run({module}.main, config, {str(workdir)!r})
  """, devices, env)


def finish(p: subprocess.Popen, code: int = 0) -> str:
  out, _ = p.communicate(timeout=600)
  assert p.returncode == code, out
  return out


def run(module: str, config, workdir, devices: int = 1, env: dict | None = None) -> str:
  return finish(spawn(module, config, workdir, devices, env))


def run_code(code: str, devices: int = 1, env: dict | None = None) -> str:
  return finish(spawn_code(code, devices, env))


def losses(workdir, split: str = "train", key: str = "loss") -> dict[int, float]:
  """Last logged value per step."""
  from bert_jax import files
  out = {}
  for line in (files.path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == split and key in r:
      out[r["step"]] = r[key]
  return out


def params_of(path):
  """The parameters of a model export, a step directory or a workdir's newest step (numpy)."""
  from bert_jax import checkpoint
  return checkpoint.load_model(path)[1]


def assert_same_arrays(a, b) -> None:
  """Two pytrees of arrays equal bit for bit (same paths, shapes, dtypes and values)."""
  import jax
  import numpy as np
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def tree_bytes(d: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
  """{relative path: bytes} of the files under `d`, but those named in `skip`."""
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
          if p.is_file() and p.name not in skip}


@contextlib.contextmanager
def kept_logging():
  """Restores the root logger's handlers after a block that ran a CLI entry point in this
  process (`cli.setup_logging` points them at the stream of the moment, pytest's capture)."""
  import logging
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  try:
    yield
  finally:
    root.handlers[:], root.level = handlers, level
