"""Cross-language interop in every test run: the official C++, Go V1 and Go V2 SDKs'
encryption clients (binaries in ../shared/tools/sdk-clients) against an ossfuse mount of the
same bucket on the OSS test server. Each SDK writes objects (0 B, 1 B, 100 KiB + 7, 2 MiB + odd
multipart, with and without matdesc) that the mount reads whole and at an odd range; the mount
writes files (small and multipart) that each SDK reads whole and ranged; Go V1 does both with a
KMS CMK against the local KMS (``encoding = "raw"``). Values are compared by SHA-256.

One OSS server, one KMS and one mount serve the module. Without the SDK clients the module is
skipped, naming what is missing, except under CI (``$CI`` set), where that is a failure: CI
must prove interop. ``python tests/interop_matrix.py`` prints the full writer × reader matrix.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import AK, BUCKET, REGION, SK, Mount, run_sync
from interop_clients import (CLIENTS, KMS_CASES, MATDESC, MOUNT_OPTIONS, MOUNT_TO_SDK, SDK_BINARIES, SDK_TO_MOUNT,
                             Env, case_key, mount_keyring, require_tools, run_cell, tools_dir)
from kms_server import KmsTestServer
from ossfuse import envelope as env
from ossfuse import integrity

pytestmark = pytest.mark.timeout(300)
SDKS = ("cpp", "go1", "gov2")


@pytest.fixture(scope="module")
def interop(tmp_path_factory, cmk_path, other_cmk_path):
    """(Env, work dir): the OSS test server, a local KMS with one key, and a mount with the
    keyring of ``mount_keyring``; all ended at module end."""
    require_tools()
    from oss_remote import RemoteOssServer
    root = tmp_path_factory.mktemp("interop")
    server = RemoteOssServer(access_key_id=AK, access_key_secret=SK, bucket=BUCKET, region=REGION,
                             root_dir=str(root / "oss"))
    kms = KmsTestServer({AK: SK})
    mount = None
    try:
        kms.start()
        key_id = kms.create_key()
        mount = Mount(str(root / "m"), cmk_path, MOUNT_OPTIONS, server=server,
                      extra=mount_keyring(cmk_path, kms.endpoint, key_id))
        mount.start()
        yield Env(server.endpoint, cmk_path, other_cmk_path, mount, kms.endpoint, key_id), str(root / "work")
    finally:
        if mount is not None:
            mount.cleanup()
        kms.stop()
        server.close()


def client(interop, name):
    e, work = interop
    return CLIENTS[name](e, work)


def head(interop, key: str):
    """The object's ObjectInfo, straight from the OSS test server."""
    return run_sync(interop[0].mount.store.head, key)


def assert_all_ok(results, expected_cases):
    assert [name for name, _ in results] == [c.name for c in expected_cases]
    failed = [f"{name}: {problem}" for name, problem in results if problem]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("sdk", SDKS)
def test_sdk_writes_the_mount_reads(interop, sdk):
    results = run_cell(client(interop, sdk), client(interop, "mount"), SDK_TO_MOUNT)
    assert_all_ok(results, SDK_TO_MOUNT)


@pytest.mark.parametrize("sdk", SDKS)
def test_the_mount_writes_the_sdk_reads(interop, sdk):
    results = run_cell(client(interop, "mount"), client(interop, sdk), MOUNT_TO_SDK)
    assert_all_ok(results, MOUNT_TO_SDK)
    mount_client = client(interop, "mount")
    for case in MOUNT_TO_SDK:  # every object read was tagged (docs/integrity.md): the SDKs ignore the header
        if case.size and mount_client.supports(case) and client(interop, sdk).supports(case):
            tagged = integrity.parse(head(interop, case_key(case, mount_client, client(interop, sdk))).metadata)
            assert tagged is not None and len(tagged.tags) == 16 * -(-case.size // tagged.block), case.name
    meta = head(interop, f"md-mount-to-{sdk}/multi-md").metadata
    assert meta[env.H_MATDESC] == '{"desc":"x"}' and meta[env.H_PART_SIZE] == str(256 * 1024)


def test_go1_with_a_kms_cmk_both_ways(interop):
    go1, mount = client(interop, "go1"), client(interop, "mount")
    assert_all_ok(run_cell(go1, mount, KMS_CASES), KMS_CASES)
    assert_all_ok(run_cell(mount, go1, KMS_CASES), KMS_CASES)


@pytest.mark.parametrize("sdk", ("go1", "gov2"))
def test_go_writes_matdesc_text_byte_for_byte_as_ossfuse(interop, sdk):
    """The matdesc header text each Go SDK writes for a map with keys out of order and
    characters Go escapes equals ``envelope.encode_matdesc`` of the same map."""
    e, work = interop
    matdesc = {"z": "1", "a<b>&": 'x"\\/\t\b\f\x01\n', "m": "y", "B": "2", "u": "\u2028"}
    src = os.path.join(work, "md-probe")
    os.makedirs(work, exist_ok=True)
    with open(src, "wb") as f:
        f.write(b"probe")
    key = f"md-text-{sdk}"
    args = [os.path.join(tools_dir(), "sdk-clients", SDK_BINARIES[sdk]), "-endpoint", e.endpoint, "-bucket", BUCKET,
            "-ak", AK, "-sk", SK, "-pub", e.cmk + ".pub", "-priv", e.cmk, "-matdesc", json.dumps(matdesc),
            "put", key, src]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    meta = head(interop, key).metadata
    assert meta[env.H_MATDESC] == env.encode_matdesc(matdesc)
    assert MATDESC == {"desc": "x"}  # the cases above rely on a map whose two forms differ by a space
