"""ossfuse.kms.KmsCmk against tests/kms_server.py (a local KMS with verified RPC signatures),
and interop with oss2's own AliKMSProvider / CryptoBucket pointed at the same local KMS.
Nothing here talks to an Alibaba host: every client gets the 127.0.0.1 endpoint."""
from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import oss2
import pytest
from oss2.crypto import AliKMSProvider

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402
from kms_server import KmsTestServer  # noqa: E402
from oss_server import OssTestServer  # noqa: E402

from ossfuse import envelope as env  # noqa: E402
from ossfuse import keyring  # noqa: E402
from ossfuse.kms import KmsCmk, KmsRefused, KmsUnavailable  # noqa: E402
from ossfuse.store.credentials import Credentials, StaticCredentialsProvider  # noqa: E402

pytestmark = pytest.mark.timeout(60)

AK, SK = "kms-test-ak", "kms-test-sk"
REGION = "cn-hangzhou"
BUCKET = conftest.BUCKET  # the mounts' configs name it (conftest.Mount)
VECTORS = os.path.join(os.path.dirname(__file__), "data", "vectors")
META_PREFIX = "x-oss-meta-"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def kms():
    srv = KmsTestServer({AK: SK, "other-ak": "other-sk"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def key_id(kms):
    return kms.create_key()


def make_cmk(kms, key_id, *, creds=None, encoding=None, passphrase=None, matdesc=None, **kw) -> KmsCmk:
    cfg = SimpleNamespace(id="kms1", type="kms", key_id=key_id, region=REGION, endpoint=kms.endpoint,
                          matdesc=matdesc, encoding=encoding, passphrase=passphrase)
    kw.setdefault("attempts", 2)
    kw.setdefault("backoff", 0.01)
    return KmsCmk(cfg, creds or StaticCredentialsProvider(AK, SK), **kw)


def make_provider(kms, key_id, passphrase=None, secret=SK) -> AliKMSProvider:
    """oss2's own KMS provider, pointed at the local KMS (oss-rest-api.md §7.1)."""
    prov = AliKMSProvider(AK, secret, REGION, key_id, passphrase=passphrase)
    prov.kms_client.add_endpoint(REGION, "Kms", kms.endpoint)
    prov.kms_client.set_auto_retry(False)
    return prov


def user_meta(headers) -> dict[str, str]:
    """HTTP-style headers → ossfuse's user-metadata dict (lower-case, no x-oss-meta- prefix)."""
    return {k.lower()[len(META_PREFIX):]: v for k, v in dict(headers).items() if k.lower().startswith(META_PREFIX)}


def new_envelope(cmk: KmsCmk) -> tuple[bytes, bytes, env.WrappedEnvelope]:
    """What the keyring does for a new object with a KMS CMK: KMS data key + wrapped IV."""
    key, wrapped_key = cmk.new_data_key()
    iv = env.new_iv()
    return key, iv, env.WrappedEnvelope(wrapped_key, cmk.wrap(iv), cmk.wrap_alg, cmk.matdesc, cmk.matdesc_raw)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("encoding", ["oss2", "raw"])
@pytest.mark.parametrize("passphrase", [None, "s3cret pass"])
def test_round_trip_and_stored_bytes(kms, key_id, encoding, passphrase):
    writer = make_cmk(kms, key_id, encoding=encoding, passphrase=passphrase)
    key, iv, wrapped = new_envelope(writer)
    assert len(key) == 32 and len(iv) == 16
    assert kms.counts == {"GenerateDataKey": 1, "Encrypt": 1}
    # header = base64(stored); oss2 stores the CiphertextBlob text, raw its decoded bytes (§4.2)
    for stored in (wrapped.wrapped_key, wrapped.wrapped_iv):
        if encoding == "oss2":
            blob = stored.decode("ascii")
            assert base64.b64decode(blob).startswith(key_id.encode())
        else:
            assert stored.startswith(key_id.encode())  # decoded blob: key UUID + base64 text
            assert base64.b64decode(wrapped.headers()[env.H_KEY]) == wrapped.wrapped_key
    assert wrapped.headers()[env.H_WRAP_ALG] == "KMS/ALICLOUD"
    # a fresh reader (nothing cached), configured with the *other* encoding: reads both
    reader = make_cmk(kms, key_id, encoding="raw" if encoding == "oss2" else "oss2", passphrase=passphrase)
    parsed = env.parse_envelope(wrapped.headers())
    assert reader.unwrap(parsed.wrapped_key) == key
    assert reader.unwrap(parsed.wrapped_iv) == iv
    assert kms.counts["Decrypt"] == 2  # one per blob, no second guess needed
    # the writer remembers what it wrapped: reading back its own object needs no KMS call
    assert writer.unwrap(parsed.wrapped_key) == key and writer.unwrap(parsed.wrapped_iv) == iv
    assert kms.counts["Decrypt"] == 2


def test_ambiguous_raw_blob_falls_back_to_the_other_encoding(kms):
    # a KeyId without '-' makes a raw-stored blob valid base64 text: the oss2 guess is refused
    # (InvalidCiphertext) and the raw reading is tried next
    kid = kms.create_key(key_id="testkey1")
    key, wrapped = make_cmk(kms, kid, encoding="raw").new_data_key()
    assert len(wrapped) % 4 == 0
    base64.b64decode(wrapped, validate=True)  # ambiguous indeed
    assert make_cmk(kms, kid).unwrap(wrapped) == key
    assert kms.counts["Decrypt"] == 2


def test_alias_key_id(kms):
    kid = kms.create_key(alias="alias/ossfuse")
    cmk = make_cmk(kms, "alias/ossfuse")
    key, wrapped = cmk.new_data_key()
    assert base64.b64decode(wrapped).startswith(kid.encode())
    assert make_cmk(kms, "alias/ossfuse").unwrap(wrapped) == key


# ----------------------------------------------------------------------------- refusals
def test_passphrase_must_match(kms, key_id):
    key, wrapped = make_cmk(kms, key_id, passphrase="right").new_data_key()
    for other in ("wrong", None):
        with pytest.raises(KmsRefused) as ei:
            make_cmk(kms, key_id, passphrase=other).unwrap(wrapped)
        assert isinstance(ei.value, env.EnvelopeError)
        assert ei.value.code == "InvalidCiphertext"
        assert kms.endpoint in str(ei.value) and "kms1" in str(ei.value)
    assert make_cmk(kms, key_id, passphrase="right").unwrap(wrapped) == key


def test_unknown_or_deleted_key(kms, key_id):
    with pytest.raises(KmsRefused) as ei:
        make_cmk(kms, "no-such-key").new_data_key()
    assert ei.value.code == "Forbidden.KeyNotFound" and ei.value.status == 404
    assert "no-such-key" in str(ei.value)
    _, wrapped = make_cmk(kms, key_id).new_data_key()
    kms.delete_key(key_id)
    with pytest.raises(KmsRefused) as ei:
        make_cmk(kms, key_id).unwrap(wrapped)
    assert ei.value.code == "Forbidden.KeyNotFound"
    with pytest.raises(env.EnvelopeError):
        make_cmk(kms, key_id).unwrap(b"\x00garbage")


def test_signature_is_verified(kms, key_id):
    bad = make_cmk(kms, key_id, creds=StaticCredentialsProvider(AK, "not-the-secret"))
    with pytest.raises(KmsRefused) as ei:
        bad.new_data_key()
    # the server answers 400 SignatureDoesNotMatch with its string to sign; aliyunsdkcore
    # recognises "same string, other secret" and reports InvalidAccessKeySecret
    assert ei.value.status == 400 and ei.value.code == "InvalidAccessKeySecret"
    assert "AccessKeySecret is incorrect" in str(ei.value)
    assert kms.counts["GenerateDataKey"] == 1  # a refusal is not retried
    with pytest.raises(KmsRefused) as ei:
        make_cmk(kms, key_id, creds=StaticCredentialsProvider("unknown-ak", SK)).new_data_key()
    assert ei.value.code == "InvalidAccessKeyId.NotFound"
    # second key pair of the same account works (KMS keys are not tied to one access key here)
    key, wrapped = make_cmk(kms, key_id, creds=StaticCredentialsProvider("other-ak", "other-sk")).new_data_key()
    assert make_cmk(kms, key_id).unwrap(wrapped) == key


def test_raw_http_signature_check(kms, key_id):
    """The server itself, without aliyunsdkcore: a tampered parameter breaks the signature."""
    import urllib.error
    import urllib.request
    from kms_server import sign
    params = {"Action": "Encrypt", "Version": "2016-01-20", "Format": "JSON", "AccessKeyId": AK,
              "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "SignatureNonce": "n1",
              "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "KeyId": key_id,
              "Plaintext": "aGVsbG8="}
    params["Signature"] = sign("POST", params, SK)
    tampered = dict(params, Plaintext="b3RoZXI=")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(p):
        url = kms.endpoint + "/?" + urllib.parse.urlencode(p)
        try:
            with opener.open(urllib.request.Request(url, data=b"", method="POST"), timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, doc = post(tampered)
    assert status == 400 and doc["Code"] == "SignatureDoesNotMatch" and doc["RequestId"]
    status, doc = post(params)
    assert status == 200 and doc["KeyId"] == key_id and doc["CiphertextBlob"]
    status, doc = post(params)  # same SignatureNonce again
    assert status == 400 and doc["Code"] == "SignatureNonceUsed"


def test_sts_token_and_rotating_credentials():
    with KmsTestServer({AK: SK, "ak2": "sk2"}, security_tokens={"tok-1"}) as kms:
        kid = kms.create_key()
        with pytest.raises(KmsRefused) as ei:
            make_cmk(kms, kid).new_data_key()
        assert ei.value.code == "InvalidSecurityToken.Mismatch"
        current = [Credentials(AK, SK, "tok-1")]
        cmk = make_cmk(kms, kid, creds=lambda: current[0], cache_seconds=0)
        key, wrapped = cmk.new_data_key()
        current[0] = Credentials("ak2", "sk2", "tok-1")  # rotated: the next call signs with ak2
        assert cmk.unwrap(wrapped) == key


# ----------------------------------------------------------------------------- cache
def test_cache_avoids_second_decrypt_and_expires(kms, key_id):
    key, iv, wrapped = new_envelope(make_cmk(kms, key_id))
    reader = make_cmk(kms, key_id, cache_seconds=0.3)
    for _ in range(3):
        assert reader.unwrap(wrapped.wrapped_key) == key
        assert reader.unwrap(wrapped.wrapped_iv) == iv
    assert kms.counts["Decrypt"] == 2
    time.sleep(0.35)
    assert reader.unwrap(wrapped.wrapped_key) == key
    assert kms.counts["Decrypt"] == 3
    # no cache
    nocache = make_cmk(kms, key_id, cache_seconds=0)
    nocache.unwrap(wrapped.wrapped_key)
    nocache.unwrap(wrapped.wrapped_key)
    assert kms.counts["Decrypt"] == 5
    # bounded size: one entry only, so alternating blobs always miss
    tiny = make_cmk(kms, key_id, cache_size=1)
    for _ in range(2):
        tiny.unwrap(wrapped.wrapped_key)
        tiny.unwrap(wrapped.wrapped_iv)
    assert kms.counts["Decrypt"] == 9


def test_concurrent_unwraps_share_one_decrypt(kms, key_id):
    key, wrapped = make_cmk(kms, key_id).new_data_key()
    reader = make_cmk(kms, key_id)
    kms.delay = 0.3
    results, errors = [], []

    def run():
        try:
            results.append(reader.unwrap(wrapped))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and results == [key] * 8
    assert kms.counts["Decrypt"] == 1


# ----------------------------------------------------------------------------- unavailable KMS
@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable")
def test_server_down_raises_kms_unavailable_after_bounded_retries(kms, key_id, caplog):
    key, wrapped = make_cmk(kms, key_id).new_data_key()
    cmk = make_cmk(kms, key_id, attempts=3, backoff=0.05)
    kms.stop()  # connection refused
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    with pytest.raises(KmsUnavailable) as ei:
        cmk.unwrap(wrapped)
    elapsed = time.monotonic() - t0
    # slept 0.05 + 0.1 between three refused connections, each times a jitter factor in [0.5, 1]
    assert 0.075 <= elapsed < 3.0
    assert ei.value.endpoint == kms.endpoint and ei.value.attempts == 3
    assert kms.endpoint in str(ei.value) and "Decrypt" in str(ei.value)
    assert not isinstance(ei.value, env.EnvelopeError)
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].name == "ossfuse.kms" and kms.endpoint in lines[0].getMessage()
    assert cmk.calls["Decrypt"] == 3
    with pytest.raises(KmsUnavailable):
        cmk.new_data_key()
    kms.start()  # back on the same port: the same CMK works again
    assert cmk.unwrap(wrapped) == key


@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable")
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_503_and_reset_are_retried_then_unavailable(kms, key_id, mode):
    cmk = make_cmk(kms, key_id, attempts=3, backoff=0.01)
    kms.mode = mode
    with pytest.raises(KmsUnavailable) as ei:
        cmk.new_data_key()
    assert kms.counts["GenerateDataKey"] == 3
    if mode == "503":
        assert "503" in ei.value.reason and "ServiceUnavailable" in ei.value.reason
    kms.mode = "ok"
    assert len(cmk.new_data_key()[0]) == 32


@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable")
def test_read_timeout_is_unavailable(kms, key_id):
    cmk = make_cmk(kms, key_id, attempts=2, backoff=0.01, read_timeout=0.2)
    kms.delay = 0.6
    t0 = time.monotonic()
    with pytest.raises(KmsUnavailable):
        cmk.wrap(b"x" * 16)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable")
def test_kms_that_never_answers_is_bounded_by_the_deadline(kms, key_id):
    """5 attempts × 10 s read timeout would be 50 s: the deadline (1.2 s) cuts each attempt's
    timeout to what is left, so the call fails within it."""
    cmk = make_cmk(kms, key_id, attempts=5, backoff=0.01, read_timeout=10.0, deadline=1.2)
    kms.delay = 3.0
    t0 = time.monotonic()
    with pytest.raises(KmsUnavailable) as ei:
        cmk.wrap(b"x" * 16)
    assert time.monotonic() - t0 < 2.0
    assert ei.value.attempts <= 2 and ei.value.temporary
    kms.delay = 0.0


def test_bad_configuration():
    creds = StaticCredentialsProvider(AK, SK)
    base = dict(id="k", type="kms", key_id="kid", region=REGION, endpoint="http://127.0.0.1:9", matdesc=None)
    with pytest.raises(ValueError, match="key_id"):
        KmsCmk(SimpleNamespace(**dict(base, key_id=None)), creds)
    with pytest.raises(ValueError, match="region"):
        KmsCmk(SimpleNamespace(**dict(base, region=None)), creds)
    with pytest.raises(ValueError, match="encoding"):
        KmsCmk(SimpleNamespace(**dict(base, encoding="base64")), creds)
    with pytest.raises(ValueError, match="credentials"):
        KmsCmk(SimpleNamespace(**base))
    cmk = KmsCmk(SimpleNamespace(**dict(base, endpoint=None, matdesc={"team": "a"})), creds)
    assert cmk.endpoint == "kms.cn-hangzhou.aliyuncs.com" and cmk.matdesc_raw == '{"team":"a"}'
    assert cmk.wrap_alg == "KMS/ALICLOUD" and cmk.encoding == "oss2"


# ----------------------------------------------------------------------------- oss2 interop
@pytest.mark.parametrize("passphrase", [None, "pw-1"])
def test_oss2_wraps_kmscmk_unwraps(kms, key_id, passphrase):
    prov = make_provider(kms, key_id, passphrase)
    material = prov.create_content_material()
    meta = user_meta(material.to_object_meta())
    wrapped = env.parse_envelope(meta)
    assert wrapped.wrap_alg == "KMS/ALICLOUD"
    cmk = make_cmk(kms, key_id, passphrase=passphrase)
    key, iv = cmk.unwrap(wrapped.wrapped_key), cmk.unwrap(wrapped.wrapped_iv)
    env.check_unwrapped(key, iv)
    # the same values oss2 itself gets back (its material.encrypted_key is the CiphertextBlob text)
    assert wrapped.wrapped_key == material.encrypted_key.encode()
    assert key == prov.decrypt_encrypted_key(wrapped.wrapped_key)
    assert iv == prov.decrypt_encrypted_iv(wrapped.wrapped_iv)
    # and the content cipher agrees: oss2's initialised cipher vs ctr_crypt
    plain = bytes(range(256)) * 3
    assert env.ctr_crypt(key, iv, 0, material.cipher.encrypt(plain)) == plain


@pytest.mark.parametrize("passphrase", [None, "pw-1"])
def test_kmscmk_wraps_oss2_unwraps(kms, key_id, passphrase):
    key, iv, wrapped = new_envelope(make_cmk(kms, key_id, passphrase=passphrase))
    headers = {META_PREFIX + k: v for k, v in wrapped.headers().items()}
    prov = make_provider(kms, key_id, passphrase)
    material = oss2.models.ContentCryptoMaterial(prov.cipher, prov.wrap_alg)
    material.from_object_meta(headers)  # oss2's own header parsing (models.py:106-115)
    assert prov.decrypt_encrypted_key(material.encrypted_key) == key
    assert prov.decrypt_encrypted_iv(material.encrypted_iv) == iv


def test_raw_encoding_is_not_readable_by_oss2(kms, key_id):
    """Documented incompatibility (§4.2, interop risk 1): GO1/JAVA-style headers confuse oss2."""
    _, _, wrapped = new_envelope(make_cmk(kms, key_id, encoding="raw"))
    prov = make_provider(kms, key_id)
    with pytest.raises(oss2.exceptions.OpenApiServerError):
        prov.decrypt_encrypted_key(base64.b64decode(wrapped.headers()[env.H_KEY]))


@pytest.fixture
def oss_server():
    srv = OssTestServer(access_key_id=AK, access_key_secret=SK, buckets=(BUCKET,))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_full_http_round_trip_with_oss2_crypto_bucket(kms, key_id, oss_server):
    prov = make_provider(kms, key_id, passphrase="pw")
    cbucket = oss2.CryptoBucket(oss2.Auth(AK, SK), oss_server.endpoint, BUCKET, crypto_provider=prov)
    plain = os.urandom(100_000) + b"tail"
    cbucket.put_object("dir/by-oss2", plain)
    # ossfuse's side: stored headers + ciphertext body, unwrapped with KmsCmk
    meta = oss_server.object_meta(BUCKET, "dir/by-oss2")
    meta = {k.lower().removeprefix(META_PREFIX): v for k, v in meta.items()}
    wrapped = env.parse_envelope(meta)
    cmk = make_cmk(kms, key_id, passphrase="pw")
    key, iv = cmk.unwrap(wrapped.wrapped_key), cmk.unwrap(wrapped.wrapped_iv)
    body = oss_server.get_object_bytes(BUCKET, "dir/by-oss2")
    assert body != plain and env.ctr_crypt(key, iv, 0, body) == plain
    assert env.ctr_crypt(key, iv, 12345, body[12345:54321]) == plain[12345:54321]  # any range
    # and the other way: an object written like ossfuse writes it, read by oss2's CryptoBucket
    key2, iv2, wrapped2 = new_envelope(cmk)
    headers = {META_PREFIX + k: v for k, v in wrapped2.headers().items()}
    headers[META_PREFIX + env.H_PLAIN_LEN] = str(len(plain))
    oss2.Bucket(oss2.Auth(AK, SK), oss_server.endpoint, BUCKET).put_object(
        "dir/by-ossfuse", env.ctr_crypt(key2, iv2, 0, plain), headers=headers)
    assert cbucket.get_object("dir/by-ossfuse").read() == plain
    assert cbucket.get_object("dir/by-ossfuse", byte_range=(1000, 1999)).read() == plain[1000:2000]


# ----------------------------------------------------------------------------- legacy format
def test_legacy_oss2_kms_vector(kms):
    """Published oss2 vector (legacy 2.5–2.10 KMS format, §4.5): its real-KMS blobs are
    preloaded into the local KMS with the plaintexts the vector's meta file gives."""
    with open(os.path.join(VECTORS, "oss2-deprecated_encrypted_1MB_a_meta_kms.json")) as f:
        doc = json.load(f)
    key_blob, start_blob = doc["x-oss-meta-oss-crypto-key"], doc["x-oss-meta-oss-crypto-start"]
    real_key_id = base64.b64decode(key_blob)[:36].decode()
    kms.create_key(key_id=real_key_id)
    kms.preload(key_blob, doc["base64-plain-key"], real_key_id)
    kms.preload(start_blob, doc["plain-start"], real_key_id)
    cmk = make_cmk(kms, real_key_id)
    # the keyring's path: parse_envelope (legacy=True) + unwrap + legacy_counter_iv
    wrapped = env.parse_envelope(user_meta(doc))
    assert wrapped.legacy and wrapped.wrap_alg == "KMS/ALICLOUD"
    key = cmk.unwrap(wrapped.wrapped_key, wrapped.wrap_alg)
    iv = env.legacy_counter_iv(cmk.unwrap(wrapped.wrapped_iv, wrapped.wrap_alg))
    assert key == base64.b64decode(doc["base64-plain-key"]) and int.from_bytes(iv, "big") == 8
    assert make_cmk(kms, real_key_id).unwrap_legacy(key_blob, start_blob) == (key, iv)
    with open(os.path.join(VECTORS, "oss2-deprecated_encrypted_1MB_a_kms"), "rb") as f:
        body = f.read()
    assert env.ctr_crypt(key, iv, 0, body) == b"a" * (1 << 20)


def test_legacy_envelope_made_by_local_kms(kms, key_id):
    """Legacy layout built with the local KMS: key header = GenerateDataKey's CiphertextBlob,
    start header = CiphertextBlob of Encrypt(Plaintext="<decimal counter>") (§4.5)."""
    cmk = make_cmk(kms, key_id, passphrase="pp")
    key, stored = cmk.new_data_key()
    start_blob = cmk._call("Encrypt", {"KeyId": key_id, "Plaintext": "10"})["CiphertextBlob"]
    assert make_cmk(kms, key_id, passphrase="pp").unwrap_legacy(stored.decode(), start_blob) == \
        (key, (10).to_bytes(16, "big"))
    # a current-format IV blob is not a counter; a counter is not a current-format IV
    with pytest.raises(env.EnvelopeError):
        cmk.unwrap_legacy(stored.decode(), cmk.wrap(os.urandom(16)).decode())
    assert cmk.unwrap(start_blob.encode()) == b"10"
    with pytest.raises(env.EnvelopeError):
        env.check_unwrapped(key, cmk.unwrap(start_blob.encode()))
    with pytest.raises(env.EnvelopeError):
        cmk.unwrap(stored, "RSA/NONE/PKCS1Padding")


# ----------------------------------------------------------------------------- keyring
def test_with_the_keyring(kms, key_id):
    """The keyring with a KMS CMK: GenerateDataKey makes the data key, oss2 reads it."""
    creds = StaticCredentialsProvider(AK, SK)
    cmk_cfg = SimpleNamespace(id="k", type="kms", key_id=key_id, region=REGION, endpoint=kms.endpoint,
                              matdesc={"kms": "team"}, credentials_file=None, encoding="oss2", passphrase="p",
                              default_for_no_matdesc=False)
    enc = SimpleNamespace(cmks=(cmk_cfg,), encrypt_with="k", rules=())
    ring = keyring.Keyring(enc, creds)
    kms.reset_counts()
    envl = ring.new_envelope("a/file")
    assert kms.counts.get("GenerateDataKey") == 1
    headers = envl.wrapped.headers()
    assert headers[env.H_WRAP_ALG] == "KMS/ALICLOUD" and headers[env.H_MATDESC] == '{"kms":"team"}'
    # readable by oss2 (Encrypt(base64(key)) decrypts like a GenerateDataKey blob)
    prov = make_provider(kms, key_id, "p")
    assert prov.decrypt_encrypted_key(base64.b64decode(headers[env.H_KEY])) == envl.data_key
    opened = keyring.Keyring(enc, creds).open_envelope(env.parse_envelope(headers))
    assert (opened.data_key, opened.iv) == (envl.data_key, envl.iv)


# ----------------------------------------------------------------------------- separate process
def test_kms_server_as_separate_process():
    script = os.path.join(os.path.dirname(__file__), "kms_server.py")
    proc = subprocess.Popen([sys.executable, script, "--access-key-id", AK, "--access-key-secret", SK,
                             "--key", "proc-key-1"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        assert proc.stdout.readline().strip() == "proc-key-1"
        cmk = make_cmk(SimpleNamespace(endpoint=endpoint), "proc-key-1")
        key, wrapped = cmk.new_data_key()
        cmk.clear_cache()
        assert cmk.unwrap(wrapped) == key
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable")
def test_concurrent_unwraps_share_one_failure(kms, key_id):
    _, wrapped = make_cmk(kms, key_id).new_data_key()
    reader = make_cmk(kms, key_id, attempts=2, backoff=0.3)
    kms.mode = "503"
    errors = []

    def run():
        try:
            reader.unwrap(wrapped)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 6 and all(isinstance(e, KmsUnavailable) for e in errors)
    assert kms.counts["Decrypt"] == 2  # one leader's two attempts, not 6 × 2
