"""The local data-key cache (keyring.KeyCache, issue 14): an object this machine wrote or read
before opens without RSA work, in a later keyring too; a changed object (new envelope, new
ETag) is never opened with a stale key; another CMK finds nothing and fails as without the
cache; a tampered row is dropped; and the file shows no data key."""
from __future__ import annotations

import os
import sqlite3
import stat

import pytest
import trio

from ossfuse import envelope as env
from ossfuse.config import CmkConfig, EncryptionConfig
from ossfuse.keyring import Keyring, RsaCmk

from test_fs_units import _filesystem


def _keyring(cmk_path: str, cache: str | None) -> Keyring:
    k = Keyring(EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)))
    if cache:
        k.attach_key_cache(cache)
    return k


@pytest.fixture
def no_rsa(monkeypatch):
    """Count RSA private-key work; fail it when ``calls['forbid']`` is set."""
    calls = {"n": 0, "forbid": False}
    real_pair, real_one = RsaCmk.unwrap_pair, RsaCmk.unwrap

    def pair(self, *a):
        calls["n"] += 1
        assert not calls["forbid"], "RSA unwrap despite a cached key"
        return real_pair(self, *a)

    def one(self, *a):
        calls["n"] += 1
        assert not calls["forbid"], "RSA unwrap despite a cached key"
        return real_one(self, *a)
    monkeypatch.setattr(RsaCmk, "unwrap_pair", pair)
    monkeypatch.setattr(RsaCmk, "unwrap", one)
    return calls


def test_a_key_made_or_unwrapped_here_opens_later_without_rsa(tmp_path, cmk_path, no_rsa):
    cache = str(tmp_path / "datakeys.sqlite")
    writer = _keyring(cmk_path, cache)
    made = writer.new_envelope("f")
    writer.close()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    with open(cache, "rb") as f:
        raw = f.read() + (open(cache + "-wal", "rb").read() if os.path.exists(cache + "-wal") else b"")
    assert made.data_key not in raw and made.wrapped.wrapped_key not in raw  # sealed, and no wrapped key
    # a new keyring (a later mount) over the same file: no RSA for what was made here
    no_rsa["forbid"] = True
    reader = _keyring(cmk_path, cache)
    got = reader.open_envelope(made.wrapped)
    assert (got.data_key, got.iv) == (made.data_key, made.iv)
    # an envelope made elsewhere: unwrapped once with RSA, then cached
    other = _keyring(cmk_path, None).new_envelope("g")
    no_rsa["forbid"] = False
    assert reader.open_envelope(other.wrapped).data_key == other.data_key
    assert no_rsa["n"] == 1
    reader.close()
    no_rsa["forbid"] = True
    again = _keyring(cmk_path, cache)
    assert again.open_envelope(other.wrapped).data_key == other.data_key
    again.close()


def test_another_cmk_finds_nothing_and_fails_as_without_a_cache(tmp_path, cmk_path, other_cmk_path):
    cache = str(tmp_path / "datakeys.sqlite")
    mine = _keyring(cmk_path, cache)
    made = mine.new_envelope("f")
    mine.close()
    theirs = _keyring(other_cmk_path, cache)  # same cache file, a different private key
    with pytest.raises(env.EnvelopeError):
        theirs.open_envelope(made.wrapped)
    theirs.close()


@pytest.mark.expect_log(r"data-key cache .*: a row does not authenticate")
def test_a_tampered_row_is_dropped_and_the_cmk_unwraps(tmp_path, cmk_path, no_rsa):
    cache = str(tmp_path / "datakeys.sqlite")
    k = _keyring(cmk_path, cache)
    made = k.new_envelope("f")
    k.close()
    db = sqlite3.connect(cache)
    db.execute("UPDATE keys SET sealed = zeroblob(length(sealed))")
    db.commit()
    db.close()
    k = _keyring(cmk_path, cache)
    got = k.open_envelope(made.wrapped)
    assert (got.data_key, got.iv) == (made.data_key, made.iv) and no_rsa["n"] == 1
    k.close()


