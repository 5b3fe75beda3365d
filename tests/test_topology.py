"""Checkpoints move between topologies: pretrained on 8 devices (replicated and fsdp=8), read,
fine-tuned and converted with 1 device, resumed on 4; errors that name the directory."""

import shutil

import jax
import numpy as np
import pytest
import runs

from bert_jax import checkpoint, pretrain, trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return runs.prepare(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module", ids=["replicated", "fsdp8"],
                params=[pytest.param(1, marks=pytest.mark.slow), 8])  # CI: the harder layout
def pretrained(request, prepared, tmp_path_factory):
  """20 steps of tiny pretraining on 8 devices, checkpoints at 10 and 20."""
  workdir = tmp_path_factory.mktemp(f"pretrained-fsdp{request.param}")
  runs.run("pretrain", runs.pretrain_config(prepared, **{"train.fsdp": request.param}), workdir,
           devices=8)
  return request.param, workdir


def _saved_params(prepared, workdir, fsdp):
  """The params of the newest step as the training manager restores them here (8 devices)."""
  config = runs.pretrain_config(prepared, **{"train.fsdp": fsdp})
  s = pretrain.setup(config, workdir)
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR)
  step, state, _ = checkpoint.restore_latest(
      mngr, trainer.abstract_state(s.objective, s.tx, s.mesh, config.train.seed))
  mngr.close()
  assert step == 20
  return jax.device_get(state.params)


def test_params_read_on_one_device_equal_the_saved_ones(prepared, pretrained, tmp_path):
  fsdp, workdir = pretrained
  runs.run_code(f"""
      import jax, numpy as np
      from bert_jax import checkpoint
      assert jax.device_count() == 1
      _, params = checkpoint.load_model({str(workdir)!r})
      flat = {{jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}}
      np.savez({str(tmp_path / "one.npz")!r}, **flat)
  """, devices=1)
  one = np.load(tmp_path / "one.npz")
  saved = _saved_params(prepared, workdir, fsdp)
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  assert sorted(one.files) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(one[k], v, err_msg=k)  # bitwise


def test_finetune_and_convert_on_one_device(prepared, pretrained, tmp_path):
  fsdp, workdir = pretrained
  if fsdp == 1:
    pytest.skip("the fsdp=8 checkpoint covers it (the harder layout); saves CI time")
  out = runs.run("finetune", runs.classify_config(prepared, workdir), tmp_path / "ft",
                 devices=1)
  assert "error" not in out.lower().split("warning")[0]
  cfg, params = checkpoint.load_model(tmp_path / "ft" / "best")
  assert params["classifier"]["dense"]["kernel"].shape == (cfg.hidden_size, 2)
  runs.run_code(f"""
      from bert_jax import convert
      convert.main(["to-hf", {str(workdir)!r}, {str(tmp_path / "hf")!r}])
  """, devices=1)
  from bert_jax.convert import load_hf
  _, hf = load_hf(tmp_path / "hf")
  _, ours = checkpoint.load_model(workdir)
  for a, b in zip(jax.tree.leaves(hf["bert"]), jax.tree.leaves(ours["bert"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_resume_on_four_devices(prepared, pretrained, tmp_path):
  """Steps 11-20 run again on 4 devices from the 8-device step 10: the loader continues after
  the same examples and the losses agree to float rounding (reductions run in another order)."""
  fsdp, workdir = pretrained
  work4 = tmp_path / "four"
  shutil.copytree(workdir, work4)
  shutil.rmtree(work4 / "checkpoints" / "20")
  out = runs.run("pretrain", runs.pretrain_config(prepared, **{"train.fsdp": min(fsdp, 4)}),
                 work4, devices=4)
  assert "resuming from step 10" in out
  eight, four = runs.losses(workdir), runs.losses(work4)
  assert sorted(four) == list(range(1, 21))
  assert [four[s] for s in range(11, 21)] == pytest.approx([eight[s] for s in range(11, 21)],
                                                           abs=2e-5)


def test_errors_name_the_directory(prepared, pretrained, tmp_path):
  _, workdir = pretrained
  with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path}: not a bert_jax model"):
    checkpoint.load_model(tmp_path)
  # A resume whose configuration does not fit: named, not taken for a broken step.
  config = runs.pretrain_config(prepared, **{"model.variant": "mini"})
  s = pretrain.setup(config, tmp_path / "other")
  mngr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_DIR)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/20/state: the checkpoint "
                     r"does not hold the state this configuration expects \(.*other shapes"):
    checkpoint.restore_latest(mngr, trainer.abstract_state(s.objective, s.tx, s.mesh))
  # Unreadable arrays in every step of a workdir: each named, never "not a bert_jax model".
  broken = tmp_path / "broken"
  shutil.copytree(workdir / "checkpoints", broken / "checkpoints")
  for f in (broken / "checkpoints").glob("*/state/d/*"):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(checkpoint.CheckpointError, match=r"broken: no readable step in .*"
                     r"checkpoints \(.*checkpoints/20/state: no readable Orbax"):
    checkpoint.load_model(broken)
