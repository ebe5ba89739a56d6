"""Reproducers of defects tests/test_two_mounts_model.py found (a break-test trial, twenty-sixth
session): two Filesystem instances (own cache dirs) over one LocalStore bucket, attr_timeout =
entry_timeout = 0 (every lookup asks the store). Each failed on the code before its fix."""
from __future__ import annotations

import errno
import os
from dataclasses import replace

import pytest
import trio

from fakes.core import core_config
from fakes.fault_store import FaultStore
from ossfuse.fs import Filesystem, FsError
from ossfuse.keyring import Keyring
from ossfuse.store.local import LocalStore

UID, GID = 1, 2


def _mounts(tmp_path, cmk_path, upload_delay: float = 0.0):
    bucket = str(tmp_path / "bucket")
    os.makedirs(bucket)
    inner = LocalStore(bucket)
    fss = []
    keyring = None
    for m in ("m0", "m1"):
        cfg = core_config(tmp_path / m, cmk_path, upload_delay=upload_delay, attr_timeout=0.0, entry_timeout=0.0)
        cfg = replace(cfg, store=replace(cfg.store, url=f"local://{bucket}"))
        keyring = keyring or Keyring(cfg.encryption)
        fss.append(Filesystem(cfg, FaultStore(inner), keyring, uid=UID, gid=GID))
    return inner, fss


async def _walk(fs, path):
    node = fs.get(1)
    for n in path.split("/") if path else ():
        node = await fs.lookup(node, n)
    return node


async def _write_new(fs, path, data, mode=0o644):
    parent = await _walk(fs, path.rpartition("/")[0])
    node, h = await fs.create(parent, path.rpartition("/")[2], mode, os.O_RDWR | os.O_CREAT | os.O_EXCL, UID, GID)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    return node


async def _read(fs, path):
    node = await _walk(fs, path)
    h = await fs.open(node, os.O_RDONLY)
    try:
        return await fs.read(h, 0, 1 << 20)
    finally:
        await fs.release(h)


async def _keys(inner):
    return sorted(o.key for o in (await inner.list("pre/", delimiter=None)).objects
                  if ".ossfuse-integrity" not in o.key)


async def _rewrite(fs, path, data):
    node = await _walk(fs, path)
    h = await fs.open(node, os.O_RDWR)
    await fs.setattr(node, size=0, fh=h)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)


async def _close_and_check_kept(a, b, h, inner, theirs: bytes) -> None:
    """Close stale handle ``h`` of mount 1 (``b``); mount 0's version ``theirs`` must be in the
    bucket, whole; then close both mounts."""
    await b.flush(h)
    await b.release(h)
    contents = sorted([await _read(a, k[len("pre/"):]) for k in await _keys(inner)])
    assert theirs in contents, f"mount 0's version is lost: {contents}"
    for fs in (a, b):
        fs.close()


