"""Fetch real corpora by URL into a cache directory, verified by SHA-256.

What it implements
- ``download(url, sha256, cache_dir)``: a file already in the cache is hashed and returned without
  touching the network; otherwise it is streamed (urllib) into ``<name>.part`` while hashing, checked
  for completeness (Content-Length) and checksum, and only then renamed into place. A failed,
  interrupted or mismatched download leaves no file behind and raises ``DownloadError`` naming the
  URL (and, for a mismatch, both hashes). A cached file whose hash is wrong is fetched again.
- ``KNOWN_CORPORA``: corpora whose URL and SHA-256 we know for certain, and ``download_known(name)``.
  Tiny Shakespeare (the char-rnn data set, 1,115,394 bytes) is listed. TinyStories is not: we do not
  have a checksum for its validation file that we could vouch for; pass its URL and a hash you have
  verified to ``download`` yourself.

What it leaves out: resuming partial downloads (HTTP range requests), mirrors, and authentication.
Without network access nothing here is needed: the course runs on the embedded world.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download that failed, was cut short, or did not match its SHA-256 (names the URL)."""


@dataclass(frozen=True)
class Corpus:
    """A corpus we can fetch: where it lives, its SHA-256, and the file name to cache it under."""
    url: str
    sha256: str
    filename: str
    description: str


KNOWN_CORPORA: dict[str, Corpus] = {
    "tinyshakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        description="Tiny Shakespeare: 40k lines of the plays, 1.1 MB (char-rnn data set)"),
}


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, sha256: str, cache_dir: str | os.PathLike, filename: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Return the path of ``url``'s content in ``cache_dir``, downloading it if needed.

    ``sha256`` is the expected hex digest (64 characters); ``filename`` defaults to the last part of
    the URL's path. Raises DownloadError when the fetch fails or the content does not match."""
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"download: sha256={sha256!r} is not a 64-character hex SHA-256 digest")
    sha256 = sha256.lower()
    if filename is None:
        filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not filename or filename in (".", "..") or "/" in filename or "\\" in filename:
        raise ValueError(f"download: cannot cache {url!r} under file name {filename!r}; pass filename=")
    target = Path(cache_dir) / filename
    target.parent.mkdir(parents=True, exist_ok=True)

    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            return target
        warnings.warn(f"{target}: cached file has sha256 {actual}, expected {sha256}; "
                      f"downloading {url} again", stacklevel=2)
        target.unlink()

    part = target.with_name(target.name + ".part")
    h, received = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "minilife-download"})
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(part, "wb") as fh:
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=filename, disable=not progress) as bar:
                while chunk := resp.read(1 << 16):
                    fh.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(f"download of {url} was cut short: received {received} of "
                                    f"{total} bytes; the partial file was removed")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as e:  # failed, cut short or interrupted (Ctrl-C): leave nothing half-written
        part.unlink(missing_ok=True)
        if isinstance(e, (urllib.error.URLError, http.client.HTTPException, OSError)):  # not DownloadError
            raise DownloadError(f"download of {url} failed after {received} bytes: {e}; no file was kept") from e
        raise

    actual = h.hexdigest()
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {url}: sha256 mismatch: expected {sha256}, got {actual} "
                            f"({received} bytes); the file was removed")
    os.replace(part, target)
    return target


def download_known(name: str, cache_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Download one of ``KNOWN_CORPORA`` by name into ``cache_dir``."""
    if name not in KNOWN_CORPORA:
        raise ValueError(f"download_known: unknown corpus {name!r}; known: {sorted(KNOWN_CORPORA)}")
    c = KNOWN_CORPORA[name]
    return download(c.url, c.sha256, cache_dir, filename=c.filename, progress=progress)
