"""Errors of the filesystem layer and the one table that turns lower layers' errors into the
errno a FUSE caller sees.

The adapter (``fuse_ops``) turns :class:`FsError` into ``FUSEError(errno)``; every other
exception there is a bug (logged with a traceback, EIO)."""
from __future__ import annotations

import errno
import logging
import os
import re

from ..cache import TruncatedObject
from ..cmk import CmkUnavailable, KeyMissing
from ..envelope import EnvelopeError
from ..store.base import NoSuchKey, PreconditionFailed, StoreError

log = logging.getLogger(__name__)


class FsError(Exception):
    """A filesystem-level failure with the errno the caller should see."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err


class NoRoom(FsError):
    """ENOSPC on the cache disk that the caller asked to wait out (``may_wait``): uploads may
    free room (``UploadScheduler.wait_for_room``); nothing was logged and nothing changed."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC)


# Checked in order: the first class the exception is an instance of gives the errno.
_ERRNO_OF: tuple[tuple[type[BaseException], int], ...] = (
    # the object changed or vanished under an open handle (another client replaced or deleted it)
    (PreconditionFailed, errno.ESTALE),
    (NoSuchKey, errno.ESTALE),
    # no CMK of this mount matches the object's wrap-alg and matdesc: a permission matter
    (KeyMissing, errno.EACCES),
    # a KMS that cannot be reached, a corrupt envelope, an object shorter than its envelope
    # says, any other store failure: the data cannot be had right now
    (CmkUnavailable, errno.EIO),
    (EnvelopeError, errno.EIO),
    (TruncatedObject, errno.EIO),
    (StoreError, errno.EIO),  # but ENOSPC when a local bucket's disk is full (_disk_full)
)

_SQLITE_FULL = 13  # SQLite's result code "database or disk is full" (sqlite.org/rescode.html)


def _disk_full(exc: BaseException) -> bool:
    """Whether store error ``exc`` was caused by a full disk (a local-directory bucket: an
    OSError ENOSPC/EDQUOT of its blob files, or SQLITE_FULL of its index), following
    ``__cause__``: the store wraps them in StoreError."""
    seen = 0
    cause = exc.__cause__
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(cause, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        cause, seen = cause.__cause__, seen + 1
    return False


def errno_of(exc: BaseException) -> int:
    """The errno for ``exc`` as the caller of a filesystem operation should see it: from the
    table above, an OSError's own errno when it says something of the disk (ENOSPC of the
    cache disk stays ENOSPC; _DISK_ERRNOS), ENOSPC for a store error caused by a full bucket
    disk (a local-directory bucket), else EIO."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, StoreError) and not isinstance(exc, (PreconditionFailed, NoSuchKey)) and _disk_full(exc):
        return errno.ENOSPC
    for cls, err in _ERRNO_OF:
        if isinstance(exc, cls):
            return err
    if isinstance(exc, OSError) and exc.errno:
        # the daemon's descriptor table is full, not the caller's: EMFILE would send the
        # program looking for its own leak (a trial)
        if exc.errno == errno.EMFILE:
            return errno.ENFILE
        # what the cache disk's failures mean to the caller too; any other errno of the
        # daemon's own files (ENOTDIR, ENOENT, EACCES of a damaged cache dir) would name the
        # caller's file wrongly: EIO, the log line says which (a trial: `rm` said "Not a directory")
        return exc.errno if exc.errno in _DISK_ERRNOS else errno.EIO
    return errno.EIO


_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.ENOMEM,
                          errno.ENFILE})


_REQUEST_ID = re.compile(r" \[request id [^\]]*\]")  # in a StoreError's message (store/oss.py)


class ErrorsOnce:
    """Logs each failure at ERROR (or the level given) the first time, at DEBUG after: one ERROR line per damaged
    block, lost object or refused key, though the kernel retries a failed read page by page,
    ``ls -l`` looks a name up more than once and a program may ask again and again. The same
    failure is the same message without its request id (each answer has its own). At most
    10,000 remembered (then it starts over)."""

    def __init__(self, logger: logging.Logger):
        self.log = logger
        self._said: dict[str, set[tuple[str, ...]]] = {}  # key → the failures said about it

    def error(self, fmt: str, key: str, *args, same: tuple[str, ...] | None = None,
              level: int = logging.ERROR) -> None:
        """Log ``fmt % (key, *args)`` (at ``level`` once, then DEBUG). ``same``: what makes two
        failures the same one, when not the whole message (a listing's refusals: its directory)."""
        if len(self._said) > 10_000:
            self._said.clear()
        said = same if same is not None else (fmt, *(_REQUEST_ID.sub("", str(a)) for a in args))
        known = self._said.setdefault(key, set())
        self.log.log(logging.DEBUG if said in known else level, fmt, key, *args)
        known.add(said)

    def over(self, key: str) -> None:
        """``key``'s failures are over (it was saved): the next one is said again."""
        self._said.pop(key, None)


async def store_request(awaitable, what: str):
    """Await a store request about ``what`` (a key or path, for the log line); a StoreError
    becomes FsError with its errno from the table (EIO, or ESTALE when the object vanished or
    changed) and one log line."""
    try:
        return await awaitable
    except StoreError as e:
        log.error("store request for %r failed: %s", what, e)
        raise FsError(errno_of(e)) from None
