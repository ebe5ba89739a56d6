"""Per-block integrity tags (issue 17, docs/integrity.md): the codec, and a Filesystem in-process
over a local bucket reading objects whose stored bytes were damaged: a flipped bit gives EIO and
one log line naming the object, block and ETag, for whole and ranged reads, cold and cached; a
tag list too big for the metadata lives beside the object; objects without tags read as before;
the status counters count verified and unverified bytes."""
from __future__ import annotations

import base64
import dataclasses
import errno
import os

import pytest
import trio

from fakes.fault_store import FaultStore
from ossfuse import envelope as env
from ossfuse import integrity
from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
from ossfuse.fs import Filesystem, FsError
from ossfuse.keyring import Keyring
from ossfuse.store.base import ObjectInfo
from ossfuse.store.local import LocalStore

KIB = 1024


# -- the codec -------------------------------------------------------------------------------
def test_block_size_grows_with_the_object_until_the_tags_leave_the_metadata():
    envelope_meta = 1100  # an RSA-2048 envelope with attributes
    assert integrity.choose_block(0, envelope_meta) == (integrity.MIN_BLOCK, True)
    assert integrity.choose_block(10 * KIB, envelope_meta) == (64 * KIB, True)
    assert integrity.choose_block(16 << 20, envelope_meta) == (64 * KIB, True)  # 256 tags fit
    assert integrity.choose_block(64 << 20, envelope_meta) == (256 * KIB, True)
    assert integrity.choose_block(1 << 30, envelope_meta) == (4 << 20, True)
    assert integrity.choose_block(2 << 30, envelope_meta) == (4 << 20, False)  # 512 tags: beside it
    assert integrity.choose_block(2 << 40, envelope_meta) == (8 << 20, False)  # ≤ 2^18 tags per list
    # what fits is what the 8 KB leave: with 4 KB of other metadata, fewer tags fit
    assert integrity.choose_block(16 << 20, 4096) == (128 * KIB, True)


def test_the_header_always_fits_the_8_kb_with_the_reserve():
    """Whatever the object's size and the other metadata (an RSA-4096 envelope and a long matdesc
    included), the meta layout's header plus the rest stays within 8 KB minus the reserve for
    later attribute and multipart headers; else the list layout's short header is used."""
    for other in (600, 1100, 2500, 5000, 7000):
        for size in (0, 1, 65536, 65537, 20 << 20, 100 << 20, 321 << 20, 1 << 30, 5 << 30, 48 << 40):
            block, in_meta = integrity.choose_block(size, other)
            n = integrity.nblocks(size, block)
            if in_meta:
                value = f"1 {block} m " + "A" * (4 * -(-(n * 16) // 3))
                assert other + integrity.meta_size({integrity.HEADER: value}) <= 8192 - integrity.RESERVE
            else:
                assert block == integrity.MAX_META_BLOCK or n > integrity.MAX_LIST_TAGS // 2
                assert n <= integrity.MAX_LIST_TAGS


def test_tags_bind_key_iv_size_index_and_bytes():
    key, iv = bytes(range(32)), bytes(16)
    data = os.urandom(200 * KIB)
    k = integrity.tag_key(key, iv)
    tags = integrity.compute_tags(k, 64 * KIB, len(data), lambda off, n: data[off:off + n])
    assert len(tags) == 4 * 16
    spec = integrity.TagSpec(64 * KIB, tags=tags)
    bt = integrity.BlockTags.from_spec(spec, key, iv, len(data))
    assert bt.bad_blocks(0, data) == []
    flipped = bytearray(data)
    flipped[70 * KIB] ^= 1
    assert bt.bad_blocks(0, flipped) == [1]
    assert bt.bad_blocks(64 * KIB, data[64 * KIB:]) == []
    swapped = data[128 * KIB:192 * KIB] + data[64 * KIB:128 * KIB]
    assert bt.bad_blocks(64 * KIB, swapped) == [1, 2]  # blocks reordered
    assert integrity.BlockTags.from_spec(spec, key, bytes(15) + b"\1", len(data)).bad_blocks(0, data) == [0, 1, 2, 3]
    assert integrity.BlockTags.from_spec(spec, bytes(32), iv, len(data)).bad_blocks(0, data) == [0, 1, 2, 3]
    with pytest.raises(integrity.IntegrityError, match="size"):  # truncated by a whole block
        integrity.BlockTags.from_spec(spec, key, iv, 128 * KIB)
    short = integrity.BlockTags.from_spec(integrity.TagSpec(64 * KIB, tags=tags), key, iv, len(data) - 1)
    assert short.bad_blocks(192 * KIB, data[192 * KIB:-1]) == [3]  # size is bound too
    assert bt.span(65 * KIB, 66 * KIB) == (64 * KIB, 128 * KIB) and bt.span(190 * KIB, 300 * KIB) == \
        (128 * KIB, 200 * KIB)


def test_header_parsing():
    assert integrity.parse({"mode": "33188"}) is None
    tags = bytes(32)
    spec = integrity.parse({integrity.HEADER: f"1 65536 m {base64.b64encode(tags).decode()}"})
    assert spec == integrity.TagSpec(65536, tags=tags)
    spec = integrity.parse({integrity.HEADER: f"1 4194304 l {base64.b64encode(bytes(16)).decode()} a%20b/.x/y"})
    assert spec.list_key == "a b/.x/y" and spec.root == bytes(16)
    assert integrity.parse({integrity.HEADER: "1 65536 m"}) == integrity.TagSpec(65536, tags=b"")  # empty object


def test_header_of_an_empty_object_has_no_trailing_space(tmp_path):
    """A header value ending in a space is stripped in transit and fails OSS's signature check
    (found by the SDK interop test: the mount's empty file got 403 SignatureDoesNotMatch)."""
    path = tmp_path / "empty"
    path.write_bytes(b"")
    sealed = integrity.seal(str(path), bytes(32), bytes(16), 0, {}, "pre/")
    assert sealed.headers == {integrity.HEADER: "1 65536 m"} and sealed.list_key is None
    spec = integrity.parse(sealed.headers)
    assert integrity.BlockTags.from_spec(spec, bytes(32), bytes(16), 0).tags == b""
    for bad in ("2 65536 m AAAA", "1 1000 m AAAA", "1 65536 m !!", "1 65536 m AAAA", "1 65536 q x", "1"):
        with pytest.raises(integrity.IntegrityError):
            integrity.parse({integrity.HEADER: bad})


# -- a Filesystem over a bucket whose bytes get damaged -----------------------------------------
def _filesystem(tmp_path, cmk_path, store, block_size=64 * KIB, **cache) -> Filesystem:
    """``cache``: more CacheConfig fields (e.g. ``max_size`` in bytes)."""
    cfg = Config(path=str(tmp_path / "ossfuse.toml"),
                 store=StoreConfig(url=f"local://{tmp_path / 'bucket'}", prefix="pre/"),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)),
                 cache=CacheConfig(dir=str(tmp_path / "cache"), block_size=block_size, **cache),
                 mount=MountConfig(upload_delay=0.0))
    return Filesystem(cfg, store, Keyring(cfg.encryption), uid=1, gid=2)