@pytest.mark.expect_log(r"data-key cache .* is unreadable")
def test_an_unreadable_cache_file_is_replaced(tmp_path, cmk_path):
    cache = str(tmp_path / "datakeys.sqlite")
    with open(cache, "wb") as f:
        f.write(b"not a database" * 100)
    k = _keyring(cmk_path, cache)
    made = k.new_envelope("f")
    assert k.open_envelope(made.wrapped).data_key == made.data_key
    k.close()


@pytest.mark.expect_log(r"data-key cache .* is damaged \(database disk image is malformed\): starting a new one",
                        r"attribute cache .* is damaged \(database disk image is malformed\): starting a new one")
def test_a_cache_file_damaged_past_its_first_page_is_replaced_once(tmp_path, cmk_path, caplog):
    """A trial: datakeys.sqlite with damaged middle pages opened fine, then every open logged
    "cannot read: database disk image is malformed" (60 lines for one sha256sum -c), for ever.
    The first query that meets the damage replaces the file (one INFO line); the key is
    unwrapped by the CMK, and the new file keeps keys again. The attribute cache likewise."""
    import logging
    from ossfuse.attrcache import AttrCache
    cache = str(tmp_path / "datakeys.sqlite")
    writer = _keyring(cmk_path, cache)
    made = [writer.new_envelope(f"f{i}") for i in range(3000)]  # many pages
    writer.close()
    attrs = AttrCache(str(tmp_path / "attrs.sqlite"))
    attrs.put_many([(f"k{i}", "E", 1, 1.0, {"mode": "33188"}) for i in range(3000)])
    attrs.close()
    for path in (cache, str(tmp_path / "attrs.sqlite")):
        size = os.path.getsize(path)
        assert size > 16 * 4096 and not os.path.exists(path + "-wal")
        with open(path, "r+b") as f:  # the first page (the schema) stays: the open succeeds
            f.seek(2 * 4096)
            f.write(os.urandom(size - 2 * 4096))
    with caplog.at_level(logging.INFO, logger="ossfuse"):
        reader = _keyring(cmk_path, cache)
        for m in made[:5]:
            assert reader.open_envelope(m.wrapped).data_key == m.data_key
        again = reader.new_envelope("g")
        reader.close()
        reader = _keyring(cmk_path, cache)
        with_rsa = RsaCmk.unwrap_pair
        try:
            RsaCmk.unwrap_pair = None  # the new file holds "g": no RSA
            assert reader.open_envelope(again.wrapped).data_key == again.data_key
        finally:
            RsaCmk.unwrap_pair = with_rsa
        reader.close()
        attrs = AttrCache(str(tmp_path / "attrs.sqlite"))
        for _ in range(3):
            assert attrs.get_many([f"k{i}" for i in range(0, 3000, 7)]) == {}
        attrs.put_many([("k1", "E", 1, 1.0, {"mode": "33188"})])
        assert attrs.get_many(["k1"])["k1"].etag == "E"
        attrs.close()
    lines = [r.getMessage() for r in caplog.records if "cache" in r.getMessage()]
    assert len(lines) == 2 and all("is damaged" in ln for ln in lines), lines


