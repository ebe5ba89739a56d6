"""Every copy, rename and overwrite acts on the version (ETag) this mount knows (issue 12 A1,
A11, "from the field"): the Filesystem driven in-process over a local-directory bucket wrapped
in the fault store, whose foreign writer replaces an object between two calls."""
from __future__ import annotations

import errno
import logging
import os
import stat

import pytest
import trio

from fakes.core import core_filesystem, listed_names, read_node
from fakes.fault_store import FaultStore
from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
from ossfuse.fs import Filesystem, FsError
from ossfuse.fs.conflicts import conflict_key, conflict_name
from ossfuse.keyring import Keyring
from ossfuse.store.local import LocalStore


def _filesystem(tmp_path, cmk_path, store: FaultStore) -> Filesystem:
    return core_filesystem(tmp_path, cmk_path, store=store)


def _run(tmp_path, cmk_path, body):
    """Run ``await body(fs, store)`` with a fresh Filesystem over a FaultStore(LocalStore)."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))

    async def main():
        fs = _filesystem(tmp_path, cmk_path, store)
        try:
            await body(fs, store)
        finally:
            fs.close()
            await store.aclose()

    trio.run(main)


async def _write_file(fs, parent, name, data: bytes):
    node, h = await fs.create(parent, name, 0o644, os.O_WRONLY, 1, 2)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    assert node.staged is None  # small file, local bucket: uploaded at close
    return node


async def _read(fs, node) -> bytes:
    h = await fs.open(node, os.O_RDONLY)
    try:
        return await fs.read(h, 0, 1 << 20)
    finally:
        await fs.release(h)


@pytest.fixture
def other(tmp_path, cmk_path):
    """A factory of a second mount's Filesystem on the same bucket (its own cache dir)."""

    def make(store) -> Filesystem:
        return _filesystem(tmp_path / "other", cmk_path, FaultStore(store.inner))

    os.makedirs(tmp_path / "other", exist_ok=True)
    return make


async def _closed(fs, parent, name: str, data: bytes):
    """File ``name`` of ``parent`` created, written and closed (with an upload_delay: staged)."""
    node, h = await fs.create(parent, name, 0o644, os.O_WRONLY, 1, 2)
    await fs.write(h, 0, data)
    await fs.release(h)
    return node


async def _with_doc(tmp_path, cmk_path, store):
    """(fs, root) of a mount over ``store`` (upload_delay 3600 s: nothing uploads before a
    drain) whose bucket holds doc.txt ("base")."""
    fs = core_filesystem(tmp_path, cmk_path, store=store, upload_delay=3600.0)
    root = fs.get(1)
    await _closed(fs, root, "doc.txt", b"base")
    assert await fs.drain() == 0
    return fs, root


async def _other_writes(other_fs: Filesystem, name: str, data: bytes) -> str:
    """The other mount writes ``data`` over (or as) file ``name`` of its root; its ETag."""
    return await _other_writes_in(other_fs, other_fs.get(1), name, data)


async def _other_writes_in(other_fs: Filesystem, root, name: str, data: bytes) -> str:
    try:
        node = await other_fs.lookup(root, name)
        h = await other_fs.open(node, os.O_WRONLY | os.O_TRUNC)
        await other_fs.setattr(node, size=0, fh=h)
        await other_fs.write(h, 0, data)
        await other_fs.flush(h)
        await other_fs.release(h)
    except FsError as e:
        assert e.errno == errno.ENOENT
        node = await _write_file(other_fs, root, name, data)
    return node.version.etag


# -- A1: attribute copies are conditional on the known version ---------------------------------
@pytest.mark.expect_log(r"ossfuse\.fs\.copying: copy of")
def test_chmod_of_a_file_another_client_replaced_fails_estale_and_keeps_their_content(tmp_path, cmk_path, other,
                                                                                         caplog):
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"version 1 from A")
        h = await fs.open(node, os.O_RDONLY)  # A holds it open (fchmod)
        ofs = other(store)
        their_etag = await _other_writes(ofs, "f", b"version 2 from B, longer")
        assert their_etag != node.version.etag
        mode_before = node.mode
        with caplog.at_level(logging.WARNING, "ossfuse.fs.copying"):
            with pytest.raises(FsError) as e:
                await fs.setattr(node, mode=0o600, fh=h)
        assert e.value.errno == errno.ESTALE
        assert node.mode == mode_before  # not made
        line = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(line) == 1 and "'pre/f'" in line[0] and their_etag in line[0] and node.version.etag in line[0]
        await fs.release(h)
        # B's object is untouched: B (and anyone) still reads B's content
        info = await store.inner.head("pre/f")
        assert info.etag == their_etag and stat.S_IMODE(int(info.metadata["mode"])) == 0o644
        onode = await ofs.lookup(ofs.get(1), "f")
        assert await _read(ofs, onode) == b"version 2 from B, longer"
        # A revalidates: the next lookup sees B's version and reads B's content
        again = await fs.lookup(root, "f")
        assert again is node and node.version.etag == their_etag
        assert await _read(fs, node) == b"version 2 from B, longer"
        await fs.setattr(node, mode=0o600)  # now it is the known version: done
        assert stat.S_IMODE(int((await store.inner.head("pre/f")).metadata["mode"])) == 0o600
        ofs.close()

    _run(tmp_path, cmk_path, body)


