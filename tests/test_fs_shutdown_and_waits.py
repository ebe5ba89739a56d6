"""Correctness leftovers of a break test and a review (crashsafe): unlink and rename wait for an
upload of the same file with no lock held; rmdir of a directory whose only entry is an
unlinked open file; what a write through a handle opened before another mount's commit gets.
In-process over the fault-injecting store (tests/fakes/core.py)."""
from __future__ import annotations

import errno
import os

import pytest
import trio

from fakes.core import GID, UID, committed_file, core_filesystem, core_store, exists, listed_names, read_node
from fakes.fault_store import FaultStore
from ossfuse.fs import FsError

SLOW = 1.5  # seconds: the slowed PUT of the file under test


async def _uploading(fs, node) -> None:
    """Return once ``node``'s upload has started its PUT (its staged version is being read)."""
    with trio.fail_after(5):
        while not (node.staged is not None and node.staged.uploading):
            await trio.sleep(0.01)


def test_a_slow_upload_holds_no_name_lock_of_an_unlink_or_rename(tmp_path, cmk_path):
    """unlink and rename of a file whose upload is in flight wait for it (its PUT landing after
    the name went would bring the object back) with NO lock held: while the slowed PUT runs,
    no name lock is held, a lookup of the name answers, and an rmdir of its directory answers
    at once (ENOTEMPTY: the file is still there) instead of waiting for the upload. It used to
    hold the name lock across the PUT, so that rmdir waited the whole upload. After the upload
    the unlink completes and nothing is left in the bucket."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        node, h = await fs.create(d, "f", 0o644, os.O_RDWR, UID, GID)
        await fs.write(h, 0, b"hello")
        await fs.release(h)  # no upload worker runs here: the upload is started below
        store.delay(("put_file", "put_bytes"), SLOW, key="pre/d/f")
        done: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.commit.upload_node, node)
            await _uploading(fs, node)
            start = trio.current_time()

            async def unlink():
                await fs.unlink(d, "f")
                done["unlink"] = trio.current_time() - start

            nursery.start_soon(unlink)
            await trio.sleep(0.2)
            assert "unlink" not in done  # it waits for the upload ...
            assert fs.namespace.locks.held() == set()  # ... holding no name lock
            found = await fs.lookup(d, "f")
            assert found is node and found.current_size == 5
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "d")
            assert e.value.errno == errno.ENOTEMPTY
            assert trio.current_time() - start < SLOW / 2  # rmdir did not wait for the upload
            # a rename of another file onto that name waits too, holding no lock either
            g, hg = await fs.create(d, "g", 0o644, os.O_RDWR, UID, GID)
            await fs.write(hg, 0, b"other")
            await fs.flush(hg)
            await fs.release(hg)

            async def rename():
                await fs.rename(d, "g", d, "h", 0)
                done["rename"] = trio.current_time() - start

            nursery.start_soon(rename)  # unrelated names: not held up by f's upload at all
            with trio.move_on_after(SLOW / 2):  # polled: a fixed wait is flaky on a loaded machine
                while "rename" not in done:
                    await trio.sleep(0.01)
            assert "rename" in done and done["rename"] < SLOW / 2
        assert done["unlink"] >= SLOW * 0.9  # it returned after the upload ended
        assert not await exists(fs, "f", d)
        assert await store.inner.head("pre/d/f") is None  # the upload's object went with the name
        assert sorted(o.key for o in (await store.inner.list("pre/d/", delimiter=None)).objects) == [
            "pre/d/", "pre/d/h"]
        fs.close()
        await store.aclose()

    trio.run(main)


def test_rename_over_a_file_whose_upload_is_slow_waits_without_locks(tmp_path, cmk_path):
    """A rename over a file whose upload is in flight waits for that upload with no name lock
    held (an rmdir of the directory answers meanwhile), then replaces it: the renamed content is
    what the name holds afterwards, also in the bucket."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        dst, h = await fs.create(d, "dst", 0o644, os.O_RDWR, UID, GID)
        await fs.write(h, 0, b"old")
        await fs.release(h)
        src, h = await fs.create(d, "src", 0o644, os.O_RDWR, UID, GID)
        await fs.write(h, 0, b"new content")
        await fs.release(h)
        assert await fs.commit.upload_node(src)
        store.delay(("put_file", "put_bytes"), SLOW, key="pre/d/dst")
        done: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.commit.upload_node, dst)
            await _uploading(fs, dst)
            start = trio.current_time()

            async def rename():
                await fs.rename(d, "src", d, "dst", 0)
                done["rename"] = trio.current_time() - start

            nursery.start_soon(rename)
            await trio.sleep(0.2)
            assert "rename" not in done and fs.namespace.locks.held() == set()
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "d")
            assert e.value.errno == errno.ENOTEMPTY and trio.current_time() - start < SLOW / 2
        assert done["rename"] >= SLOW * 0.9
        node = await fs.lookup(d, "dst")
        assert node is src
        h = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"new content"
        await fs.release(h)
        assert not await exists(fs, "src", d)
        assert sorted(o.key for o in (await store.inner.list("pre/d/", delimiter=None)).objects) == [
            "pre/d/", "pre/d/dst"]
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'pre/w' failed")
@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: 'pre/w' was open for writing at shutdown: the 7 bytes "
                        r"written so far stay journaled")
