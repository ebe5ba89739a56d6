#!/usr/bin/env python3
"""Summarize a py-spy ``--format raw`` (collapsed stacks, ``--threads``) profile:
share of samples per thread kind, top functions by self and by inclusive samples.

    python bench/pyspy_summary.py PROFILE.txt [--top 25] [--thread main|workers|all]
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

THREAD = re.compile(r"^thread \((\d+)\): (.*)$")


def parse(path: str):
    """Yield (thread_kind, frames root->leaf, count)."""
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            parts = stack.split(";")
            kind = "?"
            m = THREAD.match(parts[0])
            if m:
                name = m.group(2)
                kind = "main (trio loop)" if name == "MainThread" else \
                    "worker: " + name.split(" from ")[0]
                parts = parts[1:]
            yield kind, parts, int(count)


def short(frame: str) -> str:
    # "func (file.py:123)" -> "func (file.py)" so lines of one function merge
    return re.sub(r":\d+\)$", ")", frame)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thread", default="all", help="all | main | workers")
    a = ap.parse_args()
    rows = list(parse(a.profile))
    if a.thread == "main":
        rows = [r for r in rows if r[0].startswith("main")]
    elif a.thread == "workers":
        rows = [r for r in rows if r[0].startswith("worker")]
    total = sum(c for _, _, c in rows)
    if not total:
        print("no samples")
        return 1
    by_kind = collections.Counter()
    self_c = collections.Counter()
    incl = collections.Counter()
    for kind, frames, c in rows:
        by_kind[kind] += c
        if frames:
            self_c[short(frames[-1])] += c
        for fr in {short(f) for f in frames}:
            incl[fr] += c
    print(f"{a.profile}: {total} active samples ({a.thread})\n")
    print("by thread kind:")
    for k, c in by_kind.most_common():
        print(f"  {100 * c / total:5.1f}%  {k}")
    print("\ntop self (leaf) functions:")
    for k, c in self_c.most_common(a.top):
        print(f"  {100 * c / total:5.1f}%  {k}")
    print("\ntop inclusive functions:")
    for k, c in incl.most_common(a.top):
        print(f"  {100 * c / total:5.1f}%  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
