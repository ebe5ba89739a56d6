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
4. ``{"undone": true, "late": [new keys], "until": wall-clock seconds}`` once it was undone with
   copies sent without an answer not found (:class:`LateCopies`): a later mount only looks for
   those until then, and never undoes it again;

and the log goes when the rename is done in memory too. Each line is written whole by one
``write(2)`` and starts with its newline, so a line torn by a full disk or a crash stands
alone: the reader skips it.

A log without line 3 is **undone** (:func:`undo`): at once by the rename itself when a copy
fails, else by the next mount: each copy whose original is still there is deleted (a
logged copy by its ETag, also when another client rewrote the original since; one
sent but not logged only if the original is still the logged version and the same object:
the same wrapped data key, :func:`same_object`), and a replaced empty directory's
marker is put back. A copy sent but not logged that is not there may still land (OSS
carries a request out until ``indoubt.WINDOW`` after it was sent; a trial): the log then
stays, and the running mount looks for it until then (:class:`LateCopies`). A log with
line 3 is **finished** by the next mount: each original is
deleted only if its logged copy is still at the new name (else it stays), and the files the
journal recovered at the old name move to the new one (``move_recovered``). The next mount
does this before it serves (:func:`settle`). Either way no object is left at neither name.
When the store fails the next mount, a rename is settled anyway from what its log says
(``Namespace.settle_later``; a trial: the mount served both trees, and the user's next `mv`
made the duplicate permanent): finished with its originals as pending deletes when its
copies are logged as landed, or, cut off while copying, undone with its logged copies as
pending deletes (hidden at once, deleted once the store answers); its log stays for the
mount after if a copy was sent but not logged. One that replaced an empty directory (its
marker must be put back), or a file's whose copy is not logged, keeps its log and waits for
the mount after. A log is read by its lines, not its file name; a line of a shape no run
writes makes the whole log one ERROR line, and it is removed.

