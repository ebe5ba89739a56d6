"""The write-back journal: a sealed staged version made durable, and found again after a crash.

``record()`` writes ``staging/<id>.json`` (the bucket, object key, size, full user metadata
including the *wrapped* data key, generation, and the ETag of the bucket's version it replaces: its *base*,
null for a new file) atomically next to the version's sealed ciphertext
``staging/<id>.data``. Nothing is fsynced (docs/design.md "Durability"): the data and then the
record are in the kernel when ``record()`` returns, so a crash of the daemon loses no closed
file, but a power loss may lose records written since the last ``fsync()`` (which uploads) or
leave a record whose data the disk lost: recovery checks the data against the integrity tags
the record holds and quarantines it then, so a torn version never replaces a good object. That pair is everything an upload needs, without the CMK, so a mount
started after a crash uploads what the journal holds. ``read_journal()`` finds the records at
mount time; turning them into inodes is the filesystem's part (``ossfuse.fs.commit``).

States of one staged version (docs/design.md "Write-back and the journal"): open → sealed →
journaled → uploading → committed (record and data gone), or superseded (a newer version of the
file was journaled: this one's record goes), or quarantined (damaged: moved to
``staging/quarantine/``, never deleted). The data of a journaled version never changes; only its
record is rewritten when the file's name or attributes change.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from .staging import LABEL_XATTR, StagedFile, Staging

log = logging.getLogger(__name__)

# the base of a version whose record has none (written by an earlier ossfuse): its upload after
# a crash cannot check for a foreign edit
BASE_UNKNOWN = "\0unknown"


def record(staged: StagedFile, key: str, metadata: dict[str, str], base: str | None = BASE_UNKNOWN,
           sent: tuple[str, ...] = (), changed: float | None = None) -> None:
    """Atomically record (key, size, metadata, base, sent) for sealed ``staged``: written to a
    temporary file and renamed over the record, after the sealed data (not fsynced: the module
    doc). ``base``: the ETag of the version at ``key`` this one replaces (None: a new file, to
    be created only where nothing is), so the upload after a crash keeps a foreign edit made
    meanwhile as the mount's own upload does (fs/conflicts.py). ``sent``: the wrapped data
    keys (x-oss-meta-client-side-encryption-key) of this mount's earlier versions of the file
    whose upload went out without an answer yet: one of them may land after a crash, and is
    this mount's own, not a foreign edit. ``changed``: when the file was first changed since it
    was last in the bucket (wall-clock seconds), so ``status`` tells a pending upload's age
    after a crash too.
    Raises OSError (ENOSPC, EIO) when the cache disk fails (the previous record, if any, is
    then still valid), ValueError for a version not sealed. Recording what is already recorded
    does nothing (a close followed by its upload)."""
    if not staged.sealed:
        raise ValueError(f"staged version {staged.id} is not sealed")
    rec: dict[str, object] = {"key": key, "size": staged.size, "metadata": metadata, "generation": staged.generation}
    if staged.staging.store:
        rec["store"] = staged.staging.store
    if base != BASE_UNKNOWN:
        rec["base"] = base
    if sent:
        rec["sent"] = sorted(sent)
    if changed is not None:
        rec["changed"] = changed
    if staged.journaled_record is not None and rec == {k: v for k, v in staged.journaled_record.items() if k != "seq"}:
        return
    rec["seq"] = staged.staging.next_seq()
    tmp = staged.journal_path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, staged.journal_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    staged.journaled_record = rec


@dataclass
class JournalEntry:
    """A staged version found in the journal at mount time (its envelope not yet unwrapped).
    ``base``: the ETag it replaces, None for a new file, BASE_UNKNOWN for an older record;
    ``sent``, ``changed``: as :func:`record` (``changed`` None in an older record)."""

    staged: StagedFile
    key: str
    metadata: dict[str, str]
    base: str | None = BASE_UNKNOWN
    sent: tuple[str, ...] = ()
    changed: float | None = None
    seq: int = 0  # the record's sequence number (Staging.next_seq; an older record's mtime in ns)


def _check(rec: object) -> str | None:
    """Why ``rec`` is not a usable record (None: it is)."""
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    if not isinstance(rec.get("key"), str):
        return "record has no object key"
    if not isinstance(rec.get("size"), int) or rec["size"] < 0:
        return "record has no valid size"
    meta = rec.get("metadata")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return "record has no valid metadata"
    if not isinstance(rec.get("store", ""), str):
        return "record has no valid store"
    if "base" in rec and not (rec["base"] is None or isinstance(rec["base"], str)):
        return "record has no valid base version"
    if not (isinstance(rec.get("sent", []), list) and all(isinstance(k, str) for k in rec.get("sent", []))):
        return "record has no valid list of sent versions"
    changed = rec.get("changed", 0.0)
    if isinstance(changed, bool) or not isinstance(changed, (int, float)) or not changed >= 0:
        return "record has no valid time of change"
    seq = rec.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return "record has no valid sequence number"
    return None


def read_journal(staging: Staging) -> tuple[list[JournalEntry], int]:
    """Journaled versions left by an earlier run (crash or failed uploads), oldest first, and
    how many entries were quarantined. A record for another bucket than ``staging.store`` (the
    cache dir mounted with another config's store: a trial's journal went into the other
    bucket) is quarantined too, as one for another prefix is (fs/commit.py). Work files and data files without a record were never
    journaled (or were uploaded) and are deleted; each work file with one WARNING naming the
    object it belonged to (unsaved changes lost by a crash or a failed seal). A record that cannot be read or parsed, or
    whose data file is missing or not exactly as long as it says, is quarantined
    (``Staging.quarantine``: one ERROR line). Data files are only stat'ed, never created."""
    entries = []
    quarantined = 0
    names = [n for n in os.listdir(staging.dir) if n != "quarantine"]  # (in any order: sorted by seq below)
    journaled = set()
    for name in names:
        if not name.endswith(".json"):
            continue
        sid = name[:-5]
        path = os.path.join(staging.dir, name)
        journaled.add(sid)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            staging.quarantine(sid, f"unreadable record: {e}", path)
            quarantined += 1
            continue
        why = _check(rec)
        what = rec["key"] if isinstance(rec, dict) and isinstance(rec.get("key"), str) else path
        if why is None and staging.store and rec.get("store", staging.store) != staging.store:
            why = f"written for the bucket {rec['store']}, not this mount's {staging.store}"
        if why is None:
            try:
                actual = os.lstat(os.path.join(staging.dir, sid + ".data")).st_size
            except FileNotFoundError:
                actual = None
            if actual is None:
                why = "its data file is missing"
            elif actual != rec["size"]:
                why = f"its data file has {actual} bytes, the record says {rec['size']}"
        if why is not None:
            staging.quarantine(sid, why, repr(what))
            quarantined += 1
            continue
        st = StagedFile(staging, sid, None, rec["size"], sealed=True)
        st.generation = rec.get("generation", 0) if isinstance(rec.get("generation"), int) else 0
        st.journaled_record = rec
        entries.append(JournalEntry(st, rec["key"], rec["metadata"], rec.get("base", BASE_UNKNOWN),
                                    tuple(rec.get("sent", ())), rec.get("changed"),
                                    rec.get("seq") or os.lstat(path).st_mtime_ns))
    for name in names:
        sid = name.split(".")[0]
        if sid not in journaled:
            path = os.path.join(staging.dir, name)
            if name.endswith(".work"):
                staging.lost_work.append(_warn_lost_work(path))
            try:
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError):
                pass
    # oldest first by sequence number, not mtime: two records of one key (a file closed again
    # before the older record went, or a rename over a journaled file) may share an mtime
    entries.sort(key=lambda e: e.seq)
    if entries:  # this run's records come after them, also if the clock stepped back since
        staging.seq_after(entries[-1].seq)
    return entries, quarantined


def _warn_lost_work(path: str) -> str | None:
    """One WARNING for work file ``path`` about to be deleted at mount: the unsaved changes of
    a file (named from the work file's LABEL_XATTR when it has one) that an earlier run could
    not seal and journal (it crashed, was killed, or the cache disk was full at close). Its
    blocks are encrypted under a key that died with that run, so nothing can be recovered.
    Returns the file's object key, None when it was not recorded."""
    try:
        key: str | None = os.getxattr(path, LABEL_XATTR, follow_symlinks=False).decode("utf-8", "surrogateescape")
    except OSError:
        key = None
    label = "a file whose name was not recorded" if key is None else repr(key)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return key
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    log.warning("unsaved changes of %s (work file %s, %d bytes, last written %s) left by an earlier run "
                "that ended before the file was closed (crashed or killed) or could not save them at its "
                "close (a full cache disk) are deleted: they "
                "were never journaled and their key died with that run; the file keeps its last "
                "saved version (a file never closed before has none: it is empty, or absent)", label, path, st.st_size, written)
    return key
