#!/usr/bin/env python3
"""Trees on the local store: ossfuse over its embedded local-directory bucket next to a plain
ext4 directory and ``rclone mount`` of a ``crypt`` remote (when rclone is installed), each
workload run on every candidate in turn (the order flips from one workload to the next).

    sudo .venv/bin/python bench/trees.py [--src DIR] [--doc /usr/share/doc] [--candidates ...]

Workloads (each timed as a user would see it: until the command returns; ossfuse and rclone
write back afterwards, so the bucket fills later):

1. tar xzf   ``tar xzf SRC.tgz -C MNT/tree``; SRC.tgz is a gzipped tarball of ``--src``
             (default: this venv's site-packages, ~8,000 entries), made once in /dev/shm.
2. rsync     ``rsync -a DOC/ MNT/doc/`` (default /usr/share/doc; rclone-crypt adds
             ``--no-links``: its mount refuses symlinks with EIO).
3. git clone ``git clone -q REPO MNT/repo``: REPO is a git repository of ``--git-src`` (default
             the ossfuse package directory plus tests) committed once in the work dir.
   (remount cold: ossfuse cache dir emptied but staging/, rclone cache emptied, drop_caches)
4. find      ``find MNT -type f`` (its output counted and compared between candidates).
5. ls -lR    ``ls -lR MNT > /dev/null``.
6. git status ``git -C MNT/repo status --porcelain`` (must print nothing).
7. rm -rf    ``rm -rf MNT/tree MNT/doc MNT/repo``.

``--rounds N`` repeats the whole sequence N times (order flipped each round) and reports medians.
Besides wall seconds, the table gives each FUSE daemon's CPU seconds per step (user + system of
all its threads, from /proc/PID/stat): steadier than wall time on a shared machine.

Must run as root (FUSE, drop_caches). Everything is unmounted and removed on any exit. The
table (seconds, and each candidate's time / ext4's) is printed and appended, dated, to
bench/RESULTS.md (``--results ''`` to skip). ``--profile`` records py-spy (raw, --threads) of the
ossfuse daemon per step into ``--profile-dir`` (see bench/pyspy_summary.py)."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HERE, OSSFUSE, PYSPY, REPO, drop_caches, log, proc_cpu  # noqa: E402
import peers  # noqa: E402
from peers import Native, OssfuseLocal, RcloneCrypt, machine, run  # noqa: E402

Native.name = "native"
STEPS = ["tar", "rsync", "clone", "find", "lsR", "gitstatus", "rm"]
LABEL = {"tar": "tar xzf", "rsync": "rsync -a doc", "clone": "git clone", "find": "find -type f",
         "lsR": "ls -lR", "gitstatus": "git status", "rm": "rm -rf"}
COLD = {"find"}  # remount cold before this step


class Ext4(Native):
    name = "ext4"


class Trees:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="ossfuse-trees-", dir=args.workdir)
        self.shm = tempfile.mkdtemp(prefix="ossfuse-trees-", dir="/dev/shm")
        self.logs = os.path.join(self.work, "logs")
        self.cmk = os.path.join(self.work, "cmk.pem")
        os.makedirs(self.logs)
        self.tgz = os.path.join(self.shm, "src.tgz")
        self.repo = os.path.join(self.work, "repo-src")
        self.cands = []
        self.res: dict[str, dict[str, list[float]]] = {}  # candidate -> step -> seconds per round
        self.cpu: dict[str, dict[str, list[float]]] = {}  # the same, the FUSE daemon's CPU seconds
        self.outputs: dict[str, dict[str, str]] = {}
        self.problems: list[str] = []
        self.failed: list[str] = []  # steps a candidate cannot do (rclone: git clone)
        self.entries = 0

    def prepare(self) -> None:
        a = self.args
        run(["tar", "czf", self.tgz, "-C", os.path.dirname(a.src), os.path.basename(a.src)])
        self.entries = len(run(["tar", "tzf", self.tgz]).stdout.splitlines())
        shutil.copytree(a.git_src, self.repo, symlinks=True,
                        ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", ".pytest_cache"))
        env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
                   GIT_COMMITTER_EMAIL="b@b")
        run(["git", "init", "-q", self.repo])
        run(["git", "-C", self.repo, "add", "-A"], env=env)
        run(["git", "-C", self.repo, "commit", "-q", "-m", "bench"], env=env)
        self.repo_files = len(run(["git", "-C", self.repo, "ls-files"]).stdout.splitlines())
        run([self.args.ossfuse, "keygen", self.cmk])
        classes = {"ext4": Ext4, "ossfuse-local": OssfuseLocal, "rclone-crypt": RcloneCrypt}
        for name in a.candidates:
            c = classes[name](self)
            self.cands.append(c)
            c.setup()
            c.mount()

    def step(self, c, name: str) -> None:
        m = c.mnt
        cmds = {
            "tar": ["sh", "-c", f"mkdir {m}/tree && tar xzf {self.tgz} -C {m}/tree"],
            # rclone mount has no symlinks (1.60: EIO): it skips them, the others copy them
            "rsync": ["rsync", "-a"] + (["--no-links"] if c.name == "rclone-crypt" else [])
            + [self.args.doc.rstrip("/") + "/", f"{m}/doc/"],
            "clone": ["git", "clone", "-q", self.repo, f"{m}/repo"],
            "find": ["sh", "-c", f"find {m}/tree {m}/repo -type f | wc -l"],
            "lsR": ["sh", "-c", f"ls -lR {m} | wc -l"],
            "gitstatus": ["git", "-C", f"{m}/repo", "status", "--porcelain"],
            "rm": ["rm", "-rf", f"{m}/tree", f"{m}/doc", f"{m}/repo"],
        }
        if name in COLD and c.name != "ext4":
            c.cold_mount()
        elif name in COLD:
            drop_caches()
        prof = None
        if self.args.profile and isinstance(c, OssfuseLocal) and c.pid:
            os.makedirs(self.args.profile_dir, exist_ok=True)
            out = os.path.join(self.args.profile_dir, f"{name}.txt")
            prof = subprocess.Popen([PYSPY, "record", "--pid", str(c.pid), "--rate", "200", "--format",
                                     "raw", "-o", out, "--nonblocking", "--threads"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        pid = getattr(c, "pid", None)
        cpu0 = proc_cpu(pid)
        t = time.perf_counter()
        try:
            r = run(cmds[name])
        except RuntimeError as e:
            self.failed.append(f"{c.name} {LABEL[name]}: {str(e)[-160:]}")
            log(f"  {c.name:14s} {LABEL[name]:14s} FAILED")
            if name == "clone":  # untimed fallback so the later steps find a repo
                tmp = os.path.join(self.shm, "clone")
                run(["git", "clone", "-q", self.repo, tmp])
                shutil.rmtree(f"{m}/repo", ignore_errors=True)
                try:
                    run(["cp", "-r", tmp, f"{m}/repo"])
                except RuntimeError as e2:  # e.g. rclone: no symlinks; its later steps fail too
                    self.failed.append(f"{c.name} clone fallback: {str(e2)[-160:]}")
                shutil.rmtree(tmp)
            return
        finally:
            dt = time.perf_counter() - t
            if prof:
                prof.send_signal(signal.SIGINT)
                prof.wait(60)
        self.res.setdefault(c.name, {}).setdefault(name, []).append(dt)
        cpu1 = proc_cpu(pid)
        if cpu0 is not None and cpu1 is not None:
            self.cpu.setdefault(c.name, {}).setdefault(name, []).append(cpu1 - cpu0)
        out = r.stdout.strip()
        if name == "lsR":
            out = ""  # ls -lR prints mount-specific totals; only find's count must agree
        self.outputs.setdefault(name, {})[c.name] = out
        log(f"  {c.name:14s} {LABEL[name]:14s} {dt:8.2f} s  {out[:60]!r}")

    def run(self) -> None:
        self.prepare()
        for rnd in range(self.args.rounds):
            for i, name in enumerate(self.args.steps):
                order = self.cands if (i + rnd) % 2 == 0 else list(reversed(self.cands))
                for c in order:
                    self.step(c, name)
                # rclone skips symlinks (and so one file of find's count): only ossfuse must match ext4
                outs = {v for k, v in self.outputs[name].items() if k != "rclone-crypt"}
                if len(outs) > 1:
                    self.problems.append(f"{LABEL[name]}: outputs differ {self.outputs[name]}")
            for c in self.cands:
                left = os.listdir(c.mnt)
                if left:
                    self.problems.append(f"{c.name}: rm -rf left {left[:5]}")
                    for x in left:  # best effort, so that the next round can start
                        shutil.rmtree(os.path.join(c.mnt, x), ignore_errors=True)

    def cleanup(self) -> None:
        for c in self.cands:
            try:
                if c.mounted:
                    c.unmount()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                log("unmount", c.name, e)
            try:
                c.emergency_cleanup()
            except Exception as e:  # noqa: BLE001
                log("cleanup", c.name, e)
        if self.args.keep:
            log("kept", self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)

    def table(self) -> str:
        names = [c.name for c in self.cands]
        head = "| workload | " + " | ".join(f"{n} s" for n in names) + " | " + \
            " | ".join(f"{n}/ext4" for n in names if n != "ext4") + " |"
        rows = [head, "|---" * (1 + len(names) + len(names) - ("ext4" in names)) + "|"]
        med = {n: {s: statistics.median(v) for s, v in self.res.get(n, {}).items()} for n in names}
        for s in self.args.steps:
            secs = [med[n].get(s) for n in names]
            base = med.get("ext4", {}).get(s)
            ratios = [f"{med[n][s] / base:.1f}×" if base and s in med[n] else "-"
                      for n in names if n != "ext4"]
            rows.append(f"| {LABEL[s]} | " + " | ".join(f"{x:.2f}" if x is not None else "-" for x in secs)
                        + " | " + " | ".join(ratios) + " |")
        daemons = [n for n in names if self.cpu.get(n)]
        if daemons:  # CPU is steadier than wall time on a shared machine
            rows += ["", "FUSE daemon CPU seconds per step (user+system, all threads; median):", "",
                     "| workload | " + " | ".join(f"{n} CPU s" for n in daemons) + " |",
                     "|---" * (1 + len(daemons)) + "|"]
            for s in self.args.steps:
                rows.append(f"| {LABEL[s]} | " + " | ".join(
                    f"{statistics.median(self.cpu[n][s]):.2f}" if s in self.cpu[n] else "-" for n in daemons) + " |")
        return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None, help="tree to tar (default: this venv's site-packages)")
    ap.add_argument("--doc", default="/usr/share/doc", help="tree to rsync (default /usr/share/doc)")
    ap.add_argument("--git-src", default=REPO, help="tree committed into the repo that is cloned")
    ap.add_argument("--candidates", default=None,
                    help="comma list of ext4,ossfuse-local,rclone-crypt (default: those installed)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
    ap.add_argument("--rclone-write-back", default="0s")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every step this many times (the table gives medians)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-dir", default="/tmp/ossfuse-trees-profile")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--ossfuse", default=OSSFUSE,
                    help="the ossfuse command (e.g. a wrapper running another checkout, for a before/after)")
    args = ap.parse_args()
    peers.OSSFUSE = args.ossfuse
    if args.src is None:
        import sysconfig
        args.src = sysconfig.get_paths()["purelib"]
    args.src = os.path.abspath(args.src)
    if args.candidates is None:
        args.candidates = "ext4,ossfuse-local" + (",rclone-crypt" if shutil.which("rclone") else "")
    args.candidates = [x for x in args.candidates.split(",") if x]
    args.steps = [x for x in args.steps.split(",") if x]
    if os.geteuid() != 0:
        print("run as root (drop_caches, FUSE)", file=sys.stderr)
        return 2

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    mach = machine()
    b = Trees(args)
    t0 = time.monotonic()
    try:
        b.run()
    finally:
        b.cleanup()
    text = (f"tarball {b.entries} entries ({args.src}), rsync of {args.doc}, git repo of "
            f"{b.repo_files} files; ossfuse `{args.ossfuse}`; wall {(time.monotonic() - t0) / 60:.1f} min"
            f"{'; PROFILED' if args.profile else ''}\n\n{b.table()}\n\ncheck: "
            + ("".join(f"failed: {x}\n" for x in b.failed))
            + ("ok (find counts agree, git status clean, rm left nothing)" if not b.problems
               else "PROBLEMS: " + "; ".join(b.problems)))
    print(f"machine: {mach}\n\n{text}")
    if args.results:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
        with open(args.results, "a") as f:
            f.write("\n".join([f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — trees "
                               "(bench/trees.py)", "", f"- machine: {mach}", f"- command: `{cmd}`",
                               "", text, "", ""]))
    return 0 if not b.problems else 1


if __name__ == "__main__":
    sys.exit(main())
