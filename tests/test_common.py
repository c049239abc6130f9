"""minilife.common: config flags, devices, run dirs, metrics, atomic JSON, plots."""
import json
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch

from minilife.common import (MetricsLogger, chapter_dir, cli_field, config_from_args, pick_device,
                             plot_lines, read_jsonl, seed_everything, write_json_atomic)


@dataclass
class DemoConfig:
    """a demo stage"""
    lr: float = cli_field(3e-4, "peak learning rate")
    steps: int = cli_field(10, "optimizer steps")
    smoke: bool = cli_field(False, "CI-sized run")
    impl: Literal["math", "sdpa"] = cli_field("sdpa", "attention path")
    out: Optional[str] = cli_field(None, "output dir")

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")


def test_config_defaults_and_overrides():
    assert config_from_args(DemoConfig, []) == DemoConfig()
    cfg = config_from_args(DemoConfig, ["--lr", "1e-3", "--smoke", "--impl", "math", "--out", "x"])
    assert (cfg.lr, cfg.smoke, cfg.impl, cfg.out) == (1e-3, True, "math", "x")
    assert config_from_args(DemoConfig, ["--smoke", "--no-smoke"]).smoke is False


def test_config_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(DemoConfig, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--lr", "peak learning rate", "--no-smoke", "{math,sdpa}", "default: 0.0003"):
        assert text in out


def test_config_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(DemoConfig, ["--impl", "cuda-magic"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        config_from_args(DemoConfig, ["--steps", "0"])
    assert "--steps must be positive" in capsys.readouterr().err


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_seed_everything_repeats_draws():
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_chapter_dir_separates_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILIFE_RUNS", str(tmp_path))
    assert chapter_dir("ch9") == tmp_path / "ch9"
    assert chapter_dir("ch9", smoke=True) == tmp_path / "ch9-smoke"
    assert chapter_dir("ch9", out=tmp_path / "elsewhere").is_dir()


def test_metrics_logger_and_reader(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        log.log(step=1, loss=2.5)
        log.log(step=2, loss=torch.tensor(2.0))
    with MetricsLogger(path, resume=True) as log:
        log.log(step=3, loss=1.5)
    assert [r["loss"] for r in read_jsonl(path)] == [2.5, 2.0, 1.5]
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_jsonl(path)


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_plot_lines_writes_png(tmp_path):
    path = plot_lines(tmp_path / "p.png", {"loss": ([0, 1, 2], [3.0, 2.0, 1.5])},
                      points={"measured": ([1], [2.1])}, hlines={"baseline": 2.5}, logy=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
