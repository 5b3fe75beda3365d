"""End-to-end pretraining: a smoke run, exact resume after SIGKILL, a truncated checkpoint, a
non-finite loss, bad configurations, and multi-host (2 processes x 2 devices vs 1 x 4)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bert_jax.data import pretraining
from bert_jax.data.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small, fast model and run: hidden 32, 2 layers, seq 64.
OVERRIDES = {
    "model.variant": "tiny", "model.hidden_dropout": 0.1, "train.batch_size": 8,
    "train.steps": 6, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 2,
    "train.checkpoint_every": 3, "train.warmup_steps": 2, "train.progress_bar": False,
    "data.max_seq_length": 64, "data.max_predictions_per_seq": 10,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tokenizer and prepared instances from the bundled corpus (made once per module)."""
  from bert_jax import tokenizer
  d = tmp_path_factory.mktemp("prepared")
  corpus = d / "corpus.txt"
  text = pathlib.Path(pretraining.default_corpus_path()).read_text(encoding="utf-8")
  corpus.write_text(text[:300_000], encoding="utf-8")
  tok = tokenizer.train_sentencepiece([str(corpus)], 1000, str(d / "tok"))
  pretraining.create_pretraining_data([str(corpus)], tok, str(d / "data"), max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1,
                                      eval_fraction=0.1, seed=1)
  return {"data.tokenizer": tok, "data.data_dir": str(d / "data")}


