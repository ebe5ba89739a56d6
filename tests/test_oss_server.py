"""Tests of tests/oss_server.py with the REAL clients (oss2 2.19.1, alibabacloud-oss-v2 1.4.1)
over real HTTP. Each test checks values (bodies, metadata, listing pages, error codes and
exception classes), not just "no exception"."""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import re
import subprocess
import sys
import time

import oss2
import pytest
import requests
import alibabacloud_oss_v2 as oss
from alibabacloud_oss_v2.crypto import MasterRsaCipher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, os.path.dirname(__file__))
from oss_server import OssTestServer, crc64, crc64_combine  # noqa: E402

# Store failure tests: the OSS store logs each failed or retried request (checklogs).
pytestmark = [pytest.mark.timeout(60), pytest.mark.expect_log(r"(WARNING|ERROR) ossfuse\.store\.(oss|credentials): ")]

AK, SK = "test-ak-id", "test-ak-secret"
BUCKET = "test-bucket"
REGION = "cn-hangzhou"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def server():
    srv = OssTestServer(access_key_id=AK, access_key_secret=SK, buckets=(BUCKET,), seed=1234)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def bucket(server):
    return oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)


@pytest.fixture(params=["v1", "v4"])
def any_bucket(request, server):
    if request.param == "v1":
        return oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)
    return oss2.Bucket(oss2.AuthV4(AK, SK), server.endpoint, BUCKET, region=REGION)


def make_v2(server, secret=SK, **kw):
    cfg = oss.config.load_default()
    cfg.credentials_provider = oss.credentials.StaticCredentialsProvider(AK, secret)
    cfg.region = REGION
    cfg.endpoint = server.endpoint
    for k, v in kw.items():
        setattr(cfg, k, v)
    return oss.Client(cfg)


@pytest.fixture
def v2(server):
    return make_v2(server)


@pytest.fixture(scope="session")
def rsa_pem():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return priv, pub


def crypto_bucket(server, rsa_pem):
    priv, pub = rsa_pem
    provider = oss2.crypto.RsaProvider(key_pair={"private_key": priv, "public_key": pub})
    return oss2.CryptoBucket(oss2.Auth(AK, SK), server.endpoint, BUCKET, crypto_provider=provider)


def service_error(exc):
    """The V2 SDK wraps ServiceError in OperationError."""
    e = exc
    for _ in range(5):
        if isinstance(e, oss.exceptions.ServiceError):
            return e
        e = e.unwrap() if hasattr(e, "unwrap") else e.__cause__
    raise AssertionError(f"no ServiceError in {exc!r}")


def data(n, seed=0):
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


# ----------------------------------------------------------------------------- unit bits
def test_crc64_vectors_and_combine():
    assert crc64(b"123456789") == 11051210869376104954
    assert crc64(b"hello world") == 5981764153023615706
    assert crc64(b"") == 0
    a, b = data(1000), data(777, 3)
    assert crc64(b, crc64(a)) == crc64(a + b)
    assert crc64_combine(crc64(a), crc64(b), len(b)) == crc64(a + b)
    assert crc64_combine(crc64(a), 0, 0) == crc64(a)


# ----------------------------------------------------------------------------- basic object ops
def test_put_get_head_roundtrip(any_bucket, server):
    body = data(5000)
    r = any_bucket.put_object("dir/a b+c%.txt", body, headers={
        "x-oss-meta-MyKey": "Value1", "Content-Type": "text/plain", "Cache-Control": "no-cache",
        "Content-Disposition": "attachment"})
    md5 = hashlib.md5(body).hexdigest().upper()
    assert r.status == 200 and r.etag == md5 and r.crc == crc64(body)
    assert re.fullmatch(r"[0-9A-F]{24}", r.request_id)
    assert r.headers["Content-MD5"] == base64.b64encode(hashlib.md5(body).digest()).decode()

    g = any_bucket.get_object("dir/a b+c%.txt")
    assert g.read() == body
    assert g.server_crc == crc64(body) and g.client_crc == crc64(body)
    assert g.headers["x-oss-meta-mykey"] == "Value1"
    assert g.content_type == "text/plain"
    assert g.headers["Cache-Control"] == "no-cache" and g.headers["Content-Disposition"] == "attachment"
    assert g.headers["ETag"] == f'"{md5}"' and g.headers["Accept-Ranges"] == "bytes"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", g.headers["Last-Modified"])

    h = any_bucket.head_object("dir/a b+c%.txt")
    assert h.content_length == 5000 and h.etag == md5 and h.object_type == "Normal"
    assert abs(h.last_modified - time.time()) < 10 and h.server_crc == crc64(body)

    m = any_bucket.get_object_meta("dir/a b+c%.txt")
    assert m.content_length == 5000 and m.etag == md5
    assert any_bucket.object_exists("dir/a b+c%.txt") and not any_bucket.object_exists("nope")

    # empty body (oss2 sends it chunked) and a generator body (chunked)
    any_bucket.put_object("empty", b"")
    assert any_bucket.get_object("empty").read() == b""
    any_bucket.put_object("gen", (data(1000, i) for i in range(5)))
    assert any_bucket.get_object("gen").read() == b"".join(data(1000, i) for i in range(5))
    assert server.requests_for("PUT", key="gen")[-1].headers.get("transfer-encoding") == "chunked"

    # response-* overrides
    g = any_bucket.get_object("empty", params={"response-content-type": "image/png"})
    assert g.headers["Content-Type"] == "image/png"

    # delete, also of a missing key (204)
    assert any_bucket.delete_object("empty").status == 204
    assert any_bucket.delete_object("empty").status == 204
    with pytest.raises(oss2.exceptions.NoSuchKey):
        any_bucket.get_object("empty")