def _flip(local: LocalStore, key: str, offset: int) -> None:
    """Flip one bit of ``key``'s stored body in the local bucket (its blob file)."""
    path = local._blob_path(local._row(key)[5])
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


async def _write(fs: Filesystem, name: str, data: bytes):
    node, h = await fs.create(fs.get(1), name, 0o644, os.O_WRONLY, 1, 2)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    await fs.drain()
    return node


async def _read(fs: Filesystem, name: str, offset: int, length: int, opened=None) -> bytes:
    """Open ``name`` and read ``length`` bytes at ``offset``; ``opened()`` runs between the
    open and the read (the open itself may GET the first block, over OSS)."""
    node = await fs.lookup(fs.get(1), name)
    h = await fs.open(node, os.O_RDONLY)
    try:
        if opened is not None:
            opened()
        return await fs.read(h, offset, length)
    finally:
        await fs.release(h)


def _tags_in_a_list(monkeypatch) -> None:
    """Make a 1 MiB file's integrity tags go to a tag list (64 KiB blocks, little metadata room)."""
    monkeypatch.setattr(integrity, "MAX_META_BLOCK", 64 * KIB)
    monkeypatch.setattr(integrity, "META_LIMIT", 1500)


def _bucket(tmp_path, cached: bool):
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    local = LocalStore(str(tmp_path / "bucket"))
    store = FaultStore(local)
    store.local_disk = not cached  # False: reads go through the block cache, as on OSS
    return local, store


def _eio(excinfo) -> None:
    assert excinfo.value.errno == errno.EIO


@pytest.mark.parametrize("cached", [False, True], ids=["local-read-through", "block-cache"])
@pytest.mark.expect_log(r"cannot read 'pre/f': block 2 \(bytes 131072-196607\) of version ETag \S+ fails its "
                        r"integrity tag \(fetched twice\)")
