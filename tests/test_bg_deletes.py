"""unlink's DELETE in the background (issue 14, ``rm -r`` over OSS): unlink returns once the
pending delete is recorded on the cache disk, and a worker deletes the queued objects in
batches (``ObjectStore.delete_many``: one DeleteMultipleObjects for up to 1000 keys).

In-process core tests (tests/fakes/core.py) over FaultStore(LocalStore) with
``background_deletes`` switched on (it is on by default only for a remote store) and a trio
nursery as the mount's task nursery. Checked: the names are gone at once for lookups,
listings and rmdir; a directory marker is deleted after its children; a new file at the name
of a queued delete survives it (uploaded meanwhile, or read by an open handle); a directory
rename never copies a queued object; a failing batch is logged, retried and cannot hang
unmount; a crash with queued deletes finishes them at the next mount."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import trio

from fakes.core import GID, UID, committed_file, core_filesystem, exists, listed_names, read_file
from ossfuse.fs import FsError
from ossfuse.store.base import same_etag


def _background(fs, nursery, retry_interval: float = 30.0):
    fs._nursery = nursery
    fs.namespace.background_deletes = True
    fs.namespace.retry_interval = retry_interval
    return fs


async def _files(fs, n: int, parent_name: str | None = "d"):
    """``n`` committed files f000… (content b"data<i>") in a new directory ``parent_name``."""
    root = fs.get(1)
    d = await fs.mkdir(root, parent_name, 0o755, UID, GID) if parent_name else root
    for i in range(n):
        await committed_file(fs, f"f{i:03d}", b"data%d" % i, d)
    return d


async def _failed_batch(tmp_path, cmk_path, nursery, n: int = 2, retry_interval: float = 30.0):
    """A background-deleting Filesystem with ``n`` files in directory d, of which f000 and f001
    were unlinked while every DELETE failed; returns (fs, root, d) once their batch was
    answered (failed: both wait hidden for the retries; the store still fails deletes)."""
    fs = _background(core_filesystem(tmp_path, cmk_path), nursery, retry_interval)
    d = await _files(fs, n)
    fs.store.fail(("delete_many", "delete"), error="permanent", count=None)
    await fs.unlink(d, "f000")
    await fs.unlink(d, "f001")
    await fs.namespace.settle_deletes()
    return fs, fs.get(1), d


async def _crash_with_queued_deletes(tmp_path, cmk_path, files: int, unlinked: int):
    """A mount with ``files`` files f000… in directory d dies after unlinking the first
    ``unlinked`` while their DELETE batch waits (it never runs); returns its store, faults
    cleared, for the next mount."""
    async with trio.open_nursery() as nursery:
        fs = _background(core_filesystem(tmp_path, cmk_path), nursery)
        d = await _files(fs, files)
        fs.store.delay("delete_many", 60)
        for i in range(unlinked):
            await fs.unlink(d, f"f{i:03d}")
        nursery.cancel_scope.cancel()  # the crash: no drain, the batch never ran
    fs.store.clear()
    return fs.store


async def _bucket_keys(fs, prefix: str) -> list[str]:
    return sorted(o.key for o in (await fs.store.inner.list(prefix, delimiter=None)).objects)


async def _replay_keeps_the_empty_f(tmp_path, cmk_path, store) -> None:
    """The next mount after a crash (faults cleared) replays the pending deletes; the new empty
    ``f``, which has the unlinked version's ETag over OSS, is still there, alone."""
    store.clear()
    fs2 = core_filesystem(tmp_path, cmk_path, store=store)
    await fs2.finish_unlinks()  # the replay at mount
    node = await fs2.lookup(fs2.get(1), "f")
    assert node.size == 0 and await _bucket_keys(fs2, "pre/") == ["pre/f"]


