"""Putting this mount's version back where a request in doubt landed late over it
(``Commit.put_back``, store/indoubt.py ``InDoubt.check_due``; break trial BT10 1: the late
object was only said, and the newer save was lost from the bucket).

Core tests over tests/fakes (a LocalStore that reads through the block cache as OSS does);
the late landing is another body put straight into the bucket. Over real HTTP with a killed
daemon: ``test_oss_faults.py::test_an_upload_a_killed_daemon_sent_that_lands_late_is_said_or_undone``."""
from __future__ import annotations

import errno
import logging
import os
import time

import pytest
import trio

from fakes.core import committed_file, core_filesystem, read_file
from ossfuse.fs import FsError
from ossfuse.fs.copying import copy_object
from ossfuse.store.base import ObjectInfo, StoreError
from ossfuse.store.indoubt import DELETED, PUT_BACK_ELSEWHERE, REPLACED_SINCE, InDoubt


async def _from_bucket(fs, name: str) -> bytes:
    """``name``'s content read from the bucket (its cached blocks dropped first)."""
    node = await fs.lookup(fs.get(1), name)
    fs.cache.drop(node.version.key, node.version.etag)
    return await read_file(fs, name)


async def _stop(fs) -> None:
    fs.close()
    await fs.store.aclose()


async def _cached_file(fs, name: str, data: bytes):
    """A file ``name`` written, uploaded and read (every block in the block cache); its node."""
    node = await committed_file(fs, name, data)
    assert await read_file(fs, name) == data
    return node


async def _lands_late_over(fs, name: str) -> ObjectInfo:
    """An older body lands at ``name``'s key, and the store takes it for this mount's own
    late request there (``ObjectStore.landed_over_ours``, as OSS's in-doubt bookkeeping
    would); the object now there."""
    key = "pre/" + name
    late = await fs.store.inner.put_bytes(key, b"an older body, landed late", {})
    fs.store.landed_over_ours = lambda k, info: k == key and info.etag == late.etag
    return late


def _fs(tmp_path, cmk_path):
    fs = core_filesystem(tmp_path, cmk_path, multipart_threshold=1 << 20, part_size=256 << 10)
    fs.store.local_disk = False  # as on OSS: an upload's file stays as cached blocks
    return fs


@pytest.mark.parametrize("size", [0, 5000, 3 << 20])  # empty, one PUT, multipart
def test_a_version_replaced_by_a_late_request_is_put_back_from_the_cache_as_it_was(tmp_path, cmk_path, size):
    data = os.urandom(size)

    async def main():
        fs = _fs(tmp_path, cmk_path)
        node = await committed_file(fs, "f", data)
        etag = node.version.etag
        # in the cache: the upload's own file (adopted), or, where this store linked that file
        # into the bucket (a small one), the blocks a read fetched and checked
        assert await read_file(fs, "f") == data
        late = await fs.store.inner.put_bytes("pre/f", b"an older body, landed late", {})
        assert await fs.put_back("pre/f", etag, late) is None
        now = await fs.store.inner.head("pre/f")
        # the same object as before; this store names each write anew (OSS: the same ETag), and
        # the mount follows it
        assert now.etag == node.version.etag != etag and now.size == node.version.size
        assert now.metadata == node.version.metadata
        assert await _from_bucket(fs, "f") == data
        await _stop(fs)

    trio.run(main)


