"""Request counts of common workloads over an OSS-like store (listings without metadata, not a
local disk), in-process: ``cat``, ``rm -r`` and ``ls -l`` of N files, and a cold sequential read
(issue 14). Counts, not timing: the timing comparison is ``bench/vs_ossfs.py``."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import pytest
import trio
import trio.testing

sys.path.insert(0, os.path.dirname(__file__))
from fakes.fault_store import FaultStore  # noqa: E402
from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig  # noqa: E402
from ossfuse.fs import Filesystem, FsError  # noqa: E402
from ossfuse.fs.namecache import trusted_for  # noqa: E402
from ossfuse.keyring import Keyring  # noqa: E402
from ossfuse.store.local import LocalStore  # noqa: E402

N = 40
ATTR = 0.2  # seconds: attr_timeout of these mounts, short so that the tests can outlive it


class _RemoteLikeStore(LocalStore):
    """A local bucket that copies uploads (no hard links) and says it is no local disk and
    lists no metadata: the request pattern of OSS."""

    listing_has_metadata = False
    local_disk = False

    async def put_file(self, key, path, metadata, *, may_link=False, if_absent=False, replaces=None):
        return await super().put_file(key, path, metadata, may_link=False, if_absent=if_absent, replaces=replaces)


def _mount(tmp_path, cmk_path, name: str) -> Filesystem:
    """A fresh mount (own cache dir ``name``) of the bucket in ``tmp_path``."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    cfg = Config(path=str(tmp_path / "ossfuse.toml"),
                 store=StoreConfig(url=f"local://{tmp_path / 'bucket'}", prefix="pre/"),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)),
                 cache=CacheConfig(dir=str(tmp_path / name), min_free=0),
                 mount=MountConfig(upload_delay=0.0, attr_timeout=ATTR, entry_timeout=ATTR))
    store = FaultStore(_RemoteLikeStore(str(tmp_path / "bucket")))
    store.listing_has_metadata = False
    store.local_disk = False
    return Filesystem(cfg, store, Keyring(cfg.encryption), uid=1, gid=2)


async def _fill(tmp_path, cmk_path, names, data=lambda i: b"x%d" % i * 100) -> None:
    """Files ``d/<name>`` written and uploaded through a first mount; returns in a later
    wall-clock second than their uploads (a HEAD answered in the second of a version's
    Last-Modified proves nothing: objmeta.proof_mtime)."""
    fs = _mount(tmp_path, cmk_path, "cache-writer")
    d = await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
    for i, name in enumerate(names):
        node, h = await fs.create(d, name, 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, data(i))
        await fs.flush(h)
        await fs.release(h)
    assert await fs.drain() == 0
    fs.close()
    await _next_second()


async def _next_second() -> None:
    """Sleep into the next wall-clock second."""
    await trio.sleep(int(time.time()) + 1.01 - time.time())


async def _ls_l(fs: Filesystem, d) -> dict[str, object]:
    """readdir of ``d`` to the end, as the kernel asks it (~25 entries per call)."""
    h = fs.opendir(d)
    out, start = {}, 0
    try:
        while True:
            got = await fs.readdir_entries(h, start)
            if not got:
                return out
            for _, name, node in got[:25]:
                fs.remember(node)
                out[name] = node
            start = got[:25][-1][0]
    finally:
        fs.releasedir(h.fh)