# -- A1 for rename: the copy and the delete act on the known version -----------------------------
@pytest.mark.expect_log(r"ossfuse\.fs\.copying: copy of")
def test_rename_of_a_file_another_client_replaced_fails_estale_and_moves_nothing(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "a", b"ours")
        store.replace("pre/a", b"theirs", before="copy")  # written just before our copy
        with pytest.raises(FsError) as e:
            await fs.rename(root, "a", root, "b", 0)
        assert e.value.errno == errno.ESTALE
        assert await store.inner.head("pre/b") is None
        theirs = await store.inner.head("pre/a")
        assert await store.inner.get_range("pre/a", 0, 100) == b"theirs"
        assert (await fs.lookup(root, "a")).version.etag == theirs.etag  # revalidated
        assert node.path == "a"

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.copying:")
def test_rename_does_not_delete_a_source_rewritten_after_the_copy(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        await _write_file(fs, root, "a", b"ours")
        store.replace("pre/a", b"theirs", before="delete")  # written between our copy and delete
        store.replace("pre/a", b"theirs", before="head")  # (the HEAD-compare sees it)
        with pytest.raises(FsError) as e:
            await fs.rename(root, "a", root, "b", 0)
        assert e.value.errno == errno.ESTALE
        assert await store.inner.get_range("pre/a", 0, 100) == b"theirs"  # their version survives
        assert store.counts["delete"] == 0

    _run(tmp_path, cmk_path, body)


def test_directory_rename_does_not_relabel_cached_blocks_of_an_older_version(tmp_path, cmk_path, other):
    async def body(fs, store):
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        x = await _write_file(fs, d, "x", b"ours x")
        assert await _read(fs, x) == b"ours x"  # x's blocks of our version may be cached
        ofs = other(store)
        od = await ofs.lookup(ofs.get(1), "d")
        theirs = await _other_writes_in(ofs, od, "x", b"their x, longer")
        await fs.rename(root, "d", root, "e", 0)  # lists (and copies) their version of d/x
        assert (await store.inner.head("pre/e/x")).etag != x.version.etag or x.version.key == "pre/e/x"
        e = await fs.lookup(root, "e")
        ex = await fs.lookup(e, "x")
        assert ex is x
        assert await _read(fs, ex) == b"their x, longer"  # not our old bytes, not garbage
        assert theirs
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.copying:")
def test_directory_rename_keeps_a_file_rewritten_between_copy_and_delete(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        await _write_file(fs, d, "x", b"ours x")
        y = await _write_file(fs, d, "y", b"ours y")
        store.replace("pre/d/x", b"theirs x", before="head")  # lands after our copy, before our delete
        await fs.rename(root, "d", root, "e", 0)
        assert await store.inner.get_range("pre/d/x", 0, 100) == b"theirs x"  # kept at the old name
        assert await store.inner.head("pre/e/x") is not None  # ours moved
        assert await store.inner.head("pre/d/y") is None and await store.inner.head("pre/e/y") is not None
        e = await fs.lookup(root, "e")
        assert (await fs.lookup(e, "y")) is y and await _read(fs, y) == b"ours y"

    _run(tmp_path, cmk_path, body)


# -- A11: "cannot tell" is not "absent" ---------------------------------------------------------
@pytest.mark.expect_log(r"ossfuse\.fs\.resolve: lookup of")
def test_rename_fails_eio_when_the_destination_cannot_be_checked(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        await _write_file(fs, root, "a", b"a")
        await _write_file(fs, root, "b", b"b")
        fs.inodes.by_path["b"].checked_at = 0.0  # its attributes are stale: the rename asks
        before = {k: (await store.inner.head(k)).etag for k in ("pre/a", "pre/b")}
        store.fail("head", key="pre/b", error="temporary")
        with pytest.raises(FsError) as e:
            await fs.rename(root, "a", root, "b", 0)
        assert e.value.errno == errno.EIO
        assert {k: (await store.inner.head(k)).etag for k in ("pre/a", "pre/b")} == before  # nothing moved

    _run(tmp_path, cmk_path, body)


# -- foreign edits survive an upload: conflict copies -------------------------------------------
@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts:")
def test_upload_over_a_foreign_edit_keeps_both(tmp_path, cmk_path, other, caplog):
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "notes.txt", b"v1")
        h = await fs.open(node, os.O_WRONLY)
        await fs.write(h, 0, b"ours!")
        ofs = other(store)
        theirs = await _other_writes(ofs, "notes.txt", b"theirs")
        moved: list[tuple[int, str]] = []
        fs.on_entry_moved(lambda parent_ino, name: moved.append((parent_ino, name)))
        with caplog.at_level(logging.WARNING, "ossfuse.fs.conflicts"):
            await fs.flush(h)
            await fs.release(h)
        assert moved == [(1, "notes.txt")]  # the kernel's entry for the name goes (fuse_ops)
        assert await store.inner.get_range("pre/notes.txt", 0, 100) != b""  # theirs, encrypted
        assert (await store.inner.head("pre/notes.txt")).etag == theirs
        copies = [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects if "conflict" in o.key]
        assert len(copies) == 1 and copies[0].startswith("pre/notes.conflict-") and copies[0].endswith(".txt")
        warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warn) == 1 and theirs in warn[0] and copies[0] in warn[0]
        assert fs.commit.conflicts.status() == {"count": 1, "recent": [copies[0][len("pre/"):]]}
        # both readable: the name has theirs, the conflict copy ours
        assert await _read(fs, await fs.lookup(root, "notes.txt")) == b"theirs"
        cnode = await fs.lookup(root, copies[0][len("pre/"):])
        assert await _read(fs, cnode) == b"ours!"
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts:")
def test_new_file_created_elsewhere_meanwhile_is_not_overwritten(tmp_path, cmk_path, other):
    async def body(fs, store):
        root = fs.get(1)
        node, h = await fs.create(root, "new", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"ours")
        ofs = other(store)
        theirs = await _other_writes(ofs, "new", b"theirs")
        await fs.flush(h)
        await fs.release(h)
        assert (await store.inner.head("pre/new")).etag == theirs
        assert fs.commit.conflicts.count == 1 and fs.commit.conflicts.recent[0].startswith("new.conflict-")
        ofs.close()

    _run(tmp_path, cmk_path, body)


def test_new_files_upload_create_only_with_no_head(tmp_path, cmk_path):
    """A file this mount created is uploaded create-only (x-oss-forbid-overwrite): one PUT,
    no HEAD of its key first (issue 14: one request per new file, not two)."""
    async def body(fs, store):
        root = fs.get(1)
        for i in range(5):
            node, h = await fs.create(root, f"n{i}", 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, b"new %d" % i)
            store.calls.clear()
            await fs.flush(h)
            await fs.release(h)  # local bucket: uploaded at close
            assert node.staged is None
            assert [op for op, _ in store.calls] == ["put_file"], store.calls
        for i in range(5):
            assert await _read(fs, await fs.lookup(root, f"n{i}")) == b"new %d" % i

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts:")
def test_foreign_file_written_just_before_our_first_put_is_kept(tmp_path, cmk_path, other):
    """Another client creates the name after any check this mount could make and before its
    PUT lands (the window a HEAD-then-PUT left open): the create-only PUT is refused, theirs
    stays at the name and ours becomes a conflict copy."""
    async def body(fs, store):
        root = fs.get(1)
        ofs = other(store)
        theirs: list[str] = []

        async def foreign(inner, op, keys):
            theirs.append(await _other_writes(ofs, "race", b"theirs"))

        store.hook("put_file", foreign, key="pre/race", count=1)
        await _write_file(fs, root, "race", b"ours")
        assert (await store.inner.head("pre/race")).etag == theirs[0]
        assert fs.commit.conflicts.count == 1 and fs.commit.conflicts.recent[0].startswith("race.conflict-")
        copy = await fs.lookup(root, fs.commit.conflicts.recent[0])
        assert await _read(fs, copy) == b"ours"
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"upload of 'pre/lost' failed; the data stays staged")
def test_lost_answer_of_a_create_only_put_is_no_conflict(tmp_path, cmk_path):
    """The first create-only PUT lands but its answer is lost; the retry finds the key taken
    by that very version (same wrapped data key): no conflict copy, one object."""
    async def body(fs, store):
        root = fs.get(1)
        store.lose_response("put_file", key="pre/lost")
        node, h = await fs.create(root, "lost", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"ours")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert fs.commit.conflicts.count == 0
        keys = [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects]
        assert keys == ["pre/lost"], keys
        assert await _read(fs, await fs.lookup(root, "lost")) == b"ours"

    _run(tmp_path, cmk_path, body)


