"""``ossfuse rekey`` and ``ossfuse check``: key rotation, a configuration self-test and
``check --verify`` (every object's integrity tags, docs/integrity.md), run against the store
directly (no mount).

Rekey keeps the integrity tags valid: they are keyed by the data key and IV, which a rekey
rewraps but never changes, and cover the ciphertext, which it copies unchanged; the
``ossfuse-integrity`` header is carried over with the other metadata — unless the new envelope
leaves tags kept in the header (the meta layout) no room under the 8 KB limit: then the same
tags go to a list object first and the header names it (``integrity.as_list_layout``).

Rekey re-wraps the data key and IV of every encrypted object under a path to another CMK
without touching the content: the data key stays, so the ciphertext stays valid. OSS refuses a
CopyObject that changes the envelope headers (oss-cse-format.md §9, error 0005-00000421), so
each object's ciphertext is streamed back (ranged GETs with If-Match, then one PUT or a
multipart upload) with the new headers. Each object is replaced in one step, so an interrupted
run leaves every object readable, with the old or the new CMK; a second run skips what is
already wrapped by the target CMK. Do not rekey objects that other clients are rewriting at the
same time: over OSS (no conditional PUT) their write could be overwritten by the re-uploaded
older content; a local bucket refuses the re-upload of an object changed since it was read
(the write states the version it replaces), and the object is listed as failed.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
import sys
import time
from dataclasses import dataclass, field

import trio

from . import envelope as env
from . import integrity
from .cache import load_tags
from .config import CmkConfig, Config
from .fs.model import SPECIAL_TYPES
from .fs.objmeta import int_or
from .keyring import Cmk, CmkUnavailable, KeyMissing, Keyring, RsaCmk
from .store.base import DestinationChanged, NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError
from .store.credentials import CredentialsError
from .registry import one_line, process_alive, process_start_ticks
from .writeback.ledger import MultipartLedger
from .writeback.upload import Uploader

log = logging.getLogger(__name__)


@dataclass
class RekeySummary:
    """What a rekey run did, by object count (``changed_bytes`` in bytes)."""

    changed: int = 0
    changed_bytes: int = 0
    already: int = 0  # wrapped by the target CMK already
    other_cmk: int = 0  # skipped: not wrapped by --from
    plaintext: int = 0  # no envelope (directory markers, tag lists and special files not counted)
    special: int = 0  # FIFOs, sockets, device nodes (mknod): no content, so no envelope
    dir_markers: int = 0  # empty objects whose key ends in "/": directories, nothing to rekey
    tag_lists: int = 0  # ossfuse's integrity tag lists (plaintext by design: docs/integrity.md)
    aborted_uploads: int = 0  # unfinished multipart uploads of an interrupted earlier run, aborted
    failed: list[str] = field(default_factory=list)
    # "key (ETag E): why" of objects failing their integrity tags: left as they are, never
    # re-saved under the new CMK (that would launder the damage into a fresh, valid-looking copy)
    damaged: list[str] = field(default_factory=list)
    # CMK id -> keys of the encrypted objects it reads once the run is done (all, in listing order)
    readers_after: dict[str, list[str]] = field(default_factory=dict)

    SHOWN_KEYS = 10  # keys listed per CMK in the rendering

    def render(self, dry_run: bool) -> str:
        verb = "would change" if dry_run else "changed"
        lines = [f"{verb}: {self.changed} object(s), {self.changed_bytes} bytes",
                 f"already on the target CMK: {self.already}",
                 f"skipped, other CMK: {self.other_cmk}",
                 f"skipped, not encrypted: {self.plaintext}",
                 f"skipped, special files (FIFOs, sockets, devices: no content): {self.special}",
                 f"skipped, directory markers: {self.dir_markers}",
                 f"skipped, integrity tag lists (ossfuse's own, not encrypted by design): {self.tag_lists}",
                 f"failed: {len(self.failed)}"]
        if self.aborted_uploads:
            lines.insert(0, f"aborted {self.aborted_uploads} unfinished multipart upload(s) an interrupted "
                            "earlier rekey left")
        lines += [f"  {f}" for f in self.failed]
        if dry_run:  # a dry run reads no object's content: damage shows in the real run
            lines.append(f"skipped, damaged envelope: {len(self.damaged)}; integrity tags not checked in a dry "
                         "run (contents are not read; `ossfuse check --verify` reads them)")
        else:
            lines.append(f"skipped, damaged (failing integrity tags or a damaged envelope, not rekeyed): "
                         f"{len(self.damaged)}")
        lines += [f"  DAMAGED {d}" for d in self.damaged]
        for cmk_id, keys in sorted(self.readers_after.items()):
            # quoted, as verify names its examples (a name may hold ", ": a trial)
            shown = ", ".join(repr(k) for k in keys[:self.SHOWN_KEYS]) + (", …" if len(keys) > self.SHOWN_KEYS else "")
            lines.append(f"{'would be' if dry_run else 'now'} read with CMK {cmk_id!r}: {len(keys)} object(s): {shown}")
        return "\n".join(one_line(line) for line in lines)  # (keys are any client's: one line each)


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


def _same_cmk(a: CmkConfig, b: CmkConfig) -> bool:
    """Whether two configs' CMK entries are one key with the same matdesc: an object wrapped
    by ``a`` is read with ``b`` (RSA: the same private key file or bytes; KMS: the same key id)."""
    if a.type != b.type or (a.matdesc or None) != (b.matdesc or None):
        return False
    if a.type == "kms":
        return a.key_id == b.key_id
    if a.private_key is None or b.private_key is None:
        return False
    try:
        with open(a.private_key, "rb") as fa, open(b.private_key, "rb") as fb:
            return os.path.realpath(a.private_key) == os.path.realpath(b.private_key) or fa.read() == fb.read()
    except OSError:
        return False


def mount_warnings(cfg: Config, keyring: Keyring, to_id: str | None, *, dry_run: bool = False) -> list[str]:
    """Lines about the running mounts of the same store (and an overlapping prefix), this
    config's own included. Each one's being up (not for a ``dry_run``): a change saved through
    it while this rewrites that file's object can be overwritten by the older content put back
    (nothing here states the version it replaces: OSS has no conditional PUT), or become a
    conflict copy there (where the rewrite, a new version by another client to that mount, got
    a new ETag: a local bucket), and its open readers of a rewritten file may get ESTALE until
    they open it again (an operator trial met both, unwarned; over OSS the rewrite keeps the
    ETag, the MD5 of the same ciphertext, and readers read on). And one whose
    config lacks a CMK this rekey wraps objects with: its reads of them would fail with
    EACCES until that CMK is added and it is mounted again (or they are rekeyed back); also
    one whose config has it but whose daemon did not load it (added after it was mounted, as
    its status says). A mount whose config cannot be read is named too."""
    from . import config as config_mod
    from .registry import running_mounts
    targets = [keyring.cmks[to_id]] if to_id else [keyring.default] + [cmk for _, cmk in keyring.rules]
    by_id = {c.id: c for c in cfg.encryption.cmks}
    lines = []
    for record in running_mounts():
        path = record.get("config")
        if not path:
            continue
        try:
            other = cfg if os.path.realpath(path) == os.path.realpath(cfg.path) else config_mod.load(path)
        except (config_mod.ConfigError, OSError) as e:
            lines.append(f"mount {record.get('mountpoint')}: cannot read its config to check its CMKs: {e}")
            continue
        if other.store.identity != cfg.store.identity or not (other.store.prefix.startswith(cfg.store.prefix)
                                                              or cfg.store.prefix.startswith(other.store.prefix)):
            continue
        if not dry_run:
            lines.append(f"mount {record['mountpoint']} of this store is up: a change saved through it while this "
                         f"rewrites that file's object can be overwritten by the older content put back, or become "
                         f"a conflict copy there, and its open readers of a rewritten file may get ESTALE until "
                         f"they open it again (unmount it first for a quiet rekey)")
        loaded = _loaded_cmk_ids(record["mountpoint"])
        for target in dict.fromkeys(targets):
            same = ([by_id[target.id]] if other is cfg else
                    [c for c in other.encryption.cmks if _same_cmk(by_id[target.id], c)])
            matdesc = json.dumps(target.matdesc) if target.matdesc else "none"
            if not same:
                lines.append(f"mount {record['mountpoint']} (config {path}) has no CMK {target.id!r} "
                             f"(matdesc {matdesc}): its reads of the rekeyed objects will fail with EACCES until "
                             f"that CMK is in its config and it is mounted again, or the objects are rekeyed back")
            elif loaded is not None and not any(c.id in loaded for c in same):
                # in the config file now, added after that mount read it (a trial: no warning,
                # then EACCES for every rekeyed file until a remount)
                lines.append(f"mount {record['mountpoint']} (config {path}) was mounted before its config had "
                             f"CMK {target.id!r} (matdesc {matdesc}): its reads of the rekeyed objects will fail "
                             f"with EACCES until it is mounted again, or the objects are rekeyed back")
    return lines


def _loaded_cmk_ids(mountpoint: str) -> set[str] | None:
    """The ids of the CMKs the daemon of the mount at ``mountpoint`` loaded (its status
    document), None when it does not answer (then only its config file is checked)."""
    from . import status
    from .registry import registry_path
    try:
        doc = status.query(registry_path(mountpoint, ".sock"), timeout=5.0)
        return {c["id"] for c in doc["cmks"]}
    except (OSError, ValueError, KeyError, TypeError):
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
    ``path``: a file or a directory, as for :func:`objects_at` (normalised by
    :func:`path_below_root`). ``progress(n_bytes)`` is called as objects are done. Raises RekeyRefused (before touching
    anything) when the target CMK would not be the one this configuration reads its objects
    with. Never raises for one object: failures are counted, logged and listed in the summary."""
    if to_id is not None and to_id not in keyring.cmks:
        raise KeyError(f"no CMK with id {to_id!r}")
    reason = refusal(keyring, to_id)
    if reason:
        raise RekeyRefused(reason)
    m = cfg.mount
    summary = RekeySummary()
    ledger = None
    if not dry_run:  # an object streamed as a multipart upload: a kill leaves its parts billed
        try:
            ledger = MultipartLedger(cfg.cache.dir, "rekey-multipart", {"pid": os.getpid(),
                                                                       "start": process_start_ticks()})
        except OSError as e:
            log.warning("cannot keep a multipart ledger in %s (%s): if this rekey is killed while it streams "
                        "an object, its parts stay in the bucket until aborted", cfg.cache.dir, e)
        else:
            summary.aborted_uploads = await abort_interrupted_uploads(store, ledger)
    uploader = Uploader(store, multipart_threshold=m.multipart_threshold, part_size=m.part_size,
                        part_workers=m.part_workers, ledger=ledger)
    rel = path_below_root(path) or ""
    async for listed in objects_at(cfg, store, rel, lambda key, e: summary.failed.append(f"{key}: {e}")):
        try:
            await _rekey_one(listed, cfg, store, keyring, uploader, from_id, to_id, dry_run, summary)
        except integrity.IntegrityError as e:
            log.error("rekey of %r (ETag %s) skipped: it fails its integrity tags: %s", listed.key, listed.etag, e)
            summary.damaged.append(f"{listed.key} (ETag {listed.etag}): {e}")
        except (DestinationChanged, PreconditionFailed):  # (changed before its write, or before its read)
            log.error("rekey of %r failed: the object was changed while it was rewritten (a running mount "
                      "saved it); that change stays, run rekey again for it", listed.key)
            summary.failed.append(f"{listed.key}: changed while it was rewritten (run rekey again)")
        except (StoreError, env.EnvelopeError, KeyMissing, CmkUnavailable) as e:
            log.error("rekey of %r failed: %s", listed.key, e)
            summary.failed.append(f"{listed.key}: {e}")
        if progress:
            progress(listed.size)
    if not dry_run:
        # the durability barrier fsync() and unmount use (a local-directory store acknowledges
        # writes made only to the kernel): a finished rekey survives a power loss
        await store.sync()
    return summary


