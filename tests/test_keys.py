"""CMK selection per mount, through real mounts on the OSS test server with a local KMS:
several CMKs (RSA with matdescs, KMS), rules by prefix, oss2 CryptoBucket + AliKMSProvider
interop, and the errors of a missing key, an unknown matdesc and an unreachable KMS."""
from __future__ import annotations

import errno
import os
import re
import time

import oss2
import pytest
from oss2.crypto import AliKMSProvider

import conftest
from conftest import AK, REGION, SK, Mount, rsa_provider
from kms_server import KmsTestServer
from ossfuse import envelope as env

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def kms():
    with KmsTestServer({AK: SK}) as server:
        yield server


def kms_provider(kms, key_id: str):
    prov = AliKMSProvider(AK, SK, REGION, key_id)
    prov.kms_client.add_endpoint(REGION, "Kms", kms.endpoint)
    prov.kms_client.set_auto_retry(False)
    return prov


def keyring_config(cmk_path: str, other_cmk_path: str, kms, key_id: str) -> str:
    return f"""
[[encryption.cmk]]
id = "hr-rsa"
type = "rsa"
private_key = "{other_cmk_path}"
matdesc = {{ dept = "hr" }}

[[encryption.cmk]]
id = "fin-kms"
type = "kms"
key_id = "{key_id}"
region = "{REGION}"
endpoint = "{kms.endpoint}"

[[encryption.rule]]
prefix = "hr/"
encrypt_with = "hr-rsa"

[[encryption.rule]]
prefix = "finance/"
encrypt_with = "fin-kms"
"""


@pytest.fixture
def keyed(tmp_path, cmk_path, other_cmk_path, oss_server, kms):
    key_id = kms.create_key()
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server,
              extra=keyring_config(cmk_path, other_cmk_path, kms, key_id))
    m.start()
    try:
        yield m, key_id
    finally:
        m.cleanup()


def crypto_bucket(m: Mount, provider):
    return conftest.crypto_bucket(m.server.endpoint, provider)


def test_three_cmks_and_two_rules_pick_the_right_key(keyed, cmk_path, other_cmk_path, kms):
    m, key_id = keyed
    for d in ("hr", "finance", "misc"):
        os.mkdir(m.path(d))
        with open(m.path(d, "doc"), "wb") as f:
            f.write(d.encode() * 1000)
    assert m.stop() == 0
    meta = {d: m.head(f"{d}/doc").metadata for d in ("hr", "finance", "misc")}
    assert meta["hr"][env.H_WRAP_ALG] == "RSA/NONE/PKCS1Padding"
    assert meta["hr"][env.H_MATDESC] == '{"dept":"hr"}'
    assert meta["finance"][env.H_WRAP_ALG] == "KMS/ALICLOUD"
    assert meta["misc"][env.H_WRAP_ALG] == "RSA/NONE/PKCS1Padding" and env.H_MATDESC not in meta["misc"]
    # each readable by oss2 with only its own CMK
    assert crypto_bucket(m, rsa_provider(other_cmk_path, {"dept": "hr"})).get_object("hr/doc").read() == b"hr" * 1000
    assert crypto_bucket(m, kms_provider(kms, key_id)).get_object("finance/doc").read() == b"finance" * 1000
    assert crypto_bucket(m, rsa_provider(cmk_path)).get_object("misc/doc").read() == b"misc" * 1000
    # objects written by oss2 under each CMK read through the mount
    crypto_bucket(m, kms_provider(kms, key_id)).put_object("finance/by-oss2", b"kms object from oss2")
    crypto_bucket(m, rsa_provider(other_cmk_path, {"dept": "hr"})).put_object("misc/hr-key", b"hr key elsewhere")
    m.start()
    for d in ("hr", "finance", "misc"):
        assert open(m.path(d, "doc"), "rb").read() == d.encode() * 1000
    assert open(m.path("finance", "by-oss2"), "rb").read() == b"kms object from oss2"
    assert open(m.path("misc", "hr-key"), "rb").read() == b"hr key elsewhere"
    kms.reset_counts()
    for _ in range(3):  # unwrapped data keys are cached: reopening does not call KMS again
        assert open(m.path("finance", "by-oss2"), "rb").read() == b"kms object from oss2"
    assert kms.counts.get("Decrypt", 0) == 0


@pytest.mark.expect_log(r"ERROR ossfuse\.fs\.files: cannot (open|read|write)|ERROR ossfuse\.kms: KMS .* unavailable")
def test_missing_key_unknown_matdesc_and_unreachable_kms(keyed, tmp_path, kms):
    m, key_id = keyed
    from ossfuse.keyring import generate_rsa_cmk
    stranger = str(tmp_path / "stranger.pem")
    generate_rsa_cmk(stranger, bits=2048)
    crypto_bucket(m, rsa_provider(stranger, {"dept": "unknown"})).put_object("misc/unknown-matdesc", b"x")
    crypto_bucket(m, rsa_provider(stranger)).put_object("misc/missing-key", b"y")
    with open(m.path("misc", "fine"), "wb") as f:
        f.write(b"fine")
    time.sleep(0.6)
    for name, want in (("unknown-matdesc", errno.EACCES), ("missing-key", errno.EIO)):
        with pytest.raises(OSError) as e:
            open(m.path("misc", name), "rb").read()
        assert e.value.errno == want, name
    log = m.log()
    assert "'misc/unknown-matdesc'" in log and '{"dept": "unknown"}' in log
    # the open succeeded (the CMK unwraps in the background), the read failed: the line says so
    assert "cannot read 'misc/missing-key': CMK 'main' cannot unwrap" in log
    os.mkdir(m.path("finance"))
    kms.stop()
    with pytest.raises(OSError) as e:  # new writes under the KMS rule fail clearly
        with open(m.path("finance", "new"), "wb") as f:
            f.write(b"z")
    assert e.value.errno == errno.EIO
    assert "no data key" in m.log() and "unavailable" in m.log()
    assert open(m.path("misc", "fine"), "rb").read() == b"fine"  # RSA objects go on
    with open(m.path("misc", "more"), "wb") as f:
        f.write(b"rsa writes go on")
    kms.start()
    with open(m.path("finance", "new"), "wb") as f:
        f.write(b"z")
    assert m.stop() == 0
    assert m.head("finance/new").metadata[env.H_WRAP_ALG] == "KMS/ALICLOUD"