def test_a_version_is_not_put_back_when_the_mount_moved_on_or_lost_its_blocks(tmp_path, cmk_path):
    async def main():
        fs = _fs(tmp_path, cmk_path)
        data = os.urandom(10_000)
        node = await committed_file(fs, "f", data)
        etag = node.version.etag
        assert await read_file(fs, "f") == data  # (all in the cache)
        late = await fs.store.inner.put_bytes("pre/f", b"late", {})
        assert await fs.put_back("pre/other", etag, late) == (
            "this mount no longer holds that file (moved, removed, forgotten by the kernel, or not looked up since this "
            "mount started)")
        fs.cache.drop("pre/f", etag)  # evicted
        assert await fs.put_back("pre/f", etag, late) == "not every block of it is in this machine's cache"
        await committed_file(fs, "f", b"saved again")  # (over the late object: the mount's own save)
        assert await fs.put_back("pre/f", etag, late) == REPLACED_SINCE  # (nothing to undo)
        assert await _from_bucket(fs, "f") == b"saved again"
        await fs.store.inner.put_bytes("pre/f", b"another client's", {})  # (not seen by the mount yet)
        assert await fs.put_back("pre/f", etag, late) == "this mount has another version there now"
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: 'a': an upload sent before the daemon's crash took effect "
                        r"late, over this mount's later version E3; that version is put back",
                        r"ERROR ossfuse\.store\.indoubt: 'b': .* the bucket now holds that request's version E2; not "
                        r"repaired: not every block",
                        r"ERROR ossfuse\.store\.indoubt: 'c': .*putting that version back failed: refused; tried "
                        r"again at each check",
                        r"WARNING ossfuse\.store\.indoubt: 'd': a PUT this mount gave up on at .* took effect late, "
                        r"after this mount had moved or removed that file; its object there \(version E5\) is deleted "
                        r"again",
                        r"ERROR ossfuse\.store\.indoubt: 'f': a CopyObject this mount gave up on at .* took effect "
                        r"late, over this mount's delete; the bucket now holds that request's version E6$")
def test_check_due_puts_back_what_it_can_and_says_what_it_cannot(caplog):
    d = InDoubt()
    for key in "abce":
        d.sent_before_a_crash(key, "W2")
        d.wrote(key, "E3", "W3")  # a newer save
    d.given_up("PUT", "d", "E5")
    d.wrote("d", DELETED)  # this mount's rm since
    d.given_up("CopyObject", "f", "E6")
    d.wrote("f", DELETED)
    put, deleted = [], []

    async def head(key):
        if key in "df":
            return ObjectInfo(key, 1, {"d": "E5", "f": "E6"}[key], 0.0, {})
        return ObjectInfo(key, 1, "E2", 0.0, {"client-side-encryption-key": "W2"})

    async def put_back(key, etag, now_there):
        put.append((key, etag, now_there.etag))
        if key == "c":
            raise StoreError("refused")
        return {"a": None, "e": REPLACED_SINCE}.get(key, "not every block of it is in this machine's cache")

    async def delete(key, etag):
        deleted.append((key, etag))
    with caplog.at_level(logging.INFO):
        assert trio.run(d.check_due, head, delete, put_back) == 6
    assert put == [("a", "E3", "E2"), ("b", "E3", "E2"), ("c", "E3", "E2"), ("e", "E3", "E2")]
    # this mount's newer save replaced the late object since: nothing to undo, one INFO line
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("'e'")] == [
        ("INFO", "'e': an upload sent before the daemon's crash took effect late, over this mount's later version "
                 "E3; a newer save of this mount has replaced it since")]
    # over this mount's delete: its own upload is deleted again (break trial BT16 F2: a removed
    # file came back); a copy is said, not undone (a rename's late copy may be a file's only one)
    assert deleted == [("d", "E5")]
    assert d.due() == ["c"]  # (the store refused the put-back: the next check tries again)