@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: 'pre/v' was open for writing at shutdown: stored the 3 bytes")
def test_shutdown_names_each_file_open_for_writing_once(tmp_path, cmk_path, caplog):
    """The daemon's drain (SIGTERM, unmount) names each file still open for writing with
    changes, once: stored in the bucket, or (its upload failed) journaled for the next mount.
    A file open for writing without changes (also one whose closed version waits for its
    upload), or only for reading, is not named."""
    from ossfuse.daemon import _open_writers, _warn_open_writers

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=5.0)  # close journals; the drain uploads
        store = fs.store
        root = fs.get(1)
        j, hj = await fs.create(root, "journaled", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hj, 0, b"closed, upload pending")
        await fs.flush(hj)
        await fs.release(hj)
        hj = await fs.open(j, os.O_RDWR)  # open for writing, nothing written since the close
        assert j.staged is not None and j.staged.sealed
        c, hc = await fs.create(root, "clean", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hc, 0, b"closed")
        await fs.flush(hc)
        await fs.release(hc)
        hc = await fs.open(c, os.O_RDWR)  # open for writing, nothing written: not named
        hr = await fs.open(c, os.O_RDONLY)
        w, hw = await fs.create(root, "w", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hw, 0, b"partial")
        v, hv = await fs.create(root, "v", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hv, 0, b"abc")
        store.fail(("put_file", "put_bytes"), key="pre/w", error="permanent", count=None)
        writers = _open_writers(fs)
        assert sorted(k for _, k, _ in writers) == ["pre/v", "pre/w"]
        assert await fs.drain() == 1  # w's upload failed: journaled
        with caplog.at_level("WARNING", logger="ossfuse.daemon"):
            _warn_open_writers(fs, writers)
        lines = sorted(r.getMessage() for r in caplog.records if r.name == "ossfuse.daemon")
        assert lines == ["'pre/v' was open for writing at shutdown: stored the 3 bytes written so far; its "
                         "writer never closed it",
                         "'pre/w' was open for writing at shutdown: the 7 bytes written so far stay journaled "
                         "(upload failed) and upload at the next mount; its writer never closed it"]
        assert await store.inner.head("pre/v") is not None and await store.inner.head("pre/w") is None
        assert await store.inner.head("pre/journaled") is not None
        for h in (hw, hv, hc, hr, hj):
            await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)


async def _write_closed(fs, name: str, data: bytes, node=None):
    """Write ``data`` as the whole of file ``name`` in ``fs``'s root, close it and upload it."""
    if node is None:
        node, h = await fs.create(fs.get(1), name, 0o644, os.O_RDWR, UID, GID)
    else:
        h = await fs.open(node, os.O_RDWR)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    assert await fs.drain() == 0
    return node


