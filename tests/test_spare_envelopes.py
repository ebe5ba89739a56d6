"""Envelopes made ahead (Keyring.make_spares / take_spare, issue 14): a create takes a data
key and IV made earlier in a background thread instead of waiting for RSA work in a thread of
its own. Each one is served once, is wrapped by the CMK the path's rules pick, and unwraps to
the key and IV that encrypted the file; a KMS CMK gets none (its calls fail their own create)."""
from __future__ import annotations

import os

import trio

from ossfuse.config import CmkConfig, EncryptionConfig, RuleConfig
from ossfuse.keyring import Keyring

from fakes.core import UID, GID, core_filesystem


def _keyring(cmk_path: str, other_cmk_path: str | None = None) -> Keyring:
    cmks = (CmkConfig("k", "rsa", cmk_path),)
    rules: tuple[RuleConfig, ...] = ()
    if other_cmk_path:
        cmks += (CmkConfig("o", "rsa", other_cmk_path),)
        rules = (RuleConfig("secret/", "o"),)
    return Keyring(EncryptionConfig(encrypt_with="k", cmks=cmks, rules=rules))


def test_spares_are_served_once_wrapped_by_the_rule_cmk_and_unwrap(cmk_path, other_cmk_path):
    k = _keyring(cmk_path, other_cmk_path)
    assert k.take_spare("a/f") is None and k.wants_spares("a/f")
    assert k.make_spares("a/f") == Keyring.SPARE_ENVELOPES
    assert not k.wants_spares("a/f") and k.make_spares("a/f") == 0  # full
    assert k.take_spare("secret/f") is None and k.wants_spares("secret/f")  # the other CMK has none yet
    taken = [k.take_spare("a/f") for _ in range(Keyring.SPARE_ENVELOPES)]
    assert k.take_spare("a/f") is None  # each served once
    assert all(e is not None and e.cmk_id == "k" for e in taken)
    assert len({e.data_key for e in taken}) == len({e.iv for e in taken}) == Keyring.SPARE_ENVELOPES
    reader = _keyring(cmk_path, other_cmk_path)  # a keyring that never saw them: real unwraps
    for e in taken[:3]:
        got = reader.open_envelope(e.wrapped)
        assert (got.data_key, got.iv) == (e.data_key, e.iv)
    k.make_spares("secret/x")
    e = k.new_envelope("secret/y")  # new_envelope serves a ready one too
    assert e.cmk_id == "o" and len(k._spares["o"]) == Keyring.SPARE_ENVELOPES - 1
    assert reader.open_envelope(e.wrapped, reader.cmks["o"]).data_key == e.data_key  # no matdesc: name the CMK


def test_no_spares_for_a_cmk_whose_data_keys_come_from_a_service(cmk_path):
    k = _keyring(cmk_path)
    k.default.new_data_key = lambda: (os.urandom(32), b"wrapped")  # type: ignore[attr-defined]  # as KmsCmk
    assert not k.wants_spares("f") and k.make_spares("f") == 0 and k.take_spare("f") is None


def test_creates_take_envelopes_made_ahead_and_their_files_read_back(tmp_path, cmk_path, monkeypatch):
    made_in = []  # thread of each envelope made
    real = Keyring._make_envelope

    def counted(self, cmk):
        made_in.append(trio.lowlevel.in_trio_run())
        return real(self, cmk)
    monkeypatch.setattr(Keyring, "_make_envelope", counted)

    async def main():
        fs = core_filesystem(tmp_path, cmk_path)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            root = fs.get(1)
            envelopes = []
            for i in range(6):
                node, h = await fs.create(root, f"f{i}", 0o644, os.O_RDWR, UID, GID)
                await fs.write(h, 0, b"content %d" % i * 100)
                envelopes.append(node.staged.envelope)
                await fs.release(h)
                with trio.fail_after(10):
                    while fs.files._making_spares:  # the refill runs in its thread
                        await trio.sleep(0.001)
            assert await fs.drain() == 0
            nursery.cancel_scope.cancel()
        # the first create made its own (in a thread); the refill made SPARE_ENVELOPES at once
        # (in its thread), and the next five creates took them: nothing made on the event loop
        assert made_in.count(True) == 0
        assert len(made_in) == 1 + Keyring.SPARE_ENVELOPES
        assert len(fs.keyring._spares["k"]) == Keyring.SPARE_ENVELOPES - 5
        assert len({e.data_key for e in envelopes}) == 6
        fs.close()
        fs2 = core_filesystem(tmp_path, cmk_path, store=fs.store)  # a remount reads them back
        for i in range(6):
            node = await fs2.lookup(fs2.get(1), f"f{i}")
            h = await fs2.open(node, os.O_RDONLY)
            assert await fs2.read(h, 0, 4096) == b"content %d" % i * 100
            await fs2.release(h)
        fs2.close()
    trio.run(main)
