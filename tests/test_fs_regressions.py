"""Defects found by the model-based test (tests/test_fs_model.py), each minimised to a plain
test of the Filesystem API in-process over the fault-injecting store."""
from __future__ import annotations

import errno
import logging
import os
import stat

import pytest
import trio
import trio.testing

from fakes.core import GID, UID, committed_file, core_filesystem, exists, listed_names, read_file, read_node
from ossfuse.fs import FsError


@pytest.mark.expect_log(r"injected fault: copy")
def test_failed_chmod_changes_nothing(tmp_path, cmk_path):
    """chmod of a file in the bucket whose CopyObject fails answers EIO and must leave the mode
    as it was (found by the model test: create 0600, upload, copy fails, chmod 0644)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        node, h = await fs.create(fs.get(1), "a", 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"data")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0 and await store.inner.head("pre/a") is not None
        store.fail("copy", key="pre/a")
        with pytest.raises(FsError) as e:
            await fs.setattr(node, mode=0o644)
        assert e.value.errno == errno.EIO
        bucket_mode = int((await store.inner.head("pre/a")).metadata["mode"])
        assert stat.S_IMODE(bucket_mode) == 0o600  # the bucket kept the old mode ...
        assert stat.S_IMODE(node.mode) == 0o600  # ... and the mount must say so (today: 0o644)
        fs.close()
        await store.aclose()

    trio.run(main)


async def _keys(store) -> list[str]:
    """Every key below the mount's prefix in the bucket behind fault store ``store``, in order."""
    return [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects]


def test_unlinked_open_file_is_gone_from_listings(tmp_path, cmk_path):
    """unlink of an open file leaves its object for the readers until the last close, but the
    name is gone at once: lookup and readdir agree (readdir listed it from the bucket while
    lookup said ENOENT)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        _, h = await fs.create(fs.get(1), "a", 0o600, os.O_RDWR, 1, 2)  # stays open
        await fs.write(h, 0, b"data")
        assert await fs.drain() == 0 and await fs.store.inner.head("pre/a") is not None
        await fs.unlink(fs.get(1), "a")
        assert await fs.store.inner.head("pre/a") is not None  # kept for the open handle ...
        assert await fs.read(h, 0, 10) == b"data"
        assert not await exists(fs, "a")  # ... but the name is gone, for lookup and readdir
        assert await listed_names(fs) == []
        await fs.release(h)
        assert await fs.store.inner.head("pre/a") is None
        fs.close()
        await fs.store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"injected fault: delete")
def test_unlinked_open_file_whose_delete_fails_stays_gone(tmp_path, cmk_path):
    """unlink of an open file succeeds (the object waits for the last close); when the DELETE
    at the last close fails, the name must not come back: the version stays hidden (lookup,
    readdir, a remount) and the delete is retried at unmount (drain) and at the next mount,
    until the object is really gone (found by the model test: create, upload while open,
    delete fails, unlink, close: the file was back)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        _, h = await fs.create(fs.get(1), "a", 0o600, os.O_RDWR, 1, 2)  # stays open
        await fs.write(h, 0, b"data")
        assert await fs.drain() == 0
        await fs.unlink(fs.get(1), "a")
        store.fail("delete", key="pre/a", count=2)
        await fs.release(h)  # the DELETE fails (logged)
        assert await store.inner.head("pre/a") is not None  # still in the bucket ...
        assert not await exists(fs, "a")  # ... yet not back in the mount
        assert await listed_names(fs) == []
        assert await fs.drain() == 0  # unmount: the delete is tried again, and fails again
        assert await store.inner.head("pre/a") is not None
        fs.close()
        fs = core_filesystem(tmp_path, cmk_path, store=store)  # the next mount, before it serves
        assert not await exists(fs, "a") and await listed_names(fs) == []
        assert await fs.finish_unlinks() == 0
        assert await store.inner.head("pre/a") is None  # really gone now
        assert os.listdir(tmp_path / "cache" / "unlinked") == []
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"injected fault: delete")
def test_failed_deferred_delete_is_retried_in_the_background(tmp_path, cmk_path):
    """With the daemon's task nursery set, a failed delete of an unlinked open file is tried
    again every retry_interval seconds until it succeeds."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, retry_interval=0.05)
        store = fs.store
        _, h = await fs.create(fs.get(1), "a", 0o600, os.O_RDWR, 1, 2)
        assert await fs.drain() == 0
        await fs.unlink(fs.get(1), "a")
        store.fail("delete", key="pre/a", count=3)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            await fs.release(h)
            with trio.fail_after(5):
                while await store.inner.head("pre/a") is not None:
                    await trio.sleep(0.02)
        assert store.counts["delete"] == 4  # one at the close, three retries (two failed)
        assert fs.deferred_deletes.pending == {} and os.listdir(tmp_path / "cache" / "unlinked") == []
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"injected fault: delete")
def test_new_file_at_a_pending_delete_replaces_it_without_conflict(tmp_path, cmk_path):
    """A file created where an unlinked file's failed delete is pending replaces that object
    knowingly (no conflict copy), and the retried delete leaves the new object alone."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        await committed_file(fs, "a", b"old")
        fs.close()
        fs = core_filesystem(tmp_path, cmk_path, store=store)  # a mount that did not upload it
        h = await fs.open(await fs.lookup(fs.get(1), "a"), os.O_RDONLY)
        await fs.unlink(fs.get(1), "a")
        store.fail("delete", key="pre/a")
        await fs.release(h)
        assert await store.inner.head("pre/a") is not None
        await committed_file(fs, "a", b"new")
        assert await fs.finish_unlinks() == 0
        assert await listed_names(fs) == ["a"]
        assert await _keys(store) == ["pre/a"]
        node = await fs.lookup(fs.get(1), "a")
        rh = await fs.open(node, os.O_RDONLY)
        assert await fs.read(rh, 0, 10) == b"new"
        await fs.release(rh)
        assert fs.commit.conflicts.count == 0
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"rename of 'a' to 'c' failed: deleting 'pre/a' failed \(injected fault: delete.*"
                        r"the copy was deleted again, nothing changed")
def test_rename_whose_delete_fails_changes_nothing(tmp_path, cmk_path):
    """rename a → c (a open) where the copy succeeds and the delete of a fails: EIO, the copy
    is deleted again, and the state is as before: a only, by lookup and by readdir, one log
    line (found by the model test: readdir listed c while lookup of c said ENOENT)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        _, h = await fs.create(fs.get(1), "a", 0o600, os.O_RDWR, 1, 2)  # stays open
        await fs.write(h, 0, b"data")
        assert await fs.drain() == 0 and await store.inner.head("pre/a") is not None
        assert not await exists(fs, "c")  # the negative cache knows c is absent
        store.fail("delete", key="pre/a")
        with pytest.raises(FsError) as e:
            await fs.rename(fs.get(1), "a", fs.get(1), "c", 0)
        assert e.value.errno == errno.EIO
        assert not await exists(fs, "c") and await exists(fs, "a")
        assert await listed_names(fs) == ["a"]
        assert await _keys(store) == ["pre/a"]
        assert await fs.read(h, 0, 10) == b"data"
        await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("replaced", [True, False], ids=["over-c", "undo-fails"])
@pytest.mark.expect_log(r"rename of 'a' to 'c' failed half-way: deleting 'pre/a' failed \(injected fault: delete.*"
                        r"both names hold the file now")
def test_rename_whose_delete_fails_shows_both_names(tmp_path, cmk_path, replaced):
    """rename a → c where the copy succeeds and the delete of a fails, and the copy cannot be
    taken back (it replaced c, or deleting it fails too): EIO, and both names hold a's file —
    lookup, readdir and reads agree (copies first, then deletes: never neither). One log line."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        await committed_file(fs, "a", b"from a")
        if replaced:
            await committed_file(fs, "c", b"old c")
        else:
            assert not await exists(fs, "c")  # the negative cache knows c is absent
        store.fail("delete", count=1 if replaced else 2)  # the delete of a (and taking the copy back)
        with pytest.raises(FsError) as e:
            await fs.rename(fs.get(1), "a", fs.get(1), "c", 0)
        assert e.value.errno == errno.EIO
        assert await exists(fs, "c") and await exists(fs, "a")
        assert await listed_names(fs) == ["a", "c"]
        for name in ("a", "c"):
            node = await fs.lookup(fs.get(1), name)
            h = await fs.open(node, os.O_RDONLY)
            assert await fs.read(h, 0, 100) == b"from a"
            await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)