def test_upload_of_the_known_version_is_no_conflict(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"1")
        h = await fs.open(node, os.O_WRONLY)
        await fs.write(h, 0, b"2")
        await fs.flush(h)
        await fs.release(h)
        assert await _read(fs, node) == b"2" and fs.commit.conflicts.count == 0
        keys = [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects]
        assert keys == ["pre/f"]

    _run(tmp_path, cmk_path, body)


def test_conflict_name_keeps_the_extension_and_fits():
    t = 1_796_216_701  # 2026-12-02 13:05:01 UTC
    assert conflict_name("report.docx", "pc1", t) == "report.conflict-pc1-20261202-130501.docx"
    assert conflict_name("Makefile", "pc1", t) == "Makefile.conflict-pc1-20261202-130501"
    assert conflict_name("src.tar.gz", "pc1", t) == "src.conflict-pc1-20261202-130501.tar.gz"
    assert conflict_name("SRC.TAR.GZ", "pc1", t) == "SRC.conflict-pc1-20261202-130501.TAR.GZ"
    assert conflict_name(".tar.gz", "pc1", t) == ".tar.conflict-pc1-20261202-130501.gz"
    assert conflict_name("a.tar", "pc1", t) == "a.conflict-pc1-20261202-130501.tar"
    assert conflict_name(".bashrc", "pc1", t, 2) == ".bashrc.conflict-pc1-20261202-130501-2"
    # (a break-test trial: "..dots" became "..conflict-….dots")
    assert conflict_name("..dots", "pc1", t) == "..dots.conflict-pc1-20261202-130501"
    assert conflict_name(".config.json", "pc1", t) == ".config.conflict-pc1-20261202-130501.json"
    long = conflict_name("x" * 250 + ".txt", "pc1", t)
    assert len(long.encode()) <= 255 and long.endswith("-130501.txt")
    # an "extension" too long to stay beside the suffix is shortened with the stem (a trial: the
    # copy of x.éé… got a 280-byte name, which no listing shows)
    odd = conflict_name("x." + "é" * 125, "pc1", t)
    assert len(odd.encode()) <= 255 and odd.startswith("x.éé") and odd.endswith(".conflict-pc1-20261202-130501")
    # the whole key fits OSS's 1023 bytes: next to the file while its directory leaves room...
    deep = "pre/" + "/".join("d" * 200 for _ in range(4))  # 807 bytes
    key = conflict_key(deep + "/" + "f" * 200 + ".txt", "pre/", "pc1", t)
    assert key.startswith(deep + "/fff") and key.endswith("-130501.txt") and len(key.encode()) == 1023
    # ...else in the mount's root (a trial: a 1,013-byte key's copy was refused on every retry)
    deeper = deep + "/" + "e" * 190  # 998 bytes: no conflict suffix fits after it
    key = conflict_key(deeper + "/f.txt", "pre/", "pc1", t)
    assert key == "pre/f.conflict-pc1-20261202-130501.txt"
    with pytest.raises(ValueError):
        conflict_name("f.txt", "pc1", t, room=20)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts:")
def test_the_conflict_copy_of_a_file_deep_in_the_tree_fits_the_key_limit(tmp_path, cmk_path, other):
    """A file whose key is close to OSS's 1023 bytes, edited here and by another client: the
    copy of ours goes to the mount's root, where it fits, and is uploaded (a trial: its copy's
    key was 1,041 bytes, refused by the store on every retry and every mount, umount exit 75)."""
    async def body(fs, store):
        parent = fs.get(1)
        for name in ["d" * 200] * 4 + ["e" * 190]:
            parent = await fs.mkdir(parent, name, 0o755, 1, 2)
        node = await _write_file(fs, parent, "f.txt", b"v1")
        h = await fs.open(node, os.O_WRONLY)
        await fs.write(h, 0, b"ours!")
        ofs = other(store)
        odir = ofs.get(1)
        for name in ["d" * 200] * 4 + ["e" * 190]:
            odir = await ofs.lookup(odir, name)
        await _other_writes_in(ofs, odir, "f.txt", b"theirs")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0  # uploaded: nothing stays journaled
        copies = [o.key for o in (await store.inner.list("pre/", delimiter="/")).objects if "conflict" in o.key]
        assert len(copies) == 1 and copies[0].startswith("pre/f.conflict-") and copies[0].endswith(".txt")
        assert await _read(fs, await fs.lookup(fs.get(1), copies[0][len("pre/"):])) == b"ours!"
        ofs.close()

    _run(tmp_path, cmk_path, body)


def test_staged_file_renamed_over_a_known_file_replaces_it_without_a_conflict(tmp_path, cmk_path):
    """An editor's save: write a temp file, rename it over the document, then close."""
    async def body(fs, store):
        root = fs.get(1)
        await _write_file(fs, root, "doc", b"old")
        tmp, h = await fs.create(root, "doc.tmp", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"new text")
        await fs.rename(root, "doc.tmp", root, "doc", 0)  # staged, not uploaded yet
        await fs.flush(h)
        await fs.release(h)
        assert fs.commit.conflicts.count == 0
        assert [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects] == ["pre/doc"]
        assert await _read(fs, await fs.lookup(root, "doc")) == b"new text"

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.commit: upload of")
def test_an_upload_whose_answer_was_lost_is_not_a_conflict_with_itself(tmp_path, cmk_path):
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"1")
        fs.scheduler.delay = 3600
        h = await fs.open(node, os.O_WRONLY)
        await fs.write(h, 0, b"2" * 3_000_000)  # over the upload-at-close size: journaled
        await fs.flush(h)
        await fs.release(h)
        store.lose_response("put_file", key="pre/f")  # the PUT happens, its answer is lost
        assert not await fs.commit.upload_node(node, journal_first=False)  # one attempt
        assert await fs.commit.upload_node(node)  # tried again: finds its own first PUT
        assert fs.commit.conflicts.count == 0
        assert [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects] == ["pre/f"]

    _run(tmp_path, cmk_path, body)


