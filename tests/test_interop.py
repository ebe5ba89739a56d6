"""Two-way interop through the mount with the real OSS SDK clients over real HTTP to the OSS
test server: oss2 CryptoBucket + RsaProvider and alibabacloud-oss-v2 EncryptionClient +
MasterRsaCipher, single PUT and multipart (30 MiB + 1 byte), whole and unaligned ranged reads,
with and without matdesc; and objects of plain tools under the prefix."""
from __future__ import annotations

import hashlib
import os

import alibabacloud_oss_v2 as oss
import oss2
import pytest
from alibabacloud_oss_v2.crypto import MasterRsaCipher

import conftest
from conftest import AK, BUCKET, REGION, SK, Mount, key_pair, rsa_provider
from ossfuse import integrity

pytestmark = pytest.mark.timeout(300)

BIG = 30 * 1024 * 1024 + 1  # bytes: multipart on both sides
PART = 1024 * 1024


def payload(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def read_at(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture(params=[None, {"team": "alpha", "path": "a/b"}], ids=["no-matdesc", "matdesc"])
def setup(request, tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, f"multipart_threshold = {4 * PART}\npart_size = {PART}",
              server=oss_server, matdesc=request.param)
    m.start()
    try:
        yield m, request.param
    finally:
        m.cleanup()


def crypto_bucket(m: Mount, matdesc):
    return conftest.crypto_bucket(m.server.endpoint, rsa_provider(m.cmk, matdesc))


def v2_client(m: Mount, matdesc):
    priv, pub = key_pair(m.cmk)
    cfg = oss.config.load_default()
    cfg.credentials_provider = oss.credentials.StaticCredentialsProvider(AK, SK)
    cfg.region, cfg.endpoint = REGION, m.server.endpoint
    return oss.EncryptionClient(oss.Client(cfg), MasterRsaCipher(mat_desc=matdesc, public_key=pub, private_key=priv))


OFFSETS = [(0, 100), (1, 15), (15, 2), (17, 4096), (PART - 7, 30), (3 * PART + 5, 100_000)]


def check_through_mount(m: Mount, name: str, plain: bytes) -> None:
    p = m.path(name)
    assert os.path.getsize(p) == len(plain)
    with open(p, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(plain).digest()
    for off, n in OFFSETS:
        if off < len(plain):
            assert read_at(p, off, n) == plain[off:off + n], (name, off)


def test_oss2_crypto_bucket_objects_read_through_the_mount(setup):
    m, matdesc = setup
    cb = crypto_bucket(m, matdesc)
    small, big = payload(300 * 1024 + 1, 1), payload(BIG, 2)
    os.mkdir(m.path("sdk"))
    cb.put_object("sdk/single", small)
    ctx = oss2.models.MultipartUploadCryptoContext(data_size=len(big), part_size=PART)
    up = cb.init_multipart_upload("sdk/multi", upload_context=ctx).upload_id
    parts = []
    for i in range(0, len(big), PART):
        n = i // PART + 1
        r = cb.upload_part("sdk/multi", up, n, big[i:i + PART], upload_context=ctx)
        parts.append(oss2.models.PartInfo(n, r.etag, size=len(big[i:i + PART]), part_crc=r.crc))
    cb.complete_multipart_upload("sdk/multi", up, parts)
    m.remount()
    check_through_mount(m, "sdk/single", small)
    check_through_mount(m, "sdk/multi", big)


def test_files_written_through_the_mount_read_with_oss2(setup):
    m, matdesc = setup
    small, big = payload(123_457, 3), payload(BIG, 4)
    with open(m.path("single"), "wb") as f:
        f.write(small)
    with open(m.path("multi"), "wb") as f:
        f.write(big)
    assert m.stop() == 0
    meta = m.head("multi").metadata
    assert meta["client-side-encryption-part-size"] == str(PART)
    assert meta["client-side-encryption-data-size"] == str(BIG)
    # tagged (docs/integrity.md), in the header the SDKs ignore
    assert integrity.parse(meta).tags and integrity.parse(m.head("single").metadata).tags
    if matdesc:
        assert meta["client-side-encryption-matdesc"] == '{"path":"a/b","team":"alpha"}'
    cb = crypto_bucket(m, matdesc)
    assert cb.get_object("single").read() == small
    assert cb.get_object("multi").read() == big
    for off, n in OFFSETS:
        end = min(len(big), off + n) - 1
        assert cb.get_object("multi", byte_range=(off or None, end) if off else (0, end)).read() == big[off:end + 1]
    assert cb.get_object("single", byte_range=(100, 200)).read() == small[100:201]


def test_v2_encryption_client_both_ways(setup):
    m, matdesc = setup
    ec = v2_client(m, matdesc)
    small, big = payload(200_001, 5), payload(BIG, 6)
    ec.put_object(oss.PutObjectRequest(bucket=BUCKET, key="v2-single", body=small))
    init = ec.initiate_multipart_upload(oss.InitiateMultipartUploadRequest(
        bucket=BUCKET, key="v2-multi", cse_part_size=PART, cse_data_size=len(big)))
    parts = []
    for i in range(0, len(big), PART):
        n = i // PART + 1
        r = ec.upload_part(oss.UploadPartRequest(bucket=BUCKET, key="v2-multi", upload_id=init.upload_id,
                                                 part_number=n, body=big[i:i + PART],
                                                 cse_multipart_context=init.cse_multipart_context))
        parts.append(oss.UploadPart(part_number=n, etag=r.etag))
    ec.complete_multipart_upload(oss.CompleteMultipartUploadRequest(
        bucket=BUCKET, key="v2-multi", upload_id=init.upload_id,
        complete_multipart_upload=oss.CompleteMultipartUpload(parts=parts)))
    m.remount()
    check_through_mount(m, "v2-single", small)
    check_through_mount(m, "v2-multi", big)
    # and the other way: the mount writes, the V2 client reads (whole and ranged)
    with open(m.path("from-mount"), "wb") as f:
        f.write(big)
    assert m.stop() == 0
    got = ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="from-mount")).body.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
    r = ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="from-mount", range_header="bytes=1048569-1048700"))
    assert r.body.read() == big[1048569:1048701]


