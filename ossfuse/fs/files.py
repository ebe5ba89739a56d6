"""File contents: open, read, write, truncate, flush, release and fsync; unwrapping an
object's data key on open; staging a file's first change (a fresh data key, the current
content re-encrypted under it); the kernel page-cache policy (``keep_cache``)."""
from __future__ import annotations

import errno
import functools
import logging
import os
import time
from typing import Awaitable, Callable

import trio

from .. import envelope as env
from ..cache import BlockCache, TruncatedObject
from ..cmk import CmkUnavailable, KeyMissing
from ..integrity import IntegrityError
from ..keyring import Keyring
from ..store.base import NoSuchKey, PreconditionFailed, StoreError, same_etag
from ..store.health import StoreOffline, say_once_offline
from ..writeback.scheduler import UploadScheduler
from ..writeback.staging import MAX_OBJECT_SIZE, WRITE_RESERVE, StagedFile, Staging
from .commit import Commit
from .errors import ErrorsOnce, FsError, NoRoom, errno_of
from .inodes import InodeTable
from .model import FileHandle, Node, Version, name_settled
from .naming import Naming
from .openahead import OpenAhead
from .readahead import fetch_until
from .resolve import Resolver

log = logging.getLogger(__name__)

POPULATE_CHUNK = 1 << 20  # bytes re-encrypted at a time when a file is first modified
UPLOAD_AT_CLOSE_MAX = 1 << 20  # bytes: files up to this size skip the journal on cheap-PUT stores
_LINK_MAX = 4096  # bytes: a symlink target the kernel takes is shorter (PATH_MAX, its NUL included)


class VersionMoved(Exception):
    """A read of a version this mount moved meanwhile (a rename of the file or of a directory
    above it: the object is at another key now); the node names the new version."""


def _unwrap_id(v: Version) -> tuple[str, str, bytes | None]:
    """What a pending unwrap of ``v`` is filed under: its key, ETag and wrapped data key (over
    OSS a rekey keeps the ETag and changes only the envelope)."""
    w = v.wrapped
    return v.key, v.etag, w.wrapped_key if isinstance(w, env.WrappedEnvelope) else None


_UNWRAP_ERRORS = (KeyMissing, env.EnvelopeError, TruncatedObject, CmkUnavailable)  # what open_version raises as


