"""The filesystem's side of write-back: journaling a node's staged version, uploading it and
taking the uploaded version as the node's committed one, and turning the journal of an earlier
run into dirty nodes at mount time. When uploads happen is ``writeback.scheduler``'s part."""
from __future__ import annotations

import errno
import logging
import time

from .. import envelope as env
from ..cache import BlockCache
from ..cmk import CmkUnavailable, KeyMissing
from ..keyring import Keyring
from ..store.base import ObjectInfo, StoreError
from ..writeback import journal
from ..writeback.scheduler import UploadScheduler
from ..writeback.staging import Staging
from ..writeback.upload import Uploader
from .errors import FsError
from .inodes import InodeTable
from .model import Node, OpaqueEnvelope, Version, set_local_version
from .naming import Naming, parent_of
from .objmeta import file_metadata
from .resolve import Resolver

log = logging.getLogger(__name__)


class Commit:
    """Journal and upload of staged versions (see the module doc)."""

    def __init__(self, naming: Naming, inodes: InodeTable, resolver: Resolver, scheduler: UploadScheduler,
                 uploader: Uploader, cache: BlockCache, keyring: Keyring, staging: Staging):
        self.naming = naming
        self.inodes = inodes
        self.resolver = resolver
        self.scheduler = scheduler
        self.uploader = uploader
        self.cache = cache
        self.keyring = keyring
        self.staging = staging

    def staged_in(self, dir_path: str) -> list[Node]:
        """This mount's not-yet-uploaded nodes still linked directly in directory ``dir_path``
        (a listing of the store does not show them)."""
        return self.scheduler.staged_in(dir_path, parent_of)

    def journal_node(self, node: Node) -> dict[str, str] | None:
        """Record ``node``'s staged version durably; returns the object metadata recorded
        (None when there is nothing staged or the node is unlinked). Raises FsError(ENOSPC/EIO)."""
        st = node.staged
        if st is None or node.unlinked:
            return None
        meta = file_metadata(node, st.envelope.wrapped, st.size)
        try:
            journal.record(st, self.naming.key(node.path), meta)
            return meta
        except OSError as e:
            log.error("journaling %r failed, the data is not safe yet: %s", self.naming.key(node.path), e)
            raise FsError(e.errno or errno.EIO) from None

    def rejournal(self, node: Node) -> None:
        """``node``'s name or attributes changed: if its staged version was journaled, record
        it again so a crashed daemon's next mount uploads it with them."""
        if node.staged is not None and node.staged.was_journaled:
            self.journal_node(node)

    def drop_staged(self, node: Node) -> None:
        """Forget ``node``'s staged version (unlinked): its data and journal record go."""
        if node.staged is not None:
            node.staged.discard()
            node.staged = None
        self.scheduler.mark_clean(node)

    def mark_staged(self, node: Node) -> None:
        """``node`` has just been given a staged version."""
        self.scheduler.mark_dirty(node)

    async def upload_node(self, node: Node, *, raise_errors: bool = False, journal_first: bool = True) -> bool:
        """Upload ``node``'s staged version if it has one; True when nothing is pending after.
        ``journal_first``: record it durably first, so a crash during the upload loses nothing
        (False only from close(), which then journals if the upload failed). Raises
        FsError(EIO) on failure when ``raise_errors``, else logs it and returns False.
        Holds node.lock across the upload (TODO(rebuild): upload a snapshot, issue 12 A4)."""
        stats = self.scheduler.stats
        async with node.lock:
            st = node.staged
            if st is None or node.unlinked:
                return True
            key = self.naming.key(node.path)
            try:
                if journal_first:
                    meta = self.journal_node(node)
                else:
                    meta = file_metadata(node, st.envelope.wrapped, st.size)
                # close() does not wait out retries: it journals instead, the worker retries
                info = await self.uploader.upload(st, key, meta, attempts=None if journal_first else 1)
            except (StoreError, FsError) as e:
                node.upload_error = str(e)
                stats["upload_failures"] += 1
                log.error("upload of %r failed; the data stays staged and will be retried: %s", key, e)
                if raise_errors:
                    raise FsError(errno.EIO) from None
                return False
            old = node.version
            version = Version(key, info.etag, st.size, meta, st.envelope.wrapped, st.envelope)
            set_local_version(node, version)
            st.close()
            self.cache.adopt(key, info.etag, st.size, st.data_path)
            st.discard()
            node.staged = None
            node.upload_error = None
            self.scheduler.mark_clean(node)
            if old is not None and not any(hd.version is old for hd in node.handles):
                self.cache.drop(old.key, old.etag)
            stats["uploaded"] += 1
            log.debug("uploaded %r (%d bytes, ETag %s)", key, st.size, info.etag)
        self.inodes.maybe_drop(node)
        return True

    def recover(self) -> int:
        """Adopt the journal of an earlier run: each journaled version becomes a dirty node and
        is queued for upload. Returns how many were found."""
        entries = journal.read_journal(self.staging)
        for entry in entries:
            path = self.naming.path_of(entry.key)
            meta = entry.metadata
            if path is None:
                log.error("journal entry for %r is outside this mount's prefix %r; kept, not uploaded",
                          entry.key, self.naming.prefix)
                entry.staged.close()
                continue
            old = self.inodes.by_path.get(path)
            if old is not None and old.staged is not None:
                self.drop_staged(old)  # a newer journal entry for the same key wins
            try:
                wrapped = env.parse_envelope(meta)
            except env.EnvelopeError as e:
                log.error("journal entry for %r has a corrupt envelope (%s); kept, not uploaded", entry.key, e)
                entry.staged.close()
                continue
            try:
                entry.staged.envelope = self.keyring.open_envelope(wrapped)
            except (env.EnvelopeError, KeyMissing, CmkUnavailable) as e:
                log.error("journaled %r cannot be decrypted here (%s); it is uploaded as it is", entry.key, e)
                entry.staged.envelope = OpaqueEnvelope(wrapped)
            node = self.resolver.node_from_info(path, ObjectInfo(entry.key, entry.staged.size, "", time.time(), meta),
                                                False)
            node.version = None
            node.staged = entry.staged
            self.scheduler.mark_dirty(node)
            self.scheduler.schedule(node)
            log.info("recovered %r (%d bytes) from the journal; uploading", entry.key, entry.staged.size)
        self.scheduler.stats["recovered"] = len(entries)
        return len(entries)
