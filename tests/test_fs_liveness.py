"""Liveness and completeness of the namespace, driven in-process (no kernel) over the
fault-injecting store: no mount-wide lock across network I/O (review A4), unlink of an open
file keeps the object until the last close and downloads nothing (A10), a listing lists every
name or fails (A3), implicit directories survive their last child (A14), out-of-range
attributes (break-testing), background cache tasks (A9), readdir node leaks (A15) and the
unwrapped-key cache keyed by CMK.

Latency tests run under trio's MockClock: a FaultStore ``delay`` is a trio sleep, so virtual
time adds up the store round trips on the critical path (250 ms each). The clock jumps only
after 0.1 s of real idleness, so the local store's worker threads (real time) finish before
it jumps past them."""
from __future__ import annotations

import errno
import logging
import os
import stat

import sys

import pytest
import trio
import trio.testing

sys.path.insert(0, os.path.dirname(__file__))
from fakes.core import core_filesystem  # noqa: E402
from fakes.fault_store import FaultStore  # noqa: E402
from ossfuse import envelope as env  # noqa: E402
from ossfuse.cmk import KeyMissing  # noqa: E402
from ossfuse.config import CmkConfig, EncryptionConfig  # noqa: E402
from ossfuse.fs import Filesystem, FsError  # noqa: E402
from ossfuse.fs.readdir import SETTLE_BATCH  # noqa: E402
from ossfuse.keyring import Keyring  # noqa: E402
from ossfuse.store.local import LocalStore  # noqa: E402

class _CopyingLocalStore(LocalStore):
    """A local bucket that always copies uploaded files (as a remote store does): with
    ``local_disk`` off, the block cache takes over uploaded staging files and punches holes in
    them, which must not reach the bucket through a hard link."""

    async def put_file(self, key, path, metadata, *, may_link=False, if_absent=False, replaces=None):
        return await super().put_file(key, path, metadata, may_link=False, if_absent=if_absent, replaces=replaces)


RTT = 0.25  # seconds per store request in the latency tests (repro 07's server latency)


def _fs(tmp_path, cmk_path, *, oss_like=True, max_size=10 << 30, **mount) -> Filesystem:
    """A Filesystem over FaultStore(LocalStore) in ``tmp_path``. ``oss_like``: the store's
    listing carries no metadata (one HEAD per entry, as on OSS) and is not a local disk."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore((_CopyingLocalStore if oss_like else LocalStore)(str(tmp_path / "bucket")))
    if oss_like:
        store.listing_has_metadata = False
        store.local_disk = False
    return core_filesystem(tmp_path, cmk_path, store=store, cache={"max_size": max_size, "min_free": 0}, **mount)


async def _write_file(fs: Filesystem, parent, name: str, data: bytes):
    node, h = await fs.create(parent, name, 0o644, os.O_WRONLY, 1, 2)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    await fs.commit.upload_node(node)
    assert node.staged is None and node.version is not None
    return node


def _run_mock(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0.1))


# -- A4: per-name locks, nothing mount-wide across the network ------------------------------

def test_creates_of_different_names_do_not_queue_behind_each_other(tmp_path, cmk_path):
    """80 creates with 250 ms per store request: each probes (HEAD + LIST) with no lock held,
    so together they take about one probe, not 80 (main: one mount-wide lock, 40 s)."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        await _write_file(fs, root, "other.txt", b"hello")
        fs.inodes.by_path.pop("other.txt")  # not looked up yet: the lookup must ask the store
        fs.store.delay("*", RTT)
        done = []

        async def create(i):
            node, h = await fs.create(root, f"n{i}", 0o644, os.O_WRONLY, 1, 2)
            done.append(node)

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for i in range(80):
                n.start_soon(create, i)
            await trio.sleep(0.1)
            t1 = trio.current_time()
            other = await fs.lookup(root, "other.txt")
            stat_took = trio.current_time() - t1
        took = trio.current_time() - t0
        assert len(done) == 80 and len({d.ino for d in done}) == 80
        assert other.size == 5
        assert took < 4 * RTT, f"80 creates took {took:.2f} s of store time"
        assert stat_took <= 2 * RTT + 0.01, stat_took  # one HEAD (and nothing queued before it)
        assert fs.namespace.locks.held() == set()

    _run_mock(main)


