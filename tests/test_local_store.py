"""LocalStore specifics: private modes, refusal of directories others could change, no
symlinks followed, the durability contract (nothing fsynced but by sync()), a copy conditional
on the source version checked atomically with the commit (a copy onto itself touching only the
index), and freed bodies unlinked by a background thread."""
from __future__ import annotations

import errno
import functools
import os
import stat
import threading

import pytest
import trio

import ossfuse.store.local as local_mod
from ossfuse.store.base import PreconditionFailed, StoreError
from ossfuse.store.local import LocalStore


def trio_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))
    return wrapper


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@trio_test
async def test_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        root = tmp_path / "bucket"
        s = LocalStore(str(root))
        await s.put_bytes("a", b"x", {})
        uid = await s.create_multipart("m", {})
        await s.upload_part("m", uid, 1, b"part", {})
        await s.copy("a", "b")
    finally:
        os.umask(old)
    assert mode(root) == 0o700
    for sub in ("blobs", "uploads", "tmp"):
        assert mode(root / sub) == 0o700
    assert mode(root / "index.sqlite") == 0o600
    assert mode(root / "index.sqlite-wal") == 0o600
    blob_dirs = [root / "blobs" / d for d in os.listdir(root / "blobs")]
    assert blob_dirs and all(mode(d) == 0o700 for d in blob_dirs)
    blobs = [d / f for d in blob_dirs for f in os.listdir(d)]
    assert blobs and all(mode(b) == 0o600 for b in blobs)
    updir = root / "uploads" / uid
    assert mode(updir) == 0o700 and all(mode(updir / f) == 0o600 for f in os.listdir(updir))
    await s.aclose()


@trio_test
async def test_a_delete_of_a_named_version_keeps_another(tmp_path):
    """``delete(version=)`` checks the version in the delete's own transaction: a key another
    mount of this bucket wrote since the caller's HEAD keeps its new version (blob and row)."""
    s = LocalStore(str(tmp_path / "bucket"))
    v1 = await s.put_bytes("k", b"mine", {})
    v2 = await s.put_bytes("k", b"theirs", {})
    await s.delete("k", version=v1.etag)
    assert (await s.head("k")).etag == v2.etag
    assert await s.get_range("k", 0, 100) == b"theirs"
    await s.delete("k", version=v2.etag)
    assert await s.head("k") is None
    await s.aclose()


def test_older_loose_modes_are_tightened(tmp_path):
    root = tmp_path / "bucket"
    LocalStore(str(root))
    os.chmod(root, 0o755)
    os.chmod(root / "index.sqlite", 0o644)
    LocalStore(str(root))
    assert (mode(root), mode(root / "index.sqlite")) == (0o700, 0o600)


