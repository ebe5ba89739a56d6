"""One set of assertions every ObjectStore must pass, run against LocalStore (a directory),
OssStore (oss2 over real HTTP to tests/oss_server.py, signature V1 and V4) and the in-process
FaultStore (tests/fakes/fault_store.py) around a LocalStore with no fault armed.

The expected behaviour is OSS's (shared/spec/oss-rest-api.md): keys are opaque strings of
1-1023 UTF-8 bytes (``a`` and ``a/`` are different objects), ranges past the end are short,
If-Match failures are PreconditionFailed, deleting a missing key is fine, listings are in key
order with CommonPrefixes counted against max_keys and a marker that continues exactly after
the last entry of the previous page."""
from __future__ import annotations

import functools
import itertools
import os
import sys
import time

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))

from fakes.fault_store import FaultStore  # noqa: E402
from oss_server import OssTestServer  # noqa: E402

from ossfuse.store.base import (AlreadyExists, DestinationChanged, NoSuchKey, ObjectStore, PreconditionFailed,  # noqa: E402
                                StoreError)
from ossfuse.store.credentials import StaticCredentialsProvider  # noqa: E402
from ossfuse.store.health import StoreHealth  # noqa: E402
from ossfuse.store.local import LocalStore  # noqa: E402
from ossfuse.store.oss import OssStore  # noqa: E402

pytestmark = pytest.mark.timeout(60)

AK, SK, REGION = "contract-ak", "contract-sk", "cn-hangzhou"
_bucket_seq = itertools.count()


