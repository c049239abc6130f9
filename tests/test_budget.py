"""Budget calculator tests, each against a reference outside the formula under test:
real models (their parameters, gradients, optimizer state and saved activations), torch's FLOP
counter, published figures (Llama-2-7B's parameter count, Chinchilla's 70B / 1.4T tokens) and the
lifecycle notes' worked numbers (72 GB, ~84 GB, 4.2e23 FLOPs, the cost function of notes 000).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from minilife import budget
from minilife.budget import MemoryOptions, memory_bill
from minilife.model.transformer import GPT, ModelConfig
from minilife.optim.adamw import AdamW

LLAMA2_7B = ModelConfig(vocab_size=32000, context_length=4096, n_layer=32, n_head=32, n_embd=4096,
                        ffn_hidden=11008, tie_embeddings=False)
FP32 = dict(weights="fp32", grads="fp32", moments="fp32", activations_dtype="fp32")


def meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(cfg)


# --------------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize("cfg", [
    ModelConfig.preset("micro"), ModelConfig.preset("tiny"), ModelConfig.preset("tiny", tie_embeddings=False),
    ModelConfig.preset("micro", ffn_hidden=100, n_layer=3), ModelConfig.preset("gpt2-small"),
    ModelConfig.preset("gpt2-small", tie_embeddings=False)], ids=str)
def test_param_count_matches_real_model(cfg):
    model = meta_model(cfg)
    assert budget.param_count(cfg) == model.num_params()
    assert budget.param_count(cfg) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_llama2_7b_shape_matches_published_count():
    assert budget.param_count(LLAMA2_7B) == 6_738_415_616  # Llama-2-7B's released parameter count
    assert meta_model(LLAMA2_7B).num_params() == 6_738_415_616


@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 4), half_head=st.integers(1, 8),
       vocab=st.integers(2, 300), ffn=st.one_of(st.none(), st.integers(1, 96)), tied=st.booleans())
def test_param_count_property(n_layer, n_head, half_head, vocab, ffn, tied):
    cfg = ModelConfig(vocab_size=vocab, context_length=16, n_layer=n_layer, n_head=n_head,
                      n_embd=2 * half_head * n_head, ffn_hidden=ffn, tie_embeddings=tied)
    assert budget.param_count(cfg) == meta_model(cfg).num_params()


def test_lora_count_from_real_linear_shapes():
    cfg = ModelConfig.preset("micro", n_layer=3)
    model = meta_model(cfg)
    targets = ("qkv", "proj", "w2")
    expected = sum(8 * (mod.in_features + mod.out_features) for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets)
    assert budget.lora_param_count(cfg, rank=8, targets=targets) == expected
    with pytest.raises(ValueError, match="q_proj"):
        budget.lora_param_count(cfg, rank=8, targets=("q_proj",))


# --------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("batch,seq,tied", [(2, 32, True), (1, 64, False)])
def test_flops_per_token_equals_torch_flop_counter(batch, seq, tied):
    """With the math attention path every FLOP is a matmul torch's counter sees: equality is exact."""
    cfg = ModelConfig.preset("micro", attn_impl="math", tie_embeddings=tied)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model(idx, idx)[1].backward()
    assert budget.flops_per_token(cfg, seq)["total"] * batch * seq == counter.get_total_flops()


def test_6nd_and_notes_worked_examples():
    assert budget.train_flops(70e9, 1e12) == pytest.approx(4.2e23, rel=1e-12)  # notes 003, float rounding only
    # notes 000's estimate_pretraining_cost: 6 N D / 312e12 s at $2.50/h -> int(hours), int(cost)
    tc = budget.train_time_cost(budget.train_flops(7e9, 1e12), peak_flops=312e12, mfu=1.0, usd_per_gpu_hour=2.5)
    assert int(tc["gpu_hours"]) == 37393 and int(tc["usd"]) == 93482
    half = budget.train_time_cost(1e18, peak_flops=1e12, mfu=0.5, n_gpus=4, usd_per_gpu_hour=1.0)
    assert half["gpu_hours"] == pytest.approx(1e18 / 0.5e12 / 3600, rel=1e-12)
    assert half["wall_days"] == pytest.approx(half["gpu_hours"] / 4 / 24, rel=1e-12)
    with pytest.raises(ValueError, match="mfu"):
        budget.train_time_cost(1.0, peak_flops=1.0, mfu=1.5)