class _Unwrap:
    """A data-key unwrap started by a read-only open and not yet awaited (:meth:`Files.open_version`):
    ``done`` is set when it ended, ``error`` then holds why it failed (None: the version's
    envelope is set)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


def _truncation(v: Version) -> TruncatedObject | None:
    """Why ``v`` is not whole (:func:`envelope.length_mismatch`); None when it is."""
    why = env.length_mismatch(v.metadata, v.size)
    return TruncatedObject(why) if why is not None else None


class Files:
    """Content operations of one mount.

    ``close_waits_for_upload``: close() returns only once the file is in the bucket;
    ``upload_at_close``: the store's PUT is as cheap as a journal record (a local bucket with
    no upload delay), so a small file closed by its last handle is uploaded at once."""

    def __init__(self, naming: Naming, inodes: InodeTable, resolver: Resolver, commit: Commit,
                 scheduler: UploadScheduler, cache: BlockCache, keyring: Keyring, staging: Staging, *,
                 close_waits_for_upload: bool, upload_at_close: bool):
        self.naming = naming
        self.inodes = inodes
        self.resolver = resolver
        self.commit = commit
        self.scheduler = scheduler
        self.cache = cache
        self.keyring = keyring
        self.staging = staging
        self.close_waits_for_upload = close_waits_for_upload
        self.upload_at_close = upload_at_close
        # set by Filesystem: Namespace.last_close, the deferred delete of an unlinked open file
        self.on_last_close: Callable[[Node], Awaitable[None]] | None = None
        self._errors = ErrorsOnce(log)
        # (key, ETag) → the unwrap a read-only open started in the background (open_version)
        # pending unwraps by (key, ETag, wrapped data key): over OSS a rekey keeps the ETag
        self._unwraps: dict[tuple[str, str, bytes | None], _Unwrap] = {}
        # (key, ETag) → set once open-ahead's HEAD of that slim version ended (an open waits
        # for it instead of sending the same HEAD)
        self._filling: dict[tuple[str, str], trio.Event] = {}
        self._making_spares = False  # a task refills the keyring's envelopes made ahead (new_envelope)
        # inodes whose size an open's revalidation changed while the kernel may hold the old
        # one, until the FUSE adapter has dropped its cached attributes (fuse_ops.open). Every
        # open that finds one here drops them before it returns: an open that came while
        # another's drop was still under way saw no change of its own, returned, and its
        # fstat gave the old size within attr_timeout (a trial: two readers at once)
        self.sizes_moved: set[int] = set()
        self.open_ahead = OpenAhead(inodes, self.prepare_ahead)  # cat *, cp -r out of the mount
        # unwraps prepare_ahead starts run one at a time (each takes both cores: key and IV at
        # once): more at once only made the CMK work of the file being read wait (bench/RESULTS.md)
        self._ahead_unwraps = trio.CapacityLimiter(1)

    # -- open -------------------------------------------------------------------------------
    async def open(self, node: Node, flags: int) -> FileHandle:
        """Open a file. Raises FsError: EACCES when no CMK matches the object (or, to write it,
        none unwraps it: :meth:`check_replaceable`), EIO for a corrupt envelope or a truncated
        object (one log line each), EISDIR for a directory, ESTALE when the file lost its name
        before this open arrived and no handle held it (the kernel then looks the name up
        again, once). An open that arrives while a rename over the file or its unlink runs
        waits for it (``node.name_going``); from then until it returns or fails, the open counts
        in ``node.opens`` like a handle (an unlink or rename over it keeps the object, or its
        bytes, for it)."""
        if node.is_dir:
            raise FsError(errno.EISDIR)
        await name_settled(node)  # a rename of it or over it, or its unlink runs: its outcome first
        if node.unlinked and node.opens == 0:
            # its name went before this open reached us (the kernel had looked it up), and no
            # handle kept its object: ESTALE makes the kernel walk the path again once
            # (LOOKUP_REVAL), which finds the file now at the name (a rename over it: an
            # editor's atomic save) or gives ENOENT (an unlink)
            raise FsError(errno.ESTALE)
        # An open in progress holds the file like a handle: an unlink during the awaits below
        # leaves the object for it (deleted at its last close), as a local disk keeps an
        # inode a process is opening; counted as a handle's from open_handle on.
        node.opens += 1
        try:
            await self._prepare_open(node, flags)
        except BaseException:
            node.opens -= 1
            await self._unheld(node)
            raise
        node.opens -= 1  # open_handle counts it again, with no await in between
        if (flags & os.O_ACCMODE) == os.O_RDONLY and node.staged is None and node.version is not None:
            self.open_ahead.opened(node)
        return self.open_handle(node, flags)

    async def _prepare_open(self, node: Node, flags: int) -> None:
        """What :meth:`open` checks and fetches before the handle exists (raises as it)."""
        slim = node.staged is None and node.version is not None and not node.version.held
        if slim and node.version is not None and \
                (filling := self._filling.get((node.version.key, node.version.etag))) is not None:
            await filling.wait()  # open-ahead is fetching its metadata
            slim = node.staged is None and node.version is not None and not node.version.held
        reads = (flags & os.O_ACCMODE) != os.O_WRONLY and not flags & os.O_TRUNC
        v, first = node.version, 0
        if reads and v is not None and node.staged is None and v.size > 0 and not self.resolver.store.local_disk \
                and not self.cache.has_first_block(v.key, v.etag):
            # The first block, which the first read needs and is not cached here: asked
            # without If-Match and awaited, its GET also says which version the name holds
            # now. So an open within attr_timeout of another client's save reads theirs
            # whole, at no extra request, instead of ESTALE at its first read (the open
            # drops the kernel's cached size and pages before the application sees either;
            # a read that moves an open handle to it cannot: docs/semantics.md "Reading").
            # (a whole block: the version there now may be larger, and its block is cached
            # only whole; a range past the end of a smaller one is cut at its end)
            first = self.cache.block_size
        asked = bool(slim or first or not self.resolver.attrs_fresh(node))
        if asked:
            # a slim version (model.Version) needs its envelope: the HEAD that revalidates
            # brings it (same ETag), or the version now there with its own (another client's);
            # an open that reads asks the first block's GET instead, whose answer brings both
            if first and v is not None and v.held:
                try:  # its CMK unwrap meanwhile, as when the read waits for that GET
                    await self.open_version(v, wait=False, quiet=_UNWRAP_ERRORS)
                except FsError:
                    pass  # (the version there now is opened, and a failure said, below)
            got = await self._revalidate_opening(node, listing=not slim and not first, first=first)
            if got is not None:
                self.cache.offer(got[0].key, got[0].etag, got[0].size, 0, got[1])
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        # O_TRUNC truncates also with O_RDONLY, as Linux does (the kernel checked write
        # permission for it; a trial: the file stayed whole)
        truncating = bool(flags & os.O_TRUNC)
        if writing or truncating:
            await self.check_replaceable(node)  # EACCES before a write can replace what we cannot read
        if truncating:
            async with node.lock:
                # a writable handle's close journals it; a read-only one saves nothing: now
                await self.truncate_locked(node, 0, journal=not writing)
        elif node.staged is None and node.version is not None:
            v = node.version
            if reads:  # fetch the first block while the CMK unwraps (unless the open asked for it)
                self.cache.read_ahead(v.key, v.etag, v.size, 0, self.cache.block_size)
            # read-only: the CMK unwraps while the kernel sends the first read (which waits for it)
            try:
                await self.open_version(v, wait=writing, quiet=() if asked else (KeyMissing,))
            except FsError as e:
                if asked or e.errno != errno.EACCES:
                    raise
                # no CMK for the envelope this open trusted (attr_timeout): over OSS a rekey keeps
                # the ETag, so that envelope may be stale (a trial: EACCES for 30 s after the
                # object was rekeyed back). Asked once before EACCES: the version there now.
                await self._revalidate_opening(node, listing=False)
                if node.staged is None and node.version is not None:
                    await self.open_version(node.version, wait=writing)

    async def _revalidate_opening(self, node: Node, *, listing: bool, first: int = 0):
        """``Resolver.revalidate`` for an open (its answer, as that returns), noting a size the
        kernel may still hold (:attr:`sizes_moved`)."""
        size = node.current_size
        got = await self.resolver.revalidate(node, listing=listing, opening=True, first=first)
        if node.current_size != size:
            self.sizes_moved.add(node.ino)
        return got

    def open_handle(self, node: Node, flags: int) -> FileHandle:
        """A new handle on ``node`` reading its current version."""
        # The kernel keeps a file's pages across opens (pyfuse3's keep_cache): only while the
        # version is the one it cached them from.
        etag = node.version.etag if node.staged is None and node.version is not None else None
        # Other handles still reading another version (another client replaced the object
        # since they opened): the page cache is the inode's, shared by all of them, so this
        # handle reads past it (direct I/O), and the pages their reads bring back stay theirs
        # (kernel_etag unknown: the next open drops them). Else a holder of the old version
        # read the new one's pages after the first half of its own, with success (a trial).
        direct = etag is not None and any(o.version is not None and o.version.etag != etag for o in node.handles)
        h = self.inodes.add_handle(lambda fh: FileHandle(fh, node, node.version,
                                                         keep_cache=etag is not None and etag == node.kernel_etag,
                                                         direct_io=direct))
        node.kernel_etag = None if direct else etag
        if node.version is not None:  # (a staged version's base: what the staged bytes started from)
            node.seen_etag = node.version.etag
        h.writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        node.opens += 1
        node.add_handle(h)
        return h

    async def open_version(self, v: Version, wait: bool = True, doing: str = "open", *,
                           quiet: tuple[type[Exception], ...] = ()) -> None:
        """Unwrap the data key of ``v`` (once) and check the object is whole. Raises
        FsError(EACCES) when no CMK matches, FsError(EIO) for a corrupt envelope, a truncated
        object or an unreachable KMS; one ERROR line ``cannot <doing> '<key>': <reason>``
        (``doing``: the operation that needs the key, ``"open"`` or ``"read"``: a read-only
        open returns before the CMK answers, so a wrong CMK is found by the read; no line for
        the errors in ``quiet``: the caller looks again before it fails).

        ``wait=False`` (a read-only open, with the daemon's task supervisor set): what needs no
        CMK work is checked now (the envelope's headers, the size, which CMK reads it: EACCES
        and EIO as above), a key this machine had before is taken at once, and a CMK unwrap is
        started in the background instead of awaited: the kernel's first read arrives
        meanwhile (and the block the open started to fetch), and that read waits for it here
        (``wait=True``). A failed background unwrap is reported by the read that waits for it:
        EIO (EACCES for a missing key), one log line naming the object.

        A slim ``v`` (its metadata dropped, model.Version) is HEADed first
        (:meth:`hold_metadata`: ESTALE if the bucket has another version now)."""
        if not v.held:
            await self.hold_metadata(v, doing, opening=True)
        if v.wrapped is None or v.envelope is not None:  # parsed: held for good from here on
            return
        pending = self._unwraps.get(_unwrap_id(v))
        if pending is not None:
            if not wait:
                return
            await pending.done.wait()
            if pending.error is not None:
                if not isinstance(pending.error, quiet):
                    self._error_once(f"cannot {doing} %r: %s", v.key, pending.error)
                raise FsError(errno_of(pending.error))
            if v.envelope is not None:
                return  # else another Version object of this (key, ETag) was unwrapped: cached now
        try:
            if isinstance(v.wrapped, env.EnvelopeError):
                raise v.wrapped
            truncated = _truncation(v)
            if truncated is not None:
                raise truncated
            # a key this machine had before opens on the loop; a CMK unwrap goes to a thread
            envelope = self.keyring.cached_envelope(v.wrapped)
            if envelope is None:
                nursery = self.scheduler.nursery
                if not wait and nursery is not None:
                    pending = self._unwraps[_unwrap_id(v)] = _Unwrap()
                    nursery.start_soon(self._unwrap_in_background, v, pending)
                    return
                envelope = await trio.to_thread.run_sync(self.keyring.open_envelope, v.wrapped, None, False)
            v.envelope = envelope
        except _UNWRAP_ERRORS as e:
            if not isinstance(e, quiet):
                self._error_once(f"cannot {doing} %r: %s", v.key, e)
            raise FsError(errno_of(e)) from None

    async def hold_metadata(self, v: Version, doing: str = "open", *, opening: bool = False) -> None:
        """Fetch the user metadata (envelope) of slim version ``v`` with one HEAD of ``v.key``
        and keep it in ``v`` only if the bucket still has this very version (same ETag): the
        metadata of two versions is never mixed. No lock is held across the HEAD; meanwhile
        another task may fill ``v`` too (the same version's metadata), and the node holding
        ``v`` may move on to another version (callers go on with ``v``, which they pinned).
        Raises FsError(ESTALE) when the key now holds another version or none (one ERROR line
        with both ETags; the node at that name is re-read at its next lookup), FsError(EIO)
        when the HEAD fails (offline: one INFO line; the outage has its WARNING). ``opening``:
        the caller parses the envelope at once (Resolver.set_version_from_info)."""
        if v.held:
            return
        try:
            info = await self.resolver.store.head(v.key)
        except StoreOffline as e:
            say_once_offline(self.resolver.store, log,
                             f"cannot {doing} {v.key!r}: its envelope was not kept and the store is offline", e)
            raise FsError(errno_of(e)) from None
        except StoreError as e:
            self._error_once(f"cannot {doing} %r: HEAD failed: %s", v.key, e)
            raise FsError(errno_of(e)) from None
        if v.held:
            return  # another task filled it meanwhile
        if info is None or info.key != v.key or not same_etag(info.etag, v.etag):
            self._error_once(f"cannot {doing} %r: this mount knows version %s, the bucket has %s (another "
                             "client changed it); it is read anew at the next lookup", v.key, v.etag,
                             "no object" if info is None else f"version {info.etag}")
            path = self.naming.path_of(v.key)
            node = self.inodes.by_path.get(path) if path is not None else None
            if node is not None and node.version is v:
                node.checked_at = 0.0
            raise FsError(errno.ESTALE)
        v.fill(info.metadata)
        if not opening:
            self.resolver.recent.touch(v)

    def prepare_ahead(self, v: Version) -> None:
        """Get committed version ``v`` ready for an open that is likely soon (:mod:`.openahead`):
        start the GET of its first block and, when its envelope is not known yet, the unwrap of
        its data key, both in the background; returns at once. A slim version (its metadata
        not held: made from a kept row, or slimmed) is HEADed first, in the background too.
        Never raises and logs nothing: what is wrong with the object (no matching CMK, a corrupt
        envelope, a failed HEAD) is found and reported by the open itself, which finds no unwrap
        pending and unwraps again."""
        if not v.held:
            nursery = self.scheduler.nursery
            if nursery is not None and (v.key, v.etag) not in self._filling:
                done = self._filling[(v.key, v.etag)] = trio.Event()
                nursery.start_soon(self._fill_ahead, v, done)
            return
        self.cache.read_ahead(v.key, v.etag, v.size, 0, self.cache.block_size)
        nursery = self.scheduler.nursery
        if (nursery is None or not isinstance(v.wrapped, env.WrappedEnvelope) or v.envelope is not None
                or _unwrap_id(v) in self._unwraps or _truncation(v) is not None):
            return  # (a version with its envelope set, or an unwrap pending, passed open's checks)
        try:
            envelope = self.keyring.cached_envelope(v.wrapped)
        except (KeyMissing, env.EnvelopeError):
            return
        if envelope is not None:
            v.envelope = envelope
            return
        pending = self._unwraps[_unwrap_id(v)] = _Unwrap()
        nursery.start_soon(self._unwrap_ahead, v, pending)

    async def _fill_ahead(self, v: Version, done: trio.Event) -> None:
        """Get slim version ``v``'s metadata ahead of its open, when the object still holds
        that version (same ETag), then :meth:`prepare_ahead` as for a held one. Where reads
        are cached and the first block is not, one ranged GET of it (If-Match on ``v``'s ETag)
        answers for the HEAD too, and the block is kept (the open then sends nothing: issue 14, ``cat``
        of files a kept attribute row describes was a HEAD and a GET each); else a HEAD."""
        info, first = None, b""
        store = self.resolver.store
        try:
            if v.size > 0 and not store.local_disk and not self.cache.has_first_block(v.key, v.etag):
                info, first = await store.get_range_with_info(v.key, 0, min(v.size, self.cache.block_size),
                                                              if_match=v.etag)
            else:
                info = await store.head(v.key)
        except StoreError:
            pass  # the open HEADs again and reports it
        finally:
            self._filling.pop((v.key, v.etag), None)
            done.set()  # (the open waiting for it runs after what follows: no await below)
        if info is not None and not v.held and v.key == info.key and same_etag(v.etag, info.etag):
            v.fill(info.metadata)
            if info.size == v.size:  # (else the open finds it truncated)
                self.cache.offer(v.key, v.etag, v.size, 0, first)
            self.prepare_ahead(v)

    async def _unwrap_ahead(self, v: Version, pending: _Unwrap) -> None:
        """:meth:`_unwrap_in_background` when its turn comes; cancelled before (the mount
        stops), it still ends ``pending``: a reader waiting for it then unwraps itself."""
        try:
            async with self._ahead_unwraps:
                await self._unwrap_in_background(v, pending)
        finally:
            if not pending.done.is_set():
                if self._unwraps.get(_unwrap_id(v)) is pending:
                    del self._unwraps[_unwrap_id(v)]
                pending.done.set()

    async def _unwrap_in_background(self, v: Version, pending: _Unwrap) -> None:
        """Unwrap ``v``'s data key with its CMK (in a thread) for :meth:`open_version`; never
        raises (a background task): a failure is kept in ``pending`` for the read that waits."""
        try:
            assert isinstance(v.wrapped, env.WrappedEnvelope)  # open_version checked it
            v.envelope = await trio.to_thread.run_sync(self.keyring.open_envelope, v.wrapped, None, False)
        except (KeyMissing, env.EnvelopeError, CmkUnavailable) as e:
            pending.error = e
        except Exception as e:  # noqa: BLE001 - a background task: reported by the read as EIO
            pending.error = env.EnvelopeError(f"unwrapping the data key failed: {type(e).__name__}: {e}")
        finally:
            if self._unwraps.get(_unwrap_id(v)) is pending:
                del self._unwraps[_unwrap_id(v)]
            pending.done.set()

    async def check_replaceable(self, node: Node) -> None:
        """Refuse to replace a committed object this mount cannot read (O_TRUNC, truncate,
        rename over it): its data key is unwrapped first (no lock held; cached keys cost no
        CMK work). Raises FsError(EACCES) when no configured CMK matches or unwraps it (one log
        line naming the object): a wrong-key config must not overwrite what it cannot read.
        Plaintext, staged and corrupt-envelope objects pass; FsError(EIO) when a KMS fails."""
        v = node.version
        if node.staged is not None or v is None:
            return
        if not v.held:
            await self.hold_metadata(v, "replace", opening=True)
        if v.wrapped is None or v.envelope is not None:
            return
        if isinstance(v.wrapped, env.EnvelopeError):
            return  # not a key question: replacing a damaged object repairs it
        try:
            v.envelope = (self.keyring.cached_envelope(v.wrapped)
                          or await trio.to_thread.run_sync(self.keyring.open_envelope, v.wrapped, None, False))
        except (KeyMissing, env.EnvelopeError) as e:
            log.error("refusing to replace %r: no configured CMK can read it (%s)", v.key, e)
            raise FsError(errno.EACCES) from None
        except CmkUnavailable as e:
            log.error("refusing to replace %r: cannot check its key: %s", v.key, e)
            raise FsError(errno_of(e)) from None

    # -- read -------------------------------------------------------------------------------
    async def read(self, h: FileHandle, offset: int, length: int) -> bytes:
        """Plaintext bytes at ``offset``. FsError(ESTALE) if the object was replaced by another
        client since open, EIO if it is truncated or the store fails."""
        node = h.node
        if node.staged is not None:
            try:
                return node.staged.read(offset, length)
            except OSError as e:
                log.error("reading staged %r failed: %s", self.naming.key(node.path), e)
                raise FsError(errno_of(e)) from None
        v = h.version
        if v is None or offset >= v.size:
            return b""
        return await self.read_version(v, offset, length,
                                       fetch_until=fetch_until(h, offset, length, self.cache.block_size), handle=h)

    async def read_version(self, v: Version, offset: int, length: int, fetch_until: int = 0,
                           handle: FileHandle | None = None, moving: Node | None = None) -> bytes:
        """Plaintext ``[offset, offset+length)`` of committed version ``v`` through the block
        cache (fetching ahead to ``fetch_until``), checked against the version's integrity tags
        when it has them (docs/integrity.md). Raises FsError as :meth:`read`; EIO when a
        block fails its tag (one log line naming the object, the block and the ETag).
        ``handle``: the handle reading ``v`` (no lock held by the caller); when ``v`` is gone
        because this mount moved the file (a rename of it or of a directory above it, whose
        copies and deletes run under the node's lock), the read follows the handle to the
        version the move made instead of failing. ``moving``: the node of ``v`` (no lock held
        by the caller), for a read that follows no handle: VersionMoved is raised in that
        case instead (the caller reads ``moving.version``)."""
        await self.open_version(v, doing="read")  # a read-only open did not wait for the CMK
        try:
            tags = (await self.cache.tags_for(v.key, v.etag, v.size, v.metadata, v.envelope.data_key, v.envelope.iv)
                    if v.envelope is not None else None)
            data = await self.cache.read(v.key, v.etag, v.size, offset, length, fetch_until=fetch_until,
                                         tags=tags)
        except (PreconditionFailed, NoSuchKey) as e:
            if handle is not None and await self._moved_here(handle, v):
                return await self.read(handle, offset, length)
            if moving is not None and await self._moved_off(moving, v):
                raise VersionMoved from None
            node = handle.node if handle is not None else moving
            if node is not None and node.version is v:
                # the next open or stat asks the store (a trial: reopening the path within
                # attr_timeout gave this gone version again, and ESTALE on its next read)
                node.checked_at = 0.0
            if isinstance(e, NoSuchKey):
                self._error_once("%r was deleted by another client while open", v.key)
                raise FsError(errno_of(e)) from None
            self._error_once("%r was replaced while open (ETag %s), by another client or by a newer file of "
                             "this mount at its name; reopen to read the new version", v.key, v.etag)
            raise FsError(errno_of(e)) from None
        except TruncatedObject as e:  # once: the kernel's page read after its read-ahead met it again (a trial)
            self._error_once("cannot read %r: %s", v.key, e)
            raise FsError(errno_of(e)) from None
        except IntegrityError as e:
            self._error_once("cannot read %r: %s", v.key, e)
            raise FsError(errno.EIO) from None
        except StoreOffline as e:
            say_once_offline(self.resolver.store, log, f"reading {v.key!r} failed", e)
            raise FsError(errno_of(e)) from None
        except StoreError as e:
            self._error_once("reading %r failed: %s", v.key, e)
            raise FsError(errno_of(e)) from None
        return v.envelope.crypt(offset, data) if v.envelope is not None else data

    @staticmethod
    async def _moved_here(h: FileHandle, v: Version) -> bool:
        """Whether this mount moved ``h``'s file off version ``v`` (its object gone or replaced at
        that key): a rename in progress holds the node's lock until the handles follow the copy
        (model.set_local_version), so wait for it; then the handle names another version."""
        async with h.node.lock:
            pass
        return h.version is not v

    @staticmethod
    async def _moved_off(node: Node, v: Version) -> bool:
        """:meth:`_moved_here` for ``node`` itself: whether, once a rename in progress (holding
        its lock) is done, it names a copy of ``v`` at another key (Version.is_copy_of)."""
        async with node.lock:
            pass
        now = node.version
        return now is not None and now is not v and now.is_copy_of(v)

    def _error_once(self, fmt: str, key: str, *args) -> None:
        """Log ``fmt % (key, *args)`` at ERROR the first time, at DEBUG after (ErrorsOnce)."""
        self._errors.error(fmt, key, *args)

    async def readlink(self, node: Node) -> str:
        """The target of symlink ``node`` (read from its object once). FsError(EINVAL) for
        anything else, EIO when it cannot be read, or when another client's target is none
        the kernel can take: a NUL byte in it (the kernel cut it there: wrong target, a trial),
        _LINK_MAX bytes or more (the kernel refused the reply: EIO with libfuse's line only, no
        key named), or none (no system makes such a link; `cp -a` failed on it); one ERROR line
        naming the object."""
        if not node.is_link:
            raise FsError(errno.EINVAL)
        while node.symlink_target is None:
            v = node.version
            if v is None:
                raise FsError(errno.EIO)
            await self.open_version(v, doing="read")
            try:
                data = await self.read_version(v, 0, v.size, moving=node)
            except VersionMoved:  # its directory was renamed meanwhile (ESTALE: a trial)
                continue
            why = ("is empty" if not data else "holds a NUL byte" if b"\0" in data
                   else f"is longer than {_LINK_MAX - 1} bytes" if len(data) >= _LINK_MAX else None)
            if why is not None:
                self._error_once("cannot read symlink %r: its target (%d bytes) %s", v.key, len(data), why)
                raise FsError(errno.EIO)
            node.symlink_target = data.decode("utf-8", "surrogateescape")
        return node.symlink_target

    # -- write ------------------------------------------------------------------------------
    def refuse_stale(self, h: FileHandle, doing: str) -> None:
        """FsError(ESTALE), with one ERROR line, when ``h`` reads a version another client
        replaced since it opened: a lookup since the open took theirs as the node's (this
        mount's own new versions reach the handles of the version they came from:
        model.set_local_version, and Commit's adoption of an upload while a newer version is
        staged; a staged version started from a committed one keeps it as node.version).
        A change through ``h`` would land on their content (docs/semantics.md)."""
        v, node = h.node.version, h.node
        if v is not None and h.version is not None and not same_etag(h.version.etag, v.etag):
            log.error("%s %r refused: this open file reads version %s, which another client replaced "
                      "with %s; reopen the file to write to that one", doing, self.naming.key(node.path),
                      h.version.etag, v.etag)
            raise FsError(errno.ESTALE)

    async def write(self, h: FileHandle, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` into the file's open staged version; returns len(data).
        Raises FsError(EFBIG) past the store's largest object; FsError(ENOSPC/EIO) when the
        cache disk fails (a full one after evicting cached blocks to make room, and after waiting
        for other files' uploads, node.lock released, up to the store's offline_timeout: the
        kernel holds the writer meanwhile): the version and the
        handle are then marked failed, every later write, fsync and close through ``h`` (and
        every write to that version through any handle) fails with that errno at once, and
        close() keeps the last good version. FsError(EBADF) through a read-only handle (the
        kernel never sends one: its close would not save the write). FsError(ESTALE) for a
        change through a handle whose version another client replaced since it opened
        (docs/semantics.md: never merged onto their content; one ERROR line), also when a
        newer handle of this mount already writes a version started from theirs."""
        node = h.node
        if not h.writable:
            raise FsError(errno.EBADF)
        self._refuse_after_lost_write(h)
        self._refuse_too_big(node, offset + len(data))  # before anything is staged
        self.refuse_stale(h, "write to")
        # a new data key before taking the lock: a KMS CMK makes a network call
        envelope = await self.new_envelope(node.path) if node.staged is None or node.staged.sealed else None
        copied = None
        if node.staged is None and node.version is not None:
            # the first change of a committed file: its content is read (from the store, maybe)
            # and re-encrypted before taking the lock, so no lock waits for the network
            base, keep = node.version, node.current_size
            assert envelope is not None  # nothing staged: a new data key was made above
            try:
                copied = await self.copy_committed(node, base, keep, envelope, follow_moves=True)
            except FsError as e:
                if e.errno == errno.ENOSPC:  # a lost write, as one to the staged version (below)
                    h.write_error = e.errno
                raise
        room_deadline: float | None = None  # (trio time: a write on a full cache disk waits until then)
        while True:
            async with node.lock:
                if copied is not None:
                    # (node.version may be base as a rename copied it meanwhile: the same content)
                    if (node.staged is None and node.version is not None and node.version.is_copy_of(base)
                            and node.current_size == keep):
                        node.staged = copied
                        self.commit.mark_staged(node)
                    else:  # changed meanwhile: the staged version made there wins
                        copied.discard()
                    copied = None
                # The kernel already puts O_APPEND writes at the end; it also writes mmap pages back
                # through any writable handle, at their own offsets: the offset is always its.
                await self.ensure_staged(node, node.current_size, envelope)
                envelope = None  # (used, maybe: a pass after a wait for room makes a new one if it needs one)
                st = node.staged
                assert st is not None  # ensure_staged made one
                if st.write_error is not None:  # a write to this version was lost via another handle
                    h.write_error = st.write_error
                    raise FsError(st.write_error)
                st.label = self.naming.key(node.path)  # named in the work file (recovery messages)
                try:
                    self._write_staged(st, offset, data)
                except OSError as e:
                    # the disk holds staged versions waiting for their upload: wait for those
                    # (without this node's lock) and write again; a write is idempotent
                    if e.errno != errno.ENOSPC or not self.scheduler.may_wait_for_room(node, room_deadline):
                        st.write_error = h.write_error = e.errno or errno.EIO
                        log.error("staging a write to %r failed; this open file's changes since its last good "
                                  "version will be discarded at close: %s", self.naming.key(node.path), e)
                        raise FsError(errno_of(e)) from None
                else:
                    node.mtime_ns = node.ctime_ns = time.time_ns()
                    return len(data)
            log.debug("the cache disk is full: a write to %r waits for uploads", self.naming.key(node.path))
            room_deadline = await self.scheduler.wait_for_room(node, room_deadline)

    def _write_staged(self, staged: StagedFile, offset: int, data: bytes) -> None:
        """``staged.write(offset, data)``, dropping cached blocks to make room on ENOSPC
        (``BlockCache.with_room``); a write that grows the version leaves the cache disk's
        reserve free (``Staging.check_room``). Raises OSError."""
        def write() -> None:
            if offset + len(data) > staged.size:  # (a write past the end allocates only its own blocks)
                self.staging.check_room(len(data))
            staged.write(offset, data)
        self.cache.with_room(write, need=len(data) + WRITE_RESERVE)

    async def _write_staged_waiting(self, node: Node, staged: StagedFile, offset: int, data: bytes) -> None:
        """:meth:`_write_staged`; on a cache disk still full, wait for other files' uploads to
        end (``UploadScheduler.wait_for_room``, as :meth:`write` does) and write again. The
        caller holds no lock. Raises OSError."""
        deadline: float | None = None
        while True:
            try:
                return self._write_staged(staged, offset, data)
            except OSError as e:
                if e.errno != errno.ENOSPC or not self.scheduler.may_wait_for_room(node, deadline):
                    raise
            deadline = await self.scheduler.wait_for_room(node, deadline)

    def _refuse_too_big(self, node: Node, size: int) -> None:
        """FsError(EFBIG), changing nothing, for content of ``size`` bytes past what a version
        can hold: the store's largest object, or less on a cache disk whose largest file is
        smaller (ext4: 16 TiB; said once per file, since the store would take it)."""
        if size <= self.staging.max_size:
            return
        if size <= MAX_OBJECT_SIZE:
            key = self.naming.key(node.path)
            self._errors.error("%r cannot grow to %d bytes: the cache disk's largest file holds %d bytes of "
                               "content (EFBIG)", key, size, self.staging.max_size, same=("EFBIG", key))
        raise FsError(errno.EFBIG)

    @staticmethod
    def _refuse_after_lost_write(h: FileHandle) -> None:
        """FsError with the errno of a write lost through ``h`` earlier, if one was: the
        program must not believe later writes, fsync or close succeeded (nothing logged again:
        the lost write was)."""
        if h.write_error is not None:
            raise FsError(h.write_error)

    async def new_envelope(self, path: str) -> env.Envelope:
        """A fresh data key and IV for a new version of ``path``: one the keyring made ahead
        (no wait: a create is not held up by RSA work and a thread hand-off), else made now in
        a thread (a KMS CMK makes a network call). FsError(EIO) with a log line when the CMK's
        service is unreachable."""
        envelope = self.keyring.take_spare(path)
        if envelope is None:
            try:
                envelope = await trio.to_thread.run_sync(self.keyring.new_envelope, path)
            except (CmkUnavailable, env.EnvelopeError) as e:
                log.error("cannot write %r: no data key: %s", self.naming.key(path), e)
                raise FsError(errno_of(e)) from None
        nursery = self.scheduler.nursery
        if nursery is not None and not self._making_spares and self.keyring.wants_spares(path):
            self._making_spares = True
            nursery.start_soon(self._make_spares, path, name="envelopes made ahead")
        return envelope

    async def _make_spares(self, path: str) -> None:
        """Refill the keyring's envelopes made ahead for ``path``'s CMK (in a thread). A
        failure is one WARNING and no more refills in this mount (each create then makes its
        own envelope and reports its own error): it must not end the mount as a failed
        background task would."""
        try:
            await trio.to_thread.run_sync(self.keyring.make_spares, path)
        except (CmkUnavailable, env.EnvelopeError, ValueError, OSError) as e:
            log.warning("cannot make data keys ahead for %r (no more tries in this mount): %s",
                        self.naming.key(path), e)
            return  # _making_spares stays set
        self._making_spares = False

    async def ensure_staged(self, node: Node, keep: int, envelope: env.Envelope | None = None) -> None:
        """Give ``node`` an open (writable) staged version holding its first ``keep`` bytes
        (node.lock held), under a fresh data key and IV (``envelope``, or a new one). A sealed
        staged version (journaled, or being uploaded) is never changed: the new version is
        derived from it (copy-on-write, nothing copied). From a committed version, its content
        is re-encrypted under the new key. Raises FsError (EIO, ENOSPC, as read and write)."""
        st = node.staged
        if st is not None and not st.sealed:
            return
        envelope = envelope or await self.new_envelope(node.path)
        if st is not None:
            node.staged = self.staging.derive(st, envelope)
            return
        node.staged = await self.copy_committed(node, node.version, keep, envelope)
        self.commit.mark_staged(node)

    async def copy_committed(self, node: Node, v: Version | None, keep: int,
                             envelope: env.Envelope, *, follow_moves: bool = False) -> StagedFile:
        """A new open staged version (encrypted under ``envelope`` when sealed) holding the
        first ``keep`` bytes of committed version ``v`` (None: empty). Needs no lock: it
        changes no shared state. ``follow_moves`` (node.lock not held): when this mount moves
        ``v`` meanwhile (a rename of it or of a directory above it), the rest is read from the
        copy (a trial's first write after a directory rename failed ESTALE), and a full cache
        disk waits for other files' uploads, as a write does. Raises FsError
        (EIO, ESTALE as read; ENOSPC as write)."""
        # direct (final ciphertext as written) when it starts empty; a copy of committed
        # content stays in slots, as the edit that follows is likely not an append
        staged = self.staging.new(envelope, direct=v is None or keep == 0)
        staged.label = self.naming.key(node.path)
        try:
            off, end = 0, min(keep, v.size) if v is not None else 0
            while v is not None and off < end:
                n = min(POPULATE_CHUNK, end - off)
                try:
                    data = await self.read_version(v, off, n, fetch_until=off + 4 * POPULATE_CHUNK,
                                                   moving=node if follow_moves else None)
                except VersionMoved:
                    v = node.version  # the same content at its new key: this chunk again from there
                    continue
                if follow_moves:  # (no lock held: a full cache disk may wait for uploads)
                    await self._write_staged_waiting(node, staged, off, data)
                else:
                    self._write_staged(staged, off, data)
                off += n
        except OSError as e:
            staged.discard()
            log.error("staging %r failed: %s", self.naming.key(node.path), e)
            raise FsError(errno_of(e)) from None
        except BaseException:
            staged.discard()
            raise
        return staged

    async def truncate_locked(self, node: Node, size: int, *, journal: bool = True) -> None:
        """Cut or extend ``node``'s content to ``size`` bytes (node.lock held). Extending
        writes nothing (a hole). With ``journal`` and no writable handle open (truncate(2) by
        path; a read-only handle's close saves nothing), the result is journaled and queued for
        upload as a close would. Raises FsError(EFBIG) past
        the store's largest object, FsError(ENOSPC/EIO) when the cache disk fails."""
        self._refuse_too_big(node, size)
        await self.ensure_staged(node, size)
        assert node.staged is not None  # ensure_staged made one
        try:
            node.staged.truncate(size)
        except OSError as e:
            node.staged.write_error = e.errno or errno.EIO
            log.error("truncating staged %r failed; its changes since its last good version will be discarded "
                      "at close: %s", self.naming.key(node.path), e)
            raise FsError(errno_of(e)) from None
        node.mtime_ns = node.ctime_ns = time.time_ns()
        if journal and not node.unlinked and not any(hd.writable for hd in node.handles):
            await self.commit.journal_node(node)
            self.scheduler.schedule(node)

    # -- close ------------------------------------------------------------------------------
    async def flush(self, h: FileHandle) -> None:
        """Make what was written through ``h`` durable: journal it locally (a crash cannot lose
        it after this), or upload a small file at once where a PUT is as cheap (the journal is
        then the fallback when that upload fails); with ``close_waits_for_upload``, journal
        and upload. A read-only handle does nothing (it never waits for an upload). Raises
        FsError(ENOSPC/EIO) if the cache disk fails or a write through the file failed (its
        changes are then dropped: the last good version stays), FsError(EIO) if an upload
        close() must wait for fails. A cache disk too full to seal or record it waits first for
        other files' uploads, node.lock released, up to the store's offline_timeout
        (``UploadScheduler.wait_for_room``)."""
        node = h.node
        if not h.writable:
            return
        await self._drop_if_lost(h)
        self._refuse_after_lost_write(h)  # its version was already dropped by an earlier close
        try:
            if self.close_waits_for_upload:
                await self.commit.upload_node(node, raise_errors=True)  # journals first, then uploads
                return
            if self._upload_now(node) and await self.commit.upload_node(node, journal_first=False):
                return  # in the bucket already: nothing to journal
            # a full cache disk: wait for other files' uploads (node.lock released), as a write does
            deadline: float | None = None
            while True:
                async with node.lock:
                    try:
                        await self.commit.journal_node(
                            node, may_wait=functools.partial(self.scheduler.may_wait_for_room, node, deadline))
                        return
                    except NoRoom:
                        log.debug("the cache disk is full: the close of %r waits for uploads",
                                  self.naming.key(node.path))
                deadline = await self.scheduler.wait_for_room(node, deadline)
        except FsError:
            await self._drop_if_lost(h)  # a seal that failed half-way lost the version
            raise

    async def _drop_if_lost(self, h: FileHandle) -> None:
        """If the open staged version of ``h``'s file lost a write (or its in-place seal failed
        half-way): go back to the last good version and raise FsError with that errno; ``h``
        then refuses every later write, fsync and close with it."""
        node = h.node
        st = node.staged
        if st is not None and st.write_error is not None and not st.sealed:
            async with node.lock:
                failed = node.staged.write_error if node.staged is st else None
                self.commit.revert_failed(node)
            if failed is not None:
                h.write_error = failed
                raise FsError(failed)

    def _upload_now(self, node: Node) -> bool:
        """Whether closing ``node`` should upload it at once instead of journaling it: a small
        file, closed by its last handle, on a store whose PUT is as cheap as a journal record
        (and no upload_delay to fold later changes into the upload)."""
        st = node.staged
        return (self.upload_at_close and st is not None and st.size <= UPLOAD_AT_CLOSE_MAX
                and node.opens == 1 and not node.unlinked)

    async def release(self, h: FileHandle) -> None:
        """The last close of handle ``h``: queue its staged version for upload, or drop it if
        the file was unlinked and this was its last handle."""
        self.inodes.drop_handle(h.fh)
        node = h.node
        node.opens -= 1
        node.drop_handle(h)
        if node.staged is not None and not node.unlinked and (h.writable or node.opens == 0):
            self.scheduler.schedule(node)
        await self._unheld(node)

    async def _unheld(self, node: Node) -> None:
        """A handle of ``node`` (or an open in progress) went, ``node.opens`` already lowered:
        once an unlinked file has none left, its staged version and cached blocks are dropped
        and its object deleted (``on_last_close``)."""
        if node.unlinked and node.opens == 0:
            if node.staged is not None:
                self.commit.drop_staged(node)
            if node.version is not None:
                self.cache.drop(node.version.key, node.version.etag)
        self.inodes.maybe_drop(node)
        if node.unlinked and node.opens == 0 and self.on_last_close is not None:
            await self.on_last_close(node)

    async def fsync(self, h: FileHandle) -> None:
        """Return only when the file's content and attributes are in the bucket.
        Raises FsError(EIO) when the upload failed (the data stays staged and journaled),
        FsError(ENOSPC) when the store's disk is full, and the errno of a write lost through
        ``h`` (at once: the file's changes since its last good version are not saved)."""
        self._refuse_after_lost_write(h)
        await self.commit.upload_node(h.node, raise_errors=True)