def test_errors_codes_and_head_x_oss_err(bucket, server, v2):
    with pytest.raises(oss2.exceptions.NoSuchKey) as ei:
        bucket.head_object("missing")
    assert ei.value.code == "NoSuchKey" and re.fullmatch(r"[0-9A-F]{24}", ei.value.request_id)
    nb = oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, "no-such-bucket")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nb.head_object("x")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nb.object_exists("x")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        nb.put_object("x", b"1")
    with pytest.raises(oss.exceptions.OperationError) as ei:
        v2.head_object(oss.HeadObjectRequest(bucket=BUCKET, key="missing"))
    se = service_error(ei.value)
    assert se.status_code == 404 and se.code == "NoSuchKey" and se.ec == "0026-00000001"
    # invalid names
    with pytest.raises(oss2.exceptions.InvalidObjectName):
        bucket.put_object("k" * 1024, b"x")
    bucket.put_object("k" * 1023, b"x")
    # Content-MD5 mismatch
    with pytest.raises(oss2.exceptions.InvalidDigest):
        bucket.put_object("md5", b"abc", headers={"Content-MD5": base64.b64encode(b"0" * 16).decode()})
    # anonymous request
    r = requests.get(f"{server.endpoint}/{BUCKET}/md5")
    assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text


def test_signatures_wrong_secret_unknown_key_sts(server):
    good = oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)
    good.put_object("k", b"v")
    for auth, kw in ((oss2.Auth(AK, "wrong"), {}), (oss2.AuthV4(AK, "wrong"), {"region": REGION})):
        b = oss2.Bucket(auth, server.endpoint, BUCKET, **kw)
        with pytest.raises(oss2.exceptions.SignatureDoesNotMatch) as ei:
            b.get_object("k")
        assert ei.value.status == 403 and "StringToSign" in ei.value.details
        with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
            b.head_object("k")  # HEAD: via x-oss-err
    sts = ei.value.details["StringToSign"]
    assert sts.startswith("OSS4-HMAC-SHA256\n") and "/cn-hangzhou/oss/aliyun_v4_request" in sts
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        oss2.Bucket(oss2.Auth("other", SK), server.endpoint, BUCKET).get_object("k")
    assert ei.value.code == "InvalidAccessKeyId"
    # V2 with a wrong secret (V4 by default) and a V1-signing V2 client
    with pytest.raises(oss.exceptions.OperationError) as ei:
        make_v2(server, secret="wrong", retry_max_attempts=1).get_object(oss.GetObjectRequest(bucket=BUCKET, key="k"))
    assert service_error(ei.value).code == "SignatureDoesNotMatch"
    r = make_v2(server, signature_version="v1").get_object(oss.GetObjectRequest(bucket=BUCKET, key="k"))
    assert r.body.read() == b"v"
    # STS token: any token accepted by default
    sb = oss2.Bucket(oss2.StsAuth(AK, SK, "some-token"), server.endpoint, BUCKET)
    assert sb.get_object("k").read() == b"v"
    assert server.requests[-1].headers["x-oss-security-token"] == "some-token"
    sb4 = oss2.Bucket(oss2.StsAuth(AK, SK, "tok", auth_version="v4"), server.endpoint, BUCKET, region=REGION)
    assert sb4.get_object("k").read() == b"v"
    server.security_tokens = {"good-token"}
    assert oss2.Bucket(oss2.StsAuth(AK, SK, "good-token"), server.endpoint, BUCKET).get_object("k").read() == b"v"
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        sb.get_object("k")
    assert ei.value.status == 403 and ei.value.code == "InvalidSecurityToken"


def test_presigned_urls(server):
    for auth, kw in ((oss2.Auth(AK, SK), {}), (oss2.AuthV4(AK, SK), {"region": REGION})):
        b = oss2.Bucket(auth, server.endpoint, BUCKET, **kw)
        key = "pre/sp ace+plus%.bin"
        url = b.sign_url("PUT", key, 60)
        assert requests.put(url, data=b"presigned").status_code == 200
        url = b.sign_url("GET", key, 60)
        r = requests.get(url)
        assert r.status_code == 200 and r.content == b"presigned"
        bad = url.replace("Signature=", "Signature=x") if "Signature=" in url else url + "0"
        assert requests.get(bad).status_code == 403
    v1 = oss2.Bucket(oss2.Auth(AK, SK), server.endpoint, BUCKET)
    expired = v1.sign_url("GET", "pre/sp ace+plus%.bin", -10)
    r = requests.get(expired)
    assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text


