"""Offline (issue 17): with the store unreachable, what the mount has cached stays usable and
what needs the store fails fast with EIO (docs/design.md "Offline", docs/semantics.md).

Core tests run the Filesystem with no kernel over ``FaultStore`` (tests/fakes) whose every call
raises a temporary failure while "down", with a ``StoreHealth`` attached as the daemon does;
one test drives a real ``OssStore`` against a closed port to check the retry loop's bound.
The mount test (stop the OSS test server while mounted) is in test_offline_mount.py.
"""
from __future__ import annotations

import contextlib
import functools
import errno
import logging
import os
import socket
import threading
import time
from typing import Iterator

import pytest
import trio
import trio.testing

from fakes.core import committed_file, core_filesystem, core_store, exists, listed_names, read_node
from fakes.raw_http import raw_server
from ossfuse.fs import FsError
from ossfuse.store.base import StoreUnavailable
from ossfuse.store.health import StoreHealth, StoreOffline

OFFLINE = r"store unreachable, working offline from the cache"


def _remote_store(root):
    """A FaultStore over a local bucket that the mount treats as remote (reads go through the
    block cache, uploads through the write-back queue), as on OSS."""
    store = core_store(root)
    store.local_disk = False
    return store



@pytest.mark.expect_log(OFFLINE)
def test_cached_listing_and_read_work_offline_and_uncached_ones_fail_fast(tmp_path, cmk_path, caplog):
    caplog.set_level(logging.INFO, logger="ossfuse.store.health")
    caplog.set_level(logging.INFO, logger="ossfuse.fs")

    async def main():
        # attr/entry timeouts far shorter than the outage: every answer below is from the cache
        fs = core_filesystem(tmp_path, cmk_path, _remote_store(tmp_path), entry_timeout=0.05, attr_timeout=0.05,
                             cache={"block_size": 4096})
        health = StoreHealth(timeout=2.0, probe_interval=60.0)  # no probe gets through in this test
        fs.track_store_health(health)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(fs.upload_worker)
            root = fs.get(1)
            d = await fs.mkdir(root, "d", 0o750, 1, 2)
            a = await committed_file(fs, "a", b"alpha" * 2000, d)  # 10000 bytes: 3 blocks
            await committed_file(fs, "b", b"bravo" * 10, d)
            big = await committed_file(fs, "big", os.urandom(24 << 20), d)  # 24 MiB
            # another client's directory: this mount looks it up but never lists it
            writer = core_filesystem(tmp_path / "writer", cmk_path, fs.store.inner, keyring=fs.keyring)
            await committed_file(writer, "x", b"x", await writer.mkdir(writer.get(1), "other", 0o755, 1, 2))
            writer.close()
            other = await fs.lookup(root, "other")
            assert await listed_names(fs, d) == ["a", "b", "big"]
            assert await read_node(fs, a, 20000) == b"alpha" * 2000  # every block of a cached
            fs.cache.drop(big.version.key, big.version.etag)  # as if another client wrote it
            h = await fs.open(big, os.O_RDONLY)
            first = await fs.read(h, 0, 4096)  # only big's first blocks get cached
            await fs.release(h)

            fs.store.fail("*", count=None)  # the store is down: every call is refused
            await trio.sleep(0.1)  # every attribute and name is stale now
            t0 = time.monotonic()
            assert await listed_names(fs, d) == ["a", "b", "big"]
            assert health.offline and health.offline_since is not None
            assert (await fs.lookup(d, "a")) is a and a.size == 10000
            assert not await exists(fs, "nothing", d)  # the listing proves the name absent
            assert await read_node(fs, a, 20000) == b"alpha" * 2000
            h = await fs.open(big, os.O_RDONLY)
            assert await fs.read(h, 0, 4096) == first
            for _ in range(3):  # (each failure is said once per outage: checked below)
                with pytest.raises(FsError) as ei:  # an uncached block needs the store
                    await fs.read(h, (24 << 20) - 4096, 4096)  # far past any read-ahead of the first read
                assert ei.value.errno == errno.EIO
            await fs.release(h)
            for unknown in (lambda: listed_names(fs, other), lambda: fs.lookup(other, "x")) * 3:
                with pytest.raises(FsError) as ei:  # never listed: nothing to answer from
                    await unknown()
                assert ei.value.errno == errno.EIO
            assert time.monotonic() - t0 < 1.0  # no call waited for the store
            calls = fs.store.counts["head"] + fs.store.counts["list"] + fs.store.counts["get_range"]
            await listed_names(fs, d)
            await fs.lookup(d, "b")
            # failing fast: the store is not even asked while offline (no probe is due)
            assert fs.store.counts["head"] + fs.store.counts["list"] + fs.store.counts["get_range"] == calls
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "ossfuse.store.health"]
    assert len(warnings) == 1  # one line for the outage, not one per request
    # and one INFO line for each thing the outage made fail, however often it failed (eight
    # ls -lR at once logged eight)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name.startswith("ossfuse.fs")]
    assert [m.split(":")[0] for m in said] == [
        "reading 'pre/d/big' failed", "listing 'pre/other/'", "lookup of 'pre/other/x'"], said


