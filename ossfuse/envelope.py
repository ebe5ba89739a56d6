"""The OSS client-side-encryption envelope: data key + IV, AES-256-CTR, metadata headers.

Format facts come from ../shared/spec/oss-cse-format.md (cited as §N), itself read from the SDKs:
- a fresh 32-byte data key and a 16-byte IV whose bytes 8–11 are zero (§3.3, oss2 utils.py
  ``random_iv``) per object version;
- content is AES-256-CTR with a 128-bit big-endian counter starting at the IV (§3.1, §3.5);
  byte offset ``o`` is encrypted with counter ``IV + o // 16`` (§3.6, oss2's full 128-bit add),
  which lets any byte range be decrypted on its own (oss2 CryptoBucket's ranged GET, §7);
- data key and IV are each wrapped by the CMK and stored base64 in
  ``x-oss-meta-client-side-encryption-key`` / ``-start`` with ``-cek-alg``, ``-wrap-alg`` and an
  optional flat-JSON ``-matdesc`` (§2, writer checklist §11).

This module does no I/O and knows nothing of CMK types: wrapping is the keyring's job.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CEK_ALG = "AES/CTR/NoPadding"
DATA_KEY_SIZE = 32  # bytes, AES-256
IV_SIZE = 16  # bytes, one AES block
BLOCK = 16  # AES block size: counter advances once per 16 bytes

# User-metadata names (without the "x-oss-meta-" prefix), §2.
H_KEY = "client-side-encryption-key"
H_START = "client-side-encryption-start"
H_CEK_ALG = "client-side-encryption-cek-alg"
H_WRAP_ALG = "client-side-encryption-wrap-alg"
H_MATDESC = "client-side-encryption-matdesc"
H_PLAIN_LEN = "client-side-encryption-unencrypted-content-length"
H_DATA_SIZE = "client-side-encryption-data-size"
H_PART_SIZE = "client-side-encryption-part-size"
CSE_PREFIX = "client-side-encryption-"
# Wrap algorithms the SDKs write (§4): RSA PKCS#1 v1.5, Alibaba Cloud KMS, oss2 LocalRsaProvider.
WRAP_RSA_OAEP = "RSA/NONE/OAEPWithSHA-1AndMGF1Padding"
KNOWN_WRAP_ALGS = ("RSA/NONE/PKCS1Padding", "KMS/ALICLOUD", WRAP_RSA_OAEP)

# The oss2 2.5–2.10 header set (§4.5): other names, wrap-alg "rsa" (OAEP) or "kms", the data
# mislabelled AES/GCM although it is AES-CTR, and a "start" that is a decimal counter value.
LEGACY_KEY = "oss-crypto-key"
LEGACY_START = "oss-crypto-start"
LEGACY_CEK_ALG = "oss-cek-alg"
LEGACY_WRAP_ALG = "oss-wrap-alg"
_LEGACY_WRAP = {"rsa": WRAP_RSA_OAEP, "kms": "KMS/ALICLOUD"}
_MARKERS = (H_KEY, H_START, H_CEK_ALG, H_WRAP_ALG)


class EnvelopeError(Exception):
    """The object's envelope is missing a header, corrupt, or of an unsupported algorithm."""


def new_data_key() -> bytes:
    """32 random bytes from the OS CSPRNG."""
    return os.urandom(DATA_KEY_SIZE)


def new_iv() -> bytes:
    """16 random bytes with bytes 8–11 zero, as every SDK writes it (§3.3): keeps the low-64-bit
    counter seek of the Go/C++/Java SDKs equal to the 128-bit add for any object size."""
    iv = bytearray(os.urandom(IV_SIZE))
    iv[8:12] = b"\0\0\0\0"
    return bytes(iv)


