"""The step-throughput benchmark: records, FLOP counts, combinations, the Hugging Face A/B path."""

import importlib.util
import json

import pytest

from bert_jax import bench

TINY = ["--variant", "tiny", "--batch_size", "4", "--seq_len", "32", "--steps", "2",
        "--warmup", "1"]
KEYS = ("variant", "batch_size", "seq_len", "dtype", "devices", "backend", "compile_s",
        "step_s_median", "step_s_min", "step_s_max", "sequences_per_s", "tokens_per_s",
        "flops_per_step_analytic", "flops_per_step_xla", "achieved_flops_per_s",
        "peak_flops_per_s", "peak_source", "mfu", "peak_memory_bytes", "compiles")


def tiny_training_flops(batch: int, seq: int, preds: int, v: int = 30522) -> int:
  """BERT-tiny (2 layers, hidden 128, FFN 512, vocab v) as a list of matmuls [m, k] @ [k, n]."""
  layers, d, f = 2, 128, 512
  tokens = batch * seq
  per_layer = [(tokens, d, d)] * 4 + [(tokens, d, f), (tokens, f, d)]  # q, k, v, out; FFN
  per_layer += [(batch * seq, d, seq)] * 2  # scores q.k over all heads; probs.v
  heads = [(batch * preds, d, d), (batch * preds, d, v)]  # MLM transform, tied decoder
  heads += [(batch, d, d), (batch, d, 2)]  # pooler, NSP
  forward = sum(2 * m * k * n for m, k, n in per_layer * layers + heads)
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
    assert r["flops_per_step_xla"] is None or r["flops_per_step_xla"] > 0
    assert 0 < r["mfu"] and r["peak_flops_per_s"] > 0 and r["peak_source"].startswith("measured")


def test_default_max_predictions_matches_bert():
  assert [bench.default_max_predictions(t) for t in (20, 32, 128, 512)] == [3, 5, 20, 77]


def test_synthetic_batch_has_padding_and_real_predictions():
  b = bench.synthetic_batch(16, 128, 20, 30522, seed=1)
  lengths = b["input_mask"].sum(1)
  assert lengths.min() >= 102 and lengths.min() < 128
  real = b["masked_lm_weights"] > 0
  assert (b["masked_lm_positions"][real] < lengths.repeat(real.sum(1))).all()
  assert (b["input_ids"][b["input_mask"] == 0] == 0).all()


@pytest.mark.skipif(not (importlib.util.find_spec("torch") and
                         importlib.util.find_spec("transformers")),
                    reason="torch and transformers are needed for --against hf-torch")
def test_against_hf_torch_gives_a_ratio():
  (r,) = bench.main(TINY + ["--devices", "1", "--against", "hf-torch", "--pairs", "1",
                            "--steps", "1", "--warmup", "0", "--peak_flops", "1e12",
                            "--vocab_size", "8000"])
  assert r["against"] == "hf-torch" and len(r["ratios"]) == 1
  assert r["vocab_size"] == 8000
  assert r["flops_per_step_analytic"] == tiny_training_flops(4, 32, 5, v=8000)
  assert r["ratio_median"] > 0 and r["hf_tokens_per_s"] > 0
