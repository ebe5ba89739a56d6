"""Special files (FIFOs, sockets, character and block device nodes) as zero-length objects whose
``x-oss-meta-mode`` carries the file type (the way ossfs 1.x / s3fs store them) and, for devices,
``x-oss-meta-rdev`` the device number: made by mknod/mkfifo/bind, listed, stat'ed cold, renamed,
chmod'ed, removed; in-process over a local bucket, then through real mounts on both stores."""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import subprocess

import pytest
import trio

from conftest import oss_client_store
from fakes.fault_store import FaultStore
from ossfuse import envelope as env
from ossfuse.config import (CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig,
                            StoreConfig)
from ossfuse.fs import Filesystem, FsError
from ossfuse.fs.objmeta import AttrDefaults, is_hidden, rdev_of
from ossfuse.keyring import Keyring
from ossfuse.store.base import ObjectInfo
from ossfuse.store.local import LocalStore

# (name, st_mode, st_rdev) of one node of each special type
SPECIALS = [
    ("fifo", stat.S_IFIFO | 0o640, 0),
    ("sock", stat.S_IFSOCK | 0o755, 0),
    ("chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    ("blk", stat.S_IFBLK | 0o660, os.makedev(259, 70000)),  # a minor over 255: glibc's split encoding
]


def _fsync_dir(path: str) -> None:
    """fsync(2) of directory ``path``: returns once the unlinks in it reached the bucket."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _filesystem(tmp_path, cmk_path, store=None, plaintext_objects="show") -> Filesystem:
    cfg = Config(path=str(tmp_path / "ossfuse.toml"),
                 store=StoreConfig(url=f"local://{tmp_path / 'bucket'}", prefix="pre/"),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),),
                                             plaintext_objects=plaintext_objects),
                 cache=CacheConfig(dir=str(tmp_path / "cache")),
                 mount=MountConfig(upload_delay=0.0))
    os.makedirs(tmp_path / "bucket", exist_ok=True)
    if store is None:
        store = LocalStore(str(tmp_path / "bucket"))
    return Filesystem(cfg, store, Keyring(cfg.encryption), uid=1, gid=2)


async def _listing(fs: Filesystem, dirnode) -> dict[str, tuple[int, int]]:
    """name → (st_mode, st_rdev) of every entry readdir gives for ``dirnode``."""
    h = fs.opendir(dirnode)
    try:
        return {name: (node.mode, rdev_of(node)) for _, name, node in await fs.readdir_entries(h, 0)}
    finally:
        fs.releasedir(h.fh)


# -- the codec ----------------------------------------------------------------------------------
def test_attrs_from_info_keeps_special_file_types():
    d = AttrDefaults(uid=1000, gid=100, umask=0o022, create_umask=0)
    for _, mode, _ in SPECIALS:
        info = ObjectInfo("p/x", 0, "E", 1.0, {"mode": str(mode)})
        assert d.attrs_from_info(info, False)[0] == mode
    # permission bits 0 stay 0 (the type bits make the stored mode non-zero)
    assert d.attrs_from_info(ObjectInfo("p/x", 0, "E", 1.0, {"mode": str(stat.S_IFIFO)}), False)[0] == stat.S_IFIFO
    # a configured umask masks a special file's mode like any other
    masked = AttrDefaults(uid=0, gid=0, umask=0o077, create_umask=0o077)
    assert masked.attrs_from_info(ObjectInfo("k", 0, "E", 0, {"mode": str(stat.S_IFCHR | 0o666)}), False)[0] \
        == stat.S_IFCHR | 0o600
    # an unknown type (0o110000 is no S_IF*) is a regular file, as before
    assert stat.S_ISREG(d.attrs_from_info(ObjectInfo("k", 0, "E", 0, {"mode": str(0o110644)}), False)[0])


# -- in-process, over a local bucket -------------------------------------------------------------
def test_mknod_makes_zero_length_plain_objects_with_type_and_rdev(tmp_path, cmk_path):
    async def main():
        fs = _filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        for name, mode, rdev in SPECIALS:
            node = await fs.mknod(root, name, mode, rdev, 7, 8)
            assert (node.mode, rdev_of(node), node.uid, node.gid, node.size) == (mode, rdev, 7, 8, 0)
            assert node.lookups == 1 and node.is_special and node not in fs.dirty
            info = await fs.store.head("pre/" + name)
            assert info.size == 0 and not env.is_encrypted(info.metadata)  # nothing to encrypt
            assert int(info.metadata["mode"]) == mode and info.metadata["uid"] == "7"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                assert info.metadata["rdev"] == str(rdev)
            else:
                assert "rdev" not in info.metadata
        with pytest.raises(FsError) as e:
            await fs.mknod(root, "fifo", stat.S_IFIFO | 0o600, 0, 7, 8)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(FsError) as e:
            await fs.mknod(root, "d", stat.S_IFDIR | 0o755, 0, 7, 8)
        assert e.value.errno == errno.EINVAL
        # S_IFREG: an empty encrypted file, committed at once, readable
        reg = await fs.mknod(root, "reg", stat.S_IFREG | 0o600, 0, 7, 8)
        info = await fs.store.head("pre/reg")
        assert stat.S_ISREG(reg.mode) and info.size == 0 and env.is_encrypted(info.metadata)
        h = await fs.open(reg, os.O_RDONLY)
        assert await fs.read(h, 0, 10) == b""
        await fs.release(h)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


@pytest.mark.parametrize("listing_has_metadata", [True, False])
def test_special_files_stat_cold_from_listing_and_head(tmp_path, cmk_path, listing_has_metadata):
    async def make():
        fs = _filesystem(tmp_path, cmk_path)
        await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
        d = await fs.lookup(fs.get(1), "d")
        for name, mode, rdev in SPECIALS:
            await fs.mknod(d, name, mode, rdev, 7, 8)
        fs.close()
        await fs.store.aclose()

    async def cold():
        store = FaultStore(LocalStore(str(tmp_path / "bucket")))
        store.listing_has_metadata = listing_has_metadata
        fs = _filesystem(tmp_path, cmk_path, store)
        d = await fs.lookup(fs.get(1), "d")
        store.reset_counts()
        listed = await _listing(fs, d)  # modes from the listing, or from a HEAD per entry
        assert listed == {name: (mode, rdev) for name, mode, rdev in SPECIALS}
        assert store.counts["head"] == (len(SPECIALS) if not listing_has_metadata else 0)
        fs.close()
        await store.aclose()
        fs = _filesystem(tmp_path, cmk_path)  # and each one by lookup (HEAD), nothing listed before
        d = await fs.lookup(fs.get(1), "d")
        for name, mode, rdev in SPECIALS:
            node = await fs.lookup(d, name)
            assert (node.mode, rdev_of(node), node.uid, node.gid, node.size) == (mode, rdev, 7, 8, 0)
        fs.close()
        await fs.store.aclose()

    trio.run(make)
    trio.run(cold)


def test_special_files_rename_chmod_chown_utime_unlink(tmp_path, cmk_path):
    async def main():
        fs = _filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        for name, mode, rdev in SPECIALS:
            node = await fs.mknod(root, name, mode, rdev, 7, 8)
            await fs.rename(root, name, d, name + "2", 0)  # a conditional copy of that version
            assert await fs.store.head("pre/" + name) is None
            info = await fs.store.head(f"pre/d/{name}2")
            assert int(info.metadata["mode"]) == mode and info.metadata.get("rdev", "0") == str(rdev)
            assert node.version.key == f"pre/d/{name}2" and node.version.etag == info.etag
            await fs.setattr(node, mode=0o604, uid=11, gid=12, mtime_ns=1_600_000_000_123_000_000)
            assert node.mode == stat.S_IFMT(mode) | 0o604 and rdev_of(node) == rdev
            info = await fs.store.head(f"pre/d/{name}2")
            assert int(info.metadata["mode"]) == stat.S_IFMT(mode) | 0o604
            assert (info.metadata["uid"], info.metadata["gid"], info.metadata["mtime"]) == \
                ("11", "12", "1600000000.123000000")
            assert info.metadata.get("rdev", "0") == str(rdev) and info.size == 0
        fs.close()
        await fs.store.aclose()
        fs = _filesystem(tmp_path, cmk_path)  # cold: what the bucket says
        d = await fs.lookup(fs.get(1), "d")
        for name, mode, rdev in SPECIALS:
            node = await fs.lookup(d, name + "2")
            assert (node.mode, rdev_of(node), node.uid, node.gid, node.mtime_ns) == \
                (stat.S_IFMT(mode) | 0o604, rdev, 11, 12, 1_600_000_000_123_000_000)
            await fs.unlink(d, name + "2")
            assert await fs.store.head(f"pre/d/{name}2") is None
            with pytest.raises(FsError) as e:
                await fs.lookup(d, name + "2")
            assert e.value.errno == errno.ENOENT
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_special_files_written_by_ossfs_read_back(tmp_path, cmk_path):
    """An object as ossfs-1.91.10 writes a special file (src/s3fs.cpp create_file_object: zero
    bytes, x-oss-meta-uid/gid/mode/atime/ctime/mtime, no rdev) is that special file here, also
    with ``plaintext_objects = "hide"`` (it has a mode: a file-system client wrote it)."""
    async def main():
        store = LocalStore(str(tmp_path / "bucket"))
        for name, mode, _ in SPECIALS:
            await store.put_bytes("pre/" + name, b"", {"uid": "0", "gid": "0", "mode": str(mode),
                                                       "atime": "1700000000", "ctime": "1700000000",
                                                       "mtime": "1700000000"})
        await store.aclose()
        fs = _filesystem(tmp_path, cmk_path, plaintext_objects="hide")
        root = fs.get(1)
        assert await _listing(fs, root) == {name: (mode, 0) for name, mode, _ in SPECIALS}
        node = await fs.lookup(root, "chr")
        assert (node.mode, rdev_of(node), node.mtime_ns) == (stat.S_IFCHR | 0o600, 0, 1_700_000_000 * 10**9)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def _store_of(kind: str, tmp_path, request):
    """A new client of the local bucket under ``tmp_path`` or of the test's OSS server."""
    if kind == "local":
        return LocalStore(str(tmp_path / "bucket"))
    return oss_client_store(request.getfixturevalue("oss_server"))


@pytest.mark.parametrize("store_kind", ["local", "oss"])
def test_hide_hides_a_plaintext_object_with_no_metadata_at_all(tmp_path, cmk_path, store_kind, request):
    """``plaintext_objects = "hide"`` hides an object with no envelope and no metadata at all
    (``ossutil cp``, a console upload: the commonest plaintext object; it was shown), in a
    listing and for a lookup, on a local bucket and over OSS (whose listing does not give an
    entry's metadata: it is never hidden for that alone, is_hidden: only a HEAD can tell)."""
    def store():
        return _store_of(store_kind, tmp_path, request)

    async def main():
        seed = store()
        await seed.put_bytes("pre/bare.txt", b"plain", {})
        await seed.put_bytes("pre/meta.txt", b"plain", {"foo": "1"})
        await seed.aclose()
        fs = _filesystem(tmp_path, cmk_path, store(), plaintext_objects="hide")
        root = fs.get(1)
        await fs.mkdir(root, "mine", 0o750, 0, 0)
        assert set(await _listing(fs, root)) == {"mine"}
        for name in ("bare.txt", "meta.txt"):
            with pytest.raises(FsError) as e:
                await fs.lookup(root, name)
            assert e.value.errno == errno.ENOENT
        fs.close()
        await fs.store.aclose()
        shown = _filesystem(tmp_path, cmk_path, store(), plaintext_objects="show")
        assert set(await _listing(shown, shown.get(1))) == {"mine", "bare.txt", "meta.txt"}
        shown.close()
        await shown.store.aclose()

    trio.run(main)
    listed = ObjectInfo("pre/x", 5, "E", 1.0, {}, metadata_unknown=True)
    headed = ObjectInfo("pre/x", 5, "E", 1.0, {})
    assert (is_hidden(listed, "hide"), is_hidden(headed, "hide"), is_hidden(headed, "show")) == (False, True, False)


@pytest.mark.parametrize("store_kind", ["local", "oss"])
@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.resolve: cannot make '(zz|yy)\.txt': the bucket holds 'pre/(zz|yy)\.txt' "
                        r"there, a plaintext object plaintext_objects = \"hide\" hides")
