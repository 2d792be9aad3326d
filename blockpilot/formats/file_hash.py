"""File digests for bundle manifests (standard library only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 8 << 20  # large reads into one reused buffer: hashing, not the Python loop, sets the rate


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in ``CHUNK`` blocks."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with Path(path).open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