def test_rm_r_returns_before_the_deletes_and_batches_them(tmp_path, cmk_path):
    """rm -r d: each unlink returns with the object still in the bucket (its DELETE queued),
    the name gone for lookup, readdir and rmdir; rmdir waits for the children's DELETE
    (batched: far fewer requests than files, no HEAD) and deletes the marker last."""
    n = 30

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path, attr_timeout=60.0, entry_timeout=60.0), nursery)
            store = fs.store
            d = await _files(fs, n)
            store.reset_counts()
            store.delay("delete_many", 0.2)
            for i in range(n):
                await fs.unlink(d, f"f{i:03d}")
                assert not await exists(fs, f"f{i:03d}", d)
            # unlink returned before the objects left the bucket (the first batch is in flight)
            assert len(await _bucket_keys(fs, "pre/d/f")) >= n - 1
            assert await listed_names(fs, d) == []
            await fs.rmdir(fs.get(1), "d")
            assert await _bucket_keys(fs, "pre/d") == []
            assert store.counts["head"] == 0, store.counts
            assert 1 <= store.counts["delete_many"] <= 3, store.counts
            assert store.counts["delete"] == 1, store.counts  # the marker
            ops = [op for op, _ in store.calls if op in ("delete", "delete_many")]
            assert ops[-1] == "delete" and store.calls[-1][1] == ("pre/d/",)
            assert os.listdir(os.path.join(tmp_path, "cache", "unlinked")) == []  # records gone
            assert not fs.deferred_deletes.pending
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_new_file_at_a_queued_name_is_not_deleted(tmp_path, cmk_path):
    """unlink f, then create f again and upload it while f's DELETE still waits in the queue
    (behind a slow batch): the worker finds the new version there and leaves it. Without
    the check the batch (which names no version) would delete the new file."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path), nursery)
            root = fs.get(1)
            await committed_file(fs, "a", b"a")
            await committed_file(fs, "f", b"old")
            fs.store.delay("delete_many", 0.5, key="pre/a")
            await fs.unlink(root, "a")  # its batch is in flight for 0.5 s
            await trio.sleep(0.01)
            await fs.unlink(root, "f")  # queued behind it
            assert "pre/f" in await _bucket_keys(fs, "pre/")
            await committed_file(fs, "f", b"new")  # created, uploaded; drain waits for the deletes
            assert await _bucket_keys(fs, "pre/") == ["pre/f"]
            node = await fs.lookup(root, "f")
            h = await fs.open(node, os.O_RDONLY)
            assert await fs.read(h, 0, 100) == b"new"
            await fs.release(h)
            assert not fs.deferred_deletes.pending and not fs.deferred_deletes.queued
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_queued_delete_spares_a_newer_version_an_open_handle_reads(tmp_path, cmk_path):
    """unlink f (queued behind a slow batch), create f anew, upload, open it, unlink it while
    open: the queued DELETE of the old version must not delete the new one under its reader
    (HEAD-compare for that key); the last close deletes it."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path), nursery)
            root = fs.get(1)
            await committed_file(fs, "a", b"a")
            await committed_file(fs, "f", b"old")
            fs.store.delay("delete_many", 0.5, key="pre/a")
            await fs.unlink(root, "a")
            await trio.sleep(0.01)
            await fs.unlink(root, "f")
            node, h = await fs.create(root, "f", 0o600, os.O_RDWR, UID, GID)
            await fs.write(h, 0, b"new")
            await fs.flush(h)
            await fs.release(h)
            await fs.scheduler.drain()  # uploaded, while f's old DELETE still waits
            h = await fs.open(await fs.lookup(root, "f"), os.O_RDONLY)
            await fs.unlink(root, "f")  # open: deleted at the last close
            await fs.namespace.settle_deletes()
            assert await _bucket_keys(fs, "pre/") == ["pre/f"]
            assert await fs.read(h, 0, 100) == b"new"
            await fs.release(h)
            assert await _bucket_keys(fs, "pre/") == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_directory_rename_waits_for_queued_deletes_below_it(tmp_path, cmk_path):
    """A directory rename right after unlinks inside it copies only what is still there: the
    queued objects are deleted first, never copied to the new name."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path), nursery)
            root = fs.get(1)
            d = await _files(fs, 3)
            fs.store.delay("delete_many", 0.3)
            await fs.unlink(d, "f000")
            await fs.unlink(d, "f001")
            await fs.rename(root, "d", root, "e", 0)
            assert await _bucket_keys(fs, "pre/") == ["pre/e/", "pre/e/f002"]
            assert await listed_names(fs, await fs.lookup(root, "e")) == ["f002"]
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting \d unlinked objects .* failed; they stay hidden and are tried again",
                        r"deleting unlinked 'pre/d/f00[01]' .* failed; it stays hidden and is tried again",
                        r"fsync of 'pre/d/': 2 deletes below it have not reached the bucket yet")
def test_failed_batch_is_retried_and_hides_the_names(tmp_path, cmk_path):
    """A failing DELETE batch: unlink still succeeded, the names stay hidden, fsync of the
    directory says EIO while they are not deleted, and the retries delete them."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs, _, d = await _failed_batch(tmp_path, cmk_path, nursery, retry_interval=0.2)
            assert await _bucket_keys(fs, "pre/d/f") == ["pre/d/f000", "pre/d/f001"]
            assert await listed_names(fs, d) == []
            with pytest.raises(FsError) as e:
                await fs.fsyncdir(d)
            assert e.value.errno == errno.EIO
            fs.store.clear()  # the store is back: the retries delete them
            with trio.fail_after(5):
                while fs.deferred_deletes.pending:
                    await trio.sleep(0.05)
            assert await _bucket_keys(fs, "pre/d/f") == []
            await fs.fsyncdir(d)  # nothing left: no error
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting \d unlinked objects .* failed; they stay hidden and are tried again",
                        r"deleting unlinked 'pre/d/f00[01]' .* failed; it stays hidden and is tried again",
                        r"cannot rename 'pre/d/': 2 objects deleted below it are not deleted from the bucket yet")