def test_ranges_legacy_and_standard(bucket, v2):
    body = data(1000)
    bucket.put_object("r", body)

    def get(rng, standard=False):
        h = {"Range": rng}
        if standard:
            h["x-oss-range-behavior"] = "standard"
        return bucket.get_object("r", headers=h)

    r = bucket.get_object("r", byte_range=(10, 19))
    assert r.status == 206 and r.read() == body[10:20]
    assert r.headers["Content-Range"] == "bytes 10-19/1000"
    assert r.server_crc == crc64(body)  # whole-object CRC on a 206
    assert get("bytes=990-").read() == body[990:]
    assert get("bytes=-5").read() == body[-5:]
    for bad in ("bytes=0-1000", "bytes=1000-2000", "bytes=1000-", "bytes=-2000", "byte=0-499", "bytes=5-1"):
        r = get(bad)
        assert r.status == 200 and r.read() == body, bad
    r = get("bytes=500-2000", standard=True)
    assert r.status == 206 and r.read() == body[500:]
    r = get("bytes=-2000", standard=True)
    assert r.status == 206 and r.read() == body
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        get("bytes=1000-", standard=True)
    assert ei.value.status == 416 and ei.value.code == "InvalidRange"
    r = v2.get_object(oss.GetObjectRequest(bucket=BUCKET, key="r", range_header="bytes=100-199",
                                           range_behavior="standard"))
    assert r.content_range == "bytes 100-199/1000" and r.body.read() == body[100:200]


def test_conditional_get_and_request_log(bucket, server):
    r = bucket.put_object("c", b"conditional")
    with pytest.raises(oss2.exceptions.PreconditionFailed):
        bucket.get_object("c", headers={"If-Match": '"0123"'})
    assert bucket.get_object("c", headers={"If-Match": r.etag}).read() == b"conditional"  # no quotes, as oss2
    with pytest.raises(oss2.exceptions.NotModified):
        bucket.get_object("c", headers={"If-None-Match": f'"{r.etag}"'})
    with pytest.raises(oss2.exceptions.NotModified):
        bucket.get_object("c", headers={"If-Modified-Since": oss2.utils.http_date(time.time() + 60)})
    with pytest.raises(oss2.exceptions.PreconditionFailed):
        bucket.get_object("c", headers={"If-Unmodified-Since": oss2.utils.http_date(time.time() - 3600)})
    got = [q.headers.get("if-match") for q in server.requests_for("GET", key="c")]
    assert got[:2] == ['"0123"', r.etag]
    assert [q.status for q in server.requests_for("GET", key="c")] == [412, 200, 304, 304, 412]


def test_metadata_rules_and_forbid_overwrite(bucket):
    bucket.put_object("m", b"x", headers={"x-oss-meta-A-B": "1"})
    assert bucket.head_object("m").headers["x-oss-meta-a-b"] == "1"
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.put_object("m2", b"x", headers={"x-oss-meta-big": "v" * 8200})
    assert ei.value.status == 400 and ei.value.code == "MetadataTooLarge"
    bucket.put_object("m2", b"x", headers={"x-oss-meta-big": "v" * 8000})
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.put_object("m3", b"x", headers={"x-oss-meta-bad_name": "1"})
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.put_object("m", b"y", headers={"x-oss-forbid-overwrite": "true"})
    assert ei.value.status == 409 and ei.value.code == "FileAlreadyExists"
    bucket.put_object("m4", b"y", headers={"x-oss-forbid-overwrite": "true"})
    assert bucket.get_object("m").read() == b"x"


@pytest.mark.expect_log(r"ERROR oss2\.utils: Exception: .*InconsistentError")
def test_wrong_crc_is_detected_by_clients(bucket, server, v2):
    bucket.put_object("crc", b"payload")
    server.crc_tamper = 1
    with pytest.raises(oss2.exceptions.InconsistentError):
        bucket.put_object("crc2", b"payload")
    with pytest.raises(oss2.exceptions.InconsistentError):
        bucket.get_object_to_file("crc", os.devnull)
    with pytest.raises(oss.exceptions.OperationError) as ei:
        v2.put_object(oss.PutObjectRequest(bucket=BUCKET, key="crc3", body=b"payload"))
    assert isinstance(ei.value.unwrap(), oss.exceptions.InconsistentError)
    server.crc_tamper = 0
    bucket.get_object_to_file("crc", os.devnull)


# ----------------------------------------------------------------------------- delete / list
def test_batch_delete(bucket, v2):
    for k in ("d/1", "d/2", "d/3 x"):
        bucket.put_object(k, b"1")
    r = bucket.batch_delete_objects(["d/1", "d/3 x", "never"])
    assert sorted(r.deleted_keys) == ["d/1", "d/3 x", "never"]
    r = v2.delete_multiple_objects(oss.DeleteMultipleObjectsRequest(
        bucket=BUCKET, objects=[oss.DeleteObject(key="d/2")], quiet=True))
    assert r.status_code == 200 and not r.deleted_objects
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix="d/")] == []


