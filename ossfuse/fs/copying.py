"""Copying an object for a rename or an attribute change, and deleting a rename's source, each
conditional on the version (ETag) this mount knows (issue 12 A1), with the FsError a caller sees.

A copy names its source version: ``store.copy(..., if_match=etag)`` (OSS
``x-oss-copy-source-if-match``; streaming copies GET with ``If-Match``), so the copy is that
version or nothing. OSS has no conditional DELETE: :func:`delete_version` HEADs the key right
before deleting it and refuses when the ETag differs; a foreign write landing between that HEAD
and the DELETE is still deleted (the remaining window, docs/semantics.md)."""
from __future__ import annotations

import errno
import logging
from collections.abc import Collection

from .. import envelope as env
from ..store.base import DestinationChanged, NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError, same_etag
from ..writeback.upload import Uploader
from .errors import FsError, errno_of, store_request

log = logging.getLogger(__name__)


class Rewrapped(FsError):
    """ESTALE for a copy OSS refused because the object's data key was wrapped anew since this
    mount read it (a rekey: same ciphertext, same ETag). ``now``: the HEAD that showed it, whose
    metadata a caller may copy with instead (``Attrs.store_attrs`` does)."""

    def __init__(self, now: ObjectInfo):
        super().__init__(errno.ESTALE)
        self.now = now


async def copy_object(store: ObjectStore, uploader: Uploader, src: ObjectInfo, dst: str,
                      metadata: dict[str, str] | None = None, *, if_absent: bool = False,
                      replaces: str | None = None, quiet_unanswered: bool = False) -> ObjectInfo:
    """Copy version ``src`` (its key and ETag) to ``dst`` (CopyObject, or streaming above the
    store's copy limit), with ``metadata`` replacing the source's if given. The copy is
    conditional on ``src.etag``: the returned object is a copy of exactly that version.
    ``if_absent``: only if nothing is at ``dst``; ``replaces``: the version at ``dst`` the copy
    replaces (checked where the store can, ``ObjectStore.checks_replaces``). Raises
    FsError(ESTALE) when ``src.key`` is now another version or gone (one log line naming the
    key and both versions; nothing is written), DestinationChanged or AlreadyExists (``dst`` is
    not what the caller stated, nothing written: no log line), FsError(EIO) on other failures
    (one ERROR line; ``quiet_unanswered``: CopyUnanswered, no such line, when the copy got no
    answer and may still land: the caller, which looks for it, says what became of it)."""
    limit = store.max_copy_size
    if metadata is None and limit is not None and src.size > limit and not src.metadata:
        head = await store_request(store.head(src.key), src.key)  # listings carry no metadata
        if head is None or not same_etag(head.etag, src.etag):
            _log_stale(store, "copy", src, head)
            raise FsError(errno.ESTALE)
        src = head
    try:
        return await uploader.copy(src, dst, metadata, if_absent=if_absent, replaces=replaces)
    except DestinationChanged:
        raise
    except (PreconditionFailed, NoSuchKey):
        now = await _current(store, src.key)
        _log_stale(store, "copy", src, now)
        raise FsError(errno.ESTALE) from None
    except StoreError as e:
        # (by what it says, not its code: the test server answers InvalidArgument, OSS's
        # documentation gives only the EC 0005-00000421)
        now = await _rewrapped_since(store, src, metadata) if metadata is not None and e.answered \
            and not e.temporary else None
        if now is not None:
            raise Rewrapped(now) from None
        if quiet_unanswered and store.may_still_land(dst):  # the caller says what becomes of it
            log.info("copy of %r (version %s) to %r got no answer: %s", src.key, src.etag, dst, e)
            raise CopyUnanswered(errno_of(e), str(e)) from None
        log.error("copy of %r (version %s) to %r failed: %s", src.key, src.etag, dst, e)
        raise FsError(errno_of(e)) from None


class CopyUnanswered(FsError):
    """:func:`copy_object` with ``quiet_unanswered``: the copy got no answer and may still land
    (``ObjectStore.may_still_land``); logged at INFO only, its message the store's reason."""


async def _rewrapped_since(store: ObjectStore, src: ObjectInfo, metadata: dict[str, str]) -> ObjectInfo | None:
    """The object at ``src.key`` now when a copy of ``src`` with ``metadata`` was refused because
    its data key was wrapped anew since this mount read it, else None: OSS refuses a CopyObject
    that changes the envelope (oss-cse-format.md §9, error 0005-00000421), and over OSS a rekey
    keeps the ETag (the same ciphertext), so ``If-Match`` passes and only that refusal tells.
    One INFO line if so (the caller retries, or the kernel does after its ESTALE)."""
    now = await _current(store, src.key)
    if now is None or not same_etag(now.etag, src.etag) or not env.is_encrypted(metadata) \
            or not env.rewrapped(metadata, now.metadata):
        return None
    log.info("copy of %r refused: its data key was wrapped anew (a rekey by another client) since this mount "
             "read version %s; nothing was written, the new envelope is taken", src.key, src.etag)
    return now


async def delete_version(store: ObjectStore, key: str, etag: str, *, log_failure: bool = True,
                         head: ObjectInfo | None = None, ours: Collection[str] = ()) -> None:
    """Delete ``key`` if it is still version ``etag`` (HEAD, compare, DELETE: OSS has no
    conditional DELETE; see the module doc for the window left), or a version whose wrapped
    data key is one of ``ours`` (this mount's own uploads that may have landed since:
    ``Conflicts.sent``). Already gone: nothing to do. ``head``: the caller's HEAD of ``key``
    just now (not asked again). Raises FsError(ESTALE) when another version is there (kept, one
    log line), EIO on a store failure (one log line, unless ``log_failure`` is False: the
    caller writes it)."""
    try:
        if head is None:
            head = await store.head(key)
        if head is None:
            return
        if head.metadata.get(env.H_KEY) in ours:
            etag = head.etag  # our own upload that landed late: deleted as the version meant
        if not same_etag(head.etag, etag):
            log.warning("%r was not deleted: it is version %s, not %s (another client wrote it)", key, head.etag, etag)
            raise FsError(errno.ESTALE)
        await store.delete(key, version=head.etag)
    except StoreError as e:
        if log_failure:
            log.error("deleting %r (version %s) failed: %s", key, etag, e)
        raise FsError(errno_of(e), str(e)) from None


async def _current(store: ObjectStore, key: str) -> ObjectInfo | None:
    """What is at ``key`` now, for a log line (None when gone or the HEAD failed)."""
    try:
        return await store.head(key)
    except StoreError:
        return None


def _log_stale(store: ObjectStore, what: str, src: ObjectInfo, now: ObjectInfo | None) -> None:
    # WARNING: another client's change, not a fault; the caller's ESTALE makes the kernel look
    # the name up again and retry once (a rename then moves the version the bucket has)
    if now is not None and store.landed_over_ours(src.key, now):  # (break trial BT13: a chmod)
        log.info("%s of %r refused: a request of this mount's landed late over version %s, which is being put "
                 "back; nothing was written (ESTALE: tried again)", what, src.key, src.etag)
        return
    log.warning("%s of %r refused: this mount knows version %s, the bucket has %s (another client "
                "changed or deleted it); nothing was written (ESTALE)", what, src.key, src.etag,
                "no object" if now is None else f"version {now.etag}")
