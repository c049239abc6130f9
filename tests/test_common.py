"""minilife.common: config flags, devices, run dirs, metrics, atomic JSON, plots."""
import json
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch

from minilife.common import (MetricsLogger, RunConfig, chapter_dir, check_flags, cli_field, config_from_args,
                             make_config, pick_device, read_jsonl, seed_everything, start_run, write_json_atomic)
from minilife.plots import plot_lines


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


@dataclass
class StageConfig(RunConfig):
    """a stage with smoke values"""
    seed: int = cli_field(0, "seed")
    steps: int = cli_field(500, "optimizer steps", smoke=30)
    sizes: list[int] = cli_field([256, 512], "sizes swept", smoke=[8])
    warmup: Optional[int] = cli_field(None, "warmup (None: steps / 5)")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(steps=1))


def test_smoke_values_fill_only_what_was_not_given():
    assert (make_config(StageConfig).steps, make_config(StageConfig).sizes) == (500, [256, 512])
    smoke = config_from_args(StageConfig, ["--smoke"])
    assert (smoke.steps, smoke.sizes, smoke.seed) == (30, [8], 0)  # no smoke value: the default
    assert config_from_args(StageConfig, ["--smoke", "--steps", "7"]).steps == 7  # a given flag wins
    assert config_from_args(StageConfig, ["--steps", "7", "--smoke"]).steps == 7  # in any order
    smoke.sizes.append(9)
    assert make_config(StageConfig, smoke=True).sizes == [8]  # smoke values are copied, not shared


def test_help_prints_the_real_default_and_the_smoke_value(capsys):
    with pytest.raises(SystemExit):
        config_from_args(StageConfig, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "optimizer steps (default: 500; --smoke: 30)" in out
    assert "--threads" in out and "default: None" not in out  # a None default is explained by its help


def test_threads_flag_sets_torch_threads_and_is_checked(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        out, device = start_run("ch9", config_from_args(StageConfig, ["--threads", "1", "--out", str(tmp_path)]))
        assert torch.get_num_threads() == 1 and out == tmp_path and device == torch.device("cpu")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as e:
        config_from_args(StageConfig, ["--threads", "-1"])
    assert e.value.code == 2 and "--threads must be >= 0" in capsys.readouterr().err


def test_check_flags_names_the_flag():
    cfg = make_config(StageConfig)
    cfg.steps = 0
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        check_flags(cfg, at_least=dict(steps=1))
    with pytest.raises(ValueError, match=r"--sizes .*choose one of"):
        check_flags(cfg, choices={"sizes": ("a",)})
    check_flags(cfg, at_least=dict(warmup=1))  # None passes: derived later


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


def test_parse_weights_reads_name_number_pairs_and_names_the_flag_in_errors():
    from minilife.common import parse_weights
    assert parse_weights(" a=2, b=0.5,", ("a", "b", "c"), "--w", "task") == {"a": 2.0, "b": 0.5}
    assert parse_weights("", ("a",), "--w", "task") == {}
    for bad, why in (("z=1", "--w: unknown task 'z'; tasks are a, b"), ("a=lots", "--w: 'a=lots' is not task=number"),
                     ("a=-1", "--w: a must be >= 0"), ("a=inf", "--w: a must be >= 0"), ("a=nan", "--w: a must be >= 0")):
        with pytest.raises(ValueError) as e:
            parse_weights(bad, ("a", "b"), "--w", "task")
        assert why in str(e.value)
