"""The lifecycle the local test services (OSS, KMS) share: serve a ThreadingHTTPServer in a
daemon thread on 127.0.0.1, stop it (dropping open connections, as a server going down does)
and start it again on the same port with its data kept."""
from __future__ import annotations

import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Optional


class TrackingHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that knows its open connections, so ``drop_all()`` can cut them
    as a server going down would. ``service`` is the test service the handlers serve."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, service):
        self.service = service
        self._conns: set = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # keep test output quiet unless debugging
        if getattr(self.service, "debug", False):
            super().handle_error(request, client_address)

    def drop_all(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ThreadedService:
    """Mixin. The class sets ``host``, ``port`` (0: a free one), ``_httpd = None``,
    ``_thread = None`` and implements ``_new_httpd()``, returning an HTTP server bound to
    (host, port) that has a ``drop_all()`` closing its open connections."""

    host: str
    port: int
    _httpd: Optional[object] = None
    _thread: Optional[threading.Thread] = None
    thread_name = "test-service"

    def _new_httpd(self):
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self):
        """Listen (again, on the same port after a stop) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        last: Optional[OSError] = None
        for _ in range(50):
            try:
                self._httpd = self._new_httpd()
                break
            except OSError as e:  # the port of a previous run still busy for a moment
                last = e
                time.sleep(0.05)
        else:
            raise last  # type: ignore[misc]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: clients then get 'connection refused'."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_all()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
