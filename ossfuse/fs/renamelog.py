"""The rename logs: what a rename in progress writes down, so that the next mount undoes or
finishes one a crash cut off (``fs/renames.py`` reads them; ``fs/latecopies.py`` watches the
copies of an undone one that may still land).

Each directory rename keeps a log, ``<cache dir>/renames/<random>.log``, JSON lines appended as
it goes and not fsynced (docs/design.md "Durability": a crash of the daemon keeps it, a power
loss may not):

1. ``{"from": old path, "to": new path, "objects": {key: ETag}, "replaced": {metadata} | null}``
   before the store is changed: every object below the old name and the version of it the
   rename copies; the marker metadata of the empty directory the rename replaces, if any;
2. ``{"copying": new key}`` before each copy is sent, ``{"copied": new key, "etag": the
   copy's ETag}`` once it has landed (a copy in flight when the daemon dies may land after:
   a trial found such copies left behind);
3. ``{"deleting": true}`` once every copy has landed;
4. ``{"undone": true, "late": [new keys], "until": wall-clock seconds}`` once it was undone with
   copies sent without an answer not found (:class:`LateCopies`): a later mount only looks for
   those until then, and never undoes it again (a file rename's, with ``"replacing": true``
   when its copy replaces an object there — false again once that object is gone —,
   ``"key"``, the wrapped data key of the version it copies, when known, ``"written"``,
   what this mount wrote at the new name since: an ETag, or "" for a delete, and
   ``"original": [key, ETag]`` with ``"source"`` when this mount moved the original since);

and the log goes when the rename is done in memory too. Each line is written whole by one
``write(2)`` and starts with its newline, so a line torn by a full disk or a crash stands
alone: the reader skips it. A log is read by its lines, not its file name; a line of a shape
no run writes makes the whole log one ERROR line, and it is removed.

A **file** rename keeps the same lines, its header marked ``"file": true``, with no line 3 (and
line 4 when its copy got no answer and was not found: ``Namespace._move_file``).
File renames are many and short, and creating and removing a file costs ~0.4 ms on an ext4
cache disk (twice the rename itself on a local bucket), so they share one log per run,
``<cache dir>/renames/files-<random>.log``: each line carries the rename's ``"id"``, and
``{"id": …, "end": true}`` closes it; the file is emptied when no file rename is under way and
it has grown past 64 KiB, and removed at unmount. A file rename whose copy is watched for
minutes (line 4) moves its lines to a log of its own first (:meth:`RenameLogs.detach`), so the
shared one can still be emptied.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import uuid
from dataclasses import dataclass, field

from ..integrity import LIST_DIR, is_tag_list
from ..store.base import ObjectInfo
from .errors import FsError

log = logging.getLogger(__name__)

SHARED_PREFIX = "files-"  # the shared log of one run's file renames (module doc)
SHARED_TRUNCATE = 64 * 1024  # bytes: past this, the shared log is emptied once no file rename is under way
LATE_FIRST_LOOK = 5.0  # seconds: first look for a late copy (LateCopies), then twice as long each time


@dataclass
class RenameLog:
    """One rename's log (module doc): ``source`` and ``target`` paths, ``objects`` (old key →
    ETag copied), ``replaced`` (marker metadata of the replaced empty directory), ``file`` (a
    file's rename, not a directory's), ``started`` (new keys whose copy was sent), ``copied``
    (new key → the copy's ETag), ``deleting`` (every copy landed), ``drop_at_target`` (set by
    ``renames.settle`` for ``move_recovered``: a journaled version at the target path is the
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
    # a file rename's copy replaces an object at the new name (landing late, it finishes the
    # rename: latecopies._look_file; line 4)
    replacing: bool = False
    # a file rename's: the wrapped data key of the version it copies, which tells its copy
    # (latecopies.is_its_copy; line 4); None: not known (compared with the original then)
    copy_key: str | None = None
    # a file rename's: what this mount last wrote at the new name after the copy was given up
    # on (an ETag, or "" for a delete; ObjectStore.on_write_after_doubt), noted in line 4 so a
    # later mount knows it too (trial AL: a remount forgot it and finished the rename); None: nothing
    written_after: str | None = None
    # a file rename's: (size in bytes, user metadata) of that version (latecopies.written_now),
    # in line 4 too: a later mount that never looked the file up puts it
    # back from the block cache with them (Commit.put_back; break trial BT14 3: an ERROR, the
    # version lost); None: not known (a delete; written before this field)
    written_version: tuple[int, dict[str, str]] | None = None
    # a file rename's original was moved by this mount since (RenameLogs.follow): ``objects``
    # and ``source`` say where it is now (line 4's "original" and "source")
    moved: bool = False
    id: str | None = None
    _fd: int | None = None  # open (O_APPEND) while this run's rename goes on (a shared log: not its own)
    _failing: bool = False

    def named(self) -> str:
        """The rename, for a log line: "of 'a' to 'b'", or, once this mount moved the original
        (``moved``: ``source`` is where it went), "to 'b' (its file moved to 'c' since)"."""
        if self.moved:
            return f"to {self.target!r} (its file moved to {self.source!r} since)"
        return f"of {self.source!r} to {self.target!r}"

    def _append(self, rec: dict) -> None:
        """Write ``rec`` as one line (module doc). Raises OSError, also for a short write."""
        assert self._fd is not None
        _write_line(self._fd, {"id": self.id, **rec} if self.id is not None else rec)

    def append_closed(self, rec: dict) -> None:
        """:meth:`_append` to the rename's log once this rename no longer holds it open (line
        4, ``watch_or_end``; a file rename's line carries its id). Raises OSError."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_line(fd, {"id": self.id, **rec} if self.id is not None else rec)
        finally:
            os.close(fd)

    def line4(self, late: set[str], until: float | None) -> dict:
        """Line 4 (module doc): ``late`` looked for until ``until``, with what a file rename's
        watch knows (``replacing``, ``copy_key``, ``written_after``, and its original when this
        mount moved it since: ``follow``)."""
        line: dict = {"undone": True, "late": sorted(late), "until": until}
        if self.replacing:
            line["replacing"] = True
        if self.copy_key is not None:
            line["key"] = self.copy_key
        if self.written_after is not None:
            line["written"] = self.written_after
        if self.written_version is not None:
            line["written_version"] = {"size": self.written_version[0], "metadata": self.written_version[1]}
        if self.moved:
            [(key, etag)] = self.objects.items()
            line.update(original=[key, etag], source=self.source)
        return line

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
    construction), for ``renames.settle``. This run's file renames share one log (module doc)."""

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
            elif entry.id is not None:  # the shared log stays for another of its renames: this
                try:  # one is not settled again by the next mount (trial AI: a false notice)
                    entry.append_closed({"end": True})
                except OSError as e:
                    log.info("rename log %s: cannot note the end of the rename of %r (%s)", entry.path,
                             entry.source, e)
        elif entry.id is None:
            self.leave(entry)
            _unlink(entry.path)
        elif entry.id in self._open_ids and self._shared is not None:
            # (also one left, then watched: an undone file rename whose copy may land late)
            self._open_ids.discard(entry.id)
            entry._fd = self._shared
            try:
                entry._append({"end": True})
                if not self._open_ids and os.fstat(entry._fd).st_size > SHARED_TRUNCATE:
                    os.ftruncate(entry._fd, 0)  # no rename in it is under way: none is lost
            except OSError as e:  # the next mount settles it again (finds it done: nothing to do)
                log.warning("rename log %s: cannot note the end of the rename of %r (%s)", entry.path,
                            entry.source, e)
            entry._fd = None

    def follow(self, key: str, new_key: str, etag: str, path: str) -> None:
        """Object ``key`` was moved by this mount to ``new_key`` (version ``etag``, at ``path``):
        a watched file rename whose original it was now compares its late copy with the moved
        one (trial AI: a directory rename moved the original while its late copy landed, and
        the watch, finding no original, left the copy); noted in its line 4."""
        for late in self.watched:
            entry = late.entry
            if entry.file and key in entry.objects:
                entry.objects, entry.source = {new_key: etag}, path  # (maybe onto the watched name
                # itself: then it is no copy, latecopies.is_its_copy; trial AK: it was deleted)
                entry.moved = True
                late.note_left()  # (so a later mount knows: trial AM, it took the moved file for the copy)

    def detach(self, entry: RenameLog) -> None:
        """This run's file rename ``entry``, about to be watched for minutes, moves its lines
        from the shared log to a log of its own (as a directory rename's): the shared one is
        emptied only when no rename in it is open (trial AK: 1,300 renames during one watch
        grew it to 349 KB). Kept where it is if the cache disk refuses (one INFO line)."""
        if entry.id is None or entry.path != self._shared_path or entry.id not in self._open_ids:
            return
        path = os.path.join(self.dir, uuid.uuid4().hex + ".log")
        lines: list[dict] = [{"from": entry.source, "to": entry.target, "objects": entry.objects, "file": True},
                 *({"copying": k} for k in sorted(entry.started - set(entry.copied))),
                 *({"copied": k, "etag": e} for k, e in sorted(entry.copied.items()))]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                for rec in lines:
                    _write_line(fd, rec)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink(path)
            log.info("rename log %s: the watched rename of %r stays in the shared log (%s)", path, entry.source, e)
            return
        self.end(entry)  # (its lines in the shared log end: the next mount reads its own log)
        entry.path, entry.id = path, None

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
            and isinstance(rec.get("late"), list) and all(isinstance(k, str) for k in rec["late"]) \
            and isinstance(rec.get("replacing", False), bool) and isinstance(rec.get("key", ""), str) \
            and isinstance(rec.get("written", ""), str) and isinstance(rec.get("source", ""), str) \
            and (rec.get("original") is None or (isinstance(rec["original"], list) and len(rec["original"]) == 2
                                                 and all(isinstance(k, str) for k in rec["original"]))):
        entry.undone_until = float(rec["until"])
        entry.late = set(rec["late"])
        entry.replacing = rec.get("replacing", False)
        entry.copy_key = rec.get("key")
        entry.written_after = rec.get("written")
        entry.written_version = _version_of(rec.get("written_version"))
        if rec.get("original") is not None:
            entry.objects, entry.moved = {rec["original"][0]: rec["original"][1]}, True
            entry.source = rec.get("source", entry.source)
    else:
        raise _Nonsense(f"a line of another shape: {json.dumps(rec)[:80]!r}")


def _version_of(doc: object) -> tuple[int, dict[str, str]] | None:
    """Line 4's ``written_version`` as (size, metadata); None when absent or of another shape
    (the put-back then says it cannot, as before the field)."""
    if not isinstance(doc, dict):
        return None
    size, meta = doc.get("size"), doc.get("metadata")
    if not isinstance(size, int) or size < 0 or not isinstance(meta, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return None
    return size, meta


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # left, the next mount would settle this rename again
        log.error("cannot remove rename log %s (%s): remove it by hand before the next mount", path, e)

def _write_line(fd: int, rec: dict) -> None:
    """``rec`` as one log line, by one ``write(2)`` starting with its newline (module doc), to
    the kernel at once: a crash of the daemon keeps it (not fsynced). Raises OSError, also for
    a short write."""
    data = ("\n" + json.dumps(rec)).encode()
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write")


@dataclass
class LateCopies:
    """The copies (new keys ``targets``) an undone rename ``entry`` sent without
    logging their landing and did not find: OSS may still carry such a request out until
    ``until`` (wall-clock seconds: :data:`indoubt.WINDOW` after the log's last line). Looked
    for again, at growing intervals (``step`` seconds, the next look at ``next_at``), and taken
    back if they land (``latecopies.look_for_late_copies``); the log stays until then, so a mount that
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
    # a file rename's: (ETag, wall clock) of another client's version a look last saw at the
    # new name over this mount's later one (latecopies._look_file: landing, the copy destroys it)
    foreign: tuple[str, float] | None = None
    # a file rename's: ETag (upper case, unquoted) → (size, user metadata) of each version this
    # mount wrote at the new name (latecopies.written_now: a copy of one of them, e.g. a
    # directory moved away and back, is known by its ETag)
    versions: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)

    def note_left(self) -> None:
        """Line 4 again (``RenameLog.line4``), with what is left to look for and what the watch
        knows now (the last line 4 counts)."""
        try:
            self.entry.append_closed(self.entry.line4(self.targets, self.until))
        except OSError as e:
            log.info("rename log %s: cannot note the copies left to look for (%s)", self.entry.path, e)


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
