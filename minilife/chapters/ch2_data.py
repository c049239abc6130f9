"""Chapter 2, the curriculum: from the raw company wiki to packed token shards, scored at every step.

    python -m minilife.chapters.ch2_data            # ~10 s on 2 cores (--smoke: ~3 s)

prints the raw world's make-up, then one line per cleaning step (documents kept and removed, precision
and recall against the planted labels), the mixing table, BPE compression in tokens per word and
the packed token counts. Writes the tokenizer, shards, plots and summary.json to runs/ch2_data/.

What it does (read ``main`` top to bottom)
1. Builds the dirty wiki (``data.world.make_wiki``) whose dirt is labelled, and prints its make-up.
2. Normalises Unicode and whitespace (NFC by default; ``--normal-form NFKC`` folds more).
3. Exact dedup: SHA-256 of the normalised text, first copy kept. Then repeated-line removal: lines
   of 40+ characters found in at least max(4, ``--line-min-frac`` x docs) documents (footers,
   cookie bars) are cut out of every document.
4. Near dedup: MinHash (``--num-perm``) + LSH with bands x rows chosen for ``--near-threshold``
   (``--lsh-recall-weight`` trades missed pairs for extra candidates), exact Jaccard verification,
   lowest index of each cluster kept. The measured candidate rate of the planted pairs is plotted on
   the S-curve 1 - (1 - J^r)^b.
5. Quality: the Gopher rules (Rae et al. 2021) name the rule that rejects each page.
6. PII: e-mails, phone numbers and IPv4 addresses are masked; look-alikes must survive.
7. Mixing: per-source sampling weights (``--mix``) turn cleaned sizes into effective shares; the
   training documents are drawn to those shares (``data.mix``). Validation documents are held out
   *before* mixing, so an up-weighted document can never sit on both sides of the split.
8. BPE (``data.bpe_train.train_bpe``) on the cleaned training documents; compression in tokens per word
   for every prefix of the merge list (a BPE with fewer merges is the same list cut short) and per
   source; 9. packed uint16 shards (``data.pack.pack_corpus``).

Every cleaning step prints precision and recall against the planted labels (precision of an empty
prediction and recall of an empty truth are reported as 1.0). Writes ``summary.json``,
``metrics.jsonl``, ``lsh_s_curve.png``, ``compression.png``, ``removed.jsonl`` (what each step dropped and
why), ``corpus.jsonl`` (the cleaned documents), ``tokenizer.json`` and ``shards/``. The last two
are built in a staging folder and moved into place at the end, so a crash never leaves a tokenizer
that does not match its shards. ``minilife.artifacts.ensure_data`` is how later chapters get them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from minilife.common import (MetricsLogger, RunConfig, cli_field, config_from_args, fmt_count, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli
from minilife.data import clean, lsh, minhash
from minilife.data.world import SOURCES, WorldConfig, make_wiki, world_stats

CHAPTER = "ch2_data"
KB_PER_S = 400  # measured: the default 3000 kB world end to end in ~7.5 s on 2 cores
MAX_WORLD_KB = 200_000  # ~8 minutes; beyond that use real corpora (data.download)
SPECIALS = ("<|endoftext|>", "<|mask|>")  # end of document; the masked-LM objective's [MASK]


@dataclass
class DataConfig(RunConfig):
    """Chapter 2 data: clean the company wiki (dedup, filters, PII), mix sources, train BPE, pack shards."""
    seed: int = cli_field(0, "world seed; also seeds MinHash, mixing and the train/val split")
    world_kb: int = cli_field(3000, f"raw wiki size in kB, at most {MAX_WORLD_KB} (the pipeline runs at "
                                    f"~{KB_PER_S} kB/s on 2 cores)", smoke=150)
    vocab_size: int = cli_field(2048, "BPE vocabulary incl. the special tokens", smoke=320)
    normal_form: Literal["NFC", "NFKC"] = cli_field("NFC", "Unicode normal form of the cleaned text")
    line_min_frac: float = cli_field(0.005, "a 40+ char line is boilerplate if in this share of docs (and >= 4)")
    near_threshold: float = cli_field(0.7, "word-5-gram Jaccard at or above which two docs are near-duplicates")
    num_perm: int = cli_field(128, "MinHash permutations")
    lsh_recall_weight: float = cli_field(0.8, "weight of missed pairs (vs extra candidates) when picking bands x rows")
    mix: str = cli_field("policy=3,product=2,support=1,email=1,story=1",
                         "sampling weight per source; unlisted sources get 1, 0 drops one")
    curriculum: Literal["none", "length", "mean_word_length"] = cli_field(
        "none", "order the mixed training documents easy to hard by this score")
    val_fraction: float = cli_field(0.05, "share of cleaned documents held out for validation")

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"--vocab-size {self.vocab_size}: must be at least 256 byte tokens + "
                             f"{len(SPECIALS)} specials = {256 + len(SPECIALS)}")
        if not 5 <= self.world_kb <= MAX_WORLD_KB:
            raise ValueError(f"--world-kb {self.world_kb}: must be in [5, {MAX_WORLD_KB}] (that is "
                             f"~{MAX_WORLD_KB // KB_PER_S // 60} min at ~{KB_PER_S} kB/s)")
        if not 0.0 < self.near_threshold < 1.0:
            raise ValueError(f"--near-threshold {self.near_threshold}: must be in (0, 1)")
        if not 0.0 < self.lsh_recall_weight < 1.0:
            raise ValueError(f"--lsh-recall-weight {self.lsh_recall_weight}: must be in (0, 1)")
        if not 0.0 <= self.line_min_frac <= 1.0:
            raise ValueError(f"--line-min-frac {self.line_min_frac}: must be in [0, 1]")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction {self.val_fraction}: must be in (0, 0.5)")
        if self.num_perm < 2:
            raise ValueError(f"--num-perm {self.num_perm}: must be at least 2")
        self.weights = parse_mix(self.mix)
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"--mix {self.mix!r}: at least one source needs a weight > 0")


def parse_mix(spec: str) -> dict[str, float]:
    """'policy=3,story=1' -> {'policy': 3.0, 'story': 1.0, others: 1.0}; errors name the bad part."""
    weights = dict.fromkeys(SOURCES, 1.0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in SOURCES:
            raise ValueError(f"--mix: {part!r} is not SOURCE=WEIGHT with SOURCE one of {', '.join(SOURCES)}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--mix: weight {value!r} of {name.strip()} is not a number") from None
        if not w >= 0:
            raise ValueError(f"--mix: weight of {name.strip()} must be >= 0, got {w}")
        weights[name.strip()] = w
    return weights


def precision_recall(predicted: set, truth: set) -> dict:
    """tp/fp/fn with precision and recall (1.0 when the denominator is empty: nothing claimed / nothing to find)."""
    tp, fp, fn = len(predicted & truth), len(predicted - truth), len(truth - predicted)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0}


def _pr_str(pr: dict) -> str:
    return f"precision {pr['precision']:.3f}  recall {pr['recall']:.3f}  (tp {pr['tp']}, fp {pr['fp']}, fn {pr['fn']})"


def s_curve_points(texts: list[str], pairs: list[tuple[int, int]], cfg: DataConfig, bands: int, rows: int,
                   bins: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    """Measured LSH candidate rate of planted pairs, binned by their exact Jaccard -> (x, rate, count)."""
    if not pairs:
        return [], [], []
    idx = sorted({i for p in pairs for i in p})
    sig = dict(zip(idx, minhash.signatures([texts[i] for i in idx], cfg.num_perm, seed=cfg.seed)))
    js, hit = [], []
    for a, b in pairs:
        js.append(minhash.jaccard(minhash.shingles(texts[a]), minhash.shingles(texts[b])))
        same = (sig[a][:bands * rows] == sig[b][:bands * rows]).reshape(bands, rows)  # (bands, rows)
        hit.append(bool(same.all(axis=1).any()))
    js, hit = np.array(js), np.array(hit)
    which = np.digitize(js, bins) - 1
    xs, rates, counts = [], [], []
    for k in range(len(bins) - 1):
        m = which == k
        if m.any():
            xs.append(float(js[m].mean()))
            rates.append(float(hit[m].mean()))
            counts.append(int(m.sum()))
    return xs, rates, counts


def mix_sources(train_docs: list[tuple[str, str, str]], cfg: "DataConfig") -> tuple[list, list[dict]]:
    """Draw the training documents to the effective shares of ``cfg.weights`` (``data.mix``), about as
    many words as the cleaned training set holds: up-weighted sources repeat, down-weighted ones thin out."""
    from minilife.data.mix import MixtureSampler, mix_table

    by_source: dict[str, list[tuple[str, str, str]]] = {}
    for d in train_docs:
        if cfg.weights[d[1]] > 0:
            by_source.setdefault(d[1], []).append(d)
    if not by_source:
        raise ValueError(f"--mix {cfg.mix!r}: every source that has documents has weight 0")
    sampler = MixtureSampler({s: [t for _, _, t in docs] for s, docs in by_source.items()},
                             {s: cfg.weights[s] for s in by_source}, unit="tokens", seed=cfg.seed,
                             curriculum=None if cfg.curriculum == "none" else cfg.curriculum)
    budget = sum(len(t.split()) for _, _, t in train_docs)  # words: BPE does not exist yet
    per_draw = float(sum(p * lens.mean() for p, lens in zip(sampler.source_probs, sampler.lengths.values())))
    draws = sampler.sample(int(np.ceil(budget / per_draw)))
    table = mix_table(sampler.sizes, sampler.weights, budget)
    for row in table:
        row["drawn_docs"], row["epochs_drawn"] = sampler.drawn_docs[row["source"]], sampler.epochs()[row["source"]]
    return [by_source[s][i] for s, i in draws], table


def compression_table(tok, val_docs: list[tuple[str, str, str]], tokenizer_cls) -> dict:
    """Tokens per word on the validation documents for every merge-list prefix (and per source)."""
    n_special = len(tok.special_tokens)
    sizes = sorted({v for v in (256 + n_special, 288, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
                    if v < tok.vocab_size} | {tok.vocab_size})
    groups = {"all": [t for _, _, t in val_docs]}
    for source in SOURCES:
        groups[source] = [t for _, s, t in val_docs if s == source]
    words = {g: sum(len(t.split()) for t in ts) for g, ts in groups.items()}
    table = {g: [] for g in groups}
    for v in sizes:
        ranks = {b: r for b, r in tok.mergeable_ranks.items() if r < v - n_special}  # first merges only
        cut = tokenizer_cls(ranks, list(tok.special_tokens))
        for g, ts in groups.items():
            if words[g]:
                table[g].append(sum(len(ids) for ids in cut.encode_batch(ts)) / words[g])
    return {"vocab_sizes": sizes, "all": table.pop("all"), "by_source": {g: r for g, r in table.items() if r}}


def main(argv: list[str] | None = None) -> dict:
    cfg = config_from_args(DataConfig, argv, prog="python -m minilife.chapters.ch2_data")
    out, _ = start_run(CHAPTER, cfg)
    t0 = time.time()
    log = MetricsLogger(out / "metrics.jsonl")
    summary: dict = {"config": {k: v for k, v in vars(cfg).items() if k != "weights"}, "steps": {}}
    removed_log: list[dict] = []

    def step(name: str, kept: int, removed: int, **extra) -> None:
        row = {"step": name, "docs": kept, "removed": removed, **extra}
        summary["steps"][name] = row
        log.log(**row)

    # 1. the raw wiki ---------------------------------------------------------------------------
    print(f"[1] building a {cfg.world_kb} kB world; the whole pipeline takes ~{cfg.world_kb / KB_PER_S:.0f} s "
          f"on 2 cores", flush=True)
    world = make_wiki(WorldConfig(seed=cfg.seed, target_bytes=cfg.world_kb * 1000))
    stats = world_stats(world)
    summary["world"] = stats
    print(f"[1] raw wiki: {stats['docs']} documents, {fmt_count(stats['bytes'])}B "
          f"({', '.join(f'{s} {n}' for s, n in stats['by_source'].items())})")
    print(f"    planted: {stats['exact_dups']} exact copies, {stats['near_dups']} near copies, {stats['spam']} spam, "
          f"{stats['boilerplate']} boilerplate pages, {stats['footer_lines']} footer lines, PII {stats['pii']}, "
          f"{stats['pii_decoys']} look-alikes")
    step("raw", len(world), 0, bytes=stats["bytes"])

    # 2. normalise ------------------------------------------------------------------------------
    texts = [clean.normalise(d.text, cfg.normal_form) for d in world]
    changed = sum(t != d.text for t, d in zip(texts, world))
    print(f"[2] normalise ({cfg.normal_form}): {changed} documents changed")
    step("normalise", len(world), 0, changed=changed)
    alive = list(range(len(world)))

    # 3. exact dedup, then repeated lines -------------------------------------------------------
    keep, dup_of = clean.exact_dedup(texts)
    dropped = {i for i in alive if not keep[i]}
    removed_log += [{"doc_id": world[i].doc_id, "step": "exact_dedup", "why": f"copy of {world[dup_of[i]].doc_id}"}
                    for i in sorted(dropped)]
    pr = precision_recall(dropped, {i for i, d in enumerate(world) if d.exact_dup_of})
    alive = [i for i in alive if keep[i]]
    print(f"[3] exact dedup: removed {len(dropped)}, {len(alive)} left; {_pr_str(pr)}")
    step("exact_dedup", len(alive), len(dropped), **pr)

    lines = clean.repeated_lines([texts[i] for i in alive], min_frac=cfg.line_min_frac)
    cuts = []  # one unit throughout: a (document, line) pair
    for i in alive:
        texts[i], cut = clean.remove_lines(texts[i], lines)
        cuts += [(i, line.strip()) for line in cut]
    judged = [i for i in alive if not world[i].junk]  # junk pages go at the quality step whatever they hold
    pr_lines = precision_recall({(i, line) for i, line in cuts if not world[i].junk},
                                {(i, f) for i in judged for f in world[i].footer_lines})
    print(f"    repeated lines: {len(lines)} distinct lines cut {len(cuts)} times; (document, line) pairs on "
          f"non-junk pages: {_pr_str(pr_lines)}")
    step("line_dedup", len(alive), 0, lines=len(lines), cuts=len(cuts), **pr_lines)

    # 4. near dedup -----------------------------------------------------------------------------
    bands, rows = lsh.pick_bands_rows(cfg.near_threshold, cfg.num_perm, fp_weight=1 - cfg.lsh_recall_weight,
                                      fn_weight=cfg.lsh_recall_weight)
    nd = lsh.near_duplicates([texts[i] for i in alive], threshold=cfg.near_threshold, num_perm=cfg.num_perm,
                             bands=bands, rows=rows, seed=cfg.seed)
    dropped = {alive[k] for k in nd.drop}
    by_id = {d.doc_id: i for i, d in enumerate(world)}
    alive_set = set(alive)
    planted_pairs = [(by_id[world[i].near_dup_of], i) for i in alive  # (source, copy), both still here
                     if world[i].near_dup_of and by_id[world[i].near_dup_of] in alive_set]
    truth_all = {i for _, i in planted_pairs}
    truth = {i for s, i in planted_pairs
             if minhash.jaccard(minhash.shingles(texts[s]), minhash.shingles(texts[i])) >= cfg.near_threshold}
    pr = precision_recall(dropped, truth)
    recall_all = len(dropped & truth_all) / len(truth_all) if truth_all else 1.0
    removed_log += [{"doc_id": world[i].doc_id, "step": "near_dedup", "why": "near-duplicate"} for i in sorted(dropped)]
    alive = [i for i in alive if i not in dropped]
    print(f"[4] near dedup (J >= {cfg.near_threshold}, {cfg.num_perm} perms = {bands} bands x {rows} rows, "
          f"{nd.n_candidates} candidate pairs, {len(nd.clusters)} clusters): removed {len(dropped)}, {len(alive)} left")
    print(f"    vs planted pairs with J >= {cfg.near_threshold}: {_pr_str(pr)}; recall over all "
          f"{len(truth_all)} planted copies (J {WorldConfig.near_dup_jaccard[0]}-{WorldConfig.near_dup_jaccard[1]}): "
          f"{recall_all:.3f}")
    bins = np.linspace(0.0, 1.0, 21)
    xs, rates, counts = s_curve_points(texts, planted_pairs, cfg, bands, rows, bins)
    grid = np.linspace(0, 1, 201)
    plot_lines(out / "lsh_s_curve.png", {f"1-(1-J^{rows})^{bands}": (grid, lsh.s_curve(grid, bands, rows)),
                                         f"threshold {cfg.near_threshold}": ([cfg.near_threshold] * 2, [0, 1])},
               points={"planted pairs (measured)": (xs, rates)},
               title="LSH candidate probability vs Jaccard", xlabel="word 5-gram Jaccard", ylabel="P(candidate)")
    step("near_dedup", len(alive), len(dropped), bands=bands, rows=rows, candidates=nd.n_candidates,
         recall_all_planted=recall_all, s_curve={"jaccard": xs, "measured": rates, "pairs": counts,
                                                 "predicted": [float(lsh.s_curve(x, bands, rows)) for x in xs]},
         **pr)

    # 5. quality filters ------------------------------------------------------------------------
    reasons = {i: clean.gopher_check(texts[i]) for i in alive}
    dropped = {i for i, r in reasons.items() if r}
    pr = precision_recall(dropped, {i for i in alive if world[i].junk})
    by_rule = Counter(r for r in reasons.values() if r)
    removed_log += [{"doc_id": world[i].doc_id, "step": "quality", "why": reasons[i]} for i in sorted(dropped)]
    alive = [i for i in alive if i not in dropped]
    print(f"[5] Gopher quality rules: removed {len(dropped)}, {len(alive)} left; spam+boilerplate {_pr_str(pr)}")
    print("    by rule: " + ", ".join(f"{r} {n}" for r, n in by_rule.most_common()))
    step("quality", len(alive), len(dropped), by_rule=dict(by_rule), **pr)

    # 6. PII ------------------------------------------------------------------------------------
    pii_pr, masked_total = {}, Counter()
    decoys_hit = 0
    for kind in ("email", "phone", "ip"):
        found = {(i, s, k) for i in alive for s, k in Counter(clean.find_pii(texts[i])[kind]).items()}
        want = {(i, s, k) for i in alive for s, k in Counter(world[i].pii[kind]).items()}
        pii_pr[kind] = precision_recall(found, want)
    for i in alive:
        texts[i], counts_i = clean.mask_pii(texts[i])
        masked_total.update(counts_i)
        decoys_hit += sum(dec not in texts[i] for dec in world[i].pii_decoys)
    print(f"[6] PII masked: {dict(masked_total)}; look-alikes wrongly masked: {decoys_hit}")
    for kind, p in pii_pr.items():
        print(f"    {kind:5s} {_pr_str(p)}")
    step("pii", len(alive), 0, masked=dict(masked_total), decoys_masked=decoys_hit,
         **{f"{k}_{m}": v[m] for k, v in pii_pr.items() for m in ("precision", "recall", "tp", "fp", "fn")})

    # 7. mixing ---------------------------------------------------------------------------------
    docs_out = [(world[i].doc_id, world[i].source, texts[i]) for i in alive]
    rng = np.random.default_rng(cfg.seed)
    is_val = np.zeros(len(docs_out), dtype=bool)
    is_val[rng.permutation(len(docs_out))[:max(1, round(cfg.val_fraction * len(docs_out)))]] = True
    train_docs = [d for d, v in zip(docs_out, is_val) if not v]
    val_docs = [d for d, v in zip(docs_out, is_val) if v]
    mixed, mix_table = mix_sources(train_docs, cfg)
    print(f"[7] mixing ({len(val_docs)} validation documents held out first):")
    print("    source    cleaned words  weight  effective share  epochs (drawn)")
    for row in mix_table:
        print(f"    {row['source']:9s} {row['size']:13,d}  {row['weight']:6.2f}  {row['share']:15.1%}  "
              f"{row['epochs']:.2f} ({row['epochs_drawn']:.2f})")
    step("mix", len(mixed), 0, table=mix_table, val_docs=len(val_docs))

    # 8. BPE ------------------------------------------------------------------------------------
    from minilife.data.bpe import Tokenizer
    from minilife.data.bpe_train import train_bpe
    from minilife.data.pack import pack_corpus

    t_bpe = time.time()
    tok = train_bpe(cfg.vocab_size, text=[t for _, _, t in train_docs], special_tokens=SPECIALS, progress=not cfg.smoke)
    print(f"[8] BPE: vocab {tok.vocab_size} trained in {time.time() - t_bpe:.1f}s on {len(train_docs)} documents")
    compression = compression_table(tok, val_docs, Tokenizer)
    sizes = compression["vocab_sizes"]
    plot_lines(out / "compression.png", {"all": (sizes, compression["all"]),
                                         **{s: (sizes, v) for s, v in compression["by_source"].items()}},
               title="tokens per word vs BPE vocabulary (validation documents)", xlabel="vocab size (256 bytes + merges + specials)",
               ylabel="tokens per word")
    print("    tokens/word at vocab " + ", ".join(f"{v}: {r:.2f}" for v, r in zip(sizes, compression["all"])))
    step("bpe", len(train_docs), 0, vocab_size=tok.vocab_size, compression=compression)

    # 9. pack, then move tokenizer + shards into place -----------------------------------------
    stage = out / "build.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    tok.save(stage / "tokenizer.json")
    meta = pack_corpus([t for _, _, t in mixed], tok, stage / "shards", val_docs=[t for _, _, t in val_docs],
                       seed=cfg.seed, progress=not cfg.smoke)
    (out / "tokenizer.json").unlink(missing_ok=True)  # from here on the folder reads as "not built"
    shutil.rmtree(out / "shards", ignore_errors=True)
    os.replace(stage / "shards", out / "shards")
    os.replace(stage / "tokenizer.json", out / "tokenizer.json")
    shutil.rmtree(stage, ignore_errors=True)
    n_tok = {s: meta["splits"][s]["n_tokens"] for s in ("train", "val")}
    print(f"[9] packed {fmt_count(n_tok['train'])} train + {fmt_count(n_tok['val'])} val tokens "
          f"({meta['dtype']}) into {out / 'shards'}")
    step("pack", len(mixed), 0, tokens=n_tok)

    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, source, text in docs_out:
            fh.write(json.dumps({"doc_id": doc_id, "source": source, "text": text}) + "\n")
    with open(out / "removed.jsonl", "w", encoding="utf-8") as fh:
        for row in removed_log:
            fh.write(json.dumps(row) + "\n")
    log.close()
    summary.update(tokens=n_tok, seconds=round(time.time() - t0, 2), data_dir=str(out))
    write_json_atomic(out / "summary.json", summary)
    print(f"done in {time.time() - t0:.1f}s; artifacts in {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)