def test_rekey_200_objects_from_rsa_to_kms_then_nothing(tmp_path, cmk_path, other_cmk_path, oss_server, kms):
    import subprocess
    from conftest import OSSFUSE
    key_id = kms.create_key()
    m = Mount(str(tmp_path / "m"), cmk_path, "multipart_threshold = 300000\npart_size = 102400", server=oss_server,
              extra=keyring_config(cmk_path, other_cmk_path, kms, key_id))
    rsa_cb = crypto_bucket(m, rsa_provider(cmk_path))
    payloads = {f"tree/d{i % 7}/f{i:03d}": os.urandom(i * 37) for i in range(199)}
    for key, data in payloads.items():
        rsa_cb.put_object(key, data)
    m.start()
    big = os.urandom(700_001)  # a multipart object written by the mount
    with open(m.path("tree", "big"), "wb") as f:
        f.write(big)
    assert m.stop() == 0
    payloads["tree/big"] = big
    assert m.head("tree/big").metadata[env.H_PART_SIZE] == "102400"

    def rekey(*extra):
        return subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--from", "main", "--to", "fin-kms", *extra, "tree"],
                              capture_output=True, text=True, env=m.env, timeout=120)

    r = rekey("--dry-run")
    assert r.returncode == 0 and "would change: 200 object(s)" in r.stdout, r.stdout + r.stderr
    assert m.head("tree/big").metadata[env.H_WRAP_ALG] == "RSA/NONE/PKCS1Padding"
    r = rekey()
    assert r.returncode == 0 and "changed: 200 object(s)" in r.stdout, r.stdout + r.stderr
    kms_cb = crypto_bucket(m, kms_provider(kms, key_id))  # only the new CMK
    for key, data in payloads.items():
        assert kms_cb.get_object(key).read() == data, key
        assert m.head(key).metadata[env.H_WRAP_ALG] == "KMS/ALICLOUD"
    assert kms_cb.get_object("tree/big", byte_range=(102395, 102420)).read() == big[102395:102421]
    r = rekey()  # a second run finds nothing left on the old CMK
    assert "changed: 0 object(s)" in r.stdout and "skipped, other CMK: 200" in r.stdout, r.stdout
    r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "fin-kms", "tree"], capture_output=True,
                       text=True, env=m.env, timeout=120)
    assert "changed: 0 object(s)" in r.stdout and "already on the target CMK: 200" in r.stdout, r.stdout
    assert oss_server.pending_uploads() == 0


