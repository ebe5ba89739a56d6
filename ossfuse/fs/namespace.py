"""Namespace changes: mkdir, rmdir, create, mknod, unlink, symlink and rename.

Locking (docs/design.md, "Locks and what they protect"): each operation locks the names it
changes (:class:`~ossfuse.fs.locks.NameLocks`), never the mount. The pattern is probe → lock →
re-check → commit: what the store says (HEAD, LIST) and a new data key (KMS) are fetched with
no lock held; under the lock the operation re-checks what may have changed meanwhile, from
local state only, and commits. The only store calls made under a name lock are the ones that
commit the change (mkdir's and symlink's PUT, unlink's and rmdir's DELETE, a rename's copies
and deletes, rmdir's final emptiness LIST): a lock covers only the names involved, so the only
operations that wait for that call are ones on the same names, which must be ordered after it
anyway. Node locks are taken after name locks, in ascending inode order."""
from __future__ import annotations

import errno
import logging
import stat
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..cache import BlockCache, TruncatedObject
from ..store.base import ObjectInfo, ObjectStore, StoreError
from ..writeback.upload import Uploader
from .commit import Commit
from .copying import copy_object, delete_version
from .errors import FsError, errno_of, store_request
from .files import Files
from .inodes import InodeTable
from .locks import NameLocks
from .model import SPECIAL_TYPES, FileHandle, Node, Version, set_local_version, touch
from .namecache import NameCache
from .naming import Naming, join
from .objmeta import attr_meta, file_metadata, special_metadata
from .resolve import Resolver
from .unlinked import DeferredDeletes

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
_RECHECKS = 3  # probes of a name that keeps changing before one is made under its lock


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


def _by_ino(nodes) -> list[Node]:
    return sorted(nodes, key=lambda n: n.ino)