async def abort_interrupted_uploads(store: ObjectStore, ledger: MultipartLedger) -> int:
    """Abort the multipart uploads an earlier rekey of this cache dir began and never ended
    (killed while streaming an object: OSS bills the parts until aborted), except those of a
    rekey still running (its process, by pid and start time). Returns how many; a failure is
    logged and kept for the next run."""
    aborted = 0
    for upload_id, key in list(ledger.left.items()):
        owner = ledger.owners.get(upload_id, {})
        pid, start = owner.get("pid"), owner.get("start")
        if isinstance(pid, int) and process_alive(pid) and process_start_ticks(pid) == start:
            continue  # another rekey, running now
        try:
            await store.abort_multipart(key, upload_id)
        except NoSuchKey:  # (NoSuchUpload) ended meanwhile
            pass
        except StoreError as e:
            log.error("abort of unfinished multipart upload %s of %r (an interrupted rekey's) failed: %s",
                      upload_id, key, e)
            continue
        else:
            aborted += 1
            log.warning("aborted unfinished multipart upload %s of %r left by an interrupted rekey", upload_id, key)
        ledger.ended(upload_id)
    return aborted


async def _rekey_one(listed: ObjectInfo, cfg: Config, store: ObjectStore, keyring: Keyring, uploader: Uploader,
                     from_id, to_id, dry_run: bool, summary: RekeySummary) -> None:
    if _not_content(listed, summary):
        return
    info = await _head_encrypted(listed, store, summary)
    if info is None:
        return
    why = env.length_mismatch(info.metadata, info.size)
    if why is not None:  # damaged, as the mount and check --verify see it: left as it is (a trial:
        # the re-upload wrote the body's length over it, so check --verify called it whole after)
        log.error("rekey of %r (ETag %s) skipped: its envelope is damaged: %s", info.key, info.etag, why)
        summary.damaged.append(f"{info.key} (ETag {info.etag}): {why}")
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
    spec = integrity.parse(info.metadata)
    if spec is not None:  # raises IntegrityError: the caller reports it and leaves the object be
        await _check_tags(info, store, envelope, spec)
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
    if spec is not None and spec.tags is not None and \
            integrity.meta_size(meta) > integrity.META_LIMIT - integrity.RESERVE:
        # the new envelope (a bigger RSA key, a longer matdesc) leaves the tags no room in the
        # header: they go to a list object, as a mount's seal puts them (before the object)
        moved = integrity.as_list_layout(spec, envelope.data_key, iv, info.size, cfg.store.prefix)
        assert moved.list_key is not None and moved.list_body is not None
        await store.put_bytes(moved.list_key, moved.list_body, {})
        meta.update(moved.headers)
        log.info("%r: its integrity tags move from its header to the tag list %r (the new envelope leaves "
                 "them no room there)", info.key, moved.list_key)
    # states the version it replaces: a store that checks it atomically (a local bucket) refuses
    # the write when a running mount saved the file since the read (DestinationChanged: the
    # mount's change stays, this object is "failed", a run again rekeys it); OSS cannot check
    # it (no conditional PUT: the window docs/semantics.md names)
    await uploader.copy(info, info.key, meta, stream=True, replaces=info.etag)
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


