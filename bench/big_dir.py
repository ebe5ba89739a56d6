#!/usr/bin/env python3
"""A directory of N entries (default 100,000) through the mount: time and daemon memory.

``--store local`` (default): fills a local-directory bucket with N small objects under ``big/``
by writing the store's SQLite index directly (a bench shortcut: N PUTs with an fsync each would
take minutes and measure nothing of interest here), mounts it, and times what file managers do:
``ls -f`` (names only), ``ls -l`` (every attribute), a second ``ls -l`` (kernel and daemon
caches warm), ``find`` and ``du``.

``--store oss``: the OSS test server (tests/oss_server.py, its own process, 1000 keys per
listing page); the N objects are PUT through the store API (OssStore, not the mount), then
``ls -f`` and ``find`` are timed cold (each on a fresh mount) with the server's request
counts, and ``stat`` of a few files (a HEAD each: their attributes are stored, not guessed).
``ls -l`` over OSS is one lookup per file in the kernel's order: ``--ls-l`` adds it.

Reports seconds and the daemon's peak RSS (VmHWM); appends a table to bench/RESULTS.md.

    .venv/bin/python bench/big_dir.py [--n 100000] [--store local|oss] [--ls-l]
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
    meta = json.dumps(META)
    db = sqlite3.connect(os.path.join(bucket, "index.sqlite"))
    db.execute("PRAGMA synchronous=OFF")
    now = time.time()
    db.executemany("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)",
                   ((f"big/file{i:07d}", 0, uuid.uuid4().hex.upper(), now, meta, blob) for i in range(n)))
    db.commit()
    db.close()


META = {"mode": "33188", "uid": "0", "gid": "0", "mtime": "1700000000.123456789"}
AK, SK, BUCKET, REGION = "bench-ak", "bench-sk-secret", "bench-bucket", "cn-hangzhou"


def fill_oss(endpoint: str, n: int) -> None:
    """N objects ``big/file0000000``… PUT through OssStore, 64 at a time (plaintext, with the
    attributes ossfs writes: the listing needs no envelope)."""
    import trio
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    async def run():
        store = OssStore(BUCKET, endpoint, region=REGION, signature="v4",
                         credentials=StaticCredentialsProvider(AK, SK), threads=32)
        limit = trio.CapacityLimiter(64)

        async def put(i):
            async with limit:
                await store.put_bytes(f"big/file{i:07d}", b"", META)
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(put, i)
        await store.aclose()
    trio.run(run)


def timed(cmd: str) -> tuple[float, str]:
    t = time.monotonic()
    proc = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)
    if proc.stderr:
        print(proc.stderr[-2000:], file=sys.stderr)
    return time.monotonic() - t, proc.stdout


def daemon_pid(mnt: str) -> int:
    return json.load(open(subprocess.run(
        [sys.executable, "-c", f"from ossfuse.daemon import registry_path; print(registry_path({mnt!r}))"],
        capture_output=True, text=True, check=True).stdout.strip()))["pid"]


def peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--store", choices=("local", "oss"), default="local")
    ap.add_argument("--ls-l", action="store_true", help="over OSS also time a cold ls -l")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ossfuse-bigdir-")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    server = None
    env = dict(os.environ)
    try:
        subprocess.run(OSSFUSE + ["keygen", os.path.join(work, "k.pem")], check=True, capture_output=True)
        t = time.monotonic()
        if args.store == "oss":
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from oss_remote import RemoteOssServer
            server = RemoteOssServer(access_key_id=AK, access_key_secret=SK, bucket=BUCKET, region=REGION,
                                     root_dir=os.path.join(work, "oss"))
            fill_oss(server.endpoint, args.n)
            store = (f'url = "oss://{BUCKET}"\nendpoint = "{server.endpoint}"\nregion = "{REGION}"\n'
                     'signature = "v4"')
            env.update(OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK)
        else:
            fill(os.path.join(work, "bucket"), args.n)
            store = f'url = "local://{work}/bucket"'
        print(f"filled {args.n} objects ({args.store}) in {time.monotonic() - t:.1f}s")
        with open(os.path.join(work, "c.toml"), "w") as f:
            f.write(f'[store]\n{store}\n[encryption]\nencrypt_with = "k"\n'
                    f'[[encryption.cmk]]\nid = "k"\ntype = "rsa"\nprivate_key = "{work}/k.pem"\n'
                    f'[cache]\ndir = "{work}/cache"\n')

        def mount() -> int:
            subprocess.run(OSSFUSE + ["mount", "-c", os.path.join(work, "c.toml"), mnt], check=True, env=env)
            return daemon_pid(mnt)

        def umount() -> None:
            subprocess.run(OSSFUSE + ["umount", mnt], capture_output=True, env=env)

        if args.store == "oss":
            steps = [("ls -f (names), cold", f"ls -f {mnt}/big | wc -l", args.n + 2, True),
                     ("find, cold", f"find {mnt}/big | wc -l", args.n + 1, True),
                     ("find, warm", f"find {mnt}/big | wc -l", args.n + 1, False),
                     ("stat of 20 files (HEADs)", "stat -c %s " + " ".join(f"{mnt}/big/file{i:07d}" for i in range(20))
                      + " | wc -l", 20, False)]
            if args.ls_l:
                steps.append(("ls -l, cold", f"ls -l {mnt}/big | wc -l", args.n + 1, True))
        else:
            steps = [("ls -f (names)", f"ls -f {mnt}/big | wc -l", args.n + 2, False),
                     ("ls -l (cold)", f"ls -l {mnt}/big | wc -l", args.n + 1, False),
                     ("ls -l (warm)", f"ls -l {mnt}/big | wc -l", args.n + 1, False),
                     ("find", f"find {mnt}/big | wc -l", args.n + 1, False),
                     ("du -s", f"du -s {mnt}/big", None, False)]
        results, rss = [], 0
        pid = mount()
        for name, cmd, check, cold in steps:
            if cold and results:  # a fresh daemon and kernel cache
                rss = max(rss, peak_rss_mib(pid))
                umount()
                pid = mount()
            if server is not None:
                server.clear_requests()
            secs, out = timed(cmd)
            if check is not None:
                assert int(out.split()[0]) == check, (name, out)
            counts = ""
            if server is not None:
                reqs = server.requests_for()
                heads = sum(1 for r in reqs if r.method == "HEAD")
                lists = sum(1 for r in reqs if r.method == "GET" and not r.key)
                counts = f"{heads} HEAD, {lists} LIST, {len(reqs)} requests"
            results.append((name, secs, counts))
            print(f"{name:22s} {secs:7.2f}s  {counts}")
        stamp = subprocess.run(["stat", "-c", "%y %A", f"{mnt}/big/file0000000"], capture_output=True, text=True).stdout
        assert stamp.startswith("2023-11-14 22:13:20.123456789") and "-rw-r--r--" in stamp, stamp  # x-oss-meta-*
        rss = max(rss, peak_rss_mib(pid))
        print(f"daemon peak RSS  {rss} MiB")
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            store_text = "OSS test server (tests/oss_server.py, objects PUT through OssStore)" if server else "local store"
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — directory of {args.n} entries (bench/big_dir.py"
                    f" --store {args.store})\n\n"
                    f"- machine: nproc {os.cpu_count()}, Python {sys.version.split()[0]}, {store_text}\n\n"
                    "| operation | seconds | requests |\n|---|---:|---|\n"
                    + "".join(f"| {n} | {s:.2f} | {c} |\n" for n, s, c in results)
                    + f"\ndaemon peak RSS (VmHWM): {rss} MiB; `stat` shows the stored mtime and mode.\n")
        return 0
    finally:
        subprocess.run(OSSFUSE + ["umount", mnt], capture_output=True, env=env)
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        if server is not None:
            server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
