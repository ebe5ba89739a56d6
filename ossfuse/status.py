"""``ossfuse status``: what a running mount is doing, over a unix socket the daemon serves.

The daemon listens on ``<runtime dir>/<mount hash>.sock`` (mode 0600); a client connects, the
daemon writes one JSON document and closes. Fields: state (``serving``, or ``draining`` once
unmounted while pending uploads finish), pending uploads (count, bytes, age of the
oldest in seconds), cache use in bytes, recent errors (last 20 log records at ERROR), CMKs in
use, and counters (uploaded, upload_failures, recovered, quarantined).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import time

import trio

log = logging.getLogger(__name__)


class RecentErrors(logging.Handler):
    """Keeps the last ``size`` ERROR-or-worse log records for ``status``."""

    def __init__(self, size: int = 20):
        super().__init__(level=logging.ERROR)
        self.records: collections.deque[dict] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname, "message": record.getMessage()})


def collect(fs, errors: RecentErrors, started: float, state: str = "serving") -> dict:
    """The status document of a mount (see the module doc). Made from counters the mount
    keeps, with no file-system walk: it runs on the thread that serves FUSE."""
    now = time.time()
    pending = [n for n in fs.dirty if n.staged is not None and not n.unlinked]
    keyring = fs.keyring
    return {
        "state": state,
        "store": fs.cfg.store.url,
        "prefix": fs.cfg.store.prefix,
        "uptime_seconds": round(now - started, 1),
        "pending_uploads": {
            "count": len(pending),
            "bytes": sum(n.staged.size for n in pending),
            "oldest_seconds": round(now - min(n.dirty_since for n in pending), 1) if pending else 0,
            "failing": sorted(fs.key(n.path) for n in pending if n.upload_error),
        },
        "cache": {"dir": fs.cfg.cache.dir, "bytes": fs.cache.used,
                  "staging_bytes": sum(n.staged.size for n in fs.dirty if n.staged is not None)},
        "cmks": [{"id": c.id, "type": type(c).__name__, "wrap_alg": c.wrap_alg, "matdesc": c.matdesc,
                  "encrypts_new_objects": c is keyring.default} for c in keyring.cmks.values()],
        "rules": [{"prefix": p, "cmk": c.id} for p, c in keyring.rules],
        "counters": dict(fs.stats),
        "conflicts": fs.commit.conflicts.status(),  # {"count", "recent": [conflict copy paths]}
        "recent_errors": list(errors.records),
    }


async def serve(path: str, fs, errors: RecentErrors, started: float, life) -> None:
    """Answer status requests on the unix socket ``path`` (mode 0600) until cancelled; serves
    during the drain after the unmount too (``life.state`` says which). Raises OSError when the
    socket cannot be made (the daemon's supervisor then stops the mount)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    listener = trio.SocketListener(sock)
    try:
        async with listener:
            while True:
                try:
                    conn = await listener.accept()
                except OSError as e:  # EMFILE and the like: this client goes unanswered, not the mount
                    log.warning("status socket: accept failed: %s", e)
                    await trio.sleep(0.5)
                    continue
                async with conn:
                    try:
                        doc = collect(fs, errors, started, life.state)
                        await conn.send_all(json.dumps(doc).encode() + b"\n")
                    except trio.BrokenResourceError:
                        pass
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def query(path: str, timeout: float = 10.0) -> dict:
    """Fetch the status document from the daemon's socket; raises OSError if none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def render(doc: dict) -> str:
    """The status document as plain lines for people."""
    p = doc["pending_uploads"]
    lines = [
        f"store:            {doc['store']} (prefix {doc['prefix'] or '/'})",
        f"uptime:           {doc['uptime_seconds']:.0f} s",
        f"pending uploads:  {p['count']} file(s), {p['bytes']} bytes, oldest {p['oldest_seconds']:.0f} s",
    ]
    if doc.get("state", "serving") != "serving":
        lines.insert(0, f"state:            {doc['state']} (unmounted; finishing pending uploads)")
    if p["failing"]:
        lines.append(f"failing uploads:  {', '.join(p['failing'])}")
    c = doc["cache"]
    lines.append(f"cache:            {c['bytes']} bytes in blocks, {c['staging_bytes']} bytes staged ({c['dir']})")
    for k in doc["cmks"]:
        lines.append(f"CMK:              {k['id']} ({k['wrap_alg']}{', matdesc ' + json.dumps(k['matdesc']) if k['matdesc'] else ''})"
                     f"{'  <- new objects' if k['encrypts_new_objects'] else ''}")
    for r in doc["rules"]:
        lines.append(f"rule:             {r['prefix']}* -> {r['cmk']}")
    ctr = doc["counters"]
    lines.append(f"uploaded:         {ctr['uploaded']} (failures {ctr['upload_failures']}, recovered {ctr['recovered']}, "
                 f"quarantined {ctr.get('quarantined', 0)})")
    cf = doc.get("conflicts") or {"count": 0, "recent": []}
    lines.append(f"conflict copies:  {cf['count']}" + (f" (latest: {', '.join(cf['recent'])})" if cf["recent"] else ""))
    if doc["recent_errors"]:
        lines.append("recent errors:")
        for e in doc["recent_errors"]:
            lines.append(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))} {e['message']}")
    else:
        lines.append("recent errors:    none")
    return "\n".join(lines)
