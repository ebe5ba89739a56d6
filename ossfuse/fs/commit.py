"""The filesystem's side of write-back: journaling a node's staged version, uploading it and
taking the uploaded version as the node's committed one, and turning the journal of an earlier
run into dirty nodes at mount time. When uploads happen is ``writeback.scheduler``'s part."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable

import trio

from .. import envelope as env
from .. import integrity
from ..cache import BlockCache
from ..cmk import CmkUnavailable, KeyMissing
from ..keyring import Keyring
from ..store.base import ObjectInfo, StoreError, same_etag
from ..store.health import StoreOffline
from ..store.indoubt import PUT_BACK_ELSEWHERE, REPLACED_SINCE
from ..writeback import journal
from ..writeback.scheduler import UploadScheduler
from ..writeback.staging import StagedFile, Staging
from ..writeback.upload import Uploader
from .conflicts import Conflicts
from .errors import ErrorsOnce, FsError, NoRoom, errno_of
from .inodes import InodeTable
from .model import Node, OpaqueEnvelope, Version, handles_follow, parse_wrapped, set_local_version
from .naming import Naming, base_name, parent_of
from .objmeta import file_metadata, parse_mtime
from .resolve import Resolver

log = logging.getLogger(__name__)

INLINE_SEAL_MAX = 64 << 10  # bytes: a version this small is sealed on the event loop (issue 14)


def _torn(st: StagedFile, meta: dict[str, str]) -> str | None:
    """Why journaled ``st`` (envelope unwrapped) does not hold the ciphertext its record's
    integrity tags were sealed over (None: it does, or it has no tags to check). Journal
    records are not fsynced (docs/design.md "Durability"): after a power loss a record may
    survive while its data file's blocks read as zeros. Blocking: reads the whole data file."""
    try:
        spec = integrity.parse(meta)
    except integrity.IntegrityError as e:
        return str(e)
    if spec is None:
        return None
    k = integrity.tag_key(st.envelope.data_key, st.envelope.iv)
    try:
        tags = integrity.tags_of_file(st.data_path, k, spec.block, st.size)
    except OSError as e:
        return f"its data file cannot be read: {e}"
    good = (tags == spec.tags if spec.tags is not None
            else integrity.list_root(k, spec.block, st.size, tags) == spec.root)
    return None if good else "its data does not match the integrity tags it was journaled with (lost in a power loss?)"


def _sans_request_id(reason: str) -> str:
    """``reason`` (a StoreError's text) without the ``[request id …]`` the server gave it."""
    return reason.split(" [request id ", 1)[0]


def _closed_base(st: StagedFile) -> StagedFile | None:
    """The newest version below open version ``st`` that a close sealed and journaled and that
    is not in the bucket yet (None: there is none; the bucket has what was closed)."""
    below = st.base
    while below is not None:
        if below.committed:
            return None
        if below.sealed and below.was_journaled:
            return below
        below = below.base
    return None


# seconds a rename or unlink waits for an upload in flight before one line says so
_SAY_WAIT = 2.0