A **file** rename of a committed version (``Namespace._move_file``: one copy, then one
delete) keeps the same lines, its header marked ``"file": true``, with no line 3: the rename
is done once its copy has landed. File renames are many and short, and creating and removing
a file costs ~0.4 ms on an ext4 cache disk (twice the rename itself on a local bucket), so
they share one log per run, ``<cache dir>/renames/files-<random>.log``: each line carries
the rename's ``"id"``, and ``{"id": …, "end": true}`` closes it; the file is emptied when no
file rename is under way and it has grown past 64 KiB, and removed at unmount. The next
mount **finishes** a file rename when its copy is at the new name (the logged ETag; an
unlogged one only if it is the original's copy, as above): the original is deleted if it is
still the version copied and the same object as the copy (an empty object's ETag is every
empty object's: a trial lost a file's unsaved changes to that), and the journal's version of
the file moves to the new name; a journaled version of the file the rename replaced goes,
as the rename dropped it (``drop_at_target``: only when the copy was not logged, since the
rename drops it in the same step that logs the copy). Else nothing had changed, and the log
goes. A trial: a crash between the copy and the delete left the file at both names.
"""
from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from .. import envelope as env
from ..aio import run_all
from ..integrity import LIST_DIR, is_tag_list
from ..store.indoubt import WINDOW
from ..store.base import NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError, same_etag
from .copying import delete_version
from .errors import FsError
from .locks import NameLocks
from .naming import Naming

log = logging.getLogger(__name__)

SHARED_PREFIX = "files-"  # the shared log of one run's file renames (module doc)
SHARED_TRUNCATE = 64 * 1024  # bytes: past this, the shared log is emptied once no file rename is under way
SETTLE_PARALLEL = 16  # objects settled at once (as a rename's copies: namespace.RENAME_PARALLEL)
LATE_WINDOW = WINDOW  # seconds after it was sent during which OSS may carry a request out (store/indoubt.py)
LATE_FIRST_LOOK = 5.0  # seconds: first look for a late copy (LateCopies), then twice as long each time
LATE_LAST_STEP = 60.0  # seconds: the longest time between two looks
NEAR_INTERVAL = 1.0  # seconds: the shortest time between two looks a lookup or listing asks for


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
    late: set[str] = field(default_factory=set)  # set by undo(): copies sent, not logged, not there
    # set by undo(): the replaced directory's marker key → what held it then (the put-back marker,
    # or another's): the late marker copy may land over it (it is no create-only copy)
    late_over: dict[str, ObjectInfo] = field(default_factory=dict)
    # the rename was undone and its late copies are watched until then (wall clock; line 4)
    undone_until: float | None = None
    id: str | None = None
    _fd: int | None = None  # open (O_APPEND) while this run's rename goes on (a shared log: not its own)
    _failing: bool = False

    def _append(self, rec: dict) -> None:
        """Write ``rec`` as one line (module doc). Raises OSError, also for a short write."""
        assert self._fd is not None
        _write_line(self._fd, {"id": self.id, **rec} if self.id is not None else rec)

    def append_closed(self, rec: dict) -> None:
        """:meth:`_append` to a directory rename's own log once its fd is closed (line 4,
        ``watch_or_end``). Raises OSError."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_line(fd, rec)
        finally:
            os.close(fd)

    def copying(self, key: str) -> None:
        """The copy to ``key`` is about to be sent. Raises FsError (the cache disk refuses the
        line; one ERROR line): the copy must not be sent then (an undo would not know to look
        for it)."""
        try:
            self._append({"copying": key})
        except OSError as e:
            log.error("rename of %r to %r: its rename log cannot be written: %s", self.source, self.target, e)
            raise FsError(e.errno or errno.EIO) from None
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
        self.watched: list[LateCopies] = []  # undone renames whose copies may still land (watch_late_copies)
        self._left_paths: dict[str, int] = {}  # an earlier run's log → how many of its renames are not settled
        self._shared: int | None = None  # fd of this run's shared log, opened at the first file rename
        self._shared_path = ""
        self._ids = itertools.count(1)
        self._open_ids: set[str] = set()  # this run's file renames begun and not ended (or left)
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            try:
                entries = _read_log(path)
            except Exception as e:  # (RecursionError of a nested line, too): it must not stop the mount
                log.error("rename log %s makes no sense (%s); removed: a rename a crash cut off may have left "
                          "objects at both names", path, e)
                _unlink(path)
                continue
            if entries:
                self.left += entries
                self._left_paths[path] = len(entries)
            else:
                _unlink(path)

    def begin(self, source: str, target: str, objects: dict[str, str],
              replaced: dict[str, str] | None, *, file: bool = False) -> RenameLog:
        """Start the log of renaming directory (``file``: file) ``source`` to ``target``
        (paths) that copies ``objects`` (key → ETag). Raises FsError(ENOSPC, EIO...) when the
        cache disk refuses it: nothing is changed then."""
        if file:
            return self._begin_shared(source, target, objects)
        path = os.path.join(self.dir, uuid.uuid4().hex + ".log")
        entry = RenameLog(path, source, target, dict(objects), replaced)
        try:
            entry._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
                self._shared = os.open(self._shared_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                       0o600)
            rid = str(next(self._ids))
            entry = RenameLog(self._shared_path, source, target, dict(objects), None, True, id=rid,
                              _fd=self._shared)
            entry._append({"from": source, "to": target, "objects": objects, "file": True})
        except OSError as e:
            log.error("cannot rename %r: its rename log %s cannot be written: %s", source, self._shared_path, e)
            raise FsError(e.errno or errno.EIO) from None
        self._open_ids.add(rid)
        return entry

    def end(self, entry: RenameLog) -> None:
        """The rename is done (or settled): its log goes (a shared log's lines: once every
        rename in it is done)."""
        if entry.path in self._left_paths:  # an earlier run's, settled
            self._left_paths[entry.path] -= 1
            if not self._left_paths[entry.path]:
                del self._left_paths[entry.path]
                _unlink(entry.path)
        elif entry.id is None:
            self.leave(entry)
            _unlink(entry.path)
        elif entry._fd is not None:
            self._open_ids.discard(entry.id)
            try:
                entry._append({"end": True})
                if not self._open_ids and os.fstat(entry._fd).st_size > SHARED_TRUNCATE:
                    os.ftruncate(entry._fd, 0)  # no rename in it is under way: none is lost
            except OSError as e:  # the next mount settles it again (finds it done: nothing to do)
                log.warning("rename log %s: cannot note the end of the rename of %r (%s)", entry.path,
                            entry.source, e)
            entry._fd = None

    def leave(self, entry: RenameLog) -> None:
        """The rename failed (the store) or was cut off: its log stays for the next mount to
        settle (a shared log's lines too: it is not emptied in this run any more)."""
        if entry._fd is not None:
            if entry.id is None:
                os.close(entry._fd)
            entry._fd = None

    def close(self) -> None:
        """Unmount (or a crash in the tests): this run's shared log goes, unless a rename in
        it was left for the next mount."""
        if self._shared is not None:
            os.close(self._shared)
            self._shared = None
            if not self._open_ids:
                _unlink(self._shared_path)


