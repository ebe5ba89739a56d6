#!/usr/bin/env python3
"""The cost of an editor's save as this mount sees it: create a temp file, write 4 KiB, close
(journaled), rename it over a file already in the bucket — N times over 5 files, through the
filesystem core (no kernel, no mount) over a local-directory bucket, with uploads held back as
over OSS (``upload_delay`` 3600 s; every 5 saves the uploads run, apart from the timing, so the
next saves replace committed files again). Reported: ms per save (the time the application
waits: create, write, close, rename). Run it from two checkouts to compare them.

    .venv/bin/python bench/editor_saves.py [--n 300] [--dir /var/tmp]

(Thirty-seventh session: such a rename recorded the replaced object's pending delete, two
fsyncs, before the journal named the new path; it records none now.)"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import local_filesystem  # noqa: E402
from ossfuse.fs import Filesystem  # noqa: E402

FILES = 5


async def _save(fs: Filesystem, name: str, data: bytes) -> None:
    _, h = await fs.create(fs.get(1), "." + name + ".tmp", 0o600, os.O_RDWR, 0, 0)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    await fs.rename(fs.get(1), "." + name + ".tmp", fs.get(1), name, 0)


async def measure(work: str, n: int) -> float:
    """Seconds per save, averaged over ``n`` saves, in directory ``work``."""
    fs, store = local_filesystem(work, 3600.0)
    for i in range(FILES):
        await _save(fs, f"f{i}", b"old")
    assert await fs.drain() == 0
    spent = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        await _save(fs, f"f{i % FILES}", os.urandom(4096))
        spent += time.perf_counter() - t0
        if i % FILES == FILES - 1:
            assert await fs.drain() == 0
    fs.close()
    await store.aclose()
    return spent / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="saves (default 300)")
    ap.add_argument("--dir", default=None, help="where the bucket and cache go (a disk, not tmpfs: fsyncs count)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        per = trio.run(measure, work, args.n)
    print(f"{args.n} saves: {per * 1000:.2f} ms per save (create, write 4 KiB, close, rename over a committed file)")


if __name__ == "__main__":
    main()
