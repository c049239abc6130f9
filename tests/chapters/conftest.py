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