@pytest.mark.expect_log(r"was changed by another client")
def test_a_rename_over_a_version_this_mount_looked_up_makes_no_conflict_copy_after_its_own_chmod(tmp_path, cmk_path):
    """docs/semantics.md (Reading, "An upload never silently replaces..."): a rename over a name
    keeps the object there as a conflict copy when it "is not the version this mount's
    applications last opened (or, for a file never opened here, the version it knows ...)".
    Mount 0 never opens b; its chmod of b (a copy onto itself) makes it remember that version,
    and after mount 1 rewrites b and mount 0 looks b up (it knows mount 1's version now), mount
    0's rename of c over b still takes mount 1's version for an unseen foreign edit and keeps a
    spurious conflict copy of it."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(b, "b", b"one")
        await a.setattr(await _walk(a, "b"), mode=0o600)  # mount 0's chmod: a CopyObject
        await _rewrite(b, "b", b"two by mount 1")
        node = await _walk(a, "b")  # mount 0's lookup takes (knows) mount 1's version
        assert node.version.etag == (await inner.head("pre/b")).etag
        await _write_new(a, "c", b"three")
        await _walk(a, "b")  # the kernel's lookup of the rename's target
        await a.rename(a.get(1), "c", a.get(1), "b", 0)
        assert await _keys(inner) == ["pre/b"], "a conflict copy of a version this mount had looked up"
        for fs in (a, b):
            fs.close()
    trio.run(main)


def test_an_rmdir_that_fails_enotempty_writes_nothing(tmp_path, cmk_path):
    """An rmdir refused with ENOTEMPTY changes nothing (rmdir(2)). Mount 0 removes directory d
    while mount 1 has a new file d/c staged (mount 0 cannot see it); mount 1's close puts d/c,
    so d is an implicit directory (a key prefix, no marker object). Mount 1 makes d/e with a file
    in it; its rmdir of d/e fails ENOTEMPTY, and yet it has written d's marker 'pre/d/' (the
    marker an implicit directory gets "before this mount deletes or moves one of its children",
    docs/semantics.md, Namespace: here nothing was deleted). Found by the two-mount model."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await a.mkdir(a.get(1), "d", 0o755, UID, GID)
        dnode = await _walk(b, "d")
        _, h = await b.create(dnode, "c", 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL, UID, GID)
        await a.rmdir(a.get(1), "d")
        await b.flush(h)
        await b.release(h)
        assert await _keys(inner) == ["pre/d/c"]  # d is implicit now
        await b.mkdir(await _walk(b, "d"), "e", 0o755, UID, GID)
        await _write_new(b, "d/e/f", b"x")
        before = await _keys(inner)
        assert "pre/d/" not in before
        with pytest.raises(FsError) as e:
            await b.rmdir(await _walk(b, "d"), "e")
        assert e.value.errno == errno.ENOTEMPTY
        assert await _keys(inner) == before, "a failed rmdir wrote an object"
        for fs in (a, b):
            fs.close()
    trio.run(main)