def test_a_look_at_the_file_between_the_landing_and_the_check_keeps_this_mounts_version(tmp_path, cmk_path):
    """Break trial BT12: a `stat`, `open`, `chmod` or `mv` between the late landing and the
    next check HEADed the file and took the late object for another client's version; the
    check then had nothing to put back, and a save after it went to a conflict copy while the
    name kept the older version. A HEAD that finds this mount's own late request
    (``ObjectStore.landed_over_ours``) now changes nothing, and an upload replaces it."""
    data = os.urandom(10_000)

    async def main():
        fs = _fs(tmp_path, cmk_path)
        node = await _cached_file(fs, "f", data)
        v3 = node.version
        late = await _lands_late_over(fs, "f")
        await fs.resolver.revalidate(node, listing=False)  # (a stat after attr_timeout)
        assert node.version is v3
        # a chmod's copy meanwhile is refused (ESTALE, the kernel tries again), at INFO: not
        # "another client changed it" (BT13: a WARNING, though the chmod then succeeded)
        src = ObjectInfo("pre/f", v3.size, v3.etag, 0.0, v3.metadata)
        with pytest.raises(FsError) as e:
            await copy_object(fs.store, fs.uploader, src, "pre/f", v3.metadata)
        assert e.value.errno == errno.ESTALE
        assert await read_file(fs, "f") == data
        assert await fs.put_back("pre/f", v3.etag, late) is None
        # a save meeting the late object replaces it: no conflict copy
        await _lands_late_over(fs, "f")  # (another)
        h = await fs.open(node, os.O_WRONLY | os.O_TRUNC)
        await fs.write(h, 0, b"v4")
        await fs.flush(h)
        await fs.release(h)
        assert await fs.drain() == 0
        assert fs.commit.conflicts.count == 0
        assert [o.key for o in (await fs.store.inner.list("pre/", delimiter=None)).objects] == ["pre/f"]
        assert await _from_bucket(fs, "f") == b"v4"
        await _stop(fs)

    trio.run(main)


@pytest.mark.parametrize("looked_up", [True, False])
def test_a_file_the_kernel_forgot_is_put_back_as_last_known(tmp_path, cmk_path, looked_up):
    """Break trial BT13: after `echo 2 > /proc/sys/vm/drop_caches` the kernel forgot the file,
    its node went, and the next lookup made a new node of the late object: `cat` read the
    older version, and the check could put nothing back (the newer save was lost). The lookup
    now gives the node as last known (``InodeTable.restore``), and the check puts it back.
    Not looked up since (a new-user trial's full suite, twice: another test's drop_caches),
    the unmount's last check said "not repaired: this mount no longer holds that file"; the
    put-back takes the node as last known too (``InodeTable.last_dropped``)."""
    data = os.urandom(10_000)

    async def main():
        fs = _fs(tmp_path, cmk_path)
        node = await _cached_file(fs, "f", data)
        v3 = node.version
        node.lookups = 0
        fs.inodes.maybe_drop(node)  # (the kernel's FORGET)
        assert "f" not in fs.inodes.by_path
        late = await _lands_late_over(fs, "f")
        if looked_up:
            found = await fs.lookup(fs.get(1), "f")
            assert found is node and found.version is v3
            assert await read_file(fs, "f") == data
        assert await fs.put_back("pre/f", v3.etag, late) is None
        assert ("f" in fs.inodes.by_path) is looked_up  # (else left as the kernel left it)
        assert await _from_bucket(fs, "f") == data
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"ERROR ossfuse\.store\.indoubt: 'k': an upload sent before the daemon's crash took effect late, "
                        r"over this mount's later version E3; putting that version back failed: refused; tried again",
                        r"WARNING ossfuse\.store\.indoubt: 'k': .* that version is put back")
def test_a_put_back_that_fails_is_tried_again_at_the_next_check_and_a_look_wakes_it(caplog):
    d = InDoubt()
    d.sent_before_a_crash("k", "W2")
    d.wrote("k", "E3", "W3")
    late = ObjectInfo("k", 1, "E2", 0.0, {"client-side-encryption-key": "W2"})
    assert not d.landed_over("k", ObjectInfo("k", 1, "E3", 0.0, {"client-side-encryption-key": "W3"}))
    assert not d.landed_over("k", ObjectInfo("k", 1, "E7", 0.0, {"client-side-encryption-key": "THEIRS"}))
    assert not d._wake.is_set()
    assert d.landed_over("k", late) and d._wake.is_set()  # (watch checks at once)
    tries = []

    async def head(key):
        return late

    async def put_back(key, etag, now_there):
        tries.append(etag)
        if len(tries) < 3:
            raise StoreError("refused")
        return None
    with caplog.at_level(logging.DEBUG, logger="ossfuse.store.indoubt"):
        for _ in range(3):
            assert trio.run(d.check_due, head, None, put_back) == 1
    assert tries == ["E3"] * 3 and d.due() == []
    failed = [r for r in caplog.records if "putting that version back failed" in r.getMessage()]
    assert [r.levelname for r in failed] == ["ERROR", "DEBUG"]  # said once