def test_a_changed_object_is_not_opened_with_a_stale_key(tmp_path, cmk_path):
    """Two mounts' keyrings share one cache file; the file is rewritten by the second (a new
    envelope and ETag): the first mount's next open reads the new bytes, not garbage."""
    async def main():
        cache = str(tmp_path / "datakeys.sqlite")
        fs = _filesystem(tmp_path, cmk_path)
        fs.keyring.attach_key_cache(cache)
        node, h = await fs.create(fs.get(1), "f", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"first version")
        await fs.flush(h)
        await fs.release(h)
        await fs.drain()
        first = await fs.store.head("pre/f")
        fs.close()
        fs.keyring.close()
        await fs.store.aclose()

        other = _filesystem(tmp_path, cmk_path)  # no cache: another machine
        node = await other.lookup(other.get(1), "f")
        h = await other.open(node, os.O_WRONLY | os.O_TRUNC)
        await other.write(h, 0, b"second, longer version")
        await other.flush(h)
        await other.release(h)
        await other.drain()
        second = await other.store.head("pre/f")
        assert second.etag != first.etag
        assert second.metadata[env.H_KEY] != first.metadata[env.H_KEY]
        other.close()
        await other.store.aclose()

        fs = _filesystem(tmp_path, cmk_path)
        fs.keyring.attach_key_cache(cache)
        node = await fs.lookup(fs.get(1), "f")
        h = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h, 0, 100) == b"second, longer version"
        await fs.release(h)
        fs.close()
        fs.keyring.close()
        await fs.store.aclose()

    trio.run(main)


def test_cached_envelope_never_unwraps_and_still_checks_the_cmk(tmp_path, cmk_path, no_rsa):
    """Files.open_version asks cached_envelope on the event loop first: it must never do CMK
    work (None when nothing is cached) and must still refuse an object no CMK matches."""
    from ossfuse.keyring import KeyMissing
    cache = str(tmp_path / "datakeys.sqlite")
    elsewhere = _keyring(cmk_path, None).new_envelope("g")
    k = _keyring(cmk_path, cache)
    no_rsa["forbid"] = True
    assert k.cached_envelope(elsewhere.wrapped) is None
    no_rsa["forbid"] = False
    k.open_envelope(elsewhere.wrapped)
    no_rsa["forbid"] = True
    k.close()
    k = _keyring(cmk_path, cache)  # disk cache only
    assert k.cached_envelope(elsewhere.wrapped).data_key == elsewhere.data_key
    foreign = env.WrappedEnvelope(elsewhere.wrapped.wrapped_key, elsewhere.wrapped.wrapped_iv,
                                  elsewhere.wrapped.wrap_alg, {"owner": "someone else"}, '{"owner":"someone else"}')
    with pytest.raises(KeyMissing):
        k.cached_envelope(foreign)
    k.close()


def test_a_cache_that_cannot_store_keys_says_so_once_until_it_can_again(tmp_path, cmk_path, monkeypatch, caplog):
    """A trial's full cache disk logged "cannot store a key" six times in one millisecond (the
    keys made ahead): one INFO line while it keeps failing, again after it stored one."""
    import logging
    k = _keyring(cmk_path, str(tmp_path / "keys.sqlite"))
    real_put = type(k.key_cache).put
    full = {"on": True}

    def put(self, *a):
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_put(self, *a)

    monkeypatch.setattr(type(k.key_cache), "put", put)

    def said() -> int:
        return sum("cannot store a key" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)

    with caplog.at_level(logging.INFO, logger="ossfuse"):
        for _ in range(3):
            k.new_envelope("f")
        assert said() == 1
        full["on"] = False
        k.new_envelope("f")
        full["on"] = True
        k.new_envelope("f")
        k.new_envelope("f")
        assert said() == 2


def test_a_cache_database_keeps_its_write_ahead_log_small(tmp_path):
    """New-user trial NU7: the attribute and data-key caches' WAL files grew to SQLite's 4 MiB
    default each and stayed so (8 MiB of a 48 MB cache disk). They are checkpointed every
    ~1 MiB and cut back to 1 MiB."""
    from ossfuse.sqlitecache import open_cache_db
    path = str(tmp_path / "t.sqlite")
    db = open_cache_db(path, "CREATE TABLE IF NOT EXISTS t (k BLOB PRIMARY KEY, v BLOB)", "test cache")
    for _ in range(20_000):  # ~7 MB of rows
        db.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (os.urandom(16), os.urandom(300)))
    assert os.path.getsize(path) > 5 << 20
    assert os.path.getsize(path + "-wal") <= 1 << 20
    db.close()
