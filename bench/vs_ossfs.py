#!/usr/bin/env python3
"""ossfuse next to Alibaba's ossfs 1.x over the OSS protocol, at 0 and 10 ms added round-trip time.

One command, one table. The OSS test server (``tests/oss_server.py``) runs in a network namespace
of its own (10.200.0.1); both FUSE daemons run with their network in a second one (10.200.0.2;
``nsenter --net``, so their mounts stay in this mount namespace); a veth pair joins the two and
nothing touches the machine's own network. This kernel has no ``sch_netem``: ``nfqdelay.c`` (next
to this script, built on first use) holds every packet arriving on either veth end in an NFQUEUE
for DELAY/2 ms (RTT += DELAY). Each client has its own bucket on the one server. Request counts
come from the server's own request log (its control socket), per step.

Each round runs each workload on both clients at every delay before the next workload (the
machine is shared and its load drifts); who goes first alternates. Times are medians over rounds.

Needs root, /dev/fuse, iptables, libnetfilter-queue-dev, fusermount3, and an ossfs 1.x binary
(build: ``apt-get install -y --no-install-recommends libfuse-dev build-essential autoconf automake
pkg-config libcurl4-openssl-dev libxml2-dev libssl-dev media-types libnetfilter-queue-dev
iptables``; ``tar xzf ossfs-1.91.10.tar.gz && ./autogen.sh && ./configure && make -j3``, outside
the repo). Usage::

    .venv/bin/python bench/vs_ossfs.py --ossfs /tmp/ossfs-1.91.10/src/ossfs
    .venv/bin/python bench/vs_ossfs.py --ossfs ... --rounds 3 --click-git /path/click.git
    .venv/bin/python bench/vs_ossfs.py --ossfs ... --ossfuse-tree /tmp/base   # another checkout

ossfuse runs as users run it: an ``ossfuse`` command of a plain (non-editable) virtualenv,
WORK/venv-ossfuse, whose path holds the tree measured and this checkout's ``.venv`` packages
(``.venv`` itself is editable, and its finder costs every start of Python ~9 ms that
``/usr/local/bin/ossfuse`` does not pay: the umount row measures start-up). ``--ossfuse-tree
DIR`` measures the ossfuse package found in DIR instead of this checkout's: a before/after
comparison without a second install. ``ossfuse umount`` runs outside the client's network
namespace, as ossfs's ``fusermount3 -u`` does (it needs no network). ``--workloads`` picks a subset of
write, read, create, small (ls -l, cat, rm -r of NSMALL files), ls2000, tar, clone (the last two
need ``--click-git``, a bare clone of pallets/click). The table goes to stdout and, dated with
the command, to bench/RESULTS.md (``--results ''`` to skip); raw rows to WORK/raw.csv.

On a virtual machine whose host backs guest memory only when the guest first touches it, the
page cache's first use of a page costs a fault on the host: on this project's 2-core VM the same
`dd` of 256 MiB into ossfuse took 0.36 s or 1.0 s (kernel time in ``copy_folio_from_iter_atomic``
67 %), depending on whether the staging file's pages had been touched before (bench/RESULTS.md,
thirty-fourth session). ``--pretouch-gib N`` writes N GiB once before the runs (most of free
memory; ~3 s per GiB there), and the writes of both clients then take the same time each round.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Client

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = os.path.join(REPO, ".venv", "bin", "python")
SERVER = os.path.join(REPO, "tests", "oss_server.py")
AK, SK, REGION = "test-ak", "test-sk", "cn-hangzhou"
BUCKET = {"ossfs": "bench-ossfs", "ossfuse": "bench-ossfuse"}
SRVIP, CLIP = "10.200.0.1", "10.200.0.2"
MiB = 1 << 20
sys.path.insert(0, HERE)
from common import drop_caches, proc_cpu  # noqa: E402


def say(*a) -> None:
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def sh(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r


def classify(rec) -> str:
    """A request record of the server → HEAD, GET, LIST, PUT, INIT, PART, COMPLETE, COPY, DELETE…"""
    m, q = rec.method, rec.query or {}
    if "uploads" in q:
        return "INIT" if m == "POST" else "LISTUPLOADS"
    if "partNumber" in q:
        return "PART"
    if m == "POST" and "uploadId" in q:
        return "COMPLETE"
    if m == "GET" and not rec.key:
        return "LIST"
    if m == "PUT" and "x-oss-copy-source" in (rec.headers or {}):
        return "COPY"
    return m


KINDS = ["HEAD", "GET", "LIST", "PUT", "COPY", "INIT", "PART", "COMPLETE", "POST", "DELETE"]


class Net:
    """Two network namespaces, a veth pair, optional delay (nfqdelay on both receiving ends)."""

    def __init__(self, work: str, ns: str, qnum: int):
        self.work, self.nss, self.nsc, self.qnum = work, ns + "s", ns + "c", qnum
        self.vs, self.vc = ns + "s0", ns + "c0"
        self.nfq: list[subprocess.Popen] = []
        self.delay = 0

    def up(self) -> None:
        self.down()
        for c in (f"ip netns add {self.nss}", f"ip netns add {self.nsc}",
                  f"ip link add {self.vc} netns {self.nsc} type veth peer name {self.vs} netns {self.nss}",
                  f"ip -n {self.nsc} addr add {CLIP}/30 dev {self.vc}", f"ip -n {self.nsc} link set {self.vc} up",
                  f"ip -n {self.nsc} link set lo up",
                  f"ip -n {self.nss} addr add {SRVIP}/30 dev {self.vs}", f"ip -n {self.nss} link set {self.vs} up",
                  f"ip -n {self.nss} link set lo up"):
            sh(c)

    def down(self) -> None:
        self.set_delay(0)
        for n in (self.nss, self.nsc):
            sh(f"ip netns del {n}", check=False)

    def set_delay(self, ms: int) -> None:
        """Total added round-trip time in ms, half on each receiving end."""
        for n in (self.nss, self.nsc):
            sh(f"ip netns exec {n} iptables -F INPUT", check=False)
        for p in self.nfq:
            p.terminate()
            p.wait()
        self.nfq = []
        self.delay = ms
        if not ms:
            return
        binary = os.path.join(self.work, "nfqdelay")
        src = os.path.join(HERE, "nfqdelay.c")
        if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(src):
            sh(["gcc", "-O2", "-o", binary, src, "-lnetfilter_queue", "-lnfnetlink"])
        errlog = open(os.path.join(self.work, "logs", "nfqdelay.log"), "ab")
        for ns, dev in ((self.nss, self.vs), (self.nsc, self.vc)):
            self.nfq.append(subprocess.Popen(["ip", "netns", "exec", ns, binary, str(self.qnum), str(ms * 500)],
                                             stderr=errlog))
            time.sleep(0.3)
            sh(f"ip netns exec {ns} iptables -A INPUT -i {dev} -j NFQUEUE --queue-num {self.qnum}")

    def client(self, cmd: list[str]) -> list[str]:
        """``cmd`` with the client namespace's network (same mount namespace)."""
        return ["nsenter", f"--net=/run/netns/{self.nsc}", *cmd]


