"""Directory renames in progress, so that the next mount undoes or finishes one a crash cut off.

A directory rename copies every object below the old name, then deletes the originals
(``Namespace._move_dir``: OSS has no rename). A crash in between left both trees, and nothing
said so (a trial: 96 of 300 objects copied; `mv` had failed with ECONNABORTED). Each rename
now keeps a log, ``<cache dir>/renames/<random>.log``, JSON lines appended as it goes and not
fsynced (docs/design.md "Durability": a crash of the daemon keeps it, a power loss may not):

1. ``{"from": old path, "to": new path, "objects": {key: ETag}, "replaced": {metadata} | null}``
   before the store is changed: every object below the old name and the version of it the
   rename copies; the marker metadata of the empty directory the rename replaces, if any;
2. ``{"copied": new key, "etag": the copy's ETag}`` as each copy lands;
3. ``{"deleting": true}`` once every copy has landed;

and the log goes when the rename is done in memory too. A torn last line is ignored.

The next mount, before it serves (:func:`settle`): a log without line 3 is **undone**: `mv`
failed, so the copies that landed are deleted (each only while its original is still the
logged version, and only the logged copy: :func:`~ossfuse.fs.copying.delete_version`), and a
replaced empty directory's marker is put back. A log with line 3 is **finished**: each
original is deleted only if its logged copy is still at the new name (else it stays), and the
files the journal recovered at the old name move to the new one (``move_recovered``). Either
way no object is left at neither name.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..aio import run_all
from ..store.base import ObjectStore, StoreError
from .copying import delete_version, same_etag
from .errors import FsError

log = logging.getLogger(__name__)

SETTLE_PARALLEL = 16  # objects settled at once (as a rename's copies: namespace.RENAME_PARALLEL)


@dataclass
class RenameLog:
    """One directory rename's log (module doc): ``source`` and ``target`` paths, ``objects``
    (old key → ETag copied), ``replaced`` (marker metadata of the replaced empty directory),
    ``copied`` (new key → the copy's ETag), ``deleting`` (every copy landed)."""

    path: str
    source: str
    target: str
    objects: dict[str, str]
    replaced: dict[str, str] | None = None
    copied: dict[str, str] = field(default_factory=dict)
    deleting: bool = False
    _file: object = None
    _failing: bool = False

    def _append(self, rec: dict) -> None:
        f = self._file
        assert f is not None
        f.write(json.dumps(rec) + "\n")  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]

    def copied_to(self, key: str, etag: str) -> None:
        """The copy at ``key`` (ETag ``etag``) landed. A cache disk that refuses the line only
        costs the next mount this copy: an undo leaves it, a finish leaves its original (one
        WARNING)."""
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
    construction), for :func:`settle`."""

    def __init__(self, cache_dir: str):
        self.dir = os.path.join(cache_dir, "renames")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.left: list[RenameLog] = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            got = _read(path)
            if got is None:
                log.warning("rename log %s cannot be read; removed (a directory rename a crash cut off may "
                            "have left objects at both names)", path)
                _unlink(path)
            else:
                self.left.append(got)

    def begin(self, source: str, target: str, objects: dict[str, str],
              replaced: dict[str, str] | None) -> RenameLog:
        """Start the log of renaming directory ``source`` to ``target`` (paths) that copies
        ``objects`` (key → ETag). Raises FsError(ENOSPC, EIO...) when the cache disk refuses it:
        nothing is changed then."""
        path = os.path.join(self.dir, uuid.uuid4().hex + ".log")
        try:
            f = open(path, "x", encoding="utf-8")
        except OSError as e:
            log.error("cannot rename %r: its rename log %s cannot be written: %s", source, path, e)
            raise FsError(e.errno or errno.EIO) from None
        entry = RenameLog(path, source, target, dict(objects), replaced, _file=f)
        try:
            entry._append({"from": source, "to": target, "objects": objects, "replaced": replaced})
        except OSError as e:
            f.close()
            _unlink(path)
            log.error("cannot rename %r: its rename log %s cannot be written: %s", source, path, e)
            raise FsError(e.errno or errno.EIO) from None
        return entry

    def end(self, entry: RenameLog) -> None:
        """The rename is done (or settled): its log goes."""
        self.leave(entry)
        _unlink(entry.path)

    @staticmethod
    def leave(entry: RenameLog) -> None:
        """The rename failed (the store): its log stays for the next mount to settle."""
        f = entry._file
        if f is not None:
            f.close()  # type: ignore[attr-defined]
            entry._file = None


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
        if isinstance(rec, dict) and isinstance(rec.get("copied"), str) and isinstance(rec.get("etag"), str):
            entry.copied[rec["copied"]] = rec["etag"]
        elif isinstance(rec, dict) and rec.get("deleting") is True:
            entry.deleting = True
    return entry


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.info("cannot remove rename log %s: %s", path, e)


async def settle(logs: RenameLogs, store: ObjectStore, dir_key: Callable[[str], str],
                 move_recovered: Callable[[RenameLog], None]) -> list[str]:
    """Undo or finish each rename an earlier run left (module doc), before the mount serves;
    ``dir_key(path)``: the key prefix of directory ``path``; ``move_recovered(entry)``: move
    the journal's files below ``entry.source`` to ``entry.target`` (finished renames).
    Returns one notice per rename settled (the caller logs them: WARNING). A rename the store
    fails to settle keeps its log (tried again at the next mount), logged."""
    notices = []
    for entry in list(logs.left):
        old, new = dir_key(entry.source), dir_key(entry.target)
        try:
            if entry.deleting:
                kept = await _finish(store, entry, old, new)
                move_recovered(entry)
                what = (f"finished the rename of {entry.source!r} to {entry.target!r} that a crash cut off"
                        + (f"; {kept} object(s) stay at the old name (changed since, or their copy is gone)"
                           if kept else ""))
            else:
                kept = await _undo(store, entry, old, new)
                what = (f"undid the rename of {entry.source!r} to {entry.target!r} that a crash cut off (the `mv` "
                        "had failed)" + (f"; {kept} object(s) stay at the new name (changed there since, or their original is gone)"
                                         if kept else ""))
        except (StoreError, FsError) as e:
            log.error("the rename of %r to %r that a crash cut off cannot be settled now (%s); tried again at "
                      "the next mount", entry.source, entry.target, e)
            continue
        notices.append(what)
        logs.left.remove(entry)
        logs.end(entry)
    return notices


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


async def _undo(store: ObjectStore, entry: RenameLog, old: str, new: str) -> int:
    """Delete each logged copy whose original is still the logged version, put a replaced
    empty directory's marker back; returns how many copies stay."""
    by_target = {new + key[len(old):]: (key, etag) for key, etag in entry.objects.items()}
    kept = 0

    async def one(target: str, copy_etag: str) -> None:
        nonlocal kept
        key, etag = by_target.get(target, (None, None))
        original = await store.head(key) if key is not None else None
        if original is None or not same_etag(original.etag, etag):
            kept += 1
            return
        try:
            await delete_version(store, target, copy_etag)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept += 1  # changed at the new name since: kept (logged)

    await run_all([functools.partial(one, t, e) for t, e in entry.copied.items()], SETTLE_PARALLEL)
    if entry.replaced is not None and await store.head(new) is None:
        await store.put_bytes(new, b"", entry.replaced)
    return kept
