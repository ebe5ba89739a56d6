#!/usr/bin/env python3
"""Client CPU and wall time per HeadObject through ``OssStore.head`` (or, ``--op put``, per
PutObject of a 4 KiB file through ``OssStore.put_file``, as the write-back uploads a small
file), without FUSE.

Starts ``tests/oss_server.py`` as its own process (so its CPU is not counted), writes N objects
with the user metadata a file written through the mount carries (envelope headers with a
base64 RSA-3072 wrapped key, mode/uid/gid/mtime/ctime), then HEADs all of them from this process
``--parallel`` at a time (trio tasks, as ``fs/readdir.py`` does) and reports, per round, wall
seconds and this process's CPU (user+sys, all threads) per HEAD in ms. ``ls -l`` of N files over
OSS costs ~N HEADs; on 2 cores with the server beside it, that CPU is what bounds it.
``--op put`` PUTs N such files instead, ``--parallel`` at a time (``cp -r`` of small files:
a PUT per file once written back).

    .venv/bin/python bench/head_cost.py [--n 2000] [--parallel 16] [--rounds 3] [--signature v4] [--batch 256]
    PYTHONPATH=/tmp/base .venv/bin/python bench/head_cost.py    # another checkout's ossfuse
    .venv/bin/python bench/head_cost.py --profile /tmp/heads.txt  # + py-spy (raw, threads)
    .venv/bin/python bench/head_cost.py --op put --n 1000           # PUT of small files

The ``--profile`` file reads with ``bench/pyspy_summary.py``.
"""
from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AK, BUCKET, REGION, SK, OssServerProcess, pyspy_start, pyspy_stop  # noqa: E402
from common import self_cpu as cpu  # noqa: E402


def file_meta(i: int) -> dict[str, str]:
    """x-oss-meta-* of a 4 KiB file written through the mount (shapes of ossfuse.envelope)."""
    return {
        "x-oss-meta-client-side-encryption-key": base64.b64encode(os.urandom(384)).decode(),
        "x-oss-meta-client-side-encryption-start": base64.b64encode(os.urandom(384)).decode(),
        "x-oss-meta-client-side-encryption-cek-alg": "AES/CTR/NoPadding",
        "x-oss-meta-client-side-encryption-wrap-alg": "RSA/NONE/PKCS1Padding",
        "x-oss-meta-client-side-encryption-matdesc": '{"ossfuse-cmk":"main"}',
        "x-oss-meta-client-side-encryption-unencrypted-content-length": "4096",
        "x-oss-meta-mode": "33188", "x-oss-meta-uid": "0", "x-oss-meta-gid": "0",
        "x-oss-meta-mtime": f"17000000{i:02d}.123456789", "x-oss-meta-ctime": f"17000000{i:02d}.123456789",
    }


async def heads(store, keys: list[str], parallel: int, batch: int) -> None:
    if batch:  # as fs/readdir.py asks since head_many: a batch of keys at a time
        for i in range(0, len(keys), batch):
            infos = await store.head_many(keys[i:i + batch], parallel)
            assert all(info is not None and info.size == 4096 for info in infos)
        return
    sem = trio.Semaphore(parallel)

    async def one(k: str) -> None:
        async with sem:
            info = await store.head(k)
            assert info is not None and info.size == 4096, (k, info)

    async with trio.open_nursery() as n:
        for k in keys:
            n.start_soon(one, k)


async def puts(store, keys: list[str], parallel: int, path: str) -> None:
    """PUT the 4 KiB file at ``path`` to every key, ``parallel`` at a time (``put_file``, as
    the write-back uploads a sealed staged file)."""
    sem = trio.Semaphore(parallel)

    async def one(i: int, k: str) -> None:
        async with sem:
            info = await store.put_file(k, path, file_meta(i % 100))
            assert info.size == 4096 and info.etag, (k, info)

    async with trio.open_nursery() as n:
        for i, k in enumerate(keys):
            n.start_soon(one, i, k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("head", "put"), default="head")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--threads", type=int, default=32, help="OssStore threads (limiter, pool)")
    ap.add_argument("--batch", type=int, default=0,
                    help="HEAD through store.head_many, this many keys per call (readdir: 256); 0: a head() per key")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--signature", default="v4")
    ap.add_argument("--profile", default=None, help="write a py-spy raw profile of the HEAD rounds here")
    args = ap.parse_args()

    import oss2
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    srv = OssServerProcess()
    spy = src = None
    try:
        b = oss2.Bucket(oss2.Auth(AK, SK), srv.endpoint, BUCKET)
        keys = [f"d/f{i:05d}" for i in range(args.n)]
        body = os.urandom(4096)
        import concurrent.futures as cf
        if args.op == "head":
            with cf.ThreadPoolExecutor(16) as ex:
                list(ex.map(lambda ik: b.put_object(ik[1], body, headers=file_meta(ik[0] % 100)), enumerate(keys)))
        fd, src = tempfile.mkstemp(prefix="put-cost-")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        store = OssStore(BUCKET, srv.endpoint, region=REGION, signature=args.signature,
                         credentials=StaticCredentialsProvider(AK, SK), threads=args.threads)
        if args.profile:
            spy = pyspy_start(args.profile)
        walls, cpus = [], []
        op = args.op.upper()
        for r in range(args.rounds):
            c0, t0 = cpu(), time.monotonic()
            if args.op == "head":
                trio.run(heads, store, keys, args.parallel, args.batch)
            else:
                trio.run(puts, store, keys, args.parallel, src)
            wall, used = time.monotonic() - t0, cpu() - c0
            walls.append(wall)
            cpus.append(used)
            print(f"round {r + 1}: {args.n} {op}s in {wall:.2f} s ({args.n / wall:.0f}/s), "
                  f"client CPU {used * 1000 / args.n:.3f} ms per {op}", flush=True)
        print(f"median: {statistics.median(walls):.2f} s, client CPU "
              f"{statistics.median(cpus) * 1000 / args.n:.3f} ms per {op} (parallel {args.parallel}, "
              f"threads {args.threads}, batch {args.batch or 'none'}, {args.signature})")
        trio.run(store.aclose)
    finally:
        pyspy_stop(spy)
        srv.stop()
        if src is not None and os.path.exists(src):
            os.unlink(src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