def test_flipped_bit_gives_eio_whole_and_ranged(tmp_path, cmk_path, cached, caplog):
    local, store = _bucket(tmp_path, cached)
    data = os.urandom(300 * KIB)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "f", data)
        info = await local.head("pre/f")
        assert integrity.parse(info.metadata).block == 64 * KIB
        fs.cache.drop("pre/f", info.etag)  # cold: the upload's own copy is not in the cache
        _flip(local, "pre/f", 150 * KIB)  # block 2
        with pytest.raises(FsError) as e:  # whole read, cold
            await _read(fs, "f", 0, len(data))
        _eio(e)
        # the damaged block was fetched once more before failing, never kept
        assert fs.cache.stats["integrity_failures"] == 1 and fs.cache.stats["integrity_refetches"] == 1
        with pytest.raises(FsError) as e:  # a ranged read inside the damaged block
            await _read(fs, "f", 140 * KIB, 100)
        _eio(e)
        with pytest.raises(FsError) as e:  # a ranged read crossing into it from a good block
            await _read(fs, "f", 127 * KIB, 2 * KIB)
        _eio(e)
        # the blocks around it read fine, and were checked
        assert await _read(fs, "f", 10, 100 * KIB) == data[10:10 + 100 * KIB]
        assert await _read(fs, "f", 200 * KIB, 100 * KIB) == data[200 * KIB:]
        assert fs.cache.stats["integrity_failures"] == 3
        if cached:  # nothing of the damaged block is in the cache
            e2 = fs.cache._entries[("pre/f", info.etag)]
            assert not any(e2.present[b] for b in range(2, 3))
        _flip(local, "pre/f", 150 * KIB)  # repaired: it reads again, whole
        assert await _read(fs, "f", 0, len(data)) == data
        fs.close()
        await store.aclose()

    with caplog.at_level("INFO"):
        trio.run(main)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1  # one line for the damaged block, however often it is read
    assert "'pre/f'" in errors[0].getMessage() and "block 2 " in errors[0].getMessage()


@pytest.mark.expect_log(r"cannot read 'pre/f': block 0 .* fails its integrity tag")
def test_cached_blocks_stay_good_and_a_damaged_response_is_not_cached(tmp_path, cmk_path):
    """Blocks checked when cached keep serving after the store's copy is damaged; a response
    damaged in transit is refetched once and, if good then, served and cached."""
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(256 * KIB)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "f", data)  # the uploaded data is adopted by the cache
        fs.cache.drop("pre/f", (await local.head("pre/f")).etag)
        assert await _read(fs, "f", 0, len(data)) == data  # cached now, checked on the way in
        _flip(local, "pre/f", 5)
        assert await _read(fs, "f", 0, len(data)) == data  # served from the checked cache
        fs.cache.drop("pre/f", (await local.head("pre/f")).etag)
        _flip(local, "pre/f", 5)  # good in the store again

        flips = {"n": 0}
        real_get = store.inner.get_range

        async def damaged_once(key, start, end, *, if_match=None):
            body = await real_get(key, start, end, if_match=if_match)
            if key == "pre/f" and start == 0 and flips["n"]:
                flips["n"] -= 1
                body = bytes([body[0] ^ 1]) + body[1:]
            return body
        store.inner.get_range = damaged_once

        def damage(times: int):  # the read's GETs, after the open's (its bytes are not kept here)
            def arm():
                fs.cache.drop("pre/f", etag)
                flips["n"] = times
            return arm
        etag = (await local.head("pre/f")).etag
        assert await _read(fs, "f", 0, 10, damage(1)) == data[:10]  # refetched once, then good
        assert fs.cache.stats["integrity_refetches"] == 1 and fs.cache.stats["integrity_failures"] == 0
        with pytest.raises(FsError) as e:  # damaged twice: EIO, and nothing is cached
            await _read(fs, "f", 0, 10, damage(2))
        _eio(e)
        assert await _read(fs, "f", 0, 10) == data[:10]  # the next read fetches it anew
        fs.close()
        await store.aclose()

    trio.run(main)


