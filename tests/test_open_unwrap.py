"""A read-only open of a file whose data key is not cached starts the CMK unwrap and returns;
the first read waits for it (issue 14: the open of a small file was mostly two RSA-3072
private-key operations, awaited before the kernel could even send the read). In-process core
tests (tests/fakes/core.py); the unwrap is held on a gate, so the checks are about order and
counts, never timings."""
from __future__ import annotations

import errno
import logging
import os
import threading

import pytest
import trio
import trio.testing

from ossfuse.fs import FsError


def _gated_unwraps(keyring, gate: threading.Event, events: list[str], calls: list[bool]):
    """Make ``keyring.open_envelope`` wait for ``gate`` (in its worker thread), noting
    "unwrap-start"/"unwrap-end" in ``events`` and each call's ``look_in_key_cache`` in ``calls``."""
    real = keyring.open_envelope

    def gated(wrapped, cmk=None, look_in_key_cache=True):
        calls.append(look_in_key_cache)
        events.append("unwrap-start")
        gate.wait(30)  # the order assertions below fail (not hang) if open waited for this
        try:
            return real(wrapped, cmk, look_in_key_cache) if not look_in_key_cache else real(wrapped, cmk)
        finally:
            events.append("unwrap-end")

    keyring.open_envelope = gated


def test_read_only_open_does_not_wait_for_the_unwrap_and_the_read_does(tmp_path, cmk_path):
    from fakes.core import committed_file, core_filesystem

    data = os.urandom(4096)

    async def main():
        first = core_filesystem(tmp_path / "a", cmk_path)
        await committed_file(first, "f", data)
        first.close()
        # another cache dir: no data key cached, the CMK must unwrap (a cold remount)
        fs = core_filesystem(tmp_path / "b", cmk_path, store=first.store)
        gate, events, calls = threading.Event(), [], []
        _gated_unwraps(fs.files.keyring, gate, events, calls)
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await fs.lookup(fs.get(1), "f")
            h = await fs.open(node, os.O_RDONLY)
            events.append("open-returned")
            await trio.testing.wait_all_tasks_blocked()
            assert "unwrap-end" not in events

            async def read():
                got.append(await fs.read(h, 0, 8192))
                events.append("read-returned")
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # the read waits for the unwrap
            gate.set()
        assert got == [data]
        assert sorted(events) == ["open-returned", "read-returned", "unwrap-end", "unwrap-start"]
        assert events.index("open-returned") < events.index("unwrap-end") < events.index("read-returned")
        # one unwrap, and the key cache file was not searched twice (the open asked it on the loop)
        assert calls == [False]
        # a second open of the version needs no unwrap
        h2 = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h2, 0, 10) == data[:10]
        assert calls == [False]
        await fs.release(h2)
        await fs.release(h)
        fs.close()
        await first.store.aclose()

    trio.run(main)


def test_opens_for_writing_and_without_a_supervisor_still_unwrap_before_returning(tmp_path, cmk_path):
    """Opening for writing checks the key before it returns (a mount must not replace what it
    cannot read), and so does any open where no task supervisor runs background work."""
    from fakes.core import committed_file, core_filesystem

    async def main():
        first = core_filesystem(tmp_path / "a", cmk_path)
        await committed_file(first, "f", b"x" * 100)
        await committed_file(first, "g", b"y" * 100)
        first.close()
        fs = core_filesystem(tmp_path / "b", cmk_path, store=first.store)
        gate, events, calls = threading.Event(), [], []
        gate.set()
        _gated_unwraps(fs.files.keyring, gate, events, calls)
        root = fs.get(1)
        h = await fs.open(await fs.lookup(root, "f"), os.O_RDONLY)  # no supervisor: waits
        events.append("open-returned")
        assert events == ["unwrap-start", "unwrap-end", "open-returned"]
        await fs.release(h)
        events.clear()
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            h = await fs.open(await fs.lookup(root, "g"), os.O_RDWR)
            events.append("open-returned")
            fs._nursery = None
        assert events == ["unwrap-start", "unwrap-end", "open-returned"]
        await fs.release(h)
        fs.close()
        await first.store.aclose()

    trio.run(main)


@pytest.mark.expect_log(r"ossfuse\.fs\.files: cannot read 'pre/f': CMK 'k' cannot unwrap the data key")
def test_a_background_unwrap_that_fails_is_eio_at_the_read_with_one_log_line(tmp_path, cmk_path, other_cmk_path,
                                                                             caplog):
    from fakes.core import committed_file, core_filesystem

    async def main():
        first = core_filesystem(tmp_path / "a", cmk_path)
        await committed_file(first, "f", b"secret")
        first.close()
        fs = core_filesystem(tmp_path / "b", other_cmk_path, store=first.store)  # a wrong key
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            node = await fs.lookup(fs.get(1), "f")
            h = await fs.open(node, os.O_RDONLY)  # the CMK's answer is not awaited here
            for _ in range(3):  # the kernel retries a failed read
                with pytest.raises(FsError) as e:
                    await fs.read(h, 0, 100)
                assert e.value.errno == errno.EIO
            await fs.release(h)
            fs._nursery = None
        fs.close()
        await first.store.aclose()

    with caplog.at_level(logging.INFO, logger="ossfuse"):
        trio.run(main)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in lines] == [
        "cannot read 'pre/f': CMK 'k' cannot unwrap the data key (wrong CMK or corrupt key header)"]


def test_an_iv_that_does_not_unwrap_is_named_as_the_start_header(cmk_path):
    """A trial: a truncated ``client-side-encryption-start`` (the wrapped IV) was reported as
    "wrong CMK or corrupt key header". The data key unwraps, so the message names the IV."""
    from ossfuse import envelope as env
    from ossfuse.config import CmkConfig
    from ossfuse.keyring import RsaCmk
    cmk = RsaCmk(CmkConfig("k", "rsa", cmk_path))
    key, iv = os.urandom(32), os.urandom(8) + bytes(8)
    assert cmk.unwrap_pair(cmk.wrap(key), cmk.wrap(iv)) == (key, iv)
    with pytest.raises(env.EnvelopeError, match=r"CMK 'k' unwraps the data key but not the IV \(a corrupt "
                                                 r"client-side-encryption-start header\)"):
        cmk.unwrap_pair(cmk.wrap(key), cmk.wrap(iv)[:-5])
    with pytest.raises(env.EnvelopeError, match=r"cannot unwrap the data key \(wrong CMK or corrupt key header\)"):
        cmk.unwrap_pair(cmk.wrap(key)[:-5], cmk.wrap(iv))
