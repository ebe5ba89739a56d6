"""Shared fixtures: CMKs, configs, and real FUSE mounts run by the ossfuse daemon in a
separate process, on the local-directory store and on the OSS test server over HTTP. Every
mount fixture unmounts (and kills its daemon) even when a test fails."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))

from ossfuse.registry import process_alive  # noqa: E402
from ossfuse.keyring import generate_rsa_cmk  # noqa: E402
from ossfuse.store.base import ObjectStore  # noqa: E402
from ossfuse.store.local import LocalStore  # noqa: E402

pytest_plugins = ["checklogs"]  # a test fails on an undeclared WARNING/ERROR line (tests/checklogs.py)

# The suite chooses runtime dirs itself (the default, /run/ossfuse, and per-test ones): a
# user's OSSFUSE_RUNTIME_DIR in the shell failed the four tests of the default (a new-user trial)
os.environ.pop("OSSFUSE_RUNTIME_DIR", None)
# The programs the suite runs see stdout buffered, as on a fresh machine: this project's dev
# host sets PYTHONUNBUFFERED, which hid a failed write at exit (`ossfuse status > /dev/full`
# exited 120 with "Exception ignored" on a fresh Debian 12; a new-user trial)
os.environ.pop("PYTHONUNBUFFERED", None)

OSSFUSE = [sys.executable, "-m", "ossfuse"]
DATA = os.path.join(os.path.dirname(__file__), "data")
AK, SK, REGION = "test-ak", "test-sk-secret", "cn-hangzhou"
# One bucket name per pytest-xdist worker: bucket names are unique across OSS, so `ossfuse
# rekey` and `check` name every running mount of the same bucket, whatever its endpoint; the
# workers' OSS test servers (one per test) must not look like one bucket to each other.
BUCKET = "test-bucket-" + os.environ.get("PYTEST_XDIST_WORKER", "main")


def run_cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run ``ossfuse ARGS...`` as a user would (text output captured, ``timeout`` seconds)."""
    return subprocess.run(OSSFUSE + list(args), capture_output=True, text=True, timeout=timeout, **kw)


