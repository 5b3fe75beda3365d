"""The step-throughput benchmark: records, FLOP counts, combinations, the Hugging Face A/B path."""

import glob
import importlib.util
import json
import os
import re

import jax
import pytest

from bert_jax import bench, sharding

HAS_TORCH = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"))

# Peaks from 256^3 matmuls (2048^3 by default): the probes, not the steps, took most of a test.
TINY = ["--variant", "tiny", "--batch_size", "4", "--seq_len", "32", "--steps", "2",
        "--warmup", "1", "--probe_size", "256"]
KEYS = ("task", "variant", "batch_size", "seq_len", "dtype", "devices", "backend", "compile_s",
        "step_s_median", "step_s_min", "step_s_max", "sequences_per_s", "tokens_per_s",
        "flops_per_step_analytic", "flops_per_step_xla", "achieved_flops_per_s",
        "peak_flops_per_s", "peak_source", "mfu", "peak_memory_bytes", "compiles", "cpu_model",
        "versions", "xla_matmul_peak_flops", "state_bytes_per_device", "fsdp")


def tiny_training_flops(batch: int, seq: int, preds: int, v: int = 30522) -> int:
  """BERT-tiny (2 layers, hidden 128, FFN 512, vocab v) as a list of matmuls [m, k] @ [k, n]."""
  d, f, tokens = 128, 512, batch * seq

  def layer(rows):  # k, v from every token; q, out, FFN and attention at `rows` query rows
    return ([(tokens, d, d)] * 2 + [(rows, d, d)] * 2 + [(rows, d, f), (rows, f, d)]
            + [(rows, d, seq)] * 2)  # scores q.k over all heads; probs.v
  # sparse_last_layer: the second (last) layer at the [CLS] and the masked positions only
  heads = [(batch * preds, d, d), (batch * preds, d, v)]  # MLM transform, tied decoder
  heads += [(batch, d, d), (batch, d, 2)]  # pooler, NSP
  forward = sum(2 * m * k * n for m, k, n in layer(tokens) + layer(batch * (1 + preds)) + heads)
  return 3 * forward


