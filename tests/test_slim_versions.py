"""Slim versions (issue 14, ≤ 1 KiB per cached inode): a listed or HEADed encrypted file that
was never opened drops its user metadata (the envelope's wrapped key and IV) once it falls out
of the mount's recent versions (``Resolver.recent``, fs/model.py ``RecentVersions``), and fetches
it by HEAD, for that very ETag only, when an open, truncate, chmod or rename needs it.
In-process core tests over a FaultStore(LocalStore) (tests/fakes/core.py)."""
from __future__ import annotations

import errno
import os
import stat
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from fakes.core import committed_file, core_filesystem, core_store, read_node  # noqa: E402
from ossfuse import envelope as env  # noqa: E402
from ossfuse.fs import FsError  # noqa: E402
from ossfuse.fs.model import MetadataNotHeld  # noqa: E402

FOREIGN = {"x-sdk-origin": "java-oss-sdk 3.17", "owner-team": "payments", "checksum-sha1": "0" * 40}


def _content(i: int) -> bytes:
    return (b"file %d: " % i) * 300


async def _bucket(tmp_path, cmk_path, n: int = 4):
    """n committed files f0..f{n-1} written by another mount, each also carrying FOREIGN
    x-oss-meta-* fields (as a foreign SDK's objects do); the shared store."""
    store = core_store(tmp_path)
    writer = core_filesystem(tmp_path / "writer", cmk_path, store=store)
    for i in range(n):
        await committed_file(writer, f"f{i}", _content(i))
        key = f"pre/f{i}"
        info = await store.inner.head(key)
        await store.inner.copy(key, key, metadata={**info.metadata, **FOREIGN}, if_match=info.etag)
    writer.close()
    return store


def _reader(tmp_path, cmk_path, store, recent: int = 1):
    fs = core_filesystem(tmp_path / "reader", cmk_path, store=store, attr_timeout=60.0)
    fs.resolver.recent.limit = recent  # a tiny LRU: every looked-up version but the last is slim
    return fs


async def _replace(tmp_path, cmk_path, store, name: str, data: bytes) -> None:
    """Another client (its own mount) rewrites ``name``: a new data key and a new ETag."""
    other = core_filesystem(tmp_path / "other", cmk_path, store=store)
    node = await other.lookup(other.get(1), name)
    h = await other.open(node, os.O_WRONLY | os.O_TRUNC)
    await other.write(h, 0, data)
    await other.flush(h)
    await other.release(h)
    assert await other.drain() == 0
    other.close()



def test_an_evicted_version_fetches_its_envelope_once_at_open(tmp_path, cmk_path):
    async def main():
        store = await _bucket(tmp_path, cmk_path)
        fs = _reader(tmp_path, cmk_path, store)
        root = fs.get(1)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(4)]
        assert [n.version.held for n in nodes] == [False, False, False, True]
        with pytest.raises(MetadataNotHeld):
            _ = nodes[0].version.metadata  # never an empty answer
        assert stat.S_IMODE(nodes[0].mode) == 0o600 and nodes[0].size == len(_content(0))  # attributes stay

        store.counts.clear()
        assert await read_node(fs, nodes[3]) == _content(3)  # still held: no HEAD
        assert store.counts["head"] == 0, store.counts
        slim = nodes[0].version
        assert await read_node(fs, nodes[0]) == _content(0)
        assert store.counts["head"] == 1, store.counts  # its envelope, once
        assert nodes[0].version is slim and slim.held and slim.envelope is not None
        store.counts.clear()
        for i in (1, 2, 3):  # opened versions keep their envelope: never slimmed again
            await fs.lookup(root, f"f{i}")
        assert await read_node(fs, nodes[0]) == _content(0)
        assert store.counts["head"] == 0, store.counts
        fs.close()

    trio.run(main)


def test_a_slim_version_fills_from_the_head_that_revalidates_it(tmp_path, cmk_path):
    """A stale slim node's open costs the one HEAD it always did, which also brings the envelope."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 2)
        fs = _reader(tmp_path, cmk_path, store)
        fs.resolver.attr_timeout = 0.0
        nodes = [await fs.lookup(fs.get(1), f"f{i}") for i in range(2)]
        assert not nodes[0].version.held
        store.counts.clear()
        assert await read_node(fs, nodes[0]) == _content(0)
        assert store.counts["head"] == 1, store.counts
        fs.close()

    trio.run(main)


def test_an_object_replaced_after_listing_is_opened_as_the_new_version(tmp_path, cmk_path):
    """Another writer replaces a slim file between listing and open: the HEAD at open sees the
    new ETag and the node takes that version with its own envelope; the old version's metadata
    is never combined with the new object (the read is the new plaintext, not garbage)."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 2)
        fs = _reader(tmp_path, cmk_path, store)
        nodes = [await fs.lookup(fs.get(1), f"f{i}") for i in range(2)]
        old = nodes[0].version
        assert not old.held
        new = b"replaced by another client " * 40
        await _replace(tmp_path, cmk_path, store, "f0", new)
        assert await read_node(fs, nodes[0]) == new
        assert nodes[0].version is not old and nodes[0].version.etag != old.etag
        assert not old.held  # the old version was never filled with the new object's metadata
        fs.close()

    trio.run(main)


