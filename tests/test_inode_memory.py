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


@pytest.mark.expect_log(r"cannot open 'pre/b': envelope key/start header is not base64")
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
