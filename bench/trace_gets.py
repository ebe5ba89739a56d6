#!/usr/bin/env python3
"""Run the ossfuse CLI with every store GET / part upload traced (diagnostics for the benchmark).

    python bench/trace_gets.py TRACE.jsonl mount -f -c CONFIG MNT

Appends one JSON line per call to TRACE.jsonl: op, start/end byte (GET), t0/t1 (monotonic),
thread name. Nothing in ossfuse/ is changed: the store class is wrapped at runtime.
Summarize with ``python bench/trace_gets.py --summary TRACE.jsonl``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def install(trace_path: str) -> None:
    from ossfuse.store import oss
    out = open(trace_path, "a", buffering=1)
    lock = threading.Lock()

    def wrap(name, describe):
        orig = getattr(oss.OssStore, name)

        def traced(self, *args, **kw):
            t0 = time.monotonic()
            try:
                return orig(self, *args, **kw)
            finally:
                rec = {"op": name, "t0": t0, "t1": time.monotonic(),
                       "thread": threading.current_thread().name, **describe(*args)}
                with lock:
                    out.write(json.dumps(rec) + "\n")
        setattr(oss.OssStore, name, traced)

    wrap("_get_range_sync", lambda key, start, end, *_: {"start": start, "end": end})
    if hasattr(oss.OssStore, "_part_sync"):
        wrap("_part_sync", lambda key, upload_id, n, data, *_: {"part": n, "size": len(data)})


def summary(path: str) -> None:
    recs = [json.loads(l) for l in open(path)]
    gets = sorted((r for r in recs if r["op"] == "_get_range_sync"), key=lambda r: r["t0"])
    if not gets:
        print("no GETs")
        return
    t_start, t_end = gets[0]["t0"], max(r["t1"] for r in gets)
    wall = t_end - t_start
    nbytes = sum(r["end"] - r["start"] for r in gets)
    busy = sum(r["t1"] - r["t0"] for r in gets)
    # time-weighted concurrency
    ev = sorted([(r["t0"], 1) for r in gets] + [(r["t1"], -1) for r in gets])
    cur, last, hist = 0, ev[0][0], {}
    for t, d in ev:
        hist[cur] = hist.get(cur, 0.0) + (t - last)
        cur += d
        last = t
    sizes = {}
    for r in gets:
        s = r["end"] - r["start"]
        sizes[s] = sizes.get(s, 0) + 1
    lat = sorted(r["t1"] - r["t0"] for r in gets)
    print(f"{len(gets)} GETs, {nbytes / 2**20:.0f} MiB in {wall:.2f}s "
          f"({nbytes / wall / 1e6:.0f} MB/s while GETs ran); mean in flight {busy / wall:.2f}")
    print("sizes:", ", ".join(f"{n}x{s / 2**20:g}MiB" for s, n in sorted(sizes.items(), key=lambda x: -x[1])[:6]))
    print(f"latency ms: median {1000 * lat[len(lat) // 2]:.1f}, p90 {1000 * lat[int(len(lat) * .9)]:.1f}")
    print("share of wall time with N GETs in flight:",
          ", ".join(f"{n}: {100 * t / wall:.0f}%" for n, t in sorted(hist.items())))
    gaps = [b["t0"] - a["t1"] for a, b in zip(gets, gets[1:]) if b["t0"] > a["t1"]]
    print(f"idle gaps between GETs (no GET in flight): {len(gaps)}, total {sum(gaps):.2f}s")


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
        sys.exit(0)
    install(sys.argv[1])
    from ossfuse.cli import main
    sys.argv = ["ossfuse"] + sys.argv[2:]
    sys.exit(main())
