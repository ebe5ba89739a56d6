"""The ossfuse command as a user runs it: keygen, mount errors with one-line reasons, umount,
and the config checks (file, key and reason named)."""
from __future__ import annotations

import json
import re
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from cryptography.hazmat.primitives import serialization

from ossfuse import config as config_mod
from ossfuse.registry import mounted_device, process_alive, read_registry

from conftest import OSSFUSE, Mount, daemon_pids, local_config, run_cli

pytestmark = pytest.mark.timeout(120)


ossfuse = run_cli


def test_keygen_writes_private_0600_and_public(tmp_path):
    path = str(tmp_path / "k.pem")
    r = ossfuse("keygen", path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        pem = f.read()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(pem, None)
    assert key.key_size == 3072
    with open(path + ".pub", "rb") as f:
        pub = serialization.load_pem_public_key(f.read())
    assert pub.public_numbers() == key.public_key().public_numbers()
    r = ossfuse("keygen", path)
    assert r.returncode == 1 and r.stderr == f"ossfuse: {path}: already exists; not overwriting a CMK\n", r.stderr
    other = str(tmp_path / "o.pem")
    open(other + ".pub", "w").close()  # a public key left alone: nothing written, not half a pair
    r = ossfuse("keygen", other)
    assert r.returncode == 1 and f"{other}.pub: already exists" in r.stderr, r.stderr
    assert not os.path.exists(other) and os.path.getsize(other + ".pub") == 0
    (tmp_path / "plain").touch()
    for given, line in [  # new-user trial: "already exists", "ossfuse: : No such file…", a key named .pub
            (str(tmp_path), f"'{tmp_path}': give the private key's file name (PATH.pub is written beside it)"),
            ("", "'': give the private key's file name (PATH.pub is written beside it)"),
            (f"{tmp_path}/plain/k.pem", f"{tmp_path}/plain: not a directory"),
            (f"{tmp_path}/n.pem.pub", f"{tmp_path}/n.pem.pub: that names a public key; give the private key's file "
                                      "name (PATH.pub is written beside it)")]:
        r = ossfuse("keygen", given)
        assert r.returncode == 1 and r.stderr == f"ossfuse: {line}\n", r.stderr
    r = ossfuse("keygen", str(tmp_path / "big.pem"), "--bits", "65536")  # ran for minutes without a word
    assert r.returncode == 1 and "2048 to 16384 bits" in r.stderr and not os.path.exists(tmp_path / "big.pem")


def _config(tmp_path, body: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(textwrap.dedent(body))
    return str(p)


def _oss_url(config: str, url: str) -> str:
    """``config`` with its local store replaced by OSS store ``url`` (an endpoint nobody serves)."""
    return re.sub(r'url = "local://[^"]*"', f'url = "{url}"\nendpoint = "http://127.0.0.1:9"', config)


def _base(root, key) -> str:
    """The config text of these tests: one RSA CMK ``k`` (``key``), store and cache below ``root``."""
    with open(local_config(root, {"k": str(key)})) as f:
        return f.read()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s + "[mount]\nbogus = 1\n", "mount.bogus: unknown key"),
    (lambda s: s.replace('encrypt_with = "k"', "encrypt_with = 3"), "encryption.encrypt_with: must be str"),
    (lambda s: s.replace('encrypt_with = "k"', 'encrypt_with = "nope"'), "no CMK with id 'nope'"),
    (lambda s: s.replace('private_key = "', 'private_key = "/missing'), "encryption.cmk[0].private_key: no such file"),
    (lambda s: s.replace("[cache]", "[cachex]"), "cachex: unknown section"),
    (lambda s: s + "[mount]\npart_size = 1000\n", "mount.part_size"),
    (lambda s: s.replace('url = "local', 'url = "ftp'), "store.url"),
    (lambda s: s + "[mount]\nupload_workers = true\n", "mount.upload_workers: must be int, not bool"),
    (lambda s: s + "[mount]\nattr_timeout = -1\n", "mount.attr_timeout: must not be negative"),
    (lambda s: s + "[mount]\nread_ahead_kib = -1\n", "mount.read_ahead_kib: must be 0"),
    # a breaker's finds: a traceback (and a mount anyway, seconds later), an EIO at the first getattr
    (lambda s: s + "[mount]\nstartup_timeout = 1e308\n", "mount.startup_timeout: must be at most 10000000 "
                                                          "seconds, got 1e+308"),
    (lambda s: s + "[mount]\nupload_delay = nan\n", "mount.upload_delay: must be a number of seconds, got nan"),
    (lambda s: s.replace("[store]", "[store]\nrequest_deadline = nan"), "store.request_deadline: must be a positive "
                                                                           "number of seconds (at most 10000000), not nan"),
    (lambda s: s.replace("[store]", "[store]\nrequest_deadline = -1"), "store.request_deadline: must be a positive"),
    (lambda s: s.replace("[store]", "[store]\nretries = -1"), "store.retries: must be 0 to 100, got -1"),
    (lambda s: s + "[mount]\nuid = -5\n", "mount.uid: must be 0 to 4294967294, got -5"),
    (lambda s: s + "[mount]\ngid = 4294967295\n", "mount.gid: must be 0 to 4294967294, got 4294967295"),
    (lambda s: s + "[mount]\numask = 0o1000\n", "mount.umask: must be 0 to 0o777, got 0o1000"),
    (lambda s: s.replace('type = "rsa"', 'type = "rsa"\npassphrase = "x"'), "passphrase: applies to type"),
    (lambda s: s.replace("[store]", "[store"), "not valid TOML"),
    # each names only the key that is wrong (it was one message naming both)
    (lambda s: s + "min_free = -1\n", "c.toml: cache.min_free: must not be negative, got -1"),
    (lambda s: s + "max_size = 1000\n", "c.toml: cache.max_size: must be at least 4 blocks of cache.block_size "
                                         "(4194304 bytes), got 1000"),
    # oss2 refused these at the first request with "The bucket_name is invalid, please check it"
    (lambda s: _oss_url(s, "oss://ab"), "store.url: 'ab' is not a valid OSS bucket name (3 to 63 characters"),
    (lambda s: _oss_url(s, "oss://My_Bucket"), "store.url: 'My_Bucket' is not a valid OSS bucket name"),
    (lambda s: _oss_url(s, "oss://bucket-1/photos"), "store.url: 'oss://bucket-1/photos' names a path after the "
                                                      "bucket; write \"oss://bucket-1\" and put the path in store.prefix"),
    # a trial: these mounted, and the mount then skipped its own keys ("not a valid file name")
    (lambda s: s.replace("[store]", '[store]\nprefix = "../x"'), "store.prefix: '../x' has '..' as a directory name"),
    (lambda s: s.replace("[store]", '[store]\nprefix = "a//b"'), "store.prefix: 'a//b' has '' as a directory name"),
    (lambda s: s.replace("[store]", '[store]\nprefix = "a/./"'), "store.prefix: 'a/./' has '.' as a directory name"),
    # each would sweep or evict the other's files
    (lambda s: s.replace('/cache"', '/bucket/.cache"'), "/bucket/.cache is inside the bucket directory of store.url"),
    (lambda s: s.replace('/bucket"', '/cache/b"'), "/cache holds the bucket directory of store.url"),
    (lambda s: s.replace('/cache"', '/bucket"'), "/bucket is the bucket directory of store.url"),
    # an operator trial's: a busy retry loop, the cache in /etc/ossfuse, a tag list deleted by hand
    (lambda s: s + "[mount]\nretry_interval = 0\n", "mount.retry_interval: must be at least 0.1 seconds, got 0"),
    (lambda s: re.sub(r'dir = "[^"]*"', 'dir = ""', s), "cache.dir: must name a directory"),
    (lambda s: re.sub(r'dir = "[^"]*"', 'dir = " "', s), "cache.dir: must name a directory"),
    (lambda s: re.sub(r'url = "local://[^"]*"', 'url = "local://"', s), "store.url: local:// needs the bucket"),
    (lambda s: s.replace("[store]", '[store]\nprefix = "team/.ossfuse-integrity/"'),
     "store.prefix: 'team/.ossfuse-integrity/' names .ossfuse-integrity, where ossfuse keeps integrity tag lists"),
])
def test_config_errors_name_file_key_and_reason(tmp_path, cmk_path, edit, message, no_mount_left):
    path = _config(tmp_path, edit(_base(tmp_path, cmk_path)))
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(path)
    assert str(e.value).startswith(path + ": ")
    assert message in str(e.value)
    os.makedirs(tmp_path / "mnt", exist_ok=True)
    r = ossfuse("mount", "-c", path, no_mount_left(str(tmp_path / "mnt"), path))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr


def test_a_config_that_is_not_utf8_is_one_line_and_a_bom_is_taken_off(tmp_path, cmk_path, no_mount_left):
    """An operator trial: a Latin-1 comment gave `ossfuse mount` a Python traceback and
    `check` a line naming no file; a UTF-8 BOM (Windows editors) gave "Invalid statement"."""
    base = _base(tmp_path, cmk_path)
    latin = tmp_path / "c.toml"
    latin.write_bytes(b"# caf\xe9\n" + base.encode())
    os.makedirs(tmp_path / "mnt", exist_ok=True)
    for cmd in (["mount", "-c", str(latin), no_mount_left(str(tmp_path / "mnt"), str(latin))], ["check", "-c", str(latin)]):
        r = ossfuse(*cmd)
        assert r.returncode == 1 and r.stderr == f"ossfuse: {latin}: not UTF-8 text (byte 5 is 0xe9): save it as " \
                                                 "UTF-8\n", r.stderr
    latin.write_bytes(b"\xef\xbb\xbf" + base.encode())
    assert config_mod.load(str(latin)).cache.dir == str(tmp_path / "cache")


