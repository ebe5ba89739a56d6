#!/usr/bin/env python3
"""A faithful-enough Alibaba Cloud OSS REST server for tests and benchmarks.

Stdlib only (``http.server``) plus ``crcmod`` (a dependency of oss2).  Unmodified
``oss2`` (``Bucket``/``CryptoBucket``, V1 and V4 auth, ``resumable_upload``) and
``alibabacloud_oss_v2`` (``Client``/``EncryptionClient``) talk to it over real HTTP.

Everything here mimics real OSS as described in the project's research notes:

* ``shared/spec/oss-rest-api.md`` (cited below as ``API §n``): addressing, wire details,
  error format, every operation, limits, CRC-64, V1/V4 signatures.
* ``shared/spec/oss-cse-format.md`` (``CSE §n``): the client-side-encryption rules that
  OSS enforces on the server (§6 multipart, §9 copy restrictions).

Usage in a test::

    server = OssTestServer(access_key_id="ak", access_key_secret="sk", buckets=("test-bucket",))
    server.start()
    bucket = oss2.Bucket(oss2.Auth("ak", "sk"), server.endpoint, "test-bucket")
    ...
    server.faults.add(status=503, count=3, methods=("PUT",))
    server.stop()          # data is kept: start() again serves it on the same port

or ``with OssTestServer(...) as server:``.  As a separate process (benchmarks)::

    python tests/oss_server.py --port 9000 --access-key-id ID --access-key-secret S \
        --bucket NAME [--root-dir DIR]

Deviations from real OSS that were chosen on purpose are listed in ``DEVIATIONS``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import email.utils
import hashlib
import hmac
import io
import os
import random
import secrets
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http_service import ThreadedService, TrackingHTTPServer  # tests/ is on sys.path (conftest, or run as a script)
from http.server import BaseHTTPRequestHandler
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape as _xml_escape

import crcmod

__all__ = ["OssTestServer", "Faults", "RequestRecord", "crc64", "crc64_combine", "DEVIATIONS"]

DEVIATIONS = """
* Error codes OSS does not document as strings are guesses: CSE rule violations use
  Code=InvalidArgument with the documented EC (x-oss-ec header and <EC> element);
  the 8 KB user-metadata limit uses Code=MetadataTooLarge (API §3.17 [ASSUMED]).
* Multipart ETag = S3 rule (MD5 of the binary part MD5s, upper hex, "-N") (API §2.2 [ASSUMED]).
* ListObjects counts CommonPrefixes towards max-keys (S3-like, API §3.7 [ASSUMED]); a CommonPrefix
  that sorts <= marker/start-after is not repeated.
* x-oss-range-behavior: standard with several ranges -> 416; without it they are ignored (200).
* DeleteMultipleObjects and Complete do not *require* Content-MD5 (it is verified when sent).
* CSE UploadPart checks are keyed on the CSE headers being present in that UploadPart request
  (Java/C++ SDKs send none, CSE §6); size rules are enforced again at Complete for CSE uploads.
* CopyObject REPLACE on a CSE source is allowed when the CSE headers in the request are
  identical to the source's (the project brief asks for that); any change/drop -> 400.
* No versioning, ACL, tagging, symlink, append, callbacks, SSE, x-oss-process, lifecycle.
* Bucket-level: PutBucket/DeleteBucket/ListBuckets/GetBucketInfo/GetBucketLocation minimal;
  bucket names are not validated; no owner/ACL checks (any configured key pair may do anything).
* UploadPart with CSE headers but on an upload initiated without them -> EC 0005-00000418; the
  ECs for key/cek-alg/wrap-alg mismatch (-412/-414/-415) and cek-alg missing (-403) are inferred
  from the numbering of the documented ones.
* CopyObject keeps the source ETag/CRC/object type; the copy-source-if-none-match and
  -if-modified-since failures answer 304 (like GET), the other two 412.
"""

# --------------------------------------------------------------------------------------
# CRC-64 (API §5.1): CRC-64/XZ, poly 0x42F0E1EBA9EA3693 reflected, init/xorout all ones.
# --------------------------------------------------------------------------------------
_crc64_fun = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
_CRC64_POLY_REV = 0xC96C5795D7870F42


def crc64(data: bytes, crc: int = 0) -> int:
    """CRC-64/XZ as OSS's ``x-oss-hash-crc64ecma`` (check("123456789") == 11051210869376104954).

    ``crc`` is a previous result, so ``crc64(b, crc64(a)) == crc64(a + b)``."""
    return _crc64_fun(data, crc)


def _gf2_times(mat: List[int], vec: int) -> int:
    s = 0
    i = 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _gf2_square(mat: List[int]) -> List[int]:
    return [_gf2_times(mat, mat[n]) for n in range(64)]


def crc64_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc64(A + B) from crc64(A), crc64(B) and len(B) (zlib's crc32_combine, 64-bit).

    Used for the whole-object CRC of a multipart object (API §3.13, CSE §8)."""
    if len2 <= 0:
        return crc1
    odd = [_CRC64_POLY_REV] + [1 << (n - 1) for n in range(1, 64)]
    even = _gf2_square(odd)
    odd = _gf2_square(even)
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


# --------------------------------------------------------------------------------------
# Limits (API §4)
# --------------------------------------------------------------------------------------
MAX_KEY_BYTES = 1023
MAX_OBJECT_SIZE = 5 * 1024 ** 3
MIN_PART_SIZE = 100 * 1024
MAX_PART_NUMBER = 10000
MAX_USER_META = 8 * 1024
MAX_DELETE_KEYS = 1000
MAX_LIST = 1000
CLOCK_SKEW = 15 * 60

CSE_PREFIX = "x-oss-meta-client-side-encryption-"
CSE_KEY = CSE_PREFIX + "key"
CSE_START = CSE_PREFIX + "start"
CSE_CEK_ALG = CSE_PREFIX + "cek-alg"
CSE_WRAP_ALG = CSE_PREFIX + "wrap-alg"
CSE_MAGIC = CSE_PREFIX + "magic-number-hmac"
CSE_DATA_SIZE = CSE_PREFIX + "data-size"
CSE_PART_SIZE = CSE_PREFIX + "part-size"

_STD_HEADERS = ("Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language", "Expires")
_RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}

# V1 sub-resources (API §6.2): oss2 ProviderAuth._subresource_key_set.
_V1_SUBRESOURCES = frozenset([
    'response-content-type', 'response-content-language', 'response-cache-control', 'logging',
    'response-content-encoding', 'acl', 'uploadId', 'uploads', 'partNumber', 'group', 'link',
    'delete', 'website', 'location', 'objectInfo', 'objectMeta', 'response-expires',
    'response-content-disposition', 'cors', 'lifecycle', 'restore', 'qos', 'referer', 'stat',
    'bucketInfo', 'append', 'position', 'security-token', 'live', 'comp', 'status', 'vod',
    'startTime', 'endTime', 'x-oss-process', 'symlink', 'callback', 'callback-var', 'tagging',
    'encryption', 'versions', 'versioning', 'versionId', 'policy', 'requestPayment',
    'x-oss-traffic-limit', 'qosInfo', 'asyncFetch', 'x-oss-request-payer', 'sequential',
    'inventory', 'inventoryId', 'continuation-token', 'worm', 'wormId', 'wormExtend',
    'replication', 'replicationLocation', 'replicationProgress', 'transferAcceleration', 'cname',
    'metaQuery', 'x-oss-ac-source-ip', 'x-oss-ac-subnet-mask', 'x-oss-ac-vpc-id',
    'x-oss-ac-forward-allow', 'resourceGroup', 'style', 'styleName', 'x-oss-async-process',
    'regionList', 'x-oss-write-get-object-response', 'bucketArchiveDirectRead', 'httpsConfig',
    'redundancyTransition', 'x-oss-target-redundancy-type', 'x-oss-redundancy-transition-taskid',
    'accessPoint', 'accessPointPolicy', 'publicAccessBlock', 'x-oss-access-point-name',
    'requesterQosInfo', 'qosRequester', 'resourcePoolInfo', 'resourcePool', 'resourcePoolBuckets',
    'cloudboxes',
])


def _request_id() -> str:
    """24 upper-case hex characters, like real OSS (API §2.2)."""
    return secrets.token_hex(12).upper()


def _http_date(ts: float) -> str:
    """RFC 1123 ``Sat, 12 Dec 2015 00:35:53 GMT`` (two-digit day: oss2's regex, API §2.2)."""
    return email.utils.formatdate(int(ts), usegmt=True)


def _iso_date(ts: float) -> str:
    """XML timestamps must end in a literal ``.000Z`` (oss2 regex, API §2.2)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(int(ts)))


def _parse_http_date(value: str) -> Optional[float]:
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    return dt.timestamp()


def _x(s) -> str:
    return _xml_escape(str(s))


def _url_enc(s: str) -> str:
    """``encoding-type=url`` encoding: space as %20, ``+`` as %2B (API §3.7)."""
    return urllib.parse.quote(s, safe="")


def _v4_enc(s: str, keep_slash: bool) -> str:
    """V4 canonical percent-encoding: unreserved A-Za-z0-9-_.~ kept (API §6.3)."""
    return urllib.parse.quote(s, safe="/~" if keep_slash else "~")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
class OssError(Exception):
    """An OSS error response (API §2.3): XML body, or base64 ``x-oss-err`` on HEAD."""

    def __init__(self, status: int, code: str, message: str, ec: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, **extra):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.ec = ec
        self.headers = headers or {}
        self.extra = extra  # extra XML elements, in order


def _no_such_bucket(bucket):
    return OssError(404, "NoSuchBucket", "The specified bucket does not exist.", ec="0015-00000101",
                    BucketName=bucket)


def _no_such_key(key):
    return OssError(404, "NoSuchKey", "The specified key does not exist.", ec="0026-00000001", Key=key)


def _no_such_upload(upload_id):
    return OssError(404, "NoSuchUpload",
                    "The specified upload does not exist. The upload ID may be invalid, "
                    "or the upload may have been aborted or completed.", ec="0042-00000002",
                    UploadId=upload_id)


def _invalid_argument(message, name=None, value=None, ec=None):
    extra = {}
    if name is not None:
        extra["ArgumentName"] = name
        extra["ArgumentValue"] = "" if value is None else value
    return OssError(400, "InvalidArgument", message, ec=ec, **extra)


class _Abort(Exception):
    """Raised to drop the TCP connection with a RST (fault injection)."""


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------
class Blob:
    """Immutable body bytes, in memory or in a file under ``root_dir``.

    Objects share blobs (CopyObject, multipart parts); a file is removed when the last
    reference goes away."""

    __slots__ = ("size", "md5", "crc", "data", "path", "__weakref__")

    def __init__(self, size: int, md5: bytes, crc: int, data: Optional[bytes] = None,
                 path: Optional[str] = None):
        self.size = size
        self.md5 = md5
        self.crc = crc
        self.data = data
        self.path = path

    def iter_range(self, start: int, end: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
        """Yield bytes [start, end) of this blob."""
        if start >= end:
            return
        if self.data is not None:
            mv = memoryview(self.data)
            for off in range(start, end, chunk):
                yield bytes(mv[off:min(end, off + chunk)])
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                b = f.read(min(chunk, left))
                if not b:
                    raise IOError("short blob file " + self.path)
                left -= len(b)
                yield b

    def __del__(self):
        p = self.path
        if p:
            try:
                os.unlink(p)
            except OSError:
                pass


class _BlobWriter:
    def __init__(self, root_dir: Optional[str]):
        self.size = 0
        self._md5 = hashlib.md5()
        self._crc = 0
        self._root = root_dir
        if root_dir:
            fd, self._path = tempfile.mkstemp(prefix="blob-", dir=root_dir)
            self._f = os.fdopen(fd, "wb", buffering=1024 * 1024)
        else:
            self._path = None
            self._f = io.BytesIO()

    def write(self, b: bytes) -> None:
        if not b:
            return
        self._f.write(b)
        self._md5.update(b)
        self._crc = crc64(b, self._crc)
        self.size += len(b)

    def finish(self) -> Blob:
        if self._path:
            self._f.close()
            return Blob(self.size, self._md5.digest(), self._crc, path=self._path)
        return Blob(self.size, self._md5.digest(), self._crc, data=self._f.getvalue())

    def abort(self) -> None:
        self._f.close()
        if self._path:
            try:
                os.unlink(self._path)
            except OSError:
                pass


@dataclass
class StoredObject:
    key: str
    segments: List[Blob]
    size: int
    etag: str  # upper hex, no quotes
    crc: Optional[int]
    mtime: int
    content_type: str
    user_meta: Dict[str, str]  # lower-case "x-oss-meta-..." -> value
    std_headers: Dict[str, str]
    object_type: str = "Normal"
    storage_class: str = "Standard"

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) across the segments."""
        pos = 0
        for seg in self.segments:
            s0, s1 = pos, pos + seg.size
            pos = s1
            if s1 <= start or s0 >= end:
                continue
            yield from seg.iter_range(max(start, s0) - s0, min(end, s1) - s0)

    @property
    def is_cse(self) -> bool:
        return CSE_KEY in self.user_meta


