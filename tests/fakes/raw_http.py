"""A raw HTTP-ish test server: each connection's request read, then an answer function of the
test's own (a stalled, trickling, cut or chunked answer that no real server gives on demand).
Used by ``test_offline.py`` and ``test_oss_store.py``."""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def raw_server(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """The endpoint of a server that reads each connection's request (one ``recv``) and runs
    ``answer(connection, stop)`` in a thread of its own; ``stop`` is set at the end, and the
    connections closed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def run(c: socket.socket) -> None:
        try:
            c.recv(65536)
            answer(c, stop)
        except OSError:  # (closed at the end)
            pass

    def serve():
        while not stop.is_set():
            try:
                c, _ = listener.accept()
            except OSError:
                return
            conns.append(c)
            threading.Thread(target=run, args=(c,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for c in conns:
            c.close()