def test_bytes_offered_to_the_cache_are_checked_before_they_are_served(tmp_path, cmk_path):
    """BlockCache.offer (the first block that open-ahead's GET brought with the metadata) keeps
    bytes not yet checked against the version's tags: served without another GET when good;
    when damaged, the read checks them first, drops them and fetches the block again."""
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(200 * KIB)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        async with trio.open_nursery() as nursery:
            fs.cache.start(nursery)
            await _write(fs, "f", data)
            etag = (await local.head("pre/f")).etag
            stored = await local.get_range("pre/f", 0, 64 * KIB)
            for damaged in (False, True):
                fs.cache.drop("pre/f", etag)
                fs.cache.offer("pre/f", etag, len(data), 0, bytes([stored[0] ^ 1]) + stored[1:] if damaged else stored)
                assert fs.cache.entry("pre/f", etag, len(data)).have(0)
                store.reset_counts()
                assert await _read(fs, "f", 0, 10) == data[:10]
                assert store.counts["get_range"] == (1 if damaged else 0), (damaged, store.counts)
                assert fs.cache.entry("pre/f", etag, len(data)).authed[0] == 1
            nursery.cancel_scope.cancel()
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("first_read", ["adopted", "cold-ranged"])
def test_eviction_never_damages_the_stored_object_and_evicted_blocks_read_back(tmp_path, cmk_path, first_read):
    """A 10,000-byte file, then a 4 MiB file through a 2 MiB cache of 4 KiB blocks: the first
    file's blocks are evicted, and reading it again fetches them intact from the store.
    Regression: the bucket here keeps the uploaded file itself as its object (a hard link, as
    a LocalStore does for ``may_link``) while the mount treats it as remote, so the cache
    adopted that very file and eviction punched holes in the stored object (EIO, "fails its
    integrity tag (fetched twice)"). ``cold-ranged``: the first file's blocks come from a
    ranged GET into a cache file of the cache's own; the 4 MiB file, adopted and at once
    evicted before the fix, read back damaged the same way."""
    local, store = _bucket(tmp_path, cached=True)
    small = bytes(range(256)) * 39 + b"alpha" * 16  # 10,064 bytes, no block alike
    small = small[:10_000]
    big = os.urandom(4 << 20)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store, block_size=4 * KIB, max_size=2 << 20)
        await _write(fs, "a", small)
        info = await local.head("pre/a")
        stored = await local.get_range("pre/a", 0, info.size)
        if first_read == "cold-ranged":
            fs.cache.drop("pre/a", info.etag)
            assert await _read(fs, "a", 4000, 5000) == small[4000:9000]  # a ranged read, cold
            assert fs.cache._entries[("pre/a", info.etag)].present  # it was cached
        await _write(fs, "big", big)
        assert await _read(fs, "big", 0, len(big)) == big  # more than max_size: evicts the first file's blocks
        entry = fs.cache._entries.get(("pre/a", info.etag))
        assert entry is None or not any(entry.present)  # evicted (or never cached)
        assert fs.cache.stats["evicted_bytes"] > 0
        assert await local.get_range("pre/a", 0, info.size) == stored  # the store's object is intact
        assert await _read(fs, "a", 0, 20_000) == small
        assert await _read(fs, "a", 5000, 3000) == small[5000:8000]
        assert await _read(fs, "big", (3 << 20) + 7, 100_000) == big[(3 << 20) + 7:(3 << 20) + 100_007]
        assert fs.cache.stats["integrity_failures"] == 0 and fs.cache.stats["integrity_refetches"] == 0
        fs.close()
        await store.aclose()

    trio.run(main)


def test_objects_without_tags_read_as_before_and_counters(tmp_path, cmk_path):
    """An object without the header (as the SDKs write) reads as before, counted unverified;
    a tagged one counts verified; the status document shows both."""
    from ossfuse import status
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(100 * KIB)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "tagged", data)
        info = await local.head("pre/tagged")  # the same object without the header: as an SDK writes it
        body = await local.get_range("pre/tagged", 0, info.size)
        await local.put_bytes("pre/sdk", body, {k: v for k, v in info.metadata.items() if k != integrity.HEADER})
        assert await _read(fs, "sdk", 0, 1 << 20) == data
        assert await _read(fs, "tagged", 1000, 5000) == data[1000:6000]
        assert (fs.cache.stats["verified_bytes"], fs.cache.stats["unverified_bytes"]) == (5000, len(data))
        doc = status.collect(fs, status.RecentErrors(), 0.0)
        assert doc["integrity"] == {"verified_bytes": 5000, "unverified_bytes": len(data), "failures": 0}
        assert f"bytes read:       5000 verified, {len(data)} without tags" in status.render(doc)
        doc["mountpoint"] = "/m"
        prom = status.prometheus(doc)
        assert 'ossfuse_read_bytes_total{mountpoint="/m",verified="true"} 5000' in prom
        assert f'ossfuse_read_bytes_total{{mountpoint="/m",verified="false"}} {len(data)}' in prom
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("cached", [False, True], ids=["local-read-through", "block-cache"])
@pytest.mark.expect_log(r"cannot read 'pre/big': (block 3 .* fails its integrity tag|version ETag \S+: tag list "
                        r"'pre/.ossfuse-integrity/[0-9a-f]+' does not match its root tag|version ETag \S+: its tag "
                        r"list '\S+' is missing)")