async def _opened_then_replaced(tmp_path, cmk_path, read: bool, v2: bytes):
    """Mounts A and B of one bucket: B writes f, A opens it for writing (and reads it, with
    ``read``), then B replaces it with ``v2``. Returns (store, a, b, A's node, B's node, A's handle)."""
    store = core_store(tmp_path)
    a = core_filesystem(tmp_path, cmk_path, store=store)
    os.makedirs(tmp_path / "other")
    b = core_filesystem(tmp_path / "other", cmk_path, store=FaultStore(store.inner))
    fb = await _write_closed(b, "f", b"version 1 by B")
    fa = await a.lookup(a.get(1), "f")
    h = await a.open(fa, os.O_RDWR)
    if read:
        assert await a.read(h, 0, 100) == b"version 1 by B"
    await _write_closed(b, "f", v2, fb)
    return store, a, b, fa, fb, h


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: write to 'pre/f' refused: this open file reads version")
def test_write_through_a_stale_handle_after_a_lookup_saw_the_other_version(tmp_path, cmk_path):
    """As below, but something on mount A looked f up after B's commit (``ls -l``, a stat, an
    open), so A's node holds B's version while the handle still reads the one it opened. The
    handle's first write was merged onto B's content, silently (new-user trial of the tenth
    session). It fails ESTALE, nothing is stored, and B's version stays."""
    async def main():
        _, a, b, fa, fb, h = await _opened_then_replaced(tmp_path, cmk_path, True, b"VERSION 2 BY B, LONGER")
        fa.checked_at = 0.0  # past attr_timeout: a stat on A re-reads f
        assert (await a.lookup(a.get(1), "f")) is fa and fa.version.size == 22
        with pytest.raises(FsError) as e:
            await a.write(h, 0, b"XX")
        assert e.value.errno == errno.ESTALE
        await a.flush(h)
        await a.release(h)
        assert await a.drain() == 0 and fa.staged is None
        fb.checked_at = 0.0
        assert await read_node(b, await b.lookup(b.get(1), "f")) == b"VERSION 2 BY B, LONGER"
        h = await a.open(fa, os.O_RDWR)  # a new open writes to B's version
        await a.write(h, 0, b"XX")
        await a.flush(h)
        await a.release(h)
        assert await a.drain() == 0 and a.commit.conflicts.count == 0
        assert await read_node(a, fa) == b"XXRSION 2 BY B, LONGER"
        a.close()
        b.close()

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: write to 'pre/f' refused: this open file reads version")
def test_write_through_a_stale_handle_into_a_version_a_newer_handle_started(tmp_path, cmk_path):
    """As above, but a second handle of mount A, opened after the lookup, has already written
    (a staged version started from B's content): the stale handle's write fails ESTALE too,
    instead of joining that version (before, only the first change was refused: its ``XX``
    landed on B's content). The new handle's write is kept."""
    async def main():
        _, a, b, fa, fb, h = await _opened_then_replaced(tmp_path, cmk_path, True, b"VERSION 2 BY B, LONGER")
        fa.checked_at = 0.0  # past attr_timeout: a stat on A re-reads f
        assert (await a.lookup(a.get(1), "f")) is fa and fa.version.size == 22
        h2 = await a.open(fa, os.O_RDWR)
        await a.write(h2, 0, b"YY")
        with pytest.raises(FsError) as e:
            await a.write(h, 0, b"XX")
        assert e.value.errno == errno.ESTALE
        for hd in (h, h2):
            await a.flush(hd)
            await a.release(hd)
        assert await a.drain() == 0 and a.commit.conflicts.count == 0
        fb.checked_at = 0.0
        assert await read_node(b, await b.lookup(b.get(1), "f")) == b"YYRSION 2 BY B, LONGER"
        a.close()
        b.close()

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: 'pre/f' was replaced while open")
@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.conflicts: 'pre/g' was changed by another client")
def test_write_through_a_handle_whose_version_another_mount_replaced(tmp_path, cmk_path):
    """Two mounts of one bucket. A handle of mount A opened before mount B's commit writes to a
    version B replaced: that write is never merged onto B's content. When A no longer has the
    bytes of the version it opened (a local bucket is never cached), its first write fails ESTALE
    (one ERROR line: the write starts a new version from the whole old content), nothing of it is
    stored, and B's version stays, as a read would; A's next open sees B's version and writes to
    it. A handle that wrote before B's commit goes on writing its own version, and its upload
    keeps both (B's at the name, A's in a conflict copy). Nothing written is lost silently."""
    async def main():
        # f: written by B, opened (not read) by A, then replaced by B
        store, a, b, fa, fb, h = await _opened_then_replaced(tmp_path, cmk_path, False, b"VERSION 2 by B")
        with pytest.raises(FsError) as e:
            await a.write(h, 0, b"A")
        assert e.value.errno == errno.ESTALE
        await a.flush(h)
        await a.release(h)
        assert await a.drain() == 0
        assert fa.staged is None  # nothing of the failed write is kept or uploaded
        assert await read_node(b, fb) == b"VERSION 2 by B"
        fa.checked_at = 0.0  # past attr_timeout: the next open sees B's version
        fa = await a.lookup(a.get(1), "f")
        assert await read_node(a, fa) == b"VERSION 2 by B"
        await _write_closed(a, "f", b"A", fa)  # the version A knows now: the write goes on
        fb.checked_at = 0.0
        fb = await b.lookup(b.get(1), "f")
        assert await read_node(b, fb) == b"AERSION 2 by B"  # A's write to B's version, as B sees it
        # g: A's handle wrote before B's commit (staged) and writes again after it
        ga = await _write_closed(a, "g", b"version 1 by A")
        gb = await b.lookup(b.get(1), "g")
        h = await a.open(ga, os.O_RDWR)
        await a.write(h, 0, b"A's")
        await _write_closed(b, "g", b"VERSION 2 by B", gb)
        await a.write(h, 3, b" edit")  # its own staged version: no need of the replaced bytes
        await a.flush(h)
        await a.release(h)
        assert await a.drain() == 0
        keys = sorted(o.key for o in (await store.inner.list("pre/", delimiter=None)).objects)
        copies = [k for k in keys if k.startswith("pre/g.conflict-")]
        assert len(copies) == 1 and keys == sorted(["pre/f", "pre/g", copies[0]])
        gb.checked_at = 0.0
        assert await read_node(b, await b.lookup(b.get(1), "g")) == b"VERSION 2 by B"
        copy = await b.lookup(b.get(1), copies[0][len("pre/"):])
        assert await read_node(b, copy) == b"A's edit1 by A"  # A's writes over the version A opened
        for fs in (a, b):
            fs.close()
        await store.aclose()

    trio.run(main)


