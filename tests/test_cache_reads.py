"""Block cache reads. Over a remote store, the block cache answers readers from fetched bytes while they are written to the cache file
(ossfuse/cache.py, ``CacheEntry.pending``): a reader waiting for read-ahead gets the right bytes
before the cache file has them; the blocks become present (with their CRC) once written; a block
read ahead before the tags were known is checked on disk first; ``keep`` returns only with every
block on disk. In-process, over a store that holds one object in memory; the write to the cache
file is held back by a gate (a threading.Event) so the order is fixed, not timed."""
from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from ossfuse import integrity
from ossfuse.cache import BlockCache
from ossfuse.store.base import PreconditionFailed

BS = 64 << 10  # cache block size in these tests (bytes)
KEY, ETAG = "obj", "etag-1"


class MemStore:
    """An object store of one object in memory (not a local disk: the cache is used); counts GETs."""

    local_disk = False

    def __init__(self, data: bytes):
        self.data = data
        self.gets: list[tuple[int, int]] = []

    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        assert key == KEY
        if if_match is not None and if_match != ETAG:
            raise PreconditionFailed(key)
        self.gets.append((start, end))
        await trio.sleep(0)
        return self.data[start:end]


async def until(cond) -> None:
    """Wait (up to 10 s) for ``cond()``: a write in a worker thread has no task to wait for."""
    with trio.fail_after(10):
        while not cond():
            await trio.sleep(0.005)


def _gated_cache(tmp_path, store, monkeypatch) -> tuple[BlockCache, threading.Event, list[int]]:
    """A cache whose writes of fetched chunks wait for the returned gate; the list gets the
    offset of each chunk as its write starts."""
    c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)
    gate = threading.Event()
    started: list[int] = []
    real = BlockCache._store_chunk

    def gated(self, fd, data, lo, blocks):
        started.append(lo)
        assert gate.wait(10), "the test never opened the gate"
        return real(self, fd, data, lo, blocks)

    monkeypatch.setattr(BlockCache, "_store_chunk", gated)
    return c, gate, started


def test_a_reader_gets_read_ahead_bytes_before_they_are_on_disk(tmp_path, monkeypatch):
    data = os.urandom(40 * BS + 123)
    store = MemStore(data)
    c, gate, started = _gated_cache(tmp_path, store, monkeypatch)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            e = c.entry(KEY, ETAG, len(data))
            c.read_ahead(KEY, ETAG, len(data), 0, 16 * BS)  # one GET (up to 4 MiB)
            await until(lambda: started)  # the fetched chunk's write has begun
            assert not any(e.present), "nothing is on disk while the gate is shut"
            # a read across the read-ahead, not block aligned: answered from memory
            got = await c.read(KEY, ETAG, len(data), 3 * BS + 5, 5 * BS)
            assert got == data[3 * BS + 5:8 * BS + 5]
            assert not any(e.present)
            gets_before = len(store.gets)
            gate.set()
            await until(lambda: not e.pending)
            assert all(e.present[:16])
            assert all(crc is not None for crc in e.crc[:16])
            # from the file now, no new GET
            assert await c.read(KEY, ETAG, len(data), 3 * BS + 5, 5 * BS) == data[3 * BS + 5:8 * BS + 5]
            assert len(store.gets) == gets_before
            # the short last block, fetched by a reader of its own
            tail = await c.read(KEY, ETAG, len(data), 39 * BS, 2 * BS)
            assert tail == data[39 * BS:]
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_read_spanning_disk_and_pending_blocks_joins_them(tmp_path, monkeypatch):
    data = os.urandom(12 * BS)
    store = MemStore(data)
    c, gate, started = _gated_cache(tmp_path, store, monkeypatch)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            gate.set()
            assert await c.read(KEY, ETAG, len(data), 0, 2 * BS) == data[:2 * BS]  # blocks 0-1 on disk
            e = c.entry(KEY, ETAG, len(data))
            assert e.present[0] and e.present[1]
            gate.clear()
            c.read_ahead(KEY, ETAG, len(data), 2 * BS, 6 * BS)
            await until(lambda: len(started) == 2)
            assert e.pending and not e.present[2]
            got = await c.read(KEY, ETAG, len(data), BS - 7, 3 * BS)  # block 0..3: disk then memory
            assert got == data[BS - 7:4 * BS - 7]
            gate.set()
            await until(lambda: not e.pending)
            assert all(e.present[:6])
            n.cancel_scope.cancel()

    trio.run(main)


