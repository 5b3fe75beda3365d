"""Pretraining data: the BERT recipe's statistics on the shared English and Chinese corpora,
whole-word masking, determinism, the loader (slices, resume, dynamic masking) and bad input."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import tokenizer
from bert_jax.data import pretraining
from bert_jax.data.errors import DataError
from bert_jax.data.loader import PretrainingLoader


def _load_split(data_dir, split="train"):
  m = pretraining.read_manifest(data_dir)
  arrays = {}
  for k in m["features"]:
    arrays[k] = np.concatenate([np.load(pathlib.Path(data_dir) / f"{s['name']}.{k}.npy")
                                for s in m["splits"][split]["shards"]])
  return arrays


def check_instances(f, tok, whole_word=False):
  """The recipe's invariants over a dict of stacked features; returns the measured shares."""
  ids, mask, seg = f["input_ids"], f["input_mask"], f["segment_ids"]
  pos, lab, w = f["masked_lm_positions"], f["masked_lm_ids"], f["masked_lm_weights"]
  lengths = mask.sum(1)
  n_masked = w.sum(1).astype(int)
  special = np.isin(np.arange(tok.vocab_size), tok.special_ids)
  never = special.copy()  # never chosen: every special token but [UNK], as in the original
  never[tok.unk_id] = False
  counts = {"mask": 0, "same": 0, "random": 0}
  for i in range(len(ids)):
    n, k = lengths[i], n_masked[i]
    assert (mask[i, :n] == 1).all() and (mask[i, n:] == 0).all()
    seps = np.flatnonzero(ids[i, :n] == tok.sep_id)
    assert ids[i, 0] == tok.cls_id and seps[-1] == n - 1
    assert (seg[i, :seps[0] + 1] == 0).all() and (seg[i, seps[0] + 1:n] == 1).all()
    p = pos[i, :k]
    assert (np.diff(p) > 0).all(), "positions sorted and unique"
    assert ((p > 0) & (p < n)).all() and not np.isin(p, seps).any(), "no [CLS]/[SEP]/padding"
    assert (w[i, k:] == 0).all() and (pos[i, k:] == 0).all()
    assert not never[lab[i, :k]].any()
    got = ids[i, p]
    counts["mask"] += int((got == tok.mask_id).sum())
    counts["same"] += int((got == lab[i, :k]).sum())
    counts["random"] += int(((got != tok.mask_id) & (got != lab[i, :k])).sum())
    assert not special[got[(got != tok.mask_id) & (got != lab[i, :k])]].any()  # replacements
    if whole_word:
      original = ids[i, :n].copy()
      original[p] = lab[i, :k]
      starts = tok.word_starts[original] | never[original]
      chosen = np.zeros(n, bool)
      chosen[p] = True
      word = np.cumsum(starts)
      for wid in np.unique(word[p]):
        assert chosen[(word == wid) & ~never[original]].all(), "a word was split"
  total = sum(counts.values())
  return {"masked_share": w.sum() / (lengths - 3).sum(),
          "mask": counts["mask"] / total, "same": counts["same"] / total,
          "random": counts["random"] / total, "nsp_random": f["next_sentence_labels"].mean(),
          "instances": len(ids)}


@pytest.fixture(scope="module")
def en(tmp_path_factory):
  shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  corpus = shared / "corpus/en/en_pd_all.sentences.txt"
  if not corpus.is_file():
    pytest.skip(f"{corpus} not found (the shared data sets live beside the checkout)")
  d = tmp_path_factory.mktemp("en")
  return corpus, tokenizer.train_sentencepiece([str(corpus)], 8000, str(d / "sp")), d


@pytest.mark.parametrize("whole_word", [False, True])
def test_recipe_statistics_english(en, whole_word):
  corpus, tok_path, d = en
  out = d / f"wwm{whole_word}"
  m = pretraining.create_pretraining_data([corpus], tok_path, out, max_seq_length=128,
                                          max_predictions_per_seq=20, dupe_factor=1,
                                          whole_word_mask=whole_word, seed=7)
  stats = check_instances(_load_split(out), tokenizer.load(tok_path), whole_word)
  print("en", "wwm" if whole_word else "token", m["instances_per_s"], "instances/s", stats)
  assert stats["instances"] > 5000
  assert abs(stats["masked_share"] - 0.15) < 0.01
  assert abs(stats["mask"] - 0.8) < 0.02 and abs(stats["same"] - 0.1) < 0.02
  assert abs(stats["random"] - 0.1) < 0.02
  assert abs(stats["nsp_random"] - 0.5) < 0.03