def test_rmdir_of_a_directory_whose_only_entry_is_an_unlinked_open_file(tmp_path, cmk_path):
    """POSIX and a local disk: an unlinked file is gone from the namespace even while open, so
    rmdir of its directory succeeds (it gave ENOTEMPTY: the object, kept in the bucket for the
    open handle, was counted). Afterwards the directory is gone for lookups and listings (the
    object left below it does not make it show again as an implicit directory), the handle
    still reads the file, the object goes at the last close, and the name can be made again.
    Nested: the same through two levels of removed directories."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, entry_timeout=0.0)  # lookups ask the store
        store = fs.store
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, UID, GID)
        e = await fs.mkdir(d, "e", 0o755, UID, GID)
        f, h = await fs.create(d, "f", 0o644, os.O_RDWR, UID, GID)
        await fs.write(h, 0, b"still readable")
        await fs.flush(h)
        g, hg = await fs.create(e, "g", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hg, 0, b"nested")
        await fs.flush(hg)
        assert await fs.drain() == 0
        await fs.unlink(d, "f")
        await fs.unlink(e, "g")
        assert await store.inner.head("pre/d/f") is not None  # kept for the open handle
        await fs.rmdir(d, "e")
        await fs.rmdir(root, "d")
        assert not await exists(fs, "d")
        assert await listed_names(fs) == []
        assert sorted(o.key for o in (await store.inner.list("pre/", delimiter=None)).objects) == [
            "pre/d/e/g", "pre/d/f"]
        assert await fs.read(h, 0, 100) == b"still readable"
        assert await fs.read(hg, 0, 100) == b"nested"
        d2 = await fs.mkdir(root, "d", 0o700, UID, GID)  # the name is free
        assert await listed_names(fs) == ["d"] and await listed_names(fs, d2) == []
        await fs.release(h)
        await fs.release(hg)
        assert sorted(o.key for o in (await store.inner.list("pre/", delimiter=None)).objects) == ["pre/d/"]
        assert fs.deferred_deletes.removed_dirs == set()
        fs.close()
        await store.aclose()

    trio.run(main)


def test_a_handle_writing_while_its_earlier_version_uploads_is_not_stale(tmp_path, cmk_path):
    """A handle writes while the upload of its earlier version is in flight: the
    upload is adopted as the committed version under the newer staged one, and the handle
    follows it (this mount's own versions reach its handles), so its later writes are not
    taken for a stale handle's (ESTALE), and the file ends with every write."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        node = await committed_file(fs, "f", b"zero")
        h = await fs.open(node, os.O_RDWR)
        await fs.write(h, 0, b"one ")

        async def write_meanwhile(inner, op, keys):
            await fs.write(h, 4, b"two ")
        fs.store.hook(("put_file", "put_bytes"), write_meanwhile, key="pre/f", count=1)
        assert await fs.commit.upload_node(node, raise_errors=True)  # one upload, as the scheduler's
        assert node.staged is not None and node.version is not None and h.version is node.version
        await fs.write(h, 8, b"three")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert await read_node(fs, node) == b"one two three"
        fs.close()

    trio.run(main)


def test_the_end_of_the_fuse_session_cancels_calls_that_change_nothing_and_lets_others_finish():
    """Operations.session_ended (the kernel ended the session: nobody can receive an answer)
    cancels a getattr waiting for the store at once, with EIO, and any such call started later;
    a mkdir, which changes the bucket, runs to its own end."""
    import types

    import pyfuse3

    from ossfuse.fuse_ops import Operations

    finished: list[str] = []

    class StuckFs:
        cfg = types.SimpleNamespace(mount=types.SimpleNamespace(attr_timeout=1.0, entry_timeout=1.0))

        def on_entry_moved(self, callback) -> None:
            pass

        def get(self, ino: int) -> object:
            return object()

        async def getattr(self, node):
            await trio.sleep_forever()  # a HEAD to a store that does not answer

        async def mkdir(self, parent, name, mode, uid, gid):
            await trio.sleep(0.3)  # a PUT that takes a while, then fails
            finished.append(name)
            raise FsError(errno.EEXIST)

    ops = Operations(StuckFs())  # type: ignore[arg-type]
    results: dict[str, object] = {}

    async def call(name: str, coro) -> None:
        try:
            results[name] = await coro
        except pyfuse3.FUSEError as e:
            results[name] = e.errno

    async def main() -> None:
        ctx = types.SimpleNamespace(umask=0o022, uid=UID, gid=GID)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "getattr", ops.getattr(1))
                nursery.start_soon(call, "mkdir", ops.mkdir(1, b"d", 0o755, ctx))
                await trio.sleep(0.05)
                start = trio.current_time()
                ops.session_ended()
                await trio.sleep(0)
                await trio.sleep(0)
                assert results == {"getattr": errno.EIO}  # at once, while the mkdir goes on
                assert trio.current_time() - start < 0.1
                await call("later getattr", ops.getattr(1))
        assert results == {"getattr": errno.EIO, "later getattr": errno.EIO, "mkdir": errno.EEXIST}
        assert finished == ["d"]

    trio.run(main)