def test_tag_list_beside_the_object(tmp_path, cmk_path, monkeypatch, cached):
    """Tags that do not fit the metadata go to a list object under .ossfuse-integrity/ (hidden
    from listings), authenticated by a root tag in the metadata; damaging the object or the
    list is caught."""
    monkeypatch.setattr(integrity, "MAX_META_BLOCK", 64 * KIB)
    monkeypatch.setattr(integrity, "META_LIMIT", 1500)  # room for a few tags only
    local, store = _bucket(tmp_path, cached)
    data = os.urandom(1 << 20)  # 16 blocks of 64 KiB: 16 tags do not fit 1.5 KB with the envelope

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store, block_size=128 * KIB)
        await _write(fs, "big", data)
        info = await local.head("pre/big")
        spec = integrity.parse(info.metadata)
        assert spec.tags is None and spec.list_key.startswith("pre/.ossfuse-integrity/")
        lst = await local.head(spec.list_key)
        assert lst.size == 16 * 16
        with pytest.raises(FsError) as e:  # probed (no listing known yet): not a directory
            await fs.lookup(fs.get(1), integrity.LIST_DIR)
        assert e.value.errno == errno.ENOENT
        h = fs.opendir(fs.get(1))
        entries = await fs.readdir_entries(h, 0)
        fs.releasedir(h.fh)
        assert [e[1] for e in entries] == ["big"]  # the list directory is hidden
        assert await _read(fs, "big", 0, len(data)) == data
        fs.cache.drop("pre/big", info.etag)
        _flip(local, "pre/big", 3 * 64 * KIB + 7)
        with pytest.raises(FsError) as e:
            await _read(fs, "big", 3 * 64 * KIB, 10)
        _eio(e)
        _flip(local, "pre/big", 3 * 64 * KIB + 7)
        fs.close()
        fs = _filesystem(tmp_path, cmk_path, store, block_size=128 * KIB)  # tag lists are not kept across mounts
        _flip(local, spec.list_key, 17)  # the list itself damaged: fails its root tag
        with pytest.raises(FsError) as e:
            await _read(fs, "big", 0, 10)
        _eio(e)
        _flip(local, spec.list_key, 17)
        assert await _read(fs, "big", 0, len(data)) == data
        await local.delete(spec.list_key)  # the list gone: no read without it
        fs.close()
        fs = _filesystem(tmp_path, cmk_path, store, block_size=128 * KIB)
        with pytest.raises(FsError) as e:
            await _read(fs, "big", 0, 10)
        _eio(e)
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("cached", [False, True], ids=["local-read-through", "block-cache"])
@pytest.mark.expect_log(r"cannot read 'out/big': version ETag \S+: its tag list "
                        r"'pre/.ossfuse-integrity/[0-9a-f]+' is missing")
def test_a_list_a_rename_above_the_writers_prefix_meets_stays_findable(tmp_path, cmk_path, monkeypatch, cached):
    """Trials Z1 and AA: a mount of the whole bucket renamed the directory ``pre`` another
    mount writes under; the objects' tag lists (``pre/.ossfuse-integrity/…``) moved with
    them, the headers still named the old keys, and the files gave EIO (``check --verify``:
    FAIL) — at once, or once a file was moved out of the renamed directory. A rename now puts
    a list it meets in its source's parent's ``.ossfuse-integrity`` (on the path from the
    header's key up to the root, where readers look: ``integrity.list_key_candidates``); a
    list an earlier release moved with its directory is found above the object; a list that
    is nowhere still fails, named."""
    from ossfuse import rekey
    _tags_in_a_list(monkeypatch)
    local, store = _bucket(tmp_path, cached)
    data = os.urandom(1 << 20)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store, block_size=128 * KIB)
        await _write(fs, "big", data)
        spec = integrity.parse((await local.head("pre/big")).metadata)
        assert spec.list_key.startswith("pre/.ossfuse-integrity/")
        fs.close()
        cfg = dataclasses.replace(fs.cfg, store=dataclasses.replace(fs.cfg.store, prefix=""))

        async def read_cold(*names: str) -> bytes:
            outer = Filesystem(cfg, store, fs.keyring, uid=1, gid=2)  # no tag list kept in memory
            node = outer.get(1)
            for name in names:
                node = await outer.lookup(node, name)
            h = await outer.open(node, os.O_RDONLY)
            try:
                return await outer.read(h, 0, len(data))
            finally:
                await outer.release(h)
                outer.close()

        outer = Filesystem(cfg, store, fs.keyring, uid=1, gid=2)
        root = outer.get(1)
        await outer.mkdir(root, "sub", 0o755, 1, 2)
        await outer.rename(root, "pre", await outer.lookup(root, "sub"), "moved", 0)
        up = ".ossfuse-integrity/" + spec.root.hex()  # the parent of "pre/": the bucket's root
        assert await local.head(spec.list_key) is None and await local.head(up) is not None
        assert await local.head("sub/moved/.ossfuse-integrity/" + spec.root.hex()) is None
        await outer.mkdir(root, "out", 0o755, 1, 2)  # then the file moved out sideways (trial AA)
        await outer.rename(await outer.lookup(await outer.lookup(root, "sub"), "moved"), "big",
                           await outer.lookup(root, "out"), "big", 0)
        await outer.drain()
        outer.close()
        assert await read_cold("out", "big") == data
        summary = await rekey.verify(cfg, local, fs.keyring)
        assert (summary.verified, summary.failed) == (1, []), summary
        await local.put_bytes(spec.list_key, b"x" * 256, {})  # something else at a nearer key: looked past
        assert await read_cold("out", "big") == data
        await local.delete(spec.list_key)
        # a list an earlier release moved with its directory: below a directory above the object
        await local.copy(up, "out/.ossfuse-integrity/" + spec.root.hex())
        await local.delete(up)
        assert await read_cold("out", "big") == data
        await local.delete("out/.ossfuse-integrity/" + spec.root.hex())  # nowhere now: EIO, verify fails it
        with pytest.raises(FsError) as e:
            await read_cold("out", "big")
        _eio(e)
        summary = await rekey.verify(cfg, local, fs.keyring)
        assert summary.verified == 0 and len(summary.failed) == 1, summary
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"cannot read 'pre/f': version ETag \S+: tag list '\.ossfuse-integrity/[0-9a-f]+' does not "
                        r"match its root tag")
