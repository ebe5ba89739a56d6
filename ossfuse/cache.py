"""The block cache: ciphertext of fetched object ranges, on local disk, keyed by (key, ETag).

Each cached object version is one sparse file ``objects/<sha256(key, etag)>`` holding the
ciphertext at its own offsets, and an in-memory map of which ``block_size`` blocks are present.
Keying by ETag pins a version: a replaced object gets a new entry, and every ranged GET carries
``If-Match`` so a block can never mix versions (design.md promise 4). Only ciphertext is
written, exactly as the bucket holds it (promise 2); decryption happens in memory.

Across mounts: a clean unmount writes ``objects/cache.idx``, one record per cache file (key,
ETag, size, present blocks and a CRC-32 per fetched block); the next mount adopts those entries, so a file
whose ETag is unchanged is not downloaded again. The index is removed as it is loaded, so after
a crash the cache starts empty. A block from an earlier mount is checked against its CRC on
first use, and fetched again if the cache file was damaged.

Limits: the bytes of present blocks stay under ``max_size``, and the cache disk keeps
``min_free`` bytes free; past either, the least recently used blocks are dropped by punching
holes in their files. So every cache file is the cache's alone (one link): ``adopt`` refuses
an uploaded file the store also links. Blocks being fetched or written are not yet counted and never
dropped (readers are answered before the write ends, so the disk can briefly hold the chunks in
flight past the limit; each fetch evicts once its writes land); entries
``keep``-pinned (a file renamed over while open) are never dropped, and are only pinned while
pinned versions together stay within half of ``max_size``. At most ``_MAX_OPEN_FDS`` cache files
are open at once (least recently used closed first).

State that may change across an ``await``: ``CacheEntry.present`` (a block is marked present
only after its bytes are written), ``CacheEntry.inflight`` (an Event per block being fetched,
so concurrent readers of one block wait for one GET instead of issuing their own) and
``CacheEntry.pending`` (blocks fetched, checked and being written: readers are answered from
those bytes in memory instead of waiting for the cache disk).

Memory: fetched ciphertext is held only by the task that fetched it, until it is on disk;
``pending`` adds references to those same bytes, no copies. A read-ahead task holds one of
_PREFETCH_BUFFERS places from before its GET until its chunk is written, and one of
_PREFETCH_PARALLEL GET slots only for the GET and its check (so a slow cache disk does not stall
the GETs). So at most _PREFETCH_BUFFERS × _PREFETCH_CHUNK (64 MiB) of read-ahead plus
_FETCH_PARALLEL × _FETCH_CHUNK (16 MiB) per concurrent FUSE read that misses are in memory.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import fastcrc

import trio

from .aio import Supervisor, run_all
from .integrity import BlockTags, IntegrityError, TagSpec, nblocks, tag_key
from .integrity import TAG as _TAG
from .integrity import list_key_candidates
from .integrity import parse as parse_tags
from .store.base import NoSuchKey, ObjectStore, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: times a writer to the cache disk (staging, the journal) that gets ENOSPC drops cached blocks
#: and tries again (:meth:`BlockCache.evict`): reads running meanwhile may take the room first
MAKE_ROOM_TRIES = 3
_FETCH_CHUNK = 4 << 20  # bytes per ranged GET when filling a run of missing blocks
_FETCH_PARALLEL = 4  # ranged GETs at once per read
# Sequential read-ahead fetches whole aligned chunks of this many bytes, one GET each: a window
# that slides by one kernel read at a time would otherwise ask for one block per GET (247 GETs
# of 1 MiB for 256 MiB, each paying the round trip; ossfs asks 10 MiB at a time, 5 at once).
_PREFETCH_CHUNK = 8 << 20
_PREFETCH_PARALLEL = 5  # read-ahead GETs at once, all files together (≤ 40 MiB in flight)
_PREFETCH_BUFFERS = 8  # read-ahead chunks fetched or being fetched and not yet on disk, all files
# seconds between two "cannot take more blocks" warnings: a disk near full takes one chunk and
# refuses the next (a new-user trial saw the warning twice in one second)
_WRITE_WARN_EVERY = 60.0
_MAX_OPEN_FDS = 256  # cache files kept open at once
# fetched chunks up to this many bytes are written and summed on the event loop (tens of
# microseconds: less than the two thread hand-offs, which under load cost milliseconds per file)
_INLINE_STORE_MAX = 64 << 10
_MAX_TAG_LISTS = 256  # object versions whose tag lists are kept in memory
_REFETCH_SAID_MAX = 1024  # damaged blocks whose refetch was logged (then forgotten all at once)
# bytes of checked tagged blocks read from a local-disk store kept in memory (the last spans read
# of each version, least recently used version dropped): a sequential reader's 128 KiB FUSE reads
# would otherwise read and authenticate the whole tagged block (up to 8 MiB) again for each read
_CHECKED_MAX = 32 << 20
# spans kept per version: the kernel's read-ahead sends several reads at once, answered out of
# order; with one span, a read of the block before the last one read it again (a new-user
# trial: `dd bs=128k` of 100 MB read 150 MB from the bucket, `cat` of 300 MB 629 MB)
_CHECKED_SPANS = 4
_INDEX = "cache.idx"  # in objects/: what a clean unmount kept (JSON list of entries)
# CRC-32/ISO-HDLC, the very function zlib.crc32 computes (the index keeps its values across
# versions), ~3x zlib's speed: summing a fetched 8 MiB chunk or an uploaded file is on the
# critical path of a read and of an unmount.
_crc32 = fastcrc.crc32.iso_hdlc

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk blocks of ``[offset, offset+length)`` of a file, keeping its size
    (fallocate(2) FALLOC_FL_PUNCH_HOLE; Python's os has no binding for it)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


async def load_tags(store: ObjectStore, spec: TagSpec, key: str, size: int, data_key: bytes,
                    iv: bytes) -> BlockTags:
    """The checked tags (:meth:`BlockTags.from_spec`) of the object at ``key`` of ``size``
    ciphertext bytes with tag header ``spec`` and data key/IV. In the list layout the list is
    read from the key its header names, else from where a directory rename above it moved it
    (``integrity.list_key_candidates``: one more GET per directory level, only then): the
    first one found that its root tag authenticates (one INFO line when not at the header's
    key). Raises IntegrityError (the first found failing its check, or none found),
    StoreError when one cannot be read."""
    want = nblocks(size, spec.block) * _TAG
    if spec.list_key is None or not want:
        return BlockTags.from_spec(spec, data_key, iv, size, b"" if spec.list_key is not None else None)
    failed: IntegrityError | None = None
    candidates = list_key_candidates(spec, key)
    for at in candidates:
        try:
            body = await store.get_range(at, 0, want)
        except NoSuchKey:
            continue
        try:
            tags = BlockTags.from_spec(spec, data_key, iv, size, body, at)
        except IntegrityError as e:  # (another object at a nearer key: look further)
            failed = failed or e
            continue
        if at != spec.list_key:
            log.info("tag list of %r is at %r, not at %r its header names (%s)", key, at, spec.list_key,
                     f"what is nearer fails its check: {failed}" if failed is not None
                     else "a directory above was renamed")
        return tags
    raise failed or IntegrityError(f"its tag list {spec.list_key!r} is missing (and is at none of the "
                                   f"{len(candidates) - 1} other keys where a directory rename may have put it)")


class TruncatedObject(Exception):
    """The store returned fewer bytes than the object's size promised."""


