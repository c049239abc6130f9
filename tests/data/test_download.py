"""download(): against a local HTTP server on 127.0.0.1 (a thread, stopped at teardown).
The expected hashes are computed here with hashlib, independently of the code under test."""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minilife.data.download import KNOWN_CORPORA, DownloadError, download, download_known

PAYLOAD = b"To be, or not to be, that is the question.\n" * 500  # 21.5 kB: several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        if self.path == "/missing.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/truncated.txt":  # promise the whole file, send a third, hang up
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # never route loopback through a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_good_file(server, tmp_path):
    path = download(f"{server}/play.txt", SHA, tmp_path / "cache", progress=False, timeout=10)
    assert path == tmp_path / "cache" / "play.txt" and path.read_bytes() == PAYLOAD
    assert not list((tmp_path / "cache").glob("*.part"))
    named = download(f"{server}/play.txt", SHA.upper(), tmp_path / "cache", filename="other.txt",
                     progress=False, timeout=10)
    assert named.name == "other.txt" and named.read_bytes() == PAYLOAD


def test_cached_hit_skips_network_and_corrupt_cache_is_refetched(server, tmp_path):
    url = f"{server}/play.txt"
    download(url, SHA, tmp_path, progress=False, timeout=10)
    assert len(_Handler.requests) == 1
    assert download(url, SHA, tmp_path, progress=False, timeout=10).read_bytes() == PAYLOAD
    assert len(_Handler.requests) == 1  # served from the cache
    (tmp_path / "play.txt").write_bytes(b"tampered")
    with pytest.warns(UserWarning, match="downloading .* again"):
        path = download(url, SHA, tmp_path, progress=False, timeout=10)
    assert path.read_bytes() == PAYLOAD and len(_Handler.requests) == 2


def test_checksum_mismatch_removes_file_and_names_both_hashes(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        download(f"{server}/play.txt", wrong, tmp_path, progress=False, timeout=10)
    msg = str(err.value)
    assert f"{server}/play.txt" in msg and wrong in msg and SHA in msg
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match=r"truncated\.txt was cut short") as err:
        download(f"{server}/truncated.txt", SHA, tmp_path, progress=False, timeout=10)
    assert f"of {len(PAYLOAD)} bytes" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_bad_arguments(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.txt failed.*404"):
        download(f"{server}/missing.txt", SHA, tmp_path, progress=False, timeout=10)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a 64-character hex"):
        download(f"{server}/play.txt", "abc", tmp_path)
    with pytest.raises(ValueError, match="pass filename="):
        download(f"{server}/", SHA, tmp_path)
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        download_known("nope", tmp_path)


def test_registry_entries_are_well_formed():
    for name, corpus in KNOWN_CORPORA.items():
        assert corpus.url.startswith("https://") and len(corpus.sha256) == 64, name
        int(corpus.sha256, 16)


def test_registry_hash_matches_local_copy(shared_data):
    """The shared Tiny Shakespeare is the char-rnn file: its sha256 must be the registry's."""
    local = shared_data / "tinyshakespeare.txt"
    if not local.is_file():
        pytest.skip(f"{local} absent")
    assert hashlib.sha256(local.read_bytes()).hexdigest() == KNOWN_CORPORA["tinyshakespeare"].sha256
