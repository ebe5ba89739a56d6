"""chmod, chown, utimens and truncate: a clean object's attributes are rewritten with a
CopyObject onto itself (envelope headers unchanged); a staged one's travel with its upload."""
from __future__ import annotations

import errno
import logging
import stat
import time

from ..cache import BlockCache
from ..store.base import ObjectInfo, ObjectStore
from ..writeback.upload import Uploader
from .commit import Commit
from .copying import Rewrapped, copy_object
from .errors import FsError, store_request
from .files import Files
from .model import ROOT_INO, FileHandle, Node, set_local_version
from .naming import Naming
from .objmeta import attr_meta, is_plain_marker, version_from_info

_UNCHANGED_ID = 0xFFFFFFFF  # chown's "leave as is" (uid_t -1)

log = logging.getLogger(__name__)


def _with_attrs(metadata: dict[str, str], node: Node) -> dict[str, str]:
    """``metadata`` (every x-oss-meta-* field an object carries, a foreign SDK's too: OSS's
    REPLACE directive drops whatever a copy does not send) with ``node``'s attributes."""
    return {**metadata, **attr_meta(node)}


class Attributes:
    """setattr of one mount."""

    def __init__(self, store: ObjectStore, uploader: Uploader, naming: Naming, files: Files, commit: Commit,
                 cache: BlockCache):
        self.store = store
        self.uploader = uploader
        self.naming = naming
        self.files = files
        self.commit = commit
        self.cache = cache
        self._root_said = False  # the WARNING that the mount point's mode is not kept: once

    async def setattr(self, node: Node, *, size: int | None = None, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, mtime_ns: int | None = None,
                      atime_ns: int | None = None, fh: FileHandle | None = None) -> Node:
        """chmod/chown/utimens/truncate (None: unchanged; sizes in bytes, times in ns). ctime
        becomes now for every change but chown(-1, -1) (POSIX: "need not be updated").
        Raises FsError(EISDIR) to truncate a directory, EIO/ENOSPC as writes and copies do,
        ESTALE when another client replaced the object since this mount read it (the attribute
        change is not made, and the node is re-read from the store at its next lookup), and for
        a truncate through handle ``fh`` whose version another client replaced since its open
        (Files.refuse_stale).
        Holds node.lock across the copy (TODO(rebuild): no lock across network I/O, A4).
        EACCES to truncate an object no configured CMK can read (Files.check_replaceable)."""
        if size is not None and not node.is_dir:
            if fh is not None:  # ftruncate through a stale handle: as its write (a two-mount model trial)
                self.files.refuse_stale(fh, "truncate of")
            await self.files.check_replaceable(node)
        v = node.version
        if size is None and node.staged is None and v is not None and not v.held:
            # the copy rewrites all metadata: a slim version's is fetched before the lock
            await self.files.hold_metadata(v, "change the attributes of")
        async with node.lock:
            if size is not None:
                if node.is_dir:
                    raise FsError(errno.EISDIR)
                await self.files.truncate_locked(node, size)
            before = (node.mode, node.uid, node.gid, node.mtime_ns, node.ctime_ns, node.atime_ns,
                      node.entries_changed_ns)
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            if uid is not None and uid != _UNCHANGED_ID:
                node.uid = uid
            if gid is not None and gid != _UNCHANGED_ID:
                node.gid = gid
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
                node.entries_changed_ns = 0  # set explicitly (and stored): no later entry change yet
            if atime_ns is not None:
                node.atime_ns = atime_ns
            changed = (mode, mtime_ns, atime_ns) != (None, None, None) or any(
                i is not None and i != _UNCHANGED_ID for i in (uid, gid))
            if changed:
                node.ctime_ns = time.time_ns()
            if node.ino == ROOT_INO and (node.mode, node.uid, node.gid) != before[:3] and not self._root_said:
                # (a new user's trial: `chmod 700` of the mount point, taken for a lock, is gone
                # at the next mount without a word)
                self._root_said = True
                log.warning("the mount point's mode and owner are kept in memory only (the bucket prefix has no "
                            "object to hold them): gone at the next mount; restrict access with -o umask=, uid=, "
                            "gid= or the config's mount options")
            if size is None and changed:
                try:
                    await self.store_attrs(node)
                except FsError as e:
                    # not made: the node keeps what the bucket has; a foreign version is re-read
                    (node.mode, node.uid, node.gid, node.mtime_ns, node.ctime_ns, node.atime_ns,
                     node.entries_changed_ns) = before
                    if e.errno == errno.ESTALE:
                        node.checked_at = 0.0
                    raise
        return node

    async def store_attrs(self, node: Node) -> None:
        """Write ``node``'s attributes to the bucket (node.lock held): a directory's marker is
        copied onto itself with them (:meth:`_store_dir_attrs`), a clean file's object copied
        onto itself with new metadata, a staged file's
        journal record updated (its upload carries them). The copy is conditional on the
        version this mount knows (FsError(ESTALE) if another client replaced it: A1)."""
        if node.unlinked or node.ino == ROOT_INO:
            return
        if node.staged is not None:
            self.commit.rejournal(node)  # a crashed daemon's next mount uploads them too
            return
        if node.is_dir:
            await self._store_dir_attrs(node)
            return
        v = node.version
        if v is None:
            return
        if not v.held:  # it changed or was slimmed since setattr fetched it: rare, under the lock as the copy
            await self.files.hold_metadata(v, "change the attributes of")
        # every x-oss-meta-* field the object carries (a foreign SDK's too) goes into the
        # copy, ours replaced: OSS's REPLACE directive drops whatever is not sent
        source_meta = v.metadata
        meta = _with_attrs(source_meta, node)
        rewrapped = False
        try:
            info = await copy_object(self.store, self.uploader, ObjectInfo(v.key, v.size, v.etag, 0, source_meta),
                                     v.key, meta)
            copied = v.rewritten(info.etag, meta)  # (v may be slim again by now: its metadata is not read)
        except Rewrapped as e:
            # the same ciphertext under a re-wrapped data key (a rekey, over OSS): the change goes
            # onto the envelope the object has now, once (else an fchmod or touch through a
            # descriptor, which the kernel does not retry, failed ESTALE: a trial); the next open
            # unwraps that envelope, open handles read on with their own
            meta = _with_attrs(e.now.metadata, node)
            info = await copy_object(self.store, self.uploader, e.now, v.key, meta)
            copied, rewrapped = version_from_info(ObjectInfo(v.key, v.size, info.etag, 0, meta)), True
        self.cache.rekey(v.key, v.etag, v.key, info.etag)  # a copy of exactly v's bytes (if_match)
        set_local_version(node, copied, follow=not rewrapped)
        self.files.resolver.recent.touch(copied)

    async def _store_dir_attrs(self, node: Node) -> None:
        """Directory ``node``'s attributes into its marker object. A marker known to be plain
        (``node.plain_marker``: empty, attribute fields only) is rewritten with one PUT, as is
        a missing one (an implicit directory); any other is HEADed and copied onto itself with
        them, keeping its data and every other field, as a file's object is (another client's
        marker may hold bytes and metadata of its own: a trial's chmod emptied one with a PUT).
        Raises FsError (ESTALE: the marker changed between the HEAD and the copy)."""
        key = self.naming.dir_key(node.path)
        marker = None if node.plain_marker else await store_request(self.store.head(key), key)
        if marker is None or is_plain_marker(marker):
            await store_request(self.store.put_bytes(key, b"", attr_meta(node)), node.path)
            node.plain_marker = True
            return
        await copy_object(self.store, self.uploader, marker, key, _with_attrs(marker.metadata, node))
