"""The split-out parts of the filesystem driven directly, without a kernel: the pure codecs,
the errno table, the journal, and a Filesystem round trip over a local-directory bucket."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from fakes.core import core_config, core_filesystem, listed_names
from ossfuse import envelope as env
from ossfuse.cache import TruncatedObject
from ossfuse.cmk import CmkUnavailable, KeyMissing
from ossfuse.config import Config
from ossfuse.fs import Filesystem, FsError
from ossfuse.fs.errors import errno_of
from ossfuse.fs.model import FileHandle, Node
from ossfuse.fs.naming import Naming
from ossfuse.fs.objmeta import AttrDefaults, fmt_mtime, parse_mtime
from ossfuse.fs.readahead import READAHEAD_MAX, fetch_until
from ossfuse.store.base import NoSuchKey, ObjectInfo, PreconditionFailed, StoreError
from ossfuse.writeback import journal
from ossfuse.writeback.staging import Staging


def test_mtime_codec():
    assert fmt_mtime(1_700_000_000_000_000_000) == "1700000000"
    assert fmt_mtime(1_700_000_000_000_000_005) == "1700000000.000000005"
    assert parse_mtime("1700000000.5") == 1_700_000_000_500_000_000
    assert parse_mtime(" 12 ") == 12_000_000_000
    assert parse_mtime("x") is None and parse_mtime(None) is None and parse_mtime("") is None


@pytest.mark.expect_log(r"'p/f' has x-oss-meta-gid 'bad', not a number")
def test_attrs_from_info_defaults_and_umask():
    d = AttrDefaults(uid=1000, gid=100, umask=0o022, create_umask=0)
    info = ObjectInfo("p/f", 3, "E", 1.5, {})
    assert d.attrs_from_info(info, False) == (stat.S_IFREG | 0o644, 1000, 100, 1_500_000_000)
    info = ObjectInfo("p/f", 3, "E", 1.5, {"mode": str(stat.S_IFREG | 0o600), "uid": "7", "gid": "bad",
                                           "mtime": "2"})
    assert d.attrs_from_info(info, False) == (stat.S_IFREG | 0o600, 7, 100, 2_000_000_000)
    assert d.attrs_from_info(None, True)[0] == stat.S_IFDIR | 0o755
    masked = AttrDefaults(uid=0, gid=0, umask=0o077, create_umask=0o077)
    assert masked.attrs_from_info(ObjectInfo("k", 0, "E", 0, {"mode": str(stat.S_IFREG | 0o666)}), False)[0] \
        == stat.S_IFREG | 0o600


def test_new_names_must_make_oss_keys():
    n = Naming("pre/")
    assert (n.key("a/b"), n.dir_key("a"), n.dir_key(""), n.path_of("pre/x"), n.path_of("other")) == \
        ("pre/a/b", "pre/a/", "pre/", "x", None)
    n.check_new_path("a/" + "x" * 255)
    with pytest.raises(FsError) as e:
        n.check_new_path("x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FsError) as e:
        n.check_new_path("d/" * 510 + "f")  # names short, key over 1023 bytes
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(FsError) as e:
        n.check_new_path("bad\udcff")
    assert e.value.errno == errno.EINVAL


def test_errno_table():
    assert errno_of(PreconditionFailed("x")) == errno.ESTALE
    assert errno_of(NoSuchKey("x")) == errno.ESTALE
    assert errno_of(KeyMissing("x")) == errno.EACCES
    assert errno_of(CmkUnavailable("x")) == errno.EIO
    assert errno_of(env.EnvelopeError("x")) == errno.EIO
    assert errno_of(TruncatedObject("x")) == errno.EIO
    assert errno_of(StoreError("x")) == errno.EIO
    assert errno_of(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errno_of(OSError(errno.EMFILE, "the daemon's")) == errno.ENFILE  # not the caller's own table
    assert errno_of(OSError("no errno")) == errno.EIO
    for err in (errno.ENOTDIR, errno.ENOENT, errno.EACCES):  # the daemon's own files: not the caller's
        assert errno_of(OSError(err, "a damaged cache dir")) == errno.EIO
    assert errno_of(OSError(errno.EROFS, "cache disk")) == errno.EROFS
    assert errno_of(FsError(errno.EEXIST)) == errno.EEXIST
    assert errno_of(ValueError()) == errno.EIO


def test_readahead_window_grows_on_sequential_reads_and_resets_on_seek():
    h = FileHandle(1, Node(2, "f", stat.S_IFREG, 0, 0, 0, 0), None)
    block = 1 << 20
    assert fetch_until(h, 0, 4096, block) == 4096  # first read: no window yet
    assert fetch_until(h, 4096, 4096, block) == 8192 + block
    assert fetch_until(h, 8192, 4096, block) == 12288 + 2 * block
    for _ in range(10):
        fetch_until(h, h.last_end, 4096, block)
    assert h.window == READAHEAD_MAX
    assert fetch_until(h, 0, 4096, block) == 4096 and h.window == 0


class _Xor:
    """A stand-in envelope: crypt() is its own inverse, so ciphertext on disk differs from the
    plaintext and reads give it back."""

    def crypt(self, offset, data):
        return bytes(b ^ 0x5A for b in data)


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.journal: unsaved changes of a file whose name was not "
                        r"recorded \(work file .*, 4 bytes, .*are deleted")
def test_journal_record_and_read_back(tmp_path):
    staging = Staging(str(tmp_path))
    st = staging.new(_Xor())
    st.write(0, b"hello")
    unjournaled = staging.new(_Xor())
    unjournaled.write(0, b"lost")
    assert not st.was_journaled
    with pytest.raises(ValueError):
        journal.record(st, "pre/f", {"k": "v"})  # only a sealed version is journaled
    st.seal()
    journal.record(st, "pre/f", {"k": "v"})
    assert st.was_journaled and st.journaled_record["generation"] == st.generation
    mtime = os.path.getmtime(st.journal_path)
    journal.record(st, "pre/f", {"k": "v"})  # the same record again: nothing written
    assert os.path.getmtime(st.journal_path) == mtime
    st.close()
    unjournaled.close()
    entries, quarantined = journal.read_journal(staging)
    assert quarantined == 0
    assert [(e.key, e.metadata, e.staged.size) for e in entries] == [("pre/f", {"k": "v"}, 5)]
    entries[0].staged.envelope = _Xor()
    assert entries[0].staged.read(0, 5) == b"hello"
    assert not os.path.exists(unjournaled.work_path)  # never journaled: deleted at recovery
    assert sorted(os.listdir(staging.dir)) == [st.id + ".data", st.id + ".json"]


def _config(tmp_path, cmk_path) -> Config:
    return core_config(tmp_path, cmk_path)


def _filesystem(tmp_path, cmk_path) -> Filesystem:
    return core_filesystem(tmp_path, cmk_path)


def test_filesystem_round_trip_without_a_kernel(tmp_path, cmk_path):
    async def main():
        fs = _filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        node, h = await fs.create(d, "f", 0o644, os.O_WRONLY, 1, 2)
        assert node.lookups == 1 and node in fs.dirty
        assert await fs.write(h, 0, b"secret data") == 11
        await fs.flush(h)  # small file on a local bucket: uploaded by close itself
        await fs.release(h)
        assert fs.dirty == set() and fs.stats["uploaded"] == 1
        info = await fs.store.head("pre/d/f")
        assert info.size == 11 and env.is_encrypted(info.metadata)
        assert await fs.store.get_range("pre/d/f", 0, 11) != b"secret data"  # ciphertext in the bucket
        await fs.rename(d, "f", root, "g", 0)
        assert await fs.store.head("pre/d/f") is None
        g = await fs.lookup(root, "g")
        assert g is node and g.lookups == 2
        h = await fs.open(g, os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"secret data"
        await fs.release(h)
        await fs.unlink(root, "g")
        with pytest.raises(FsError) as e:
            await fs.lookup(root, "g")
        assert e.value.errno == errno.ENOENT
        fs.forget(node.ino, 2)
        assert node.ino not in fs.inodes.nodes
        await fs.store.aclose()
        fs.close()

    trio.run(main)


def test_setgid_directory_passes_its_group_on_in_the_bucket(tmp_path, cmk_path):
    """In a set-group-ID directory a new file takes the directory's group and a new directory
    its S_ISGID bit too (Linux's inode_init_owner()), in the object metadata as on the node."""
    async def main():
        fs = _filesystem(tmp_path, cmk_path)
        d = await fs.mkdir(fs.get(1), "d", 0o2770, 1, 7)
        assert (d.gid, stat.S_IMODE(d.mode)) == (7, 0o2770)
        sub = await fs.mkdir(d, "sub", 0o750, 1, 2)
        node, h = await fs.create(sub, "f", 0o640, os.O_WRONLY, 1, 2)
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        plain = await fs.mkdir(fs.get(1), "plain", 0o750, 1, 2)
        assert [(n.gid, stat.S_IMODE(n.mode)) for n in (sub, node, plain)] == [(7, 0o2750), (7, 0o640), (2, 0o750)]
        meta = (await fs.store.head("pre/d/sub/")).metadata
        assert (meta["gid"], int(meta["mode"]) & 0o7777) == ("7", 0o2750)
        assert (await fs.store.head("pre/d/sub/f")).metadata["gid"] == "7"
        await fs.store.aclose()
        fs.close()

    trio.run(main)


def test_journaled_file_is_uploaded_by_the_next_mount(tmp_path, cmk_path):
    async def crash_after_close():
        fs = _filesystem(tmp_path, cmk_path)
        fs.scheduler.delay = 3600  # nothing uploads before the "crash"
        node, h = await fs.create(fs.get(1), "f", 0o600, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"x" * 3_000_000)  # over the upload-at-close size: journaled
        await fs.flush(h)
        await fs.release(h)
        assert node.staged.was_journaled and fs.stats["uploaded"] == 0
        fs.close()
        await fs.store.aclose()

    async def next_mount():
        fs = _filesystem(tmp_path, cmk_path)
        assert fs.recover() == 1
        assert await fs.drain() == 0
        assert fs.stats == {"uploaded": 1, "upload_failures": 0, "recovered": 1, "quarantined": 0,
                            "aborted_uploads": 0}
        node = await fs.lookup(fs.get(1), "f")
        assert stat.S_IMODE(node.mode) == 0o600
        h = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h, 2_999_990, 100) == b"x" * 10
        await fs.release(h)
        assert os.listdir(fs.staging.dir) == []
        fs.close()
        await fs.store.aclose()

    trio.run(crash_after_close)
    trio.run(next_mount)


