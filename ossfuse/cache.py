"""The block cache: ciphertext of fetched object ranges, on local disk, keyed by (key, ETag).

Each cached object version is one sparse file ``objects/<sha256(key, etag)>`` holding the
ciphertext at its own offsets, and an in-memory map of which ``block_size`` blocks are present.
Keying by ETag pins a version: a replaced object gets a new entry, and every ranged GET carries
``If-Match`` so a block can never mix versions (design.md promise 4). Only ciphertext is
written, exactly as the bucket holds it (promise 2); decryption happens in memory.

State that may change across an ``await``: ``CacheEntry.present`` (a block is marked present
only after its bytes are written) and ``CacheEntry.inflight`` (an Event per block being fetched,
so concurrent readers of one block wait for one GET instead of issuing their own).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil

import trio

from .aio import run_all
from .store.base import ObjectStore

log = logging.getLogger(__name__)

_FETCH_CHUNK = 8 << 20  # bytes per ranged GET when filling a run of missing blocks
_FETCH_PARALLEL = 4  # ranged GETs at once per read


class TruncatedObject(Exception):
    """The store returned fewer bytes than the object's size promised."""


class CacheEntry:
    """One cached object version; see the module doc."""

    def __init__(self, path: str, size: int, block_size: int):
        self.path = path
        self.size = size
        self.block_size = block_size
        self.nblocks = (size + block_size - 1) // block_size
        self.present = bytearray(self.nblocks)  # 1 per block whose ciphertext is on disk
        self.inflight: dict[int, trio.Event] = {}
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = fd

    def complete(self) -> bool:
        return all(self.present)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockCache:
    """Ciphertext block cache in ``dir/objects``; one instance per mount."""

    def __init__(self, dir: str, store: ObjectStore, block_size: int):
        self.dir = os.path.join(dir, "objects")
        self.store = store
        self.block_size = block_size
        # Entries from an earlier run are dropped: which blocks they hold was kept in memory.
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, mode=0o700)
        self._entries: dict[tuple[str, str], CacheEntry] = {}

    def _path(self, key: str, etag: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest())

    def entry(self, key: str, etag: str, size: int) -> CacheEntry:
        """The entry of version (key, etag), created empty if new."""
        e = self._entries.get((key, etag))
        if e is None:
            e = self._entries[(key, etag)] = CacheEntry(self._path(key, etag), size, self.block_size)
        return e

    def adopt(self, key: str, etag: str, size: int, path: str) -> None:
        """Take over ``path``, which holds the full ciphertext of version (key, etag) (a staged
        file just uploaded), so reading it back needs no GET."""
        dest = self._path(key, etag)
        os.replace(path, dest)
        self.drop(key, etag)
        e = self._entries[(key, etag)] = CacheEntry(dest, size, self.block_size)
        e.present[:] = b"\1" * e.nblocks

    def rekey(self, key: str, etag: str, new_key: str, new_etag: str) -> None:
        """Version (key, etag) was copied to (new_key, new_etag) with the same ciphertext
        (rename, attribute change): its cached blocks now serve the copy."""
        e = self._entries.pop((key, etag), None)
        if e is None:
            return
        self.drop(new_key, new_etag)
        dest = self._path(new_key, new_etag)
        os.replace(e.path, dest)
        e.path = dest
        self._entries[(new_key, new_etag)] = e

    def drop(self, key: str, etag: str) -> None:
        """Forget version (key, etag) and delete its file."""
        e = self._entries.pop((key, etag), None)
        if e is not None:
            e.close()
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass

    async def read(self, key: str, etag: str, size: int, offset: int, length: int,
                   *, fetch_until: int | None = None) -> bytes:
        """Ciphertext bytes ``[offset, offset+length)`` of version (key, etag), clipped to ``size``.

        Missing blocks are fetched with ranged GETs carrying If-Match (``fetch_until`` widens the
        fetch for read-ahead). Raises PreconditionFailed if the object was replaced,
        NoSuchKey if it was deleted, TruncatedObject if the store returns short data.
        """
        end = min(size, offset + length)
        if end <= offset:
            return b""
        e = self.entry(key, etag, size)
        await self._ensure(key, etag, e, offset, max(end, min(size, fetch_until or 0)))
        return os.pread(e.fd, end - offset, offset)

    async def fetch_all(self, key: str, etag: str, size: int) -> None:
        """Bring the whole version into the cache (an open file is about to be deleted)."""
        if size:
            await self._ensure(key, etag, self.entry(key, etag, size), 0, size)

    async def _ensure(self, key: str, etag: str, e: CacheEntry, start: int, end: int) -> None:
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        while True:
            waits = [e.inflight[b] for b in range(first, last + 1) if not e.present[b] and b in e.inflight]
            missing = [b for b in range(first, last + 1) if not e.present[b] and b not in e.inflight]
            if not missing and not waits:
                return
            if missing:
                events = {b: trio.Event() for b in missing}
                e.inflight.update(events)
                try:
                    await self._fetch_blocks(key, etag, e, missing)
                finally:
                    for b, ev in events.items():
                        del e.inflight[b]
                        ev.set()
            for ev in waits:
                await ev.wait()
            # loop: a block another task was fetching may have failed and still be missing

    async def _fetch_blocks(self, key: str, etag: str, e: CacheEntry, blocks: list[int]) -> None:
        bs = self.block_size
        ranges: list[tuple[int, int]] = []
        for b in blocks:  # coalesce runs of blocks, cut into chunks of _FETCH_CHUNK bytes
            lo, hi = b * bs, min(e.size, (b + 1) * bs)
            if ranges and ranges[-1][1] == lo and hi - ranges[-1][0] <= _FETCH_CHUNK:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))

        async def fetch(lo: int, hi: int) -> None:
            data = await self.store.get_range(key, lo, hi, if_match=etag)
            if len(data) != hi - lo:
                raise TruncatedObject(f"object is truncated: asked bytes {lo}-{hi - 1} of "
                                      f"{e.size}, got {len(data)}")
            os.pwrite(e.fd, data, lo)
            for b in range(lo // bs, (hi - 1) // bs + 1):
                e.present[b] = 1

        await run_all([functools.partial(fetch, lo, hi) for lo, hi in ranges], _FETCH_PARALLEL)

    def close(self) -> None:
        for e in self._entries.values():
            e.close()
        self._entries.clear()
