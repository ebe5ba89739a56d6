"""The envelope against the SDKs: published vectors, oss2's own RsaProvider (offline), and
the counter arithmetic at unaligned offsets and across a 2**32-block boundary."""
from __future__ import annotations

import base64
import json
import os

import oss2
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from oss2 import models as oss2_models
from oss2 import utils as oss2_utils

from ossfuse import envelope as env
from ossfuse.config import CmkConfig, EncryptionConfig
from ossfuse.keyring import KeyMissing, Keyring

from conftest import DATA

VEC = os.path.join(DATA, "vectors")


def keyring_for(path: str, matdesc=None, cmk_id="k") -> Keyring:
    return Keyring(EncryptionConfig(encrypt_with=cmk_id, cmks=(CmkConfig(cmk_id, "rsa", path, matdesc),)))


def oss2_provider(path: str, mat_desc=None) -> oss2.crypto.RsaProvider:
    from cryptography.hazmat.primitives import serialization
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    with open(path) as f:
        return oss2.crypto.RsaProvider(key_pair={"private_key": f.read(), "public_key": pub.decode()},
                                       mat_desc=mat_desc)


def test_spec_ctr_vector_and_unaligned_offsets():
    """oss-cse-format.md §3.6 deterministic vector (computed there with cryptography, oss2, PY2)."""
    key = bytes(range(32))
    iv = bytes.fromhex("0102030405060708" "00000000" "fffffffe")
    pt = bytes((7 * i + 3) % 256 for i in range(100))
    expected = bytes.fromhex(
        "252d205f4804566e199c5bbb1b101b97cb1374f02d339db8d14f966d981ac9b02ddec46a0902b7470ad2771039b6"
        "9a72eb48ca5c48a4dc98f978286626532b4da641306b7c245d045b6e3db370c6a4baddb727d7ebbde87016fe3e54"
        "ad6c189a877ff9aa")
    assert env.ctr_crypt(key, iv, 0, pt) == expected
    assert env.ctr_crypt(key, iv, 48, expected[48:]) == pt[48:]
    for start in range(0, 100):
        for end in (start + 1, min(100, start + 17), 100):
            assert env.ctr_crypt(key, iv, start, expected[start:end]) == pt[start:end], (start, end)


def test_counter_crosses_2_32_block_boundary():
    """IV …00000000fffffffe + 2 blocks → …0000000100000000 (§3.6: carries out of the low word,
    as the 128-bit add of oss2 and the low-64 add of Go/C++ agree for SDK IVs)."""
    iv = bytes.fromhex("0102030405060708" "00000000" "fffffffe")
    assert env.counter_at(iv, 32).hex() == "0102030405060708" "00000001" "00000000"
    assert env.counter_at(iv, 33) == env.counter_at(iv, 32)
    key = os.urandom(32)
    data = os.urandom(4096)
    whole = env.ctr_crypt(key, iv, 0, data)
    # reference: one continuous stream from the IV, as every SDK's streaming encryptor makes
    ref = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)
    assert whole == ref
    for off in (15, 16, 31, 32, 33, 47, 100, 4000):
        assert env.ctr_crypt(key, iv, off, data[off:]) == ref[off:]
    # the full 128-bit counter wraps like pycryptodome's Counter.new(128)
    top = b"\xff" * 16
    assert env.counter_at(top, 16) == bytes(16)


def test_new_iv_has_zero_word_and_keys_are_fresh():
    ivs = {env.new_iv() for _ in range(64)}
    assert len(ivs) == 64
    assert all(iv[8:12] == b"\0\0\0\0" and len(iv) == 16 for iv in ivs)
    assert len({env.new_data_key() for _ in range(64)}) == 64


@pytest.mark.parametrize("name", ["test-client-encryption-crypto-cpp-rsa.jpg",
                                  "test-client-encryption-crypto-python-rsa.jpg",
                                  "cppsdk-go-enc-example.jpg"])
