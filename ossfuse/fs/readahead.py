"""The read-ahead window of an open file: doubled on each sequential read from one cache block
up to READAHEAD_MAX bytes, reset by a seek (mountpoint-s3's ``prefetch/`` grows its window the
same way)."""
from __future__ import annotations

from .model import FileHandle

READAHEAD_MAX = 32 << 20  # bytes: largest sequential read-ahead window (the cache rounds it up to whole 8 MiB chunks)


def fetch_until(h: FileHandle, offset: int, length: int, block_size: int) -> int:
    """Note a read of ``length`` bytes at ``offset`` through ``h``; returns the byte offset up
    to which the cache should fetch ahead."""
    if h.last_end == offset:  # sequential: widen the read-ahead window
        h.window = min(READAHEAD_MAX, max(2 * h.window, block_size))
    else:
        h.window = 0
    h.last_end = offset + length
    return offset + length + h.window
