"""A floor on how slowly an answer of the OSS store may arrive: the low-speed rule of its
connection pool.

A socket's read timeout bounds one ``recv``: a server that sends one byte every 4 s never trips
a 5 s timeout, and a 1 MB body so takes 46 days (trial AF: a proxy trickling a GET's body held
a reader, and with it ``umount``, for minutes; the retry deadline cannot cut an attempt short,
as a blocking read in a worker thread cannot be cancelled). curl has ``CURLOPT_LOW_SPEED_LIMIT``
and ``…_TIME`` for this; http.client has nothing, so :class:`PacedResponse` reads the answer
through :class:`_PacedReader`, which counts the bytes of each ``recv``. Once the answer's first
byte is a socket timeout old, a ``recv`` after which the last timeout's worth of seconds (this
``recv`` included) brought fewer than :data:`LOW_SPEED_BYTES` is slow; slow ones for a whole
timeout in a row raise :class:`TooSlow` (a ``TimeoutError``: the store is treated as
silent for that long), as curl's rule wants the speed below its limit for its whole time: a
pause under the timeout followed by a fast body is no trickle (trial AH: headers at once, the
body 4.8 s later at 64 KB/s, failed before its first 16 KiB were a timeout old). So an answer
that slows to a trickle ends less than three timeouts after it slowed (one to fill the window,
one in a row, and the gap to the next byte); a steady link slower than 16 KiB per timeout
(3.3 KB/s at the 5 s offline timeout, 273 B/s at the 60 s read timeout of writes) is taken for
stalled, bursts almost a timeout apart pass down to about half that (the window ends at a burst
and reaches back to the one before). The time to the first byte keeps the plain timeout (a
store may work a while before it answers).

The rule covers an answer's status line and headers, and its body when the headers announce
its length (``Content-Length``): a body of unknown length (chunked, or up to the connection's
end) is read without it, since S3-like stores keep the connection of a long copy or
CompleteMultipartUpload alive by sending whitespace before their XML, which the rule would take
for a trickle. Every connection of the OSS store's pool reads its answers so
(:class:`PacedAdapter`, the adapter of oss2's requests session: copies, the multipart requests,
large PUTs), and the lean path's (``store/oss.py``'s ``_request_on_pool``: HEAD, GET, LIST,
small PUTs); behind a proxy requests' own proxy pools read without it.

The reader must be drained as the answer comes: a caller that pauses between reads of a
streamed body longer than the timeout looks like a slow store (ossfuse reads every answer
whole at once).
"""
from __future__ import annotations

import collections
import http.client
import io
import socket
import time

import requests.adapters
import urllib3
import urllib3.connection

#: bytes a window of the socket's timeout must bring once the answer has begun
LOW_SPEED_BYTES = 16 << 10


class TooSlow(TimeoutError):
    """An answer that brought ``recent`` bytes in the last ``window`` seconds (the socket's
    timeout) while more were expected; ``total`` bytes (status line and headers included) in
    the ``seconds`` since its first byte."""

    def __init__(self, recent: int, window: float, total: int, seconds: float):
        super().__init__(f"{recent} bytes in the last {window:.1f}s")
        self.recent, self.window, self.total, self.seconds = recent, window, total, seconds


class _PacedReader(io.RawIOBase):
    """The raw reader of a socket (``sock.makefile("rb", buffering=0)``: a ``SocketIO``) with the
    low-speed rule (module docstring) applied after each ``recv``: the window is the socket's
    timeout up to and including this ``recv`` (sliding: a first burst of 16 KiB does not
    cover a trickle after it for a whole window more; trial AG). ``BufferedReader.read(n)``
    of a body larger than its buffer still ``recv``s straight into the one ``bytes`` it returns."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._began: float | None = None  # monotonic seconds of the first byte
        self._total = 0
        # (monotonic seconds, bytes) of the latest recvs, oldest first: only as many as bring
        # LOW_SPEED_BYTES (one, for a fast answer), so the deque stays short
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_bytes = 0
        self._slow_since: float | None = None  # monotonic seconds of the first slow check in a row
        self.unpaced = False  # set once the headers announce no length (module doc)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        n = self._raw.readinto(b)
        if not n or self.unpaced:
            return n
        now = time.monotonic()
        if self._began is None:
            self._began = now
        self._total += n
        recent = self._recent
        recent.append((now, n))
        self._recent_bytes += n
        while self._recent_bytes - recent[0][1] >= LOW_SPEED_BYTES:  # enough without the oldest
            self._recent_bytes -= recent.popleft()[1]
        window = self._sock.gettimeout()
        if window is None or now - self._began < window:
            return n
        while recent and recent[0][0] <= now - window:
            self._recent_bytes -= recent.popleft()[1]
        if self._recent_bytes >= LOW_SPEED_BYTES:
            self._slow_since = None
        elif self._slow_since is None:
            self._slow_since = now  # slow for one window: slow for one more too, or it was a pause
        elif now - self._slow_since >= window:
            raise TooSlow(self._recent_bytes, window, self._total, now - self._began)
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's makefile reference (the socket itself stays open)
        super().close()


class PacedResponse(http.client.HTTPResponse):
    """http.client's answer, read through :class:`_PacedReader`: the ``response_class`` of the
    connections of :class:`PacedAdapter`'s pools. A window that is too slow raises
    :class:`TooSlow` out of ``getresponse`` (the status line or headers) or ``read`` (a body of
    announced length)."""

    def __init__(self, sock: socket.socket, *args, **kwargs):
        # http.client's __init__ takes its reader from ``sock.makefile("rb")``: hand it ours
        # (one reader per answer, not a second one made and closed: ``ls -l`` is a HEAD per entry)
        self._paced = _PacedReader(sock)
        super().__init__(_ReaderOf(io.BufferedReader(self._paced)), *args, **kwargs)  # type: ignore[arg-type]

    def begin(self) -> None:
        super().begin()
        if self.length is None:  # chunked, or up to the connection's end: not paced (module doc)
            self._paced.unpaced = True


class _ReaderOf:
    """What ``HTTPResponse.__init__`` takes for a socket: it only calls ``makefile("rb")``."""

    __slots__ = ("_reader",)

    def __init__(self, reader: io.BufferedReader):
        self._reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return self._reader


class _PacedHTTPConnection(urllib3.connection.HTTPConnection):
    response_class = PacedResponse


class _PacedHTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = PacedResponse


class _PacedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PacedHTTPConnection


class _PacedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PacedHTTPSConnection


class PacedAdapter(requests.adapters.HTTPAdapter):
    """requests' HTTPAdapter whose connection pools read every answer as a
    :class:`PacedResponse` (not those of a proxy: requests makes their managers itself)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PacedHTTPPool, "https": _PacedHTTPSPool}