def test_published_sdk_vectors_decrypt(name):
    """Objects written by the C++ SDK, oss2 and the Go SDK (shared/vectors) decrypt byte-exact,
    whole and from unaligned offsets."""
    with open(os.path.join(VEC, "headers.json")) as f:
        key_h, start_h = json.load(f)[name]
    meta = {env.H_KEY: key_h, env.H_START: start_h, env.H_CEK_ALG: "AES/CTR/NoPadding",
            env.H_WRAP_ALG: "RSA/NONE/PKCS1Padding"}
    envelope = keyring_for(os.path.join(VEC, "sdk-test-rsa1024.pem")).open_envelope(env.parse_envelope(meta))
    assert envelope.iv[8:12] == b"\0\0\0\0"
    with open(os.path.join(VEC, name), "rb") as f:
        ct = f.read()
    with open(os.path.join(VEC, "test-client-encryption-src.jpg"), "rb") as f:
        pt = f.read()
    assert len(pt) == 21839
    assert envelope.crypt(0, ct) == pt
    for off in (1, 15, 17, 4099, 21838):
        assert envelope.crypt(off, ct[off:off + 1000]) == pt[off:off + 1000]


def test_ossfuse_envelope_decrypts_with_oss2_rsa_provider(cmk_path):
    """What ossfuse wraps, oss2's RsaProvider unwraps, and oss2's AES-CTR cipher decrypts,
    whole and at a ranged offset (oss2's adjust_range + counter offset)."""
    kr = keyring_for(cmk_path, matdesc={"team": "alpha"})
    e = kr.new_envelope("dir/file")
    pt = os.urandom(5000)
    ct = e.crypt(0, pt)
    headers = e.wrapped.headers()
    assert headers[env.H_MATDESC] == '{"team":"alpha"}'  # Go's json.Marshal spelling (issue 15)
    provider = oss2_provider(cmk_path, mat_desc={"team": "alpha"})
    material = oss2_models.ContentCryptoMaterial(provider.cipher, provider.wrap_alg)
    material.from_object_meta({"x-oss-meta-" + k: v for k, v in headers.items()})  # checks algs
    assert material.mat_desc == {"team": "alpha"}
    key = provider.decrypt_encrypted_key(material.encrypted_key)
    iv = provider.decrypt_encrypted_iv(material.encrypted_iv)
    assert (key, iv) == (e.data_key, e.iv)
    cipher = oss2_utils.AESCTRCipher()
    cipher.initialize(key, iv)
    assert cipher.decrypt(ct) == pt
    start, _ = cipher.adjust_range(1234, 4000)
    ranged = oss2_utils.AESCTRCipher()
    ranged.initialize(key, iv, offset=cipher.calc_offset(start))  # counter blocks, as oss2 does
    assert ranged.decrypt(ct[start:4001])[1234 - start:] == pt[1234:4001]


def test_oss2_envelope_decrypts_with_ossfuse(cmk_path):
    """An envelope made by oss2's RsaProvider (create_content_material, to_object_meta) opens
    with ossfuse's keyring, and its ciphertext decrypts at any offset."""
    provider = oss2_provider(cmk_path)
    material = provider.create_content_material()
    meta = material.to_object_meta({"content-length": "3000"})
    pt = os.urandom(3000)
    ct = material.cipher.encrypt(pt)
    ours = {k.lower()[len("x-oss-meta-"):]: v for k, v in meta.items() if k.lower().startswith("x-oss-meta-")}
    assert ours[env.H_PLAIN_LEN] == "3000"
    e = keyring_for(cmk_path).open_envelope(env.parse_envelope(ours))
    assert e.crypt(0, ct) == pt
    assert e.crypt(777, ct[777:2000]) == pt[777:2000]


def test_matdesc_matches_as_parsed_map(cmk_path, other_cmk_path):
    kr = Keyring(EncryptionConfig(encrypt_with="a", cmks=(
        CmkConfig("a", "rsa", cmk_path, {"k": "v", "x": "/y"}),
        CmkConfig("b", "rsa", other_cmk_path, None))))
    e = kr.new_envelope("f")
    for spelling in ('{"k":"v","x":"\\/y"}', '{"x": "/y", "k": "v"}'):  # Java and reordered
        w = env.WrappedEnvelope(e.wrapped.wrapped_key, e.wrapped.wrapped_iv, e.wrapped.wrap_alg,
                                json.loads(spelling), spelling)
        assert kr.cmk_for(w).id == "a"
    no_desc = env.WrappedEnvelope(b"", b"", "RSA/NONE/PKCS1Padding", None, None)
    assert kr.cmk_for(no_desc).id == "b"  # an object without matdesc: the CMK that has none
    unknown = env.WrappedEnvelope(b"", b"", "RSA/NONE/PKCS1Padding", {"k": "other"}, '{"k": "other"}')
    with pytest.raises(KeyMissing):
        kr.cmk_for(unknown)
    with pytest.raises(KeyMissing):
        kr.cmk_for(env.WrappedEnvelope(b"", b"", "KMS/ALICLOUD", None, None))