def test_new_file_renamed_over_a_renamed_over_file_is_no_conflict(tmp_path, cmk_path):
    """x renamed over a (in the bucket), then y renamed over a before x was uploaded: y's
    upload replaces a's object knowingly — no conflict copy (found by the model test: the
    second rename lost what the first knew it replaced, and y went to a.conflict-…)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        await committed_file(fs, "a", b"committed a")
        handles = []
        for name in ("x", "y"):
            _, h = await fs.create(fs.get(1), name, 0o600, os.O_RDWR, 1, 2)  # open: not uploaded
            await fs.write(h, 0, name.encode())
            await fs.rename(fs.get(1), name, fs.get(1), "a", 0)
            handles.append(h)
        for h in handles:
            await fs.release(h)
        assert await fs.drain() == 0
        assert fs.commit.conflicts.count == 0
        assert await _keys(store) == ["pre/a"]
        h = await fs.open(await fs.lookup(fs.get(1), "a"), os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"y"
        await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)


def test_file_replaced_by_a_rename_does_not_come_back_after_a_crash(tmp_path, cmk_path):
    """A new file (never closed, so never journaled) renamed over d, which is in the bucket,
    then a crash: the rename unlinked d's object, so d must not come back with its old content
    (it may be gone: its new content was never durable). Found by the model test."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        store = fs.store
        await committed_file(fs, "d", b"old d")
        _, h = await fs.create(fs.get(1), "a", 0o700, os.O_RDWR, 1, 2)
        await fs.rename(fs.get(1), "a", fs.get(1), "d", 0)
        fs = _died(fs, tmp_path, cmk_path)
        assert fs.recover() == 0
        assert not await exists(fs, "d")  # hidden from the start, deleted before serving
        assert await fs.finish_unlinks() == 0
        assert (await store.inner.list("pre/", delimiter=None)).objects == []
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("d_state", ["committed", "journaled"])
@pytest.mark.parametrize("when", ["before the record moved", "after the record moved", "in the move", "after it"])
def test_a_crash_during_or_after_an_editors_save_by_rename_leaves_the_file_at_its_name(tmp_path, cmk_path, when,
                                                                                        d_state):
    """New-user trial: a closed (journaled) temp file renamed over d, which is in the bucket,
    and a kill -9 inside the rename, after it had recorded d's pending delete (two fsyncs) and
    before the journal named d for the temp file: the next mount deleted d and uploaded the
    new content under the temp name, so d vanished (3 kills in ~100 over OSS). A journaled
    file's record, moved to the new name with d's version as its base, is what replaces d
    after a crash: no pending delete is recorded for it. And d itself changed and closed
    (journaled) before the save: the rename dropped d's record before it wrote the temp file's,
    so a crash between brought back d's committed version, older than both saves. A crash
    leaves d and the temp file as they were (the rename did not happen) or the new content at
    d and no temp file; never less."""
    class Crash(Exception):
        pass

    def crash(*args):
        raise Crash  # the daemon dies here: after what the rename did before, before the rest

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        store = fs.store
        await committed_file(fs, "d", b"old d")
        d_now = b"old d"
        if d_state == "journaled":
            h = await fs.open(await fs.lookup(fs.get(1), "d"), os.O_RDWR)
            await fs.write(h, 0, b"d v2!")
            await fs.flush(h)
            await fs.release(h)
            d_now = b"d v2!"
        _, h = await fs.create(fs.get(1), ".d.tmp", 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"new d")
        await fs.flush(h)  # close(): journaled
        await fs.release(h)
        if when == "after it":
            await fs.rename(fs.get(1), ".d.tmp", fs.get(1), "d", 0)
            assert os.listdir(tmp_path / "cache" / "unlinked") == []
        else:
            where = {"before the record moved": (fs.namespace.commit, "rejournal"),
                     "after the record moved": (fs.namespace, "_take_name"),
                     "in the move": (fs.namespace.inodes, "move")}[when]
            setattr(*where, crash)
            with pytest.raises(Crash):
                await fs.rename(fs.get(1), ".d.tmp", fs.get(1), "d", 0)
        want = {".d.tmp": b"new d", "d": d_now} if when == "before the record moved" else {"d": b"new d"}
        fs = _died(fs, tmp_path, cmk_path)
        assert fs.recover() >= 1  # (two records of d after "after the record moved": the newer wins)
        assert await fs.finish_unlinks() == 0
        assert await fs.drain() == 0
        assert await listed_names(fs) == sorted(want)
        for name, data in want.items():
            assert await read_file(fs, name) == data
        assert await _keys(store) == ["pre/" + name for name in sorted(want)]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_rename_over_a_committed_file_then_upload_keeps_the_new_file(tmp_path, cmk_path):
    """The pending delete a rename over d records is moot once the new file is uploaded at d:
    the unmount (drain) drops it and the new object stays."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        store = fs.store
        await committed_file(fs, "d", b"old d")
        _, h = await fs.create(fs.get(1), "a", 0o700, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"new d")
        await fs.rename(fs.get(1), "a", fs.get(1), "d", 0)
        await fs.release(h)
        store.reset_counts()
        assert await fs.drain() == 0
        assert store.counts["head"] == 1  # the upload's conflict check; the record needs none
        assert fs.deferred_deletes.pending == {} and os.listdir(tmp_path / "cache" / "unlinked") == []
        assert await _keys(store) == ["pre/d"]
        h = await fs.open(await fs.lookup(fs.get(1), "d"), os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"new d"
        await fs.release(h)
        assert fs.commit.conflicts.count == 0
        fs.close()
        await store.aclose()

    trio.run(main)


def _died(fs, tmp_path, cmk_path):
    """The daemon of ``fs`` dies (its descriptors close, nothing else): the next mount's
    Filesystem over the same store and cache dir (``upload_delay`` 3600 s), not recovered yet."""
    for node in list(fs.dirty):
        if node.staged is not None:
            node.staged.close()
    fs.close()
    return core_filesystem(tmp_path, cmk_path, store=fs.store, upload_delay=3600.0)


async def _crash_with_journaled_change(tmp_path, cmk_path, name: str):
    """``name`` in the bucket, then changed (truncated, journaled, not uploaded) and the daemon
    dies; returns the next mount's Filesystem, with ``name`` recovered from the journal."""
    fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
    await committed_file(fs, name, b"committed version")
    await fs.setattr(await fs.lookup(fs.get(1), name), size=4)  # journaled, not uploaded
    fs = _died(fs, tmp_path, cmk_path)
    assert fs.recover() == 1
    return fs


@pytest.mark.parametrize("op", ["rename", "unlink"])
def test_recovered_file_moved_or_unlinked_takes_its_old_object(tmp_path, cmk_path, op):
    """A file recovered from the journal (its staged version replaces the older object still at
    its name) renamed away or unlinked before its upload: the older object must go too, or it
    comes back at the old name (found by the model test: after a crash, rename e/d/c → e/d/a and
    mkdir e/d/c left the file e/d/c in the bucket, hiding the new directory)."""
    async def main():
        fs = await _crash_with_journaled_change(tmp_path, cmk_path, "c")
        store = fs.store
        if op == "rename":
            await fs.rename(fs.get(1), "c", fs.get(1), "a", 0)
            await fs.mkdir(fs.get(1), "c", 0o700, 1, 2)
        else:
            await fs.unlink(fs.get(1), "c")
        assert await fs.drain() == 0
        keys = await _keys(store)
        assert keys == (["pre/a", "pre/c/"] if op == "rename" else [])
        fs.close()
        fs = core_filesystem(tmp_path, cmk_path, store=store)
        if op == "rename":
            assert (await fs.lookup(fs.get(1), "c")).is_dir
            h = await fs.open(await fs.lookup(fs.get(1), "a"), os.O_RDONLY)
            assert await fs.read(h, 0, 100) == b"comm"
            await fs.release(h)
        else:
            assert await listed_names(fs) == []
        fs.close()
        await store.aclose()

    trio.run(main)


