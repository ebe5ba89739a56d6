"""Renames in progress, so that the next mount undoes or finishes one a crash cut off.

A directory rename copies every object below the old name, then deletes the originals
(``Namespace._move_dir``: OSS has no rename). A crash in between left both trees, and nothing
said so (a trial: 96 of 300 objects copied; `mv` had failed with ECONNABORTED). Each rename
now keeps a log, ``<cache dir>/renames/<random>.log``, JSON lines appended as it goes and not
fsynced (docs/design.md "Durability": a crash of the daemon keeps it, a power loss may not):

1. ``{"from": old path, "to": new path, "objects": {key: ETag}, "replaced": {metadata} | null}``
   before the store is changed: every object below the old name and the version of it the
   rename copies; the marker metadata of the empty directory the rename replaces, if any;
2. ``{"copying": new key}`` before each copy is sent, ``{"copied": new key, "etag": the
   copy's ETag}`` once it has landed (a copy in flight when the daemon dies may land after:
   a trial found such copies left behind);
3. ``{"deleting": true}`` once every copy has landed;

and the log goes when the rename is done in memory too. A torn last line is ignored.

A log without line 3 is **undone** (:func:`undo`): at once by the rename itself when a copy
fails, else by the next mount: each copy whose original is still the logged version is
deleted (a logged copy by its ETag; one sent but not logged only if it is the same object as
the original: same ETag, or the same wrapped data key), and a replaced empty directory's
marker is put back. A log with line 3 is **finished** by the next mount: each original is
deleted only if its logged copy is still at the new name (else it stays), and the files the
journal recovered at the old name move to the new one (``move_recovered``). The next mount
does this before it serves (:func:`settle`). Either way no object is left at neither name.

A **file** rename of a committed version (``Namespace._move_file``: one copy, then one
delete) keeps the same lines, its header marked ``"file": true``, with no line 3: the rename
is done once its copy has landed. File renames are many and short, and creating and removing
a file costs ~0.4 ms on an ext4 cache disk (twice the rename itself on a local bucket), so
they share one log per run, ``<cache dir>/renames/files-<random>.log``: each line carries
the rename's ``"id"``, and ``{"id": …, "end": true}`` closes it; the file is emptied when no
file rename is under way and it has grown past 64 KiB, and removed at unmount. The next mount **finishes** it when the copy is at the new
name (the logged ETag; an unlogged one if it is the original's copy, as above): the original
is deleted (if still the logged version) and the journal's version of the file moves to the
new name; a journaled version of the file the rename replaced goes, as the rename dropped it
(``drop_at_target``: only when the copy was not logged, since the rename drops it in the
same step that logs the copy). Else nothing had changed, and the log goes. A trial: a crash
between the copy and the delete left the file at both names.
"""
from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .. import envelope as env
from ..aio import run_all
from ..store.base import ObjectInfo, ObjectStore, StoreError
from .copying import delete_version, same_etag
from .errors import FsError
from .naming import Naming

log = logging.getLogger(__name__)

SHARED_PREFIX = "files-"  # the shared log of one run's file renames (module doc)
SHARED_TRUNCATE = 64 * 1024  # bytes: past this, the shared log is emptied once no file rename is under way
SETTLE_PARALLEL = 16  # objects settled at once (as a rename's copies: namespace.RENAME_PARALLEL)


