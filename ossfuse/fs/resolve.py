"""Finding out what is at a path: asking the store (probe), turning the answer into a node,
and deciding when a node's attributes are fresh enough to answer without asking.

A listing entry proves a known file's attributes current when it shows the version the node
holds: same ETag, size and Last-Modified second (a metadata-only CopyObject keeps the ETag on
OSS but not the Last-Modified). So a stale file is revalidated by listing one page of its
directory from its own name on (:meth:`Resolver.revalidate_from_listing`), which proves the
names after it too: ``cat *``, ``rm -r``, ``ls -l`` walk a directory in name order and need one
LIST per page instead of one HEAD per file. Only a HEAD answered in a later second than the
version's Last-Modified (its ``Date``: :func:`objmeta.proof_mtime`) can be proved so: a
metadata copy by another client in the same second as the version's last change keeps the
ETag, the size and the Last-Modified second (one-second resolution), so what a HEAD read in
that second may be outdated by one a listing cannot tell apart; such a file is HEADed again.

Freshness counts from the answer, not from when the question was sent (as the kernel counts
its own timeouts from our reply): on a store slower than ``attr_timeout`` an answer counted
from its request would be stale on arrival. And whatever the store shows below a directory
(an object a HEAD or listing found, a directory's own entries) proves that directory and those
above it exist as of that answer: their nodes count as read then (:meth:`Resolver.seen_below`).
Without that, each stat of a path revalidated every directory on it once the walk itself took
longer than ``attr_timeout``: with 1.5 s per request an ``ls -l`` of 20 files two levels down
took 7 min 48 s (each directory's probe is a HEAD, a one-key LIST and a marker HEAD). What a
directory keeps so is its marker's mode, owner and mtime: another client's change of them is
seen once nothing below the directory was read for ``attr_timeout``."""
from __future__ import annotations

import errno
import logging
import stat
import time
from typing import Awaitable, Callable, TypeVar

import trio

from .. import envelope as env
from ..aio import run_all
from ..attrcache import AttrCache, RememberedAttrs
from ..integrity import LIST_DIR
from ..store.base import ListPage, NoSuchKey, ObjectInfo, ObjectStore, StoreError, same_etag
from ..store.health import StoreOffline, say_once_offline
from .errors import ErrorsOnce, FsError, errno_of
from .inodes import InodeTable
from .locks import NameLocks
from .model import ROOT_INO, Node, RecentVersions, Version, name_settled
from .namecache import NameCache, trusted_for
from .naming import Naming, base_name, join, parent_of
from .objmeta import AttrDefaults, is_hidden, is_plain_marker, proof_mtime, times_from_info, version_from_info

log = logging.getLogger(__name__)
T = TypeVar("T")

# versions that keep their user metadata (the envelope) after a HEAD: more than an `ls -l` then
# `cat` of one directory usually touches; each costs ~1.3 KiB (RSA-3072), the rest ~1 KiB less
RECENT_VERSIONS = 2048
# A store answer about a path a rename moved while it was awaited is asked again (PathMoved);
# after UNLOCKED_TRIES such tries, under the path's name lock, which a rename of the path or of
# a directory above it cannot take meanwhile: renames back to back cannot starve a lookup
UNLOCKED_TRIES = 3
MOVE_RETRIES = 16  # then EIO (only if the path moves again each time its lock is waited for)
KEPT_LISTED_MAX = 4 * 256  # names _kept_listed holds at most (then emptied: a lookup HEADs)
RELIST_PAGE = 256  # names listed to revalidate a stale file and the names after it (a small page: a lone stale file costs little more than its HEAD)


class PathMoved(Exception):
    """A rename moved the path a store answer is about while the answer was awaited (the
    directory above it, or the node itself): a node made or refreshed from it would keep the
    old path or a version that has left it. The caller waits for the rename and asks again."""


class HiddenObjectThere(FsError):
    """EEXIST of a new file's name where the bucket holds a plaintext object that
    ``plaintext_objects = "hide"`` hides (create-only, its upload would become a conflict
    copy: a trial's new file vanished a second after its close returned)."""


