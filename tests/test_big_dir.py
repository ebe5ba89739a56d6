"""A big directory over a store whose listing carries no metadata (OSS; issue 14): its entries
come from the listing alone (``Node.listed_only``: no HEAD per entry), and what is stat'ed,
looked up or opened is read from the store first. In-process over the OSS-like store of
tests/test_requests.py, with the size threshold lowered so that a dozen entries count as big."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from ossfuse.fs import FsError, readdir

from test_requests import _mount

N_FILES = 12


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(readdir, "LISTED_ATTRS_ABOVE", 4)
    monkeypatch.setattr(readdir, "LISTED_BATCH", 5)  # several readdir steps per listing


async def _fill(tmp_path, cmk_path) -> dict[str, int]:
    """``d/`` holding N_FILES files f00.. (mode 0600, mtime 1.5e9 + i), a symlink ``link`` and a
    subdirectory ``sub``, written through a first mount; returns {file name: size}."""
    fs = _mount(tmp_path, cmk_path, "cache-writer")
    d = await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
    sizes = {}
    for i in range(N_FILES):
        name = f"f{i:02d}"
        node, h = await fs.create(d, name, 0o600, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"%d" % i * (100 + i))
        await fs.release(h)
        await fs.setattr(node, mtime_ns=(1_500_000_000 + i) * 10**9)
        sizes[name] = len(b"%d" % i) * (100 + i)
    await fs.symlink(d, "link", "f00", 1, 2)
    await fs.mkdir(d, "sub", 0o700, 1, 2)
    assert await fs.drain() == 0
    fs.close()
    await fs.store.aclose()
    return sizes


async def _readdir_all(fs, d, take=3, between=None) -> list[tuple[int, str, object]]:
    """readdir of ``d`` to the end, the kernel taking ``take`` entries per call (each
    remembered); ``between()`` runs after each call."""
    h = fs.opendir(d)
    out, start = [], 0
    try:
        while True:
            got = await fs.readdir_entries(h, start)
            if not got:
                return out
            for entry in got[:take]:
                fs.remember(entry[2])
                out.append(entry)
            start = got[:take][-1][0]
            if between is not None:
                await between()
    finally:
        fs.releasedir(h.fh)


def test_big_directory_lists_without_head_and_stat_reads_the_store(tmp_path, cmk_path, small_threshold):
    async def main():
        sizes = await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        fs.store.reset_counts()
        listed = {name: node for _, name, node in await _readdir_all(fs, d)}
        assert sorted(listed) == sorted(sizes) + ["link", "sub"]
        assert fs.store.counts["head"] == 0 and fs.store.counts["list"] == 1, fs.store.counts
        f3 = listed["f03"]
        assert f3.listed_only and f3.version is None
        assert stat.S_ISREG(f3.mode) and stat.S_ISDIR(listed["sub"].mode)
        assert all(listed[n].size == s for n, s in sizes.items())  # listed size = plaintext size
        # a second listing (the kernel still holds the nodes) reuses them, still without HEAD
        again = {name: node for _, name, node in await _readdir_all(fs, d)}
        assert all(again[n] is listed[n] for n in listed) and fs.store.counts["head"] == 0

        # stat: one HEAD, then the stored attributes
        assert await fs.getattr(f3) is f3
        assert fs.store.counts["head"] == 1
        assert not f3.listed_only and f3.mode == stat.S_IFREG | 0o600 and (f3.uid, f3.gid) == (1, 2)
        assert f3.mtime_ns == 1_500_000_003 * 10**9 and f3.size == sizes["f03"]
        # a lookup of a listed-only name reads it too (the kernel looks up what it stats)
        f4 = await fs.lookup(d, "f04")
        assert f4 is listed["f04"] and not f4.listed_only and f4.mtime_ns == 1_500_000_004 * 10**9
        sub = await fs.lookup(d, "sub")
        assert sub is listed["sub"] and not sub.listed_only and sub.mode == stat.S_IFDIR | 0o700
        # the guess was wrong for the symlink: getattr of the guessed inode says it is stale,
        # the lookup that follows hands out the symlink
        with pytest.raises(FsError) as e:
            await fs.getattr(listed["link"])
        assert e.value.errno == errno.ENOENT
        link = await fs.lookup(d, "link")
        assert link is not listed["link"] and stat.S_ISLNK(link.mode) and await fs.readlink(link) == "f00"
        # open of a listed-only file without a stat first reads it (and its content) right
        f7 = listed["f07"]
        assert f7.listed_only
        h = await fs.open(f7, os.O_RDONLY)
        assert not f7.listed_only and await fs.read(h, 0, 1000) == b"7" * 107
        await fs.release(h)
        # chmod of a listed-only inode changes the stored attributes, never the guessed ones
        f9 = listed["f09"]
        await fs.setattr(f9, mode=stat.S_IFREG | 0o640)
        assert not f9.listed_only and f9.mode == stat.S_IFREG | 0o640 and f9.mtime_ns == 1_500_000_009 * 10**9
        # gone since the listing: ENOENT, never attributes of nothing
        await fs.store.delete(fs.key("d/f08"))
        with pytest.raises(FsError) as e:
            await fs.getattr(listed["f08"])
        assert e.value.errno == errno.ENOENT
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_big_directory_offsets_stay_stable_with_concurrent_creates(tmp_path, cmk_path, small_threshold):
    """Names created between readdir calls neither shift nor repeat the listed ones."""
    async def main():
        sizes = await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        made = []

        async def create_one():
            name = f"e{len(made):02d}"  # sorts before every listed name
            node, h = await fs.create(d, name, 0o644, os.O_WRONLY, 1, 2)
            await fs.release(h)
            made.append(name)

        entries = await _readdir_all(fs, d, take=2, between=create_one)
        names = [name for _, name, _ in entries]
        assert names == sorted(sizes) + ["link", "sub"]  # the snapshot: each once, in order
        assert [i for i, _, _ in entries] == list(range(1, len(names) + 1))
        assert made and all(n not in names for n in made)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_small_directory_keeps_full_attributes(tmp_path, cmk_path):
    """At most LISTED_ATTRS_ABOVE entries: full attributes from HEADs, nothing guessed."""
    async def main():
        await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        fs.store.reset_counts()
        listed = {name: node for _, name, node in await _readdir_all(fs, d)}
        assert not any(n.listed_only for n in listed.values())
        assert stat.S_ISLNK(listed["link"].mode) and listed["f05"].mode == stat.S_IFREG | 0o600
        assert fs.store.counts["head"] == N_FILES + 2, fs.store.counts  # files, link, sub's marker
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_big_directory_makes_each_node_once(tmp_path, cmk_path, small_threshold, monkeypatch):
    """The entries of a batch the kernel did not take are handed out by its next call without
    being dropped and made again (each made twice on average was most of a 100k listing's time)."""
    async def main():
        sizes = await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        made = []
        real = fs.resolver.node_from_listing
        monkeypatch.setattr(fs.resolver, "node_from_listing", lambda *a: made.append(a[0]) or real(*a))
        entries = await _readdir_all(fs, d, take=2)
        assert len(entries) == len(sizes) + 2
        assert sorted(made) == sorted(f"d/{name}" for _, name, _ in entries)  # once each
        assert all(node.lookups == 1 for _, _, node in entries)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_ls_l_of_a_big_directory_heads_each_batch_together(tmp_path, cmk_path, small_threshold):
    """``ls -l`` stats each entry after its readdir batch: from the second lookup of a batch on,
    the batch's other listed-only entries are HEADed together; each name is HEADed once, and
    every lookup shows the stored attributes. A lone lookup HEADs only its own name."""
    async def main():
        sizes = await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        fs.store.reset_counts()
        h = fs.opendir(d)
        start, looked, ahead = 0, {}, 0
        while True:
            got = await fs.readdir_entries(h, start)
            if not got:
                break
            for k, (_, name, node) in enumerate(got[:3]):  # the kernel takes 3: ls stats them
                fs.remember(node)
                looked[name] = await fs.lookup(d, name)
                if k == 1 and len(got) > 2:
                    ahead += not got[2][2].listed_only  # HEADed with the second, before its own lookup
            start = got[:3][-1][0]
        fs.releasedir(h.fh)
        assert sorted(looked) == sorted(sizes) + ["link", "sub"]
        assert all(looked[n].mode == stat.S_IFREG | 0o600 and looked[n].size == s for n, s in sizes.items())
        assert stat.S_ISLNK(looked["link"].mode) and looked["sub"].mode == stat.S_IFDIR | 0o700
        heads = [keys[0] for op, keys in fs.store.calls if op == "head"]
        assert len(heads) == len(set(heads)), heads  # each key once
        assert len(heads) == len(sizes) + 1 + 2, heads  # files, link, sub (its file key and marker)
        assert ahead >= 2, ahead  # batches were read ahead

        fs.store.reset_counts()  # a lone stat in a fresh listing: one HEAD
        fs2 = _mount(tmp_path, cmk_path, "cache-reader-2")
        d2 = await fs2.lookup(fs2.get(1), "d")
        h = fs2.opendir(d2)
        for _, _, node in await fs2.readdir_entries(h, 0):
            fs2.remember(node)
        fs2.store.reset_counts()
        node = await fs2.lookup(d2, "f01")
        assert node.mode == stat.S_IFREG | 0o600 and fs2.store.counts["head"] == 1, fs2.store.counts
        fs2.releasedir(h.fh)
        for f in (fs, fs2):
            f.close()
            await f.store.aclose()

    trio.run(main)


def test_a_batch_node_the_kernel_took_and_forgot_is_not_dropped_twice(tmp_path, cmk_path, small_threshold):
    """A node of a readdir batch that the kernel took, forgot (dropped from the table) and
    looked up again (a new node, the same inode number) stays in the table across the next
    readdir call: dropping the forgotten one again took the new one's number out of the table
    (the kernel's next getattr: ENOENT; a KeyError failed that readdir with EIO)."""
    async def main():
        await _fill(tmp_path, cmk_path)
        fs = _mount(tmp_path, cmk_path, "cache-reader")
        d = await fs.lookup(fs.get(1), "d")
        h = fs.opendir(d)
        got = await fs.readdir_entries(h, 0)
        first = got[0][2]
        fs.remember(first)  # the kernel takes one entry ...
        fs.forget(first.ino, 1)  # ... and forgets it (memory pressure): dropped
        assert fs.inodes.nodes.get(first.ino) is None
        again = await fs.lookup(d, got[0][1])  # looked up anew: same number, another node
        assert again is not first and again.ino == first.ino
        await fs.readdir_entries(h, 1)  # the next call: first was made by the last batch
        assert fs.get(again.ino) is again
        fs.releasedir(h.fh)
        assert fs.get(again.ino) is again
        fs.close()
        await fs.store.aclose()

    trio.run(main)