@dataclass
class RenameLog:
    """One rename's log (module doc): ``source`` and ``target`` paths, ``objects`` (old key →
    ETag copied), ``replaced`` (marker metadata of the replaced empty directory), ``file`` (a
    file's rename, not a directory's), ``started`` (new keys whose copy was sent), ``copied``
    (new key → the copy's ETag), ``deleting`` (every copy landed), ``drop_at_target`` (set by
    :func:`settle` for ``move_recovered``: a journaled version at the target path is the
    replaced file's, and goes); ``id``: its lines' id in a shared log (file renames), else
    None (the log at ``path`` is its own)."""

    path: str
    source: str
    target: str
    objects: dict[str, str]
    replaced: dict[str, str] | None = None
    file: bool = False
    copied: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    deleting: bool = False
    drop_at_target: bool = False
    id: str | None = None
    _file: TextIO | None = None  # open while this run's rename goes on (a shared log: not its own)
    _failing: bool = False

    def _append(self, rec: dict) -> None:
        f = self._file
        assert f is not None
        if self.id is not None:
            rec = {"id": self.id, **rec}
        f.write(json.dumps(rec) + "\n")
        f.flush()  # to the kernel: a crash of the daemon keeps it (not fsynced: module doc)

    def copying(self, key: str) -> None:
        """The copy to ``key`` is about to be sent. Raises OSError (the cache disk): the copy
        must not be sent then (an undo would not know to look for it)."""
        self._append({"copying": key})
        self.started.add(key)

    def copied_to(self, key: str, etag: str) -> None:
        """The copy at ``key`` (ETag ``etag``) landed. A cache disk that refuses the line costs
        little (one WARNING): an undo still finds the copy by its ``copying`` line (taken back
        if it is its original's copy), a finish leaves that original where it is."""
        self.copied[key] = etag
        try:
            self._append({"copied": key, "etag": etag})
        except OSError as e:
            if not self._failing:
                log.warning("rename log %s: cannot note a copy (%s); a crash now may leave objects of %r at "
                            "both names", self.path, e, self.target)
            self._failing = True

    def copies_done(self) -> None:
        """Every copy landed: from now on the rename is finished, not undone. Raises OSError
        (the caller deletes nothing then: an undo would take copies whose originals are gone)."""
        self._append({"deleting": True})
        self.deleting = True


class RenameLogs:
    """The rename logs of one cache dir. ``left``: those earlier runs left (read once, at
    construction), for :func:`settle`. This run's file renames share one log (module doc)."""

    def __init__(self, cache_dir: str):
        self.dir = os.path.join(cache_dir, "renames")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.left: list[RenameLog] = []
        self._left_shared: dict[str, set[str]] = {}  # an earlier run's shared log → ids not settled yet
        self._shared: TextIO | None = None  # this run's shared log, opened at the first file rename
        self._shared_path = ""
        self._ids = itertools.count(1)
        self._open_ids: set[str] = set()  # this run's file renames begun and not ended (or left)
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.startswith(SHARED_PREFIX):
                entries = _read_shared(path)
                if entries is None:
                    log.warning("rename log %s cannot be read; removed (a file rename a crash cut off may have "
                                "left the file at both names)", path)
                    _unlink(path)
                elif not entries:
                    _unlink(path)
                else:
                    self.left += entries
                    self._left_shared[path] = {e.id for e in entries if e.id is not None}
                continue
            got = _read(path)
            if got is None:
                log.warning("rename log %s cannot be read; removed (a directory rename a crash cut off may "
                            "have left objects at both names)", path)
                _unlink(path)
            else:
                self.left.append(got)

    def begin(self, source: str, target: str, objects: dict[str, str],
              replaced: dict[str, str] | None, *, file: bool = False) -> RenameLog:
        """Start the log of renaming directory (``file``: file) ``source`` to ``target``
        (paths) that copies ``objects`` (key → ETag). Raises FsError(ENOSPC, EIO...) when the
        cache disk refuses it: nothing is changed then."""
        if file:
            return self._begin_shared(source, target, objects)
        path = os.path.join(self.dir, uuid.uuid4().hex + ".log")
        entry = RenameLog(path, source, target, dict(objects), replaced, file)
        try:
            entry._file = open(path, "x", encoding="utf-8")
            entry._append({"from": source, "to": target, "objects": objects, "replaced": replaced})
        except OSError as e:
            self.end(entry)  # (closes and removes what was made)
            log.error("cannot rename %r: its rename log %s cannot be written: %s", source, path, e)
            raise FsError(e.errno or errno.EIO) from None
        return entry

    def _begin_shared(self, source: str, target: str, objects: dict[str, str]) -> RenameLog:
        """:meth:`begin` of a file rename: its lines go to this run's shared log."""
        try:
            if self._shared is None:
                self._shared_path = os.path.join(self.dir, f"{SHARED_PREFIX}{uuid.uuid4().hex}.log")
                self._shared = open(self._shared_path, "a", encoding="utf-8")
            rid = str(next(self._ids))
            entry = RenameLog(self._shared_path, source, target, dict(objects), None, True, id=rid,
                              _file=self._shared)
            entry._append({"from": source, "to": target, "objects": objects, "file": True})
        except OSError as e:
            log.error("cannot rename %r: its rename log %s cannot be written: %s", source, self._shared_path, e)
            raise FsError(e.errno or errno.EIO) from None
        self._open_ids.add(rid)
        return entry

    def end(self, entry: RenameLog) -> None:
        """The rename is done (or settled): its log goes (a shared log's lines: once every
        rename in it is done)."""
        if entry.id is None:
            self.leave(entry)
            _unlink(entry.path)
        elif entry.path in self._left_shared:  # an earlier run's, settled
            pending = self._left_shared[entry.path]
            pending.discard(entry.id)
            if not pending:
                del self._left_shared[entry.path]
                _unlink(entry.path)
        elif entry._file is not None:
            self._open_ids.discard(entry.id)
            try:
                entry._append({"end": True})
                if not self._open_ids and os.fstat(entry._file.fileno()).st_size > SHARED_TRUNCATE:
                    entry._file.truncate(0)  # no rename in it is under way: none is lost
            except OSError as e:  # the next mount settles it again (finds it done: nothing to do)
                log.warning("rename log %s: cannot note the end of the rename of %r (%s)", entry.path,
                            entry.source, e)
            entry._file = None

    def leave(self, entry: RenameLog) -> None:
        """The rename failed (the store) or was cut off: its log stays for the next mount to
        settle (a shared log's lines too: it is not emptied in this run any more)."""
        f = entry._file
        if f is not None:
            if entry.id is None:
                f.close()
            entry._file = None

    def close(self) -> None:
        """Unmount (or a crash in the tests): this run's shared log goes, unless a rename in
        it was left for the next mount."""
        if self._shared is not None:
            self._shared.close()
            self._shared = None
            if not self._open_ids:
                _unlink(self._shared_path)