def test_chinchilla():
    assert budget.chinchilla_tokens(70e9) == pytest.approx(1.4e12, rel=1e-12)  # Chinchilla: 70B on 1.4T tokens
    n, d = budget.chinchilla_optimal(5.76e23)  # Chinchilla's reported training compute
    # 2%: the paper's 5.76e23 is its own FLOP count, 2% below 6 N D = 5.88e23 (=> N 1% low)
    assert n == pytest.approx(70e9, rel=0.02) and d == pytest.approx(20 * n, rel=1e-12)


# --------------------------------------------------------------------------------------------
# memory: the notes' figures from stated assumptions


def test_notes_72gb_for_8b():
    opts = MemoryOptions(weights="fp16", grads="fp16", moments="bf16", n_moments=2, master_weights=False,
                         activations_gb=8.0)
    gb = memory_bill(8_000_000_000, opts).gb()
    # notes 002's receipt: weights 16, gradients 16, Adam 32, activations 8, total ~72 (whole GB)
    assert [round(gb[k]) for k in ("weights", "grads", "moments", "activations", "total")] == [16, 16, 32, 8, 72]
    assert gb["total"] == pytest.approx(72, abs=0.5)
    assert budget.NOTES_SCENARIOS["notes-8b-72gb"]["options"] == opts
    # the notes' text says fp32 Adam states: that gives 104 GB, not 72
    assert memory_bill(8e9, MemoryOptions(weights="fp16", grads="fp16", moments="fp32", activations_gb=8.0)
                       ).total == pytest.approx(104e9, rel=1e-12)


def test_notes_84gb_for_7b():
    opts = MemoryOptions(weights="bf16", grads="bf16", moments="fp32", include_activations=False)
    gb = memory_bill(7_000_000_000, opts).gb()
    # notes 003: weights 14, gradients 14, m 28 + v 28, "~84 GB before activations"
    assert [round(gb[k]) for k in ("weights", "grads", "moments", "activations", "total")] == [14, 14, 56, 0, 84]
    assert budget.NOTES_SCENARIOS["notes-7b-84gb"]["options"] == opts
    for key, sc in budget.NOTES_SCENARIOS.items():
        assert round(memory_bill(sc["n_params"], sc["options"]).total / 1e9) == sc["expected_gb"], key
    # the exact Llama-2-7B count under the same assumptions: 12 bytes x 6.738e9
    assert memory_bill(LLAMA2_7B, opts).total == 12 * 6_738_415_616


def test_precision_recipes_bytes_per_param():
    n = 10**9
    # ZeRO (Rajbhandari et al. 2020, sec. 3.1): mixed-precision Adam holds 2 + 2 + 12 = 16 bytes/param
    for name, per_param in (("mixed", 16), ("fp32", 16), ("bf16", 8)):
        opts = budget.PRECISIONS[name]
        bill = memory_bill(n, MemoryOptions(**{**opts.__dict__, "include_activations": False}))
        assert bill.total == per_param * n, name
    sgd = memory_bill(n, MemoryOptions(weights="fp32", grads="fp32", n_moments=1, include_activations=False))
    assert sgd.total == 12 * n


def test_lora_bill_trains_only_adapters():
    n_lora = budget.lora_param_count(LLAMA2_7B, rank=8)
    opts = MemoryOptions(trainable_params=n_lora, include_activations=False)  # bf16 weights/grads, fp32 moments
    bill = memory_bill(LLAMA2_7B, opts)
    assert bill.weights == 2 * (6_738_415_616 + n_lora)
    assert bill.grads == 2 * n_lora and bill.moments == 8 * n_lora and bill.master == 0


def test_memory_options_errors_name_the_field():
    with pytest.raises(ValueError, match="MemoryOptions.moments='fp13'"):
        MemoryOptions(moments="fp13")
    with pytest.raises(ValueError, match="MemoryOptions.seq"):
        MemoryOptions(seq=0)
    with pytest.raises(ValueError, match="activations need a ModelConfig"):
        memory_bill(7e9, MemoryOptions())
    with pytest.raises(ValueError, match="'fused' or 'autograd'"):
        budget.activation_terms(ModelConfig.preset("micro"), 8, kind="textbook")
    # negative sizes: a clear error, not "math domain error" or a negative bill
    with pytest.raises(ValueError, match="chinchilla_optimal: compute_flops=-1"):
        budget.chinchilla_optimal(-1.0)
    with pytest.raises(ValueError, match="train_flops: n_params=-7"):
        budget.train_flops(-7, 1e9)
    with pytest.raises(ValueError, match="memory_bill: model must be"):
        memory_bill(-5, MemoryOptions(include_activations=False))


