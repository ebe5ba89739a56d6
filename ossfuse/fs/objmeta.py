"""The ``x-oss-meta-*`` attribute codec: mode, uid, gid and mtime of a file or directory as
user metadata (the names and formats ossfs/s3fs use), the device number of a device node, with
the mount's defaults for objects that carry none. Pure functions, no I/O.

Formats (ossfs-1.91.10: ``src/s3fs.cpp`` create_file_object/s3fs_mknod writes, ``src/metaheader.cpp``
get_mode reads): ``x-oss-meta-mode`` is st_mode in decimal, file type bits included, so a FIFO,
socket or device node is an object whose mode has S_IFIFO/S_IFSOCK/S_IFCHR/S_IFBLK (get_mode
returns such a mode unchanged). ossfs stores no device number (its st_rdev is always 0);
ossfuse adds ``x-oss-meta-rdev``, the st_rdev of a device node in decimal (glibc's
``makedev(major, minor)``, which ossfs ignores)."""
from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import envelope as env
from ..store.base import ObjectInfo
from .model import SPECIAL_TYPES, UNPARSED, Node, Version

log = logging.getLogger(__name__)

_ID_MAX = 2**32 - 2  # uid_t/gid_t: 32 bits unsigned, (uid_t)-1 means "unchanged" to chown(2)
_MODE_MAX = 0o177777  # st_mode: file type and permission bits
_RDEV_MAX = 2**32 - 1  # the FUSE protocol's rdev is 32 bits (fuse_attr.rdev, fuse_mknod_in.rdev)
# a time's seconds are a signed 64-bit tv_sec (pyfuse3 splits st_mtime_ns into tv_sec and
# tv_nsec; the kernel's fuse_attr.mtime is 64 bits): not 2^63 ns, which ends in 2262 while a
# `touch -d 2300-01-01` through the mount is accepted and was lost at the next mount
_MTIME_NS_MAX = (2**63 - 1) * 1_000_000_000 + 999_999_999
_WARNED_MAX = 10_000
_warned: set[tuple[str, str]] = set()  # (key, attribute) already reported out of range


def _in_range(key: str, attr: str, value: int | None, lo: int, hi: int) -> int | None:
    """``value`` if within [lo, hi], else None with one WARNING per (object, attribute)."""
    if value is None or lo <= value <= hi:
        return value
    _warn_once(key, attr, "%r has x-oss-meta-%s %s, out of range; shown with the default instead", key, attr,
               value if abs(value) < 10**30 else f"of {len(str(abs(value)))} digits")
    return None


def _number(key: str, attr: str, raw: str | None, parse: Callable[[str], int | None]) -> int | None:
    """``parse(raw)``; None when absent, and when not a number with one WARNING per (object,
    attribute) (a foreign writer's ``mode: rw-r--r--`` was shown as 0644 without a word)."""
    if raw is None or not raw.strip():
        return None
    value = parse(raw)
    if value is None:
        form = "seconds[.fraction] in decimal digits" if parse is parse_mtime else "an integer in decimal digits"
        _warn_once(key, attr, "%r has x-oss-meta-%s %r, not a number as file-system clients write it (%s); "
                   "shown with the default instead", key, attr, raw[:40], form)
    return value


def _warn_once(key: str, attr: str, fmt: str, *args) -> None:
    if (key, attr) not in _warned:
        if len(_warned) > _WARNED_MAX:
            _warned.clear()
        _warned.add((key, attr))
        log.warning(fmt, *args)