def test_one_sane_record_per_combination(tmp_path):
  out = tmp_path / "bench.jsonl"
  records = bench.main(TINY + ["--seq_len", "16,32", "--grad_accum", "2", "--devices", "2",
                               "--json", str(out)])
  assert [json.loads(line) for line in out.read_text().splitlines()] == records
  assert [(r["seq_len"], r["max_predictions"]) for r in records] == [(16, 3), (32, 5)]
  for r in records:
    assert set(KEYS) <= set(r)
    assert (r["variant"], r["batch_size"], r["devices"], r["grad_accum"]) == ("tiny", 4, 2, 2)
    assert r["steps"] == 2 and r["compiles"] == 1 and r["backend"] == "cpu"
    assert r["tokens_per_s"] > 0 and r["compile_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    assert r["tokens_per_s"] == pytest.approx(r["seq_len"] * r["sequences_per_s"])
    assert r["flops_per_step_analytic"] == tiny_training_flops(4, r["seq_len"],
                                                               r["max_predictions"])
    assert r["flops_per_step_xla"] is None  # the micro-batches run in a loop
    assert 0 < r["mfu"] and r["peak_flops_per_s"] > 0 and r["peak_source"].startswith("measured")
    assert r["cpu_model"] and r["versions"]["jax"] == jax.__version__
    assert set(r["xla_matmul_peak_flops"]) == {"float32", "bfloat16"}


def test_profile_finds_every_matmul_and_names_the_parts_of_the_step(tmp_path):
  # Two micro-batches of two rows per device: the step's dots run in a loop, twice per step (at
  # one row XLA turns the pooler's and NSP head's matrix-vector products into other ops).
  (r,) = bench.main(TINY + ["--batch_size", "8", "--devices", "2", "--grad_accum", "2",
                            "--profile", str(tmp_path)])
  p = r["profile"]
  assert glob.glob(os.path.join(p["trace_dir"], "**", "*.xplane.pb"), recursive=True)
  parts = p["categories"]
  assert {"matmul", "optimizer", "dropout", "layer norm", "attention (softmax, masks)",
          "feed-forward (GELU)", "embeddings", "collective"} <= set(parts)
  assert all(v["s"] > 0 for v in parts.values())
  assert sum(v["s"] for v in parts.values()) == pytest.approx(p["op_s_per_step"])
  assert sum(v["share"] for v in parts.values()) == pytest.approx(1.0)
  # One device's dots are half the step's analytic FLOPs, plus the MLM output bias's gradient,
  # a matmul with ones over the masked positions: 2 x (8 / 2 rows x 5 positions) x 30522.
  assert p["matmul_flops_per_step"] == pytest.approx(
      r["flops_per_step_analytic"] // 2 + 2 * 4 * 5 * 30522, rel=1e-12)
  # The rate leaves out XLA:CPU's plain dots (Eigen's), whose op events close before they finish.
  assert 0 <= p["eigen_dot_flops_per_step"] < p["matmul_flops_per_step"]
  assert p["matmul_flops_per_s"] == pytest.approx(
      (p["matmul_flops_per_step"] - p["eigen_dot_flops_per_step"])
      / (p["matmul_s_per_step"] - p["eigen_dot_s_per_step"]))
  assert [o["ms"] for o in p["top_ops"]] == sorted((o["ms"] for o in p["top_ops"]), reverse=True)
  assert p["wall"]["one_op_s"] > 0 and p["wall"]["idle_s"] >= 0 and p["wall"]["overlap_s"] >= 0


def test_profile_splits_the_wall_time_by_how_many_ops_run_at_once():
  from bert_jax import step_profile
  # two steps: a 0-10 and b 5-20 overlap 5 ns; nothing runs 20-30; c alone 30-40
  events = [("c", 30, 40), ("a", 0, 10), ("b", 5, 20)]
  wall = step_profile.occupancy(events, steps=2)
  assert wall == pytest.approx({"idle_s": 5e-9, "one_op_s": 12.5e-9, "overlap_s": 2.5e-9})


@pytest.mark.slow  # CI: fused attention against einsum in tests/test_model.py and test_packing.py
def test_fused_attention_runs_without_attention_dropout():
  (r,) = bench.main(TINY + ["--devices", "1", "--attention", "dot_product"])
  assert (r["attention"], r["attention_dropout"], r["dtype"]) == ("dot_product", 0.0, "float32")
  both = bench.parse_args(["--attention", "einsum,dot_product"]).attention
  assert both == ["einsum", "dot_product"]  # one record each, like the other lists


def test_fine_tuning_step_and_custom_sizes():
  (r,) = bench.main(TINY + ["--task", "classification", "--variant", "L3-H48-A4", "--devices",
                            "2", "--fsdp", "2"])
  assert (r["task"], r["layers"], r["hidden"], r["heads"], r["fsdp"]) == (
      "classification", 3, 48, 4, 2)
  d, f, b, t = 48, 192, 4, 32
  layer = 2 * t * (4 * d * d + 2 * d * f) + 2 * 2 * t * t * d
  last = 2 * t * 2 * d * d + 2 * (2 * d * d + 2 * d * f) + 2 * 2 * t * d  # at [CLS] only
  assert r["flops_per_step_analytic"] == 3 * b * (2 * layer + last + 2 * (d * d + 2 * d))
  assert r["tokens_per_s"] > 0 and r["compiles"] == 1
  assert r["flops_per_step_xla"] > 0  # no loop in this step


def test_xla_flops_are_left_out_where_the_step_loops_and_steps_run_compiled():
  """XLA's cost analysis counts a while loop's body once (scanned layers here; micro-batches in
  test_one_sane_record_per_combination), so the record leaves its count out there (an unrolled
  step keeps it: test_fine_tuning_step_and_custom_sizes). The runner times the executable
  compiled ahead of time: the jitted function's dispatch (tracing, compiling) never runs."""
  cfg = bench.model_config("L3-H32-A4", vocab_size=99).replace(intermediate_size=37,
                                                                scan_layers=True)
  ours = bench.OursRunner(cfg, sharding.make_mesh(1), bench.synthetic_batch(4, 16, 3, 99),
                          "adamw", 1)
  assert ours.xla_flops is None  # two layers in a loop (one would be unrolled by XLA)
  ours.run(1)
  assert ours.step._cache_size() == 0


def test_scanned_layers_count_the_sparse_last_layer_too():
  """A scanned encoder runs its last layer sparse as an unrolled one does (model.Encoder), so
  the FLOPs are the same; one scanned layer runs whole."""
  cfg = bench.model_config("tiny")
  flops = lambda c: bench.analytic_flops(c, 4, 32, 5)  # noqa: E731
  assert flops(cfg.replace(scan_layers=True)) == flops(cfg) == tiny_training_flops(4, 32, 5)
  one = cfg.replace(num_layers=1)
  assert flops(one.replace(scan_layers=True)) == flops(one.replace(sparse_last_layer=False))
  assert flops(one) < flops(one.replace(scan_layers=True))


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "6", "--grad_accum", "4"], "divisible by devices \\* grad_accum"),
    (["--seq_len", "1024"], "exceeds the position table"),
    (["--variant", "L2-H30-A4"], "not divisible"),
])
def test_impossible_settings_are_refused(args, message):
  with pytest.raises(ValueError, match=message):
    bench.main(TINY + ["--devices", "1"] + args)


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "8,0"], "--batch_size 0: expected a positive number"),
    (["--grad_accum", "0"], "--grad_accum 0: expected a positive number"),
    (["--steps", "0"], "--steps 0: expected a positive number"),
    (["--pairs", "0"], "--pairs 0: expected a positive number"),
    (["--warmup", "0"], "--warmup 0: expected a positive number"),  # or it times the first
    (["--switch_warmup", "-1"], "--switch_warmup -1: expected 0 or more"),
    (["--devices", "4", "--fsdp", "3"], "--fsdp 3 does not divide --devices 4"),
    (["--profile", __file__], "is a file; expected a directory for the traces"),
])
def test_bad_flags_are_refused_before_anything_runs(args, message):
  from bert_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=re.escape(message)):
    bench.main(TINY + args)