def test_read_ahead_without_tags_is_checked_on_disk_before_a_tagged_read(tmp_path, monkeypatch):
    """Blocks read ahead before the version's tags were known are not served from memory to a
    reader that has the tags: it waits for them to be on disk and checks them there."""
    key, iv = os.urandom(32), os.urandom(16)
    data = os.urandom(8 * BS)
    k = integrity.tag_key(key, iv)
    tags = integrity.BlockTags(k, BS, len(data),
                               integrity.compute_tags(k, BS, len(data), lambda off, n: data[off:off + n]))
    damaged = bytearray(data)
    damaged[2 * BS + 10] ^= 1
    store = MemStore(bytes(damaged))
    c, gate, started = _gated_cache(tmp_path, store, monkeypatch)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            c.read_ahead(KEY, ETAG, len(data), 0, 8 * BS)  # no tags yet
            await until(lambda: started)
            e = c.entry(KEY, ETAG, len(data))
            assert 2 in e.pending
            store.data = data  # the refetch after the failed check gets good bytes
            async with trio.open_nursery() as inner:
                result: list[bytes] = []

                async def reader():
                    result.append(await c.read(KEY, ETAG, len(data), 2 * BS, BS, tags=tags))
                inner.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert not result, "a tagged reader must not take unchecked bytes from memory"
                gate.set()
            assert result == [data[2 * BS:3 * BS]]
            assert store.gets[-1] == (2 * BS, 3 * BS)  # the damaged block was fetched again
            n.cancel_scope.cancel()

    trio.run(main)


def test_keep_returns_with_every_block_on_disk(tmp_path, monkeypatch):
    data = os.urandom(10 * BS)
    store = MemStore(data)
    c, gate, started = _gated_cache(tmp_path, store, monkeypatch)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            c.read_ahead(KEY, ETAG, len(data), 0, len(data))
            await until(lambda: started)
            e = c.entry(KEY, ETAG, len(data))
            assert e.pending
            done: list[bool] = []

            async def keeper():
                done.append(await c.keep(KEY, ETAG, len(data)))
            n.start_soon(keeper)
            await trio.testing.wait_all_tasks_blocked()
            assert not done, "keep must wait for the pending write"
            gate.set()
            await until(lambda: done)
            assert done == [True] and all(e.present) and e.pinned
            with open(e.path, "rb") as f:
                assert f.read() == data
            n.cancel_scope.cancel()

    trio.run(main)


def test_read_ahead_gets_go_on_while_writes_wait_up_to_the_buffer_bound(tmp_path, monkeypatch):
    """A slow cache disk does not hold the read-ahead GET slots: with every write held back,
    GETs go on past _PREFETCH_PARALLEL until _PREFETCH_BUFFERS chunks wait in memory, no more;
    every byte reads back once the writes go through."""
    from ossfuse import cache as cache_mod
    monkeypatch.setattr(cache_mod, "_FETCH_CHUNK", 2 * BS)  # read_ahead: one GET per 2 blocks
    data = os.urandom(40 * BS)
    store = MemStore(data)
    c, gate, started = _gated_cache(tmp_path, store, monkeypatch)
    assert cache_mod._PREFETCH_BUFFERS > cache_mod._PREFETCH_PARALLEL

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            c.read_ahead(KEY, ETAG, len(data), 0, len(data))  # 20 GETs of 2 blocks
            await until(lambda: len(started) == cache_mod._PREFETCH_BUFFERS)
            await trio.sleep(0.05)
            assert len(store.gets) == len(started) == cache_mod._PREFETCH_BUFFERS
            e = c.entry(KEY, ETAG, len(data))
            assert len(e.pending) == 2 * cache_mod._PREFETCH_BUFFERS
            gate.set()
            await until(lambda: all(e.present))
            assert len(store.gets) == 20 and not e.pending
            assert await c.read(KEY, ETAG, len(data), 0, len(data)) == data
            n.cancel_scope.cancel()

    trio.run(main)


