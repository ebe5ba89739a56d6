"""A directory rename that a crash cuts off (fs/renames.py) is undone or finished by the next
mount, in-process over the fault-injecting store: a trial killed the daemon 0.15 s into a
`mv` of 300 files and found both trees, with nothing said."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from fakes.core import GID, UID, committed_file, core_filesystem, read_node
from ossfuse.fs import FsError
from ossfuse.fs.renames import RenameLogs
from ossfuse.store.base import StoreError

FILES = {f"f{i}": os.urandom(1000 + i) for i in range(6)}


async def _crash(fs) -> None:
    """The daemon dies: nothing is flushed; the journal and the rename logs stay on disk."""
    fs.close()
    await fs.store.aclose()


async def _keys(fs) -> set[str]:
    page = await fs.store.inner.list("", delimiter=None)
    return {o.key for o in page.objects}


async def _tree(fs, parent_name: str) -> None:
    d = await fs.mkdir(fs.get(1), parent_name, 0o755, UID, GID)
    for name, data in FILES.items():
        await committed_file(fs, name, data, parent=d)


async def _read(fs, path: str) -> bytes:
    node = fs.get(1)
    for name in path.split("/"):
        node = await fs.lookup(node, name)
    return await read_node(fs, node)


def _logs(tmp_path) -> list[str]:
    return os.listdir(tmp_path / "cache" / "renames")


@pytest.mark.expect_log(r"ossfuse\.fs\.copying: copy of 'pre/d/f3'",
                        r"ossfuse\.fs\.copying: 'pre/e/f\d' was not deleted")
def test_a_rename_cut_off_while_copying_is_undone_at_the_next_mount(tmp_path, cmk_path):
    """Copies landed for some objects, not all: the next mount deletes the copies whose
    originals are still there, keeps one changed at the new name since, and puts back the
    marker of the empty directory the rename replaced (with its mode)."""

    async def crash():
        fs = core_filesystem(tmp_path, cmk_path)
        await _tree(fs, "d")
        await fs.mkdir(fs.get(1), "e", 0o700, UID, GID)  # the empty directory the rename replaces
        async def late_failure(inner, op, keys):  # the other copies land first
            await trio.sleep(0.1)
            raise StoreError("injected fault: copy of f3 after the others", key=keys[0])
        fs.store.hook("copy", late_failure, key="pre/d/f3")
        with pytest.raises(FsError) as e:
            await fs.rename(fs.get(1), "d", fs.get(1), "e", 0)
        assert e.value.errno == errno.EIO
        assert len(_logs(tmp_path)) == 1
        landed = sorted(k for k in await _keys(fs) if k.startswith("pre/e/f"))
        assert landed == [f"pre/e/{n}" for n in FILES if n != "f3"]
        await fs.store.inner.put_bytes(landed[0], b"changed at the new name", {})  # another client, meanwhile
        await _crash(fs)
        return landed[0]

    async def next_mount(changed: str):
        fs = core_filesystem(tmp_path, cmk_path)
        fs.recover()
        notices = await fs.settle_renames()
        assert notices == ["undid the rename of 'd' to 'e' that a crash cut off (the `mv` had failed); 1 object(s) "
                           "stay at the new name (changed there since, or their original is gone)"]
        assert await _keys(fs) == {"pre/d/", *(f"pre/d/{n}" for n in FILES), "pre/e/", changed}
        for name, data in FILES.items():
            assert await _read(fs, f"d/{name}") == data
        e = await fs.lookup(fs.get(1), "e")
        assert stat.S_ISDIR(e.mode) and stat.S_IMODE(e.mode) == 0o700
        assert _logs(tmp_path) == []
        await _crash(fs)

    trio.run(next_mount, trio.run(crash))


@pytest.mark.expect_log(r"injected fault: delete", r"ossfuse\.fs\.copying: deleting 'pre/d/f3'")
def test_a_rename_cut_off_while_deleting_is_finished_at_the_next_mount(tmp_path, cmk_path):
    """Every copy landed, some originals were deleted: the next mount deletes the others, and
    a file the journal recovered at the old name (closed, not uploaded yet) moves to the new
    name and uploads there."""
    staged = os.urandom(5000)

    async def crash():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)  # closes stay journaled
        await _tree(fs, "d")  # (uploaded: committed_file drains)
        d = await fs.lookup(fs.get(1), "d")
        node, h = await fs.create(d, "new", 0o640, os.O_WRONLY, UID, GID)
        await fs.write(h, 0, staged)
        await fs.flush(h)
        await fs.release(h)
        fs.store.fail("delete", key="pre/d/f3", count=None)
        with pytest.raises(FsError) as e:
            await fs.rename(fs.get(1), "d", fs.get(1), "e", 0)
        assert e.value.errno == errno.EIO
        keys = await _keys(fs)
        assert {f"pre/e/{n}" for n in FILES} <= keys and "pre/d/f3" in keys and "pre/d/new" not in keys
        await _crash(fs)

    async def next_mount():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        assert fs.recover() == 1
        assert await fs.settle_renames() == ["finished the rename of 'd' to 'e' that a crash cut off"]
        assert await fs.drain() == 0
        assert await _keys(fs) == {"pre/e/", *(f"pre/e/{n}" for n in FILES), "pre/e/new"}
        for name, data in {**FILES, "new": staged}.items():
            assert await _read(fs, f"e/{name}") == data
        assert stat.S_IMODE((await fs.lookup(await fs.lookup(fs.get(1), "e"), "new")).mode) == 0o640
        assert _logs(tmp_path) == []
        await _crash(fs)

    trio.run(crash)
    trio.run(next_mount)


def test_a_rename_log_is_read_up_to_a_torn_line_and_a_finished_rename_leaves_none(tmp_path, cmk_path):
    """A crash may cut the log's last line: the lines before it count. A rename that ends well
    removes its log."""
    logs = RenameLogs(str(tmp_path))
    entry = logs.begin("a", "b", {"pre/a/": "E1", "pre/a/x": "E2"}, None)
    entry.copied_to("pre/b/", "C1")
    entry.copied_to("pre/b/x", "C2")
    entry._file.write('{"deleting": tr')  # torn mid-line
    logs.leave(entry)
    (again,) = RenameLogs(str(tmp_path)).left
    assert (again.source, again.target, again.objects, again.copied, again.deleting) == \
        ("a", "b", {"pre/a/": "E1", "pre/a/x": "E2"}, {"pre/b/": "C1", "pre/b/x": "C2"}, False)
    os.unlink(again.path)
    entry = logs.begin("a", "b", {"pre/a/x": "E2"}, {"mode": "16877"})
    entry.copied_to("pre/b/x", "C2")
    entry.copies_done()
    entry._file.write('{"copied": "pre/b/y", "et')  # torn: a later line (none is written after line 3)
    logs.leave(entry)
    (again,) = RenameLogs(str(tmp_path)).left
    assert (again.copied, again.deleting, again.replaced) == ({"pre/b/x": "C2"}, True, {"mode": "16877"})
    os.unlink(again.path)

    async def main():
        fs = core_filesystem(tmp_path / "m", cmk_path)
        await _tree(fs, "d")
        await fs.rename(fs.get(1), "d", fs.get(1), "e", 0)
        assert _logs(tmp_path / "m") == []
        assert await _keys(fs) == {"pre/e/", *(f"pre/e/{n}" for n in FILES)}
        await _crash(fs)

    trio.run(main)