class _Nonsense(ValueError):
    """A rename log no run writes (edited by hand, or damaged)."""


def _read_log(path: str) -> list[RenameLog]:
    """The renames log ``path`` holds that were not ended: one rename's own log (lines without
    ``"id"``) or a shared log of file renames (each line with its rename's), told apart by
    their lines, not by the file's name. A line that does not parse is skipped: torn by a
    crash or a full disk, it stands alone (module doc). Raises _Nonsense for a log no run
    writes (a line of another shape, two headers of one rename, a line before its header,
    both kinds of lines), OSError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Nonsense("not UTF-8") from None
    entries: dict[str | None, RenameLog] = {}
    ended: set[str] = set()
    kinds: set[bool] = set()
    for line in text.split("\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # torn
        except RecursionError:  # nested past Python's limit: no torn line is
            raise _Nonsense("a line nested too deep") from None
        if not isinstance(rec, dict):
            raise _Nonsense(f"a line is not a JSON object: {line[:80]!r}")
        rid = rec.get("id")
        if rid is not None and not isinstance(rid, str):
            raise _Nonsense(f"an id that is not a string: {rid!r}")
        kinds.add(rid is None)
        if len(kinds) > 1:
            raise _Nonsense("lines with and without a rename's id")
        if "from" in rec:
            if rid in entries or rid in ended:
                raise _Nonsense(f"two headers of rename {rid!r}")
            entries[rid] = _header(path, rec, rid)
        elif rid not in entries:
            raise _Nonsense(f"a line before its rename's header: {line[:80]!r}")
        elif rid is not None and rec.get("end") is True:
            del entries[rid]
            ended.add(rid)
        else:
            _apply(entries[rid], rec)
    return list(entries.values())


def _header(path: str, rec: dict, rid: str | None) -> RenameLog:
    """The rename of header line ``rec`` in log ``path``. Raises _Nonsense."""
    source, target, objects, replaced = rec.get("from"), rec.get("to"), rec.get("objects"), rec.get("replaced")
    file = rec.get("file") is True
    if not (isinstance(source, str) and isinstance(target, str) and isinstance(objects, dict)
            and _str_dict(objects) and (replaced is None or _str_dict(replaced)) and (not file or len(objects) == 1)):
        raise _Nonsense(f"a header of another shape: from {source!r}, to {target!r}")
    return RenameLog(path, source, target, dict(objects), replaced, file, id=rid)


def _str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _apply(entry: RenameLog, rec: dict) -> None:
    """Add line ``rec`` (after the header) to ``entry``. Raises _Nonsense."""
    if isinstance(rec.get("copying"), str):
        entry.started.add(rec["copying"])
    elif isinstance(rec.get("copied"), str) and isinstance(rec.get("etag"), str):
        entry.copied[rec["copied"]] = rec["etag"]
        entry.started.add(rec["copied"])
    elif rec.get("deleting") is True:
        entry.deleting = True
    elif rec.get("undone") is True and isinstance(rec.get("until"), (int, float)) \
            and isinstance(rec.get("late"), list) and all(isinstance(k, str) for k in rec["late"]):
        entry.undone_until = float(rec["until"])
        entry.late = set(rec["late"])
    else:
        raise _Nonsense(f"a line of another shape: {json.dumps(rec)[:80]!r}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # left, the next mount would settle this rename again
        log.error("cannot remove rename log %s (%s): remove it by hand before the next mount", path, e)


def moved_key(key: str, old: str, new: str, root: str) -> str:
    """Where the rename of directory key ``old`` to ``new``, by the mount whose prefix is
    ``root``, puts object ``key`` (below ``old``): below ``new``, except a tag list
    (``integrity.is_tag_list``), which goes to the ``.ossfuse-integrity`` directory of that
    mount's root. Object headers name their list by its full key, and a header cannot follow
    a move; readers look for a list along the path from that key up to the bucket's root
    (``integrity.list_key_candidates``), so a list may only move up that path, never sideways
    with the tree (trial AA: a directory moved, then a file moved out of it, gave EIO); and
    to the mount's root, not the source's parent, which the list would keep from being
    removed (trial AB)."""
    rest = key[len(old):]
    if is_tag_list(rest):
        return f"{root}{LIST_DIR}/{rest.rsplit('/', 1)[1]}"
    return new + rest


async def settle(logs: RenameLogs, store: ObjectStore, naming: Naming, files: RecoveredFiles) -> list[str]:
    """Undo or finish each rename an earlier run left (module doc), before the mount serves;
    ``naming``: the mount's path → key mapping; ``files``: the journal's files and the pending
    deletes (``Namespace``). Returns one notice per rename settled (the caller logs them:
    WARNING). A rename the store fails to settle is settled anyway when its copies are
    logged (:meth:`RecoveredFiles.settle_later`), else keeps its log (tried again at the next
    mount), logged; a log that makes no sense is removed, logged."""
    notices = []
    for entry in list(logs.left):
        old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
        what = f"the rename of {entry.source!r} to {entry.target!r} that an earlier run left unfinished"
        notice: str | None
        try:
            if entry.file:
                notice = await _settle_file(store, entry, naming.key(entry.source), naming.key(entry.target), files,
                                            what + " (a crash)")
            elif entry.deleting:
                kept = await _finish(store, entry, old, new, naming.prefix)
                files.move_recovered(entry)
                notice = (f"finished {what} (a crash)"
                          + (f"; {kept} object(s) stay at the old name (changed since, or their copy is gone)"
                             if kept else ""))
            elif entry.undone_until is not None:  # undone already: only its late copies are looked for
                logs.left.remove(entry)
                if watch(logs, entry, entry.undone_until):
                    log.info("still looking for %d copy(ies) the undone rename of %r to %r sent without an answer, "
                             "until %s", len(entry.late), entry.source, entry.target, _clock(entry.undone_until))
                else:
                    logs.end(entry)
                continue
            else:
                kept = await undo(store, entry, naming)
                notice = (f"undid {what} (a crash, or the store failing; the `mv` had failed)"
                          + (f"; {kept} object(s) stay at the new name (changed there since, or their original "
                             "is gone)" if kept else ""))
                logs.left.remove(entry)
                if watch_or_end(logs, entry, store, _last_written(entry.path)):
                    notice += (f"; {len(entry.late)} copy(ies) it sent without an answer may still land (e.g. "
                               f"{sorted(entry.late)[0]!r}): looked for until {_clock(logs.watched[-1].until)}, and "
                               "taken back")
                notices.append(notice)
                continue
        except (StoreError, FsError) as e:
            later = _settle_later(entry, naming)
            if later is None:
                log.error("%s cannot be settled now (%s); tried again at the next mount", what, e)
                continue
            finished, doomed, unsure = later
            try:
                files.settle_later(entry, doomed, finished)
            except (OSError, FsError) as err:
                log.error("%s cannot be settled now (%s, and the cache disk: %s); tried again at the next mount",
                          what, e, err)
                continue
            hidden = ("the original is" if entry.file else "the originals are") if finished else "its copies are"
            notice = (f"{'finished' if finished else 'undid'} {what} (a crash); the store failed ({e}): {hidden} "
                      "hidden and deleted once it answers")
            if unsure:  # sent, not logged: only the store can tell whether they landed
                notices.append(notice + f"; {len(unsure)} copy(ies) sent but not logged are looked for at the next "
                               f"mount (e.g. {sorted(unsure)[0]!r})")
                continue
        except Exception as e:  # a log no crash can write (edited, or a bug): it would stop every mount
            log.error("rename log %s makes no sense (%s: %s); removed, %s is left as it is", entry.path,
                      type(e).__name__, e, what)
            notice = None
        if notice is not None:
            notices.append(notice)
        logs.left.remove(entry)
        logs.end(entry)
    return notices


class RecoveredFiles(Protocol):
    """What :func:`settle` needs of the namespace (``Namespace`` is one)."""

    def move_recovered(self, rlog: RenameLog) -> int:
        """Move the journal's files at or below ``rlog.source`` to ``rlog.target``; how many."""

    def settle_later(self, rlog: RenameLog, doomed: dict[str, str], finished: bool) -> None:
        """Settle ``rlog`` (``finished``, else undone) with ``doomed`` (key → ETag) as
        pending deletes."""