def test_creates_serialised_by_the_kernel_cost_no_request_each(tmp_path, cmk_path):
    """The kernel runs a create's lookup and the create under its directory's lock, so 80
    creates in one directory run one after another and a stat in that directory waits for
    them (repro 07: 42 s on main). The first lookup miss lists the (small) directory once;
    the misses that follow are answered from that listing with no request."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        await _write_file(fs, root, "other.txt", b"hello")
        fs = _fs(tmp_path, cmk_path)  # a fresh mount: nothing known
        root = fs.get(1)
        fs.store.delay("*", RTT)
        fs.store.reset_counts()
        t0 = trio.current_time()
        for i in range(80):  # as the kernel does them: lookup (ENOENT), then create
            with pytest.raises(FsError) as e:
                await fs.lookup(root, f"n{i}")
            assert e.value.errno == errno.ENOENT
            await fs.create(root, f"n{i}", 0o644, os.O_WRONLY, 1, 2)
        creates = trio.current_time() - t0
        t1 = trio.current_time()
        other = await fs.lookup(root, "other.txt")
        stat_took = trio.current_time() - t1
        assert other.size == 5
        # two misses probed (HEAD + LIST each), then one listing answers the other 78
        # (main: 80 x (HEAD + LIST) = 40 s)
        assert creates <= 5 * RTT + 0.01, creates
        assert stat_took <= RTT + 0.01, stat_took  # one HEAD
        assert fs.store.counts["list"] == 3 and fs.store.counts["head"] == 3

    _run_mock(main)


def test_lookups_of_existing_names_take_no_listing(tmp_path, cmk_path):
    """Only a burst of misses lists a directory for lookups: reading what another client
    just wrote, name after name, sees each new object at once."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        await _write_file(fs, d, "a", b"a")
        fs = _fs(tmp_path, cmk_path)
        d = await fs.lookup(fs.get(1), "d")
        await fs.lookup(d, "a")
        for name in ("b", "c", "e"):
            await fs.store.inner.put_bytes(f"pre/d/{name}", name.encode(), {})  # another client
            assert (await fs.lookup(d, name)).size == 1
        assert d.children is None

    trio.run(main)


def test_a_directory_the_kernel_forgets_while_its_lookup_waits_for_the_store_stays_known(tmp_path, cmk_path):
    """Trial BT7 finding 2: a lookup of a directory whose attributes had expired asked the
    store; the kernel's FORGET of the directory's last lookups came meanwhile (it had dropped
    the dentry: the lookup before had failed) and dropped the node; the lookup then handed the
    kernel that dropped node, and every name below it was ENOENT (its inode unknown) until the
    kernel looked the directory up again. Now a node handed out is known (put back when
    nothing took its path or number since)."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        await _write_file(fs, d, "f", b"f")
        assert d.lookups == 1
        d.checked_at = 0.0  # expired: the next lookup asks the store
        entered, gate = trio.Event(), trio.Event()

        async def hold(inner, op, keys):
            entered.set()
            await gate.wait()

        fs.store.hook(("head", "list"), hold, key="pre/d*", count=1)
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _append(got, fs.lookup(root, "d")))
            await entered.wait()
            fs.forget(d.ino, 1)  # the kernel's FORGET, while the store answers the lookup
            gate.set()
        [node] = got
        assert fs.get(node.ino) is node and node.lookups == 1 and node.path == "d"
        assert fs.inodes.by_path["d"] is node
        assert (await fs.lookup(node, "f")).size == 1  # a name below it (it was ENOENT)

    trio.run(main)


async def _append(got: list, awaitable) -> None:
    got.append(await awaitable)


def test_a_slow_commit_holds_only_its_own_name(tmp_path, cmk_path):
    """A symlink whose PUT takes 30 s: mkdir, create and unlink of other names finish in store
    round trips meanwhile (main: 30 s behind the mount-wide lock); a create of the same name
    sees it (EEXIST)."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        victim = await _write_file(fs, root, "victim", b"x")
        fs.store.delay("put_bytes", 30, key="pre/slow")
        fs.store.delay("*", RTT)
        results = {}

        async def slow():
            await fs.symlink(root, "slow", "target", 1, 2)
            results["slow"] = trio.current_time()

        async def slow_holds_its_name():
            while "slow" not in fs.namespace.locks.held():
                await trio.sleep(0.01)

        async def same_name():
            await slow_holds_its_name()
            with pytest.raises(FsError) as e:
                await fs.create(root, "slow", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 1, 2)
            results["same"] = (e.value.errno, trio.current_time())

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(slow)
            n.start_soon(same_name)
            await slow_holds_its_name()
            t1 = trio.current_time()
            await fs.mkdir(root, "d", 0o755, 1, 2)
            await fs.create(root, "f", 0o644, os.O_WRONLY, 1, 2)
            await fs.unlink(root, "victim")
            others = trio.current_time() - t1
            assert fs.namespace.locks.held() == {"slow"}
        assert others < 10 * RTT, others
        assert victim.unlinked and await fs.store.inner.head("pre/victim") is None
        assert results["slow"] - t0 >= 30
        # the symlink's node is there from the start of its PUT (removed if the PUT fails)
        assert results["same"][0] == errno.EEXIST

    _run_mock(main)