class Server:
    def __init__(self, b: "Bench"):
        ctl = os.path.join(b.work, "control.sock")
        if os.path.exists(ctl):
            os.unlink(ctl)
        cmd = ["ip", "netns", "exec", b.net.nss, PY, SERVER, "--host", SRVIP, "--port", str(b.args.port),
               "--access-key-id", AK, "--access-key-secret", SK, "--region", REGION,
               "--bucket", BUCKET["ossfs"], "--bucket", BUCKET["ossfuse"],
               "--root-dir", os.path.join(b.work, "srv"), "--control", ctl]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                     stderr=open(os.path.join(b.work, "logs", "server.log"), "ab"))
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint.startswith("http"):
            raise RuntimeError("the OSS test server did not start (see logs/server.log)")
        for _ in range(250):
            try:
                self.conn = Client(ctl, family="AF_UNIX", authkey=b"ossfuse-test")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        else:
            raise RuntimeError("no control socket")

    def call(self, name: str, *a, **kw):
        self.conn.send((name, a, kw))
        status, value = self.conn.recv()
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


API = r'''
import sys, concurrent.futures as cf, oss2
ep, bucket, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
b = oss2.Bucket(oss2.Auth("test-ak", "test-sk"), ep, bucket)
if cmd == "fill":        # fill PREFIX N: N small objects written by the API (no metadata)
    prefix, n = sys.argv[4], int(sys.argv[5])
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: b.put_object("%sf%05d.txt" % (prefix, i), b"%d\n" % i * 20), range(n)))
elif cmd == "wipe":      # wipe KEEP_PREFIX: delete every other key
    keys = [o.key for o in oss2.ObjectIterator(b) if not o.key.startswith(sys.argv[4])]
    for i in range(0, len(keys), 1000):
        b.batch_delete_objects(keys[i:i + 1000])
    for u in oss2.MultipartUploadIterator(b):
        b.abort_multipart_upload(u.key, u.upload_id)
'''


