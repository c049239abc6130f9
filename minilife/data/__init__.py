"""minilife.data: the curriculum: the world corpus, cleaning, near-dedup, mixing, BPE, packing."""
