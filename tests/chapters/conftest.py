"""Fixtures the chapter tests share (used by name; nothing here is autouse)."""
import pytest


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


@pytest.fixture(scope="session")
def sft_model(smoke_data_dir, smoke_pretrained, tmp_path_factory) -> str:
    """A smoke chat model (ch3_sft's exported model.pt) built once per session; chapter 4's tests only read it."""
    from minilife.chapters import ch3_sft

    out = tmp_path_factory.mktemp("ch3_sft_smoke_shared")
    s = ch3_sft.main(["--smoke", "--n-train", "40", "--n-val", "15", "--n-test", "8", "--data-dir", smoke_data_dir,
                      "--pretrained", smoke_pretrained, "--out", str(out), "--no-generate", "--no-base-eval",
                      "--no-plots"])
    return s["model"]
