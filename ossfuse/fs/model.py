"""The filesystem's data: inodes (:class:`Node`), committed object versions (:class:`Version`)
and open handles. Plain data with no I/O; see docs/design.md for which fields may change while
a task awaits."""
from __future__ import annotations

import base64
import binascii
import errno
import stat
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .. import envelope as env
from ..store.base import ObjectInfo, same_etag
from ..writeback.staging import StagedFile
from .errors import FsError

ROOT_INO = 1

# File types stored as zero-length objects whose x-oss-meta-mode carries the type bits (as
# ossfs 1.x / s3fs store them: ossfs-1.91.10 src/s3fs.cpp s3fs_mknod → create_file_object).
# The kernel opens them itself (a FIFO is a pipe, a socket a socket); the daemon never sees
# their opens, reads or writes.
SPECIAL_TYPES = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})


_UNPARSED = object()  # Version.wrapped not parsed from the metadata yet


_SHARED_NAMES_MAX = 4096  # distinct metadata name sets kept shared (most buckets have a handful)
_shared_names: dict[tuple[str, ...], tuple[str, ...]] = {}


def _pack_value(value: str) -> str | bytes:
    """A metadata value as held in memory: a short one interned (algorithms, modes, lengths
    repeat across objects), a long one that is canonical base64 (the wrapped data key and IV,
    512 characters each for RSA-3072) as its decoded bytes (384), else as it is. Unpacking
    gives back the very string (only a value that re-encodes to itself is decoded)."""
    if len(value) <= 32:
        return sys.intern(value)
    if len(value) >= 64 and len(value) % 4 == 0:
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            return value
        if base64.b64encode(raw).decode("ascii") == value:
            return raw
    return value


class MetadataNotHeld(RuntimeError):
    """A slim :class:`Version`'s metadata or wrapped key was read without fetching it first
    (:meth:`Version.fill`): a programming error, never an empty answer (an empty metadata
    would read ciphertext as plaintext, or a copy would drop the envelope)."""


