"""Attributes of encrypted objects that a HEAD read, kept across mounts in the cache dir, so a
listing can prove them current without asking again (issue 14: ``ls -l`` of N files, "fewer
[HEADs] where the listing already proves the attributes are current").

A row is (object key → ETag, size, Last-Modified, the attribute headers ``mode``, ``uid``,
``gid``, ``mtime``, ``ctime``, ``atime``). It is used only when a listing entry of that key
shows the same ETag, size and Last-Modified second: the rule by which a listing proves an
in-memory node current (``fs/resolve.py``). Only encrypted objects without a device number are
kept: each version of one has its own random data key and IV, so an equal ETag (the MD5 of the
ciphertext) is the same upload, or a copy of it, which OSS gives a new Last-Modified. Only a
HEAD answered in a later second than its Last-Modified is kept (``objmeta.proof_mtime``: a
metadata-only copy by another client in that same second would look the same). The envelope
headers are not kept: a file opened from such a row gets them first, from the GET of its first
block (a slim version, ``fs/model.py``).

It is a cache: SQLite in WAL mode, commits not fsynced (a lost row costs one HEAD), at most
``max_rows`` rows (the oldest dropped), an unreadable file replaced. Names and attributes are
what the bucket shows in plaintext anyway; the file is mode 0600 in the private cache dir.
Used from the trio thread only; each call is a few microseconds of SQLite, no await.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import stat
from typing import Iterable, NamedTuple

from .envelope import is_encrypted
from .sqlitecache import damaged, open_cache_db, renew_cache_db

log = logging.getLogger(__name__)

ATTR_NAMES = ("mode", "uid", "gid", "mtime", "ctime", "atime")  # the x-oss-meta-* kept
MAX_ROWS = 500_000  # ~100 bytes each: a few tens of MB at most
_PRUNE_EVERY = 4096  # puts between two checks of the row count
_SPECIAL = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
_QUERY_CHUNK = 500  # keys per SELECT (SQLite's default limit of host parameters is 999+)


class RememberedAttrs(NamedTuple):
    """What a kept HEAD said of one object: ``etag``, ``size`` (bytes), ``modified`` (its
    Last-Modified, epoch seconds) and ``attrs`` (the kept ``x-oss-meta-*`` attribute values)."""

    etag: str
    size: int
    modified: float
    attrs: dict[str, str]


_SCHEMA = ("CREATE TABLE IF NOT EXISTS kept (key TEXT PRIMARY KEY, etag TEXT NOT NULL, size INTEGER NOT NULL, "
           "modified REAL NOT NULL, attrs TEXT NOT NULL)")


class AttrCache:
    """The rows of one mount's cache dir (``path``: ``<cache dir>/attrs.sqlite``)."""

    def __init__(self, path: str, max_rows: int = MAX_ROWS):
        self.path = path
        self.max_rows = max_rows
        self._puts = 0
        self._db: sqlite3.Connection | None = open_cache_db(path, _SCHEMA, "attribute cache",
                                                            synchronous="OFF")  # a lost row costs one HEAD
        # Rows of an earlier release (table "attrs") may hold HEADs answered within their
        # version's Last-Modified second, which prove nothing (objmeta.proof_mtime): dropped.
        self._db.execute("DROP TABLE IF EXISTS attrs")

    @staticmethod
    def keepable(metadata: dict[str, str]) -> bool:
        """Whether an object with user ``metadata`` is kept: encrypted (an envelope's key
        header), a regular file, directory marker or symlink by its mode (a device node's
        number is read from the full metadata)."""
        if not is_encrypted(metadata) or "rdev" in metadata:
            return False
        try:
            kind = int(metadata.get("mode", "0")) & 0o170000  # (any size: out of range is the reader's)
        except ValueError:
            kind = 0
        return kind not in _SPECIAL

    def put_many(self, rows: Iterable[tuple[str, str, int, float, dict[str, str]]]) -> None:
        """Keep what HEADs said: (key, ETag, size, Last-Modified, user metadata) each (the
        caller checked :meth:`keepable`), in one transaction. A failing write is logged at INFO
        and forgotten: a cache."""
        if self._db is None:
            return
        values = [(key, etag, size, modified, json.dumps({n: metadata[n] for n in ATTR_NAMES if n in metadata},
                                                           separators=(",", ":")))
                  for key, etag, size, modified, metadata in rows]
        if not values:
            return
        try:
            with self._db:  # one transaction
                self._db.executemany("INSERT OR REPLACE INTO kept VALUES (?,?,?,?,?)", values)
            self._puts += len(values)
            if self._puts >= _PRUNE_EVERY:
                self._puts = 0
                self._db.execute("DELETE FROM kept WHERE rowid <= (SELECT max(rowid) FROM kept) - ?",
                                 (self.max_rows,))
        except sqlite3.Error as e:
            if not self._renewed(e):
                log.info("attribute cache %s: cannot keep %d rows: %s", self.path, len(values), e)

    def forget(self, keys: list[str]) -> None:
        """Drop the rows of ``keys`` (their objects now hold versions that are not kept)."""
        if self._db is None or not keys:
            return
        try:
            with self._db:
                self._db.executemany("DELETE FROM kept WHERE key=?", [(k,) for k in keys])
        except sqlite3.Error as e:
            if not self._renewed(e):
                log.info("attribute cache %s: cannot drop %d rows: %s", self.path, len(keys), e)

    def get_many(self, keys: list[str]) -> dict[str, RememberedAttrs]:
        """The rows kept for ``keys`` (absent ones left out; none when the file fails)."""
        found: dict[str, RememberedAttrs] = {}
        if self._db is None or not keys:
            return found
        try:
            for i in range(0, len(keys), _QUERY_CHUNK):
                chunk = keys[i:i + _QUERY_CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, etag, size, modified, attrs in self._db.execute(
                        f"SELECT key, etag, size, modified, attrs FROM kept WHERE key IN ({marks})", chunk):
                    found[key] = RememberedAttrs(etag, size, modified, json.loads(attrs))
        except (sqlite3.Error, ValueError) as e:
            if not self._renewed(e):
                log.info("attribute cache %s: cannot read: %s", self.path, e)
        return found

    def _renewed(self, e: BaseException) -> bool:
        """Whether ``e`` said the file is damaged, which is then replaced by an empty one (one
        INFO line; without it every lookup said so again); False: another failure."""
        if self._db is None or not damaged(e):
            return False
        self._db = renew_cache_db(self._db, self.path, _SCHEMA, "attribute cache", e, synchronous="OFF")
        return True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