@pytest.mark.expect_log(r"ERROR ossfuse\.store\.indoubt: 'k': .* putting that version back failed: no answer; tried again",
                        r"WARNING ossfuse\.store\.indoubt: 'k': this mount's version E3 is in the bucket again, over "
                        r"what an upload sent before the daemon's crash had left there")
def test_a_put_back_given_up_on_that_lands_says_so_at_the_next_check(caplog):
    """BT15b M2: a put-back whose own request got no answer, then landed: the next check finds
    this mount's version there and says so (the ERROR was the last word)."""
    d = InDoubt()
    d.sent_before_a_crash("k", "W2")
    d.wrote("k", "E3", "W3")
    there = [ObjectInfo("k", 1, "E2", 0.0, {"client-side-encryption-key": "W2"})]  # the late request's

    async def head(key):
        return there[0]

    async def put_back(key, etag, now_there):
        there[0] = ObjectInfo("k", 1, "E3", 0.0, {"client-side-encryption-key": "W3"})  # it lands...
        raise StoreError("no answer")  # ...but its answer never comes
    assert trio.run(d.check_due, head, None, put_back) == 1
    assert d.due() == ["k"]
    assert trio.run(d.check_due, head, None, put_back) == 0
    assert d.due() == []
    said = [r.levelname for r in caplog.records if r.name == "ossfuse.store.indoubt"]
    assert said == ["ERROR", "WARNING"]


def test_two_put_backs_of_one_key_at_once_put_it_back_once(tmp_path, cmk_path):
    """Break trial BT14: a lookup's look for a rename's late copy, the watch's, and the in-doubt
    check each put the same version back (three PUTs, three WARNING lines). One put-back of a
    key runs at a time; one that comes meanwhile waits for it and changes nothing."""
    data = os.urandom(10_000)

    async def main():
        fs = _fs(tmp_path, cmk_path)
        etag = (await _cached_file(fs, "f", data)).version.etag
        late = await fs.store.inner.put_bytes("pre/f", b"late", {})
        fs.store.delay("put_file", 0.5, key="pre/f")
        puts = fs.store.counters.calls["put_file"]
        results = []

        async def put_back():
            results.append(await fs.put_back("pre/f", etag, late))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_back)
            nursery.start_soon(put_back)
        assert sorted(map(str, results)) == sorted(["None", PUT_BACK_ELSEWHERE])
        assert fs.store.counters.calls["put_file"] == puts + 1
        assert await _from_bucket(fs, "f") == data
        await _stop(fs)

    trio.run(main)


def test_a_put_back_waiting_for_an_upload_of_a_newer_version_says_it_replaced_the_late_one(tmp_path, cmk_path):
    """Break trial BT14: a put-back that waited for the file's upload lock while an fsync
    uploaded a newer version found that version current after it, and said in an ERROR line
    that the late object was not repaired ("another version there now"), though the newer
    upload had replaced it. It says so at INFO now (``REPLACED_SINCE``)."""
    data = os.urandom(10_000)

    async def main():
        fs = _fs(tmp_path, cmk_path)
        node = await _cached_file(fs, "f", data)
        etag = node.version.etag
        late = await _lands_late_over(fs, "f")
        fs.store.delay("put_file", 0.5, key="pre/f", count=1)
        results = []

        async def save_again():
            h = await fs.open(node, os.O_RDWR)
            await fs.write(h, 0, b"newer")
            await fs.fsync(h)
            await fs.release(h)

        async def put_back():
            with trio.fail_after(5):
                while not fs.commit.upload_running(node):
                    await trio.sleep(0.01)
            results.append(await fs.put_back("pre/f", etag, late))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(save_again)
            nursery.start_soon(put_back)
        assert results == [REPLACED_SINCE]
        assert await _from_bucket(fs, "f") == b"newer" + data[5:]
        await _stop(fs)

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: .*indoubt\.log, line (4|5|6): not a request in doubt",
                        r"WARNING ossfuse\.store\.indoubt: '(k|over)': a PUT an earlier run of this mount gave up on "
                        r"\(no answer\) took effect late, after this mount had moved or removed that file; its object "
                        r"there \(version E(1|2)\) is deleted again",
                        r"WARNING ossfuse\.store\.indoubt: 'j': a PUT an earlier run .* over this mount's later "
                        r"version E6; that version is put back",
                        r"ERROR ossfuse\.store\.indoubt: 'c': a CopyObject an earlier run of this mount gave up on "
                        r"\(no answer\) took effect late, over this mount's delete")