def _settle_later(entry: RenameLog, naming: Naming) -> tuple[bool, dict[str, str], set[str]] | None:
    """How a rename the store fails to settle can be settled without it: (True, originals,
    {}) to finish it (its copies logged as landed: a file's one copy; a directory's after
    line 3, the originals whose copy is logged), (False, logged copies, copies sent but not
    logged) to undo it (a directory's cut off while copying that replaced no empty
    directory); None when it cannot."""
    if entry.file:
        old, new = naming.key(entry.source), naming.key(entry.target)
        return (True, {old: entry.objects[old]}, set()) if new in entry.copied and old in entry.objects else None
    old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
    if entry.deleting:
        return True, {k: e for k, e in entry.objects.items() if moved_key(k, old, new, naming.prefix) in entry.copied}, set()
    if entry.replaced is None:
        return False, dict(entry.copied), entry.started - set(entry.copied)
    return None


async def _settle_file(store: ObjectStore, entry: RenameLog, old: str, new: str, files: RecoveredFiles,
                       what: str) -> str | None:
    """Finish file rename ``entry`` (``old`` key to ``new``) if its copy landed, else leave
    it as it was (module doc); returns the notice, None when there was nothing to do (the
    copy was never sent; or the rename was done, its original gone and nothing journaled to
    move); ``what``: the rename, for the notice. Raises StoreError, FsError; KeyError for a log
    whose object is not ``old``."""
    etag = entry.objects[old]
    if new not in entry.started:
        return None  # cut off before its copy was sent: nothing changed
    there, original = await store.head(new), await store.head(old)
    logged = entry.copied.get(new)
    left = f"left {what} as it was: its copy is not at the new name (never landed, or changed since)"
    if there is None or (logged is not None and not same_etag(there.etag, logged)):
        return left
    kept = False
    if original is None:  # deleted by the crashed run (or another client) after the copy landed
        if logged is None:
            return left  # cannot tell whether what is at the new name is its copy
    elif same_etag(original.etag, etag):
        if not same_object(there, original):
            return left  # what is at the new name is not its copy (an empty object's ETag is every one's)
        try:
            await delete_version(store, old, etag, head=original)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept = True  # a newer version at the old name since the HEAD: kept (logged)
    elif logged is None:
        return left  # the original changed and the copy is not logged: cannot tell it is the copy
    else:
        kept = True  # the copy landed, then another client wrote the old name: theirs stays
    entry.drop_at_target = logged is None
    entry.deleting = True
    moved = files.move_recovered(entry)
    if original is None and not moved:
        return None  # the rename was done; only its log's end was not noted
    return f"finished {what}" + ("; a newer version stays at the old name" if kept else "")


