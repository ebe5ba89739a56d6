"""The Alibaba Cloud OSS backend, over oss2 (blocking) run in worker threads.

Section numbers (§) refer to ``shared/spec/oss-rest-api.md``.

Concurrency: every oss2 call runs in ``trio.to_thread.run_sync`` behind ONE
``trio.CapacityLimiter(threads)``; all threads share one ``oss2.Session`` (one requests
connection pool of ``threads`` connections per host) and one ``oss2.Bucket``.

Authentication: ``oss2.ProviderAuth`` (signature V1, §6.2) or ``oss2.ProviderAuthV4`` (V4, §6.3;
needs the region) over an :class:`~ossfuse.store.credentials.CredentialsProvider`, asked on every
request, so rotated or refreshed STS credentials are used at once (the security token goes out
as ``x-oss-security-token``, §6.1).

Errors and retries:

* transient: HTTP status >= 500, connection refused/reset, timeouts, truncated bodies, and CRC-64
  mismatches (§5.2) are retried ``retries`` times with exponential backoff and jitter
  (``backoff * 2**n``, capped at ``backoff_max``, times a random factor in [0.5, 1]); then
  :class:`StoreUnavailable` (a CRC mismatch that persists: :class:`StoreError`).
* 4xx are never retried: 404 NoSuchKey / NoSuchUpload → :class:`NoSuchKey` (``head`` returns
  None), 412 → :class:`PreconditionFailed`, anything else (403 SignatureDoesNotMatch, 400 ...)
  → :class:`StoreError`. NoSuchBucket is a StoreError, not a missing key.
* every failure that reaches the caller is logged once (WARNING; NoSuchKey at DEBUG,
  PreconditionFailed at INFO) with the OSS request id (``x-oss-request-id``, §2.2), which is
  also in ``StoreError.request_id``. Each retried attempt is logged at INFO with its own id.
  oss2's own logger is set to WARNING (if unset): it would log every error response again.
* cancellation waits for the request in flight (a blocked thread cannot be interrupted);
  ``read_timeout`` bounds that.

Integrity: uploads keep oss2's CRC-64 check (``enable_crc``, §5.2) - PutObject and UploadPart
compare the client CRC with ``x-oss-hash-crc64ecma``, and CompleteMultipartUpload compares the
combined part CRCs when this process uploaded every part. Ranged GETs cannot be checked (OSS
sends the whole object's CRC on a 206, §5.3); a GET that returns the whole object is checked here.
"""
from __future__ import annotations

import email.utils
import http.client
import logging
import os
import random
import re
import threading
from typing import Any, Callable
from urllib.parse import urlparse

import fastcrc
import oss2
import oss2.exceptions as oe
import requests
import trio
import urllib3

from .base import ListPage, NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError, StoreUnavailable
from .credentials import CredentialsError, CredentialsProvider, Oss2CredentialsProvider

log = logging.getLogger(__name__)

_META = "x-oss-meta-"
#: CopyObject limit this store enforces (the brief: above 1 GB another engineer streams the copy;
#: §3.9 lists 1 GB as the CopyObject cap when the class or encryption changes).
COPY_LIMIT = 1024 ** 3
#: Largest single PutObject (§3.1, §4).
PUT_LIMIT = 5 * 1024 ** 3
_META_NAME = re.compile(r"^[a-z0-9-]+$")
_ENDPOINT_REGION = re.compile(r"^oss-([a-z]{2}-[a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")

# Exceptions raised outside oss2's own wrapping (mostly while a streamed body is read).
_TRANSPORT_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                     http.client.HTTPException, ConnectionError, TimeoutError)


_CRC_CHUNK = 1 << 20  # bytes read at a time to compute a file's CRC-64


def _check_crc(op: str, key: str, ours: int, result) -> None:
    """Raise InconsistentError (retried as transient) when OSS's CRC-64 of a body
    (``x-oss-hash-crc64ecma``, §5.2) is not ``ours``; an answer without one is not checked."""
    theirs = result.headers.get("x-oss-hash-crc64ecma")
    if theirs is not None and int(theirs) != ours:
        raise oe.InconsistentError(f"{op} {key}: CRC-64 of the body {ours} != OSS's {theirs}", result.request_id)


