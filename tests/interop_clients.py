"""Writers and readers of encrypted objects for the cross-language interop tests and matrix:
the official SDKs' encryption clients (C++ 1.10.1, Go V1, Go V2: binaries in
``../shared/tools/sdk-clients``, usage in ``../shared/tools/README.md``), oss2 CryptoBucket and
the Python V2 EncryptionClient (in process), and an ossfuse mount.

Every client writes ``bytes`` under a key and reads an object whole or a byte range (first and
last byte, both inclusive, as the SDKs take them). A *case* is one object: its size, whether it
is written in one PUT or as a multipart upload (``PART`` bytes a part), and whether it carries the
material description ``MATDESC`` or is wrapped by a KMS CMK. ``run_cell(writer, reader, cases)``
writes each case with one client and reads it whole and at an odd range with the other,
comparing SHA-256 digests.

How each reader is set up matters for matdesc (oss-cse-format.md §5): Go V1 is given the
matdesc and no MasterCipherManager, so it reads an object only if its header text equals Go's
own ``json.Marshal``; Go V2 gets a *different* key pair as its default master cipher and the
CMK as an extra one registered under the matdesc, so it reads only if its lookup by header text
hits; C++ and oss2 compare parsed maps; Python V2 gets one master cipher with the matdesc (its
lookup of extra ciphers is by ``json.dumps`` text, which the default form does not meet: README).
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import time
import subprocess
from dataclasses import dataclass

from conftest import AK, BUCKET, REGION, SK

MATDESC = {"desc": "x"}
PART = 512 * 1024  # bytes a part in the SDKs' multipart uploads (a multiple of 16)
MOUNT_OPTIONS = (f"multipart_threshold = {1 << 20}\npart_size = {256 * 1024}\n"
                 "upload_delay = 0\nclose_waits_for_upload = true")  # files > 1 MiB: multipart, 256 KiB parts
TOOLS_ENV = "OSSFUSE_SHARED_TOOLS"
SDK_BINARIES = {"cpp": "cseclient-cpp", "go1": "cseclient-go1", "gov2": "cseclient-gov2"}


def tools_dir() -> str:
    """Where the shared tools are: ``$OSSFUSE_SHARED_TOOLS``, else ``<repo>/../shared/tools``
    (CI puts a copy of shared/ beside the clone)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # normalised: the skip reasons of tests/posix_tools.py name it the same way (a trial)
    return os.environ.get(TOOLS_ENV) or os.path.normpath(os.path.join(repo, "..", "shared", "tools"))


def missing_tools() -> str | None:
    """Why the SDK clients cannot run here (None when they can): a binary absent, or the C++
    one's libcurl4 not installed."""
    base = os.path.join(tools_dir(), "sdk-clients")
    for name in SDK_BINARIES.values():
        path = os.path.join(base, name)
        if not os.access(path, os.X_OK):
            return (f"SDK client {path} not found (set ${TOOLS_ENV} to shared/tools, "
                    "or put shared/ beside the repository)")
    ldd = subprocess.run(["ldd", os.path.join(base, SDK_BINARIES["cpp"])], capture_output=True, text=True)
    if "not found" in ldd.stdout:
        return "the C++ SDK client's libraries are missing (apt-get install libcurl4): " + " ".join(
            line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line)
    return None


def require_tools() -> None:
    """Skip the calling test where the SDK client binaries cannot run (a developer's machine
    installed with OSSFUSE_NO_TEST_TOOLS, or without ../shared beside the clone); under CI
    (``$CI`` set) fail instead: CI must prove interop with the SDKs."""
    import pytest
    why = missing_tools()
    if why and "CI" in os.environ:
        pytest.fail(f"CI must prove interop with the SDKs, but {why}", pytrace=False)
    if why:
        pytest.skip(f"the official SDKs' encryption clients cannot run here: {why}")


@dataclass(frozen=True)
class Case:
    """One object: ``size`` bytes, one PUT or multipart, with MATDESC or not, RSA or KMS CMK."""

    name: str
    size: int
    multipart: bool = False
    matdesc: bool = False
    kms: bool = False

    @property
    def odd_range(self) -> tuple[int, int] | None:
        """(first, last) byte, inclusive, at unaligned offsets crossing blocks (and a part
        boundary of a multipart object); None for an empty object (nothing to range)."""
        if self.size == 0:
            return None
        first = 262139 if self.size > 300_000 else min(4097, self.size - 1)
        return first, min(self.size - 1, first + 70_001)