def test_a_rekey_whose_new_envelope_leaves_the_tags_no_room_moves_them_into_a_list(tmp_path, cmk_path,
                                                                                    other_cmk_path):
    """Trial AD: a rekey to a CMK with a bigger envelope (RSA-2048 → 4096, a long matdesc) of a
    file whose tags are in its header failed MetadataTooLarge at every run. The same tags now go
    to a list object first, the header names it; the file reads and verifies after. A list
    found elsewhere than the header's key that fails is named where it was read."""
    from ossfuse import rekey
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(3 << 20)  # 48 tags of 64 KiB blocks: in the header

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "f", data)
        before = integrity.parse((await local.head("pre/f")).metadata)
        assert before.tags is not None and len(before.tags) == 48 * integrity.TAG
        fs.close()
        enc = EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),
                                                       CmkConfig("b", "rsa", other_cmk_path,
                                                                 matdesc={"note": "x" * 6000})))
        cfg = dataclasses.replace(fs.cfg, encryption=enc)
        done = await rekey.rekey(cfg, local, Keyring(enc), from_id=None, to_id="b", dry_run=False)
        assert done.changed == 1 and not done.failed and not done.damaged, done
        info = await local.head("pre/f")
        assert env.parse_envelope(info.metadata).matdesc == {"note": "x" * 6000}
        assert integrity.meta_size(info.metadata) <= integrity.META_LIMIT - integrity.RESERVE
        spec = integrity.parse(info.metadata)
        assert spec.tags is None and spec.block == before.block
        assert spec.list_key == f"pre/.ossfuse-integrity/{spec.root.hex()}"
        assert await local.get_range(spec.list_key, 0, 1 << 20) == before.tags
        fs = Filesystem(cfg, store, Keyring(enc), uid=1, gid=2)
        assert await _read(fs, "f", 0, len(data)) == data
        assert fs.cache.stats["verified_bytes"] == len(data)
        fs.close()
        summary = await rekey.verify(cfg, local, Keyring(enc))
        assert (summary.verified, summary.failed) == (1, []), summary
        # the list moved up (as a rename above the writer's prefix does) and damaged there: the
        # error names the key it was read at, not the header's (trial AD: it named a key with nothing)
        body = bytearray(before.tags)
        body[5] ^= 1
        await local.delete(spec.list_key)
        await local.put_bytes(spec.list_key.removeprefix("pre/"), bytes(body), {})
        fs = Filesystem(cfg, store, Keyring(enc), uid=1, gid=2)
        with pytest.raises(FsError) as e:
            await _read(fs, "f", 0, 10)
        _eio(e)
        fs.close()
        summary = await rekey.verify(dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, prefix="")),
                                     local, Keyring(enc), path="pre")
        assert len(summary.failed) == 1 and f"tag list '{spec.list_key.removeprefix('pre/')}' does not match" \
            in summary.failed[0], summary.failed
        await local.delete(spec.list_key.removeprefix("pre/"))
        summary = await rekey.verify(cfg, local, Keyring(enc))
        assert len(summary.failed) == 1 and "is missing (and is at none of the" in summary.failed[0], summary.failed
        await store.aclose()

    trio.run(main)


def test_verify_says_an_object_the_store_did_not_let_it_read_is_not_checked_not_failed(tmp_path, cmk_path):
    """Trial AC: a store that stalled mid-run gave ``check --verify`` a FAIL line for the
    object it was reading, the form of a damaged one. The store's failures are NOT CHECKED
    lines, counted apart (exit 1 all the same: the run did not cover everything)."""
    from ossfuse import rekey
    local, store = _bucket(tmp_path, cached=True)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "a", os.urandom(100_000))
        await _write(fs, "b", os.urandom(100_000))
        fs.close()
        store.fail("get_range", key="pre/b", error="temporary", count=None)
        summary = await rekey.verify(fs.cfg, store, fs.keyring)
        store.clear()
        await store.aclose()
        return summary

    summary = trio.run(main)
    assert summary.verified == 1 and summary.failed == [] and len(summary.unchecked) == 1, summary
    text = summary.render()
    assert text.splitlines()[0].startswith("NOT CHECKED  pre/b (ETag "), text
    assert text.endswith("failed: 0; not checked, the store failed (run it again): 1"), text


