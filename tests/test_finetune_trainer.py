"""Fine-tuning runs on the one trainer: the same losses on every (data, fsdp) mesh, exact
gradient accumulation, the NaN stop (exit 3, nothing saved after it) and the preemption save
(SIGTERM: checkpoint, exit 143, an exact resume)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_finetune import ROOT, _classify_config, model_dir  # noqa: F401 - model_dir: fixture
from test_pretrain import prepared  # noqa: F401 - a fixture

from bert_jax import sharding


def _train_losses(workdir) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["split"] == "train":
      out[r["step"]] = r["loss"]
  return out


def _finetune(model_dir, tmp_path, name, **over):  # noqa: F811
  from bert_jax import finetune
  config = _classify_config(model_dir, tmp_path, **{
      "train.epochs": 3, "train.max_steps": 5, "train.log_every": 1, **over})
  best = finetune.main(config, tmp_path / name)
  return np.array(list(_train_losses(tmp_path / name).values())), best


@pytest.fixture(scope="module")
def one_device_run(model_dir, tmp_path_factory):  # noqa: F811
  """The reference fine-tuning run on one device, dropout on (made once for the meshes)."""
  return _finetune(model_dir, tmp_path_factory.mktemp("one"), "one", **{"train.dropout": 0.1})


# All slow (CI time, about 30 s here): CI checks the shared step on every mesh
# (tests/test_trainer.py), packed fine-tuning batches on 8 devices (tests/test_packing.py) and
# fine-tuning on 2 processes x 2 devices (tests/test_multihost.py).
@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_every_mesh_gives_the_same_finetuning_run(model_dir, tmp_path, monkeypatch, data,  # noqa: F811
                                                  fsdp, one_device_run):
  monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 0)  # shard the tiny model's arrays too
  ref, ref_best = one_device_run
  got, best = _finetune(model_dir, tmp_path, "mesh", **{
      "train.dropout": 0.1, "train.num_devices": data * fsdp, "train.fsdp": fsdp})
  assert len(ref) == 5 and ref[0] != ref[-1]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
  assert best["accuracy"] == ref_best["accuracy"]


@pytest.mark.slow  # CI: tests/test_trainer.py checks accumulation on the shared step
def test_finetuning_gradient_accumulation_is_exact(model_dir, tmp_path):  # noqa: F811
  over = {"train.dropout": 0.0, "train.num_devices": 2}
  ref, _ = _finetune(model_dir, tmp_path, "one", **over)
  got, _ = _finetune(model_dir, tmp_path, "accum", **over, **{"train.grad_accum": 2})
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


def _spawn(config, workdir) -> subprocess.Popen:
  script = textwrap.dedent(f"""
      import json, ml_collections
      from bert_jax import cli, finetune
      config = ml_collections.ConfigDict(json.loads({config.to_json()!r}))
      cli.run(finetune.main, config, {str(workdir)!r})
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _saved_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow  # CI: test_faults.test_finetuning_that_diverges_keeps_every_output
def test_non_finite_loss_stops_finetuning_before_any_save(model_dir, tmp_path):  # noqa: F811
  config = _classify_config(model_dir, tmp_path, **{
      "train.learning_rate": 1e9, "train.max_grad_norm": 0.0, "train.warmup_fraction": 0.0,
      "train.epochs": 40, "train.max_steps": 60, "train.checkpoint_every": 1,
      "train.log_every": 100})
  p = _spawn(config, tmp_path / "run")
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 3, out
  low = out.lower()
  assert "error: step " in out and ("is nan" in low or "is inf" in low), out
  bad = int(out.split("error: step ")[1].split(":")[0])
  assert max(_saved_steps(tmp_path / "run"), default=0) < bad
  assert "Traceback" not in out


def test_sigterm_saves_and_the_rerun_resumes_exactly(model_dir, tmp_path):  # noqa: F811
  config = _classify_config(model_dir, tmp_path, **{
      "train.epochs": 40, "train.max_steps": 60, "train.log_every": 1,
      "train.checkpoint_every": 1000})
  straight = _spawn(config, tmp_path / "straight")
  assert straight.wait(timeout=600) == 0, straight.communicate()[0]
  work = tmp_path / "killed"
  p = _spawn(config, work)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if (work / "metrics.jsonl").exists() and len(_train_losses(work)) >= 5:
      break
    time.sleep(0.01)
  assert p.poll() is None, "the run ended before the signal: " + p.communicate()[0]
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 128 + signal.SIGTERM, out
  assert "stopped by a signal" in out
  stopped_at = _saved_steps(work)
  assert len(stopped_at) == 1 and 5 <= stopped_at[0] < 60
  rerun = _spawn(config, work)
  out, _ = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, out
  assert f"resuming from step {stopped_at[0]}" in out
  assert _train_losses(work) == _train_losses(tmp_path / "straight")


