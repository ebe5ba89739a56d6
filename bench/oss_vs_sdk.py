#!/usr/bin/env python3
"""Sequential write and cold-cache read of one large object: through an ossfuse mount next to the
raw oss2 SDK with client-side encryption (``oss2.CryptoBucket`` + ``RsaProvider``), in one run,
against the OSS-compatible test server (tests/oss_server.py) running as its own process.

    sudo .venv/bin/python bench/oss_vs_sdk.py [--size-mib 1024] [--rounds 3] [--profile]

Sides, alternated within each round (the order flips every round), median over the rounds:

write   mount        dd if=SRC of=MNT/file bs=1M; ossfuse umount   (umount returns once the
                     object is in the bucket, so both are timed)
        sdk-put      CryptoBucket.put_object_from_file(key, SRC)
        sdk-multi    oss2.resumable_upload(CryptoBucket, key, SRC, part_size=8 MiB, 4 threads)
read    mount        remount with an emptied cache dir (all but staging/), drop page cache,
                     dd if=MNT/file of=/dev/null bs=1M   (the mount itself is not timed)
        sdk-get      drop page cache, CryptoBucket.get_object(key) read in 1 MiB chunks
        sdk-rdl      drop page cache, oss2.resumable_download(CryptoBucket, 4 threads) to a file

Correctness is checked once: sha256 of the file read back through the mount (and of the mount's
object fetched by the SDK) equals the source. The daemons' peak RSS (VmHWM) is sampled.
MB/s are 10^6 bytes per second of plaintext.

Must run as root (drop_caches, FUSE). Everything is cleaned up on exit: unmount, server
stopped, work dir removed (unless --keep).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (AK, BUCKET, HERE, OSSFUSE, PYSPY, REGION, REPO, SK, MiB,  # noqa: E402
                    OssServerProcess, drop_caches, log, proc_cpu)

CHUNK = MiB




def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def proc_status(pid: int, field: str) -> int | None:
    """A kB field of /proc/PID/status (VmHWM, VmRSS), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def self_cpu() -> tuple[float, float]:
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime


