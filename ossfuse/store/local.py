"""A directory that behaves like an OSS bucket: the embedded default store and the fast
test backend.

Layout under the root directory::

    index.sqlite        one row per object: key, size, etag, mtime, user metadata, blob name
    blobs/XX/<uuid>     object bodies, immutable once written (a copy to another key is a hard
                        link; a copy onto itself, a metadata change, keeps the row's blob)
    empty               a 0-byte file: the blob of every empty body is a hard link of it
    uploads/<id>/       unfinished multipart uploads: meta.json and one file per part
    tmp/                bodies being written

Any OSS key (1–1023 UTF-8 bytes, ``a`` and ``a/`` side by side, ``a//b``) is a row, never a
path, so no key can escape the directory. A write lands in ``tmp/``, is renamed into
``blobs/`` and only then committed to the index in one SQLite transaction: a crash leaves either
the old object or the new one, never half of one. ETags are random per write (OSS only promises
that an ETag changes when the content does). SQLite in WAL mode lets the daemon and a test
process use one bucket at once.

Durability (docs/design.md "Durability"), like a local disk's: every change is in the kernel
(written, renamed, committed to the SQLite WAL) before its call returns, so it survives a crash
of the process; none is fsynced on its own (SQLite ``synchronous=NORMAL`` in WAL mode, bodies
and directories not fsynced). :meth:`LocalStore.sync` is the barrier: ``syncfs(2)`` of the
store's filesystem makes every change acknowledged before it survive a power loss (the daemon
calls it before ``fsync()`` and unmount return). A power loss before it may lose the latest
changes: SQLite rolls back to a consistent index, and a row whose body the disk lost reads as
``EIO`` through the integrity tags, never as other bytes. Multipart parts (large files, rare
here) are still fsynced one by one. A body no row names any more (deleted or replaced) is
unlinked by a background thread after the index commit, not by the call (``rm -rf``: freeing a
file's blocks cost as much as the rest of a delete); a crash before that leaves an unreferenced
blob, which ``remove_orphans`` deletes at a later mount.

Safety (the directory holds names, sizes and wrapped data keys): it is created 0700 with its
files 0600, whatever the umask; an existing one must be a directory owned by the user opening it
and not writable by group or others (else ValueError naming the path and the fix), a root dir
readable by others is tightened to 0700 (one INFO line); its entries are never symlinks (files are
opened with ``O_NOFOLLOW``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import sys
import threading
import time
import uuid
from typing import Callable, Iterator
from urllib.parse import urlparse

import trio

from .base import (AlreadyExists, DestinationChanged, ListPage, MultipartUploads, NoSuchKey, ObjectInfo, ObjectStore,
                   PreconditionFailed, StoreError, etag_norm, same_etag)

log = logging.getLogger(__name__)

_ORPHAN_AGE = 3600.0  # seconds before an unreferenced blob (crash leftover) is removed
_REAP_BATCH_S = 0.05  # seconds a queued blob waits for others before the reaper unlinks the batch
_SUBDIRS = ("blobs", "uploads", "tmp")
# A directory marker is an empty object, written again at every mkdir, chmod and utime of its
# directory: its blob is a new hard link of this file, not a new file (a new inode cost ~100 us
# here, up to 1 ms on a cold disk cache, a link ~10 us: bench/RESULTS.md, thirtieth session).
# To any reader it is a blob like the others.
_EMPTY = "empty"
_INLINE_WRITE_MAX = 1 << 20  # bytes: a put this small (a link, or a copy if on another disk) runs on the event loop
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _open_new(path: str) -> int:
    """Create ``path`` (0600, must not exist, never through a symlink) for writing; an fd."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)


def _open_read(path: str) -> int:
    """Open ``path`` read-only, refusing a symlink (ELOOP); an fd."""
    return os.open(path, os.O_RDONLY | _NOFOLLOW)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _libc_syncfs(fd: int) -> int:
    """syncfs(2) (Linux; the os module has only sync()): 0, or -1 with errno set."""
    return _LIBC.syncfs(fd)


def _fsync_dir(path: str) -> None:
    """fsync a directory, so a rename or create in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_private(path: str) -> bool:
    """Create directory ``path`` 0700 (umask ignored); False if it existed (then it must be a
    real directory, not a symlink: else ValueError)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"local store: {path} is not a directory (a symlink or file was put there); "
                             "remove it") from None
        return False
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return True