def local_config(tmp_path, cmks: dict[str, str], encrypt_with: str | None = None, *,
                 matdesc: dict[str, dict[str, str]] | None = None, extra: str = "") -> str:
    """Write ``tmp_path/c.toml``: a local store at ``tmp_path/bucket``, the RSA CMKs ``cmks``
    (id -> private key path; ``matdesc`` per id), ``encrypt_with`` (default: the first id), the
    cache at ``tmp_path/cache``, then ``extra``. Returns its path."""
    lines = ["[store]", f'url = "local://{tmp_path}/bucket"', "[encryption]",
             f'encrypt_with = "{encrypt_with or next(iter(cmks))}"']
    for cmk_id, key in cmks.items():
        lines += ["[[encryption.cmk]]", f'id = "{cmk_id}"', 'type = "rsa"', f'private_key = "{key}"']
        if matdesc and cmk_id in matdesc:
            lines.append("matdesc = { " + ", ".join(f'{k} = "{v}"' for k, v in matdesc[cmk_id].items()) + " }")
    lines += ["[cache]", f'dir = "{tmp_path}/cache"']
    path = os.path.join(str(tmp_path), "c.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return path


def run_sync(coro_fn, *args):
    """Run one async store call from a synchronous test."""
    return trio.run(coro_fn, *args)


@pytest.fixture(scope="session")
def cmk_path(tmp_path_factory):
    """An RSA CMK (2048-bit: quicker to make than keygen's 3072) shared by the session."""
    path = str(tmp_path_factory.mktemp("keys") / "cmk.pem")
    generate_rsa_cmk(path, bits=2048)
    return path


@pytest.fixture(scope="session")
def other_cmk_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys2") / "other.pem")
    generate_rsa_cmk(path, bits=2048)
    return path


def oss_client_store(server) -> ObjectStore:
    """An OssStore of this test process talking to ``server`` (to inspect the bucket)."""
    from ossfuse.store.credentials import StaticCredentialsProvider
    from ossfuse.store.oss import OssStore
    return OssStore(BUCKET, server.endpoint, region=REGION, signature="v4",
                    credentials=StaticCredentialsProvider(AK, SK), retries=1)


def key_pair(cmk_path: str) -> tuple[str, str]:
    """(private PEM, public PEM) of a CMK made by ``generate_rsa_cmk`` (PATH and PATH.pub)."""
    with open(cmk_path) as f, open(cmk_path + ".pub") as g:
        return f.read(), g.read()


def rsa_provider(cmk_path: str, matdesc=None):
    """oss2's RsaProvider for a CMK, optionally with a material description."""
    import oss2
    priv, pub = key_pair(cmk_path)
    return oss2.crypto.RsaProvider(key_pair={"private_key": priv, "public_key": pub}, mat_desc=matdesc)


def crypto_bucket(endpoint: str, provider):
    """A real oss2.CryptoBucket on the test bucket at ``endpoint`` (signature V4)."""
    import oss2
    return oss2.CryptoBucket(oss2.AuthV4(AK, SK), endpoint, BUCKET, crypto_provider=provider, region=REGION)


def daemon_pids(config: str) -> list[int]:
    """Pids of the ossfuse daemons (and mount commands) of ``config``, read from /proc (a
    minimal Debian has no pgrep)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and config.encode() in argv and int(pid) != os.getpid():
            found.append(int(pid))
    return found


class Mount:
    """One ossfuse mount driven through the real CLI: of a local-directory bucket
    (``server`` None), or of a bucket on the OSS test server over HTTP."""

    def __init__(self, root: str, cmk: str, mount_options: str = "", extra: str = "", server=None,
                 matdesc: dict[str, str] | None = None):
        self.root = root
        self.matdesc = matdesc
        self.server = server
        self.mnt = os.path.join(root, "mnt")
        self.bucket_dir = server.root_dir if server else os.path.join(root, "bucket")
        self.cache = os.path.join(root, "cache")
        self.config = os.path.join(root, "ossfuse.toml")
        self.cmk = cmk
        os.makedirs(self.mnt, exist_ok=True)
        self.write_config(mount_options, extra)
        self.pid: int | None = None
        self._store: ObjectStore | None = None

    @property
    def kind(self) -> str:
        return "oss" if self.server else "local"

    def write_config(self, mount_options: str = "", extra: str = "", prefix: str = "", store_options: str = "") -> None:
        if self.server is None:
            store = f'url = "local://{self.bucket_dir}"'
        else:
            store = (f'url = "oss://{BUCKET}"\nendpoint = "{self.server.endpoint}"\n'
                     f'region = "{REGION}"\nsignature = "v4"')
        lines = [
            "[store]", store, f'prefix = "{prefix}"', store_options,
            "[encryption]", 'encrypt_with = "main"',
            "[[encryption.cmk]]", 'id = "main"', 'type = "rsa"', f'private_key = "{self.cmk}"',
            ("matdesc = { " + ", ".join(f'"{k}" = "{v}"' for k, v in self.matdesc.items()) + " }"
             if self.matdesc else ""),
            "[cache]", f'dir = "{self.cache}"',
            "[mount]", *(f"{k} = 0.5" for k in ("attr_timeout", "entry_timeout") if k not in mount_options),
            mount_options,
            extra,
        ]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.server:
            env.update(OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK)
        return env

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = oss_client_store(self.server) if self.server else LocalStore(self.bucket_dir)
        return self._store

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def start(self) -> None:
        r = subprocess.run(OSSFUSE + ["mount", "-c", self.config, self.mnt], capture_output=True, text=True,
                           timeout=90, env=self.env)
        assert r.returncode == 0, f"mount failed: {r.stderr}"
        self.mount_stderr = r.stderr  # what `ossfuse mount` told the user
        from ossfuse.daemon import read_registry
        self.pid = read_registry(self.mnt)["pid"]

    def stop(self) -> int:
        """``ossfuse umount``; returns its exit status."""
        r = subprocess.run(OSSFUSE + ["umount", self.mnt], capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            self.pid = None
        return r.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon and clear its dead mount."""
        if self.pid and process_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            for _ in range(200):
                if not process_alive(self.pid):
                    break
                time.sleep(0.01)
        subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.pid = None

    def remount(self, *, clear_cache: bool = True) -> None:
        assert self.stop() == 0
        if clear_cache:
            self.check_log()  # the log goes with the cache
            for name in os.listdir(self.cache):
                if name not in ("staging",):
                    p = os.path.join(self.cache, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
        self.start()

    def log(self) -> str:
        try:
            with open(os.path.join(self.cache, "ossfuse.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def head(self, key: str):
        return run_sync(self.store.head, key)

    def get(self, key: str) -> bytes:
        info = self.head(key)
        return run_sync(self.store.get_range, key, 0, info.size)

    def keys(self) -> list[str]:
        keys, marker = [], None
        while True:
            page = run_sync(lambda: self.store.list("", delimiter=None, marker=marker))
            keys += [o.key for o in page.objects]
            if page.next_marker is None:
                return keys
            marker = page.next_marker

    def pending_uploads(self) -> int:
        """Unfinished multipart uploads in the bucket."""
        if self.server:
            return self.server.pending_uploads()
        return len(self.store.pending_uploads())

    def check_log(self) -> None:
        """Hand the daemon's log to the log checker (undeclared warnings fail the test)."""
        import checklogs  # the plugin (pytest_plugins above), loaded by now
        checklogs.daemon_log(self.log(), os.path.join(self.cache, "ossfuse.log"))

    def cache_on(self, tmpfs, size: int) -> None:
        """Put the cache dir on a small tmpfs (the ``tmpfs`` fixture's ``make``) of ``size``
        bytes, with ``min_free = 0`` so the tiny disk is usable to the last byte."""
        tmpfs(self.cache, size)
        with open(self.config) as f:
            cfg = f.read().replace("[cache]\n", "[cache]\nmin_free = 0\n")
        with open(self.config, "w") as f:
            f.write(cfg)

    def in_mount_table(self) -> bool:
        """The mount point is in the mount table — also a dead daemon's mount, where
        os.path.ismount is False (stat gives ENOTCONN)."""
        field = os.fsencode(os.path.realpath(self.mnt))  # as mountinfo writes it: bytes, octal escapes
        for c in b"\\ \t\n":
            field = field.replace(bytes([c]), b"\\%03o" % c)
        with open("/proc/self/mountinfo", "rb") as f:  # any mount's name may be no UTF-8
            return any(line.split()[4] == field for line in f)

    def cleanup(self) -> None:
        if os.path.ismount(self.mnt):
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass
        if self.in_mount_table() or (self.pid and process_alive(self.pid)):
            self.kill9()
        self.check_log()


@pytest.fixture
def tmpfs(tmp_path):
    """``make(path, size)``: a tmpfs of ``size`` bytes mounted at ``path`` (relative: under
    tmp_path; mode 0700), unmounted at teardown even when the test failed. Skips unless root."""
    if os.geteuid() != 0:  # as every mount test: the suite runs as root (README); CI must not skip
        if "CI" in os.environ:
            pytest.fail("CI runs the suite as root, but this is not root: no tmpfs", pytrace=False)
        pytest.skip("mounting a tmpfs needs root (the README runs the suite as root)")
    mounted = []

    def make(path: str, size: int) -> str:
        path = os.path.join(str(tmp_path), path)
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)
        mounted.append(path)
        return path
    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def oss_server(tmp_path):
    """The OSS test server in its own process (see tests/oss_remote.py for why), on a free
    port, bodies on disk; always ended."""
    from oss_remote import RemoteOssServer
    server = RemoteOssServer(access_key_id=AK, access_key_secret=SK, bucket=BUCKET, region=REGION,
                             root_dir=str(tmp_path / "oss"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["local", "oss"])
def store_kind(request) -> str:
    """Runs a test once per store: the local directory, and the OSS test server over HTTP."""
    return request.param


@pytest.fixture
def make_mount(tmp_path, cmk_path, store_kind, request):
    """Factory: ``make_mount(mount_options="upload_delay = 30", start=True)`` on the store of
    ``store_kind``; all mounts are unmounted at teardown, whatever the test did."""
    mounts: list[Mount] = []
    server = request.getfixturevalue("oss_server") if store_kind == "oss" else None

    def factory(mount_options: str = "", extra: str = "", start: bool = True, name: str = "m") -> Mount:
        m = Mount(str(tmp_path / name), cmk_path, mount_options, extra, server=server)
        mounts.append(m)
        if start:
            m.start()
        return m

    yield factory
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount()