def test_recipe_statistics_chinese(tmp_path):
  shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  corpus = shared / "corpus/zh/zh_hans_wiki_cmrc2018_contexts.sentences.txt"
  if not corpus.is_file():
    pytest.skip(f"{corpus} not found (the shared data sets live beside the checkout)")
  tok = tokenizer.load(tokenizer.train_sentencepiece([str(corpus)], 8000, str(tmp_path / "sp")))
  lines = [s for s in corpus.read_text(encoding="utf-8").splitlines() if s][:2000]
  cjk = 0
  for line in lines:
    ids, offsets = tok.encode_with_offsets(line)
    for (a, b), piece in zip(offsets, tok.tokens(ids), strict=False):
      if any(tokenizer.is_cjk(c) for c in line[a:b]):
        assert b - a == 1 and piece.lstrip("\u2581") in (line[a], "[UNK]"), (line, piece)
        cjk += 1
  assert cjk == sum(tokenizer.is_cjk(c) for line in lines for c in line)
  out = tmp_path / "data"
  pretraining.create_pretraining_data([corpus], tok.path, out, dupe_factor=1,
                                      whole_word_mask=True, seed=3)
  stats = check_instances(_load_split(out), tok, whole_word=True)
  print("zh", stats)
  assert abs(stats["masked_share"] - 0.15) < 0.01 and abs(stats["nsp_random"] - 0.5) < 0.03
  assert abs(stats["mask"] - 0.8) < 0.02


