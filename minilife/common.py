"""Shared plumbing every chapter uses: device, seeding, config -> argparse, run dirs, metrics, plots.

What it implements
- ``pick_device``: one ``--device`` flag; ``auto`` tries cuda, then mps, then cpu. Nothing here
  touches CUDA at import time (the check happens only when a device is asked for).
- ``seed_everything``: python, numpy and torch RNGs from one integer.
- Config: a stage's config is a dataclass extending ``RunConfig`` (--smoke, --out, --threads). ``cli_field(default, help, smoke=...)`` declares a field's default, help and smoke
  value in one place; ``config_from_args`` turns the fields into argparse flags (bools as
  ``--x/--no-x``, ``Literal`` as choices, help showing the real default and smoke value) and
  ``make_config`` builds the dataclass (smoke values for every field not given). ``check_flags``
  is the shared bound check; ``start_run`` sets threads, seeds, device and the output dir.
- ``chapter_dir``: ``runs/<chapter>/`` (created), overridable with ``--out``/``MINILIFE_RUNS``;
  ``UsageError``: what a chapter's command turns into exit code 2 (``minilife.runs.cli``).
- ``MetricsLogger``: one JSON object per line, flushed as it goes, so a crash keeps what was logged.
- ``write_json_atomic``: temp file + rename, so a summary is either the old one or the new one.

What it leaves out: experiment trackers (wandb etc.) and config files: flags and JSONL are enough here.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

class UsageError(ValueError):
    """The user asked for something impossible (a flag value, a device, an output path): exit code 2."""


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
        raise UsageError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError("--device mps: MPS is not available on this machine (try --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device torch knows ({e})") from None


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# dataclass config <-> argparse

_NO_SMOKE = object()


def cli_field(default: Any, help: str, *, smoke: Any = _NO_SMOKE, **kwargs: Any) -> Any:
    """A config field with its default, its help text and (optionally) its ``--smoke`` value in one place:
    ``max_steps: int = cli_field(500, "optimizer steps", smoke=30)``."""
    meta = {"help": help, "smoke": smoke, **kwargs}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """The flags every chapter shares; a chapter's config dataclass extends it (and adds ``device``
    when it runs a model)."""
    smoke: bool = cli_field(False, "CI-sized run (seconds): every field takes its smoke value unless given")
    out: Optional[str] = cli_field(None, "output dir (default runs/<chapter>/, or runs/<chapter>-smoke/ with --smoke)")
    threads: int = cli_field(0, "torch intra-op threads; 0 keeps torch's default (tiny models often run "
                                "faster on 1 thread on a shared machine)")
    debug: bool = cli_field(False, "on an error, show the full traceback instead of one line")

    def __post_init__(self):
        if not self.threads >= 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")


def make_config(cls: type, **given: Any) -> Any:
    """``cls(**given)`` with every field not in ``given`` at its smoke value when ``given["smoke"]``."""
    smoke_fill = {f.name: copy.copy(f.metadata["smoke"]) for f in dataclasses.fields(cls)
                  if given.get("smoke") and f.name not in given and f.metadata.get("smoke", _NO_SMOKE) is not _NO_SMOKE}
    return cls(**smoke_fill, **given)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of dataclass ``cls`` (underscores become dashes). Only flags the user
    gives land in the parsed namespace; ``make_config`` fills the rest. The help text shows the real
    default and the ``--smoke`` value."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        smoke = f.metadata.get("smoke", _NO_SMOKE)
        shown = (f" (default: {default!r}" + (f"; --smoke: {smoke!r}" if smoke is not _NO_SMOKE else "") + ")"
                 if default is not None else "")  # a None default is explained by the help text itself
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", "") + shown)
        if tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is typing.Literal:
            choices = list(typing.get_args(tp))
            kw.update(type=type(choices[0]), choices=choices)
        elif typing.get_origin(tp) in (list, tuple):
            kw.update(type=(typing.get_args(tp) or (str,))[0], nargs="*")
        elif tp in (int, float):
            kw.update(type=(lambda s, _t=tp: None if s.lower() == "none" else _t(s)) if optional else tp,
                      metavar=tp.__name__.upper())
        else:
            kw.update(type=str)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def config_from_args(cls: type, argv: Sequence[str] | None = None, description: str | None = None,
                     prog: str | None = None) -> Any:
    """Parse ``argv`` (default: sys.argv[1:]) into dataclass ``cls`` via ``make_config``.

    ``--help`` prints every field with its help text, default and smoke value. A ValueError/TypeError
    from the dataclass's ``__post_init__`` is reported as a usage error (exit status 2) naming the flag.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return make_config(cls, **vars(ns))
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def check_flags(cfg: Any, *, at_least: Mapping[str, float] | None = None, above: Mapping[str, float] | None = None,
                choices: Mapping[str, Iterable[str]] | None = None) -> None:
    """Raise ``ValueError("--flag-name must be ...")`` for the first field of ``cfg`` below its bound
    (``at_least``: >=, ``above``: >; NaN fails both) or outside its ``choices``. None passes (a
    value derived later)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for bounds, op, ok in ((at_least or {}, ">=", lambda v, lo: v >= lo), (above or {}, ">", lambda v, lo: v > lo)):
        for name, low in bounds.items():
            v = getattr(cfg, name)
            if v is not None and not ok(v, low):
                raise ValueError(f"{flag(name)} must be {op} {low:g}, got {v}")
    for name, allowed in (choices or {}).items():
        v = getattr(cfg, name)
        if v is not None and v not in allowed:
            raise ValueError(f"{flag(name)} {v!r}: choose one of {sorted(allowed)}")



def parse_weights(text: str, names: Sequence[str], flag: str, what: str) -> dict[str, float]:
    """'a=2,b=0.5' -> {'a': 2.0, 'b': 0.5}, each name one of ``names`` and each value a finite number >= 0;
    a ValueError starting with ``flag`` otherwise (``what`` names one entry in it: "task", "term")."""
    weights: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = (x.strip() for x in item.partition("="))
        if name not in names:
            raise ValueError(f"{flag}: unknown {what} {name!r}; {what}s are {', '.join(names)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not {what}=number") from None
        if not 0 <= weights[name] < float("inf"):
            raise ValueError(f"{flag}: {name} must be >= 0 and finite, got {value}")
    return weights

def start_run(chapter: str, cfg: Any) -> tuple[Path, torch.device]:
    """What every chapter does first: set ``--threads``, seed every RNG from ``cfg.seed``, pick the
    device and create the output dir. Returns (output dir, device)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(getattr(cfg, "device", "cpu"))
    seed_everything(cfg.seed)
    return chapter_dir(chapter, cfg.smoke, cfg.out), device


# --------------------------------------------------------------------------------------------
# run directories, metrics, summaries


def chapter_dir(chapter: str, smoke: bool = False, out: str | os.PathLike | None = None) -> Path:
    """Where a chapter writes, created: ``out`` if given, else ``$MINILIFE_RUNS/<chapter>/`` (default
    root ``runs``; ``<chapter>-smoke/`` for ``--smoke`` runs, so a CI-sized run never overwrites or is
    mistaken for the real artifacts). A path that cannot be a directory is a UsageError naming it."""
    path = Path(out) if out is not None else (Path(os.environ.get("MINILIFE_RUNS", "runs"))
                                              / (chapter + ("-smoke" if smoke else "")))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create the output directory ({e.strerror or e})") from None
    return path


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
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
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
        self._fh.close()  # a second close does nothing

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl_lines(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """(rows of the JSON lines that parse, 1-based numbers of the lines that do not)."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    bad.append(i)
    return rows, bad


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines via a temp file + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by MetricsLogger; a bad line raises ValueError naming file and line."""
    rows, bad = read_jsonl_lines(path)
    if bad:
        raise ValueError(f"{path}:{bad[0]}: not valid JSON (a line torn by a crash?)")
    return rows


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
