"""A floor on how slowly an HTTP answer may arrive: the low-speed rule of the lean request path.

A socket's read timeout bounds one ``recv``: a server that sends one byte every 4 s never trips
a 5 s timeout, and a 1 MB body so takes 46 days (trial AF: a proxy trickling a GET's body held
a reader, and with it ``umount``, for minutes; the retry deadline cannot cut an attempt short,
as a blocking read in a worker thread cannot be cancelled). curl has ``CURLOPT_LOW_SPEED_LIMIT``
and ``…_TIME`` for this; http.client has nothing, so :class:`PacedResponse` reads the answer
through :class:`_PacedReader`, which counts the bytes of each ``recv``: from the first byte of the
answer on, a window as long as the socket's timeout that brings fewer than :data:`LOW_SPEED_BYTES`
while more is expected raises :class:`TooSlow` (a ``TimeoutError``: the store is treated as
silent for that long). So a stalled answer ends within twice the read timeout; a link slower
than 16 KiB per timeout (3.3 KB/s at the 5 s offline timeout, 273 B/s at the 60 s read timeout
of writes) is taken for stalled. The time to the first byte keeps the plain timeout (a store may
work a while before it answers).

Used by ``store/oss.py``'s ``_request_on_pool`` (HEAD, GET, LIST, small PUTs). Not covered:
requests that go through oss2 and requests (copies, multipart, and everything behind a proxy):
a long CopyObject or CompleteMultipartUpload may answer late, and S3-like stores keep such a
connection alive with whitespace, which this rule would take for a trickle.
"""
from __future__ import annotations

import http.client
import io
import socket
import time

#: bytes a window of the socket's timeout must bring once the answer has begun
LOW_SPEED_BYTES = 16 << 10


class TooSlow(TimeoutError):
    """An answer that brought ``got`` bytes in ``seconds`` (≥ the socket's timeout) while more
    were expected."""

    def __init__(self, got: int, seconds: float):
        super().__init__(f"{got} bytes in {seconds:.1f}s")
        self.got = got
        self.seconds = seconds


class _PacedReader(io.RawIOBase):
    """The raw reader of a socket (``sock.makefile("rb", buffering=0)``: a ``SocketIO``) with the
    low-speed rule (module docstring) applied after each ``recv``. ``BufferedReader.read(n)``
    of a body larger than its buffer still ``recv``s straight into the one ``bytes`` it returns."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._window_start: float | None = None  # monotonic seconds; None until the first byte
        self._window_got = 0  # bytes since _window_start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        n = self._raw.readinto(b)
        if not n:
            return n
        now = time.monotonic()
        if self._window_start is None:
            self._window_start = now
        self._window_got += n
        elapsed = now - self._window_start
        window = self._sock.gettimeout()
        if window is not None and elapsed >= window:
            if self._window_got < LOW_SPEED_BYTES:
                raise TooSlow(self._window_got, elapsed)
            self._window_start, self._window_got = now, 0
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's makefile reference (the socket itself stays open)
        super().close()


class PacedResponse(http.client.HTTPResponse):
    """http.client's answer, read through :class:`_PacedReader`. Set as a connection's
    ``response_class`` for one ``getresponse``; the answer keeps its reader to the end. A
    window that is too slow raises :class:`TooSlow` out of ``getresponse`` (the status line or
    headers) or ``read`` (the body)."""

    def __init__(self, sock: socket.socket, *args, **kwargs):
        # http.client's __init__ takes its reader from ``sock.makefile("rb")``: hand it ours
        # (one reader per answer, not a second one made and closed: ``ls -l`` is a HEAD per entry)
        super().__init__(_ReaderOf(io.BufferedReader(_PacedReader(sock))), *args, **kwargs)  # type: ignore[arg-type]


class _ReaderOf:
    """What ``HTTPResponse.__init__`` takes for a socket: it only calls ``makefile("rb")``."""

    __slots__ = ("_reader",)

    def __init__(self, reader: io.BufferedReader):
        self._reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return self._reader
