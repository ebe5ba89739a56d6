"""The object-store interface every backend implements.

A store knows nothing of encryption or FUSE: it moves opaque bytes (ciphertext) and user
metadata. All methods are trio-async. Keys are OSS object keys (str, 1–1023 UTF-8 bytes).
User metadata is a ``dict[str, str]`` whose names are lower-case and carry no
``x-oss-meta-`` prefix (OSS lower-cases user-metadata names, oss-rest-api.md §3.17).
"""
from __future__ import annotations

import abc
import collections
import contextvars
import functools
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping

from ..aio import run_all


class StoreError(Exception):
    """Any failure of a store request.

    ``str(e)`` is one plain line: what was asked, the server's error code and message (or the
    network failure in words, e.g. ``cannot connect to http://127.0.0.1:9000: connection
    refused``) and ``[request id …]`` when the server named the request. Attributes:

    * ``temporary`` (bool): retrying later may succeed (connection refused/reset, timeouts, DNS
      failures, HTTP 5xx, 429/throttling). The store has already retried it under its policy
      (``ossfuse.retry``) until its attempts or deadline ran out, so a caller should not loop
      on it again at once. False: retrying cannot fix it (wrong credentials 403
      SignatureDoesNotMatch/InvalidAccessKeyId/AccessDenied, 404 NoSuchBucket, no credentials,
      a bad request, a full local disk); the store failed at the first answer.
    * ``answered`` (bool): the store sent an HTTP answer (any status: a 503 "reduce your request
      rate", a 500, a 403, a body that failed its CRC), so it is reachable; False when no answer
      came (connection refused/reset, timeouts, DNS failures) or the failure is not the
      store's. Only a temporary failure without an answer means "the store is unreachable"
      (``store/health.py``: throttling must not take the mount offline). Default False; the
      OSS backend sets it from what it got.
    * ``code`` (str | None): the server's error code (``SignatureDoesNotMatch``,
      ``NoSuchBucket``, ``ServiceUnavailable``…) or a local one (``ConnectionRefused``,
      ``Timeout``, ``NameResolution``, ``ConnectionReset``, ``CrcMismatch``, ``NoCredentials``).
    * ``key``: the object key (or listing prefix) asked for; ``request_id``: the server's
      ``x-oss-request-id`` when known.
    * ``silent_for`` (float): seconds the store sent nothing before this failure (a timeout's
      length; 0 otherwise): the retry loop counts the store failing since then (``ossfuse.retry``).
    """

    #: class default; StoreUnavailable is temporary, everything else is not unless said
    temporary: bool = False
    silent_for: float = 0.0
    #: the mount takes the whole store to be unreachable (``health.StoreOffline``): not this
    #: request's failure alone
    outage: bool = False

    def __init__(self, message: str, *, key: str | None = None, request_id: str | None = None,
                 code: str | None = None, temporary: bool | None = None, answered: bool = False):
        super().__init__(message)
        self.message = " ".join(message.split())  # one line, whatever the server sent
        self.key = key
        self.request_id = request_id
        self.code = code
        self.answered = answered
        if temporary is not None:
            self.temporary = temporary

    @property
    def unreachable(self) -> bool:
        """A temporary failure that got no answer from the store: what takes a mount offline."""
        return self.temporary and not self.answered

    def __str__(self) -> str:
        return self.message + (f" [request id {self.request_id}]" if self.request_id else "")


class NoSuchKey(StoreError):
    """The object (or upload) does not exist (OSS 404 NoSuchKey / NoSuchUpload)."""


class PreconditionFailed(StoreError):
    """An If-Match condition failed: the object was replaced (OSS 412)."""


class DestinationChanged(StoreError):
    """A write that stated what it replaces at its key found something else there, and wrote
    nothing: ``replaces`` (another version, or no object) or ``if_absent`` (AlreadyExists)."""


class AlreadyExists(DestinationChanged):
    """A put that was to create ``key`` found it taken, and wrote nothing (``if_absent``: OSS
    ``x-oss-forbid-overwrite: true`` answers 409 FileAlreadyExists, oss-rest-api.md §3.1/§3.13)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or kept failing (5xx, throttling, resets, timeouts) until
    the retry policy gave up. Always ``temporary``; ``answered`` tells a store that answered
    (5xx, throttling) from one that did not (resets, timeouts, refused connections)."""

    temporary = True


def etag_norm(etag: str) -> str:
    """An ETag as OSS means it: quotes and letter case do not count (OSS sends upper-case hex
    in quotes)."""
    return etag.strip().strip('"').upper()


