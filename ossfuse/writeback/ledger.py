"""The multipart uploads this cache dir's daemon began and has not seen finished or aborted.

An upload that a crash interrupts stays in the store, and OSS bills its parts until someone
aborts it. The next mount of the cache dir aborts exactly the uploads recorded here
(``Commit.abort_orphaned_uploads``), never another client's upload of the same key, which may
still be running (the journal's keys could not tell the two apart: a trial of the nineteenth
session saw a restarting mount abort a second mount's upload).

One file per upload in ``<cache dir>/multipart/``: ``<sha256 of the upload id>.json`` holding
``{"key": ..., "upload_id": ...}``, written when InitiateMultipartUpload has answered and
removed once CompleteMultipartUpload or AbortMultipartUpload has. ``ossfuse rekey`` keeps its
own ledger, ``<cache dir>/rekey-multipart/``, whose records also name the process that began
each upload (``owner``), and aborts the uploads of earlier runs no longer running
(``rekey.abort_interrupted_uploads``): the mount must not abort a rekey's running upload, nor
a rekey the mount's. Not fsynced, as the journal
(docs/design.md "Durability"): a crash of the daemon keeps it, a power loss may not, and a
crash between the store's answer and the record leaves the upload to an OSS lifecycle rule.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

log = logging.getLogger(__name__)


class MultipartLedger:
    """The ledger of one cache dir (``name``: its directory there). ``left``: upload id → key,
    what earlier runs recorded and did not end (read once, at construction); ``owners``:
    upload id → the ``owner`` fields its record holds ({} if none); ``existed``: whether the
    ledger was there before (a cache dir of a release without it has none, and its orphans
    are told by the journal). ``owner``: fields added to every record this process writes
    (JSON values)."""

    def __init__(self, cache_dir: str, name: str = "multipart", owner: dict | None = None):
        self.dir = os.path.join(cache_dir, name)
        self.owner = dict(owner or {})
        self.existed = os.path.isdir(self.dir)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.left: dict[str, str] = {}
        self.owners: dict[str, dict] = {}
        self._failing = False  # one WARNING while the cache disk refuses records
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                with open(path) as f:
                    rec = json.load(f)
                key, upload_id = rec["key"], rec["upload_id"]
                if not (isinstance(key, str) and isinstance(upload_id, str)):
                    raise ValueError("key or upload id is not a string")
            except (OSError, ValueError, KeyError, TypeError) as e:  # torn by a crash: nothing to abort by
                log.info("multipart ledger: dropping unreadable record %s (%s)", path, e)
                self._unlink(path)
                continue
            self.left[upload_id] = key
            self.owners[upload_id] = {k: v for k, v in rec.items() if k not in ("key", "upload_id")}

    def _path(self, upload_id: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(upload_id.encode()).hexdigest() + ".json")

    def started(self, key: str, upload_id: str) -> None:
        """Record that upload ``upload_id`` of ``key`` was begun. A cache disk that refuses
        the record costs only the abort after a crash: one WARNING, the upload goes on."""
        try:
            fd = os.open(self._path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "key": key, "upload_id": upload_id}, f)
            self._failing = False
        except OSError as e:
            if not self._failing:
                log.warning("multipart ledger %s cannot record upload %s of %r (%s): if this daemon "
                            "crashes before it ends, its parts stay in the bucket until aborted", self.dir,
                            upload_id, key, e)
            self._failing = True

    def ended(self, upload_id: str) -> None:
        """Upload ``upload_id`` was completed or aborted: forget it."""
        self.left.pop(upload_id, None)
        self.owners.pop(upload_id, None)
        self._unlink(self._path(upload_id))

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.info("multipart ledger: cannot remove %s: %s", path, e)
