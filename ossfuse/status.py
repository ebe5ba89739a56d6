"""``ossfuse status``: what a running mount is doing, over a unix socket the daemon serves.

The daemon listens on ``<runtime dir>/<mount hash>.sock`` (mode 0600); a client connects, the
daemon writes one JSON document and closes. Fields: state (``serving``, or ``draining`` once
unmounted while pending uploads finish), the daemon's pid, pending uploads (count, bytes, age of the
oldest in seconds, and per upload running now the bytes already in the store), cache use in
bytes with its hit and miss counts, store operations (calls, errors by kind, retries, bytes
sent and received), recent errors (last 20 log records at ERROR or worse) and warnings (last
20 at WARNING), CMKs in use, counters (uploaded, upload_failures, recovered, quarantined: by
this mount), the damaged journal entries kept in ``staging/quarantine`` (any mount's), and
where the daemon logs (``log``: a file path, or how to read the journal).

:func:`prometheus` turns that document into the Prometheus text exposition format (version
0.0.4, https://prometheus.io/docs/instrumenting/exposition_formats/) for
``ossfuse status --prometheus``, e.g. into node_exporter's textfile collector.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import time

from .registry import one_line


log = logging.getLogger(__name__)


class RecentErrors(logging.Handler):
    """Keeps the last ``size`` ERROR-or-worse log records (``records``) and, apart, the last
    ``size`` WARNING records (``warnings``: a conflict copy, a key skipped as no valid name, the
    store going offline) for ``status``: warnings must not push errors out."""

    def __init__(self, size: int = 20):
        super().__init__(level=logging.WARNING)
        self.records: collections.deque[dict] = collections.deque(maxlen=size)
        self.warnings: collections.deque[dict] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        kept = self.records if record.levelno >= logging.ERROR else self.warnings
        kept.append({"time": record.created, "level": record.levelname, "message": record.getMessage()})


def log_destination() -> str:
    """Where this daemon's log goes: the file of its log handler (``<cache dir>/ossfuse.log``
    for a mount started by ``ossfuse mount``); under systemd (JOURNAL_STREAM set) the journal,
    with the ``journalctl -u UNIT`` that shows it when /proc/self/cgroup names the unit; else
    its standard error (``--foreground``)."""
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name:
            return name
    if os.environ.get("JOURNAL_STREAM"):
        try:  # cgroup v2: "0::/system.slice/ossfuse@mnt-data.service"
            with open("/proc/self/cgroup") as f:
                unit = next((part for line in f for part in line.strip().split("/")
                             if part.endswith(".service")), None)
        except OSError:
            unit = None
        return f"the journal (journalctl -u {unit})" if unit else "the journal (journalctl)"
    return "standard error (a foreground mount)"


def collect(fs, errors: RecentErrors, started: float, state: str = "serving") -> dict:
    """The status document of a mount (see the module doc). Made from counters the mount
    keeps, with no file-system walk (one listing of the small quarantine directory, which the
    operator empties by hand): it runs on the thread that serves FUSE."""
    now = time.time()
    pending = [n for n in fs.dirty if n.staged is not None and not n.unlinked]
    keyring = fs.keyring
    uploading = sorted(fs.uploader.in_progress, key=lambda p: p.started)
    store = fs.store.counters
    cache_stats = fs.cache.stats
    lookups = cache_stats["hits"] + cache_stats["misses"]
    return {
        "state": state,
        "pid": os.getpid(),
        "store": fs.cfg.store.url,
        "prefix": fs.cfg.store.prefix,
        "uptime_seconds": round(now - started, 1),
        "pending_uploads": {
            "count": len(pending),
            "bytes": sum(n.staged.size for n in pending),
            "oldest_seconds": round(now - min(n.dirty_since for n in pending), 1) if pending else 0,
            "failing": sorted(fs.key(n.path) for n in pending if n.upload_error),
            # closed files whose changes are not journaled: their seal failed (a full cache disk);
            # tried again, and lost to a crash or an unmount that cannot save them either
            "unsaved": sorted(fs.key(n.path) for n in pending if n.opens == 0 and not fs.commit.journaled(n)),
            # uploads running now: bytes of each already in the store (per part or PUT)
            "uploading": [{"key": p.key, "bytes_done": p.done, "bytes_total": p.total} for p in uploading],
            "bytes_uploaded": sum(p.done for p in uploading),
        },
        "cache": {"dir": fs.cfg.cache.dir, "bytes": fs.cache.used, "max_bytes": fs.cache.max_size,
                  "staging_bytes": sum(n.staged.size for n in fs.dirty if n.staged is not None),
                  "hits": cache_stats["hits"], "misses": cache_stats["misses"],
                  "hit_ratio": round(cache_stats["hits"] / lookups, 4) if lookups else None},
        "store_ops": {"calls": dict(store.calls), "retries": dict(store.retries),
                      "errors": [{"op": op, "kind": kind, "count": n} for (op, kind), n in sorted(store.errors.items())],
                      "bytes_sent": store.bytes_sent, "bytes_received": store.bytes_received},
        "cmks": [{"id": c.id, "type": type(c).__name__, "wrap_alg": c.wrap_alg, "matdesc": c.matdesc,
                  "encrypts_new_objects": c is keyring.default} for c in keyring.cmks.values()],
        "rules": [{"prefix": p, "cmk": c.id} for p, c in keyring.rules],
        "counters": dict(fs.stats),
        # bytes read (returned to readers) checked against integrity tags, and of objects that
        # have none (written by the SDKs); blocks that failed their tag twice (docs/integrity.md)
        "integrity": {"verified_bytes": cache_stats["verified_bytes"],
                      "unverified_bytes": cache_stats["unverified_bytes"],
                      "failures": cache_stats["integrity_failures"]},
        # damaged journal entries kept in staging/quarantine (this mount's and earlier ones')
        "quarantine": {"dir": fs.staging.quarantine_dir, "entries": fs.staging.quarantined()},
        "conflicts": fs.commit.conflicts.status(),  # {"count", "recent": [conflict copy paths]}
        "recent_errors": list(errors.records),
        "recent_warnings": list(errors.warnings),
        # {"online", "offline_since" (epoch seconds or None), "reason"}: store/health.py
        "store_health": (fs.store.health.status() if fs.store.health is not None
                         else {"online": True, "offline_since": None, "reason": None}),
        "log": log_destination(),  # (a trial: only the README said where it is)
    }


async def serve(path: str, fs, errors: RecentErrors, started: float, life) -> None:
    """Answer status requests on the unix socket ``path`` (mode 0600) until cancelled; serves
    during the drain after the unmount too (``life.state`` says which). Raises OSError when the
    socket cannot be made (the daemon's supervisor then stops the mount)."""
    import trio  # here: `ossfuse status`/`umount` only query, and start faster without it
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    life.status_up.set()  # the mount reports ready only once this answers
    listener = trio.SocketListener(sock)
    try:
        async with listener:
            failing = False  # said once while accept keeps failing (the client waits in the backlog)
            while True:
                try:
                    conn = await listener.accept()
                except OSError as e:  # EMFILE and the like: this client goes unanswered, not the mount
                    log.log(logging.DEBUG if failing else logging.WARNING, "status socket: accept failed: %s", e)
                    failing = True
                    await trio.sleep(0.5)
                    continue
                failing = False
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
        f"store:            {doc['store']} ({'prefix ' + doc['prefix'] if doc['prefix'] else 'no prefix: the whole bucket'})",
        f"uptime:           {doc['uptime_seconds']:.0f} s" + (f" (daemon pid {doc['pid']})" if "pid" in doc else ""),
        f"pending uploads:  {p['count']} file(s), {p['bytes']} bytes"
        + (f", the oldest first changed {p['oldest_seconds']:.0f} s ago (open files included)" if p["count"] else ""),
    ]
    health = doc.get("store_health") or {}
    if health.get("offline_since") is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(health["offline_since"]))
        lines.insert(0, f"store:            OFFLINE since {since} ({health['reason']}); serving from the cache")
    if doc.get("state", "serving") != "serving":
        lines.insert(0, f"state:            {doc['state']} (unmounted; finishing pending uploads)")
    for u in p.get("uploading", []):
        pct = 100 * u["bytes_done"] / u["bytes_total"] if u["bytes_total"] else 100
        lines.append(f"uploading:        {one_line(u['key'])}: {u['bytes_done']} of {u['bytes_total']} bytes "
                     f"({pct:.0f}%)")
    if p["failing"]:
        lines.append(f"failing uploads:  {', '.join(one_line(k) for k in p['failing'])}")
    if p.get("unsaved"):
        lines.append(f"not saved:        {', '.join(one_line(k) for k in p['unsaved'])} (their close could not save "
                     f"the changes in the cache dir, see the log; tried again; a crash or unmount before that "
                     f"works loses them)")
    c = doc["cache"]
    ratio = f", hit rate {100 * c['hit_ratio']:.0f}%" if c.get("hit_ratio") is not None else ""
    lines.append(f"cache:            {c['bytes']} bytes in blocks{ratio}, {c['staging_bytes']} bytes staged "
                 f"({c['dir']})")
    ops = doc.get("store_ops")
    if ops:
        refused = sum(e["count"] for e in ops["errors"] if e["kind"] in _ANSWERS_NOT_FAULTS)
        errors = sum(e["count"] for e in ops["errors"]) - refused
        lines.append(f"store requests:   {sum(ops['calls'].values())} operations, {ops['bytes_sent']} bytes sent, "
                     f"{ops['bytes_received']} received, {errors} error(s), {sum(ops['retries'].values())} retries"
                     + (f"; {refused} refused as asked (a version check, create-only, or a missing key: what "
                        f"another client's change looks like)" if refused else ""))
    for k in doc["cmks"]:
        matdesc = json.dumps(k["matdesc"]) if k["matdesc"] else ""
        if len(matdesc) > _MATDESC_SHOWN:  # (a trial's 6,500-byte matdesc made one 6,500-character line)
            matdesc = f"{matdesc[:_MATDESC_SHOWN]}… ({len(matdesc)} characters; --json has it whole)"
        lines.append(f"CMK:              {one_line(k['id'])} ({k['wrap_alg']}{', matdesc ' + one_line(matdesc) if matdesc else ''})"
                     f"{'  <- new objects' if k['encrypts_new_objects'] else ''}")
    for r in doc["rules"]:
        lines.append(f"rule:             {r['prefix']}* -> {r['cmk']}")
    ctr = doc["counters"]
    lines.append(f"uploaded:         {ctr['uploaded']} (failures {ctr['upload_failures']}, recovered {ctr['recovered']}, "
                 f"quarantined {ctr.get('quarantined', 0)})")
    ig = doc.get("integrity")
    if ig:
        lines.append(f"bytes read:       {ig['verified_bytes']} verified, {ig['unverified_bytes']} without tags "
                     f"(integrity failures {ig['failures']})")
    q = doc.get("quarantine") or {"entries": 0}
    if q["entries"]:
        lines.append(f"quarantine:       {q['entries']} damaged journal entr{'y' if q['entries'] == 1 else 'ies'} "
                     f"in {q['dir']}, never uploaded: recover by hand or delete")
    cf = doc.get("conflicts") or {"count": 0, "recent": []}
    lines.append(f"conflict copies:  {cf['count']}"
                 + (f" (latest: {', '.join(one_line(n) for n in cf['recent'])})" if cf["recent"] else ""))
    if doc.get("log"):
        lines.append(f"log:              {doc['log']}")
    for field, title in (("recent_errors", "recent errors:"), ("recent_warnings", "recent warnings:")):
        records = doc.get(field) or []
        if records:
            lines.append(title)
            for e in records:
                lines.append(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))} "
                             f"{one_line(e['message'])}")
        else:
            lines.append(f"{title:<18}none")
    return "\n".join(lines)