def _relists(since: float) -> int:
    """Most revalidating LISTs a walk started at ``since`` may make: one, plus one per
    attr_timeout it lasted (a loaded machine makes the walk slow), never one per file."""
    return min(N // 4, 1 + int((time.monotonic() - since) / ATTR))


def _names(n=N):
    return [f"f{i:04d}" for i in range(n)]


def test_ls_cat_rm_of_listed_files_need_no_head_per_file(tmp_path, cmk_path):
    """After a cold ``ls -l`` (N HEADs), ``cat`` of the N files once their attributes expired
    needs N GETs and a LIST per page, no HEAD (the listing shows the ETag and Last-Modified
    each node holds); a second ``ls -l`` needs no HEAD; ``rm`` needs N DELETEs and no HEAD."""
    names = _names()

    async def main():
        await _fill(tmp_path, cmk_path, names)
        fs = _mount(tmp_path, cmk_path, "cache")
        store = fs.store
        d = await fs.lookup(fs.get(1), "d")
        store.reset_counts() if hasattr(store, "reset_counts") else store.counts.clear()
        listed = await _ls_l(fs, d)
        assert sorted(listed) == names
        assert store.counts["head"] == N and store.counts["list"] == 1, store.counts  # cold: a HEAD each

        await trio.sleep(ATTR * 1.5)  # every attribute is stale now
        store.counts.clear()
        t0 = time.monotonic()
        for i, name in enumerate(names):  # cat d/*: lookup, open, read, release
            node = await fs.lookup(d, name)
            h = await fs.open(node, os.O_RDONLY)
            assert await fs.read(h, 0, 1 << 17) == b"x%d" % i * 100
            await fs.release(h)
        assert store.counts["head"] == 0, store.counts
        assert store.counts["get_range"] == N and store.counts["list"] <= _relists(t0), store.counts

        await trio.sleep(ATTR * 1.5)
        store.counts.clear()
        assert sorted(await _ls_l(fs, d)) == names  # ls -l again: the listing proves them all
        assert store.counts["head"] == 0 and store.counts["list"] == 1, store.counts

        await trio.sleep(ATTR * 1.5)
        store.counts.clear()
        t0 = time.monotonic()
        for name in names:  # rm d/*
            await fs.unlink(d, name)
        assert store.counts["delete"] == N and store.counts["head"] == 0, store.counts
        assert store.counts["list"] <= _relists(t0), store.counts
        assert [o.key for o in (await store.inner.list("pre/d/", delimiter="/")).objects] == ["pre/d/"]  # its marker
        fs.close()

    trio.run(main)


def test_listing_does_not_prove_a_file_another_client_changed(tmp_path, cmk_path):
    """A stale file whose listing entry differs from the version the mount holds is HEADed: a
    new version (other ETag) is read, and a metadata-only change by another client (same
    bytes, new metadata: new Last-Modified) is seen too."""
    names = _names(3)

    async def main():
        await _fill(tmp_path, cmk_path, names)
        fs = _mount(tmp_path, cmk_path, "cache")
        store = fs.store
        d = await fs.lookup(fs.get(1), "d")
        nodes = await _ls_l(fs, d)
        inner = store.inner
        other = await inner.head("pre/d/f0001")
        await trio.sleep(1.05)  # Last-Modified has one-second resolution
        # another client's chmod: OSS's metadata-only CopyObject keeps the ETag and sets a new
        # Last-Modified (the local bucket would make a new ETag: its index row is edited)
        db = inner._db()
        db.execute("UPDATE objects SET meta=?, mtime=? WHERE key=?",
                   (json.dumps({**other.metadata, "mode": str(0o100600)}), time.time(), "pre/d/f0001"))
        assert (await inner.head("pre/d/f0001")).etag == other.etag
        await inner.put_bytes("pre/d/f0002", b"their edit", {})  # another client's new version
        store.counts.clear()
        n0, n1, n2 = [await fs.lookup(d, n) for n in names]
        assert store.counts["head"] == 2, store.counts  # f0000 proven by the listing, not the others
        assert n0 is nodes["f0000"] and n1.mode == 0o100600 and n2.size == len(b"their edit")
        fs.close()

    trio.run(main)


def test_cold_sequential_read_uses_large_gets(tmp_path, cmk_path):
    """A cold sequential read of 48 MiB in 128 KiB reads (the kernel's size) fetches whole
    aligned 8 MiB chunks ahead: about 6 GETs, not one per 1 MiB block (48)."""
    size = 48 << 20
    data = os.urandom(1 << 20) * 48

    async def main():
        await _fill(tmp_path, cmk_path, ["big"], data=lambda i: data)
        fs = _mount(tmp_path, cmk_path, "cache")
        async with trio.open_nursery() as nursery:
            fs.cache.start(nursery)
            d = await fs.lookup(fs.get(1), "d")
            node = await fs.lookup(d, "big")
            fs.store.counts.clear()
            h = await fs.open(node, os.O_RDONLY)
            got = []
            for off in range(0, size, 1 << 17):
                got.append(await fs.read(h, off, 1 << 17))
            await fs.release(h)
            assert b"".join(got) == data
            gets = fs.store.counts["get_range"]
            assert gets <= 10, fs.store.counts
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


def test_a_store_slower_than_attr_timeout_does_not_make_each_stat_walk_the_path_again(tmp_path, cmk_path):
    """Every request takes longer than attr_timeout: ``ls -l d/e`` (a path walk, a listing,
    then a stat of each entry by its full path, the kernel asking each component again once
    its entry timed out) probes each directory once, HEADs each file once, and the stats need
    no request: what the store showed below a directory proves it, and answers count as read
    when they arrive (fs/resolve.py). Before, each stat probed d and e again (a HEAD, a LIST
    and a marker HEAD each) and listed e: seven requests per file."""
    names = _names(10)
    slow = ATTR * 1.5

    async def main():
        fs = _mount(tmp_path, cmk_path, "cache-writer")
        e = await fs.mkdir(await fs.mkdir(fs.get(1), "d", 0o755, 1, 2), "e", 0o750, 1, 2)
        for name in names:
            _node, h = await fs.create(e, name, 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, name.encode())
            await fs.release(h)
        assert await fs.drain() == 0
        fs.close()

        fs = _mount(tmp_path, cmk_path, "cache")
        store = fs.store
        store.delay("*", slow)

        async def stat(*path: str):
            node = fs.get(1)
            for name in path:  # the kernel's walk, every entry timed out
                node = await fs.lookup(node, name)
            return await fs.getattr(node)

        with trio.fail_after(30):  # before: ~7 requests per file (about 20 s here)
            assert (await stat("d", "e")).mode & 0o777 == 0o750
            listed = await _ls_l(fs, await fs.lookup(await fs.lookup(fs.get(1), "d"), "e"))
            assert sorted(listed) == names
            store.counts.clear()
            sizes = [(await stat("d", "e", name)).size for name in names]
        assert sizes == [len(n) for n in names]
        assert sum(store.counts.values()) == 0, store.counts

        # the other side: nothing below e read for as long as an answer is trusted (attr_timeout,
        # or 8 round trips of this slow store: trusted_for), another client's chmod of its
        # marker is seen at the next lookup; a known directory is revalidated with its three
        # requests at once (a HEAD of the name as a file, a one-key LIST, the marker's HEAD:
        # one round trip, not three in a row)
        store.clear()
        inner = store.inner
        marker = await inner.head("pre/d/e/")
        db = inner._db()
        db.execute("UPDATE objects SET meta=? WHERE key=?",
                   (json.dumps({**marker.metadata, "mode": str(0o40700)}), "pre/d/e/"))
        window = trusted_for(ATTR, store)
        assert 32 * slow <= window < 32 * slow + 3.0, window  # each HEAD took `slow` seconds
        await trio.sleep(ATTR * 1.5)
        store.counts.clear()
        assert (await stat("d", "e")).mode & 0o777 == 0o750 and not store.counts  # still trusted
        store.counters.round_trip = ATTR / 64  # the store got fast: attr_timeout counts again
        assert trusted_for(ATTR, store) == ATTR
        await trio.sleep(ATTR * 1.5)
        flight = {"now": 0, "most": 0}

        async def sent(inner, op, keys):
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
            await trio.sleep(0.001)  # (a fast store now: the others are sent meanwhile if sent together)

        async def answered(inner, op, keys):
            flight["now"] -= 1
        store.hook(("head", "list"), sent)
        store.hook(("head", "list"), answered, when="after")
        store.counts.clear()
        assert (await stat("d", "e")).mode & 0o777 == 0o700
        assert store.counts == {"head": 4, "list": 2} and flight["most"] == 3, (store.counts, flight)
        fs.close()

    trio.run(main)


def test_a_chmod_by_another_client_right_after_this_mounts_upload_is_seen(tmp_path, cmk_path):
    """Another client's metadata-only copy (a chmod: same ETag and size) in the same second as
    this mount's upload: the listing shows the same ETag, size and Last-Modified second, so it
    must not prove the attributes this mount wrote; once they expire, the file is HEADed and
    shows the new mode, also after a remount with the same cache dir. (A trial of the
    nineteenth session: a version this mount wrote, dated by its PUT answer's Date and kept in
    attrs.sqlite, showed the old mode for good.)"""
    async def main():
        fs = _mount(tmp_path, cmk_path, "cache")
        d = await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
        _node, h = await fs.create(d, "f", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"ours")
        await fs.release(h)
        assert await fs.drain() == 0
        inner = fs.store.inner
        ours = await inner.head("pre/d/f")
        inner._db().execute("UPDATE objects SET meta=? WHERE key=?",  # Last-Modified unchanged
                            (json.dumps({**ours.metadata, "mode": str(0o100600)}), "pre/d/f"))
        assert (await inner.head("pre/d/f")).mtime == ours.mtime
        await trio.sleep(ATTR * 1.5)
        listed = await _ls_l(fs, d)
        assert (await fs.getattr(listed["f"])).mode & 0o777 == 0o600
        fs.close()
        fs = _mount(tmp_path, cmk_path, "cache")  # the same cache dir: a remount
        d = await fs.lookup(fs.get(1), "d")
        assert (await fs.getattr(await fs.lookup(d, "f"))).mode & 0o777 == 0o600
        assert (await fs.getattr((await _ls_l(fs, d))["f"])).mode & 0o777 == 0o600
        fs.close()

    trio.run(main)


def test_a_head_answered_in_the_second_of_the_versions_change_proves_nothing(tmp_path, cmk_path):
    """This mount HEADs a file in the second of its version's Last-Modified, then another client
    chmods it in that same second (a metadata-only copy: same ETag, size and Last-Modified
    second). No listing may prove what that HEAD read: once the attributes expire the file is
    HEADed and shows the new mode, and that HEAD is not kept for the next mount (note 19: kept
    and proved, the old mode showed for good). A HEAD answered a second later proves as before."""
    async def main():
        await _fill(tmp_path, cmk_path, ["f", "g"])  # returns a second after the uploads
        fs = _mount(tmp_path, cmk_path, "cache")
        inner = fs.store.inner
        d = await fs.lookup(fs.get(1), "d")
        real_head = inner.head

        async def head_in_the_second_of_the_change(key):
            info = await real_head(key)
            in_that_second = (info.mtime + int(info.mtime) + 1) / 2  # after the change, before its second ends
            return dataclasses.replace(info, answered=in_that_second) if key == "pre/d/f" else info
        inner.head = head_in_the_second_of_the_change
        listed = await _ls_l(fs, d)
        inner.head = real_head
        f = await inner.head("pre/d/f")
        inner._db().execute("UPDATE objects SET meta=? WHERE key=?",  # their chmod; Last-Modified unchanged
                            (json.dumps({**f.metadata, "mode": str(0o100600)}), "pre/d/f"))
        assert listed["f"].mode & 0o777 == 0o644 and listed["g"].mode & 0o777 == 0o644
        await trio.sleep(ATTR * 1.5)
        fs.store.reset_counts()
        listed = await _ls_l(fs, d)
        assert listed["f"].mode & 0o777 == 0o600 and listed["g"].mode & 0o777 == 0o644
        assert fs.store.calls.count(("head", ("pre/d/f",))) == 1 and fs.store.counts["head"] == 1, fs.store.calls
        fs.close()
        fs = _mount(tmp_path, cmk_path, "cache")  # the same cache dir: a remount
        d = await fs.lookup(fs.get(1), "d")
        fs.store.reset_counts()
        listed = await _ls_l(fs, d)
        assert listed["f"].mode & 0o777 == 0o600 and listed["g"].mode & 0o777 == 0o644
        assert fs.store.counts["head"] == 0, fs.store.calls  # both HEADs kept were answered a second later
        fs.close()

    trio.run(main)


def test_a_listing_sends_more_heads_at_once_when_the_store_is_far(tmp_path, cmk_path):
    """readdir HEADs its entries 32 at once while a HEAD takes under 5 ms (the client's CPU
    bounds the batch there), 64 at once from 5 ms on (latency bounds it): bench/RESULTS.md,
    nineteenth session. The store's recent round trip decides (StoreCounters.round_trip)."""
    names = _names(100)

    async def main():
        await _fill(tmp_path, cmk_path, names)
        for round_trip, at_once in ((0.001, 32), (0.02, 64)):
            fs = _mount(tmp_path, cmk_path, f"cache-{at_once}")
            store = fs.store
            d = await fs.lookup(fs.get(1), "d")
            flight = {"now": 0, "most": 0}

            async def sent(inner, op, keys, flight=flight):
                flight["now"] += 1
                flight["most"] = max(flight["most"], flight["now"])
                await trio.sleep(0.01)  # the others are sent meanwhile, up to the limit

            async def answered(inner, op, keys, flight=flight):
                flight["now"] -= 1
            store.hook("head", sent)
            store.hook("head", answered, when="after")
            store.counters.round_trip = round_trip
            assert sorted(await _ls_l(fs, d)) == names
            assert flight["most"] == at_once, (round_trip, flight)
            fs.close()

    trio.run(main)


def test_ls_l_after_a_remount_needs_no_head_where_the_listing_shows_a_kept_version(tmp_path, cmk_path):
    """A mount keeps the attributes its HEADs read in its cache dir (ossfuse/attrcache.py): the
    next mount with that cache dir answers ``ls -l`` from one LIST where the listing shows the
    version a kept HEAD described (same ETag, size, Last-Modified second). Another client's
    new version and its chmod (new Last-Modified) are HEADed; the modes, sizes and content are
    what the store holds; a file opened from a kept row HEADs its envelope first."""
    names = _names(20)

    async def main():
        await _fill(tmp_path, cmk_path, names)
        fs = _mount(tmp_path, cmk_path, "cache")
        d = await fs.lookup(fs.get(1), "d")
        fs.store.counts.clear()
        assert sorted(await _ls_l(fs, d)) == names
        assert fs.store.counts["head"] == 20, fs.store.counts  # cold: HEADed once each
        fs.close()

        inner = fs.store.inner
        await trio.sleep(1.05)  # Last-Modified has one-second resolution
        await inner.put_bytes("pre/d/f0003", b"their edit", {})  # another client's new version
        chmodded = await inner.head("pre/d/f0005")  # another client's chmod: a metadata-only copy
        inner._db().execute("UPDATE objects SET meta=?, mtime=? WHERE key=?",
                            (json.dumps({**chmodded.metadata, "mode": str(0o100600)}), time.time(), "pre/d/f0005"))
        await _next_second()  # (HEADs in the second of their change would not be kept)

        fs = _mount(tmp_path, cmk_path, "cache")  # the same cache dir: a remount
        store = fs.store
        d = await fs.lookup(fs.get(1), "d")
        store.counts.clear()
        listed = await _ls_l(fs, d)
        assert sorted(listed) == names
        assert store.counts["list"] == 1 and store.counts["head"] == 2, store.counts  # f0003, f0005
        assert [listed[n].mode & 0o777 for n in names] == [0o600 if n == "f0005" else 0o644 for n in names]
        assert [listed[n].size for n in names] == [10 if n == "f0003" else len(b"x%d" % i * 100)
                                                  for i, n in enumerate(names)]
        assert not listed["f0001"].version.held  # slim: its envelope is read when it is opened
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            fs.cache.start(nursery)
            store.counts.clear()
            h = await fs.open(listed["f0001"], os.O_RDONLY)
            assert await fs.read(h, 0, 1 << 16) == b"x1" * 100
            await fs.release(h)
            nursery.cancel_scope.cancel()
        # the GET of its first block brought its envelope (no HEAD, no second GET)
        assert store.counts == {"get_range_with_info": 1}, store.counts
        # cat d/*: open-ahead fetches the next slim versions' envelopes in the background (the
        # bench's "cat, data keys cached" at 10 ms took 12.7 s with a HEAD before each open,
        # 2.3 s before the kept rows), each by the ranged GET of its first block, whose answer
        # carries the metadata a HEAD's would (get_range_with_info: one GET on OSS)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            fs.cache.start(nursery)
            store.counts.clear()
            store.delay(("head", "get_range_with_info"), 0.05)  # opens arrive while the fetches ahead are in flight
            ahead_at_open = []
            for i, name in enumerate(names):
                node = await fs.lookup(d, name)
                ahead_at_open.append(store.counts["get_range_with_info"])
                h = await fs.open(node, os.O_RDONLY)
                assert await fs.read(h, 0, 1 << 16) == (b"their edit" if name == "f0003" else b"x%d" % i * 100)
                await fs.release(h)
            nursery.cancel_scope.cancel()
        # f0000, opened before the run of opens began, and the 16 other slim ones: one request
        # each, none twice; f0001 (read above) and f0003, f0005 (HEADed by the ls -l) hold their
        # envelopes: a GET each but f0001 (its block is cached)
        assert (store.counts["head"], store.counts["get_range"], store.counts["get_range_with_info"]) == (0, 2, 17), \
            store.counts  # (and a LIST when the walk outlives attr_timeout: the lookups revalidate)
        # they ran ahead of the opens (without open-ahead at most one per file opened)
        assert any(sent >= i + 4 for i, sent in enumerate(ahead_at_open)), ahead_at_open
        fs.close()

        fs = _mount(tmp_path, cmk_path, "cache")  # again: lookups by name, no readdir (rsync, git status)
        store = fs.store
        d = await fs.lookup(fs.get(1), "d")
        store.counts.clear()
        found = [await fs.lookup(d, n) for n in names]
        assert [n.size for n in found] == [10 if n == "f0003" else len(b"x%d" % i * 100) for i, n in enumerate(names)]
        assert found[5].mode & 0o777 == 0o600
        # one page proves all but f0003, another client's plaintext object (never kept: a HEAD)
        assert store.counts["list"] == 1 and store.counts["head"] == 1, store.counts
        with pytest.raises(FsError):
            await fs.lookup(d, "f9999")  # nothing kept, nothing there
        fs.close()

        fs = _mount(tmp_path, cmk_path, "cache-elsewhere")  # another machine: nothing kept
        d = await fs.lookup(fs.get(1), "d")
        fs.store.counts.clear()
        assert sorted(await _ls_l(fs, d)) == names
        assert fs.store.counts["head"] == 20, fs.store.counts
        fs.close()

    trio.run(main)


def test_opening_a_slim_version_gets_its_envelope_with_its_first_block(tmp_path, cmk_path):
    """A file whose version a kept attribute row describes (slim: no envelope held) opens with
    one request, the ranged GET of its first block, whose answer carries the metadata a HEAD's
    would; when another client replaced the object meanwhile, that answer is the new version's
    and its bytes are what the open reads. A write-only open still HEADs (no block to read)."""
    names = _names(3)

    async def main():
        await _fill(tmp_path, cmk_path, names)
        fs = _mount(tmp_path, cmk_path, "cache")
        d = await fs.lookup(fs.get(1), "d")
        await _ls_l(fs, d)
        fs.close()
        fs = _mount(tmp_path, cmk_path, "cache")
        store = fs.store
        d = await fs.lookup(fs.get(1), "d")
        listed = await _ls_l(fs, d)
        assert not any(n.version.held for n in listed.values())
        await store.inner.put_bytes("pre/d/f0001", b"their new body", {})  # another client's version
        store.counts.clear()
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            fs.cache.start(nursery)
            h = await fs.open(listed["f0002"], os.O_WRONLY)
            await fs.release(h)
            assert store.counts["head"] == 1 and store.counts["get_range_with_info"] == 0, store.counts
            for name, want in (("f0000", b"x0" * 100), ("f0001", b"their new body")):
                store.counts.clear()
                h = await fs.open(listed[name], os.O_RDONLY)
                assert await fs.read(h, 0, 1 << 16) == want
                await fs.release(h)
                assert store.counts == {"get_range_with_info": 1}, (name, store.counts)
                assert listed[name].size == len(want)
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


def test_names_a_listing_proved_from_kept_rows_are_not_used_after_their_directory_moved(tmp_path, cmk_path):
    """A lookup's LIST page proves the kept rows of the names after it for their own lookups;
    once that directory is renamed and another client makes one at its path, those names are
    not there: the new directory's lookups find nothing (not a node from the old listing)."""
    names = _names(3)

    async def main():
        await _fill(tmp_path, cmk_path, names)
        fs = _mount(tmp_path, cmk_path, "cache")
        d = await fs.lookup(fs.get(1), "d")
        assert sorted(await _ls_l(fs, d)) == names  # HEADs: rows kept
        fs.close()
        fs = _mount(tmp_path, cmk_path, "cache")
        fs.resolver.attr_timeout = 60.0  # nothing expires during the test
        root = fs.get(1)
        d = await fs.lookup(root, "d")
        await fs.lookup(d, names[0])  # its page proves names[1:] from their rows
        await fs.rename(root, "d", root, "moved", 0)
        await fs.store.inner.put_bytes("pre/d/other", b"theirs", {})  # another client's d, then
        await trio.sleep(ATTR * 1.5)  # this mount's "no d here" since the rename is over
        d = await fs.lookup(root, "d")
        for name in names[1:]:
            with pytest.raises(FsError):
                await fs.lookup(d, name)
        moved = await fs.lookup(root, "moved")
        assert [(await fs.lookup(moved, n)).size for n in names] == [len(b"x%d" % i * 100) for i in range(3)]
        fs.close()

    trio.run(main)


def test_attribute_rows_of_an_earlier_release_are_not_used(tmp_path):
    """attrs.sqlite rows written before HEADs answered in their version's Last-Modified second
    were refused (table ``attrs``) may hold such a HEAD, which proves nothing: a daemon of this
    release drops them (a trial: rows of the earlier daemon kept three stale modes after the
    upgrade, with no HEAD) and keeps its own."""
    import sqlite3

    from ossfuse.attrcache import AttrCache
    path = str(tmp_path / "attrs.sqlite")
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE attrs (key TEXT PRIMARY KEY, etag TEXT NOT NULL, size INTEGER NOT NULL,"
                " modified REAL NOT NULL, attrs TEXT NOT NULL)")
    old.execute("INSERT INTO attrs VALUES ('pre/f', 'E1', 3, 1700000000.0, '{\"mode\": \"33188\"}')")
    old.commit()
    old.close()
    cache = AttrCache(path)
    assert cache.get_many(["pre/f"]) == {}
    cache.put_many([("pre/g", "E2", 4, 1700000001.0, {"mode": "33152", "client-side-encryption-key": "k"})])
    cache.close()
    cache = AttrCache(path)
    assert list(cache.get_many(["pre/f", "pre/g"])) == ["pre/g"]
    tables = [r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["kept"], tables
    cache.close()
