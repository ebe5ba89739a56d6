"""Stopping a mount while a process holds a file open for writing (docs/semantics.md,
"Lifecycle"): ``ossfuse umount`` refuses (EBUSY, as for any busy filesystem); SIGTERM, also
after ``fusermount3 -uz``, stores the data written so far and says so in one WARNING naming
the file, instead of passing it off as a completed close."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from conftest import OSSFUSE
from ossfuse.registry import process_alive, read_registry

WARNING = r"WARNING ossfuse\.daemon: 'f' was open for writing at shutdown: stored the \d+ bytes written so far"


def _wait_exit(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.05)


def _close_after_the_daemon_ended(fd: int) -> None:
    """close() of a file of a mount whose daemon is gone: its flush gets ENOTCONN."""
    try:
        os.close(fd)
    except OSError as e:
        assert e.errno == errno.ENOTCONN, e


def _read_after_remount(m, name: str) -> bytes:
    m.start()
    with open(m.path(name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("store_kind", ["local"], indirect=True)
@pytest.mark.expect_log(WARNING)
def test_umount_refuses_an_open_writer_and_sigterm_stores_what_it_wrote(make_mount):
    m = make_mount()
    with open(m.path("f"), "wb") as f:
        f.write(b"the complete old version\n")
        os.fsync(f.fileno())
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"half of the ")
        r = subprocess.run(OSSFUSE + ["umount", m.mnt], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "busy" in r.stderr, r.stderr  # EBUSY, like any filesystem in use
        assert os.path.ismount(m.mnt)
        os.write(fd, b"new one")  # the mount still serves the writer
        pid = m.pid
        os.kill(pid, signal.SIGTERM)
        _wait_exit(pid)
        m.pid = None
        with pytest.raises(OSError) as e:
            os.write(fd, b" and more")
        assert e.value.errno in (errno.ENOTCONN, errno.ENODEV, errno.EIO), e.value
    finally:
        _close_after_the_daemon_ended(fd)
    assert not os.path.ismount(m.mnt)
    assert read_registry(m.mnt)["status"] == 0  # what was written is in the bucket
    log = m.log()
    assert "'f' was open for writing at shutdown: stored the 19 bytes written so far" in log
    assert log.count("was open for writing at shutdown") == 1
    assert _read_after_remount(m, "f") == b"half of the new one"


@pytest.mark.parametrize("store_kind", ["local"], indirect=True)
@pytest.mark.expect_log(WARNING)
def test_lazy_unmount_then_sigterm_stores_what_the_writer_wrote(make_mount):
    """``fusermount3 -uz`` detaches the mount but the daemon goes on serving the open file
    (the kernel keeps the connection while it is open); SIGTERM then stores what was written
    by then, with the same warning."""
    m = make_mount()
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"written before the lazy unmount; ")
        subprocess.run(["fusermount3", "-uz", m.mnt], check=True, capture_output=True)
        assert not os.path.ismount(m.mnt)
        os.write(fd, b"and after it")
        pid = m.pid
        assert process_alive(pid)
        os.kill(pid, signal.SIGTERM)
        _wait_exit(pid)
        m.pid = None
    finally:
        _close_after_the_daemon_ended(fd)
    assert read_registry(m.mnt)["status"] == 0
    assert "'f' was open for writing at shutdown: stored the 45 bytes written so far" in m.log()
    assert _read_after_remount(m, "f") == b"written before the lazy unmount; and after it"