def test_new_file_renamed_over_a_known_file_then_unlinked_leaves_no_old_object(tmp_path, cmk_path):
    """git: ``master.lock`` closed, renamed over ``master``, then ``pack-refs`` unlinks
    ``master`` before the upload (1 s upload_delay on OSS). The old ``master`` object must go
    with the name (it came back after a remount, and git saw the old commit); likewise when the
    new file moves on to another name before its upload."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))
    cfg = Config(path=str(tmp_path / "ossfuse.toml"),
                 store=StoreConfig(url=f"local://{tmp_path / 'bucket'}", prefix="pre/"),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)),
                 cache=CacheConfig(dir=str(tmp_path / "cache")), mount=MountConfig(upload_delay=600.0))

    async def write(fs, root, name, data, *, fsync):
        node, h = await fs.create(root, name, 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, data)
        if fsync:
            await fs.fsync(h)
        await fs.flush(h)
        await fs.release(h)
        return node

    async def keys():
        return [o.key for o in (await store.inner.list("pre/", delimiter=None)).objects]

    async def main():
        fs = Filesystem(cfg, store, Keyring(cfg.encryption), uid=1, gid=2)
        try:
            root = fs.get(1)
            for name in ("ref", "ref2"):
                assert (await write(fs, root, name, b"first", fsync=True)).staged is None
                assert (await write(fs, root, name + ".lock", b"second", fsync=False)).staged is not None
                await fs.rename(root, name + ".lock", root, name, 0)
            assert await keys() == ["pre/ref", "pre/ref2"]  # the old objects, still
            await fs.unlink(root, "ref")
            await fs.rename(root, "ref2", root, "moved", 0)
            assert await keys() == []
            await fs.drain()
            assert await keys() == ["pre/moved"]
            assert await _read(fs, await fs.lookup(root, "moved")) == b"second"
        finally:
            fs.close()
            await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.conflicts: 'pre/f' was changed by another client")
def test_later_versions_of_a_file_diverted_to_a_conflict_copy_go_to_that_copy(tmp_path, cmk_path):
    """Another client created f after this mount's create: our first upload (a shell
    redirect's early flush of the empty file) becomes a conflict copy; the writes and close
    that follow replace that copy, not a second one (two copies, one empty, in the trial of
    the ninth session). Theirs stays at the name and is never written: a lookup of the name
    in between (a file manager's) gave the node their version, and the next write of the
    open handle was merged onto their content and replaced it (break test, ninth session)."""
    async def body(fs, store):
        root = fs.get(1)
        node, h = await fs.create(root, "f", 0o644, os.O_WRONLY, 1, 2)
        await store.inner.put_bytes("pre/f", b"theirs", {})
        await fs.fsync(h)  # the empty version: a conflict copy
        theirs = await fs.lookup(root, "f")  # a file manager's look at the name: theirs
        assert theirs is not node and await _read(fs, theirs) == b"theirs"
        await fs.write(h, 0, b"mine")
        await fs.fsync(h)  # into that copy
        assert sorted(await listed_names(fs)) == ["f", node.path]
        await fs.write(h, 4, b", more")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        keys = sorted(o.key for o in (await store.inner.list("pre/", delimiter=None)).objects)
        assert len(keys) == 2 and keys[0] == "pre/f" and keys[1].startswith("pre/f.conflict-"), keys
        assert fs.commit.conflicts.count == 1
        copy = await fs.lookup(root, keys[1][len("pre/"):])
        assert copy is node and await _read(fs, copy) == b"mine, more"
        assert await _read(fs, await fs.lookup(root, "f")) == b"theirs"  # never merged onto theirs

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"'pre/[fg]' is both an object and a prefix; showing the object")
def test_removing_a_file_that_hid_a_directory_shows_the_directory_at_once(tmp_path, cmk_path):
    """A trial: keys ``f`` and ``f/child``; the listing shows the file; after ``rm f`` a stat
    said ENOENT (the name was noted absent) while ``ls`` showed ``f`` again, and ``cat
    f/child`` failed for entry_timeout. The directory is there at once now; also after ``mv``
    of the file (trial AA). Not covered: a prefix that appeared after the last listing (telling
    needs a LIST per unlink): its directory shows after entry_timeout, as another client's new
    directory does."""
    async def body(fs, store):
        await store.inner.put_bytes("pre/f", b"file", {})
        await store.inner.put_bytes("pre/f/child", b"below", {})
        root = fs.get(1)
        assert await listed_names(fs) == ["f"]
        assert not (await fs.lookup(root, "f")).is_dir
        await fs.unlink(root, "f")
        d = await fs.lookup(root, "f")
        assert d.is_dir
        assert await listed_names(fs) == ["f"]
        assert await read_node(fs, await fs.lookup(d, "child")) == b"below"
        await store.inner.put_bytes("pre/g", b"file", {})  # renamed away instead (trial AA)
        await store.inner.put_bytes("pre/g/child", b"below g", {})
        assert await listed_names(fs) == ["f", "g"]
        await fs.rename(root, "g", root, "g2", 0)
        assert (await fs.lookup(root, "g")).is_dir
        assert await listed_names(fs) == ["f", "g", "g2"]

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.objmeta: 'pre/(emk|dst)/' is a directory marker holding \d+ bytes",
                        r"ossfuse\.fs\.namespace: '(emk|dst)' is not empty: its directory marker 'pre/(emk|dst)/' holds "
                        r"data \(another client's\)")
def test_rmdir_of_a_directory_whose_marker_holds_data_keeps_it(tmp_path, cmk_path, caplog):
    """A trial: ``rmdir`` of a directory whose marker another client gave bytes deleted them
    (the listing shows no child; the marker's data is not shown). ENOTEMPTY and one WARNING
    naming it, as for any key listings do not show; a rename onto such a directory too. The
    marker's own WARNING is said once, not at every lookup and listing (seven lines in 5 s)."""
    async def body(fs, store):
        await store.inner.put_bytes("pre/emk/", b"marker payload", {})
        await store.inner.put_bytes("pre/dst/", b"x", {"mode": str(0o40755)})
        root = fs.get(1)
        for _ in range(2):
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "emk")
            assert e.value.errno == errno.ENOTEMPTY
        assert await store.inner.get_range("pre/emk/", 0, 100) == b"marker payload"
        await fs.mkdir(root, "src", 0o755, 1, 2)
        with pytest.raises(FsError) as e:
            await fs.rename(root, "src", root, "dst", 0)
        assert e.value.errno == errno.ENOTEMPTY
        assert await store.inner.get_range("pre/dst/", 0, 100) == b"x"
        for _ in range(3):
            await fs.lookup(root, "emk")
        await fs.mkdir(root, "plain", 0o755, 1, 2)  # an empty marker still goes
        await fs.rmdir(root, "plain")
        assert await store.inner.head("pre/plain/") is None

    with caplog.at_level(logging.WARNING):
        _run(tmp_path, cmk_path, body)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in said if "'pre/emk/' is a directory marker holding 14 bytes" in m]) == 1, said
    assert len([m for m in said if "'emk' is not empty" in m]) == 1, said
    assert len([m for m in said if "'dst' is not empty" in m]) == 1, said


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts: 'pre/doc\.txt' was changed by another client \(this mount knew "
                        r"version \S+, the bucket has \S+\) and a rename replaces it: theirs is kept as "
                        r"'pre/doc\.conflict-",
                        r"ossfuse\.fs\.conflicts: 'pre/new\.txt' was changed by another client \(this mount knew no "
                        r"object there")