def _config(prepared, **overrides):
  sys.path.insert(0, str(ROOT))
  from configs import pretrain as pretrain_config
  c = pretrain_config.get_config("tiny")
  for key, value in {**OVERRIDES, **prepared, **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _script(config, workdir) -> str:
  return textwrap.dedent(f"""
      import ml_collections, json
      from bert_jax import cli, pretrain
      config = ml_collections.ConfigDict(json.loads({config.to_json()!r}))
      cli.run(pretrain.main, config, {str(workdir)!r})
  """)


def _spawn(config, workdir, devices=1, env=None) -> subprocess.Popen:
  full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.Popen([sys.executable, "-c", _script(config, workdir)], cwd=ROOT,
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _run(config, workdir, devices=1) -> str:
  p = _spawn(config, workdir, devices)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  return out


def _losses(workdir) -> dict[int, float]:
  """Last logged train loss per step."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "train":
      out[r["step"]] = r["loss"]
  return out


def test_smoke_run_logs_checkpoints_and_evaluates(prepared, tmp_path, caplog):
  from bert_jax import pretrain
  config = _config(prepared, **{"train.steps": 2, "train.checkpoint_every": 1})
  result = pretrain.main(config, tmp_path)
  assert {"loss", "mlm_accuracy", "nsp_accuracy", "tokens_per_s", "eval_loss"} <= set(result)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      "1", "2"]
  assert set(_losses(tmp_path)) == {1, 2}
  assert list((tmp_path / "tensorboard" / "train").iterdir())
  # Run again: finished already, it says so; with fewer steps than the checkpoint's, refused.
  caplog.set_level("INFO")
  pretrain.main(config, tmp_path)
  assert "already trained to step 2 (train.steps=2): nothing left to do" in caplog.text
  with pytest.raises(pretrain.ConfigError, match=r"checkpoint is at step 2, past train.steps=1"):
    pretrain.main(_config(prepared, **{"train.steps": 1}), tmp_path)
  assert set(_losses(tmp_path)) == {1, 2}
  # A resume keeps what the checkpoint was trained with: another layout, optimizer or model is
  # refused naming the fields; optimisation settings may change, with a warning naming them.
  with pytest.raises(pretrain.ConfigError, match=r"checkpoints/2 was trained with other "
                     r"settings: model.scan_layers=True \(the checkpoint's False\); "
                     r"train.optimizer='lamb' \(the checkpoint's 'adamw'\)"):
    pretrain.main(_config(prepared, **{"model.scan_layers": True, "train.optimizer": "lamb"}),
                  tmp_path)
  caplog.clear()
  pretrain.main(_config(prepared, **{"train.learning_rate": 0.5, "train.log_every": 2,
                                     "train.num_devices": 2}), tmp_path)
  assert "resuming with changed settings: train.learning_rate=0.5 (the checkpoint's " in caplog.text
  assert "log_every" not in caplog.text and "num_devices" not in caplog.text


def test_phase_two_in_its_own_phase_one_workdir_is_refused(prepared, tmp_path):
  """It would resume phase 1 (init_from unused) and rotate its checkpoints away."""
  from bert_jax import pretrain
  with pytest.raises(pretrain.ConfigError, match=r"holds train.init_from=.*would overwrite the "
                                                 r"starting model"):
    pretrain.main(_config(prepared, **{"train.init_from": str(tmp_path / "checkpoints" / "2")}),
                  tmp_path)


def test_phase_two_starts_from_phase_one(prepared, tmp_path, caplog):
  from bert_jax import checkpoint, pretrain
  pretrain.main(_config(prepared, **{"train.steps": 2}), tmp_path / "p1")
  _, phase1 = checkpoint.load_model(tmp_path / "p1")
  caplog.set_level("INFO")
  pretrain.main(_config(prepared, **{"train.steps": 1, "train.init_from": str(tmp_path / "p1"),
                                     "train.learning_rate": 0.0}), tmp_path / "p2")
  assert "initialising from" in caplog.text
  _, phase2 = checkpoint.load_model(tmp_path / "p2")
  # A zero learning rate: phase 2 holds exactly the phase-1 weights it started from.
  import jax
  import numpy as np
  for a, b in zip(jax.tree.leaves(phase1), jax.tree.leaves(phase2), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # CI: tests/test_faults.py kills runs at several points and compares bitwise
def test_resume_after_sigkill_is_exact(prepared, tmp_path):
  config = _config(prepared, **{"train.steps": 40, "train.checkpoint_every": 5})
  _run(config, tmp_path / "straight")
  reference = _losses(tmp_path / "straight")

  killed = tmp_path / "killed"
  p = _spawn(config, killed)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    # Past step 7, with step 5's asynchronous save complete (renamed from its temporary name).
    if ((killed / "metrics.jsonl").exists() and max(_losses(killed) or [0]) >= 7
        and (killed / "checkpoints" / "5").is_dir()):
      break
    time.sleep(0.01)
  assert p.poll() is None, "the run ended before it could be killed: " + p.communicate()[0]
  p.send_signal(signal.SIGKILL)
  p.wait()
  first_pass = _losses(killed)
  assert max(first_pass) < 40
  out = _run(config, killed)
  assert "resuming from step" in out
  resumed = _losses(killed)
  assert sorted(resumed) == list(range(1, 41))
  assert resumed == reference  # bitwise: floats parsed from the same printed digits


@pytest.mark.slow  # CI: tests/test_faults.py damages steps in every way on a small tree
def test_truncated_newest_checkpoint_falls_back(prepared, tmp_path):
  _run(_config(prepared), tmp_path)  # checkpoints at 3 and 6
  newest = tmp_path / "checkpoints" / "6" / "state"
  files = sorted((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
  out = _run(_config(prepared, **{"train.steps": 8}), tmp_path)
  assert "checkpoint step 6" in out and "unreadable" in out
  assert "resuming from step 3" in out


def test_non_finite_loss_stops_with_the_step(prepared, tmp_path):
  config = _config(prepared, **{"train.learning_rate": 1e9, "train.max_grad_norm": 0.0,
                                "train.steps": 30, "train.checkpoint_every": 1,
                                "train.warmup_steps": 0})
  p = _spawn(config, tmp_path)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 3, out
  assert "error: step " in out and "loss is" in out
  bad_step = int(out.split("error: step ")[1].split(":")[0])
  saved = [int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit()]
  assert all(step < bad_step - 1 for step in saved), saved
  if bad_step > 1:  # the weights of the step before gave the NaN: moved out of the way
    assert (tmp_path / "checkpoints" / f"{bad_step - 1}.diverged" / "state").is_dir()


@pytest.mark.parametrize("overrides,message", [
    ({"train.batch_size": 12}, "not divisible by the 8 devices"),
    ({"data.max_seq_length": 64, "model.max_position_embeddings": 32}, "exceeds the position"),
    ({"model.vocab_size": 1234}, "but the tokenizer has 1000"),
    ({"data.data_dir": "/nonexistent/data"}, "has no manifest.json"),
    ({"train.steps": -5}, r"train.steps=-5: expected a whole number >= 1"),
    ({"train.log_every": 0}, r"train.log_every=0: expected a whole number >= 1"),
    ({"train.checkpoint_every": 0}, r"train.checkpoint_every=0: expected"),
    ({"train.keep_checkpoints": 0}, r"train.keep_checkpoints=0: expected a whole number >= 1"),
    ({"data.tokenizer": "", "data.tokenizer_type": "wordpiece"},
     r"data.tokenizer_type='wordpiece': expected 'bpe' or 'unigram' \(a WordPiece vocab.txt "
     r"is given as data.tokenizer\)"),
])
def test_bad_configuration_is_refused(prepared, tmp_path, overrides, message):
  from bert_jax import pretrain
  with pytest.raises(pretrain.ConfigError, match=message):
    pretrain.main(_config(prepared, **{"train.num_devices": 8, **overrides}), tmp_path / "w")
  if "model.vocab_size" not in overrides:  # refused before the workdir gets its tokenizer
    assert not (tmp_path / "w").exists()


def _corpus(prepared) -> str:
  return pretraining.read_manifest(prepared["data.data_dir"])["args"]["input_files"][0]


def test_a_position_table_too_short_is_refused_before_any_data_is_written(prepared, tmp_path):
  from bert_jax import pretrain
  config = _config(prepared, **{"data.data_dir": "", "data.input_files": _corpus(prepared),
                                "data.max_seq_length": 64, "model.max_position_embeddings": 32})
  with pytest.raises(pretrain.ConfigError, match=r"data.max_seq_length=64 exceeds the position"):
    pretrain.main(config, tmp_path)
  assert not (tmp_path / "data").exists()


def test_changed_data_flags_on_a_workdir_are_refused(prepared, tmp_path):
  from bert_jax import pretrain
  config = _config(prepared, **{"data.data_dir": "", "data.input_files": _corpus(prepared),
                                "data.dupe_factor": 1})
  data_dir = tmp_path / "data"
  pretrain._create_data(config, data_dir, prepared["data.tokenizer"])
  pretrain.check_recipe(config, data_dir, pretraining.read_manifest(data_dir))  # as made
  for field, value in (("dupe_factor", 2), ("whole_word_mask", True), ("packing", True),
                       ("input_files", prepared["data.tokenizer"])):
    changed = _config(prepared, **{"data.data_dir": "", "data.input_files": _corpus(prepared),
                                   "data.dupe_factor": 1, f"data.{field}": value})
    with pytest.raises(pretrain.ConfigError, match=rf"was made from other data settings: "
                                                   rf"data.{field}="):
      pretrain.prepare_data(changed, tmp_path, prepared["data.tokenizer"])


def test_changed_tokenizer_settings_on_a_workdir_are_refused(prepared, tmp_path):
  """A workdir keeps the tokenizer its data and checkpoints were made with: other tokenizer
  settings, or another tokenizer file of the same name, are refused, not silently ignored."""
  import shutil

  from bert_jax import pretrain, tokenizer
  trained = {"data.tokenizer": "", "data.input_files": _corpus(prepared),
             "data.tokenizer_vocab_size": 300}
  path = pretrain.prepare_tokenizer(_config(prepared, **trained), tmp_path / "a")
  assert tokenizer.load(path).vocab_size == 300
  pretrain.prepare_tokenizer(_config(prepared, **trained), tmp_path / "a")  # the same: reused
  for field, value, made in (("tokenizer_vocab_size", 400, 300),
                             ("tokenizer_lowercase", True, False),
                             ("tokenizer_type", "unigram", "bpe")):
    with pytest.raises(pretrain.ConfigError,
                       match=rf"tokenizer.model was made with other settings: "
                             rf"data.{field}={value!r} \(made with {made!r}\)"):
      pretrain.prepare_tokenizer(_config(prepared, **{**trained, f"data.{field}": value}),
                                 tmp_path / "a")

  other = tmp_path / "other" / pathlib.Path(prepared["data.tokenizer"]).name
  other.parent.mkdir()
  shutil.copy(path, other)  # another tokenizer under the name of the workdir's copy
  pretrain.prepare_tokenizer(_config(prepared), tmp_path / "b")
  pretrain.prepare_tokenizer(_config(prepared), tmp_path / "b")  # the same file: reused
  with pytest.raises(pretrain.ConfigError, match=r"data.tokenizer: .*other.* is not the "
                                                 r"tokenizer .*b.* was made with"):
    pretrain.prepare_tokenizer(_config(prepared, **{"data.tokenizer": str(other)}),
                               tmp_path / "b")


def test_a_damaged_eval_split_is_refused_before_the_first_step(prepared, tmp_path):
  """Found at the first evaluation, it would end the run before that step's checkpoint."""
  import shutil

  from bert_jax import pretrain
  data_dir = tmp_path / "data"
  shutil.copytree(prepared["data.data_dir"], data_dir)
  (data_dir / "eval-00000.input_ids.npy").unlink()
  config = _config(prepared, **{"data.data_dir": str(data_dir), "train.steps": 2})
  with pytest.raises(DataError, match=r"eval-00000\.input_ids\.npy: cannot read"):
    pretrain.main(config, tmp_path / "run")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow  # a warning and a run that ends; kept out of CI for its time
def test_data_without_an_eval_split_trains_to_the_end(prepared, tmp_path, caplog):
  from bert_jax import pretrain
  data_dir = tmp_path / "data"
  pretraining.create_pretraining_data([_corpus(prepared)], prepared["data.tokenizer"],
                                      str(data_dir), max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1,
                                      eval_fraction=0.0)
  config = _config(prepared, **{"data.data_dir": str(data_dir), "train.steps": 2,
                                "train.eval_every": 1})
  with caplog.at_level("WARNING", logger="bert_jax.pretrain"):
    last = pretrain.main(config, tmp_path / "run")
  assert "has no eval split" in caplog.text and "training without evaluation" in caplog.text
  assert not any(k.startswith("eval_") for k in last)
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()  # the final save happened


def _spawn_process(config, workdir, index, port):
  env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": str(index)}
  return _spawn(config, workdir, devices=2, env=env)


# Both slow (CI time): tests/test_multihost.py runs two processes, test_trainer.py every mesh.
@pytest.mark.parametrize("fsdp", [pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
def test_two_processes_match_one(prepared, tmp_path, fsdp):
  # fsdp=2: each process's two devices hold one sharded copy of the state. Saving and resuming
  # on two processes (sharded too) is tests/test_multihost.py's SIGTERM test.
  import portpicker
  config = _config(prepared, **{"train.steps": 4, "train.checkpoint_every": 2,
                                "train.fsdp": fsdp})
  _run(config, tmp_path / "one", devices=4)
  port = portpicker.pick_unused_port()
  procs = [_spawn_process(config, tmp_path / "two", i, port) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(outs)
  assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
  assert sorted(_losses(tmp_path / "two")) == [1, 2, 3, 4]
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
