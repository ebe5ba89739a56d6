#!/usr/bin/env python3
"""Memory per cached inode: the Python heap (tracemalloc) the filesystem core holds for N
encrypted files it has listed and handed to the kernel (readdir of one directory, every entry
remembered, as ``ls -l`` leaves it), divided by N. No kernel, no mount: a Filesystem over a
local-directory bucket whose index gets N copies of one real encrypted object's row.

    .venv/bin/python bench/inode_memory.py [--n 100000] [--results bench/RESULTS.md]

``--listing-only``: the store lists no metadata (as OSS), so past 4,096 entries the nodes are
listed-only (fs/readdir.py: no version held until a HEAD). Reported: bytes per inode (heap
after listing − heap before, / N; a version keeps its user metadata, the envelope, only while
among the mount's 2,048 most recently read: docs/design.md "Memory per cached inode"), and the
daemon-like total
for N. Target (issue 14): ≤ 1 KiB per cached inode."""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import sys
import tempfile
import tracemalloc

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import local_filesystem  # noqa: E402


async def measure(work: str, n: int, listing_only: bool = False) -> tuple[float, int]:
    # listing_only: as over OSS, the listing has no metadata (a big directory's nodes are listed-only)
    fs, store = local_filesystem(work, 0.0, listing_has_metadata=not listing_only)
    root = fs.get(1)
    d = await fs.mkdir(root, "big", 0o755, 0, 0)
    node, h = await fs.create(d, "seed", 0o644, os.O_WRONLY, 0, 0)
    await fs.write(h, 0, b"x" * 4096)
    await fs.flush(h)
    await fs.release(h)
    await fs.drain()
    db = store._db()
    row = db.execute("SELECT size, etag, mtime, meta, blob FROM objects WHERE key='big/seed'").fetchone()
    db.execute("BEGIN")
    db.executemany("INSERT INTO objects VALUES (?,?,?,?,?,?)",
                   ((f"big/file-{i:07d}.txt", row[0], f"{i:032X}", row[2], row[3], row[4]) for i in range(n)))
    db.execute("COMMIT")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dh = fs.opendir(d)
    start, seen = 0, 0
    while True:
        batch = await fs.readdir_entries(dh, start)
        if not batch:
            break
        for _idx, _name, nd in batch:
            fs.remember(nd)  # the kernel took it (as readdirplus does)
            seen += 1
        start = batch[-1][0]
    fs.releasedir(dh.fh)
    dh = None
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = snap.statistics("lineno")[:8]
    for st in top:
        print(f"  {st.size / seen:8.1f} B/inode  {st.traceback[0].filename.split('/ossfuse/')[-1]}:"
              f"{st.traceback[0].lineno}", file=sys.stderr)
    assert seen == n + 1, (seen, n)
    held = sum(1 for nd in fs.inodes.nodes.values() if nd.version is not None and nd.version.held)
    print(f"  {held} of {seen} nodes hold their version's metadata (envelope): the recent ones "
          f"(Resolver.recent, at most {fs.resolver.recent.limit})", file=sys.stderr)
    fs.close()
    await store.aclose()
    return (after - before) / seen, after - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--listing-only", action="store_true",
                    help="the store's listing carries no metadata (OSS): past 4,096 entries the nodes are listed-only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ossfuse-inode-mem-") as work:
        per, total = trio.run(measure, work, args.n, args.listing_only)
    kind = "listed-only (listing without metadata)" if args.listing_only else "with full attributes"
    text = (f"{args.n} encrypted files listed and remembered, {kind}: {per:.0f} B per cached inode "
            f"(Python heap, tracemalloc), {total / 2**20:.1f} MiB in all; target ≤ 1024 B")
    print(text)
    if args.results:
        cmd = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
        with open(args.results, "a") as f:
            f.write(f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — inode memory "
                    f"(bench/inode_memory.py)\n\n- command: `{cmd}`\n\n{text}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