def test_refuses_a_directory_others_can_write(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(ValueError) as ei:
        LocalStore(str(root))
    msg = str(ei.value)
    assert str(root) in msg and "0777" in msg and f"chmod 700 {root}" in msg
    os.chmod(root, 0o770)
    with pytest.raises(ValueError, match="group or others may write"):
        LocalStore(str(root))
    assert not (root / "index.sqlite").exists()  # nothing created in it


def test_refuses_a_directory_of_another_user(tmp_path, monkeypatch):
    root = tmp_path / "bucket"
    root.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
        owner, me = 65534, 0
    else:
        owner, me = os.geteuid(), os.geteuid() + 1
        monkeypatch.setattr(local_mod.os, "geteuid", lambda: me)
    with pytest.raises(ValueError) as ei:
        LocalStore(str(root))
    msg = str(ei.value)
    assert str(root) in msg and f"owned by uid {owner}" in msg and f"uid {me}" in msg


def test_symlinks_inside_are_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root-only file")
    os.chmod(victim, 0o600)
    root = tmp_path / "bucket"
    root.mkdir(mode=0o700)
    (root / "index.sqlite").symlink_to(victim)
    with pytest.raises(ValueError, match="symlink"):
        LocalStore(str(root))
    assert victim.read_bytes() == b"root-only file" and mode(victim) == 0o600
    os.unlink(root / "index.sqlite")
    os.rmdir(root / "tmp")
    (root / "tmp").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        LocalStore(str(root))


@trio_test
async def test_planted_symlink_blob_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    s = LocalStore(str(tmp_path / "bucket"))
    await s.put_bytes("k", b"mine", {})
    row = s._row("k")
    path = s._blob_path(row[5])
    os.unlink(path)
    os.symlink(victim, path)
    with pytest.raises(StoreError):
        await s.get_range("k", 0, 10)
    await s.aclose()


@trio_test
async def test_writes_fsync_nothing_and_sync_is_a_syncfs_of_the_store(tmp_path, monkeypatch):
    """Issue 14, the durability contract of a local disk (docs/design.md "Durability"): put,
    copy and delete fsync nothing (each put paid a body, a directory and a WAL fsync) and the
    index commits with synchronous=NORMAL; ``sync()`` is one syncfs of the store's filesystem,
    and a reopened store (a crash of the process) has every change."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    syncfs: list[str] = []
    real_syncfs = local_mod._libc_syncfs

    def recording_syncfs(fd):
        syncfs.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_syncfs(fd)

    s = LocalStore(str(tmp_path / "bucket"))
    monkeypatch.setattr(local_mod.os, "fsync", recording_fsync)
    monkeypatch.setattr(local_mod, "_libc_syncfs", recording_syncfs)
    info = await s.put_bytes("k", b"data", {})
    src = tmp_path / "f"
    src.write_bytes(b"file body")
    await s.put_file("f", str(src), {}, may_link=True)
    await s.copy("k", "k2", if_match=info.etag)
    await s.copy("f", "f", {"mode": "644"})  # chmod: new metadata over the same body
    await s.delete("k")
    assert synced == [] and syncfs == []
    assert s._db().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    await s.sync()
    assert synced == [] and syncfs == [os.path.realpath(s.root)]
    await s.aclose()
    again = LocalStore(str(tmp_path / "bucket"))
    assert await again.head("k") is None
    assert await again.get_range("k2", 0, 10) == b"data"
    assert await again.get_range("f", 0, 20) == b"file body"
    assert (await again.head("f")).metadata == {"mode": "644"}
    await again.aclose()


def _blob_files(s: LocalStore) -> set[str]:
    return {n for _, _, names in os.walk(os.path.join(s.root, "blobs")) for n in names}


@trio_test
async def test_copy_onto_itself_changes_only_the_index_row(tmp_path, monkeypatch):
    """Issue 14 (rsync's and tar's chmod/utimens of a closed file are copies onto itself): the
    new version keeps the immutable body, no file is linked, renamed or removed; it has a new
    ETag, the old one no longer matches, and a reopened store (a daemon crash) has it."""
    s = LocalStore(str(tmp_path / "bucket"))
    v1 = await s.put_bytes("k", b"body", {"mode": "600"})
    blob = s._row("k")[5]
    touched: list[str] = []
    for name in ("link", "rename", "unlink", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(local_mod.os, name, lambda *a, _real=real, _name=name, **kw: (
            touched.append(_name), _real(*a, **kw))[1])
    v2 = await s.copy("k", "k", {"mode": "644"}, if_match=v1.etag)
    assert touched == [] and s._row("k")[5] == blob and s._unused == []
    assert v2.etag != v1.etag and v2.size == 4 and v2.metadata == {"mode": "644"}
    with pytest.raises(PreconditionFailed):
        await s.copy("k", "k", {"mode": "700"}, if_match=v1.etag)
    with pytest.raises(PreconditionFailed):
        await s.get_range("k", 0, 4, if_match=v1.etag)
    monkeypatch.undo()
    again = LocalStore(s.root)  # no close: as after a crash of the process
    info = await again.head("k")
    assert (info.etag, info.metadata) == (v2.etag, {"mode": "644"})
    assert await again.get_range("k", 0, 99, if_match=v2.etag) == b"body"
    await s.aclose()
    await again.aclose()


@trio_test
async def test_copy_onto_itself_of_a_source_replaced_meanwhile(tmp_path, monkeypatch):
    """The row is replaced between reading it and the metadata transaction: with if_match the
    copy fails and changes nothing; without, it gives the version now there the new metadata
    (never the old body's ETag over the new body, nor the reverse)."""
    s = LocalStore(str(tmp_path / "bucket"))
    v1 = await s.put_bytes("k", b"one", {"v": "1"})
    real_replace = LocalStore._replace_metadata
    armed = [True]

    def replace_after_foreign_write(self, key, blob, etag, size, meta):
        if armed:
            armed.clear()
            self._put_bytes(key, b"two!", {"v": "2"})
        return real_replace(self, key, blob, etag, size, meta)

    monkeypatch.setattr(LocalStore, "_replace_metadata", replace_after_foreign_write)
    with pytest.raises(PreconditionFailed):
        await s.copy("k", "k", {"v": "x"}, if_match=v1.etag)
    assert (await s.head("k")).metadata == {"v": "2"}
    armed.append(True)
    info = await s.copy("k", "k", {"v": "y"})
    assert info.size == 4 and (await s.head("k")).metadata == {"v": "y"}
    assert await s.get_range("k", 0, 99) == b"two!"
    await s.aclose()


@trio_test
async def test_a_copy_names_the_version_even_when_only_its_metadata_changed(tmp_path, monkeypatch):
    """A metadata change keeps the body (the same blob, a new ETag): another client's chmod
    landing between reading the source row and committing the copy must still fail a copy
    with if_match (onto itself and to another key), and never undo that chmod."""
    s = LocalStore(str(tmp_path / "bucket"))
    real_replace, real_commit_row = LocalStore._replace_metadata, LocalStore._commit_row
    armed: list[bool] = []

    def foreign_chmod(self, key):
        armed.clear()
        row = self._row(key)
        assert real_replace(self, key, row[5], row[2], row[1], {"mode": "600"}) is not None

    def replace(self, key, blob, etag, size, meta):
        if armed:
            foreign_chmod(self, key)
        return real_replace(self, key, blob, etag, size, meta)

    def commit_row(self, key, blob, size, meta, check=None):
        if armed and key == "dst":
            foreign_chmod(self, "src")
        return real_commit_row(self, key, blob, size, meta, check)

    monkeypatch.setattr(LocalStore, "_replace_metadata", replace)
    monkeypatch.setattr(LocalStore, "_commit_row", commit_row)
    v1 = await s.put_bytes("src", b"body", {"mode": "644"})
    armed.append(True)
    with pytest.raises(PreconditionFailed):
        await s.copy("src", "src", {"mode": "640"}, if_match=v1.etag)  # our chmod, theirs first
    assert (await s.head("src")).metadata == {"mode": "600"}
    v2 = await s.head("src")
    armed.append(True)
    with pytest.raises(PreconditionFailed):
        await s.copy("src", "dst", if_match=v2.etag)  # a rename's copy, their chmod first
    assert await s.head("dst") is None and (await s.head("src")).metadata == {"mode": "600"}
    await s.aclose()


@trio_test
async def test_unused_bodies_are_unlinked_by_a_background_thread(tmp_path, monkeypatch):
    """Issue 14 (rm -rf): a delete or a replacing put commits the index and returns; the body
    it freed is unlinked by a thread (not on the caller's loop), and aclose() finishes the
    queue. A copy to another name is a hard link: deleting the source keeps the copy's body."""
    s = LocalStore(str(tmp_path / "bucket"))
    on_loop: list[str] = []
    real_unlink = os.unlink
    loop_thread = threading.get_ident()

    def recording_unlink(path, *a, **kw):
        if threading.get_ident() == loop_thread:
            on_loop.append(path)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(local_mod.os, "unlink", recording_unlink)
    batches: list[int] = []
    real_reap = s.reap_unused_blobs

    def recording_reap():
        n = real_reap()
        if n:
            batches.append(n)
        return n

    monkeypatch.setattr(s, "reap_unused_blobs", recording_reap)
    monkeypatch.setattr(local_mod, "_REAP_BATCH_S", 0.5)  # long enough for the 21 frees below
    for i in range(20):
        await s.put_bytes(f"k{i}", b"x" * i, {})
    await s.copy("k1", "c1")
    await s.put_bytes("k2", b"replaced", {})
    for i in range(20):
        await s.delete(f"k{i}")
    assert on_loop == []
    for _ in range(500):  # the thread runs by itself
        # both: the files go before the reap call that removed them returns and is recorded (a
        # loaded machine can pause the thread in between: CI saw the files gone, no batch yet)
        if len(_blob_files(s)) == 1 and sum(batches) == 21:
            break
        await trio.sleep(0.01)
    assert _blob_files(s) == {s._row("c1")[5]} and await s.get_range("c1", 0, 9) == b"x"
    # in batches, not a thread wake-up (a GIL hand-off) per freed body
    assert sum(batches) == 21 and len(batches) <= 2, batches
    await s.put_bytes("c1", b"new", {})
    await s.aclose()  # finishes what is queued
    assert _blob_files(s) == {s._row("c1")[5]} and on_loop == []


@trio_test
async def test_an_empty_body_is_a_link_of_one_empty_file(tmp_path, monkeypatch):
    """A directory marker is an empty object written again at every mkdir, chmod and utime of
    its directory: its blob is a new hard link of the root's ``empty`` file, not a new file
    (bench/RESULTS.md, thirtieth session), and reads, copies, is replaced and is deleted as
    any other. The file is made again when missing and replaced at the link limit (EMLINK)."""
    s = LocalStore(str(tmp_path / "bucket"))
    empty = os.path.join(s.root, "empty")

    def inodes(*keys: str) -> set[int]:
        return {os.stat(s._blob_path(s._row(k)[5])).st_ino for k in keys}

    info = await s.put_bytes("d/", b"", {"mode": "16877"})
    await s.put_bytes("d/", b"", {"mode": "16832"})  # chmod of the directory: a new version
    await s.put_bytes("e/", b"", {})
    assert inodes("d/", "e/") == {os.stat(empty).st_ino} and os.stat(empty).st_size == 0
    assert (await s.head("d/")).metadata == {"mode": "16832"} and await s.get_range("d/", 0, 0) == b""
    with pytest.raises(PreconditionFailed):
        await s.get_range("d/", 0, 0, if_match=info.etag)  # the first version is gone
    await s.copy("d/", "f/")  # a directory rename's copy
    assert inodes("d/", "e/", "f/") == {os.stat(empty).st_ino}
    await s.put_bytes("e/", b"body", {})  # replaced by a body: a file of its own
    assert await s.get_range("e/", 0, 9) == b"body" and os.stat(empty).st_size == 0
    await s.aclose()
    assert os.stat(empty).st_nlink == 3  # itself, d/ and f/ (the replaced versions' links are gone)

    os.unlink(empty)  # missing (an older ossfuse's remove_orphans never looks at the root): made again
    await s.put_bytes("g/", b"", {})
    assert inodes("g/") == {os.stat(empty).st_ino} and inodes("d/") != inodes("g/")

    real_link = os.link
    full = {os.stat(empty).st_ino}

    def link_limited(src, dst, *a, **kw):  # the filesystem's link limit, on the current file
        if os.stat(src).st_ino in full:
            raise OSError(errno.EMLINK, "Too many links", src)
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(local_mod.os, "link", link_limited)
    await s.put_bytes("h/", b"", {})
    await s.copy("g/", "i/")  # the copy of an empty body links the (new) empty file too
    assert inodes("h/", "i/") == {os.stat(empty).st_ino} and not full & inodes("h/")
    monkeypatch.setattr(local_mod.os, "link", real_link)
    with open(empty, "ab") as f:  # someone writes into it (trial S): the next empty body gets a new one
        f.write(b"junk")
    written = os.stat(empty).st_ino
    await s.put_bytes("j/", b"", {})
    assert os.stat(empty).st_size == 0 and inodes("j/") == {os.stat(empty).st_ino} != {written}
    assert await s.get_range("j/", 0, 0) == b"" and await s.get_range("h/", 0, 0) == b""

    def no_links(src, dst, *a, **kw):  # a filesystem without hard links: a file per empty body
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(local_mod.os, "link", no_links)
    await s.put_bytes("k/", b"", {})
    assert os.stat(s._blob_path(s._row("k/")[5])).st_size == 0 and inodes("k/") != {os.stat(empty).st_ino}
    monkeypatch.setattr(local_mod.os, "link", real_link)
    for k in ("d/", "f/", "g/", "h/", "i/", "j/", "k/"):
        assert await s.get_range(k, 0, 1) == b""
        await s.delete(k)
    await s.aclose()
    assert _blob_files(s) == {s._row("e/")[5]} and s.remove_orphans() == 0


@trio_test
async def test_sync_reports_a_failing_disk(tmp_path, monkeypatch):
    """A syncfs error (EIO: the disk lost writes) is a StoreError naming the store."""
    s = LocalStore(str(tmp_path / "bucket"))

    def failing_syncfs(fd):
        local_mod.ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(local_mod, "_libc_syncfs", failing_syncfs)
    with pytest.raises(StoreError, match="syncfs"):
        await s.sync()
    await s.aclose()


@trio_test
async def test_copy_condition_is_checked_in_the_commit_transaction(tmp_path, monkeypatch):
    """The source is replaced after its blob was linked for the copy but before the copy is
    committed: the copy fails (if_match) and writes nothing; without if_match it copies the
    version it then finds, never a mix."""
    s = LocalStore(str(tmp_path / "bucket"))
    v1 = await s.put_bytes("src", b"version one", {"v": "1"})
    real_commit = LocalStore._commit
    real_commit_row = LocalStore._commit_row
    armed = [True]

    def commit_after_foreign_write(self, key, blob, size, meta, check=None):
        if armed and key == "dst":
            armed.clear()
            real_commit(self, "src", self._new_tmp_with(b"version two"), 11, {"v": "2"})
        return real_commit_row(self, key, blob, size, meta, check)

    def new_tmp_with(self, data):
        tmp = self._new_tmp()
        self._write_fsync(tmp, data)
        return tmp

    monkeypatch.setattr(LocalStore, "_commit_row", commit_after_foreign_write)
    monkeypatch.setattr(LocalStore, "_new_tmp_with", new_tmp_with, raising=False)
    with pytest.raises(PreconditionFailed):
        await s.copy("src", "dst", if_match=v1.etag)
    assert s._row("dst") is None
    assert os.listdir(os.path.join(s.root, "tmp")) == []
    s.reap_unused_blobs()  # the replaced body of src
    assert len([n for _, _, names in os.walk(os.path.join(s.root, "blobs")) for n in names]) == 1
    # no condition: the copy retries and copies the version now there, consistently
    armed.append(True)
    info = await s.copy("src", "dst")
    assert info.metadata == {"v": "2"} and await s.get_range("dst", 0, 99) == b"version two"
    await s.aclose()


def _fill(store: LocalStore, keys: list[str]) -> None:
    """Index rows without bodies (listing reads only the index)."""
    db = store._db()
    db.execute("BEGIN")
    db.executemany("INSERT INTO objects VALUES (?,0,'E',0,'{}','none')", [(k,) for k in keys])
    db.execute("COMMIT")


def _list_work(store: LocalStore, prefix: str) -> tuple[int, list[str], list[str]]:
    """(SQLite VM steps/100, object keys, common prefixes) of a full delimited listing."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0
    db = store._db()
    db.set_progress_handler(tick, 100)
    objects, prefixes, marker = [], [], None
    try:
        while True:
            page = store._list(prefix, "/", marker, 1000)
            objects += [o.key for o in page.objects]
            prefixes += page.prefixes
            marker = page.next_marker
            if not marker:
                return steps[0], objects, prefixes
    finally:
        db.set_progress_handler(None, 100)


def test_listing_subdirectories_does_not_read_their_contents(tmp_path):
    """Issue 14: each common prefix re-read up to 1,001 rows under it (``rsync`` of a tree
    spent minutes in ``_list``). A directory of 300 subdirectories of 200 entries each must
    cost about what 300 plain files cost, and list exactly the 300 prefixes and 5 files."""
    s = LocalStore(str(tmp_path / "b"))
    _fill(s, [f"d/sub{i:03d}/f{j:03d}" for i in range(300) for j in range(200)]
          + [f"d/file{i}" for i in range(5)] + [f"e/f{i:03d}" for i in range(305)] + ["d0", "dz/x"])
    deep, objects, prefixes = _list_work(s, "d/")
    assert prefixes == [f"d/sub{i:03d}/" for i in range(300)]
    assert objects == [f"d/file{i}" for i in range(5)]
    flat, flat_objects, _ = _list_work(s, "e/")
    assert len(flat_objects) == 305
    assert deep < 5 * flat + 50, (deep, flat)


@trio_test
async def test_small_writes_run_on_the_loop_and_wait_in_a_thread_for_a_locked_index(tmp_path, monkeypatch):
    """Issue 14: a small put, copy or delete (nothing fsynced) runs on the event loop, with
    no thread hand-off; while another process holds the index's write lock it does not wait
    on the loop but is done again in a worker thread, and the attempt leaves no blob behind."""
    import sqlite3
    s = LocalStore(str(tmp_path / "bucket"))
    threads = []
    real_run_sync = trio.to_thread.run_sync

    async def counting_run_sync(fn, *a, **kw):
        threads.append(getattr(fn, "__name__", fn))
        return await real_run_sync(fn, *a, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    src = tmp_path / "f"
    src.write_bytes(b"file body")
    a = await s.put_bytes("a", b"1", {})
    await s.put_file("f", str(src), {}, may_link=True)
    await s.copy("a", "a2", if_match=a.etag)
    await s.delete("a2")
    assert threads == []

    other = sqlite3.connect(os.path.join(s.root, "index.sqlite"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = []

    async def release_later():  # the loop keeps running while the writes wait
        for _ in range(5):
            ticks.append(trio.current_time())
            await trio.sleep(0.05)
        other.execute("COMMIT")
    async with trio.open_nursery() as n:
        n.start_soon(release_later)
        n.start_soon(s.put_bytes, "b", b"2", {})
        n.start_soon(s.delete, "a")
    other.close()
    assert len(ticks) == 5 and sorted(threads) == ["_delete", "_put_bytes"]
    assert await s.head("a") is None and await s.get_range("b", 0, 1) == b"2"
    s.reap_unused_blobs()  # the unlinks of replaced or deleted bodies, queued for a thread
    blobs = [n for _, _, names in os.walk(os.path.join(s.root, "blobs")) for n in names]
    assert len(blobs) == 2  # f and b: the attempts that found the index locked left none
    await s.aclose()


@trio_test
async def test_failed_writes_on_a_full_disk_leave_no_temporary_body(tmp_path, tmpfs):
    """A put, a part or a completion that fails with ENOSPC deletes its partial body from
    tmp/ (left there, it kept the disk full for every later write); a small write then fits."""
    root = tmpfs("bucket", 2 << 20)
    s = LocalStore(root)
    s.min_part_size = 1

    def leftovers() -> list[str]:
        tmp = os.listdir(os.path.join(root, "tmp"))
        parts = [n for _, _, names in os.walk(os.path.join(root, "uploads")) for n in names if n.endswith(".tmp")]
        return tmp + parts
    big = os.urandom(3 << 20)
    with pytest.raises(StoreError, match="No space left"):
        await s.put_bytes("a", big, {})
    assert leftovers() == []
    src = tmp_path / "big"
    src.write_bytes(big)
    with pytest.raises(StoreError, match="No space left"):
        await s.put_file("b", str(src), {})  # another disk: copied
    assert leftovers() == []
    upload = await s.create_multipart("c", {})
    with pytest.raises(StoreError, match="No space left"):
        await s.upload_part("c", upload, 1, big, {})
    assert leftovers() == []
    half = big[: 700 << 10]
    parts = [(n, await s.upload_part("c", upload, n, half, {})) for n in (1, 2)]
    with pytest.raises(StoreError, match="No space left"):
        await s.complete_multipart("c", upload, parts)  # the joined body does not fit beside its parts
    assert leftovers() == []
    await s.abort_multipart("c", upload)
    info = await s.put_bytes("d", b"small", {})
    assert info.size == 5 and await s.get_range("d", 0, 5) == b"small"
    await s.aclose()


def test_a_full_disk_is_enospc_not_a_failed_rollback(tmpfs):
    """Found by a trial: on a full bucket disk SQLite rolls a failed index write back by itself
    (SQLITE_FULL), and the store's own ROLLBACK then raised "cannot rollback - no transaction
    is active": that error replaced the cause, so a chmod, mkdir, rm or mv through the mount
    was EIO with that line instead of ENOSPC. The disk-full error is what comes out, and the
    object is unchanged."""
    from ossfuse.fs.errors import errno_of
    root = tmpfs("bucket", 1 << 20)

    async def main():
        s = LocalStore(root)
        first = await s.put_bytes("k", b"x", {"a": "1"})
        fd = os.open(os.path.join(root, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # every byte of the disk
            for size in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        for _attempt in range(2):  # (and again: nothing of the first is left half done)
            with pytest.raises(StoreError) as e:
                await s.copy("k", "k", {"a": "2", "big": "v" * 6000})  # a metadata change: index only
            assert errno_of(e.value) == errno.ENOSPC and "rollback" not in str(e.value), str(e.value)
        assert await s.head("k") == first
        os.unlink(os.path.join(root, "filler"))
        assert (await s.copy("k", "k", {"a": "2"})).etag != first.etag  # room again: it works

    trio.run(main)