UNREADABLE_SAMPLE = "sampled encrypted objects cannot be read with this config's keys"  # a check line


def check(cfg: Config, keyring: Keyring, store: ObjectStore | None) -> list[tuple[bool, str]]:
    """Prove each CMK can wrap and unwrap (a KMS CMK reaches KMS), that each CMK that encrypts
    new files is the one this configuration reads them with, and that the store answers a
    listing of the prefix (``store`` None: a local bucket not made yet, said in an ok line).
    Returns (ok, plain-words line) pairs; every failure is one of them (never raised)."""
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

    if store is None:
        results.append((True, f"store {cfg.store.url}: no bucket directory there yet; the first mount makes a "
                              f"new, empty one"))
        return results

    async def probe():
        await store.list(cfg.store.prefix, max_keys=1)
        return await unreadable_sample(cfg, keyring, store)

    try:
        sampled, unreadable = trio.run(probe)
        where = f"prefix {cfg.store.prefix!r}" if cfg.store.prefix else "no prefix: the whole bucket"
        results.append((True, f"store {cfg.store.url} answers ({where})"))
        if unreadable:
            key, why = unreadable[0]
            results.append((False, f"{len(unreadable)} of {sampled} {UNREADABLE_SAMPLE}: e.g. {key!r} ({why})"))
        elif sampled:
            results.append((True, f"{sampled} sampled encrypted object(s) open with this config's keys"))
        else:  # said, so that an ok run does not look as if the bucket's objects were tried
            results.append((True, f"no encrypted object to sample among the first {CHECK_HEADS} listed under the "
                                  f"prefix (none, or plaintext only): no object's data key tried"))
    except CredentialsError as e:  # no request was sent: the store was never asked
        results.append((False, f"store {cfg.store.url}: no usable credentials: {e}"))
    except StoreError as e:  # an HTTP error answer (a 503, a 403) is an answer: say which it was
        results.append((False, f"store {cfg.store.url} {'fails' if e.answered else 'does not answer'}: {e}"))
    except Exception as e:  # noqa: BLE001 - every failure is reported in plain words, on one line
        results.append((False, f"store {cfg.store.url} does not answer: {type(e).__name__}: {e}"))
    return results


