"""Shared plumbing every chapter uses: device, seeding, config -> argparse, run dirs, metrics, plots.

What it implements
- ``pick_device``: one ``--device`` flag; ``auto`` tries cuda, then mps, then cpu. Nothing here
  touches CUDA at import time (the check happens only when a device is asked for).
- ``seed_everything``: python, numpy and torch RNGs from one integer.
- ``config_from_args``: a stage's config is a dataclass; this turns its fields into argparse flags
  (help text from ``field(metadata={"help": ...})``, bools as ``--x/--no-x``, ``Literal`` as choices)
  and builds the dataclass back from the parsed flags. ``cli_field`` is the short way to declare one.
- ``run_dir``: ``runs/<chapter>/`` (created), overridable with ``--out``/``MINILIFE_RUNS``.
- ``MetricsLogger``: one JSON object per line, flushed as it goes, so a crash keeps what was logged.
- ``write_json_atomic``: temp file + rename, so a summary is either the old one or the new one.
- ``plot_lines``: the one plotting helper chapters share (matplotlib, Agg backend, PNG out).

What it leaves out: experiment trackers (wandb etc.) and config files: flags and JSONL are enough here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# device and seeding


def pick_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name`` ('auto', 'cpu', 'cuda', 'cuda:1', 'mps').

    'auto' prefers cuda, then mps, then cpu. Asking for a device that is not present raises a
    ValueError naming it, rather than failing later inside a kernel.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("--device mps: MPS is not available on this machine (try --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device torch knows ({e})") from None


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# dataclass config <-> argparse


def cli_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its command-line help text: ``lr: float = cli_field(3e-4, "peak LR")``."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` to ``parser`` (underscores become dashes)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"(default: {default!r})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            choices = list(typing.get_args(tp))
            parser.add_argument(flag, dest=f.name, type=type(choices[0]), choices=choices,
                                default=default, help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            parser.add_argument(flag, dest=f.name, type=inner, nargs="*", default=default, help=help_text)
        elif tp in (int, float, str):
            conv = tp
            if optional:
                conv = (lambda s, _t=tp: None if s.lower() == "none" else _t(s))
            parser.add_argument(flag, dest=f.name, type=conv, default=default, help=help_text,
                                metavar=tp.__name__.upper())
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=default, help=help_text)


def config_from_args(cls: type, argv: Sequence[str] | None = None, description: str | None = None,
                     prog: str | None = None) -> Any:
    """Parse ``argv`` (default: sys.argv[1:]) into an instance of dataclass ``cls``.

    ``--help`` prints every field with its help text and default. If the dataclass defines
    ``__post_init__`` that validates fields, its ValueError is reported as a usage error naming the flag.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return cls(**vars(ns))
    except (ValueError, TypeError) as e:
        parser.error(str(e))


# --------------------------------------------------------------------------------------------
# run directories, metrics, summaries


def run_dir(chapter: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<chapter>/``, created. ``root`` defaults to $MINILIFE_RUNS or ``runs``."""
    base = Path(root if root is not None else os.environ.get("MINILIFE_RUNS", "runs"))
    path = base / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


def chapter_dir(chapter: str, smoke: bool = False, out: str | os.PathLike | None = None) -> Path:
    """Where a chapter writes: ``out`` if given, else ``runs/<chapter>/`` (``runs/<chapter>-smoke/``
    for ``--smoke`` runs, so a CI-sized run never overwrites or is mistaken for the real artifacts)."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return run_dir(chapter + ("-smoke" if smoke else ""))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON via a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class MetricsLogger:
    """Append-only JSONL metrics: ``log(step=10, loss=2.3)`` writes one line and flushes it.

    Use as a context manager or call ``close()``. ``resume=True`` appends to an existing file
    (a resumed run continues its log), otherwise the file starts empty.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if resume else "w", encoding="utf-8")

    def log(self, **metrics: Any) -> None:
        self._fh.write(json.dumps(metrics, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by MetricsLogger; a bad line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


# --------------------------------------------------------------------------------------------
# plots


def plot_lines(path: str | os.PathLike, series: Mapping[str, tuple[Iterable[float], Iterable[float]]],
               *, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
               points: Mapping[str, tuple[Iterable[float], Iterable[float]]] | None = None,
               hlines: Mapping[str, float] | None = None) -> Path:
    """Save a line plot as PNG: ``series`` maps a label to (xs, ys); ``points`` are drawn as markers
    (measured values beside a predicted curve); ``hlines`` are labelled horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, linewidth=1.6)
    for label, (xs, ys) in (points or {}).items():
        ax.plot(list(xs), list(ys), "o", label=label, markersize=4)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1.0, color="grey")
        ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=8,
                    va="bottom", color="grey")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series or points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], digits: int = 4) -> str:
    """Rows (dicts) as a markdown table over ``cols``; floats with ``digits`` significant digits."""
    cell = lambda v: f"{v:.{digits}g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


def fmt_count(n: float) -> str:
    """Human-readable count: 1234 -> '1.23k', 7e9 -> '7.00G'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"
