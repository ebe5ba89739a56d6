"""Uploading a staged version: one PUT, or a multipart upload with parallel parts.

The staged file already holds the final ciphertext, encrypted as one continuous CTR stream
from the IV, so part N (1-based) of part size P is simply bytes [(N-1)·P, N·P) of it and is
encrypted from counter IV + (N-1)·P/16, exactly what the SDKs do (oss-cse-format.md §6).
P is a multiple of 16, at least 100 KiB, and grown so no object needs more than 10,000 parts.
Every part re-sends the full envelope plus data-size and part-size, as oss2 does (§6, the OSS
server checks them on every part). A failed multipart upload is aborted: no orphaned parts;
one a crash interrupts is in the cache dir's ledger (``ledger.py``) until the next mount aborts it.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Awaitable, Callable

import trio

from .. import envelope as env
from .. import integrity
from ..aio import run_all
from .ledger import MultipartLedger
from .staging import StagedFile
from ..store.base import NoSuchKey, ObjectInfo, ObjectStore, StoreError

log = logging.getLogger(__name__)


def part_size_for(size: int, preferred: int, max_parts: int = 10_000) -> int:
    """Part size in bytes for an object of ``size`` bytes: ``preferred`` (a multiple of 16,
    ≥ 100 KiB), grown to a multiple of 16 when ``size`` would need more than ``max_parts``."""
    need = -(-size // max_parts)
    p = max(preferred, need)
    return -(-p // 16) * 16


class UploadProgress:
    """One upload in progress, for ``ossfuse status``: ``done`` of ``total`` bytes are in the
    store (grows per part of a multipart upload; a single PUT goes from 0 to done at once)."""

    __slots__ = ("key", "total", "done", "started")

    def __init__(self, key: str, total: int):
        self.key, self.total, self.done, self.started = key, total, 0, trio.current_time()


class Uploader:
    """Uploads staged versions to ``store``; see the module doc. ``in_progress`` holds an
    :class:`UploadProgress` per running upload (status reads it; nothing else depends on it)."""

    def __init__(self, store: ObjectStore, *, multipart_threshold: int, part_size: int,
                 part_workers: int, ledger: MultipartLedger | None = None):
        self.store = store
        self.ledger = ledger  # records each multipart upload until it ends (a crash's are aborted at mount)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.part_workers = part_workers
        self.in_progress: set[UploadProgress] = set()
        # upload id → key of multipart uploads whose abort failed (the store was away): tried
        # again by retry_aborts (the store back, unmount); the ledger keeps them for the next
        # mount meanwhile. OSS bills their parts until aborted (a trial saw one outlive its
        # mount's clean unmount)
        self.failed_aborts: dict[str, str] = {}

    async def upload(self, staged: StagedFile, key: str, metadata: dict[str, str], *,
                     if_absent: bool = False, replaces: str | None = None,
                     before_complete: Callable[[], Awaitable[None]] | None = None) -> ObjectInfo:
        """Put sealed ``staged``'s ciphertext at ``key`` with ``metadata``: one attempt (the
        store retries each request within its deadline, ``ossfuse/retry.py``; retrying a
        failed upload later is the scheduler's job). ``if_absent``: create only (the store
        raises AlreadyExists when ``key`` is taken; a multipart upload is then aborted).
        ``replaces``: the version the caller found at ``key`` (DestinationChanged, nothing
        written, where the store checks it: ``ObjectStore.checks_replaces``).
        ``before_complete``: awaited once every part of a multipart upload is in, right before
        its Complete (the upload may have taken minutes: the caller checks again what it
        checked before the upload); what it raises aborts the upload and propagates.
        Raises StoreError. While it runs, ``in_progress`` holds its :class:`UploadProgress`."""
        progress = UploadProgress(key, staged.size)
        self.in_progress.add(progress)
        try:
            metadata = await self._put_tag_list(staged, key, metadata)
            # a sealed staged file never changes again: the store may link it
            return await self._put_body(staged.data_path, staged.size, key, metadata, progress, may_link=True,
                                        if_absent=if_absent, replaces=replaces, before_complete=before_complete)
        finally:
            self.in_progress.discard(progress)

    async def put_back(self, path: str, size: int, key: str, metadata: dict[str, str], data_key: bytes,
                       iv: bytes, *, replaces: str | None = None) -> ObjectInfo:
        """Put a version this mount uploaded before back at ``key`` (a request in doubt landed
        late over it: store/indoubt.py): ``size`` bytes of its ciphertext from ``path`` (a
        block cache file: never linked), with its ``metadata``, in the same way :meth:`upload`
        put it (so the same ETag: an MD5, or a multipart one of the same part size). Its tag
        list goes first, recomputed from those bytes under ``data_key`` and ``iv`` (the same
        body, put again: idempotent). Raises StoreError, OSError."""
        list_key = integrity.list_key_of(metadata)
        spec = integrity.parse(metadata) if list_key is not None else None
        if list_key is not None and spec is not None:
            body = await trio.to_thread.run_sync(integrity.tags_of_file, path, integrity.tag_key(data_key, iv),
                                                 spec.block, size)
            await self.store.put_bytes(list_key, body, {})
        progress = UploadProgress(key, size)
        self.in_progress.add(progress)
        try:
            return await self._put_body(path, size, key, metadata, progress, may_link=False, replaces=replaces)
        finally:
            self.in_progress.discard(progress)

    async def _put_body(self, path: str, size: int, key: str, metadata: dict[str, str], progress: UploadProgress,
                        *, may_link: bool, if_absent: bool = False, replaces: str | None = None,
                        before_complete: Callable[[], Awaitable[None]] | None = None) -> ObjectInfo:
        """The object itself, from local file ``path`` of ``size`` bytes: one PUT, or a
        multipart upload past ``multipart_threshold`` (not on a local-disk store)."""
        if size > self.multipart_threshold and not self.store.local_disk:
            return await self._multipart(path, size, key, metadata, progress, if_absent, replaces, before_complete)
        info = await self.store.put_file(key, path, metadata, may_link=may_link, if_absent=if_absent,
                                         replaces=replaces)
        progress.done = size
        return info

    async def _put_tag_list(self, staged: StagedFile, key: str, metadata: dict[str, str]) -> dict[str, str]:
        """Put the tag list of ``staged`` (list layout, docs/integrity.md) before its object, so
        no reader finds the object without it; returns the metadata to upload. A version
        recovered from the journal has its list recomputed from its data; one this mount cannot
        unwrap is uploaded without tags (one warning). Raises StoreError, OSError."""
        tags = staged.tags
        list_key = integrity.list_key_of(metadata)
        if tags is None or list_key is None:
            return metadata
        body = tags.list_body if tags.list_key == list_key else None
        if body is None:
            data_key = getattr(staged.envelope, "data_key", None)
            spec = integrity.parse(metadata)
            if data_key is None or spec is None:
                log.warning("%r is uploaded without integrity tags: its tag list cannot be recomputed "
                            "without its data key", key)
                return {k: v for k, v in metadata.items() if k != integrity.HEADER}
            k = integrity.tag_key(data_key, staged.envelope.iv)
            computed: bytes = await trio.to_thread.run_sync(integrity.tags_of_file, staged.data_path, k,
                                                            spec.block, staged.size)
            body = computed
        await self.store.put_bytes(list_key, body, {})
        return metadata

    async def _multipart(self, path: str, size: int, key: str, metadata: dict[str, str],
                         progress: UploadProgress | None = None, if_absent: bool = False, replaces: str | None = None,
                         before_complete: Callable[[], Awaitable[None]] | None = None) -> ObjectInfo:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # own fd: staged may be closed
        try:
            return await self._parts(key, size, metadata,
                                     lambda off, n: trio.to_thread.run_sync(os.pread, fd, n, off), progress,
                                     if_absent, replaces, before_complete)
        finally:
            os.close(fd)

    async def _parts(self, key: str, size: int, metadata: dict[str, str], read,
                     progress: UploadProgress | None = None, if_absent: bool = False, replaces: str | None = None,
                     before_complete: Callable[[], Awaitable[None]] | None = None) -> ObjectInfo:
        """Multipart upload of ``size`` bytes got by ``await read(offset, length)``; aborted on
        any failure or cancellation (also one ``before_complete`` raises: :meth:`upload`).
        ``progress.done`` grows by each part uploaded."""
        psize = part_size_for(size, self.part_size, self.store.max_parts)
        meta = dict(metadata)
        if env.is_encrypted(meta):
            meta[env.H_DATA_SIZE] = str(size)
            meta[env.H_PART_SIZE] = str(psize)
        upload_id = await self.store.create_multipart(key, meta)
        if self.ledger is not None:
            self.ledger.started(key, upload_id)
        etags: dict[int, str] = {}

        async def part(n: int) -> None:
            off = (n - 1) * psize
            data = await read(off, min(psize, size - off))
            etags[n] = await self.store.upload_part(key, upload_id, n, data, meta)
            if progress is not None:
                progress.done += len(data)

        try:
            await run_all([functools.partial(part, n) for n in range(1, -(-size // psize) + 1)], self.part_workers)
            if before_complete is not None:
                await before_complete()
            info = await self.store.complete_multipart(key, upload_id, sorted(etags.items()), if_absent=if_absent,
                                                       replaces=replaces)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.abort(key, upload_id)
                except StoreError as e:  # tried again later (retry_aborts); in the ledger meanwhile
                    # (a WARNING: tried again by this daemon; what still fails at unmount is said then)
                    log.warning("abort of multipart upload %s of %r failed: %s; tried again when the store "
                                "answers, at unmount, else at the next mount", upload_id, key, e)
                    self.failed_aborts[upload_id] = key
            raise
        self._ended(upload_id)
        return info

    async def abort(self, key: str, upload_id: str) -> bool:
        """Abort multipart upload ``upload_id`` of ``key`` and forget it in the ledger; True if
        this call aborted it, False if it had ended already (NoSuchUpload). Raises StoreError
        (then it stays in the ledger)."""
        try:
            await self.store.abort_multipart(key, upload_id)
            aborted = True
        except NoSuchKey:  # (NoSuchUpload) ended meanwhile
            aborted = False
        self._ended(upload_id)
        return aborted

    async def retry_aborts(self) -> int:
        """Abort again the multipart uploads whose abort failed (:attr:`failed_aborts`); returns
        how many are still left (each stays in the ledger: the next mount aborts it). One INFO
        line per upload aborted now; a failure again is an INFO line (the first was a WARNING)."""
        for upload_id, key in list(self.failed_aborts.items()):
            try:
                if await self.abort(key, upload_id):
                    log.info("aborted multipart upload %s of %r (its first abort had failed)", upload_id, key)
            except StoreError as e:
                log.info("abort of multipart upload %s of %r failed again: %s", upload_id, key, e)
                continue
            del self.failed_aborts[upload_id]
        return len(self.failed_aborts)

    def _ended(self, upload_id: str) -> None:
        if self.ledger is not None:
            self.ledger.ended(upload_id)

    async def copy(self, src: ObjectInfo, dst: str, metadata: dict[str, str] | None = None, *,
                   stream: bool = False, if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """Copy object ``src`` (its key, size, ETag and metadata) to ``dst``, with ``metadata``
        replacing the source's if given. CopyObject when the store allows the size; above it the
        ciphertext is streamed through this client unchanged, as a multipart upload whose part
        N is bytes [(N-1)·P, N·P) of the source, so the envelope headers stay valid (§6). The
        source is read with If-Match: PreconditionFailed if it changes meanwhile. ``stream``
        forces streaming (new envelope headers, which CopyObject may not change: §9).
        ``if_absent``: only if nothing is at ``dst`` (AlreadyExists, nothing written);
        ``replaces``: as for :meth:`upload`."""
        limit = self.store.max_copy_size
        if not stream and (limit is None or src.size <= limit):
            return await self.store.copy(src.key, dst, metadata=metadata, if_match=src.etag, if_absent=if_absent,
                                         replaces=replaces, source=src)
        meta = dict(src.metadata if metadata is None else metadata)
        for name in (env.H_DATA_SIZE, env.H_PART_SIZE):
            meta.pop(name, None)  # the new upload has its own part layout
        log.info("copying %r to %r by streaming its %d bytes", src.key, dst, src.size)
        if src.size <= self.multipart_threshold:
            data = await self.store.get_range(src.key, 0, src.size, if_match=src.etag)
            if len(data) != src.size:
                raise StoreError(f"source is truncated: {len(data)} of {src.size} bytes", key=src.key)
            return await self.store.put_bytes(dst, data, meta, if_absent=if_absent, replaces=replaces)
        return await self._parts(dst, src.size, meta,
                                 lambda off, n: self.store.get_range(src.key, off, off + n, if_match=src.etag),
                                 if_absent=if_absent, replaces=replaces)