def test_rename_locks_its_names_and_recheck_sees_a_new_destination(tmp_path, cmk_path):
    """While rename a→b copies (slow), a create of b waits for the rename and gets EEXIST,
    and a create of c does not wait."""
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        await _write_file(fs, root, "a", b"content of a")
        fs.store.delay("copy", 20)
        got = {}

        async def create(name):
            await trio.sleep(1)
            try:
                await fs.create(root, name, 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 1, 2)
                got[name] = ("ok", trio.current_time())
            except FsError as e:
                got[name] = (e.errno, trio.current_time())

        async with trio.open_nursery() as n:
            n.start_soon(fs.rename, root, "a", root, "b", 0)
            n.start_soon(create, "b")
            n.start_soon(create, "c")
        assert got["c"][0] == "ok" and got["c"][1] < 5
        assert got["b"][0] == errno.EEXIST and got["b"][1] >= 20
        assert await fs.store.inner.head("pre/a") is None and await fs.store.inner.head("pre/b") is not None

    _run_mock(main)


@pytest.mark.expect_log(r"lookup of '.*' failed: injected fault")
def test_rename_fails_when_it_cannot_tell_whether_the_destination_exists(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        await _write_file(fs, root, "a", b"1")
        fs = _fs(tmp_path, cmk_path)  # another mount: it knows no listing of the root
        root = fs.get(1)
        fs.store.fail("head", key="pre/b", count=None)
        fs.store.fail("list", key="pre/", count=None)  # the root's listing cannot answer either
        await fs.lookup(root, "a")
        with pytest.raises(FsError) as e:
            await fs.rename(root, "a", root, "b", 0)
        assert e.value.errno == errno.EIO
        assert await fs.store.inner.head("pre/a") is not None

    trio.run(main)


def test_name_locks_conflicts():
    from ossfuse.fs.locks import NameLocks

    async def main():
        locks = NameLocks()
        order = []

        async def take(tag, names, trees=(), hold=1.0):
            async with locks.hold(names=names, trees=trees):
                order.append((tag, "in", trio.current_time()))
                await trio.sleep(hold)

        async with trio.open_nursery() as n:
            n.start_soon(take, "tree d", (), ["d"], 5.0)
            await trio.sleep(0.1)
            n.start_soon(take, "d/x", ["d/x"])     # under the tree: waits
            n.start_soon(take, "dx", ["dx"])       # a sibling whose name starts alike: does not
            n.start_soon(take, "e+d/y", ["e", "d/y"])  # all at once: e is not taken while d/y waits
            n.start_soon(take, "e", ["e"], (), 0.0)
        t = {tag: when for tag, _, when in order}
        assert t["dx"] < 1 and t["e"] < 1
        assert t["d/x"] >= 5 and t["e+d/y"] >= 5
        assert locks.held() == set()

    _run_mock(main)


def test_a_tree_lock_waits_for_a_tree_held_below_it():
    """A rename of ``A`` (trees A, A2) waits while ``A/C`` is renamed (trees A/C, B/C) or
    removed, and the other way round. Before, the parent's tree was taken at once: the two
    renames ran together, and the parent's moved ``A/C`` under a path computed from the wrong
    base (a trial: stray ``AC`` directories, ``C`` twice, newest data at the stray name)."""
    from ossfuse.fs.locks import NameLocks

    async def main():
        locks = NameLocks()
        t = {}

        async def take(tag, trees, hold=1.0):
            async with locks.hold(trees=trees):
                t[tag] = trio.current_time()
                await trio.sleep(hold)

        async with trio.open_nursery() as n:
            n.start_soon(take, "child", ["A/C", "B/C"], 5.0)
            await trio.sleep(0.1)
            n.start_soon(take, "parent", ["A", "A2"])
            n.start_soon(take, "elsewhere", ["AC", "D"])  # a name that only starts alike: no wait
        assert t["elsewhere"] < 1 and t["parent"] >= 5
        async with trio.open_nursery() as n:
            n.start_soon(take, "parent 2", ["A", "A2"], 5.0)
            await trio.sleep(0.1)
            n.start_soon(take, "child 2", ["A/C", "B/C"])
        assert t["child 2"] - t["parent 2"] >= 5
        assert locks.held() == set()

    _run_mock(main)


# -- A10: unlink of an open file -------------------------------------------------------------

def test_unlink_of_an_open_file_downloads_nothing_and_deletes_at_last_close(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path, max_size=1 << 20)
        root = fs.get(1)
        data = os.urandom(3 << 20)  # 3 MiB: three times the cache limit
        node = await _write_file(fs, root, "big", data)
        fs.cache.drop(node.version.key, node.version.etag)  # as after a remount: nothing cached
        h = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h, 0, 10) == data[:10]
        h2 = await fs.open(node, os.O_RDONLY)
        fs.store.reset_counts()
        await fs.unlink(root, "big")
        assert fs.store.counts["get_range"] == 0 and fs.store.counts["delete"] == 0
        assert fs.cache.pinned_bytes == 0
        with pytest.raises(FsError) as e:
            await fs.lookup(root, "big")
        assert e.value.errno == errno.ENOENT
        assert await fs.store.inner.head("pre/big") is not None
        assert len(os.listdir(tmp_path / "cache" / "unlinked")) == 1  # recorded for a crash
        got = b"".join([await fs.read(h, off, 1 << 18) for off in range(0, len(data), 1 << 18)])
        assert got == data
        await fs.release(h)
        assert await fs.store.inner.head("pre/big") is not None  # h2 still reads it
        assert await fs.read(h2, len(data) - 5, 5) == data[-5:]
        await fs.release(h2)
        assert await fs.store.inner.head("pre/big") is None
        assert os.listdir(tmp_path / "cache" / "unlinked") == []

    trio.run(main)