def same_etag(a: str | None, b: str | None) -> bool:
    """ETags compared as OSS means them (:func:`etag_norm`)."""
    return etag_norm(a or "") == etag_norm(b or "")


@dataclass(frozen=True)
class ObjectInfo:
    """One object as HEAD or a listing reports it.

    ``size`` in bytes (ciphertext size == plaintext size for CSE objects), ``mtime`` is the
    store's Last-Modified in seconds since the epoch; ``metadata`` is empty in listings (unless
    the store's ``listing_has_metadata``). ``answered``: the store's clock when it answered
    (a HEAD's or GET's ``Date``; a local store's time of the read), seconds since the epoch, 0
    when not known (OSS listings); not compared. ``metadata_unknown``: a listing entry of a
    store whose listings carry no metadata (OSS): its empty ``metadata`` says nothing about
    the object's.
    """

    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)
    answered: float = field(default=0.0, compare=False)
    metadata_unknown: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class ListPage:
    """One page of ``list``: objects and common prefixes, both sorted by key;
    ``next_marker`` is None on the last page."""

    objects: list[ObjectInfo]
    prefixes: list[str]
    next_marker: str | None


class StoreCounters:
    """What one store was asked to do, for ``ossfuse status`` and its Prometheus metrics.

    ``calls[op]``: calls of the store operation ``op`` (``head``, ``get_range``, ``put_file``,
    ``upload_part``, …); ``errors[(op, kind)]``: calls that raised, ``kind`` being the store's
    error code (``NoSuchBucket``, ``AccessDenied``…) or the StoreError class name;
    ``retries[op]``: extra attempts a store made inside calls (OSS request retries);
    ``bytes_sent`` / ``bytes_received``: object bytes uploaded (PUT bodies, parts) and
    downloaded (GET bodies). Counted by :class:`ObjectStore` around each public operation
    (a call made from inside another, e.g. the HEAD of an empty ranged GET, is not counted)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        self.retries: collections.Counter[str] = collections.Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        # seconds a HEAD took lately, answered ones only: a moving average (0 until the first);
        # how long the file system trusts an answer grows with it (fs/namecache.trusted_for)
        self.round_trip = 0.0

    def note_round_trip(self, seconds: float) -> None:
        self.round_trip = seconds if self.round_trip == 0 else 0.8 * self.round_trip + 0.2 * seconds


#: Set while a store operation runs in this task, so nested operations are not counted twice.
_IN_STORE_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("_IN_STORE_CALL", default=False)

#: The counted operations and how many object bytes each moves: (sent, received) from
#: (positional args after self, keyword args, result).
_COUNTED_OPS = {
    "head": None, "get_range": lambda a, kw, r: (0, len(r)), "get_range_with_info": lambda a, kw, r: (0, len(r[1])),
    "put_file": lambda a, kw, r: (r.size, 0), "put_bytes": lambda a, kw, r: (len(kw.get("data") or a[1]), 0),
    "create_multipart": None, "upload_part": lambda a, kw, r: (len(kw.get("data") or a[3]), 0),
    "complete_multipart": None,
    "abort_multipart": None, "list": None, "copy": None, "list_multipart_uploads": None, "delete": None,
    "delete_many": None,
}


_ROUND_TRIP_OPS = ("head",)  # its time is the store's round trip (a LIST page's grows with its keys)


def _counted(op: str, fn):
    sizes = _COUNTED_OPS[op]

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        if _IN_STORE_CALL.get():
            return await fn(self, *args, **kwargs)
        counters, health = self.counters, self.health
        token = _IN_STORE_CALL.set(True)
        probe = False
        sent: float | None = None
        try:
            counters.calls[op] += 1
            if health is not None:  # offline: fail fast or probe (store/health.py)
                probe = await health.admit(op, str(args[0]) if args else "")
            sent = time.monotonic()
            result = await fn(self, *args, **kwargs)
            if op in _ROUND_TRIP_OPS:
                counters.note_round_trip(time.monotonic() - sent)
            if health is not None:
                health.succeeded(sent)
        except StoreError as e:
            replacement = await self._settle_failure(op, e, sent, probe)
            if replacement is e:
                raise
            raise replacement from e
        finally:
            if probe:
                health.probe_done()
            _IN_STORE_CALL.reset(token)
        if sizes is not None:
            sent, received = sizes(args, kwargs, result)
            counters.bytes_sent += sent
            counters.bytes_received += received
        return result

    wrapper._counted = True  # type: ignore[attr-defined]  # marks a wrapped op (no double wrap)
    return wrapper


# ``[(key, upload_id, initiated)]`` (a name: inside ObjectStore, ``list`` is its method)
MultipartUploads = list[tuple[str, str, float]]
# the keys of one ``delete_many`` call, in order (a name, for the same reason)
KeyList = list[str]


class ObjectStore(abc.ABC):
    """Async access to one bucket. Every error is a :class:`StoreError` subclass."""

    #: Smallest part a multipart upload accepts, except the last (bytes).
    min_part_size: int = 100 * 1024
    #: Most parts one multipart upload may have.
    max_parts: int = 10_000
    #: Largest object ``copy`` handles, in bytes (None: any size). Larger ones are copied by
    #: streaming their bytes through the client (OSS CopyObject stops at 1 GB, and
    #: UploadPartCopy is refused for client-side-encrypted sources: oss-cse-format.md §9).
    max_copy_size: int | None = None
    #: Whether ``list`` gives each object's user metadata, as HEAD would (an OSS listing does
    #: not: it has key, size, ETag and Last-Modified only).
    listing_has_metadata: bool = False
    #: The bucket is a directory on this machine's disk. Then a PUT is a local fsync (cheaper
    #: than journaling first: small files go up at close), a read is a local pread (the block
    #: cache would only copy the bucket), multipart parts would only copy every byte twice
    #: more, and ``put_file(..., may_link=True)`` may keep the file itself (a hard link).
    local_disk: bool = False
    #: Online/offline tracking (``store.health.StoreHealth``), set by the daemon; None: none.
    health = None
    #: Whether ``replaces`` of put_file, put_bytes, complete_multipart and copy is checked
    #: atomically with the write (DestinationChanged, nothing written, when ``key`` holds
    #: another version or nothing). A local store checks it in its index transaction; OSS has
    #: no conditional PUT or copy on the destination's ETag (oss-rest-api.md §3.1, §3.13), so
    #: there it is ignored and the caller's HEAD just before is the check (the window left,
    #: docs/semantics.md).
    checks_replaces: bool = False

    def may_still_land(self, key: str) -> bool:
        """Whether a write to ``key`` that this store gave up on (no answer) may still be
        carried out (store/indoubt.py). False here: a request to a store without the notion is
        done when it returns."""
        return False

    def sent_before_a_crash(self, key: str, wrapped: str) -> None:
        """An upload to ``key`` of the object whose wrapped data key is ``wrapped`` may have
        been sent by the daemon's run before a crash, and may still be carried out
        (store/indoubt.py). Nothing here: a request to a store without the notion is done when
        it returns (a local bucket's process died with it)."""

    def vacated(self, key: str) -> None:
        """This mount has nothing at ``key`` any more, without a write there (a file not
        uploaded yet renamed away or unlinked): a write in doubt that lands there later lands
        over that (store/indoubt.py). Nothing here."""

    def landed_over_ours(self, key: str, info: ObjectInfo) -> bool:
        """Whether ``info`` at ``key`` is a write this store gave up on (or a crashed run's
        upload) that landed late over this mount's later write there: this mount's own stale
        object, about to be undone (store/indoubt.py ``InDoubt.landed_over``), not another
        client's version. False here: no write of this store is ever in doubt."""
        return False

    def landed_late(self, key: str, etag: str) -> None:
        """A write to ``key`` this store gave up on was seen to have landed as version ``etag``
        and was dealt with (store/indoubt.py ``InDoubt.landed``). Nothing here."""

    def on_write_after_doubt(self, fn: Callable[[str, str, ObjectInfo | None], None]) -> None:
        """Call ``fn(key, result, info)`` (on the trio thread) whenever this store writes ``key``
        after a write to it it gave up on that may still land (``result``: what the write left,
        an ETag or ``indoubt.DELETED``; ``info``: the object written, with its size and user
        metadata, or None: a delete, or not known). Nothing here: no write of this store is
        ever in doubt."""

    def given_up_earlier(self, op: str, key: str, effect: str, until: float) -> None:
        """Write ``op`` to ``key``, which an earlier run of this mount gave up on (a rename's
        copy, kept in its log), may still leave ``effect`` (an ETag) there until ``until``
        (wall-clock seconds): this store's writes to ``key`` are reported to
        :meth:`on_write_after_doubt` from now on (store/indoubt.py). Nothing here: a request
        to a store without the notion is done when it returns."""

    def __init_subclass__(cls, **kw):
        """Wrap each store operation a subclass defines so that it is counted in ``counters``."""
        super().__init_subclass__(**kw)
        for op in _COUNTED_OPS:
            fn = cls.__dict__.get(op)
            if fn is not None and not getattr(fn, "_counted", False) and not getattr(fn, "__isabstractmethod__", False):
                setattr(cls, op, _counted(op, fn))

    @property
    def counters(self) -> StoreCounters:
        """This store's :class:`StoreCounters` (made on first use)."""
        c = self.__dict__.get("_counters")
        if c is None:
            c = self.__dict__["_counters"] = StoreCounters()
        return c

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag, mtime and user metadata of ``key``; None if it does not exist."""

    async def head_many(self, keys: KeyList, parallel: int,
                        failed: dict[int, StoreError] | None = None) -> list[ObjectInfo | None]:
        """:meth:`head` of every key of ``keys``, at most ``parallel`` at once: the answers in
        the order of ``keys`` (None: no such key). Raises the StoreError of a key whose HEAD
        failed (its ``key`` names it; the other answers are lost); with ``failed`` given, a
        key whose HEAD failed, for good (AccessDenied, say) or for now while the store is not
        taken to be unreachable (no answer from it, a 5xx after the retries), gets that error
        there (its answer None) and the others are answered; an outage
        (``StoreError.outage``) still raises. This default makes one :meth:`head` call per
        key; a store may send them from fewer thread hand-offs."""
        out: list[ObjectInfo | None] = [None] * len(keys)

        async def one(i: int) -> None:
            try:
                out[i] = await self.head(keys[i])
            except StoreError as e:
                if failed is None or e.outage:
                    raise
                failed[i] = e
        await run_all([functools.partial(one, i) for i in range(len(keys))], parallel)
        return out

    async def _settle_failure(self, op: str, e: StoreError, sent: float | None, probe: bool = False) -> StoreError:
        """What a store call of ``op`` sent at monotonic time ``sent`` that failed with ``e``
        raises, once the counters and the health tracker heard of it (``_counted``'s rule,
        store/health.py): ``e`` itself, or a StoreOffline when the store is taken to be
        unreachable (a confirming listing first, unless the call was the probe)."""
        self.counters.errors[(op, e.code or type(e).__name__)] += 1
        health = self.health
        if health is None:
            return e
        alive = False
        if e.unreachable and not probe and not health.offline:
            alive = await health.confirm_alive(sent)  # one slow request is no outage
        return health.failed(e, sent, alive)

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (fewer only if the object is shorter).

        Raises NoSuchKey, PreconditionFailed when ``if_match`` is not the current ETag.
        """

    async def get_range_with_info(self, key: str, start: int, end: int, *,
                                  if_match: str | None = None) -> tuple[ObjectInfo, bytes]:
        """What :meth:`head` answers for ``key`` and its bytes ``[start, end)``, of one version:
        by one request where the store can (OSS: a GetObject answer carries HeadObject's
        headers). This default makes a HEAD, then a GET with If-Match on the ETag the HEAD saw.
        Raises NoSuchKey, PreconditionFailed when ``if_match`` is not the current ETag."""
        info = await self.head(key)
        if info is None:
            raise NoSuchKey("no such key", key=key)
        if if_match is not None and info.etag.strip('"').upper() != if_match.strip('"').upper():
            raise PreconditionFailed(f"ETag is {info.etag}, not {if_match}", key=key)
        return info, await self.get_range(key, start, end, if_match=info.etag)

    @abc.abstractmethod
    async def put_file(self, key: str, path: str, metadata: dict[str, str], *,
                       may_link: bool = False, if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """Upload the whole file at ``path`` as ``key`` with ``metadata``; returns the new object.
        ``may_link``: the file will not change again, so a ``local_disk`` store may keep it
        instead of copying it. ``if_absent``: only create ``key``, atomically: raises
        AlreadyExists (nothing written) when an object is there (OSS ``x-oss-forbid-overwrite``;
        OSS ignores it on a bucket with versioning enabled or suspended). ``replaces``: the
        version (ETag) the caller found at ``key`` and means to replace; see
        :attr:`checks_replaces`."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str], *,
                        if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """Upload ``data`` as ``key`` with ``metadata``; returns the new object. ``if_absent``,
        ``replaces``: as :meth:`put_file` (AlreadyExists, DestinationChanged)."""

    @abc.abstractmethod
    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """Start a multipart upload; returns its upload id."""

    @abc.abstractmethod
    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes,
                          metadata: dict[str, str]) -> str:
        """Upload part ``part_number`` (1-based); ``metadata`` is re-sent with every part
        (the OSS CSE rule, oss-cse-format.md §6). Returns the part's ETag."""

    @abc.abstractmethod
    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
                                 if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """Assemble ``parts`` [(number, etag)] into the object; returns it. ``if_absent``,
        ``replaces``: as for :meth:`put_file` (AlreadyExists, DestinationChanged; the upload
        stays, for the caller to abort)."""

    @abc.abstractmethod
    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload and its parts (no error if it is already gone)."""

    @abc.abstractmethod
    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        """One page of keys under ``prefix`` after ``marker``, grouped at ``delimiter``."""

    @abc.abstractmethod
    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None, *,
                   if_match: str | None = None, if_absent: bool = False, replaces: str | None = None,
                   source: ObjectInfo | None = None) -> ObjectInfo:
        """Server-side copy of ``src`` to ``dst``; ``metadata`` None keeps the source's (COPY),
        else replaces it (REPLACE). Returns the new object. ``if_absent``: only if nothing is at
        ``dst`` (OSS ``x-oss-forbid-overwrite``, checked atomically), else AlreadyExists.
        ``replaces``: the version the caller found at ``dst``, as for :meth:`put_file`.

        ``if_match``: the source ETag the caller knows; the copy happens only if the source is
        still that version (OSS ``x-oss-copy-source-if-match``), checked atomically with the
        copy, else PreconditionFailed and nothing is written. Every caller that copies a version
        it has seen should pass it. None copies whatever version is there now (the returned
        size/metadata still describe the version that was copied).

        ``source``: the caller's description of version ``if_match`` of ``src``. With it, a
        COPY needs no look at the source first (OSS sent a HEAD for the result's size and
        metadata: a rename cost a round trip more); the result's size and metadata are then
        ``source``'s (a caller that holds no metadata of a slim version passes it empty).

        Raises NoSuchKey (source missing), PreconditionFailed (the source), AlreadyExists or
        DestinationChanged (``dst``), StoreError (e.g. source above ``max_copy_size``)."""

    @abc.abstractmethod
    async def list_multipart_uploads(self, prefix: str = "") -> MultipartUploads:
        """Unfinished multipart uploads whose key starts with ``prefix``, as
        ``[(key, upload_id, initiated)]`` sorted by key then initiation, ``initiated`` in
        seconds since the epoch (OSS ListMultipartUploads, oss-rest-api.md §3.16, all pages).
        Recovery aborts those it does not resume: OSS bills their parts until then."""

    @abc.abstractmethod
    async def delete(self, key: str, *, version: str | None = None) -> None:
        """Delete ``key``; deleting a missing key is not an error (as on OSS). ``version``:
        the ETag the caller found there just before (OSS has no conditional DELETE, so the
        caller's HEAD is the check); a retry of a DELETE whose answer was lost (a 5xx, a reset)
        HEADs ``key`` again and deletes nothing when it now holds another version: the first
        attempt may have deleted it, and another client may have written the key since."""

    def capacity(self) -> tuple[int, int, int] | None:
        """(size, free, available to unprivileged writers) of the bucket in bytes, for ``df``
        (statvfs's f_blocks, f_bfree, f_bavail); None when it has no fixed
        size (an OSS bucket). A cheap local call: the event loop makes it."""
        return None

    async def sync(self) -> None:
        """Durability barrier: return once every change this store acknowledged before the
        call survives a power loss. Nothing to do on OSS (a 200 answer means stored); a store
        that acknowledges changes written only to the kernel (``LocalStore``) flushes them
        here. Raises StoreError."""

    async def aclose(self) -> None:
        """Release connections and files."""

    #: Most keys one ``delete_many`` call takes (OSS DeleteMultipleObjects: 1000, oss-rest-api.md §3.6).
    max_delete_keys: int = 1000

    async def delete_many(self, keys: KeyList, versions: Mapping[str, str] | None = None) -> KeyList:
        """Delete every key of ``keys`` (1 to ``max_delete_keys``, unconditionally, like
        :meth:`delete`; a missing key is not an error). ``versions``: key → the ETag the
        caller last saw there, as :meth:`delete`'s ``version``: a retry after an answer that
        was lost deletes only the keys still at that version (the others count as done).
        Returns the keys the store reported as not deleted (normally none). Raises StoreError
        when the request failed as a whole (then any subset may be deleted). This default
        makes one ``delete`` per key."""
        for key in keys:
            await self.delete(key, version=(versions or {}).get(key))
        return []
