"""Correctness leftovers of a break test and a review (crashsafe): unlink and rename wait for an
upload of the same file with no lock held; rmdir of a directory whose only entry is an
unlinked open file; what a write through a handle opened before another mount's commit gets.
In-process over the fault-injecting store (tests/fakes/core.py)."""
from __future__ import annotations

import errno
import os

import pytest
import trio

from fakes.core import GID, UID, core_filesystem, exists
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
            await trio.sleep(0.2)
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
    A file open for writing without changes, or only for reading, is not named."""
    from ossfuse.daemon import _open_writers, _warn_open_writers

    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        store = fs.store
        root = fs.get(1)
        c, hc = await fs.create(root, "clean", 0o644, os.O_RDWR, UID, GID)
        await fs.write(hc, 0, b"closed")
        await fs.flush(hc)
        await fs.release(hc)
        assert await fs.drain() == 0
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
        for h in (hw, hv, hc, hr):
            await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)
