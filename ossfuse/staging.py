"""Write-back staging: dirty file contents as ciphertext on local disk, and their journal.

A file being written gets a *staged version*: a fresh data key and IV (a new object version,
oss-cse-format.md §11) and a file ``staging/<id>.data`` holding the ciphertext the object will
have, byte for byte, so the upload streams it without another crypto pass and no plaintext ever
reaches the disk (design.md promise 2). Holes are written as encrypted zeros, because a hole in
the ciphertext would decrypt to keystream, not zeros.

``journal()`` makes a staged version durable: the data file is fsynced, then
``staging/<id>.json`` (object key, size, full user metadata including the *wrapped* data key)
is written atomically. That JSON plus the data file is everything an upload needs, without the
CMK, so a mount started after a crash uploads what the journal holds (promise 3).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass

from .envelope import Envelope

log = logging.getLogger(__name__)

_ZERO_CHUNK = 1 << 20  # bytes of encrypted zeros written at a time when filling holes


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFile:
    """One staged object version. ``size`` in bytes; ``generation`` counts changes, so an
    upload knows whether the data changed while it ran."""

    def __init__(self, staging: "Staging", sid: str, envelope: Envelope | None, size: int = 0):
        self.staging = staging
        self.id = sid
        self.envelope = envelope
        self.size = size
        self.generation = 0
        self.journaled_generation = -1
        self._journaled: dict | None = None  # the record last made durable
        self.data_path = os.path.join(staging.dir, sid + ".data")
        self.journal_path = os.path.join(staging.dir, sid + ".json")
        self.fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

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

    # -- durability -----------------------------------------------------------------------
    def journal(self, key: str, metadata: dict[str, str]) -> None:
        """fsync the ciphertext, then atomically record (key, size, metadata). Raises OSError
        (ENOSPC, EIO) when the cache disk fails; the previous journal is then still valid.
        Recording what is already recorded does nothing (a close followed by its upload)."""
        record = {"key": key, "size": self.size, "metadata": metadata, "generation": self.generation}
        if record == self._journaled:
            return
        os.fsync(self.fd)
        tmp = self.journal_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)
        _fsync_dir(self.staging.dir)
        self.journaled_generation = self.generation
        self._journaled = record

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


@dataclass
class JournalEntry:
    """A staged version found in the journal at mount time."""

    staged: StagedFile
    key: str
    metadata: dict[str, str]


class Staging:
    """The staging directory ``<cache dir>/staging``."""

    def __init__(self, cache_dir: str):
        self.dir = os.path.join(cache_dir, "staging")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def new(self, envelope: Envelope) -> StagedFile:
        """An empty staged version encrypted under ``envelope``."""
        return StagedFile(self, uuid.uuid4().hex, envelope)

    def recover(self) -> list[JournalEntry]:
        """Journaled versions left by an earlier run (crash or failed uploads), oldest first.
        Data files without a journal were never closed and are deleted. A data file shorter than
        its journal says is reported and skipped, never uploaded."""
        entries = []
        names = sorted(os.listdir(self.dir), key=lambda n: os.path.getmtime(os.path.join(self.dir, n)))
        journaled = set()
        for name in names:
            if not name.endswith(".json"):
                continue
            sid = name[:-5]
            path = os.path.join(self.dir, name)
            try:
                with open(path) as f:
                    rec = json.load(f)
                st = StagedFile(self, sid, None, rec["size"])
                actual = os.fstat(st.fd).st_size
                if actual < rec["size"]:
                    log.error("journal %s: staged data for %r has %d of %d bytes; not uploading",
                              sid, rec["key"], actual, rec["size"])
                    st.close()
                    continue
                st.journaled_generation = st.generation
                entries.append(JournalEntry(st, rec["key"], rec["metadata"]))
                journaled.add(sid)
            except (OSError, ValueError, KeyError) as e:
                log.error("journal %s unreadable, kept for inspection: %s", path, e)
                journaled.add(sid)
        for name in names:
            sid = name.split(".")[0]
            if sid not in journaled:
                os.unlink(os.path.join(self.dir, name))
        return entries
