"""Alibaba Cloud KMS as a CMK: wrap-alg ``KMS/ALICLOUD`` (oss-cse-format.md §4.2, §4.5).

KMS never hands out its master key: every wrap is an ``Encrypt`` / ``GenerateDataKey`` call and
every unwrap a ``Decrypt`` call (KMS API 2016-01-20, RPC style, HMAC-SHA1 signature,
oss-rest-api.md §7.1), made with aliyunsdkcore's ``AcsClient`` and the aliyunsdkkms request
classes, the same client oss2's ``AliKMSProvider`` uses (oss2 crypto.py:290-405).

KMS semantics the format relies on (§4.2): ``Encrypt(Plaintext=s)`` takes an opaque *string*
and ``Decrypt`` returns that same string; ``GenerateDataKey`` returns ``Plaintext`` = base64 of
the new key and a ``CiphertextBlob`` that decrypts to that base64 string. So both the data key
and the IV travel through KMS as base64 text, and every reader base64-decodes Decrypt's
``Plaintext`` (oss2 crypto.py:321-327; GO1 master_alikms_cipher.go:53-85).

What the object headers hold (``x-oss-meta-client-side-encryption-key`` / ``-start``): header =
base64(stored bytes), as for every wrap-alg (``envelope.WrappedEnvelope.headers``); the stored
bytes (what :meth:`KmsCmk.new_data_key` / :meth:`KmsCmk.wrap` return and :meth:`KmsCmk.unwrap`
takes) depend on ``encoding``:

* ``"oss2"`` (default; oss2 ≥ 2.11 ``AliKMSProvider``, §4.2(b)): stored bytes = the ASCII bytes
  of the ``CiphertextBlob`` string, so the header is base64 applied to a base64 string ("double
  base64"; oss2 models.py:66-67 ``b64encode_as_string(encrypted_key)``; oss2 models.py:108-111
  decodes it back to those bytes and passes them to Decrypt as-is). The data key comes from
  ``GenerateDataKey(KeySpec=AES_256, NumberOfBytes=32)`` (crypto.py:350-365) and the IV from
  ``Encrypt(Plaintext=base64(IV))`` (crypto.py:336-348, 367-380). With a passphrase every call
  carries ``EncryptionContext={"x-passphrase":"<passphrase>"}`` (crypto.py:314).
* ``"raw"`` (GO1 ``MasterAliKmsCipher``, JAVA ``KmsEncryptionMaterials``, the GO2/PY2 KMS samples,
  §4.2(a)): stored bytes = base64-decode(``CiphertextBlob``), so the header *is* the
  ``CiphertextBlob`` string. Those SDKs never send an EncryptionContext: a KmsCmk with a
  passphrase and ``encoding="raw"`` writes objects they cannot read. The data key still comes
  from ``GenerateDataKey`` (its blob decrypts to base64(key), exactly what GO1/JAVA's
  ``Encrypt(base64(CEK))`` blob decrypts to).

Reading accepts both encodings whatever ``encoding`` says. A real KMS blob base64-decodes to the
36-character key UUID (with ``-``, outside the base64 alphabet) followed by base64 text (see
tests/data/vectors/oss2-deprecated_encrypted_1MB_a_meta_kms.json), so stored bytes that are
valid strict base64 are taken as ``oss2`` encoding and anything else as ``raw``; if KMS refuses
the first reading for a reason other than authentication, the other one is tried.

Legacy oss2 2.5–2.10 KMS objects (§4.5, ``x-oss-meta-oss-*`` headers, read by oss2 models.py:84-105
and 279-298): ``envelope.parse_envelope`` returns them with ``legacy=True`` and the keyring's
usual ``unwrap`` + ``envelope.legacy_counter_iv`` works (see :meth:`KmsCmk.unwrap`);
:meth:`KmsCmk.unwrap_legacy` does the same from the two header strings.

Errors: :class:`KmsUnavailable` when KMS cannot be reached (connection refused/reset, timeout,
HTTP 5xx, throttling) after bounded retries with exponential backoff — the keyring maps it to
EIO; :class:`KmsRefused` (an ``envelope.EnvelopeError``) when KMS answers with an error (unknown
key, wrong EncryptionContext, corrupt blob, bad credentials, …).

Thread-safe: ``wrap``/``unwrap`` are called from worker threads. Unwrapped results are cached
for ``cache_seconds`` (default 300) and at most ``cache_size`` entries (default 10000), and
concurrent unwraps of the same blob share one Decrypt call.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import urlsplit

from aliyunsdkcore.acs_exception import error_code as _sdk_error_code
from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException
from aliyunsdkcore.client import AcsClient
from aliyunsdkkms.request.v20160120 import DecryptRequest, EncryptRequest, GenerateDataKeyRequest

from . import envelope as env
from .cmk import Cmk, CmkUnavailable
from .retry import Budget, RetryPolicy, retry_sync

log = logging.getLogger(__name__)

WRAP_KMS = "KMS/ALICLOUD"  # §2, §4.2; oss2 headers.py KMS_ALI_WRAP_ALGORITHM
ENCODINGS = ("oss2", "raw")

_B64 = re.compile(rb"\A[A-Za-z0-9+/]+={0,2}\Z")
# Refusals that say nothing about the blob: trying the other encoding would not help.
_AUTH_CODES = ("InvalidAccessKey", "SignatureDoesNotMatch", "IncompleteSignature", "SignatureNonceUsed",
               "InvalidTimeStamp", "InvalidSecurityToken", "Forbidden.RAM", "Forbidden.NoPermission",
               "Forbidden.AccessKeyDisabled", "MissingSecurityToken", "InvalidApi", "InvalidAction")
_RETRY_CODES = ("Throttling", "ServiceUnavailable", "InternalFailure", "InternalError", "UnknownError",
                "Rejected.Throttling")


class KmsUnavailable(CmkUnavailable):
    """KMS could not be reached or kept answering 5xx/throttling after the configured retries.
    ``endpoint`` names the KMS endpoint, ``reason`` the last failure."""

    temporary = True  # ossfuse.retry.is_temporary: a caller may try again later

    def __init__(self, endpoint: str, reason: str, attempts: int):
        super().__init__(f"KMS at {endpoint} unavailable after {attempts} attempt(s): {reason}")
        self.endpoint, self.reason, self.attempts = endpoint, reason, attempts


class KmsRefused(env.EnvelopeError):
    """KMS answered with an error: ``code`` (e.g. ``Forbidden.KeyNotFound``, ``InvalidCiphertext``,
    ``InvalidAccessKeySecret``), ``status`` (HTTP status, None for client-side errors),
    ``request_id``. Never retried (``temporary`` is False)."""

    temporary = False

    def __init__(self, message: str, code: str | None = None, status: int | None = None,
                 request_id: str | None = None):
        super().__init__(message)
        self.code, self.status, self.request_id = code, status, request_id


class _DropSdkErrorLines(logging.Filter):
    """aliyunsdkcore.client logs one ERROR line per failed HTTP attempt; KmsCmk logs its own
    single line per failed operation instead (oss2's AliKMSProvider in the same process loses
    those lines too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("HttpError occurred") or msg.startswith("ServerException occurred"))