def test_listing_v1_v2_paging_delimiter_encoding(bucket, v2):
    keys = ["a/1", "a/2", "a/b/3", "b", "c d+e", "c/x", "c/y/z", "z%", "中文.txt"]
    for k in keys:
        bucket.put_object(k, k.encode())
    assert [o.key for o in oss2.ObjectIterator(bucket, max_keys=2)] == sorted(keys)
    assert [o.key for o in oss2.ObjectIteratorV2(bucket, max_keys=3)] == sorted(keys)
    top = [o.key for o in oss2.ObjectIterator(bucket, delimiter="/", max_keys=2)]
    assert top == ["a/", "b", "c d+e", "c/", "z%", "中文.txt"]
    assert [o.key for o in oss2.ObjectIteratorV2(bucket, delimiter="/", max_keys=1)] == top
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix="a/", delimiter="/")] == ["a/1", "a/2", "a/b/"]
    # raw page values
    r = bucket.list_objects(max_keys=2)
    assert r.is_truncated and r.next_marker == "a/2" and [o.key for o in r.object_list] == ["a/1", "a/2"]
    o = r.object_list[0]
    assert o.size == 3 and o.etag == hashlib.md5(b"a/1").hexdigest().upper() and o.type == "Normal"
    r = bucket.list_objects(marker="c/x", delimiter="/")
    assert not r.is_truncated and [x.key for x in r.object_list] == ["z%", "中文.txt"]
    r = bucket.list_objects_v2(start_after="b", max_keys=2, delimiter="/")
    assert [x.key for x in r.object_list] == ["c d+e"] and r.prefix_list == ["c/"] and r.is_truncated
    r2 = bucket.list_objects_v2(continuation_token=r.next_continuation_token, delimiter="/")
    assert [x.key for x in r2.object_list] == ["z%", "中文.txt"] and not r2.is_truncated
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.list_objects(max_keys=1001)
    # V2 SDK paginators
    got = []
    for page in v2.list_objects_v2_paginator(limit=2).iter_page(oss.ListObjectsV2Request(bucket=BUCKET)):
        got += [c.key for c in page.contents]
    assert got == sorted(keys)
    got = []
    for page in v2.list_objects_paginator(limit=4).iter_page(oss.ListObjectsRequest(bucket=BUCKET, delimiter="/")):
        got += [c.key for c in (page.contents or [])] + [p.prefix for p in (page.common_prefixes or [])]
    assert sorted(got) == sorted(top)


# ----------------------------------------------------------------------------- copy
def test_copy_object(bucket, server, v2):
    bucket.put_object("src/o", b"copy me", headers={"x-oss-meta-a": "1", "Content-Type": "text/x"})
    etag = bucket.head_object("src/o").etag
    r = bucket.copy_object(BUCKET, "src/o", "dst/o", headers={"x-oss-meta-ignored": "2"})
    assert r.etag == etag
    h = bucket.head_object("dst/o")
    assert h.headers["x-oss-meta-a"] == "1" and "x-oss-meta-ignored" not in h.headers
    assert h.content_type == "text/x" and bucket.get_object("dst/o").read() == b"copy me"
    bucket.copy_object(BUCKET, "src/o", "dst/r", headers={"x-oss-metadata-directive": "REPLACE",
                                                          "x-oss-meta-b": "2", "Content-Type": "text/y"})
    h = bucket.head_object("dst/r")
    assert h.headers["x-oss-meta-b"] == "2" and "x-oss-meta-a" not in h.headers and h.content_type == "text/y"
    bucket.update_object_meta("dst/r", {"x-oss-meta-c": "3"})
    assert bucket.head_object("dst/r").headers["x-oss-meta-c"] == "3"
    with pytest.raises(oss2.exceptions.PreconditionFailed):
        bucket.copy_object(BUCKET, "src/o", "dst/x", headers={"x-oss-copy-source-if-match": '"BAD"'})
    bucket.copy_object(BUCKET, "src/o", "dst/x", headers={"x-oss-copy-source-if-match": etag})
    assert server.requests[-1].headers["x-oss-copy-source-if-match"] == etag
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.copy_object(BUCKET, "src/o", "dst/x", headers={"x-oss-forbid-overwrite": "true"})
    assert ei.value.code == "FileAlreadyExists"
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.copy_object(BUCKET, "src/none", "dst/y")
    # V2 sends the source key with "/" unencoded
    r = v2.copy_object(oss.CopyObjectRequest(bucket=BUCKET, key="dst/v2", source_bucket=BUCKET, source_key="src/o"))
    assert r.etag == f'"{etag}"' and r.hash_crc64 == str(crc64(b"copy me"))
    assert bucket.get_object("dst/v2").read() == b"copy me"


# ----------------------------------------------------------------------------- multipart
def test_multipart_cycle_and_errors(bucket, server, v2):
    p1, p2 = data(102400, 1), data(5000, 2)
    up = bucket.init_multipart_upload("mp/obj", headers={"x-oss-meta-m": "1", "Content-Type": "a/b"}).upload_id
    assert re.fullmatch(r"[0-9A-F]{32}", up)
    r1 = bucket.upload_part("mp/obj", up, 1, p1)
    r2 = bucket.upload_part("mp/obj", up, 2, p2)
    assert r1.crc == crc64(p1) and r1.etag == hashlib.md5(p1).hexdigest().upper()
    lp = bucket.list_parts("mp/obj", up)
    assert [(p.part_number, p.size, p.etag) for p in lp.parts] == [(1, 102400, r1.etag), (2, 5000, r2.etag)]
    lu = bucket.list_multipart_uploads()
    assert [(u.key, u.upload_id) for u in lu.upload_list] == [("mp/obj", up)]
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.upload_part("mp/obj", up, 0, b"x")
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.upload_part("mp/obj", up, 10001, b"x")
    assert ei.value.details.get("ArgumentName") == "partNumber"
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.upload_part("mp/obj", "0" * 32, 1, b"x")
    with pytest.raises(oss2.exceptions.ServerError) as ei:  # wrong ETag
        bucket.complete_multipart_upload("mp/obj", up, [oss2.models.PartInfo(1, "00" * 16), oss2.models.PartInfo(2, r2.etag)])
    assert ei.value.code == "InvalidPart"
    r = bucket.complete_multipart_upload("mp/obj", up, [
        oss2.models.PartInfo(1, r1.etag, size=len(p1), part_crc=r1.crc),
        oss2.models.PartInfo(2, r2.etag, size=len(p2), part_crc=r2.crc)])
    assert r.crc == crc64(p1 + p2) and r.etag.endswith("-2")
    h = bucket.head_object("mp/obj")
    assert h.object_type == "Multipart" and h.content_length == len(p1) + len(p2)
    assert h.headers["x-oss-meta-m"] == "1" and h.content_type == "a/b"
    assert bucket.get_object("mp/obj", byte_range=(102390, 102409)).read() == (p1 + p2)[102390:102410]
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.complete_multipart_upload("mp/obj", up, [oss2.models.PartInfo(1, r1.etag)])

    # EntityTooSmall only at Complete
    up = bucket.init_multipart_upload("mp/small").upload_id
    s1 = bucket.upload_part("mp/small", up, 1, b"tiny")
    s2 = bucket.upload_part("mp/small", up, 2, b"tiny2")
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.complete_multipart_upload("mp/small", up, [oss2.models.PartInfo(1, s1.etag), oss2.models.PartInfo(2, s2.etag)])
    assert ei.value.status == 400 and ei.value.code == "EntityTooSmall"
    # a single small part is fine; UploadPartCopy
    up2 = bucket.init_multipart_upload("mp/copy").upload_id
    c = bucket.upload_part_copy(BUCKET, "mp/obj", (0, 102399), "mp/copy", up2, 1)
    c2 = bucket.upload_part_copy(BUCKET, "mp/obj", (102400, 102400 + 4999), "mp/copy", up2, 2)
    bucket.complete_multipart_upload("mp/copy", up2, [oss2.models.PartInfo(1, c.etag), oss2.models.PartInfo(2, c2.etag)])
    assert bucket.get_object("mp/copy").read() == p1 + p2
    assert bucket.abort_multipart_upload("mp/small", up).status == 204
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.abort_multipart_upload("mp/small", up)
    assert bucket.list_multipart_uploads().upload_list == []


