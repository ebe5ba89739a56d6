"""Bad input fails loudly and narrowly (design.md promise 5), and closed files survive a
crash (promise 3): real mounts, real daemon processes, SIGKILL."""
from __future__ import annotations

import errno
import contextlib
import os
import stat as stat_mod
import time

import pytest

from ossfuse import envelope as env
from ossfuse.config import CmkConfig, EncryptionConfig
from ossfuse.keyring import Keyring

from ossfuse.store.base import StoreError

from conftest import run_sync

OSS_REFUSES = {"missing-start", "bad-cek-alg", "bad-wrap-alg"}  # oss-cse-format.md §6: 0005-000004xx

pytestmark = pytest.mark.timeout(120)


def _errno_of_read(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as e:
        return e.errno
    return None


def _put_raw(mount, key: str, data: bytes, meta: dict[str, str]) -> None:
    """Another client (an SDK) puts ``data`` with ``meta``: without ossfuse's integrity tags
    (docs/integrity.md), which no other writer computes; stale ones would fail every block."""
    run_sync(mount.store.put_bytes, key, data, {k: v for k, v in meta.items() if k != "ossfuse-integrity"})


@pytest.fixture
def damaged(mount, other_cmk_path):
    """A mount whose bucket holds one good file and several damaged objects."""
    with open(mount.path("good"), "wb") as f:
        f.write(b"good data")
    with open(mount.path("victim"), "wb") as f:
        f.write(b"victim data" * 100)
    mount.remount()
    good_meta = mount.head("victim").metadata
    body = mount.get("victim")
    cases = {}

    def add(name, data, meta, expect):
        try:
            _put_raw(mount, name, data, meta)
        except StoreError:
            # OSS itself refuses some damaged envelopes on PUT (CSE header rules); such an
            # object cannot exist there, so there is nothing to read back.
            assert mount.kind == "oss" and name in OSS_REFUSES, name
            return
        cases[name] = expect

    add("corrupt-key", body, {**good_meta, env.H_KEY: "!!!notbase64!!!"}, (errno.EIO, "not base64"))
    add("missing-start", body, {k: v for k, v in good_meta.items() if k != env.H_START},
        (errno.EIO, "x-oss-meta-client-side-encryption-start"))
    add("bad-cek-alg", body, {**good_meta, env.H_CEK_ALG: "AES/GCM/NoPadding"}, (errno.EIO, "cek-alg"))
    add("bad-wrap-alg", body, {**good_meta, env.H_WRAP_ALG: "ROT13"}, (errno.EIO, "wrap-alg"))
    add("truncated", body[:500], good_meta, (errno.EIO, "truncated"))
    other = Keyring(EncryptionConfig("o", (CmkConfig("o", "rsa", other_cmk_path),))).new_envelope("x")
    add("wrong-cmk", other.crypt(0, b"secret"), {**other.wrapped.headers(), env.H_PLAIN_LEN: "6"},
        (errno.EIO, "cannot read 'wrong-cmk': CMK 'main' cannot unwrap"))  # the open succeeded, the read failed
    add("unknown-matdesc", body, {**good_meta, env.H_MATDESC: '{"team": "nobody"}'},
        (errno.EACCES, "no CMK"))
    assert {"corrupt-key", "truncated", "wrong-cmk", "unknown-matdesc"} <= set(cases)
    return mount, cases


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: cannot (open|read)|WARNING ossfuse\.store\.oss: OSS PUT .missing-start.: HTTP 400")
def test_damaged_objects_give_errno_and_one_log_line_each(damaged):
    mount, cases = damaged
    for name, (want, reason) in cases.items():
        assert _errno_of_read(mount.path(name)) == want, name
        lines = [l for l in mount.log().splitlines() if repr(name) in l and "ERROR" in l]
        assert len(lines) == 1, (name, lines)  # one, not one per read the kernel retries (a trial)
        assert reason in lines[0], lines[0]
    # the rest of the mount keeps working
    assert open(mount.path("good"), "rb").read() == b"good data"
    assert sorted(os.listdir(mount.mnt)) == sorted(["good", "victim", *cases])
    with open(mount.path("after"), "wb") as f:
        f.write(b"still writable")
    assert open(mount.path("after"), "rb").read() == b"still writable"


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: .* was replaced while open")
def test_replaced_object_gives_estale_to_open_handle_and_new_version_to_next_open(mount):
    data = os.urandom(24 << 20)  # far beyond what read-ahead fetches after one small read
    with open(mount.path("f"), "wb") as f:
        f.write(data)
    mount.remount()
    with open(mount.path("f"), "rb") as f:
        assert f.read(100) == data[:100]
        # another client replaces the object: new content under the same envelope headers
        info = mount.head("f")
        envelope = Keyring(EncryptionConfig("k", (CmkConfig("k", "rsa", mount.cmk),))).open_envelope(
            env.parse_envelope(info.metadata))
        new = os.urandom(len(data))
        _put_raw(mount, "f", envelope.crypt(0, new), info.metadata)
        f.seek(20 << 20)
        with pytest.raises(OSError) as e:
            f.read(100)
        assert e.value.errno == errno.ESTALE
    assert "was replaced while open" in mount.log()
    time.sleep(0.6)  # attr_timeout of the test config: the next open revalidates
    with open(mount.path("f"), "rb") as f:
        f.seek(20 << 20)
        assert f.read(100) == new[20 << 20:(20 << 20) + 100]


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: found \d+ journaled file")
def test_sigkill_after_close_loses_nothing(make_mount):
    m = make_mount("upload_delay = 60")  # uploads wait: the files are only in the journal
    files = {f"dir{i % 3}/file{i}": os.urandom(1000 * i + 1) for i in range(20)}
    for d in ("dir0", "dir1", "dir2"):
        os.mkdir(m.path(d))
    for name, data in files.items():
        with open(m.path(name), "wb") as f:
            f.write(data)
    assert not any(k.startswith("dir0/file") for k in m.keys())  # nothing uploaded yet
    m.kill9()
    m.write_config()  # no upload delay from now on
    m.start()
    for name, data in files.items():
        assert open(m.path(name), "rb").read() == data, name
    assert m.stop() == 0
    for name, data in files.items():  # in the bucket, byte-exact, with a valid envelope
        info = m.head(name)
        assert info is not None and info.size == len(data), name
        e = Keyring(EncryptionConfig("k", (CmkConfig("k", "rsa", m.cmk),))).open_envelope(
            env.parse_envelope(info.metadata))
        assert e.crypt(0, m.get(name)) == data
    assert "journaled file(s) from an earlier run" in m.log()
    assert m.mount_stderr == "ossfuse: warning: found 20 journaled file(s) from an earlier run; queued for upload\n"
    assert os.listdir(os.path.join(m.cache, "staging")) == []


@pytest.mark.expect_log(r"ERROR ossfuse\.writeback\.staging: journal entry 0+1 for .*quarantined in .*unreadable record",
                        r"WARNING ossfuse\.daemon: 1 journal entry this mount cannot upload \([01] new; ")
def test_a_quarantined_journal_entry_is_shown_by_every_later_mount(make_mount):
    """A damaged journal entry is quarantined by the mount that finds it (ERROR line, counted)
    and stays in staging/quarantine: that mount and every later one say so in one WARNING line,
    in what `ossfuse mount` prints, and in `ossfuse status` (plain, --json, --prometheus), with
    the daemon's pid."""
    import json
    import subprocess
    from conftest import OSSFUSE

    def status(*args: str) -> str:
        r = subprocess.run(OSSFUSE + ["status", *args, m.mnt], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    m = make_mount(start=False)
    staging = os.path.join(m.cache, "staging")
    os.makedirs(staging, mode=0o700)
    sid = "0" * 31 + "1"
    with open(os.path.join(staging, sid + ".json"), "w") as f:
        f.write("{not json")  # a record the journal cannot read
    m.start()
    doc = json.loads(status("--json"))
    assert doc["counters"]["quarantined"] == 1 and doc["pid"] == m.pid and doc["up"] is True
    assert doc["quarantine"] == {"dir": os.path.join(staging, "quarantine"), "entries": 1}
    said = ("1 journal entry this mount cannot upload (1 new; damaged, or of another bucket or prefix: the log names it and "
            f"why) is kept in {staging}/quarantine, never uploaded: the bucket keeps what it has at that name (an "
            "older version, or nothing); recover by hand or delete")
    assert m.log().count(said) == 1
    assert m.mount_stderr.startswith(f"ossfuse: warning: {said}") and m.mount_stderr.count("\n") == 1, \
        m.mount_stderr
    m.remount()
    doc = json.loads(status("--json"))
    assert doc["counters"]["quarantined"] == 0 and doc["quarantine"]["entries"] == 1
    assert m.log().count("1 journal entry this mount cannot upload (0 new; ") == 1
    assert m.mount_stderr.startswith("ossfuse: warning: 1 journal entry this mount cannot upload (0 new; ")
    assert (f"quarantine:       1 damaged journal entry in {staging}/quarantine, never uploaded: recover by hand "
            "or delete") in status()
    assert f'ossfuse_quarantined_journal_entries{{mountpoint="{m.mnt}"}} 1' in status("--prometheus")
    assert os.listdir(os.path.join(staging, "quarantine")) == [sid + ".json"]  # kept, never deleted
    os.unlink(os.path.join(staging, "quarantine", sid + ".json"))  # the operator deals with it
    assert json.loads(status("--json"))["quarantine"]["entries"] == 0
    assert "quarantine:" not in status()
    assert f'ossfuse_quarantined_journal_entries{{mountpoint="{m.mnt}"}} 0' in status("--prometheus")


def test_unmount_waits_for_pending_uploads(make_mount):
    m = make_mount("upload_delay = 5")
    data = os.urandom(5 << 20)
    with open(m.path("late"), "wb") as f:
        f.write(data)
    assert m.head("late") is None
    assert m.stop() == 0  # returns only once the upload is in the bucket
    assert m.head("late").size == len(data)


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.(commit|files): .*(journaling|upload of|staging a write to) 'huge' failed")
@pytest.mark.expect_log(r"ossfuse\.fs\.commit:")
def test_full_cache_disk_gives_enospc_and_loses_nothing_closed(make_mount, tmpfs):
    m = make_mount(start=False)
    m.cache_on(tmpfs, 3 << 20)
    try:
        m.start()
        with open(m.path("small"), "wb") as f:
            f.write(b"closed before the disk filled")
        with pytest.raises(OSError) as e:
            with open(m.path("huge"), "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 20))
        assert e.value.errno == errno.ENOSPC
        assert "staging a write to 'huge' failed" in m.log() or "journaling 'huge' failed" in m.log()
        assert open(m.path("small"), "rb").read() == b"closed before the disk filled"  # still alive
        os.unlink(m.path("huge"))
        assert m.stop() == 0
        assert m.head("small").size == len(b"closed before the disk filled")
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.commit: upload of 'fallback' failed")
def test_local_bucket_takes_small_files_at_close_and_journals_when_it_fails(tmp_path, cmk_path):
    """On a local-directory bucket a closed small file is already in the bucket (one PUT, no
    journal record); when that PUT fails, close() still succeeds because the file is journaled,
    and the background upload delivers it once the bucket takes writes again."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path, "retry_interval = 1")
    m.start()
    # where the bucket writes new bodies: tmp/ (copied bodies) and blobs/ (linked ones)
    body_dirs = [os.path.join(m.bucket_dir, d) for d in ("tmp", "blobs")]

    def restore():
        for d in body_dirs:
            if os.path.isdir(d + ".away"):
                if os.path.isfile(d):
                    os.unlink(d)
                os.rename(d + ".away", d)
    try:
        with open(m.path("at-close"), "wb") as f:
            f.write(b"in the bucket when close returns")
        assert m.head("at-close").size == 32  # no wait: close() put it there
        assert os.listdir(os.path.join(m.cache, "staging")) == []
        for d in body_dirs:  # a file there: every PUT fails (ENOTDIR), even for root
            os.rename(d, d + ".away")
            open(d, "w").close()
        try:
            with open(m.path("fallback"), "wb") as f:
                f.write(b"journaled instead")
            assert m.head("fallback") is None
            journal = [n for n in os.listdir(os.path.join(m.cache, "staging")) if n.endswith(".json")]
            assert len(journal) == 1
            assert open(m.path("fallback"), "rb").read() == b"journaled instead"
        finally:
            restore()
        deadline = time.monotonic() + 30
        while m.head("fallback") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert m.head("fallback").size == len(b"journaled instead")
        assert m.stop() == 0
        assert "upload of 'fallback' failed" in m.log()
        m.start()
        assert open(m.path("fallback"), "rb").read() == b"journaled instead"
    finally:
        restore()
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: .* was replaced while open")
def test_replacement_while_open_reaches_the_next_open_whole(mount):
    """Another client replaces a file this mount holds open: the open handle gets ESTALE once it
    reads again, and an open after attr_timeout reads the new version whole, also the pages the
    kernel had cached from the old one."""
    data = os.urandom(3 << 20)
    with open(mount.path("f"), "wb") as f:
        f.write(data)
    mount.remount()
    new = os.urandom(len(data))
    with open(mount.path("f"), "rb") as hold:
        assert hold.read(100) == data[:100]  # the kernel now caches the first pages
        info = mount.head("f")
        envelope = Keyring(EncryptionConfig("k", (CmkConfig("k", "rsa", mount.cmk),))).open_envelope(
            env.parse_envelope(info.metadata))
        _put_raw(mount, "f", envelope.crypt(0, new), info.metadata)
        hold.seek(2 << 20)
        with pytest.raises(OSError) as e:
            hold.read(100)
        assert e.value.errno == errno.ESTALE
        time.sleep(0.6)  # attr_timeout of the test config
        with open(mount.path("f"), "rb") as later:  # while the old handle is still open
            assert later.read() == new
    with open(mount.path("f"), "rb") as again:
        assert again.read() == new


def test_mmap_write_through_an_append_handle_lands_in_place(mount):
    """The kernel writes mmap pages back through any writable handle, an O_APPEND one too, at
    the pages' own offsets (a local disk gives b"Q123456789")."""
    import mmap
    fd = os.open(mount.path("m"), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"0123456789")
        m = mmap.mmap(fd, 10)
        m[0:1] = b"Q"
        m.flush()
        m.close()
        os.write(fd, b"+tail")  # a plain append still goes to the end
    finally:
        os.close(fd)
    assert open(mount.path("m"), "rb").read() == b"Q123456789+tail"
    mount.remount()
    assert open(mount.path("m"), "rb").read() == b"Q123456789+tail"


@pytest.mark.expect_log(r"WARNING ossfuse\.writeback\.journal: unsaved changes of '[^']*f' \(work file ",
                        r"WARNING ossfuse\.daemon: the unsaved changes of 1 file\(s\) left by an earlier run")
def test_reopened_file_uploads_its_closed_version_whole_and_a_kill_keeps_it(make_mount):
    """Found by a trial: a file closed, then reopened for writing before its queued upload ran.
    That upload sent the writer's half-done content (other clients saw it torn), and after a
    SIGKILL the closed version was gone. The upload must send the closed version whole, and
    the next mount must read it."""
    m = make_mount("upload_delay = 0.2")
    data = os.urandom(3 << 20)  # journaled at close (above the size uploaded by close itself)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    fd = os.open(m.path("f"), os.O_RDWR)
    try:
        os.pwrite(fd, b"B" * (1 << 20), 1 << 20)  # never closed before the kill
        deadline = time.monotonic() + 30
        while m.head("f") is None:  # the queued upload, upload_delay after the close
            assert time.monotonic() < deadline, "the closed version was not uploaded"
            time.sleep(0.05)
        time.sleep(0.5)  # a second queued upload, if any, would now send the open version
        info = m.head("f")
        e = Keyring(EncryptionConfig("k", (CmkConfig("k", "rsa", m.cmk),))).open_envelope(
            env.parse_envelope(info.metadata))
        assert info.size == len(data) and e.crypt(0, m.get("f")) == data
        m.kill9()
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
            os.close(fd)
    m.start()
    assert open(m.path("f"), "rb").read() == data


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: found \d+ journaled file")
def test_attributes_changed_after_close_survive_a_killed_daemon(make_mount):
    m = make_mount()
    with open(m.path("f"), "wb") as f:
        f.write(b"data")
    os.chmod(m.path("f"), 0o600)
    os.utime(m.path("f"), ns=(1_100_000_000_000_000_000, 1_100_000_000_000_000_000))
    m.kill9()
    m.start()
    st = os.stat(m.path("f"))
    assert (stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 1_100_000_000_000_000_000)
    assert open(m.path("f"), "rb").read() == b"data"


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.(files|resolve|errors): .*AccessDenied")
def test_a_refused_request_is_one_log_line_naming_the_object_and_the_request(tmp_path, cmk_path, oss_server):
    """OSS refuses a GET and a HEAD (403, as a bucket policy would): the read and the stat fail
    with EIO, and each failure is one log line (ERROR) naming the object, the server's code and
    the request id — the store's own line about the same failure is INFO, not a second
    WARNING (the trial of the seventh session found two lines per failure)."""
    from conftest import Mount

    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config(store_options="retries = 0")
    m.start()
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"refused data")
        run_sync(m.store.put_bytes, "g", b"plain", {})  # another client's object: a HEAD at the stat
        m.remount()  # an empty block cache: the read needs a GET
        oss_server.faults.add(status=403, count=None, methods=("GET",), key_prefix="f")
        oss_server.faults.add(status=403, count=None, methods=("HEAD",), key_prefix="g")
        oss_server.clear_requests()
        assert _errno_of_read(m.path("f")) == errno.EIO
        with pytest.raises(OSError) as ei:
            os.stat(m.path("g"))
        assert ei.value.errno == errno.EIO
        lines = [l for l in m.log().splitlines() if " WARNING " in l or " ERROR " in l]
        for key, method in (("f", "GET"), ("g", "HEAD")):
            ids = [r.request_id for r in oss_server.requests_for(method=method) if r.key == key]
            mine = [l for l in lines if repr(key) in l]
            assert len(mine) == 1, lines
            assert "AccessDenied" in mine[0] and ids and any(i in mine[0] for i in ids), (mine, ids)
        assert len(lines) == 2, lines
        oss_server.faults.clear()
        assert open(m.path("f"), "rb").read() == b"refused data"
        assert m.stop() == 0
    finally:
        m.cleanup()
