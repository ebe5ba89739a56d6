"""Builds and runs the third-party POSIX checkers of tests/test_posix.py: pjdfstest (the
syscall conformance suite FUSE filesystems are measured with) and fsx (xfstests' file
exerciser). Their sources are the tarballs in ``../shared/tools`` beside the repository (CI has
them there; ``OSSFUSE_TEST_TOOLS`` names another directory); the build commands are those of
that directory's README.md. A build is cached by the tarballs' SHA-256 under
``$XDG_CACHE_HOME/ossfuse-tests`` (default ``~/.cache``), so only the first run pays for it."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DIR = os.environ.get("OSSFUSE_TEST_TOOLS") or os.path.normpath(os.path.join(REPO, "..", "shared", "tools"))
PJDFSTEST_TGZ = "pjdfstest.tar.gz"
FSX_TGZ = "xfstests-fsx.tar.gz"


@dataclass(frozen=True)
class Tools:
    pjdfstest_dir: str  # the unpacked source tree, built: tests/ and the pjdfstest binary
    fsx: str  # the fsx binary

    @property
    def pjdfstest_tests(self) -> str:
        return os.path.join(self.pjdfstest_dir, "tests")


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def missing_sources() -> str | None:
    """Why the checkers' sources cannot be found (``None`` when both tarballs are there)."""
    missing = [n for n in (PJDFSTEST_TGZ, FSX_TGZ) if not os.path.isfile(os.path.join(TOOLS_DIR, n))]
    if missing:
        return f"{', '.join(missing)} not in {TOOLS_DIR} (set OSSFUSE_TEST_TOOLS to the tools directory)"
    return None


def require_sources() -> None:
    """Skip the calling test, with the reason, where the tarballs are absent (a plain clone
    without ../shared beside it); under CI (``$CI`` set) fail instead: CI must run the
    checkers. A failing build of present sources stays an error."""
    import pytest
    why = missing_sources()
    if why and "CI" in os.environ:
        pytest.fail(f"CI must run pjdfstest and fsx, but {why}", pytrace=False)
    if why:
        pytest.skip(f"pjdfstest and fsx cannot be built here: {why}")


def build_tools() -> Tools:
    """Build pjdfstest and fsx (or reuse the cached build). Raises RuntimeError naming what is
    missing (the tarballs, an apt package of .ci/install) or the failed build step's output."""
    tarballs = [os.path.join(TOOLS_DIR, n) for n in (PJDFSTEST_TGZ, FSX_TGZ)]
    missing = [p for p in tarballs if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"test tool sources missing: {missing} (set OSSFUSE_TEST_TOOLS to the tools directory)")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ossfuse-tests")
    dest = os.path.join(cache, _digest(tarballs))
    tools = Tools(os.path.join(dest, "pjdfstest"), os.path.join(dest, "fsx"))
    if os.access(os.path.join(tools.pjdfstest_dir, "pjdfstest"), os.X_OK) and os.access(tools.fsx, os.X_OK):
        return tools
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(dir=cache, prefix="build-")
    try:
        steps = [
            ["tar", "xzf", tarballs[0]], ["tar", "xzf", tarballs[1]],
            ["sh", "-c", "cd pjdfstest && autoreconf -ifs && ./configure && make pjdfstest"],
            ["gcc", "-O2", "-D_GNU_SOURCE", "-D_FILE_OFFSET_BITS=64", "-DAIO", "-DURING", "-DHAVE_COPY_FILE_RANGE",
             "-DFALLOCATE", "-Ixfstests-fsx", "-Ixfstests-fsx/src", "-Ixfstests-fsx/include", "-o", "fsx",
             "xfstests-fsx/ltp/fsx.c", "-laio", "-luring", "-lpthread"],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"building the test tools failed at {cmd}: {(r.stdout + r.stderr)[-3000:]}")
        try:
            os.rename(work, dest)  # atomic: a concurrent session's finished build may win
        except OSError:
            if not os.path.isdir(dest):
                raise
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return tools


# -- pjdfstest results ----------------------------------------------------------------------

@dataclass
class FileResult:
    """The outcome of one pjdfstest test file (``dir/NN.t``)."""

    planned: int = 0
    failed: set[int] = field(default_factory=set)  # subtest numbers, including planned ones never run
    note: str = ""  # a parse error or non-zero exit status prove reported


def parse_ranges(text: str) -> set[int]:
    """``"1, 3-5, 9"`` → {1, 3, 4, 5, 9}."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


_HEADER = re.compile(r"^(?P<file>\S+\.t)\s+\(Wstat: (?P<wstat>\d+).*?Tests: (?P<tests>\d+) Failed: (?P<failed>\d+)\)")
_BAD_PLAN = re.compile(r"You planned (?P<planned>\d+) tests? but ran (?P<ran>\d+)")


def parse_prove_summary(output: str, tests_root: str) -> dict[str, FileResult]:
    """The files prove's "Test Summary Report" lists, by path relative to ``tests_root``
    (``chmod/00.t``), with their failed subtest numbers (planned subtests that never ran count
    as failed). Files prove does not list passed."""
    results: dict[str, FileResult] = {}
    cur: FileResult | None = None
    in_failed = False
    for line in output.splitlines():
        m = _HEADER.match(line)
        if m:
            cur = results.setdefault(os.path.relpath(m["file"], tests_root), FileResult())
            cur.planned = int(m["tests"])
            if m["wstat"] != "0":
                cur.note += f" exit status {int(m['wstat']) >> 8}"
            in_failed = False
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("Failed tests:"):
            cur.failed |= parse_ranges(s.partition(":")[2])
            in_failed = True
            continue
        if in_failed and re.fullmatch(r"[\d, -]+", s or "x"):
            cur.failed |= parse_ranges(s)  # prove wraps a long list onto indented lines
            continue
        in_failed = False
        m = _BAD_PLAN.search(s)
        if m:
            cur.failed |= set(range(int(m["ran"]) + 1, int(m["planned"]) + 1))
            cur.note += f" ran {m['ran']} of {m['planned']}"
        elif s.startswith(("Parse errors:", "Non-zero exit status:")):
            cur.note += " " + s
    return results