@pytest.mark.parametrize("fraction,warned", [(0.01, True), (0.1, False), (0.0, False)])
def test_an_eval_split_of_one_document_is_warned_about(caplog, fraction, warned):
  """Random-next B segments come from another document of the same split: an eval split of one
  document has none, and the user is told (eval_fraction 0.01 of 50 documents)."""
  import logging
  from types import SimpleNamespace
  with caplog.at_level(logging.WARNING, logger="bert_jax.data.pretraining"):
    split = pretraining._split_documents(SimpleNamespace(num_documents=lambda: 50), fraction, 0)
  assert len(split.get("eval", [])) == {0.01: 1, 0.1: 5, 0.0: 0}[fraction]
  assert ("eval split holds 1 document of 50" in caplog.text) == warned, caplog.text


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A tokenizer and the first 200 kB of the bundled corpus."""
  d = tmp_path_factory.mktemp("small")
  corpus = d / "corpus.txt"
  text = pretraining.default_corpus_path().read_text(encoding="utf-8")[:200_000]
  corpus.write_text(text[:text.rindex("\n\n")] + "\n", encoding="utf-8")
  return corpus, tokenizer.train_sentencepiece([str(corpus)], 1000, str(d / "sp")), d


def test_same_seed_same_bytes_any_worker_count(small):
  corpus, tok, d = small
  kw = dict(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2, eval_fraction=0.1,
            shard_size=500, docs_per_task=4)
  a = pretraining.create_pretraining_data([corpus], tok, d / "a", seed=5, workers=1, **kw)
  pretraining.create_pretraining_data([corpus], tok, d / "b", seed=5, workers=2, **kw)
  pretraining.create_pretraining_data([corpus], tok, d / "c", seed=6, workers=1, **kw)
  assert len(a["splits"]["train"]["shards"]) > 1 and a["splits"]["eval"]["num_instances"] > 0
  files = sorted(p.name for p in (d / "a").glob("*.npy"))
  assert files == sorted(p.name for p in (d / "b").glob("*.npy"))
  for name in files:
    assert (d / "a" / name).read_bytes() == (d / "b" / name).read_bytes(), name
  assert (d / "a" / "train-00000.input_ids.npy").read_bytes() != (
      d / "c" / "train-00000.input_ids.npy").read_bytes()


def test_loader_slices_resume_and_epochs(small):
  corpus, tok, d = small
  pretraining.create_pretraining_data([corpus], tok, d / "l", max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1, seed=1)
  full = PretrainingLoader(d / "l", "train", 32, seed=3)
  n_batches = len(full)
  batches = [next(full) for _ in range(n_batches + 3)]  # into the second epoch
  assert all(b["input_ids"].shape == (32, 64) and b["input_ids"].dtype == np.int32
             for b in batches)
  first = np.concatenate([b["input_ids"] for b in batches[:n_batches]])
  assert len({r.tobytes() for r in first}) == n_batches * 32  # no repeats within an epoch
  assert not np.array_equal(batches[0]["input_ids"], batches[n_batches]["input_ids"])
  assert full.get_state()["epoch"] == 1
  # Two processes read disjoint halves that make up the same global batch.
  halves = [PretrainingLoader(d / "l", "train", 32, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for b in batches[:3]:
    parts = [next(h) for h in halves]
    for k in b:
      assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), b[k])
  # Resume from a saved state gives the same batches.
  again = PretrainingLoader(d / "l", "train", 32, seed=3)
  for _ in range(5):
    next(again)
  state = json.loads(json.dumps(again.get_state()))
  resumed = PretrainingLoader(d / "l", "train", 32, seed=3)
  resumed.set_state(state)
  for b in batches[5:n_batches + 3]:
    got = next(resumed)
    assert all(np.array_equal(got[k], b[k]) for k in b)
  # Evaluation: one pass in file order, then the end.
  ev = PretrainingLoader(d / "l", "train", 32, shuffle=False, num_epochs=1)
  assert sum(1 for _ in ev) == n_batches


@pytest.mark.parametrize("dynamic", [False, True])
def test_an_evaluation_pass_counts_every_instance_once(small, dynamic):
  """A batch that does not divide the split: the last batch is filled with rows weighing 0, so
  the pass holds every instance once, in file order, on one process or split over two; a split
  smaller than one batch is evaluated too."""
  corpus, tok, d = small
  out = d / f"ev{int(dynamic)}"
  pretraining.create_pretraining_data([corpus], tok, out, max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1, seed=1,
                                      eval_fraction=0.2, dynamic_masking=dynamic)
  n = PretrainingLoader(out, "eval", 2, shuffle=False, num_epochs=1).instances.num_instances
  batch = 24 if n % 24 else 28
  assert n % batch and n > batch
  one = list(PretrainingLoader(out, "eval", batch, shuffle=False, num_epochs=1,
                               pad_remainder=True))
  assert len(one) == -(-n // batch)
  real = np.concatenate([b["example_mask"] for b in one]) > 0
  assert real.sum() == n and real[:n].all()
  stored = PretrainingLoader(out, "eval", n, shuffle=False, num_epochs=1).instances.rows(
      np.arange(n))
  for k in ("input_mask", "segment_ids") + (() if dynamic else ("input_ids",)):  # dynamic: masked
    np.testing.assert_array_equal(np.concatenate([b[k] for b in one])[:n], stored[k], err_msg=k)
  weights = np.concatenate([b["masked_lm_weights"] for b in one])
  assert weights[n:].sum() == 0 and weights[:n].sum() > 0
  if not dynamic:
    np.testing.assert_array_equal(weights[:n], stored["masked_lm_weights"])
  halves = [list(PretrainingLoader(out, "eval", batch, process_index=p, process_count=2,
                                   shuffle=False, num_epochs=1, pad_remainder=True))
            for p in range(2)]
  for whole, a, b in zip(one, *halves, strict=True):
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k], err_msg=k)
  small_split = list(PretrainingLoader(out, "eval", 2 * n, shuffle=False, num_epochs=1,
                                       pad_remainder=True))
  assert len(small_split) == 1 and small_split[0]["example_mask"].sum() == n


def test_shards_that_disagree_with_the_manifest_are_named_up_front(small):
  corpus, tok, d = small
  out = d / "cut"
  pretraining.create_pretraining_data([corpus], tok, out, max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1, seed=1)
  shard = out / "train-00000.input_ids.npy"
  np.save(shard, np.load(shard)[:, :32])  # an edited or mixed data directory
  with pytest.raises(DataError, match=r"train-00000\.input_ids\.npy: instances of shape "
                     r"\(32,\), the manifest says \(64,\)"):
    PretrainingLoader(out, "train", 8)
  dyn = d / "cut_dynamic"
  pretraining.create_pretraining_data([corpus], tok, dyn, max_seq_length=64,
                                      max_predictions_per_seq=10, dupe_factor=1, seed=1,
                                      dynamic_masking=True)
  np.save(dyn / pretraining.WORD_STARTS, np.ones(500, bool))  # another vocabulary's
  with pytest.raises(DataError, match=r"word_starts\.npy: shape \(500,\), expected one entry "
                     r"per token id of the vocabulary \(1000"):
    PretrainingLoader(dyn, "train", 8)


def test_dynamic_masking(small):
  corpus, tok, d = small
  m = pretraining.create_pretraining_data([corpus], tok, d / "dyn", max_seq_length=128,
                                          max_predictions_per_seq=20, dupe_factor=1, seed=1,
                                          dynamic_masking=True)
  assert set(m["features"]) == {"input_ids", "input_mask", "segment_ids", "next_sentence_labels"}
  assert "masked_lm_positions" not in m["features"]
  loader = PretrainingLoader(d / "dyn", "train", 16, seed=2, shuffle=False)
  total = loader.instances.num_instances
  batches = [next(loader) for _ in range(total // 16 + 1)]  # the first epoch and a bit
  epoch0 = batches[:total // 16]
  stacked = {k: np.concatenate([b[k] for b in epoch0]) for k in epoch0[0]}
  stats = check_instances(stacked, tokenizer.load(tok))
  assert abs(stats["masked_share"] - 0.15) < 0.01 and abs(stats["mask"] - 0.8) < 0.03
  # Instance 0 again in the second epoch (no shuffle): same text, fresh masks.
  again = {k: v[total % 16] for k, v in batches[-1].items()}
  assert np.array_equal(again["segment_ids"], epoch0[0]["segment_ids"][0])
  assert not np.array_equal(again["masked_lm_positions"], epoch0[0]["masked_lm_positions"][0])
  # The masks depend on (seed, epoch, instance) only: two processes see the same.
  halves = [PretrainingLoader(d / "dyn", "train", 16, seed=2, shuffle=False, process_index=p,
                              process_count=2) for p in range(2)]
  parts = [next(h) for h in halves]
  assert np.array_equal(np.concatenate([p["masked_lm_positions"] for p in parts]),
                        epoch0[0]["masked_lm_positions"])


def _create(files, tok, out, **kw):
  return pretraining.create_pretraining_data(files, tok, out, max_seq_length=64,
                                             max_predictions_per_seq=10, dupe_factor=1, **kw)


def test_bad_input_and_nothing_lost(small, tmp_path):
  corpus, tok, _ = small
  good = tmp_path / "data"
  _create([corpus], tok, good)
  before = {p.name: p.read_bytes() for p in good.iterdir()}
  with pytest.raises(DataError, match="missing.txt: no such file"):
    _create([tmp_path / "missing.txt"], tok, good)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match="empty.txt: no text"):
    _create([empty], tok, good)
  single = tmp_path / "single.txt"
  single.write_text("One sentence.\n\nAnother document of one line.\n")
  with pytest.raises(DataError, match="single.txt: no document has two sentences"):
    _create([single], tok, good)
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"A good line.\nAnother.\n\nBad \xc3\x28 bytes.\n")
  with pytest.raises(DataError, match=r"bad.txt:4: not valid UTF-8"):
    _create([bad], tok, good)
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=100, minloglevel=2)
  with pytest.raises(tokenizer.TokenizerError, match="plain.model: the tokenizer has no"):
    _create([corpus], str(tmp_path / "plain.model"), good)
  assert {p.name: p.read_bytes() for p in good.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_command_line(small, tmp_path):
  corpus, tok, _ = small
  out = subprocess.run(
      [sys.executable, "-m", "bert_jax.data.pretraining", "--input_files", str(corpus),
       "--tokenizer", tok, "--output_dir", str(tmp_path / "cli"), "--max_seq_length", "64",
       "--max_predictions_per_seq", "10", "--dupe_factor", "1", "--whole_word_mask"],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["train"]["instances"] > 0 and summary["instances_per_s"] > 0
  assert pretraining.read_manifest(tmp_path / "cli")["whole_word_mask"] is True
  out = subprocess.run(
      [sys.executable, "-m", "bert_jax.data.pretraining", "--input_files",
       str(tmp_path / "nope*.txt"), "--tokenizer", tok, "--output_dir", str(tmp_path / "x")],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "nope*.txt: no such file" in out.stderr


@pytest.mark.parametrize("signum,code", [(15, 143), (2, 130)])
def test_a_stopped_data_step_says_so_and_leaves_nothing_behind(small, tmp_path, signum, code):
  """SIGTERM (a preemption) or Ctrl-C while the instances are written: exit 128 + the signal
  with one line, no temporary directory left beside the output (data can be many GB)."""
  import time
  corpus, tok, _ = small
  stale = tmp_path / ".cli.0123abcd.tmp"  # left by a process killed outright (SIGKILL)
  stale.mkdir()
  (stale / "input_ids.npy").write_bytes(b"partial")
  p = subprocess.Popen(
      [sys.executable, "-m", "bert_jax.data.pretraining", "--input_files", str(corpus),
       "--tokenizer", tok, "--output_dir", str(tmp_path / "cli"), "--max_seq_length", "64",
       "--max_predictions_per_seq", "10", "--dupe_factor", "40", "--workers", "1"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None and not any(
      q.name.startswith(".cli.") and q != stale for q in tmp_path.iterdir()):
    time.sleep(0.02)
  assert p.poll() is None, "the data step ended before it could be stopped"
  assert not stale.exists()  # an unfinished write of an earlier process is removed first
  time.sleep(0.5)
  p.send_signal(signum)
  _, err = p.communicate(timeout=120)
  assert p.returncode == code, err
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: stopped by")
  assert sorted(q.name for q in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- vectorised masking


# The masking stream written out with Python integers, row by row: the reference mask_batch and
# masking_keys must reproduce bit for bit (splitmix64, Steele, Lea and Flood 2014).
M64, GOLDEN = 2**64 - 1, 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
  return z ^ (z >> 31)


def _reference_key(*parts: int) -> int:
  key = 0
  for p in parts:
    key = _mix(key ^ _mix((p + GOLDEN) & M64))
  return key


def _draw(key: int, counter: int) -> int:
  return _mix((key + (counter + 1) * GOLDEN) & M64)


def _uniform(bits: int) -> float:
  return (bits >> 11) * 2.0**-53


def _reference_mask_tokens(tokens, spec, key, t):
  """One row of length len(tokens), padded to t, masked as mask_batch's docstring says."""
  n = len(tokens)
  candidates = np.flatnonzero(~spec.special[tokens])
  if spec.whole_word and candidates.size:
    starts = spec.word_starts[tokens[candidates]]
    starts |= np.diff(candidates, prepend=-2) != 1
    groups = np.split(candidates, np.flatnonzero(starts)[1:])
  else:
    groups = [candidates[i:i + 1] for i in range(candidates.size)]
  order = sorted(range(len(groups)), key=lambda g: _draw(key, g))
  num_to_predict = min(spec.max_predictions, max(1, int(round(n * spec.masked_lm_prob))))
  chosen = []
  for g in order:
    if len(chosen) >= num_to_predict:
      break
    if len(chosen) + len(groups[g]) > num_to_predict:
      continue
    chosen.extend(groups[g].tolist())
  positions = np.sort(np.asarray(chosen, np.int64))
  labels = tokens[positions]
  out = tokens.copy()
  for p, label in zip(positions.tolist(), labels.tolist(), strict=True):
    u0, u1, u2 = (_uniform(_draw(key, t + 3 * p + j)) for j in range(3))
    out[p] = (spec.mask_id if u0 < 0.8 else label if u1 < 0.5
              else spec.normal_ids[int(u2 * spec.normal_ids.size)])
  return out, positions, labels


