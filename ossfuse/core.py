"""The filesystem core: inodes and lookup counts, directory listings, open handles, attributes,
write-back. FUSE-agnostic: the adapter in ``fuse_ops`` turns calls into these methods and
:class:`FsError` into errnos.

Paths are relative to the mount ("" is the root, "a/b" a file); the object key of a path is
``prefix + path``, and a directory may have a marker object ``prefix + path + "/"``.

Concurrency (trio tasks, one thread):
- ``_ns_lock`` serialises namespace changes (create, mkdir, symlink, unlink, rmdir, rename);
- ``Node.lock`` serialises a file's content changes: write, truncate, attribute changes,
  its upload; lock order is ``_ns_lock`` then node locks by ascending inode;
- state that may change across an ``await``: ``Node.path`` (rename), ``Node.version`` and
  ``Node.staged`` (upload, write), the inode tables. Code re-reads them after awaiting.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import trio

from . import envelope as env
from .aio import run_all
from .cache import BlockCache, TruncatedObject
from .config import Config
from .keyring import CmkUnavailable, KeyMissing, Keyring
from .staging import StagedFile, Staging
from .store.base import NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError
from .upload import Uploader

log = logging.getLogger(__name__)

ROOT_INO = 1
_POPULATE_CHUNK = 1 << 20  # bytes re-encrypted at a time when a file is first modified
_READAHEAD_MAX = 16 << 20  # bytes: largest sequential read-ahead window
_HEAD_PARALLEL = 16  # HEADs at once when a listing needs attributes
_READDIR_BATCH = 256  # entries whose attributes are fetched per readdir step
_UPLOAD_AT_CLOSE_MAX = 1 << 20  # bytes: files up to this size skip the journal on cheap-PUT stores
_RELIST_MAX = 1000  # entries: a directory this small is listed again (one page) to answer lookups


class FsError(Exception):
    """A filesystem-level failure with the errno the caller should see."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err


def _fmt_mtime(ns: int) -> str:
    sec, nsec = divmod(ns, 1_000_000_000)
    return f"{sec}.{nsec:09d}" if nsec else str(sec)


def _parse_mtime(value: str | None) -> int | None:
    """x-oss-meta-mtime ``sec[.frac]`` (ossfs/s3fs) → nanoseconds; None if absent or bad."""
    if not value:
        return None
    sec, _, frac = value.strip().partition(".")
    try:
        return int(sec) * 1_000_000_000 + (int((frac + "000000000")[:9]) if frac else 0)
    except ValueError:
        return None


@dataclass(slots=True)
class Version:
    """A committed object version in the bucket (what a clean file reads from)."""

    key: str
    etag: str
    size: int
    metadata: dict[str, str]
    wrapped: env.WrappedEnvelope | env.EnvelopeError | None  # None: a plaintext object
    envelope: env.Envelope | None = None  # unwrapped on first open


@dataclass(eq=False, slots=True)
class Node:
    """An inode (slots and a lazy lock: a big directory holds many)."""

    ino: int
    path: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    lookups: int = 0
    opens: int = 0
    version: Version | None = None
    staged: StagedFile | None = None  # present ⇔ the file has changes not yet in the bucket
    unlinked: bool = False
    upload_queued: bool = False
    queued_at: float = 0.0  # trio clock when the upload was queued
    dirty_since: float = 0.0  # wall-clock seconds when the staged version was made
    upload_error: str | None = None
    checked_at: float = 0.0  # monotonic seconds when attributes were last read from the store
    symlink_target: str | None = None
    # a directory's child names as of a complete listing (or its mkdir), kept current by this
    # mount's own changes; trusted until children_until (monotonic s) to answer "no such name"
    children: set[str] | None = None
    children_until: float = 0.0
    kernel_etag: str | None = None  # version whose pages the kernel may cache (see _open_handle)
    handles: set = field(default_factory=set)
    _lock: trio.Lock | None = None

    @property
    def lock(self) -> trio.Lock:
        """Serialises this file's content changes (made on first use)."""
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def current_size(self) -> int:
        return self.staged.size if self.staged is not None else self.size


@dataclass(eq=False)
class FileHandle:
    """An open file: the version it reads (pinned by ETag) and its read-ahead state."""

    fh: int
    node: Node
    version: Version | None
    last_end: int = -1
    keep_cache: bool = True  # the kernel's cached pages of this file are of this version
    window: int = 0


@dataclass(eq=False)
class DirHandle:
    """An open directory: a snapshot of its entries, so readdir offsets stay stable."""

    fh: int
    node: Node
    entries: list[tuple[str, Node | None, ObjectInfo | None, bool]] | None = None  # name, node, info, is_dir