def _read(path: str) -> RenameLog | None:
    """The log at ``path`` (a torn last line ignored); None when its header cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        head = json.loads(lines[0])
        entry = RenameLog(path, str(head["from"]), str(head["to"]),
                          {str(k): str(v) for k, v in dict(head["objects"]).items()}, head.get("replaced"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            break  # torn by the crash: nothing after it was written
        if isinstance(rec, dict):
            _apply(entry, rec)
    return entry


def _apply(entry: RenameLog, rec: dict) -> None:
    """Add line ``rec`` (after the header) to ``entry``."""
    if isinstance(rec.get("copying"), str):
        entry.started.add(rec["copying"])
    elif isinstance(rec.get("copied"), str) and isinstance(rec.get("etag"), str):
        entry.copied[rec["copied"]] = rec["etag"]
        entry.started.add(rec["copied"])
    elif rec.get("deleting") is True:
        entry.deleting = True


def _read_shared(path: str) -> list[RenameLog] | None:
    """The file renames of shared log ``path`` that were not ended (module doc); None when it
    cannot be read. A line that does not parse is skipped: each line stands alone (only the
    last can be torn)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    entries: dict[str, RenameLog] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            continue
        rid = rec["id"]
        if "from" in rec:
            try:
                entries[rid] = RenameLog(path, str(rec["from"]), str(rec["to"]),
                                         {str(k): str(v) for k, v in dict(rec["objects"]).items()}, None, True,
                                         id=rid)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        elif rec.get("end") is True:
            entries.pop(rid, None)
        elif rid in entries:
            _apply(entries[rid], rec)
    return list(entries.values())


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # left, the next mount would settle this rename again
        log.error("cannot remove rename log %s (%s): remove it by hand before the next mount", path, e)


async def settle(logs: RenameLogs, store: ObjectStore, naming: Naming,
                 move_recovered: Callable[[RenameLog], None]) -> list[str]:
    """Undo or finish each rename an earlier run left (module doc), before the mount serves;
    ``naming``: the mount's path → key mapping; ``move_recovered(entry)``: move the journal's
    files at or below ``entry.source`` to ``entry.target`` (finished renames). Returns one
    notice per rename settled (the caller logs them: WARNING). A rename the store fails to
    settle keeps its log (tried again at the next mount), logged."""
    notices = []
    for entry in list(logs.left):
        old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
        try:
            if entry.file:
                what = await _settle_file(store, entry, naming.key(entry.source), naming.key(entry.target),
                                          move_recovered)
            elif entry.deleting:
                kept = await _finish(store, entry, old, new)
                move_recovered(entry)
                what = (f"finished the rename of {entry.source!r} to {entry.target!r} that an earlier run left "
                        "unfinished (a crash)"
                        + (f"; {kept} object(s) stay at the old name (changed since, or their copy is gone)"
                           if kept else ""))
            else:
                kept = await undo(store, entry, naming.dir_key)
                what = (f"undid the rename of {entry.source!r} to {entry.target!r} that an earlier run left "
                        "unfinished (a crash, or the store failing; the `mv` had failed)"
                        + (f"; {kept} object(s) stay at the new name (changed there since, or their original "
                           "is gone)" if kept else ""))
        except (StoreError, FsError) as e:
            log.error("the rename of %r to %r that an earlier run left unfinished cannot be settled now (%s); "
                      "tried again at the next mount", entry.source, entry.target, e)
            continue
        notices.append(what)
        logs.left.remove(entry)
        logs.end(entry)
    return notices