@pytest.mark.expect_log(r"'pre/config' was changed by another client")
def test_conflict_check_knows_the_last_object_its_own_upload_put(tmp_path, cmk_path):
    """Conflicts.upload of a new file (base: nothing) to a key where this mount's own last
    upload put an object replaces it (no conflict copy: that is no foreign edit; git's
    config.lock over config while config's first upload was in flight); once another client
    has written the key, the same upload goes to a conflict copy."""
    from fakes.core import committed_file, core_filesystem
    from ossfuse.fs.objmeta import file_metadata

    async def staged_new_file(fs, name: str, data: bytes):
        node, h = await fs.create(fs.get(1), name, 0o600, os.O_RDWR, 1, 2)
        await fs.write(h, 0, data)
        async with node.lock:
            await fs.commit.seal(node)
        return node, h, file_metadata(node, node.staged.envelope.wrapped, node.staged.size)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        store = fs.store
        await committed_file(fs, "config", b"first")
        node, h, meta = await staged_new_file(fs, "lock1", b"second")
        info = await fs.commit.conflicts.upload(node, node.staged, "pre/config", meta)
        assert info.key == "pre/config" and fs.commit.conflicts.count == 0  # our own object: replaced
        await store.inner.put_bytes("pre/config", b"theirs", {})  # another client's edit
        node2, h2, meta2 = await staged_new_file(fs, "lock2", b"third")
        info2 = await fs.commit.conflicts.upload(node2, node2.staged, "pre/config", meta2)
        assert info2.key.startswith("pre/config.conflict-") and fs.commit.conflicts.count == 1
        assert await store.inner.get_range("pre/config", 0, 100) == b"theirs"
        for handle in (h, h2):
            await fs.release(handle)
        fs.close()
        await store.aclose()

    trio.run(main)


