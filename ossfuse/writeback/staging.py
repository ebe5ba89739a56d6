"""Write-back staging: dirty file contents on local disk, never as plaintext, never with a
keystream position used twice (issue 12 A5/A8; docs/design.md "Write-back and the journal").

A file being changed gets a *staged version* (:class:`StagedFile`). It lives in two forms:

- **open** (mutable): the content written so far, in ``staging/<id>.work``, in slots of
  ``16 + BLOCK`` bytes: slot *i* holds a random 16-byte nonce and block *i* (``BLOCK`` bytes of
  plaintext) AES-256-CTR-encrypted under a key that exists only in memory (``_work_key``) with
  that nonce as the initial counter. Every write draws a new random nonce N, and the blocks it
  covers get N, N+256, N+512, … (mod 2**128: each block uses 256 counter values), so one write
  is one CTR stream (one cipher context, not one per block, issue 14) and a rewrite of a block
  starts a new stream from a fresh nonce: rewriting a block never reuses keystream; a crash
  loses the key, and an open version is lost by a crash anyway (it has no journal record). A
  nonce of all zeros marks a block never written: it reads from the ``base`` version (below
  ``base_len``) or as zeros — so extending a file (``truncate`` upwards) costs nothing and a
  reopen for write copies nothing.
  A new file, or one cut to nothing (O_TRUNC), starts in **direct** form instead (issue 14):
  while it is only appended to, each write goes to the work file as the final ciphertext under
  the version's own envelope (no slots, no work key), so sealing it is a rename, not a second
  pass over the data. Every byte position is written once and never again, so no keystream
  position is used twice. The first write that is not an append (an overwrite, a gap) or any
  truncate that changes the size first re-encrypts the content into slots (:meth:`_demote`) and
  marks the envelope spent (``rekey``): its keystream already encrypted those bytes on this
  disk, so the seal takes a fresh data key and IV (Commit.seal).
- **sealed** (immutable): ``staging/<id>.data`` holds the exact ciphertext of the object under
  the version's own envelope (fresh data key and IV: a new object version,
  oss-cse-format.md §11), written once, start to end, by :meth:`StagedFile.seal_data` (in a
  worker thread, a ``SEAL_CHUNK`` at a time, converting the work file in place: no second
  copy on the cache disk); the upload streams it as it is.
  Only a sealed version is journaled (``journal.record``) or uploaded, and it never changes
  again: the next change makes a new open version on top of it (:meth:`Staging.derive`).

Only an open version (one with a writer) holds a descriptor, of its work file; a sealed one
opens its data file for each read, so a thousand pending files need no descriptors.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..envelope import Envelope

log = logging.getLogger(__name__)

BLOCK = 4096  # bytes of plaintext per slot of a work file
_NONCE = 16
_SLOT = _NONCE + BLOCK
_HOLE = bytes(_NONCE)
_CTR_PER_BLOCK = BLOCK // 16  # AES counter values one block of plaintext uses
_CTR_MOD = 1 << 128  # the CTR counter is a 128-bit big-endian integer (OpenSSL wraps it)
SEAL_CHUNK = 1 << 20  # bytes encrypted and written at a time while sealing (a multiple of BLOCK)
# OSS's largest object: 48.8 TiB (oss-rest-api.md, PutObject/multipart limits); bigger gives EFBIG.
MAX_OBJECT_SIZE = 10_000 * (5 << 30)
_TOO_BIG = "larger than the store's largest object or the cache disk's largest file (Staging.max_size)"
# xattr of a work file: the object key it belongs to (plain, as in a journal record), so the
# next mount names the file whose unsaved changes it deletes (journal.read_journal)
LABEL_XATTR = "user.ossfuse.key"
#: bytes of the cache disk that writes growing a staged version leave free (:meth:`Staging.check_room`):
#: room for the journal records of the versions they make and for the log (a break trial's full
#: disk cut the log mid-line, and no closed file there had room for its record)
WRITE_RESERVE = 2 << 20


class Sealed(Exception):
    """A sealed staged version was about to be changed (a bug: derive a new one first)."""


def _open(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class StagedFile:
    """One staged object version (see the module doc). ``size`` in bytes; ``generation``
    counts changes; ``sealed``: the ciphertext in ``data_path`` is final; ``journaled_record``:
    the journal record last made durable (None: none). ``base``: the sealed version this one
    was derived from (its first ``base_len`` bytes show through blocks not written here).
    ``write_error``: errno of a failed write (the version is then incomplete and must never
    replace the last good one)."""

    def __init__(self, staging: "Staging", sid: str, envelope: Envelope | None, size: int = 0, *,
                 sealed: bool = False, base: "StagedFile | None" = None, direct: bool = False):
        self.staging = staging
        self.id = sid
        # an Envelope; a journaled version this mount cannot unwrap gets fs.model.OpaqueEnvelope
        # (same crypt/wrapped); None only between read_journal and recovery setting it
        self.envelope: Any = envelope
        self.size = size
        self.generation = 0
        self.sealed = sealed
        self.base = base
        self.base_len = base.size if base is not None else 0
        self.journaled_record: dict | None = None
        self.write_error: int | None = None
        self.uploading = False  # an upload reads data_path now: discard waits for it
        self.superseded = False  # discard once the upload reading it is done
        self.committed = False  # uploaded: the bucket holds this version
        self.seal_attempt: int | None = None  # generation last sealed (or tried to): see Commit.seal
        # direct form (module doc): the work file holds the final ciphertext of [0, size) under
        # ``envelope``, each position written once; only for a version with no base content
        self.direct = direct and size == 0 and self.base_len == 0
        # the envelope's keystream encrypted bytes on this disk that the sealed object will not
        # hold (a direct version was demoted): the seal must take a fresh data key and IV
        self.rekey = False
        self.tags: Any = None  # integrity.SealedTags of the sealed data (None: untagged)
        # the object key the file had when its work file was made, kept in that file's xattr
        # LABEL_XATTR so the next mount can name what a lost work file held (read_journal)
        self.label: str | None = None
        # While seal_data converts the work file in place: its first ``_packed`` bytes already
        # hold the final ciphertext (contiguous), the slots after them are intact. The lock
        # makes each converted chunk and the new ``_packed`` appear at once to readers (the
        # event loop reads while a worker thread seals). 0: not converting.
        self._seal_lock = threading.Lock()
        self._packed = 0
        self._renamed = False  # the converted work file is data_path now (its fd still open)
        self._work_aes = algorithms.AES(os.urandom(32))  # the work file's key: memory only
        self._work_fd = -1  # open while the version is open (it has a writer); closed at seal
        self.work_path = os.path.join(staging.dir, sid + ".work")
        self.data_path = os.path.join(staging.dir, sid + ".data")
        self.journal_path = os.path.join(staging.dir, sid + ".json")

    @property
    def was_journaled(self) -> bool:
        """Whether this version has a journal record (a crash keeps it)."""
        return self.journaled_record is not None

    # -- content --------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write plaintext ``data`` at ``offset``; a gap past the old end reads as zeros.
        Raises Sealed on a sealed version, OSError (ENOSPC, EFBIG, …) from the cache disk."""
        if self.sealed:
            raise Sealed(self.id)
        self._check_not_converted()
        end = offset + len(data)
        if end > self.staging.max_size:  # nothing written: the version stays as it is
            raise OSError(errno.EFBIG, _TOO_BIG)
        if not data:
            return
        if self.direct:
            if offset == self.size:  # an append: the final ciphertext, written once
                self._pwrite(self._work(create=True), self.envelope.crypt(offset, data), offset)
                self.size = end
                self.generation += 1
                return
            self._demote()
        first, last = offset // BLOCK, (end - 1) // BLOCK
        fd = self._work(create=True)
        # the plaintext of whole blocks first..last: the written bytes over the current
        # content of a block written only in part
        plain = bytearray((last - first + 1) * BLOCK)
        if offset % BLOCK:
            plain[:BLOCK] = self._block(fd, first)
        if end % BLOCK and (last != first or not offset % BLOCK):
            plain[-BLOCK:] = self._block(fd, last)
        plain[offset - first * BLOCK:end - first * BLOCK] = data
        out = self._encrypt_slots(plain)
        self._pwrite(fd, out, first * _SLOT)
        self.size = max(self.size, end)
        self.generation += 1

    def _check_not_converted(self) -> None:
        """OSError (the errno that stopped its seal, else EIO) for a version whose work file
        was converted in place (a seal that failed after that: the version is lost)."""
        if self._packed:
            raise OSError(self.write_error or errno.EIO, f"staged version {self.id} is half sealed")

    def _work(self, create: bool = False) -> int:
        """The work file's descriptor (-1: no work file yet and not ``create``)."""
        if self._work_fd < 0:
            path = self.data_path if self._renamed else self.work_path  # converted in place: renamed
            try:
                self._work_fd = _open(path, os.O_RDWR | (os.O_CREAT if create and not self._renamed else 0))
            except FileNotFoundError as e:
                if create and not self._renamed:  # the staging directory is gone (removed by hand):
                    # EIO, not a write to descriptor -1 (EBADF, a trial)
                    raise OSError(errno.EIO, f"cannot create the work file {path}: {e.strerror}") from None
                return -1
            if create:
                self._label(self._work_fd)
        return self._work_fd

    def _label(self, fd: int) -> None:
        """Name the file in work file ``fd``'s LABEL_XATTR (best effort: only a recovery
        message reads it; a disk without xattrs names nothing)."""
        if self.label is not None:
            try:
                os.setxattr(fd, LABEL_XATTR, self.label.encode("utf-8", "surrogateescape"))
            except OSError:
                pass

    def _demote(self) -> None:
        """Leave the direct form: re-encrypt the content into slots under the work key, in a
        new work file renamed over the old one (a SEAL_CHUNK at a time), and mark the envelope
        spent (``rekey``). Raises OSError (the version stays direct and unchanged)."""
        old = self._work()
        if old < 0 or not self.size:
            if old >= 0:
                os.ftruncate(old, 0)
            self.direct = False
            return
        tmp = self.work_path + ".slots"
        new = _open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            self._label(new)
            for off in range(0, self.size, SEAL_CHUNK):
                n = min(SEAL_CHUNK, self.size - off)
                cipher = os.pread(old, n, off)
                if len(cipher) != n:
                    raise OSError(errno.EIO, f"work file {self.work_path} is short")
                plain = bytearray(-(-n // BLOCK) * BLOCK)  # the last block's tail reads as zeros
                plain[:n] = self.envelope.crypt(off, cipher)
                self._pwrite(new, self._encrypt_slots(plain), off // BLOCK * _SLOT)
            os.replace(tmp, self.work_path)
        except BaseException:
            os.close(new)
            _unlink(tmp)
            raise
        os.close(old)
        self._work_fd = new
        self.direct = False
        self.rekey = True

    def _ctr(self, nonce: bytes, data: bytes | bytearray | memoryview) -> bytes:
        """AES-256-CTR under the work key from counter ``nonce``."""
        ctx = Cipher(self._work_aes, modes.CTR(nonce)).encryptor()
        return ctx.update(data) + ctx.finalize()

    def _encrypt_slots(self, plain: bytearray) -> bytes:
        """Slots (nonce + ciphertext) of the whole blocks in ``plain`` (a multiple of BLOCK
        bytes): one random nonce N for the first block and N + i·BLOCK/16 (mod 2**128) for
        block i, so the run is one CTR stream under the work key (one cipher context per
        write, not per 4 KiB block: issue 14). The keystream of each block is still used once:
        the next write of a block starts from a fresh random nonce, and two runs of n and m
        counters from random 128-bit starts overlap with probability (n + m) / 2**128 (a 1 GiB
        write is 2**26 counters)."""
        nonce = os.urandom(_NONCE)
        cipher = memoryview(self._ctr(nonce, plain))
        n0 = int.from_bytes(nonce, "big")
        parts: list[bytes | memoryview] = []
        for i in range(len(plain) // BLOCK):
            parts.append(((n0 + i * _CTR_PER_BLOCK) % _CTR_MOD).to_bytes(_NONCE, "big"))
            parts.append(cipher[i * BLOCK:(i + 1) * BLOCK])
        return b"".join(parts)

    def _pwrite(self, fd: int, data: bytes, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    def _block(self, fd: int, b: int) -> bytes:
        """Plaintext of block ``b`` (BLOCK bytes, zeros past the end)."""
        return self._blocks(fd, b, b)

    def _blocks(self, fd: int, first: int, last: int) -> bytes:
        """Plaintext of blocks ``first..last`` (zeros past the end and in holes)."""
        n = last - first + 1
        raw = os.pread(fd, n * _SLOT, first * _SLOT) if fd >= 0 else b""
        view = memoryview(raw)
        nonces = [raw[at:at + _NONCE] for at in range(0, len(raw) // _SLOT * _SLOT, _SLOT)]
        written = [nonce != _HOLE for nonce in nonces] + [False] * (n - len(nonces))
        out: list[bytes] = []  # joined once at the end (a seal reads 1 MiB at a time: no regrowing)
        i = 0
        while i < n:
            j = i + 1
            if written[i]:
                # the slots i..j-1 continue one CTR stream (see _encrypt_slots): one decryptor
                expect = int.from_bytes(nonces[i], "big")
                while j < n and written[j]:
                    expect = (expect + _CTR_PER_BLOCK) % _CTR_MOD
                    if int.from_bytes(nonces[j], "big") != expect:
                        break
                    j += 1
                ctx = Cipher(self._work_aes, modes.CTR(nonces[i])).decryptor()
                out.append(ctx.update(b"".join([view[k * _SLOT + _NONCE:(k + 1) * _SLOT] for k in range(i, j)])))
            else:
                # never written here: the base's bytes below base_len, zeros above (one read)
                while j < n and not written[j]:
                    j += 1
                lo, length = (first + i) * BLOCK, (j - i) * BLOCK
                out.append(self._base_run(lo, length) if lo < self.base_len else bytes(length))
            i = j
        return out[0] if len(out) == 1 else b"".join(out)

    def _base_run(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` from the base (zeros past ``base_len``)."""
        assert self.base is not None  # only called when there is a base
        part = self.base.read(offset, min(length, self.base_len - offset))
        return part + bytes(length - len(part))

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext ``[offset, offset+length)``, clipped to the size. OSError when the staging
        disk fails."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        if self.sealed:
            fd = _open(self.data_path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            if len(data) != length:
                raise OSError(errno.EIO, f"staged data {self.data_path} is short")
            return self.envelope.crypt(offset, data)
        if self.direct:
            data = os.pread(self._work(), length, offset)
            if len(data) != length:
                raise OSError(errno.EIO, f"work file {self.work_path} is short")
            return self.envelope.crypt(offset, data)
        with self._seal_lock:
            packed = min(self._packed, offset + length)
            head = b""
            if packed > offset:  # converted in place already: final ciphertext there
                head = os.pread(self._work(), packed - offset, offset)
                if len(head) != packed - offset:
                    raise OSError(errno.EIO, f"work file {self.work_path} is short")
                head = self.envelope.crypt(offset, head)
                offset, length = packed, length - len(head)
                if not length:
                    return head
            first, last = offset // BLOCK, (offset + length - 1) // BLOCK
            data = self._blocks(self._work(), first, last)  # no work file yet: base or zeros
        skip = offset - first * BLOCK
        return head + data[skip:skip + length]

    def truncate(self, size: int) -> None:
        """Cut or extend (a hole that reads as zeros: nothing is written) to ``size`` bytes.
        Raises Sealed, OSError(EFBIG) above the store's largest object."""
        if self.sealed:
            raise Sealed(self.id)
        self._check_not_converted()
        if size > self.staging.max_size:
            raise OSError(errno.EFBIG, _TOO_BIG)
        if self.direct:
            if size == self.size:
                self.generation += 1
                return
            self._demote()  # a cut or a hole: positions would be written again
        elif size == 0 and not self.rekey and self.seal_attempt is None:
            # cut to nothing (O_TRUNC): no byte of the envelope's keystream is on disk yet (no
            # seal was tried), so the new content can go straight to its final form
            fd = self._work()
            if fd >= 0:
                os.ftruncate(fd, 0)
            self.base_len = 0
            self.size = 0
            self.generation += 1
            self.direct = True
            return
        if size < self.size:
            # what lies past the new end must read as zeros if the file grows again
            self.base_len = min(self.base_len, size)
            nblocks = -(-size // BLOCK)
            fd = self._work()
            if fd >= 0:
                if size % BLOCK:
                    keep = self.read(size - size % BLOCK, size % BLOCK)
                os.ftruncate(fd, min(os.fstat(fd).st_size, nblocks * _SLOT))
                if size % BLOCK:
                    self.size = size  # the block's tail becomes zeros, under a new nonce
                    self.write(size - size % BLOCK, keep + bytes(BLOCK - len(keep)))
        self.size = size
        self.generation += 1

    # -- sealing --------------------------------------------------------------------------
    def seal_data(self) -> None:
        """Write the final ciphertext of this version to ``data_path`` (blocking: run it in a
        worker thread; reads meanwhile are served, see ``_packed``). Never fsynced: the journal
        promises survival of a daemon crash, not of a power loss (``fsync()`` uploads; a local
        store's ``sync`` flushes the inode it links), issue 14.

        The work file is converted in place (:meth:`_seal_in_place`), so sealing needs no
        second copy of the file on the cache disk; a version with no work file yet, or on a
        disk that cannot reserve space (no fallocate), is written to a new file instead.
        Raises OSError: ENOSPC when the disk cannot hold the sealed file (checked before
        anything changes: the version stays open, retried at the next seal); any error half-way
        through an in-place conversion also sets ``write_error`` (the version is then lost like
        a failed write: never sealed, dropped at close; its reads stay correct until then)."""
        if self._renamed:
            return  # converted already (what failed after it, e.g. the tags, was not the conversion)
        if self.direct and self.write_error is None and self._work() >= 0:
            with self._seal_lock:  # the work file is the final ciphertext already
                os.ftruncate(self._work_fd, self.size)  # (a failed write may have left bytes past it)
                os.replace(self.work_path, self.data_path)
                self._renamed = True
                self._packed = max(self.size, 1)
            return
        if self.write_error is None and self._work() >= 0:
            try:
                os.posix_fallocate(self._work_fd, 0, max(self.size, 1))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise  # ENOSPC: the sealed file would not fit; nothing changed
            else:
                self._seal_in_place()
                return
        self._seal_copy()

    def _seal_in_place(self) -> None:
        """Turn the work file into the sealed data file, front to back, a SEAL_CHUNK at a
        time: block *i*'s ciphertext goes to ``i*BLOCK``, never past the slot of block *i*
        (which starts at ``i*(16+BLOCK)``), so no slot is overwritten before it was read. The
        space was reserved by the caller's fallocate (overwriting allocated blocks takes none on
        ext4/xfs/tmpfs). Then cut to ``size`` and renamed to ``data_path``."""
        fd = self._work_fd
        try:
            for off in range(0, self.size, SEAL_CHUNK):
                plain = self.read(off, SEAL_CHUNK)
                cipher = self.envelope.crypt(off, plain)
                with self._seal_lock:
                    self._pwrite(fd, cipher, off)
                    self._packed = off + len(cipher)
            with self._seal_lock:
                self._packed = max(self._packed, 1)  # also for an empty file: no more slots
                os.ftruncate(fd, self.size)
                os.replace(self.work_path, self.data_path)
                self._renamed = True
        except OSError as e:
            if self._packed:  # half converted: the slots of the start are gone (the caller logs it)
                self.write_error = e.errno or errno.EIO
            raise

    def _seal_copy(self) -> None:
        """Write the sealed data to a new file next to the work file (the fallback of
        :meth:`seal_data`: needs room for both)."""
        tmp = self.data_path + ".tmp"
        fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for off in range(0, self.size, SEAL_CHUNK):
                plain = self.read(off, SEAL_CHUNK)
                self._pwrite(fd, self.envelope.crypt(off, plain), off)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.data_path)

    def finish_seal(self) -> None:
        """After :meth:`seal_data`: the version is sealed; its work file goes. Its ``base`` is
        no longer read; the caller discards it once this version is journaled."""
        self.sealed = True
        self.close()
        _unlink(self.work_path)
        self._packed = 0
        self._renamed = False
        self.base_len = 0

    @property
    def converted(self) -> bool:
        """Whether seal_data began converting the work file in place (its slots are going):
        the version can no longer be written, only sealed or dropped."""
        return self._packed > 0 and not self.sealed

    def seal(self) -> None:
        """Seal in this thread and discard the base (tests, tools)."""
        if not self.sealed:
            self.seal_data()
            self.finish_seal()
        if self.base is not None:
            self.base.discard()
            self.base = None

    # -- removal --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the work file's descriptor (reopened on the next use)."""
        if self._work_fd >= 0:
            os.close(self._work_fd)
            self._work_fd = -1

    def forget_record(self) -> None:
        """Remove the journal record: a crash of the daemon will not bring this version back
        (not fsynced: after a power loss it may, and is then uploaded again, as after a crash
        between an upload and this removal)."""
        if self.journaled_record is not None or os.path.exists(self.journal_path):
            _unlink(self.journal_path)
        self.journaled_record = None

    def discard(self) -> None:
        """Delete record, data and work file (unlinked, superseded, or uploaded). The record
        goes first, so a crash in between never leaves a record without its data. While an
        upload reads the data, only the record goes; the data follows when it is done."""
        self.forget_record()
        if self.uploading:
            self.superseded = True
            return
        self.close()
        for p in (self.data_path, self.work_path):
            _unlink(p)


def _size(n: int) -> str:
    """``n`` bytes in words: "12.0 MiB (12582912 bytes)"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _largest_file(directory: str) -> int:
    """The largest size, in bytes, a file on ``directory``'s filesystem can have (its
    s_maxbytes: ext4 16 TiB with 4 KiB blocks, xfs and tmpfs 8 EiB), found by extending an
    unnamed empty file (ftruncate allocates nothing and fails EFBIG past it). A write that
    starts past it fails EFBIG having written nothing; one that ends past it writes part."""
    fits_any_object = MAX_OBJECT_SIZE // BLOCK * _SLOT + _SLOT  # when it cannot be probed
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:  # no O_TMPFILE there
        return fits_any_object
    try:
        low, high = 0, (1 << 63) - 1  # low fits; high is the most any file can have
        while low < high:
            mid = (low + high + 1) // 2
            try:
                os.ftruncate(fd, mid)
                low = mid
            except OSError as e:
                if e.errno not in (errno.EFBIG, errno.EINVAL):
                    return fits_any_object
                high = mid - 1
        return low
    finally:
        os.close(fd)


class Staging:
    """The staging directory ``<cache dir>/staging`` and its ``quarantine/``.

    Entries in ``quarantine/`` stay until someone recovers or deletes them; ``ossfuse status``
    shows their count (:meth:`quarantined`) on every mount, not only on the one that
    quarantined them."""

    def __init__(self, cache_dir: str, store: str = ""):
        self.dir = os.path.join(cache_dir, "staging")
        # the bucket the journal's records are for (StoreConfig.identity; "": not said): a
        # record for another is quarantined at mount, never uploaded here (journal.read_journal)
        self.store = store
        self.quarantine_dir = os.path.join(self.dir, "quarantine")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        # the largest content one version can have here, in bytes: the store's largest object,
        # or less when the cache disk's largest file cannot hold its work file (ext4: 16 TiB)
        self.max_size = min(MAX_OBJECT_SIZE, _largest_file(self.dir) // _SLOT * BLOCK)
        # the object keys (None: not recorded) of the files whose work files of an earlier run
        # were deleted at mount (journal.read_journal)
        self.lost_work: list[str | None] = []
        self.space_warning: str | None = None  # check_space's line, for `ossfuse mount` to print too
        self._seq = 0  # the last journal record's sequence number (next_seq)

    def check_room(self, n: int) -> None:
        """Raise OSError(ENOSPC) when writing ``n`` more bytes to the cache disk would leave
        less than WRITE_RESERVE bytes free there (one statvfs)."""
        st = os.statvfs(self.dir)
        if st.f_bavail * st.f_frsize < n + WRITE_RESERVE:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (the cache disk keeps {_size(WRITE_RESERVE)} "
                                        "for journal records and the log)")

    def next_seq(self) -> int:
        """A journal record's sequence number: wall-clock nanoseconds, above every earlier one
        of this run (two records of one key written within the file system's timestamp
        granularity have the same mtime; the newer must win at recovery: journal.read_journal)."""
        self._seq = max(time.time_ns(), self._seq + 1)
        return self._seq

    def seq_after(self, seq: int) -> None:
        """Records from now on get sequence numbers above ``seq`` (an earlier run's largest:
        a wall clock stepped back since must not make a new record look older)."""
        self._seq = max(self._seq, seq)

    def quarantined(self) -> int:
        """How many journal entries ``quarantine/`` holds now (a listing of that one small
        directory: the operator may have removed some since)."""
        try:
            names = os.listdir(self.quarantine_dir)
        except OSError:
            return 0
        return len({n.rsplit(".", 1)[0] for n in names if n.endswith((".json", ".data"))})

    def new(self, envelope: Envelope, *, direct: bool = True) -> StagedFile:
        """An empty open version encrypted under ``envelope`` (no disk I/O yet); ``direct``:
        in the direct form while it is only appended to (module doc)."""
        return StagedFile(self, uuid.uuid4().hex, envelope, direct=direct)

    def derive(self, base: StagedFile, envelope: Envelope) -> StagedFile:
        """A new open version with ``base``'s content (nothing copied: unwritten blocks read
        through to it) under a fresh ``envelope``; ``base`` stays as it is. Direct (module
        doc) when ``base`` is empty (e.g. the empty version a truncate by path sealed just before
        an O_TRUNC open's writes)."""
        return StagedFile(self, uuid.uuid4().hex, envelope, base.size, base=base, direct=True)

    def check_space(self, min_free: int, droppable: int = 0) -> None:
        """At mount: one WARNING naming the cache dir, its disk's free and total space and
        ``min_free`` (bytes, ``cache.min_free``) when the disk is small for it: free space,
        with the ``droppable`` bytes of cached blocks an earlier mount left (the block cache
        drops them as it needs room: a trial was warned after a clean unmount of a healthy
        mount), below twice ``min_free`` (kept in ``space_warning``: `ossfuse mount` prints it).
        The block cache drops cached blocks to keep ``min_free`` free, so
        on such a disk it caches little or nothing (every read goes to the store), and staged
        writes get ENOSPC once the rest is used."""
        if min_free <= 0:
            return
        try:
            st = os.statvfs(self.dir)
        except OSError as e:
            log.warning("cache dir %s: cannot tell its free space: %s", os.path.dirname(self.dir), e)
            return
        free, total = st.f_bavail * st.f_frsize + droppable, st.f_blocks * st.f_frsize
        if free < 2 * min_free:
            self.space_warning = (
                f"cache dir {os.path.dirname(self.dir)}: its disk has {_size(free)} free"
                f"{' (with the cached blocks it may drop)' if droppable else ''} of {_size(total)}, "
                f"{'below' if free < min_free else 'near'} cache.min_free ({_size(min_free)}): the block cache "
                "keeps that much free, so it caches little or nothing, and writes get ENOSPC when staging fills "
                "the disk; use a bigger disk or lower cache.min_free")
            log.warning("%s", self.space_warning)

    def sync(self) -> None:
        """fsync the staging directory (a record's creation or removal is durable)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def quarantine(self, sid: str, reason: str, what: str) -> None:
        """Move the record and data of staged version ``sid`` to ``quarantine/`` (never
        deleted: someone may recover them by hand; an entry of the same name already there is
        kept too, this one getting a ``-N`` suffix) with one ERROR line naming ``what`` (the
        object key, or the record file) and ``reason``."""
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        kept = sid
        n = 1
        while any(os.path.lexists(os.path.join(self.quarantine_dir, kept + ext)) for ext in (".json", ".data")):
            n += 1  # an entry quarantined before under the same name (put back by hand) stays
            kept = f"{sid}-{n}"
        for ext in (".json", ".data"):
            src = os.path.join(self.dir, sid + ext)
            if os.path.lexists(src):
                shutil.move(src, os.path.join(self.quarantine_dir, kept + ext))
        self.sync()
        log.error("journal entry %s for %s quarantined in %s: %s", sid, what, self.quarantine_dir, reason)