CHECK_SAMPLE = 20  # encrypted objects `ossfuse check` unwraps the data key of (the first listed)
# objects it HEADs at most to find them: a prefix whose first thousands are plaintext took
# one HEAD each (a trial: 9.5 min at 0.5 s per request, for a --verify of one file)
CHECK_HEADS = 200


async def unreadable_sample(cfg: Config, keyring: Keyring, store: ObjectStore,
                            limit: int = CHECK_SAMPLE, heads: int = CHECK_HEADS) -> tuple[int, list[tuple[str, str]]]:
    """HEAD the first objects listed under the prefix until ``limit`` encrypted ones are seen
    (at most ``heads`` HEADs; directory markers and integrity tag lists are not HEADed),
    and unwrap each one's data key with this keyring (a config whose CMK is not the bucket's,
    e.g. a second ``ossfuse quickstart``, reads nothing). Returns (encrypted objects sampled,
    [(key, reason)] of those no configured CMK reads: matdesc unmatched or unwrap failing).
    Raises StoreError when the store fails; a KMS that cannot be reached, or whose credentials
    fail, counts as unreadable."""
    sampled, unreadable = 0, []
    async for o in _all_objects(store, cfg.store.prefix):
        if sampled >= limit or heads <= 0:
            break
        if _not_content_kind(o) is not None:
            continue
        heads -= 1
        info = await store.head(o.key)
        if info is None or not env.is_encrypted(info.metadata):
            continue
        try:
            wrapped = env.parse_envelope(info.metadata)
        except env.EnvelopeError:
            continue  # a damaged envelope is not a key question (check --verify reports it)
        sampled += 1
        try:
            await trio.to_thread.run_sync(keyring.open_envelope, wrapped)
        except KeyMissing as e:
            unreadable.append((o.key, str(e)))
        except (env.EnvelopeError, CmkUnavailable) as e:
            unreadable.append((o.key, f"matdesc {wrapped.matdesc_raw or '(none)'}: no configured CMK unwraps "
                                      f"its data key: {e}"))
        except CredentialsError as e:  # a KMS CMK's (the store answered): not the store's, which `check` names
            unreadable.append((o.key, f"matdesc {wrapped.matdesc_raw or '(none)'}: its KMS CMK has no usable "
                                      f"credentials: {e}"))
    return sampled, unreadable


