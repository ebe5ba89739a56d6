"""Foreign edits are never silently overwritten at upload (issue 12, "from the field").

A file this mount created is uploaded create-only (``if_absent``: OSS
``x-oss-forbid-overwrite``), atomically: no HEAD first, and no window in which a foreign write
is replaced. Only when the key is taken, and before an upload replaces an object, does
:meth:`Conflicts.upload` HEAD the key and compare its ETag with the version this mount started
from (the node's committed version; none for a file this mount created). If another client wrote the name meanwhile, both are kept: the other
client's version stays at the name, ours is uploaded as a *conflict copy* next to it (see
:func:`conflict_name`), with one WARNING naming both ETags, and counted for ``ossfuse status``.

What is not a conflict: the object is gone (deleted by someone else: ours is put back, nothing
is lost), the ETag is the one this mount knows, the object is an earlier PUT of this same
version whose answer was lost (same wrapped data key), the object is the last one this mount's
own upload put at that key (a file renamed over another whose upload was in flight), or this
mount renamed a new file over a file it knew (:meth:`Conflicts.replaces`). A version recovered
from the journal after a crash is checked the same way: its record holds the base this mount
had for it (:meth:`Conflicts.base_of`), so a foreign edit made while the daemon was down, or
between a create-only PUT's refusal and the conflict copy, is kept. Only a record written by
an earlier ossfuse, which has no base, is uploaded without the check.
For a replacement the check and the PUT are two requests; the PUT states the version it
replaces (``replaces=``, or create-only when nothing was there): a local bucket refuses it when
a foreign write landed in between (the key is looked at again), while over OSS, which has no
conditional PUT on an ETag, that write is still replaced (the remaining window,
docs/semantics.md). OSS ignores
``x-oss-forbid-overwrite`` on a bucket with versioning enabled or suspended: there a new file
replaces a foreign one written at the same name, which stays as a noncurrent version.

A rename of a committed file is a CopyObject onto the new name, which would replace what is
there with no upload to check (a trial: an editor's save, write-temp-then-rename, destroyed
another client's edit made within the attribute cache time). So the rename HEADs a name it
replaces first, and a rename to a name it believes free copies create-only: an object there
that this mount does not know is first copied to a conflict copy (:meth:`Conflicts.keep_theirs`,
one WARNING), and the rename then takes the name, as the application asked (an upload keeps
theirs at the name instead: there the name is ours only if it was ours before)."""
from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

from .. import envelope as env
from ..store.base import AlreadyExists, DestinationChanged, ObjectInfo, ObjectStore, StoreError, same_etag
from ..writeback.journal import BASE_UNKNOWN
from ..writeback.staging import StagedFile
from ..writeback.upload import Uploader
from .model import Node
from .naming import MAX_KEY_BYTES, Naming
from .unlinked import DeferredDeletes

log = logging.getLogger(__name__)

RECENT_MAX = 5  # conflict copies listed by `ossfuse status`
_NAME_MAX = 255  # bytes of one path component
_OURS_MAX = 4096  # keys whose last own upload is remembered
_REFUSALS_MAX = 3  # writes refused in a row because the key changed under them (then tried again later)


class _ChangedMeanwhile(Exception):
    """The object at an upload's key changed while its parts went up (Conflicts.upload); ``now``
    is what is there."""

    def __init__(self, now: ObjectInfo):
        super().__init__(now.key)
        self.now = now