def test_a_rename_over_a_name_another_client_rewrote_keeps_theirs_as_a_conflict_copy(tmp_path, cmk_path, other):
    """An editor's save (write a temporary file, rename it over the document) whose temporary
    file was already uploaded is a CopyObject onto the document: a trial lost another client's
    edit of the document made after this mount had looked. Theirs is kept as a conflict copy
    now (one WARNING), and the save takes the name; so for a name another client created
    where this mount saw none."""
    async def body(fs, store):
        root = fs.get(1)
        doc = await _write_file(fs, root, "doc.txt", b"base")
        ofs = other(store)
        theirs = await _other_writes(ofs, "doc.txt", b"CLIENT EDIT")
        assert doc.version.etag != theirs  # this mount still knows "base"
        await _write_file(fs, root, ".doc.txt.tmp", b"EDITOR SAVE")  # uploaded at close
        await fs.rename(root, ".doc.txt.tmp", root, "doc.txt", 0)
        assert await _read(fs, await fs.lookup(root, "doc.txt")) == b"EDITOR SAVE"
        names = await listed_names(fs)
        (copy,) = [n for n in names if n.startswith("doc.conflict-") and n.endswith(".txt")]
        assert sorted(names) == sorted(["doc.txt", copy])
        assert await _read(fs, await fs.lookup(root, copy)) == b"CLIENT EDIT"
        # a name this mount saw free, created by the other client since: kept too
        with pytest.raises(FsError):
            await fs.lookup(root, "new.txt")
        await _other_writes(ofs, "new.txt", b"THEIR NEW FILE")
        await _write_file(fs, root, "mine", b"MINE")
        await fs.rename(root, "mine", root, "new.txt", 0)
        assert await _read(fs, await fs.lookup(root, "new.txt")) == b"MINE"
        (copy2,) = [n for n in await listed_names(fs) if n.startswith("new.conflict-")]
        assert await _read(fs, await fs.lookup(root, copy2)) == b"THEIR NEW FILE"
        # a rename over a version this mount knows makes no copy and no extra object
        await fs.rename(root, copy2, root, "new.txt", 0)
        assert sorted(await listed_names(fs)) == sorted(["doc.txt", copy, "new.txt"])
        # an editor read the document, another client rewrote it, and the save's own lookup
        # took their version (its attributes had expired): nobody here read it, so it is kept
        doc = await fs.lookup(root, "doc.txt")
        assert await _read(fs, doc) == b"EDITOR SAVE"
        (await ofs.lookup(ofs.get(1), "doc.txt")).checked_at = 0.0  # the other client sees the save
        await _other_writes(ofs, "doc.txt", b"CLIENT EDIT 2")
        doc.checked_at = 0.0  # (the attribute cache time passed)
        assert (await fs.lookup(root, "doc.txt")).size == len(b"CLIENT EDIT 2")
        await _write_file(fs, root, ".doc.txt.tmp", b"EDITOR SAVE 2")
        await fs.rename(root, ".doc.txt.tmp", root, "doc.txt", 0)
        assert await _read(fs, await fs.lookup(root, "doc.txt")) == b"EDITOR SAVE 2"
        copies = [n for n in await listed_names(fs) if n.startswith("doc.conflict-") and n != copy]
        assert len(copies) == 1 and await _read(fs, await fs.lookup(root, copies[0])) == b"CLIENT EDIT 2"
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.namespace: rename of 'pre/c' refused: this mount knows version",
                        r"ossfuse\.fs\.conflicts: 'pre/b' was changed by another client \(this mount knew no object",
                        r"ossfuse\.fs\.conflicts: 'pre/Y/f' was changed by another client \(this mount knew no object",
                        r"ossfuse\.fs\.namespace: 'pre/b' is open and was unlinked, and a new file takes its name, but "
                        r"could not be kept readable")
def test_a_rename_keeps_theirs_only_if_it_happens_also_under_a_pending_delete_and_in_a_directory(
        tmp_path, cmk_path, other):
    """Trial findings on the conflict copies of renames: a rename whose source another client
    changed too made the copy, was refused, and made a second one at the kernel's retry (now:
    ESTALE, no copy); a name whose unlinked version's DELETE was pending took no check (the
    other client's new object there was replaced); a directory renamed to a name this mount
    saw free replaced the files another client had put below it."""
    async def body(fs, store):
        root = fs.get(1)
        ofs = other(store)
        await _write_file(fs, root, "c", b"C")
        await _write_file(fs, root, "d", b"D")
        await _other_writes(ofs, "c", b"C2")
        await _other_writes(ofs, "d", b"D2")
        with pytest.raises(FsError) as e:
            await fs.rename(root, "c", root, "d", 0)
        assert e.value.errno == errno.ESTALE
        assert sorted(await listed_names(fs)) == ["c", "d"]  # no conflict copy
        assert await _read(fs, await fs.lookup(root, "d")) == b"D2"
        # b unlinked while open: its DELETE waits for the close; another client writes b
        a = await _write_file(fs, root, "a", b"A")
        b = await _write_file(fs, root, "b", b"B")
        h = await fs.open(b, os.O_RDONLY)
        await fs.unlink(root, "b")
        await _other_writes(ofs, "b", b"THEIR B")  # (it replaces the unlinked version: h goes stale)
        await fs.rename(root, "a", root, "b", 0)
        await fs.release(h)
        assert await _read(fs, await fs.lookup(root, "b")) == b"A" and a.path == "b"
        (copy,) = [n for n in await listed_names(fs) if n.startswith("b.conflict-")]
        assert await _read(fs, await fs.lookup(root, copy)) == b"THEIR B"
        # a directory renamed to a name this mount saw free: the other client's file below is kept
        x = await fs.mkdir(root, "X", 0o755, 1, 2)
        await _write_file(fs, x, "f", b"MINE")
        with pytest.raises(FsError):
            await fs.lookup(root, "Y")
        y = await ofs.mkdir(ofs.get(1), "Y", 0o755, 1, 2)
        await _write_file(ofs, y, "f", b"THEIRS")
        await fs.rename(root, "X", root, "Y", 0)
        y = await fs.lookup(root, "Y")
        names = await listed_names(fs, y)
        (ycopy,) = [n for n in names if n.startswith("f.conflict-")]
        assert sorted(names) == sorted(["f", ycopy])
        assert await _read(fs, await fs.lookup(y, "f")) == b"MINE"
        assert await _read(fs, await fs.lookup(y, ycopy)) == b"THEIRS"
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.conflicts: 'pre/f' was changed by another client \(this mount started "
                        r"from version \S+, the bucket has \S+\): kept theirs, ours is uploaded as 'pre/f\.conflict-")
