"""Checkpoints that survive crashes and resume a run exactly.

What it implements
- ``save_checkpoint``: one file holding the model and optimizer ``state_dict``s, the step (the LR
  schedule is a pure function of the step, so nothing else about it is stored), the run's config as a
  JSON-able dict, the RNG states (python ``random``, numpy's global generator, torch CPU and, when
  present, every CUDA device), the data position (``data_state``) and free-form ``extra``.
  The write is atomic: the bytes go to a temp file in the same directory, are flushed and fsync'ed,
  and only then ``os.replace`` puts them under the final name. A crash (or an exception) mid-save
  leaves the previous file untouched (a binary file object is written as given). It also refuses to save non-finite weights, so a NaN'd run
  never overwrites its last good checkpoint.
- ``load_checkpoint`` (a path or a binary file object): restores weights and optimizer, and the
  RNGs only when asked (resuming); ``torch.load(..., weights_only=True)`` always (a checkpoint is data, never
  code: the unpickler only builds tensors and plain containers). Every RNG state is therefore stored
  as tensors / lists / tuples (numpy's state array as an int64 tensor). Clear ``CheckpointError``s
  name the file for: a missing file, a truncated or corrupt file, a file that is not a minilife
  checkpoint, and a config that differs from the one given (naming each differing field and both
  values) -- e.g. resuming a 4-layer run into a 6-layer model.
- (The numbered checkpoints of a run directory, ``last.pt`` and pruning live in ``minilife.runs``.)
- ``check_finite``: the NaN guard a training loop calls each step; it raises ``NonFiniteLossError``
  naming the step and the last good checkpoint to resume from.

What it leaves out: sharded / distributed checkpoints (one process writes one file), async saving,
and safetensors (a torch zip file read with ``weights_only=True`` gives the same safety here).
"""
from __future__ import annotations

import json
import math
import os
import random
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np
import torch

FORMAT = "minilife-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message names the file (and field, if any)."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or a weight) went NaN/inf; the message names the step and the last good checkpoint."""


# --------------------------------------------------------------------------------------------
# RNG states in a weights_only-loadable form


def rng_state() -> dict:
    """Capture every global RNG as tensors / tuples / lists (all accepted by weights_only loading)."""
    version, internal, gauss_next = random.getstate()  # internal: tuple of 625 python ints
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # keys: (624,) uint32 ndarray
    state = {
        "python": (version, tuple(internal), gauss_next),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # only queried at save time, never at import
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNGs captured by ``rng_state`` (CUDA only if both sides have it)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())  # .cpu(): a map_location may have moved them
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# validation helpers


def _json_normalise(config: Mapping[str, Any], path: Path) -> dict:
    """The config as JSON would give it back (tuples -> lists); error naming the path if not JSON-able."""
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config must be a JSON-able dict of plain values ({e})") from None


_PLAIN = (int, float, bool, str, bytes, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_loadable(obj: Any, where: str, path: Path) -> None:
    """Reject values that ``torch.load(weights_only=True)`` would refuse, naming where they sit."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{path}: {where} has a key of type {type(k).__name__}; use str or int")
            _check_loadable(v, f"{where}[{k!r}]", path)
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]", path)
        return
    hint = " (convert numpy arrays with torch.from_numpy or .tolist())" if isinstance(obj, np.ndarray) else ""
    raise CheckpointError(f"{path}: {where} is a {type(obj).__module__}.{type(obj).__name__}, which "
                          f"weights_only loading rejects{hint}")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_layer': 4}} -> {'model.n_layer': 4}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = "<absent>"