def trio_test(fn):
    """Run an async test function under trio.run (fixtures resolved by pytest as usual)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))
    return wrapper


class Harness:
    """A store plus the backend-specific view a test needs (pending multipart uploads)."""

    def __init__(self, kind: str, store: ObjectStore, pending):
        self.kind = kind
        self.store = store
        self.pending_uploads = pending


@pytest.fixture(scope="module")
def oss_server():
    srv = OssTestServer(access_key_id=AK, access_key_secret=SK, buckets=(), region=REGION, seed=7)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["local", "oss-v1", "oss-v4", "fault"])
def h(request, tmp_path):
    if request.param in ("local", "fault"):
        local = LocalStore(str(tmp_path / "bucket"))
        store = local if request.param == "local" else FaultStore(local)
        yield Harness(request.param, store, local.pending_uploads)
        trio.run(store.aclose)
        return
    srv = request.getfixturevalue("oss_server")
    name = f"contract-{next(_bucket_seq)}"
    srv.create_bucket(name)
    store = OssStore(name, srv.endpoint, region=REGION, signature=request.param[4:],
                     credentials=StaticCredentialsProvider(AK, SK), threads=8, retries=2, backoff=0.01)

    def pending():
        with srv.lock:
            return sorted(srv.buckets[name].uploads)

    try:
        yield Harness(request.param, store, pending)
    finally:
        trio.run(store.aclose)


def blob(n: int, seed: int = 0) -> bytes:
    """n deterministic, non-repeating-looking bytes."""
    out = bytearray()
    i = seed
    while len(out) < n:
        out += i.to_bytes(8, "little") * 4 + (i * 2654435761 % (1 << 32)).to_bytes(4, "big")
        i += 1
    return bytes(out[:n])


async def list_all(store: ObjectStore, prefix: str, delimiter, max_keys: int):
    """Follow next_marker to the end; returns (pages, objects, prefixes)."""
    pages, marker = [], None
    for _ in range(1000):
        page = await store.list(prefix, delimiter=delimiter, marker=marker, max_keys=max_keys)
        pages.append(page)
        assert len(page.objects) + len(page.prefixes) <= max_keys
        if page.next_marker is None:
            break
        marker = page.next_marker
    else:
        pytest.fail("listing never ended")
    objs = [o.key for p in pages for o in p.objects]
    prefs = [x for p in pages for x in p.prefixes]
    return pages, objs, prefs


# ------------------------------------------------------------------------------------ basics
@trio_test
async def test_put_head_get_roundtrip(h):
    s = h.store
    meta = {"wrapped-key": "a2V5LWJ5dGVz+/==", "x-mode": "0644", "with-space": "a b c"}
    t0 = time.time()
    info = await s.put_bytes("obj", b"hello world", meta)
    assert (info.key, info.size, info.metadata) == ("obj", 11, meta)
    assert info.etag
    got = await s.head("obj")
    assert got is not None
    assert (got.key, got.size, got.etag, got.metadata) == ("obj", 11, info.etag, meta)
    assert t0 - 2 <= got.mtime <= time.time() + 2
    assert abs(got.mtime - info.mtime) <= 2
    assert t0 - 2 <= got.answered <= time.time() + 2  # the store's clock at its answer (a HEAD's Date)
    assert await s.get_range("obj", 0, 11) == b"hello world"
    # overwrite: new content, new metadata (not merged), new ETag
    info2 = await s.put_bytes("obj", b"HELLO", {"other": "1"})
    got2 = await s.head("obj")
    assert (got2.size, got2.metadata, got2.etag) == (5, {"other": "1"}, info2.etag)
    assert info2.etag != info.etag
    assert await s.get_range("obj", 0, 100) == b"HELLO"


@trio_test
async def test_empty_object(h):
    s = h.store
    info = await s.put_bytes("empty", b"", {})
    assert info.size == 0
    got = await s.head("empty")
    assert (got.size, got.metadata) == (0, {})
    assert await s.get_range("empty", 0, 10) == b""


@trio_test
async def test_head_many_answers_as_head_does_in_key_order(h):
    """head_many: one answer per key, in the order given, equal to head's (None for a missing
    key), whatever the parallelism; one HEAD per key."""
    s = h.store
    keys = [f"hm/k{i:02d}" for i in range(40)]
    for i, k in enumerate(keys):
        if i % 3:
            await s.put_bytes(k, b"x" * i, {"mode": str(i)})
    for parallel in (1, 7, 64):
        got = await s.head_many(keys[::-1], parallel)
        assert len(got) == len(keys)
        for k, info in zip(keys[::-1], got, strict=True):
            want = await s.head(k)
            if want is None:
                assert info is None, k
            else:
                assert info is not None and (info.key, info.size, info.etag, info.mtime, info.metadata) == \
                    (k, want.size, want.etag, want.mtime, want.metadata) == (k, int(k[-2:]), want.etag, want.mtime,
                                                                             {"mode": str(int(k[-2:]))})
    assert await s.head_many([], 4) == []


@pytest.mark.parametrize("kind", ["fault", "oss-v4"])
def test_head_many_reports_refused_keys_and_answers_the_others(tmp_path, request, kind):
    """head_many(..., failed): a key whose HEAD is refused for good (403 AccessDenied) or fails
    for now (503 past the retries; over OSS also no answer for the whole offline timeout)
    gets its error in ``failed`` and answer None, every other key its answer (none lost, each
    HEADed once more at most: trial AH, a lost batch was HEADed again whole); a key silent
    for the timeout costs one timeout, not two; without ``failed`` a failure raises."""
    keys = [f"hr/k{i:02d}" for i in range(12)]
    if kind == "fault":
        store = FaultStore(LocalStore(str(tmp_path / "bucket")))

        def refuse(key, status):
            store.fail("head", key=key, error="permanent" if status == 403 else "busy", count=None)
        clear = store.clear
    else:
        srv = request.getfixturevalue("oss_server")
        name = f"contract-{next(_bucket_seq)}"
        srv.create_bucket(name)
        store = OssStore(name, srv.endpoint, region=REGION, signature="v4",
                         credentials=StaticCredentialsProvider(AK, SK), threads=8, retries=1, backoff=0.01)

        def refuse(key, status):
            srv.faults.add(status=status, count=None, methods=("HEAD",), key_prefix=key, bucket=name)
        clear = srv.faults.clear

    async def main():
        for k in keys:
            await store.put_bytes(k, k.encode(), {"n": k[-2:]})
        refuse("hr/k05", 403)
        failed: dict = {}
        got = await store.head_many(keys, 4, failed)
        assert list(failed) == [5] and failed[5].key == "hr/k05" and not failed[5].temporary, failed
        assert [i.metadata["n"] if i else None for i in got] == [k[-2:] if k != "hr/k05" else None for k in keys]
        with pytest.raises(StoreError):
            await store.head_many(keys, 4)
        clear()
        refuse("hr/k07", 503)
        failed = {}
        got = await store.head_many(keys, 4, failed)
        assert list(failed) == [7] and failed[7].temporary and got[7] is None
        assert [i.metadata["n"] if i else None for i in got] == [k[-2:] if k != "hr/k07" else None for k in keys]
        with pytest.raises(StoreError) as e:
            await store.head_many(keys, 4)
        assert e.value.temporary
        clear()
        if kind != "fault":  # one HEAD without an answer while the store answers the others
            health = StoreHealth(timeout=0.5, probe_interval=60.0)
            health.confirm = functools.partial(store.list, "", max_keys=1)
            store.health = health
            srv.faults.add_delay(3.0, count=None, methods=("HEAD",), key_prefix="hr/k09")
            failed = {}
            t0 = time.monotonic()
            got = await store.head_many(keys, 4, failed)
            assert list(failed) == [9] and failed[9].code == "Timeout" and not health.offline, failed
            assert time.monotonic() - t0 < 0.9  # one timeout (0.5 s), then the confirming listing
            assert [i.metadata["n"] if i else None for i in got] == [k[-2:] if k != "hr/k09" else None for k in keys]
            clear()
        await store.aclose()

    trio.run(main)


@trio_test
async def test_head_missing_and_delete(h):
    s = h.store
    assert await s.head("missing") is None
    await s.delete("missing")  # deleting a missing key is fine (OSS: 204)
    await s.put_bytes("k", b"x", {})
    await s.delete("k")
    assert await s.head("k") is None
    await s.delete("k")
    with pytest.raises(NoSuchKey):
        await s.get_range("k", 0, 1)
    v = await s.put_bytes("k", b"y", {})
    await s.delete("k", version=v.etag.lower())  # the caller's HEAD found this version (case does not count)
    assert await s.head("k") is None
    await s.delete("k", version=v.etag)  # gone: fine


@trio_test
async def test_delete_many(h):
    """delete_many: every key given goes (a missing one is no error), others stay, odd key
    shapes included (OSS DeleteMultipleObjects: raw keys in the XML, URL-encoded answer; a key
    with a control character XML 1.0 cannot carry made the whole batch MalformedXML, a trial)."""
    s = h.store
    keys = ["m/1", "m/ünï 空 🚀", "m/q?uery#frag&amp=1", "m/per%cent%2F", "m/<lt>&", "m/ctl\x01x", "m/esc\x1b",
            "m/cr\rx"]
    for k in keys + ["m/stays", "m/cr\nx"]:  # (an XML parser reads CR as LF: a trial deleted m/cr\nx)
        await s.put_bytes(k, b"x", {})
    assert await s.delete_many(keys + ["m/missing"]) == []
    assert [o.key for o in (await s.list("m/", delimiter=None)).objects] == ["m/cr\nx", "m/stays"]
    assert s.max_delete_keys == 1000


KEYS = [
    "a", "a/", "a//b", "a/b", "ax",
    "dir/ünïcødé 空間 🚀.txt", "with space", "per%cent%2F%20", "plus+sign+", "q?uery#frag&amp=1",
    "tab\tand~tilde*star", "x" * 1023, "é" * 511 + "a",  # 1023 bytes, ASCII and multi-byte
]


@trio_test
async def test_key_shapes_side_by_side(h):
    s = h.store
    assert len(KEYS[-1].encode()) == 1023 and len(KEYS[-2].encode()) == 1023
    for i, k in enumerate(KEYS):
        await s.put_bytes(k, f"body {i}".encode(), {"n": str(i)})
    for i, k in enumerate(KEYS):
        info = await s.head(k)
        assert info is not None, k
        assert (info.key, info.size, info.metadata) == (k, len(f"body {i}"), {"n": str(i)})
        assert await s.get_range(k, 0, 100) == f"body {i}".encode(), k
    _, objs, prefs = await list_all(s, "", None, 1000)
    assert objs == sorted(KEYS, key=lambda k: k.encode()) and prefs == []
    # "a/" listed under prefix "a/" is an object of its own next to "a//b" and "a/b"
    page = await s.list("a/", delimiter="/")
    assert [o.key for o in page.objects] == ["a/", "a/b"] and page.prefixes == ["a//"]
    await s.delete("a/")
    assert await s.head("a") is not None and await s.head("a//b") is not None


@trio_test
async def test_key_too_long_is_refused(h):
    with pytest.raises(StoreError):
        await h.store.put_bytes("y" * 1024, b"x", {})
    with pytest.raises(StoreError):
        await h.store.put_bytes("é" * 512, b"x", {})


# ------------------------------------------------------------------------------------ ranges
@trio_test
async def test_ranges(h):
    s = h.store
    data = blob(1000, 3)
    await s.put_bytes("r", data, {})
    cases = [(0, 10), (10, 20), (0, 1000), (999, 1000), (990, 1010), (995, 5000), (500, 1000), (0, 1),
             (1000, 1100), (2000, 3000), (7, 7)]
    for a, b in cases:
        assert await s.get_range("r", a, b) == data[a:b], (a, b)


@trio_test
async def test_if_match(h):
    s = h.store
    info = await s.put_bytes("c", b"0123456789", {})
    assert await s.get_range("c", 2, 4, if_match=info.etag) == b"23"
    with pytest.raises(PreconditionFailed):
        await s.get_range("c", 2, 4, if_match="0" * 32)
    await s.put_bytes("c", b"abcdefghij", {})
    with pytest.raises(PreconditionFailed):
        await s.get_range("c", 0, 4, if_match=info.etag)
    with pytest.raises(NoSuchKey):
        await s.get_range("nope", 0, 4, if_match=info.etag)


@trio_test
async def test_get_range_with_info_answers_as_head_and_get_range_do(h):
    """get_range_with_info: head's answer (size of the whole object, ETag, Last-Modified,
    metadata) and get_range's bytes, of one version; ranges past the end are short, an empty
    object and an empty range answer too; If-Match and a missing key fail as get_range does.
    OSS sends one GET (its answer carries HeadObject's headers)."""
    s = h.store
    data = blob(1000, 5)
    meta = {"wrapped-key": "a2V5LWJ5dGVz+/==", "x-mode": "0600"}
    await s.put_bytes("gi", data, meta)
    await s.put_bytes("gi-empty", b"", {"n": "1"})
    for key, body in (("gi", data), ("gi-empty", b"")):
        want = await s.head(key)
        for a, b in ((0, 10), (0, 1000), (990, 5000), (0, 1), (7, 7), (1000, 1100), (2000, 3000)):
            info, got = await s.get_range_with_info(key, a, b, if_match=want.etag)
            assert got == body[a:b], (key, a, b)
            assert (info.key, info.size, info.etag, info.mtime, info.metadata) == \
                (key, len(body), want.etag, want.mtime, want.metadata), (key, a, b)
    info = (await s.get_range_with_info("gi", 0, 4))[0]
    assert info.metadata == meta and info.size == 1000
    assert abs(info.answered - time.time()) <= 2
    with pytest.raises(PreconditionFailed):
        await s.get_range_with_info("gi", 0, 4, if_match="0" * 32)
    with pytest.raises(NoSuchKey):
        await s.get_range_with_info("nope", 0, 4)
    if h.kind.startswith("oss"):  # one request: the GET's answer carries the headers, no HEAD is sent
        def no_head(*a, **kw):
            raise AssertionError("a HEAD was sent")
        s._head_sync = no_head
        info, got = await s.get_range_with_info("gi", 10, 20)
        assert got == data[10:20] and info.metadata == meta and info.size == 1000


# ----------------------------------------------------------------------------------- listing
LIST_KEYS = ["d/a", "d/b", "d/c/1", "d/c/2", "d/c/sub/3", "d/d", "d/e/x", "d/f", "d/g/", "d0", "e", "c"]


@trio_test
async def test_list_delimiter(h):
    s = h.store
    for k in LIST_KEYS:
        await s.put_bytes(k, k.encode(), {"m": "1"})
    page = await s.list("d/", delimiter="/")
    assert [o.key for o in page.objects] == ["d/a", "d/b", "d/d", "d/f"]
    assert page.prefixes == ["d/c/", "d/e/", "d/g/"]
    assert page.next_marker is None
    assert all(o.size == len(o.key) and o.etag for o in page.objects)
    page = await s.list("d", delimiter="/")
    assert ([o.key for o in page.objects], page.prefixes) == (["d0"], ["d/"])
    page = await s.list("", delimiter="/")
    assert ([o.key for o in page.objects], page.prefixes) == (["c", "d0", "e"], ["d/"])
    page = await s.list("d/", delimiter=None)
    assert [o.key for o in page.objects] == sorted(k for k in LIST_KEYS if k.startswith("d/"))
    page = await s.list("nothing/", delimiter="/")
    assert (page.objects, page.prefixes, page.next_marker) == ([], [], None)
    # a marker continues strictly after it
    page = await s.list("d/", delimiter="/", marker="d/b")
    assert ([o.key for o in page.objects], page.prefixes) == (["d/d", "d/f"], ["d/c/", "d/e/", "d/g/"])
    page = await s.list("d/", delimiter="/", marker="d/c/")  # a common prefix as marker: skip its keys
    assert ([o.key for o in page.objects], page.prefixes) == (["d/d", "d/f"], ["d/e/", "d/g/"])


@pytest.mark.parametrize("max_keys", [1, 2, 3, 4])
@trio_test
async def test_list_paging_exactly_once(h, max_keys):
    s = h.store
    for k in LIST_KEYS:
        await s.put_bytes(k, b"", {})
    full = await s.list("d/", delimiter="/")
    pages, objs, prefs = await list_all(s, "d/", "/", max_keys)
    assert objs == [o.key for o in full.objects]
    assert prefs == full.prefixes
    assert len(pages) == -(-7 // max_keys)  # 4 objects + 3 prefixes, pages filled up
    # every page but the last is full and its marker is its last entry (key or prefix)
    for p in pages[:-1]:
        assert len(p.objects) + len(p.prefixes) == max_keys
        assert p.next_marker == max([o.key for o in p.objects] + p.prefixes)
    # flat listing of everything, paged
    _, flat, fp = await list_all(s, "", None, max_keys)
    assert flat == sorted(LIST_KEYS) and fp == []


@trio_test
async def test_list_page_boundary_on_common_prefix(h):
    s = h.store
    for k in LIST_KEYS:
        await s.put_bytes(k, b"", {})
    # d/a, d/b, d/c/ : the first page of three ends on the common prefix d/c/
    p1 = await s.list("d/", delimiter="/", max_keys=3)
    assert ([o.key for o in p1.objects], p1.prefixes, p1.next_marker) == (["d/a", "d/b"], ["d/c/"], "d/c/")
    p2 = await s.list("d/", delimiter="/", max_keys=3, marker=p1.next_marker)
    assert ([o.key for o in p2.objects], p2.prefixes) == (["d/d", "d/f"], ["d/e/"])  # nothing under d/c/
    assert p2.next_marker == "d/f"
    p3 = await s.list("d/", delimiter="/", max_keys=3, marker=p2.next_marker)
    assert ([o.key for o in p3.objects], p3.prefixes, p3.next_marker) == ([], ["d/g/"], None)
    # two entries a page: the boundary falls on d/e/ (page 2 ends with it) and on d/g/
    p = await s.list("d/", delimiter="/", max_keys=2, marker="d/d")
    assert ([o.key for o in p.objects], p.prefixes, p.next_marker) == (["d/f"], ["d/e/"], "d/f")
    p = await s.list("d/", delimiter="/", max_keys=4, marker="d/b")
    assert ([o.key for o in p.objects], p.prefixes, p.next_marker) == (["d/d", "d/f"], ["d/c/", "d/e/"], "d/f")
    p = await s.list("d/", delimiter="/", max_keys=1, marker="d/f")
    assert ([o.key for o in p.objects], p.prefixes, p.next_marker) == ([], ["d/g/"], None)


# -------------------------------------------------------------------------------------- copy
@trio_test
async def test_copy_keeps_metadata(h):
    s = h.store
    src = await s.put_bytes("src", blob(3000, 1), {"a": "1", "b": "two"})
    info = await s.copy("src", "dst/copy")
    assert (info.key, info.size, info.metadata) == ("dst/copy", 3000, {"a": "1", "b": "two"})
    got = await s.head("dst/copy")
    assert (got.size, got.metadata, got.etag) == (3000, {"a": "1", "b": "two"}, info.etag)
    assert await s.get_range("dst/copy", 0, 5000) == blob(3000, 1)
    assert (await s.head("src")).etag == src.etag  # the source is untouched


@trio_test
async def test_copy_replace_metadata(h):
    s = h.store
    await s.put_bytes("src", b"payload", {"a": "1", "b": "2"})
    info = await s.copy("src", "dst", metadata={"c": "3"})
    assert info.metadata == {"c": "3"}
    got = await s.head("dst")
    assert (got.size, got.metadata) == (7, {"c": "3"})
    assert await s.get_range("dst", 0, 7) == b"payload"
    # onto itself (how a metadata-only change is made): content unchanged, metadata replaced
    await s.copy("src", "src", metadata={"a": "9"})
    got = await s.head("src")
    assert (got.metadata, await s.get_range("src", 0, 100)) == ({"a": "9"}, b"payload")
    with pytest.raises(NoSuchKey):
        await s.copy("missing", "dst2")
    assert await s.head("dst2") is None


@trio_test
async def test_copy_if_absent(h):
    """A create-only copy (OSS x-oss-forbid-overwrite): to a free name it copies; onto a taken
    one it raises AlreadyExists and the object there stays."""
    s = h.store
    await s.put_bytes("ca/src", b"ours", {"v": "1"})
    info = await s.copy("ca/src", "ca/new", if_absent=True)
    assert await s.get_range("ca/new", 0, 100) == b"ours" and info.metadata == {"v": "1"}
    theirs = await s.put_bytes("ca/taken", b"theirs", {"v": "2"})
    with pytest.raises(AlreadyExists):
        await s.copy("ca/src", "ca/taken", if_absent=True)
    got = await s.head("ca/taken")
    assert (got.etag, await s.get_range("ca/taken", 0, 100)) == (theirs.etag, b"theirs")


@trio_test
async def test_copy_if_match(h):
    """A copy conditional on the source version the caller knows: the right ETag copies that
    version (COPY and REPLACE), a stale one raises PreconditionFailed and writes nothing."""
    s = h.store
    v1 = await s.put_bytes("cm/src", b"version one", {"v": "1"})
    info = await s.copy("cm/src", "cm/dst", if_match=v1.etag)
    assert (info.size, info.metadata) == (11, {"v": "1"})
    assert await s.get_range("cm/dst", 0, 100) == b"version one"
    info = await s.copy("cm/src", "cm/src", {"v": "1", "mode": "0600"}, if_match=v1.etag.lower())
    assert (await s.head("cm/src")).metadata == {"v": "1", "mode": "0600"} == info.metadata
    v2 = await s.put_bytes("cm/src", b"version two, another writer", {"v": "2"})
    for meta in (None, {"mode": "0644"}):
        with pytest.raises(PreconditionFailed):
            await s.copy("cm/src", "cm/other", meta, if_match=v1.etag)
        with pytest.raises(PreconditionFailed):  # onto itself: the other writer's object stays
            await s.copy("cm/src", "cm/src", meta, if_match=info.etag)
    assert await s.head("cm/other") is None
    got = await s.head("cm/src")
    assert (got.etag, got.metadata) == (v2.etag, {"v": "2"})
    assert await s.get_range("cm/src", 0, 100) == b"version two, another writer"
    with pytest.raises(NoSuchKey):
        await s.copy("cm/missing", "cm/x", if_match=v1.etag)


@trio_test
async def test_copy_of_a_version_the_caller_describes(h):
    """``source`` (the caller's ObjectInfo of version ``if_match``): the copy is that version,
    the result takes the size and metadata given; a stale version raises PreconditionFailed,
    a missing source NoSuchKey, a taken name with ``if_absent`` AlreadyExists; nothing written."""
    s = h.store
    v1 = await s.put_bytes("cs/src", b"version one", {"v": "1"})
    info = await s.copy("cs/src", "cs/dst", if_match=v1.etag, source=v1)
    assert (info.key, info.size, info.metadata) == ("cs/dst", 11, {"v": "1"})
    got = await s.head("cs/dst")
    assert (got.etag, got.size, got.metadata) == (info.etag, 11, {"v": "1"})
    assert await s.get_range("cs/dst", 0, 100) == b"version one"
    with pytest.raises(AlreadyExists):
        await s.copy("cs/src", "cs/dst", if_match=v1.etag, source=v1, if_absent=True)
    v2 = await s.put_bytes("cs/src", b"version two", {"v": "2"})
    with pytest.raises(PreconditionFailed):
        await s.copy("cs/src", "cs/other", if_match=v1.etag, source=v1)
    await s.delete("cs/src")
    with pytest.raises(NoSuchKey):
        await s.copy("cs/src", "cs/other", if_match=v2.etag, source=v2)
    assert await s.head("cs/other") is None
    assert (await s.head("cs/dst")).etag == info.etag


@trio_test
async def test_list_multipart_uploads(h):
    """Unfinished uploads are listed (key, id, initiation time) under a prefix until completed
    or aborted: what recovery needs to abort orphans."""
    s = h.store
    t0 = time.time()
    assert await s.list_multipart_uploads("lu/") == []
    u1 = await s.create_multipart("lu/a", {"m": "1"})
    u2 = await s.create_multipart("lu/b/c", {})
    u3 = await s.create_multipart("other/x", {})
    ups = await s.list_multipart_uploads("lu/")
    assert [(k, u) for k, u, _ in ups] == [("lu/a", u1), ("lu/b/c", u2)]
    assert all(t0 - 2 <= t <= time.time() + 2 for _, _, t in ups)
    assert {u for _, u, _ in await s.list_multipart_uploads()} >= {u1, u2, u3}
    e1 = await s.upload_part("lu/a", u1, 1, b"only part", {"m": "1"})
    await s.complete_multipart("lu/a", u1, [(1, e1)])
    await s.abort_multipart("lu/b/c", u2)
    assert await s.list_multipart_uploads("lu/") == []
    assert [u for _, u, _ in await s.list_multipart_uploads("other/")] == [u3]
    await s.abort_multipart("other/x", u3)


# --------------------------------------------------------------------------------- multipart
@trio_test
async def test_multipart(h):
    s = h.store
    meta = {"plain-size": str(2 * s.min_part_size + 10), "x": "y"}
    uid = await s.create_multipart("big/object", meta)
    assert h.pending_uploads() != []
    p1, p2, p3 = blob(s.min_part_size, 11), blob(s.min_part_size, 12), blob(10, 13)
    e2 = await s.upload_part("big/object", uid, 2, b"wrong" * 30000, meta)
    e2 = await s.upload_part("big/object", uid, 2, p2, meta)  # re-upload replaces the part
    e1 = await s.upload_part("big/object", uid, 1, p1, meta)
    e3 = await s.upload_part("big/object", uid, 3, p3, meta)
    assert await s.head("big/object") is None  # nothing visible before Complete
    info = await s.complete_multipart("big/object", uid, [(1, e1), (2, e2), (3, e3)])
    assert (info.key, info.size) == ("big/object", 2 * s.min_part_size + 10)
    got = await s.head("big/object")
    assert (got.size, got.metadata, got.etag) == (info.size, meta, info.etag)
    assert await s.get_range("big/object", 0, info.size) == p1 + p2 + p3
    assert await s.get_range("big/object", s.min_part_size - 3, s.min_part_size + 3) == p1[-3:] + p2[:3]
    assert h.pending_uploads() == []


@trio_test
@pytest.mark.expect_log(r"ossfuse\.store\.oss: OSS CompleteMultipartUpload")
async def test_multipart_abort_and_errors(h):
    s = h.store
    uid = await s.create_multipart("m", {})
    await s.upload_part("m", uid, 1, blob(1000), {})
    await s.abort_multipart("m", uid)
    assert h.pending_uploads() == []
    await s.abort_multipart("m", uid)  # already gone: fine
    with pytest.raises(NoSuchKey):
        await s.upload_part("m", uid, 2, b"x", {})
    assert await s.head("m") is None
    # a part smaller than min_part_size that is not the last one: EntityTooSmall
    uid = await s.create_multipart("m", {})
    e1 = await s.upload_part("m", uid, 1, b"small", {})
    e2 = await s.upload_part("m", uid, 2, b"last", {})
    with pytest.raises(StoreError) as ei:
        await s.complete_multipart("m", uid, [(1, e1), (2, e2)])
    assert not isinstance(ei.value, NoSuchKey)
    # a part that was never uploaded: InvalidPart
    with pytest.raises(StoreError):
        await s.complete_multipart("m", uid, [(1, e1), (5, e2)])
    await s.abort_multipart("m", uid)
    assert h.pending_uploads() == [] and await s.head("m") is None


# ---------------------------------------------------------------------------------- put_file
@trio_test
async def test_put_file_multi_mib(h, tmp_path):
    s = h.store
    path = tmp_path / "upload.bin"
    data = blob(6 * 1024 * 1024 + 123, 5)
    path.write_bytes(data)
    info = await s.put_file("files/six.bin", str(path), {"k": "v"})
    assert (info.key, info.size, info.metadata) == ("files/six.bin", len(data), {"k": "v"})
    got = await s.head("files/six.bin")
    assert (got.size, got.etag, got.metadata) == (len(data), info.etag, {"k": "v"})
    assert await s.get_range("files/six.bin", 0, len(data)) == data
    assert await s.get_range("files/six.bin", 4_000_000, 4_000_100) == data[4_000_000:4_000_100]


@trio_test
async def test_put_file_may_link_keeps_the_content(h, tmp_path):
    """``may_link``: the object has the file's bytes even after the file's name is gone (a
    linking store keeps the file itself); without it, a later change to the file never shows."""
    s = h.store
    linked, copied = tmp_path / "linked.bin", tmp_path / "copied.bin"
    data = blob(300_000, 9)
    linked.write_bytes(data)
    copied.write_bytes(data)
    await s.put_file("pf/linked", str(linked), {}, may_link=True)
    await s.put_file("pf/copied", str(copied), {})
    os.unlink(linked)
    with open(copied, "r+b") as f:
        f.write(b"changed")
    assert await s.get_range("pf/linked", 0, len(data)) == data
    assert await s.get_range("pf/copied", 0, len(data)) == data


@trio_test
async def test_put_file_if_absent_creates_only(h, tmp_path):
    """``if_absent`` (OSS x-oss-forbid-overwrite): creates a missing key, and on a taken one
    raises AlreadyExists and leaves the object as it was, for a small and a linked file."""
    s = h.store
    path = tmp_path / "new.bin"
    path.write_bytes(b"new bytes")
    info = await s.put_file("ia/fresh", str(path), {"v": "1"}, if_absent=True)
    assert (info.size, (await s.head("ia/fresh")).etag) == (9, info.etag)
    theirs = await s.put_bytes("ia/taken", b"theirs", {"who": "them"})
    for may_link in (False, True):
        with pytest.raises(AlreadyExists):
            await s.put_file("ia/taken", str(path), {"who": "us"}, may_link=may_link, if_absent=True)
    got = await s.head("ia/taken")
    assert (got.etag, got.metadata) == (theirs.etag, {"who": "them"})
    assert await s.get_range("ia/taken", 0, 100) == b"theirs"
    assert (await s.head("ia/fresh")).metadata == {"v": "1"}


@trio_test
async def test_put_bytes_if_absent_creates_only(h):
    """``if_absent`` on put_bytes (what symlink and mknod commit with): creates a missing key;
    on a taken one raises AlreadyExists and leaves the other object's bytes and metadata."""
    s = h.store
    info = await s.put_bytes("ib/fresh", b"ours", {"v": "1"}, if_absent=True)
    assert (await s.head("ib/fresh")).etag == info.etag
    theirs = await s.put_bytes("ib/taken", b"theirs", {"who": "them"})
    with pytest.raises(AlreadyExists):
        await s.put_bytes("ib/taken", b"ours", {"who": "us"}, if_absent=True)
    got = await s.head("ib/taken")
    assert (got.etag, got.metadata) == (theirs.etag, {"who": "them"})
    assert await s.get_range("ib/taken", 0, 100) == b"theirs"


@trio_test
async def test_complete_multipart_if_absent_creates_only(h):
    """``if_absent`` on CompleteMultipartUpload: AlreadyExists when the key was taken after the
    upload started (the other object stays); the upload can still be aborted. Without a
    taken key it completes as usual."""
    s = h.store
    p1, p2 = blob(s.min_part_size, 21), blob(100, 22)
    uid = await s.create_multipart("ia/big", {})
    parts = [(1, await s.upload_part("ia/big", uid, 1, p1, {})), (2, await s.upload_part("ia/big", uid, 2, p2, {}))]
    theirs = await s.put_bytes("ia/big", b"theirs", {})
    with pytest.raises(AlreadyExists):
        await s.complete_multipart("ia/big", uid, parts, if_absent=True)
    assert (await s.head("ia/big")).etag == theirs.etag
    await s.abort_multipart("ia/big", uid)
    assert h.pending_uploads() == []
    uid = await s.create_multipart("ia/big2", {})
    parts = [(1, await s.upload_part("ia/big2", uid, 1, p1, {})), (2, await s.upload_part("ia/big2", uid, 2, p2, {}))]
    info = await s.complete_multipart("ia/big2", uid, parts, if_absent=True)
    assert info.size == len(p1) + len(p2) and await s.get_range("ia/big2", 0, info.size) == p1 + p2


@trio_test
async def test_replaces_is_checked_with_the_write_where_the_store_says_so(h, tmp_path):
    """``replaces`` (the version the caller found at the key): a store that ``checks_replaces``
    (the local one) writes put_file, put_bytes, complete_multipart and copy only over that
    version, and raises DestinationChanged, writing nothing, when another version or no
    object is there; OSS has no such condition and writes anyway (the caller's HEAD is its
    check). Stating the version that is there always writes."""
    s = h.store
    assert s.checks_replaces == (h.kind in ("local", "fault"))
    path = tmp_path / "ours"
    path.write_bytes(b"ours")
    p1, p2 = blob(s.min_part_size, 31), blob(100, 32)
    await s.put_bytes("rp/src", b"source", {})

    async def put_file(key, seen):
        return await s.put_file(key, str(path), {"who": "us"}, replaces=seen)

    async def put_bytes(key, seen):
        return await s.put_bytes(key, b"ours", {"who": "us"}, replaces=seen)

    async def multipart(key, seen):
        uid = await s.create_multipart(key, {"who": "us"})
        parts = [(1, await s.upload_part(key, uid, 1, p1, {})), (2, await s.upload_part(key, uid, 2, p2, {}))]
        try:
            return await s.complete_multipart(key, uid, parts, replaces=seen)
        except DestinationChanged:
            await s.abort_multipart(key, uid)
            raise

    async def copy(key, seen):
        return await s.copy("rp/src", key, {"who": "us"}, replaces=seen)

    for name, write in [("file", put_file), ("bytes", put_bytes), ("multipart", multipart), ("copy", copy)]:
        key = f"rp/{name}"
        seen = await s.put_bytes(key, b"seen", {"who": "seen"})
        theirs = await s.put_bytes(key, b"theirs", {"who": "them"})  # written after our HEAD
        for stated in (seen.etag, "0123456789ABCDEF0123456789ABCDEF"):
            if s.checks_replaces:
                with pytest.raises(DestinationChanged):
                    await write(key, stated)
                got = await s.head(key)
                assert (got.etag, got.metadata) == (theirs.etag, {"who": "them"}), name
            else:
                ours = await write(key, stated)
                assert (await s.head(key)).etag == ours.etag != theirs.etag, name
                theirs = await s.put_bytes(key, b"theirs", {"who": "them"})
        ours = await write(key, theirs.etag)  # the version that is there: written
        got = await s.head(key)
        assert got.etag == ours.etag and got.metadata == {"who": "us"}, name
        await s.delete(key)
        if s.checks_replaces:  # deleted since the HEAD: nothing written either
            with pytest.raises(DestinationChanged):
                await write(key, ours.etag)
            assert await s.head(key) is None, name
    assert h.pending_uploads() == []


@trio_test
async def test_concurrent_requests(h):
    """Many requests at once through the store's bounded thread pool."""
    s = h.store

    async def one(i):
        await s.put_bytes(f"par/{i:03d}", blob(5000 + i, i), {"i": str(i)})
        assert await s.get_range(f"par/{i:03d}", 0, 10_000) == blob(5000 + i, i)

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(one, i)
    _, objs, _ = await list_all(s, "par/", "/", 7)
    assert objs == [f"par/{i:03d}" for i in range(40)]


# ------------------------------------------------------- OSS rules both stores enforce
@trio_test
async def test_key_leading_slash_refused(h, request):
    for k in ("/lead", "\\lead"):
        with pytest.raises(StoreError):
            await h.store.put_bytes(k, b"x", {})


@trio_test
async def test_metadata_names_fold_to_lower_case(h, request):
    await h.store.put_bytes("m", b"x", {"Mixed-Case": "v"})
    assert (await h.store.head("m")).metadata == {"mixed-case": "v"}


@trio_test
@pytest.mark.expect_log(r"ossfuse\.store\.oss: cannot read")
async def test_put_file_unreadable_is_store_error(h, request, tmp_path):
    with pytest.raises(StoreError):
        await h.store.put_file("pf", str(tmp_path / "does-not-exist"), {})


@trio_test
async def test_complete_checks_the_key(h, request):
    uid = await h.store.create_multipart("k1", {})
    e1 = await h.store.upload_part("k1", uid, 1, b"data", {})
    with pytest.raises(NoSuchKey):
        await h.store.complete_multipart("other", uid, [(1, e1)])
    assert await h.store.head("k1") is None and await h.store.head("other") is None
    await h.store.abort_multipart("k1", uid)


@trio_test
async def test_local_store_removes_only_unreferenced_blobs(tmp_path, monkeypatch):
    """remove_orphans deletes blobs and tmp files no object points at (once their inode is older
    than _ORPHAN_AGE, zero here), and keeps every blob an object uses."""
    import ossfuse.store.local as local_mod
    s = LocalStore(str(tmp_path / "bucket"))
    await s.put_bytes("kept", b"kept bytes", {})
    await s.copy("kept", "copy")  # a hard link: two rows, one inode
    orphan_dir = tmp_path / "bucket" / "blobs" / "zz"
    orphan_dir.mkdir(parents=True, exist_ok=True)
    (orphan_dir / "zz-orphan").write_bytes(b"left by a crash")
    (tmp_path / "bucket" / "tmp" / "half-written").write_bytes(b"x")
    assert s.remove_orphans() == 0  # young: a put may be using them
    monkeypatch.setattr(local_mod, "_ORPHAN_AGE", -1.0)
    assert s.remove_orphans() == 2
    assert not (orphan_dir / "zz-orphan").exists()
    assert os.listdir(tmp_path / "bucket" / "tmp") == []
    assert await s.get_range("kept", 0, 100) == b"kept bytes" and await s.get_range("copy", 0, 100) == b"kept bytes"
    await s.aclose()