_sdk_log = logging.getLogger("aliyunsdkcore.client")
if not any(isinstance(f, _DropSdkErrorLines) for f in _sdk_log.filters):
    _sdk_log.addFilter(_DropSdkErrorLines())


def _creds_getter(credentials: Any) -> Callable[[], Any]:
    """A callable returning the current credentials (``.access_key_id``, ``.access_key_secret``,
    ``.security_token``) from: an object with ``get_credentials()`` (ossfuse.store.credentials
    providers, oss2 providers), a zero-argument callable, or a credentials object itself."""
    if credentials is None:
        raise ValueError("KMS CMK needs credentials (a provider with get_credentials(), or a callable)")
    if hasattr(credentials, "get_credentials"):
        return credentials.get_credentials
    if callable(credentials):
        return credentials
    if hasattr(credentials, "access_key_id") and hasattr(credentials, "access_key_secret"):
        return lambda: credentials
    raise TypeError(f"unusable KMS credentials object {type(credentials).__name__}")


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, None)
    return default if value is None else value


class _Flight:
    """One Decrypt in progress; threads asking for the same blob wait for its outcome."""

    __slots__ = ("done", "result", "error")

    def __init__(self):
        self.done = threading.Event()
        self.result: str = ""
        self.error: BaseException | None = None


