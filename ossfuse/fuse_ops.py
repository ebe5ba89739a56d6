"""The FUSE adapter: pyfuse3 calls → :class:`ossfuse.fs.Filesystem`, errors → errnos.

Only translation lives here (names to str, nodes to EntryAttributes, FsError to FUSEError);
every decision is in ``ossfuse.fs``. An unexpected exception is logged with its traceback and turned
into EIO, so a bug fails one call, never the mount.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import select
import threading

import pyfuse3
import trio

from .fs import DirHandle, FileHandle, Filesystem, FsError, Node
from .fs.objmeta import rdev_of

log = logging.getLogger(__name__)

_BLOCK = 4096


def supplementary_groups(pid: int) -> frozenset[int]:
    """The supplementary group ids of task ``pid`` (a FUSE request's caller): the ``Groups:``
    line of /proc/PID/status (proc(5)); empty when the task is gone or the line unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def _fs_errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _answerless_after_session(fn):
    """For the calls that change nothing (lookups, attributes, reads, listings): once the
    kernel has ended the FUSE session (the mount is gone and no file is open there any more),
    nobody can receive their answer, so :meth:`Operations.session_ended` cancels them instead of
    letting pyfuse3 wait for a store that does not answer (an unmount waited for a killed
    reader's GET for its read_timeout, 60 s, saying nothing: a trial). Calls that change state
    (writes, renames, releases) are never cancelled: they finish, and the drain follows."""
    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args, **kwargs):
        with trio.CancelScope() as scope:
            if self._session_over:
                scope.cancel()
            self._answerless.add(scope)
            try:
                return await fn(self, *args, **kwargs)
            finally:
                self._answerless.discard(scope)
        raise FsError(errno.EIO)  # cancelled: the kernel is gone, this answer goes nowhere
    return wrapper


