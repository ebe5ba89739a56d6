"""The write-back journal: a staged version made durable, and found again after a crash.

``record()`` fsyncs the staged ciphertext, then writes ``staging/<id>.json`` (object key, size,
full user metadata including the *wrapped* data key, generation) atomically. That JSON plus the
data file is everything an upload needs, without the CMK, so a mount started after a crash
uploads what the journal holds (design.md promise 3). ``read_journal()`` finds those records at
mount time; turning them into inodes is the filesystem's part (``ossfuse.fs.commit``).

Journal states of one staged version (docs/design.md): written but not journaled (lost by a
crash, its data file deleted at the next mount) → journaled (uploaded by the next mount) →
uploaded (data and record deleted). A record is rewritten in place when the same staged version
changes again (TODO(rebuild): journaled versions become immutable, issue 12 A5).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from .staging import StagedFile, Staging

log = logging.getLogger(__name__)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record(staged: StagedFile, key: str, metadata: dict[str, str]) -> None:
    """fsync ``staged``'s ciphertext, then atomically record (key, size, metadata). Raises
    OSError (ENOSPC, EIO) when the cache disk fails; the previous record is then still valid.
    Recording what is already recorded does nothing (a close followed by its upload)."""
    rec = {"key": key, "size": staged.size, "metadata": metadata, "generation": staged.generation}
    if rec == staged.journaled_record:
        return
    os.fsync(staged.fd)
    tmp = staged.journal_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staged.journal_path)
    _fsync_dir(staged.staging.dir)
    staged.journaled_generation = staged.generation
    staged.journaled_record = rec


@dataclass
class JournalEntry:
    """A staged version found in the journal at mount time (its envelope not yet unwrapped)."""

    staged: StagedFile
    key: str
    metadata: dict[str, str]


def read_journal(staging: Staging) -> list[JournalEntry]:
    """Journaled versions left by an earlier run (crash or failed uploads), oldest first.
    Data files without a journal were never closed and are deleted. A data file shorter than
    its journal says is reported and skipped, never uploaded."""
    entries = []
    names = sorted(os.listdir(staging.dir), key=lambda n: os.path.getmtime(os.path.join(staging.dir, n)))
    journaled = set()
    for name in names:
        if not name.endswith(".json"):
            continue
        sid = name[:-5]
        path = os.path.join(staging.dir, name)
        try:
            with open(path) as f:
                rec = json.load(f)
            st = StagedFile(staging, sid, None, rec["size"])
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
            os.unlink(os.path.join(staging.dir, name))
    return entries