def _reference_masked_features(input_ids, length, spec, key, pad_id):
  tokens, positions, labels = _reference_mask_tokens(
      np.asarray(input_ids[:length], np.int64), spec, int(key), len(input_ids))
  p = spec.max_predictions
  ids = np.full(len(input_ids), pad_id, np.int32)
  ids[:length] = tokens
  f = {"input_ids": ids, "masked_lm_positions": np.zeros(p, np.int32),
       "masked_lm_ids": np.zeros(p, np.int32), "masked_lm_weights": np.zeros(p, np.float32)}
  f["masked_lm_positions"][:positions.size] = positions
  f["masked_lm_ids"][:positions.size] = labels
  f["masked_lm_weights"][:positions.size] = 1.0
  return f


def _reference_static_features(input_ids, length, spec, rng, pad_id):
  """Data creation keys each instance by one draw of its creation stream."""
  key = int(rng.integers(0, np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True))
  return _reference_masked_features(input_ids, length, spec, key, pad_id)


def _assert_same_features(got, want):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("whole_word", [False, True])
def test_unknown_tokens_are_masked_like_any_other(whole_word):
  """The original recipe's candidates are all tokens but [CLS] and [SEP]: a row of 33 [UNK]s
  gets round(0.15 * 35) = 5 predictions, all at [UNK]s, and a random replacement is still
  never a special token."""
  pad, unk, cls, sep, mask = range(5)
  spec = pretraining.MaskingSpec.create([pad, unk, cls, sep, mask], np.ones(50, bool), mask, unk,
                                        max_predictions=20, whole_word=whole_word)
  ids = np.full((256, 40), pad)
  ids[:, 0], ids[:, 1:34], ids[:, 34] = cls, unk, sep
  got = pretraining.mask_batch(ids, np.full(256, 35), spec, pretraining.masking_keys(
      3, np.arange(256)), pad)
  assert (got["masked_lm_weights"].sum(1) == 5).all()
  positions = got["masked_lm_positions"][:, :5]
  assert ((positions >= 1) & (positions <= 33)).all()
  assert (got["masked_lm_ids"][:, :5] == unk).all()
  replaced = got["input_ids"][:, 1:34]
  assert not np.isin(replaced, [pad, cls, sep]).any()
  assert (replaced == mask).any() and (replaced >= 5).any()  # [MASK]s and random tokens


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_batch_equals_the_per_row_reference_on_odd_rows(whole_word):
  """Short rows, rows of special tokens only, long words, a budget larger than the candidates."""
  rng = np.random.default_rng(0)
  vocab, t = 50, 24
  word_starts = rng.random(vocab) < 0.4
  spec = pretraining.MaskingSpec.create([0, 1, 2, 3, 4], word_starts, 4, 1, masked_lm_prob=0.3,
                                        max_predictions=6, whole_word=whole_word)
  ids = rng.integers(0, vocab, (64, t))
  ids[:8] = rng.integers(0, 5, (8, t))  # no candidates
  lengths = rng.integers(1, t + 1, 64)
  lengths[8:12] = [1, 2, 3, t]
  keys = pretraining.masking_keys(9, np.arange(64))
  got = pretraining.mask_batch(ids, lengths, spec, keys, 0)
  for row in range(64):
    want = _reference_masked_features(ids[row], int(lengths[row]), spec, keys[row], 0)
    _assert_same_features({k: v[row] for k, v in got.items()}, want)


