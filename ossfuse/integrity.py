"""Per-block authentication tags of the objects ossfuse writes (issue 17; layout and reasons in
docs/integrity.md).

The SDK envelope (AES-256-CTR, oss-cse-format.md §3) has no MAC: a flipped ciphertext bit
flips the same plaintext bit. ossfuse adds, beside the envelope and without changing a byte of
the object, one user-metadata header ``x-oss-meta-ossfuse-integrity`` that the SDKs ignore
(they read only ``client-side-encryption-*``, §2):

- the object's ciphertext is cut into blocks of ``block`` bytes (a power of two, 64 KiB to
  4 MiB, grown with the object so its tags fit the metadata); the last block may be short;
- tag *i* = HMAC-SHA-256(K, "ossfuse-block-v1" ‖ u64 block ‖ u64 size ‖ u64 i ‖ ciphertext
  of block *i*) truncated to 16 bytes (u64: 8 bytes big-endian; ``size``: the object's
  ciphertext length in bytes, so a truncated or extended object fails, and the index, so
  blocks cannot be reordered);
- K = HKDF-SHA-256(IKM = the 32-byte data key, salt = the 16-byte IV, info =
  "ossfuse integrity v1", 32 bytes): only holders of the CMK can forge a tag, and the tags
  stay valid wherever the same data key and IV travel (a rename's CopyObject, ``ossfuse
  rekey``'s rewrap) while no tag of one object version verifies another's. The object's key
  (name) is deliberately not bound: a rename copies the object unchanged.

Header value forms (ASCII, space separated):
- ``1 <block> m <base64 tags>``: the tags, concatenated, in the metadata (*meta* layout; an
  empty object: ``1 65536 m``);
- ``1 <block> l <base64 root> <list key>``: the tags are the body of the plaintext object
  ``<list key>`` (percent-encoded UTF-8; under ``<writer's prefix>.ossfuse-integrity/``,
  a directory name the mount hides), and root = HMAC-SHA-256(K, "ossfuse-list-v1" ‖ u64 block
  ‖ u64 size ‖ tags)[:16] authenticates that list (*list* layout, objects whose tags do not
  fit the metadata).

OSS allows 8 KB of user metadata, names plus values (oss-rest-api.md §3.17); the budget for
the tags is what the other headers leave, counted with their ``x-oss-meta-`` prefix, minus a
reserve for attribute changes and the multipart headers added at upload.

Pure functions and data, no I/O except :func:`tags_of_file` (reads a local file); the list
object is fetched by the block cache and uploaded by the uploader.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER = "ossfuse-integrity"  # user-metadata name (without "x-oss-meta-")
LIST_DIR = ".ossfuse-integrity"  # directory (under the writer's prefix) of tag-list objects
TAG = 16  # bytes per tag
MIN_BLOCK = 64 << 10  # bytes: smallest block
MAX_META_BLOCK = 4 << 20  # bytes: largest block of the meta layout (a ranged read fetches a block)
MAX_LIST_TAGS = 1 << 18  # tags per list object (4 MiB); beyond, blocks grow past MAX_META_BLOCK
META_LIMIT = 8192  # bytes of user metadata, names plus values (oss-rest-api.md §3.17)
# bytes kept free for what may be added after the tags: attribute changes (mode, uid, gid,
# mtime at their widest) and the multipart data-size/part-size headers (writeback/upload.py)
RESERVE = 256
_META_PREFIX = len("x-oss-meta-")
_INFO = b"ossfuse integrity v1"
_LIST_NAME = re.compile("[0-9a-f]{%d}" % (2 * TAG))  # a tag list's name: its root tag in hex


class IntegrityError(Exception):
    """A block of an object does not match its tag (the store returned bytes that are not the
    object's), or the object's tag header or tag list is damaged. The message names the object,
    the block and the version (ETag); ``span``: the failing tagged block's bytes [lo, hi), when
    one block failed (None: the header or the list)."""

    def __init__(self, message: str, span: tuple[int, int] | None = None):
        super().__init__(message)
        self.span = span


def tag_key(data_key: bytes, iv: bytes) -> bytes:
    """The 32-byte HMAC key of one object version: HKDF-SHA-256 of its data key, salted with its
    IV (see the module doc)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=iv, info=_INFO).derive(data_key)


