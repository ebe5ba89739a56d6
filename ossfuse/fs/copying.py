"""Copying an object for a rename or an attribute change, with the FsError a caller sees."""
from __future__ import annotations

import errno
import logging

from ..store.base import ObjectInfo, ObjectStore
from ..writeback.upload import Uploader
from .errors import FsError, store_request

log = logging.getLogger(__name__)


async def copy_object(store: ObjectStore, uploader: Uploader, src: ObjectInfo, dst: str,
                      metadata: dict[str, str] | None = None) -> ObjectInfo:
    """Copy ``src`` to ``dst`` (CopyObject, or streaming above the store's copy limit), with
    ``metadata`` replacing the source's if given. Raises FsError (EIO; ESTALE when the source
    vanished) with a log line on failure. TODO(rebuild): conditional on src.etag (issue 12 A1)."""
    limit = store.max_copy_size
    if metadata is None and limit is not None and src.size > limit and not src.metadata:
        head = await store_request(store.head(src.key), src.key)  # listings carry no metadata
        if head is None:
            log.error("copy of %r failed: it disappeared", src.key)
            raise FsError(errno.EIO)
        src = head
    return await store_request(uploader.copy(src, dst, metadata), src.key)
