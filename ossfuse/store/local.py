"""A directory that behaves like an OSS bucket: the embedded default store and the fast
test backend.

Layout under the root directory::

    index.sqlite        one row per object: key, size, etag, mtime, user metadata, blob name
    blobs/XX/<uuid>     object bodies, immutable once written (copies are hard links)
    uploads/<id>/       unfinished multipart uploads: meta.json and one file per part
    tmp/                bodies being written

Any OSS key (1–1023 UTF-8 bytes, ``a`` and ``a/`` side by side, ``a//b``) is a row, never a
path, so no key can escape the directory. A write lands in ``tmp/``, is fsynced, renamed into
``blobs/`` and only then committed to the index in one SQLite transaction: a crash leaves either
the old object or the new one, never half of one. ETags are random per write (OSS only promises
that an ETag changes when the content does). SQLite in WAL mode lets the daemon and a test
process use one bucket at once.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from urllib.parse import urlparse

import trio

from .base import ListPage, NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError

log = logging.getLogger(__name__)

_ORPHAN_AGE = 3600.0  # seconds before an unreferenced blob (crash leftover) is removed


def _validate_key(key: str) -> None:
    """OSS InvalidObjectName rules: 1–1023 UTF-8 bytes, not starting with '/' or '\\'."""
    n = len(key.encode("utf-8"))
    if not 1 <= n <= 1023 or key[0] in "/\\":
        raise StoreError(f"invalid object name {key[:40]!r}: 1-1023 bytes, not starting with / or \\", key=key)


class LocalStore(ObjectStore):
    """Bucket in a local directory; see the module doc for its layout and guarantees."""

    listing_has_metadata = True  # the index row holds it: no HEAD per entry for ls -l
    local_disk = True

    def __init__(self, root: str, *, threads: int = 8, max_copy_size: int | None = None):
        self.root = os.path.abspath(root)
        self.max_copy_size = max_copy_size  # None: copies are hard links, of any size
        for sub in ("blobs", "uploads", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._db_path = os.path.join(self.root, "index.sqlite")
        self._local = threading.local()
        self._limiter = trio.CapacityLimiter(threads)
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                   " etag TEXT NOT NULL, mtime REAL NOT NULL, meta TEXT NOT NULL, blob TEXT NOT NULL)")
        db.commit()

    @classmethod
    def from_url(cls, url: str, **kw) -> "LocalStore":
        """``local:///abs/path`` → LocalStore at /abs/path (``kw`` as for the constructor)."""
        parsed = urlparse(url)
        return cls(parsed.netloc + parsed.path if parsed.netloc else parsed.path, **kw)

    # -- plumbing ---------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._db_path, timeout=30, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (OSError, sqlite3.Error) as e:  # a full or failing disk is a store failure
            raise StoreError(f"local store {self.root}: {e}") from e

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
        return ObjectInfo(row[0], row[1], row[2], row[3], json.loads(row[4]))

    def _new_tmp(self) -> str:
        return os.path.join(self.root, "tmp", uuid.uuid4().hex)

    def _commit(self, key: str, tmp: str, size: int, meta: dict[str, str]) -> ObjectInfo:
        """Move a complete, fsynced body into blobs/ and point ``key`` at it, atomically."""
        _validate_key(key)
        blob = uuid.uuid4().hex
        dest = self._blob_path(blob)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(tmp, dest)
        meta = {k.lower(): v for k, v in meta.items()}  # OSS lower-cases user-metadata names
        info = ObjectInfo(key, size, uuid.uuid4().hex.upper(), time.time(), meta)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT blob FROM objects WHERE key=?", (key,)).fetchone()
            db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                       (key, size, info.etag, info.mtime, json.dumps(meta), blob))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            os.unlink(dest)
            raise
        if old:
            self._unlink_blob(old[0])
        return info

    def _unlink_blob(self, blob: str) -> None:
        """Remove a blob no row points at any more. Never fails: the change that dropped it is
        committed (and a put may have linked its caller's file in), so a blob that cannot be
        removed now is left to ``remove_orphans``."""
        try:
            os.unlink(self._blob_path(blob))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("local store %s: cannot remove unused blob %s (%s); left for remove_orphans",
                        self.root, blob, e)

    @staticmethod
    def _write_fsync(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
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
            if if_match is not None and row[2] != if_match:
                raise PreconditionFailed(f"ETag is {row[2]}, not {if_match}", key=key)
            try:
                with open(self._blob_path(row[5]), "rb") as f:
                    if not nowait:
                        return os.pread(f.fileno(), max(0, end - start), start)
                    buf = bytearray(max(0, end - start))
                    try:
                        n = os.preadv(f.fileno(), [buf], start, os.RWF_NOWAIT)
                    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no NOWAIT on this disk
                        return None
                    return bytes(buf[:n]) if n == len(buf) or start + n >= row[1] else None
            except FileNotFoundError:
                continue
        raise StoreError("object kept changing while being read", key=key)

    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        data = self._run_inline(self._get_range, key, start, end, if_match, True)  # page-cache hit
        if data is None:
            data = await self._run(self._get_range, key, start, end, if_match)
        return data

    def _put_file(self, key: str, path: str, meta: dict[str, str], may_link: bool) -> ObjectInfo:
        tmp = self._new_tmp()
        linked = False
        if may_link:
            try:
                os.link(path, tmp)  # same disk: the file becomes the blob, no byte is copied
                linked = True
            except OSError:
                pass  # another disk (EXDEV): copy
        if not linked:
            shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # nothing to write back when the caller already fsynced it
            size = os.fstat(f.fileno()).st_size
        return self._commit(key, tmp, size, meta)

    async def put_file(self, key: str, path: str, metadata: dict[str, str], *,
                       may_link: bool = False) -> ObjectInfo:
        return await self._run(self._put_file, key, path, metadata, may_link)

    def _put_bytes(self, key: str, data: bytes, meta: dict[str, str]) -> ObjectInfo:
        tmp = self._new_tmp()
        self._write_fsync(tmp, data)
        return self._commit(key, tmp, len(data), meta)

    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        return await self._run(self._put_bytes, key, data, metadata)

    def _upload_dir(self, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise NoSuchKey("no such upload", key=upload_id)
        return os.path.join(self.root, "uploads", upload_id)

    def _create_multipart(self, key: str, meta: dict[str, str]) -> str:
        _validate_key(key)
        upload_id = uuid.uuid4().hex.upper()
        d = self._upload_dir(upload_id)
        os.makedirs(d)
        self._write_fsync(os.path.join(d, "meta.json"), json.dumps({"key": key, "meta": meta}).encode())
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
        self._write_fsync(tmp, data)
        os.rename(tmp, os.path.join(d, f"{n}.{etag}"))
        for name in os.listdir(d):  # a re-uploaded part replaces the earlier one
            if name.startswith(f"{n}.") and name != f"{n}.{etag}" and not name.endswith(".tmp"):
                os.unlink(os.path.join(d, name))
        return etag

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes,
                          metadata: dict[str, str]) -> str:
        return await self._run(self._upload_part, key, upload_id, part_number, bytes(data))

    def _complete(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> ObjectInfo:
        d = self._upload_dir(upload_id)
        try:
            with open(os.path.join(d, "meta.json")) as f:
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
        with open(tmp, "wb") as out:
            for p in files:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        info = self._commit(m["key"], tmp, size, m["meta"])
        shutil.rmtree(d, ignore_errors=True)
        return info

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> ObjectInfo:
        return await self._run(self._complete, key, upload_id, parts)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        if upload_id.isalnum():
            await self._run(shutil.rmtree, self._upload_dir(upload_id), True)

    def pending_uploads(self) -> list[str]:
        """Ids of unfinished multipart uploads (tests check none is left behind)."""
        return sorted(os.listdir(os.path.join(self.root, "uploads")))

    def _list(self, prefix: str, delimiter: str | None, marker: str | None, max_keys: int) -> ListPage:
        max_keys = min(1000, max(1, max_keys))  # OSS's range for max-keys
        db = self._db()
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        cursor, inclusive = prefix, True
        if marker and marker >= prefix:
            cursor, inclusive = marker, False
            if delimiter and marker.endswith(delimiter) and marker.startswith(prefix):
                cursor = marker + "\U0010ffff"  # marker is a common prefix: skip what it covers
        last = None
        while len(objects) + len(prefixes) < max_keys:
            op = ">=" if inclusive else ">"
            rows = db.execute(f"SELECT key, size, etag, mtime, meta, blob FROM objects WHERE key {op} ? "
                              "ORDER BY key LIMIT ?", (cursor, max_keys + 1)).fetchall()
            if not rows:
                return ListPage(objects, prefixes, None)
            inclusive = False
            for row in rows:
                key = row[0]
                if not key.startswith(prefix):
                    return ListPage(objects, prefixes, None)
                if len(objects) + len(prefixes) >= max_keys:
                    return ListPage(objects, prefixes, last)
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    prefixes.append(common)
                    last = common
                    # skip every key under this common prefix: continue after its last possible key
                    cursor = common + "\U0010ffff"
                    break
                objects.append(self._info(row))
                last = cursor = key
            else:
                if len(rows) <= max_keys:
                    return ListPage(objects, prefixes, None)
        more = db.execute("SELECT key FROM objects WHERE key > ? ORDER BY key LIMIT 1", (cursor,)).fetchone()
        return ListPage(objects, prefixes, last if more and more[0].startswith(prefix) else None)

    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        if max_keys <= 2:  # an existence probe: a point read
            return self._run_inline(self._list, prefix, delimiter, marker, max_keys)
        return await self._run(self._list, prefix, delimiter, marker, max_keys)

    def _copy(self, src: str, dst: str, meta: dict[str, str] | None) -> ObjectInfo:
        row = self._row(src)
        if row is not None and self.max_copy_size is not None and row[1] > self.max_copy_size:
            raise StoreError(f"cannot copy {src!r} ({row[1]} bytes): above max_copy_size", key=src)
        for _ in range(5):  # the source may be replaced between reading its row and linking it
            row = self._row(src)
            if row is None:
                raise NoSuchKey("copy source does not exist", key=src)
            tmp = self._new_tmp()
            try:
                os.link(self._blob_path(row[5]), tmp)  # blobs are immutable: a link is a copy
            except FileNotFoundError:
                continue
            return self._commit(dst, tmp, row[1], json.loads(row[4]) if meta is None else meta)
        raise StoreError("copy source kept changing", key=src)

    async def copy(self, src: str, dst: str, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        return await self._run(self._copy, src, dst, metadata)

    def _delete(self, key: str) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT blob FROM objects WHERE key=?", (key,)).fetchone()
            db.execute("DELETE FROM objects WHERE key=?", (key,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if row:
            self._unlink_blob(row[0])

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)

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
