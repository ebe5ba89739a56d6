"""Finding out what is at a path: asking the store (probe), turning the answer into a node,
and deciding when a node's attributes are fresh enough to answer without asking."""
from __future__ import annotations

import errno
import logging
import stat
import time

from ..integrity import LIST_DIR
from ..store.base import ObjectInfo, ObjectStore, StoreError
from .errors import FsError, errno_of
from .inodes import InodeTable
from .model import ROOT_INO, Node
from .namecache import NameCache
from .naming import Naming, base_name, join
from .objmeta import AttrDefaults, is_hidden, times_from_info, version_from_info

log = logging.getLogger(__name__)


class Resolver:
    """Lookups of one mount. ``attr_timeout``: seconds a node's attributes read from the store
    are trusted; ``plaintext_objects``: the ``encryption.plaintext_objects`` setting."""

    def __init__(self, store: ObjectStore, naming: Naming, inodes: InodeTable, names: NameCache,
                 defaults: AttrDefaults, *, attr_timeout: float, plaintext_objects: str):
        self.store = store
        self.naming = naming
        self.inodes = inodes
        self.names = names
        self.defaults = defaults
        self.attr_timeout = attr_timeout
        self.plaintext_objects = plaintext_objects

    def hidden(self, info: ObjectInfo) -> bool:
        return is_hidden(info, self.plaintext_objects)

    def attrs_fresh(self, node: Node) -> bool:
        """Whether ``node``'s attributes may be used without asking the store: read less than
        attr_timeout ago, or this mount's own (staged data, the root)."""
        return (node.staged is not None or node.ino == ROOT_INO
                or time.monotonic() - node.checked_at < self.attr_timeout)

    async def probe(self, path: str) -> tuple[ObjectInfo | None, bool] | None:
        """What is at ``path`` in the store: (object info, False) for a file, (marker info or
        None, True) for a directory, None for nothing. A file wins over a same-named dir.
        Raises StoreError."""
        info = await self.store.head(self.naming.key(path))
        if info is not None:
            if self.hidden(info):
                return None
            return info, False
        if base_name(path) == LIST_DIR:
            return None  # integrity tag lists (docs/integrity.md): not a directory of the mount
        dkey = self.naming.dir_key(path)
        page = await self.store.list(dkey, delimiter="/", max_keys=1)
        if page.objects or page.prefixes:
            marker = await self.store.head(dkey) if page.objects and page.objects[0].key == dkey else None
            return marker, True
        return None

    async def lookup(self, parent: Node, name: str) -> Node:
        """The child ``name`` of ``parent`` with its lookup count raised by one.
        Raises FsError(ENOENT), FsError(EIO) when the store fails."""
        path = join(parent.path, name)
        node = self.inodes.by_path.get(path)
        if node is None:
            self.naming.check_new_path(path)  # a name that cannot be a key cannot exist: no request
        if node is None or not self.attrs_fresh(node):
            node = await self.resolve(path, node)
        if node is None:
            raise FsError(errno.ENOENT)
        return self.inodes.remember(node)

    async def existing(self, parent: Node, name: str) -> Node:
        """The child ``name`` of ``parent`` (no lookup count). Raises FsError(ENOENT/EIO)."""
        path = join(parent.path, name)
        node = self.inodes.by_path.get(path)
        if node is None or not self.attrs_fresh(node):
            node = await self.resolve(path, node)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    async def check_absent(self, parent: Node, name: str, is_dir: bool = False) -> None:
        """A new entry ``name`` may be made in ``parent``: FsError(EEXIST) if something is
        there, EINVAL/ENAMETOOLONG if the name cannot be a key, EIO if the store fails."""
        path = join(parent.path, name)
        self.naming.check_new_path(path, is_dir)
        node = self.inodes.by_path.get(path)
        if node is not None and not node.unlinked and (node.staged is not None or self.attrs_fresh(node)):
            raise FsError(errno.EEXIST)
        if await self.resolve(path, node) is not None:
            raise FsError(errno.EEXIST)

    async def resolve(self, path: str, known: Node | None) -> Node | None:
        """What is at ``path`` now, from the store (or the negative cache, for
        ``entry_timeout`` seconds after the store said nothing is there). ``known``: the node
        the caller has for ``path``, refreshed in place when it is still of the same type.
        Raises FsError(EIO) when the store fails."""
        by_path = self.inodes.by_path
        if known is None and (self.names.known_absent(path)
                              or await self.names.absent_from_listing(self.inodes.parent(path), path)):
            return by_path.get(path)  # None, unless a task created it meanwhile
        try:
            found = await self.probe(path)
        except StoreError as e:
            log.error("lookup of %r failed: %s", self.naming.key(path), e)
            raise FsError(errno_of(e)) from None
        current = by_path.get(path)
        if current is not None and current is not known:
            return current  # another task resolved (or created) it while we waited
        if found is None:
            if known is not None and by_path.get(path) is known and known.staged is None:
                del by_path[path]
            self.names.note_absent(path)
            self.names.note_miss(path)
            return None
        info, is_dir = found
        if known is not None and stat.S_IFMT(known.mode) == stat.S_IFMT(self.defaults.attrs_from_info(info, is_dir)[0]):
            self.refresh(known, info)
            return known
        if known is not None and by_path.get(path) is known:
            del by_path[path]
        return self.node_from_info(path, info, is_dir)

    def node_from_info(self, path: str, info: ObjectInfo | None, is_dir: bool) -> Node:
        """A new node for ``path`` from a HEAD of its object (or dir marker; None: implicit dir)."""
        mode, uid, gid, mtime = self.defaults.attrs_from_info(info, is_dir)
        node = self.inodes.new_node(path, mode, uid, gid, mtime, info.size if info and not is_dir else 0, found=True)
        node.implicit = is_dir and info is None
        node.ctime_ns, node.atime_ns = times_from_info(info, mtime)
        if info is not None and not is_dir:
            self.set_version_from_info(node, info)
        return node

    @staticmethod
    def set_version_from_info(node: Node, info: ObjectInfo) -> None:
        node.version = version_from_info(info)
        node.size = info.size
        node.checked_at = time.monotonic()

    def refresh(self, node: Node, info: ObjectInfo | None) -> None:
        """Take what the store now says of a clean node: a new version if the ETag changed, and
        the attributes always (on OSS a metadata-only CopyObject keeps the ETag). A directory
        refreshed with no marker (``info`` None) is implicit."""
        if node.is_dir:
            node.implicit = info is None
        if node.staged is None and info is not None:  # open handles keep their own version
            if not node.is_dir and (node.version is None or node.version.etag != info.etag):
                self.set_version_from_info(node, info)
                node.symlink_target = None
            node.mode, node.uid, node.gid, node.mtime_ns = self.defaults.attrs_from_info(info, node.is_dir)
            ctime, node.atime_ns = times_from_info(info, node.mtime_ns)
            node.ctime_ns = max(node.ctime_ns, ctime)  # never back: a rename's new ctime may not be stored
        node.checked_at = time.monotonic()

    async def revalidate(self, node: Node) -> None:
        """Read ``node``'s attributes from the store again (HEAD). Raises FsError(ENOENT) if
        its object is gone, FsError(EIO) when the store fails."""
        try:
            info = await self.store.head(self.naming.key(node.path))
        except StoreError as e:
            log.error("HEAD %r failed: %s", self.naming.key(node.path), e)
            raise FsError(errno_of(e)) from None
        if info is None:
            raise FsError(errno.ENOENT)
        self.refresh(node, info)