def test_requests_in_doubt_outlive_the_run_that_gave_up_on_them(tmp_path):
    """Break trial BT16 F1: the requests given up on were in memory only, so after a `kill -9`
    a late PUT at a name the user had removed the file from stayed there. ``keep_in`` notes
    them and the later writes to their keys in a file the next run takes over: its check
    deletes that stale upload again (not a copy's: a rename's may be a file's only copy), puts
    this mount's later version back, and forgets what was dealt with. Dropped: a request
    whose window ended with nothing of this mount's to compare (one with a later write gets
    one look: BT16b F6, it may have landed while no mount ran), and lines that are not
    requests (damaged, not UTF-8, an endless ``until``: BT16b F5, F7; a mount failed on the
    first), silently a last line cut by the crash."""
    path = str(tmp_path / "indoubt.log")
    first = InDoubt()
    assert first.keep_in(path) == 0
    first.given_up("PUT", "k", "E1")
    first.wrote("k", DELETED)  # (the file removed: ObjectStore.vacated)
    first.given_up("PUT", "j", "E5")
    first.wrote("j", "E6", "W6")  # a newer version since
    first.given_up("CopyObject", "c", "E7")
    first.wrote("c", DELETED)
    first.given_up("PUT", "same", "E8")
    first.wrote("same", "E8")  # (the same version again: harmless)
    first.given_up("PUT", "settled", "E9")
    first.wrote("settled", DELETED)
    first.landed("settled", "E9")  # (dealt with)
    ended = InDoubt(window=-1.0)  # requests whose window is over
    ended.keep_in(str(tmp_path / "ended.log"))
    ended.given_up("PUT", "old", "E0")  # nothing written there since: dropped
    ended.given_up("PUT", "over", "E2")
    ended.wrote("over", DELETED)  # removed since: one more look (it may have landed meanwhile)
    with open(path) as f:
        lines = f.read().splitlines()
    lines[3:3] = ["{damaged", "\udcff\udcfe not UTF-8",
                  '{"op": "PUT", "key": "inf", "effect": "X", "until": Infinity, "at": 1}']
    with open(str(tmp_path / "ended.log")) as f:
        lines += f.read().splitlines()
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + '\n{"op": "PUT", "key": "cut"').encode("utf-8", "surrogateescape"))
    second = InDoubt()
    assert second.keep_in(path) == 5  # k, j, c, same, over
    assert sorted(second.due()) == ["c", "j", "k", "over"] and second.has("same") and not second.has("old")
    there = {"k": ObjectInfo("k", 1, "E1", 0.0, {}), "j": ObjectInfo("j", 1, "E5", 0.0, {}),
             "c": ObjectInfo("c", 1, "E7", 0.0, {}), "over": ObjectInfo("over", 1, "E2", 0.0, {})}
    deleted, put_back = [], []

    async def head(key):
        return there[key]

    async def delete(key, etag):
        deleted.append((key, etag))

    async def put(key, etag, now_there):
        put_back.append((key, etag))
    assert trio.run(second.check_due, head, delete, put) == 4
    assert sorted(deleted) == [("k", "E1"), ("over", "E2")] and put_back == [("j", "E6")]  # (c: said, not undone)
    assert second.due() == []
    third = InDoubt()  # what was dealt with is not watched again
    assert third.keep_in(path) == 1 and third.has("same") and third.due() == []