def _rewrapped(version: Version, info: ObjectInfo) -> bool:
    """Whether ``info`` (a HEAD of ``version``'s ETag) shows its data key wrapped anew: over OSS
    a rekey streams the same ciphertext back, so the ETag stays and only the envelope changes (a
    trial: the mount kept the old envelope for minutes, EACCES after the object was rekeyed back
    to a CMK it has, and a chmod that sent the old envelope, which OSS refused). A slim version
    holds no envelope to compare: it is filled from ``info``. An answer without an envelope
    (OSS refuses a copy that strips one) changes nothing here."""
    return version.held and env.rewrapped(version.metadata, info.metadata)


def _moved(path: str, parent: Node | None, known: Node | None) -> bool:
    """Whether ``path`` (a child of ``parent``, the node ``known`` had it) moves or moved."""
    return ((parent is not None and (parent.name_going is not None or join(parent.path, base_name(path)) != path))
            or (known is not None and (known.name_going is not None or known.path != path)))


class Resolver:
    """Lookups of one mount. ``attr_timeout``: seconds a node's attributes read from the store
    are trusted; ``plaintext_objects``: the ``encryption.plaintext_objects`` setting;
    ``pending_delete(info)``: whether an object is a version this mount unlinked whose delete
    is still pending (``DeferredDeletes.hides``): not shown."""

    def __init__(self, store: ObjectStore, naming: Naming, inodes: InodeTable, names: NameCache,
                 defaults: AttrDefaults, *, attr_timeout: float, plaintext_objects: str,
                 pending_delete: Callable[[ObjectInfo], bool] = lambda info: False,
                 removed_dir: Callable[[str], Awaitable[bool]] | None = None):
        self.store = store
        self.naming = naming
        self.inodes = inodes
        # the mount's name and tree locks (fs/locks.py): Namespace's changes take them; a lookup
        # takes one only when renames keep moving its path (UNLOCKED_TRIES)
        self.locks = NameLocks()
        self.names = names
        self.defaults = defaults
        self.attr_timeout = attr_timeout
        self.plaintext_objects = plaintext_objects
        self._errors = ErrorsOnce(log)
        # path → key of the plaintext object plaintext_objects = "hide" hides there, as the
        # last probe of that path found it (check_absent: a new file would collide with it;
        # as fresh as the negative cache entry that probe made)
        self._hidden_files: dict[str, str] = {}
        # versions read from the store lately keep their metadata; older unopened ones are slim
        self.recent = RecentVersions(RECENT_VERSIONS)
        # directory key → (listing done, monotonic start) of a revalidating LIST in flight
        self._relisting: dict[str, tuple[trio.Event, float]] = {}
        # path → (listing entry, kept HEAD, monotonic answer time, the directory's node then) of
        # names without a node that a revalidating LIST page proved from the attribute cache,
        # until their lookup (used only while that directory node is still at its path: a
        # rename or rmdir of it, then a mkdir there, leaves another node)
        self._kept_listed: dict[str, tuple[ObjectInfo, RememberedAttrs, float, Node | None]] = {}
        self.pending_delete = pending_delete
        # removed_dir(dkey): a prefix left only by pending deletes of a directory this mount removed
        self.removed_dir = removed_dir
        # attributes HEADs read, kept across mounts (attrcache; set by Filesystem on a store
        # whose listings carry no metadata): a listing that shows the same version proves them
        self.attr_cache: AttrCache | None = None
        # set by Filesystem: the names of the subdirectories of a directory path that hold this
        # mount's files not uploaded yet, somewhere below (UploadScheduler.dirs_holding_staged_below):
        # directories whatever the store shows
        self.dirs_with_staged: Callable[[str], set[str]] = lambda dir_path: set()
        # set by Filesystem: DirectoryReader.stat_ahead, called before a listed-only node is
        # looked up (HEADs its readdir batch together once a second one of it is looked up)
        self.stat_ahead: Callable[[Node], Awaitable[None]] | None = None

    def hidden(self, info: ObjectInfo) -> bool:
        """Whether object ``info`` is not shown (by its metadata, or as an unlinked version)."""
        return is_hidden(info, self.plaintext_objects) or self.pending_delete(info)

    async def hidden_file(self, listed: ObjectInfo) -> bool:
        """Whether ``plaintext_objects = "hide"`` hides the object of listing entry ``listed``
        (a HEAD asks when the listing gave no metadata; False when it fails: the object shows,
        as a name never disappears on a failure; True when it is gone)."""
        if self.plaintext_objects != "hide":
            return False
        info: ObjectInfo | None = listed
        if listed.metadata_unknown:
            try:
                info = await self.store.head(listed.key)
            except StoreError:
                return False
        return info is None or is_hidden(info, self.plaintext_objects)

    def attrs_fresh(self, node: Node) -> bool:
        """Whether ``node``'s attributes may be used without asking the store: read less than
        attr_timeout ago (longer on a slow store: :func:`namecache.trusted_for`), or this
        mount's own (staged data, the root); never when guessed from a listing
        (``listed_only``)."""
        if node.listed_only:
            return False
        return (node.staged is not None or node.ino == ROOT_INO
                or time.monotonic() - node.checked_at < trusted_for(self.attr_timeout, self.store))

    @staticmethod
    def listing_proves(node: Node, listed: ObjectInfo) -> bool:
        """Whether listing entry ``listed`` of ``node``'s key shows the very version whose
        attributes ``node`` holds (module doc): a clean file whose version a HEAD described
        (answered in a later second than its Last-Modified), same ETag, size and Last-Modified
        second."""
        v = node.version
        return (v is not None and node.staged is None and not node.is_dir and v.modified > 0
                and v.key == listed.key and v.size == listed.size and int(v.modified) == int(listed.mtime) and same_etag(v.etag, listed.etag))

    def note_listed(self, node: Node, listed: ObjectInfo, listed_at: float) -> bool:
        """``node`` was seen in a listing that started at ``listed_at`` (monotonic s): if the
        entry proves its attributes, they count as read then. Returns whether it did."""
        if not self.listing_proves(node, listed):
            return False
        node.checked_at = max(node.checked_at, listed_at)
        return True

    def seen_below(self, path: str, dir_itself: bool = False) -> None:
        """The store just showed something at ``path`` (``dir_itself``: in the directory at
        ``path``): the directories above it (and that one) exist now, so their nodes count as
        read now (module doc). A directory known only from a listing (``listed_only``) still
        needs its own probe (its marker's attributes), and one being renamed is left alone."""
        now, by_path = time.monotonic(), self.inodes.by_path
        if not dir_itself:
            path = parent_of(path)
        while path:
            node = by_path.get(path)
            if node is not None and node.is_dir and not node.listed_only and node.name_going is None:
                node.checked_at = max(node.checked_at, now)
            path = parent_of(path)

    def keep(self, infos: list[ObjectInfo]) -> None:
        """HEAD answers about files: kept across mounts (``attrcache``) when they can be; the
        rows of the others dropped (a stale row costs a lookup a LIST before its HEAD)."""
        if self.attr_cache is not None:
            keepable = [i for i in infos if i.etag and proof_mtime(i) > 0 and AttrCache.keepable(i.metadata)]
            self.attr_cache.put_many([(i.key, i.etag, i.size, i.mtime, i.metadata) for i in keepable])
            if len(keepable) < len(infos):
                kept = {id(i) for i in keepable}
                self.attr_cache.forget([i.key for i in infos if id(i) not in kept])

    def kept_proves(self, kept: RememberedAttrs | None, listed: ObjectInfo) -> bool:
        """Whether a kept HEAD answer is about the version listing entry ``listed`` shows (the
        rule of :meth:`listing_proves`: same ETag, size and Last-Modified second)."""
        return (kept is not None and kept.size == listed.size and int(kept.modified) == int(listed.mtime)
                and same_etag(kept.etag, listed.etag))

    def node_from_kept(self, path: str, listed: ObjectInfo, kept: RememberedAttrs, listed_at: float) -> Node:
        """A new node for listing entry ``path`` from the HEAD an earlier mount kept of that
        version (the caller checked :meth:`kept_proves`): its attributes as that HEAD said
        (this mount's defaults where it carried none), a slim version (``Version.slim_of``:
        an open HEADs the envelope), read as of the listing (``listed_at``, monotonic s)."""
        info = ObjectInfo(listed.key, kept.size, kept.etag, kept.modified, kept.attrs)
        mode, uid, gid, mtime = self.defaults.attrs_from_info(info, False)
        node = self.inodes.new_node(path, mode, uid, gid, mtime, kept.size, found=True)
        node.ctime_ns, node.atime_ns = times_from_info(info, mtime)
        node.version = Version.slim_of(listed.key, kept.etag, kept.size, kept.modified)
        node.checked_at = listed_at
        return node

    async def revalidate_from_listing(self, node: Node) -> bool:
        """Prove a stale file's attributes current with one LIST page of its directory starting
        at its name (:meth:`_list_page_from`). False when the page does not prove it (another
        version, gone, a version this mount made and never HEADed, or the LIST failed): the
        caller HEADs it."""
        v = node.version
        if node.is_dir or node.staged is not None or v is None or v.modified <= 0 or not node.path:
            return False
        return await self._list_page_from(parent_of(node.path), self.naming.key(node.path),
                                          lambda started: node.checked_at >= started)

    async def _from_kept(self, path: str) -> tuple[ObjectInfo, RememberedAttrs, float] | None:
        """For a lookup of ``path``, which has no node: (listing entry, kept HEAD, monotonic
        time of the listing's answer) when an earlier mount kept a HEAD (``attrcache``) of the
        version a listing shows there: the one page :meth:`_list_page_from` takes from its
        name, or one taken by a lookup of a name before it less than attr_timeout ago (``rsync``
        and ``git status`` stat a tree's files in name order: one LIST per RELIST_PAGE names,
        not a HEAD each). None: a HEAD is needed."""
        assert self.attr_cache is not None

        def listed(since: float) -> tuple[ObjectInfo, RememberedAttrs, float] | None:
            entry = self._kept_listed.get(path)
            if entry is None or entry[2] < since or self.inodes.by_path.get(parent_of(path)) is not entry[3]:
                return None
            return entry[0], entry[1], entry[2]
        found = listed(time.monotonic() - trusted_for(self.attr_timeout, self.store))
        self._kept_listed.pop(path, None)
        if found is not None:
            return found
        key = self.naming.key(path)
        if not self.attr_cache.get_many([key]):
            return None  # nothing kept: HEAD it
        if await self._list_page_from(parent_of(path), key, lambda started: listed(started) is not None):
            found = listed(0.0)
            self._kept_listed.pop(path, None)
            return found
        return None

    async def _list_page_from(self, dir_path: str, key: str, proved: Callable[[float], bool]) -> bool:
        """One LIST page of directory ``dir_path`` from ``key`` on (RELIST_PAGE names), and what
        it proves as of its answer: the known files whose version it shows (:meth:`note_listed`)
        and, for names without a node, the HEADs an earlier mount kept of the versions it shows
        (``_kept_listed``, for their lookups). One such LIST per directory at a time: a caller
        that finds one running waits for it and asks ``proved(started)`` (``started``: the
        monotonic start of that LIST) whether it proved what it needs, else lists itself.
        Returns ``proved(started)`` of its own LIST (False when the LIST failed)."""
        dkey = self.naming.dir_key(dir_path)
        pending = self._relisting.get(dkey)
        if pending is not None:
            await pending[0].wait()
            if proved(pending[1]):
                return True
        done, started = trio.Event(), time.monotonic()
        self._relisting[dkey] = (done, started)
        dir_node = self.inodes.by_path.get(dir_path)
        try:
            # keys after key[:-1]: ``key`` and what follows it (plus any names between the two);
            # a one-letter name lists from the directory's start (a marker ending in the
            # delimiter would name a common prefix)
            marker = key[:-1] if len(key) - 1 > len(dkey) else None
            page = await self.store.list(dkey, delimiter="/", marker=marker, max_keys=RELIST_PAGE)
        except StoreError:
            return False  # the HEAD that follows reports the failure
        finally:
            if self._relisting.get(dkey) == (done, started):
                del self._relisting[dkey]
            done.set()  # (the waiters run once this task awaits again: after the notes below)
        by_path, answered = self.inodes.by_path, time.monotonic()
        unknown = {join(dir_path, o.key[len(dkey):]): o for o in page.objects
                   if by_path.get(join(dir_path, o.key[len(dkey):])) is None and not self.pending_delete(o)}
        kept = self.attr_cache.get_many([o.key for o in unknown.values()]) if self.attr_cache and unknown else {}
        if len(self._kept_listed) > KEPT_LISTED_MAX:
            self._kept_listed.clear()
        for o in page.objects:
            path = join(dir_path, o.key[len(dkey):])
            n = by_path.get(path)
            if n is not None:
                self.note_listed(n, o, answered)
            elif path in unknown and self.kept_proves(kept.get(o.key), o):
                self._kept_listed[path] = (o, kept[o.key], answered, dir_node)
        if page.objects and by_path.get(dir_path) is dir_node:  # (not renamed meanwhile)
            self.seen_below(dir_path, dir_itself=True)
        return proved(started)

    async def probe(self, path: str, was_dir: bool = False) -> tuple[ObjectInfo | None, bool] | None:
        """What is at ``path`` in the store: (object info, False) for a file, (marker info or
        None, True) for a directory, None for nothing. A file wins over a same-named dir.
        ``was_dir``: a directory was there (revalidating its node): the file HEAD, the one-key
        LIST and the marker HEAD go out together (one round trip instead of three, the same
        requests); else the file HEAD first, as most names looked up are files.
        Raises StoreError."""
        key, dkey = self.naming.key(path), self.naming.dir_key(path)
        info: ObjectInfo | None = None
        page: ListPage | None = None
        marker: ObjectInfo | None = None
        together = was_dir and base_name(path) != LIST_DIR

        async def head_file() -> None:
            nonlocal info
            info = await self.store.head(key)

        async def list_dir() -> None:
            nonlocal page
            page = await self.store.list(dkey, delimiter="/", max_keys=1)

        async def head_marker() -> None:
            nonlocal marker
            marker = await self.store.head(dkey)

        await (run_all([head_file, list_dir, head_marker], 3) if together else head_file())
        self._hidden_files.pop(path, None)
        if info is not None and not self.hidden(info):
            return info, False
        if info is not None and is_hidden(info, self.plaintext_objects):
            if len(self._hidden_files) >= 256:
                self._hidden_files.clear()
            self._hidden_files[path] = info.key  # (check_absent: a new file there would collide)
        # nothing (or a hidden object, e.g. an unlinked file's awaiting its delete): a directory?
        if base_name(path) == LIST_DIR:
            return None  # integrity tag lists (docs/integrity.md): not a directory of the mount
        if page is None:
            await list_dir()
        assert page is not None
        if page.objects or page.prefixes:
            if self.removed_dir is not None and await self.removed_dir(dkey):
                return None  # rmdir'ed here; only unlinked open files' objects are left below it
            if not (page.objects and page.objects[0].key == dkey):
                return None, True  # implicit: no marker
            if not together:
                await head_marker()
            return marker, True
        if base_name(path) in self.dirs_with_staged(parent_of(path)):
            return None, True  # only this mount's files not uploaded yet are below it: implicit
        return None

    async def lookup(self, parent: Node, name: str) -> Node:
        """The child ``name`` of ``parent`` with its lookup count raised by one.
        Raises FsError(ENOENT), FsError(EIO) when the store fails."""
        return self.inodes.remember(await self.existing(parent, name, looking_up=True))

    async def existing(self, parent: Node, name: str, *, looking_up: bool = False) -> Node:
        """The child ``name`` of ``parent`` (no lookup count). A rename of ``parent`` (or of a
        directory above it, or of the child) running or done while the store was asked: asked
        again at the new path (:meth:`at_current_path`). Raises FsError(ENOENT/EIO)."""
        async def ask(path: str) -> Node:
            node = self.inodes.by_path.get(path)
            if looking_up and node is None:
                self.naming.check_new_path(path, creating=False)  # a name that cannot be a key cannot exist: no request
            elif looking_up and node is not None and node.listed_only and self.stat_ahead is not None:
                await self.stat_ahead(node)
                node = self.inodes.by_path.get(path)
            if node is None or not self.attrs_fresh(node):
                node = await self._resolve_settled(path, node, parent)
            if node is None:
                raise FsError(errno.ENOENT)
            return node
        return await self.at_current_path(parent, ask, name)

    async def check_absent(self, parent: Node, name: str, is_dir: bool = False) -> None:
        """A new entry ``name`` may be made in ``parent``: FsError(EEXIST) if something is
        there, EINVAL/ENAMETOOLONG if the name cannot be a key, EIO if the store fails."""
        async def ask(path: str) -> None:
            self.naming.check_new_path(path, is_dir)
            node = self.inodes.by_path.get(path)
            if node is not None and not node.unlinked and (node.staged is not None or self.attrs_fresh(node)):
                raise FsError(errno.EEXIST)
            if await self._resolve_settled(path, node, parent) is not None:
                raise FsError(errno.EEXIST)
            hidden = self._hidden_files.get(path)  # (the probe that put the name in the negative cache)
            if hidden is not None and not is_dir:  # (a directory is another key: it may be made)
                await self._refuse_hidden(path, hidden)
        await self.at_current_path(parent, ask, name)

    def hidden_at(self, path: str) -> bool:
        """Whether the last probe of ``path`` found a plaintext object ``plaintext_objects =
        "hide"`` hides there (the caller HEADs it before acting on that)."""
        return path in self._hidden_files

    async def _refuse_hidden(self, path: str, key: str) -> None:
        """A probe found the plaintext object ``key`` that ``plaintext_objects = "hide"`` hides
        at ``path``, where a new file is to be made: HiddenObjectThere (one WARNING naming it)
        while a HEAD still finds it hidden there; FsError(EEXIST) when another object took its
        place; nothing when it is gone (a trial: a create stayed refused after the object was
        deleted, until a remount: the parent's listing answered lookups without a probe).
        Raises FsError(EIO) when the store fails."""
        try:
            now = await self.store.head(key)
        except StoreError as e:
            self._errors.error("lookup of %r failed: %s", key, e)
            raise FsError(errno_of(e)) from None
        if now is None or not is_hidden(now, self.plaintext_objects):
            self._hidden_files.pop(path, None)
            if now is not None:
                self.names.note_present(path)
                raise FsError(errno.EEXIST)
            return
        self._errors.error("cannot make %r: the bucket holds %r there, a plaintext object plaintext_objects = "
                           "\"hide\" hides; remove or rename it with another client", path, key,
                           same=("hidden", key), level=logging.WARNING)
        raise HiddenObjectThere(errno.EEXIST)

    async def _resolve_settled(self, path: str, known: Node | None, parent: Node) -> Node | None:
        """:meth:`resolve`; on PathMoved, first waits until ``known``'s own rename or unlink is
        over (asked again at once, it would find it still going)."""
        try:
            return await self.resolve(path, known, parent)
        except PathMoved:
            if known is not None:
                await name_settled(known)
            raise

    async def at_current_path(self, node: Node, ask: Callable[[str], Awaitable[T]], name: str | None = None) -> T:
        """``await ask(path)`` at the current path of ``node`` (``name`` given: of its child
        ``name``), once no rename moves ``node``; ``ask`` raises PathMoved when a rename moved
        the path while the store answered, and is tried again at the new path (the last tries
        under the path's name lock: module constants). Raises what ``ask`` raises;
        FsError(EIO) after MOVE_RETRIES."""
        def current() -> str:
            return node.path if name is None else join(node.path, name)
        for attempt in range(MOVE_RETRIES):
            await name_settled(node)
            path = current()
            try:
                if attempt < UNLOCKED_TRIES:
                    return await ask(path)
                async with self.locks.hold(names=[path]):
                    if node.name_going is None and current() == path:
                        return await ask(path)
            except PathMoved:
                continue
        raise FsError(errno.EIO, "the path kept moving")

    async def reread(self, node: Node) -> Node | None:
        """:meth:`resolve` of ``node``'s path with ``node`` known, asked again at its new path
        when a rename moves it meanwhile. Raises FsError(EIO) as :meth:`resolve`."""
        return await self.at_current_path(node, lambda path: self.resolve(path, node))

    async def resolve(self, path: str, known: Node | None, parent: Node | None = None) -> Node | None:
        """What is at ``path`` now, from the store (or the negative cache, for
        ``entry_timeout`` seconds after the store said nothing is there). ``known``: the node
        the caller has for ``path``, refreshed in place when it is still of the same type;
        ``parent``: the directory ``path`` is in, when the caller has it.
        Raises FsError(EIO) when the store fails; PathMoved when a rename of ``parent`` or
        ``known`` ran while the store was asked (nothing is made or changed from the answer)."""
        by_path = self.inodes.by_path
        if known is None and (self.names.known_absent(path)
                              or await self.names.absent_from_listing(self.inodes.parent(path), path)):
            if _moved(path, parent, known):
                raise PathMoved(path)  # absent at the old path: says nothing of the new one
            return by_path.get(path)  # None, unless a task created it meanwhile
        if known is not None and by_path.get(path) is known and await self.revalidate_from_listing(known):
            return by_path.get(path)  # known, unless a task replaced or removed it meanwhile
        if known is None and self.attr_cache is not None and (kept := await self._from_kept(path)) is not None:
            if _moved(path, parent, known):
                raise PathMoved(path)
            current = by_path.get(path)
            if current is not None:
                return current  # another task resolved (or created) it while we waited
            self.seen_below(path)
            return self.node_from_kept(path, *kept)
        try:
            found = await self.probe(path, was_dir=known is not None and known.is_dir)
        except StoreOffline:
            return self.offline_answer(path, known)
        except StoreError as e:
            self._errors.error("lookup of %r failed: %s", self.naming.key(path), e)  # ls -l looks up twice
            raise FsError(errno_of(e)) from None
        if _moved(path, parent, known):
            raise PathMoved(path)
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
        self.seen_below(path)
        if not is_dir and info is not None:
            self.keep([info])
        if known is not None and stat.S_IFMT(known.mode) == stat.S_IFMT(self.defaults.attrs_from_info(info, is_dir)[0]):
            self.refresh(known, info)
            return known
        if known is not None and by_path.get(path) is known:
            del by_path[path]
        if known is None and info is not None and not is_dir and self.store.landed_over_ours(info.key, info):
            # this mount's own late request over the version of a file the kernel forgot: that
            # file, as last known, while the late-request check puts its version back (BT13)
            restored = self.inodes.restore(path)
            if restored is not None and not restored.is_dir:
                restored.checked_at = time.monotonic()
                return restored
        return self.node_from_info(path, info, is_dir)

    def offline_answer(self, path: str, known: Node | None) -> Node | None:
        """What is at ``path`` while the store is offline (docs/design.md "Offline"): the node
        this mount has (or last dropped) for it, attributes as last known, else None when the
        parent's last complete listing, kept current by this mount's own changes, lacks the
        name. Raises FsError(EIO) when neither tells."""
        current = self.inodes.by_path.get(path) or self.inodes.restore(path)
        if current is not None and not current.unlinked:
            return current
        parent = self.inodes.by_path.get(parent_of(path))
        if known is None and parent is not None and parent.children is not None \
                and base_name(path) not in parent.children:
            return None
        say_once_offline(self.store, log,
                         f"lookup of {self.naming.key(path)!r}: the store is offline and this mount has not seen it")
        raise FsError(errno.EIO)

    def node_from_info(self, path: str, info: ObjectInfo | None, is_dir: bool) -> Node:
        """A new node for ``path`` from a HEAD of its object (or dir marker; None: implicit dir)."""
        mode, uid, gid, mtime = self.defaults.attrs_from_info(info, is_dir)
        ctime, atime = times_from_info(info, mtime)
        node = self.inodes.new_node(path, mode, uid, gid, mtime, info.size if info and not is_dir else 0, found=True,
                                    ctime_ns=ctime)
        node.implicit = is_dir and info is None
        node.plain_marker = is_dir and is_plain_marker(info)
        node.atime_ns = atime
        if info is not None and not is_dir:
            self.set_version_from_info(node, info)
        return node

    def node_from_listing(self, path: str, listed: ObjectInfo | None, is_dir: bool) -> Node:
        """A ``listed_only`` node for a listing entry (``listed``: the object's entry; None for a
        common prefix, a directory), without a HEAD: mode, uid and gid are the defaults, mtime
        the Last-Modified, size the listed size (the plaintext size: AES-CTR without padding,
        ciphertext length = plaintext length, shared/spec/oss-cse-format.md §1); no version, so
        nothing reads or copies it before a HEAD fills it in (:meth:`refresh`)."""
        mode, uid, gid = self.defaults.default_attrs(is_dir)  # the listing's metadata (if any): not relied on
        mtime = int(listed.mtime * 1e9) if listed is not None else time.time_ns()
        size = listed.size if listed is not None and not is_dir else 0
        node = self.inodes.new_node(path, mode, uid, gid, mtime, size, found=True)
        node.listed_only = True
        node.checked_at = 0.0
        return node

    def set_version_from_info(self, node: Node, info: ObjectInfo, *, opening: bool = False) -> None:
        """``node``'s version is the one ``info`` (a HEAD, or a listing with metadata) shows;
        among the recent versions unless ``opening`` (an open parses its envelope next, which
        keeps its metadata for good: it needs no place there, and taking one would push out
        the version a ``cat`` of many files opens next)."""
        node.version = version_from_info(info)
        if not opening:
            self.recent.touch(node.version)
        node.size = info.size
        node.checked_at = time.monotonic()

    def refresh(self, node: Node, info: ObjectInfo | None, *, opening: bool = False) -> None:
        """Take what the store now says of a clean node: a new version if the ETag changed or
        the data key was re-wrapped (:func:`_rewrapped`), and the attributes always (on OSS a
        metadata-only CopyObject keeps the ETag). A directory refreshed with no marker
        (``info`` None) is implicit. ``opening``: as for :meth:`set_version_from_info`."""
        if node.is_dir:
            node.implicit = info is None
            node.plain_marker = is_plain_marker(info)
        if (node.staged is None and info is not None and not node.is_dir and node.version is not None
                and node.version.etag != info.etag and self.store.landed_over_ours(info.key, info)):
            # this mount's own request, landed late over its later version: not another
            # client's; the late-request check puts ours back now (store/indoubt.py)
            node.checked_at = time.monotonic()
            return
        if node.staged is None and info is not None:  # open handles keep their own version
            if not node.is_dir and (node.version is None or node.version.etag != info.etag
                                    or _rewrapped(node.version, info)):
                self.set_version_from_info(node, info, opening=opening)
                node.symlink_target = None
            elif node.version is not None and not node.is_dir:
                node.version.modified = proof_mtime(info)  # a metadata copy keeps the ETag, not this
                if not node.version.held and node.version.key == info.key:
                    node.version.fill(info.metadata)  # slim: this very version's metadata (same ETag)
                if not opening:
                    self.recent.touch(node.version)
            node.mode, node.uid, node.gid, node.mtime_ns = self.defaults.attrs_from_info(info, node.is_dir)
            ctime, node.atime_ns = times_from_info(info, node.mtime_ns)
            if node.entries_changed_ns:  # entry changes are not stored (0: none, or the mtime set since)
                node.mtime_ns = max(node.mtime_ns, node.entries_changed_ns)  # (an mtime before 1970 stays)
            node.ctime_ns = max(node.ctime_ns, ctime)  # never back: a rename's new ctime may not be stored
        node.checked_at = time.monotonic()
        node.listed_only = False

    async def revalidate(self, node: Node, *, listing: bool = True, opening: bool = False,
                         first: int = 0) -> tuple[ObjectInfo, bytes] | None:
        """Read ``node``'s attributes from the store again (a listing that proves them, else a
        HEAD; ``listing`` False: a HEAD, whose metadata fills a slim version of the same ETag;
        ``opening``: as for :meth:`set_version_from_info`). ``first`` > 0 (an open that is
        about to read, ``listing`` False): a ranged GET of the object's first ``first`` bytes
        instead of the HEAD, whose answer carries the same headers; returns (what it said of
        the version now there, those bytes of it), else None.
        Raises FsError(ENOENT) if its object is gone, FsError(EIO) when the store fails."""
        return await self.at_current_path(node, lambda path: self._revalidate_at(node, path, listing, opening, first))

    async def _revalidate_at(self, node: Node, path: str, listing: bool, opening: bool,
                             first: int) -> tuple[ObjectInfo, bytes] | None:
        """:meth:`revalidate` of ``node`` at ``path``; PathMoved (nothing changed) when a rename
        moved it while the store answered."""
        if listing and await self.revalidate_from_listing(node):
            return None
        key = self.naming.key(path)
        got = None
        try:
            if first > 0:
                got = await self.store.get_range_with_info(key, 0, first)
                info: ObjectInfo | None = got[0]
            else:
                info = await self.store.head(key)
        except StoreOffline:
            return None  # offline: the attributes as last known (docs/design.md "Offline")
        except NoSuchKey:
            info = None
        except StoreError as e:
            log.error("%s %r failed: %s", "GET" if first > 0 else "HEAD", key, e)
            raise FsError(errno_of(e)) from None
        if _moved(path, None, node):
            raise PathMoved(path)  # the answer is about the name it left
        if info is None:
            raise FsError(errno.ENOENT)
        self.seen_below(path)
        self.keep([info])
        self.refresh(node, info, opening=opening)
        return got