@pytest.mark.expect_log(OFFLINE)
@pytest.mark.expect_log(r"copy of 'pre/d/old' .* failed: store offline since")  # the rename's one line
@pytest.mark.expect_log(r"mkdir 'pre/d/sub/' failed: store offline since")
@pytest.mark.expect_log(r"'pre/d/old'.*store offline since.*delete 'pre/d/old' not tried")
def test_writes_while_offline_are_journaled_and_uploaded_as_soon_as_the_store_answers(tmp_path, cmk_path, caplog):
    caplog.set_level(logging.INFO, logger="ossfuse.store.health")

    async def main():
        # retry_interval 600 s: only the back-online resume can upload within this test
        fs = core_filesystem(tmp_path, cmk_path, _remote_store(tmp_path), entry_timeout=0.05, attr_timeout=0.05,
                             retry_interval=600.0)
        health = StoreHealth(timeout=2.0, probe_interval=0.2)
        fs.track_store_health(health)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(fs.upload_worker)
            nursery.start_soon(health.watch, lambda: fs.store.list("pre/", max_keys=1))
            root = fs.get(1)
            d = await fs.mkdir(root, "d", 0o755, 1, 2)
            await committed_file(fs, "old", b"old", d)
            assert await listed_names(fs, d) == ["old"]
            down = fs.store.fail("*", count=None)
            await trio.sleep(0.1)
            node, h = await fs.create(d, "new", 0o640, os.O_RDWR, 1, 2)
            assert await fs.write(h, 0, b"written offline") == 15
            await fs.flush(h)
            await fs.release(h)
            await trio.sleep(0.3)  # its upload was tried and failed
            assert health.offline
            assert await fs.store.inner.head("pre/d/new") is None
            assert node.staged is not None  # journaled, pending
            assert await listed_names(fs, d) == ["new", "old"]
            assert await read_node(fs, node, 100) == b"written offline"
            with pytest.raises(FsError) as ei:  # a rename of a committed object needs the store now
                await fs.rename(d, "old", d, "older", 0)
            assert ei.value.errno == errno.EIO
            with pytest.raises(FsError) as ei:  # so does an unlink of a committed object
                await fs.unlink(d, "old")
            assert ei.value.errno == errno.EIO
            with pytest.raises(FsError) as ei:  # a directory is a marker object put at once
                await fs.mkdir(d, "sub", 0o755, 1, 2)
            assert ei.value.errno == errno.EIO
            assert await listed_names(fs, d) == ["new", "old"]  # nothing of the failed ones shows
            down.active = False  # the store is back
            t0 = trio.current_time()
            while await fs.store.inner.head("pre/d/new") is None:
                assert trio.current_time() - t0 < 5.0, "the upload did not resume when the store came back"
                await trio.sleep(0.05)
            assert not health.offline
            nursery.cancel_scope.cancel()
        fs.close()
        # a fresh mount over the same bucket reads what was written offline
        fresh = core_filesystem(tmp_path / "fresh", cmk_path, store=fs.store.inner, keyring=fs.keyring)
        d2 = await fresh.lookup(fresh.get(1), "d")
        assert await listed_names(fresh, d2) == ["new", "old"]
        assert await read_node(fresh, await fresh.lookup(d2, "new"), 100) == b"written offline"
        fresh.close()

    trio.run(main)
    assert [r.getMessage() for r in caplog.records if r.name == "ossfuse.store.health"
            and r.levelno == logging.INFO and "back online" in r.getMessage()], "no back-online line"


@pytest.mark.expect_log(OFFLINE)
def test_oss_retries_of_an_unreachable_store_stop_at_the_offline_timeout():
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        store = OssStore("bucket-x", f"http://127.0.0.1:{port}", region="cn-hangzhou", signature="v4",
                         credentials=StaticCredentialsProvider("a", "b"), retries=50, backoff=0.1,
                         backoff_max=0.2, deadline=60.0)
        store.health = StoreHealth(timeout=1.5, probe_interval=60.0)
        t0 = time.monotonic()
        with pytest.raises(StoreOffline):
            await store.head("k")
        took = time.monotonic() - t0
        assert 0.5 < took < 3.0, took  # retried, then gave up at the offline timeout, not at 60 s
        t0 = time.monotonic()
        with pytest.raises(StoreOffline, match="not tried"):
            await store.get_range("k", 0, 10)
        assert time.monotonic() - t0 < 0.1  # offline: fails fast
        await store.aclose()

    trio.run(main)