def counter_at(iv: bytes, offset: int) -> bytes:
    """The counter block that encrypts byte ``offset`` (rounded down to its 16-byte block):
    IV + offset // 16 as a 128-bit big-endian integer, wrapping modulo 2**128 (§3.5, §3.6)."""
    value = (int.from_bytes(iv, "big") + offset // BLOCK) % (1 << 128)
    return value.to_bytes(IV_SIZE, "big")


def ctr_crypt(data_key: bytes, iv: bytes, offset: int, data: bytes | memoryview) -> bytes:
    """Encrypt or decrypt (CTR is symmetric) ``data`` that starts at byte ``offset`` of the
    object; ``offset`` need not be block-aligned."""
    skip = offset % BLOCK
    ctx = Cipher(algorithms.AES(data_key), modes.CTR(counter_at(iv, offset))).encryptor()
    if skip:
        ctx.update(bytes(skip))  # advance the keystream to the unaligned start
    return ctx.update(data) + ctx.finalize()


@dataclass(frozen=True)
class WrappedEnvelope:
    """The envelope as an object carries it: wrapped (not usable) data key and IV.

    ``wrapped_key``/``wrapped_iv`` are the base64-decoded header values; ``matdesc`` is the
    parsed JSON map (None when absent) and ``matdesc_raw`` the header text as stored.
    """

    wrapped_key: bytes
    wrapped_iv: bytes
    wrap_alg: str
    matdesc: dict[str, str] | None
    matdesc_raw: str | None
    legacy: bool = False  # oss2 2.5–2.10 format: the unwrapped "start" is a decimal counter

    def headers(self) -> dict[str, str]:
        """The ``client-side-encryption-*`` user metadata, exactly as oss2 writes it (§2)."""
        h = {
            H_KEY: base64.b64encode(self.wrapped_key).decode(),
            H_START: base64.b64encode(self.wrapped_iv).decode(),
            H_CEK_ALG: CEK_ALG,
            H_WRAP_ALG: self.wrap_alg,
        }
        if self.matdesc_raw is not None:
            h[H_MATDESC] = self.matdesc_raw
        return h


@dataclass(frozen=True)
class Envelope:
    """An unwrapped envelope: the data key and IV of one object version, plus how they are
    stored (``wrapped``). ``cmk_id`` names the keyring entry that wraps them."""

    data_key: bytes
    iv: bytes
    wrapped: WrappedEnvelope
    cmk_id: str

    def crypt(self, offset: int, data: bytes | memoryview) -> bytes:
        """AES-256-CTR of ``data`` located at byte ``offset`` of the object."""
        return ctr_crypt(self.data_key, self.iv, offset, data)


def _go_json_string(text: str) -> str:
    r"""``text`` as a JSON string literal the way Go's ``encoding/json`` (Go ≤ 1.21, the Go 1.19
    of the SDK clients in ../shared/tools) writes it with its default HTML escaping: ``"``, ``\``,
    ``\n``, ``\r``, ``\t`` as short escapes; other control characters, ``<``, ``>``, ``&`` as
    ``\u00XX`` with lower-case hex (Go 1.22+ writes ``\b``/``\f`` short; a matdesc with those
    is not worth a second form). Checked byte for byte against the Go V1 and V2 SDKs'
    own headers (tests/test_interop_sdk.py). Where Go would send raw bytes that an HTTP header
    cannot carry (DEL, non-ASCII: Go's SDKs fail with a signature mismatch or "invalid header
    field value"), this writes ``\uXXXX`` (UTF-16 surrogate pairs above U+FFFF, as JSON does)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x20 or code == 0x7F or ch in "<>&":
            out.append(f"\\u{code:04x}")
        elif code < 0x80:
            out.append(ch)
        elif 0xD800 <= code < 0xE000:  # a lone surrogate: Go replaces invalid UTF-8 by U+FFFD
            out.append("\\ufffd")
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def encode_matdesc(matdesc: dict[str, str] | None) -> str | None:
    r"""matdesc header text in the form of Go's ``json.Marshal`` of a ``map[string]string``:
    keys sorted (byte order of their UTF-8, which is code-point order), no spaces, Go's string
    escaping (``_go_json_string``); None when there is no description (the header is then
    omitted). This is the form both Go SDKs write (the C++ SDK's too, unless a value holds
    ``<>&`` or non-ASCII; §5) and the one Go V1 and Go V2 match by text (Go V1 compares the header with its own ``json.Marshal`` output, V2 looks its
    extra master ciphers up by it; issue 15). oss2, Java and C++ parse the JSON and read any form.
    Example: ``{"team": "a<b", "env": "x"}`` → ``{"env":"x","team":"a\u003cb"}``."""
    if not matdesc:
        return None
    items = sorted(matdesc.items())
    return "{" + ",".join(_go_json_string(k) + ":" + _go_json_string(v) for k, v in items) + "}"


def parse_matdesc(raw: str) -> dict[str, str]:
    """The flat string map of matdesc text ``raw``; raises EnvelopeError if it is not JSON or not
    an object of string values (§5: a nested or non-string value breaks Go V1)."""
    try:
        matdesc = json.loads(raw)
    except ValueError:
        raise EnvelopeError(f"matdesc is not JSON: {raw!r}") from None
    if not isinstance(matdesc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in matdesc.items()
    ):
        raise EnvelopeError(f"matdesc is not a flat string map: {raw!r}")
    return matdesc


def length_mismatch(metadata: dict[str, str], size: int) -> str | None:
    """Why an object of ``size`` bytes (ciphertext: AES-CTR keeps the length) with user
    ``metadata`` is not whole: it differs from the plaintext length the envelope states
    (``client-side-encryption-unencrypted-content-length``, written by every SDK); None when
    it agrees or states none. A stated length that is no decimal number (every SDK writes
    one) is a damaged envelope too (a trial: ``abc`` and ``-1`` read on without a word)."""
    plain_len = metadata.get(H_PLAIN_LEN)
    if plain_len is None:
        return None
    if not plain_len.strip().isdigit():
        return f"its envelope's plaintext length {plain_len[:40]!r} is not a length (decimal digits)"
    if int(plain_len) != size:
        return f"object has {size} bytes, its envelope says {plain_len.strip()}"
    return None


def _wrapping_of(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """The wrapped data key and IV of ``metadata`` as stored (current or legacy headers; None
    where absent)."""
    return (metadata.get(H_KEY, metadata.get(LEGACY_KEY)), metadata.get(H_START, metadata.get(LEGACY_START)))


def rewrapped(before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether metadata ``after`` carries an envelope whose wrapped data key or IV differs from
    ``before``'s. A re-wrap (``ossfuse rekey``, another SDK's key rotation) changes them and
    nothing else that names the content: the ciphertext stays, and with it OSS's ETag (the MD5
    of the body), so a version is the ETag *and* this pair. Every wrap differs (RSA PKCS#1 v1.5
    and OAEP padding are random, KMS ciphertext blobs too). ``after`` without an envelope is
    no re-wrap (OSS refuses a copy that strips one)."""
    return is_encrypted(after) and _wrapping_of(before) != _wrapping_of(after)


def is_encrypted(metadata: dict[str, str]) -> bool:
    """True if any envelope header is present, current or legacy (oss2's rule, oss2
    models.py:84-105,135-139, §2, §4.5)."""
    return any(name in metadata for name in _MARKERS) or LEGACY_KEY in metadata


def _parse_legacy(metadata: dict[str, str]) -> WrappedEnvelope:
    """oss2 2.5–2.10 headers (§4.5), read as oss2 ≥ 2.11 does (oss2 models.py:84-105): "rsa"
    means RSA-OAEP with base64 key/start; "kms" means the headers are KMS CiphertextBlob strings."""
    missing = [n for n in (LEGACY_KEY, LEGACY_START, LEGACY_WRAP_ALG) if not metadata.get(n)]
    if missing:
        raise EnvelopeError("legacy envelope header missing: x-oss-meta-" + ", x-oss-meta-".join(missing))
    cek_alg = metadata.get(LEGACY_CEK_ALG, "AES/GCM/NoPadding")
    if cek_alg not in ("AES/GCM/NoPadding", CEK_ALG):  # GCM was a mislabel for CTR
        raise EnvelopeError(f"unsupported legacy cek-alg {cek_alg!r}")
    wrap = metadata[LEGACY_WRAP_ALG]
    if wrap not in _LEGACY_WRAP:
        raise EnvelopeError(f"unknown legacy wrap-alg {wrap!r}")
    if wrap == "kms":
        key, start = metadata[LEGACY_KEY].encode(), metadata[LEGACY_START].encode()
    else:
        key, start = (_b64_header(metadata, h, "legacy") for h in (LEGACY_KEY, LEGACY_START))
    return WrappedEnvelope(key, start, _LEGACY_WRAP[wrap], None, None, legacy=True)


def legacy_counter_iv(start: bytes) -> bytes:
    """The 16-byte counter block of a legacy object from its unwrapped "start": a decimal
    integer that is the whole initial counter (§4.5; oss2 parses it with int())."""
    try:
        value = int(start.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise EnvelopeError("legacy start counter is not a decimal number") from None
    if not 0 <= value < 1 << 128:
        raise EnvelopeError("legacy start counter out of range")
    return value.to_bytes(IV_SIZE, "big")


def _b64_header(metadata: dict[str, str], name: str, kind: str) -> bytes:
    """The bytes of base64 header ``name`` of an envelope (``kind``: "envelope" or "legacy",
    for the message). Raises EnvelopeError naming the header (a trial: "key/start" did not
    say which)."""
    try:
        return base64.b64decode(metadata[name], validate=True)
    except (binascii.Error, ValueError) as e:
        raise EnvelopeError(f"{kind} header x-oss-meta-{name} is not base64: {e}") from None


def parse_envelope(metadata: dict[str, str]) -> WrappedEnvelope:
    """Read the envelope from user metadata (names lower-case, without ``x-oss-meta-``).

    Raises EnvelopeError for a missing required header, bad base64, an unknown cek-alg or
    wrap-alg, or a
    matdesc that is not a flat JSON object of strings (§2 reader rules, §11 reader checklist).
    """
    if LEGACY_KEY in metadata and not any(name in metadata for name in _MARKERS):
        return _parse_legacy(metadata)
    missing = [name for name in _MARKERS if not metadata.get(name)]
    if missing:
        raise EnvelopeError("envelope header missing: x-oss-meta-" + ", x-oss-meta-".join(missing))
    cek_alg = metadata[H_CEK_ALG]
    if cek_alg != CEK_ALG:
        raise EnvelopeError(f"unsupported cek-alg {cek_alg!r} (only {CEK_ALG})")
    wrap_alg = metadata[H_WRAP_ALG]
    if wrap_alg.lower() not in (a.lower() for a in KNOWN_WRAP_ALGS):
        raise EnvelopeError(f"unknown wrap-alg {wrap_alg!r}")
    wrapped_key, wrapped_iv = (_b64_header(metadata, h, "envelope") for h in (H_KEY, H_START))
    raw = metadata.get(H_MATDESC) or None
    matdesc = parse_matdesc(raw) if raw is not None else None
    return WrappedEnvelope(wrapped_key, wrapped_iv, wrap_alg, matdesc, raw)


def check_unwrapped(data_key: bytes, iv: bytes) -> None:
    """Raise EnvelopeError unless the unwrapped data key is 32 bytes and the IV 16 (§11)."""
    if len(data_key) != DATA_KEY_SIZE or len(iv) != IV_SIZE:
        raise EnvelopeError(
            f"unwrapped data key/IV have {len(data_key)}/{len(iv)} bytes, expected 32/16")