def test_v2_invalid_part_order_and_complete_all(v2):
    init = v2.initiate_multipart_upload(oss.InitiateMultipartUploadRequest(bucket=BUCKET, key="v2/mp"))
    e1 = v2.upload_part(oss.UploadPartRequest(bucket=BUCKET, key="v2/mp", upload_id=init.upload_id,
                                              part_number=1, body=data(102400))).etag
    e2 = v2.upload_part(oss.UploadPartRequest(bucket=BUCKET, key="v2/mp", upload_id=init.upload_id,
                                              part_number=2, body=b"end")).etag
    with pytest.raises(oss.exceptions.OperationError) as ei:
        v2.complete_multipart_upload(oss.CompleteMultipartUploadRequest(
            bucket=BUCKET, key="v2/mp", upload_id=init.upload_id,
            complete_multipart_upload=oss.CompleteMultipartUpload(
                parts=[oss.UploadPart(part_number=2, etag=e2), oss.UploadPart(part_number=1, etag=e1)])))
    assert service_error(ei.value).code == "InvalidPartOrder"
    r = v2.complete_multipart_upload(oss.CompleteMultipartUploadRequest(
        bucket=BUCKET, key="v2/mp", upload_id=init.upload_id, complete_all="yes"))
    assert r.hash_crc64 == str(crc64(data(102400) + b"end"))
    g = v2.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2/mp"))
    assert g.body.read() == data(102400) + b"end"


def test_list_uploads_and_parts_paging(bucket, v2):
    ids = [bucket.init_multipart_upload(k).upload_id for k in ("u/a", "u/a", "u/b", "v/c", "w")]
    got = [(u.key, u.upload_id) for u in oss2.MultipartUploadIterator(bucket, max_uploads=2)]
    assert got == sorted(zip(("u/a", "u/a", "u/b", "v/c", "w"), ids), key=lambda t: (t[0], ids.index(t[1])))
    r = bucket.list_multipart_uploads(delimiter="/", max_uploads=10)
    assert [u.key for u in r.upload_list] == ["w"] and r.prefix_list == ["u/", "v/"]
    for n in range(1, 6):
        bucket.upload_part("w", ids[4], n, b"p%d" % n)
    assert [p.part_number for p in oss2.PartIterator(bucket, "w", ids[4], max_parts=2)] == [1, 2, 3, 4, 5]
    r = v2.list_parts(oss.ListPartsRequest(bucket=BUCKET, key="w", upload_id=ids[4], max_parts=3))
    assert r.is_truncated and r.next_part_number_marker == 3 and [p.size for p in r.parts] == [2, 2, 2]
    assert r.parts[0].hash_crc64 == str(crc64(b"p1"))


def test_v2_client_basic_roundtrip(v2, server):
    r = v2.put_object(oss.PutObjectRequest(bucket=BUCKET, key="v2/dir/k ey", body=b"v2 body",
                                           metadata={"Owner": "me"}, content_type="text/plain"))
    assert r.status_code == 200 and r.etag == '"%s"' % hashlib.md5(b"v2 body").hexdigest().upper()
    assert server.requests[-1].path.startswith(f"/{BUCKET}/v2/dir/k%20ey")  # "/" not encoded by V2
    h = v2.head_object(oss.HeadObjectRequest(bucket=BUCKET, key="v2/dir/k ey"))
    assert h.content_length == 7 and h.metadata == {"owner": "me"} and h.content_type == "text/plain"
    assert h.hash_crc64 == str(crc64(b"v2 body")) and h.object_type == "Normal"
    m = v2.get_object_meta(oss.GetObjectMetaRequest(bucket=BUCKET, key="v2/dir/k ey"))
    assert m.content_length == 7
    assert v2.is_object_exist(BUCKET, "v2/dir/k ey") and not v2.is_object_exist(BUCKET, "v2/none")
    g = v2.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2/dir/k ey"))
    assert g.body.read() == b"v2 body"
    v2.delete_object(oss.DeleteObjectRequest(bucket=BUCKET, key="v2/dir/k ey"))
    assert not v2.is_object_exist(BUCKET, "v2/dir/k ey")


