"""Objects whose name is gone but that are still in the bucket: an unlinked file an open handle
still reads, the object a new file renamed over it will overwrite at its upload, and (over a
remote store) an unlinked file whose DELETE is queued for the background batch
(:meth:`DeferredDeletes.queue`, run by ``Namespace._delete_queued``; its record is written but
not fsynced: docs/design.md "Deletes in the background").

The name disappears at once (locally: lookups, listings and creates no longer see it), but the
object stays in the bucket until the last handle closes, so the readers go on reading it by
ETag with no download at unlink time (review A10). Then it is deleted — only if the object at
that key is still the version that was unlinked (a HEAD compares ETags: a newer object written
there since, by this mount or another client, is left alone).

Each pending delete is recorded on the cache disk first (``<cache dir>/unlinked/<sha256>.json``
holding ``{"key": …, "etag": …}`` and, for an encrypted version an open handle reads, its
``"wrapped"`` data key header; written atomically and fsynced), so a crash before the last
close does not bring the file back: the next mount loads the records as ``ready`` and finishes
the deletes before it serves (``Filesystem.finish_unlinks``).

While a delete is pending — waiting for the last close, or failed and waiting for a retry —
that version is hidden from this mount (:meth:`DeferredDeletes.hides`: lookups and listings
skip an object whose key and ETag are a pending delete's), so an unlinked name never shows
again, not even when its DELETE fails: the delete is retried (``Namespace.finish_deletes``:
every ``retry_interval`` seconds in the background, at unmount, and at the next mount), as a
POSIX filesystem frees an unlinked inode's blocks after the fact. A newer object at that key
(another ETag) is not hidden.

The ETag alone does not tell every two versions apart: every empty object has the same one
(the MD5 of nothing), encrypted or not, and so do two uploads of the same plaintext. So a
record also keeps the envelope's wrapped data key, which no two encrypted versions share
(fresh per version), when it is known: a HEAD that finds the same ETag but another wrapped key
found another client's version, which is not deleted, and which lookups show (a trial: closing
an unlinked empty file deleted the empty file another mount had made at that name since); an
OSS listing carries no metadata, so until the last close ends the pending delete a listing
still leaves that name out, as it would the unlinked version. Two
plaintext uploads of the same bytes stay indistinguishable (OSS's Last-Modified has whole
seconds): the other's is deleted when the last handle closes."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import trio

from ..envelope import H_KEY
from ..store.base import ObjectInfo, ObjectStore, StoreError
from ..store.health import StoreOffline

log = logging.getLogger(__name__)


class DeferredDeletes:
    """Pending deletes of one mount, recorded in ``<cache_dir>/unlinked``.

    ``pending``: key → ETags (normalised: no quotes, upper case) of every recorded delete not
    done yet, in the order recorded; ``ready``: the (key, ETag) among them no open handle
    waits for (an earlier run's, and those whose delete failed), to be tried again."""

    def __init__(self, cache_dir: str, store: ObjectStore):
        self.dir = os.path.join(cache_dir, "unlinked")
        self.store = store
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.pending: dict[str, list[str]] = {}
        self.ready: set[tuple[str, str]] = set()
        # directory keys ("d/") this mount's rmdir removed while pending deletes were under them
        self.removed_dirs: set[str] = set()
        # (key, ETag) of unlinks whose DELETE runs in the background (Namespace.unlink), in the
        # order queued; an entry leaves once its batch was answered (done, or moved to ``ready``)
        self.queued: dict[tuple[str, str], None] = {}
        # (key, ETag) → when it was noted (a counter): an upload that started after it replaced
        # that version (:meth:`superseded`)
        self._noted_at: dict[tuple[str, str], int] = {}
        self._notes = 0
        # (key, ETag) → the wrapped data key header of that version (encrypted, when known)
        self._wrapped: dict[tuple[str, str], str] = {}
        for key, etag, wrapped in self.recorded():  # an earlier run's: no handle of this run reads them
            self._note(key, etag, wrapped)
            self.ready.add((key, etag))

    def _note(self, key: str, etag: str, wrapped: str | None = None) -> None:
        etags = self.pending.setdefault(key, [])
        if _norm(etag) not in etags:
            etags.append(_norm(etag))
        self._notes += 1
        self._noted_at.setdefault((key, _norm(etag)), self._notes)
        if wrapped is not None:
            self._wrapped[(key, _norm(etag))] = wrapped

    def _another_envelope(self, key: str, etag: str, info: ObjectInfo) -> bool:
        """Whether ``info`` (at ``key``, with ETag ``etag`` as recorded) is another version than
        the recorded one all the same: its metadata is known and its wrapped data key is not
        the recorded one's (see the module doc)."""
        wrapped = self._wrapped.get((key, _norm(etag)))
        return wrapped is not None and not info.metadata_unknown and info.metadata.get(H_KEY) != wrapped

    def mark(self) -> int:
        """Now, for :meth:`superseded` (taken when an upload starts)."""
        return self._notes

    def superseded(self, key: str, mark: int, *, by: str | None = None) -> None:
        """An upload of this mount that started at :meth:`mark` ``mark`` put a new version at
        ``key`` — or (``by``: the ETag its HEAD found) found another client's version there and
        went to a conflict copy: either way the versions of ``key`` whose delete was pending
        before it are gone from the bucket (overwritten), so their records go; a DELETE, or the
        replay after a crash, would otherwise compare ETags and take the new version when it
        has the same one (OSS: every empty object's, a body's MD5), and records waiting for an
        overwrite that never came stayed until unmount, where with the store away it said other
        clients still saw them (a trial). Pending deletes noted later, and one of ``by``, stay."""
        for etag in list(self.pending.get(key, ())):
            if etag != (by and _norm(by)) and self._noted_at.get((key, etag), mark + 1) <= mark:
                self.forget(key, etag)

    def hides(self, info: ObjectInfo) -> bool:
        """Whether object ``info`` is a version whose delete is pending (not to be shown)."""
        etags = self.pending.get(info.key)
        return etags is not None and _norm(info.etag) in etags and not self._another_envelope(info.key, info.etag, info)

    def pending_under(self, dkey: str) -> int:
        """How many keys below directory key ``dkey`` (ending in "/") have a pending delete:
        at most that many objects there are hidden."""
        return sum(1 for k in self.pending if k.startswith(dkey))

    async def first_visible_under(self, dkey: str, *, own_marker: bool = False) -> str | None:
        """The first key the store holds below directory key ``dkey`` that is not a version
        whose delete is pending, nor (``own_marker`` False) ``dkey``'s own marker unless that
        holds data (another client's bytes, not shown: removing the directory would lose them,
        a trial); None when there is none. Lists page by page until one is found (a page holds
        every hidden object plus one more, so usually one request). Raises StoreError."""
        marker = None
        size = min(1000, self.pending_under(dkey) + 2)
        while True:
            page = await self.store.list(dkey, delimiter=None, marker=marker, max_keys=size)
            for o in page.objects:
                if (own_marker or o.key != dkey or o.size) and not self.hides(o):
                    return o.key
            if page.next_marker is None:
                return None
            marker = page.next_marker

    def note_removed_dir(self, dkey: str) -> None:
        """This mount removed directory ``dkey`` while objects of unlinked open files below it
        await their deletes: :meth:`hides_dir` keeps the prefix they leave from showing it."""
        if self.pending_under(dkey):
            self.removed_dirs.add(dkey)

    async def hides_dir(self, dkey: str) -> bool:
        """Whether the key prefix ``dkey`` ("d/") is a directory this mount removed whose only
        objects left are pending deletes (so lookups and listings do not show it as an
        implicit directory); False at once for any other prefix. Raises StoreError."""
        if dkey not in self.removed_dirs:
            return False
        return await self.first_visible_under(dkey, own_marker=True) is None

    def last_etag(self, key: str) -> str | None:
        """The ETag of the latest pending delete at ``key`` (the one that may still be there), or None."""
        etags = self.pending.get(key)
        return etags[-1] if etags else None

    def _path(self, key: str, etag: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest() + ".json")

    def record(self, key: str, etag: str, *, ready: bool = False, fsync: bool = True,
               wrapped: str | None = None) -> None:
        """Make the pending delete of version (key, etag) durable, and hide that version;
        ``ready``: no handle waits for it (it may be tried at any retry); ``wrapped``: its
        envelope's wrapped data key header (tells it from another version with its ETag).
        ``fsync`` False: written to the kernel only (survives a crash of the daemon, not a power loss: the
        contract of an unlink whose DELETE runs in the background, docs/design.md
        "Durability"). Raises OSError (cache disk): then nothing is recorded."""
        path = self._path(key, etag)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            rec = {"key": key, "etag": etag} | ({"wrapped": wrapped} if wrapped is not None else {})
            os.write(fd, json.dumps(rec).encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._note(key, etag, wrapped)
        if ready:
            self.ready.add((key, etag))

    def queue(self, key: str, etag: str) -> None:
        """Record (not fsynced) and queue the background DELETE of version (key, etag): hidden
        from now on, deleted by ``Namespace``'s delete worker. Raises OSError (cache disk)."""
        self.record(key, etag, fsync=False)
        self.queued[(key, etag)] = None

    def queued_under(self, dkey: str) -> bool:
        """Whether a queued delete (or one in flight) is below directory key ``dkey`` ("" = all)."""
        return any(k.startswith(dkey) for k, _ in self.queued)

    def recorded(self) -> list[tuple[str, str, str | None]]:
        """The (key, etag, wrapped data key header or None) of every recorded pending delete
        (unreadable records: logged, kept)."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            try:
                fd = os.open(os.path.join(self.dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd) as f:
                    rec = json.load(f)
                wrapped = rec.get("wrapped")
                out.append((str(rec["key"]), str(rec["etag"]), None if wrapped is None else str(wrapped)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("pending-delete record %s is unreadable, kept for inspection: %s", name, e)
        return out

    async def delete(self, key: str, etag: str, *, failures: list[str] | None = None) -> bool:
        """Delete ``key`` if it still holds version ``etag``, then forget the record. True when
        done (or nothing to do); False when the store failed (the record stays, the version
        stays hidden and is in ``ready``, to be tried again): one log line, or, when the caller
        passes ``failures`` (a list) to report the failure itself, the error appended to it
        and an INFO line only."""
        try:
            info = await self.store.head(key)
            if info is not None and _norm(info.etag) == _norm(etag) and not self._another_envelope(key, etag, info):
                await self.store.delete(key, version=info.etag)
            elif info is not None:
                log.info("%r was replaced since it was unlinked (ETag %s, now %s%s); the new version stays",
                         key, etag, info.etag, ", another envelope" if _norm(info.etag) == _norm(etag) else "")
        except StoreError as e:  # offline: the outage has its one WARNING (store/health.py)
            if failures is not None:
                failures.append(str(e))
            log.log(logging.INFO if isinstance(e, StoreOffline) or failures is not None else logging.ERROR,
                    "deleting unlinked %r (ETag %s) failed; it stays hidden and is tried again: %s", key, etag, e)
            self.ready.add((key, etag))
            return False
        self.forget(key, etag)
        return True

    def forget(self, key: str, etag: str) -> None:
        """Drop the record of a pending delete that is no longer wanted (the name holds a new
        file of this mount, whose upload replaces the object)."""
        try:
            os.unlink(self._path(key, etag))
        except FileNotFoundError:
            pass
        self._unnote(key, etag)

    async def forget_many(self, items: list[tuple[str, str]]) -> None:
        """:meth:`forget` for the (key, etag) of a batch that is done: no longer pending at
        once, the record files removed in a worker thread (a metadata write each, which waits
        behind other writers' fsyncs on a busy disk; a crash before they go only repeats a
        delete, HEAD-compared, at the next mount). Raises nothing (a removal failing
        otherwise than FileNotFoundError is logged)."""
        for key, etag in items:
            self._unnote(key, etag)
        paths = [self._path(key, etag) for key, etag in items]

        def remove() -> None:
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.error("cannot remove the pending-delete record %s (its delete is done): %s", p, e)

        await trio.to_thread.run_sync(remove)

    def _unnote(self, key: str, etag: str) -> None:
        self._noted_at.pop((key, _norm(etag)), None)
        self._wrapped.pop((key, _norm(etag)), None)
        self.ready.discard((key, etag))
        self.queued.pop((key, etag), None)
        etags = self.pending.get(key)
        if etags is not None and _norm(etag) in etags:
            etags.remove(_norm(etag))
            if not etags:
                del self.pending[key]
                self.removed_dirs = {d for d in self.removed_dirs if self.pending_under(d)}


def _norm(etag: str) -> str:
    """An ETag as OSS means it: quotes and letter case do not count."""
    return etag.strip('"').upper()