class ClientError(Exception):
    """A client could not write or read (message: its own error text)."""


def _run(args: list[str]) -> None:
    """Run an SDK client; raises ClientError with the last line it printed when it fails."""
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        said = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise ClientError(said[-1][:300] if said else f"exit status {r.returncode}")


class Client(abc.ABC):
    """A writer/reader. ``supports(case)``: whether it can take part in that case at all."""

    name = ""
    label = ""

    def supports(self, case: Case) -> bool:
        return not case.kms

    @abc.abstractmethod
    def put(self, key: str, data: bytes, case: Case) -> None:
        """Write ``data`` as object ``key`` the way ``case`` says."""

    @abc.abstractmethod
    def get(self, key: str, case: Case, rng: tuple[int, int] | None = None) -> bytes:
        """Object ``key`` decrypted, whole or bytes ``rng`` (first, last: inclusive)."""


class _BinaryClient(Client):
    """An SDK client binary, fed and read through files in ``work``."""

    def __init__(self, env, work: str):
        self.env, self.work = env, work
        self.bin = os.path.join(tools_dir(), "sdk-clients", SDK_BINARIES[self.name])
        os.makedirs(work, exist_ok=True)

    def _file(self, key: str, tag: str) -> str:
        return os.path.join(self.work, f"{self.name}-{tag}-" + key.replace("/", "_"))

    def put(self, key: str, data: bytes, case: Case) -> None:
        src = self._file(key, "in")
        with open(src, "wb") as f:
            f.write(data)
        verb = ["mput", key, src, str(PART)] if case.multipart else ["put", key, src]
        _run(self._command(case, False, verb))

    def get(self, key: str, case: Case, rng: tuple[int, int] | None = None) -> bytes:
        out = self._file(key, "out")
        open(out, "wb").close()  # the C++ client creates its output only when a body arrives
        verb = ["get", key, out] + ([str(rng[0]), str(rng[1])] if rng else [])
        _run(self._command(case, True, verb))
        with open(out, "rb") as f:
            return f.read()

    @abc.abstractmethod
    def _command(self, case: Case, reading: bool, verb: list[str]) -> list[str]:
        """The client's argument list for ``verb`` (put/mput/get KEY FILE ...)."""


class CppClient(_BinaryClient):
    """C++ SDK 1.10.1 OssEncryptionClient + SimpleRSAEncryptionMaterials (RSA only)."""

    name, label = "cpp", "C++ SDK"

    def _command(self, case, reading, verb):
        md = ",".join(f"{k}={v}" for k, v in MATDESC.items()) if case.matdesc else ""
        e = self.env
        return [self.bin, e.endpoint, BUCKET, AK, SK, e.cmk + ".pub", e.cmk, md] + verb


class Go1Client(_BinaryClient):
    """Go SDK V1 CryptoBucket; RSA, or KMS against the local KMS (``-kms``)."""

    name, label = "go1", "Go SDK V1"

    def supports(self, case: Case) -> bool:
        return True

    def _command(self, case, reading, verb):
        e = self.env
        args = [self.bin, "-endpoint", e.endpoint, "-bucket", BUCKET, "-ak", AK, "-sk", SK]
        if case.kms:
            args += ["-kms", e.kms_key_id, "-kms-endpoint", e.kms_endpoint.split("://", 1)[1], "-region", REGION]
        else:
            args += ["-pub", e.cmk + ".pub", "-priv", e.cmk]
        if case.matdesc:  # no -mgr: the header text must equal Go's json.Marshal of this
            args += ["-matdesc", json.dumps(MATDESC)]
        return args + verb


class Go2Client(_BinaryClient):
    """Go SDK V2 EncryptionClient. Reading an object with matdesc, the default master cipher
    is another key pair and the CMK is an extra cipher found by the header text."""

    name, label = "gov2", "Go SDK V2"

    def _command(self, case, reading, verb):
        e = self.env
        args = [self.bin, "-endpoint", e.endpoint, "-bucket", BUCKET, "-ak", AK, "-sk", SK, "-region", REGION]
        if case.matdesc and reading:
            args += ["-pub", e.other_cmk + ".pub", "-priv", e.other_cmk, "-extra", json.dumps(MATDESC),
                     "-extra-pub", e.cmk + ".pub", "-extra-priv", e.cmk]
        else:
            args += ["-pub", e.cmk + ".pub", "-priv", e.cmk]
            if case.matdesc:
                args += ["-matdesc", json.dumps(MATDESC)]
        return args + verb