def test_directory_rename_after_a_failed_batch_never_brings_the_files_back(tmp_path, cmk_path):
    """A batch failed, so the unlinked objects wait hidden for their retry; a rename of their
    directory then must not copy them to new names (they would come back for good: the
    pending deletes name the old keys). It deletes them first, or gives EIO while it cannot
    (the new-user break test of the sixth session found the copies)."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs, root, d = await _failed_batch(tmp_path, cmk_path, nursery, 3)
            with pytest.raises(FsError) as e:  # still failing: EIO, nothing copied
                await fs.rename(root, "d", root, "e", 0)
            assert e.value.errno == errno.EIO
            assert await _bucket_keys(fs, "pre/e") == []
            fs.store.clear()
            await fs.rename(root, "d", root, "e", 0)  # deletes them first, then moves f002
            assert await _bucket_keys(fs, "pre/") == ["pre/e/", "pre/e/f002"]
            assert await listed_names(fs, await fs.lookup(root, "e")) == ["f002"]
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting \d unlinked objects .* failed; they stay hidden and are tried again")
def test_rmdir_after_a_failed_batch_deletes_the_children_first_and_succeeds(tmp_path, cmk_path):
    """A batch failed, the store answers again before its retry (30 s away): rmdir tries the
    failed deletes below the directory first and succeeds at once, the children's objects
    leaving the bucket before the marker (the break test got EIO until the retry)."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs, root, d = await _failed_batch(tmp_path, cmk_path, nursery)
            fs.store.clear()
            fs.store.reset_counts()
            await fs.rmdir(root, "d")
            assert await _bucket_keys(fs, "pre/") == []
            assert not await exists(fs, "d", root)
            deletes = [keys for op, keys in fs.store.calls if op == "delete"]
            assert deletes == [("pre/d/f000",), ("pre/d/f001",), ("pre/d/",)]  # the marker last
            assert fs.deferred_deletes.pending == {} and not fs.deferred_deletes.ready
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting \d unlinked objects .* failed; they stay hidden and are tried again",
                        r"ERROR ossfuse\.fs\.namespace: cannot remove 'pre/d/': 2 objects deleted below it are not "
                        r"deleted from the bucket yet \('pre/d/f000': injected fault: delete 'pre/d/f000': permanent "
                        r"failure\); they are tried again")
