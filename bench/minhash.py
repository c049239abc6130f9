"""Benchmark: MinHash signature throughput against datasketch, and near-dup quality on the world.

Run: .venv/bin/python bench/minhash.py [--repeats 5] [--num-perm 128] [--threshold 0.8] [--quick]

1. Throughput. Every side goes from the same raw documents to num_perm-wide signatures in one
   process, interleaved (the order rotates every repeat), timed with perf_counter. datasketch
   uses its fastest documented path, ``MinHash.bulk`` over the same word 5-gram shingles
   (``minhash.shingles``, UTF-8 encoded), so shingling is timed on both sides, in two
   configurations: its default ``hashfunc`` (SHA-1) and the fast hash an expert would pass
   (``zlib.crc32``; also ``xxhash.xxh32_intdigest`` when the xxhash package is installed).
   Corpora: Tiny Shakespeare split into paragraphs (when ../shared/data has it) and the embedded
   world's wiki. Printed: speedup = datasketch seconds / our seconds per repeat (= our throughput /
   theirs), min and median over repeats, against every configuration. Goal: >= 3x (median) against
   the fastest datasketch configuration of the run; the SHA-1 default is reported alongside.
2. Accuracy cross-check: mean |estimate - exact Jaccard| over the world's planted near-duplicate
   pairs, for both implementations (speed must not come from worse estimates).
3. Near-dup quality on the world's planted near-copies (``Document.near_dup_of``, with the exact
   5-gram Jaccard in ``near_dup_jaccard``): recall = planted pairs with J >= threshold that end in
   one cluster; precision = joining edges whose two documents descend from the same planted
   original (following exact_dup_of / near_dup_of). Goal: recall >= 0.9 with precision >= 0.95.

``--quick``: the first 1,000 documents of each corpus and 2 repeats (seconds; a smoke check, not
the figures of BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minilife.data import lsh, minhash as mh  # noqa: E402
from minilife.data.world import WorldConfig, make_wiki  # noqa: E402
from minilife.measure import interleaved_times  # noqa: E402

DEFAULT_FAMILY = inspect.signature(mh.signatures).parameters["family"].default
SHARED = Path(os.environ.get("MINILIFE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_corpora(world_docs) -> dict[str, list[str]]:
    corpora = {}
    shakespeare = SHARED / "tinyshakespeare.txt"
    if shakespeare.is_file():
        text = shakespeare.read_text(encoding="utf-8")
        corpora["tinyshakespeare paragraphs"] = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    else:
        print(f"({shakespeare} not present: throughput on the world only)")
    corpora["world wiki"] = [d.text for d in world_docs]
    return corpora


def datasketch_hashfuncs() -> dict:
    """datasketch's configurations: its default (SHA-1), then the fast 32-bit hashes an expert would pass."""
    funcs = {"SHA-1 (default)": None, "zlib.crc32": zlib.crc32}
    try:
        import xxhash
        funcs["xxhash.xxh32_intdigest"] = xxhash.xxh32_intdigest
    except ImportError:
        print("(xxhash not installed: datasketch's fast hash is zlib.crc32 only)")
    return funcs


def datasketch_signatures(texts, num_perm, hashfunc=None):
    from datasketch import MinHash
    kwargs = {} if hashfunc is None else {"hashfunc": hashfunc}
    return MinHash.bulk([[s.encode("utf-8") for s in mh.shingles(t)] for t in texts], num_perm=num_perm, **kwargs)


