#!/usr/bin/env python3
"""ossfuse next to its peers, in one run on this machine: ossfuse over a local-directory bucket,
ossfuse over the OSS test server (tests/oss_server.py, its own process), ``rclone mount`` over a
``crypt`` remote on a local directory (``--vfs-cache-mode writes``), ``gocryptfs``, the
native disk (a plain directory on the same file system as the work dir), and, not a mount, the
raw oss2 SDK with client-side encryption (``oss2.CryptoBucket`` + ``RsaProvider``, same CMK)
against the same test server as ossfuse-oss, under the key prefix ``sdk/`` ("sdk-oss").

    sudo .venv/bin/python bench/peers.py [--quick] [--size-mib 1024] [--files 2000] [--reads 2000]

Workloads (the candidates are alternated: the order rotates and flips from one workload to the
next, and from one round to the next):

1. seq write   ``dd if=SRC of=MNT/big bs=1M`` (SRC: random bytes in /dev/shm), timed until the
               data is in the backing store: ossfuse until ``ossfuse umount`` returns; rclone
               until its VFS reports no upload queued or in progress (``rclone rc vfs/stats``)
               and ``fusermount3 -u`` has returned and rclone exited; gocryptfs and native with
               ``conv=fsync``.
2. cold read   cache emptied (ossfuse: cache dir but staging/ and its data-key cache; rclone: its cache dir), remount,
               ``drop_caches``, ``dd if=MNT/big of=/dev/null bs=1M``.
3. random read cold as above, then one Python reader does N ``pread`` of 4 KiB at random
               4 KiB-aligned offsets of MNT/big (fixed seed); reads/s. The bytes are checked
               against SRC afterwards (untimed).
4. small files ``create``: one Python program writes N files of 4 KiB (distinct contents) into
               MNT/small; files/s until it returns, and "create+flush" until the files are in the
               backing store (ossfuse umount / rclone uploads done + unmount / ``sync -f``).
               Then remount cold; ``ls -l MNT/small`` (seconds); ``cat MNT/small/*`` (files/s);
               ``rm -r MNT/small`` (files/s).
5. tar         ``tar -xf SRC.tar -C MNT/tree`` of a tarball of Python stdlib packages, timed until
               in the backing store as in 4 (seconds).

sdk-oss does the same from this process with sequential calls, each timed until it returns
(the data is then in the bucket): 1. ``put_object_from_file(SRC)``; 2. ``drop_caches``,
``get_object`` read in 1 MiB chunks; 3. ``drop_caches``, the same N offsets as ranged
``get_object`` of 4 KiB (checked likewise); 4. N ``put_object`` of the same contents (create and
create+flush are one figure), ``drop_caches`` then "ls -l" = list the prefix
(``ObjectIterator``) + ``head_object`` of each, ``get_object().read()`` of each,
``delete_object`` of each; 5. ``put_object`` of each regular file of the tarball (read with
``tarfile``). It has no daemon: no RSS.

The FUSE daemons' peak RSS (VmHWM) is sampled every 50 ms; every step mounts a fresh daemon, so
the figure per workload is that daemon's peak. MB/s are 10^6 B/s. Ratios are speed ratios:
> 1 means faster (or, for seconds, quicker) than the reference.

Must run as root (FUSE, drop_caches). Everything is unmounted, stopped and removed on any exit.
``--profile`` attaches py-spy (raw collapsed stacks, --threads) to the ossfuse daemon during each
timed step (use it in a separate run: it costs CPU), see bench/pyspy_summary.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (AK, BUCKET, HERE, OSSFUSE, PYSPY, REGION, REPO, SK, MiB,  # noqa: E402
                    OssServerProcess, drop_caches, log)
SYSPY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

ALL = ["native", "gocryptfs", "rclone-crypt", "ossfuse-local", "ossfuse-oss", "sdk-oss"]
WORKLOADS = ["seqwrite", "seqread", "randread", "small", "tar"]

CREATE_PROG = r"""
import os, random, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7)
os.mkdir(d)
for i in range(n):
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(rng.randbytes(size))
"""

RANDREAD_PROG = r"""
import os, random, sys, time
path, n, bs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
size = os.path.getsize(path)
rng = random.Random(42)
offs = [rng.randrange(size // bs) * bs for _ in range(n)]
fd = os.open(path, os.O_RDONLY)
t = time.perf_counter()
bufs = [os.pread(fd, bs, o) for o in offs]
dt = time.perf_counter() - t
os.close(fd)
with open(out, "wb") as f:
    for b in bufs:
        f.write(b.ljust(bs, b"\0"))
print(dt)
"""




def vmhwm(pid: int | None) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): "
                           f"{(r.stderr or '').strip()[-500:]}")
    return r


def wait_mounted(mnt: str, proc: subprocess.Popen | None, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount daemon for {mnt} exited ({proc.returncode})")
        if time.monotonic() > end:
            raise RuntimeError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.02)


def count_files(d: str) -> int:
    """Files under ``d``, but an ossfuse local bucket's index (index.sqlite and its -wal and
    -shm files, made by the first mount: not objects)."""
    n = 0
    for _, _, files in os.walk(d):
        n += sum(1 for f in files if not f.startswith("index.sqlite"))
    return n


def rand_offsets(size: int, n: int, bs: int) -> list[int]:
    """The random reads' offsets: the same seed and formula as RANDREAD_PROG."""
    rng = random.Random(42)
    return [rng.randrange(size // bs) * bs for _ in range(n)]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# ---- candidates ------------------------------------------------------------------------------

class Candidate:
    """A file system under test. mount()/unmount() leave nothing running; flush_unmount() returns
    once everything written is in the backing store and the file system is unmounted."""
    name = "?"
    fuse = True

    def __init__(self, bench: "Bench"):
        self.b = bench
        self.dir = os.path.join(bench.work, self.name)
        self.mnt = os.path.join(self.dir, "mnt")
        self.backing = os.path.join(self.dir, "backing")
        os.makedirs(self.mnt)
        os.makedirs(self.backing)
        self.pid: int | None = None
        self.mounted = False

    def setup(self) -> None: ...
    def mount(self) -> None: ...
    def unmount(self) -> None: ...
    def clear_cache(self) -> None: ...

    def flush_unmount(self) -> None:
        """Data in the backing store, then unmounted (timed by the caller)."""
        self.unmount()

    def write_flags(self) -> list[str]:
        return []

    def cold_mount(self) -> None:
        if self.mounted:
            self.unmount()
        self.clear_cache()
        drop_caches()
        self.mount()

    def emergency_cleanup(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.mounted = False


class Native(Candidate):
    name = "native"
    fuse = False

    def __init__(self, bench):
        super().__init__(bench)
        self.mnt = self.backing   # the plain directory itself

    def mount(self):
        self.mounted = True

    def unmount(self):
        self.mounted = False

    def flush_unmount(self):
        run(["sync", "-f", self.mnt])
        self.mounted = False

    def write_flags(self):
        return ["conv=fsync"]


class FgDaemon(Candidate):
    """A FUSE daemon run in the foreground as our child (its pid is the one to sample)."""
    proc: subprocess.Popen | None = None

    def mount_cmd(self) -> list[str]:
        raise NotImplementedError

    def mount(self):
        logf = open(os.path.join(self.b.logs, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.mount_cmd(), stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=self.env())
        logf.close()
        wait_mounted(self.mnt, self.proc)
        self.pid = self.proc.pid
        self.mounted = True

    def env(self):
        return os.environ

    def unmount(self):
        run(["fusermount3", "-u", self.mnt])
        if self.proc:
            try:
                self.proc.wait(600)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.pid = None
        self.mounted = False

    def emergency_cleanup(self):
        super().emergency_cleanup()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Gocryptfs(FgDaemon):
    name = "gocryptfs"

    def setup(self):
        self.pw = os.path.join(self.dir, "pw")
        with open(self.pw, "w") as f:
            f.write("bench-password\n")
        run(["gocryptfs", "-q", "-init", "-passfile", self.pw, self.backing])

    def mount_cmd(self):
        return ["gocryptfs", "-fg", "-q", "-nosyslog", "-passfile", self.pw, self.backing, self.mnt]

    def flush_unmount(self):
        # gocryptfs writes through to the backing directory; make it durable like native
        run(["sync", "-f", self.backing])
        self.unmount()

    def write_flags(self):
        return ["conv=fsync"]


class RcloneCrypt(FgDaemon):
    name = "rclone-crypt"

    def setup(self):
        self.cache = os.path.join(self.dir, "cache")
        self.conf = os.path.join(self.dir, "rclone.conf")
        pw = run(["rclone", "obscure", "bench-password"]).stdout.strip()
        with open(self.conf, "w") as f:
            f.write(f"[sec]\ntype = crypt\nremote = {self.backing}\npassword = {pw}\n")
        self.port = free_port()

    def env(self):
        return dict(os.environ, RCLONE_CONFIG=self.conf)

    def mount_cmd(self):
        return ["rclone", "mount", "sec:", self.mnt, "--vfs-cache-mode", "writes",
                "--vfs-write-back", self.b.args.rclone_write_back, "--cache-dir", self.cache,
                "--rc", "--rc-addr", f"127.0.0.1:{self.port}", "--rc-no-auth"]

    def clear_cache(self):
        shutil.rmtree(self.cache, ignore_errors=True)

    def vfs_stats(self) -> dict:
        r = run(["rclone", "rc", "--url", f"http://127.0.0.1:{self.port}/", "vfs/stats"],
                env=self.env())
        return json.loads(r.stdout)

    def flush_unmount(self):
        # wait until the VFS has nothing queued or uploading, then unmount
        while True:
            dc = self.vfs_stats().get("diskCache", {})
            if dc.get("uploadsInProgress", 0) == 0 and dc.get("uploadsQueued", 0) == 0:
                break
            time.sleep(0.02)
        self.unmount()


class Ossfuse(Candidate):
    oss = False

    def setup(self):
        self.cache = os.path.join(self.dir, "cache")
        self.config = os.path.join(self.dir, "ossfuse.toml")
        if self.oss:
            store = ["[store]", f'url = "oss://{BUCKET}"', f'endpoint = "{self.b.endpoint}"',
                     f'region = "{REGION}"', 'signature = "v4"']
        else:
            store = ["[store]", f'url = "local://{self.backing}"']
        lines = store + [
            "[encryption]", 'encrypt_with = "main"',
            "[[encryption.cmk]]", 'id = "main"', 'type = "rsa"', f'private_key = "{self.b.cmk}"',
            "[cache]", f'dir = "{self.cache}"',
        ]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def env(self):
        e = dict(os.environ)
        if self.oss:
            e.update(OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK)
        return e

    def mount(self):
        r = subprocess.run([OSSFUSE, "mount", "-c", self.config, self.mnt], capture_output=True,
                           text=True, timeout=180, env=self.env())
        if r.returncode != 0:
            raise RuntimeError(f"ossfuse mount failed ({r.returncode}): {r.stderr.strip()}")
        self.mounted = True
        sys.path.insert(0, REPO)
        from ossfuse.daemon import read_registry
        reg = read_registry(self.mnt)
        self.pid = reg["pid"] if reg else None

    def unmount(self):
        r = subprocess.run([OSSFUSE, "umount", self.mnt], capture_output=True, text=True,
                           timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"ossfuse umount failed ({r.returncode}): {r.stderr.strip()}")
        # the log lives in the cache dir, which cold mounts empty: keep a copy
        p = os.path.join(self.cache, "ossfuse.log")
        if os.path.exists(p):
            with open(p, "rb") as src, open(os.path.join(self.b.logs, f"{self.name}.log"), "ab") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(p)
        self.mounted = False
        self.pid = None

    def clear_cache(self):
        if not os.path.isdir(self.cache):
            return
        for name in os.listdir(self.cache):
            # staging: data not uploaded yet; datakeys.sqlite*: keys of files this machine made
            # or read (like a keyring, kept across mounts: a cold mount still has them)
            if name == "staging" or name.startswith("datakeys.sqlite"):
                continue
            p = os.path.join(self.cache, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)

    def emergency_cleanup(self):
        if self.mounted or os.path.ismount(self.mnt):
            pid = self.pid
            try:
                ok = subprocess.run([OSSFUSE, "umount", self.mnt], capture_output=True,
                                    timeout=300).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok or os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
                if pid:
                    for sig in (signal.SIGTERM, signal.SIGKILL):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            break
                        time.sleep(2)
        self.mounted = False
        self.pid = None


class OssfuseLocal(Ossfuse):
    name = "ossfuse-local"


class OssfuseOss(Ossfuse):
    name = "ossfuse-oss"
    oss = True

    def setup(self):
        super().setup()
        self.backing = self.b.bucket_root  # its objects are the test server's files


class SdkOss(Candidate):
    """No mount: the raw oss2 SDK with client-side encryption (``oss2.CryptoBucket`` +
    ``RsaProvider``, the bench's CMK) against the same test server as ossfuse-oss, under its own
    key prefix. Bench runs its own versions of the workloads (Bench.sdk_*): sequential,
    single-threaded calls from this process, each timed until the call returns."""
    name = "sdk-oss"
    fuse = False
    prefix = "sdk/"   # never collides with what ossfuse-oss writes

    def setup(self):
        import oss2
        import oss2.crypto
        with open(self.b.cmk) as f:
            priv = f.read()
        with open(self.b.cmk + ".pub") as f:
            pub = f.read()
        provider = oss2.crypto.RsaProvider(key_pair={"private_key": priv, "public_key": pub})
        # V4 signatures like the ossfuse-oss config, so both sides pay the same per request
        self.bucket = oss2.CryptoBucket(oss2.AuthV4(AK, SK), self.b.endpoint, BUCKET,
                                        crypto_provider=provider, region=REGION)

    def key(self, name: str) -> str:
        return self.prefix + name

    def keys(self, sub: str) -> list[str]:
        import oss2
        return [o.key for o in oss2.ObjectIterator(self.bucket, prefix=self.key(sub))]


CLASSES = {c.name: c for c in (Native, Gocryptfs, RcloneCrypt, OssfuseLocal, OssfuseOss, SdkOss)}


# ---- the bench -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size_mib * MiB
        self.work = tempfile.mkdtemp(prefix="ossfuse-peers-", dir=args.workdir)
        self.shm = tempfile.mkdtemp(prefix="ossfuse-peers-", dir="/dev/shm")
        self.src = os.path.join(self.shm, "src.bin")
        self.tar = os.path.join(self.shm, "src.tar")
        self.logs = os.path.join(self.work, "logs")
        self.cmk = os.path.join(self.work, "cmk.pem")
        self.bucket_root = os.path.join(self.work, "oss-server-root")
        os.makedirs(self.logs)
        os.makedirs(self.bucket_root)
        self.server: OssServerProcess | None = None
        self.endpoint = ""
        self.cands: list[Candidate] = []
        self.res: dict[str, dict[str, list[float]]] = {}   # cand -> metric -> values
        self.hwm: dict[str, dict[str, int]] = {}           # cand -> workload -> kB
        self.cur: tuple[Candidate, str] | None = None
        self._stop = threading.Event()
        self.problems: list[str] = []
        self.profiles: list[str] = []
        self.tar_files = 0

    # ---- infrastructure ----

    def start_server(self) -> None:
        self.server = OssServerProcess(self.bucket_root, os.path.join(self.logs, "server.log"))
        self.endpoint = self.server.endpoint
        log("oss test server", self.endpoint, "pid", self.server.pid)

    def stop_server(self) -> None:
        if self.server:
            self.server.stop()
        self.server = None

    def sampler(self) -> None:
        while not self._stop.wait(0.05):
            cur = self.cur
            if cur:
                c, wl = cur
                v = vmhwm(c.pid)
                if v:
                    d = self.hwm.setdefault(c.name, {})
                    d[wl] = max(d.get(wl, 0), v)

    def cleanup(self) -> None:
        self._stop.set()
        for c in self.cands:
            try:
                c.emergency_cleanup()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                log("cleanup", c.name, e)
        self.stop_server()
        for c in self.cands:
            if os.path.ismount(c.mnt):
                subprocess.run(["fusermount3", "-uz", c.mnt], capture_output=True)
        if self.args.keep:
            log("kept work dir", self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)

    def record(self, c: Candidate, metric: str, value: float) -> None:
        self.res.setdefault(c.name, {}).setdefault(metric, []).append(value)

    def timed(self, c: Candidate, tag: str, fn):
        """Run fn(), return seconds; with --profile, py-spy records the ossfuse daemon meanwhile."""
        prof = None
        if self.args.profile and isinstance(c, Ossfuse) and c.pid:
            os.makedirs(self.args.profile_dir, exist_ok=True)
            out = os.path.join(self.args.profile_dir, f"{c.name}-{tag}.txt")
            prof = subprocess.Popen([PYSPY, "record", "--pid", str(c.pid), "--rate", "200",
                                     "--format", "raw", "-o", out, "--nonblocking", "--threads"],
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(out + ".log", "w"))
            time.sleep(1.0)  # let py-spy attach
            self.profiles.append(out)
        t = time.perf_counter()
        try:
            fn()
            return time.perf_counter() - t
        finally:
            if prof:
                if prof.poll() is None:
                    prof.send_signal(signal.SIGINT)
                try:
                    prof.wait(60)
                except subprocess.TimeoutExpired:
                    prof.kill()
                    prof.wait()

    # ---- workloads ----

    def w_seqwrite(self, c: Candidate) -> None:
        c.mount()
        big = os.path.join(c.mnt, "big")
        if os.path.exists(big):
            os.unlink(big)
            c.flush_unmount()
            c.mount()

        def go():
            run(["dd", f"if={self.src}", f"of={big}", "bs=1M"] + c.write_flags())
            c.flush_unmount()
        dt = self.timed(c, "seqwrite", go)
        self.record(c, "seqwrite", self.size / dt / 1e6)
        log(f"  {c.name:14s} seq write {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")

    def w_seqread(self, c: Candidate) -> None:
        c.cold_mount()
        dt = self.timed(c, "seqread", lambda: run(
            ["dd", f"if={os.path.join(c.mnt, 'big')}", "of=/dev/null", "bs=1M"]))
        c.unmount()
        self.record(c, "seqread", self.size / dt / 1e6)
        log(f"  {c.name:14s} cold read {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")

    def w_randread(self, c: Candidate) -> None:
        n, bs = self.args.reads, 4096
        out = os.path.join(self.shm, "randread.out")
        c.cold_mount()
        holder = {}
        dt_wall = self.timed(c, "randread", lambda: holder.setdefault("r", run(
            [SYSPY, "-c", RANDREAD_PROG, os.path.join(c.mnt, "big"), str(n), str(bs), out])))
        c.unmount()
        dt = float(holder["r"].stdout.strip() or dt_wall)
        with open(out, "rb") as o:
            self.check_reads(c, rand_offsets(self.size, n, bs), bs, (o.read(bs) for _ in range(n)))
        os.unlink(out)
        self.record(c, "randread", n / dt)
        log(f"  {c.name:14s} random 4K {n / dt:8.1f} reads/s ({dt:.2f}s)")

    def check_reads(self, c: Candidate, offs: list[int], bs: int, bufs) -> None:
        """The random reads (bufs, in the order of offs) against the source (untimed)."""
        with open(self.src, "rb") as s:
            for off, buf in zip(offs, bufs):
                s.seek(off)
                if s.read(bs) != buf:
                    self.problems.append(f"{c.name}: random read at {off} differs from source")
                    break

    def w_small(self, c: Candidate) -> None:
        n, size = self.args.files, self.args.file_kib * 1024
        d = os.path.join(c.mnt, "small")
        before = count_files(c.backing)
        c.mount()
        sub = {}

        def create():
            t = time.perf_counter()
            run([SYSPY, "-c", CREATE_PROG, d, str(n), str(size)])
            sub["create"] = time.perf_counter() - t
            c.flush_unmount()
        t_create = self.timed(c, "small-create", create)
        c.cold_mount()
        t_ls = self.timed(c, "small-ls", lambda: run(["ls", "-l", d]))
        got = len(os.listdir(d))
        if got != n:
            self.problems.append(f"{c.name}: {got} small files listed, expected {n}")
        t_cat = self.timed(c, "small-cat", lambda: run(["sh", "-c", 'cat "$1"/* > /dev/null', "-", d]))
        t_rm = self.timed(c, "small-rm", lambda: run(["rm", "-r", d]))
        c.unmount()
        after = count_files(c.backing)
        if after > before + 2:
            self.problems.append(f"{c.name}: backing store holds {after - before} more files after rm -r")
        self.record_small(c, n, sub["create"], t_create, t_ls, t_cat, t_rm)

    def record_small(self, c: Candidate, n: int, t_create: float, t_flushed: float, t_ls: float,
                     t_cat: float, t_rm: float) -> None:
        """Record and log one small-files round: seconds for N creates (and until they were in
        the store), ls -l, cat and rm."""
        for metric, value in (("create", n / t_create), ("create+flush", n / t_flushed), ("ls-l", t_ls),
                              ("cat", n / t_cat), ("rm", n / t_rm)):
            self.record(c, metric, value)
        log(f"  {c.name:14s} small: create {n / t_create:7.1f} f/s, create+flush {n / t_flushed:7.1f} f/s, "
            f"ls -l {t_ls:.3f}s, cat {n / t_cat:7.1f} f/s, rm {n / t_rm:7.1f} f/s")

    def w_tar(self, c: Candidate, rnd: int) -> None:
        dest = os.path.join(c.mnt, f"tree{rnd}")
        c.mount()
        os.mkdir(dest)

        def go():
            run(["tar", "-xf", self.tar, "-C", dest])
            c.flush_unmount()
        dt = self.timed(c, "tar", go)
        self.record(c, "tar", dt)
        log(f"  {c.name:14s} tar -xf {dt:.2f}s ({self.tar_files / dt:.1f} files/s)")

    # ---- the same workloads through the SDK (no mount, no daemon, no RSS) ----

    def sdk_seqwrite(self, c: SdkOss) -> None:
        key = c.key("big")
        c.bucket.delete_object(key)   # a fresh object every round, as the mounts unlink first
        dt = self.timed(c, "seqwrite", lambda: c.bucket.put_object_from_file(key, self.src))
        self.record(c, "seqwrite", self.size / dt / 1e6)
        log(f"  {c.name:14s} seq write {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")

    def sdk_seqread(self, c: SdkOss) -> None:
        got = {}

        def go():
            r = c.bucket.get_object(c.key("big"))
            n = 0
            while b := r.read(MiB):
                n += len(b)
            got["n"] = n
        drop_caches()   # the server's page cache, as for the mounts' cold reads
        dt = self.timed(c, "seqread", go)
        if got["n"] != self.size:
            self.problems.append(f"{c.name}: get_object returned {got['n']} bytes, expected {self.size}")
        self.record(c, "seqread", self.size / dt / 1e6)
        log(f"  {c.name:14s} cold read {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")

    def sdk_randread(self, c: SdkOss) -> None:
        n, bs = self.args.reads, 4096
        offs = rand_offsets(self.size, n, bs)
        key = c.key("big")
        bufs = []
        drop_caches()
        dt = self.timed(c, "randread", lambda: bufs.extend(
            c.bucket.get_object(key, byte_range=(o, o + bs - 1)).read() for o in offs))
        self.check_reads(c, offs, bs, bufs)
        self.record(c, "randread", n / dt)
        log(f"  {c.name:14s} random 4K {n / dt:8.1f} reads/s ({dt:.2f}s)")

    def sdk_small(self, c: SdkOss) -> None:
        import oss2
        n, size = self.args.files, self.args.file_kib * 1024
        keys = [c.key(f"small/f{i:05d}") for i in range(n)]

        def create():
            rng = random.Random(7)   # the contents CREATE_PROG writes
            for k in keys:
                c.bucket.put_object(k, rng.randbytes(size))
        t_create = self.timed(c, "small-create", create)  # in the bucket once put_object returns
        listed = []

        def ls_l():
            # names from the listing, then a HEAD each for the mtime and size ls -l shows
            for o in oss2.ObjectIterator(c.bucket, prefix=c.key("small/")):
                c.bucket.head_object(o.key)
                listed.append(o.key)
        drop_caches()   # cold, as the mounts' ls -l after a remount
        t_ls = self.timed(c, "small-ls", ls_l)
        if len(listed) != n:
            self.problems.append(f"{c.name}: {len(listed)} small objects listed, expected {n}")
        got = []
        t_cat = self.timed(c, "small-cat", lambda: got.extend(
            len(c.bucket.get_object(k).read()) for k in keys))
        if sum(got) != n * size:
            self.problems.append(f"{c.name}: read back {sum(got)} bytes, expected {n * size}")
        # one DELETE per object, as rm -r unlinks file by file
        t_rm = self.timed(c, "small-rm", lambda: [c.bucket.delete_object(k) for k in keys])
        left = c.keys("small/")
        if left:
            self.problems.append(f"{c.name}: {len(left)} small objects left after delete")
        self.record_small(c, n, t_create, t_create, t_ls, t_cat, t_rm)

    def sdk_tar(self, c: SdkOss, rnd: int) -> None:
        done = []

        def go():
            # reading the tarball is part of it, as for tar -xf; directories need no object
            with tarfile.open(self.tar) as tf:
                for m in tf:
                    if m.isreg():
                        c.bucket.put_object(c.key(f"tree{rnd}/{m.name}"), tf.extractfile(m).read())
                        done.append(m.name)
        dt = self.timed(c, "tar", go)
        if len(done) != self.tar_files:
            self.problems.append(f"{c.name}: put {len(done)} tar members, expected {self.tar_files}")
        self.record(c, "tar", dt)
        log(f"  {c.name:14s} tar -xf {dt:.2f}s ({self.tar_files / dt:.1f} files/s)")

    def workload(self, c: Candidate, wl: str, rnd: int) -> None:
        """Run workload wl on candidate c: the mount version (w_*), or the SDK's own (sdk_*)."""
        fn = getattr(self, ("sdk_" if isinstance(c, SdkOss) else "w_") + wl)
        if wl == "tar":
            fn(c, rnd)
        else:
            fn(c)

    # ---- main ----

    def run(self) -> None:
        a = self.args
        log(f"work dir {self.work}; big file {a.size_mib} MiB; {a.files} files of {a.file_kib} KiB;"
            f" {a.reads} random reads; rounds {a.rounds}")
        with open(self.src, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(MiB))
        dirs = [x for x in a.tar_dirs.split(",") if x]
        run(["tar", "-C", a.tar_from, "-cf", self.tar] + dirs)
        self.tar_files = sum(1 for x in run(["tar", "-tvf", self.tar]).stdout.splitlines()
                             if x.startswith("-"))
        self.tar_bytes = os.path.getsize(self.tar)
        run([OSSFUSE, "keygen", self.cmk])
        if {"ossfuse-oss", "sdk-oss"} & set(a.candidates):
            self.start_server()
        for name in a.candidates:
            c = CLASSES[name](self)
            self.cands.append(c)
            c.setup()
        threading.Thread(target=self.sampler, daemon=True).start()
        k = 0
        for rnd in range(a.rounds):
            for wl in a.workloads:
                order = self.cands[k % len(self.cands):] + self.cands[:k % len(self.cands)]
                if k % 2:
                    order = order[::-1]
                k += 1
                log(f"round {rnd + 1}/{a.rounds}, {wl}: " + " ".join(c.name for c in order))
                for c in order:
                    self.cur = (c, wl)
                    try:
                        self.workload(c, wl, rnd)
                    finally:
                        time.sleep(0.06)
                        self.cur = None
                        if c.mounted:
                            c.unmount()


def table(b: Bench) -> tuple[str, list[str]]:
    a = b.args
    names = [c.name for c in b.cands]
    med = {n: {m: statistics.median(v) for m, v in b.res.get(n, {}).items()} for n in names}
    rows = [  # metric, label, short label, higher is better
        ("seqwrite", "seq write MB/s (until in store)", "seq write", True),
        ("seqread", "cold seq read MB/s", "cold seq read", True),
        ("randread", "cold random 4K reads/s", "cold random 4K read", True),
        ("create", f"create {a.files}×{a.file_kib}K files/s", "create", True),
        ("create+flush", "create files/s, until in store", "create, until in store", True),
        ("ls-l", "ls -l s (cold, after remount)", "ls -l", False),
        ("cat", "read back (cat) files/s", "read back (cat)", True),
        ("rm", "rm -r files/s", "rm -r", True),
        ("tar", f"tar -xf s ({b.tar_files} files), until in store", "tar -xf", False),
    ]
    rows = [r for r in rows if any(r[0] in med[n] for n in names)]

    def fmt(v):
        return "—" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")

    out = ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for m, label, _, _ in rows:
        out.append(f"| {label} | " + " | ".join(fmt(med[n].get(m)) for n in names) + " |")
    hw = []
    for n in names:
        d = b.hwm.get(n, {})
        hw.append(f"{max(d.values()) / 1024:.0f}" if d else "—")
    if any(x != "—" for x in hw):
        out.append("| daemon peak RSS MiB (VmHWM, max) | " + " | ".join(hw) + " |")
    for ref in ("native", "rclone-crypt"):
        if ref not in names:
            continue
        out += ["", f"speed ratio vs {ref} (> 1: faster than {ref})", "",
                "| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for m, _, short, hib in rows:
            cells = []
            r = med[ref].get(m)
            for n in names:
                v = med[n].get(m)
                if v is None or not r:
                    cells.append("—")
                else:
                    cells.append(f"{(v / r) if hib else (r / v):.2f}")
            out.append(f"| {short} | " + " | ".join(cells) + " |")
    # issue-5 targets
    verdicts = []
    rc, gc = med.get("rclone-crypt", {}), med.get("gocryptfs", {})

    def check(what, cand, m, ref, factor, hib=True):
        v, r = med.get(cand, {}).get(m), ref.get(m)
        if v is None or r is None:
            return
        ratio = (v / r) if hib else (r / v)
        tag = ("met   " if ratio >= factor else "MISSED") if cand == "ossfuse-local" else "(info)"
        verdicts.append(f"- {tag} {what}: {ratio:.2f}× (target ≥ {factor}×)")
    # the targets are judged on the local store (rclone-crypt and gocryptfs also sit on a local
    # dir); ossfuse-oss is shown for information (its server shares the 2 cores)
    for cand in [n for n in names if n.startswith("ossfuse")]:
        check(f"{cand} cold seq read vs rclone-crypt", cand, "seqread", rc, 1.5)
        check(f"{cand} cold seq read vs gocryptfs", cand, "seqread", gc, 1.0)
        check(f"{cand} seq write vs rclone-crypt", cand, "seqwrite", rc, 1.0)
        for m in ("create", "create+flush", "cat", "rm"):
            check(f"{cand} small files {m} vs rclone-crypt", cand, m, rc, 1.0)
        check(f"{cand} ls -l vs rclone-crypt", cand, "ls-l", rc, 1.0, hib=False)
        d = b.hwm.get(cand, {})
        stream = max([d.get("seqwrite", 0), d.get("seqread", 0)])
        if stream:
            verdicts.append(f"- {'met   ' if stream <= 256 * 1024 else 'MISSED'} {cand} daemon RSS "
                            f"while streaming: {stream / 1024:.0f} MiB (target ≤ 256 MiB); "
                            + ", ".join(f"{k} {v / 1024:.0f}" for k, v in d.items()) + " MiB")
    # the mount over the server next to the raw CryptoBucket on the same server (for information)
    sdk = med.get("sdk-oss", {})
    for m, what in (("seqwrite", "seq write"), ("seqread", "cold seq read"),
                    ("create", "small files create"), ("cat", "small files cat")):
        check(f"ossfuse-oss {what} vs sdk-oss", "ossfuse-oss", m, sdk, 0.8)
    return "\n".join(out), verdicts


def machine() -> str:
    def ver(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return "n/a"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ossv = ver([OSSFUSE, "--version"])
    try:
        oss2v = importlib.metadata.version("oss2")
    except importlib.metadata.PackageNotFoundError:
        oss2v = "n/a"
    return (f"nproc {os.cpu_count()}, {mem:.1f} GiB RAM, kernel {platform.release()}, "
            f"Python {platform.python_version()}; {ver(['rclone', 'version'])}; "
            f"{ver(['gocryptfs', '-version'])}; ossfuse {ossv}; oss2 {oss2v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/8 sizes: 128 MiB, 250 files, 250 reads")
    ap.add_argument("--size-mib", type=int, default=None, help="big file, MiB (default 1024)")
    ap.add_argument("--files", type=int, default=None, help="small files (default 2000)")
    ap.add_argument("--file-kib", type=int, default=4, help="small file size, KiB (default 4)")
    ap.add_argument("--reads", type=int, default=None, help="random 4 KiB reads (default 2000)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the median is reported (default 1)")
    ap.add_argument("--tar-from", default=f"/usr/lib/python3.{sys.version_info[1]}")
    ap.add_argument("--tar-dirs", default="json,email,xml,logging,asyncio")
    ap.add_argument("--candidates", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {','.join(WORKLOADS)}")
    ap.add_argument("--rclone-write-back", default="0s",
                    help="rclone --vfs-write-back (default 0s: upload right after close)")
    ap.add_argument("--workdir", default=None, help="parent of the work dir (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, stores)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the ossfuse daemons during each timed step (separate run)")
    ap.add_argument("--profile-dir", default="/tmp/ossfuse-peers-profile")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="append a dated section here ('' to skip)")
    args = ap.parse_args()
    div = 8 if args.quick else 1
    args.size_mib = args.size_mib or 1024 // div
    args.files = args.files or 2000 // div
    args.reads = args.reads or 2000 // div
    args.candidates = [x for x in args.candidates.split(",") if x]
    args.workloads = [x for x in args.workloads.split(",") if x]
    bad = [x for x in args.candidates if x not in CLASSES] + [x for x in args.workloads if x not in WORKLOADS]
    if bad:
        ap.error(f"unknown: {bad}")
    if "seqwrite" not in args.workloads and ({"seqread", "randread"} & set(args.workloads)):
        ap.error("seqread/randread need seqwrite (it writes the big file)")
    if os.geteuid() != 0:
        print("run as root (drop_caches, FUSE)", file=sys.stderr)
        return 2

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    mach = machine()
    log(mach)
    b = Bench(args)
    t0 = time.monotonic()
    try:
        b.run()
    finally:
        b.cleanup()
    wall = time.monotonic() - t0
    tab, verdicts = table(b)
    text = (f"big file {args.size_mib} MiB, {args.files} files × {args.file_kib} KiB, "
            f"{args.reads} random 4 KiB reads, tarball {b.tar_files} files / "
            f"{b.tar_bytes / 1e6:.1f} MB ({args.tar_dirs} of {args.tar_from}); {args.rounds} round(s)"
            f"{' (median)' if args.rounds > 1 else ''}; MB/s = 10^6 B/s; wall {wall / 60:.1f} min"
            f"{'; PROFILED (py-spy attached)' if args.profile else ''}\n\n{tab}")
    if verdicts:
        text += "\n\nissue-5 targets:\n" + "\n".join(verdicts)
    text += "\n\ncheck: " + ("ok (random reads match the source; listings complete; rm left nothing)"
                             if not b.problems else "PROBLEMS: " + "; ".join(b.problems))
    if b.profiles:
        text += "\npy-spy profiles: " + args.profile_dir
    print(f"machine: {mach}\n\n{text}")
    if args.results:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
        section = [f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — peers (bench/peers.py)",
                   "", f"- machine: {mach}", f"- command: `{cmd}`",
                   "- rclone: `rclone mount` of a crypt remote over a local dir, "
                   f"`--vfs-cache-mode writes --vfs-write-back {args.rclone_write_back}`; "
                   "write/tar/create timed until `vfs/stats` shows no upload and the unmount "
                   "returned. gocryptfs/native: `dd conv=fsync`, `sync -f`. ossfuse: until "
                   "`ossfuse umount` returns. sdk-oss: `oss2.CryptoBucket` calls, one at a time, "
                   "until each returns.", "", text, ""]
        with open(args.results, "a") as f:
            f.write("\n".join(section) + "\n")
    return 0 if not b.problems else 1


if __name__ == "__main__":
    sys.exit(main())
