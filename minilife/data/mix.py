"""Data mixing: sizes and sampling weights -> effective shares, a seeded sampler, curriculum order.

What it implements
- **Effective shares.** After cleaning, each source s has a size (tokens or documents) and a
  sampling weight w_s (how strongly it is up- or down-sampled). What the model actually sees is
  ``share_s = size_s * w_s / sum_t size_t * w_t``, and a budget of B units repeats source s
  ``epochs_s = share_s * B / size_s = w_s * B / sum_t size_t * w_t`` times.
  Worked example, the lifecycle notes' mix table (cleaned size x weight): web 350B x 1.0,
  code 180B x 1.6, books 120B x 0.8, support logs 30B x 1.2 -> 350 : 288 : 96 : 36 of 770, i.e.
  45.5%, 37.4%, 12.5%, 4.7%. (The notes print 50 / 33 / 12 / 5 in their share column; the
  size x weight rule in their own header gives the figures above.) Over a 1T-token budget that
  is 1.30 epochs of web, 2.08 of code, 1.04 of books and 1.56 of support logs.
- **MixtureSampler.** Draws documents so that each source gets its share, counted in
  ``unit="documents"`` or ``unit="tokens"`` (then a source is picked with probability
  proportional to share / mean document length, so its *tokens* match the share in
  expectation). Inside a source, documents come in a seeded shuffled order without replacement;
  when a source runs out a new epoch starts with a fresh shuffle, and ``epochs()`` reports how
  many passes each source has had.
- **Curriculum.** ``curriculum=`` a difficulty score (a callable on the text, or the name of one
  below: mean word length, length in words, rare-word rate) sorts each drawn batch from easy to
  hard. It reorders what was drawn and never changes how much of each source is seen.

What it leaves out: temperature / UniMax-style weight schedules, and curricula that change the
mixture over training (both are a weights dict per stage built on these pieces).
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

# shares and epochs
def _check_mix(sizes: Mapping[str, float], weights: Mapping[str, float]) -> None:
    if not sizes:
        raise ValueError("sources: need at least one source")
    unknown = [s for s in weights if s not in sizes]
    if unknown:
        raise ValueError(f"weights: unknown source(s) {unknown}; sources are {sorted(sizes)}")
    missing = [s for s in sizes if s not in weights]
    if missing:
        raise ValueError(f"weights: no weight for source(s) {missing} (to leave a source out, remove it)")
    for what, table in (("weights", weights), ("sizes", sizes)):
        for s, v in table.items():
            if what == "sizes" and v == 0:
                raise ValueError(f"source {s!r} is empty (size 0): remove it or give it data")
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{what}[{s!r}] = {v!r}: must be a positive finite number (to leave a source "
                                 "out, remove it)")


def effective_shares(sizes: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """share_s = size_s * weight_s / sum over sources of size * weight (sums to 1)."""
    _check_mix(sizes, weights)
    total = sum(sizes[s] * weights[s] for s in sizes)
    return {s: sizes[s] * weights[s] / total for s in sizes}


def epochs_per_source(sizes: Mapping[str, float], weights: Mapping[str, float],
                      budget: float) -> dict[str, float]:
    """How many times each source is repeated when ``budget`` units (same unit as sizes) are drawn."""
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget = {budget!r}: must be a finite number >= 0")
    shares = effective_shares(sizes, weights)
    return {s: shares[s] * budget / sizes[s] for s in sizes}


def mix_table(sizes: Mapping[str, float], weights: Mapping[str, float],
              budget: float | None = None) -> list[dict]:
    """One row per source: size, weight, share (and epochs when a budget is given), for printing."""
    shares = effective_shares(sizes, weights)
    epochs = epochs_per_source(sizes, weights, budget) if budget is not None else {}
    return [{"source": s, "size": sizes[s], "weight": weights[s], "share": shares[s],
             **({"epochs": epochs[s]} if budget is not None else {})} for s in sizes]


# difficulty scores for a curriculum (higher = harder)
def word_count(text: str) -> int:
    """Whitespace words: the default length unit when no tokenizer is given."""
    return len(text.split())


def mean_word_length(text: str) -> float:
    """Mean characters per whitespace word (0.0 for an empty text): long words read as harder."""
    words = text.split()
    return sum(map(len, words)) / len(words) if words else 0.0


class RareWordRate:
    """Fraction of a text's words outside the ``top_k`` most frequent words of a reference corpus."""

    def __init__(self, corpus: Iterable[str], top_k: int = 1000):
        if top_k < 1:
            raise ValueError(f"top_k = {top_k}: must be >= 1")
        counts = Counter(w for text in corpus for w in text.lower().split())
        self.common = {w for w, _ in counts.most_common(top_k)}

    def __call__(self, text: str) -> float:
        words = text.lower().split()
        return sum(w not in self.common for w in words) / len(words) if words else 0.0


