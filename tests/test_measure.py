"""minilife.measure: the CPU memory meter against sizes worked by hand, the comparison, the kernels' sides.

Expected figures are numel * bytes per element, computed here; counts are exact integers (tolerance 0).
The kernels' comparison sides are checked against float64 math (``cross_entropy_naive``, autograd).
"""
import torch

from minilife.kernels.flash_attention_torch import flash_attention_torch
from minilife.kernels.reference import attention_naive, cross_entropy_naive
from minilife.measure import bench_attention, bench_loss, ce_sides, compare, linear_ce_sides, peak_tensor_bytes


@torch.library.custom_op("minilife_test::with_scratch", mutates_args=())
def with_scratch(x: torch.Tensor) -> torch.Tensor:
    scratch = torch.zeros(250_000)  # 1,000,000 bytes, alive only inside the op
    return x + scratch[: x.numel()].view_as(x)


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


def test_ops_inside_a_custom_op_are_counted():
    """A custom op with a Python body (as torch's chunked F.linear_cross_entropy is): its scratch counts."""
    x = torch.ones(10)
    assert peak_tensor_bytes(lambda: with_scratch(x)) == 250_000 * 4 + 10 * 4  # scratch + result, both alive
    assert torch.equal(with_scratch(x), x)


def test_compare_interleaves_several_references():
    sides = {"small": lambda: torch.zeros(1000), "big": lambda: torch.zeros(4000), "mid": lambda: torch.zeros(2000)}
    rows = compare("demo", "small", ["big", "mid"], sides, torch.device("cpu"), repeats=2)
    assert [(r["reference"], r["metric"]) for r in rows] == [("big", "time_ms"), ("big", "peak_MiB"),
                                                             ("mid", "time_ms"), ("mid", "peak_MiB")]
    assert [r["ratio_min"] for r in rows if r["metric"] == "peak_MiB"] == [0.25, 0.5]


def test_kernel_sides_compute_the_same_gradients_as_float64_math():
    N, V, C = 24, 50, 8
    sides = linear_ce_sides(N, V, C, torch.float32, torch.device("cpu"), chunk=5, seed=3)
    g = torch.Generator().manual_seed(3)  # the same draws as linear_ce_sides makes
    hidden = torch.randn(N, C, generator=g).double().requires_grad_(True)
    weight = (torch.randn(V, C, generator=g) / C**0.5).double().requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    expected = torch.autograd.grad(cross_entropy_naive(hidden @ weight.t(), targets), (hidden, weight))
    assert {"fused", "materialised"} <= set(sides)
    for name, run in sides.items():
        for got, ref in zip(run(), expected):
            assert (got.double() - ref).abs().max().item() < 1e-5, name
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(N, V, generator=g).double().requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    (expected,) = torch.autograd.grad(cross_entropy_naive(logits, targets), (logits,))
    for name, run in ce_sides(N, V, torch.float32, torch.device("cpu"), seed=3).items():
        assert (run()[0].double() - expected).abs().max().item() < 1e-6, name


def test_bench_rows_name_every_reference():
    cpu = torch.device("cpu")
    rows = bench_loss(cpu, tokens=16, vocab=40, hidden=8, dtype=torch.float32, repeats=1, triton_ce=True)
    refs = {r["reference"] for r in rows if r["case"].startswith("linear + CE")}
    assert "materialised" in refs
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
        assert {"torch chunked", "torch chunked, our chunk"} <= refs
    assert {r["reference"] for r in rows if r["case"].startswith("cross-entropy")} == {"torch"}
    rows = bench_attention(cpu, seq_len=16, heads=2, head_dim=8, repeats=1)
    assert [(r["ours"], r["reference"], r["metric"]) for r in rows] == [
        ("flash_attention_torch", "attention_naive", "time_ms"), ("flash_attention_torch", "attention_naive", "peak_MiB")]
