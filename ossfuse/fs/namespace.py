"""Namespace changes: mkdir, rmdir, create, unlink, symlink and rename.

Locking (docs/design.md): one mount-wide namespace lock serialises these operations, then node
locks are taken in ascending inode order. TODO(rebuild): per-name locks with no network I/O
under them (issue 12 A4)."""
from __future__ import annotations

import errno
import logging
import stat
import time

import trio

from ..cache import BlockCache, TruncatedObject
from ..store.base import ObjectInfo, ObjectStore, StoreError
from ..writeback.upload import Uploader
from .commit import Commit
from .copying import copy_object
from .errors import FsError, errno_of, store_request
from .files import Files
from .inodes import InodeTable
from .model import FileHandle, Node, Version, set_local_version, touch
from .namecache import NameCache
from .naming import Naming, join
from .objmeta import attr_meta, file_metadata
from .resolve import Resolver

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1


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


def _by_ino(nodes) -> list[Node]:
    return sorted(nodes, key=lambda n: n.ino)


class Namespace:
    """Namespace operations of one mount. ``create_umask``: a configured umask, applied to the
    mode of every new file and directory."""

    def __init__(self, store: ObjectStore, uploader: Uploader, naming: Naming, inodes: InodeTable,
                 names: NameCache, resolver: Resolver, files: Files, commit: Commit, cache: BlockCache, *,
                 create_umask: int):
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
        self.lock = trio.Lock()  # the namespace lock (see the module doc)

    # -- directories ------------------------------------------------------------------------
    async def mkdir(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        """A new directory (its marker object ``path/``), lookup count one. Raises FsError
        EEXIST, EINVAL/ENAMETOOLONG for a name that cannot be a key, EIO."""
        async with self.lock:
            await self.resolver.check_absent(parent, name, is_dir=True)
            path = join(parent.path, name)
            now = time.time_ns()
            node = self.inodes.new_node(path, stat.S_IFDIR | (mode & 0o7777 & ~self.create_umask), uid, gid, now)
            try:
                await self.store.put_bytes(self.naming.dir_key(path), b"", attr_meta(node))
            except StoreError as e:
                self.inodes.discard(node)
                log.error("mkdir %r failed: %s", self.naming.dir_key(path), e)
                raise FsError(errno_of(e)) from None
            self.names.set_children(node, ())  # new and empty: lookups in it need no request
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
        async with self.lock:
            path = join(parent.path, name)
            node = await self.resolver.existing(parent, name)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if await self.has_children(path):
                raise FsError(errno.ENOTEMPTY)
            dkey = self.naming.dir_key(path)
            await store_request(self.store.delete(dkey), dkey)
            node.unlinked = True
            self.inodes.remove_name(node)
            touch(parent)

    # -- files and symlinks -----------------------------------------------------------------
    async def create(self, parent: Node, name: str, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[Node, FileHandle]:
        """A new empty file, staged (in the bucket at its upload), lookup count one, and an
        open handle on it. Raises FsError EEXIST, EINVAL/ENAMETOOLONG, EIO."""
        async with self.lock:
            await self.resolver.check_absent(parent, name)
            path = join(parent.path, name)
            envelope = await self.files.new_envelope(path)
            node = self.inodes.new_node(path, stat.S_IFREG | (mode & 0o7777 & ~self.create_umask), uid, gid,
                                        time.time_ns())
            node.staged = self.files.staging.new(envelope)
            self.commit.mark_staged(node)
            self.inodes.remember(node)
            touch(parent)
            return node, self.files.open_handle(node, flags)

    async def symlink(self, parent: Node, name: str, target: str, uid: int, gid: int) -> Node:
        """A symlink: an encrypted object holding ``target``, mode S_IFLNK in its metadata.
        Raises FsError EEXIST, EINVAL/ENAMETOOLONG, EIO."""
        async with self.lock:
            await self.resolver.check_absent(parent, name)
            path = join(parent.path, name)
            envelope = await self.files.new_envelope(path)
            node = self.inodes.new_node(path, stat.S_IFLNK | 0o777, uid, gid, time.time_ns())
            data = target.encode("utf-8", "surrogateescape")
            meta = file_metadata(node, envelope.wrapped, len(data))
            try:
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

    async def unlink(self, parent: Node, name: str) -> None:
        """Remove a file or symlink; open handles keep reading it. Raises FsError ENOENT,
        EISDIR, EIO."""
        async with self.lock:
            node = await self.resolver.existing(parent, name)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            async with node.lock:
                committed = node.version is not None
                await self._unlink_keep_open(node)
                if committed:
                    await store_request(self.store.delete(self.naming.key(node.path)), node.path)
            touch(parent)

    async def _unlink_keep_open(self, node: Node) -> None:
        """``node``'s object is about to be deleted or replaced: keep it readable for its open
        handles (its ciphertext is fetched into the cache), drop a staged version no handle
        needs (no upload), and take its name away."""
        node.unlinked = True
        if node.opens > 0 and node.staged is None and node.version is not None:
            v = node.version
            try:
                await self.files.open_version(v)
                await self.cache.fetch_all(v.key, v.etag, v.size)
            except (FsError, StoreError, TruncatedObject) as e:
                log.warning("%r is open but could not be kept readable after removal: %s", v.key, e)
        if node.staged is not None:
            if node.opens == 0:
                self.commit.drop_staged(node)
            else:  # kept for its open handles, but a crash must not bring it back
                self.commit.forget_journal(node)
        self.inodes.remove_name(node)

    # -- rename -----------------------------------------------------------------------------
    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        """rename(2) with RENAME_NOREPLACE (flag 1); RENAME_EXCHANGE gives EINVAL. Files move
        with CopyObject + DeleteObject (envelope headers travel unchanged); a directory moves
        object by object (not atomic: docs/semantics.md). Raises FsError ENOENT, EEXIST,
        ENOTDIR, EISDIR, ENOTEMPTY, EINVAL, EIO."""
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)
        async with self.lock:
            src = await self.resolver.existing(parent, name)
            dst_path = join(new_parent.path, new_name)
            self.naming.check_new_path(dst_path, src.is_dir)
            if dst_path == src.path:
                return
            if src.is_dir and (dst_path + "/").startswith(src.path + "/"):
                raise FsError(errno.EINVAL)
            try:
                dst = await self.resolver.existing(new_parent, new_name)
            except FsError:
                dst = None  # TODO(rebuild): "cannot tell" is not "absent" (issue 12 A11)
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if src.is_dir and not dst.is_dir:
                    raise FsError(errno.ENOTDIR)
                if dst.is_dir and not src.is_dir:
                    raise FsError(errno.EISDIR)
                if dst.is_dir and await self.has_children(dst_path):
                    raise FsError(errno.ENOTEMPTY)
            if src.is_dir:
                await self._rename_dir(src, dst_path, dst)
            else:
                await self._rename_file(src, dst_path, dst)
            touch(parent)
            touch(new_parent)

    async def _rename_file(self, src: Node, dst_path: str, dst: Node | None) -> None:
        async with NodeLocks(_by_ino(n for n in (src, dst) if n is not None)):
            if dst is not None:
                await self._unlink_keep_open(dst)
            old_path = src.path
            if src.version is not None:
                v = src.version
                new_key = self.naming.key(dst_path)
                info = await copy_object(self.store, self.uploader, ObjectInfo(v.key, v.size, v.etag, 0, v.metadata),
                                         new_key)
                await store_request(self.store.delete(v.key), v.key)
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
            copies: dict[str, ObjectInfo] = {}
            for k, o in keys.items():  # copy all first, then delete: an interruption leaves both, never neither
                copies[k] = await copy_object(self.store, self.uploader, o, new_dkey + k[len(old_dkey):])
            for k in keys:
                await store_request(self.store.delete(k), k)
            for n in affected:
                new = dst_path + n.path[len(old_path):]
                v = n.version
                if v is not None and v.key in copies:
                    info = copies[v.key]
                    self.cache.rekey(v.key, v.etag, info.key, info.etag)
                    set_local_version(n, Version(info.key, info.etag, v.size, v.metadata, v.wrapped, v.envelope))
                self.inodes.move(n, n.path, new)
                self.commit.rejournal(n)
            for n in affected:  # their names moved one by one: list them anew when asked
                n.children = None