# --------------------------------------------------------------------------------------------
# predictions against real tensors


@pytest.mark.parametrize("opt_name", ["minilife", "torch"])
@pytest.mark.parametrize("tied", [True, False])
def test_state_bytes_exact_after_real_step(opt_name, tied):
    cfg = ModelConfig.preset("micro", tie_embeddings=tied)
    model = GPT(cfg)
    opt = (AdamW if opt_name == "minilife" else torch.optim.AdamW)(model.param_groups(0.1), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    params = {id(p): p for p in model.parameters()}.values()
    real_params = sum(p.numel() * p.element_size() for p in params)
    real_grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    real_moments = sum(opt.state[p][k].numel() * opt.state[p][k].element_size()
                       for p in params for k in ("exp_avg", "exp_avg_sq"))
    pred = memory_bill(cfg, MemoryOptions(**FP32, include_activations=False))
    assert (pred.weights, pred.grads, pred.moments) == (real_params, real_grads, real_moments)  # exact bytes
    measured = budget.measure_state_bytes(model, opt)
    assert (measured["params"], measured["grads"], measured["moments"]) == (real_params, real_grads, real_moments)


def _saved_storages_via_graph(loss, model) -> int:
    """Independent count: walk the autograd graph and sum each distinct saved storage (not params/buffers).
    Python scalars that autograd wraps as 0-d float64 tensors (``scores * (1 / sqrt(D))``) are skipped:
    they bypass saved_tensors_hooks and are not activations."""
    fixed = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.dtype == torch.float64):
                        s = t.untyped_storage()
                        if s.data_ptr() not in fixed:
                            seen[s.data_ptr()] = s.nbytes()
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_saved_activation_bytes(impl, ckpt):
    cfg = ModelConfig.preset("micro", attn_impl=impl, gradient_checkpointing=ckpt)
    model = GPT(cfg).train()
    batch, seq = 3, 40
    idx, tgt = (torch.randint(0, cfg.vocab_size, (batch, seq)) for _ in range(2))
    out = budget.measure_saved_activations(model, idx, tgt)
    # exact: the op-by-op accounting of what autograd keeps for this block (fp32)
    assert out["bytes"] == budget.activation_bytes(cfg, batch=batch, seq=seq, dtype="fp32", kind="autograd",
                                                   checkpointing=ckpt, recompute_peak=False)
    fused = budget.activation_bytes(cfg, batch=batch, seq=seq, dtype="fp32", kind="fused", checkpointing=ckpt,
                                    recompute_peak=False)
    assert fused <= out["bytes"] < 2 * fused  # the fused minimum is a subset; plain autograd keeps < 2x it
    if not ckpt:  # the hook count equals a walk of the graph's saved tensors (checkpointing hides them)
        assert out["bytes"] == _saved_storages_via_graph(out["loss"], model)
    out["loss"].backward()  # the graph is intact: hooks returned the tensors unchanged
    assert model.lm_head.weight.grad is not None


def test_activation_scaling_and_checkpoint_peak():
    cfg = ModelConfig.preset("tiny")
    one = budget.activation_bytes(cfg, batch=1, seq=64)
    assert budget.activation_bytes(cfg, batch=4, seq=64) == 4 * one  # linear in batch
    per_layer = sum(n for _, n, _ in budget.activation_terms(cfg, 64)) * 2 * 64  # bf16, 64 tokens
    full = budget.activation_bytes(cfg, batch=1, seq=64)
    stored = budget.activation_bytes(cfg, batch=1, seq=64, checkpointing=True, recompute_peak=False)
    peak = budget.activation_bytes(cfg, batch=1, seq=64, checkpointing=True)
    assert peak - stored == per_layer  # one block recomputed at a time during backward
    assert full - stored == cfg.n_layer * (per_layer - cfg.n_embd * 2 * 64)
    with pytest.raises(ValueError, match="fp32 only"):
        budget.activation_bytes(cfg, batch=1, seq=8, dtype="bf16", kind="autograd")
