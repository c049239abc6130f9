"""The dynamic loss scaler against a scripted sequence of finite and non-finite steps."""
import pytest
import torch

from minilife.optim.loss_scale import DynamicLossScaler


def test_dynamic_scaler_skips_and_halves_then_grows():
    p = torch.nn.Parameter(torch.zeros(3))
    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    assert float(s.scale(torch.tensor(1.5))) == 12.0
    p.grad = torch.tensor([8.0, float("inf"), 0.0])
    ok = s.unscale_([p])
    assert not ok
    s.update(ok)
    assert (s.scale_value, s.skipped) == (4.0, 1)
    for _ in range(2):
        p.grad = torch.tensor([4.0, 8.0, 0.0])
        ok = s.unscale_([p])
        assert ok and torch.equal(p.grad, torch.tensor([1.0, 2.0, 0.0]))
        s.update(ok)
    assert s.scale_value == 8.0  # two good steps -> doubled


def test_bad_scaler_settings_raise():
    for kwargs in ({"init_scale": 0}, {"growth_factor": 1.0}, {"backoff_factor": 1.0}, {"growth_interval": 0}):
        with pytest.raises(ValueError, match="need init_scale"):
            DynamicLossScaler(**kwargs)
