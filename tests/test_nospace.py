"""A full cache disk (staging, journal) or a full bucket disk: the caller gets ENOSPC and one log
line naming the object and the reason; never garbage plaintext, never a write silently dropped,
never a claim that lost data is journaled (docs/semantics.md "Durability", docs/design.md
"Write-back and the journal").

Core tests over tests/fakes (ENOSPC injected into the staging module's ``os.pwrite``, or a
FaultStore error caused by an ``OSError``); the real full disks are small tmpfs mounts made
and removed by the ``tmpfs`` fixture (root only: skipped otherwise)."""
from __future__ import annotations

import errno
import logging
import os
import subprocess

import pytest
import trio

from fakes.core import UID, GID, committed_file, core_filesystem
from ossfuse.fs import FsError
from ossfuse.store.base import StoreError
from ossfuse.writeback import staging as staging_mod

DATA = b"the last good version\n" * 100


def _fail_pwrite(monkeypatch, err: int = errno.ENOSPC) -> None:
    def pwrite(fd, data, offset):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(staging_mod.os, "pwrite", pwrite)


async def _read(fs, name: str) -> bytes:
    node = await fs.lookup(fs.get(1), name)
    h = await fs.open(node, os.O_RDONLY)
    try:
        return await fs.read(h, 0, 1 << 30)
    finally:
        await fs.release(h)


async def _stop(fs) -> None:
    fs.close()
    await fs.store.aclose()


@pytest.mark.expect_log(r"ossfuse\.fs\.files: staging a write to 'pre/doc' failed",
                        r"ossfuse\.fs\.commit: 'pre/doc': the changes since its last good version are discarded")
def test_after_a_lost_write_every_later_write_fsync_and_close_on_the_handle_fails(tmp_path, cmk_path, monkeypatch):
    """Space comes back after one write failed: the later writes through that handle must not
    look saved (they would be discarded with the failed one at close)."""
    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=3600.0)
        node = await committed_file(fs, "doc", DATA)
        h = await fs.open(node, os.O_RDWR)
        await fs.write(h, 0, b"good write ")
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
        assert await fs.drain() == 0
        assert await _read(fs, "doc") == DATA  # the last good version, whole
        assert (await fs.store.inner.head("pre/doc")).size == len(DATA)
        # a new handle starts clean
        h2 = await fs.open(node, os.O_RDWR)
        await fs.write(h2, 0, b"NEW")
        await fs.flush(h2)
        await fs.release(h2)
        assert await fs.drain() == 0
        assert await _read(fs, "doc") == b"NEW" + DATA[3:]
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ossfuse\.fs\.files: staging a write to 'pre/doc' failed",
                        r"ossfuse\.fs\.commit: 'pre/doc': the changes since its last good version are discarded")
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
        assert await _read(fs, "doc") == DATA
        await _stop(fs)

    trio.run(main)