# -- a local-disk store: tagged blocks are read and checked once per sequential pass ---------
def test_sequential_small_reads_on_a_local_store_read_each_tagged_block_once(tmp_path, cmk_path, monkeypatch):
    """A local bucket is read through (not cached), and a tagged object is checked per tagged
    block (here 64 KiB): 16 KiB reads in a row read each block once, not once per read; a new
    version (new ETag) is read afresh; the memory kept is bounded by _CHECKED_MAX bytes."""
    from fakes.core import committed_file, core_filesystem

    from ossfuse import cache as cache_mod

    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        data = os.urandom(2 << 20)  # 2 MiB: 32 tagged blocks of 64 KiB
        node = await committed_file(fs, "f", data)
        h = await fs.open(node, os.O_RDONLY)
        fs.store.reset_counts()
        got = bytearray()
        while len(got) < len(data):
            got += await fs.read(h, len(got), 16 << 10)
        assert bytes(got) == data
        assert fs.store.counts["get_range"] == 32  # 128 reads, one GET per tagged block
        await fs.release(h)
        # another version of the same name: its own bytes, not the memory of the old one
        new = os.urandom(len(data))
        etag = h.version.etag
        h = await fs.open(node, os.O_RDWR)
        await fs.write(h, 0, new)
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        h = await fs.open(node, os.O_RDONLY)
        assert h.version.etag != etag
        assert await fs.read(h, 0, 16 << 10) == new[:16 << 10]
        await fs.release(h)
        # bounded: with room for one block only, reading two files in turn keeps one block
        monkeypatch.setattr(cache_mod, "_CHECKED_MAX", 64 << 10)
        other = await committed_file(fs, "g", data)
        hf, hg = await fs.open(node, os.O_RDONLY), await fs.open(other, os.O_RDONLY)
        fs.store.reset_counts()
        for off in (0, 16 << 10):
            assert await fs.read(hf, off, 16 << 10) == new[off:off + (16 << 10)]
            assert await fs.read(hg, off, 16 << 10) == data[off:off + (16 << 10)]
        assert fs.store.counts["get_range"] == 3  # f's block 0 was kept from above; then each evicts the other
        assert fs.cache._checked_bytes == 64 << 10 and len(fs.cache._checked) == 1
        await fs.release(hf)
        await fs.release(hg)

    trio.run(main)


def test_unaligned_reads_two_at_a_time_on_a_local_store_fetch_each_tagged_block_once(tmp_path, cmk_path):
    """The kernel's reads of a file (up to 1 MiB, several at once) do not start on tagged
    blocks: each spanned a block the read before had fetched, which was fetched and checked
    again (a new-user trial: `dd bs=128k` of 100 MB read 150 MB from the bucket, `cat` of
    300 MB 629 MB). Here 96 KiB reads starting 16 KiB into a 64 KiB block, two in flight at a
    time: every tagged block is fetched once and the bytes are right."""
    from fakes.core import committed_file, core_filesystem

    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        data = os.urandom(2 << 20)  # 32 tagged blocks of 64 KiB
        node = await committed_file(fs, "f", data)
        h = await fs.open(node, os.O_RDONLY)
        fetched: list[tuple[int, int]] = []
        real = fs.store.get_range

        async def get_range(key, start, end, **kw):
            fetched.append((start, end))
            return await real(key, start, end, **kw)
        fs.store.get_range = get_range
        got: dict[int, bytes] = {0: await fs.read(h, 0, 16 << 10)}
        offsets = list(range(16 << 10, len(data), 96 << 10))

        async def read(off):
            got[off] = await fs.read(h, off, 96 << 10)
        for i in range(0, len(offsets), 2):  # two reads at once, as the kernel's read-ahead sends them
            async with trio.open_nursery() as n:
                for off in offsets[i:i + 2]:
                    n.start_soon(read, off)
        assert b"".join(got[k] for k in sorted(got)) == data
        assert sorted(fetched) == sorted(set(fetched)) and sum(e - s for s, e in fetched) == len(data), str(fetched)
        await fs.release(h)

    trio.run(main)


