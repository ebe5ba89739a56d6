"""What a cached inode holds (issue 14: bytes per inode): a listed file's envelope is parsed
only when it is opened, an unopened node shares one empty handle set, and the local store's
metadata names are one string each across rows. Sizes are measured by bench/inode_memory.py;
these tests pin the layout that makes them small and that it still reads correctly."""
from __future__ import annotations

import errno
import os

import pytest
import trio

from ossfuse import envelope as env
from ossfuse.fs import FsError
from ossfuse.fs.model import UNPARSED

from test_fs_units import _filesystem


@pytest.mark.expect_log(r"cannot open 'pre/b': envelope header x-oss-meta-client-side-encryption-key is not base64")
def test_listed_file_parses_its_envelope_only_when_opened(tmp_path, cmk_path):
    async def main():
        fs = _filesystem(tmp_path, cmk_path)
        root = fs.get(1)
        for name, body in (("a", b"alpha"), ("b", b"bravo")):
            node, h = await fs.create(root, name, 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, body)
            await fs.flush(h)
            await fs.release(h)
        await fs.drain()
        # a corrupt envelope on "b": base64 that is not
        db = getattr(fs.store, "inner", fs.store)._db()  # the LocalStore under the test wrapper
        meta = db.execute("SELECT meta FROM objects WHERE key='pre/b'").fetchone()[0]
        db.execute("UPDATE objects SET meta=? WHERE key='pre/b'",
                   (meta.replace('"' + env.H_KEY + '": "', '"' + env.H_KEY + '": "%%'),))
        fs.close()
        await fs.store.aclose()

        fs = _filesystem(tmp_path, cmk_path)  # a new mount: nodes come from the listing
        root = fs.get(1)
        dh = fs.opendir(root)
        listed = {name: fs.remember(node) for _, name, node in await fs.readdir_entries(dh, 0)}
        fs.releasedir(dh.fh)
        a, b = listed["a"], listed["b"]
        assert a.version._wrapped is UNPARSED and b.version._wrapped is UNPARSED
        assert a.handles == frozenset() and not isinstance(a.handles, set)
        h = await fs.open(a, os.O_RDONLY)
        assert isinstance(a.version.wrapped, env.WrappedEnvelope)
        assert a.handles == {h}
        assert await fs.read(h, 0, 100) == b"alpha"
        await fs.release(h)
        assert a.handles == frozenset()
        with pytest.raises(FsError) as e:
            await fs.open(b, os.O_RDONLY)
        assert e.value.errno == errno.EIO
        assert isinstance(b.version.wrapped, env.EnvelopeError)
        names = [list(n.version.metadata) for n in (a, b)]
        shared = [k for k in names[0] if k in names[1]]
        assert shared and all(k1 is k2 for k1 in names[0] for k2 in names[1] if k1 == k2)
        fs.close()
        await fs.store.aclose()

    trio.run(main)


def test_version_metadata_is_held_packed_and_read_back_exactly():
    """Base64 values (the wrapped key and IV) are held as their bytes, short values interned,
    names shared across versions; reading gives back every string exactly, in order, also
    base64 that is not canonical (no padding, a line break) and values that only look like it."""
    import base64

    from ossfuse.fs.model import Version

    wrapped_key = base64.b64encode(os.urandom(384)).decode()
    meta = {env.H_KEY: wrapped_key, env.H_START: base64.b64encode(os.urandom(384)).decode(),
            "mode": "33188", "mtime": "1700000000.123456789",
            "odd": base64.b64encode(os.urandom(48)).decode().rstrip("=") + "\n" + "A" * 60,
            "unpadded": base64.b64encode(os.urandom(50)).decode().rstrip("="),
            "matdesc": '{"a": "' + "b" * 80 + '"}'}
    v1 = Version("k1", "e1", 10, dict(meta), UNPARSED)
    v2 = Version("k2", "e2", 10, dict(meta, mtime="1700000001"), UNPARSED)
    assert v1.metadata == meta and list(v1.metadata) == list(meta)
    assert isinstance(v1._values[0], bytes) and len(v1._values[0]) == 384  # not 512 characters
    assert all(isinstance(x, str) for x in v1._values[2:])
    assert v1._names is v2._names  # one tuple of names for both
    got = v1.metadata
    got["mode"] = "0"
    assert v1.metadata["mode"] == "33188"  # a copy
    v1.metadata = {"mode": "16877"}
    assert v1.metadata == {"mode": "16877"}
