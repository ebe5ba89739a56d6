"""Directory listings: a snapshot of a directory's entries per open handle (so readdir offsets
stay stable), resolved into nodes a batch at a time with parallel HEADs when the store's
listing carries no metadata (mountpoint-s3 does the same: ``superblock/readdir.rs``).

A listing lists every name or fails: a name is never left out because its HEAD failed (review
A3: leaving it out made ``ls`` exit 0 and ``rsync --delete`` delete a backup's copy). A HEAD
that failed for good (a bucket policy refusing one object: AccessDenied) leaves its name served
from the listing alone, as in a big directory (``listed_only``, below; one ERROR line per
directory, naming a refused key and the reason; a stat of each refused name logs its own), so the rest of the directory stays readable and a
stat or open of that name asks again (EIO while it is refused). A temporary failure (the store
busy or unreachable once its retries ran out) fails the readdir call with EIO: serving every
name of a struggling store from the listing would make each stat wait for retries of its own
(a trial: ``ls -l`` of 600 names with every HEAD answered 503 projected to an hour, against
2 s to fail). So does any failure when hidden plaintext objects must be told apart (a name
shown might be one to hide). Only a name whose object is gone by the time of its HEAD is left
out.

A big directory over a store whose listing carries no metadata (OSS: key, size, ETag,
Last-Modified) would cost a HEAD per entry (100,000 entries: minutes); past LISTED_ATTRS_ABOVE
entries its unknown names are served from the listing alone (``Node.listed_only``: default
mode, uid and gid, Last-Modified as mtime, the listed size, zero attribute and entry timeouts),
so ``ls -f`` and ``find`` make no HEAD; what is stat'ed is looked up, and a lookup, getattr or
open HEADs it. The price: until then an object of another type (a symlink, a FIFO, written with
x-oss-meta-mode) shows as a regular file in the entry's d_type. A directory of at most
LISTED_ATTRS_ABOVE entries keeps full attributes from parallel HEADs (``ls -l`` of it costs no
request per file after the listing). ``ls -l`` of a big directory stats the entries of each
getdents call (~200: several readdir batches) after it: once a second of the listed-only nodes
handed out since is looked up, the rest of them (at most STAT_AHEAD) are HEADed together
(:func:`head_parallel` at once, :meth:`stat_ahead`), so it costs a HEAD per entry, mostly in parallel;
a lone ``stat`` HEADs only its own name.

A readdir step resolves SETTLE_BATCH entries into nodes (a reply holds ~25); when one of them
needs a HEAD, the entries up to READDIR_BATCH ahead that need one are HEADed with it (one
parallel batch; the answers wait for the steps that hand those entries out). Nodes made for a
step that the kernel did not take are dropped at the handle's next readdir call or its release,
unless something else holds them by then (review A15) or that next call hands them out again."""
from __future__ import annotations

import errno
import functools
import logging
import time
from typing import Callable

from ..aio import run_all
from ..attrcache import RememberedAttrs
from ..integrity import LIST_DIR
from ..store.base import ObjectInfo, ObjectStore, StoreError
from ..store.health import StoreOffline
from .errors import ErrorsOnce, FsError, errno_of, store_request
from .inodes import InodeTable
from .model import DirEntry, DirHandle, Node, name_settled
from .namecache import NameCache
from .naming import Naming, join, parent_of, valid_listed_name
from .offline import offline_entries
from .resolve import MOVE_RETRIES, UNLOCKED_TRIES, PathMoved, Resolver

log = logging.getLogger(__name__)