class Namespace:
    """Namespace operations of one mount. ``create_umask``: a configured umask, applied to the
    mode of every new file and directory; ``deferred``: where deletes of unlinked open files
    wait for their last close."""

    def __init__(self, store: ObjectStore, uploader: Uploader, naming: Naming, inodes: InodeTable,
                 names: NameCache, resolver: Resolver, files: Files, commit: Commit, cache: BlockCache, *,
                 create_umask: int, deferred: DeferredDeletes):
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
        self.deferred = deferred
        self.locks = NameLocks()
        self._unlinked_open: dict[Node, tuple[str, str]] = {}  # node → (key, ETag) deleted at its last close

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

    @asynccontextmanager
    async def _new_name_locked(self, parent: Node, name: str, is_dir: bool = False) -> AsyncIterator[str]:
        """The path of a new entry ``name`` in ``parent``, locked, once nothing is there: probed
        with no lock held, re-checked under the lock. FsError EEXIST, ENOENT (the parent was
        removed meanwhile), EINVAL/ENAMETOOLONG, EIO."""
        for _ in range(_RECHECKS):
            path = join(parent.path, name)
            await self.resolver.check_absent(parent, name, is_dir)
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

    async def _keep_parent(self, parent: Node) -> None:
        """A child of ``parent`` is about to be deleted from the store: if ``parent`` exists only
        as a key prefix (an implicit directory), write its marker ``dir/`` first, so it does not
        vanish with its last child (what ossfs/s3fs do). Raises FsError(EIO)."""
        if parent.implicit and not parent.unlinked and parent.path:
            dkey = self.naming.dir_key(parent.path)
            await store_request(self.store.put_bytes(dkey, b"", attr_meta(parent)), dkey)
            parent.implicit = False

    # -- directories ------------------------------------------------------------------------
    async def mkdir(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        """A new directory (its marker object ``path/``), lookup count one. Raises FsError
        EEXIST, EINVAL/ENAMETOOLONG for a name that cannot be a key, ENOENT, EIO."""
        async with self._new_name_locked(parent, name, is_dir=True) as path:
            now = time.time_ns()
            node = self.inodes.new_node(path, stat.S_IFDIR | (mode & 0o7777 & ~self.create_umask), uid, gid, now)
            try:  # the commit, under the new name's lock only
                await self.store.put_bytes(self.naming.dir_key(path), b"", attr_meta(node))
            except StoreError as e:
                self.inodes.discard(node)
                log.error("mkdir %r failed: %s", self.naming.dir_key(path), e)
                raise FsError(errno_of(e)) from None
            self.names.set_children(node, ())  # new and empty: lookups in it need no request
            node.subdirs = 0
            _count_subdirs(parent, +1)
            self.inodes.remember(node)
            touch(parent)
            return node

    async def has_children(self, path: str) -> bool:
        """Whether directory ``path`` holds anything: staged files of this mount, or keys
        under its prefix other than its own marker. Raises FsError(EIO)."""
        # Checked before listing: a file whose upload finishes meanwhile is in one or the other.
        if self.commit.staged_in(path):
            return True
        dkey = self.naming.dir_key(path)
        page = await store_request(self.store.list(dkey, delimiter=None, max_keys=2), dkey)
        return any(o.key != dkey for o in page.objects)

    async def rmdir(self, parent: Node, name: str) -> None:
        """Remove an empty directory. Raises FsError ENOENT, ENOTDIR, ENOTEMPTY, EIO."""
        node = await self.resolver.existing(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        await self._keep_parent(parent)
        async with self._existing_locked(parent, name, tree=True) as node:
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            # Listed under the tree lock (only operations inside this directory wait for it):
            # a child this mount made after an earlier check would otherwise be orphaned.
            if await self.has_children(node.path):
                raise FsError(errno.ENOTEMPTY)
            dkey = self.naming.dir_key(node.path)
            await store_request(self.store.delete(dkey), dkey)
            node.unlinked = True
            self.inodes.remove_name(node)
            _count_subdirs(parent, -1)
            touch(parent)

    # -- files and symlinks -----------------------------------------------------------------
    async def create(self, parent: Node, name: str, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[Node, FileHandle]:
        """A new empty file, staged (in the bucket at its upload), lookup count one, and an
        open handle on it. Raises FsError EEXIST, ENOENT, EINVAL/ENAMETOOLONG, EIO."""
        await self.resolver.check_absent(parent, name)  # before the KMS call: EEXIST costs none
        envelope = await self.files.new_envelope(join(parent.path, name))  # KMS: no lock held
        async with self._new_name_locked(parent, name) as path:  # no await below: nothing waits on it
            node = self.inodes.new_node(path, stat.S_IFREG | (mode & 0o7777 & ~self.create_umask), uid, gid,
                                        time.time_ns())
            node.staged = self.files.staging.new(envelope)
            key = self.naming.key(path)
            for key_, etag in self._unlinked_open.values():
                if key_ == key:  # the object of a file unlinked while open: ours replaces it knowingly
                    self.commit.conflicts.replaces(node, etag)
            self.commit.mark_staged(node)
            self.inodes.remember(node)
            touch(parent)
            return node, self.files.open_handle(node, flags)

    async def symlink(self, parent: Node, name: str, target: str, uid: int, gid: int) -> Node:
        """A symlink: an encrypted object holding ``target``, mode S_IFLNK in its metadata.
        Raises FsError EEXIST, ENOENT, EINVAL/ENAMETOOLONG, EIO."""
        await self.resolver.check_absent(parent, name)  # before the KMS call: EEXIST costs none
        envelope = await self.files.new_envelope(join(parent.path, name))  # KMS: no lock held
        async with self._new_name_locked(parent, name) as path:
            node = self.inodes.new_node(path, stat.S_IFLNK | 0o777, uid, gid, time.time_ns())
            data = target.encode("utf-8", "surrogateescape")
            meta = file_metadata(node, envelope.wrapped, len(data))
            try:  # the commit, under the new name's lock only
                info = await self.store.put_bytes(self.naming.key(path), envelope.crypt(0, data), meta)
            except StoreError as e:
                self.inodes.discard(node)
                log.error("symlink %r failed: %s", self.naming.key(path), e)
                raise FsError(errno_of(e)) from None
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
        async with self._new_name_locked(parent, name) as path:
            node = self.inodes.new_node(path, kind | (mode & 0o7777 & ~self.create_umask), uid, gid, time.time_ns())
            if envelope is not None:
                meta = file_metadata(node, envelope.wrapped, 0)
            else:
                meta = special_metadata(node, rdev)
            try:  # the commit, under the new name's lock only
                info = await self.store.put_bytes(self.naming.key(path), b"", meta)
            except StoreError as e:
                self.inodes.discard(node)
                log.error("mknod %r failed: %s", self.naming.key(path), e)
                raise FsError(errno_of(e)) from None
            node.version = Version(info.key, info.etag, 0, meta, envelope.wrapped if envelope else None, envelope)
            self.inodes.remember(node)
            touch(parent)
            return node

    async def unlink(self, parent: Node, name: str) -> None:
        """Remove a file or symlink. Open handles keep reading it: the name goes at once, the
        object stays in the bucket until the last handle closes (:mod:`ossfuse.fs.unlinked`;
        nothing is downloaded). Raises FsError ENOENT, EISDIR, EIO (ENOSPC: the cache disk
        cannot record the pending delete)."""
        node = await self.resolver.existing(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if node.version is not None:
            await self._keep_parent(parent)
        async with self._existing_locked(parent, name) as node:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            async with node.lock:
                v = node.version
                key = self.naming.key(node.path)
                if v is not None and node.opens > 0 and node.staged is None:
                    try:
                        self.deferred.record(key, v.etag)
                    except OSError as e:
                        log.error("cannot record the pending delete of open %r: %s", key, e)
                        raise FsError(errno_of(e)) from None
                    self._unlinked_open[node] = (key, v.etag)
                elif v is not None:
                    await store_request(self.store.delete(key), key)  # the commit
                else:
                    await self._delete_replaced(node, key)
                self._take_name(node)
            touch(parent)
        await self.commit.upload_settled(node)  # an upload in flight deletes what it put

    async def _delete_replaced(self, node: Node, key: str) -> None:
        """``node`` is a new file renamed over a committed one and not uploaded yet: the old
        object still sits at ``key``. Its name is going away (unlink, rename elsewhere), so the
        old object goes too (if it is still the version replaced), or it would come back once
        ``node``'s staged version is dropped or moved (git's ``master.lock`` → ``master``, then
        ``pack-refs`` unlinking ``master``). Raises FsError(EIO) on a store failure."""
        etag = self.commit.conflicts.replaced(node)
        if etag is None:
            return
        try:
            await delete_version(self.store, key, etag)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise  # ESTALE: another client wrote that name since; theirs stays (logged)
        self.commit.conflicts.replaces(node, None)

    def _take_name(self, node: Node) -> None:
        """``node``'s name is gone (unlinked, or replaced by a rename): a staged version no
        handle needs is dropped (no upload), and lookups no longer find it."""
        node.unlinked = True
        if node.staged is not None:
            if node.opens == 0:
                self.commit.drop_staged(node)
            else:  # kept for its open handles, but a crash must not bring it back
                self.commit.forget_journal(node)
        self.inodes.remove_name(node)

    async def last_close(self, node: Node) -> None:
        """The last handle of unlinked ``node`` closed: delete its object if the unlink left it
        for the readers (logged, never raised: the caller is a release)."""
        pending = self._unlinked_open.pop(node, None)
        if pending is None:
            return
        async with self.locks.hold(names=[node.path]):  # no create or unlink of that name meanwhile
            current = self.inodes.by_path.get(node.path)
            if current is not None and current is not node and not current.unlinked:
                # This mount made a new file at that name: its upload replaces the object (a
                # DELETE now could race that upload and delete the new version).
                self.deferred.forget(*pending)
                return
            await self.deferred.delete(*pending)

    async def _keep_replaced_readable(self, node: Node) -> None:
        """``node``'s object is about to be overwritten (a rename over it) while handles read
        it: keep its bytes in the cache, within the cache's limits; beyond them, warn that its
        readers will get ESTALE. Holds only the two names of the rename."""
        if node.opens > 0 and node.staged is None and node.version is not None:
            v = node.version
            try:
                await self.files.open_version(v)
                if not await self.cache.keep(v.key, v.etag, v.size):
                    log.warning("%r (%d bytes) is open and was renamed over; it does not fit the cache "
                                "limits, so its readers get ESTALE for what they have not read yet", v.key, v.size)
            except (FsError, StoreError, TruncatedObject) as e:
                log.warning("%r is open but could not be kept readable after being renamed over: %s", v.key, e)

    # -- rename -----------------------------------------------------------------------------
    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        """rename(2) with RENAME_NOREPLACE (flag 1); RENAME_EXCHANGE gives EINVAL. Files move
        with CopyObject + DeleteObject (envelope headers travel unchanged); a directory moves
        object by object (not atomic: docs/semantics.md). Locks: the two names for a file, the
        two subtrees for a directory (probed first with no lock held, then re-checked).
        Raises FsError ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, EIO."""
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)
        for _ in range(_RECHECKS):
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
            # An upload in flight of either would race the rename's copy: dst's landing over the
            # copy, src's replacing the version the copy names (a false ESTALE)
            for n in (src, dst) if dst is not None else (src,):
                await self.commit.upload_settled(n)
            if src.version is not None or src.is_dir:
                await self._keep_parent(parent)
            paths = [src_path, dst_path]
            async with self.locks.hold(trees=paths) if src.is_dir else self.locks.hold(names=paths):
                if not (self._linked(src, src_path) and join(new_parent.path, new_name) == dst_path
                        and not new_parent.unlinked):
                    continue  # something moved while we probed: again
                current = self.inodes.by_path.get(dst_path)
                if current is not None and current.unlinked:
                    current = None
                if current is not dst or any(n is not None and n.staged is not None and n.staged.uploading
                                             for n in (src, dst)):
                    continue
                if dst is not None and dst.is_dir and await self.has_children(dst_path):
                    raise FsError(errno.ENOTEMPTY)  # checked under the tree lock: only dst's subtree waits
                if src.is_dir:
                    await self._rename_dir(src, dst_path, dst)
                    _count_subdirs(parent, -1)
                    if dst is None:  # a directory replaced there leaves new_parent's count as it was
                        _count_subdirs(new_parent, +1)
                else:
                    await self._rename_file(src, dst_path, dst)
                touch(parent)
                touch(new_parent)
            if not src.is_dir:
                await self.commit.upload_settled(src)  # one in flight deletes its object at the old name
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

    async def _rename_file(self, src: Node, dst_path: str, dst: Node | None) -> None:
        if dst is not None:
            await self._keep_replaced_readable(dst)
        async with NodeLocks(_by_ino(n for n in (src, dst) if n is not None)):
            if src.version is None:  # a replaced object at the old name must not stay behind
                await self._delete_replaced(src, self.naming.key(src.path))
            if dst is not None:
                if src.version is None and dst.version is not None:
                    self.commit.conflicts.replaces(src, dst.version.etag)  # replaced knowingly
                self._take_name(dst)
            old_path = src.path
            if src.version is not None:
                v = src.version
                new_key = self.naming.key(dst_path)
                try:  # conditional on v.etag: the copy is exactly v (A1)
                    info = await copy_object(self.store, self.uploader,
                                             ObjectInfo(v.key, v.size, v.etag, 0, v.metadata), new_key)
                except FsError as e:
                    if e.errno == errno.ESTALE:
                        src.checked_at = 0.0  # another client's version: re-read at next lookup
                    raise
                await delete_version(self.store, v.key, v.etag)
                self.cache.rekey(v.key, v.etag, new_key, info.etag)
                set_local_version(src, Version(new_key, info.etag, v.size, v.metadata, v.wrapped, v.envelope))
            self.inodes.move(src, old_path, dst_path)
            self.commit.rejournal(src)

    async def _rename_dir(self, src: Node, dst_path: str, dst: Node | None) -> None:
        old_path = src.path
        affected = _by_ino(n for n in self.inodes.nodes.values()
                           if n.path == old_path or n.path.startswith(old_path + "/"))
        async with NodeLocks(affected):
            if dst is not None:
                await store_request(self.store.delete(self.naming.dir_key(dst_path)), dst_path)
                dst.unlinked = True
                self.inodes.remove_name(dst)
            old_dkey, new_dkey = self.naming.dir_key(old_path), self.naming.dir_key(dst_path)
            keys: dict[str, ObjectInfo] = {}
            marker = None
            while True:
                page = await store_request(self.store.list(old_dkey, delimiter=None, marker=marker), old_dkey)
                keys.update((o.key, o) for o in page.objects)
                if page.next_marker is None:
                    break
                marker = page.next_marker
            if old_dkey not in keys:  # an implicit directory gets a marker, so it moves too
                keys[old_dkey] = await store_request(self.store.put_bytes(old_dkey, b"", attr_meta(src)), old_dkey)
                src.implicit = False
            copies: dict[str, ObjectInfo] = {}
            for k, o in keys.items():  # copy all first, then delete: an interruption leaves both, never neither
                copies[k] = await copy_object(self.store, self.uploader, o, new_dkey + k[len(old_dkey):])
            for k, o in keys.items():  # only the versions copied: a newer foreign one stays
                try:
                    await delete_version(self.store, k, o.etag)
                except FsError as e:
                    if e.errno != errno.ESTALE:
                        raise
                    # logged; that newer version stays at the old name, the copy at the new
            for n in affected:
                new = dst_path + n.path[len(old_path):]
                v = n.version
                # the copy is of the listed version: only then may v's cached blocks serve it
                if v is not None and v.key in copies and keys[v.key].etag == v.etag:
                    info = copies[v.key]
                    self.cache.rekey(v.key, v.etag, info.key, info.etag)
                    set_local_version(n, Version(info.key, info.etag, v.size, v.metadata, v.wrapped, v.envelope))
                elif v is not None:
                    n.checked_at = 0.0  # another client's version was listed and moved: re-read it
                self.inodes.move(n, n.path, new)
                self.commit.rejournal(n)
            for n in affected:  # their names moved one by one: list them anew when asked
                n.children = None
