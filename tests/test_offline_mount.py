"""Offline (issue 17) through a real mount: the OSS test server stops answering while mounted;
what the mount has listed and read stays readable, new files are journaled, requests that need
the store fail with EIO within ``store.offline_timeout``, ``ossfuse status`` says since when,
and when the server is back everything written offline lands in the bucket."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time

import pytest

from conftest import OSSFUSE, Mount

pytestmark = pytest.mark.timeout(300)

OFFLINE_TIMEOUT = 2.0
OFFLINE = r"ossfuse\.store\.health: store unreachable, working offline from the cache"


def status(m: Mount, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(OSSFUSE + ["status", *args, m.mnt], capture_output=True, text=True, timeout=30)


def status_doc(m: Mount) -> dict:
    r = status(m, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(predicate, seconds: float, what: str) -> float:
    """Poll ``predicate`` every 0.05 s; returns the seconds it took. Fails after ``seconds``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def drop_kernel_caches() -> None:
    """Make the kernel ask the mount again (its page cache would hide the mount's own cache)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


@pytest.mark.expect_log(OFFLINE, r"ossfuse\.fs\.namespace: mkdir 'docs/sub/' failed: store offline",
                        r"ossfuse\.fs\.files: reading 'cold' failed")
def test_server_stops_while_mounted_cache_stays_usable_and_offline_writes_land(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    # retry_interval 600 s: only the return online can start the pending uploads in time
    m.write_config("retry_interval = 600\nupload_delay = 0.2",
                   store_options=f"offline_timeout = {OFFLINE_TIMEOUT}\nretries = 8")
    files = {"docs/a.txt": b"alpha\n" * 1000, "docs/b.bin": os.urandom(3 * 1024 * 1024 + 5),
             "top.txt": b"top level\n", "cold": os.urandom(100_000)}
    m.start()
    try:
        os.mkdir(m.path("docs"))
        for name, data in files.items():
            with open(m.path(name), "wb") as f:
                f.write(data)
        wait_for(lambda: status_doc(m)["pending_uploads"]["count"] == 0, 60, "uploads before the outage")
        m.remount(clear_cache=True)  # a cold block cache: only what is read below gets cached
        assert sorted(os.listdir(m.mnt)) == ["cold", "docs", "top.txt"]
        assert sorted(os.listdir(m.path("docs"))) == ["a.txt", "b.bin"]
        for name in ("docs/a.txt", "docs/b.bin", "top.txt"):
            with open(m.path(name), "rb") as f:
                assert f.read() == files[name]
        assert os.stat(m.path("cold")).st_size == 100_000  # known, never read

        oss_server.stop()  # connections refused from now on
        time.sleep(1.0)  # attributes and names (timeouts 0.5 s) are stale: the mount must answer
        drop_kernel_caches()
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:  # its blocks were never fetched: needs the store
            with open(m.path("cold"), "rb") as f:
                f.read()
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t0 < OFFLINE_TIMEOUT + 3.0
        doc = status_doc(m)
        assert doc["store_health"]["online"] is False
        assert time.time() - 60 < doc["store_health"]["offline_since"] <= time.time()
        text = status(m).stdout
        assert "OFFLINE since " in text and time.strftime("%Y-%m-%d", time.localtime()) in text
        assert re.search(r"^ossfuse_store_offline\{[^}]*\} 1$", status(m, "--prometheus").stdout, re.M)

        t0 = time.monotonic()
        assert sorted(os.listdir(m.mnt)) == ["cold", "docs", "top.txt"]
        assert sorted(os.listdir(m.path("docs"))) == ["a.txt", "b.bin"]
        for name in ("docs/a.txt", "docs/b.bin", "top.txt"):
            assert os.stat(m.path(name)).st_size == len(files[name])
            with open(m.path(name), "rb") as f:
                assert f.read() == files[name], name
        offline_files = {"docs/new.txt": b"written offline\n" * 100, "top-new.bin": os.urandom(200_000)}
        for name, data in offline_files.items():
            with open(m.path(name), "wb") as f:
                f.write(data)
        with open(m.path("docs/new.txt"), "rb") as f:
            assert f.read() == offline_files["docs/new.txt"]
        assert sorted(os.listdir(m.path("docs"))) == ["a.txt", "b.bin", "new.txt"]
        with pytest.raises(OSError) as ei:  # a directory marker must be put now
            os.mkdir(m.path("docs/sub"))
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t0 < OFFLINE_TIMEOUT + 5.0  # all that did not wait on the store
        assert status_doc(m)["pending_uploads"]["count"] == 2

        oss_server.start()
        wait_for(lambda: m.head("docs/new.txt") is not None and m.head("top-new.bin") is not None, 20,
                 "uploads once the store is back")
        wait_for(lambda: status_doc(m)["store_health"]["online"], 10, "online in status")
        assert "OFFLINE" not in status(m).stdout
        assert re.search(r"^ossfuse_store_offline\{[^}]*\} 0$", status(m, "--prometheus").stdout, re.M)
        log = m.log()
        assert log.count("store unreachable, working offline") == 1
        assert "store is back online after" in log
        m.remount(clear_cache=True)  # a fresh mount reads everything from the bucket
        for name, data in {**files, **offline_files}.items():
            with open(m.path(name), "rb") as f:
                assert f.read() == data, name
    finally:
        oss_server.start()
        m.cleanup()


@pytest.mark.expect_log(OFFLINE)
def test_a_hung_server_makes_the_mount_offline_within_the_offline_timeout(tmp_path, cmk_path, oss_server):
    """A server that accepts connections and never answers (SIGSTOPped): `ls` of a directory
    and a `cat` of a cached file in another one each finish within the offline timeout (plus
    slack), from what the mount knows, not after the 60 s read timeout (new-user test: 60 s)."""
    import signal
    import threading

    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("upload_delay = 0.2", store_options=f"offline_timeout = {OFFLINE_TIMEOUT}")
    m.start()
    pid = oss_server._proc.pid
    try:
        os.mkdir(m.path("a"))
        os.mkdir(m.path("b"))
        with open(m.path("a/x"), "wb") as f:
            f.write(b"x" * 1000)
        with open(m.path("b/f"), "wb") as f:
            f.write(b"cached " * 1000)
        wait_for(lambda: status_doc(m)["pending_uploads"]["count"] == 0, 60, "uploads before the outage")
        assert sorted(os.listdir(m.path("a"))) == ["x"]
        with open(m.path("b/f"), "rb") as f:
            assert f.read() == b"cached " * 1000
        time.sleep(1.0)  # names and attributes (timeouts 0.5 s) are stale: the mount asks the store
        drop_kernel_caches()
        os.kill(pid, signal.SIGSTOP)
        took: dict[str, float] = {}
        got: dict[str, object] = {}

        def ls() -> None:
            t0 = time.monotonic()
            got["ls"] = sorted(os.listdir(m.path("a")))
            took["ls"] = time.monotonic() - t0

        t = threading.Thread(target=ls)
        t.start()
        time.sleep(0.2)  # the listing is outstanding
        t0 = time.monotonic()
        with open(m.path("b/f"), "rb") as f:
            assert f.read() == b"cached " * 1000
        took["cat"] = time.monotonic() - t0
        t.join(60)
        assert got["ls"] == ["x"]
        assert took["ls"] < OFFLINE_TIMEOUT + 3.0, took
        assert took["cat"] < OFFLINE_TIMEOUT + 3.0, took
        assert status_doc(m)["store_health"]["online"] is False
        # Offline now: the daemon probes the hung server in the background, each probe lasting
        # the offline timeout. Requests never wait for one, nor are one (a trial: with every
        # request queued behind the probes, `ls` of cached directories took 5-120 s).
        slowest = 0.0
        end = time.monotonic() + 2.5 * OFFLINE_TIMEOUT
        while time.monotonic() < end:
            time.sleep(0.6)  # past the attribute and entry timeouts: the mount asks (its cache answers)
            t0 = time.monotonic()
            assert sorted(os.listdir(m.path("a"))) == ["x"]
            assert os.stat(m.path("b/f")).st_size == 7000
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 1.0, slowest
    finally:
        os.kill(pid, signal.SIGCONT)
        m.cleanup()