@pytest.mark.expect_log(r"ERROR ossfuse: mount point .* is busy")
def test_two_mounts_started_at_once_on_one_mount_point_make_one_mount(tmp_path, cmk_path, no_mount_left):
    """An fstab line and a unit for the same path at boot: two `ossfuse mount` of different
    configs at once both passed the busy check and stacked two mounts, the second's record
    hiding the first's (an operator trial, 3 of 3 tries). Now one mounts, the other says busy."""
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(local_config(tmp_path / name, {"k": cmk_path}))
        no_mount_left(mnt, configs[-1])
    for _ in range(3):
        procs = [subprocess.Popen(OSSFUSE + ["mount", "-c", c, mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in configs]
        results = [(p.wait(60), p.stderr.read()) for p in procs]
        assert sorted(rc for rc, _ in results) == [0, 1], results
        loser = [why for rc, why in results if rc][0]  # the lock, or the busy check once the other is up
        assert loser.startswith(f"ossfuse: mount point {mnt} is busy (") and loser.count("\n") == 1, results
        assert sum(1 for line in open("/proc/self/mounts") if line.split()[1] == mnt) == 1
        r = run_cli("umount", mnt)
        assert r.returncode == 0, r.stderr


@pytest.fixture
def no_mount_left():
    """``watch(mountpoint, config)`` → mountpoint: at teardown, a daemon of ``config`` still
    starting is killed and a mount there is cleared, so a test of a refused mount leaves none
    behind even when the refusal fails (a daemon that mounts seconds later)."""
    watched: list[tuple[str, str]] = []
    yield lambda mnt, config: watched.append((mnt, config)) or mnt
    for mnt, config in watched:
        for pid in daemon_pids(config):
            os.kill(pid, 9)
        if mounted_device(mnt) is not None or os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


def test_schema_is_derived_from_the_dataclasses(tmp_path, cmk_path):
    """Every field of every config dataclass is a key of its table, checked against the
    field's type: a wrong-typed value of each is one line naming file, key and the accepted
    types; a field added to a dataclass is accepted without a schema edit."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Probe:
        name: str
        ratio: float = 1.0
        count: int | None = None
        tags: tuple[str, ...] = ()
        on: bool = False

    keys, required = config_mod._schema(Probe)
    assert keys == {"name": (str,), "ratio": (int, float), "count": (int,), "tags": (list,), "on": (bool,)}
    assert required == ("name",)
    base = _base(tmp_path, cmk_path)
    tables = {"store": config_mod.StoreConfig, "cache": config_mod.CacheConfig, "mount": config_mod.MountConfig,
              "encryption.cmk[0]": config_mod.CmkConfig}
    checked = 0
    for where, cls in tables.items():
        header = {"encryption.cmk[0]": "[[encryption.cmk]]"}.get(where, f"[{where}]")
        for f in dataclasses.fields(cls):
            wrong = '"text"' if "str" not in str(f.type) else "[1]"
            if where == "mount":
                body = base + f"[mount]\n{f.name} = {wrong}\n"
            else:
                lines = [ln for ln in base.splitlines() if not ln.startswith(f.name + " =")]
                body = "\n".join(lines).replace(header, f"{header}\n{f.name} = {wrong}", 1) + "\n"
            path = _config(tmp_path, body)
            with pytest.raises(config_mod.ConfigError) as e:
                config_mod.load(path)
            msg = str(e.value)
            assert msg.startswith(f"{path}: {where}.{f.name}: must be ") and "\n" not in msg, msg
            checked += 1
    assert checked == sum(len(dataclasses.fields(c)) for c in tables.values())


def test_key_file_problems_are_one_line_naming_the_file(tmp_path, cmk_path):
    os.makedirs(tmp_path / "mnt")
    for name, content, mode, message in [
            ("open.pem", open(cmk_path).read(), 0o644, "readable by group or others; chmod 600"),
            ("junk.pem", "not a key\n", 0o600, "is not a PEM RSA private key"),
            ("pub.pem", open(cmk_path + ".pub").read(), 0o600, "is a public key; name the private key"),
            # a .pub as made (world-readable): it was told "chmod 600 it", then "not a private key"
            ("k.pem.pub", open(cmk_path + ".pub").read(), 0o644, "is a public key; name the private key")]:
        key = tmp_path / name
        key.write_text(content)
        os.chmod(key, mode)
        path = _config(tmp_path, _base(tmp_path, key))
        r = ossfuse("mount", "-c", path, str(tmp_path / "mnt"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr and name in r.stderr, r.stderr


def test_relative_local_url_is_relative_to_the_config(tmp_path, cmk_path):
    body = _base(tmp_path, cmk_path).replace(f'url = "local://{tmp_path}/bucket"', 'url = "local://bkt"')
    cfg = config_mod.load(_config(tmp_path, body))
    assert cfg.store.url == f"local://{tmp_path}/bkt"


def test_config_defaults_and_relative_paths(tmp_path, cmk_path):
    """Paths in the config are relative to the config file's directory; the prefix gets a '/'."""
    os.symlink(cmk_path, tmp_path / "rel.pem")
    body = _base(tmp_path, "rel.pem").replace(f'dir = "{tmp_path}/cache"', 'dir = "cache"')
    body = body.replace("[encryption]", 'prefix = "/team"\n[encryption]')
    cfg = config_mod.load(_config(tmp_path, body))
    assert cfg.encryption.cmks[0].private_key == str(tmp_path / "rel.pem")
    assert cfg.cache.dir == str(tmp_path / "cache")
    assert cfg.store.prefix == "team/"
    assert cfg.mount.part_size % 16 == 0 and cfg.mount.upload_delay is None


@pytest.mark.expect_log(r"ERROR ossfuse: (cache dir .* is in use|mount point .* (is busy|No such file))")
def test_mount_errors_are_one_line(mount, tmp_path):
    # the cache dir is locked by the running mount: said naming that mount, before anything is
    # written to its log (an ERROR line of the refused attempt landed there)
    other = tmp_path / "mnt2"
    other.mkdir()
    log = mount.log()
    for target in (mount.mnt, str(other)):
        r = ossfuse("mount", "-c", mount.config, target)
        assert r.returncode == 1 and r.stderr == (f"ossfuse: cache dir {mount.cache} is in use by the ossfuse mount "
                                                  f"at {mount.mnt} (pid {mount.pid}): already mounted there\n"), r.stderr
    assert mount.log() == log
    # two mounts of one config at once: the one that loses the race writes nothing into the
    # winner's log either (the daemon it started found the cache dir locked)
    m3, m4 = tmp_path / "mnt3", tmp_path / "mnt4"
    m3.mkdir()
    m4.mkdir()
    assert ossfuse("umount", mount.mnt).returncode == 0
    mount.pid = None
    log = mount.log()
    both = [subprocess.Popen(OSSFUSE + ["mount", "-c", mount.config, str(p)], stderr=subprocess.PIPE, text=True,
                             env=mount.env) for p in (m3, m4)]
    results = [(p.wait(60), p.stderr.read()) for p in both]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    won = m3 if results[0][0] == 0 else m4
    assert ossfuse("umount", str(won)).returncode == 0
    assert "ERROR" not in mount.log()[len(log):], mount.log()[len(log):]
    mount.start()
    with open(mount.config) as f:  # a config of its own cache dir gets as far as the mount point
        own = _config(tmp_path, f.read().replace(f'dir = "{mount.cache}"', f'dir = "{tmp_path}/cache2"'))
    # busy mount point
    r = ossfuse("mount", "-c", own, mount.mnt)
    assert r.returncode == 1 and "busy" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # missing mount point: refused before a cache dir and a log are made for it (a trial)
    shutil.rmtree(tmp_path / "cache2", ignore_errors=True)
    r = ossfuse("mount", "-c", own, str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr == f"ossfuse: mount point {tmp_path}/nope: No such file or directory\n"
    assert not os.path.exists(tmp_path / "cache2")
    assert not os.path.ismount(other)


def test_a_cache_dir_or_bucket_directory_inside_the_mount_point_is_refused(tmp_path, cmk_path):
    """A cache dir or local bucket directory at or below the mount point (also through a
    symlink): exit 1 and one line naming the config key, nothing made in the mount point, no
    mount. Before, the cache dir was made there ("mount point is not empty"), and with -o
    nonempty the daemon hung in a lookup through its own mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "link").symlink_to(mnt)
    config = local_config(tmp_path, {"k": cmk_path})
    text = open(config).read()
    cases = {"cache dir (cache.dir)": (f'dir = "{tmp_path}/cache"', f'dir = "{mnt}/cache"'),
             "bucket directory (store.url)": (f'url = "local://{tmp_path}/bucket"', f'url = "local://{mnt}"'),
             "cache dir (cache.dir) ": (f'dir = "{tmp_path}/cache"', f'dir = "{tmp_path}/link/c"')}
    for what, (old, new) in cases.items():
        assert old in text
        with open(config, "w") as f:
            f.write(text.replace(old, new))
        for options in ([], ["-o", "nonempty"]):
            r = ossfuse("mount", "-c", config, str(mnt), *options)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert f"the {what.strip()} " in r.stderr and f"inside the mount point {mnt}" in r.stderr \
                or f"is the mount point {mnt}" in r.stderr, r.stderr
            assert os.listdir(mnt) == [] and not os.path.ismount(mnt)
    # the other way round: a mount point inside the bucket directory or the cache dir, which
    # the daemon walks (new-user trial: a local bucket mounted inside its own directory)
    with open(config, "w") as f:
        f.write(text)
    for what, inner in (("bucket directory (store.url)", tmp_path / "bucket" / "mnt"),
                        ("cache dir (cache.dir)", tmp_path / "cache" / "mnt")):
        inner.mkdir(parents=True)
        r = ossfuse("mount", "-c", config, str(inner))
        assert r.returncode == 1 and r.stderr == (f"ossfuse: {config}: the mount point {inner} is inside the {what} "
                                                  f"{inner.parent}, which ossfuse manages; choose a mount point "
                                                  "outside it\n"), r.stderr
        assert not os.path.ismount(inner)


def test_mount_with_a_read_only_cache_disk_is_one_line(tmp_path, cmk_path, tmpfs):
    """The cache dir on a read-only filesystem: exit 1 and one line naming the cache dir, the
    config key that sets it, the log file and EROFS (it was a traceback from opening
    ossfuse.log, then a line naming only the log file: a trial)."""
    config = local_config(tmp_path, {"k": cmk_path})
    cache = tmpfs("cache", 1 << 20)
    subprocess.run(["mount", "-o", "remount,ro", cache], check=True)
    (tmp_path / "mnt").mkdir()
    r = ossfuse("mount", "-c", config, str(tmp_path / "mnt"))
    assert r.returncode == 1
    assert r.stderr == (f"ossfuse: cache dir {cache} (cache.dir in {config}) must be writable: its log file "
                        f"{cache}/ossfuse.log: Read-only file system\n"), r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_umount_of_unmounted_dir_fails_clearly(tmp_path):
    """An existing folder: "is not mounted"; a typo or a file says so (new-user trial: the same
    line for all three), and ``status`` likewise."""
    r = ossfuse("umount", str(tmp_path))
    assert r.returncode == 1 and r.stderr == f"ossfuse: {tmp_path} is not mounted\n", r.stderr
    (tmp_path / "file").touch()
    for name, why in (("typo", "no such directory"), ("file", "not a directory")):
        r = ossfuse("umount", str(tmp_path / name))
        assert r.returncode == 1 and r.stderr == f"ossfuse: {tmp_path}/{name} is not mounted: {why}\n", r.stderr
        r = ossfuse("status", str(tmp_path / name))
        assert r.returncode == 1 and r.stderr == f"ossfuse: {tmp_path}/{name} is not a mount point: {why}\n", r.stderr
    r = ossfuse("status", "/proc")  # another filesystem: named (it said no daemon answers)
    assert r.returncode == 1 and r.stderr == "ossfuse: /proc is not an ossfuse mount (it is proc)\n", r.stderr
    for command in ("umount", "status", "mount"):  # `umount ""` acted on the current directory
        r = ossfuse(command, "")
        assert r.returncode == 2 and r.stderr.endswith("argument mountpoint: an empty path\n"), r.stderr


def test_umount_of_a_directory_inside_a_mount_names_the_mount(mount):
    """`cd mnt/sub && ossfuse umount .` said "is not mounted" and nothing more (new-user
    trial): it names the mount the directory is in, and leaves it mounted."""
    sub = os.path.join(mount.mnt, "sub")
    os.mkdir(sub)
    for command, says in (("umount", "is not mounted"), ("status", "is not a mount point")):
        r = ossfuse(command, sub)
        assert r.returncode == 1 and r.stderr == f"ossfuse: {sub} {says}; it is inside the ossfuse mount {mount.mnt}\n", \
            r.stderr
    assert os.path.ismount(mount.mnt) and os.path.isdir(sub)


def test_umount_refuses_a_mount_of_another_type(tmp_path):
    """fusermount3 -u, run as root, unmounts any filesystem: `ossfuse umount` of a tmpfs must
    not (a new user's `ossfuse umount /tmp` took the tmpfs and its files with it)."""
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        (target / "precious").write_text("keep me")
        r = ossfuse("umount", str(target))
        assert r.returncode == 1 and "is not an ossfuse mount (it is tmpfs)" in r.stderr
        assert os.path.ismount(target) and (target / "precious").read_text() == "keep me"
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_foreground_mount_stops_on_sigterm(make_mount):
    m = make_mount(start=False)
    proc = subprocess.Popen(OSSFUSE + ["mount", "-f", "-c", m.config, m.mnt], stderr=subprocess.PIPE, text=True,
                            env=m.env)
    try:
        for _ in range(200):
            if os.path.ismount(m.mnt):
                break
            proc.wait(0.05) if proc.poll() is not None else __import__("time").sleep(0.05)
        assert os.path.ismount(m.mnt)
        with open(m.path("f"), "wb") as f:
            f.write(b"data")
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.ismount(m.mnt)
    assert m.head("f").size == 4
    assert "mounted" in proc.stderr.read()


@pytest.mark.parametrize("store_kind", ["local"])
def test_status_and_umount_of_a_mount_whose_daemon_died(mount):
    """A daemon killed under its mount leaves a mount that answers ENOTCONN: `status` says so
    and how to clear it (not "not a mount point"); `umount` clears it, saying the daemon was
    gone, and the mount point is an empty directory again."""
    import signal
    import time
    os.kill(mount.pid, signal.SIGKILL)
    for _ in range(200):
        if not os.path.exists(f"/proc/{mount.pid}"):
            break
        time.sleep(0.01)
    with pytest.raises(OSError) as e:
        os.stat(mount.mnt)
    assert e.value.errno == __import__("errno").ENOTCONN
    r = ossfuse("status", mount.mnt)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    said = (f"{mount.mnt}: the daemon is gone (transport endpoint not connected); run `ossfuse umount "
            f"{mount.mnt}` (or fusermount3 -u {mount.mnt})")
    assert said in r.stderr, r.stderr
    r = ossfuse("status", "--json", mount.mnt)
    assert r.returncode == 1 and json.loads(r.stdout) == {"mountpoint": mount.mnt, "up": False, "error": said}
    r = ossfuse("umount", mount.mnt)
    assert r.returncode == 1, r.stderr
    assert f"{mount.mnt}: the daemon (pid {mount.pid}) had died; unmounted its dead mount" in r.stderr, r.stderr
    assert not os.path.ismount(mount.mnt) and os.listdir(mount.mnt) == []
    # its record ends too: a later mount elsewhere with the same device number must not be taken
    # for this dead daemon's ("the daemon (pid of this one) had died")
    from ossfuse.registry import read_registry
    assert read_registry(mount.mnt)["exited"] is True
    mount.pid = None


@pytest.mark.parametrize("store_kind", ["local"])
# (the close's RELEASE, queued by the kernel while the daemon was stopped, is answered after the
# unmount: libfuse cannot deliver that reply, an INFO line: daemon._undelivered_reply_is_info)
def test_status_and_umount_of_a_daemon_that_does_not_answer(mount):
    """A daemon stopped (SIGSTOP): `status` says so after its socket timeout, and how to
    continue it; `status --prometheus` reports ossfuse_up 0; `umount --timeout 2` unmounts and
    returns once the 2 s are up, saying the daemon is stopped (not "still uploading"), also
    given a symlink to the mount point. Each hung in a stat
    of the mount point (resolving its registry path), Ctrl-C ignored. Continued, the daemon
    uploads what was written."""
    import signal
    import time
    with open(mount.path("f"), "wb") as f:
        f.write(b"data")
    link = os.path.join(mount.root, "link")  # a symlink to the mount point: resolved without a stat of it
    os.symlink(mount.mnt, link)
    os.kill(mount.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        r = ossfuse("status", link, timeout=40)
        said = (f"the ossfuse daemon of {mount.mnt} (pid {mount.pid}) is stopped (SIGSTOP, Ctrl-Z or a "
                f"debugger): `kill -CONT {mount.pid}` lets it answer again")
        assert r.returncode == 1 and r.stderr == f"ossfuse: {said}\n", r.stderr
        assert time.monotonic() - t < 8  # told from /proc, not after the status socket's 10 s timeout
        r = ossfuse("status", "--json", mount.mnt, timeout=40)
        assert r.returncode == 1 and json.loads(r.stdout) == {"mountpoint": mount.mnt, "up": False,
                                                             "error": said}, r.stdout
        r = ossfuse("status", "--prometheus", mount.mnt, timeout=40)
        assert r.returncode == 0 and f'ossfuse_up{{mountpoint="{mount.mnt}"}} 0' in r.stdout, r.stdout
        t = time.monotonic()
        r = ossfuse("umount", link, "--timeout", "2", timeout=40)
        # not "still uploading": it does nothing until continued
        assert r.returncode == 1 and r.stderr.endswith(
            f"unmounted, but the daemon (pid {mount.pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) before it "
            f"finished: `kill -CONT {mount.pid}` lets it upload what is pending, if anything, and exit (see its "
            f"log)\n"), r.stderr
        assert time.monotonic() - t < 15
        assert mounted_device(mount.mnt) is None
    finally:
        os.kill(mount.pid, signal.SIGCONT)
    for _ in range(600):
        if not process_alive(mount.pid):
            break
        time.sleep(0.05)
    assert not process_alive(mount.pid)
    assert mount.head("f").size == 4
    mount.pid = None


def test_umount_of_a_stopped_daemon_that_a_process_waits_on_says_to_continue_it(mount):
    """A process blocked in the mount of a stopped daemon (a stat waiting for its answer)
    keeps the mount busy: `umount --timeout` fails naming the stopped daemon and the `kill
    -CONT` that lets the waiter, and then the unmount, finish (it blamed a file manager or
    another PID namespace). Continued, the same command unmounts."""
    import signal
    os.kill(mount.pid, signal.SIGSTOP)
    waiter = subprocess.Popen(["stat", mount.path("nonexistent")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # the stat is in the kernel, waiting for the stopped daemon
        r = ossfuse("umount", mount.mnt, "--timeout", "2", timeout=60)
        assert r.returncode == 1 and r.stderr.endswith(
            f"its daemon (pid {mount.pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger), so what waits on the "
            f"mount cannot finish: `kill -CONT {mount.pid}`, then unmount again\n"), r.stderr
        assert mounted_device(mount.mnt) is not None
    finally:
        os.kill(mount.pid, signal.SIGCONT)
        waiter.wait(30)
    r = ossfuse("umount", mount.mnt, timeout=60)
    assert r.returncode == 0, r.stderr
    mount.pid = None


@pytest.mark.parametrize("store_kind", ["local"])
def test_busy_umount_names_the_processes_without_fuser(mount):
    """A file open in the mount (and a shell whose working directory is there) keeps it busy:
    `umount` refuses, naming each process, from /proc (no psmisc `fuser` on a bare Debian)."""
    with open(mount.path("f"), "w") as f:
        f.write("x")
    sleeper = subprocess.Popen(["sleep", "60"], cwd=mount.mnt)
    try:
        with open(mount.path("f")) as held:
            r = ossfuse("umount", mount.mnt)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert "busy" in r.stderr and "fuser" not in r.stderr, r.stderr
            assert f"pid {os.getpid()} (" in r.stderr and f"pid {sleeper.pid} (sleep)" in r.stderr, r.stderr
            # what each holds (a new-user trial: "in use by pid N (python3)" named no file)
            assert f"holds its open file {mount.path('f')}" in r.stderr, r.stderr
            assert f"pid {sleeper.pid} (sleep) holds its working directory {mount.mnt}" in r.stderr, r.stderr
            assert held.read() == "x"
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("store_kind", ["local"])
def test_busy_umount_names_an_ossfuse_daemon_by_its_mount(mount, tmp_path, cmk_path):
    """A second mount whose local-directory bucket is inside this mount keeps it busy: the
    refusal names that daemon by the mount it serves (a new-user trial saw "pid N (python3)
    holds its open file …/index.sqlite", not which daemon that was)."""
    inner = Mount(str(tmp_path / "inner"), cmk_path)
    inner.bucket_dir = mount.path("inner-bucket")
    inner.write_config()
    inner.start()
    try:
        with open(inner.path("f"), "w") as f:
            f.write("x")
        r = ossfuse("umount", mount.mnt)
        assert r.returncode == 1 and "busy" in r.stderr, r.stderr
        assert f"pid {inner.pid} (" in r.stderr and f", the ossfuse daemon of {inner.mnt}) holds its" in r.stderr, \
            r.stderr
    finally:
        inner.cleanup()
    assert os.path.ismount(mount.mnt)


def test_umount_from_inside_the_mount_names_only_the_other_holders(mount):
    """`ossfuse umount .` from a shell inside the mount: the command's own working directory
    neither keeps the mount busy nor is named; the shell (here a sleep in the mount) is, and
    once it has gone the same command, still run from inside, unmounts."""
    sleeper = subprocess.Popen(["sleep", "60"], cwd=mount.mnt)
    try:
        r = subprocess.run(OSSFUSE + ["umount", "."], cwd=mount.mnt, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "busy" in r.stderr, r.stderr
        assert f"pid {sleeper.pid} (sleep)" in r.stderr and "python" not in r.stderr, r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    r = subprocess.run(OSSFUSE + ["umount", "."], cwd=mount.mnt, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mount.mnt)
    mount.pid = None


def test_busy_umount_says_when_the_holder_is_the_shell_it_ran_from(mount):
    """A user types `ossfuse umount /mnt/x` in a shell whose working directory is in the
    mount: the refusal says that the holder is that very shell."""
    sh = subprocess.run(["sh", "-c", f'cd "{mount.mnt}" && {" ".join(OSSFUSE)} umount "{mount.mnt}"; echo "shell $$"'],
                        capture_output=True, text=True, timeout=60)
    shell_pid = int(sh.stdout.split()[-1])
    assert "busy" in sh.stderr and f"pid {shell_pid} (sh, the shell this ran from: cd out of the mount first)" \
        in sh.stderr, sh.stderr
    assert sh.stderr.count("\n") == 1 and os.path.ismount(mount.mnt)
    with open(mount.path("held"), "w"):
        pass
    # a shell outside the mount holding a file there (a new-user trial: it was told to cd out)
    sh = subprocess.run(["sh", "-c", f'cd / && exec 7<"{mount.path("held")}" && {" ".join(OSSFUSE)} umount '
                         f'"{mount.mnt}"; echo "shell $$"'], capture_output=True, text=True, timeout=60)
    shell_pid = int(sh.stdout.split()[-1])
    assert f"pid {shell_pid} (sh, the shell this ran from: it holds a file there; close it (exec N<&-))" \
        in sh.stderr, sh.stderr
    assert os.path.ismount(mount.mnt)


def test_umount_progress_says_why_it_waits_when_the_store_is_unreachable():
    """The line printed every 5 s while the daemon drains (it repeated "waiting for 1 pending
    upload(s)" with no word of the outage: new-user trial)."""
    from ossfuse.cli import _drain_progress
    pending = {"count": 1, "bytes": 5242880}
    assert _drain_progress({"pending_uploads": {"count": 0, "bytes": 0}}) is None
    assert _drain_progress({"pending_uploads": pending, "store_health": {"online": True}}) == \
        "ossfuse: waiting for 1 pending upload(s), 5242880 bytes"
    since = time.mktime((2026, 12, 4, 22, 21, 54, 0, 0, -1))
    assert _drain_progress({"pending_uploads": pending, "store_health": {
        "online": False, "offline_since": since, "reason": "connection refused"}}) == \
        ("ossfuse: waiting for 1 pending upload(s), 5242880 bytes; the store is unreachable since 22:21:54 "
         "(connection refused): they go up once it answers")


def test_status_to_a_full_disk_is_one_line_not_a_traceback(mount):
    """`ossfuse status --prometheus MNT > file` (the README's cron recipe) on a full disk: one
    line and exit 1 (it was a traceback)."""
    for form in ([], ["--prometheus"], ["--json"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run(OSSFUSE + ["status", *form, mount.mnt], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=60)
        assert r.returncode == 1 and r.stderr == "ossfuse status: cannot write its output: No space left on device\n", \
            r.stderr


def test_umount_and_status_follow_a_symlink_to_the_mount_point(mount, tmp_path):
    """``ossfuse umount LINK`` where LINK points at the mount point unmounts it, as umount(8)
    does (it said "is not mounted"), and ``status LINK`` reports on it."""
    link = tmp_path / "link-to-mnt"
    link.symlink_to(mount.mnt)
    r = ossfuse("status", str(link))
    assert r.returncode == 0 and "pending uploads" in r.stdout.lower(), (r.stdout, r.stderr)
    r = ossfuse("umount", str(link))
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mount.mnt)
    mount.pid = None


def test_mount_through_a_symlink_mounts_its_target(tmp_path, cmk_path):
    """``ossfuse mount -c C LINK`` where LINK points at an empty directory mounts that
    directory (the kernel follows the link) and comes up; it waited 90 s for a mount at LINK,
    failed, and left the target a dead mount (a trial)."""
    m = Mount(str(tmp_path / "m"), cmk_path)
    link = tmp_path / "link to mnt"
    link.symlink_to(m.mnt)
    try:
        t0 = time.monotonic()
        r = subprocess.run(OSSFUSE + ["mount", "-c", m.config, str(link)], capture_output=True, text=True,
                           timeout=120, env=m.env)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 30
        m.pid = read_registry(m.mnt)["pid"]
        with open(os.path.join(str(link), "f"), "w") as f:
            f.write("through the link")
        assert os.path.ismount(m.mnt) and open(m.path("f")).read() == "through the link"
        assert ossfuse("umount", str(link)).returncode == 0
        m.pid = None
        assert not os.path.ismount(m.mnt)
    finally:
        m.cleanup()


def test_the_installed_command_runs_a_copy_not_this_checkout():
    """/usr/local/bin/ossfuse (what the systemd unit, fstab's mount helper and people run)
    resolves into a virtualenv holding a copy of the package, not into a checkout: moving or
    deleting the checkout must not break a boot-time mount. Checked where .ci/install ran as
    root (CI: a clean clone); skipped, with the reason, on a helper's OSSFUSE_NO_LINK install."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cmd in ("/usr/local/bin/ossfuse", "/sbin/mount.fuse.ossfuse"):
        if not os.path.exists(cmd):
            if "CI" in os.environ:
                pytest.fail(f"CI runs .ci/install as root, but {cmd} is missing", pytrace=False)
            pytest.skip(f"{cmd} is not installed here (.ci/install with OSSFUSE_NO_LINK=1)")
        real = os.path.realpath(cmd)
        assert not real.startswith(repo + os.sep), f"{cmd} -> {real} is inside the checkout {repo}"
        python = os.path.join(os.path.dirname(real), "python")
        # as a unit or fstab runs it: without the PYTHONPATH a developer's shell may set to a checkout
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([python, "-c", "import ossfuse, os; print(os.path.realpath(ossfuse.__file__))"],
                           cwd="/", capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and not r.stdout.strip().startswith(repo + os.sep), r.stdout + r.stderr
    r = subprocess.run(["/usr/local/bin/ossfuse", "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "umount" in r.stdout, r.stderr


# What `ossfuse umount` must not import: the daemon's stack (trio, pyfuse3, the crypto and OSS
# libraries, config/keyring/envelope/fs), and the stdlib modules only the daemon's commands use.
# Each costs start-up time on every unmount (tens of ms to ~1 s on a loaded machine).
_NOT_FOR_UMOUNT = ("trio", "pyfuse3", "cryptography", "Crypto", "oss2", "sqlite3", "tomllib", "logging",
                   "dataclasses", "ossfuse.config", "ossfuse.daemon", "ossfuse.keyring", "ossfuse.envelope",
                   "ossfuse.fs", "ossfuse.store")

_UMOUNT_PROBE = """
import sys
from ossfuse.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:  # --help
    status = e.code
print("STATUS", status, file=sys.stderr)
print("LOADED", " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def _umount_imports(*args: str, env=None) -> tuple[int, set[str], str]:
    """(exit status, modules loaded, stderr) of ``ossfuse ARGS`` run through cli.main in a fresh
    interpreter, as the console script runs it."""
    r = subprocess.run([sys.executable, "-c", _UMOUNT_PROBE, *args], capture_output=True, text=True,
                       timeout=60, env=env, cwd="/")
    status = int(r.stderr.split("STATUS ")[1].split()[0])
    loaded = set(r.stderr.split("LOADED ")[1].split())
    return status, loaded, r.stderr


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in _NOT_FOR_UMOUNT))


@pytest.mark.parametrize("store_kind", ["local"])
def test_umount_imports_no_daemon_modules(mount, tmp_path):
    """`ossfuse umount` (its help, a directory that is not mounted, and a real idle mount)
    loads none of the daemon's modules: the command is Python's start-up, argparse, the
    registry and fusermount3 (issue 14: 0.3 s of imports made it 5× slower than ossfs's)."""
    status, loaded, err = _umount_imports("umount", "--help")
    assert status == 0 and "ossfuse.cli" in loaded and not _heavy(loaded), (_heavy(loaded), err)
    status, loaded, err = _umount_imports("umount", str(tmp_path))
    assert status == 1 and "is not mounted" in err and not _heavy(loaded), (_heavy(loaded), err)
    with open(mount.path("f"), "wb") as f:
        f.write(b"x" * 5000)
    status, loaded, err = _umount_imports("umount", mount.mnt, env=mount.env)
    assert status == 0, err
    mount.pid = None
    assert not os.path.ismount(mount.mnt) and mount.head("f").size == 5000  # uploaded before it returned
    assert "ossfuse.registry" in loaded and not _heavy(loaded), (_heavy(loaded), err)


@pytest.mark.parametrize("command", ["mount", "umount", "status", "rekey", "check", "keygen", "quickstart"])
def test_each_command_builds_its_own_arguments_only(command, monkeypatch, capsys):
    """main builds the arguments of the command it runs only (all of them took ~18 ms of each
    `ossfuse umount`): that command's help lists its options, and no other command's argument
    builder runs."""
    from ossfuse import cli
    for name, _, _ in cli._COMMANDS:
        if name != command:
            monkeypatch.setattr(cli, f"_{name}_args", lambda p, name=name: pytest.fail(f"built {name}'s arguments"))
    monkeypatch.setattr(cli, "_COMMANDS", tuple((n, h, getattr(cli, f"_{n}_args")) for n, h, _ in cli._COMMANDS))
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: ossfuse {command} [-h]"), out
    expected = {"mount": "--foreground", "umount": "--timeout", "status": "--prometheus", "rekey": "--dry-run",
                "check": "--verify", "keygen": "--bits", "quickstart": "--new-key"}[command]
    assert expected in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])  # the top level lists every command with its help
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"    {n:<20}{h[:20]}" in out for n, h, _ in cli._COMMANDS), out


def test_mount_from_a_directory_holding_an_ossfuse_package_runs_the_installed_one(tmp_path, cmk_path):
    """The daemon (root, often) is started with ``python -P -m ossfuse`` in /: an ``ossfuse/``
    package in the caller's working directory is never imported (``-m`` alone puts the working
    directory first on sys.path: the new-user trial ran such a package as root), and a
    relative mount point still works."""
    from conftest import Mount

    evil = tmp_path / "evil"
    (evil / "ossfuse").mkdir(parents=True)
    marker = tmp_path / "ran"
    (evil / "ossfuse" / "__init__.py").write_text("")
    (evil / "ossfuse" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    m = Mount(str(tmp_path / "m"), cmk_path)
    script = os.path.join(os.path.dirname(sys.executable), "ossfuse")  # the console script, as on the PATH
    r = subprocess.run([script, "mount", "-c", m.config, os.path.relpath(m.mnt, evil)], cwd=evil,
                       capture_output=True, text=True, timeout=90)
    try:
        assert r.returncode == 0, r.stderr
        assert not marker.exists()
        with open(m.path("f"), "w") as f:
            f.write("ok")
        from ossfuse.registry import read_registry
        assert os.readlink(f"/proc/{read_registry(m.mnt)['pid']}/cwd") == "/"
    finally:
        m.cleanup()
    assert not marker.exists()


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C (KeyboardInterrupt) in a command gives one line and exit 130, not a traceback."""
    from ossfuse import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_keygen", interrupted)
    assert cli.main(["keygen", str(tmp_path / "k.pem")]) == 130
    assert capsys.readouterr().err == "ossfuse keygen: interrupted\n"


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_umount_timeout_must_be_a_number_of_seconds(value):
    r = subprocess.run(OSSFUSE + ["umount", "--timeout", value, "/nonexistent"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "--timeout" in r.stderr and repr(value) in r.stderr, r.stderr


def test_a_bind_mount_finds_its_daemons_record_not_a_stale_one_of_a_reused_pid(tmp_path, monkeypatch):
    """A crashed daemon's record stays unexited; its pid may be another process's now. The
    record of a bind mount's daemon, found by the device, is the one whose process started
    at the record's ``pid_start`` (clock ticks since boot: a wall-clock step changes nothing)."""
    from ossfuse import registry
    monkeypatch.setenv(registry.ENV_RUNTIME_DIR, str(tmp_path))
    me, ticks = os.getpid(), registry.process_start_ticks()
    assert ticks is not None and ticks == registry.process_start_ticks(me)
    stale = {"pid": me, "pid_start": ticks - 1, "mountpoint": "/old", "exited": False, "device": "0:99"}
    live = {"pid": me, "pid_start": ticks, "mountpoint": "/new", "started": time.time() - 1e6,  # a clock step
            "exited": False, "device": "0:99"}
    for name, rec in (("a.json", stale), ("b.json", live)):
        with open(tmp_path / name, "w") as f:
            json.dump(rec, f)
    assert not registry.daemon_alive(stale) and registry.daemon_alive(live)
    assert registry.record_of("/elsewhere", "0:99")["mountpoint"] == "/new"
    assert registry.record_of("/elsewhere", "0:98") is None
    # a path with a dead record of its own whose device number a live mount has again
    registry.write_registry(registry.registry_path("/was"), dict(stale, mountpoint="/was"))
    assert registry.record_of("/was", "0:99")["mountpoint"] == "/new"
    os.unlink(tmp_path / "b.json")
    assert registry.record_of("/was", "0:99")["mountpoint"] == "/was"  # only dead ones: its own
    os.unlink(registry.registry_path("/was"))
    # only a dead one: it is this mount's only while its own mount point holds the device (a
    # bind mount of a mount whose daemon died); else it is a stale record of a reused number
    # (a crashed mount cleared by hand), whose pid `umount` named and whose record it ended
    assert registry.record_of("/elsewhere", "0:99") is None
    monkeypatch.setattr(registry, "mounted_device", lambda mp, fstype="fuse.ossfuse": "0:99" if mp == "/old" else None)
    assert registry.record_of("/elsewhere", "0:99")["mountpoint"] == "/old"
    # a live daemon whose mount is gone (draining; it noted "unmounted") no longer holds that number:
    # the next mount may have it (a trial's umount of a bind mount whose daemon had died waited
    # for another test's draining daemon instead and said its outcome, exit 0)
    monkeypatch.setattr(registry, "mounted_device", lambda mp, fstype="fuse.ossfuse": None)
    with open(tmp_path / "c.json", "w") as f:
        json.dump(dict(live, mountpoint="/drained", unmounted=True), f)
    assert registry.record_of("/elsewhere", "0:99") is None
    # nor one stopped (SIGSTOP) after `umount --timeout` took its mount away: it cannot note
    # "unmounted", and a record of another config than the one mounted there is not this
    # mount's (a fresh machine's umount of a bind mount whose daemon had died found a stopped
    # daemon of another test by the reused number, unmounted, and exited 0 saying nothing)
    monkeypatch.setattr(registry, "mounted_filesystem",
                        lambda mp, mountinfo="": ("0:99", "/cfg/bound.toml") if mp == "/bind" else None)
    with open(tmp_path / "d.json", "w") as f:
        json.dump(dict(live, mountpoint="/stopped", config="/cfg/stopped.toml"), f)
    assert registry.record_of("/bind", "0:99") is None
    assert registry.record_of("/elsewhere", "0:99")["mountpoint"] == "/stopped"  # (no source known there)
    with open(tmp_path / "e.json", "w") as f:
        json.dump(dict(live, mountpoint="/bound", config="/cfg/bound.toml"), f)
    assert registry.record_of("/bind", "0:99")["mountpoint"] == "/bound"


def test_records_of_daemons_that_exited_long_ago_are_pruned_others_stay(tmp_path, monkeypatch):
    """The runtime dir kept one record per mount point ever mounted until the next boot (659
    after one test suite run, each read by every record search): an exited daemon's record is
    removed an hour after its exit; a running or crashed (unexited) daemon's record stays, as
    do recent exits and files that are no records."""
    from ossfuse import registry
    monkeypatch.setenv(registry.ENV_RUNTIME_DIR, str(tmp_path))
    now = time.time()
    records = {"old-exit.json": {"pid": 1, "exited": True, "exited_at": now - 3700},
               "recent-exit.json": {"pid": 2, "exited": True, "exited_at": now - 100},
               "crashed.json": {"pid": 3, "exited": False, "started": now - 1e6},
               "exit-without-time.json": {"pid": 4, "exited": True}}
    for name, rec in records.items():
        with open(tmp_path / name, "w") as f:
            json.dump(rec, f)
    (tmp_path / "other.sock").write_text("")
    (tmp_path / "broken.json").write_text("{")
    assert registry.prune_exited_records() == 1
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "crashed.json", "exit-without-time.json",
                                            "other.sock", "recent-exit.json"]


def test_old_mount_point_locks_without_a_live_record_are_pruned_held_ones_stay(tmp_path, monkeypatch):
    """The mount point locks (``<hash>.lock``, daemon.lock_mountpoint) stayed forever, one per
    mount point ever used (a trial found 2,948 in /run/ossfuse after a day of test runs): the
    lock of a pruned record goes with it, and an old one whose record is gone; a lock a process
    holds stays (a mount in progress, or a daemon whose record went), and so does a recent one,
    or the lock of a record kept. A lock unlinked between another process's open and its flock
    is opened afresh by :func:`registry.flocked`."""
    import fcntl
    from ossfuse import registry
    monkeypatch.setenv(registry.ENV_RUNTIME_DIR, str(tmp_path))
    now = time.time()
    with open(tmp_path / "pruned.json", "w") as f:
        json.dump({"pid": 1, "exited": True, "exited_at": now - 3700}, f)
    with open(tmp_path / "kept.json", "w") as f:
        json.dump({"pid": 2, "exited": True, "exited_at": now - 100}, f)
    for name in ("pruned", "kept", "orphan", "held", "recent"):
        (tmp_path / f"{name}.lock").write_text("")
        if name != "recent":
            os.utime(tmp_path / f"{name}.lock", (now - 7200, now - 7200))
    held = registry.flocked(str(tmp_path / "held.lock"))
    try:
        assert held is not None and registry.flocked(str(tmp_path / "held.lock")) is None
        assert registry.prune_exited_records() == 1
        assert sorted(os.listdir(tmp_path)) == ["held.lock", "kept.json", "kept.lock", "recent.lock"]
    finally:
        os.close(held)
    # a lock file unlinked after another process opened it but before its flock: flocked()
    # locks the file the path names then, not the unlinked one
    stale = os.open(tmp_path / "race.lock", os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(tmp_path / "race.lock")
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the other process won the unlinked one)
    fd = registry.flocked(str(tmp_path / "race.lock"))
    try:
        assert fd is not None and os.path.samestat(os.fstat(fd), os.stat(tmp_path / "race.lock"))
    finally:
        os.close(fd)
        os.close(stale)


def test_pruning_never_removes_the_record_a_daemon_wrote_after_the_pruner_read_the_old_one(tmp_path, monkeypatch):
    """A re-test: the pruner read every record first and deleted the long-exited ones after; a
    daemon that mounted at one of those mount points meanwhile (3,000 old records: ~0.3 s) had
    its new record deleted, and `ossfuse umount` then did not wait for its uploads. It takes
    the mount point's lock (which a mounting daemon holds before it writes its record) and
    reads the record again first."""
    from ossfuse import registry
    monkeypatch.setenv(registry.ENV_RUNTIME_DIR, str(tmp_path))
    old = {"pid": 1, "exited": True, "exited_at": time.time() - 7200}
    live = {"pid": os.getpid(), "exited": False, "started": time.time()}
    for name in ("held", "free"):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(live, f)  # what the new daemon wrote after the pruner's read
    snapshot = [(str(tmp_path / "held.json"), old), (str(tmp_path / "free.json"), old)]
    monkeypatch.setattr(registry, "_record_files", lambda: snapshot)
    held = registry.flocked(str(tmp_path / "held.lock"))  # the new daemon's lock
    try:
        assert registry.prune_exited_records() == 0
    finally:
        os.close(held)
    assert (tmp_path / "held.json").exists() and (tmp_path / "free.json").exists()
    assert (tmp_path / "held.lock").exists()


def test_a_mount_prunes_the_records_of_daemons_that_exited_long_ago(tmp_path, cmk_path, monkeypatch):
    """What calls :func:`prune_exited_records`: a daemon once it is mounted."""
    from conftest import Mount
    from ossfuse import registry
    import pathlib
    import shutil
    import tempfile
    # short: the status socket's AF_UNIX path must stay under 108 bytes (tmp_path may be long)
    rundir = pathlib.Path(tempfile.mkdtemp(prefix="ofr", dir="/tmp"))
    monkeypatch.setenv(registry.ENV_RUNTIME_DIR, str(rundir))
    with open(rundir / "old.json", "w") as f:
        json.dump({"pid": 1, "exited": True, "exited_at": time.time() - 7200}, f)
    m = Mount(str(tmp_path / "m"), cmk_path)
    try:
        m.start()
        assert not (rundir / "old.json").exists()
        assert os.path.exists(registry.registry_path(m.mnt))
        assert m.stop() == 0
    finally:
        m.cleanup()  # checks its log too
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.mark.parametrize("opt, message", [
    ("uid=-5", "-o uid=-5: uid must be 0 to 4294967294, got -5"),
    ("gid=x", "-o gid=x: gid needs a number"),
    ("umask=999", "-o umask=999: umask needs an octal number"),
    ("umask=1000", "-o umask=1000: umask must be 0 to 777 (octal)"),
    ("subtype=zz", "-o subtype=zz: ossfuse mounts have the type fuse.ossfuse (umount and status find them by it)"),
])
def test_bad_uid_gid_umask_options_are_one_line_errors(tmp_path, cmk_path, opt, message, no_mount_left):
    """-o uid/gid/umask out of range: one line naming the option (uid=-5 mounted, then every
    getattr failed with EIO and a traceback in the log)."""
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    os.makedirs(tmp_path / "mnt", exist_ok=True)
    r = ossfuse("mount", "-c", path, no_mount_left(str(tmp_path / "mnt"), path), "-o", opt)
    assert r.returncode != 0 and r.stderr == f"ossfuse: {message}\n", r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_an_option_libfuse_refuses_after_mounting_fails_the_mount(tmp_path, cmk_path, no_mount_left):
    """-o max_read=4096: libfuse ends the session at FUSE_INIT, after the mount was made;
    `ossfuse mount` exited 0 with nothing mounted (new-user trial: its stat answered from the
    bare directory). Now it fails in one line and leaves no mount."""
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    os.makedirs(tmp_path / "mnt", exist_ok=True)
    r = ossfuse("mount", "-c", path, no_mount_left(str(tmp_path / "mnt"), path), "-o", "max_read=4096")
    assert r.returncode == 1 and r.stderr == (f"ossfuse: the mount at {tmp_path}/mnt ended before it answered; its log "
                                              "says why (check the -o options: max_read=4096)\n"), r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    with open(tmp_path / "cache" / "ossfuse.log") as f:
        log = f.read()
    assert "requested different maximum read size" in log and " mounted " not in log, log


@pytest.mark.parametrize("given, read_only", [
    (["ro"], True), (["rw"], False), (["ro", "rw"], False), (["rw", "ro"], True), (["ro", "nofail", "rw"], False),
])
def test_of_ro_and_rw_the_last_one_counts(tmp_path, cmk_path, given, read_only):
    """As for mount(8): `-o ro,rw` mounts read-write (it mounted read-only)."""
    from ossfuse import config as config_mod
    from ossfuse.cli import split_mount_options
    cfg = config_mod.load(_config(tmp_path, _base(tmp_path, cmk_path)))
    _, fuse = split_mount_options(cfg, given + ["allow_other"])
    assert fuse == (["ro"] if read_only else [])


def test_attr_and_entry_timeout_options_set_the_config_keys(tmp_path, cmk_path, no_mount_left):
    """``-o attr_timeout=30`` (libfuse 2's option, as sshfs and s3fs take it) failed with only
    libfuse 3's "fuse_session_new() failed" (a trial's finding): now it sets ``[mount]
    attr_timeout`` as uid=/gid=/umask= set theirs; a bad value is one line naming it."""
    from ossfuse import config as config_mod
    from ossfuse.cli import split_mount_options
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    cfg, fuse = split_mount_options(config_mod.load(path), ["attr_timeout=30", "entry_timeout=0.5", "noatime"])
    assert (cfg.mount.attr_timeout, cfg.mount.entry_timeout, fuse) == (30.0, 0.5, ["noatime"])
    for bad, why in (("attr_timeout=x", "attr_timeout needs a number of seconds"),
                     ("entry_timeout=-1", "entry_timeout must be 0 to"), ("attr_timeout=nan", "must be 0 to")):
        with pytest.raises(ValueError, match=why):
            split_mount_options(cfg, [bad])
    os.makedirs(tmp_path / "mnt")
    mnt = no_mount_left(str(tmp_path / "mnt"), path)
    r = ossfuse("mount", "-c", path, mnt, "-o", "attr_timeout=x")
    assert r.returncode == 1 and r.stderr == "ossfuse: -o attr_timeout=x: attr_timeout needs a number of seconds\n"
    r = ossfuse("mount", "-c", path, mnt, "-o", "ro,attr_timeout=30,entry_timeout=2")
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(mnt) == []
    finally:
        assert ossfuse("umount", mnt).returncode == 0


def test_a_local_bucket_whose_parent_directory_is_missing_is_refused_not_made(tmp_path, cmk_path, no_mount_left):
    """A local bucket under a directory that does not exist (its disk not mounted, a typo):
    the mount fails with one line naming it, and nothing is created (the whole path was made,
    and the writes went to a new empty bucket on the disk below, silently)."""
    missing = tmp_path / "nodisk"
    path = _config(tmp_path, _base(tmp_path, cmk_path).replace(f'url = "local://{tmp_path}/bucket"',
                                                                 f'url = "local://{missing}/deeper/bucket"'))
    os.makedirs(tmp_path / "mnt")
    r = ossfuse("mount", "-c", path, no_mount_left(str(tmp_path / "mnt"), path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"its parent directory {missing}/deeper does not exist (is the disk that holds it mounted?)" in r.stderr
    assert not missing.exists()
    (missing / "deeper").mkdir(parents=True)  # the parent there: a new bucket is made in it
    r = ossfuse("mount", "-c", path, str(tmp_path / "mnt"))
    assert r.returncode == 0, r.stderr
    assert ossfuse("umount", str(tmp_path / "mnt")).returncode == 0
    assert (missing / "deeper" / "bucket" / "index.sqlite").exists()


def test_a_local_bucket_a_mount_served_before_is_not_made_again_when_missing(tmp_path, cmk_path, no_mount_left):
    """The bucket directory is missing after mounts that used it (its disk not mounted at a
    mount point directory that stays, or it was moved): the mount is refused with one line
    saying so and how to start a new bucket, and nothing is created (a new empty bucket on
    the disk below would take the writes, hidden once the disk is back). Made by hand, it
    mounts as a new, empty bucket."""
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    mnt = no_mount_left(str(tmp_path / "mnt"), path)
    os.makedirs(mnt)
    assert ossfuse("mount", "-c", path, mnt).returncode == 0  # the first mount makes the bucket
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(b"on the disk")
    assert ossfuse("umount", mnt).returncode == 0
    os.rename(tmp_path / "bucket", tmp_path / "elsewhere")  # the disk is not mounted now
    said = (f"local store {tmp_path}/bucket does not exist, but a mount with this cache dir used it before (is "
            f"the disk that holds it mounted? was it moved?); to start a new, empty bucket there, create it: "
            f"mkdir -m 700 {tmp_path}/bucket")
    r = ossfuse("mount", "-c", path, mnt)
    assert r.returncode == 1 and r.stderr == f"ossfuse: {path}: store: {said}\n", r.stderr
    # nor do the other commands make it (check, rekey: the next mount would take it for the bucket)
    for args in (["check", "-c", path], ["check", "-c", path, "--verify"], ["rekey", "-c", path, "--dry-run"]):
        r = ossfuse(*args)
        assert r.returncode == 1 and said in r.stderr, (args, r.stdout, r.stderr)
    assert not (tmp_path / "bucket").exists() and not os.path.ismount(mnt)
    os.rename(tmp_path / "elsewhere", tmp_path / "bucket")  # the disk is back
    assert ossfuse("mount", "-c", path, mnt).returncode == 0
    with open(os.path.join(mnt, "f"), "rb") as f:
        assert f.read() == b"on the disk"
    assert ossfuse("umount", mnt).returncode == 0
    os.rename(tmp_path / "bucket", tmp_path / "old")
    os.mkdir(tmp_path / "bucket", 0o700)  # a new, empty bucket, on purpose
    assert ossfuse("mount", "-c", path, mnt).returncode == 0
    assert os.listdir(mnt) == []
    assert ossfuse("umount", mnt).returncode == 0


def test_check_before_the_first_mount_makes_no_bucket_and_says_so(tmp_path, cmk_path):
    """``check`` of a new config whose local bucket directory does not exist yet made it (and
    said "store local:///… answers", a new-user trial): a check changes nothing; it says the
    first mount makes the bucket, exits 0, and ``--verify`` says there is nothing to verify."""
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    r = ossfuse("check", "-c", path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (f"ok    store local://{tmp_path}/bucket: no bucket directory there yet; the first mount makes a new, "
            f"empty one") in r.stdout.splitlines(), r.stdout
    assert not (tmp_path / "bucket").exists()
    r = ossfuse("check", "-c", path, "--verify", "photos")  # (a path below the root: nothing here names it)
    assert r.returncode == 1 and r.stderr == (f"ossfuse: check --verify: local://{tmp_path}/bucket: no bucket there "
                                              f"yet (the first mount makes it)\n"), r.stderr
    assert not (tmp_path / "bucket").exists()


def test_local_buckets_served_by_one_cache_dir_are_all_remembered(tmp_path, cmk_path, no_mount_left):
    """A config switched to another bucket and back: both are remembered as served, so the first
    one missing later is refused too (only the last was, and it was made again, empty)."""
    first = _config(tmp_path, _base(tmp_path, cmk_path))
    mnt = no_mount_left(str(tmp_path / "mnt"), first)
    os.makedirs(mnt)
    for bucket in ("bucket", "bucket2", "bucket"):
        with open(first) as f:
            text = f.read()
        with open(first, "w") as f:
            f.write(re.sub(r'url = "local://[^"]*"', f'url = "local://{tmp_path}/{bucket}"', text))
        assert ossfuse("mount", "-c", first, mnt).returncode == 0
        assert ossfuse("umount", mnt).returncode == 0
    os.rename(tmp_path / "bucket", tmp_path / "away")
    os.rename(tmp_path / "bucket2", tmp_path / "away2")
    for bucket in ("bucket2", "bucket"):
        with open(first) as f:
            text = f.read()
        with open(first, "w") as f:
            f.write(re.sub(r'url = "local://[^"]*"', f'url = "local://{tmp_path}/{bucket}"', text))
        r = ossfuse("mount", "-c", first, mnt)
        assert r.returncode == 1 and "but a mount with this cache dir used it before" in r.stderr, r.stderr
        assert not (tmp_path / bucket).exists()


def test_a_local_bucket_that_is_a_dangling_symlink_or_someones_directory_is_refused(tmp_path, cmk_path,
                                                                                       no_mount_left):
    """A bucket path that is a symlink to nothing (its disk not mounted) is one line, not a
    traceback; a directory of other files is not taken over (index and blobs added, mode 0700)."""
    path = _config(tmp_path, _base(tmp_path, cmk_path))
    mnt = no_mount_left(str(tmp_path / "mnt"), path)
    os.makedirs(mnt)
    os.symlink(tmp_path / "disk" / "bucket", tmp_path / "bucket")
    r = ossfuse("mount", "-c", path, mnt)
    assert r.returncode == 1 and r.stderr == (
        f"ossfuse: {path}: store: local store {tmp_path}/bucket is a symlink to {tmp_path}/disk/bucket, which does "
        f"not exist (is the disk that holds it mounted?)\n"), r.stderr
    os.unlink(tmp_path / "bucket")
    os.mkdir(tmp_path / "bucket", 0o755)
    (tmp_path / "bucket" / "file.txt").write_text("precious")
    os.rename(tmp_path / "bucket" / "file.txt", tmp_path / "file.txt")
    os.rmdir(tmp_path / "bucket")
    os.rename(tmp_path / "file.txt", tmp_path / "bucket")  # a regular file where the bucket goes
    r = ossfuse("mount", "-c", path, mnt)
    assert r.returncode == 1 and r.stderr == (
        f"ossfuse: {path}: store: local store {tmp_path}/bucket is not a directory\n"), r.stderr
    os.rename(tmp_path / "bucket", tmp_path / "file.txt")
    os.mkdir(tmp_path / "bucket", 0o755)
    os.rename(tmp_path / "file.txt", tmp_path / "bucket" / "file.txt")
    r = ossfuse("mount", "-c", path, mnt)
    assert r.returncode == 1 and r.stderr == (
        f"ossfuse: {path}: store: local store {tmp_path}/bucket is a directory of other files, not a bucket (it "
        f"has no index.sqlite): name a new or empty directory\n"), r.stderr
    assert os.listdir(tmp_path / "bucket") == ["file.txt"] and os.stat(tmp_path / "bucket").st_mode & 0o777 == 0o755


def test_a_locked_cache_dir_names_its_holder_and_what_it_does(tmp_path, monkeypatch):
    """A second mount of a config says "already mounted there" while the first serves, and
    that the daemon still uploads once it is unmounted (new-user trial: both said "in use by
    the mount at", the second of a bare directory); an unknown holder stays unnamed."""
    import fcntl
    from ossfuse.registry import (ENV_RUNTIME_DIR, cache_dir_user, process_start_ticks, registry_path,
                                  write_registry)
    monkeypatch.setenv(ENV_RUNTIME_DIR, str(tmp_path / "run"))
    os.makedirs(tmp_path / "run", mode=0o700)
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    assert cache_dir_user(cache) is None  # no lock file: nobody
    fd = os.open(os.path.join(cache, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert cache_dir_user(cache) is None  # unlocked
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cache_dir_user(cache) == "another ossfuse mount"  # locked, no record of it
        served = str(tmp_path / "served")  # (an ossfuse mount there, as /proc/self/mountinfo would say)
        monkeypatch.setattr("ossfuse.registry.mounted_device",
                            lambda mp, fstype="fuse.ossfuse": "0:99" if mp == served else None)
        write_registry(registry_path(served), {"pid": os.getpid(), "pid_start": process_start_ticks(),
                                               "mountpoint": served, "cache_dir": cache, "exited": False})
        assert cache_dir_user(cache) == f"the ossfuse mount at {served} (pid {os.getpid()}): already mounted there"
        gone = str(tmp_path / "mnt")
        os.unlink(registry_path(served))
        write_registry(registry_path(gone), {"pid": os.getpid(), "pid_start": process_start_ticks(), "mountpoint": gone,
                                             "cache_dir": cache, "exited": False})
        assert cache_dir_user(cache) == (f"the daemon of {gone} (pid {os.getpid()}), unmounted and still finishing its "
                                         f"uploads (`ossfuse umount {gone}` waits for it)")
    finally:
        os.close(fd)


def test_a_process_on_its_way_out_is_told_from_a_live_one():
    """CI: `ossfuse umount` waited for a killed reader, then failed "busy (in use by pid N)" in
    the moment between its read returning and its files being closed: the SIGKILL had been
    taken off the pending set (`killed` False), so it looked like a live holder. Such a
    process is exiting (PF_EXITING), as a zombie is; this process and pid 1 are not."""
    import time

    from ossfuse.registry import dying, exiting, killed
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not exiting(pid):  # a zombie until reaped: its exit ran
            assert time.monotonic() < deadline, "the child never showed as exiting"
            time.sleep(0.01)
        assert not killed(pid)  # (no SIGKILL was sent: only exiting tells it)
        assert dying(pid)  # what `ossfuse umount` waits for
    finally:
        os.waitpid(pid, 0)
    assert not exiting(os.getpid()) and not exiting(1) and not exiting(pid)  # reaped: gone
    assert not dying(os.getpid()) and not dying(1)


def test_umount_says_what_stays_journaled_also_when_changes_were_lost(capsys):
    """An operator trial: the last changes of a file could not be saved (ENOSPC), and its
    previous saved version stayed journaled; `ossfuse umount` named only the loss, so the
    operator took the saved version for being in the bucket. Both are said (exit 1)."""
    from ossfuse.cli import _exit_outcome
    reg = {"exited": True, "status": 1, "unsaved": ["twelve"], "journaled": 1, "journaled_paths": ["twelve"],
           "upload_error": "twelve: local store: No space left on device", "undeleted": 0,
           "log": "/var/cache/ossfuse/x/ossfuse.log"}
    assert _exit_outcome("/mnt/x", reg) == 1
    assert capsys.readouterr().err == (
        "ossfuse: unmounted; the last changes of 1 file(s) could not be saved in the cache dir and are lost: "
        "/mnt/x/twelve; the upload of 1 file(s) failed (e.g. /mnt/x/twelve: local store: No space left on device); "
        "they stay journaled and upload on the next mount: /mnt/x/twelve (the log says why: "
        "/var/cache/ossfuse/x/ossfuse.log)\n")
    # (a record of a daemon before the "log" field)
    assert _exit_outcome("/mnt/x", dict(reg, journaled=0, journaled_paths=[], upload_error=None, log=None)) == 1
    assert capsys.readouterr().err == (
        "ossfuse: unmounted; the last changes of 1 file(s) could not be saved in the cache dir and are lost: "
        "/mnt/x/twelve (the log says why: the log in the cache dir)\n")


def test_names_from_the_bucket_reach_the_terminal_without_control_characters(capsys):
    """A trial: `ossfuse umount` printed a file name another client made, "a\\033[2Jb", as it
    is: escape sequences reached the operator's terminal. Control characters are shown as
    \\xNN (newline and tab kept); `status` and every error line go the same way."""
    from ossfuse.cli import _exit_outcome
    from ossfuse.registry import printable
    assert printable("a\x1b[2Jb\r\x7f\x9b\tc\nd") == "a\\x1b[2Jb\\x0d\\x7f\\x9b\tc\nd"
    reg = {"exited": True, "status": 75, "journaled": 1, "journaled_paths": ["esc/a\x1b[2Jb"],
           "upload_error": None, "undeleted": 0}
    assert _exit_outcome("/mnt/x", reg) == 75
    err = capsys.readouterr().err
    assert "\x1b" not in err and "/mnt/x/esc/a\\x1b[2Jb" in err, err


def test_a_cache_dir_inside_an_ossfuse_mount_is_refused(tmp_path, cmk_path, no_mount_left):
    """An operator trial: a cache dir inside another ossfuse mount was accepted, and its lock,
    data-key cache and log became objects of that mount's bucket."""
    m = Mount(str(tmp_path / "m"), cmk_path)
    m.start()
    try:
        (tmp_path / "b").mkdir()
        cfg = local_config(tmp_path / "b", {"k": cmk_path})
        with open(cfg) as f:
            text = f.read()
        with open(cfg, "w") as f:
            f.write(re.sub(r'dir = "[^"]*"', f'dir = "{m.mnt}/cache"', text))
        (tmp_path / "b" / "mnt").mkdir()
        r = ossfuse("mount", "-c", cfg, no_mount_left(str(tmp_path / "b" / "mnt"), cfg))
        assert r.returncode == 1 and r.stderr == (f"ossfuse: cache dir {m.mnt}/cache is inside the ossfuse mount "
                                                  f"at {m.mnt}: give it a directory on a local disk\n"), r.stderr
        assert os.listdir(m.mnt) == []  # nothing was made there
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse: cache dir .* holds work for the bucket",
                        r"WARNING ossfuse\.daemon: found 1 journaled file")
def test_a_cache_dir_with_work_for_another_bucket_is_refused(tmp_path, cmk_path, no_mount_left):
    """A trial: a cache dir mounted with another config's bucket replayed its pending deletes
    there (same-named empty files of the other bucket were deleted) and uploaded its journal
    there. Such a mount is refused, naming both buckets; once the work is done (mounted with
    its own bucket), the cache dir may serve another."""
    import signal
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    configs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs[name] = local_config(tmp_path / name, {"k": cmk_path}, extra="[mount]\nupload_delay = 3600\n")
        with open(configs[name]) as f:
            text = f.read()
        with open(configs[name], "w") as f:  # one cache dir for both
            f.write(re.sub(r'dir = "[^"]*"', f'dir = "{tmp_path}/cache"', text))
        no_mount_left(mnt, configs[name])
    assert ossfuse("mount", "-c", configs["a"], mnt).returncode == 0
    with open(os.path.join(mnt, "f"), "wb") as f:
        f.write(b"for bucket a")
    for pid in daemon_pids(configs["a"]):
        os.kill(pid, signal.SIGKILL)  # the file stays journaled
    time.sleep(0.5)
    ossfuse("umount", mnt)  # clears the dead mount
    r = ossfuse("mount", "-c", configs["b"], mnt)
    assert r.returncode == 1 and r.stderr == (
        f"ossfuse: cache dir {tmp_path}/cache holds work for the bucket local://{tmp_path}/a/bucket (1 journaled "
        f"file(s)), not this config's local://{tmp_path}/b/bucket: mount it with that bucket's config to finish the "
        f"work, or give this config a cache dir of its own\n"), r.stderr
    assert ossfuse("mount", "-c", configs["a"], mnt).returncode == 0  # its own bucket: the work is done
    assert open(os.path.join(mnt, "f"), "rb").read() == b"for bucket a"
    assert ossfuse("umount", mnt).returncode == 0
    doubt = '{"op": "PUT", "key": "f", "effect": "E1", "until": %f, "at": 0}\n' % (time.time() + 600)
    with open(tmp_path / "cache" / "indoubt.log", "w") as f:  # a request of bucket a's that may still land
        f.write(doubt)
    r = ossfuse("mount", "-c", configs["b"], mnt)  # (a mistyped bucket dropped it: break trial BT16b F3)
    assert r.returncode == 1 and "holds work for the bucket" in r.stderr and "(1 request(s) in doubt)" in r.stderr
    with open(tmp_path / "cache" / "indoubt.log", "a") as f:
        f.write('{"key": "f", "settled": "E1"}\n')  # dealt with: nothing pending
    assert ossfuse("mount", "-c", configs["b"], mnt).returncode == 0  # nothing pending: it may change bucket
    assert os.listdir(mnt) == []
    assert not os.path.exists(tmp_path / "cache" / "indoubt.log")  # (dropped; a local bucket keeps none)
    assert ossfuse("umount", mnt).returncode == 0


@pytest.mark.parametrize("store_kind", ["local"])
def test_a_daemon_killed_while_a_statfs_waits_on_it_reads_as_dead(mount):
    """A daemon dies while a statfs of its mount waits for it (its main thread reads as dead
    while its other threads still hold /dev/fuse): the kernel ends that request with
    ECONNABORTED, not ENOTCONN, and that too says the daemon is gone (it was taken for a live
    one: a fresh machine's `ossfuse umount` of a bind mount whose daemon had just died said
    nothing and exited 0)."""
    import errno
    import signal
    import threading
    from ossfuse.registry import mount_answers_enotconn
    os.kill(mount.pid, signal.SIGSTOP)  # a stopped daemon leaves the statfs waiting
    killer = threading.Timer(0.5, os.kill, (mount.pid, signal.SIGKILL))
    killer.start()
    try:
        assert mount_answers_enotconn(mount.mnt, wait=10) is True
    finally:
        killer.join()
    with pytest.raises(OSError) as e:  # and from then on ENOTCONN, at once
        os.statvfs(mount.mnt)
    assert e.value.errno == errno.ENOTCONN
    r = ossfuse("umount", mount.mnt)
    assert r.returncode == 1 and f"the daemon (pid {mount.pid}) had died" in r.stderr, r.stderr
    mount.pid = None
