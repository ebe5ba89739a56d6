"""The fault-injecting store's own injections (tests/fakes/fault_store.py): errors before the
call, lost responses after it, latency, foreign writers, hooks, and the request counts."""
from __future__ import annotations

import functools
import os
import sys

import pytest
import trio
import trio.testing

sys.path.insert(0, os.path.dirname(__file__))

from fakes.fault_store import FaultStore  # noqa: E402

from ossfuse.store.base import NoSuchKey, PreconditionFailed, StoreError, StoreUnavailable  # noqa: E402
from ossfuse.store.local import LocalStore  # noqa: E402


def trio_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))
    return wrapper


@pytest.fixture
def fs(tmp_path):
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))
    yield store
    trio.run(store.aclose)


@trio_test
async def test_fail_before_the_call_by_op_key_and_count(fs):
    rule = fs.fail("put_bytes", key="dir/*", error="temporary", count=2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable) as ei:
            await fs.put_bytes("dir/a", b"x", {})
        assert ei.value.temporary and ei.value.key == "dir/a" and "injected" in str(ei.value)
    assert await fs.inner.head("dir/a") is None  # nothing reached the bucket
    await fs.put_bytes("other", b"y", {})  # another key: untouched by the rule
    await fs.put_bytes("dir/a", b"z", {})  # the count is used up
    assert await fs.inner.get_range("dir/a", 0, 9) == b"z"
    assert rule.hits == 2 and fs.counts["put_bytes"] == 4
    assert [k for k, op, _ in fs.injected] == ["fail", "fail"]


@trio_test
async def test_error_kinds(fs):
    await fs.put_bytes("k", b"data", {})
    fs.fail("head", error="permanent")
    fs.fail("head", error="no_such_key")
    fs.fail("get_range", error="precondition")
    fs.fail("delete", error=lambda op, key: OSError(f"custom {op} {key}"))
    fs.fail("list", error=StoreUnavailable)
    with pytest.raises(StoreError) as ei:
        await fs.head("k")
    assert type(ei.value) is StoreError and ei.value.temporary is False
    with pytest.raises(NoSuchKey):
        await fs.head("k")
    with pytest.raises(PreconditionFailed):
        await fs.get_range("k", 0, 4)
    with pytest.raises(OSError, match="custom delete k"):
        await fs.delete("k")
    with pytest.raises(StoreUnavailable):
        await fs.list("")
    assert (await fs.head("k")).size == 4  # all rules used up: normal again
    with pytest.raises(ValueError):
        fs.fail("head", error="sometimes")
    with pytest.raises(ValueError):
        fs.fail("no_such_op")


@trio_test
async def test_lost_response_is_applied(fs):
    """The operation happens, the caller gets an error: a PUT, a copy, a delete."""
    fs.lose_response(("put_bytes", "copy", "delete"), count=None)
    with pytest.raises(StoreUnavailable):
        await fs.put_bytes("a", b"applied", {"m": "1"})
    assert await fs.inner.get_range("a", 0, 99) == b"applied"
    with pytest.raises(StoreUnavailable):
        await fs.copy("a", "b")
    assert (await fs.inner.head("b")).metadata == {"m": "1"}
    with pytest.raises(StoreUnavailable):
        await fs.delete("a")
    assert await fs.inner.head("a") is None
    assert [k for k, _, _ in fs.injected] == ["lose"] * 3


@trio_test
async def test_copy_matches_source_or_destination(fs):
    await fs.put_bytes("src", b"s", {})
    fs.fail("copy", key="dst*", count=1)
    with pytest.raises(StoreUnavailable):
        await fs.copy("src", "dst1")
    fs.fail("copy", key="src", count=1)
    with pytest.raises(StoreUnavailable):
        await fs.copy("src", "elsewhere")
    await fs.copy("src", "dst2")
    assert fs.calls[-3:] == [("copy", ("src", "dst1")), ("copy", ("src", "elsewhere")), ("copy", ("src", "dst2"))]


@trio_test
async def test_foreign_writer_replaces_between_calls(fs):
    """Another client rewrites the object just before our next copy: a copy conditional on
    the version we knew fails, and the other client's version is what the bucket has."""
    ours = await fs.put_bytes("f", b"our version", {"mode": "0644"})
    fs.replace("f", b"their edit", before="copy")
    with pytest.raises(PreconditionFailed):
        await fs.copy("f", "f", {"mode": "0600"}, if_match=ours.etag)
    now = await fs.head("f")
    assert now.etag != ours.etag and now.metadata == {"mode": "0644"}
    assert await fs.get_range("f", 0, 99) == b"their edit"
    # a metadata-only foreign change (another client's chmod) keeps the bytes
    fs.replace("f", metadata={"mode": "0400"}, before="head")
    got = await fs.head("f")
    assert got.metadata == {"mode": "0400"} and await fs.get_range("f", 0, 99) == b"their edit"
    assert ("replace", "copy", ("f",)) in fs.injected


@trio_test
async def test_hooks_before_and_after(fs):
    seen = []

    async def note(inner, op, keys):
        seen.append((op, keys, await inner.head("h")))

    fs.hook("put_bytes", note, when="before", count=1)
    fs.hook("put_bytes", note, when="after", count=1)
    await fs.put_bytes("h", b"1", {})
    assert [(op, keys, info is None) for op, keys, info in seen] == [("put_bytes", ("h",), True),
                                                                    ("put_bytes", ("h",), False)]
    with pytest.raises(ValueError):
        fs.hook("head", note, when="during")


def test_latency_uses_trio_time(tmp_path):
    """delay() sleeps in trio time (a MockClock makes it instant) and adds up per call."""
    fs = FaultStore(LocalStore(str(tmp_path / "bucket")))
    fs.delay("head", 5.0, count=2)
    fs.delay(("head", "list"), 1.0, key="k*")

    async def main():
        t0 = trio.current_time()
        await fs.head("k1")  # 5 + 1
        assert trio.current_time() - t0 == pytest.approx(6.0)
        await fs.head("zz")  # 5 only
        assert trio.current_time() - t0 == pytest.approx(11.0)
        await fs.head("k2")  # the 5 s rule is used up
        assert trio.current_time() - t0 == pytest.approx(12.0)
        await fs.list("k")
        assert trio.current_time() - t0 == pytest.approx(13.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert fs.counts == {"head": 3, "list": 1}


@trio_test
async def test_clear_disarms_and_counts_stay(fs):
    fs.fail("*", count=None)
    with pytest.raises(StoreUnavailable):
        await fs.head("x")
    fs.clear()
    assert await fs.head("x") is None
    assert fs.counts["head"] == 2
    fs.reset_counts()
    assert fs.counts == {} and fs.calls == []


def test_capabilities_follow_the_inner_store(tmp_path):
    inner = LocalStore(str(tmp_path / "bucket"), max_copy_size=1234)
    fs = FaultStore(inner)
    assert (fs.local_disk, fs.listing_has_metadata, fs.max_copy_size, fs.min_part_size) == \
        (True, True, 1234, inner.min_part_size)