async def same_list(store: ObjectStore, there: ObjectInfo, key: str, etag: str) -> bool:
    """Whether the tag list ``there``, found at the key a rename would move the list at ``key``
    (version ``etag``) to, holds the same bytes: the same ETag, else the same body (a local
    bucket gives each copy its own ETag; lists are small, and this is only asked when a rename
    meets a list that is at its new key already). False also when either changed or went since
    (the caller then keeps the original). Raises StoreError."""
    if same_etag(there.etag, etag):
        return True
    try:
        ours = await store.get_range(key, 0, there.size + 1, if_match=etag)
        theirs = await store.get_range(there.key, 0, there.size + 1, if_match=there.etag)
    except (NoSuchKey, PreconditionFailed):
        return False
    return ours == theirs


async def _finish(store: ObjectStore, entry: RenameLog, old: str, new: str, root: str) -> int:
    """Delete each original whose logged copy is still at the new name (and is its copy:
    :func:`same_object`), and each tag list whose copy was not made because that list was at
    its new key already (named by content, as the rename itself does: trial AB); ``root``:
    the mount's prefix (:func:`moved_key`). Returns how many stay."""
    kept = 0

    async def one(key: str, etag: str) -> None:
        nonlocal kept
        target = moved_key(key, old, new, root)
        copy = entry.copied.get(target)
        listed = await store.head(target) if copy is None and is_tag_list(key[len(old):]) else None
        if listed is not None and not await same_list(store, listed, key, etag):
            kept += 1  # other bytes there: one of the two is damaged, so both stay (the rename's WARNING)
            log.warning("the tag list %r stays where it is: %r holds other bytes: one of the two is damaged "
                        "(`ossfuse check --verify` names the files that fail)", key, target)
            return
        if listed is not None:
            try:
                await delete_version(store, key, etag)
            except FsError as e:
                if e.errno != errno.ESTALE:
                    raise
                kept += 1
            return
        there = await store.head(target) if copy is not None else None
        original = await store.head(key)
        if original is None:
            return
        if there is None or not same_etag(there.etag, copy) or (same_etag(original.etag, etag)
                                                                and not same_object(there, original)):
            kept += 1
            return
        try:
            await delete_version(store, key, etag, head=original)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept += 1  # a newer version at the old name: kept (logged)

    await run_all([functools.partial(one, k, e) for k, e in entry.objects.items()], SETTLE_PARALLEL)
    return kept