@pytest.mark.expect_log(r"ERROR ossfuse\.store\.indoubt: 'h': a PUT this mount gave up on .* deleting its object there "
                        r"\(version E1\) failed: 503; tried again at each check",
                        r"WARNING ossfuse\.store\.indoubt: 'h': a PUT .* \(version E1\) is deleted again")
def test_a_late_upload_whose_delete_fails_and_its_twin_are_each_undone_also_across_runs(tmp_path):
    """Break trial BT16b F1: the request was noted as dealt with before its DELETE, which
    failed, so neither the next check nor the next mount looked again, and the removed file
    stayed; F2: an upload and its retry (the same ciphertext: one ETag) were both forgotten
    at the first landing, and the second brought the file back. Each landing is one request,
    noted as dealt with once undone."""
    path = str(tmp_path / "indoubt.log")
    d = InDoubt()
    d.keep_in(path)
    d.given_up("PUT", "h", "E1")
    d.given_up("PUT", "h", "E1")  # its retry, given up on too
    d.wrote("h", DELETED)
    there: list = [ObjectInfo("h", 1, "E1", 0.0, {})]
    refuse = [True]

    async def head(key):
        return there[0]

    async def delete(key, etag):
        if refuse[0]:
            raise StoreError("503")
        there[0] = None
    assert trio.run(d.check_due, head, delete) == 1  # the DELETE fails
    assert d.due() == ["h"]
    again = InDoubt()  # a crash now: the next run still has both
    assert again.keep_in(path) == 2
    refuse[0] = False
    assert trio.run(d.check_due, head, delete) == 1 and there[0] is None  # deleted: one request dealt with
    assert d.due() == ["h"]  # the retry may land too
    there[0] = ObjectInfo("h", 1, "E1", 0.0, {})  # it does
    assert trio.run(d.check_due, head, delete) == 1 and there[0] is None
    assert d.due() == [] and InDoubt().keep_in(path) == 0