def check_private_dir(path: str, what: str = "local store") -> None:
    """Refuse a directory another user could change: ValueError naming ``path`` and the fix
    when it is not owned by this process's effective user or is writable by group or others."""
    st = os.stat(path)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ValueError(f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid}); "
                         f"another user could change its contents: use a directory of your own "
                         f"(or run: chown {uid} {path})")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise ValueError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may write "
                         f"to it; run: chmod 700 {path}")


class _SourceChanged(Exception):
    """A copy's source row changed between linking its blob and committing the copy."""


@contextlib.contextmanager
def _removed_on_failure(tmp: str) -> Iterator[None]:
    """Delete the temporary body ``tmp`` if the block fails (ENOSPC mid-write, a failed commit):
    a partial body left in ``tmp/`` keeps a full disk full, and ``remove_orphans`` only clears
    hour-old files at mount."""
    try:
        yield
    except BaseException:
        try:
            os.unlink(tmp)
        except (FileNotFoundError, NotADirectoryError):
            pass  # never created (also: tmp/ itself is gone or not a directory), or already
            # renamed into blobs/ (and removed by _commit)
        except OSError as e:
            log.warning("local store: cannot remove temporary body %s (%s)", tmp, e)
        raise


def _validate_key(key: str) -> None:
    """OSS InvalidObjectName rules: 1–1023 UTF-8 bytes, not starting with '/' or '\\'."""
    n = len(key.encode("utf-8"))
    if not 1 <= n <= 1023 or key[0] in "/\\":
        raise StoreError(f"invalid object name {key[:40]!r}: 1-1023 bytes, not starting with / or \\", key=key)


class BucketMissing(ValueError):
    """The bucket directory of a LocalStore does not exist and is not to be made."""


def _rollback(db: sqlite3.Connection) -> None:
    """End the failed transaction of ``db``, if it is still open: SQLite rolls back by itself on
    some errors (SQLITE_FULL of a full disk), and a ROLLBACK then raises "no transaction is
    active", which hid the disk-full cause (EIO, not ENOSPC: a trial)."""
    if db.in_transaction:
        db.execute("ROLLBACK")