class _Chunk:
    """Ciphertext bytes ``[lo, lo + len(data))`` of one version, just fetched (and checked
    against its tags under tag key ``authed``, None: not checked), while they are written to
    the cache file; ``written`` is set once that is over (written or not)."""

    __slots__ = ("lo", "data", "authed", "written")

    def __init__(self, lo: int, data: bytes, authed: bytes | None):
        self.lo, self.data, self.authed = lo, data, authed
        self.written = trio.Event()


def _release(e: "CacheEntry", events: dict[int, trio.Event]) -> None:
    """End a fetch of ``events``' blocks of ``e``: wake their waiters (a fetch may have woken
    some already, as soon as their bytes were pending)."""
    for b, ev in events.items():
        if e.inflight.get(b) is ev:
            del e.inflight[b]
        ev.set()


class CacheEntry:
    """One cached object version; see the module doc."""

    def __init__(self, cache: "BlockCache", key: tuple[str, str], path: str, size: int):
        self.cache = cache
        self.key = key
        self.path = path
        self.size = size
        self.block_size = cache.block_size
        self.nblocks = (size + self.block_size - 1) // self.block_size
        self.present = bytearray(self.nblocks)  # 1 per block whose ciphertext is on disk
        self.inflight: dict[int, trio.Event] = {}
        self.pending: dict[int, _Chunk] = {}  # blocks fetched and being written (module doc)
        self.crc: list[int | None] = [None] * self.nblocks  # CRC-32 of each fetched block
        self.verified = bytearray(b"\1" * self.nblocks)  # 0: from an earlier mount, check first
        # 1 per present block checked against the object's integrity tags (docs/integrity.md),
        # under tag key authed_k (check_under)
        self.authed = bytearray(self.nblocks)
        self.authed_k: bytes | None = None
        self.tags: BlockTags | None = None  # the version's tags, once a reader supplied them
        self.pinned = False  # never evicted (its object is gone but a handle still reads it)
        self.dropped = False  # forgotten by the cache: late fetches must not recreate its file
        self._fd = -1

    @property
    def fd(self) -> int:
        """The open cache file (opened on demand; the cache bounds how many stay open)."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.cache._touch_fd(self)
        return self._fd

    def block_len(self, b: int) -> int:
        return min(self.block_size, self.size - b * self.block_size)

    def check_under(self, tags: BlockTags) -> None:
        """Readers check against ``tags`` from now on. Blocks checked under another tag key
        (another data key or IV: an envelope put on this very body, same ETag, a trial served
        garbage so) are checked again; a re-wrap (``ossfuse rekey``) keeps the key."""
        if self.authed_k != tags.k:
            self.authed[:] = bytes(self.nblocks)
            self.authed_k = tags.k
        self.tags = tags

    def have(self, b: int) -> bool:
        """Block ``b`` can be read: on disk, or fetched and being written."""
        return bool(self.present[b]) or b in self.pending

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlockCache:
    """Ciphertext block cache in ``dir/objects``; one instance per mount. ``max_size`` and
    ``min_free`` in bytes."""

    def __init__(self, dir: str, store: ObjectStore, block_size: int, *, max_size: int = 10 << 30,
                 min_free: int = 512 << 20, keep: Iterable[tuple[str, str, int]] = ()):
        """``keep``: versions (key, ETag, size in bytes) whose files stay also without a clean
        unmount's index (:meth:`_load_index`)."""
        self.dir = os.path.join(dir, "objects")
        self.store = store
        self.block_size = block_size
        self.max_size = max_size
        self.min_free = min_free
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._entries: dict[tuple[str, str], CacheEntry] = {}
        self._lru: collections.OrderedDict[tuple[tuple[str, str], int], None] = collections.OrderedDict()
        self._open: collections.OrderedDict[tuple[str, str], CacheEntry] = collections.OrderedDict()
        self.used = 0  # bytes of present blocks
        self.pinned_bytes = 0  # bytes of pinned versions (see keep)
        self.stats = {"hits": 0, "misses": 0, "evicted_bytes": 0, "prefetched_bytes": 0,
                      # bytes returned by read(): checked against integrity tags, or of objects
                      # without tags; blocks that failed their tag (after one refetch), refetches
                      "verified_bytes": 0, "unverified_bytes": 0, "integrity_failures": 0,
                      "integrity_refetches": 0}
        # (key, etag) -> (data key, IV, its tags): a tag list holds for the data key it was checked
        # with only (tags_for)
        self._tag_lists: collections.OrderedDict[tuple[str, str], tuple[bytes, bytes, BlockTags]] = \
            collections.OrderedDict()
        # local-disk store: version (key, etag) -> (the tag key they were checked under, its
        # checked spans [(offset, ciphertext)], the most recent last)
        self._checked: collections.OrderedDict[tuple[str, str], tuple[bytes, list[tuple[int, bytes]]]] = \
            collections.OrderedDict()
        self._refetch_said: set[tuple[str, str, int]] = set()  # blocks whose refetch was logged
        self._checked_bytes = 0
        # version -> tagged spans being fetched by _read_through now [(lo, hi, done)] (local disk)
        self._fetching: dict[tuple[str, str], list[tuple[int, int, trio.Event]]] = {}
        self._nursery: trio.Nursery | Supervisor | None = None
        self._prefetch_limiter = trio.CapacityLimiter(_PREFETCH_PARALLEL)  # read-ahead GETs
        self._prefetch_buffers = trio.CapacityLimiter(_PREFETCH_BUFFERS)  # read-ahead chunks in memory
        self._write_failing = False  # the last block write failed (full disk): warned once
        self._write_warned_at = -_WRITE_WARN_EVERY  # (time.monotonic() of that warning)
        self._load_index(keep)

    def _load_index(self, versions: Iterable[tuple[str, str, int]]) -> None:
        """Adopt the entries a clean unmount indexed, and the whole files of ``versions`` (key,
        ETag, size in bytes) that it did not (a crash: no index; an upload's file whose CRCs
        were not summed yet) as untrusted until checked against their tags (:meth:`check_whole`:
        a put-back's only copy of a version a late request replaced in the bucket, break trial
        BT15); delete every other file (see module doc)."""
        keep = set()
        idx = os.path.join(self.dir, _INDEX)
        try:
            with open(idx) as f:
                records = json.load(f)
            os.unlink(idx)
        except FileNotFoundError:
            records = []
        except (OSError, ValueError) as err:
            log.warning("cache index %s unusable, ignored: %s", idx, err)
            records = []
        for rec in records if isinstance(records, list) else []:
            try:
                path = os.path.join(self.dir, os.path.basename(rec["file"]))
                if rec["block_size"] != self.block_size or not os.path.exists(path):
                    continue
                e = CacheEntry(self, (rec["key"], rec["etag"]), path, rec["size"])
                present = base64.b64decode(rec["present"])
                if len(present) != e.nblocks or len(rec["crc"]) != e.nblocks:
                    continue
                e.crc = rec["crc"]
                e.verified = bytearray(e.nblocks)
                self._entries[e.key] = e
                for b in range(e.nblocks):
                    if present[b] and e.crc[b] is not None:  # no CRC (an uploaded file): not trusted
                        self._mark_present(e, b)
                keep.add(os.path.basename(path))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("cache index %s: an entry is unusable, ignored: %s", idx, err)
        for key, etag, size in versions:
            had = self._entries.get((key, etag))
            if size and (had is None or not all(had.present)) and self._adopt_unindexed(key, etag, size):
                keep.add(os.path.basename(self._path(key, etag)))
        for name in os.listdir(self.dir):
            if name not in keep:
                os.unlink(os.path.join(self.dir, name))
        if self._entries:
            log.info("cache: %d object version(s), %d bytes kept from the last mount", len(self._entries), self.used)
        self.evict()

    def _adopt_unindexed(self, key: str, etag: str, size: int) -> bool:
        """Take the file of version (key, etag) of ``size`` bytes as it is, every block present
        and its CRC-32 summed now: nothing vouches for it but the version's integrity tags,
        which every read and :meth:`check_whole` check first (``authed`` stays 0). Whether it did."""
        e = CacheEntry(self, (key, etag), self._path(key, etag), size)
        try:
            if os.path.getsize(e.path) < size:
                return False
            e.present[:] = b"\1" * e.nblocks
            crcs = self._block_crcs(e)
        except OSError:
            return False
        old = self._entries.pop((key, etag), None)
        if old is not None:  # (indexed with blocks missing: the whole file is there now)
            self._forget_blocks(old)
        e.present[:] = bytes(e.nblocks)
        e.crc = crcs
        self._entries[e.key] = e
        for b in range(e.nblocks):
            self._mark_present(e, b)
        return True

    def start(self, nursery: trio.Nursery | Supervisor) -> None:
        """Allow background read-ahead, run in ``nursery`` (without one, read-ahead is off)."""
        self._nursery = nursery

    def _path(self, key: str, etag: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest())

    def entry(self, key: str, etag: str, size: int) -> CacheEntry:
        """The entry of version (key, etag), created empty if new."""
        e = self._entries.get((key, etag))
        if e is None:
            e = self._entries[(key, etag)] = CacheEntry(self, (key, etag), self._path(key, etag), size)
        return e

    # -- accounting ---------------------------------------------------------------------
    def _touch_fd(self, e: CacheEntry) -> None:
        self._open[e.key] = e
        self._open.move_to_end(e.key)
        while len(self._open) > _MAX_OPEN_FDS:
            _, old = self._open.popitem(last=False)
            old.close()

    def _mark_present(self, e: CacheEntry, b: int) -> None:
        if not e.present[b]:
            e.present[b] = 1
            self.used += e.block_len(b)
        self._lru[(e.key, b)] = None
        self._lru.move_to_end((e.key, b))

    def _unmark(self, e: CacheEntry, b: int) -> None:
        """Block ``b`` of ``e`` is no longer present (its bytes may stay on disk)."""
        if e.present[b]:
            e.present[b] = 0
            self.used -= e.block_len(b)
        e.authed[b] = 0
        self._lru.pop((e.key, b), None)

    def _forget_blocks(self, e: CacheEntry) -> None:
        for b in range(e.nblocks):
            self._unmark(e, b)

    def _free_space(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize

    def evict(self, need: int = 0) -> int:
        """Drop least recently used blocks until the limits hold (and ``need`` more bytes fit);
        returns the bytes freed. Called after every fill, and by writers on ENOSPC."""
        freed = 0
        skipped = []
        while self._lru and (self.used + need > self.max_size or self._free_space() < self.min_free + need):
            (ekey, b), _ = self._lru.popitem(last=False)
            e = self._entries.get(ekey)
            if e is None or not e.present[b]:
                continue
            if e.pinned:
                skipped.append((ekey, b))
                continue
            try:
                punch_hole(e.fd, b * self.block_size, e.block_len(b))
            except OSError as err:
                log.warning("cannot drop a cache block of %r: %s", ekey[0], err)
                skipped.append((ekey, b))
                continue
            self._unmark(e, b)
            freed += e.block_len(b)
            # A file left with no block goes: a hole punched in a block shorter than a page (a
            # small object's only one) frees nothing, so every evicted small file kept a page (a
            # new-user trial: 8,836 of them filled a 48 MB cache disk `status` said held 0 bytes)
            if not e.inflight and not e.pending and 1 not in e.present:  # (memchr: microseconds)
                self.drop(*e.key)
        for k in skipped:
            self._lru[k] = None
            self._lru.move_to_end(k, last=False)
        self.stats["evicted_bytes"] += freed
        return freed

    def with_room(self, fn: Callable[[], T], need: int) -> T:
        """``fn()``; when it raises ENOSPC, drop cached blocks to make room for ``need`` more
        bytes and call it again, up to MAKE_ROOM_TRIES times (the cache disk holds staged
        versions and the journal too; blocks that reads fetch meanwhile, written in worker
        threads, may take the room first: a trial failed so in 3 of 18 tries). Raises what
        ``fn`` raises, once nothing more can be dropped."""
        for tries_left in range(MAKE_ROOM_TRIES, -1, -1):
            try:
                return fn()
            except OSError as e:
                if e.errno != errno.ENOSPC or not tries_left or not self.evict(need=need):
                    raise
        raise AssertionError("unreachable")  # (the last try returns or raises)

    async def with_room_async(self, afn: Callable[[], Awaitable[T]], need: int,
                              retry_if: Callable[[], bool] = lambda: True) -> T:
        """:meth:`with_room` for a coroutine function (work run in a thread); ``retry_if()``
        false after a failure: that failure is final (it changed something)."""
        for tries_left in range(MAKE_ROOM_TRIES, -1, -1):
            try:
                return await afn()
            except OSError as e:
                if (e.errno != errno.ENOSPC or not tries_left or not retry_if()
                        or not self.evict(need=need)):
                    raise
        raise AssertionError("unreachable")

    # -- entries ------------------------------------------------------------------------
    def adopt(self, key: str, etag: str, size: int, path: str, data_key: bytes, iv: bytes) -> None:
        """Take over ``path``, which holds the full ciphertext of version (key, etag) (a staged
        file just uploaded), so reading it back needs no GET. Not from a local-disk store (its
        reads are not cached), not an empty version (nothing to read), and not a file with
        another link: a store that kept the very file (``put_file(..., may_link=True)``) would
        have its object zeroed when eviction punches holes in it; that version's blocks are
        fetched when read instead. Raises
        OSError if ``path`` cannot be stat'ed or moved."""
        if self.store.local_disk or not size:
            return  # (an empty version has no block: its file would never be evicted, a trial kept 301)
        if os.stat(path).st_nlink > 1:
            log.debug("not adopting the upload of %r (ETag %s): its file has another link", key, etag)
            return
        dest = self._path(key, etag)
        self.drop(key, etag)
        os.replace(path, dest)
        e = self._entries[(key, etag)] = CacheEntry(self, (key, etag), dest, size)
        for b in range(e.nblocks):
            self._mark_present(e, b)
        e.authed[:] = b"\1" * e.nblocks  # the tags were computed from this very file, with this key
        e.authed_k = tag_key(data_key, iv)
        self.evict()
        # CRCs let the blocks be trusted after a remount; one block is summed at once (cheaper
        # than a thread hand-off), more in the background
        if e.nblocks <= 1:
            try:
                self._set_crcs(e, self._block_crcs(e))
            except OSError:
                pass  # unreadable: the block stays untrusted after a remount
        elif self._nursery is not None:
            self._nursery.start_soon(self._checksum, e)

    def _block_crcs(self, e: CacheEntry) -> list[int | None]:
        """CRC-32 of each present block of ``e``, read from its file (None: block missing)."""
        out: list[int | None] = []
        with open(e.path, "rb") as f:
            for b in range(e.nblocks):
                out.append(_crc32(os.pread(f.fileno(), e.block_len(b), b * self.block_size)) if e.present[b]
                           else None)
        return out

    async def _checksum(self, e: CacheEntry) -> None:
        """Compute the CRC-32 of an adopted entry's blocks (in a thread; the file was just
        written, so it reads from the page cache)."""
        try:
            result = await trio.to_thread.run_sync(self._block_crcs, e)
            self._set_crcs(e, result)
        except OSError:
            return  # dropped or evicted meanwhile: those blocks stay untrusted
        except Exception as err:  # noqa: BLE001 - a background task: one entry's failure is logged, never fatal
            log.warning("checksumming the cached copy of %r failed (its blocks stay untrusted after a "
                        "remount): %s: %s", e.key[0], type(err).__name__, err)

    def _set_crcs(self, e: CacheEntry, result: list[int | None]) -> None:
        for b, crc in enumerate(result):
            if e.present[b] and e.crc[b] is None:
                e.crc[b] = crc

    def rekey(self, key: str, etag: str, new_key: str, new_etag: str) -> None:
        """Version (key, etag) was copied to (new_key, new_etag) with the same ciphertext
        (rename, attribute change): its cached blocks now serve the copy."""
        if (key, etag) != (new_key, new_etag):
            self._forget_checked((key, etag))
        e = self._entries.pop((key, etag), None)
        if e is None or (key, etag) == (new_key, new_etag):
            if e is not None:
                self._entries[(key, etag)] = e
            return
        self.drop(new_key, new_etag)
        kept = self._tag_lists.pop((key, etag), None)
        if kept is not None:  # the copy has the same data key, IV and size: the same tags
            self._tag_lists[(new_key, new_etag)] = kept
        present = [b for b in range(e.nblocks) if e.present[b]]
        authed = bytes(e.authed)
        self._forget_blocks(e)
        self._open.pop(e.key, None)
        dest = self._path(new_key, new_etag)
        try:
            os.replace(e.path, dest)
        except FileNotFoundError:  # made before its first write (its file opens on demand): nothing to move
            present, authed = [], bytes(len(authed))
        e.path, e.key = dest, (new_key, new_etag)
        self._entries[e.key] = e
        for b in present:
            self._mark_present(e, b)
        e.authed[:] = authed

    def drop(self, key: str, etag: str) -> None:
        """Forget version (key, etag) and delete its file."""
        self._forget_checked((key, etag))
        e = self._entries.pop((key, etag), None)
        if e is not None:
            e.dropped = True
            self.unpin(e)
            self._forget_blocks(e)
            self._open.pop(e.key, None)
            e.close()
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass

    async def read(self, key: str, etag: str, size: int, offset: int, length: int,
                   *, fetch_until: int | None = None, tags: BlockTags | None = None) -> bytes:
        """Ciphertext bytes ``[offset, offset+length)`` of version (key, etag), clipped to ``size``.

        Missing blocks are fetched with ranged GETs carrying If-Match (``fetch_until`` widens the
        fetch for read-ahead). With ``tags`` (the version's, from :meth:`tags_for`), every byte
        returned was checked against them: fetches cover whole tagged blocks, a block that fails
        is fetched once more, and blocks cached without a check are checked first. Raises
        PreconditionFailed if the object was replaced, NoSuchKey if it was deleted,
        TruncatedObject if the store returns short data, IntegrityError if a block fails its
        tag twice (nothing of it is cached; a failing block outside the read's own tagged
        blocks, fetched with them, is no failure of the read: it reads them from the store).
        """
        end = min(size, offset + length)
        if end <= offset:
            return b""
        try:
            data = await self._read(key, etag, size, offset, end, fetch_until, tags)
        except IntegrityError as err:
            lo, hi = tags.span(offset, end) if tags is not None else (offset, end)
            if err.span is None or (err.span[0] < hi and lo < err.span[1]):
                raise
            # a damaged block beside this read, fetched with it into one cache block: this
            # read's own tagged blocks straight from the store (a trial: one bad 64 KiB block
            # made the 1 MiB around it EIO)
            data = await self._read_through(key, etag, size, offset, end, tags)
        self.stats["verified_bytes" if tags is not None else "unverified_bytes"] += len(data)
        return data

    async def _read(self, key: str, etag: str, size: int, offset: int, end: int, fetch_until: int | None,
                    tags: BlockTags | None) -> bytes:
        if self.store.local_disk and (key, etag) not in self._entries:
            return await self._read_through(key, etag, size, offset, end, tags)  # caching would copy the bucket
        e = self.entry(key, etag, size)
        if tags is not None:
            e.check_under(tags)
        bs = self.block_size
        await self._ensure(key, etag, e, offset, end)
        ahead = min(size, fetch_until or 0, end + self.max_size // 4)  # read-ahead within the limit
        if ahead > end:
            self._prefetch(key, etag, e, end, ahead, whole_chunks=True)
        blocks = range(offset // bs, (end - 1) // bs + 1)
        while tags is not None:
            # after each await: a reader under another tag key (check_under) may have taken the
            # entry over, and its marks say nothing of this key's tags
            e.check_under(tags)
            # read ahead before the tags were known (or under another key): checked once on disk
            c = next((c for b in blocks if not e.present[b] and (c := e.pending.get(b)) is not None
                      and c.authed != tags.k), None)
            if c is None:
                break
            await c.written.wait()
        # from here to _gather no await but in branches that start the read over
        if not all(e.have(b) for b in blocks):
            # The limits evicted what was just fetched (a read larger than max_size, a full
            # disk), or another task's fetch failed: serve this read straight from the store.
            return await self._read_through(key, etag, size, offset, end, tags)
        for b in blocks:
            if e.present[b]:
                self._lru.move_to_end((e.key, b))
                if not e.verified[b]:
                    self._verify(e, b)
        if tags is not None and not all(e.authed[b] for b in blocks if e.present[b]):
            self._check_cached(e, tags, [b for b in blocks if e.present[b] and not e.authed[b]])
        if not all(e.have(b) for b in blocks):  # a damaged block was dropped: fetch it again
            await self._ensure(key, etag, e, offset, end)
            return await self._read(key, etag, size, offset, end, None, tags)
        return self._gather(e, offset, end)

    def _gather(self, e: CacheEntry, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)`` of ``e``, whose blocks are all present or pending: runs of
        present blocks by one pread of the cache file each, pending ones copied from memory."""
        bs = self.block_size
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            if e.present[pos // bs]:
                stop = pos
                while stop < end and e.present[stop // bs]:
                    stop = min(end, (stop // bs + 1) * bs)
                parts.append(os.pread(e.fd, stop - pos, pos))
            else:
                c = e.pending[pos // bs]  # a chunk holds its blocks whole: it covers pos
                stop = min(end, c.lo + len(c.data))
                parts.append(c.data[pos - c.lo:stop - c.lo])
            pos = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_through(self, key: str, etag: str, size: int, offset: int, end: int,
                            tags: BlockTags | None = None) -> bytes:
        """Bytes [offset, end) straight from the store, not cached (checked against ``tags``
        when given: whole tagged blocks are fetched). TruncatedObject if short, IntegrityError
        if a block fails its tag twice."""
        if tags is None:
            return await self._get(key, etag, size, offset, end)
        version = (key, etag)
        lo, hi = tags.span(offset, end)
        # the kernel's reads (up to 1 MiB, two or more at once) do not start on tagged blocks:
        # blocks a kept span holds, or a read in flight is fetching, are not read again (each
        # read fetched 1.5 times its size: a new-user trial)
        while True:
            parts, fetched = self._kept_head(version, tags.k, lo, hi)
            if fetched >= hi:
                return b"".join(parts)[offset - lo:end - lo]
            busy = next((ev for a, b, ev in self._fetching.get(version, ()) if a <= fetched < b), None)
            if busy is None:
                break
            await busy.wait()  # then look again: its span is kept (or it failed: fetch here)
        if not self.store.local_disk:  # nothing kept, nothing to wait for
            data = await self._get_checked(key, etag, tags, fetched, hi)
        else:
            with self._in_flight(version, fetched, hi):
                data = await self._get_checked(key, etag, tags, fetched, hi)
            self._keep_checked(version, fetched, data, tags.k)
        return (b"".join(parts) + data if parts else data)[offset - lo:end - lo]

    def _kept_head(self, version: tuple[str, str], k: bytes, lo: int, hi: int) -> tuple[list[bytes], int]:
        """The head of bytes [lo, hi) of ``version`` that its spans kept under tag key ``k``
        hold, one after another: (the pieces, the offset where they end: a tagged block's start,
        as kept spans end on one or at the object's end). Spans checked under another key (an
        envelope put on the same body since: CacheEntry.check_under) hold nothing for ``k``."""
        kept_k, spans = self._checked.get(version, (k, []))
        if kept_k != k:
            spans = []
        parts: list[bytes] = []
        while lo < hi:
            span = next(((at, kept) for at, kept in spans if at <= lo < at + len(kept)), None)
            if span is None:
                break
            at, kept = span
            parts.append(kept[lo - at:min(hi, at + len(kept)) - at])
            lo += len(parts[-1])
        if parts:
            self._checked.move_to_end(version)
        return parts, lo

    @contextlib.contextmanager
    def _in_flight(self, version: tuple[str, str], lo: int, hi: int) -> Iterator[None]:
        """Bytes [lo, hi) of ``version`` are being fetched meanwhile: a read of them waits for
        the end (and then finds them kept, or fetches them itself)."""
        flight = (lo, hi, trio.Event())
        self._fetching.setdefault(version, []).append(flight)
        try:
            yield
        finally:
            self._fetching[version].remove(flight)
            if not self._fetching[version]:
                del self._fetching[version]
            flight[2].set()

    def _keep_checked(self, version: tuple[str, str], lo: int, data: bytes, k: bytes) -> None:
        """Keep span ``data`` at ``lo`` of ``version``, checked under tag key ``k``, in memory: the last
        _CHECKED_SPANS spans of a version (those it covers dropped), _CHECKED_MAX bytes in all
        (the least recently used versions dropped)."""
        if len(data) > _CHECKED_MAX:
            return
        old_k, old = self._checked.pop(version, (k, []))
        self._checked_bytes -= sum(len(d) for _, d in old)
        if old_k != k:  # a reader under another key kept them while this span was fetched
            old = []
        hi = lo + len(data)
        spans = ([sp for sp in old if not (lo <= sp[0] and sp[0] + len(sp[1]) <= hi)] + [(lo, data)])[-_CHECKED_SPANS:]
        self._checked[version] = (k, spans)
        self._checked_bytes += sum(len(d) for _, d in spans)
        while self._checked_bytes > _CHECKED_MAX:
            self._forget_checked(next(iter(self._checked)))

    def _forget_checked(self, version: tuple[str, str]) -> None:
        for _, kept in self._checked.pop(version, (b"", []))[1]:
            self._checked_bytes -= len(kept)

    async def _get(self, key: str, etag: str, size: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of version (key, etag) by one ranged GET; TruncatedObject if short."""
        data = await self.store.get_range(key, lo, hi, if_match=etag)
        if len(data) != hi - lo:
            raise TruncatedObject(f"object is truncated: asked bytes {lo}-{hi - 1} of {size}, "
                                  f"got {len(data)}")
        return data

    async def _get_checked(self, key: str, etag: str, tags: BlockTags, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) (whole tagged blocks) checked against ``tags``; a block that fails is
        fetched once more (a damaged response), and if it fails again IntegrityError names the
        object, the block and the ETag (the reader logs it: one line)."""
        data = await self._get(key, etag, tags.size, lo, hi)
        bad = await self._bad_blocks(tags, lo, data)
        if not bad:
            return data
        buf = bytearray(data)
        for i in bad:
            self.stats["integrity_refetches"] += 1
            if (key, etag, i) not in self._refetch_said:  # (once: each read of it comes here again, a trial)
                if len(self._refetch_said) >= _REFETCH_SAID_MAX:
                    self._refetch_said.clear()
                self._refetch_said.add((key, etag, i))
                log.info("block %d of %r (ETag %s) fails its integrity tag; fetching it again", i, key, etag)
            blo, bhi = tags.span(i * tags.block, i * tags.block + 1)
            again = await self._get(key, etag, tags.size, blo, bhi)
            if await self._bad_blocks(tags, blo, again):
                self.stats["integrity_failures"] += 1
                raise IntegrityError(f"block {i} (bytes {blo}-{bhi - 1}) of version ETag {etag} fails its "
                                     f"integrity tag (fetched twice): the stored object is damaged", (blo, bhi))
            buf[blo - lo:bhi - lo] = again
        return bytes(buf)

    @staticmethod
    async def _bad_blocks(tags: BlockTags, lo: int, data: bytes) -> list[int]:
        """``tags.bad_blocks(lo, data)``: in a worker thread for a large fetch (HMAC-SHA256 at
        ~1 GB/s: milliseconds the event loop would not serve FUSE), on the event loop up to
        _INLINE_STORE_MAX bytes (microseconds: less than the thread hand-off, one per small
        file read)."""
        if len(data) <= _INLINE_STORE_MAX:
            return tags.bad_blocks(lo, data)
        return await trio.to_thread.run_sync(tags.bad_blocks, lo, data)

    def _check_cached(self, e: CacheEntry, tags: BlockTags, blocks: list[int]) -> None:
        """Check present cache blocks ``blocks`` of ``e`` that were cached without a check (read
        ahead before the data key was unwrapped, or kept from an earlier mount) against
        ``tags``, reading whole tagged blocks from the cache file; a block that fails, or whose
        tagged block is not all cached, is dropped (the caller fetches it again)."""
        bs = self.block_size
        for b in blocks:
            if not e.present[b] or e.authed[b]:
                continue
            lo, hi = tags.span(b * bs, b * bs + e.block_len(b))
            cover = range(lo // bs, (hi - 1) // bs + 1)
            if all(e.present[c] for c in cover) and not tags.bad_blocks(lo, os.pread(e.fd, hi - lo, lo)):
                for c in cover:
                    if lo <= c * bs and c * bs + e.block_len(c) <= hi:
                        e.authed[c] = 1
            if not e.authed[b]:
                self._unmark(e, b)

    async def tags_for(self, key: str, etag: str, size: int, metadata: dict[str, str],
                       data_key: bytes, iv: bytes) -> BlockTags | None:
        """The integrity tags of version (key, etag) of ``size`` bytes with ``metadata`` and
        data key/IV (None: it has none, e.g. written by an SDK). A tag list kept beside the
        object is fetched once and kept in memory, for that data key and IV: an envelope that
        names others on the same body (same ETag) has its tags checked anew under its own key
        (a re-wrap, ``ossfuse rekey``, keeps both; a trial put another object's envelope on an
        unchanged body and the running mount served garbage, the kept tags being of the old
        key). Raises IntegrityError when the header or the list is damaged or the list is
        missing, StoreError when the list cannot be read."""
        got = self._tag_lists.get((key, etag))
        if got is not None and got[0] == data_key and got[1] == iv:
            self._tag_lists.move_to_end((key, etag))
            return got[2]
        spec: TagSpec | None = parse_tags(metadata)
        if spec is None:
            return None
        try:
            tags = await load_tags(self.store, spec, key, size, data_key, iv)
        except IntegrityError as e:
            raise IntegrityError(f"version ETag {etag}: {e}") from None
        self._tag_lists[(key, etag)] = (data_key, iv, tags)
        self._tag_lists.move_to_end((key, etag))
        while len(self._tag_lists) > _MAX_TAG_LISTS:
            self._tag_lists.popitem(last=False)
        return tags

    def check_whole(self, key: str, etag: str, tags: BlockTags) -> int:
        """Check every cached block of version (key, etag) again, as a read of blocks kept
        from an earlier mount would (CRC-32, then ``tags``), also those checked before (the
        file may have changed on disk since); one that fails is dropped. For a version about
        to go back to the bucket whole (a put-back: :meth:`whole_file` takes only checked
        blocks). Returns how many blocks failed (the caller says so: they cannot be fetched
        again, the bucket no longer has them)."""
        e = self._entries.get((key, etag))
        if e is None or e.dropped or e.pending:
            return 0
        before = sum(e.present)
        e.authed[:] = bytes(e.nblocks)
        for b in range(e.nblocks):
            if e.present[b] and not e.verified[b]:
                self._verify(e, b, refetched=False)
        e.check_under(tags)
        self._check_cached(e, tags, [b for b in range(e.nblocks) if e.present[b] and not e.authed[b]])
        return before - sum(e.present)

    def _verify(self, e: CacheEntry, b: int, refetched: bool = True) -> None:
        """Check a block kept from an earlier mount against its CRC-32; drop it if damaged
        (``refetched``: a read fetches it again, and one WARNING says so; else the caller
        says what comes of it: a put-back's block the bucket no longer has)."""
        e.verified[b] = 1
        data = os.pread(e.fd, e.block_len(b), b * self.block_size)
        if _crc32(data) != e.crc[b]:
            if refetched:
                log.warning("cache file of %r is damaged (block %d); fetching it again", e.key[0], b)
            self._unmark(e, b)

    async def keep(self, key: str, etag: str, size: int) -> bool:
        """Bring the whole version (key, etag) of ``size`` bytes into the cache and pin it (it is
        about to be replaced in the store while a handle still reads it), if it fits: pinned
        versions together stay within half of ``max_size``, and the disk keeps ``min_free``.
        Returns False, pinning nothing, when it does not fit. Raises what :meth:`read` raises."""
        if not size:
            return True
        e = self._entries.get((key, etag))
        if e is not None and e.pinned:
            return True
        missing = size if e is None else sum(e.block_len(b) for b in range(e.nblocks) if not e.present[b])
        if self.pinned_bytes + size > self.max_size // 2 or self._free_space() - missing < self.min_free:
            return False
        e = self.entry(key, etag, size)
        e.pinned = True
        self.pinned_bytes += size
        try:
            await self._ensure(key, etag, e, 0, size)
            while e.pending:  # blocks read ahead by others: until on disk (or not cached)
                await next(iter(e.pending.values())).written.wait()
        except IntegrityError as err:  # a damaged block is not kept: its handles get EIO for it
            log.info("not keeping %r: %s", key, err)
            self.unpin(e)
            return False
        except BaseException:
            self.unpin(e)
            raise
        if not all(e.present):  # the disk filled meanwhile
            self.unpin(e)
            return False
        return True

    @contextlib.contextmanager
    def whole_file(self, key: str, etag: str, size: int) -> Iterator[str | None]:
        """The cache file of version (key, etag) of ``size`` bytes when it holds every block,
        each checked against the version's integrity tags (its ciphertext exactly as the
        bucket held it), kept so (no block dropped) until the ``with`` block ends; None when a
        block is missing, being written or unchecked."""
        e = self._entries.get((key, etag))
        if (e is None or e.dropped or e.size != size or e.pending or not size
                or not all(e.present) or not all(e.authed)):
            yield None
            return
        was, e.pinned = e.pinned, True
        try:
            yield e.path
        finally:
            e.pinned = was

    def unpin(self, e: CacheEntry) -> None:
        if e.pinned:
            e.pinned = False
            self.pinned_bytes -= e.size

    def read_ahead(self, key: str, etag: str, size: int, start: int, end: int) -> None:
        """Start fetching the missing blocks of ``[start, end)`` (clipped to ``size`` bytes) of
        version (key, etag) in the background; returns at once. Nothing for a local-disk store,
        whose reads are not cached."""
        end = min(end, size)
        if end > start and not self.store.local_disk:
            self._prefetch(key, etag, self.entry(key, etag, size), start, end)

    def _prefetch(self, key: str, etag: str, e: CacheEntry, start: int, end: int, *,
                  whole_chunks: bool = False) -> None:
        """Fetch the missing blocks of ``[start, end)`` in the background, in parallel ranged
        GETs; a reader that needs one of them waits for its fetch instead of issuing another.
        ``whole_chunks`` (sequential read-ahead): ``end`` is rounded up to a multiple of
        _PREFETCH_CHUNK bytes and each aligned chunk's missing blocks are one GET."""
        if self._nursery is None:
            return
        bs = self.block_size
        chunk = max(1, (_PREFETCH_CHUNK if whole_chunks else _FETCH_CHUNK) // bs)  # blocks
        last = (end - 1) // bs
        if whole_chunks:
            last = min(e.nblocks - 1, (last // chunk + 1) * chunk - 1)
        missing = [b for b in range(start // bs, last + 1) if not e.have(b) and b not in e.inflight]
        groups: list[list[int]] = []
        for b in missing:
            if groups and (b // chunk == groups[-1][0] // chunk if whole_chunks else len(groups[-1]) < chunk):
                groups[-1].append(b)
            else:
                groups.append([b])
        for blocks in groups:
            events = {b: trio.Event() for b in blocks}
            e.inflight.update(events)
            self._nursery.start_soon(self._prefetch_blocks, key, etag, e, blocks, events)

    async def _prefetch_blocks(self, key, etag, e: CacheEntry, blocks: list[int], events) -> None:
        try:
            async with self._prefetch_buffers:
                await self._fetch_blocks(key, etag, e, blocks, max_get=_PREFETCH_CHUNK,
                                         get_limiter=self._prefetch_limiter)
            self.stats["prefetched_bytes"] += sum(e.block_len(b) for b in blocks)
            self.evict()
        except (StoreError, IntegrityError) as err:  # best effort: the reader fetches (and reports) what it needs
            log.debug("read-ahead of %r failed: %s", key, err)
        except Exception as err:  # noqa: BLE001 - a background task: logged, never fatal to the mount
            log.warning("read-ahead of %r failed: %s: %s", key, type(err).__name__, err)
        finally:
            _release(e, events)

    async def _ensure(self, key: str, etag: str, e: CacheEntry, start: int, end: int) -> None:
        """Fetch the missing blocks of ``[start, end)`` and wait for those other tasks are
        fetching. One pass: the caller checks what is present (limits may evict at once)."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        waits = [e.inflight[b] for b in range(first, last + 1) if not e.have(b) and b in e.inflight]
        missing = [b for b in range(first, last + 1) if not e.have(b) and b not in e.inflight]
        if not missing and not waits:
            self.stats["hits"] += 1
            return
        if missing:
            self.stats["misses"] += 1
            events = {b: trio.Event() for b in missing}
            e.inflight.update(events)
            try:
                await self._fetch_blocks(key, etag, e, missing)
            finally:
                _release(e, events)
            self.evict()
        for ev in waits:
            await ev.wait()

    async def _fetch_blocks(self, key: str, etag: str, e: CacheEntry, blocks: list[int],
                            max_get: int = _FETCH_CHUNK, get_limiter: trio.CapacityLimiter | None = None) -> None:
        """Fetch ``blocks`` of ``e``: runs of adjacent blocks coalesced into ranged GETs of at
        most ``max_get`` bytes, _FETCH_PARALLEL at once; ``get_limiter`` (if given) is held
        for each GET and its check, not while the bytes are written to the cache file."""
        bs = self.block_size
        ranges: list[tuple[int, int]] = []
        for b in blocks:  # coalesce runs of blocks, cut into GETs of at most max_get bytes
            lo, hi = b * bs, min(e.size, (b + 1) * bs)
            if ranges and ranges[-1][1] == lo and hi - ranges[-1][0] <= max_get:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))

        async def get(lo: int, hi: int, tags: BlockTags | None) -> bytes:
            if tags is not None:  # whole tagged blocks, checked before anything is cached
                return await self._get_checked(key, etag, tags, lo, hi)
            return await self._get(key, etag, e.size, lo, hi)

        async def fetch(lo: int, hi: int) -> None:
            tags = e.tags
            if tags is not None:
                lo, hi = tags.span(lo, hi)
            if get_limiter is None:
                data = await get(lo, hi, tags)
            else:
                async with get_limiter:
                    data = await get(lo, hi, tags)
            # the cache blocks wholly inside [lo, hi): only those become present
            whole = [b for b in range(-(-lo // bs), (hi - 1) // bs + 1) if (b + 1) * bs <= hi or hi == e.size]
            chunk = self._hold(e, _Chunk(lo, data, tags.k if tags is not None else None), whole)
            for b in whole:
                ev = e.inflight.pop(b, None)
                if ev is not None:
                    ev.set()
            await self._land(e, chunk, whole)

        await run_all([functools.partial(fetch, lo, hi) for lo, hi in ranges], _FETCH_PARALLEL)

    @staticmethod
    def _hold(e: CacheEntry, chunk: _Chunk, whole: list[int]) -> _Chunk:
        """Make blocks ``whole`` of ``e`` (all inside ``chunk``) pending on ``chunk``: readers
        are answered from its bytes from now on, while :meth:`_land` writes them to the cache
        file (on a loaded disk, the slow part)."""
        for b in whole:
            e.pending[b] = chunk
        return chunk

    async def _land(self, e: CacheEntry, chunk: _Chunk, whole: list[int]) -> None:
        """Write ``chunk`` (made pending by :meth:`_hold`) to ``e``'s cache file and mark its
        blocks ``whole`` present; whatever happens, they stop being pending and
        ``chunk.written`` is set. A full cache disk first drops old blocks, then leaves the
        blocks uncached (one WARNING until the disk takes blocks again)."""
        try:
            await self._write_chunk(e, chunk, whole)
        finally:
            for b in whole:
                if e.pending.get(b) is chunk:
                    del e.pending[b]
            chunk.written.set()

    async def _write_chunk(self, e: CacheEntry, chunk: _Chunk, whole: list[int]) -> None:
        lo, data = chunk.lo, chunk.data
        crcs: list[int] = []
        for again in (False, True):
            if e.dropped:
                return
            # A worker thread writes and sums the chunk (8 MiB: milliseconds the event loop
            # would not serve FUSE reads), on its own dup of the cache file: the entry's fd may
            # be closed (open-file limit, drop) and its number reused meanwhile.
            fd = os.dup(e.fd)
            try:
                if len(data) <= _INLINE_STORE_MAX:
                    crcs = self._store_chunk(fd, data, lo, whole)
                else:
                    crcs = await trio.to_thread.run_sync(self._store_chunk, fd, data, lo, whole)
                break
            except OSError as err:
                if not again and err.errno == errno.ENOSPC and self.evict(need=len(data)):
                    continue  # room was made by dropping old blocks
                # Not cached: later readers find the blocks missing and read from the store.
                now = time.monotonic()
                if not self._write_failing and now - self._write_warned_at >= _WRITE_WARN_EVERY:
                    self._write_warned_at = now
                    log.warning("cache disk cannot take more blocks (%s); reading %r and others "
                                "without caching until it can", err, e.key[0])
                self._write_failing = True
                return
            finally:
                os.close(fd)
        if e.dropped:
            return
        self._write_failing = False
        for b, crc in zip(whole, crcs, strict=True):
            e.crc[b] = crc
            self._mark_present(e, b)
            e.authed[b] = chunk.authed is not None and chunk.authed == e.authed_k

    def has_first_block(self, key: str, etag: str) -> bool:
        """Block 0 of version (key, etag) is cached, or being fetched or written."""
        e = self._entries.get((key, etag))
        return e is not None and e.nblocks > 0 and (e.have(0) or 0 in e.inflight)

    def offer(self, key: str, etag: str, size: int, lo: int, data: bytes) -> None:
        """Keep ``data``, ciphertext bytes ``[lo, lo + len(data))`` of version (key, etag) of
        ``size`` bytes that another layer fetched (Files' open-ahead: the GET that also
        answered for a HEAD), as read-ahead keeps what it fetches: not yet checked against
        integrity tags (a reader with tags checks them first), written in the background,
        readable at once. Blocks already cached or being fetched are left alone, and so is
        all of it on a local-disk store (its reads are not cached) or without a nursery."""
        if self.store.local_disk or self._nursery is None or not data:
            return
        e = self.entry(key, etag, size)
        bs, hi = self.block_size, lo + len(data)
        whole = [b for b in range(-(-lo // bs), (hi - 1) // bs + 1)
                 if ((b + 1) * bs <= hi or hi == size) and not e.have(b) and b not in e.inflight]
        if whole:
            self._nursery.start_soon(self._land_offered, e, self._hold(e, _Chunk(lo, data, None), whole), whole)

    async def _land_offered(self, e: CacheEntry, chunk: _Chunk, whole: list[int]) -> None:
        try:
            await self._land(e, chunk, whole)
            self.evict()
        except Exception as err:  # noqa: BLE001 - a background task: logged, never fatal to the mount
            log.warning("caching fetched bytes of %r failed: %s: %s", e.key[0], type(err).__name__, err)

    def _store_chunk(self, fd: int, data: bytes, lo: int, blocks: list[int]) -> list[int]:
        """Write ``data`` (the bytes at offset ``lo``) to cache file ``fd``; returns the CRC-32
        of each of cache blocks ``blocks`` (wholly inside it). Runs in a worker thread. Raises
        OSError (ENOSPC: a full cache disk)."""
        view = memoryview(data)
        done = 0
        while done < len(data):  # pwrite may write less than asked
            done += os.pwrite(fd, view[done:], lo + done)
        bs = self.block_size
        return [_crc32(view[b * bs - lo:min(lo + len(data), (b + 1) * bs) - lo]) for b in blocks]

    def close(self) -> None:
        """Close every file and index the entries for the next mount (clean unmount): one index
        file for all of them (a file per entry cost ~3 ms each at unmount on a loaded machine)."""
        records = []
        for e in list(self._entries.values()):
            e.close()
            if e.pinned or not any(e.present):
                self.drop(*e.key)  # pinned: its object is gone from the store
                continue
            try:
                if any(e.present[b] and e.crc[b] is None for b in range(e.nblocks)):
                    self._set_crcs(e, self._block_crcs(e))  # uploaded at unmount: not summed yet
            except OSError:
                continue  # unreadable: not kept
            records.append({"file": os.path.basename(e.path), "key": e.key[0], "etag": e.key[1], "size": e.size,
                            "block_size": self.block_size, "present": base64.b64encode(bytes(e.present)).decode(),
                            "crc": e.crc})
        if records:
            tmp = os.path.join(self.dir, _INDEX + ".tmp")
            try:
                with open(tmp, "w") as f:
                    json.dump(records, f)
                os.replace(tmp, os.path.join(self.dir, _INDEX))
            except OSError as err:
                log.warning("cannot index the cache for the next mount: %s", err)
        self._entries.clear()
        self._open.clear()
