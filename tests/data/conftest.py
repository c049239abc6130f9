"""Helpers the data tests share (used by name; nothing here is autouse)."""
import numpy as np
import pytest


def _controlled_pair(rng, jaccard_target, union=120):
    """Two sets of distinct random 32-bit ints with |A & B| / |A | B| exactly shared / union."""
    shared = round(jaccard_target * union)
    elems = rng.choice(2**32, union, replace=False)
    only_a = (union - shared) // 2
    a = elems[:shared + only_a]
    b = np.concatenate([elems[:shared], elems[shared + only_a:]])
    return a, b, shared / union


@pytest.fixture
def controlled_pair():
    """Builder of two random 32-bit int sets with an exact, chosen Jaccard (MinHash and LSH tests)."""
    return _controlled_pair
