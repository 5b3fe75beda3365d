"""Several processes (jax.distributed over 127.0.0.1): a fine-tuning run started on 1 device
resumes on 2 processes x 2 devices with the same best model; SIGTERM to one of two processes
stops both at the same step; kill -9 during an asynchronous save."""

import json
import shutil
import signal
import time

import numpy as np
import portpicker
import pytest
import runs

from bert_jax import checkpoint, files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return runs.prepare(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def pretrained(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  runs.run("pretrain", runs.pretrain_config(prepared, **{"train.steps": 4}), workdir, devices=1)
  return workdir


def _two(module, config, workdir):
  """Two processes of 2 devices each, joined over 127.0.0.1."""
  port = portpicker.pick_unused_port()
  return [runs.spawn(module, config, workdir, devices=2, env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i)}) for i in range(2)]


# Regression (pearson, mse): metrics that move with every weight, so "within 1e-6" means something.
FINETUNE = {"data.regression": True, "train.epochs": 3, "train.checkpoint_every": 4,
            "train.keep_checkpoints": 10, "train.learning_rate": 3e-3}


def _eval_outputs(model_dir, prepared, pretrained) -> np.ndarray:
  """The outputs of `model_dir` (a best/ export) on the dev set, on this process's 8 devices."""
  from bert_jax import finetune, params, sharding, trainer
  config = runs.classify_config(prepared, pretrained, **FINETUNE)
  run = finetune.setup(config, files.path(model_dir).parent / "eval-here")
  cfg, p = checkpoint.load_model(model_dir)
  state = trainer.jit_create_state(run.mesh, run.objective, run.tx, 0)
  run.param_shardings = trainer.shardings_of(state).params
  p = sharding.put(params.match_layout(p, run.bert), run.param_shardings)
  out = finetune.predict(p, run.task.eval_features(), 8, run.mesh, run.predict)
  return out["logits"]


def test_finetuning_resumes_on_two_processes_with_the_same_best(prepared, pretrained, tmp_path):
  config = runs.classify_config(prepared, pretrained, **FINETUNE)
  one = tmp_path / "one"
  runs.run("finetune", config, one, devices=1)
  reference = json.loads((one / "eval_results.json").read_text())
  assert reference["step"] > 4, f"epoch 1 stayed the best: {reference}"
  # The same run stopped after epoch 1 (its step-4 checkpoint), resumed on 2 x 2 devices.
  two = tmp_path / "two"
  shutil.copytree(one, two, ignore=shutil.ignore_patterns("best", "eval_results.json"))
  for step in (two / "checkpoints").iterdir():
    if step.name != "4":
      shutil.rmtree(step)
  procs = _two("finetune", config, two)
  outs = [runs.finish(p) for p in procs]
  assert all("resuming from step 4" in o for o in outs), outs[0]
  resumed = json.loads((two / "eval_results.json").read_text())
  assert resumed["step"] == reference["step"]
  assert resumed == pytest.approx(reference, abs=1e-6)
  assert not list(two.glob(".best.*")), "a temporary export was left behind"
  np.testing.assert_allclose(_eval_outputs(two / "best", prepared, pretrained),
                             _eval_outputs(one / "best", prepared, pretrained), atol=1e-6)


def _wait_for_step(workdir, step, procs, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if (workdir / "metrics.jsonl").exists() and max(runs.losses(workdir) or [0]) >= step:
      return
    time.sleep(0.01)
  raise AssertionError("the run ended before the signal: " + procs[0].communicate()[0])


@pytest.mark.slow  # CI (time): two processes run in test_finetuning_resumes_on_two_processes_...
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(prepared, tmp_path):
  # fsdp=2: each process saves and restores its shard of the state.
  config = runs.pretrain_config(prepared, **{"train.steps": 24, "train.checkpoint_every": 100,
                                             "train.fsdp": 2})
  straight = tmp_path / "straight"
  for p in _two("pretrain", config, straight):
    runs.finish(p)
  stopped = tmp_path / "stopped"
  procs = _two("pretrain", config, stopped)
  _wait_for_step(stopped, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  outs = [runs.finish(p, 128 + signal.SIGTERM) for p in procs]
  steps = [int(o.split("stopped by a signal at step ")[1].split(";")[0]) for o in outs]
  assert steps[0] == steps[1] < 24
  assert sorted(int(d.name) for d in (stopped / "checkpoints").iterdir()
                if d.name.isdigit()) == [steps[0]]
  for p in _two("pretrain", config, stopped):
    assert f"resuming from step {steps[0]}" in runs.finish(p)
  assert runs.losses(stopped) == runs.losses(straight)  # bitwise: same printed digits


def _kill_during_a_save(config, workdir) -> int | None:
  """Runs `config` and kill -9s it while a save is in flight (its temporary step directory
  exists). Returns that step, or None when the write finished before the kill landed."""
  p = runs.spawn("pretrain", config, workdir, devices=1)
  ckpts = workdir / "checkpoints"
  deadline, caught = time.time() + 300, None
  while time.time() < deadline and p.poll() is None and caught is None:
    names = [n.name for n in ckpts.iterdir()] if ckpts.exists() else []
    caught = next((n for n in names if "tmp" in n and not n.startswith("10.")), None)
  assert caught is not None, "no save seen in flight: " + p.communicate()[0]
  p.send_signal(signal.SIGKILL)
  p.wait()
  step = int(caught.split(".")[0])
  return None if (ckpts / str(step)).exists() else step


@pytest.mark.slow  # CI: tests/test_faults.py kills a run in the middle of a write
def test_kill_during_an_async_save_resumes_from_the_step_before(prepared, tmp_path):
  config = runs.pretrain_config(prepared, **{"train.steps": 40, "train.checkpoint_every": 10})
  runs.run("pretrain", config, tmp_path / "straight", devices=1)
  for attempt in range(3):  # the tiny write may finish between seeing it and the kill
    killed = tmp_path / f"killed{attempt}"
    in_flight = _kill_during_a_save(config, killed)
    if in_flight is not None:
      break
  assert in_flight is not None, "three writes finished before the kill landed"
  out = runs.run("pretrain", config, killed, devices=1)
  assert f"resuming from step {in_flight - 10}" in out, (in_flight, out)
  assert runs.losses(killed) == runs.losses(tmp_path / "straight")  # bitwise