# matdesc header texts the Go SDKs wrote (cseclient-go1 and -gov2, Go 1.19, to the OSS test
# server; tests/test_interop_sdk.py checks the same live): sorted keys, no spaces, <>& escaped.
GO_MATDESC = [
    ({"team": "alpha"}, '{"team":"alpha"}'),
    ({"z": "1", "a<b>&": 'x"\\/\t\b\f\x01\n', "m": "y", "B": "2"},
     '{"B":"2","a\\u003cb\\u003e\\u0026":"x\\"\\\\/\\t\\u0008\\u000c\\u0001\\n","m":"y","z":"1"}'),
    ({"z": "\u2028"}, '{"z":"\\u2028"}'),
]


@pytest.mark.parametrize("matdesc,text", GO_MATDESC)
def test_matdesc_is_written_as_go_json_marshal_writes_it(cmk_path, matdesc, text):
    assert env.encode_matdesc(matdesc) == text
    assert json.loads(text) == matdesc
    w = keyring_for(cmk_path, matdesc=matdesc).new_envelope("f").wrapped
    assert w.headers()[env.H_MATDESC] == text
    assert env.parse_envelope(w.headers()).matdesc == matdesc


def test_matdesc_outside_what_a_header_carries_is_escaped():
    """Non-ASCII and DEL: Go would send raw bytes (its SDKs then fail: "invalid header field
    value", or a signature mismatch); ossfuse writes JSON escapes, still parsed back equal."""
    md = {"k": "é\U0001F600\x7f"}
    text = env.encode_matdesc(md)
    assert text == '{"k":"\\u00e9\\ud83d\\ude00\\u007f"}' and text.isascii()
    assert json.loads(text) == md
    assert env.encode_matdesc(None) is None and env.encode_matdesc({}) is None


def test_matdesc_text_from_the_config_is_written_verbatim(cmk_path):
    text = '{"team": "alpha", "env": "x"}'  # Python V2's json.dumps form, insertion order
    kr = Keyring(EncryptionConfig(encrypt_with="k", cmks=(
        CmkConfig("k", "rsa", cmk_path, {"team": "alpha", "env": "x"}, matdesc_text=text),)))
    w = kr.new_envelope("f").wrapped
    assert w.headers()[env.H_MATDESC] == text
    assert kr.cmk_for(env.parse_envelope(w.headers())).id == "k"
    # and an object of the same description in Go's form still reads with it
    go = env.WrappedEnvelope(b"", b"", w.wrap_alg, {"env": "x", "team": "alpha"}, '{"env":"x","team":"alpha"}')
    assert kr.cmk_for(go).id == "k"


def test_wrong_cmk_and_corrupt_headers_are_envelope_errors(cmk_path, other_cmk_path):
    e = keyring_for(cmk_path).new_envelope("f")
    with pytest.raises(env.EnvelopeError, match="cannot unwrap"):
        keyring_for(other_cmk_path).open_envelope(e.wrapped)
    good = {"x": "1", **e.wrapped.headers()}
    for broken, msg in [({env.H_START: None}, "missing"),
                        ({env.H_KEY: "***not base64***"}, "base64"),
                        ({env.H_CEK_ALG: "AES/GCM/NoPadding"}, "cek-alg"),
                        ({env.H_MATDESC: "[1, 2]"}, "matdesc"),
                        ({env.H_MATDESC: "{not json"}, "matdesc")]:
        meta = dict(good)
        for k, v in broken.items():
            if v is None:
                del meta[k]
            else:
                meta[k] = v
        with pytest.raises(env.EnvelopeError, match=msg):
            env.parse_envelope(meta)
    assert not env.is_encrypted({"mode": "33188"})
    assert env.is_encrypted({env.H_WRAP_ALG: "x"})
    # a key header that is valid base64 but not an RSA block of this CMK
    meta = dict(good)
    meta[env.H_KEY] = base64.b64encode(os.urandom(256)).decode()
    with pytest.raises(env.EnvelopeError):
        keyring_for(cmk_path).open_envelope(env.parse_envelope(meta))


