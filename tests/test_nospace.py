"""A full cache disk (staging, journal) or a full bucket disk: the caller gets ENOSPC and one log
line naming the object and the reason; never garbage plaintext, never a write silently dropped,
never a claim that lost data is journaled (docs/semantics.md "Durability", docs/design.md
"Write-back and the journal").

Core tests over tests/fakes (ENOSPC injected into the staging module's ``os.pwrite``, or a
FaultStore error caused by an ``OSError``); the real full disks are small tmpfs mounts made
and removed by the ``tmpfs`` fixture (root only: skipped otherwise)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import random
import subprocess
import threading
import time

import pytest
import trio

from fakes.core import GID, UID, committed_file, core_filesystem, read_file
from ossfuse.fs import FsError
from ossfuse.store.base import StoreError
from ossfuse.writeback import staging as staging_mod

DATA = b"the last good version\n" * 100


def _fail_pwrite(monkeypatch, err: int = errno.ENOSPC) -> None:
    def pwrite(fd, data, offset):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(staging_mod.os, "pwrite", pwrite)




async def _stop(fs) -> None:
    fs.close()
    await fs.store.aclose()


@pytest.mark.expect_log(r"ossfuse\.fs\.files: staging a write to 'pre/doc' failed")
def test_after_a_lost_write_every_later_write_fsync_and_close_on_the_handle_fails(tmp_path, cmk_path, monkeypatch,
                                                                                  caplog):
    """Space comes back after one write failed: the later writes through that handle must not
    look saved (they would be discarded with the failed one at close)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node = await committed_file(fs, "doc", DATA)
        closed_mtime = node.mtime_ns
        h = await fs.open(node, os.O_RDWR)
        await trio.sleep(0.01)
        await fs.write(h, 0, b"good write ")
        assert node.mtime_ns > closed_mtime
        with monkeypatch.context() as m:
            _fail_pwrite(m)
            with pytest.raises(FsError) as e:
                await fs.write(h, 4096, b"lost write")
            assert e.value.errno == errno.ENOSPC
        # space is back: still refused, at once, with the same errno
        for op in (lambda: fs.write(h, 8192, b"later"), lambda: fs.fsync(h), lambda: fs.flush(h),
                   lambda: fs.write(h, 0, b"after close"), lambda: fs.fsync(h), lambda: fs.flush(h)):
            with pytest.raises(FsError) as e:
                await op()
            assert e.value.errno == errno.ENOSPC
        await fs.release(h)
        # one event, one ERROR line naming the object, the reason and what happens to the data
        # (a trial saw a second ERROR line at close saying the changes were discarded)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "'pre/doc'" in errors[0] and "discarded" in errors[0], errors
        assert node.mtime_ns == closed_mtime  # the discarded writes' mtime went with them
        assert await fs.drain() == 0
        assert await read_file(fs, "doc") == DATA  # the last good version, whole
        assert (await fs.store.inner.head("pre/doc")).size == len(DATA)
        # a new handle starts clean
        h2 = await fs.open(node, os.O_RDWR)
        await fs.write(h2, 0, b"NEW")
        await fs.flush(h2)
        await fs.release(h2)
        assert await fs.drain() == 0
        assert await read_file(fs, "doc") == b"NEW" + DATA[3:]
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ossfuse\.fs\.files: staging a write to 'pre/doc' failed")
def test_a_lost_write_fails_the_other_handles_writes_to_that_version(tmp_path, cmk_path, monkeypatch):
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node = await committed_file(fs, "doc", DATA)
        a = await fs.open(node, os.O_RDWR)
        b = await fs.open(node, os.O_RDWR)
        await fs.write(a, 0, b"aaa")
        with monkeypatch.context() as m:
            _fail_pwrite(m)
            with pytest.raises(FsError):
                await fs.write(a, 4096, b"lost")
        with pytest.raises(FsError) as e:
            await fs.write(b, 0, b"bbb")  # would be discarded with the lost write at close
        assert e.value.errno == errno.ENOSPC
        for h in (a, b):
            with pytest.raises(FsError) as e:
                await fs.flush(h)
            assert e.value.errno == errno.ENOSPC
            await fs.release(h)
        assert await fs.drain() == 0
        assert await read_file(fs, "doc") == DATA
        await _stop(fs)

    trio.run(main)