def test_rmdir_while_a_failed_delete_below_still_fails_is_eio_and_keeps_the_directory(tmp_path, cmk_path, caplog):
    """The failed deletes below a directory still fail when rmdir tries them again: EIO with
    one ERROR line naming the object and the reason; the marker stays (the directory is still
    there, empty), and once the store deletes them rmdir succeeds."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs, root, d = await _failed_batch(tmp_path, cmk_path, nursery)
            fs.store.clear()
            fs.store.fail(("delete_many", "delete"), key="pre/d/f*", error="permanent", count=None)
            caplog.clear()
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "d")
            assert e.value.errno == errno.EIO
            assert [r.levelname for r in caplog.records if r.levelno >= 30] == ["ERROR"]
            assert await _bucket_keys(fs, "pre/") == ["pre/d/", "pre/d/f000", "pre/d/f001"]
            assert (await fs.lookup(root, "d")).is_dir and await listed_names(fs, d) == []
            fs.store.clear()
            await fs.rmdir(root, "d")
            assert await _bucket_keys(fs, "pre/") == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_crash_with_queued_deletes_finishes_them_at_the_next_mount(tmp_path, cmk_path):
    """The daemon dies while deletes are queued (their batch never answered): the next mount
    hides those names at once and deletes them before it serves (finish_unlinks)."""

    async def main():
        store = await _crash_with_queued_deletes(tmp_path, cmk_path, 3, 2)
        assert sorted(o.key for o in (await store.inner.list("pre/d/", delimiter=None)).objects) == ["pre/d/", "pre/d/f000", "pre/d/f001", "pre/d/f002"]
        fs2 = core_filesystem(tmp_path, cmk_path, store=store)
        d2 = await fs2.lookup(fs2.get(1), "d")
        assert await listed_names(fs2, d2) == ["f002"]
        assert await fs2.finish_unlinks() == 0
        assert await _bucket_keys(fs2, "pre/d/") == ["pre/d/", "pre/d/f002"]
        assert await listed_names(fs2, d2) == ["f002"]

    trio.run(main)


@pytest.mark.expect_log(r"store unreachable, working offline from the cache",
                        r"store request for 'pre/d/f001' failed: store offline")
def test_deletes_queued_before_an_outage_happen_once_the_store_is_back(tmp_path, cmk_path):
    """The store goes offline while unlinks are queued: their batch fails fast (one INFO line,
    the outage has its WARNING), the names stay gone, an unlink offline gives EIO at once,
    and the queued objects are deleted once the store answers again."""
    from fakes.core import core_store
    from ossfuse.store.health import StoreHealth

    async def main():
        store = core_store(tmp_path)
        store.local_disk = False  # as on OSS: background deletes are on by default
        fs = core_filesystem(tmp_path, cmk_path, store, retry_interval=0.2)
        assert fs.namespace.background_deletes
        health = StoreHealth(timeout=2.0, probe_interval=0.1)
        fs.track_store_health(health)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(health.watch, lambda: fs.store.list("pre/", max_keys=1))
            d = await _files(fs, 2)
            assert await listed_names(fs, d) == ["f000", "f001"]
            down = store.fail("*", count=None)
            await fs.unlink(d, "f000")  # online: queued; its batch fails, the mount goes offline
            await fs.namespace.settle_deletes()
            assert health.offline
            assert await store.inner.head("pre/d/f000") is not None
            assert await listed_names(fs, d) == ["f001"]
            with pytest.raises(FsError) as e:  # offline: unlink needs the store now
                await fs.unlink(d, "f001")
            assert e.value.errno == errno.EIO
            down.active = False
            with trio.fail_after(5):
                while await store.inner.head("pre/d/f000") is not None:
                    await trio.sleep(0.05)
            assert await _bucket_keys(fs, "pre/d/") == ["pre/d/", "pre/d/f001"]
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.timeout(120)
def test_fsync_of_a_directory_and_rm_r_leave_the_deletes_done(mount):
    """Through the kernel, on both stores: after unlinks, fsync(2) of the directory returns
    once their objects are gone from the bucket (FUSE fsyncdir); rm -r returns with nothing
    left under the tree (rmdir waits for its children's DELETEs)."""
    d = mount.path("d")
    os.mkdir(d)
    for i in range(12):
        with open(os.path.join(d, f"f{i:02d}"), "wb") as f:
            f.write(b"x%d" % i)
            f.flush()
            os.fsync(f.fileno())  # in the bucket
    assert len([k for k in mount.keys() if k.startswith("d/f")]) == 12
    for i in range(6):
        os.unlink(os.path.join(d, f"f{i:02d}"))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert sorted(k for k in mount.keys() if k.startswith("d/")) == ["d/"] + [f"d/f{i:02d}" for i in range(6, 12)]
    assert sorted(os.listdir(d)) == [f"f{i:02d}" for i in range(6, 12)]
    shutil.rmtree(d)
    assert [k for k in mount.keys() if k.startswith("d")] == []
    assert not os.path.exists(d)


@pytest.mark.timeout(120)
@pytest.mark.expect_log(r"ossfuse\.store\.oss: OSS (DeleteMultiple|DELETE 'd/f\d').*HTTP 403 AccessDenied",
                        r"deleting (\d unlinked objects|unlinked 'd/f\d') .* failed; (they stay|it stays) hidden",
                        r"4 unlinked object\(s\) could not be deleted from the bucket \('d/f0', 'd/f1', 'd/f2' and "
                        r"1 more\); other clients may still see them until the next mount deletes them")
def test_umount_exits_75_naming_the_objects_it_could_not_delete(tmp_path, cmk_path, oss_server):
    """Deletes of unlinked files fail until the unmount (the bucket's policy refuses DELETE):
    ``ossfuse umount`` says how many objects stay and names the first, exits 75 like for
    failed uploads (not 0: other clients still see the objects); the daemon logs one ERROR line
    for it and the registry says 75; the next mount deletes them."""
    import json
    import subprocess

    from conftest import OSSFUSE, Mount
    from ossfuse.registry import registry_path

    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config(store_options="retries = 0")
    m.start()
    try:
        os.mkdir(m.path("d"))
        for i in range(5):
            with open(m.path("d", f"f{i}"), "wb") as f:
                f.write(b"x%d" % i)
                os.fsync(f.fileno())
        oss_server.faults.add(status=403, count=None, methods=("POST",), query="delete")
        oss_server.faults.add(status=403, count=None, methods=("DELETE",))
        for i in range(4):
            os.unlink(m.path("d", f"f{i}"))
        assert sorted(os.listdir(m.path("d"))) == ["f4"]
        r = subprocess.run(OSSFUSE + ["umount", m.mnt], capture_output=True, text=True, timeout=120)
        assert r.returncode == 75, r.stderr
        assert ("4 unlinked object(s) could not be deleted from the bucket ('d/f0', 'd/f1', 'd/f2' and 1 more); "
                "other clients may still see them until the next mount deletes them") in r.stderr, r.stderr
        assert "upload of" not in r.stderr
        m.pid = None
        assert {r.key for r in oss_server.requests_for(method="DELETE")} == {"d/f0", "d/f1", "d/f2", "d/f3"}
        with open(registry_path(m.mnt)) as f:
            reg = json.load(f)
        assert (reg["status"], reg["undeleted"], reg["undeleted_keys"]) == (75, 4, ["d/f0", "d/f1", "d/f2", "d/f3"])
        assert len([line for line in m.log().splitlines() if "could not be deleted from the bucket" in line]) == 1
        assert sorted(k for k in m.keys() if k.startswith("d/")) == ["d/", "d/f0", "d/f1", "d/f2", "d/f3", "d/f4"]
        oss_server.faults.clear()
        m.start()  # deletes them before it serves
        assert sorted(k for k in m.keys() if k.startswith("d/")) == ["d/", "d/f4"]
        assert sorted(os.listdir(m.path("d"))) == ["f4"]
        assert m.stop() == 0
    finally:
        m.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.expect_log(r"ossfuse\.store\.oss: OSS PUT 'd/[ab]'.*HTTP 403 AccessDenied",
                        r"upload of 'd/[ab]' failed",
                        r"2 file\(s\) could not be uploaded; they stay journaled",
                        r"found 2 journaled file\(s\) from an earlier run; queued for upload")
def test_umount_exits_75_naming_the_files_whose_upload_failed(tmp_path, cmk_path, oss_server):
    """A trial: exit 75 said only "some uploads failed ... (see the log)". It says how many
    files, names the first and gives the last failure; the next mount uploads them."""
    import subprocess

    from conftest import OSSFUSE, Mount

    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config(store_options="retries = 0")
    m.start()
    try:
        os.mkdir(m.path("d"))
        oss_server.faults.add(status=403, count=None, methods=("PUT",), key_prefix="d/")
        for name in ("b", "a"):
            with open(m.path("d", name), "wb") as f:
                f.write(name.encode() * 10)
        r = subprocess.run(OSSFUSE + ["umount", m.mnt], capture_output=True, text=True, timeout=120)
        m.pid = None
        assert r.returncode == 75, r.stderr
        assert r.stderr.startswith(
            f"ossfuse: unmounted; the upload of 2 file(s) failed (e.g. {m.mnt}/d/a: OSS PUT 'd/a'"), r.stderr
        assert "AccessDenied" in r.stderr and r.stderr.endswith(
            f"they stay journaled and upload on the next mount: {m.mnt}/d/a, {m.mnt}/d/b (see the log: "
            f"{m.cache}/ossfuse.log)\n"), r.stderr
        assert r.stderr.count("\n") == 1
        oss_server.faults.clear()
        m.start()
        assert m.stop() == 0
        assert sorted(k for k in m.keys() if k.startswith("d/")) == ["d/", "d/a", "d/b"]
    finally:
        m.cleanup()


def test_pending_deletes_of_a_crash_are_replayed_many_at_once(tmp_path, cmk_path):
    """A crash in the middle of rm -r leaves many pending deletes; the next mount replays them
    (HEAD against the recorded ETag, then DELETE) several at a time, not one after the other
    (it serves only once they are done), and deletes every one of them."""
    n = 40

    async def main():
        store = await _crash_with_queued_deletes(tmp_path, cmk_path, n + 1, n)
        in_flight, peak = 0, 0

        async def enter(inner, op, keys):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await trio.sleep(0.02)  # the HEAD's round trip

        async def leave(inner, op, keys):
            nonlocal in_flight
            in_flight -= 1

        store.hook("head", enter, key="pre/d/f*")
        store.hook("head", leave, key="pre/d/f*", when="after")
        fs2 = core_filesystem(tmp_path, cmk_path, store=store)
        assert await fs2.finish_unlinks() == 0
        assert await _bucket_keys(fs2, "pre/d/") == ["pre/d/", f"pre/d/f{n:03d}"]
        assert peak >= 8, peak
        assert store.counts["delete"] == n

    trio.run(main)


@pytest.mark.expect_log(r"deleting unlinked 'pre/d/f0\d\d' .* failed; it stays hidden and is tried again")
def test_replay_stops_at_a_failing_store_and_retries_once_the_mount_runs(tmp_path, cmk_path):
    """The store refuses DELETEs while the next mount replays a crash's pending deletes: the
    replay stops starting new ones at the first failure (each costs a whole retry budget: a
    503 storm kept a mount from starting), the names stay hidden, and once the mount runs
    (its nursery set) they are retried every retry_interval until they are gone (they were
    not retried at all before the next unmount)."""
    n = 40

    async def main():
        store = await _crash_with_queued_deletes(tmp_path, cmk_path, n + 1, n)
        store.fail(("delete", "delete_many"), error="permanent", count=None)
        store.reset_counts()
        fs2 = core_filesystem(tmp_path, cmk_path, store=store)
        assert await fs2.finish_unlinks() == n
        assert store.counts["delete"] <= 16, store.counts  # no new one started after the first failure
        d2 = await fs2.lookup(fs2.get(1), "d")
        assert await listed_names(fs2, d2) == [f"f{n:03d}"]  # still hidden
        store.clear()
        async with trio.open_nursery() as nursery:
            _background(fs2, nursery, retry_interval=0.2)
            with trio.fail_after(20):
                while await _bucket_keys(fs2, "pre/d/") != ["pre/d/", f"pre/d/f{n:03d}"]:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting \d unlinked objects .* failed; they stay hidden and are tried again",
                        r"cannot remove 'pre/d/': 5 objects deleted below it")