@dataclass
class Part:
    number: int
    blob: Blob
    etag: str
    mtime: int

    @property
    def size(self) -> int:
        return self.blob.size


@dataclass
class Upload:
    upload_id: str
    key: str
    seq: int
    initiated: int
    content_type: str
    user_meta: Dict[str, str]
    std_headers: Dict[str, str]
    storage_class: str
    cse: Optional[Dict[str, str]] = None  # CSE headers given at Initiate
    cse_data_size: Optional[int] = None
    cse_part_size: Optional[int] = None
    parts: Dict[int, Part] = field(default_factory=dict)


class BucketState:
    def __init__(self, name: str, created: Optional[float] = None):
        self.name = name
        self.created = int(created or time.time())
        self.objects: Dict[str, StoredObject] = {}
        self.keys: List[str] = []  # sorted (code point order == UTF-8 byte order)
        self.uploads: Dict[str, Upload] = {}

    def put(self, obj: StoredObject) -> None:
        if obj.key not in self.objects:
            bisect.insort(self.keys, obj.key)
        self.objects[obj.key] = obj

    def delete(self, key: str) -> bool:
        if key in self.objects:
            del self.objects[key]
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                del self.keys[i]
            return True
        return False


# --------------------------------------------------------------------------------------
# Fault injection and request log
# --------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request as it arrived (headers lower-cased; query values decoded)."""
    method: str
    path: str
    bucket: Optional[str]
    key: Optional[str]
    query: Dict[str, str]
    headers: Dict[str, str]
    request_id: str
    time: float
    status: Optional[int] = None
    fault: Optional[str] = None


@dataclass
class _Rule:
    kind: str  # "error" | "reset" | "delay"
    count: Optional[int]
    methods: Optional[Tuple[str, ...]]
    key_prefix: Optional[str]
    bucket: Optional[str]
    query: Optional[str]
    match: Optional[Callable[[RequestRecord], bool]]
    status: int = 503
    code: Optional[str] = None
    message: Optional[str] = None
    where: Tuple[str, ...] = ("response",)
    fraction: float = 0.5
    rate: float = 1.0
    seconds: float = 0.0  # "delay": before the request is handled
    hits: int = 0

    def matches(self, rec: RequestRecord) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        if self.methods and rec.method not in self.methods:
            return False
        if self.bucket is not None and rec.bucket != self.bucket:
            return False
        if self.key_prefix is not None and (rec.key is None or not rec.key.startswith(self.key_prefix)):
            return False
        if self.query is not None and self.query not in rec.query:
            return False
        if self.match is not None and not self.match(rec):
            return False
        return True


@dataclass
class _Decision:
    error: Optional[OssError] = None
    reset_request_at: Optional[float] = None  # fraction of the request body
    reset_response_at: Optional[float] = None  # fraction of the response body
    latency: float = 0.0