@pytest.mark.parametrize("args,named", [
    (["--optimizer", "lamb"], "--optimizer lamb"),
    (["--grad_accum", "1,2"], "--grad_accum 2"),
    (["--optimizer", "lamb", "--grad_accum", "2"], "--optimizer lamb and --grad_accum 2"),
])
def test_against_hf_torch_refuses_what_the_peer_does_not_run(capsys, args, named):
  """The peer runs AdamW on the whole batch: LAMB or micro-batches would time other work."""
  with pytest.raises(SystemExit) as exit_:
    bench.main(TINY + ["--against", "hf-torch"] + args)
  assert exit_.value.code == 2
  assert (f"--against hf-torch runs the peer with AdamW on the whole batch at once; {named} "
          "would time different work") in capsys.readouterr().err


def test_the_record_names_the_cpu_family_model_stepping_and_flags():
  """"AMD EPYC" is a Zen 3 without AVX-512 (family 25 model 1) or a Zen 4 with avx512_bf16
  (family 25 model 17): the record keeps what tells them apart."""
  if not os.path.exists("/proc/cpuinfo"):
    pytest.skip("no /proc/cpuinfo")
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    first = f.read().split("\n\n")[0]
  fields = dict((k.strip(), v.strip()) for k, _, v in
                (line.partition(":") for line in first.splitlines()))
  if "flags" not in fields:
    pytest.skip("/proc/cpuinfo without x86 fields")
  m = bench.machine()
  assert (m["cpu_model"], m["cpu_family"], m["cpu_model_number"], m["cpu_stepping"]) == (
      fields["model name"], int(fields["cpu family"]), int(fields["model"]),
      int(fields["stepping"]))
  flags = set(fields["flags"].split())
  assert m["cpu_flags"] == {f: f in flags for f in (
      "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def test_an_unknown_attention_is_refused(capsys):
  with pytest.raises(SystemExit) as exit_:
    bench.main(TINY + ["--attention", "einsum,flash"])
  assert exit_.value.code == 2
  assert "--attention: 'flash' is not one of einsum, dot_product" in capsys.readouterr().err


@pytest.mark.parametrize("kind,peak", [
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_uses_the_chips_published_bf16_peak(kind, peak):
  """MFU on an accelerator is against the chip's published dense bfloat16 peak, found from jax's
  device_kind; a chip we do not know gets None (bench then asks for --peak_flops)."""
  assert bench.published_peak(kind) == peak


def test_default_max_predictions_matches_bert():
  assert [bench.default_max_predictions(t) for t in (20, 32, 128, 512)] == [3, 5, 20, 77]


def test_synthetic_batch_has_padding_and_real_predictions():
  b = bench.synthetic_batch(16, 128, 20, 30522, seed=1)
  lengths = b["input_mask"].sum(1)
  assert lengths.min() >= 102 and lengths.min() < 128
  real = b["masked_lm_weights"] > 0
  assert (b["masked_lm_positions"][real] < lengths.repeat(real.sum(1))).all()
  assert (b["input_ids"][b["input_mask"] == 0] == 0).all()


@pytest.mark.skipif(not HAS_TORCH, reason="torch and transformers count the peer's FLOPs")
@pytest.mark.parametrize("task", ["pretraining", "classification"])
def test_peer_flops_are_what_torch_counts_of_the_peers_step(task):
  """Stock BertForPreTraining runs the last layer and the MLM head at every position, and
  BertForSequenceClassification the last layer at every position: more than our step."""
  from torch.utils.flop_counter import FlopCounterMode

  from bert_jax import bench_peer
  cfg = bench.model_config("L2-H32-A4", vocab_size=99).replace(intermediate_size=37)
  batch = (bench.classification_batch(3, 16, 99) if task == "classification" else
           bench.synthetic_batch(3, 16, 3, 99))
  peer = bench_peer.Runner(json.loads(cfg.to_json()), task, batch)
  with FlopCounterMode(display=False) as counter:
    peer.model(**peer.inputs).loss.backward()
  assert bench.peer_flops(cfg, 3, 16, task) == counter.get_total_flops()
  assert bench.peer_flops(cfg, 3, 16, task) > bench.analytic_flops(cfg, 3, 16, 3, task)


@pytest.mark.skipif(not HAS_TORCH, reason="--against hf-torch needs torch and transformers")
def test_against_hf_torch_gives_a_ratio():
  (r,) = bench.main(TINY + ["--devices", "1", "--against", "hf-torch", "--pairs", "1",
                            "--steps", "1", "--warmup", "1", "--peak_flops", "1e12",
                            "--vocab_size", "8000", "--dtype", "bfloat16", "--remat", "full"])
  assert r["against"] == "hf-torch" and len(r["ratios"]) == 1
  assert r["dtype"] == r["peer_dtype"] == "bfloat16"  # the peer under torch.autocast
  assert (r["remat"], r["peer_remat"]) == ("full", "none")  # the same model FLOPs
  assert r["vocab_size"] == 8000
  assert r["flops_per_step_analytic"] == tiny_training_flops(4, 32, 5, v=8000)
  assert r["ratio_median"] > 0 and r["hf_tokens_per_s"] > 0
  # the peer's work: the last layer and the MLM head at all 32 positions
  ours, theirs = r["flops_per_step_analytic"], r["hf_flops_per_step"]
  assert theirs == bench.peer_flops(bench.model_config("tiny", vocab_size=8000), 4, 32) > ours
  assert r["hf_achieved_flops_per_s"] == pytest.approx(theirs / r["hf_step_s_median"])
  assert r["equal_work_ratios"] == pytest.approx([x * ours / theirs for x in r["ratios"]])
  assert r["equal_work_ratio_median"] == pytest.approx(r["ratio_median"] * ours / theirs)
  assert set(r["torch_matmul_peak_flops"]) == set(r["torch_matmul_peak_n"]) == {
      "float32", "bfloat16"}
  assert set(r["torch_matmul_peak_n"].values()) == {256}  # --probe_size, for the peer too
  assert r["peer_process"] != os.getpid()  # the peer ran in a process of its own


@pytest.mark.skipif(not HAS_TORCH, reason="--against hf-torch needs torch and transformers")
@pytest.mark.slow  # CI: the pretraining step's peer, the same A/B code
def test_fine_tuning_step_against_hf_torch():
  (r,) = bench.main(TINY + ["--task", "classification", "--devices", "1", "--against",
                            "hf-torch", "--pairs", "1", "--steps", "1", "--warmup", "1"])
  assert r["task"] == "classification" and r["ratio_median"] > 0
  assert r["dtype"] == r["peer_dtype"] == "float32"
  assert r["peak_source"] == "measured float32 256^3 matmul, best of the run"


def test_packing_bench_names_a_failed_run_and_leaves_nothing_behind(tmp_path, monkeypatch,
                                                                    tmp_path_factory):
  from bert_jax import bench_packing
  from bert_jax.errors import BertJaxError
  inputs = tmp_path_factory.mktemp("inputs")
  for name, text in (("train.tsv", "a b\t1\n"), ("dev.tsv", "c\t0\n"), ("tok.model", "x")):
    (inputs / name).write_text(text)
  monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
  with pytest.raises(BertJaxError, match=r"(?s)fine-tuning run in .*padded_seed0 failed "
                                         r"\(exit 2\).*tok.model: not a SentencePiece model"):
    bench_packing.main(["classification", "--train_file", str(inputs / "train.tsv"),
                        "--eval_file", str(inputs / "dev.tsv"), "--tokenizer",
                        str(inputs / "tok.model"), "--seeds", "0"])
  assert list(tmp_path.iterdir()) == []  # its temporary workdir is gone


@pytest.mark.parametrize("args,message", [
    (["--train_file", "/no/train.tsv", "--eval_file", __file__, "--tokenizer", __file__],
     "--train_file /no/train.tsv: no such file or directory"),
    (["--train_file", __file__, "--eval_file", __file__],
     "give --init_from (a model to fine-tune) or --tokenizer (a random initialisation)"),
])
def test_packing_bench_checks_its_inputs_before_any_run(args, message):
  from bert_jax import bench_packing
  from bert_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=re.escape(message)):
    bench_packing.main(["classification", *args])


def test_packing_bench_refuses_an_object_store_workdir_for_its_local_shards():
  from bert_jax import bench_packing
  from bert_jax.errors import BertJaxError
  with pytest.raises(BertJaxError, match="--workdir gs://bucket/w: .* give a local directory"):
    bench_packing.main(["pretraining", "--workdir", "gs://bucket/w"])


@pytest.mark.slow
def test_packing_bench_runs_padded_and_packed_fine_tuning(tmp_path):
  import runs

  from bert_jax import bench_packing
  prepared = runs.prepare(tmp_path)
  result = bench_packing.main([
      "classification", "--train_file", prepared["train_file"], "--eval_file",
      prepared["eval_file"], "--tokenizer", prepared["data.tokenizer"], "--seeds", "0",
      "--max_seq_length", "32", "--workdir", str(tmp_path / "w"), "--",
      "--config.train.batch_size=8", "--config.train.eval_batch_size=8",
      "--config.train.max_steps=2"])
  assert [(r["seed"], r["packed"]) for r in result["runs"]] == [(0, False), (0, True)]
  for side in ("padded", "packed"):
    assert result[side]["wall_s"] > 0 and 0 <= result[side]["accuracy"] <= 1
    assert (tmp_path / "w" / f"{side}_seed0" / "eval_results.json").exists()
  assert result["cpu_model"] and result["wall_ratio"] > 0


def test_packing_bench_times_padded_and_packed_pretraining_steps(tmp_path):
  import runs

  from bert_jax import bench_packing
  prepared = runs.prepare(tmp_path)
  # Documents of four lines: most instances end early, so padding is most of a padded row.
  lines = (tmp_path / "corpus.txt").read_text(encoding="utf-8").splitlines()[:1200]
  (tmp_path / "short.txt").write_text(
      "\n\n".join("\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)) + "\n",
      encoding="utf-8")
  result = bench_packing.main([
      "pretraining", "--seq_len", "64", "--variant", "tiny", "--batch_size", "4", "--steps", "1",
      "--warmup", "1", "--repeats", "1", "--corpus", str(tmp_path / "short.txt"),
      "--tokenizer", prepared["data.tokenizer"], "--workdir", str(tmp_path / "w")])
  assert result["padding_share_packed"] < result["padding_share_unpacked"]
  padded, packed = result["padded"], result["packed"]
  assert packed["real_share"] > padded["real_share"]
  assert result["same_step_time_bound"] == pytest.approx(packed["real_share"]
                                                          / padded["real_share"])
  (pair,) = result["real_tokens_per_s_ratio_per_pair"]
  assert result["real_tokens_per_s_ratio"] == pair == pytest.approx(
      packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
  assert packed["examples_per_s"] > 0 and result["cpu_model"]
  # Without warmup the worker times the compiled step alone (it compiles ahead of time).
  alone = bench_packing._pretraining_worker(str(tmp_path / "w" / "packed_64"), "tiny", 4, 1, 0)
  assert alone["seconds_per_step"] > 0 and alone["loss"] > 0


def test_packing_bench_needs_a_warmup_step(capsys):
  from bert_jax import bench_packing
  with pytest.raises(SystemExit) as exit_:
    bench_packing.main(["pretraining", "--warmup", "0"])
  assert exit_.value.code == 2
  assert "--warmup and --repeats must be >= 1" in capsys.readouterr().err
