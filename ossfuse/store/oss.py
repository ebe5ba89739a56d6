"""The Alibaba Cloud OSS backend, over oss2 (blocking) run in worker threads.

Section numbers (§) refer to ``shared/spec/oss-rest-api.md``.

Concurrency: every oss2 call runs in ``trio.to_thread.run_sync`` behind ONE
``trio.CapacityLimiter(threads)``; all threads share one ``oss2.Session`` (one requests
connection pool of ``threads`` connections per host) and one ``oss2.Bucket``. HeadObject,
GetObject, ListObjects and PutObject of up to 1 MiB skip oss2's and requests' request
machinery: signed by the Bucket's auth, sent by http.client on a connection of that same
urllib3 pool (``OssStore._lean_request``; ``ls -l`` is a HEAD per entry, ``cat`` a GET per
file, the write-back of small files a PUT each, bound by client CPU; a GET's body is read into
one buffer), unless a proxy is set; ``head_many`` sends many HEADs from one thread hand-off,
its worker threads holding as many limiter tokens. The pool's connections read every answer
under a low-speed rule (``store/paced.py``: a trickle is a stall).

Authentication: ``oss2.ProviderAuth`` (signature V1, §6.2) or ``oss2.ProviderAuthV4`` (V4, §6.3;
needs the region) over an :class:`~ossfuse.store.credentials.CredentialsProvider`, asked on every
request, so rotated or refreshed STS credentials are used at once (the security token goes out
as ``x-oss-security-token``, §6.1).

Errors and retries (one policy, ``ossfuse.retry``; see ``StoreError`` in ``base.py``):

* temporary (``StoreError.temporary``): HTTP 5xx, 429 and throttling codes, connection
  refused/reset, timeouts, DNS failures, truncated or unusable bodies and CRC-64 mismatches
  (§5.2) are retried: at most ``retries + 1`` attempts, exponential backoff with jitter
  (``backoff * 2**n`` capped at ``backoff_max``, times a random factor in [0.5, 1]), and all
  within ``deadline`` seconds per call: no attempt starts or waits past it (each attempt's
  connect/read timeout is cut to what is left). Then :class:`StoreUnavailable` (a CRC mismatch
  that persists: :class:`StoreError`), whose message says how many attempts in how long.
* permanent, at the first answer: 404 NoSuchKey / NoSuchUpload → :class:`NoSuchKey` (``head``
  returns None), 412 → :class:`PreconditionFailed`, anything else (403 SignatureDoesNotMatch,
  InvalidAccessKeyId, AccessDenied, 404 NoSuchBucket, 400 ...) → :class:`StoreError` with the
  server's code and message; missing credentials → ``CredentialsError``. A failure below HTTP
  reads as one plain line (``cannot connect to http://host:port: connection refused``).
* every failure that reaches the caller is logged once (WARNING; NoSuchKey at DEBUG,
  PreconditionFailed at INFO) with the OSS request id (``x-oss-request-id``, §2.2), which is
  also in ``StoreError.request_id`` and ``str()``. Each retried attempt is logged at INFO.
  oss2's own logger is set to WARNING (if unset): it would log every error response again.
* cancellation waits for the request in flight (a blocked thread cannot be interrupted); the
  attempt's timeouts bound that.

Integrity: uploads keep oss2's CRC-64 check (``enable_crc``, §5.2) - PutObject and UploadPart
compare the client CRC with ``x-oss-hash-crc64ecma``, and CompleteMultipartUpload compares the
combined part CRCs when this process uploaded every part. Ranged GETs cannot be checked (OSS
sends the whole object's CRC on a 206, §5.3); a GET that returns the whole object is checked here.
"""
from __future__ import annotations

import collections
import concurrent.futures
import email.utils
import errno
import functools
import hashlib
import http.client
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Callable
from urllib.parse import urlparse

import fastcrc
import oss2
import oss2.exceptions as oe
import requests
import trio
import urllib3

from ..retry import Budget, RetryPolicy, retry_async
from .base import (AlreadyExists, KeyList, ListPage, MultipartUploads, NoSuchKey, ObjectInfo, ObjectStore,
                   PreconditionFailed, StoreError, StoreUnavailable, etag_norm, same_etag)
from .credentials import CredentialsError, CredentialsProvider, Oss2CredentialsProvider
from .health import StoreOffline
from ..envelope import H_KEY
from .indoubt import DELETED, InDoubt
from .oss_xml import ListAnswerError, parse_list_objects
from .paced import LOW_SPEED_BYTES, PacedAdapter, TooSlow

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
# characters of a key that DeleteMultipleObjects' body (keys as XML text, as oss2 writes it) cannot
# carry: those XML 1.0 text cannot hold, not even as a character reference, and CR, which every
# XML parser reads as LF (a trial: deleting 'a\rb' deleted 'a\nb')
_NOT_XML_TEXT = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")


def _check_crc(op: str, key: str, ours: int, result) -> None:
    """Raise InconsistentError (retried as transient) when OSS's CRC-64 of a body
    (``x-oss-hash-crc64ecma``, §5.2) is not ``ours``; an answer without one is not checked."""
    theirs = result.headers.get("x-oss-hash-crc64ecma")
    if theirs is not None and int(theirs) != ours:
        raise oe.InconsistentError(f"{op} {key}: CRC-64 of the body {ours} != OSS's {theirs}", result.request_id)


# CRC-64/XZ (ECMA-182 polynomial, reflected; init and xorout all ones): the CRC OSS sends as
# x-oss-hash-crc64ecma (§5.2) and fastcrc.crc64.xz computes.
_CRC64_POLY = 0xC96C5795D7870F42  # reflected 0x42F0E1EBA9EA3693
_CRC64_TOP = 1 << 63  # x^0 in the reflected bit order


def _gf2_mulmod(a: int, b: int) -> int:
    """a·b modulo the CRC polynomial, both 64-bit reflected polynomials (zlib's multmodp)."""
    m, p = _CRC64_TOP, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _CRC64_POLY if b & 1 else b >> 1
    return p


def _x_pow_2k_table() -> list[int]:
    """[x^(2^k) mod P for k in 0..66]: enough for shifts by any length below 2^64 bytes."""
    table = [_CRC64_TOP >> 1]  # x^1
    for _ in range(66):
        table.append(_gf2_mulmod(table[-1], table[-1]))
    return table


_X2K = _x_pow_2k_table()


@functools.lru_cache(maxsize=64)
def _x_pow_8n(n: int) -> int:
    """x^(8n) mod P: the operator that appends n zero bytes to a CRC register, in O(log n)
    multiplications (cached: every part but the last of an upload has the same length)."""
    p, k = _CRC64_TOP, 3  # x^0; bit i of n stands for 2^(i+3) bits
    while n:
        if n & 1:
            p = _gf2_mulmod(_X2K[k], p)
        n >>= 1
        k += 1
    return p


def _crc64_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-64/XZ of A‖B from crc(A), crc(B) and len(B) in bytes, in O(log len_b) (zlib's
    ``crc32_combine`` shape): with init = xorout the CRC is affine in the message, so
    crc(A‖B) = crc(A)·x^(8·len_b) mod P ^ crc(B). Pure arithmetic, ~10 µs with a cached
    length: it may run on the event loop."""
    if len_b < 0:
        raise ValueError("negative length")
    if len_b == 0:
        return crc_a ^ crc_b  # crc(B) of nothing is 0
    return _gf2_mulmod(_x_pow_8n(len_b), crc_a) ^ crc_b


class _Answer:
    """An answer of the lean request path (``OssStore._lean_request``) as oss2 code reads one:
    ``oss2.exceptions.make_exception`` (status, case-insensitive headers, ``read(4096)`` of the
    error XML; a HEAD has no body, its error is in ``x-oss-err``, §2.3) and ``_check_crc``
    (headers, request id)."""

    def __init__(self, status: int, headers, body: bytes = b""):
        self.status = status
        self.headers = headers
        self.body = body
        self.request_id = headers.get("x-oss-request-id", "")

    def read(self, amt: int | None = None) -> bytes:
        body, self.body = self.body, b""  # read once, as oss2's Response
        return body if amt is None else body[:amt]

    @property
    def etag(self) -> str:
        """The ETag without its quotes, as oss2's ``PutObjectResult.etag``."""
        return (self.headers.get("etag") or "").strip('"')