@pytest.mark.parametrize("when", ["first part", "last part"])  # (the Complete's own round trip stays open)
def test_another_clients_write_during_a_multipart_replacement_is_kept(tmp_path, cmk_path, when):
    """Found by a trial: the mount replaced a file by a multipart upload (60 MiB over a slow
    store) and another client's version written while the parts went up was overwritten,
    silently: the check was one HEAD before the first part. It is checked again before the
    Complete: theirs stays at the name, ours becomes a conflict copy (one WARNING), and the
    aborted upload leaves no parts behind."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))
    store.local_disk = False  # as on OSS: a big file goes up in parts
    big = os.urandom(350_000)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, store=store, multipart_threshold=150_000, part_size=102_400,
                             part_workers=1)
        root = fs.get(1)
        node, h = await fs.create(root, "f", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"base")
        await fs.release(h)
        assert await fs.drain() == 0
        h = await fs.open(node, os.O_WRONLY | os.O_TRUNC)
        await fs.write(h, 0, big)
        await fs.flush(h)
        await fs.release(h)
        # another client writes f while our parts go up: before the first, or after the last
        parts = 0

        async def theirs(inner, op, keys):
            nonlocal parts
            parts += 1
            if parts == (1 if when == "first part" else 4):  # (350,000 bytes: 4 parts)
                await inner.put_bytes("pre/f", b"THEIRS", {})

        store.hook("upload_part", theirs, when="before" if when == "first part" else "after")
        assert await fs.drain() == 0
        assert store.counts["create_multipart"] == 2 and store.counts["abort_multipart"] == 1
        assert await store.inner.get_range("pre/f", 0, 100) == b"THEIRS"  # theirs stays at the name
        names = await listed_names(fs)
        (copy,) = [n for n in names if n.startswith("f.conflict-")]
        assert sorted(names) == sorted(["f", copy])
        assert await _read(fs, await fs.lookup(root, copy)) == big[:1 << 20]
        assert fs.commit.conflicts.count == 1
        assert await store.inner.list_multipart_uploads("pre/") == []
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"ossfuse\.fs\.objmeta: 'pre/m/' is a directory marker holding 6 bytes")
def test_chmod_and_touch_of_a_directory_keep_its_markers_data_and_fields(tmp_path, cmk_path):
    """Another client's directory marker may hold bytes and fields of its own: chmod and utime
    of the directory copy it onto itself with the new attributes (a trial: a PUT of an empty
    marker dropped both); a marker this mount made is rewritten with one PUT and no HEAD."""
    async def body(fs, store):
        await store.inner.put_bytes("pre/m/", b"DATA-m", {"owner": "alice", "mode": str(0o40755)})
        await store.inner.put_bytes("pre/m/f", b"x", {})
        root = fs.get(1)
        m = await fs.lookup(root, "m")
        await fs.setattr(m, mode=0o700)
        await fs.setattr(m, mtime_ns=978_307_200 * 10**9)
        info = await store.inner.head("pre/m/")
        assert await store.inner.get_range("pre/m/", 0, 100) == b"DATA-m"
        assert info.metadata["owner"] == "alice" and int(info.metadata["mode"]) & 0o7777 == 0o700
        assert info.metadata["mtime"].startswith("978307200")
        new = await fs.mkdir(root, "n", 0o755, 1, 2)
        store.calls.clear()
        await fs.setattr(new, mode=0o711)
        assert [op for op, _ in store.calls] == ["put_bytes"], store.calls
        assert int((await store.inner.head("pre/n/")).metadata["mode"]) & 0o7777 == 0o711

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts: 'pre/doc\.txt' was changed by another client \(this mount knew "
                        r"version \S+, the bucket has \S+\) and a rename replaces it: theirs is kept as "
                        r"'pre/doc\.conflict-")
def test_an_editors_save_of_a_temp_file_not_yet_uploaded_keeps_the_other_clients_edit(tmp_path, cmk_path, other):
    """A trial (two mounts): an editor on this mount read doc.txt, the other mount rewrote it,
    and the save (a new temp file, not uploaded yet, renamed over doc.txt) replaced their edit
    with no conflict copy and no warning: the rename's own lookup had taken their version as
    the one this mount knew. Theirs is kept as a conflict copy, the save takes the name."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))

    async def main():
        fs, root = await _with_doc(tmp_path, cmk_path, store)
        doc = await fs.lookup(root, "doc.txt")
        assert await _read(fs, doc) == b"base"  # the editor reads it
        ofs = other(store)
        theirs = await _other_writes(ofs, "doc.txt", b"CLIENT EDIT")
        doc.checked_at = 0.0  # (the attribute cache time passed)
        assert (await fs.lookup(root, "doc.txt")).version.etag == theirs  # the save's lookup
        tmp = await _closed(fs, root, ".doc.txt.tmp", b"EDITOR SAVE")
        assert tmp.staged is not None  # not uploaded yet
        await fs.rename(root, ".doc.txt.tmp", root, "doc.txt", 0)
        assert await fs.drain() == 0
        names = await listed_names(fs)
        (copy,) = [n for n in names if n.startswith("doc.conflict-") and n.endswith(".txt")]
        assert sorted(names) == sorted(["doc.txt", copy])
        assert await _read(fs, await fs.lookup(root, "doc.txt")) == b"EDITOR SAVE"
        assert await _read(fs, await fs.lookup(root, copy)) == b"CLIENT EDIT"
        assert fs.commit.conflicts.count == 1
        ofs.close()
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"'pre/doc\.txt' was changed by another client")
def test_a_save_diverted_to_a_conflict_copy_leaves_no_pending_delete_behind(tmp_path, cmk_path, other):
    """Trial T: an editor's save (a temp file renamed over doc.txt, not uploaded yet) records
    the pending delete of the version it replaces, which its upload ends by overwriting it.
    Another client wrote doc.txt before that upload, so ours went to a conflict copy: the
    record stayed (no overwrite came, and nothing retried it), and an unmount with the store
    away then said the version was still seen by other clients, exit 75. Their version
    replaced it as surely as ours would have: the record goes with the conflict copy."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))

    async def main():
        fs, root = await _with_doc(tmp_path, cmk_path, store)
        base = (await fs.lookup(root, "doc.txt")).version.etag
        await _closed(fs, root, ".doc.txt.tmp", b"EDITOR SAVE")
        await fs.rename(root, ".doc.txt.tmp", root, "doc.txt", 0)
        assert fs.deferred_deletes.recorded() == [("pre/doc.txt", base, None)]  # ends when the upload overwrites it
        ofs = other(store)
        theirs = await _other_writes(ofs, "doc.txt", b"CLIENT EDIT")
        assert await fs.scheduler.drain() == 0  # the uploads only (drain() retries pending deletes too)
        assert fs.commit.conflicts.count == 1
        assert fs.deferred_deletes.recorded() == [] and not fs.deferred_deletes.pending
        assert (await store.head("pre/doc.txt")).etag == theirs
        ofs.close()
        fs.close()
        await store.aclose()

    trio.run(main)


def test_create_without_o_excl_opens_a_file_another_client_made_meanwhile(tmp_path, cmk_path, other):
    """A two-mount trial: this mount saw no `f`, the other made it, and `echo >> f` here
    failed EEXIST (the kernel, trusting its negative entry, sends CREATE; POSIX gives EEXIST
    only with O_EXCL). Now the existing file is opened, its mode checked for the caller."""
    async def body(fs, store):
        root = fs.get(1)
        with pytest.raises(FsError):
            await fs.lookup(root, "f")
        ofs = other(store)
        await _other_writes(ofs, "f", b"from B\n")
        await ofs.setattr(await ofs.lookup(ofs.get(1), "f"), mode=0o640)
        fs.names._absent.clear()  # (the entry time passed: the kernel still trusts its negative entry)
        node, h = await fs.create(root, "f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 1, 2)
        assert node.lookups == 1
        await fs.write(h, node.size, b"from A\n")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert await _read(fs, await fs.lookup(root, "f")) == b"from B\nfrom A\n"
        with pytest.raises(FsError) as e:  # O_EXCL: EEXIST as ever
            await fs.create(root, "f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 1, 2)
        assert e.value.errno == errno.EEXIST
        before = node.lookups
        with pytest.raises(FsError) as e:  # another user, to whom mode 0640 gives no write
            await fs.create(root, "f", 0o644, os.O_WRONLY | os.O_CREAT, 5, 5)
        assert e.value.errno == errno.EACCES and node.lookups == before  # no count left behind
        node, h = await fs.create(root, "f", 0o644, os.O_RDONLY | os.O_CREAT, 5, 2)  # its group reads
        assert await fs.read(h, 0, 100) == b"from B\nfrom A\n"
        await fs.release(h)
        with pytest.raises(FsError) as e:  # not in group 2: mode 0640 gives nothing
            await fs.create(root, "f", 0o644, os.O_RDONLY | os.O_CREAT, 5, 5, lambda: {7, 9})
        assert e.value.errno == errno.EACCES
        node, h = await fs.create(root, "f", 0o644, os.O_RDONLY | os.O_CREAT, 5, 5, lambda: {7, 2})
        assert await fs.read(h, 0, 100) == b"from B\nfrom A\n"  # group 2 among its supplementary groups
        await fs.release(h)
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts: 'pre/r[12]' was changed by another client \(this mount knew no "
                        r"object there")
def test_a_rename_onto_a_name_the_kernel_took_for_free_keeps_what_another_client_made_there(
        tmp_path, cmk_path, other):
    """A two-mount trial: this mount saw no r1 (the kernel keeps that negative entry), the
    other mount created r1, and a rename onto r1 here replaced it silently: only the rename's
    own probe had found it, so it counted as known. A destination the kernel does not know is
    another client's: kept as a conflict copy, for an uploaded source and a new one alike."""
    async def body(fs, store):
        root = fs.get(1)
        for name in ("r1", "r2"):
            with pytest.raises(FsError):
                await fs.lookup(root, name)
        ofs = other(store)
        await _other_writes(ofs, "r1", b"from B 1")
        await _other_writes(ofs, "r2", b"from B 2")
        fs.names._absent.clear()  # (this mount's entry time passed; the kernel's negative entry did not)
        await _write_file(fs, root, "src_uploaded", b"from A 1")
        await fs.rename(root, "src_uploaded", root, "r1", 0)
        names = await listed_names(fs)
        (c1,) = [n for n in names if n.startswith("r1.conflict-")]
        assert await _read(fs, await fs.lookup(root, "r1")) == b"from A 1"
        assert await _read(fs, await fs.lookup(root, c1)) == b"from B 1"
        ofs.close()

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts: 'pre/r2' was changed by another client \(this mount knew no "
                        r"object there")