def test_resumable_upload_and_download(bucket, tmp_path):
    src = tmp_path / "src.bin"
    payload = data(350 * 1024 + 7)
    src.write_bytes(payload)
    oss2.resumable_upload(bucket, "res/obj", str(src), store=oss2.ResumableStore(root=str(tmp_path)),
                          multipart_threshold=100 * 1024, part_size=100 * 1024, num_threads=2)
    assert bucket.head_object("res/obj").object_type == "Multipart"
    dst = tmp_path / "dst.bin"
    oss2.resumable_download(bucket, "res/obj", str(dst), store=oss2.ResumableDownloadStore(root=str(tmp_path)),
                            multiget_threshold=100 * 1024, part_size=100 * 1024, num_threads=2)
    assert dst.read_bytes() == payload


# ----------------------------------------------------------------------------- client-side encryption
def test_crypto_bucket_put_get_range_multipart(server, rsa_pem, bucket):
    cb = crypto_bucket(server, rsa_pem)
    plain = data(300 * 1024 + 1, 5)
    cb.put_object("enc/simple", plain)
    stored = server.get_object_bytes(BUCKET, "enc/simple")
    assert len(stored) == len(plain) and stored != plain
    meta = server.object_meta(BUCKET, "enc/simple")
    assert meta["x-oss-meta-client-side-encryption-cek-alg"] == "AES/CTR/NoPadding"
    assert meta["x-oss-meta-client-side-encryption-wrap-alg"] == "RSA/NONE/PKCS1Padding"
    assert cb.get_object("enc/simple").read() == plain
    assert cb.get_object("enc/simple", byte_range=(1000, 5000)).read() == plain[1000:5001]
    assert cb.get_object("enc/simple", byte_range=(33, 100)).read() == plain[33:101]

    part = 100 * 1024
    ctx = oss2.models.MultipartUploadCryptoContext(data_size=len(plain), part_size=part)
    up = cb.init_multipart_upload("enc/mp", upload_context=ctx).upload_id
    infos = []
    for i in range(0, len(plain), part):
        n = i // part + 1
        r = cb.upload_part("enc/mp", up, n, plain[i:i + part], upload_context=ctx)
        infos.append(oss2.models.PartInfo(n, r.etag, size=len(plain[i:i + part]), part_crc=r.crc))
    assert len(infos) == 4
    lp = bucket.list_parts("enc/mp", up)
    assert len(lp.parts) == 4
    cb.complete_multipart_upload("enc/mp", up, infos)
    assert cb.get_object("enc/mp").read() == plain
    assert cb.get_object("enc/mp", byte_range=(part - 10, part + 20)).read() == plain[part - 10:part + 21]
    # CopyObject with COPY keeps the object decryptable
    bucket.copy_object(BUCKET, "enc/mp", "enc/copy")
    assert cb.get_object("enc/copy").read() == plain


def test_crypto_resumable_upload(server, rsa_pem, tmp_path):
    cb = crypto_bucket(server, rsa_pem)
    src = tmp_path / "p.bin"
    plain = data(250 * 1024 + 3, 9)
    src.write_bytes(plain)
    oss2.resumable_upload(cb, "enc/res", str(src), store=oss2.ResumableStore(root=str(tmp_path)),
                          multipart_threshold=100 * 1024, part_size=100 * 1024, num_threads=1)
    assert server.object_meta(BUCKET, "enc/res")["x-oss-meta-client-side-encryption-data-size"] == str(len(plain))
    assert cb.get_object("enc/res").read() == plain


def _cse_headers(**over):
    h = {
        "x-oss-meta-client-side-encryption-key": "a2V5",
        "x-oss-meta-client-side-encryption-start": "c3RhcnQ=",
        "x-oss-meta-client-side-encryption-cek-alg": "AES/CTR/NoPadding",
        "x-oss-meta-client-side-encryption-wrap-alg": "RSA/NONE/PKCS1Padding",
        "x-oss-meta-client-side-encryption-data-size": str(2 * 102400 + 10),
        "x-oss-meta-client-side-encryption-part-size": "102400",
    }
    for k, v in over.items():
        name = "x-oss-meta-client-side-encryption-" + k.replace("_", "-")
        if v is None:
            h.pop(name, None)
        else:
            h[name] = v
    return h


def _ec(exc):
    return exc.details.get("EC")