class KmsCmk(Cmk):
    """A KMS customer master key (``wrap_alg = "KMS/ALICLOUD"``).

    :param cfg: ``CmkConfig``-like object: ``id`` (keyring name), ``key_id`` (KMS KeyId, UUID or
        ``alias/…``), ``region`` (e.g. ``cn-hangzhou``), ``endpoint`` (optional: ``http://host:port``
        or ``https://…`` used verbatim, or a bare host name reached over HTTPS; default
        ``kms.<region>.aliyuncs.com``), ``matdesc``, ``encoding`` (``"oss2"`` default or ``"raw"``),
        ``passphrase`` (optional, oss2's ``x-passphrase`` EncryptionContext). Optional tuning
        fields read from ``cfg`` when present (keyword arguments override them): ``cache_seconds``,
        ``cache_size``, ``attempts``, ``backoff``, ``backoff_max``, ``connect_timeout``,
        ``read_timeout``, ``deadline`` and ``credentials``.
    :param credentials: an ``ossfuse.store.credentials.CredentialsProvider`` (or any object with
        ``get_credentials()`` returning ``.access_key_id``/``.access_key_secret``/
        ``.security_token``), a callable returning such an object, or the object itself. Asked
        before every KMS call, so rotated/STS credentials are picked up; a security token is sent
        as the RPC ``SecurityToken`` parameter.
    :param cache_seconds: how long an unwrapped key/IV is kept in memory (0: no cache).
    :param cache_size: at most this many unwrapped entries are kept (least recently used go).
    :param attempts: tries per KMS call when KMS is unreachable/5xx/throttling (≥ 1).
    :param backoff: seconds before the 2nd try, doubled each time up to ``backoff_max``
        (defaults 4 tries, 0.1/0.2/0.4 s: < 1 s of sleeping in total).
    :param connect_timeout, read_timeout: seconds per HTTP request (cut to what is left of
        ``deadline`` for a late attempt).
    :param deadline: seconds one KMS operation (all its attempts and sleeps) may take before
        KmsUnavailable (default 20: a KMS that accepts and never answers costs 20 s, not
        ``attempts × read_timeout``).

    Raises ValueError for a missing ``key_id``/``region`` or an unknown ``encoding``.
    """

    wrap_alg = WRAP_KMS

    def __init__(self, cfg: Any, credentials: Any = None, *, cache_seconds: float | None = None,
                 cache_size: int | None = None, attempts: int | None = None, backoff: float | None = None,
                 backoff_max: float | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, deadline: float | None = None):
        super().__init__(cfg)
        self.key_id: str = getattr(cfg, "key_id", None) or ""
        if not self.key_id:
            raise ValueError(f"KMS CMK {self.id!r}: key_id is required")
        self.region: str = getattr(cfg, "region", None) or ""
        if not self.region:
            raise ValueError(f"KMS CMK {self.id!r}: region is required (e.g. \"cn-hangzhou\")")
        self.encoding: str = _cfg(cfg, "encoding", "oss2")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"KMS CMK {self.id!r}: encoding must be \"oss2\" or \"raw\", not {self.encoding!r}")
        self.passphrase: str | None = getattr(cfg, "passphrase", None) or None
        # oss2 builds '{"x-passphrase":"' + passphrase + '"}' (crypto.py:314); json.dumps gives the
        # same text for any passphrase that needs no JSON escaping, and valid JSON otherwise
        self.context: str | None = (json.dumps({"x-passphrase": self.passphrase}, separators=(",", ":"),
                                               ensure_ascii=False) if self.passphrase else None)
        endpoint = getattr(cfg, "endpoint", None) or f"kms.{self.region}.aliyuncs.com"
        self.endpoint: str = endpoint.rstrip("/")
        host = urlsplit(self.endpoint if "://" in self.endpoint else "https://" + self.endpoint).hostname or ""
        # a loopback endpoint never goes through an HTTP(S)_PROXY from the environment
        self._proxy = {"http": None, "https": None} if host in ("127.0.0.1", "localhost", "::1") else None
        self._get_creds = _creds_getter(credentials if credentials is not None else getattr(cfg, "credentials", None))
        self.cache_seconds = float(_pick(cache_seconds, cfg, "cache_seconds", 300.0))
        self.cache_size = int(_pick(cache_size, cfg, "cache_size", 10000))
        self.attempts = max(1, int(_pick(attempts, cfg, "attempts", 4)))
        self.backoff = float(_pick(backoff, cfg, "backoff", 0.1))
        self.backoff_max = float(_pick(backoff_max, cfg, "backoff_max", 1.0))
        self.connect_timeout = float(_pick(connect_timeout, cfg, "connect_timeout", 3.0))
        self.read_timeout = float(_pick(read_timeout, cfg, "read_timeout", 10.0))
        self.deadline = float(_pick(deadline, cfg, "deadline", 20.0))
        #: the retry policy of every KMS call (``ossfuse.retry``)
        self.policy = RetryPolicy(attempts=self.attempts, deadline=self.deadline, backoff=self.backoff,
                                  backoff_max=self.backoff_max, min_attempt=min(0.5, self.deadline / 4))
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], AcsClient] = {}
        self._cache: OrderedDict[tuple[str, str | None], tuple[float, str]] = OrderedDict()
        self._inflight: dict[tuple[str, str | None], _Flight] = {}
        #: KMS calls made (successful or not), by action name — for tests and status output
        self.calls: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"KmsCmk(id={self.id!r}, key_id={self.key_id!r}, endpoint={self.endpoint!r}, encoding={self.encoding!r})"

    # ---- the Cmk API ----------------------------------------------------------------------
    def new_data_key(self) -> tuple[bytes, bytes]:
        """A new 32-byte data key from ``GenerateDataKey(KeySpec=AES_256, NumberOfBytes=32)``
        (oss2 crypto.py:350-365) → ``(plaintext_key, stored_bytes)``; ``stored_bytes`` is what
        goes base64-encoded into ``…-encryption-key`` (module docstring, per ``encoding``).
        The keyring should use this instead of ``envelope.new_data_key()`` + ``wrap()``.
        Raises KmsUnavailable or KmsRefused."""
        params = {"KeyId": self.key_id, "KeySpec": "AES_256", "NumberOfBytes": "32"}
        resp = self._call("GenerateDataKey", params)
        plain_b64, blob = resp.get("Plaintext") or "", resp.get("CiphertextBlob")
        try:
            key = base64.b64decode(plain_b64, validate=True)
        except (binascii.Error, ValueError, TypeError):
            key = b""
        if len(key) != env.DATA_KEY_SIZE or not isinstance(blob, str) or not blob:
            raise KmsRefused(f"KMS {self.endpoint}: malformed GenerateDataKey answer for key {self.key_id}")
        self._remember(blob, plain_b64)
        return key, self._store(blob)

    def wrap(self, secret: bytes) -> bytes:
        """``Encrypt(Plaintext=base64(secret))`` → the stored bytes for the header (module
        docstring). Used for the IV (oss2 crypto.py:336-348, GO1/JAVA for key and IV); any
        secret ≤ 4 KiB works. Raises KmsUnavailable or KmsRefused."""
        plain_b64 = base64.b64encode(secret).decode()
        resp = self._call("Encrypt", {"KeyId": self.key_id, "Plaintext": plain_b64})
        blob = resp.get("CiphertextBlob")
        if not isinstance(blob, str) or not blob:
            raise KmsRefused(f"KMS {self.endpoint}: malformed Encrypt answer for key {self.key_id}")
        self._remember(blob, plain_b64)
        return self._store(blob)

    def unwrap(self, blob: bytes, wrap_alg: str = WRAP_KMS) -> bytes:
        """Stored bytes (base64-decoded header) of either encoding → the secret (data key or
        IV): ``base64-decode(Decrypt(CiphertextBlob).Plaintext)``. ``wrap_alg`` (the object's) is
        accepted for the ``Cmk`` interface and must be ``KMS/ALICLOUD``.

        Legacy oss2 2.5–2.10 objects (§4.5) as ``envelope.parse_envelope`` returns them
        (``legacy=True``, stored bytes = the header's CiphertextBlob text, which reads as the
        oss2 encoding): the key decrypts to base64 like a current one; the start decrypts to a
        short decimal string ("1".."10", oss2 2.5 ``random_counter``) that is never valid base64,
        so a Plaintext that is not base64 but all decimal digits is returned as its ASCII bytes
        for ``envelope.legacy_counter_iv`` (a current-format reader then fails the 16-byte IV
        check in ``envelope.check_unwrapped``).

        Raises KmsRefused (an EnvelopeError) when KMS refuses the blob (wrong key/passphrase,
        corrupt, bad credentials) or its plaintext is neither, KmsUnavailable when KMS is
        unreachable."""
        if wrap_alg.lower() != WRAP_KMS.lower():
            raise env.EnvelopeError(f"KMS CMK {self.id!r} cannot unwrap wrap-alg {wrap_alg!r}")
        plain = self._decrypt_stored(blob)
        try:
            return base64.b64decode(plain, validate=True)
        except (binascii.Error, ValueError):
            if plain.isascii() and plain.strip().isdigit():
                return plain.strip().encode("ascii")  # legacy start counter
            raise KmsRefused(f"KMS CMK {self.id!r}: decrypted value is not base64 "
                             "(not an OSS client-side-encryption key/IV)") from None

    def unwrap_legacy(self, key_header: str, start_header: str) -> tuple[bytes, bytes]:
        """Legacy oss2 2.5–2.10 KMS envelope (§4.5) straight from the ``x-oss-meta-oss-crypto-key``
        and ``…-oss-crypto-start`` header values, each the raw ``CiphertextBlob`` string (no extra
        base64; oss2 models.py:94-96). Returns ``(data_key, iv)`` where ``iv`` is the 16-byte
        big-endian initial counter block = the decimal integer the start blob decrypts to (oss2
        reads it with ``int()``, models.py:279-285), so ``envelope.ctr_crypt(data_key, iv,
        offset, data)`` decrypts the body (legacy bodies are AES-256-CTR despite their
        ``AES/GCM/NoPadding`` label). Equivalent to ``unwrap`` of the ``parse_envelope`` result
        plus ``envelope.legacy_counter_iv``. Raises EnvelopeError / KmsRefused / KmsUnavailable."""
        key = self.unwrap(key_header.strip().encode("ascii"))
        iv = env.legacy_counter_iv(self.decrypt_blob(start_header.strip()).strip().encode("ascii"))
        env.check_unwrapped(key, iv)
        return key, iv

    def decrypt_blob(self, ciphertext_blob: str) -> str:
        """``Decrypt(CiphertextBlob)`` with this CMK's EncryptionContext → ``Plaintext`` string,
        through the cache. Raises KmsRefused / KmsUnavailable."""
        return self._decrypt_cached(ciphertext_blob)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ---- encodings ------------------------------------------------------------------------
    def _store(self, blob: str) -> bytes:
        if self.encoding == "oss2":
            return blob.encode("ascii")
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise KmsRefused(f"KMS {self.endpoint}: CiphertextBlob is not base64; use encoding \"oss2\"") from None

    def _decrypt_stored(self, stored: bytes) -> str:
        if not stored:
            raise KmsRefused(f"KMS CMK {self.id!r}: empty wrapped key/IV")
        candidates = []
        if len(stored) % 4 == 0 and _B64.match(stored):
            candidates.append(stored.decode("ascii"))  # oss2 encoding: the CiphertextBlob itself
        candidates.append(base64.b64encode(stored).decode("ascii"))  # raw encoding
        first: KmsRefused | None = None
        for blob in candidates:
            try:
                return self._decrypt_cached(blob)
            except KmsRefused as e:
                if e.code and e.code.startswith(_AUTH_CODES):
                    raise
                first = first or e
        assert first is not None
        raise first

    # ---- cache ----------------------------------------------------------------------------
    def _remember(self, blob: str, plaintext: str) -> None:
        if self.cache_seconds <= 0 or self.cache_size <= 0:
            return
        with self._lock:
            self._cache[(blob, self.context)] = (time.monotonic() + self.cache_seconds, plaintext)
            self._cache.move_to_end((blob, self.context))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _decrypt_cached(self, blob: str) -> str:
        ck = (blob, self.context)
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                if hit[0] > time.monotonic():
                    self._cache.move_to_end(ck)
                    return hit[1]
                del self._cache[ck]
            flight = self._inflight.get(ck)
            leader = flight is None
            if leader:
                flight = self._inflight[ck] = _Flight()
        assert flight is not None
        if not leader:
            # another thread is decrypting this blob: share its answer, success or failure
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            plain = self._call("Decrypt", {"CiphertextBlob": blob}).get("Plaintext")
            if not isinstance(plain, str):
                raise KmsRefused(f"KMS {self.endpoint}: malformed Decrypt answer")
            self._remember(blob, plain)
            flight.result = plain
            return plain
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._inflight[ck]
            flight.done.set()

    # ---- KMS calls ------------------------------------------------------------------------
    def _client(self, ak: str, sk: str) -> AcsClient:
        with self._lock:
            client = self._clients.get((ak, sk))
            if client is None:
                client = AcsClient(ak, sk, self.region, auto_retry=False, connect_timeout=self.connect_timeout,
                                   timeout=self.read_timeout, pool_size=8, proxy=self._proxy)
                if len(self._clients) > 4:  # rotated credentials: forget old clients
                    self._clients.clear()
                self._clients[(ak, sk)] = client
            return client

    def _request(self, action: str, params: dict[str, str], token: str | None):
        req = {"GenerateDataKey": GenerateDataKeyRequest.GenerateDataKeyRequest,
               "Encrypt": EncryptRequest.EncryptRequest,
               "Decrypt": DecryptRequest.DecryptRequest}[action]()
        req.set_accept_format("JSON")
        req.set_method("POST")
        req.set_endpoint(self.endpoint)  # never resolved through the location service
        for k, v in params.items():
            req.add_query_param(k, v)
        if self.context is not None:
            req.add_query_param("EncryptionContext", self.context)
        if token:
            req.add_query_param("SecurityToken", token)  # what aliyunsdkcore's StsTokenSigner does for RPC
        return req

    def _call(self, action: str, params: dict[str, str]) -> dict:
        """One KMS action under the shared retry policy (``ossfuse.retry``: ``attempts``,
        backoff from ``backoff`` to ``backoff_max`` with jitter, all within ``deadline``
        seconds; each attempt's timeouts are cut to what is left). Returns the parsed JSON
        answer. Raises KmsRefused at the first refusal, KmsUnavailable when the policy gives up.

        Runs in the caller's worker thread (the keyring calls CMKs from threads), so the
        backoff sleeps there too."""
        budgets: list[Budget] = []

        def attempt(budget: Budget) -> dict:
            if not budgets:
                budgets.append(budget)
            with self._lock:
                self.calls[action] = self.calls.get(action, 0) + 1
            try:
                creds = self._get_creds()
                client = self._client(creds.access_key_id, creds.access_key_secret)
                req = self._request(action, params, getattr(creds, "security_token", None) or None)
                req.set_connect_timeout(budget.timeout(self.connect_timeout))
                req.set_read_timeout(budget.timeout(self.read_timeout))
                body = client.do_action_with_exception(req)
            except ServerException as e:
                status, code = e.get_http_status(), e.get_error_code() or ""
                if (status is not None and status >= 500) or status == 429 or code.startswith(_RETRY_CODES):
                    raise _KmsTemporary(f"HTTP {status} {code}: {e.get_error_msg()}") from None
                raise KmsRefused(f"KMS {self.endpoint} refused {action} for CMK {self.id!r} (key "
                                 f"{self.key_id}): {code}: {e.get_error_msg()}", code, status,
                                 e.get_request_id()) from None
            except ClientException as e:
                if e.get_error_code() != _sdk_error_code.SDK_HTTP_ERROR:
                    raise KmsRefused(f"KMS client error for CMK {self.id!r}: {e.get_error_code()}: "
                                     f"{e.get_error_msg()}", e.get_error_code()) from None
                raise _KmsTemporary(_short(e.get_error_msg())) from None
            try:
                return json.loads(body)
            except (ValueError, TypeError):
                raise KmsRefused(f"KMS {self.endpoint}: {action} answer is not JSON") from None

        def on_retry(err: BaseException, n: int, delay: float) -> None:
            log.info("KMS %s %s: attempt %d/%d failed: %s; retrying in %.2fs", self.endpoint, action, n,
                     self.policy.attempts, err, delay)

        try:
            return retry_sync(self.policy, attempt, on_retry=on_retry)
        except _KmsTemporary as e:
            budget = budgets[0]
            log.error("KMS %s unavailable: %s failed %d time(s) in %.1f s, last: %s", self.endpoint, action,
                      budget.attempt, budget.elapsed(), e)
            raise KmsUnavailable(self.endpoint, f"{action}: {e}", budget.attempt) from None


class _KmsTemporary(Exception):
    """One KMS attempt failed in a way a retry may fix (unreachable, 5xx, throttling)."""

    temporary = True


def _pick(explicit: Any, cfg: Any, name: str, default: Any) -> Any:
    return explicit if explicit is not None else _cfg(cfg, name, default)


def _short(msg: str) -> str:
    """The useful tail of a requests/urllib3 connection error message."""
    m = re.search(r"\[Errno -?\d+\][^'\")]*|timed out|Connection aborted[^'\")]*|RemoteDisconnected[^'\")]*", msg)
    return m.group(0).strip() if m else msg[:200]
