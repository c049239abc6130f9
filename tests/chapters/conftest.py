"""Fixtures the chapter tests share (used by name; nothing here is autouse)."""
import pytest
import torch


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory) -> str:
    """The smoke world's ``tokenizer.json`` + ``shards/`` (ch2_data --smoke), built once per session."""
    from minilife.chapters.ch2_data import ensure_data

    return str(ensure_data(smoke=True, data_dir=str(tmp_path_factory.getbasetemp() / "ch2_data_smoke_shared")))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread: CI-sized models are too small to gain from a
    second one, and on a shared machine the hand-offs between threads cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def usage_error(capsys):
    """``usage_error(main, argv)`` runs a chapter's ``main(argv)``, checks it stops with argparse's
    usage-error status 2 (before any data or model is built) and returns what it wrote to stderr."""
    def run(main, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err
    return run