async def undo(store: ObjectStore, entry: RenameLog, naming: Naming) -> int:
    """Undo the copies of rename ``entry`` by the mount of ``naming`` (module doc); returns
    how many copies stay (changed at the new name since, or their original is gone). Raises
    StoreError, FsError."""
    by_target = _originals(entry, naming)
    kept = 0

    async def one(target: str) -> None:
        nonlocal kept
        copy_etag = entry.copied.get(target)
        there = await store.head(target)
        if there is None:  # never landed, or gone since; or, sent and not logged, it may land late
            if copy_etag is None:  # (a request is carried out up to indoubt.WINDOW after it was sent)
                entry.late.add(target)
            return
        key, etag = by_target.get(target, (None, None))
        stays = await _take_back(store, target, there, key, etag, copy_etag)
        kept += stays
        if stays and copy_etag is None and target == naming.dir_key(entry.target):
            # the marker's copy replaces what is there (the other copies are create-only): it
            # may still land over the replaced directory's marker (trial AF: it did, for good)
            entry.late.add(target)
            entry.late_over[target] = there

    entry.late, entry.late_over = set(), {}
    await run_all([functools.partial(one, t) for t in sorted(entry.started)], SETTLE_PARALLEL)
    await _put_back_replaced(store, entry, naming)
    marker = naming.dir_key(entry.target)
    if marker in entry.late and marker not in entry.late_over and (now := await store.head(marker)) is not None:
        entry.late_over[marker] = now  # (the marker put back just now)
    return kept


def _originals(entry: RenameLog, naming: Naming) -> dict[str, tuple[str, str]]:
    """Directory rename ``entry``'s new keys → (the original's key, its logged ETag)."""
    old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
    return {moved_key(key, old, new, naming.prefix): (key, etag) for key, etag in entry.objects.items()}


async def _put_back_replaced(store: ObjectStore, entry: RenameLog, naming: Naming) -> None:
    """Put back the marker of the empty directory undone rename ``entry`` replaced, if none is
    there. Raises StoreError."""
    new = naming.dir_key(entry.target)
    if entry.replaced is not None and await store.head(new) is None:
        await store.put_bytes(new, b"", entry.replaced)


async def _take_back(store: ObjectStore, target: str, there: ObjectInfo, key: str | None, etag: str | None,
                     copy_etag: str | None) -> int:
    """Delete ``there``, what an undone rename finds at ``target``: the copy of original
    ``key`` (logged ETag ``etag``; None: not one of the rename's), logged as ``copy_etag``
    (None: sent, not logged). Returns 1 when it stays (its original is gone, or it is not shown
    to be the original's copy, or it changed since), else 0. Raises StoreError, FsError."""
    original = await store.head(key) if key is not None else None
    if original is None:
        return 1  # the original is gone: the copy may be its only one
    if copy_etag is None and not (same_etag(original.etag, etag) and same_object(there, original)):
        return 1  # sent, not logged, and not shown to be a copy of the original: maybe another client's
    # a logged copy goes even when another client rewrote its original since: the old name
    # holds the newer version, and a stale copy left at the new name made coreutils' `mv`,
    # retrying, move the tree into it (a trial)
    try:
        await delete_version(store, target, copy_etag or there.etag, head=there)
    except FsError as e:
        if e.errno != errno.ESTALE:
            raise
        return 1  # changed at the new name since: kept (logged)
    return 0


