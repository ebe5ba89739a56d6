"""What this mount knows about names without asking the store: the negative cache (paths the
store said are absent, for ``entry_timeout`` seconds) and each directory's child names as of
a complete listing, kept current by this mount's own changes; and how long an answer of the
store is trusted (:func:`trusted_for`: the timeouts, longer on a slow store)."""
from __future__ import annotations

import time
from typing import Callable

from ..store.base import ObjectStore, StoreError
from .model import Node
from .naming import Naming, base_name, parent_of

RELIST_MAX = 1000  # entries: a directory this small is listed again (one page) to answer lookups
_BIG_RECHECK = 60.0  # seconds a directory found too big to list in one page is not listed for lookups
_MISS_BURST = 2  # lookup misses in one directory within entry_timeout that make a lookup list it
_ABSENT_MAX = 100_000  # paths: the negative cache is emptied when it grows past this
SLOW_STORE_ROUND_TRIPS = 32  # round trips of the store an answer is trusted for, when longer than the timeouts


def trusted_for(seconds: float, store: ObjectStore) -> float:
    """How long an answer of ``store`` is trusted after it arrived: ``seconds`` (the mount's
    attr_timeout or entry_timeout), or SLOW_STORE_ROUND_TRIPS of the store's recent round
    trips when that is longer (0 stays 0: never trusted, as configured). An answer is at least
    one round trip old when it arrives; on a store slower than a timeout, checking again more
    often than every few round trips would make each walk, ``cat`` or ``git status`` check
    what it has just checked, every name costing requests in a row (a trial: ``git status``
    of 5 files 0.06 s at 0 ms, 28.7 s at 0.3 s per request, the requests growing with the
    latency). On a store answering within ``seconds`` / 32 (31 ms for the default 1 s) nothing
    changes; at 0.3 s per request an answer is trusted for 9.6 s (NFS trusts a directory's
    attributes 30 to 60 s on any link)."""
    if seconds <= 0:
        return seconds
    return max(seconds, SLOW_STORE_ROUND_TRIPS * store.counters.round_trip)


class NameCache:
    """Negative cache and directory child sets of one mount.

    ``staged_in(dir_path)``: this mount's not-yet-uploaded nodes directly in ``dir_path``
    (a listing of the store does not show them)."""

    def __init__(self, store: ObjectStore, naming: Naming, entry_timeout: float,
                 staged_in: Callable[[str], list[Node]]):
        self.store = store
        self.naming = naming
        self.entry_timeout = entry_timeout
        self.staged_in = staged_in
        self._absent: dict[str, float] = {}  # path → monotonic expiry
        self._misses: dict[str, tuple[int, float]] = {}  # dir path → (lookup misses, monotonic expiry)
        # paths a listing found both a file and a prefix at (the file shown): removing the file
        # leaves a directory there, not nothing (a trial: ENOENT, then `ls` showed it)
        self._shadowing: set[str] = set()

    # -- negative cache ---------------------------------------------------------------------
    def known_absent(self, path: str) -> bool:
        """Whether the store said nothing is at ``path`` less than entry_timeout ago."""
        expiry = self._absent.get(path)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._absent[path]
            return False
        return True

    def note_shadowing(self, path: str) -> None:
        """A listing found a file at ``path`` that hides a prefix of the same name."""
        if len(self._shadowing) > _ABSENT_MAX:
            self._shadowing.clear()
        self._shadowing.add(path)

    def name_left(self, parent: Node | None, path: str) -> None:
        """The file or directory at ``path`` went (unlinked, renamed away): absent, unless it
        was a file hiding a prefix of its name, which is a directory there now (looked up
        again, listed)."""
        if path in self._shadowing:
            self._shadowing.discard(path)
            self.note_present(path)
            return
        self.child_removed(parent, path)
        self.note_absent(path)

    def note_absent(self, path: str) -> None:
        if len(self._absent) > _ABSENT_MAX:
            self._absent.clear()
        self._absent[path] = time.monotonic() + trusted_for(self.entry_timeout, self.store)

    def note_miss(self, path: str) -> None:
        """A lookup asked the store for ``path`` and found nothing (counted per directory: a
        burst of misses is a burst of creates, answered from a listing, see below)."""
        parent, now = parent_of(path), time.monotonic()
        count, until = self._misses.get(parent, (0, 0.0))
        if until < now:
            count = 0
        if len(self._misses) > _ABSENT_MAX:
            self._misses.clear()
        self._misses[parent] = (count + 1, now + trusted_for(self.entry_timeout, self.store))

    def _miss_burst(self, dir_path: str) -> bool:
        count, until = self._misses.get(dir_path, (0, 0.0))
        return count >= _MISS_BURST and until >= time.monotonic()

    def note_present(self, path: str) -> None:
        self._absent.pop(path, None)

    def note_present_under(self, path: str) -> None:
        """A directory was renamed to ``path``: what is below it now is its (names this mount
        saw leave the same paths earlier, e.g. ``mv current old; mv new current``, exist)."""
        self._absent.pop(path, None)
        below = path + "/"
        for p in [p for p in self._absent if p.startswith(below)]:
            del self._absent[p]

    # -- directory child sets ---------------------------------------------------------------
    def set_children(self, dirnode: Node, names) -> None:
        """``dirnode`` holds exactly ``names`` now (a complete listing, or a new directory)."""
        dirnode.children = set(names)
        dirnode.children_until = time.monotonic() + trusted_for(self.entry_timeout, self.store)

    @staticmethod
    def child_added(parent: Node | None, path: str) -> None:
        if parent is not None and parent.children is not None:
            parent.children.add(base_name(path))

    @staticmethod
    def child_removed(parent: Node | None, path: str) -> None:
        if parent is not None and parent.children is not None:
            parent.children.discard(base_name(path))

    async def absent_from_listing(self, parent: Node | None, path: str) -> bool:
        """Whether the listing of ``parent`` (the directory holding ``path``) says ``path``
        does not exist: the listing is at most entry_timeout old, or is taken now (one page)
        for a small directory — also when none was taken yet but lookups there just missed
        _MISS_BURST times within entry_timeout, so a burst of creates needs no request each
        (the kernel runs a create's lookup under its directory's lock: each request there
        delays every other lookup in that directory). Lookups of names that exist never cause
        a listing, so another client's new object is seen at once there. A directory found
        too big for one page is probed name by name for _BIG_RECHECK seconds. False (cannot
        tell) when the store fails."""
        if parent is None or not parent.is_dir or self.entry_timeout <= 0:
            return False
        now = time.monotonic()
        if parent.children is None:
            if parent.children_until > now or not self._miss_burst(parent.path):
                return False  # too big lately (single probes cost less than listing it all), or no burst
        elif parent.children_until >= now:
            return base_name(path) not in parent.children
        elif len(parent.children) >= RELIST_MAX:
            self._too_big(parent, now)
            return False
        dkey = self.naming.dir_key(parent.path)
        try:
            page = await self.store.list(dkey, delimiter="/", max_keys=RELIST_MAX)
        except StoreError:
            return False  # the probe will report it
        if page.next_marker is not None:
            self._too_big(parent, time.monotonic())
            return False
        names = [o.key[len(dkey):] for o in page.objects] + [p[len(dkey):-1] for p in page.prefixes]
        local = [d.name for d in self.staged_in(parent.path)]
        self.set_children(parent, [n for n in names if n] + local)
        assert parent.children is not None  # set just above
        return base_name(path) not in parent.children

    @staticmethod
    def _too_big(parent: Node, now: float) -> None:
        parent.children = None
        parent.children_until = now + _BIG_RECHECK
