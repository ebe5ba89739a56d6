"""What the benchmarks share: paths, the test credentials, logging, dropping the page cache,
and the OSS test server (tests/oss_server.py) as a process of its own."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.path.join(REPO, ".venv")
PY = os.path.join(VENV, "bin", "python")
OSSFUSE = os.path.join(VENV, "bin", "ossfuse")
PYSPY = os.path.join(VENV, "bin", "py-spy") if os.path.exists(os.path.join(VENV, "bin", "py-spy")) else "py-spy"
SERVER = os.path.join(REPO, "tests", "oss_server.py")

AK, SK, BUCKET, REGION = "AK", "SK", "test-bucket", "cn-hangzhou"
MiB = 1 << 20


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def proc_cpu(pid: int | None) -> float | None:
    """utime + stime of process ``pid`` in seconds (all its threads), None without one or when
    it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    """CPU seconds (user + sys, all threads) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pyspy_start(out: str, pid: int | None = None) -> subprocess.Popen:
    """py-spy recording process ``pid`` (default: this one) into ``out`` (raw collapsed stacks,
    per thread, only samples holding the GIL, 200 Hz; ``bench/pyspy_summary.py`` reads it),
    after 1 s for it to attach. Stop it with :func:`pyspy_stop`."""
    p = subprocess.Popen([PYSPY, "record", "--format", "raw", "--threads", "--gil", "-r", "200", "-o", out,
                          "--pid", str(pid or os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return p


def pyspy_stop(p: subprocess.Popen | None) -> None:
    """End a :func:`pyspy_start` recording (SIGINT: py-spy writes its file then)."""
    if p is not None:
        p.send_signal(signal.SIGINT)
        p.wait(30)


def drop_caches() -> None:
    """Flush and drop the page cache (root only), for cold-cache reads."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class OssServerProcess:
    """tests/oss_server.py on a free port: bodies under ``root`` (None: in its memory), its log
    in ``log_path`` (None: this process's stderr)."""

    def __init__(self, root: str | None = None, log_path: str | None = None):
        cmd = [PY, SERVER, "--port", "0", "--access-key-id", AK, "--access-key-secret", SK,
               "--bucket", BUCKET, "--region", REGION] + (["--root-dir", root] if root else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_path, "ab") if log_path else None,
                                     text=True, start_new_session=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}")
        self.endpoint = line
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def local_filesystem(work: str, upload_delay: float, listing_has_metadata: bool = True):
    """A filesystem core (no kernel) over a local-directory bucket in ``work/bucket``, its cache
    in ``work/cache`` and a new RSA-3072 CMK: (Filesystem, LocalStore). ``upload_delay``
    seconds as the mount option; ``listing_has_metadata`` False: the listing carries none, as
    over OSS. (ossfuse imported here: the other benchmarks need none of it.)"""
    from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
    from ossfuse.fs import Filesystem
    from ossfuse.keyring import Keyring, generate_rsa_cmk
    from ossfuse.store.local import LocalStore
    cmk = os.path.join(work, "cmk.pem")
    generate_rsa_cmk(cmk, 3072)
    cfg = Config(path=os.path.join(work, "ossfuse.toml"),
                 store=StoreConfig(url=f"local://{work}/bucket", prefix=""),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk),)),
                 cache=CacheConfig(dir=os.path.join(work, "cache")),
                 mount=MountConfig(upload_delay=upload_delay))
    os.makedirs(os.path.join(work, "bucket"))
    store = LocalStore(os.path.join(work, "bucket"))
    store.listing_has_metadata = listing_has_metadata
    return Filesystem(cfg, store, Keyring(cfg.encryption), uid=0, gid=0), store