@pytest.mark.expect_log(r"cannot (replace|change the attributes of) 'pre/f0': this mount knows version")
def test_truncate_and_chmod_of_a_replaced_slim_version_fail_stale(tmp_path, cmk_path):
    """truncate and chmod act on the version the node holds: when the bucket has another one the
    HEAD for the envelope finds out, nothing is written (ESTALE, one ERROR line) and the node is
    read anew at its next lookup."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 2)
        fs = _reader(tmp_path, cmk_path, store)
        root = fs.get(1)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(2)]
        assert not nodes[0].version.held
        new = b"theirs " * 50
        await _replace(tmp_path, cmk_path, store, "f0", new)
        theirs = await store.inner.head("pre/f0")
        for change in ({"size": 3}, {"mode": 0o644}):
            with pytest.raises(FsError) as e:
                await fs.setattr(nodes[0], **change)
            assert e.value.errno == errno.ESTALE
            assert nodes[0].checked_at == 0.0
            nodes[0].checked_at = 1e18  # keep the node as it is for the second change (attr cache)
        now = await store.inner.head("pre/f0")
        assert now.etag == theirs.etag and now.metadata == theirs.metadata  # nothing written
        nodes[0].checked_at = 0.0
        assert await fs.lookup(root, "f0") is nodes[0]
        assert await read_node(fs, nodes[0]) == new
        fs.close()

    trio.run(main)


def test_chmod_and_rename_of_slim_versions_keep_every_foreign_field(tmp_path, cmk_path):
    async def main():
        store = await _bucket(tmp_path, cmk_path, 4)
        before = {i: (await store.inner.head(f"pre/f{i}")).metadata for i in range(4)}
        fs = _reader(tmp_path, cmk_path, store)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(4)]
        assert not any(n.version.held for n in nodes[:3])

        await fs.setattr(nodes[0], mode=0o640)  # chmod: CopyObject REPLACE with all fields
        meta = (await store.inner.head("pre/f0")).metadata
        assert meta["mode"] == str(stat.S_IFREG | 0o640)
        assert {k: meta[k] for k in FOREIGN} == FOREIGN
        for k in before[0]:
            if k.startswith(env.CSE_PREFIX):
                assert meta[k] == before[0][k], k  # the envelope headers are copied unchanged

        await fs.rename(root, "f1", d, "g1", 0)  # a file's rename: CopyObject COPY
        assert (await store.inner.head("pre/d/g1")).metadata == before[1]
        assert await store.inner.head("pre/f1") is None
        assert not nodes[1].version.held and nodes[1].version.key == "pre/d/g1"

        await fs.setattr(nodes[1], uid=7)  # chmod of the renamed slim version: its key, its ETag
        meta = (await store.inner.head("pre/d/g1")).metadata
        assert meta["uid"] == "7" and {k: meta[k] for k in FOREIGN} == FOREIGN
        assert meta[env.H_KEY] == before[1][env.H_KEY]

        await fs.rename(root, "f2", root, "h2", 0)
        e = await fs.mkdir(root, "e", 0o755, 1, 2)
        await fs.rename(root, "d", e, "d", 0)  # a directory's rename moves g1 (held now) too
        assert (await store.inner.head("pre/h2")).metadata == before[2]
        assert {k: v for k, v in (await store.inner.head("pre/e/d/g1")).metadata.items()
                if k in FOREIGN or k.startswith(env.CSE_PREFIX)} == \
            {k: v for k, v in before[1].items() if k in FOREIGN or k.startswith(env.CSE_PREFIX)}

        for i, n in enumerate(nodes):  # every one reads its own plaintext
            assert await read_node(fs, n) == _content(i), i
        fs.close()

        fresh = core_filesystem(tmp_path / "fresh", cmk_path, store=store)  # and so does another mount
        for path, i in (("f0", 0), ("e/d/g1", 1), ("h2", 2), ("f3", 3)):
            node = fresh.get(1)
            for part in path.split("/"):
                node = await fresh.lookup(node, part)
            assert await read_node(fresh, node) == _content(i), path
        fresh.close()

    trio.run(main)


def test_recent_versions_bound_the_held_envelopes(tmp_path, cmk_path):
    """Only the last ``limit`` versions looked up keep their metadata."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 6)
        fs = _reader(tmp_path, cmk_path, store, recent=3)
        nodes = [await fs.lookup(fs.get(1), f"f{i}") for i in range(6)]
        assert [n.version.held for n in nodes] == [False] * 3 + [True] * 3
        assert len(fs.resolver.recent) == 3
        fs.close()

    trio.run(main)


