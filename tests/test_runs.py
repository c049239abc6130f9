"""minilife.runs: one run per directory, resume config checks, metrics repair, the interrupt guard,
and the one-line error handler every chapter's command goes through (exit codes 2 / 1 / 130)."""
import shutil
import signal

import pytest
import torch

from minilife import runs
from minilife.chapters import ch1_budget, ch2_pretrain
from minilife.checkpoint import CheckpointError
from minilife.common import UsageError, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(main, argv, capsys, chapter="chX"):
    """(exit code, stderr) of ``runs.cli(main, chapter, argv)``."""
    with pytest.raises(SystemExit) as e:
        runs.cli(main, chapter, argv)
    return e.value.code, capsys.readouterr().err


def test_prepare_run_dir(tmp_path):
    runs.prepare_run_dir(tmp_path, resume=False, overwrite=False)  # empty: fine
    with pytest.raises(UsageError, match="holds no run"):
        runs.prepare_run_dir(tmp_path, resume=True, overwrite=False)
    for name in ("ckpt_step000004.pt", "last.pt", "metrics.jsonl", "loss.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(UsageError, match=f"{tmp_path} already holds a run"):
        runs.prepare_run_dir(tmp_path, resume=False, overwrite=False)
    with pytest.raises(UsageError, match="contradict"):
        runs.prepare_run_dir(tmp_path, resume=True, overwrite=True)
    runs.prepare_run_dir(tmp_path, resume=True, overwrite=False)  # a run to continue: fine
    runs.prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # only the run's own files are cleared


def test_check_resume_config_names_fields_and_honours_allowed_changes():
    saved = {"seed": 1, "lr": 0.1, "max_steps": 10, "out": "a", "threads": 0}
    given = {"seed": 2, "lr": 0.1, "max_steps": 20, "out": "b", "threads": 1}
    with pytest.raises(UsageError, match=r"--max-steps: checkpoint 10, now 20; --seed: checkpoint 1, now 2"):
        runs.check_resume_config(saved, given, source="c.pt", ignore=("out", "threads"))
    with pytest.raises(UsageError, match="--allow-change seed"):
        runs.check_resume_config(saved, given, source="c.pt", ignore=("out", "threads"), allowed=("max_steps",))
    notes = runs.check_resume_config(saved, given, source="c.pt", ignore=("out", "threads"),
                                     allowed=("max_steps", "seed"))
    assert len(notes) == 2 and "allowed" in notes[0]


def test_resume_metrics_repairs_a_torn_line_and_restarts_a_missing_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    rows, note = runs.resume_metrics(log, 2)
    assert [r["step"] for r in rows] == [1, 2] == [r["step"] for r in read_jsonl(log)]
    assert "line 4" in note
    rows, note = runs.resume_metrics(log, 2)
    assert note is None and len(rows) == 2  # an intact log needs no note
    log.unlink()
    rows, note = runs.resume_metrics(log, 5)
    assert rows == [] and "missing" in note and log.read_text() == ""


def test_interrupt_guard_defers_the_first_ctrl_c_and_not_the_second():
    before = signal.getsignal(signal.SIGINT)
    with runs.InterruptGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.requested  # no KeyboardInterrupt: the loop decides when to stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_cli_maps_errors_to_one_line_and_exit_codes(capsys):
    def raiser(exc):
        def main(argv):
            raise exc
        return main

    code, err = run_cli(raiser(UsageError("--out x: cannot")), [], capsys)
    assert code == 2 and err.strip() == "[chX] error: --out x: cannot  (--debug shows the traceback)"
    code, err = run_cli(raiser(CheckpointError("c.pt: corrupt\nmore detail")), [], capsys)
    assert code == 1 and err.count("\n") == 1 and "c.pt: corrupt" in err
    code, err = run_cli(raiser(runs.RunInterrupted("interrupted after step 3; continue with --resume")), [], capsys)
    assert code == 130 and "--resume" in err
    code, err = run_cli(raiser(CheckpointError("c.pt: corrupt")), ["--debug"], capsys)
    assert code == 1 and "Traceback" in err


def test_out_under_a_regular_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(ch1_budget.main, ["--smoke", "--out", str(tmp_path / "file" / "sub")], capsys, "ch1_budget")
    assert code == 2 and f"--out {tmp_path / 'file' / 'sub'}" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_a_usage_error(tmp_path, capsys):
    code, err = run_cli(ch1_budget.main, ["--smoke", "--out", str(tmp_path), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: CUDA is not available" in err


def test_unknown_preset_is_a_usage_error(capsys):
    code, err = run_cli(ch1_budget.main, ["--preset", "nope"], capsys)
    assert code == 2 and "--preset 'nope'" in err


@pytest.mark.parametrize("damage, culprit", [("tokenizer", "tokenizer.json"), ("shard", "train")])
def test_corrupt_data_ends_in_one_line_naming_the_file(smoke_data_dir, tmp_path, capsys, damage, culprit):
    data = tmp_path / "data"
    shutil.copytree(smoke_data_dir, data)
    if damage == "tokenizer":
        (data / "tokenizer.json").write_text('{"format": "minilife-bpe", "ranks": {')
    else:
        shard = next((data / "shards").glob("train*"))
        shard.write_bytes(shard.read_bytes()[:1000])
    code, err = run_cli(ch2_pretrain.main, ["--smoke", "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.count("\n") == 1 and culprit in err and str(data) in err


def test_disk_full_during_save_names_the_file_and_keeps_the_last_one(tmp_path, monkeypatch):
    from minilife.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={})
    good = path.read_bytes()

    def full_disk(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"c.pt: could not be written .*disk full"):
        save_checkpoint(path, model=model, step=2, config={})
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