def test_rmdir_tries_failed_deletes_until_the_first_that_still_fails(tmp_path, cmk_path):
    """rmdir over failed deletes that still fail gives EIO after the first of them (one retry
    budget), not after trying each (a 503 storm made rm -r hang for minutes)."""

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path), nursery)
            root = fs.get(1)
            d = await _files(fs, 5)
            fs.store.fail(("delete_many", "delete"), error="permanent", count=None)
            for i in range(5):
                await fs.unlink(d, f"f{i:03d}")
            await fs.namespace.settle_deletes()
            fs.store.reset_counts()
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "d")
            assert e.value.errno == errno.EIO
            assert fs.store.counts["delete"] == 1, fs.store.counts
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("how", ["create", "rename"])
def test_a_new_file_with_the_unlinked_versions_etag_is_not_deleted(tmp_path, cmk_path, oss_server, how):
    """Over OSS an ETag is the body's MD5: every empty object has the same one. ``rm f; touch f``
    (or a rename of another empty file onto f) while f's DELETE waits in the queue: the new f,
    uploaded with the unlinked version's very ETag, must stay; the worker took it for the
    unlinked version and deleted it (found by the eighth session's trial)."""
    from conftest import oss_client_store

    from fakes.fault_store import FaultStore

    async def main():
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path, store=FaultStore(oss_client_store(oss_server))),
                             nursery)
            root = fs.get(1)
            await committed_file(fs, "a", b"a")
            await committed_file(fs, "f", b"")
            if how == "rename":
                await committed_file(fs, "g", b"")
            old = (await fs.store.inner.head("pre/f")).etag
            fs.store.delay("delete_many", 0.5, key="pre/a")
            await fs.unlink(root, "a")  # its batch is in flight for 0.5 s
            await trio.sleep(0.01)
            await fs.unlink(root, "f")  # queued behind it
            if how == "create":
                await committed_file(fs, "f", b"")
            else:
                await fs.rename(root, "g", root, "f", 0)
            await fs.drain()
            info = await fs.store.inner.head("pre/f")
            assert info is not None and same_etag(info.etag, old)  # the collision this is about
            assert await _bucket_keys(fs, "pre/") == ["pre/f"]
            node = await fs.lookup(root, "f")
            assert node.size == 0
            assert not fs.deferred_deletes.pending and not fs.deferred_deletes.queued
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.expect_log(r"deleting 1 unlinked objects \('pre/f'…\) failed")
def test_an_upload_ends_the_pending_delete_of_the_version_it_overwrote(tmp_path, cmk_path, oss_server):
    """``rm f; touch f`` over OSS while DELETE is refused: the new empty f is uploaded (PUT
    works) with the unlinked version's very ETag. The upload overwrote that version, so its
    pending delete goes with it: a crash, then the replay at the next mount (which compares
    ETags) must not delete the new f."""
    from conftest import oss_client_store

    from fakes.fault_store import FaultStore

    async def main():
        store = FaultStore(oss_client_store(oss_server))
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path, store=store), nursery)
            root = fs.get(1)
            await committed_file(fs, "f", b"")
            store.fail(("delete", "delete_many"), error="permanent", count=None)
            await fs.unlink(root, "f")
            await fs.namespace.settle_deletes()
            assert fs.deferred_deletes.pending  # refused: still pending, hidden
            node, h = await fs.create(root, "f", 0o600, os.O_RDWR, UID, GID)
            await fs.fsync(h)  # uploaded (no drain: it would retry the delete, see above)
            await fs.release(h)
            assert not fs.deferred_deletes.pending and not fs.deferred_deletes.recorded()
            nursery.cancel_scope.cancel()  # the crash
        await _replay_keeps_the_empty_f(tmp_path, cmk_path, store)

    trio.run(main)