class Faults:
    """Fault injection, deterministic for a given seed and request order.

    * ``add(status=503, count=3, methods=("PUT",), key_prefix=None)`` - answer the next
      ``count`` matching requests with an OSS error (after draining their body).
    * ``add_reset(count=1, where="response")`` - drop the connection (TCP RST) in the middle
      of the response body (``"response"``) or while reading the request body (``"request"``).
    * ``reset_rate(0.1, max_count=5)`` - the same at random, for a fraction of requests.
    * ``latency(0.05)`` - sleep before answering every request.
    * ``add_delay(6.0, count=1, methods=("PUT",), key_prefix="k")`` - sleep before handling the
      matching requests only.
    * ``clear()`` - remove everything. ``injected`` lists what was done.
    """

    _DEFAULT_ERRORS = {
        500: ("InternalError", "We encountered an internal error. Please try again."),
        502: ("BadGateway", "Bad gateway."),
        503: ("ServiceUnavailable", "Please reduce your request rate."),
        504: ("GatewayTimeout", "Gateway timeout."),
        429: ("TooManyRequests", "Please reduce your request rate."),
        403: ("AccessDenied", "AccessDenied"),
        404: ("NoSuchKey", "The specified key does not exist."),
    }

    def __init__(self, seed: int = 0):
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: List[_Rule] = []
        self._latency = 0.0
        self._jitter = 0.0
        self.injected: List[Tuple[str, str, str]] = []

    def seed(self, seed: int) -> None:
        with self._lock:
            self._rng = random.Random(seed)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._latency = 0.0
            self._jitter = 0.0

    def add(self, status: int = 503, count: Optional[int] = 1, methods: Optional[Sequence[str]] = None,
            key_prefix: Optional[str] = None, code: Optional[str] = None, message: Optional[str] = None,
            bucket: Optional[str] = None, query: Optional[str] = None,
            match: Optional[Callable[[RequestRecord], bool]] = None, rate: float = 1.0) -> _Rule:
        """Answer matching requests with ``status``. ``count=None`` means forever;
        ``query`` requires that query parameter (e.g. ``"uploadId"``)."""
        dc, dm = self._DEFAULT_ERRORS.get(status, ("InjectedFault", "Injected fault."))
        rule = _Rule("error", count, tuple(m.upper() for m in methods) if methods else None, key_prefix,
                     bucket, query, match, status=status, code=code or dc, message=message or dm, rate=rate)
        with self._lock:
            self._rules.append(rule)
        return rule

    def add_reset(self, count: Optional[int] = 1, where: str = "response",
                  methods: Optional[Sequence[str]] = None, key_prefix: Optional[str] = None,
                  bucket: Optional[str] = None, query: Optional[str] = None,
                  match: Optional[Callable[[RequestRecord], bool]] = None,
                  fraction: float = 0.5, rate: float = 1.0) -> _Rule:
        """Reset the connection part-way (``fraction``) through the response or request body."""
        if where not in ("response", "request"):
            raise ValueError("where must be 'response' or 'request'")
        rule = _Rule("reset", count, tuple(m.upper() for m in methods) if methods else None, key_prefix,
                     bucket, query, match, where=(where,), fraction=fraction, rate=rate)
        with self._lock:
            self._rules.append(rule)
        return rule

    def add_delay(self, seconds: float, count: Optional[int] = 1, methods: Optional[Sequence[str]] = None,
                  key_prefix: Optional[str] = None, query: Optional[str] = None) -> _Rule:
        """Sleep ``seconds`` before handling matching requests (on top of ``latency``): one slow
        object or operation while the others answer at once. The request takes effect after
        the sleep, also when the client gave up meanwhile (as a store does with what it got)."""
        rule = _Rule("delay", count, tuple(m.upper() for m in methods) if methods else None, key_prefix,
                     None, query, None, seconds=seconds)
        with self._lock:
            self._rules.append(rule)
        return rule

    def reset_rate(self, rate: float, max_count: Optional[int] = None,
                   where: Sequence[str] = ("request", "response"),
                   methods: Optional[Sequence[str]] = None, key_prefix: Optional[str] = None) -> _Rule:
        """Reset a random ``rate`` of the requests that have a body on the chosen side,
        at a random point of that body; at most ``max_count`` times."""
        rule = _Rule("reset", max_count, tuple(m.upper() for m in methods) if methods else None, key_prefix,
                     None, None, None, where=tuple(where), fraction=-1.0, rate=rate)
        with self._lock:
            self._rules.append(rule)
        return rule

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Sleep ``seconds`` (+ uniform ``jitter``) before answering each request."""
        with self._lock:
            self._latency = seconds
            self._jitter = jitter

    def _decide(self, rec: RequestRecord, has_request_body: bool) -> _Decision:
        d = _Decision()
        with self._lock:
            d.latency = self._latency + (self._rng.uniform(0, self._jitter) if self._jitter else 0.0)
            for rule in self._rules:
                if not rule.matches(rec):
                    continue
                if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                    continue
                if rule.kind == "delay":
                    d.latency += rule.seconds
                elif rule.kind == "error":
                    if d.error is not None:
                        continue
                    d.error = OssError(rule.status, rule.code, rule.message)
                else:
                    if d.reset_request_at is not None or d.reset_response_at is not None:
                        continue
                    frac = rule.fraction if rule.fraction >= 0 else self._rng.uniform(0.05, 0.95)
                    if "request" in rule.where and has_request_body:
                        if "response" in rule.where and self._rng.random() < 0.5:
                            d.reset_response_at = frac
                        else:
                            d.reset_request_at = frac
                    elif "response" in rule.where:
                        d.reset_response_at = frac
                    else:
                        continue
                if rule.count is not None:
                    rule.count -= 1
                rule.hits += 1
        return d

    def _note(self, kind: str, rec: RequestRecord) -> None:
        with self._lock:
            self.injected.append((kind, rec.method, rec.path))
        rec.fault = kind


# --------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------
class _HTTPServer(TrackingHTTPServer):
    @property
    def oss(self) -> "OssTestServer":
        return self.service


class _Response:
    def __init__(self, status: int = 200, headers: Optional[List[Tuple[str, str]]] = None,
                 body: bytes = b"", stream: Optional[Iterable[bytes]] = None,
                 length: Optional[int] = None):
        self.status = status
        self.headers = headers or []
        self.body = body
        self.stream = stream
        self.length = len(body) if length is None else length


def _xml_response(xml: str, status: int = 200, headers=None) -> _Response:
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n' + xml).encode("utf-8")
    h = [("Content-Type", "application/xml")] + list(headers or [])
    return _Response(status, h, body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (40 ms per response on Linux), as no real OSS front end does.
    disable_nagle_algorithm = True
    server_version = "AliyunOSS"
    sys_version = ""
    rbufsize = 64 * 1024

    def version_string(self):
        return "AliyunOSS"

    def log_message(self, format, *args):
        if self.server.oss.debug:
            sys.stderr.write("oss_server: " + (format % args) + "\n")

    def handle(self):
        try:
            super().handle()
        except _Abort:
            self._rst()
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError):
            pass
        except OSError:
            pass

    def _rst(self):
        """Close with SO_LINGER 0 so the peer sees a connection reset."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        for f in (self.rfile, self.wfile):
            try:
                f.close()
            except Exception:
                pass
        try:
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = lambda self: self._dispatch()

    # ---- request body -------------------------------------------------------------
    def _init_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        self._chunked = "chunked" in te
        cl = self.headers.get("Content-Length")
        self._remaining = int(cl) if (cl and not self._chunked) else 0
        self._declared_length = None if self._chunked else self._remaining
        self._body_done = not self._chunked and self._remaining == 0
        self._body_read = 0
        self._reset_request_at: Optional[int] = None

    def _has_body(self) -> bool:
        return self._chunked or self._remaining > 0

    def _raw_chunks(self) -> Iterator[bytes]:
        if self._body_done:
            return
        rf = self.rfile
        if not self._chunked:
            while self._remaining > 0:
                b = rf.read(min(256 * 1024, self._remaining))
                if not b:
                    raise ConnectionResetError("client closed during body")
                self._remaining -= len(b)
                yield b
            self._body_done = True
            return
        while True:
            line = rf.readline(65537)
            if not line:
                raise ConnectionResetError("client closed during chunked body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers
                    t = rf.readline(65537)
                    if not t or t in (b"\r\n", b"\n"):
                        break
                self._body_done = True
                return
            left = size
            while left > 0:
                b = rf.read(min(256 * 1024, left))
                if not b:
                    raise ConnectionResetError("client closed during chunk")
                left -= len(b)
                yield b
            rf.readline(3)  # CRLF

    def _body_chunks(self) -> Iterator[bytes]:
        for b in self._raw_chunks():
            if self._reset_request_at is not None and self._body_read + len(b) >= self._reset_request_at:
                self.server.oss.faults._note("reset-request", self._record)
                raise _Abort()
            self._body_read += len(b)
            yield b

    def _read_body_bytes(self, limit: int = 10 * 1024 * 1024) -> bytes:
        out = bytearray()
        for b in self._body_chunks():
            out += b
            if len(out) > limit:
                raise OssError(400, "InvalidArgument", "Request body too large.")
        return bytes(out)

    def _read_body_blob(self) -> Blob:
        w = _BlobWriter(self.server.oss.root_dir)
        try:
            for b in self._body_chunks():
                w.write(b)
        except BaseException:
            w.abort()
            raise
        return w.finish()

    def _drain(self):
        if not self._body_done:
            for _ in self._body_chunks():
                pass

    # ---- dispatch -----------------------------------------------------------------
    def _dispatch(self):
        oss: OssTestServer = self.server.oss
        self._init_body()
        rid = _request_id()
        raw_path, _, raw_query = self.path.partition("?")
        bucket = key = None
        parse_error = None
        try:
            p = raw_path
            if p.startswith("http://") or p.startswith("https://"):
                p = "/" + p.split("/", 3)[3] if p.count("/") >= 3 else "/"
            p = p[1:] if p.startswith("/") else p
            if p:
                b, sep, rest = p.partition("/")
                bucket = urllib.parse.unquote(b, errors="strict")
                if sep and rest:
                    key = urllib.parse.unquote(rest, encoding="utf-8", errors="strict")
                elif sep and not rest:
                    key = None
        except UnicodeDecodeError:
            parse_error = OssError(400, "InvalidObjectName", "The specified object is not valid.",
                                   ec="0016-00000001")
        qpairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True)
        query: Dict[str, str] = {}
        for k, v in qpairs:
            query.setdefault(k, v)
        headers = {k.lower(): v for k, v in self.headers.items()}
        rec = RequestRecord(self.command, self.path, bucket, key, query, headers, rid, time.time())
        self._record = rec
        oss._record(rec)
        self._rid = rid
        decision = oss.faults._decide(rec, self._has_body())
        if decision.latency > 0:
            time.sleep(decision.latency)
        if decision.reset_request_at is not None:
            total = self._declared_length if self._declared_length is not None else 64 * 1024
            self._reset_request_at = max(1, int(total * decision.reset_request_at))
        ctx = _Ctx(self, rec, bucket, key, query, qpairs, raw_path)
        try:
            if decision.error is not None:
                oss.faults._note("error-%d" % decision.error.status, rec)
                raise decision.error
            if parse_error:
                raise parse_error
            oss._authenticate(ctx)
            resp = oss._route(ctx)
        except OssError as e:
            resp = self._error_response(e, ctx)
        except _Abort:
            raise
        except (ConnectionResetError, BrokenPipeError):
            raise
        except Exception as e:  # a bug in the server: report as 500 so tests see it
            if oss.debug:
                import traceback
                traceback.print_exc()
            resp = self._error_response(OssError(500, "InternalError", "Server bug: %r" % (e,)), ctx)
        try:
            self._drain()
        except _Abort:
            raise
        rec.status = resp.status
        self._send(resp, decision.reset_response_at)

    def _error_response(self, e: OssError, ctx: "_Ctx") -> _Response:
        host = self.headers.get("Host") or "127.0.0.1"
        parts = ["<Error>", f"<Code>{_x(e.code)}</Code>", f"<Message>{_x(e.message)}</Message>",
                 f"<RequestId>{self._rid}</RequestId>", f"<HostId>{_x(host)}</HostId>"]
        for k, v in e.extra.items():
            parts.append(f"<{k}>{_x(v)}</{k}>")
        if e.ec:
            parts.append(f"<EC>{e.ec}</EC>")
        parts.append("</Error>")
        xml = '<?xml version="1.0" encoding="UTF-8"?>\n' + "".join(parts)
        headers = [("Content-Type", "application/xml")]
        if e.ec:
            headers.append(("x-oss-ec", e.ec))
        headers += list(e.headers.items())
        if e.status == 304:
            return _Response(304, list(e.headers.items()), b"", length=0)
        if self.command == "HEAD":
            # HEAD has no body: OSS puts the error XML, base64, in x-oss-err (API §2.3).
            headers.append(("x-oss-err", base64.b64encode(xml.encode("utf-8")).decode("ascii")))
            return _Response(e.status, headers, b"", length=0)
        return _Response(e.status, headers, xml.encode("utf-8"))

    def _send(self, resp: _Response, reset_at: Optional[float]):
        self.send_response(resp.status)
        self.send_header("x-oss-request-id", self._rid)
        names = set()
        tamper = self.server.oss.crc_tamper
        for k, v in resp.headers:
            names.add(k.lower())
            if tamper and k.lower() == "x-oss-hash-crc64ecma":
                v = str((int(v) + tamper) % (1 << 64))
            self.send_header(k, v)
        if "content-length" not in names:
            self.send_header("Content-Length", str(resp.length))
        if self.headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD" or resp.status in (204, 304):
            return
        cut = None
        if reset_at is not None and resp.length > 0:
            cut = max(0, min(resp.length - 1, int(resp.length * reset_at)))
        sent = 0
        chunks = resp.stream if resp.stream is not None else ([resp.body] if resp.body else [])
        for b in chunks:
            if cut is not None and sent + len(b) > cut:
                if cut > sent:
                    self.wfile.write(b[:cut - sent])
                self.server.oss.faults._note("reset-response", self._record)
                raise _Abort()
            self.wfile.write(b)
            sent += len(b)