def test_a_journaled_version_in_the_list_layout_uploads_its_list_after_a_crash(tmp_path, cmk_path, monkeypatch):
    """A version journaled but not uploaded before a crash keeps its tag header in the journal;
    the next mount recomputes the list from the sealed data, puts it before the object, and
    the object reads verified."""
    _tags_in_a_list(monkeypatch)
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(1 << 20)

    async def crash_after_close():
        fs = _filesystem(tmp_path, cmk_path, store)
        fs.scheduler.delay = 3600  # nothing uploads before the "crash"
        node, h = await fs.create(fs.get(1), "f", 0o600, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, data)
        await fs.flush(h)
        await fs.release(h)
        assert node.staged.was_journaled and node.staged.tags.list_body is not None
        assert integrity.HEADER in node.staged.journaled_record["metadata"]
        fs.close()

    async def next_mount():
        fs = _filesystem(tmp_path, cmk_path, store)
        assert fs.recover() == 1
        assert await fs.drain() == 0
        spec = integrity.parse((await local.head("pre/f")).metadata)
        assert spec.list_key is not None and (await local.head(spec.list_key)).size == 16 * 16
        fs.cache.drop("pre/f", (await local.head("pre/f")).etag)
        assert await _read(fs, "f", 0, len(data)) == data
        assert fs.cache.stats["verified_bytes"] == len(data)
        fs.close()
        await store.aclose()

    trio.run(crash_after_close)
    trio.run(next_mount)


def test_verify_and_rekey_count_tag_lists_apart_from_plaintext(tmp_path, cmk_path, monkeypatch):
    """Trial R: `check --verify` said "not encrypted: 1 (e.g. 'team/.ossfuse-integrity/…')", which
    reads as a plaintext leak: a tag list is ossfuse's own, plaintext by design, and checked
    through the object that names it. Counted apart (verify and rekey alike), not HEADed; a
    foreign plaintext object is still counted and named."""
    from ossfuse import rekey
    _tags_in_a_list(monkeypatch)
    local, store = _bucket(tmp_path, cached=True)
    data = os.urandom(1 << 20)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "f", data)
        spec = integrity.parse((await local.head("pre/f")).metadata)
        assert spec.list_key is not None and spec.list_key.startswith("pre/.ossfuse-integrity/")
        await local.put_bytes("pre/plain.txt", b"another client's plaintext", {})
        heads = local.head
        headed: list[str] = []

        async def counting_head(key):
            headed.append(key)
            return await heads(key)

        local.head = counting_head
        summary = await rekey.verify(fs.cfg, local, fs.keyring)
        local.head = heads
        fs.close()
        await store.aclose()
        return summary, spec.list_key, headed

    summary, list_key, headed = trio.run(main)
    assert (summary.verified, summary.tag_lists, summary.plaintext) == (1, 1, 1), summary
    assert summary.plaintext_keys == ["pre/plain.txt"] and not summary.failed, summary
    assert list_key not in headed
    assert ("not encrypted: 1 (e.g. 'pre/plain.txt'); integrity tag lists (ossfuse's own, not encrypted by "
            "design): 1;") in summary.render()
    counted = rekey.RekeySummary()
    assert rekey._not_content(ObjectInfo(list_key, 256, "E", 0.0), counted) and counted.tag_lists == 1
    assert "skipped, integrity tag lists (ossfuse's own, not encrypted by design): 1" in counted.render(False)


@pytest.mark.expect_log(r"cannot read 'pre/ln': block 0 \(bytes 0-\d+\) of version ETag \S+ fails its integrity tag")
def test_a_symlink_target_is_tagged_and_a_flipped_bit_is_eio(tmp_path, cmk_path, caplog):
    """A symlink's target is its encrypted body: it carries tags like a file's, so a flipped bit
    in the stored target is EIO with one log line (never a wrong target), and `check --verify`
    names it; an intact one verifies. Directory markers have no body to tag (docs/integrity.md)."""
    from ossfuse import rekey
    local, store = _bucket(tmp_path, cached=True)
    target = "../some/where/else-" + "x" * 100

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        root = fs.get(1)
        await fs.symlink(root, "ln", target, 1, 2)
        await fs.symlink(root, "ok", target, 1, 2)
        await fs.mkdir(root, "d", 0o755, 1, 2)
        spec = integrity.parse((await local.head("pre/ln")).metadata)
        assert spec is not None and len(spec.tags) == 16
        fs.close()
        _flip(local, "pre/ln", 7)
        fs = _filesystem(tmp_path, cmk_path, store)  # cold: the target is read from the store
        with pytest.raises(FsError) as e:
            await fs.readlink(await fs.lookup(fs.get(1), "ln"))
        _eio(e)
        with pytest.raises(FsError) as e:  # again: the same errno, no second ERROR line
            await fs.readlink(await fs.lookup(fs.get(1), "ln"))
        _eio(e)
        assert await fs.readlink(await fs.lookup(fs.get(1), "ok")) == target
        summary = await rekey.verify(fs.cfg, local, fs.keyring)
        fs.close()
        await store.aclose()
        return summary

    with caplog.at_level("INFO"):
        summary = trio.run(main)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "'pre/ln'" in errors[0], errors
    assert summary.verified == 1 and summary.untagged == 0, summary
    assert len(summary.failed) == 1 and summary.failed[0].startswith("pre/ln (ETag ") and \
        "block 0 (bytes 0-" in summary.failed[0], summary.failed


