"""Locks on names: the namespace operations of one mount lock the paths they change, not the
whole mount (the idea of s3ql's ``multi_lock.MultiLock``: a set of held keys and one place to
wait; written anew here, with a second kind for whole subtrees).

A request names two kinds of lock, taken together:

* ``names``: the path itself (create, mkdir, symlink, unlink, a file's rename; a lookup or
  listing whose path renames keep moving, fs/resolve.py UNLOCKED_TRIES);
* ``trees``: the path and every path below it (rmdir, a directory's rename).

Two requests conflict when they share a path, or one holds a tree that contains a path (a
name, or a tree's root) of the other. :meth:`NameLocks.hold` waits until *all* its paths are
free and then takes them in one step (the event loop runs one task at a time, so the check and
the take cannot interleave): no task ever holds some names while waiting for others, so names cannot deadlock among
themselves, whatever order the caller lists them in. Node locks (``Node.lock``) come after
name locks, never before (docs/design.md, "Locks and what they protect").
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterable

import trio


def _within(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or below it ("" is the root: everything is below it)."""
    return tree == "" or path == tree or path.startswith(tree + "/")


class NameLocks:
    """The held name and tree locks of one mount (paths relative to the mount, "" the root)."""

    def __init__(self) -> None:
        self._names: dict[str, int] = {}  # path → how many holders (1: exclusive; see _free)
        self._trees: dict[str, int] = {}
        self._lot = trio.lowlevel.ParkingLot()  # every waiter; woken at each release

    def held(self) -> set[str]:
        """Paths locked now (names and trees), for tests and ``ossfuse status``."""
        return set(self._names) | set(self._trees)

    def _free(self, names: set[str], trees: set[str]) -> bool:
        # Few operations run at once (pyfuse3 runs at most 64), so scanning what is held is cheap.
        for p in names | trees:
            if p in self._names or any(_within(p, t) for t in self._trees):
                return False
        for t in trees:  # a held name or tree below a wanted tree (a rename of A waits for A/C's)
            if any(_within(p, t) for p in self._names) or any(_within(p, t) for p in self._trees):
                return False
        return True

    @asynccontextmanager
    async def hold(self, names: Iterable[str] = (), trees: Iterable[str] = ()) -> AsyncIterator[None]:
        """Hold ``names`` and ``trees`` (see the module doc) for the ``async with`` body.
        Cancellation while waiting takes nothing."""
        names, trees = set(names), set(trees)
        names -= trees  # a tree covers its own name
        while not self._free(names, trees):
            await self._lot.park()
        for p in names:
            self._names[p] = self._names.get(p, 0) + 1
        for t in trees:
            self._trees[t] = self._trees.get(t, 0) + 1
        try:
            yield
        finally:
            for table, paths in ((self._names, names), (self._trees, trees)):
                for p in paths:
                    table[p] -= 1
                    if not table[p]:
                        del table[p]
            self._lot.unpark_all()