def test_staged_in_reads_only_the_directory_asked_about():
    """UploadScheduler.staged_in answers from an index of dirty nodes by directory (review A15:
    it scanned every dirty node of the mount for each readdir, rmdir and lookup listing), and
    the index follows renames (``moved``)."""
    from ossfuse.fs.naming import parent_of
    from ossfuse.writeback.scheduler import UploadScheduler

    class Item:
        reads = 0

        def __init__(self, path):
            self._path, self.unlinked, self.staged = path, False, object()

        @property
        def path(self):
            Item.reads += 1
            return self._path

    async def never(node, closed_only):
        raise AssertionError("no upload in this test")

    sched = UploadScheduler(never, delay=0, retry_interval=1, workers=1)
    many = [Item(f"big/f{i}") for i in range(1000)]
    for n in many:
        sched.mark_dirty(n)
    small = Item("small/x")
    sched.mark_dirty(small)
    Item.reads = 0
    assert sched.staged_in("small", parent_of) == [small]
    assert Item.reads <= 2  # one node looked at, not 1001
    mover = many[0]
    mover._path = "small/moved"
    sched.moved(mover)
    assert sorted(n.path for n in sched.staged_in("small", parent_of)) == ["small/moved", "small/x"]
    assert len(sched.staged_in("big", parent_of)) == 999
    sched.mark_clean(small)
    assert [n.path for n in sched.staged_in("small", parent_of)] == ["small/moved"]
    small.unlinked = True
    assert sched.staged_in("", parent_of) == []