class Oss2Client(Client):
    """oss2 CryptoBucket + RsaProvider (with the matdesc when the case has one)."""

    name, label = "oss2", "oss2 (Python V1)"

    def __init__(self, env, work: str):
        self.env = env

    def _bucket(self, case: Case):
        import conftest
        return conftest.crypto_bucket(self.env.endpoint, conftest.rsa_provider(
            self.env.cmk, MATDESC if case.matdesc else None))

    def put(self, key, data, case):
        import oss2
        cb = self._bucket(case)
        if not case.multipart:
            cb.put_object(key, data)
            return
        ctx = oss2.models.MultipartUploadCryptoContext(data_size=len(data), part_size=PART)
        up = cb.init_multipart_upload(key, upload_context=ctx).upload_id
        parts = []
        for i in range(0, len(data), PART):
            r = cb.upload_part(key, up, i // PART + 1, data[i:i + PART], upload_context=ctx)
            parts.append(oss2.models.PartInfo(i // PART + 1, r.etag, size=len(data[i:i + PART]), part_crc=r.crc))
        cb.complete_multipart_upload(key, up, parts)

    def get(self, key, case, rng=None):
        return self._bucket(case).get_object(key, byte_range=rng).read()


class PyV2Client(Client):
    """alibabacloud-oss-v2 EncryptionClient + MasterRsaCipher (with the matdesc when the case
    has one)."""

    name, label = "pyv2", "Python SDK V2"

    def __init__(self, env, work: str):
        self.env = env

    def _client(self, case: Case):
        import alibabacloud_oss_v2 as oss
        from alibabacloud_oss_v2.crypto import MasterRsaCipher
        from conftest import key_pair
        priv, pub = key_pair(self.env.cmk)
        cfg = oss.config.load_default()
        cfg.credentials_provider = oss.credentials.StaticCredentialsProvider(AK, SK)
        cfg.region, cfg.endpoint = REGION, self.env.endpoint
        return oss, oss.EncryptionClient(oss.Client(cfg), MasterRsaCipher(
            mat_desc=MATDESC if case.matdesc else None, public_key=pub, private_key=priv))

    def put(self, key, data, case):
        oss, ec = self._client(case)
        if not case.multipart:
            ec.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=data))
            return
        init = ec.initiate_multipart_upload(oss.InitiateMultipartUploadRequest(
            bucket=BUCKET, key=key, cse_part_size=PART, cse_data_size=len(data)))
        parts = []
        for i in range(0, len(data), PART):
            r = ec.upload_part(oss.UploadPartRequest(bucket=BUCKET, key=key, upload_id=init.upload_id,
                                                     part_number=i // PART + 1, body=data[i:i + PART],
                                                     cse_multipart_context=init.cse_multipart_context))
            parts.append(oss.UploadPart(part_number=i // PART + 1, etag=r.etag))
        ec.complete_multipart_upload(oss.CompleteMultipartUploadRequest(
            bucket=BUCKET, key=key, upload_id=init.upload_id,
            complete_multipart_upload=oss.CompleteMultipartUpload(parts=parts)))

    def get(self, key, case, rng=None):
        oss, ec = self._client(case)
        header = f"bytes={rng[0]}-{rng[1]}" if rng else None
        return ec.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key, range_header=header)).body.read()


class MountClient(Client):
    """An ossfuse mount (``env.mount``): files written close once uploaded (MOUNT_OPTIONS);
    which CMK wraps a new file follows from its key's prefix (``mount_keyring``)."""

    name, label = "mount", "ossfuse mount"

    def __init__(self, env, work: str):
        self.env = env

    def supports(self, case: Case) -> bool:
        return not case.multipart or case.size > (1 << 20)  # multipart = above the threshold

    def put(self, key, data, case):
        path = self.env.mount.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def get(self, key, case, rng=None):
        # A name another client made shows up within entry_timeout (0.5 s in the tests;
        # docs/semantics.md): the mount may still trust a listing taken just before the put.
        deadline = time.monotonic() + 2.0
        while not os.path.exists(self.env.mount.path(key)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(self.env.mount.path(key), "rb") as f:
            if rng is None:
                return f.read()
            f.seek(rng[0])
            return f.read(rng[1] - rng[0] + 1)


def mount_keyring(cmk: str, kms_endpoint: str | None, kms_key_id: str | None) -> str:
    """Config lines (after ``[mount]``) of the interop mount: CMK "main" (no matdesc, the
    default), "md" (the same key pair with MATDESC) for keys starting ``md-``, and a KMS CMK
    written in the raw encoding Go reads for keys starting ``kms-``."""
    md = ", ".join(f'{k} = "{v}"' for k, v in MATDESC.items())
    lines = ["[[encryption.cmk]]", 'id = "md"', 'type = "rsa"', f'private_key = "{cmk}"', f"matdesc = {{ {md} }}",
             "[[encryption.rule]]", 'prefix = "md-"', 'encrypt_with = "md"']
    if kms_endpoint:
        lines += ["[[encryption.cmk]]", 'id = "kms"', 'type = "kms"', f'key_id = "{kms_key_id}"',
                  f'region = "{REGION}"', f'endpoint = "{kms_endpoint}"', 'encoding = "raw"',
                  "[[encryption.rule]]", 'prefix = "kms-"', 'encrypt_with = "kms"']
    return "\n".join(lines)


@dataclass
class Env:
    """What the clients share: the OSS test server's endpoint, the CMK (PEM path; ``.pub``
    beside it), another key pair, the local KMS, and the mount."""

    endpoint: str
    cmk: str
    other_cmk: str
    mount: object = None
    kms_endpoint: str | None = None
    kms_key_id: str | None = None


CLIENTS = {c.name: c for c in (MountClient, CppClient, Go1Client, Go2Client, Oss2Client, PyV2Client)}

# what the test run and the matrix write: sizes 0 B, 1 B, 100 KiB + odd, 2 MiB + odd multipart
SDK_TO_MOUNT = (Case("empty", 0), Case("one-byte-md", 1, matdesc=True), Case("small", 102_407),
                Case("small-md", 102_407, matdesc=True), Case("multi", (2 << 20) + 4099, multipart=True),
                Case("multi-md", (2 << 20) + 4099, multipart=True, matdesc=True))
MOUNT_TO_SDK = (Case("empty", 0), Case("small", 102_407), Case("small-md", 102_407, matdesc=True),
                Case("multi", (2 << 20) + 777, multipart=True), Case("multi-md", (2 << 20) + 777, multipart=True, matdesc=True))
KMS_CASES = (Case("kms-small", 102_407, kms=True), Case("kms-multi", (2 << 20) + 333, multipart=True, kms=True))


def case_key(case: Case, writer: Client, reader: Client) -> str:
    prefix = "kms-" if case.kms else "md-" if case.matdesc else "plain-"
    return f"{prefix}{writer.name}-to-{reader.name}/{case.name}"


def run_cell(writer: Client, reader: Client, cases) -> list[tuple[str, str | None]]:
    """Write each case with ``writer`` and read it with ``reader``, whole and at its odd range;
    returns (case name, None if byte-exact else what went wrong) for the cases both support."""
    results = []
    for case in cases:
        if not (writer.supports(case) and reader.supports(case)):
            continue
        data = os.urandom(case.size)
        key = case_key(case, writer, reader)
        try:
            writer.put(key, data, case)
        except Exception as e:  # noqa: BLE001 - any failure is one cell's result
            results.append((case.name, f"{writer.name} put: {e}"))
            continue
        problem = None
        for rng in (None, case.odd_range) if case.size else (None,):
            want = data if rng is None else data[rng[0]:rng[1] + 1]
            try:
                got = reader.get(key, case, rng)
            except Exception as e:  # noqa: BLE001
                problem = f"{reader.name} get {rng or 'whole'}: {e}"
                break
            if hashlib.sha256(got).digest() != hashlib.sha256(want).digest():
                problem = f"{reader.name} get {rng or 'whole'}: {len(got)} bytes, not the {len(want)} written"
                break
        results.append((case.name, problem))
    return results
