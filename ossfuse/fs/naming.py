"""Paths of the mount and the object keys they map to.

Paths are relative to the mount ("" is the root, "a/b" a file); the object key of a path is
``prefix + path``, and a directory may have a marker object ``prefix + path + "/"``.
(The stores check keys again with their own rules: ``store/local.py`` and ``store/oss.py``.)
"""
from __future__ import annotations

import errno
import logging
import os

from ..integrity import LIST_DIR
from .errors import FsError

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1023  # OSS object key limit, UTF-8 bytes
MAX_NAME_BYTES = 255  # one path component (the kernel does not check FUSE names itself)


def join(parent: str, name: str) -> str:
    """The path of ``name`` inside directory ``parent``."""
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    """The directory path holding ``path`` ("" for a name in the root)."""
    return path.rpartition("/")[0]


def base_name(path: str) -> str:
    """The last component of ``path``."""
    return path.rpartition("/")[2]


def valid_listed_name(name: str) -> bool:
    """Whether a name found in a listing can be shown as a directory entry."""
    return bool(name) and name not in (".", "..") and "\0" not in name and len(name.encode()) <= MAX_NAME_BYTES


class Naming:
    """Path ↔ key mapping of one mount (its bucket ``prefix``)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def key(self, path: str) -> str:
        """The object key of file ``path``."""
        return self.prefix + path

    def dir_key(self, path: str) -> str:
        """The key prefix of directory ``path`` (also its marker object's key)."""
        return self.prefix + path + "/" if path else self.prefix

    def path_of(self, key: str) -> str | None:
        """The path of object ``key``, None if it is outside this mount's prefix."""
        return key[len(self.prefix):] if key.startswith(self.prefix) else None

    def file_path_of(self, key: str) -> str | None:
        """The path of file object ``key`` when it can be one of this mount's files: inside the
        prefix, every component a name a listing would show (no empty, ``.`` or ``..``
        component, no NUL, at most 255 bytes), and not a tag list. None otherwise: a journal
        record whose key was tampered with (``../escape``) is refused, not uploaded."""
        path = self.path_of(key)
        if not path or not all(valid_listed_name(c) for c in path.split("/")):
            return None
        if LIST_DIR in path.split("/"):
            return None
        return path

    def check_new_path(self, path: str, is_dir: bool = False, *, creating: bool = True) -> None:
        """A new name must make a valid OSS key: UTF-8 (EINVAL), not starting with '\\' (EINVAL),
        of at most 1023 bytes, counting the prefix and a directory's trailing '/', with names of
        at most 255 bytes (ENAMETOOLONG); ``creating``: and not the name of the integrity tag
        lists, which no listing shows (EPERM: a mkdir of it succeeded, then the name did not
        exist and its marker stayed in the bucket). Not ``creating`` (a lookup), a name no key
        can have is ENOENT, not EINVAL: nothing is there, and the create that follows says why
        (one INFO line naming the path; a new-user trial: `open(b'bad\\xff', 'w')` was EINVAL
        with no line). Raises FsError."""
        if creating and base_name(path) == LIST_DIR:
            raise FsError(errno.EPERM, f"{LIST_DIR} is reserved for integrity tag lists")
        key = self.dir_key(path) if is_dir else self.key(path)
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            if creating:
                log.info("%r: EINVAL: the name is not UTF-8, and OSS object keys are", os.fsencode(path))
            raise FsError(errno.EINVAL if creating else errno.ENOENT, "names must be valid UTF-8 to be OSS keys") \
                from None
        if key.startswith("\\"):  # OSS refuses it (a name at the root of a mount without a prefix):
            # no object can have it, and a HEAD of it was an EIO with an ERROR line (a trial)
            if creating:
                log.info("%r: EINVAL: OSS object keys cannot start with '\\'", path)
            raise FsError(errno.EINVAL if creating else errno.ENOENT, "OSS keys cannot start with '\\'")
        if size > MAX_KEY_BYTES or len(base_name(path).encode("utf-8")) > MAX_NAME_BYTES:
            if creating:
                log.info("%r: ENAMETOOLONG: a name takes at most %d bytes, and an object key (the prefix and "
                         "the path) %d; this one's key would be %d", path, MAX_NAME_BYTES, MAX_KEY_BYTES, size)
            raise FsError(errno.ENAMETOOLONG)
