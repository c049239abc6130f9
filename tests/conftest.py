"""Shared test setup: hypothesis profiles and paths to optional real data.

HYPOTHESIS_PROFILE=ci (what `make test` sets) keeps property tests small and deadline-free on
shared 2-core machines; `dev` explores more.
"""
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton fixes interpreted-vs-compiled once per process, at `import triton`: decide it here, before any
# test module imports a kernel. Without CUDA the kernels run under the CPU interpreter; with CUDA the
# same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MINILIFE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data when present; tests that need it skip cleanly otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Chapters write under $MINILIFE_RUNS: point it at tmp_path so tests never touch the work tree."""
    monkeypatch.setenv("MINILIFE_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory) -> str:
    """The smoke world's ``tokenizer.json`` + ``shards/`` (ch2_data --smoke), built once per session."""
    from minilife.artifacts import ensure_data

    return str(ensure_data(smoke=True, data_dir=tmp_path_factory.getbasetemp() / "ch2_data_smoke_shared"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread: CI-sized models are too small to gain from a
    second one, and on a shared machine the hand-offs between threads cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_pretrained(smoke_data_dir, tmp_path_factory) -> str:
    """A finished smoke pretraining checkpoint (``ensure_pretrained(smoke=True)`` on the smoke data),
    built once per session in its own tmp dir (explicit paths: MINILIFE_RUNS is per test)."""
    from minilife.artifacts import ensure_pretrained

    run_dir = tmp_path_factory.getbasetemp() / "ch2_pretrain_smoke_shared"
    return str(ensure_pretrained(smoke=True, run_dir=run_dir, data_dir=smoke_data_dir))