class Commit:
    """Journal and upload of staged versions (see the module doc)."""

    def __init__(self, naming: Naming, inodes: InodeTable, resolver: Resolver, scheduler: UploadScheduler,
                 uploader: Uploader, cache: BlockCache, keyring: Keyring, staging: Staging):
        self.naming = naming
        self.inodes = inodes
        self.resolver = resolver
        self.scheduler = scheduler
        self.uploader = uploader
        self.cache = cache
        self._seal_errors = ErrorsOnce(log)  # failed seals said once per file and errno, until saved
        self.keyring = keyring
        self.staging = staging
        self._upload_locks: dict[Node, trio.Lock] = {}  # one upload per node at a time
        self._putting_back: dict[str, trio.Event] = {}  # key → set when its running put-back ends
        self._uploads: dict[Node, int] = {}  # node → uploads of it running or waiting to run
        self.conflicts = Conflicts(uploader.store, naming, uploader,  # foreign edits kept (issue 12)
                                   in_use=lambda path: path in inodes.by_path)
        # (parent inode, name): the kernel's cached entry no longer names the node it did (set
        # by the FUSE adapter: an entry invalidation; never blocks, never raises)
        self.entry_moved: Callable[[int, str], None] = lambda parent_ino, name: None

    def staged_in(self, dir_path: str) -> list[Node]:
        """This mount's not-yet-uploaded nodes still linked directly in directory ``dir_path``
        (a listing of the store does not show them)."""
        return self.scheduler.staged_in(dir_path, parent_of)

    async def seal(self, node: Node, *, may_wait: Callable[[], bool] | None = None) -> None:
        """Seal ``node``'s staged version (node.lock held): its final ciphertext is written
        once, in a worker thread, and never changes again. Raises FsError with the errno of an
        earlier failed write (an incomplete version never replaces the last good one) or of
        the staging disk (ENOSPC, EIO); NoRoom instead of ENOSPC (not logged, nothing changed)
        when ``may_wait()`` says the caller waits for room then (``Files.flush``)."""
        st = node.staged
        if st is None or st.sealed:
            return
        key = self.naming.key(node.path)
        if st.write_error is not None:
            log.error("%r is not saved: an earlier write to it failed (%s)", key, os.strerror(st.write_error))
            raise FsError(st.write_error)
        if st.rekey or (st.seal_attempt is not None and st.seal_attempt != st.generation and not st.direct):
            # the envelope's keystream encrypted other bytes on this disk (a demoted direct
            # version, or a seal that failed half-way): a new key and IV. A direct version
            # whose seal failed keeps its key: it never wrote a position twice
            try:
                st.envelope = await trio.to_thread.run_sync(self.keyring.new_envelope, node.path)
            except (CmkUnavailable, env.EnvelopeError) as e:
                log.error("cannot save %r: no data key: %s", key, e)
                raise FsError(errno_of(e)) from None
            st.rekey = False
        st.seal_attempt = st.generation
        other = file_metadata(node, st.envelope.wrapped, st.size)
        envelope, prefix = st.envelope, self.naming.prefix

        def seal_and_tag() -> integrity.SealedTags:
            st.seal_data()
            # the integrity tags of the final ciphertext (docs/integrity.md), read back from
            # the page cache; they depend only on the data key, IV and bytes, never the name
            return integrity.seal(st.data_path, envelope.data_key, envelope.iv, st.size, other, prefix)
        async def attempt() -> integrity.SealedTags:
            if st.size <= INLINE_SEAL_MAX:  # a thread hand-off costs more than sealing this
                return seal_and_tag()
            return await trio.to_thread.run_sync(seal_and_tag)
        try:
            # the sealed file did not fit, nothing changed: cached blocks make room, as for a
            # write (a trial: close() failed while most of the disk was droppable); one that
            # failed half-way changed the version, and is not tried again
            st.tags = await self.cache.with_room_async(attempt, need=st.size,
                                                       retry_if=lambda: st.write_error is None)
        except OSError as e:
            st.close()  # reopened when used: a failed seal holds no descriptor (a trial ran out of them)
            if st.write_error is None and e.errno == errno.ENOSPC and may_wait is not None and may_wait():
                raise NoRoom() from None
            if st.write_error is not None:  # converted half-way: the version is lost (revert_failed)
                log.error("staging %r failed half-way; its changes since its last good version are discarded: %s",
                          key, e)
            else:
                # a seal that cannot get its space fails each retry alike (retry_interval): one
                # ERROR line per file and reason until it is saved (a trial: 23 lines in 70 s)
                self._seal_errors.error("staging %r failed, the data is not safe yet: %s", key, e,
                                        same=(str(e.errno),))
            raise FsError(errno_of(e)) from None
        st.finish_seal()
        self._seal_errors.over(key)

    @staticmethod
    def metadata(node: Node, st: StagedFile) -> dict[str, str]:
        """All user metadata of sealed ``st`` as ``node``'s object: envelope, attributes and
        the integrity tag header."""
        meta = file_metadata(node, st.envelope.wrapped, st.size)
        if st.tags is not None:
            meta.update(st.tags.headers)
        return meta

    async def journal_node(self, node: Node, *, may_wait: Callable[[], bool] | None = None,
                           uploading: bool = False) -> dict[str, str] | None:
        """Seal and durably record ``node``'s staged version (node.lock held); returns the
        object metadata recorded (None when nothing is staged or the node is unlinked). Once
        recorded, the version it was derived from is superseded: its record and data go.
        Raises FsError(ENOSPC/EIO), or NoRoom (``may_wait``: :meth:`seal`). ``uploading``:
        the caller uploads it next, and a record the full cache disk has no room for is left
        out (the upload makes the version safe; one INFO line): staged versions waiting for an
        upload that needed room for a record first would never free the disk (a break trial:
        1,731 sealed versions, none uploaded, lost at unmount)."""
        st = node.staged
        if st is None or node.unlinked:
            return None
        await self.seal(node, may_wait=may_wait)
        meta = self.metadata(node, st)
        self._record(node, st, meta, may_wait=may_wait, uploading=uploading)
        return meta

    def _record(self, node: Node, st: StagedFile, meta: dict[str, str], path: str | None = None, *,
                may_wait: Callable[[], bool] | None = None, uploading: bool = False) -> None:
        key = self.naming.key(path or node.path)
        try:  # (a full disk: cached blocks make room for the record, as for a write)
            self.cache.with_room(lambda: journal.record(
                st, key, meta, self.conflicts.base_of(node), self.conflicts.sent(node),
                node.dirty_since if node in self.scheduler.dirty else None), need=1 << 20)
        except OSError as e:
            if uploading and e.errno == errno.ENOSPC:
                log.info("no room on the cache disk for the journal record of %r; it is uploaded without one", key)
                return
            if e.errno == errno.ENOSPC and may_wait is not None and may_wait():
                raise NoRoom() from None
            log.error("journaling %r failed, the data is not safe yet: %s", key, e)
            raise FsError(errno_of(e)) from None
        self._drop_bases(st)  # superseded by this journaled version

    @staticmethod
    def _drop_bases(st: StagedFile) -> None:
        """Discard the versions ``st`` was derived from (each derived from the next)."""
        base, st.base = st.base, None
        while base is not None:
            base.discard()
            below, base.base = base.base, None
            base = below

    def took_name(self, old: Node, new: Node) -> None:
        """``new`` was renamed over ``old``: ``old``'s pending upload passes to ``new``
        (``UploadScheduler.took_name``)."""
        self.scheduler.took_name(old, new)

    def vacated(self, node: Node) -> None:
        """``node`` loses its name (before its staged version is dropped): a file that takes
        the name soon inherits its queued upload (``UploadScheduler.vacated``)."""
        self.scheduler.vacated(node)

    def took_path(self, path: str, node: Node) -> None:
        """``node`` was renamed to ``path``, where no file was (``UploadScheduler.took_path``)."""
        self.scheduler.took_path(path, node)

    @staticmethod
    def journaled(node: Node) -> bool:
        """Whether a crash brings back a staged version of ``node`` (one of its staged versions
        has a journal record: the last closed one, below an open one)."""
        st = node.staged
        while st is not None and not st.was_journaled:
            st = st.base
        return st is not None

    def rejournal(self, node: Node, path: str | None = None) -> None:
        """``node``'s name, attributes or base version changed: if its staged version is
        journaled, record it again (same sealed data, new key/metadata/base) so a crashed
        daemon's next mount uploads it with them; at ``path`` instead of its own (a rename
        about to move it there). Raises FsError(ENOSPC/EIO)."""
        st = node.staged
        if st is None or node.unlinked:
            return
        if st.was_journaled:
            self._record(node, st, self.metadata(node, st), path)
            return
        # an open version above a journaled one (the file reopened after a close): a crash
        # brings the journaled one back, so its record follows the name; its attributes stay
        # its own (new ones join the open version's changes, saved at its close, as for a
        # file whose last saved version is in the bucket)
        below = st.base
        while below is not None and not below.was_journaled:
            below = below.base
        if below is not None and below.journaled_record is not None:
            self._record(node, below, below.journaled_record["metadata"], path)

    def forget_journal(self, node: Node) -> None:
        """``node`` was unlinked while open: its staged versions must not come back after a
        crash (records removed durably; the data stays for the open handles)."""
        st = node.staged
        while st is not None:
            st.forget_record()
            st = st.base

    def drop_staged(self, node: Node) -> None:
        """Forget ``node``'s staged version and what it was derived from (unlinked): data and
        journal records go."""
        if node.staged is not None:
            node.staged.discard()
            self._drop_bases(node.staged)
        node.staged = None
        self.scheduler.mark_clean(node)

    def revert_failed(self, node: Node) -> None:
        """``node``'s open staged version had a failed write: drop it and go back to the last
        good version (the sealed one it was derived from, or the committed one)."""
        st = node.staged
        if st is None or st.write_error is None:
            return
        base, st.base = st.base, None
        st.discard()
        if base is not None and not base.committed:
            node.staged = base
            good = base.journaled_record["metadata"] if base.journaled_record is not None else {}
        elif base is None and node.version is None:
            # a new file: its last good version is empty; in slots, and under a fresh key at its
            # seal (the failed version may have written final bytes under this one)
            node.staged = self.staging.new(st.envelope, direct=False)
            node.staged.rekey = True
            good = {}
        else:
            if base is not None:
                base.discard()
            node.staged = None
            self.scheduler.mark_clean(node)
            good = node.version.metadata if node.version is not None else {}
            if node.version is not None:
                node.size = node.version.size
        # the writes are gone, so is the mtime they set (a trial: old content, new mtime)
        mtime = parse_mtime(good.get("mtime"))
        if mtime is not None:
            node.mtime_ns = mtime
        # INFO: the failed write, truncate or seal said so in its own ERROR line (one per event)
        log.info("%r: the changes since its last good version are discarded after a failed write",
                 self.naming.key(node.path))

    def pending_report(self) -> tuple[list[tuple[str, str | None]], list[str]]:
        """After the drain at unmount: the pending files that have a journaled version (the
        next mount uploads it), as (mount-relative path, the last upload failure or None), by
        path; and the paths (mount-relative) of pending files whose newest
        changes have no journal record (their seal failed: a full cache disk), each with one
        ERROR line naming the object, the reason and what is kept. Those changes die with this
        process (the work file's key is in memory only; the next mount deletes the work file
        with a warning)."""
        journaled: list[tuple[str, str | None]] = []
        lost: list[str] = []
        for node in sorted(self.scheduler.pending(), key=lambda n: n.path):
            st = node.staged
            if st is None or node.unlinked:
                continue
            saved = st
            while saved is not None and not saved.was_journaled:
                saved = saved.base
            if saved is not None:
                journaled.append((node.path, node.upload_error))
            if saved is st:
                continue
            if saved is not None:
                kept = f"its last saved version ({saved.size} bytes) stays journaled and uploads at the next mount"
            elif node.version is not None:
                kept = f"the bucket keeps its last version ({node.version.size} bytes)"
            else:
                kept = "the bucket has no version of it"
            log.error("%r: its last changes (a version of %d bytes) could not be saved in the cache dir (%s) and are lost "
                      "when this daemon exits; %s", self.naming.key(node.path), st.size,
                      node.upload_error or "not sealed", kept)
            lost.append(node.path)
        return journaled, lost

    def mark_staged(self, node: Node) -> None:
        """``node`` has just been given a staged version."""
        self.scheduler.mark_dirty(node)

    async def upload_node(self, node: Node, *, raise_errors: bool = False, journal_first: bool = True,
                          closed_only: bool = False) -> bool:
        """Upload ``node``'s staged version if it has one; True when it is in the bucket (or
        nothing was staged). The version is sealed (and journaled when ``journal_first``; False
        only from close(), which journals if the upload failed) under node.lock; the network
        call runs without it, on that immutable snapshot, so writers never wait for it (a
        write meanwhile makes a new staged version). ``closed_only`` (the queued uploads): a
        version a writer has open again after a close is left to that writer's close, and the
        closed version beneath it goes up instead (True then means nothing more to do now).
        One upload per node at a time. Raises FsError(EIO, or the staging disk's errno) on
        failure when ``raise_errors``, else logs it and returns False."""
        self._uploads[node] = self._uploads.get(node, 0) + 1
        try:
            async with self._upload_slot(node):
                ok = await self._upload(node, raise_errors, journal_first, closed_only)
        finally:
            self._uploads[node] -= 1
            if not self._uploads[node]:
                del self._uploads[node]
        if raise_errors:  # fsync(), or a close that waits: in the bucket means durable there
            await self.sync_store(raise_errors=True)
        return ok

    async def sync_store(self, *, raise_errors: bool = False) -> bool:
        """The store's durability barrier (``ObjectStore.sync``: a local store's syncfs; nothing
        on OSS). False (logged) when it fails; FsError(EIO) then with ``raise_errors``."""
        try:
            await self.uploader.store.sync()
            return True
        except StoreError as e:
            log.error("making the store durable failed: %s", e)
            if raise_errors:
                raise FsError(errno.EIO) from None
            return False

    def upload_running(self, node: Node) -> bool:
        """Whether an upload of ``node`` runs or waits to run now (from its start until it has
        adopted the result). Checked by unlink and rename under ``node.lock``: an upload that
        starts after that check finds the node unlinked or renamed when it takes the lock to
        seal, and puts nothing at the old name."""
        return node in self._uploads

    async def upload_settled(self, node: Node) -> None:
        """Return once no upload of ``node`` is in flight. The caller holds no lock (no name
        lock, no node lock): unlink and rename wait here, then lock and check
        :meth:`upload_running` again (docs/design.md, "Locks and what they protect"). A wait
        past :data:`_SAY_WAIT` seconds is said in an INFO line at its start and end: the kernel
        holds the directory meanwhile, and other work there waits too (break trial BT16 F3: 28 s
        of a slow store's PUT, with no line)."""
        if node not in self._upload_locks:
            return
        with trio.move_on_after(_SAY_WAIT):
            async with self._upload_slot(node):
                return
        started = trio.current_time() - _SAY_WAIT
        key = self.naming.key(node.path)
        log.info("a rename or unlink of %r waits for its upload in flight (a slow store; the kernel holds its "
                 "directory meanwhile)", key)
        async with self._upload_slot(node):
            pass
        log.info("the upload of %r that a rename or unlink waited for ended after %.1f s", key,
                 trio.current_time() - started)

    @contextlib.asynccontextmanager
    async def _upload_slot(self, node: Node) -> AsyncIterator[None]:
        """Hold ``node``'s upload lock (one upload, or put-back, of a node at a time; the lock
        goes once nobody holds or waits for it)."""
        lock = self._upload_locks.get(node)
        if lock is None:
            lock = self._upload_locks[node] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._upload_locks.pop(node, None)

    async def put_back(self, key: str, etag: str, now_there: ObjectInfo | None,
                       known: tuple[int, dict[str, str]] | None = None) -> str | None:
        """Put this mount's committed version (``key``, ``etag``) back in the bucket, where a
        request in doubt that landed late replaced it with ``now_there`` (None: deleted it;
        store/indoubt.py ``InDoubt.check_due``; a rename's late copy, fs/latecopies.py): from
        the block cache, where this mount's upload left the ciphertext (``BlockCache.adopt``)
        or reads brought it, under the node's upload lock (no node lock is held across the
        PUT). One put-back of a key at a time: another one waits for it, then returns
        ``indoubt.PUT_BACK_ELSEWHERE`` (two looks at once put the same version back twice, each
        with its WARNING line: a break trial). Returns None once it is back,
        ``indoubt.REPLACED_SINCE`` when the key holds a newer version this mount saved since
        (a HEAD), else why it cannot be: the name holds another version in this mount now
        (saved again, renamed, removed), or this mount no longer holds the version's metadata,
        data key or every block of it. ``known``: the version's (size in bytes, user metadata)
        as a rename's log kept them (``latecopies.written_now``), for a file this mount holds
        no node of, or a slim one (a remount that never looked it up, or listed it:
        :meth:`_put_back_known`). Raises StoreError when a request fails."""
        running = self._putting_back.get(key)
        if running is not None:
            await running.wait()
            return PUT_BACK_ELSEWHERE
        done = self._putting_back[key] = trio.Event()
        try:
            return await self._put_back(key, etag, now_there, known)
        finally:
            del self._putting_back[key]
            done.set()

    async def _put_back(self, key: str, etag: str, now_there: ObjectInfo | None,
                        known: tuple[int, dict[str, str]] | None) -> str | None:
        """The body of :meth:`put_back`."""
        path = self.naming.path_of(key)
        # (one the kernel forgot: as last known, as a lookup would give it back; a full suite's
        # drop_caches made the unmount's check say "no longer holds that file")
        node = (self.inodes.by_path.get(path) or self.inodes.last_dropped(path)) if path is not None else None
        version = node.version if node is not None and not node.unlinked else None
        if node is None and known is not None:
            return await self._put_back_known(key, etag, now_there, *known)
        if node is None:
            return "this mount no longer holds that file (moved, removed, forgotten by the kernel, or not looked up " \
                   "since this mount started)"
        if version is not None and now_there is not None and same_etag(version.etag, now_there.etag):
            return "this mount has since taken the late version for the file's current one"
        if version is None or not same_etag(version.etag, etag):
            return await self._moved_on(key, version)
        # a slim version (a listing or lookup after a remount made the node: break trial BT15b,
        # `ls` before the landing, and the version was lost) goes back as the log kept it
        slim = not version.held or version.envelope is None
        if slim and known is None:
            return "this mount no longer holds its metadata and data key"
        async with self._upload_slot(node):
            if node.version is not version or node.unlinked:  # (an upload of a newer one ended meanwhile)
                return await self._moved_on(key, None if node.unlinked else node.version)
            if slim:
                assert known is not None  # (checked above)
                return await self._put_back_known(key, etag, now_there, *known)
            meta, envelope = version.metadata, version.envelope
            assert envelope is not None  # (not slim)
            if stat.S_ISLNK(node.mode) and node.symlink_target is not None:
                # its body is its target, encrypted: the same bytes again (break trial BT15: a
                # symlink's object has no blocks in the cache, and it was lost to the landing)
                body = envelope.crypt(0, node.symlink_target.encode("utf-8", "surrogateescape"))
                info: ObjectInfo | str = await self.uploader.store.put_bytes(key, body, meta)
            else:
                info = await self._put_cached(key, etag, version.size, meta, envelope, now_there)
            if isinstance(info, str):
                return info
        if not same_etag(info.etag, etag):  # (the store made another ETag of the same bytes)
            async with node.lock:
                if node.version is version:
                    self.cache.rekey(key, etag, key, info.etag)
                    set_local_version(node, Version(key, info.etag, version.size, meta, version.wrapped, envelope))
                    if node.staged is not None:  # its journal record names its base by ETag
                        try:
                            self.rejournal(node)
                        except FsError as e:
                            log.error("cannot journal the newer version of %r: %s", key, e)
        return None

    async def _put_back_known(self, key: str, etag: str, now_there: ObjectInfo | None, size: int,
                              meta: dict[str, str]) -> str | None:
        """:meth:`_put_back` of a version whose metadata this mount does not hold (``size``
        bytes, user metadata ``meta``, from a rename's log: a remount that never looked the
        file up, break trial BT14 3 said it lost; or one whose node a listing made, slim):
        its data key from the keyring (the data-key cache holds what this machine wrapped),
        its ciphertext from the block cache. With no node, no upload lock to take, and none
        needed: a lookup of the name waits for this (its look at the watched name,
        :meth:`put_back`'s one-at-a-time), and no node means no upload of that name of this
        mount's; a caller with a node holds its upload lock."""
        wrapped = parse_wrapped(meta)
        if not isinstance(wrapped, env.WrappedEnvelope):  # (a plaintext or corrupt one: never ours)
            return "its envelope is not in the rename's log"
        try:
            envelope = self.keyring.cached_envelope(wrapped)
            if envelope is None:
                envelope = await trio.to_thread.run_sync(self.keyring.open_envelope, wrapped, None, False)
        except (KeyMissing, CmkUnavailable, env.EnvelopeError) as e:
            return f"its data key cannot be unwrapped ({e})"
        info = await self._put_cached(key, etag, size, meta, envelope, now_there)
        if isinstance(info, str):
            return info
        if not same_etag(info.etag, etag):  # (the store made another ETag of the same bytes)
            self.cache.rekey(key, etag, key, info.etag)
        return None

    async def _put_cached(self, key: str, etag: str, size: int, meta: dict[str, str], envelope: env.Envelope,
                          now_there: ObjectInfo | None) -> ObjectInfo | str:
        """PUT version (``key``, ``etag``) of ``size`` bytes back with ``meta``, its ciphertext
        from the block cache, every block checked against its integrity tags right before (also
        those a read checked earlier: break trial BT15b flipped a byte of the cache file, and
        the put-back sent it to the bucket; ``BlockCache.check_whole``); its result, or why it
        cannot be. Raises StoreError."""
        if not size:
            return await self.uploader.store.put_bytes(key, b"", meta)
        try:
            tags = await self.cache.tags_for(key, etag, size, meta, envelope.data_key, envelope.iv)
        except integrity.IntegrityError as e:
            return f"its integrity tags cannot be read ({e})"
        if tags is None:  # (every version this mount writes has tags: nothing vouches for these bytes)
            return "it has no integrity tags to check its cached blocks against"
        if damaged := self.cache.check_whole(key, etag, tags):
            return f"{damaged} block(s) of it in this machine's cache are damaged (they fail their checks)"
        with self.cache.whole_file(key, etag, size) as cached:
            if cached is None:
                return "not every block of it is in this machine's cache"
            try:
                return await self.uploader.put_back(cached, size, key, meta, envelope.data_key, envelope.iv,
                                                    replaces=now_there.etag if now_there else None)
            except OSError as e:  # (the cache file: dropped meanwhile, unreadable)
                return f"reading it from this machine's cache failed: {e}"

    async def _moved_on(self, key: str, version: Version | None) -> str:
        """Why an older version of ``key`` is not put back, ``version`` being this mount's
        current one: ``indoubt.REPLACED_SINCE`` when the key holds it (a HEAD: its upload went
        up after the landing, a break trial's fsync 2 ms after it), else that this mount has
        another version there. Raises StoreError."""
        if version is not None and (now := await self.uploader.store.head(key)) is not None \
                and same_etag(now.etag, version.etag):
            return REPLACED_SINCE
        return "this mount has another version there now"

    def _failed(self, node: Node, key: str, e: Exception, raise_errors: bool) -> bool:
        """One failed upload attempt of ``node`` (object ``key``): counted and logged in one
        line, an ERROR the first time and whenever the reason changes, INFO for a retry failing
        the same way (a full or unreachable bucket must not flood the log every retry
        interval). Raises FsError(errno_of(e): EIO, ENOSPC when the bucket's disk is full or
        the error came from the staging disk) when ``raise_errors``, else returns False."""
        reason = str(e) or os.strerror(errno_of(e))
        # the same failure again: each attempt's answer has its own request id (a trial saw a
        # 403 logged as two ERROR lines, one from fsync and one from the queued upload)
        again = node.upload_error is not None and _sans_request_id(node.upload_error) == _sans_request_id(reason)
        node.upload_error = reason
        self.scheduler.stats["upload_failures"] += 1
        if isinstance(e, StoreOffline):
            # the outage has its one WARNING (store/health.py): INFO once, then DEBUG each
            # retry_interval for as long as it lasts
            level = logging.DEBUG if again else logging.INFO
        elif isinstance(e, FsError):
            level = logging.INFO  # sealing/journaling: logged where it failed, with the cause
        else:
            level = logging.INFO if again else logging.ERROR
        log.log(level, "upload of %r failed; the data stays staged and will be retried: %s", key, reason)
        if raise_errors:
            raise FsError(errno_of(e)) from None
        return False

    async def _upload(self, node: Node, raise_errors: bool, journal_first: bool, closed_only: bool) -> bool:
        async with node.lock:
            st = node.staged
            if st is None or node.unlinked:
                return True
            key = self.naming.key(node.path)
            if closed_only and not st.sealed and any(h.writable for h in node.handles):
                # Reopened for writing after its close: sealing now would journal the writer's
                # half-done changes over the closed version, which a crash must keep
                # (docs/semantics.md) and other clients must see whole. The closed version
                # goes up as it was journaled; the open one is queued again at its close.
                closed = _closed_base(st)
                if closed is None or closed.journaled_record is None:
                    return True
                st, meta = closed, closed.journaled_record["metadata"]
            else:
                try:
                    if journal_first:
                        journaled = await self.journal_node(node, uploading=True)
                        assert journaled is not None  # staged and linked: checked above
                        meta = journaled
                    else:
                        await self.seal(node)
                        meta = self.metadata(node, st)
                except FsError as e:
                    return self._failed(node, key, e, raise_errors)
            st.uploading = True
        return await self._put_and_adopt(node, st, key, meta, raise_errors)

    async def _put_and_adopt(self, node: Node, st: StagedFile, key: str, meta: dict[str, str],
                             raise_errors: bool) -> bool:
        """PUT sealed ``st`` (``uploading`` set) as ``key`` with ``meta``, no lock held, then
        make it ``node``'s committed version (node.lock)."""
        try:
            info = await self.conflicts.upload(node, st, key, meta)  # info.key: a conflict copy's
        except StoreError as e:
            return self._failed(node, key, e, raise_errors)
        finally:
            st.uploading = False
            if st.superseded:
                st.discard()  # a newer version was journaled meanwhile
        async with node.lock:
            st.committed = True
            self._drop_bases(st)  # older than what the bucket has now
            stray = node.unlinked or self.naming.key(node.path) != key
            if stray and not node.unlinked and node.staged is st:
                self.scheduler.schedule(node)  # renamed while it uploaded: again, at the new name
        if stray:  # unlinked or renamed while it uploaded: that object is nobody's now
            await self._delete_stray(node, key)
            return True
        async with node.lock:
            # the object's metadata: what was sent, and a multipart upload's part layout, which
            # the uploader adds at Initiate (a metadata copy must send it back, or OSS refuses it:
            # a trial's chmod of a file this mount had uploaded in parts was EIO)
            layout = {h: info.metadata[h] for h in (env.H_DATA_SIZE, env.H_PART_SIZE) if h in info.metadata}
            version = Version(info.key, info.etag, st.size, {**meta, **layout}, st.envelope.wrapped, st.envelope)
            old = node.version
            if node.staged is st and self.metadata(node, st) == meta:
                set_local_version(node, version)  # open handles read ours, also from a conflict copy
                st.forget_record()  # the bucket has it: a crash must not upload it again
                self.cache.adopt(info.key, info.etag, st.size, st.data_path, st.envelope.data_key, st.envelope.iv)
                st.discard()
                node.staged = None
                self.scheduler.mark_clean(node)
            else:
                # changed while it uploaded (a newer staged version, or new attributes): the
                # bucket has this one; the newer one stays dirty and is queued. Open handles
                # follow it as they follow every version of this mount's (they read the staged
                # one meanwhile): a handle still naming an older version is stale (Files.write)
                node.version = version
                handles_follow(node, version, old)
                if node.staged is st:
                    self.scheduler.schedule(node)
                else:
                    st.forget_record()
                    if not st.superseded and node.staged is not None and node.staged.base is not st:
                        st.discard()
            if node.upload_error is not None:  # its failures were logged: say that it is over (a trial)
                log.info("upload of %r succeeded after failing (%s)", info.key, node.upload_error)
                node.upload_error = None
            if info.key != key:
                self._follow_conflict_copy(node, info.key)
            if node.staged is not None:
                try:  # a newer staged version's base is now this one: after a crash, not a conflict
                    self.rejournal(node)
                except FsError as e:
                    log.error("cannot journal the newer version of %r: %s", self.naming.key(node.path), e)
            if old is not None and old is not node.version and not any(hd.version is old for hd in node.handles):
                self.cache.drop(old.key, old.etag)
            self.scheduler.stats["uploaded"] += 1
            log.debug("uploaded %r (%d bytes, ETag %s)", info.key, st.size, info.etag)
        self.inodes.maybe_drop(node)
        return True

    def _follow_conflict_copy(self, node: Node, ckey: str) -> None:
        """``node``'s upload went to conflict copy ``ckey`` (node.lock held): another client's
        version holds its name. The node becomes the copy's file, so what its open handles
        write next goes there too (one copy per conflict, never onto theirs), and the name is
        looked up anew: theirs, as a node of its own. The kernel's entry for the name is
        invalidated, or it would lead to the copy until entry_timeout."""
        old_path, path = node.path, self.naming.path_of(ckey)
        if path is None or path in self.inodes.by_path:  # (a name this mount uses: leave it)
            node.checked_at = 0.0  # the name holds another client's version: read it anew
            return
        self.inodes.move(node, old_path, path)
        parent = self.inodes.parent(old_path)
        if parent is not None:
            self.entry_moved(parent.ino, base_name(old_path))
        names = self.inodes.names
        names.note_present(old_path)  # theirs is there
        names.child_added(self.inodes.parent(old_path), old_path)
        names.child_added(self.inodes.parent(path), path)

    async def _delete_stray(self, node: Node, key: str) -> None:
        """The object just uploaded at ``key`` belongs to no name any more (its node was
        unlinked or renamed during the upload): delete it unless another node holds that path."""
        path = self.naming.path_of(key)
        if path is not None and self.inodes.by_path.get(path) not in (None, node):
            return
        try:
            await self.uploader.store.delete(key)
            log.info("%r changed name while it uploaded; the uploaded object is deleted", key)
        except StoreError as e:
            log.error("%r was unlinked while it uploaded, and deleting it failed: %s", key, e)

    def recover(self) -> int:
        """Adopt the journal of an earlier run: each journaled version becomes a dirty node and
        is queued for upload; a damaged entry (also: a key that is not one of this mount's files
        (outside its prefix, a ``..`` or empty component), or an envelope that cannot be
        parsed) is quarantined and counted in ``stats["quarantined"]``. Returns how many were
        adopted."""
        entries, quarantined = journal.read_journal(self.staging)
        adopted = 0
        for entry in entries:
            path = self.naming.file_path_of(entry.key)
            meta = entry.metadata
            if path is None:
                why = (f"outside this mount's prefix {self.naming.prefix!r}"
                       if self.naming.path_of(entry.key) is None else
                       "its key is no file path of this mount (a '..', '.' or empty component, or the "
                       "tag-list directory)")
                self.staging.quarantine(entry.staged.id, why, repr(entry.key))
                quarantined += 1
                continue
            try:
                wrapped = env.parse_envelope(meta)
            except env.EnvelopeError as e:
                self.staging.quarantine(entry.staged.id, f"its envelope cannot be parsed: {e}", repr(entry.key))
                quarantined += 1
                continue
            old = self.inodes.by_path.get(path)
            if old is not None and old.staged is not None:
                self.drop_staged(old)  # a newer journal entry for the same key wins
            try:
                entry.staged.envelope = self.keyring.open_envelope(wrapped)
            except (env.EnvelopeError, KeyMissing, CmkUnavailable) as e:
                log.error("journaled %r cannot be decrypted here (%s); it is uploaded as it is", entry.key, e)
                entry.staged.envelope = OpaqueEnvelope(wrapped)
            else:
                torn = _torn(entry.staged, meta)
                if torn is not None:  # a power loss kept the record but not all of its data
                    self.staging.quarantine(entry.staged.id, torn, repr(entry.key))
                    quarantined += 1
                    continue
            node = self.resolver.node_from_info(path, ObjectInfo(entry.key, entry.staged.size, "", time.time(), meta),
                                                False)
            node.version = None
            node.staged = entry.staged
            if integrity.HEADER in meta:  # the tags sealed by the earlier run (a list's body is recomputed)
                spec_key = integrity.list_key_of(meta)
                entry.staged.tags = integrity.SealedTags({integrity.HEADER: meta[integrity.HEADER]}, spec_key)
            # its own upload may have been sent before the crash and land any time: ours, and
            # watched for a landing over what this mount does there next (store/indoubt.py)
            own = (meta[env.H_KEY],) if meta.get(env.H_KEY) else ()
            self.conflicts.recovered(node, entry.base, entry.sent + own)
            for wrapped_key in own:
                self.uploader.store.sent_before_a_crash(entry.key, wrapped_key)
            self.scheduler.mark_dirty(node)
            if entry.changed is not None:  # the age of the change, not of this mount
                node.dirty_since = min(node.dirty_since, entry.changed)
            self.scheduler.schedule(node)
            adopted += 1
            log.info("recovered %r (%d bytes) from the journal; uploading", entry.key, entry.staged.size)
        self.scheduler.stats["recovered"] = adopted
        self.scheduler.stats["quarantined"] += quarantined
        return adopted

    async def abort_orphaned_uploads(self, started_before: float, journaled: set[str]) -> int:
        """Abort the unfinished multipart uploads under this mount's prefix that an earlier run
        of this cache dir began (a crash left them, and OSS bills their parts until aborted):
        those its multipart ledger records (``writeback/ledger.py``), begun before
        ``started_before`` (wall-clock seconds: this mount's start). A cache dir of a release
        without the ledger falls back to the keys in ``journaled`` (its journal's versions,
        each uploaded again from the start). Every other unfinished upload under the prefix is
        left alone and counted in one INFO line: another client's upload, even of a key this
        journal holds, may still be running and would fail if aborted (trials of the
        nineteenth session). Returns how many were aborted; a failure is logged and skipped
        (the ledger keeps it for the next mount)."""
        store = self.uploader.store
        ledger = self.uploader.ledger
        try:
            uploads = await store.list_multipart_uploads(self.naming.prefix)
        except StoreError as e:
            log.error("cannot list unfinished multipart uploads under %r: %s", self.naming.prefix, e)
            return 0
        earlier = [(key, upload_id) for key, upload_id, initiated in uploads if initiated < started_before]
        if ledger is not None and ledger.existed:
            left = dict(ledger.left)
            ours = [(key, upload_id) for key, upload_id in earlier if left.get(upload_id) == key]
            listed = {upload_id for _k, upload_id, _t in uploads}
            for upload_id, key in left.items():  # ended in the store before the crash: forget
                if key.startswith(self.naming.prefix) and upload_id not in listed:
                    ledger.ended(upload_id)
        else:
            ours = [(key, upload_id) for key, upload_id in earlier if key in journaled]
        mine = set(ours)
        others = [key for key, upload_id in earlier if (key, upload_id) not in mine]
        if others:
            log.info("%d unfinished multipart upload(s) under %r not begun by this cache dir left alone "
                     "(another client's, or parts nobody will finish: an OSS lifecycle rule can expire them), "
                     "e.g. %r", len(others), self.naming.prefix, others[0])
        aborted = 0
        for key, upload_id in ours:
            try:
                if await self.uploader.abort(key, upload_id):
                    aborted += 1
                    log.warning("aborted unfinished multipart upload %s of %r left by an earlier run", upload_id, key)
            except StoreError as e:
                log.error("abort of unfinished multipart upload %s of %r failed: %s", upload_id, key, e)
        self.scheduler.stats["aborted_uploads"] = self.scheduler.stats.get("aborted_uploads", 0) + aborted
        return aborted
