"""Checkpoint tests: exact resume, weights_only loading, atomicity under a crash, clear errors, NaN guard.

The reference for "resume is exact" is an uninterrupted run: training k more steps after a reload
must give bit-identical weights to training those k steps without stopping (CPU float32 is
deterministic for these ops, so equality is exact, tolerance 0).
"""
import io
import random

import numpy as np
import pytest
import torch

from minilife.checkpoint import (CheckpointError, NonFiniteLossError, check_finite, load_checkpoint, read_checkpoint,
                                 save_checkpoint)
from minilife.runs import checkpoint_path, latest_intact_checkpoint, prune_checkpoints, save_rotating

CONFIG = {"n_layer": 2, "n_embd": 8, "lr": 1e-2, "betas": [0.9, 0.95], "data": {"seed": 1, "batch": 4}}


def make_model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.GELU(), torch.nn.Linear(width, 1))


def train_steps(model, opt, n: int) -> list[float]:
    """n AdamW steps on random (global torch RNG) batches plus dropout-like noise from python/numpy
    RNGs, so every RNG the checkpoint restores influences the trajectory."""
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4)
        noise = random.random() + float(np.random.rand())
        loss = ((model(x) - x.sum(1, keepdim=True) * noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_exact(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 3)
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3, config=CONFIG,
                           data_state={"cursor": 123, "gen": torch.Generator().manual_seed(5).get_state()},
                           extra={"best_val": 1.5})
    ref_losses = train_steps(model, opt, 4)  # the uninterrupted run
    ref_params = [p.detach().clone() for p in model.parameters()]

    model2 = make_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    info = load_checkpoint(path, model=model2, optimizer=opt2, config=CONFIG, restore_rng=True)  # resuming
    assert info["step"] == 3 and info["data_state"]["cursor"] == 123 and info["extra"] == {"best_val": 1.5}
    assert torch.equal(info["data_state"]["gen"], torch.Generator().manual_seed(5).get_state())
    assert info["config"] == CONFIG
    losses = train_steps(model2, opt2, 4)
    assert losses == ref_losses  # exact: same ops, same inputs, same RNG draws (tolerance 0)
    for p, q in zip(model2.parameters(), ref_params):
        assert torch.equal(p, q)


def test_rng_draws_after_load_equal_draws_after_save(tmp_path):
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both states
    save_checkpoint(tmp_path / "r.pt", model=make_model(), step=0, config={})
    after_save = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble
    load_checkpoint(tmp_path / "r.pt", restore_rng=True)  # resuming
    after_load = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert after_load == after_save
    # plain loading (the default) leaves every current stream alone
    model = make_model()
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    load_checkpoint(tmp_path / "r.pt", model=model)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_save_and_load_through_binary_file_objects(tmp_path):
    model = make_model()
    buf = io.BytesIO()
    buf.write(b"header")  # the checkpoint need not start at offset 0
    assert save_checkpoint(buf, model=model, step=7, config=CONFIG, extra={"note": "in memory"}) is buf
    buf.seek(len(b"header"))
    fresh = make_model()
    info = load_checkpoint(buf, model=fresh, config=CONFIG)
    assert info["step"] == 7 and info["extra"] == {"note": "in memory"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with open(tmp_path / "f.pt", "wb") as fh:
        save_checkpoint(fh, model=model, step=1, config=CONFIG)
    with open(tmp_path / "f.pt", "rb") as fh:
        assert read_checkpoint(fh)["step"] == 1
    broken = io.BytesIO(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a whole torch zip"):
        load_checkpoint(broken)


def test_file_loads_with_plain_torch_weights_only(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, opt, 1)
    path = save_checkpoint(tmp_path / "w.pt", model=model, optimizer=opt, step=1, config=CONFIG)
    raw = torch.load(path, weights_only=True)  # torch's own safe loader, not ours
    assert raw["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(raw["model"][k], v)


def test_pickled_code_is_refused(tmp_path):
    """A file that needs arbitrary unpickling (here: a custom class) is rejected, not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "minilife-checkpoint", "payload": _Custom()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: weights_only loading refused its pickle"):
        load_checkpoint(path)


class _Custom:
    pass


def test_crash_mid_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = make_model()
    save_checkpoint(path, model=model, step=1, config=CONFIG)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the "crash"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(CheckpointError, match=r"last.pt: could not be written \(disk full \(simulated\)\)"):
        save_checkpoint(path, model=model, step=2, config=CONFIG)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_config_mismatch_names_fields_and_values(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config=CONFIG)
    other = {**CONFIG, "n_layer": 4, "data": {"seed": 1, "batch": 8}}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "c.pt", config=other)
    msg = str(e.value)
    assert "c.pt" in msg and "n_layer: checkpoint has 2, run has 4" in msg
    assert "data.batch: checkpoint has 4, run has 8" in msg and "lr" not in msg
    # an ignored field is not compared; a tuple equals the list JSON gives back
    load_checkpoint(tmp_path / "c.pt", config={**CONFIG, "n_layer": 4, "betas": (0.9, 0.95)},
                    ignore=["n_layer"])


def test_model_shape_mismatch_is_a_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=make_model(8), step=0, config={})
    with pytest.raises(CheckpointError, match="c.pt.*do not fit"):
        load_checkpoint(tmp_path / "c.pt", model=make_model(16))


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config={})
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="noise.pt.*truncated or corrupt"):
        load_checkpoint(tmp_path / "noise.pt")
    torch.save(make_model().state_dict(), tmp_path / "bare.pt")  # a valid torch file, not ours
    with pytest.raises(CheckpointError, match="bare.pt: not a minilife checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")


def test_unloadable_values_rejected_at_save_time(tmp_path):
    with pytest.raises(CheckpointError, match=r"data_state\['order'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config={},
                        data_state={"order": np.arange(3)})
    with pytest.raises(CheckpointError, match="config must be a JSON-able"):
        save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config={"f": object()})
    assert not (tmp_path / "c.pt").exists()


def test_optimizer_missing_from_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config={})
    model = make_model()
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=torch.optim.AdamW(model.parameters()))


def test_nonfinite_weights_never_overwrite_good_checkpoint(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={})
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: non-finite values in 2\.bias"):
        save_checkpoint(path, model=model, step=2, config={})
    assert load_checkpoint(path)["step"] == 1


def test_check_finite_guard(tmp_path):
    assert check_finite(torch.tensor(2.5), step=7) == 2.5
    good = tmp_path / "ckpt_step000100.pt"
    for bad in (float("nan"), float("inf"), torch.tensor(float("-inf"))):
        with pytest.raises(NonFiniteLossError) as e:
            check_finite(bad, step=123, last_good_path=good)
        assert "step 123" in str(e.value) and str(good) in str(e.value)
    with pytest.raises(NonFiniteLossError, match="step 5: gradient norm is nan"):
        check_finite(float("nan"), step=5, last_good_path=good, what="gradient norm")
    with pytest.raises(NonFiniteLossError, match="step 4: loss is nan.*no checkpoint has been saved yet"):
        check_finite(float("nan"), step=4)
    model = make_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 9: non-finite weights in 0\.weight"):
        check_finite(1.0, step=9, last_good_path=good, model=model)


def test_rotation_latest_and_pruning(tmp_path):
    d = tmp_path / "ckpts"
    assert latest_intact_checkpoint(d) == (None, [])
    model = make_model()
    for step in (10, 20, 30, 40, 50):
        with torch.no_grad():
            model[2].bias.fill_(step)
        save_rotating(d, step=step, keep_last=2, model=model, config={})
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ckpt_step000040.pt", "ckpt_step000050.pt", "last.pt"]
    assert latest_intact_checkpoint(d) == (checkpoint_path(d, 50), [])
    fresh = make_model()
    assert load_checkpoint(d / "last.pt", model=fresh)["step"] == 50
    assert fresh[2].bias.item() == 50.0
    assert prune_checkpoints(d, keep_last=1) == [checkpoint_path(d, 40)]
    assert (d / "last.pt").is_file() and load_checkpoint(d / "last.pt")["step"] == 50
    assert checkpoint_path(d, 1234567).name == "ckpt_step1234567.pt"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_and_rng_round_trip(tmp_path):
    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 4, device="cuda")).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "g.pt", model=model, optimizer=opt, step=1, config={})
    after_save = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed_all(99)
    fresh = make_model().cuda()
    load_checkpoint(tmp_path / "g.pt", model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()),
                    map_location="cuda")
    assert torch.rand(4, device="cuda").tolist() == after_save
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)



def test_damaged_member_inside_intact_zip(tmp_path):
    """Flip bytes inside the stored tensors' data while the zip directory stays valid."""
    path = save_checkpoint(tmp_path / "c.pt", model=make_model(), step=0, config={})
    data = bytearray(path.read_bytes())
    start = data.find(b"data.pkl")  # the pickle member's header; garble what follows it
    data[start + 40:start + 200] = bytes(160)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt: corrupt: member .*data.pkl.* fails its CRC-32 checksum"):
        load_checkpoint(path)  # caught by the archive's checksums before anything is unpickled
