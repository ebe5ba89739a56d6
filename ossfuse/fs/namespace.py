"""Namespace changes: mkdir, rmdir, create, mknod, unlink, symlink and rename.

Locking (docs/design.md, "Locks and what they protect"): each operation locks the names it
changes (:class:`~ossfuse.fs.locks.NameLocks`), never the mount. The pattern is probe → lock →
re-check → commit: what the store says (HEAD, LIST) and a new data key (KMS) are fetched with
no lock held; under the lock the operation re-checks what may have changed meanwhile, from
local state only, and commits. The only store calls made under a name lock are the ones that
commit the change (mkdir's and symlink's PUT, unlink's and rmdir's DELETE — over OSS the
background batch of unlinks' DELETEs, holding their names —, a rename's copies and deletes,
rmdir's final emptiness LIST): a lock covers only the names involved, so the only
operations that wait for that call are ones on the same names, which must be ordered after it
anyway. Node locks are taken after name locks, in ascending inode order."""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

import trio

from .. import envelope as env
from .. import integrity
from ..integrity import is_tag_list
from ..aio import run_all
from ..cache import BlockCache, TruncatedObject
from ..store.base import (AlreadyExists, DestinationChanged, ObjectInfo, ObjectStore, PreconditionFailed, StoreError,
                          same_etag)
from ..store.health import StoreOffline
from ..writeback.upload import Uploader
from .commit import Commit
from .copying import CopyUnanswered, copy_object, delete_version
from .errors import FsError, errno_of, store_request
from .files import Files
from .inodes import InodeTable
from .model import SPECIAL_TYPES, FileHandle, Node, Version, set_local_version, touch
from .namecache import NameCache
from .naming import MAX_KEY_BYTES, Naming, join, valid_listed_name
from .objmeta import attr_meta, file_metadata, is_hidden, special_metadata
from .latecopies import clock_text, is_its_copy, look_for_late_copies, same_object, take_back_at, watch_or_end
from .renamelog import LATE_FIRST_LOOK, RenameLog, RenameLogs, moved_key
from .renames import same_list, undo as undo_rename
from .resolve import Resolver
from .unlinked import DeferredDeletes

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
_FINISH_AT_ONCE = 16  # pending deletes replayed at once (a HEAD and a DELETE each)
_RECHECKS = 3  # probes of a name that keeps changing before one is made under its lock
_COPY_REFUSALS = 3  # a rename's copies refused in a row because another client kept writing the name (then ESTALE)
# a rename probes and locks its two names anew while a rename of a directory above them keeps
# moving them (each try waits for that rename: Resolver.existing); then EIO
_RENAME_RECHECKS = 16
RENAME_PARALLEL = 16  # copies (then deletes) of a directory rename at once (ossfs: 20 parallel requests)
_TAG_LISTS = "ossfuse's integrity tag lists"  # (why has_children counts a key)


class NodeLocks:
    """Async context manager holding the locks of ``nodes`` (taken in the order given: the
    caller sorts them by inode), released in reverse."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes

    async def __aenter__(self):
        for n in self.nodes:
            await n.lock.acquire()

    async def __aexit__(self, *exc):
        for n in reversed(self.nodes):
            n.lock.release()


def _count_subdirs(dirnode: Node, delta: int) -> None:
    """A subdirectory of ``dirnode`` was made (+1) or removed (-1) by this mount (st_nlink)."""
    if dirnode.subdirs is not None:
        dirnode.subdirs = max(0, dirnode.subdirs + delta)


def owner_in(parent: Node, mode: int, gid: int) -> tuple[int, int]:
    """(st_mode, gid) of a new name in ``parent`` made with ``mode`` by a caller of group ``gid``:
    in a set-group-ID directory it takes the directory's group, and a new directory the
    S_ISGID bit too (Linux's inode_init_owner(), mkdir(2), "BSD group semantics"; FUSE leaves
    this to the filesystem). The kernel has already dropped S_ISGID from a new file's mode
    when its creator is not in that group (mode_strip_sgid())."""
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return mode, gid


def _unseen(dst: Node) -> bool:
    """Whether a rename's destination ``dst`` is a file the kernel does not know (no lookup
    count, no handle, nothing staged): the kernel sent the rename trusting its negative entry
    for the name (the application saw it free), and only the rename's own probe found the
    object there, another client's since (a two-mount trial: it was replaced silently)."""
    return dst.lookups == 0 and not dst.handles and dst.staged is None and dst.version is not None


def _single_versions(items: list[tuple[str, str]]) -> dict[str, str]:
    """key → ETag of the (key, ETag) ``items`` whose key comes with one version only (a key
    pending with two is deleted whatever it holds, as a batch's first attempt does)."""
    seen: dict[str, str | None] = {}
    for key, etag in items:
        seen[key] = etag if seen.get(key, etag) == etag else None
    return {k: e for k, e in seen.items() if e is not None}


def _by_ino(nodes) -> list[Node]:
    return sorted(nodes, key=lambda n: n.ino)


@contextmanager
def name_going(*nodes: Node) -> Iterator[None]:
    """While a rename of ``nodes`` (a file, or a directory and everything below it), a rename
    over them or an unlink runs. An open that starts meanwhile waits (Files.open), then finds
    the file named (at its new name) or gets ESTALE (the kernel then looks the name up again);
    a lookup or listing in such a directory waits and then works at the new path (a store
    answer about the old path that arrives meanwhile is asked again: Resolver, PathMoved).
    Opens already under way count in ``node.opens``: the caller checks it after entering, and
    keeps the object (or its bytes) for them."""
    done = trio.Event()
    for node in nodes:
        node.name_going = done
    try:
        yield
    finally:
        for node in nodes:
            if node.name_going is done:
                node.name_going = None
        done.set()