DIFFICULTY: dict[str, Callable[[str], float]] = {"mean_word_length": mean_word_length, "length": word_count}


# the sampler
class MixtureSampler:
    """Seeded sampler over named sources of texts that honours the effective shares.

    sources: {name: sequence of texts}; weights: {name: positive weight}; unit: "documents" or
    "tokens" (lengths from ``length_fn``, default whitespace words; pass e.g.
    ``lambda t: len(tok.encode(t))`` to count BPE tokens); curriculum: None, a callable text ->
    difficulty, or a name in DIFFICULTY ("rare_words" builds a RareWordRate over all sources)."""

    def __init__(self, sources: Mapping[str, Sequence[str]], weights: Mapping[str, float], *,
                 unit: str = "tokens", length_fn: Callable[[str], int] | None = None, seed: int = 0,
                 curriculum: Callable[[str], float] | str | None = None):
        if unit not in ("tokens", "documents"):
            raise ValueError(f"unit = {unit!r}: must be 'tokens' or 'documents'")
        for name, docs in sources.items():
            if len(docs) == 0:
                raise ValueError(f"source {name!r} is empty (no documents): remove it or give it data")
        self.sources, self.unit = {k: list(v) for k, v in sources.items()}, unit
        length_fn = length_fn or word_count
        self.lengths = {k: np.array([length_fn(t) for t in v], dtype=np.int64)  # (n_docs,) per source
                        for k, v in self.sources.items()}
        n_docs = {k: len(v) for k, v in self.sources.items()}
        self.sizes = n_docs if unit == "documents" else {k: int(v.sum()) for k, v in self.lengths.items()}
        self.weights = dict(weights)
        self.shares = effective_shares(self.sizes, self.weights)
        self.names = list(self.sources)
        per_doc = [self.shares[k] / (self.sizes[k] / n_docs[k]) for k in self.names]  # share / mean size
        self.source_probs = np.array(per_doc) / sum(per_doc)  # (n_sources,) P(next doc is from source)
        self.difficulty = self._difficulty(curriculum)
        self.rng = np.random.default_rng(seed)
        self._order = {k: self.rng.permutation(n_docs[k]) for k in self.names}  # current epoch's shuffle
        self._pos, self.drawn_docs, self.drawn_tokens = ({k: 0 for k in self.names} for _ in range(3))

    def _difficulty(self, curriculum) -> Callable[[str], float] | None:
        if curriculum is None or callable(curriculum):
            return curriculum
        if curriculum == "rare_words":
            return RareWordRate(t for docs in self.sources.values() for t in docs)
        if curriculum not in DIFFICULTY:
            raise ValueError(f"curriculum = {curriculum!r}: not a callable nor one of "
                             f"{sorted(DIFFICULTY) + ['rare_words']}")
        return DIFFICULTY[curriculum]

    def _next(self, name: str) -> int:
        """Next document of a source in its shuffled epoch order, reshuffling when it runs out."""
        if self._pos[name] == len(self._order[name]):
            self._order[name] = self.rng.permutation(len(self._order[name]))
            self._pos[name] = 0
        self._pos[name] += 1
        return int(self._order[name][self._pos[name] - 1])

    def sample(self, n: int) -> list[tuple[str, int]]:
        """Draw ``n`` documents as (source name, index into that source); easy to hard with a curriculum."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n = {n!r}: must be an integer >= 0")
        picks = self.rng.choice(len(self.names), size=n, p=self.source_probs)  # (n,) source per draw
        draws = []
        for k in picks.tolist():
            name = self.names[k]
            i = self._next(name)
            self.drawn_docs[name] += 1
            self.drawn_tokens[name] += int(self.lengths[name][i])
            draws.append((name, i))
        if self.difficulty is not None:
            scores = [self.difficulty(self.sources[s][i]) for s, i in draws]
            draws = [draws[j] for j in sorted(range(n), key=scores.__getitem__)]  # stable: ties keep order
        return draws

    def texts(self, draws: Sequence[tuple[str, int]]) -> list[str]:
        """The texts of (source, index) draws."""
        return [self.sources[s][i] for s, i in draws]

    def epochs(self) -> dict[str, float]:
        """Passes over each source so far, in the sampler's unit (1.5 = seen one and a half times)."""
        drawn = self.drawn_docs if self.unit == "documents" else self.drawn_tokens
        return {k: drawn[k] / self.sizes[k] for k in self.names}