def test_check_reports_each_cmk_and_the_store(tmp_path, cmk_path, other_cmk_path, oss_server, kms):
    import subprocess
    from conftest import OSSFUSE
    key_id = kms.create_key()
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server,
              extra=keyring_config(cmk_path, other_cmk_path, kms, key_id))
    r = subprocess.run(OSSFUSE + ["check", "-c", m.config], capture_output=True, text=True, env=m.env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok    ") == 5 and "ok    no encrypted object to sample" in r.stdout  # an empty bucket
    assert "CMK 'fin-kms' (KMS/ALICLOUD): wraps and unwraps" in r.stdout
    kms.stop()
    r = subprocess.run(OSSFUSE + ["check", "-c", m.config], capture_output=True, text=True, env=m.env, timeout=60)
    assert r.returncode == 1
    assert "FAIL  CMK 'fin-kms' (KMS/ALICLOUD): its service cannot be reached" in r.stdout
    assert "ok    store" in r.stdout


def test_oss2_with_rsa_keys_registered_under_several_matdescs(keyed, cmk_path, other_cmk_path):
    """oss2 reads what the mount wrote under two RSA CMKs with one CryptoBucket whose provider
    has the second key registered with add_encryption_materials; and the mount reads what
    that bucket writes under either matdesc."""
    m, _ = keyed
    os.mkdir(m.path("hr"))
    with open(m.path("hr", "pay"), "wb") as f:
        f.write(b"salaries")
    with open(m.path("plain-rule"), "wb") as f:
        f.write(b"default key")
    assert m.stop() == 0
    provider = rsa_provider(cmk_path)  # the default CMK, no matdesc
    with open(other_cmk_path) as f, open(other_cmk_path + ".pub") as g:
        provider.add_encryption_materials(oss2.crypto.EncryptionMaterials(
            {"dept": "hr"}, key_pair={"private_key": f.read(), "public_key": g.read()}))
    cb = crypto_bucket(m, provider)
    assert cb.get_object("hr/pay").read() == b"salaries"
    assert cb.get_object("plain-rule").read() == b"default key"
    cb.put_object("hr/by-oss2", b"written with the default provider")
    hr_cb = crypto_bucket(m, rsa_provider(other_cmk_path, {"dept": "hr"}))
    hr_cb.put_object("hr/by-oss2-hr", b"written under the hr matdesc")
    m.start()
    assert open(m.path("hr", "by-oss2"), "rb").read() == b"written with the default provider"
    assert open(m.path("hr", "by-oss2-hr"), "rb").read() == b"written under the hr matdesc"


@pytest.mark.expect_log(r"ERROR ossfuse\.kms: KMS .* unavailable|WARNING ossfuse\.daemon: not reachable yet",
                        r"WARNING ossfuse\.daemon: CMK 'fin-kms': .* mounted anyway",
                        r"ERROR ossfuse\.fs\.files: cannot write 'finance/x': no data key")
def test_mount_waits_for_kms_at_start_then_goes_on(tmp_path, cmk_path, other_cmk_path, oss_server, kms):
    """KMS unreachable at mount: it is waited for up to startup_timeout, then the mount goes on
    (an operator trial: RSA files were unreachable for a KMS outage), saying so; files under
    the KMS CMK fail with EIO until it answers."""
    import threading
    key_id = kms.create_key()
    m = Mount(str(tmp_path / "m"), cmk_path, "startup_timeout = 2", server=oss_server,
              extra=keyring_config(cmk_path, other_cmk_path, kms, key_id))
    kms.stop()
    m.start()
    try:
        assert re.search(r"^ossfuse: warning: CMK 'fin-kms': .*: unreachable for \d+s \(startup_timeout\); "
                         r"mounted anyway: files under that CMK fail with EIO", m.mount_stderr, re.M), m.mount_stderr
        with open(m.path("plain"), "wb") as f:  # the default RSA CMK: works
            f.write(b"rsa")
        os.mkdir(m.path("finance"))
        with pytest.raises(OSError) as e:
            with open(m.path("finance", "x"), "wb") as f:
                f.write(b"kms")
        assert e.value.errno == errno.EIO
        assert m.stop() == 0
    finally:
        m.cleanup()
    m.write_config("startup_timeout = 60", extra=keyring_config(cmk_path, other_cmk_path, kms, key_id))
    threading.Timer(2.0, kms.start).start()
    m.start()  # retried until KMS answered
    try:
        assert "not reachable yet" in m.log()
        assert os.path.ismount(m.mnt)
    finally:
        m.cleanup()


@pytest.mark.expect_log(r"ERROR ossfuse: .*(cannot load CMK: )?CMK 'fin-kms': credentials file .* has mode 0644")
def test_a_kms_cmk_with_unusable_credentials_fails_the_mount_in_one_line(tmp_path, cmk_path, other_cmk_path,
                                                                         oss_server, kms):
    """An operator trial: a KMS CMK whose credentials file is readable by others (or not
    TOML) ended the daemon with a traceback in the log and "the daemon exited with status 1"."""
    import subprocess
    from conftest import OSSFUSE
    creds = tmp_path / "kms.credentials"
    creds.write_text('access_key_id = "a"\naccess_key_secret = "b"\n')
    creds.chmod(0o644)
    key_id = kms.create_key()
    extra = keyring_config(cmk_path, other_cmk_path, kms, key_id).replace(
        f'endpoint = "{kms.endpoint}"', f'endpoint = "{kms.endpoint}"\ncredentials_file = "{creds}"')
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server, extra=extra)
    try:
        r = subprocess.run(OSSFUSE + ["mount", "-c", m.config, m.mnt], capture_output=True, text=True, env=m.env,
                           timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"cannot load CMK: CMK 'fin-kms': credentials file {creds} has mode 0644" in r.stderr, r.stderr
        assert "Traceback" not in m.log()
        # a local bucket whose store.credentials_file (mode 0644) the KMS CMK uses: the same one line
        from conftest import local_config
        (tmp_path / "l").mkdir()
        text = open(local_config(tmp_path / "l", {"k": cmk_path}, extra=(
            f'[[encryption.cmk]]\nid = "fin-kms"\ntype = "kms"\nkey_id = "{key_id}"\nregion = "{REGION}"\n'
            f'endpoint = "{kms.endpoint}"\n'))).read()
        cfg = tmp_path / "l" / "c.toml"
        cfg.write_text(text.replace("[store]", f'[store]\ncredentials_file = "{creds}"'))
        (tmp_path / "l" / "mnt").mkdir()
        r = subprocess.run(OSSFUSE + ["mount", "-c", str(cfg), str(tmp_path / "l" / "mnt")], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"CMK 'fin-kms': credentials file {creds} has mode 0644" in r.stderr, r.stderr
        assert "Traceback" not in open(tmp_path / "l" / "cache" / "ossfuse.log").read()
    finally:
        m.cleanup()


def _unmount_if_mounted(mnt: str) -> None:
    """A test's cleanup: no mount left at ``mnt`` (``ossfuse umount``, else fusermount3 -uz)."""
    import subprocess
    from conftest import run_cli
    from ossfuse.registry import mounted_device
    if mounted_device(mnt) is not None and run_cli("umount", mnt).returncode != 0:
        subprocess.run(["fusermount3", "-uz", mnt], check=False)


def _config_with_cmk(tmp_path, cmk_path, cmk_lines: str) -> str:
    path = tmp_path / "matdesc.toml"
    path.write_text(f'[store]\nurl = "local://{tmp_path}/b"\n[encryption]\nencrypt_with = "k"\n'
                    f'[[encryption.cmk]]\nid = "k"\ntype = "rsa"\nprivate_key = "{cmk_path}"\n{cmk_lines}\n'
                    f'[cache]\ndir = "{tmp_path}/c"\n')
    return str(path)


def test_matdesc_text_in_the_config(tmp_path, cmk_path):
    """``matdesc_text`` is the exact header text (for readers that match by text in another form);
    it must parse to ``matdesc`` when both are given, and fit an HTTP header."""
    from ossfuse import config as config_mod
    from ossfuse.keyring import Keyring
    ok = [("matdesc_text = '{\"team\": \"alpha\", \"env\": \"x\"}'", {"team": "alpha", "env": "x"}),
          ("matdesc = { env = \"x\", team = \"alpha\" }\nmatdesc_text = '{\"team\": \"alpha\", \"env\": \"x\"}'",
           {"team": "alpha", "env": "x"}),
          ("matdesc_text = '{\"k\": \"\\u00e9\"}'", {"k": "é"})]
    for lines, want in ok:
        cfg = config_mod.load(_config_with_cmk(tmp_path, cmk_path, lines))
        cmk = cfg.encryption.cmks[0]
        assert cmk.matdesc == want, lines
        written = Keyring(cfg.encryption).new_envelope("f").wrapped.headers()[env.H_MATDESC]
        assert written == cmk.matdesc_text and env.parse_matdesc(written) == want
    # without matdesc_text: Go's form
    cfg = config_mod.load(_config_with_cmk(tmp_path, cmk_path, 'matdesc = { team = "a<b", env = "x" }'))
    assert Keyring(cfg.encryption).default.matdesc_raw == '{"env":"x","team":"a\\u003cb"}'
    bad = [("matdesc = { team = \"alpha\" }\nmatdesc_text = '{\"team\": \"beta\"}'", "matdesc_text: describes"),
           ("matdesc_text = 'team=alpha'", "matdesc_text: must be a JSON object of string values"),
           ("matdesc_text = '{\"n\": 1}'", "matdesc_text: must be a JSON object of string values"),
           ("matdesc_text = '{}'", "matdesc_text: an empty description"),
           ("matdesc_text = '{\"k\": \"é\"}'", "matdesc_text: must be printable ASCII"),
           ("matdesc_text = 3", "matdesc_text: must be str")]
    for lines, message in bad:
        path = _config_with_cmk(tmp_path, cmk_path, lines)
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.load(path)
        assert str(e.value).startswith(f"{path}: encryption.cmk[0].") and message in str(e.value), (lines, e.value)


def _two_rsa_cmks(other_cmk_path: str, b_matdesc: str = "") -> str:
    """Config lines adding CMK "b" (RSA, ``other_cmk_path``) beside the Mount's "main"."""
    return f'[[encryption.cmk]]\nid = "b"\ntype = "rsa"\nprivate_key = "{other_cmk_path}"\n{b_matdesc}\n'


def test_rekey_refuses_a_cmk_that_would_not_read_its_objects_and_round_trips(
        tmp_path, cmk_path, other_cmk_path, oss_server):
    """Issue 16: with two RSA CMKs without matdesc (the README's minimal form), rekey --to b
    used to make every object unreadable (the config reads objects without matdesc with
    "main"). It is refused, naming the fix; with the fix (b gets a matdesc) main → b → main
    keeps every object readable through the mount and through oss2 with only the right key."""
    import subprocess
    from conftest import OSSFUSE
    m = Mount(str(tmp_path / "m"), cmk_path, "multipart_threshold = 204800\npart_size = 102400",
              server=oss_server, extra=_two_rsa_cmks(other_cmk_path))
    m.start()
    files = {"tree/small": os.urandom(1001), "tree/big": os.urandom(300_007), "tree/sub/empty": b""}
    try:
        os.makedirs(m.path("tree", "sub"))
        for name, data in files.items():
            with open(m.path(name), "wb") as f:
                f.write(data)
    finally:
        assert m.stop() == 0
    keys_before = {k: m.head(k).metadata[env.H_KEY] for k in files}

    def rekey(*args):
        return subprocess.run(OSSFUSE + ["rekey", "-c", m.config, *args], capture_output=True, text=True,
                              env=m.env, timeout=120)

    def readable(provider_key: str, matdesc):
        m.start()
        try:
            for name, data in files.items():
                with open(m.path(name), "rb") as f:
                    assert f.read() == data, name
        finally:
            assert m.stop() == 0
        cb = crypto_bucket(m, rsa_provider(provider_key, matdesc))
        for name, data in files.items():
            assert cb.get_object(name).read() == data, name
        assert cb.get_object("tree/big", byte_range=(102395, 102420)).read() == files["tree/big"][102395:102421]

    for dry in ((), ("--dry-run",)):
        r = rekey("--to", "b", *dry)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stdout + r.stderr
        assert "refusing to rekey to CMK 'b'" in r.stderr and "with CMK 'main'" in r.stderr
        assert 'matdesc = { cmk = "b" }' in r.stderr and "default_for_no_matdesc" in r.stderr
    assert {k: m.head(k).metadata[env.H_KEY] for k in files} == keys_before  # nothing touched
    # the fix the message names
    m.write_config("multipart_threshold = 204800\npart_size = 102400",
                   extra=_two_rsa_cmks(other_cmk_path, 'matdesc = { cmk = "b" }'))
    r = rekey("--to", "b", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would change: 3 object(s)" in r.stdout
    assert "would be read with CMK 'b': 3 object(s): 'tree/big', 'tree/small', 'tree/sub/empty'" in r.stdout
    for path in ("tree/small/", "tree//small", "./tree/small"):  # a file PATH, written as a path
        r = rekey("--to", "b", "--dry-run", path)
        assert r.returncode == 0 and "would change: 1 object(s), 1001 bytes" in r.stdout, r.stdout + r.stderr
    for path in ("tree/smal", "nowhere/"):  # a typo: not a rekey with nothing to do
        r = rekey("--to", "b", path)
        assert r.returncode == 1 and r.stdout == "" and r.stderr == (
            f"ossfuse: rekey {path}: no object there (PATH is a path in the mount, as in /mnt/ossfuse/photos or "
            f"photos typed in /mnt/ossfuse, or one below the mount's root, as in photos)\n"), r.stdout + r.stderr
    r = rekey("--to", "b", "../x")
    assert r.returncode == 1 and "PATH is above the mount's root" in r.stderr
    assert {k: m.head(k).metadata[env.H_KEY] for k in files} == keys_before
    r = rekey("--to", "b")
    assert r.returncode == 0 and "changed: 3 object(s)" in r.stdout, r.stdout + r.stderr
    assert "now read with CMK 'b': 3 object(s)" in r.stdout
    assert all(m.head(k).metadata[env.H_MATDESC] == '{"cmk":"b"}' for k in files)
    readable(other_cmk_path, {"cmk": "b"})
    r = rekey("--to", "main")
    assert r.returncode == 0 and "changed: 3 object(s)" in r.stdout, r.stdout + r.stderr
    assert all(env.H_MATDESC not in m.head(k).metadata for k in files)
    readable(cmk_path, None)
    r = rekey("--to", "main")
    assert "changed: 0 object(s)" in r.stdout and "already on the target CMK: 3" in r.stdout, r.stdout
    assert oss_server.pending_uploads() == 0


def test_rekey_repairs_objects_an_older_rekey_left_unreadable(tmp_path, cmk_path, other_cmk_path, oss_server):
    """An object wrapped by CMK "b" without matdesc, in a config that reads such objects with
    "main" (what rekey --to b did before issue 16): rekey --to main says it cannot be unwrapped
    and how to fix it (not "already on the target CMK"); rekey --from b --to main rewraps it."""
    import subprocess
    from conftest import OSSFUSE
    from ossfuse.config import CmkConfig, EncryptionConfig
    from ossfuse.keyring import Keyring
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server,
              extra=_two_rsa_cmks(other_cmk_path, 'matdesc = { cmk = "b" }'))
    only_b = Keyring(EncryptionConfig(encrypt_with="b", cmks=(CmkConfig("b", "rsa", other_cmk_path),)))
    e = only_b.new_envelope("locked")
    plain = os.urandom(5000)
    meta = {**e.wrapped.headers(), env.H_PLAIN_LEN: str(len(plain))}
    conftest.run_sync(m.store.put_bytes, "locked", e.crypt(0, plain), meta)

    def rekey(*args):
        return subprocess.run(OSSFUSE + ["rekey", "-c", m.config, *args], capture_output=True, text=True,
                              env=m.env, timeout=120)

    r = rekey("--to", "main", "--dry-run")  # a dry run that would fail says so in its status too
    assert r.returncode == 1 and "failed: 1" in r.stdout, r.stdout
    r = rekey("--to", "main")
    assert r.returncode == 1 and "already on the target CMK: 0" in r.stdout, r.stdout
    assert "failed: 1" in r.stdout and "CMK 'main', which cannot unwrap it" in r.stdout
    assert "ossfuse rekey --from THAT-ID --to main" in r.stdout
    r = rekey("--from", "b", "--to", "main")
    assert r.returncode == 0 and "changed: 1 object(s)" in r.stdout, r.stdout + r.stderr
    m.start()
    try:
        assert open(m.path("locked"), "rb").read() == plain
    finally:
        m.cleanup()
    assert crypto_bucket(m, rsa_provider(cmk_path)).get_object("locked").read() == plain


def test_check_names_a_cmk_whose_new_files_this_config_would_not_read(tmp_path, cmk_path, other_cmk_path):
    import subprocess
    from conftest import OSSFUSE
    m = Mount(str(tmp_path / "m"), cmk_path, extra=_two_rsa_cmks(other_cmk_path) +
              '[[encryption.rule]]\nprefix = "b/"\nencrypt_with = "b"\n')
    r = subprocess.run(OSSFUSE + ["check", "-c", m.config], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "FAIL  CMK 'b': new files it encrypts would not be readable: objects CMK 'b' wraps carry no " \
           "matdesc, and this configuration reads such objects with CMK 'main'" in r.stdout, r.stdout
    assert "FAIL  CMK 'main'" not in r.stdout


def test_check_samples_objects_and_fails_when_the_keys_cannot_read_them(tmp_path, cmk_path, other_cmk_path):
    """`ossfuse check` unwraps the data keys of a sample of the bucket's encrypted objects: a
    config holding only another RSA key (a second `ossfuse quickstart`) gets exit 1 and a line
    naming an object it cannot read; the config with the bucket's key gets ok."""
    import trio
    from conftest import local_config, run_cli
    from fakes.core import committed_file, core_filesystem, core_store

    async def write():
        store = core_store(tmp_path)  # tmp_path/bucket, keys under pre/
        fs = core_filesystem(tmp_path / "w", cmk_path, store=store)
        for name in ("f1", "f2"):
            await committed_file(fs, name, b"data of " + name.encode())
        fs.close()
        await store.aclose()

    (tmp_path / "e" / "bucket").mkdir(parents=True, mode=0o700)  # an empty bucket (a check makes none)
    empty = local_config(tmp_path / "e", {"main": cmk_path})  # a bucket with nothing to sample: said so
    r = run_cli("check", "-c", empty)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok    no encrypted object to sample among the first 200 listed under the prefix (none, or " \
           "plaintext only): no object's data key tried" in r.stdout, r.stdout
    trio.run(write)
    wrong = local_config(tmp_path, {"new": other_cmk_path})
    r = run_cli("check", "-c", wrong)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  2 of 2 sampled encrypted objects cannot be read with this config's keys: e.g. 'pre/f1' " \
           "(matdesc (none): no configured CMK unwraps its data key" in r.stdout, r.stdout
    r = run_cli("check", "-c", wrong, "--verify")  # it was skipped without a word (new-user trial)
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [ln.split(" (ETag")[0] for ln in r.stdout.splitlines() if ln.startswith("FAIL  pre/")]
    assert fails == ["FAIL  pre/f1", "FAIL  pre/f2"] and "failed: 2" in r.stdout, r.stdout
    right = local_config(tmp_path, {"main": cmk_path})
    r = run_cli("check", "-c", right)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok    2 sampled encrypted object(s) open with this config's keys" in r.stdout, r.stdout


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: 2 of the first 2 encrypted objects in the bucket cannot be read",
                        r"ERROR ossfuse\.fs\.files: cannot (open|read) 'f1'")
def test_a_mount_with_a_key_that_reads_none_of_the_sampled_objects_warns(tmp_path, cmk_path, other_cmk_path,
                                                                        make_mount):
    """Trial R: a mount whose config held another RSA key than the bucket's mounted with no
    word (reads gave EIO, new files went into the prefix under a key no other client reads).
    `ossfuse mount` now says so in one warning naming an object and the reason (the mount goes
    on: objects of other CMKs may be expected); with the bucket's key it says nothing."""
    m = make_mount()
    for name in ("f1", "f2"):
        with open(m.path(name), "wb") as f:
            f.write(b"data of " + name.encode())
    os.mkdir(m.path("d"))  # (a directory marker is not sampled)
    assert m.stop() == 0
    m.start()  # the bucket's key: nothing to say
    assert m.mount_stderr == "", m.mount_stderr
    assert m.stop() == 0
    m.cmk = other_cmk_path
    m.write_config()
    m.start()
    assert m.mount_stderr == (
        "ossfuse: warning: 2 of the first 2 encrypted objects in the bucket cannot be read with this config's "
        "CMKs (e.g. 'f1': matdesc (none): no configured CMK unwraps its data key: CMK 'main' cannot unwrap the data "
        "key (wrong CMK or corrupt key header)): reading them fails (EIO, or EACCES when no CMK matches their "
        f"matdesc; a wrong private_key, or a CMK missing from {m.config}?); new files are encrypted with CMK "
        f"'main'. `ossfuse check -c {m.config}` samples more\n"), m.mount_stderr
    with pytest.raises(OSError) as e:
        open(m.path("f1"), "rb").read()
    assert e.value.errno in (errno.EIO, errno.EACCES)
    assert m.stop() == 0


def test_quickstart_refuses_a_new_key_for_a_bucket_of_encrypted_objects(tmp_path, cmk_path):
    """`ossfuse quickstart --etc NEWDIR` over a bucket dir that holds encrypted objects stops
    with one line (exit 1) instead of making a CMK that cannot read them; nothing is created
    in NEWDIR and nothing is mounted."""
    import trio
    from conftest import run_cli
    from fakes.core import committed_file, core_filesystem, core_store

    async def write():
        store = core_store(tmp_path / "var")  # the quickstart layout: VAR/bucket
        fs = core_filesystem(tmp_path / "w", cmk_path, store=store)
        await committed_file(fs, "f1", b"precious")
        fs.close()
        await store.aclose()

    trio.run(write)
    etc = tmp_path / "etc2"
    r = run_cli("quickstart", "--etc", str(etc), "--var", str(tmp_path / "var"), "--cache", str(tmp_path / "c"),
                str(tmp_path / "mnt"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{tmp_path}/var/bucket already holds encrypted objects (e.g. 'pre/f1') and {etc}/default.pem " \
           "does not exist: a new CMK could not read them; pass --etc with the directory of their key, or " \
           "--new-key to make a new one anyway" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not etc.exists() and not (tmp_path / "mnt").exists()  # nothing made (an empty etc2/ was left)


def test_quickstart_again_with_other_var_or_cache_is_refused(tmp_path, cmk_path):
    """A second `ossfuse quickstart --etc SAME --var OTHER` mounted the config's bucket while it
    printed, and created, OTHER/bucket (new-user trial): --var and --cache count only when the
    config is created; other ones are refused in one line, nothing is created or mounted."""
    from conftest import run_cli
    from ossfuse.cli import QUICKSTART_CONFIG
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text(QUICKSTART_CONFIG.format(bucket=tmp_path / "var" / "bucket", key=cmk_path,
                                                                  cache=tmp_path / "cache"))
    r = run_cli("quickstart", "--etc", str(etc), "--var", str(tmp_path / "other"), "--cache", str(tmp_path / "cache"),
                str(tmp_path / "mnt"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"ossfuse: {etc}/default.toml exists and uses the bucket {tmp_path}/var/bucket and the cache dir "
        f"{tmp_path}/cache, not --var ({tmp_path}/other) (--var and --cache count only when quickstart creates "
        f"the config): pass another --etc, or edit {etc}/default.toml"], r.stderr
    assert not (tmp_path / "other").exists() and not os.path.ismount(tmp_path / "mnt")


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: 1 of the first 1 encrypted objects in the bucket cannot be read",
                        r"ERROR ossfuse\.fs\.files: cannot (open|read) 'old'")
def test_quickstart_whose_cmk_was_deleted_refuses_and_makes_one_with_new_key(tmp_path):
    """The CMK of an earlier quickstart deleted, its config and public key left (new-user
    trial): quickstart stopped at the config's "no such file" for both the plain run and
    ``--new-key``, which was then ignored. Now the plain run refuses in the one line that
    names the encrypted objects, and ``--new-key`` makes a new CMK (the stale public key moved
    aside, never half a key pair written) and mounts: old files listed, new ones written."""
    from conftest import run_cli
    from ossfuse.registry import mounted_device
    mnt, etc = str(tmp_path / "mnt"), tmp_path / "etc"
    args = ("quickstart", "--etc", str(etc), "--var", str(tmp_path / "var"), "--cache", str(tmp_path / "cache"), mnt)
    try:
        assert run_cli(*args).returncode == 0
        with open(os.path.join(mnt, "old"), "wb") as f:
            f.write(b"under the lost CMK")
        assert run_cli("umount", mnt).returncode == 0
        old_pub = (etc / "default.pem.pub").read_bytes()
        os.unlink(etc / "default.pem")
        r = run_cli(*args)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [
            f"ossfuse: {tmp_path}/var/bucket already holds encrypted objects (e.g. 'old') and {etc}/default.pem "
            "does not exist: a new CMK could not read them; pass --etc with the directory of their key, or "
            "--new-key to make a new one anyway"], r.stderr
        assert not (etc / "default.pem").exists() and mounted_device(mnt) is None
        r = run_cli(*args, "--new-key")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr.splitlines() == [
            f"ossfuse: warning: the encrypted objects {tmp_path}/var/bucket holds (e.g. 'old') stay readable only "
            f"with the missing CMK: through the folder they give EIO (`ossfuse check -c {etc}/default.toml --verify` "
            "lists each)",
            # the mount's own sample of the bucket's envelopes says the same of what it found
            "ossfuse: warning: 1 of the first 1 encrypted objects in the bucket cannot be read with this config's "
            "CMKs (e.g. 'old': matdesc (none): no configured CMK unwraps its data key: CMK 'default' cannot unwrap the "
            "data key (wrong CMK or corrupt key header)): reading them fails (EIO, or EACCES when no CMK matches "
            f"their matdesc; a wrong private_key, or a CMK missing from {etc}/default.toml?); new files are "
            f"encrypted with CMK 'default'. `ossfuse check -c {etc}/default.toml` samples more"], r.stderr
        assert f"moved {etc}/default.pem.pub, the public key of the missing CMK, to {etc}/default.pem.pub.old" \
            in r.stdout and f"created CMK {etc}/default.pem" in r.stdout, r.stdout
        assert (etc / "default.pem.pub.old").read_bytes() == old_pub
        assert (etc / "default.pem.pub").read_bytes() != old_pub
        assert sorted(os.listdir(mnt)) == ["old"]
        with pytest.raises(OSError) as e:
            open(os.path.join(mnt, "old"), "rb").read()
        assert e.value.errno == errno.EIO
        with open(os.path.join(mnt, "new"), "wb") as f:
            f.write(b"under the new CMK")
        with open(os.path.join(mnt, "new"), "rb") as f:
            assert f.read() == b"under the new CMK"
        pem = (etc / "default.pem").read_bytes()
        r = run_cli(*args, "--new-key")  # the CMK exists now: said, and kept
        assert r.returncode == 0 and (etc / "default.pem").read_bytes() == pem, r.stdout + r.stderr
        assert r.stderr.startswith(f"ossfuse: warning: --new-key makes a CMK only when {etc}/default.pem is missing; "
                                   "it exists and stays the CMK of new files"), r.stderr
    finally:
        _unmount_if_mounted(mnt)


def test_quickstart_with_relative_paths_or_files_where_directories_belong(tmp_path):
    """New-user trial: relative --etc/--var/--cache went into the config as given, where they
    count from the config's directory (a config that never worked, then tracebacks); a file
    given where a directory belongs was a traceback. Now relative paths are made absolute and
    mount, and a file is refused in one line, nothing made."""
    from conftest import run_cli
    (tmp_path / "afile").touch()
    for args, line in [
        (("--etc", "afile"), f"--etc {tmp_path}/afile is not a directory"),
        (("--etc", "e2", "--var", "afile"), f"--var {tmp_path}/afile is not a directory"),
        (("--etc", "e3", "--cache", "afile"), f"--cache {tmp_path}/afile is not a directory"),
    ]:
        r = run_cli("quickstart", "m0", *args, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr == f"ossfuse: {line}\n", r.stderr
    r = run_cli("quickstart", "afile", "--etc", "e4", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == f"ossfuse: mount point {tmp_path}/afile is not a directory\n", r.stderr
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    mnt = str(tmp_path / "mnt")
    try:
        r = run_cli("quickstart", "mnt", "--etc", "etc", "--var", "var", "--cache", "cache", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        text = (tmp_path / "etc" / "default.toml").read_text()
        assert f'url = "local://{tmp_path}/var/bucket"' in text and f'"{tmp_path}/etc/default.pem"' in text, text
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"kept")
        assert run_cli("umount", mnt).returncode == 0
        r = run_cli("quickstart", "mnt", "--etc", "etc", cwd=tmp_path)  # the README's "again"
        assert r.returncode == 0, r.stdout + r.stderr
        with open(os.path.join(mnt, "f"), "rb") as f:
            assert f.read() == b"kept"
    finally:
        _unmount_if_mounted(mnt)


def test_quickstarts_hints_name_a_command_the_shell_finds(tmp_path, monkeypatch):
    """Trial X: installed with OSSFUSE_NO_LINK=1 (no ``ossfuse`` on the PATH), quickstart's
    "unmount with: ossfuse umount …" named a command the shell cannot find. The hints name
    ``ossfuse`` when the PATH has one, else this program as it was run."""
    from ossfuse import cli
    import sys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    script = tmp_path / "venv" / "ossfuse"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "quickstart"])
    assert cli._command_for_hints() == str(script)
    monkeypatch.setattr(sys, "argv", ["/x/ossfuse/__main__.py", "quickstart"])
    assert cli._command_for_hints() == f"{sys.executable} -m ossfuse"
    (bin_dir / "ossfuse").write_text("#!/bin/sh\n")
    (bin_dir / "ossfuse").chmod(0o755)
    assert cli._command_for_hints() == "ossfuse"
    # new-user trials: the PATH's ossfuse is another install than the one that ran: its own path
    monkeypatch.setattr(sys, "argv", [str(script), "quickstart"])
    assert cli._command_for_hints() == str(script)
    (bin_dir / "ossfuse").unlink()
    (bin_dir / "ossfuse").symlink_to(script)  # the PATH's is this one (a link to it)
    assert cli._command_for_hints() == "ossfuse"
    monkeypatch.setattr(sys, "argv", ["/x/ossfuse/__main__.py", "quickstart"])
    # trial AA: with OSSFUSE_RUNTIME_DIR set, `ossfuse umount` without it found no daemon
    monkeypatch.setenv("OSSFUSE_RUNTIME_DIR", "/tmp/my run")
    assert cli._command_for_hints() == "OSSFUSE_RUNTIME_DIR='/tmp/my run' ossfuse"


def test_quickstart_refuses_a_new_key_while_the_cache_dir_holds_journaled_files(tmp_path):
    """The CMK gone, the bucket empty, but closed files not uploaded yet in the cache dir's
    journal (a crash before their upload; new-user trial): quickstart made a new CMK and they
    were uploaded unreadable, without a word. Now it refuses, as for encrypted objects."""
    from conftest import run_cli
    from ossfuse.registry import mounted_device
    mnt, etc, cache = str(tmp_path / "mnt"), tmp_path / "etc", tmp_path / "cache"
    args = ("quickstart", "--etc", str(etc), "--var", str(tmp_path / "var"), "--cache", str(cache), mnt)
    try:
        assert run_cli(*args).returncode == 0
        assert run_cli("umount", mnt).returncode == 0
        os.unlink(etc / "default.pem")
        (cache / "staging" / "0123abcd.json").write_text("{}")  # what a crash leaves (its content is not read)
        r = run_cli(*args)
        assert r.returncode == 1 and r.stderr == (
            f"ossfuse: the cache dir {cache} holds 1 journaled file(s) not uploaded yet and {etc}/default.pem does not "
            "exist: they are encrypted under it; pass --etc with the directory of their key, or --new-key to make a "
            "new one anyway (they would then be uploaded unreadable)\n"), r.stderr
        assert not (etc / "default.pem").exists() and mounted_device(mnt) is None
    finally:
        _unmount_if_mounted(mnt)


@pytest.mark.expect_log(r"WARNING ossfuse.daemon: mount point .* was (the mount of a dead ossfuse daemon|the dead mount of an "
                        r"earlier daemon)")
def test_quickstart_again_after_its_daemon_died_mounts_again(tmp_path):
    """The README's "run the quickstart again" over the dead mount of a killed daemon mounts
    anew (it was a traceback: FileExistsError from making the mount point, whose stat gives
    ENOTCONN), and the files written before the kill are there."""
    import signal
    import time
    from conftest import run_cli
    from ossfuse.registry import mounted_device, process_alive, read_registry
    mnt = str(tmp_path / "mnt")
    args = ("quickstart", "--etc", str(tmp_path / "etc"), "--var", str(tmp_path / "var"), "--cache",
            str(tmp_path / "cache"), mnt)
    try:
        r = run_cli(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"kept")
            os.fsync(f.fileno())
        pid = read_registry(mnt)["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not process_alive(pid):
                break
            time.sleep(0.02)
        assert mounted_device(mnt) is not None
        link = str(tmp_path / "link")  # given through a symlink to the mount point, as directly
        os.symlink(mnt, link)
        r = run_cli(*args[:-1], link)
        # (and says that it cleared the dead mount: a new-user trial saw no trace of it but the log)
        assert r.returncode == 0 and re.fullmatch(
            rf"ossfuse: warning: mount point {re.escape(mnt)} was (the mount of a dead ossfuse daemon \(pid {pid}\)|the "
            rf"dead mount of an earlier daemon \(killed or crashed\)): unmounted it first\n", r.stderr), r.stdout + r.stderr
        assert f"folder: {mnt}" in r.stdout and "already mounted" not in r.stdout, r.stdout
        assert read_registry(mnt)["pid"] != pid
        with open(os.path.join(mnt, "f"), "rb") as f:
            assert f.read() == b"kept"
        for given in (mnt, link):  # and once more, with its daemon alive: nothing to do
            r = run_cli(*args[:-1], given)
            assert r.returncode == 0 and f"already mounted: {mnt}" in r.stdout, r.stdout + r.stderr
        second = tmp_path / "second"  # another mount point while the first serves: its cache dir is taken
        r = run_cli(*args[:-1], str(second))
        assert r.returncode == 1 and "is in use by" in r.stderr, r.stdout + r.stderr
        assert not second.exists()  # the mount point it made for nothing is gone (a new-user trial)
        # its bucket's disk not mounted at the next boot: quickstart again (the README's way to
        # mount again) refuses, as a mount does, instead of making an empty bucket there
        assert run_cli("umount", mnt).returncode == 0
        bucket = tmp_path / "var" / "bucket"
        os.rename(bucket, tmp_path / "away")
        r = run_cli(*args)
        assert r.returncode == 1 and "but a mount with this cache dir used it before" in r.stderr, r.stderr
        assert not bucket.exists() and mounted_device(mnt) is None
    finally:
        _unmount_if_mounted(mnt)


@pytest.mark.expect_log(r"refusing to replace 'f1': no configured CMK can read it",
                        r"WARNING ossfuse\.daemon: 2 of the first 2 encrypted objects in the bucket cannot be read")
def test_mount_with_another_key_cannot_overwrite_an_object_it_cannot_read(tmp_path, cmk_path, other_cmk_path):
    """Through the kernel: remounted with another CMK (a second quickstart's), `echo x > f1`
    and `cp new f1` fail with EACCES and f1's object stays byte for byte; rm f1 works."""
    m = Mount(str(tmp_path / "m"), cmk_path)
    try:
        m.start()
        with open(m.path("f1"), "wb") as f:
            f.write(b"precious")
        with open(m.path("f2"), "wb") as f:
            f.write(b"also")
        m.cmk = other_cmk_path
        m.write_config()
        m.remount()  # stops (uploads drain) and starts with the other key
        before = m.get("f1")
        assert len(before) == len(b"precious")
        for flags in (os.O_WRONLY | os.O_TRUNC, os.O_WRONLY):
            with pytest.raises(PermissionError):
                os.open(m.path("f1"), flags)
        with pytest.raises(PermissionError):
            os.truncate(m.path("f1"), 0)
        assert m.get("f1") == before
        os.unlink(m.path("f2"))
        assert "f2" not in os.listdir(m.path())
    finally:
        m.cleanup()


async def _with_committed_f(tmp_path, cmk_path, store):
    """A core Filesystem over ``store`` whose bucket holds file f ("payload"), uploaded."""
    import trio

    from fakes.core import committed_file, core_filesystem
    fs = core_filesystem(tmp_path, cmk_path, store)
    async with trio.open_nursery() as n:
        fs._nursery = n
        n.start_soon(fs.upload_worker)
        await committed_file(fs, "f", b"payload")
        n.cancel_scope.cancel()
    return fs


def _config_with_cmk_b(tmp_path, cmk_path, other_cmk_path):
    """The core Config with a second RSA CMK "b" (``other_cmk_path``, matdesc {"cmk": "b"})."""
    import dataclasses

    from fakes.core import core_config
    cfg = core_config(tmp_path, cmk_path)
    cmks = (*cfg.encryption.cmks, dataclasses.replace(cfg.encryption.cmks[0], id="b", private_key=other_cmk_path,
                                                      matdesc={"cmk": "b"}))
    return dataclasses.replace(cfg, encryption=dataclasses.replace(cfg.encryption, cmks=cmks))


@pytest.mark.expect_log(r"rekey of 'pre/f' failed: the object was changed while it was rewritten")
def test_rekey_never_overwrites_a_save_made_while_it_rewrites_the_object_on_a_local_bucket(tmp_path, cmk_path,
                                                                                          other_cmk_path):
    """Trial U: a write through a running mount landed between rekey's read of an object and
    its re-upload, and rekey put the older content back over it (exit 0, nothing said). Its
    write now states the version it replaces: a local bucket refuses it atomically, the save
    stays, rekey names the object as failed ("run rekey again"). (OSS has no conditional PUT:
    that window stays there, docs/semantics.md.)"""
    import trio

    from fakes.core import core_store

    from ossfuse.keyring import Keyring
    from ossfuse.rekey import rekey

    store = core_store(tmp_path)

    async def main():
        fs = await _with_committed_f(tmp_path, cmk_path, store)
        saved = await store.head("pre/f")
        cfg = _config_with_cmk_b(tmp_path, cmk_path, other_cmk_path)
        real_get_range = store.get_range
        mounts_save: list = []

        reads: list[str] = []

        async def get_range_then_a_save(key, *args, **kwargs):
            data = await real_get_range(key, *args, **kwargs)
            reads.append(key)
            if reads.count("pre/f") == 2:  # rekey read it (tags checked, then the copy's read): the mount saves
                mounts_save.append(await store.put_bytes("pre/f", b"the mount's save", dict(saved.metadata)))
            return data
        store.get_range = get_range_then_a_save
        done = await rekey(cfg, store, Keyring(cfg.encryption), from_id=None, to_id="b", dry_run=False)
        assert done.changed == 0 and done.failed == ["pre/f: changed while it was rewritten (run rekey again)"]
        now = await store.head("pre/f")
        assert now.etag == mounts_save[0].etag and now.metadata == saved.metadata  # the save stays
        fs.close()
    trio.run(main)


def test_rekey_ends_with_the_store_durability_barrier(tmp_path, cmk_path, other_cmk_path):
    """A local-directory store acknowledges writes made only to the kernel (docs/design.md
    "Durability"): a rekey that re-saved objects must end with ``store.sync()`` as fsync() and
    unmount do, or a power loss right after it could lose the re-wrapped objects; a dry run
    writes nothing and needs none."""
    import trio

    from fakes.core import core_store

    from ossfuse.keyring import Keyring
    from ossfuse.rekey import rekey

    store = core_store(tmp_path)
    syncs = []
    real_sync = store.sync

    async def counting_sync():
        syncs.append(1)
        await real_sync()
    store.sync = counting_sync

    async def main():
        (await _with_committed_f(tmp_path, cmk_path, store)).close()
        cfg = _config_with_cmk_b(tmp_path, cmk_path, other_cmk_path)
        keyring = Keyring(cfg.encryption)
        del syncs[:]
        dry = await rekey(cfg, store, keyring, from_id=None, to_id="b", dry_run=True)
        assert (dry.changed, syncs) == (1, [])
        done = await rekey(cfg, store, keyring, from_id=None, to_id="b", dry_run=False)
        assert (done.changed, done.failed, syncs) == (1, [], [1])
    trio.run(main)


def test_a_killed_rekey_leaves_no_multipart_upload_behind(tmp_path, cmk_path, other_cmk_path, oss_server):
    """Rekey streams an object above the multipart threshold as a multipart upload; a rekey
    killed before CompleteMultipartUpload left its parts in the bucket, billed, for good. The
    next rekey run aborts exactly those (its ledger, ``<cache>/rekey-multipart``), says so,
    and rekeys the object; an upload another process began is left alone."""
    import subprocess
    from conftest import OSSFUSE
    m = Mount(str(tmp_path / "m"), cmk_path, "multipart_threshold = 204800\npart_size = 102400",
              server=oss_server, extra=_two_rsa_cmks(other_cmk_path, 'matdesc = { cmk = "b" }'))
    data = os.urandom(300_007)
    m.start()
    try:
        with open(m.path("big"), "wb") as f:
            f.write(data)
    finally:
        assert m.stop() == 0
    theirs = conftest.run_sync(m.store.create_multipart, "big", {})  # another client's upload of the same key
    oss_server.faults.add(status=503, count=None, methods=("POST",), query="uploadId")  # no Complete lands
    oss_server.clear_requests()
    rekey = subprocess.Popen(OSSFUSE + ["rekey", "-c", m.config, "--to", "b"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=m.env)
    deadline = time.monotonic() + 60
    while not [r for r in oss_server.requests_for(method="POST") if "uploadId" in r.query]:
        assert time.monotonic() < deadline and rekey.poll() is None
        time.sleep(0.02)
    rekey.kill()
    rekey.wait(timeout=30)
    oss_server.faults.clear()
    assert oss_server.pending_uploads() == 2
    r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "b"], capture_output=True, text=True, env=m.env,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aborted 1 unfinished multipart upload(s) an interrupted earlier rekey left" in r.stdout, r.stdout
    assert "changed: 1 object(s)" in r.stdout, r.stdout
    left = conftest.run_sync(m.store.list_multipart_uploads, "")
    assert [(k, u) for k, u, _t in left] == [("big", theirs)]
    conftest.run_sync(m.store.abort_multipart, "big", theirs)
    assert os.listdir(os.path.join(m.cache, "rekey-multipart")) == []
    assert crypto_bucket(m, rsa_provider(other_cmk_path, {"cmk": "b"})).get_object("big").read() == data


@pytest.mark.expect_log(r"ossfuse\.rekey: aborted unfinished multipart upload u-(gone|reused) of 'key-u-")
def test_rekey_aborts_only_the_uploads_of_rekeys_no_longer_running(tmp_path):
    """A record of a rekey still running (its pid alive with the same start time) is kept; one
    of a process gone, or of a pid reused by another process since, is aborted and forgotten."""
    import trio

    from ossfuse.registry import process_start_ticks
    from ossfuse.rekey import abort_interrupted_uploads
    from ossfuse.writeback.ledger import MultipartLedger

    gone = subprocess_pid_gone()
    owners = {"u-running": {"pid": os.getpid(), "start": process_start_ticks()},
              "u-gone": {"pid": gone, "start": 1},
              "u-reused": {"pid": os.getpid(), "start": (process_start_ticks() or 0) + 1}}
    for upload_id, owner in owners.items():
        MultipartLedger(str(tmp_path), "rekey-multipart", owner).started(f"key-{upload_id}", upload_id)

    class Store:
        aborted: list[tuple[str, str]] = []

        async def abort_multipart(self, key, upload_id):
            self.aborted.append((key, upload_id))

    ledger = MultipartLedger(str(tmp_path), "rekey-multipart")
    store = Store()
    assert trio.run(abort_interrupted_uploads, store, ledger) == 2
    assert sorted(store.aborted) == [("key-u-gone", "u-gone"), ("key-u-reused", "u-reused")]
    assert MultipartLedger(str(tmp_path), "rekey-multipart").left == {"u-running": "key-u-running"}


def subprocess_pid_gone() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: not reachable yet", r"WARNING ossfuse\.daemon: CMK 'h[0-2]': KMS did not "
                        r"answer: unreachable for \d+s \(startup_timeout\); mounted anyway",
                        r"ERROR ossfuse\.kms: KMS .* (unavailable|timed out)")
def test_kms_servers_that_never_answer_hold_the_mount_only_up_to_startup_timeout(tmp_path, cmk_path):
    """A trial: three KMS CMKs whose endpoint accepts connections and never answers failed
    the mount after 33 s with startup_timeout 3: each was asked in turn, for its own ~20 s of
    retries. They are asked at once, and the mount goes on at startup_timeout."""
    import socket
    import threading
    from conftest import Mount
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(64)], daemon=True).start()
    port = listener.getsockname()[1]
    cmks = "".join(f'[[encryption.cmk]]\nid = "h{i}"\ntype = "kms"\nkey_id = "k{i}"\nregion = "{REGION}"\n'
                   f'endpoint = "http://127.0.0.1:{port}"\n' for i in range(3))
    creds = tmp_path / "creds"
    creds.write_text('access_key_id = "a"\naccess_key_secret = "b"\n')
    creds.chmod(0o600)
    m = Mount(str(tmp_path / "m"), cmk_path, "startup_timeout = 2",
              extra=cmks.replace('type = "kms"', f'type = "kms"\ncredentials_file = "{creds}"'))
    try:
        t0 = time.monotonic()
        m.start()
        took = time.monotonic() - t0
        assert took < 15, took
        assert m.mount_stderr.count("mounted anyway") == 3, m.mount_stderr
        with open(m.path("plain"), "wb") as f:  # the RSA CMK encrypts new files: works
            f.write(b"rsa")
        assert m.stop() == 0
    finally:
        m.cleanup()
        listener.close()