def test_cse_rules_enforced_by_server(bucket):
    # PutObject: key/start/cek-alg/wrap-alg required once any CSE header is present
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.put_object("cse/p", b"x", headers={"x-oss-meta-client-side-encryption-key": "a2V5"})
    assert _ec(ei.value) == "0005-00000402"
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.put_object("cse/p", b"x", headers=_cse_headers(wrap_alg=None))
    assert _ec(ei.value) == "0005-00000404"
    bucket.put_object("cse/p", b"x", headers=_cse_headers(data_size=None, part_size=None))

    # Initiate: data-size / part-size required, integers, <= 10000 parts
    for over, ec in (({"data_size": None}, "0005-00000406"), ({"part_size": None}, "0005-00000407"),
                     ({"data_size": "9x5.2"}, "0005-00000408"), ({"part_size": "abc"}, "0005-00000409"),
                     ({"data_size": str(16 * 10001), "part_size": "16"}, "0005-00000410")):
        with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
            bucket.init_multipart_upload("cse/mp", headers=_cse_headers(**over))
        assert _ec(ei.value) == ec, over

    up = bucket.init_multipart_upload("cse/mp", headers=_cse_headers()).upload_id
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:  # part-size differs from Init
        bucket.upload_part("cse/mp", up, 1, data(102400), headers=_cse_headers(part_size="204800"))
    assert _ec(ei.value) == "0005-00000418"
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:  # start differs from Init
        bucket.upload_part("cse/mp", up, 1, data(102400), headers=_cse_headers(start="b3RoZXI="))
    assert _ec(ei.value) == "0005-00000413"
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:  # data-size missing on UploadPart
        bucket.upload_part("cse/mp", up, 1, data(102400), headers=_cse_headers(data_size=None))
    assert _ec(ei.value) == "0005-00000406"
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:  # non-last part not exactly part-size
        bucket.upload_part("cse/mp", up, 1, data(102416), headers=_cse_headers())
    assert _ec(ei.value) == "0005-00000419"
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:  # last part does not reach data-size
        bucket.upload_part("cse/mp", up, 3, data(9), headers=_cse_headers())
    assert _ec(ei.value) == "0005-00000420"
    e1 = bucket.upload_part("cse/mp", up, 1, data(102400), headers=_cse_headers()).etag
    e2 = bucket.upload_part("cse/mp", up, 2, data(102400), headers=_cse_headers()).etag
    # Complete with total != data-size (part 3 missing)
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.complete_multipart_upload("cse/mp", up, [oss2.models.PartInfo(1, e1), oss2.models.PartInfo(2, e2)])
    assert _ec(ei.value) == "0005-00000420"
    e3 = bucket.upload_part("cse/mp", up, 3, data(10), headers=_cse_headers()).etag
    bucket.complete_multipart_upload("cse/mp", up, [oss2.models.PartInfo(n, e) for n, e in ((1, e1), (2, e2), (3, e3))])
    assert bucket.head_object("cse/mp").headers["x-oss-meta-client-side-encryption-part-size"] == "102400"

    # CopyObject may not change/drop the CSE metadata of an encrypted source
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.update_object_meta("cse/mp", {"x-oss-meta-other": "1"})
    assert _ec(ei.value) == "0005-00000421"
    same = {k: v for k, v in bucket.head_object("cse/mp").headers.items() if k.lower().startswith("x-oss-meta-")}
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.update_object_meta("cse/mp", dict(same, **{"x-oss-meta-client-side-encryption-start": "eA=="}))
    bucket.update_object_meta("cse/mp", dict(same, **{"x-oss-meta-other": "1"}))
    assert bucket.head_object("cse/mp").headers["x-oss-meta-other"] == "1"
    bucket.copy_object(BUCKET, "cse/mp", "cse/copy")  # COPY keeps them: allowed

    # UploadPartCopy from an encrypted source is refused
    up2 = bucket.init_multipart_upload("cse/upc").upload_id
    with pytest.raises(oss2.exceptions.InvalidArgument) as ei:
        bucket.upload_part_copy(BUCKET, "cse/mp", (0, 99), "cse/upc", up2, 1)
    assert _ec(ei.value) == "0042-00000309"


def test_v2_encryption_client(server, rsa_pem):
    priv, pub = rsa_pem
    ec = oss.EncryptionClient(make_v2(server), MasterRsaCipher(mat_desc={"k": "v"}, public_key=pub, private_key=priv))
    plain = data(300 * 1024 + 1, 3)
    ec.put_object(oss.PutObjectRequest(bucket=BUCKET, key="v2enc/p", body=plain))
    assert server.get_object_bytes(BUCKET, "v2enc/p") != plain
    assert ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2enc/p")).body.read() == plain
    r = ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2enc/p", range_header="bytes=1001-3000"))
    assert r.body.read() == plain[1001:3001]
    part = 100 * 1024
    init = ec.initiate_multipart_upload(oss.InitiateMultipartUploadRequest(
        bucket=BUCKET, key="v2enc/mp", cse_part_size=part, cse_data_size=len(plain)))
    parts = []
    for i in range(0, len(plain), part):
        n = i // part + 1
        res = ec.upload_part(oss.UploadPartRequest(bucket=BUCKET, key="v2enc/mp", upload_id=init.upload_id,
                                                   part_number=n, body=plain[i:i + part],
                                                   cse_multipart_context=init.cse_multipart_context))
        parts.append(oss.UploadPart(part_number=n, etag=res.etag))
    lp = ec.list_parts(oss.ListPartsRequest(bucket=BUCKET, key="v2enc/mp", upload_id=init.upload_id))
    assert lp.client_encryption_part_size == part and len(lp.parts) == 4
    ec.complete_multipart_upload(oss.CompleteMultipartUploadRequest(
        bucket=BUCKET, key="v2enc/mp", upload_id=init.upload_id,
        complete_multipart_upload=oss.CompleteMultipartUpload(parts=parts)))
    assert ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2enc/mp")).body.read() == plain
    r = ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key="v2enc/mp", range_header=f"bytes={part - 5}-{part + 40}"))
    assert r.body.read() == plain[part - 5:part + 41]
    # cross-SDK: oss2 CryptoBucket reads the V2-written object (same key, matdesc differs -> plain provider)
    cb = crypto_bucket(server, rsa_pem)
    server.buckets[BUCKET].objects["v2enc/p"].user_meta.pop("x-oss-meta-client-side-encryption-matdesc", None)
    assert cb.get_object("v2enc/p").read() == plain