def test_deferred_delete_spares_a_newer_object_at_the_name(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"old")
        h = await fs.open(node, os.O_RDONLY)
        await fs.unlink(root, "f")
        new = await _write_file(fs, root, "f", b"new content")
        assert await fs.read(h, 0, 10) == b"old"
        await fs.release(h)
        info = await fs.store.inner.head("pre/f")
        assert info is not None and info.etag == new.version.etag
        # a new file at the name whose upload is still pending: no DELETE may race that upload
        h = await fs.open(new, os.O_RDONLY)
        await fs.unlink(root, "f")
        newer, hw = await fs.create(root, "f", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(hw, 0, b"newest")
        fs.store.reset_counts()
        await fs.release(h)
        assert fs.store.counts["delete"] == 0
        # the record stays until that upload lands: a crash before it must not bring the
        # unlinked "new content" back (test_fs_regressions.py has the crash)
        assert len(os.listdir(tmp_path / "cache" / "unlinked")) == 1
        await fs.flush(hw)
        await fs.release(hw)
        await fs.commit.upload_node(newer)
        info = await fs.store.inner.head("pre/f")
        assert info is not None and info.etag == newer.version.etag and info.size == 6
        assert os.listdir(tmp_path / "cache" / "unlinked") == []  # superseded by the upload

    trio.run(main)


def test_a_crash_before_the_last_close_still_deletes_the_unlinked_object(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"data")
        await fs.open(node, os.O_RDONLY)
        await fs.unlink(root, "f")
        assert await fs.store.inner.head("pre/f") is not None
        # crash: no release, no close; the next mount finishes the delete before serving
        fs2 = _fs(tmp_path, cmk_path)
        assert await fs2.finish_unlinks() == 0
        assert await fs2.store.inner.head("pre/f") is None
        assert os.listdir(tmp_path / "cache" / "unlinked") == []

    trio.run(main)


@pytest.mark.expect_log(r"(was replaced while open|is open and was renamed over)")
def test_rename_over_an_open_file_keeps_it_readable_within_the_cache_limits(tmp_path, cmk_path, caplog):
    async def main():
        fs = _fs(tmp_path, cmk_path, max_size=4 << 20)
        root = fs.get(1)
        small = os.urandom(100_000)
        big = os.urandom(3 << 20)  # more than half the cache: not pinned
        for name, data in (("small", small), ("big", big)):
            node = await _write_file(fs, root, name, data)
            fs.cache.drop(node.version.key, node.version.etag)
        await _write_file(fs, root, "src1", b"one")
        await _write_file(fs, root, "src2", b"two")
        hs = await fs.open(fs.by_path["small"], os.O_RDONLY)
        hb = await fs.open(fs.by_path["big"], os.O_RDONLY)
        await fs.rename(root, "src1", root, "small", 0)
        await fs.rename(root, "src2", root, "big", 0)
        assert fs.cache.pinned_bytes == len(small)
        assert await fs.read(hs, 0, len(small)) == small
        with pytest.raises(FsError) as e:
            await fs.read(hb, 0, 10)
        assert e.value.errno == errno.ESTALE
        await fs.release(hs)
        await fs.release(hb)
        assert fs.cache.pinned_bytes == 0

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    warned = [r.getMessage() for r in caplog.records if "renamed over" in r.getMessage()]
    assert len(warned) == 1 and "'pre/big'" in warned[0]


# -- A3: a listing lists every name or fails ----------------------------------------------------

async def _three_files_one_failing_head(tmp_path, cmk_path, error="permanent", failing="pre/d/victim*", **resolver):
    """Files d/a.txt, d/victim.txt, d/z.txt written by one mount; a second, fresh mount (nothing
    known: every entry needs a HEAD) whose HEADs of d/victim.txt (or of the keys ``failing``
    matches) fail with ``error`` (a FaultStore error kind), and its node of d. ``resolver``:
    Resolver attributes to set on the second mount."""
    fs = _fs(tmp_path, cmk_path)
    d = await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
    for n in ("a.txt", "victim.txt", "z.txt"):
        await _write_file(fs, d, n, n.encode())
    fs2 = _fs(tmp_path, cmk_path)
    for k, v in resolver.items():
        setattr(fs2.resolver, k, v)
    d2 = await fs2.lookup(fs2.get(1), "d")
    fs2.store.fail("head", key=failing, error=error, count=None)
    return fs2, d2


@pytest.mark.expect_log(r"listing '.*': HEAD 'pre/d/victim.txt' refused: .*; 1 name\(s\) listed without their "
                        r"attributes", r"lookup of 'pre/d/victim.txt' failed")
def test_a_name_whose_head_is_refused_is_listed_and_its_stat_fails(tmp_path, cmk_path, caplog):
    """A HEAD refused for good for one entry (AccessDenied) never drops its name, nor the
    directory: that name is served from the listing (listed-only: default mode, listed size),
    the others have their stored attributes; a stat of the refused one gives EIO, the others
    read; once the store answers it stats and reads."""
    async def main():
        fs2, d2 = await _three_files_one_failing_head(tmp_path, cmk_path)
        h = fs2.opendir(d2)
        listed = {name: node for _, name, node in await fs2.readdir_entries(h, 0)}
        fs2.releasedir(h.fh)
        assert sorted(listed) == ["a.txt", "victim.txt", "z.txt"]
        assert [listed[n].size for n in sorted(listed)] == [5, 10, 5]
        assert [listed[n].listed_only for n in sorted(listed)] == [False, True, False]
        assert fs2.store.calls.count(("head", ("pre/d/victim.txt",))) == 1  # its answers were not lost
        for refused in ("pre/d/a.txt", "pre/d/z.txt", "pre/d/[az].txt"):  # ls anew, other keys refused
            fs2.store.fail("head", key=refused, error="permanent", count=None)
            for n in listed.values():
                n.checked_at = 0.0  # stale: HEADed again
            h = fs2.opendir(d2)
            assert len(await fs2.readdir_entries(h, 0)) == 3
            fs2.releasedir(h.fh)
        # one ERROR line for the directory, whichever keys were refused
        assert sum("listing" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records) == 1
        fs2.store.clear()
        fs2.store.fail("head", key="pre/d/victim*", error="permanent", count=None)
        with pytest.raises(FsError) as e:
            await fs2.getattr(listed["victim.txt"])
        assert e.value.errno == errno.EIO
        for name in ("a.txt", "z.txt"):
            node = await fs2.lookup(d2, name)
            assert not node.listed_only and node.mode & 0o777 == 0o644
            h2 = await fs2.open(node, os.O_RDONLY)
            assert await fs2.read(h2, 0, 100) == name.encode()
            await fs2.release(h2)
        fs2.store.clear()
        node = await fs2.lookup(d2, "victim.txt")
        assert not node.listed_only
        h2 = await fs2.open(node, os.O_RDONLY)
        assert await fs2.read(h2, 0, 100) == b"victim.txt"
        await fs2.release(h2)

    with caplog.at_level(logging.ERROR):
        trio.run(main)
    assert any("pre/d/victim.txt" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error, plaintext_objects, failing", [("temporary", "show", "pre/d/*.txt"),
                                                                ("busy", "show", "pre/d/*.txt"),
                                                                ("permanent", "hide", "pre/d/victim*")])
@pytest.mark.expect_log(r"listing '.*' fails: HEAD", r"listing 'pre/d/': HEAD .* listed without their attributes")
def test_readdir_fails_with_eio_when_a_head_fails_for_a_temporary_reason_or_plaintext_is_hidden(
        tmp_path, cmk_path, caplog, error, plaintext_objects, failing):
    """HEADs that fail for a temporary reason (the store unreachable, or busy, once their
    retries ran out) for more than FAILING_HEADS_LISTED names of one step fail that readdir
    call with EIO (listing names of a struggling store would make each stat wait for retries:
    a trial's ``ls -l`` of 600 names projected to an hour; fewer are listed without their
    attributes, as a refused one); so does any failure with plaintext objects hidden (a name
    shown might be one to hide). Never a name dropped silently; it lists once the store
    answers."""
    async def main():
        fs2, d2 = await _three_files_one_failing_head(tmp_path, cmk_path, error, failing,
                                                      plaintext_objects=plaintext_objects)
        h = fs2.opendir(d2)
        with pytest.raises(FsError) as e:
            await fs2.readdir_entries(h, 0)
        assert e.value.errno == errno.EIO
        fs2.store.clear()
        names = [name for _, name, _ in await fs2.readdir_entries(h, 0, relist=True)]
        assert names == ["a.txt", "victim.txt", "z.txt"]

    with caplog.at_level(logging.ERROR):
        trio.run(main)
    assert any("pre/d/" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error", ["temporary", "busy"])
@pytest.mark.expect_log(r"listing 'pre/d/': HEAD 'pre/d/victim.txt' failed: .*; 1 name\(s\) listed without their "
                        r"attributes", r"lookup of 'pre/d/victim.txt' failed")
def test_a_name_whose_head_keeps_failing_while_the_others_answer_is_listed(tmp_path, cmk_path, error):
    """A trial: one object the store kept answering 503 made its whole directory unlistable.
    Its name is listed without its attributes (as a refused one), the others with theirs; its
    stat fails until the store answers it."""
    async def main():
        fs2, d2 = await _three_files_one_failing_head(tmp_path, cmk_path, error)
        h = fs2.opendir(d2)
        listed = {name: node for _, name, node in await fs2.readdir_entries(h, 0)}
        fs2.releasedir(h.fh)
        assert sorted(listed) == ["a.txt", "victim.txt", "z.txt"]
        assert listed["a.txt"].version is not None and listed["z.txt"].version is not None
        with pytest.raises(FsError) as e:
            await fs2.getattr(listed["victim.txt"])
        assert e.value.errno == errno.EIO
        fs2.store.clear()
        listed["victim.txt"].checked_at = 0.0
        assert (await fs2.getattr(listed["victim.txt"])).size == 10

    trio.run(main)


# -- A14: implicit directories -----------------------------------------------------------------

def test_implicit_directory_survives_its_last_child(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        await fs.store.inner.put_bytes("pre/photos/2024/a.jpg", b"x", {})
        root = fs.get(1)
        photos = await fs.lookup(root, "photos")
        year = await fs.lookup(photos, "2024")
        await fs.lookup(year, "a.jpg")
        await fs.unlink(year, "a.jpg")
        assert await fs.store.inner.head("pre/photos/2024/") is not None
        assert await fs.store.inner.head("pre/photos/2024/a.jpg") is None
        fs2 = _fs(tmp_path, cmk_path)  # later, as another mount sees it
        photos2 = await fs2.lookup(fs2.get(1), "photos")
        await fs2.lookup(photos2, "2024")
        await fs2.rmdir(photos2, "2024")
        assert await fs2.store.inner.head("pre/photos/2024/") is None
        assert await fs2.store.inner.head("pre/photos/") is not None  # its parent was implicit too

    trio.run(main)


# -- break-testing: out-of-range attributes ----------------------------------------------------

@pytest.mark.expect_log(r"(out of range|not a number as file-system clients write it \(.*\)); shown with the default")
def test_out_of_range_attributes_get_defaults_and_siblings_stay_listable(tmp_path, cmk_path, caplog):
    from ossfuse.fuse_ops import Operations

    async def main():
        fs = _fs(tmp_path, cmk_path)
        inner = fs.store.inner
        await inner.put_bytes("pre/d/a", b"a", {"mode": str(stat.S_IFREG | 0o600), "uid": "7"})
        await inner.put_bytes("pre/d/bad", b"b", {"uid": "-5", "gid": str(2**40), "mode": str(2**64),
                                                  "mtime": "9" * 40})
        await inner.put_bytes("pre/d/z", b"z", {})
        await inner.put_bytes("pre/d/late", b"l", {"mtime": "10413792000.5"})  # 2300-01-01: in range
        await inner.put_bytes("pre/d/text", b"t", {"mode": "rw-r--r--", "uid": "root", "gid": "",
                                                   "mtime": "yesterday"})
        d = await fs.lookup(fs.get(1), "d")
        ops = Operations(fs)
        for _ in range(2):  # listed twice: still one warning per attribute
            h = fs.opendir(d)
            entries = await fs.readdir_entries(h, 0, relist=True)
            attrs = {name: ops._attr(node) for _, name, node in entries}
            fs.releasedir(h.fh)
            for node in fs.inodes.nodes.values():
                node.checked_at = 0  # not fresh: read again
        assert sorted(attrs) == ["a", "bad", "late", "text", "z"]
        text = attrs["text"]
        assert (text.st_mode, text.st_uid, text.st_gid) == (stat.S_IFREG | 0o644, 1, 2)
        assert attrs["late"].st_mtime_ns == 10413792000_500_000_000  # after 2262 (2^63 ns)
        bad = attrs["bad"]
        assert (bad.st_mode, bad.st_uid, bad.st_gid) == (stat.S_IFREG | 0o644, 1, 2)
        assert attrs["a"].st_uid == 7 and attrs["a"].st_mode == stat.S_IFREG | 0o600

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    warned = [r.getMessage() for r in caplog.records if "out of range" in r.getMessage()]
    assert len(warned) == 4 and all("'pre/d/bad'" in w for w in warned)
    words = sorted(r.getMessage() for r in caplog.records if "not a number" in r.getMessage())
    integer, seconds = "an integer in decimal digits", "seconds[.fraction] in decimal digits"
    assert words == [f"'pre/d/text' has x-oss-meta-{attr} {raw!r}, not a number as file-system clients write it "
                     f"({form}); shown with the default instead"
                     for attr, raw, form in (("mode", "rw-r--r--", integer), ("mtime", "yesterday", seconds),
                                             ("uid", "root", integer))]


# -- the unwrapped-key cache is keyed by the CMK chosen ---------------------------------------

def test_unwrapped_key_cache_does_not_bypass_matdesc(tmp_path, cmk_path):
    cfg = EncryptionConfig(encrypt_with="hr", cmks=(CmkConfig("hr", "rsa", cmk_path, matdesc={"dept": "hr"}),))
    keyring = Keyring(cfg)
    mine = keyring.new_envelope("x").wrapped
    stranger = env.WrappedEnvelope(mine.wrapped_key, mine.wrapped_iv, mine.wrap_alg, {"dept": "unknown"},
                                   '{"dept":"unknown"}')
    opened = keyring.open_envelope(mine)
    assert opened.wrapped == mine
    with pytest.raises(KeyMissing):
        keyring.open_envelope(stranger)
    again = keyring.open_envelope(mine)
    assert again.data_key == opened.data_key


# -- A9: background cache tasks ----------------------------------------------------------------

@pytest.mark.expect_log(r"checksumming the cached copy of '.*' failed")
def test_checksum_task_failure_is_logged_not_raised(tmp_path, cmk_path, caplog, monkeypatch):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        e = fs.cache.entry("pre/f", "E1", 10)

        def broken(entry):
            raise RuntimeError("boom")

        monkeypatch.setattr(fs.cache, "_block_crcs", broken)
        await fs.cache._checksum(e)  # a background task: must not raise

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    assert any("'pre/f'" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


# -- A15: nodes of readdir batches the kernel did not take -------------------------------------

def test_readdir_steps_resolve_few_nodes_and_head_ahead(tmp_path, cmk_path):
    """Over an OSS-like store (no metadata in listings) a readdir step resolves SETTLE_BATCH
    entries into nodes, and its HEADs include the next entries' up to READDIR_BATCH (one
    parallel batch): reading 300 entries a reply (25) at a time HEADs each file once, in two
    batches, and never holds more than one step's untaken nodes."""
    from ossfuse.fs import readdir

    async def main():
        fs = _fs(tmp_path, cmk_path)
        for i in range(300):
            await fs.store.inner.put_bytes(f"pre/big/f{i:03d}", b"", {})
        d = await fs.lookup(fs.get(1), "big")
        base = len(fs.inodes.nodes)
        batches: list[list[str]] = []
        real = fs.store.head_many

        async def counting(keys, parallel, failed=None):
            batches.append(list(keys))
            return await real(keys, parallel, failed)
        fs.store.head_many = counting
        h = fs.opendir(d)
        names, start = [], 0
        while True:
            entries = await fs.readdir_entries(h, start)
            if not entries:
                break
            assert len(entries) <= SETTLE_BATCH
            assert len(fs.inodes.nodes) <= base + len(names) + SETTLE_BATCH
            for next_id, name, node in entries[:25]:  # one reply's worth taken by the kernel
                fs.remember(node)
                names.append(name)
                start = next_id
        assert names == [f"f{i:03d}" for i in range(300)]
        assert [len(b) for b in batches] == [readdir.READDIR_BATCH, 300 - readdir.READDIR_BATCH]
        assert sorted(k for b in batches for k in b) == [f"pre/big/f{i:03d}" for i in range(300)]
        fs.releasedir(h.fh)
        assert len(fs.inodes.nodes) == base + 300

    trio.run(main)


def test_readdir_drops_nodes_the_kernel_did_not_take(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path, oss_like=False)
        for i in range(300):
            await fs.store.inner.put_bytes(f"pre/big/f{i:03d}", b"", {})
        d = await fs.lookup(fs.get(1), "big")
        base = len(fs.inodes.nodes)
        h = fs.opendir(d)
        entries = await fs.readdir_entries(h, 0)
        assert len(entries) == SETTLE_BATCH  # one step's nodes (the next ones' HEADs are done ahead)
        for _, _, node in entries[:25]:  # one reply's worth handed to the kernel
            fs.remember(node)
        entries = await fs.readdir_entries(h, 25)
        assert entries[0][1] == "f025" and len(entries) == SETTLE_BATCH
        assert len(fs.inodes.nodes) <= base + 25 + SETTLE_BATCH
        fs.releasedir(h.fh)
        assert len(fs.inodes.nodes) == base + 25
        assert all(fs.by_path[f"big/f{i:03d}"].lookups == 1 for i in range(25))
        assert "big/f100" not in fs.by_path

    trio.run(main)
