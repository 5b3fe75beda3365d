"""Fault injection: runs killed with SIGKILL at named points (bert_jax.faults) and run again end
bitwise equal to an uninterrupted run; a full disk during a save; NaN/Inf that must stop a run
before it writes anything; every kind of damaged checkpoint.

CI runs a fast subset; `pytest -q -m "" tests/test_faults.py` runs every kill point (README).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import runs

from bert_jax import faults

slow = pytest.mark.slow

# Pretraining from raw text: the tokenizer and the instances are made in the workdir, so that
# kills during their creation are covered too. 4 steps, checkpoints at 2 and 4.
PRETRAIN = {"data.tokenizer_vocab_size": 600, "data.dupe_factor": 1, "train.steps": 4,
            "train.checkpoint_every": 2, "train.eval_batches": 1}

PRETRAIN_POINTS = [
    pytest.param("pretrain.tokenizer_trained", marks=slow),  # tokenizer written, not moved in
    pytest.param("data.shard_written", marks=slow),  # data creation, the first shard written
    pytest.param("pretrain.data_created", marks=slow),  # all shards, not moved into the workdir
    pytest.param("files.before_swap", marks=slow),  # the data directory complete, not swapped in
    pytest.param("trainer.after_step@1", marks=slow),  # before the first checkpoint
    pytest.param("trainer.after_step@3", marks=slow),  # between checkpoints
    pytest.param("checkpoint.before_save@1", marks=slow),
    "checkpoint.save_started@1",  # the middle of the asynchronous write of step 2
    pytest.param("trainer.after_save@1", marks=slow),
    pytest.param("trainer.final_step", marks=slow),  # after the last step, before the final
    # evaluation and save
    pytest.param("trainer.after_eval", marks=slow),  # evaluated, the final save not started
    pytest.param("checkpoint.save_started@2", marks=slow),  # during the final write
    pytest.param("pretrain.after_fit", marks=slow),  # the final write may be under way
]

# Fine-tuning (classification, random init): 4 steps an epoch, 2 epochs, checkpoints every 2
# steps, evaluated (and best/ exported when better) each epoch, predictions at the end.
FINETUNE_POINTS = [
    pytest.param("trainer.after_step@1", marks=slow),
    pytest.param("checkpoint.before_save@1", marks=slow),
    pytest.param("checkpoint.save_started@1", marks=slow),  # mid-write
    pytest.param("trainer.after_save@1", marks=slow),
    "finetune.before_best_export@1",  # eval_results.json written, best/ not yet
    pytest.param("files.before_swap@1", marks=slow),  # the new best/ complete, not swapped in
    pytest.param("trainer.after_eval@1", marks=slow),  # epoch 1 evaluated and exported, not saved
    pytest.param("checkpoint.save_started@3", marks=slow),  # mid-write of step 6
    pytest.param("trainer.final_step", marks=slow),  # after the last step, before its evaluation
    pytest.param("trainer.after_eval@2", marks=slow),  # the final evaluation done, the final
    # save not started
    pytest.param("checkpoint.save_started@4", marks=slow),  # during the final write
    pytest.param("finetune.after_fit", marks=slow),  # before the predictions are written
]


@pytest.fixture(autouse=True)
def _logging():
  with runs.kept_logging():
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
  d = tmp_path_factory.mktemp("inputs")
  return runs.prepare(d)


def _pretrain_config(corpus: dict, **overrides):
  text = str(pathlib.Path(corpus["train_file"]).parent / "corpus.txt")
  return runs.pretrain_config({}, **{"data.input_files": text, **PRETRAIN, **overrides})


def _finetune_config(corpus: dict, **overrides):
  return runs.classify_config(corpus, "", **{
      "tokenizer": corpus["data.tokenizer"], "data.predict_file": corpus["eval_file"],
      "train.checkpoint_every": 2, **overrides})


def _pretrain_outcome(workdir: pathlib.Path) -> dict:
  return {"params": runs.params_of(workdir), "losses": runs.losses(workdir),
          "tokenizer": (workdir / "tokenizer.model").read_bytes(),
          "data": runs.tree_bytes(workdir / "data", skip=("manifest.json",)),
          "manifest": {k: v for k, v in json.loads((workdir / "data" / "manifest.json")
                                                   .read_text()).items()
                       if k not in ("seconds", "instances_per_s", "tokenizer")},
          "steps": sorted(p.name for p in (workdir / "checkpoints").iterdir())}


def _finetune_outcome(workdir: pathlib.Path) -> dict:
  return {"params": runs.params_of(workdir), "best": runs.params_of(workdir / "best"),
          "losses": runs.losses(workdir), "eval": runs.losses(workdir, "eval", "accuracy"),
          "results": (workdir / "eval_results.json").read_text(),
          "predictions": (workdir / "predictions.json").read_text(),
          "steps": sorted(p.name for p in (workdir / "checkpoints").iterdir())}


def _assert_same(got: dict, want: dict) -> None:
  runs.assert_same_arrays(got.pop("params"), want["params"])
  if "best" in got:
    runs.assert_same_arrays(got.pop("best"), want["best"])
  assert got == {k: v for k, v in want.items() if k in got}


@pytest.fixture(scope="module")
def pretrain_reference(corpus, tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("pretrain_reference")
  runs.run("pretrain", _pretrain_config(corpus), workdir)
  return _pretrain_outcome(workdir)


@pytest.fixture(scope="module")
def finetune_reference(corpus, tmp_path_factory) -> dict:
  workdir = tmp_path_factory.mktemp("finetune_reference")
  runs.run("finetune", _finetune_config(corpus), workdir)
  return _finetune_outcome(workdir)


def _kill_then_rerun(module: str, config, workdir: pathlib.Path, point: str) -> str:
  """Runs until `point` kills the run (it must), then the same command again to the end."""
  runs.finish(runs.spawn(module, config, workdir, env={faults.ENV: point}), -9)
  return runs.run(module, config, workdir)


@pytest.mark.parametrize("point", PRETRAIN_POINTS)
def test_pretraining_killed_anywhere_ends_bitwise_equal(corpus, pretrain_reference, tmp_path,
                                                        point):
  _kill_then_rerun("pretrain", _pretrain_config(corpus), tmp_path, point)
  _assert_same(_pretrain_outcome(tmp_path), pretrain_reference)


@pytest.mark.parametrize("point", FINETUNE_POINTS)
def test_finetuning_killed_anywhere_ends_bitwise_equal(corpus, finetune_reference, tmp_path,
                                                       point):
  _kill_then_rerun("finetune", _finetune_config(corpus), tmp_path, point)
  _assert_same(_finetune_outcome(tmp_path), finetune_reference)


def test_a_kill_mid_write_leaves_the_previous_step(corpus, tmp_path):
  """Killed right after the write of step 4 began: step 2 stays readable whatever the write
  left behind, and the partial step 4 is never taken for a checkpoint."""
  config = _pretrain_config(corpus)
  runs.finish(runs.spawn("pretrain", config, tmp_path,
                         env={faults.ENV: "checkpoint.save_started@2"}), -9)
  entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "2" in entries and "4" not in entries, entries
  assert runs.params_of(tmp_path / "checkpoints" / "2")


# ----------------------------------------------------------------------------- a full disk


def _assert_one_line_error(out: str, *needles: str) -> str:
  """The last line is the error, and no traceback was printed (Orbax's background threads and
  TensorStore's callbacks included)."""
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: "), out[-3000:]
  for needle in needles:
    assert needle in last, last
  assert "Traceback" not in out and "Exception ignored" not in out, out[-5000:]
  return last


def test_disk_full_during_a_save_injected(corpus, pretrain_reference, tmp_path):
  """ENOSPC injected at the second checkpoint write (faults 'checkpoint.write@2:enospc'): one
  clear error, step 2 intact, and the rerun resumes from it to the uninterrupted result."""
  config = _pretrain_config(corpus)
  out = runs.finish(runs.spawn("pretrain", config, tmp_path,
                               env={faults.ENV: "checkpoint.write@2:enospc"}), 2)
  _assert_one_line_error(out, "writing a checkpoint failed: No space left on device",
                         "intact")
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert "resuming from step 2" in runs.run("pretrain", config, tmp_path)
  _assert_same(_pretrain_outcome(tmp_path), pretrain_reference)


@pytest.fixture
def small_disk(tmp_path):
  """A 9 MiB tmpfs (room for one tiny checkpoint of about 6 MiB, not two), where mounting is
  allowed (root); skipped elsewhere."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if shutil.which("mount") is None or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)],
      capture_output=True).returncode != 0:
    pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC test covers "
                "the same path")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


@slow
def test_disk_full_during_a_save_on_a_small_file_system(corpus, small_disk):
  """A real ENOSPC from TensorStore while the second checkpoint is written: one clear error,
  step 2 intact; with room again (the file system grown), the rerun resumes from step 2."""
  prepared = {"data.tokenizer": corpus["data.tokenizer"], "data.data_dir": corpus["data.data_dir"]}
  config = runs.pretrain_config(prepared, **{"train.steps": 4, "train.checkpoint_every": 2})
  workdir = small_disk / "w"
  out = runs.finish(runs.spawn("pretrain", config, workdir), 2)
  _assert_one_line_error(out, "writing a checkpoint failed: No space left on device")
  assert runs.params_of(workdir / "checkpoints" / "2")
  subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
  assert "resuming from step 2" in runs.run("pretrain", config, workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "2", "4"]


# ----------------------------------------------------------------------------- NaN / Inf


def _diverge(**more) -> dict:
  return {"train.learning_rate": 1e9, **more}  # the same optimizer: the state resumes


def test_finetuning_that_diverges_keeps_every_output(corpus, tmp_path):
  """One good epoch (best/, eval_results.json, predictions.json, checkpoints), then a second
  epoch at a huge learning rate: the run stops at the step that went NaN/Inf (exit 3), and no
  output of the good epoch is replaced or deleted."""
  runs.run("finetune", _finetune_config(corpus, **{"train.epochs": 1}), tmp_path)
  kept = ("best/", "eval_results.json", "predictions.json", "checkpoints/4/")
  before = {k: v for k, v in runs.tree_bytes(tmp_path).items() if k.startswith(kept)}
  # Every checkpoint kept: what goes is then the NaN's doing, not the rotation's.
  config = _finetune_config(corpus, **_diverge(**{"train.epochs": 2, "train.checkpoint_every": 1,
                                                  "train.warmup_fraction": 0.0,
                                                  "train.keep_checkpoints": 10}))
  out = runs.finish(runs.spawn("finetune", config, tmp_path), 3)
  last = _assert_one_line_error(out, "loss is NaN or Inf")
  bad_step = int(last.split("step ")[1].split(":")[0])
  assert bad_step > 4
  after = runs.tree_bytes(tmp_path, skip=("metrics.jsonl",))
  for name, data in before.items():
    assert after.get(name) == data, f"{name} was replaced or deleted"
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert max(saved) < bad_step - 1
  _assert_set_aside(tmp_path / "checkpoints", bad_step, last)


@slow
def test_pretraining_that_diverges_stops_before_saving(corpus, tmp_path):
  """Good steps 1-4 (checkpoints 2 and 4), then a huge learning rate with a checkpoint every
  step: the run stops at the NaN/Inf step, saves nothing from it on, and keeps steps 2 and 4."""
  config = _pretrain_config(corpus)
  runs.run("pretrain", config, tmp_path)
  good = {s: runs.params_of(tmp_path / "checkpoints" / s) for s in ("2", "4")}
  config = _pretrain_config(corpus, **_diverge(**{"train.steps": 30, "train.checkpoint_every": 1,
                                                  "train.keep_checkpoints": 5}))
  out = runs.finish(runs.spawn("pretrain", config, tmp_path), 3)
  last = _assert_one_line_error(out, "loss is NaN or Inf")
  bad_step = int(last.split("step ")[1].split(":")[0])
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert max(saved) < bad_step - 1 and {2, 4} <= set(saved)
  for step, params in good.items():
    runs.assert_same_arrays(runs.params_of(tmp_path / "checkpoints" / step), params)
  _assert_set_aside(tmp_path / "checkpoints", bad_step, last)


def _assert_set_aside(checkpoints: pathlib.Path, bad_step: int, message: str) -> None:
  """With a checkpoint every step, the one before the NaN/Inf (its weights gave it) was saved:
  it is moved to `<step>.diverged`, whole, and the error line says so."""
  moved = checkpoints / f"{bad_step - 1}.diverged"
  assert moved.is_dir() and (moved / "state").is_dir(), sorted(os.listdir(checkpoints))
  assert f"step {bad_step - 1}" in message and str(moved) in message, message


# ----------------------------------------------------------------------------- damaged steps


@pytest.fixture(scope="module")
def tiny_steps(tmp_path_factory):
  """A checkpoint directory of a small train-state-like tree, steps 1 and 2, and its target."""
  import jax
  import jax.numpy as jnp

  from bert_jax import checkpoint
  d = tmp_path_factory.mktemp("tiny_steps") / "checkpoints"
  state = {"params": {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64),
                      "b": jnp.ones(64, jnp.float32)}, "step": jnp.int32(0)}
  mngr = checkpoint.manager(d, max_to_keep=3)
  for step in (1, 2):
    checkpoint.save(mngr, step, jax.tree.map(lambda x, s=step: x + s, state), {"model_config": {}})
  mngr.close()
  return d, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _largest_file(d: pathlib.Path) -> pathlib.Path:
  return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_a_bit(f: pathlib.Path) -> None:
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x04
  f.write_bytes(bytes(data))


@pytest.mark.parametrize("kept", [("1", "2"), ("2",)])
def test_the_diverged_error_names_where_a_rerun_starts(tiny_steps, tmp_path, kept):
  """The weights of step 2 gave a NaN at update 3: step 2 is set aside, and the error names the
  step a rerun resumes from, or says there is none (keep_checkpoints=1)."""
  import jax.numpy as jnp

  from bert_jax import checkpoint, trainer
  src, _ = tiny_steps
  d = tmp_path / "checkpoints"
  for step in kept:
    shutil.copytree(src / step, d / step)
  mngr = checkpoint.manager(d)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer._check_finite(jnp.int32(3), lambda s: checkpoint.set_aside_diverged(mngr, s))
  mngr.close()
  assert (d / "2.diverged").is_dir() and not (d / "2").exists()
  assert str(d / "2.diverged") in str(e.value)
  if "1" in kept:
    assert "a rerun resumes from step 1" in str(e.value)
    assert mngr.latest_step() == 1
  else:
    assert "no older checkpoint is kept" in str(e.value)
    assert "a rerun starts from the beginning" in str(e.value)


DAMAGE = {
    "truncated array file": lambda s: os.truncate(_largest_file(s / "state"),
                                                   _largest_file(s / "state").stat().st_size // 2),
    "deleted array file": lambda s: _largest_file(s / "state").unlink(),
    "garbage meta JSON": lambda s: (s / "meta" / "metadata").write_text("{garbage"),
    "garbage tree metadata": lambda s: (s / "state" / "_METADATA").write_text("{garbage"),
    "empty step directory": lambda s: [shutil.rmtree(s), s.mkdir()],
    "a flipped bit": lambda s: _flip_a_bit(_largest_file(s / "state")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_step_falls_back_with_a_warning(tiny_steps, tmp_path, caplog, damage):
  from bert_jax import checkpoint
  src, target = tiny_steps
  d = tmp_path / "checkpoints"
  shutil.copytree(src, d)
  DAMAGE[damage](d / "2")
  caplog.set_level("WARNING")
  mngr = checkpoint.manager(d)
  step, state, _ = checkpoint.restore_latest(mngr, target)
  mngr.close()
  assert step == 1
  np.testing.assert_array_equal(state["params"]["b"], np.full(64, 2.0, np.float32))
  assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text
  assert (d / "2.unreadable").is_dir() and (d / "1").is_dir()  # set aside, never deleted


@pytest.mark.parametrize("damage", ["truncated array file", "empty step directory",
                                    "a flipped bit"])
def test_no_readable_step_is_an_error_not_a_fresh_start(tiny_steps, tmp_path, damage):
  from bert_jax import checkpoint
  src, target = tiny_steps
  d = tmp_path / "checkpoints"
  shutil.copytree(src, d)
  for step in ("1", "2"):
    DAMAGE[damage](d / step)
  before = runs.tree_bytes(d)
  mngr = checkpoint.manager(d)
  with pytest.raises(checkpoint.CheckpointError, match=r"holds checkpoints but none can be read"
                     r" \(step 2: .*; step 1: .*\); nothing was changed"):
    checkpoint.restore_latest(mngr, target)
  mngr.close()
  assert runs.tree_bytes(d) == before


def test_a_step_of_another_model_is_an_error_naming_it(tiny_steps, tmp_path):
  import jax

  from bert_jax import checkpoint
  src, target = tiny_steps
  shutil.copytree(src, tmp_path / "checkpoints")
  other = {**target, "params": {**target["params"],
                                "w": jax.ShapeDtypeStruct((64, 128), np.float32)}}
  mngr = checkpoint.manager(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2/state: .*other shapes: "
                     r"params/w \(64, 64\) \(expected \(64, 128\)\)"):
    checkpoint.restore_latest(mngr, other)
  mngr.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_a_flipped_bit_in_a_model_export_is_an_error(tmp_path):
  from bert_jax import checkpoint
  from bert_jax.config import get_variant
  params = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}
  out = checkpoint.save_model(tmp_path / "export", get_variant("tiny", vocab_size=99), params)
  runs.assert_same_arrays(checkpoint.load_model(out)[1], params)
  _flip_a_bit(_largest_file(pathlib.Path(out) / "params"))
  with pytest.raises(checkpoint.CheckpointError, match="do not match their checksum"):
    checkpoint.load_model(out)


def test_pretraining_on_unreadable_checkpoints_stops_and_keeps_them(corpus, tmp_path, capfd):
  """The CLI path: every step damaged -> one line, exit 2, no traceback (not even from the
  reads Orbax abandons), every step left as it was."""
  from bert_jax import cli, pretrain
  config = runs.pretrain_config(corpus, **{"train.steps": 2, "train.checkpoint_every": 1})
  pretrain.main(config, tmp_path)
  for step in ("1", "2"):
    DAMAGE["truncated array file"](tmp_path / "checkpoints" / step)
  before = runs.tree_bytes(tmp_path / "checkpoints")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(pretrain.main, runs.pretrain_config(corpus, **{"train.steps": 4}), tmp_path)
  assert exit_info.value.code == 2
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception ignored" not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and "none can be read" in last
  assert runs.tree_bytes(tmp_path / "checkpoints") == before


def test_abandoned_reads_are_not_logged_with_a_traceback(caplog):
  """asyncio reports a gathering future of failed reads that nobody awaited when it is collected,
  whenever that is: after the first restore, such a report about Orbax's reads is dropped, and
  every other one still reaches the log."""
  import asyncio
  import gc

  from bert_jax import checkpoint

  checkpoint._quiet_orbax_leftovers()

  def abandon(message):
    loop = asyncio.new_event_loop()
    try:
      async def read():
        raise Exception(message)  # noqa: TRY002 (Orbax raises a bare Exception)
      gathered = asyncio.gather(loop.create_task(read()))
      loop.run_until_complete(asyncio.sleep(0.01))
      assert gathered.done()
      del gathered
      gc.collect()
    finally:
      loop.close()

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    abandon("Encountered error while reading array index: (slice(0, 512, 1),)")
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    abandon("something else")
  assert any("something else" in r.getMessage() for r in caplog.records if r.name == "asyncio")


# ----------------------------------------------------------------------------- outputs


def test_outputs_are_readable_by_others(corpus, tmp_path):
  """Model exports (ours and Hugging Face's) and prepared data are created 0644 / 0755 under
  the usual umask 022, like any other file the user writes (never 0600 / 0700)."""
  from bert_jax import checkpoint, convert
  from bert_jax.config import get_variant
  old = os.umask(0o022)
  try:
    config = get_variant("tiny", vocab_size=600)
    import jax
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), convert.abstract_params(config))
    outputs = [checkpoint.save_model(tmp_path / "export", config, params,
                                     corpus["data.tokenizer"]),
               convert.to_hf(config, params, tmp_path / "hf", corpus["data.tokenizer"]),
               pathlib.Path(corpus["data.data_dir"])]
  finally:
    os.umask(old)
  for out in map(pathlib.Path, outputs):
    for p in [out, *out.rglob("*")]:
      mode = p.stat().st_mode & 0o777
      assert mode & 0o044 == 0o044 and (not p.is_dir() or mode & 0o011 == 0o011), (p, oct(mode))