@dataclass
class VerifySummary:
    """What ``check --verify`` found, by object (``*_bytes`` in bytes)."""

    verified: int = 0
    verified_bytes: int = 0
    untagged: int = 0  # encrypted objects without tags (written by an SDK)
    untagged_bytes: int = 0
    plaintext: int = 0  # no envelope (foreign plaintext; directory markers, tag lists, special files not counted)
    plaintext_keys: list[str] = field(default_factory=list)  # the first PLAINTEXT_SHOWN of them
    special: int = 0  # FIFOs, sockets, device nodes (mknod): no content, so no envelope
    dir_markers: int = 0  # empty objects whose key ends in "/": directories, nothing to verify
    tag_lists: int = 0  # ossfuse's integrity tag lists: checked through the objects that name them
    failed: list[str] = field(default_factory=list)  # "key (ETag E): why"
    # "key (ETag E): why" of objects the store did not let it read (a trial: a store that stalled
    # mid-run gave a FAIL line, which reads as a damaged object)
    unchecked: list[str] = field(default_factory=list)

    PLAINTEXT_SHOWN = 3  # (a trial: "not encrypted: 2" on an encrypting mount, unnamed, worried)

    def render(self) -> str:
        lines = [f"FAIL  {f}" for f in self.failed] + [f"NOT CHECKED  {f}" for f in self.unchecked]
        shown = (f" (e.g. {', '.join(repr(k) for k in self.plaintext_keys)})" if self.plaintext_keys else "")
        lines.append(f"verified: {self.verified} object(s), {self.verified_bytes} bytes; without tags: "
                     f"{self.untagged} object(s), {self.untagged_bytes} bytes; not encrypted: {self.plaintext}"
                     f"{shown}; integrity tag lists (ossfuse's own, not encrypted by design): {self.tag_lists}; "
                     f"special files (FIFOs, sockets, devices: no content): {self.special}; "
                     f"directory markers: {self.dir_markers}; failed: {len(self.failed)}"
                     + (f"; not checked, the store failed (run it again): {len(self.unchecked)}"
                        if self.unchecked else ""))
        return "\n".join(one_line(line) for line in lines)  # (keys are any client's: one line each)