class _Ctx:
    def __init__(self, h: _Handler, rec: RequestRecord, bucket, key, query, qpairs, raw_path):
        self.h = h
        self.rec = rec
        self.method = h.command
        self.bucket = bucket
        self.key = key
        self.query = query
        self.qpairs = qpairs
        self.raw_path = raw_path
        self.headers = h.headers  # case-insensitive
        self.access_key_id: Optional[str] = None

    def hdr(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self.headers.get(name, default)


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------
class OssTestServer(ThreadedService):
    """In-process OSS server on 127.0.0.1.

    :param access_key_id/access_key_secret: the key pair that signs requests; more pairs via
        ``credentials={"ak": "sk", ...}``.
    :param buckets: buckets that exist from the start.
    :param root_dir: if given, object bodies are files there (GiB objects don't fill RAM).
    :param security_tokens: ``None`` accepts any ``x-oss-security-token`` (STS) for a configured
        key pair; a collection restricts it to those tokens (others -> 403 InvalidSecurityToken).
    :param max_skew: reject V1/V4 header-signed requests whose date is further off (15 min, as
        OSS); ``None`` disables the check.
    :param allow_anonymous: serve unsigned requests (real OSS: AccessDenied on private buckets).
    :param seed: seed of the fault-injection RNG.
    """

    def __init__(self, access_key_id: str = "test-ak", access_key_secret: str = "test-sk",
                 buckets: Sequence[str] = ("test-bucket",), port: int = 0, host: str = "127.0.0.1",
                 root_dir: Optional[str] = None, credentials: Optional[Dict[str, str]] = None,
                 security_tokens: Optional[Iterable[str]] = None, max_skew: Optional[int] = CLOCK_SKEW,
                 allow_anonymous: bool = False, region: str = "cn-hangzhou", seed: int = 0,
                 debug: bool = False):
        self.credentials = dict(credentials or {})
        if access_key_id:
            self.credentials[access_key_id] = access_key_secret
        self.security_tokens = set(security_tokens) if security_tokens is not None else None
        self.max_skew = max_skew
        self.allow_anonymous = allow_anonymous
        self.region = region
        self.host = host
        self.port = port
        self.root_dir = root_dir
        if root_dir:
            os.makedirs(root_dir, exist_ok=True)
        self.debug = debug
        #: test knob: added to every x-oss-hash-crc64ecma sent, to prove that clients check CRCs
        self.crc_tamper = 0
        self.faults = Faults(seed)
        self.requests: List[RequestRecord] = []
        self._req_lock = threading.Lock()
        self.lock = threading.RLock()
        self.buckets: Dict[str, BucketState] = {}
        for b in buckets:
            self.buckets[b] = BucketState(b)
        self._upload_seq = 0
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ----------------------------------------------------------------
    thread_name = "oss-test-server"

    def _new_httpd(self):
        return _HTTPServer((self.host, self.port), _Handler, self)

    def serve_forever(self) -> None:
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()


    # ---- helpers for tests ----------------------------------------------------------
    def create_bucket(self, name: str) -> None:
        with self.lock:
            self.buckets.setdefault(name, BucketState(name))

    def clear_requests(self) -> None:
        with self._req_lock:
            self.requests.clear()

    def pending_upload_count(self) -> int:
        """Unfinished multipart uploads in all buckets (tests check none is left behind)."""
        with self.lock:
            return sum(len(b.uploads) for b in self.buckets.values())

    def requests_for(self, method: Optional[str] = None, key: Optional[str] = None,
                     query: Optional[str] = None) -> List[RequestRecord]:
        with self._req_lock:
            reqs = list(self.requests)
        return [r for r in reqs if (method is None or r.method == method) and
                (key is None or r.key == key) and (query is None or query in r.query)]

    def get_object_bytes(self, bucket: str, key: str) -> bytes:
        """The stored bytes (ciphertext for CSE objects), bypassing HTTP."""
        with self.lock:
            obj = self.buckets[bucket].objects[key]
        return b"".join(obj.iter_range(0, obj.size))

    def flip_bit(self, bucket: str, key: str, offset: int, bit: int = 0x10, keep_crc: bool = False) -> None:
        """Flip bits ``bit`` of byte ``offset`` of the stored body of ``key`` in place (its
        blob, shared with copies of it) and recompute the object's CRC-64, so only a check of
        the content itself notices: damage (or a tamperer) the server cannot see. ``keep_crc``:
        the CRC-64 stays the old one (damage at rest that a reader's CRC check sees)."""
        with self.lock:
            obj = self.buckets[bucket].objects[key]
            pos = 0
            for seg in obj.segments:
                if pos <= offset < pos + seg.size:
                    at = offset - pos
                    if seg.data is not None:
                        data = bytearray(seg.data)
                        data[at] ^= bit
                        seg.data = bytes(data)
                    else:
                        with open(seg.path, "r+b") as f:
                            f.seek(at)
                            b = f.read(1)
                            f.seek(at)
                            f.write(bytes([b[0] ^ bit]))
                    break
                pos += seg.size
            else:
                raise ValueError(f"offset {offset} is past the end of {key!r}")
            if not keep_crc:
                obj.crc = crc64(b"".join(obj.iter_range(0, obj.size)))

    def object_meta(self, bucket: str, key: str) -> Dict[str, str]:
        with self.lock:
            return dict(self.buckets[bucket].objects[key].user_meta)

    def _record(self, rec: RequestRecord) -> None:
        with self._req_lock:
            self.requests.append(rec)
            if len(self.requests) > 100000:
                del self.requests[:50000]

    # ---- authentication (API §6) ---------------------------------------------------
    def _secret_for(self, ak: str) -> str:
        if ak not in self.credentials:
            raise OssError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.",
                           ec="0002-00000902", OSSAccessKeyId=ak)
        return self.credentials[ak]

    def _check_token(self, token: Optional[str]) -> None:
        if token is None or self.security_tokens is None:
            return
        if token not in self.security_tokens:
            raise OssError(403, "InvalidSecurityToken", "The security token you provided is invalid.",
                           ec="0002-00000080")

    def _check_skew(self, ts: Optional[float]) -> None:
        if self.max_skew is None:
            return
        if ts is None:
            raise OssError(403, "AccessDenied", "Invalid date format or missing date.", ec="0002-00000010")
        now = time.time()
        if abs(now - ts) > self.max_skew:
            raise OssError(403, "RequestTimeTooSkewed",
                           "The difference between the request time and the current time is too large.",
                           ec="0002-00000504", RequestTime=_http_date(ts), ServerTime=_http_date(now))

    def _v1_string_to_sign(self, ctx: _Ctx, date: str, query_auth: bool) -> str:
        hdrs = ctx.headers
        oss_headers = sorted((k.lower(), v) for k, v in hdrs.items() if k.lower().startswith("x-oss-"))
        canon_h = "".join(f"{k}:{v}\n" for k, v in oss_headers)
        if ctx.bucket is None:
            resource = "/"
        else:
            resource = f"/{ctx.bucket}/{ctx.key or ''}"
        subs = sorted((k, v) for k, v in ctx.qpairs if k in _V1_SUBRESOURCES)
        if subs:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in subs)
        return "\n".join([ctx.method, hdrs.get("Content-MD5", ""), hdrs.get("Content-Type", ""), date,
                          canon_h + resource])

    def _v4_canonical_request(self, ctx: _Ctx, additional: List[str], exclude_query=("x-oss-signature",),
                              hashed_payload: Optional[str] = None) -> str:
        if ctx.bucket is None:
            uri = "/"
        else:
            uri = f"/{ctx.bucket}/{ctx.key or ''}"
        canon_uri = _v4_enc(uri, True)
        pairs = sorted((_v4_enc(k, False), _v4_enc(v, False)) for k, v in ctx.qpairs if k not in exclude_query)
        canon_q = "&".join(f"{k}={v}" if v else k for k, v in pairs)
        addl = set(additional)
        hs = []
        for k, v in ctx.headers.items():
            lk = k.lower()
            if lk.startswith("x-oss-") or lk in ("content-type", "content-md5") or lk in addl:
                hs.append((lk, v.strip()))
        hs.sort()
        canon_h = "".join(f"{k}:{v}\n" for k, v in hs)
        if hashed_payload is None:
            hashed_payload = ctx.headers.get("x-oss-content-sha256", "UNSIGNED-PAYLOAD")
        return "\n".join([ctx.method, canon_uri, canon_q, canon_h, ";".join(sorted(addl)), hashed_payload])

    @staticmethod
    def _v4_signature(secret: str, date: str, region: str, product: str, sts: str) -> str:
        k = hmac.new(("aliyun_v4" + secret).encode(), date.encode(), hashlib.sha256).digest()
        k = hmac.new(k, region.encode(), hashlib.sha256).digest()
        k = hmac.new(k, product.encode(), hashlib.sha256).digest()
        k = hmac.new(k, b"aliyun_v4_request", hashlib.sha256).digest()
        return hmac.new(k, sts.encode("utf-8"), hashlib.sha256).hexdigest()

    def _sig_mismatch(self, ak: str, provided: str, sts: str, canonical: Optional[str] = None) -> OssError:
        extra = dict(OSSAccessKeyId=ak, SignatureProvided=provided, StringToSign=sts,
                     StringToSignBytes=" ".join("%02x" % c for c in sts.encode("utf-8")))
        if canonical is not None:
            extra["CanonicalRequest"] = canonical
        return OssError(403, "SignatureDoesNotMatch",
                        "The request signature we calculated does not match the signature you provided. "
                        "Check your key and signing method.", ec="0002-00000040", **extra)

    def _authenticate(self, ctx: _Ctx) -> None:
        """Verify V1 / V4 header signatures and V1 / V4 presigned URLs (API §6.2-6.5)."""
        auth = ctx.hdr("Authorization")
        q = ctx.query
        if auth and auth.startswith("OSS "):
            ak, _, sig = auth[4:].strip().rpartition(":")
            secret = self._secret_for(ak)
            date = ctx.hdr("x-oss-date") or ctx.hdr("Date") or ""
            sts = self._v1_string_to_sign(ctx, date, False)
            want = base64.b64encode(hmac.new(secret.encode(), sts.encode("utf-8"), hashlib.sha1).digest()).decode()
            if not hmac.compare_digest(want, sig):
                raise self._sig_mismatch(ak, sig, sts)
            self._check_skew(_parse_http_date(date))
            self._check_token(ctx.hdr("x-oss-security-token") or ctx.hdr("security-token"))
            ctx.access_key_id = ak
            return
        if auth and auth.startswith("OSS4-HMAC-SHA256"):
            fields = {}
            for item in auth[len("OSS4-HMAC-SHA256"):].split(","):
                k, _, v = item.strip().partition("=")
                if k:
                    fields[k.strip()] = v.strip()
            cred = fields.get("Credential", "")
            sig = fields.get("Signature", "")
            addl = [h.strip().lower() for h in fields.get("AdditionalHeaders", "").split(";") if h.strip()]
            parts = cred.split("/")
            if len(parts) != 5 or parts[4] != "aliyun_v4_request":
                raise OssError(400, "InvalidArgument", "Invalid credential in Authorization header.",
                               ec="0002-00000226")
            ak, day, region, product = parts[0], parts[1], parts[2], parts[3]
            secret = self._secret_for(ak)
            xdate = ctx.hdr("x-oss-date") or ""
            canonical = self._v4_canonical_request(ctx, addl)
            sts = "\n".join(["OSS4-HMAC-SHA256", xdate, f"{day}/{region}/{product}/aliyun_v4_request",
                             hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
            want = self._v4_signature(secret, day, region, product, sts)
            if not hmac.compare_digest(want, sig):
                raise self._sig_mismatch(ak, sig, sts, canonical)
            ts = None
            try:
                ts = calendar.timegm(time.strptime(xdate, "%Y%m%dT%H%M%SZ"))
            except ValueError:
                pass
            self._check_skew(ts)
            self._check_token(ctx.hdr("x-oss-security-token"))
            ctx.access_key_id = ak
            return
        if "OSSAccessKeyId" in q and "Signature" in q:
            ak = q["OSSAccessKeyId"]
            secret = self._secret_for(ak)
            expires = q.get("Expires", "")
            sts = self._v1_string_to_sign(ctx, expires, True)
            want = base64.b64encode(hmac.new(secret.encode(), sts.encode("utf-8"), hashlib.sha1).digest()).decode()
            if not hmac.compare_digest(want, q["Signature"]):
                raise self._sig_mismatch(ak, q["Signature"], sts)
            try:
                exp = int(expires)
            except ValueError:
                exp = 0
            if time.time() > exp:
                raise OssError(403, "AccessDenied", "Request has expired.", ec="0002-00000069",
                               Expires=_iso_date(exp), ServerTime=_iso_date(time.time()))
            self._check_token(q.get("security-token"))
            ctx.access_key_id = ak
            return
        if q.get("x-oss-signature-version") == "OSS4-HMAC-SHA256":
            cred = q.get("x-oss-credential", "")
            parts = cred.split("/")
            if len(parts) != 5:
                raise OssError(400, "InvalidArgument", "Invalid x-oss-credential.", ec="0002-00000226")
            ak, day, region, product = parts[0], parts[1], parts[2], parts[3]
            secret = self._secret_for(ak)
            addl = [h for h in q.get("x-oss-additional-headers", "").lower().split(";") if h]
            xdate = q.get("x-oss-date", "")
            canonical = self._v4_canonical_request(ctx, addl, hashed_payload="UNSIGNED-PAYLOAD")
            sts = "\n".join(["OSS4-HMAC-SHA256", xdate, f"{day}/{region}/{product}/aliyun_v4_request",
                             hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
            sig = q.get("x-oss-signature", "")
            want = self._v4_signature(secret, day, region, product, sts)
            if not hmac.compare_digest(want, sig):
                raise self._sig_mismatch(ak, sig, sts, canonical)
            try:
                ts = calendar.timegm(time.strptime(xdate, "%Y%m%dT%H%M%SZ"))
                exp = ts + int(q.get("x-oss-expires", "0"))
            except ValueError:
                exp = 0
            if time.time() > exp:
                raise OssError(403, "AccessDenied", "Request has expired.", ec="0002-00000069")
            self._check_token(q.get("x-oss-security-token"))
            ctx.access_key_id = ak
            return
        if self.allow_anonymous:
            return
        raise OssError(403, "AccessDenied", "You have no right to access this object because of bucket acl.",
                       ec="0003-00000001")

    # ---- routing ------------------------------------------------------------------
    def _bucket(self, name: str) -> BucketState:
        b = self.buckets.get(name)
        if b is None:
            raise _no_such_bucket(name)
        return b

    def _route(self, ctx: _Ctx) -> _Response:
        m, q = ctx.method, ctx.query
        if ctx.bucket is None:
            if m == "GET":
                return self._list_buckets(ctx)
            raise OssError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        if ctx.key is None:
            if m == "GET":
                if "uploads" in q:
                    return self._list_uploads(ctx)
                if "location" in q:
                    self._bucket(ctx.bucket)
                    return _xml_response(f"<LocationConstraint>oss-{_x(self.region)}</LocationConstraint>")
                if "bucketInfo" in q:
                    return self._bucket_info(ctx)
                for sub in ("acl", "cors", "lifecycle", "logging", "website", "referer", "versioning",
                            "tagging", "encryption", "policy", "stat", "worm", "inventory", "replication"):
                    if sub in q:
                        raise OssError(501, "NotImplemented", f"?{sub} is not implemented by the test server.")
                if q.get("list-type") == "2":
                    return self._list_objects(ctx, v2=True)
                return self._list_objects(ctx, v2=False)
            if m == "POST" and "delete" in q:
                return self._delete_multiple(ctx)
            if m == "PUT" and not q:
                ctx.h._drain()
                with self.lock:
                    self.buckets.setdefault(ctx.bucket, BucketState(ctx.bucket))
                return _Response(200, [("Location", "/" + ctx.bucket)])
            if m == "DELETE" and not q:
                with self.lock:
                    b = self._bucket(ctx.bucket)
                    if b.objects or b.uploads:
                        raise OssError(409, "BucketNotEmpty", "The bucket you tried to delete is not empty.",
                                       ec="0015-00000301", BucketName=ctx.bucket)
                    del self.buckets[ctx.bucket]
                return _Response(204)
            if m == "HEAD":
                self._bucket(ctx.bucket)
                return _Response(200)
            raise OssError(501, "NotImplemented", "This bucket operation is not implemented by the test server.")
        self._check_key(ctx.key)
        for sub in ("acl", "tagging", "symlink", "append", "restore", "x-oss-process", "versions", "versionId"):
            if sub in q:
                raise OssError(501, "NotImplemented", f"?{sub} is not implemented by the test server.")
        if m == "PUT":
            if "uploadId" in q or "partNumber" in q:
                if ctx.hdr("x-oss-copy-source"):
                    return self._upload_part_copy(ctx)
                return self._upload_part(ctx)
            if ctx.hdr("x-oss-copy-source"):
                return self._copy_object(ctx)
            return self._put_object(ctx)
        if m == "GET":
            if "uploadId" in q:
                return self._list_parts(ctx)
            return self._get_object(ctx, head=False)
        if m == "HEAD":
            if "objectMeta" in q:
                return self._get_object_meta(ctx)
            return self._get_object(ctx, head=True)
        if m == "DELETE":
            if "uploadId" in q:
                return self._abort_upload(ctx)
            return self._delete_object(ctx)
        if m == "POST":
            if "uploads" in q:
                return self._initiate_upload(ctx)
            if "uploadId" in q:
                return self._complete_upload(ctx)
        raise OssError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")

    # ---- validation helpers ----------------------------------------------------------
    @staticmethod
    def _check_key(key: str) -> None:
        """Object names: 1-1023 UTF-8 bytes, not starting with / or \\ (API §4)."""
        if not key or len(key.encode("utf-8")) > MAX_KEY_BYTES or key[0] in "/\\":
            raise OssError(400, "InvalidObjectName", "The specified object is not valid.",
                           ec="0016-00000005", ObjectName=key)

    @staticmethod
    def _user_meta(ctx: _Ctx) -> Dict[str, str]:
        """``x-oss-meta-*``: names folded to lower case, letters/digits/'-' only, names+values <= 8 KB
        (API §3.17)."""
        meta = {}
        total = 0
        for k, v in ctx.headers.items():
            lk = k.lower()
            if not lk.startswith("x-oss-meta-"):
                continue
            name = lk[len("x-oss-meta-"):]
            if not name or any(not (c.isascii() and (c.isalnum() or c == "-")) for c in name):
                raise _invalid_argument("The user metadata name is invalid.", k, v, ec="0011-00000004")
            total += len(name) + len(v.encode("latin-1", "replace"))
            meta[lk] = v
        if total > MAX_USER_META:
            raise OssError(400, "MetadataTooLarge", "Your metadata headers exceed the maximum allowed metadata size.",
                           ec="0011-00000002", MaxSizeAllowed=str(MAX_USER_META))
        return meta

    @staticmethod
    def _std_headers(ctx: _Ctx) -> Dict[str, str]:
        return {h: ctx.hdr(h) for h in _STD_HEADERS if ctx.hdr(h) is not None}

    @staticmethod
    def _forbid_overwrite(ctx: _Ctx) -> bool:
        return (ctx.hdr("x-oss-forbid-overwrite") or "").lower() == "true"

    @staticmethod
    def _file_exists(key: str) -> OssError:
        return OssError(409, "FileAlreadyExists", "The object you specified already exists and can not be overwritten.",
                        ec="0026-00000002", Key=key)

    @staticmethod
    def _check_md5(ctx: _Ctx, blob_md5: bytes) -> None:
        want = ctx.hdr("Content-MD5")
        if want is not None and want.strip() != base64.b64encode(blob_md5).decode():
            raise OssError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.",
                           ec="0003-00000003", **{"Content-MD5": want})

    @staticmethod
    def _cse_headers(ctx: _Ctx) -> Dict[str, str]:
        return {k.lower(): v for k, v in ctx.headers.items() if k.lower().startswith(CSE_PREFIX)}

    @staticmethod
    def _cse_err(ec: str, message: str) -> OssError:
        return OssError(400, "InvalidArgument", message, ec=ec)

    def _cse_validate(self, cse: Dict[str, str], multipart: bool) -> Tuple[Optional[int], Optional[int]]:
        """CSE rules OSS enforces when any ``x-oss-meta-client-side-encryption-*`` header is present
        on PutObject / InitiateMultipartUpload / UploadPart (CSE §6 'Server-side enforcement',
        EC 0005-00000401..410). Returns (data_size, part_size) for multipart requests."""
        if not cse:
            return None, None
        for name, ec in ((CSE_KEY, "0005-00000401"), (CSE_START, "0005-00000402"),
                         (CSE_CEK_ALG, "0005-00000403"), (CSE_WRAP_ALG, "0005-00000404")):
            if not cse.get(name):
                raise self._cse_err(ec, f"Missing header {name} for client-side encryption.")
        if cse.get(CSE_WRAP_ALG, "").lower() == "rsa" and not cse.get(CSE_MAGIC):
            raise self._cse_err("0005-00000405", f"Missing header {CSE_MAGIC} for client-side encryption.")
        if not multipart:
            return None, None
        if CSE_DATA_SIZE not in cse:
            raise self._cse_err("0005-00000406", f"Missing header {CSE_DATA_SIZE} for client-side encryption.")
        if CSE_PART_SIZE not in cse:
            raise self._cse_err("0005-00000407", f"Missing header {CSE_PART_SIZE} for client-side encryption.")
        try:
            data_size = int(cse[CSE_DATA_SIZE].strip())
            if data_size < 0:
                raise ValueError
        except ValueError:
            raise self._cse_err("0005-00000408", f"Header {CSE_DATA_SIZE} must be an integer.")
        try:
            part_size = int(cse[CSE_PART_SIZE].strip())
            if part_size <= 0:
                raise ValueError
        except ValueError:
            raise self._cse_err("0005-00000409", f"Header {CSE_PART_SIZE} must be an integer.")
        if part_size % 16 != 0:
            raise self._cse_err("0005-00000409", f"Header {CSE_PART_SIZE} must be a multiple of 16.")
        if -(-data_size // part_size) > MAX_PART_NUMBER:
            raise self._cse_err("0005-00000410", "The data size and part size give more than 10000 parts.")
        return data_size, part_size

    # ---- object operations ------------------------------------------------------------
    def _new_object(self, ctx: _Ctx, key: str, blob: Blob, meta: Dict[str, str]) -> StoredObject:
        return StoredObject(key=key, segments=[blob], size=blob.size, etag=blob.md5.hex().upper(),
                            crc=blob.crc, mtime=int(time.time()),
                            content_type=ctx.hdr("Content-Type") or "application/octet-stream",
                            user_meta=meta, std_headers=self._std_headers(ctx),
                            storage_class=ctx.hdr("x-oss-storage-class") or "Standard")

    def _put_object(self, ctx: _Ctx) -> _Response:
        """PutObject (API §3.1): stores the body, returns ETag, CRC64 and Content-MD5."""
        with self.lock:
            self._bucket(ctx.bucket)
        declared = ctx.h._declared_length
        if declared is not None and declared > MAX_OBJECT_SIZE:
            ctx.h.close_connection = True
            ctx.h._body_done = True
            raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.",
                           ec="0026-00000006")
        meta = self._user_meta(ctx)
        self._cse_validate(self._cse_headers(ctx), multipart=False)
        blob = ctx.h._read_body_blob()
        self._check_md5(ctx, blob.md5)
        with self.lock:
            b = self._bucket(ctx.bucket)
            if self._forbid_overwrite(ctx) and ctx.key in b.objects:
                raise self._file_exists(ctx.key)
            obj = self._new_object(ctx, ctx.key, blob, meta)
            b.put(obj)
        return _Response(200, [("ETag", f'"{obj.etag}"'), ("x-oss-hash-crc64ecma", str(obj.crc)),
                               ("Content-MD5", base64.b64encode(blob.md5).decode())])

    @staticmethod
    def _etag_matches(header: str, etag: str) -> bool:
        for t in header.split(","):
            t = t.strip()
            if t.startswith("W/"):
                t = t[2:]
            if t == "*" or t.strip('"').upper() == etag.upper():
                return True
        return False

    def _check_conditions(self, obj: StoredObject, im, inm, ims, ius, not_modified_status=304) -> None:
        """If-Match / If-Unmodified-Since -> 412; If-None-Match / If-Modified-Since -> 304 (API §3.2)."""
        etag_h = {"ETag": f'"{obj.etag}"', "Last-Modified": _http_date(obj.mtime)}
        if im is not None and not self._etag_matches(im, obj.etag):
            raise OssError(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.",
                           ec="0026-00000004", Condition="If-Match")
        if ius is not None and im is None:
            t = _parse_http_date(ius)
            if t is not None and obj.mtime > t:
                raise OssError(412, "PreconditionFailed",
                               "At least one of the pre-conditions you specified did not hold.",
                               ec="0026-00000004", Condition="If-Unmodified-Since")
        if inm is not None and self._etag_matches(inm, obj.etag):
            raise OssError(not_modified_status, "NotModified", "Not Modified", headers=etag_h)
        if ims is not None and inm is None:
            t = _parse_http_date(ims)
            if t is not None and obj.mtime <= t:
                raise OssError(not_modified_status, "NotModified", "Not Modified", headers=etag_h)

    @staticmethod
    def _parse_range(value: Optional[str], size: int, standard: bool) -> Optional[Tuple[int, int]]:
        """Range semantics of OSS (API §3.2). Returns inclusive (a, b) or None for a full 200."""
        if not value:
            return None
        v = value.strip()
        if not v.startswith("bytes="):
            return None
        spec = v[6:].strip()
        if "," in spec:
            if standard:
                raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.", ec="0026-00000005",
                               headers={"Content-Range": f"bytes */{size}"})
            return None
        a, sep, b = spec.partition("-")
        a, b = a.strip(), b.strip()
        if not sep or (not a and not b) or (a and not a.isdigit()) or (b and not b.isdigit()):
            return None
        if not a:  # suffix
            n = int(b)
            if n == 0:
                if standard:
                    raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.",
                                   ec="0026-00000005", headers={"Content-Range": f"bytes */{size}"})
                return None
            if n > size:
                if not standard or size == 0:
                    if standard:
                        raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.",
                                       ec="0026-00000005", headers={"Content-Range": f"bytes */{size}"})
                    return None
                n = size
            return size - n, size - 1
        start = int(a)
        end = int(b) if b else size - 1
        if b and end < start:
            return None
        if start >= size:
            if standard:
                raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.", ec="0026-00000005",
                               headers={"Content-Range": f"bytes */{size}"})
            return None
        if end >= size:
            if not standard:
                return None
            end = size - 1
        return start, end

    def _object_headers(self, obj: StoredObject) -> List[Tuple[str, str]]:
        h = [("Content-Type", obj.content_type), ("ETag", f'"{obj.etag}"'),
             ("Last-Modified", _http_date(obj.mtime)), ("Accept-Ranges", "bytes"),
             ("x-oss-object-type", obj.object_type), ("x-oss-storage-class", obj.storage_class)]
        if obj.crc is not None:
            h.append(("x-oss-hash-crc64ecma", str(obj.crc)))
        for k, v in obj.std_headers.items():
            h.append((k, v))
        for k, v in obj.user_meta.items():
            h.append((k, v))
        return h

    def _get_object(self, ctx: _Ctx, head: bool) -> _Response:
        """GetObject / HeadObject (API §3.2, §3.3): ranges (legacy and ``standard``), conditional
        headers, ``response-*`` overrides, whole-object CRC even on 206."""
        with self.lock:
            b = self._bucket(ctx.bucket)
            obj = b.objects.get(ctx.key)
        if obj is None:
            raise _no_such_key(ctx.key)
        self._check_conditions(obj, ctx.hdr("If-Match"), ctx.hdr("If-None-Match"),
                               ctx.hdr("If-Modified-Since"), ctx.hdr("If-Unmodified-Since"))
        headers = self._object_headers(obj)
        for qn, hn in _RESPONSE_OVERRIDES.items():
            if qn in ctx.query and not head:
                headers = [(k, v) for k, v in headers if k.lower() != hn.lower()] + [(hn, ctx.query[qn])]
        if head:
            headers.append(("Content-Length", str(obj.size)))
            return _Response(200, headers, b"", length=obj.size)
        standard = (ctx.hdr("x-oss-range-behavior") or "").lower() == "standard"
        rng = self._parse_range(ctx.hdr("Range"), obj.size, standard)
        if rng is None:
            return _Response(200, headers, stream=obj.iter_range(0, obj.size), length=obj.size)
        a, e = rng
        headers.append(("Content-Range", f"bytes {a}-{e}/{obj.size}"))
        return _Response(206, headers, stream=obj.iter_range(a, e + 1), length=e - a + 1)

    def _get_object_meta(self, ctx: _Ctx) -> _Response:
        """GetObjectMeta (API §3.4): ETag, size, Last-Modified, CRC; no user metadata."""
        with self.lock:
            b = self._bucket(ctx.bucket)
            obj = b.objects.get(ctx.key)
        if obj is None:
            raise _no_such_key(ctx.key)
        h = [("ETag", f'"{obj.etag}"'), ("Content-Length", str(obj.size)),
             ("Last-Modified", _http_date(obj.mtime)), ("x-oss-last-access-time", _http_date(obj.mtime))]
        if obj.crc is not None:
            h.append(("x-oss-hash-crc64ecma", str(obj.crc)))
        return _Response(200, h, b"", length=obj.size)

    def _delete_object(self, ctx: _Ctx) -> _Response:
        """DeleteObject (API §3.5): 204 even when the key does not exist."""
        with self.lock:
            b = self._bucket(ctx.bucket)
            b.delete(ctx.key)
        return _Response(204)

    def _delete_multiple(self, ctx: _Ctx) -> _Response:
        """DeleteMultipleObjects (API §3.6): verbose result lists every key; quiet mode -> empty 200."""
        with self.lock:
            self._bucket(ctx.bucket)
        body = ctx.h._read_body_bytes()
        self._check_md5(ctx, hashlib.md5(body).digest())
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed or did not validate "
                           "against our published schema.", ec="0016-00000608")
        quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
        keys = [o.findtext("Key") for o in root.findall("Object")]
        if not keys or len(keys) > MAX_DELETE_KEYS or any(k is None for k in keys):
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed or did not validate "
                           "against our published schema.", ec="0016-00000608")
        with self.lock:
            b = self._bucket(ctx.bucket)
            for k in keys:
                b.delete(k)
        if quiet:
            return _Response(200, [("Content-Type", "application/xml")], b"")
        enc = ctx.query.get("encoding-type") == "url"
        parts = ["<DeleteResult>"]
        if enc:
            parts.append("<EncodingType>url</EncodingType>")
        for k in keys:
            parts.append(f"<Deleted><Key>{_x(_url_enc(k) if enc else k)}</Key></Deleted>")
        parts.append("</DeleteResult>")
        return _xml_response("".join(parts))

    def _parse_copy_source(self, ctx: _Ctx) -> Tuple[str, str]:
        src = ctx.hdr("x-oss-copy-source") or ""
        src = src.split("?", 1)[0]
        if src.startswith("/"):
            src = src[1:]
        sb, _, sk = src.partition("/")
        try:
            sb = urllib.parse.unquote(sb, errors="strict")
            sk = urllib.parse.unquote(sk, errors="strict")
        except UnicodeDecodeError:
            sk = ""
        if not sb or not sk:
            raise _invalid_argument("Copy Source must mention the source bucket and key: /sourcebucket/sourcekey.",
                                    "x-oss-copy-source", ctx.hdr("x-oss-copy-source"), ec="0017-00000801")
        return sb, sk

    def _copy_source_object(self, ctx: _Ctx) -> StoredObject:
        sb, sk = self._parse_copy_source(ctx)
        with self.lock:
            sbucket = self._bucket(sb)
            src = sbucket.objects.get(sk)
        if src is None:
            raise _no_such_key(sk)
        # x-oss-copy-source-if-*: 412 for if-match / if-unmodified-since, 304 for the others.
        self._check_conditions(src, ctx.hdr("x-oss-copy-source-if-match"), ctx.hdr("x-oss-copy-source-if-none-match"),
                               ctx.hdr("x-oss-copy-source-if-modified-since"),
                               ctx.hdr("x-oss-copy-source-if-unmodified-since"))
        return src

    def _copy_object(self, ctx: _Ctx) -> _Response:
        """CopyObject (API §3.9) with COPY/REPLACE; CSE metadata of an encrypted source is protected
        (CSE §9, EC 0005-00000421)."""
        with self.lock:
            self._bucket(ctx.bucket)
        src = self._copy_source_object(ctx)
        directive = (ctx.hdr("x-oss-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise _invalid_argument("Unknown metadata directive.", "x-oss-metadata-directive",
                                    ctx.hdr("x-oss-metadata-directive"), ec="0017-00000701")
        if directive == "REPLACE":
            meta = self._user_meta(ctx)
            if src.is_cse:
                old = {k: v for k, v in src.user_meta.items() if k.startswith(CSE_PREFIX)}
                new = {k: v for k, v in meta.items() if k.startswith(CSE_PREFIX)}
                if old != new:
                    raise self._cse_err("0005-00000421", "Metadata of a client-side encrypted object "
                                        "cannot be modified by CopyObject.")
            content_type = ctx.hdr("Content-Type") or "application/octet-stream"
            std = self._std_headers(ctx)
        else:
            meta = dict(src.user_meta)
            content_type = src.content_type
            std = dict(src.std_headers)
        now = int(time.time())
        with self.lock:
            b = self._bucket(ctx.bucket)
            if self._forbid_overwrite(ctx) and ctx.key in b.objects:
                raise self._file_exists(ctx.key)
            obj = StoredObject(key=ctx.key, segments=list(src.segments), size=src.size, etag=src.etag, crc=src.crc,
                               mtime=now, content_type=content_type, user_meta=meta, std_headers=std,
                               object_type=src.object_type,
                               storage_class=ctx.hdr("x-oss-storage-class") or src.storage_class)
            b.put(obj)
        h = [("ETag", f'"{obj.etag}"')]
        if obj.crc is not None:
            h.append(("x-oss-hash-crc64ecma", str(obj.crc)))
        return _xml_response(f'<CopyObjectResult><ETag>"{obj.etag}"</ETag>'
                             f"<LastModified>{_iso_date(now)}</LastModified></CopyObjectResult>", headers=h)

    # ---- multipart ------------------------------------------------------------------
    def _initiate_upload(self, ctx: _Ctx) -> _Response:
        """InitiateMultipartUpload (API §3.10); CSE headers validated and remembered (CSE §6)."""
        with self.lock:
            self._bucket(ctx.bucket)
        meta = self._user_meta(ctx)
        cse = self._cse_headers(ctx)
        data_size, part_size = self._cse_validate(cse, multipart=True)
        with self.lock:
            b = self._bucket(ctx.bucket)
            if self._forbid_overwrite(ctx) and ctx.key in b.objects:
                raise self._file_exists(ctx.key)
            self._upload_seq += 1
            up = Upload(upload_id=secrets.token_hex(16).upper(), key=ctx.key, seq=self._upload_seq,
                        initiated=int(time.time()),
                        content_type=ctx.hdr("Content-Type") or "application/octet-stream",
                        user_meta=meta, std_headers=self._std_headers(ctx),
                        storage_class=ctx.hdr("x-oss-storage-class") or "Standard",
                        cse=cse or None, cse_data_size=data_size, cse_part_size=part_size)
            b.uploads[up.upload_id] = up
        enc = ctx.query.get("encoding-type") == "url"
        key = _url_enc(ctx.key) if enc else ctx.key
        return _xml_response("<InitiateMultipartUploadResult>" + ("<EncodingType>url</EncodingType>" if enc else "") +
                             f"<Bucket>{_x(ctx.bucket)}</Bucket><Key>{_x(key)}</Key>"
                             f"<UploadId>{up.upload_id}</UploadId></InitiateMultipartUploadResult>")

    def _get_upload(self, b: BucketState, ctx: _Ctx) -> Upload:
        uid = ctx.query.get("uploadId", "")
        up = b.uploads.get(uid)
        if up is None or up.key != ctx.key:
            raise _no_such_upload(uid)
        return up

    @staticmethod
    def _part_number(ctx: _Ctx) -> int:
        if "partNumber" not in ctx.query:
            raise _invalid_argument("Unexpected query string parameter.", "partNumber", "", ec="0017-00000802")
        v = ctx.query["partNumber"]
        try:
            n = int(v)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PART_NUMBER or not v.strip().isdigit():
            raise _invalid_argument("Part number must be an integer between 1 and 10000, inclusive.",
                                    "partNumber", v, ec="0017-00000803")
        return n

    def _cse_check_part(self, up: Upload, cse: Dict[str, str], number: int, size: Optional[int]) -> None:
        """UploadPart carrying CSE headers: same values as Initiate (EC 0005-00000412..418) and the
        fixed-part-size rule (EC 0005-00000419/420), CSE §6."""
        data_size, part_size = self._cse_validate(cse, multipart=True)
        if up.cse is None:
            raise self._cse_err("0005-00000418", "The upload was not initiated with client-side encryption.")
        for name, ec in ((CSE_KEY, "0005-00000412"), (CSE_START, "0005-00000413"),
                         (CSE_CEK_ALG, "0005-00000414"), (CSE_WRAP_ALG, "0005-00000415"),
                         (CSE_MAGIC, "0005-00000416")):
            if (cse.get(name) or None) != (up.cse.get(name) or None):
                raise self._cse_err(ec, f"Header {name} differs from the InitiateMultipartUpload request.")
        if data_size != up.cse_data_size or part_size != up.cse_part_size:
            raise self._cse_err("0005-00000418", "The data-size/part-size headers differ from the "
                                "InitiateMultipartUpload request.")
        if size is not None:
            self._cse_check_size(up, number, size)

    def _cse_check_size(self, up: Upload, number: int, size: int) -> None:
        ps, ds = up.cse_part_size, up.cse_data_size
        last = max(1, -(-ds // ps))
        if number > last:
            raise self._cse_err("0005-00000411", "The part number exceeds the part count expected from "
                                "data-size and part-size.")
        if number < last and size != ps:
            raise self._cse_err("0005-00000419", f"Part {number} must be exactly {ps} bytes for client-side "
                                "encryption.")
        if number == last and size != ds - (last - 1) * ps:
            raise self._cse_err("0005-00000420", "The size of the last part does not match data-size.")

    def _upload_part(self, ctx: _Ctx) -> _Response:
        """UploadPart (API §3.11): size is not checked here (only at Complete), except the CSE rules."""
        number = self._part_number(ctx)
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
        declared = ctx.h._declared_length
        if declared is not None and declared > MAX_OBJECT_SIZE:
            ctx.h.close_connection = True
            ctx.h._body_done = True
            raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.",
                           ec="0026-00000006")
        cse = self._cse_headers(ctx)
        if cse:
            self._cse_check_part(up, cse, number, declared)
        blob = ctx.h._read_body_blob()
        self._check_md5(ctx, blob.md5)
        if cse:
            self._cse_check_size(up, number, blob.size)
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
            part = Part(number, blob, blob.md5.hex().upper(), int(time.time()))
            up.parts[number] = part
        return _Response(200, [("ETag", f'"{part.etag}"'), ("x-oss-hash-crc64ecma", str(blob.crc)),
                               ("Content-MD5", base64.b64encode(blob.md5).decode())])

    def _upload_part_copy(self, ctx: _Ctx) -> _Response:
        """UploadPartCopy (API §3.12); an encrypted source is refused (CSE §9, EC 0042-00000309)."""
        number = self._part_number(ctx)
        with self.lock:
            b = self._bucket(ctx.bucket)
            self._get_upload(b, ctx)
        src = self._copy_source_object(ctx)
        if src.is_cse:
            raise OssError(400, "InvalidArgument", "UploadPartCopy does not support a client-side encrypted "
                           "source object.", ec="0042-00000309")
        rng_h = ctx.hdr("x-oss-copy-source-range")
        a, e = 0, src.size - 1
        if rng_h:
            r = self._parse_range(rng_h, src.size, standard=True)
            if r is not None:
                a, e = r
        w = _BlobWriter(self.root_dir)
        for chunk in src.iter_range(a, e + 1):
            w.write(chunk)
        blob = w.finish()
        now = int(time.time())
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
            part = Part(number, blob, blob.md5.hex().upper(), now)
            up.parts[number] = part
        h = [("ETag", f'"{part.etag}"'), ("x-oss-hash-crc64ecma", str(blob.crc))]
        if rng_h:
            h.append(("Content-Range", f"bytes {a}-{e}/{src.size}"))
        return _xml_response(f"<CopyPartResult><LastModified>{_iso_date(now)}</LastModified>"
                             f'<ETag>"{part.etag}"</ETag></CopyPartResult>', headers=h)

    def _complete_upload(self, ctx: _Ctx) -> _Response:
        """CompleteMultipartUpload (API §3.13): InvalidPartOrder, InvalidPart, EntityTooSmall,
        x-oss-complete-all, CSE part-size/data-size rules (CSE §6), combined CRC64."""
        with self.lock:
            b = self._bucket(ctx.bucket)
            self._get_upload(b, ctx)
        body = ctx.h._read_body_bytes()
        self._check_md5(ctx, hashlib.md5(body).digest())
        cse = self._cse_headers(ctx)
        for name, ec in ((CSE_DATA_SIZE, "0005-00000408"), (CSE_PART_SIZE, "0005-00000409")):
            if name in cse and not cse[name].strip().isdigit():  # EC -408/-409 also cover Complete (CSE §6)
                raise self._cse_err(ec, f"Header {name} must be an integer.")
        complete_all = (ctx.hdr("x-oss-complete-all") or "").lower() == "yes"
        malformed = OssError(400, "MalformedXML", "The XML you provided was not well-formed or did not validate "
                             "against our published schema.", ec="0042-00000202")
        listed: List[Tuple[int, str]] = []
        if complete_all:
            if body.strip():
                raise _invalid_argument("Should not specify both complete all header and http body.",
                                        "x-oss-complete-all", "yes", ec="0042-00000216")
        else:
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                raise malformed
            for p in root.findall("Part"):
                try:
                    n = int((p.findtext("PartNumber") or "").strip())
                except ValueError:
                    raise malformed
                listed.append((n, (p.findtext("ETag") or "").strip().strip('"').upper()))
            if not listed:
                raise malformed
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
            if complete_all:
                parts = [up.parts[n] for n in sorted(up.parts)]
                if not parts:
                    raise malformed
            else:
                prev = 0
                for n, _ in listed:
                    if n <= prev:
                        raise OssError(400, "InvalidPartOrder", "The list of parts was not in ascending order. "
                                       "Parts list must specified in order by part number.", ec="0042-00000209")
                    prev = n
                parts = []
                for n, etag in listed:
                    p = up.parts.get(n)
                    if p is None or p.etag != etag:
                        raise OssError(400, "InvalidPart", "One or more of the specified parts could not be found "
                                       "or the specified entity tag might not have matched the part's entity tag.",
                                       ec="0042-00000210", PartNumber=str(n), ETag=f'"{etag}"')
                    parts.append(p)
            for p in parts[:-1]:
                if p.size < MIN_PART_SIZE:
                    raise OssError(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum "
                                   "allowed size.", ec="0042-00000213", MinSizeAllowed=str(MIN_PART_SIZE),
                                   ProposedSize=str(p.size), PartNumber=str(p.number), ETag=f'"{p.etag}"')
            if up.cse is not None:
                ps, ds = up.cse_part_size, up.cse_data_size
                if len(parts) > max(1, -(-ds // ps)):
                    raise self._cse_err("0005-00000411", "The number of parts exceeds the count expected from "
                                        "data-size and part-size.")
                for p in parts[:-1]:
                    if p.size != ps:
                        raise self._cse_err("0005-00000419", f"Part {p.number} is not {ps} bytes.")
                if sum(p.size for p in parts) != ds:
                    raise self._cse_err("0005-00000420", "The total size of the parts does not equal data-size.")
            if (self._forbid_overwrite(ctx)) and ctx.key in b.objects:
                raise self._file_exists(ctx.key)
            crc = 0
            for p in parts:
                crc = crc64_combine(crc, p.blob.crc, p.size)
            md5s = hashlib.md5(b"".join(p.blob.md5 for p in parts)).hexdigest().upper()
            etag = f"{md5s}-{len(parts)}"
            obj = StoredObject(key=ctx.key, segments=[p.blob for p in parts], size=sum(p.size for p in parts),
                               etag=etag, crc=crc, mtime=int(time.time()), content_type=up.content_type,
                               user_meta=dict(up.user_meta), std_headers=dict(up.std_headers),
                               object_type="Multipart", storage_class=up.storage_class)
            b.put(obj)
            del b.uploads[up.upload_id]
        enc = ctx.query.get("encoding-type") == "url"
        key = _url_enc(ctx.key) if enc else ctx.key
        host = ctx.hdr("Host") or f"{self.host}:{self.port}"
        loc = f"http://{host}/{ctx.bucket}/{urllib.parse.quote(ctx.key)}"
        return _xml_response("<CompleteMultipartUploadResult>" +
                             ("<EncodingType>url</EncodingType>" if enc else "") +
                             f"<Location>{_x(loc)}</Location><Bucket>{_x(ctx.bucket)}</Bucket>"
                             f'<Key>{_x(key)}</Key><ETag>"{etag}"</ETag></CompleteMultipartUploadResult>',
                             headers=[("ETag", f'"{etag}"'), ("x-oss-hash-crc64ecma", str(crc))])

    def _abort_upload(self, ctx: _Ctx) -> _Response:
        """AbortMultipartUpload (API §3.14): 204 or NoSuchUpload."""
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
            del b.uploads[up.upload_id]
        return _Response(204)

    @staticmethod
    def _int_param(ctx: _Ctx, name: str, default: int, lo: int, hi: int) -> int:
        v = ctx.query.get(name, "")
        if v == "":
            return default
        try:
            n = int(v)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise _invalid_argument(f"Argument {name} must be an integer between {lo} and {hi}.", name, v,
                                    ec="0017-00000804")
        return n

    def _list_parts(self, ctx: _Ctx) -> _Response:
        """ListParts (API §3.15), with ClientEncryption* elements for CSE uploads (CSE §6)."""
        max_parts = self._int_param(ctx, "max-parts", 1000, 1, 1000)
        marker = self._int_param(ctx, "part-number-marker", 0, 0, MAX_PART_NUMBER)
        with self.lock:
            b = self._bucket(ctx.bucket)
            up = self._get_upload(b, ctx)
            nums = sorted(n for n in up.parts if n > marker)
            page = [up.parts[n] for n in nums[:max_parts]]
            truncated = len(nums) > max_parts
        enc = ctx.query.get("encoding-type") == "url"
        key = _url_enc(ctx.key) if enc else ctx.key
        out = ["<ListPartsResult>"]
        if enc:
            out.append("<EncodingType>url</EncodingType>")
        out.append(f"<Bucket>{_x(ctx.bucket)}</Bucket><Key>{_x(key)}</Key><UploadId>{up.upload_id}</UploadId>"
                   f"<StorageClass>{up.storage_class}</StorageClass>"
                   f"<PartNumberMarker>{marker}</PartNumberMarker>"
                   f"<NextPartNumberMarker>{page[-1].number if page else marker}</NextPartNumberMarker>"
                   f"<MaxParts>{max_parts}</MaxParts><IsTruncated>{str(truncated).lower()}</IsTruncated>")
        if up.cse:
            for el, hn in (("ClientEncryptionKey", CSE_KEY), ("ClientEncryptionStart", CSE_START),
                           ("ClientEncryptionCekAlg", CSE_CEK_ALG), ("ClientEncryptionWrapAlg", CSE_WRAP_ALG)):
                if hn in up.cse:
                    out.append(f"<{el}>{_x(up.cse[hn])}</{el}>")
            out.append(f"<ClientEncryptionDataSize>{up.cse_data_size}</ClientEncryptionDataSize>"
                       f"<ClientEncryptionPartSize>{up.cse_part_size}</ClientEncryptionPartSize>")
        for p in page:
            out.append(f"<Part><PartNumber>{p.number}</PartNumber><LastModified>{_iso_date(p.mtime)}</LastModified>"
                       f'<ETag>"{p.etag}"</ETag><HashCrc64ecma>{p.blob.crc}</HashCrc64ecma>'
                       f"<Size>{p.size}</Size></Part>")
        out.append("</ListPartsResult>")
        return _xml_response("".join(out))

    def _list_uploads(self, ctx: _Ctx) -> _Response:
        """ListMultipartUploads (API §3.16); NextKeyMarker/NextUploadIdMarker always present."""
        q = ctx.query
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        key_marker = q.get("key-marker", "")
        uid_marker = q.get("upload-id-marker", "")
        max_uploads = self._int_param(ctx, "max-uploads", 1000, 1, 1000)
        with self.lock:
            b = self._bucket(ctx.bucket)
            ups = sorted(b.uploads.values(), key=lambda u: (u.key, u.seq))
            marker_seq = None
            if key_marker and uid_marker and uid_marker in b.uploads:
                marker_seq = b.uploads[uid_marker].seq
        items: List[Tuple[str, object]] = []
        truncated = False
        seen_cp = set()
        for u in ups:
            if not u.key.startswith(prefix):
                continue
            if key_marker:
                if marker_seq is not None:
                    if (u.key, u.seq) <= (key_marker, marker_seq):
                        continue
                elif u.key <= key_marker:
                    continue
            if delim:
                i = u.key.find(delim, len(prefix))
                if i >= 0:
                    cp = u.key[:i + len(delim)]
                    if cp in seen_cp or (key_marker and cp <= key_marker):
                        continue
                    if len(items) >= max_uploads:
                        truncated = True
                        break
                    seen_cp.add(cp)
                    items.append(("cp", cp))
                    continue
            if len(items) >= max_uploads:
                truncated = True
                break
            items.append(("up", u))
        next_key = next_uid = ""
        if truncated and items:
            kind, last = items[-1]
            if kind == "up":
                next_key, next_uid = last.key, last.upload_id
            else:
                next_key = last
        enc = q.get("encoding-type") == "url"
        e = (lambda s: _url_enc(s)) if enc else (lambda s: s)
        out = [f"<ListMultipartUploadsResult><Bucket>{_x(ctx.bucket)}</Bucket>"]
        if enc:
            out.append("<EncodingType>url</EncodingType>")
        out.append(f"<KeyMarker>{_x(e(key_marker))}</KeyMarker><UploadIdMarker>{_x(uid_marker)}</UploadIdMarker>"
                   f"<NextKeyMarker>{_x(e(next_key))}</NextKeyMarker>"
                   f"<NextUploadIdMarker>{next_uid}</NextUploadIdMarker>"
                   f"<Delimiter>{_x(e(delim))}</Delimiter><Prefix>{_x(e(prefix))}</Prefix>"
                   f"<MaxUploads>{max_uploads}</MaxUploads><IsTruncated>{str(truncated).lower()}</IsTruncated>")
        for kind, it in items:
            if kind == "up":
                out.append(f"<Upload><Key>{_x(e(it.key))}</Key><UploadId>{it.upload_id}</UploadId>"
                           f"<StorageClass>{it.storage_class}</StorageClass>"
                           f"<Initiated>{_iso_date(it.initiated)}</Initiated></Upload>")
        for kind, it in items:
            if kind == "cp":
                out.append(f"<CommonPrefixes><Prefix>{_x(e(it))}</Prefix></CommonPrefixes>")
        out.append("</ListMultipartUploadsResult>")
        return _xml_response("".join(out))

    # ---- listing ---------------------------------------------------------------------
    def _list_page(self, b: BucketState, prefix: str, delim: str, marker: str, max_keys: int):
        """Walk keys in UTF-8 order after ``marker`` (exclusive), grouping by ``delim``.
        Contents and CommonPrefixes both count towards ``max_keys``."""
        keys = b.keys
        i = bisect.bisect_left(keys, prefix)
        if marker:
            i = max(i, bisect.bisect_right(keys, marker))
        contents: List[StoredObject] = []
        prefixes: List[str] = []
        last = None
        truncated = False
        n = len(keys)
        while i < n:
            k = keys[i]
            if not k.startswith(prefix):
                break
            if delim:
                j = k.find(delim, len(prefix))
                if j >= 0:
                    cp = k[:j + len(delim)]
                    # jump past every key under this common prefix
                    i = bisect.bisect_left(keys, cp[:-1] + chr(ord(cp[-1]) + 1), i)
                    if marker and cp <= marker:
                        continue
                    if len(contents) + len(prefixes) >= max_keys:
                        truncated = True
                        break
                    prefixes.append(cp)
                    last = cp
                    continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            contents.append(b.objects[k])
            last = k
            i += 1
        return contents, prefixes, truncated, last

    def _list_objects(self, ctx: _Ctx, v2: bool) -> _Response:
        """ListObjects v1 / v2 (API §3.7, §3.8). Empty parameters mean "not given" (oss2 sends them all)."""
        q = ctx.query
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        max_keys = self._int_param(ctx, "max-keys", 100, 1, MAX_LIST)
        enc_type = q.get("encoding-type", "")
        if enc_type and enc_type != "url":
            raise _invalid_argument("Invalid Encoding Method specified in Request.", "encoding-type", enc_type,
                                    ec="0016-00000903")
        enc = enc_type == "url"
        e = (lambda s: _url_enc(s)) if enc else (lambda s: s)
        token = q.get("continuation-token", "")
        start_after = q.get("start-after", "")
        if v2:
            if token:
                try:
                    marker = base64.urlsafe_b64decode(token.encode()).decode("utf-8")
                except Exception:
                    raise _invalid_argument("The continuation token provided is incorrect.", "continuation-token",
                                            token, ec="0016-00000905")
            else:
                marker = start_after
        else:
            marker = q.get("marker", "")
        with self.lock:
            b = self._bucket(ctx.bucket)
            contents, prefixes, truncated, last = self._list_page(b, prefix, delim, marker, max_keys)
        fetch_owner = (not v2) or q.get("fetch-owner", "").lower() == "true"
        out = [f"<ListBucketResult><Name>{_x(ctx.bucket)}</Name><Prefix>{_x(e(prefix))}</Prefix>"]
        if v2:
            if start_after:
                out.append(f"<StartAfter>{_x(e(start_after))}</StartAfter>")
            if token:
                out.append(f"<ContinuationToken>{_x(e(token))}</ContinuationToken>")
        else:
            out.append(f"<Marker>{_x(e(marker))}</Marker>")
        out.append(f"<MaxKeys>{max_keys}</MaxKeys><Delimiter>{_x(e(delim))}</Delimiter>")
        if enc:
            out.append("<EncodingType>url</EncodingType>")
        out.append(f"<IsTruncated>{str(truncated).lower()}</IsTruncated>")
        if truncated and last is not None:
            if v2:
                nt = base64.urlsafe_b64encode(last.encode("utf-8")).decode()
                out.append(f"<NextContinuationToken>{_x(e(nt))}</NextContinuationToken>")
            else:
                out.append(f"<NextMarker>{_x(e(last))}</NextMarker>")
        if v2:
            out.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
        for o in contents:
            out.append(f"<Contents><Key>{_x(e(o.key))}</Key><LastModified>{_iso_date(o.mtime)}</LastModified>"
                       f'<ETag>"{o.etag}"</ETag><Type>{o.object_type}</Type><Size>{o.size}</Size>'
                       f"<StorageClass>{o.storage_class}</StorageClass>")
            if fetch_owner:
                out.append("<Owner><ID>1234567890</ID><DisplayName>1234567890</DisplayName></Owner>")
            out.append("</Contents>")
        for p in prefixes:
            out.append(f"<CommonPrefixes><Prefix>{_x(e(p))}</Prefix></CommonPrefixes>")
        out.append("</ListBucketResult>")
        return _xml_response("".join(out))

    def _list_buckets(self, ctx: _Ctx) -> _Response:
        with self.lock:
            names = sorted(self.buckets.values(), key=lambda x: x.name)
        out = ["<ListAllMyBucketsResult><Owner><ID>1234567890</ID><DisplayName>1234567890</DisplayName></Owner>"
               "<Buckets>"]
        for bk in names:
            out.append(f"<Bucket><CreationDate>{_iso_date(bk.created)}</CreationDate>"
                       f"<ExtranetEndpoint>oss-{self.region}.aliyuncs.com</ExtranetEndpoint>"
                       f"<IntranetEndpoint>oss-{self.region}-internal.aliyuncs.com</IntranetEndpoint>"
                       f"<Location>oss-{self.region}</Location><Name>{_x(bk.name)}</Name>"
                       f"<Region>{self.region}</Region><StorageClass>Standard</StorageClass></Bucket>")
        out.append("</Buckets></ListAllMyBucketsResult>")
        return _xml_response("".join(out))

    def _bucket_info(self, ctx: _Ctx) -> _Response:
        with self.lock:
            bk = self._bucket(ctx.bucket)
        return _xml_response(
            f"<BucketInfo><Bucket><AccessMonitor>Disabled</AccessMonitor>"
            f"<CreationDate>{_iso_date(bk.created)}</CreationDate>"
            f"<ExtranetEndpoint>oss-{self.region}.aliyuncs.com</ExtranetEndpoint>"
            f"<IntranetEndpoint>oss-{self.region}-internal.aliyuncs.com</IntranetEndpoint>"
            f"<Location>oss-{self.region}</Location><StorageClass>Standard</StorageClass>"
            f"<TransferAcceleration>Disabled</TransferAcceleration>"
            f"<CrossRegionReplication>Disabled</CrossRegionReplication><Name>{_x(bk.name)}</Name>"
            f"<Owner><DisplayName>1234567890</DisplayName><ID>1234567890</ID></Owner>"
            f"<AccessControlList><Grant>private</Grant></AccessControlList>"
            f"<ServerSideEncryptionRule><SSEAlgorithm>None</SSEAlgorithm></ServerSideEncryptionRule>"
            f"<BucketPolicy><LogBucket></LogBucket><LogPrefix></LogPrefix></BucketPolicy>"
            f"</Bucket></BucketInfo>")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def serve_control(server: "OssTestServer", path: str) -> None:
    """Remote control for a server running as its own process: each connection sends
    ``(dotted_attribute, args, kwargs)`` tuples over ``multiprocessing.connection`` and gets
    ``("ok", result)`` or ``("error", exception)`` back, e.g. ``("faults.add", (), {"status": 503})``
    or ``("stop", (), {})``. Tests use it through ``tests/oss_remote.py``; a process of its own
    keeps the server off the test process, whose threads may be blocked on the FUSE mount."""
    from multiprocessing.connection import Listener

    with Listener(path, family="AF_UNIX", authkey=b"ossfuse-test") as listener:
        while True:
            conn = listener.accept()
            threading.Thread(target=_control_conn, args=(server, conn), daemon=True).start()


def _plain(value):
    """A value the test process can unpickle without this module as ``__main__``: plain types,
    dataclass records as SimpleNamespace, anything else (the server, fault rules) as None."""
    import dataclasses
    import types
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return types.SimpleNamespace(**{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return None


def _control_conn(server: "OssTestServer", conn) -> None:
    with conn:
        while True:
            try:
                name, args, kwargs = conn.recv()
            except (EOFError, OSError):
                return
            try:
                target = server
                for part in name.split("."):
                    target = getattr(target, part)
                result = target(*args, **kwargs) if callable(target) else target
                conn.send(("ok", _plain(result)))
            except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
                conn.send(("error", e))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Local OSS test server (see module docstring).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--access-key-id", default="test-ak")
    ap.add_argument("--access-key-secret", default="test-sk")
    ap.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    ap.add_argument("--root-dir", default=None, help="store object bodies as files here (the bodies only: the "
                    "objects' index and metadata are in memory, so a restarted server starts with empty buckets; "
                    "to make it hang, SIGSTOP it)")
    ap.add_argument("--region", default="cn-hangzhou")
    ap.add_argument("--no-skew-check", action="store_true")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--control", default=None,
                    help="unix socket path for remote control by tests (see serve_control)")
    args = ap.parse_args(argv)
    server = OssTestServer(access_key_id=args.access_key_id, access_key_secret=args.access_key_secret,
                           buckets=args.bucket or ["test-bucket"], port=args.port, host=args.host,
                           root_dir=args.root_dir, region=args.region,
                           max_skew=None if args.no_skew_check else CLOCK_SKEW, debug=args.debug)
    server.start()
    if args.control:
        threading.Thread(target=serve_control, args=(server, args.control), daemon=True).start()
    print(server.endpoint, flush=True)
    stop = threading.Event()

    def _sig(*_):
        stop.set()

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
