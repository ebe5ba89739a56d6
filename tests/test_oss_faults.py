"""The mount against a failing OSS: injected resets and 503s, a server that goes down and
comes back, and objects above the CopyObject limit."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import OSSFUSE, Mount, crypto_bucket, rsa_provider, run_sync

pytestmark = pytest.mark.timeout(300)


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_cp_of_100_mib_survives_resets_and_503s(tmp_path, cmk_path, oss_server):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(100):
            f.write(hashlib.sha256(str(i).encode()).digest() * 32768)
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("part_size = 4194304", store_options="retries = 8")  # the store's retries absorb them
    m.start()
    try:
        oss_server.faults.reset_rate(0.05, max_count=15)
        oss_server.faults.add(status=503, count=6, methods=("PUT",))
        subprocess.run(["cp", str(src), m.path("big.bin")], check=True)
        assert m.stop() == 0
        m.start()
        oss_server.faults.reset_rate(0.05, max_count=10)
        assert sha(m.path("big.bin")) == sha(str(src))
        assert m.pending_uploads() == 0
    finally:
        m.cleanup()
    log = m.log()
    assert "attempt" in log  # the faults were seen and retried


def _few_retries(m: Mount, mount_options: str) -> None:
    m.write_config(mount_options, store_options="retries = 1")


@pytest.mark.expect_log(r"ossfuse\.fs\.commit: upload of", r"ossfuse\.store\.oss: OSS HEAD",
                        r"ossfuse\.store\.health: store unreachable")  # the outage (test_offline*.py)
def test_server_down_close_and_fsync_report_errors_and_data_is_kept(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "retry_interval = 1\nmultipart_threshold = 300000\npart_size = 102400")
    m.start()
    try:
        data = os.urandom(1_000_000)  # multipart: nothing may be left half-done
        f = open(m.path("kept"), "wb")  # opened while the server answers (a new name needs a lookup)
        oss_server.stop()
        f.write(data)
        f.flush()
        with pytest.raises(OSError) as e:
            os.fsync(f.fileno())
        assert e.value.errno == errno.EIO
        f.close()  # close only journals by default: it succeeds, the data is safe locally
        assert os.listdir(os.path.join(m.cache, "staging"))
        assert open(m.path("kept"), "rb").read() == data  # still readable from the staging area
        assert "upload of 'kept' failed" in m.log()
        oss_server.start()
        assert m.stop() == 0  # unmount uploads what is pending
        assert "upload of 'kept' succeeded after failing" in m.log()  # the ERROR's end is said too
        assert m.head("kept").size == len(data)
        assert m.pending_uploads() == 0
        m.start()
        assert open(m.path("kept"), "rb").read() == data
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'denied' failed; .*403 AccessDenied")
def test_a_refused_upload_is_one_error_line_however_often_it_is_retried(tmp_path, cmk_path, oss_server):
    """A bucket policy refuses the PUT (403): fsync gets EIO and the queued upload keeps
    retrying; the failure is one ERROR line, the retries failing the same way INFO lines (a
    trial saw an ERROR per attempt: each answer's request id made the reason differ)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "retry_interval = 0.3\nupload_delay = 0.1")
    m.start()
    try:
        oss_server.faults.add(status=403, count=None, methods=("PUT",), key_prefix="denied")
        fd = os.open(m.path("denied"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"kept")
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        deadline = time.monotonic() + 30
        while len(oss_server.requests_for(method="PUT", key="denied")) < 4:  # fsync's and 3+ retries
            assert time.monotonic() < deadline, "no retries"
            time.sleep(0.1)
        lines = [ln for ln in m.log().splitlines() if "upload of 'denied' failed" in ln]
        assert [ln.split()[2] for ln in lines].count("ERROR") == 1, lines
        assert len(lines) >= 3, lines  # the retries: INFO
        oss_server.faults.clear()
        deadline = time.monotonic() + 30
        while m.head("denied") is None:  # allowed again: the next retry uploads it
            assert time.monotonic() < deadline, "not uploaded once allowed"
            time.sleep(0.1)
        assert m.stop() == 0
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.fs\.commit: upload of", r"ossfuse\.store\.oss: OSS HEAD",
                        r"ossfuse\.store\.health: store unreachable")  # the outage (test_offline*.py)
def test_close_waits_for_upload_reports_failure(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "retry_interval = 0.5\nclose_waits_for_upload = true")
    m.start()
    try:
        with open(m.path("ok"), "wb") as f:
            f.write(b"uploaded before close returns")
        assert m.head("ok").size == 29
        f = open(m.path("later"), "wb")
        oss_server.stop()
        f.write(b"x" * 1000)
        with pytest.raises(OSError) as e:
            f.close()
        assert e.value.errno == errno.EIO
        oss_server.start()
        for _ in range(100):  # the background retry uploads it once the server is back
            if m.head("later") is not None:
                break
            time.sleep(0.1)
        assert m.head("later").size == 1000
    finally:
        m.cleanup()


def test_rename_and_chmod_above_the_copy_limit_stream_the_ciphertext(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("multipart_threshold = 300000\npart_size = 102400", store_options="max_copy_size = 500000")
    m.start()
    try:
        data = os.urandom(1_234_567)
        with open(m.path("large"), "wb") as f:
            f.write(data)
        os.rename(m.path("large"), m.path("renamed"))
        os.chmod(m.path("renamed"), 0o600)
        assert m.stop() == 0
        copies = oss_server.requests_for(method="PUT", key="renamed")
        assert not any("x-oss-copy-source" in r.headers for r in copies)  # no CopyObject was sent
        assert m.pending_uploads() == 0
        cb = crypto_bucket(oss_server.endpoint, rsa_provider(m.cmk))
        assert cb.get_object("renamed").read() == data
        assert m.head("renamed").metadata["mode"] == str(0o100600)
        assert m.head("large") is None
    finally:
        m.cleanup()


def test_chmod_touch_and_rename_of_a_file_this_mount_uploaded_in_parts(tmp_path, cmk_path, oss_server):
    """A two-mount trial: chmod, touch and chown of a file the mount itself had uploaded in
    parts were EIO (OSS: "Metadata of a client-side encrypted object cannot be modified by
    CopyObject"): the metadata copy left out the part layout (data-size, part-size) the upload
    had added at Initiate. The same after a rename of it, file or directory."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("multipart_threshold = 300000\npart_size = 102400\nclose_waits_for_upload = true")
    m.start()
    try:
        data = os.urandom(1_000_000)
        os.mkdir(m.path("d"))
        with open(m.path("d", "big"), "wb") as f:
            f.write(data)
        os.chmod(m.path("d", "big"), 0o600)
        os.utime(m.path("d", "big"), (1_000_000_000, 1_000_000_000))
        os.chown(m.path("d", "big"), 1000, 1000)
        os.rename(m.path("d", "big"), m.path("d", "big2"))
        os.chmod(m.path("d", "big2"), 0o640)
        os.rename(m.path("d"), m.path("e"))
        os.chmod(m.path("e", "big2"), 0o604)
        assert m.stop() == 0
        meta = m.head("e/big2").metadata
        assert meta["mode"] == str(0o100604) and meta["uid"] == "1000" and meta["mtime"].startswith("1000000000")
        assert meta["client-side-encryption-data-size"] == str(len(data))
        assert meta["client-side-encryption-part-size"] == "102400"
        assert crypto_bucket(oss_server.endpoint, rsa_provider(m.cmk)).get_object("e/big2").read() == data
    finally:
        m.cleanup()


def _file_then_remount(m: Mount, size: int, *, clear_cache: bool = True) -> bytes:
    """Start ``m``, write ``size`` random bytes to file ``f``, remount (the cache emptied unless
    ``clear_cache`` is False); returns the bytes."""
    m.start()
    data = os.urandom(size)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    m.remount(clear_cache=clear_cache)
    return data


@pytest.mark.expect_log(r"ossfuse\.cache: cache file of")
def test_cache_is_reused_after_remount_and_a_damaged_cache_file_is_refetched(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    try:
        data = _file_then_remount(m, 3_000_000)  # emptied cache: the next read fetches (and indexes) the blocks
        assert open(m.path("f"), "rb").read() == data
        assert m.stop() == 0
        oss_server.clear_requests()
        m.start()
        assert open(m.path("f"), "rb").read() == data
        assert oss_server.requests_for(method="GET", key="f") == []  # served from the kept cache
        assert m.stop() == 0
        objects = os.path.join(m.cache, "objects")
        name = next(n for n in os.listdir(objects) if not n.endswith(".idx"))
        with open(os.path.join(objects, name), "r+b") as f:  # damage the cached ciphertext
            f.seek(1_500_000)
            f.write(b"\0" * 100)
        oss_server.clear_requests()
        m.start()
        assert open(m.path("f"), "rb").read() == data
        assert len(oss_server.requests_for(method="GET", key="f")) >= 1
        assert "is damaged" in m.log()
    finally:
        m.cleanup()


def test_a_written_file_is_not_downloaded_after_a_clean_remount(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.start()
    try:
        data = os.urandom(2_500_000)
        with open(m.path("w"), "wb") as f:
            f.write(data)
        assert m.stop() == 0
        oss_server.clear_requests()
        m.start()
        assert open(m.path("w"), "rb").read() == data
        assert oss_server.requests_for(method="GET", key="w") == []
    finally:
        m.cleanup()


def test_names_created_in_a_listed_directory_need_no_lookup_requests(tmp_path, cmk_path, oss_server):
    """Creating files in a directory this mount made (or listed) sends no HEAD/LIST per new name:
    the directory's listing answers "no such name" for entry_timeout; a name another client
    adds shows up once that listing is older than entry_timeout."""
    m = Mount(str(tmp_path / "m"), cmk_path, "entry_timeout = 2", server=oss_server)
    m.start()
    try:
        os.mkdir(m.path("new"))
        oss_server.clear_requests()
        for i in range(20):
            with open(m.path("new", f"f{i}"), "wb") as f:
                f.write(b"x" * i)
        heads = [r for r in oss_server.requests_for(method="HEAD") if r.key.startswith("new/")]
        lists = [r for r in oss_server.requests_for(method="GET") if "prefix=" in r.query]
        assert heads == [] and len(lists) <= 2, (heads, lists)  # ≤ 1 re-list per entry_timeout
        assert sorted(os.listdir(m.path("new"))) == sorted(f"f{i}" for i in range(20))
        run_sync(m.store.put_bytes, "new/from-elsewhere", b"plain", {})
        time.sleep(2.2)  # the listing is older than entry_timeout now
        assert os.path.exists(m.path("new", "from-elsewhere"))
        assert m.stop() == 0
        assert all(m.head(f"new/f{i}").size == i for i in range(20))
    finally:
        m.cleanup()


def test_attributes_and_rename_after_close_join_the_one_upload(tmp_path, cmk_path, oss_server):
    """What cp -p, tar and rsync do after close (chmod, utime, rename of a temp file) lands in
    the file's one PUT on OSS within the default upload_delay: no CopyObject, no DELETE."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.start()
    try:
        oss_server.clear_requests()
        with open(m.path(".f.tmp"), "wb") as f:
            f.write(b"rsync-like")
        os.chmod(m.path(".f.tmp"), 0o640)
        os.utime(m.path(".f.tmp"), ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
        os.rename(m.path(".f.tmp"), m.path("f"))
        deadline = time.monotonic() + 10
        while m.head("f") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        info = m.head("f")
        assert info.metadata["mode"] == str(0o100640) and info.metadata["mtime"] == "1600000000"
        puts = oss_server.requests_for(method="PUT")
        assert [r.key for r in puts] == ["f"] and "x-oss-copy-source" not in puts[0].headers
        assert oss_server.requests_for(method="DELETE") == []
        assert m.head(".f.tmp") is None
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"listing 'd/': HEAD 'd/victim' refused: .*(AccessDenied|503).*listed without their attributes",
                        r"lookup of 'd/victim' failed: .*(AccessDenied|503)",
                        r"listing 'd/' fails: HEAD 'd/(a|z|victim)' failed: .*503", r"OSS HEAD 'd/",
                        r"listing 'd/': HEAD 'd/victim' refused: .*no answer.*listed without their attributes")
def test_ls_of_a_directory_with_a_denied_object_lists_every_name(tmp_path, cmk_path, oss_server):
    """A bucket policy refuses the HEAD of one object (403): `ls` lists every name (exit 0),
    `ls -l` shows the others with their stored modes and one error for that name, which reads
    once allowed (before: the whole `ls` failed with EIO). So is one the store keeps
    answering 503 while it answers the others (a trial: one such object made its directory
    unlistable); a store answering 503 to every HEAD (throttling) fails the listing at once
    (a trial: listing the names made `ls -l` of 600 of them wait for retries per name,
    projected to an hour)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "")
    m.start()
    try:
        os.mkdir(m.path("d"))
        for name, mode in (("a", 0o600), ("victim", 0o644), ("z", 0o640)):
            with open(m.path(f"d/{name}"), "w") as f:
                f.write(name)
            os.chmod(m.path(f"d/{name}"), mode)
        m.remount()  # nothing known: every entry needs a HEAD
        oss_server.faults.add(status=403, count=None, methods=("HEAD",), key_prefix="d/victim")
        r = subprocess.run(["ls", m.path("d")], capture_output=True, text=True)
        assert (r.returncode, r.stdout.split()) == (0, ["a", "victim", "z"]), r
        r = subprocess.run(["ls", "-l", m.path("d")], capture_output=True, text=True)
        modes = {ln.split()[-1]: ln.split()[0] for ln in r.stdout.splitlines()[1:]}
        assert modes["a"] == "-rw-------" and modes["z"] == "-rw-r-----", r
        assert r.returncode == 1 and "victim" in r.stderr and "Input/output error" in r.stderr, r
        subprocess.run(["ls", "-l", m.path("d")], capture_output=True)
        lines = [ln for ln in m.log().splitlines() if "ERROR" in ln and "d/victim" in ln]
        assert len(lines) == 2, lines  # the listing's and a lookup's: once each, not per ls or stat
        oss_server.faults.clear()
        with open(m.path("d/victim")) as f:
            assert f.read() == "victim"
        assert stat.S_IMODE(os.stat(m.path("d/victim")).st_mode) == 0o644
        m.remount()
        oss_server.faults.add(status=503, count=None, methods=("HEAD",), key_prefix="d/victim")
        r = subprocess.run(["ls", "-l", m.path("d")], capture_output=True, text=True)
        modes = {ln.split()[-1]: ln.split()[0] for ln in r.stdout.splitlines()[1:]}
        assert modes["a"] == "-rw-------" and modes["z"] == "-rw-r-----", r
        assert r.returncode == 1 and "victim" in r.stderr and "Input/output error" in r.stderr, r
        oss_server.faults.clear()
        m.remount()
        for name in ("a", "victim", "z"):  # (not the directory's own marker, "d/")
            oss_server.faults.add(status=503, count=None, methods=("HEAD",), key_prefix=f"d/{name}")
        t0 = time.monotonic()
        r = subprocess.run(["ls", "-l", m.path("d")], capture_output=True, text=True)
        assert r.returncode == 2 and "reading directory" in r.stderr and "Input/output error" in r.stderr, r
        assert time.monotonic() - t0 < 15, time.monotonic() - t0
        oss_server.faults.clear()
        assert sorted(os.listdir(m.path("d"))) == ["a", "victim", "z"]
        # one HEAD the store never answers while it answers the rest: no outage (a trial: the
        # listing failed and the whole mount went offline)
        m.remount()
        oss_server.call("faults.add_delay", 8.0, count=1, methods=("HEAD",), key_prefix="d/victim")
        r = subprocess.run(["ls", "-l", m.path("d")], capture_output=True, text=True)
        assert sorted(ln.split()[-1] for ln in r.stdout.splitlines()[1:]) == ["a", "victim", "z"], r
        assert "working offline" not in m.log()
    finally:
        m.cleanup()


def test_a_file_another_client_replaced_reads_whole_right_after_a_listing(tmp_path, cmk_path, oss_server):
    """`ls -l`, then another client (oss2's CryptoBucket) replaces files with longer and shorter
    versions, then `cat` at once, while the kernel still holds the listed sizes (attr_timeout
    30 s): each read gives the whole new version (a trial: `cat` exited 0 with the first 5,000
    bytes of a 2.2 MB new version, the kernel cutting the read at the old size)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("attr_timeout = 30\nentry_timeout = 30")
    m.start()
    try:
        os.mkdir(m.path("d"))
        for name in ("grows", "shrinks", "same"):
            with open(m.path(f"d/{name}"), "wb") as f:
                f.write(b"o" * 5000)
        m.remount(clear_cache=False)
        time.sleep(1.1)  # HEADs a second after the uploads are kept for the next mount
        assert sorted(os.listdir(m.path("d"))) == ["grows", "same", "shrinks"]
        assert [os.stat(m.path(f"d/{n}")).st_size for n in ("grows", "shrinks")] == [5000, 5000]
        m.remount(clear_cache=False)  # kept rows: versions without their envelopes (slim)
        assert [os.stat(m.path(f"d/{n}")).st_size for n in ("grows", "shrinks", "same")] == [5000] * 3
        cb = crypto_bucket(oss_server.endpoint, rsa_provider(m.cmk))
        new = {"d/grows": os.urandom(2_200_000), "d/shrinks": b"s" * 3000, "d/same": b"x" * 5000}
        for key, data in new.items():
            cb.put_object(key, data)
        for key, data in new.items():
            with open(m.path(key), "rb") as f:
                assert f.read() == data, key
            assert os.stat(m.path(key)).st_size == len(data), key
    finally:
        m.cleanup()


def test_a_handle_on_the_old_version_never_reads_the_new_ones_pages(tmp_path, cmk_path, oss_server):
    """A process holds a file open and has read its first half; another client replaces it;
    another process then opens and reads the new version whole. The holder's further reads
    give the old version's bytes (or ESTALE), never the new version's pages the kernel cached
    for the second reader (a trial: the holder got old[:50000] + new[50000:], with success)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    try:
        old = _file_then_remount(m, 100_000, clear_cache=False)
        cb = crypto_bucket(oss_server.endpoint, rsa_provider(m.cmk))
        for new in (os.urandom(100_000), os.urandom(300_000)):
            with open(m.path("f"), "rb") as held:
                first = held.read(50_000)
                assert first == old[:50_000]
                cb.put_object("f", new)
                time.sleep(1.3)  # past attr_timeout: the next open finds the new version
                r = subprocess.run(["cat", m.path("f")], capture_output=True)
                assert r.returncode == 0 and r.stdout == new
                try:
                    rest = held.read()
                except OSError as e:
                    assert e.errno == errno.ESTALE, e
                else:
                    assert rest == old[50_000:], (len(rest), rest == new[50_000:len(rest) + 50_000])
            with open(m.path("f"), "rb") as f:  # the holder gone: the new version, whole
                assert f.read() == new
            old = new
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.fs\.commit: upload of 'big' failed", r"ossfuse\.store\.oss: OSS",
                        r"ossfuse\.writeback\.upload: abort of multipart upload",
                        r"ossfuse\.fs\.commit: aborted unfinished multipart upload",
                        r"ossfuse\.daemon: found 1 journaled file")
def test_an_upload_a_crash_left_is_aborted_at_the_next_mount_and_another_clients_is_not(tmp_path, cmk_path,
                                                                                        oss_server):
    """A multipart upload that failed and whose abort failed too stays in the cache dir's
    multipart ledger through a kill -9; the next mount aborts exactly it, not another client's
    running upload of the same key begun meanwhile (the journal's keys aborted that one too),
    and uploads the journaled file."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "multipart_threshold = 300000\npart_size = 102400\nupload_delay = 0.1")
    m.start()
    try:
        data = os.urandom(1_000_000)
        oss_server.faults.add(status=503, count=None, methods=("PUT",), query="uploadId")  # parts
        oss_server.faults.add(status=503, count=None, methods=("DELETE",), query="uploadId")  # abort
        with open(m.path("big"), "wb") as f:
            f.write(data)
        deadline = time.monotonic() + 60
        while "abort of multipart upload" not in m.log():
            assert time.monotonic() < deadline, m.log()
            time.sleep(0.1)
        ours = run_sync(m.store.list_multipart_uploads, "")
        assert [k for k, _u, _t in ours] == ["big"]
        assert len(os.listdir(os.path.join(m.cache, "multipart"))) == 1
        m.kill9()
        oss_server.faults.clear()
        theirs = run_sync(m.store.create_multipart, "big", {})
        time.sleep(1.1)  # OSS initiation times are in seconds: theirs began before the next mount
        m.start()
        assert m.stop() == 0  # the journaled file uploads
        left = run_sync(m.store.list_multipart_uploads, "")
        assert [(k, u) for k, u, _t in left] == [("big", theirs)]
        assert os.listdir(os.path.join(m.cache, "multipart")) == []
        assert f"aborted unfinished multipart upload {ours[0][1]} of 'big'" in m.log()
        m.start()
        assert sha(m.path("big")) == hashlib.sha256(data).hexdigest()
    finally:
        m.cleanup()


def _kill_during_mv(m: Mount, oss_server, src: str, dst: str, until) -> None:
    """`mv src dst` in ``m``, and kill -9 its daemon once ``until()`` is true (within 60 s,
    while `mv` runs); the server's faults are cleared then, and `mv` has failed."""
    mv = subprocess.Popen(["mv", m.path(src), m.path(dst)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not until():
        assert time.monotonic() < deadline and mv.poll() is None
        time.sleep(0.02)
    m.kill9()
    mv.wait(timeout=30)
    oss_server.faults.clear()
    assert mv.returncode != 0


def _uploaded_tree(m: Mount, n: int) -> dict[str, bytes]:
    """Start ``m`` with a directory ``tree`` of ``n`` small files in the bucket, remounted (its
    names and versions read from the store); returns name → content."""
    m.start()
    files = {f"f{i:03d}": os.urandom(50 + i) for i in range(n)}
    os.mkdir(m.path("tree"))
    for name, data in files.items():
        with open(m.path("tree", name), "wb") as f:
            f.write(data)
    assert m.stop() == 0
    m.start()
    return files


@pytest.mark.expect_log(r"ossfuse\.daemon: undid the rename of 'tree' to 'moved'")
def test_a_directory_rename_a_kill_cuts_off_is_undone_at_the_next_mount(tmp_path, cmk_path, oss_server):
    """A trial killed the daemon 0.15 s into `mv` of a 300-file directory: both trees stayed,
    with nothing said. Now the next mount undoes it (the `mv` failed): every file at the old
    name as it was, nothing at the new one, one WARNING line naming both."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("upload_delay = 0")
    try:
        files = _uploaded_tree(m, 60)
        oss_server.faults.latency(0.05)  # each copy takes a while: the kill comes between them
        _kill_during_mv(m, oss_server, "tree", "moved", lambda: any(k.startswith("moved/") for k in m.keys()))
        assert any(k.startswith("moved/") for k in m.keys())  # both trees, as the trial saw
        m.start()
        assert sorted(os.listdir(m.path("tree"))) == sorted(files) and not os.path.exists(m.path("moved"))
        for name, data in files.items():
            assert open(m.path("tree", name), "rb").read() == data
        assert not any(k.startswith("moved/") for k in m.keys())
        assert "undid the rename of 'tree' to 'moved' that an earlier run left unfinished" in m.log()
        assert "stay at the new name" not in m.log()
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.fs\.copying: copy of 'tree/f01", r"ossfuse\.store\.oss: OSS")
def test_a_directory_rename_whose_copy_fails_leaves_the_tree_where_it_was(tmp_path, cmk_path, oss_server):
    """A copy failing for good (503s past the retries) fails `mv`, and the copies made so far
    are taken back at once: no half-made directory at the new name (a trial: it stayed, and
    coreutils' `mv`, falling back to moving INTO that directory, then put the tree at
    moved/tree and exited 0)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    _few_retries(m, "upload_delay = 0")
    try:
        files = _uploaded_tree(m, 40)
        oss_server.faults.add(status=503, count=None, methods=("PUT",), key_prefix="moved/f01")
        r = subprocess.run(["mv", m.path("tree"), m.path("moved")], capture_output=True, text=True, timeout=120)
        oss_server.faults.clear()
        assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr
        assert os.listdir(m.path()) == ["tree"]
        assert not any(k.startswith("moved/") for k in m.keys())
        for name, data in files.items():
            assert open(m.path("tree", name), "rb").read() == data
        assert os.listdir(os.path.join(m.cache, "renames")) == []
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.daemon: finished the rename of 'src\.bin' to 'dst\.bin'", r"ossfuse\.store\.oss: OSS")
def test_a_file_rename_a_kill_cuts_off_after_its_copy_is_finished_at_the_next_mount(tmp_path, cmk_path, oss_server):
    """A file's rename is a copy, then a DELETE of the original. A kill between the two left
    the file at both names. Now the next mount finishes it: the original goes, the copy
    reads back, one WARNING line names both."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("upload_delay = 0")
    try:
        m.start()
        data = os.urandom(70_000)
        with open(m.path("src.bin"), "wb") as f:
            f.write(data)
        assert m.stop() == 0
        m.start()
        assert m.keys() == ["src.bin"]
        oss_server.faults.add(status=503, count=None, methods=("DELETE",), key_prefix="src.bin")
        # killed once the copy landed and the DELETE retries
        _kill_during_mv(m, oss_server, "src.bin", "dst.bin", lambda: oss_server.requests_for(method="DELETE",
                                                                                            key="src.bin"))
        assert m.keys() == ["dst.bin", "src.bin"]  # both names, as before the fix
        m.start()
        assert os.listdir(m.path()) == ["dst.bin"]
        assert open(m.path("dst.bin"), "rb").read() == data
        assert m.keys() == ["dst.bin"]
        assert "finished the rename of 'src.bin' to 'dst.bin' that an earlier run left unfinished" in m.log()
        assert os.listdir(os.path.join(m.cache, "renames")) == []
        os.rename(m.path("dst.bin"), m.path("again.bin"))  # this run's log of file renames goes at unmount
        assert len(os.listdir(os.path.join(m.cache, "renames"))) == 1
        assert m.stop() == 0
        assert os.listdir(os.path.join(m.cache, "renames")) == [] and m.keys() == ["again.bin"]
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.daemon: left the rename of 'a' to 'b' that an earlier run left unfinished",
                        r"ossfuse\.daemon: found 1 journaled file", r"ossfuse\.store\.oss: OSS",
                        r"ossfuse\.daemon: 1 key\(s\) got a later write of this mount after a request to them was "
                        r"given up without an answer \('b'; by an earlier run of this mount\)")
def test_an_empty_files_rename_whose_copy_never_landed_keeps_the_targets_unsaved_changes(tmp_path, cmk_path,
                                                                                        oss_server):
    """Every encrypted empty object has the same ETag on OSS (the MD5 of nothing). A trial
    renamed empty 'a' over empty 'b', whose new contents were closed but not uploaded, killed
    the daemon while the copy failed (it never landed), and the next mount took b's old
    object for a's copy: 'a' deleted, b's contents gone. The wrapped data key tells them
    apart now: nothing changes. (The next mount knows the killed run's copy may still land,
    over the b it uploads: its unmount says so, as the run that sent it would.)"""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("upload_delay = 0")
    try:
        m.start()
        for name in ("a", "b"):
            open(m.path(name), "wb").close()
        assert m.stop() == 0
        m.write_config("upload_delay = 3600")
        m.start()
        with open(m.path("b"), "wb") as f:
            f.write(b"PRECIOUS unsaved content of b")
        # the copy is answered 503 after 2 s: the kill comes while it waits, and it never lands
        oss_server.faults.add(status=503, count=None, methods=("PUT",), key_prefix="b")
        oss_server.faults.latency(2.0)
        oss_server.clear_requests()
        _kill_during_mv(m, oss_server, "a", "b", lambda: oss_server.requests_for(method="PUT", key="b"))
        m.start()
        assert sorted(os.listdir(m.path())) == ["a", "b"]
        assert open(m.path("a"), "rb").read() == b""
        assert open(m.path("b"), "rb").read() == b"PRECIOUS unsaved content of b"
        assert "left the rename of 'a' to 'b' that an earlier run left unfinished (a crash) as it was" in m.log()
        assert m.stop() == 0
        assert m.keys() == ["a", "b"]
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.fs\.conflicts: 'e\.bin' was (created|changed) by another client")
def test_a_conflict_found_at_unmount_logs_one_warning_and_no_error(tmp_path, cmk_path, oss_server):
    """An upload that finds another client's object at its name during the unmount's drain
    makes a conflict copy: one WARNING. It also told the kernel, gone by then, that the name
    moved: pyfuse3 logged an ERROR with a traceback for each (a trial)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("upload_delay = 3600")
    try:
        m.start()
        with open(m.path("e.bin"), "wb") as f:
            f.write(b"ours")
        run_sync(m.store.put_bytes, "e.bin", b"theirs", {})
        assert m.stop() == 0
        assert sorted(k.split(".conflict-")[0] for k in m.keys()) == ["e", "e.bin"]
        assert "invalidate_entry" not in m.log() and " ERROR " not in m.log()
    finally:
        m.cleanup()



# Opens the file it is given, says so, and reads 1 MiB from 10 MiB on once told to.
_READER = ("import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.readline(); "
           "f.seek(10 << 20); f.read(1 << 20)")


def _wait_for_the_reads_get(oss_server, key: str = "f", offset: int = 10 << 20) -> None:
    """Until a ranged GET of ``key`` covering byte ``offset`` (the reader's) is at the server:
    a GET of the open's first block, sent late on a loaded machine, is not it (a CI run killed
    the reader before its read was sent)."""
    def covers(r) -> bool:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", r.headers.get("range", ""))
        return m is not None and int(m.group(1)) <= offset and (not m.group(2) or int(m.group(2)) >= offset)
    deadline = time.monotonic() + 30
    while not any(covers(r) for r in oss_server.requests_for(method="GET", key=key)):
        assert time.monotonic() < deadline, "the read's GET did not reach the server"
        time.sleep(0.05)


def _unmount_after_a_reader_killed_in_a_hanging_read(m: Mount, oss_server) -> float:
    """Open file ``f`` of ``m`` (more than 11 MiB, not cached) in a reader process, make the
    store answer nothing, let the reader read, kill it once its GET is at the server, then
    ``ossfuse umount``: the seconds the unmount took (it must succeed)."""
    proc = subprocess.Popen([sys.executable, "-c", _READER, m.path("f")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "open\n"
        oss_server.clear_requests()
        oss_server.call("faults.latency", 3600)  # every request from now on waits an hour
        proc.stdin.write("read\n")
        proc.stdin.flush()
        _wait_for_the_reads_get(oss_server)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    start = time.monotonic()
    try:
        assert m.stop() == 0
    finally:
        oss_server.call("faults.clear")
    return time.monotonic() - start


def test_umount_does_not_wait_for_a_read_whose_reader_is_gone(tmp_path, cmk_path, oss_server):
    """A reader killed while its read waited for a store that does not answer, then an unmount:
    nobody can receive that read's answer, so the unmount does not wait for it (it waited for
    the GET's read timeout, 58 s with nothing printed: a trial of the twenty-second session)."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    try:
        _file_then_remount(m, 12 << 20)
        took = _unmount_after_a_reader_killed_in_a_hanging_read(m, oss_server)
        assert took < 15, f"the unmount waited {took:.1f} s for a read nobody waits for"
        log = m.log()
        assert "FUSE session ended: 1 lookup(s) or read(s) still waiting for the store are dropped" in log
        assert " ERROR " not in log
    finally:
        m.cleanup()


# Opens the file it is given for direct I/O, says so, and reads 1 MiB from 10 MiB on once told to
# (an mmap is page-aligned, as O_DIRECT wants).
_DIRECT_READER = ("import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); print('open', flush=True); "
                  "sys.stdin.readline(); os.preadv(fd, [mmap.mmap(-1, 1 << 20)], 10 << 20)")
# The same read in a second thread: killed, the process's main thread is a zombie with no file
# to show, while the reading thread waits for its answer (a trial: umount saw no holder).
_DIRECT_READER_THREAD = ("import mmap, os, sys, threading; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); "
                         "print('open', flush=True); sys.stdin.readline(); threading.Thread(target=os.preadv, "
                         "args=(fd, [mmap.mmap(-1, 1 << 20)], 10 << 20)).start(); threading.Event().wait()")


@pytest.mark.expect_log(r"ossfuse\.store\.health: store unreachable, working offline from the cache: OSS GET 'f': "
                        r"no answer from \S+ within 5\.0s")
@pytest.mark.parametrize("reader", [_DIRECT_READER, _DIRECT_READER_THREAD], ids=["process", "thread"])
def test_a_killed_direct_io_reader_of_a_hung_store_ends_within_the_offline_timeout(tmp_path, cmk_path, oss_server,
                                                                                   reader):
    """A direct-I/O reader killed while its GET waits for a store that does not answer: the
    kernel waits for that read's answer (the killed process stays in its read, and the mount
    busy) until the GET gives up, which it now does after store.offline_timeout (5 s, not
    sent again), as any request with no answer; it waited read_timeout, 60 s, then 2 × 5 s
    (trials). `ossfuse umount` meanwhile waits for the killed reader, then unmounts."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    try:
        _file_then_remount(m, 12 << 20)
        proc = subprocess.Popen([sys.executable, "-c", reader, m.path("f")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "open\n"
            oss_server.clear_requests()
            oss_server.call("faults.latency", 3600)
            proc.stdin.write("read\n")
            proc.stdin.flush()
            _wait_for_the_reads_get(oss_server)
            killed = time.monotonic()
            proc.kill()
            # at once: the killed reader still holds the mount (it waits for its read's answer),
            # and the unmount waits for it to end instead of failing "busy (in use by pid …)"
            r = subprocess.run(OSSFUSE + ["umount", m.mnt], capture_output=True, text=True, timeout=120, env=m.env)
            took = time.monotonic() - killed
            assert r.returncode == 0, r.stderr
            assert re.fullmatch(rf"(ossfuse: waiting for pid {proc.pid} \(\S+\), killed, to end: it waits for a "
                                rf"request( in the mount| \(perhaps in this mount\))\n)?", r.stderr), r.stderr  # (if it was still there)
            assert took < 8.5, f"the killed reader waited {took:.1f} s for its read"  # 5 s, not 2 × 5 s
            assert proc.wait(timeout=5) == -9
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=120)
            oss_server.call("faults.clear")
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: 'f': an upload sent before the daemon's crash took effect "
                        r"late, over this mount's later version \S+; that version is put back",
                        r"WARNING ossfuse\.store\.indoubt: 'f': an upload sent before the daemon's crash took effect "
                        r"late, after this mount had moved or removed that file",
                        r"WARNING ossfuse\.daemon: found 1 journaled file",
                        r"ossfuse\.store\.oss: OSS PUT 'f'")
@pytest.mark.parametrize("store_kind", ["oss"])
@pytest.mark.parametrize("then", ["saved again", "saved again, then looked at", "moved"])
def test_an_upload_a_killed_daemon_sent_that_lands_late_is_said_or_undone(make_mount, oss_server, then):
    """Trial BT10, over real HTTP: v1 in the bucket, v2 closed and its PUT held by the store,
    the daemon killed, the next mount up. Saved again (v3) before the held PUT landed, it
    replaced v3 in the bucket without a word; moved to g, the name f came back with v2. The
    mount now watches a recovered version's key for its late landing (OSS has no conditional
    PUT: it cannot be stopped) and undoes it: over a newer save, that save is put back from
    the block cache (one WARNING; BT10 1: it was only said, and v3 was lost from the bucket);
    where the mount has nothing any more, the late object is deleted again (one WARNING).
    Looked at between the landing and the 30 s check (BT12: a `stat` made the mount take the
    late object for another client's, and nothing was put back), the file still reads v3 and
    the look starts the check at once."""
    m = make_mount("upload_delay = 0.1")
    with open(m.path("f"), "wb") as f:
        f.write(b"v1")
        os.fsync(f.fileno())
    oss_server.call("faults.add_delay", 6.0, count=1, methods=("PUT",), key_prefix="f")
    with open(m.path("f"), "wb") as f:
        f.write(b"v2, sent before the crash")
    time.sleep(1.0)  # its PUT is out, held by the store
    m.kill9()
    m.start()
    if then.startswith("saved again"):
        with open(m.path("f"), "wb") as f:
            f.write(b"v3")
            os.fsync(f.fileno())
        want = ["f"]
    else:
        os.rename(m.path("f"), m.path("g"))
        want = ["g"]
    time.sleep(6.0)  # the held PUT lands
    if then == "saved again, then looked at":
        os.stat(m.path("f"))  # (attr_timeout is over: a HEAD, which finds the late v2)
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"v3"
        deadline = time.monotonic() + 10
        while "that version is put back" not in m.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "that version is put back" in m.log()  # at once, not at the 30 s check
    assert m.stop() == 0  # its last look at the keys in doubt: the ERROR, or the delete
    assert sorted(m.keys()) == want
    if then == "moved":
        assert m.get("g")  # (encrypted v2 there)
        assert "is deleted again" in m.log()
    else:
        assert "that version is put back" in m.log()
        m.start()
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"v3"  # the newer save, not the late v2
        assert m.stop() == 0


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'h' failed", r"ossfuse\.store\.oss: OSS PUT 'h'",
                        r"ERROR ossfuse\.store\.indoubt: 'h': .* deleting its object there .* failed",
                        r"ERROR ossfuse\.daemon: 1 late upload\(s\) of files removed",
                        r"WARNING ossfuse\.daemon: found 1 journaled file",  # (g, moved before the kill)
                        r"WARNING ossfuse\.store\.indoubt: 'h': a PUT .* took effect late, after this mount had "
                        r"moved or removed that file; its object there \(version \w+\) is deleted again")
@pytest.mark.parametrize("store_kind", ["oss"])
@pytest.mark.parametrize("then", ["removed", "removed, the daemon killed", "moved, the daemon killed",
                                  "removed, its delete refused"])
def test_an_upload_given_up_on_that_lands_after_the_file_went_is_deleted_again(make_mount, oss_server, then):
    """Break trial BT16 F1, F2: a file's PUT got no answer (given up on), the user removed or
    moved the file, and the PUT landed late: the name came back with the old content, in the
    bucket and through the mount. Without a crash the check only said so (an ERROR); after a
    `kill -9` nothing watched the name at all (the requests in doubt were in memory only). The
    mount's own upload landed where it has nothing is its stale object: deleted again, also by
    the next mount of the cache dir (``indoubt.log``)."""
    m = make_mount(start=False)
    m.write_config("upload_delay = 0\nretry_interval = 600", store_options="request_deadline = 2\nretries = 0")
    m.start()
    oss_server.call("faults.add_delay", 7.0, count=1, methods=("PUT",), key_prefix="h")
    with open(m.path("h"), "wb") as f:
        f.write(b"h, given up on")
    deadline = time.monotonic() + 15
    while "upload of 'h' failed" not in m.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "upload of 'h' failed" in m.log()  # its PUT is still held by the store
    if then.startswith("moved"):
        os.rename(m.path("h"), m.path("g"))
    else:
        os.unlink(m.path("h"))
    if "killed" in then:
        m.kill9()
        m.start()  # (it takes over the earlier run's requests in doubt)
    deadline = time.monotonic() + 15
    while "h" not in m.keys() and time.monotonic() < deadline:  # the held PUT lands
        time.sleep(0.1)
    assert "h" in m.keys()
    if then.endswith("refused"):  # (BT16c: the unmount exited 0, the removed file back in the bucket)
        oss_server.call("faults.add", 503, count=None, methods=("DELETE",), key_prefix="h")
        assert m.stop() == 75 and "h" in m.keys()
        assert "1 late upload(s) of files removed or moved here could not be deleted again ('h')" in m.log()
        oss_server.call("faults.clear")
        m.start()  # (the next mount tries again)
    assert m.stop() == 0  # its last look at the keys in doubt
    assert sorted(m.keys()) == (["g"] if then.startswith("moved") else [])
    assert "is deleted again" in m.log()
    if "killed" in then:
        assert "an earlier run of this mount gave up on" in m.log()
    if then.startswith("moved"):
        m.start()
        with open(m.path("g"), "rb") as f:
            assert f.read() == b"h, given up on"