def test_hide_a_new_file_at_a_hidden_objects_name_is_refused_and_a_directory_there_shows(
        tmp_path, cmk_path, store_kind, request, caplog):
    """A trial with ``plaintext_objects = "hide"``: a file made at a hidden object's name was
    written and closed with success, then vanished (its create-only upload became a conflict
    copy); a directory made there never listed (the listing showed the object over the prefix,
    then hid it). A new file there is refused (EACCES; EEXIST with O_EXCL; one WARNING naming
    the object), the object kept; a directory there lists (another key)."""
    def store():
        return _store_of(store_kind, tmp_path, request)

    async def main():
        seed = store()
        await seed.put_bytes("pre/zz.txt", b"hidden plain\n", {})
        await seed.put_bytes("pre/yy.txt", b"hidden too\n", {})
        await seed.aclose()
        fs = _filesystem(tmp_path, cmk_path, store(), plaintext_objects="hide")
        root = fs.get(1)
        for flags, err in ((os.O_WRONLY | os.O_CREAT, errno.EACCES), (os.O_WRONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST)):
            with pytest.raises(FsError) as e:
                await fs.create(root, "zz.txt", 0o644, flags, 0, 0)
            assert e.value.errno == err
        d = await fs.mkdir(root, "zz.txt", 0o755, 0, 0)
        assert set(await _listing(fs, root)) == {"zz.txt"}
        assert (await fs.lookup(root, "zz.txt")).is_dir
        assert await _listing(fs, d) == {}
        assert await fs.drain() == 0
        assert await fs.store.get_range("pre/zz.txt", 0, 100) == b"hidden plain\n"  # theirs, untouched
        # trial Y: once the hidden object is deleted, the name is free (a listing of the parent
        # answered lookups without a probe, and the refusal stayed until a remount)
        with pytest.raises(FsError) as e:
            await fs.create(root, "yy.txt", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        assert e.value.errno == errno.EACCES
        assert set(await _listing(fs, root)) == {"zz.txt"}
        await fs.store.delete("pre/yy.txt")  # another client
        node, h = await fs.create(root, "yy.txt", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        await fs.write(h, 0, b"mine")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert set(await _listing(fs, root)) == {"zz.txt", "yy.txt"}
        fs.close()
        await fs.store.aclose()
        again = _filesystem(tmp_path, cmk_path, store(), plaintext_objects="hide")
        assert set(await _listing(again, again.get(1))) == {"zz.txt", "yy.txt"}
        again.close()
        await again.store.aclose()

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    assert len([r for r in caplog.records if "cannot make" in r.getMessage()]) == 2  # zz.txt, yy.txt


@pytest.mark.parametrize("store_kind", ["local", "oss"])
@pytest.mark.parametrize("uploaded", [False, True])
@pytest.mark.expect_log(r"WARNING ossfuse\.fs\.conflicts: 'pre/tgt\.txt' was changed by another client \(this mount "
                        r"knew no object there, .*\) and a rename replaces it: theirs is kept as 'pre/tgt\.conflict-")
def test_hide_a_rename_onto_a_hidden_objects_name_keeps_it_as_a_conflict_copy(tmp_path, cmk_path, store_kind,
                                                                             uploaded, request):
    """Trial Y: over OSS a file not uploaded yet, renamed onto a hidden plaintext object's name,
    went to a conflict copy at its upload (theirs stayed at the name) — unlike a committed
    file's rename, which keeps theirs as a conflict copy first and replaces it. Both do that."""
    async def main():
        seed = _store_of(store_kind, tmp_path, request)
        await seed.put_bytes("pre/tgt.txt", b"theirs\n", {})
        await seed.aclose()
        fs = _filesystem(tmp_path, cmk_path, _store_of(store_kind, tmp_path, request), plaintext_objects="hide")
        root = fs.get(1)
        _node, h = await fs.create(root, "mine.txt", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        await fs.write(h, 0, b"ours\n")
        await fs.flush(h)
        await fs.release(h)
        if uploaded:
            assert await fs.drain() == 0
        with pytest.raises(FsError):
            await fs.lookup(root, "tgt.txt")  # the kernel's lookup before a rename
        await fs.rename(root, "mine.txt", root, "tgt.txt", 0)
        assert await fs.drain() == 0
        names = sorted(n for n in await _names_in_bucket(fs.store) if n.startswith("pre/tgt"))
        assert names[0] == "pre/tgt.conflict" or names[0].startswith("pre/tgt.conflict-"), names
        assert len(names) == 2 and names[1] == "pre/tgt.txt", names
        assert await fs.store.get_range(names[0], 0, 100) == b"theirs\n"  # kept, plaintext
        assert set(await _listing(fs, root)) == {"tgt.txt"}  # (the conflict copy is hidden too)
        h = await fs.open(await fs.lookup(root, "tgt.txt"), os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"ours\n"
        await fs.release(h)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


async def _names_in_bucket(store) -> list[str]:
    page = await store.list("pre/", delimiter=None)
    return [o.key for o in page.objects]


@pytest.mark.expect_log(r"'d' is not empty: the bucket holds 'pre/d/sdk\.txt' below it, which listings here do not "
                        r"show \(a plaintext object, hidden by plaintext_objects = \"hide\"\)")
def test_rmdir_of_a_directory_holding_only_a_hidden_plaintext_object_says_why(tmp_path, cmk_path, caplog):
    """Trial U: with ``plaintext_objects = "hide"`` a directory holding only an SDK's plaintext
    object lists empty, and rmdir gave ENOTEMPTY with no word why. Still refused (nothing is
    deleted behind the user's back), with one WARNING naming the object (said once)."""
    async def main():
        store = LocalStore(str(tmp_path / "bucket"))
        await store.put_bytes("pre/d/", b"", {})
        await store.put_bytes("pre/d/sdk.txt", b"x", {"foo": "1"})  # no envelope, no mode
        await store.aclose()
        fs = _filesystem(tmp_path, cmk_path, plaintext_objects="hide")
        root = fs.get(1)
        d = await fs.lookup(root, "d")
        assert await _listing(fs, d) == {}
        for _ in range(2):
            with pytest.raises(FsError) as e:
                await fs.rmdir(root, "d")
            assert e.value.errno == errno.ENOTEMPTY
        fs.close()
        await fs.store.aclose()

    trio.run(main)
    assert len([r for r in caplog.records if "is not empty" in r.getMessage()]) == 1


@pytest.mark.expect_log(r"'pre/bad' has x-oss-meta-rdev 4294967296, out of range",
                        r"'pre/junk' has x-oss-meta-rdev 'x', not a number",
                        r"'pre/fifo' holds 4 bytes but its x-oss-meta-mode 4516 makes it a special file",
                        r"'pre/dirmode' has x-oss-meta-mode 16877, a directory's, but its key is a file's",
                        r"'pre/linkdir/' is a directory marker \(its key ends in /\) but its x-oss-meta-mode 41471 ")
def test_out_of_range_rdev_shows_zero_with_one_warning(tmp_path, cmk_path, caplog):
    async def main():
        store = LocalStore(str(tmp_path / "bucket"))
        await store.put_bytes("pre/bad", b"", {"mode": str(stat.S_IFBLK | 0o600), "rdev": str(2**32)})
        await store.put_bytes("pre/junk", b"", {"mode": str(stat.S_IFCHR | 0o600), "rdev": "x"})
        await store.put_bytes("pre/fifo", b"data", {"mode": str(stat.S_IFIFO | 0o644)})  # a foreign writer's
        await store.put_bytes("pre/dirmode", b"data", {"mode": str(stat.S_IFDIR | 0o755)})  # (a trial)
        await store.put_bytes("pre/linkdir/", b"", {"mode": str(stat.S_IFLNK | 0o777)})  # (a trial)
        await store.put_bytes("pre/plaindir/", b"", {"mode": "493"})  # permissions alone: no word
        await store.aclose()
        fs = _filesystem(tmp_path, cmk_path)
        bad = await fs.lookup(fs.get(1), "bad")
        assert stat.S_ISBLK(bad.mode) and rdev_of(bad) == 0 and rdev_of(bad) == 0  # warned once
        assert rdev_of(await fs.lookup(fs.get(1), "junk")) == 0
        assert stat.S_ISFIFO((await fs.lookup(fs.get(1), "fifo")).mode)
        for _ in range(2):  # (said once)
            assert (await fs.lookup(fs.get(1), "dirmode")).mode == stat.S_IFREG | 0o755
            fs.by_path["dirmode"].checked_at = 0.0
            assert (await fs.lookup(fs.get(1), "linkdir")).mode == stat.S_IFDIR | 0o777
            fs.by_path["linkdir"].checked_at = 0.0
        assert (await fs.lookup(fs.get(1), "plaindir")).mode == stat.S_IFDIR | 0o755
        fs.close()
        await fs.store.aclose()

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5


@pytest.mark.expect_log(r"cannot read symlink 'pre/long': its target \(5000 bytes\) is longer than 4095 bytes",
                        r"cannot read symlink 'pre/nul': its target \(3 bytes\) holds a NUL byte",
                        r"cannot read symlink 'pre/empty': its target \(0 bytes\) is empty")
def test_a_foreign_symlink_target_the_kernel_cannot_take_is_eio_naming_it(tmp_path, cmk_path, caplog):
    """A trial: another client's symlink whose target is 4096 bytes or more gave EIO with only
    libfuse's "writing device: Invalid argument" (no key named), and one holding a NUL byte
    read as the part before it. Both are EIO with one ERROR line naming the object; a target
    of 4095 bytes reads whole."""
    async def main():
        store = LocalStore(str(tmp_path / "bucket"))
        link = {"mode": str(stat.S_IFLNK | 0o777)}
        await store.put_bytes("pre/long", b"x" * 5000, link)
        await store.put_bytes("pre/nul", b"a\0b", link)
        await store.put_bytes("pre/max", b"y" * 4095, link)
        await store.put_bytes("pre/empty", b"", link)  # (trial AA: shown as a link to "")
        await store.aclose()
        fs = _filesystem(tmp_path, cmk_path)
        for name in ("long", "nul", "long", "empty"):
            with pytest.raises(FsError) as e:
                await fs.readlink(await fs.lookup(fs.get(1), name))
            assert e.value.errno == errno.EIO
        assert await fs.readlink(await fs.lookup(fs.get(1), "max")) == "y" * 4095
        fs.close()
        await fs.store.aclose()

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3


# -- through a real mount, on both stores ------------------------------------------------------
pytestmark_mount = pytest.mark.timeout(180)


def _kinds(path: str) -> dict[str, tuple[int, int]]:
    return {e.name: (e.stat(follow_symlinks=False).st_mode, e.stat(follow_symlinks=False).st_rdev)
            for e in os.scandir(path)}


def _dtypes(path: str) -> dict[str, str]:
    """name → the d_type readdir gave, as ``find -printf %y`` shows it (p, s, c, b, f, d)."""
    out = subprocess.run(["find", path, "-mindepth", "1", "-maxdepth", "1", "-printf", "%f %y\n"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ") for line in out.splitlines())


@pytestmark_mount
def test_mknod_each_type_stat_ls_rename_chmod_rm_and_remount(mount):
    old_umask = os.umask(0o022)
    try:
        _mknod_each_type_stat_ls_rename_chmod_rm_and_remount(mount)
    finally:
        os.umask(old_umask)


def _mknod_each_type_stat_ls_rename_chmod_rm_and_remount(mount):
    want = {}
    for name, mode, rdev in SPECIALS:
        os.mknod(mount.path(name), mode, rdev)
        want[name] = (mode & ~0o022, rdev)
    os.mkfifo(mount.path("made_by_mkfifo"), 0o600)
    want["made_by_mkfifo"] = (stat.S_IFIFO | 0o600, 0)
    got = {n: (os.lstat(mount.path(n)).st_mode, os.lstat(mount.path(n)).st_rdev) for n in want}
    assert got == want
    assert _kinds(mount.mnt) == want
    assert _dtypes(mount.mnt) == {"fifo": "p", "sock": "s", "chr": "c", "blk": "b", "made_by_mkfifo": "p"}
    ls = subprocess.run(["ls", "-l", mount.mnt], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[-1]: line for line in ls.splitlines()[1:]}
    assert lines["fifo"].startswith("prw-r-----") and lines["sock"].startswith("srwxr-xr-x")
    assert lines["chr"].startswith("crw-------") and lines["chr"].split()[4:6] == ["1,", "3"]
    assert lines["blk"].startswith("brw-r-----") and lines["blk"].split()[4:6] == ["259,", "70000"]
    assert mount.head("chr").size == 0 and mount.head("chr").metadata["rdev"] == str(os.makedev(1, 3))

    mount.remount()  # cold: from the listing (ls) and from HEAD (stat)
    assert {n: (os.lstat(mount.path(n)).st_mode, os.lstat(mount.path(n)).st_rdev) for n in want} == want
    mount.remount()
    assert _kinds(mount.mnt) == want

    os.mkdir(mount.path("d"))
    for name in want:
        os.rename(mount.path(name), mount.path("d", name + ".moved"))
        os.chmod(mount.path("d", name + ".moved"), 0o604)
        os.chown(mount.path("d", name + ".moved"), 1234, 5678)
        os.utime(mount.path("d", name + ".moved"), ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert not [n for n in os.listdir(mount.mnt) if n != "d"]
    mount.remount()
    for name, (mode, rdev) in want.items():
        st = os.lstat(mount.path("d", name + ".moved"))
        assert (st.st_mode, st.st_rdev, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size) == \
            (stat.S_IFMT(mode) | 0o604, rdev, 1234, 5678, 1_600_000_000_000_000_000, 0)
        os.unlink(mount.path("d", name + ".moved"))
    assert os.listdir(mount.path("d")) == []
    _fsync_dir(mount.path("d"))  # over OSS unlink's DELETE runs in the background: done by now
    assert [k for k in mount.keys() if not k.endswith("/")] == []


@pytestmark_mount
def test_fifo_works_as_a_pipe_through_the_mount(mount):
    r = subprocess.run(["bash", "-c", "cd \"$1\" && mkfifo p && (echo hi > p &) && cat p", "_", mount.mnt],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    mount.remount()  # a FIFO made by an earlier mount is still a pipe
    r = subprocess.run(["bash", "-c", "cd \"$1\" && (printf 'after remount' > p &) && cat p", "_", mount.mnt],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "after remount")
    assert mount.head("p").size == 0  # the pipe's data never reaches the bucket


@pytestmark_mount
def test_unix_socket_bind_and_connect_in_the_mount(mount):
    path = mount.path("s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_ISSOCK(int(mount.head("s.sock").metadata["mode"]))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(path)
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        client.close()
    finally:
        server.close()
    with pytest.raises(OSError) as e:  # a second bind finds the name taken, as on any filesystem
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s2.bind(path)
        finally:
            s2.close()
    assert e.value.errno == errno.EADDRINUSE
    os.unlink(path)
    _fsync_dir(mount.mnt)  # over OSS unlink's DELETE runs in the background: done by now
    assert mount.head("s.sock") is None


@pytestmark_mount
def test_hard_links_stay_refused_with_eperm(mount):
    os.mkfifo(mount.path("p"))
    with open(mount.path("f"), "wb") as f:
        f.write(b"x")
    for src in ("p", "f"):
        with pytest.raises(OSError) as e:
            os.link(mount.path(src), mount.path(src + ".hard"))
        assert e.value.errno == errno.EPERM
    assert sorted(os.listdir(mount.mnt)) == ["f", "p"]
    assert not [k for k in mount.keys() if k.endswith(".hard")]  # the refusals made no object


@pytestmark_mount
@pytest.mark.parametrize("store_kind", ["oss"], indirect=True)
def test_sdk_encryption_clients_read_a_special_file_as_empty(mount, tmp_path, other_cmk_path):
    """A special file is a plain zero-length object: each official SDK's encryption client
    (C++, Go V1, Go V2, oss2, Python V2) reads it as 0 bytes, no error (they pass objects
    without an envelope through)."""
    from interop_clients import CLIENTS, Case, Env, require_tools
    require_tools()
    os.mkfifo(mount.path("p"))
    os.mknod(mount.path("c"), stat.S_IFCHR | 0o600, os.makedev(5, 1))
    e = Env(mount.server.endpoint, mount.cmk, other_cmk_path, mount)
    for name in ("cpp", "go1", "gov2", "oss2", "pyv2"):
        for key in ("p", "c"):
            assert CLIENTS[name](e, str(tmp_path / "work")).get(key, Case("special", 0)) == b"", (name, key)


@pytestmark_mount
@pytest.mark.parametrize("store_kind", ["local"], indirect=True)
def test_device_node_opens_as_the_device_with_o_dev_only(mount):
    """A character device made in the mount is the kernel's device (here /dev/null's 1,3): on a
    mount with ``-o dev`` writes vanish and reads give EOF, nothing reaches the daemon or the
    bucket; on a default (nodev) mount opening it is refused with EACCES."""
    from conftest import OSSFUSE
    from ossfuse.daemon import read_registry
    os.mknod(mount.path("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(PermissionError):
        open(mount.path("null"), "wb")
    assert mount.stop() == 0
    r = subprocess.run(OSSFUSE + ["mount", "-c", mount.config, "-o", "dev", mount.mnt], capture_output=True,
                       text=True, timeout=90, env=mount.env)
    assert r.returncode == 0, r.stderr
    mount.pid = read_registry(mount.mnt)["pid"]
    with open(mount.path("null"), "wb") as f:
        f.write(b"x" * 100_000)
    with open(mount.path("null"), "rb") as f:
        assert f.read() == b""
    assert os.lstat(mount.path("null")).st_rdev == os.makedev(1, 3)
    assert mount.head("null").size == 0