def test_a_small_tagged_fetch_is_checked_without_a_thread_hand_off(tmp_path, monkeypatch):
    """A fetch of at most _INLINE_STORE_MAX bytes (a small file) is checked against its tags
    and written on the event loop (a hand-off cost more than the HMAC: one per small file
    ``cat``), a larger one in a worker thread; either way a damaged block is fetched again and
    a block damaged twice is an IntegrityError, never data."""
    from ossfuse import cache as cache_mod
    hand_offs: list[str] = []
    real_run_sync = trio.to_thread.run_sync

    async def counted(fn, *args, **kw):
        hand_offs.append(getattr(fn, "__name__", repr(fn)))
        return await real_run_sync(fn, *args, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    key, iv = os.urandom(32), os.urandom(16)
    for size, threads in ((4096, []), (cache_mod._INLINE_STORE_MAX + 1, ["bad_blocks", "_store_chunk"])):
        data = os.urandom(size)
        k = integrity.tag_key(key, iv)
        tags = integrity.BlockTags(k, 4096, size,
                                   integrity.compute_tags(k, 4096, size, lambda off, n: data[off:off + n]))
        store = MemStore(data)
        c = BlockCache(str(tmp_path / f"cache{size}"), store, BS, max_size=64 << 20, min_free=0)

        async def main():
            async with trio.open_nursery() as n:
                c.start(n)
                hand_offs.clear()
                assert await c.read(KEY, ETAG, size, 0, size, tags=tags) == data
                assert sorted(hand_offs) == sorted(threads), (size, hand_offs)
                c.drop(KEY, ETAG)
                damaged = bytearray(data)
                damaged[10] ^= 1
                store.data = bytes(damaged)
                with pytest.raises(integrity.IntegrityError):
                    await c.read(KEY, ETAG, size, 0, size, tags=tags)
                assert store.gets[-2:] == [(0, size), (0, 4096)]  # the whole fetch, then block 0 again
                n.cancel_scope.cancel()

        trio.run(main)


def test_a_version_whose_entry_has_no_file_yet_can_be_relabelled(tmp_path):
    """An entry made before its first block was written (an open starts fetching; a chmod
    then copies the object onto itself and relabels its blocks) has no file yet: relabelling
    it raised FileNotFoundError, and the chmod failed (found by the model-based test over an
    OSS-like store). Now it moves nothing, and reads of the new label fetch and work."""
    data = os.urandom(3 * BS)

    class Copied(MemStore):
        async def get_range(self, key, start, end, *, if_match=None):
            return await super().get_range(key, start, end, if_match=ETAG if if_match == "etag-2" else if_match)

    async def main():
        store = Copied(data)
        c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)
        c.entry(KEY, ETAG, len(data))  # no block fetched: no file
        c.rekey(KEY, ETAG, KEY, "etag-2")
        assert await c.read(KEY, "etag-2", len(data), 0, len(data)) == data
        assert store.gets
        c.close()

    trio.run(main)


