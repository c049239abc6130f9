"""Runs that survive their users: one run per directory, resume that refuses to mix runs, Ctrl-C
that saves, a metrics log that repairs itself, and errors that fit on one line.

What it implements
- ``prepare_run_dir``: a run directory holds one run. A fresh run refuses a directory holding an
  earlier run's files (checkpoints, metrics, summary) unless ``--overwrite``, which deletes exactly
  those files; ``--resume`` needs them. So every file in a run directory belongs to one run.
- ``check_resume_config``: the checkpoint stores the run's config; resuming with a different seed,
  LR, batch size, max steps, ... is refused naming every differing field, unless the user lists
  the fields with ``--allow-change`` (e.g. ``--allow-change max_steps`` to train longer).
- ``resume_metrics``: the log rows up to the resumed step; a torn last line (a crash mid-write) or
  a missing log does not block resuming from a good checkpoint: the log is repaired or restarted,
  and the returned note says which.
- ``InterruptGuard``: the first Ctrl-C (SIGINT) only sets a flag that the loop reads between
  steps, so a step is never cut in half; the loop then saves a checkpoint and the summary and
  raises ``RunInterrupted``. A second Ctrl-C stops at once.
- ``save_rotating`` / ``latest_intact_checkpoint``: ``ckpt_step000100.pt`` files, a ``last.pt`` hard
  link to the newest (so pruning older files never breaks it), keep-last-k pruning, and the newest
  checkpoint whose checksums verify (a damaged newer one is skipped, and reported).
- ``cli``: the one entry point of every chapter. Usage errors (a bad flag, a missing device, an
  output path under a file) end with one line and exit code 2; the project's other errors (a corrupt
  checkpoint or tokenizer, a truncated shard, a full disk, a NaN loss) with one line naming the file
  and exit code 1; an interrupt with the resume command and 130. ``--debug`` shows the traceback.

What it leaves out: run registries and experiment trackers, multi-process (distributed) runs,
signals other than SIGINT.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from minilife.checkpoint import CheckpointError, config_diff, load_checkpoint, save_checkpoint, verify_checkpoint
from minilife.common import RunConfig, UsageError, cli_field, read_jsonl_lines, write_jsonl_atomic

STEP_NAME = re.compile(r"^ckpt_step(\d+)\.pt$")
RUN_FILES = ("ckpt_step*.pt", "last.pt", "model.pt", "reward.pt", "metrics.jsonl", "summary.json", "*.png", "*.html", ".*.tmp-*")


@dataclass
class ResumableConfig(RunConfig):
    """The flags of a chapter whose run can be continued (pretraining, SFT, DPO, ...)."""
    resume: bool = cli_field(False, "continue the run in --out from its newest intact checkpoint")
    overwrite: bool = cli_field(False, "clear an earlier run's files from --out and start afresh")
    allow_change: list[str] = cli_field([], "with --resume: fields that may differ from the checkpoint's run "
                                            "(e.g. max_steps to train longer)")

    def __post_init__(self):
        super().__post_init__()
        self.allow_change = [name.replace("-", "_") for name in self.allow_change]
        unknown = sorted(set(self.allow_change) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"--allow-change {' '.join(unknown)}: no such setting")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after saving; the message says how to resume."""