def _u64(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in values)


def block_tag(k: bytes, block: int, size: int, index: int, ciphertext: bytes | memoryview) -> bytes:
    """Tag (16 bytes) of block ``index`` of an object of ``size`` ciphertext bytes cut into
    blocks of ``block`` bytes."""
    mac = hmac.new(k, b"ossfuse-block-v1" + _u64(block, size, index), hashlib.sha256)
    mac.update(ciphertext)
    return mac.digest()[:TAG]


def list_root(k: bytes, block: int, size: int, tags: bytes) -> bytes:
    """Root tag (16 bytes) that authenticates a whole tag list (the list layout)."""
    return hmac.new(k, b"ossfuse-list-v1" + _u64(block, size) + tags, hashlib.sha256).digest()[:TAG]


def nblocks(size: int, block: int) -> int:
    return -(-size // block)


def _b64len(n_tags: int) -> int:
    return 4 * -(-(n_tags * TAG) // 3)


def meta_size(metadata: dict[str, str]) -> int:
    """Bytes ``metadata`` counts against the 8 KB limit: each name with its ``x-oss-meta-``
    prefix plus its value (the prefix counted too, to be safe: §3.17 does not say)."""
    return sum(_META_PREFIX + len(k) + len(v.encode("utf-8", "replace")) for k, v in metadata.items())


def choose_block(size: int, other_meta: int) -> tuple[int, bool]:
    """(block size in bytes, True for the meta layout / False for the list layout) of an object
    of ``size`` bytes whose other user metadata counts ``other_meta`` bytes: the smallest
    power of two from MIN_BLOCK whose tags fit what the 8 KB leave (minus RESERVE), up to
    MAX_META_BLOCK; else the list layout with MAX_META_BLOCK blocks, grown so the list holds
    at most MAX_LIST_TAGS tags."""
    room = META_LIMIT - RESERVE - other_meta - (_META_PREFIX + len(HEADER) + len(f"1 {1 << 40} m "))
    block = MIN_BLOCK
    while block < MAX_META_BLOCK and _b64len(nblocks(size, block)) > room:
        block *= 2
    if _b64len(nblocks(size, block)) <= room:
        return block, True
    while nblocks(size, block) > MAX_LIST_TAGS:
        block *= 2
    return block, False


def compute_tags(k: bytes, block: int, size: int, read: Callable[[int, int], bytes]) -> bytes:
    """Concatenated tags of the ``size`` bytes got by ``read(offset, length)``."""
    out = bytearray()
    for i in range(nblocks(size, block)):
        off = i * block
        n = min(block, size - off)
        data = read(off, n)
        if len(data) != n:
            raise OSError(f"short read of {len(data)} bytes at offset {off}, expected {n}")
        out += block_tag(k, block, size, i, data)
    return bytes(out)


def tags_of_file(path: str, k: bytes, block: int, size: int) -> bytes:
    """Tags of the first ``size`` bytes of local file ``path`` (blocking: a worker thread).
    Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return compute_tags(k, block, size, lambda off, n: os.pread(fd, n, off))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SealedTags:
    """The tags of one sealed version: ``headers`` (the metadata to add) and, in the list
    layout, the list object's key and body (uploaded before the object)."""

    headers: dict[str, str]
    list_key: str | None = None
    list_body: bytes | None = None


def seal(path: str, data_key: bytes, iv: bytes, size: int, other_meta: dict[str, str],
         list_prefix: str) -> SealedTags:
    """Tag the sealed ciphertext in local file ``path`` (``size`` bytes) of an object under
    (``data_key``, ``iv``) whose other metadata is ``other_meta``; a list object goes under
    ``list_prefix`` (the writer's mount prefix). Blocking; raises OSError."""
    block, in_meta = choose_block(size, meta_size(other_meta))
    k = tag_key(data_key, iv)
    tags = tags_of_file(path, k, block, size)
    if in_meta:
        return SealedTags(_meta_header(block, tags))
    return _list_layout(k, block, size, tags, list_prefix)


def _list_layout(k: bytes, block: int, size: int, tags: bytes, list_prefix: str) -> SealedTags:
    """The header and list object of the list layout for ``tags`` (blocks of ``block`` bytes of
    an object of ``size`` bytes, tag key ``k``), the list under ``list_prefix``."""
    root = list_root(k, block, size, tags)
    list_key = f"{list_prefix}{LIST_DIR}/{root.hex()}"
    value = f"1 {block} l {base64.b64encode(root).decode()} {urllib.parse.quote(list_key, safe='/')}"
    return SealedTags({HEADER: value}, list_key, tags)


def as_list_layout(spec: TagSpec, data_key: bytes, iv: bytes, size: int, list_prefix: str) -> SealedTags:
    """The tags of meta-layout ``spec`` (an object of ``size`` bytes under ``data_key``/``iv``)
    moved into a list object under ``list_prefix``: what ``ossfuse rekey`` uploads when the new
    envelope leaves the header no room for them (a trial: RSA-2048 → RSA-4096 adds ~680 bytes,
    and the PUT failed MetadataTooLarge at every run). The same tags, so no block is re-read."""
    assert spec.tags is not None
    return _list_layout(tag_key(data_key, iv), spec.block, size, spec.tags, list_prefix)


def _meta_header(block: int, tags: bytes) -> dict[str, str]:
    """The header of the meta layout. An empty object has no tags: no empty last field (a
    trailing space in a header value is stripped in transit and breaks the request signature,
    OSS 403 SignatureDoesNotMatch)."""
    return {HEADER: f"1 {block} m {base64.b64encode(tags).decode()}".rstrip(" ")}


def tag_small(ciphertext: bytes, data_key: bytes, iv: bytes, other_meta: dict[str, str]) -> dict[str, str]:
    """The tag header (meta layout) of a small object held in memory, e.g. a symlink's stored
    target (at most PATH_MAX = 4096 bytes: one block), under (``data_key``, ``iv``) with
    ``other_meta`` beside it. Raises ValueError for an object too large for the meta layout."""
    block, in_meta = choose_block(len(ciphertext), meta_size(other_meta))
    if not in_meta:
        raise ValueError(f"{len(ciphertext)} bytes do not fit the meta layout: use seal()")
    k = tag_key(data_key, iv)
    return _meta_header(block, compute_tags(k, block, len(ciphertext), lambda off, n: ciphertext[off:off + n]))


@dataclass(frozen=True)
class TagSpec:
    """A parsed ``ossfuse-integrity`` header: ``tags`` (meta layout) or ``root`` and
    ``list_key`` (list layout)."""

    block: int
    tags: bytes | None = None
    root: bytes | None = None
    list_key: str | None = None


def parse(metadata: dict[str, str]) -> TagSpec | None:
    """The tag header of ``metadata`` (None: the object has none, e.g. written by an SDK).
    Raises IntegrityError when it is present but malformed."""
    value = metadata.get(HEADER)
    if value is None:
        return None
    parts = value.split(" ")
    try:
        if parts[0] != "1":
            raise ValueError(f"unknown version {parts[0]!r}")
        block = int(parts[1])
        if block < 4096 or block & (block - 1):
            raise ValueError(f"block size {block} is not a power of two ≥ 4096")
        if parts[2] == "m" and len(parts) in (3, 4):
            tags = base64.b64decode(parts[3], validate=True) if len(parts) == 4 else b""
            if len(tags) % TAG:
                raise ValueError("tag list is not a whole number of tags")
            return TagSpec(block, tags=tags)
        if parts[2] == "l" and len(parts) == 5:
            root = base64.b64decode(parts[3], validate=True)
            if len(root) != TAG:
                raise ValueError("root tag is not 16 bytes")
            return TagSpec(block, root=root, list_key=urllib.parse.unquote(parts[4]))
        raise ValueError("unknown layout")
    except (IndexError, ValueError, binascii.Error) as e:
        raise IntegrityError(f"x-oss-meta-{HEADER} is malformed: {e}") from None


class BlockTags:
    """The verified tag list of one object version: checks blocks of its ciphertext."""

    def __init__(self, k: bytes, block: int, size: int, tags: bytes):
        self.k, self.block, self.size, self.tags = k, block, size, tags

    @classmethod
    def from_spec(cls, spec: TagSpec, data_key: bytes, iv: bytes, size: int,
                  list_body: bytes | None = None, list_key: str | None = None) -> "BlockTags":
        """The tags of an object of ``size`` ciphertext bytes from its header (and, in the list
        layout, the body of the list object read at ``list_key``, by default the key the header
        names). Raises IntegrityError when the count is wrong (the object was truncated or
        extended) or the list fails its root tag."""
        k = tag_key(data_key, iv)
        tags = spec.tags
        if tags is None:
            assert spec.root is not None
            if list_body is None or not hmac.compare_digest(list_root(k, spec.block, size, list_body), spec.root):
                raise IntegrityError(f"tag list {list_key or spec.list_key!r} does not match its root tag")
            tags = list_body
        if len(tags) != nblocks(size, spec.block) * TAG:
            raise IntegrityError(f"{len(tags) // TAG} tags for {nblocks(size, spec.block)} blocks of "
                                 f"{spec.block} bytes: the object's size ({size}) is not the one tagged")
        return cls(k, spec.block, size, tags)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """``[lo, hi)`` widened to whole blocks (clipped to the size)."""
        return lo - lo % self.block, min(self.size, -(-hi // self.block) * self.block)

    def bad_blocks(self, lo: int, data: bytes | memoryview) -> list[int]:
        """Indexes of the blocks in ``data`` (ciphertext starting at block-aligned ``lo``, whole
        blocks up to the size) that fail their tag (empty: all good)."""
        assert lo % self.block == 0
        view = memoryview(data)
        bad = []
        for off in range(0, len(view), self.block):
            i = (lo + off) // self.block
            expect = self.tags[i * TAG:(i + 1) * TAG]
            if not hmac.compare_digest(block_tag(self.k, self.block, self.size, i, view[off:off + self.block]),
                                       expect):
                bad.append(i)
        return bad


def list_key_candidates(spec: TagSpec, object_key: str) -> list[str]:
    """Where the tag list of the object at ``object_key`` may be, in the order to try: the key
    its header names; then the list's name (its root tag's hex) in the ``.ossfuse-integrity``
    directory of each directory above that key's, nearest first: where a directory rename
    through a mount whose prefix lies above the writer's puts the lists it meets
    (``fs.renamelog.moved_key``: the header cannot follow; trials: such files gave EIO); then
    the same below each directory above the object, nearest first (where releases before
    that moved lists with their directory). The root tag authenticates a list wherever it is
    found."""
    assert spec.list_key is not None and spec.root is not None
    name = f"{LIST_DIR}/{spec.root.hex()}"
    keys = [spec.list_key]
    for above in (spec.list_key.split("/")[:-2], object_key.split("/")[:-1]):
        for n in range(len(above), -1, -1):
            key = "".join(p + "/" for p in above[:n]) + name
            if key not in keys:
                keys.append(key)
    return keys


def is_tag_list(key: str) -> bool:
    """Whether ``key`` (or the part of a key below some directory) is a tag list's:
    ``.ossfuse-integrity/<root tag hex>`` at its end (another client's object in that reserved
    directory, or below it, is not)."""
    parts = key.split("/")
    return len(parts) >= 2 and parts[-2] == LIST_DIR and _LIST_NAME.fullmatch(parts[-1]) is not None


def list_key_of(metadata: dict[str, str]) -> str | None:
    """The key of the tag-list object ``metadata`` names (None: meta layout, no tags, or a
    malformed header)."""
    try:
        spec = parse(metadata)
    except IntegrityError:
        return None
    return spec.list_key if spec is not None else None