def test_requests_taken_over_are_watched_when_their_file_cannot_be_rewritten(tmp_path):
    """Break trial BT16b F4: the earlier run's requests were read, then the rewrite failed
    (a full or read-only cache disk), and they went unwatched."""
    path = str(tmp_path / "indoubt.log")
    first = InDoubt()
    first.keep_in(path)
    first.given_up("PUT", "k", "E1")
    first.wrote("k", DELETED)
    os.mkdir(path + ".new")  # (the rewrite fails)
    second = InDoubt()
    with pytest.raises(OSError):
        second.keep_in(path)
    assert second.due() == ["k"]


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: 'h': a PUT .* \(version E1\) is deleted again")
def test_two_checks_at_once_undo_one_landing_once():
    """The watch's check and the unmount's last one ran at once: each HEADed, found the late
    upload, took one of its twin requests (an upload and its retry: one ETag) and sent its own
    DELETE, which OSS carries out unconditionally: the second could meet a write made between
    them. One check at a time: one DELETE per landing."""
    d = InDoubt()
    d.given_up("PUT", "h", "E1")
    d.given_up("PUT", "h", "E1")  # its retry
    d.wrote("h", DELETED)
    there: list = [ObjectInfo("h", 1, "E1", 0.0, {})]
    deleted = []

    async def head(key):
        await trio.sleep(0.01)
        return there[0]

    async def delete(key, etag):
        await trio.sleep(0.01)
        deleted.append((key, etag))
        there[0] = None

    async def both():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.check_due, head, delete)
            nursery.start_soon(d.check_due, head, delete)
    trio.run(both)
    assert deleted == [("h", "E1")] and d.due() == ["h"]  # (the retry may still land)


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: 'r': a PUT .* \(version E1\) is deleted again")
def test_what_a_check_cannot_tell_or_must_not_race_is_left_alone(tmp_path):
    """Break trial BT16c. Every empty object has one ETag: an empty late upload cannot be told
    from another client's empty file, which a check deleted (and put back over). A write of
    this mount's to the key in flight when the check would delete its stale upload there (a
    file re-created at the name) was deleted by that DELETE: the check leaves it for its next
    look, and a write starting during the DELETE waits for it."""
    from ossfuse.store.indoubt import EMPTY_ETAG
    d = InDoubt()
    d.given_up("PUT", "e", EMPTY_ETAG)
    d.wrote("e", DELETED)
    deleted = []

    async def head(key):
        return ObjectInfo(key, 0, EMPTY_ETAG.lower(), 0.0, {"owner": "another client"})

    async def delete(key, etag):
        deleted.append((key, etag))
    assert trio.run(d.check_due, head, delete) == 0 and deleted == []

    d = InDoubt()
    d.given_up("PUT", "r", "E1")
    d.wrote("r", DELETED)
    order = []

    async def head_r(key):
        return ObjectInfo(key, 1, "E1", 0.0, {})

    async def slow_delete(key, etag):
        order.append("delete sent")
        await trio.sleep(0.2)
        order.append("delete done")

    async def user_writes():
        await trio.sleep(0.05)  # (the DELETE is in flight)
        async with d.writing("r"):
            order.append("write")

    async def both():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.check_due, head_r, slow_delete)
            nursery.start_soon(user_writes)
    trio.run(both)
    assert order == ["delete sent", "delete done", "write"]

    async def in_flight():  # a write in flight: no DELETE now
        async with d.writing("r"):
            d.given_up("PUT", "r", "E1")
            d.wrote("r", DELETED)
            return await d.check_due(head_r, slow_delete)
    order.clear()
    assert trio.run(in_flight) == 1 and order == [] and d.due() == ["r"]


@pytest.mark.expect_log(r"WARNING ossfuse\.store\.indoubt: 'q': an upload sent before the daemon's crash took effect "
                        r"late, after this mount had moved or removed that file; its object there \(version E4\) is "
                        r"deleted again")
def test_an_upload_sent_before_a_crash_stays_watched_after_the_next_crash(tmp_path):
    """Break trial BT16c: a file's PUT in flight at a `kill -9`; the next run uploaded the
    recovered file, the user removed it, and a second crash came: the journal no longer named
    it, so nothing watched the first PUT, which brought the file back. Such a request is kept
    in ``indoubt.log`` too. A request whose window ended while no mount ran gets one look,
    once: not at every mount (BT16c), and the unmount does not call it still in doubt."""
    path = str(tmp_path / "indoubt.log")
    first = InDoubt()
    first.keep_in(path)
    first.sent_before_a_crash("q", "W4")
    first.wrote("q", DELETED)
    second = InDoubt()
    assert second.keep_in(path) == 1 and second.due() == ["q"]
    second.sent_before_a_crash("q", "W4")  # (the journal naming it again: one request)
    deleted = []

    async def head(key):
        return ObjectInfo(key, 1, "E4", 0.0, {"client-side-encryption-key": "W4"})

    async def delete(key, etag):
        deleted.append((key, etag))
    assert trio.run(second.check_due, head, delete) == 1 and deleted == [("q", "E4")]
    assert InDoubt().keep_in(path) == 0

    ended = InDoubt(window=-1.0)
    ended.keep_in(str(tmp_path / "ended.log"))
    ended.given_up("PUT", "w", "E5")
    ended.wrote("w", DELETED)
    looked = InDoubt()
    assert looked.keep_in(str(tmp_path / "ended.log")) == 1 and looked.due() == ["w"] and looked.pending() == []
    from ossfuse.store.indoubt import read_kept
    assert read_kept(str(tmp_path / "ended.log"), time.time() + 3600) == []  # looked at: not again