async def _settle_file(store: ObjectStore, entry: RenameLog, old: str, new: str,
                       move_recovered: Callable[[RenameLog], None]) -> str:
    """Finish file rename ``entry`` (``old`` key to ``new``) if its copy landed, else leave
    it undone (module doc); returns the notice. Raises StoreError, FsError."""
    what = f"the rename of {entry.source!r} to {entry.target!r} that an earlier run left unfinished (a crash)"
    there = await store.head(new) if new in entry.started else None
    logged = entry.copied.get(new)
    if there is not None and logged is None:  # sent, the answer lost: the rename's if it is the original's copy
        original = await store.head(old)
        landed = entry.drop_at_target = original is not None and _same_object(there, original)
    else:
        landed = there is not None and same_etag(there.etag, logged)
    if there is None or not landed:
        return f"left {what} as it was: its copy is not at the new name (never landed, or changed since)"
    entry.copied[new] = there.etag
    entry.deleting = True
    kept = False
    try:
        await delete_version(store, old, entry.objects[old])
    except FsError as e:
        if e.errno != errno.ESTALE:
            raise
        kept = True  # a newer version at the old name: kept (logged)
    move_recovered(entry)
    return f"finished {what}" + ("; a newer version stays at the old name" if kept else "")


async def _finish(store: ObjectStore, entry: RenameLog, old: str, new: str) -> int:
    """Delete each original whose logged copy is still at the new name; returns how many stay."""
    kept = 0

    async def one(key: str, etag: str) -> None:
        nonlocal kept
        copy = entry.copied.get(new + key[len(old):])
        there = await store.head(new + key[len(old):]) if copy is not None else None
        if there is None or not same_etag(there.etag, copy):
            kept += (await store.head(key)) is not None
            return
        try:
            await delete_version(store, key, etag)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept += 1  # a newer version at the old name: kept (logged)

    await run_all([functools.partial(one, k, e) for k, e in entry.objects.items()], SETTLE_PARALLEL)
    return kept


async def undo(store: ObjectStore, entry: RenameLog, dir_key: Callable[[str], str]) -> int:
    """Undo the copies of rename ``entry`` (module doc); returns how many copies stay (changed
    at the new name since, or their original is gone). Raises StoreError, FsError."""
    old, new = dir_key(entry.source), dir_key(entry.target)
    by_target = {new + key[len(old):]: (key, etag) for key, etag in entry.objects.items()}
    kept = 0

    async def one(target: str) -> None:
        nonlocal kept
        key, etag = by_target.get(target, (None, None))
        copy_etag = entry.copied.get(target)
        there = await store.head(target)
        if there is None:
            return  # never landed, or gone since
        original = await store.head(key) if key is not None else None
        if original is None or not same_etag(original.etag, etag):
            kept += 1
            return
        if copy_etag is None and not _same_object(there, original):
            kept += 1  # sent, not logged, and not a copy of the original: another client's
            return
        try:
            await delete_version(store, target, copy_etag or there.etag)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept += 1  # changed at the new name since: kept (logged)

    await run_all([functools.partial(one, t) for t in sorted(entry.started)], SETTLE_PARALLEL)
    if entry.replaced is not None and await store.head(new) is None:
        await store.put_bytes(new, b"", entry.replaced)
    return kept


def _same_object(a: ObjectInfo, b: ObjectInfo) -> bool:
    """Whether ``a`` is a copy of ``b``: the same ETag (OSS's CopyObject keeps it), or the same
    wrapped data key (unique to one encrypted object; a CopyObject keeps the metadata)."""
    if same_etag(a.etag, b.etag):
        return True
    key = a.metadata.get(env.H_KEY)
    return key is not None and key == b.metadata.get(env.H_KEY)