# -- a full bucket disk (local-directory store) ------------------------------------------------
def _full_disk_error(op: str, key: str) -> BaseException:
    """What LocalStore raises on a full disk: a StoreError caused by OSError(ENOSPC)."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as cause:
        err = StoreError(f"local store /bucket: {cause}", key=key)
        err.__cause__ = cause
        return err


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'pre/big' failed.*No space left")
def test_a_full_bucket_disk_gives_enospc_and_one_error_line_per_reason(tmp_path, cmk_path, caplog):
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        fs.store.fail(("put_file", "create_multipart", "upload_part"), error=_full_disk_error, count=None)
        node, h = await fs.create(fs.get(1), "big", 0o600, os.O_RDWR, UID, GID)
        await fs.write(h, 0, DATA)
        for _ in range(3):  # fsync, retried by the program: ENOSPC each time, not EIO
            with pytest.raises(FsError) as e:
                await fs.fsync(h)
            assert e.value.errno == errno.ENOSPC
        await fs.flush(h)  # journaled in the cache dir, which has room
        await fs.release(h)
        assert await fs.drain() == 1  # still pending, journaled
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        fails = [r for r in caplog.records if "upload of 'pre/big' failed" in r.getMessage()]
        assert len(fails) == 4  # one line per failed attempt: 3 fsyncs and the drain
        fs.store.clear()
        assert await fs.drain() == 0
        assert await read_file(fs, "big") == DATA
        await _stop(fs)

    with caplog.at_level(logging.INFO, logger="ossfuse"):
        trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'pre/big' failed.*No space left")
def test_fsync_on_a_really_full_bucket_disk_is_enospc(tmp_path, cmk_path, tmpfs):
    async def main():
        bucket = tmpfs("bucket", 1 << 20)
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)  # core_store uses tmp_path/bucket
        node, h = await fs.create(fs.get(1), "big", 0o600, os.O_RDWR, UID, GID)
        payload = os.urandom(2 << 20)
        await fs.write(h, 0, payload)
        with pytest.raises(FsError) as e:
            await fs.fsync(h)
        assert e.value.errno == errno.ENOSPC
        await fs.flush(h)
        await fs.release(h)
        await _stop(fs)
        assert os.path.ismount(bucket)

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.staging: cache dir .*/cache: its disk has")
def test_mount_warns_once_when_the_cache_disk_is_small_for_min_free(tmp_path, cmk_path, tmpfs, caplog):
    cache = tmpfs("cache", 8 << 20)
    fs = core_filesystem(tmp_path, cmk_path)  # cache.min_free: the default 512 MiB
    assert fs.recover() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cache dir {cache}: its disk has ")
    assert "below cache.min_free (512.0 MiB (536870912 bytes))" in lines[0]
    assert "of 8.0 MiB (8388608 bytes)" in lines[0]
    seen = len(caplog.records)
    fs2 = core_filesystem(tmp_path, cmk_path, cache={"min_free": 1 << 20})  # fits: no warning
    assert fs2.recover() == 0
    assert [r for r in caplog.records[seen:] if r.levelno >= logging.WARNING] == []
    fs.close()
    fs2.close()


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.staging: cache dir \S+: its disk has 16\.0 MiB \(16777216 bytes\) "
                        r"free \(with the cached blocks it may drop\) of 16\.0 MiB")
def test_the_small_disk_warning_counts_the_cached_blocks_a_mount_may_drop(tmp_path, cmk_path, tmpfs, caplog):
    """Break trials BT8 and BT11: after a clean unmount the cached blocks it kept fill a small
    cache disk, and the next mount warned "its disk has 4.8 MiB free ... writes get ENOSPC",
    though the block cache drops those blocks as soon as anything needs the room."""
    tmpfs("cache", 16 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, cache={"min_free": 1 << 20, "max_size": 1 << 40})
        fs.store.local_disk = False  # (reads go through the block cache)
        data = os.urandom(11 << 20)
        await committed_file(fs, "f", data)
        assert await read_file(fs, "f") == data
        fs.close()  # (a clean unmount: its cached blocks are kept for the next mount)
        await fs.store.aclose()

    trio.run(main)
    for min_free, warned in ((3 << 20, False), (12 << 20, True)):  # free ~5 MiB, with the blocks ~13
        seen = len(caplog.records)
        fs = core_filesystem(tmp_path, cmk_path, cache={"min_free": min_free, "max_size": 1 << 40})
        assert warned or fs.cache.used >= 6 << 20  # (a larger min_free drops blocks as the cache loads)
        assert fs.recover() == 0
        lines = [r.getMessage() for r in caplog.records[seen:] if r.levelno >= logging.WARNING]
        assert len(lines) == warned, lines
        assert not warned or "(with the cached blocks it may drop)" in lines[0]
        fs.close()


# -- ENOSPC when close() seals: never claimed journaled, never deleted silently ----------------
def _fail_seal(monkeypatch) -> None:
    def seal_data(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(staging_mod.StagedFile, "seal_data", seal_data)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: staging 'pre/doc' failed",
                        r"ERROR ossfuse\.fs\.commit: 'pre/doc': its last changes \(a version of 2200 bytes\) could not be saved",
                        r"WARNING ossfuse\.writeback\.journal: unsaved changes of 'pre/doc' \(work file ")
def test_changes_that_could_not_be_sealed_are_named_as_lost_and_the_next_mount_says_so(tmp_path, cmk_path,
                                                                                        monkeypatch, caplog):
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node, h = await fs.create(fs.get(1), "doc", 0o600, os.O_RDWR, UID, GID)
        await fs.write(h, 0, DATA)
        with monkeypatch.context() as m:
            _fail_seal(m)
            with pytest.raises(FsError) as e:
                await fs.flush(h)
            assert e.value.errno == errno.ENOSPC
            await fs.release(h)
            assert await fs.drain() == 1
        journaled, lost = fs.pending_report()
        assert (journaled, lost) == ([], ["doc"])  # not claimed journaled
        line = [r.getMessage() for r in caplog.records if "could not be saved" in r.getMessage()]
        assert line == ["'pre/doc': its last changes (a version of 2200 bytes) could not be saved in the cache dir "
                        "(No space left on device) and are lost when this daemon exits; the bucket has "
                        "no version of it"]
        work = [n for n in os.listdir(fs.staging.dir) if n.endswith(".work")]
        assert len(work) == 1 and not [n for n in os.listdir(fs.staging.dir) if n.endswith(".json")]
        await _stop(fs)  # the daemon exits
        seen = len(caplog.records)
        fs2 = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        assert fs2.recover() == 0
        warnings = [r.getMessage() for r in caplog.records[seen:] if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].startswith(f"unsaved changes of 'pre/doc' (work file {fs.staging.dir}/{work[0]}, ")
        assert "are deleted" in warnings[0]
        assert os.listdir(fs2.staging.dir) == []
        await _stop(fs2)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: staging 'pre/doc' failed",
                        r"ERROR ossfuse\.fs\.commit: 'pre/doc': its last changes .* stays journaled",
                        r"WARNING ossfuse\.writeback\.journal: unsaved changes of 'pre/doc'",
                        r"WARNING ossfuse\.fs\.conflicts:")
def test_a_failed_seal_over_a_journaled_version_keeps_that_version_for_the_next_mount(tmp_path, cmk_path,
                                                                                      monkeypatch, caplog):
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        fs.store.fail(("put_file", "create_multipart"), error="temporary", count=None)  # the bucket is away
        node, h = await fs.create(fs.get(1), "doc", 0o600, os.O_RDWR, UID, GID)
        await fs.write(h, 0, DATA)
        await fs.flush(h)  # journaled
        await fs.write(h, 0, b"CHANGED")
        with monkeypatch.context() as m:
            _fail_seal(m)
            with pytest.raises(FsError) as e:
                await fs.flush(h)
            assert e.value.errno == errno.ENOSPC
            await fs.release(h)
            assert await fs.drain() == 1
        assert fs.pending_report() == ([("doc", "No space left on device")], ["doc"])
        assert any(f"its last saved version ({len(DATA)} bytes) stays journaled" in r.getMessage()
                   for r in caplog.records)
        await _stop(fs)
        fs2 = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        assert fs2.recover() == 1
        assert await fs2.drain() == 0
        assert await read_file(fs2, "doc") == DATA
        await _stop(fs2)

    trio.run(main)


# -- sealing needs no second copy of the file -------------------------------------------------
class _PositionalXor:
    """A stand-in envelope whose keystream depends on the byte position (a misplaced byte
    decrypts wrong), like AES-CTR."""

    def crypt(self, offset: int, data) -> bytes:
        return bytes(b ^ ((offset + i) * 7 & 0xFF) for i, b in enumerate(bytes(data)))


def _staged(tmp_path, data: bytes):
    st = staging_mod.Staging(str(tmp_path)).new(_PositionalXor())
    st.write(0, data)
    st.truncate(len(data) + 3 * staging_mod.BLOCK + 5)  # a hole at the end: zeros
    return st, data + bytes(3 * staging_mod.BLOCK + 5)


def test_sealing_converts_the_work_file_in_place_and_reads_meanwhile_are_right(tmp_path, monkeypatch):
    monkeypatch.setattr(staging_mod, "SEAL_CHUNK", 2 * staging_mod.BLOCK)  # many steps to race with
    st, expected = _staged(tmp_path, os.urandom(40 * staging_mod.BLOCK + 123))
    work_inode = os.stat(st.work_path).st_ino
    real_pwrite = st._pwrite

    def slow_pwrite(fd, data, offset):  # widen the window between the chunks
        real_pwrite(fd, data, offset)
        time.sleep(0.002)
    st._pwrite = slow_pwrite
    thread = threading.Thread(target=st.seal_data)
    thread.start()
    checked = 0
    rng = random.Random(5)
    while thread.is_alive() or not checked:
        off = rng.randrange(0, st.size)
        n = rng.randrange(1, 3 * staging_mod.BLOCK)
        assert st.read(off, n) == expected[off:off + n]
        checked += 1
    thread.join()
    assert checked > 10
    # the work file itself became the sealed data file: no second copy was written
    assert not os.path.exists(st.work_path) and os.stat(st.data_path).st_ino == work_inode
    assert os.path.getsize(st.data_path) == st.size
    st.finish_seal()
    with open(st.data_path, "rb") as f:
        assert _PositionalXor().crypt(0, f.read()) == expected
    assert st.read(0, st.size) == expected


def test_a_seal_that_cannot_reserve_its_space_changes_nothing(tmp_path, monkeypatch):
    st, expected = _staged(tmp_path, os.urandom(5 * staging_mod.BLOCK))

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(staging_mod.os, "posix_fallocate", no_space)
        with pytest.raises(OSError) as e:
            st.seal_data()
        assert e.value.errno == errno.ENOSPC
    assert st.write_error is None and not st.converted and os.path.exists(st.work_path)
    assert st.read(0, st.size) == expected
    st.write(0, b"still writable")  # room again: the version goes on
    expected = b"still writable" + expected[14:]
    st.seal()
    assert st.read(0, st.size) == expected


def test_a_seal_failing_half_way_marks_the_version_lost_and_reads_stay_right(tmp_path, monkeypatch):
    monkeypatch.setattr(staging_mod, "SEAL_CHUNK", staging_mod.BLOCK)
    st, expected = _staged(tmp_path, os.urandom(6 * staging_mod.BLOCK))
    real_pwrite, calls = st._pwrite, []

    def failing_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_pwrite(fd, data, offset)
    st._pwrite = failing_pwrite
    with pytest.raises(OSError):
        st.seal_data()
    assert st.write_error == errno.EIO and st.converted
    assert st.read(0, st.size) == expected  # two blocks converted, the rest still in slots
    with pytest.raises(OSError) as e:
        st.write(0, b"x")
    assert e.value.errno == errno.EIO
    st.discard()
    assert os.listdir(st.staging.dir) == []


def test_close_of_a_file_as_big_as_half_the_cache_disk_succeeds(tmp_path, cmk_path, tmpfs):
    """The break test: closing a 14 MiB file on a 24 MiB cache disk gave ENOSPC (the seal wrote
    a second copy next to the work file)."""
    tmpfs("cache", 24 << 20)
    payload = os.urandom(14 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 0})
        node, h = await fs.create(fs.get(1), "big", 0o600, os.O_RDWR, UID, GID)
        for off in range(0, len(payload), 1 << 20):
            await fs.write(h, off, payload[off:off + (1 << 20)])
        await fs.flush(h)  # sealed and journaled
        await fs.release(h)
        assert node.staged.sealed and node.staged.was_journaled
        assert os.path.getsize(node.staged.data_path) == len(payload)
        assert await fs.drain() == 0
        assert await read_file(fs, "big") == payload
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: staging 'pre/doc' failed half-way; its changes since its "
                        r"last good version are discarded")
def test_close_whose_in_place_seal_fails_half_way_keeps_the_last_good_version(tmp_path, cmk_path, monkeypatch):
    monkeypatch.setattr(staging_mod, "SEAL_CHUNK", staging_mod.BLOCK)
    real = staging_mod.StagedFile._seal_in_place

    def failing_seal(self):
        real_pwrite, calls = self._pwrite, []

        def pwrite(fd, data, offset):
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_pwrite(fd, data, offset)
        self._pwrite = pwrite
        real(self)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node = await committed_file(fs, "doc", DATA)
        h = await fs.open(node, os.O_RDWR)
        await fs.write(h, 0, b"X" * 3 * staging_mod.BLOCK)
        with monkeypatch.context() as m:
            m.setattr(staging_mod.StagedFile, "_seal_in_place", failing_seal)
            with pytest.raises(FsError) as e:
                await fs.flush(h)
            assert e.value.errno == errno.EIO
        assert node.staged is None  # back to the committed version at once
        for op in (lambda: fs.write(h, 0, b"y"), lambda: fs.flush(h)):
            with pytest.raises(FsError) as e:
                await op()
            assert e.value.errno == errno.EIO
        await fs.release(h)
        assert await fs.drain() == 0
        assert await read_file(fs, "doc") == DATA
        assert os.listdir(fs.staging.dir) == []
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: staging 'holey' failed.*No space left",
                        r"ERROR ossfuse\.fs\.commit: 'holey': its last changes \(a version of 33554432 bytes\) could not be saved",
                        r"WARNING ossfuse\.writeback\.journal: unsaved changes of 'holey' \(work file ",
                        r"WARNING ossfuse\.daemon: the unsaved changes of 1 file\(s\) left by an earlier run",
                        r"WARNING ossfuse\.writeback\.staging: cache dir")
def test_umount_names_the_file_whose_changes_could_not_be_saved_and_the_next_mount_warns(tmp_path, cmk_path, tmpfs):
    """The break test: ENOSPC at close, then ``ossfuse umount`` said the file "stays journaled"
    (exit 75) although only a work file existed, and the next mount deleted it silently."""
    from conftest import OSSFUSE, Mount
    m = Mount(str(tmp_path / "m"), cmk_path, "retry_interval = 3600", "")
    m.cache_on(tmpfs, 8 << 20)
    try:
        m.start()
        with pytest.raises(OSError) as e:
            with open(m.path("holey"), "wb") as f:
                f.truncate(32 << 20)  # a hole: no space until it is sealed
                f.write(b"x")
        assert e.value.errno == errno.ENOSPC  # close(): the sealed file cannot fit
        r = subprocess.run(OSSFUSE + ["status", m.mnt], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "\nnot saved:        holey (their close could not save" in r.stdout, r.stdout
        r = subprocess.run(OSSFUSE + ["umount", m.mnt], capture_output=True, text=True, timeout=120)
        m.pid = None
        assert r.returncode == 1, r.stderr
        assert "stays journaled" not in r.stderr and "stay journaled" not in r.stderr
        assert f"are lost: {m.mnt}/holey" in r.stderr
        assert "stay journaled" not in m.log()
        m.start()  # the next mount names what it deletes, and says it (a trial: in the log only)
        assert "unsaved changes of 'holey' (work file " in m.log()
        assert ("ossfuse: warning: the unsaved changes of 1 file(s) left by an earlier run (open when it crashed or "
                "was killed, or not savable at their close) are deleted: 'holey'; each file keeps its last saved "
                f"version, or is empty or absent if it had none (the log names each: {m.cache}/ossfuse.log)\n"
                ) in m.mount_stderr, m.mount_stderr
        assert not os.path.exists(m.path("holey"))  # never saved: it never existed in the bucket
        assert m.stop() == 0
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: staging 'pre/many' failed, the data is not safe yet: \[Errno 24\]")
def test_a_failed_seal_holds_no_descriptor_and_is_retried(tmp_path, cmk_path, monkeypatch):
    """Found by a trial: at the daemon's open-file limit, a seal that failed after converting
    the work file (its tags could not be computed: EMFILE) kept the file's descriptor; with
    thousands such, every later open failed and the mount stopped answering. A failed seal
    closes it (reopened when used); the next try seals and uploads the same content."""
    from ossfuse import integrity
    from ossfuse.fs import commit as commit_mod

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node, h = await fs.create(fs.get(1), "many", 0o644, os.O_RDWR, UID, GID)
        await fs.write(h, 0, DATA)
        real_seal = integrity.seal

        def no_descriptors(*a, **kw):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(commit_mod.integrity, "seal", no_descriptors)
        with pytest.raises(FsError) as e:
            await fs.flush(h)
        assert e.value.errno == errno.ENFILE  # the daemon's table, not the caller's
        st = node.staged
        assert st is not None and not st.sealed and st._work_fd == -1
        monkeypatch.setattr(commit_mod.integrity, "seal", real_seal)
        assert await read_file(fs, "many") == DATA  # reopened for the read
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert await read_file(fs, "many") == DATA
        assert (await fs.store.inner.head("pre/many")).size == len(DATA)
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.staging: cache dir .*: its disk has")
def test_mount_prints_that_the_cache_disk_is_small_for_min_free(tmp_path, cmk_path, tmpfs):
    """An operator trial: the warning was in the log only; `ossfuse mount` says it too."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path)
    tmpfs(m.cache, 8 << 20)  # min_free stays the default 512 MiB
    try:
        m.start()
        assert re.search(r"^ossfuse: warning: cache dir \S+: its disk has [\d.]+ MiB \(\d+ bytes\) free of 8\.0 MiB "
                         r"\(8388608 bytes\), below cache\.min_free", m.mount_stderr, re.M), m.mount_stderr
        assert m.log().count("its disk has") == 1  # logged once
        assert m.stop() == 0
    finally:
        m.cleanup()