def test_a_scanned_pretraining_checkpoint_fine_tunes_unrolled_and_exports(prepared, tmp_path):  # noqa: F811
  """Our checkpoints in either layer layout: pretrain scanned, fine-tune unrolled, export to HF."""
  from test_pretrain import _config

  from bert_jax import checkpoint, convert, finetune, pretrain
  from bert_jax import params as param_trees
  pre = tmp_path / "pre"
  pretrain.main(_config(prepared, **{"train.steps": 2, "model.scan_layers": True}), pre)
  config, params = checkpoint.load_model(pre)
  assert config.scan_layers and param_trees.is_scanned(params)
  c = _classify_config(pre, tmp_path, **{"model.scan_layers": False})
  c.tokenizer = prepared["data.tokenizer"]
  best = finetune.main(c, tmp_path / "ft")
  assert best["step"] == 2
  ft_config, ft_params = checkpoint.load_model(tmp_path / "ft" / "best")
  assert not ft_config.scan_layers and not param_trees.is_scanned(ft_params)
  convert.to_hf(config, params, tmp_path / "hf")
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  _, back = convert.load_hf(tmp_path / "hf")
  unrolled = param_trees.unstack_layers(params)
  np.testing.assert_array_equal(
      back["bert"]["encoder"]["layer_1"]["ffn"]["output"]["kernel"],
      unrolled["bert"]["encoder"]["layer_1"]["ffn"]["output"]["kernel"])


def test_metrics_leave_the_device_only_on_log_steps(model_dir, tmp_path, monkeypatch):  # noqa: F811
  """50 steps under a device-to-host transfer guard, reading the device only where the loop logs,
  evaluates or saves (`trainer._sync`), here every 25 steps. The CPU backend does not enforce the
  guard (its arrays live in host memory), so every host read of an array is also counted."""
  import contextlib

  import jax
  from jax._src.array import ArrayImpl

  from bert_jax import finetune, trainer
  reads, inside = [], [False]
  value = ArrayImpl._value
  monkeypatch.setattr(ArrayImpl, "_value", property(
      lambda self: (inside[0] or reads.append(self.shape), value.fget(self))[1]))
  sync = trainer._sync

  @contextlib.contextmanager
  def counted_sync():
    inside[0] = True
    try:
      with sync():
        yield
    finally:
      inside[0] = False

  monkeypatch.setattr(trainer, "_sync", counted_sync)
  config = _classify_config(model_dir, tmp_path, **{"train.epochs": 20, "train.max_steps": 50})
  run = finetune.setup(config, tmp_path / "run")
  state = trainer.jit_create_state(run.mesh, run.objective, run.tx, 0)
  features = run.task.train_features()
  batches = [{k: v[i * 8:(i + 1) * 8] for k, v in features.items()} for i in range(2)]
  saved, evaluated = [], []
  writer = type("Writer", (), {"write": lambda self, step, values, split="train": None})()
  loop = trainer.Loop(
      mesh=run.mesh, step_fn=trainer.jit_train_step(
          run.mesh, trainer.shardings_of(state), objective=run.objective, tx=run.tx,
          schedule=run.schedule),
      batch=lambda step: batches[step % 2], total_steps=50, log_every=25,
      should_evaluate=lambda step: False,
      evaluate=lambda st, step: evaluated.append(step) or {"x": float(st.step)},
      should_checkpoint=lambda step: step % 25 == 0,
      save=lambda step, st: saved.append((step, int(st.step))), writer=writer,
      progress_bar=False)
  reads.clear()
  with jax.transfer_guard_device_to_host("disallow"):
    state, last = trainer.fit(loop, state)
  assert reads == []
  assert saved == [(25, 25), (50, 50)] and evaluated == [50]
  assert np.isfinite(last["loss"]) and last["eval_x"] == 50
  float(state.step)  # the counter is real: a read outside `_sync` is seen
  assert reads == [()]


def test_squad_eval_questions_without_answers_are_refused_before_training(model_dir, tmp_path):  # noqa: F811
  import json as json_

  from test_finetune import _squad_json

  from bert_jax import finetune
  from bert_jax.data.errors import DataError
  from configs import squad
  data = json_.loads(_squad_json(tmp_path / "s.json").read_text())
  data["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
  (tmp_path / "eval.json").write_text(json_.dumps(data))
  c = squad.get_config("tiny")
  c.init_from, c.train.num_devices, c.train.progress_bar = str(model_dir), 1, False
  c.data.train_file, c.data.eval_file = str(tmp_path / "s.json"), str(tmp_path / "eval.json")
  with pytest.raises(DataError, match=r"eval.json: 1 questions without answers \(e.g. 'q1'\)"):
    finetune.main(c, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("field,value", [("keep_checkpoints", 0), ("log_every", 0),
                                         ("epochs", 0), ("max_steps", -1)])
def test_impossible_counts_are_refused_before_anything_is_written(model_dir, tmp_path, field,  # noqa: F811
                                                                  value):
  from bert_jax import finetune
  from bert_jax.errors import ConfigError
  config = _classify_config(model_dir, tmp_path, **{f"train.{field}": value})
  with pytest.raises(ConfigError, match=rf"train.{field}={value}: expected a whole number"):
    finetune.main(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_a_workdir_holding_the_starting_model_is_refused(model_dir, tmp_path, inside):  # noqa: F811
  from bert_jax import finetune
  # The model itself, or the workdir above it (like a previous run's best/ export).
  work = model_dir.parent if inside else model_dir
  config = _classify_config(model_dir, tmp_path)
  with pytest.raises(finetune.ConfigError, match="holds init_from=.*overwrite the starting"):
    finetune.main(config, work)
