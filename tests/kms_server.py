"""A local stand-in for Alibaba Cloud KMS (API version 2016-01-20, RPC style) on 127.0.0.1.

Enough of KMS for client-side encryption (oss-cse-format.md §4.2, §4.5; oss-rest-api.md §7.1):
``GenerateDataKey``, ``Encrypt`` and ``Decrypt``, called the way aliyunsdkcore's ``AcsClient``
calls them (what oss2's ``AliKMSProvider`` and ``ossfuse.kms.KmsCmk`` use):

* ``POST /?Action=…&Version=2016-01-20&Format=JSON&AccessKeyId=…&SignatureMethod=HMAC-SHA1&
  SignatureVersion=1.0&SignatureNonce=…&Timestamp=…&Signature=…`` plus the action's parameters,
  in the query (an ``application/x-www-form-urlencoded`` body is accepted too and signed along).
* Signature VERIFIED (aliyunsdkcore ``auth/composer/rpc_signature_composer.py``):
  ``StringToSign = METHOD + "&%2F&" + pct(sorted "pct(k)=pct(v)" joined by "&")`` with RFC 3986
  percent-encoding, ``Signature = base64(HMAC-SHA1(secret + "&", StringToSign))``. Errors, as
  KMS's API gateway answers (JSON ``{RequestId, HostId, Code, Message, Recommend}``):
  unknown AccessKeyId → 404 ``InvalidAccessKeyId.NotFound``; wrong signature → 400
  ``SignatureDoesNotMatch`` whose Message ends ``server string to sign is:<sts>`` (aliyunsdkcore
  client.py ``_get_server_exception`` turns that into ``InvalidAccessKeySecret`` when the
  strings agree, i.e. when only the secret is wrong); replayed SignatureNonce → 400
  ``SignatureNonceUsed``; Timestamp more than 15 min off → 400 ``InvalidTimeStamp.Expired``;
  STS ``SecurityToken`` not in the configured set → 400 ``InvalidSecurityToken.Mismatch``.
* KMS errors: unknown ``KeyId`` → 404 ``Forbidden.KeyNotFound``; a blob that does not open under
  its key with the given EncryptionContext (wrong context, corrupt, foreign) → 400
  ``InvalidCiphertext``; bad parameters → 400 ``InvalidParameter`` / ``MissingParameter``.
  (Code names of the last two groups are a best guess, not taken from Alibaba's documentation.)
* ``EncryptionContext`` (a JSON object of strings, or empty/absent = ``{}``) is bound to the
  blob: a blob made with one context decrypts only with an equal context (compared as parsed
  maps, as KMS does).
* ``Plaintext`` of ``Encrypt`` is an opaque string and ``Decrypt`` returns exactly that string
  (KMS semantics, which is why oss2 base64-encodes the IV before ``Encrypt``, crypto.py:336-348);
  ``GenerateDataKey`` returns ``Plaintext`` = base64 of ``NumberOfBytes`` random bytes and a
  ``CiphertextBlob`` that ``Decrypt`` turns back into that base64 string.
* ``CiphertextBlob`` layout, modelled on real KMS blobs (whose base64-decoding starts with the
  36-character key UUID followed by base64 text, see tests/data/vectors/
  oss2-deprecated_encrypted_1MB_a_meta_kms.json): ``base64(key_id + base64(nonce12 ‖
  AES-256-GCM(server secret of the key, plaintext, aad = key_id ‖ SHA-256(canonical context))))``.
  Opaque to clients, self-describing for this server, so a wrong key/context fails.
* ``preload(blob, plaintext, key_id)`` makes Decrypt accept a fixed (e.g. real-KMS) blob, for the
  published legacy vectors.

Test knobs: ``mode`` = ``"ok"`` | ``"503"`` (every request → 503 ``ServiceUnavailable``) |
``"reset"`` (connection closed without an answer); ``stop()`` then ``start()`` (same port) to
refuse connections; ``delay`` seconds before each answer; ``counts`` (Counter by Action, failed
requests included) and ``total`` requests; ``requests`` (list of the Actions in order).

Use::

    with KmsTestServer(credentials={"ak": "sk"}) as kms:
        key_id = kms.create_key()          # or kms.create_key("alias/name")
        kms.endpoint                       # "http://127.0.0.1:PORT"

or as its own process: ``python tests/kms_server.py --access-key-id ak --access-key-secret sk
--key KEYID`` prints the endpoint (``http://127.0.0.1:PORT``) on its first line, then one KeyId
per line, and serves until SIGINT/SIGTERM (exit status 0).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http_service import ThreadedService, TrackingHTTPServer  # tests/ is on sys.path (conftest, or run as a script)
from http.server import BaseHTTPRequestHandler
from typing import Dict, Iterable, List, Optional
from urllib.parse import parse_qsl, quote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "2016-01-20"
CLOCK_SKEW = 15 * 60  # seconds


class KmsFault(Exception):
    """An error answer: HTTP status, KMS Code, Message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def pct(s: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes (unreserved ``A-Za-z0-9-_.~`` kept)."""
    return quote(s, safe="-_.~")


def string_to_sign(method: str, params: Dict[str, str]) -> str:
    """The RPC (signature V1.0) string to sign (aliyunsdkcore rpc_signature_composer.py)."""
    canon = "&".join(f"{pct(k)}={pct(v)}" for k, v in sorted(params.items()) if k != "Signature")
    return f"{method.upper()}&{pct('/')}&{pct(canon)}"


def sign(method: str, params: Dict[str, str], secret: str) -> str:
    mac = hmac.new((secret + "&").encode(), string_to_sign(method, params).encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def canonical_context(raw: Optional[str]) -> bytes:
    """``EncryptionContext`` → canonical JSON bytes; '' / absent = ``{}``. KmsFault if invalid."""
    if not raw:
        return b"{}"
    try:
        ctx = json.loads(raw)
    except ValueError:
        raise KmsFault(400, "InvalidParameter", "The specified parameter EncryptionContext is not valid JSON.")
    if not isinstance(ctx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise KmsFault(400, "InvalidParameter", "EncryptionContext must be a JSON object of strings.")
    return json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Key:
    def __init__(self, key_id: str):
        self.key_id = key_id
        self.secret = AESGCM.generate_key(256)
        self.version = str(uuid.uuid4())


class _HTTPServer(TrackingHTTPServer):
    @property
    def kms(self) -> "KmsTestServer":
        return self.service


class _Reset(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (40 ms per call on Linux)
    disable_nagle_algorithm = True
    server_version = "Aliyun KMS test server"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet unless debugging
        if self.server.kms.debug:
            sys.stderr.write("kms: " + (fmt % args) + "\n")

    def handle(self):
        try:
            super().handle()
        except _Reset:
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_connection = True
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError):
            pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        kms: KmsTestServer = self.server.kms
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""  # always drain (keep-alive)
        request_id = str(uuid.uuid4()).upper()
        split = urlsplit(self.path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body and ctype == "application/x-www-form-urlencoded":
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        action = params.get("Action") or self.headers.get("x-acs-action") or "?"
        kms._count(action)
        if kms.delay:
            time.sleep(kms.delay)
        mode = kms.mode
        if mode == "reset":
            raise _Reset()
        try:
            if mode == "503":
                raise KmsFault(503, "ServiceUnavailable",
                               "The request has failed due to a temporary failure of the server.")
            kms._authenticate(self.command, params)
            result = kms._dispatch(action, params)
            result["RequestId"] = request_id
            self._reply(200, result)
        except KmsFault as e:
            self._reply(e.status, {"RequestId": request_id, "HostId": kms.host_id, "Code": e.code,
                                   "Message": e.message,
                                   "Recommend": "https://api.aliyun.com/troubleshoot?q=" + e.code})

    def _reply(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-acs-request-id", doc.get("RequestId", ""))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class KmsTestServer(ThreadedService):
    """In-process KMS stand-in on 127.0.0.1 (module docstring for the protocol).

    :param credentials: access key id → secret accepted; default ``{"test-ak": "test-sk"}``.
    :param security_tokens: ``None`` accepts any STS ``SecurityToken`` (or none); a collection
        requires one of those tokens on every request.
    :param max_skew: seconds a request Timestamp may be off (None: not checked).
    :param port: 0 picks a free port (kept across stop()/start()).
    """

    def __init__(self, credentials: Optional[Dict[str, str]] = None, *, host: str = "127.0.0.1",
                 port: int = 0, security_tokens: Optional[Iterable[str]] = None,
                 max_skew: Optional[int] = CLOCK_SKEW, region: str = "cn-hangzhou", debug: bool = False):
        self.credentials = dict(credentials) if credentials is not None else {"test-ak": "test-sk"}
        self.security_tokens = set(security_tokens) if security_tokens is not None else None
        self.max_skew = max_skew
        self.region = region
        self.host = host
        self.port = port
        self.debug = debug
        self.host_id = f"kms.{region}.aliyuncs.com"
        #: test knobs (module docstring)
        self.mode = "ok"
        self.delay = 0.0
        self.counts: collections.Counter = collections.Counter()
        self.requests: List[str] = []
        self._lock = threading.Lock()
        self._keys: Dict[str, _Key] = {}
        self._aliases: Dict[str, str] = {}
        self._preloaded: Dict[str, tuple] = {}
        self._nonces: Dict[str, float] = {}
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ----------------------------------------------------------------------
    thread_name = "kms-test-server"

    def _new_httpd(self):
        return _HTTPServer((self.host, self.port), _Handler, self)


    # ---- keys and counters --------------------------------------------------------------
    def create_key(self, alias: Optional[str] = None, key_id: Optional[str] = None) -> str:
        """A new CMK; returns its KeyId (a UUID unless given). ``alias`` ("alias/x") also names it."""
        key_id = key_id or str(uuid.uuid4())
        with self._lock:
            self._keys[key_id] = _Key(key_id)
            if alias:
                self._aliases[alias] = key_id
        return key_id

    def delete_key(self, key_id: str) -> None:
        with self._lock:
            self._keys.pop(key_id, None)

    def preload(self, blob: str, plaintext: str, key_id: str) -> None:
        """Make Decrypt(blob) return ``plaintext`` (blobs of the real KMS in published vectors).
        The key must exist (create_key(key_id=…)); the context is not checked for these."""
        with self._lock:
            self._preloaded[blob] = (plaintext, key_id)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.requests.clear()

    def _count(self, action: str) -> None:
        with self._lock:
            self.counts[action] += 1
            self.requests.append(action)

    # ---- request handling -----------------------------------------------------------------
    def _authenticate(self, method: str, params: Dict[str, str]) -> None:
        for name in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp"):
            if not params.get(name):
                raise KmsFault(400, "MissingParameter", f"The input parameter \"{name}\" that is mandatory "
                                                        "for processing this request is not supplied.")
        if params.get("SignatureMethod") != "HMAC-SHA1" or params.get("SignatureVersion") != "1.0":
            raise KmsFault(400, "InvalidParameter", "Only SignatureMethod HMAC-SHA1 / SignatureVersion 1.0 "
                                                    "is supported by this test server.")
        ak = params["AccessKeyId"]
        secret = self.credentials.get(ak)
        if secret is None:
            raise KmsFault(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        sts = string_to_sign(method, params)
        expected = sign(method, params, secret)
        if not hmac.compare_digest(expected, params["Signature"]):
            raise KmsFault(400, "SignatureDoesNotMatch", "Specified signature is not matched with our "
                                                         "calculation. server string to sign is:" + sts)
        if self.max_skew is not None:
            try:
                ts = datetime.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            except ValueError:
                raise KmsFault(400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not "
                                                               "well formatted.")
            if abs(ts.timestamp() - time.time()) > self.max_skew:
                raise KmsFault(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")
        if self.security_tokens is not None and params.get("SecurityToken") not in self.security_tokens:
            raise KmsFault(400, "InvalidSecurityToken.Mismatch", "Specified SecurityToken mismatch with the "
                                                                 "AccessKey.")
        now = time.time()
        with self._lock:
            nonce = params["SignatureNonce"]
            if nonce in self._nonces:
                raise KmsFault(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
            self._nonces[nonce] = now
            if len(self._nonces) > 100000:
                self._nonces = {n: t for n, t in self._nonces.items() if now - t < 2 * CLOCK_SKEW}

    def _dispatch(self, action: str, params: Dict[str, str]) -> dict:
        if params.get("Version") != VERSION:
            raise KmsFault(400, "InvalidVersion", f"Specified parameter Version is not valid (want {VERSION}).")
        handler = {"GenerateDataKey": self._generate_data_key, "Encrypt": self._encrypt,
                   "Decrypt": self._decrypt}.get(action)
        if handler is None:
            raise KmsFault(400, "InvalidAction.NotFound", f"Specified api {action!r} is not found.")
        return handler(params)

    def _key(self, key_id: Optional[str]) -> _Key:
        if not key_id:
            raise KmsFault(400, "MissingParameter", "The input parameter \"KeyId\" that is mandatory for "
                                                    "processing this request is not supplied.")
        with self._lock:
            key = self._keys.get(self._aliases.get(key_id, key_id))
        if key is None:
            raise KmsFault(404, "Forbidden.KeyNotFound", f"The specified Key {key_id} is not found.")
        return key

    def _seal(self, key: _Key, plaintext: str, context: bytes) -> str:
        nonce = os.urandom(12)
        aad = key.key_id.encode() + hashlib.sha256(context).digest()
        sealed = nonce + AESGCM(key.secret).encrypt(nonce, plaintext.encode("utf-8"), aad)
        return base64.b64encode(key.key_id.encode() + base64.b64encode(sealed)).decode()

    def _generate_data_key(self, params: Dict[str, str]) -> dict:
        key = self._key(params.get("KeyId"))
        context = canonical_context(params.get("EncryptionContext"))
        spec = params.get("KeySpec") or "AES_256"
        if spec not in ("AES_256", "AES_128"):
            raise KmsFault(400, "InvalidParameter", "The specified parameter KeySpec is not valid.")
        try:
            n = int(params.get("NumberOfBytes") or (32 if spec == "AES_256" else 16))
        except ValueError:
            n = 0
        if not 1 <= n <= 1024:
            raise KmsFault(400, "InvalidParameter", "The specified parameter NumberOfBytes is not valid.")
        plaintext = base64.b64encode(os.urandom(n)).decode()
        return {"KeyId": key.key_id, "KeyVersionId": key.version, "Plaintext": plaintext,
                "CiphertextBlob": self._seal(key, plaintext, context)}

    def _encrypt(self, params: Dict[str, str]) -> dict:
        key = self._key(params.get("KeyId"))
        context = canonical_context(params.get("EncryptionContext"))
        plaintext = params.get("Plaintext")
        if plaintext is None or plaintext == "":
            raise KmsFault(400, "MissingParameter", "The input parameter \"Plaintext\" that is mandatory for "
                                                    "processing this request is not supplied.")
        if len(plaintext.encode()) > 6144:
            raise KmsFault(400, "InvalidParameter", "The specified parameter Plaintext is too long (> 6 KB).")
        return {"KeyId": key.key_id, "KeyVersionId": key.version,
                "CiphertextBlob": self._seal(key, plaintext, context)}

    def _decrypt(self, params: Dict[str, str]) -> dict:
        blob = params.get("CiphertextBlob")
        if not blob:
            raise KmsFault(400, "MissingParameter", "The input parameter \"CiphertextBlob\" that is mandatory "
                                                    "for processing this request is not supplied.")
        context = canonical_context(params.get("EncryptionContext"))
        with self._lock:
            pre = self._preloaded.get(blob)
        if pre is not None:
            key = self._key(pre[1])
            return {"KeyId": key.key_id, "KeyVersionId": key.version, "Plaintext": pre[0]}
        bad = KmsFault(400, "InvalidCiphertext", "The specified Ciphertext is invalid.")
        try:
            raw = base64.b64decode(blob, validate=True).decode("ascii")
        except (binascii.Error, ValueError):
            raise bad from None
        with self._lock:
            candidates = [k for kid, k in self._keys.items() if raw.startswith(kid)]
        if not candidates:
            if len(raw) > 36 and raw[8] == "-" and raw[13] == "-":  # looks like a (deleted) key's blob
                raise KmsFault(404, "Forbidden.KeyNotFound", f"The specified Key {raw[:36]} is not found.")
            raise bad
        for key in candidates:
            try:
                sealed = base64.b64decode(raw[len(key.key_id):], validate=True)
                aad = key.key_id.encode() + hashlib.sha256(context).digest()
                plaintext = AESGCM(key.secret).decrypt(sealed[:12], sealed[12:], aad).decode("utf-8")
            except (binascii.Error, ValueError, InvalidTag, UnicodeDecodeError):
                continue
            return {"KeyId": key.key_id, "KeyVersionId": key.version, "Plaintext": plaintext}
        raise bad


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Local KMS test server (see module docstring).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--access-key-id", default="test-ak")
    ap.add_argument("--access-key-secret", default="test-sk")
    ap.add_argument("--key", action="append", default=[], help="KeyId to create (repeatable; default: one UUID)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    server = KmsTestServer({args.access_key_id: args.access_key_secret}, host=args.host, port=args.port,
                           debug=args.debug)
    keys = [server.create_key(key_id=k) for k in args.key] or [server.create_key()]
    server.start()
    print(server.endpoint, flush=True)
    for k in keys:
        print(k, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