@dataclass
class LateCopies:
    """The copies (new keys ``targets``) an undone directory rename ``entry`` sent without
    logging their landing and did not find: OSS may still carry such a request out until
    ``until`` (wall-clock seconds: :data:`indoubt.WINDOW` after the log's last line). Looked
    for again, at growing intervals (``step`` seconds, the next look at ``next_at``), and taken
    back if they land (:func:`look_for_late_copies`); the log stays until then, so a mount that
    ends sooner leaves them to the next (a trial: copies in flight at a ``kill -9`` landed after
    the next mount's undo, and stayed at the new name for good)."""

    entry: RenameLog
    targets: set[str]
    until: float
    next_at: float = 0.0
    step: float = LATE_FIRST_LOOK
    looked_at: float = 0.0  # wall clock of the last look (one near a lookup: at most once a second)
    # target → what held it when the watch began (the replaced directory's marker, put back): a
    # late copy there is a change from it; None: the user removed that directory since (its
    # marker is not put back after a late copy is taken back)
    over: dict[str, ObjectInfo | None] = field(default_factory=dict)


def watch_or_end(logs: RenameLogs, entry: RenameLog, store: ObjectStore, since: float | None = None) -> bool:
    """After :func:`undo` of ``entry``: watch its late copies (:class:`LateCopies`, the log
    stays) when some were not found and may still land, else end its log. ``since``: the
    wall-clock time its last copy was sent, by an earlier run (a crash: any copy sent and not
    logged may have been in flight; a local bucket's requests never land late, each is done
    when it returns); None: by this run, which knows which copies got no answer
    (``store.may_still_land``: a copy that failed with an answer, or was cancelled between
    attempts, will not land). True when watched."""
    if since is None:
        entry.late = {t for t in entry.late if store.may_still_land(t)}
        since = time.time()
    if store.local_disk or not entry.late or not watch(logs, entry, since + LATE_WINDOW):
        logs.end(entry)
        return False
    try:  # line 4: a later mount only looks for the late copies, never undoes it again (the
        # logged copies' ETags match what a user makes there since: every empty object's; trial AE)
        entry.append_closed({"undone": True, "late": sorted(entry.late), "until": entry.undone_until})
    except OSError as e:
        log.warning("rename log %s: cannot note that the rename of %r was undone (%s); a later mount undoes it "
                    "again", entry.path, entry.source, e)
    return True


def watch(logs: RenameLogs, entry: RenameLog, until: float) -> bool:
    """Look for ``entry.late`` until ``until`` (wall clock), if that is still to come (True);
    else False (the caller ends the log)."""
    if time.time() >= until:
        return False
    logs.leave(entry)  # (this run's: its log file is closed, and stays)
    entry.undone_until = until
    logs.watched.append(LateCopies(entry, set(entry.late), until, time.time() + LATE_FIRST_LOOK,
                                   over=dict(entry.late_over)))
    return True


def _write_line(fd: int, rec: dict) -> None:
    """``rec`` as one log line, by one ``write(2)`` starting with its newline (module doc), to
    the kernel at once: a crash of the daemon keeps it (not fsynced). Raises OSError, also for
    a short write."""
    data = ("\n" + json.dumps(rec)).encode()
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write")