@pytest.mark.parametrize("whole_word", [False, True])
def test_loader_masks_equal_the_per_row_reference(small, whole_word):
  """Real batches at 128 tokens, shuffled and not, two seeds, across an epoch boundary: the same
  masks bit for bit as masking row by row from (seed, epoch, instance index)."""
  corpus, tok, d = small
  out = d / f"dyn_ref{whole_word}"
  pretraining.create_pretraining_data([corpus], tok, out, max_seq_length=128,
                                      max_predictions_per_seq=20, dupe_factor=1, seed=1,
                                      dynamic_masking=True, whole_word_mask=whole_word)
  for seed, shuffle in ((2, False), (7, True)):
    loader = PretrainingLoader(out, "train", 48, seed=seed, shuffle=shuffle)
    n = loader.instances.num_instances
    order = np.concatenate([np.random.default_rng(seed).permutation(n) if shuffle
                            else np.arange(n), np.arange(n)])
    for b in (0, 1, n // 48 - 1, n // 48, n // 48 + 1):  # the last ones straddle epochs 0 and 1
      indices = order[b * 48:(b + 1) * 48]
      got = loader._load(b, indices)
      rows = loader.instances.rows(indices)
      for j, index in enumerate(indices):
        epoch = (b * 48 + j) // n
        want = _reference_masked_features(
            rows["input_ids"][j], int(rows["input_mask"][j].sum()), loader.masking,
            _reference_key(seed, epoch, int(index)), loader.pad_id)
        _assert_same_features({k: got[k][j] for k in want},
                              {k: v.astype(got[k].dtype) for k, v in want.items()})


def test_static_masks_equal_the_per_row_reference(small, monkeypatch):
  corpus, tok, d = small
  kw = dict(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1, seed=4, workers=1,
            whole_word_mask=True)
  pretraining.create_pretraining_data([corpus], tok, d / "static_new", **kw)
  monkeypatch.setattr(pretraining, "masked_features", _reference_static_features)
  pretraining.create_pretraining_data([corpus], tok, d / "static_ref", **kw)
  files = sorted(p.name for p in (d / "static_ref").glob("*.npy"))
  assert files
  for name in files:
    assert (d / "static_new" / name).read_bytes() == (d / "static_ref" / name).read_bytes(), name


def test_masking_keys_fold_seed_epoch_and_index():
  for seed in (0, 3, 2**40 + 1, -1):
    epochs, indices = np.array([0, 1, 5]), np.array([7, 0, 2**31])
    got = pretraining.masking_keys(seed, epochs, indices)
    assert got.dtype == np.uint64
    want = [_reference_key(seed, e, i) for e, i in zip(epochs.tolist(), indices.tolist(),
                                                       strict=True)]
    assert got.tolist() == want