@pytest.mark.parametrize("change", ["close of a sparse file", "first write to a file in the bucket"])
def test_a_cache_disk_full_of_cached_blocks_makes_room_for_a_seal_and_a_copy(tmp_path, cmk_path, tmpfs, change):
    """A break trial (BT8): with the cache disk almost all cached blocks (read from the bucket,
    droppable at will), the close of a file whose sealed size did not fit (a 20 MiB sparse
    file) and the first write to a file in the bucket (its content copied into staging before
    the write) failed with ENOSPC, and the close was retried and failing until the unmount
    lost it; only a write evicted. Now each evicts cached blocks, as a write does, and
    succeeds while the blocks can make room."""
    tmpfs("cache", 48 << 20)
    files = {name: os.urandom(14 << 20) for name in ("a", "b")}

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 0, "max_size": 1 << 40})
        fs.store.local_disk = False  # as on OSS: reads go through the block cache
        for name, data in files.items():
            await committed_file(fs, name, data)
        for name, data in files.items():  # ~28 MiB of cached blocks on the 48 MiB disk
            assert await read_file(fs, name) == data
        assert fs.cache.used >= 24 << 20
        free = os.statvfs(tmp_path / "cache").f_bavail * os.statvfs(tmp_path / "cache").f_frsize
        if change == "close of a sparse file":
            size = free + (8 << 20)  # fits only once cached blocks go
            node, h = await fs.create(fs.get(1), "sparse", 0o600, os.O_RDWR, UID, GID)
            await fs.write(h, size - 5, b"hello")
            evicted = fs.cache.stats["evicted_bytes"]
            await fs.flush(h)
            assert fs.cache.stats["evicted_bytes"] > evicted  # blocks went to make the room
            await fs.release(h)
            assert node.staged.sealed and node.staged.was_journaled
            assert await fs.drain() == 0
            assert await read_file(fs, "sparse") == bytes(size - 5) + b"hello"
        else:
            await committed_file(fs, "c", os.urandom(4096))  # (uploaded: no room taken)
            big = os.urandom(free + (4 << 20))  # its copy fits only once cached blocks go
            node = await committed_file(fs, "c", big)
            fs.cache.drop(node.version.key, node.version.etag)
            for name, data in files.items():  # the disk full of cached blocks again
                assert await read_file(fs, name) == data
            h = await fs.open(node, os.O_RDWR)
            evicted = fs.cache.stats["evicted_bytes"]
            await fs.write(h, 100, b"X")
            assert fs.cache.stats["evicted_bytes"] > evicted  # blocks went to make the room
            await fs.flush(h)
            await fs.release(h)
            assert await fs.drain() == 0
            assert await read_file(fs, "c") == big[:100] + b"X" + big[101:]
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: staging 'pre/f' failed: \[Errno 28\]")
def test_a_first_write_whose_copy_fails_for_space_is_a_lost_write_on_its_handle(tmp_path, cmk_path, monkeypatch):
    """The first write to a file in the bucket copies its content into staging first; when
    that copy failed with ENOSPC, the handle's later writes (once space came back) and its
    close succeeded, and the file was saved without the failed write (a break trial, BT8),
    though a lost write fails every later write, fsync and close on its handle (semantics.md)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node = await committed_file(fs, "f", DATA)
        h = await fs.open(node, os.O_RDWR)
        with monkeypatch.context() as m:
            _fail_pwrite(m)
            with pytest.raises(FsError) as e:
                await fs.write(h, 0, b"lost")
        assert e.value.errno == errno.ENOSPC
        for op in (fs.write(h, 10, b"later"), fs.fsync(h), fs.flush(h)):
            with pytest.raises(FsError) as e:
                await op
            assert e.value.errno == errno.ENOSPC
        await fs.release(h)
        assert await fs.drain() == 0
        assert await read_file(fs, "f") == DATA  # the last good version
        h = await fs.open(node, os.O_RDWR)  # a new descriptor starts clean
        await fs.write(h, 0, b"fresh")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert await read_file(fs, "f") == b"fresh" + DATA[5:]
        await _stop(fs)

    trio.run(main)


async def _copy_in(fs, name: str, data: bytes, chunk: int = 1 << 20):
    """cp: create ``name``, write ``data`` a chunk at a time, close (flush and release, as the
    kernel does also after a failed write); its node. Raises the first FsError."""
    node, h = await fs.create(fs.get(1), name, 0o600, os.O_WRONLY, UID, GID)
    try:
        for off in range(0, len(data), chunk):
            await fs.write(h, off, data[off:off + chunk])
    except FsError:
        with contextlib.suppress(FsError):
            await fs.flush(h)
        await fs.release(h)
        raise
    try:
        await fs.flush(h)
    finally:
        await fs.release(h)
    return node


# (reading them back, read-ahead chunks in flight can outrun the tiny disk's evictions: read uncached, said once)
@pytest.mark.expect_log(r"WARNING ossfuse\.cache: cache disk cannot take more blocks")
def test_writers_on_a_full_cache_disk_wait_for_the_uploads_that_free_it(tmp_path, cmk_path, tmpfs):
    """New-user trial NU5: a burst of copies onto a small cache disk failed with ENOSPC while
    the staged versions that filled it waited out upload_delay. A writer that finds the disk
    full now starts the queued uploads at once and waits, without its file's lock, for one to
    end (its staged data is then droppable cache), then writes again."""
    tmpfs("cache", 24 << 20)
    files = {f"f{i}": os.urandom(6 << 20) for i in range(6)}  # 36 MiB through a 24 MiB disk

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 2 << 20, "max_size": 1 << 40})
        fs.store.local_disk = False  # as on OSS: an upload's file becomes cached blocks
        async with trio.open_nursery() as nursery:
            fs.scheduler.nursery = nursery
            for _ in range(2):
                nursery.start_soon(fs.upload_worker)
            started = trio.current_time()
            for name, data in files.items():
                await _copy_in(fs, name, data)
            assert trio.current_time() - started < 30  # uploads ran without their hour's delay
            assert fs.scheduler.stats["uploaded"] >= 2  # (the writers waited for them)
            assert await fs.drain() == 0
            nursery.cancel_scope.cancel()
        for name, data in files.items():
            assert await read_file(fs, name) == data
        await _stop(fs)

    trio.run(main)  # (no WARNING line but those declared: conftest)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: staging a write to 'pre/f2' failed.*No space left")
@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'pre/f[01]' failed; the data stays staged")
def test_a_writer_on_a_full_cache_disk_fails_at_once_when_no_upload_can_free_it(tmp_path, cmk_path, tmpfs, caplog):
    """The store refuses every upload (a failed one waits for its retry_interval, and frees
    nothing): a write that finds the cache disk full fails with ENOSPC without waiting, as
    before, with one ERROR line naming the file."""
    tmpfs("cache", 24 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, retry_interval=3600.0,
                             cache={"min_free": 2 << 20, "max_size": 1 << 40})
        fs.store.fail(("put_file", "create_multipart"), error="temporary", count=None)
        async with trio.open_nursery() as nursery:
            fs.scheduler.nursery = nursery
            nursery.start_soon(fs.upload_worker)
            await _copy_in(fs, "f0", os.urandom(9 << 20))
            await _copy_in(fs, "f1", os.urandom(9 << 20))
            started = trio.current_time()
            with pytest.raises(FsError) as e:
                await _copy_in(fs, "f2", os.urandom(9 << 20))
            assert e.value.errno == errno.ENOSPC
            assert trio.current_time() - started < 10  # the failed uploads were waited for, not ROOM_WAIT
            assert fs.scheduler.stats["upload_failures"] >= 2
            nursery.cancel_scope.cancel()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "pre/f2" in r.getMessage()]
        assert len(errors) == 1, errors
        await _stop(fs)

    trio.run(main)


# (the copy's reads of the bucket's version find the disk full: served without caching, said once)
@pytest.mark.expect_log(r"WARNING ossfuse\.cache: cache disk cannot take more blocks")
def test_a_first_write_to_a_file_in_the_bucket_waits_for_room_for_its_copy(tmp_path, cmk_path, tmpfs):
    """The first write to a file in the bucket copies its content into staging (no lock held);
    on a cache disk full of staged versions waiting for their upload, the copy waits for
    those uploads as a write does, instead of failing with ENOSPC."""
    tmpfs("cache", 24 << 20)
    big = os.urandom(10 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 2 << 20, "max_size": 1 << 40})
        fs.store.local_disk = False
        node = await committed_file(fs, "big", big)
        fs.cache.drop(node.version.key, node.version.etag)
        async with trio.open_nursery() as nursery:
            fs.scheduler.nursery = nursery
            nursery.start_soon(fs.upload_worker)
            for i in range(2):  # 16 MiB staged, queued for an hour: no room for the 10 MiB copy
                await _copy_in(fs, f"s{i}", os.urandom(8 << 20))
            uploaded = fs.scheduler.stats["uploaded"]  # ("big")
            h = await fs.open(node, os.O_RDWR)
            await fs.write(h, 100, b"X")
            assert fs.scheduler.stats["uploaded"] > uploaded  # the copy waited for one
            await fs.flush(h)
            await fs.release(h)
            assert await fs.drain() == 0
            nursery.cancel_scope.cancel()
        assert await read_file(fs, "big") == big[:100] + b"X" + big[101:]
        await _stop(fs)

    trio.run(main)  # (no WARNING line but those declared: conftest)


def test_a_close_on_a_full_cache_disk_waits_for_the_uploads_that_free_it(tmp_path, cmk_path, tmpfs):
    """Break trial BT11: the write waited for room, its close did not: sealing a file (here a
    sparse one, whose holes the seal reserves) or writing its journal record on a disk full
    of staged versions queued for upload failed with ENOSPC (cp: "failed to close"), though
    the uploads that would free the disk were about to run. The close now waits for them as
    a write does."""
    tmpfs("cache", 24 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 2 << 20, "max_size": 1 << 40})
        fs.store.local_disk = False
        async with trio.open_nursery() as nursery:
            fs.scheduler.nursery = nursery
            nursery.start_soon(fs.upload_worker)
            for i in range(2):  # 16 MiB staged, queued for an hour
                await _copy_in(fs, f"s{i}", os.urandom(8 << 20))
            node, h = await fs.create(fs.get(1), "sparse", 0o600, os.O_WRONLY, UID, GID)
            await fs.write(h, 10 << 20, b"end")  # its seal reserves 10 MiB: more than is free
            assert fs.scheduler.stats["uploaded"] == 0
            await fs.flush(h)
            await fs.release(h)
            assert fs.scheduler.stats["uploaded"] >= 1  # the close waited for one
            assert node.staged.was_journaled
            assert await fs.drain() == 0
            nursery.cancel_scope.cancel()
        assert await read_file(fs, "sparse") == bytes(10 << 20) + b"end"
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: journaling 'pre/f' failed, the data is not safe yet: "
                        r"\[Errno 28\]")
def test_a_sealed_version_whose_record_finds_no_room_is_uploaded_without_one(tmp_path, cmk_path, monkeypatch):
    """Break trial BT11: with the cache disk full, 1,731 closed files were sealed but had no
    room for their journal records; their uploads wrote the record first, failed the same
    way, and retried for ever: nothing freed the disk, and the unmount lost them all. An
    upload now goes ahead without the record it has no room for (it makes the version safe
    itself)."""
    from ossfuse.writeback import journal as journal_mod

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node, h = await fs.create(fs.get(1), "f", 0o600, os.O_WRONLY, UID, GID)
        await fs.write(h, 0, DATA)
        with monkeypatch.context() as m:
            def no_room(*args, **kw):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            m.setattr(journal_mod, "record", no_room)
            with pytest.raises(FsError) as e:
                await fs.flush(h)  # nothing to wait for: the close says so (one ERROR line)
            assert e.value.errno == errno.ENOSPC
            await fs.release(h)
            assert node.staged.sealed and not node.staged.was_journaled
            assert await fs.drain() == 0  # (the unmount's drain: uploaded all the same)
        assert node.staged is None
        assert await read_file(fs, "f") == DATA
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: staging a write to 'pre/w' failed.*No space left")
def test_a_write_waits_for_room_no_longer_than_the_offline_timeout(tmp_path, cmk_path, tmpfs):
    """Break trial BT11: a write waiting for a slow upload held its process, unkillable (the
    kernel cannot interrupt a FUSE request), for 60 s, and `ossfuse umount` gave up on the
    mount after 30. A request waits at most the store's offline_timeout, in all (as any
    request to a store that does not answer), then fails with ENOSPC."""
    tmpfs("cache", 24 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 2 << 20, "max_size": 1 << 40})
        fs.store.local_disk = False
        assert fs.scheduler.room_wait == fs.cfg.store.offline_timeout == 5.0
        fs.scheduler.room_wait = 1.0
        fs.store.delay(("put_file", "upload_part"), 3600.0)  # uploads that never end
        async with trio.open_nursery() as nursery:
            fs.scheduler.nursery = nursery
            nursery.start_soon(fs.upload_worker)
            for i in range(2):
                await _copy_in(fs, f"s{i}", os.urandom(9 << 20))
            started = trio.current_time()
            with pytest.raises(FsError) as e:
                await _copy_in(fs, "w", os.urandom(9 << 20))
            assert e.value.errno == errno.ENOSPC
            assert 1.0 <= trio.current_time() - started < 3.0
            nursery.cancel_scope.cancel()
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: staging a write to 'pre/big' failed.*keeps 2\.0 MiB")
def test_writes_leave_room_on_the_cache_disk_for_journal_records(tmp_path, cmk_path, tmpfs):
    """Break trial BT11: writers filled the cache disk to its last byte; then no closed file
    had room for its journal record, and the log (on the same disk) was cut mid-line. Writes
    that grow a staged version now leave WRITE_RESERVE free: a file written meanwhile still
    closes, journaled."""
    from ossfuse.writeback.staging import WRITE_RESERVE
    cache = tmpfs("cache", 16 << 20)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0, cache={"min_free": 0, "max_size": 1 << 40})
        small, hs = await fs.create(fs.get(1), "small", 0o600, os.O_WRONLY, UID, GID)
        await fs.write(hs, 0, b"closed after the disk filled\n")
        with pytest.raises(FsError) as e:
            await _copy_in(fs, "big", os.urandom(32 << 20))
        assert e.value.errno == errno.ENOSPC
        st = os.statvfs(cache)
        assert st.f_bavail * st.f_frsize >= WRITE_RESERVE - (1 << 20)
        await fs.flush(hs)  # its record fits
        await fs.release(hs)
        assert small.staged.was_journaled
        assert await fs.drain() == 0
        assert await read_file(fs, "small") == b"closed after the disk filled\n"
        await _stop(fs)

    trio.run(main)