class Version:
    """A committed object version in the bucket (what a clean file reads from).

    ``metadata``: the object's user metadata, held packed (issue 14: bytes per cached inode):
    one shared tuple of names per set of names, the values in a tuple, base64 ones as bytes;
    reading it builds a new dict each time (a copy: changing it changes nothing here).
    ``wrapped``: the envelope's wrapped key material (None: a plaintext object; an
    EnvelopeError: a corrupt envelope, raised at open). Passed as ``UNPARSED`` it is parsed from
    ``metadata`` on first use, so the decoded wrapped key and IV are held only for files that
    were opened, not for every listed one.

    **Slim** (``held`` False, :meth:`slim`): a listed or HEADed encrypted version that was never
    opened keeps only key, ETag, size and Last-Modified (the attributes live in the Node); its
    user metadata (wrapped key and IV: 2 × 384 bytes for RSA-3072, most of an inode's memory)
    is dropped when it falls out of the mount's :class:`RecentVersions`. Reading ``metadata``
    or ``wrapped`` of a slim version raises :class:`MetadataNotHeld`: whoever needs them HEADs
    the key first and fills the version (:meth:`fill`) only when the ETag is this version's
    (``Files.hold_metadata``, ``Resolver.refresh``). Once ``wrapped`` is parsed (an open, a
    copy with new metadata) a version is never slimmed: open handles read ``metadata`` (the
    integrity spec) and ``envelope`` without awaiting anything."""

    __slots__ = ("key", "etag", "size", "_names", "_values", "_wrapped", "envelope", "modified")

    def __init__(self, key: str, etag: str, size: int, metadata: dict[str, str],
                 wrapped: env.WrappedEnvelope | env.EnvelopeError | None | object,
                 envelope: env.Envelope | None = None, modified: float = 0.0):
        self.key = key
        self.etag = etag
        self.size = size
        self.metadata = metadata
        self._wrapped = wrapped
        self.envelope = envelope  # unwrapped on first open
        # the store's Last-Modified (epoch seconds) as a HEAD reported it; 0: not known (a version
        # this mount made). With the ETag it lets a listing prove the attributes unchanged.
        self.modified = modified

    @property
    def held(self) -> bool:
        """Whether the user metadata is held (False: slim, see the class doc)."""
        return self._values is not None

    @property
    def metadata(self) -> dict[str, str]:
        if self._values is None or self._names is None:
            raise MetadataNotHeld(f"the metadata of {self.key!r} (version {self.etag}) is not held")
        return {name: base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
                for name, value in zip(self._names, self._values, strict=True)}

    @metadata.setter
    def metadata(self, metadata: dict[str, str]) -> None:
        names = tuple(sys.intern(k) for k in metadata)
        shared = _shared_names.get(names)
        if shared is None and len(_shared_names) < _SHARED_NAMES_MAX:
            shared = _shared_names[names] = names
        self._names: tuple[str, ...] | None = shared or names
        self._values: tuple[str | bytes, ...] | None = tuple(_pack_value(v) for v in metadata.values())

    @property
    def wrapped(self) -> env.WrappedEnvelope | env.EnvelopeError | None:
        if self._wrapped is _UNPARSED:
            self._wrapped = parse_wrapped(self.metadata)
        return self._wrapped  # type: ignore[return-value]

    def slim(self) -> bool:
        """Drop the user metadata if this is an encrypted version never opened (``wrapped``
        not parsed, no envelope) and no device node (``rdev`` is read from it at getattr);
        True if dropped. The rest of the version stays as it is."""
        names = self._names
        if self._wrapped is not _UNPARSED or self.envelope is not None or self._values is None or names is None:
            return False
        if (env.H_KEY not in names and env.LEGACY_KEY not in names) or "rdev" in names:
            return False
        self._names = self._values = None
        return True

    @classmethod
    def slim_of(cls, key: str, etag: str, size: int, modified: float) -> "Version":
        """A slim encrypted version known without its metadata (a HEAD an earlier mount kept:
        ``attrcache``); whoever needs the metadata HEADs it and :meth:`fill`s it."""
        v = cls.__new__(cls)
        v.key, v.etag, v.size, v.modified = key, etag, size, modified
        v._names = v._values = None
        v._wrapped, v.envelope = _UNPARSED, None
        return v

    def fill(self, metadata: dict[str, str]) -> None:
        """Hold ``metadata`` again: the user metadata a HEAD just returned for *this* version
        (the caller checked the ETag: a different one is another version, never filled in)."""
        if self._values is None:
            self.metadata = metadata
            self._wrapped = _UNPARSED

    def rewritten(self, etag: str, metadata: dict[str, str]) -> "Version":
        """This version copied onto its own key with ``metadata`` replacing its own (setattr's
        CopyObject; the envelope headers unchanged): new ETag, the same parsed envelope if this
        one was opened (so it stays unslimmable), else parsed from ``metadata`` when used."""
        return Version(self.key, etag, self.size, metadata, self._wrapped, self.envelope)

    def copied_as(self, key: str, etag: str) -> "Version":
        """This version as copied by this mount to ``key`` with the store's metadata directive
        COPY (a rename): same size, metadata (held or not) and envelope, new key and ETag."""
        v = Version.__new__(Version)
        v.key, v.etag, v.size, v.modified = key, etag, self.size, 0.0
        v._names, v._values, v._wrapped, v.envelope = self._names, self._values, self._wrapped, self.envelope
        return v

    def is_copy_of(self, other: "Version") -> bool:
        """Whether this is ``other`` or a :meth:`copied_as` of it (the same content at another
        key): they share the very tuple of metadata values (one with none cannot be told)."""
        return self is other or (self.size == other.size and bool(self._values) and self._values is other._values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        if not (self.held and other.held):
            return (self.key, self.etag, self.size, self._names, self._values, self.envelope, self.modified) == \
                (other.key, other.etag, other.size, other._names, other._values, other.envelope, other.modified)
        return (self.key, self.etag, self.size, self.metadata, self.wrapped, self.envelope, self.modified) == \
            (other.key, other.etag, other.size, other.metadata, other.wrapped, other.envelope, other.modified)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return f"Version(key={self.key!r}, etag={self.etag!r}, size={self.size})"


class RecentVersions:
    """The versions read from the store most recently (HEAD, listing with metadata), at most
    ``limit`` of them: they keep their user metadata, so ``cat`` after ``ls -l`` of up to
    ``limit`` files opens each without a second HEAD (tests/test_requests.py). The oldest one
    past the limit is slimmed (:meth:`Version.slim`: only if never opened). Each entry costs
    ~1.3 KiB while held (RSA-3072 envelope), so ``limit`` bounds what all the others save.
    Versions an open fills are not touched here (held for good once parsed)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lru: OrderedDict[int, Version] = OrderedDict()  # id(version) → version (kept alive here)

    def touch(self, v: Version) -> None:
        """``v`` holds its metadata and was just used: the last to be slimmed."""
        if not v.held:
            return
        lru = self._lru
        if id(v) in lru:
            lru.move_to_end(id(v))
            return
        lru[id(v)] = v
        while len(lru) > self.limit:
            lru.popitem(last=False)[1].slim()

    def __len__(self) -> int:
        return len(self._lru)


UNPARSED = _UNPARSED


def parse_wrapped(metadata: dict[str, str]) -> env.WrappedEnvelope | env.EnvelopeError | None:
    """The wrapped envelope an object's user metadata carries; None for a plaintext object, the
    EnvelopeError for a corrupt one (reported when the file is opened)."""
    if not env.is_encrypted(metadata):
        return None
    try:
        return env.parse_envelope(metadata)
    except env.EnvelopeError as e:
        return e


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
    lookups: int = 0  # the kernel's lookup count (FUSE forget protocol)
    opens: int = 0  # handles, and opens under way (Files.open counts one from its start)
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
    implicit: bool = False  # a directory with no marker object ("dir/"): it exists as a key prefix only
    # a directory whose marker is known to be empty with only the attribute fields (its mkdir
    # here, or its last HEAD): an attribute change rewrites it with a PUT (fs/attrs.py)
    plain_marker: bool = False
    kernel_etag: str | None = None  # version whose pages the kernel may cache (see Files.open_handle)
    # the version this mount's applications last opened, or that this mount made from it while
    # they had it (None: never opened here): a rename over the name keeps another client's
    # version as a conflict copy (fs/namespace.py). Unlike kernel_etag, an open of a staged
    # version or one bypassing the page cache does not clear it
    seen_etag: str | None = None
    handles: set | frozenset = frozenset()  # open FileHandles; a set from the first open (an empty set is 216 B)
    atime_ns: int | None = None  # last access as set by utimensat (reads do not change it); None: mtime
    # a directory: when this mount last changed its entries (touch). Not stored (a marker PUT
    # per create), so a revalidation, which reads the marker's mtime, keeps the later of the two;
    # an explicit utimensat of the directory resets it
    entries_changed_ns: int = 0
    subdirs: int | None = None  # a directory's subdirectories as of a listing or its mkdir; None: unknown
    # attributes guessed from a listing entry, which carries no metadata (a big directory over
    # OSS, fs/readdir.py): shown with zero timeouts; a lookup, getattr or open HEADs the object
    listed_only: bool = False
    # set while its name changes: a rename of it (or of a directory above it), a rename over it,
    # its unlink. An open or a lookup in it starting then waits for the outcome (name_settled;
    # fs/namespace.py name_going): no handle reads an object going away, no node is made at a
    # path that is moving
    name_going: trio.Event | None = None
    _lock: trio.Lock | None = None

    def add_handle(self, handle: "FileHandle") -> None:
        handles = self.handles
        if not isinstance(handles, set):
            handles = self.handles = set()
        handles.add(handle)

    def drop_handle(self, handle: "FileHandle") -> None:
        if isinstance(self.handles, set):
            self.handles.discard(handle)
            if not self.handles:
                self.handles = frozenset()

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
    def is_special(self) -> bool:
        """A FIFO, socket or device node (a zero-length object, opened by the kernel only)."""
        return stat.S_IFMT(self.mode) in SPECIAL_TYPES

    @property
    def current_size(self) -> int:
        return self.staged.size if self.staged is not None else self.size

    @property
    def name(self) -> str:
        """The last component of the path ("" for the root)."""
        return self.path.rpartition("/")[2]


@dataclass(eq=False)
class FileHandle:
    """An open file: the version it reads (pinned by ETag) and its read-ahead state."""

    fh: int
    node: Node
    version: Version | None
    last_end: int = -1  # byte offset where the previous read ended (-1: none yet)
    keep_cache: bool = True  # the kernel's cached pages of this file are of this version
    direct_io: bool = False  # reads bypass the kernel's page cache (other handles read another version)
    writable: bool = True  # opened for writing (a read-only handle's close() journals nothing)
    window: int = 0  # bytes: current read-ahead window
    # errno of a write through this handle that was lost (ENOSPC…): every later write, fsync
    # and close on it fails with it at once (docs/semantics.md "Durability"); None: none lost
    write_error: int | None = None


# One entry of a directory snapshot: (name, node known locally, listing info, is_dir).
DirEntry = tuple[str, Node | None, ObjectInfo | None, bool]


@dataclass(eq=False)
class DirHandle:
    """An open directory: a snapshot of its entries, so readdir offsets stay stable."""

    fh: int
    node: Node
    entries: list[DirEntry] | None = None
    entries_path: str = ""  # the directory's path when ``entries`` was listed (their keys)


async def name_settled(node: Node) -> None:
    """Wait until no rename or unlink changes ``node``'s name (``Node.name_going``)."""
    while node.name_going is not None:
        await node.name_going.wait()


def set_local_version(node: Node, version: Version, *, follow: bool = True) -> None:
    """A version this mount made (upload, rename, attribute copy) from ``node.version``: open
    handles of that version follow it, since its content is what they already saw (``follow``
    False: they keep theirs — an attribute copy onto a re-wrapped envelope, which this mount
    may not unwrap, while their own data key reads the same bytes)."""
    prev = node.version
    node.version = version
    node.size = version.size
    node.checked_at = time.monotonic()
    if prev is None or node.kernel_etag is not None:
        node.kernel_etag = version.etag  # same bytes as the kernel's pages
    if prev is None or node.seen_etag is not None:
        # what the applications saw, as this mount changed it; a mount that never opened the
        # file still did not (a chmod here is no open: a two-mount model trial's rename over
        # the file then kept the other mount's version, which this mount knew, as a conflict
        # copy)
        node.seen_etag = version.etag
    if follow:
        handles_follow(node, version, prev)


def handles_follow(node: Node, version: Version, prev: Version | None) -> None:
    """``node``'s open handles that name ``prev`` (by ETag; None: a new file's, never
    uploaded) name ``version`` from now on, one this mount made from ``prev``. A handle still
    naming an older version stays stale (Files.write refuses it): a chmod or rename of the
    version another client put there must not make a handle opened on the one before it write
    onto theirs (a two-mount model trial: its write was merged onto their content)."""
    for hd in node.handles:
        if (hd.version is None and prev is None) or (
                hd.version is not None and prev is not None and same_etag(hd.version.etag, prev.etag)):
            hd.version = version


def touch(dirnode: Node) -> None:
    """A directory's entries changed: its mtime and ctime become now (in memory only:
    ``Node.entries_changed_ns``)."""
    dirnode.mtime_ns = dirnode.ctime_ns = dirnode.entries_changed_ns = time.time_ns()


class OpaqueEnvelope:
    """Stand-in for a journaled envelope this mount cannot unwrap: uploads work (they need only
    the wrapped headers), reads and writes fail with EIO."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def crypt(self, offset, data):
        raise FsError(errno.EIO, "the data key of this staged file cannot be unwrapped here")