@contextlib.contextmanager
def _hung_server() -> Iterator[str]:
    """The endpoint of a server that accepts connections and never answers (e.g. a SIGSTOPped
    one): the kernel accepts them; nobody ever reads or answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _small_file(tmp_path) -> str:
    """A 100-byte file to PUT."""
    path = tmp_path / "small"
    path.write_bytes(b"x" * 100)
    return str(path)


def _oss_store(endpoint: str, health: StoreHealth, read_timeout: float = 60.0):
    """An OssStore of ``endpoint`` whose health is ``health`` (a 60 s read timeout and deadline:
    only the offline timeout may end a request that changes nothing sooner)."""
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore
    store = OssStore("bucket-x", endpoint, region="cn-hangzhou", signature="v4",
                     credentials=StaticCredentialsProvider("a", "b"), read_timeout=read_timeout, deadline=60.0)
    store.health = health
    return store


@pytest.mark.expect_log(OFFLINE)
def test_a_store_that_accepts_and_never_answers_is_offline_within_the_offline_timeout(tmp_path):
    """A hung store (accepts connections, never answers: e.g. a SIGSTOPped server) fails a
    request that changes nothing (HEAD, LIST) after the offline timeout, not after
    read_timeout, and the mount is offline from then on. A request that changes the bucket
    (a small PUT here) waits read_timeout: one given up on sooner may still take effect
    later, over what the mount did next (a trial: a PUT answered 9 s late replaced the
    version an fsync had put since)."""
    small = _small_file(tmp_path)
    async def main(endpoint):
        health = StoreHealth(timeout=1.5, probe_interval=60.0)
        store = _oss_store(endpoint, health, read_timeout=3.0)
        t0 = time.monotonic()
        with pytest.raises(StoreOffline, match="within 3.0s"):
            await store.put_file("k", small, {})
        assert 2.9 < time.monotonic() - t0 < 5.0
        health.succeeded()  # online again, to time a HEAD too
        t0 = time.monotonic()
        with pytest.raises(StoreOffline, match="within 1.5s"):
            await store.head("k")
        took = time.monotonic() - t0
        assert 1.4 < took < 3.0, took  # the offline bound, not the 60 s read timeout
        assert health.offline
        t0 = time.monotonic()
        with pytest.raises(StoreOffline, match="not tried"):
            await store.list("d/")
        assert time.monotonic() - t0 < 0.1  # offline: fails at once
        await store.aclose()

    with _hung_server() as endpoint:
        trio.run(main, endpoint)


@pytest.mark.expect_log(OFFLINE)
def test_requests_that_change_nothing_in_flight_when_the_mount_goes_offline_end_then(tmp_path):
    """Trial AC: a read whose GET was sent (again, after a body cut short) just before another
    request found the store unreachable waited its own offline timeout on: EIO after 10 s, not
    5. A GET, HEAD or LIST in flight ends when the mount goes offline; a PUT does not (one given
    up on may still take effect: it keeps read_timeout)."""
    small = _small_file(tmp_path)

    async def main(endpoint):
        health = StoreHealth(timeout=1.5, probe_interval=60.0)
        store = _oss_store(endpoint, health, read_timeout=4.0)
        t0 = time.monotonic()
        ended: dict[str, float] = {}

        async def call(name, fn, *args):
            with pytest.raises(StoreOffline) as e:
                await fn(*args)
            ended[name] = time.monotonic() - t0
            return e.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first HEAD", store.head, "a")
            await trio.sleep(0.7)
            nursery.start_soon(call, "second HEAD", store.head, "b")
            nursery.start_soon(call, "GET", store.get_range, "c", 0, 10)
            nursery.start_soon(call, "PUT", store.put_file, "d", small, {})
        assert 1.4 < ended["first HEAD"] < 2.0, ended
        assert abs(ended["second HEAD"] - ended["first HEAD"]) < 0.3, ended  # not 0.7 s later
        assert abs(ended["GET"] - ended["first HEAD"]) < 0.3, ended
        assert ended["PUT"] > 4.5, ended  # its own read_timeout, from 0.7 s on
        await store.aclose()

    with _hung_server() as endpoint:
        trio.run(main, endpoint)


def _server_silent_mid_body(trickle: float | None = None, first: int = 1000,
                            at: int | None = None) -> contextlib.AbstractContextManager[str]:
    """The endpoint of a server that answers every request with the status line, headers and
    the first ``first`` bytes of a 1 MB body, then sends nothing more (a server stopped
    mid-body), or with ``trickle`` (seconds) one byte more every so often (a stalled proxy in
    front); ``at``: only that many bytes of the answer at once, the rest trickled too (a
    trickle within the headers)."""
    def answer(c: socket.socket, stop: threading.Event) -> None:
        whole = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 1000000\r\nETag: \"E\"\r\n"
                 b"Content-Range: bytes 0-999999/1000000\r\n\r\n" + b"x" * first)
        c.sendall(whole[:at])
        rest, n = whole[len(whole[:at]):], 0
        while trickle is not None and not stop.wait(trickle):
            c.sendall(rest[n:n + 1] or b"x")
            n += 1
    return raw_server(answer)


@pytest.mark.expect_log(OFFLINE)
def test_a_body_that_goes_silent_is_an_outage_unless_the_store_is_alive():
    """Trial AE: a server stopped mid-body gave "answer cut short", which counted as an answer:
    the mount stayed online, and each read after it waited its own offline timeout (EIO after
    11 s). A body silent for the whole timeout counts as no answer: the confirming listing
    tells an outage (offline at once) from one bad object (that read's failure); a body cut
    off by a reset is still an answer (``test_a_get_whose_body_is_cut_short_is_that_objects_failure``)."""
    async def main(endpoint):
        health = StoreHealth(timeout=1.0, probe_interval=60.0)
        store = _oss_store(endpoint, health)
        t0 = time.monotonic()
        with pytest.raises(StoreOffline, match="answer cut short: no answer from .* within 1.0s$"):
            await store.get_range("k", 0, 1_000_000)
        assert time.monotonic() - t0 < 2.0 and health.offline
        health.succeeded()

        async def alive():
            return None
        health.confirm = alive  # the store answers a listing: that object's failure
        with pytest.raises(StoreUnavailable) as e:
            await store.get_range("k", 0, 1_000_000)
        assert not isinstance(e.value, StoreOffline) and not health.offline
        await store.aclose()

    with _server_silent_mid_body() as endpoint:
        trio.run(main, endpoint)


@pytest.mark.parametrize("first", [1000, 20_000])
@pytest.mark.expect_log(OFFLINE)
def test_a_body_that_trickles_is_taken_for_a_stalled_one(first):
    """Trial AF: a proxy that passed a GET's body on a byte every few seconds, each under the
    read timeout, held the reader for minutes (a 1 MB body at a byte per 0.3 s: 3.5 days). Once
    the answer has begun, each window of the read timeout must bring 16 KiB (store/paced.py):
    the trickle ends within twice the timeout, as a silent body does (an outage unless the
    confirming listing finds the store alive), and its line says what came: once the window
    is slow for a whole window in a row (trial AH: a pause then a fast body is no trickle; the
    next test). Trial AG: after a first burst of 16 KiB or more the trickle ran two fixed
    windows more: the window slides, so the burst changes nothing."""
    async def main(endpoint):
        health = StoreHealth(timeout=1.0, probe_interval=60.0)
        store = _oss_store(endpoint, health)
        with trio.fail_after(10):  # (before: no end; the GET's thread is abandoned on cancel)
            t0 = time.monotonic()
            with pytest.raises(StoreOffline, match=r"answer cut short: http://127.0.0.1:\d+ sent [1-4] bytes in the "
                                                   r"last 1\.0s of its answer \(\d+ in 2\.\ds; less than 16 KiB per "
                                                   r"read timeout: taken for a stalled connection\)$"):
                await store.get_range("k", 0, 1_000_000)
            # slow from 1.0 s on (the window full), for a whole window in a row: 2.0 s, + the gap to a byte
            assert 2.0 <= time.monotonic() - t0 < 2.8 and health.offline
            health.succeeded()

            async def alive():
                return None
            health.confirm = alive  # the store answers a listing: that object's failure
            with pytest.raises(StoreUnavailable, match="stalled connection") as e:
                await store.get_range("k", 0, 1_000_000)
            assert not isinstance(e.value, StoreOffline) and not health.offline
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="stalled connection"):  # a listing's body, too
                await store.list("d/")
            assert time.monotonic() - t0 < 2.8
        await store.aclose()

    with _server_silent_mid_body(trickle=0.3, first=first) as endpoint:
        trio.run(main, endpoint)


def test_a_pause_then_a_fast_body_is_no_trickle():
    """Trial AH: the headers at once, then the body after a pause under the timeout at 64 KB/s
    (20 times the floor) got EIO: the window, begun at the headers, held fewer than 16 KiB
    when it was a timeout old. Only a window slow for a whole window in a row is a trickle."""
    body = os.urandom(100_000)

    def answer(c: socket.socket, stop: threading.Event) -> None:
        c.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100000\r\nETag: \"E\"\r\n"
                  b"Content-Range: bytes 0-99999/100000\r\n\r\n")
        stop.wait(0.9)
        for i in range(0, len(body), 3200):  # 64 KB/s
            c.sendall(body[i:i + 3200])
            stop.wait(0.05)

    async def main(endpoint):
        store = _oss_store(endpoint, StoreHealth(timeout=1.0, probe_interval=60.0))
        assert await store.get_range("k", 0, 100_000) == body
        await store.aclose()
    with raw_server(answer) as endpoint:
        trio.run(main, endpoint)


def _chunked_whitespace_server(pause: float, beats: int) -> contextlib.AbstractContextManager[str]:
    """The endpoint of a server that answers every request with a chunked 200, one space every
    ``pause`` seconds ``beats`` times (how S3 keeps the connection of a long copy alive), then
    a one-key listing (``k``) and the last chunk."""
    def answer(c: socket.socket, stop: threading.Event) -> None:
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/xml\r\n\r\n")
        for _ in range(beats):
            if stop.wait(pause):
                return
            c.sendall(b"1\r\n \r\n")
        xml = (b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>k</Key>"
               b"<LastModified>2024-01-02T03:04:05.000Z</LastModified><ETag>&quot;E&quot;</ETag><Size>1</Size>"
               b"</Contents></ListBucketResult>")
        c.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(xml), xml))
    return raw_server(answer)


def test_the_low_speed_rule_covers_every_answer_of_known_length_and_no_other():
    """Trial AG: a `mv` whose copies' answers trickled held the directory (and the kernel's
    lock on it: creates there waited) for as long. Every connection of the store's pool reads
    its answers under the rule, also those of oss2's requests (copies, multipart), once their
    length is known; a body of unknown length is not paced: S3-like stores send whitespace
    while a long copy runs, and that answer must not fail."""
    from ossfuse.store.base import ObjectInfo
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    def store(endpoint: str) -> OssStore:  # no health, no retries: writes and reads keep read_timeout
        return OssStore("bucket-x", endpoint, region="cn-hangzhou", signature="v4", retries=0, read_timeout=0.5,
                        credentials=StaticCredentialsProvider("a", "b"))

    async def copy_trickled(endpoint):
        s = store(endpoint)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="stalled connection"):
            await s.copy("a", "b", if_match="E", source=ObjectInfo("a", 1, "E", 0.0))
        assert time.monotonic() - t0 < 1.5
        await s.aclose()
    with _server_silent_mid_body(trickle=0.2, at=20) as endpoint:  # (oss2 reads a copy's headers only)
        trio.run(copy_trickled, endpoint)

    async def list_kept_alive(endpoint):
        s = store(endpoint)
        t0 = time.monotonic()
        page = await s.list("")  # 2 s of whitespace, a space every 0.3 s: four read timeouts
        assert [o.key for o in page.objects] == ["k"] and time.monotonic() - t0 >= 2.0
        await s.aclose()
    with _chunked_whitespace_server(0.3, 7) as endpoint:
        trio.run(list_kept_alive, endpoint)


@pytest.mark.expect_log(OFFLINE)
def test_with_a_watcher_calls_to_a_store_that_never_answers_fail_at_once(caplog):
    """Found by a trial: with the server SIGSTOPped (it accepts, never answers), the mount went
    offline but every file-system request that reached the store waited for the running probe
    (up to the offline timeout), or became the next probe itself, as soon as one ended: `ls` of
    cached directories took 5-120 s. While the daemon's watcher runs, only it probes, one
    probe_interval after the last ended; every other call fails at once (the cache answers)."""
    caplog.set_level(logging.DEBUG, logger="ossfuse.store.oss")

    async def main(endpoint):
        health = StoreHealth(timeout=1.0, probe_interval=0.2)
        store = _oss_store(endpoint, health)
        probes = []

        async def probe():
            probes.append(time.monotonic())
            await store.list("", max_keys=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(health.watch, probe)
            with pytest.raises(StoreOffline):  # the call that finds it unreachable waits the timeout
                await store.head("k")
            assert health.offline
            slowest, t_end = 0.0, time.monotonic() + 3.5  # several probes of 1 s each run meanwhile
            calls = 0
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                with pytest.raises(StoreOffline):
                    await store.head(f"k{calls}")
                slowest = max(slowest, time.monotonic() - t0)
                calls += 1
                await trio.sleep(0.02)
            assert slowest < 0.1, slowest  # never waited for a probe, never was one
            assert 2 <= len(probes) <= 4, probes  # one at a time, each 1 s, 0.2 s apart
            assert all(b - a >= 1.1 for a, b in zip(probes, probes[1:], strict=False)), probes
            nursery.cancel_scope.cancel()
        await store.aclose()

    with _hung_server() as endpoint:
        trio.run(main, endpoint)
    # the probes' failures are DEBUG: an outage of hours must not write a line per probe
    listed = [(r.levelname, r.getMessage()) for r in caplog.records if "ListObjects" in r.getMessage()]
    assert listed and {level for level, _ in listed} == {"DEBUG"}, listed


@pytest.mark.expect_log(OFFLINE)
def test_calls_during_a_probe_wait_for_it_and_go_ahead_when_it_succeeds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ossfuse.store.health")

    async def main():
        store = core_store(tmp_path)
        await store.put_bytes("k", b"value", {})
        health = StoreHealth(timeout=2.0, probe_interval=0.3)
        store.health = health
        down = store.fail("*", count=None)
        with pytest.raises(StoreOffline):  # the call that finds the store down
            await store.head("k")
        assert health.offline
        with pytest.raises(StoreOffline, match="not tried"):  # no probe due yet: at once
            await store.head("k")
        down.active = False
        store.delay("head", 0.5, count=1)  # the probe takes a while to answer
        await trio.sleep(0.3)
        results = []

        async def get():
            results.append(await store.get_range("k", 0, 5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.head, "k")  # the probe
            await trio.sleep(0.1)
            for _ in range(3):  # made while it runs: they wait for it, then go ahead
                nursery.start_soon(get)
        assert results == [b"value"] * 3 and not health.offline

    trio.run(main)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ossfuse.store.health"]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines


def test_offline_timeout_setting(tmp_path, cmk_path):
    from ossfuse.config import ConfigError, load

    def config(line: str):
        path = tmp_path / "c.toml"
        path.write_text(f'[store]\nurl = "local:///tmp/b"\n{line}\n[encryption]\nencrypt_with = "k"\n'
                        f'[[encryption.cmk]]\nid = "k"\ntype = "rsa"\nprivate_key = "{cmk_path}"\n'
                        '[cache]\ndir = "cache"\n')
        return load(str(path))

    assert config("").store.offline_timeout == 5.0
    assert config("offline_timeout = 1.5").store.offline_timeout == 1.5
    for bad in ("0", "-1", '"5"', "true"):
        with pytest.raises(ConfigError, match=r"c\.toml: store\.offline_timeout: must be "):
            config(f"offline_timeout = {bad}")


@pytest.mark.expect_log(OFFLINE)
def test_a_listed_directory_the_kernel_forgot_and_looked_up_again_online_is_still_listed_offline(tmp_path, cmk_path):
    """The kernel may forget a directory's inode between two outages (its dentry evicted) and
    look it up again while the store answers: the node made then must keep the listing the
    mount had (a new-user test: `ls d` and `echo > d/f` gave EIO in the second outage,
    "this mount has not listed it")."""

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, _remote_store(tmp_path), entry_timeout=0.05, attr_timeout=0.05)
        health = StoreHealth(timeout=2.0, probe_interval=60.0)
        fs.track_store_health(health)
        root = fs.get(1)
        d = fs.remember(await fs.mkdir(root, "d", 0o755, 1, 2))
        await committed_file(fs, "a", b"a", d)
        assert await listed_names(fs, d) == ["a"]
        fs.forget(d.ino, d.lookups)  # the kernel drops the directory
        await trio.sleep(0.1)  # its listing is older than entry_timeout: no longer trusted online
        again = fs.remember(await fs.lookup(root, "d"))  # looked up again, the store answering
        assert again.ino == d.ino
        fs.store.fail("*", count=None)
        assert await listed_names(fs, again) == ["a"]
        with pytest.raises(StoreOffline):
            await fs.store.head("pre/x")
        assert health.offline
        assert await listed_names(fs, again) == ["a"]
        node, h = await fs.create(again, "off", 0o640, os.O_RDWR, 1, 2)
        await fs.release(h)
        assert await listed_names(fs, again) == ["a", "off"]
        fs.close()

    trio.run(main)


@pytest.mark.expect_log(OFFLINE, r"deleting 1 unlinked objects \('pre/d/f000'…\) failed; they stay hidden and are "
                                 r"tried again: .*HTTP 503 ServiceUnavailable")
def test_a_throttling_store_stays_online_and_only_unanswered_failures_take_it_offline(tmp_path, cmk_path):
    """An HTTP answer proves the store reachable: 503 "Please reduce your request rate" on
    every call (after the store's retries) fails those calls with the 503 itself, the mount
    stays online (the background deletes of an ``rm`` met this on OSS and took the mount
    offline for seconds); a call that gets no answer (refused, timeout) still takes it offline,
    and a 503 answered to a probe brings it back."""

    async def main():
        store = _remote_store(tmp_path)
        fs = core_filesystem(tmp_path, cmk_path, store, retry_interval=60.0)
        health = StoreHealth(timeout=2.0, probe_interval=0.2)
        fs.track_store_health(health)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            d = await fs.mkdir(fs.get(1), "d", 0o755, 1, 2)
            for name in ("f000", "f001"):
                await committed_file(fs, name, b"data", d)
            busy = store.fail(("delete_many", "delete"), error="busy", count=None)
            await fs.unlink(d, "f000")  # its background batch is answered 503
            await fs.namespace.settle_deletes()
            assert busy.hits >= 1 and not health.offline
            assert await store.inner.head("pre/d/f000") is not None  # not deleted: tried again later
            assert (await fs.lookup(d, "f001")).size == 4
            store.clear()
            store.fail("*", error="busy", count=None)
            for _ in range(5):
                with pytest.raises(StoreUnavailable) as e:
                    await store.head("pre/d/f001")
                assert not isinstance(e.value, StoreOffline) and e.value.code == "ServiceUnavailable"
            assert not health.offline and health.status()["online"]
            store.clear()
            store.fail("*", error="temporary", count=None)  # no answer: an outage
            with pytest.raises(StoreOffline):
                await store.head("pre/d/f001")
            assert health.offline
            store.clear()
            store.fail("*", error="busy", count=None)
            await trio.sleep(0.25)  # the next call is a probe; its 503 is an answer
            with pytest.raises(StoreUnavailable) as e:
                await store.head("pre/d/f001")
            assert not isinstance(e.value, StoreOffline)
            assert not health.offline
            nursery.cancel_scope.cancel()
        fs.close()

    trio.run(main)


@pytest.mark.expect_log(OFFLINE, r"OSS HEAD 'k': HTTP 503 ServiceUnavailable", r"OSS DeleteMultiple: HTTP 503")
def test_oss_503_answers_leave_the_mount_online_and_a_stopped_server_takes_it_offline(oss_server):
    """Over the OSS test server: HEAD and DeleteMultipleObjects answered 503 on every attempt
    raise the 503 (``answered``), not StoreOffline, and the mount stays online; once the server
    is stopped (connection refused: no answer) the next call takes it offline."""
    from conftest import AK, BUCKET, REGION, SK
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    async def main():
        store = OssStore(BUCKET, oss_server.endpoint, region=REGION, signature="v4",
                         credentials=StaticCredentialsProvider(AK, SK), retries=2, backoff=0.01, backoff_max=0.02)
        health = StoreHealth(timeout=2.0, probe_interval=60.0)
        store.health = health
        await store.put_bytes("k", b"v", {})
        oss_server.faults.add(status=503, count=None)
        for call in (lambda: store.head("k"), lambda: store.delete_many(["k", "k2"])):
            with pytest.raises(StoreUnavailable) as e:
                await call()
            assert not isinstance(e.value, StoreOffline) and e.value.answered and e.value.code == "ServiceUnavailable"
            assert not health.offline
        oss_server.faults.clear()
        assert (await store.head("k")).size == 1
        oss_server.stop()
        try:
            with pytest.raises(StoreOffline) as e:
                await store.head("k")
            assert isinstance(e.value.__cause__, StoreUnavailable) and not e.value.__cause__.answered
            assert health.offline
        finally:
            oss_server.start()
        await store.aclose()

    trio.run(main)


# -- one slow or damaged request is no outage; a slow write is waited for (break-test trial F) ---

@contextlib.contextmanager
def _served_store(health: StoreHealth) -> Iterator[tuple[object, object]]:
    """(the in-process OSS test server, an OssStore of it whose health is ``health``)."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from oss_server import OssTestServer
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore
    srv = OssTestServer(access_key_id="ak", access_key_secret="sk", buckets=("bkt",), region="cn-hangzhou")
    srv.start()
    store = OssStore("bkt", srv.endpoint, region="cn-hangzhou", signature="v4",
                     credentials=StaticCredentialsProvider("ak", "sk"), read_timeout=30.0, deadline=30.0,
                     backoff=0.01, backoff_max=0.05)
    store.health = health
    try:
        yield srv, store
    finally:
        trio.run(store.aclose)
        srv.stop()


def test_writes_slower_than_the_offline_timeout_are_waited_for(tmp_path):
    """A trial: a PUT answered 9 s late was given up on after the offline timeout (5 s), then
    took effect over the version an fsync had put since; a copy slower than 5 s failed `mv`
    with EIO and then landed over the destination; a batch delete answered late deleted a
    file made again since. A request that changes the bucket now waits read_timeout; the
    mount stays online."""
    health = StoreHealth(timeout=0.5, probe_interval=60.0)
    with _served_store(health) as (srv, store):
        async def main():
            await store.put_bytes("k", b"v1", {})
            for methods, call in [(("PUT",), lambda: store.put_bytes("k", b"v2", {})),
                                  (("PUT",), lambda: store.copy("k", "k2")),  # CopyObject is a PUT
                                  (("DELETE",), lambda: store.delete("k2")),
                                  (("POST",), lambda: store.delete_many(["k"]))]:
                srv.faults.add_delay(1.2, count=1, methods=methods)
                t0 = time.monotonic()
                await call()
                assert time.monotonic() - t0 > 1.1 and not health.offline
        trio.run(main)
        assert not srv.buckets["bkt"].objects  # every write took effect, in order


@pytest.mark.expect_log(OFFLINE)
def test_one_request_that_hangs_while_the_store_answers_others_is_its_own_failure(caplog):
    """A trial: one HEAD that hung 30 s took the whole mount offline after 5 s, so other
    files got EIO, and cached listings hid a new directory. When the store answered requests
    sent after it, or answers the daemon's confirming one-key listing, it is that request's
    failure (EIO for it), and the mount stays online; with neither, an outage as before."""
    health = StoreHealth(timeout=0.6, probe_interval=60.0)
    with _served_store(health) as (srv, store):
        async def main():
            await store.put_bytes("fast", b"f", {})
            srv.faults.add_delay(3.0, count=1, methods=("HEAD",), key_prefix="slow")
            answered = []

            async def others():
                for _ in range(10):
                    answered.append(await store.head("fast"))
                    await trio.sleep(0.1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(others)
                with pytest.raises(StoreUnavailable) as e:
                    await store.head("slow")
            assert not isinstance(e.value, StoreOffline) and not health.offline and len(answered) == 10
            srv.faults.add_delay(3.0, count=1, methods=("HEAD",), key_prefix="slow")
            health.confirm = functools.partial(store.list, "", max_keys=1)  # as the daemon sets it
            with pytest.raises(StoreUnavailable) as e:  # nothing else asked: the store answers a listing
                await store.head("slow")
            assert not isinstance(e.value, StoreOffline) and not health.offline
            health.confirm = None
            srv.faults.add_delay(3.0, count=1, methods=("HEAD",), key_prefix="slow")
            with pytest.raises(StoreOffline):  # nothing else answered meanwhile, nothing confirms: an outage
                await store.head("slow")
            assert health.offline
        trio.run(main)


def test_many_requests_failing_at_once_while_the_store_answers_keep_the_mount_online():
    """Trial AG: `ls -l` of 40 files whose HEADs all hung took the mount offline although the
    confirming listing was answered: a call that waited for that listing read its outcome
    from a flag a newer confirm had reset before the call woke; and a call sent before the
    listing that failed after it sent a listing of its own. Each waiter reads the outcome of
    the confirm it waited for, and an answered confirm counts as an answer to every call sent
    before it."""
    async def main():
        for _ in range(20):  # (which woken task runs first is trio's choice: the race, each time)
            health = StoreHealth(timeout=1.0, probe_interval=60.0)
            confirms = []
            go = trio.Event()

            async def confirm():
                confirms.append(time.monotonic())
                if len(confirms) == 1:
                    await go.wait()
                    return None
                raise StoreUnavailable("the second confirm fails", code="Timeout")
            health.confirm = confirm
            sent = time.monotonic()
            await trio.sleep(0.01)
            outcomes = []

            async def failing(after: trio.Event | None = None):
                if after is not None:
                    await after.wait()
                outcomes.append(await health.confirm_alive(sent))
            async with trio.open_nursery() as n:
                n.start_soon(failing)  # begins the confirm
                await trio.testing.wait_all_tasks_blocked()
                n.start_soon(failing)  # waits for it
                await trio.testing.wait_all_tasks_blocked()
                late = trio.Event()
                n.start_soon(failing, late)  # fails just as the confirm ends
                late.set()
                go.set()
            assert outcomes == [True, True, True] and len(confirms) == 1, (outcomes, confirms)
            assert not health.offline
    trio.run(main)


def test_a_get_whose_body_is_cut_short_is_that_objects_failure(tmp_path):
    """A trial: one object's GETs dropped mid-body (or its body truncated in the store) took
    the whole mount offline each time it was read. An answer whose body is cut short is an
    answer: EIO for that read, the mount stays online."""
    health = StoreHealth(timeout=0.5, probe_interval=60.0)
    with _served_store(health) as (srv, store):
        async def main():
            await store.put_bytes("bad", os.urandom(300_000), {})
            await store.put_bytes("good", b"hello", {})
            srv.faults.add_reset(count=None, methods=("GET",), key_prefix="bad", fraction=0.5)
            with pytest.raises(StoreUnavailable) as e:
                await store.get_range("bad", 0, 300_000)
            assert not isinstance(e.value, StoreOffline) and not health.offline
            assert "answer cut short" in str(e.value)
            assert await store.get_range("good", 0, 5) == b"hello"
        trio.run(main)
