"""minilife.artifacts: data and pretrained models a later chapter or a notebook needs, and portable
checkpoints (model config + tokenizer inside; nothing points back at a data directory)."""
import dataclasses
import io
import shutil
from pathlib import Path

import pytest
import torch

from minilife import artifacts as A
from minilife.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from minilife.data.bpe_train import train_bpe
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(280, text=["From: Ada to Bob about the launch plan and the budget"] * 8,
                     special_tokens=("<|endoftext|>",))


def save_portable(target, tok, vocab_size=None):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=vocab_size or tok.vocab_size, context_length=32))
    save_checkpoint(target, model=model, step=1, config={"model": dataclasses.asdict(model.cfg)},
                    extra={"tokenizer_state": tok.state()})
    return model


def test_ensure_data_reuses_a_built_dir_and_load_token_data_checks_it(smoke_data_dir, monkeypatch):
    monkeypatch.setattr(A, "run_chapter", lambda *a: pytest.fail("must not rebuild"))
    assert A.ensure_data(smoke=True, data_dir=smoke_data_dir) == Path(smoke_data_dir)
    tokenizer, train, val = A.load_token_data(smoke_data_dir)
    assert len(train) > len(val) > 0 and int(train.max()) < tokenizer.vocab_size


def test_tokenizer_that_does_not_match_the_shards_is_an_error(smoke_data_dir, tmp_path, tok):
    copy = tmp_path / "data"
    shutil.copytree(smoke_data_dir, copy)
    tok.save(copy / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size"):
        A.load_token_data(copy)


def test_checkpoint_is_portable_copied_elsewhere_it_loads_and_generates(tmp_path, tok):
    model = save_portable(tmp_path / "run" / "last.pt", tok)
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copyfile(tmp_path / "run" / "last.pt", moved)
    shutil.rmtree(tmp_path / "run")
    loaded, tok2 = A.load_pretrained(moved)
    assert tok2.encode("the launch plan") == tok.encode("the launch plan")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    prompt = torch.tensor([tok2.encode("From: Ada")])
    out = loaded.generate(prompt, 5, temperature=0.0).tokens  # (1, T0 + 5)
    assert torch.equal(out, model.eval().generate(prompt, 5, temperature=0.0).tokens)
    assert not loaded.training


def test_load_pretrained_from_a_file_object_leaves_the_rng_alone(tmp_path, tok):
    buf = io.BytesIO()
    save_portable(buf, tok)
    buf.seek(0)
    torch.manual_seed(5)
    A.load_pretrained(buf)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # loading drew nothing from, and restored nothing into, the RNG


def test_load_pretrained_refuses_checkpoints_it_cannot_rebuild(tmp_path, tok):
    model = GPT(ModelConfig.preset("micro", vocab_size=300, context_length=16))
    bare = save_checkpoint(tmp_path / "bare.pt", model=model, step=1, config={})
    with pytest.raises(CheckpointError, match="bare.pt.*tokenizer"):
        A.load_pretrained(bare)
    save_portable(tmp_path / "mismatch.pt", tok, vocab_size=300)
    with pytest.raises(CheckpointError, match=f"vocab_size {tok.vocab_size}.*vocab_size 300"):
        A.load_pretrained(tmp_path / "mismatch.pt")


def test_ensure_pretrained_reuses_a_finished_checkpoint_without_training(tmp_path, tok, monkeypatch):
    model = GPT(ModelConfig.preset("micro", vocab_size=tok.vocab_size, context_length=16))
    last = save_checkpoint(tmp_path / "last.pt", model=model, step=3, config={"model": dataclasses.asdict(model.cfg)},
                           extra={"finished": True, "tokenizer_state": tok.state()})
    monkeypatch.setattr(A, "run_chapter", lambda *a: pytest.fail("must not train"))
    assert A.ensure_pretrained(run_dir=tmp_path) == last
    calls = []
    monkeypatch.setattr(A, "run_chapter", lambda chapter, args: calls.append((chapter, args)))
    save_checkpoint(last, model=model, step=1, config={}, extra={"finished": False})
    A.ensure_pretrained(smoke=True, run_dir=tmp_path, data_dir=tmp_path / "d")
    assert calls == [("ch2_pretrain", ["--smoke", "--out", str(tmp_path), "--resume", "--data-dir", str(tmp_path / "d")])]
    assert read_checkpoint(last)["step"] == 1


def test_run_chapter_failure_names_the_command():
    with pytest.raises(RuntimeError, match="ch2_pretrain --max-steps -1.*exit code 2"):
        A.run_chapter("ch2_pretrain", ["--max-steps", "-1"])


def test_ensure_sft_reuses_model_pt_else_runs_ch3_sft_resuming_a_cut_run(tmp_path, tok, monkeypatch):
    calls = []

    def fake_run(chapter, args):  # records the command and leaves the file a finished run would
        calls.append((chapter, args))
        out_dir = Path(args[args.index("--out") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.pt").write_bytes(b"exported")

    monkeypatch.setattr(A, "run_chapter", fake_run)
    out = tmp_path / "runs" / "ch3_sft-smoke"  # MINILIFE_RUNS is tmp_path / "runs" (tests/conftest.py)
    assert A.ensure_sft(smoke=True, args=["--method", "lora"]) == out / "model.pt"  # nothing there: a fresh run
    assert calls == [("ch3_sft", ["--smoke", "--out", str(out), "--overwrite", "--method", "lora"])]
    (out / "model.pt").unlink()
    (out / "last.pt").write_bytes(b"a run cut short")
    assert A.ensure_sft(smoke=True) == out / "model.pt"
    assert calls[1] == ("ch3_sft", ["--smoke", "--out", str(out), "--resume"])  # finish it, do not wipe it
    run_dir = tmp_path / "mine"
    A.ensure_sft(run_dir=run_dir, args=["--epochs", "1"])
    assert calls[2] == ("ch3_sft", ["--out", str(run_dir), "--overwrite", "--epochs", "1"])  # not --smoke
    monkeypatch.setattr(A, "run_chapter", lambda chapter, args: None)  # a run that exported nothing (adapters)
    with pytest.raises(RuntimeError, match="without .*model.pt.*adapters"):
        A.ensure_sft(run_dir=tmp_path / "adapters", args=["--method", "adapter"])

    monkeypatch.setattr(A, "run_chapter", lambda *a: pytest.fail("must not train"))
    model = save_portable(out / "model.pt", tok)
    path = A.ensure_sft(smoke=True, args=["--method", "lora"])
    assert path == out / "model.pt"
    loaded, _ = A.load_pretrained(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_ensure_reward_reuses_reward_pt_else_runs_ch4_reward(tmp_path, monkeypatch):
    calls = []

    def fake_run(chapter, args):  # records the command and leaves the file a finished run would
        calls.append((chapter, args))
        out_dir = Path(args[args.index("--out") + 1])
        (out_dir / "reward.pt").write_bytes(b"trained")

    monkeypatch.setattr(A, "run_chapter", fake_run)
    out = tmp_path / "runs" / "ch4_reward-smoke"  # MINILIFE_RUNS is tmp_path / "runs" (tests/conftest.py)
    assert A.ensure_reward(smoke=True, args=["--lr", "1e-4"]) == out / "reward.pt"
    assert calls == [("ch4_reward", ["--smoke", "--out", str(out), "--overwrite", "--lr", "1e-4"])]
    (out / "reward.pt").unlink()
    (out / "last.pt").write_bytes(b"a run cut short")
    assert A.ensure_reward(smoke=True) == out / "reward.pt"
    assert calls[1] == ("ch4_reward", ["--smoke", "--out", str(out), "--resume"])  # finish it, do not wipe it
    mine = tmp_path / "mine"
    assert A.ensure_reward(run_dir=mine) == mine / "reward.pt"
    assert calls[2] == ("ch4_reward", ["--out", str(mine), "--overwrite"])  # not --smoke
    monkeypatch.setattr(A, "run_chapter", lambda *a: pytest.fail("must not train"))
    assert A.ensure_reward(smoke=True) == out / "reward.pt"  # there: returned as is, nothing runs
    monkeypatch.setattr(A, "run_chapter", lambda chapter, args: None)  # a run that wrote nothing
    with pytest.raises(RuntimeError, match="without .*reward.pt"):
        A.ensure_reward(run_dir=tmp_path / "empty")