def _nlink(node: Node) -> int:
    """st_nlink: 0 once unlinked (an open file's fstat), 1 for a file (no hard links); for a
    directory 2 + its subdirectories when known, else 1 (what btrfs shows: "not counted", which
    turns off find's leaf optimisation, where 2 would make it skip subdirectories)."""
    if node.unlinked:
        return 0
    if not node.is_dir:
        return 1
    return 2 + node.subdirs if node.subdirs is not None else 1


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over one Filesystem."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem):
        super().__init__()
        self.fs = fs
        self.attr_timeout = fs.cfg.mount.attr_timeout
        self.entry_timeout = fs.cfg.mount.entry_timeout
        fs.on_entry_moved(self._invalidate_entry)
        self._answerless: set[trio.CancelScope] = set()  # running calls that change nothing
        self._session_over = False

    def session_ended(self) -> None:
        """The kernel ended the FUSE session: cancel the running calls that change nothing
        (:func:`_answerless_after_session`); ones that start later are cancelled at once."""
        self._session_over = True
        if self._answerless:
            log.info("the FUSE session ended: %d lookup(s) or read(s) still waiting for the store are "
                     "dropped (nobody can receive their answers)", len(self._answerless))
        for scope in self._answerless:
            scope.cancel()

    @staticmethod
    def _invalidate_entry(parent_ino: int, name: str) -> None:
        """Drop the kernel's cached entry ``name`` in directory ``parent_ino`` (queued to
        pyfuse3's notification thread: a request handler must not wait for the kernel; an
        entry the kernel does not hold is no error)."""
        pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.st_mode = node.mode
        a.st_nlink = _nlink(node)
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = rdev_of(node)  # the kernel opens device nodes with it (mount option "dev")
        a.st_size = node.current_size
        a.st_blksize = _BLOCK
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        a.st_atime_ns = node.mtime_ns if node.atime_ns is None else node.atime_ns
        if node.listed_only:  # guessed from a listing: the kernel asks again before using them
            a.attr_timeout = a.entry_timeout = 0
        else:
            a.attr_timeout = self.attr_timeout
            a.entry_timeout = self.entry_timeout
        return a

    def _file(self, fh: int) -> FileHandle:
        h = self.fs.handles.get(fh)
        if not isinstance(h, FileHandle):
            raise FsError(errno.EBADF)
        return h

    @_fs_errors
    @_answerless_after_session
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._attr(await self.fs.lookup(self.fs.get(parent_inode), _name(name)))
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            # a negative entry (inode 0): the kernel remembers the absence for entry_timeout
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.entry_timeout
            return a

    @_fs_errors
    @_answerless_after_session
    async def getattr(self, inode, ctx=None):
        return self._attr(await self.fs.getattr(self.fs.get(inode)))

    @_fs_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.fs.get(inode)
        await self.fs.setattr(
            node,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None)
        return self._attr(node)

    def forget(self, inode_list):
        for ino, n in inode_list:
            self.fs.forget(ino, n)

    @_fs_errors
    @_answerless_after_session
    async def readlink(self, inode, ctx):
        return os.fsencode(await self.fs.readlink(self.fs.get(inode)))

    @_fs_errors
    async def opendir(self, inode, ctx):
        return self.fs.opendir(self.fs.get(inode)).fh

    @_fs_errors
    @_answerless_after_session
    async def readdir(self, fh, start_id, token):
        h = self.fs.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise FsError(errno.EBADF)
        # Offsets: 1 after ".", 2 after "..", then 2 + the index of the filesystem's entries.
        # "." and ".." do not raise lookup counts (pyfuse3's readdir contract).
        if start_id == 0 and not pyfuse3.readdir_reply(token, b".", self._attr(h.node), 1):
            return
        if start_id <= 1:
            parent = self.fs.inodes.parent(h.node.path) or self.fs.get(pyfuse3.ROOT_INODE)
            if not pyfuse3.readdir_reply(token, b"..", self._attr(parent), 2):
                return
        start, relist = max(0, start_id - 2), start_id == 0
        while True:
            entries = await self.fs.readdir_entries(h, start, relist)
            relist = False
            if not entries:
                return
            for next_id, name, node in entries:
                node = self.fs.inodes.known(node)  # (the kernel may have forgotten it while the store answered)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node), next_id + 2):
                    return
                self.fs.remember(node)
                start = next_id

    @_fs_errors
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @_fs_errors
    async def fsyncdir(self, fh, datasync):
        h = self.fs.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise FsError(errno.EBADF)
        await self.fs.fsyncdir(h.node)

    @_fs_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        node = await self.fs.mkdir(self.fs.get(parent_inode), _name(name), mode & ~ctx.umask, ctx.uid, ctx.gid)
        return self._attr(node)

    @_fs_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(self.fs.get(parent_inode), _name(name))

    @_fs_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        node, h = await self.fs.create(self.fs.get(parent_inode), _name(name), mode & ~ctx.umask, flags,
                                       ctx.uid, ctx.gid, functools.partial(supplementary_groups, ctx.pid))
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=h.keep_cache), self._attr(node)

    @_fs_errors
    async def open(self, inode, flags, ctx):
        node = self.fs.get(inode)
        h = await self.fs.open(node, flags)
        stale = self.fs.kernel_size_stale(node) and not flags & os.O_TRUNC  # (truncating: the kernel knows)
        if stale and flags & os.O_APPEND and flags & os.O_ACCMODE != os.O_RDONLY:
            # The kernel puts each O_APPEND write at the size it holds, without asking for a
            # dropped one first (generic_write_checks): a trial's appends from two mounts in
            # turn landed inside the other mount's longer version, over its lines, and
            # success was answered. ESTALE from an open makes the VFS walk the path once more
            # with LOOKUP_REVAL (do_filp_open), whose LOOKUP gives the kernel this size.
            await self.fs.release(h)
            self.fs.kernel_size_dropped(node)
            raise FsError(errno.ESTALE)
        if stale:
            # An open found another version (another client's) of another size. The kernel
            # still holds the size of its last lookup, cuts reads at it and extends nothing
            # until attr_timeout: a cat got exactly the old length of the new version, with
            # success. Its attributes are dropped, so a read past that size (and an fstat)
            # asks for them first (FUSE_NOTIFY_INVAL_INODE, attributes only: no page lock, no
            # writeback). Also by an open that came while another open's drop was under way.
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
            except OSError as e:  # the kernel forgot the inode meanwhile, or cannot (ENOSYS)
                log.debug("invalidating the attributes of inode %d: %s", inode, e)
            self.fs.kernel_size_dropped(node)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=h.keep_cache, direct_io=h.direct_io)

    @_fs_errors
    @_answerless_after_session
    async def read(self, fh, off, size):
        return await self.fs.read(self._file(fh), off, size)

    @_fs_errors
    async def write(self, fh, off, buf):
        return await self.fs.write(self._file(fh), off, buf)

    @_fs_errors
    async def flush(self, fh):
        await self.fs.flush(self._file(fh))

    @_fs_errors
    async def release(self, fh):
        await self.fs.release(self._file(fh))

    @_fs_errors
    async def fsync(self, fh, datasync):
        await self.fs.fsync(self._file(fh))

    @_fs_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(self.fs.get(parent_inode), _name(name))

    @_fs_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~pyfuse3.RENAME_NOREPLACE:  # RENAME_EXCHANGE, RENAME_WHITEOUT (a trial: it was
            raise FsError(errno.EINVAL)         # ignored, no whiteout made, and success answered)
        await self.fs.rename(self.fs.get(parent_inode_old), _name(name_old), self.fs.get(parent_inode_new),
                             _name(name_new), 1 if flags & pyfuse3.RENAME_NOREPLACE else 0)

    @_fs_errors
    async def symlink(self, parent_inode, name, target, ctx):
        node = await self.fs.symlink(self.fs.get(parent_inode), _name(name), os.fsdecode(target), ctx.uid, ctx.gid)
        return self._attr(node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        # Objects cannot share content: no hard links. EPERM is what Linux's VFS answers for a
        # filesystem without link (link(2): "does not support the creation of hard links").
        raise pyfuse3.FUSEError(errno.EPERM)

    @_fs_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        # FIFOs, sockets (bind(2) of a unix socket) and device nodes; the kernel opens them itself
        node = await self.fs.mknod(self.fs.get(parent_inode), _name(name), mode & ~ctx.umask, rdev,
                                   ctx.uid, ctx.gid)
        return self._attr(node)

    @_fs_errors
    @_answerless_after_session
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = _BLOCK
        s.f_blocks = s.f_bfree = s.f_bavail = (1 << 50) // _BLOCK  # an OSS bucket has no fixed size
        capacity = self.fs.capacity()
        if capacity is not None:  # a local-directory bucket: what its disk holds and has free
            s.f_blocks, s.f_bfree, s.f_bavail = (n // _BLOCK for n in capacity)
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    @_fs_errors
    async def access(self, inode, mode, ctx):
        return True  # with default_permissions the kernel checks modes itself


def _fuse_device_fd() -> int | None:
    """This process's descriptor of /dev/fuse, the FUSE session's (pyfuse3 does not expose
    it; one session per daemon), or None when there is not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    return found[0] if len(found) == 1 else None


async def watch_session_end(ops: Operations) -> None:
    """Call ``ops.session_ended()`` once the kernel ends the FUSE session: when the last user
    of the mount is gone (an unmount, a lazy one's last close, an abort through
    /sys/fs/fuse/connections), the kernel aborts the connection and /dev/fuse polls POLLERR
    (fs/fuse/dev.c, fuse_dev_poll). A thread polls a duplicate of the descriptor for that
    alone (no POLLIN: requests are pyfuse3's), waking each second to see whether this task
    was cancelled; it closes the duplicate itself, so cancelling never waits for it."""
    fd = _fuse_device_fd()
    if fd is None:  # never expected; the unmount then waits for such calls, as before
        log.warning("cannot find this process's /dev/fuse descriptor: an unmount waits for reads "
                    "still waiting for the store")
        return
    dup = os.dup(fd)
    cancelled = threading.Event()

    def wait() -> bool:
        try:
            poller = select.poll()
            poller.register(dup, 0)  # POLLERR and POLLHUP are always reported
            while not cancelled.is_set():
                if poller.poll(1000):
                    return True
            return False
        finally:
            os.close(dup)
    try:
        ended = await trio.to_thread.run_sync(wait, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1))
    finally:
        cancelled.set()
    if ended:
        ops.session_ended()