_MATDESC_SHOWN = 120  # characters of a CMK's matdesc the text status shows


def _label(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# store answers that refuse what a request made conditional (an ETag, create-only) or find no
# object: how another client's change shows (fs/conflicts.py), no fault of the store or the mount
_ANSWERS_NOT_FAULTS = frozenset({"PreconditionFailed", "AlreadyExists", "FileAlreadyExists", "DestinationChanged",
                                 "NoSuchKey"})
_UP_HELP = "1: the daemon answered; 0: none answers for the mount point (dead, or not mounted)."


def _family(out: list[str], mountpoint: str, name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    """Append metric family ``name`` (its ``# HELP``/``# TYPE`` pair, then each sample labelled
    ``mountpoint`` and its own labels) to the exposition lines ``out``."""
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        text = ",".join([f'mountpoint="{_label(mountpoint)}"'] + [f'{k}="{_label(str(v))}"' for k, v in labels.items()])
        out.append(f"{name}{{{text}}} {float(value)!r}" if isinstance(value, float) else f"{name}{{{text}}} {value}")


def prometheus_down(mountpoint: str) -> str:
    """The exposition text when no daemon answers for ``mountpoint`` (it died, or nothing is
    mounted there): ``ossfuse_up`` 0 alone, so a textfile collector stops serving the last
    answer's 1."""
    out: list[str] = []
    _family(out, mountpoint, "ossfuse_up", "gauge", _UP_HELP, [({}, 0)])
    return "\n".join(out) + "\n"


def prometheus(doc: dict) -> str:
    """The status document ``doc`` (with its ``mountpoint``) as Prometheus text exposition
    format 0.0.4: one ``# HELP``/``# TYPE`` pair per metric family, every sample labelled
    ``mountpoint``; sizes in bytes, ages in seconds (Prometheus base units). Ends with a newline."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        _family(out, doc["mountpoint"], name, kind, help_text, samples)

    p, c, ctr = doc["pending_uploads"], doc["cache"], doc["counters"]
    ops = doc.get("store_ops") or {"calls": {}, "retries": {}, "errors": [], "bytes_sent": 0, "bytes_received": 0}
    family("ossfuse_up", "gauge", _UP_HELP, [({}, 1)])
    family("ossfuse_store_offline", "gauge", "1 while the store is unreachable and the mount works from its cache.",
           [({}, 0 if (doc.get("store_health") or {}).get("online", True) else 1)])
    family("ossfuse_draining", "gauge", "1 once unmounted while pending uploads finish, else 0.",
           [({}, 0 if doc.get("state", "serving") == "serving" else 1)])
    family("ossfuse_uptime_seconds", "gauge", "Seconds since the mount started.", [({}, doc["uptime_seconds"])])
    family("ossfuse_pending_uploads", "gauge", "Closed files not yet in the store.", [({}, p["count"])])
    family("ossfuse_pending_upload_bytes", "gauge", "Bytes of the files not yet in the store.", [({}, p["bytes"])])
    family("ossfuse_pending_upload_oldest_seconds", "gauge", "Age of the oldest file not yet in the store.",
           [({}, p["oldest_seconds"])])
    family("ossfuse_pending_uploads_failing", "gauge", "Pending uploads whose last attempt failed.",
           [({}, len(p["failing"]))])
    family("ossfuse_uploading_bytes_done", "gauge", "Bytes of the uploads running now that are in the store.",
           [({}, p.get("bytes_uploaded", 0))])
    family("ossfuse_uploads_total", "counter", "Files uploaded since the mount started.", [({}, ctr["uploaded"])])
    family("ossfuse_upload_failures_total", "counter", "Failed upload attempts.", [({}, ctr["upload_failures"])])
    family("ossfuse_store_sent_bytes_total", "counter", "Object bytes uploaded to the store.",
           [({}, ops["bytes_sent"])])
    family("ossfuse_store_received_bytes_total", "counter", "Object bytes downloaded from the store.",
           [({}, ops["bytes_received"])])
    family("ossfuse_store_operations_total", "counter", "Store operations by kind (head, get_range, put_file...).",
           [({"op": op}, n) for op, n in sorted(ops["calls"].items())])
    family("ossfuse_store_errors_total", "counter", "Store operations that failed, by kind of error.",
           [({"op": e["op"], "kind": e["kind"]}, e["count"]) for e in ops["errors"]])
    family("ossfuse_store_retries_total", "counter", "Extra request attempts the store client made.",
           [({"op": op}, n) for op, n in sorted(ops["retries"].items())])
    family("ossfuse_cache_bytes", "gauge", "Bytes of cached blocks.", [({}, c["bytes"])])
    family("ossfuse_cache_max_bytes", "gauge", "Configured cache size limit.", [({}, c.get("max_bytes", 0))])
    family("ossfuse_cache_staging_bytes", "gauge", "Bytes of staged (written, not yet uploaded) files.",
           [({}, c["staging_bytes"])])
    family("ossfuse_cache_hits_total", "counter", "Block reads served from the cache.", [({}, c.get("hits", 0))])
    family("ossfuse_cache_misses_total", "counter", "Block reads fetched from the store.",
           [({}, c.get("misses", 0))])
    if c.get("hit_ratio") is not None:
        family("ossfuse_cache_hit_ratio", "gauge", "Cache hits / (hits + misses) since the mount started.",
               [({}, float(c["hit_ratio"]))])
    ig = doc.get("integrity") or {"verified_bytes": 0, "unverified_bytes": 0, "failures": 0}
    family("ossfuse_read_bytes_total", "counter", "Bytes read, by whether integrity tags checked them.",
           [({"verified": "true"}, ig["verified_bytes"]), ({"verified": "false"}, ig["unverified_bytes"])])
    family("ossfuse_integrity_failures_total", "counter", "Blocks that failed their integrity tag twice.",
           [({}, ig["failures"])])
    family("ossfuse_quarantined_journal_entries", "gauge",
           "Damaged journal entries kept in staging/quarantine (never uploaded).",
           [({}, (doc.get("quarantine") or {"entries": 0})["entries"])])
    family("ossfuse_recent_errors", "gauge", "Errors logged recently (the last 20 are kept).",
           [({}, len(doc["recent_errors"]))])
    family("ossfuse_recent_warnings", "gauge", "Warnings logged recently (the last 20 are kept).",
           [({}, len(doc.get("recent_warnings") or []))])
    return "\n".join(out) + "\n"