class _BadResponse(Exception):
    """The server answered something unusable (wrong Content-Range, short body): retried."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


_FORBID_OVERWRITE = "x-oss-forbid-overwrite"  # "true": create only (409 FileAlreadyExists), §3.1
#: 4xx codes that mean "slow down", not "refused" (retried like a 503)
_THROTTLE_CODES = ("TooManyRequests", "Throttling", "SlowDown", "RequestTimeout", "QpsLimitExceeded")

_thread_timeouts = threading.local()
# bytes: a PUT body or a server-side copy up to this size is a metadata-sized request, held to the
# offline timeout per socket read (OssStore._call); larger ones keep read_timeout.
_SMALL_BODY = 1 << 20


def _with_timeouts(timeouts: tuple[float, float], fn: Callable[..., Any], *args) -> Any:
    """Run ``fn(*args)`` in this worker thread with requests' (connect, read) timeouts set to
    ``timeouts`` seconds (:class:`_DeadlineSession` reads them). An exception it raises gets
    ``_WAITED``, the seconds the attempt ran, so a timeout's line names the one that fired
    (urllib3 sends a request body under the connect timeout: a stalled upload's line said
    "no answer within 60.0s" after 5 s, a trial)."""
    _thread_timeouts.value = timeouts
    started = time.monotonic()
    try:
        return fn(*args)
    except Exception as e:
        try:
            setattr(e, _WAITED, time.monotonic() - started)
        except AttributeError:  # (an exception type without a __dict__: the line names the timeout)
            pass
        raise
    finally:
        _thread_timeouts.value = None


_WAITED = "_ossfuse_waited"  # attribute of an attempt's exception: seconds it ran (_with_timeouts)
# attribute of an exception raised while an answer's body was read: the answer's HTTP status
# (the store answered: a body cut short is that object's or that connection's failure, not an
# outage; a trial: one object's dropped GETs took the whole mount offline; but one that went
# silent for the timeout counts as unanswered, for the confirming listing to tell)
_CUT_SHORT = "_ossfuse_cut_short"


def _cut_short(e: BaseException, status: int) -> None:
    try:
        setattr(e, _CUT_SHORT, status)
    except AttributeError:  # an exception type without a __dict__
        pass


class _DeadlineSession(oss2.Session):
    """oss2's Session with the per-attempt timeouts of the retry policy: oss2 passes the
    Bucket's fixed (connect, read) pair; an attempt that has less time left before its
    deadline (``ossfuse.retry.Budget.timeout``) uses the shorter one."""

    def do_request(self, req, timeout):
        override = getattr(_thread_timeouts, "value", None)
        return super().do_request(req, timeout=override or timeout)


def _causes(exc: BaseException):
    """``exc`` and what it wraps: ``MaxRetryError.reason``, ``__cause__``/``__context__`` and an
    exception passed as the first argument (requests wraps urllib3's errors that way)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None,
                     e.__cause__, e.__context__,
                     e.args[0] if e.args and isinstance(e.args[0], BaseException) else None])


def _network_failure(endpoint: str, exc: BaseException, timeouts: tuple[float, float] | None,
                     waited: float | None = None, write: bool = True) -> tuple[str, str, bool]:
    """``(code, plain text, temporary)`` for a failure below HTTP, instead of urllib3's
    ``HTTPConnectionPool(host=…) Max retries exceeded …`` dump. ``waited``: seconds the attempt
    ran (a timeout sooner than the read timeout was the sending's). ``write``: the request
    changes the bucket, so a timeout says it may still take effect (a read's need not say it:
    trial AE found it on `check --verify`'s lines)."""
    chain = list(_causes(exc))

    def has(*types: type) -> Any:  # Any: the matched type (socket.gaierror, OSError, ...) or None
        return next((c for c in chain if isinstance(c, types)), None)

    if g := has(socket.gaierror):
        return "NameResolution", f"cannot resolve the host of {endpoint}: {g.strerror or g}", True
    if has(ConnectionRefusedError):
        return "ConnectionRefused", f"cannot connect to {endpoint}: connection refused", True
    unreachable = next((c for c in chain if isinstance(c, OSError) and not isinstance(c, TimeoutError)
                        and c.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                                        errno.EADDRNOTAVAIL)), None)
    if unreachable is not None:  # (urllib3's NewConnectionError is a ConnectTimeoutError: check first)
        return "ConnectionError", f"cannot connect to {endpoint}: {unreachable.strerror}", True
    if slow := has(TooSlow):
        return "Timeout", (f"{endpoint} sent {slow.recent} bytes in the last {slow.window:.1f}s of its answer "
                           f"({slow.total} in {slow.seconds:.1f}s; less than {LOW_SPEED_BYTES >> 10} KiB per read "
                           "timeout: taken for a stalled connection)"
                           + (" (the request was sent: it may still take effect)" if write else "")), True
    if has(requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
        t = f" within {timeouts[0]:.1f}s" if timeouts else ""
        return "Timeout", f"cannot connect to {endpoint}: no connection{t}", True
    if has(requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        if timeouts and waited is not None and waited + 0.5 < timeouts[1]:
            # sooner than a read can time out: urllib3 sends a request (its body) under the
            # connect timeout, and the store took nothing more for that long
            return "Timeout", (f"{endpoint} took no more of the request for {timeouts[0]:.1f}s"
                               + (" (what was sent may still take effect)" if write else "")), True
        t = f" within {timeouts[1]:.1f}s" if timeouts else ""
        # the request went out: the store may still carry it out (a trial: a mkdir that failed
        # so showed its directory once a stopped server went on)
        return "Timeout", (f"no answer from {endpoint}{t}"
                           + (" (the request was sent: it may still take effect)" if write else "")), True
    if s := has(requests.exceptions.SSLError, urllib3.exceptions.SSLError, ssl.SSLError):
        if "CERTIFICATE_VERIFY_FAILED" in str(s) or has(ssl.SSLCertVerificationError):
            return "TlsError", f"TLS with {endpoint} failed: the server's certificate cannot be verified", False
        if "WRONG_VERSION_NUMBER" in str(s):  # its answer was no TLS at all: a plain-HTTP server (NU5)
            return "TlsError", (f"TLS with {endpoint} failed: the server does not speak TLS there (for a plain-HTTP "
                                f"endpoint, write http:// in front of it)"), False
        return "TlsError", f"TLS with {endpoint} failed: {_first_line(s)}", True
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected,
           http.client.IncompleteRead, urllib3.exceptions.ProtocolError,
           requests.exceptions.ChunkedEncodingError):
        return "ConnectionReset", f"the connection to {endpoint} was lost", True
    o = has(OSError)
    if o is not None and o.errno is not None:
        return "ConnectionError", f"connection to {endpoint} failed: {o.strerror or o}", True
    return "ConnectionError", f"connection to {endpoint} failed: {_first_line(chain[-1])}", True


def _with_silence(err: StoreError, timeouts: tuple[float, float] | None, waited: float | None) -> StoreError:
    """``err`` with ``silent_for`` set when it is a timeout: the store sent nothing for the
    timeout that fired, at most the read timeout, and no longer than the attempt ran
    (``waited``: a connection, or a request body sent under the connect timeout, ends sooner)."""
    if err.code == "Timeout" and timeouts:
        err.silent_for = timeouts[1] if waited is None else min(waited, timeouts[1])
    return err


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _in_doubt(err: StoreError) -> bool:
    """Whether a failed attempt of a write may still take effect: it got no answer after its
    request was sent, or its connection was lost (indoubt.py)."""
    return not err.answered and (err.code == "ConnectionReset"
                                 or (err.code == "Timeout" and "may still take effect" in err.message))


def _md5_etag(data: bytes) -> str:
    """The ETag OSS gives an object PUT in one request: the body's MD5, upper-case hex."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest().upper()


def _md5_etag_of_file(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            h.update(chunk)
    return h.hexdigest().upper()


def _multipart_etag(part_etags: list[str]) -> str:
    """The ETag OSS gives a completed multipart upload: the MD5 of its parts' binary MD5s, and
    "-N"."""
    joined = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest().upper()}-{len(part_etags)}"


def region_from_endpoint(endpoint: str) -> str | None:
    """``oss-cn-hangzhou[-internal].aliyuncs.com`` → ``cn-hangzhou``; None for other hosts."""
    host = urlparse(endpoint if "://" in endpoint else "https://" + endpoint).hostname or ""
    m = _ENDPOINT_REGION.match(host)
    return m.group(1) if m else None


# HTTP date text (Last-Modified, Date) → epoch seconds, as oss2.utils.http_to_unixtime reads it
# (a strptime: ~5% of a HEAD's client CPU; the objects of one directory share a few seconds of
# Last-Modified, the answers of a listing's HEADs a few of Date)
_HTTP_DATES: dict[str, float] = {}
_ONE_READ_MAX = 64 << 20  # bytes: the largest body read in one allocation (_read_body; a GET asks for ≤ 8 MiB)
_OBS_FOLD = re.compile(r"(?:(?<![ \t])[ \t]+)?\r\n[ \t]+")  # urllib3 2.x connection.py's


def _read_body(resp: http.client.HTTPResponse) -> bytes:
    """The whole body of ``resp``. With a Content-Length up to ``_ONE_READ_MAX`` bytes, one
    ``read(n)``: one ``BufferedReader.read(n)``, one allocation (``_request_on_pool``), and
    http.client.IncompleteRead when the connection ends first (``read(n)`` itself returns the
    short body). Not ``read()``: since CVE-2025-13836's fix (Debian 12's python3.11
    3.11.2-6+deb12u7) it reads a body over 1 MiB in growing chunks into a BytesIO, one copy
    more of every byte (an 8 MiB GET peaked at 1.5x its body; a new-user trial); a larger
    announced length (none is asked for) still goes that way."""
    n = resp.length
    if not n or n > _ONE_READ_MAX:  # (None: chunked or up to the connection's end; 0: a HEAD)
        return resp.read()
    body = resp.read(n)
    if len(body) < n:
        raise http.client.IncompleteRead(body, n - len(body))
    return body


def _request_on_pool(pool: urllib3.HTTPConnectionPool, method: str, uri: str, headers: dict[str, str],
                     connect: float, read: float, payload: bytes | None = None,
                     of_object: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send ``method uri`` (HEAD or GET without a request body, or PUT of ``payload``:
    http.client sends its Content-Length) on a connection of urllib3's ``pool``
    with http.client itself, read the whole answer and give the connection back: (status,
    headers by lower-case name, a repeated one's values joined by ", " as urllib3's
    HTTPHeaderDict does; ISO-8859-1 as http.client decodes them; the body, b"" for a HEAD).
    urllib3's urlopen and response wrapper were ~40% of a HEAD's client CPU (``ls -l`` is a
    HEAD per entry); the connection (TLS set up by the pool's own ``connect``, its keep-alive
    checks at ``_get_conn``) is the pool's, so there are never more than its ``maxsize`` kept.
    ``of_object``: an object's answer (not a bucket's: a listing), which must carry an ETag and
    a Content-Length.

    The body (:func:`_read_body`): with a Content-Length, one ``BufferedReader.read(n)``,
    which allocates the ``bytes`` of n once and ``recv_into``s the socket straight into it (no
    per-chunk copies or joins, unlike requests' ``iter_content`` under oss2's
    ``GetObjectResult.read``), and ``http.client.IncompleteRead`` when the connection ends
    before n bytes: a short body never comes back as data. Sent as ``Accept-Encoding:
    identity`` (http.client's default; oss2 sends no Accept-Encoding), read as is: the bytes
    stored, which ranges and Content-Length count. ``read`` (seconds) bounds each socket read,
    and once the answer has begun each window of that many seconds must bring
    ``paced.LOW_SPEED_BYTES`` (a body trickling in a byte per read held a reader for minutes).

    Raises http.client's (IncompleteRead also for a 2xx answer without ETag or Content-Length:
    a head cut by the connection's end), urllib3's (connect) or socket errors (a reset mid-body:
    ConnectionResetError, a stall: TimeoutError, a trickle: paced.TooSlow); a connection that
    failed, or that the server closes, is not put back (its slot is)."""
    conn: Any = pool._get_conn()  # urllib3.connection.HTTP(S)Connection: an http.client.HTTPConnection
    try:
        if conn.sock is None:
            conn.timeout = connect
            conn.connect()
        conn.sock.settimeout(read)
        http.client.HTTPConnection.request(conn, method, uri, body=payload, headers=headers)
        resp = http.client.HTTPConnection.getresponse(conn)  # a paced.PacedResponse: the pool's connections'
        try:
            body = _read_body(resp)  # (b"" for a HEAD): closes the response, the connection stays open
        except BaseException as e:
            _cut_short(e, resp.status)
            raise
        h: dict[str, str] = {}
        for name, value in resp.msg.items():
            name = name.lower()
            if "\r\n" in value:  # an obsolete line folding: one space, as urllib3 normalises it
                value = _OBS_FOLD.sub(" ", value)
            h[name] = f"{h[name]}, {value}" if name in h else value
        if of_object and resp.status // 100 == 2 and ("etag" not in h or "content-length" not in h):
            # http.client takes a head cut by the connection's end for a whole answer (a 200
            # without headers: an empty file); OSS sends both on every HeadObject, GetObject
            # and PutObject (§3.1, §3.3). (A bucket's answer, a listing, is XML its parser
            # refuses when cut.)
            raise http.client.IncompleteRead(b"", None)
    except BaseException as e:
        conn.close()
        pool._put_conn(None)  # the slot: the next _get_conn opens a new connection
        if isinstance(e, OSError) and not isinstance(e, _TRANSPORT_ERRORS):  # e.g. ENETUNREACH at send
            raise urllib3.exceptions.ProtocolError(f"{method} failed: {e}", e) from e
        raise
    if resp.will_close:
        conn.close()
        pool._put_conn(None)
    else:
        pool._put_conn(conn)
    return resp.status, h, body


