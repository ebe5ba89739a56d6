"""The inode table: inode numbers, the path → node map, the kernel's lookup counts (FUSE's
lookup/forget protocol) and open handle numbers.

Inode numbers come from the path (``number_of``): a file keeps its number across mounts and
machines, so programs that keep ``st_ino`` (git's index, backup tools' file caches) find it
unchanged after a remount (with numbers counted per mount, the first ``git status`` after each
mount read and hashed every tracked file again). A node keeps its number when it is renamed.

A node lives while the kernel holds a lookup on it, a handle is open on it, or it has a staged
version; the node a path maps to may be replaced (rename over it, another client's new object)
while the old one lives on for its lookups and handles."""
from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import stat
import time
from typing import Callable

from .errors import FsError
from .model import ROOT_INO, DirHandle, FileHandle, Node
from .namecache import NameCache
from .naming import parent_of


_DROPPED_MAX = 100_000  # remembered numbers of dropped nodes; forgotten all at once past this
_ATTIC_MAX = 10_000  # dropped nodes kept whole for offline answers (the least recently dropped go first)


class InodeTable:
    """Nodes by inode number and by path, and open handles by number. ``on_move(node)``: called
    after a node's path changed (the write-back index of dirty nodes by directory follows)."""

    def __init__(self, root: Node, names: NameCache, on_move: Callable[[Node], None] = lambda node: None):
        self.names = names
        self.on_move = on_move
        self.nodes: dict[int, Node] = {ROOT_INO: root}
        self.by_path: dict[str, Node] = {"": root}
        self.handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        # path → (inode number, file type) of nodes dropped while that path still named them:
        # the kernel forgets an inode whenever it evicts it (a symlink just made, often), and the
        # node found there again gets the same number back, as on a disk filesystem
        self._dropped: dict[str, tuple[int, int]] = {}
        self._dropped_numbers: set[int] = set()  # the numbers in _dropped: number_of skips them
        # the last dropped nodes themselves (path → node, oldest first), for answering offline
        # from what this mount last knew (``restore``; docs/design.md "Offline")
        self._attic: collections.OrderedDict[str, Node] = collections.OrderedDict()

    def get(self, ino: int) -> Node:
        """The node of inode ``ino``; FsError(ENOENT) when it is not (or no longer) known."""
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def parent(self, path: str) -> Node | None:
        """The node of the directory holding ``path``, if known."""
        return self.by_path.get(parent_of(path))

    def new_node(self, path: str, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0, *,
                 found: bool = False, ctime_ns: int | None = None) -> Node:
        """A new inode at ``path`` (lookup count 0: see :meth:`remember`). ``found``: a node for
        what the store has at ``path`` (not a new file): it gets back the number of the node
        of the same type dropped at that path, if any (unlink and rename forget the number), and
        a directory the child names that node's last listing gave; the times that node had and
        the store does not keep (a directory's entry changes, a rename's ctime) stay.
        ``ctime_ns``: the stored ctime (default: ``mtime_ns``)."""
        again = self._undrop(path) if found else None
        if again is not None and again[1] == stat.S_IFMT(mode) and again[0] not in self.nodes:
            ino = again[0]
        else:
            ino = self.number_of(path)
        node = Node(ino, path, mode, uid, gid, mtime_ns, mtime_ns if ctime_ns is None else ctime_ns, size=size,
                    checked_at=time.monotonic())
        old = self._attic.pop(path, None) if again is not None else None
        if old is not None and old.ino == ino:
            # what this mount changed and does not store: a directory's entry changes move its
            # mtime, a rename its ctime (Node.entries_changed_ns); the kernel forgets inodes
            # under load, and the times went back to the stored ones (CI: pjdfstest rmdir/00.t)
            node.entries_changed_ns = old.entries_changed_ns
            if old.entries_changed_ns:  # (0: no entry change; an mtime before 1970 stays)
                node.mtime_ns = max(node.mtime_ns, old.entries_changed_ns)
            node.ctime_ns = max(node.ctime_ns, old.ctime_ns)
            if old.children is not None:
                # the directory found again is the one dropped: keep its last complete listing
                # (no create or rename in it could pass this mount while it was dropped),
                # trusted as long as before, so an outage later can still list it (fs/offline.py)
                node.children, node.children_until = set(old.children), old.children_until
        self.nodes[node.ino] = node
        self.by_path[path] = node  # a node it replaces lives on for its lookups and handles
        self.names.note_present(path)
        self.names.child_added(self.parent(path), path)
        return node

    def _undrop(self, path: str) -> tuple[int, int] | None:
        """Take ``path``'s entry out of ``_dropped`` (its number is free again); returns it."""
        entry = self._dropped.pop(path, None)
        if entry is not None:
            self._dropped_numbers.discard(entry[0])
        return entry

    def number_of(self, path: str) -> int:
        """The inode number for a new node at ``path``: the first of BLAKE2b-64(``path``),
        BLAKE2b-64("1\\0" + ``path``), … (top bit cleared: a positive int64 for every program;
        0 and the root's 1 skipped) that no live node holds, nor a dropped one that may be
        found again at its path (``_dropped``). A node holds it when it was renamed away from
        ``path`` (it keeps its number for the mount, also once the kernel forgot it: trial U's
        renamed file was renumbered when a new file took its old name), or is an older node at
        ``path`` still open or looked up (another client replaced the file): then the next one. Among
        2^63 numbers two paths' numbers meet with odds ~n²/2^64 (5·10^-10 for 10^5 directories),
        which only matters to programs that track directories by (st_dev, st_ino): du, find."""
        raw = path.encode("utf-8", "surrogateescape")
        for i in itertools.count():
            digest = hashlib.blake2b(raw if i == 0 else b"%d\0%s" % (i, raw), digest_size=8).digest()
            ino = int.from_bytes(digest, "big") >> 1
            if ino > ROOT_INO and ino not in self.nodes and ino not in self._dropped_numbers:
                return ino
        raise AssertionError("unreachable")

    # -- lookup counts ----------------------------------------------------------------------
    def remember(self, node: Node) -> Node:
        """The kernel is handed ``node`` (lookup, create, readdir entry): one more lookup.
        Returns the node it holds: ``node``, put back when it was dropped while its caller
        waited for the store (the kernel's FORGET of its last lookups came meanwhile; trial
        BT7: the kernel then named the unknown inode as a parent, and every name below the
        directory was ENOENT), or the node found at its path since then."""
        node = self.known(node)
        node.lookups += 1
        return node

    def known(self, node: Node) -> Node:
        """``node`` if it is in the table; else (dropped, :meth:`maybe_drop`) known again under
        its path and number (a new number if another node took it), or the node at its path
        now, if one is. What the kernel is about to be handed (readdir replies with it first)."""
        if node.ino == ROOT_INO or self.nodes.get(node.ino) is node:
            return node
        current = self.by_path.get(node.path)
        if current is not None and not node.unlinked:
            return current  # (found again meanwhile: new_node gave it the dropped number back)
        if node.ino in self.nodes:
            node.ino = self.number_of(node.path)
        self.nodes[node.ino] = node
        if not node.unlinked:
            self._undrop(node.path)
            if self._attic.get(node.path) is node:
                del self._attic[node.path]
            self.by_path[node.path] = node
        return node

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` lookups of ``ino``."""
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= n
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Drop ``node`` if nothing holds it any more (no lookups, opens or staged data). A node
        dropped already is left alone: its inode number may be another node's by now."""
        if (node.lookups <= 0 and node.opens <= 0 and node.staged is None and node.ino != ROOT_INO
                and self.nodes.get(node.ino) is node):
            del self.nodes[node.ino]
            if self.by_path.get(node.path) is node:
                del self.by_path[node.path]
                if not node.unlinked:
                    if len(self._dropped) > _DROPPED_MAX:
                        self._dropped.clear()
                        self._dropped_numbers.clear()
                    self._undrop(node.path)
                    self._dropped[node.path] = (node.ino, stat.S_IFMT(node.mode))
                    self._dropped_numbers.add(node.ino)
                    self._attic[node.path] = node
                    self._attic.move_to_end(node.path)
                    if len(self._attic) > _ATTIC_MAX:
                        self._attic.popitem(last=False)

    def last_dropped(self, path: str) -> Node | None:
        """The node last dropped at ``path`` as :meth:`restore` would give it, left where it
        is (None when it would give none)."""
        node = self._attic.get(path)
        if node is None or path in self.by_path or node.ino in self.nodes \
                or self._dropped.get(path) != (node.ino, stat.S_IFMT(node.mode)):
            return None
        return node

    def restore(self, path: str) -> Node | None:
        """The node last dropped at ``path``, put back with its number and attributes as last
        known (offline, when the store cannot tell), or None when the path was unlinked, renamed
        or found again since, or the node is no longer kept."""
        node = self.last_dropped(path)
        if node is None:
            self._attic.pop(path, None)
            return None
        del self._attic[path]
        self._undrop(path)
        self.nodes[node.ino] = node
        self.by_path[path] = node
        return node

    # -- names ------------------------------------------------------------------------------
    def remove_name(self, node: Node) -> None:
        """``node``'s path no longer names it (unlinked or replaced); the path is absent
        (unless a prefix of that name stays: NameCache.name_left)."""
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        self._undrop(node.path)
        self.names.name_left(self.parent(node.path), node.path)

    def discard(self, node: Node) -> None:
        """Forget a node that was never handed out (its creation failed)."""
        self.remove_name(node)
        self.nodes.pop(node.ino, None)

    def move(self, node: Node, old: str, new: str, *, renamed: bool = True) -> None:
        """``node`` is now at path ``new`` (rename); ``old`` is absent (NameCache.name_left).
        ``renamed``: the node itself was renamed (its ctime becomes now); False for what moved
        with a directory above it (as on a local disk, untouched: tar would say it changed as
        it read it)."""
        if self.by_path.get(old) is node:
            del self.by_path[old]
            self.names.name_left(self.parent(old), old)  # (absent, unless it hid a prefix of its name)
        self.names.note_present(new)
        self._undrop(old)
        self._undrop(new)
        node.path = new
        if renamed:
            node.ctime_ns = time.time_ns()
        # A node dropped while the caller awaited the store (the kernel forgot it) is not put
        # back at ``new``: the next lookup would hand the kernel an inode this table no longer
        # knows (opendir, getattr: ENOENT). The name itself exists all the same.
        if self.nodes.get(node.ino) is node:
            self.by_path[new] = node
        self.names.child_added(self.parent(new), new)
        self.on_move(node)

    # -- handles ----------------------------------------------------------------------------
    def add_handle(self, make):
        """Register the handle ``make(fh)`` under a new handle number; returns it."""
        h = make(self._next_fh)
        self._next_fh += 1
        self.handles[h.fh] = h
        return h

    def drop_handle(self, fh: int) -> None:
        self.handles.pop(fh, None)
