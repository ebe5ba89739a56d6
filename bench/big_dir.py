#!/usr/bin/env python3
"""A directory of N entries (default 100,000) through the mount: time and daemon memory.

Fills a local-directory bucket with N small objects under ``big/`` by writing the store's
SQLite index directly (a bench shortcut: N PUTs with an fsync each would take minutes and
measure nothing of interest here), mounts it, and times what file managers do:
``ls -f`` (names only), ``ls -l`` (every attribute), a second ``ls -l`` (kernel and daemon
caches warm), ``find`` and ``du``. Reports seconds and the daemon's peak RSS (VmHWM).

    .venv/bin/python bench/big_dir.py [--n 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OSSFUSE = [sys.executable, "-m", "ossfuse"]


def fill(bucket: str, n: int) -> None:
    from ossfuse.store.local import LocalStore
    store = LocalStore(bucket)  # creates the layout and the index
    blob = uuid.uuid4().hex
    os.makedirs(os.path.join(store.root, "blobs", blob[:2]), exist_ok=True)
    open(os.path.join(store.root, "blobs", blob[:2], blob), "wb").close()
    meta = json.dumps({"mode": "33188", "uid": "0", "gid": "0", "mtime": "1700000000.123456789"})
    db = sqlite3.connect(os.path.join(bucket, "index.sqlite"))
    db.execute("PRAGMA synchronous=OFF")
    now = time.time()
    db.executemany("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                   ((f"big/file{i:07d}", 0, uuid.uuid4().hex.upper(), now, meta, blob) for i in range(n)))
    db.commit()
    db.close()


def timed(cmd: str) -> tuple[float, str]:
    t = time.monotonic()
    out = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout
    return time.monotonic() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ossfuse-bigdir-")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    try:
        subprocess.run(OSSFUSE + ["keygen", os.path.join(work, "k.pem")], check=True, capture_output=True)
        with open(os.path.join(work, "c.toml"), "w") as f:
            f.write(f'[store]\nurl = "local://{work}/bucket"\n[encryption]\nencrypt_with = "k"\n'
                    f'[[encryption.cmk]]\nid = "k"\ntype = "rsa"\nprivate_key = "{work}/k.pem"\n'
                    f'[cache]\ndir = "{work}/cache"\n')
        t = time.monotonic()
        fill(os.path.join(work, "bucket"), args.n)
        print(f"filled {args.n} objects in {time.monotonic() - t:.1f}s")
        subprocess.run(OSSFUSE + ["mount", "-c", os.path.join(work, "c.toml"), mnt], check=True)
        pid = json.load(open(subprocess.run(
            [sys.executable, "-c", f"from ossfuse.daemon import registry_path; print(registry_path({mnt!r}))"],
            capture_output=True, text=True, check=True).stdout.strip()))["pid"]
        results = []
        for name, cmd, check in [
            ("ls -f (names)", f"ls -f {mnt}/big | wc -l", args.n + 2),
            ("ls -l (cold)", f"ls -l {mnt}/big | wc -l", args.n + 1),
            ("ls -l (warm)", f"ls -l {mnt}/big | wc -l", args.n + 1),
            ("find", f"find {mnt}/big | wc -l", args.n + 1),
            ("du -s", f"du -s {mnt}/big", None),
        ]:
            secs, out = timed(cmd)
            if check is not None:
                assert int(out.split()[0]) == check, (name, out)
            results.append((name, secs))
            print(f"{name:16s} {secs:7.2f}s")
        stamp = subprocess.run(["stat", "-c", "%y", f"{mnt}/big/file0000000"], capture_output=True, text=True).stdout
        assert stamp.startswith("2023-11-14 22:13:20.123456789"), stamp  # the mtime from x-oss-meta-mtime
        with open(f"/proc/{pid}/status") as f:
            hwm = next(l for l in f if l.startswith("VmHWM")).split()[1]
        print(f"daemon peak RSS  {int(hwm) // 1024} MiB")
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — directory of {args.n} entries (bench/big_dir.py)\n\n"
                    f"- machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, local store\n\n"
                    "| operation | seconds |\n|---|---:|\n" + "".join(f"| {n} | {s:.2f} |\n" for n, s in results)
                    + f"\ndaemon peak RSS (VmHWM): {int(hwm) // 1024} MiB; `stat` shows the stored mtime.\n")
        return 0
    finally:
        subprocess.run(OSSFUSE + ["umount", mnt], capture_output=True)
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