def test_a_new_file_renamed_onto_a_name_the_kernel_took_for_free_keeps_theirs(tmp_path, cmk_path, other):
    """As above, with a source not uploaded yet (its upload would replace what the rename's
    probe found, as known): theirs is kept as a conflict copy at the rename."""
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, store=store, upload_delay=3600.0)
        root = fs.get(1)
        with pytest.raises(FsError):
            await fs.lookup(root, "r2")
        ofs = other(store)
        await _other_writes(ofs, "r2", b"from B 2")
        fs.names._absent.clear()
        node, h = await fs.create(root, "src", 0o644, os.O_WRONLY | os.O_CREAT, 1, 2)
        await fs.write(h, 0, b"from A 2")
        await fs.release(h)
        await fs.rename(root, "src", root, "r2", 0)
        assert await fs.drain() == 0
        names = await listed_names(fs)
        (c2,) = [n for n in names if n.startswith("r2.conflict-")]
        assert await _read(fs, await fs.lookup(root, "r2")) == b"from A 2"
        assert await _read(fs, await fs.lookup(root, c2)) == b"from B 2"
        ofs.close()
        fs.close()
        await store.aclose()

    trio.run(main)


def test_the_supplementary_groups_of_a_caller_come_from_proc():
    """What the FUSE adapter hands ``Filesystem.create`` for the mode check: this process's
    supplementary groups as os.getgroups() gives them; none for a task that is gone."""
    from ossfuse.fuse_ops import supplementary_groups
    assert supplementary_groups(os.getpid()) == frozenset(os.getgroups())
    assert supplementary_groups(2**22 + 1) == frozenset()  # above pid_max's ceiling: no such task