class Filesystem:
    """Everything the mount knows; see the module doc."""

    def __init__(self, cfg: Config, store: ObjectStore, keyring: Keyring, *, uid: int, gid: int):
        self.cfg = cfg
        self.store = store
        self.keyring = keyring
        self.prefix = cfg.store.prefix
        self.cache = BlockCache(cfg.cache.dir, store, cfg.cache.block_size, max_size=cfg.cache.max_size,
                                min_free=cfg.cache.min_free)
        self.staging = Staging(cfg.cache.dir)
        m = cfg.mount
        # A local bucket takes a closed small file at once (cheaper than journaling it); on OSS
        # a short wait folds the attribute changes and renames that follow a close into one PUT.
        self.upload_delay = m.upload_delay if m.upload_delay is not None else (0.0 if store.local_disk else 1.0)
        self.uploader = Uploader(store, multipart_threshold=m.multipart_threshold, part_size=m.part_size,
                                 part_workers=m.part_workers, retries=m.upload_retries)
        self.default_uid = m.uid if m.uid is not None else uid
        self.default_gid = m.gid if m.gid is not None else gid
        self.umask = m.umask if m.umask is not None else 0o022  # for objects without a mode
        self.create_umask = m.umask or 0  # a configured umask also masks new files and dirs
        now = time.time_ns()
        root = Node(ROOT_INO, "", stat.S_IFDIR | (0o777 & ~self.umask), self.default_uid,
                    self.default_gid, now, now, lookups=1)
        self.nodes: dict[int, Node] = {ROOT_INO: root}
        self.by_path: dict[str, Node] = {"": root}
        self.dirty: set[Node] = set()  # nodes with a staged version
        self._absent: dict[str, float] = {}  # negative lookup cache: path → monotonic expiry
        self.handles: dict[int, FileHandle | DirHandle] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self._ns_lock = trio.Lock()
        self._upload_send, self._upload_recv = trio.open_memory_channel[Node](float("inf"))
        self._nursery: trio.Nursery | None = None
        self.stats = {"uploaded": 0, "upload_failures": 0, "recovered": 0}

    # -- keys and attributes ----------------------------------------------------------------
    def key(self, path: str) -> str:
        return self.prefix + path

    def dir_key(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    @staticmethod
    def join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    @staticmethod
    def parent_of(path: str) -> str:
        return path.rpartition("/")[0]

    def _attr_meta(self, node: Node) -> dict[str, str]:
        return {"mode": str(node.mode), "uid": str(node.uid), "gid": str(node.gid),
                "mtime": _fmt_mtime(node.mtime_ns)}

    def _file_metadata(self, node: Node, wrapped: env.WrappedEnvelope, size: int) -> dict[str, str]:
        meta = wrapped.headers()
        meta[env.H_PLAIN_LEN] = str(size)
        meta.update(self._attr_meta(node))
        return meta

    def _new_node(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0) -> Node:
        node = Node(self._next_ino, path, mode, uid, gid, mtime_ns, mtime_ns, size=size,
                    checked_at=time.monotonic())
        self._next_ino += 1
        self.nodes[node.ino] = node
        self.by_path[path] = node  # a node it replaces lives on for its lookups and handles
        self._absent.pop(path, None)
        self._child_added(path)
        return node

    def _child_added(self, path: str) -> None:
        parent = self.by_path.get(self.parent_of(path))
        if parent is not None and parent.children is not None:
            parent.children.add(path.rpartition("/")[2])

    def _child_removed(self, path: str) -> None:
        parent = self.by_path.get(self.parent_of(path))
        if parent is not None and parent.children is not None:
            parent.children.discard(path.rpartition("/")[2])

    def _set_children(self, dirnode: Node, names) -> None:
        dirnode.children = set(names)
        dirnode.children_until = time.monotonic() + self.cfg.mount.entry_timeout

    async def _listed_absent(self, path: str) -> bool:
        """Whether the parent's listing says ``path`` does not exist: the listing is at most
        entry_timeout old, or is taken again now (one page) for a small directory. No request
        for a name created in a directory this mount made or listed a moment ago."""
        parent = self.by_path.get(self.parent_of(path))
        if parent is None or parent.children is None:
            return False
        if parent.children_until < time.monotonic():
            if len(parent.children) >= _RELIST_MAX:
                parent.children = None  # big: single probes cost less than listing it all
                return False
            dkey = self.dir_key(parent.path)
            try:
                page = await self.store.list(dkey, delimiter="/", max_keys=_RELIST_MAX)
            except StoreError:
                return False  # the probe will report it
            if page.next_marker is not None:
                parent.children = None
                return False
            names = [o.key[len(dkey):] for o in page.objects] + [p[len(dkey):-1] for p in page.prefixes]
            local = [d.path.rpartition("/")[2] for d in self.dirty
                     if not d.unlinked and self.parent_of(d.path) == parent.path]
            self._set_children(parent, [n for n in names if n] + local)
        return path.rpartition("/")[2] not in parent.children

    def _attrs_from_info(self, info: ObjectInfo | None, is_dir: bool) -> tuple[int, int, int, int]:
        """(st_mode, uid, gid, mtime_ns) of an object or dir marker (None: implicit dir) from
        its x-oss-meta-mode/uid/gid/mtime, with the mount's defaults where they are absent."""
        meta = info.metadata if info else {}
        mtime = _parse_mtime(meta.get("mtime"))
        if mtime is None:
            mtime = int((info.mtime if info else time.time()) * 1e9)
        mode = _int_or(meta.get("mode"), 0)
        if is_dir:
            if info is not None and info.size:
                log.warning("%r is a directory marker holding %d bytes; shown as a directory, its "
                            "data is not shown", info.key, info.size)
            mode = stat.S_IFDIR | (stat.S_IMODE(mode) if mode else 0o777 & ~self.umask)
        elif stat.S_ISLNK(mode):
            mode = stat.S_IFLNK | 0o777
        else:
            mode = stat.S_IFREG | (stat.S_IMODE(mode) if mode else 0o666 & ~self.umask)
        if not stat.S_ISLNK(mode):
            mode &= ~self.create_umask  # a configured umask masks every mode
        return mode, _int_or(meta.get("uid"), self.default_uid), _int_or(meta.get("gid"), self.default_gid), mtime

    def _node_from_info(self, path: str, info: ObjectInfo | None, is_dir: bool) -> Node:
        """A node for ``path`` from a HEAD of its object (or dir marker; None: implicit dir)."""
        mode, uid, gid, mtime = self._attrs_from_info(info, is_dir)
        node = self._new_node(path, mode, uid, gid, mtime, info.size if info and not is_dir else 0)
        if info is not None and not is_dir:
            self._set_version_from_info(node, info)
        return node

    def _set_version_from_info(self, node: Node, info: ObjectInfo) -> None:
        wrapped = None
        if env.is_encrypted(info.metadata):
            try:
                wrapped = env.parse_envelope(info.metadata)
            except env.EnvelopeError as e:
                wrapped = e  # reported when the file is opened
        node.version = Version(info.key, info.etag, info.size, info.metadata, wrapped)
        node.size = info.size
        node.checked_at = time.monotonic()

    # -- lookups ----------------------------------------------------------------------------
    async def _probe(self, path: str) -> tuple[ObjectInfo | None, bool] | None:
        """What is at ``path`` in the store: (object info, False) for a file, (marker info or
        None, True) for a directory, None for nothing. A file wins over a same-named dir."""
        info = await self.store.head(self.key(path))
        if info is not None:
            if self._hidden(info):
                return None
            return info, False
        dkey = self.dir_key(path)
        page = await self.store.list(dkey, delimiter="/", max_keys=1)
        if page.objects or page.prefixes:
            marker = await self.store.head(dkey) if page.objects and page.objects[0].key == dkey else None
            return marker, True
        return None

    def _hidden(self, info: ObjectInfo) -> bool:
        return (self.cfg.encryption.plaintext_objects == "hide" and info.metadata
                and not env.is_encrypted(info.metadata) and "mode" not in info.metadata)

    def _fresh(self, node: Node) -> bool:
        return (node.staged is not None or node.ino == ROOT_INO
                or time.monotonic() - node.checked_at < self.cfg.mount.attr_timeout)

    async def lookup(self, parent: Node, name: str) -> Node:
        """The child ``name`` of ``parent`` with its lookup count raised by one.
        Raises FsError(ENOENT), FsError(EIO) when the store fails."""
        path = self.join(parent.path, name)
        node = self.by_path.get(path)
        if node is None:
            self._check_new_path(path)  # a name that cannot be a key cannot exist: no request
        if node is None or not self._fresh(node):
            node = await self._resolve(path, node)
        if node is None:
            raise FsError(errno.ENOENT)
        node.lookups += 1
        return node

    def _known_absent(self, path: str) -> bool:
        expiry = self._absent.get(path)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._absent[path]
            return False
        return True

    async def _resolve(self, path: str, known: Node | None) -> Node | None:
        """What is at ``path`` now, from the store (or the negative cache, for
        ``entry_timeout`` seconds after the store said nothing is there)."""
        if known is None and (self._known_absent(path) or await self._listed_absent(path)):
            return self.by_path.get(path)  # None, unless a task created it meanwhile
        try:
            found = await self._probe(path)
        except StoreError as e:
            log.error("lookup of %r failed: %s", self.key(path), e)
            raise FsError(errno.EIO) from None
        current = self.by_path.get(path)
        if current is not None and current is not known:
            return current  # another task resolved (or created) it while we waited
        if found is None:
            if known is not None and self.by_path.get(path) is known and known.staged is None:
                del self.by_path[path]
            if len(self._absent) > 100_000:
                self._absent.clear()
            self._absent[path] = time.monotonic() + self.cfg.mount.entry_timeout
            return None
        info, is_dir = found
        if known is not None and stat.S_IFMT(known.mode) == stat.S_IFMT(self._attrs_from_info(info, is_dir)[0]):
            self._refresh(known, info)
            return known
        if known is not None and self.by_path.get(path) is known:
            del self.by_path[path]
        return self._node_from_info(path, info, is_dir)

    def _apply_attr_meta(self, node: Node, info: ObjectInfo) -> None:
        node.mode, node.uid, node.gid, node.mtime_ns = self._attrs_from_info(info, node.is_dir)

    def _refresh(self, node: Node, info: ObjectInfo | None) -> None:
        """Take what the store now says of a clean node: a new version if the ETag changed, and
        the attributes always (on OSS a metadata-only CopyObject keeps the ETag)."""
        if node.staged is None and info is not None:  # open handles keep their own version
            if not node.is_dir and (node.version is None or node.version.etag != info.etag):
                self._set_version_from_info(node, info)
                node.symlink_target = None
            self._apply_attr_meta(node, info)
        node.checked_at = time.monotonic()

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= n
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups <= 0 and node.opens <= 0 and node.staged is None and node.ino != ROOT_INO:
            del self.nodes[node.ino]
            if self.by_path.get(node.path) is node:
                del self.by_path[node.path]

    # -- directories ------------------------------------------------------------------------
    def opendir(self, node: Node) -> DirHandle:
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        h = DirHandle(self._alloc_fh(), node)
        self.handles[h.fh] = h
        return h

    async def _list_entries(self, node: Node) -> list[tuple[str, Node | None, ObjectInfo | None, bool]]:
        """Snapshot of a directory: (name, known node, listing info, is_dir), sorted by name."""
        dkey = self.dir_key(node.path)
        # Taken before listing: a file whose upload finishes while we list is in one or the other.
        local = [d for d in self.dirty if not d.unlinked and self.parent_of(d.path) == node.path]
        files: dict[str, ObjectInfo] = {}
        dirs: set[str] = set()
        marker = None
        while True:
            try:
                page = await self.store.list(dkey, delimiter="/", marker=marker)
            except StoreError as e:
                log.error("listing %r failed: %s", dkey, e)
                raise FsError(errno.EIO) from None
            for o in page.objects:
                name = o.key[len(dkey):]
                if name:  # "" is the directory's own marker
                    files[name] = o
            for p in page.prefixes:
                dirs.add(p[len(dkey):-1])
            if page.next_marker is None:
                break
            marker = page.next_marker
        entries: dict[str, tuple[str, Node | None, ObjectInfo | None, bool]] = {}
        for name in dirs:
            entries[name] = (name, None, None, True)
        for name, o in files.items():
            if name in dirs:
                log.warning("%r is both an object and a prefix; showing the object", dkey + name)
            entries[name] = (name, None, o, False)
        for d in local:  # files not uploaded yet
            if not d.unlinked and self.parent_of(d.path) == node.path:
                name = d.path.rpartition("/")[2]
                entries[name] = (name, d, None, d.is_dir)
        self._set_children(node, entries)
        result = []
        for name in sorted(entries):
            if not name or name in (".", "..") or "\0" in name or len(name.encode()) > 255:
                log.warning("skipping key %r: not a valid file name", dkey + name)
                continue
            result.append(entries[name])
        return result

    async def readdir_entries(self, h: DirHandle, start: int, relist: bool = False):
        """Entries of the snapshot (taken anew when ``relist``: a rewind) from index ``start``
        on, as (index+1, name, node) with the node resolved: attributes from the listing when
        the store's listing carries metadata, else from HEADs, at most _HEAD_PARALLEL at once.
        The caller raises the lookup count of each node it hands to the kernel."""
        if h.entries is None or relist:
            h.entries = await self._list_entries(h.node)
        batch = h.entries[start:start + _READDIR_BATCH]
        resolved: dict[int, Node] = {}

        async def resolve(i: int, name: str, is_dir: bool, listed: ObjectInfo | None) -> None:
            path = self.join(h.node.path, name)
            node = self.by_path.get(path)
            if node is not None and (self._fresh(node) or is_dir):
                resolved[i] = node
                return
            if listed is not None and self.store.listing_has_metadata:
                info = listed  # the listing said all a HEAD would
            else:
                try:
                    info = await self.store.head(self.dir_key(path) if is_dir else self.key(path))
                except StoreError as e:
                    log.error("HEAD %r failed while listing: %s", path, e)
                    return
            if not is_dir and info is None:
                return  # deleted since the listing
            node = self.by_path.get(path)
            if node is not None and (node.is_dir == is_dir):
                if not is_dir:
                    self._refresh(node, info)
                resolved[i] = node
            else:
                if info is not None and not is_dir and self._hidden(info):
                    return
                resolved[i] = self._node_from_info(path, info, is_dir)

        jobs = []
        for i, (name, known, listed, is_dir) in enumerate(batch):
            if known is not None:
                resolved[i] = known
            elif listed is not None and self.store.listing_has_metadata:
                await resolve(i, name, is_dir, listed)  # no request: no task needed
            else:
                jobs.append(functools.partial(resolve, i, name, is_dir, listed))
        await run_all(jobs, _HEAD_PARALLEL)
        return [(start + i + 1, name, resolved[i]) for i, (name, *_rest) in enumerate(batch) if i in resolved]

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def mkdir(self, parent: Node, name: str, mode: int, uid: int, gid: int) -> Node:
        async with self._ns_lock:
            await self._check_absent(parent, name, is_dir=True)
            path = self.join(parent.path, name)
            now = time.time_ns()
            node = self._new_node(path, stat.S_IFDIR | (mode & 0o7777 & ~self.create_umask), uid, gid, now)
            try:
                await self.store.put_bytes(self.dir_key(path), b"", self._attr_meta(node))
            except StoreError as e:
                self._discard_node(node)
                log.error("mkdir %r failed: %s", self.dir_key(path), e)
                raise FsError(errno.EIO) from None
            self._set_children(node, ())  # new and empty: lookups in it need no request
            node.lookups += 1
            self._touch(parent)
            return node

    async def _has_children(self, path: str) -> bool:
        """Whether directory ``path`` holds anything: staged files of this mount, or keys
        under its prefix other than its own marker."""
        # Checked before listing: a file whose upload finishes meanwhile is in one or the other.
        if any(self.parent_of(d.path) == path and not d.unlinked for d in self.dirty):
            return True
        dkey = self.dir_key(path)
        page = await self._store(self.store.list(dkey, delimiter=None, max_keys=2), dkey)
        return any(o.key != dkey for o in page.objects)

    async def rmdir(self, parent: Node, name: str) -> None:
        async with self._ns_lock:
            path = self.join(parent.path, name)
            node = await self._existing(parent, name)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if await self._has_children(path):
                raise FsError(errno.ENOTEMPTY)
            dkey = self.dir_key(path)
            await self._store(self.store.delete(dkey), dkey)
            node.unlinked = True
            self._unlink_path(node)
            self._touch(parent)

    # -- files: create, open, read, write ---------------------------------------------------
    async def create(self, parent: Node, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[Node, FileHandle]:
        async with self._ns_lock:
            await self._check_absent(parent, name)
            path = self.join(parent.path, name)
            envelope = await self._new_envelope(path)
            node = self._new_node(path, stat.S_IFREG | (mode & 0o7777 & ~self.create_umask), uid, gid, time.time_ns())
            node.staged = self.staging.new(envelope)
            self._mark_dirty(node)
            node.lookups += 1
            self._touch(parent)
            return node, self._open_handle(node, flags)

    async def open(self, node: Node, flags: int) -> FileHandle:
        """Open a file. Raises FsError: EACCES when no CMK matches the object, EIO for a corrupt
        envelope or a truncated object (one log line each), EISDIR for a directory."""
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not self._fresh(node):
            await self._revalidate(node)
        truncating = flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY
        if truncating:
            async with node.lock:
                await self._truncate_locked(node, 0)
        elif node.staged is None and node.version is not None:
            v = node.version
            if (flags & os.O_ACCMODE) != os.O_WRONLY:  # fetch the first block while the CMK unwraps
                self.cache.read_ahead(v.key, v.etag, v.size, 0, self.cache.block_size)
            await self._open_version(v)
        return self._open_handle(node, flags)

    def _open_handle(self, node: Node, flags: int) -> FileHandle:
        # The kernel keeps a file's pages across opens (pyfuse3's keep_cache): only while the
        # version is the one it cached them from.
        etag = node.version.etag if node.staged is None and node.version is not None else None
        h = FileHandle(self._alloc_fh(), node, node.version,
                       keep_cache=etag is not None and etag == node.kernel_etag)
        node.kernel_etag = etag
        self.handles[h.fh] = h
        node.opens += 1
        node.handles.add(h)
        return h

    async def _revalidate(self, node: Node) -> None:
        try:
            info = await self.store.head(self.key(node.path))
        except StoreError as e:
            log.error("HEAD %r failed: %s", self.key(node.path), e)
            raise FsError(errno.EIO) from None
        if info is None:
            raise FsError(errno.ENOENT)
        self._refresh(node, info)

    async def _open_version(self, v: Version) -> None:
        """Unwrap the data key of ``v`` (once) and check the object is whole."""
        if v.wrapped is None or v.envelope is not None:
            return
        try:
            if isinstance(v.wrapped, env.EnvelopeError):
                raise v.wrapped
            plain_len = v.metadata.get(env.H_PLAIN_LEN)
            if plain_len is not None and plain_len.isdigit() and int(plain_len) != v.size:
                raise TruncatedObject(f"object has {v.size} bytes, its envelope says {plain_len}")
            v.envelope = await trio.to_thread.run_sync(self.keyring.open_envelope, v.wrapped)
        except KeyMissing as e:
            log.error("cannot open %r: %s", v.key, e)
            raise FsError(errno.EACCES) from None
        except (env.EnvelopeError, TruncatedObject, CmkUnavailable) as e:
            log.error("cannot open %r: %s", v.key, e)
            raise FsError(errno.EIO) from None

    async def read(self, h: FileHandle, offset: int, length: int) -> bytes:
        """Plaintext bytes at ``offset``. FsError(ESTALE) if the object was replaced by another
        client since open, EIO if it is truncated or the store fails."""
        node = h.node
        if node.staged is not None:
            return node.staged.read(offset, length)
        v = h.version
        if v is None or offset >= v.size:
            return b""
        if h.last_end == offset:  # sequential: widen the read-ahead window
            h.window = min(_READAHEAD_MAX, max(2 * h.window, self.cache.block_size))
        else:
            h.window = 0
        h.last_end = offset + length
        return await self._read_version(v, offset, length, fetch_until=offset + length + h.window)

    async def _read_version(self, v: Version, offset: int, length: int, fetch_until: int = 0) -> bytes:
        await self._open_version(v)
        try:
            data = await self.cache.read(v.key, v.etag, v.size, offset, length, fetch_until=fetch_until)
        except PreconditionFailed:
            log.error("%r was replaced by another client while open (ETag %s); reopen to read "
                      "the new version", v.key, v.etag)
            raise FsError(errno.ESTALE) from None
        except NoSuchKey:
            log.error("%r was deleted by another client while open", v.key)
            raise FsError(errno.ESTALE) from None
        except TruncatedObject as e:
            log.error("cannot read %r: %s", v.key, e)
            raise FsError(errno.EIO) from None
        except StoreError as e:
            log.error("reading %r failed: %s", v.key, e)
            raise FsError(errno.EIO) from None
        return v.envelope.crypt(offset, data) if v.envelope is not None else data

    async def write(self, h: FileHandle, offset: int, data: bytes) -> int:
        node = h.node
        async with node.lock:
            # The kernel already puts O_APPEND writes at the end; it also writes mmap pages back
            # through any writable handle, at their own offsets: the offset is always its.
            await self._ensure_staged(node, node.current_size)
            try:
                try:
                    node.staged.write(offset, data)
                except OSError as e:
                    if e.errno != errno.ENOSPC or not self.cache.evict(need=len(data) + (1 << 20)):
                        raise
                    node.staged.write(offset, data)  # cached blocks made room
            except OSError as e:
                log.error("staging a write to %r failed: %s", self.key(node.path), e)
                raise FsError(e.errno or errno.EIO) from None
            node.mtime_ns = node.ctime_ns = time.time_ns()
        return len(data)

    async def _new_envelope(self, path: str) -> env.Envelope:
        """A fresh data key and IV for a new version of ``path`` (in a thread: a KMS CMK makes
        a network call). FsError(EIO) with a log line when the CMK's service is unreachable."""
        try:
            return await trio.to_thread.run_sync(self.keyring.new_envelope, path)
        except (CmkUnavailable, env.EnvelopeError) as e:
            log.error("cannot write %r: no data key: %s", self.key(path), e)
            raise FsError(errno.EIO) from None

    async def _ensure_staged(self, node: Node, keep: int) -> None:
        """Give ``node`` a staged version holding its first ``keep`` bytes (node.lock held):
        a fresh data key and IV, and the current content re-encrypted under them."""
        if node.staged is not None:
            return
        staged = self.staging.new(await self._new_envelope(node.path))
        try:
            v = node.version
            if v is not None:
                for off in range(0, min(keep, v.size), _POPULATE_CHUNK):
                    n = min(_POPULATE_CHUNK, keep - off, v.size - off)
                    staged.write(off, await self._read_version(v, off, n, fetch_until=off + 4 * _POPULATE_CHUNK))
        except BaseException:
            staged.discard()
            raise
        node.staged = staged
        self._mark_dirty(node)

    async def _truncate_locked(self, node: Node, size: int) -> None:
        await self._ensure_staged(node, size)
        try:
            node.staged.truncate(size)
        except OSError as e:
            log.error("truncating staged %r failed: %s", self.key(node.path), e)
            raise FsError(e.errno or errno.EIO) from None
        node.mtime_ns = node.ctime_ns = time.time_ns()

    async def flush(self, h: FileHandle) -> None:
        """Make what was written through ``h`` durable: journal it locally (a crash cannot lose
        it after this), or upload a small file at once where a PUT is as cheap (the journal is
        then the fallback when that upload fails); with ``close_waits_for_upload``, journal
        and upload. Raises FsError(ENOSPC/EIO) if the cache disk fails, FsError(EIO) if an
        upload close() must wait for fails."""
        node = h.node
        if self.cfg.mount.close_waits_for_upload:
            await self.upload_node(node, raise_errors=True)  # journals first, then uploads
            return
        if self._upload_at_close(node) and await self.upload_node(node, journal=False):
            return  # in the bucket already: nothing to journal
        async with node.lock:
            self._journal(node)

    def _upload_at_close(self, node: Node) -> bool:
        """Whether closing ``node`` should upload it at once instead of journaling it: a small
        file, closed by its last handle, on a store whose PUT is as cheap as a journal record
        (and no upload_delay to fold later changes into the upload)."""
        st = node.staged
        return (self.store.local_disk and st is not None and st.size <= _UPLOAD_AT_CLOSE_MAX
                and node.opens == 1 and not node.unlinked and self.upload_delay == 0)

    def _journal(self, node: Node) -> dict[str, str] | None:
        """Record ``node``'s staged version durably; returns the object metadata recorded
        (None when there is nothing staged). Raises FsError(ENOSPC/EIO)."""
        st = node.staged
        if st is None or node.unlinked:
            return None
        meta = self._file_metadata(node, st.envelope.wrapped, st.size)
        try:
            st.journal(self.key(node.path), meta)
            return meta
        except OSError as e:
            log.error("journaling %r failed, the data is not safe yet: %s", self.key(node.path), e)
            raise FsError(e.errno or errno.EIO) from None

    async def release(self, h: FileHandle) -> None:
        self.handles.pop(h.fh, None)
        node = h.node
        node.opens -= 1
        node.handles.discard(h)
        if node.staged is not None:
            if node.unlinked:
                if node.opens == 0:
                    self._drop_staged(node)
            else:
                self.schedule_upload(node)
        if node.unlinked and node.opens == 0 and node.version is not None:
            self.cache.drop(node.version.key, node.version.etag)
        self._maybe_drop(node)

    async def fsync(self, h: FileHandle) -> None:
        """Return only when the file's content and attributes are in the bucket.
        Raises FsError(EIO) when the upload failed (the data stays staged and journaled)."""
        await self.upload_node(h.node, raise_errors=True)

    # -- write-back -------------------------------------------------------------------------
    def schedule_upload(self, node: Node) -> None:
        if not node.upload_queued:
            node.upload_queued = True
            node.queued_at = trio.current_time()
            self._upload_send.send_nowait(node)

    async def upload_worker(self) -> None:
        """Background uploads of released files, in queue order (several workers run)."""
        async for node in self._upload_recv:
            await trio.sleep_until(node.queued_at + self.upload_delay)
            node.upload_queued = False
            ok = await self.upload_node(node)
            if not ok and node.staged is not None and not node.unlinked and self._nursery is not None:
                self._nursery.start_soon(self._retry_later, node)

    async def _retry_later(self, node: Node) -> None:
        await trio.sleep(self.cfg.mount.retry_interval)
        if node.staged is not None and not node.unlinked:
            self.schedule_upload(node)

    async def upload_node(self, node: Node, *, raise_errors: bool = False, journal: bool = True) -> bool:
        """Upload ``node``'s staged version if it has one; True when nothing is pending after.
        ``journal``: record it durably first, so a crash during the upload loses nothing (False
        only from close(), which then journals if the upload failed)."""
        async with node.lock:
            st = node.staged
            if st is None or node.unlinked:
                return True
            key = self.key(node.path)
            try:
                meta = self._journal(node) if journal else self._file_metadata(node, st.envelope.wrapped, st.size)
                # close() does not wait out retries: it journals instead, the worker retries
                info = await self.uploader.upload(st, key, meta, attempts=None if journal else 1)
            except (StoreError, FsError) as e:
                node.upload_error = str(e)
                self.stats["upload_failures"] += 1
                log.error("upload of %r failed; the data stays staged and will be retried: %s%s",
                          key, e, f" [request id {e.request_id}]" if getattr(e, "request_id", None) else "")
                if raise_errors:
                    raise FsError(errno.EIO) from None
                return False
            old = node.version
            version = Version(key, info.etag, st.size, meta, st.envelope.wrapped, st.envelope)
            self._set_local_version(node, version)
            st.close()
            self.cache.adopt(key, info.etag, st.size, st.data_path)
            st.discard()
            node.staged = None
            node.upload_error = None
            self.dirty.discard(node)
            if old is not None and not any(hd.version is old for hd in node.handles):
                self.cache.drop(old.key, old.etag)
            self.stats["uploaded"] += 1
            log.debug("uploaded %r (%d bytes, ETag %s)", key, st.size, info.etag)
        self._maybe_drop(node)
        return True

    def _mark_dirty(self, node: Node) -> None:
        if node not in self.dirty:
            node.dirty_since = time.time()
            self.dirty.add(node)

    def _set_local_version(self, node: Node, version: Version) -> None:
        """A version this mount made (upload, rename, attribute copy): open handles follow it,
        since its content is what they already saw."""
        node.version = version
        node.size = version.size
        node.checked_at = time.monotonic()
        node.kernel_etag = version.etag  # same bytes as the kernel saw through this mount
        for hd in node.handles:
            hd.version = version

    async def drain(self) -> int:
        """Upload everything still staged (unmount), ``upload_workers`` at once; returns how
        many files remain pending."""
        await run_all([functools.partial(self.upload_node, n) for n in list(self.dirty)
                       if n.staged is not None and not n.unlinked], self.cfg.mount.upload_workers)
        return sum(1 for n in self.dirty if n.staged is not None and not n.unlinked)

    def recover(self) -> int:
        """Adopt the journal of an earlier run: each journaled version becomes a dirty node and
        is queued for upload. Returns how many were found."""
        entries = self.staging.recover()
        for entry in entries:
            path = entry.key[len(self.prefix):] if entry.key.startswith(self.prefix) else None
            meta = entry.metadata
            if path is None:
                log.error("journal entry for %r is outside this mount's prefix %r; kept, not uploaded",
                          entry.key, self.prefix)
                entry.staged.close()
                continue
            old = self.by_path.get(path)
            if old is not None and old.staged is not None:
                self._drop_staged(old)  # a newer journal entry for the same key wins
            try:
                wrapped = env.parse_envelope(meta)
            except env.EnvelopeError as e:
                log.error("journal entry for %r has a corrupt envelope (%s); kept, not uploaded", entry.key, e)
                entry.staged.close()
                continue
            try:
                entry.staged.envelope = self.keyring.open_envelope(wrapped)
            except (env.EnvelopeError, KeyMissing, CmkUnavailable) as e:
                log.error("journaled %r cannot be decrypted here (%s); it is uploaded as it is", entry.key, e)
                entry.staged.envelope = _OpaqueEnvelope(wrapped)
            node = self._node_from_info(path, ObjectInfo(entry.key, entry.staged.size, "", time.time(), meta), False)
            node.version = None
            node.staged = entry.staged
            self._mark_dirty(node)
            self.schedule_upload(node)
            log.info("recovered %r (%d bytes) from the journal; uploading", entry.key, entry.staged.size)
        self.stats["recovered"] = len(entries)
        return len(entries)

    # -- attributes -------------------------------------------------------------------------
    async def setattr(self, node: Node, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, mtime_ns: int | None = None,
                      fh: FileHandle | None = None) -> Node:
        """chmod/chown/utimens/truncate. Attributes of a clean object are rewritten with a
        CopyObject onto itself (envelope headers unchanged); of a staged one, at its upload."""
        async with node.lock:
            if size is not None:
                if node.is_dir:
                    raise FsError(errno.EISDIR)
                await self._truncate_locked(node, size)
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            if uid is not None and uid != 0xFFFFFFFF:
                node.uid = uid
            if gid is not None and gid != 0xFFFFFFFF:
                node.gid = gid
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = time.time_ns()
            if size is None and (mode, uid, gid, mtime_ns) != (None, None, None, None):
                await self._store_attrs(node)
        return node

    async def _store_attrs(self, node: Node) -> None:
        if node.unlinked or node.ino == ROOT_INO:
            return
        if node.staged is not None:
            if node.staged.journaled_generation >= 0:
                self._journal(node)  # a crashed daemon's next mount uploads them too
            return
        if node.is_dir:
            await self._store(self.store.put_bytes(self.dir_key(node.path), b"", self._attr_meta(node)), node.path)
            return
        v = node.version
        if v is None:
            return
        meta = dict(v.metadata)
        meta.update(self._attr_meta(node))
        info = await self._copy_object(ObjectInfo(v.key, v.size, v.etag, 0, v.metadata), v.key, meta)
        self.cache.rekey(v.key, v.etag, v.key, info.etag)
        self._set_local_version(node, Version(v.key, info.etag, v.size, meta, v.wrapped, v.envelope))

    # -- namespace --------------------------------------------------------------------------
    def _check_new_path(self, path: str, is_dir: bool = False) -> None:
        """A new name must make a valid OSS key: UTF-8 (EINVAL) of at most 1023 bytes,
        counting the prefix and a directory's trailing '/', with names of at most 255 bytes
        (ENAMETOOLONG; the kernel does not check FUSE names itself)."""
        try:
            size = len((self.dir_key(path) if is_dir else self.key(path)).encode("utf-8"))
        except UnicodeEncodeError:
            raise FsError(errno.EINVAL, "names must be valid UTF-8 to be OSS keys") from None
        if size > 1023 or len(path.rpartition("/")[2].encode("utf-8")) > 255:
            raise FsError(errno.ENAMETOOLONG)

    async def _check_absent(self, parent: Node, name: str, is_dir: bool = False) -> None:
        path = self.join(parent.path, name)
        self._check_new_path(path, is_dir)
        node = self.by_path.get(path)
        if node is not None and not node.unlinked and (node.staged is not None or self._fresh(node)):
            raise FsError(errno.EEXIST)
        if await self._resolve(path, node) is not None:
            raise FsError(errno.EEXIST)

    async def _existing(self, parent: Node, name: str) -> Node:
        path = self.join(parent.path, name)
        node = self.by_path.get(path)
        if node is None or not self._fresh(node):
            node = await self._resolve(path, node)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    async def _copy_object(self, src: ObjectInfo, dst: str, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """Copy ``src`` to ``dst`` (CopyObject, or streaming above the store's copy limit).
        Raises FsError(EIO) with a log line on failure."""
        limit = self.store.max_copy_size
        if metadata is None and limit is not None and src.size > limit and not src.metadata:
            head = await self._store(self.store.head(src.key), src.key)  # listings carry no metadata
            if head is None:
                log.error("copy of %r failed: it disappeared", src.key)
                raise FsError(errno.EIO)
            src = head
        return await self._store(self.uploader.copy(src, dst, metadata), src.key)

    async def _store(self, awaitable, what: str):
        try:
            return await awaitable
        except StoreError as e:
            log.error("store request for %r failed: %s", what, e)
            raise FsError(errno.EIO) from None

    def _touch(self, dirnode: Node) -> None:
        dirnode.mtime_ns = dirnode.ctime_ns = time.time_ns()

    def _unlink_path(self, node: Node) -> None:
        self._child_removed(node.path)
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        self._absent[node.path] = time.monotonic() + self.cfg.mount.entry_timeout

    def _drop_staged(self, node: Node) -> None:
        if node.staged is not None:
            node.staged.discard()
            node.staged = None
        self.dirty.discard(node)

    def _discard_node(self, node: Node) -> None:
        self._unlink_path(node)
        self.nodes.pop(node.ino, None)

    async def _detach(self, node: Node) -> None:
        """``node``'s object is about to be deleted or replaced: keep it readable for its open
        handles (its ciphertext is fetched into the cache) and stop any pending upload."""
        node.unlinked = True
        if node.opens > 0 and node.staged is None and node.version is not None:
            v = node.version
            try:
                await self._open_version(v)
                await self.cache.fetch_all(v.key, v.etag, v.size)
            except (FsError, StoreError, TruncatedObject) as e:
                log.warning("%r is open but could not be kept readable after removal: %s", v.key, e)
        if node.staged is not None and node.opens == 0:
            self._drop_staged(node)
        self._unlink_path(node)

    async def unlink(self, parent: Node, name: str) -> None:
        async with self._ns_lock:
            node = await self._existing(parent, name)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            async with node.lock:
                committed = node.version is not None
                await self._detach(node)
                if committed:
                    await self._store(self.store.delete(self.key(node.path)), node.path)
            self._touch(parent)

    async def symlink(self, parent: Node, name: str, target: str, uid: int, gid: int) -> Node:
        async with self._ns_lock:
            await self._check_absent(parent, name)
            path = self.join(parent.path, name)
            envelope = await self._new_envelope(path)
            node = self._new_node(path, stat.S_IFLNK | 0o777, uid, gid, time.time_ns())
            data = target.encode("utf-8", "surrogateescape")
            meta = self._file_metadata(node, envelope.wrapped, len(data))
            try:
                info = await self.store.put_bytes(self.key(path), envelope.crypt(0, data), meta)
            except StoreError as e:
                self._discard_node(node)
                log.error("symlink %r failed: %s", self.key(path), e)
                raise FsError(errno.EIO) from None
            node.version = Version(info.key, info.etag, len(data), meta, envelope.wrapped, envelope)
            node.size = len(data)
            node.symlink_target = target
            node.lookups += 1
            self._touch(parent)
            return node

    async def readlink(self, node: Node) -> str:
        if not node.is_link:
            raise FsError(errno.EINVAL)
        if node.symlink_target is None:
            v = node.version
            if v is None:
                raise FsError(errno.EIO)
            await self._open_version(v)
            data = await self._read_version(v, 0, v.size)
            node.symlink_target = data.decode("utf-8", "surrogateescape")
        return node.symlink_target

    async def rename(self, parent: Node, name: str, new_parent: Node, new_name: str, flags: int) -> None:
        """rename(2) with RENAME_NOREPLACE (flag 1); RENAME_EXCHANGE gives EINVAL. Files move
        with CopyObject + DeleteObject (envelope headers travel unchanged); a directory moves
        object by object (not atomic: docs/semantics.md)."""
        if flags & ~1:
            raise FsError(errno.EINVAL)
        async with self._ns_lock:
            src = await self._existing(parent, name)
            dst_path = self.join(new_parent.path, new_name)
            self._check_new_path(dst_path, src.is_dir)
            if dst_path == src.path:
                return
            if src.is_dir and (dst_path + "/").startswith(src.path + "/"):
                raise FsError(errno.EINVAL)
            try:
                dst = await self._existing(new_parent, new_name)
            except FsError:
                dst = None
            if dst is not None:
                if flags & 1:
                    raise FsError(errno.EEXIST)
                if src.is_dir and not dst.is_dir:
                    raise FsError(errno.ENOTDIR)
                if dst.is_dir and not src.is_dir:
                    raise FsError(errno.EISDIR)
                if dst.is_dir and await self._has_children(dst_path):
                    raise FsError(errno.ENOTEMPTY)
            if src.is_dir:
                await self._rename_dir(src, dst_path, dst)
            else:
                await self._rename_file(src, dst_path, dst)
            self._touch(parent)
            self._touch(new_parent)

    async def _rename_file(self, src: Node, dst_path: str, dst: Node | None) -> None:
        nodes = sorted([n for n in (src, dst) if n is not None], key=lambda n: n.ino)
        async with _locks(nodes):
            if dst is not None:
                await self._detach(dst)
            old_path = src.path
            if src.version is not None:
                v = src.version
                new_key = self.key(dst_path)
                info = await self._copy_object(ObjectInfo(v.key, v.size, v.etag, 0, v.metadata), new_key)
                await self._store(self.store.delete(v.key), v.key)
                self.cache.rekey(v.key, v.etag, new_key, info.etag)
                self._set_local_version(src, Version(new_key, info.etag, v.size, v.metadata, v.wrapped, v.envelope))
            self._move_node(src, old_path, dst_path)
            if src.staged is not None and src.staged.journaled_generation >= 0:
                self._journal(src)

    async def _rename_dir(self, src: Node, dst_path: str, dst: Node | None) -> None:
        old_path = src.path
        affected = sorted([n for n in self.nodes.values()
                           if n.path == old_path or n.path.startswith(old_path + "/")], key=lambda n: n.ino)
        async with _locks(affected):
            if dst is not None:
                await self._store(self.store.delete(self.dir_key(dst_path)), dst_path)
                dst.unlinked = True
                self._unlink_path(dst)
            old_dkey, new_dkey = self.dir_key(old_path), self.dir_key(dst_path)
            keys: dict[str, ObjectInfo] = {}
            marker = None
            while True:
                page = await self._store(self.store.list(old_dkey, delimiter=None, marker=marker), old_dkey)
                keys.update((o.key, o) for o in page.objects)
                if page.next_marker is None:
                    break
                marker = page.next_marker
            if old_dkey not in keys:  # an implicit directory gets a marker, so it moves too
                keys[old_dkey] = await self._store(self.store.put_bytes(old_dkey, b"", self._attr_meta(src)),
                                                   old_dkey)
            copies: dict[str, ObjectInfo] = {}
            for k, o in keys.items():  # copy all first, then delete: an interruption leaves both, never neither
                copies[k] = await self._copy_object(o, new_dkey + k[len(old_dkey):])
            for k in keys:
                await self._store(self.store.delete(k), k)
            for n in affected:
                new = dst_path + n.path[len(old_path):]
                v = n.version
                if v is not None and v.key in copies:
                    info = copies[v.key]
                    self.cache.rekey(v.key, v.etag, info.key, info.etag)
                    self._set_local_version(n, Version(info.key, info.etag, v.size, v.metadata, v.wrapped, v.envelope))
                self._move_node(n, n.path, new)
                if n.staged is not None and n.staged.journaled_generation >= 0:
                    self._journal(n)
            for n in affected:  # their names moved one by one: list them anew when asked
                n.children = None

    def _move_node(self, node: Node, old: str, new: str) -> None:
        if self.by_path.get(old) is node:
            del self.by_path[old]
            self._absent[old] = time.monotonic() + self.cfg.mount.entry_timeout
            self._child_removed(old)
        self._absent.pop(new, None)
        node.path = new
        node.ctime_ns = time.time_ns()
        self.by_path[new] = node
        self._child_added(new)

    # -- misc -------------------------------------------------------------------------------
    def _alloc_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def close(self) -> None:
        for node in self.dirty:
            if node.staged is not None:
                node.staged.close()
        self.cache.close()


class _OpaqueEnvelope:
    """Stand-in for a journaled envelope this mount cannot unwrap: uploads work (they need only
    the wrapped headers), reads and writes fail with EIO."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def crypt(self, offset, data):
        raise FsError(errno.EIO, "the data key of this staged file cannot be unwrapped here")


class _locks:
    """Async context manager holding several node locks (caller sorts them by inode)."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes

    async def __aenter__(self):
        for n in self.nodes:
            await n.lock.acquire()

    async def __aexit__(self, *exc):
        for n in reversed(self.nodes):
            n.lock.release()


def _int_or(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default