class LocalStore(ObjectStore):
    """Bucket in a local directory; see the module doc for its layout and guarantees."""

    listing_has_metadata = True  # the index row holds it: no HEAD per entry for ls -l
    local_disk = True
    checks_replaces = True

    def __init__(self, root: str, *, threads: int = 8, max_copy_size: int | None = None, create: bool = True):
        """``create``: make ``root`` when it is missing (its parent must exist); False: a
        missing ``root`` raises BucketMissing. Raises ValueError for a missing parent, a
        symlink to nothing (BucketMissing) and a non-empty directory that is not a bucket
        (taking it over would mix the index's files into someone's directory)."""
        self.root = os.path.abspath(root)
        self.max_copy_size = max_copy_size  # None: copies are hard links, of any size
        parent = os.path.dirname(self.root)
        if not os.path.isdir(parent):
            # never made: a missing parent is most likely a disk that is not mounted, and a new
            # empty bucket on the disk below would take the writes meant for it
            raise ValueError(f"local store {self.root}: its parent directory {parent} does not exist (is the "
                             f"disk that holds it mounted?); create it first for a new bucket")
        if os.path.islink(self.root) and not os.path.exists(self.root):
            raise BucketMissing(f"local store {self.root} is a symlink to {os.readlink(self.root)}, which does not "
                                f"exist (is the disk that holds it mounted?)")
        if not create and not os.path.exists(self.root):
            raise BucketMissing(f"local store {self.root} does not exist")
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ValueError(f"local store {self.root} is not a directory")
        if os.path.isdir(self.root) and not self._is_bucket_or_empty(self.root):
            raise ValueError(f"local store {self.root} is a directory of other files, not a bucket (it has no "
                             f"index.sqlite): name a new or empty directory")
        try:
            os.mkdir(self.root, 0o700)
            os.chmod(self.root, 0o700)  # mkdir's mode is masked by the umask
            log.info("local store %s: created (a new, empty bucket)", self.root)
        except FileExistsError:
            pass  # the root itself may be a symlink to a directory: the user named it
        check_private_dir(self.root)
        mode = stat.S_IMODE(os.stat(self.root).st_mode)
        if mode & 0o077:
            os.chmod(self.root, 0o700)
            log.info("local store %s: mode %04o tightened to 0700 (it holds names and wrapped keys)", self.root, mode)
        for sub in _SUBDIRS:
            _mkdir_private(os.path.join(self.root, sub))
        self._db_path = os.path.join(self.root, "index.sqlite")
        # created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the same
        # mode); an existing one of an older version is tightened
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            path = os.path.join(self.root, name)
            try:
                fd = os.open(path, os.O_RDWR | _NOFOLLOW | (os.O_CREAT if name == "index.sqlite" else 0), 0o600)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ValueError(f"local store {path}: cannot open: {e.strerror} (a symlink there is refused)") from None
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        self._local = threading.local()
        self._unused: list[str] = []  # blobs no row names any more, to unlink (see _unlink_blob)
        self._unused_lock = threading.Condition()
        self._reaper: threading.Thread | None = None
        self._reaping = threading.Lock()
        self._limiter = trio.CapacityLimiter(threads)
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                   " etag TEXT NOT NULL, mtime REAL NOT NULL, meta TEXT NOT NULL, blob TEXT NOT NULL)")
        db.commit()

    @staticmethod
    def _is_bucket_or_empty(root: str) -> bool:
        """Whether ``root`` holds a bucket's index, or nothing but this layout's own names (a
        new bucket, or one whose making was cut short)."""
        with os.scandir(root) as entries:
            names = {e.name for e in entries}
        own = set(_SUBDIRS) | {_EMPTY, "index.sqlite", "index.sqlite-wal", "index.sqlite-shm"}
        return "index.sqlite" in names or names <= own

    @staticmethod
    def root_of(url: str) -> str:
        """The bucket directory (absolute) of ``local:///abs/path``."""
        parsed = urlparse(url)
        return os.path.abspath(parsed.netloc + parsed.path if parsed.netloc else parsed.path)

    # -- plumbing ---------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._db_path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            # WAL commits reach the kernel, not the disk: a crash of the process loses nothing,
            # a power loss at most the commits since the last sync() (the index stays consistent)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (OSError, sqlite3.Error) as e:  # a full or failing disk is a store failure
            raise StoreError(f"local store {self.root}: {e}") from e

    async def _run_write(self, fn, *args):
        """Run a small write (``fn(*args)``: a few metadata calls and one index transaction,
        nothing fsynced, see the module doc) on the event loop: two thread hand-offs cost more
        than the write itself (issue 14: create, rm and rename of small files). Only while the
        index's write lock is free: if another process holds it (SQLITE_BUSY at once, no
        waiting on the loop), the write is done again in a worker thread, which waits for it
        (``fn`` leaves nothing behind when its transaction cannot begin)."""
        db = self._db()
        db.execute("PRAGMA busy_timeout=0")
        try:
            return fn(*args)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StoreError(f"local store {self.root}: {e}") from e
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"local store {self.root}: {e}") from e
        finally:
            db.execute("PRAGMA busy_timeout=30000")
        return await self._run(fn, *args)

    def _run_inline(self, fn, *args):
        """Run a point read of the index on the event loop: a WAL-mode SQLite read never waits
        for writers and takes microseconds, less than handing it to a thread would."""
        try:
            return fn(*args)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"local store {self.root}: {e}") from e

    def _blob_path(self, blob: str) -> str:
        return os.path.join(self.root, "blobs", blob[:2], blob)

    def _row(self, key: str):
        return self._db().execute(
            "SELECT key, size, etag, mtime, meta, blob FROM objects WHERE key=?", (key,)).fetchone()

    @staticmethod
    def _info(row) -> ObjectInfo:
        # metadata names (and short values: algorithms, mode, uid) are the same in most rows:
        # one shared string each, not a copy per cached version (issue 14: bytes per inode)
        return ObjectInfo(row[0], row[1], row[2], row[3],
                          {sys.intern(k): sys.intern(v) if len(v) <= 32 else v
                           for k, v in json.loads(row[4]).items()}, time.time())

    def _new_tmp(self) -> str:
        return os.path.join(self.root, "tmp", uuid.uuid4().hex)

    def _commit(self, key: str, tmp: str, size: int, meta: dict[str, str],
                check: Callable[[sqlite3.Connection], None] | None = None) -> ObjectInfo:
        """Move a complete body into blobs/ and point ``key`` at it, atomically (nothing
        fsynced: :meth:`sync` is the barrier). ``check(db)`` runs inside the index transaction
        before the row is written (a copy's source condition); whatever it raises undoes
        everything."""
        _validate_key(key)
        blob = uuid.uuid4().hex
        dest = self._blob_path(blob)
        try:
            os.rename(tmp, dest)
        except FileNotFoundError:  # the first blob under this two-digit directory
            _mkdir_private(os.path.dirname(dest))
            os.rename(tmp, dest)
        return self._commit_row(key, blob, size, meta, check)

    def _empty_blob(self) -> str:
        """A new blob holding an empty body: a hard link of the root's :data:`_EMPTY` file,
        which is made when missing, and replaced by a new one when it has as many links as the
        filesystem allows (ext4: 65,000) or is not empty (someone wrote into it: the bodies
        linked to it are read by their rows' size, 0, and stay empty). A filesystem that makes
        no hard links gets a new empty file per body, as before. Raises OSError."""
        blob = uuid.uuid4().hex
        dest = self._blob_path(blob)
        source = os.path.join(self.root, _EMPTY)
        for _ in range(4):
            try:
                if os.stat(source, follow_symlinks=False).st_size == 0:
                    os.link(source, dest)
                    return blob
            except FileNotFoundError:
                if not os.path.isdir(os.path.dirname(dest)):
                    _mkdir_private(os.path.dirname(dest))  # the first blob under this directory
                    continue
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):  # no hard links here
                    break
                if e.errno != errno.EMLINK:
                    raise
            tmp = self._new_tmp()  # missing, full or not empty: a new one, renamed into place
            os.close(_open_new(tmp))
            os.rename(tmp, source)
        tmp = self._new_tmp()  # a file of its own
        with _removed_on_failure(tmp):
            os.close(_open_new(tmp))
            try:
                os.rename(tmp, dest)
            except FileNotFoundError:  # the first blob under this two-digit directory
                _mkdir_private(os.path.dirname(dest))
                os.rename(tmp, dest)
        return blob

    def _commit_row(self, key: str, blob: str, size: int, meta: dict[str, str],
                    check: Callable[[sqlite3.Connection], None] | None = None) -> ObjectInfo:
        """Point ``key`` at ``blob`` (already in blobs/, this row's alone) in one index
        transaction; the blob is removed when the transaction fails. ``check`` as for
        :meth:`_commit`."""
        dest = self._blob_path(blob)
        meta = {k.lower(): v for k, v in meta.items()}  # OSS lower-cases user-metadata names
        info = ObjectInfo(key, size, uuid.uuid4().hex.upper(), time.time(), meta)
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except BaseException:
            os.unlink(dest)  # not committed: the blob must not stay (a retry links a new one)
            raise
        try:
            if check is not None:
                check(db)
            old = db.execute("SELECT blob FROM objects WHERE key=?", (key,)).fetchone()
            db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                       (key, size, info.etag, info.mtime, json.dumps(meta), blob))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            os.unlink(dest)
            raise
        if old:
            self._unlink_blob(old[0])
        return info

    def _unlink_blob(self, blob: str) -> None:
        """Remove a blob no row points at any more, soon: a background thread unlinks it
        (freeing a file's blocks costs as much as the rest of a delete, issue 14: ``rm -rf``);
        :meth:`aclose` and :meth:`reap_unused_blobs` finish the queue. Never fails: the change
        that dropped it is committed, and a blob left by a crash before its unlink is removed
        by ``remove_orphans``."""
        with self._unused_lock:
            self._unused.append(blob)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap_loop, name="local-store-unlink", daemon=True)
                self._reaper.start()
            elif len(self._unused) == 1:  # a batch starts: wake the reaper once for all of it
                self._unused_lock.notify()

    def _reap_loop(self) -> None:
        """The background unlinker: runs while blobs are queued (and 1 s after), then exits.
        It takes the queue in batches, _REAP_BATCH_S apart: a wake-up per blob made the event
        loop and this thread trade the GIL once per delete (issue 14: ``rm -rf``, a fifth of
        the daemon's time in futex calls)."""
        while True:
            with self._unused_lock:
                if not self._unused:
                    self._unused_lock.wait(1.0)
                    if not self._unused:
                        self._reaper = None
                        return
            time.sleep(_REAP_BATCH_S)  # let the batch grow, the GIL stays with the loop
            self.reap_unused_blobs()

    def reap_unused_blobs(self) -> int:
        """Unlink every blob queued by :meth:`_unlink_blob` now (in the calling thread); returns
        how many were queued. A blob that cannot be removed is logged and left to
        ``remove_orphans``."""
        with self._reaping:  # a second caller returns once the first one's batch is gone too
            with self._unused_lock:
                blobs, self._unused = self._unused, []
            for blob in blobs:
                try:
                    os.unlink(self._blob_path(blob))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("local store %s: cannot remove unused blob %s (%s); left for remove_orphans",
                                self.root, blob, e)
        return len(blobs)

    async def aclose(self) -> None:
        """Finish the queued blob unlinks (in a worker thread)."""
        await trio.to_thread.run_sync(self.reap_unused_blobs)

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        """Create ``path`` (0600, not through a symlink) with ``data`` (not fsynced)."""
        with open(_open_new(path), "wb") as f:
            f.write(data)

    @staticmethod
    def _write_fsync(path: str, data: bytes) -> None:
        """Create ``path`` (0600, not through a symlink) with ``data``, fsynced."""
        with open(_open_new(path), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    # -- the interface ----------------------------------------------------------------------
    async def head(self, key: str) -> ObjectInfo | None:
        row = self._run_inline(self._row, key)
        return self._info(row) if row else None

    def _get_range(self, key: str, start: int, end: int, if_match: str | None,
                   nowait: bool = False) -> bytes | None:
        """Bytes [start, end) of ``key``; with ``nowait``, None unless all of them are in the
        page cache already (preadv2 RWF_NOWAIT), so the caller can read on its event loop."""
        for _ in range(5):  # the blob may be replaced between reading the row and opening it
            row = self._row(key)
            if row is None:
                raise NoSuchKey("no such key", key=key)
            if if_match is not None and etag_norm(row[2]) != etag_norm(if_match):
                raise PreconditionFailed(f"ETag is {row[2]}, not {if_match}", key=key, code="PreconditionFailed")
            end = min(end, row[1])  # the row's size counts, as OSS cuts a range at the object's end
            try:
                with open(_open_read(self._blob_path(row[5])), "rb") as f:
                    if not nowait:
                        return os.pread(f.fileno(), max(0, end - start), start)
                    buf = bytearray(max(0, end - start))
                    try:
                        n = os.preadv(f.fileno(), [buf], start, os.RWF_NOWAIT)
                    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no NOWAIT on this disk
                        return None
                    return bytes(buf[:n]) if n == len(buf) or start + n >= row[1] else None
            except FileNotFoundError:
                again = self._row(key)
                if again is not None and again[5] == row[5]:
                    # the row still names this body: not replaced meanwhile, but lost (someone
                    # deleted the blob file); saying "kept changing" would send one hunting a writer
                    raise StoreError(f"the stored body of this object is missing (blob file "
                                     f"{self._blob_path(row[5])} is gone)", key=key) from None
                continue  # replaced or deleted meanwhile: read the row again
        raise StoreError("object kept changing while being read", key=key)

    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        data = self._run_inline(self._get_range, key, start, end, if_match, True)  # page-cache hit
        if data is None:
            data = await self._run(self._get_range, key, start, end, if_match)
        return data

    def _put_file(self, key: str, path: str, meta: dict[str, str], may_link: bool,
                  if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        _validate_key(key)
        check = self._destination(key, if_absent, replaces)
        if may_link:  # same disk: the file becomes the blob, no byte is copied
            size = os.lstat(path).st_size  # it does not change any more (may_link's promise)
            blob = self._link_blob(path)
            if blob is not None:
                return self._commit_row(key, blob, size, meta, check)
        tmp = self._new_tmp()
        with _removed_on_failure(tmp):
            with open(path, "rb") as src, open(_open_new(tmp), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            size = os.lstat(tmp).st_size
            return self._commit(key, tmp, size, meta, check)

    @staticmethod
    def _destination(key: str, if_absent: bool, replaces: str | None) -> Callable[[sqlite3.Connection], None] | None:
        """The ``_commit`` check of what a write finds at ``key``: ``if_absent``, AlreadyExists
        when ``key`` has a row (x-oss-forbid-overwrite); ``replaces``, DestinationChanged unless
        ``key`` is still that version (the write's HEAD-to-write window closed,
        ``ObjectStore.checks_replaces``). None when neither is asked."""
        if not if_absent and replaces is None:
            return None

        def check(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT etag FROM objects WHERE key=?", (key,)).fetchone()
            if if_absent and row:
                raise AlreadyExists("FileAlreadyExists: the object exists and may not be overwritten", key=key,
                                    code="FileAlreadyExists")
            if replaces is not None and (row is None or etag_norm(row[0]) != etag_norm(replaces)):
                raise DestinationChanged(f"the object is {'gone' if row is None else f'version {row[0]}'}, "
                                         f"not version {replaces}", key=key, code="DestinationChanged")
        return check

    def _link_blob(self, path: str) -> str | None:
        """Hard-link file ``path`` into blobs/ under a new blob name; that name, or None when
        it cannot be linked (another disk: EXDEV; the caller copies instead)."""
        blob = uuid.uuid4().hex
        dest = self._blob_path(blob)
        try:
            try:
                os.link(path, dest)
            except FileNotFoundError:
                if os.path.isdir(os.path.dirname(dest)):
                    raise
                _mkdir_private(os.path.dirname(dest))  # the first blob under this directory
                os.link(path, dest)
        except OSError:
            return None
        return blob

    async def put_file(self, key: str, path: str, metadata: dict[str, str], *,
                       may_link: bool = False, if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        try:
            small = os.lstat(path).st_size <= _INLINE_WRITE_MAX
        except OSError as e:
            raise StoreError(f"local store {self.root}: {e}") from e
        run = self._run_write if small else self._run
        return await run(self._put_file, key, path, metadata, may_link, if_absent, replaces)

    def _put_bytes(self, key: str, data: bytes, meta: dict[str, str], if_absent: bool = False,
                   replaces: str | None = None) -> ObjectInfo:
        check = self._destination(key, if_absent, replaces)
        if not data:  # a directory marker, mostly: a link, not a new file (_EMPTY)
            _validate_key(key)
            return self._commit_row(key, self._empty_blob(), 0, meta, check)
        tmp = self._new_tmp()
        with _removed_on_failure(tmp):
            self._write(tmp, data)
            return self._commit(key, tmp, len(data), meta, check)

    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str], *,
                        if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        run = self._run_write if len(data) <= _INLINE_WRITE_MAX else self._run
        return await run(self._put_bytes, key, data, metadata, if_absent, replaces)

    def _sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc_syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
        finally:
            os.close(fd)

    async def sync(self) -> None:
        """The durability barrier: ``syncfs(2)`` of the filesystem holding the store, so every
        put, copy and delete that returned before survives a power loss (bodies, directory
        entries and the SQLite WAL alike). StoreError when the disk reports a write error."""
        await self._run(self._sync)

    def _upload_dir(self, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise NoSuchKey("no such upload", key=upload_id)
        return os.path.join(self.root, "uploads", upload_id)

    def _create_multipart(self, key: str, meta: dict[str, str]) -> str:
        _validate_key(key)
        upload_id = uuid.uuid4().hex.upper()
        d = self._upload_dir(upload_id)
        _mkdir_private(d)
        self._write_fsync(os.path.join(d, "meta.json"),
                          json.dumps({"key": key, "meta": meta, "initiated": time.time()}).encode())
        _fsync_dir(d)
        _fsync_dir(os.path.dirname(d))
        return upload_id

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return await self._run(self._create_multipart, key, metadata)

    def _upload_part(self, key: str, upload_id: str, n: int, data: bytes) -> str:
        d = self._upload_dir(upload_id)
        if not os.path.isdir(d):
            raise NoSuchKey("no such upload", key=key)
        if not 1 <= n <= self.max_parts:
            raise StoreError(f"part number {n} out of range", key=key)
        etag = uuid.uuid4().hex.upper()
        tmp = os.path.join(d, f".{n}.tmp")
        try:
            os.unlink(tmp)  # left by an attempt that died
        except FileNotFoundError:
            pass
        with _removed_on_failure(tmp):
            self._write_fsync(tmp, data)
            os.rename(tmp, os.path.join(d, f"{n}.{etag}"))
        _fsync_dir(d)
        for name in os.listdir(d):  # a re-uploaded part replaces the earlier one
            if name.startswith(f"{n}.") and name != f"{n}.{etag}" and not name.endswith(".tmp"):
                os.unlink(os.path.join(d, name))
        return etag

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes,
                          metadata: dict[str, str]) -> str:
        return await self._run(self._upload_part, key, upload_id, part_number, bytes(data))

    def _complete(self, key: str, upload_id: str, parts: list[tuple[int, str]], if_absent: bool,
                  replaces: str | None) -> ObjectInfo:
        d = self._upload_dir(upload_id)
        try:
            with open(_open_read(os.path.join(d, "meta.json")), "rb") as f:
                m = json.load(f)
        except FileNotFoundError:
            raise NoSuchKey("no such upload", key=key) from None
        if m["key"] != key:
            raise NoSuchKey("no such upload for this key", key=key)
        if not parts:
            raise StoreError("MalformedXML: no parts to complete", key=key)
        files = [os.path.join(d, f"{n}.{etag}") for n, etag in parts]
        for i, p in enumerate(files):
            if not os.path.exists(p):
                raise StoreError(f"InvalidPart: part {parts[i][0]} was not uploaded", key=key)
            if i < len(files) - 1 and os.path.getsize(p) < self.min_part_size:
                raise StoreError(f"EntityTooSmall: part {parts[i][0]}", key=key)
        tmp = self._new_tmp()
        with _removed_on_failure(tmp):
            with open(_open_new(tmp), "wb") as out:
                for p in files:
                    with open(_open_read(p), "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            info = self._commit(m["key"], tmp, size, m["meta"], self._destination(key, if_absent, replaces))
        shutil.rmtree(d, ignore_errors=True)
        return info

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
                                 if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        return await self._run(self._complete, key, upload_id, parts, if_absent, replaces)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        if upload_id.isalnum():
            await self._run(shutil.rmtree, self._upload_dir(upload_id), True)

    def pending_uploads(self) -> list[str]:
        """Ids of unfinished multipart uploads (tests check none is left behind)."""
        return sorted(os.listdir(os.path.join(self.root, "uploads")))

    def _list(self, prefix: str, delimiter: str | None, marker: str | None, max_keys: int) -> ListPage:
        """One page of ListObjects: rows are stepped one at a time from an index seek, and a
        common prefix costs one new seek past it (not a batch of rows under it: a directory of
        887 subdirectories read ~900,000 rows before, issue 14)."""
        max_keys = min(1000, max(1, max_keys))  # OSS's range for max-keys
        db = self._db()
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        cursor, op = prefix, ">="
        if marker and marker >= prefix:
            cursor, op = marker, ">"
            if delimiter and marker.endswith(delimiter) and marker.startswith(prefix):
                cursor = marker + "\U0010ffff"  # marker is a common prefix: skip what it covers
        last = None
        while True:
            rows = db.execute(f"SELECT key, size, etag, mtime, meta, blob FROM objects WHERE key {op} ? "
                              "ORDER BY key", (cursor,))
            try:
                for row in rows:
                    key = row[0]
                    if not key.startswith(prefix):
                        return ListPage(objects, prefixes, None)
                    if len(objects) + len(prefixes) >= max_keys:
                        return ListPage(objects, prefixes, last)  # this row is on the next page
                    cut = key.find(delimiter, len(prefix)) if delimiter else -1
                    if cut >= 0 and delimiter:
                        common = key[: cut + len(delimiter)]
                        prefixes.append(common)
                        last = common
                        # skip every key under this common prefix: seek after its last possible key
                        cursor, op = common + "\U0010ffff", ">"
                        break
                    objects.append(self._info(row))
                    last = key
                else:
                    return ListPage(objects, prefixes, None)
            finally:
                rows.close()  # ends the statement's read snapshot at once

    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        if max_keys <= 2:  # an existence probe: a point read
            return self._run_inline(self._list, prefix, delimiter, marker, max_keys)
        return await self._run(self._list, prefix, delimiter, marker, max_keys)

    def _copy(self, src: str, dst: str, meta: dict[str, str] | None, if_match: str | None,
              if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """Copy the source's blob (immutable: a hard link is a copy; onto itself, the row keeps
        the blob) and commit ``dst`` in an index transaction that first checks the source row
        still names that blob (and, with ``if_match``, that ETag): the copy is exactly the
        version checked, atomically."""
        dest_check = self._destination(dst, if_absent, replaces)
        for _ in range(5):  # without if_match: the source may be replaced while we link it
            row = self._row(src)
            if row is None:
                raise NoSuchKey("copy source does not exist", key=src)
            if if_match is not None and etag_norm(row[2]) != etag_norm(if_match):
                raise PreconditionFailed(f"copy source is version {row[2]}, not {if_match}", key=src,
                                         code="PreconditionFailed")
            if self.max_copy_size is not None and row[1] > self.max_copy_size:
                raise StoreError(f"cannot copy {src!r} ({row[1]} bytes): above max_copy_size", key=src)
            new_meta = json.loads(row[4]) if meta is None else meta
            _validate_key(dst)
            if dst == src:  # new metadata (chmod, utimens): a new row version over the same body
                if replaces is not None and etag_norm(row[2]) != etag_norm(replaces):
                    raise DestinationChanged(f"the object is version {row[2]}, not {replaces}", key=dst,
                                             code="DestinationChanged")
                info = self._replace_metadata(src, row[5], row[2], row[1], new_meta)
                if info is not None:
                    return info
            else:
                if row[1] == 0:  # an empty body: a link of _EMPTY (the source's may be at its limit)
                    blob = self._empty_blob()
                else:
                    # a new name in the source blob's directory (it exists): ENOENT is the source
                    blob = row[5][:2] + uuid.uuid4().hex[2:]
                    try:
                        os.link(self._blob_path(row[5]), self._blob_path(blob))
                    except FileNotFoundError:
                        blob = ""

                def source_unchanged(db: sqlite3.Connection, blob=row[5], etag=row[2]) -> None:
                    # the ETag too: a metadata change keeps the blob (_replace_metadata)
                    now = db.execute("SELECT blob, etag FROM objects WHERE key=?", (src,)).fetchone()
                    if now is None or now[0] != blob or now[1] != etag:
                        raise _SourceChanged()
                    if dest_check is not None:
                        dest_check(db)

                if blob:
                    try:
                        return self._commit_row(dst, blob, row[1], new_meta, check=source_unchanged)
                    except _SourceChanged:
                        pass
            if if_match is not None:  # replaced between reading its row and committing
                raise PreconditionFailed("copy source was replaced", key=src, code="PreconditionFailed")
        raise StoreError("copy source kept changing", key=src)

    def _replace_metadata(self, key: str, blob: str, etag: str, size: int, meta: dict[str, str]) -> ObjectInfo | None:
        """Give ``key`` a new version (ETag, mtime) with ``meta`` over its body ``blob``, in
        one index transaction that changes the row only if it is still version ``etag`` of
        ``blob``; None when not (replaced, or its metadata changed, meanwhile). No file is
        touched: the body is immutable."""
        _validate_key(key)
        meta = {k.lower(): v for k, v in meta.items()}  # OSS lower-cases user-metadata names
        info = ObjectInfo(key, size, uuid.uuid4().hex.upper(), time.time(), meta)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = db.execute("UPDATE objects SET etag=?, mtime=?, meta=? WHERE key=? AND blob=? AND etag=?",
                                 (info.etag, info.mtime, json.dumps(meta), key, blob, etag)).rowcount
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return info if changed == 1 else None

    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None, *,
                   if_match: str | None = None, if_absent: bool = False, replaces: str | None = None,
                   source: ObjectInfo | None = None) -> ObjectInfo:
        # (``source`` saves no request here: the index row is read with the copy)
        return await self._run_write(self._copy, src, dst, metadata, if_match, if_absent, replaces)  # a link: no byte copied

    def _list_uploads(self, prefix: str) -> MultipartUploads:
        out = []
        base = os.path.join(self.root, "uploads")
        for upload_id in os.listdir(base):
            path = os.path.join(base, upload_id, "meta.json")
            try:
                with open(_open_read(path), "rb") as f:
                    m = json.load(f)
                    initiated = float(m.get("initiated") or os.fstat(f.fileno()).st_mtime)
            except (FileNotFoundError, NotADirectoryError):
                continue  # being created or aborted right now
            except ValueError:
                log.info("local store %s: upload %s has an unreadable meta.json", self.root, upload_id)
                continue
            if m["key"].startswith(prefix):
                out.append((m["key"], upload_id, initiated))
        return sorted(out, key=lambda u: (u[0], u[2]))

    async def list_multipart_uploads(self, prefix: str = "") -> MultipartUploads:
        return await self._run(self._list_uploads, prefix)

    def _delete(self, key: str, version: str | None = None) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT blob, etag FROM objects WHERE key=?", (key,)).fetchone()
            if row is not None and version is not None and not same_etag(row[1], version):
                log.info("%r not deleted: it is version %s now, not %s (another client wrote it)", key, row[1], version)
                row = None  # kept (one transaction, so checked exactly)
            else:
                db.execute("DELETE FROM objects WHERE key=?", (key,))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        if row:
            self._unlink_blob(row[0])

    async def delete(self, key: str, *, version: str | None = None) -> None:
        """Delete ``key``; with ``version``, only while it holds that ETag (checked in the
        delete's own index transaction)."""
        await self._run_write(self._delete, key, version)

    def capacity(self) -> tuple[int, int, int] | None:
        """The filesystem holding the bucket directory: its size, its free bytes and those an
        unprivileged writer may still use (statvfs: f_blocks, f_bfree, f_bavail; the
        difference is the blocks reserved for root, which ``df`` counts as neither used nor
        available). None when it cannot be read."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize

    def remove_orphans(self) -> int:
        """Delete blobs no row points at (left by a crash between rename and commit, or an
        unlink that failed) whose inode has not changed for an hour (ctime: a link or rename by
        a put in progress makes it new); returns how many were removed. Safe beside puts."""
        db = self._db()
        live = {r[0] for r in db.execute("SELECT blob FROM objects")}
        removed, now = 0, time.time()
        for sub in ("blobs", "tmp"):
            for dirpath, _, names in os.walk(os.path.join(self.root, sub)):
                for name in names:
                    p = os.path.join(dirpath, name)
                    try:
                        if name in live or now - os.stat(p).st_ctime <= _ORPHAN_AGE:
                            continue
                        if db.execute("SELECT 1 FROM objects WHERE blob=?", (name,)).fetchone():
                            continue  # committed since the snapshot of live blobs
                        os.unlink(p)
                        removed += 1
                    except FileNotFoundError:
                        continue
        return removed