def _tags_under_two_keys(data: bytes, tb: int, bad: int) -> tuple[integrity.BlockTags, integrity.BlockTags]:
    """Tags of ``data`` (tagged blocks of ``tb`` bytes) under two tag keys, as two envelopes
    on one body give: (A's, whose tag of the tagged block at byte ``bad`` is wrong, B's)."""
    ka, kb = (integrity.tag_key(os.urandom(32), os.urandom(16)) for _ in range(2))
    tags = {k: bytearray(integrity.compute_tags(k, tb, len(data), lambda o, n: data[o:o + n])) for k in (ka, kb)}
    tags[ka][(bad // tb) * integrity.TAG] ^= 1
    return (integrity.BlockTags(ka, tb, len(data), bytes(tags[ka])),
            integrity.BlockTags(kb, tb, len(data), bytes(tags[kb])))


class _FirstGetHeld(MemStore):
    """The first GET from byte 0 waits for ``gate`` (a reader's fetch, held)."""

    def __init__(self, data: bytes, local_disk: bool):
        super().__init__(data)
        self.local_disk = local_disk
        self.gate = trio.Event()

    async def get_range(self, key, start, end, *, if_match=None):
        if start == 0 and not any(s == 0 for s, _ in self.gets):
            self.gets.append((start, end))
            await self.gate.wait()
            return self.data[start:end]
        return await super().get_range(key, start, end, if_match=if_match)


def test_blocks_kept_under_one_data_key_are_never_read_under_another(tmp_path):
    """A local bucket's tagged reads keep the blocks they checked, per version, in memory. One
    version read under two data keys (an envelope put on the same body after one handle opened:
    CacheEntry.check_under): a fetch under key A that was under way while a read under key B
    kept another block merged B's block into A's as if A's tags had passed it, and a later read
    under A returned a block A's tags reject (garbage plaintext once decrypted with A's data
    key). Now a key's reads see only blocks checked under that key: IntegrityError there."""
    size, tb = 2 * 4096, 4096
    data = os.urandom(size)
    tags_a, tags_b = _tags_under_two_keys(data, tb, bad=tb)  # block 1 fails under A

    async def main():
        store = _FirstGetHeld(data, local_disk=True)  # A's fetch of block 0, held
        c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)
        got = {}

        async def read_a():
            got["a"] = await c.read(KEY, ETAG, size, 0, tb, tags=tags_a)
        async with trio.open_nursery() as n:
            n.start_soon(read_a)
            await until(lambda: store.gets)
            assert await c.read(KEY, ETAG, size, tb, tb, tags=tags_b) == data[tb:]  # B keeps block 1
            store.gate.set()
        assert got["a"] == data[:tb]
        with pytest.raises(integrity.IntegrityError):
            await c.read(KEY, ETAG, size, tb, tb, tags=tags_a)
        assert await c.read(KEY, ETAG, size, 0, size, tags=tags_b) == data
        c.close()

    trio.run(main)


def test_cached_blocks_checked_under_another_data_key_are_checked_again_after_a_fetch(tmp_path):
    """The block cache marks the blocks it checked, under one tag key per version
    (CacheEntry.check_under). A read under key A waits for a fetch of one block; meanwhile a
    read under key B (an envelope put on the same body since A's handle opened) checks another,
    cached block under B. A then took B's mark for its own and returned that block without
    checking it against A's tags, which reject it (garbage plaintext under A's data key). Now
    A checks again after the fetch: IntegrityError."""
    size, tb = 2 * BS, 4096
    data = os.urandom(size)
    tags_a, tags_b = _tags_under_two_keys(data, tb, bad=BS)  # cache block 1's first tagged block fails under A

    async def main():
        store = _FirstGetHeld(data, local_disk=False)  # A's fetch of block 0, held
        c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)
        got = {}

        async def read_a():
            try:
                got["a"] = await c.read(KEY, ETAG, size, 0, size, tags=tags_a)
            except integrity.IntegrityError as err:
                got["a"] = err
        async with trio.open_nursery() as n:
            c.start(n)
            assert await c.read(KEY, ETAG, size, BS, BS, tags=tags_b) == data[BS:]  # block 1 cached
            await until(lambda: c.entry(KEY, ETAG, size).present[1])
            n.start_soon(read_a)
            await until(lambda: (0, BS) in store.gets)
            assert await c.read(KEY, ETAG, size, BS, BS, tags=tags_b) == data[BS:]  # B checks block 1 again
            store.gate.set()
            await until(lambda: "a" in got)
            assert isinstance(got["a"], integrity.IntegrityError), "a block A's tags reject was returned"
            assert await c.read(KEY, ETAG, size, 0, size, tags=tags_b) == data
            n.cancel_scope.cancel()
        c.close()

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.cache: cache disk cannot take more blocks \(\[Errno 28\]")
def test_a_cache_disk_that_takes_a_chunk_now_and_then_is_warned_about_once(tmp_path, monkeypatch, caplog):
    """A cache disk near full refuses one fetched chunk, takes the next and refuses the one
    after: one WARNING, not one per refusal that follows a success (a new-user trial saw the
    warning twice in one second). Every read is still answered, from the fetched bytes."""
    import errno
    import logging
    data = os.urandom(4 * BS)
    store = MemStore(data)
    c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)
    real = BlockCache._store_chunk
    calls = []

    def near_full(self, fd, chunk, lo, blocks):
        calls.append(lo)
        if len(calls) % 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, fd, chunk, lo, blocks)
    monkeypatch.setattr(BlockCache, "_store_chunk", near_full)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            for b in range(4):
                assert await c.read(KEY, ETAG, len(data), b * BS, BS) == data[b * BS:(b + 1) * BS]
                await until(lambda: not c._entries[(KEY, ETAG)].pending)
            n.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="ossfuse.cache"):
        trio.run(main)
    assert len(calls) >= 4
    warnings = [r for r in caplog.records if "cannot take more blocks" in r.getMessage()]
    assert len(warnings) == 1, caplog.text