def run_files(out: Path) -> list[Path]:
    """The files in ``out`` that belong to a run (``RUN_FILES``)."""
    return sorted({p for pattern in RUN_FILES for p in out.glob(pattern) if p.is_file()})


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready for a fresh run (empty of run files, or cleared with ``overwrite``) or
    check it holds one to resume. Raises UsageError naming the directory and the way out."""
    found = run_files(out)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run or clear it")
    if resume and not found:
        raise UsageError(f"--resume: {out} holds no run to continue; run without --resume to start one")
    if not resume and found:
        if not overwrite:
            raise UsageError(f"{out} already holds a run ({len(found)} files, e.g. {found[0].name}); "
                             f"continue it with --resume, clear it with --overwrite, or pick another --out")
        for p in found:
            p.unlink()


def check_resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], *, source: Any,
                        ignore: Iterable[str], allowed: Iterable[str] = ()) -> list[str]:
    """Compare the checkpoint's run config with this run's. Fields in ``ignore`` (where output goes,
    threads, ...) never count; fields in ``allowed`` may differ and are returned as notes; any other
    difference raises UsageError naming each field with both values."""
    diff = config_diff(saved, given, ignore)
    refused = [d for d in diff if d[0] not in set(allowed)]
    if refused:
        fields = "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, a, b in refused)
        raise UsageError(f"--resume from {source}: this run's settings differ from the checkpoint's: {fields}. "
                         f"Resume with the same flags, or allow a change on purpose with --allow-change "
                         f"{' '.join(k for k, _, _ in refused)}")
    return [f"--{k.replace('_', '-')} changed from {a!r} to {b!r} (allowed)" for k, a, b in diff]


def resume_metrics(path: Path, upto_step: int) -> tuple[list[dict], str | None]:
    """Rows of the metrics log with step <= ``upto_step``, and a note when the log had to be repaired
    (torn or unreadable lines dropped) or restarted (missing). The file is rewritten to those rows."""
    if not path.is_file():
        write_jsonl_atomic(path, [])
        return [], f"{path.name} was missing: the log restarts at step {upto_step}"
    rows, bad = read_jsonl_lines(path)
    kept = [r for r in rows if r.get("step", 0) <= upto_step]
    write_jsonl_atomic(path, kept)
    return kept, (f"{path.name}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad))}), "
                  f"e.g. torn by a crash mid-write" if bad else None)


class InterruptGuard:
    """``with InterruptGuard() as stop: ... if stop.requested: break``: the first SIGINT sets the
    flag (and says so), a second raises KeyboardInterrupt at once. The old handler comes back on exit."""

    def __enter__(self) -> "InterruptGuard":
        self.requested, self._old = False, signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[minilife] interrupt: finishing this step, then saving (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def resume_run(out: Path, cfg: Any, *, model: Any, optimizer: Any, config: Mapping[str, Any], ignore: Iterable[str],
               device: Any = "cpu") -> tuple[dict, Path, list[str]]:
    """What ``--resume`` does in every training chapter: load the newest intact checkpoint of ``out`` into
    ``model`` and ``optimizer`` (RNGs restored; ``config`` must match), refuse changed settings
    (``check_resume_config`` on ``extra["train"]``) and cut the metrics log back to its step.
    Returns (checkpoint state, its path, notes to print)."""
    last_good, notes = latest_intact_checkpoint(out)  # a damaged newest file falls back to an older one
    if last_good is None:
        raise CheckpointError(f"--resume: no intact checkpoint in {out}: {'; '.join(notes) or 'none saved'}")
    state = load_checkpoint(last_good, model=model, optimizer=optimizer, config=config, restore_rng=True,
                            map_location=device)
    notes += check_resume_config(state["extra"]["train"], dataclasses.asdict(cfg), source=last_good, ignore=ignore,
                                 allowed=cfg.allow_change)
    notes.append(resume_metrics(out / "metrics.jsonl", state["step"])[1])  # rows after the checkpoint are dropped
    return state, last_good, notes


def interrupted(chapter: str, done: int, total: int, saved: Any, argv: list[str] | None) -> RunInterrupted:
    """The error a chapter raises after Ctrl-C has saved: where it stopped and the command that continues."""
    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--overwrite", "--resume")]
    return RunInterrupted(f"interrupted after step {done} of {total}; saved {saved} and the summary. "
                          f"Continue with: python -m minilife.chapters.{chapter} {shlex.join(flags)} --resume")


def cli(main: Callable[[list[str]], Any], chapter: str, argv: list[str] | None = None) -> None:
    """Run a chapter's ``main`` as a command: one line per error, exit codes 2 (usage), 1 (other
    errors), 130 (interrupted); ``--debug`` anywhere in the arguments shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        main([a for a in argv if a != "--debug"])
    except KeyboardInterrupt as e:
        print(f"[{chapter}] {e or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # the project's errors, one line each
        if debug:
            traceback.print_exc()
        else:
            print(f"[{chapter}] error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                  f"  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UsageError) else 1) from None


# --------------------------------------------------------------------------------------------
# the numbered checkpoints of a run directory: naming, newest intact, pruning, last.pt


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``<directory>/ckpt_step000100.pt`` for step 100 (zero-padded so names sort by step)."""
    return Path(directory) / f"ckpt_step{step:06d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of the numbered checkpoints in ``directory``, oldest first ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_NAME.match(p.name))]
    return sorted(found)


def latest_intact_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(the newest numbered checkpoint that passes ``verify_checkpoint``, or None; one message per
    newer checkpoint skipped as damaged). ``last.pt`` links the newest file, so it shares its fate."""
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest numbered checkpoints; ``last.pt`` is never touched."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [p for _, p in list_checkpoints(directory)[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_rotating(directory: str | os.PathLike, *, step: int, keep_last: int | None = 3, **kwargs: Any) -> Path:
    """Save ``ckpt_step<step>.pt`` in ``directory`` (atomically), point ``last.pt`` at it, prune.

    ``kwargs`` are ``save_checkpoint``'s (model, optimizer, config, data_state, extra). ``last.pt``
    is a hard link swapped in with ``os.replace`` (a copy where links are unsupported), so it is
    always a complete file.
    """
    path = save_checkpoint(checkpoint_path(directory, step), step=step, **kwargs)
    last = path.with_name("last.pt")
    tmp = last.with_name(f".last.pt.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
    finally:
        tmp.unlink(missing_ok=True)
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return path
