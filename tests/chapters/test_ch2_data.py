"""Chapter 2 data pipeline: --help, usage errors, and one smoke run checked end to end via ensure_data."""
import json
import os

import numpy as np
import pytest

from minilife.artifacts import ensure_data
from minilife.chapters import ch2_data
from minilife.data.bpe import Tokenizer
from minilife.data.pack import load_tokens, read_meta


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        ch2_data.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--vocab-size" in out and "--smoke" in out and "--mix" in out


@pytest.mark.parametrize("argv,needle", [
    (["--vocab-size", "100"], "--vocab-size 100: must be at least 256 byte tokens + 2 specials = 258"),
    (["--mix", "policy=abc"], "--mix: weight 'abc' of policy is not a number"),
    (["--mix", "wiki=2"], "--mix: 'wiki=2' is not SOURCE=WEIGHT"),
    (["--near-threshold", "1.5"], "--near-threshold 1.5"),
    (["--world-kb", "100000000"], "--world-kb 100000000: must be in [5, 200000]"),  # was accepted, then silent
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        ch2_data.main(["--smoke", "--out", str(tmp_path)] + argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_precision_recall_convention():
    assert ch2_data.precision_recall({1, 2, 3}, {2, 3, 4}) == {"tp": 2, "fp": 1, "fn": 1, "precision": 2 / 3,
                                                               "recall": 2 / 3}
    assert ch2_data.precision_recall(set(), set())["precision"] == 1.0


def test_smoke_run_via_ensure_data(capfd, tmp_path):
    data_dir = ensure_data(smoke=True)  # conftest points MINILIFE_RUNS at tmp_path/runs
    out = capfd.readouterr().out
    assert "building" in out and "ch2_data --smoke" in out  # it says what it runs
    assert data_dir == tmp_path / "runs" / "ch2_data-smoke"
    for name in ("tokenizer.json", "shards/meta.json", "summary.json", "metrics.jsonl", "lsh_s_curve.png",
                 "compression.png", "corpus.jsonl", "removed.jsonl"):
        assert (data_dir / name).is_file(), name
    assert not (data_dir / "build.tmp").exists()

    # present -> reused, not rebuilt
    stamp = os.stat(data_dir / "tokenizer.json").st_mtime_ns
    assert ensure_data(smoke=True) == data_dir
    assert "building" not in capfd.readouterr().out
    assert os.stat(data_dir / "tokenizer.json").st_mtime_ns == stamp

    summary = json.loads((data_dir / "summary.json").read_text())
    steps = summary["steps"]
    # smoke world, seed 0: the levels each step reaches there (measured values in the comments)
    assert steps["exact_dedup"]["precision"] == 1.0 and steps["exact_dedup"]["recall"] == 1.0
    assert steps["line_dedup"]["precision"] >= 0.85 and steps["line_dedup"]["recall"] >= 0.9  # 0.895, 0.944
    for name in ("exact_dedup", "line_dedup", "near_dedup", "quality"):  # one unit per step: P and R from tp/fp/fn
        r = steps[name]
        assert r["precision"] == (r["tp"] / (r["tp"] + r["fp"]) if r["tp"] + r["fp"] else 1.0), name
        assert r["recall"] == (r["tp"] / (r["tp"] + r["fn"]) if r["tp"] + r["fn"] else 1.0), name
    assert steps["near_dedup"]["precision"] >= 0.9 and steps["near_dedup"]["recall"] >= 0.85  # 1.0, 1.0
    assert steps["quality"]["precision"] >= 0.9 and steps["quality"]["recall"] >= 0.8  # 1.0, 0.875
    for kind in ("email", "phone", "ip"):
        assert steps["pii"][f"{kind}_precision"] == 1.0 and steps["pii"][f"{kind}_recall"] == 1.0
    assert steps["pii"]["decoys_masked"] == 0
    counts = [steps[s]["docs"] for s in ("raw", "exact_dedup", "near_dedup", "quality")]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0.7 * counts[0]

    # the S-curve points are compared with 1 - (1 - J^r)^b, recomputed here in float64
    nd = steps["near_dedup"]
    b, r = nd["bands"], nd["rows"]
    assert b * r <= summary["config"]["num_perm"]
    for j, pred in zip(nd["s_curve"]["jaccard"], nd["s_curve"]["predicted"]):
        assert pred == pytest.approx(1 - (1 - j ** r) ** b, abs=1e-12)

    tok = Tokenizer.load(data_dir / "tokenizer.json")
    meta = read_meta(data_dir / "shards")
    assert tok.vocab_size == meta["vocab_size"] == 320
    train, val = load_tokens(data_dir / "shards", "train"), load_tokens(data_dir / "shards", "val")
    assert int(max(train.max(), val.max())) < tok.vocab_size

    def docs_of(tokens: np.ndarray) -> list[str]:  # every document is followed by one end-of-text id
        out, start = [], 0
        for end in np.flatnonzero(tokens == tok.eot_id).tolist():
            out.append(tok.decode(tokens[start:end].tolist()))
            start = end + 1
        assert start == len(tokens)
        return out

    val_docs = docs_of(val)
    train_docs = set(docs_of(train))
    assert len(val_docs) == steps["mix"]["val_docs"]
    assert not (set(val_docs) & train_docs)  # held out before mixing: no document on both sides
    corpus = [json.loads(line)["text"] for line in (data_dir / "corpus.jsonl").read_text().splitlines()]
    assert set(val_docs) | train_docs <= set(corpus)

    # compression: bytes only (vocab 256 + 2 specials) is exactly UTF-8 bytes per word; more merges never cost tokens
    comp = steps["bpe"]["compression"]
    assert comp["vocab_sizes"][0] == 258 and comp["vocab_sizes"][-1] == 320
    words = sum(len(d.split()) for d in val_docs)
    assert comp["all"][0] == pytest.approx(sum(len(d.encode("utf-8")) for d in val_docs) / words, rel=1e-12)
    assert all(a >= b for a, b in zip(comp["all"], comp["all"][1:]))