# ----------------------------------------------------------------------------- faults / lifecycle
def test_fault_503_retried_by_v2_and_surfaced_by_oss2(server, bucket):
    v2r = make_v2(server, retryer=oss.retry.StandardRetryer(max_attempts=4, backoff_delayer=oss.retry.backoff.FixedDelayBackoff(0.01)))
    server.faults.add(status=503, count=2, methods=("PUT",), key_prefix="f/")
    server.clear_requests()
    v2r.put_object(oss.PutObjectRequest(bucket=BUCKET, key="f/x", body=b"after retries"))
    puts = server.requests_for("PUT", key="f/x")
    assert [r.status for r in puts] == [503, 503, 200] and [r.fault for r in puts[:2]] == ["error-503"] * 2
    server.faults.add(status=503, count=1, methods=("GET",))
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.get_object("f/x")
    assert ei.value.status == 503 and ei.value.code == "ServiceUnavailable"
    assert bucket.get_object("f/x").read() == b"after retries"
    # HEAD errors carry the code in x-oss-err
    server.faults.add(status=500, count=1, methods=("HEAD",))
    with pytest.raises(oss2.exceptions.ServerError) as ei:
        bucket.head_object("f/x")
    assert ei.value.status == 500 and ei.value.code == "InternalError"


def test_fault_reset_mid_body(server, bucket):
    body = data(400 * 1024)
    bucket.put_object("reset/x", body)
    server.faults.add_reset(count=1, where="response", methods=("GET",))
    with pytest.raises(requests.exceptions.ChunkedEncodingError) as ei:
        bucket.get_object("reset/x").read()
    assert "reset" in str(ei.value).lower()
    assert bucket.get_object("reset/x").read() == body
    server.faults.add_reset(count=1, where="request", methods=("PUT",))
    with pytest.raises(oss2.exceptions.RequestError):
        bucket.put_object("reset/y", data(2 * 1024 * 1024))
    assert not bucket.object_exists("reset/y")
    bucket.put_object("reset/y", b"ok")
    assert [k for k, _, _ in server.faults.injected] == ["reset-response", "reset-request"]
    # random resets at a bounded count; V2 retries them
    v2r = make_v2(server, retryer=oss.retry.StandardRetryer(max_attempts=5, backoff_delayer=oss.retry.backoff.FixedDelayBackoff(0.01)))
    server.faults.reset_rate(0.5, max_count=3, where=("request",))
    for i in range(6):
        v2r.put_object(oss.PutObjectRequest(bucket=BUCKET, key=f"reset/r{i}", body=data(64 * 1024, i)))
    assert 1 <= sum(1 for k, _, _ in server.faults.injected if k == "reset-request") <= 4
    for i in range(6):
        assert bucket.get_object(f"reset/r{i}").read() == data(64 * 1024, i)


def test_latency_and_stop_start_keeps_data(server, bucket):
    bucket.put_object("life/x", b"persist")
    server.faults.latency(0.1)
    t = time.monotonic()
    bucket.get_object("life/x").read()
    assert time.monotonic() - t >= 0.1
    server.faults.latency(0)
    endpoint = server.endpoint
    server.stop()
    with pytest.raises(oss2.exceptions.RequestError):
        oss2.Bucket(oss2.Auth(AK, SK), endpoint, BUCKET, connect_timeout=2).get_object("life/x")
    server.start()
    assert server.endpoint == endpoint
    assert bucket.get_object("life/x").read() == b"persist"


def test_root_dir_stores_bodies_on_disk(tmp_path):
    root = tmp_path / "blobs"
    with OssTestServer(access_key_id=AK, access_key_secret=SK, buckets=(BUCKET,), root_dir=str(root)) as srv:
        b = oss2.Bucket(oss2.Auth(AK, SK), srv.endpoint, BUCKET)
        payload = data(3 * 1024 * 1024)
        b.put_object("disk/x", payload)
        files = list(root.iterdir())
        assert len(files) == 1 and files[0].stat().st_size == len(payload)
        assert b.get_object("disk/x").read() == payload
        assert b.get_object("disk/x", byte_range=(1000000, 1000999)).read() == payload[1000000:1001000]
        up = b.init_multipart_upload("disk/mp").upload_id
        r1 = b.upload_part("disk/mp", up, 1, payload[:102400])
        r2 = b.upload_part("disk/mp", up, 2, payload[102400:102500])
        b.complete_multipart_upload("disk/mp", up, [oss2.models.PartInfo(1, r1.etag), oss2.models.PartInfo(2, r2.etag)])
        assert b.get_object("disk/mp").read() == payload[:102500]
        b.delete_object("disk/x")
        gc.collect()
        assert len(list(root.iterdir())) == 2  # the two parts of disk/mp


def test_separate_process_cli(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "oss_server.py")
    proc = subprocess.Popen([sys.executable, script, "--port", "0", "--access-key-id", AK,
                             "--access-key-secret", SK, "--bucket", "bench", "--root-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        b = oss2.Bucket(oss2.Auth(AK, SK), endpoint, "bench")
        b.put_object("k", b"from another process")
        assert b.get_object("k").read() == b"from another process"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