# HEADs at once when a listing needs attributes (ossfs: 20): near the store, HEAD_PARALLEL (the
# client's CPU bounds the batch, more threads only contend for the GIL: 64 made a 2,000-entry
# `ls -l` 10-15 % slower at 0 ms added delay); from FAR_ROUND_TRIP on, HEAD_PARALLEL_FAR
# (latency bounds it: 64 made it 10 % faster at 10 ms). bench/RESULTS.md, nineteenth session.
HEAD_PARALLEL = 32
HEAD_PARALLEL_FAR = 64  # at most the OSS store's threads (connections)
FAR_ROUND_TRIP = 0.005  # seconds a HEAD takes lately (StoreCounters.round_trip)
READDIR_BATCH = 256  # entries whose attributes are fetched together (head_parallel() at once)
# entries resolved into nodes per readdir step: a reply holds ~25 (4 KiB of readdirplus entries);
# resolving all READDIR_BATCH per step cost ~10x the daemon CPU of the entries the kernel took
SETTLE_BATCH = 32
# entries past which a directory's unknown names get listing attributes instead of HEADs (a
# directory the size of a source tree's keeps d_type exact and ls -l one HEAD per file in parallel)
LISTED_ATTRS_ABOVE = 4096
LISTED_BATCH = 32  # entries per readdir step from the listing alone (a 4 KiB reply holds ~25-30)
STAT_AHEAD = 256  # listed-only nodes handed out (per directory) that a second lookup HEADs together
# in a handle's HEAD answers (``_headed``), by identity: that HEAD was refused for good
_REFUSED = ObjectInfo("", -1, "", 0.0)
# keys of one listing step whose HEAD keeps failing (a 5xx after its retries, no answer) while
# the store answers, listed without their attributes as a refused one is; one more fails the
# step (a store throttling every HEAD: fail at once, not after every name's retries)
FAILING_HEADS_LISTED = 2


def head_parallel(store: ObjectStore) -> int:
    """How many HEADs a listing sends at once for its entries' attributes (see HEAD_PARALLEL)."""
    return HEAD_PARALLEL_FAR if store.counters.round_trip >= FAR_ROUND_TRIP else HEAD_PARALLEL