def test_an_empty_file_another_mount_made_where_an_unlinked_open_one_waits_is_not_deleted_and_looks_up(
        tmp_path, cmk_path, oss_server):
    """A trial: mount B kept an unlinked empty file open; mount C made an empty file at that
    name; B's listing did not show it, and B's last close deleted it (every empty object has
    the ETag of nothing: the pending delete's HEAD-compare took C's for B's). The wrapped data
    key tells them apart: C's file looks up in B and stays, and B's listing shows it once B's
    last close ended the pending delete (an OSS listing has no metadata to tell them apart)."""
    from conftest import oss_client_store

    from fakes.fault_store import FaultStore

    async def main():
        store = FaultStore(oss_client_store(oss_server))
        b = core_filesystem(tmp_path / "b", cmk_path, store=store, attr_timeout=0.0, entry_timeout=0.0)
        c = core_filesystem(tmp_path / "c", cmk_path, store=store, keyring=b.keyring,
                            attr_timeout=0.0, entry_timeout=0.0)
        _, h = await b.create(b.get(1), "lock", 0o600, os.O_RDWR, UID, GID)  # stays open, empty
        assert await b.drain() == 0
        mine = await store.inner.head("pre/lock")
        await b.unlink(b.get(1), "lock")
        assert not await exists(b, "lock")
        await committed_file(c, "lock", b"")  # C's: the same ETag, another envelope
        theirs = await store.inner.head("pre/lock")
        assert theirs.etag == mine.etag and theirs.metadata != mine.metadata
        assert await read_file(b, "lock") == b""  # B sees C's file while its own waits ...
        await b.release(h)  # ... and its last close leaves C's alone
        assert (await store.inner.head("pre/lock")).metadata == theirs.metadata
        assert await exists(b, "lock") and await exists(c, "lock")
        assert await listed_names(b) == ["lock"]
        assert os.listdir(tmp_path / "b" / "cache" / "unlinked") == []
        b.close()
        c.close()
        await store.aclose()

    trio.run(main)


