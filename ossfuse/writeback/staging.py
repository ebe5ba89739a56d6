"""Write-back staging: dirty file contents as ciphertext on local disk.

A file being written gets a *staged version*: a fresh data key and IV (a new object version,
oss-cse-format.md §11) and a file ``staging/<id>.data`` holding the ciphertext the object will
have, byte for byte, so the upload streams it without another crypto pass and no plaintext ever
reaches the disk (design.md promise 2). Holes are written as encrypted zeros, because a hole in
the ciphertext would decrypt to keystream, not zeros.

Making a staged version durable (its journal record ``staging/<id>.json``) and finding the
records after a crash is :mod:`ossfuse.writeback.journal`.
"""
from __future__ import annotations

import os
import uuid

from ..envelope import Envelope

_ZERO_CHUNK = 1 << 20  # bytes of encrypted zeros written at a time when filling holes


class StagedFile:
    """One staged object version. ``size`` in bytes; ``generation`` counts changes, so an
    upload knows whether the data changed while it ran. ``journaled_generation`` is the
    generation last recorded in the journal (-1: never), ``journaled_record`` that record."""

    def __init__(self, staging: "Staging", sid: str, envelope: Envelope | None, size: int = 0):
        self.staging = staging
        self.id = sid
        self.envelope = envelope
        self.size = size
        self.generation = 0
        self.journaled_generation = -1
        self.journaled_record: dict | None = None  # the record last made durable
        self.data_path = os.path.join(staging.dir, sid + ".data")
        self.journal_path = os.path.join(staging.dir, sid + ".json")
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def was_journaled(self) -> bool:
        """Whether some generation of this version has a journal record (a crash keeps it)."""
        return self.journaled_generation >= 0

    # -- content --------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write plaintext ``data`` at ``offset``; a gap past the old end reads as zeros."""
        if offset > self.size:
            self._fill_zeros(self.size, offset)
        os.pwrite(self.fd, self.envelope.crypt(offset, data), offset)
        self.size = max(self.size, offset + len(data))
        self.generation += 1

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset+length)``, clipped to the size."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        return self.envelope.crypt(offset, os.pread(self.fd, length, offset))

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) to ``size`` bytes."""
        if size > self.size:
            self._fill_zeros(self.size, size)
        else:
            os.ftruncate(self.fd, size)
        self.size = size
        self.generation += 1

    def _fill_zeros(self, start: int, end: int) -> None:
        for off in range(start, end, _ZERO_CHUNK):
            n = min(_ZERO_CHUNK, end - off)
            os.pwrite(self.fd, self.envelope.crypt(off, bytes(n)), off)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Delete data and journal (the file was unlinked, or its upload is done)."""
        self.close()
        for p in (self.data_path, self.journal_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class Staging:
    """The staging directory ``<cache dir>/staging``."""

    def __init__(self, cache_dir: str):
        self.dir = os.path.join(cache_dir, "staging")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def new(self, envelope: Envelope) -> StagedFile:
        """An empty staged version encrypted under ``envelope``."""
        return StagedFile(self, uuid.uuid4().hex, envelope)