def conflict_name(name: str, host: str, when: float, n: int = 0, room: int = _NAME_MAX) -> str:
    """The conflict copy's name for file ``name``: ``stem.conflict-HOST-YYYYMMDD-HHMMSS[-N].ext``
    (UTC; the extension stays last so programs still recognise the file; a dotfile with no
    other dot, ``.bashrc`` or ``..dots``, and a name with no dot get the suffix at their end).
    The stem is shortened so the result fits ``room`` bytes (at most 255, a name's limit); an extension too long to fit beside the
    suffix is shortened with the stem instead (a listing hides a name over 255 bytes: a
    trial's copy of ``x.éé…`` was unreachable). Raises ValueError when not even the suffix and
    one byte of the name fit. E.g. ``report.docx`` → ``report.conflict-pc1-20261202-130501.docx``,
    ``src.tar.gz`` → ``src.conflict-pc1-20261202-130501.tar.gz``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    tag = f".conflict-{host.replace('/', '_')[:40]}-{stamp}" + (f"-{n}" if n else "")
    dot = name.rfind(".")
    if name[:dot].lower().endswith(".tar") and dot > 4:  # archive.tar.gz: the whole ".tar.gz" stays last
        dot -= 4
    # (a stem of dots only, "..dots": a dotfile's name, no extension after it)
    stem, ext = (name[:dot], name[dot:]) if dot > 0 and name[:dot].strip(".") else (name, "")
    if len(_bytes(tag + ext)) >= room:
        stem, ext = name, ""
    left = room - len(_bytes(tag + ext))
    if left < 1:
        raise ValueError(f"no conflict name for {name!r} fits {room} bytes")
    return _bytes(stem)[:left].decode("utf-8", "ignore") + tag + ext


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def conflict_key(key: str, root: str, host: str, when: float, n: int = 0) -> str:
    """The key of the conflict copy of object ``key`` (:func:`conflict_name`): next to it,
    within OSS's key limit (1023 bytes; a trial's copy of a 1,013-byte key was refused by the
    store on every retry, forever); when its directory leaves no room for one, in the mount's
    root ``root`` (its prefix), where the WARNING line and ``ossfuse status`` name it."""
    dkey, _, name = key.rpartition("/")
    for where in (dkey + "/" if dkey else "", root):
        try:
            return where + conflict_name(name, host, when, n, min(_NAME_MAX, MAX_KEY_BYTES - len(_bytes(where))))
        except ValueError:
            continue
    return root + conflict_name(name[:1], host[:1], when, n)  # a root near the limit: the store says no


def _same_version(current: ObjectInfo, metadata: dict[str, str]) -> bool:
    """Whether ``current`` is an earlier upload of this very staged version (a PUT whose answer
    was lost): it carries the same wrapped data key, which is new for every version made."""
    ours = metadata.get(env.H_KEY)
    return ours is not None and current.metadata.get(env.H_KEY) == ours


class Conflicts:
    """The upload-time check of one mount (see the module doc). ``count``: conflict copies made;
    ``recent``: the last RECENT_MAX of their paths."""

    def __init__(self, store: ObjectStore, naming: Naming, uploader: Uploader, host: str | None = None,
                 in_use: Callable[[str], bool] = lambda path: False):
        self.store = store
        self.naming = naming
        self.uploader = uploader
        self.in_use = in_use  # whether this mount holds a node at a path (not for a conflict copy's name)
        # (key, what is there): not None when that is a failed rename's late copy, taken back
        # just now (set by Filesystem: latecopies.take_back_at); it is no other client's version
        self.late_copy: Callable[[str, ObjectInfo], Awaitable[str | None]] = _no_late_copy
        self.host = host or socket.gethostname().split(".")[0] or "host"
        self.count = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=RECENT_MAX)
        # inode → the ETag its next upload may replace, when that is not node.version's:
        # BASE_UNKNOWN for a version recovered from a record without one (not checked)
        self._base: dict[int, str | None] = {}
        # key → the ETag this mount's last upload put there (normalised), for the last
        # _OURS_MAX keys: a node renamed over another whose upload was still in flight finds
        # that upload's object, which is ours, not a foreign edit (git's config.lock → config
        # right after config was first written)
        self._ours: collections.OrderedDict[str, str] = collections.OrderedDict()
        # node ino → wrapped data keys of its versions sent since its last upload seen to
        # succeed (``sent``); journaled with each newer version of it
        self._sent: dict[int, set[str]] = {}
        # the mount's pending deletes (set by the Filesystem): an upload to a key ends the
        # pending deletes of that key's older versions (DeferredDeletes.superseded)
        self.deferred: DeferredDeletes | None = None

    def base_of(self, node: Node) -> str | None:
        """The ETag ``node``'s next upload may replace (None: none, a create-only upload;
        BASE_UNKNOWN: not checked), as the journal records it."""
        return self._base.get(node.ino, node.version.etag if node.version is not None else None)

    def recovered(self, node: Node, base: str | None, sent: tuple[str, ...] = ()) -> None:
        """``node``'s staged version came from the journal, whose record gave ``base``
        (``base_of`` of the run that wrote it; BASE_UNKNOWN for a record without one) and
        ``sent`` (:meth:`sent`; the caller adds the version's own wrapped key: the run that
        crashed may have sent its upload, which then lands late, also after a newer version
        of this mount superseded it: a trial's next save went to a conflict copy)."""
        self._base[node.ino] = base
        if sent:
            self._sent[node.ino] = set(sent)

    def sent(self, node: Node) -> tuple[str, ...]:
        """The wrapped data keys of ``node``'s versions whose upload this mount (or the run whose
        journal it recovered) sent without having seen it succeed: an object carrying one is
        ours, however it came there (an answer lost, or a PUT that landed after a crash, found
        by a trial), not another client's edit."""
        return tuple(self._sent.get(node.ino, ()))

    def replaces(self, node: Node, etag: str | None) -> None:
        """``node`` (staged, not in the bucket yet) was renamed over a file whose version
        ``etag`` this mount knew: its upload replaces that version knowingly (an editor's
        write-temp-then-rename), not as a conflict."""
        self._base[node.ino] = etag

    def saved_base(self, node: Node) -> tuple[bool, str | None]:
        """What :meth:`restore_base` puts back: whether ``node`` has a base of its own, and it."""
        return node.ino in self._base, self._base.get(node.ino)

    def restore_base(self, node: Node, saved: tuple[bool, str | None]) -> None:
        """Undo :meth:`replaces` (a rename that failed before it moved anything)."""
        if saved[0]:
            self._base[node.ino] = saved[1]
        else:
            self._base.pop(node.ino, None)

    def replaced(self, node: Node) -> str | None:
        """The ETag of the object ``node`` (staged, never uploaded) replaces — set by a rename
        over a known file or by its journal record —, which is still in the bucket at its name
        until ``node``'s upload overwrites it; else None."""
        base = self._base.get(node.ino)
        return None if base == BASE_UNKNOWN else base

    def base_unknown_for(self, node: Node) -> bool:
        """Whether ``node``'s staged version came from a journal record without a base (what it
        replaces is unknown)."""
        return self._base.get(node.ino) == BASE_UNKNOWN

    def ours_at(self, key: str) -> str | None:
        """The ETag of this mount's last upload to ``key`` (remembered for the last keys), or None."""
        return self._ours.get(key)

    async def keep_theirs(self, key: str, current: ObjectInfo, known: str | None) -> None:
        """A rename is about to replace ``current`` at ``key``, another client's object this
        mount did not know (it knew version ``known``; None: no object): copy it to a conflict
        name next to it first (kept, one WARNING, counted). Raises StoreError (the copy;
        PreconditionFailed: it changed again)."""
        for ckey in self._names(key):
            try:
                info = await self.uploader.copy(current, ckey, if_absent=True)
                break
            except AlreadyExists:
                continue
        else:
            info = await self.uploader.copy(current, ckey)  # 100 names taken: the last one
        self.count += 1
        path = self.naming.path_of(ckey)
        self.recent.append(path if path is not None else ckey)
        log.warning("%r was changed by another client (this mount knew %s, the bucket has %s) and a rename "
                    "replaces it: theirs is kept as %r (version %s)", key,
                    f"version {known}" if known else "no object there", current.etag, ckey, info.etag)

    def _names(self, key: str) -> Iterator[str]:
        """The conflict keys to try for ``key``, in order (up to 100; the last one is yielded
        whatever happens), skipping those at a path this mount holds a node for (``in_use``): a
        name free in the bucket may still be this mount's, e.g. an earlier conflict copy its
        node followed that another client has since renamed away; the node of the new copy
        could not follow it there, and would stay at the original name holding the copy's
        version (a two-mount model search: a later rename over that name then kept the other
        client's file as a second, needless conflict copy)."""
        for n in range(100):
            ckey = conflict_key(key, self.naming.prefix, self.host, time.time(), n)
            path = self.naming.path_of(ckey)
            if n < 99 and path is not None and self.in_use(path):
                continue
            yield ckey

    def _remember(self, key: str, etag: str) -> None:
        """Note that this mount's upload put ``etag`` at ``key`` (bounded: the oldest keys go)."""
        self._ours[key] = etag.strip('"').upper()
        self._ours.move_to_end(key)
        while len(self._ours) > _OURS_MAX:
            self._ours.popitem(last=False)

    async def upload(self, node: Node, staged: StagedFile, key: str, metadata: dict[str, str]) -> ObjectInfo:
        """Upload ``staged`` for ``node`` (node.lock held) to ``key`` if the bucket still has the
        version this mount started from (or nothing), else to a conflict copy next to it.
        Returns the new object: its ``key`` says where it went. Raises StoreError (the HEAD or
        the upload failed: the caller keeps the data staged and retries)."""
        base = self.base_of(node)
        mark = self.deferred.mark() if self.deferred is not None else 0
        if metadata.get(env.H_KEY):
            self._sent.setdefault(node.ino, set()).add(metadata[env.H_KEY])
        if base == BASE_UNKNOWN:
            return self._uploaded(node, key, mark, await self.uploader.upload(staged, key, metadata))
        if base is None:
            # a file this mount created: create only, atomically (no HEAD first, no window)
            try:
                return self._uploaded(node, key, mark, await self.uploader.upload(staged, key, metadata, if_absent=True))
            except AlreadyExists:
                pass  # taken: by another client, or by an attempt of ours whose answer was lost
        current = await self._unless_late_copy(node, key, base, metadata, await self.store.head(key))
        refusals = 0
        while self._may_replace(node, key, base, metadata, current):
            try:
                return self._uploaded(node, key, mark, await self._replace(staged, key, metadata, current))
            except _ChangedMeanwhile as e:  # (checked again: another client's sends ours to a conflict copy)
                current = await self._unless_late_copy(node, key, base, metadata, e.now)
            except DestinationChanged:  # written between our HEAD and our write: look again
                current = await self._unless_late_copy(node, key, base, metadata, await self.store.head(key))
            refusals += 1
            if refusals > _REFUSALS_MAX:
                raise StoreError(f"the object changed under {refusals} uploads in a row; the upload is tried "
                                 "again later", key=key)
        assert current is not None
        for ckey in self._names(key):
            try:
                info = await self.uploader.upload(staged, ckey, metadata, if_absent=True)
                break
            except AlreadyExists:
                continue
        else:
            info = await self.uploader.upload(staged, ckey, metadata)  # 100 names taken: the last one
        self._base.pop(node.ino, None)
        self._sent.pop(node.ino, None)
        if self.deferred is not None:
            self.deferred.superseded(key, mark, by=current.etag)  # what ours was to overwrite is gone too
        self.count += 1
        path = self.naming.path_of(ckey)
        self.recent.append(path if path is not None else ckey)
        log.warning("%r was changed by another client (this mount started from version %s, the bucket "
                    "has %s): kept theirs, ours is uploaded as %r (version %s)", key,
                    base or "none (a new file)", current.etag, ckey, info.etag)
        return info

    async def _unless_late_copy(self, node: Node, key: str, base: str | None, metadata: dict[str, str],
                                current: ObjectInfo | None) -> ObjectInfo | None:
        """``current`` (what is at ``key``), or what is there once a failed rename's late copy
        found there is taken back (:attr:`late_copy`): that is no other client's version, and
        must not send ``node``'s upload to a conflict copy. Raises StoreError."""
        if current is not None and not self._may_replace(node, key, base, metadata, current) \
                and await self.late_copy(key, current) is not None:
            return await self.store.head(key)
        return current

    def _may_replace(self, node: Node, key: str, base: str | None, metadata: dict[str, str],
                     current: ObjectInfo | None) -> bool:
        """Whether ``node``'s upload (``metadata``, started from version ``base``) may replace
        ``current`` at ``key``: nothing there, the version this mount started from, an
        earlier attempt of this same version or of this node's, this mount's own last upload, or
        a request of this mount's that landed late over it (``ObjectStore.landed_over_ours``: a
        break trial's save went to a conflict copy, the name kept the older late version)."""
        return (current is None or (base is not None and same_etag(current.etag, base))
                or _same_version(current, metadata) or same_etag(current.etag, self._ours.get(key))
                or current.metadata.get(env.H_KEY) in self._sent.get(node.ino, ())
                or self.store.landed_over_ours(key, current))

    async def _replace(self, staged: StagedFile, key: str, metadata: dict[str, str],
                       seen: ObjectInfo | None) -> ObjectInfo:
        """Upload ``staged`` over ``seen`` at ``key`` (None: nothing there). The write states
        what it replaces: a store that checks it atomically closes the HEAD-to-PUT window
        (DestinationChanged; OSS checks only "nothing there"). Raises _ChangedMeanwhile,
        DestinationChanged, StoreError."""
        async def still_seen() -> None:
            # a multipart upload takes minutes: another client's version written meanwhile
            # must not be overwritten (a trial: it was, silently); the window left is this
            # HEAD's round trip, as for a PUT. (Deleted meanwhile: ours goes back, as ever.)
            now = await self.store.head(key)
            if now is not None and (seen is None or not same_etag(now.etag, seen.etag)):
                raise _ChangedMeanwhile(now)

        return await self.uploader.upload(staged, key, metadata, if_absent=seen is None,
                                          replaces=None if seen is None else seen.etag, before_complete=still_seen)

    def _uploaded(self, node: Node, key: str, mark: int, info: ObjectInfo) -> ObjectInfo:
        """Book an upload to ``key`` that went where it was meant to (started at the pending
        deletes' ``mark``); returns ``info``."""
        self._base.pop(node.ino, None)
        self._sent.pop(node.ino, None)  # the bucket has this one: the next upload's base
        self._remember(key, info.etag)
        if self.deferred is not None:
            self.deferred.superseded(key, mark)
        return info

    def status(self) -> dict:
        """For ``ossfuse status``: {"count": int, "recent": [paths]}."""
        return {"count": self.count, "recent": list(self.recent)}


async def _no_late_copy(key: str, there: ObjectInfo) -> str | None:
    return None


__all__ = ["Conflicts", "conflict_key", "conflict_name", "RECENT_MAX"]