VERIFY_CHUNK = 8 << 20  # bytes read per ranged GET (whole tagged blocks)


def path_below_root(path: str) -> str | None:
    """``check --verify``'s and ``rekey``'s PATH as a key suffix below the mount's root:
    normalised as a path ("./a//b/" and "/a/b" are "a/b", "" or "." the root: ""); None for a
    PATH above the root ("..")."""
    rel = posixpath.normpath(path or ".")
    if rel.split("/")[0] == "..":
        return None
    return "" if rel == "." else rel.strip("/")


async def objects_at(cfg: Config, store: ObjectStore, rel: str, on_head_error=None):
    """The objects a PATH names (``rel``, from :func:`path_below_root`): the file at it, if
    one, then every object below it as a directory (a name may be both in a bucket); all of
    them for "". ``on_head_error(key, StoreError)`` is called when the HEAD of the file fails
    (the walk goes on below it); without it the error is raised."""
    if rel:
        try:
            file = await store.head(cfg.store.prefix + rel)
        except StoreError as e:
            if on_head_error is None:
                raise
            on_head_error(cfg.store.prefix + rel, e)
            file = None
        if file is not None:
            yield file
    async for listed in _all_objects(store, cfg.store.prefix + rel + ("/" if rel else "")):
        yield listed


async def count_objects(cfg: Config, store: ObjectStore, rel: str) -> tuple[int, int]:
    """(objects, bytes) :func:`objects_at` lists for ``rel``: a progress's totals (one
    listing pass; a HEAD that fails is the run's to report)."""
    objects = total = 0
    async for o in objects_at(cfg, store, rel, lambda key, e: None):
        objects += 1
        total += o.size
    return objects, total