def test_offline_a_slim_version_cannot_be_opened_and_an_opened_one_can(tmp_path, cmk_path):
    """Offline, a file whose envelope was dropped gives EIO at open (nothing guessed, one INFO
    line); a file opened before keeps its envelope and reads from the block cache."""
    from ossfuse.store.health import StoreOffline

    async def main():
        store = await _bucket(tmp_path, cmk_path, 3)
        fs = _reader(tmp_path, cmk_path, store)
        root = fs.get(1)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(3)]
        assert await read_node(fs, nodes[0]) == _content(0)  # held again, opened: pinned, blocks cached
        for i in (1, 2):
            await fs.lookup(root, f"f{i}")
        assert nodes[0].version.held and not nodes[1].version.held
        store.fail("*", error=lambda op, key: StoreOffline(f"injected: {op} {key!r}", key=key), count=None)
        with pytest.raises(FsError) as e:
            await fs.open(nodes[1], os.O_RDONLY)
        assert e.value.errno == errno.EIO
        assert await read_node(fs, nodes[0]) == _content(0)
        store.clear()
        fs.close()

    trio.run(main)


def test_a_streamed_rename_of_a_slim_version_heads_it_for_every_field(tmp_path, cmk_path):
    """Above the store's copy limit a rename streams the ciphertext through this client (a new
    PUT): a slim source is HEADed first, for that ETag, so the copy still carries every field."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 2)
        before = (await store.inner.head("pre/f0")).metadata
        fs = _reader(tmp_path, cmk_path, store)
        root = fs.get(1)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(2)]
        assert not nodes[0].version.held
        store.max_copy_size = 1000  # bytes: f0 (2,400) streams
        store.counts.clear()
        await fs.rename(root, "f0", root, "g0", 0)
        assert store.counts["copy"] == 0 and store.counts["put_bytes"] == 1, store.counts
        assert (await store.inner.head("pre/g0")).metadata == before
        assert await read_node(fs, nodes[0]) == _content(0)
        fs.close()

    trio.run(main)


def test_cat_after_ls_of_more_files_than_the_recent_ones_heads_only_the_slim_ones(tmp_path, cmk_path):
    """``cat`` in listing order after ``ls -l`` of more files than ``limit``: the versions it
    opens take no place among the recent ones (opened: held for good), so the ``limit`` files
    looked up last open without a HEAD instead of being pushed out one by one."""
    async def main():
        store = await _bucket(tmp_path, cmk_path, 6)
        fs = _reader(tmp_path, cmk_path, store, recent=3)
        root = fs.get(1)
        nodes = [await fs.lookup(root, f"f{i}") for i in range(6)]
        store.counts.clear()
        for i, n in enumerate(nodes):
            assert await read_node(fs, n) == _content(i)
        assert store.counts["head"] == 3, store.counts
        assert all(n.version.held for n in nodes)
        fs.close()

    trio.run(main)


def test_which_versions_slim_and_what_fill_gives_back():
    """Only an encrypted, never-parsed version without an envelope or rdev is slimmed; fill
    gives back the very strings; a slim version's copy stays slim, a rewrite of an opened one
    keeps its parsed envelope."""
    import base64

    from ossfuse.fs.model import UNPARSED, Version

    def enc(**extra):
        return {env.H_KEY: base64.b64encode(os.urandom(384)).decode(),
                env.H_START: base64.b64encode(os.urandom(384)).decode(),
                env.H_CEK_ALG: "AES/CTR/NoPadding", env.H_WRAP_ALG: "RSA/NONE/PKCS1Padding",
                "mode": "33188", **FOREIGN, **extra}

    meta = enc()
    v = Version("k", "E1", 5, meta, UNPARSED)
    assert v.slim() and not v.held and v.slim() is False
    with pytest.raises(MetadataNotHeld):
        _ = v.wrapped
    moved = v.copied_as("k2", "E2")
    assert not moved.held and (moved.key, moved.etag, moved.size) == ("k2", "E2", 5)
    v.fill(meta)
    assert v.held and v.metadata == meta and list(v.metadata) == list(meta)
    assert isinstance(v.wrapped, env.WrappedEnvelope) and not v.slim()  # parsed: opened, kept
    again = v.rewritten("E3", {**meta, "mode": "33152"})
    assert again.wrapped is v.wrapped and not again.slim()

    assert not Version("p", "E", 1, {"mode": "33188"}, UNPARSED).slim()  # plaintext: nothing big
    assert not Version("d", "E", 0, enc(rdev="259"), UNPARSED).slim()  # rdev is read at getattr
    assert not Version("o", "E", 1, enc(), UNPARSED, envelope=object()).slim()  # made or opened here