def _http_seconds(value: str | None) -> float | None:
    """An HTTP date (``Last-Modified``, ``Date``) as epoch seconds, as oss2 reads it; None when
    absent or not in that form. Parsed once per distinct value (_HTTP_DATES): the answers of
    a listing's HEADs share a handful of values."""
    if value is None:
        return None
    seconds = _HTTP_DATES.get(value)
    if seconds is None:
        try:
            seconds = float(oss2.utils.http_to_unixtime(value))
        except ValueError:  # not the form oss2 reads (oss2 raises)
            return None
        if len(_HTTP_DATES) >= 4096:
            _HTTP_DATES.clear()
        _HTTP_DATES[value] = seconds
    return seconds


# Standard headers an object keeps through a metadata-replacing CopyObject only if they are
# sent again (OSS CopyObject, x-oss-metadata-directive: REPLACE): chmod or touch of another
# client's object must not change how it is served
_KEPT_HEADERS = ("Content-Type", "Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language",
                 "Expires")


def _kept_headers(h: dict[str, str]) -> dict[str, str]:
    """Of the lower-case headers ``h`` of a HEAD answer, the :data:`_KEPT_HEADERS` it has."""
    return {name: h[name.lower()] for name in _KEPT_HEADERS if name.lower() in h}


def _lower(headers) -> dict[str, str]:
    """An oss2 answer's headers (requests' case-insensitive dict, which keeps the names' case)
    by lower-case name, as the lean path gives them."""
    return {k.lower(): v for k, v in headers.items()}


def _http_time(headers) -> float | None:
    v = headers.get("last-modified") or headers.get("date")
    if not v:
        return None
    try:
        return email.utils.parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError):
        return None


# Requests that change nothing in the bucket: a caller cancelled while one waits (a read whose
# reader is gone, at the end of the FUSE session) leaves its thread to finish or time out alone
# (it keeps its limiter token and connection until then) instead of waiting for it.
_ABANDONABLE = frozenset({"GET", "HEAD", "ListObjects", "ListMultipartUploads"})