class Namespace:
    """Namespace operations of one mount. ``create_umask``: a configured umask, applied to the
    mode of every new file and directory; ``deferred``: where deletes of unlinked open files
    wait for their last close; ``renames``: the logs of directory renames in progress
    (fs/renames.py); ``retry_interval``: seconds between background retries of a failed
    delete (run in ``nursery``, the daemon's task supervisor, once set)."""

    def __init__(self, store: ObjectStore, uploader: Uploader, naming: Naming, inodes: InodeTable,
                 names: NameCache, resolver: Resolver, files: Files, commit: Commit, cache: BlockCache, *,
                 create_umask: int, deferred: DeferredDeletes, renames: RenameLogs, retry_interval: float = 30.0):
        self.store = store
        self.uploader = uploader
        self.naming = naming
        self.inodes = inodes
        self.names = names
        self.resolver = resolver
        self.files = files
        self.commit = commit
        self.cache = cache
        self.create_umask = create_umask
        self.renames = renames  # directory renames in progress (a crash's: Filesystem.settle_renames)
        self.deferred = deferred
        self.locks = resolver.locks  # shared: a lookup whose path keeps moving takes its name's
        self._unlinked_open: dict[Node, tuple[str, str]] = {}  # node → (key, ETag) deleted at its last close
        self.retry_interval = retry_interval
        self.nursery = None  # anything with start_soon(fn): where failed deferred deletes are retried
        self._retrying = False
        # unlink's DELETE runs in the background, batched (docs/design.md "Deletes in the
        # background"), once a nursery is set: on a remote store only (a local bucket's delete
        # is one local index transaction, cheaper than recording it)
        self.background_deletes = not store.local_disk
        self._deleting = False  # the delete worker runs
        self._batch_done = trio.Event()  # set (and replaced) each time a batch was answered
        self._unshown_said: set[str] = set()  # keys rmdir said it cannot show (one WARNING each; bounded)

    # -- probe → lock → re-check ------------------------------------------------------------
    def _linked(self, node: Node, path: str) -> bool:
        """Whether ``node`` is still what ``path`` names (nothing changed it while we waited)."""
        return not node.unlinked and node.path == path and self.inodes.by_path.get(path) is node

    @asynccontextmanager
    async def _existing_locked(self, parent: Node, name: str, *, tree: bool = False) -> AsyncIterator[Node]:
        """The child ``name`` of ``parent``, with its name (``tree``: its subtree) locked.
        Probed with no lock held, then re-checked under the lock; if it changed meanwhile,
        probed again (after _RECHECKS tries, probed under the lock). FsError ENOENT/EIO."""
        for attempt in range(_RECHECKS + 1):
            if attempt < _RECHECKS:
                node = await self.resolver.existing(parent, name)
                path = node.path
            else:
                path = join(parent.path, name)
            async with self.locks.hold(trees=[path]) if tree else self.locks.hold(names=[path]):
                if attempt == _RECHECKS:  # the name keeps changing: ask once more, now under its lock
                    node = await self.resolver.existing(parent, name)
                if self._linked(node, path) and not parent.unlinked:
                    yield node
                    return
        raise FsError(errno.ENOENT)

    async def _check_absent(self, parent: Node, name: str, is_dir: bool = False) -> None:
        """``Resolver.check_absent``, and on EEXIST the node its probe made is dropped again
        unless something holds it (review A15: such nodes were never forgotten). Raises
        FsError EEXIST, EINVAL/ENAMETOOLONG, EIO."""
        try:
            await self.resolver.check_absent(parent, name, is_dir)
        except FsError as e:
            if e.errno == errno.EEXIST:
                found = self.inodes.by_path.get(join(parent.path, name))
                if found is not None:
                    self.inodes.maybe_drop(found)
            raise

    @asynccontextmanager
    async def _new_name_locked(self, parent: Node, name: str, is_dir: bool = False) -> AsyncIterator[str]:
        """The path of a new entry ``name`` in ``parent``, locked, once nothing is there: probed
        with no lock held, re-checked under the lock. FsError EEXIST, ENOENT (the parent was
        removed meanwhile), EINVAL/ENAMETOOLONG, EIO."""
        for _ in range(_RECHECKS):
            path = join(parent.path, name)
            await self._check_absent(parent, name, is_dir)
            async with self.locks.hold(names=[path]):
                if parent.unlinked:
                    raise FsError(errno.ENOENT)
                if join(parent.path, name) != path:
                    continue  # the parent was renamed meanwhile: probe the new path
                current = self.inodes.by_path.get(path)
                if current is not None and not current.unlinked:
                    raise FsError(errno.EEXIST)  # another task made it meanwhile
                yield path
                return
        raise FsError(errno.EIO, "the parent directory kept moving")

    async def _keep_parent(self, parent: Node) -> ObjectInfo | None:
        """A child of ``parent`` is about to be deleted from the store: if ``parent`` exists only
        as a key prefix (an implicit directory), write its marker ``dir/`` first, so it does not
        vanish with its last child (what ossfs/s3fs do). Returns the marker written, or None.
        Raises FsError(EIO)."""
        if parent.implicit and not parent.unlinked and parent.path:
            dkey = self.naming.dir_key(parent.path)
            marker = await store_request(self.store.put_bytes(dkey, b"", attr_meta(parent)), dkey)
            parent.implicit = False
            return marker
        return None

    async def _drop_kept_parent(self, parent: Node, marker: ObjectInfo) -> None:
        """Undo :meth:`_keep_parent` for an operation that then failed and moved nothing:
        delete ``marker`` again if it is still that version (a refused rename writes nothing,
        as a refused rmdir). A marker that cannot be deleted stays: ``parent`` is a directory
        either way (one INFO line)."""
        try:
            await delete_version(self.store, marker.key, marker.etag, log_failure=False)
            parent.implicit = True
        except FsError as e:
            log.info("the marker %r written for a rename that failed stays (%s)", marker.key,
                     os.strerror(e.errno))

    # -- directories ------------------------------------------------------------------------
    async def mkdir(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        """A new directory (its marker object ``path/``), lookup count one. Raises FsError
        EEXIST, EINVAL/ENAMETOOLONG for a name that cannot be a key, ENOENT, EIO."""
        async with self._new_name_locked(parent, name, is_dir=True) as path:
            now = time.time_ns()
            mode, gid = owner_in(parent, stat.S_IFDIR | (mode & 0o7777 & ~self.create_umask), gid)
            node = self.inodes.new_node(path, mode, uid, gid, now)
            try:  # the commit, under the new name's lock only; create-only, as symlink's
                await self.store.put_bytes(self.naming.dir_key(path), b"", attr_meta(node), if_absent=True)
            except AlreadyExists:
                self.inodes.discard(node)
                self.names.note_present(path)
                self.names.child_added(parent, path)
                log.info("mkdir %r: another client created the directory first; EEXIST", self.naming.dir_key(path))
                raise FsError(errno.EEXIST) from None
            except StoreError as e:
                self.inodes.discard(node)
                log.error("mkdir %r failed: %s", self.naming.dir_key(path), e)
                raise FsError(errno_of(e)) from None
            self.names.set_children(node, ())  # new and empty: lookups in it need no request
            node.subdirs = 0
            node.plain_marker = True
            _count_subdirs(parent, +1)
            self.inodes.remember(node)
            touch(parent)
            return node

    async def has_children(self, path: str) -> bool:
        """Whether directory ``path`` holds anything: staged files of this mount, or keys
        under its prefix other than its own marker and the objects of unlinked files still
        open (gone from the namespace: rmdir succeeds, as on a local disk). A key there that
        listings do not show (not a valid file name, as ``a//b``; a tag-list directory) counts
        too, and so does its own marker when it holds data (another client's bytes) — nothing
        is deleted behind the user's back — and one WARNING per key names it, as
        ``ls`` shows the directory empty (trial T: "Directory not empty", no reason given).
        Raises FsError(EIO)."""
        # Checked before listing: a file whose upload finishes meanwhile is in one or the other.
        if self.commit.staged_in(path):
            return True
        dkey = self.naming.dir_key(path)
        key = await store_request(self.deferred.first_visible_under(dkey), dkey)
        if key is not None and key not in self._unshown_said:
            said: str | None = None
            if key == dkey:
                said = (f"its directory marker {key!r} holds data (another client's), which listings here do "
                        "not show; remove it with another client")
            elif (why := await self._unshown(key, key[len(dkey):])) == _TAG_LISTS:
                # (not "remove it": a file elsewhere may need it, trial AB)
                said = (f"the bucket holds {key!r} below it, {why}, which files written under it (also those "
                        "moved away since) read their integrity tags from; leave it")
            elif why is not None:
                said = (f"the bucket holds {key!r} below it, which listings here do not show ({why}); remove it "
                        "with another client")
            if said is not None:
                if len(self._unshown_said) >= 10_000:
                    self._unshown_said.clear()
                self._unshown_said.add(key)
                log.warning("%r is not empty: %s", path, said)
        return key is not None

    async def _unshown(self, key: str, rest: str) -> str | None:
        """Why listings do not show what ``key`` (``rest``: its part below a directory's key)
        names, or None when they do: not a valid file name (``a//b``), ossfuse's tag lists, or
        (one HEAD) a plaintext object ``plaintext_objects = "hide"`` hides."""
        child = rest.split("/")[0]
        if child == integrity.LIST_DIR:  # (another client's object there is no list: trial AD)
            return _TAG_LISTS if is_tag_list(rest) else "in the directory ossfuse keeps its tag lists in"
        if not valid_listed_name(child):
            return "not a valid file name"
        if child == rest and self.resolver.plaintext_objects == "hide":
            try:
                info = await self.store.head(key)
            except StoreError:
                return None
            if info is not None and is_hidden(info, "hide"):
                return 'a plaintext object, hidden by plaintext_objects = "hide"'
        return None

    async def rmdir(self, parent: Node, name: str) -> None:
        """Remove an empty directory (children whose DELETE is queued or failed count as gone;
        the marker's DELETE waits for theirs, with no lock held, and failed ones below it are
        tried again first). Raises FsError ENOENT, ENOTDIR, ENOTEMPTY, EIO (also when a failed
        DELETE below it still fails: one ERROR line)."""
        node = await self.resolver.existing(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        for attempt in range(_RECHECKS + 1):
            dkey = self.naming.dir_key(node.path)
            await self.settle_deletes(dkey)
            await self.retry_failed_deletes(dkey, "remove")  # the children's objects go before the marker
            async with self._existing_locked(parent, name, tree=True) as node:
                if not node.is_dir:
                    raise FsError(errno.ENOTDIR)
                dkey = self.naming.dir_key(node.path)
                if attempt < _RECHECKS and (self.deferred.queued_under(dkey) or self._failed_under(dkey)):
                    continue  # unlinked below it meanwhile: those DELETEs go first, the marker's last
                # Listed under the tree lock (only operations inside this directory wait for it):
                # a child this mount made after an earlier check would otherwise be orphaned.
                if await self.has_children(node.path):
                    raise FsError(errno.ENOTEMPTY)
                await self._keep_parent(parent)  # (not before: a refused rmdir writes nothing, a trial)
                await store_request(self.store.delete(dkey), dkey)
                self.deferred.note_removed_dir(dkey)  # an unlinked open file's object may stay below it
                node.unlinked = True
                self.inodes.remove_name(node)
                _count_subdirs(parent, -1)
                self.inodes.maybe_drop(node)  # a node made by the probe alone is not kept (A15)
                touch(parent)
                return

    # -- files and symlinks -----------------------------------------------------------------
    async def create(self, parent: Node, name: str, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[Node, FileHandle]:
        """A new empty file, staged (in the bucket at its upload), lookup count one, and an
        open handle on it. Raises FsError EEXIST, ENOENT, EINVAL/ENAMETOOLONG, EIO."""
        await self._check_absent(parent, name)  # before the KMS call: EEXIST costs none
        envelope = await self.files.new_envelope(join(parent.path, name))  # KMS: no lock held
        await self._keep_unlinked_readable(self.naming.key(join(parent.path, name)))  # no lock held
        async with self._new_name_locked(parent, name) as path:  # no await below: nothing waits on it
            mode, gid = owner_in(parent, stat.S_IFREG | (mode & 0o7777 & ~self.create_umask), gid)
            node = self.inodes.new_node(path, mode, uid, gid, time.time_ns())
            node.staged = self.files.staging.new(envelope)
            pending_etag = self.deferred.last_etag(self.naming.key(path))
            if pending_etag is not None:  # the object of a file unlinked while open: ours replaces it knowingly
                self.commit.conflicts.replaces(node, pending_etag)
            self.commit.mark_staged(node)
            self.inodes.remember(node)
            touch(parent)
            return node, self.files.open_handle(node, flags)

    async def _create_object(self, parent: Node, node: Node, what: str, body: bytes,
                             meta: dict[str, str]) -> ObjectInfo:
        """PUT new ``node``'s object create-only (the commit of a symlink or mknod, under the
        new name's lock only): another client's object that appeared at the name since our
        check is never overwritten, the call fails with EEXIST instead (x-oss-forbid-overwrite,
        as file uploads, fs/conflicts.py). ``node`` is discarded on failure. Raises FsError
        EEXIST, EIO (one ERROR line naming the object)."""
        key = self.naming.key(node.path)
        # the object of a file unlinked here (its delete pending) is ours to replace; anything
        # else at the name is another client's
        pending = self.deferred.last_etag(key)
        mark = self.deferred.mark()
        try:
            info = await self.store.put_bytes(key, body, meta, if_absent=pending is None, replaces=pending)
            self.deferred.superseded(key, mark)
            return info
        except DestinationChanged:
            self.inodes.discard(node)
            self.names.note_present(node.path)  # the next lookup asks the store
            self.names.child_added(parent, node.path)
            log.info("%s %r: another client created the name first; EEXIST", what, key)
            raise FsError(errno.EEXIST) from None
        except StoreError as e:
            self.inodes.discard(node)
            log.error("%s %r failed: %s", what, key, e)
            raise FsError(errno_of(e)) from None

    async def symlink(self, parent: Node, name: str, target: str, uid: int, gid: int) -> Node:
        """A symlink: an encrypted object holding ``target``, mode S_IFLNK in its metadata.
        Raises FsError EEXIST, ENOENT, EINVAL/ENAMETOOLONG, EIO."""
        await self._check_absent(parent, name)  # before the KMS call: EEXIST costs none
        envelope = await self.files.new_envelope(join(parent.path, name))  # KMS: no lock held
        await self._keep_unlinked_readable(self.naming.key(join(parent.path, name)))  # no lock held
        async with self._new_name_locked(parent, name) as path:
            mode, gid = owner_in(parent, stat.S_IFLNK | 0o777, gid)
            node = self.inodes.new_node(path, mode, uid, gid, time.time_ns())
            data = target.encode("utf-8", "surrogateescape")
            meta = file_metadata(node, envelope.wrapped, len(data))
            body = envelope.crypt(0, data)
            meta.update(integrity.tag_small(body, envelope.data_key, envelope.iv, meta))  # read checks it
            info = await self._create_object(parent, node, "symlink", body, meta)
            node.version = Version(info.key, info.etag, len(data), meta, envelope.wrapped, envelope)
            node.size = len(data)
            node.symlink_target = target
            self.inodes.remember(node)
            touch(parent)
            return node

    async def mknod(self, parent: Node, name: str, mode: int, rdev: int, uid: int, gid: int) -> Node:
        """mknod(2): ``mode`` is st_mode (type and permission bits), ``rdev`` st_rdev (devices
        only). A FIFO, socket (bind(2) of a unix socket) or device node becomes a plain
        zero-length object, its type in x-oss-meta-mode and a device's number in
        x-oss-meta-rdev, as ossfs/s3fs store them (ossfs-1.91.10 ``src/s3fs.cpp`` s3fs_mknod):
        no content, so no envelope (docs/semantics.md, "Special files"). S_IFREG makes an empty
        encrypted file, committed at once. Raises FsError EINVAL (another type), EEXIST,
        ENOENT, EINVAL/ENAMETOOLONG, EIO."""
        kind = stat.S_IFMT(mode)
        if kind not in SPECIAL_TYPES and kind != stat.S_IFREG:
            raise FsError(errno.EINVAL)
        await self.resolver.check_absent(parent, name)  # before the KMS call: EEXIST costs none
        envelope = await self.files.new_envelope(join(parent.path, name)) if kind == stat.S_IFREG else None
        await self._keep_unlinked_readable(self.naming.key(join(parent.path, name)))  # no lock held
        async with self._new_name_locked(parent, name) as path:
            mode, gid = owner_in(parent, kind | (mode & 0o7777 & ~self.create_umask), gid)
            node = self.inodes.new_node(path, mode, uid, gid, time.time_ns())
            if envelope is not None:
                meta = file_metadata(node, envelope.wrapped, 0)
            else:
                meta = special_metadata(node, rdev)
            info = await self._create_object(parent, node, "mknod", b"", meta)
            node.version = Version(info.key, info.etag, 0, meta, envelope.wrapped if envelope else None, envelope)
            self.inodes.remember(node)
            touch(parent)
            return node

    async def unlink(self, parent: Node, name: str) -> None:
        """Remove a file or symlink. Open handles keep reading it: the name goes at once, the
        object stays in the bucket until the last handle closes (:mod:`ossfuse.fs.unlinked`;
        nothing is downloaded). On a remote store (``background_deletes``) the DELETE of a
        file no handle reads is queued: unlink returns once the pending delete is recorded on
        the cache disk (not fsynced: survives a daemon crash), and :meth:`_delete_queued`
        deletes it in a batch. An upload of the file in flight is waited for first, with no
        lock held (its PUT landing after the name went would put the object back); the check
        is repeated under the locks. Raises FsError ENOENT, EISDIR, EIO (ENOSPC: the cache disk
        cannot record the pending delete)."""
        node = await self.resolver.existing(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if node.version is not None:
            await self._keep_parent(parent)
        while True:
            await self.commit.upload_settled(node)  # no lock held while the upload runs
            async with self._existing_locked(parent, name) as node:
                if node.is_dir:
                    raise FsError(errno.EISDIR)
                async with node.lock:
                    # under node.lock: an upload starting from here on finds the node unlinked
                    if self.commit.upload_running(node):
                        continue  # one started meanwhile: wait for it, with the locks released
                    with name_going(node):  # an open starting during the delete waits for it
                        await self._unlink_locked(node)
                touch(parent)
                return

    async def _unlink_locked(self, node: Node) -> None:
        """The commit of :meth:`unlink` (its name and node locks held, no upload running)."""
        v = node.version
        key = self.naming.key(node.path)
        if v is not None and node.opens > 0 and node.staged is None:
            try:
                self.deferred.record(key, v.etag, wrapped=v.metadata.get(env.H_KEY) if v.held else None)
            except OSError as e:
                log.error("cannot record the pending delete of open %r: %s", key, e)
                raise FsError(errno_of(e)) from None
            self._unlinked_open[node] = (key, v.etag)
        elif v is not None and self._deletes_in_background():
            try:
                self.deferred.queue(key, v.etag)  # the commit: hidden from now on
            except OSError as e:
                log.error("cannot record the pending delete of %r: %s", key, e)
                raise FsError(errno_of(e)) from None
            self.cache.drop(v.key, v.etag)
            self._start_deleting()
        elif v is not None:
            await store_request(self.store.delete(key, version=v.etag), key)  # the commit
            self.cache.drop(v.key, v.etag)  # its cached blocks can serve nothing now
        else:
            await self._delete_replaced(node, key)
        self._take_name(node)

    async def _delete_replaced(self, node: Node, key: str) -> None:
        """``node`` is a new file renamed over a committed one and not uploaded yet: the old
        object still sits at ``key``. Its name is going away (unlink, rename elsewhere), so the
        old object goes too (if it is still the version replaced), or it would come back once
        ``node``'s staged version is dropped or moved (git's ``master.lock`` → ``master``, then
        ``pack-refs`` unlinking ``master``). Raises FsError(EIO) on a store failure."""
        etag = await self._replaced_etag(node, key)
        if etag is None:
            return
        try:  # (or an upload of node's own that landed late: a crash's, sent before it)
            await delete_version(self.store, key, etag, ours=self.commit.conflicts.sent(node))
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise  # ESTALE: another client wrote that name since; theirs stays (logged)
        self.deferred.forget(key, etag)  # an unlinked open file's version, kept pending until now
        self.commit.conflicts.replaces(node, None)

    def _record_delete(self, key: str, etag: str) -> None:
        """Record that version ``etag`` of ``key`` is to be deleted unless this mount's upload
        replaces it first (:mod:`ossfuse.fs.unlinked`; tried at unmount and at the next mount).
        Raises FsError (ENOSPC/EIO of the cache disk; one log line)."""
        try:
            self.deferred.record(key, etag, ready=True)
        except OSError as e:
            log.error("cannot record the pending delete of replaced %r: %s", key, e)
            raise FsError(errno_of(e)) from None

    async def _replaced_etag(self, node: Node, key: str) -> str | None:
        """The ETag of the object at ``key`` that ``node`` (staged, never uploaded) is to
        replace: the one a rename over it or its journal record gave (``Conflicts.replaced``),
        or — for a version recovered from a record without a base, whose upload replaces
        whatever is there (``Conflicts.base_unknown_for``) — what a HEAD finds now (an older
        version of the same file, from before the crash). None: no such object. Raises
        FsError(EIO)."""
        etag = self.commit.conflicts.replaced(node)
        if etag is None and node.version is None and self.commit.conflicts.base_unknown_for(node):
            info = await store_request(self.store.head(key), key)
            etag = info.etag if info is not None else None
        return etag

    def _show_copy(self, dst_path: str) -> None:
        """A rename's copy is at ``dst_path`` although the rename failed: lookups and listings
        must both show it (no negative cache entry left from the probe)."""
        self.names.note_present(dst_path)
        self.names.child_added(self.inodes.parent(dst_path), dst_path)

    def _take_name(self, node: Node) -> None:
        """``node``'s name is gone (unlinked, or replaced by a rename): a staged version no
        handle needs is dropped (no upload), and lookups no longer find it."""
        self.commit.vacated(node)  # (while its staged version is still there)
        if node.version is None:  # nothing of it in the bucket: an upload landing late would bring it back
            self.store.vacated(self.naming.key(node.path))
        node.unlinked = True
        if node.staged is not None:
            if node.opens == 0:
                self.commit.drop_staged(node)
            else:  # kept for its open handles, but a crash must not bring it back
                self.commit.forget_journal(node)
        self.inodes.remove_name(node)
        self.inodes.maybe_drop(node)  # unless the kernel or a handle holds it: a probe's node goes (A15)

    async def last_close(self, node: Node) -> None:
        """The last handle of unlinked ``node`` closed: delete its object if the unlink left it
        for the readers (logged, never raised: the caller is a release; a failed delete is
        retried, see :meth:`finish_deletes`)."""
        pending = self._unlinked_open.pop(node, None)
        if pending is not None:
            await self._finish_delete(node.path, *pending)

    async def _finish_delete(self, path: str | None, key: str, etag: str, *,
                             failures: list[str] | None = None) -> bool:
        """Delete version ``etag`` of ``key`` (at ``path``; None: outside the prefix), pending
        since an unlink. True when done or no longer wanted; False when the store failed (one
        log line, or the error appended to ``failures``: see ``DeferredDeletes.delete``;
        retried in the background when a nursery is set)."""
        if path is None:
            return await self.deferred.delete(key, etag, failures=failures)
        async with self.locks.hold(names=[path]):  # no create or unlink of that name meanwhile
            if self._replaced_here(path, key, etag):
                self._forget_once_overwritten(path, key, etag)
                return True
            if await self.deferred.delete(key, etag, failures=failures):
                return True
        self.retry_failed_deletes_later()
        return False

    def _forget_once_overwritten(self, path: str, key: str, etag: str) -> None:
        """The file at ``path`` replaces version ``etag`` of ``key`` (:meth:`_replaced_here`):
        forget that pending delete if the file's own version is at ``key`` already (its upload
        or a rename's copy overwrote the old one). Until then the record stays, hiding the old
        version, so a crash before the new file's upload does not bring the unlinked version
        back (the replay at the next mount deletes it, ETag-compared); the upload's
        ``DeferredDeletes.superseded`` drops it when it lands. It stays in the retries
        meanwhile, where this comes back to it without a request."""
        current = self.inodes.by_path[path]
        if current.version is not None and current.version.key == key:
            self.deferred.forget(key, etag)

    def _replaced_here(self, path: str, key: str, etag: str) -> bool:
        """Whether this mount's file at ``path`` replaces version ``etag`` of ``key`` (the
        caller holds ``path``'s name lock): a new file, whose upload replaces the object (a
        DELETE now could race that upload and delete the new version), or one whose upload
        or rename's copy has replaced it already. Then no DELETE is sent
        (:meth:`_forget_once_overwritten` says when the record goes). Any live file node at
        ``path`` is newer than the unlinked version: the unlink took that one's name, and a
        lookup never finds a hidden version. Its ETag is no test: an empty object's, or a
        copy's of the same content, equals the unlinked one's (OSS ETags are the body's MD5),
        and the DELETE then took the new file (trial of the eighth session). A version
        uploaded elsewhere (a conflict copy) leaves ``key`` to the delete."""
        current = self.inodes.by_path.get(path)
        return current is not None and not current.unlinked and not current.is_dir and (
            current.staged is not None or (current.version is not None and current.version.key == key))

    def retry_failed_deletes_later(self) -> None:
        """Start the background retries of failed deletes, every ``retry_interval`` seconds
        (once; needs a nursery: the daemon sets it after the replay at mount)."""
        if self.nursery is not None and not self._retrying:
            self._retrying = True
            self.nursery.start_soon(self._retry_deletes)

    # -- unlink's DELETEs in the background -------------------------------------------------
    def _deletes_in_background(self) -> bool:
        """Whether unlink queues its DELETE: on a remote store, with a nursery to run the
        worker, and not while the store is offline (then unlink needs the store now and fails
        fast with EIO, as rename and mkdir do: docs/semantics.md "Offline")."""
        health = self.store.health
        return (self.background_deletes and self.nursery is not None
                and not (health is not None and health.offline))

    def _start_deleting(self) -> None:
        """Start the delete worker unless it runs (it stops when nothing is queued)."""
        if not self._deleting and self.nursery is not None:
            self._deleting = True
            self.nursery.start_soon(self._delete_queued)

    async def _delete_queued(self) -> None:
        """Background: the queued DELETEs, one batch (≤ ``store.max_delete_keys``) per request,
        one request at a time (what is unlinked while one runs makes the next batch), until
        none is queued. Never raises on a store failure: a failed batch is logged and goes to
        the retries (``ready``), so nothing waits on it forever."""
        try:
            while self.deferred.queued:
                batch = list(itertools.islice(self.deferred.queued, self.store.max_delete_keys))
                try:
                    await self._delete_batch(batch)
                finally:
                    left = [item for item in batch if item in self.deferred.queued]
                    for item in left:  # answered and not done (forgotten when done): to the retries
                        del self.deferred.queued[item]
                        self.deferred.ready.add(item)
                    if left:
                        self.retry_failed_deletes_later()
                    self._batch_done.set()
                    self._batch_done = trio.Event()
        finally:
            self._deleting = False

    async def _delete_batch(self, batch: list[tuple[str, str]]) -> None:
        """Delete the queued versions ``batch`` [(key, ETag)]: under their names' locks (a
        create, rename or symlink at one of those names waits for the answer, so no DELETE
        can hit what it writes), those a file of this mount replaces since are dropped; a key
        whose newer version an open handle of this mount still reads is deleted with the
        HEAD-compare (:meth:`DeferredDeletes.delete`); the rest go in one DeleteMultipleObjects,
        which names no version: see docs/design.md for the window this leaves to another
        client's write. A failure leaves the versions hidden and in ``ready``."""
        paths = {key: self.naming.path_of(key) for key, _ in batch}
        read_by_handles = {k for k, _ in self._unlinked_open.values()}
        wanted: list[tuple[str, str]] = []
        async with self.locks.hold(names={p for p in paths.values() if p is not None}):
            for key, etag in batch:
                path = paths[key]
                if path is not None and self._replaced_here(path, key, etag):
                    self._forget_once_overwritten(path, key, etag)
                elif key in read_by_handles:
                    if not await self.deferred.delete(key, etag):
                        self.retry_failed_deletes_later()
                else:
                    wanted.append((key, etag))
            keys = list(dict.fromkeys(k for k, _ in wanted))
            if not keys:
                return
            try:
                failed = set(await self.store.delete_many(keys, _single_versions(wanted)))
            except StoreError as e:
                # offline (StoreOffline): the outage has its one WARNING (store/health.py)
                log.log(logging.INFO if isinstance(e, StoreOffline) else logging.ERROR,
                        "deleting %d unlinked objects (%r…) failed; they stay hidden and are tried again: %s",
                        len(keys), keys[0], e)
                failed = set(keys)
        for key, etag in wanted:
            if key in failed:
                self.deferred.ready.add((key, etag))
        await self.deferred.forget_many([(k, e) for k, e in wanted if k not in failed])
        if failed:
            if len(failed) < len(keys):
                log.error("the store did not delete %d of %d unlinked objects (%r…); they stay hidden and are "
                          "tried again", len(failed), len(keys), sorted(failed)[0])
            self.retry_failed_deletes_later()

    async def settle_deletes(self, dkey: str = "") -> None:
        """Return once every DELETE queued below directory key ``dkey`` ("": all) was answered
        (done, or failed and left to the retries: this never waits for a store outage to
        end). The caller holds no lock: the worker takes the names' locks."""
        while self._deleting and self.deferred.queued_under(dkey):
            await self._batch_done.wait()

    def _failed_under(self, dkey: str) -> list[tuple[str, str]]:
        """The failed pending deletes (key, ETag) below directory key ``dkey``, sorted."""
        return sorted(item for item in self.deferred.ready if item[0].startswith(dkey))

    async def retry_failed_deletes(self, dkey: str, doing: str) -> None:
        """Try again, now, the failed pending deletes below directory key ``dkey`` (no open
        handle waits for them): a directory rename must not copy their hidden objects to names
        no pending delete covers, and rmdir deletes the marker only after its children. Raises
        FsError(EIO) if one still fails, with one ERROR line naming ``doing`` (``"rename"``,
        ``"remove"``), the first key left and why. The caller holds no lock (each delete takes
        its name's lock)."""
        failures: list[str] = []
        left = []
        for key, etag in self._failed_under(dkey):
            # the first that still fails decides (EIO): each failure costs a whole retry budget
            if failures or not await self._finish_delete(self.naming.path_of(key), key, etag, failures=failures):
                left.append(key)
        if left:
            log.error("cannot %s %r: %d objects deleted below it are not deleted from the bucket yet (%r: %s); "
                      "they are tried again", doing, dkey, len(left), left[0], failures[0] if failures else "?")
            raise FsError(errno.EIO)

    def check_deleted(self, dkey: str) -> None:
        """After :meth:`settle_deletes`: FsError(EIO) (one log line) when a delete below
        directory key ``dkey`` failed and waits for its retry (an fsync of the directory)."""
        failed = [k for k, _ in self._failed_under(dkey)]
        if failed:
            log.error("fsync of %r: %d deletes below it have not reached the bucket yet (%r…)",
                      dkey, len(failed), failed[0])
            raise FsError(errno.EIO)

    async def finish_deletes(self) -> int:
        """Try again every pending delete no open handle waits for (an earlier run's, or one
        that failed): at mount, at unmount and in the background, after the queued ones were
        answered. Returns how many are left."""
        await self.settle_deletes()
        left = 0
        failing = False

        async def finish(key: str, etag: str) -> None:
            nonlocal left, failing
            if failing:  # the store refuses deletes now: the rest wait for the next round
                left += 1
                return
            if not await self._finish_delete(self.naming.path_of(key), key, etag):
                left += 1
                failing = True

        # HEAD + DELETE each, _FINISH_AT_ONCE at a time (one name lock each): a crash in the
        # middle of rm -r leaves thousands, and the next mount serves only once they are done.
        # Once one fails, none more starts: each failure costs a whole retry budget (a 503
        # storm kept a mount from starting), and the names stay hidden until a later round.
        await run_all([functools.partial(finish, key, etag) for key, etag in sorted(self.deferred.ready)],
                      _FINISH_AT_ONCE)
        return left

    async def _retry_deletes(self) -> None:
        """Background: every retry_interval seconds, the failed deletes again, until none is left."""
        try:
            while self.deferred.ready:
                await trio.sleep(self.retry_interval)
                await self.finish_deletes()
        finally:
            self._retrying = False

    async def _keep_replaced_readable(self, node: Node, how: str = "was renamed over") -> None:
        """``node``'s object is about to be overwritten (a rename over it, or a new file at the
        name of it, unlinked) while handles read it: keep its bytes in the cache, within the
        cache's limits; beyond them, warn (``how``: what happened to it) that its readers will
        get ESTALE. Holds at most the names of the caller (a rename's two). No warning when
        the last handle closed meanwhile (its close drops the blocks, and may delete the
        object, while they are fetched): no reader is left to get ESTALE."""
        if node.opens > 0 and node.staged is None and node.version is not None:
            v = node.version
            try:
                await self.files.open_version(v)
                kept = await self.cache.keep(v.key, v.etag, v.size)
            except (FsError, StoreError, TruncatedObject) as e:
                if node.opens > 0:
                    log.warning("%r is open and %s, but could not be kept readable: %s", v.key, how, e)
                return
            if not kept and node.opens > 0:
                log.warning("%r (%d bytes) is open and %s; it does not fit the cache limits, so its "
                            "readers get ESTALE for what they have not read yet", v.key, v.size, how)

    async def _keep_unlinked_readable(self, *keys: str) -> None:
        """New versions are about to take ``keys`` (a create, a rename to its name, a directory
        rename's copies) where files unlinked while open wait for their last close: their
        objects get overwritten, so their handles are served from the cache from now on
        (:meth:`_keep_replaced_readable`). Others are left alone (no download)."""
        taken = set(keys)
        for node, (pending_key, _) in list(self._unlinked_open.items()):
            if pending_key in taken:
                await self._keep_replaced_readable(node, "was unlinked, and a new file takes its name")

    # -- rename -----------------------------------------------------------------------------
    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        """rename(2) with RENAME_NOREPLACE (flag 1); RENAME_EXCHANGE gives EINVAL. Files move
        with CopyObject + DeleteObject (envelope headers travel unchanged); a directory moves
        object by object (not atomic: docs/semantics.md). Locks: the two names for a file, the
        two subtrees for a directory (probed first with no lock held, then re-checked).
        Raises FsError ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, EIO; EACCES when dst
        is an object no configured CMK can read."""
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)
        kept_parent: list[ObjectInfo] = []  # the implicit parent's marker this rename wrote
        try:
            await self._rename(parent, name, new_parent, new_name, flags, kept_parent)
        except FsError:
            if kept_parent:  # failed: the source is still there, and its parent needs no marker
                await self._drop_kept_parent(parent, kept_parent[0])
            raise

    async def _rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int,
                      kept_parent: list[ObjectInfo]) -> None:
        """The body of :meth:`rename`; appends to ``kept_parent`` the marker :meth:`_keep_parent`
        wrote for ``parent``, for the caller to take back when the rename fails."""
        moved = 0  # tries that found a name changed (an upload that started meanwhile does not count)
        while moved < _RENAME_RECHECKS:
            src = await self.resolver.existing(parent, name)
            src_path, dst_path = src.path, join(new_parent.path, new_name)
            self.naming.check_new_path(dst_path, src.is_dir)
            if dst_path == src_path:
                return
            if src.is_dir and (dst_path + "/").startswith(src_path + "/"):
                raise FsError(errno.EINVAL)
            try:
                dst = await self.resolver.existing(new_parent, new_name)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise  # cannot tell whether it exists: not the same as absent (review A11)
                dst = None
            self._check_replace(src, dst, flags)
            if dst is not None and not dst.is_dir:
                await self.files.check_replaceable(dst)  # EACCES: never replace what we cannot read
            # An upload in flight of either would race the rename's copy: dst's landing over the
            # copy, src's replacing the version the copy names (a false ESTALE). Waited for with
            # no lock held; _rename_file checks again under the node locks.
            for n in (src, dst) if dst is not None else (src,):
                await self.commit.upload_settled(n)
            if src.is_dir:  # the same for the files below it (_move_dir checks again under the node locks)
                for n in self._uploading_below(src_path):
                    await self.commit.upload_settled(n)
            if dst is not None and dst.is_dir and await self.has_children(dst_path):
                # (before the parent's marker: a refused rename writes nothing, as a refused
                # rmdir; a two-mount model search. Checked again under the locks below)
                raise FsError(errno.ENOTEMPTY)
            if src.version is not None or src.is_dir:
                marker = await self._keep_parent(parent)
                if marker is not None:
                    kept_parent.append(marker)
            dkeys = [self.naming.dir_key(p) for p in (src_path, dst_path)] if src.is_dir else []
            for dkey in dkeys:  # a queued DELETE below either must not meet the copies (no lock held)
                await self.settle_deletes(dkey)
                await self.retry_failed_deletes(dkey, "rename")  # the copy would bring a hidden object back
            paths = [src_path, dst_path]
            async with self.locks.hold(trees=paths) if src.is_dir else self.locks.hold(names=paths):
                if not (self._linked(src, src_path) and join(new_parent.path, new_name) == dst_path
                        and not new_parent.unlinked) or any(self.deferred.queued_under(k) for k in dkeys):
                    moved += 1
                    continue  # something moved (or was unlinked below) while we probed: again
                current = self.inodes.by_path.get(dst_path)
                if current is not None and current.unlinked:
                    current = None
                if current is not dst:
                    moved += 1
                    continue
                if dst is not None and dst.is_dir and await self.has_children(dst_path):
                    raise FsError(errno.ENOTEMPTY)  # checked under the tree lock: only dst's subtree waits
                if src.is_dir:
                    if not await self._rename_dir(src, dst_path, dst):
                        continue  # an upload below it started meanwhile: wait for it with the locks released
                    _count_subdirs(parent, -1)
                    if dst is None:  # a directory replaced there leaves new_parent's count as it was
                        _count_subdirs(new_parent, +1)
                elif not await self._rename_file(src, dst_path, dst):
                    continue  # an upload started meanwhile: wait for it with the locks released
                touch(parent)
                touch(new_parent)
            return
        raise FsError(errno.EIO, "the names kept changing")

    @staticmethod
    def _check_replace(src: Node, dst: Node | None, flags: int) -> None:
        if dst is None:
            return
        if flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if src.is_dir and not dst.is_dir:
            raise FsError(errno.ENOTDIR)
        if dst.is_dir and not src.is_dir:
            raise FsError(errno.EISDIR)

    async def _rename_file(self, src: Node, dst_path: str, dst: Node | None) -> bool:
        """:meth:`_move_file`; opens and lookups of ``src`` and ``dst`` that start meanwhile
        wait for it (name_going)."""
        with name_going(*(n for n in (src, dst) if n is not None)):
            return await self._move_file(src, dst_path, dst)

    async def _move_file(self, src: Node, dst_path: str, dst: Node | None) -> bool:
        """Move file ``src`` to ``dst_path`` (replacing ``dst``). A committed version is copied
        (conditional on its ETag), then deleted at the old name. If the copy fails nothing
        changed; if the delete fails, the copy is deleted again when it replaced nothing (the
        state is as before), else (or if that fails too) both names hold the file. Either way
        FsError(EIO) and one log line. A copy that got no answer and is at the new name is
        the rename's (:meth:`_landed_copy`); one not there fails the rename and is watched
        until it may no longer land (:meth:`_watch_late_copy`). If another client rewrote the source since the copy,
        both names show (theirs at the old, ours at the new) and FsError(ESTALE). A new file's
        rename over a committed one records the replaced object's delete (crash safety).
        Returns False, having changed nothing, when an upload of ``src`` or ``dst`` runs (the
        caller waits for it with no lock held and tries again); True when done.
        Raises FsError ESTALE, EIO, ENOSPC."""
        nodes = _by_ino(n for n in (src, dst) if n is not None)
        if any(self.commit.upload_running(n) for n in nodes):
            return False
        if dst is not None:
            await self._keep_replaced_readable(dst)
        new_key = self.naming.key(dst_path)
        await self._keep_unlinked_readable(new_key)
        async with NodeLocks(nodes):
            # under the node locks: an upload starting from here on sees the new name (or dst
            # unlinked) when it takes its node's lock to seal
            if any(self.commit.upload_running(n) for n in nodes):
                return False
            if dst is None:  # onto a name a queued file left just now (rm f; mv f.tmp f)
                self.commit.took_path(dst_path, src)
            else:
                # a save by rename over a version still waiting for its upload: src's is due
                # when dst's was (said before _take_name drops dst's; should the rename fail
                # below, dst keeps its name and its own upload: the heir of a node that is not
                # unlinked is not followed)
                self.commit.took_name(dst, src)
            old_path = src.path
            rlog = None
            base = self.commit.conflicts.saved_base(src)
            if src.version is None:  # a replaced object at the old name must not stay behind
                await self._delete_replaced(src, self.naming.key(old_path))
                if dst is None:  # an unlinked open file's object waiting there: replaced knowingly
                    pending = self.deferred.last_etag(new_key)
                    if pending is not None:  # (as a create at that name does)
                        self.commit.conflicts.replaces(src, pending)
                    elif self.resolver.hidden_at(dst_path):
                        # a plaintext object plaintext_objects = "hide" hides: replaced as a
                        # committed source's rename replaces it, kept as a conflict copy first
                        # (a trial: src's create-only upload went to a conflict copy instead)
                        now = await store_request(self.store.head(new_key), new_key)
                        if now is not None and is_hidden(now, self.resolver.plaintext_objects):
                            await self._keep_as_conflict(new_key, now, None)
                            self.commit.conflicts.replaces(src, now.etag)
                else:  # what the bucket has at dst's name: replaced knowingly
                    v = dst.version
                    unseen = _unseen(dst)  # (before the HEAD's await: a lookup meanwhile changes it)
                    if v is not None and (unseen or (dst.seen_etag and not same_etag(dst.seen_etag, v.etag))):
                        # the rename's lookup took another client's version, which nobody here
                        # read (its applications last opened seen_etag, or the kernel took the
                        # name for free): kept as a conflict copy first, as a committed source's
                        # rename does (a trial: an editor's save of a new temp file over it lost
                        # the other mount's edit, no warning). (Changed again since: src's
                        # upload finds that and goes to a conflict copy itself.)
                        now = await store_request(self.store.head(new_key), new_key)
                        if now is not None and same_etag(now.etag, v.etag):
                            await self._keep_as_conflict(new_key, now, None if unseen else dst.seen_etag)
                    replaced = v.etag if v is not None else await self._replaced_etag(dst, new_key)
                    if replaced is not None:  # (dst may itself be a new file renamed over it)
                        self.commit.conflicts.replaces(src, replaced)
                    if dst.version is not None and not self.commit.journaled(src):
                        # src's upload overwrites that object; should a crash come first, the
                        # next mount deletes it (dst was unlinked by this rename, it must not
                        # come back). A journaled src needs none: its record, moved to the new
                        # name below (rejournal) with that version as its base, replaces it
                        # after a crash, and a crash before the record moved leaves dst as it
                        # was (a new-user trial: a delete recorded first, then a kill -9 during
                        # its fsync, and dst vanished, the new content under the temp name)
                        self._record_delete(new_key, dst.version.etag)
            else:
                # from here on the next mount finishes what a crash cuts off (fs/renames.py)
                rlog = self.renames.begin(old_path, dst_path, {src.version.key: src.version.etag}, None, file=True)
                try:
                    await self._copy_and_delete_file(src, old_path, dst_path, dst, rlog)
                except FsError as e:
                    if e.errno != errno.ESTALE and rlog.started and not rlog.copied:
                        # (not found: _copy_and_delete_file looked)
                        self._watch_late_copy(rlog, e if isinstance(e, CopyUnanswered) else None)
                    else:
                        self.renames.end(rlog)  # settled here: nothing changed, or both names show (logged)
                    raise
                except BaseException:
                    self.renames.leave(rlog)  # cancelled mid-way: the next mount settles it
                    raise
            if dst is not None and not dst.unlinked:
                # src's record names dst_path before _take_name drops dst's records: a crash
                # between leaves both, and the newer wins at the next mount (journal.read_journal);
                # the other way round, a crash there brought back dst's committed version, an
                # older one than either save (one that fails here changes no name)
                try:
                    self.commit.rejournal(src, dst_path)
                except FsError:
                    self.commit.conflicts.restore_base(src, base)
                    raise
                self._take_name(dst)
            self.inodes.move(src, old_path, dst_path)
            if src.version is None:  # (as _take_name: nothing of it stays at the old name)
                self.store.vacated(self.naming.key(old_path))
            self.commit.rejournal(src)  # (recorded above when it replaced dst)
            if rlog is not None:  # (after the journal names the new path: module doc of fs/renames.py)
                self.renames.end(rlog)
        return True

    async def _copy_and_delete_file(self, src: Node, old_path: str, dst_path: str, dst: Node | None,
                                    rlog: RenameLog) -> None:
        """:meth:`_move_file` of a committed version, its rename log ``rlog`` started: copy it
        (conditional on its ETag; what another client put at the new name since this mount
        looked is kept as a conflict copy first: :meth:`_keep_foreign`), drop ``dst``, delete
        the original. Raises FsError ESTALE, EIO, ENOSPC (the outcome logged: nothing changed,
        or both names show)."""
        v = src.version
        assert v is not None
        new_key = self.naming.key(dst_path)
        mark = self.deferred.mark()
        # what this mount knows at new_key: the version of dst its applications last opened
        # (seen_etag: a lookup may have taken another client's newer one since, which nobody
        # here has read: a trial's editor save replaced it), else dst's version, or the one its
        # upload replaces (an unlinked file's version whose DELETE is pending counts too:
        # _copy_keeping_theirs). Nothing known: a create-only copy
        if dst is None:
            known = None
        elif dst.version is None:
            known = self.commit.conflicts.replaced(dst)
        elif _unseen(dst):  # the kernel took the name for free: the rename's own probe found theirs
            known = None
        else:
            known = dst.seen_etag or dst.version.etag
        # directive COPY: the store copies every x-oss-meta-* field; a slim v lends none, so a
        # streaming copy (above the copy limit) HEADs the source for them
        source = ObjectInfo(v.key, v.size, v.etag, 0, v.metadata if v.held else {})
        try:  # conditional on v.etag: the copy is exactly v (A1)
            info = await self._copy_keeping_theirs(rlog, source, new_key, known, replacing=dst is not None)
        except FsError as e:
            if e.errno == errno.ESTALE:
                src.checked_at = 0.0  # another client's version: re-read at next lookup
                if dst is not None:
                    dst.checked_at = 0.0  # (so may dst's be)
                raise  # nothing was written: dst keeps its name
            landed = await self._landed_copy(rlog, source, new_key)
            if landed is None:
                raise  # not there (yet): the caller watches for it
            info = landed
        # the copy and dst's drop go together: a crash after the copy is logged finishes the
        # rename, and must not bring dst's journaled version back (fs/renames.py)
        rlog.copied_to(info.key, info.etag)
        # the copy overwrote what was at new_key: the pending deletes of those versions
        # go (a DELETE or the replay after a crash compares ETags and would take the copy
        # when it has the same one: every empty object's on OSS)
        self.deferred.superseded(new_key, mark)
        if dst is not None:
            self._take_name(dst)  # the copy replaced its object
        try:
            await delete_version(self.store, v.key, v.etag, log_failure=False)
        except FsError as e:
            if e.errno == errno.ESTALE:  # another client's newer version stays at the old
                src.checked_at = 0.0  # name (logged), ours is at the new: both show
                self._show_copy(dst_path)
            else:
                await self._undo_copy(old_path, dst_path, info, replaced=dst is not None, reason=e)
            raise
        self.cache.rekey(v.key, v.etag, new_key, info.etag)
        self.renames.follow(v.key, new_key, info.etag, dst_path)  # (a watched late copy's original)
        moved = v.copied_as(new_key, info.etag)
        set_local_version(src, moved)
        self.resolver.recent.touch(moved)

    async def _copy_keeping_theirs(self, rlog: RenameLog, source: ObjectInfo, key: str, known: str | None, *,
                                   replacing: bool) -> ObjectInfo:
        """Rename ``rlog``'s copy of ``source`` to ``key`` (logged as sent, then ``copy_object``)
        that never replaces another client's object unseen: onto a name it replaces
        (``replacing``; this mount knows version ``known`` there) or where a pending delete
        waits, what is there is checked first (:meth:`_keep_foreign`); onto a name it believes
        free, the copy is create-only, and a name taken meanwhile is checked then. Raises
        FsError ESTALE, EIO, ENOSPC (the log)."""
        pending = self.deferred.last_etag(key)
        there = None  # what the copy replaces (None: nothing, create-only)
        if replacing or pending is not None:  # what is there may be another client's
            there = await self._keep_foreign(key, (known, pending), source)
        rlog.copying(key)
        for refusals in range(_COPY_REFUSALS + 1):
            if rlog.file:  # should it land late, over an object it finishes the rename (latecopies)
                rlog.replacing = there is not None
            try:  # stating what it replaces: a local bucket checks it with the copy (no window)
                return await copy_object(self.store, self.uploader, source, key, if_absent=there is None,
                                         replaces=None if there is None else there.etag, quiet_unanswered=rlog.file)
            except DestinationChanged:  # another client wrote the name since this mount looked
                if refusals == _COPY_REFUSALS:
                    break
                there = await self._keep_foreign(key, (), source)
        log.warning("rename of %r to %r refused: another client kept writing %r (%d times in a row); nothing was "
                    "written (ESTALE)", source.key, key, key, _COPY_REFUSALS + 1)
        raise FsError(errno.ESTALE)

    async def _landed_copy(self, rlog: RenameLog, source: ObjectInfo, key: str) -> ObjectInfo | None:
        """The copy of ``source`` at ``key`` when file rename ``rlog``'s CopyObject got no answer
        but landed (the answer lost: a trickled or cut connection), else None (not there,
        another object there, the source changed, nothing sent, or the store fails the HEADs
        too); the source's wrapped data key goes to ``rlog.copy_key`` (what tells a late copy:
        ``latecopies.is_its_copy``). Only a request OSS may still carry out is looked for."""
        if not self.store.may_still_land(key):
            return None
        try:
            there, now = await self.store.head(key), await self.store.head(source.key)
        except StoreError:
            return None
        if now is not None and same_etag(now.etag, source.etag):
            rlog.copy_key = now.metadata.get(env.H_KEY)
        if there is None or not is_its_copy(rlog, there, now):
            return None
        log.info("rename of %r to %r: the copy's answer was lost, but the copy landed: the rename goes on", source.key,
                 key)
        self.store.landed_late(key, there.etag)
        return there

    def _watch_late_copy(self, rlog: RenameLog, unanswered: CopyUnanswered | None) -> None:
        """File rename ``rlog``'s copy failed and is not at the new name: the `mv` fails (EIO),
        and a copy OSS may still carry out (``unanswered``: it got no answer) is watched
        (``fs/latecopies.py``): taken back when it lands, or, landing over the object it
        replaces, it finishes the rename (trial AH: a late copy left the file at both names). A
        copy never sent, or one refused with an answer, cannot land: the log ends. One line
        for an unanswered copy (the copy logged none)."""
        rlog.late = set(rlog.started)
        watched = watch_or_end(self.renames, rlog, self.store)
        if unanswered is not None:
            log.warning("rename of %r to %r failed: its copy got no answer (%s); %s", rlog.source, rlog.target,
                        unanswered, ("it is looked for until " + clock_text(rlog.undone_until or 0) + " and "
                                     + ("finishes the rename if it lands over what it replaces" if rlog.replacing
                                        else "taken back if it lands")) if watched else "it can no longer land")

    async def _keep_foreign(self, key: str, known: tuple[str | None, ...], source: ObjectInfo) -> ObjectInfo | None:
        """Before a rename's copy of ``source`` replaces ``key``: an object there that is none
        of the versions ``known`` (the first: the version this mount knows at ``key``) nor this
        mount's own last upload there is another client's, and is kept as a conflict copy first
        (``Conflicts.keep_theirs``, one WARNING), unless the rename will not happen: its source
        is not that version any more (ESTALE, nothing written: a trial found the copy made, the
        rename refused, and a second copy at the kernel's retry). Returns what is at ``key``
        now (None: nothing), for the copy to state what it replaces. Raises FsError EIO (the
        store), ESTALE."""
        now = await store_request(self.store.head(key), key)
        if now is None or any(same_etag(now.etag, e) for e in (*known, self.commit.conflicts.ours_at(key)) if e):
            return now
        src_now = await store_request(self.store.head(source.key), source.key)
        if src_now is None or not same_etag(src_now.etag, source.etag):
            log.warning("rename of %r refused: this mount knows version %s, the bucket has %s, and another client "
                        "wrote %r too (version %s); nothing was written (ESTALE)", source.key, source.etag,
                        "no object" if src_now is None else f"version {src_now.etag}", key, now.etag)
            raise FsError(errno.ESTALE)
        if same_object(now, src_now):  # a copy of this very version (an undone rename's, landed late:
            return now  # trial AF kept two such as conflict copies for good): the copy replaces it
        await self._keep_as_conflict(key, now, known[0] if known else None)
        return now

    async def _keep_as_conflict(self, key: str, now: ObjectInfo, known: str | None) -> None:
        """Copy another client's object ``now`` at ``key`` to a conflict copy next to it before
        a rename replaces it (this mount knew version ``known`` there). Raises FsError ESTALE
        (it changed again meanwhile), EIO (the store): the rename is refused."""
        try:
            await self.commit.conflicts.keep_theirs(key, now, known)
        except PreconditionFailed:
            log.warning("%r changed again while it was kept as a conflict copy; the rename is refused (ESTALE)", key)
            raise FsError(errno.ESTALE) from None
        except StoreError as e:
            log.error("%r: another client's object there cannot be kept as a conflict copy (%s); the rename "
                      "is refused", key, e)
            raise FsError(errno_of(e)) from None

    async def _undo_copy(self, old_path: str, dst_path: str, copy: ObjectInfo, *, replaced: bool,
                         reason: FsError) -> None:
        """A file rename copied ``old_path``'s object to ``dst_path`` (``copy``) but could not
        delete the original: delete the copy again if it replaced nothing (the rename did not
        happen), else show both names (the copy is at ``dst_path`` now). One log line."""
        if not replaced:
            try:
                await delete_version(self.store, copy.key, copy.etag, log_failure=False)
                log.error("rename of %r to %r failed: deleting %r failed (%s); the copy was deleted again, "
                          "nothing changed", old_path, dst_path, self.naming.key(old_path), reason)
                return
            except FsError:
                pass
        self._show_copy(dst_path)
        log.error("rename of %r to %r failed half-way: deleting %r failed (%s); both names hold the file now",
                  old_path, dst_path, self.naming.key(old_path), reason)

    def _uploading_below(self, path: str) -> list[Node]:
        """The nodes below directory ``path`` whose upload runs now (Commit.upload_running)."""
        return [n for n in self.inodes.nodes.values()
                if n.path.startswith(path + "/") and self.commit.upload_running(n)]

    async def _rename_dir(self, src: Node, dst_path: str, dst: Node | None) -> bool:
        """Move directory ``src`` and everything below it to ``dst_path`` (replacing the empty
        directory ``dst``): :meth:`_move_dir`. Returns False, having changed nothing, when an
        upload of a file below it runs (the caller waits for it with no lock held and tries
        again: its PUT would race the copies); True when done."""
        old_path = src.path
        affected = _by_ino(n for n in self.inodes.nodes.values()
                           if n.path == old_path or n.path.startswith(old_path + "/"))
        # lookups below it wait (a node made there now would keep the old path and version)
        with name_going(*affected):
            return await self._move_dir(src, old_path, dst_path, dst, affected)

    async def _move_dir(self, src: Node, old_path: str, dst_path: str, dst: Node | None,
                        affected: list[Node]) -> bool:
        """The copies and deletes of :meth:`_rename_dir`, under the node locks of ``affected``
        (every node at or below ``old_path``). Raises FsError ENAMETOOLONG, EIO, ESTALE."""
        async with NodeLocks(affected):
            # under the node locks: an upload starting from here on finds the new name when it
            # takes its node's lock to seal (as for a file: _move_file)
            if any(self.commit.upload_running(n) for n in affected):
                return False
            old_dkey, new_dkey = self.naming.dir_key(old_path), self.naming.dir_key(dst_path)
            keys: dict[str, ObjectInfo] = {}
            marker = None
            while True:
                page = await store_request(self.store.list(old_dkey, delimiter=None, marker=marker), old_dkey)
                keys.update((o.key, o) for o in page.objects)
                if page.next_marker is None:
                    break
                marker = page.next_marker
            # Objects whose delete is pending (files unlinked while open, replaced versions) stay
            # where they are, hidden: their delete takes them there, and the old prefix is hidden
            # as an rmdir'ed directory's is. (Moved, a close during the rename deleted the original
            # while the copy was made, and the copy showed as a file again: a trial.)
            left = [k for k, o in keys.items() if self.deferred.hides(o)]
            for k in left:
                del keys[k]
            # a failed file rename's late copy landed below it: taken back, not moved with the
            # tree (its watch looks at the old name only; a trial: the file stayed at both); or,
            # landed over the file it was to replace, it finishes that rename and moves
            for k in [t for w in self.renames.watched for t in w.targets if t in keys]:
                gone = await store_request(take_back_at(self.renames, self.store, self.naming, k, None,
                                                        "in a directory being renamed, at", may_finish=True,
                                                        uploading=False), k)
                if gone is not None:
                    keys.pop(gone, None)
            # Every key under the new name must fit OSS's limit: checked before anything is copied
            # (a copy failing half-way left a partial tree at the new name and EIO)
            moved_keys = [moved_key(k, old_dkey, new_dkey, self.naming.prefix) for k in keys]
            moved_keys += [self.naming.key(dst_path + n.path[len(old_path):]) for n in affected if n.staged]
            too_long = next((k for k in moved_keys if len(k.encode("utf-8")) > MAX_KEY_BYTES), None)
            if too_long is not None:  # named: it may be a key listings do not show (a trial)
                log.info("renaming %r to %r: ENAMETOOLONG, the key %r would be %d bytes, OSS takes %d",
                         old_path, dst_path, too_long[:80] + "…", len(too_long.encode("utf-8")), MAX_KEY_BYTES)
                raise FsError(errno.ENAMETOOLONG)
            if old_dkey not in keys:  # an implicit directory gets a marker, so it moves too
                keys[old_dkey] = await store_request(self.store.put_bytes(old_dkey, b"", attr_meta(src)), old_dkey)
                src.implicit = False
            # from here on the next mount undoes or finishes what a crash cuts off (fs/renames.py)
            rlog = self.renames.begin(old_path, dst_path, {k: o.etag for k, o in keys.items()},
                                      attr_meta(dst) if dst is not None and not dst.implicit else None)
            try:
                await self._copy_and_delete(src, old_path, dst_path, dst, affected, keys, rlog)
            except BaseException:
                self.renames.leave(rlog)
                raise
            self.renames.end(rlog)
            if left:
                self.deferred.note_removed_dir(old_dkey)
        return True

    async def _take_copies_back(self, rlog: RenameLog) -> None:
        """A copy of rename ``rlog`` failed (the store, or another client's change): delete the
        copies made so far, so the failed `mv` moved nothing (a trial: coreutils' `mv` then
        moved the tree into the half-made directory). If that fails too, the next mount does
        it (the log stays)."""
        try:
            kept = await undo_rename(self.store, rlog, self.naming)
        except (StoreError, FsError) as e:
            log.error("rename of %r to %r failed, and taking back its copies failed too (%s); the next mount "
                      "takes them back", rlog.source, rlog.target, e)
            return
        watched = watch_or_end(self.renames, rlog, self.store)
        log.info("rename of %r to %r failed; its copies were taken back%s%s", rlog.source, rlog.target,
                 f" but {kept} (changed since)" if kept else "",
                 f"; {len(rlog.late)} sent without an answer are looked for until they may no longer land"
                 if watched else "")

    async def look_near(self, path: str) -> None:
        """Before a lookup or listing of ``path``: take back what undone renames' late copies
        put at, above or below it (``latecopies.look_for_late_copies``; at most once a second)."""
        await look_for_late_copies(self.renames, self.store, self.naming, self.locks, near=path,
                                   changed=self._changed_behind, in_use=self._in_use, put_back=self.commit.put_back)

    async def watch_late_copies(self) -> None:
        """Run forever (a daemon task): look for the late copies of undone renames every few
        seconds (``latecopies.look_for_late_copies``)."""
        while True:
            await trio.sleep(LATE_FIRST_LOOK)
            await look_for_late_copies(self.renames, self.store, self.naming, self.locks,
                                       changed=self._changed_behind, in_use=self._in_use,
                                       put_back=self.commit.put_back)

    def _in_use(self, path: str, writing: bool) -> bool:
        """Whether this mount holds the file at ``path`` changed (not yet uploaded, or its
        upload still running) or open (``writing``: open for writing) (``latecopies.InUse``)."""
        node = self.inodes.by_path.get(path)
        if node is None:
            return False
        # (an open under way has no handle yet: it may be for writing)
        opened = (node.opens > len(node.handles) or any(h.writable for h in node.handles)) if writing \
            else node.opens > 0
        return opened or node.staged is not None or self.commit.upload_running(node)

    def _changed_behind(self, path: str) -> None:
        """The object at ``path`` changed behind this mount's view (a late copy finished a
        failed rename): its node asks the store again at its next lookup."""
        node = self.inodes.by_path.get(path)
        if node is not None:
            node.checked_at = 0.0

    def settle_later(self, rlog: RenameLog, doomed: dict[str, str], finished: bool) -> None:
        """Settle rename ``rlog`` a crash cut off while the store fails (fs/renames.py): the
        objects ``doomed`` (key → ETag: its originals if ``finished``, else its copies) become
        pending deletes, as when a rename's DELETEs fail (hidden now, deleted once the store
        answers; a newer version at such a key is left alone); a finished rename's journaled
        files move (:meth:`move_recovered`). Before the mount serves. Raises OSError (the
        cache disk), FsError (the journal)."""
        for key, etag in doomed.items():
            self.deferred.record(key, etag, ready=True, fsync=False)
        if not rlog.file:
            self.deferred.note_removed_dir(self.naming.dir_key(rlog.source if finished else rlog.target))
        if finished:
            rlog.deleting = True
            self.move_recovered(rlog)

    def move_recovered(self, rlog: RenameLog) -> int:
        """The files the journal recovered at or below ``rlog.source`` move to ``rlog.target``:
        the rename a crash cut off after its copies is finished (fs/renames.py); returns how
        many. As in :meth:`_copy_and_delete`, a recovered version that replaces an object
        copied there now replaces the copy. Before the mount serves; raises FsError (ENOSPC:
        the journal)."""
        old_path, dst_path = rlog.source, rlog.target
        key_of = self.naming.key if rlog.file else self.naming.dir_key
        old_dkey, new_dkey = key_of(old_path), key_of(dst_path)
        if rlog.drop_at_target:  # the replaced file's journaled version: the rename dropped it
            there = self.inodes.by_path.get(dst_path)
            if there is not None and there.staged is not None:
                self._take_name(there)
                self.names.note_present(dst_path)  # the copy is there: the next lookup asks the store
        moving = [n for n in self.inodes.by_path.values()
                  if n.staged is not None and (n.path == old_path or n.path.startswith(old_path + "/"))]
        for n in moving:
            old_key = self.naming.key(n.path)
            copy = rlog.copied.get(new_dkey + old_key[len(old_dkey):])
            replaced = self.commit.conflicts.replaced(n) if n.version is None else None
            if replaced is not None and copy is not None and same_etag(rlog.objects.get(old_key), replaced):
                self.commit.conflicts.replaces(n, copy)
            self.inodes.move(n, n.path, dst_path + n.path[len(old_path):], renamed=False)
            self.commit.rejournal(n)
        return len(moving)

    async def _copy_and_delete(self, src: Node, old_path: str, dst_path: str, dst: Node | None,
                               affected: list[Node], keys: dict[str, ObjectInfo], rlog: RenameLog) -> None:
        """:meth:`_move_dir` once ``keys`` (every object below ``old_path``) are known and its
        rename log ``rlog`` is started: copy all (the copy of the directory's marker replaces
        ``dst``'s), delete all, move the nodes. A failed copy takes the copies back (``rlog``,
        the next mount if that fails too); a failed delete is left to the pending deletes
        (hidden, retried): the rename is done once every copy has landed."""
        old_dkey, new_dkey = self.naming.dir_key(old_path), self.naming.dir_key(dst_path)
        target = {k: moved_key(k, old_dkey, new_dkey, self.naming.prefix) for k in keys}  # old key → its copy's key
        # files unlinked while open below the new name: the copies overwrite their objects
        await self._keep_unlinked_readable(*target.values())
        copies: dict[str, ObjectInfo] = {}
        kept_lists: set[str] = set()  # tag lists left where they are (another object at their new key)
        mark = self.deferred.mark()

        async def copy(k: str, o: ObjectInfo) -> None:
            listed = is_tag_list(k[len(old_dkey):])  # up to the mount root's lists (renamelog.moved_key)
            there = await store_request(self.store.head(target[k]), target[k]) if listed else None
            # that list is there already (named by content): the original just goes, unless the
            # one there holds other bytes: one of the two is damaged and only the files naming it
            # can tell which, so both stay (a trial: the good one went, the file gave EIO)
            if there is not None:
                if not await store_request(same_list(self.store, there, k, o.etag), k):
                    kept_lists.add(k)
                    log.warning("rename of %r to %r: the tag list %r stays where it is: %r holds other bytes: "
                                "one of the two is damaged (`ossfuse check --verify` names the files that fail)",
                                old_path, dst_path, k, target[k])
                return
            if k == old_dkey or listed:  # the marker replaces dst's, or makes the directory
                rlog.copying(target[k])
                copies[k] = await copy_object(self.store, self.uploader, o, target[k])
            else:  # below a directory this mount believes empty or absent: another client's file is
                # kept (a trial: `mv X Y` replaced Y/f that another client had put there)
                copies[k] = await self._copy_keeping_theirs(rlog, o, target[k], None, replacing=False)
            rlog.copied_to(copies[k].key, copies[k].etag)
            self.deferred.superseded(copies[k].key, mark)  # as a file rename's copy (_rename_file)

        postponed: list[tuple[str, FsError]] = []  # originals whose DELETE failed: pending deletes now

        async def delete(k: str, o: ObjectInfo) -> None:
            if k in kept_lists:
                return
            try:  # only the version copied: a newer foreign one stays
                await delete_version(self.store, k, o.etag, log_failure=False)
            except FsError as e:
                if e.errno == errno.ESTALE:
                    return  # logged; that newer version stays at the old name, the copy at the new
                try:  # the rename is done: this original is hidden and deleted later
                    self.deferred.record(k, o.etag, ready=True, fsync=False)
                except OSError as err:
                    log.error("rename of %r to %r: deleting %r failed (%s) and cannot be left for later (%s); "
                              "the next mount finishes it", old_path, dst_path, k, e, err)
                    raise e from None
                postponed.append((k, e))

        # copy all first, then delete: an interruption leaves both, never neither, and the
        # next mount undoes or finishes what a crash cut off (rlog). Several at once (each is
        # one or two round trips): the names below wait for the rename
        try:
            await run_all([functools.partial(copy, k, o) for k, o in keys.items()], RENAME_PARALLEL)
        except FsError:
            await self._take_copies_back(rlog)
            raise
        try:
            rlog.copies_done()
        except OSError as e:  # an undo after a crash would take copies whose originals are gone
            log.error("rename of %r to %r: its rename log cannot be written (%s); the originals are kept",
                      old_path, dst_path, e)
            raise FsError(errno_of(e)) from None
        if dst is not None:  # (its marker was replaced by the copy of the directory's)
            dst.unlinked = True
            self.inodes.remove_name(dst)
            self.inodes.maybe_drop(dst)
        await run_all([functools.partial(delete, k, o) for k, o in keys.items()], RENAME_PARALLEL)
        if self.renames.watched:  # a watched late copy's original moved: watched at its new key
            for k, info in copies.items():
                self.renames.follow(k, info.key, info.etag, self.naming.path_of(info.key) or dst_path)
        if postponed:
            self.deferred.note_removed_dir(old_dkey)
            log.warning("rename of %r to %r: %d original(s) could not be deleted yet (e.g. %r: %s); hidden, "
                        "they are deleted later", old_path, dst_path, len(postponed), postponed[0][0], postponed[0][1])
        for n in affected:
            new = dst_path + n.path[len(old_path):]
            old_key = self.naming.key(n.path)
            replaced = self.commit.conflicts.replaced(n) if n.version is None else None
            if replaced is not None and old_key in copies and same_etag(keys[old_key].etag, replaced):
                # a staged file's upload replaces the object at its name: now the copy (its
                # old ETag at the new name looked like another client's edit: a conflict copy)
                self.commit.conflicts.replaces(n, copies[old_key].etag)
            v = n.version
            # the copy is of the listed version: only then may v's cached blocks serve it
            if v is not None and v.key in copies and keys[v.key].etag == v.etag:
                info = copies[v.key]
                self.cache.rekey(v.key, v.etag, info.key, info.etag)
                moved = v.copied_as(info.key, info.etag)
                set_local_version(n, moved)
                self.resolver.recent.touch(moved)
            elif v is not None:
                n.checked_at = 0.0  # another client's version was listed and moved: re-read it
            if n.unlinked:  # a file unlinked while open: nameless, its object hidden where it is
                n.path = new
                continue
            self.inodes.move(n, n.path, new, renamed=n is src)
            self.commit.rejournal(n)
        for n in affected:  # their names moved one by one: list them anew when asked
            n.children = None
        self.names.note_present_under(dst_path)  # moves of nodes noted their old paths absent
