"""The filesystem: what the mount knows and does, FUSE-agnostic. The adapter in ``fuse_ops``
turns kernel requests into these methods and :class:`FsError` into errnos.

:class:`Filesystem` only wires the parts, one job each (docs/design.md has the map and the
invariants): ``naming`` (paths ↔ keys), ``inodes`` (inode table, lookup counts, handles),
``names`` (negative cache, directory child sets), ``resolver`` (lookups against the store),
``directories`` (readdir), ``namespace`` (mkdir … rename), ``files`` (open … fsync),
``attributes`` (setattr), ``commit`` (journal and upload of one file) over the write-back
``scheduler`` (when uploads happen), the block ``cache`` and the ``staging`` area.
"""
from __future__ import annotations

import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Collection

from ..attrcache import AttrCache
from ..cache import BlockCache
from ..config import Config
from ..keyring import Keyring
from ..store.base import ObjectInfo, ObjectStore
from ..writeback.ledger import MultipartLedger
from ..writeback.scheduler import UploadScheduler
from ..writeback.staging import Staging
from ..writeback.upload import Uploader
from .attrs import Attributes
from .commit import Commit
from .errors import FsError
from .files import Files
from .inodes import InodeTable
from .model import ROOT_INO, DirHandle, FileHandle, Node, Version
from .namecache import NameCache
from .namespace import Namespace
from .naming import Naming, join, parent_of
from .objmeta import AttrDefaults
from . import latecopies, renames
from .readdir import DirectoryReader
from .resolve import HiddenObjectThere, Resolver
from .unlinked import DeferredDeletes

__all__ = ["Filesystem", "FsError", "Node", "Version", "FileHandle", "DirHandle", "ROOT_INO"]