class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size_mib * MiB
        self.work = tempfile.mkdtemp(prefix="ossfuse-bench-", dir=args.workdir)
        self.src = os.path.join(self.work, "src.bin")
        self.mnt = os.path.join(self.work, "mnt")
        self.cache = os.path.join(self.work, "cache")
        self.root = os.path.join(self.work, "bucket")
        self.cmk = os.path.join(self.work, "cmk.pem")
        self.config = os.path.join(self.work, "ossfuse.toml")
        self.logs = os.path.join(self.work, "logs")       # daemon logs saved across cache wipes
        for d in (self.mnt, self.root, self.logs):
            os.makedirs(d)
        self.server: OssServerProcess | None = None
        self.endpoint = ""
        self.pid: int | None = None          # current daemon
        self.mounted = False
        self.hwm: dict[str, int] = {}        # phase -> max VmHWM kB over that phase's daemons
        self._phase = "write"
        self._sampler_stop = threading.Event()
        self.problems: list[str] = []
        self.daemon_cpu: dict[int, float] = {}   # pid -> last sampled CPU seconds
        self.cpu: dict[str, list[tuple[float, float]]] = {}  # measure -> [(client s, server s)]
        self.profiles: list[str] = []

    # ---- processes -------------------------------------------------------------------------

    def start_server(self) -> None:
        self.server = OssServerProcess(self.root, os.path.join(self.logs, "server.log"))
        self.endpoint = self.server.endpoint
        log("server", self.endpoint, "pid", self.server.pid)

    def stop_server(self) -> None:
        if self.server:
            self.server.stop()
        self.server = None

    @property
    def env(self) -> dict:
        return dict(os.environ, OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK)

    def write_config(self) -> None:
        lines = [
            "[store]", f'url = "oss://{BUCKET}"', f'endpoint = "{self.endpoint}"',
            f'region = "{REGION}"', 'signature = "v4"',
            "[encryption]", 'encrypt_with = "main"',
            "[[encryption.cmk]]", 'id = "main"', 'type = "rsa"', f'private_key = "{self.cmk}"',
            "[cache]", f'dir = "{self.cache}"',
            "[mount]",
            f"multipart_threshold = {self.args.multipart_threshold_mib * MiB}",
            f"part_size = {self.args.part_size_mib * MiB}",
            f"part_workers = {self.args.threads}",
        ]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def mount(self) -> None:
        r = subprocess.run([OSSFUSE, "mount", "-c", self.config, self.mnt], capture_output=True,
                           text=True, timeout=120, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"ossfuse mount failed ({r.returncode}): {r.stderr.strip()}")
        self.mounted = True
        sys.path.insert(0, REPO)
        from ossfuse.daemon import read_registry
        reg = read_registry(self.mnt)
        self.pid = reg["pid"] if reg else None
        if self.pid is None:
            out = subprocess.run(["pgrep", "-f", f"ossfuse mount -f .*{self.mnt}"],
                                 capture_output=True, text=True).stdout.split()
            self.pid = int(out[0]) if out else None

    def umount(self) -> None:
        r = subprocess.run([OSSFUSE, "umount", self.mnt], capture_output=True, text=True,
                           timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"ossfuse umount failed ({r.returncode}): {r.stderr.strip()}")
        self.mounted = False
        self.pid = None

    def save_log(self, tag: str) -> None:
        p = os.path.join(self.cache, "ossfuse.log")
        if os.path.exists(p):
            shutil.copy(p, os.path.join(self.logs, f"ossfuse-{tag}.log"))

    def clear_cache(self) -> None:
        if not os.path.isdir(self.cache):
            return
        for name in os.listdir(self.cache):
            if name == "staging":
                continue
            p = os.path.join(self.cache, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)

    def _sample_rss(self) -> None:
        while not self._sampler_stop.wait(0.05):
            pid = self.pid
            if pid:
                c = proc_cpu(pid)
                if c is not None:
                    self.daemon_cpu[pid] = c
                v = proc_status(pid, "VmHWM")
                if v:
                    self.hwm[self._phase] = max(self.hwm.get(self._phase, 0), v)

    def cleanup(self) -> None:
        self._sampler_stop.set()
        if self.mounted or os.path.ismount(self.mnt):
            pid = self.pid
            try:
                r = subprocess.run([OSSFUSE, "umount", self.mnt], capture_output=True, text=True,
                                   timeout=600)
                ok = r.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok or os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
                if pid:
                    try:
                        os.kill(pid, signal.SIGTERM)
                        time.sleep(2)
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.mounted = False
        self.stop_server()
        if self.args.keep:
            log("kept work dir", self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- SDK -------------------------------------------------------------------------------

    def crypto_bucket(self):
        import oss2
        import oss2.crypto
        with open(self.cmk) as f:
            priv = f.read()
        with open(self.cmk + ".pub") as f:
            pub = f.read()
        provider = oss2.crypto.RsaProvider(key_pair={"private_key": priv, "public_key": pub})
        return oss2.CryptoBucket(oss2.Auth(AK, SK), self.endpoint, BUCKET, crypto_provider=provider)

    # ---- measurements ----------------------------------------------------------------------

    def measured(self, name: str, fn) -> float:
        """Run fn() -> seconds; record the CPU seconds it cost: client side (this process, its
        children such as dd, and the ossfuse daemons alive meanwhile) and the server."""
        base = dict(self.daemon_cpu)
        if self.pid:
            base[self.pid] = proc_cpu(self.pid) or 0.0
            self.daemon_cpu[self.pid] = base[self.pid]
        me0, ch0 = self_cpu()
        srv0 = proc_cpu(self.server.pid) or 0.0
        dt = fn()
        time.sleep(0.06)  # one more sampler tick
        me1, ch1 = self_cpu()
        srv1 = proc_cpu(self.server.pid) or 0.0
        daemons = sum(c - base.get(p, 0.0) for p, c in self.daemon_cpu.items())
        self.cpu.setdefault(name, []).append((me1 - me0 + ch1 - ch0 + daemons, srv1 - srv0))
        return dt

    def time_cmd(self, cmd: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t

    def mount_write(self, name: str, measure: str | None = None) -> float:
        """dd into the mount + umount; the mount itself happens before the clock starts."""
        self.mount()
        target = os.path.join(self.mnt, name)
        if os.path.exists(target):      # every round creates the file afresh (untimed)
            os.unlink(target)
        if measure:
            return self.measured(measure, lambda: self._dd_umount(name))
        return self._dd_umount(name)

    def _dd_umount(self, name: str) -> float:
        t = time.perf_counter()
        subprocess.run(["dd", f"if={self.src}", f"of={self.mnt}/{name}", "bs=1M"], check=True,
                       capture_output=True)
        t_dd = time.perf_counter() - t
        self.umount()
        dt = time.perf_counter() - t
        log(f"  mount write: dd {t_dd:.2f}s + umount {dt - t_dd:.2f}s")
        self.save_log("write")
        return dt

    def sdk_put(self, bucket, key: str) -> float:
        t = time.perf_counter()
        bucket.put_object_from_file(key, self.src)
        return time.perf_counter() - t

    def sdk_multi(self, bucket, key: str) -> float:
        import oss2
        store = oss2.ResumableStore(root=self.work, dir="resumable-up")
        t = time.perf_counter()
        oss2.resumable_upload(bucket, key, self.src, store=store,
                              multipart_threshold=self.args.multipart_threshold_mib * MiB,
                              part_size=self.args.part_size_mib * MiB, num_threads=self.args.threads)
        return time.perf_counter() - t

    def prepare_cold_mount(self) -> None:
        if self.mounted:
            self.umount()
        self.clear_cache()
        drop_caches()
        self.mount()

    def sdk_get(self, bucket, key: str) -> float:
        drop_caches()
        t = time.perf_counter()
        r = bucket.get_object(key)
        n = 0
        while True:
            b = r.read(CHUNK)
            if not b:
                break
            n += len(b)
        dt = time.perf_counter() - t
        if n != self.size:
            raise RuntimeError(f"sdk get_object returned {n} bytes, expected {self.size}")
        return dt

    def sdk_rdl(self, bucket, key: str) -> float:
        import oss2
        out = os.path.join(self.work, "download.bin")
        store = oss2.ResumableDownloadStore(root=self.work, dir="resumable-down")
        drop_caches()
        t = time.perf_counter()
        oss2.resumable_download(bucket, key, out, store=store,
                                multiget_threshold=self.args.multipart_threshold_mib * MiB,
                                part_size=self.args.part_size_mib * MiB,
                                num_threads=self.args.threads)
        dt = time.perf_counter() - t
        if os.path.getsize(out) != self.size:
            raise RuntimeError("resumable_download: wrong size")
        if not getattr(self, "_rdl_checked", False):
            self._rdl_checked = True
            if sha256_file(out) != self.src_sha:
                self.problems.append("resumable_download of the SDK object: sha256 mismatch")
        os.unlink(out)
        return dt

    # ---- profiling -------------------------------------------------------------------------

    def pyspy(self, tag: str, fn) -> float:
        """Run fn() (which mounts and then does work) while py-spy records the daemon."""
        out = os.path.join(self.args.profile_dir, f"ossfuse-{tag}")
        holder: dict = {}

        def start_when_mounted():
            while self.pid is None and not holder.get("stop"):
                time.sleep(0.02)
            if holder.get("stop"):
                return
            pid = self.pid
            for fmt, ext in (("raw", "txt"),):
                holder["proc"] = subprocess.Popen(
                    [PYSPY, "record", "--pid", str(pid), "--rate", "200", "--format", fmt,
                     "-o", f"{out}.{ext}", "--nonblocking", "--threads"],
                    stdout=subprocess.DEVNULL, stderr=open(f"{out}.pyspy.log", "w"))

        self.pid = None
        th = threading.Thread(target=start_when_mounted, daemon=True)
        th.start()
        try:
            return fn()
        finally:
            holder["stop"] = True
            th.join(5)
            p = holder.get("proc")
            if p:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                self.profiles.append(f"{out}.txt")

    # ---- main ------------------------------------------------------------------------------

    def run(self) -> dict:
        a = self.args
        log(f"work dir {self.work}; size {a.size_mib} MiB; rounds {a.rounds}")
        with open(self.src, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(MiB))
        self.src_sha = sha256_file(self.src)
        r = subprocess.run([OSSFUSE, "keygen", self.cmk], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"keygen failed: {r.stderr}")
        self.start_server()
        self.write_config()
        bucket = self.crypto_bucket()
        threading.Thread(target=self._sample_rss, daemon=True).start()

        res: dict[str, list[float]] = {k: [] for k in
                                       ("w_mount", "w_put", "w_multi", "r_mount", "r_get", "r_rdl")}
        name = "file.bin"
        for rnd in range(a.rounds):
            log(f"round {rnd + 1}/{a.rounds}: write")
            self._phase = "write"
            order = ["mount", "put", "multi"] if rnd % 2 == 0 else ["multi", "put", "mount"]
            for side in order:
                if side == "mount":
                    dt = self.mount_write(name, "w_mount")
                elif side == "put":
                    dt = self.measured("w_put", lambda: self.sdk_put(bucket, "sdk-put.bin"))
                else:
                    dt = self.measured("w_multi", lambda: self.sdk_multi(bucket, "sdk-multi.bin"))
                res["w_" + side].append(dt)
                log(f"  {side:6s} write {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")
            log(f"round {rnd + 1}/{a.rounds}: cold read")
            self._phase = "read"
            order = ["mount", "get", "rdl"] if rnd % 2 == 0 else ["rdl", "get", "mount"]
            for side in order:
                if side == "mount":
                    self.prepare_cold_mount()
                    dt = self.measured("r_mount", lambda: self.time_cmd(
                        ["dd", f"if={self.mnt}/{name}", "of=/dev/null", "bs=1M"]))
                    self.umount()
                    self.save_log("read")
                elif side == "get":
                    dt = self.measured("r_get", lambda: self.sdk_get(bucket, "sdk-multi.bin"))
                else:
                    dt = self.measured("r_rdl", lambda: self.sdk_rdl(bucket, "sdk-multi.bin"))
                res["r_" + side].append(dt)
                log(f"  {side:6s} read  {self.size / dt / 1e6:8.1f} MB/s ({dt:.2f}s)")

        # correctness, once: the mount reads back the source; the SDK reads the mount's object
        log("checking sha256")
        self.prepare_cold_mount()
        got = sha256_file(os.path.join(self.mnt, name))
        self.umount()
        if got != self.src_sha:
            self.problems.append(f"mount read-back sha256 {got} != source {self.src_sha}")
        h = hashlib.sha256()
        rr = bucket.get_object(name)
        while True:
            b = rr.read(CHUNK)
            if not b:
                break
            h.update(b)
        if h.hexdigest() != self.src_sha:
            self.problems.append("SDK CryptoBucket.get_object of the mount's object: sha256 mismatch")
        sha_ok = not self.problems

        if a.profile:
            os.makedirs(a.profile_dir, exist_ok=True)
            log("profiling the daemon with py-spy (write, then cold read)")
            self._phase = "profile"
            self.pyspy("write", lambda: self.mount_write("profiled.bin"))
            self.clear_cache()
            drop_caches()
            self.pyspy("read", lambda: (self.mount(), self.time_cmd(
                ["dd", f"if={self.mnt}/{name}", "of=/dev/null", "bs=1M"]))[1])
            self.umount()

        return {"times": res, "sha_ok": sha_ok, "cpu": self.cpu}


def summarize(size: int, res: dict[str, list[float]]) -> dict[str, float]:
    return {k: size / statistics.median(v) / 1e6 for k, v in res.items() if v}


def table(size_mib: int, rounds: int, mbps: dict[str, float], res: dict, cpu: dict) -> str:
    rows = [
        ("write", "dd + umount", "w_mount", "put_object_from_file", "w_put"),
        ("write", "dd + umount", "w_mount", "resumable_upload (multipart, 4 thr)", "w_multi"),
        ("cold read", "dd", "r_mount", "get_object, 1 MiB chunks", "r_get"),
        ("cold read", "dd", "r_mount", "resumable_download (4 thr)", "r_rdl"),
    ]
    out = [f"size {size_mib} MiB, median of {rounds} rounds, MB/s = 10^6 B/s",
           "",
           "| op | mount MB/s | SDK variant | SDK MB/s | mount / SDK |",
           "|---|---:|---|---:|---:|"]
    for op, _, mk, desc, sk in rows:
        out.append(f"| {op} | {mbps[mk]:.1f} | {desc} | {mbps[sk]:.1f} | {mbps[mk] / mbps[sk]:.2f} |")
    out.append("")
    out.append("CPU seconds per GiB (median over rounds; client = ossfuse daemon + dd + CLI, or the"
               " SDK process; server = tests/oss_server.py), 2 cores are shared by all:")
    out.append("")
    out.append("| measure | MB/s | client CPU s/GiB | server CPU s/GiB |")
    out.append("|---|---:|---:|---:|")
    labels = {"w_mount": "write mount (dd + umount)", "w_put": "write SDK put_object_from_file",
              "w_multi": "write SDK resumable_upload", "r_mount": "cold read mount (dd)",
              "r_get": "cold read SDK get_object", "r_rdl": "cold read SDK resumable_download"}
    gib = size_mib / 1024
    for k, label in labels.items():
        if cpu.get(k):
            c = statistics.median(x[0] for x in cpu[k]) / gib
            sv = statistics.median(x[1] for x in cpu[k]) / gib
            out.append(f"| {label} | {mbps[k]:.1f} | {c:.2f} | {sv:.2f} |")
    out.append("")
    out.append("per-round seconds: " + ", ".join(
        f"{k}=[{' '.join(f'{x:.2f}' for x in v)}]" for k, v in res.items()))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="object size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    ap.add_argument("--threads", type=int, default=4,
                    help="SDK num_threads and the mount's part_workers (default 4)")
    ap.add_argument("--part-size-mib", type=int, default=8, help="multipart part size, both sides")
    ap.add_argument("--multipart-threshold-mib", type=int, default=32,
                    help="multipart threshold, both sides (default 32 = the mount's default)")
    ap.add_argument("--workdir", default=None, help="parent of the temporary work dir (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, bucket)")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, record the daemon with py-spy during one write and one cold read")
    ap.add_argument("--profile-dir", default="/tmp/ossfuse-bench-profile")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                    help="append a dated section here ('' to skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (drop_caches, FUSE)", file=sys.stderr)
        return 2

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    b = Bench(args)
    try:
        out = b.run()
    finally:
        b.cleanup()
    size = args.size_mib * MiB
    mbps = summarize(size, out["times"])
    text = table(args.size_mib, args.rounds, mbps, out["times"], out["cpu"])
    hwm = ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in b.hwm.items())
    text += f"\n\ndaemon peak RSS (VmHWM): {hwm or 'n/a'}"
    text += f"\nsha256 check (mount read-back == source; SDK reads the mount's object): " \
            f"{'ok' if out['sha_ok'] else 'FAILED: ' + '; '.join(b.problems)}"
    if b.problems and out["sha_ok"]:
        text += "\nproblems: " + "; ".join(b.problems)
    if b.profiles:
        text += "\npy-spy profiles (raw collapsed stacks): " + ", ".join(b.profiles)
    print(text)

    if args.results:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        section = [
            f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            "",
            f"- machine: nproc {os.cpu_count()}, {mem:.1f} GiB RAM, Python {platform.python_version()}, "
            f"{platform.platform()}",
            f"- command: `{cmd}`",
            "",
            text,
            "",
        ]
        new = not os.path.exists(args.results)
        with open(args.results, "a") as f:
            if new:
                f.write("# ossfuse vs oss2 CryptoBucket: sequential throughput\n\n"
                        "Appended by `bench/oss_vs_sdk.py` (see bench/README.md). One section per run;"
                        " the test server (tests/oss_server.py) runs on the same machine, so absolute"
                        " numbers are CPU-bound and only the ratios mean much.\n\n")
            f.write("\n".join(section) + "\n")
    return 0 if out["sha_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
