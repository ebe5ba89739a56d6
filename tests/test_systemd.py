"""Server-grade mounts: systemd units, the notify protocol, mount(8) with fstab options,
SIGTERM during an upload, status, start-up while the store is down, stale mount points."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest

from conftest import BUCKET, OSSFUSE, Mount, run_sync

pytestmark = pytest.mark.timeout(180)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    if shutil.which("systemd-analyze") is None:  # .ci/install installs systemd; a dev box may not
        subprocess.run(["apt-get", "install", "-y", "-qq", "systemd"], check=True, capture_output=True)
    for name in ("ossfuse@.service", "srv-team.mount"):
        shutil.copy(os.path.join(REPO, "systemd", name), tmp_path / name)
    for unit in ("ossfuse@team.service", "srv-team.mount"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"./{unit}"], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ignoring" not in r.stderr and "Unknown" not in r.stderr, r.stderr
    unit = open(os.path.join(REPO, "systemd", "ossfuse@.service")).read()
    assert "Type=notify" in unit and "network-online.target" in unit
    # a LoadCredential= with an absolute path fails the unit (243/CREDENTIALS) when the file is
    # missing (systemd's load_credential: missing_ok is false for absolute paths): only in a comment
    assert not [line for line in unit.splitlines() if line.startswith("LoadCredential")]
    assert "#   LoadCredential=oss:/etc/ossfuse/NAME.credentials" in unit  # the drop-in to add
    assert "ACCESS_KEY" not in unit.split("[Service]")[1].replace("OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET", "")


def test_notify_ready_only_after_the_mount_answers_and_stopping_on_sigterm(make_mount, tmp_path):
    m = make_mount(start=False)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    env = dict(m.env, NOTIFY_SOCKET=sock_path)
    proc = subprocess.Popen(OSSFUSE + ["mount", "-f", "-c", m.config, m.mnt], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        messages = []
        while not any(msg.startswith("READY=1") for msg in messages):
            messages.append(sock.recv(4096).decode())
            if not messages[-1].startswith("READY=1"):
                continue
            # at the moment READY=1 arrives the mount is there and answers
            assert os.path.ismount(m.mnt)
            assert stat.S_ISDIR(os.stat(m.mnt).st_mode)
        assert "STATUS=mounted at" in messages[-1]
        with open(m.path("f"), "wb") as f:
            f.write(b"x" * 1000)
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode().startswith("STOPPING=1")
        assert proc.wait(60) == 0
        assert m.head("f").size == 1000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_mount_t_fuse_ossfuse_with_fstab_options(tmp_path, cmk_path):
    m = Mount(str(tmp_path / "m"), cmk_path)
    run_sync(m.store.put_bytes, "foreign", b"no attributes", {})
    opts = "_netdev,nofail,x-systemd.requires=network-online.target,uid=1234,gid=5678,umask=027"
    r = subprocess.run(["mount", "-t", "fuse.ossfuse", m.config, m.mnt, "-o", opts], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        st = os.stat(m.path("foreign"))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
        assert stat.S_IMODE(os.stat(m.mnt).st_mode) == 0o750
        fd = os.open(m.path("new"), os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        assert stat.S_IMODE(os.stat(m.path("new")).st_mode) == 0o640  # umask=027 masks new files too
        os.mkdir(m.path("d"), 0o777)
        assert stat.S_IMODE(os.stat(m.path("d")).st_mode) == 0o750
    finally:
        assert subprocess.run(OSSFUSE + ["umount", m.mnt]).returncode == 0
    # the same through an fstab line
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{m.config} {m.mnt} fuse.ossfuse {opts},ro 0 0\n")
    r = subprocess.run(["mount", "--fstab", str(fstab), m.mnt], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert open(m.path("foreign"), "rb").read() == b"no attributes"
        with pytest.raises(OSError) as e:
            open(m.path("other"), "wb")
        assert e.value.errno == 30  # EROFS
        assert "ro," in [l for l in open("/proc/mounts") if m.mnt in l][0].split()[3] + ","
        # a second `mount -a` (every boot script, a re-run) sees the entry mounted: the source
        # mount(8) compares is the config path (it was `ossfuse:NAME`: exit 32, "busy")
        again = subprocess.run(["mount", "-a", "--fstab", str(fstab), "-t", "fuse.ossfuse"], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert [l.split()[0] for l in open("/proc/mounts") if f" {m.mnt} " in l] == [m.config]
    finally:
        subprocess.run(OSSFUSE + ["umount", m.mnt])
    m.cleanup()


def test_sigterm_during_a_200_mib_upload_finishes_it(make_mount, tmp_path):
    m = make_mount()
    src = tmp_path / "src"
    with open(src, "wb") as f:
        for i in range(200):
            f.write(os.urandom(1 << 16) * 16)
    subprocess.run(["cp", str(src), m.path("big")], check=True)
    os.kill(m.pid, signal.SIGTERM)  # the upload has just started (or is queued)
    for _ in range(1200):
        if not os.path.ismount(m.mnt) and not os.path.exists(f"/proc/{m.pid}"):
            break
        time.sleep(0.1)
    info = m.head("big")
    assert info is not None and info.size == 200 << 20
    m.pid = None
    m.start()
    import hashlib
    assert hashlib.sha256(open(m.path("big"), "rb").read()).digest() == \
        hashlib.sha256(open(src, "rb").read()).digest()


@pytest.mark.expect_log(r"ossfuse\.fs\.files: cannot open")
def test_status_reports_pending_uploads_cmks_and_errors(make_mount):
    m = make_mount("upload_delay = 60")
    with open(m.path("pending"), "wb") as f:
        f.write(b"z" * 12345)
    run_sync(m.store.put_bytes, "broken", b"abc", {"client-side-encryption-key": "!!",
                                                   "client-side-encryption-start": "!!",
                                                   "client-side-encryption-cek-alg": "AES/CTR/NoPadding",
                                                   "client-side-encryption-wrap-alg": "RSA/NONE/PKCS1Padding"})
    time.sleep(0.6)
    with pytest.raises(OSError):
        open(m.path("broken"), "rb").read()
    r = subprocess.run(OSSFUSE + ["status", "--json", m.mnt], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pending_uploads"]["count"] == 1 and doc["pending_uploads"]["bytes"] == 12345
    assert doc["pending_uploads"]["oldest_seconds"] >= 0
    assert doc["cmks"][0]["id"] == "main" and doc["cmks"][0]["encrypts_new_objects"]
    assert any("broken" in e["message"] for e in doc["recent_errors"])
    assert doc["cache"]["staging_bytes"] >= 12345
    text = subprocess.run(OSSFUSE + ["status", m.mnt], capture_output=True, text=True).stdout
    assert "pending uploads:  1 file(s), 12345 bytes" in text and "CMK:              main" in text
    assert doc["log"] == os.path.join(m.cache, "ossfuse.log")  # (a trial: only the README said it)
    assert f"\nlog:              {doc['log']}\n" in text and "broken" in open(doc["log"]).read()
    assert m.stop() == 0
    r = subprocess.run(OSSFUSE + ["status", m.mnt], capture_output=True, text=True)
    assert r.returncode == 1 and "is not a mount point" in r.stderr


@pytest.mark.expect_log(r"ossfuse: not reachable after", r"ossfuse\.daemon: not reachable yet", r"ossfuse\.store\.oss: OSS ListObjects")
def test_start_while_the_store_is_down_retries_then_fails_clearly(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("startup_timeout = 2", store_options="retries = 0")
    oss_server.stop()
    t0 = time.monotonic()
    r = subprocess.run(OSSFUSE + ["mount", "-c", m.config, m.mnt], capture_output=True, text=True, env=m.env,
                       timeout=60)
    assert r.returncode == 1 and "not reachable after" in r.stderr and "(startup_timeout 2s" in r.stderr, r.stderr
    # while it retried, the terminal was told so, once (a new user saw a minute of silence)
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ossfuse: not reachable yet (store oss://") \
        and lines[0].endswith("); retrying for up to 2s (startup_timeout)"), r.stderr
    assert 1.5 < time.monotonic() - t0 < 20
    assert "not reachable yet" in m.log()
    # the server comes up while the mount is retrying: the mount succeeds
    m.write_config("startup_timeout = 60", store_options="retries = 0")
    threading.Timer(2.0, oss_server.start).start()
    m.start()
    assert m.mount_stderr.startswith("ossfuse: not reachable yet (") and m.mount_stderr.count("\n") == 1, \
        m.mount_stderr
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"ok")
        assert m.stop() == 0
        assert m.head("f").size == 2
    finally:
        m.cleanup()


def test_mount_says_when_the_store_takes_connections_but_does_not_answer(tmp_path, cmk_path, oss_server):
    """New-user trial NU6: `ossfuse mount` against a store that accepts connections and never
    answers (a SIGSTOPped server) printed nothing for 45 s. After 3 s without an answer it
    says it waits, once, and the mount goes on when the answer comes."""
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config("startup_timeout = 60", store_options="retries = 0")
    oss_server.faults.latency(4.0)  # (under the 5 s offline_timeout: the probe gets its answer)
    try:
        threading.Timer(5.0, oss_server.faults.latency, args=(0,)).start()
        m.start()
        assert m.mount_stderr.startswith(f"ossfuse: store oss://{BUCKET}: no answer yet after 3s; waiting for up "
                                         "to 60s (startup_timeout)") and m.mount_stderr.count("\n") == 1, \
            m.mount_stderr
        assert m.stop() == 0
    finally:
        oss_server.faults.latency(0)
        m.cleanup()


@pytest.mark.expect_log(r"ossfuse\.daemon:", r"ossfuse\.daemon: mount point")
def test_stale_mount_point_is_cleaned_on_mount(make_mount):
    m = make_mount()
    with open(m.path("f"), "wb") as f:
        f.write(b"before")
    os.kill(m.pid, signal.SIGKILL)  # leaves "Transport endpoint is not connected"
    time.sleep(0.5)
    with pytest.raises(OSError) as e:
        os.stat(m.mnt)
    assert e.value.errno == 107  # ENOTCONN
    # the unit's ExecStartPre fails there: its "-" lets systemd's restart go on to the daemon,
    # which clears the dead mount (an operator trial: every restart failed in the mkdir)
    unit = open(os.path.join(REPO, "systemd", "ossfuse@.service")).read()
    pre = [line for line in unit.splitlines() if line.startswith("ExecStartPre=")]
    assert pre == ["ExecStartPre=-/bin/mkdir -p ${MOUNTPOINT}"]
    assert subprocess.run(["/bin/mkdir", "-p", m.mnt], capture_output=True).returncode != 0
    m.start()
    assert open(m.path("f"), "rb").read() == b"before"
    said = f"mount point {m.mnt} was the dead mount of an earlier daemon (killed or crashed): unmounted it first"
    assert said in m.log() and f"ossfuse: warning: {said}" in m.mount_stderr, m.mount_stderr


@pytest.mark.expect_log(r"ossfuse\.daemon:", r"ossfuse\.daemon: mount point")
def test_remount_right_after_sigkill_of_a_busy_daemon(make_mount, tmp_path):
    """Straight after SIGKILL the kernel may still answer stat from its caches: the dead
    daemon's mount is recognised from the registry and cleared, not reported busy."""
    m = make_mount()
    subprocess.run(["cp", "-a", os.path.dirname(json.__file__), m.path("json")], check=True)
    os.stat(m.path("json"))  # attributes cached in the kernel
    os.kill(m.pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{m.pid}/stat") and open(f"/proc/{m.pid}/stat").read().split(")")[-1].split()[0] != "Z":
        time.sleep(0.01)
    m.start()
    assert sorted(os.listdir(m.path("json"))) == sorted(os.listdir(os.path.dirname(json.__file__)))
