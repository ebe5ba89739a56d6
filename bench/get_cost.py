#!/usr/bin/env python3
"""Client CPU per GetObject through ``OssStore.get_range``, without FUSE.

Starts ``tests/oss_server.py`` as its own process (its CPU is not counted), writes one
``--big-mib`` MiB object and ``--n`` objects of 4 KiB, then per round reads the big one in
``--chunk-mib`` MiB ranged GETs ``--parallel`` at a time (as the block cache's sequential
read-ahead does) and each small one whole (as ``cat`` of small files does), and reports wall
seconds and this process's CPU (user+sys, all threads): seconds per 256 MiB read, ms per
small GET. A cold sequential read and ``cat`` of many files over OSS are bound by that CPU.

    .venv/bin/python bench/get_cost.py [--big-mib 256] [--n 1000] [--rounds 3] [--signature v4]
    PYTHONPATH=/tmp/base .venv/bin/python bench/get_cost.py    # another checkout's ossfuse
    .venv/bin/python bench/get_cost.py --profile /tmp/gets.txt   # + py-spy (raw, threads, GIL)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AK, BUCKET, REGION, SK, MiB, OssServerProcess, pyspy_start, pyspy_stop  # noqa: E402
from common import self_cpu as cpu  # noqa: E402


async def read_big(store, size: int, chunk: int, parallel: int) -> None:
    sem = trio.Semaphore(parallel)

    async def one(lo: int) -> None:
        async with sem:
            data = await store.get_range("big", lo, min(size, lo + chunk))
            assert len(data) == min(size, lo + chunk) - lo

    async with trio.open_nursery() as n:
        for lo in range(0, size, chunk):
            n.start_soon(one, lo)


async def read_small(store, keys: list[str], parallel: int) -> None:
    sem = trio.Semaphore(parallel)

    async def one(k: str) -> None:
        async with sem:
            assert len(await store.get_range(k, 0, 4096)) == 4096

    async with trio.open_nursery() as n:
        for k in keys:
            n.start_soon(one, k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4, help="big-object GETs in flight")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--small-parallel", type=int, default=1, help="small GETs in flight (cat: one at a time)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--signature", default="v4")
    ap.add_argument("--profile", default=None, help="write a py-spy raw profile of the rounds here")
    args = ap.parse_args()

    import oss2
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore

    srv = OssServerProcess()
    spy = None
    try:
        b = oss2.Bucket(oss2.Auth(AK, SK), srv.endpoint, BUCKET)
        size = args.big_mib * MiB
        b.put_object("big", os.urandom(size))
        keys = [f"s/f{i:05d}" for i in range(args.n)]
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda k: b.put_object(k, os.urandom(4096)), keys))
        store = OssStore(BUCKET, srv.endpoint, region=REGION, signature=args.signature,
                         credentials=StaticCredentialsProvider(AK, SK), threads=32)
        if args.profile:
            spy = pyspy_start(args.profile)
        big, small = [], []
        for r in range(args.rounds):
            c0, t0 = cpu(), time.monotonic()
            trio.run(read_big, store, size, args.chunk_mib * MiB, args.parallel)
            c1, t1 = cpu(), time.monotonic()
            trio.run(read_small, store, keys, args.small_parallel)
            c2, t2 = cpu(), time.monotonic()
            big.append(c1 - c0)
            small.append(c2 - c1)
            print(f"round {r + 1}: {args.big_mib} MiB in {t1 - t0:.2f} s, client CPU {c1 - c0:.3f} s; "
                  f"{args.n} small GETs in {t2 - t1:.2f} s, client CPU {(c2 - c1) * 1000 / args.n:.3f} ms per GET",
                  flush=True)
        print(f"median client CPU: {statistics.median(big):.3f} s per {args.big_mib} MiB "
              f"({args.chunk_mib} MiB GETs, {args.parallel} at a time), "
              f"{statistics.median(small) * 1000 / args.n:.3f} ms per 4 KiB GET ({args.signature})")
        trio.run(store.aclose)
    finally:
        pyspy_stop(spy)
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