def test_the_drain_tries_again_what_a_pass_left_while_passes_make_progress():
    """Unmount's drain: a file whose upload failed early in the pass (the store down) is tried
    again once a later upload of the same pass succeeded (the store came back); a pass that
    uploads nothing ends it (a store still down, or a file it refuses)."""
    from ossfuse.writeback.scheduler import UploadScheduler

    class Item:  # the node fields the scheduler uses (its module doc)
        def __init__(self, path):
            self.path, self.staged, self.unlinked = path, object(), False
            self.upload_queued, self.queued_at, self.dirty_since = False, 0.0, 0.0

    def node(path):
        return Item(path)
    attempts: list[str] = []

    async def upload(n, closed_only):
        assert closed_only is False  # the drain stores what open writers wrote so far
        attempts.append(n.path)
        # "early" failed while the store was down, "late" went up once it was back (in
        # whatever order the pass takes them); "refused" fails every time
        if n.path == "refused" or (n.path == "early" and attempts.count("early") == 1):
            return False
        n.staged = None
        sched.mark_clean(n)
        return True

    async def main():
        for n in (node("early"), node("late"), node("refused")):
            sched.mark_dirty(n)
        assert await sched.drain() == 1
    sched = UploadScheduler(upload, delay=0, retry_interval=1, workers=1)
    trio.run(main)
    # pass 1: early fails, late succeeds, refused fails; pass 2: early succeeds, refused fails;
    # pass 3: refused fails again, no progress: the drain ends with it pending
    assert sorted(attempts) == ["early", "early", "late", "refused", "refused", "refused"], attempts