class OssStore(ObjectStore):
    """One OSS bucket through oss2.

    :param bucket: bucket name.
    :param endpoint: ``https://oss-cn-hangzhou.aliyuncs.com`` (no scheme → https), or an
        ``http://127.0.0.1:PORT`` test server (oss2 then uses path-style addressing, §2.1).
    :param region: e.g. ``cn-hangzhou``; required for V4 unless the endpoint names it.
    :param signature: ``"v1"`` or ``"v4"``.
    :param credentials: where the access key comes from (``store.credentials``).
    :param threads: concurrent requests (the limiter's and the connection pool's size).
    :param connect_timeout/read_timeout: seconds (requests' (connect, read) timeout pair), each
        shortened to what is left of ``deadline`` for an attempt.
    :param retries: extra attempts for temporary failures; ``backoff``/``backoff_max`` seconds.
    :param deadline: seconds one store call (all its attempts and backoff sleeps) may take
        before it fails (config ``store.request_deadline``; default 60). With the defaults a
        store answering 503 to everything fails a call after 6 attempts in ~4-8 s; a server that
        accepts and never answers fails it after 60 s (one attempt, its read timeout cut to the
        deadline), never 6 × 60 s; with a health tracker (``self.health``) a metadata request
        to such a server fails after the offline timeout (``_call``'s ``bulk``).
    :raises ValueError: bad signature, V4 without a region, invalid bucket name or endpoint,
        deadline ≤ 0.
    """

    def __init__(self, bucket: str, endpoint: str, *, region: str | None = None, signature: str = "v4",
                 credentials: CredentialsProvider, threads: int = 64, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, retries: int = 5, backoff: float = 0.25, backoff_max: float = 8.0,
                 deadline: float = 60.0, max_copy_size: int = COPY_LIMIT):
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
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.in_doubt = InDoubt()  # writes given up on that may still land (store/indoubt.py)
        #: the retry policy of every request (``ossfuse.retry``)
        self.policy = RetryPolicy(attempts=self.retries + 1, deadline=deadline, backoff=backoff,
                                  backoff_max=backoff_max)
        self._limiter = trio.CapacityLimiter(threads)
        # oss2 logs every error response at INFO itself; this store logs each failure once.
        oss2_log = logging.getLogger("oss2")
        if oss2_log.level == logging.NOTSET:
            oss2_log.setLevel(logging.WARNING)
        # We fetch ciphertext with a plain Bucket on purpose: oss2 warns about that on every GET.
        logging.getLogger("oss2.models").setLevel(logging.ERROR)
        provider = Oss2CredentialsProvider(credentials)
        auth = oss2.ProviderAuthV4(provider) if signature == "v4" else oss2.ProviderAuth(provider)
        # its pools read answers under the low-speed rule (store/paced.py)
        self._session = _DeadlineSession(adapter=PacedAdapter(pool_connections=threads, pool_maxsize=threads))
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
        self._settle_environment()
        self._lean_head = self._head_pool()
        self._head_conn_pool: Any = None  # the urllib3 pool of _lean_head, once asked for
        self._key_url = self._key_url_prefix()
        # worker threads of head_many's batches (each holds a limiter token while it works)
        self._head_executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                                    thread_name_prefix="ossfuse-head")
        # part number -> (size, crc64) per upload id, for the whole-object CRC check at Complete
        self._parts: dict[str, dict[int, tuple[int, int]]] = {}
        # the user metadata each upload id was initiated with: what Complete made (see there)
        self._upload_meta: dict[str, dict[str, str]] = {}
        self._parts_lock = threading.Lock()

    def _settle_environment(self) -> None:
        """Read the environment's proxy settings (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) and CA
        bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) once, for this bucket's URL, instead of on
        every request: requests re-reads them, and ~/.netrc, per request when ``trust_env``
        is set (0.2-0.6 ms of a HEAD's ~1.6 ms of own CPU, measured; ``ls -l`` of many files is
        bound by that CPU). A .netrc entry would only have replaced oss2's signature."""
        http = self._session.session
        try:
            url = self._bucket._make_url(self.bucket_name, "")
        except Exception:  # noqa: BLE001 - an oss2 without the private URL maker: the endpoint's host
            url = self.endpoint
        env = http.merge_environment_settings(url, {}, None, None, None)
        http.trust_env = False
        http.proxies = dict(env.get("proxies") or {})
        http.verify = env.get("verify", True)
        if env.get("cert"):
            http.cert = env["cert"]

    @classmethod
    def from_url(cls, url: str, **kw) -> "OssStore":
        """``oss://BUCKET`` plus the keyword arguments of the constructor."""
        p = urlparse(url)
        if p.scheme != "oss" or not p.netloc:
            raise ValueError(f"not an oss://BUCKET url: {url!r}")
        return cls(p.netloc, **kw)

    # -- plumbing ---------------------------------------------------------------------------
    def _to_store_error(self, op: str, key: str | None, e: BaseException,
                        timeouts: tuple[float, float] | None = None) -> StoreError | None:
        """The StoreError one failed attempt means (``temporary`` set: retry or not), or None
        for an exception that is no request failure (a bug: re-raised as itself)."""
        what = f"OSS {op} {key!r}" if key is not None else f"OSS {op}"
        write = op not in _ABANDONABLE
        rid = getattr(e, "request_id", "") or None
        if isinstance(e, StoreError):  # raised by our own code in the worker (bad file, no credentials)
            return e
        if isinstance(e, oe.InconsistentError):
            return StoreError(f"{what}: CRC-64 mismatch between client and OSS (the bytes read are not those OSS "
                              f"stored: damaged in transit, or at rest)",
                              key=key, request_id=rid, code="CrcMismatch", temporary=True, answered=True)
        if isinstance(e, _BadResponse):
            return StoreUnavailable(f"{what}: unusable answer: {e}", key=key, request_id=rid, code="BadResponse",
                                    answered=True)
        waited = getattr(e, _WAITED, None)
        status = getattr(e, _CUT_SHORT, None)
        if status is not None and isinstance(e, (oe.RequestError, *_TRANSPORT_ERRORS)):
            code, text, _ = _network_failure(self.endpoint, getattr(e, "exception", e), timeouts, waited, write)
            # a body that went silent for the whole timeout is as good as no answer: the store
            # may be gone, which the confirming listing tells (trial AE: a server stopped
            # mid-body kept the mount online, and the reads that followed waited 5 s more each)
            return _with_silence(StoreUnavailable(f"{what}: HTTP {status} answer cut short: {text}", key=key,
                                                  request_id=rid, code=code, answered=code != "Timeout"),
                                 timeouts, waited)
        if isinstance(e, oe.RequestError):  # oss2's wrapper of a requests exception
            code, text, temporary = _network_failure(self.endpoint, e.exception, timeouts, waited, write)
            cls = StoreUnavailable if temporary else StoreError
            return _with_silence(cls(f"{what}: {text}", key=key, code=code, temporary=temporary), timeouts, waited)
        if isinstance(e, oe.OssError):  # an answer from the server (or an oss2 ClientError, status -1)
            status, code = e.status, getattr(e, "code", "") or ""
            if status < 0:  # oss2 refused the request before sending it (body: "ClientError: …")
                return StoreError(f"{what}: {e.body}", key=key, code="ClientError")
            text = f"{what}: HTTP {status} {code}: {e.message or ''}".rstrip(": ")
            if status == 404 and code in ("NoSuchKey", "NoSuchUpload", ""):
                return NoSuchKey(f"{what}: {code or 'not found'}", key=key, request_id=rid, code=code or "NoSuchKey",
                                 answered=True)
            if status == 412:
                return PreconditionFailed(f"{what}: the object changed (412 PreconditionFailed)",
                                          key=key, request_id=rid, code=code or "PreconditionFailed", answered=True)
            if status == 409 and code == "FileAlreadyExists":
                return AlreadyExists(f"{what}: the object exists and may not be overwritten (409 {code})",
                                     key=key, request_id=rid, code=code, answered=True)
            if status >= 500 or status == 429 or code in _THROTTLE_CODES:  # answered: busy, not offline
                return StoreUnavailable(text, key=key, request_id=rid, code=code, answered=True)
            return StoreError(text, key=key, request_id=rid, code=code, answered=True)
        if isinstance(e, _TRANSPORT_ERRORS):  # raised while a streamed body was read
            code, text, temporary = _network_failure(self.endpoint, e, timeouts, waited, write)
            cls = StoreUnavailable if temporary else StoreError
            return _with_silence(cls(f"{what}: {text}", key=key, code=code, temporary=temporary), timeouts, waited)
        return None

    async def _call(self, op: str, key: str | None, fn: Callable[..., Any], *args,
                    transient_seen: list | None = None, bulk: bool = False,
                    doubt: Callable[[], list[tuple[str, str]]] | None = None) -> Any:
        """Run ``fn(*args)`` in a worker thread under the store's retry policy (module
        docstring): each attempt's connect and read timeouts are shortened to what is left of
        the deadline. A request that changes the bucket (PUT, copy, DELETE, the multipart
        ones) keeps ``read_timeout`` per socket read (the store may work a while before it
        answers, and one given up on may still take effect later); one that changes nothing
        (GET, HEAD, LIST) waits at most the offline timeout for each read when the store has a
        health tracker, so a store that accepts and never answers is found offline within
        ``store.offline_timeout``, not after ``read_timeout``. ``bulk``: the request streams a
        large body (GET, PUT of a file, part, complete, copy): the retry loop counts its
        seconds failing from its first failure, not from its start.
        ``transient_seen`` (a list) gets the error of every failed attempt that was retried.
        ``doubt`` (a write's): [(key, what it leaves there: an ETag or indoubt.DELETED)], asked
        in a worker thread when an attempt got no answer or lost its connection, for
        :attr:`in_doubt` (the request may still take effect). Raises the last attempt's
        StoreError, logged once."""
        budget_seen: list[Budget] = []

        async def attempt(budget: Budget) -> Any:
            if not budget_seen:
                budget_seen.append(budget)
            connect, read = self.connect_timeout, self.read_timeout
            if self.health is not None:
                connect = min(connect, self.health.timeout)
                # a request that changes nothing (its body, if any, flows from its first
                # byte): no answer within the offline bound is an outage (a hung GET held a
                # reader, the unmount and SIGTERM for read_timeout). One that changes the
                # bucket keeps read_timeout, whatever its size: given up on, it may still take
                # effect later, after what this mount did next (a trial: a PUT answered 9 s
                # late replaced the newer version an fsync had put there; a copy slower than
                # 5 s failed `mv` with EIO, then landed over the destination)
                if op in _ABANDONABLE:
                    read = min(read, self.health.timeout)
            timeouts = (budget.timeout(connect), budget.timeout(read))
            try:
                if self.health is None or op not in _ABANDONABLE:
                    return await trio.to_thread.run_sync(_with_timeouts, timeouts, fn, *args, limiter=self._limiter,
                                                         abandon_on_cancel=op in _ABANDONABLE)
                with self.health.abandoned_when_offline():
                    return await trio.to_thread.run_sync(_with_timeouts, timeouts, fn, *args, limiter=self._limiter,
                                                         abandon_on_cancel=True)
                # (here only when the mount went offline meanwhile: the scope was cancelled)
                raise StoreOffline(f"OSS {op} {key!r}: no answer when the store was found offline (given up then, "
                                   f"not after its own {timeouts[1]:.1f}s)", key=key, code="Offline")
            except Exception as e:  # noqa: BLE001 - classified here
                err = self._to_store_error(op, key, e, timeouts)
                if err is None:
                    raise
                if doubt is not None and _in_doubt(err):
                    # shielded: a caller cancelled meanwhile (a directory rename's other copies,
                    # when one failed) must still learn that this one may land (trial AI: its
                    # checkpoint raised Cancelled first, and the late copies were not watched)
                    with trio.CancelScope(shield=True):
                        try:
                            for k, effect in await trio.to_thread.run_sync(doubt):
                                self.in_doubt.given_up(op, k, effect)
                        except OSError as d:  # (a staged file gone meanwhile: nothing to compare with)
                            log.info("OSS %s %r: what the request in doubt would leave is unknown: %s", op, key, d)
                if err is e:
                    raise
                raise err from e

        def on_retry(err: BaseException, n: int, delay: float) -> None:
            self.counters.retries[op] += 1  # for status/metrics
            log.info("OSS %s %r: attempt %d/%d failed: %s; retrying in %.2fs", op, key, n, self.policy.attempts,
                     err, delay)
            if transient_seen is not None:
                transient_seen.append(err)

        try:
            return await retry_async(self.policy, attempt, on_retry=on_retry, health=self.health,
                                     short=not bulk and op in _ABANDONABLE)
        except StoreError as err:
            budget = budget_seen[0] if budget_seen else None
            if err.temporary and budget is not None and budget.attempt > 1:
                err.message += f" (gave up after {budget.attempt} attempts in {budget.elapsed():.1f}s)"
            # INFO, not WARNING: the caller reports the failure in its one line naming the object
            # and this same message (fs/errors.py store_request, commit, readdir...; the local
            # store logs nothing either); an unreachable store has the outage's one WARNING
            # (store/health.py)
            # the offline watcher's probes: DEBUG (one per second for as long as an outage lasts)
            quiet = isinstance(err, NoSuchKey) or (self.health is not None and self.health.in_watcher())
            log.log(logging.DEBUG if quiet else logging.INFO, "%s", err)
            raise

    def may_still_land(self, key: str) -> bool:
        return self.in_doubt.has(key)

    def sent_before_a_crash(self, key: str, wrapped: str) -> None:
        self.in_doubt.sent_before_a_crash(key, wrapped)

    def given_up_earlier(self, op: str, key: str, effect: str, until: float) -> None:
        self.in_doubt.given_up_earlier(op, key, effect, until)

    def vacated(self, key: str) -> None:
        if self.in_doubt.has(key):
            self.in_doubt.wrote(key, DELETED)

    def landed_over_ours(self, key: str, info: ObjectInfo) -> bool:
        return self.in_doubt.landed_over(key, info)

    def landed_late(self, key: str, etag: str) -> None:
        self.in_doubt.landed(key, etag)

    def on_write_after_doubt(self, fn: Callable[[str, str, ObjectInfo | None], None]) -> None:
        self.in_doubt.on_written = fn

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
    def _head_pool(self) -> tuple[Any, dict, dict] | None:
        """(requests' HTTPAdapter, urllib3 host parameters, pool kwargs) of this bucket's URL, so
        a HEAD or GET (``_lean_request``) takes a connection from the very pool oss2's requests
        would (same TLS settings, ``threads`` connections kept alive, shared with every other
        request); None when a proxy is configured or requests/urllib3 lack what the lean path
        uses (HEADs and GETs then go through oss2 and requests, which speak to proxies)."""
        http = self._session.session
        try:
            url = self._bucket._make_url(self.bucket_name, "x")
            if requests.utils.select_proxy(url, http.proxies):
                return None
            adapter = http.get_adapter(url)
            host, pool_kwargs = adapter.build_connection_pool_key_attributes(
                requests.Request("HEAD", url).prepare(), http.verify, http.cert)
            pool = adapter.poolmanager.connection_from_host(**host, pool_kwargs=pool_kwargs)
            if not (callable(getattr(pool, "_get_conn", None)) and callable(getattr(pool, "_put_conn", None))):
                raise TypeError("urllib3's pool has no _get_conn/_put_conn")  # _request_on_pool needs them
        except Exception as e:  # noqa: BLE001 - another requests or oss2: the oss2 path works everywhere
            log.debug("HEAD and GET go through oss2 and requests: %s", e)
            return None
        return adapter, host, pool_kwargs

    def _key_url_prefix(self) -> tuple[str, str] | None:
        """(URL, request URI) that oss2's ``_make_url(bucket, key)`` starts with for every key,
        the key following quoted with ``safe=""``; None when this oss2 does not make URLs so
        (checked on a key with a space, a slash, a plus, a percent and a non-ASCII letter)."""
        try:
            base = self._bucket._make_url(self.bucket_name, "")
            probe = "a b/ä+%"
            if not base.endswith("/") or self._bucket._make_url(self.bucket_name, probe) != \
                    base + urllib.parse.quote(probe, safe=""):
                return None
        except Exception:  # noqa: BLE001 - an oss2 without the private URL maker: ask it per key
            return None
        parts = base.split("/", 3)
        return (base, "/" + parts[3]) if len(parts) > 3 else None

    def _lean_request(self, method: str, key: str, headers: dict[str, str] | None,
                      payload: bytes | None = None,
                      params: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HEAD, GET or PUT (of ``payload``) attempt of object ``key`` (with extra request ``headers``) on the lean
        path (``self._lean_head`` set): signed by oss2's own auth (V1 or V4, the security token
        included) exactly as ``Bucket._do`` signs it, sent by :func:`_request_on_pool` on a
        connection of the shared urllib3 pool with this attempt's (connect, read) timeouts
        (``_with_timeouts``). ``params``: the query (a bucket's GET, ``key`` ""), signed as
        ``_do`` signs its ``params`` and sent as requests encodes them (``urlencode``). Returns
        (status, headers by lower-case name, body); raises what ``_request_on_pool`` raises."""
        if self._lean_head is None:
            raise RuntimeError("no lean request path (behind a proxy)")  # callers check first
        adapter, host, pool_kwargs = self._lean_head
        b = self._bucket
        if self._key_url is not None:  # oss2's _make_url without its per-call endpoint checks
            quoted = urllib.parse.quote(key, safe="")
            url, uri = self._key_url[0] + quoted, self._key_url[1] + quoted
        else:
            # the path and query of oss2's URL ("scheme://host/path?query", the key already quoted
            # by _make_url): what urllib3's parse_url(...).request_uri gives, without its parse
            url = b._make_url(self.bucket_name, key)
            parts = url.split("/", 3)
            uri = "/" + parts[3] if len(parts) > 3 else "/"
        if params:
            query = urllib.parse.urlencode(params)
            url, uri = f"{url}?{query}", f"{uri}?{query}"
        req = oss2.http.Request(method, url, params=params, headers=headers, app_name=b.app_name, region=b.region,
                                product=b.product, cloudbox_id=b.cloudbox_id)
        b.auth._sign_request(req, self.bucket_name, key)
        sent = {k: v for k, v in req.headers.items() if v is not None}  # None: "do not send" to requests
        sent.setdefault("Accept", "*/*")
        connect, read = getattr(_thread_timeouts, "value", None) or (self.connect_timeout, self.read_timeout)
        pool = self._head_conn_pool
        if pool is None or getattr(pool, "pool", None) is None:  # not yet, or closed (evicted, aclose)
            pool = self._head_conn_pool = adapter.poolmanager.connection_from_host(**host, pool_kwargs=pool_kwargs)
        return _request_on_pool(pool, method, uri, sent, connect, read, payload, of_object=key != "")

    def _head_sync(self, key: str) -> tuple[ObjectInfo, dict[str, str]]:
        """One HeadObject attempt (§3.3) in a worker thread: (ObjectInfo, the headers a
        metadata-replacing copy keeps: :data:`_KEPT_HEADERS` present, by their canonical name).

        Signed by oss2's own auth (V1 or V4, the security token included) exactly as
        ``Bucket.head_object`` signs it, but sent by http.client on a connection of the shared
        urllib3 pool (``_lean_request``): oss2's Response/result objects and requests'
        per-request work (settings merge, cookie jar, hooks, header dict copies) were ~0.4 ms
        of a HEAD's ~1.1 ms of client CPU, urllib3's urlopen and response wrapper ~40% of the
        rest (``bench/head_cost.py``), and ``ls -l`` over OSS is one HEAD per entry, bound by
        that CPU. A failure raises what oss2 would: an ``oss2.exceptions`` error made from the
        answer (its code from the ``x-oss-err`` header, §2.3; a 3xx is one too: a signed
        request is not followed elsewhere), or the http.client, urllib3 (connect) or socket
        exception for a failure below HTTP (``_to_store_error`` maps both)."""
        if self._lean_head is None:
            r = self._bucket.head_object(key)
            h = _lower(r.headers)
            return self._info_from_headers(key, h, int(r.content_length or 0)), _kept_headers(h)
        status, h, _ = self._lean_request("HEAD", key, None)
        if status // 100 != 2:
            raise oe.make_exception(_Answer(status, requests.structures.CaseInsensitiveDict(h)))
        return self._info_from_headers(key, h, int(h.get("content-length") or 0)), _kept_headers(h)

    @staticmethod
    def _info_from_headers(key: str, h, size: int) -> ObjectInfo:
        """The ObjectInfo of a HeadObject or GetObject answer's headers ``h`` (a dict by
        lower-case name, as the lean path gives them), for an object of ``size`` bytes. The
        same values oss2's HeadObjectResult and requests' header dict give (a repeated header
        joined by ", "; values as http.client decodes them, ISO-8859-1)."""
        last_modified = _http_seconds(h.get("last-modified"))
        mtime = last_modified if last_modified is not None else (_http_time(h) or 0.0)
        etag = h.get("etag")
        meta = {name[len(_META):]: value for name, value in h.items() if name.startswith(_META)}
        return ObjectInfo(key, size, etag.strip('"') if etag else "", mtime, meta, _http_seconds(h.get("date")) or 0.0)

    async def _head(self, key: str):  # -> tuple[ObjectInfo, dict[str, str]] | None
        """(ObjectInfo, headers a copy keeps: :meth:`_head_sync`) or None. HeadObject (§3.3): size from Content-Length,
        metadata from ``x-oss-meta-*``; the error XML comes base64 in ``x-oss-err`` (§2.3)."""
        try:
            return await self._call("HEAD", key, self._head_sync, key)
        except NoSuchKey:
            return None

    async def head(self, key: str) -> ObjectInfo | None:
        """HeadObject (§3.3): size, ETag (unquoted), Last-Modified as epoch seconds, user metadata
        (lower-case names, prefix stripped). None when the key does not exist (404 NoSuchKey);
        StoreError for anything else, e.g. a missing bucket."""
        r = await self._head(key)
        return r[0] if r else None

    def _head_batch_sync(self, keys: list[str], workers: int, timeouts: tuple[float, float],
                         answers: list[Any], failures: dict[int, BaseException]) -> None:
        """First attempts of HEADs of ``keys`` in this thread and ``workers - 1`` of the batch
        executor's, each taking the next key until none is left: ``answers[i]`` gets key i's
        (ObjectInfo, kept headers), ``failures[i]`` its exception. After the first failure no
        new key is started (a store that does not answer would hold each for a timeout); the
        keys not tried keep ``answers[i]`` None and no failure."""
        todo = collections.deque(range(len(keys)))
        stop = threading.Event()

        def work() -> None:
            _thread_timeouts.value = timeouts
            try:
                while not stop.is_set():
                    try:
                        i = todo.popleft()
                    except IndexError:
                        return
                    try:
                        answers[i] = self._head_sync(keys[i])
                    except Exception as e:  # noqa: BLE001 - classified by the caller
                        failures[i] = e
                        if not isinstance(self._to_store_error("HEAD", keys[i], e, timeouts), NoSuchKey):
                            stop.set()
            finally:
                _thread_timeouts.value = None

        helpers = [self._head_executor.submit(work) for _ in range(workers - 1)]
        work()
        for f in helpers:
            f.result()

    async def head_many(self, keys: list[str], parallel: int,
                        failed: dict[int, StoreError] | None = None) -> list[ObjectInfo | None]:
        """HEADs of ``keys`` (at most ``parallel`` and the store's ``threads`` at once), sent
        from one thread hand-off per batch instead of one per key: each worker thread takes
        the next key when its last is answered (``ls -l`` over OSS is a HEAD per entry, and a
        hand-off cost as much event-loop CPU as the HEAD itself, ``bench/head_cost.py``). The
        workers hold as many of the store's limiter tokens, so requests in flight never exceed
        the connection pool. A key that is gone gives None. A key whose first attempt failed
        (and the keys not tried after it) is asked again through :meth:`head`: the one retry
        policy, its log line and error count; but not one the store left without an answer for
        the whole timeout (silent, or trickling: ``paced.py``), which that policy would not
        send again either (trial AH: each such key cost two timeouts, and ``ls -l`` of a
        directory whose HEADs all trickled failed after six): its failure goes to the health
        tracker as :meth:`head`'s would. ``failed``: as :meth:`ObjectStore.head_many`."""
        if self._lean_head is None or len(keys) < 2 or parallel < 2 or (self.health is not None and self.health.offline):
            return await super().head_many(keys, parallel, failed)
        # tokens of the store's limiter, one per worker: the first waits, the others only if free
        slots: list[object] = [object()]
        await self._limiter.acquire_on_behalf_of(slots[0])
        try:
            while len(slots) < min(parallel, len(keys)):
                slot = object()
                try:
                    self._limiter.acquire_on_behalf_of_nowait(slot)
                except trio.WouldBlock:
                    break
                slots.append(slot)
            connect, read = self.connect_timeout, self.read_timeout
            if self.health is not None:  # a metadata request: at most the offline bound (_call)
                connect, read = min(connect, self.health.timeout), min(read, self.health.timeout)
            timeouts = (connect, min(read, self.policy.deadline or read))
            answers: list[Any] = [None] * len(keys)
            failures: dict[int, BaseException] = {}
            sent = time.monotonic()
            await trio.to_thread.run_sync(self._head_batch_sync, keys, len(slots), timeouts, answers, failures)
        finally:
            for slot in slots:
                self._limiter.release_on_behalf_of(slot)
        out: list[ObjectInfo | None] = [a[0] if a is not None else None for a in answers]
        again: list[int] = []
        silent: list[tuple[int, StoreError]] = []
        for i, e in failures.items():
            err = self._to_store_error("HEAD", keys[i], e, timeouts)
            if isinstance(err, NoSuchKey):
                continue  # gone: None, as head() answers
            if err is not None and err.code == "Timeout" and not err.answered:
                silent.append((i, err))
                continue
            again.append(i)
            self.counters.retries["HEAD"] += 1
            log.info("OSS HEAD %r: attempt failed: %s; asking again", keys[i], err or e)
        again += [i for i, a in enumerate(answers) if a is None and i not in failures]  # not tried
        self.counters.calls["head"] += len(keys) - len(again)
        if len(again) + len(silent) < len(keys) and self.health is not None:
            self.health.succeeded(sent)
        for i, err in silent:  # one confirming listing at most: an answered one covers the rest
            log.info("%s", err)  # (head()'s line of a failure, as _call writes it)
            final = await self._settle_failure("head", err, sent)
            if failed is None or final.outage:
                if final is err:
                    raise err
                raise final from err
            failed[i] = final
        if again:
            failed_again: dict[int, StoreError] | None = {} if failed is not None else None
            redo = await super().head_many([keys[i] for i in again], parallel, failed_again)
            for i, info in zip(again, redo, strict=True):
                out[i] = info
            for j, err in (failed_again or {}).items():
                failed[again[j]] = err  # type: ignore[index]  # (set when failed is)
        return out

    @staticmethod
    def _read_all(res) -> bytes:
        """The whole body of an oss2 GetObjectResult (the oss2 path: behind a proxy)."""
        chunks: list[bytes] = []
        while True:
            b = res.read(1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)

    def _get_sync(self, key: str, headers: dict[str, str]) -> tuple[int, Any, bytes] | None:
        """One GetObject attempt (§3.2) of ``key`` with request ``headers``: (status, response
        headers (case-insensitive ``get`` by lower-case name), whole body), or None for a 416
        (a range starting at or past the end, standard range behaviour). On the lean path
        (``_lean_request``: oss2's request and response objects and requests' ``iter_content``
        loop were ~26% of a small file's cat CPU and, with the chunk joins, most of a cold
        read's Python time), else through ``Bucket.get_object``. An error answer raises what
        oss2 raises (``oss2.exceptions`` from the status and the error XML); a failure below
        HTTP raises the transport's exception (``_to_store_error`` maps both)."""
        if self._lean_head is None:
            try:
                res = self._bucket.get_object(key, headers=headers)
            except oe.ServerError as e:
                if e.status == 416:
                    return None
                raise
            try:
                data = self._read_all(res)
            except BaseException as e:
                _cut_short(e, res.status)
                raise
            finally:
                res.close()
            return res.status, res.headers, data
        status, h, data = self._lean_request("GET", key, headers)
        if status == 416:
            return None
        if status // 100 != 2:
            raise oe.make_exception(_Answer(status, requests.structures.CaseInsensitiveDict(h), data))
        return status, h, data

    def _get_range_sync(self, key: str, start: int, end: int, if_match: str | None) -> bytes:
        got = self._get_range_info_sync(key, start, end, if_match, False)
        return got[1] if got is not None else b""

    def _get_range_info_sync(self, key: str, start: int, end: int, if_match: str | None,
                             with_info: bool) -> tuple[ObjectInfo | None, bytes] | None:
        """One ranged GetObject attempt (§3.2): (the answer's ObjectInfo if ``with_info``, as a
        HEAD gives it: GetObject's answer carries the same headers, §3.3; bytes [start, end)),
        or None when start >= size (416 under standard range behaviour)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "x-oss-range-behavior": "standard"}
        if if_match is not None:
            headers["If-Match"] = if_match
        got = self._get_sync(key, headers)
        if got is None:  # start >= size under standard range behaviour (§3.2)
            return None
        status, h, data = got
        rid = h.get("x-oss-request-id", "")
        if status == 206:
            content_range = h.get("content-range")
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range or "")
            if not m:
                raise _BadResponse(f"206 with unusable Content-Range {content_range!r}", rid)
            a, b = int(m.group(1)), int(m.group(2))
            total = int(m.group(3)) if m.group(3) != "*" else None
            if len(data) != b - a + 1:
                raise _BadResponse(f"206 body is {len(data)} bytes, Content-Range says {b - a + 1}", rid)
            if a > start or b < a:
                raise _BadResponse(f"asked for bytes {start}-{end - 1}, got {content_range!r}", rid)
            if a != start:
                log.warning("OSS GET %r: asked for range start %d, server sent %s; slicing [request id %s]",
                            key, start, content_range, rid)
            whole = a == 0 and total is not None and b == total - 1
        else:
            # The range was ignored (legacy behaviour, §3.2): the body is the whole object.
            length = h.get("content-length")
            if length is not None and len(data) != int(length):
                raise _BadResponse(f"body is {len(data)} bytes, Content-Length {length}", rid)
            a, whole = 0, True
        if whole:
            _check_crc("GET", key, fastcrc.crc64.xz(data), _Answer(status, h))
        info = None
        if with_info:
            size = total if status == 206 else len(data)
            if size is None:
                raise _BadResponse(f"206 without the object's size: Content-Range {h.get('content-range')!r}", rid)
            info = self._info_from_headers(key, h if self._lean_head is not None else _lower(h), size)
        # the bytes object itself when it is exactly [start, end) (a full slice is no copy)
        return info, data[start - a:end - a]

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
            if if_match is not None and etag_norm(info.etag) != etag_norm(if_match):
                raise PreconditionFailed(f"ETag is {info.etag}, not {if_match}", key=key)
            return b""
        return await self._call("GET", key, self._get_range_sync, key, start, end, if_match, bulk=True)

    async def get_range_with_info(self, key: str, start: int, end: int, *,
                                  if_match: str | None = None) -> tuple[ObjectInfo, bytes]:
        """One ranged GetObject (§3.2) answering what :meth:`head` would as well: its answer
        carries the headers HeadObject's does (size from Content-Range, ETag, Last-Modified,
        ``x-oss-meta-*``; §3.3). An empty range, or one starting past the end, takes a HEAD
        and a GET (the base class's way). Raises as :meth:`get_range`."""
        if start < 0 or end <= start:
            return await super().get_range_with_info(key, start, end, if_match=if_match)
        got = await self._call("GET", key, self._get_range_info_sync, key, start, end, if_match, True, bulk=True)
        if got is None:
            return await super().get_range_with_info(key, start, end, if_match=if_match)
        info, data = got
        assert info is not None
        return info, data

    # -- put --------------------------------------------------------------------------------
    def _put_bytes_sync(self, key: str, data: bytes, headers: dict[str, str]):
        """One PutObject attempt (§3.1) of ``data``; its CRC-64 is checked against OSS's.
        Returns what has ``etag`` (unquoted) and ``headers``. A body up to _SMALL_BODY goes on
        the lean path (``_lean_request``: oss2's request and result objects and requests'
        per-request work were ~2/3 of a small file's PUT CPU, ``bench/head_cost.py --op
        put``; write-back of small files is a PUT each), a larger one, or any behind a
        proxy, through ``Bucket.put_object``. An error answer raises what oss2 raises."""
        crc = fastcrc.crc64.xz(data)
        if self._lean_head is None or len(data) > _SMALL_BODY:
            r = self._bucket.put_object(key, data, headers=dict(headers))
        else:
            status, h, answer = self._lean_request("PUT", key, headers, data)
            r = _Answer(status, requests.structures.CaseInsensitiveDict(h), answer)
            if status // 100 != 2:
                raise oe.make_exception(r)
        _check_crc("PUT", key, crc, r)
        return r

    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str], *,
                        if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """PutObject (§3.1) with ``x-oss-meta-*`` and ``Content-Type: application/octet-stream``;
        the CRC-64 of the upload is checked. ``mtime`` of the result is the response's Date
        (OSS sends no Last-Modified on PUT). ``if_absent``: ``x-oss-forbid-overwrite: true``
        (409 FileAlreadyExists → AlreadyExists). ``replaces`` is not checked: OSS has no
        conditional PUT on the object's ETag (``checks_replaces``)."""
        self._check_key(key)
        data = data if isinstance(data, bytes) else bytes(data)
        if len(data) > PUT_LIMIT:
            raise StoreError("object larger than 5 GB: use a multipart upload", key=key)
        headers = {"Content-Type": "application/octet-stream", **self._meta_headers(key, metadata)}
        if if_absent:
            headers[_FORBID_OVERWRITE] = "true"
        async with self.in_doubt.writing(key):
            r = await self._call("PUT", key, self._put_bytes_sync, key, data, headers, bulk=len(data) > _SMALL_BODY,
                                 doubt=lambda: [(key, _md5_etag(data))])
        info = ObjectInfo(key, len(data), r.etag, _http_time(r.headers) or 0.0, self._norm_meta(metadata))
        self.in_doubt.wrote(key, r.etag, metadata.get(H_KEY), info)
        return info

    def _put_file_sync(self, key: str, path: str, headers: dict[str, str]):
        try:
            f = open(path, "rb")
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}", key=key) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > PUT_LIMIT:
                raise StoreError(f"{path} is larger than 5 GB: use a multipart upload", key=key)
            if size <= _SMALL_BODY and self._lean_head is not None:  # in memory, on the lean path
                data = f.read()
                if len(data) != size:
                    raise StoreError(f"{path} changed while it was read for its upload", key=key)
                return size, self._put_bytes_sync(key, data, headers)
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
                       may_link: bool = False, if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """PutObject of the file at ``path`` (reopened for every attempt; up to 1 MiB read whole and
        sent as put_bytes sends it, a larger one streamed by oss2); as put_bytes (``replaces``
        not checked). ``if_absent``: ``x-oss-forbid-overwrite: true`` (409 FileAlreadyExists → AlreadyExists)."""
        self._check_key(key)
        headers = {"Content-Type": "application/octet-stream", **self._meta_headers(key, metadata)}
        if if_absent:
            headers[_FORBID_OVERWRITE] = "true"
        try:  # a small file is a metadata-sized request: a store that never answers it is down
            bulk = os.stat(path).st_size > _SMALL_BODY
        except OSError:
            bulk = True  # the attempt reports what is wrong with the file
        async with self.in_doubt.writing(key):
            size, r = await self._call("PUT", key, self._put_file_sync, key, path, headers, bulk=bulk,
                                       doubt=lambda: [(key, _md5_etag_of_file(path))])
        info = ObjectInfo(key, size, r.etag, _http_time(r.headers) or 0.0, self._norm_meta(metadata))
        self.in_doubt.wrote(key, r.etag, metadata.get(H_KEY), info)
        return info

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
            self._upload_meta[upload_id] = {n[len(_META):]: v for n, v in headers.items() if n.startswith(_META)}
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
        r = await self._call("UploadPart", key, self._part_sync, key, upload_id, part_number, data, headers,
                             bulk=True)
        with self._parts_lock:
            parts = self._parts.get(upload_id)
            if parts is not None:
                if r.crc is not None:
                    parts[part_number] = (len(data), r.crc)
                else:
                    parts.pop(part_number, None)  # Complete then skips the combined CRC check
        return r.etag

    def _complete_sync(self, key: str, upload_id: str, parts: list[oss2.models.PartInfo], crc: int | None,
                       headers: dict[str, str]):
        try:
            r = self._bucket.complete_multipart_upload(key, upload_id, parts, headers=dict(headers))
            if crc is not None:
                _check_crc("CompleteMultipartUpload", key, crc, r)
            return r
        except oe.InconsistentError as e:
            # The upload is complete but its CRC-64 differs from the parts we sent: not retryable
            # (the upload id is gone); the caller must upload again.
            raise StoreError(f"OSS CompleteMultipartUpload {key!r}: the assembled object's CRC-64 does not "
                             "match the uploaded parts; upload it again", key=key,
                             request_id=e.request_id or None) from e

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
                                 if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        """CompleteMultipartUpload (§3.13) of ``parts`` [(number, etag)], then HeadObject for the
        size, mtime and metadata. When this process uploaded every listed part, the object's
        CRC-64 (combined from the parts') is checked against OSS's. If an attempt failed in
        transit and the retry meets NoSuchUpload, the first attempt may have succeeded: the
        object is accepted when its ETag says it has ``len(parts)`` parts. Raises NoSuchKey (no
        such upload), AlreadyExists (``if_absent``: ``x-oss-forbid-overwrite``, checked by OSS at
        Complete), StoreError (400 InvalidPart, EntityTooSmall ...). ``replaces`` is not
        checked (as put_bytes)."""
        with self._parts_lock:
            known = self._parts.get(upload_id) or {}
            initiated = self._upload_meta.get(upload_id)
        infos = [oss2.models.PartInfo(n, etag) for n, etag in sorted(parts)]
        crc: int | None = None  # the object's CRC-64, when this process sent every part
        if all(n in known for n, _ in parts):
            crc = 0
            for n, _ in sorted(parts):
                crc = _crc64_combine(crc, known[n][1], known[n][0])
        seen: list = []
        try:
            async with self.in_doubt.writing(key):
                r = await self._call("CompleteMultipartUpload", key, self._complete_sync, key, upload_id, infos,
                                     crc, {_FORBID_OVERWRITE: "true"} if if_absent else {}, transient_seen=seen,
                                     bulk=True, doubt=lambda: [(key, _multipart_etag([e for _, e in sorted(parts)]))])
            etag = r.etag  # (OSS may take long to join the parts: bulk)
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
                self._upload_meta.pop(upload_id, None)
        info = None
        try:
            info = await self.head(key)
        finally:  # (the HEAD failing: the write is still this mount's)
            self.in_doubt.wrote(key, etag, (initiated or {}).get(H_KEY),
                                info if info is not None and same_etag(info.etag, etag) else None)
        if info is None:
            raise NoSuchKey("object vanished right after CompleteMultipartUpload", key=key)
        if info.etag == etag:
            return info
        # Another client's object replaced ours between the Complete and this HEAD: say what we
        # completed, not theirs (their ETag with our content and envelope made the mount read
        # our cached blocks as theirs: garbage; a trial). The caller's next look at the key
        # finds theirs, as another client's version.
        log.warning("OSS CompleteMultipartUpload %r: another client's object (ETag %s) replaced the one just "
                    "completed (ETag %s)", key, info.etag, etag)
        if initiated is None:  # not initiated by this process: only the ETag is known
            initiated = {}
        size = sum(part_size for part_size, _crc in known.values()) if all(n in known for n, _ in parts) else info.size
        return ObjectInfo(key, size, etag, info.mtime, initiated, answered=info.answered)

    def _abort_sync(self, key: str, upload_id: str) -> None:
        self._bucket.abort_multipart_upload(key, upload_id)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload (§3.14); NoSuchUpload (already gone) is not an error."""
        with self._parts_lock:
            self._parts.pop(upload_id, None)
            self._upload_meta.pop(upload_id, None)
        try:
            await self._call("AbortMultipartUpload", key, self._abort_sync, key, upload_id)
        except NoSuchKey:
            pass

    # -- list / copy / delete ---------------------------------------------------------------
    def _list_sync(self, prefix: str, delimiter: str, marker: str,
                   max_keys: int) -> tuple[list[ObjectInfo], list[str], bool, str]:
        """One ListObjects attempt: (objects, prefixes, is_truncated, NextMarker or "").

        The request is oss2's own (``Bucket.list_objects``'s parameters, signature and error
        handling), sent on the lean path (``_lean_request``) or else through ``_Base._do``;
        the answer is read by ``oss_xml.parse_list_objects``,
        a third of oss2's parser's CPU (a 100,000-entry directory is 100 pages). An oss2
        without ``_do`` lists through ``Bucket.list_objects``. An answer that cannot be read
        raises _BadResponse (retried)."""
        params = {"prefix": prefix, "delimiter": delimiter, "marker": marker, "max-keys": str(max_keys),
                  "encoding-type": "url"}
        if self._lean_head is not None:  # (a third less client CPU per page than through requests)
            status, h, body = self._lean_request("GET", "", None, params=params)
            if status // 100 != 2:
                raise oe.make_exception(_Answer(status, requests.structures.CaseInsensitiveDict(h), body))
            request_id = h.get("x-oss-request-id", "")
        else:
            do = getattr(self._bucket, "_do", None)
            if not callable(do):
                r = self._bucket.list_objects(prefix=prefix, delimiter=delimiter, marker=marker, max_keys=max_keys)
                return ([ObjectInfo(o.key, int(o.size), o.etag, float(o.last_modified), metadata_unknown=True)
                         for o in r.object_list],
                        list(r.prefix_list), bool(r.is_truncated), r.next_marker or "")
            resp = do("GET", self.bucket_name, "", params=params, headers=oss2.http.CaseInsensitiveDict())
            body, request_id = resp.read(), resp.request_id
        try:
            return parse_list_objects(body)
        except ListAnswerError as e:
            raise _BadResponse(f"ListObjects answer: {e}", request_id) from None

    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        """ListObjects v1 (§3.7) with ``encoding-type=url`` (keys decoded here). One
        page of at most ``max_keys`` (clamped to 1..1000) objects plus common prefixes, both counted
        against max_keys; ``next_marker`` (OSS's NextMarker: the last key or common prefix of
        the page) is None on the last page. Listing metadata is empty."""
        n = max(1, min(int(max_keys), 1000))
        objects, prefixes, truncated, marker_next = await self._call(
            "ListObjects", prefix, self._list_sync, prefix, delimiter or "", marker or "", n)
        next_marker = None
        if truncated:
            next_marker = marker_next or max([o.key for o in objects] + prefixes, default=None)
        return ListPage(objects, prefixes, next_marker)

    def _copy_sync(self, src: str, dst: str, headers: dict[str, str]):
        return self._bucket.copy_object(self.bucket_name, src, dst, headers=dict(headers))

    def _check_copy_size(self, src: str, size: int) -> None:
        limit = self.max_copy_size
        if limit is not None and size > limit:
            raise StoreError(f"cannot copy {src!r} ({size} bytes): objects above {limit} bytes cannot be "
                             "copied with CopyObject", key=src)

    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None, *,
                   if_match: str | None = None, if_absent: bool = False, replaces: str | None = None,
                   source: ObjectInfo | None = None) -> ObjectInfo:
        """CopyObject within the bucket (§3.9): ``x-oss-metadata-directive: COPY`` when
        ``metadata`` is None, else ``REPLACE`` with the given ``x-oss-meta-*`` and the source's
        Content-Type. The source is HEADed first (its size, type and metadata for the result),
        except for a COPY of version ``if_match`` the caller describes (``source``): its
        ``x-oss-copy-source-if-match`` checks that version as the HEAD would, in the same request.

        ``if_match``: the copy is conditional on that source ETag (``x-oss-copy-source-if-match``,
        §3.9): a source that is another version (at the HEAD already, or replaced between the
        HEAD and the copy: OSS answers 412) raises PreconditionFailed and nothing is copied.
        Without it, the copy is conditional on the ETag the HEAD saw, so the result describes
        the version copied (a source replaced in between is HEADed again, at most 3 times).

        ``if_absent``: ``x-oss-forbid-overwrite: true`` (409 FileAlreadyExists → AlreadyExists).
        ``replaces`` is not checked: CopyObject has no condition on the destination's ETag.

        Raises NoSuchKey (source missing), PreconditionFailed, AlreadyExists, StoreError for a
        source above ``max_copy_size`` (CopyObject cannot do it; it needs a streamed copy)."""
        self._check_key(dst)
        for _ in range(1 if if_match is not None else 3):
            if source is not None and if_match is not None and metadata is None:
                info, kept = source, {}  # the copy's If-Match checks that version: no HEAD
            else:
                h = await self._head(src)
                if h is None:
                    raise NoSuchKey("copy source does not exist", key=src)
                info, kept = h
                if if_match is not None and etag_norm(info.etag) != etag_norm(if_match):
                    raise PreconditionFailed(f"OSS CopyObject {src!r}: the source is version {info.etag}, "
                                             f"not {if_match}", key=src, code="PreconditionFailed")
            self._check_copy_size(src, info.size)
            headers = {"x-oss-copy-source-if-match": if_match if if_match is not None else info.etag}
            if if_absent:
                headers[_FORBID_OVERWRITE] = "true"
            if metadata is None:
                headers["x-oss-metadata-directive"] = "COPY"
                meta = self._norm_meta(info.metadata)
            else:
                headers["x-oss-metadata-directive"] = "REPLACE"
                headers.update(kept)  # REPLACE drops them (a trial: chmod lost Cache-Control)
                headers.setdefault("Content-Type", "application/octet-stream")
                headers.update(self._meta_headers(dst, metadata))
                meta = self._norm_meta(metadata)
            try:
                async with self.in_doubt.writing(dst):
                    r = await self._call("CopyObject", dst, self._copy_sync, src, dst, headers,
                                         bulk=info.size > _SMALL_BODY,  # server-side copy time grows with size
                                         doubt=functools.partial(lambda etag: [(dst, etag)], info.etag))
                # (a copy keeps its source's ETag)
            except PreconditionFailed:
                if if_match is not None:
                    raise
                continue
            copied = ObjectInfo(dst, info.size, r.etag or info.etag, _http_time(r.headers) or 0.0, meta)
            self.in_doubt.wrote(dst, copied.etag, None, copied)
            return copied
        raise StoreError(f"copy source {src!r} kept changing", key=src)

    # -- multipart uploads in progress --------------------------------------------------------
    def _list_uploads_sync(self, prefix: str, key_marker: str, upload_id_marker: str):
        return self._bucket.list_multipart_uploads(prefix=prefix, key_marker=key_marker,
                                                   upload_id_marker=upload_id_marker, max_uploads=1000)

    async def list_multipart_uploads(self, prefix: str = "") -> MultipartUploads:
        """ListMultipartUploads (§3.16), following NextKeyMarker/NextUploadIdMarker to the end:
        ``[(key, upload_id, initiated)]``, ``initiated`` in epoch seconds."""
        out: list[tuple[str, str, float]] = []
        key_marker = upload_id_marker = ""
        while True:
            r = await self._call("ListMultipartUploads", prefix, self._list_uploads_sync, prefix, key_marker,
                                 upload_id_marker)
            out.extend((u.key, u.upload_id, float(u.initiation_date or 0)) for u in r.upload_list)
            if not r.is_truncated or not (r.next_key_marker or r.next_upload_id_marker):
                break
            key_marker, upload_id_marker = r.next_key_marker, r.next_upload_id_marker
        out.sort(key=lambda u: (u[0], u[2]))
        return out

    def _still_to_delete(self, op: str, key: str, version: str) -> bool:
        """For a DELETE retried after a lost answer (in a worker thread): whether ``key`` still
        holds ``version`` (a HEAD). Gone, or another version there (one INFO line): nothing to
        delete."""
        try:
            info, _ = self._head_sync(key)
        except oe.NotFound:
            return False
        if same_etag(info.etag, version):
            return True
        log.info("OSS %s %r: not retried, it is version %s now, not %s (another client wrote it)",
                 op, key, info.etag, version)
        return False

    def _delete_sync(self, key: str, version: str | None, sent: threading.Event) -> None:
        """One DeleteObject attempt; with ``version``, an attempt after one that was sent
        (``sent`` set) HEADs first and deletes nothing when another version is there."""
        if version is not None and sent.is_set() and not self._still_to_delete("DELETE", key, version):
            return
        sent.set()
        self._bucket.delete_object(key)

    async def delete(self, key: str, *, version: str | None = None) -> None:
        """DeleteObject (§3.5): 204 whether or not the key existed. ``version``: see
        ObjectStore.delete (a retry HEADs first)."""
        try:
            await self._call("DELETE", key, self._delete_sync, key, version, threading.Event(),
                             doubt=lambda: [(key, DELETED)])
        except NoSuchKey:
            pass
        self.in_doubt.wrote(key, DELETED)

    async def aclose(self) -> None:
        """Close the pooled connections and head_many's idle threads."""
        self._head_executor.shutdown(wait=False)
        self._session.session.close()

    def _delete_many_sync(self, keys: KeyList, versions: Mapping[str, str] | None,
                          sent: threading.Event) -> KeyList:
        """One DeleteMultipleObjects attempt; the keys it deleted (or found gone). With
        ``versions``, an attempt after one that was sent (``sent`` set) HEADs each key first
        (one at a time: a retry is rare, and its batch at most 1000 keys) and leaves those at
        another version, counting them as done."""
        done: KeyList = []
        if versions is not None and sent.is_set():
            still = [k for k in keys if k not in versions or self._still_to_delete("DeleteMultiple", k, versions[k])]
            kept = set(still)
            done = [k for k in keys if k not in kept]
            if not still:
                return done
            keys = still
        sent.set()
        return done + [str(k) for k in self._bucket.batch_delete_objects(keys).deleted_keys]

    async def delete_many(self, keys: KeyList, versions: Mapping[str, str] | None = None) -> KeyList:
        """DeleteMultipleObjects (§3.6): one POST for up to 1000 keys, verbose (oss2 sends
        Quiet=false): every key given is reported Deleted, also one that did not exist; a key
        not reported is returned as not deleted. Retried like any request; with ``versions``
        (ObjectStore.delete_many), a retry HEADs each key first. A key holding a character
        the request body cannot carry as XML text (a control character: one made the whole
        batch MalformedXML; CR: the parser reads it as LF, so another key was deleted; two
        trials) goes by its own DeleteObject; one whose DELETE fails is returned as not
        deleted."""
        odd = [k for k in keys if _NOT_XML_TEXT.search(k)]
        if odd:
            left = [k for k in keys if k not in set(odd)]
            failed = await self.delete_many(left, versions) if left else []
            for k in odd:
                try:
                    await self.delete(k, version=versions.get(k) if versions is not None else None)
                except StoreUnavailable:  # the store is away: the batch's failure, as one request's
                    raise
                except StoreError as e:
                    log.debug("deleting %r failed: %s", k, e)
                    failed.append(k)
            return failed
        deleted = set(await self._call("DeleteMultiple", keys[0] if len(keys) == 1 else None,
                                       self._delete_many_sync, keys[:], versions, threading.Event(),
                                       doubt=lambda: [(k, DELETED) for k in keys]))
        for k in deleted:
            self.in_doubt.wrote(k, DELETED)
        return [k for k in keys if k not in deleted]


__all__ = ["OssStore", "region_from_endpoint", "COPY_LIMIT", "PUT_LIMIT", "CredentialsError"]