def _crc64_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-64 of A followed by B from the CRC-64s of both: the CRC is affine in its input, so
    crc(A‖B) = crc(zeros(|B|), from crc(A)) ^ crc(zeros(|B|)) ^ crc(B) (what oss2's pure-Python
    crc64_combine computes, at memory speed)."""
    zeros = bytes(len_b)
    return fastcrc.crc64.xz(zeros, initial=crc_a) ^ fastcrc.crc64.xz(zeros) ^ crc_b


class _BadResponse(Exception):
    """The server answered something unusable (wrong Content-Range, short body): retried."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


def region_from_endpoint(endpoint: str) -> str | None:
    """``oss-cn-hangzhou[-internal].aliyuncs.com`` → ``cn-hangzhou``; None for other hosts."""
    host = urlparse(endpoint if "://" in endpoint else "https://" + endpoint).hostname or ""
    m = _ENDPOINT_REGION.match(host)
    return m.group(1) if m else None


def _http_time(headers) -> float | None:
    v = headers.get("last-modified") or headers.get("date")
    if not v:
        return None
    try:
        return email.utils.parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError):
        return None


class OssStore(ObjectStore):
    """One OSS bucket through oss2.

    :param bucket: bucket name.
    :param endpoint: ``https://oss-cn-hangzhou.aliyuncs.com`` (no scheme → https), or an
        ``http://127.0.0.1:PORT`` test server (oss2 then uses path-style addressing, §2.1).
    :param region: e.g. ``cn-hangzhou``; required for V4 unless the endpoint names it.
    :param signature: ``"v1"`` or ``"v4"``.
    :param credentials: where the access key comes from (``store.credentials``).
    :param threads: concurrent requests (the limiter's and the connection pool's size).
    :param connect_timeout/read_timeout: seconds (requests' (connect, read) timeout pair).
    :param retries: extra attempts for transient failures; ``backoff``/``backoff_max`` seconds.
    :raises ValueError: bad signature, V4 without a region, invalid bucket name or endpoint.
    """

    def __init__(self, bucket: str, endpoint: str, *, region: str | None = None, signature: str = "v4",
                 credentials: CredentialsProvider, threads: int = 16, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, retries: int = 5, backoff: float = 0.25, backoff_max: float = 8.0,
                 max_copy_size: int = COPY_LIMIT):
        self.max_copy_size = min(max_copy_size, COPY_LIMIT)
        if signature not in ("v1", "v4"):
            raise ValueError(f"signature must be 'v1' or 'v4', not {signature!r}")
        if "://" not in endpoint:
            endpoint = "https://" + endpoint
        region = region or region_from_endpoint(endpoint)
        if signature == "v4" and not region:
            raise ValueError("signature v4 needs the bucket's region (e.g. cn-hangzhou): set store.region")
        self.bucket_name = bucket
        self.endpoint = endpoint
        self.region = region
        self.signature = signature
        self.credentials = credentials
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._limiter = trio.CapacityLimiter(threads)
        # oss2 logs every error response at INFO itself; this store logs each failure once.
        oss2_log = logging.getLogger("oss2")
        if oss2_log.level == logging.NOTSET:
            oss2_log.setLevel(logging.WARNING)
        # We fetch ciphertext with a plain Bucket on purpose: oss2 warns about that on every GET.
        logging.getLogger("oss2.models").setLevel(logging.ERROR)
        provider = Oss2CredentialsProvider(credentials)
        auth = oss2.ProviderAuthV4(provider) if signature == "v4" else oss2.ProviderAuth(provider)
        self._session = oss2.Session(pool_size=threads)
        try:
            # oss2's CRC-64 (crcmod, ~0.5 GB/s) was a third of a cold read's CPU and a quarter of
            # an upload's, and its combine at Complete is pure Python: oss2's is off, and this
            # store checks the CRC-64 itself with fastcrc (§5.2): every PUT, part and Complete,
            # whole-object GETs (ranged ones cannot be checked, §5.3).
            self._bucket = oss2.Bucket(auth, endpoint, bucket, session=self._session,
                                       connect_timeout=(connect_timeout, read_timeout), app_name="ossfuse",
                                       enable_crc=False, region=region)
        except oe.ClientError as e:  # invalid bucket name or endpoint
            raise ValueError(f"OSS bucket {bucket!r} at {endpoint!r}: {e.body}") from None
        # part number -> (size, crc64) per upload id, for the whole-object CRC check at Complete
        self._parts: dict[str, dict[int, tuple[int, int]]] = {}
        self._parts_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kw) -> "OssStore":
        """``oss://BUCKET`` plus the keyword arguments of the constructor."""
        p = urlparse(url)
        if p.scheme != "oss" or not p.netloc:
            raise ValueError(f"not an oss://BUCKET url: {url!r}")
        return cls(p.netloc, **kw)

    # -- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _classify(e: BaseException) -> str | None:
        """"transient", "permanent", or None (not a request failure: a bug, re-raised)."""
        if isinstance(e, (oe.RequestError, oe.InconsistentError, _BadResponse)):
            return "transient"
        if isinstance(e, oe.OssError):
            return "transient" if e.status >= 500 else "permanent"
        if isinstance(e, StoreError):
            return "permanent"
        if isinstance(e, _TRANSPORT_ERRORS):
            return "transient"
        return None

    @staticmethod
    def _describe(e: BaseException) -> str:
        if isinstance(e, oe.RequestError):
            return f"connection error: {e.exception}"
        if isinstance(e, oe.InconsistentError):
            return "CRC-64 mismatch between client and OSS"
        if isinstance(e, oe.OssError):
            return f"HTTP {e.status} {e.code or ''}: {e.message or ''}".rstrip(": ")
        return f"{type(e).__name__}: {e}"

    def _to_store_error(self, op: str, key: str | None, e: BaseException, attempts: int) -> StoreError:
        rid = getattr(e, "request_id", "") or None
        what = f"OSS {op} {key!r}" if key is not None else f"OSS {op}"
        if isinstance(e, StoreError):
            return e
        if self._classify(e) == "permanent":  # 4xx, or an oss2 ClientError (status -1)
            code = getattr(e, "code", "")
            if e.status == 404 and code in ("NoSuchKey", "NoSuchUpload", ""):
                return NoSuchKey(f"{what}: {code or 'not found'}", key=key, request_id=rid)
            if e.status == 412:
                return PreconditionFailed(f"{what}: the object changed (412 PreconditionFailed)",
                                          key=key, request_id=rid)
            return StoreError(f"{what}: {self._describe(e)}", key=key, request_id=rid)
        msg = f"{what}: {self._describe(e)}" + (f" (after {attempts} attempts)" if attempts > 1 else "")
        if isinstance(e, oe.InconsistentError):
            return StoreError(msg, key=key, request_id=rid)
        return StoreUnavailable(msg, key=key, request_id=rid)

    async def _call(self, op: str, key: str | None, fn: Callable[..., Any], *args,
                    transient_seen: list | None = None) -> Any:
        """Run ``fn(*args)`` in a worker thread with the retry policy of the module docstring.
        ``transient_seen`` (a list) gets an entry for every failed attempt that was retried."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
            except Exception as e:  # noqa: BLE001 - classified below
                kind = self._classify(e)
                if kind is None:
                    raise
                rid = getattr(e, "request_id", "") or None
                if kind == "transient" and attempt <= self.retries:
                    delay = min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                    log.info("OSS %s %r: attempt %d/%d failed: %s%s; retrying in %.2fs", op, key, attempt,
                             self.retries + 1, self._describe(e), f" [request id {rid}]" if rid else "", delay)
                    if transient_seen is not None:
                        transient_seen.append(e)
                    await trio.sleep(delay)
                    continue
                err = self._to_store_error(op, key, e, attempt)
                level = (logging.DEBUG if isinstance(err, NoSuchKey) else
                         logging.INFO if isinstance(err, PreconditionFailed) else logging.WARNING)
                log.log(level, "%s%s", err, f" [request id {err.request_id}]" if err.request_id else "")
                raise err from (None if isinstance(e, StoreError) else e)

    @staticmethod
    def _meta_headers(key: str, metadata: dict[str, str] | None) -> dict[str, str]:
        """``x-oss-meta-*`` headers (§3.17): names lower-case letters/digits/'-', ASCII values."""
        h: dict[str, str] = {}
        for name, value in (metadata or {}).items():
            n = name.lower()
            if n.startswith(_META):
                n = n[len(_META):]
            if not _META_NAME.match(n):
                raise StoreError(f"invalid user metadata name {name!r} (letters, digits and '-' only)", key=key)
            if not isinstance(value, str) or not value.isascii() or any(c in value for c in "\r\n\0"):
                raise StoreError(f"user metadata {name!r}: value must be ASCII text without newlines", key=key)
            h[_META + n] = value
        return h

    @staticmethod
    def _meta_from_headers(headers) -> dict[str, str]:
        return {k.lower()[len(_META):]: v for k, v in headers.items() if k.lower().startswith(_META)}

    @staticmethod
    def _norm_meta(metadata: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in metadata.items()}

    @staticmethod
    def _check_key(key: str) -> None:
        """Object names (§4): 1-1023 UTF-8 bytes, not starting with '/' or '\\'."""
        n = len(key.encode("utf-8"))
        if not 1 <= n <= 1023:
            raise StoreError(f"invalid object name: {n} bytes (must be 1-1023)", key=key)
        if key[0] in "/\\":
            raise StoreError("invalid object name: OSS keys cannot start with '/' or '\\'", key=key)

    # -- head / get -------------------------------------------------------------------------
    def _head_sync(self, key: str):
        return self._bucket.head_object(key)

    async def _head(self, key: str):
        """(ObjectInfo, content type) or None. HeadObject (§3.3): size from Content-Length,
        metadata from ``x-oss-meta-*``; the error XML comes base64 in ``x-oss-err`` (§2.3)."""
        try:
            r = await self._call("HEAD", key, self._head_sync, key)
        except NoSuchKey:
            return None
        mtime = float(r.last_modified) if r.last_modified is not None else (_http_time(r.headers) or 0.0)
        info = ObjectInfo(key, int(r.content_length or 0), r.etag or "", mtime, self._meta_from_headers(r.headers))
        return info, r.content_type

    async def head(self, key: str) -> ObjectInfo | None:
        """HeadObject (§3.3): size, ETag (unquoted), Last-Modified as epoch seconds, user metadata
        (lower-case names, prefix stripped). None when the key does not exist (404 NoSuchKey);
        StoreError for anything else, e.g. a missing bucket."""
        r = await self._head(key)
        return r[0] if r else None

    @staticmethod
    def _read_all(res) -> bytes:
        chunks = []
        while True:
            b = res.read(1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)

    def _get_range_sync(self, key: str, start: int, end: int, if_match: str | None) -> bytes:
        headers = {"Range": f"bytes={start}-{end - 1}", "x-oss-range-behavior": "standard"}
        if if_match is not None:
            headers["If-Match"] = if_match
        try:
            res = self._bucket.get_object(key, headers=headers)
        except oe.ServerError as e:
            if e.status == 416:  # start >= size under standard range behaviour (§3.2)
                return b""
            raise
        try:
            data = self._read_all(res)
        finally:
            res.close()
        rid = res.request_id
        if res.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", res.content_range or "")
            if not m:
                raise _BadResponse(f"206 with unusable Content-Range {res.content_range!r}", rid)
            a, b = int(m.group(1)), int(m.group(2))
            total = int(m.group(3)) if m.group(3) != "*" else None
            if len(data) != b - a + 1:
                raise _BadResponse(f"206 body is {len(data)} bytes, Content-Range says {b - a + 1}", rid)
            if a > start or b < a:
                raise _BadResponse(f"asked for bytes {start}-{end - 1}, got {res.content_range!r}", rid)
            if a != start:
                log.warning("OSS GET %r: asked for range start %d, server sent %s; slicing [request id %s]",
                            key, start, res.content_range, rid)
            whole = a == 0 and total is not None and b == total - 1
        else:
            # The range was ignored (legacy behaviour, §3.2): the body is the whole object.
            if res.content_length is not None and len(data) != res.content_length:
                raise _BadResponse(f"body is {len(data)} bytes, Content-Length {res.content_length}", rid)
            a, whole = 0, True
        if whole:
            _check_crc("GET", key, fastcrc.crc64.xz(data), res)
        return data[start - a:end - a]

    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """GetObject with ``Range: bytes=start-(end-1)``, ``x-oss-range-behavior: standard`` and
        ``If-Match`` (§3.2). Returns bytes [start, end), shorter past the end of the object, empty
        when start >= size (416). The Content-Range is checked; a server that ignores the range
        (200, whole body) is sliced. Whole-object answers are CRC-64 checked (§5.2), ranged ones
        cannot be (§5.3). Raises NoSuchKey, PreconditionFailed (412), StoreError/StoreUnavailable."""
        if start < 0 or end < start:
            raise StoreError(f"bad range [{start}, {end})", key=key)
        if end == start:
            info = await self.head(key)
            if info is None:
                raise NoSuchKey("no such key", key=key)
            if if_match is not None and info.etag.strip('"').upper() != if_match.strip('"').upper():
                raise PreconditionFailed(f"ETag is {info.etag}, not {if_match}", key=key)
            return b""
        return await self._call("GET", key, self._get_range_sync, key, start, end, if_match)

    # -- put --------------------------------------------------------------------------------
    def _put_bytes_sync(self, key: str, data: bytes, headers: dict[str, str]):
        r = self._bucket.put_object(key, data, headers=dict(headers))
        _check_crc("PUT", key, fastcrc.crc64.xz(data), r)
        return r

    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str]) -> ObjectInfo:
        """PutObject (§3.1) with ``x-oss-meta-*`` and ``Content-Type: application/octet-stream``;
        the CRC-64 of the upload is checked. ``mtime`` of the result is the response's Date
        (OSS sends no Last-Modified on PUT)."""
        self._check_key(key)
        data = data if isinstance(data, bytes) else bytes(data)
        if len(data) > PUT_LIMIT:
            raise StoreError("object larger than 5 GB: use a multipart upload", key=key)
        headers = {"Content-Type": "application/octet-stream", **self._meta_headers(key, metadata)}
        r = await self._call("PUT", key, self._put_bytes_sync, key, data, headers)
        return ObjectInfo(key, len(data), r.etag, _http_time(r.headers) or 0.0, self._norm_meta(metadata))

    def _put_file_sync(self, key: str, path: str, headers: dict[str, str]):
        try:
            f = open(path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}", key=key) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > PUT_LIMIT:
                raise StoreError(f"{path} is larger than 5 GB: use a multipart upload", key=key)
            # oss2 streams a file object, no full read into memory; the CRC-64 is of the file
            # as it is now (a staged file does not change while it uploads)
            crc = 0
            while chunk := f.read(_CRC_CHUNK):
                crc = fastcrc.crc64.xz(chunk, initial=crc)
            f.seek(0)
            r = self._bucket.put_object(key, f, headers=dict(headers))
            _check_crc("PUT", key, crc, r)
            return size, r

    async def put_file(self, key: str, path: str, metadata: dict[str, str], *,
                       may_link: bool = False) -> ObjectInfo:
        """PutObject streaming the file at ``path`` (reopened for every attempt); as put_bytes."""
        self._check_key(key)
        headers = {"Content-Type": "application/octet-stream", **self._meta_headers(key, metadata)}
        size, r = await self._call("PUT", key, self._put_file_sync, key, path, headers)
        return ObjectInfo(key, size, r.etag, _http_time(r.headers) or 0.0, self._norm_meta(metadata))

    # -- multipart --------------------------------------------------------------------------
    def _init_sync(self, key: str, headers: dict[str, str]) -> str:
        return self._bucket.init_multipart_upload(key, headers=dict(headers)).upload_id

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        """InitiateMultipartUpload (§3.10) with the metadata as ``x-oss-meta-*``; returns the upload id."""
        self._check_key(key)
        headers = {"Content-Type": "application/octet-stream", **self._meta_headers(key, metadata)}
        upload_id = await self._call("InitiateMultipartUpload", key, self._init_sync, key, headers)
        with self._parts_lock:
            self._parts[upload_id] = {}
        return upload_id

    def _part_sync(self, key: str, upload_id: str, n: int, data: bytes, headers: dict[str, str]):
        r = self._bucket.upload_part(key, upload_id, n, data, headers=dict(headers))
        _check_crc("UploadPart", key, fastcrc.crc64.xz(data), r)  # then r.crc (OSS's) is ours
        return r

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes,
                          metadata: dict[str, str]) -> str:
        """UploadPart (§3.11), re-sending ``metadata`` as ``x-oss-meta-*`` (OSS checks the CSE
        headers on every part, oss-cse-format.md §6). The part's CRC-64 is checked. Returns the
        part ETag. An unknown upload id → NoSuchKey (404 NoSuchUpload)."""
        data = data if isinstance(data, bytes) else bytes(data)
        headers = self._meta_headers(key, metadata)
        r = await self._call("UploadPart", key, self._part_sync, key, upload_id, part_number, data, headers)
        with self._parts_lock:
            parts = self._parts.get(upload_id)
            if parts is not None:
                if r.crc is not None:
                    parts[part_number] = (len(data), r.crc)
                else:
                    parts.pop(part_number, None)  # Complete then skips the combined CRC check
        return r.etag

    def _complete_sync(self, key: str, upload_id: str, parts: list[oss2.models.PartInfo], crc: int | None):
        try:
            r = self._bucket.complete_multipart_upload(key, upload_id, parts)
            if crc is not None:
                _check_crc("CompleteMultipartUpload", key, crc, r)
            return r
        except oe.InconsistentError as e:
            # The upload is complete but its CRC-64 differs from the parts we sent: not retryable
            # (the upload id is gone); the caller must upload again.
            raise StoreError(f"OSS CompleteMultipartUpload {key!r}: the assembled object's CRC-64 does not "
                             "match the uploaded parts; upload it again", key=key,
                             request_id=e.request_id or None) from e

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> ObjectInfo:
        """CompleteMultipartUpload (§3.13) of ``parts`` [(number, etag)], then HeadObject for the
        size, mtime and metadata. When this process uploaded every listed part, the object's
        CRC-64 (combined from the parts') is checked against OSS's. If an attempt failed in
        transit and the retry meets NoSuchUpload, the first attempt may have succeeded: the
        object is accepted when its ETag says it has ``len(parts)`` parts. Raises NoSuchKey (no
        such upload), StoreError (400 InvalidPart, EntityTooSmall ...)."""
        with self._parts_lock:
            known = self._parts.get(upload_id) or {}
        infos = [oss2.models.PartInfo(n, etag) for n, etag in sorted(parts)]
        crc: int | None = None  # the object's CRC-64, when this process sent every part
        if all(n in known for n, _ in parts):
            crc = 0
            for n, _ in sorted(parts):
                crc = _crc64_combine(crc, known[n][1], known[n][0])
        seen: list = []
        try:
            r = await self._call("CompleteMultipartUpload", key, self._complete_sync, key, upload_id, infos, crc,
                                 transient_seen=seen)
            etag = r.etag
        except NoSuchKey:
            if not seen:
                raise
            info = await self.head(key)
            if info is None or not info.etag.endswith(f"-{len(parts)}"):
                raise
            log.info("OSS CompleteMultipartUpload %r: the lost attempt had completed the upload", key)
            etag = info.etag
        finally:
            with self._parts_lock:
                self._parts.pop(upload_id, None)
        info = await self.head(key)
        if info is None:
            raise NoSuchKey("object vanished right after CompleteMultipartUpload", key=key)
        if info.etag != etag:  # overwritten in between: report what we completed
            log.warning("OSS CompleteMultipartUpload %r: object replaced right after completion", key)
        return info

    def _abort_sync(self, key: str, upload_id: str) -> None:
        self._bucket.abort_multipart_upload(key, upload_id)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload (§3.14); NoSuchUpload (already gone) is not an error."""
        with self._parts_lock:
            self._parts.pop(upload_id, None)
        try:
            await self._call("AbortMultipartUpload", key, self._abort_sync, key, upload_id)
        except NoSuchKey:
            pass

    # -- list / copy / delete ---------------------------------------------------------------
    def _list_sync(self, prefix: str, delimiter: str, marker: str, max_keys: int):
        return self._bucket.list_objects(prefix=prefix, delimiter=delimiter, marker=marker, max_keys=max_keys)

    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        """ListObjects v1 (§3.7) with ``encoding-type=url`` (oss2 sends it and decodes keys). One
        page of at most ``max_keys`` (clamped to 1..1000) objects plus common prefixes, both counted
        against max_keys; ``next_marker`` (OSS's NextMarker: the last key or common prefix of
        the page) is None on the last page. Listing metadata is empty."""
        n = max(1, min(int(max_keys), 1000))
        r = await self._call("ListObjects", prefix, self._list_sync, prefix, delimiter or "", marker or "", n)
        objects = [ObjectInfo(o.key, int(o.size), o.etag, float(o.last_modified)) for o in r.object_list]
        prefixes = list(r.prefix_list)
        next_marker = None
        if r.is_truncated:
            next_marker = r.next_marker or max([o.key for o in objects] + prefixes, default=None)
        return ListPage(objects, prefixes, next_marker)

    def _copy_sync(self, src: str, dst: str, headers: dict[str, str]):
        return self._bucket.copy_object(self.bucket_name, src, dst, headers=dict(headers))

    async def copy(self, src: str, dst: str, *, metadata: dict[str, str] | None = None) -> ObjectInfo:
        """CopyObject within the bucket (§3.9): ``x-oss-metadata-directive: COPY`` when
        ``metadata`` is None, else ``REPLACE`` with the given ``x-oss-meta-*`` and the source's
        Content-Type. The source is HEADed first (its size and type) and the copy is made
        conditional on that ETag (``x-oss-copy-source-if-match``; a source replaced in between is
        HEADed again). Raises NoSuchKey (source missing), StoreError for a source above 1 GB
        (CopyObject cannot do it; it needs UploadPartCopy or a streamed copy)."""
        self._check_key(dst)
        for _ in range(3):
            h = await self._head(src)
            if h is None:
                raise NoSuchKey("copy source does not exist", key=src)
            info, content_type = h
            if info.size > self.max_copy_size:
                raise StoreError(f"cannot copy {src!r} ({info.size} bytes): objects above "
                                 f"{self.max_copy_size} bytes cannot be copied with CopyObject", key=src)
            headers = {"x-oss-copy-source-if-match": info.etag}
            if metadata is None:
                headers["x-oss-metadata-directive"] = "COPY"
                meta = dict(info.metadata)
            else:
                headers["x-oss-metadata-directive"] = "REPLACE"
                headers["Content-Type"] = content_type or "application/octet-stream"
                headers.update(self._meta_headers(dst, metadata))
                meta = self._norm_meta(metadata)
            try:
                r = await self._call("CopyObject", dst, self._copy_sync, src, dst, headers)
            except PreconditionFailed:
                continue
            return ObjectInfo(dst, info.size, r.etag or info.etag, _http_time(r.headers) or 0.0, meta)
        raise StoreError(f"copy source {src!r} kept changing", key=src)

    def _delete_sync(self, key: str) -> None:
        self._bucket.delete_object(key)

    async def delete(self, key: str) -> None:
        """DeleteObject (§3.5): 204 whether or not the key existed."""
        try:
            await self._call("DELETE", key, self._delete_sync, key)
        except NoSuchKey:
            pass

    async def aclose(self) -> None:
        """Close the pooled connections."""
        self._session.session.close()


__all__ = ["OssStore", "region_from_endpoint", "COPY_LIMIT", "PUT_LIMIT", "CredentialsError"]