def test_legacy_oss2_rsa_objects_decrypt():
    """oss2 2.5–2.10 objects (x-oss-meta-oss-crypto-*, RSA-OAEP, decimal start counter,
    mislabelled AES/GCM) read as oss2 ≥ 2.11 reads them (oss-cse-format.md §4.5)."""
    with open(os.path.join(VEC, "oss2-deprecated_encrypted_1MB_a_meta_rsa.json")) as f:
        meta = {k[len("x-oss-meta-"):]: v for k, v in json.load(f).items()}
    assert env.is_encrypted(meta)
    wrapped = env.parse_envelope(meta)
    assert wrapped.legacy and wrapped.wrap_alg == env.WRAP_RSA_OAEP
    e = keyring_for(os.path.join(VEC, "sdk-test-rsa1024.pem")).open_envelope(wrapped)
    assert e.iv == (8).to_bytes(16, "big")
    with open(os.path.join(VEC, "oss2-deprecated_encrypted_1MB_a_rsa"), "rb") as f:
        ct = f.read()
    assert e.crypt(0, ct) == b"a" * (1 << 20)
    assert e.crypt(777_777, ct[777_777:800_001]) == b"a" * (800_001 - 777_777)


def test_legacy_kms_vector_decrypts_with_its_published_plain_key():
    """The legacy KMS vector carries its plain data key and start (§4.5): the counter rule and
    the AES-CTR body check out without KMS."""
    with open(os.path.join(VEC, "oss2-deprecated_encrypted_1MB_a_meta_kms.json")) as f:
        meta = json.load(f)
    wrapped = env.parse_envelope({k[len("x-oss-meta-"):]: v for k, v in meta.items() if k.startswith("x-oss-meta-")})
    assert wrapped.legacy and wrapped.wrap_alg == "KMS/ALICLOUD"
    key, iv = base64.b64decode(meta["base64-plain-key"]), env.legacy_counter_iv(meta["plain-start"].encode())
    with open(os.path.join(VEC, "oss2-deprecated_encrypted_1MB_a_kms"), "rb") as f:
        ct = f.read()
    assert env.ctr_crypt(key, iv, 0, ct) == b"a" * (1 << 20)


def test_length_mismatch_names_a_short_object_and_a_length_that_is_no_number():
    """The plaintext length every SDK writes proves an object whole; one that is no number is a
    damaged envelope (a trial: ``abc`` and ``-1`` read on without a word)."""
    assert env.length_mismatch({}, 5) is None
    assert env.length_mismatch({env.H_PLAIN_LEN: "5"}, 5) is None
    assert env.length_mismatch({env.H_PLAIN_LEN: "9"}, 5) == "object has 5 bytes, its envelope says 9"
    for bad in ("abc", "-1", "", "5.0"):
        assert env.length_mismatch({env.H_PLAIN_LEN: bad}, 5) == \
            f"its envelope's plaintext length {bad!r} is not a length (decimal digits)", bad


def test_a_header_that_is_not_base64_is_named():
    """Trial Y: "key/start header is not base64" did not say which of the two."""
    good = {env.H_KEY: base64.b64encode(b"k" * 8).decode(), env.H_START: base64.b64encode(b"s" * 8).decode(),
            env.H_CEK_ALG: env.CEK_ALG, env.H_WRAP_ALG: "RSA/NONE/PKCS1Padding"}
    assert env.parse_envelope(good).wrapped_iv == b"s" * 8
    for header in (env.H_KEY, env.H_START):
        with pytest.raises(env.EnvelopeError, match=f"envelope header x-oss-meta-{header} is not base64"):
            env.parse_envelope({**good, header: "%%" + good[header]})
