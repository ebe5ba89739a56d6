"""Per-mount CMKs: which one wraps the data key of a new object, which one unwraps an object's.

A CMK (customer master key) wraps and unwraps data keys and IVs; it never leaves this process.
Selection rules (docs/semantics.md, "Keys"):
- new objects: the first ``[[encryption.rule]]`` whose ``prefix`` starts the object's path, else
  ``encryption.encrypt_with``;
- reading: a CMK that reads the object's ``wrap-alg`` and whose matdesc equals the object's
  matdesc compared as parsed JSON maps (SDKs serialise it differently, §5); an object with no
  matdesc is read with the CMK marked ``default_for_no_matdesc``, else one that has no matdesc,
  else the ``encrypt_with`` CMK (each only if it reads the object's wrap-alg);
- the matdesc text written: the CMK's ``matdesc_text``, else Go's ``json.Marshal`` form
  (``envelope.encode_matdesc``), which the Go SDKs match by text (issue 15).
A CMK whose objects this selection reads with another CMK makes unreadable objects:
``unreadable_reason`` says so, and rekey and check use it (issue 16).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from Crypto.Cipher import PKCS1_v1_5
from Crypto.PublicKey import RSA
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import envelope as env
from .cmk import Cmk, CmkUnavailable, KeyMissing  # noqa: F401  (re-exported: callers import them from here)
from .config import CmkConfig, EncryptionConfig
from .sqlitecache import damaged, open_cache_db, renew_cache_db

log = logging.getLogger(__name__)

WRAP_RSA = "RSA/NONE/PKCS1Padding"  # §4.1, exact case as written by all SDKs


_UNWRAP_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rsa-unwrap")


_KEY_CACHE_SCHEMA = "CREATE TABLE IF NOT EXISTS keys (id BLOB PRIMARY KEY, nonce BLOB NOT NULL, sealed BLOB NOT NULL)"


class KeyCache:
    """Data keys and IVs of envelopes this machine made or unwrapped before, in a SQLite file
    (0600, in the mount's cache dir), so opening such a file again, in this mount or a later
    one, costs no RSA private-key work (issue 14: two RSA-3072 decryptions per open).

    Only CMKs with a ``cache_secret`` (RSA: derived from the private key, which never leaves
    this process) take part. Per CMK, HKDF gives two keys: one names a row,
    ``id = HMAC-SHA256(k_id, wrap-alg ‖ legacy ‖ len(wrapped key) ‖ wrapped key ‖ wrapped IV)``
    (the file shows no wrapped key), one seals it, ``AES-256-GCM(k_seal, nonce, key ‖ iv,
    aad=id)``. A row is found only through the exact wrapped headers an object carries now: a
    changed object (new envelope, new ETag) misses and is unwrapped with the CMK; another CMK
    (a different private key) derives other ids and finds nothing. A row that does not
    authenticate is dropped (one INFO line) and the CMK unwraps as if it were absent. The
    file is a cache: at most ``max_rows`` rows (oldest dropped), commits are not fsynced, and an
    unreadable file is replaced."""

    def __init__(self, path: str, max_rows: int = 200_000):
        self.path = path
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._puts = 0
        self._keys: dict[bytes, tuple[bytes, AESGCM]] = {}  # cache_secret -> (k_id, sealer)
        self._db = open_cache_db(path, _KEY_CACHE_SCHEMA, "data-key cache")  # a lost row costs one unwrap

    def _renew_if_damaged(self, e: sqlite3.Error) -> bool:
        """Replace the file when ``e`` says it is damaged (self._lock held; its rows are lost:
        each costs one unwrap); whether it did."""
        if not damaged(e):
            return False
        # none made: the closed file's queries fail, caught as before (a cache)
        self._db = renew_cache_db(self._db, self.path, _KEY_CACHE_SCHEMA, "data-key cache", e) or self._db
        return True

    def _keys_for(self, secret: bytes) -> tuple[bytes, AESGCM]:
        keys = self._keys.get(secret)
        if keys is None:
            k_id = HKDF(hashes.SHA256(), 32, salt=None, info=b"ossfuse key-cache id").derive(secret)
            k_seal = HKDF(hashes.SHA256(), 32, salt=None, info=b"ossfuse key-cache seal").derive(secret)
            keys = self._keys[secret] = (k_id, AESGCM(k_seal))
        return keys

    @staticmethod
    def _id(k_id: bytes, wrapped: env.WrappedEnvelope) -> bytes:
        h = hmac.new(k_id, digestmod=hashlib.sha256)
        for part in (wrapped.wrap_alg.lower().encode(), b"L" if wrapped.legacy else b"-",
                     len(wrapped.wrapped_key).to_bytes(4, "big"), wrapped.wrapped_key, wrapped.wrapped_iv):
            h.update(part)
        return h.digest()

    def get(self, secret: bytes, wrapped: env.WrappedEnvelope) -> tuple[bytes, bytes] | None:
        """(data key, IV) cached for ``wrapped`` under the CMK of ``secret``; None if absent."""
        k_id, sealer = self._keys_for(secret)
        rid = self._id(k_id, wrapped)
        with self._lock:
            try:
                row = self._db.execute("SELECT nonce, sealed FROM keys WHERE id=?", (rid,)).fetchone()
            except sqlite3.Error as e:
                if self._renew_if_damaged(e):
                    return None
                raise
        if row is None:
            return None
        try:
            plain = sealer.decrypt(row[0], row[1], rid)
        except InvalidTag:
            plain = b""
        if len(plain) != env.DATA_KEY_SIZE + env.IV_SIZE:
            log.info("data-key cache %s: a row does not authenticate; dropped (the CMK unwraps it)", self.path)
            with self._lock:
                self._db.execute("DELETE FROM keys WHERE id=?", (rid,))
            return None
        return plain[:env.DATA_KEY_SIZE], plain[env.DATA_KEY_SIZE:]

    def put(self, secret: bytes, wrapped: env.WrappedEnvelope, data_key: bytes, iv: bytes) -> None:
        """Remember (data key, IV) of ``wrapped`` under the CMK of ``secret``."""
        k_id, sealer = self._keys_for(secret)
        rid = self._id(k_id, wrapped)
        nonce = os.urandom(12)
        sealed = sealer.encrypt(nonce, data_key + iv, rid)
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO keys VALUES (?,?,?)", (rid, nonce, sealed))
                self._puts += 1
                if self._puts % 1024 == 0:
                    self._db.execute("DELETE FROM keys WHERE rowid <= (SELECT max(rowid) FROM keys) - ?",
                                     (self.max_rows,))
            except sqlite3.Error as e:
                if not self._renew_if_damaged(e):
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RsaCmk(Cmk):
    """RSA CMK, ``RSA/NONE/PKCS1Padding`` (PKCS#1 v1.5 type 2, §4.1), from a PKCS#1 or PKCS#8
    private-key PEM file (the public half is derived).

    Unwrapping rejects bad padding explicitly, as every SDK does (oss2 passes a sentinel to
    pycryptodome, Go's DecryptPKCS1v15 returns an error): the envelope carries no other check of
    the data key, so the implicit rejection of current `cryptography` (a pseudo-random "key" for
    a wrong CMK) would turn a wrong CMK into garbage plaintext. The price, shared with the SDKs,
    is a padding oracle to whoever can both write objects and watch this mount's errors.
    """

    wrap_alg = WRAP_RSA

    def __init__(self, cfg: CmkConfig):
        super().__init__(cfg)
        try:
            assert cfg.private_key is not None  # config validation requires it for an rsa CMK
            with open(cfg.private_key, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except TypeError:  # cryptography: "Password was not given but private key is encrypted"
            raise ValueError(f"CMK {cfg.id!r}: {cfg.private_key} is a passphrase-protected key; "
                             "store it unencrypted with mode 0600") from None
        except ValueError:
            raise ValueError(f"CMK {cfg.id!r}: {cfg.private_key} is not a PEM RSA private key "
                             "(PKCS#1 or PKCS#8)") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"CMK {cfg.id!r}: {cfg.private_key} is not an RSA private key")
        self._private = key
        self._public = key.public_key()
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self._unwrapper = PKCS1_v1_5.new(RSA.import_key(der))
        # the local data-key cache's secret (KeyCache): only whoever holds this private key
        # derives it; HKDF-SHA256 (RFC 5869) over the key's PKCS#8 DER
        self.cache_secret: bytes | None = HKDF(hashes.SHA256(), 32, salt=b"ossfuse data-key cache",
                                               info=b"v1").derive(der)

    def wrap(self, secret: bytes) -> bytes:
        return self._public.encrypt(secret, padding.PKCS1v15())

    #: also reads what oss2's LocalRsaProvider wraps with the same key pair (RSA-OAEP, §4.3)
    reads_wrap_algs = (WRAP_RSA, env.WRAP_RSA_OAEP)

    def unwrap_pair(self, key_blob: bytes, iv_blob: bytes) -> tuple[bytes, bytes]:
        """Data key and IV of a ``RSA/NONE/PKCS1Padding`` envelope, fast: OpenSSL (through
        `cryptography`) decrypts both, with implicit rejection, and the result is taken only if
        it has the shape every SDK writes — a 32-byte key and a 16-byte IV whose bytes 8–11 are
        zero (§3.3); a wrong CMK passes that by chance with probability about 2^-48. Anything
        else goes through the explicit check of ``unwrap`` (pycryptodome, many times slower),
        which accepts any valid envelope and raises EnvelopeError for a wrong CMK."""
        try:
            # Two private-key operations; OpenSSL runs without the GIL, so the IV's runs on a
            # second core meanwhile (an open of a small file is mostly this).
            iv_job = _UNWRAP_POOL.submit(self._private.decrypt, iv_blob, padding.PKCS1v15())
            key = self._private.decrypt(key_blob, padding.PKCS1v15())
            iv = iv_job.result()
            if len(key) == env.DATA_KEY_SIZE and len(iv) == env.IV_SIZE and iv[8:12] == b"\0\0\0\0":
                return key, iv
        except ValueError:
            pass
        key = self.unwrap(key_blob)
        try:
            return key, self.unwrap(iv_blob)
        except env.EnvelopeError:  # (a trial: a truncated start header was blamed on the key's)
            raise env.EnvelopeError(f"CMK {self.id!r} unwraps the data key but not the IV (a corrupt "
                                    "client-side-encryption-start header)") from None

    def unwrap(self, blob: bytes, wrap_alg: str = WRAP_RSA) -> bytes:
        if wrap_alg.lower() == env.WRAP_RSA_OAEP.lower():
            try:  # OAEP with SHA-1 and MGF1-SHA-1: pycryptodome PKCS1_OAEP defaults, as oss2 uses
                return self._private.decrypt(blob, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
            except ValueError:
                raise env.EnvelopeError(f"CMK {self.id!r} cannot unwrap the data key "
                                        "(wrong CMK or corrupt key header)") from None
        sentinel = object()
        try:
            result = self._unwrapper.decrypt(blob, sentinel)
        except (ValueError, TypeError):
            result = sentinel
        if result is sentinel:
            raise env.EnvelopeError(f"CMK {self.id!r} cannot unwrap the data key "
                                    "(wrong CMK or corrupt key header)")
        assert isinstance(result, bytes)
        return result


def generate_rsa_cmk(path: str, bits: int = 3072) -> None:
    """Write a new RSA CMK: ``path`` (PKCS#8 PEM private key, mode 0600) and ``path.pub``
    (SubjectPublicKeyInfo PEM). Refuses to overwrite an existing file (FileExistsError; then
    neither is written)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    with open(path + ".pub", "xb") as pub_file:  # first: nothing is written when either exists
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            os.unlink(path + ".pub")
            raise
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub_file.write(pub)


def _make_cmk(cfg: CmkConfig, credentials) -> Cmk:
    if cfg.type == "kms":
        from .kms import KmsCmk  # imported on use: only KMS mounts load the Alibaba Cloud SDK
        own = None
        if cfg.credentials_file:
            from .store.credentials import CredentialsError, FileCredentialsProvider
            try:
                own = FileCredentialsProvider(cfg.credentials_file)
            except CredentialsError as e:  # (a traceback at mount: a trial)
                raise ValueError(f"CMK {cfg.id!r}: {e}") from None
        return KmsCmk(cfg, own or credentials)
    return RsaCmk(cfg)


class Keyring:
    """The mount's CMKs and the rules that pick them. Thread-safe (no mutable shared state
    except a cache of unwrapped envelopes, bounded in size and time, and the envelopes made
    ahead: at most SPARE_ENVELOPES per CMK, each served once)."""

    _CACHE_SIZE = 4096  # unwrapped envelopes kept at most
    _CACHE_SECONDS = 300.0  # and for at most this long, so reopening a file does not unwrap again

    def __init__(self, cfg: EncryptionConfig, credentials=None):
        """``credentials``: the mount's credentials provider, used by KMS CMKs that name none."""
        self.cmks: dict[str, Cmk] = {c.id: _make_cmk(c, credentials) for c in cfg.cmks}
        self.no_matdesc = [self.cmks[c.id] for c in cfg.cmks if c.default_for_no_matdesc]
        self.default = self.cmks[cfg.encrypt_with]
        self.rules = [(r.prefix, self.cmks[r.encrypt_with]) for r in cfg.rules]
        self._unwrapped: OrderedDict[tuple, tuple[float, env.Envelope]] = OrderedDict()  # see open_envelope
        self._cache_put_failing = False  # the data-key cache refused the last key (said once)
        self._lock = threading.Lock()
        self.key_cache: KeyCache | None = None  # see attach_key_cache
        # envelopes made ahead, per CMK id (see make_spares); deque: append/popleft are atomic
        self._spares: dict[str, deque[env.Envelope]] = {}
        self._making_spares = threading.Lock()

    def attach_key_cache(self, path: str) -> None:
        """Keep the data keys this keyring makes and unwraps in the local cache file ``path``
        (:class:`KeyCache`), so a later open of the same object needs no RSA work. A cache
        that cannot be opened is only logged (one WARNING): every open then unwraps."""
        try:
            self.key_cache = KeyCache(path)
        except (OSError, sqlite3.Error) as e:
            log.warning("data-key cache %s cannot be opened (%s): every open unwraps with the CMK", path, e)

    def close(self) -> None:
        if self.key_cache is not None:
            self.key_cache.close()
            self.key_cache = None

    def cmk_for_new(self, path: str) -> Cmk:
        """The CMK that wraps new objects at ``path`` (relative to the mount)."""
        for prefix, cmk in self.rules:
            if path.startswith(prefix):
                return cmk
        return self.default

    #: envelopes made ahead per CMK (see make_spares): a burst of creates finds one ready
    SPARE_ENVELOPES = 16

    def take_spare(self, path: str) -> env.Envelope | None:
        """An envelope made ahead (:meth:`make_spares`) for a new object version at ``path``,
        used once: a data key and IV never served before, wrapped by the CMK ``path``'s rules
        pick. None when none is ready. No I/O and no RSA work: callable on the event loop."""
        spares = self._spares.get(self.cmk_for_new(path).id)
        try:
            return spares.popleft() if spares else None
        except IndexError:  # another thread took the last one meanwhile
            return None

    def wants_spares(self, path: str) -> bool:
        """Whether :meth:`make_spares` would make any for ``path``'s CMK now: fewer than half
        of SPARE_ENVELOPES are ready, and its data keys are made here (a KMS CMK's come from a
        network call, which a create makes itself so that its failure fails that create)."""
        cmk = self.cmk_for_new(path)
        if hasattr(cmk, "new_data_key"):
            return False
        return len(self._spares.get(cmk.id, ())) < self.SPARE_ENVELOPES // 2

    def make_spares(self, path: str) -> int:
        """Make envelopes ahead for ``path``'s CMK, up to SPARE_ENVELOPES ready (blocking:
        ~0.5 ms each of RSA public-key work and a key-cache row: run it in a thread). Returns
        how many it made (0 when another thread is making them, or for a KMS CMK). Raises
        what :meth:`new_envelope` raises."""
        cmk = self.cmk_for_new(path)
        if hasattr(cmk, "new_data_key") or not self._making_spares.acquire(blocking=False):
            return 0
        try:
            spares = self._spares.setdefault(cmk.id, deque())
            made = 0
            while len(spares) < self.SPARE_ENVELOPES:
                spares.append(self._make_envelope(cmk))
                made += 1
            return made
        finally:
            self._making_spares.release()

    def new_envelope(self, path: str) -> env.Envelope:
        """A fresh data key and IV for a new object version at ``path``, wrapped by its CMK
        (one made ahead when ready, see :meth:`take_spare`; blocking otherwise: RSA public-key
        work, or a KMS call)."""
        return self.take_spare(path) or self._make_envelope(self.cmk_for_new(path))

    def _make_envelope(self, cmk: Cmk) -> env.Envelope:
        iv = env.new_iv()
        if hasattr(cmk, "new_data_key"):  # KMS makes the data key itself (GenerateDataKey, §4.2b)
            key, wrapped_key = cmk.new_data_key()
        else:
            key = env.new_data_key()
            wrapped_key = cmk.wrap(key)
        wrapped = env.WrappedEnvelope(wrapped_key, cmk.wrap(iv), cmk.wrap_alg, cmk.matdesc, cmk.matdesc_raw)
        secret = getattr(cmk, "cache_secret", None)
        if self.key_cache is not None and secret is not None:
            self._cache_put(secret, wrapped, key, iv)  # reading back what we wrote: no RSA
        return env.Envelope(key, iv, wrapped, cmk.id)

    def _cache_put(self, secret: bytes, wrapped: env.WrappedEnvelope, key: bytes, iv: bytes) -> None:
        cache = self.key_cache
        if cache is None:
            return
        try:
            cache.put(secret, wrapped, key, iv)
        except sqlite3.Error as e:  # a cache: the open that needs it unwraps with the CMK
            # one line while it keeps failing (a full cache disk failed every key made ahead)
            log.log(logging.DEBUG if self._cache_put_failing else logging.INFO,
                    "data-key cache %s: cannot store a key: %s", cache.path, e)
            self._cache_put_failing = True
        else:
            self._cache_put_failing = False

    def cmk_for(self, wrapped: env.WrappedEnvelope) -> Cmk:
        """The CMK that reads ``wrapped``; raises KeyMissing when none matches."""
        candidates = [c for c in self.cmks.values() if c.reads(wrapped.wrap_alg)]
        if wrapped.matdesc is None:
            for c in self.no_matdesc + [c for c in candidates if c.matdesc is None] + [self.default]:
                if c in candidates:
                    return c
        else:
            for c in candidates:
                if c.matdesc == wrapped.matdesc:
                    return c
        raise KeyMissing(f"no CMK for wrap-alg {wrapped.wrap_alg!r} and matdesc "
                         f"{wrapped.matdesc_raw or '(none)'}")

    def reader_of(self, cmk: Cmk) -> Cmk | None:
        """The CMK this keyring picks to read the objects that ``cmk`` wraps (the pick looks only
        at wrap-alg and matdesc, which are the same for all of them); None when none matches."""
        try:
            return self.cmk_for(env.WrappedEnvelope(b"", b"", cmk.wrap_alg, cmk.matdesc, cmk.matdesc_raw))
        except KeyMissing:
            return None

    def unreadable_reason(self, cmk: Cmk) -> str | None:
        """None if the objects ``cmk`` wraps are read with ``cmk`` itself; else why not, with
        the configuration change that fixes it (one sentence)."""
        reader = self.reader_of(cmk)
        if reader is cmk:
            return None
        if cmk.matdesc is None:
            return (f"objects CMK {cmk.id!r} wraps carry no matdesc, and this configuration reads such "
                    f"objects with CMK {reader.id if reader else None!r}: give CMK {cmk.id!r} a matdesc of "
                    f"its own (e.g. matdesc = {{ cmk = \"{cmk.id}\" }}), or set default_for_no_matdesc = true "
                    f"on it if every object without matdesc is to be wrapped by it")
        return (f"objects CMK {cmk.id!r} wraps carry matdesc {cmk.matdesc_raw}, which this configuration "
                f"reads with CMK {reader.id if reader else None!r} (listed first with that matdesc): give CMK "
                f"{cmk.id!r} a matdesc no other CMK has")

    def cached_envelope(self, wrapped: env.WrappedEnvelope) -> env.Envelope | None:
        """The envelope of ``wrapped`` if this keyring or its data-key cache has it (no CMK
        work: microseconds, fit for the event loop), else None. Raises KeyMissing as
        :meth:`open_envelope` does (the CMK is picked first, so matdesc is still checked)."""
        return self._envelope(wrapped, None, cached_only=True)

    def open_envelope(self, wrapped: env.WrappedEnvelope, cmk: Cmk | None = None,
                      look_in_key_cache: bool = True) -> env.Envelope:
        """Unwrap data key and IV with ``cmk`` (default: the one ``cmk_for`` picks). Raises
        KeyMissing, or EnvelopeError when unwrapping fails. ``look_in_key_cache=False``: the
        caller has just asked :meth:`cached_envelope` (the data-key cache file is not searched a
        second time; what is unwrapped is still stored in it)."""
        result = self._envelope(wrapped, cmk, cached_only=False, look_in_key_cache=look_in_key_cache)
        assert result is not None
        return result

    def _envelope(self, wrapped: env.WrappedEnvelope, cmk: Cmk | None, cached_only: bool,
                  look_in_key_cache: bool = True) -> env.Envelope | None:
        cmk = cmk or self.cmk_for(wrapped)
        # Keyed by the CMK chosen too (and what changes how it unwraps): an object whose matdesc
        # matches no CMK must fail above even when another object carries the same wrapped key.
        cache_key = (cmk.id, wrapped.wrap_alg, wrapped.legacy, wrapped.wrapped_key, wrapped.wrapped_iv)
        with self._lock:
            hit = self._unwrapped.get(cache_key)
            if hit is not None:
                if hit[0] > time.monotonic():
                    return hit[1] if hit[1].wrapped == wrapped else env.Envelope(hit[1].data_key, hit[1].iv,
                                                                                wrapped, cmk.id)
                del self._unwrapped[cache_key]
        cache = self.key_cache
        secret = getattr(cmk, "cache_secret", None) if cache is not None else None
        found = None
        if cache is not None and secret is not None and look_in_key_cache:
            try:
                found = cache.get(secret, wrapped)
            except sqlite3.Error as e:
                log.info("data-key cache %s: cannot read: %s", cache.path, e)
        if found is not None:
            data_key, iv = found
        elif cached_only:
            return None  # only what a cache holds (cached_envelope)
        else:
            if isinstance(cmk, RsaCmk) and wrapped.wrap_alg.lower() == WRAP_RSA.lower():
                data_key, iv = cmk.unwrap_pair(wrapped.wrapped_key, wrapped.wrapped_iv)
            else:
                data_key = cmk.unwrap(wrapped.wrapped_key, wrapped.wrap_alg)
                iv = cmk.unwrap(wrapped.wrapped_iv, wrapped.wrap_alg)
            if wrapped.legacy:
                iv = env.legacy_counter_iv(iv)
        env.check_unwrapped(data_key, iv)
        if secret is not None and found is None:
            self._cache_put(secret, wrapped, data_key, iv)
        result = env.Envelope(data_key, iv, wrapped, cmk.id)
        with self._lock:
            self._unwrapped[cache_key] = (time.monotonic() + self._CACHE_SECONDS, result)
            if len(self._unwrapped) > self._CACHE_SIZE:
                self._unwrapped.popitem(last=False)
        return result