def _clock(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


async def look_for_late_copies(logs: RenameLogs, store: ObjectStore, naming: Naming, locks: NameLocks,
                               near: str | None = None) -> int:
    """One look for the late copies of the watched renames (:class:`LateCopies`) that are due,
    or, with ``near`` (a path a lookup or listing is about), of those whose target is at, above
    or below it (above or below: at most once a second, for a listing's many lookups) (a copy
    that landed between two looks showed its directory, and coreutils' `mv` moved the tree
    *into* it: trial AE). See :func:`_look`.
    A rename whose window ended (or whose copies all landed) ends its log. Returns how many
    copies were taken back."""
    taken = 0
    now = time.time()
    for late in list(logs.watched):
        if near is None:
            if now < late.next_at:
                continue
            late.step = min(late.step * 2, LATE_LAST_STEP)
            late.next_at = now + late.step
        elif not (_within(near, late.entry.target) or _within(late.entry.target, near)) \
                or (near != late.entry.target and now - late.looked_at < NEAR_INTERVAL):
            continue  # (the target itself, what `mv` stats, is looked at every time)
        late.looked_at = now
        taken += await _look(late, store, naming, locks)
        if late in logs.watched and (not late.targets or time.time() >= late.until):
            logs.watched.remove(late)
            logs.end(late.entry)
    return taken


async def _look(late: LateCopies, store: ObjectStore, naming: Naming, locks: NameLocks) -> int:
    """A HEAD of each of ``late``'s targets; those that landed are taken back when they are
    their original's copies (:func:`_take_back`, which needs the same object: a directory or
    empty file made there since is not one), under the rename's tree locks (no rename of those
    paths runs meanwhile: a retried `mv` that moved the tree took its originals away, and its
    copies stay), one line for all; either way a key that landed is no longer looked for. The
    replaced empty directory's marker goes back only when a late copy of the marker itself was
    taken back (not when the user removed that directory since: trial AE). A store that fails
    leaves the look to the next time (INFO). Returns how many were taken back."""
    entry = late.entry
    back: list[str] = []
    stay: list[str] = []
    try:
        seen: dict[str, ObjectInfo | None] = {}

        async def head(t: str) -> None:
            seen[t] = await store.head(t)
        # at once, not one after another (trial AF: a lookup of the new name waited 16 HEADs)
        await run_all([functools.partial(head, t) for t in late.targets], SETTLE_PARALLEL)
        for t, was in list(late.over.items()):
            now = seen.get(t)
            if now is None:
                late.over[t] = None  # removed since: a late copy there is taken back, not replaced
            elif was is not None and same_etag(now.etag, was.etag) and same_object(now, was):
                seen[t] = None  # what was there at the start: nothing landed yet
        landed = sorted(t for t, there in seen.items() if there is not None)
        if not landed:
            return 0
        async with locks.hold(trees=[entry.source, entry.target]):
            by_target = _originals(entry, naming)
            for target in landed:
                there = await store.head(target)
                if there is None:
                    continue
                key, etag = by_target.get(target, (None, None))
                (stay if await _take_back(store, target, there, key, etag, None) else back).append(target)
                late.targets.discard(target)
            marker = naming.dir_key(entry.target)
            if marker in back and late.over.get(marker, True) is not None:
                await _put_back_replaced(store, entry, naming)
    except (StoreError, FsError) as e:
        log.info("looking for late copies of the rename of %r to %r failed (%s); looked for again later",
                 entry.source, entry.target, e)
    if back or stay:  # line 4 again, with what is left to look for (the last one counts)
        try:
            entry.append_closed({"undone": True, "late": sorted(late.targets), "until": late.until})
        except OSError as e:
            log.info("rename log %s: cannot note the copies left to look for (%s)", entry.path, e)
    if back:
        log.warning("%d copy(ies) the undone rename of %r to %r had sent without an answer landed late (e.g. %r): "
                    "taken back", len(back), entry.source, entry.target, back[0])
    if stay:
        log.info("%d key(s) the undone rename of %r to %r had sent copies to hold something else now (e.g. %r: "
                 "moved or removed since, or made anew): left alone", len(stay), entry.source, entry.target, stay[0])
    return len(back)


def _within(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or below it ("" is the root)."""
    return tree == "" or path == tree or path.startswith(tree + "/")


def _last_written(path: str) -> float:
    """Wall-clock seconds of the last line written to the log at ``path`` (its mtime; now when
    it cannot be read: the longest watch)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def same_object(a: ObjectInfo, b: ObjectInfo) -> bool:
    """Whether ``a`` is a copy of ``b``: the same wrapped data key (unique to one encrypted
    object; a CopyObject keeps the metadata); for objects with none (not encrypted), the same
    ETag (OSS's CopyObject keeps it) and the same metadata (a rename's copy keeps it whole).
    Not the ETag alone: every empty object's is the MD5 of nothing (a trial: an empty file was
    taken for another's copy; a directory made where an undone rename's marker copy may still
    land has the same empty body, not the same mtime)."""
    ka, kb = a.metadata.get(env.H_KEY), b.metadata.get(env.H_KEY)
    if ka is not None or kb is not None:
        return ka == kb
    return same_etag(a.etag, b.etag) and a.metadata == b.metadata
