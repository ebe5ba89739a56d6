"""When staged versions are uploaded: the dirty set, the upload queue with its delay, retries
after a failure, the drain at unmount, writers waiting for room on a full cache disk, and the
counters ``ossfuse status`` shows.

What one upload does (journal, PUT, adopt the new version) is the filesystem's part
(``ossfuse.fs.commit``), handed in as ``upload``; this module only decides when. Items are the
filesystem's inodes, used through these fields: ``path`` (for the per-directory index; the
filesystem calls :meth:`UploadScheduler.moved` when it changes), ``staged`` (None once
uploaded), ``unlinked``, ``upload_queued``, ``queued_at`` (trio clock seconds), ``dirty_since``
(wall-clock seconds).
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Awaitable, Callable

import trio

from ..aio import run_all

log = logging.getLogger(__name__)


def _pending(node: Any) -> bool:
    return node.staged is not None and not node.unlinked


def _dir_of(node: Any) -> str:
    """The directory path holding ``node`` ("" for the root's entries)."""
    return node.path.rpartition("/")[0]


class UploadScheduler:
    """The write-back queue of one mount.

    ``upload(node, closed_only) -> bool`` uploads one node (True: nothing pending after, or,
    with ``closed_only``, nothing to upload before a writer that has it open closes it: queued
    uploads pass True, the drain at unmount False, as it stores what open writers wrote so far);
    ``delay`` seconds pass between a node's queueing and its upload (folding the renames and
    attribute changes that follow a close into one PUT); ``retry_interval`` seconds before a
    failed one is queued again; ``workers`` uploads at once when draining; ``room_wait``
    seconds at most that one request on a full cache disk waits for uploads to free room
    (:meth:`wait_for_room`: the store's ``offline_timeout``, as the kernel cannot interrupt a
    FUSE request: a process killed while it waits is held until then)."""

    def __init__(self, upload: Callable[[Any, bool], Awaitable[bool]], *, delay: float, retry_interval: float,
                 workers: int, room_wait: float = 5.0):
        self.upload = upload
        self.delay = delay
        self.room_wait = room_wait
        self.retry_interval = retry_interval
        self.workers = workers
        self.dirty: set = set()  # nodes with a staged version
        self._dirty_in: dict[str, set] = {}  # directory path → its dirty nodes (index of ``dirty``)
        self._indexed_in: dict[Any, str] = {}  # dirty node → the directory it is indexed under
        self.stats = {"uploaded": 0, "upload_failures": 0, "recovered": 0, "quarantined": 0, "aborted_uploads": 0}
        self.nursery = None  # set by the daemon: anything with start_soon(fn, *args) (its Supervisor); retries run there
        self._send, self._recv = trio.open_memory_channel(float("inf"))
        # queued node → the node that took its name by a rename before its upload (took_name);
        # an entry goes when its node leaves the queue
        self._heirs: dict[Any, Any] = {}
        # path → a queued node that lost that name (vacated): a file that takes the path while
        # the entry is queued inherits it (took_path); an entry goes when its node leaves the queue
        self._vacated: dict[str, Any] = {}
        # a full cache disk: writers wait for uploads to end (their staged data then becomes
        # droppable cache), and while one waits, queued uploads start without their delay
        self._running: set = set()  # nodes a worker uploads now
        self._ended = trio.Event()  # set when an upload ends, then replaced
        self._hurry = trio.Event()  # set while a writer waits for room
        self._waiting_for_room = 0

    # -- the dirty set ----------------------------------------------------------------------
    def mark_dirty(self, node) -> None:
        """``node`` has a staged version now (noted with the wall-clock time it got one)."""
        if node not in self.dirty:
            node.dirty_since = time.time()
            self.dirty.add(node)
            self._index(node)
            self.took_path(node.path, node)  # a new file where a queued one was just unlinked

    def mark_clean(self, node) -> None:
        self.dirty.discard(node)
        self._unindex(node)

    def took_name(self, old, new) -> None:
        """``new`` took ``old``'s name by a rename while ``old``'s staged version waited for its
        upload: ``new`` is uploaded when ``old`` would have been (the worker that takes ``old``
        from the queue uploads ``new`` instead), and ``status`` counts its age from ``old``'s
        (the name's oldest change not in the bucket). Without it, a name replaced by rename more
        often than ``delay`` (a status file written to a temporary name and renamed over it a few
        times a second) never reached the bucket while its writer ran: each version was renamed
        over before its own delay ended (trial R). Followed only once ``old`` is unlinked (the
        rename may still fail after this call)."""
        if old is new or not _pending(new) or old.staged is None or old not in self.dirty:
            return
        new.dirty_since = min(new.dirty_since, old.dirty_since)
        if old.upload_queued:
            self._heirs[old] = new

    def vacated(self, node) -> None:
        """``node`` lost its name (unlinked, or renamed over) while its upload was queued: a
        file that takes the name before that entry leaves the queue inherits it
        (:meth:`took_path`). A save by delete and create (``rm f; echo x > f``, or ``rm f; mv
        f.tmp f``) more often than ``delay`` otherwise left the name without an object for as
        long as the writer ran (trial S)."""
        if node.upload_queued and node.staged is not None:
            self._vacated[node.path] = node

    def took_path(self, path: str, new) -> None:
        """``new`` now has ``path`` (made there, or renamed there onto no file): if a queued
        node lost that name (:meth:`vacated`), ``new`` inherits its queue entry and age, as
        :meth:`took_name` gives them."""
        old = self._vacated.pop(path, None)
        if old is not None and old is not new and old.unlinked and old.upload_queued and _pending(new):
            new.dirty_since = min(new.dirty_since, old.dirty_since)
            self._heirs[old] = new

    def moved(self, node) -> None:
        """``node``'s path changed (a rename): index it under its new directory."""
        if node in self.dirty:
            self._unindex(node)
            self._index(node)

    def _index(self, node) -> None:
        d = _dir_of(node)
        self._dirty_in.setdefault(d, set()).add(node)
        self._indexed_in[node] = d

    def _unindex(self, node) -> None:
        d = self._indexed_in.pop(node, None)
        if d is not None:
            members = self._dirty_in[d]
            members.discard(node)
            if not members:
                del self._dirty_in[d]

    def staged_in(self, dir_path: str, parent_of: Callable[[str], str]) -> list:
        """Dirty nodes still linked directly under directory ``dir_path`` (from the index: its
        size, not the number of dirty nodes in the mount, is the cost)."""
        return [d for d in self._dirty_in.get(dir_path, ()) if not d.unlinked and parent_of(d.path) == dir_path]

    def dirs_holding_staged_below(self, dir_path: str) -> set[str]:
        """Names of the subdirectories of ``dir_path`` with dirty nodes still linked somewhere
        below them: directories the store may not show yet (a journaled file recovered into a
        directory whose marker another client deleted: a trial listed neither until the upload
        was in). Costs one look at each directory holding dirty nodes."""
        start = dir_path + "/" if dir_path else ""
        names = set()
        for d, members in self._dirty_in.items():
            if d.startswith(start) and len(d) > len(start) and any(not n.unlinked for n in members):
                names.add(d[len(start):].partition("/")[0])
        return names

    def pending(self) -> list:
        """Dirty nodes whose staged version is still to be uploaded."""
        return [n for n in self.dirty if _pending(n)]

    # -- the queue --------------------------------------------------------------------------
    def schedule(self, node) -> None:
        """Queue ``node`` for upload after ``delay`` (once: queueing it again does nothing)."""
        if not node.upload_queued:
            node.upload_queued = True
            node.queued_at = trio.current_time()
            self._send.send_nowait(node)

    async def worker(self) -> None:
        """Background uploads of released files, in queue order (several workers run)."""
        async for node in self._recv:
            with trio.move_on_at(node.queued_at + self.delay):
                await self._hurry.wait()  # (a writer waits for room: now)
            node.upload_queued = False
            path = node.path
            if path in self._vacated and self._vacated[path] is node:
                del self._vacated[path]
            # its name taken before its upload: upload what took it (a rename that failed
            # after took_name left the name to this node: its own upload, then)
            while node.unlinked and node in self._heirs:
                node = self._heirs.pop(node)
            self._heirs.pop(node, None)  # (that failed rename's entry)
            self._running.add(node)
            try:
                ok = await self.upload(node, True)
            except Exception:  # a bug in one upload must not take the mount down (review A9)
                log.exception("upload of %r failed unexpectedly; retrying later", getattr(node, "path", node))
                ok = False
            finally:
                self._running.discard(node)
                self._ended.set()
                self._ended = trio.Event()
            if not ok and _pending(node) and self.nursery is not None:
                self.nursery.start_soon(self._retry_later, node)

    def may_free_room(self, writer) -> bool:
        """Whether an upload of a node other than ``writer`` runs or is queued: its end may
        free room on the cache disk (:meth:`wait_for_room`). A failed upload waiting to be
        retried does not count (an unreachable store frees nothing)."""
        return (any(n is not writer for n in self._running)
                or any(n is not writer and n.upload_queued and _pending(n) for n in self.dirty))

    def may_wait_for_room(self, writer, deadline: float | None) -> bool:
        """Whether a request of ``writer`` that found the cache disk full should wait for room
        (:meth:`wait_for_room`) rather than fail: its ``deadline`` (None: it has not waited
        yet) is not past, and an upload may free room (:meth:`may_free_room`)."""
        return (deadline is None or trio.current_time() < deadline) and self.may_free_room(writer)

    async def wait_for_room(self, writer, deadline: float | None) -> float:
        """Wait, until trio time ``deadline`` at most (None: ``room_wait`` from now, a request's
        first wait), for an upload of a node other than ``writer`` to end; queued uploads start
        at once meanwhile, without their ``delay``. Returns that deadline, for the request's
        next wait and :meth:`may_wait_for_room`: at once when no upload may free room
        (:meth:`may_free_room`), else when one ended (room may have been freed: evict and try
        again) or the deadline passed. The caller holds no lock (an upload takes its node's
        lock to adopt what it sent)."""
        if deadline is None:
            deadline = trio.current_time() + self.room_wait
        if not self.may_free_room(writer):
            return deadline
        ended = self._ended
        self._waiting_for_room += 1
        self._hurry.set()
        try:
            with trio.move_on_at(deadline):
                await ended.wait()
            return deadline
        finally:
            self._waiting_for_room -= 1
            if not self._waiting_for_room:
                self._hurry = trio.Event()

    async def _retry_later(self, node) -> None:
        await trio.sleep(self.retry_interval)
        if _pending(node):
            self.schedule(node)

    def resume(self) -> None:
        """The store answers again (``store.health`` back online): queue every pending upload
        now instead of after the ``retry_interval`` of its last failure."""
        for node in self.pending():
            self.schedule(node)

    async def drain(self) -> int:
        """Upload everything still staged (unmount), ``workers`` at once; returns how many
        files remain pending. A pass that uploaded some but not all is followed by another for
        the rest: the store may have come back during it (a trial: a file failed early in the
        outage and stayed journaled, although the store answered before the drain ended). A
        pass that uploaded nothing ends it."""
        pending = self.pending()
        while pending:
            await run_all([functools.partial(self.upload, n, False) for n in pending], self.workers)
            left = self.pending()
            if len(left) >= len(pending):
                return len(left)
            pending = left
        return 0
