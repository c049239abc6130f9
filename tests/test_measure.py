"""minilife.measure: the CPU memory meter against sizes worked by hand, and the pair comparison.

Expected figures are numel * bytes per element, computed here; counts are exact integers (tolerance 0).
"""
import torch

from minilife.kernels.flash_attention_torch import flash_attention_torch
from minilife.kernels.reference import attention_naive
from minilife.measure import compare, peak_tensor_bytes


def test_new_tensors_add_exactly_their_bytes():
    assert peak_tensor_bytes(lambda: torch.zeros(1000)) == 1000 * 4  # float32
    assert peak_tensor_bytes(lambda: torch.ones(3, 5, dtype=torch.float64)) == 15 * 8

    def two_held():
        a = torch.zeros(1000)
        b = torch.zeros(250, dtype=torch.float16)
        return a, b

    assert peak_tensor_bytes(two_held) == 1000 * 4 + 250 * 2  # both alive at once

    def one_at_a_time():
        for _ in range(3):
            a = torch.zeros(1000)
            del a  # freed before the next one: the peak is one tensor

    assert peak_tensor_bytes(one_at_a_time) == 1000 * 4


def test_views_and_in_place_results_add_nothing():
    before = torch.zeros(1000)  # existed before counting began
    for fn in (lambda: before.view(10, 100), lambda: before.view(10, 100).t()[2:5], lambda: before.add_(1),
               lambda: torch.add(before, 1, out=before), lambda: before[::2]):
        assert peak_tensor_bytes(fn) == 0

    def new_then_views():
        a = torch.zeros(1000)
        b = a.view(10, 100).t()  # shares a's storage
        b.mul_(2)
        return a, b

    assert peak_tensor_bytes(new_then_views) == 1000 * 4  # counted once
    assert peak_tensor_bytes(lambda: before.view(10, 100) + 1) == 1000 * 4  # a new result is counted


def test_naive_attention_holds_the_scores_and_flash_does_not():
    B, H, T, D = 1, 2, 128, 16
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    scores = B * H * T * T * 4  # one float32 (B, H, T, T) matrix, the least the naive version allocates
    assert peak_tensor_bytes(lambda: attention_naive(q, k, v)) >= scores
    # tiles of 16: (B, H, 16, 16) scores and (B, H, T, D) output/LSE; far below one T x T matrix
    assert peak_tensor_bytes(lambda: flash_attention_torch(q, k, v, block_q=16, block_k=16)) < scores / 2


def test_compare_rows_are_ours_over_reference():
    """A side that allocates 4x the bytes shows a memory ratio of exactly 1/4; ratios are ours / ref."""
    sides = {"small": lambda: torch.zeros(1000), "big": lambda: torch.zeros(4000)}
    rows = {r["metric"]: r for r in compare("demo", "small", "big", sides, torch.device("cpu"), repeats=3)}
    mem = rows["peak_MiB"]
    assert (mem["ours_min"], mem["ref_min"]) == (1000 * 4 / 2**20, 4000 * 4 / 2**20)
    assert mem["ratio_min"] == mem["ratio_median"] == 0.25
    t = rows["time_ms"]
    assert t["ratio_min"] == t["ours_min"] / t["ref_min"] and t["ours_min"] <= t["ours_median"]
