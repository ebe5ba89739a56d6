"""The SQLite file of a cache in the cache dir (``datakeys.sqlite``, ``attrs.sqlite``): mode
0600, WAL, commits not fsynced (a lost row costs the work it saved, never a wrong answer), and
a file SQLite cannot read, at the open or in a later query, replaced by an empty one (one INFO
line). Leaf: no ossfuse imports."""
from __future__ import annotations

import logging
import os
import sqlite3
import stat

log = logging.getLogger(__name__)


_WAL_PAGES = 256  # pages (4 KiB) written to the WAL before a checkpoint
_WAL_LIMIT = 1 << 20  # bytes a checkpointed WAL is cut back to


def open_cache_db(path: str, schema: str, what: str, *, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to the cache file ``path`` with ``schema`` (CREATE … IF NOT EXISTS)
    applied; ``what`` names the cache in the log line of a replaced file. Raises OSError or
    sqlite3.Error when even a new file cannot be made."""
    try:
        return _open(path, schema, synchronous)
    except sqlite3.DatabaseError as e:
        log.info("%s %s is unreadable (%s): starting a new one", what, path, e)
        _remove(path)
        return _open(path, schema, synchronous)


def damaged(e: BaseException) -> bool:
    """Whether SQLite error ``e`` says the file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB:
    "database disk image is malformed"), not busy, locked or out of space."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def renew_cache_db(db: sqlite3.Connection, path: str, schema: str, what: str, error: BaseException, *,
                   synchronous: str = "NORMAL") -> sqlite3.Connection | None:
    """A new, empty file in place of the open cache file ``path`` a query found damaged
    (:func:`damaged`; a trial's damaged middle pages gave one INFO line per open, for ever),
    with one INFO line; None (a second line) when a new file cannot be made: no cache then."""
    log.info("%s %s is damaged (%s): starting a new one", what, path, error)
    try:
        db.close()
    except sqlite3.Error:
        pass
    try:
        _remove(path)
        return _open(path, schema, synchronous)
    except (OSError, sqlite3.Error) as e:
        log.info("%s %s: cannot start a new one: %s", what, path, e)
        return None


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def _open(path: str, schema: str, synchronous: str) -> sqlite3.Connection:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    # the WAL checkpointed every ~1 MiB and cut back to that (SQLite's default lets each grow
    # to 4 MiB and keeps it: two caches took 8 MiB of a 48 MB cache disk, new-user trial NU7)
    db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
    db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
    db.execute(schema)
    return db