def test_a_cache_file_whose_last_block_is_dropped_goes(tmp_path):
    """New-user trial NU6: dropping the only block of a small object (shorter than a page)
    punched a hole that freed nothing, and the file stayed: 8,836 such files filled a 48 MB
    cache disk that `ossfuse status` said held 0 bytes, and every write got ENOSPC. A cache
    file left with no block is deleted, and its entry forgotten."""
    data = os.urandom(3000)
    store = MemStore(data)
    c = BlockCache(str(tmp_path / "cache"), store, BS, max_size=64 << 20, min_free=0)

    async def main():
        async with trio.open_nursery() as n:
            c.start(n)
            assert await c.read(KEY, ETAG, len(data), 0, len(data)) == data
            await until(lambda: not c._entries[(KEY, ETAG)].pending)
            path = c._entries[(KEY, ETAG)].path
            assert os.path.exists(path) and c.used == len(data)
            c.max_size = 0
            assert c.evict() == len(data)
            assert not os.path.exists(path) and (KEY, ETAG) not in c._entries and c.used == 0
            assert await c.read(KEY, ETAG, len(data), 0, len(data)) == data  # (fetched again)
            n.cancel_scope.cancel()

    trio.run(main)


def test_an_empty_uploaded_version_leaves_no_cache_file(tmp_path):
    """New-user trial NU7: every empty file uploaded left a 0-byte cache file (the adopted
    staged file), with no block to evict: 301 stayed until the unmount (inodes on a small
    cache disk). An empty version is not adopted: its staged file is the caller's to delete."""
    c = BlockCache(str(tmp_path / "cache"), MemStore(b""), BS, max_size=64 << 20, min_free=0)
    staged = tmp_path / "staged.data"
    staged.write_bytes(b"")
    c.adopt(KEY, ETAG, 0, str(staged), os.urandom(32), os.urandom(16))
    assert staged.exists() and (KEY, ETAG) not in c._entries
    assert os.listdir(tmp_path / "cache" / "objects") == []