def test_a_rename_ends_the_pending_delete_of_the_unlinked_open_version_it_overwrote(tmp_path, cmk_path, oss_server):
    """An empty f held open and unlinked, then ``mv g f`` (g empty too: the same ETag over
    OSS), then a crash before f's last close: the copy overwrote the unlinked version, so its
    pending delete goes with it, and the replay at the next mount (which compares ETags) must
    not delete the new f (trial of the ninth session: f was gone after the remount)."""
    from conftest import oss_client_store

    from fakes.fault_store import FaultStore

    async def main():
        store = FaultStore(oss_client_store(oss_server))
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path, store=store), nursery)
            root = fs.get(1)
            await committed_file(fs, "f", b"")
            await committed_file(fs, "g", b"")
            h = await fs.open(await fs.lookup(root, "f"), os.O_RDONLY)
            await fs.unlink(root, "f")
            assert fs.deferred_deletes.recorded()  # f's delete waits for the last close
            await fs.rename(root, "g", root, "f", 0)
            assert await _bucket_keys(fs, "pre/") == ["pre/f"]
            assert not fs.deferred_deletes.recorded()
            assert await fs.read(h, 0, 10) == b""
            nursery.cancel_scope.cancel()  # the crash, f still open
        await _replay_keeps_the_empty_f(tmp_path, cmk_path, store)

    trio.run(main)