@pytest.mark.expect_log(r"refusing to replace 'pre/(f1|f2)': no configured CMK can read it")
def test_a_mount_whose_cmk_cannot_read_an_object_never_replaces_it(tmp_path, cmk_path, other_cmk_path):
    """A config whose CMK cannot unwrap an object (`ossfuse quickstart` run again: a new key,
    same bucket) gets EACCES to open it with O_TRUNC, truncate it or rename a file over it,
    and the object stays byte for byte; unlink (an explicit delete) is still allowed, and a
    file this mount wrote itself is replaced as before."""
    from fakes.core import committed_file, core_filesystem

    async def main():
        first = core_filesystem(tmp_path / "a", cmk_path)
        store = first.store
        for name in ("f1", "f2", "f3"):
            await committed_file(first, name, b"precious " + name.encode())
        first.close()
        before = {k: (await store.inner.get_range(k, 0, 1000), (await store.inner.head(k)).etag)
                  for k in ("pre/f1", "pre/f2", "pre/f3")}

        fs = core_filesystem(tmp_path / "b", other_cmk_path, store=store)
        root = fs.get(1)
        f1 = await fs.lookup(root, "f1")
        for flags in (os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_TRUNC, os.O_WRONLY):
            with pytest.raises(FsError) as e:
                await fs.open(f1, flags)
            assert e.value.errno == errno.EACCES
        with pytest.raises(FsError) as e:
            await fs.setattr(f1, size=0)
        assert e.value.errno == errno.EACCES
        await committed_file(fs, "mine", b"new key")
        with pytest.raises(FsError) as e:
            await fs.rename(root, "mine", root, "f2", 0)
        assert e.value.errno == errno.EACCES
        assert await fs.drain() == 0
        for k, (data, etag) in before.items():
            assert await store.inner.get_range(k, 0, 1000) == data
            assert (await store.inner.head(k)).etag == etag
        await fs.unlink(root, "f3")  # an explicit delete stays allowed
        assert await fs.drain() == 0
        assert await store.inner.head("pre/f3") is None
        mine = await fs.lookup(root, "mine")  # what this mount reads is replaced as before
        h = await fs.open(mine, os.O_WRONLY | os.O_TRUNC)
        await fs.write(h, 0, b"v2")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        h = await fs.open(await fs.lookup(root, "mine"), os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"v2"
        await fs.release(h)
        fs.close()
        await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_symlink_and_mknod_never_overwrite_an_object_created_meanwhile(tmp_path, cmk_path, kind, caplog):
    """Another client creates the name between our existence check and our PUT: the symlink or
    mknod fails with EEXIST (create-only PUT, x-oss-forbid-overwrite on OSS), their object stays
    as it was, and the next lookup finds theirs."""
    import logging

    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        await fs.store.inner.put_bytes(fs.naming.key("other"), b"x", {})  # a listed root: the check is answered locally
        assert await listed_names(fs, root) == ["other"]

        key = fs.naming.dir_key("name") if kind == "dir" else fs.naming.key("name")
        body = b"" if kind == "dir" else b"their bytes"

        async def theirs(inner, op, keys):
            await inner.put_bytes(key, body, {"who": "them"})
        fs.store.hook("put_bytes", theirs, key=key, count=1)
        with pytest.raises(FsError) as ei:
            if kind == "symlink":
                await fs.symlink(root, "name", "target", 0, 0)
            elif kind == "dir":
                await fs.mkdir(root, "name", 0o700, 0, 0)
            else:
                await fs.mknod(root, "name", stat.S_IFIFO | 0o644, 0, 0, 0)
        assert ei.value.errno == errno.EEXIST
        got = await fs.store.inner.head(key)
        assert got.metadata == {"who": "them"}
        assert await fs.store.inner.get_range(key, 0, 100) == body
        node = await fs.lookup(root, "name")
        if kind == "dir":
            assert stat.S_ISDIR(node.mode)
        else:
            assert stat.S_ISREG(node.mode) and node.size == len(body)

    with caplog.at_level(logging.INFO):
        trio.run(main)
    assert "another client created the " in caplog.text


def test_the_integrity_tag_list_name_cannot_be_made(tmp_path, cmk_path):
    """``.ossfuse-integrity`` names the tag lists and no listing shows it: a mkdir of it
    succeeded, then the name did not exist and its marker stayed in the bucket (new-user
    trial). Making it, in any directory and by any operation, is EPERM; nothing is stored."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        node, h = await fs.create(d, "f", 0o644, os.O_WRONLY, 1, 2)
        await fs.release(h)
        for make in (lambda p: fs.mkdir(p, ".ossfuse-integrity", 0o755, 1, 2),
                     lambda p: fs.create(p, ".ossfuse-integrity", 0o644, os.O_WRONLY, 1, 2),
                     lambda p: fs.symlink(p, ".ossfuse-integrity", "t", 1, 2),
                     lambda p: fs.rename(d, "f", p, ".ossfuse-integrity", 0)):
            for parent in (root, d):
                with pytest.raises(FsError) as ei:
                    await make(parent)
                assert ei.value.errno == errno.EPERM
        with pytest.raises(FsError) as ei:  # looked up: nothing there
            await fs.lookup(d, ".ossfuse-integrity")
        assert ei.value.errno == errno.ENOENT
        assert await listed_names(fs, d) == ["f"]
        await fs.drain()
        assert sorted(o.key for o in (await fs.store.inner.list("pre/", delimiter=None)).objects) == \
            ["pre/d/", "pre/d/f"]
        fs.close()

    trio.run(main)


def test_an_answer_of_a_slow_store_is_trusted_for_32_of_its_round_trips():
    """``trusted_for``: the configured timeout on a store answering within timeout/32; 32 round
    trips (a moving average of its HEADs) on a slower one; 0 (never trusted) stays 0."""
    from ossfuse.fs.namecache import trusted_for
    from ossfuse.store.base import StoreCounters

    class Store:
        counters = StoreCounters()
    store = Store()
    assert trusted_for(1.0, store) == 1.0  # no HEAD answered yet
    store.counters.note_round_trip(0.01)
    assert trusted_for(1.0, store) == 1.0
    for _ in range(50):
        store.counters.note_round_trip(0.3)
    assert trusted_for(1.0, store) == pytest.approx(9.6, rel=0.01)
    assert trusted_for(0.0, store) == 0.0


def test_the_daemon_raises_its_open_file_limit_to_the_hard_one():
    """A trial's 28,000 files open for writing got EMFILE past the daemon's soft limit (each
    holds a work file): the daemon raises it to the hard limit at start."""
    import resource
    import subprocess
    import sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lowered():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    r = subprocess.run([sys.executable, "-c", "import resource; from ossfuse.daemon import raise_fd_limit; "
                        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))"],
                       capture_output=True, text=True, preexec_fn=lowered, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"({hard}, {hard}) ({hard}, {hard})"


def test_a_root_name_starting_with_a_backslash_cannot_be_a_key():
    """OSS refuses keys starting with '\\': at the root of a mount without a prefix, a lookup
    of such a name is ENOENT with no request (it was a HEAD answered 400: EIO and an ERROR
    line) and a create is EINVAL (it was EIO); below a prefix or a directory it is a name."""
    from ossfuse.fs.naming import Naming
    for creating, code in ((True, errno.EINVAL), (False, errno.ENOENT)):
        for is_dir in (False, True):
            with pytest.raises(FsError) as e:
                Naming("").check_new_path("\\probe", is_dir, creating=creating)
            assert e.value.errno == code
    Naming("team/").check_new_path("\\probe")
    Naming("").check_new_path("d/\\probe")


def test_the_upload_of_a_name_renamed_over_passes_to_its_heir_only_once_the_rename_is_done():
    """UploadScheduler.took_name (trial R: a name saved by rename faster than the delay never
    reached the store): the worker that takes a queued node uploads the node that took its
    name, following a chain of such renames, once the old node is unlinked; a rename that
    failed after took_name leaves the old node its own upload."""
    from ossfuse.writeback.scheduler import UploadScheduler

    class Item:
        def __init__(self, path, since):
            self.path, self.unlinked, self.staged = path, False, object()
            self.upload_queued, self.queued_at, self.dirty_since = False, 0.0, since

    async def main():
        uploaded: list[Item] = []

        async def upload(node, closed_only):
            uploaded.append(node)
            return True

        sched = UploadScheduler(upload, delay=0.2, retry_interval=1, workers=1)
        a, b, c = Item("f", 10.0), Item("f.tmp", 20.0), Item("f.tmp2", 30.0)
        failed, heir = Item("g", 5.0), Item("g.tmp", 6.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sched.worker)
            for n in (a, b, c, failed, heir):
                sched.mark_dirty(n)
                n.dirty_since = {a: 10.0, b: 20.0, c: 30.0, failed: 5.0, heir: 6.0}[n]
                sched.schedule(n)
            sched.took_name(a, b)  # b renamed over a, then c over b
            a.unlinked = True
            sched.took_name(b, c)
            b.unlinked = True
            sched.took_name(failed, heir)  # a rename that then failed: failed keeps its name
            assert (b.dirty_since, c.dirty_since, heir.dirty_since) == (10.0, 10.0, 5.0)
            with trio.fail_after(5):
                while len(uploaded) < 5:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        # a's entry uploads c (b is unlinked too), b's and c's own entries come after; failed
        # uploads itself
        assert uploaded[0] is c and uploaded.count(failed) == 1 and a not in uploaded and sched._heirs == {}

    trio.run(main)
