"""The OSS test server in a process of its own, remote-controlled from the test.

Mount tests must not host the server in the test process: a test thread blocked in the kernel
on the FUSE mount (munmap of a shared mapping, say) can hold locks that the server thread needs,
while the daemon waits for the server: a deadlock. ``RemoteOssServer`` offers the parts of
``OssTestServer``'s API the tests use (``endpoint``, ``root_dir``, ``faults.*``, ``requests_for``,
``clear_requests``, ``stop``/``start`` keeping data, ``pending_uploads``)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing.connection import Client

_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oss_server.py")


class _Proxy:
    def __init__(self, remote: "RemoteOssServer", prefix: str):
        self._remote, self._prefix = remote, prefix

    def __getattr__(self, name: str):
        return lambda *a, **kw: self._remote.call(f"{self._prefix}.{name}", *a, **kw)


class RemoteOssServer:
    """Start with ``start_process()``; ``close()`` ends the process (always call it)."""

    def __init__(self, *, access_key_id: str, access_key_secret: str, bucket: str, region: str, root_dir: str):
        self.root_dir = root_dir
        self._control = os.path.join(root_dir, "control.sock")
        os.makedirs(root_dir, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, _SERVER, "--port", "0", "--access-key-id", access_key_id, "--access-key-secret",
             access_key_secret, "--bucket", bucket, "--region", region, "--root-dir", os.path.join(root_dir, "data"),
             "--control", self._control], stdout=subprocess.PIPE, text=True)
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint.startswith("http"):
            self.close()
            raise RuntimeError("the OSS test server did not start")
        for attempt in range(250):  # the socket file appears at bind(), before listen()
            try:
                self._conn = Client(self._control, family="AF_UNIX", authkey=b"ossfuse-test")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if attempt == 249:
                    self.close()
                    raise
                time.sleep(0.02)
        self.faults = _Proxy(self, "faults")

    def call(self, name: str, *args, **kwargs):
        self._conn.send((name, args, kwargs))
        status, value = self._conn.recv()
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        """Stop answering (connections refused); data is kept."""
        self.call("stop")

    def start(self) -> None:
        self.call("start")

    def requests_for(self, **kw):
        return self.call("requests_for", **kw)

    def clear_requests(self) -> None:
        self.call("clear_requests")

    def pending_uploads(self) -> int:
        return self.call("pending_upload_count")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