def fmt_mtime(ns: int) -> str:
    """Nanoseconds → x-oss-meta-mtime ``sec[.nnnnnnnnn]``."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return f"{sec}.{nsec:09d}" if nsec else str(sec)


def parse_mtime(value: str | None) -> int | None:
    """x-oss-meta-mtime ``sec[.frac]`` (ossfs/s3fs) → nanoseconds; None if absent or bad."""
    if not value:
        return None
    sec, _, frac = value.strip().partition(".")
    try:
        return int(sec) * 1_000_000_000 + (int((frac + "000000000")[:9]) if frac else 0)
    except ValueError:
        return None


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def int_or(value: str | None, default: int) -> int:
    """``value`` as an int, ``default`` when absent or not a number."""
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


ATTR_FIELDS = frozenset(("mode", "uid", "gid", "mtime", "ctime", "atime"))  # what attr_meta writes


def is_plain_marker(info: ObjectInfo | None) -> bool:
    """Whether directory marker ``info`` (a HEAD's) is empty and carries no field but the
    attributes (:func:`attr_meta`): one this mount may rewrite with a PUT, losing nothing."""
    return info is not None and info.size == 0 and ATTR_FIELDS.issuperset(info.metadata)


def attr_meta(node: Node) -> dict[str, str]:
    """The x-oss-meta attributes of ``node``: mode, uid, gid, mtime, ctime, and atime when set
    apart from mtime (the names and ``sec[.nnnnnnnnn]`` format of ossfs 1.91's metaheader.cpp)."""
    meta = {"mode": str(node.mode), "uid": str(node.uid), "gid": str(node.gid),
            "mtime": fmt_mtime(node.mtime_ns), "ctime": fmt_mtime(node.ctime_ns)}
    if node.atime_ns is not None:
        meta["atime"] = fmt_mtime(node.atime_ns)
    return meta


def times_from_info(info: ObjectInfo | None, mtime_ns: int) -> tuple[int, int | None]:
    """(ctime_ns, atime_ns or None) from x-oss-meta-ctime/atime, ctime defaulting to
    ``mtime_ns`` (what a node shows when the object carries none; out of range: same)."""
    meta = info.metadata if info else {}
    key = info.key if info else ""
    ctime = _in_range(key, "ctime", parse_mtime(meta.get("ctime")), -_MTIME_NS_MAX, _MTIME_NS_MAX)
    atime = _in_range(key, "atime", parse_mtime(meta.get("atime")), -_MTIME_NS_MAX, _MTIME_NS_MAX)
    # the same int object as mtime when equal (most objects): 32 bytes less per cached inode
    return (mtime_ns if ctime is None or ctime == mtime_ns else ctime), atime


def special_metadata(node: Node, rdev: int) -> dict[str, str]:
    """User metadata of a FIFO, socket or device node ``node``: its attributes, and for a
    character or block device ``rdev`` (st_rdev) as ``x-oss-meta-rdev``."""
    meta = attr_meta(node)
    if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
        meta["rdev"] = str(rdev)
    return meta


def rdev_of(node: Node) -> int:
    """st_rdev of ``node``: a device node's ``x-oss-meta-rdev`` (0 when absent, as ossfs
    writes them; out of range [0, 2^32): 0, one WARNING naming the object), else 0."""
    if not (stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode)) or node.version is None:
        return 0
    v = node.version
    return _in_range(v.key, "rdev", _number(v.key, "rdev", v.metadata.get("rdev"), _int), 0, _RDEV_MAX) or 0


def file_metadata(node: Node, wrapped: env.WrappedEnvelope, size: int) -> dict[str, str]:
    """All user metadata of a new version of ``node``: the envelope headers, its plaintext
    length in bytes, and the attributes."""
    meta = wrapped.headers()
    meta[env.H_PLAIN_LEN] = str(size)
    meta.update(attr_meta(node))
    return meta


def proof_mtime(info: ObjectInfo) -> float:
    """The Last-Modified (epoch s) a listing must show, with ``info``'s ETag and size, to prove
    that the attributes ``info`` gave are still current (Resolver.listing_proves); 0.0 when no
    listing can: ``info`` was answered within that Last-Modified second (``info.answered``;
    or when is not known), so another client's metadata-only copy (a chmod: same ETag, same
    size) may follow in that same second, and its Last-Modified would look the same."""
    return info.mtime if info.mtime > 0 and info.answered >= int(info.mtime) + 1 else 0.0


def version_from_info(info: ObjectInfo) -> Version:
    """The committed version described by a HEAD or listing of an object; its envelope is
    parsed on first use (a corrupt one is kept as the error, reported when the file is opened)."""
    return Version(info.key, info.etag, info.size, info.metadata, UNPARSED, modified=proof_mtime(info))


def is_hidden(info: ObjectInfo, plaintext_objects: str) -> bool:
    """Whether an object is not shown: a plaintext object made by something else than a
    file-system client (no x-oss-meta-mode), also one with no metadata at all, when
    ``encryption.plaintext_objects = "hide"``; never a listing entry whose metadata the
    listing did not give (``metadata_unknown``: what it holds is not known yet)."""
    return (plaintext_objects == "hide" and not info.metadata_unknown
            and not env.is_encrypted(info.metadata) and "mode" not in info.metadata)


@dataclass(frozen=True)
class AttrDefaults:
    """What an object without attributes shows: ``uid``/``gid``, modes 0777/0666 masked by
    ``umask``; ``create_umask`` (a configured umask) masks every mode, new files' too."""

    uid: int
    gid: int
    umask: int
    create_umask: int

    def default_attrs(self, is_dir: bool) -> tuple[int, int, int]:
        """(st_mode, uid, gid) of an object or directory that carries no attributes (what
        :meth:`attrs_from_info` gives for empty metadata, without parsing any)."""
        mode = stat.S_IFDIR | (0o777 & ~self.umask) if is_dir else stat.S_IFREG | (0o666 & ~self.umask)
        return mode & ~self.create_umask, self.uid, self.gid

    def attrs_from_info(self, info: ObjectInfo | None, is_dir: bool) -> tuple[int, int, int, int]:
        """(st_mode, uid, gid, mtime_ns) of an object or dir marker (None: implicit dir) from
        its x-oss-meta-mode/uid/gid/mtime, with these defaults where they are absent or out of
        range (uid -5, a mode of 2^64) or not numbers (``rw-r--r--``): one WARNING per object and
        field naming it, and it stays listable."""
        meta = info.metadata if info else {}
        key = info.key if info else ""
        mtime = _in_range(key, "mtime", _number(key, "mtime", meta.get("mtime"), parse_mtime),
                          -_MTIME_NS_MAX, _MTIME_NS_MAX)
        if mtime is None:
            mtime = int((info.mtime if info else time.time()) * 1e9)
        mode = _in_range(key, "mode", _number(key, "mode", meta.get("mode"), _int), 0, _MODE_MAX) or 0
        if is_dir:
            if info is not None and info.size:
                _warn_once(key, "size", "%r is a directory marker holding %d bytes; shown as a directory, its "
                           "data is not shown", key, info.size)
            if stat.S_IFMT(mode) not in (0, stat.S_IFDIR):  # (a trial: no word, as files had)
                _warn_once(key, "mode", "%r is a directory marker (its key ends in /) but its x-oss-meta-mode %s "
                           "is not a directory's; shown as a directory", key, meta.get("mode"))
            mode = stat.S_IFDIR | (stat.S_IMODE(mode) if mode else 0o777 & ~self.umask)
        elif stat.S_ISLNK(mode):
            mode = stat.S_IFLNK | 0o777
        elif stat.S_IFMT(mode) in SPECIAL_TYPES:
            mode = stat.S_IFMT(mode) | stat.S_IMODE(mode)  # a FIFO, socket or device node
            if info is not None and info.size:
                _warn_once(key, "mode", "%r holds %d bytes but its x-oss-meta-mode %s makes it a special file "
                           "(a FIFO, socket or device node); shown as that, its data is not shown", key, info.size,
                           meta.get("mode"))
        else:
            if stat.S_ISDIR(mode):  # (a trial: shown as a file without a word, where the others warn)
                _warn_once(key, "mode", "%r has x-oss-meta-mode %s, a directory's, but its key is a file's (no "
                           "trailing /); shown as a regular file", key, meta.get("mode"))
            mode = stat.S_IFREG | (stat.S_IMODE(mode) if mode else 0o666 & ~self.umask)
        if not stat.S_ISLNK(mode):
            mode &= ~self.create_umask  # a configured umask masks every mode
        uid = _in_range(key, "uid", _number(key, "uid", meta.get("uid"), _int), 0, _ID_MAX)
        gid = _in_range(key, "gid", _number(key, "gid", meta.get("gid"), _int), 0, _ID_MAX)
        return mode, self.uid if uid is None else uid, self.gid if gid is None else gid, mtime