@pytest.mark.expect_log(r"refused: this open file reads version")
def test_a_chmod_lets_a_stale_handle_write_onto_the_other_mounts_version(tmp_path, cmk_path):
    """docs/semantics.md, Reading (two mounts of one bucket): the first write through a handle
    to a file the other mount replaced after its open fails ESTALE "always once a lookup of this
    mount (ls -l, a stat, another open) has seen the other version ... a write is never merged
    onto the other client's content". Mount 1 opens c and reads it (its bytes are cached);
    mount 0 rewrites c; mount 1 chmods c (a lookup, which sees mount 0's version, then a copy
    onto itself). The write through the old handle then succeeds and is merged onto mount 0's
    content: the handle read b"one by mount 1", wrote b"x" at 0 and reads back b"xWO BY MOUNT
    0", which is also what the bucket keeps (no conflict copy). Without the chmod (lookup only)
    the write is ESTALE as documented."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(b, "c", b"one by mount 1")
        h = await b.open(await _walk(b, "c"), os.O_RDWR)
        assert await b.read(h, 0, 100) == b"one by mount 1"
        await _rewrite(a, "c", b"TWO BY MOUNT 0")
        await b.setattr(await _walk(b, "c"), mode=0o600)  # chmod c on mount 1 (its lookup sees mount 0's version)
        with pytest.raises(FsError) as e:  # (it was merged onto theirs: b"xWO BY MOUNT 0")
            await b.write(h, 0, b"x")
        assert e.value.errno == errno.ESTALE
        await _close_and_check_kept(a, b, h, inner, b"TWO BY MOUNT 0")
    trio.run(main)


@pytest.mark.expect_log(r"was changed by another client", r"refused: this open file reads version")
def test_ftruncate_through_a_stale_handle_truncates_the_other_mounts_version(tmp_path, cmk_path):
    """docs/semantics.md, Reading (two mounts): a change through a handle whose version the other
    mount replaced fails ESTALE "always once a lookup of this mount ... has seen the other
    version", "a write is never merged onto the other client's content"; and "truncate/chmod of
    a version the bucket no longer has give ESTALE". Mount 1 writes c and reopens it (reads it:
    its bytes are cached); mount 0 rewrites c; mount 1 looks c up (sees mount 0's version) and
    ftruncates through its old handle to 5 bytes. A write there is ESTALE, as documented; the
    ftruncate succeeds instead, and truncates mount 0's content: the handle, which read
    b"one by mount 1", now reads b"TWO B", and the bucket keeps b"TWO B" with no conflict copy:
    mount 0's b"TWO BY MOUNT 0 LONGER" is lost."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(b, "c", b"one by mount 1")
        h = await b.open(await _walk(b, "c"), os.O_RDWR)
        assert await b.read(h, 0, 100) == b"one by mount 1"
        await _rewrite(a, "c", b"TWO BY MOUNT 0 LONGER")
        await _walk(b, "c")  # a stat on mount 1: its lookup sees mount 0's version
        with pytest.raises(FsError) as e:
            await b.write(h, 0, b"x")  # as documented
        assert e.value.errno == errno.ESTALE
        with pytest.raises(FsError) as e:  # (it truncated theirs to b"TWO B")
            await b.setattr(h.node, size=5, fh=h)
        assert e.value.errno == errno.ESTALE
        await _close_and_check_kept(a, b, h, inner, b"TWO BY MOUNT 0 LONGER")
    trio.run(main)


@pytest.mark.expect_log(r"refused: this open file reads version")
def test_a_rename_lets_a_stale_handle_write_onto_the_other_mounts_version(tmp_path, cmk_path):
    """As test_a_chmod_lets_a_stale_handle_write_onto_the_other_mounts_version, with a rename:
    mount 1 opens c (reading nothing); mount 0 rewrites c; mount 1 looks c up (it sees mount 0's
    version) and renames c to a (the copy moves mount 0's version, as it should). The handle
    mount 1 opened on its own version follows the rename, and its first write succeeds and is
    merged onto mount 0's content: the bucket keeps b"xWO BY MOUNT 0" at a, no conflict copy.
    Documented: ESTALE "always once a lookup of this mount ... has seen the other version", "a
    write is never merged onto the other client's content" (docs/semantics.md, Reading)."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(b, "c", b"one by mount 1")
        h = await b.open(await _walk(b, "c"), os.O_RDWR)
        await _rewrite(a, "c", b"TWO BY MOUNT 0")
        await _walk(b, "c")
        with pytest.raises(FsError):  # the kernel's lookup of the rename's target: free
            await _walk(b, "a")
        await b.rename(b.get(1), "c", b.get(1), "a", 0)
        with pytest.raises(FsError) as e:  # (it was merged onto theirs at a: b"xWO BY MOUNT 0")
            await b.write(h, 0, b"x")
        assert e.value.errno == errno.ESTALE
        await _close_and_check_kept(a, b, h, inner, b"TWO BY MOUNT 0")
    trio.run(main)


@pytest.mark.expect_log(r"was changed by another client")
@pytest.mark.parametrize("reopen", ["O_TRUNC", "O_APPEND"])
def test_an_editors_save_over_a_file_this_mount_rewrote_keeps_the_other_mounts_later_edit(tmp_path, cmk_path,
                                                                                          reopen):
    """A break-test trial (twenty-seventh session), with upload_delay as over OSS: mount 0
    rewrites x (``echo A1 > x``: an open with O_TRUNC makes a staged version at once), its
    upload runs after the close; mount 1 then rewrites x (B2); mount 0's editor saves a
    temporary file over x. Mount 0's applications last saw A1, not B2: B2 is another client's
    edit and is kept as a conflict copy. It was lost, without a line: an open of a staged file
    recorded no version (the page cache's kernel_etag), and the upload after the last close
    did not record its own, so x counted as never opened here (Node.seen_etag now)."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path, upload_delay=1.0)
        await _write_new(a, "x", b"v0\n")
        await a.drain()
        node = await _walk(a, "x")
        h = await a.open(node, os.O_WRONLY | getattr(os, reopen))
        await a.write(h, 0 if reopen == "O_TRUNC" else 3, b"A1\n")
        await a.flush(h)
        await a.release(h)
        await a.drain()  # the upload after the close (a delayed upload: no handle open)
        await _rewrite(b, "x", b"B2\n")
        await b.drain()
        await _write_new(a, "x.tmp", b"A3\n")
        await _walk(a, "x")  # the kernel's lookup of the rename's target: it takes B2
        await a.rename(a.get(1), "x.tmp", a.get(1), "x", 0)
        await a.drain()
        contents = sorted([await _read(a, k[len("pre/"):]) for k in await _keys(inner)])
        assert contents == sorted([b"A3\n", b"B2\n"]), contents
        assert await _read(a, "x") == b"A3\n"
        for fs in (a, b):
            fs.close()
    trio.run(main)


def _land_first(store, op: str, key: str, write) -> list:
    """Make mount-side store ``op`` (``put_file`` or ``copy``) of ``key`` wait once for
    ``await write()`` (the other mount's write) before it goes out: a write that lands between
    the caller's HEAD and its own write, the window a one-round-trip race leaves. Returns the
    list the hook appends ``key`` to when it fired."""
    real = getattr(store, op)
    fired: list = []

    async def hooked(*args, **kwargs):
        if (args[1] if op == "copy" else args[0]) == key and not fired:
            fired.append(key)
            await write()
        return await real(*args, **kwargs)
    setattr(store, op, hooked)
    return fired


async def _check_name_and_copy(inner, fs, at_x: bytes, in_copy: bytes) -> None:
    """The bucket holds exactly x with ``at_x`` and one conflict copy of x with ``in_copy``."""
    keys = await _keys(inner)
    assert len(keys) == 2 and "pre/x" in keys, keys
    assert await _read(fs, "x") == at_x
    copy = next(k for k in keys if k != "pre/x")
    assert ".conflict-" in copy and await _read(fs, copy[len("pre/"):]) == in_copy


@pytest.mark.expect_log(r"was changed by another client")
def test_a_write_landing_between_an_uploads_head_and_its_put_is_kept(tmp_path, cmk_path):
    """Two mounts of one local bucket rewrite x within one round trip: mount 1's upload HEADs x
    (the version it started from, so no conflict), then mount 0's rewrite lands, then mount 1's
    PUT. Before, that PUT replaced mount 0's version with no copy and no log line (trial K: 2 %
    of racing saves in no file); the PUT now states the version it replaces, the local store
    refuses it, and mount 1's version goes to a conflict copy as for any foreign edit."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(a, "x", b"zero")
        await _walk(b, "x")
        fired = _land_first(b.store, "put_file", "pre/x", lambda: _rewrite(a, "x", b"mount 0's edit"))
        await _rewrite(b, "x", b"mount 1's edit")
        assert fired
        await _check_name_and_copy(inner, a, b"mount 0's edit", b"mount 1's edit")
        for fs in (a, b):
            fs.close()
    trio.run(main)


@pytest.mark.expect_log(r"was changed by another client")
def test_a_write_landing_between_a_renames_head_and_its_copy_is_kept(tmp_path, cmk_path):
    """An editor's save on mount 1 (write a temporary file, rename it over x) while mount 0
    rewrites x within the rename's round trip: the rename HEADs x (the version mount 1 knows),
    mount 0's edit lands, then the CopyObject. Before, the copy replaced mount 0's edit unseen;
    now the copy states the version it replaces, the local store refuses it, the rename keeps
    mount 0's edit as a conflict copy (the rename takes the name, as for any foreign edit
    found at the target) and copies again."""
    async def main():
        inner, (a, b) = _mounts(tmp_path, cmk_path)
        await _write_new(a, "x", b"zero")
        await _read(b, "x")
        await _write_new(b, "x.tmp", b"mount 1's save")
        fired = _land_first(b.store, "copy", "pre/x", lambda: _rewrite(a, "x", b"mount 0's edit"))
        await _walk(b, "x")  # the kernel's lookup of the rename's target
        await b.rename(b.get(1), "x.tmp", b.get(1), "x", 0)
        assert fired
        await _check_name_and_copy(inner, a, b"mount 1's save", b"mount 0's edit")
        for fs in (a, b):
            fs.close()
    trio.run(main)
