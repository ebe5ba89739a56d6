"""``ossfuse rekey`` and ``ossfuse check``: key rotation and a configuration self-test, run
against the store directly (no mount).

Rekey re-wraps the data key and IV of every encrypted object under a path to another CMK
without touching the content: the data key stays, so the ciphertext stays valid. OSS refuses a
CopyObject that changes the envelope headers (oss-cse-format.md §9, error 0005-00000421), so
each object's ciphertext is streamed back (ranged GETs with If-Match, then one PUT or a
multipart upload) with the new headers. Each object is replaced in one step, so an interrupted
run leaves every object readable, with the old or the new CMK; a second run skips what is
already wrapped by the target CMK. Do not rekey objects that other clients are rewriting at the
same time: their write could be overwritten by the re-uploaded older content.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import trio

from . import envelope as env
from .config import Config
from .keyring import Cmk, CmkUnavailable, KeyMissing, Keyring, RsaCmk
from .store.base import ObjectInfo, ObjectStore, StoreError
from .upload import Uploader

log = logging.getLogger(__name__)


@dataclass
class RekeySummary:
    """What a rekey run did, by object count (``changed_bytes`` in bytes)."""

    changed: int = 0
    changed_bytes: int = 0
    already: int = 0  # wrapped by the target CMK already
    other_cmk: int = 0  # skipped: not wrapped by --from
    plaintext: int = 0  # no envelope
    failed: list[str] = field(default_factory=list)
    # CMK id -> keys of the encrypted objects it reads once the run is done (all, in listing order)
    readers_after: dict[str, list[str]] = field(default_factory=dict)

    SHOWN_KEYS = 10  # keys listed per CMK in the rendering

    def render(self, dry_run: bool) -> str:
        verb = "would change" if dry_run else "changed"
        lines = [f"{verb}: {self.changed} object(s), {self.changed_bytes} bytes",
                 f"already on the target CMK: {self.already}",
                 f"skipped, other CMK: {self.other_cmk}",
                 f"skipped, not encrypted: {self.plaintext}",
                 f"failed: {len(self.failed)}"]
        lines += [f"  {f}" for f in self.failed]
        for cmk_id, keys in sorted(self.readers_after.items()):
            shown = ", ".join(keys[:self.SHOWN_KEYS]) + (", …" if len(keys) > self.SHOWN_KEYS else "")
            lines.append(f"{'would be' if dry_run else 'now'} read with CMK {cmk_id!r}: {len(keys)} object(s): {shown}")
        return "\n".join(lines)


class RekeyRefused(ValueError):
    """The rekey would leave objects this configuration cannot read (message: why and the fix)."""


def refusal(keyring: Keyring, to_id: str | None) -> str | None:
    """Why rekeying to ``to_id`` (None: the CMK the rules pick per path, so each of those) would
    leave objects that this same configuration reads with another CMK, which then fails on every
    read (issue 16); None when it is safe."""
    targets = [keyring.cmks[to_id]] if to_id else [keyring.default] + [cmk for _, cmk in keyring.rules]
    for target in dict.fromkeys(targets):
        reason = keyring.unreadable_reason(target)
        if reason:
            return f"refusing to rekey to CMK {target.id!r}: {reason}"
    return None


async def _all_objects(store: ObjectStore, prefix: str):
    marker = None
    while True:
        page = await store.list(prefix, delimiter=None, marker=marker)
        for o in page.objects:
            yield o
        if page.next_marker is None:
            return
        marker = page.next_marker


async def rekey(cfg: Config, store: ObjectStore, keyring: Keyring, *, path: str = "", from_id: str | None,
                to_id: str | None, dry_run: bool, progress=None) -> RekeySummary:
    """Re-wrap every encrypted object under ``path`` (relative to the mount) whose CMK is
    ``from_id`` (any, if None) to ``to_id`` (if None: the CMK the rules pick for its path).
    ``progress(n_bytes)`` is called as objects are done. Raises RekeyRefused (before touching
    anything) when the target CMK would not be the one this configuration reads its objects
    with. Never raises for one object: failures are counted, logged and listed in the summary."""
    if to_id is not None and to_id not in keyring.cmks:
        raise KeyError(f"no CMK with id {to_id!r}")
    reason = refusal(keyring, to_id)
    if reason:
        raise RekeyRefused(reason)
    m = cfg.mount
    uploader = Uploader(store, multipart_threshold=m.multipart_threshold, part_size=m.part_size,
                        part_workers=m.part_workers)
    summary = RekeySummary()
    prefix = cfg.store.prefix + path.strip("/") + ("/" if path.strip("/") else "")
    async for listed in _all_objects(store, prefix):
        try:
            await _rekey_one(listed, cfg, store, keyring, uploader, from_id, to_id, dry_run, summary)
        except (StoreError, env.EnvelopeError, KeyMissing, CmkUnavailable) as e:
            log.error("rekey of %r failed: %s", listed.key, e)
            summary.failed.append(f"{listed.key}: {e}")
        if progress:
            progress(listed.size)
    return summary


async def _rekey_one(listed: ObjectInfo, cfg: Config, store: ObjectStore, keyring: Keyring, uploader: Uploader,
                     from_id, to_id, dry_run: bool, summary: RekeySummary) -> None:
    info = await store.head(listed.key)
    if info is None:
        return  # deleted meanwhile
    if not env.is_encrypted(info.metadata):
        summary.plaintext += 1
        return
    wrapped = env.parse_envelope(info.metadata)
    path = info.key[len(cfg.store.prefix):]
    target = keyring.cmks[to_id] if to_id else keyring.cmk_for_new(path)
    current = keyring.cmk_for(wrapped)
    opened = None
    if isinstance(current, RsaCmk) and (current is target or (from_id is not None and current.id != from_id)):
        # About to call it done or someone else's: prove that the CMK this configuration reads it
        # with really unwraps it (a local RSA operation), since an object left by an older rekey
        # can be wrapped by a CMK other than the one picked for it (issue 16).
        current, opened = await _wrapping_cmk(keyring, wrapped, current, from_id)
    if from_id is not None and current.id != from_id:
        summary.other_cmk += 1
        summary.readers_after.setdefault(current.id, []).append(info.key)
        return
    if current is target and not wrapped.legacy and wrapped.wrap_alg == target.wrap_alg:
        summary.already += 1
        summary.readers_after.setdefault(current.id, []).append(info.key)
        return
    if dry_run:
        summary.changed += 1
        summary.changed_bytes += info.size
        summary.readers_after.setdefault(target.id, []).append(info.key)
        return
    envelope = opened or await trio.to_thread.run_sync(keyring.open_envelope, wrapped, current)
    assert envelope is not None
    iv = envelope.iv
    new = env.WrappedEnvelope(await trio.to_thread.run_sync(target.wrap, envelope.data_key),
                              await trio.to_thread.run_sync(target.wrap, iv), target.wrap_alg,
                              target.matdesc, target.matdesc_raw)
    meta = {k: v for k, v in info.metadata.items()
            if not k.startswith(env.CSE_PREFIX) and not k.startswith("oss-crypto-")
            and k not in (env.LEGACY_CEK_ALG, env.LEGACY_WRAP_ALG)}
    meta.update(new.headers())
    meta[env.H_PLAIN_LEN] = str(info.size)
    if wrapped.legacy:
        # a legacy "start" is a whole counter value: it becomes the 16-byte IV as it is
        log.info("%r: legacy oss2 envelope rewritten in the current format", info.key)
    await uploader.copy(info, info.key, meta, stream=True)
    summary.changed += 1
    summary.changed_bytes += info.size
    summary.readers_after.setdefault(target.id, []).append(info.key)
    log.info("rekeyed %r from CMK %r to %r", info.key, current.id, target.id)


async def _wrapping_cmk(keyring: Keyring, wrapped: env.WrappedEnvelope, picked: Cmk,
                        from_id: str | None) -> tuple[Cmk, env.Envelope]:
    """(the CMK that unwraps ``wrapped``, the unwrapped envelope): ``picked`` (the one this
    configuration reads it with) if it can, else the ``from_id`` CMK if it can. Raises
    EnvelopeError naming the fix when neither does."""
    try:
        return picked, await trio.to_thread.run_sync(keyring.open_envelope, wrapped, picked)
    except env.EnvelopeError:
        if from_id is None or from_id == picked.id:
            raise env.EnvelopeError(
                f"this configuration reads it with CMK {picked.id!r}, which cannot unwrap it; if another "
                f"CMK wrapped it, `ossfuse rekey --from THAT-ID --to {picked.id}` rewraps it") from None
    other = keyring.cmks[from_id]
    if not other.reads(wrapped.wrap_alg):
        raise env.EnvelopeError(f"CMK {picked.id!r} cannot unwrap it and CMK {from_id!r} does not read "
                                f"wrap-alg {wrapped.wrap_alg!r}")
    return other, await trio.to_thread.run_sync(keyring.open_envelope, wrapped, other)


def check(cfg: Config, keyring: Keyring, store: ObjectStore) -> list[tuple[bool, str]]:
    """Prove each CMK can wrap and unwrap (a KMS CMK reaches KMS), that each CMK that encrypts
    new files is the one this configuration reads them with, and that the store answers a
    listing of the prefix. Returns (ok, plain-words line) pairs."""
    results = []
    for cmk in keyring.cmks.values():
        secret = os.urandom(env.DATA_KEY_SIZE)
        try:
            if hasattr(cmk, "new_data_key"):
                secret, blob = cmk.new_data_key()
            else:
                blob = cmk.wrap(secret)
            ok = cmk.unwrap(blob, cmk.wrap_alg) == secret
            results.append((ok, f"CMK {cmk.id!r} ({cmk.wrap_alg}): " +
                            ("wraps and unwraps a data key" if ok else "unwrapped a different key: broken key material")))
        except CmkUnavailable as e:
            results.append((False, f"CMK {cmk.id!r} ({cmk.wrap_alg}): its service cannot be reached: {e}"))
        except Exception as e:  # noqa: BLE001 - every failure is reported in plain words
            results.append((False, f"CMK {cmk.id!r} ({cmk.wrap_alg}): cannot wrap/unwrap: {e}"))

    writers = [keyring.default] + [cmk for _, cmk in keyring.rules]
    for cmk in dict.fromkeys(writers):  # a CMK that writes objects this config reads with another
        reason = keyring.unreadable_reason(cmk)
        if reason:
            results.append((False, f"CMK {cmk.id!r}: new files it encrypts would not be readable: {reason}"))

    async def probe():
        await store.list(cfg.store.prefix, max_keys=1)

    try:
        trio.run(probe)
        results.append((True, f"store {cfg.store.url} answers (prefix {cfg.store.prefix or '/'!r})"))
    except StoreError as e:
        results.append((False, f"store {cfg.store.url} does not answer: {e}"))
    return results


def progress_bar(total: int):
    """A tqdm progress bar on stderr counting bytes; returns (update, close)."""
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="rekey", leave=True,
               disable=not sys.stderr.isatty() and os.environ.get("OSSFUSE_PROGRESS") != "1")
    return bar.update, bar.close