def config_diff(saved: Mapping[str, Any], given: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[tuple]:
    """[(field, saved_value, given_value)] for every (dotted) field that differs, sorted by field."""
    a, b = _flatten(saved), _flatten(given)
    skip = set(ignore)
    keys = sorted((set(a) | set(b)) - skip)
    return [(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING)]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (so state_dict keys carry no '_orig_mod.' prefix)."""
    return getattr(model, "_orig_mod", model)


def _nonfinite_params(model: torch.nn.Module) -> list[str]:
    return [n for n, p in _unwrap(model).named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())]


# --------------------------------------------------------------------------------------------
# save / load


def _where(target: Any) -> Path | str:
    """What error messages call a checkpoint: its path, or a binary file object's name."""
    return Path(target) if isinstance(target, (str, os.PathLike)) else getattr(target, "name", "<file object>")


def save_checkpoint(path: str | os.PathLike | BinaryIO, *, model: torch.nn.Module, optimizer: Any = None, step: int,
                    config: Mapping[str, Any], data_state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, allow_nonfinite: bool = False) -> Path:
    """Write a checkpoint to ``path`` (atomically) or to a binary file object, and return ``path``.

    ``config`` is the run's config as a JSON-able dict (e.g. ``dataclasses.asdict(cfg)``); it is
    compared field by field on load. ``data_state`` / ``extra`` may hold ints, floats, strings,
    tensors and lists/tuples/dicts of them. Non-finite weights raise ``CheckpointError`` unless
    ``allow_nonfinite`` (the last good file is never replaced by NaN weights).
    """
    target, path = path, _where(path)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: step must be a non-negative int, got {step!r}")
    if not allow_nonfinite:
        bad = _nonfinite_params(model)
        if bad:
            raise CheckpointError(f"{path}: refusing to save step {step}: non-finite values in "
                                  f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "config": _json_normalise(config, path),
               "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
               "rng": rng_state(), "data_state": dict(data_state or {}), "extra": dict(extra or {})}
    for key in ("data_state", "extra", "optimizer"):
        _check_loadable(payload[key], key, path)
    if isinstance(path, Path):
        _atomic_torch_save(payload, path)
        return path
    torch.save(payload, target)  # a file object: the caller owns atomicity
    return target


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a same-directory temp file, fsync, then os.replace (atomic on POSIX and Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as "enforce fail at inline_container.cc"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:120]
        raise CheckpointError(f"{path}: could not be written ({reason}); is the disk full? "
                              f"The previous checkpoint there is untouched") from None
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something above raised
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened or synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def verify_checkpoint(path: str | os.PathLike | BinaryIO) -> None:
    """Raise CheckpointError unless ``path`` is a whole torch zip archive whose every member matches
    the CRC-32 checksum the archive stores for it (flipped, lost or cut-off bytes all fail)."""
    source, path = path, _where(path)
    if isinstance(path, Path) and not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    start = None if isinstance(path, Path) else source.tell()
    try:
        with zipfile.ZipFile(source) as archive:  # a cut-off file has lost the zip directory at its end
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a whole torch zip archive (truncated or corrupt?): {e}") from None
    finally:
        if start is not None:
            source.seek(start)  # leave a file object where it was
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt: member {bad!r} fails its CRC-32 checksum (bytes were "
                              f"flipped or lost after it was written)")


def read_checkpoint(path: str | os.PathLike | BinaryIO, map_location: Any = "cpu") -> dict:
    """Load and validate the raw checkpoint dict from a path or binary file object (weights_only=True);
    restores nothing."""
    source, path = path, _where(path)
    verify_checkpoint(source)
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged member, or a pickled object weights_only refuses
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in first_line.lower():
            detail = next((ln.strip().split(". ")[0] for ln in str(e).splitlines()
                           if ln.strip().startswith("WeightsUnpickler error")), "")
            raise CheckpointError(f"{path}: weights_only loading refused its pickle: it holds Python objects "
                                  f"beyond tensors and plain containers, or corrupt bytes. {detail}".rstrip()) from None
        raise CheckpointError(f"{path}: cannot be read as a checkpoint (corrupt?): {first_line}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minilife checkpoint (no '{FORMAT}' marker; "
                              f"was it written by save_checkpoint?)")
    if ckpt.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')!r}, "
                              f"this code reads version {FORMAT_VERSION}")
    return ckpt


def load_checkpoint(path: str | os.PathLike | BinaryIO, *, model: torch.nn.Module | None = None,
                    optimizer: Any = None, config: Mapping[str, Any] | None = None, restore_rng: bool = False,
                    map_location: Any = "cpu", ignore: Iterable[str] = ()) -> dict:
    """Restore a checkpoint (a path or binary file object) into ``model`` / ``optimizer`` and return
    ``{"step", "data_state", "extra", "config", "path"}``. The global RNGs are restored only with
    ``restore_rng=True`` (resuming a run); plain loading leaves them alone.

    If ``config`` is given it must equal the saved one (dotted field names in ``ignore`` are not
    compared, e.g. ``("out", "smoke")``); otherwise ``CheckpointError`` lists every differing field
    with both values. Nothing is restored unless every check passes.
    """
    ckpt, path = read_checkpoint(path, map_location), _where(path)
    if config is not None:
        diff = config_diff(ckpt["config"], _json_normalise(config, path), ignore)
        if diff:
            fields = "; ".join(f"{k}: checkpoint has {a!r}, run has {b!r}" for k, a, b in diff)
            raise CheckpointError(f"{path}: config mismatch in {len(diff)} field(s): {fields}")
    if optimizer is not None and ckpt["optimizer"] is None:
        raise CheckpointError(f"{path}: an optimizer was given but the checkpoint holds no optimizer state")
    if model is not None:
        try:
            _unwrap(model).load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: model weights do not fit this model: {str(e).strip()[:600]}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this optimizer: {e}") from None
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return {"step": ckpt["step"], "data_state": ckpt["data_state"], "extra": ckpt["extra"],
            "config": ckpt["config"], "path": path}


# --------------------------------------------------------------------------------------------
# the NaN guard


def check_finite(loss: torch.Tensor | float, step: int, last_good_path: str | os.PathLike | None = None,
                 model: torch.nn.Module | None = None, what: str = "loss") -> float:
    """Return ``loss`` as a float, or raise ``NonFiniteLossError`` if it (or any weight of ``model``,
    when given) is NaN/inf. The message names the step, ``what`` was checked (e.g. "gradient norm")
    and the checkpoint to resume from, so the loop stops *before* it would save over that checkpoint."""
    value = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
    bad_params = _nonfinite_params(model) if model is not None else []
    if math.isfinite(value) and not bad_params:
        return value
    problem = f"{what} is {value}" if not math.isfinite(value) else f"non-finite weights in {', '.join(bad_params[:5])}"
    where = (f"the last good checkpoint is {last_good_path} (left untouched); resume from it, e.g. with a lower "
             f"learning rate or a skipped batch" if last_good_path is not None
             else "no checkpoint has been saved yet")
    raise NonFiniteLossError(f"step {step}: {problem}; stopping before saving. {where}.")