class Filesystem:
    """One mount's filesystem over ``store``, encrypting with ``keyring``; ``uid``/``gid``
    own objects that carry no owner (unless the config names them)."""

    join = staticmethod(join)
    parent_of = staticmethod(parent_of)

    def __init__(self, cfg: Config, store: ObjectStore, keyring: Keyring, *, uid: int, gid: int):
        self.cfg = cfg
        self.started = time.time()  # wall-clock seconds
        self.store = store
        self.keyring = keyring
        m = cfg.mount
        self.naming = Naming(cfg.store.prefix)
        self.rename_logs = renames.RenameLogs(cfg.cache.dir)
        self.cache = BlockCache(cfg.cache.dir, store, cfg.cache.block_size, max_size=cfg.cache.max_size,
                                min_free=cfg.cache.min_free,
                                keep=latecopies.versions_to_keep(self.rename_logs, self.naming))
        self.staging = Staging(cfg.cache.dir, cfg.store.identity)
        self.uploader = Uploader(store, multipart_threshold=m.multipart_threshold, part_size=m.part_size,
                                 part_workers=m.part_workers, ledger=MultipartLedger(cfg.cache.dir))
        # A local bucket takes a closed small file at once (cheaper than journaling it); on OSS
        # a short wait folds the attribute changes and renames that follow a close into one PUT.
        upload_delay = m.upload_delay if m.upload_delay is not None else (0.0 if store.local_disk else 1.0)
        self.scheduler = UploadScheduler(self._upload_queued, delay=upload_delay,
                                         retry_interval=m.retry_interval, workers=m.upload_workers,
                                         room_wait=cfg.store.offline_timeout)
        umask = m.umask if m.umask is not None else 0o022  # for objects without a mode
        self.defaults = AttrDefaults(uid=m.uid if m.uid is not None else uid,
                                     gid=m.gid if m.gid is not None else gid,
                                     umask=umask, create_umask=m.umask or 0)
        now = time.time_ns()
        root = Node(ROOT_INO, "", stat.S_IFDIR | (0o777 & ~umask), self.defaults.uid, self.defaults.gid,
                    now, now, lookups=1)
        self.names = NameCache(store, self.naming, m.entry_timeout,
                               lambda dir_path: self.scheduler.staged_in(dir_path, parent_of))
        self.inodes = InodeTable(root, self.names, on_move=self.scheduler.moved)
        self.deferred_deletes = DeferredDeletes(cfg.cache.dir, store)
        self.store_durable = True  # False once the unmount's durability barrier (drain) failed
        self.resolver = Resolver(store, self.naming, self.inodes, self.names, self.defaults,
                                 attr_timeout=m.attr_timeout,
                                 plaintext_objects=cfg.encryption.plaintext_objects,
                                 pending_delete=self.deferred_deletes.hides,
                                 removed_dir=self.deferred_deletes.hides_dir)
        self.commit = Commit(self.naming, self.inodes, self.resolver, self.scheduler, self.uploader,
                             self.cache, keyring, self.staging)
        self.commit.conflicts.deferred = self.deferred_deletes
        self.commit.conflicts.late_copy = functools.partial(latecopies.take_back_at, self.rename_logs, store,
                                                            self.naming)
        store.on_write_after_doubt(functools.partial(latecopies.written_now, self.rename_logs))
        self.files = Files(self.naming, self.inodes, self.resolver, self.commit, self.scheduler, self.cache,
                           keyring, self.staging, close_waits_for_upload=m.close_waits_for_upload,
                           upload_at_close=store.local_disk and upload_delay == 0)
        self.attributes = Attributes(store, self.uploader, self.naming, self.files, self.commit, self.cache)
        self.namespace = Namespace(store, self.uploader, self.naming, self.inodes, self.names, self.resolver,
                                   self.files, self.commit, self.cache, create_umask=self.defaults.create_umask,
                                   deferred=self.deferred_deletes, renames=self.rename_logs,
                                   retry_interval=m.retry_interval)
        self.files.on_last_close = self.namespace.last_close  # deletes an unlinked file's object
        self.directories = DirectoryReader(store, self.naming, self.inodes, self.names, self.resolver,
                                           self.commit.staged_in)
        self.resolver.stat_ahead = self.directories.stat_ahead
        self.resolver.dirs_with_staged = self.scheduler.dirs_holding_staged_below
        if not store.listing_has_metadata:  # (a listing with metadata says all a HEAD would)
            self.resolver.attr_cache = AttrCache(os.path.join(cfg.cache.dir, "attrs.sqlite"))

    def track_store_health(self, health) -> None:
        """Attach ``health`` (``store.health.StoreHealth``) to the store: from now on an
        unreachable store makes calls fail fast with StoreOffline, which the file system answers
        from its caches (docs/design.md "Offline"), and pending uploads start again as soon as
        the store answers."""
        self.store.health = health
        health.on_online.append(self.scheduler.resume)
        health.on_online.append(self._retry_failed_aborts)

    def _retry_failed_aborts(self) -> None:
        """The store answers again: abort the multipart uploads whose abort failed while it
        was away (in the background, through the daemon's task supervisor)."""
        if self.uploader.failed_aborts and self.scheduler.nursery is not None:
            self.scheduler.nursery.start_soon(self.uploader.retry_aborts)

    def on_entry_moved(self, fn) -> None:
        """Call ``fn(parent_ino, name)`` (sync, must not block) when the kernel's cached entry
        ``name`` in directory ``parent_ino`` stops naming the node it did behind the kernel's
        back: an upload that became a conflict copy moves its node to the copy's name."""
        self.commit.entry_moved = fn

    async def _upload_queued(self, node: Node, closed_only: bool) -> bool:
        return await self.commit.upload_node(node, closed_only=closed_only)

    # -- what the daemon and ``ossfuse status`` read ----------------------------------------
    @property
    def dirty(self) -> set[Node]:
        """Nodes with a staged version (uploaded or not yet)."""
        return self.scheduler.dirty

    @property
    def stats(self) -> dict[str, int]:
        """Counters: uploaded, upload_failures, recovered, quarantined (damaged journal
        entries moved to staging/quarantine), aborted_uploads (orphaned multipart uploads)."""
        return self.scheduler.stats

    @property
    def _nursery(self):
        return self.scheduler.nursery

    @_nursery.setter
    def _nursery(self, nursery) -> None:
        """Where upload and delete retries run: the daemon's task ``Supervisor`` (anything with ``start_soon``)."""
        self.scheduler.nursery = nursery
        self.namespace.nursery = nursery
        if self.deferred_deletes.ready:  # failed before there was a nursery (the replay at mount)
            self.namespace.retry_failed_deletes_later()

    def capacity(self) -> tuple[int, int, int] | None:
        """(size, free, available) bytes of the bucket for ``df`` (``ObjectStore.capacity``), or
        None (no fixed size: OSS)."""
        return self.store.capacity()

    @property
    def handles(self) -> dict[int, FileHandle | DirHandle]:
        return self.inodes.handles

    @property
    def by_path(self) -> dict[str, Node]:
        return self.inodes.by_path

    def key(self, path: str) -> str:
        return self.naming.key(path)

    def dir_key(self, path: str) -> str:
        return self.naming.dir_key(path)

    # -- lifecycle --------------------------------------------------------------------------
    def recover(self) -> int:
        """Adopt the journal of an earlier run (before serving); returns how many files. Also
        warns once when the cache disk is small for ``cache.min_free``."""
        self.staging.check_space(self.cfg.cache.min_free, droppable=self.cache.used)
        return self.commit.recover()

    async def settle_renames(self) -> list[str]:
        """Undo or finish the renames a crash of an earlier run cut off (call it after
        :meth:`recover`, before serving: fs/renames.py); returns a notice per rename."""
        return await renames.settle(self.rename_logs, self.store, self.naming, self.namespace)

    async def watch_late_copies(self) -> None:
        """Run forever (a daemon task, for a store whose requests may land late: not a local
        bucket): take back the copies undone renames sent that land late (fs/latecopies.py)."""
        await self.namespace.watch_late_copies()

    async def abort_orphaned_uploads(self) -> int:
        """Abort the unfinished multipart uploads an earlier run of this cache dir began (left
        by a crash: call it after :meth:`recover`; see ``Commit.abort_orphaned_uploads``);
        returns how many."""
        journaled = {self.naming.key(n.path) for n in self.dirty if n.staged is not None and not n.unlinked}
        return await self.commit.abort_orphaned_uploads(self.started, journaled)

    async def finish_unlinks(self) -> int:
        """Delete the objects of files an earlier run unlinked while they were open (before
        serving); returns how many are still pending because the store failed (they stay
        hidden and are tried again)."""
        return await self.namespace.finish_deletes()

    async def put_back(self, key: str, etag: str, now_there: ObjectInfo | None) -> str | None:
        """Put this mount's version (key, etag) back over a request that landed late; None
        once done, else why not (``Commit.put_back``; for ``InDoubt.check_due``)."""
        return await self.commit.put_back(key, etag, now_there)

    async def upload_worker(self) -> None:
        """One background upload worker (the daemon starts ``upload_workers`` of them)."""
        await self.scheduler.worker()

    async def drain(self) -> int:
        """Upload everything still staged and retry failed deletes of unlinked files (unmount);
        returns how many files remain pending upload (the deletes left: :meth:`pending_deletes`;
        ``store_durable`` False: the store's durability barrier failed, logged)."""
        left = await self.scheduler.drain()
        await self.namespace.finish_deletes()
        await self.uploader.retry_aborts()  # (what still fails stays in the ledger: the next mount)
        # unmount: what is in the bucket survives a power loss
        self.store_durable = await self.commit.sync_store()
        return left

    def pending_deletes(self) -> list[str]:
        """After :meth:`drain` at unmount: the object keys (sorted) whose delete is still
        pending, failed or never sent; other clients see those objects until the next mount
        deletes them (``finish_unlinks``)."""
        return sorted(self.deferred_deletes.pending)

    def pending_report(self) -> tuple[list[tuple[str, str | None]], list[str]]:
        """After :meth:`drain` at unmount: the pending files that have a journaled version (path,
        last upload failure), and the paths of those whose newest changes were never journaled (lost at exit; one ERROR
        line each). See ``Commit.pending_report``."""
        return self.commit.pending_report()

    def close(self) -> None:
        for node in self.dirty:
            if node.staged is not None:
                node.staged.close()
        self.cache.close()
        self.rename_logs.close()
        if self.resolver.attr_cache is not None:
            self.resolver.attr_cache.close()

    # -- FUSE operations (each documented where it lives) -----------------------------------
    def get(self, ino: int) -> Node:
        return self.inodes.get(ino)

    def forget(self, ino: int, n: int) -> None:
        self.inodes.forget(ino, n)

    def remember(self, node: Node) -> Node:
        return self.inodes.remember(node)

    async def lookup(self, parent: Node, name: str) -> Node:
        if self.rename_logs.watched:  # (rarely: an undone rename's copies may still land there)
            await self.namespace.look_near(join(parent.path, name))
        return await self.resolver.lookup(parent, name)

    async def getattr(self, node: Node) -> Node:
        """``node``, its attributes read from the store first (a HEAD) when they were only
        guessed from a listing (``Node.listed_only``). FsError(ENOENT) if its object is gone or
        of another type now, EIO when the store fails."""
        if node.listed_only and await self.resolver.reread(node) is not node:
            # gone, or of another type than guessed (a symlink): this inode is stale, and the
            # lookup that follows hands the kernel the right one
            raise FsError(errno.ENOENT)
        return node

    async def setattr(self, node: Node, **changes) -> Node:
        await self.getattr(node)  # a change applies to the stored attributes, never to guessed ones
        return await self.attributes.setattr(node, **changes)

    async def readlink(self, node: Node) -> str:
        return await self.files.readlink(node)

    def opendir(self, node: Node) -> DirHandle:
        return self.directories.opendir(node)

    async def readdir_entries(self, h: DirHandle, start: int, relist: bool = False):
        if self.rename_logs.watched and (start == 0 or relist):
            await self.namespace.look_near(h.node.path)
        return await self.directories.readdir_entries(h, start, relist)

    def releasedir(self, fh: int) -> None:
        self.directories.releasedir(fh)

    async def mkdir(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        return await self.namespace.mkdir(parent, name, mode, uid, gid)

    async def rmdir(self, parent: Node, name: str) -> None:
        await self.namespace.rmdir(parent, name)

    async def create(self, parent: Node, name: str, mode: int, flags: int, uid: int,
                     gid: int, groups: Callable[[], Collection[int]] = tuple) -> tuple[Node, FileHandle]:
        """A new file and a handle on it (lookup count one). Without O_EXCL, a regular file
        another client made at the name since the kernel took it for free is opened instead,
        as open(2) opens an existing file (a two-mount trial: `echo >> f` failed EEXIST, which
        POSIX never gives without O_EXCL); the kernel checked the directory's permission, not
        the file's, so the file's mode is checked here (its owner and group as the caller's
        uid and gid, or one of ``groups()``, the caller's supplementary groups, asked only
        then; root passes). Raises FsError EEXIST (O_EXCL, or not a regular file),
        EACCES (also where the bucket holds a plaintext object ``plaintext_objects = "hide"``
        hides: EEXIST with O_EXCL), EISDIR, and what create and open raise."""
        try:
            return await self.namespace.create(parent, name, mode, flags, uid, gid)
        except HiddenObjectThere:
            # nothing this mount shows may be opened there: EEXIST only for O_EXCL
            raise FsError(errno.EEXIST if flags & os.O_EXCL else errno.EACCES) from None
        except FsError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
        node = await self.lookup(parent, name)
        try:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EEXIST)
            _check_access(node, flags, uid, gid, groups)
            return node, await self.open(node, flags & ~os.O_CREAT)
        except BaseException:
            self.forget(node.ino, 1)  # the lookup's count: the kernel gets no entry
            raise

    async def symlink(self, parent: Node, name: str, target: str, uid: int, gid: int) -> Node:
        return await self.namespace.symlink(parent, name, target, uid, gid)

    async def mknod(self, parent: Node, name: str, mode: int, rdev: int, uid: int, gid: int) -> Node:
        return await self.namespace.mknod(parent, name, mode, rdev, uid, gid)

    async def unlink(self, parent: Node, name: str) -> None:
        await self.namespace.unlink(parent, name)

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        await self.namespace.rename(parent, name, new_parent, new_name, flags)

    async def open(self, node: Node, flags: int) -> FileHandle:
        return await self.files.open(node, flags)

    def kernel_size_stale(self, node: Node) -> bool:
        """Whether an open found ``node`` at another size than the kernel may hold, and the
        kernel's cached attributes were not dropped since (:meth:`kernel_size_dropped`)."""
        return node.ino in self.files.sizes_moved

    def kernel_size_dropped(self, node: Node) -> None:
        """The FUSE adapter made the kernel drop ``node``'s cached attributes."""
        self.files.sizes_moved.discard(node.ino)

    async def read(self, h: FileHandle, offset: int, length: int) -> bytes:
        return await self.files.read(h, offset, length)

    async def write(self, h: FileHandle, offset: int, data: bytes) -> int:
        return await self.files.write(h, offset, data)

    async def flush(self, h: FileHandle) -> None:
        await self.files.flush(h)

    async def release(self, h: FileHandle) -> None:
        await self.files.release(h)

    async def fsync(self, h: FileHandle) -> None:
        await self.files.fsync(h)

    async def fsyncdir(self, node: Node) -> None:
        """fsync(2) of directory ``node``: returns once every unlink below it is in the bucket
        (its queued DELETE answered) and the store's barrier returned. FsError(EIO) when a
        DELETE below it failed (it stays pending, hidden, and is retried)."""
        await self.namespace.settle_deletes(self.naming.dir_key(node.path))
        self.namespace.check_deleted(self.naming.dir_key(node.path))
        await self.commit.sync_store(raise_errors=True)


def _check_access(node: Node, flags: int, uid: int, gid: int,
                  groups: Callable[[], Collection[int]] = tuple) -> None:
    """FsError(EACCES) unless ``node``'s mode lets ``uid``/``gid`` (or supplementary groups
    ``groups()``) open it with ``flags``' access mode: owner, else group, else other bits, as
    the kernel's generic_permission; uid 0 passes."""
    if uid == 0:
        return
    shift = 6 if node.uid == uid else 3 if node.gid == gid or node.gid in groups() else 0
    bits = (node.mode >> shift) & 0o7
    access = flags & os.O_ACCMODE
    need = (4 if access != os.O_WRONLY else 0) | (2 if access != os.O_RDONLY or flags & os.O_TRUNC else 0)
    if bits & need != need:
        raise FsError(errno.EACCES)