async def verify(cfg: Config, store: ObjectStore, keyring: Keyring, *, path: str = "",
                 progress=None) -> VerifySummary:
    """Read the object at ``path`` (relative to the mount: a file) and every object under it (a
    directory; "" or "." for all) and check each block against its integrity tags. ``path`` is
    normalised as a path ("./a//b/" is "a/b"). An object fails when a block does not match, its
    tag header or list is damaged or missing, its envelope cannot be opened, or it cannot be
    read; each failure is one entry of ``failed`` naming the object, its ETag and the block. One
    the store did not let it read (no answer, an error) is an entry of ``unchecked`` instead;
    one whose body failed OSS's CRC-64 on every try is damaged: ``failed``.
    ``progress(n_bytes)`` is called as objects are done. Never raises for one object."""
    summary = VerifySummary()
    rel = path_below_root(path) or ""
    async for listed in objects_at(cfg, store, rel, lambda key, e: summary.unchecked.append(f"{key}: {e}")):
        try:
            await _verify_one(listed, store, keyring, summary)
        except StoreError as e:
            # a body that failed OSS's CRC-64 on every try (the store's retries ran out) is
            # damaged, as far as anyone reading it can tell (trial BT7: "not checked, run it again")
            (summary.failed if e.code == "CrcMismatch" else summary.unchecked).append(
                f"{listed.key} (ETag {listed.etag}): {e}")
        except (env.EnvelopeError, KeyMissing, CmkUnavailable, integrity.IntegrityError) as e:
            summary.failed.append(f"{listed.key} (ETag {listed.etag}): {e}")
        if progress:
            progress(listed.size)
    return summary


async def _head_encrypted(listed: ObjectInfo, store: ObjectStore, summary: RekeySummary | VerifySummary
                          ) -> ObjectInfo | None:
    """The HEAD of a listed object when it is encrypted; None when it was deleted meanwhile, or
    has no envelope (then counted in ``summary.plaintext``)."""
    info = await store.head(listed.key)
    if info is None:
        return None
    if not env.is_encrypted(info.metadata):
        if info.size == 0 and stat.S_IFMT(int_or(info.metadata.get("mode"), 0)) in SPECIAL_TYPES:  # mknod's
            summary.special += 1
        else:
            summary.plaintext += 1
            if isinstance(summary, VerifySummary) and len(summary.plaintext_keys) < summary.PLAINTEXT_SHOWN:
                summary.plaintext_keys.append(listed.key)
        return None
    return info


def _not_content_kind(listed: ObjectInfo) -> str | None:
    """"dir_markers" for a directory marker, "tag_lists" for one of ossfuse's integrity tag
    lists (under any writer's prefix), None for anything else: both kinds are plaintext by
    design and no file's content, so nobody HEADs them (a trial read "not encrypted: 1 (e.g.
    '.ossfuse-integrity/…')" as a leak). The names are the summaries' counters."""
    if listed.key.endswith("/") and listed.size == 0:
        return "dir_markers"
    if integrity.LIST_DIR in listed.key.split("/")[:-1]:
        return "tag_lists"
    return None


def _not_content(listed: ObjectInfo, summary: RekeySummary | VerifySummary) -> bool:
    """Whether ``listed`` is no file's content (:func:`_not_content_kind`); counted in
    ``summary`` if so."""
    kind = _not_content_kind(listed)
    if kind is not None:
        setattr(summary, kind, getattr(summary, kind) + 1)
    return kind is not None


async def _verify_one(listed: ObjectInfo, store: ObjectStore, keyring: Keyring, summary: VerifySummary) -> None:
    if _not_content(listed, summary):
        return
    info = await _head_encrypted(listed, store, summary)
    if info is None:
        return
    why = env.length_mismatch(info.metadata, info.size)
    if why is not None:  # the mount refuses to open it (a trial: verify called it verified)
        raise env.EnvelopeError(why)
    # its envelope opens as the mount opens it (also without tags, an SDK's object: a damaged
    # header or a key this config cannot unwrap is a FAIL, as the mount's EIO or EACCES is;
    # a trial: both were counted "without tags", exit 0)
    envelope = await trio.to_thread.run_sync(keyring.open_envelope, env.parse_envelope(info.metadata))
    spec = integrity.parse(info.metadata)
    if spec is None:
        summary.untagged += 1
        summary.untagged_bytes += info.size
        return
    await _check_tags(info, store, envelope, spec)
    summary.verified += 1
    summary.verified_bytes += info.size


