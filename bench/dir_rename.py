#!/usr/bin/env python3
"""Seconds per directory rename of N small files on the local store, in-process (no kernel,
no FUSE): the cost of ``Namespace._move_dir`` itself, with its rename log
(``fs/renames.py``: a header, two appended lines per object, then removal). ``--files``: the
N files are renamed one by one instead (``Namespace._move_file``: a copy, a delete and the
same log for each), seconds per round of N renames.

    .venv/bin/python bench/dir_rename.py [--n 2000] [--rounds 6] [--files]
    PYTHONPATH=/tmp/base TESTS=/tmp/base/tests .venv/bin/python bench/dir_rename.py   # another checkout

Renames ``a`` to ``b`` and back ``--rounds`` times and prints the median and every round.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.environ.get("TESTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")))
from fakes.core import GID, UID, core_filesystem  # noqa: E402


async def run(n: int, rounds: int, work: str, cmk: str, files: bool) -> list[float]:
    fs = core_filesystem(work, cmk)
    d = await fs.mkdir(fs.get(1), "a", 0o755, UID, GID)
    for i in range(n):
        _node, h = await fs.create(d, f"f{i:05d}a" if files else f"f{i:05d}", 0o644, os.O_WRONLY, UID, GID)
        await fs.write(h, 0, b"x" * 100)
        await fs.flush(h)
        await fs.release(h)
    assert await fs.drain() == 0
    times = []
    for r in range(rounds):
        src, dst = ("a", "b") if r % 2 == 0 else ("b", "a")
        t = time.perf_counter()
        if files:
            for i in range(n):
                await fs.rename(d, f"f{i:05d}{src}", d, f"f{i:05d}{dst}", 0)
        else:
            await fs.rename(fs.get(1), src, fs.get(1), dst, 0)
        times.append(time.perf_counter() - t)
    fs.close()
    await fs.store.aclose()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--files", action="store_true", help="rename the N files one by one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ossfuse-dir-rename-") as work:
        from ossfuse.keyring import generate_rsa_cmk
        cmk = os.path.join(work, "cmk.pem")
        generate_rsa_cmk(cmk, 2048)
        times = trio.run(run, args.n, args.rounds, os.path.join(work, "m"), cmk, args.files)
    what = f"{args.n} file renames" if args.files else "rename"
    print(f"N={args.n}: median {statistics.median(times):.3f} s per {what}; rounds "
          f"{', '.join(f'{t:.3f}' for t in times)}")


if __name__ == "__main__":
    main()