def test_verify_fails_an_untagged_object_whose_envelope_the_mount_cannot_open(tmp_path, cmk_path):
    """Found by a trial: objects as the SDKs write them (no integrity tags) with a damaged
    envelope header — an unsupported cek-alg, a start IV that is not base64, a key the CMK
    cannot unwrap — gave EIO in the mount, yet `check --verify` counted them "without tags"
    and exited 0. Their envelope is opened as the mount opens it: each is a FAIL naming why,
    and an intact untagged object is still counted as such."""
    from ossfuse import rekey
    local, store = _bucket(tmp_path, cached=True)
    damage = {"badalg": (env.H_CEK_ALG, "AES/GCM/NoPadding"),
              "badstart": (env.H_START, "not base64!"),
              "badkey": (env.H_KEY, base64.b64encode(os.urandom(384)).decode())}

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        for name in ["intact", *damage]:
            await _write(fs, name, b"sdk-like object " + name.encode())
            info = await local.head("pre/" + name)
            body = await local.get_range("pre/" + name, 0, info.size)
            meta = {k: v for k, v in info.metadata.items() if k != integrity.HEADER}  # as an SDK writes it
            if name in damage:
                header, value = damage[name]
                meta[header] = value
            await local.put_bytes("pre/" + name, body, meta)
        summary = await rekey.verify(fs.cfg, local, fs.keyring)
        fs.close()
        await store.aclose()
        return summary

    summary = trio.run(main)
    assert summary.untagged == 1 and summary.verified == 0, summary
    failed = {line.split(" ", 1)[0]: line for line in summary.failed}
    assert sorted(failed) == ["pre/badalg", "pre/badkey", "pre/badstart"], summary.failed
    assert "unsupported cek-alg 'AES/GCM/NoPadding'" in failed["pre/badalg"], failed
    assert "not base64" in failed["pre/badstart"], failed
    assert "unwrap" in failed["pre/badkey"], failed


def test_checks_sample_heads_a_bounded_number_of_objects(tmp_path, cmk_path):
    """Found by a trial: `ossfuse check` HEADed listed objects until it had seen 20 encrypted
    ones; 1,100 plaintext objects first made it 1,100 HEADs (9.5 min at 0.5 s a request,
    for a --verify of one file). At most CHECK_HEADS now; directory markers and tag lists
    are not HEADed at all; what was sampled is still unwrapped."""
    from ossfuse import rekey
    local, store = _bucket(tmp_path, cached=True)

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "zz-encrypted", b"secret")
        for i in range(rekey.CHECK_HEADS + 50):
            await local.put_bytes(f"pre/a{i:04d}", b"plain", {})
        await local.put_bytes("pre/a-dir/", b"", {})
        store.counts.clear()
        first = await rekey.unreadable_sample(fs.cfg, fs.keyring, store)
        heads = store.counts["head"]
        bounded = heads
        store.counts.clear()
        found = await rekey.unreadable_sample(fs.cfg, fs.keyring, store, heads=10_000)
        every = store.counts["head"]
        fs.close()
        await store.aclose()
        return first, bounded, found, every

    (sampled, unreadable), heads, found, every = trio.run(main)
    assert (sampled, unreadable, heads) == (0, [], rekey.CHECK_HEADS)
    assert found == (1, [])  # past the plaintext ones, the encrypted object opens
    assert every == rekey.CHECK_HEADS + 50 + 1  # the files; not the directory marker


def test_checks_sample_names_a_kms_cmks_failing_credentials_as_that_not_the_stores(tmp_path, cmk_path,
                                                                                  monkeypatch):
    """A trial: `check` of a local bucket with a KMS CMK whose credentials file was refused
    printed `FAIL store local:…: no usable credentials` (the store has none). The sampled
    object whose data key that CMK wraps is unreadable for that reason instead."""
    from ossfuse import rekey
    from ossfuse.store.credentials import CredentialsError
    local, store = _bucket(tmp_path, cached=True)

    def refused(wrapped):
        raise CredentialsError("credentials file /etc/ossfuse/kms.credentials has mode 0644")

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        await _write(fs, "f", b"secret")
        monkeypatch.setattr(fs.keyring, "open_envelope", refused)
        found = await rekey.unreadable_sample(fs.cfg, fs.keyring, store)
        fs.close()
        await store.aclose()
        return found

    sampled, unreadable = trio.run(main)
    assert sampled == 1 and len(unreadable) == 1 and unreadable[0][0] == "pre/f"
    assert "its KMS CMK has no usable credentials: credentials file /etc/ossfuse/kms.credentials has mode 0644" \
        in unreadable[0][1]