@pytest.mark.expect_log(r"'pre/f' was replaced while open")
def test_a_read_that_finds_its_version_replaced_makes_the_next_open_ask_the_store(tmp_path, cmk_path, other):
    """A trial: a reader's handle hit ESTALE (another client replaced the file); closing and
    opening the path again within attr_timeout gave the gone version again, and ESTALE on its
    next read. That read now marks the attributes stale: the next open gets the new version."""
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"version 1")
        h = await fs.open(node, os.O_RDONLY)
        ofs = other(store)
        await _other_writes(ofs, "f", b"version 2, longer")
        assert fs.resolver.attrs_fresh(node)  # within attr_timeout
        with pytest.raises(FsError) as e:
            await fs.read(h, 0, 100)
        assert e.value.errno == errno.ESTALE
        await fs.release(h)
        assert await _read(fs, await fs.lookup(root, "f")) == b"version 2, longer"
        ofs.close()

    _run(tmp_path, cmk_path, body)


async def _bucket_names(store) -> list[str]:
    """The file names in the bucket (what another client would list), sorted."""
    return sorted(o.key[len("pre/"):] for o in (await store.inner.list("pre/", delimiter=None)).objects
                  if ".ossfuse-integrity" not in o.key)


def _destination_changed(op, key):
    from ossfuse.store.base import DestinationChanged
    return DestinationChanged(f"injected: {op} {key!r} found another version there")


@pytest.mark.expect_log(r"upload of 'pre/f' failed; the data stays staged and will be retried: the object changed "
                        r"under 4 uploads in a row")
def test_an_upload_refused_four_times_in_a_row_waits_and_then_lands(tmp_path, cmk_path):
    """The upload's limit (conflicts._REFUSALS_MAX): a PUT refused because the name changed
    under it is HEADed and sent again; the fourth refusal in a row ends that attempt (the
    version stays journaled, one log line) and the next attempt lands it. Nothing lost,
    no conflict copy (the HEADs kept finding the version this mount started from)."""
    async def body(fs, store):
        root = fs.get(1)
        node = await _write_file(fs, root, "f", b"version 1")
        rule = store.fail("put_file", key="pre/f", error=_destination_changed, count=4)
        h = await fs.open(node, os.O_WRONLY | os.O_TRUNC)
        await fs.write(h, 0, b"version 2")
        await fs.flush(h)
        await fs.release(h)
        assert rule.hits == 4 and node.staged is not None  # kept for the next attempt
        assert await fs.drain() == 0
        assert rule.hits == 4 and node.staged is None
        assert await _read(fs, await fs.lookup(root, "f")) == b"version 2"
        assert await _bucket_names(store) == ["f"]

    _run(tmp_path, cmk_path, body)


@pytest.mark.expect_log(r"refused: another client kept writing 'pre/dst' \(4 times in a row\)")
@pytest.mark.parametrize("refusals", [3, 4])
def test_a_rename_copy_refused_up_to_three_times_lands_and_a_fourth_gives_estale(tmp_path, cmk_path, refusals,
                                                                                 caplog):
    """The rename's limit (namespace._COPY_REFUSALS): a copy refused because the target changed
    under it checks the target again and copies again; three refusals in a row still rename,
    the fourth gives ESTALE with one WARNING, and neither name changes."""
    async def body(fs, store):
        root = fs.get(1)
        await _write_file(fs, root, "src", b"new content")
        await _write_file(fs, root, "dst", b"old content")
        rule = store.fail("copy", key="pre/dst", error=_destination_changed, count=refusals)
        if refusals <= 3:
            await fs.rename(root, "src", root, "dst", 0)
            assert await _read(fs, await fs.lookup(root, "dst")) == b"new content"
            assert await _bucket_names(store) == ["dst"]
        else:
            with pytest.raises(FsError) as e:
                await fs.rename(root, "src", root, "dst", 0)
            assert e.value.errno == errno.ESTALE
            assert await _read(fs, await fs.lookup(root, "src")) == b"new content"
            assert await _read(fs, await fs.lookup(root, "dst")) == b"old content"
            assert await _bucket_names(store) == ["dst", "src"]
        assert rule.hits == refusals

    with caplog.at_level(logging.INFO):
        _run(tmp_path, cmk_path, body)
    refused = [r for r in caplog.records if "refused: another client kept writing" in r.getMessage()]
    assert len(refused) == (refusals > 3)


@pytest.mark.parametrize("theirs", [b"version 2, longer than the first one", b"v2"])
def test_an_open_within_attr_timeout_of_another_clients_save_reads_theirs_over_oss(tmp_path, cmk_path, other, theirs):
    """Over OSS an open that reads asks for the first block it lacks without If-Match and
    awaits it: within attr_timeout of another client's save the open takes their version
    (larger or smaller) and reads it whole, with that one GET and nothing more (a trial:
    ESTALE at the first read, ~90 % of the reads right after another mount's save)."""
    async def body(fs, store):
        store.local_disk = False  # OSS's path: reads through the block cache
        root = fs.get(1)
        ofs = other(store)
        await _other_writes(ofs, "f", b"version 1 of f")
        node = await fs.lookup(root, "f")
        assert node.version.held and node.version.size == len(b"version 1 of f")
        await _other_writes(ofs, "f", theirs)
        assert fs.resolver.attrs_fresh(node)  # within attr_timeout: the version it knows
        store.reset_counts()
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery  # as the daemon's supervisor: the GET's bytes are cached there
            fs.cache.start(nursery)
            h = await fs.open(node, os.O_RDONLY)
            assert h.version is node.version and node.current_size == len(theirs) and not h.keep_cache
            # the FUSE adapter drops the kernel's size, and so does every open until it has
            # (a trial: a second reader's open came while the first one's drop was under way,
            # found no change of its own, and its fstat gave the old size)
            assert fs.kernel_size_stale(node)
            h2 = await fs.open(node, os.O_RDONLY)
            assert fs.kernel_size_stale(node)
            fs.kernel_size_dropped(node)
            assert await fs.read(h, 0, 1 << 20) == theirs and await fs.read(h2, 0, 1 << 20) == theirs
            await fs.release(h)
            await fs.release(h2)
            h3 = await fs.open(node, os.O_RDONLY)
            assert not fs.kernel_size_stale(node)
            await fs.release(h3)
            nursery.cancel_scope.cancel()
        assert dict(store.counts) == {"get_range_with_info": 1}
        ofs.close()

    _run(tmp_path, cmk_path, body)