def test_a_directory_rename_ends_the_pending_delete_of_the_unlinked_open_version_it_overwrote(
        tmp_path, cmk_path, oss_server):
    """Over OSS, empty d/f held open and unlinked, rmdir d, then a directory x holding an empty
    f renamed to d: the copy x/f → d/f has the unlinked version's very ETag. It must show
    (it was hidden while the reader stayed open) and survive a crash before the last close
    (the replay at the next mount deleted it: 4/4 in the ninth session's break test)."""
    from conftest import oss_client_store

    from fakes.fault_store import FaultStore

    async def main():
        store = FaultStore(oss_client_store(oss_server))
        async with trio.open_nursery() as nursery:
            fs = _background(core_filesystem(tmp_path, cmk_path, store=store), nursery)
            root = fs.get(1)
            d = await fs.mkdir(root, "d", 0o755, UID, GID)
            await committed_file(fs, "f", b"", parent=d)
            h = await fs.open(await fs.lookup(d, "f"), os.O_RDONLY)
            await fs.unlink(d, "f")
            await fs.rmdir(root, "d")
            x = await fs.mkdir(root, "x", 0o755, UID, GID)
            await committed_file(fs, "f", b"", parent=x)
            assert await fs.drain() == 0
            await fs.rename(root, "x", root, "d", 0)
            d = await fs.lookup(root, "d")
            assert await listed_names(fs, d) == ["f"] and (await fs.lookup(d, "f")).size == 0
            assert not fs.deferred_deletes.recorded()
            assert await fs.read(h, 0, 10) == b""
            nursery.cancel_scope.cancel()  # the crash, the unlinked f still open
        store.clear()
        fs2 = core_filesystem(tmp_path, cmk_path, store=store)
        await fs2.finish_unlinks()  # the replay at mount
        d2 = await fs2.lookup(fs2.get(1), "d")
        assert (await fs2.lookup(d2, "f")).size == 0
        assert await _bucket_keys(fs2, "pre/") == ["pre/d/", "pre/d/f"]

    trio.run(main)


def test_a_batch_names_the_version_of_each_key_pending_once():
    """What a delete batch tells the store to check on a retry: the ETag of each key pending
    with one version; a key pending with two is deleted unconditionally, as before."""
    from ossfuse.fs.namespace import _single_versions
    assert _single_versions([("a", "E1"), ("b", "E2"), ("a", "E3"), ("c", "E4"), ("c", "E4")]) == {"b": "E2", "c": "E4"}
