"""minilife.optim.AdamW against torch.optim.AdamW and against the closed form of pure decay."""
import io

import pytest
import torch

from minilife.optim import AdamW

GROUPS = [  # three groups with different hyperparameters, one without weight decay
    dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8),
    dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    dict(lr=5e-2, weight_decay=0.5, betas=(0.5, 0.9), eps=1e-10),
]


def _make_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [[(4, 3), (5,)], [(2, 2, 3)], [(7,), (3, 1)]]
    return [[torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in grp] for grp in shapes]


def _groups(params):
    return [dict(params=p, **h) for p, h in zip(params, GROUPS)]


def test_matches_torch_adamw_with_groups_and_state_dict_roundtrip():
    ours_p, ref_p = _make_params(0), _make_params(0)
    ours = AdamW(_groups(ours_p))
    ref = torch.optim.AdamW(_groups(ref_p), foreach=False)
    grad_gen = torch.Generator().manual_seed(1)
    flat_ours = [p for grp in ours_p for p in grp]
    flat_ref = [p for grp in ref_p for p in grp]
    for step in range(300):
        for a, b in zip(flat_ours, flat_ref):
            g = torch.randn(a.shape, generator=grad_gen, dtype=torch.float64) * (1 + step % 7)
            a.grad, b.grad = g.clone(), g.clone()
        if step % 50 == 3:  # a parameter without a gradient must be left alone by both
            flat_ours[1].grad = flat_ref[1].grad = None
        ours.step()
        ref.step()
        if step == 150:  # save through bytes, rebuild the optimizer, load: training must continue identically
            buf = io.BytesIO()
            torch.save(ours.state_dict(), buf)
            buf.seek(0)
            ours = AdamW(_groups(ours_p))
            ours.load_state_dict(torch.load(buf, weights_only=True))
    # float64, same equations, op order differs (torch uses lerp_ for m): rounding ~1e-16 per op and
    # step, so 300 steps stay far below 1e-11; a wrong bias correction or decay is off by >1e-4.
    for a, b in zip(flat_ours, flat_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    for pa, pb in zip(flat_ours, flat_ref):  # moments too
        sa, sb = ours.state[pa], ref.state[pb]
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-11, atol=1e-14)
        assert sa["step"] == int(sb["step"])


def test_zero_gradient_gives_pure_decoupled_decay():
    # with g = 0 the moments stay 0, the Adam term is 0/(0 + eps) = 0, so p_t = p_0 (1 - lr wd)^t exactly
    p = torch.randn(10, dtype=torch.float64, requires_grad=True)
    p0 = p.detach().clone()
    opt = AdamW([p], lr=0.1, weight_decay=0.2)
    for _ in range(25):
        p.grad = torch.zeros_like(p)
        opt.step()
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.2) ** 25, rtol=1e-13, atol=0)  # float64 rounding only


def test_first_step_size_is_lr_times_sign():
    # bias correction: after one step m^ = g and v^ = g^2, so the update is lr * g / (|g| + eps) ~ lr * sign(g)
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([3.0, -2.0, 1e-3, -5e2, 7.0, -1.0], dtype=torch.float64)
    AdamW([p], lr=0.01, weight_decay=0.0, eps=0.0).step()
    torch.testing.assert_close(p.detach(), -0.01 * p.grad.sign(), rtol=1e-14, atol=0)  # exact up to rounding


@pytest.mark.parametrize("kwargs, word", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_hyperparameter_names_the_group():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="param group 1.*lr"):
        AdamW([{"params": [p]}, {"params": [q], "lr": -3.0}])
