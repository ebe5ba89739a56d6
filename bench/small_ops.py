#!/usr/bin/env python3
"""The daemon's own cost per small-file operation, without FUSE: N × (create + write 4 KiB +
close) then N × unlink through ``Filesystem`` over a ``LocalStore`` bucket (upload at close,
as a mount of a local bucket), RSA-3072 CMK. Prints milliseconds per file, wall and CPU
(the process's, all threads: what a loaded machine makes the wall time).

    .venv/bin/python bench/small_ops.py [N]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/small_ops.py   # before/after

(run from outside the repo for PYTHONPATH to win over the current directory: cd /tmp first).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import trio

import ossfuse
from ossfuse.keyring import generate_rsa_cmk

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.fakes
from tests.fakes.core import core_filesystem  # noqa: E402


async def run(root: str, cmk: str, n: int) -> tuple[float, float, float, float]:
    """(create ms/file, unlink ms/file, create CPU ms/file, unlink CPU ms/file): wall time and
    the process's CPU time (all threads), inside a nursery as the daemon runs (background
    tasks such as the envelopes made ahead run there)."""
    fs = core_filesystem(root, cmk)
    data = os.urandom(4096)
    async with trio.open_nursery() as nursery:
        fs._nursery = nursery
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            _, h = await fs.create(fs.get(1), f"f{i}", 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, data)
            await fs.flush(h)
            await fs.release(h)
        t_create = (time.perf_counter() - t) / n * 1000
        c_create = (time.process_time() - c) / n * 1000
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            await fs.unlink(fs.get(1), f"f{i}")
        t_unlink = (time.perf_counter() - t) / n * 1000
        c_unlink = (time.process_time() - c) / n * 1000
        nursery.cancel_scope.cancel()
    fs.close()
    await fs.store.aclose()
    return t_create, t_unlink, c_create, c_unlink


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    root = tempfile.mkdtemp(prefix="ossfuse-small-ops-")
    try:
        cmk = os.path.join(root, "cmk.pem")
        generate_rsa_cmk(cmk, bits=3072)
        t_create, t_unlink, c_create, c_unlink = trio.run(run, root, cmk, n)
        print(f"{os.path.dirname(ossfuse.__file__)}: create+write 4 KiB+close {t_create:.2f} ms/file "
              f"({c_create:.2f} ms CPU), unlink {t_unlink:.2f} ms/file ({c_unlink:.2f} ms CPU) ({n} files)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