def ossfuse_command(work: str, tree: str) -> str:
    """WORK/venv-ossfuse/bin/ossfuse, the command as a non-editable install makes it (the
    console script of /usr/local/bin/ossfuse): a virtualenv without pip whose ``.pth`` puts
    ``tree`` (the ossfuse package measured) and then this checkout's ``.venv`` packages (trio,
    pyfuse3, oss2, …) on its path. Not ``.venv``'s python: its editable install's finder is
    imported at every start (~9 ms, bench/RESULTS.md, twenty-fifth session)."""
    venv = os.path.join(work, "venv-ossfuse")
    python = os.path.join(venv, "bin", "python3")
    if not os.path.exists(python):
        sh([os.path.realpath(PY), "-m", "venv", "--without-pip", venv])
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    with open(os.path.join(sh([python, "-c", purelib]).stdout.strip(), "ossfuse-bench.pth"), "w") as f:
        f.write(f"{tree}\n{sh([PY, '-c', purelib]).stdout.strip()}\n")
    script = os.path.join(venv, "bin", "ossfuse")
    with open(script, "w") as f:
        f.write(f"#!{python}\nimport sys\nfrom ossfuse.cli import main\nif __name__ == '__main__':\n"
                f"    sys.exit(main())\n")
    os.chmod(script, 0o755)
    return script


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        for d in ("logs", "src", "cache-ossfuse", "mnt-ossfs", "mnt-ossfuse"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)
        os.chdir(self.work)
        self.ossfuse_bin = ossfuse_command(self.work, os.path.abspath(args.ossfuse_tree or REPO))
        self.net = Net(self.work, args.netns, args.qnum)
        self.server: Server | None = None
        self.ossfs_proc: subprocess.Popen | None = None
        self.rows: list[dict] = []
        self.problems: list[str] = []
        self.raw = os.path.join(self.work, "raw.csv")

    # -- clients ------------------------------------------------------------------------------
    def mnt(self, c: str) -> str:
        return os.path.join(self.work, f"mnt-{c}")

    def ossfuse_cmd(self, *a, net: bool = True) -> list[str]:
        cmd = [self.ossfuse_bin, *a]
        return self.net.client(cmd) if net else cmd

    def ossfuse_env(self) -> dict:
        return dict(os.environ, OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK)

    def mount(self, c: str) -> None:
        m = self.mnt(c)
        if c == "ossfs":
            self.ossfs_proc = subprocess.Popen(
                self.net.client([self.args.ossfs, BUCKET["ossfs"], m, "-f", "-o", f"url={self.endpoint}",
                                 "-o", "use_path_request_style", "-o", "sigv4", "-o", f"region={REGION}",
                                 "-o", f"passwd_file={self.work}/passwd-ossfs"]),
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "logs", "ossfs.log"), "ab"))
            for _ in range(100):
                if os.path.ismount(m):
                    return
                time.sleep(0.1)
            raise RuntimeError("ossfs did not mount")
        sh(self.ossfuse_cmd("mount", "-c", os.path.join(self.work, "ossfuse.toml"), m), env=self.ossfuse_env(),
           timeout=180)

    def umount(self, c: str) -> None:
        m = self.mnt(c)
        if c == "ossfs":  # syncfs of this mount, unmount, wait for the daemon to exit
            sh(["sync", "-f", m])
            sh(["fusermount3", "-u", m])
            try:
                self.ossfs_proc.wait(600)
            except subprocess.TimeoutExpired:
                self.problems.append("ossfs still running 600 s after its unmount")
                self.ossfs_proc.kill()
            self.ossfs_proc = None
            return
        sh(self.ossfuse_cmd("umount", m, "--timeout", "900", net=False), env=self.ossfuse_env())

    def cold(self, c: str, keep_keys: bool = False) -> None:
        """Make the next mount cold: empty the client's own cache, drop the page cache.
        ``keep_keys``: ossfuse keeps its data-key cache (``datakeys.sqlite``: the unwrapped data
        keys of files this machine wrote or read, sealed under the CMK) and its attribute cache
        (``attrs.sqlite``: what its HEADs read), as on the machine that wrote the files; without
        them the mount is as cold as on another machine."""
        if c == "ossfuse":
            d = os.path.join(self.work, "cache-ossfuse")
            for n in os.listdir(d):
                if keep_keys and n.startswith(("datakeys.sqlite", "attrs.sqlite")):
                    continue
                if n != "staging" and not n.endswith(".log"):
                    p = os.path.join(d, n)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        drop_caches()

    def api(self, bucket: str, *a) -> None:
        sh(self.net.client([PY, "-c", API, self.endpoint, bucket, *a]))

    # -- measurement --------------------------------------------------------------------------
    def client_pid(self, c: str) -> int | None:
        """The FUSE daemon's pid of client ``c`` while it is mounted (nsenter execs it)."""
        if c == "ossfs":
            return self.ossfs_proc.pid if self.ossfs_proc is not None else None
        sys.path.insert(0, self.args.ossfuse_tree or REPO)
        from ossfuse.registry import read_registry
        reg = read_registry(self.mnt(c))
        return int(reg["pid"]) if reg else None

    def step(self, d: int, r: int, c: str, name: str, fn) -> None:
        """Time ``fn()``, count the server's requests during it, and the CPU seconds
        (utime + stime) the client's daemon and the server spent meanwhile; keep a row."""
        prof = self.pyspy(d, r, c, name)
        self.server.call("clear_requests")
        pids = {"client_cpu": self.client_pid(c), "server_cpu": self.server.proc.pid}
        cpu0 = {k: proc_cpu(p) for k, p in pids.items()}
        t0 = time.monotonic()
        ok = True
        try:
            fn()
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            ok = False
            self.problems.append(f"{d} ms r{r} {c} {name}: {e}")
        secs = time.monotonic() - t0
        cpu = {k: proc_cpu(p) - cpu0[k] if cpu0[k] is not None and proc_cpu(p) is not None else ""
               for k, p in pids.items()}
        if prof is not None:
            if prof.poll() is None:
                prof.send_signal(signal.SIGINT)
            try:
                prof.wait(60)
            except subprocess.TimeoutExpired:
                prof.kill()
        time.sleep(0.2)
        reqs = self.server.call("requests_for")
        counts: dict[str, int] = {}
        for rec in reqs:
            k = classify(rec)
            counts[k] = counts.get(k, 0) + 1
        bd = " ".join(f"{k}:{counts[k]}" for k in KINDS + sorted(set(counts) - set(KINDS)) if counts.get(k))
        row = dict(delay_ms=d, round=r, client=c, workload=name, seconds=round(secs, 3), requests=len(reqs),
                   breakdown=bd, ok=int(ok), load1=open("/proc/loadavg").read().split()[0],
                   client_cpu=cpu["client_cpu"] if cpu["client_cpu"] == "" else round(cpu["client_cpu"], 3),
                   server_cpu=cpu["server_cpu"] if cpu["server_cpu"] == "" else round(cpu["server_cpu"], 3))
        self.rows.append(row)
        new = not os.path.exists(self.raw)
        with open(self.raw, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        say(f"{d} ms r{r} {c} {name} {secs:.2f} s, {len(reqs)} requests ({bd}), CPU s client {row['client_cpu']} "
            f"server {row['server_cpu']}{'' if ok else ' FAILED'}")

    def pyspy(self, d: int, r: int, c: str, name: str) -> subprocess.Popen | None:
        """With ``--profile DIR``: py-spy (raw collapsed stacks, --threads) records the ossfuse
        daemon during step ``name`` if ``--profile-steps`` lists it, into
        DIR/{name}-{d}ms-r{r}.txt (``bench/pyspy_summary.py`` summarizes it)."""
        a = self.args
        if not a.profile or c != "ossfuse" or name not in a.profile_steps.split(","):
            return None
        sys.path.insert(0, a.ossfuse_tree or REPO)
        from ossfuse.registry import read_registry
        reg = read_registry(self.mnt(c))
        if not reg:
            return None
        os.makedirs(a.profile, exist_ok=True)
        out = os.path.join(a.profile, f"{name}-{d}ms-r{r}.txt")
        prof = subprocess.Popen([os.path.join(os.path.dirname(PY), "py-spy"), "record", "--pid", str(reg["pid"]),
                                 "--rate", "200", "--format", "raw", "-o", out, "--nonblocking", "--threads",
                                 *(["--gil"] if a.profile_gil else [])],
                                stdout=subprocess.DEVNULL, stderr=open(out + ".log", "w"))
        time.sleep(1.0)  # let py-spy attach
        return prof

    def run_cmd(self, cmd: list[str], **kw):
        return lambda: sh(cmd, **kw)

    # -- workloads: each leaves its client unmounted --------------------------------------------
    def wl_write(self, d, r, c):
        m = self.mnt(c)
        self.mount(c)
        self.step(d, r, c, "write_op", self.run_cmd(["dd", f"if={self.work}/src/big", f"of={m}/big{d}", "bs=1M",
                                                      "status=none"]))
        self.step(d, r, c, "write_umount", lambda: self.umount(c))

    def wl_read(self, d, r, c):
        m = self.mnt(c)
        self.cold(c)
        self.mount(c)
        self.step(d, r, c, "read", self.run_cmd(["dd", f"if={m}/big{d}", "of=/dev/null", "bs=1M", "status=none"]))
        if sh(["cmp", "-s", f"{self.work}/src/big", f"{m}/big{d}"], check=False).returncode:
            self.problems.append(f"{c}: big{d} differs after read")
        self.step(d, r, c, "umount_idle", lambda: self.umount(c))  # nothing to upload

    def wl_create(self, d, r, c):
        m = self.mnt(c)
        self.mount(c)
        self.step(d, r, c, "create_op", self.run_cmd(["cp", "-r", f"{self.work}/src/small", f"{m}/small{d}"]))
        self.step(d, r, c, "create_umount", lambda: self.umount(c))

    def wl_small(self, d, r, c):
        m = self.mnt(c)
        self.cold(c)
        self.mount(c)
        self.step(d, r, c, "ls500", self.run_cmd(["ls", "-l", f"{m}/small{d}"]))
        self.step(d, r, c, "cat500", self.run_cmd(["sh", "-c", f'cat "{m}/small{d}"/* > /dev/null']))
        n = len(os.listdir(f"{m}/small{d}"))
        if n != self.args.nsmall:
            self.problems.append(f"{c}: small{d} has {n} files")
        # again from a cold mount, but on the machine that wrote (and now read) them: ossfuse's
        # data-key and attribute caches are kept (no RSA per file, no HEAD per listed file);
        # ossfs has nothing like them
        self.umount(c)
        self.cold(c, keep_keys=True)
        self.mount(c)
        self.step(d, r, c, "ls500k", self.run_cmd(["ls", "-l", f"{m}/small{d}"]))
        self.umount(c)
        self.cold(c, keep_keys=True)
        self.mount(c)
        self.step(d, r, c, "cat500k", self.run_cmd(["sh", "-c", f'cat "{m}/small{d}"/* > /dev/null']))
        self.step(d, r, c, "rm_op", self.run_cmd(["rm", "-r", f"{m}/small{d}"]))
        self.step(d, r, c, "rm_umount", lambda: self.umount(c))

    def wl_tar(self, d, r, c):
        m = self.mnt(c)
        self.mount(c)
        self.step(d, r, c, "tar_op", self.run_cmd(["sh", "-c", f'mkdir "{m}/tar{d}" && tar -xf '
                                                   f'"{self.work}/src/click.tar" -C "{m}/tar{d}"']))
        self.step(d, r, c, "tar_umount", lambda: self.umount(c))

    def wl_ls2000(self, d, r, c):
        m = self.mnt(c)
        self.cold(c)
        self.mount(c)
        self.step(d, r, c, "ls2000", self.run_cmd(["ls", "-l", f"{m}/list"]))
        self.umount(c)

    def wl_clone(self, d, r, c):
        m = self.mnt(c)
        self.mount(c)
        self.step(d, r, c, "clone_op", self.run_cmd(["git", "clone", "-q", self.args.click_git, f"{m}/click{d}"]))
        self.step(d, r, c, "clone_umount", lambda: self.umount(c))

    def wl_wipe(self, d, r, c):
        self.api(BUCKET[c], "wipe", "list/")
        self.cold(c)

    # -- setup and the whole run ----------------------------------------------------------------
    def prepare(self) -> None:
        a, src = self.args, os.path.join(self.work, "src")
        big = os.path.join(src, "big")
        if not os.path.exists(big) or os.path.getsize(big) != a.big_mib * MiB:
            with open(big, "wb") as f:
                for _ in range(a.big_mib):
                    f.write(os.urandom(MiB))
        small = os.path.join(src, "small")
        if not os.path.isdir(small) or len(os.listdir(small)) != a.nsmall:
            shutil.rmtree(small, ignore_errors=True)
            os.makedirs(small)
            for i in range(1, a.nsmall + 1):
                with open(os.path.join(small, f"f{i:05d}"), "wb") as f:
                    f.write(os.urandom(4096))
        if a.click_git and not os.path.exists(os.path.join(src, "click.tar")):
            tree = os.path.join(src, "clicktree")
            os.makedirs(tree, exist_ok=True)
            sh(["sh", "-c", f'git --git-dir="{a.click_git}" archive HEAD | tar -x -C "{tree}"'])
            sh(["tar", "-cf", os.path.join(src, "click.tar"), "-C", tree, "."])
        pw = os.path.join(self.work, "passwd-ossfs")
        with open(pw, "w") as f:
            f.write(f"{BUCKET['ossfs']}:{AK}:{SK}\n")
        os.chmod(pw, 0o600)
        cmk = os.path.join(self.work, "cmk.pem")
        if not os.path.exists(cmk):
            sh([PY, "-m", "ossfuse", "keygen", cmk], env=self.ossfuse_env())
        self.net.up()
        self.server = Server(self)
        self.endpoint = f"http://{SRVIP}:{self.server.endpoint.rsplit(':', 1)[1]}"
        with open(os.path.join(self.work, "ossfuse.toml"), "w") as f:
            f.write("\n".join([
                "[store]", f'url = "oss://{BUCKET["ossfuse"]}"', f'endpoint = "{self.endpoint}"',
                f'region = "{REGION}"', "[encryption]", 'encrypt_with = "main"',
                "[[encryption.cmk]]", 'id = "main"', 'type = "rsa"', f'private_key = "{cmk}"',
                "[cache]", f'dir = "{self.work}/cache-ossfuse"']) + "\n")
        for c in ("ossfs", "ossfuse"):
            self.api(BUCKET[c], "fill", "list/", str(a.nlist))

    def run(self) -> None:
        a = self.args
        self.prepare()
        workloads = a.workloads.split(",")
        for w, needs in (("read", "write"), ("small", "create")):  # each reads what the other wrote
            if w in workloads and needs not in workloads:
                workloads.insert(workloads.index(w), needs)
        workloads.append("wipe")
        for w in ("tar", "clone"):
            if w in workloads and not a.click_git:
                workloads.remove(w)
                say(f"skipping {w}: no --click-git")
        clients = ["ossfs", "ossfuse"]
        i = j = 0
        for r in range(1, a.rounds + 1):
            for w in workloads:
                delays = list(a.delays) if (r + i) % 2 else list(reversed(a.delays))
                i += 1
                for d in delays:
                    if d != self.net.delay:
                        self.net.set_delay(d)
                    order = clients if (r + j) % 2 else list(reversed(clients))
                    j += 1
                    for c in order:
                        try:
                            getattr(self, f"wl_{w}")(d, r, c)
                        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                            self.problems.append(f"{d} ms r{r} {c} {w}: {e}")
                            say(f"!! {d} ms r{r} {c} {w}: {e}")
                            if os.path.ismount(self.mnt(c)):
                                try:
                                    self.umount(c)
                                except (RuntimeError, OSError, subprocess.SubprocessError):
                                    sh(["fusermount3", "-uz", self.mnt(c)], check=False)
        self.net.set_delay(0)

    def cleanup(self) -> None:
        for c in ("ossfs", "ossfuse"):
            if os.path.ismount(self.mnt(c)):
                try:
                    self.umount(c)
                except Exception:  # noqa: BLE001 - best effort at exit
                    sh(["fusermount3", "-uz", self.mnt(c)], check=False)
        if self.ossfs_proc is not None and self.ossfs_proc.poll() is None:
            self.ossfs_proc.kill()
        if self.server is not None:
            self.server.stop()
        self.net.down()


LABELS = [  # label, steps summed per round
    ("write BIG MiB, until in bucket", ["write_op", "write_umount"]),
    ("cold seq read BIG MiB", ["read"]),
    ("umount, nothing to upload", ["umount_idle"]),
    ("cp -r N × 4 KiB, until in bucket", ["create_op", "create_umount"]),
    ("ls -l N files (cold mount)", ["ls500"]),
    ("cat N files", ["cat500"]),
    ("ls -l N files, cold mount, attributes kept", ["ls500k"]),
    ("cat N files, cold mount, data keys cached", ["cat500k"]),
    ("rm -r N files (the op)", ["rm_op"]),
    ("rm -r N files, until in bucket", ["rm_op", "rm_umount"]),
    ("tar -xf click, until in bucket", ["tar_op", "tar_umount"]),
    ("ls -l NLIST API objects (cold mount)", ["ls2000"]),
    ("git clone click, until in bucket", ["clone_op", "clone_umount"]),
]


def table(rows: list[dict], args) -> str:
    cell = {(int(r["delay_ms"]), int(r["round"]), r["client"], r["workload"]): r for r in rows}
    delays = sorted({int(r["delay_ms"]) for r in rows})
    rounds = sorted({int(r["round"]) for r in rows})

    def med(d, c, parts, field):
        vals = []
        for rd in rounds:
            got = [cell.get((d, rd, c, p)) for p in parts]
            if all(got):
                vals.append(sum(float(g[field]) for g in got))
        return statistics.median(vals) if vals else None

    def breakdown(d, c, parts):
        rd = rounds[len(rounds) // 2]
        def one(row):
            cpu = "" if row.get("client_cpu") in ("", None) else \
                f" (CPU s: daemon {float(row['client_cpu']):.2f}, server {float(row['server_cpu'] or 0):.2f})"
            return row["breakdown"] + cpu
        return " + ".join(one(cell[(d, rd, c, p)]) for p in parts if (d, rd, c, p) in cell)

    head = "| workload |" + "".join(f" ossfs {d} ms | ossfuse {d} ms | ossfuse/ossfs |" for d in delays)
    head += "".join(f" requests ossfs / ossfuse ({d} ms) |" for d in delays)
    sep = "|---|" + "---:|---:|---:|" * len(delays) + "---:|" * len(delays)
    out = [f"N = {args.nsmall}, big file {args.big_mib} MiB, median of {len(rounds)} round(s), seconds", "", head, sep]
    details = []
    for label, parts in LABELS:
        if not any((d, rd, c, p) in cell for d in delays for rd in rounds for c in ("ossfs", "ossfuse") for p in parts):
            continue
        label = label.replace("BIG", str(args.big_mib)).replace("NLIST", str(args.nlist))
        line = f"| {label} |"
        for d in delays:
            a, b = med(d, "ossfs", parts, "seconds"), med(d, "ossfuse", parts, "seconds")
            ratio = f"{b / a:.2f}" if a and b is not None else "–"
            line += f" {'–' if a is None else f'{a:.2f}'} | {'–' if b is None else f'{b:.2f}'} | {ratio} |"
        for d in delays:
            a, b = med(d, "ossfs", parts, "requests"), med(d, "ossfuse", parts, "requests")
            line += f" {'–' if a is None else int(a)} / {'–' if b is None else int(b)} |"
            details.append(f"- {label}, {d} ms: ossfs {breakdown(d, 'ossfs', parts) or '–'}; "
                           f"ossfuse {breakdown(d, 'ossfuse', parts) or '–'}")
        out.append(line)
    return "\n".join(out + ["", "Requests by kind (middle round):", ""] + details) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ossfs", required=True, help="the ossfs 1.x binary")
    ap.add_argument("--ossfuse-tree", default=None, help="run the ossfuse package of this source tree")
    ap.add_argument("--workdir", default="/tmp/ossfuse-vs-ossfs")
    ap.add_argument("--delays", default="0,10", help="added RTTs in ms, comma-separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--nsmall", type=int, default=500)
    ap.add_argument("--nlist", type=int, default=2000)
    ap.add_argument("--workloads", default="write,read,create,small,tar,ls2000,clone")
    ap.add_argument("--click-git", default=None, help="a bare git repository of pallets/click")
    ap.add_argument("--port", type=int, default=39480)
    ap.add_argument("--netns", default="ossvs")
    ap.add_argument("--qnum", type=int, default=7)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--note", default="", help="a line to put above the table in RESULTS.md")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="py-spy the ossfuse daemon during the --profile-steps steps into DIR (needs py-spy in the venv)")
    ap.add_argument("--profile-steps", default="cat500", help="comma-separated step names (raw.csv's workload column)")
    ap.add_argument("--pretouch-gib", type=int, default=0, metavar="N",
                    help="first write N GiB of memory once and free it (see the module doc: on a VM whose host "
                         "backs guest memory at first touch, the page cache's first use of a page costs a fault "
                         "on the host, and a run's writes take 1-3x as long depending on which pages they get)")
    ap.add_argument("--profile-gil", action="store_true",
                    help="sample only the thread holding the GIL (where the daemon's CPU goes, not its waits)")
    args = ap.parse_args()
    args.delays = [int(x) for x in args.delays.split(",")]
    if os.environ.get("OSSFUSE_VS_PRIVATE_NS") != "1":
        # A private mount namespace: a namespace another program creates while one of our FUSE
        # mounts exists would hold a copy of it, and its daemon would never exit.
        os.environ["OSSFUSE_VS_PRIVATE_NS"] = "1"
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable, *sys.argv])
    # the copies of other programs' FUSE mounts this namespace took would keep their daemons
    # alive after their owners unmount them (for as long as the bench runs): let them go here
    with open("/proc/self/mounts") as f:
        inherited = [line.split()[1] for line in f if line.split()[2].startswith("fuse")]
    for mp in inherited:
        subprocess.run(["umount", "-l", mp.replace("\\040", " ")], check=False, capture_output=True)
    # byte-compiled as an installed copy is (pip compiles at install): a shell with
    # PYTHONDONTWRITEBYTECODE would make every ossfuse command compile its modules again
    subprocess.run([PY, "-m", "compileall", "-q", os.path.join(args.ossfuse_tree or REPO, "ossfuse")], check=False)
    if os.path.exists(os.path.join(args.workdir, "raw.csv")):
        os.unlink(os.path.join(args.workdir, "raw.csv"))
    # the tree measured, and where the table goes, as they are now (the run changes directory,
    # and the checkout may move on while it runs)
    commit = sh(["git", "-C", args.ossfuse_tree or REPO, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    results = os.path.abspath(args.results) if args.results else ""
    if args.pretouch_gib:
        say(f"writing {args.pretouch_gib} GiB of memory once (--pretouch-gib)")
        sh([sys.executable, "-c", f"bytearray(b'\\1') * ({args.pretouch_gib} << 30)"])
    b = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        b.run()
    finally:
        b.cleanup()
    text = table(b.rows, args)
    if b.problems:
        text += "\nProblems:\n" + "".join(f"- {p}\n" for p in b.problems)
    print(text)
    if results:
        with open(results, "a") as f:
            f.write(f"\n## vs_ossfs.py — {time.strftime('%Y-%m-%d %H:%M')} UTC, ossfuse "
                    f"{commit or args.ossfuse_tree}, {os.cpu_count()} cores (shared)\n\n")
            if args.note:
                f.write(args.note + "\n\n")
            f.write("`" + " ".join(["bench/vs_ossfs.py"] + sys.argv[1:]) + "`\n\n" + text)
    return 1 if b.problems else 0


if __name__ == "__main__":
    sys.exit(main())