@pytest.mark.expect_log(r"WARNING oss2\.models: Using Bucket to get an encrypted object|WARNING ossfuse\.fs\.objmeta: .* is a directory marker holding")
def test_plain_objects_and_foreign_keys_under_the_prefix(tmp_path, cmk_path, oss_server):
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config(prefix="team/")
    bucket = oss2.Bucket(oss2.AuthV4(AK, SK), oss_server.endpoint, BUCKET, region=REGION)
    bucket.put_object("team/plain.txt", b"written by plain oss2")
    bucket.put_object("team/noattrs/file", b"no markers")
    bucket.put_object("team/a//b", b"double slash")
    bucket.put_object("team/dirdata/", b"a key ending in / with data")
    bucket.put_object("outside.txt", b"not under the prefix")
    m.start()
    try:
        assert sorted(os.listdir(m.mnt)) == ["a", "dirdata", "noattrs", "plain.txt"]
        assert open(m.path("plain.txt"), "rb").read() == b"written by plain oss2"
        assert open(m.path("noattrs", "file"), "rb").read() == b"no markers"
        assert os.listdir(m.path("dirdata")) == []
        with open(m.path("new"), "wb") as f:
            f.write(b"encrypted")
        assert m.stop() == 0
        assert bucket.get_object("team/new").read() != b"encrypted"
        assert crypto_bucket(m, None).get_object("team/new").read() == b"encrypted"
    finally:
        m.cleanup()


def test_matdesc_text_lets_python_v2_find_its_extra_cipher_by_text(oss_server, cmk_path, other_cmk_path):
    """The Python V2 SDK looks extra master ciphers up by matdesc *text* in its own json.dumps
    form (``{"desc": "x"}``): objects in Go's default form fall to its default cipher (another
    key: a decryption error); with ``matdesc_text`` set to the json.dumps form it reads them."""
    from ossfuse import envelope as env
    from ossfuse.config import CmkConfig, EncryptionConfig
    from ossfuse.keyring import Keyring
    priv, pub = key_pair(cmk_path)
    other_priv, other_pub = key_pair(other_cmk_path)
    cfg = oss.config.load_default()
    cfg.credentials_provider = oss.credentials.StaticCredentialsProvider(AK, SK)
    cfg.region, cfg.endpoint = REGION, oss_server.endpoint
    ec = oss.EncryptionClient(oss.Client(cfg), MasterRsaCipher(public_key=other_pub, private_key=other_priv),
                              decrypt_master_ciphers=[MasterRsaCipher(mat_desc={"desc": "x"}, public_key=pub,
                                                                      private_key=priv)])
    bucket = oss2.Bucket(oss2.AuthV4(AK, SK), oss_server.endpoint, BUCKET, region=REGION)
    plain = payload(50_001, 7)
    for name, text in (("go-form", None), ("json-dumps-form", '{"desc": "x"}')):
        kr = Keyring(EncryptionConfig(encrypt_with="k", cmks=(
            CmkConfig("k", "rsa", cmk_path, {"desc": "x"}, matdesc_text=text),)))
        e = kr.new_envelope(name)
        headers = {"x-oss-meta-" + k: v for k, v in e.wrapped.headers().items()}
        bucket.put_object(name, e.crypt(0, plain), headers=headers)
        assert bucket.head_object(name).headers["x-oss-meta-" + env.H_MATDESC] == (text or '{"desc":"x"}')
    # the V2 SDK tries its default (other) RSA key: PKCS#1 v1.5 says "decrypt…" failed, or
    # "Ciphertext too large" when the wrapped key's integer exceeds that key's modulus (random
    # keys: about one run in several; last session's note named it a load flake)
    with pytest.raises(Exception, match="(?i)decrypt|ciphertext too large"):
        ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="go-form")).body.read()
    got = ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="json-dumps-form")).body.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(plain).digest()
