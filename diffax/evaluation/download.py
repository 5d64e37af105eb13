"""Fetch a reference file once, check its sha256, keep it (standard library only).

Used for the FID Inception weights when the user asks for it
(config.eval.download_weights); nothing in diffax downloads on its own.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: str, *, sha256: str, timeout: float = 60.0) -> str:
    """Download `url` to `dest` unless a file with that sha256 (or sha256 prefix) is already there.

    The bytes go to `dest + '.part'` and are hashed on the way; only a file whose
    digest starts with `sha256` is renamed to `dest`, so an interrupted or altered
    download never looks complete. Returns `dest`. A network failure raises
    OSError naming the URL and where to put a manually downloaded copy.
    """
    if os.path.isfile(dest) and sha256_of(dest).startswith(sha256):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
    except OSError as e:
        if os.path.exists(part):
            os.remove(part)
        raise OSError(f"Could not download {url} ({e}). Download it by hand and save it as {dest}.") from e
    digest = h.hexdigest()
    if not digest.startswith(sha256):
        os.remove(part)
        raise ValueError(f"{url}: sha256 {digest} does not match the expected {sha256}; the download is corrupt "
                         f"or the file changed. Nothing was kept; try again or download it by hand to {dest}.")
    os.replace(part, dest)
    return dest