class DirectoryReader:
    """opendir/readdir/releasedir of one mount. ``staged_in(dir_path)``: this mount's
    not-yet-uploaded nodes directly in ``dir_path``."""

    def __init__(self, store: ObjectStore, naming: Naming, inodes: InodeTable, names: NameCache,
                 resolver: Resolver, staged_in: Callable[[str], list[Node]]):
        self.store = store
        self.naming = naming
        self.inodes = inodes
        self._errors = ErrorsOnce(log)  # refused HEADs: one ERROR line per directory
        self.names = names
        self.resolver = resolver
        self.staged_in = staged_in
        self._made: dict[int, list[Node]] = {}  # handle → nodes its last batch made
        self._listed_at: dict[int, float] = {}  # handle → monotonic start of its snapshot's listing
        # handle → {snapshot index: what its HEAD said}, for the entries of the last batch the
        # kernel has not taken yet: their nodes are dropped, the next call needs no new HEAD
        self._headed: dict[int, dict[int, ObjectInfo | None]] = {}
        # handle → {snapshot index: the HEAD an earlier mount kept of that entry's key}, and
        # how far the snapshot was looked up there (attrcache: one query per READDIR_BATCH)
        self._kept: dict[int, tuple[dict[int, RememberedAttrs], int]] = {}
        # directory path → (handle, the last STAT_AHEAD listed-only nodes handed out by id, inode
        # numbers of them looked up since): what stat_ahead HEADs together
        self._listed_batch: dict[str, tuple[int, dict[int, Node], set[int]]] = {}
        self._shadowed: set[str] = set()  # keys both an object and a prefix, said once each
        self._skipped: set[str] = set()  # keys no valid file name, said once each

    def opendir(self, node: Node) -> DirHandle:
        """A handle on directory ``node``; FsError(ENOTDIR) for anything else."""
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return self.inodes.add_handle(lambda fh: DirHandle(fh, node))

    def releasedir(self, fh: int) -> None:
        self.inodes.drop_handle(fh)
        self._drop_untaken(fh)
        self._listed_at.pop(fh, None)
        self._headed.pop(fh, None)
        self._kept.pop(fh, None)
        for path in [p for p, (owner, _, _) in self._listed_batch.items() if owner == fh]:
            del self._listed_batch[path]

    async def stat_ahead(self, node: Node) -> None:
        """``node`` (listed-only) is about to be looked up: when it is the second of the
        listed-only nodes its directory's readdir handed out since the last time to be, HEAD
        them together. A HEAD that fails here is left to the lookup of that name."""
        entry = self._listed_batch.get(parent_of(node.path))
        if entry is None or entry[1].get(id(node)) is not node:
            return
        entry[2].add(node.ino)
        if len(entry[2]) < 2:
            return  # a lone stat so far: its own HEAD only
        del self._listed_batch[parent_of(node.path)]

        async def read(n: Node) -> None:
            try:
                await self.resolver.reread(n)
            except FsError:
                pass  # logged; the lookup of that name asks again and reports it
        by_path = self.inodes.by_path  # a node replaced since (another type found) is not read again
        await run_all([functools.partial(read, n) for n in entry[1].values()
                       if n.listed_only and by_path.get(n.path) is n], head_parallel(self.store))

    def _drop_untaken(self, fh: int) -> None:
        """Drop the nodes the last batch of handle ``fh`` made that the kernel did not take."""
        for node in self._made.pop(fh, ()):
            self.inodes.maybe_drop(node)

    def _say_shadowed(self, key: str) -> None:
        """One WARNING (every listing meets it again) for object ``key`` that is also a prefix
        (of objects, or of this mount's files not uploaded yet)."""
        if key not in self._shadowed:
            self._shadowed.add(key)
            log.warning("%r is both an object and a prefix; showing the object (what is below the prefix is "
                        "not reachable through this mount)", key)

    async def list_entries(self, node: Node) -> list[DirEntry]:
        """Snapshot of a directory: (name, known node, listing info, is_dir), sorted by name.
        A rename of the directory (or of one above it) running or done while it was listed:
        listed again at its new path (the old prefix empties page by page as the rename's
        copies are deleted). Raises FsError(EIO) when a listing request fails."""
        return await self.resolver.at_current_path(node, lambda path: self._list_at(node, path))

    async def _list_at(self, node: Node, path: str) -> list[DirEntry]:
        """:meth:`list_entries` at ``path``; PathMoved when ``node`` left it meanwhile."""
        dkey = self.naming.dir_key(path)
        # Taken before listing: a file whose upload finishes while we list is in one or the other.
        local = self.staged_in(path)
        files: dict[str, ObjectInfo] = {}
        dirs: set[str] = set()
        marker = None
        while True:
            try:
                page = await self.store.list(dkey, delimiter="/", marker=marker)
            except StoreOffline:
                return offline_entries(node, self.inodes, self.naming, self.store)
            except StoreError as e:
                log.error("listing %r failed: %s", dkey, e)
                raise FsError(errno_of(e)) from None
            for o in page.objects:
                name = o.key[len(dkey):]
                if name:  # "" is the directory's own marker
                    files[name] = o
            for p in page.prefixes:
                if p[len(dkey):-1] == LIST_DIR:  # integrity tag lists (docs/integrity.md): not shown
                    continue
                if self.resolver.removed_dir is not None and await store_request(self.resolver.removed_dir(p), p):
                    continue  # rmdir'ed here; only unlinked open files' objects are left below it
                dirs.add(p[len(dkey):-1])
            if node.name_going is not None or node.path != path:
                raise PathMoved(path)
            if page.next_marker is None:
                break
            marker = page.next_marker
        entries: dict[str, DirEntry] = {}
        for name in dirs:
            entries[name] = (name, None, None, True)
        for name, o in files.items():
            if self.resolver.pending_delete(o):
                continue  # an unlinked file's object awaiting its delete (a directory may share its name)
            if name in dirs and valid_listed_name(name):  # (an invalid one is skipped below, said so)
                if await self.resolver.hidden_file(o):
                    continue  # plaintext_objects = "hide" hides the object: the directory shows (a trial)
                if node.name_going is not None or node.path != path:
                    raise PathMoved(path)  # (renamed while that HEAD was out)
                self._say_shadowed(dkey + name)
                self.names.note_shadowing(join(path, name))
            entries[name] = (name, None, o, False)
        for d in local:  # files not uploaded yet (still linked here: checked again after the awaits)
            if not d.unlinked and parent_of(d.path) == path:
                entries[d.name] = (d.name, d, None, d.is_dir)
        for name in self.resolver.dirs_with_staged(path):
            if name not in entries:
                entries[name] = (name, None, None, True)  # only files not uploaded yet below it
            elif not entries[name][3]:  # another client's file took the name (trial Y: no word)
                self._say_shadowed(dkey + name)
        self.names.set_children(node, entries)
        if files or dirs:  # the store shows it now (module doc of fs/resolve.py)
            self.resolver.seen_below(path, dir_itself=True)
        node.subdirs = sum(1 for e in entries.values() if e[3])  # st_nlink = 2 + subdirectories
        result = []
        for name in sorted(entries):
            if not valid_listed_name(name):
                key = dkey + name + ("/" if entries[name][3] else "")  # a prefix as listed ("a//": not "a/")
                if key not in self._skipped:  # every listing meets it again: one line is enough
                    self._skipped.add(key)
                    log.warning("skipping key %r: not a valid file name", key)
                continue
            result.append(entries[name])
        return result

    async def _head_all(self, keys: list[str], refused: dict[int, StoreError] | None,
                        dir_path: str) -> list[ObjectInfo | None]:
        """``store.head_many`` of ``keys`` for a listing of ``dir_path``. With ``refused`` (a
        dict), a key whose HEAD fails for good goes there, and so do up to
        FAILING_HEADS_LISTED keys whose HEAD fails for now (a 5xx after its retries, no answer)
        while the store answers (not offline): the others are answered (a trial: one object
        the store kept answering 503 made its whole directory unlistable). Raises FsError (one
        ERROR line) when more fail, or any with ``refused`` None, or the store is offline."""
        failed: dict[int, StoreError] | None = {} if refused is not None else None
        try:
            infos = await self.store.head_many(keys, head_parallel(self.store), failed)
        except StoreError as e:
            log.error("listing %r fails: HEAD %r failed: %s", self.naming.dir_key(dir_path), e.key, e)
            raise FsError(errno_of(e)) from None
        if failed and refused is not None:
            for_now = [e for e in failed.values() if e.temporary]
            if len(for_now) > FAILING_HEADS_LISTED:
                first = for_now[0]
                log.error("listing %r fails: HEAD %r failed: %s (and %d more)", self.naming.dir_key(dir_path),
                          first.key, first, len(for_now) - 1)
                raise FsError(errno_of(first))
            refused.update(failed)
        return infos

    async def readdir_entries(self, h: DirHandle, start: int, relist: bool = False,
                              moves: int = 0) -> list[tuple[int, str, Node]]:
        """Entries of the snapshot (taken anew when ``relist``: a rewind) from index ``start``
        on (at most SETTLE_BATCH, LISTED_BATCH for a big directory), as (index+1, name, node)
        with the node resolved: attributes from the listing when the store's listing carries
        metadata, else from HEADs (with those of the next READDIR_BATCH entries that need one),
        at most HEAD_PARALLEL at once.
        The caller raises the lookup count of each node it hands to the kernel. Raises
        FsError(EIO) when the listing fails, or an entry's HEAD fails for a temporary reason
        (or any, while plaintext objects are hidden); an entry whose HEAD is refused for good
        is served from the listing (module doc). One log line naming a key.
        ``moves``: how many times a rename of the directory made this call start again."""
        # the last batch's nodes the kernel did not take: reused if this batch has them (the
        # kernel's next call starts where its reply buffer ran full), else dropped (below)
        nodes = self.inodes.nodes  # (a node the kernel took and forgot since is gone from it)
        untaken = [n for n in self._made.pop(h.fh, ()) if n.lookups <= 0 and nodes.get(n.ino) is n]
        if h.entries is None or relist:
            listed_at = time.monotonic()
            h.entries = await self.list_entries(h.node)
            h.entries_path = h.node.path  # list_entries returned at once: the path it listed
            self._listed_at[h.fh] = listed_at
            self._headed.pop(h.fh, None)
            self._kept.pop(h.fh, None)
        listed_at = self._listed_at.get(h.fh, 0.0)
        headed = self._headed.setdefault(h.fh, {})
        for k in [k for k in headed if k < start]:
            del headed[k]  # taken by the kernel (or skipped over)
        from_listing = (not self.store.listing_has_metadata and len(h.entries) > LISTED_ATTRS_ABOVE
                        and self.resolver.plaintext_objects != "hide")  # hiding needs each object's metadata
        batch = h.entries[start:start + (LISTED_BATCH if from_listing else SETTLE_BATCH)]
        resolved: dict[int, Node] = {}
        by_path = self.inodes.by_path
        resolver = self.resolver

        def settle(i: int, path: str, is_dir: bool, info: ObjectInfo | None) -> None:
            """Entry ``i`` at ``path`` is what ``info`` (listing or HEAD) says: its node."""
            if not is_dir and info is None:
                return  # deleted since the listing
            if is_dir or info is None or not resolver.hidden(info):
                resolver.seen_below(path)
            node = by_path.get(path)
            if node is not None and (node.is_dir == is_dir):
                if not is_dir:
                    resolver.refresh(node, info)
                resolved[i] = node
            else:
                if info is not None and not is_dir and resolver.hidden(info):
                    return
                resolved[i] = made = resolver.node_from_info(path, info, is_dir)
                self._made.setdefault(h.fh, []).append(made)

        def refused_entry(path: str, node: Node | None, listed: ObjectInfo | None, is_dir: bool) -> Node:
            """The node of an entry whose HEAD was refused for good (module doc): a known one as
            last read, else one from the listing alone."""
            if node is not None and node.is_dir == is_dir and not node.listed_only:
                return node
            return self._from_listing(h.fh, path, node, listed, is_dir)

        # entries whose attributes need a HEAD: (batch index, path, is_dir, key)
        to_head: list[tuple[int, str, bool, str]] = []
        await name_settled(h.node)  # a rename of it runs: the entries' paths are its new ones
        dir_path = h.node.path
        if h.entries_path != dir_path:
            # renamed since the snapshot: its names stand (the offsets stay), but what the
            # listing and the HEADs said is about the keys the names left: asked again
            h.entries = [(name, known, None, is_dir) for name, known, _listed, is_dir in h.entries]
            h.entries_path = dir_path
            headed.clear()
            batch = h.entries[start:start + len(batch)]
        moved = False
        kept = self._kept_rows(h, start, dir_path) if not from_listing else {}
        for i, (name, known, listed, is_dir) in enumerate(batch):
            if known is not None:
                resolved[i] = known
                continue
            path = join(dir_path, name)
            node = by_path.get(path)
            if from_listing and start + i not in headed and (node is None or node.listed_only):
                resolved[i] = self._from_listing(h.fh, path, node, listed, is_dir)
            elif node is not None and (is_dir or resolver.attrs_fresh(node)):
                resolved[i] = node
            elif node is not None and listed is not None and resolver.note_listed(node, listed, listed_at):
                resolved[i] = node  # the listing shows the version it holds: no HEAD
            elif listed is not None and self.store.listing_has_metadata:
                settle(i, path, is_dir, listed)  # the listing said all a HEAD would
            elif headed.get(start + i) is _REFUSED:
                resolved[i] = refused_entry(path, node, listed, is_dir)
            elif start + i in headed:
                settle(i, path, is_dir, headed[start + i])  # HEADed by an earlier call of this listing
            elif node is None and listed is not None and resolver.kept_proves(kept.get(start + i), listed):
                resolved[i] = made = resolver.node_from_kept(path, listed, kept[start + i], listed_at)
                self._made.setdefault(h.fh, []).append(made)  # an earlier mount's HEAD of this version
            else:
                to_head.append((i, path, is_dir, self.naming.dir_key(path) if is_dir else self.naming.key(path)))
        if to_head and not from_listing:
            # HEAD ahead: the entries of the next steps up to READDIR_BATCH that will need one,
            # in the same parallel batch (their answers wait in ``headed`` for those steps)
            ahead = h.entries[start + len(batch):start + READDIR_BATCH]
            for j, (name, known, listed, is_dir) in enumerate(ahead, len(batch)):
                if known is not None or start + j in headed:
                    continue
                path = join(dir_path, name)
                node = by_path.get(path)
                if node is not None and (is_dir or resolver.attrs_fresh(node)
                                         or (listed is not None and resolver.listing_proves(node, listed))):
                    continue
                if listed is not None and self.store.listing_has_metadata:
                    continue
                if node is None and listed is not None and resolver.kept_proves(kept.get(start + j), listed):
                    continue  # its step makes it from the kept HEAD
                to_head.append((j, path, is_dir, self.naming.dir_key(path) if is_dir else self.naming.key(path)))
        try:
            if to_head:
                refused: dict[int, StoreError] | None = {} if resolver.plaintext_objects != "hide" else None
                infos = await self._head_all([t[3] for t in to_head], refused, dir_path)
                # renamed meanwhile: the answers are about keys its names left (nodes made from
                # them would keep the old paths); asked again at the new ones below
                moved = h.node.name_going is not None or h.node.path != dir_path
                if refused and not moved:
                    first = next(iter(refused.values()))
                    dkey = self.naming.dir_key(dir_path)
                    # (refused: for good, AccessDenied say; failed: for now, no answer or a 5xx; trial AG)
                    self._errors.error("listing %r: HEAD %r %s: %s; %d name(s) listed without their "
                                       "attributes (a stat or open of one asks again)", dkey, first.key,
                                       "failed" if first.temporary else "refused", first,
                                       len(refused), same=("refused", dkey))  # once: ls lists it anew each time
                for k, ((i, path, is_dir, _key), info) in enumerate(zip(to_head, infos, strict=True)):
                    if moved:
                        break
                    if refused and k in refused:
                        headed[start + i] = _REFUSED
                        if i < len(batch):
                            resolved[i] = refused_entry(path, by_path.get(path), batch[i][2], is_dir)
                        continue
                    headed[start + i] = info
                    if i < len(batch):
                        settle(i, path, is_dir, info)
                if not moved:
                    resolver.keep([info for (_i, _p, is_dir, _k), info in zip(to_head, infos, strict=True)
                                   if info is not None and not is_dir])
        finally:
            reused = {id(n) for n in resolved.values()}
            for n in untaken:
                if id(n) in reused:
                    self._made.setdefault(h.fh, []).append(n)
                else:
                    self.inodes.maybe_drop(n)
        if moved:
            headed.clear()
            if moves + 1 >= MOVE_RETRIES:
                raise FsError(errno.EIO, "the directory kept moving")
            if moves + 1 < UNLOCKED_TRIES:
                return await self.readdir_entries(h, start, moves=moves + 1)
            await name_settled(h.node)
            async with self.resolver.locks.hold(names=[h.node.path]):  # renames of it wait: no starving
                return await self.readdir_entries(h, start, moves=moves + 1)
        if from_listing:
            entry = self._listed_batch.get(h.node.path)
            if entry is None or entry[0] != h.fh:
                entry = self._listed_batch[h.node.path] = (h.fh, {}, set())
            handed = entry[1]
            for n in resolved.values():
                if n.listed_only:
                    handed[id(n)] = n
            while len(handed) > STAT_AHEAD:
                del handed[next(iter(handed))]  # the oldest: ls stats as it reads
        return [(start + i + 1, name, resolved[i]) for i, (name, *_rest) in enumerate(batch) if i in resolved]

    def _kept_rows(self, h: DirHandle, start: int, dir_path: str) -> dict[int, RememberedAttrs]:
        """The HEADs an earlier mount kept (``attrcache``) of the files of snapshot ``h``'s
        entries, by snapshot index, looked up up to READDIR_BATCH entries past ``start``
        (the entries this call and its HEAD-ahead may need), each entry once per snapshot."""
        cache = self.resolver.attr_cache
        if cache is None or h.entries is None:
            return {}
        rows, done = self._kept.get(h.fh, ({}, 0))
        end = min(len(h.entries), start + READDIR_BATCH)
        if end > done:
            by_path = self.inodes.by_path
            wanted = {self.naming.key(join(dir_path, name)): i for i, (name, known, listed, is_dir)
                      in enumerate(h.entries[max(done, start):end], max(done, start))
                      if known is None and listed is not None and not is_dir
                      and by_path.get(join(dir_path, name)) is None}
            for key, row in cache.get_many(list(wanted)).items():
                rows[wanted[key]] = row
            self._kept[h.fh] = (rows, end)
        return rows

    def _from_listing(self, fh: int, path: str, node: Node | None, listed: ObjectInfo | None,
                      is_dir: bool) -> Node:
        """The node for listing entry ``path`` without a HEAD (module doc): ``node`` when it is a
        ``listed_only`` node of the same kind (its size and mtime taken from this listing), else
        a new ``listed_only`` node, dropped at handle ``fh``'s next call unless the kernel took it."""
        if node is not None and node.is_dir == is_dir:
            if listed is not None and node.staged is None:
                node.size = listed.size
                node.mtime_ns = node.ctime_ns = int(listed.mtime * 1e9)
            return node
        made = self.resolver.node_from_listing(path, listed, is_dir)
        self._made.setdefault(fh, []).append(made)
        return made
