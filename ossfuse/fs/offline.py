"""Directory listings while the store is offline (issue 17; docs/design.md "Offline").

A directory this mount has listed completely keeps its child names (``Node.children``, kept
current by the mount's own creates, renames and unlinks: ``namecache``), and the inode table
keeps a node, with its attributes, for every name the kernel still holds, and the last
dropped ones (``InodeTable.restore``). Offline, a listing is answered from those; it is never
guessed: a name whose node is no longer kept has no attributes to show, so the listing fails
with EIO rather than show wrong ones or drop the name.
"""
from __future__ import annotations

import errno
import logging

from ..store.health import say_once_offline
from .errors import FsError
from .inodes import InodeTable
from .model import DirEntry, Node
from .naming import Naming, join

log = logging.getLogger(__name__)


def offline_entries(directory: Node, inodes: InodeTable, naming: Naming, store: object) -> list[DirEntry]:
    """The entries of ``directory`` as this mount last knew them: ``[(name, node, None,
    is_dir)]`` sorted by name (``readdir.list_entries``'s shape). Raises FsError(EIO), with one
    INFO line per directory and outage (the outage has its WARNING), when the directory was
    never listed completely or a child's node is no longer known."""
    dkey, by_path = naming.dir_key(directory.path), inodes.by_path
    if directory.children is None:
        say_once_offline(store, log, f"listing {dkey!r}: the store is offline and this mount has not listed it")
        raise FsError(errno.EIO)
    entries: list[DirEntry] = []
    for name in sorted(directory.children):
        path = join(directory.path, name)
        node = by_path.get(path) or inodes.restore(path)
        if node is None or node.unlinked:
            say_once_offline(store, log, f"listing {dkey!r}: the store is offline and {name!r} is no longer cached")
            raise FsError(errno.EIO)
        entries.append((name, node, None, node.is_dir))
    return entries