async def _check_tags(info: ObjectInfo, store: ObjectStore, envelope: env.Envelope, spec: integrity.TagSpec) -> None:
    """Read the object ``info`` (that ETag: If-Match) in whole blocks and check each against its
    tags. Raises IntegrityError naming the first bad block and its bytes (or a truncated
    read, or a damaged tag list), StoreError when it cannot be read."""
    tags = await load_tags(store, spec, info.key, info.size, envelope.data_key, envelope.iv)
    step = max(spec.block, VERIFY_CHUNK - VERIFY_CHUNK % spec.block)
    for lo in range(0, info.size, step):
        hi = min(info.size, lo + step)
        data = await store.get_range(info.key, lo, hi, if_match=info.etag)
        if len(data) != hi - lo:
            raise integrity.IntegrityError(f"truncated: bytes {lo}-{hi - 1} gave {len(data)}")
        bad = await trio.to_thread.run_sync(tags.bad_blocks, lo, data)
        if bad:
            raise integrity.IntegrityError(f"block {bad[0]} (bytes {bad[0] * spec.block}-"
                                           f"{min(info.size, (bad[0] + 1) * spec.block) - 1}) fails its integrity tag"
                                           + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def _human_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``3.0 KiB``, ``1.2 MiB`` … (binary units)."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


class PassProgress:
    """How far a pass over the objects under the prefix (a rekey run, or ``check --verify``:
    ``label``) is: objects and bytes done of the
    totals (None: not counted, as in a dry run: ``dry_run`` says so). On a terminal (or with
    ``OSSFUSE_PROGRESS=1``) a tqdm bar on ``stream``; else, for journald and redirected runs,
    one line on ``stream`` every ``interval`` seconds and a last one at :meth:`close`, e.g.
    ``rekey: 120 of 200 objects, 1.2 MiB of 2.0 MiB (60%)``."""

    def __init__(self, total_objects: int | None, total_bytes: int | None, *, stream=None,
                 interval: float = 5.0, tty: bool | None = None, clock=time.monotonic, dry_run: bool = False,
                 label: str = "rekey"):
        self.stream = stream or sys.stderr
        self.label = label
        self.dry_run = dry_run  # (its lines say what was looked at: a dry run does nothing)
        self.total_objects, self.total_bytes = total_objects, total_bytes
        self.objects = self.bytes = 0
        self.interval, self.clock = interval, clock
        self._last = clock()
        if tty is None:
            tty = self.stream.isatty() or os.environ.get("OSSFUSE_PROGRESS") == "1"
        self._bar = None
        if tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, file=self.stream, leave=True,
                             desc=f"{label} --dry-run" if dry_run else label)

    def update(self, n_bytes: int) -> None:
        """One more object of ``n_bytes`` bytes is done (changed, skipped or failed)."""
        self.objects += 1
        self.bytes += n_bytes
        if self._bar is not None:
            self._bar.update(n_bytes)
        elif self.clock() - self._last >= self.interval:
            self._line()

    def line(self) -> str:
        """The progress line (objects and bytes done, of the totals when known)."""
        size = _human_bytes
        if self.total_objects is None:
            if self.dry_run:
                return f"{self.label} --dry-run: {self.objects} objects, {size(self.bytes)} looked at, nothing changed"
            return f"{self.label}: {self.objects} objects, {size(self.bytes)} done"
        pct = 100 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.label}: {self.objects} of {self.total_objects} objects, {size(self.bytes)} of "
                f"{size(self.total_bytes or 0)} ({pct:.0f}%)")

    def _line(self) -> None:
        self._last = self.clock()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()