def test_an_unlink_that_waits_for_a_slow_upload_says_so(tmp_path, cmk_path, caplog):
    """Break trial BT16 F3: `rm` of a file whose PUT the store held 30 s waited for it (the
    rename's and unlink's rule: no race with the upload in flight), and the kernel held the
    directory meanwhile: other work there waited 28 s, with no line. A wait past 2 s is said,
    at its start and its end."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        in_flight, go_on = trio.Event(), trio.Event()

        async def hold(inner, op, keys):
            in_flight.set()
            await go_on.wait()
        fs.store.hook(("put_file", "put_bytes"), hold, key="pre/slow", count=1)
        _, h = await fs.create(root, "slow", 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"held by the store")
        caplog.set_level(logging.INFO, logger="ossfuse.fs.commit")
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.flush, h)  # uploads at close (a local bucket): held in its PUT
                await in_flight.wait()
                nursery.start_soon(fs.unlink, root, "slow")
                await trio.sleep(2.5)
                said = [r.getMessage() for r in caplog.records if "waits for its upload in flight" in r.getMessage()]
                assert said == ["a rename or unlink of 'pre/slow' waits for its upload in flight (a slow store; "
                                "the kernel holds its directory meanwhile)"]
                go_on.set()
        await fs.release(h)
        assert any("that a rename or unlink waited for ended after" in r.getMessage() for r in caplog.records)
        assert await fs.drain() == 0
        assert await _keys(fs.store) == []
        fs.close()

    trio.run(main)


def test_rename_over_a_file_whose_first_upload_is_in_flight_is_no_conflict(tmp_path, cmk_path):
    """git's config.lock renamed over config while config's first upload is still in flight:
    config.lock's upload then finds that upload's object at config. It is this mount's own
    object, not another client's edit: no conflict copy (config.lock went to config.conflict-…).
    The rename now waits for the upload in flight, and ``Conflicts`` knows the last ETag its own
    upload put at each key (test_fs_units.py tests that part alone)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        in_flight, go_on = trio.Event(), trio.Event()

        async def hold(inner, op, keys):
            in_flight.set()
            await go_on.wait()
        store.hook(("put_file", "put_bytes"), hold, key="pre/config", count=1)
        _, h = await fs.create(root, "config", 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"first config")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.flush, h)  # uploads at close (a local bucket): held in its PUT
            await in_flight.wait()
            _, hl = await fs.create(root, "config.lock", 0o600, os.O_RDWR, 1, 2)
            await fs.write(hl, 0, b"second config")
            nursery.start_soon(fs.rename, root, "config.lock", root, "config", 0)  # open: not uploaded
            await trio.sleep(0.2)  # the rename waits for config's upload in flight
            go_on.set()
        await fs.release(h)
        await fs.flush(hl)
        await fs.release(hl)
        assert await fs.drain() == 0
        assert fs.commit.conflicts.count == 0
        assert await _keys(store) == ["pre/config"]
        fh = await fs.open(await fs.lookup(root, "config"), os.O_RDONLY)
        assert await fs.read(fh, 0, 100) == b"second config"
        await fs.release(fh)
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("op", ["rename", "unlink"])
def test_upload_in_flight_does_not_overwrite_what_replaced_its_file(tmp_path, cmk_path, op):
    """config's upload is in flight (a slow PUT) when config is replaced — by the rename of an
    uploaded config.lock over it (its copy), or by unlink and a new file's upload: the late PUT
    must not overwrite the new object (it did: config read back the old content, ESTALE)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        in_flight, go_on = trio.Event(), trio.Event()

        async def hold(inner, op_, keys):
            in_flight.set()
            await go_on.wait()
        store.hook(("put_file", "put_bytes"), hold, key="pre/config", count=1)
        _, h = await fs.create(root, "config", 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, b"first config")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.flush, h)  # uploads at close (a local bucket): held in its PUT
            await in_flight.wait()

            async def new_file(name):  # closed and uploaded at close, no drain
                _, nh = await fs.create(root, name, 0o600, os.O_RDWR, 1, 2)
                await fs.write(nh, 0, b"second config")
                await fs.flush(nh)
                await fs.release(nh)
                assert await store.inner.head("pre/" + name) is not None

            async def replace():
                if op == "rename":
                    await new_file("config.lock")
                    await fs.rename(root, "config.lock", root, "config", 0)
                else:
                    await fs.unlink(root, "config")
                    await new_file("config")
            nursery.start_soon(replace)
            await trio.sleep(0.2)  # the replacement waits for the upload in flight
            go_on.set()
        await fs.release(h)
        assert await fs.drain() == 0
        assert await _keys(store) == ["pre/config"]
        fh = await fs.open(await fs.lookup(root, "config"), os.O_RDONLY)
        assert await fs.read(fh, 0, 100) == b"second config"
        await fs.release(fh)
        assert fs.commit.conflicts.count == 0
        fs.close()
        await store.aclose()

    trio.run(main)


def test_namespace_probes_leave_no_nodes_behind(tmp_path, cmk_path):
    """Nodes a namespace operation made only to probe a name (unlink, rmdir, rename over, a
    create that finds the name taken) are dropped once the operation is done, unless the kernel
    or a handle holds them (review A15: they stayed in the inode table for the mount's life)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        for name in ("a", "b", "c", "d"):
            await committed_file(fs, name, name.encode())
        await fs.mkdir(fs.get(1), "dir", 0o755, 1, 2)
        fs.close()
        fs = core_filesystem(tmp_path, cmk_path, store=store)  # a new mount: only the root known
        root = fs.get(1)
        assert list(fs.inodes.nodes) == [1]
        await fs.unlink(root, "a")
        await fs.rmdir(root, "dir")
        with pytest.raises(FsError) as e:
            await fs.mkdir(root, "b", 0o755, 1, 2)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(FsError) as e:
            await fs.create(root, "b", 0o600, os.O_RDWR | os.O_CREAT | os.O_EXCL, 1, 2)
        assert e.value.errno == errno.EEXIST
        old_d = await fs.lookup(root, "d")  # the kernel looks the name up before its RENAME
        await fs.rename(root, "c", root, "d", 0)  # c's node moves to d; d's old node goes
        fs.forget(old_d.ino, 1)  # once the kernel forgets it
        assert sorted(n.path for n in fs.inodes.nodes.values()) == ["", "d"]
        assert await listed_names(fs) == ["b", "d"]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_directory_made_where_an_unlinked_open_file_waits_is_seen(tmp_path, cmk_path):
    """A file unlinked while open (its object hidden until the last close), then a directory
    made at that name: lookups and listings show the directory (the hidden object hid it:
    lookup said ENOENT once the directory's attributes were to be read again)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0)  # every lookup asks the store
        store = fs.store
        root = fs.get(1)
        await committed_file(fs, "c", b"file c")
        h = await fs.open(await fs.lookup(root, "c"), os.O_RDONLY)
        await fs.unlink(root, "c")
        await fs.mkdir(root, "c", 0o700, 1, 2)
        fs.inodes.maybe_drop(fs.by_path["c"])  # (as after the kernel's forget)
        node = await fs.lookup(root, "c")
        assert node.is_dir and stat.S_IMODE(node.mode) == 0o700
        assert await listed_names(fs) == ["c"]
        await fs.release(h)
        assert await _keys(store) == ["pre/c/"]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_directory_rename_keeps_an_unlinked_open_file_gone(tmp_path, cmk_path):
    """d/x unlinked while open, then d renamed to e: x must not show up as e/x (its object was
    copied with the directory as a visible new object, and its node was put back at e/x); the
    handle still reads it, and after the last close nothing of it is left."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        await committed_file(fs, "x", b"unlinked x", parent=d)
        await committed_file(fs, "y", b"kept y", parent=d)
        h = await fs.open(await fs.lookup(d, "x"), os.O_RDONLY)
        await fs.unlink(d, "x")
        await fs.rename(root, "d", root, "e", 0)
        e = await fs.lookup(root, "e")
        assert await listed_names(fs, e) == ["y"]
        assert not await exists(fs, "x", parent=e)
        assert "e/x" not in fs.by_path
        assert await fs.read(h, 0, 100) == b"unlinked x"
        await fs.release(h)
        keys = await _keys(store)
        assert keys == ["pre/e/", "pre/e/y"]
        assert os.listdir(tmp_path / "cache" / "unlinked") == []
        fs.close()
        await store.aclose()

    trio.run(main)


def test_directory_rename_past_the_key_limit_copies_nothing(tmp_path, cmk_path, caplog):
    """A directory rename whose new keys would pass OSS's 1,023-byte limit gives ENAMETOOLONG
    before anything is copied (a new user's `mv` of a deep tree copied part of it, then EIO),
    and an empty directory it would replace stays. One line names the key (a trial: the key
    was one listings do not show, and nothing said which)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        deep = d
        for i in range(9):  # keys of about 915 bytes: fine where they are
            deep = await fs.mkdir(deep, f"{i}" * 100, 0o755, 1, 2)
        await committed_file(fs, "f", b"deep data", parent=deep)
        await fs.mkdir(root, "L" * 250, 0o755, 1, 2)  # an empty directory the rename would replace
        caplog.set_level("INFO")
        before = sorted(o.key for o in (await store.inner.list("", delimiter=None)).objects)
        with pytest.raises(FsError) as e:
            await fs.rename(root, "d", root, "L" * 250, 0)
        assert e.value.errno == errno.ENAMETOOLONG
        said = [r.getMessage() for r in caplog.records if "ENAMETOOLONG, the key" in r.getMessage()]
        assert len(said) == 1 and "'pre/" + "L" * 76 + "…'" in said[0] and "OSS takes 1023" in said[0], said
        assert sorted(o.key for o in (await store.inner.list("", delimiter=None)).objects) == before
        assert await listed_names(fs) == sorted(["d", "L" * 250])
        fs.close()
        await store.aclose()

    trio.run(main)


def test_node_forgotten_while_a_rename_awaits_the_store_is_not_brought_back(tmp_path, cmk_path):
    """The kernel forgets bar/sub's inode while the rename of its parent copies objects (a
    FORGET arrives at any await): the rename must not put that dropped node back at the new
    name, or the next lookup hands the kernel an inode the table no longer knows (opendir,
    getattr: ENOENT — the field report of bar/sub missing after `mv foo bar`)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        for i in range(3):
            await store.inner.put_bytes(f"pre/foo/f{i}", b"x", {"mode": "33188"})
        await store.inner.put_bytes("pre/foo/sub/", b"", {"mode": "16877"})
        await store.inner.put_bytes("pre/foo/sub/inner", b"y", {"mode": "33188"})
        root = fs.get(1)
        foo = await fs.lookup(root, "foo")
        sub = await fs.lookup(foo, "sub")
        assert await listed_names(fs, sub) == ["inner"]

        async def forget_sub(inner, op, keys):
            fs.forget(sub.ino, sub.lookups)  # the kernel evicts it meanwhile
        store.hook("copy", forget_sub, count=1)
        await fs.rename(root, "foo", root, "bar", 0)
        again = await fs.lookup(fs.get(1), "bar")
        found = await fs.lookup(again, "sub")
        assert fs.get(found.ino) is found  # the inode handed out is one the table knows
        assert await listed_names(fs, found) == ["inner"]
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("how", ["create", "rename"])
def test_an_unlinked_open_file_stays_readable_when_a_new_file_takes_its_name(tmp_path, cmk_path, how):
    """``exec 3<f; rm f; echo new > f; cat <&3`` (a log file replaced while read): the new f
    overwrites the unlinked version's object, so the handle must be served from the cache —
    it got ESTALE ("replaced by another client") for what it had not read (trial of the
    ninth session). Also for ``mv g f`` after the rm."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        old = os.urandom(300_000)
        await committed_file(fs, "f", old)
        if how == "rename":
            await committed_file(fs, "g", b"new")
        fs.close()
        fs = core_filesystem(tmp_path, cmk_path, store=store)  # nothing of f cached
        root = fs.get(1)
        h = await fs.open(await fs.lookup(root, "f"), os.O_RDONLY)
        await fs.unlink(root, "f")
        if how == "create":
            await committed_file(fs, "f", b"new")
        else:
            await fs.rename(root, "g", root, "f", 0)
        assert await fs.drain() == 0
        assert await fs.read(h, 0, 1 << 20) == old
        await fs.release(h)
        assert await fs.drain() == 0
        assert await listed_names(fs) == ["f"] and fs.commit.conflicts.count == 0
        assert await read_file(fs, "f") == b"new"
        assert await _keys(store) == ["pre/f"]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_a_new_file_renamed_where_an_unlinked_open_file_waits_replaces_it(tmp_path, cmk_path):
    """B (uploaded, open) renamed m1 → m2 and unlinked; A (new, never uploaded) renamed
    m0 → m2, then both closed: m2 holds A's bytes, with no conflict copy (the rename of a
    new file replaces the unlinked version knowingly, as a create at that name does). Before,
    A's create-only upload met B's object, took it for another client's and became a
    conflict copy, and B's delete at its last close then removed m2 (trial of the ninth
    session)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store, root = fs.store, fs.get(1)
        _, hb = await fs.create(root, "m1", 0o600, os.O_RDWR, UID, GID)
        await fs.write(hb, 0, b"B's content\n")
        await fs.fsync(hb)
        _, ha = await fs.create(root, "m0", 0o600, os.O_RDWR, UID, GID)
        await fs.write(ha, 0, b"A's content\n")
        await fs.rename(root, "m1", root, "m2", 0)
        await fs.unlink(root, "m2")
        await fs.rename(root, "m0", root, "m2", 0)
        await fs.release(ha)
        await fs.release(hb)
        assert await fs.drain() == 0
        assert await listed_names(fs) == ["m2"] and fs.commit.conflicts.count == 0
        assert await read_file(fs, "m2") == b"A's content\n"
        assert await _keys(store) == ["pre/m2"]
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.readdir: 'pre/n' is both an object and a prefix")
def test_an_object_that_is_also_a_prefix_shows_as_the_file_and_is_said_once(tmp_path, cmk_path, caplog):
    """Another client's file ``n`` and directory ``n/`` (two keys: a create-only PUT of one does
    not see the other): listings show the file, and the WARNING naming the key is logged once,
    not at every listing (62 lines in one log of the ninth session's trial)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        await committed_file(fs, "n", b"file")
        await fs.store.inner.put_bytes("pre/n/inner", b"x", {"mode": "33188"})
        for _ in range(3):
            assert await listed_names(fs) == ["n"]
        assert await read_file(fs, "n") == b"file"
        fs.close()
        await fs.store.aclose()

    trio.run(main)
    lines = [r for r in caplog.records if "both an object and a prefix" in r.getMessage()]
    assert len(lines) == 1


async def _unlinked_open_in_d_then_x_renamed_over_d(tmp_path, cmk_path, name: str, x_name: str,
                                                    x_data: bytes):
    """d/``name`` (300,000 random bytes) in the bucket; a new mount with nothing of it cached
    opens it, unlinks it, removes d, makes x holding the committed file ``x_name``
    (``x_data``) and renames x to d. Returns (fs, store, root, the open handle, d/``name``'s bytes)."""
    fs = core_filesystem(tmp_path, cmk_path)
    store = fs.store
    d = await fs.mkdir(fs.get(1), "d", 0o755, UID, GID)
    old = os.urandom(300_000)
    await committed_file(fs, name, old, parent=d)
    fs.close()
    fs = core_filesystem(tmp_path, cmk_path, store=store)  # nothing of d/name cached
    root = fs.get(1)
    d = await fs.lookup(root, "d")
    h = await fs.open(await fs.lookup(d, name), os.O_RDONLY)
    await fs.unlink(d, name)
    await fs.rmdir(root, "d")
    x = await fs.mkdir(root, "x", 0o755, UID, GID)
    await committed_file(fs, x_name, x_data, parent=x)
    assert await fs.drain() == 0
    await fs.rename(root, "x", root, "d", 0)
    return fs, store, root, h, old


def test_a_directory_renamed_over_an_unlinked_open_files_name_keeps_it_readable(tmp_path, cmk_path):
    """``exec 3<d/f; rm d/f; rmdir d; mkdir x; echo new > x/f; mv x d; cat <&3``: the directory
    rename's copy of x/f overwrites the unlinked d/f's object, so the handle must be served
    from the cache (it got ESTALE, 11/11 on the local bucket, in the ninth session's break
    test), and d/f shows the new file."""
    async def main():
        fs, store, root, h, old = await _unlinked_open_in_d_then_x_renamed_over_d(tmp_path, cmk_path, "f", "f", b"new")
        assert await fs.read(h, 0, 1 << 20) == old
        await fs.release(h)
        assert await fs.drain() == 0
        d = await fs.lookup(root, "d")
        assert await listed_names(fs, d) == ["f"] and await read_node(fs, await fs.lookup(d, "f")) == b"new"
        assert await _keys(store) == ["pre/d/", "pre/d/f"]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_a_directory_rename_pins_only_the_unlinked_files_its_copies_overwrite(tmp_path, cmk_path):
    """``mv x d`` where d's big file was unlinked while open but x holds no file of that name:
    nothing overwrites it, so nothing is downloaded or pinned (it pinned every unlinked open
    file below d/, and warned about one that did not fit, in the ninth session's third break
    test), and the handle still reads it from the store."""
    async def main():
        fs, store, root, h, old = await _unlinked_open_in_d_then_x_renamed_over_d(
            tmp_path, cmk_path, "big", "other", b"other")
        assert fs.cache.pinned_bytes == 0
        assert await fs.read(h, 0, 1 << 20) == old
        await fs.release(h)
        assert await fs.drain() == 0
        d = await fs.lookup(root, "d")
        assert await listed_names(fs, d) == ["other"]
        fs.close()
        await store.aclose()

    trio.run(main)


async def _crash_and_remount(fs, tmp_path, cmk_path):
    """The daemon dies (its descriptors close, nothing else); the next mount recovers the
    journal and replays the pending deletes, as the daemon does before it serves, then
    uploads what it recovered. Returns the new Filesystem."""
    store = fs.store
    for node in list(fs.dirty):
        if node.staged is not None:
            node.staged.close()
    fs.close()
    store.clear()
    fs = core_filesystem(tmp_path, cmk_path, store=store)
    fs.recover()
    assert await fs.finish_unlinks() == 0
    assert await fs.drain() == 0
    return fs


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.journal: unsaved changes of 'pre/f'")
@pytest.mark.parametrize("new_closed", [False, True], ids=["new-open", "new-closed"])
@pytest.mark.parametrize("delete", ["last-close", "background"])
def test_an_unlinked_file_whose_name_a_new_file_took_does_not_come_back_after_a_crash(
        tmp_path, cmk_path, delete, new_closed):
    """f in the bucket is unlinked (while a handle reads it, the DELETE waiting for its last
    close; or over a remote store, the DELETE queued for the background batch); a new f takes
    the name (still open, or closed: journaled); the old f's DELETE comes due, and the daemon
    dies before the new f's upload. The old f came back at the next mount: its pending delete
    was dropped because the new f would overwrite it, and that upload never came (found by a
    longer run of the model test). Now the record stays until the new f's upload lands."""
    async def main():
        async with trio.open_nursery() as nursery:
            fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
            fs._nursery = nursery
            root = fs.get(1)
            node = await committed_file(fs, "f", b"old f")
            if delete == "last-close":
                h = await fs.open(node, os.O_RDONLY)
            else:  # g's batch in flight holds the worker: f's DELETE makes the next batch
                fs.namespace.background_deletes = True
                await committed_file(fs, "g", b"g")
                go_on = trio.Event()

                async def hold(inner, op, keys):
                    await go_on.wait()
                fs.store.hook("delete_many", hold, count=1)
                await fs.unlink(root, "g")
                await trio.sleep(0.05)
            await fs.unlink(root, "f")
            new, hn = await fs.create(root, "f", 0o600, os.O_RDWR, UID, GID)
            await fs.write(hn, 0, b"new f")
            if new_closed:
                await fs.flush(hn)
                await fs.release(hn)
            if delete == "last-close":
                await fs.release(h)  # the old f's last close
            else:
                go_on.set()
                await fs.namespace.settle_deletes()  # f's batch was answered
            assert await fs.store.inner.head("pre/f") is not None  # no DELETE raced the new f's upload
            assert await read_node(fs, new) == b"new f"
            nursery.cancel_scope.cancel()
        fs = await _crash_and_remount(fs, tmp_path, cmk_path)
        if new_closed:
            assert await _keys(fs.store) == ["pre/f"] and await read_file(fs, "f") == b"new f"
        else:  # the new f was never durable: gone; the old one must not be back
            assert await _keys(fs.store) == [] and await listed_names(fs) == []
        assert os.listdir(tmp_path / "cache" / "unlinked") == []
        fs.close()

    trio.run(main)


@pytest.mark.parametrize("how", ["rename-over", "recovered"])
def test_a_directory_rename_before_an_upload_that_replaces_an_object_is_no_conflict(tmp_path, cmk_path, how):
    """d/f's staged version is to replace the object at d/f (a new file renamed over it, an
    editor's save; or a change recovered from the journal after a crash), and d is renamed to
    e before the upload. The rename copies that object to e/f under a new ETag; the upload
    compared e/f with the old ETag and made a false conflict copy (found by a longer run of
    the model test, whose only client is this mount)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        await committed_file(fs, "f", b"old f", d)
        if how == "rename-over":
            _, h = await fs.create(d, "f.tmp", 0o600, os.O_RDWR, UID, GID)
            await fs.write(h, 0, b"new f")
            await fs.flush(h)
            await fs.release(h)
            await fs.rename(d, "f.tmp", d, "f", 0)
        else:
            node = await fs.lookup(d, "f")
            h = await fs.open(node, os.O_WRONLY)
            await fs.write(h, 0, b"new f")
            await fs.flush(h)  # journaled, not uploaded
            await fs.release(h)
            fs = _died(fs, tmp_path, cmk_path)
            assert fs.recover() == 1
            root = fs.get(1)
        await fs.rename(root, "d", root, "e", 0)
        assert await fs.drain() == 0
        assert fs.commit.conflicts.count == 0
        assert await _keys(fs.store) == ["pre/e/", "pre/e/f"]
        assert await read_node(fs, await fs.lookup(await fs.lookup(root, "e"), "f")) == b"new f"
        fs.close()

    trio.run(main)


async def _unlink_during(fs, store, name: str, unlinked: list) -> None:
    """Arm ``store`` so that the first HEAD of ``name`` (the revalidation of an open: attributes
    never fresh with attr_timeout 0) is followed, before the open goes on, by ``unlink(name)``
    in another task; ``unlinked`` gets True once that unlink returned."""
    async def unlink_now(inner, op, keys):
        done = trio.Event()

        async def unlink():
            await fs.unlink(fs.get(1), name)
            unlinked.append(True)
            done.set()
        fs._nursery.start_soon(unlink)
        with trio.fail_after(10):  # the unlink must not wait for the open
            await done.wait()
    store.hook("head", unlink_now, key=f"pre/{name}", when="after", count=1)


@pytest.mark.parametrize("background", [False, True], ids=["local-deletes", "background-deletes"])
@pytest.mark.parametrize("mode", [os.O_RDONLY, os.O_RDWR], ids=["read-only", "read-write"])
def test_a_file_unlinked_while_it_is_being_opened_stays_readable_through_that_open(tmp_path, cmk_path, mode,
                                                                                   background):
    """An unlink that lands while an open of the same file is under way (its revalidating
    HEAD done, its handle not made yet) leaves the object for that open, as for any open
    handle: the reads give the content, and the object goes at the last close. Before, the
    unlink deleted it at once: the open succeeded and each read failed with ESTALE and an
    ERROR line blaming "another client" (found by `find -exec cat` alongside `rm -rf`).
    ``background``: as over OSS, where the unlink of a file no handle holds queues its DELETE."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0)
        fs.namespace.background_deletes = background
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await committed_file(fs, "f", b"the content")
            unlinked: list = []
            await _unlink_during(fs, fs.store, "f", unlinked)
            h = await fs.open(node, mode)
            assert unlinked == [True] and not await exists(fs, "f")
            assert await fs.read(h, 0, 100) == b"the content"
            assert await _keys(fs.store) == ["pre/f"]  # kept for the handle
            await fs.release(h)
            assert await _keys(fs.store) == [] and fs.pending_deletes() == []
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


def test_an_open_that_fails_after_an_unlink_under_way_deletes_the_object(tmp_path, cmk_path, monkeypatch):
    """The open that held an unlinked file fails (here: its data key cannot be unwrapped): the
    object it held goes then, as at a last close, instead of staying hidden in the bucket."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await committed_file(fs, "f", b"the content")

            async def failing_open_version(v, wait=True, doing="open", *, quiet=()):
                raise FsError(errno.EIO)
            monkeypatch.setattr(fs.files, "open_version", failing_open_version)
            unlinked: list = []
            await _unlink_during(fs, fs.store, "f", unlinked)
            with pytest.raises(FsError) as e:
                await fs.open(node, os.O_RDWR)
            assert e.value.errno == errno.EIO and unlinked == [True]
            assert node.opens == 0 and await _keys(fs.store) == [] and fs.pending_deletes() == []
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_an_open_of_a_file_that_lost_its_name_before_it_arrived_is_estale(tmp_path, cmk_path, how):
    """The kernel looked the file up, then its name went (an unlink, or another file renamed
    over it: an editor's atomic save) before the OPEN arrived, and no handle held it: ESTALE,
    with no store request and no log line, so that the kernel walks the path again once
    (LOOKUP_REVAL): ENOENT after the unlink, the new file after the rename. Not ENOENT at
    once (a name that always existed failed to open: this change's first form), and not a
    handle whose reads fail with ESTALE (before), nor one whose writes go to a file with no
    name (dropped at close)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        node = await committed_file(fs, "f", b"x")
        fs.remember(node)  # the kernel's lookup count keeps the node
        if how == "unlink":
            await fs.unlink(fs.get(1), "f")
        else:
            await committed_file(fs, "f.tmp", b"new")
            await fs.rename(fs.get(1), "f.tmp", fs.get(1), "f", 0)
        calls = dict(fs.store.counters.calls)
        for mode in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(FsError) as e:
                await fs.open(node, mode)
            assert e.value.errno == errno.ESTALE
        assert dict(fs.store.counters.calls) == calls and node.opens == 0
        if how == "rename-over":  # what the kernel's second walk finds
            assert await read_file(fs, "f") == b"new"
        else:
            assert not await exists(fs, "f")
        fs.close()

    trio.run(main)


def test_no_warning_when_the_last_reader_closes_while_its_unlinked_file_is_being_kept(tmp_path, cmk_path):
    """A new file takes the name of a file unlinked while open, so the old version is brought
    into the cache for its reader; that reader closes while the blocks are fetched (its close
    drops them and deletes the object). Nobody is left to get ESTALE: no WARNING (checklogs
    fails the test on one). Before, "does not fit the cache limits" or "could not be kept
    readable: no such key" was logged for a 5 KB file and a 10 GiB cache (a new-user trial
    saw 57 and 64 of them in one churn run, and no reader failing)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await committed_file(fs, "f", os.urandom(5000))
            h = await fs.open(node, os.O_RDONLY)
            await fs.unlink(fs.get(1), "f")  # kept for h

            async def last_close(inner, op, keys):
                await fs.release(h)
            rule = fs.store.hook("get_range", last_close, key="pre/f", count=1)
            node2, h2 = await fs.create(fs.get(1), "f", 0o600, os.O_RDWR, UID, GID)
            assert node.opens == 0 and rule.hits == 1
            await fs.write(h2, 0, b"new")
            await fs.release(h2)
            assert await fs.drain() == 0
            assert await _keys(fs.store) == ["pre/f"] and await read_file(fs, "f") == b"new"
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


@pytest.mark.parametrize("how", ["rename-over", "unlink"])
def test_an_open_that_starts_while_the_name_goes_waits_and_gets_estale(tmp_path, cmk_path, how):
    """An open of ``f`` starts while a rename over it (its copy) or its unlink (the local
    store's DELETE) is under way, after those looked for open handles to keep it for: the
    open waits for the outcome and gets ESTALE (the kernel then looks the name up again: the
    new file, or ENOENT), never a handle on an object going away. Before, the open returned
    a handle and its reads failed with ESTALE and an ERROR blaming another client (a trial's
    churn of renames over names always present: 200 failed reads, 47 such lines)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await committed_file(fs, "f", b"old")
            fs.remember(node)  # the kernel looked it up
            await committed_file(fs, "g", b"new")
            outcome: list = []
            name_went = trio.Event()

            async def open_f():
                try:
                    h = await fs.open(node, os.O_RDONLY)
                except FsError as e:
                    outcome.append(errno.errorcode[e.errno])
                    return
                await name_went.wait()  # reads after the rename or unlink returned
                try:
                    outcome.append(await fs.read(h, 0, 100))
                except FsError as e:
                    outcome.append("read " + errno.errorcode[e.errno])
                await fs.release(h)

            async def start_an_open(inner, op, keys):
                nursery.start_soon(open_f)
                await trio.testing.wait_all_tasks_blocked()  # the open runs as far as it can
            if how == "rename-over":
                fs.store.hook("copy", start_an_open, key="pre/g", count=1)
                await fs.rename(fs.get(1), "g", fs.get(1), "f", 0)
            else:
                fs.store.hook("delete", start_an_open, key="pre/f", count=1)
                await fs.unlink(fs.get(1), "f")
            name_went.set()
            with trio.fail_after(10):
                while not outcome:
                    await trio.sleep(0.01)
            assert outcome == ["ESTALE"]
            if how == "rename-over":  # what the kernel's second walk opens
                assert await read_file(fs, "f") == b"new"
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


async def _dir_with_file(fs, data: bytes):
    """Directory ``A`` holding committed file ``f`` (``data``), the node of ``f`` forgotten as
    the kernel does under memory pressure: the next lookup or listing makes it anew."""
    a = await fs.mkdir(fs.get(1), "A", 0o700, UID, GID)
    f = await committed_file(fs, "f", data, parent=a)
    fs.forget(f.ino, 1)
    assert fs.inodes.by_path.get("A/f") is None
    return a


async def _dir_of_files(fs, n: int):
    """Directory ``A`` holding committed files ``f00``, ``f01``… (``n``; content ``data <i>``)."""
    a = await fs.mkdir(fs.get(1), "A", 0o700, UID, GID)
    for i in range(n):
        await committed_file(fs, f"f{i:02}", b"data %d" % i, parent=a)
    return a


@pytest.mark.parametrize("how", ["lookup", "readdir"])
def test_a_lookup_or_listing_during_its_directorys_rename_makes_the_file_at_the_new_name(tmp_path, cmk_path, how):
    """A lookup (or a listing) in directory ``A`` starts while ``A`` is renamed to ``B``, after
    the rename took its snapshot of the nodes below ``A``: it waits for the rename and makes
    the node at ``B/f``, with the version copied there. Before, it made ``A/f`` from the old
    key's HEAD (or listing entry) — a node no rename moved, which the kernel had at ``B/f``:
    every read of it failed with ESTALE and an ERROR blaming another client (a trial renaming
    a directory back and forth under 4 readers: 6–58 such reads in 8 s)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await _dir_with_file(fs, b"data")
        found: list = []

        async def look():
            if how == "lookup":
                found.append(await fs.lookup(a, "f"))
                return
            h = fs.opendir(a)
            found.extend(n for _, name, n in await fs.readdir_entries(h, 0) if name == "f")
            fs.releasedir(h.fh)

        async with trio.open_nursery() as nursery:
            async def during_the_rename(inner, op, keys):
                nursery.start_soon(look)
                await trio.testing.wait_all_tasks_blocked()  # it runs as far as it can
            fs.store.hook("delete", during_the_rename, key="pre/A/f", count=1)
            await fs.rename(root, "A", root, "B", 0)
        [node] = found
        assert node.path == "B/f"
        assert node.version.key == "pre/B/f"
        assert await read_node(fs, node) == b"data"
        fs.close()

    trio.run(main)


def test_a_read_whose_object_a_rename_of_its_directory_moved_reads_the_copy(tmp_path, cmk_path):
    """A read of an open file fetches its object just after a rename of the file's directory
    deleted it (the copy is at the new name): the read follows the handle to the copy. Before,
    it failed with ESTALE and logged that another client deleted the file."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await _dir_with_file(fs, b"data" * 1000)
        h = await fs.open(await fs.lookup(a, "f"), os.O_RDONLY)

        async def rename_first(inner, op, keys):
            await fs.rename(root, "A", root, "B", 0)
        fs.store.hook("get_range", rename_first, key="pre/A/f", count=1)
        assert await fs.read(h, 4, 8) == b"datadata"
        assert h.version.key == "pre/B/f"
        await fs.release(h)
        fs.close()

    trio.run(main)


def test_a_directory_rename_waits_for_an_upload_below_it(tmp_path, cmk_path):
    """A directory is renamed while the upload of a rewritten file in it is in flight: the
    rename waits for the upload, then moves the new version. Before, it listed and copied
    the old version while the new one landed at the old name: the copy was refused with an
    ERROR blaming another client, or the file got a conflict copy (a trial renaming the
    directory every 10 ms while rewriting its files, on OSS with upload_delay: 3 of 3 runs)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await fs.mkdir(root, "A", 0o700, UID, GID)
        f = await committed_file(fs, "f", b"old", parent=a)
        h = await fs.open(f, os.O_WRONLY | os.O_TRUNC)
        await fs.write(h, 0, b"new")
        await fs.release(h)
        renamed = trio.Event()

        async def rename():
            await fs.rename(root, "A", root, "B", 0)
            renamed.set()

        async with trio.open_nursery() as nursery:
            async def rename_during_the_put(inner, op, keys):
                nursery.start_soon(rename)
                with trio.move_on_after(1):  # the rename may not overtake the PUT
                    await renamed.wait()
            fs.store.hook(("put_file", "put_bytes"), rename_during_the_put, key="pre/A/f", count=1)
            assert await fs.drain() == 0
            await renamed.wait()
        assert await listed_names(fs) == ["B"]
        assert await listed_names(fs, await fs.lookup(root, "B")) == ["f"]
        assert await read_node(fs, await fs.lookup(await fs.lookup(root, "B"), "f")) == b"new"
        assert await _keys(fs.store) == ["pre/B/", "pre/B/f"]
        fs.close()

    trio.run(main)


def test_a_listing_continued_after_its_directorys_rename_makes_the_files_at_their_new_keys(tmp_path, cmk_path):
    """``ls`` of a directory reads its first entries, the directory is renamed, and the same
    listing goes on (its offsets stay): the entries after the rename are files at the new
    keys. Before, they were made from what the snapshot had listed, the old keys: every read
    of them failed with ESTALE and an ERROR blaming another client, until attr_timeout (a
    trial: 1,110–1,776 of 2,000 reads)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await _dir_of_files(fs, 40)
        for i in range(40):
            fs.forget(fs.inodes.by_path[f"A/f{i:02}"].ino, 1)  # as after a remount: listed anew
        h = fs.opendir(a)
        first = await fs.readdir_entries(h, 0)
        assert 0 < len(first) < 40
        await fs.rename(root, "A", root, "B", 0)
        rest = await fs.readdir_entries(h, first[-1][0])
        fs.releasedir(h.fh)
        assert [name for _, name, _ in first + rest][:len(first) + len(rest)] == [f"f{i:02}" for i in range(len(first) + len(rest))]
        for _, name, node in rest:
            assert node.path == "B/" + name and node.version.key == "pre/B/" + name
            assert await read_node(fs, node) == b"data %d" % int(name[1:])
        fs.close()

    trio.run(main)


def test_a_lookup_whose_directory_is_renamed_at_every_probe_still_answers(tmp_path, cmk_path):
    """Each time a lookup in ``A`` asks the store, the directory is renamed (``A`` ↔ ``B``,
    back to back): the answer is about a path it left, so the lookup asks again; after
    UNLOCKED_TRIES such tries it asks under the name's lock, which the next rename waits for,
    and answers. Without that lock it gave EIO after MOVE_RETRIES (a trial: 30 of 40 lookups
    with a directory renamed 58 times a second)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await _dir_with_file(fs, b"data")
        renames = []
        looker = None

        async with trio.open_nursery() as nursery:
            async def rename_at_each_probe(inner, op, keys):
                if trio.lowlevel.current_task() is looker and keys[0].endswith("/f"):
                    names = ("A", "B") if len(renames) % 2 == 0 else ("B", "A")
                    renames.append(names)
                    nursery.start_soon(fs.rename, root, names[0], root, names[1], 0)
                    await trio.testing.wait_all_tasks_blocked()  # done, or waiting for the lookup's lock
            fs.store.hook("head", rename_at_each_probe)

            async def look():
                nonlocal looker
                looker = trio.lowlevel.current_task()
                return await fs.lookup(a, "f")
            node = await look()
        assert len(renames) == 4  # 3 unlocked tries, then the one under the lock
        assert node.path == a.path + "/f" and node.version.key == "pre/" + node.path
        assert await read_node(fs, node) == b"data"
        fs.close()

    trio.run(main)


def test_a_directory_rename_copies_and_deletes_several_objects_at_once(tmp_path, cmk_path):
    """A directory rename's copies run several at once, then its deletes (each one or two
    round trips: over a 5 ms store, 300 files moved in 1.1 s instead of 7.6 s), and every
    copy is done before the first delete (an interruption leaves both trees, never neither)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        await _dir_of_files(fs, 20)
        running, most, order = [0], [0], []

        async def slow(inner, op, keys):
            order.append(op)
            running[0] += 1
            most[0] = max(most[0], running[0])
            await trio.sleep(0.01)
            running[0] -= 1
        fs.store.hook(("copy", "delete"), slow)
        await fs.rename(root, "A", root, "B", 0)
        assert most[0] > 1
        assert order == ["copy"] * 21 + ["delete"] * 21  # the 20 files and the marker
        assert await listed_names(fs, await fs.lookup(root, "B")) == [f"f{i:02}" for i in range(20)]
        assert await _keys(fs.store) == ["pre/B/"] + [f"pre/B/f{i:02}" for i in range(20)]
        fs.close()

    trio.run(main)


def test_a_directory_rename_changes_the_ctime_of_the_directory_only(tmp_path, cmk_path):
    """As on a local disk, a directory rename changes the renamed directory's ctime, not the
    ctime of what is below it (before, every node below got a new ctime: ``tar`` of a tree
    whose parent was renamed said "file changed as we read it")."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        a = await fs.mkdir(root, "A", 0o700, UID, GID)
        sub = await fs.mkdir(a, "sub", 0o700, UID, GID)
        f = await committed_file(fs, "f", b"data", parent=sub)
        before = {n.path: n.ctime_ns for n in (a, sub, f)}
        await trio.sleep(0.01)
        await fs.rename(root, "A", root, "B", 0)
        assert a.ctime_ns > before["A"]
        assert (sub.path, sub.ctime_ns) == ("B/sub", before["A/sub"])
        assert (f.path, f.ctime_ns) == ("B/sub/f", before["A/sub/f"])
        fs.close()

    trio.run(main)


def test_a_directory_renamed_where_another_was_renamed_away_shows_its_files(tmp_path, cmk_path):
    """The deploy rotation ``mv current old; mv new current; cat current/app.conf``, where
    ``current/app.conf`` had been looked up and ``new/app.conf`` had not: the read finds
    new's file. Before, the first rename had noted ``current/app.conf`` absent (for
    entry_timeout) and the second moved no node there to clear it: ENOENT on both stores (a
    new-user trial), and under a rename churn 660,279 of 10.3 M stats of untouched files."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        current = await fs.mkdir(root, "current", 0o700, UID, GID)
        new = await fs.mkdir(root, "new", 0o700, UID, GID)
        await committed_file(fs, "app.conf", b"old", parent=current)
        f = await committed_file(fs, "app.conf", b"new", parent=new)
        fs.forget(f.ino, 1)  # new/app.conf: not looked up since
        assert await read_node(fs, await fs.lookup(current, "app.conf")) == b"old"
        await fs.rename(root, "current", root, "old", 0)
        await fs.rename(root, "new", root, "current", 0)
        assert await read_node(fs, await fs.lookup(new, "app.conf")) == b"new"
        assert await read_node(fs, await fs.lookup(current, "app.conf")) == b"old"  # now old/
        fs.close()

    trio.run(main)


def test_a_directorys_mtime_moves_with_its_entries_and_a_revalidation_keeps_it(tmp_path, cmk_path):
    """A create, rename or unlink in a directory moves its mtime (and ctime) to now, in memory
    (docs/semantics.md): a revalidation of the directory, which reads its marker's stored mtime,
    must not put it back (a trial: with attr_timeout 0 the mtime stayed at the mkdir's, so
    Python's import cache never saw a new module). An explicit utimensat sets it, and is
    stored; a later entry change moves it again."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0, entry_timeout=0.0)
        root = fs.get(1)

        async def mtime() -> int:
            return (await fs.lookup(root, "d")).mtime_ns  # attr_timeout 0: the marker is read again

        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        made = await mtime()
        await trio.sleep(0.02)
        node, h = await fs.create(d, "a", 0o644, os.O_WRONLY, UID, GID)
        await fs.release(h)
        created = await mtime()
        assert created > made and created == d.ctime_ns
        await trio.sleep(0.02)
        await fs.rename(d, "a", d, "b", 0)
        renamed = await mtime()
        assert renamed > created
        await fs.setattr(d, mtime_ns=1_500_000_000_123_456_789)
        assert await mtime() == 1_500_000_000_123_456_789
        assert await mtime() == 1_500_000_000_123_456_789  # stored in the marker, read back
        await fs.unlink(d, "b")
        unlinked = await mtime()
        assert unlinked > renamed
        # the kernel forgets the directory (it evicts inodes under load: CI's pjdfstest rmdir/00.t
        # and a dir-mtime test failed then) and looks it up again: a new node, the same times
        d = await fs.lookup(root, "d")
        fs.forget(d.ino, d.lookups)
        assert fs.inodes.nodes.get(d.ino) is None  # dropped
        again = await fs.lookup(root, "d")
        assert again is not d and again.ino == d.ino
        assert (again.mtime_ns, again.ctime_ns) == (unlinked, d.ctime_ns)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_a_time_before_1970_survives_a_revalidation_and_a_metadata_copy(tmp_path, cmk_path):
    """Found by a trial: `touch -d 1960-01-01` showed 1960, then 1970 once the attributes were
    read again (a revalidation took max(mtime, the directory entry-change time 0)), and a
    chmod after that stored 1970: the time was lost. A file, a directory and a symlink keep a
    negative mtime through revalidations, a chmod (a metadata copy) and a new mount."""
    before_1970 = -315_619_200_123_456_789  # 1960-01-01, with nanoseconds

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0, entry_timeout=0.0)
        root = fs.get(1)
        f = await committed_file(fs, "f", b"data")
        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        ln = await fs.symlink(root, "ln", "f", UID, GID)
        for node in (f, d, ln):
            await fs.setattr(node, mtime_ns=before_1970)
        assert await fs.drain() == 0
        for name in ("f", "d", "ln"):
            assert (await fs.lookup(root, name)).mtime_ns == before_1970, name  # read again (attr_timeout 0)
            node = await fs.lookup(root, name)
            await fs.setattr(node, mode=stat.S_IFMT(node.mode) | 0o700)  # a metadata copy of its object
            assert (await fs.lookup(root, name)).mtime_ns == before_1970, name
        assert await fs.drain() == 0
        fs.close()
        await fs.store.aclose()

    async def next_mount():
        fs = core_filesystem(tmp_path, cmk_path, attr_timeout=0.0, entry_timeout=0.0)
        root = fs.get(1)
        for name in ("f", "d", "ln"):
            assert (await fs.lookup(root, name)).mtime_ns == before_1970, name
        fs.close()
        await fs.store.aclose()

    trio.run(main)
    trio.run(next_mount)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.(commit: staging 'pre/gone' failed|files: staging a write to 'pre/gone' failed)")
def test_a_write_after_the_staging_directory_was_removed_fails_eio(tmp_path, cmk_path):
    """An operator trial removed the cache dir's staging/ while mounted: the next file's write
    went to work-file descriptor -1 and failed EBADF. The work file cannot be made: EIO, and
    the mount goes on once the directory is back."""
    import shutil

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        shutil.rmtree(fs.staging.dir)
        node, h = await fs.create(fs.get(1), "gone", 0o644, os.O_WRONLY, UID, GID)
        with pytest.raises(FsError) as e:
            await fs.write(h, 0, b"data")
        assert e.value.errno == errno.EIO
        with pytest.raises(FsError):
            await fs.flush(h)  # (close() reports the lost write)
        await fs.release(h)
        os.makedirs(fs.staging.dir)
        await committed_file(fs, "back", b"saved")
        assert await read_file(fs, "back") == b"saved"
        fs.close()
        await fs.store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"the mount point's mode and owner are kept in memory only")
def test_a_chmod_of_the_mount_point_says_once_that_it_is_not_kept(tmp_path, cmk_path, caplog):
    """A new user's trial: `chmod 700` of the mount point worked and was gone at the next mount
    without a word (the README says so; a user locking the folder does not read it there).
    One WARNING per mount names the options that do restrict access; a touch says nothing."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        await fs.setattr(root, mtime_ns=1_000_000_000)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        await fs.setattr(root, mode=0o700)
        await fs.setattr(root, mode=0o750, uid=UID)
        assert stat.S_IMODE(root.mode) == 0o750
        said = [r.getMessage() for r in caplog.records if "mount point's mode" in r.getMessage()]
        assert len(said) == 1 and "-o umask=, uid=, gid=" in said[0], said
        fs.close()
    trio.run(main)