def throughput(corpora, num_perm, repeats, progress):
    import datasketch
    print(f"\n## MinHash signatures: minilife vs datasketch {datasketch.__version__} "
          f"(num_perm={num_perm}, {repeats} interleaved repeats)\n")
    baselines = {f"datasketch {name}": (lambda t, f=f: datasketch_signatures(t, num_perm, f))
                 for name, f in datasketch_hashfuncs().items()}
    ours = {fam: (lambda t, fam=fam: mh.signatures(t, num_perm=num_perm, family=fam)) for fam in mh.FAMILIES}
    rows = []
    for name, texts in corpora.items():
        progress(f"throughput on {name} ({len(texts)} docs)")
        n_shingles = sum(len(mh.shingles(t)) for t in texts)
        times = interleaved_times({k: (lambda f=f: f(texts)) for k, f in {**baselines, **ours}.items()}, repeats)
        fastest = min(baselines, key=lambda k: statistics.median(times[k]))  # the strongest baseline
        for fam in mh.FAMILIES:
            for base in baselines:
                speedup = [d / o for d, o in zip(times[base], times[fam])]
                rows.append((name, len(texts), n_shingles, fam, base, base == fastest, statistics.median(times[base]),
                             statistics.median(times[fam]), min(speedup), statistics.median(speedup)))
    print("| corpus | docs | shingles | minilife family | baseline | baseline s (median) | minilife s (median) "
          "| baseline docs/s | minilife docs/s | speedup min | speedup median | goal >= 3x vs fastest baseline |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, nd, ns, fam, base, is_fastest, td, to, smin, smed in rows:
        label = f"{fam} (default)" if fam == DEFAULT_FAMILY else fam
        goal = ("met" if smed >= 3 else "not met") if is_fastest else "(not the fastest baseline)"
        print(f"| {name} | {nd} | {ns} | {label} | {base} | {td:.3f} | {to:.3f} | {nd / td:,.0f} | {nd / to:,.0f} | "
              f"{smin:.2f}x | {smed:.2f}x | {goal} |")


def family_root(docs):
    by_id = {d.doc_id: d for d in docs}

    def root(d):
        while d.exact_dup_of or d.near_dup_of:
            d = by_id[d.exact_dup_of or d.near_dup_of]
        return d.doc_id
    return [root(d) for d in docs]


def accuracy(docs, num_perm):
    index = {d.doc_id: i for i, d in enumerate(docs)}
    pairs = [(index[d.near_dup_of], i, d.near_dup_jaccard) for i, d in enumerate(docs) if d.near_dup_of]
    texts = [d.text for d in docs]
    exact = np.array([mh.jaccard(mh.shingles(texts[i]), mh.shingles(texts[j])) for i, j, _ in pairs])
    assert np.allclose(exact, [j for _, _, j in pairs]), "world's near_dup_jaccard is not the exact Jaccard"
    used = sorted({k for i, j, _ in pairs for k in (i, j)})
    ds = dict(zip(used, datasketch_signatures([texts[k] for k in used], num_perm)))
    print(f"\n## Estimate accuracy on {len(pairs)} planted near-duplicate pairs (num_perm={num_perm})\n")
    print("| implementation | mean abs error | max abs error | 1 SE at J=0.5 |")
    print("|---|---:|---:|---:|")
    err = np.abs([ds[i].jaccard(ds[j]) for i, j, _ in pairs] - exact)
    rows = [("datasketch", err)]
    for fam in mh.FAMILIES:
        sig = dict(zip(used, mh.signatures([texts[k] for k in used], num_perm=num_perm, family=fam)))
        est = [mh.estimate_jaccard(sig[i], sig[j]) for i, j, _ in pairs]
        rows.append((f"minilife {fam}", np.abs(np.array(est) - exact)))
    for name, e in rows:
        print(f"| {name} | {e.mean():.4f} | {e.max():.4f} | {np.sqrt(0.25 / num_perm):.4f} |")


def quality(docs, num_perm, threshold):
    texts, roots = [d.text for d in docs], family_root(docs)
    index = {d.doc_id: i for i, d in enumerate(docs)}
    planted = [(index[d.near_dup_of], i, d.near_dup_jaccard) for i, d in enumerate(docs) if d.near_dup_of]
    js = [j for *_, j in planted]
    print(f"\n## Near-duplicate detection on the world ({len(docs)} docs, {len(planted)} planted near-copies "
          f"with J from {min(js):.2f} to {max(js):.2f}; threshold {threshold})\n")
    print("| family | bands x rows | S(threshold) | candidates | verified | recall J>=thr "
          "| recall J in [thr-0.1, thr) | edge precision | drop precision | seconds | goal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for fam in mh.FAMILIES:
        t0 = time.perf_counter()
        res = lsh.near_duplicates(texts, threshold=threshold, num_perm=num_perm, family=fam)
        secs = time.perf_counter() - t0
        label = {i: c[0] for c in res.clusters for i in c}
        together = lambda i, j: i in label and label.get(i) == label.get(j)  # noqa: E731
        above = [(i, j) for i, j, jac in planted if jac >= threshold]
        near_below = [(i, j) for i, j, jac in planted if threshold - 0.1 <= jac < threshold]
        recall = sum(together(i, j) for i, j in above) / len(above)
        recall_below = sum(together(i, j) for i, j in near_below) / max(len(near_below), 1)
        precision = sum(roots[i] == roots[j] for i, j, _ in res.edges) / max(len(res.edges), 1)
        copies = {i for i, d in enumerate(docs) if d.exact_dup_of or d.near_dup_of}
        drop_precision = len(set(res.drop) & copies) / max(len(res.drop), 1)
        met = recall >= 0.9 and precision >= 0.95
        s_at = float(lsh.s_curve(threshold, res.bands, res.rows))
        print(f"| {fam} | {res.bands} x {res.rows} | {s_at:.3f} | {res.n_candidates} | {res.n_verified} | "
              f"{recall:.3f} ({len(above)} pairs) | {recall_below:.3f} ({len(near_below)} pairs) | "
              f"{precision:.3f} ({len(res.edges)} edges) | {drop_precision:.3f} ({len(res.drop)} dropped) | "
              f"{secs:.2f} | {'met' if met else 'not met'} |")
    print("\n(recall just below the threshold is expected to be low: those pairs are not near-duplicates "
          "at this threshold unless another copy links them)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    ap.add_argument("--num-perm", type=int, default=128, help="permutations per signature")
    ap.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold for near-dup quality")
    ap.add_argument("--quick", action="store_true", help="1,000 documents per corpus, 2 repeats (a smoke check)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    progress("building the world")
    docs = make_wiki(WorldConfig())
    corpora = load_corpora(docs)
    if args.quick:
        corpora, args.repeats = {k: v[:1000] for k, v in corpora.items()}, 2
    throughput(corpora, args.num_perm, args.repeats, progress)
    progress("estimate accuracy")
    accuracy(docs, args.num_perm)
    progress("near-duplicate detection")
    quality(docs, args.num_perm, args.threshold)
    progress("done")


if __name__ == "__main__":
    main()
